"""Contacts follow the pipeline: a won deal makes its contacts customers.

`OpportunityFollower` consumes `crm.pipeline.events` as a member of a Kafka
consumer group. For each `OpportunityWon` it runs one `BecomeCustomer`
command per contact of the deal (the person, the company, and the customer
id the deal was opened for, each once) through the contacts command bus.

- **Idempotent.** Each command carries a request id derived from the event
  (`opportunity-won:<aggregate id>:<version>:<contact id>`), so a redelivered
  event is answered from the command's receipt and writes nothing new.
- **At least once.** A partition's offset is committed only after every
  command of the records before it succeeded. A crash, a kill or a
  rebalance hands the uncommitted records to the next member, which
  replays them harmlessly.
- **Never stuck on a bad record.** A record that cannot be decoded, or
  names a contact this service does not know, is logged with its
  coordinates and passed over. A failure of the service itself (the event
  store unreachable) is retried from the same record with a growing pause.
- **Never refused by the funnel.** A customer or advocate stays as it is (no
  event); every other stage, churned and lost included, moves to customer.

Partitions are processed concurrently, each in order; the commands of
concurrent partitions share the command bus's group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from google.protobuf.message import DecodeError
from opentelemetry import trace

from crm.events.v1 import pipeline_pb2 as events_pb
from crm_common.commands import Caller
from crm_common.errors import CrmError, NotFound, RuleViolated, ValidationFailed
from crm_common.health import Heartbeat
from crm_common.lifecycle import retry_until_stopped
from crm_common.records import Record, consuming_span, header, where
from crm_common.settings import topic_of
from crm_contacts.application import ContactsService

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_contacts.follower")

WON_TYPE = "crm.pipeline.v1.OpportunityWon"
CLIENT = "crm-contacts-follower"
MAX_BACKOFF = 30.0
# Errors that say the record itself can never succeed: logged and passed over.
PERMANENT: tuple[type[CrmError], ...] = (NotFound, ValidationFailed, RuleViolated)


def default_group_id() -> str:
    """`<prefix>.contacts-follower`, after the topic prefix (`CRM_TOPIC_PREFIX`)."""
    prefix = topic_of("pipeline").removesuffix(".pipeline.events")
    return f"{prefix}.contacts-follower"


@dataclass(frozen=True)
class Promotion:
    """One contact to make a customer, and the request id that makes it idempotent."""

    contact_id: str
    request_id: str
    actor: str


def promotions_of(record: Record) -> list[Promotion]:
    """What a pipeline event asks of contacts: nothing, unless a deal was won.

    Raises `DecodeError` for a value that is not a `PipelineEvent`.
    """
    ce_type = header(record, "ce_type")
    if ce_type is not None and ce_type != WON_TYPE:
        return []
    message = events_pb.PipelineEvent.FromString(record.value or b"")
    if message.WhichOneof("payload") != "opportunity_won":
        return []
    won = message.opportunity_won
    event_id = f"{message.aggregate_id}:{message.version}"
    contacts = dict.fromkeys(i for i in (won.person_id, won.company_id, message.customer_id) if i)
    return [
        Promotion(
            contact_id=contact_id,
            request_id=f"opportunity-won:{event_id}:{contact_id}",
            actor=message.actor or "pipeline",
        )
        for contact_id in contacts
    ]


@dataclass
class FollowerStats:
    records: int = 0
    promoted: int = 0
    unchanged: int = 0
    replayed: int = 0
    skipped: int = 0
    retries: int = 0
    commits: dict[TopicPartition, int] = field(default_factory=dict)


class _Retry(Exception):
    """A record failed for a reason that may pass: read it again later."""


class OpportunityFollower:
    """Feeds won deals from the pipeline topic to the contacts command bus."""

    def __init__(
        self,
        service: ContactsService,
        *,
        bootstrap: str,
        topic: str | None = None,
        group_id: str | None = None,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        retry_backoff: float = 0.5,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.service = service
        self.bootstrap = bootstrap
        self.topic = topic or topic_of("pipeline")
        self.group_id = group_id or default_group_id()
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.retry_backoff = retry_backoff
        self.stats = FollowerStats()
        self._backoff = retry_backoff
        self.heartbeat = heartbeat or Heartbeat(f"{self.group_id} follower")

    def health_details(self) -> dict[str, Any]:
        """What `GET /healthz` reports besides the heartbeat."""
        stats = self.stats
        return {
            "topic": self.topic,
            "group_id": self.group_id,
            "records": stats.records,
            "promoted": stats.promoted,
            "unchanged": stats.unchanged,
            "replayed": stats.replayed,
            "skipped": stats.skipped,
            "retries": stats.retries,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Follows the topic until `stop` is set; starts over after Kafka errors."""
        await retry_until_stopped(
            lambda: self._consume(stop),
            stop,
            heartbeat=self.heartbeat,
            retry_on=(KafkaError,),
            what=f"follower {self.group_id}",
            then="starting again from the committed offsets",
            first_backoff=self.retry_backoff,
            max_backoff=MAX_BACKOFF,
        )

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            client_id=CLIENT,
            enable_auto_commit=False,
            # A new group starts at the beginning: deals won before the
            # follower first ran still make their contacts customers.
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = self._new_consumer()
        await consumer.start()
        log.info("follower %s follows %s", self.group_id, self.topic)
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
                offsets = {tp: done for tp, done, _ in results if done is not None}
                await self._commit(consumer, offsets)
                retry = [(tp, offset) for tp, _, offset in results if offset is not None]
                if retry:
                    # Read the failed records again after a pause; what the other
                    # partitions handled in this batch is committed already.
                    assigned = consumer.assignment()
                    for tp, offset in retry:
                        if tp in assigned:
                            consumer.seek(tp, offset)
                    self.stats.retries += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF)
                else:
                    self._backoff = self.retry_backoff
        finally:
            await consumer.stop()

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        assigned = consumer.assignment()
        offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            # The group rebalanced: the partitions' new owner reads these
            # records again, and their request ids make that harmless.
            log.warning("follower %s could not commit %s: %r", self.group_id, offsets, error)
            return
        self.stats.commits.update(offsets)

    async def _partition(
        self, tp: TopicPartition, records: Sequence[Record]
    ) -> tuple[TopicPartition, int | None, int | None]:
        """Handles one partition's records in order.

        Returns the offset to commit (after the last record handled, None when
        none was) and the offset to read again (the record that failed, None
        when all were handled).
        """
        done: int | None = None
        for record in records:
            try:
                await self._record(record)
            except _Retry:
                return tp, done, record.offset
            self.stats.records += 1
            done = record.offset + 1
        return tp, done, None

    async def _record(self, record: Record) -> None:
        at = where(record)
        try:
            wanted = promotions_of(record)
        except DecodeError as error:
            log.error("follower: %s is not a PipelineEvent (%s); passed over", at, error)
            self.stats.skipped += 1
            return
        if not wanted:
            return
        with consuming_span(record, "follow OpportunityWon", tracer):
            for promotion in wanted:
                await self._promote(promotion, at)

    async def _promote(self, promotion: Promotion, at: str) -> None:
        caller = Caller(actor=promotion.actor, client=CLIENT, request_id=promotion.request_id)
        try:
            written = await self.service.become_customer(caller, promotion.contact_id)
        except PERMANENT as error:
            log.warning(
                "follower: %s: contact %s not made a customer: %s; passed over",
                at,
                promotion.contact_id,
                error.message,
            )
            self.stats.skipped += 1
            return
        except Exception as error:
            log.error(
                "follower: %s: contact %s failed (%r); retrying in %.1f s",
                at,
                promotion.contact_id,
                error,
                self._backoff,
            )
            self.heartbeat.failed(f"contact {promotion.contact_id} at {at}: {error!r}")
            raise _Retry from error
        if self.heartbeat.last_error is not None:
            self.heartbeat.recovered()
        outcome = written.outcome
        if outcome.replayed:
            self.stats.replayed += 1
        elif outcome.extra.get("promoted") == "true":
            self.stats.promoted += 1
            log.info("contact %s is a customer now (a deal was won, %s)", promotion.contact_id, at)
        else:
            self.stats.unchanged += 1
