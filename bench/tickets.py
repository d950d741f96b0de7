"""`python -m bench.tickets`: the tickets service's benchmarks (also run by `make bench`).

- the baseline: the `eventsourcing` library's bare `Application.save()` loop on
  the same store, before and after the service runs;
- case-command throughput through gRPC, 1 and 16 concurrent clients (closed
  loop), against real `crm-tickets serve` and `crm-contacts serve` processes
  with real signed tokens; each client works cases through a cycle: open (the
  contact checked over gRPC, the tier asked of loyalty, which is not running
  here, so each case takes the default at once), agent reply, internal note,
  pending, customer reply, solved;
- the SLA deadlines among 100,000 open cases: a store seeded with that many
  cases (written in batches through the service's own command bus, every
  priority, twelve teams, the default business hours), then the query tables
  (`crm_tickets.deadlines`): building them from the whole log once (a new
  store, or a new version of the tables), reading the deadlines due at noon
  (the cases were opened over the morning; the urgent ones are due) the way
  the scanner does, a page of the team queue, of the cases at risk, and a
  team's compliance;
- a `crm-tickets serve` process started over that store: the time until it is
  ready (gRPC health SERVING and `/healthz`), its first queue page over gRPC,
  and its memory (RSS), against the same process started over an empty store
  in the same run (the baseline of these figures).

The section between the tickets markers of docs/benchmarks.md is rewritten;
numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.baseline import bare_save_loop
from bench.load import Throughput, percentile
from bench.sections import record_section
from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm.tickets.v1 import tickets_pb2 as pb
from crm.tickets.v1 import tickets_pb2_grpc
from crm_common.clients import service_channel
from crm_common.commands import CommandBus, CommandContext, UnitOfWork
from crm_common.querystore import QueryDatabase
from crm_common.settings import Settings
from crm_deploy.identity import ensure_identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    clean_environment,
    grpc_auth,
    kill_leftovers,
    start_process,
    stop_gracefully,
    wait_serving,
)
from crm_tickets.application import DEFAULT_REOPEN_WINDOW_SECONDS, DEFAULT_TERMS
from crm_tickets.application import create_application as tickets_application
from crm_tickets.deadlines import DUE_PAGE, TicketsQuery, micros
from crm_tickets.domain import CHANNELS, DEFAULT_TIER, Case

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- tickets benchmark: begin (written by python -m bench.tickets) -->"
END = "<!-- tickets benchmark: end -->"
TEAMS = [f"team-{i:02d}" for i in range(12)]
PRIORITIES = ["low"] * 2 + ["normal"] * 5 + ["high"] * 2 + ["urgent"]
#: The seeded cases' clock: a Monday noon (the default hours are 09:00-17:00 UTC);
#: the cases were opened over the morning, so the urgent ones are due by now.
NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)
Metadata = tuple[tuple[str, str], ...]


@dataclass
class TicketsRun:
    cases: int
    commands: int
    baseline_before: float = 0.0
    baseline_after: float = 0.0
    single: Throughput | None = None
    sixteen: Throughput | None = None
    by_command: dict[str, list[float]] = field(default_factory=dict)
    seed_seconds: float = 0.0
    build_seconds: float = 0.0
    build_mib: float = 0.0
    due_found: int = 0
    due_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    at_risk_ms: list[float] = field(default_factory=list)
    compliance_ms: list[float] = field(default_factory=list)
    #: `serve` started over an empty store, then over the seeded one: seconds to ready,
    #: the first queue page over gRPC (ms), RSS after it (MiB).
    start_empty: tuple[float, float, float] = (0.0, 0.0, 0.0)
    start_seeded: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: The machine's 1-minute load average at the start and the end of the run.
    load: list[float] = field(default_factory=list)

    @property
    def baseline(self) -> float:
        return statistics.fmean([self.baseline_before, self.baseline_after])


def _settings(data_dir: Path) -> Settings:
    return Settings(
        service="tickets",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


# -- 100,000 open cases ---------------------------------------------------------------------


def _add_all(uow: UnitOfWork, cases: list[Case]) -> Case:
    for case in cases:
        uow.add(case)
    return cases[0]


def seed(settings: Settings, count: int, now: datetime, batch: int = 1000) -> float:
    """Writes `count` open cases through the tickets command bus, `batch` a command."""
    rng = random.Random(20261203)
    customers = [f"contact-{i:06d}" for i in range(max(1, count // 3))]
    app = tickets_application(settings)
    bus = CommandBus(app, "tickets")
    ctx = CommandContext("SeedCases", actor="bench", client="bench")
    pending: list[Future[Any]] = []
    started = time.perf_counter()
    try:
        written = 0
        while written < count:
            cases = [
                Case.open(
                    customer_id=rng.choice(customers),
                    channel=rng.choice(CHANNELS),
                    subject=f"Case {written + i}",
                    description="",
                    category=rng.choice(["billing", "hardware", "access", "shipping"]),
                    priority=rng.choice(PRIORITIES),
                    team=rng.choice(TEAMS),
                    assignee="",
                    tier=DEFAULT_TIER,
                    tier_source="default: not a member",
                    policy_id="",
                    policy_version=0,
                    terms=DEFAULT_TERMS,
                    reopen_window_seconds=DEFAULT_REOPEN_WINDOW_SECONDS,
                    at=now - timedelta(seconds=rng.uniform(0, 3 * 3600)),
                )
                for i in range(min(batch, count - written))
            ]
            written += len(cases)
            pending.append(bus.submit(ctx, lambda uow, cases=cases: _add_all(uow, cases)))
            if len(pending) > 2:
                pending.pop(0).result()
        for future in pending:
            future.result()
        return time.perf_counter() - started
    finally:
        bus.close()
        app.close()


def timed_ms(call: Callable[[], Any], into: list[float], rounds: int) -> Any:
    result = None
    for _ in range(rounds):
        started = time.perf_counter()
        result = call()
        into.append((time.perf_counter() - started) * 1000)
    return result


def all_due(query: TicketsQuery, now: datetime) -> list[Any]:
    """Every deadline due at `now`, read a page at a time as the scanner reads them."""
    found: list[Any] = []
    after = None
    while True:
        page = query.due(now, after, DUE_PAGE)
        found += page
        if len(page) < DUE_PAGE:
            return found
        last = page[-1]
        after = (micros(last.at), last.case_id, last.kind, last.what)


def measure_deadlines(run: TicketsRun, data_dir: Path, now: datetime) -> None:
    settings = _settings(data_dir)
    run.seed_seconds = seed(settings, run.cases, now)
    print(f"[tickets] {run.cases:,} open cases seeded in {run.seed_seconds:.1f} s", flush=True)
    app = tickets_application(settings)
    query = TicketsQuery(app, QueryDatabase(settings))
    try:
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        query.catch_up()
        run.build_seconds = time.perf_counter() - started
        run.build_mib = (psutil.Process().memory_info().rss - rss_before) / 1024**2
        due = timed_ms(lambda: all_due(query, now), run.due_ms, 20)
        run.due_found = len(due)
        timed_ms(lambda: query.queue("team-03", None, 51), run.queue_ms, 20)
        timed_ms(
            lambda: query.at_risk(now + timedelta(minutes=60), "", None, 51), run.at_risk_ms, 20
        )
        timed_ms(
            lambda: query.compliance("team-03", now - timedelta(days=30), now),
            run.compliance_ms,
            20,
        )
    finally:
        query.close()
        app.close()
    print(
        f"[tickets] tables built in {run.build_seconds:.1f} s; due(now) p50 "
        f"{percentile(run.due_ms, 50):.2f} ms ({run.due_found:,} due)",
        flush=True,
    )


async def start_serve(data_dir: Path, scratch: Path, clock: datetime) -> tuple[float, float, float]:
    """Starts `crm-tickets serve` over the store under `data_dir`: seconds until ready,
    the first page of a team queue over gRPC (ms), and the process's RSS then (MiB)."""
    identity = ensure_identity(scratch / "identity")
    ports = {name: free_port() for name in ("tg", "th")}
    clock_file = scratch / "now.txt"
    clock_file.write_text(clock.isoformat())
    env = clean_environment(
        data_dir,
        identity,
        CRM_TICKETS_GRPC_PORT=str(ports["tg"]),
        CRM_TICKETS_HTTP_PORT=str(ports["th"]),
        CRM_CONTACTS_GRPC_TARGET=f"127.0.0.1:{free_port()}",
        CRM_LOYALTY_GRPC_TARGET=f"127.0.0.1:{free_port()}",
        CRM_TICKETS_CLOCK_FILE=str(clock_file),
    )
    log = scratch / "serve.log"
    started: list[subprocess.Popen[bytes]] = []
    begun = time.perf_counter()
    process = start_process("tickets", "serve", env, log, started)
    target = f"127.0.0.1:{ports['tg']}"
    try:
        await wait_serving(target, f"http://127.0.0.1:{ports['th']}", process, log, timeout=600)
        ready = time.perf_counter() - begun
        metadata = grpc_auth(identity.mint("service", subject="bench-agent", lifetime=3600))
        async with grpc.aio.insecure_channel(target) as channel:
            stub = tickets_pb2_grpc.TicketsServiceStub(channel)  # type: ignore[no-untyped-call]
            begun = time.perf_counter()
            await stub.ListTeamQueue(pb.ListTeamQueueRequest(team="team-03"), metadata=metadata)
            first_page = (time.perf_counter() - begun) * 1000
        rss = psutil.Process(process.pid).memory_info().rss / 1024**2
        await stop_gracefully(process, log)
        return ready, first_page, rss
    finally:
        kill_leftovers(started)


def median_start(starts: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return (
        statistics.median(s[0] for s in starts),
        statistics.median(s[1] for s in starts),
        statistics.median(s[2] for s in starts),
    )


async def measure_starts(run: TicketsRun, seeded: Path, scratch: Path, rounds: int = 3) -> None:
    """`serve` over an empty store (the baseline), then over the seeded one, `rounds`
    times in turn (medians: a process's start varies with the machine's load); the
    clock is the morning before the cases opened, so the scanner has nothing to do."""
    morning = NOW - timedelta(hours=4)
    empty: list[tuple[float, float, float]] = []
    full: list[tuple[float, float, float]] = []
    for i in range(rounds):
        empty.append(await start_serve(scratch / "empty", scratch / f"empty-{i}", morning))
        full.append(await start_serve(seeded, scratch / f"seeded-{i}", morning))
    run.start_empty, run.start_seeded = median_start(empty), median_start(full)
    print(f"[tickets] serve over an empty store: ready in {run.start_empty[0]:.1f} s", flush=True)
    print(
        f"[tickets] serve over {run.cases:,} cases: ready in {run.start_seeded[0]:.1f} s, "
        f"{run.start_seeded[2]:.0f} MiB",
        flush=True,
    )


# -- case commands over gRPC ----------------------------------------------------------------


async def case_cycles(
    target: str,
    metadata: Metadata,
    contact_id: str,
    clients: int,
    commands: int,
    by_command: dict[str, list[float]],
) -> Throughput:
    """`clients` concurrent callers working cases through open, reply, note, pending,
    customer reply, solved, until `commands` were answered in all."""
    channels = [service_channel(target) for _ in range(min(clients, 4))]
    stubs = [tickets_pb2_grpc.TicketsServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    remaining = commands
    latencies: list[float] = []

    async def call(kind: str, method: Any, request: Any) -> Any:
        started = time.perf_counter()
        reply = await method(request, metadata=metadata)
        ms = (time.perf_counter() - started) * 1000
        latencies.append(ms)
        by_command.setdefault(kind, []).append(ms)
        return reply

    async def client(i: int) -> None:
        nonlocal remaining
        stub = stubs[i % len(stubs)]
        n = 0
        while remaining > 0:
            n += 1
            opened = await call(
                "OpenCase",
                stub.OpenCase,
                pb.OpenCaseRequest(
                    customer_id=contact_id,
                    channel=pb.CHANNEL_EMAIL,
                    subject=f"Bench case {i}-{n}",
                    priority=pb.PRIORITY_NORMAL,
                    team=TEAMS[i % len(TEAMS)],
                ),
            )
            case_id = opened.result.id
            steps: list[tuple[str, Any, Any]] = [
                (
                    "ReplyToCase",
                    stub.ReplyToCase,
                    pb.ReplyToCaseRequest(
                        case_id=case_id, author_kind=pb.AUTHOR_KIND_AGENT, body="Looking"
                    ),
                ),
                (
                    "AddInternalNote",
                    stub.AddInternalNote,
                    pb.AddInternalNoteRequest(case_id=case_id, body="Known issue"),
                ),
                (
                    "ChangeCaseStatus",
                    stub.ChangeCaseStatus,
                    pb.ChangeCaseStatusRequest(case_id=case_id, status=pb.CASE_STATUS_PENDING),
                ),
                (
                    "ReplyToCase",
                    stub.ReplyToCase,
                    pb.ReplyToCaseRequest(
                        case_id=case_id, author_kind=pb.AUTHOR_KIND_CUSTOMER, body="Thanks"
                    ),
                ),
                (
                    "ChangeCaseStatus",
                    stub.ChangeCaseStatus,
                    pb.ChangeCaseStatusRequest(case_id=case_id, status=pb.CASE_STATUS_SOLVED),
                ),
            ]
            remaining -= 1
            for kind, method, request in steps:
                if remaining <= 0:
                    break
                remaining -= 1
                await call(kind, method, request)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    for c in channels:
        await c.close()
    return Throughput(clients, len(latencies), elapsed, latencies)


async def measure_commands(run: TicketsRun, scratch: Path) -> None:
    identity = ensure_identity(scratch / "identity")
    ports = {name: free_port() for name in ("cg", "ch", "tg", "th")}
    common = {
        "CRM_CONTACTS_GRPC_PORT": str(ports["cg"]),
        "CRM_CONTACTS_HTTP_PORT": str(ports["ch"]),
        "CRM_TICKETS_GRPC_PORT": str(ports["tg"]),
        "CRM_TICKETS_HTTP_PORT": str(ports["th"]),
        "CRM_CONTACTS_GRPC_TARGET": f"127.0.0.1:{ports['cg']}",
        "CRM_LOYALTY_GRPC_TARGET": f"127.0.0.1:{free_port()}",
        "CRM_TICKETS_SLA_INTERVAL": "5",
    }
    started: list[subprocess.Popen[bytes]] = []
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    contacts = start_process(
        "contacts",
        "serve",
        clean_environment(scratch / "contacts", identity, **common),
        logs / "contacts.log",
        started,
    )
    tickets = start_process(
        "tickets",
        "serve",
        clean_environment(scratch / "tickets", identity, **common),
        logs / "tickets.log",
        started,
    )
    target = f"127.0.0.1:{ports['tg']}"
    try:
        await wait_serving(
            f"127.0.0.1:{ports['cg']}", f"http://127.0.0.1:{ports['ch']}", contacts,
            logs / "contacts.log",
        )  # fmt: skip
        await wait_serving(target, f"http://127.0.0.1:{ports['th']}", tickets, logs / "tickets.log")
        metadata = grpc_auth(identity.mint("service", subject="bench-agent", lifetime=6 * 3600))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['cg']}") as channel:
            person = await contacts_pb2_grpc.ContactsServiceStub(channel).CreatePerson(  # type: ignore[no-untyped-call]
                contacts_pb2.CreatePersonRequest(given_name="Bench", family_name="Customer"),
                metadata=metadata,
            )
        contact_id = person.result.id
        # Warm up connections and code paths.
        await case_cycles(target, metadata, contact_id, 2, 24, {})
        single = max(12, run.commands // 5)
        print(f"[tickets] case commands, 1 client ({single})", flush=True)
        run.single = await case_cycles(target, metadata, contact_id, 1, single, run.by_command)
        print(f"[tickets]   {run.single.per_second:,.0f} commands/s", flush=True)
        print(f"[tickets] case commands, 16 clients ({run.commands})", flush=True)
        run.sixteen = await case_cycles(
            target, metadata, contact_id, 16, run.commands, run.by_command
        )
        print(f"[tickets]   {run.sixteen.per_second:,.0f} commands/s", flush=True)
    finally:
        await stop_gracefully(tickets, logs / "tickets.log")
        await stop_gracefully(contacts, logs / "contacts.log")
        kill_leftovers(started)


# -- the report ---------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GiB "
        f"RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def render(run: TicketsRun) -> str:
    assert run.single and run.sixteen
    b = run.baseline
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    def p50(values: list[float]) -> float:
        return percentile(values, 50)

    lines = [
        BEGIN,
        "## Tickets",
        "",
        f"`python -m bench.tickets`, {when}; {machine()}. SQLite; the whole stack and",
        "the load generator share the cores. Ratios are against the bare-save",
        "baseline of the same run. Load average (1 min) at the start and end: "
        + " / ".join(f"{x:.1f}" for x in run.load)
        + ".",
        "",
        "### Case commands (gRPC, closed loop)",
        "",
        "Each client works cases through open (contact checked over gRPC, the tier",
        "asked of an unreachable loyalty: the default at once), agent reply, internal",
        "note, pending, customer reply, solved.",
        "",
        "| baseline: bare `save()` loop, saves/s | gRPC, 1 client | gRPC, 16 clients "
        "| p50 / p99 latency, 16 clients |",
        "|---|---|---|---|",
        f"| {b:,.0f} ({run.baseline_before:,.0f} before, {run.baseline_after:,.0f} after) | "
        f"{run.single.per_second:,.0f} ({run.single.per_second / b:.2f}x) | "
        f"**{run.sixteen.per_second:,.0f} ({run.sixteen.per_second / b:.2f}x)** | "
        f"{run.sixteen.percentile(50):.1f} / {run.sixteen.percentile(99):.1f} ms |",
        "",
        "| command | calls | p50 | p99 |",
        "|---|---|---|---|",
    ]
    for kind, values in sorted(run.by_command.items()):
        lines.append(
            f"| {kind} | {len(values)} | {percentile(values, 50):.1f} ms | "
            f"{percentile(values, 99):.1f} ms |"
        )
    empty, seeded = run.start_empty, run.start_seeded
    lines += [
        "",
        f"### SLA deadlines among {run.cases:,} open cases (query tables, in process)",
        "",
        "| what | time |",
        "|---|---|",
        f"| seeding the store ({run.cases:,} cases, 1,000 per command) | "
        f"{run.seed_seconds:.1f} s |",
        f"| building the query tables from the whole log (once: a new store or a new "
        f"version of the tables) | {run.build_seconds:.1f} s, {run.build_mib:.0f} MiB |",
        f"| **reading the deadlines due now** (`TicketsQuery.due`, {run.due_found:,} due, "
        f"pages of {DUE_PAGE}), p50 of 20 | **{p50(run.due_ms):.2f} ms** |",
        f"| a page of a team's queue (50 of about {run.cases // 12:,}), p50 | "
        f"{p50(run.queue_ms):.1f} ms |",
        f"| a page of the cases at risk within 60 minutes, p50 | {p50(run.at_risk_ms):.1f} ms |",
        f"| a team's SLA compliance over 30 days, p50 | {p50(run.compliance_ms):.1f} ms |",
        "",
        "### `crm-tickets serve` started over the store",
        "",
        "Medians of three starts over each store, in turn.",
        "",
        "| store | ready in | first team queue page over gRPC | RSS after it |",
        "|---|---|---|---|",
        f"| empty (baseline) | {empty[0]:.1f} s | {empty[1]:.0f} ms (no case) | "
        f"{empty[2]:.0f} MiB |",
        f"| **{run.cases:,} open cases** | **{seeded[0]:.1f} s "
        f"({seeded[0] / empty[0]:.2f}x)** | {seeded[1]:.0f} ms (50 cases loaded) | "
        f"**{seeded[2]:.0f} MiB ({seeded[2] / empty[2]:.2f}x)** |",
        "",
        "The query tables live in the service's own database and follow its event",
        "log; a process opens them where the last one left them and applies only",
        "what was stored since, so it is ready as fast over 100,000 cases as over",
        "none, and holds no case beyond a bounded cache. The scanner reads the due",
        "deadlines by an index on due time; the lists read one page by the key of",
        "the page before; compliance is summed in SQL.",
        END,
    ]
    return "\n".join(lines)


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def run(args: argparse.Namespace) -> TicketsRun:
    result = TicketsRun(args.cases, args.commands)
    result.load.append(os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="crm-bench-tickets-") as tmp:
        scratch = Path(tmp)
        print(f"[tickets] baseline (bare save loop, {args.baseline} saves)", flush=True)
        result.baseline_before = bare_save_loop(scratch / "baseline-1", "sqlite", args.baseline)
        print(f"[tickets]   {result.baseline_before:,.0f} saves/s", flush=True)
        asyncio.run(measure_commands(result, scratch / "commands"))
        result.baseline_after = bare_save_loop(scratch / "baseline-2", "sqlite", args.baseline)
        print(f"[tickets]   baseline after: {result.baseline_after:,.0f} saves/s", flush=True)
        if args.cases > 0:
            measure_deadlines(result, scratch / "deadlines", NOW)
            asyncio.run(measure_starts(result, scratch / "deadlines", scratch / "starts"))
    result.load.append(os.getloadavg()[0])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tickets", description=__doc__)
    parser.add_argument("--baseline", type=int, default=2000)
    parser.add_argument("--commands", type=int, default=3000, help="the 16-client run's count")
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    text = render(run(args))
    print(text)
    record(text, Path(args.out))


if __name__ == "__main__":
    main()
