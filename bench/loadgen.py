"""`python -m bench.loadgen`: mixed traffic against a running stack, with a progress
line, then throughput, latency percentiles and errors per operation.

    deploy/crm up --detach
    .venv/bin/python -m bench.loadgen --rate 50 --duration 30
    .venv/bin/python -m bench.loadgen --rate 200 --duration 60 \\
        --mix create-person-grpc=2,update-person-rest=1,get-contact-grpc=4,read-360-rest=1

Open loop: operations start at `--rate` per second whatever the answers take
(a slow platform shows as latency and as operations still in flight, not as
a lower offered load), up to `--max-in-flight` at once; one started beyond
that is counted as `skipped` rather than queued. Every operation runs as a
user of `--role` with a real token minted from the stack's identity, over gRPC
or REST as its name says:

| operation | call |
|---|---|
| create-person-grpc | `ContactsService/CreatePerson` |
| create-person-rest | `POST /persons` |
| update-person-rest | `PATCH /persons/{id}` of a person created earlier |
| get-contact-grpc | `ContactsService/GetContact` of a person created earlier |
| get-contact-rest | `GET /contacts/{id}` |
| read-360-rest | `GET /customers/{id}/360` on analytics, waiting for the write (`wait_for`) |

Reads and updates pick among the persons this run created (a few are created
first). The stack is the one in `CRM_DATA_DIR` (default ./var), as
`deploy/crm status` finds it. The figures are printed, never asserted; with
`--json FILE` they are written there too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.load import percentile
from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm_deploy.stack import StackConfig, load_state

DEFAULT_MIX = {
    "create-person-grpc": 3,
    "create-person-rest": 1,
    "update-person-rest": 1,
    "get-contact-grpc": 3,
    "get-contact-rest": 2,
    "read-360-rest": 1,
}
#: Persons created before the run, so that reads have something to read.
SEED_PERSONS = 5


class OperationFailed(Exception):
    """An answer other than success; `kind` is what the report counts it as."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class Figures:
    """What one operation did in a run."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def as_dict(self, seconds: float) -> dict[str, Any]:
        done = self.ok + sum(self.errors.values())
        return {
            "ok": self.ok,
            "errors": dict(self.errors),
            "skipped": self.skipped,
            "per_second": round(done / seconds, 2) if seconds else 0.0,
            "p50_ms": round(percentile(self.latencies_ms, 50), 2),
            "p95_ms": round(percentile(self.latencies_ms, 95), 2),
            "p99_ms": round(percentile(self.latencies_ms, 99), 2),
            "max_ms": round(max(self.latencies_ms), 2) if self.latencies_ms else None,
        }


def parse_mix(text: str | None) -> dict[str, int]:
    """`name=weight,...` -> weights; refuses unknown names and weights below 1."""
    if not text:
        return dict(DEFAULT_MIX)
    mix: dict[str, int] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in DEFAULT_MIX:
            raise ValueError(f"unknown operation {name!r}; known: {', '.join(DEFAULT_MIX)}")
        try:
            mix[name] = int(weight or "1")
        except ValueError:
            raise ValueError(
                f"the weight of {name} must be a whole number, not {weight!r}"
            ) from None
        if mix[name] < 1:
            raise ValueError(f"the weight of {name} must be at least 1")
    return mix


@dataclass
class Target:
    contacts_grpc: str
    contacts_http: str
    analytics_http: str
    token: str

    @classmethod
    def of_stack(cls, data_dir: Path, role: str) -> Target:
        state = load_state(data_dir)
        if state is None or state.get("status") in ("starting", "stopped", "failed"):
            raise SystemExit(
                f"no ready stack in {data_dir} (start one with `deploy/crm up --detach`, "
                "or set CRM_DATA_DIR)"
            )
        config = StackConfig.from_json(state["config"])
        grpc_port, http_port = config.service_ports["contacts"]
        _, analytics_http = config.service_ports["analytics"]
        token = config.identity.mint(role, subject=f"loadgen-{role}", client="loadgen")
        return cls(
            contacts_grpc=f"127.0.0.1:{grpc_port}",
            contacts_http=f"http://127.0.0.1:{http_port}",
            analytics_http=f"http://127.0.0.1:{analytics_http}",
            token=token,
        )


class Traffic:
    """The operations, over one gRPC channel and one HTTP client per API."""

    def __init__(self, target: Target, rng: random.Random) -> None:
        self.target = target
        self.rng = rng
        self.metadata = (("authorization", f"Bearer {target.token}"),)
        headers = {"authorization": f"Bearer {target.token}"}
        self.channel = grpc.aio.insecure_channel(target.contacts_grpc)
        self.contacts = contacts_pb2_grpc.ContactsServiceStub(self.channel)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=target.contacts_http, headers=headers, limits=limits)
        self.analytics = httpx.AsyncClient(
            base_url=target.analytics_http, headers=headers, limits=limits
        )
        #: (id, position of its last write) of the persons created so far.
        self.persons: list[tuple[str, int]] = []
        self.operations: dict[str, Callable[[], Awaitable[None]]] = {
            "create-person-grpc": self.create_person_grpc,
            "create-person-rest": self.create_person_rest,
            "update-person-rest": self.update_person_rest,
            "get-contact-grpc": self.get_contact_grpc,
            "get-contact-rest": self.get_contact_rest,
            "read-360-rest": self.read_360_rest,
        }

    async def close(self) -> None:
        await self.http.aclose()
        await self.analytics.aclose()
        await self.channel.close()

    def _name(self) -> tuple[str, str]:
        return "Load", f"Gen{uuid.uuid4().hex[:10]}"

    def _person(self) -> tuple[str, int]:
        return self.rng.choice(self.persons)

    @staticmethod
    def _check(reply: httpx.Response) -> dict[str, Any]:
        if reply.status_code >= 400:
            raise OperationFailed(f"HTTP {reply.status_code}")
        body: dict[str, Any] = reply.json()
        return body

    async def _grpc(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise OperationFailed(str(error.code().name)) from None

    async def create_person_grpc(self) -> None:
        given, family = self._name()
        reply = await self._grpc(
            self.contacts.CreatePerson(
                contacts_pb2.CreatePersonRequest(given_name=given, family_name=family),
                metadata=self.metadata,
                timeout=30,
            )
        )
        self.persons.append((reply.result.id, reply.result.position))

    async def create_person_rest(self) -> None:
        given, family = self._name()
        body = self._check(
            await self.http.post("/persons", json={"given_name": given, "family_name": family})
        )
        self.persons.append((body["id"], body["position"]))

    async def update_person_rest(self) -> None:
        ident, _ = self._person()
        body = self._check(
            await self.http.patch(f"/persons/{ident}", json={"family_name": self._name()[1]})
        )
        self.persons.append((ident, body["position"]))

    async def get_contact_grpc(self) -> None:
        ident, _ = self._person()
        await self._grpc(
            self.contacts.GetContact(
                contacts_pb2.GetContactRequest(id=ident), metadata=self.metadata, timeout=30
            )
        )

    async def get_contact_rest(self) -> None:
        ident, _ = self._person()
        self._check(await self.http.get(f"/contacts/{ident}"))

    async def read_360_rest(self) -> None:
        ident, position = self._person()
        self._check(
            await self.analytics.get(
                f"/customers/{ident}/360", params={"wait_for": f"contacts:{position}"}
            )
        )


async def run(
    traffic: Traffic,
    mix: dict[str, int],
    rate: float,
    duration: float,
    max_in_flight: int,
    progress: Callable[[str], None],
) -> tuple[dict[str, Figures], float]:
    figures = {name: Figures() for name in mix}
    names = list(mix)
    weights = [mix[n] for n in names]
    for _ in range(SEED_PERSONS):
        await traffic.create_person_grpc()
    in_flight: set[asyncio.Task[None]] = set()

    async def one(name: str) -> None:
        started = time.perf_counter()
        try:
            await traffic.operations[name]()
        except OperationFailed as failure:
            figures[name].errors[failure.kind] += 1
            return
        except (httpx.HTTPError, OSError) as error:
            figures[name].errors[type(error).__name__] += 1
            return
        figures[name].latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    sent = 0
    next_report = started + 1
    while (now := time.monotonic()) < started + duration:
        due = int((now - started) * rate) + 1
        while sent < due:
            sent += 1
            name = traffic.rng.choices(names, weights)[0]
            if len(in_flight) >= max_in_flight:
                figures[name].skipped += 1
                continue
            task = asyncio.create_task(one(name))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if now >= next_report:
            next_report += 1
            progress(_progress_line(figures, now - started, duration, len(in_flight)))
        await asyncio.sleep(min(0.01, max(0.0, started + sent / rate - time.monotonic())))
    if in_flight:
        progress(f"waiting for {len(in_flight)} operations in flight ...")
        await asyncio.gather(*in_flight)
    return figures, time.monotonic() - started


def _progress_line(figures: dict[str, Figures], elapsed: float, duration: float, busy: int) -> str:
    ok = sum(f.ok for f in figures.values())
    errors = sum(sum(f.errors.values()) for f in figures.values())
    skipped = sum(f.skipped for f in figures.values())
    recent = [ms for f in figures.values() for ms in f.latencies_ms[-200:]]
    return (
        f"{elapsed:5.0f}/{duration:.0f} s  ok {ok}  errors {errors}  skipped {skipped}  "
        f"in flight {busy}  {ok / max(elapsed, 1e-9):.1f}/s  "
        f"p95 {percentile(recent, 95):.1f} ms"
    )


def report(figures: dict[str, Figures], seconds: float) -> str:
    header = (
        f"{'operation':<22}{'ok':>8}{'errors':>8}{'skipped':>9}{'/s':>9}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    lines = [header]
    for name, f in figures.items():
        d = f.as_dict(seconds)
        lines.append(
            f"{name:<22}{d['ok']:>8}{sum(f.errors.values()):>8}{d['skipped']:>9}"
            f"{d['per_second']:>9.1f}{d['p50_ms']:>9.1f}{d['p95_ms']:>9.1f}"
            f"{d['p99_ms']:>9.1f}{d['max_ms'] or float('nan'):>9.1f}"
        )
        for kind, count in sorted(f.errors.items()):
            lines.append(f"  {kind}: {count}")
    total = sum(f.ok + sum(f.errors.values()) for f in figures.values())
    lines.append(f"{total} operations in {seconds:.1f} s: {total / seconds:.1f}/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="Mixed gRPC and REST traffic against the running local stack.",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="operations a second (50)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (30)")
    parser.add_argument(
        "--mix",
        help="operation=weight,... (default: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items())
        + ")",
    )
    parser.add_argument("--role", default="admin", help="the role of the calling user (admin)")
    parser.add_argument(
        "--max-in-flight", type=int, default=256, help="operations at once at most (256)"
    )
    parser.add_argument("--seed", type=int, default=1, help="of the random choices (1)")
    parser.add_argument("--data-dir", type=Path, help="the stack's CRM_DATA_DIR")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        mix = parse_mix(args.mix)
    except ValueError as error:
        parser.error(str(error))
    if args.rate <= 0 or args.duration <= 0 or args.max_in_flight < 1:
        parser.error("--rate, --duration and --max-in-flight must be positive")
    data_dir = args.data_dir or StackConfig.from_env().data_dir
    target = Target.of_stack(data_dir.resolve(), args.role)
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        sys.stderr.write(("\r\x1b[K" if tty else "") + line + ("" if tty else "\n"))
        sys.stderr.flush()

    async def go() -> tuple[dict[str, Figures], float]:
        traffic = Traffic(target, random.Random(args.seed))
        try:
            return await run(traffic, mix, args.rate, args.duration, args.max_in_flight, progress)
        finally:
            await traffic.close()

    figures, seconds = asyncio.run(go())
    if tty:
        sys.stderr.write("\n")
    print(report(figures, seconds))
    if args.json:
        document = {
            "rate": args.rate,
            "duration": args.duration,
            "seconds": round(seconds, 2),
            "mix": mix,
            "operations": {name: f.as_dict(seconds) for name, f in figures.items()},
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(f.errors for f in figures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
