"""`python -m bench.privacy`: what encrypting personal data at rest costs.

One bounded run, in process, on a real store (SQLite; PostgreSQL too with
`--store postgres` or `--store both`, on the tests' PostgreSQL server), of
the same application (`crm_common.eventstore.SnapshottingApplication`) and
the same events in three configurations, in the same run:

- `clear`: no master keys, the store as it was (the baseline);
- `personal`: master keys configured, so the four personal fields of each
  event are sealed under the person's data key (`crm_common.privacy`);
- `personal + cipher`: the same, and every event encrypted whole as well
  (`CRM_EVENT_CIPHER_KEYS`).

Three workloads, each `--saves` operations, one `Application.save()` (one
transaction) per operation: registering new persons (each creates the
person's data key), changing the name of persons already registered (key
cached), and loading persons (two events each), with the key cached and
without it (read from the key store and unwrapped). Throughput and
the CPU this process spends per operation (`time.process_time`: the
database server's own CPU is not in it for PostgreSQL). The configurations
take turns every 50 operations, in a rotating order, so the noise of a
shared machine falls on all three alike; `--rounds` rounds, the medians
reported. Numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from eventsourcing.domain import Aggregate, event

from bench.sections import record_section
from crm_common.eventstore import SnapshottingApplication, application_env
from crm_common.privacy import PersonalData, new_master_key
from crm_common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- privacy benchmark: begin (written by python -m bench.privacy) -->"
END = "<!-- privacy benchmark: end -->"
MODES = ("clear", "personal", "personal + cipher")
WORKLOADS = ("register", "rename", "load", "load_cold")
#: Operations of one configuration before the next takes its turn.
CHUNK = 50
LABELS = {
    "register": "register a person (new data key)",
    "rename": "change a person's name (key cached)",
    "load": "load a person (2 events; key cached)",
    "load_cold": "load a person, key not cached (read + unwrap)",
}


class Person(Aggregate):
    """A person as the contacts service stores one: names, email, phone personal."""

    class Registered(Aggregate.Created):
        given_name: str
        family_name: str
        email: str
        phone: str
        city: str
        stage: str
        personal_data = PersonalData("given_name", "family_name", "email", "phone")

    class Renamed(Aggregate.Event):
        family_name: str
        personal_data = PersonalData("family_name")

    @event(Registered)
    def __init__(
        self, given_name: str, family_name: str, email: str, phone: str, city: str, stage: str
    ) -> None:
        self.given_name, self.family_name = given_name, family_name
        self.email, self.phone, self.city, self.stage = email, phone, city, stage

    @event(Renamed)
    def rename(self, family_name: str) -> None:
        self.family_name = family_name


class BenchApplication(SnapshottingApplication):
    name = "privacybench"


def machine() -> str:
    """The machine in one line (as `bench.__main__` writes it; not imported from
    there, which would import every service)."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    ops: int = 0

    @property
    def rate(self) -> float:
        return self.ops / statistics.median(self.seconds)

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu) / self.ops * 1e6


def new_person(n: int) -> Person:
    return Person(
        given_name=f"Given{n}",
        family_name=f"Family{n}",
        email=f"person{n}@example.org",
        phone=f"+44 20 7946 {n % 10000:04d}",
        city="London",
        stage="lead",
    )


@contextlib.contextmanager
def store_settings(store: str, scratch: Path, mode: str) -> Iterator[Settings]:
    slug = mode.replace(" + ", "_")
    if store == "sqlite":
        yield Settings(
            service="privacybench",
            data_dir=scratch / slug,
            bind_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            event_store="sqlite",
        )
        return
    from crm_deploy.testing import drop_schema, postgres_settings

    schema = f"privacybench_{slug}_{uuid.uuid4().hex[:8]}"
    try:
        yield postgres_settings("privacybench", schema, scratch)
    finally:
        drop_schema(schema)


def configured(settings: Settings, mode: str) -> Settings:
    if mode == "clear":
        return settings
    # A cache long enough for the whole run: "key cached" stays true however slow it is.
    settings = dataclasses.replace(
        settings, master_keys=new_master_key("bench"), key_cache_ttl=3600.0
    )
    if mode == "personal + cipher":
        settings = dataclasses.replace(settings, event_cipher_keys=new_master_key("bench-e"))
    return settings


def measure(ops: range, work: Callable[[int], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for i in ops:
        work(i)
    return time.perf_counter() - wall, time.process_time() - cpu


class Workloads:
    """The three workloads on one application, `CHUNK` operations at a time."""

    def __init__(self, app: BenchApplication, first: int) -> None:
        self.app = app
        self.first = first
        self.people: list[Person] = []

    def register(self, i: int) -> None:
        person = new_person(self.first + i)
        self.app.save(person)
        self.people.append(person)

    def rename(self, i: int) -> None:
        person = self.people[i]
        person.rename(f"Renamed{i}")
        self.app.save(person)

    def load(self, i: int) -> None:
        self.app.repository.get(self.people[i].id)

    def load_cold(self, i: int) -> None:
        person_id = self.people[i].id
        if self.app.personal_data_keys is not None:
            self.app.personal_data_keys.cache.evict(str(person_id))
        self.app.repository.get(person_id)


def run_store(store: str, saves: int, rounds: int) -> dict[str, dict[str, Result]]:
    """Per configuration and workload, the (seconds, CPU seconds) of each round.

    Within a round the configurations take turns every `CHUNK` operations (in
    a rotating order), so that the noise of a shared machine falls on all of
    them alike rather than on whichever ran during a busy minute."""
    results = {m: {w: Result(ops=saves) for w in WORKLOADS} for m in MODES}
    with (
        tempfile.TemporaryDirectory(prefix="bench-privacy-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        apps: dict[str, BenchApplication] = {}
        for mode in MODES:
            settings = configured(stack.enter_context(store_settings(store, Path(tmp), mode)), mode)
            apps[mode] = BenchApplication(env=application_env(settings, CRM_SNAPSHOT_INTERVAL="0"))
            stack.callback(apps[mode].close)
        for r in range(rounds):
            work = {m: Workloads(apps[m], first=(r + 1) * saves) for m in MODES}
            for workload in WORKLOADS:
                spent = {m: [0.0, 0.0] for m in MODES}
                for turn, start in enumerate(range(0, saves, CHUNK)):
                    shift = turn % len(MODES)
                    for mode in MODES[shift:] + MODES[:shift]:
                        operation = getattr(work[mode], workload)
                        seconds, cpu = measure(range(start, min(start + CHUNK, saves)), operation)
                        spent[mode][0] += seconds
                        spent[mode][1] += cpu
                for mode in MODES:
                    results[mode][workload].seconds.append(spent[mode][0])
                    results[mode][workload].cpu.append(spent[mode][1])
    return results


def render_table(
    store: str, saves: int, rounds: int, results: dict[str, dict[str, Result]]
) -> list[str]:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load1, load5, load15 = os.getloadavg()
    lines = [
        f"- **Run:** {when}; {store} store; `python -m bench.privacy --saves {saves} "
        f"--rounds {rounds}`; in process, one save (one transaction) per operation, "
        f"the three configurations taking turns every {CHUNK} operations; medians of "
        f"{rounds} rounds; load average {load1:.1f} / {load5:.1f} / {load15:.1f} "
        f"at the end, on {os.cpu_count()} cores: read the ratios.",
        "",
        "| operation | clear | personal fields sealed | ratio | + whole-event cipher | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        clear = results["clear"][workload]
        sealed = results["personal"][workload]
        both = results["personal + cipher"][workload]
        lines.append(
            f"| {LABELS[workload]}: per second | {clear.rate:,.0f}/s | {sealed.rate:,.0f}/s | "
            f"{sealed.rate / clear.rate:.2f}x | {both.rate:,.0f}/s | "
            f"{both.rate / clear.rate:.2f}x |"
        )
        lines.append(
            f"| {LABELS[workload]}: CPU of this process | {clear.cpu_us:,.0f} µs | "
            f"{sealed.cpu_us:,.0f} µs | {sealed.cpu_us / clear.cpu_us:.2f}x | "
            f"{both.cpu_us:,.0f} µs | {both.cpu_us / clear.cpu_us:.2f}x |"
        )
    return lines


def render(tables: list[list[str]]) -> str:
    lines = [
        BEGIN,
        "## Privacy: the cost of encryption",
        "",
        f"- **Machine:** {machine()}",
    ]
    for table in tables:
        lines += [*table, ""]
    lines += [
        "The same application and events three ways in the same run: without master",
        "keys (clear, the baseline), with the four personal fields of a registration",
        "(one of a name change) sealed under the person's data key, and with the",
        "whole-event cipher on top. Registering a new person also creates its data",
        "key: one AES-GCM wrap under the master key and one insert-if-absent in the",
        "key store (a second transaction, the key store's own), which is most of the",
        "difference on that row; a name change and a load find the key in the",
        "process's cache (`CRM_KEY_CACHE_SIZE`, `CRM_KEY_CACHE_TTL_SECONDS`; the",
        "bench sets a TTL longer than the run) and pay only AES-GCM over a few",
        "hundred bytes and the transcoding of the sealed values; a load whose key",
        "is not cached (the first in a process, or after the TTL) also reads the",
        "key store and unwraps the key. The command bus also maps each",
        "event once to check its size before the save, so a command pays the sealing",
        "twice. For PostgreSQL the CPU column is this process's only, not the",
        "server's. `python -m bench.privacy --record` rewrites this section",
        "(`--store both` for the two stores; not part of `make bench`).",
        END,
    ]
    return "\n".join(lines)


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__)
    parser.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--saves", type=int, default=1000, help="operations per workload and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--record", action="store_true", help="rewrite the section of docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.saves <= 20_000 or not 1 <= args.rounds <= 9:
        parser.error("--saves must be 1..20000 and --rounds 1..9")
    logging.getLogger("crm_common.privacy.mapper").setLevel(logging.ERROR)
    stores = ("sqlite", "postgres") if args.store == "both" else (args.store,)
    tables = []
    for store in stores:
        results = run_store(store, args.saves, args.rounds)
        tables.append(render_table(store, args.saves, args.rounds, results))
        print("\n".join(tables[-1]), flush=True)
    text = render(tables)
    if args.record:
        record(text, ROOT / "docs" / "benchmarks.md")
        print("recorded in docs/benchmarks.md")


if __name__ == "__main__":
    main()
