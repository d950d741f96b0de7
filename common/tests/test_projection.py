"""The projection consumer over a real Kafka broker and a real document store.

The read model here is a tiny one (a running total per key, each record
carrying its own sequence number), so every assertion is about the plumbing:
exactly-once effects through offsets committed in the read model's
transaction, resuming, fencing, rebuilding and trace continuation.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pymongo import MongoClient, UpdateOne
from pymongo.client_session import ClientSession

from crm_common.projection import (
    DEAD_LETTERS_COLLECTION,
    OFFSETS_COLLECTION,
    OWNERS_COLLECTION,
    ProjectionConsumer,
    ProjectionFenced,
    Record,
    park_dead_letters,
    projection_span,
)
from crm_common.telemetry import kafka_headers_with_context

PARTITIONS = 3


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The shared local stack when there is one, else private servers."""
    try:
        yield request.getfixturevalue("local_stack")
        return
    except pytest.FixtureLookupError:
        pass
    helper = Path(__file__).parents[2] / "services" / "analytics" / "tests" / "local_servers.py"
    spec = importlib.util.spec_from_file_location("projection_local_servers", helper)
    assert spec is not None and spec.loader is not None
    local_servers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = local_servers
    spec.loader.exec_module(local_servers)
    root = tmp_path_factory.mktemp("projection-servers")
    started, processes = local_servers.start_all(root)
    try:
        yield started
    finally:
        local_servers.stop_all(processes)
        if not os.environ.get("CRM_KEEP_TEST_DATA"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mongo(servers: Any) -> Iterator[MongoClient[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(servers.mongo_url, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def database_name() -> str:
    return f"projtest_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def topic(servers: Any) -> AsyncIterator[str]:
    name = f"projtest.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        await admin.close()
    yield name


class Totals:
    """Adds each record's amount to its key's total, once per sequence number."""

    def __init__(self, client: MongoClient[dict[str, Any]], database: str) -> None:
        self.database = client[database]
        self.fail_on: int | None = None
        self.tracer: Any = None

    def apply_batch(self, session: ClientSession, records: Sequence[Record]) -> Mapping[str, int]:
        ops, failures = [], []
        for record in records:
            with projection_span(record, "totals", self.tracer):
                try:
                    body = json.loads(record.value or b"")
                except ValueError as error:
                    failures.append((record, f"not JSON: {error}"))
                    continue
                if body["seq"] == self.fail_on:
                    # Something already written in this transaction must vanish too.
                    self.database.totals.bulk_write(ops, session=session)
                    raise RuntimeError("read model broke")
                ops.append(
                    UpdateOne(
                        {"_id": body["key"]},
                        {"$inc": {"total": body["amount"], "records": 1}},
                        upsert=True,
                    )
                )
        if ops:
            self.database.totals.bulk_write(ops, session=session)
        park_dead_letters(session, self.database, "totals", failures)
        return {"applied": len(ops), "dead_letters": len(failures)}

    def totals(self) -> dict[str, tuple[int, int]]:
        return {d["_id"]: (d["total"], d["records"]) for d in self.database.totals.find()}


async def produce(bootstrap: str, topic: str, start: int, count: int, keys: int = 7) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        acks = []
        for seq in range(start, start + count):
            body = {"key": f"k{seq % keys}", "amount": seq, "seq": seq}
            acks.append(
                await producer.send(
                    topic, json.dumps(body).encode(), key=body["key"].encode(), headers=[]
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def expected_totals(count: int, keys: int = 7) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for seq in range(count):
        total, records = totals.get(f"k{seq % keys}", (0, 0))
        totals[f"k{seq % keys}"] = (total + seq, records + 1)
    return totals


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        return await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()


def consumer_for(
    servers: Any,
    mongo: MongoClient[dict[str, Any]],
    database: str,
    topic: str,
    model: Totals,
    **kw: Any,
) -> ProjectionConsumer:
    return ProjectionConsumer(
        projection="totals",
        topics=[topic],
        read_model=model,
        mongo=mongo,
        database=database,
        bootstrap=servers.kafka_bootstrap,
        poll_timeout_ms=50,
        **kw,
    )


async def test_every_record_is_applied_once_and_the_offsets_reach_the_end(
    servers, mongo, database_name, topic
):
    await produce(servers.kafka_bootstrap, topic, 0, 400)
    model = Totals(mongo, database_name)
    projection = consumer_for(servers, mongo, database_name, topic, model, max_records=64)
    result = await projection.run_until_caught_up()
    assert model.totals() == expected_totals(400)
    assert result.records == 400
    assert result.counters["applied"] == 400
    ends = await end_offsets(servers.kafka_bootstrap, topic)
    assert projection.stored_offsets() == ends
    stored = list(mongo[database_name][OFFSETS_COLLECTION].find({}, {"_id": 1}))
    assert sorted(d["_id"] for d in stored) == [f"totals:{topic}:{p}" for p in range(3)]


async def test_a_projection_stopped_at_random_moments_ends_exactly_right(
    servers, mongo, database_name, topic
):
    await produce(servers.kafka_bootstrap, topic, 0, 600)
    model = Totals(mongo, database_name)
    for pause in (0.05, 0.15, 0.1, 0.3, 0.2):
        projection = consumer_for(servers, mongo, database_name, topic, model, max_records=25)
        task = asyncio.create_task(projection.run(asyncio.Event()))
        await asyncio.sleep(pause)
        task.cancel()  # abrupt, possibly while a transaction is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
    # A cancelled task does not stop a transaction already running in its thread.
    await asyncio.sleep(0.5)
    projection = consumer_for(servers, mongo, database_name, topic, model)
    await projection.run_until_caught_up()
    assert model.totals() == expected_totals(600)
    assert projection.stored_offsets() == await end_offsets(servers.kafka_bootstrap, topic)


async def test_a_following_projection_applies_new_records_and_stops_on_request(
    servers, mongo, database_name, topic
):
    model = Totals(mongo, database_name)
    projection = consumer_for(servers, mongo, database_name, topic, model)
    stop = asyncio.Event()
    task = asyncio.create_task(projection.run(stop))
    await produce(servers.kafka_bootstrap, topic, 0, 50)
    for _ in range(200):
        if model.totals() == expected_totals(50):
            break
        await asyncio.sleep(0.05)
    assert model.totals() == expected_totals(50)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert projection.stats.records == 50


async def test_a_failing_batch_stores_neither_documents_nor_offsets(
    servers, mongo, database_name, topic
):
    await produce(servers.kafka_bootstrap, topic, 0, 30)
    model = Totals(mongo, database_name)
    model.fail_on = 29
    projection = consumer_for(servers, mongo, database_name, topic, model, max_records=1000)
    with pytest.raises(RuntimeError, match="read model broke"):
        await projection.run(asyncio.Event())
    # Whatever was stored, documents and offsets agree, and record 29 is in neither.
    applied = sum(records for _, records in model.totals().values())
    assert applied < 30
    assert applied == sum(projection.stored_offsets().values())
    model.fail_on = None
    await projection.run_until_caught_up()
    assert model.totals() == expected_totals(30)


async def test_undecodable_records_are_parked_with_their_coordinates(
    servers, mongo, database_name, topic
):
    producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"\x00garbage", key=b"k1", partition=1)
    finally:
        await producer.stop()
    await produce(servers.kafka_bootstrap, topic, 0, 10)
    model = Totals(mongo, database_name)
    result = await consumer_for(servers, mongo, database_name, topic, model).run_until_caught_up()
    assert model.totals() == expected_totals(10)
    assert result.counters["dead_letters"] == 1
    [parked] = mongo[database_name][DEAD_LETTERS_COLLECTION].find()
    assert (parked["topic"], parked["partition"], parked["offset"]) == (topic, 1, meta.offset)
    assert parked["value"] == b"\x00garbage"
    assert "not JSON" in parked["error"]


async def test_reset_rebuilds_from_the_beginning(servers, mongo, database_name, topic):
    await produce(servers.kafka_bootstrap, topic, 0, 40)
    model = Totals(mongo, database_name)
    projection = consumer_for(servers, mongo, database_name, topic, model)
    await projection.run_until_caught_up()
    mongo[database_name].totals.drop()
    assert projection.reset() == PARTITIONS
    assert projection.stored_offsets() == {}
    result = await projection.run_until_caught_up()
    assert result.records == 40
    assert model.totals() == expected_totals(40)


async def test_catching_up_on_an_empty_topic_returns_at_once(servers, mongo, database_name, topic):
    model = Totals(mongo, database_name)
    result = await asyncio.wait_for(
        consumer_for(servers, mongo, database_name, topic, model).run_until_caught_up(), 10
    )
    assert result.records == 0
    missing = consumer_for(servers, mongo, database_name, f"{topic}.missing", model)
    assert (await asyncio.wait_for(missing.run_until_caught_up(), 10)).records == 0


async def test_a_second_writer_of_the_offsets_stops_the_projector(
    servers, mongo, database_name, topic
):
    await produce(servers.kafka_bootstrap, topic, 0, 10)
    model = Totals(mongo, database_name)
    projection = consumer_for(servers, mongo, database_name, topic, model)
    task = asyncio.create_task(projection.run(asyncio.Event()))
    for _ in range(200):
        if sum(projection.stored_offsets().values()) == 10:
            break
        await asyncio.sleep(0.05)
    # Another projector (or a reset) moves the stored offsets behind its back.
    mongo[database_name][OFFSETS_COLLECTION].update_many({}, {"$inc": {"next_offset": 1}})
    await produce(servers.kafka_bootstrap, topic, 10, 30)
    with pytest.raises(ProjectionFenced):
        await asyncio.wait_for(task, 10)
    assert model.totals() == expected_totals(10)


async def test_the_projection_span_continues_the_publishers_trace(
    servers, mongo, database_name, topic
):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("publish test.Added") as publish:
        headers = kafka_headers_with_context([("ce_type", b"test.Added")])
    producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        body = json.dumps({"key": "k1", "amount": 5, "seq": 1}).encode()
        await producer.send_and_wait(topic, body, key=b"k1", headers=headers)
    finally:
        await producer.stop()
    model = Totals(mongo, database_name)
    model.tracer = tracer
    await consumer_for(servers, mongo, database_name, topic, model).run_until_caught_up()
    [span] = [s for s in exporter.get_finished_spans() if s.name.startswith("project ")]
    assert span.name == "project test.Added"
    assert span.context.trace_id == publish.get_span_context().trace_id
    assert span.parent is not None
    assert span.parent.span_id == publish.get_span_context().span_id


async def test_a_successor_does_not_wait_for_the_transaction_a_killed_projector_left_open(
    servers, mongo, database_name, topic
):
    await produce(servers.kafka_bootstrap, topic, 0, 20)
    model = Totals(mongo, database_name)
    await consumer_for(servers, mongo, database_name, topic, model).run_until_caught_up()
    # A projector dies inside a transaction that holds the offsets and a total.
    database = mongo[database_name]
    abandoned = mongo.start_session()
    database[OWNERS_COLLECTION].update_one(
        {"_id": "totals"}, {"$set": {"lsid": abandoned.session_id}}
    )
    abandoned.start_transaction()
    database[OFFSETS_COLLECTION].update_many({}, {"$inc": {"next_offset": 0}}, session=abandoned)
    database.totals.update_one({"_id": "k1"}, {"$inc": {"total": 1000}}, session=abandoned)

    await produce(servers.kafka_bootstrap, topic, 20, 20)
    successor = consumer_for(servers, mongo, database_name, topic, model)
    await asyncio.wait_for(successor.run_until_caught_up(), 15)
    assert model.totals() == expected_totals(40)


class Sequence_:
    """Remembers the order in which the read model was handed the records."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def apply_batch(self, session: ClientSession, records: Sequence[Record]) -> Mapping[str, int]:
        self.seen.extend(json.loads(r.value or b"")["seq"] for r in records)
        return {"applied": len(records)}


async def test_in_log_order_the_read_model_gets_each_topic_in_position_order(
    servers, mongo, database_name, topic
):
    """Records of many keys over the topic's partitions, each carrying its log
    position (`crm_position`, as the relays publish it): read `in_log_order`,
    the read model gets them in position order across the partitions, in
    small batches too; read the ordinary way, it gets them partition by partition."""
    count = 300
    producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send(
                topic,
                json.dumps({"seq": seq}).encode(),
                key=f"k{seq % 11}".encode(),
                headers=[("crm_position", str(seq + 1).encode())],
            )
            for seq in range(count)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    ordered = Sequence_()
    projection = consumer_for(servers, mongo, database_name, topic, ordered, max_records=16)
    result = await projection.run_until_caught_up(in_log_order=True)
    assert result.records == count
    assert ordered.seen == list(range(count))
    assert projection.stored_offsets() == await end_offsets(servers.kafka_bootstrap, topic)

    unordered = Sequence_()
    again = consumer_for(servers, mongo, f"{database_name}_b", topic, unordered, max_records=16)
    await again.run_until_caught_up()
    assert sorted(unordered.seen) == list(range(count))
    assert unordered.seen != list(range(count))
