"""What readers see: frozen views of cases and SLA policies, returned by the
application's queries and writes and rendered by `messages` (protobuf) and the
REST adapter. A view is a copy taken at one instant (`now` for the clocks)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crm_common.commands import WriteOutcome
from crm_tickets.domain import TARGET_KINDS, Case, SlaPolicy


@dataclass(frozen=True)
class ClockView:
    kind: str
    state: str
    target_seconds: int
    used_seconds: float
    due_at: datetime | None
    cycle: int = 1


@dataclass(frozen=True)
class MessageView:
    at: datetime
    author: str
    author_kind: str
    body: str
    internal: bool


@dataclass(frozen=True)
class HistoryView:
    at: datetime
    what: str
    details: dict[str, str]


@dataclass(frozen=True)
class SatisfactionView:
    csat: int
    ces: int | None
    nps: int | None
    comment: str


@dataclass(frozen=True)
class CaseView:
    id: str
    version: int
    customer_id: str
    channel: str
    subject: str
    description: str
    category: str
    priority: str
    team: str
    assignee: str
    status: str
    tier: str
    tier_source: str
    policy_id: str
    policy_version: int
    clocks: list[ClockView]
    messages: list[MessageView]
    history: list[HistoryView]
    satisfaction: SatisfactionView | None
    opened_at: datetime
    next_due_at: datetime | None


@dataclass(frozen=True)
class PolicyView:
    id: str
    version: int
    name: str
    policy_version: int
    retired: bool
    terms: dict[str, Any]


View = CaseView | PolicyView


@dataclass(frozen=True)
class Written:
    """The outcome of a write and its subject as it stands after it."""

    outcome: WriteOutcome
    subject: View


@dataclass(frozen=True)
class CasePage:
    cases: list[CaseView]
    next_page_token: str


@dataclass(frozen=True)
class TargetComplianceView:
    kind: str
    met: int
    breached: int
    open: int
    share_met: float


@dataclass(frozen=True)
class ComplianceView:
    """SLA compliance of a team's cases opened in [period_start, period_end). Times are
    business seconds on each case's calendar with paused time left out (what the SLA
    clocks count); p90 by the nearest-rank method."""

    team: str
    period_start: datetime
    period_end: datetime
    cases: int
    targets: list[TargetComplianceView]
    first_reply_count: int
    first_reply_mean_seconds: float
    first_reply_p90_seconds: float
    resolution_count: int
    resolution_mean_seconds: float
    resolution_p90_seconds: float


@dataclass(frozen=True)
class SatisfactionPeriodView:
    """The survey responses recorded in [start, end): a UTC month or week cut to the
    requested period. Means and NPS are 0 when nothing was answered."""

    start: datetime
    end: datetime
    responses: int
    csat_mean: float
    ces_responses: int
    ces_mean: float
    nps_responses: int
    promoters: int
    passives: int
    detractors: int
    #: promoters% - detractors% of `nps_responses`, -100 to 100.
    nps: float


@dataclass(frozen=True)
class SatisfactionTrendView:
    """Every month or week of [period_start, period_end) in order, empty ones too."""

    team: str
    period_start: datetime
    period_end: datetime
    interval: str
    periods: list[SatisfactionPeriodView]


def case_view(case: Case, now: datetime) -> CaseView:
    due = {d.kind: d.at for d in case.deadlines() if d.what == "breach"}
    return CaseView(
        id=str(case.id),
        version=case.version,
        customer_id=case.customer_id,
        channel=case.channel,
        subject=case.subject,
        description=case.description,
        category=case.category,
        priority=case.priority,
        team=case.team,
        assignee=case.assignee,
        status=case.status,
        tier=case.tier,
        tier_source=case.tier_source,
        policy_id=case.policy_id,
        policy_version=case.policy_version,
        clocks=[
            ClockView(
                kind,
                case.clock_state(kind),
                int(clock["target"]),
                round(case.business_seconds_used(kind, now), 3),
                due.get(kind),
                int(clock.get("cycle", 1)),
            )
            for kind, clock in sorted(case.clocks.items(), key=lambda c: TARGET_KINDS.index(c[0]))
        ],
        messages=[
            MessageView(
                datetime.fromisoformat(m["at"]),
                m["author"],
                m["author_kind"],
                m["body"],
                m["internal"],
            )
            for m in case.messages
        ],
        history=[
            HistoryView(
                datetime.fromisoformat(h["at"]),
                h["what"],
                {k: str(v) for k, v in h.items() if k not in ("at", "what")},
            )
            for h in case.history
        ],
        satisfaction=(
            None
            if case.satisfaction is None
            else SatisfactionView(
                case.satisfaction["csat"],
                case.satisfaction["ces"],
                case.satisfaction["nps"],
                case.satisfaction["comment"],
            )
        ),
        opened_at=case.opened_at,
        next_due_at=case.next_due(),
    )


def policy_view(policy: SlaPolicy) -> PolicyView:
    return PolicyView(
        str(policy.id),
        policy.version,
        policy.name,
        policy.policy_version,
        policy.retired,
        policy.terms,
    )


def view_of(subject: Any, now: datetime) -> View:
    if isinstance(subject, Case):
        return case_view(subject, now)
    if isinstance(subject, SlaPolicy):
        return policy_view(subject)
    raise TypeError(f"no view of {type(subject).__name__}")
