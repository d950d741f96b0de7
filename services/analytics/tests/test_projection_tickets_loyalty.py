"""Cases and loyalty in the 360 projection, over real Kafka topics and a real document store."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import loyalty_events as loyalty
import pytest
import ticket_events as tickets
from contact_events import T0, create_topic, person_registered, publish
from pymongo.database import Database

from crm.tickets.v1 import tickets_pb2
from crm_analytics.query import Customer360Queries
from crm_analytics.store import Customer360Store
from crm_common.projection import DEAD_LETTERS_COLLECTION, ProjectionConsumer

ADA, BOB = "p-ada", "p-bob"
DAY = timedelta(days=1)


@pytest.fixture
async def topics(local_stack: Any) -> dict[str, str]:
    names = {
        source: f"crm.{source}.events.{uuid.uuid4().hex[:8]}"
        for source in ("contacts", "tickets", "loyalty")
    }
    for name in names.values():
        await create_topic(local_stack.kafka_bootstrap, name)
    return names


def projection(
    servers: Any, database: Database[Any], topics: dict[str, str]
) -> tuple[ProjectionConsumer, Customer360Store]:
    store = Customer360Store(database, topics=topics)
    store.ensure_indexes()
    consumer = ProjectionConsumer(
        projection="customer360",
        topics=list(topics.values()),
        read_model=store,
        mongo=database.client,
        database=database.name,
        bootstrap=servers.kafka_bootstrap,
        poll_timeout_ms=50,
        max_records=7,
    )
    return consumer, store


def ticket_story() -> list[Any]:
    solved = tickets.sla(tickets.clock("resolution", "met"))
    return [
        tickets.policy_defined(1),
        tickets.opened(ADA, "k-1", 2),
        tickets.opened(BOB, "k-2", 3),
        tickets.breached(
            BOB, "k-2", 4, 2, tickets.sla(tickets.clock("first_response", "breached"))
        ),
        tickets.status(ADA, "k-1", 5, 2, tickets_pb2.CASE_STATUS_SOLVED, solved),
        tickets.satisfaction(ADA, "k-1", 6, 3, csat=4, ces=3, nps=8),
    ]


def loyalty_story() -> list[Any]:
    return [
        loyalty.rules_published(1),
        loyalty.enrolled(ADA, 2),
        loyalty.earned(ADA, 3, 2, "L1", 120, T0 + 20 * DAY, order_id="o-1", erp_position=11),
        loyalty.tier_changed(ADA, 4, 3, "silver", 1200, from_tier="basic"),
        # A payload this version does not know (a reward redeemed, say).
        loyalty.envelope(ADA, 5, 4, erp_position=12),
        loyalty.spent(ADA, 6, 5, L1=20),
    ]


async def test_cases_and_membership_reach_the_view_once(analytics_servers, database, topics):
    bootstrap = analytics_servers.kafka_bootstrap
    await publish(bootstrap, topics["contacts"], [person_registered(ADA, 1)])
    ticket_events, loyalty_events = ticket_story(), loyalty_story()
    await tickets.publish(bootstrap, topics["tickets"], ticket_events)
    await tickets.publish(bootstrap, topics["loyalty"], loyalty_events, source="loyalty")
    # A relay restarted and published a suffix again.
    await tickets.publish(bootstrap, topics["tickets"], ticket_events[-3:])
    await tickets.publish(bootstrap, topics["loyalty"], loyalty_events[-2:], source="loyalty")

    consumer, store = projection(analytics_servers, database, topics)
    result = await consumer.run_until_caught_up()
    assert result.counters["duplicates"] == 5
    # The SLA policy and the earning rules: no customer, and no dead letter.
    assert result.counters["no_customer"] == 2
    assert result.counters["dead_letters"] == 1
    [dead] = database[DEAD_LETTERS_COLLECTION].find({"projection": "customer360"})
    assert dead["topic"] == topics["loyalty"]
    assert "no known payload" in dead["error"]

    queries = Customer360Queries(store, clock=lambda: T0 + DAY)
    ada = await queries.get_customer360(ADA, {"tickets": 6, "loyalty": 6, "erp.orders": 12})
    assert ada["display_name"] == "Ada Lovelace"
    assert ada["tickets"]["open_cases"] == []
    [solved] = ada["tickets"]["recent_cases"]
    assert (solved["case_id"], solved["status"]) == ("k-1", "solved")
    assert solved["satisfaction"]["csat"] == 4
    assert ada["tickets"]["satisfaction"]["responses"] == 1
    part = ada["loyalty"]
    assert part["balance"]["active"] == 100
    assert part["balance"]["spent"] == 20
    assert (part["tier"], part["qualifying_points"]) == ("silver", 1200)
    # The unknown payload counted as seen: both positions moved past it.
    assert ada["positions"] == {"contacts": 1, "tickets": 6, "loyalty": 6, "erp.orders": 12}
    assert [(lot["lot_id"], lot["remaining"]) for lot in part["expiring_soon"]] == [("L1", 100)]

    bob = await queries.get_customer360(BOB)
    [case] = bob["tickets"]["open_cases"]
    assert case["sla"]["breached"] is True
    assert "loyalty" not in bob

    # The audit trail covers both new sources, one entry per event.
    page = await queries.get_audit_trail(customer_id=ADA, page_size=100)
    sources = sorted(e["source"] for e in page.entries)
    assert sources == ["contacts"] + ["loyalty"] * 5 + ["tickets"] * 3
    assert {e["actor"] for e in page.entries if e["source"] != "contacts"} == {"ada", "bob"}


async def test_a_case_moved_by_a_merge_leaves_one_view_for_the_other_and_comes_back(
    analytics_servers, database, topics
):
    """A merge re-keys BOB's case to ADA: the case, its SLA and its survey answer
    leave BOB's view for ADA's, later events of the case reach ADA's; the
    undone merge gives it back the same way. Redelivered, nothing moves twice."""
    bootstrap = analytics_servers.kafka_bootstrap
    solved = tickets.sla(tickets.clock("resolution", "met"))
    events = [
        tickets.opened(ADA, "k-1", 1),
        tickets.opened(BOB, "k-2", 2),
        tickets.status(BOB, "k-2", 3, 2, tickets_pb2.CASE_STATUS_SOLVED, solved),
        tickets.satisfaction(BOB, "k-2", 4, 3, csat=2),
        tickets.moved(ADA, BOB, "k-2", 5, 4),
        tickets.status(ADA, "k-2", 6, 5, tickets_pb2.CASE_STATUS_OPEN),
    ]
    await tickets.publish(bootstrap, topics["tickets"], events[:4])
    consumer, store = projection(analytics_servers, database, topics)
    # The merge comes later, once the case it moves is in the view (as live).
    await consumer.run_until_caught_up()
    await tickets.publish(bootstrap, topics["tickets"], events[4:])
    await consumer.run_until_caught_up()
    queries = Customer360Queries(store, clock=lambda: T0 + DAY)

    ada = await queries.get_customer360(ADA, {"tickets": 6})
    assert sorted(c["case_id"] for c in ada["tickets"]["open_cases"]) == ["k-1", "k-2"]
    assert ada["tickets"]["satisfaction"]["responses"] == 1
    assert "Case moved in (contacts merged)" in [e["summary"] for e in ada["timeline"]]
    bob = await queries.get_customer360(BOB)
    assert bob["tickets"]["open_cases"] == bob["tickets"]["recent_cases"] == []
    assert bob["tickets"]["satisfaction"]["responses"] == 0

    # The merge undone: the case goes back, reopened as it now is; a redelivery
    # of the first move changes nothing.
    await tickets.publish(
        bootstrap,
        topics["tickets"],
        [tickets.moved(BOB, ADA, "k-2", 7, 6, undone=True), events[4]],
    )
    result = await consumer.run_until_caught_up()
    assert result.counters["dead_letters"] == 0
    ada = await queries.get_customer360(ADA, {"tickets": 6})
    assert [c["case_id"] for c in ada["tickets"]["open_cases"]] == ["k-1"]
    assert ada["tickets"]["satisfaction"]["responses"] == 0
    bob = await queries.get_customer360(BOB, {"tickets": 7})
    [case] = bob["tickets"]["open_cases"]
    assert (case["case_id"], case["status"]) == ("k-2", "open")
    assert bob["tickets"]["satisfaction"]["responses"] == 1
