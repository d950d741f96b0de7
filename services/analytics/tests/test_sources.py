"""What the 360 view consumes: the registry's sources, and every payload of their events."""

from __future__ import annotations

from pymongo import MongoClient

from crm.events.v1 import contacts_pb2, loyalty_pb2, pipeline_pb2, tickets_pb2
from crm_analytics import from_contacts, from_loyalty, from_pipeline, from_tickets
from crm_analytics.store import ADAPTERS, Customer360Store, sources, waitable_positions
from crm_common.registry import service
from crm_common.settings import topic_of


def payloads(message: type) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.oneofs_by_name["payload"].fields}  # type: ignore[attr-defined]


def test_the_sources_are_the_registrys_and_each_has_an_adapter():
    assert (
        sources() == service("analytics").consumes == ("contacts", "pipeline", "tickets", "loyalty")
    )
    assert set(sources()) == set(ADAPTERS)
    assert all(ADAPTERS[s].source == s for s in sources())
    # A reader may wait for each source's position, and for an ERP order record's.
    assert waitable_positions() == (*sources(), "erp.orders")


def test_the_store_reads_the_topic_of_every_source_by_default():
    client: MongoClient[dict[str, object]] = MongoClient("mongodb://127.0.0.1:1", connect=False)
    try:
        store = Customer360Store(client["unused"])
    finally:
        client.close()
    assert store.topics == {source: topic_of(source) for source in sources()}


def test_every_contacts_payload_has_a_handler():
    assert payloads(contacts_pb2.ContactEvent) == from_contacts.PAYLOADS


def test_every_pipeline_payload_is_in_exactly_one_table():
    tables = [from_pipeline.DEAL_PAYLOADS, from_pipeline.PIPELINE_PAYLOADS]
    tables += [from_pipeline.ACTIVITY_PAYLOADS, from_pipeline.OTHER_PAYLOADS]
    tables += [from_pipeline.MOVED_PAYLOADS]
    assert payloads(pipeline_pb2.PipelineEvent) == set().union(*tables)
    assert sum(len(t) for t in tables) == len(set().union(*tables))


def test_every_tickets_payload_is_in_exactly_one_table():
    tables = [from_tickets.CASE_PAYLOADS, from_tickets.POLICY_PAYLOADS]
    assert payloads(tickets_pb2.TicketEvent) == set().union(*tables)
    assert not tables[0] & tables[1]


def test_every_loyalty_payload_is_in_exactly_one_table():
    tables = [from_loyalty.MEMBER_PAYLOADS, from_loyalty.MERGE_PAYLOADS]
    tables += [from_loyalty.CATALOGUE_PAYLOADS]
    assert payloads(loyalty_pb2.LoyaltyEvent) == set().union(*tables)
    assert sum(len(t) for t in tables) == len(set().union(*tables))
