"""Request bodies and response models of the REST API, and the replies built
from the application's views.

Enums are the domain's lower-case words, money is
`{"amount": "1234.50", "currency": "EUR"}` (the amount as text, never a
number), calendar dates `YYYY-MM-DD`, times ISO-8601, spans in seconds.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from crm_common.commands import WriteOutcome
from crm_common.money import Money
from crm_pipeline.domain import (
    ACTIVITY_KINDS,
    FORECAST_CATEGORIES,
    LEAD_SOURCES,
    OPPORTUNITY_KINDS,
    SUBJECT_KINDS,
    LineItem,
    StageVisit,
)
from crm_pipeline.forecast import ActivityInfo, ForecastRow, Funnel, FunnelStage, WinRate
from crm_pipeline.views import (
    ActivityView,
    LeadView,
    OpportunityView,
    PipelineView,
    StageView,
    Written,
)

# ISO-8601 as Python writes it (`+00:00`, not `Z`): the form clients have always read.
Time = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str)]


def _text(number: Decimal | None) -> str | None:
    return None if number is None else f"{number:f}"


def _seconds(span: timedelta | None) -> float | None:
    return None if span is None else span.total_seconds()


# -- errors and statuses ------------------------------------------------------------------------


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorReply(BaseModel):
    error: str = Field(description="The kind of error, e.g. `ValidationFailed`, `NotFound`.")
    message: str
    detail: list[FieldProblem] | None = Field(None, description="Every invalid field.")
    expected_version: int | None = None
    actual_version: int | None = None


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorReply, "description": description}


Responses = dict[int | str, dict[str, Any]]
INVALID: Responses = {422: _error("Invalid input; `detail` names every offending field")}
UNKNOWN: Responses = {404: _error("Nothing of that kind has this id")}
CONFLICT: Responses = {409: _error("A stale If-Match version, or a change the rules refuse")}
READ: Responses = {**UNKNOWN}
QUERY: Responses = {**INVALID}
CREATE: Responses = {
    200: {"description": "A replay of an earlier Idempotency-Key"},
    **INVALID,
    **UNKNOWN,
    **CONFLICT,
}
CHANGE: Responses = {**INVALID, **UNKNOWN, **CONFLICT}


# -- what readers see ---------------------------------------------------------------------------


class MoneyModel(BaseModel):
    amount: str = Field(description="A decimal as text, e.g. `1234.50`.")
    currency: str = Field(description="ISO 4217 code, e.g. `EUR`.")

    @classmethod
    def of(cls, amount: Decimal, currency: str) -> MoneyModel:
        return cls(amount=f"{amount:f}", currency=currency)

    @classmethod
    def of_money(cls, money: Money) -> MoneyModel:
        return cls.of(money.amount, money.currency)


class LeadModel(BaseModel):
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
    created_at: Time
    converted_at: Time | None

    @classmethod
    def of(cls, lead: LeadView) -> LeadModel:
        return cls(**lead.__dict__)


class StageModel(BaseModel):
    stage_id: str
    name: str
    probability: str = Field(description="Percent as a decimal in text, e.g. `40`.")
    category: str
    retired: bool

    @classmethod
    def of(cls, stage: StageView) -> StageModel:
        return cls(
            stage_id=stage.stage_id,
            name=stage.name,
            probability=f"{stage.probability.normalize():f}",
            category=stage.category,
            retired=stage.retired,
        )


class PipelineModel(BaseModel):
    id: str
    version: int
    name: str
    stages: list[StageModel] = Field(description="Active stages in order, then retired ones.")

    @classmethod
    def of(cls, pipeline: PipelineView) -> PipelineModel:
        return cls(
            id=pipeline.id,
            version=pipeline.version,
            name=pipeline.name,
            stages=[StageModel.of(s) for s in pipeline.stages],
        )


class LineItemModel(BaseModel):
    product_id: str
    product_name: str
    quantity: str
    unit_price: str
    discount_percent: str
    total: str

    @classmethod
    def of(cls, line: LineItem) -> LineItemModel:
        return cls(
            product_id=line.product_id,
            product_name=line.product_name,
            quantity=f"{line.quantity:f}",
            unit_price=f"{line.unit_price:f}",
            discount_percent=f"{line.discount_percent:f}",
            total=f"{line.total:f}",
        )


class StageVisitModel(BaseModel):
    stage_id: str
    entered_at: Time
    left_at: Time | None
    regression: bool

    @classmethod
    def of(cls, visit: StageVisit) -> StageVisitModel:
        return cls(**visit.__dict__)


class OpportunityModel(BaseModel):
    id: str
    version: int
    pipeline_id: str
    stage_id: str
    name: str
    customer_id: str
    person_id: str
    company_id: str
    owner: str
    amount: MoneyModel
    expected_close_date: date
    kind: str
    related_opportunity_ids: list[str]
    lead_id: str
    line_items: list[LineItemModel]
    status: str
    lost_reason: str
    closed_on: date | None
    closed_at: Time | None
    opened_at: Time
    reopen_count: int
    history: list[StageVisitModel]

    @classmethod
    def of(cls, deal: OpportunityView) -> OpportunityModel:
        fields = {
            **deal.__dict__,
            "amount": MoneyModel.of_money(deal.amount),
            "related_opportunity_ids": list(deal.related_opportunity_ids),
            "line_items": [LineItemModel.of(line) for line in deal.line_items],
            "history": [StageVisitModel.of(v) for v in deal.history],
        }
        return cls(**fields)


class ActivityModel(BaseModel):
    id: str
    version: int
    subject_kind: str
    subject_id: str
    customer_id: str
    kind: str
    title: str
    owner: str
    due_at: Time
    status: str
    outcome: str
    scheduled_at: Time
    finished_at: Time | None

    @classmethod
    def of(cls, activity: ActivityView) -> ActivityModel:
        return cls(**activity.__dict__)


class _WriteReply(BaseModel):
    id: str = Field(description="The subject of the write.")
    version: int = Field(description="The subject's version after the write.")
    position: int = Field(description="The event-log position of the subject's last event.")
    replayed: bool = Field(description="True: a retry answered with the first outcome.")


def _outcome(outcome: WriteOutcome, response: Response | None) -> dict[str, Any]:
    if response is not None:
        response.status_code = 200 if outcome.replayed else 201
    return {
        "id": outcome.id,
        "version": outcome.version,
        "position": outcome.position,
        "replayed": outcome.replayed,
    }


class LeadWrite(_WriteReply):
    lead: LeadModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> LeadWrite:
        assert isinstance(written.subject, LeadView)
        return cls(**_outcome(written.outcome, response), lead=LeadModel.of(written.subject))


class ConversionWrite(_WriteReply):
    opportunity_id: str = Field(description="The deal the lead became.")
    person_id: str
    company_id: str = Field(description="Empty when the deal has no company.")
    person_matched: bool = Field(
        description="True: the person was an existing contact (named, or found by the "
        "lead's email or phone); false: the conversion registered it."
    )
    lead: LeadModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> ConversionWrite:
        assert isinstance(written.subject, LeadView)
        extra = written.outcome.extra
        return cls(
            **_outcome(written.outcome, response),
            opportunity_id=extra["opportunity_id"],
            person_id=extra["person_id"],
            company_id=extra["company_id"],
            person_matched=extra.get("person_matched") == "true",
            lead=LeadModel.of(written.subject),
        )


class PipelineWrite(_WriteReply):
    pipeline: PipelineModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> PipelineWrite:
        assert isinstance(written.subject, PipelineView)
        return cls(
            **_outcome(written.outcome, response), pipeline=PipelineModel.of(written.subject)
        )


class OpportunityWrite(_WriteReply):
    opportunity: OpportunityModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> OpportunityWrite:
        assert isinstance(written.subject, OpportunityView)
        return cls(
            **_outcome(written.outcome, response),
            opportunity=OpportunityModel.of(written.subject),
        )


class ActivityWrite(_WriteReply):
    activity: ActivityModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> ActivityWrite:
        assert isinstance(written.subject, ActivityView)
        return cls(
            **_outcome(written.outcome, response), activity=ActivityModel.of(written.subject)
        )


class PipelineList(BaseModel):
    pipelines: list[PipelineModel]


class OpportunityList(BaseModel):
    opportunities: list[OpportunityModel]
    next_page_token: str = Field(description="Empty on the last page.")
    total_size: int


class LeadList(BaseModel):
    leads: list[LeadModel] = Field(description="Oldest first.")
    next_page_token: str = Field(description="Empty on the last page.")
    total_size: int


class ActivityList(BaseModel):
    activities: list[ActivityModel] = Field(description="Soonest due first.")
    next_page_token: str = Field(description="Empty on the last page.")
    total_size: int


class FollowUpModel(BaseModel):
    id: str
    subject_kind: str
    subject_id: str
    kind: str
    title: str
    owner: str
    due_at: Time
    status: str

    @classmethod
    def of(cls, info: ActivityInfo) -> FollowUpModel:
        return cls(
            id=info.activity_id,
            subject_kind=info.subject_kind,
            subject_id=info.subject_id,
            kind=info.kind,
            title=info.title,
            owner=info.owner,
            due_at=info.due_at,
            status=info.status,
        )


class OwnerFollowUps(BaseModel):
    owner: str
    activities: list[FollowUpModel]


class OverdueFollowUps(BaseModel):
    owners: list[OwnerFollowUps] = Field(description="Most overdue first.")


class ForecastRowModel(BaseModel):
    period: str
    owner: str
    category: str
    deals: int
    amount: MoneyModel
    weighted_amount: MoneyModel

    @classmethod
    def of(cls, row: ForecastRow) -> ForecastRowModel:
        return cls(
            period=row.period,
            owner=row.owner,
            category=row.category,
            deals=row.deals,
            amount=MoneyModel.of(row.amount, row.currency),
            weighted_amount=MoneyModel.of(row.weighted_amount, row.currency),
        )


class ForecastModel(BaseModel):
    rows: list[ForecastRowModel]


class FunnelStageModel(BaseModel):
    stage_id: str
    name: str
    category: str
    retired: bool
    entered: int
    entries: int
    regressions: int
    advanced: int | None = Field(description="None for closing stages.")
    conversion: str | None = Field(description="advanced / entered; None for closing stages.")
    amounts: list[MoneyModel]
    average_seconds_in_stage: float | None

    @classmethod
    def of(cls, stage: FunnelStage) -> FunnelStageModel:
        return cls(
            stage_id=stage.stage_id,
            name=stage.name,
            category=stage.category,
            retired=stage.retired,
            entered=stage.entered,
            entries=stage.entries,
            regressions=stage.regressions,
            advanced=stage.advanced,
            conversion=_text(stage.conversion),
            amounts=[MoneyModel.of(a, c) for c, a in stage.amounts.items()],
            average_seconds_in_stage=_seconds(stage.average_time_in_stage),
        )


class FunnelModel(BaseModel):
    pipeline_id: str
    deals: int
    stages: list[FunnelStageModel]

    @classmethod
    def of(cls, result: Funnel) -> FunnelModel:
        return cls(
            pipeline_id=result.pipeline_id,
            deals=result.deals,
            stages=[FunnelStageModel.of(s) for s in result.stages],
        )


class WinRateModel(BaseModel):
    won: int
    lost: int
    rate: str | None
    won_amounts: list[MoneyModel]
    average_cycle_seconds: float | None

    @classmethod
    def of(cls, result: WinRate) -> WinRateModel:
        return cls(
            won=result.won,
            lost=result.lost,
            rate=_text(result.rate),
            won_amounts=[MoneyModel.of(a, c) for c, a in result.won_amounts.items()],
            average_cycle_seconds=_seconds(result.average_cycle),
        )


# -- request bodies -------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(words: tuple[str, ...], description: str, **kw: Any) -> Any:
    return Field(
        description=f"{description} One of: {', '.join(words)}.",
        json_schema_extra={"enum": list(words)},
        **kw,
    )


class MoneyBody(_Body):
    amount: str = Field(description="A decimal as text, e.g. `1234.50`; never negative.")
    currency: str = Field(description="ISO 4217 code, e.g. `EUR`.")


class LeadCreate(_Body):
    given_name: str = ""
    family_name: str
    company_name: str = ""
    email: str = Field("", description="An email or a phone number is required.")
    phone: str = ""
    source: str = _one_of(LEAD_SOURCES, "Where the lead came from.")
    campaign: str = ""
    owner: str


class Qualification(_Body):
    score: int = Field(description="0..100.")


class Reason(_Body):
    reason: str


class Conversion(_Body):
    pipeline_id: str
    amount: MoneyBody
    expected_close_date: str = Field(description="`YYYY-MM-DD`, not before today.")
    opportunity_name: str = ""
    person_id: str = Field(
        "",
        description="An existing person. Empty: the one person who has the lead's email "
        "(its phone without email), else a new one; several such persons are refused (409).",
    )
    company_id: str = Field("", description="An existing company.")
    create_company: bool = Field(False, description="Register the lead's company.")
    owner: str = ""


class StageBody(_Body):
    stage_id: str
    name: str
    probability: str = Field(description="Percent as a decimal in text, e.g. `40`.")
    category: str = _one_of(FORECAST_CATEGORIES, "Forecast category.")


class PipelineCreate(_Body):
    name: str
    stages: list[StageBody]


class StageAdd(_Body):
    stage: StageBody
    position: int | None = Field(None, description="Index among the active stages.")


class StageRename(_Body):
    name: str


class StageSettings(_Body):
    probability: str
    category: str = _one_of(FORECAST_CATEGORIES, "Forecast category.")


class StageOrder(_Body):
    stage_ids: list[str]


class OpportunityCreate(_Body):
    pipeline_id: str
    stage_id: str = Field("", description="Empty: the pipeline's first open stage.")
    name: str
    customer_id: str
    person_id: str = ""
    company_id: str = ""
    owner: str
    amount: MoneyBody
    expected_close_date: str
    kind: str = _one_of(
        OPPORTUNITY_KINDS, "New business or a deal on won ones.", default="new_business"
    )
    related_opportunity_ids: list[str] = Field(default_factory=list)


class LineItemBody(_Body):
    product_id: str
    product_name: str = ""
    quantity: str
    unit_price: str
    discount_percent: str = "0"


class LineItems(_Body):
    line_items: list[LineItemBody]


class CloseDate(_Body):
    expected_close_date: str


class Owner(_Body):
    owner: str


class StageMove(_Body):
    stage_id: str


class Win(_Body):
    closed_on: str | None = Field(None, description="Default: today.")


class Loss(_Body):
    reason: str
    closed_on: str | None = None


class Reopen(_Body):
    stage_id: str = Field("", description="Empty: the stage the deal was closed from.")


class ActivityCreate(_Body):
    subject_kind: str = _one_of(SUBJECT_KINDS, "What the activity is about.")
    subject_id: str
    kind: str = _one_of(ACTIVITY_KINDS, "The kind of activity.")
    title: str
    owner: str
    due_at: datetime


class Due(_Body):
    due_at: datetime


class Outcome(_Body):
    outcome: str = ""


class Cancellation(_Body):
    reason: str = ""
