"""Views and domain values as protobuf messages (the gRPC API and the Kafka events).

Enum values map to the domain's lower-case words through `crm_common.enums`
(`FORECAST_CATEGORY_BEST_CASE` is `best_case`, the zero value is None).
Money is a decimal in text plus its currency; dates are ISO-8601 text.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from crm.pipeline.v1 import pipeline_pb2 as pb
from crm_common.enums import enum_number
from crm_pipeline.domain import LineItem
from crm_pipeline.views import ActivityView, LeadView, OpportunityView, PipelineView, StageView


def timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def duration(span: timedelta | None) -> Duration | None:
    if span is None:
        return None
    message = Duration()
    message.FromTimedelta(span)
    return message


def iso(day: date | None) -> str:
    return day.isoformat() if day is not None else ""


def decimal_text(number: Decimal | None) -> str:
    """A decimal in plain notation (never 1E+1)."""
    return "" if number is None else f"{number:f}"


def money_pb(amount: Decimal, currency: str) -> pb.Money:
    return pb.Money(amount=decimal_text(amount), currency=currency)


def stage_pb(stage: StageView) -> pb.Stage:
    return pb.Stage(
        stage_id=stage.stage_id,
        name=stage.name,
        probability=decimal_text(stage.probability.normalize()),
        category=enum_number(pb.ForecastCategory, stage.category),
        retired=stage.retired,
    )


def pipeline_pb(pipeline: PipelineView) -> pb.Pipeline:
    return pb.Pipeline(
        id=pipeline.id,
        version=pipeline.version,
        name=pipeline.name,
        stages=[stage_pb(s) for s in pipeline.stages],
    )


def lead_pb(lead: LeadView) -> pb.Lead:
    message = pb.Lead(
        id=lead.id,
        version=lead.version,
        given_name=lead.given_name,
        family_name=lead.family_name,
        company_name=lead.company_name,
        email=lead.email,
        phone=lead.phone,
        source=enum_number(pb.LeadSource, lead.source),
        campaign=lead.campaign,
        owner=lead.owner,
        status=enum_number(pb.LeadStatus, lead.status),
        disqualify_reason=lead.disqualify_reason,
        person_id=lead.person_id,
        company_id=lead.company_id,
        opportunity_id=lead.opportunity_id,
        created_at=timestamp(lead.created_at),
        converted_at=timestamp(lead.converted_at),
    )
    if lead.score is not None:
        message.score = lead.score
    return message


def line_item_pb(line: LineItem) -> pb.LineItem:
    return pb.LineItem(
        product_id=line.product_id,
        product_name=line.product_name,
        quantity=decimal_text(line.quantity),
        unit_price=decimal_text(line.unit_price),
        discount_percent=decimal_text(line.discount_percent),
        total=decimal_text(line.total),
    )


def opportunity_pb(deal: OpportunityView) -> pb.Opportunity:
    return pb.Opportunity(
        id=deal.id,
        version=deal.version,
        pipeline_id=deal.pipeline_id,
        stage_id=deal.stage_id,
        name=deal.name,
        customer_id=deal.customer_id,
        person_id=deal.person_id,
        company_id=deal.company_id,
        owner=deal.owner,
        amount=money_pb(deal.amount.amount, deal.amount.currency),
        expected_close_date=iso(deal.expected_close_date),
        kind=enum_number(pb.OpportunityKind, deal.kind),
        related_opportunity_ids=deal.related_opportunity_ids,
        lead_id=deal.lead_id,
        line_items=[line_item_pb(line) for line in deal.line_items],
        status=enum_number(pb.OpportunityStatus, deal.status),
        lost_reason=deal.lost_reason,
        closed_on=iso(deal.closed_on),
        closed_at=timestamp(deal.closed_at),
        opened_at=timestamp(deal.opened_at),
        history=[
            pb.StageVisit(
                stage_id=v.stage_id,
                entered_at=timestamp(v.entered_at),
                left_at=timestamp(v.left_at),
                regression=v.regression,
            )
            for v in deal.history
        ],
        reopen_count=deal.reopen_count,
    )


def activity_pb(activity: ActivityView) -> pb.Activity:
    return pb.Activity(
        id=activity.id,
        version=activity.version,
        subject_kind=enum_number(pb.SubjectKind, activity.subject_kind),
        subject_id=activity.subject_id,
        customer_id=activity.customer_id,
        kind=enum_number(pb.ActivityKind, activity.kind),
        title=activity.title,
        owner=activity.owner,
        due_at=timestamp(activity.due_at),
        status=enum_number(pb.ActivityStatus, activity.status),
        outcome=activity.outcome,
        scheduled_at=timestamp(activity.scheduled_at),
        finished_at=timestamp(activity.finished_at),
    )
