"""Load generators: closed-loop throughput and open-loop lag."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pymongo

from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc

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


async def closed_loop_creates(target: str, clients: int, commands: int) -> Throughput:
    """`clients` concurrent callers, each sending its next command once the
    previous one was answered, until `commands` were answered in all."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, 4))]
    stubs = [contacts_pb2_grpc.ContactsServiceStub(c) for c in channels]
    # Warm up connections and the server's code paths.
    for stub in stubs:
        await stub.CreatePerson(create_person_request())
    remaining = commands
    latencies: list[float] = []

    async def client(i: int) -> None:
        nonlocal remaining
        stub = stubs[i % len(stubs)]
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await stub.CreatePerson(create_person_request())
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

    def summary(self) -> dict[str, float]:
        return {
            "p50": percentile(self.lags_ms, 50),
            "p95": percentile(self.lags_ms, 95),
            "p99": percentile(self.lags_ms, 99),
            "max": max(self.lags_ms) if self.lags_ms else float("nan"),
            "mean": statistics.fmean(self.lags_ms) if self.lags_ms else float("nan"),
        }


async def open_loop_lag(
    target: str,
    mongo_url: str,
    mongo_db: str,
    rate: float,
    seconds: float,
    *,
    poll_interval: float = 0.01,
    settle_timeout: float = 30.0,
) -> Lag:
    """Offers `rate` commands per second regardless of how fast they are
    answered, and measures for each the time from its acknowledgement until
    its 360 document shows the returned position."""
    channel = grpc.aio.insecure_channel(target)
    stub = contacts_pb2_grpc.ContactsServiceStub(channel)
    await stub.CreatePerson(create_person_request())
    customers = pymongo.MongoClient(mongo_url)[mongo_db]["customer360"]
    pending: dict[str, tuple[int, float]] = {}
    lags: list[float] = []
    sent = 0
    done_sending = asyncio.Event()

    async def one(send: Callable[[], Awaitable[contacts_pb2.CreatePersonResponse]]) -> None:
        response = await send()
        pending[response.result.id] = (response.result.position, time.perf_counter())

    async def offer() -> None:
        nonlocal sent
        interval = 1.0 / rate
        started = time.perf_counter()
        tasks = []
        total = int(rate * seconds)
        for i in range(total):
            due = started + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = create_person_request()
            tasks.append(asyncio.create_task(one(lambda r=request: stub.CreatePerson(r))))
            sent += 1
        await asyncio.gather(*tasks)
        done_sending.set()

    def seen(ids: list[str]) -> list[tuple[str, int]]:
        docs = customers.find({"_id": {"$in": ids}}, {"positions": 1})
        return [(d["_id"], int((d.get("positions") or {}).get("contacts", 0))) for d in docs]

    async def watch() -> None:
        deadline: float | None = None
        while True:
            if done_sending.is_set() and deadline is None:
                deadline = time.perf_counter() + settle_timeout
            if pending:
                ids = list(pending)
                found = await asyncio.to_thread(seen, ids)
                now = time.perf_counter()
                for ident, position in found:
                    expected = pending.get(ident)
                    if expected and position >= expected[0]:
                        lags.append((now - expected[1]) * 1000)
                        del pending[ident]
            elif done_sending.is_set():
                return
            if deadline is not None and time.perf_counter() > deadline:
                return
            await asyncio.sleep(poll_interval)

    started = time.perf_counter()
    await asyncio.gather(offer(), watch())
    elapsed = time.perf_counter() - started
    await channel.close()
    return Lag(rate, sent, elapsed, lags, len(pending))
