"""Views and domain values as protobuf messages (the gRPC adapter and the events)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from crm.tickets.v1 import tickets_pb2 as pb
from crm_common.enums import enum_number
from crm_tickets.views import CaseView, ComplianceView, PolicyView, SatisfactionTrendView


def timestamp(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def terms_pb(terms: dict[str, Any]) -> pb.SlaTerms:
    calendar = terms["calendar"]
    return pb.SlaTerms(
        targets=[
            pb.SlaTarget(
                tier=tier,
                priority=enum_number(pb.Priority, priority),
                first_response_seconds=kinds["first_response"],
                resolution_seconds=kinds["resolution"],
                next_reply_seconds=kinds.get("next_reply", 0),
            )
            for tier, by_priority in sorted(terms["targets"].items())
            for priority, kinds in by_priority.items()
        ],
        calendar=pb.BusinessCalendar(
            timezone=calendar["timezone"],
            hours=[pb.Weekday(day=d, opens=o, closes=c) for d, o, c in calendar["hours"]],
            holidays=calendar["holidays"],
        ),
        warning_seconds=terms["warning_seconds"],
        pause_on_hold=terms["pause_on_hold"],
        escalate_priority=terms["escalate_priority"],
        escalate_team=terms["escalate_team"],
    )


def policy_pb(view: PolicyView) -> pb.SlaPolicy:
    return pb.SlaPolicy(
        id=view.id,
        version=view.version,
        name=view.name,
        policy_version=view.policy_version,
        retired=view.retired,
        terms=terms_pb(view.terms),
    )


def case_pb(view: CaseView) -> pb.Case:
    return pb.Case(
        id=view.id,
        version=view.version,
        customer_id=view.customer_id,
        channel=enum_number(pb.Channel, view.channel),
        subject=view.subject,
        description=view.description,
        category=view.category,
        priority=enum_number(pb.Priority, view.priority),
        team=view.team,
        assignee=view.assignee,
        status=enum_number(pb.CaseStatus, view.status),
        tier=view.tier,
        tier_source=view.tier_source,
        policy_id=view.policy_id,
        policy_version=view.policy_version,
        clocks=[
            pb.SlaClock(
                kind=c.kind,
                state=enum_number(pb.ClockState, c.state),
                target_seconds=c.target_seconds,
                used_seconds=c.used_seconds,
                due_at=timestamp(c.due_at),
                cycle=c.cycle,
            )
            for c in view.clocks
        ],
        messages=[
            pb.CaseMessage(
                at=timestamp(m.at),
                author=m.author,
                author_kind=enum_number(pb.AuthorKind, m.author_kind),
                body=m.body,
                internal=m.internal,
            )
            for m in view.messages
        ],
        history=[
            pb.HistoryEntry(at=timestamp(h.at), what=h.what, details=h.details)
            for h in view.history
        ],
        satisfaction=(
            None
            if view.satisfaction is None
            else pb.Satisfaction(
                csat=view.satisfaction.csat,
                ces=view.satisfaction.ces or 0,
                nps=-1 if view.satisfaction.nps is None else view.satisfaction.nps,
                comment=view.satisfaction.comment,
            )
        ),
        opened_at=timestamp(view.opened_at),
        next_due_at=timestamp(view.next_due_at),
    )


def compliance_pb(view: ComplianceView) -> pb.SlaCompliance:
    return pb.SlaCompliance(
        team=view.team,
        period_start=timestamp(view.period_start),
        period_end=timestamp(view.period_end),
        cases=view.cases,
        targets=[
            pb.TargetCompliance(
                kind=t.kind, met=t.met, breached=t.breached, open=t.open, share_met=t.share_met
            )
            for t in view.targets
        ],
        first_reply_count=view.first_reply_count,
        first_reply_mean_seconds=view.first_reply_mean_seconds,
        first_reply_p90_seconds=view.first_reply_p90_seconds,
        resolution_count=view.resolution_count,
        resolution_mean_seconds=view.resolution_mean_seconds,
        resolution_p90_seconds=view.resolution_p90_seconds,
    )


def trend_pb(view: SatisfactionTrendView) -> pb.SatisfactionTrend:
    return pb.SatisfactionTrend(
        team=view.team,
        period_start=timestamp(view.period_start),
        period_end=timestamp(view.period_end),
        interval=view.interval,
        periods=[
            pb.SatisfactionPeriod(
                start=timestamp(p.start),
                end=timestamp(p.end),
                responses=p.responses,
                csat_mean=p.csat_mean,
                ces_responses=p.ces_responses,
                ces_mean=p.ces_mean,
                nps_responses=p.nps_responses,
                promoters=p.promoters,
                passives=p.passives,
                detractors=p.detractors,
                nps=p.nps,
            )
            for p in view.periods
        ],
    )
