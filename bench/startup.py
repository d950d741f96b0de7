"""Startup over a large store (`python -m bench.startup`): how long an API
process takes from spawn to ready, and how much memory it holds, over a store
of about 10,000 events and one of about 1,000,000.

The query sides live in the services' own databases (`crm_common.querystore`):
a process opens its tables and applies only what was stored since they were
last brought up to date, so neither its start nor its memory should depend on
the size of the history. Per service (contacts, pipeline) and event store:

- a store is written through the service's own domain classes and
  application, many aggregates per save (contacts: 100 persons and companies
  per save, each with four interactions; pipeline: `bench.pipeline.seed`,
  1,000 deals per command with their stage moves, wins and losses);
- its query tables are built once: contacts in process, by the directory's
  own catch-up (`QuerySide.catch_up`); pipeline by starting `crm-pipeline
  serve` once and stopping it (its start applies the whole log the first time);
- then the real `serve` process starts on it (`crm_deploy.testing.start_process`),
  and is measured from spawn until it is ready (gRPC health SERVING and
  `GET /healthz` 200), then answers a first list or search query (its time is
  recorded too), and its resident memory (RSS) is read after that.

Targets: ready within 5 s at 1,000,000 events, and memory within 1.5x of the
10,000-event case. Numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench import postgres as bench_postgres
from bench.sections import record_section
from crm_common.settings import Settings
from crm_deploy.identity import Identity, ensure_identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    clean_environment,
    grpc_auth,
    kill_leftovers,
    start_process,
    stop_gracefully,
    wait_serving,
)

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
BEGIN = "<!-- startup benchmark: begin (written by python -m bench.startup) -->"
END = "<!-- startup benchmark: end -->"
#: 0: the process's own start, over an empty store (the baseline of the run).
SIZES = (0, 10_000, 1_000_000)

#: Contacts per save, and interactions logged on each before it is saved.
CONTACTS_PER_SAVE = 100
INTERACTIONS_PER_CONTACT = 4
#: Pipeline: about 3.3 events per seeded deal (see bench.pipeline).
PIPELINE_EVENTS_PER_DEAL = 3.3

GIVEN = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim"]
FAMILY = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"]


@dataclass
class StartupRun:
    service: str
    store: str
    events: int
    write_seconds: float = 0.0
    tables_seconds: float = 0.0
    tables_how: str = ""
    ready_seconds: float = 0.0
    #: Events the measured process applied at start, as it logged them (None: not logged).
    applied_at_start: int | None = None
    first_query_ms: float = 0.0
    first_query: str = ""
    rss_mib: float = 0.0
    #: The machine's 1-minute load average when the measured process was spawned.
    load: float | None = None
    notes: list[str] = field(default_factory=list)


# -- stores --------------------------------------------------------------------------------


def _settings(service: str, data_dir: Path, store: str, schema: str) -> Settings:
    return Settings(
        service=service,
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store=store,
        postgres=bench_postgres.settings(schema) if store == "postgres" else {},
    )


def write_contacts(settings: Settings, events: int, *, seed: int = 15) -> tuple[int, float]:
    """Persons (nine in ten) and companies with tags, emails, phone numbers and four
    interactions each, `CONTACTS_PER_SAVE` per save, until about `events` events are
    stored; returns the events written and the seconds it took."""
    from crm_contacts.application import create_application
    from crm_contacts.domain import (
        Channel,
        ChannelIdentity,
        Company,
        CompanyProfile,
        Interaction,
        InteractionKind,
        LifecycleStage,
        Person,
        PersonProfile,
    )

    rng = random.Random(seed)
    app = create_application(settings)
    per_contact = 1 + INTERACTIONS_PER_CONTACT
    now = datetime.now(UTC)
    written = made = 0
    started = time.perf_counter()
    try:
        while written < events:
            batch: list[Any] = []
            for _ in range(min(CONTACTS_PER_SAVE, max(1, (events - written) // per_contact))):
                made += 1
                tags = (f"region {rng.randrange(20)}",) + (
                    ("partner:acme",) if rng.random() < 0.01 else ()
                )
                contact: Any
                if made % 10 == 0:
                    contact = Company.register(
                        CompanyProfile(
                            name=f"{rng.choice(FAMILY)} {made} Ltd",
                            lifecycle_stage=LifecycleStage.LEAD,
                            tags=tags,
                        )
                    )
                else:
                    contact = Person.register(
                        PersonProfile(
                            given_name=rng.choice(GIVEN),
                            family_name=f"{rng.choice(FAMILY)}-{made}",
                            lifecycle_stage=LifecycleStage.LEAD,
                            tags=tags,
                            channels=(
                                ChannelIdentity(Channel.EMAIL, f"c{made}@example.com"),
                                ChannelIdentity(Channel.PHONE, f"+4144{made:07d}"),
                            ),
                        )
                    )
                for n in range(INTERACTIONS_PER_CONTACT):
                    at = now - timedelta(minutes=rng.randrange(1, 60 * 24 * 365))
                    contact.log_interaction(
                        Interaction(
                            f"{made}-{n}", InteractionKind.CALL, None, None, "call", at, "bench"
                        )
                    )
                batch.append(contact)
            app.save(*batch)
            written += len(batch) * per_contact
    finally:
        app.close()
    return written, time.perf_counter() - started


def build_contacts_tables(settings: Settings) -> float:
    """The directory's tables built once, in process; seconds."""
    from crm_contacts.application import create_application, open_directory

    app = create_application(settings)
    try:
        started = time.perf_counter()
        directory = open_directory(app)
        try:
            directory.catch_up()
        finally:
            directory.close()
        return time.perf_counter() - started
    finally:
        app.close()


def write_pipeline(settings: Settings, events: int) -> tuple[int, float]:
    """Deals with their histories through the pipeline's own command bus
    (`bench.pipeline.seed`)."""
    from bench.pipeline import seed

    seeded = seed(settings, max(1, int(events / PIPELINE_EVENTS_PER_DEAL)))
    return seeded.events, seeded.seconds


# -- the serve process ---------------------------------------------------------------------

Query = Callable[[grpc.aio.Channel, tuple[tuple[str, str], ...]], Awaitable[Any]]


async def _list_contacts(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Any:
    from crm.contacts.v1 import contacts_pb2 as pb
    from crm.contacts.v1 import contacts_pb2_grpc

    stub = contacts_pb2_grpc.ContactsServiceStub(channel)
    return await stub.ListContacts(
        pb.ListContactsRequest(query="love", page_size=50), metadata=metadata
    )


async def _list_opportunities(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> Any:
    from crm.pipeline.v1 import pipeline_pb2 as pb
    from crm.pipeline.v1 import pipeline_pb2_grpc

    stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
    return await stub.ListOpportunities(
        pb.ListOpportunitiesRequest(owner="rep-07", page_size=50), metadata=metadata
    )


QUERIES: dict[str, tuple[str, Query]] = {
    "contacts": ("`ListContacts` by name (`love`), 50 a page", _list_contacts),
    "pipeline": ("`ListOpportunities` of one owner, 50 a page", _list_opportunities),
}

_APPLIED = re.compile(r"(\d+) events applied at start")


@dataclass
class Started:
    ready_seconds: float
    first_query_ms: float
    rss_mib: float
    applied_at_start: int | None
    load: float


async def start_serve(
    service: str, data_dir: Path, store: str, schema: str, identity: Identity, log: Path
) -> Started:
    """`crm-<service> serve` over the store: seconds from spawn to ready, the first
    query (ms), and the RSS after it (MiB); stopped gracefully afterwards."""
    grpc_port, http_port = free_port(), free_port()
    prefix = f"CRM_{service.upper()}"
    extra = {f"{prefix}_GRPC_PORT": str(grpc_port), f"{prefix}_HTTP_PORT": str(http_port)}
    if store == "postgres":
        extra.update(bench_postgres.env(schema), CRM_EVENT_STORE="postgres")
    env = clean_environment(data_dir, identity, **extra)
    target = f"127.0.0.1:{grpc_port}"
    metadata = grpc_auth(identity.mint("sales", subject="bench-rep", lifetime=3600))
    started: list[subprocess.Popen[bytes]] = []
    offset = log.stat().st_size if log.exists() else 0
    load = os.getloadavg()[0]
    begun = time.perf_counter()
    process = start_process(service, "serve", env, log, started)
    try:
        await wait_serving(target, f"http://127.0.0.1:{http_port}", process, log, timeout=1800)
        ready = time.perf_counter() - begun
        async with grpc.aio.insecure_channel(target) as channel:
            begun = time.perf_counter()
            await QUERIES[service][1](channel, metadata)
            first_ms = (time.perf_counter() - begun) * 1000
        rss = psutil.Process(process.pid).memory_info().rss / MIB
        await stop_gracefully(process, log)
    finally:
        kill_leftovers(started)
    with log.open("rb") as text:
        text.seek(offset)
        found = _APPLIED.search(text.read().decode(errors="replace"))
    return Started(ready, first_ms, rss, int(found.group(1)) if found else None, load)


# -- a run ----------------------------------------------------------------------------------


def measure(service: str, store: str, events: int, scratch: Path, identity: Identity) -> StartupRun:
    data_dir = scratch / f"{service}-{store}-{events}"
    schema = f"bench_start_{secrets.token_hex(4)}"
    settings = _settings(service, data_dir, store, schema)
    log = data_dir / "serve.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    run = StartupRun(service, store, events)
    tag = f"[startup/{service}/{store}/{events:,}]"
    try:
        if events > 0:
            print(f"{tag} writing the store", flush=True)
            writer = write_contacts if service == "contacts" else write_pipeline
            run.events, run.write_seconds = writer(settings, events)
            print(f"{tag} {run.events:,} events in {run.write_seconds:.1f} s", flush=True)
        if events == 0:
            run.tables_how = "empty store"
        elif service == "contacts":
            run.tables_how = "in process (the directory's catch-up)"
            run.tables_seconds = build_contacts_tables(settings)
        else:
            run.tables_how = "first start of `serve`"
            first = asyncio.run(start_serve(service, data_dir, store, schema, identity, log))
            run.tables_seconds = first.ready_seconds
        print(f"{tag} query tables built in {run.tables_seconds:.1f} s", flush=True)
        measured = asyncio.run(start_serve(service, data_dir, store, schema, identity, log))
        run.ready_seconds = measured.ready_seconds
        run.first_query_ms = measured.first_query_ms
        run.first_query = QUERIES[service][0]
        run.rss_mib = measured.rss_mib
        run.applied_at_start = measured.applied_at_start
        run.load = measured.load
        print(
            f"{tag} ready in {run.ready_seconds:.2f} s, first query "
            f"{run.first_query_ms:.1f} ms, RSS {run.rss_mib:.0f} MiB",
            flush=True,
        )
    except Exception as failure:  # recorded: the other runs still count
        run.notes.append(f"{events:,} events: failed: {type(failure).__name__}: {failure}")
        print(f"{tag} failed: {failure!r}", flush=True)
    finally:
        if store == "postgres":
            bench_postgres.drop_schema(schema)
    return run


def run_startup_bench(
    scratch: Path,
    *,
    stores: tuple[str, ...] = ("sqlite", "postgres"),
    services: tuple[str, ...] = ("contacts", "pipeline"),
    sizes: tuple[int, ...] = SIZES,
    results: Path | None = None,
) -> list[StartupRun]:
    """Every service over every store at every size, one after the other (the
    measured process is the only one the run has going); each run is appended to
    `results` (JSON lines) as soon as it is done."""
    identity = ensure_identity(scratch / "identity")
    runs = []
    for service in services:
        for store in stores:
            for size in sizes:
                run = measure(service, store, size, scratch, identity)
                runs.append(run)
                if results is not None:
                    with results.open("a") as out:
                        out.write(json.dumps(dataclasses.asdict(run)) + "\n")
    return runs


def load_results(results: Path) -> list[StartupRun]:
    """The runs recorded in `results`; a later run of the same service, store and
    size replaces an earlier one."""
    latest: dict[tuple[str, str, int], StartupRun] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                run = StartupRun(**json.loads(line))
                latest[(run.service, run.store, run.events)] = run
    return list(latest.values())


# -- the section ------------------------------------------------------------------------------


def render_startup(runs: list[StartupRun], when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    lines = [
        BEGIN,
        "## Startup over a large store",
        "",
        f"Written {when:%Y-%m-%d %H:%M} UTC by `python -m bench.startup`. An API process",
        "opens its query tables in its own database and applies only what was stored",
        "since they were last brought up to date, so its start and its memory should",
        "not depend on the history. Each store is written through the service's own",
        "domain classes and application, many aggregates per save (contacts: 100",
        "persons and companies a save, four interactions each; pipeline: 1,000 deals",
        "a command with their moves, wins and losses); its query tables are built",
        "once as the table says; then `serve` is started on it and timed from spawn",
        "to ready (gRPC health SERVING and `GET /healthz` 200); RSS is read after it",
        "answered a first query. The empty store's row is the baseline of the same",
        "run: the process's own start (interpreter, imports, servers). *load* is the",
        "machine's 1-minute load average when the process was spawned (2 cores,",
        "shared with whatever else runs). Targets: ready within 5 s at 1,000,000",
        "events, memory within 1.5x of the 10,000-event case.",
        "",
        "| service | store | events | written in | query tables built | ready after "
        "| ready / empty store | applied at start | first query | RSS | RSS / smallest store "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    small = {(r.service, r.store): r.rss_mib for r in runs if r.events == smallest(runs, r)}
    empty = {(r.service, r.store): r.ready_seconds for r in runs if r.events == 0}
    for r in sorted(runs, key=lambda r: (r.service, r.store != "sqlite", r.events)):
        base = small.get((r.service, r.store)) or r.rss_mib
        applied = "" if r.applied_at_start is None else f"{r.applied_at_start:,}"
        if r.ready_seconds == 0:
            lines.append(f"| {r.service} | {r.store} | {r.events:,} | failed (below) |||||||||")
            continue
        written = f"{r.write_seconds:.1f} s" if r.events else "(empty store)"
        tables = f"{r.tables_seconds:.1f} s, {r.tables_how}" if r.events else ""
        ratio = f"{r.rss_mib / base:.2f}x" if r.events else ""
        start = empty.get((r.service, r.store))
        slower = f"{r.ready_seconds / start:.2f}x" if start and r.events else ""
        lines.append(
            f"| {r.service} | {r.store} | {r.events:,} | {written} | {tables} "
            f"| {r.ready_seconds:.2f} s | {slower} | {applied} | {r.first_query_ms:.0f} ms "
            f"| {r.rss_mib:.0f} MiB | {ratio} | {'' if r.load is None else f'{r.load:.1f}'} |"
        )
    queries = sorted({(r.service, r.first_query) for r in runs})
    lines.append("")
    for r in sorted(runs, key=lambda r: (r.service, r.store != "sqlite")):
        key = (r.service, r.store)
        largest = max(x.events for x in runs if (x.service, x.store) == key)
        if r.events != largest or r.events == 0 or r.ready_seconds == 0:
            continue
        met = "met" if r.ready_seconds <= 5 else "missed"
        base = small.get(key) or r.rss_mib
        lines.append(
            f"- {r.service}/{r.store} at {r.events:,} events: ready in "
            f"{r.ready_seconds:.2f} s, target {met} (the empty store's start in the same "
            f"run: {empty.get(key, 0):.2f} s); RSS {r.rss_mib / base:.2f}x the smallest "
            f"store's (target 1.5x)."
        )
    lines.append("")
    lines.extend(f"First query of {service}: {query}." for service, query in queries)
    for r in runs:
        lines.extend(f"- {r.service}/{r.store}: {note}" for note in r.notes)
    lines.append(END)
    return "\n".join(lines)


def smallest(runs: list[StartupRun], like: StartupRun) -> int:
    """The fewest events of a non-empty store of the same service and store."""
    sizes = [r.events for r in runs if (r.service, r.store) == (like.service, like.store)]
    return min((s for s in sizes if s > 0), default=0)


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END, before_notes=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--services", default="contacts,pipeline")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--keep-dir", help="run in this directory and keep it afterwards")
    parser.add_argument(
        "--results",
        help="JSON lines file the runs are added to; the section shows every run in it "
        "(the latest of each service, store and size), so runs of several invocations add up",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    if "postgres" in args.stores:
        where = bench_postgres.target()
        print(f"PostgreSQL on {where.host}:{where.port}", flush=True)
    with tempfile.TemporaryDirectory(prefix="crm-bench-startup-") as tmp:
        scratch = Path(args.keep_dir).resolve() if args.keep_dir else Path(tmp)
        results = Path(args.results) if args.results else scratch / "startup-runs.jsonl"
        run_startup_bench(
            scratch,
            stores=tuple(s for s in args.stores.split(",") if s),
            services=tuple(s for s in args.services.split(",") if s),
            sizes=tuple(int(s) for s in args.sizes.split(",") if s),
            results=results,
        )
        runs = load_results(results)
    text = render_startup(runs)
    print(text)
    record(text, Path(args.out))


if __name__ == "__main__":
    main()
