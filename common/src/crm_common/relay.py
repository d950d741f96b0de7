"""The relay: the event store's notification log is the outbox.

A relay follows its service's notification log from the position it last
recorded, publishes each public event to the service's Kafka topic with an
idempotent producer (`acks=all`), and records the new position only after
the broker has acknowledged every message of the batch. Killed at any
moment, it restarts from the recorded position and first reads back, from
the end of each partition, the positions past it that the topic already
holds: nothing is lost and nothing is published twice (consumers still drop
what they already applied, as a defence).
There is no dual write: command handlers never publish.

An event that can never be published (larger than the broker takes, or one
the service's encoder fails on) must not stop the relay nor make it publish
the rest of its batch again and again: it is set aside in the relay's
dead-letter table (`relay_dead_letters`, beside the position it records) with
the reason, the relay reports itself failing (`/readyz` 503) and logs one
error line, and goes on with the next event. The broker's acknowledgements
are recorded per prefix: when publishing fails part way, the position moves
past every message acknowledged before the first that failed, so a retry
publishes nothing the broker already took. `python -m crm_common.relay`
lists the dead letters, re-drives one (publishes it again) or skips it
(docs/reliability.md, "Poison events").

Personal data leaves sealed (docs/security.md, "Privacy"): when the service
has master keys, the payload of every event whose class declares personal
data is parsed into the service's envelope message and each field the
contract marks personal (`crm.privacy.v1.personal`) is sealed under the data
key of the event's subject (`crm_common.privacy.wire`) before the size check
and the send, so a topic never holds a name, an address or a free text in
clear while ids, amounts and states stay readable. Events stored before
encryption was turned on (loaded in clear) are sealed the same way; an erased
subject's values go out as `"[erased]"`. A re-drive takes the same path.
Without master keys the payloads are published as the service encodes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    InvalidMessageError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from eventsourcing.application import Application
from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    Mapper,
    Notification,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.utils import Environment
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from psycopg.sql import SQL, Identifier

from crm_common.eventstore import application_env, creating_tables
from crm_common.health import Heartbeat
from crm_common.lifecycle import retry_until_stopped, run_worker
from crm_common.privacy.client import KeyClient
from crm_common.privacy.mapper import declaration_of
from crm_common.privacy.tokens import PersonalDataCipher
from crm_common.privacy.wire import has_personal_fields, seal_message
from crm_common.settings import Settings, topic_of
from crm_common.telemetry import context_from_traceparent, kafka_headers_with_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_common.relay")

# (domain event, metadata stored with it, log position) -> (key, ce_type, payload)
ToWire = Callable[[Any, dict[str, Any], int], "tuple[str, str, bytes] | None"]

PROTOBUF_CONTENT_TYPE = "application/protobuf"

#: The largest message (key, value and headers) the relay sends: the producer's
#: request limit, under the broker's default `message.max.bytes` (1 MB + 12 B).
#: Commands refuse events anywhere near it (crm_common.commands.MAX_EVENT_BYTES).
MAX_MESSAGE_BYTES = 1_000_000

#: The broker refuses this message whatever the number of retries.
POISON_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidMessageError,
)

#: Errors of the databases (event store, key store) that pass: the relay waits
#: and tries again rather than setting the event aside.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    sqlite3.OperationalError,
)


@dataclass(frozen=True)
class WireMessage:
    key: str
    ce_type: str
    payload: bytes
    headers: list[tuple[str, bytes]]
    position: int
    event: str = ""  # originator id:version, what a dead letter names


def cloudevent_headers(
    *,
    ce_id: str,
    ce_type: str,
    source: str,
    subject: str,
    time_: datetime,
    proto_message: str,
    position: int,
) -> list[tuple[str, bytes]]:
    """CloudEvents 1.0 attributes in Kafka binary content mode."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", ce_id.encode()),
        ("ce_type", ce_type.encode()),
        ("ce_source", source.encode()),
        ("ce_subject", subject.encode()),
        ("ce_time", time_.astimezone(UTC).isoformat().replace("+00:00", "Z").encode()),
        ("content-type", f"{PROTOBUF_CONTENT_TYPE}; proto={proto_message}".encode()),
        ("crm_position", str(position).encode()),
    ]


#: The audit trail of each event (who, through which client, which command, which
#: request id), from the verified caller the command bus stored with it.
AUDIT_HEADERS = {
    "actor": "crm_actor",
    "client": "crm_client",
    "command": "crm_command",
    "request_id": "crm_request_id",
}


def audit_headers(meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    """`crm_actor`, `crm_client`, `crm_command`, `crm_request_id` for what the event has."""
    return [
        (header, str(meta[key])[:200].encode())
        for key, header in AUDIT_HEADERS.items()
        if meta.get(key)
    ]


@dataclass(frozen=True)
class DeadLetter:
    """An event the relay set aside, and what became of it."""

    position: int
    event: str  # originator id:version
    reason: str
    state: str  # open, redrive (asked for), skipped, redriven
    recorded_at: str
    resolved_at: str | None


class DeadLetters:
    """The relay's dead-letter table, in the same database as its position.

    Holds the coordinates of each event and why it was set aside, never the
    event itself: that stays in the event store, where a re-drive reads it.
    """

    TABLE = "relay_dead_letters"
    COLUMNS = "position, event, reason, state, recorded_at, resolved_at"

    def __init__(self, tracking: TrackingRecorder, topic: str) -> None:
        datastore: Any = getattr(tracking, "datastore", None)
        if datastore is None:
            raise TypeError(f"{type(tracking).__name__} has no datastore for dead letters")
        self.datastore = datastore
        self.topic = topic
        self.postgres = isinstance(datastore, PostgresDatastore)
        self._execute(
            "CREATE TABLE IF NOT EXISTS {table} (topic text NOT NULL, position bigint NOT NULL, "
            "event text NOT NULL, reason text NOT NULL, state text NOT NULL, "
            "recorded_at text NOT NULL, resolved_at text, PRIMARY KEY (topic, position))",
            (),
        )

    def _execute(self, statement: str, params: Sequence[Any]) -> list[Any]:
        if self.postgres:
            table = Identifier(self.datastore.schema, self.TABLE).as_string()
            sql = statement.replace("?", "%s").replace("{table}", table)
            with self.datastore.transaction(commit=True) as cursor:
                cursor.execute(SQL(sql), tuple(params))
                return list(cursor.fetchall()) if cursor.description else []
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(statement.replace("{table}", self.TABLE), tuple(params))
            rows: list[sqlite3.Row] = cursor.fetchall()
            return rows

    def _rows(self, where: str, params: Sequence[Any]) -> list[DeadLetter]:
        rows = self._execute(
            f"SELECT {self.COLUMNS} FROM {{table}} WHERE topic = ? {where} ORDER BY position",
            (self.topic, *params),
        )
        return [
            DeadLetter(
                position=int(r["position"]),
                event=r["event"],
                reason=r["reason"],
                state=r["state"],
                recorded_at=r["recorded_at"],
                resolved_at=r["resolved_at"],
            )
            for r in rows
        ]

    def record(self, position: int, event: str, reason: str) -> None:
        """Sets an event aside (again: a re-drive that failed opens it anew)."""
        self._execute(
            "INSERT INTO {table} (topic, position, event, reason, state, recorded_at) "
            "VALUES (?, ?, ?, ?, 'open', ?) ON CONFLICT (topic, position) DO UPDATE "
            "SET reason = excluded.reason, state = 'open', recorded_at = excluded.recorded_at, "
            "resolved_at = NULL",
            (self.topic, position, event, reason[:2000], _now()),
        )

    def all(self) -> list[DeadLetter]:
        return self._rows("", ())

    def open(self) -> list[DeadLetter]:
        """Set aside and not resolved: the relay reports failing while there are any."""
        return self._rows("AND state IN ('open', 'redrive')", ())

    def to_redrive(self) -> list[DeadLetter]:
        return self._rows("AND state = 'redrive'", ())

    def resolve(self, position: int, state: str) -> bool:
        """Marks a dead letter `redrive` (the relay publishes it at its next round),
        `skipped` (never published) or `redriven` (published)."""
        if state not in ("redrive", "skipped", "redriven"):
            raise ValueError(f"unknown state {state!r}")
        resolved = None if state == "redrive" else _now()
        changed = self._execute(
            "UPDATE {table} SET state = ?, resolved_at = ? "
            "WHERE topic = ? AND position = ? RETURNING position",
            (state, resolved, self.topic, position),
        )
        return bool(changed)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Relay:
    """Publishes one service's notification log to its Kafka topic."""

    def __init__(
        self,
        *,
        service: str,
        recorder: ApplicationRecorder,
        mapper: Mapper[Any],
        tracking: TrackingRecorder,
        to_wire: ToWire,
        bootstrap: str,
        proto_message: str,
        topic: str | None = None,
        batch_size: int = 500,
        poll_interval: float = 0.05,
        batch_interval: float = 0.02,
        heartbeat: Heartbeat | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        personal_data_keys: KeyClient | None = None,
    ) -> None:
        self.service = service
        self.recorder = recorder
        self.mapper = mapper
        self.tracking = tracking
        self.to_wire = to_wire
        self.bootstrap = bootstrap
        self.proto_message = proto_message
        self.topic = topic or topic_of(service)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        #: After a batch that was not full, the relay waits until this long after
        #: the batch began before it looks again: under a steady trickle of
        #: commands it then publishes a handful of events per produce request and
        #: tracking write instead of one, which costs the broker and the relay a
        #: fraction of the CPU for at most this much added lag.
        self.batch_interval = batch_interval
        self.tracking_name = f"{self.topic}:relay"
        self.published = 0
        self.position = 0
        self.heartbeat = heartbeat or Heartbeat(f"{self.topic} relay")
        self._last_publish: float | None = None
        self.max_message_bytes = max_message_bytes
        self.dead_letters = DeadLetters(tracking, self.topic)
        self.open_dead_letters = 0
        self._dead_letters_checked = 0.0
        self._redrive_due = False
        #: Positions past the recorded one that the broker already acknowledged
        #: (sent after a message that failed): this process does not send them again.
        self._acked_ahead: set[int] = set()
        #: Positions past the recorded one that the topic already holds, read from
        #: the broker on (re)connecting: what a relay killed between the broker's
        #: acknowledgement and its tracking write published is not sent again.
        self._on_broker_positions: dict[int, str] = {}
        #: Seals the personal fields of published payloads (None: no master keys,
        #: payloads go out as the service encodes them).
        self.personal_data = (
            None if personal_data_keys is None else PersonalDataCipher(personal_data_keys)
        )
        self._envelope: tuple[type[Message] | None] | None = None
        #: Events whose personal fields were sealed on the way out.
        self.sealed = 0

    def health_details(self) -> dict[str, Any]:
        """What `GET /healthz` reports besides the heartbeat."""
        return {
            "topic": self.topic,
            "position": self.position,
            "published": self.published,
            "sealed": self.sealed,
            "open_dead_letters": self.open_dead_letters,
            "seconds_since_publish": (
                None
                if self._last_publish is None
                else round(time.monotonic() - self._last_publish, 3)
            ),
        }

    def recorded_position(self) -> int:
        return self.tracking.max_tracking_id(self.tracking_name) or 0

    def _to_messages(
        self, notifications: list[Notification]
    ) -> tuple[list[WireMessage], list[tuple[Notification, str]]]:
        """The messages of the notifications, and those that cannot become one (why)."""
        messages = []
        poison: list[tuple[Notification, str]] = []
        for n in notifications:
            try:
                message = self._to_message(n)
            except STORE_UNAVAILABLE:
                raise  # the event store or the key store is away: retried, not set aside
            except Exception as error:  # a stored event the encoder fails on
                poison.append((n, f"cannot be encoded: {type(error).__name__}: {error}"[:500]))
                continue
            if message is None:
                continue
            size = (
                len(message.payload)
                + len(message.key.encode())
                + sum(len(k) + len(v) for k, v in message.headers)
            )
            if size > self.max_message_bytes:
                poison.append(
                    (
                        n,
                        f"too large: {size} bytes, the relay sends at most "
                        f"{self.max_message_bytes}",
                    )
                )
                continue
            messages.append(message)
        return messages, poison

    def _to_message(self, n: Notification) -> WireMessage | None:
        domain_event = self.mapper.to_domain_event(n)
        meta: dict[str, Any] = dict(getattr(domain_event, "_meta", None) or {})
        wire = self.to_wire(domain_event, meta, n.id)
        if wire is None:
            return None
        key, ce_type, payload = wire
        payload = self._sealed(domain_event, payload)
        when = getattr(domain_event, "timestamp", None) or datetime.now(UTC)
        headers = cloudevent_headers(
            ce_id=f"{n.originator_id}:{n.originator_version}",
            ce_type=ce_type,
            source=f"/crm/{self.service}",
            subject=key,
            time_=when,
            proto_message=self.proto_message,
            position=n.id,
        )
        headers += audit_headers(meta)
        parent = context_from_traceparent(meta.get("traceparent"))
        with tracer.start_as_current_span(
            f"publish {ce_type}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": self.topic,
                "crm.position": n.id,
            },
        ):
            headers = kafka_headers_with_context(headers)
        return WireMessage(
            key, ce_type, payload, headers, n.id, f"{n.originator_id}:{n.originator_version}"
        )

    def _envelope_class(self) -> type[Message] | None:
        """The generated class of `proto_message`, looked up once; None when the
        contract marks none of its fields personal."""
        if self._envelope is None:
            try:
                descriptor = descriptor_pool.Default().FindMessageTypeByName(self.proto_message)
            except KeyError:
                raise LookupError(
                    f"the relay publishes {self.proto_message}, which is no protobuf message "
                    "this process knows: its personal fields cannot be sealed"
                ) from None
            self._envelope = (
                message_factory.GetMessageClass(descriptor)
                if has_personal_fields(descriptor)
                else None,
            )
        return self._envelope[0]

    def _sealed(self, domain_event: Any, payload: bytes) -> bytes:
        """The payload with its personal fields sealed under the subject's data key,
        when the service has master keys and the event's class declares personal
        data; otherwise the payload as it is (not parsed)."""
        if self.personal_data is None:
            return payload
        state = vars(domain_event)
        declaration = declaration_of(type(domain_event), state)
        if declaration is None:
            return payload
        envelope = self._envelope_class()
        if envelope is None:
            return payload
        subject = declaration.subject_in(state)
        message = envelope.FromString(payload)
        if not seal_message(message, subject, self.personal_data):
            return payload
        self.sealed += 1
        return message.SerializeToString()

    async def _publish(
        self, producer: AIOKafkaProducer, messages: list[WireMessage]
    ) -> tuple[list[tuple[WireMessage, str]], tuple[WireMessage, BaseException] | None]:
        """Sends the messages; the broker's refusals of single messages (too large,
        invalid), and the first other failure with the message it hit, if any.

        Every message before that one was acknowledged or refused."""
        acks: list[asyncio.Future[Any] | BaseException] = []
        for m in messages:
            try:
                acks.append(
                    await producer.send(
                        self.topic, m.payload, key=m.key.encode(), headers=m.headers
                    )
                )
            except POISON_ERRORS as error:  # refused before sending
                acks.append(error)
            except KafkaError as error:  # nothing after this one is sent
                acks.append(error)
                break
        results = await asyncio.gather(
            *(a for a in acks if not isinstance(a, BaseException)), return_exceptions=True
        )
        outcomes = iter(results)
        refused: list[tuple[WireMessage, str]] = []
        failure: tuple[WireMessage, BaseException] | None = None
        for m, ack in zip(messages, acks, strict=False):
            outcome = ack if isinstance(ack, BaseException) else next(outcomes)
            if isinstance(outcome, POISON_ERRORS):
                refused.append((m, f"refused by the broker: {type(outcome).__name__}: {outcome}"))
            elif isinstance(outcome, BaseException):
                failure = failure or (m, outcome)
            elif failure is not None:
                # Taken by the broker after one that failed: the position cannot
                # move past it yet, but the retry need not send it again.
                self._acked_ahead.add(m.position)
        return refused, failure

    async def _set_aside(self, poison: list[tuple[int, str, str]]) -> None:
        """Records events that can never be published, and says so once each."""
        for position, event, reason in poison:
            await asyncio.to_thread(self.dead_letters.record, position, event, reason)
            self.heartbeat.dead_letter()
            log.error(
                "relay %s: event %s at position %d set aside as a dead letter (%s); the relay "
                "goes on and reports failing until it is resolved: python -m crm_common.relay "
                "%s dead-letters, then redrive or skip %d",
                self.topic,
                event,
                position,
                reason,
                self.service,
                position,
            )
        await self._check_dead_letters(force=True)

    async def _check_dead_letters(self, *, force: bool = False) -> None:
        """Re-drives what an operator asked for, and reports failing while any
        dead letter is open (looked at every few seconds: another process resolves them)."""
        now = time.monotonic()
        if not force and now - self._dead_letters_checked < 5.0:
            return
        self._dead_letters_checked = now
        opened = await asyncio.to_thread(self.dead_letters.open)
        self.open_dead_letters = len(opened)
        self._redrive_due = any(letter.state == "redrive" for letter in opened)
        if opened:
            self.heartbeat.failed(
                f"{len(opened)} event(s) set aside as dead letters, the first at position "
                f"{opened[0].position}: {opened[0].reason}",
                waiting_for="an operator to re-drive or skip its dead letters",
            )
        elif self.heartbeat.last_error is not None and "dead letter" in self.heartbeat.last_error:
            self.heartbeat.recovered()

    async def _redrive(self, producer: AIOKafkaProducer) -> None:
        self._redrive_due = False
        for letter in await asyncio.to_thread(self.dead_letters.to_redrive):
            notifications = await asyncio.to_thread(
                self.recorder.select_notifications, letter.position, 1
            )
            stored = [n for n in notifications if n.id == letter.position]
            messages, poison = await asyncio.to_thread(self._to_messages, stored)
            refused, failure = await self._publish(producer, messages)
            if failure is not None:
                raise failure[1]
            reasons = [r for _, r in poison] + [r for _, r in refused]
            if reasons:
                await asyncio.to_thread(
                    self.dead_letters.record, letter.position, letter.event, reasons[0]
                )
                log.error(
                    "relay %s: re-drive of position %d failed: %s",
                    self.topic,
                    letter.position,
                    reasons[0],
                )
            else:
                await asyncio.to_thread(self.dead_letters.resolve, letter.position, "redriven")
                log.info(
                    "relay %s: dead letter at position %d re-driven", self.topic, letter.position
                )
            self._dead_letters_checked = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        self.position = await asyncio.to_thread(self.recorded_position)
        log.info("relay %s starts after position %d", self.topic, self.position)
        await retry_until_stopped(
            lambda: self._connected(stop),
            stop,
            heartbeat=self.heartbeat,
            retry_on=(KafkaError, *STORE_UNAVAILABLE),
            what=f"relay {self.topic}",
            then="publishing again from the recorded position",
        )

    async def _connected(self, stop: asyncio.Event) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            max_batch_size=256 * 1024,
            request_timeout_ms=30000,
        )
        try:
            await producer.start()
            await self._read_broker_tail(producer)
            if self.heartbeat.last_error is not None:
                self.heartbeat.recovered()
            await self._follow(producer, stop)
        finally:
            await producer.stop()

    async def _read_broker_tail(self, producer: AIOKafkaProducer) -> None:
        """The positions past the recorded one that the topic already holds.

        The relay publishes in position order, so they sit at the end of each
        partition: reading back from the end until a record at or before the
        recorded position shows up finds every one of them, gaps included (a
        message that failed while later ones were taken is not among them, and
        is published again)."""
        partitions = sorted(await producer.partitions_for(self.topic))
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        held: dict[int, str] = {}
        await consumer.start()
        try:
            parts = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(parts)
            begins = await consumer.beginning_offsets(parts)
            ends = await consumer.end_offsets(parts)
            for tp in parts:
                window = 2 * self.batch_size
                while ends[tp] > begins[tp]:
                    start = max(begins[tp], ends[tp] - window)
                    positions = await self._positions_between(consumer, tp, start, ends[tp])
                    held.update((p, e) for p, e in positions.items() if p > self.position)
                    if start == begins[tp] or min(positions, default=0) <= self.position:
                        break
                    window *= 4
        finally:
            await consumer.stop()
        self._on_broker_positions = held
        if held:
            log.info(
                "relay %s: the broker holds %d events past the recorded position %d; "
                "they are not published again",
                self.topic,
                len(held),
                self.position,
            )

    @staticmethod
    async def _positions_between(
        consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
    ) -> dict[int, str]:
        """Position -> CloudEvents id of the records of `tp` from `start` to `end`."""
        consumer.seek(tp, start)
        positions: dict[int, str] = {}
        deadline = time.monotonic() + 30.0
        while True:
            batches = await consumer.getmany(tp, timeout_ms=500)
            last = start - 1
            for record in batches.get(tp, []):
                last = record.offset
                headers = dict(record.headers or ())
                position, ce_id = headers.get("crm_position"), headers.get("ce_id")
                if position is not None and ce_id is not None:
                    positions[int(position)] = ce_id.decode()
            if last >= end - 1 or await consumer.position(tp) >= end:
                return positions
            if time.monotonic() > deadline:
                raise KafkaError(f"could not read {tp} up to offset {end}")

    def _on_broker(self, message: WireMessage) -> bool:
        """The broker already holds this message (published before a crash): the same
        event at the same position. Another event at that position (a store restored
        from a backup, or wiped, behind a topic that kept its records) is published."""
        return self._on_broker_positions.get(message.position) == message.event

    async def _follow(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        await self._check_dead_letters(force=True)
        while not stop.is_set():
            self.heartbeat.beat()
            await self._check_dead_letters()
            if self._redrive_due:
                await self._redrive(producer)
            notifications = list(
                await asyncio.to_thread(
                    self.recorder.select_notifications,
                    self.position + 1,
                    self.batch_size,
                )
            )
            if not notifications:
                self.heartbeat.lag(0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval)
                continue
            started = time.perf_counter()
            # In a thread: loading may open, and publishing seal, personal data with
            # keys read from the key store, which must not hold up the event loop.
            messages, poison = await asyncio.to_thread(self._to_messages, notifications)
            messages = [
                m
                for m in messages
                if m.position not in self._acked_ahead and not self._on_broker(m)
            ]
            refused, failure = await self._publish(producer, messages) if messages else ([], None)
            set_aside = [(n.id, f"{n.originator_id}:{n.originator_version}", r) for n, r in poison]
            set_aside += [(m.position, m.event, r) for m, r in refused]
            if failure is not None:
                # Everything before the failed message is with the broker (or set
                # aside): record that much, so the retry starts after it.
                message, error = failure
                set_aside = [x for x in set_aside if x[0] < message.position]
                if set_aside:
                    await self._set_aside(set_aside)
                if message.position - 1 > self.position:
                    await asyncio.to_thread(
                        self.tracking.insert_tracking,
                        Tracking(self.tracking_name, message.position - 1),
                    )
                    self.position = message.position - 1
                raise error
            if set_aside:
                await self._set_aside(sorted(set_aside))
            last = notifications[-1].id
            await asyncio.to_thread(
                self.tracking.insert_tracking, Tracking(self.tracking_name, last)
            )
            self.position = last
            self._acked_ahead = {p for p in self._acked_ahead if p > last}
            self._on_broker_positions = {
                p: e for p, e in self._on_broker_positions.items() if p > last
            }
            full = len(notifications) >= self.batch_size
            head = await asyncio.to_thread(self.recorder.max_notification_id) if full else last
            self.heartbeat.lag((head or last) - last)  # events not yet published (metrics)
            self.published += len(messages) - len(refused)
            self._last_publish = time.monotonic()
            if len(notifications) < self.batch_size:
                rest = self.batch_interval - (time.perf_counter() - started)
                if rest > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), rest)
            log.debug(
                "relay %s published %d events up to %d in %.1f ms",
                self.topic,
                len(messages),
                last,
                (time.perf_counter() - started) * 1000,
            )


def build_relay(
    settings: Settings,
    *,
    to_wire: ToWire,
    app_factory: Callable[[Settings], Application[Any]],
    proto_message: str,
) -> tuple[Relay, Application[Any]]:
    app = app_factory(settings)
    env = application_env(settings, SINGLE_ROW_TRACKING="y")
    factory = InfrastructureFactory.construct(
        Environment(name=f"{settings.service}_relay", env=env)
    )
    with creating_tables(settings):
        tracking = factory.tracking_recorder()
    recorder = app.recorder
    assert isinstance(recorder, ApplicationRecorder)
    relay = Relay(
        service=settings.service,
        recorder=recorder,
        mapper=app.mapper,
        tracking=tracking,
        to_wire=to_wire,
        bootstrap=settings.kafka_bootstrap,
        proto_message=proto_message,
        personal_data_keys=getattr(app, "personal_data_keys", None),
    )
    return relay, app


async def run_relay(
    settings: Settings,
    *,
    to_wire: ToWire,
    app_factory: Callable[[Settings], Application[Any]],
    proto_message: str = "crm.events.v1.ContactEvent",
) -> None:
    """Runs the relay of a service until SIGTERM or SIGINT."""
    relay, app = build_relay(
        settings, to_wire=to_wire, app_factory=app_factory, proto_message=proto_message
    )
    try:
        await run_worker(settings, relay.heartbeat, relay.run, details=relay.health_details)
    finally:
        app.close()
        log.info("relay %s stopped at position %d", relay.topic, relay.position)


# -- the operator's command -------------------------------------------------------------


def dead_letters_of(settings: Settings) -> DeadLetters:
    """The dead-letter table of a service's relay, from the service's settings."""
    env = application_env(settings, SINGLE_ROW_TRACKING="y")
    factory = InfrastructureFactory.construct(
        Environment(name=f"{settings.service}_relay", env=env)
    )
    with creating_tables(settings):
        tracking = factory.tracking_recorder()
    return DeadLetters(tracking, topic_of(settings.service))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m crm_common.relay SERVICE dead-letters [redrive|skip POSITION]`, run with
    the service's environment (CRM_* variables: which event store, where)."""
    parser = argparse.ArgumentParser(
        prog="python -m crm_common.relay",
        description="List, re-drive or skip the events a service's relay set aside.",
    )
    parser.add_argument("service", help="the service whose relay it is (contacts, ...)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("dead-letters", help="list the dead letters (all, or open)")
    listing.add_argument("--open", action="store_true", help="only those not resolved")
    for name, text in (
        ("redrive", "publish the event again at the relay's next round"),
        ("skip", "never publish the event (it stays in the event store)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("position", type=int, help="the event's log position")
    args = parser.parse_args(argv)
    letters = dead_letters_of(Settings.from_env(args.service))
    if args.command == "dead-letters":
        rows = letters.open() if args.open else letters.all()
        for row in rows:
            print(
                f"{row.position}\t{row.state}\t{row.event}\t{row.recorded_at}\t"
                f"{row.resolved_at or '-'}\t{row.reason}"
            )
        if not rows:
            print(f"no {'open ' if args.open else ''}dead letters on {letters.topic}")
        return 0
    state = "redrive" if args.command == "redrive" else "skipped"
    if not letters.resolve(args.position, state):
        print(f"no dead letter at position {args.position} on {letters.topic}", file=sys.stderr)
        return 1
    print(f"{letters.topic} position {args.position}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
