"""The tickets query model: open cases and their SLA deadlines, each customer's
cases, and the SLA outcome of every case, followed from the event log.

`DeadlineIndex` reads the notification log from the last position it applied
(whichever process wrote the events) and keeps:

- per unsolved case, its team, its queue rank (a target breached and still
  owed, a deadline running, or nothing running) and the warnings and breaches
  still to raise, in a heap by due time: the SLA scanner asks what is
  `due(now)` without looking at the cases that are not;
- per customer, their cases (closed ones too) by opening time;
- per case, its SLA record (team, opening time, how each clock instance ended,
  the business time to the first reply and to resolution) for `compliance`.

Only the open cases are kept as aggregates; a closed case leaves a small
record. A per-process cache rebuilt from the event store on start: after a
restart it finds the deadlines that fell due while the process was down.
"""

from __future__ import annotations

import heapq
import json
import math
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import CanInitAggregate

from crm_tickets.domain import TARGET_KINDS, Case, Deadline

FAR = datetime.max.replace(tzinfo=UTC)
#: Queue ranks: a target breached and still owed, a deadline running, nothing running.
BREACHED, RUNNING, WAITING = 0, 1, 2


@dataclass(frozen=True)
class QueueEntry:
    case_id: str
    team: str
    status: str
    rank: int
    #: BREACHED: when the oldest owed breach fell due; RUNNING: the next breach.
    urgent_at: datetime | None
    opened_at: datetime

    @property
    def key(self) -> tuple[int, datetime, datetime, str]:
        return (self.rank, self.urgent_at or FAR, self.opened_at, self.case_id)


@dataclass
class CaseRecord:
    """What compliance needs of one case, kept after it is closed."""

    team: str
    customer_id: str
    opened_at: datetime
    #: (kind, state) of every clock instance: met, breached, or open (running / paused).
    outcomes: list[tuple[str, str]] = field(default_factory=list)
    first_reply_seconds: float | None = None
    resolution_seconds: float | None = None


@dataclass(frozen=True)
class Compliance:
    cases: int
    #: kind -> (met, breached, open)
    targets: dict[str, tuple[int, int, int]]
    first_reply: list[float]
    resolution: list[float]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def p90(values: list[float]) -> float:
    """The 90th percentile by the nearest-rank method (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)]


def record_of(case: Case) -> CaseRecord:
    record = CaseRecord(case.team, case.customer_id, case.opened_at)
    for finished in case.finished_clocks:
        record.outcomes.append((finished["kind"], finished["state"]))
    for kind in TARGET_KINDS:
        clock = case.clocks.get(kind)
        if clock is None:
            continue
        state = case.clock_state(kind)
        record.outcomes.append((kind, state if state in ("met", "breached") else "open"))
        if clock["met_at"] is not None and kind == "first_response":
            record.first_reply_seconds = float(clock["consumed"])
        if clock["met_at"] is not None and kind == "resolution":
            record.resolution_seconds = float(clock["consumed"])
    return record


class DeadlineIndex:
    def __init__(self, app: Application[UUID], batch: int = 1000) -> None:
        self.app = app
        self.batch = batch
        self.position = 0
        self._cases: dict[UUID, Case] = {}
        #: case id -> its deadlines still to raise (the heap holds them too, lazily).
        self._deadlines: dict[str, list[Deadline]] = {}
        self._heap: list[tuple[datetime, int, Deadline]] = []
        self._pushed = 0
        self._queue: dict[str, QueueEntry] = {}
        #: team -> case id -> its queue entry (the same entries as `_queue`).
        self._teams: dict[str, dict[str, QueueEntry]] = {}
        self._by_customer: dict[str, list[tuple[datetime, str]]] = {}
        self._records: dict[str, CaseRecord] = {}
        self._records_by_team: dict[str, dict[str, CaseRecord]] = {}
        #: One copy of each distinct set of terms the open cases hold (most cases of a
        #: policy version share them), so that memory grows with cases, not with terms.
        self._terms: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def catch_up(self) -> int:
        """Applies every event stored after the last applied position."""
        with self._lock:
            recorder: Any = self.app.recorder
            while True:
                notifications = recorder.select_notifications(self.position + 1, self.batch)
                if not notifications:
                    return self.position
                changed: set[UUID] = set()
                for n in notifications:
                    event: Any = self.app.mapper.to_domain_event(n)
                    if isinstance(event, CanInitAggregate):
                        aggregate = event.mutate(None)
                        if isinstance(aggregate, Case):
                            key = json.dumps(aggregate.terms, sort_keys=True)
                            aggregate.terms = self._terms.setdefault(key, aggregate.terms)
                            self._cases[aggregate.id] = aggregate
                            self._by_customer.setdefault(aggregate.customer_id, []).append(
                                (aggregate.opened_at, str(aggregate.id))
                            )
                            changed.add(aggregate.id)
                    elif event.originator_id in self._cases:
                        case = self._cases[event.originator_id]
                        event.mutate(case)
                        changed.add(case.id)
                    self.position = n.id
                for ident in changed:
                    self._index(self._cases[ident])

    def _index(self, case: Case) -> None:
        key = str(case.id)
        record = record_of(case)
        before = self._records.get(key)
        if before is not None and before.team != record.team:
            self._records_by_team.get(before.team, {}).pop(key, None)
        self._records[key] = record
        self._records_by_team.setdefault(record.team, {})[key] = record
        if case.status == "closed":
            # Closed cases leave the open set for good (their history is in the store).
            self._cases.pop(case.id, None)
            self._deadlines.pop(key, None)
            self._unqueue(key)
            return
        deadlines = case.deadlines()
        if deadlines:
            if deadlines != self._deadlines.get(key):
                for d in deadlines:
                    self._pushed += 1
                    heapq.heappush(self._heap, (d.at, self._pushed, d))
            self._deadlines[key] = deadlines
        else:
            self._deadlines.pop(key, None)
        if case.status == "solved":
            self._unqueue(key)
            return
        owed = [
            datetime.fromisoformat(c["breached_due_at"])
            for c in case.clocks.values()
            if c["breached"] and c["met_at"] is None and c.get("breached_due_at")
        ]
        next_due = min((d.at for d in deadlines if d.what == "breach"), default=None)
        if owed:
            rank, urgent_at = BREACHED, min(owed)
        elif next_due is not None:
            rank, urgent_at = RUNNING, next_due
        else:
            rank, urgent_at = WAITING, None
        self._unqueue(key)
        entry = QueueEntry(key, case.team, case.status, rank, urgent_at, case.opened_at)
        self._queue[key] = entry
        self._teams.setdefault(case.team, {})[key] = entry

    def _unqueue(self, key: str) -> None:
        entry = self._queue.pop(key, None)
        if entry is not None:
            self._teams.get(entry.team, {}).pop(key, None)

    def due(self, now: datetime) -> list[Deadline]:
        """The warnings and breaches due at `now`, earliest first. Looks only at the
        deadlines that are due (a heap by due time); entries a case no longer has are
        dropped as they come up."""
        self.catch_up()
        found: list[Deadline] = []
        with self._lock:
            kept: list[tuple[datetime, int, Deadline]] = []
            while self._heap and self._heap[0][0] <= now:
                entry = heapq.heappop(self._heap)
                deadline = entry[2]
                if deadline in self._deadlines.get(deadline.case_id, ()):
                    found.append(deadline)
                    kept.append(entry)  # until the case says it was raised
            for entry in kept:
                heapq.heappush(self._heap, entry)
            if len(self._heap) > 8 * len(self._deadlines) + 1000:
                self._compact()
        return sorted(set(found), key=lambda d: (d.at, d.case_id, d.kind, d.what))

    def _compact(self) -> None:
        self._heap = [
            (d.at, i, d) for i, d in enumerate(d for ds in self._deadlines.values() for d in ds)
        ]
        heapq.heapify(self._heap)
        self._pushed = len(self._heap)

    def queue(self, team: str) -> list[QueueEntry]:
        """A team's unsolved cases by SLA urgency: a target breached and still owed
        first (the oldest breach first), then the nearest deadline, then the cases with
        no clock running (paused, or every target met); ties by opening time."""
        self.catch_up()
        with self._lock:
            entries = list(self._teams.get(team, {}).values())
        return sorted(entries, key=lambda e: e.key)

    def at_risk(self, until: datetime, team: str = "") -> list[QueueEntry]:
        """Unsolved cases with a breach still to raise that falls due before `until`
        (overdue ones too), the nearest first."""
        self.catch_up()
        with self._lock:
            entries = [
                e
                for e in (self._teams.get(team, {}) if team else self._queue).values()
                if e.rank == RUNNING and e.urgent_at is not None and e.urgent_at <= until
            ]
        return sorted(entries, key=lambda e: e.key)

    def customer_cases(self, customer_id: str) -> list[str]:
        """A customer's case ids, the newest first."""
        self.catch_up()
        with self._lock:
            cases = list(self._by_customer.get(customer_id, ()))
        return [ident for _, ident in sorted(cases, reverse=True)]

    def compliance(self, team: str, start: datetime, end: datetime) -> Compliance:
        """The SLA outcomes of the team's cases opened in [start, end)."""
        self.catch_up()
        with self._lock:
            records = [
                r
                for r in self._records_by_team.get(team, {}).values()
                if start <= r.opened_at < end
            ]
        counts: dict[str, list[int]] = {}
        for record in records:
            for kind, state in record.outcomes:
                met_breached_open = counts.setdefault(kind, [0, 0, 0])
                met_breached_open[("met", "breached", "open").index(state)] += 1
        return Compliance(
            cases=len(records),
            targets={k: (v[0], v[1], v[2]) for k, v in sorted(counts.items(), key=_kind_order)},
            first_reply=[
                r.first_reply_seconds for r in records if r.first_reply_seconds is not None
            ],
            resolution=[r.resolution_seconds for r in records if r.resolution_seconds is not None],
        )


def _kind_order(item: tuple[str, Any]) -> int:
    return TARGET_KINDS.index(item[0]) if item[0] in TARGET_KINDS else len(TARGET_KINDS)
