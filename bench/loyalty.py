"""`python -m bench.loyalty`: the loyalty service's benchmarks (also run by `make bench`).

One bounded run on the real local infrastructure (ZooKeeper, Kafka) and real
`crm-contacts serve`, `crm-loyalty ingest` and `crm-loyalty serve` processes
on a SQLite store, with real signed tokens:

- **ERP ingestion.** The ERP simulator (`crm_loyalty.simulator`) publishes a
  stream of orders of existing contacts (several lines and categories,
  returns, cancellations, redeliveries) to the inbound topic before anything
  reads it. Then, measured in the same run on the same topic: the raw consume
  rate (a plain consumer reading and decoding every record, the ceiling any
  consumer of that topic has on this machine), and the ingest's rate from the
  inbound topic to points acknowledged in the store (a started `crm-loyalty
  ingest` reads the backlog; the clock runs from its first applied order to
  the last, counted in the store's events).
- **Redemptions.** 16 concurrent gRPC clients (closed loop) against
  `crm-loyalty serve`: `RedeemPoints` (first-to-expire lots), then
  `RedeemReward` (a unit of stock and the points in one decision of two
  aggregates), set against the bare `Application.save()` loop on the same
  store, measured before and after.

The section between the loyalty markers of docs/benchmarks.md is rewritten;
numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, TopicPartition
from eventsourcing.utils import get_topic

from bench.__main__ import machine
from bench.baseline import bare_save_loop
from bench.load import Throughput
from bench.sections import record_section
from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm.erp.v1 import orders_pb2 as erp_pb
from crm.loyalty.v1 import loyalty_pb2 as pb
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_common.settings import Settings
from crm_deploy.identity import ensure_identity
from crm_deploy.process import free_port
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack, StackConfig
from crm_deploy.testing import (
    clean_environment,
    grpc_auth,
    kill_leftovers,
    start_process,
    stop_gracefully,
    wait_serving,
)
from crm_loyalty.application import create_application
from crm_loyalty.domain import Member
from crm_loyalty.simulator import Shape, order_stream, publish

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- loyalty benchmark: begin (written by python -m bench.loyalty) -->"
END = "<!-- loyalty benchmark: end -->"
PARTITIONS = 6
Metadata = tuple[tuple[str, str], ...]


@dataclass
class LoyaltyRun:
    orders: int
    customers: int
    messages: int = 0
    placements: int = 0
    follow_ups: int = 0
    raw_per_second: float = 0.0
    ingest_seconds: float = 0.0
    ingest_first_after: float = 0.0
    #: The share of the order events applied after the first poll that saw any
    #: (the ones the clock measured).
    ingest_share: float = 1.0
    baseline_before: float = 0.0
    baseline_after: float = 0.0
    #: The machine's 1-minute load average at the start and the end of the run.
    load: list[float] = field(default_factory=list)
    points: Throughput | None = None
    rewards: Throughput | None = None

    @property
    def baseline(self) -> float:
        return statistics.fmean([self.baseline_before, self.baseline_after])

    @property
    def ingest_messages_per_second(self) -> float:
        timed = self.messages * self.ingest_share
        return timed / self.ingest_seconds if self.ingest_seconds else 0.0

    @property
    def ingest_orders_per_second(self) -> float:
        timed = self.placements * self.ingest_share
        return timed / self.ingest_seconds if self.ingest_seconds else 0.0


async def raw_consume(bootstrap: str, topic: str, expected: int) -> float:
    """Records/s of a plain consumer reading and decoding the whole topic."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen = 0
        started = time.perf_counter()
        while seen < expected:
            batch = await consumer.getmany(timeout_ms=1000, max_records=500)
            for records in batch.values():
                for record in records:
                    erp_pb.OrderEvent.FromString(record.value or b"")
                    seen += 1
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def applied_in_store(data_dir: Path, after: int) -> tuple[int, int]:
    """(order events applied since log position `after`, the last position)."""
    settings = Settings(
        service="loyalty",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )
    app = create_application(settings)
    try:
        topics = [get_topic(Member.Earned), get_topic(Member.Cancelled)]
        count, position = 0, after
        while True:
            batch = app.recorder.select_notifications(position + 1, 5000, topics=topics)
            count += len(batch)
            if batch:
                position = batch[-1].id
            if len(batch) < 5000:
                return count, position
    finally:
        app.close()


async def closed_loop(clients: int, total: int, call: Any, contact_ids: list[str]) -> Throughput:
    remaining = total
    latencies: list[float] = []

    async def client(index: int) -> None:
        nonlocal remaining
        n = 0
        while remaining > 0:
            remaining -= 1
            contact = contact_ids[(index + n * clients) % len(contact_ids)]
            n += 1
            started = time.perf_counter()
            await call(contact)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return Throughput(clients, total, time.perf_counter() - started, latencies)


async def measure(args: argparse.Namespace, scratch: Path, result: LoyaltyRun) -> None:
    result.load.append(os.getloadavg()[0])
    identity = ensure_identity(scratch / "identity")
    stack = Stack(StackConfig.for_tests(scratch / "stack"))
    stack.start_infra()
    started: list[subprocess.Popen[bytes]] = []
    try:
        prefix = f"bench-loyalty-{uuid.uuid4().hex[:6]}.crm"
        inbound = f"{prefix}.erp.orders"
        ensure_topics(
            stack.kafka_bootstrap,
            {inbound: PARTITIONS, f"{prefix}.erp.orders.dead-letter": 1},
        )
        ports = {name: free_port() for name in ("cg", "ch", "lg", "lh")}
        common = {
            "CRM_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "CRM_TOPIC_PREFIX": prefix,
            "CRM_CONTACTS_GRPC_PORT": str(ports["cg"]),
            "CRM_CONTACTS_HTTP_PORT": str(ports["ch"]),
            "CRM_LOYALTY_GRPC_PORT": str(ports["lg"]),
            "CRM_LOYALTY_HTTP_PORT": str(ports["lh"]),
            "CRM_CONTACTS_GRPC_TARGET": f"127.0.0.1:{ports['cg']}",
            "CRM_LOYALTY_SETTLE_SECONDS": "3600",
        }
        contacts_env = clean_environment(scratch / "contacts", identity, **common)
        env = clean_environment(scratch / "loyalty", identity, **common)
        contacts = start_process(
            "contacts", "serve", contacts_env, scratch / "contacts.log", started
        )
        await wait_serving(
            f"127.0.0.1:{ports['cg']}",
            f"http://127.0.0.1:{ports['ch']}",
            contacts,
            scratch / "contacts.log",
            timeout=180,
        )
        admin: Metadata = grpc_auth(identity.mint("admin", subject="bench"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['cg']}") as channel:
            stub = contacts_pb2_grpc.ContactsServiceStub(channel)  # type: ignore[no-untyped-call]
            customers = []
            for i in range(args.customers):
                reply = await stub.CreatePerson(
                    contacts_pb2.CreatePersonRequest(given_name=f"Bench{i}", family_name="Buyer"),
                    metadata=admin,
                )
                customers.append(reply.result.id)

        # -- ERP ingestion ---------------------------------------------------------
        shape = Shape(return_rate=0.12, cancel_rate=0.04, redeliver_rate=0.03, reorder_rate=0.0)
        stream = order_stream(customers, args.orders, seed=11, days=20, shape=shape)
        distinct = {
            (m.event.order_id, m.event.WhichOneof("payload"), m.event.returned.return_id)
            for m in stream
        }
        result.messages = len(stream)
        result.placements = sum(1 for _, kind, _ in distinct if kind == "placed")
        result.follow_ups = len(distinct) - result.placements
        print(f"[loyalty] publishing {len(stream)} ERP messages", flush=True)
        await publish(stack.kafka_bootstrap, stream, topic=inbound)
        print("[loyalty] raw consume of the same topic", flush=True)
        result.raw_per_second = await raw_consume(stack.kafka_bootstrap, inbound, len(stream))
        print(f"[loyalty]   {result.raw_per_second:,.0f} records/s", flush=True)

        print("[loyalty] crm-loyalty ingest over the backlog", flush=True)
        launched = time.perf_counter()
        ingest = start_process("loyalty", "ingest", env, scratch / "ingest.log", started)
        wanted = len(distinct)
        first_at: float | None = None
        done, position, untimed = 0, 0, 0
        deadline = launched + args.timeout
        while done < wanted:
            if ingest.poll() is not None:
                raise RuntimeError((scratch / "ingest.log").read_text()[-3000:])
            if time.perf_counter() > deadline:
                raise RuntimeError(f"ingest applied {done} of {wanted} in {args.timeout} s")
            more, position = await asyncio.to_thread(
                applied_in_store, scratch / "loyalty", position
            )
            now = time.perf_counter()
            if more and first_at is None:
                # The clock starts here: what was applied before is not timed.
                first_at, untimed = now, more
                result.ingest_first_after = now - launched
            done += more
            await asyncio.sleep(0.5)
        assert first_at is not None
        result.ingest_seconds = time.perf_counter() - first_at
        result.ingest_share = (wanted - untimed) / wanted
        print(
            f"[loyalty]   {result.ingest_orders_per_second:,.0f} orders/s "
            f"({result.ingest_messages_per_second:,.0f} messages/s)",
            flush=True,
        )
        await stop_gracefully(ingest, scratch / "ingest.log")

        # -- redemptions -----------------------------------------------------------
        print(f"[loyalty] baseline (bare save loop, {args.baseline} saves)", flush=True)
        result.baseline_before = bare_save_loop(scratch / "baseline-1", "sqlite", args.baseline)
        serve = start_process("loyalty", "serve", env, scratch / "serve.log", started)
        await wait_serving(
            f"127.0.0.1:{ports['lg']}", f"http://127.0.0.1:{ports['lh']}", serve,
            scratch / "serve.log", timeout=180,
        )  # fmt: skip
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['lg']}") as channel:
            loyalty = loyalty_pb2_grpc.LoyaltyServiceStub(channel)  # type: ignore[no-untyped-call]
            members = []
            for contact in customers:
                try:
                    await loyalty.AdjustPoints(
                        pb.AdjustPointsRequest(
                            contact_id=contact, points=10_000_000, reason="bench"
                        ),
                        metadata=admin,
                    )
                    members.append(contact)
                except grpc.aio.AioRpcError:
                    continue  # a customer the stream never drew has no member
            await loyalty.DefineReward(
                pb.DefineRewardRequest(
                    code="bench-voucher", name="Voucher", points=5, stock=10_000_000
                ),
                metadata=admin,
            )

            async def redeem_points(contact: str) -> None:
                await loyalty.RedeemPoints(
                    pb.RedeemPointsRequest(contact_id=contact, points=3, reference="bench"),
                    metadata=admin,
                )

            async def redeem_reward(contact: str) -> None:
                await loyalty.RedeemReward(
                    pb.RedeemRewardRequest(contact_id=contact, code="bench-voucher"),
                    metadata=admin,
                )

            print("[loyalty] RedeemPoints, 16 clients", flush=True)
            result.points = await closed_loop(16, args.redemptions, redeem_points, members)
            print(f"[loyalty]   {result.points.per_second:,.0f} redemptions/s", flush=True)
            print("[loyalty] RedeemReward, 16 clients", flush=True)
            result.rewards = await closed_loop(16, args.redemptions, redeem_reward, members)
            print(f"[loyalty]   {result.rewards.per_second:,.0f} redemptions/s", flush=True)
        await stop_gracefully(serve, scratch / "serve.log")
        result.baseline_after = bare_save_loop(scratch / "baseline-2", "sqlite", args.baseline)
        await stop_gracefully(contacts, scratch / "contacts.log")
        result.load.append(os.getloadavg()[0])
    finally:
        kill_leftovers(started)
        stack.stop()


def render(r: LoyaltyRun, args: argparse.Namespace) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    assert r.points and r.rewards
    b = r.baseline
    return "\n".join(
        [
            BEGIN,
            "## Loyalty: ERP ingestion and redemptions",
            "",
            f"- **Machine:** {machine()}",
            f"- **Run:** {when}; SQLite store; {r.orders} simulated orders of "
            f"{r.customers} contacts ({r.messages} messages: {r.placements} placements, "
            f"{r.follow_ups} returns and cancellations, the rest redeliveries) on a topic "
            f"of {PARTITIONS} partitions; {args.redemptions} "
            "redemptions per kind with 16 gRPC clients. The machine is shared: its load",
            "average was " + " and ".join(f"{x:.1f}" for x in r.load) + " at the start and",
            f"the end of the run, on {os.cpu_count()} cores; read the ratios, not the "
            "absolute figures.",
            "",
            "| measure | rate | against the same run's reference |",
            "|---|---|---|",
            f"| raw consume of the inbound topic (read + decode) | "
            f"{r.raw_per_second:,.0f} records/s | the reference |",
            f"| ERP ingestion, inbound topic → points acknowledged in the store | "
            f"**{r.ingest_orders_per_second:,.0f} orders/s** "
            f"({r.ingest_messages_per_second:,.0f} messages/s) | "
            f"{r.ingest_messages_per_second / r.raw_per_second:.3f}x the raw consume rate |",
            f"| bare `save()` loop (SQLite) | {b:,.0f} saves/s ({r.baseline_before:,.0f} "
            f"before, {r.baseline_after:,.0f} after) | the reference |",
            f"| `RedeemPoints`, 16 gRPC clients | **{r.points.per_second:,.0f}/s** "
            f"(p50 {r.points.percentile(50):.1f} ms, p99 {r.points.percentile(99):.1f} ms) | "
            f"{r.points.per_second / b:.2f}x the bare save loop |",
            f"| `RedeemReward` (stock and points in one decision), 16 gRPC clients | "
            f"**{r.rewards.per_second:,.0f}/s** (p50 {r.rewards.percentile(50):.1f} ms, "
            f"p99 {r.rewards.percentile(99):.1f} ms) | "
            f"{r.rewards.per_second / b:.2f}x the bare save loop |",
            "",
            "Reading the figures: the ingest runs one command per order message (the",
            "contact checked over gRPC for a customer's first order, the member",
            "enrolled, the order's lot and its receipt saved, the partition's offset",
            "committed after its records), so its rate is the command path's, not",
            "Kafka's: the raw consume rate is the ceiling of any consumer of the",
            "topic on this machine. The ingest started on a backlog; its clock runs",
            f"from its first applied order ({r.ingest_first_after:.1f} s after the",
            "process started: start-up and the group join) to the last. Every",
            "`RedeemReward` of this run takes the same reward, so all of them meet on",
            "one aggregate; the command bus decides them one after another in shared",
            "batches (group commit), one save per batch. That reward's history grows",
            "by one event per redemption; a load reads its latest snapshot (every",
            "CRM_SNAPSHOT_INTERVAL events) and the events after it, so the figure",
            "holds as the run goes on (see Snapshots). Members are spread over",
            f"{r.customers} contacts, each history short.",
            END,
        ]
    )


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loyalty", description=__doc__)
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--redemptions", type=int, default=2000)
    parser.add_argument("--baseline", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=600, help="seconds the ingest may take")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    result = LoyaltyRun(args.orders, args.customers)
    with tempfile.TemporaryDirectory(prefix="crm-bench-loyalty-") as tmp:
        asyncio.run(measure(args, Path(tmp), result))
    text = render(result, args)
    print(text)
    record(text, Path(args.out))


if __name__ == "__main__":
    main()
