"""The relay over a real SQLite event store and a real Kafka broker."""

from __future__ import annotations

import asyncio
import dataclasses
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
from crm_common.privacy import PersonalDataCipher, new_master_key
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
    tmp_path: Path, local_stack: Any
) -> None:
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


async def test_a_relay_interrupted_at_random_moments_loses_nothing(
    tmp_path: Path, local_stack: Any
) -> None:
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
    assert len(seen) == total  # nothing lost
    # ... and nothing twice: what the broker took before an interruption the
    # relay did not record, the next one finds on the broker and skips.
    assert len(records) == total


async def test_a_relay_whose_recorded_position_lags_the_broker_publishes_nothing_twice(
    tmp_path: Path, local_stack: Any
) -> None:
    """A relay killed after the broker acknowledged a batch but before it recorded
    its position (here: a relay that recorded nothing at all, after another
    published everything) reads what each partition already holds and skips it."""
    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    s = settings(tmp_path, bootstrap)
    app: Application[UUID] = Application(env=_env(s))
    first = write_events(app, tickets=5, notes=95)
    app.close()

    async def run_relay_until(tracking_name: str, expected: int) -> list[Any]:
        relay, relay_app = build_relay(
            s,
            to_wire=to_wire,
            app_factory=lambda st: Application(env=_env(st)),
            proto_message="test.Json",
        )
        relay.topic, relay.tracking_name = topic, tracking_name
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        records = await consume_all(bootstrap, topic, expected, timeout=60)
        stop.set()
        await task
        relay_app.close()
        return records

    assert len(await run_relay_until(f"{topic}:relay", first)) == first
    app = Application(env=_env(s))
    more = write_events(app, tickets=2, notes=8)
    app.close()
    # A tracking record of its own: position 0, as if the position were never written.
    records = await run_relay_until(f"{topic}:relay-forgetful", first + more)
    ids = [(json.loads(r.value)["id"], json.loads(r.value)["version"]) for r in records]
    assert len(ids) == len(set(ids)) == first + more


async def test_a_store_behind_a_topic_holding_other_events_publishes_all_of_its_own(
    tmp_path: Path, local_stack: Any
) -> None:
    """Positions alone do not say an event is on the topic: a store restored or
    wiped behind a topic that kept its records numbers its events from 1 again,
    and each of them is published (only the same event at the same position is
    taken as already there)."""
    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    published = 0
    for store in ("before", "after"):
        s = settings(tmp_path / store, bootstrap)
        app: Application[UUID] = Application(env=_env(s))
        count = write_events(app, tickets=3, notes=27)
        app.close()
        relay, relay_app = build_relay(
            s,
            to_wire=to_wire,
            app_factory=lambda st: Application(env=_env(st)),
            proto_message="test.Json",
        )
        relay.topic, relay.tracking_name = topic, f"{topic}:relay"
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        published += count
        records = await consume_all(bootstrap, topic, published, timeout=60)
        stop.set()
        await task
        relay_app.close()
    ids = [(json.loads(r.value)["id"], json.loads(r.value)["version"]) for r in records]
    assert len(ids) == len(set(ids)) == published


async def test_a_poison_event_is_set_aside_and_every_later_event_published_exactly_once(
    tmp_path: Path, local_stack: Any
) -> None:
    """One event larger than the broker takes and one the encoder fails on,
    stored bypassing the commands' limits: the relay sets both aside, reports
    failing, and publishes every other event once; an operator re-drives one
    (the encoder fixed) and skips the other, and the relay is ready again."""
    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    s = settings(tmp_path, bootstrap)
    app: Application[UUID] = Application(env=_env(s))
    ticket = Ticket("printer")
    for n in range(5):
        ticket.note(f"before {n}")
    ticket.note("x" * 1_500_000)  # the broker's limit is 1 MB
    ticket.note("unencodable")
    for n in range(5):
        ticket.note(f"after {n}")
    app.save(ticket)  # straight into the store, as an older release might have
    total = write_events(app, tickets=3, notes=60) + 1 + 10
    encoder_fixed = False

    def fragile_to_wire(
        domain_event: Any, meta: dict[str, Any], position: int
    ) -> tuple[str, str, bytes]:
        if getattr(domain_event, "text", None) == "unencodable" and not encoder_fixed:
            raise ValueError("no wire form for this note")
        key, ce_type, payload = to_wire(domain_event, meta, position)
        body = {**json.loads(payload), "text": getattr(domain_event, "text", None)}
        return key, ce_type, json.dumps(body).encode()

    relay, relay_app = build_relay(
        s,
        to_wire=fragile_to_wire,
        app_factory=lambda st: Application(env=_env(st)),
        proto_message="test.Json",
    )
    relay.topic, relay.tracking_name = topic, f"{topic}:relay"
    relay.dead_letters.topic = topic
    relay.batch_size = 4  # the poison events sit inside batches, not at their ends
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await consume_all(bootstrap, topic, total, timeout=60)
    await asyncio.sleep(1.5)  # anything published again would arrive by now
    records = await consume_all(bootstrap, topic, total, timeout=10)
    published = [(json.loads(r.value)["id"], json.loads(r.value)["version"]) for r in records]
    once = {p: published.count(p) for p in set(published)}
    assert set(once.values()) == {1}, "an event was published more than once"
    assert len(once) == total
    assert (str(ticket.id), 7) not in once and (str(ticket.id), 8) not in once
    assert relay.recorded_position() == relay_app.recorder.max_notification_id()

    letters = relay.dead_letters.open()
    assert [(d.event, d.state) for d in letters] == [
        (f"{ticket.id}:7", "open"),
        (f"{ticket.id}:8", "open"),
    ]
    assert "too large" in letters[0].reason
    assert "cannot be encoded: ValueError" in letters[1].reason
    assert not relay.heartbeat.ready
    assert relay.health_details()["open_dead_letters"] == 2

    encoder_fixed = True
    assert relay.dead_letters.resolve(letters[1].position, "redrive")
    assert relay.dead_letters.resolve(letters[0].position, "skipped")
    relay._dead_letters_checked = 0.0  # look now rather than within 5 s
    for _ in range(100):
        if relay.heartbeat.ready:
            break
        await asyncio.sleep(0.1)
    assert relay.heartbeat.ready
    stop.set()
    await task
    relay_app.close()
    app.close()
    final = await consume_all(bootstrap, topic, total + 1, timeout=10)
    versions = [
        json.loads(r.value)["version"] for r in final if json.loads(r.value)["id"] == str(ticket.id)
    ]
    assert sorted(versions) == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]  # 8 re-driven, 7 not
    assert [d.state for d in relay.dead_letters.all()] == ["skipped", "redriven"]


def test_a_command_whose_event_is_too_large_to_publish_is_refused_and_stores_nothing(
    tmp_path: Path,
) -> None:
    from crm_common.commands import MAX_EVENT_BYTES
    from crm_common.errors import ValidationFailed

    s = settings(tmp_path, "127.0.0.1:9")
    app: Application[UUID] = Application(env=_env(s))
    bus = CommandBus(app, "relaytest")
    try:
        opened = bus.execute(
            CommandContext("Open", actor="ada"), lambda uow: uow.add(Ticket("printer"))
        )
        before = app.recorder.max_notification_id()

        def note(text: str) -> Any:
            def decide(uow: UnitOfWork) -> Ticket:
                ticket = uow.get(opened.id, Ticket)
                ticket.note(text)
                return ticket

            return decide

        with pytest.raises(ValidationFailed) as refused:
            bus.execute(CommandContext("Note", actor="ada"), note("x" * (MAX_EVENT_BYTES + 1)))
        assert refused.value.errors[0].field == "body"
        assert "too large" in refused.value.errors[0].message
        assert app.recorder.max_notification_id() == before
        # The aggregate was left as it was: the next command works on it.
        written = bus.execute(CommandContext("Note", actor="ada"), note("short"))
        assert written.version == 2
    finally:
        bus.close()
        app.close()


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_operators_command_lists_redrives_and_skips_dead_letters(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from crm_common import relay as relay_module
    from crm_deploy.testing import drop_schema, postgres_settings, postgres_target

    schema = f"relay_test_{uuid.uuid4().hex[:12]}"
    if store == "sqlite":
        s = settings(tmp_path, "127.0.0.1:9")
    else:
        postgres_target()
        s = postgres_settings("relaytest", schema)
    # The service's settings, as its environment would give them.
    monkeypatch.setattr(Settings, "from_env", lambda service: s)
    try:
        letters = relay_module.dead_letters_of(s)
        letters.record(17, "c0ffee:3", "too large: 2000000 bytes")
        letters.record(21, "c0ffee:4", "cannot be encoded: ValueError: no wire form")
        letters.record(17, "c0ffee:3", "too large: 2000001 bytes")  # set aside again
        assert relay_module.main(["relaytest", "dead-letters", "--open"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert [line.split("\t")[:3] for line in listed] == [
            ["17", "open", "c0ffee:3"],
            ["21", "open", "c0ffee:4"],
        ]
        assert listed[0].endswith("too large: 2000001 bytes")
        assert relay_module.main(["relaytest", "redrive", "21"]) == 0
        assert relay_module.main(["relaytest", "skip", "17"]) == 0
        assert relay_module.main(["relaytest", "skip", "99"]) == 1
        assert [(d.position, d.state) for d in letters.open()] == [(21, "redrive")]
        assert [d.position for d in letters.to_redrive()] == [21]
        assert [(d.position, d.state) for d in letters.all()] == [(17, "skipped"), (21, "redrive")]
        assert letters.all()[0].resolved_at is not None
    finally:
        if store == "postgres":
            drop_schema(schema)


async def test_a_publish_failing_part_way_republishes_nothing_the_broker_took(
    tmp_path: Path, local_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker acknowledges the first messages of a batch, then one fails (as a
    delivery that ran out of retries does): the relay records the acknowledged
    prefix, reconnects, and publishes from the failed message on, each once."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaTimeoutError

    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    s = settings(tmp_path, bootstrap)
    app: Application[UUID] = Application(env=_env(s))
    total = write_events(app, tickets=2, notes=48)
    app.close()
    real_send = AIOKafkaProducer.send
    sends = 0

    async def send(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> Any:
        nonlocal sends
        sends += 1
        if sends == 10:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(KafkaTimeoutError("delivery timed out"))
            return failed
        return await real_send(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaProducer, "send", send)
    relay, relay_app = build_relay(
        s,
        to_wire=to_wire,
        app_factory=lambda st: Application(env=_env(st)),
        proto_message="test.Json",
    )
    relay.topic, relay.tracking_name = topic, f"{topic}:relay"
    relay.dead_letters.topic = topic
    relay.batch_size = 25
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await consume_all(bootstrap, topic, total, timeout=60)
    await asyncio.sleep(1.0)
    records = await consume_all(bootstrap, topic, total, timeout=10)
    stop.set()
    await task
    relay_app.close()
    assert sends > 10  # the failure happened, and the relay went on
    published = [(json.loads(r.value)["id"], json.loads(r.value)["version"]) for r in records]
    assert len(published) == len(set(published)) == total
    assert relay.dead_letters.all() == []  # a failure that passes is no dead letter


# -- personal data leaves sealed --------------------------------------------------------

MASTER_KEYS = new_master_key("relay-test")
#: Three people of the contacts service: stored before keys were configured (one
#: erased before the relay ever published it), and stored with keys.
OLD = ("Grace", "Hopper", "grace.hopper@example.org", "+12025550147")
GONE = ("Hedy", "Lamarr", "hedy.lamarr@example.org", "+13105550163")
NEW = ("Katherine", "Johnson", "katherine.johnson@example.org", "+17575550199")


def contacts_settings(tmp_path: Path, bootstrap: str, keys: str = "") -> Settings:
    return Settings(
        service="contacts",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
        kafka_bootstrap=bootstrap,
        master_keys=keys,
    )


async def register(s: Settings, person: tuple[str, str, str, str]) -> str:
    """A person registered through the contacts service; their contact id."""
    from crm_common.commands import Caller
    from crm_contacts.application import ContactsService, create_application
    from crm_contacts.inputs import ChannelInput, NewPerson

    given, family, email, phone = person
    service = ContactsService(create_application(s))
    try:
        written = await service.create_person(
            Caller(actor="user-ada", client="crm-web", request_id=f"req-{uuid.uuid4().hex}"),
            NewPerson(
                given_name=given,
                family_name=family,
                channels=[ChannelInput("email", email), ChannelInput("phone", phone)],
                tags=["vip"],
                owner="user-ada",
            ),
        )
    finally:
        service.close()
    contact_id: str = written.contact.id
    return contact_id


def registered(records: list[Any], contact_id: str) -> list[Any]:
    """The parsed PersonRegistered messages of a contact."""
    from crm.events.v1 import contacts_pb2

    found = []
    for record in records:
        message = contacts_pb2.ContactEvent.FromString(record.value)
        if message.contact_id == contact_id and message.HasField("person_registered"):
            found.append(message)
    return found


def person_of(message: Any) -> tuple[str, ...]:
    profile = message.person_registered.profile
    return (
        profile.given_name,
        profile.family_name,
        *(channel.address for channel in profile.channels),
    )


def contacts_relay(s: Settings, topic: str) -> tuple[Any, Any]:
    from crm_contacts import events_out
    from crm_contacts.application import create_application

    relay, app = build_relay(
        s,
        to_wire=events_out.to_wire,
        app_factory=create_application,
        proto_message=events_out.PROTO_MESSAGE,
    )
    relay.topic, relay.tracking_name = topic, f"{topic}:relay"
    relay.dead_letters.topic = topic
    return relay, app


async def test_with_master_keys_personal_fields_reach_kafka_only_sealed(
    tmp_path: Path, local_stack: Any
) -> None:
    """Names, e-mail addresses and phone numbers never show in the topic's bytes,
    whether the event was stored before or after keys were configured; ids, tags
    and versions stay readable; a consumer the registry allows opens the values
    (audited); after an erase the published messages open as "[erased]", and an
    erased person's event stored in clear is published as "[erased]"; a re-drive
    publishes sealed too."""
    from crm_common.privacy import key_client
    from crm_common.privacy.wire import open_message, sealed_texts

    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    clear = contacts_settings(tmp_path, bootstrap)
    old_id = await register(clear, OLD)
    gone_id = await register(clear, GONE)
    keyed = contacts_settings(tmp_path, bootstrap, MASTER_KEYS)
    new_id = await register(keyed, NEW)
    owner = key_client(keyed)
    assert owner is not None
    owner.destroy(gone_id)  # erased before its event was ever published

    relay, app = contacts_relay(keyed, topic)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        records = await consume_all(bootstrap, topic, 3)
        assert len(records) == 3
        # A re-drive of a published event goes out sealed as well.
        position = registered(records, new_id)[0].position
        relay.dead_letters.record(position, f"{new_id}:1", "set aside by the test")
        assert relay.dead_letters.resolve(position, "redrive")
        relay._dead_letters_checked = 0.0
        for _ in range(100):
            if [d.state for d in relay.dead_letters.all()] == ["redriven"]:
                break
            await asyncio.sleep(0.1)
        assert [d.state for d in relay.dead_letters.all()] == ["redriven"]
        records = await consume_all(bootstrap, topic, 4)
    finally:
        stop.set()
        await task
        app.close()
    assert len(records) == 4
    assert relay.sealed == 4

    raw = b"".join(r.value + (r.key or b"") + b"".join(v for _, v in r.headers) for r in records)
    for person in (OLD, GONE, NEW):
        for value in person:
            assert value.encode() not in raw, value
    assert b"@example.org" not in raw

    # What is not personal stays readable without any key.
    for contact_id in (old_id, gone_id, new_id):
        (first, *_) = registered(records, contact_id)
        assert first.contact_id == contact_id and first.version == 1 and first.position > 0
        assert list(first.person_registered.profile.tags) == ["vip"]
        assert first.person_registered.profile.owner == "user-ada"
        assert len(first.person_registered.profile.channels) == 2
    assert set(sealed_texts(registered(records, gone_id)[0])) == {"[erased]"}
    sealed = [m for c in (old_id, new_id) for m in registered(records, c)]
    assert len(sealed) == 3
    for message in sealed:
        assert all(text.startswith(f"pd1.{message.contact_id}.") for text in sealed_texts(message))

    # A consumer the registry lets read contacts' keys opens them, and is audited.
    analytics = dataclasses.replace(keyed, service="analytics")
    consumer = key_client(analytics, owner="contacts")
    assert consumer is not None
    try:
        cipher = PersonalDataCipher(consumer)
        for message in sealed:
            open_message(message, cipher, "test consumer")
        assert person_of(registered_opened(sealed, old_id)) == OLD
        assert person_of(registered_opened(sealed, new_id)) == NEW
        audited = {(a.accessor, a.subject) for a in owner.store.accesses()}
        assert {("analytics", old_id), ("analytics", new_id)} <= audited
    finally:
        consumer.close()

    # Erased after publishing: what the topic holds opens as the marker from then on.
    owner.destroy(new_id)
    owner.close()
    consumer = key_client(analytics, owner="contacts")  # a fresh cache
    assert consumer is not None
    try:
        for message in registered(records, new_id):
            open_message(message, PersonalDataCipher(consumer), "test consumer")
            assert set(person_of(message)) == {"[erased]"}
            assert list(message.person_registered.profile.tags) == ["vip"]
    finally:
        consumer.close()


def registered_opened(messages: list[Any], contact_id: str) -> Any:
    (message, *_) = [m for m in messages if m.contact_id == contact_id]
    return message


async def test_without_master_keys_the_payload_is_the_services_own(
    tmp_path: Path, local_stack: Any
) -> None:
    from crm_contacts import events_out

    bootstrap = local_stack.kafka_bootstrap
    topic = f"crm.relaytest{uuid.uuid4().hex[:6]}.events"
    await create_topic(bootstrap, topic)
    s = contacts_settings(tmp_path, bootstrap)
    contact_id = await register(s, OLD)
    relay, app = contacts_relay(s, topic)
    assert relay.personal_data is None
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        records = await consume_all(bootstrap, topic, 1)
    finally:
        stop.set()
        await task
    try:
        (notification,) = [
            n
            for n in app.recorder.select_notifications(1, 100)
            if events_out.to_wire(app.mapper.to_domain_event(n), {}, n.id) is not None
        ]
        event = app.mapper.to_domain_event(notification)
        meta = dict(getattr(event, "_meta", None) or {})
        expected = events_out.to_wire(event, meta, notification.id)
    finally:
        app.close()
    assert expected is not None
    assert [r.value for r in records] == [expected[2]]
    assert person_of(registered(records, contact_id)[0]) == OLD
    assert relay.sealed == 0
