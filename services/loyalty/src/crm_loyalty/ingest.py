"""ERP orders into points, exactly once: `crm-loyalty ingest`.

`OrderIngest` consumes the inbound topic `<prefix>.erp.orders` (`ERP_TOPIC`)
as a member of a Kafka consumer group, like the contacts follower:

- **Exactly once in effect.** Each message runs one command whose request id
  derives from the order (`erp:<order>:placed`, `erp:<order>:returned:<return>`,
  `erp:<order>:cancelled`), and the member aggregate applies an order's
  placement and each of its returns once whatever the receipts' retention: a
  redelivered order changes nothing.
- **At least once.** A partition's offset is committed after its records were
  applied or parked; a killed consumer's successor reads the rest again.
- **Never dropped.** An order for a customer the platform does not know yet,
  or a return that arrived before its order, is parked in the event store
  with the reason and retried every `retry_interval` seconds. One still not
  applied after `park_limit` seconds, or one that can never apply as sent
  (refused by validation or a rule, undecodable), is dead-lettered: published
  to `<prefix>.erp.orders.dead-letter` (the original bytes, keyed by the
  customer reference, with the reason in the `crm_dead_letter_reason` header)
  and marked in the store, where an operator lists it and can re-drive it.
  Publication comes first, then the mark: a crash in between publishes it
  again on the next pass (at least once).
- **Scheduled expiry.** Every `settle_interval` seconds the process releases
  ended return windows and expires lots past their expiry for every member;
  the aggregate does each once, so several replicas may run it at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from aiokafka import AIOKafkaProducer
from google.protobuf.message import DecodeError
from opentelemetry import trace

from crm.erp.v1 import orders_pb2 as erp_pb
from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.following import GroupMember, GroupProgress, RetryLater
from crm_common.health import Heartbeat
from crm_common.records import Record, consuming_span, where
from crm_common.settings import inbound_topic, topic_of
from crm_loyalty.application import LoyaltyService
from crm_loyalty.domain import OrderNotKnown
from crm_loyalty.domain.parking import PARKED
from crm_loyalty.inputs import ErpSource, OrderLineInput, PlacedOrder, ReturnedOrder
from crm_loyalty.messages import from_timestamp
from crm_loyalty.views import ParkedView

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_loyalty.ingest")

CLIENT = "crm-loyalty-ingest"
ACTOR = "erp"


def erp_topic() -> str:
    """`<prefix>.erp.orders` after `CRM_TOPIC_PREFIX` (default `crm.erp.orders`)."""
    return inbound_topic("erp.orders")


def dead_letter_topic() -> str:
    """`<prefix>.erp.orders.dead-letter`."""
    return inbound_topic("erp.orders.dead-letter")


class DeadLetters(Protocol):
    async def publish(self, key: str, payload: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Publishes one dead letter, acknowledged by the brokers when it returns."""


class KafkaDeadLetters:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, client_id=CLIENT
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, key: str, payload: bytes, headers: list[tuple[str, bytes]]) -> None:
        await self._producer.send_and_wait(self.topic, payload, key=key.encode(), headers=headers)


def default_group_id() -> str:
    return topic_of("loyalty").removesuffix(".loyalty.events") + ".loyalty-ingest"


@dataclass
class IngestStats(GroupProgress):
    applied: int = 0
    repeated: int = 0
    parked: int = 0
    unparked: int = 0
    dead_lettered: int = 0
    settled_released: int = 0
    settled_expired: int = 0


def message_key(message: erp_pb.OrderEvent) -> str:
    kind = message.WhichOneof("payload") or "unknown"
    if kind == "returned":
        return f"{message.order_id}:returned:{message.returned.return_id}"
    return f"{message.order_id}:{kind}"


def cloudevent_headers(entry: ParkedView) -> dict[str, bytes]:
    """The CloudEvents attributes of a parked record stored without its headers."""
    kind = {"placed": "OrderPlaced", "returned": "OrderReturned", "cancelled": "OrderCancelled"}
    return {
        "ce_specversion": b"1.0",
        "ce_id": f"parked:{entry.key}".encode(),
        "ce_type": f"crm.erp.v1.{kind.get(entry.kind, 'OrderEvent')}".encode(),
        "ce_source": b"/crm/loyalty/parked",
        "content-type": b"application/protobuf; proto=crm.erp.v1.OrderEvent",
    }


class OrderIngest(GroupMember):
    def __init__(
        self,
        service: LoyaltyService,
        *,
        bootstrap: str,
        topic: str | None = None,
        group_id: str | None = None,
        retry_interval: float = 30.0,
        settle_interval: float = 60.0,
        park_limit: float = 7 * 86400.0,
        dead_letters: DeadLetters | None = None,
        dead_letter_topic_name: str | None = None,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.service = service
        self.retry_interval = retry_interval
        self.settle_interval = settle_interval
        self.park_limit = timedelta(seconds=park_limit)
        self.dead_letter_topic = dead_letter_topic_name or dead_letter_topic()
        self.dead_letters = dead_letters
        stats = IngestStats()
        group = group_id or default_group_id()
        super().__init__(
            topic=topic or erp_topic(),
            bootstrap=bootstrap,
            group_id=group,
            client_id=CLIENT,
            stats=stats,
            max_records=max_records,
            poll_timeout_ms=poll_timeout_ms,
            heartbeat=heartbeat,
            what="ingest",
        )
        self.stats: IngestStats = stats

    # -- applying one message -------------------------------------------------------

    async def apply(self, message: erp_pb.OrderEvent, source: ErpSource | None = None) -> bool:
        """Runs the message's command; False when it had been applied before.
        Raises CustomerNotKnown / OrderNotKnown / NotFound when it cannot apply yet.
        The events it writes carry `source`, the inbound record's position."""
        key = message_key(message)
        caller = Caller(actor=ACTOR, client=CLIENT, request_id=f"erp:{key}")
        at = from_timestamp(message.occurred_at, "occurred_at")
        kind = message.WhichOneof("payload")
        if kind == "placed":
            placed = message.placed
            order = PlacedOrder(
                order_id=message.order_id,
                customer_ref=message.customer_ref,
                currency=placed.currency,
                lines=[
                    OrderLineInput(x.line_id, x.amount, x.category, x.sku, x.quantity)
                    for x in placed.lines
                ],
                occurred_at=at,
            )
            outcome = await self.service.place_order(caller, order, source)
        elif kind in ("returned", "cancelled"):
            returned = ReturnedOrder(
                order_id=message.order_id,
                customer_ref=message.customer_ref,
                return_id=message.returned.return_id if kind == "returned" else "cancelled",
                line_ids=list(message.returned.line_ids) if kind == "returned" else [],
                occurred_at=at,
            )
            outcome = await self.service.return_order(caller, returned, source)
        else:
            raise ValidationFailed.of("payload", "the message carries no order event")
        return outcome.applied and not outcome.written.outcome.replayed

    async def _park(
        self,
        key: str,
        customer: str,
        kind: str,
        payload: bytes,
        reason: str,
        source: ErpSource | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        caller = Caller(actor=ACTOR, client=CLIENT, request_id=f"erp-park:{key}")
        if await self.service.park(caller, key, customer, kind, payload, reason, source, headers):
            self.stats.parked += 1
            log.warning("ingest: parked %s (%s)", key, reason)

    async def handle(self, record: Record) -> None:
        payload = record.value or b""
        headers = [(k, bytes(v)) for k, v in record.headers or () if v is not None]
        try:
            message = erp_pb.OrderEvent.FromString(payload)
        except DecodeError as error:
            key = f"undecodable:{record.topic}:{record.partition}:{record.offset}"
            await self._park(
                key, "", "undecodable", payload, f"not an OrderEvent: {error}", None, headers
            )
            return
        key = message_key(message)
        source = ErpSource(record.partition, record.offset + 1)
        with consuming_span(record, f"ingest {message.WhichOneof('payload')}", tracer):
            try:
                if await self.apply(message, source):
                    self.stats.applied += 1
                else:
                    self.stats.repeated += 1
            except (NotFound, OrderNotKnown) as error:
                kind = message.WhichOneof("payload") or "unknown"
                await self._park(
                    key, message.customer_ref, kind, payload, error.message, source, headers
                )
            except (ValidationFailed, RuleViolated) as error:
                # Can never apply as sent: parked with the reason, for an operator.
                await self._park(
                    key, message.customer_ref, "refused", payload, error.message, source, headers
                )
            except Exception as error:
                log.error("ingest: %s failed (%r); retrying", where(record), error)
                self.heartbeat.failed(f"{key} at {where(record)}: {error!r}")
                raise RetryLater from error

    # -- parked messages and the schedule ---------------------------------------------

    async def retry_parked(self) -> int:
        """Applies what can be applied now, in the order it was parked; dead-letters
        what never will or stayed parked beyond the limit. Returns how many applied."""
        done = 0
        for entry in await self.service.parked():
            if entry.state != PARKED:
                continue
            reason: str | None = None
            if entry.kind == "undecodable":
                reason = entry.reason
            else:
                message = erp_pb.OrderEvent.FromString(base64.b64decode(entry.payload))
                try:
                    await self.apply(message, entry.source)
                except (NotFound, OrderNotKnown) as error:
                    at = entry.parked_at
                    if at is not None and self.service.clock() - at >= self.park_limit:
                        reason = f"not applied within the parking limit: {error.message}"
                    else:
                        continue
                except (ValidationFailed, RuleViolated) as error:
                    reason = f"refused: {error.message}"
            if reason is not None:
                await self._dead_letter(entry, reason)
                continue
            caller = Caller(actor=ACTOR, client=CLIENT, request_id=f"erp-unpark:{entry.key}")
            await self.service.unpark(caller, entry.key)
            self.stats.unparked += 1
            done += 1
            log.info("ingest: applied parked %s", entry.key)
        return done

    async def _dead_letter(self, entry: ParkedView, reason: str) -> None:
        if self.dead_letters is None:
            raise RuntimeError("the ingest has no dead-letter publisher")
        # The record's own headers (its CloudEvents attributes), then why it is here.
        headers = [(k, v) for k, v in entry.headers if not k.startswith("crm_")]
        have = {k for k, _ in headers}
        for name, value in cloudevent_headers(entry).items():
            if name not in have:
                headers.append((name, value))
        headers += [
            ("crm_dead_letter_reason", reason.encode()),
            ("crm_parked_key", entry.key.encode()),
            ("crm_parked_kind", entry.kind.encode()),
        ]
        if entry.parked_at is not None:
            headers.append(("crm_parked_at", entry.parked_at.isoformat().encode()))
        if entry.source is not None:
            where = f"{entry.source.partition}@{entry.source.position - 1}"
            headers.append(("crm_source_record", where.encode()))
        await self.dead_letters.publish(
            entry.customer_ref, base64.b64decode(entry.payload), headers
        )
        caller = Caller(actor=ACTOR, client=CLIENT)
        if await self.service.dead_letter(caller, entry.key, reason, self.dead_letter_topic):
            self.stats.dead_lettered += 1
            log.warning("ingest: dead-lettered %s (%s)", entry.key, reason)

    async def settle(self) -> None:
        caller = Caller(actor="loyalty-schedule", client=CLIENT)
        released, expired = await self.service.settle_all(caller)
        self.stats.settled_released += released
        self.stats.settled_expired += expired

    async def _schedule(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_retry = next_settle = loop.time()
        while not stop.is_set():
            now = loop.time()
            try:
                if now >= next_retry:
                    await self.retry_parked()
                    next_retry = now + self.retry_interval
                if now >= next_settle:
                    await self.settle()
                    next_settle = now + self.settle_interval
            except Exception:
                log.exception("ingest: scheduled work failed; trying again later")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(self.retry_interval, 1.0))

    # -- the consumer -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        producer: KafkaDeadLetters | None = None
        if self.dead_letters is None:
            producer = KafkaDeadLetters(self.bootstrap, self.dead_letter_topic)
            await producer.start()
            self.dead_letters = producer
        schedule = asyncio.create_task(self._schedule(stop))
        try:
            await self.consume(stop)
        finally:
            stop.set()
            await schedule
            if producer is not None:
                await producer.stop()
