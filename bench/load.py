"""Load generators: closed-loop throughput and open-loop lag."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pymongo
from aiokafka import AIOKafkaConsumer

from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm_common.clients import service_channel

#: gRPC call metadata: the caller's bearer token (`crm_deploy.testing.grpc_auth`).
Metadata = tuple[tuple[str, str], ...]

_counter = itertools.count()


def create_person_request() -> contacts_pb2.CreatePersonRequest:
    n = next(_counter)
    tag = uuid.uuid4().hex[:10]
    return contacts_pb2.CreatePersonRequest(
        given_name=f"Bench{n}",
        family_name=f"Person{tag}",
        channels=[
            contacts_pb2.NewChannelIdentity(
                channel=contacts_pb2.CHANNEL_EMAIL,
                address=f"bench.{tag}.{n}@example.com",
                consent_status=contacts_pb2.CONSENT_STATUS_GRANTED,
                consent_source="bench",
            )
        ],
        lifecycle_stage=contacts_pb2.LIFECYCLE_STAGE_LEAD,
        tags=["bench"],
    )


@dataclass
class Throughput:
    clients: int
    commands: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.commands / self.seconds

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def closed_loop_creates(
    target: str, clients: int, commands: int, metadata: Metadata = ()
) -> Throughput:
    """`clients` concurrent callers, each sending its next command once the
    previous one was answered, until `commands` were answered in all.

    The channels balance like the platform's own (`round_robin` over every
    address of `target`, e.g. `ipv4:127.0.0.1:a,127.0.0.1:b` for two replicas)."""
    channels = [service_channel(target) for _ in range(min(clients, 4))]
    stubs = [contacts_pb2_grpc.ContactsServiceStub(c) for c in channels]
    # Warm up connections and the server's code paths.
    for stub in stubs:
        await stub.CreatePerson(create_person_request(), metadata=metadata)
    remaining = commands
    latencies: list[float] = []

    async def client(i: int) -> None:
        nonlocal remaining
        stub = stubs[i % len(stubs)]
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await stub.CreatePerson(create_person_request(), metadata=metadata)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    for c in channels:
        await c.close()
    return Throughput(clients, len(latencies), elapsed, latencies)


@dataclass
class Lag:
    offered_per_second: float
    commands: int
    seconds: float
    lags_ms: list[float]
    unseen: int
    #: Of each lag: acknowledgement -> the relay hands the event to Kafka (the
    #: record's CreateTime), and from there -> visible in the 360 view.
    to_kafka_ms: list[float] = field(default_factory=list)
    from_kafka_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return summarize(self.lags_ms)


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


class RecordTimes:
    """The CreateTime of each event on the topic, by log position (the
    `crm_position` header), read from the topic's end onwards."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.created_ms: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        await self._consumer.start()
        deadline = time.monotonic() + 30
        while not self._consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no partitions of {self.topic} assigned")
            await asyncio.sleep(0.05)
        for tp in self._consumer.assignment():
            await self._consumer.position(tp)  # fixes the start at the end
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        assert self._consumer
        while True:
            fetched = await self._consumer.getmany(timeout_ms=200)
            for records in fetched.values():
                for r in records:
                    position = dict(r.headers).get("crm_position")
                    if position is not None:
                        self.created_ms.setdefault(int(position), r.timestamp)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer:
            await self._consumer.stop()


class ChangeWatcher:
    """Records when each 360 document first shows each position, from the
    document store's change stream (no polling load on the store)."""

    def __init__(self, mongo_url: str, mongo_db: str) -> None:
        self._client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(mongo_url)
        self._collection = self._client[mongo_db]["customer360"]
        self.seen: dict[str, list[tuple[int, float]]] = {}
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        try:
            self._follow()
        except Exception as exc:  # reported by open_loop_lag
            self.error = exc
            self._ready.set()

    def _follow(self) -> None:
        with self._collection.watch(full_document="updateLookup", max_await_time_ms=100) as stream:
            self._ready.set()
            while not self._stop.is_set():
                change = stream.try_next()
                if change is None:
                    continue
                now = time.perf_counter()
                doc = change.get("fullDocument") or {}
                position = int((doc.get("positions") or {}).get("contacts", 0))
                ident = str(change["documentKey"]["_id"])
                self.seen.setdefault(ident, []).append((position, now))

    def first_seen(self, ident: str, position: int) -> float | None:
        for seen_position, when in self.seen.get(ident, ()):
            if seen_position >= position:
                return when
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


async def open_loop_lag(
    target: str,
    mongo_url: str,
    mongo_db: str,
    rate: float,
    seconds: float,
    *,
    bootstrap: str,
    topic: str,
    settle_timeout: float = 30.0,
    metadata: Metadata = (),
) -> Lag:
    """Offers `rate` create commands per second whatever the answers' pace,
    and measures for each the time from its acknowledgement until its 360
    document shows the returned position."""
    channel = grpc.aio.insecure_channel(target)
    stub = contacts_pb2_grpc.ContactsServiceStub(channel)
    await stub.CreatePerson(create_person_request(), metadata=metadata)
    watcher = ChangeWatcher(mongo_url, mongo_db)
    await asyncio.to_thread(watcher.start)
    records = RecordTimes(bootstrap, topic)
    await records.start()
    acked: list[tuple[str, int, float]] = []
    # perf_counter for the lag itself; the wall clock to compare with the
    # records' CreateTime (milliseconds since the epoch).
    acked_wall: dict[int, float] = {}

    async def one(request: contacts_pb2.CreatePersonRequest) -> None:
        response = await stub.CreatePerson(request, metadata=metadata)
        acked.append((response.result.id, response.result.position, time.perf_counter()))
        acked_wall[response.result.position] = time.time()

    interval = 1.0 / rate
    total = int(rate * seconds)
    tasks = []
    started = time.perf_counter()
    for i in range(total):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(create_person_request())))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    deadline = time.perf_counter() + settle_timeout
    while time.perf_counter() < deadline:
        if all(watcher.first_seen(i, p) is not None for i, p, _ in acked):
            break
        await asyncio.sleep(0.2)
    await asyncio.to_thread(watcher.stop)
    await records.stop()
    await channel.close()
    if watcher.error is not None:
        raise RuntimeError(f"the change stream failed: {watcher.error!r}") from watcher.error
    lags = []
    to_kafka, from_kafka = [], []
    unseen = 0
    for ident, position, acked_at in acked:
        seen_at = watcher.first_seen(ident, position)
        if seen_at is None:
            unseen += 1
            continue
        lag = max(0.0, seen_at - acked_at) * 1000
        lags.append(lag)
        created_ms = records.created_ms.get(position)
        if created_ms is not None:
            relay_ms = min(lag, max(0.0, created_ms - acked_wall[position] * 1000))
            to_kafka.append(relay_ms)
            from_kafka.append(lag - relay_ms)
    return Lag(rate, total, elapsed, lags, unseen, to_kafka, from_kafka)
