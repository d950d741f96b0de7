"""`SlaPolicy`: SLA targets as data, versioned and retired, never edited in place.

A policy holds, per customer tier and priority, the business seconds allowed
until the first public reply and until the case is solved; how long before a
deadline the warning is raised; whether the clocks also pause while a case is
on hold (they always pause while it waits on the customer); the business
calendar the time is counted in; and what happens on breach (escalation).
A revision makes a new policy version; open cases keep the version they
started with, new cases take the current one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated
from crm_tickets.domain.calendar import BusinessCalendar

#: tier -> priority -> target kind -> business seconds
Targets = dict[str, dict[str, dict[str, int]]]


class SlaPolicy(Aggregate):
    """The SLA rules cases of a team are measured by."""

    class Defined(Aggregate.Created):
        name: str
        terms: dict[str, Any]
        at: datetime

    class Revised(Aggregate.Event):
        terms: dict[str, Any]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.terms = self.terms
            aggregate.policy_version += 1

    class Retired(Aggregate.Event):
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.retired = True

    def __init__(self, name: str, terms: dict[str, Any], at: datetime) -> None:
        self.name = name
        self.terms = terms
        self.policy_version = 1
        self.retired = False
        self.defined_at = at

    @classmethod
    def define(cls, name: str, terms: dict[str, Any], at: datetime) -> SlaPolicy:
        return cls._create(cls.Defined, name=name, terms=terms, at=at)

    def revise(self, terms: dict[str, Any], at: datetime) -> None:
        if self.retired:
            raise RuleViolated(f"SLA policy {self.name!r} is retired")
        self.trigger_event(self.Revised, terms=terms, at=at)

    def retire(self, at: datetime) -> None:
        if self.retired:
            raise RuleViolated(f"SLA policy {self.name!r} is already retired")
        self.trigger_event(self.Retired, at=at)

    # -- reading the terms

    @property
    def calendar(self) -> BusinessCalendar:
        return BusinessCalendar.from_data(self.terms["calendar"])

    @property
    def targets(self) -> Targets:
        targets: Targets = self.terms["targets"]
        return targets


def policy_terms(
    *,
    targets: Targets,
    calendar: BusinessCalendar,
    warning_seconds: int,
    pause_on_hold: bool,
    escalate_priority: bool,
    escalate_team: str,
) -> dict[str, Any]:
    """Terms as stored (plain data), checked by `crm_tickets.validation` beforehand."""
    return {
        "targets": targets,
        "calendar": calendar.to_data(),
        "warning_seconds": warning_seconds,
        "pause_on_hold": pause_on_hold,
        "escalate_priority": escalate_priority,
        "escalate_team": escalate_team,
    }
