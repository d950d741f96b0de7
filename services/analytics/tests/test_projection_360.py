"""The 360 projection over a real Kafka topic and a real document store."""

from __future__ import annotations

import asyncio
from typing import Any

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
from pymongo.database import Database

from crm_analytics.customer360 import Doc
from crm_analytics.store import Customer360Store
from crm_common.projection import DEAD_LETTERS_COLLECTION, ProjectionConsumer


def projection(
    servers: Any, database: Database[Doc], topic: str, **kw: Any
) -> tuple[ProjectionConsumer, Customer360Store]:
    store = Customer360Store(database, topics=[topic])
    store.ensure_indexes()
    consumer = ProjectionConsumer(
        projection="customer360",
        topics=[topic],
        read_model=store,
        mongo=database.client,
        database=database.name,
        bootstrap=servers.kafka_bootstrap,
        poll_timeout_ms=50,
        **kw,
    )
    return consumer, store


def documents(database: Database[Doc]) -> dict[str, Doc]:
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
    for pause in (0.1, 0.25, 0.15, 0.4):
        consumer, _ = projection(analytics_servers, database, topic, max_records=20)
        task = asyncio.create_task(consumer.run(asyncio.Event()))
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
    assert [e["entry_id"] for e in ada["timeline"]] == ["i-1", "ada:created"]
    assert [c["company_id"] for c in ada["companies"]] == ["acme"]
