"""What readers see: frozen views of the aggregates, returned by the
application's queries and writes and rendered by `messages` (protobuf) and
the REST adapter. A view is a copy: it stays as it was when it was taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from crm_common.commands import WriteOutcome
from crm_common.money import Money
from crm_pipeline.domain import Activity, Lead, LineItem, Opportunity, Pipeline, Stage, StageVisit


@dataclass(frozen=True)
class LeadView:
    id: str
    version: int
    given_name: str
    family_name: str
    company_name: str
    email: str
    phone: str
    source: str
    campaign: str
    owner: str
    status: str
    score: int | None
    disqualify_reason: str
    person_id: str
    company_id: str
    opportunity_id: str
    created_at: datetime
    converted_at: datetime | None


@dataclass(frozen=True)
class StageView:
    stage_id: str
    name: str
    probability: Decimal
    category: str
    retired: bool = False


@dataclass(frozen=True)
class PipelineView:
    id: str
    version: int
    name: str
    # Active stages in their order, then retired ones.
    stages: tuple[StageView, ...]


@dataclass(frozen=True)
class OpportunityView:
    id: str
    version: int
    pipeline_id: str
    stage_id: str
    name: str
    customer_id: str
    person_id: str
    company_id: str
    owner: str
    amount: Money
    expected_close_date: date
    kind: str
    related_opportunity_ids: tuple[str, ...]
    lead_id: str
    line_items: tuple[LineItem, ...]
    status: str
    lost_reason: str
    closed_on: date | None
    closed_at: datetime | None
    opened_at: datetime
    reopen_count: int
    history: tuple[StageVisit, ...]


@dataclass(frozen=True)
class ActivityView:
    id: str
    version: int
    subject_kind: str
    subject_id: str
    customer_id: str
    kind: str
    title: str
    owner: str
    due_at: datetime
    status: str
    outcome: str
    scheduled_at: datetime
    finished_at: datetime | None


View = LeadView | PipelineView | OpportunityView | ActivityView


@dataclass(frozen=True)
class Written:
    """The outcome of a write and its subject as it stands after it."""

    outcome: WriteOutcome
    subject: View


@dataclass(frozen=True)
class OpportunityPage:
    opportunities: list[OpportunityView]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class LeadPage:
    leads: list[LeadView]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class ActivityPage:
    activities: list[ActivityView]
    next_page_token: str
    total_size: int


def lead_view(lead: Lead) -> LeadView:
    return LeadView(
        id=str(lead.id),
        version=lead.version,
        given_name=lead.given_name,
        family_name=lead.family_name,
        company_name=lead.company_name,
        email=lead.email,
        phone=lead.phone,
        source=lead.source,
        campaign=lead.campaign,
        owner=lead.owner,
        status=lead.status,
        score=lead.score,
        disqualify_reason=lead.disqualify_reason,
        person_id=lead.person_id,
        company_id=lead.company_id,
        opportunity_id=lead.opportunity_id,
        created_at=lead.created_at,
        converted_at=lead.converted_at,
    )


def stage_view(stage: Stage) -> StageView:
    return StageView(stage.stage_id, stage.name, stage.probability, stage.category, stage.retired)


def pipeline_view(pipeline: Pipeline) -> PipelineView:
    return PipelineView(
        id=str(pipeline.id),
        version=pipeline.version,
        name=pipeline.name,
        stages=tuple(stage_view(s) for s in pipeline.ordered_stages()),
    )


def opportunity_view(deal: Opportunity) -> OpportunityView:
    return OpportunityView(
        id=str(deal.id),
        version=deal.version,
        pipeline_id=deal.pipeline_id,
        stage_id=deal.stage_id,
        name=deal.name,
        customer_id=deal.customer_id,
        person_id=deal.person_id,
        company_id=deal.company_id,
        owner=deal.owner,
        amount=deal.amount,
        expected_close_date=deal.expected_close_date,
        kind=deal.kind,
        related_opportunity_ids=tuple(deal.related_deal_ids),
        lead_id=deal.lead_id,
        line_items=tuple(deal.line_items),
        status=deal.status,
        lost_reason=deal.lost_reason,
        closed_on=deal.closed_on,
        closed_at=deal.closed_at,
        opened_at=deal.opened_at,
        reopen_count=deal.reopen_count,
        history=tuple(deal.history),
    )


def activity_view(activity: Activity) -> ActivityView:
    return ActivityView(
        id=str(activity.id),
        version=activity.version,
        subject_kind=activity.subject_kind,
        subject_id=activity.subject_id,
        customer_id=activity.customer_id,
        kind=activity.kind,
        title=activity.title,
        owner=activity.owner,
        due_at=activity.due_at,
        status=activity.status,
        outcome=activity.outcome,
        scheduled_at=activity.scheduled_at,
        finished_at=activity.finished_at,
    )


def view_of(aggregate: Any) -> View:
    """The view of any of the service's aggregates."""
    if isinstance(aggregate, Lead):
        return lead_view(aggregate)
    if isinstance(aggregate, Pipeline):
        return pipeline_view(aggregate)
    if isinstance(aggregate, Opportunity):
        return opportunity_view(aggregate)
    if isinstance(aggregate, Activity):
        return activity_view(aggregate)
    raise TypeError(f"{type(aggregate).__name__} is not an aggregate of the pipeline service")
