"""The command bus: every write of every service goes through it.

It gives each command optimistic concurrency (expected version), idempotency
(client request ids), an audit trail (actor, client, trace context on every
stored event) and group commit: commands that queue up while a save is in
progress are decided one after another against a shared in-memory view of
the aggregates they touch and then stored in one `Application.save()`, so
concurrent clients share a transaction instead of each paying for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError
from opentelemetry import context as otel_context
from opentelemetry import trace

from crm_common.auth.principal import Principal
from crm_common.errors import IdempotencyKeyReused, NotFound, ValidationFailed, VersionConflict
from crm_common.eventstore import recorder_position_of
from crm_common.telemetry import current_traceparent

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_common.commands")

RECEIPT_NAMESPACE = UUID("6f1c2a4e-8d0b-4f51-9a7e-3c2d1b0a9e88")
MAX_REQUEST_ID_LENGTH = 200
MAX_CONFLICT_RETRIES = 5
#: The largest event a command may store, as the event store holds it (after the
#: domain canonicalised every value): well under what the relay can publish
#: (crm_common.relay.MAX_MESSAGE_BYTES), so no command can store an event that
#: would stop it. A request body is at most 1 MiB (crm_common.server).
MAX_EVENT_BYTES = 512 * 1024
#: How long a request id answers with its first outcome; after that the same id
#: starts a new request (the IETF Idempotency-Key draft leaves this to the server).
RECEIPT_RETENTION = timedelta(hours=24)

A = TypeVar("A", bound=Aggregate)


@dataclass(frozen=True)
class CommandContext:
    """Who asks for what, and under which conditions."""

    command: str
    request_id: str | None = None
    expected_version: int | None = None
    actor: str = "anonymous"
    client: str = "unknown"
    #: Whose request ids these are: a request id is only ever matched against the
    #: earlier requests of the same authenticated principal.
    scope: str = ""
    #: A digest of what the command asks for (name, subject, payload): a request id
    #: used again for a different request is refused, never answered with the first.
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.request_id is not None and len(self.request_id) > MAX_REQUEST_ID_LENGTH:
            raise ValidationFailed.of(
                "request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters"
            )
        if self.expected_version is not None and self.expected_version < 1:
            raise ValidationFailed.of("expected_version", "must be 1 or more when given")


def fingerprint(*parts: Any) -> str:
    """A stable digest of a request: dataclasses, mappings, sequences, plain values."""
    text = json.dumps([_plain(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


@dataclass(frozen=True)
class Caller:
    """Who is asking, and under which conditions, as the shared server code
    read it from one request (`crm_common.server.grpc_caller` / `http_caller`).

    Adapters pass it on untouched; the application method that runs a command
    names the command (`caller.command("CreatePerson")`), so the name is
    written once, where the command is.
    """

    actor: str = "anonymous"
    client: str = "unknown"
    request_id: str | None = None
    expected_version: int | None = None
    #: The authenticated principal (None for commands a service runs on its own
    #: behalf, such as a follower reacting to another service's events).
    principal: Principal | None = field(default=None, compare=False)

    @property
    def scope(self) -> str:
        """Whose request ids these are: the credential holder and the user it acts for."""
        if self.principal is None:
            # The platform's own commands (a follower's): request ids derived from
            # events, in the scope receipts have always had.
            return ""
        scope = self.principal.subject
        if self.principal.on_behalf_of is not None:
            scope += f"|{self.principal.on_behalf_of.subject}"
        return scope

    def command(self, name: str, *request: Any) -> CommandContext:
        """The context of command `name` run for this caller; `request` (the subject id,
        the inputs) goes into the fingerprint a reused request id is checked against
        (made only when there is a request id: nothing else reads it)."""
        return CommandContext(
            command=name,
            request_id=self.request_id or None,
            expected_version=self.expected_version or None,
            actor=self.actor,
            client=self.client,
            scope=self.scope,
            fingerprint=fingerprint(name, self.expected_version, *request)
            if self.request_id
            else "",
        )


@dataclass(frozen=True)
class WriteOutcome:
    """What a command did: the subject, its new version and its log position."""

    id: str
    version: int
    position: int
    replayed: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    # The subject as it stands after the command (None for a replay): lets an
    # adapter render its reply without loading the aggregate again.
    subject: Aggregate | None = field(default=None, compare=False, repr=False)


class CommandReceipt(Aggregate):
    """Remembers the outcome of a command that carried a client request id.

    Keyed by service, the caller's scope and the request id: another caller's
    identical request id is a different receipt. `fingerprint` is the digest of
    the request it answered (empty on receipts written before fingerprints).
    """

    @staticmethod
    def create_id(service: str, request_id: str, scope: str = "") -> UUID:
        key = f"{service}:{request_id}" if not scope else f"{service}:{scope}:{request_id}"
        return uuid.uuid5(RECEIPT_NAMESPACE, key)

    @event("Recorded")
    def __init__(
        self,
        service: str,
        request_id: str,
        command: str,
        subject_id: str,
        subject_version: int,
        extra: dict[str, str],
        fingerprint: str = "",
        scope: str = "",
    ) -> None:
        # `scope` is part of the id (the library passes these arguments to create_id).
        self.scope = scope
        self.service = service
        self.request_id = request_id
        self.command = command
        self.subject_id = subject_id
        self.subject_version = subject_version
        self.extra = extra
        self.fingerprint = fingerprint

    @event("Renewed")
    def renew(
        self,
        command: str,
        subject_id: str,
        subject_version: int,
        extra: dict[str, str],
        fingerprint: str,
    ) -> None:
        """The request id is used again after its receipt expired: a new outcome."""
        self.command = command
        self.subject_id = subject_id
        self.subject_version = subject_version
        self.extra = extra
        self.fingerprint = fingerprint

    def answers(self, ctx: CommandContext) -> bool:
        """Whether this receipt is the outcome of the request `ctx` repeats."""
        if self.command != ctx.command:
            return False
        # Receipts from before fingerprints answer by command name alone.
        return not self.fingerprint or not ctx.fingerprint or self.fingerprint == ctx.fingerprint


Decision = Aggregate | tuple[Aggregate, dict[str, str]]
Decide = Callable[["UnitOfWork"], Decision]


class UnitOfWork:
    """The aggregates one command reads and changes.

    Aggregates come from the batch's shared view (so a command sees the
    effect of earlier commands in the same batch) and are backed up before
    first use, so that a failing command can be undone without touching the
    rest of the batch.
    """

    def __init__(self, bus: CommandBus, ctx: CommandContext, view: dict[UUID, Aggregate]):
        self._bus = bus
        self.ctx = ctx
        self._view = view
        self._backups: dict[UUID, Aggregate | None] = {}
        self._checked_subject = False

    def get(self, aggregate_id: UUID | str, kind: type[A], *, subject: bool = True) -> A:
        """Loads an aggregate; the command's subject is version-checked once."""
        ident = _as_uuid(aggregate_id, kind.__name__)
        aggregate = self._view.get(ident)
        if aggregate is None:
            try:
                aggregate = self._bus.app.repository.get(ident)
            except AggregateNotFoundError:
                raise NotFound(kind.__name__, str(aggregate_id)) from None
            self._view[ident] = aggregate
        if not isinstance(aggregate, kind):
            raise NotFound(kind.__name__, str(aggregate_id))
        if ident not in self._backups:
            # Work on a copy: the original stays as it was for undo, and for
            # the reply of an earlier command of the batch that holds it.
            self._backups[ident] = aggregate
            aggregate = copy.deepcopy(aggregate)
            self._view[ident] = aggregate
        expected = self.ctx.expected_version
        if subject and not self._checked_subject:
            self._checked_subject = True
            if expected is not None and expected != aggregate.version:
                raise VersionConflict(str(aggregate_id), expected, aggregate.version)
        return aggregate

    def exists(self, aggregate_id: UUID, kind: type[Aggregate]) -> bool:
        try:
            self.get(aggregate_id, kind, subject=False)
        except NotFound:
            return False
        return True

    def add(self, aggregate: A) -> A:
        """Registers a new aggregate created by the command."""
        if aggregate.id in self._view and aggregate.id not in self._backups:
            raise ValidationFailed.of("id", f"{aggregate.id} already exists")
        self._backups.setdefault(aggregate.id, None)
        self._view[aggregate.id] = aggregate
        return aggregate

    def touched(self) -> list[Aggregate]:
        return [self._view[i] for i in self._backups if i in self._view]

    def undo(self) -> None:
        for ident, backup in self._backups.items():
            if backup is None:
                self._view.pop(ident, None)
            else:
                self._view[ident] = backup


@dataclass
class _Job:
    ctx: CommandContext
    decide: Decide
    future: Future[WriteOutcome]
    otel: otel_context.Context
    #: The caller's event loop and the future it awaits (`execute_async`): settled
    #: from the writer thread together with the rest of its batch, one wake-up of
    #: the loop per batch instead of one per command.
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future[WriteOutcome] | None = None


@dataclass
class _Staged:
    job: _Job
    events: list[Any]
    subject_id: UUID
    subject_version: int
    extra: dict[str, str]
    replay: WriteOutcome | None = None
    subject: Aggregate | None = None


def _as_uuid(value: UUID | str, kind: str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(kind, str(value)) from None


class CommandBus:
    """Runs commands against an `eventsourcing` Application with group commit.

    One writer thread owns all writes of the process; callers block on (or
    await) a future. `after_commit` callbacks run on the writer thread after
    each successful save, with the recordings of that save.
    """

    def __init__(
        self,
        app: Application[UUID],
        service: str,
        *,
        max_batch: int = 256,
        receipt_retention: timedelta = RECEIPT_RETENTION,
    ) -> None:
        self.app = app
        self.service = service
        self.max_batch = max_batch
        self.receipt_retention = receipt_retention
        self.after_commit: list[Callable[[list[Any]], None]] = []
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._run, name=f"{service}-writer", daemon=True)
        self._closed = False
        self.batches = 0
        self.commands = 0
        self._writer.start()

    # -- public API ---------------------------------------------------------

    def submit(self, ctx: CommandContext, decide: Decide) -> Future[WriteOutcome]:
        return self._submit(_Job(ctx, decide, Future(), otel_context.get_current()))

    def _submit(self, job: _Job) -> Future[WriteOutcome]:
        if self._closed:
            raise RuntimeError("command bus is closed")
        self._queue.put(job)
        return job.future

    def execute(self, ctx: CommandContext, decide: Decide) -> WriteOutcome:
        return self.submit(ctx, decide).result()

    async def execute_async(self, ctx: CommandContext, decide: Decide) -> WriteOutcome:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WriteOutcome] = loop.create_future()
        self._submit(_Job(ctx, decide, Future(), otel_context.get_current(), loop, waiter))
        return await waiter

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._writer.join(timeout=30)

    # -- the writer ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._process(batch)
            except Exception as exc:  # never let the writer die
                log.exception("command batch failed")
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
            finally:
                forget = getattr(self.app.mapper, "forget_premapped", None)
                if forget is not None:
                    forget()
            _wake_waiters(batch)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        view: dict[UUID, Aggregate] = {}
        staged: list[_Staged] = []
        in_batch_receipts: dict[UUID, _Staged] = {}
        for job in batch:
            try:
                item = self._decide(job, view, in_batch_receipts)
            except Exception as exc:
                job.future.set_exception(exc)
                continue
            staged.append(item)
        to_save = [s for s in staged if s.replay is None and not isinstance(s, _Skip)]
        events = [e for s in to_save for e in s.events]
        if events:
            try:
                with tracer.start_as_current_span(
                    "eventstore.save",
                    links=[
                        trace.Link(trace.get_current_span(s.job.otel).get_span_context())
                        for s in to_save[:32]
                    ],
                    attributes={"crm.commands": len(to_save), "crm.events": len(events)},
                ):
                    recordings = self.app.save(*events)
            except IntegrityError:
                # Another writer (a second replica) got there first: retry each
                # command alone on freshly loaded aggregates.
                for s in staged:
                    if not s.job.future.done() and not isinstance(s, _Skip):
                        self._retry_alone(s.job)
                return
            positions = {
                (r.notification.originator_id, r.notification.originator_version): r.notification.id
                for r in recordings
            }
            for callback in self.after_commit:
                try:
                    callback(recordings)
                except Exception:
                    log.exception("after-commit callback failed")
        else:
            positions = {}
        self.batches += 1
        self.commands += len(to_save)
        for s in staged:
            if s.job.future.done() or isinstance(s, _Skip):
                continue
            if s.replay is not None:
                s.job.future.set_result(s.replay)
                continue
            position = positions.get((s.subject_id, s.subject_version))
            if position is None:
                position = self._position_of(s.subject_id, s.subject_version)
            s.job.future.set_result(
                WriteOutcome(
                    str(s.subject_id), s.subject_version, position, False, s.extra, s.subject
                )
            )

    def _retry_alone(self, job: _Job) -> None:
        for _ in range(MAX_CONFLICT_RETRIES):
            view: dict[UUID, Aggregate] = {}
            try:
                item = self._decide(job, view, {})
            except Exception as exc:
                job.future.set_exception(exc)
                return
            if item.replay is not None:
                job.future.set_result(item.replay)
                return
            try:
                recordings = self.app.save(*item.events)
            except IntegrityError:
                if job.ctx.expected_version is not None:
                    actual: int = self.app.repository.get(item.subject_id).version
                    job.future.set_exception(
                        VersionConflict(str(item.subject_id), job.ctx.expected_version, actual)
                    )
                    return
                continue
            for callback in self.after_commit:
                callback(recordings)
            position = max(
                (
                    r.notification.id
                    for r in recordings
                    if r.notification.originator_id == item.subject_id
                ),
                default=None,
            ) or self._position_of(item.subject_id, item.subject_version)
            job.future.set_result(
                WriteOutcome(
                    str(item.subject_id),
                    item.subject_version,
                    position,
                    False,
                    item.extra,
                    item.subject,
                )
            )
            return
        job.future.set_exception(RuntimeError("too many concurrent writers on one aggregate"))

    def _position_of(self, ident: UUID, version: int) -> int:
        position = recorder_position_of(self.app.recorder, ident, version)
        return position or 0

    def _decide(
        self, job: _Job, view: dict[UUID, Aggregate], in_batch: dict[UUID, _Staged]
    ) -> _Staged:
        ctx = job.ctx
        receipt_id: UUID | None = None
        expired: CommandReceipt | None = None
        if ctx.request_id:
            receipt_id = CommandReceipt.create_id(self.service, ctx.request_id, ctx.scope)
            earlier = in_batch.get(receipt_id)
            if earlier is not None:
                # The same request twice in one batch: the second is a replay
                # of the first, whose position is known after the save.
                return self._replay_later(job, earlier)
            replay, expired = self._replay(ctx, receipt_id)
            if replay is not None:
                return _Staged(job, [], UUID(replay.id), replay.version, replay.extra, replay)
        with tracer.start_as_current_span(
            f"command {ctx.command}",
            context=job.otel,
            attributes={"crm.actor": ctx.actor, "crm.client": ctx.client},
        ):
            # The command's span, a child of the caller's (or, without a tracer
            # provider, the caller's own span context).
            traceparent = current_traceparent()
            meta = {
                "actor": ctx.actor,
                "client": ctx.client,
                "command": ctx.command,
                "request_id": ctx.request_id or "",
                "traceparent": traceparent or "",
            }
            uow = UnitOfWork(self, ctx, view)
            try:
                decision = job.decide(uow)
                subject, extra = decision if isinstance(decision, tuple) else (decision, {})
                events: list[Any] = []
                for aggregate in uow.touched():
                    events.extend(aggregate.collect_events())
                for e in events:
                    # Infrastructure metadata rides along in the stored event state
                    # (set before the size check, which maps each event for the save).
                    object.__setattr__(e, "_meta", meta)
                self._check_sizes(events)
            except Exception:
                uow.undo()
                raise
        if receipt_id is not None and ctx.request_id:
            if expired is not None:
                receipt = expired
                receipt.renew(
                    ctx.command, str(subject.id), subject.version, dict(extra), ctx.fingerprint
                )
            else:
                receipt = CommandReceipt(
                    service=self.service,
                    request_id=ctx.request_id,
                    command=ctx.command,
                    subject_id=str(subject.id),
                    subject_version=subject.version,
                    extra=dict(extra),
                    fingerprint=ctx.fingerprint,
                    scope=ctx.scope,
                )
            receipt_events = receipt.collect_events()
            for e in receipt_events:
                object.__setattr__(e, "_meta", meta)
            events.extend(receipt_events)
        staged = _Staged(job, events, subject.id, subject.version, dict(extra), None, subject)
        if receipt_id is not None:
            in_batch[receipt_id] = staged
        return staged

    def _check_sizes(self, events: list[Any]) -> None:
        """Refuses a command whose events are too large to store and publish.
        The stored forms are kept for the save (the mapper's `premap`), so an
        event is mapped once."""
        mapper = self.app.mapper
        premap = getattr(mapper, "premap", mapper.to_stored_event)
        for e in events:
            size = len(premap(e).state)
            if size > MAX_EVENT_BYTES:
                raise ValidationFailed.of(
                    "body",
                    f"the change is too large: it would be stored as {size} bytes, "
                    f"at most {MAX_EVENT_BYTES} are allowed; split it or shorten its values",
                )

    def _replay_later(self, job: _Job, earlier: _Staged) -> _Staged:
        first = earlier.job.ctx
        if first.command != job.ctx.command or first.fingerprint != job.ctx.fingerprint:
            raise _reused(job.ctx)

        # Resolve once the earlier job's outcome is known.
        def finish(done: Future[WriteOutcome]) -> None:
            if done.exception() is not None:
                job.future.set_exception(cast(BaseException, done.exception()))
            else:
                first = done.result()
                job.future.set_result(
                    WriteOutcome(first.id, first.version, first.position, True, first.extra)
                )

        earlier.job.future.add_done_callback(finish)
        return _Skip(job)

    def _replay(
        self, ctx: CommandContext, receipt_id: UUID
    ) -> tuple[WriteOutcome | None, CommandReceipt | None]:
        """The first outcome of a repeated request; or the expired receipt to renew."""
        try:
            receipt: Aggregate = self.app.repository.get(receipt_id)
        except AggregateNotFoundError:
            return None, None
        assert isinstance(receipt, CommandReceipt)
        if receipt.modified_on < datetime.now(UTC) - self.receipt_retention:
            return None, receipt
        if not receipt.answers(ctx):
            raise _reused(ctx)
        position = self._position_of(UUID(receipt.subject_id), receipt.subject_version)
        outcome = WriteOutcome(
            receipt.subject_id, receipt.subject_version, position, True, dict(receipt.extra)
        )
        return outcome, None


def _wake_waiters(batch: list[_Job]) -> None:
    """Hands the outcomes of a batch to the event loops that await them: one
    `call_soon_threadsafe` per loop (each one writes to the loop's wake-up pipe),
    not one per command."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in batch:
        if job.loop is None:
            continue
        if job.future.done():
            by_loop.setdefault(job.loop, []).append(job)
        else:  # settled later: handed over on its own then
            job.future.add_done_callback(functools.partial(_wake_one, job))
    for loop, jobs in by_loop.items():
        _hand_over(loop, jobs)


def _wake_one(job: _Job, _: Future[WriteOutcome]) -> None:
    if job.loop is not None:
        _hand_over(job.loop, [job])


def _hand_over(loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits these
        loop.call_soon_threadsafe(_settle, jobs)


def _settle(jobs: list[_Job]) -> None:
    """On the caller's loop: each waiter gets its job's outcome (unless it was cancelled)."""
    for job in jobs:
        waiter = job.waiter
        if waiter is None or waiter.done():
            continue
        error = job.future.exception()
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(job.future.result())


def _reused(ctx: CommandContext) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"request id {ctx.request_id!r} was already used for a different request; "
        "use a new request id for a new request"
    )


class _Skip(_Staged):
    """A job settled elsewhere (an in-batch duplicate request)."""

    def __init__(self, job: _Job) -> None:
        super().__init__(job, [], UUID(int=0), 0, {}, None)
