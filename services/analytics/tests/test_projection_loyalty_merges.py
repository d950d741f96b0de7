"""A membership moved by a contacts merge, and back by its undo, in the 360
projection over a real Kafka topic and a real document store."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import loyalty_events as loyalty
import pytest
import ticket_events as tickets
from contact_events import T0, create_topic
from pymongo.database import Database

from crm_analytics.query import Customer360Queries
from crm_analytics.store import Customer360Store
from crm_common.projection import DEAD_LETTERS_COLLECTION, ProjectionConsumer

ADA, DAN = "p-ada", "p-dan"
DAY = timedelta(days=1)


@pytest.fixture
async def loyalty_topic(local_stack: Any) -> str:
    name = f"crm.loyalty.events.{uuid.uuid4().hex[:8]}"
    await create_topic(local_stack.kafka_bootstrap, name)
    return name


def projection(
    servers: Any, database: Database[Any], topic: str
) -> tuple[ProjectionConsumer, Customer360Store]:
    store = Customer360Store(database, topics={"loyalty": topic})
    store.ensure_indexes()
    consumer = ProjectionConsumer(
        projection="customer360",
        topics=[topic],
        read_model=store,
        mongo=database.client,
        database=database.name,
        bootstrap=servers.kafka_bootstrap,
        poll_timeout_ms=50,
        max_records=5,
    )
    return consumer, store


def history() -> list[Any]:
    """ADA with 30 points; DAN with 260 left of 300 and an order's 70 locked."""
    return [
        loyalty.enrolled(ADA, 1),
        loyalty.earned(ADA, 2, 2, "A1", 30, T0 + 300 * DAY),
        loyalty.enrolled(DAN, 3),
        loyalty.earned(DAN, 4, 2, "D1", 300, T0 + 20 * DAY),
        loyalty.earned(
            DAN, 5, 3, "D2", 70, T0 + 200 * DAY, locked_until=T0 + 14 * DAY, order_id="o-9"
        ),
        loyalty.spent(DAN, 6, 4, D1=40),
    ]


def moved() -> list[Any]:
    return [
        loyalty.moved_lot("D1", 260, T0 + 20 * DAY, spent=40),
        loyalty.moved_lot("D2", 70, T0 + 200 * DAY, locked_until=T0 + 14 * DAY, order_id="o-9"),
    ]


async def test_a_merged_membership_moves_to_the_survivors_view_and_back(
    analytics_servers, database, loyalty_topic
):
    bootstrap = analytics_servers.kafka_bootstrap
    await tickets.publish(bootstrap, loyalty_topic, history(), source="loyalty")
    consumer, store = projection(analytics_servers, database, loyalty_topic)
    # The merge comes once the lots it moves are in the view, as live.
    await consumer.run_until_caught_up()
    merge = [
        loyalty.closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"]),
        loyalty.membership_merged(ADA, 8, 3, DAN, moved()),
    ]
    await tickets.publish(bootstrap, loyalty_topic, merge, source="loyalty")
    await consumer.run_until_caught_up()
    # A relay restarted and published the merge again: nothing moves twice.
    await tickets.publish(bootstrap, loyalty_topic, merge, source="loyalty")
    result = await consumer.run_until_caught_up()
    assert result.counters["duplicates"] == 2

    queries = Customer360Queries(store, clock=lambda: T0 + 10 * DAY)
    ada = await queries.get_customer360(ADA, {"loyalty": 8})
    part = ada["loyalty"]
    assert part["balance"] == {
        "active": 290,
        "locked": 70,
        "expired": 0,
        "spent": 40,
        "cancelled": 0,
    }
    assert [(lot["lot_id"], lot["remaining"]) for lot in part["expiring_soon"]] == [("D1", 260)]
    assert ada["timeline"][0]["summary"] == "Membership merged in (contacts merged): 330 points"
    dan = await queries.get_customer360(DAN, {"loyalty": 7})
    assert dan["loyalty"]["balance"] == dict.fromkeys(part["balance"], 0)
    assert dan["loyalty"]["expiring_soon"] == []
    assert dan["loyalty"]["closed_by_merge"]["survivor_id"] == ADA

    # The undo, with the merge delivered once more behind it.
    undo = [
        loyalty.merge_undone(ADA, 9, 4, DAN, ["D1", "D2"]),
        loyalty.reopened(DAN, 10, 6, ADA, moved()),
        merge[1],
    ]
    await tickets.publish(bootstrap, loyalty_topic, undo, source="loyalty")
    result = await consumer.run_until_caught_up()
    assert result.counters["duplicates"] == 1
    assert database[DEAD_LETTERS_COLLECTION].count_documents({}) == 0

    ada = await queries.get_customer360(ADA, {"loyalty": 9})
    assert ada["loyalty"]["balance"] == {
        "active": 30,
        "locked": 0,
        "expired": 0,
        "spent": 0,
        "cancelled": 0,
    }
    assert [lot["lot_id"] for lot in ada["loyalty"]["lots"]] == ["A1"]
    dan = await queries.get_customer360(DAN, {"loyalty": 10})
    assert "closed_by_merge" not in dan["loyalty"]
    assert dan["loyalty"]["balance"] == {
        "active": 260,
        "locked": 70,
        "expired": 0,
        "spent": 40,
        "cancelled": 0,
    }
    assert dan["timeline"][0]["summary"] == "Membership reopened (merge undone): 330 points"
