"""What one command costs the API process in CPU, against one bare `save()`.

`python -m bench.cpu` (and `run_cpu_bench()` for `python -m bench`): per event
store (SQLite, PostgreSQL):

- the baseline: the `eventsourcing` library's bare `Application.save()` loop
  (bench/baseline.py) in this process, its saves per second and its CPU time
  per save, before and after the API runs (the machine is shared and noisy);
- a real `contacts-api` process (`crm-contacts serve`, nothing else of the
  stack: no relay, no Kafka) on a fresh store of that kind, `CreatePerson`
  from 16 concurrent gRPC clients, then `POST /persons` from 16 concurrent
  HTTP clients, a bounded count each; for each, the commands per second and
  the CPU time (user + system, `psutil`) the API process (and its worker
  processes, with `CRM_API_WORKERS`) spent per command.

Both figures are recorded as multiples of the same run's bare save: the CPU
per command over the CPU per save, the throughput over the saves per second.
Numbers are recorded, never asserted: a timing is not a unit test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import secrets
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import psutil

from bench import postgres as bench_postgres
from bench.baseline import BenchPerson, _settings
from bench.load import create_person_request
from bench.sections import record_section
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.eventstore import application_env
from crm_deploy.identity import ensure_identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    bearer,
    clean_environment,
    grpc_auth,
    kill_leftovers,
    start_process,
    stop_gracefully,
    wait_serving,
)

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- cpu benchmark: begin (written by python -m bench.cpu) -->"
END = "<!-- cpu benchmark: end -->"
CLIENTS = 16
#: gRPC clients share this many channels (HTTP/2 connections), as in bench/load.py.
CHANNELS = 4


@dataclass
class Baseline:
    """The bare save loop: saves per second and CPU milliseconds per save."""

    per_second: float
    cpu_ms: float


@dataclass
class PathRun:
    """One protocol's closed-loop run against the API process."""

    commands: int
    seconds: float
    cpu_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def per_second(self) -> float:
        return self.commands / self.seconds


@dataclass
class CpuRun:
    store: str
    workers: int
    baselines: list[Baseline] = field(default_factory=list)
    grpc_rounds: list[PathRun] = field(default_factory=list)
    rest_rounds: list[PathRun] = field(default_factory=list)

    @property
    def save_per_second(self) -> float:
        """The best round's rate of the bare save loop."""
        return max(b.per_second for b in self.baselines)

    @property
    def save_cpu_ms(self) -> float:
        """The best round's CPU per bare save."""
        return min(b.cpu_ms for b in self.baselines)


def best(rounds: list[PathRun]) -> tuple[float, float]:
    """(highest commands/s, lowest CPU ms per command) over the rounds."""
    return max(r.per_second for r in rounds), min(r.cpu_ms for r in rounds)


def bare_save_cost(data_dir: Path, store: str, count: int, schema: str) -> Baseline:
    """`count` bare saves (one aggregate each) in this process: rate and CPU per save."""
    from eventsourcing.application import Application

    app: Application[uuid.UUID] = Application(
        env=application_env(_settings(data_dir, store, schema, "baseline"))
    )
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(count):
            app.save(
                BenchPerson(
                    given_name=f"Given{i}",
                    family_name=f"Family{i}",
                    channels=[{"channel": "email", "address": f"p{i}@example.com"}],
                    tags=["bench"],
                )
            )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        app.close()
    return Baseline(count / wall, cpu / count * 1000)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and of its children so far."""
    total = 0.0
    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            total += sum(process.cpu_times()[:2])
        except psutil.Error:
            continue
    return total


_numbers = itertools.count()


def person_body() -> dict[str, object]:
    """A `POST /persons` body shaped like bench/load.py's gRPC request."""
    n, tag = next(_numbers), uuid.uuid4().hex[:10]
    return {
        "given_name": f"Bench{n}",
        "family_name": f"Person{tag}",
        "channels": [
            {
                "channel": "email",
                "address": f"bench.{tag}.{n}@example.com",
                "consent_status": "granted",
                "consent_source": "bench",
            }
        ],
        "lifecycle_stage": "lead",
        "tags": ["bench"],
    }


async def grpc_creates(target: str, token: str, pid: int, commands: int) -> PathRun:
    """`CLIENTS` closed-loop gRPC callers of CreatePerson until `commands` were answered."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [contacts_pb2_grpc.ContactsServiceStub(c) for c in channels]
    metadata = grpc_auth(token)
    try:
        for stub in stubs:  # connections up, code paths warm
            for _ in range(5):
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

        cpu, wall = process_cpu(pid), time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        wall, cpu = time.perf_counter() - wall, process_cpu(pid) - cpu
    finally:
        for c in channels:
            await c.close()
    return PathRun(len(latencies), wall, cpu / len(latencies) * 1000, latencies)


async def rest_creates(base: str, token: str, pid: int, commands: int) -> PathRun:
    """`CLIENTS` closed-loop HTTP callers of `POST /persons` until `commands` were answered."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, headers=bearer(token), limits=limits) as http:
        for _ in range(5):
            (await http.post("/persons", json=person_body(), timeout=30)).raise_for_status()
        remaining = commands
        latencies: list[float] = []

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                try:
                    reply = await http.post("/persons", json=person_body(), timeout=30)
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    # A kept-alive connection the server closed just as it was reused
                    # (its keep-alive timeout): not an answer, the next call reconnects.
                    remaining += 1
                    continue
                reply.raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)

        cpu, wall = process_cpu(pid), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        wall, cpu = time.perf_counter() - wall, process_cpu(pid) - cpu
    return PathRun(len(latencies), wall, cpu / len(latencies) * 1000, latencies)


@dataclass
class Api:
    """A running `contacts-api` process and how to reach it."""

    process: subprocess.Popen[bytes]
    target: str
    base: str
    token: str
    log: Path


@contextlib.asynccontextmanager
async def running_api(
    scratch: Path, store: str, schema: str, workers: int, env: dict[str, str] | None = None
) -> AsyncIterator[Api]:
    """`crm-contacts serve` on a fresh store (plus `env`), stopped gracefully at the end."""
    identity = ensure_identity(scratch / "identity")
    token = identity.mint("sales", subject="bench", client="bench")
    grpc_port, http_port = free_port(), free_port()
    extra = {
        "CRM_EVENT_STORE": store,
        "CRM_CONTACTS_GRPC_PORT": str(grpc_port),
        "CRM_CONTACTS_HTTP_PORT": str(http_port),
        "CRM_API_WORKERS": str(workers),
        **(bench_postgres.env(schema) if store == "postgres" else {}),
        **(env or {}),
    }
    log = scratch / "contacts-api.log"
    started: list[subprocess.Popen[bytes]] = []
    process = start_process(
        "contacts", "serve", clean_environment(scratch / "data", identity, **extra), log, started
    )
    api = Api(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", token, log)
    try:
        await wait_serving(api.target, api.base, process, log)
        if workers > 1:
            await asyncio.sleep(5)  # every worker up, not just the first to answer
        yield api
        await stop_gracefully(process, log)
    finally:
        kill_leftovers(started)


def _path_line(run: PathRun) -> str:
    return f"{run.per_second:,.0f} commands/s, {run.cpu_ms:.3f} ms CPU per command"


async def measure_store(
    scratch: Path, store: str, *, baseline: int, commands: int, workers: int, rounds: int
) -> CpuRun:
    """Alternating rounds of the bare save loop, gRPC and REST against one API process:
    the machine is shared, so each figure is the best of its rounds."""
    result = CpuRun(store, workers)
    schema = f"bench_cpu_{secrets.token_hex(4)}"
    schemas = [schema] + [f"{schema}_b{i}" for i in range(rounds)]
    try:
        async with running_api(scratch / "api", store, schema, workers) as api:
            for i in range(rounds):
                saves = bare_save_cost(scratch / f"b{i}", store, baseline, schemas[i + 1])
                result.baselines.append(saves)
                print(f"[cpu/{store}] round {i + 1}: bare save {saves.per_second:,.0f} saves/s, "
                      f"{saves.cpu_ms:.3f} ms CPU per save", flush=True)  # fmt: skip
                grpc_run = await grpc_creates(api.target, api.token, api.process.pid, commands)
                result.grpc_rounds.append(grpc_run)
                print(f"[cpu/{store}]   gRPC {_path_line(grpc_run)}", flush=True)
                rest_run = await rest_creates(api.base, api.token, api.process.pid, commands)
                result.rest_rounds.append(rest_run)
                print(f"[cpu/{store}]   REST {_path_line(rest_run)}", flush=True)
    finally:
        if store == "postgres":
            for name in schemas:
                bench_postgres.drop_schema(name)
    return result


async def run_cpu_bench(
    scratch: Path,
    stores: list[str],
    *,
    baseline: int = 1000,
    commands: int = 1000,
    workers: int = 1,
    rounds: int = 3,
) -> list[CpuRun]:
    """The CPU-per-command measurement of every store (each in a scratch dir of its own)."""
    if "postgres" in stores:
        where = bench_postgres.target()
        print(f"PostgreSQL on {where.host}:{where.port}", flush=True)
    runs = []
    for store in stores:
        runs.append(
            await measure_store(
                scratch / store,
                store,
                baseline=baseline,
                commands=commands,
                workers=workers,
                rounds=rounds,
            )
        )
    return runs


def render_cpu(runs: list[CpuRun], commands: int, baseline: int) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    workers = sorted({r.workers for r in runs})
    rounds = max(len(r.baselines) for r in runs)
    lines = [
        BEGIN,
        "## CPU per command (contacts, gRPC and REST, 16 clients)",
        "",
        f"Run {when} (`python -m bench.cpu`): one `contacts-api` process "
        f"(`CRM_API_WORKERS={','.join(map(str, workers))}`) alone on a fresh store; "
        f"{rounds} alternating rounds of {baseline} bare saves, {commands} `CreatePerson` "
        f"over gRPC and {commands} `POST /persons` over REST ({CLIENTS} concurrent clients "
        "each, the load generator on the same machine); each figure is the best of its "
        "rounds. CPU is the API process's user + system time (its workers' included) "
        "over the commands; the bare save's is this process's over its saves.",
        "",
        "| store | bare save: saves/s, CPU per save | path | commands/s | "
        "throughput / bare saves | CPU per command | CPU / bare save CPU | "
        "CPU / bare save wall time | p50 / p99 latency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        save_wall_ms = 1000 / r.save_per_second
        for name, rounds_of in (("gRPC", r.grpc_rounds), ("REST", r.rest_rounds)):
            if not rounds_of:
                continue
            rate, cpu = best(rounds_of)
            latencies = min(rounds_of, key=lambda x: x.cpu_ms).latencies_ms
            lines.append(
                f"| {r.store} | {r.save_per_second:,.0f}, {r.save_cpu_ms:.3f} ms | {name} | "
                f"{rate:,.0f} | **{rate / r.save_per_second:.2f}x** | {cpu:.3f} ms | "
                f"**{cpu / r.save_cpu_ms:.2f}x** | {cpu / save_wall_ms:.2f}x | "
                f"{_percentile(latencies, 50):.1f} / {_percentile(latencies, 99):.1f} ms |"
            )
    lines += [
        "",
        "Targets (issue 15): CPU per command at most 1.5x a bare save's; throughput at "
        "least 1.0x the bare saves on PostgreSQL and 0.5x on SQLite. *CPU / bare save CPU* "
        "divides by the CPU time the bare loop spent per save; *CPU / bare save wall "
        "time* by 1 / (saves per second), the figure the issue's 2.8-3.5x was computed "
        "with. On PostgreSQL neither counts the server's CPU (for the API neither).",
        END,
    ]
    return "\n".join(lines)


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))]


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--baseline", type=int, default=1000, help="bare saves per round")
    parser.add_argument("--commands", type=int, default=1000, help="per protocol and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="CRM_API_WORKERS of the API")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--no-record", action="store_true", help="print, do not write --out")
    args = parser.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="crm-bench-cpu-") as tmp:
        runs = asyncio.run(
            run_cpu_bench(
                Path(tmp),
                stores,
                baseline=args.baseline,
                commands=args.commands,
                workers=args.workers,
                rounds=args.rounds,
            )
        )
    text = render_cpu(runs, args.commands, args.baseline)
    print(text)
    if not args.no_record:
        record(text, Path(args.out))


if __name__ == "__main__":
    main()
