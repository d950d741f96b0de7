"""`Case`: a customer's request to the service desk, with its SLA clocks.

The case copies the SLA terms of the policy version it started with (its
tier's targets per priority, the calendar, warning lead, pause rule,
escalation), so a later policy revision never moves its deadlines.

Each SLA target (`first_response`, `next_reply`, `resolution`) is a clock:
business seconds consumed so far, the instant it last started running (None
while paused), when it was met, and whether its warning and breach were
raised. `first_response` and `resolution` run from the opening; `next_reply`
starts with a customer's public reply once the first response is given, and
runs until the next public agent reply: each such cycle is a new instance of
the clock (`cycle` 1, 2, ...), with its own warning and breach. Every time a
clock's deadline can move (pause, resume, priority change, reopening, a new
cycle) its `deadline_version` goes up, and it never goes back, not even from
one cycle to the next: the SLA scanner names the deadline it raises by (case,
kind, deadline version), and the case raises each warning and each breach at
most once per clock instance whatever the scanner does.

Methods refuse with `RuleViolated` what the case's state does not allow,
before any event is triggered.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated
from crm_common.privacy.declaration import PersonalData
from crm_tickets.domain.calendar import BusinessCalendar
from crm_tickets.domain.values import DEFAULT_TIER, PRIORITIES, TARGET_KINDS, TRANSITIONS

PAUSED_ALWAYS = ("pending",)
STOPPED = ("solved", "closed")


@dataclass(frozen=True)
class Deadline:
    """A warning or breach that falls due at `at` unless the clock changes first."""

    case_id: str
    kind: str
    what: str  # "warning" | "breach"
    at: datetime
    deadline_version: int
    cycle: int = 1

    @property
    def request_id(self) -> str:
        """The one request id of raising this deadline, on every replica and restart."""
        return f"sla:{self.case_id}:{self.kind}:{self.what}:{self.deadline_version}"


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _at(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _terms_for(terms: dict[str, Any], tier: str) -> dict[str, Any]:
    """The terms a case keeps: the policy's, with the targets of its tier only (those of
    the default tier when the policy sets none for it)."""
    targets = terms["targets"]
    key = tier if tier in targets else DEFAULT_TIER
    return {**terms, "targets": {key: targets.get(key, {})}}


def _new_clock(target: int, at: datetime, *, running: bool) -> dict[str, Any]:
    return {
        "target": target,
        "consumed": 0.0,
        "started_at": at.isoformat(),
        "running_since": at.isoformat() if running else None,
        "met_at": None,
        "warned": False,
        "breached": False,
        "deadline_version": 1,
        "cycle": 1,
    }


class Case(Aggregate):
    """A case of one contact, from one channel."""

    class Opened(Aggregate.Created):
        customer_id: str
        channel: str
        subject: str
        description: str
        category: str
        priority: str
        team: str
        assignee: str
        tier: str
        tier_source: str
        policy_id: str
        policy_version: int
        terms: dict[str, Any]
        reopen_window_seconds: int
        at: datetime
        # The customer's words about their problem; channel, category, team and SLA are not.
        personal_data = PersonalData("subject", "description", subject="customer_id")

    class Event(Aggregate.Event):
        customer_id: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.history.append({"at": self.at.isoformat(), "what": type(self).__name__})
            aggregate.updated_at = self.at
            self.change(aggregate)

        def change(self, aggregate: Any) -> None:
            pass

    class Triaged(Event):
        category: str
        priority: str
        team: str

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(
                category=self.category, priority=self.priority, team=self.team
            )
            aggregate.category, aggregate.team = self.category, self.team
            aggregate._set_priority(self.priority, self.at)

    class Assigned(Event):
        assignee: str

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(assignee=self.assignee)
            aggregate.assignee = self.assignee

    class Replied(Event):
        author: str
        author_kind: str  # "agent" | "customer"
        body: str
        # Either side's text is about the customer (the author is a user of the platform).
        personal_data = PersonalData("body", subject="customer_id")

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(author=self.author, author_kind=self.author_kind)
            aggregate.messages.append(
                {
                    "at": self.at.isoformat(),
                    "author": self.author,
                    "author_kind": self.author_kind,
                    "body": self.body,
                    "internal": False,
                }
            )
            if self.author_kind == "agent":
                aggregate._meet("first_response", self.at)
                aggregate._meet("next_reply", self.at)
            else:
                if aggregate.status == "pending":
                    # The customer answered: the case is theirs no longer, the clocks run.
                    aggregate._move("open", self.at)
                aggregate._await_agent(self.at)

    class NoteAdded(Event):
        author: str
        body: str
        # An internal note about the customer's case.
        personal_data = PersonalData("body", subject="customer_id")

        def change(self, aggregate: Any) -> None:
            aggregate.messages.append(
                {
                    "at": self.at.isoformat(),
                    "author": self.author,
                    "author_kind": "agent",
                    "body": self.body,
                    "internal": True,
                }
            )

    class StatusChanged(Event):
        status: str

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(before=aggregate.status, status=self.status)
            aggregate._move(self.status, self.at)

    class SlaWarned(Event):
        kind: str
        due_at: datetime
        deadline_version: int
        cycle: int = 1

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(kind=self.kind)
            aggregate.clocks[self.kind]["warned"] = True

    class SlaBreached(Event):
        kind: str
        due_at: datetime
        deadline_version: int
        cycle: int = 1

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(kind=self.kind)
            clock = aggregate.clocks[self.kind]
            clock["warned"] = True
            clock["breached"] = True
            clock["breached_due_at"] = self.due_at.isoformat()

    class Escalated(Event):
        kind: str
        priority: str
        team: str
        notify_team: str

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(kind=self.kind, priority=self.priority, team=self.team)
            aggregate.team = self.team
            aggregate._set_priority(self.priority, self.at)

    class SatisfactionRecorded(Event):
        csat: int
        ces: int | None
        nps: int | None
        comment: str
        # The customer's own words; the scores are anonymous facts (compliance, trends).
        personal_data = PersonalData("comment", subject="customer_id")

        def change(self, aggregate: Any) -> None:
            aggregate.satisfaction = {
                "csat": self.csat,
                "ces": self.ces,
                "nps": self.nps,
                "comment": self.comment,
                "at": self.at.isoformat(),
            }

    class CustomerMoved(Event):
        """The case changed hands: a contacts merge gave it to the survivor
        (`to_customer_id`), or the merge's undo gave it back (`undone`). The event's
        `customer_id` is the new owner; the texts stored before stay sealed under the
        key of the customer they were written for (events are never rewritten)."""

        from_customer_id: str
        to_customer_id: str
        merge_id: str
        undone: bool

        def change(self, aggregate: Any) -> None:
            aggregate.history[-1].update(
                from_customer_id=self.from_customer_id,
                to_customer_id=self.to_customer_id,
                merge_id=self.merge_id,
                undone=self.undone,
            )
            aggregate.customer_id = self.to_customer_id
            aggregate.__dict__.setdefault("moves", []).append(
                {
                    "merge_id": self.merge_id,
                    "from": self.from_customer_id,
                    "to": self.to_customer_id,
                    "undone": self.undone,
                    "at": self.at.isoformat(),
                }
            )

    def __init__(
        self,
        customer_id: str,
        channel: str,
        subject: str,
        description: str,
        category: str,
        priority: str,
        team: str,
        assignee: str,
        tier: str,
        tier_source: str,
        policy_id: str,
        policy_version: int,
        terms: dict[str, Any],
        reopen_window_seconds: int,
        at: datetime,
    ) -> None:
        self.customer_id = customer_id
        self.channel = channel
        self.subject = subject
        self.description = description
        self.category = category
        self.priority = priority
        self.team = team
        self.assignee = assignee
        self.tier = tier
        self.tier_source = tier_source
        self.policy_id = policy_id
        self.policy_version = policy_version
        self.terms = terms
        self.reopen_window_seconds = reopen_window_seconds
        self.status = "new"
        self.opened_at = at
        self.updated_at = at
        self.solved_at: datetime | None = None
        self.messages: list[dict[str, Any]] = []
        self.satisfaction: dict[str, Any] | None = None
        #: Each change of hands by a contacts merge or its undo, oldest first.
        self.moves: list[dict[str, Any]] = []
        # The Opened event itself appends the first entry (it is a `Case.Event` too).
        self.history: list[dict[str, Any]] = []
        #: next-reply clock instances that ended before the current one: kind, cycle,
        #: state (met or breached) and the business seconds they ran.
        self.finished_clocks: list[dict[str, Any]] = []
        targets = self._targets()
        self.clocks: dict[str, dict[str, Any]] = {
            kind: _new_clock(int(targets[kind]), at, running=True)
            for kind in TARGET_KINDS
            if kind != "next_reply" and targets.get(kind)
        }

    @classmethod
    def open(
        cls,
        *,
        customer_id: str,
        channel: str,
        subject: str,
        description: str,
        category: str,
        priority: str,
        team: str,
        assignee: str,
        tier: str,
        tier_source: str,
        policy_id: str,
        policy_version: int,
        terms: dict[str, Any],
        reopen_window_seconds: int,
        at: datetime,
    ) -> Case:
        return cls._create(
            cls.Opened,
            customer_id=customer_id,
            channel=channel,
            subject=subject,
            description=description,
            category=category,
            priority=priority,
            team=team,
            assignee=assignee,
            tier=tier,
            tier_source=tier_source,
            policy_id=policy_id,
            policy_version=policy_version,
            terms=copy.deepcopy(_terms_for(terms, tier)),
            reopen_window_seconds=reopen_window_seconds,
            at=at,
        )

    # -- commands

    def triage(self, *, category: str, priority: str, team: str, at: datetime) -> None:
        self._refuse_when_closed("triage")
        if (category, priority, team) == (self.category, self.priority, self.team):
            return
        self._trigger(self.Triaged, at, category=category, priority=priority, team=team)

    def assign(self, assignee: str, at: datetime) -> None:
        self._refuse_when_closed("assign")
        if assignee != self.assignee:
            self._trigger(self.Assigned, at, assignee=assignee)

    def reply(self, *, author: str, author_kind: str, body: str, at: datetime) -> None:
        self._refuse_when_closed("reply to")
        self._trigger(self.Replied, at, author=author, author_kind=author_kind, body=body)

    def add_note(self, *, author: str, body: str, at: datetime) -> None:
        self._refuse_when_closed("annotate")
        self._trigger(self.NoteAdded, at, author=author, body=body)

    def change_status(self, status: str, at: datetime) -> None:
        if status == self.status:
            return
        allowed = TRANSITIONS[self.status]
        if status not in allowed:
            names = ", ".join(allowed) or "none: a closed case is final"
            raise RuleViolated(f"a {self.status} case cannot become {status}; allowed: {names}")
        if self.status == "solved" and status == "open":
            assert self.solved_at is not None
            window = timedelta(seconds=self.reopen_window_seconds)
            if at > self.solved_at + window:
                raise RuleViolated(
                    f"the case was solved at {self.solved_at.isoformat()}; it can be reopened "
                    f"within {self.reopen_window_seconds} s only (allowed now: closed)"
                )
        self._trigger(self.StatusChanged, at, status=status)

    def record_satisfaction(
        self, *, csat: int, ces: int | None, nps: int | None, comment: str, at: datetime
    ) -> None:
        if self.status not in STOPPED:
            raise RuleViolated(f"a {self.status} case has no survey yet: solve it first")
        if self.satisfaction is not None:
            raise RuleViolated("this case already has its survey response")
        self._trigger(self.SatisfactionRecorded, at, csat=csat, ces=ces, nps=nps, comment=comment)

    def move_to_customer(self, customer_id: str, merge_id: str, at: datetime) -> bool:
        """Gives the case to `customer_id` for merge `merge_id` (a closed case too: its
        customer's case list follows); False (and no event) when it is theirs already, or
        this merge moved it before (an old delivery of the merge after its undo)."""
        if not customer_id or not merge_id:
            raise RuleViolated("moving a case needs the new customer and the merge")
        if customer_id == self.customer_id:
            return False
        if any(m["merge_id"] == merge_id for m in self.__dict__.get("moves", [])):
            return False
        self._hand_over(customer_id, merge_id, at, undone=False)
        return True

    def give_back(self, merge_id: str, restored: Collection[str], at: datetime) -> bool:
        """Undoes the move of merge `merge_id`: the case goes back to the customer it was
        moved from, if that one is among `restored`, keeping everything that happened
        since. False (and no event) when the merge did not move it, or it was given back
        already."""
        if not self.moved_by(merge_id):
            return False
        moves = [m for m in self.moves if m["merge_id"] == merge_id]
        owner = str(moves[-1]["from"])
        if owner not in restored or owner == self.customer_id:
            return False
        self._hand_over(owner, merge_id, at, undone=True)
        return True

    def moved_by(self, merge_id: str) -> bool:
        """Whether merge `merge_id` moved the case and it was not given back yet."""
        moves = [m for m in self.__dict__.get("moves", []) if m["merge_id"] == merge_id]
        return bool(moves) and not moves[-1]["undone"]

    def _hand_over(self, customer_id: str, merge_id: str, at: datetime, *, undone: bool) -> None:
        # The event belongs to the new owner (its `customer_id`), unlike `_trigger`'s.
        self.trigger_event(
            self.CustomerMoved,
            customer_id=customer_id,
            at=at,
            from_customer_id=self.customer_id,
            to_customer_id=customer_id,
            merge_id=merge_id,
            undone=undone,
        )

    def raise_deadline(self, kind: str, what: str, deadline_version: int, now: datetime) -> bool:
        """Raises the warning or breach of clock `kind` if it is (still) due: False (and no
        event) when it was raised before, the deadline moved, or it is not due yet."""
        deadlines = {(d.kind, d.what): d for d in self.deadlines()}
        due = deadlines.get((kind, what))
        if due is None or due.deadline_version != deadline_version or due.at > now:
            return False
        breach = deadlines.get((kind, "breach"))
        if what == "warning" and breach is not None and breach.at <= now:
            return False  # too late to warn: the breach is due and says more
        event = self.SlaBreached if what == "breach" else self.SlaWarned
        self._trigger(
            event,
            now,
            kind=kind,
            due_at=due.at,
            deadline_version=deadline_version,
            cycle=due.cycle,
        )
        if what == "breach":
            self._escalate(kind, now)
        return True

    def _escalate(self, kind: str, at: datetime) -> None:
        raise_priority = bool(self.terms.get("escalate_priority"))
        team = self.terms.get("escalate_team") or ""
        if not raise_priority and not team:
            return
        priority = self.priority
        if raise_priority:
            priority = PRIORITIES[min(PRIORITIES.index(priority) + 1, len(PRIORITIES) - 1)]
        self._trigger(
            self.Escalated,
            at,
            kind=kind,
            priority=priority,
            team=team or self.team,
            notify_team=team,
        )

    # -- queries

    @property
    def calendar(self) -> BusinessCalendar:
        return BusinessCalendar.from_data(self.terms["calendar"])

    def deadlines(self) -> list[Deadline]:
        """The warnings and breaches still to raise, earliest first."""
        found: list[Deadline] = []
        warning = int(self.terms.get("warning_seconds", 0))
        for kind, clock in self.clocks.items():
            since = _at(clock["running_since"])
            if since is None or clock["met_at"] is not None or clock["breached"]:
                continue
            left = clock["target"] - clock["consumed"]
            version = clock["deadline_version"]
            cycle = int(clock.get("cycle", 1))
            due = self.calendar.add(since, max(left, 0))
            if not clock["warned"] and warning > 0 and left > warning:
                found.append(
                    Deadline(
                        str(self.id),
                        kind,
                        "warning",
                        self.calendar.add(since, left - warning),
                        version,
                        cycle,
                    )
                )
            found.append(Deadline(str(self.id), kind, "breach", due, version, cycle))
        return sorted(found, key=lambda d: d.at)

    def sla_clocks(self) -> list[dict[str, Any]]:
        """The clocks as they stand (no `now` needed): kind, state, cycle, and `due_at`
        (running, or breached: when it fell due), `remaining_seconds` (paused: business
        seconds left, 0 when none) and `warn_at` (running, the warning still to come)."""
        pending = {(d.kind, d.what): d.at for d in self.deadlines()}
        found = []
        for kind in TARGET_KINDS:
            clock = self.clocks.get(kind)
            if clock is None:
                continue
            state = self.clock_state(kind)
            due_at: datetime | None = None
            remaining: int | None = None
            if state == "running":
                due_at = pending.get((kind, "breach"))
            elif state == "breached":
                due_at = _at(clock.get("breached_due_at"))
            elif state == "paused":
                remaining = max(int(clock["target"] - clock["consumed"]), 0)
            found.append(
                {
                    "kind": kind,
                    "state": state,
                    "cycle": int(clock.get("cycle", 1)),
                    "due_at": due_at,
                    "remaining_seconds": remaining,
                    "warn_at": pending.get((kind, "warning")) if state == "running" else None,
                }
            )
        return found

    def next_due(self) -> datetime | None:
        """The next breach time of a running clock (the queue's urgency)."""
        breaches = [d.at for d in self.deadlines() if d.what == "breach"]
        return min(breaches) if breaches else None

    def clock_state(self, kind: str) -> str:
        """running, paused, met, or breached (a target met late stays breached)."""
        clock = self.clocks[kind]
        if clock["breached"]:
            return "breached"
        if clock["met_at"] is not None:
            return "met"
        return "running" if clock["running_since"] is not None else "paused"

    def business_seconds_used(self, kind: str, now: datetime) -> float:
        clock = self.clocks[kind]
        since = _at(clock["running_since"])
        used: float = clock["consumed"]
        if since is not None and clock["met_at"] is None:
            used += self.calendar.between(since, now)
        return used

    # -- clock mechanics (called from the events' apply, so replay rebuilds them)

    def _targets(self) -> dict[str, Any]:
        """The targets of the case's tier and priority (the default tier's when its
        policy sets none for the tier)."""
        targets = self.terms["targets"]
        by_priority = targets.get(self.tier) or targets.get(DEFAULT_TIER) or {}
        found: dict[str, Any] = by_priority.get(self.priority) or {}
        return found

    def _await_agent(self, at: datetime) -> None:
        """A customer's public reply: a new next-reply clock instance starts, unless one
        is already counting (the agent still owes the earlier reply), the first response
        is still owed (its clock covers it), or the case is solved."""
        if self.status in STOPPED:
            return
        target = int(self._targets().get("next_reply") or 0)
        first = self.clocks.get("first_response")
        if target <= 0 or (first is not None and first["met_at"] is None):
            return
        before = self.clocks.get("next_reply")
        if before is not None and before["met_at"] is None:
            return
        clock = _new_clock(target, at, running=not self._pauses(self.status))
        if before is not None:
            self.finished_clocks.append(
                {
                    "kind": "next_reply",
                    "cycle": int(before.get("cycle", 1)),
                    "state": "breached" if before["breached"] else "met",
                    "seconds": before["consumed"],
                }
            )
            clock["cycle"] = int(before.get("cycle", 1)) + 1
            clock["deadline_version"] = int(before["deadline_version"]) + 1
        self.clocks["next_reply"] = clock

    def _trigger(self, event: type[Aggregate.Event], at: datetime, **fields: Any) -> None:
        self.trigger_event(event, customer_id=self.customer_id, at=at, **fields)

    def _refuse_when_closed(self, verb: str) -> None:
        if self.status == "closed":
            raise RuleViolated(f"a closed case is final: cannot {verb} it")

    def _pauses(self, status: str) -> bool:
        return status in PAUSED_ALWAYS or (
            status == "on_hold" and bool(self.terms.get("pause_on_hold"))
        )

    def _stop_clock(self, clock: dict[str, Any], at: datetime) -> None:
        since = _at(clock["running_since"])
        if since is not None:
            clock["consumed"] += self.calendar.between(since, at)
            clock["running_since"] = None
            clock["deadline_version"] += 1

    def _start_clock(self, clock: dict[str, Any], at: datetime) -> None:
        if clock["running_since"] is None and clock["met_at"] is None:
            clock["running_since"] = _iso(at)
            clock["deadline_version"] += 1

    def _meet(self, kind: str, at: datetime) -> None:
        clock = self.clocks.get(kind)
        if clock is not None and clock["met_at"] is None:
            self._stop_clock(clock, at)
            clock["met_at"] = _iso(at)

    def _move(self, status: str, at: datetime) -> None:
        before, self.status = self.status, status
        if status in STOPPED:
            if status == "solved":
                self.solved_at = at
                for kind in self.clocks:
                    self._meet(kind, at)
            return
        if before == "solved":  # reopened: resolution runs again from where it stopped
            clock = self.clocks.get("resolution")
            if clock is not None:
                clock["met_at"] = None
            self.solved_at = None
        for clock in self.clocks.values():
            if self._pauses(status):
                self._stop_clock(clock, at)
            else:
                self._start_clock(clock, at)

    def _set_priority(self, priority: str, at: datetime) -> None:
        if priority == self.priority:
            return
        self.priority = priority
        targets = self._targets()
        for kind, clock in self.clocks.items():
            if clock["met_at"] is None and kind in targets:
                clock["target"] = int(targets[kind])
                clock["deadline_version"] += 1
