"""The duplicate index: the query tables that find a contact's look-alikes
(`crm_contacts.duplicates` holds the rules; this module finds the candidates).

A tracked projection of the event log (`crm_common.querystore`) of its own, so
that a check reads a handful of rows whatever the size of the base:

- `duplicate_facts`: one row per live contact: what the rules compare (its
  kind, display name, emails, phones, own domains) and, for a person, the ids
  of the companies they work at;
- `duplicate_links`: `(company_id, person_id)`, so that a company whose web
  domain changes re-keys the persons working there;
- `duplicate_keys`: `(key, contact_id)`, the blocking keys
  (`duplicates.blocking_keys`: `email:`, `phone:`, `domain:<kind>:`) of each
  contact, indexed on the key.

A person's domains are their email domains (not a free mail provider's) and
the web domains of their companies, read from the companies' own rows. A
tombstone (a contact merged into another: `merged_into`) and an erased person
(`Person.PersonErased`) have no row and no key: they are never candidates.

The tables hold every kind of key whatever the rules in force, so changing
the rules (`CRM_CONTACTS_DUPLICATE_RULES`, or `_FILE`) needs no rebuild: a
check looks up only the keys of the rules it applies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from eventsourcing.application import Application

from crm_common.querystore import AggregateProjection, QueryDatabase, QuerySide, Tx
from crm_common.settings import Settings
from crm_contacts.domain import PHONE_CHANNELS, Channel, Company, Contact, Person, PersonProfile
from crm_contacts.duplicates import (
    DEFAULT_RULES,
    RULE_KINDS,
    DuplicateRules,
    Facts,
    Match,
    Pair,
    Rule,
    Scan,
    best_matches,
    blocking_keys,
    facts_for_company,
    facts_for_person,
)

FACTS = "duplicate_facts"
LINKS = "duplicate_links"
KEYS = "duplicate_keys"
#: A key shared by more contacts than this (a huge company's domain, a shared
#: switchboard number) is too common to compare on: a check leaves it out, as
#: the scan does (`Scan.max_block`), rather than compare an arbitrary few hundred
#: of its contacts (on every create, with the check on create).
MAX_CANDIDATES_PER_KEY = 200
#: Facts rows a scan reads per query.
SCAN_PAGE = 2000
#: Every kind of key, whatever the rules in force (see the module).
ALL_KEYS = DuplicateRules(tuple(Rule(kind, 1.0) for kind in RULE_KINDS))

RULES_VARIABLE = "CRM_CONTACTS_DUPLICATE_RULES"
RULES_FILE_VARIABLE = "CRM_CONTACTS_DUPLICATE_RULES_FILE"


def rules_from_environment(environ: dict[str, str] | None = None) -> DuplicateRules:
    """The rules configured (`CRM_CONTACTS_DUPLICATE_RULES`, JSON; or
    `CRM_CONTACTS_DUPLICATE_RULES_FILE`, a YAML or JSON file), else the defaults.

    A malformed configuration raises `ValueError` at start-up rather than
    checking with rules nobody chose."""
    env = os.environ if environ is None else environ
    text = env.get(RULES_VARIABLE, "").strip()
    path = env.get(RULES_FILE_VARIABLE, "").strip()
    if text:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{RULES_VARIABLE} is not JSON: {exc}") from exc
    elif path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{RULES_FILE_VARIABLE} cannot be read: {exc}") from exc
    else:
        return DEFAULT_RULES
    if not isinstance(data, dict):
        raise ValueError("duplicate rules must be a mapping with a `rules` list")
    return DuplicateRules.from_config(data)


def _text(value: str) -> str:
    """PostgreSQL's TEXT cannot hold NUL."""
    return value.replace("\x00", "")


def _list(values: Any) -> str:
    return json.dumps(sorted(_text(v) for v in values), separators=(",", ":"))


# -- the projection -------------------------------------------------------------------------


class DuplicateTables(AggregateProjection):
    """Each live contact's facts, links and blocking keys (see the module)."""

    name = "duplicate-index"
    version = 1
    tables = (FACTS, LINKS, KEYS)
    #: `Contact`: the merge events are `Contact`'s own, for either kind.
    kinds = (Contact,)

    def create(self, tx: Tx) -> None:
        text = 'TEXT COLLATE "C"' if tx.dialect == "postgres" else "TEXT"
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {FACTS} ("
            f" contact_id {text} PRIMARY KEY,"
            " kind TEXT NOT NULL,"
            " name TEXT NOT NULL,"
            " emails TEXT NOT NULL,"
            " phones TEXT NOT NULL,"
            " domains TEXT NOT NULL,"
            " company_ids TEXT NOT NULL)"
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {LINKS} ("
            f" company_id {text} NOT NULL, person_id {text} NOT NULL,"
            " PRIMARY KEY (company_id, person_id))"
        )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {LINKS}_person ON {LINKS} (person_id)")
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {KEYS} ("
            f" key {text} NOT NULL, contact_id {text} NOT NULL,"
            " PRIMARY KEY (key, contact_id))"
        )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {KEYS}_contact ON {KEYS} (contact_id)")

    def __init__(self, app: Application[UUID]) -> None:
        super().__init__(app)
        self._rows: list[tuple[str, ...]] = []
        self._links: dict[str, list[str]] = {}
        self._gone: list[str] = []

    def apply(self, tx: Tx, events: Sequence[Any]) -> None:
        self.reset_batch()
        super().apply(tx, events)
        self._write(tx)

    def project(self, tx: Tx, aggregate: Any) -> None:
        """Collects the contact's rows: `_write` stores a batch's rows together (a
        few statements a batch, not a few a contact)."""
        ident = str(aggregate.id)
        if (
            not isinstance(aggregate, (Person, Company))
            or aggregate.merged_into is not None
            or aggregate.erased  # nothing personal of theirs is compared again
        ):
            self._gone.append(ident)
            return
        profile = aggregate.profile
        company_ids: list[str] = []
        if isinstance(profile, PersonProfile):
            emails = {c.address for c in profile.channels if c.channel is Channel.EMAIL}
            phones = {c.address for c in profile.channels if c.channel in PHONE_CHANNELS}
            own = facts_for_person(ident, aggregate.display_name, sorted(emails), sorted(phones))
            company_ids = sorted(getattr(aggregate, "affiliations", {}))
        else:
            own = facts_for_company(ident, profile.name, profile.domain)
        self._rows.append(
            (
                ident,
                own.kind,
                _text(own.name),
                _list(own.emails),
                _list(own.phones),
                _list(own.domains),
                _list(company_ids),
            )
        )
        self._links[ident] = company_ids

    def _write(self, tx: Tx) -> None:
        gone, rows, links = self._gone, self._rows, self._links
        self.reset_batch()
        for chunk in _chunks(gone):
            for table, column in (
                (FACTS, "contact_id"),
                (KEYS, "contact_id"),
                (LINKS, "person_id"),
            ):
                tx.execute(
                    f"DELETE FROM {table} WHERE {column} IN ({tx.placeholders(len(chunk))})", chunk
                )
        tx.executemany(
            f"INSERT INTO {FACTS} (contact_id, kind, name, emails, phones, domains, company_ids)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (contact_id) DO UPDATE SET"
            " kind = excluded.kind, name = excluded.name, emails = excluded.emails,"
            " phones = excluded.phones, domains = excluded.domains,"
            " company_ids = excluded.company_ids",
            rows,
        )
        idents = [row[0] for row in rows]
        for chunk in _chunks(idents):
            tx.execute(
                f"DELETE FROM {LINKS} WHERE person_id IN ({tx.placeholders(len(chunk))})", chunk
            )
        tx.executemany(
            f"INSERT INTO {LINKS} (company_id, person_id) VALUES (?, ?)",
            [(c, person) for person, companies in links.items() for c in companies],
        )
        # Companies' persons too (a merged company's included): their domains
        # follow their companies'.
        rekeyed = set(idents)
        companies = [row[0] for row in rows if row[1] == "company"] + gone
        for chunk in _chunks(companies):
            found = tx.all(
                f"SELECT person_id FROM {LINKS}"
                f" WHERE company_id IN ({tx.placeholders(len(chunk))})",
                chunk,
            )
            rekeyed.update(str(r[0]) for r in found)
        self._rekey(tx, sorted(rekeyed))

    def reset_batch(self) -> None:
        self._rows, self._links, self._gone = [], {}, []

    def reset(self) -> None:
        super().reset()
        self.reset_batch()

    @staticmethod
    def _rekey(tx: Tx, idents: Sequence[str]) -> None:
        for chunk in _chunks(idents):
            tx.execute(
                f"DELETE FROM {KEYS} WHERE contact_id IN ({tx.placeholders(len(chunk))})", chunk
            )
        tx.executemany(
            f"INSERT INTO {KEYS} (key, contact_id) VALUES (?, ?)",
            [
                (_text(k), facts.id)
                for facts in read_facts(tx, idents)
                for k in sorted(blocking_keys(facts, ALL_KEYS))
            ],
        )


def _chunks(values: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


# -- reading facts back -----------------------------------------------------------------------


def _facts_of(
    rows: Sequence[tuple[Any, ...]], company_domains: dict[str, list[str]]
) -> list[Facts]:
    found = []
    for ident, kind, name, emails, phones, domains, company_ids in rows:
        linked = [d for c in json.loads(company_ids) for d in company_domains.get(c, ())]
        found.append(
            Facts(
                str(ident),
                str(kind),
                str(name),
                frozenset(json.loads(emails)),
                frozenset(json.loads(phones)),
                frozenset(json.loads(domains)) | frozenset(linked),
            )
        )
    return found


def company_domains(tx: Tx, company_ids: Sequence[str]) -> dict[str, list[str]]:
    """The web domain (as a one-item list, or none) of each known company of `company_ids`."""
    found: dict[str, list[str]] = {}
    wanted = sorted(set(company_ids))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows = tx.all(
            f"SELECT contact_id, domains FROM {FACTS}"
            f" WHERE kind = 'company' AND contact_id IN ({tx.placeholders(len(chunk))})",
            chunk,
        )
        found.update((str(c), json.loads(d)) for c, d in rows)
    return found


_COLUMNS = "contact_id, kind, name, emails, phones, domains, company_ids"


def read_facts(tx: Tx, idents: Sequence[str]) -> list[Facts]:
    """The facts of the live contacts among `idents` (a person's with their
    companies' domains)."""
    rows: list[tuple[Any, ...]] = []
    wanted = sorted(set(idents))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        rows += tx.all(
            f"SELECT {_COLUMNS} FROM {FACTS} WHERE contact_id IN ({tx.placeholders(len(chunk))})",
            chunk,
        )
    linked = [c for row in rows for c in json.loads(row[6])]
    return _facts_of(rows, company_domains(tx, linked))


# -- the index --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A look-alike with the name a person recognises it by."""

    match: Match
    kind: str
    name: str


@dataclass(frozen=True)
class ScanResult:
    """The candidate pairs of the whole base at one log position."""

    position: int
    pairs: tuple[Pair, ...]
    names: dict[str, str]
    #: Keys shared by too many contacts to pair on (`Scan.max_block`).
    oversized: int


class DuplicateIndex:
    """Checks and scans over the duplicate tables (see the module)."""

    def __init__(
        self,
        app: Application[UUID],
        database: QueryDatabase,
        *,
        rules: DuplicateRules | None = None,
    ) -> None:
        self.rules = rules or rules_from_environment()
        self.database = database
        self.tables = DuplicateTables(app)
        self.query_side = QuerySide(app, database, [self.tables])
        self._scanned: dict[int, ScanResult] = {}

    @classmethod
    def open(cls, app: Application[UUID], *, rules: DuplicateRules | None = None) -> DuplicateIndex:
        settings: Settings | None = getattr(app, "settings", None)
        if settings is None:
            raise ValueError("the application was not made by create_application: no settings")
        return cls(app, QueryDatabase(settings), rules=rules)

    def close(self) -> None:
        self.query_side.close()
        self.database.close()

    def catch_up(self) -> int:
        return self.query_side.catch_up()

    # -- facts of what is being checked --

    def facts_of(self, contact_id: str) -> Facts | None:
        """The stored facts of a live contact (None: unknown, or a tombstone)."""
        if not _is_contact_id(contact_id):
            return None
        self.catch_up()
        with self.database.read() as tx:
            found = read_facts(tx, [contact_id])
        return found[0] if found else None

    def domains_of_companies(self, company_ids: Sequence[str]) -> dict[str, list[str]]:
        """Known companies' domains, by id (an unknown company is absent)."""
        wanted = [i for i in company_ids if _is_contact_id(i)]
        if not wanted:
            return {}
        self.catch_up()
        with self.database.read() as tx:
            return company_domains(tx, wanted)

    # -- checking --

    def check(self, facts: Facts) -> list[Candidate]:
        """The live contacts that look like `facts`, best first."""
        keys = sorted(blocking_keys(facts, self.rules))
        if not keys:
            return []
        self.catch_up()
        with self.database.read() as tx:
            idents: set[str] = set()
            for key in keys:
                rows = tx.all(
                    f"SELECT contact_id FROM {KEYS} WHERE key = ? ORDER BY contact_id LIMIT ?",
                    (_text(key), MAX_CANDIDATES_PER_KEY + 2),
                )
                found = {str(r[0]) for r in rows} - {facts.id}
                if len(found) > MAX_CANDIDATES_PER_KEY:
                    continue  # too common to say anything (see MAX_CANDIDATES_PER_KEY)
                idents.update(found)
            idents.discard(facts.id)
            candidates = read_facts(tx, sorted(idents))
        by_id = {c.id: c for c in candidates}
        return [
            Candidate(m, by_id[m.other].kind, by_id[m.other].name)
            for m in best_matches(facts, candidates, self.rules)
        ]

    # -- scanning --

    def walk(self, page: int = SCAN_PAGE) -> Iterator[Facts]:
        """Every live contact's facts, in keyset pages of the facts table."""
        after = ""
        while True:
            with self.database.read() as tx:
                rows = tx.all(
                    f"SELECT {_COLUMNS} FROM {FACTS} WHERE contact_id > ?"
                    " ORDER BY contact_id LIMIT ?",
                    (after, page),
                )
                linked = [c for row in rows for c in json.loads(row[6])]
                domains = company_domains(tx, linked)
            if not rows:
                return
            yield from _facts_of(rows, domains)
            after = str(rows[-1][0])

    def scan(self) -> ScanResult:
        """The candidate pairs over the whole base, best first; computed once per
        log position (a later call at the same position answers from memory)."""
        position = self.catch_up()
        cached = self._scanned.get(position)
        if cached is not None:
            return cached
        scanner = Scan(self.rules)
        names: dict[str, str] = {}
        for facts in self.walk():
            scanner.add(facts)
        pairs = tuple(scanner.pairs())
        wanted = {p.first for p in pairs} | {p.second for p in pairs}
        with self.database.read() as tx:
            for facts in read_facts(tx, sorted(wanted)):
                names[facts.id] = facts.name
        result = ScanResult(position, pairs, names, len(scanner.oversized))
        self._scanned = {position: result}
        return result


def _is_contact_id(value: str) -> bool:
    """Contact ids are UUIDs; anything else names no contact (and never reaches
    the database, which may refuse some characters outright)."""
    try:
        return str(UUID(value)) == value.lower()
    except (ValueError, AttributeError, TypeError):
        return False
