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
  with the reason and retried every `retry_interval` seconds until it applies.
  A message that cannot be decoded is parked too (it can never apply; it stays
  for an operator to see).
- **Scheduled expiry.** Every `settle_interval` seconds the process releases
  ended return windows and expires lots past their expiry for every member;
  the aggregate does each once, so several replicas may run it at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from google.protobuf.message import DecodeError
from opentelemetry import trace

from crm.erp.v1 import orders_pb2 as erp_pb
from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.health import Heartbeat
from crm_common.lifecycle import retry_until_stopped
from crm_common.records import Record, consuming_span, where
from crm_common.settings import inbound_topic, topic_of
from crm_loyalty.application import LoyaltyService
from crm_loyalty.domain import OrderNotKnown
from crm_loyalty.inputs import OrderLineInput, PlacedOrder, ReturnedOrder
from crm_loyalty.messages import from_timestamp

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_loyalty.ingest")

CLIENT = "crm-loyalty-ingest"
ACTOR = "erp"
MAX_BACKOFF = 30.0


def erp_topic() -> str:
    """`<prefix>.erp.orders` after `CRM_TOPIC_PREFIX` (default `crm.erp.orders`)."""
    return inbound_topic("erp.orders")


def default_group_id() -> str:
    return topic_of("loyalty").removesuffix(".loyalty.events") + ".loyalty-ingest"


@dataclass
class IngestStats:
    records: int = 0
    applied: int = 0
    repeated: int = 0
    parked: int = 0
    unparked: int = 0
    retries: int = 0
    settled_released: int = 0
    settled_expired: int = 0


class _Retry(Exception):
    """The service itself failed: read the record again later."""


def message_key(message: erp_pb.OrderEvent) -> str:
    kind = message.WhichOneof("payload") or "unknown"
    if kind == "returned":
        return f"{message.order_id}:returned:{message.returned.return_id}"
    return f"{message.order_id}:{kind}"


class OrderIngest:
    def __init__(
        self,
        service: LoyaltyService,
        *,
        bootstrap: str,
        topic: str | None = None,
        group_id: str | None = None,
        retry_interval: float = 30.0,
        settle_interval: float = 60.0,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.service = service
        self.bootstrap = bootstrap
        self.topic = topic or erp_topic()
        self.group_id = group_id or default_group_id()
        self.retry_interval = retry_interval
        self.settle_interval = settle_interval
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.stats = IngestStats()
        self.heartbeat = heartbeat or Heartbeat(f"{self.group_id} ingest")
        self._backoff = 0.5

    def health_details(self) -> dict[str, Any]:
        return {"topic": self.topic, "group_id": self.group_id, **vars(self.stats)}

    # -- applying one message -------------------------------------------------------

    async def apply(self, message: erp_pb.OrderEvent) -> bool:
        """Runs the message's command; False when it had been applied before.
        Raises CustomerNotKnown / OrderNotKnown / NotFound when it cannot apply yet."""
        key = message_key(message)
        caller = Caller(actor=ACTOR, client=CLIENT, request_id=f"erp:{key}")
        at = from_timestamp(message.occurred_at)
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
            outcome = await self.service.place_order(caller, order)
        elif kind in ("returned", "cancelled"):
            returned = ReturnedOrder(
                order_id=message.order_id,
                customer_ref=message.customer_ref,
                return_id=message.returned.return_id if kind == "returned" else "cancelled",
                line_ids=list(message.returned.line_ids) if kind == "returned" else [],
                occurred_at=at,
            )
            outcome = await self.service.return_order(caller, returned)
        else:
            raise ValidationFailed.of("payload", "the message carries no order event")
        return outcome.applied and not outcome.written.outcome.replayed

    async def _park(self, key: str, customer: str, kind: str, payload: bytes, reason: str) -> None:
        caller = Caller(actor=ACTOR, client=CLIENT, request_id=f"erp-park:{key}")
        if await self.service.park(caller, key, customer, kind, payload, reason):
            self.stats.parked += 1
            log.warning("ingest: parked %s (%s)", key, reason)

    async def _record(self, record: Record) -> None:
        payload = record.value or b""
        try:
            message = erp_pb.OrderEvent.FromString(payload)
        except DecodeError as error:
            key = f"undecodable:{record.topic}:{record.partition}:{record.offset}"
            await self._park(key, "", "undecodable", payload, f"not an OrderEvent: {error}")
            return
        key = message_key(message)
        with consuming_span(record, f"ingest {message.WhichOneof('payload')}", tracer):
            try:
                if await self.apply(message):
                    self.stats.applied += 1
                else:
                    self.stats.repeated += 1
            except (NotFound, OrderNotKnown) as error:
                kind = message.WhichOneof("payload") or "unknown"
                await self._park(key, message.customer_ref, kind, payload, error.message)
            except (ValidationFailed, RuleViolated) as error:
                # Can never apply as sent: parked with the reason, for an operator.
                await self._park(key, message.customer_ref, "refused", payload, error.message)
            except Exception as error:
                log.error("ingest: %s failed (%r); retrying", where(record), error)
                self.heartbeat.failed(f"{key} at {where(record)}: {error!r}")
                raise _Retry from error

    # -- parked messages and the schedule ---------------------------------------------

    async def retry_parked(self) -> int:
        """Applies what can be applied now, in the order it was parked."""
        done = 0
        for entry in await self.service.parked():
            if entry.kind in ("undecodable", "refused"):
                continue
            message = erp_pb.OrderEvent.FromString(base64.b64decode(entry.payload))
            try:
                await self.apply(message)
            except (NotFound, OrderNotKnown):
                continue
            caller = Caller(actor=ACTOR, client=CLIENT, request_id=f"erp-unpark:{entry.key}")
            await self.service.unpark(caller, entry.key)
            self.stats.unparked += 1
            done += 1
            log.info("ingest: applied parked %s", entry.key)
        return done

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
        schedule = asyncio.create_task(self._schedule(stop))
        try:
            await retry_until_stopped(
                lambda: self._consume(stop),
                stop,
                heartbeat=self.heartbeat,
                retry_on=(KafkaError,),
                what=f"ingest {self.group_id}",
                then="starting again from the committed offsets",
                max_backoff=MAX_BACKOFF,
            )
        finally:
            stop.set()
            await schedule

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            client_id=CLIENT,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        log.info("ingest %s consumes %s", self.group_id, self.topic)
        if self.heartbeat.last_error is not None:
            self.heartbeat.recovered()
        try:
            while not stop.is_set():
                self.heartbeat.beat()
                fetched = await consumer.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
                batch = {tp: records for tp, records in fetched.items() if records}
                if not batch:
                    continue
                results = await asyncio.gather(
                    *(self._partition(tp, records) for tp, records in batch.items())
                )
                await self._commit(consumer, {tp: d for tp, d, _ in results if d is not None})
                retry = [(tp, offset) for tp, _, offset in results if offset is not None]
                if retry:
                    assigned = consumer.assignment()
                    for tp, offset in retry:
                        if tp in assigned:
                            consumer.seek(tp, offset)
                    self.stats.retries += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF)
                else:
                    self._backoff = 0.5
        finally:
            await consumer.stop()

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        assigned = consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            log.warning("ingest %s could not commit %s: %r", self.group_id, offsets, error)

    async def _partition(
        self, tp: TopicPartition, records: Sequence[Record]
    ) -> tuple[TopicPartition, int | None, int | None]:
        done: int | None = None
        for record in records:
            try:
                await self._record(record)
            except _Retry:
                return tp, done, record.offset
            self.stats.records += 1
            done = record.offset + 1
        return tp, done, None
