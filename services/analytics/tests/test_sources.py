"""What the 360 view consumes: the registry's sources, and every payload of their events."""

from __future__ import annotations

from pymongo import MongoClient

from crm.events.v1 import contacts_pb2, pipeline_pb2
from crm_analytics import from_contacts, from_pipeline
from crm_analytics.store import DECODERS, Customer360Store, sources
from crm_common.registry import service
from crm_common.settings import topic_of


def payloads(message: type) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.oneofs_by_name["payload"].fields}  # type: ignore[attr-defined]


def test_the_sources_are_the_registrys_and_each_has_a_decoder():
    assert sources() == service("analytics").consumes
    assert set(sources()) == set(DECODERS)


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
    tables.append(from_pipeline.OTHER_PAYLOADS)
    assert payloads(pipeline_pb2.PipelineEvent) == set().union(*tables)
    assert sum(len(t) for t in tables) == len(set().union(*tables))
