"""CSV import of persons and companies as a job: the file is stored, checked
against its column mapping, then imported row by row through the service's own
commands, in the background of the API process.

Why a job and not one request: a file of 100,000 rows takes minutes, and a
client, a proxy or the process itself may stop meanwhile. So the upload is
streamed to a file under the service's data directory (never held in memory,
at most `MAX_FILE_BYTES`), and the job's state, progress and failed rows are
rows in the service's own database (`crm_common.querystore.QueryDatabase`,
operational data, not events): any replica answers the progress, and a
restarted process resumes an unfinished job from the last line recorded.

Each row is one command (`CreatePerson`/`UpdatePerson`, `CreateCompany`/
`UpdateCompany`), so validation, the custom-field definitions in force, the
events and their audit metadata are the ordinary ones. Up to `IN_FLIGHT` rows
run at once, so the command bus's group commit stores them in shared
transactions. Every command carries the request id `import:<digest>:<line>`
(the digest of the file and the mapping): a row replayed after a crash is
answered from its receipt instead of being written twice, and a second run of
the same file finds each row's receipt and skips it.

Upsert: a row matches an existing contact on its email (persons, through the
directory) or its domain (companies, through `CompanyDomains`, a small query
table of this module); a match is updated in the mapped fields only (a field
mask; an empty cell leaves its field as it is, a new phone or email is added
beside the contact's other identities), no match is created. An update that
would change nothing sends no command at all: the row is `unchanged` and
nothing is stored, not even a receipt. Matching on a custom field is refused:
the directory cannot look up custom-field values.

A dry run goes through the same checks and lookups and writes no contact: its
report (and its failed rows) are kept like a job's.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from eventsourcing.application import AggregateNotFoundError

from crm_common.auth.principal import Principal
from crm_common.commands import Caller, CommandReceipt
from crm_common.errors import CrmError, FieldErrors, NotFound, RequestTooLarge, ValidationFailed
from crm_common.eventstore import creating_tables
from crm_common.querystore import AggregateProjection, QueryDatabase, QuerySide, Tx
from crm_contacts import validation
from crm_contacts.application import SERVICE, ContactsService
from crm_contacts.domain import Company, CompanyProfile, ContactKind, PersonProfile
from crm_contacts.domain.lifecycle import check_stage_change
from crm_contacts.imports import (
    CUSTOM,
    ColumnMapping,
    ImportRow,
    MappingRefused,
    RowFailure,
    read_rows,
)
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_contacts.views import ContactView

log = logging.getLogger(__name__)

#: The largest file an import takes.
MAX_FILE_BYTES = 200 * 1024 * 1024
#: Rows whose commands run at once (the command bus commits them in shared batches).
IN_FLIGHT = 32
#: Progress is recorded at least every this many rows, and every `FLUSH_SECONDS`.
FLUSH_ROWS = 500
FLUSH_SECONDS = 1.0
#: A running job's claim: renewed with each progress record; another process
#: resumes a job whose claim has lapsed (its process stopped).
LEASE_SECONDS = 30.0
#: How often a process looks for unfinished jobs to resume.
RESUME_INTERVAL = 10.0
#: Failed rows a dry run's answer lists (all of them are in its failures report).
DRY_RUN_SHOWN = 100
#: How often a running import brings the lookup tables up to date with the log.
CATCH_UP_SECONDS = 1.0
#: Bytes read from an upload at a time.
CHUNK = 64 * 1024

JOBS = "import_jobs"
FAILURES = "import_failures"
DOMAINS = "import_company_domains"
#: The lines of a file (by its digest with the mapping) that created or updated a contact.
DONE = "import_rows_done"
#: The directory's table of persons' emails (`crm_contacts.directory.KEY_TABLES`).
EMAILS = "directory_emails"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Outcome(StrEnum):
    """What a row did (or, in a dry run, would do)."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    #: Imported already by an earlier run of the same file (its receipt answers).
    SKIPPED = "skipped"
    FAILED = "failed"


COUNTED = tuple(Outcome)


@dataclass(frozen=True)
class RowResult:
    line: int
    outcome: Outcome
    reason: str = ""
    cells: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Progress:
    #: The last line of the file whose row (and every row before it) is done.
    line: int = 0
    rows: int = 0
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))

    def add(self, result: RowResult) -> None:
        self.line = max(self.line, result.line)
        self.rows += 1
        self.counts[result.outcome] += 1


@dataclass(frozen=True)
class ImportView:
    """An import as callers see it."""

    id: str
    kind: ContactKind
    state: JobState
    dry_run: bool
    file_name: str
    size: int
    digest: str
    columns: Mapping[str, str]
    match_on: str
    progress: Progress
    error: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    #: A dry run's answer: its first failed rows (all are in the failures report).
    failures: tuple[RowResult, ...] = ()


@dataclass(frozen=True)
class FailurePage:
    failures: tuple[RowResult, ...]
    #: The line to continue after (0: no more).
    next_after: int


@dataclass
class _Job:
    id: str
    mapping: ColumnMapping
    digest: str
    path: Path
    dry_run: bool
    caller: Caller
    created_at: datetime
    progress: Progress
    #: Taken over after a stop: rows may have run already.
    resumed: bool = False
    #: Rows after the resume line whose commands may have run before the stop
    #: (those since the last progress record, and the ones in flight): their
    #: receipts say what they did.
    receipts_to_check: int = 0
    #: Whether an earlier job imported the same file with the same mapping.
    ran_before: bool = False


@dataclass(frozen=True)
class _Plan:
    outcome: Outcome
    reason: str = ""
    new: NewPerson | NewCompany | None = None
    changes: PersonChanges | CompanyChanges | None = None


class _LeaseLost(Exception):
    """Another process took the job over (this one's claim lapsed)."""


# -- callers kept with a job, so a resumed job acts as its submitter ------------------------


def _principal_dict(principal: Principal | None) -> dict[str, Any] | None:
    if principal is None:
        return None
    return {
        "subject": principal.subject,
        "roles": sorted(principal.roles),
        "client": principal.client,
        "on_behalf_of": _principal_dict(principal.on_behalf_of),
    }


def _principal_of(data: Mapping[str, Any] | None) -> Principal | None:
    if data is None:
        return None
    return Principal(
        subject=str(data["subject"]),
        roles=frozenset(data["roles"]),
        client=str(data["client"]),
        on_behalf_of=_principal_of(data.get("on_behalf_of")),
    )


def _caller_json(caller: Caller) -> str:
    return json.dumps(
        {
            "actor": caller.actor,
            "client": caller.client,
            "principal": _principal_dict(caller.principal),
        }
    )


def _caller_of(text: str) -> Caller:
    data = json.loads(text)
    return Caller(
        actor=data["actor"], client=data["client"], principal=_principal_of(data["principal"])
    )


def _mapping_json(mapping: ColumnMapping) -> str:
    return json.dumps(
        {"kind": str(mapping.kind), "columns": dict(mapping.columns), "match_on": mapping.match_on}
    )


def import_digest(file_digest: str, mapping: ColumnMapping) -> str:
    """What makes a run a re-run: the same file imported with the same mapping."""
    return hashlib.sha256(f"{file_digest}:{mapping.fingerprint()}".encode()).hexdigest()[:32]


def request_id(digest: str, line: int) -> str:
    return f"import:{digest}:{line}"


def _domain_of(value: str) -> str | None:
    """A company domain as companies store it, or None when it is not one."""
    try:
        return validation.new_company_profile(NewCompany(name="-", domain=value)).domain or None
    except ValidationFailed:
        return None


def _reason(error: Exception) -> str:
    if isinstance(error, ValidationFailed):
        return "; ".join(f"{e.field}: {e.message}" for e in error.errors)
    if isinstance(error, CrmError):
        return error.message
    return f"{type(error).__name__}: {error}"


def _now() -> datetime:
    return datetime.now(UTC)


# -- company domains: the lookup the directory lacks ----------------------------------------


class CompanyDomains(AggregateProjection):
    """`import_company_domains`: each company's domain, so that a company row
    finds the company it updates. A tracked projection of the event log like
    the directory's tables (applied exactly once, shared by replicas)."""

    name = "import-company-domains"
    version = 1
    tables = (DOMAINS,)
    kinds = (Company,)

    def create(self, tx: Tx) -> None:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {DOMAINS} ("
            " domain TEXT NOT NULL, contact_id TEXT NOT NULL, PRIMARY KEY (domain, contact_id))"
        )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {DOMAINS}_contact ON {DOMAINS} (contact_id)")

    def apply(self, tx: Tx, events: Sequence[Any]) -> None:
        known = (Company.CompanyRegistered, Company.CompanyProfileUpdated)
        super().apply(tx, [e for e in events if isinstance(e, known)])

    def project(self, tx: Tx, aggregate: Any) -> None:
        ident = str(aggregate.id)
        tx.execute(f"DELETE FROM {DOMAINS} WHERE contact_id = ?", (ident,))
        domain = aggregate.profile.domain.replace("\x00", "")
        if domain:
            tx.execute(f"INSERT INTO {DOMAINS} (domain, contact_id) VALUES (?, ?)", (domain, ident))


# -- the jobs -------------------------------------------------------------------------------


class ImportJobs:
    """Imports of one service process: submitting, running, resuming, reporting."""

    def __init__(
        self,
        service: ContactsService,
        *,
        directory: Path | None = None,
        max_file_bytes: int = MAX_FILE_BYTES,
        in_flight: int = IN_FLIGHT,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        settings = service.app.settings
        if settings is None:
            raise ValueError("the application was not made by create_application: no settings")
        self.service = service
        self.settings = settings
        self.files = directory or settings.service_dir / "imports"
        self.max_file_bytes = max_file_bytes
        self.in_flight = in_flight
        self.lease_seconds = lease_seconds
        #: This process's claim on the jobs it runs.
        self.owner = uuid.uuid4().hex
        self._database: QueryDatabase | None = None
        self._domains: QuerySide | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resumer: asyncio.Task[None] | None = None
        self._caught_up: dict[ContactKind, float] = {}

    # -- tables --

    @property
    def database(self) -> QueryDatabase:
        """The job tables, created on first use."""
        if self._database is None:
            with creating_tables(self.settings):
                database = QueryDatabase(self.settings)
                with database.write() as tx:
                    _create_tables(tx)
            self._database = database
        return self._database

    def _domain_side(self) -> QuerySide:
        """Company domains, opened (and brought up to date) by the first company import."""
        if self._domains is None:
            self._domains = QuerySide(
                self.service.app, self.database, [CompanyDomains(self.service.app)]
            )
        return self._domains

    # -- submitting --

    async def submit(
        self,
        caller: Caller,
        mapping: ColumnMapping,
        body: AsyncIterable[bytes],
        *,
        file_name: str = "",
        dry_run: bool = False,
    ) -> ImportView:
        """Stores the file and starts its import (a dry run: runs it now, writing no contact).

        `MappingRefused` when the mapping or the file's header cannot import
        anything, `RequestTooLarge` over `max_file_bytes`, `ValidationFailed`
        for a file that is not UTF-8 text; nothing is kept then.
        """
        if mapping.match_on.startswith(CUSTOM):
            raise MappingRefused(
                "match_on",
                "the directory cannot look up custom-field values: match persons on "
                "email and companies on domain",
            )
        job_id = str(uuid.uuid4())
        self.files.mkdir(parents=True, exist_ok=True)
        path = self.files / f"{job_id}.csv"
        try:
            file_digest, size = await self._store(body, path)
            await asyncio.to_thread(self._check_header, mapping, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        job = _Job(
            id=job_id,
            mapping=mapping,
            digest=import_digest(file_digest, mapping),
            path=path,
            dry_run=dry_run,
            caller=dataclasses.replace(caller, request_id=None, expected_version=None),
            created_at=_now(),
            progress=Progress(),
        )
        await asyncio.to_thread(self._insert, job, file_name[:200], size)
        if dry_run:
            await self._run(job)
            return await self.get(job_id, shown=DRY_RUN_SHOWN)
        self._start(job)
        return await self.get(job_id)

    async def _store(self, body: AsyncIterable[bytes], path: Path) -> tuple[str, int]:
        """Streams the upload to `path`: its digest and size; refuses more than
        the limit as soon as it is passed, and bytes that are not UTF-8."""
        digest = hashlib.sha256()
        decoder = codecs.getincrementaldecoder("utf-8")()
        size = 0
        with path.open("wb") as out:
            async for chunk in body:
                if not chunk:
                    continue
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise RequestTooLarge(
                        f"the file is larger than {self.max_file_bytes} bytes; split it"
                    )
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    raise ValidationFailed.of(
                        "file", f"is not UTF-8 text (at about byte {size - len(chunk)})"
                    ) from None
                digest.update(chunk)
                out.write(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValidationFailed.of("file", "is not UTF-8 text (it ends mid-character)") from None
        return digest.hexdigest(), size

    def _custom_types(self, kind: ContactKind) -> dict[str, str]:
        definitions = self.service.fields.current(kind)
        return {k: str(d.type) for k, d in definitions.items() if not d.retired}

    def _rows(self, mapping: ColumnMapping, handle: io.TextIOBase) -> Iterator[Any]:
        normalise = validation.email_address if mapping.kind is ContactKind.PERSON else _domain_of
        return read_rows(
            handle,
            mapping,
            custom_types=self._custom_types(mapping.kind),
            normalise_match=normalise,
        )

    def _check_header(self, mapping: ColumnMapping, path: Path) -> None:
        """Refuses a file whose header lacks a mapped column, or a mapping to an
        undefined custom field, before anything is queued."""
        with path.open(encoding="utf-8-sig", newline="") as handle:
            next(self._rows(mapping, handle), None)

    def _insert(self, job: _Job, file_name: str, size: int) -> None:
        now = job.created_at.isoformat()
        with self.database.write() as tx:
            tx.execute(
                f"INSERT INTO {JOBS} (id, kind, mapping, digest, file_name, size, dry_run,"
                " state, error, caller, created_at, updated_at, finished_at, line, rows_done,"
                " created, updated, unchanged, skipped, failed, owner, lease_until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?, '', 0, 0, 0, 0, 0, 0, 0, ?, ?)",
                (
                    job.id,
                    str(job.mapping.kind),
                    _mapping_json(job.mapping),
                    job.digest,
                    file_name,
                    size,
                    int(job.dry_run),
                    str(JobState.QUEUED),
                    _caller_json(job.caller),
                    now,
                    now,
                    self.owner,
                    time.time() + self.lease_seconds,
                ),
            )

    # -- running --

    def _start(self, job: _Job) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"import {job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))

    def task(self, job_id: str) -> asyncio.Task[None] | None:
        """The task running an import in this process, if any."""
        return self._tasks.get(job_id)

    async def wait(self, job_id: str) -> ImportView:
        """Waits for an import this process runs to end; its view then."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return await self.get(job_id)

    async def _run(self, job: _Job) -> None:
        """Imports the file's rows after `job.progress.line`, recording progress as it goes.

        Rows go in chunks of `in_flight`: a chunk is decided in one worker-thread
        call (one directory lookup for all its match values) while the commands
        of the chunk before it run, so the command bus commits a chunk's
        commands together."""
        progress = job.progress
        pending: list[RowResult] = []
        since_record = 0
        flushed_at = time.monotonic()
        running: asyncio.Future[list[RowResult]] | None = None
        try:
            await asyncio.to_thread(self._record, job, [], JobState.RUNNING)
            job.ran_before = await asyncio.to_thread(self._ran_before, job)
            # At most this many rows are done between two records, plus two chunks.
            horizon = FLUSH_ROWS + 2 * max(self.in_flight, IN_FLIGHT)
            job.receipts_to_check = horizon if job.resumed else 0
            with job.path.open(encoding="utf-8-sig", newline="") as handle:
                rows = self._rows(job.mapping, handle)
                while True:
                    chunk = await asyncio.to_thread(self._next_chunk, rows, progress.line)
                    if not chunk and running is None:
                        break
                    plans = await asyncio.to_thread(self._plan_chunk, job, chunk)
                    if running is not None:
                        results = await running
                        for result in results:
                            progress.add(result)
                            if result.outcome is not Outcome.UNCHANGED:
                                pending.append(result)
                        since_record += len(results)
                        running = None
                    if since_record >= FLUSH_ROWS or time.monotonic() - flushed_at > FLUSH_SECONDS:
                        await asyncio.to_thread(self._record, job, pending)
                        pending, flushed_at, since_record = [], time.monotonic(), 0
                    if not chunk:
                        break
                    running = asyncio.ensure_future(self._execute(job, chunk, plans))
            await asyncio.to_thread(self._record, job, pending, JobState.DONE)
        except asyncio.CancelledError:
            if running is not None:
                running.cancel()
            # Stopped (the process is shutting down): another may take it over at once.
            with contextlib.suppress(Exception):
                self._release(job)
            raise
        except _LeaseLost:
            log.warning("import %s was taken over by another process", job.id)
            return
        except Exception as error:
            log.exception("import %s failed", job.id)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._record, job, pending, JobState.FAILED, _reason(error))
        # Done or failed: the failed rows are in the tables, the file is not needed again.
        job.path.unlink(missing_ok=True)

    def _next_chunk(self, rows: Iterator[Any], after: int) -> list[ImportRow | RowFailure]:
        """The next `in_flight` rows after line `after` (those before were done
        before the job was resumed; they are read again for the file's duplicates)."""
        chunk: list[ImportRow | RowFailure] = []
        for item in rows:
            if item.line > after:
                chunk.append(item)
                if len(chunk) >= self.in_flight:
                    break
        return chunk

    def _ran_before(self, job: _Job) -> bool:
        """Whether an earlier job imported the same file with the same mapping (its
        rows' receipts then say which rows are done already)."""
        with self.database.read() as tx:
            row = tx.one(
                f"SELECT 1 FROM {JOBS} WHERE digest = ? AND id <> ? AND dry_run = 0 LIMIT 1",
                (job.digest, job.id),
            )
        return row is not None

    async def _execute(
        self, job: _Job, chunk: Sequence[ImportRow | RowFailure], plans: Sequence[_Plan]
    ) -> list[RowResult]:
        """The chunk's commands, at once; each row's result in file order."""
        return list(
            await asyncio.gather(
                *(self._apply(job, item, plan) for item, plan in zip(chunk, plans, strict=True))
            )
        )

    async def _apply(self, job: _Job, item: ImportRow | RowFailure, plan: _Plan) -> RowResult:
        if (
            job.dry_run
            or plan.outcome not in (Outcome.CREATED, Outcome.UPDATED)
            or (plan.new is None and plan.changes is None)
        ):
            return RowResult(item.line, plan.outcome, plan.reason, item.cells)
        caller = dataclasses.replace(job.caller, request_id=request_id(job.digest, item.line))
        service = self.service
        try:
            if isinstance(plan.new, NewPerson):
                # The import matched the file against the base itself (upsert on
                # email or external id); nobody would see a create's warning.
                await service.create_person(caller, plan.new, check_duplicates=False)
            elif isinstance(plan.new, NewCompany):
                await service.create_company(caller, plan.new)
            elif isinstance(plan.changes, PersonChanges):
                await service.update_person(caller, plan.changes)
            elif isinstance(plan.changes, CompanyChanges):
                await service.update_company(caller, plan.changes)
        except CrmError as error:
            return RowResult(item.line, Outcome.FAILED, _reason(error), item.cells)
        return RowResult(item.line, plan.outcome, cells=item.cells)

    # -- deciding rows (in a worker thread) --

    def _plan_chunk(self, job: _Job, chunk: Sequence[ImportRow | RowFailure]) -> list[_Plan]:
        rows = [item for item in chunk if isinstance(item, ImportRow)]
        done = self._done_before(job, [r.line for r in rows]) if rows and job.ran_before else set()
        values = [r.match_value for r in rows if r.line not in done]
        found = self._matches(job.mapping.kind, values) if values else {}
        plans = []
        for item in chunk:
            if isinstance(item, RowFailure):
                plans.append(_Plan(Outcome.FAILED, item.reason))
            elif item.line in done:
                plans.append(_Plan(Outcome.SKIPPED, "imported already by an earlier run"))
            else:
                plans.append(self._plan(job, item, found.get(item.match_value, [])))
        return plans

    def _done_before(self, job: _Job, lines: Sequence[int]) -> set[int]:
        """Lines of the file an earlier run of it created or updated a contact from."""
        with self.database.read() as tx:
            rows = tx.all(
                f"SELECT line FROM {DONE} WHERE digest = ? AND line IN"
                f" ({tx.placeholders(len(lines))})",
                [job.digest, *lines],
            )
        return {int(r[0]) for r in rows}

    def _plan(self, job: _Job, row: ImportRow, found: list[str]) -> _Plan:
        if job.receipts_to_check > 0 and not job.dry_run:
            job.receipts_to_check -= 1
            done = self._receipt(job, row.line)
            if done is not None:
                return done
        try:
            return self._decide(job, row, found)
        except CrmError as error:
            return _Plan(Outcome.FAILED, _reason(error))

    def _receipt(self, job: _Job, line: int) -> _Plan | None:
        """The row's command ran already, before this job was stopped: counted as
        what it did (the receipt of an older run of the file: skipped)."""
        ident = CommandReceipt.create_id(SERVICE, request_id(job.digest, line), job.caller.scope)
        try:
            receipt: Any = self.service.app.repository.get(ident)
        except AggregateNotFoundError:
            return None
        if receipt.created_on >= job.created_at:
            created = receipt.command in ("CreatePerson", "CreateCompany")
            return _Plan(Outcome.CREATED if created else Outcome.UPDATED)
        return _Plan(Outcome.SKIPPED, "imported already by an earlier run")

    def _decide(self, job: _Job, row: ImportRow, found: list[str]) -> _Plan:
        kind = job.mapping.kind
        definitions = self.service.fields.current(kind)
        now = self.service.clock()
        if len(found) > 1:
            return _Plan(
                Outcome.FAILED,
                f"{job.mapping.match_on} {row.match_value} matches {len(found)} contacts "
                "(merge them first)",
            )
        if not found:
            if row.person is not None:
                validation.new_person_profile(row.person, now, definitions)
                return _Plan(Outcome.CREATED, new=row.person)
            assert row.company is not None
            validation.new_company_profile(row.company, definitions)
            return _Plan(Outcome.CREATED, new=row.company)
        view = self.service.load(found[0], self.service.grant_of(job.caller))
        changes: PersonChanges | CompanyChanges | None
        profile: PersonProfile | CompanyProfile
        if row.person is not None:
            assert isinstance(view.profile, PersonProfile)
            changes = _person_changes(view, row.person, now)
            if changes is None:
                return _Plan(Outcome.UNCHANGED)
            profile = validation.changed_person_profile(view.profile, changes, now, definitions)
        else:
            assert row.company is not None and isinstance(view.profile, CompanyProfile)
            changes = _company_changes(view, row.company)
            if changes is None:
                return _Plan(Outcome.UNCHANGED)
            profile = validation.changed_company_profile(view.profile, changes, definitions)
        if profile == view.profile:
            return _Plan(Outcome.UNCHANGED)
        check_stage_change(view.profile.lifecycle_stage, profile.lifecycle_stage)
        return _Plan(Outcome.UPDATED, changes=changes)

    def _catch_up(self, kind: ContactKind, catch_up: Callable[[], int]) -> None:
        """Brings a lookup table up to date at most every `CATCH_UP_SECONDS`: what
        matters is the contacts stored before the import, and those others store
        meanwhile; the import's own writes never match a later row of the file (it
        has no duplicates). Applying the log in bigger batches keeps the writer's
        lock free for the import's commands."""
        now = time.monotonic()
        if now - self._caught_up.get(kind, -CATCH_UP_SECONDS) >= CATCH_UP_SECONDS:
            catch_up()
            self._caught_up[kind] = now

    def _matches(self, kind: ContactKind, values: Sequence[str]) -> dict[str, list[str]]:
        """The existing contacts each match value names (at most two each): persons by
        email from the directory's key table, companies by domain from `CompanyDomains`,
        both brought up to date with the log first."""
        if kind is ContactKind.PERSON:
            directory = self.service.directory
            self._catch_up(kind, directory.catch_up)
            database = directory.query_side.database
            # Only persons have email identities: the key table alone answers.
            table, key = EMAILS, "email"
        else:
            side = self._domain_side()
            self._catch_up(kind, side.catch_up)
            database, table, key = self.database, DOMAINS, "domain"
        unique = sorted(set(values))
        with database.read() as tx:
            rows = tx.all(
                f"SELECT {key}, contact_id FROM {table}"
                f" WHERE {key} IN ({tx.placeholders(len(unique))}) ORDER BY contact_id",
                unique,
            )
        found: dict[str, list[str]] = {}
        for value, ident in rows:
            found.setdefault(str(value), []).append(str(ident))
        return found

    # -- recording progress --

    def _record(
        self,
        job: _Job,
        results: Sequence[RowResult],
        state: JobState | None = None,
        error: str = "",
    ) -> None:
        """Writes the rows done since the last record (the failed ones for the
        report, the lines that wrote a contact for later runs of the file) and the
        progress up to `job.progress.line` in one transaction, renewing this
        process's claim; `_LeaseLost` if another process has it."""
        progress = job.progress
        now = _now().isoformat()
        finished = now if state in (JobState.DONE, JobState.FAILED) else ""
        failed = [f for f in results if f.outcome is Outcome.FAILED]
        written = [r for r in results if r.outcome in (Outcome.CREATED, Outcome.UPDATED)]
        with self.database.write() as tx:
            tx.executemany(
                f"INSERT INTO {FAILURES} (job_id, line, reason, cells) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (job_id, line) DO NOTHING",
                [(job.id, f.line, f.reason[:2000], json.dumps(dict(f.cells))) for f in failed],
            )
            if not job.dry_run:
                tx.executemany(
                    f"INSERT INTO {DONE} (digest, line, outcome) VALUES (?, ?, ?)"
                    " ON CONFLICT (digest, line) DO NOTHING",
                    [(job.digest, r.line, str(r.outcome)) for r in written],
                )
            sets = (
                "line = ?, rows_done = ?, created = ?, updated = ?, unchanged = ?, skipped = ?,"
                " failed = ?, updated_at = ?, lease_until = ?"
            )
            params: list[Any] = [
                progress.line,
                progress.rows,
                *(progress.counts[o] for o in COUNTED),
                now,
                time.time() + self.lease_seconds,
            ]
            if state is not None:
                sets += ", state = ?, error = ?, finished_at = ?"
                params += [str(state), error[:2000], finished]
            tx.execute(
                f"UPDATE {JOBS} SET {sets} WHERE id = ? AND owner = ?",
                [*params, job.id, self.owner],
            )
            if tx.cursor.rowcount == 0:
                raise _LeaseLost(job.id)

    def _release(self, job: _Job) -> None:
        with self.database.write() as tx:
            tx.execute(
                f"UPDATE {JOBS} SET lease_until = 0 WHERE id = ? AND owner = ?",
                (job.id, self.owner),
            )

    # -- resuming --

    def start(self) -> None:
        """Resumes unfinished jobs now and every `RESUME_INTERVAL` seconds (in the
        running event loop) until `aclose`."""
        if self._resumer is None:
            self._resumer = asyncio.get_running_loop().create_task(self._keep_resuming())

    async def _keep_resuming(self) -> None:
        while True:
            try:
                await self.resume()
            except Exception:
                log.exception("unfinished imports could not be resumed; trying again")
            await asyncio.sleep(RESUME_INTERVAL)

    async def resume(self) -> list[str]:
        """Takes over the unfinished jobs whose claim lapsed and whose file this
        process holds; returns their ids."""
        jobs = await asyncio.to_thread(self._claim)
        for job in jobs:
            self._start(job)
        return [j.id for j in jobs]

    def _claim(self) -> list[_Job]:
        with self.database.read() as tx:
            rows = tx.all(
                f"SELECT id FROM {JOBS} WHERE state IN (?, ?) AND dry_run = 0 AND lease_until < ?",
                (str(JobState.QUEUED), str(JobState.RUNNING), time.time()),
            )
        claimed = []
        for (job_id,) in rows:
            if job_id in self._tasks or not (self.files / f"{job_id}.csv").exists():
                continue
            with self.database.write() as tx:
                tx.execute(
                    f"UPDATE {JOBS} SET owner = ?, lease_until = ?"
                    " WHERE id = ? AND lease_until < ?",
                    (self.owner, time.time() + self.lease_seconds, job_id, time.time()),
                )
                if tx.cursor.rowcount == 0:
                    continue  # another process was quicker
                row = tx.one(
                    f"SELECT mapping, digest, caller, created_at, line, rows_done, created,"
                    f" updated, unchanged, skipped, failed FROM {JOBS} WHERE id = ?",
                    (job_id,),
                )
            assert row is not None
            mapping = ColumnMapping.from_dict(json.loads(row[0]))
            progress = Progress(int(row[4]), int(row[5]))
            progress.counts = {o: int(n) for o, n in zip(COUNTED, row[6:11], strict=True)}
            claimed.append(
                _Job(
                    id=job_id,
                    mapping=mapping,
                    digest=str(row[1]),
                    path=self.files / f"{job_id}.csv",
                    dry_run=False,
                    caller=_caller_of(row[2]),
                    created_at=datetime.fromisoformat(row[3]),
                    progress=progress,
                    resumed=True,
                )
            )
        return claimed

    async def aclose(self) -> None:
        """Stops the jobs this process runs (another process, or this one restarted,
        resumes them) and closes the tables."""
        if self._resumer is not None:
            self._resumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resumer
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._domains is not None:
            self._domains.close()
        if self._database is not None:
            self._database.close()

    # -- reading --

    async def get(self, job_id: str, *, shown: int = 0) -> ImportView:
        return await asyncio.to_thread(self._get, job_id, shown)

    def _get(self, job_id: str, shown: int) -> ImportView:
        with self.database.read() as tx:
            row = tx.one(
                f"SELECT id, kind, mapping, digest, file_name, size, dry_run, state, error,"
                " created_at, updated_at, finished_at, line, rows_done, created, updated,"
                f" unchanged, skipped, failed FROM {JOBS} WHERE id = ?",
                (job_id,),
            )
        if row is None:
            raise NotFound("Import", job_id)
        mapping = json.loads(row[2])
        progress = Progress(int(row[12]), int(row[13]))
        progress.counts = {o: int(n) for o, n in zip(COUNTED, row[14:19], strict=True)}
        failures = self._failures(job_id, 0, shown).failures if shown else ()
        return ImportView(
            id=str(row[0]),
            kind=ContactKind(row[1]),
            state=JobState(row[7]),
            dry_run=bool(row[6]),
            file_name=str(row[4]),
            size=int(row[5]),
            digest=str(row[3]),
            columns=mapping["columns"],
            match_on=mapping["match_on"],
            progress=progress,
            error=str(row[8]),
            created_at=datetime.fromisoformat(row[9]),
            updated_at=datetime.fromisoformat(row[10]),
            finished_at=datetime.fromisoformat(row[11]) if row[11] else None,
            failures=failures,
        )

    async def failures(self, job_id: str, after: int = 0, limit: int = 1000) -> FailurePage:
        """Failed rows after line `after`, in file order."""
        return await asyncio.to_thread(self._failures, job_id, after, limit)

    def _failures(self, job_id: str, after: int, limit: int) -> FailurePage:
        with self.database.read() as tx:
            if tx.one(f"SELECT 1 FROM {JOBS} WHERE id = ?", (job_id,)) is None:
                raise NotFound("Import", job_id)
            rows = tx.all(
                f"SELECT line, reason, cells FROM {FAILURES} WHERE job_id = ? AND line > ?"
                " ORDER BY line LIMIT ?",
                (job_id, after, limit + 1),
            )
        found = tuple(
            RowResult(int(line), Outcome.FAILED, str(reason), json.loads(cells))
            for line, reason, cells in rows[:limit]
        )
        more = len(rows) > limit
        return FailurePage(found, found[-1].line if more and found else 0)

    async def failures_csv(self, job_id: str) -> AsyncIterable[str]:
        """Every failed row as CSV (line, reason, the mapped cells), a page at a time."""
        view = await self.get(job_id)
        columns = list(view.columns)

        def encode(values: Sequence[Any]) -> str:
            out = io.StringIO()
            csv.writer(out).writerow(values)
            return out.getvalue()

        async def lines() -> AsyncIterable[str]:
            yield encode(["line", "reason", *columns])
            after = 0
            while True:
                page = await self.failures(job_id, after)
                for f in page.failures:
                    yield encode([f.line, f.reason, *(f.cells.get(c, "") for c in columns)])
                if not page.next_after:
                    return
                after = page.next_after

        return lines()


def _create_tables(tx: Tx) -> None:
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS {JOBS} ("
        " id TEXT PRIMARY KEY, kind TEXT NOT NULL, mapping TEXT NOT NULL,"
        " digest TEXT NOT NULL, file_name TEXT NOT NULL, size BIGINT NOT NULL,"
        " dry_run INTEGER NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL,"
        " caller TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,"
        " finished_at TEXT NOT NULL, line BIGINT NOT NULL, rows_done BIGINT NOT NULL,"
        " created BIGINT NOT NULL, updated BIGINT NOT NULL, unchanged BIGINT NOT NULL,"
        " skipped BIGINT NOT NULL, failed BIGINT NOT NULL, owner TEXT NOT NULL,"
        " lease_until DOUBLE PRECISION NOT NULL)"
    )
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS {FAILURES} ("
        " job_id TEXT NOT NULL, line BIGINT NOT NULL, reason TEXT NOT NULL,"
        " cells TEXT NOT NULL, PRIMARY KEY (job_id, line))"
    )
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS {DONE} ("
        " digest TEXT NOT NULL, line BIGINT NOT NULL, outcome TEXT NOT NULL,"
        " PRIMARY KEY (digest, line))"
    )


# -- what a matched row changes -------------------------------------------------------------


def _person_changes(view: ContactView, new: NewPerson, now: datetime) -> PersonChanges | None:
    """The field mask of a row's update: the mapped fields its cells fill. A channel
    identity the person lacks is added beside the ones it has."""
    assert isinstance(view.profile, PersonProfile)
    fields: set[str] = set()
    for name in ("given_name", "family_name", "owner", "tags", "custom_fields"):
        if getattr(new, name):
            fields.add(name)
    if new.lifecycle_stage:
        fields.add("lifecycle_stage")
    channels: list[ChannelInput] = []
    if new.channels:
        errors = FieldErrors()
        wanted = validation.channels_of(errors, "channels", new.channels, now)
        errors.raise_if_any()
        current = view.profile.channels
        known = {c.key for c in current}
        added = [w for w in wanted if w.key not in known]
        if added:
            fields.add("channels")
            channels = [ChannelInput(str(c.channel), c.address, c.preferred) for c in current]
            has_preferred = {c.channel for c in current if c.preferred}
            channels += [
                ChannelInput(
                    str(w.channel), w.address, w.preferred and w.channel not in has_preferred
                )
                for w in added
            ]
    if not fields:
        return None
    return PersonChanges(
        id=view.id,
        fields=frozenset(fields),
        given_name=new.given_name,
        family_name=new.family_name,
        lifecycle_stage=new.lifecycle_stage,
        tags=new.tags,
        custom_fields=new.custom_fields,
        owner=new.owner,
        channels=tuple(channels),
    )


def _company_changes(view: ContactView, new: NewCompany) -> CompanyChanges | None:
    fields = {
        name
        for name in ("name", "domain", "industry", "owner", "tags", "custom_fields")
        if getattr(new, name)
    }
    if new.lifecycle_stage:
        fields.add("lifecycle_stage")
    if not fields:
        return None
    return CompanyChanges(
        id=view.id,
        fields=frozenset(fields),
        name=new.name,
        domain=new.domain,
        industry=new.industry,
        lifecycle_stage=new.lifecycle_stage,
        tags=new.tags,
        custom_fields=new.custom_fields,
        owner=new.owner,
    )
