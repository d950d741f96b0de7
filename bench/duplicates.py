"""`python -m bench.duplicates`: the duplicate index over 100,000 contacts.

One bounded run in this process on a SQLite store in a scratch directory:

- the store is seeded through the service's command bus, many new contacts
  per command (so seeding takes seconds, not minutes): companies, persons
  with a work or a free-mail address and a phone, and about 2% duplicates of
  earlier persons (the same email under another name, the same phone written
  otherwise, a misspelt name at the same work domain);
- the index (`crm_contacts.duplicate_index`) is built from the log: the time
  from opening it on the full store until it has caught up;
- the scan over the whole base: its time, the facts rows it read per second,
  the pairs it found, how many of the planted duplicates are among them, and
  the process's peak RSS while it ran; a second scan at the same log position
  (answered from the kept result);
- the check of single contacts (`check`, as `POST /duplicates/check` runs it):
  the median and the 95th percentile over a sample.

A scan is reads and comparisons, no write: against the bare save loop there
is nothing to compare, so the figures stand alone (the machine's load is
noted). The section between the duplicates markers of docs/benchmarks.md is
rewritten; numbers are recorded, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.__main__ import machine
from bench.imports import PeakRss
from bench.sections import record_section
from crm_common.commands import Caller, UnitOfWork
from crm_common.settings import Settings
from crm_contacts import validation
from crm_contacts.application import ContactsService, create_application
from crm_contacts.domain import Company, CompanyProfile, Person
from crm_contacts.duplicate_index import DuplicateIndex
from crm_contacts.duplicates import Pair
from crm_contacts.inputs import ChannelInput, NewCompany, NewPerson

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- duplicates benchmark: begin (written by python -m bench.duplicates) -->"
END = "<!-- duplicates benchmark: end -->"
CALLER = Caller(actor="bench", client="bench-duplicates")
GIVEN = [
    "Ada",
    "Alan",
    "Grace",
    "Linus",
    "Barbara",
    "Edsger",
    "Donald",
    "Margaret",
    "Ken",
    "Dennis",
    "Frances",
    "John",
    "Radia",
    "Niklaus",
    "Tim",
    "Katherine",
    "Guido",
    "Bjarne",
    "Hedy",
    "Claude",
    "Annie",
    "Jean",
    "Sophie",
    "Lucas",
    "Emma",
    "Noah",
    "Mia",
    "Elias",
    "Lea",
    "Paul",
    "Clara",
    "Felix",
    "Nora",
    "Jonas",
    "Ida",
    "Oskar",
    "Marta",
    "Henrik",
    "Elena",
    "Tomas",
]
FAMILY = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Torvalds",
    "Liskov",
    "Dijkstra",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Ritchie",
    "Allen",
    "Backus",
    "Perlman",
    "Wirth",
    "Berners",
    "Johnson",
    "Rossum",
    "Stroustrup",
    "Lamarr",
    "Shannon",
    "Easley",
    "Sammet",
    "Muller",
    "Schmidt",
    "Schneider",
    "Fischer",
    "Weber",
    "Meyer",
    "Wagner",
    "Becker",
    "Schulz",
    "Hoffmann",
    "Koch",
    "Richter",
    "Klein",
    "Wolf",
    "Neumann",
    "Schwarz",
    "Zimmermann",
    "Braun",
    "Hartmann",
    "Lange",
    "Werner",
    "Krause",
    "Lehmann",
    "Kaiser",
    "Fuchs",
    "Peters",
    "Scholz",
    "Moeller",
    "Vogel",
    "Jung",
    "Keller",
    "Roth",
    "Frank",
    "Berger",
    "Winkler",
    "Lorenz",
]


@dataclass
class Seed:
    contacts: int = 0
    companies: int = 0
    #: The planted duplicates with their originals, as the scan names pairs.
    planted: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Results:
    seed: Seed
    build_seconds: float = 0.0
    facts_rows: int = 0
    scan_seconds: float = 0.0
    rescan_seconds: float = 0.0
    pairs: int = 0
    found_planted: int = 0
    oversized: int = 0
    rss_before: int = 0
    rss_peak: int = 0
    check_ms: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def _settings(data_dir: Path) -> Settings:
    return Settings(
        service="contacts",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


def _person(i: int, rng: random.Random, companies: int) -> NewPerson:
    given, family = rng.choice(GIVEN), rng.choice(FAMILY)
    if i % 2:
        address = f"{given}.{family}.{i}@firm{i % companies}.example.com".lower()
    else:
        address = f"{given}{i}@gmail.com".lower()
    phone = f"+4479{i:08d}"
    return NewPerson(
        given_name=given,
        family_name=family,
        channels=(ChannelInput("email", address), ChannelInput("phone", phone)),
    )


def _duplicate(original: NewPerson, n: int, rng: random.Random) -> NewPerson:
    """A look-alike of `original`, in turn by email, by phone, by name at its domain."""
    email, phone = original.channels[0].address, original.channels[1].address
    given, family = original.given_name, original.family_name
    style = n % 3
    if style == 0:  # the same person from another channel: same email, a nickname
        return NewPerson(
            given_name=given[:3], family_name=family, channels=(ChannelInput("email", email),)
        )
    if style == 1:  # the same phone, written the local way, without the email
        local = f"00{phone[1:3]} {phone[3:7]} {phone[7:]}"
        return NewPerson(
            given_name=given, family_name=family, channels=(ChannelInput("phone", local),)
        )
    domain = email.rpartition("@")[2]  # a misspelt name at the same domain
    misspelt = family[:-2] + family[-1] + family[-2]
    return NewPerson(
        given_name=given,
        family_name=misspelt,
        channels=(ChannelInput("email", f"{given}.{misspelt}.{n}@{domain}".lower()),),
    )


async def seed(service: ContactsService, contacts: int, per_command: int) -> Seed:
    """`contacts` contacts: 5% companies, 2% duplicates, the rest persons (about
    ten persons with a work address per company)."""
    rng = random.Random(14)
    result = Seed(companies=max(1, contacts // 20))
    duplicates = contacts // 50
    persons = contacts - result.companies - duplicates
    now = datetime.now(UTC)
    started = time.perf_counter()
    profiles: list[object] = [
        validation.new_company_profile(NewCompany(name=f"Firm {c}", domain=f"firm{c}.example.com"))
        for c in range(result.companies)
    ]
    people = [_person(i, rng, result.companies) for i in range(persons)]
    # Duplicates of the odd (work address) persons for the name-at-domain kind.
    originals = [rng.randrange(persons // 2) * 2 + 1 for _ in range(duplicates)]
    for n, original in enumerate(originals):
        people.append(_duplicate(people[original], n, rng))
    profiles += [validation.new_person_profile(p, now) for p in people]

    async def one(chunk: list[object]) -> list[str]:
        made: list[Person | Company] = []

        def decide(uow: UnitOfWork) -> Person | Company:
            made.clear()  # a command retried alone decides again
            for profile in chunk:
                if isinstance(profile, CompanyProfile):
                    made.append(uow.add(Company.register(profile)))
                else:
                    made.append(uow.add(Person.register(profile)))
            return made[-1]

        await service.bus.execute_async(CALLER.command("SeedContacts", len(chunk)), decide)
        return [str(a.id) for a in made]

    ids: list[str] = []
    chunks = [profiles[s : s + per_command] for s in range(0, len(profiles), per_command)]
    for start in range(0, len(chunks), 4):  # four commands in flight: shared saves
        for made in await asyncio.gather(*(one(c) for c in chunks[start : start + 4])):
            ids.extend(made)
    result.seconds = time.perf_counter() - started
    result.contacts = len(ids)
    at = result.companies  # persons follow the companies in `ids`
    for n, original in enumerate(originals):
        first, second = sorted((ids[at + original], ids[at + persons + n]))
        result.planted.append((first, second))
    return result


async def measure(args: argparse.Namespace, scratch: Path) -> Results:
    load = [os.getloadavg()[0]]
    service = ContactsService(create_application(_settings(scratch / "store")))
    try:
        print(f"[duplicates] seeding {args.contacts:,} contacts", flush=True)
        seeded = await seed(service, args.contacts, args.per_command)
        results = Results(seeded)
        print(f"[duplicates] seeded in {seeded.seconds:.1f} s; building the index", flush=True)
        started = time.perf_counter()
        index = DuplicateIndex.open(service.app)
        index.catch_up()
        results.build_seconds = time.perf_counter() - started
        try:
            with index.database.read() as tx:
                row = tx.one("SELECT COUNT(*) FROM duplicate_facts")
            results.facts_rows = int(row[0]) if row else 0
            print(
                f"[duplicates] index built in {results.build_seconds:.1f} s; scanning", flush=True
            )
            with PeakRss() as peak:
                results.rss_before = peak.peak
                started = time.perf_counter()
                scanned = index.scan()
                results.scan_seconds = time.perf_counter() - started
            results.rss_peak = peak.peak
            started = time.perf_counter()
            index.scan()
            results.rescan_seconds = time.perf_counter() - started
            results.pairs = len(scanned.pairs)
            results.oversized = scanned.oversized
            results.found_planted = _planted_found(seeded, scanned.pairs)
            results.check_ms = _checks(index, args.checks, results.facts_rows)
        finally:
            index.close()
    finally:
        service.close()
    load.append(os.getloadavg()[0])
    results.load = load
    return results


def _planted_found(seeded: Seed, pairs: tuple[Pair, ...]) -> int:
    """The planted duplicates the scan paired with their originals."""
    found = {(p.first, p.second) for p in pairs}
    return sum(1 for pair in seeded.planted if pair in found)


def _checks(index: DuplicateIndex, count: int, rows: int) -> list[float]:
    """Milliseconds per check of `count` contacts taken at random from the index."""
    rng = random.Random(7)
    sample = [f for f in index.walk() if rng.random() < count / max(rows, 1)][:count]
    timings = []
    for facts in sample:
        started = time.perf_counter()
        index.check(facts)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _mib(value: int) -> str:
    return f"{value / 1024**2:,.0f} MiB"


def render(r: Results) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    s = r.seed
    checks = sorted(r.check_ms)
    p50 = statistics.median(checks) if checks else 0.0
    p95 = checks[int(len(checks) * 0.95)] if checks else 0.0
    rows = [
        f"| seeding {s.contacts:,} contacts through the command bus | "
        f"{s.contacts / s.seconds:,.0f} contacts/s ({s.seconds:.1f} s) | many per command |",
        f"| building the index from the log | **{r.build_seconds:.1f} s** "
        f"({r.facts_rows / r.build_seconds:,.0f} contacts/s) | {r.facts_rows:,} facts rows |",
        f"| scan over the whole base | **{r.scan_seconds:.1f} s** "
        f"({r.facts_rows / r.scan_seconds:,.0f} rows/s) | {r.pairs:,} pairs; "
        f"{r.found_planted:,} of {len(s.planted):,} planted duplicates among them |",
        f"| the same scan again (nothing written since) | {r.rescan_seconds * 1000:.1f} ms | "
        "the kept result |",
        f"| check of one contact ({len(checks):,} contacts) | median {p50:.2f} ms, "
        f"95th percentile {p95:.2f} ms | |",
    ]
    return "\n".join(
        [
            BEGIN,
            "## Contacts: duplicate scan",
            "",
            f"- **Machine:** {machine()}",
            f"- **Run:** {when}; SQLite store; {s.contacts:,} contacts ({s.companies:,} "
            "companies; persons with a work or free-mail address and a phone; 2% duplicates "
            "of earlier persons: the same email under a nickname, the same phone written the "
            "local way, a misspelt name at the same work domain). The machine is shared: its "
            "load average was " + " and ".join(f"{x:.1f}" for x in r.load) + " at the start "
            f"and the end of the run, on {os.cpu_count()} cores.",
            "",
            "| measure | time | notes |",
            "|---|---|---|",
            *rows,
            "",
            f"Memory during the scan: the process's RSS was {_mib(r.rss_before)} before it "
            f"and at most **{_mib(r.rss_peak)}** while it ran. The scan reads the facts "
            "table in keyset pages and keeps each blocking key's contacts (at most 200 per "
            f"key; {r.oversized:,} keys were larger and not paired on) until the end of the "
            "walk; a check reads only the rows sharing one of its keys. A scan is reads and "
            "comparisons, no write: there is no same-run reference to set it against.",
            END,
        ]
    )


def record(text: str, out: Path) -> None:
    """Replaces this benchmark's section of `out` (or adds it)."""
    record_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duplicates", description=__doc__)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--per-command", type=int, default=500)
    parser.add_argument("--checks", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crm-bench-duplicates-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    text = render(result)
    print(text)
    record(text, Path(args.out))


if __name__ == "__main__":
    main()
