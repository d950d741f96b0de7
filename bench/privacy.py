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

`python -m bench.privacy --erase`: how long erasing one person takes, over a
whole local stack of its own (every service process, Kafka, the document
store; the write services on SQLite, or PostgreSQL with `--store postgres`).
The person has a realistic history (`--interactions` interactions, `--deals`
won deals each with an activity, `--cases` cases with two replies each, a
loyalty ledger of `--earnings` entries). Measured from the `ErasePerson`
call until every service has honoured it (contacts, pipeline, tickets and
loyalty destroyed the person's data keys, the 360 document no longer shows
their name), against a baseline of the same run: an `UpdatePerson` until the
360 view shows it (the same path: relay, Kafka, a consumer). `--persons`
persons, one after the other; the medians reported, as a ratio too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import statistics
import sys
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
ERASE_BEGIN = "<!-- privacy erase benchmark: begin (written by python -m bench.privacy --erase) -->"
ERASE_END = "<!-- privacy erase benchmark: end -->"
#: Where each owner's part of an erase is seen done, in the order of the table.
ERASE_STEPS = ("contacts", "pipeline", "tickets", "loyalty", "360 view")
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


# -- erasing a person over a whole stack -------------------------------------------------


@dataclass
class EraseRun:
    """One person's figures: the baseline's and the erase's, in seconds."""

    baseline: list[float]
    #: Per step of ERASE_STEPS, seconds from the ErasePerson call until it was seen done.
    steps: dict[str, float]
    #: How long each round of looking took (the figures' resolution).
    polls: list[float]

    @property
    def erase(self) -> float:
        return max(self.steps.values())


@dataclass
class EraseSizes:
    interactions: int
    deals: int
    cases: int
    earnings: int

    def describe(self) -> str:
        return (
            f"{self.interactions} interactions, {self.deals} won deals with an activity each, "
            f"{self.cases} cases with 2 replies each, a loyalty ledger of {self.earnings} "
            "earnings"
        )


#: How long an erase may take before the run gives up (seconds).
ERASE_DEADLINE = 180.0
POLL = 0.1


async def _erase_one(stack: Any, env: dict[str, str], sizes: EraseSizes, updates: int) -> EraseRun:
    from crm.contacts.v1 import contacts_pb2 as c
    from crm.customer360.v1 import customer360_pb2 as v
    from crm_deploy.testing import (
        PersonalValues,
        PlatformClients,
        create_history,
        erased_subjects,
    )

    personal = PersonalValues.unique()
    async with PlatformClients(stack.config.service_ports, stack.identity) as clients:
        history = await create_history(
            clients,
            personal,
            interactions=sizes.interactions,
            deals=sizes.deals,
            activities_per_deal=1,
            cases=sizes.cases,
            replies_per_case=2,
            earnings=sizes.earnings,
        )

        async def view(wait_for: dict[str, int]) -> Any:
            reply = await clients.customer360.GetCustomer360(
                v.GetCustomer360Request(
                    customer_id=history.person_id, wait_for=wait_for, wait_timeout_ms=30000
                )
            )
            return reply.customer

        doc = await view(history.positions)
        assert doc.family_name == personal.family_name, "the 360 view does not show the person"

        # Baseline: a change of the person's name until the 360 view shows it.
        baseline = []
        for n in range(updates):
            name = f"{personal.given_name}x{n}"
            started = time.perf_counter()
            updated = await clients.contacts.UpdatePerson(
                c.UpdatePersonRequest(id=history.person_id, update_mask=["given_name"],
                                      given_name=name)
            )  # fmt: skip
            doc = await view({"contacts": updated.result.position})
            baseline.append(time.perf_counter() - started)
            assert doc.given_name == name

        shown = doc.given_name
        started = time.perf_counter()
        await clients.contacts.ErasePerson(
            c.ErasePersonRequest(id=history.person_id, reference="DSR-BENCH")
        )
        steps: dict[str, float] = {}
        polls: list[float] = []
        while len(steps) < len(ERASE_STEPS):
            now = time.perf_counter() - started
            if polls or now:
                polls.append(now - sum(polls))
            if now > ERASE_DEADLINE:
                missing = [s for s in ERASE_STEPS if s not in steps]
                raise RuntimeError(f"erase not honoured in {ERASE_DEADLINE:.0f} s by {missing}")
            keys = await asyncio.to_thread(erased_subjects, env, history)
            for owner, states in keys.items():
                if owner not in steps and all(s == "destroyed" for s in states.values()):
                    steps[owner] = time.perf_counter() - started
            if "360 view" not in steps:
                reply = await clients.customer360.GetCustomer360(
                    v.GetCustomer360Request(customer_id=history.person_id)
                )
                if personal.family_name not in str(reply.customer) and shown not in str(
                    reply.customer
                ):
                    steps["360 view"] = time.perf_counter() - started
            await asyncio.sleep(POLL)
    return EraseRun(baseline, steps, polls[1:] or polls)


def run_erase(store: str, persons: int, sizes: EraseSizes, updates: int) -> list[EraseRun]:
    """A stack of its own in a scratch directory; `persons` erased one after the other."""
    from crm_deploy.stack import SERVICE_PROCESSES, Stack, StackConfig
    from crm_deploy.testing import postgres_database, postgres_env

    tmp = Path(tempfile.mkdtemp(prefix="bench-erase-"))
    try:
        with contextlib.ExitStack() as resources:
            env: dict[str, str] = {}
            if store == "postgres":
                env.update(postgres_env(resources.enter_context(postgres_database("bench_erase"))))
            stack = Stack(StackConfig.for_tests(tmp))
            stack.start_infra()
            resources.callback(stack.stop)
            stack.start_services([row.name for row in SERVICE_PROCESSES], extra_env=env)
            service_env = stack.service_env(env)
            runs = [
                asyncio.run(_erase_one(stack, service_env, sizes, updates)) for _ in range(persons)
            ]
    except BaseException:
        print(f"the stack's data and logs are kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return runs


def render_erase(store: str, argv: str, sizes: EraseSizes, runs: list[EraseRun]) -> list[str]:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load1, load5, load15 = os.getloadavg()
    baseline = statistics.median(b for run in runs for b in run.baseline)
    erase = statistics.median(run.erase for run in runs)
    poll = statistics.median(p for run in runs for p in run.polls)
    lines = [
        f"- **Run:** {when}; {store} stores; `python -m bench.privacy {argv}`; a stack of "
        f"its own, every service process; {len(runs)} person(s), each with {sizes.describe()}; "
        f"medians; a round of looking took {poll:.2f} s (the resolution of the erase rows); "
        f"load average {load1:.1f} / {load5:.1f} / {load15:.1f} at the end, on "
        f"{os.cpu_count()} cores.",
        "",
        "| from the call until | seconds | ratio to the baseline |",
        "|---|---|---|",
        f"| baseline: an `UpdatePerson` shows in the 360 view | {baseline:.2f} | 1.0x |",
    ]
    labels = {
        "contacts": "contacts destroyed the person's key",
        "pipeline": "pipeline destroyed the keys of the person and their deals' activities",
        "tickets": "tickets destroyed the person's key",
        "loyalty": "loyalty destroyed the member's key",
        "360 view": "the 360 view no longer shows the name",
    }
    for step in ERASE_STEPS:
        seconds = statistics.median(run.steps[step] for run in runs)
        lines.append(
            f"| `ErasePerson`: {labels[step]} | {seconds:.2f} | {seconds / baseline:.1f}x |"
        )
    lines.append(
        f"| **`ErasePerson`: every service honoured it** | **{erase:.2f}** | "
        f"**{erase / baseline:.1f}x** |"
    )
    return lines


def render_erase_section(tables: list[list[str]]) -> str:
    lines = [
        ERASE_BEGIN,
        "### Erasing a person",
        "",
        f"- **Machine:** {machine()}",
    ]
    for table in tables:
        lines += [*table, ""]
    lines += [
        "An erase is one `PersonErased` event in contacts (which destroys the contact's",
        "key at once), relayed to Kafka; the followers of the contacts topic in pipeline,",
        "tickets and loyalty destroy their keys of the person (pipeline also those of",
        "the activities of the person's deals), and the 360 projector redacts the",
        "person's document. Each row is when the benchmark first saw that step done:",
        "it looks in rounds (the four key stores' rows of the person's subjects, then",
        f"the 360 view, then a {POLL:.1f} s pause), so an erase row is late by up to a",
        "round; contacts' own key is destroyed within the `ErasePerson` call. The",
        "baseline takes the same path (relay, Kafka, a consumer) for one change of the",
        "person's name, awaited with the 360 view's `wait_for`. The consumers work side",
        "by side, so the erase takes about as long as its slowest consumer (pipeline",
        "has the most keys to destroy). With the default `CRM_KEY_CACHE_TTL_SECONDS`",
        "(60 s) an API process that had the person's key cached may show their data",
        "for up to a minute longer; the stored data is unreadable from the rows above.",
        "`python -m bench.privacy --erase --record` rewrites this section (`--store",
        "both` for the two stores; not part of `make bench`).",
        ERASE_END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.privacy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--saves", type=int, default=1000, help="operations per workload and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--record", action="store_true", help="rewrite the section of docs/benchmarks.md"
    )
    erase = parser.add_argument_group("erasing a person (--erase)")
    erase.add_argument(
        "--erase", action="store_true", help="time erasing a person over a stack of its own"
    )
    erase.add_argument("--persons", type=int, default=2, help="persons erased (1..5)")
    erase.add_argument("--interactions", type=int, default=100)
    erase.add_argument("--deals", type=int, default=10)
    erase.add_argument("--cases", type=int, default=5)
    erase.add_argument("--earnings", type=int, default=50, help="loyalty ledger entries")
    erase.add_argument("--updates", type=int, default=5, help="baseline updates per person")
    args = parser.parse_args(argv)
    if args.erase:
        main_erase(args, argv if argv is not None else sys.argv[1:])
        return
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


def main_erase(args: argparse.Namespace, argv: list[str]) -> None:
    sizes = EraseSizes(args.interactions, args.deals, args.cases, args.earnings)
    if not 1 <= args.persons <= 5 or not 1 <= args.updates <= 50:
        raise SystemExit("--persons must be 1..5 and --updates 1..50")
    if not (0 <= sizes.interactions <= 1000 and 1 <= sizes.deals <= 50
            and 1 <= sizes.cases <= 50 and 1 <= sizes.earnings <= 500):  # fmt: skip
        raise SystemExit("history too large: at most 1000 interactions, 50 deals and cases, "
                         "500 earnings (and at least one of each but interactions)")  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    stores = ("sqlite", "postgres") if args.store == "both" else (args.store,)
    shown = " ".join(a for a in argv if a != "--record")
    tables = []
    for store in stores:
        runs = run_erase(store, args.persons, sizes, args.updates)
        tables.append(render_erase(store, shown, sizes, runs))
        print("\n".join(tables[-1]), flush=True)
    text = render_erase_section(tables)
    if args.record:
        record_section(ROOT / "docs" / "benchmarks.md", text, ERASE_BEGIN, ERASE_END)
        print("recorded in docs/benchmarks.md")


if __name__ == "__main__":
    main()
