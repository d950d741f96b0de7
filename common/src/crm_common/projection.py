"""Projections: read models in MongoDB fed by Kafka topics.

A `ProjectionConsumer` reads every partition of its topics and hands each
batch of records to a read model, whose `apply_batch(session, records)` runs
inside one MongoDB transaction together with the upsert of the consumed
offsets (collection `projection_offsets`, one document per projection,
topic and partition). The read-model change and the position move together
or not at all: a crash, a kill or a lost connection replays at most the
batch that was not committed, never skips one, and never applies one twice.

Kafka's consumer-group offsets are not used at all. The consumer assigns
itself all partitions of its topics (no group, no rebalancing), so there is
exactly one projector per read model for now: a second one started by
mistake is refused at its first commit, because every commit checks that the
stored offsets are still the ones this projector last wrote. A projector that
starts aborts the transaction its predecessor may have left open when it was
killed (`projection_owners` records each projector's session), instead of
waiting a minute for the server to reap it. Partitions added
to a topic later are picked up on restart. Scaling out later means splitting
the partitions between projectors (each only ever writes its own offset
documents), which this layout already allows.

Records reach the read model with their headers, so it can continue the
publisher's trace (`projection_span`) and record what it cannot apply
(`park_dead_letters`) in the same transaction instead of crashing or dropping it.

Batches are pipelined: while one batch's transaction runs (in a worker
thread, waiting on the document store), the next batch is fetched from Kafka
and, for a read model that offers `prepare_batch`, decoded and grouped, so
the store's round trips are the only time a record waits for. Transactions
themselves never overlap: the next one starts after the previous one has
committed, checks the offsets that commit stored (fencing) and stores its own
with its changes, so exactly-once and fencing are those of one batch at a
time. Before a commit has settled the next batch is only held in memory; if
that commit fails, every partition is read again from the stored offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import Span
from pymongo import MongoClient, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import PyMongoError

from crm_common.health import Heartbeat, consumer_lag
from crm_common.lifecycle import retry_until_stopped
from crm_common.records import Record, consuming_span, header

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("crm_common.projection")

OFFSETS_COLLECTION = "projection_offsets"
DEAD_LETTERS_COLLECTION = "projection_dead_letters"
# Which session the running projector of each projection uses (see _take_over).
OWNERS_COLLECTION = "projection_owners"


class ReadModel(Protocol):
    """What a projection needs from its read model."""

    def apply_batch(self, session: ClientSession, records: Sequence[Record]) -> Mapping[str, int]:
        """Applies the records (in partition order) with every write bound to `session`.

        Runs in a worker thread, inside the batch's transaction, and may run
        again for the same records when the transaction is retried. Returns
        counters (e.g. applied, duplicates, dead letters) that are added to the
        projection's statistics once the transaction has committed.
        """
        ...


class PreparingReadModel(ReadModel, Protocol):
    """A read model that does its per-record work outside the transaction.

    `prepare_batch` runs while the previous batch's transaction is still
    committing (no I/O, no session: decoding, grouping by document); the
    batch's transaction then calls `apply_prepared` with what one or more
    calls of it returned, in record order, instead of `apply_batch`.
    """

    def prepare_batch(self, records: Sequence[Record]) -> Any:
        """What `apply_prepared` needs of `records`; must not change afterwards."""
        ...

    def apply_prepared(self, session: ClientSession, prepared: Sequence[Any]) -> Mapping[str, int]:
        """Like `apply_batch` for the records of `prepared` (in this order)."""
        ...


class ProjectionFenced(RuntimeError):
    """The stored offsets moved under this projector: another one is running."""


# -- helpers for read models ----------------------------------------------------------


@contextlib.contextmanager
def projection_span(
    record: Record, projection: str, tracer: trace.Tracer | None = None
) -> Iterator[Span]:
    """A span `project <ce_type>` continuing the trace that published the record."""
    name = header(record, "ce_type") or record.topic
    with consuming_span(
        record, f"project {name}", tracer or _tracer, {"crm.projection": projection}
    ) as span:
        yield span


def park_dead_letters(
    session: ClientSession,
    database: Database[Any],
    projection: str,
    failures: Sequence[tuple[Record, str]],
) -> int:
    """Stores records the read model cannot apply, with the reason, in its transaction.

    Keyed by projection and record coordinates, so replaying the same record
    (a retried transaction, a rebuild) overwrites instead of piling up.
    """
    if not failures:
        return 0
    now = datetime.now(UTC)
    ops = []
    for record, error in failures:
        doc = {
            "projection": projection,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": record.key,
            "value": record.value,
            "headers": [[k, v] for k, v in record.headers or ()],
            "error": error,
            "recorded_at": now,
        }
        ident = f"{projection}:{record.topic}:{record.partition}:{record.offset}"
        ops.append(UpdateOne({"_id": ident}, {"$set": doc}, upsert=True))
    database[DEAD_LETTERS_COLLECTION].bulk_write(ops, session=session, ordered=False)
    return len(ops)


def offset_id(projection: str, tp: TopicPartition) -> str:
    return f"{projection}:{tp.topic}:{tp.partition}"


def stored_offsets(database: Database[Any], projection: str) -> dict[TopicPartition, int]:
    """The next offset to consume per partition, as last committed."""
    return {
        TopicPartition(d["topic"], d["partition"]): int(d["next_offset"])
        for d in database[OFFSETS_COLLECTION].find({"projection": projection})
    }


def reset_offsets(database: Database[Any], projection: str) -> int:
    """Forgets where a projection stands, so it starts over from the beginning."""
    return database[OFFSETS_COLLECTION].delete_many({"projection": projection}).deleted_count


# -- the consumer -----------------------------------------------------------------------


@dataclass
class ProjectionStats:
    batches: int = 0
    records: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    lag: dict[TopicPartition, int] = field(default_factory=dict)

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


@dataclass(frozen=True)
class CatchUp:
    """What `run_until_caught_up` did."""

    records: int
    batches: int
    seconds: float
    end_offsets: dict[TopicPartition, int]
    counters: dict[str, int]


class ProjectionConsumer:
    """Feeds one read model from Kafka, with offsets committed in its transactions."""

    def __init__(
        self,
        *,
        projection: str,
        topics: Sequence[str],
        read_model: ReadModel,
        mongo: MongoClient[Any],
        database: str,
        bootstrap: str,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        lag_log_interval: float = 10.0,
        retry_backoff: float = 0.5,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.projection = projection
        self.topics = list(topics)
        self.read_model = read_model
        self.mongo = mongo
        self.database = mongo[database]
        self.bootstrap = bootstrap
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.lag_log_interval = lag_log_interval
        self.retry_backoff = retry_backoff
        self.stats = ProjectionStats()
        self.heartbeat = heartbeat or Heartbeat(f"{projection} projection")
        # What this projector last saw committed; every commit checks it is unchanged.
        self._committed: dict[TopicPartition, int] = {}
        self._reported_records = -1
        self._session: ClientSession | None = None
        # A batch whose commit answered an error after it may have landed:
        # (its token, the offsets it stored). Settled before the next batch.
        self._in_doubt: tuple[str, dict[TopicPartition, int]] | None = None
        # The pause before reading a batch again after the document store failed.
        self._backoff = retry_backoff
        # Catching up one partition number at a time (see run_until_caught_up).
        self._by_partition = False
        self._in_log_order = False
        # Records read but held back (in_log_order): partition -> records, in order.
        self._held: dict[TopicPartition, list[Record]] = {}

    # -- offsets ----------------------------------------------------------------------

    def stored_offsets(self) -> dict[TopicPartition, int]:
        return stored_offsets(self.database, self.projection)

    def reset(self) -> int:
        """Deletes the stored offsets; the next run starts from the beginning."""
        return reset_offsets(self.database, self.projection)

    def health_details(self) -> dict[str, Any]:
        """What `GET /healthz` reports besides the heartbeat."""
        return {
            "projection": self.projection,
            "records": self.stats.records,
            "batches": self.stats.batches,
            # As of the last report (every lag_log_interval seconds).
            "lag": self.stats.total_lag,
        }

    # -- running ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Follows the topics until `stop` is set; starts over after connection errors."""
        await retry_until_stopped(
            lambda: self._consume(stop, until_end=False),
            stop,
            heartbeat=self.heartbeat,
            retry_on=(KafkaError, PyMongoError),
            what=f"projection {self.projection}",
            then="starting again from the stored offsets",
            first_backoff=self.retry_backoff,
        )

    async def run_until_caught_up(
        self,
        stop: asyncio.Event | None = None,
        *,
        by_partition: bool = False,
        in_log_order: bool = False,
    ) -> CatchUp:
        """Consumes up to the end offsets seen at the start, then returns (rebuilds).

        `by_partition` reads one partition number at a time (partition 0 of
        every topic, then 1, ...). Topics keyed alike put one key's records in
        the same partition number of each, so a batch then holds several
        records of each key it touches instead of about one: a read model that
        writes once per key and batch (a rebuild) writes far fewer times.

        `in_log_order` hands the read model each topic's records in the order
        of their log position (`crm_position`) across its partitions, as the
        source service stored them: a read model whose events move a record
        from one key to another (a contacts merge re-keys a deal) then meets
        the record's earlier events, from another partition, before the move.
        Records are held back until every partition of the topic has shown
        its next one (or is at its end).
        """
        started = time.perf_counter()
        records, batches = self.stats.records, self.stats.batches
        counters = dict(self.stats.counters)
        self._by_partition = by_partition and not in_log_order
        self._in_log_order = in_log_order
        self._held = {}
        try:
            ends = await self._consume(stop or asyncio.Event(), until_end=True)
        finally:
            self._by_partition = False
            self._in_log_order = False
            self._held = {}
        return CatchUp(
            records=self.stats.records - records,
            batches=self.stats.batches - batches,
            seconds=time.perf_counter() - started,
            end_offsets=ends,
            counters={k: v - counters.get(k, 0) for k, v in self.stats.counters.items()},
        )

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=f"projection-{self.projection}",
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            # Only reached when the stored offset fell out of retention or the
            # topic was recreated: start over, the read model drops duplicates.
            auto_offset_reset="earliest",
        )

    async def _partitions(self, stop: asyncio.Event, wait: bool) -> list[TopicPartition]:
        # Asks for all topics: a metadata request naming a missing topic would
        # create it on brokers that auto-create topics.
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id=f"projection-{self.projection}"
        )
        await admin.start()
        try:
            while True:
                described = {
                    t["topic"]: t for t in await admin.describe_topics() if t["error_code"] == 0
                }
                missing = [t for t in self.topics if t not in described]
                if not missing or not wait or stop.is_set():
                    break
                self.heartbeat.beat()
                log.info("projection %s waits for topics %s", self.projection, missing)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            await admin.close()
        return [
            TopicPartition(topic, p["partition"])
            for topic in self.topics
            if topic in described
            for p in sorted(described[topic]["partitions"], key=lambda p: p["partition"])
        ]

    async def _seek_to_committed(
        self, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
    ) -> None:
        fresh = []
        for tp in partitions:
            if tp in self._committed:
                consumer.seek(tp, self._committed[tp])
            else:
                fresh.append(tp)
        if fresh:
            await consumer.seek_to_beginning(*fresh)

    async def _consume(self, stop: asyncio.Event, *, until_end: bool) -> dict[TopicPartition, int]:
        consumer = self._new_consumer()
        await consumer.start()
        try:
            partitions = await self._partitions(stop, wait=not until_end)
            if not partitions:
                log.warning("projection %s: none of %s exists", self.projection, self.topics)
                return {}
            consumer.assign(partitions)
            self._session = await asyncio.to_thread(self._take_over)
            stored = await asyncio.to_thread(self.stored_offsets)
            self._committed = {tp: o for tp, o in stored.items() if tp in partitions}
            self._in_doubt = None  # what is stored is what counts
            await self._seek_to_committed(consumer, partitions)
            if self.heartbeat.last_error is not None:
                self.heartbeat.recovered()  # Kafka and the document store answer again
            ends = await consumer.end_offsets(partitions) if until_end else {}
            log.info(
                "projection %s starts at %s%s",
                self.projection,
                {f"{tp.topic}:{tp.partition}": self._committed.get(tp, 0) for tp in partitions},
                f", catching up to {_fmt(ends)}" if until_end else "",
            )
            await self._loop(consumer, partitions, stop, ends if until_end else None)
            return ends
        finally:
            await consumer.stop()
            if self._session is not None:
                session, self._session = self._session, None
                await asyncio.to_thread(session.end_session)

    def _take_over(self) -> ClientSession:
        """Opens this projector's session, after aborting what its predecessor left open.

        A projector killed inside a transaction leaves it open on the server,
        holding its documents, until the server reaps it (60 s on MongoDB and
        SecantusDB): the successor's first commit would wait that long. Every
        transaction of a projector runs in one session whose id is recorded
        here, so the next projector can kill it at once.
        """
        owners = self.database[OWNERS_COLLECTION]
        previous = owners.find_one({"_id": self.projection})
        if previous and previous.get("lsid"):
            try:
                self.mongo.admin.command("killSessions", [previous["lsid"]])
            except PyMongoError as error:
                log.warning(
                    "projection %s: cannot end the previous session: %r", self.projection, error
                )
        session = self.mongo.start_session()
        owners.replace_one(
            {"_id": self.projection},
            {
                "lsid": session.session_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": datetime.now(UTC),
            },
            upsert=True,
        )
        return session

    async def _loop(
        self,
        consumer: AIOKafkaConsumer,
        partitions: Sequence[TopicPartition],
        stop: asyncio.Event,
        ends: dict[TopicPartition, int] | None,
    ) -> None:
        last_report = time.monotonic()
        # Partitions whose end offset was passed without a record to commit it
        # (transaction markers at the tail): done, though not stored as such.
        passed: set[TopicPartition] = set()
        # The previous batch's transaction, committing while the next batch is read.
        inflight: asyncio.Task[None] | None = None
        group: int | None = None  # the partition number read now (by_partition)
        try:
            while not stop.is_set():
                self.heartbeat.beat()
                if ends is not None:
                    done = {
                        tp
                        for tp, end in ends.items()
                        if tp in passed or self._committed.get(tp, 0) >= end
                    }
                    if inflight is None and len(done) == len(ends):
                        break
                    if self._by_partition:
                        group = self._read_group(consumer, partitions, ends, done, group)
                fetched = await consumer.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
                batch = {tp: recs for tp, recs in fetched.items() if recs}
                if self._in_log_order and ends is not None:
                    batch = await self._in_order(consumer, partitions, ends, batch)
                prepared = await self._prepare(batch) if batch else []
                if inflight is not None:
                    # The next batch starts only after this one has committed.
                    settled, inflight = inflight, None
                    if not await self._settled(settled, consumer, partitions, stop):
                        continue  # every partition is read again from the stored offsets
                if batch:
                    if self._in_doubt is not None and await asyncio.to_thread(self._settle):
                        # The previous batch did land: read on after it instead.
                        await self._seek_to_committed(consumer, partitions)
                        continue
                    if not self._in_log_order:
                        batch, prepared = await self._top_up(consumer, batch, prepared)
                    self.heartbeat.lag(consumer_lag(consumer, partitions, self._committed))
                    inflight = asyncio.ensure_future(self._commit(batch, prepared))
                elif ends is not None:
                    for tp, end in ends.items():
                        if await consumer.position(tp) >= end and not self._held.get(tp):
                            passed.add(tp)
                self.heartbeat.lag(consumer_lag(consumer, partitions, self._committed))
                now = time.monotonic()
                if now - last_report >= self.lag_log_interval:
                    self._report_lag(consumer, partitions)
                    last_report = now
            if inflight is not None:
                settled, inflight = inflight, None
                await self._settled(settled, consumer, partitions, stop)
        finally:
            if inflight is not None:
                # Cancelled or failed meanwhile: the transaction still finishes
                # (see _commit), so no write of this projector follows its end.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await inflight
        self._report_lag(consumer, partitions)

    async def _in_order(
        self,
        consumer: AIOKafkaConsumer,
        partitions: Sequence[TopicPartition],
        ends: dict[TopicPartition, int],
        fetched: dict[TopicPartition, list[Record]],
    ) -> dict[TopicPartition, list[Record]]:
        """What of the records read so far may go to the read model in log order:
        per topic, the lowest position of all partitions' next records, as long
        as every partition not at its end has one to compare."""
        for tp, records in fetched.items():
            self._held.setdefault(tp, []).extend(records)
        at_end = {
            tp
            for tp in partitions
            if not self._held.get(tp) and await consumer.position(tp) >= ends.get(tp, 0)
        }
        released: dict[TopicPartition, list[Record]] = {}
        count = 0
        for topic in sorted({tp.topic for tp in partitions}):
            mine = [tp for tp in partitions if tp.topic == topic and tp not in at_end]
            while count < self.max_records and mine:
                if any(not self._held.get(tp) for tp in mine):
                    break  # a partition's next record is not read yet
                first = min(mine, key=lambda tp: _log_position(self._held[tp][0]))
                released.setdefault(first, []).append(self._held[first].pop(0))
                count += 1
                if not self._held[first] and await consumer.position(first) >= ends.get(first, 0):
                    mine.remove(first)
        # Bound what is held: a partition far ahead waits for the others.
        ahead = [tp for tp in partitions if len(self._held.get(tp, ())) > 2 * self.max_records]
        behind = [tp for tp in partitions if tp not in ahead]
        if ahead:
            consumer.pause(*ahead)
        if behind:
            consumer.resume(*behind)
        return released

    @staticmethod
    def _read_group(
        consumer: AIOKafkaConsumer,
        partitions: Sequence[TopicPartition],
        ends: dict[TopicPartition, int],
        done: set[TopicPartition],
        group: int | None,
    ) -> int | None:
        """Resumes only the lowest partition number with records left (pausing the rest)."""
        left = sorted({tp.partition for tp in ends if tp not in done})
        wanted = left[0] if left else None
        if wanted != group:
            consumer.pause(*[tp for tp in partitions if tp.partition != wanted])
            consumer.resume(*[tp for tp in partitions if tp.partition == wanted])
        return wanted

    async def _prepare(self, batch: dict[TopicPartition, list[Record]]) -> list[Any]:
        """The read model's per-record work on a batch, before its transaction."""
        prepare = getattr(self.read_model, "prepare_batch", None)
        if prepare is None:
            return []
        records = [r for tp in sorted(batch) for r in batch[tp]]
        if self._in_log_order:
            records.sort(key=lambda r: (r.topic, _log_position(r)))
        return [await asyncio.to_thread(prepare, records)]

    async def _top_up(
        self,
        consumer: AIOKafkaConsumer,
        batch: dict[TopicPartition, list[Record]],
        prepared: list[Any],
    ) -> tuple[dict[TopicPartition, list[Record]], list[Any]]:
        """Adds what arrived while the previous batch committed (up to `max_records`).

        Without it a batch read early would go alone, and the records behind
        it would wait for one more transaction.
        """
        count = sum(len(recs) for recs in batch.values())
        if count >= self.max_records:
            return batch, prepared
        more = {
            tp: recs
            for tp, recs in (
                await consumer.getmany(timeout_ms=0, max_records=self.max_records - count)
            ).items()
            if recs
        }
        if not more:
            return batch, prepared
        merged = {tp: [*batch.get(tp, []), *more.get(tp, [])] for tp in {*batch, *more}}
        # Within each partition the first part's records come first: record order holds.
        return merged, [*prepared, *(await self._prepare(more))] if prepared else []

    async def _settled(
        self,
        commit: asyncio.Task[None],
        consumer: AIOKafkaConsumer,
        partitions: Sequence[TopicPartition],
        stop: asyncio.Event,
    ) -> bool:
        """Waits for a batch's commit; False (after a backoff) when it failed.

        A document-store error stores nothing of the batch: every partition
        goes back to the stored offsets (the batch read meanwhile is dropped
        too), to be read again. Any other error ends the projection.
        """
        try:
            await commit
        except PyMongoError as error:
            self.heartbeat.failed(error)
            log.warning(
                "projection %s: batch not stored (%r); retrying in %.1f s",
                self.projection,
                error,
                self._backoff,
            )
            await self._seek_to_committed(consumer, partitions)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._backoff)
            self._backoff = min(self._backoff * 2, 10.0)
            return False
        self._backoff = self.retry_backoff
        if self.heartbeat.last_error is not None:
            self.heartbeat.recovered()
        return True

    async def _commit(self, batch: dict[TopicPartition, list[Record]], prepared: list[Any]) -> None:
        records = [r for tp in sorted(batch) for r in batch[tp]]
        if self._in_log_order:
            records.sort(key=lambda r: (r.topic, _log_position(r)))
        next_offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items()}
        started = time.perf_counter()
        transaction = asyncio.ensure_future(
            asyncio.to_thread(self._transaction, records, prepared, next_offsets)
        )
        try:
            counters = await asyncio.shield(transaction)
        except asyncio.CancelledError:
            # A thread cannot be cancelled: let the transaction finish, so that
            # once this task has ended no write of this projector can follow,
            # and a projector started next sees its final offsets.
            with contextlib.suppress(Exception):
                await transaction
            raise
        self._committed.update(next_offsets)
        self.stats.batches += 1
        self.stats.records += len(records)
        for key, value in (counters or {}).items():
            self.stats.counters[key] = self.stats.counters.get(key, 0) + value
        self.heartbeat.dead_letter((counters or {}).get("dead_letters", 0))  # metrics
        log.debug(
            "projection %s stored %d records in %.1f ms, now at %s",
            self.projection,
            len(records),
            (time.perf_counter() - started) * 1000,
            _fmt(next_offsets),
        )

    def _settle(self) -> bool:
        """Whether the batch whose commit ended in an error is stored after all.

        A commit whose answer was lost (the document store crashed or the
        connection broke after it committed) leaves the stored offsets ahead of
        what this projector saw committed; they carry that batch's token, which
        tells them from another projector's or a reset's.
        """
        assert self._in_doubt is not None
        token, next_offsets = self._in_doubt
        ids = {offset_id(self.projection, tp): tp for tp in next_offsets}
        found = {
            d["_id"]: d for d in self.database[OFFSETS_COLLECTION].find({"_id": {"$in": list(ids)}})
        }
        self._in_doubt = None
        if not all((found.get(i) or {}).get("commit_token") == token for i in ids):
            return False
        log.info(
            "projection %s: the batch up to %s was stored although its commit answered an "
            "error; going on from there",
            self.projection,
            _fmt(next_offsets),
        )
        self._committed.update(next_offsets)
        return True

    def _transaction(
        self,
        records: list[Record],
        prepared: list[Any],
        next_offsets: dict[TopicPartition, int],
    ) -> Mapping[str, int]:
        offsets = self.database[OFFSETS_COLLECTION]
        # One token per batch, kept by every retry of its transaction and stored
        # with the offsets: a retry that finds it there knows an earlier attempt
        # committed although its answer was lost (not another projector).
        token = uuid.uuid4().hex
        first: list[Mapping[str, int]] = []

        def body(session: ClientSession) -> Mapping[str, int]:
            ids = {offset_id(self.projection, tp): tp for tp in next_offsets}
            docs = {d["_id"]: d for d in offsets.find({"_id": {"$in": list(ids)}}, session=session)}
            if first and all((docs.get(i) or {}).get("commit_token") == token for i in ids):
                return first[0]  # stored by an attempt whose commit answer was lost
            found = {ident: d.get("next_offset") for ident, d in docs.items()}
            for ident, tp in ids.items():
                if found.get(ident) != self._committed.get(tp):
                    raise ProjectionFenced(
                        f"projection {self.projection}: {tp.topic}:{tp.partition} is stored at "
                        f"{found.get(ident)}, this projector expected "
                        f"{self._committed.get(tp)}: another projector or a reset moved it"
                    )
            if prepared:
                model: PreparingReadModel = self.read_model  # type: ignore[assignment]
                counters = model.apply_prepared(session, prepared)
            else:
                counters = self.read_model.apply_batch(session, records)
            first[:] = [counters]
            offsets.bulk_write(
                [
                    UpdateOne(
                        {"_id": ident},
                        {
                            "$set": {
                                "projection": self.projection,
                                "topic": tp.topic,
                                "partition": tp.partition,
                                "next_offset": next_offsets[tp],
                                "commit_token": token,
                            }
                        },
                        upsert=True,
                    )
                    for ident, tp in ids.items()
                ],
                session=session,
                ordered=False,
            )
            return counters

        assert self._session is not None, "transactions run inside _consume"
        # with_transaction retries the whole body on TransientTransactionError
        # and the commit on UnknownTransactionCommitResult; a retried commit of a
        # transaction the server committed before it crashed answers
        # NoSuchTransaction, and the body runs again: the token recognises it.
        try:
            return self._session.with_transaction(body)
        except PyMongoError:
            if first:  # the body ran: a commit may have landed
                self._in_doubt = (token, dict(next_offsets))
            raise

    def _report_lag(self, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> None:
        lag = {}
        for tp in partitions:
            end = consumer.last_stable_offset(tp)
            if end is None or end < 0:
                end = consumer.highwater(tp)
            if end is not None:
                lag[tp] = max(0, end - self._committed.get(tp, 0))
        self.stats.lag = lag
        # An idle projection at lag 0 has nothing new to say every interval.
        busy = self.stats.records != self._reported_records or self.stats.total_lag > 0
        self._reported_records = self.stats.records
        log.log(
            logging.INFO if busy else logging.DEBUG,
            "projection %s: %d records in %d batches so far, lag %d (%s) %s",
            self.projection,
            self.stats.records,
            self.stats.batches,
            self.stats.total_lag,
            ", ".join(f"{tp.topic}:{tp.partition}={n}" for tp, n in sorted(lag.items())),
            self.stats.counters,
        )


def _fmt(offsets: Mapping[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}:{tp.partition}": o for tp, o in offsets.items()}


def _log_position(record: Record) -> int:
    """The record's position in its source's log (`crm_position`), else its offset."""
    value = header(record, "crm_position")
    try:
        return int(value) if value is not None else int(record.offset)
    except ValueError:
        return int(record.offset)
