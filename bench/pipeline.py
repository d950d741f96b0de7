"""The pipeline service's benchmarks: command throughput and forecast latency.

Per event store, against a real `crm-pipeline serve` process:

- the baseline: the `eventsourcing` library's bare `Application.save()`
  loop on the same store, before and after the service runs;
- a seeded store: `opportunities` deals (default 100,000) with realistic
  histories (stage moves forward and back, wins, losses, several owners,
  currencies, pipelines and two years of close dates), written in large
  batches through the pipeline's own command bus and event mapping into the
  store the process then opens, so the process reads real stored events;
- the process's start: from launch until it answers health checks, which
  includes applying to its query tables what they do not hold yet (on a
  freshly seeded store, the whole log), and its memory then;
- query latency over the seeded deals through gRPC: `GetForecast` with varied
  periods, owners, pipelines and date ranges, and `GetFunnel`; beside them
  two figures to relate them to: `GetOpportunity` (one deal by id, read from
  the event store) on the same server, and one plain Python pass summing the
  same deals' amounts by month, owner and category in the benchmark process;
- command throughput through gRPC, 1 and 16 concurrent clients (closed loop),
  each client working deals through a sales cycle: open, move to the next
  stage, change the amount, move on, win.

Every call carries a sales user's real signed token (a development identity
made for the run), so the numbers include authentication and authorization.

Numbers are recorded, never asserted.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc

from bench import postgres as bench_postgres
from bench.baseline import bare_save_loop
from bench.load import Throughput, percentile
from crm.pipeline.v1 import pipeline_pb2 as pb
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_common.commands import CommandBus, CommandContext, UnitOfWork
from crm_common.money import Money
from crm_common.settings import Settings
from crm_deploy.identity import ensure_identity
from crm_deploy.process import (
    ManagedProcess,
    all_probes,
    free_port,
    grpc_health_probe,
    http_probe,
)
from crm_pipeline import validation
from crm_pipeline.application import create_application
from crm_pipeline.domain import Opportunity, Pipeline
from crm_pipeline.inputs import StageInput

MIB = 1024 * 1024

# Two pipelines of a sales team: new business and renewals.
NEW_BUSINESS = [
    StageInput("qualify", "Qualify", "10", "pipeline"),
    StageInput("discover", "Discovery", "20", "pipeline"),
    StageInput("propose", "Proposal", "40", "best_case"),
    StageInput("negotiate", "Negotiation", "70", "commit"),
    StageInput("verbal", "Verbal yes", "90", "commit"),
    StageInput("won", "Won", "100", "closed_won"),
    StageInput("lost", "Lost", "0", "closed_lost"),
]
RENEWALS = [
    StageInput("review", "Account review", "50", "best_case"),
    StageInput("quote", "Quote sent", "80", "commit"),
    StageInput("parked", "Parked", "5", "omitted"),
    StageInput("renewed", "Renewed", "100", "closed_won"),
    StageInput("churned", "Churned", "0", "closed_lost"),
]
OWNERS = [f"rep-{i:02d}" for i in range(1, 41)]
CURRENCIES = ["EUR"] * 6 + ["USD"] * 3 + ["GBP"]


@dataclass
class Latencies:
    """Milliseconds of each call of one kind."""

    values_ms: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.values_ms, q)

    @property
    def count(self) -> int:
        return len(self.values_ms)


@dataclass
class PipelineRun:
    store: str
    opportunities: int
    commands: int
    baseline_before: float = 0.0
    baseline_after: float = 0.0
    seed_seconds: float = 0.0
    seed_events: int = 0
    startup_seconds: float = 0.0
    ready_rss_mib: float = 0.0
    loaded_rss_mib: float = 0.0
    forecast: Latencies = field(default_factory=Latencies)
    forecast_rows: list[int] = field(default_factory=list)
    # The same calls split: one owner's forecast, and the whole team's.
    forecast_owner: Latencies = field(default_factory=Latencies)
    forecast_team: Latencies = field(default_factory=Latencies)
    funnel: Latencies = field(default_factory=Latencies)
    get_opportunity: Latencies = field(default_factory=Latencies)
    python_pass: Latencies = field(default_factory=Latencies)
    single: Throughput | None = None
    sixteen: Throughput | None = None
    by_command: dict[str, Latencies] = field(default_factory=dict)

    @property
    def baseline(self) -> float:
        return statistics.fmean([self.baseline_before, self.baseline_after])


# -- the store ---------------------------------------------------------------------------


def _settings(data_dir: Path, store: str, schema: str) -> Settings:
    return Settings(
        service="pipeline",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store=store,
        postgres=bench_postgres.settings(schema) if store == "postgres" else {},
    )


def _drop_schema(schema: str) -> None:
    bench_postgres.drop_schema(schema)


# -- seeding -------------------------------------------------------------------------------


@dataclass
class Seeded:
    pipeline_ids: list[str]
    first_pipeline: Pipeline
    deal_ids: list[str]
    events: int
    seconds: float
    # (close month, owner, stage id, pipeline id, amount): the plain records
    # of the Python pass the queries are compared with.
    records: list[tuple[str, str, str, str, Decimal]]


def _amount(rng: random.Random, currency: str) -> str:
    cents = rng.choice([rng.randrange(50_000, 2_000_000), rng.randrange(2_000_000, 50_000_000)])
    return f"{cents // 100}.{cents % 100:02d}"


def _one_deal(rng: random.Random, pipeline: Pipeline, now: datetime) -> Opportunity:
    """A deal opened within the last two years, with a history up to `now`."""
    opened = now - timedelta(minutes=rng.randrange(60 * 24 * 2, 60 * 24 * 730))
    currency = rng.choice(CURRENCIES)
    deal = Opportunity.open(
        pipeline=pipeline,
        name=f"Deal {rng.randrange(10**6)}",
        customer_id=f"customer-{rng.randrange(20_000)}",
        owner=rng.choice(OWNERS),
        amount=Money.of(_amount(rng, currency), currency),
        expected_close_date=opened.date() + timedelta(days=rng.randrange(7, 180)),
        at=opened,
    )
    open_stages = [s for s in pipeline.order if pipeline.stages[s].is_open]
    at = opened
    steps = rng.choice([0, 1, 1, 2, 2, 3, 4])
    for _ in range(steps):
        at += timedelta(hours=rng.randrange(4, 24 * 20))
        if at >= now:
            return deal
        here = open_stages.index(deal.stage_id)
        if rng.random() < 0.15 and here > 0:
            target = open_stages[here - 1]  # back a step: a regression
        else:
            target = open_stages[min(here + 1, len(open_stages) - 1)]
        if target != deal.stage_id:
            deal.change_stage(pipeline, target, at)
    at += timedelta(hours=rng.randrange(4, 24 * 30))
    roll = rng.random()
    if at < now and roll < 0.35:
        deal.win(pipeline, at)
    elif at < now and roll < 0.6:
        deal.lose(pipeline, rng.choice(["price", "timing", "competitor", "no decision"]), at)
    return deal


def seed(settings: Settings, count: int, *, batch: int = 1000, seed: int = 20260301) -> Seeded:
    """Writes two pipelines and `count` deals through the pipeline's command bus
    and event mapping, `batch` deals per command (one transaction each)."""
    rng = random.Random(seed)
    app = create_application(settings)
    bus = CommandBus(app, "pipeline")
    ctx = CommandContext("SeedOpportunities", actor="bench", client="bench")
    now = datetime.now(UTC)
    started = time.perf_counter()
    events = 0
    deal_ids: list[str] = []
    records: list[tuple[str, str, str, str, Decimal]] = []
    pending: list[Future[Any]] = []
    try:
        pipelines = [
            Pipeline.define(*validation.new_pipeline("New business", NEW_BUSINESS)),
            Pipeline.define(*validation.new_pipeline("Renewals", RENEWALS)),
        ]
        for p in pipelines:
            events += len(p.pending_events)
        bus.execute(
            CommandContext("DefinePipeline", actor="bench", client="bench"),
            lambda uow: _add_all(uow, pipelines),
        )
        while len(deal_ids) < count:
            deals = [
                _one_deal(rng, pipelines[0] if rng.random() < 0.7 else pipelines[1], now)
                for _ in range(min(batch, count - len(deal_ids)))
            ]
            for d in deals:
                events += len(d.pending_events)
                deal_ids.append(str(d.id))
                day = d.closed_on if d.closed_on is not None else d.expected_close_date
                records.append(
                    (f"{day:%Y-%m}", d.owner, d.stage_id, d.pipeline_id, d.amount.amount)
                )
            # Build the next batch while the writer thread stores this one.
            pending.append(bus.submit(ctx, lambda uow, deals=deals: _add_all(uow, deals)))
            if len(pending) > 2:
                pending.pop(0).result()
        for future in pending:
            future.result()
        seconds = time.perf_counter() - started
    finally:
        bus.close()
        app.close()
    return Seeded([str(p.id) for p in pipelines], pipelines[0], deal_ids, events, seconds, records)


def _add_all(uow: UnitOfWork, aggregates: list[Any]) -> Any:
    for aggregate in aggregates:
        uow.add(aggregate)
    return aggregates[0]


def python_pass(
    records: list[tuple[str, str, str, str, Decimal]], weights: dict[str, Any]
) -> float:
    """One plain pass: amounts and weighted amounts summed by month, owner and
    category; milliseconds."""
    started = time.perf_counter()
    sums: dict[tuple[str, str, str], list[Decimal]] = defaultdict(lambda: [Decimal(0), Decimal(0)])
    for month, owner, stage, pipeline_id, amount in records:
        category, probability = weights[pipeline_id][stage]
        row = sums[(month, owner, category)]
        row[0] += amount
        row[1] += amount * probability / 100
    return (time.perf_counter() - started) * 1000


def stage_weights(pipeline_ids: list[str]) -> dict[str, dict[str, tuple[str, Decimal]]]:
    return {
        pid: {s.stage_id: (s.category, Decimal(s.probability)) for s in stages}
        for pid, stages in zip(pipeline_ids, (NEW_BUSINESS, RENEWALS), strict=True)
    }


# -- the serve process --------------------------------------------------------------------


Metadata = tuple[tuple[str, str], ...]


def serve_process(scratch: Path, store: str, schema: str) -> tuple[ManagedProcess, str, Metadata]:
    """`crm-pipeline serve` on free ports over the seeded store, trusting a development
    identity; returns it, its gRPC target and the metadata of a sales user's calls."""
    grpc_port, http_port = free_port(), free_port()
    identity = ensure_identity(scratch / "identity")
    token = identity.mint("sales", subject="bench-rep", client="bench", lifetime=6 * 3600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "OTEL_", "POSTGRES_"))}
    env.update(identity.env())
    env.update(
        CRM_DATA_DIR=str(scratch),
        CRM_EVENT_STORE=store,
        CRM_PIPELINE_GRPC_PORT=str(grpc_port),
        CRM_PIPELINE_HTTP_PORT=str(http_port),
    )
    if store == "postgres":
        env.update(bench_postgres.env(schema))
    target = f"127.0.0.1:{grpc_port}"
    process = ManagedProcess(
        "pipeline-api",
        [str(Path(sys.executable).with_name("crm-pipeline")), "serve"],
        log_path=scratch / "logs" / "pipeline-api.log",
        pid_path=scratch / "run" / "pipeline-api.pid",
        probe=all_probes(
            grpc_health_probe(target), http_probe(f"http://127.0.0.1:{http_port}/healthz")
        ),
        env=env,
        cwd=scratch,
        ready_timeout=600,
    )
    return process, target, (("authorization", f"Bearer {token}"),)


def rss_mib(process: ManagedProcess) -> float:
    return (process.rss_bytes() or 0) / MIB


# -- queries ------------------------------------------------------------------------------


def forecast_requests(
    count: int, pipeline_ids: list[str], *, seed: int = 7
) -> list[pb.GetForecastRequest]:
    """Varied questions a sales manager asks: by month or quarter; the whole
    team or one rep; one pipeline or all; this quarter, the next two, a year,
    or everything."""
    rng = random.Random(seed)
    today = date.today()
    quarter_start = date(today.year, 3 * ((today.month - 1) // 3) + 1, 1)
    ranges: list[tuple[str, str]] = [
        ("", ""),
        (quarter_start.isoformat(), (quarter_start + timedelta(days=91)).isoformat()),
        (today.isoformat(), (today + timedelta(days=182)).isoformat()),
        ((today - timedelta(days=365)).isoformat(), today.isoformat()),
        (date(today.year, 1, 1).isoformat(), date(today.year, 12, 31).isoformat()),
    ]
    requests = []
    for _ in range(count):
        start, end = rng.choice(ranges)
        requests.append(
            pb.GetForecastRequest(
                period=rng.choice([pb.FORECAST_PERIOD_MONTH, pb.FORECAST_PERIOD_QUARTER]),
                start=start,
                end=end,
                owner=rng.choice(OWNERS) if rng.random() < 0.6 else "",
                pipeline_id=rng.choice(pipeline_ids) if rng.random() < 0.5 else "",
            )
        )
    return requests


async def timed(call: Any, request: Any, into: Latencies, metadata: Metadata) -> Any:
    started = time.perf_counter()
    reply = await call(request, metadata=metadata)
    into.values_ms.append((time.perf_counter() - started) * 1000)
    return reply


async def measure_queries(
    target: str,
    metadata: Metadata,
    run: PipelineRun,
    seeded: Seeded,
    *,
    forecasts: int,
    funnels: int,
    gets: int,
) -> None:
    """One client, one call at a time: latency, not throughput."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        rng = random.Random(11)
        # Warm up the connection and the server's code paths.
        await stub.GetOpportunity(
            pb.GetOpportunityRequest(id=seeded.deal_ids[0]), metadata=metadata
        )
        await stub.GetForecast(pb.GetForecastRequest(), metadata=metadata)
        for _ in range(gets):
            deal_id = seeded.deal_ids[rng.randrange(len(seeded.deal_ids))]
            await timed(
                stub.GetOpportunity,
                pb.GetOpportunityRequest(id=deal_id),
                run.get_opportunity,
                metadata,
            )
        for request in forecast_requests(forecasts, seeded.pipeline_ids):
            reply = await timed(stub.GetForecast, request, run.forecast, metadata)
            run.forecast_rows.append(len(reply.rows))
            split = run.forecast_owner if request.owner else run.forecast_team
            split.values_ms.append(run.forecast.values_ms[-1])
        for i in range(funnels):
            request = pb.GetFunnelRequest(pipeline_id=seeded.pipeline_ids[i % 2])
            await timed(stub.GetFunnel, request, run.funnel, metadata)


# -- commands -----------------------------------------------------------------------------


async def sales_cycles(
    target: str,
    metadata: Metadata,
    pipeline_id: str,
    clients: int,
    commands: int,
    by_command: dict[str, Latencies],
) -> Throughput:
    """`clients` concurrent sales reps, each taking deals through a sales cycle
    (open, move to proposal, change the amount, move to negotiation, win), one
    command after the other, until `commands` were answered in all."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(clients, 4))]
    stubs = [pipeline_pb2_grpc.PipelineServiceStub(c) for c in channels]
    expected = (date.today() + timedelta(days=45)).isoformat()
    counter = itertools.count()
    remaining = commands
    latencies: list[float] = []

    async def call(kind: str, method: Any, request: Any) -> Any:
        started = time.perf_counter()
        reply = await method(request, metadata=metadata)
        elapsed = (time.perf_counter() - started) * 1000
        latencies.append(elapsed)
        by_command.setdefault(kind, Latencies()).values_ms.append(elapsed)
        return reply

    async def client(i: int) -> None:
        nonlocal remaining
        stub = stubs[i % len(stubs)]
        owner = OWNERS[i % len(OWNERS)]
        while remaining > 0:
            n = next(counter)
            remaining -= 1
            opened = await call(
                "OpenOpportunity",
                stub.OpenOpportunity,
                pb.OpenOpportunityRequest(
                    pipeline_id=pipeline_id,
                    name=f"Bench deal {n}",
                    customer_id=f"bench-customer-{n % 997}",
                    owner=owner,
                    amount=pb.Money(amount=f"{1000 + n % 9000}.00", currency="EUR"),
                    expected_close_date=expected,
                    kind=pb.OPPORTUNITY_KIND_NEW_BUSINESS,
                ),
            )
            deal_id = opened.result.id
            steps: list[tuple[str, Any, Any]] = [
                (
                    "MoveOpportunity",
                    stub.MoveOpportunity,
                    pb.MoveOpportunityRequest(opportunity_id=deal_id, stage_id="propose"),
                ),
                (
                    "ChangeAmount",
                    stub.ChangeAmount,
                    pb.ChangeAmountRequest(
                        opportunity_id=deal_id,
                        amount=pb.Money(amount=f"{1200 + n % 9000}.50", currency="EUR"),
                    ),
                ),
                (
                    "MoveOpportunity",
                    stub.MoveOpportunity,
                    pb.MoveOpportunityRequest(opportunity_id=deal_id, stage_id="negotiate"),
                ),
                (
                    "WinOpportunity",
                    stub.WinOpportunity,
                    pb.WinOpportunityRequest(opportunity_id=deal_id),
                ),
            ]
            for kind, method, request in steps:
                if remaining <= 0:
                    break
                remaining -= 1
                await call(kind, method, request)

    # Warm up the connections and the server's write path.
    for stub in stubs:
        await stub.GetPipeline(pb.GetPipelineRequest(id=pipeline_id), metadata=metadata)
    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    for c in channels:
        await c.close()
    return Throughput(clients, len(latencies), elapsed, latencies)


# -- one store ------------------------------------------------------------------------------


def run_pipeline_bench(
    scratch: Path,
    store: str,
    *,
    opportunities: int = 100_000,
    commands: int = 3000,
    baseline: int = 2000,
    forecasts: int = 300,
    funnels: int = 40,
    gets: int = 300,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> PipelineRun:
    """Seeds a fresh store, starts `crm-pipeline serve` over it, measures; see
    the module's docstring. `commands` is the 16-client run's count, the
    single client runs a fifth of it."""
    run = PipelineRun(store, opportunities, commands)
    scratch.mkdir(parents=True, exist_ok=True)
    schema = f"bench_pipeline_{secrets.token_hex(4)}"
    schemas = [schema, f"{schema}_baseline1", f"{schema}_baseline2"]
    data_dir = scratch / f"pipeline-{store}"
    try:
        log(f"[{store}] pipeline baseline (bare save loop, {baseline} saves)")
        run.baseline_before = bare_save_loop(
            scratch / f"pipeline-baseline-{store}-1", store, baseline, schemas[1]
        )
        log(f"[{store}]   {run.baseline_before:,.0f} saves/s")
        log(f"[{store}] seeding {opportunities:,} opportunities")
        seeded = seed(_settings(data_dir, store, schema), opportunities)
        run.seed_seconds, run.seed_events = seeded.seconds, seeded.events
        log(f"[{store}]   {seeded.events:,} events in {seeded.seconds:.1f} s")
        weights = stage_weights(seeded.pipeline_ids)
        run.python_pass.values_ms = [python_pass(seeded.records, weights) for _ in range(5)]
        process, target, metadata = serve_process(data_dir, store, schema)
        started = time.perf_counter()
        process.start()
        try:
            process.wait_ready()
            run.startup_seconds = time.perf_counter() - started
            run.ready_rss_mib = rss_mib(process)
            log(
                f"[{store}]   crm-pipeline serve ready in {run.startup_seconds:.1f} s, "
                f"{run.ready_rss_mib:.0f} MiB"
            )
            log(f"[{store}] queries: {forecasts} forecasts, {funnels} funnels, {gets} gets")
            asyncio.run(
                measure_queries(
                    target, metadata, run, seeded, forecasts=forecasts, funnels=funnels, gets=gets
                )
            )
            log(
                f"[{store}]   forecast p50 {run.forecast.p(50):.1f} ms, "
                f"p99 {run.forecast.p(99):.1f} ms; funnel p50 {run.funnel.p(50):.1f} ms; "
                f"GetOpportunity p50 {run.get_opportunity.p(50):.1f} ms"
            )
            single = max(5, commands // 5)
            log(f"[{store}] sales-cycle commands, 1 client ({single})")
            run.single = asyncio.run(
                sales_cycles(target, metadata, seeded.pipeline_ids[0], 1, single, run.by_command)
            )
            log(f"[{store}]   {run.single.per_second:,.0f} commands/s")
            log(f"[{store}] sales-cycle commands, 16 clients ({commands})")
            run.sixteen = asyncio.run(
                sales_cycles(target, metadata, seeded.pipeline_ids[0], 16, commands, run.by_command)
            )
            log(f"[{store}]   {run.sixteen.per_second:,.0f} commands/s")
            run.loaded_rss_mib = rss_mib(process)
        finally:
            process.stop()
        run.baseline_after = bare_save_loop(
            scratch / f"pipeline-baseline-{store}-2", store, baseline, schemas[2]
        )
        log(f"[{store}]   baseline after: {run.baseline_after:,.0f} saves/s")
    finally:
        if store == "postgres":
            for name in schemas:
                _drop_schema(name)
    return run


# -- the report ---------------------------------------------------------------------------------


def render_pipeline(runs: list[PipelineRun]) -> str:
    """The pipeline's section of docs/benchmarks.md."""
    if not runs:
        return ""
    first = runs[0]
    lines = [
        "## Pipeline",
        "",
        f"A fresh store per run is seeded with {first.opportunities:,} opportunities in two",
        "pipelines (new business with five open stages, renewals with three), 40 owners,",
        "three currencies and close dates over two years; about a third won, a quarter",
        "lost, some moved back a stage. They are written in batches of 1,000 deals per",
        "command through the service's own command bus, so the store holds the events",
        "the service writes. Then `crm-pipeline serve` starts over that store: it first",
        "applies to its query tables whatever of the log they do not hold yet (on a",
        "freshly seeded store, all of it) before it answers health checks.",
        "",
        "| store | seeded events | seeding | serve ready after | RSS ready | RSS after the load |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.store} | {r.seed_events:,} | {r.seed_seconds:.1f} s | "
            f"{r.startup_seconds:.1f} s | {r.ready_rss_mib:.0f} MiB | "
            f"{r.loaded_rss_mib:.0f} MiB |"
        )
    lines += [
        "",
        f"### Queries over {first.opportunities:,} opportunities (gRPC, one client)",
        "",
        f"`GetForecast`: {first.forecast.count} questions of varied shape (by month or",
        "quarter; the whole team or one owner; one pipeline or both; this quarter, the",
        "next six months, the last year, this calendar year or all time), answered",
        "with rows by period, owner, forecast category and currency. `GetFunnel`: each",
        "pipeline in turn. For scale: `GetOpportunity` (one deal by id, read from the",
        "event store) on the same server, and one plain Python pass in the benchmark",
        "process summing the same deals' amounts and weighted amounts by month, owner",
        "and category from a list of tuples.",
        "",
        "| store | forecast p50 / p99 | one owner's / the team's, p50 / p99 | "
        "rows per answer (median / max) | funnel p50 / p99 | `GetOpportunity` p50 / p99 | "
        "Python pass over the deals |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rows = sorted(r.forecast_rows) or [0]
        lines.append(
            f"| {r.store} | {r.forecast.p(50):.1f} / **{r.forecast.p(99):.1f} ms** | "
            f"{r.forecast_owner.p(50):.1f} / {r.forecast_owner.p(99):.1f} ms; "
            f"{r.forecast_team.p(50):.1f} / {r.forecast_team.p(99):.1f} ms | "
            f"{rows[len(rows) // 2]:,} / {rows[-1]:,} | "
            f"{r.funnel.p(50):.1f} / {r.funnel.p(99):.1f} ms | "
            f"{r.get_opportunity.p(50):.1f} / {r.get_opportunity.p(99):.1f} ms | "
            f"{r.python_pass.p(50):.0f} ms |"
        )
    lines += [
        "",
        "The read model keeps the forecast's sums by close month and day, owner,",
        "pipeline, stage and currency, and the funnel's per stage, up to date as it",
        "applies events, so a query adds up sums instead of visiting every deal; the",
        "weights come from the stages at query time. The team's forecast over all time",
        "by month is the largest answer (tens of thousands of rows); building its reply",
        "costs as much as computing it. Target: forecast p99 under 200 ms.",
        "",
        "### Commands (gRPC, closed loop)",
        "",
        "Each client works deals through a sales cycle, one command after the other:",
        "`OpenOpportunity`, `MoveOpportunity` to proposal, `ChangeAmount`,",
        "`MoveOpportunity` to negotiation, `WinOpportunity`; on the seeded store, while",
        "the server holds every deal in its read model. The baseline is the bare",
        "`Application.save()` loop on the same store in the same run, as for contacts.",
        "",
        "| store | baseline: bare `save()` loop, saves/s | 1 client, commands/s | "
        "16 clients, commands/s | 16 clients / baseline | p50 / p99 latency, 16 clients |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        assert r.single and r.sixteen
        lines.append(
            f"| {r.store} | {r.baseline:,.0f} ({r.baseline_before:,.0f} before, "
            f"{r.baseline_after:,.0f} after) | {r.single.per_second:,.0f} "
            f"({r.single.per_second / r.baseline:.2f}x) | {r.sixteen.per_second:,.0f} | "
            f"**{r.sixteen.per_second / r.baseline:.2f}x** | "
            f"{r.sixteen.percentile(50):.1f} / {r.sixteen.percentile(99):.1f} ms |"
        )
    kinds = sorted({k for r in runs for k in r.by_command})
    if kinds:
        lines += [
            "",
            "Latency by command over both client counts, p50 / p99:",
            "",
            "| store | " + " | ".join(f"`{k}`" for k in kinds) + " |",
            "|---|" + "---|" * len(kinds),
        ]
        for r in runs:
            cells = [
                f"{r.by_command[k].p(50):.1f} / {r.by_command[k].p(99):.1f} ms"
                if k in r.by_command
                else ""
                for k in kinds
            ]
            lines.append(f"| {r.store} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
