"""REST adapter for the frontends: the tickets API as JSON (OpenAPI at /docs).

Every write answers `{id, version, position, replayed, case|policy}`;
`Idempotency-Key` makes a write safe to retry (a retry answers the first
outcome and writes nothing); `If-Match` carries the version the client last
saw (409 when stale). Every route is behind the access gate: its
`operation_id` is the gRPC method doing the same, the name
`crm_common/auth/access.yaml` lists roles for.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from crm_common.auth.gate import AccessGate
from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller, service_app
from crm_tickets.application import TicketsService
from crm_tickets.inputs import (
    CalendarInput,
    NewCase,
    SlaTermsInput,
    SurveyInput,
    TargetInput,
    Triage,
    WeekdayInput,
)
from crm_tickets.views import CaseView, PolicyView, Written

DESCRIPTION = """Cases of contacts from every channel (email, phone, chat, web, social),
their status machine (new -> open -> pending / on_hold -> solved -> closed, reopen
within a window), public replies and internal notes, the SLA clocks in business
hours, satisfaction surveys, and the SLA policies the cases are measured by.

Every operation needs `Authorization: Bearer <token>`. Errors: 422 for invalid
input, 404 for an unknown case, policy or contact, 409 for a stale version or a
transition the status machine refuses (the message names the allowed ones).
"""

Channel = Literal["email", "phone", "chat", "web", "social"]
Priority = Literal["low", "normal", "high", "urgent"]
Status = Literal["new", "open", "pending", "on_hold", "solved", "closed"]
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown case, policy or contact"},
    409: {"description": "stale version, or a change the rules refuse"},
    422: {"description": "invalid input"},
}


class Model(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Clock(Model):
    kind: str
    state: str
    target_seconds: int
    used_seconds: float
    due_at: datetime | None
    cycle: int = Field(description="next_reply: the customer reply it answers (1, 2, ...)")


class Message(Model):
    at: datetime
    author: str
    author_kind: str
    body: str
    internal: bool


class HistoryEntry(Model):
    at: datetime
    what: str
    details: dict[str, str]


class Satisfaction(Model):
    csat: int
    ces: int | None
    nps: int | None
    comment: str


class CaseModel(Model):
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
    clocks: list[Clock]
    messages: list[Message]
    history: list[HistoryEntry]
    satisfaction: Satisfaction | None
    opened_at: datetime
    next_due_at: datetime | None


class PolicyModel(Model):
    id: str
    version: int
    name: str
    policy_version: int
    retired: bool
    terms: dict[str, Any]


class WriteModel(Model):
    id: str
    version: int
    position: int
    replayed: bool


class CaseWrite(WriteModel):
    case: CaseModel


class PolicyWrite(WriteModel):
    policy: PolicyModel


class CasePageModel(Model):
    cases: list[CaseModel]
    next_page_token: str


class TargetComplianceModel(Model):
    kind: str = Field(description="first_response, next_reply or resolution")
    met: int
    breached: int = Field(description="A target met late counts as breached")
    open: int = Field(description="Running or paused: not in the share")
    share_met: float = Field(description="met / (met + breached); 0 when none ended")


class ComplianceModel(Model):
    """Times are business seconds on each case's calendar, paused time left out (what
    the SLA clocks count); p90 by the nearest-rank method."""

    team: str
    period_start: datetime
    period_end: datetime
    cases: int
    targets: list[TargetComplianceModel]
    first_reply_count: int
    first_reply_mean_seconds: float
    first_reply_p90_seconds: float
    resolution_count: int
    resolution_mean_seconds: float
    resolution_p90_seconds: float


class SatisfactionPeriodModel(Model):
    start: datetime = Field(description="The UTC month or week cut to the period: from")
    end: datetime = Field(description="... to (exclusive)")
    responses: int
    csat_mean: float = Field(description="1-5; 0 when there are no responses")
    ces_responses: int
    ces_mean: float = Field(description="1-7; 0 when no response has a CES")
    nps_responses: int
    promoters: int = Field(description="NPS 9-10")
    passives: int = Field(description="NPS 7-8")
    detractors: int = Field(description="NPS 0-6")
    nps: float = Field(description="promoters% - detractors%, -100 to 100; 0 when none")


class SatisfactionTrendModel(Model):
    team: str = Field(description="Empty: every team")
    period_start: datetime
    period_end: datetime
    interval: str = Field(description="month or week")
    periods: list[SatisfactionPeriodModel] = Field(
        description="Every month or week of the period in order, those without responses too"
    )


class CaseCreate(BaseModel):
    customer_id: str = Field(description="The contact (person or company) the case is about")
    channel: Channel
    subject: str
    description: str = ""
    category: str = ""
    priority: Priority = "normal"
    team: str
    assignee: str = ""
    policy_id: str = Field("", description="The SLA policy; empty: the default terms")


class TriageBody(BaseModel):
    category: str = ""
    priority: Priority
    team: str


class AssignBody(BaseModel):
    assignee: str


class ReplyBody(BaseModel):
    author_kind: Literal["agent", "customer"] = "agent"
    body: str


class NoteBody(BaseModel):
    body: str


class StatusBody(BaseModel):
    status: Status


class SurveyBody(BaseModel):
    csat: int = Field(ge=1, le=5)
    ces: int | None = Field(None, ge=1, le=7)
    nps: int | None = Field(None, ge=0, le=10)
    comment: str = ""


class TargetBody(BaseModel):
    tier: str = "standard"
    priority: Priority
    first_response_seconds: int
    resolution_seconds: int
    next_reply_seconds: int = Field(
        0, description="From a customer reply to the next agent reply; 0: no target"
    )


class WeekdayBody(BaseModel):
    day: str
    opens: str
    closes: str


class CalendarBody(BaseModel):
    timezone: str = "UTC"
    hours: list[WeekdayBody]
    holidays: list[str] = []


class TermsBody(BaseModel):
    targets: list[TargetBody]
    calendar: CalendarBody
    warning_seconds: int = 0
    pause_on_hold: bool = False
    escalate_priority: bool = False
    escalate_team: str = ""

    def as_input(self) -> SlaTermsInput:
        return SlaTermsInput(
            targets=[TargetInput(**t.model_dump()) for t in self.targets],
            calendar=CalendarInput(
                self.calendar.timezone,
                [WeekdayInput(**h.model_dump()) for h in self.calendar.hours],
                list(self.calendar.holidays),
            ),
            warning_seconds=self.warning_seconds,
            pause_on_hold=self.pause_on_hold,
            escalate_priority=self.escalate_priority,
            escalate_team=self.escalate_team,
        )


class PolicyCreate(BaseModel):
    name: str
    terms: TermsBody


def _service(request: Request) -> TicketsService:
    service: TicketsService = request.app.state.service
    return service


Service = Annotated[TicketsService, Depends(_service)]


def case_write(written: Written, response: Response, created: bool = False) -> CaseWrite:
    assert isinstance(written.subject, CaseView)
    o = written.outcome
    if created and o.replayed:
        response.status_code = 200
    return CaseWrite(
        id=o.id,
        version=o.version,
        position=o.position,
        replayed=o.replayed,
        case=CaseModel.model_validate(written.subject),
    )


def policy_write(written: Written, response: Response, created: bool = False) -> PolicyWrite:
    assert isinstance(written.subject, PolicyView)
    o = written.outcome
    if created and o.replayed:
        response.status_code = 200
    return PolicyWrite(
        id=o.id,
        version=o.version,
        position=o.position,
        replayed=o.replayed,
        policy=PolicyModel.model_validate(written.subject),
    )


cases = APIRouter(prefix="/cases", tags=["cases"])
policies = APIRouter(prefix="/sla-policies", tags=["sla policies"])


@cases.post(
    "", status_code=201, response_model=CaseWrite, responses=ERRORS, operation_id="OpenCase"
)
async def open_case(
    request: Request,
    response: Response,
    body: CaseCreate,
    service: Service,
    idempotency_key: IdempotencyKey = None,
) -> CaseWrite:
    written = await service.open_case(
        http_caller(request, idempotency_key), NewCase(**body.model_dump())
    )
    return case_write(written, response, created=True)


@cases.get("/{case_id}", response_model=CaseModel, responses=ERRORS, operation_id="GetCase")
async def get_case(case_id: str, service: Service) -> CaseModel:
    return CaseModel.model_validate(await service.get_case(case_id))


@cases.post(
    "/{case_id}/triage", response_model=CaseWrite, responses=ERRORS, operation_id="TriageCase"
)
async def triage_case(
    request: Request,
    response: Response,
    case_id: str,
    body: TriageBody,
    service: Service,
    if_match: IfMatch = None,
) -> CaseWrite:
    caller = http_caller(request, None, expected_version(if_match))
    written = await service.triage_case(
        caller, case_id, Triage(body.category, body.priority, body.team)
    )
    return case_write(written, response)


@cases.post(
    "/{case_id}/assignee", response_model=CaseWrite, responses=ERRORS, operation_id="AssignCase"
)
async def assign_case(
    request: Request,
    response: Response,
    case_id: str,
    body: AssignBody,
    service: Service,
    if_match: IfMatch = None,
) -> CaseWrite:
    caller = http_caller(request, None, expected_version(if_match))
    return case_write(await service.assign_case(caller, case_id, body.assignee), response)


@cases.post(
    "/{case_id}/replies", response_model=CaseWrite, responses=ERRORS, operation_id="ReplyToCase"
)
async def reply_to_case(
    request: Request,
    response: Response,
    case_id: str,
    body: ReplyBody,
    service: Service,
    if_match: IfMatch = None,
) -> CaseWrite:
    caller = http_caller(request, None, expected_version(if_match))
    written = await service.reply_to_case(caller, case_id, body.author_kind, body.body)
    return case_write(written, response)


@cases.post(
    "/{case_id}/notes",
    response_model=CaseWrite,
    responses=ERRORS,
    operation_id="AddInternalNote",
)
async def add_internal_note(
    request: Request,
    response: Response,
    case_id: str,
    body: NoteBody,
    service: Service,
    if_match: IfMatch = None,
) -> CaseWrite:
    caller = http_caller(request, None, expected_version(if_match))
    return case_write(await service.add_internal_note(caller, case_id, body.body), response)


@cases.post(
    "/{case_id}/status",
    response_model=CaseWrite,
    responses=ERRORS,
    operation_id="ChangeCaseStatus",
)
async def change_case_status(
    request: Request,
    response: Response,
    case_id: str,
    body: StatusBody,
    service: Service,
    if_match: IfMatch = None,
) -> CaseWrite:
    caller = http_caller(request, None, expected_version(if_match))
    return case_write(await service.change_case_status(caller, case_id, body.status), response)


@cases.post(
    "/{case_id}/satisfaction",
    response_model=CaseWrite,
    responses=ERRORS,
    operation_id="RecordSatisfaction",
)
async def record_satisfaction(
    request: Request, response: Response, case_id: str, body: SurveyBody, service: Service
) -> CaseWrite:
    written = await service.record_satisfaction(
        http_caller(request), case_id, SurveyInput(**body.model_dump())
    )
    return case_write(written, response)


teams = APIRouter(prefix="/teams", tags=["cases"])


@teams.get(
    "/{team}/queue", response_model=CasePageModel, responses=ERRORS, operation_id="ListTeamQueue"
)
async def team_queue(
    team: str, service: Service, page_size: int = 0, page_token: str = ""
) -> CasePageModel:
    return CasePageModel.model_validate(await service.team_queue(team, page_size, page_token))


@teams.get(
    "/{team}/sla-compliance",
    response_model=ComplianceModel,
    responses=ERRORS,
    operation_id="GetSlaCompliance",
)
async def sla_compliance(
    team: str,
    service: Service,
    period_start: Annotated[
        datetime | None, Query(description="Cases opened from (inclusive)")
    ] = None,
    period_end: Annotated[datetime | None, Query(description="Cases opened before")] = None,
) -> ComplianceModel:
    return ComplianceModel.model_validate(
        await service.sla_compliance(team, period_start, period_end)
    )


satisfaction = APIRouter(prefix="/satisfaction", tags=["cases"])


@satisfaction.get(
    "",
    response_model=SatisfactionTrendModel,
    responses=ERRORS,
    operation_id="GetSatisfactionTrend",
)
async def satisfaction_trend(
    service: Service,
    team: Annotated[str, Query(description="One team's cases; empty: every team")] = "",
    period_start: Annotated[
        datetime | None, Query(description="Responses recorded from (inclusive)")
    ] = None,
    period_end: Annotated[datetime | None, Query(description="Responses recorded before")] = None,
    interval: Annotated[
        str, Query(description="month (default) or week; UTC, weeks from Monday")
    ] = "",
) -> SatisfactionTrendModel:
    return SatisfactionTrendModel.model_validate(
        await service.satisfaction_trend(team, period_start, period_end, interval)
    )


# Before `cases`, so that `/cases/at-risk` is not taken for a case id.
at_risk = APIRouter(prefix="/cases", tags=["cases"])


@at_risk.get(
    "/at-risk",
    response_model=CasePageModel,
    responses=ERRORS,
    operation_id="ListCasesAtRisk",
)
async def cases_at_risk(
    service: Service,
    within_minutes: int = 60,
    team: str = "",
    page_size: int = 0,
    page_token: str = "",
) -> CasePageModel:
    return CasePageModel.model_validate(
        await service.cases_at_risk(within_minutes, team, page_size, page_token)
    )


customers = APIRouter(prefix="/customers", tags=["cases"])


@customers.get(
    "/{customer_id}/cases",
    response_model=CasePageModel,
    responses=ERRORS,
    operation_id="ListCustomerCases",
)
async def customer_cases(
    customer_id: str, service: Service, page_size: int = 0, page_token: str = ""
) -> CasePageModel:
    return CasePageModel.model_validate(
        await service.customer_cases(customer_id, page_size, page_token)
    )


@policies.post(
    "",
    status_code=201,
    response_model=PolicyWrite,
    responses=ERRORS,
    operation_id="DefineSlaPolicy",
)
async def define_sla_policy(
    request: Request,
    response: Response,
    body: PolicyCreate,
    service: Service,
    idempotency_key: IdempotencyKey = None,
) -> PolicyWrite:
    written = await service.define_sla_policy(
        http_caller(request, idempotency_key), body.name, body.terms.as_input()
    )
    return policy_write(written, response, created=True)


@policies.get(
    "/{policy_id}", response_model=PolicyModel, responses=ERRORS, operation_id="GetSlaPolicy"
)
async def get_sla_policy(policy_id: str, service: Service) -> PolicyModel:
    return PolicyModel.model_validate(await service.get_sla_policy(policy_id))


@policies.put(
    "/{policy_id}/terms",
    response_model=PolicyWrite,
    responses=ERRORS,
    operation_id="ReviseSlaPolicy",
)
async def revise_sla_policy(
    request: Request,
    response: Response,
    policy_id: str,
    body: TermsBody,
    service: Service,
    if_match: IfMatch = None,
) -> PolicyWrite:
    caller = http_caller(request, None, expected_version(if_match))
    written = await service.revise_sla_policy(caller, policy_id, body.as_input())
    return policy_write(written, response)


@policies.post(
    "/{policy_id}/retire",
    response_model=PolicyWrite,
    responses=ERRORS,
    operation_id="RetireSlaPolicy",
)
async def retire_sla_policy(
    request: Request,
    response: Response,
    policy_id: str,
    service: Service,
    if_match: IfMatch = None,
) -> PolicyWrite:
    caller = http_caller(request, None, expected_version(if_match))
    return policy_write(await service.retire_sla_policy(caller, policy_id), response)


def create_app(service: TicketsService, gate: AccessGate) -> FastAPI:
    app = service_app(gate, title="CRM tickets", description=DESCRIPTION)
    app.state.service = service
    for router in (at_risk, cases, teams, customers, satisfaction, policies):
        app.include_router(router)
    return app
