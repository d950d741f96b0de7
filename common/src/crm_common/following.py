"""A member of a Kafka consumer group that turns records into commands.

Used by every service that reacts to a topic with commands of its own (the
contacts follower of won deals, loyalty's ERP order ingest). Unlike a
projector it needs no fencing: its commands carry request ids derived from
the records, so a record handled twice (a rebalance, a restart, a relay that
published a suffix again) is answered from the command's receipt.

- A partition's offset is committed only after every record before it was
  handled; a subclass raises `RetryLater` for a failure that may pass (the
  service itself), and that record is read again after a growing pause while
  the other partitions go on.
- A record that can never succeed is the subclass's to log or park; it returns
  normally so the partition moves on. Anything else it raises is logged at
  ERROR and counted as a dead letter, and the partition moves on too: one
  record never stops the member nor blocks its partition for good.
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

from crm_common.health import Heartbeat
from crm_common.lifecycle import retry_until_stopped
from crm_common.records import Record

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


class RetryLater(Exception):
    """A record failed for a reason that may pass: read it again later."""


@dataclass
class GroupProgress:
    """What every group member counts; subclasses add their own counters."""

    records: int = 0
    retries: int = 0
    commits: dict[TopicPartition, int] = field(default_factory=dict)


class GroupMember:
    """Consumes `topic` as a member of `group_id`; `handle` is the subclass's."""

    def __init__(
        self,
        *,
        topic: str,
        bootstrap: str,
        group_id: str,
        client_id: str,
        stats: GroupProgress,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        retry_backoff: float = 0.5,
        heartbeat: Heartbeat | None = None,
        what: str = "consumer",
    ) -> None:
        #: What the logs call it ("follower", "ingest").
        self.what = what
        self.topic = topic
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.client_id = client_id
        self.stats = stats
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.retry_backoff = retry_backoff
        self._backoff = retry_backoff
        self.heartbeat = heartbeat or Heartbeat(f"{group_id} {what}")

    async def handle(self, record: Record) -> None:
        """Runs the commands one record asks for; raises `RetryLater` to read it again."""
        raise NotImplementedError

    def health_details(self) -> dict[str, Any]:
        """What `GET /healthz` reports besides the heartbeat."""
        counters = {k: v for k, v in vars(self.stats).items() if k != "commits"}
        return {"topic": self.topic, "group_id": self.group_id, **counters}

    async def consume(self, stop: asyncio.Event) -> None:
        """Consumes until `stop` is set; starts over from the committed offsets after
        Kafka errors."""
        await retry_until_stopped(
            lambda: self._consume(stop),
            stop,
            heartbeat=self.heartbeat,
            retry_on=(KafkaError,),
            what=f"{self.what} {self.group_id}",
            then="starting again from the committed offsets",
            first_backoff=self.retry_backoff,
            max_backoff=MAX_BACKOFF,
        )

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            client_id=self.client_id,
            enable_auto_commit=False,
            # A new group starts at the beginning: nothing published before the
            # member first ran is left out.
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = self._new_consumer()
        await consumer.start()
        log.info("%s %s follows %s", self.what, self.group_id, self.topic)
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
            log.warning("%s could not commit %s: %r", self.group_id, offsets, error)
            return
        self.stats.commits.update(offsets)

    async def _partition(
        self, tp: TopicPartition, records: Sequence[Record]
    ) -> tuple[TopicPartition, int | None, int | None]:
        """Handles one partition's records in order: the offset to commit (after the
        last record handled, None when none was) and the offset to read again (the
        record that failed, None when all were handled)."""
        done: int | None = None
        for record in records:
            try:
                await self.handle(record)
            except RetryLater:
                return tp, done, record.offset
            except Exception as error:
                # A record the subclass did not expect to fail on: it would fail
                # again on every read, so the partition passes over it, and says so.
                log.error(
                    "%s: %s:%d@%d cannot be handled (%r); passed over as a dead letter",
                    self.group_id,
                    record.topic,
                    record.partition,
                    record.offset,
                    error,
                )
                self.heartbeat.dead_letter()
            self.stats.records += 1
            done = record.offset + 1
        return tp, done, None
