"""What the tickets commands and queries take, as plain data (enums as lower-case
words, None when unset); `crm_tickets.validation` checks them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NewCase:
    customer_id: str
    channel: str | None
    subject: str
    description: str = ""
    category: str = ""
    priority: str | None = None
    team: str = ""
    assignee: str = ""
    policy_id: str = ""


@dataclass(frozen=True)
class Triage:
    category: str
    priority: str | None
    team: str


@dataclass(frozen=True)
class TargetInput:
    tier: str
    priority: str | None
    first_response_seconds: int
    resolution_seconds: int
    next_reply_seconds: int = 0


@dataclass(frozen=True)
class WeekdayInput:
    day: str
    opens: str
    closes: str


@dataclass(frozen=True)
class CalendarInput:
    timezone: str
    hours: list[WeekdayInput] = field(default_factory=list)
    holidays: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SlaTermsInput:
    targets: list[TargetInput]
    calendar: CalendarInput
    warning_seconds: int = 0
    pause_on_hold: bool = False
    escalate_priority: bool = False
    escalate_team: str = ""


@dataclass(frozen=True)
class SurveyInput:
    csat: int
    ces: int | None = None
    nps: int | None = None
    comment: str = ""
