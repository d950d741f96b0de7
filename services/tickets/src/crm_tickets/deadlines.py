"""The open cases and their SLA deadlines, followed from the event log.

`DeadlineIndex` reads the notification log from the last position it applied
(whichever process wrote the events) and keeps, per open case, its team,
status, next breach time and the warnings and breaches still to raise. The SLA
scanner asks it what is `due(now)`; the team queue asks it for a team's cases
by urgency. A per-process cache rebuilt from the event store on start: after a
restart it finds the deadlines that fell due while the process was down.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import CanInitAggregate

from crm_tickets.domain import Case, Deadline

FAR = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class QueueEntry:
    case_id: str
    team: str
    status: str
    next_due: datetime | None
    opened_at: datetime


class DeadlineIndex:
    def __init__(self, app: Application[UUID], batch: int = 1000) -> None:
        self.app = app
        self.batch = batch
        self.position = 0
        self._cases: dict[UUID, Case] = {}
        self._deadlines: dict[str, list[Deadline]] = {}
        self._queue: dict[str, QueueEntry] = {}
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
                            self._cases[aggregate.id] = aggregate
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
        if case.status == "closed":
            # Closed cases leave the index for good (their history is in the store).
            self._cases.pop(case.id, None)
            self._deadlines.pop(key, None)
            self._queue.pop(key, None)
            return
        deadlines = case.deadlines()
        if deadlines:
            self._deadlines[key] = deadlines
        else:
            self._deadlines.pop(key, None)
        if case.status == "solved":
            self._queue.pop(key, None)
        else:
            self._queue[key] = QueueEntry(
                key, case.team, case.status, case.next_due(), case.opened_at
            )

    def due(self, now: datetime) -> list[Deadline]:
        """The warnings and breaches due at `now`, earliest first."""
        self.catch_up()
        with self._lock:
            found = [d for ds in self._deadlines.values() for d in ds if d.at <= now]
        return sorted(found, key=lambda d: d.at)

    def queue(self, team: str) -> list[QueueEntry]:
        """A team's unsolved cases: the earliest breach first, then the oldest."""
        self.catch_up()
        with self._lock:
            entries = [e for e in self._queue.values() if e.team == team]
        return sorted(entries, key=lambda e: (e.next_due or FAR, e.opened_at, e.case_id))
