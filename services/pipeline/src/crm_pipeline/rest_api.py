"""REST adapter for the frontends: the pipeline API as JSON.

Enums are the domain's lower-case words (`"best_case"`, `"cross_sell"`),
money is `{"amount": "1234.50", "currency": "EUR"}` (the amount as text,
never a number), calendar dates `YYYY-MM-DD`, times ISO-8601. Every write
answers `{id, version, position, replayed, <subject>}`; `Idempotency-Key`
makes a write safe to retry (a retry answers the first outcome, 200 instead
of 201, and writes nothing); `If-Match` carries the version of the command's
subject the client last saw (409 when it is stale).

Errors are raised as `CrmError`s; `crm_common.server.install_error_handlers`
(installed by `serve()`) turns them into 422 / 404 / 409.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from crm_common.server import (
    IdempotencyKey,
    IfMatch,
    expected_version,
    http_command_context,
)
from crm_pipeline.application import (
    LeadConversion,
    NewActivity,
    NewLead,
    NewOpportunity,
    OpportunityQuery,
    PipelineService,
    Written,
)
from crm_pipeline.domain import (
    ACTIVITY_KINDS,
    FORECAST_CATEGORIES,
    LEAD_SOURCES,
    OPPORTUNITY_KINDS,
    SUBJECT_KINDS,
    Activity,
    Lead,
    LineItemSpec,
    Opportunity,
    Pipeline,
    StageSpec,
)
from crm_pipeline.forecast import ActivityInfo, Funnel, WinRate

Json = dict[str, Any]

# -- JSON of the domain -------------------------------------------------------------------


def _text(number: Decimal | None) -> str | None:
    return None if number is None else f"{number:f}"


def _day(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(span: timedelta | None) -> float | None:
    return None if span is None else span.total_seconds()


def money_json(amount: Decimal, currency: str) -> Json:
    return {"amount": _text(amount), "currency": currency}


def lead_json(lead: Lead) -> Json:
    return {
        "id": str(lead.id),
        "version": lead.version,
        "given_name": lead.given_name,
        "family_name": lead.family_name,
        "company_name": lead.company_name,
        "email": lead.email,
        "phone": lead.phone,
        "source": lead.source,
        "campaign": lead.campaign,
        "owner": lead.owner,
        "status": lead.status,
        "score": lead.score,
        "disqualify_reason": lead.disqualify_reason,
        "person_id": lead.person_id,
        "company_id": lead.company_id,
        "opportunity_id": lead.opportunity_id,
        "created_at": _time(lead.created_at),
        "converted_at": _time(lead.converted_at),
    }


def pipeline_json(pipeline: Pipeline) -> Json:
    ordered = [pipeline.stages[s] for s in pipeline.order]
    ordered += [s for s in pipeline.stages.values() if s.retired]
    return {
        "id": str(pipeline.id),
        "version": pipeline.version,
        "name": pipeline.name,
        "stages": [
            {
                "stage_id": s.stage_id,
                "name": s.name,
                "probability": _text(s.probability.normalize()),
                "category": s.category,
                "retired": s.retired,
            }
            for s in ordered
        ],
    }


def opportunity_json(deal: Opportunity) -> Json:
    return {
        "id": str(deal.id),
        "version": deal.version,
        "pipeline_id": deal.pipeline_id,
        "stage_id": deal.stage_id,
        "name": deal.name,
        "customer_id": deal.customer_id,
        "person_id": deal.person_id,
        "company_id": deal.company_id,
        "owner": deal.owner,
        "amount": money_json(deal.amount.amount, deal.amount.currency),
        "expected_close_date": _day(deal.expected_close_date),
        "kind": deal.kind,
        "related_opportunity_ids": list(deal.related_deal_ids),
        "lead_id": deal.lead_id,
        "line_items": [
            {
                "product_id": line.product_id,
                "product_name": line.product_name,
                "quantity": _text(line.quantity),
                "unit_price": _text(line.unit_price),
                "discount_percent": _text(line.discount_percent),
                "total": _text(line.total),
            }
            for line in deal.line_items
        ],
        "status": deal.status,
        "lost_reason": deal.lost_reason,
        "closed_on": _day(deal.closed_on),
        "closed_at": _time(deal.closed_at),
        "opened_at": _time(deal.opened_at),
        "reopen_count": deal.reopen_count,
        "history": [
            {
                "stage_id": v.stage_id,
                "entered_at": _time(v.entered_at),
                "left_at": _time(v.left_at),
                "regression": v.regression,
            }
            for v in deal.history
        ],
    }


def activity_json(activity: Activity | ActivityInfo) -> Json:
    if isinstance(activity, ActivityInfo):
        return {
            "id": activity.activity_id,
            "subject_kind": activity.subject_kind,
            "subject_id": activity.subject_id,
            "kind": activity.kind,
            "title": activity.title,
            "owner": activity.owner,
            "due_at": _time(activity.due_at),
            "status": activity.status,
        }
    return {
        "id": str(activity.id),
        "version": activity.version,
        "subject_kind": activity.subject_kind,
        "subject_id": activity.subject_id,
        "customer_id": activity.customer_id,
        "kind": activity.kind,
        "title": activity.title,
        "owner": activity.owner,
        "due_at": _time(activity.due_at),
        "status": activity.status,
        "outcome": activity.outcome,
        "scheduled_at": _time(activity.scheduled_at),
        "finished_at": _time(activity.finished_at),
    }


RENDER: dict[type[Any], tuple[str, Callable[[Any], Json]]] = {
    Lead: ("lead", lead_json),
    Pipeline: ("pipeline", pipeline_json),
    Opportunity: ("opportunity", opportunity_json),
    Activity: ("activity", activity_json),
}


def write_json(written: Written, response: Response | None = None) -> Json:
    outcome = written.outcome
    if response is not None:
        response.status_code = 200 if outcome.replayed else 201
    name, render = RENDER[type(written.subject)]
    return {
        "id": outcome.id,
        "version": outcome.version,
        "position": outcome.position,
        "replayed": outcome.replayed,
        **{k: v for k, v in outcome.extra.items()},
        name: render(written.subject),
    }


def funnel_json(result: Funnel) -> Json:
    return {
        "pipeline_id": result.pipeline_id,
        "deals": result.deals,
        "stages": [
            {
                "stage_id": s.stage_id,
                "name": s.name,
                "category": s.category,
                "retired": s.retired,
                "entered": s.entered,
                "entries": s.entries,
                "regressions": s.regressions,
                "advanced": s.advanced,
                "conversion": _text(s.conversion),
                "amounts": [money_json(a, c) for c, a in s.amounts.items()],
                "average_seconds_in_stage": _seconds(s.average_time_in_stage),
            }
            for s in result.stages
        ],
    }


def win_rate_json(result: WinRate) -> Json:
    return {
        "won": result.won,
        "lost": result.lost,
        "rate": _text(result.rate),
        "won_amounts": [money_json(a, c) for c, a in result.won_amounts.items()],
        "average_cycle_seconds": _seconds(result.average_cycle),
    }


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
    person_id: str = Field("", description="An existing person; empty: register one.")
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


DESCRIPTION = """Leads, pipelines with ordered stages, opportunities (deals) with line items
and stage history, activities, and the forecast, funnel and win rate.

Every write answers `{id, version, position, replayed, <subject>}`. Send
`Idempotency-Key` to make a write safe to retry and `If-Match` with the version
you last saw to refuse lost updates (409). `x-crm-actor` and `x-crm-client` name
who writes, through which client.

Errors: 422 `{"detail": [{"field", "message"}]}` for invalid input, 404 for
something unknown, 409 for a stale version or a change the rules refuse
(closing a closed deal, changing a closed deal without reopening it).
"""


def create_app(service: PipelineService) -> FastAPI:
    app = FastAPI(title="CRM pipeline", version="1", description=DESCRIPTION)

    def ctx(request: Request, command: str, key: str | None, if_match: str | None = None) -> Any:
        return http_command_context(request, command, key, expected_version(if_match))

    # -- leads

    @app.post("/leads", status_code=201, tags=["leads"], summary="Create a lead")
    async def create_lead(
        request: Request,
        response: Response,
        body: LeadCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.create_lead(
            ctx(request, "CreateLead", idempotency_key), NewLead(**body.model_dump())
        )
        return write_json(written, response)

    @app.get("/leads/{lead_id}", tags=["leads"], summary="A lead")
    async def get_lead(lead_id: str) -> Json:
        return lead_json(await service.get_lead(lead_id))

    @app.post("/leads/{lead_id}/qualify", tags=["leads"], summary="Qualify a lead with a score")
    async def qualify_lead(
        request: Request,
        lead_id: str,
        body: Qualification,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.qualify_lead(
            ctx(request, "QualifyLead", idempotency_key, if_match), lead_id, body.score
        )
        return write_json(written)

    @app.post("/leads/{lead_id}/disqualify", tags=["leads"], summary="Disqualify a lead")
    async def disqualify_lead(
        request: Request,
        lead_id: str,
        body: Reason,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.disqualify_lead(
            ctx(request, "DisqualifyLead", idempotency_key, if_match), lead_id, body.reason
        )
        return write_json(written)

    @app.post(
        "/leads/{lead_id}/convert",
        status_code=201,
        tags=["leads"],
        summary="Convert a qualified lead into an opportunity",
    )
    async def convert_lead(
        request: Request,
        response: Response,
        lead_id: str,
        body: Conversion,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.convert_lead(
            ctx(request, "ConvertLead", idempotency_key, if_match),
            LeadConversion(
                lead_id=lead_id,
                pipeline_id=body.pipeline_id,
                amount=body.amount.amount,
                currency=body.amount.currency,
                expected_close_date=body.expected_close_date,
                opportunity_name=body.opportunity_name,
                person_id=body.person_id,
                company_id=body.company_id,
                create_company=body.create_company,
                owner=body.owner,
            ),
        )
        return write_json(written, response)

    # -- pipelines

    @app.post("/pipelines", status_code=201, tags=["pipelines"], summary="Define a pipeline")
    async def define_pipeline(
        request: Request,
        response: Response,
        body: PipelineCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.define_pipeline(
            ctx(request, "DefinePipeline", idempotency_key),
            body.name,
            [StageSpec(**s.model_dump()) for s in body.stages],
        )
        return write_json(written, response)

    @app.get("/pipelines", tags=["pipelines"], summary="Every pipeline")
    async def list_pipelines() -> Json:
        return {"pipelines": [pipeline_json(p) for p in await service.list_pipelines()]}

    @app.get("/pipelines/{pipeline_id}", tags=["pipelines"], summary="A pipeline")
    async def get_pipeline(pipeline_id: str) -> Json:
        return pipeline_json(await service.get_pipeline(pipeline_id))

    @app.post("/pipelines/{pipeline_id}/stages", tags=["pipelines"], summary="Add a stage")
    async def add_stage(
        request: Request,
        pipeline_id: str,
        body: StageAdd,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.add_stage(
            ctx(request, "AddStage", idempotency_key, if_match),
            pipeline_id,
            StageSpec(**body.stage.model_dump()),
            body.position,
        )
        return write_json(written)

    @app.post(
        "/pipelines/{pipeline_id}/stages/{stage_id}/rename",
        tags=["pipelines"],
        summary="Rename a stage (its id stays)",
    )
    async def rename_stage(
        request: Request,
        pipeline_id: str,
        stage_id: str,
        body: StageRename,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.rename_stage(
            ctx(request, "RenameStage", idempotency_key, if_match), pipeline_id, stage_id, body.name
        )
        return write_json(written)

    @app.post(
        "/pipelines/{pipeline_id}/stages/{stage_id}/settings",
        tags=["pipelines"],
        summary="Change a stage's probability and forecast category",
    )
    async def change_stage_settings(
        request: Request,
        pipeline_id: str,
        stage_id: str,
        body: StageSettings,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.change_stage_settings(
            ctx(request, "ChangeStageSettings", idempotency_key, if_match),
            pipeline_id,
            stage_id,
            body.probability,
            body.category,
        )
        return write_json(written)

    @app.post(
        "/pipelines/{pipeline_id}/stage-order", tags=["pipelines"], summary="Reorder the stages"
    )
    async def reorder_stages(
        request: Request,
        pipeline_id: str,
        body: StageOrder,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.reorder_stages(
            ctx(request, "ReorderStages", idempotency_key, if_match), pipeline_id, body.stage_ids
        )
        return write_json(written)

    @app.post(
        "/pipelines/{pipeline_id}/stages/{stage_id}/retire",
        tags=["pipelines"],
        summary="Retire a stage (it leaves the order; deals and history keep its id)",
    )
    async def retire_stage(
        request: Request,
        pipeline_id: str,
        stage_id: str,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.retire_stage(
            ctx(request, "RetireStage", idempotency_key, if_match), pipeline_id, stage_id
        )
        return write_json(written)

    @app.get("/pipelines/{pipeline_id}/funnel", tags=["reports"], summary="Conversion funnel")
    async def get_funnel(pipeline_id: str) -> Json:
        return funnel_json(await service.get_funnel(pipeline_id))

    # -- opportunities

    @app.post("/opportunities", status_code=201, tags=["opportunities"], summary="Open a deal")
    async def open_opportunity(
        request: Request,
        response: Response,
        body: OpportunityCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        fields = body.model_dump(exclude={"amount"})
        written = await service.open_opportunity(
            ctx(request, "OpenOpportunity", idempotency_key),
            NewOpportunity(amount=body.amount.amount, currency=body.amount.currency, **fields),
        )
        return write_json(written, response)

    @app.get("/opportunities", tags=["opportunities"], summary="Deals, filtered and paged")
    async def list_opportunities(
        pipeline_id: str = "",
        owner: str = "",
        customer_id: str = "",
        status: str = "",
        page_size: Annotated[int, Query(description="1..200, default 50")] = 0,
        page_token: str = "",
    ) -> Json:
        page = await service.list_opportunities(
            OpportunityQuery(pipeline_id, owner, customer_id, status, page_size, page_token)
        )
        return {
            "opportunities": [opportunity_json(d) for d in page.opportunities],
            "next_page_token": page.next_page_token,
            "total_size": page.total_size,
        }

    @app.get("/opportunities/{opportunity_id}", tags=["opportunities"], summary="A deal")
    async def get_opportunity(opportunity_id: str) -> Json:
        return opportunity_json(await service.get_opportunity(opportunity_id))

    async def deal_write(
        request: Request,
        command: str,
        key: str | None,
        if_match: str | None,
        run: Any,
    ) -> Json:
        written = await run(ctx(request, command, key, if_match))
        return write_json(written)

    @app.post("/opportunities/{opportunity_id}/amount", tags=["opportunities"])
    async def change_amount(
        request: Request,
        opportunity_id: str,
        body: MoneyBody,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "ChangeAmount",
            idempotency_key,
            if_match,
            lambda c: service.change_amount(c, opportunity_id, body.amount, body.currency),
        )

    @app.put("/opportunities/{opportunity_id}/line-items", tags=["opportunities"])
    async def set_line_items(
        request: Request,
        opportunity_id: str,
        body: LineItems,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        items = [LineItemSpec(**line.model_dump()) for line in body.line_items]
        return await deal_write(
            request,
            "SetLineItems",
            idempotency_key,
            if_match,
            lambda c: service.set_line_items(c, opportunity_id, items),
        )

    @app.post("/opportunities/{opportunity_id}/expected-close-date", tags=["opportunities"])
    async def change_expected_close_date(
        request: Request,
        opportunity_id: str,
        body: CloseDate,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "ChangeExpectedCloseDate",
            idempotency_key,
            if_match,
            lambda c: service.change_expected_close_date(
                c, opportunity_id, body.expected_close_date
            ),
        )

    @app.post("/opportunities/{opportunity_id}/owner", tags=["opportunities"])
    async def reassign_opportunity(
        request: Request,
        opportunity_id: str,
        body: Owner,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "ReassignOpportunity",
            idempotency_key,
            if_match,
            lambda c: service.reassign_opportunity(c, opportunity_id, body.owner),
        )

    @app.post(
        "/opportunities/{opportunity_id}/stage",
        tags=["opportunities"],
        summary="Move a deal to another open stage, forward or back",
    )
    async def move_opportunity(
        request: Request,
        opportunity_id: str,
        body: StageMove,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "MoveOpportunity",
            idempotency_key,
            if_match,
            lambda c: service.move_opportunity(c, opportunity_id, body.stage_id),
        )

    @app.post("/opportunities/{opportunity_id}/win", tags=["opportunities"])
    async def win_opportunity(
        request: Request,
        opportunity_id: str,
        body: Win,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "WinOpportunity",
            idempotency_key,
            if_match,
            lambda c: service.win_opportunity(c, opportunity_id, body.closed_on),
        )

    @app.post("/opportunities/{opportunity_id}/lose", tags=["opportunities"])
    async def lose_opportunity(
        request: Request,
        opportunity_id: str,
        body: Loss,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "LoseOpportunity",
            idempotency_key,
            if_match,
            lambda c: service.lose_opportunity(c, opportunity_id, body.reason, body.closed_on),
        )

    @app.post("/opportunities/{opportunity_id}/reopen", tags=["opportunities"])
    async def reopen_opportunity(
        request: Request,
        opportunity_id: str,
        body: Reopen,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        return await deal_write(
            request,
            "ReopenOpportunity",
            idempotency_key,
            if_match,
            lambda c: service.reopen_opportunity(c, opportunity_id, body.stage_id),
        )

    # -- activities

    @app.post("/activities", status_code=201, tags=["activities"], summary="Schedule an activity")
    async def schedule_activity(
        request: Request,
        response: Response,
        body: ActivityCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.schedule_activity(
            ctx(request, "ScheduleActivity", idempotency_key), NewActivity(**body.model_dump())
        )
        return write_json(written, response)

    @app.get("/activities/{activity_id}", tags=["activities"], summary="An activity")
    async def get_activity(activity_id: str) -> Json:
        return activity_json(await service.get_activity(activity_id))

    @app.post("/activities/{activity_id}/reschedule", tags=["activities"])
    async def reschedule_activity(
        request: Request,
        activity_id: str,
        body: Due,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.reschedule_activity(
            ctx(request, "RescheduleActivity", idempotency_key, if_match), activity_id, body.due_at
        )
        return write_json(written)

    @app.post("/activities/{activity_id}/complete", tags=["activities"])
    async def complete_activity(
        request: Request,
        activity_id: str,
        body: Outcome,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.complete_activity(
            ctx(request, "CompleteActivity", idempotency_key, if_match), activity_id, body.outcome
        )
        return write_json(written)

    @app.post("/activities/{activity_id}/cancel", tags=["activities"])
    async def cancel_activity(
        request: Request,
        activity_id: str,
        body: Cancellation,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Json:
        written = await service.cancel_activity(
            ctx(request, "CancelActivity", idempotency_key, if_match), activity_id, body.reason
        )
        return write_json(written)

    @app.get(
        "/follow-ups/overdue",
        tags=["activities"],
        summary="Open activities past their due time, per owner, most overdue first",
    )
    async def overdue_follow_ups(owner: str = "") -> Json:
        overdue = await service.overdue_follow_ups(owner)
        return {
            "owners": [
                {"owner": o, "activities": [activity_json(a) for a in items]}
                for o, items in overdue.items()
            ]
        }

    # -- reports

    @app.get("/forecast", tags=["reports"], summary="Weighted and unweighted forecast")
    async def get_forecast(
        period: Annotated[str, Query(description="month or quarter")] = "month",
        start: Annotated[str, Query(description="YYYY-MM-DD, inclusive")] = "",
        end: Annotated[str, Query(description="YYYY-MM-DD, inclusive")] = "",
        owner: str = "",
        pipeline_id: str = "",
    ) -> Json:
        rows = await service.get_forecast(
            period=period, start=start, end=end, owner=owner, pipeline_id=pipeline_id
        )
        return {
            "rows": [
                {
                    "period": r.period,
                    "owner": r.owner,
                    "category": r.category,
                    "deals": r.deals,
                    "amount": money_json(r.amount, r.currency),
                    "weighted_amount": money_json(r.weighted_amount, r.currency),
                }
                for r in rows
            ]
        }

    @app.get("/win-rate", tags=["reports"], summary="Win rate and average cycle length")
    async def get_win_rate(
        pipeline_id: str = "", owner: str = "", start: str = "", end: str = ""
    ) -> Json:
        result = await service.get_win_rate(
            pipeline_id=pipeline_id, owner=owner, start=start, end=end
        )
        return win_rate_json(result)

    return app
