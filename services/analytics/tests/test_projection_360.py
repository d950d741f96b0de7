"""The 360 projection over a real Kafka topic and a real document store."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pipeline_events as deals
from aiokafka import AIOKafkaProducer
from contact_events import (
    comparable,
    envelope,
    expected_documents,
    interaction,
    linked,
    person_registered,
    publish,
    story,
)
from pipeline_events import deal_story
from pymongo.database import Database

from crm_analytics.from_pipeline import PIPELINE_PAYLOADS
from crm_analytics.store import Customer360Store
from crm_common.projection import DEAD_LETTERS_COLLECTION, ProjectionConsumer, stored_offsets


def projection(
    servers: Any, database: Database[Any], topic: str, pipeline_topic: str | None = None, **kw: Any
) -> tuple[ProjectionConsumer, Customer360Store]:
    topics = {"contacts": topic}
    if pipeline_topic:
        topics["pipeline"] = pipeline_topic
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
        **kw,
    )
    return consumer, store


def documents(database: Database[Any]) -> dict[str, Any]:
    return {d["_id"]: comparable(d) for d in database.customer360.find()}


async def test_every_customer_ends_as_the_events_say(analytics_servers, database, topic):
    events = story(seed=1)
    await publish(analytics_servers.kafka_bootstrap, topic, events)
    consumer, _ = projection(analytics_servers, database, topic, max_records=100)
    result = await consumer.run_until_caught_up()

    assert result.records == len(events)
    assert result.counters["applied"] == len(events)
    assert result.counters["dead_letters"] == 0
    # Fewer writes than events: a batch writes each touched customer once.
    assert result.counters["documents_written"] < len(events)
    assert documents(database) == expected_documents(events)

    # What a user sees: the linked persons show each company's current name,
    # and the company lists exactly the persons linked to it now.
    docs = documents(database)
    for company in (d for d in docs.values() if d["kind"] == "company"):
        persons = {
            p["_id"]
            for p in docs.values()
            if any(c["company_id"] == company["_id"] for c in p.get("companies", []))
        }
        assert {m["person_id"] for m in company["members"]} == persons
        for pid in persons:
            [membership] = [c for c in docs[pid]["companies"] if c["company_id"] == company["_id"]]
            assert membership["company_name"] == company["display_name"]
    assert consumer.stored_offsets() == result.end_offsets


async def test_events_published_twice_are_applied_once(analytics_servers, database, topic):
    events = story(seed=2, steps=200)
    await publish(analytics_servers.kafka_bootstrap, topic, events)
    # The relay restarted and published a suffix again.
    await publish(analytics_servers.kafka_bootstrap, topic, events[-120:])
    consumer, _ = projection(analytics_servers, database, topic, max_records=50)
    result = await consumer.run_until_caught_up()

    assert result.records == len(events) + 120
    assert result.counters["applied"] == len(events)
    assert result.counters["duplicates"] == 120
    assert documents(database) == expected_documents(events)


async def test_a_projection_stopped_mid_stream_resumes_exactly(analytics_servers, database, topic):
    events = story(seed=3, steps=300)
    await publish(analytics_servers.kafka_bootstrap, topic, events)
    stopped_at = []
    for pause in (0.0, 0.25, 0.15, 0.4):
        before = sum(stored_offsets(database, "customer360").values())
        consumer, _ = projection(analytics_servers, database, topic, max_records=20)
        task = asyncio.create_task(consumer.run(asyncio.Event()))
        # Stopped once it has committed a batch (however long starting takes
        # on a busy machine), and then at some later point.
        for _ in range(1000):
            now = sum(stored_offsets(database, "customer360").values())
            if now > before or before == len(events) or task.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(pause)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stopped_at.append(sum(consumer.stored_offsets().values()))
    assert 0 < stopped_at[0] < len(events), "the first stop should land mid-stream"
    consumer, _ = projection(analytics_servers, database, topic)
    result = await consumer.run_until_caught_up()
    assert documents(database) == expected_documents(events)
    assert consumer.stored_offsets() == result.end_offsets


async def test_a_rebuild_gives_the_same_documents(analytics_servers, database, topic):
    events = story(seed=4, steps=200)
    await publish(analytics_servers.kafka_bootstrap, topic, events[:150])
    consumer, store = projection(analytics_servers, database, topic, max_records=30)
    await consumer.run_until_caught_up()
    await publish(analytics_servers.kafka_bootstrap, topic, events[150:])
    await consumer.run_until_caught_up()
    live = documents(database)

    store.drop()
    assert consumer.stored_offsets() == {}
    assert store.count() == 0
    consumer, _ = projection(analytics_servers, database, topic, max_records=500)
    result = await consumer.run_until_caught_up()
    assert result.records == len(events)
    assert documents(database) == live == expected_documents(events)


async def test_records_that_cannot_be_applied_are_parked_and_the_rest_goes_on(
    analytics_servers, database, topic
):
    bootstrap = analytics_servers.kafka_bootstrap
    await publish(bootstrap, topic, [person_registered("ada", 1)])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        garbage = await producer.send_and_wait(topic, b"\xff\x00not protobuf", key=b"ada")
        # An event type newer than this code: decodes, but has no known payload.
        future = await producer.send_and_wait(
            topic, envelope("ada", 2).SerializeToString(), key=b"ada"
        )
    finally:
        await producer.stop()
    await publish(bootstrap, topic, [interaction("ada", 3, "i-1"), linked("ada", 4, "acme", "A")])
    consumer, store = projection(analytics_servers, database, topic)
    result = await consumer.run_until_caught_up()

    assert result.counters["dead_letters"] == 2
    parked = {d["offset"]: d for d in database[DEAD_LETTERS_COLLECTION].find()}
    assert set(parked) == {garbage.offset, future.offset}
    assert parked[garbage.offset]["error"].startswith("undecodable")
    assert parked[garbage.offset]["topic"] == topic
    assert parked[garbage.offset]["partition"] == garbage.partition
    assert "no known payload" in parked[future.offset]["error"]
    ada = store.get("ada")
    assert ada is not None
    assert ada["positions"]["contacts"] == 4
    assert [e["entry_id"] for e in ada["timeline"]] == ["ada:4:linked", "i-1", "ada:created"]
    assert [c["company_id"] for c in ada["companies"]] == ["acme"]


# -- both topics: the customers' deals ----------------------------------------------------


def customers_of(events: list[Any]) -> list[str]:
    return sorted({e.contact_id for e in events if e.WhichOneof("payload") == "person_registered"})


async def test_contacts_and_deals_from_both_topics_end_in_the_same_documents(
    analytics_servers, database, topic, pipeline_topic
):
    bootstrap = analytics_servers.kafka_bootstrap
    contact_events = story(seed=5, steps=200)
    # Some deals belong to customers the contacts topic never mentions.
    customers = [*customers_of(contact_events)[:15], "s5-unregistered-1", "s5-unregistered-2"]
    deal_events = deal_story(seed=5, customers=customers, steps=400)
    # The deals are published first: ordering across topics is not guaranteed.
    await deals.publish(bootstrap, pipeline_topic, deal_events)
    await publish(bootstrap, topic, contact_events)
    consumer, store = projection(analytics_servers, database, topic, pipeline_topic, max_records=60)
    result = await consumer.run_until_caught_up()

    without_customer = sum(1 for e in deal_events if not e.customer_id)
    assert result.records == len(contact_events) + len(deal_events)
    assert result.counters["dead_letters"] == 0
    assert result.counters["applied"] == result.records - result.counters["no_customer"]
    assert 0 < result.counters["no_customer"] < without_customer  # leads; not the pipeline's
    assert documents(database) == deals.expected_documents(contact_events, deal_events)
    assert {p["_id"]: p for p in database.customer360_pipelines.find()} == (
        deals.expected_pipelines(deal_events)
    )

    # What a user sees: the revenue is the exact sum of the won deals, and the
    # deals show the stage names as last renamed.
    docs = documents(database)
    with_deals = [d for d in docs.values() if d.get("deals")]
    assert len(with_deals) >= 10
    for doc in with_deals:
        totals: dict[str, Decimal] = {}
        for deal in doc["deals"]:
            if deal["status"] == "won":
                totals[deal["currency"]] = totals.get(deal["currency"], Decimal(0)) + Decimal(
                    deal["amount"]
                )
        assert {m["currency"]: Decimal(m["amount"]) for m in doc["lifetime_won_revenue"]} == totals
    renamed = [e for e in deal_events if e.WhichOneof("payload") == "stage_renamed"]
    assert renamed, "the story should rename a stage"
    last_name = {e.stage_renamed.stage_id: e.stage_renamed.name for e in renamed}
    stage_id, name = next(iter(last_name.items()))
    holder = next(d for d in with_deals if any(x["stage_id"] == stage_id for x in d["deals"]))
    shown = store.with_names(holder)
    assert {x["stage_name"] for x in shown["deals"] if x["stage_id"] == stage_id} == {name}
    assert {x["pipeline_name"] for x in shown["deals"]} == {"Sales"}
    unregistered = docs["s5-unregistered-1"]
    assert "kind" not in unregistered and unregistered["positions"]["pipeline"] > 0


async def test_deal_events_published_twice_are_applied_once(
    analytics_servers, database, topic, pipeline_topic
):
    bootstrap = analytics_servers.kafka_bootstrap
    contact_events = story(seed=6, steps=50)
    deal_events = deal_story(seed=6, customers=customers_of(contact_events), steps=200)
    await publish(bootstrap, topic, contact_events)
    await deals.publish(bootstrap, pipeline_topic, deal_events)
    # The pipeline relay restarted and published a suffix again.
    await deals.publish(bootstrap, pipeline_topic, deal_events[-80:])
    consumer, _ = projection(analytics_servers, database, topic, pipeline_topic, max_records=50)
    result = await consumer.run_until_caught_up()

    repeated_with_customer = sum(1 for e in deal_events[-80:] if e.customer_id)
    repeated_definitions = sum(
        1 for e in deal_events[-80:] if e.WhichOneof("payload") in PIPELINE_PAYLOADS
    )
    assert result.counters["duplicates"] == repeated_with_customer + repeated_definitions
    assert documents(database) == deals.expected_documents(contact_events, deal_events)


async def test_a_rebuild_from_both_topics_gives_the_same_documents(
    analytics_servers, database, topic, pipeline_topic
):
    bootstrap = analytics_servers.kafka_bootstrap
    contact_events = story(seed=7, steps=100)
    deal_events = deal_story(seed=7, customers=customers_of(contact_events), steps=200)
    await publish(bootstrap, topic, contact_events)
    await deals.publish(bootstrap, pipeline_topic, deal_events)
    consumer, store = projection(analytics_servers, database, topic, pipeline_topic)
    await consumer.run_until_caught_up()
    live = documents(database)
    live_pipelines = list(database.customer360_pipelines.find())

    store.drop()
    assert store.count() == 0
    assert database.customer360_pipelines.count_documents({}) == 0
    consumer, _ = projection(analytics_servers, database, topic, pipeline_topic, max_records=37)
    result = await consumer.run_until_caught_up()
    assert result.records == len(contact_events) + len(deal_events)
    assert documents(database) == live
    assert list(database.customer360_pipelines.find()) == live_pipelines


async def test_pipeline_records_that_cannot_be_applied_are_parked(
    analytics_servers, database, topic, pipeline_topic
):
    bootstrap = analytics_servers.kafka_bootstrap
    await deals.publish(bootstrap, pipeline_topic, [deals.opened("ada", 1, "d-1", "10.00")])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        # A newer event type of a customer, and an amount that is no decimal.
        future = await producer.send_and_wait(
            pipeline_topic, deals.envelope("ada", "d-1", 2, 2).SerializeToString(), key=b"ada"
        )
        broken = await producer.send_and_wait(
            pipeline_topic,
            deals.amount_changed("ada", 3, "d-1", 3, "12,50").SerializeToString(),
            key=b"ada",
        )
    finally:
        await producer.stop()
    await deals.publish(bootstrap, pipeline_topic, [deals.won("ada", 4, "d-1", 4, "10.00")])
    consumer, store = projection(analytics_servers, database, topic, pipeline_topic)
    result = await consumer.run_until_caught_up()

    assert result.counters["dead_letters"] == 2
    parked = {d["offset"]: d["error"] for d in database[DEAD_LETTERS_COLLECTION].find()}
    assert set(parked) == {future.offset, broken.offset}
    assert "no known payload" in parked[future.offset]
    assert "'12,50' is not a decimal" in parked[broken.offset]
    ada = store.get("ada")
    assert ada is not None
    assert ada["positions"]["pipeline"] == 4
    assert ada["lifetime_won_revenue"] == [{"amount": "10.00", "currency": "EUR"}]


async def test_a_deal_moved_by_a_merge_takes_its_revenue_to_the_survivor_and_back(
    analytics_servers, database, topic, pipeline_topic
):
    """A merge re-keys the duplicate's won deal to the survivor: the deal and its
    revenue leave the duplicate's view; later events reach the survivor's; the
    undone merge gives it back. A lead moved the same way only moves positions."""
    bootstrap = analytics_servers.kafka_bootstrap
    survivor, duplicate = "p-survivor", "p-duplicate"
    await deals.publish(
        bootstrap,
        pipeline_topic,
        [
            deals.opened(duplicate, 1, "d-1", amount="700.00"),
            deals.won(duplicate, 2, "d-1", 2, amount="700.00"),
            deals.opened(survivor, 3, "d-2", amount="50.00"),
        ],
    )
    consumer, _ = projection(analytics_servers, database, topic, pipeline_topic)
    # The merge comes later, once the deals it moves are in the view (as live).
    await consumer.run_until_caught_up()
    await deals.publish(
        bootstrap,
        pipeline_topic,
        [
            deals.customer_moved(survivor, duplicate, 4, "d-1", 3),
            deals.customer_moved(survivor, duplicate, 5, "lead-1", 2),
            deals.amount_changed(survivor, 6, "d-2", 2, "60.00"),
        ],
    )
    result = await consumer.run_until_caught_up()
    assert result.counters["dead_letters"] == 0
    kept = database.customer360.find_one({"_id": survivor})
    assert sorted(d["opportunity_id"] for d in kept["deals"]) == ["d-1", "d-2"]
    assert kept["lifetime_won_revenue"] == [{"amount": "700.00", "currency": "EUR"}]
    assert kept["positions"]["pipeline"] == 6
    [moved_in] = [d for d in kept["deals"] if d["opportunity_id"] == "d-1"]
    assert moved_in["person_id"] == survivor
    left = database.customer360.find_one({"_id": duplicate})
    assert left["deals"] == [] and left["lifetime_won_revenue"] == []

    await deals.publish(
        bootstrap,
        pipeline_topic,
        [deals.customer_moved(duplicate, survivor, 7, "d-1", 4, undone=True)],
    )
    await consumer.run_until_caught_up()
    kept = database.customer360.find_one({"_id": survivor})
    assert [d["opportunity_id"] for d in kept["deals"]] == ["d-2"]
    assert kept["lifetime_won_revenue"] == []
    back = database.customer360.find_one({"_id": duplicate})
    assert [(d["opportunity_id"], d["status"]) for d in back["deals"]] == [("d-1", "won")]
    assert back["deals"][0]["person_id"] == duplicate
    assert back["lifetime_won_revenue"] == [{"amount": "700.00", "currency": "EUR"}]
