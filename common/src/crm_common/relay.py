"""The relay: the event store's notification log is the outbox.

A relay follows its service's notification log from the position it last
recorded, publishes each public event to the service's Kafka topic with an
idempotent producer (`acks=all`), and records the new position only after
the broker has acknowledged every message of the batch. Killed at any
moment, it restarts from the recorded position: nothing is lost, and a
suffix may be published again (consumers drop what they already applied).
There is no dual write: command handlers never publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from eventsourcing.application import Application
from eventsourcing.persistence import (
    ApplicationRecorder,
    InfrastructureFactory,
    Mapper,
    Notification,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.utils import Environment
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from crm_common.eventstore import application_env, creating_tables
from crm_common.health import Heartbeat
from crm_common.lifecycle import retry_until_stopped, run_worker
from crm_common.settings import Settings, topic_of
from crm_common.telemetry import context_from_traceparent, kafka_headers_with_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_common.relay")

# (domain event, metadata stored with it, log position) -> (key, ce_type, payload)
ToWire = Callable[[Any, dict[str, Any], int], "tuple[str, str, bytes] | None"]

PROTOBUF_CONTENT_TYPE = "application/protobuf"


@dataclass(frozen=True)
class WireMessage:
    key: str
    ce_type: str
    payload: bytes
    headers: list[tuple[str, bytes]]
    position: int


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

    def health_details(self) -> dict[str, Any]:
        """What `GET /healthz` reports besides the heartbeat."""
        return {
            "topic": self.topic,
            "position": self.position,
            "published": self.published,
            "seconds_since_publish": (
                None
                if self._last_publish is None
                else round(time.monotonic() - self._last_publish, 3)
            ),
        }

    def recorded_position(self) -> int:
        return self.tracking.max_tracking_id(self.tracking_name) or 0

    def _to_messages(self, notifications: list[Notification]) -> list[WireMessage]:
        messages = []
        for n in notifications:
            domain_event = self.mapper.to_domain_event(n)
            meta: dict[str, Any] = dict(getattr(domain_event, "_meta", None) or {})
            wire = self.to_wire(domain_event, meta, n.id)
            if wire is None:
                continue
            key, ce_type, payload = wire
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
            messages.append(WireMessage(key, ce_type, payload, headers, n.id))
        return messages

    async def _publish(self, producer: AIOKafkaProducer, messages: list[WireMessage]) -> None:
        acks = []
        for m in messages:
            acks.append(
                await producer.send(self.topic, m.payload, key=m.key.encode(), headers=m.headers)
            )
        # The position may only move once the broker has every message.
        await asyncio.gather(*acks)

    async def run(self, stop: asyncio.Event) -> None:
        self.position = await asyncio.to_thread(self.recorded_position)
        log.info("relay %s starts after position %d", self.topic, self.position)
        await retry_until_stopped(
            lambda: self._connected(stop),
            stop,
            heartbeat=self.heartbeat,
            retry_on=(KafkaError,),
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
            if self.heartbeat.last_error is not None:
                self.heartbeat.recovered()
            await self._follow(producer, stop)
        finally:
            await producer.stop()

    async def _follow(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.heartbeat.beat()
            notifications = list(
                await asyncio.to_thread(
                    self.recorder.select_notifications,
                    self.position + 1,
                    self.batch_size,
                )
            )
            if not notifications:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval)
                continue
            started = time.perf_counter()
            messages = self._to_messages(notifications)
            if messages:
                await self._publish(producer, messages)
            last = notifications[-1].id
            await asyncio.to_thread(
                self.tracking.insert_tracking, Tracking(self.tracking_name, last)
            )
            self.position = last
            self.published += len(messages)
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
