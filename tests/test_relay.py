"""The relay over a real SQLite event store and a real Kafka broker."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from crm_common.commands import CommandBus, CommandContext, UnitOfWork
from crm_common.relay import build_relay
from crm_common.settings import Settings


class Ticket(Aggregate):
    @event("Opened")
    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.notes: list[str] = []

    @event("Noted")
    def note(self, text: str) -> None:
        self.notes.append(text)


def to_wire(domain_event: Any, meta: dict[str, Any], position: int) -> tuple[str, str, bytes]:
    body = {
        "id": str(domain_event.originator_id),
        "version": domain_event.originator_version,
        "position": position,
        "type": type(domain_event).__qualname__,
        "actor": meta.get("actor"),
    }
    return str(domain_event.originator_id), f"test.{body['type']}", json.dumps(body).encode()


def settings(tmp_path: Path, bootstrap: str) -> Settings:
    return Settings(
        service="relaytest",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
        kafka_bootstrap=bootstrap,
    )


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()


async def consume_all(
    bootstrap: str, topic: str, expected: int, timeout: float = 30.0
) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for part in batch.values():
                records.extend(part)
            if len(records) >= expected:
                # Drain a little longer: duplicates would show up here.
                batch = await consumer.getmany(timeout_ms=500)
                for part in batch.values():
                    records.extend(part)
                break
        return records
    finally:
        await consumer.stop()


def write_events(app: Application[UUID], tickets: int, notes: int) -> int:
    bus = CommandBus(app, "relaytest")
    try:
        ids = [
            bus.execute(
                CommandContext("Open", actor="ada"), lambda uow: uow.add(Ticket("printer"))
            ).id
            for _ in range(tickets)
        ]
        futures = []
        for n in range(notes):
            ident = ids[n % tickets]

            def decide(uow: UnitOfWork, ident: str = ident, n: int = n) -> Ticket:
                ticket = uow.get(ident, Ticket)
                ticket.note(f"note {n}")
                return ticket

            futures.append(bus.submit(CommandContext("Note", actor="ada"), decide))
        for f in futures:
            f.result(30)
    finally:
        bus.close()
    return tickets + notes


async def test_every_event_reaches_kafka_in_order_per_key_with_cloudevents_headers(
    tmp_path, local_stack
):
    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    relay, app = build_relay(
        settings(tmp_path, bootstrap),
        to_wire=to_wire,
        app_factory=lambda s: Application(env=_env(s)),
        proto_message="test.Json",
    )
    relay.topic = topic
    relay.tracking_name = f"{topic}:relay"
    total = write_events(app, tickets=10, notes=190)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    records = await consume_all(bootstrap, topic, total)
    stop.set()
    await task
    assert len(records) == total
    bodies = [json.loads(r.value) for r in records]
    per_key: dict[str, list[int]] = {}
    for b in bodies:
        per_key.setdefault(b["id"], []).append(b["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in per_key.values())
    headers = dict(records[0].headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_source"] == b"/crm/relaytest"
    assert headers["ce_subject"] == records[0].key
    assert headers["ce_id"].decode() == f"{bodies[0]['id']}:{bodies[0]['version']}"
    assert headers["content-type"].startswith(b"application/protobuf")
    assert int(headers["crm_position"]) == bodies[0]["position"]
    assert relay.recorded_position() == app.recorder.max_notification_id()
    app.close()


def _env(s: Settings) -> dict[str, str]:
    from crm_common.eventstore import application_env

    return application_env(s)


async def test_a_relay_interrupted_at_random_moments_loses_nothing(tmp_path, local_stack):
    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    s = settings(tmp_path, bootstrap)
    app: Application[UUID] = Application(env=_env(s))
    total = write_events(app, tickets=20, notes=980)
    app.close()
    rng = random.Random(7)
    for _ in range(6):
        relay, relay_app = build_relay(
            s,
            to_wire=to_wire,
            app_factory=lambda st: Application(env=_env(st)),
            proto_message="test.Json",
        )
        relay.topic, relay.tracking_name = topic, f"{topic}:relay"
        relay.batch_size = 50
        task = asyncio.create_task(relay.run(asyncio.Event()))
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        task.cancel()  # abrupt: mid-batch, before or after acks
        with pytest.raises(asyncio.CancelledError):
            await task
        relay_app.close()
    relay, relay_app = build_relay(
        s,
        to_wire=to_wire,
        app_factory=lambda st: Application(env=_env(st)),
        proto_message="test.Json",
    )
    relay.topic, relay.tracking_name = topic, f"{topic}:relay"
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    records = await consume_all(bootstrap, topic, total, timeout=60)
    stop.set()
    await task
    relay_app.close()
    seen = {(json.loads(r.value)["id"], json.loads(r.value)["version"]) for r in records}
    assert len(seen) == total  # nothing lost; duplicates are allowed on the wire
