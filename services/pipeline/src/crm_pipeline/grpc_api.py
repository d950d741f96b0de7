"""gRPC adapter: crm.pipeline.v1.PipelineService over the application layer.

Translation only: requests become the application's inputs (enums as the
domain's lower-case words, None when unspecified; money and dates as the
text the client sent, validated by the domain), results become protobuf
messages. Errors are raised as `CrmError`s; the shared server turns them into
statuses with details (see `crm_common.server`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeAlias, TypeVar

import grpc

from crm.pipeline.v1 import pipeline_pb2 as pb
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_common.commands import Caller, WriteOutcome
from crm_common.enums import enum_number, enum_word
from crm_common.errors import ValidationFailed
from crm_common.server import GrpcService, grpc_caller
from crm_common.timestamps import datetime_of
from crm_pipeline.application import PipelineService
from crm_pipeline.forecast import Funnel, WinRate
from crm_pipeline.inputs import (
    ActivityQuery,
    ForecastQuery,
    LeadConversion,
    LeadQuery,
    LineItemInput,
    NewActivity,
    NewLead,
    NewOpportunity,
    OpportunityQuery,
    StageInput,
    WinRateQuery,
)
from crm_pipeline.messages import (
    activity_pb,
    decimal_text,
    duration,
    lead_pb,
    money_pb,
    opportunity_pb,
    pipeline_pb,
)
from crm_pipeline.views import ActivityView, LeadView, OpportunityView, PipelineView, Written

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PipelineService"].full_name

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
V = TypeVar("V", LeadView, PipelineView, OpportunityView, ActivityView)


def subject(written: Written, kind: type[V]) -> V:
    """The written subject as the view the reply carries."""
    view = written.subject
    if not isinstance(view, kind):
        raise TypeError(f"{type(view).__name__} written where {kind.__name__} was expected")
    return view


def write_result(outcome: WriteOutcome) -> pb.WriteResult:
    return pb.WriteResult(
        id=outcome.id,
        version=outcome.version,
        position=outcome.position,
        replayed=outcome.replayed,
    )


def _stage(stage: pb.StageInput) -> StageInput:
    return StageInput(
        stage.stage_id,
        stage.name,
        stage.probability,
        enum_word(pb.ForecastCategory, stage.category),
    )


def _money(message: pb.Money, field: str) -> tuple[str, str]:
    if not message.amount:
        raise ValidationFailed.of(field, "is required")
    return message.amount, message.currency


def _due(request: Any) -> datetime | None:
    if not request.HasField("due_at"):
        return None
    due: datetime = datetime_of(request.due_at, "due_at")
    return due


def _time(request: Any, field: str) -> datetime | None:
    """An optional timestamp field of the request; None when unset."""
    if not request.HasField(field):
        return None
    value: datetime = datetime_of(getattr(request, field), field)
    return value


def funnel_pb(result: Funnel) -> pb.GetFunnelResponse:
    response = pb.GetFunnelResponse(pipeline_id=result.pipeline_id, deals=result.deals)
    for s in result.stages:
        stage = pb.FunnelStage(
            stage_id=s.stage_id,
            name=s.name,
            category=enum_number(pb.ForecastCategory, s.category),
            retired=s.retired,
            entered=s.entered,
            entries=s.entries,
            regressions=s.regressions,
            conversion=decimal_text(s.conversion),
            amounts=[money_pb(a, c) for c, a in s.amounts.items()],
            average_time_in_stage=duration(s.average_time_in_stage),
        )
        if s.advanced is not None:
            stage.advanced = s.advanced
        response.stages.append(stage)
    return response


def win_rate_pb(result: WinRate) -> pb.GetWinRateResponse:
    return pb.GetWinRateResponse(
        won=result.won,
        lost=result.lost,
        rate=decimal_text(result.rate),
        won_amounts=[money_pb(a, c) for c, a in result.won_amounts.items()],
        average_cycle=duration(result.average_cycle),
    )


class PipelineServicer(pipeline_pb2_grpc.PipelineServiceServicer):
    """Every rule lives in the domain and the application."""

    def __init__(self, service: PipelineService) -> None:
        self.service = service

    @staticmethod
    def _caller(context: Context, request: Any) -> Caller:
        return grpc_caller(context, request.request_id, getattr(request, "expected_version", 0))

    # -- leads

    async def CreateLead(self, request: pb.CreateLeadRequest, context: Context) -> Any:
        written = await self.service.create_lead(
            self._caller(context, request),
            NewLead(
                family_name=request.family_name,
                source=enum_word(pb.LeadSource, request.source),
                owner=request.owner,
                given_name=request.given_name,
                company_name=request.company_name,
                email=request.email,
                phone=request.phone,
                campaign=request.campaign,
            ),
        )
        return pb.CreateLeadResponse(
            result=write_result(written.outcome), lead=lead_pb(subject(written, LeadView))
        )

    async def QualifyLead(self, request: pb.QualifyLeadRequest, context: Context) -> Any:
        written = await self.service.qualify_lead(
            self._caller(context, request), request.lead_id, request.score
        )
        return pb.QualifyLeadResponse(
            result=write_result(written.outcome), lead=lead_pb(subject(written, LeadView))
        )

    async def DisqualifyLead(self, request: pb.DisqualifyLeadRequest, context: Context) -> Any:
        written = await self.service.disqualify_lead(
            self._caller(context, request), request.lead_id, request.reason
        )
        return pb.DisqualifyLeadResponse(
            result=write_result(written.outcome), lead=lead_pb(subject(written, LeadView))
        )

    async def ConvertLead(self, request: pb.ConvertLeadRequest, context: Context) -> Any:
        amount, currency = _money(request.amount, "amount.amount")
        written = await self.service.convert_lead(
            self._caller(context, request),
            LeadConversion(
                lead_id=request.lead_id,
                pipeline_id=request.pipeline_id,
                amount=amount,
                currency=currency,
                expected_close_date=request.expected_close_date,
                opportunity_name=request.opportunity_name,
                person_id=request.person_id,
                company_id=request.company_id,
                create_company=request.create_company,
                owner=request.owner,
            ),
        )
        deal = await self.service.get_opportunity(written.outcome.extra["opportunity_id"])
        return pb.ConvertLeadResponse(
            result=write_result(written.outcome),
            lead=lead_pb(subject(written, LeadView)),
            opportunity=opportunity_pb(deal),
            person_matched=written.outcome.extra.get("person_matched") == "true",
        )

    async def GetLead(self, request: pb.GetLeadRequest, context: Context) -> Any:
        lead = await self.service.get_lead(request.id, grpc_caller(context))
        return pb.GetLeadResponse(lead=lead_pb(lead))

    async def ListLeads(self, request: pb.ListLeadsRequest, context: Context) -> Any:
        page = await self.service.list_leads(
            LeadQuery(
                status=enum_word(pb.LeadStatus, request.status),
                owner=request.owner,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
            grpc_caller(context),
        )
        return pb.ListLeadsResponse(
            leads=[lead_pb(lead) for lead in page.leads],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    # -- pipelines

    def _pipeline_reply(self, response: Any, written: Written) -> Any:
        return response(
            result=write_result(written.outcome),
            pipeline=pipeline_pb(subject(written, PipelineView)),
        )

    async def DefinePipeline(self, request: pb.DefinePipelineRequest, context: Context) -> Any:
        written = await self.service.define_pipeline(
            self._caller(context, request),
            request.name,
            [_stage(s) for s in request.stages],
        )
        return self._pipeline_reply(pb.DefinePipelineResponse, written)

    async def AddStage(self, request: pb.AddStageRequest, context: Context) -> Any:
        written = await self.service.add_stage(
            self._caller(context, request),
            request.pipeline_id,
            _stage(request.stage),
            request.position if request.HasField("position") else None,
        )
        return self._pipeline_reply(pb.AddStageResponse, written)

    async def RenameStage(self, request: pb.RenameStageRequest, context: Context) -> Any:
        written = await self.service.rename_stage(
            self._caller(context, request),
            request.pipeline_id,
            request.stage_id,
            request.name,
        )
        return self._pipeline_reply(pb.RenameStageResponse, written)

    async def ChangeStageSettings(
        self, request: pb.ChangeStageSettingsRequest, context: Context
    ) -> Any:
        written = await self.service.change_stage_settings(
            self._caller(context, request),
            request.pipeline_id,
            request.stage_id,
            request.probability,
            enum_word(pb.ForecastCategory, request.category),
        )
        return self._pipeline_reply(pb.ChangeStageSettingsResponse, written)

    async def ReorderStages(self, request: pb.ReorderStagesRequest, context: Context) -> Any:
        written = await self.service.reorder_stages(
            self._caller(context, request),
            request.pipeline_id,
            list(request.stage_ids),
        )
        return self._pipeline_reply(pb.ReorderStagesResponse, written)

    async def RetireStage(self, request: pb.RetireStageRequest, context: Context) -> Any:
        written = await self.service.retire_stage(
            self._caller(context, request), request.pipeline_id, request.stage_id
        )
        return self._pipeline_reply(pb.RetireStageResponse, written)

    async def GetPipeline(self, request: pb.GetPipelineRequest, context: Context) -> Any:
        pipeline = await self.service.get_pipeline(request.id)
        return pb.GetPipelineResponse(pipeline=pipeline_pb(pipeline))

    async def ListPipelines(self, request: pb.ListPipelinesRequest, context: Context) -> Any:
        pipelines = await self.service.list_pipelines()
        return pb.ListPipelinesResponse(pipelines=[pipeline_pb(p) for p in pipelines])

    # -- opportunities

    def _deal_reply(self, response: Any, written: Written) -> Any:
        return response(
            result=write_result(written.outcome),
            opportunity=opportunity_pb(subject(written, OpportunityView)),
        )

    async def OpenOpportunity(self, request: pb.OpenOpportunityRequest, context: Context) -> Any:
        amount, currency = _money(request.amount, "amount.amount")
        written = await self.service.open_opportunity(
            self._caller(context, request),
            NewOpportunity(
                pipeline_id=request.pipeline_id,
                name=request.name,
                customer_id=request.customer_id,
                owner=request.owner,
                amount=amount,
                currency=currency,
                expected_close_date=request.expected_close_date,
                stage_id=request.stage_id,
                person_id=request.person_id,
                company_id=request.company_id,
                kind=enum_word(pb.OpportunityKind, request.kind),
                related_opportunity_ids=list(request.related_opportunity_ids),
            ),
        )
        return self._deal_reply(pb.OpenOpportunityResponse, written)

    async def ChangeAmount(self, request: pb.ChangeAmountRequest, context: Context) -> Any:
        amount, currency = _money(request.amount, "amount.amount")
        written = await self.service.change_amount(
            self._caller(context, request), request.opportunity_id, amount, currency
        )
        return self._deal_reply(pb.ChangeAmountResponse, written)

    async def SetLineItems(self, request: pb.SetLineItemsRequest, context: Context) -> Any:
        items = [
            LineItemInput(
                line.product_id,
                line.product_name,
                line.quantity,
                line.unit_price,
                line.discount_percent or "0",
            )
            for line in request.line_items
        ]
        written = await self.service.set_line_items(
            self._caller(context, request), request.opportunity_id, items
        )
        return self._deal_reply(pb.SetLineItemsResponse, written)

    async def ChangeExpectedCloseDate(
        self, request: pb.ChangeExpectedCloseDateRequest, context: Context
    ) -> Any:
        written = await self.service.change_expected_close_date(
            self._caller(context, request),
            request.opportunity_id,
            request.expected_close_date,
        )
        return self._deal_reply(pb.ChangeExpectedCloseDateResponse, written)

    async def ReassignOpportunity(
        self, request: pb.ReassignOpportunityRequest, context: Context
    ) -> Any:
        written = await self.service.reassign_opportunity(
            self._caller(context, request),
            request.opportunity_id,
            request.owner,
        )
        return self._deal_reply(pb.ReassignOpportunityResponse, written)

    async def MoveOpportunity(self, request: pb.MoveOpportunityRequest, context: Context) -> Any:
        written = await self.service.move_opportunity(
            self._caller(context, request),
            request.opportunity_id,
            request.stage_id,
        )
        return self._deal_reply(pb.MoveOpportunityResponse, written)

    async def WinOpportunity(self, request: pb.WinOpportunityRequest, context: Context) -> Any:
        written = await self.service.win_opportunity(
            self._caller(context, request),
            request.opportunity_id,
            request.closed_on or None,
        )
        return self._deal_reply(pb.WinOpportunityResponse, written)

    async def LoseOpportunity(self, request: pb.LoseOpportunityRequest, context: Context) -> Any:
        written = await self.service.lose_opportunity(
            self._caller(context, request),
            request.opportunity_id,
            request.reason,
            request.closed_on or None,
        )
        return self._deal_reply(pb.LoseOpportunityResponse, written)

    async def ReopenOpportunity(
        self, request: pb.ReopenOpportunityRequest, context: Context
    ) -> Any:
        written = await self.service.reopen_opportunity(
            self._caller(context, request),
            request.opportunity_id,
            request.stage_id,
        )
        return self._deal_reply(pb.ReopenOpportunityResponse, written)

    async def GetOpportunity(self, request: pb.GetOpportunityRequest, context: Context) -> Any:
        deal = await self.service.get_opportunity(request.id)
        return pb.GetOpportunityResponse(opportunity=opportunity_pb(deal))

    async def ListOpportunities(
        self, request: pb.ListOpportunitiesRequest, context: Context
    ) -> Any:
        page = await self.service.list_opportunities(
            OpportunityQuery(
                pipeline_id=request.pipeline_id,
                owner=request.owner,
                customer_id=request.customer_id,
                status=enum_word(pb.OpportunityStatus, request.status),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListOpportunitiesResponse(
            opportunities=[opportunity_pb(d) for d in page.opportunities],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    # -- activities

    def _activity_reply(self, response: Any, written: Written) -> Any:
        return response(
            result=write_result(written.outcome),
            activity=activity_pb(subject(written, ActivityView)),
        )

    async def ScheduleActivity(self, request: pb.ScheduleActivityRequest, context: Context) -> Any:
        written = await self.service.schedule_activity(
            self._caller(context, request),
            NewActivity(
                subject_kind=enum_word(pb.SubjectKind, request.subject_kind),
                subject_id=request.subject_id,
                kind=enum_word(pb.ActivityKind, request.kind),
                title=request.title,
                owner=request.owner,
                due_at=_due(request),
            ),
        )
        return self._activity_reply(pb.ScheduleActivityResponse, written)

    async def RescheduleActivity(
        self, request: pb.RescheduleActivityRequest, context: Context
    ) -> Any:
        written = await self.service.reschedule_activity(
            self._caller(context, request), request.activity_id, _due(request)
        )
        return self._activity_reply(pb.RescheduleActivityResponse, written)

    async def CompleteActivity(self, request: pb.CompleteActivityRequest, context: Context) -> Any:
        written = await self.service.complete_activity(
            self._caller(context, request), request.activity_id, request.outcome
        )
        return self._activity_reply(pb.CompleteActivityResponse, written)

    async def CancelActivity(self, request: pb.CancelActivityRequest, context: Context) -> Any:
        written = await self.service.cancel_activity(
            self._caller(context, request), request.activity_id, request.reason
        )
        return self._activity_reply(pb.CancelActivityResponse, written)

    async def GetActivity(self, request: pb.GetActivityRequest, context: Context) -> Any:
        activity = await self.service.get_activity(request.id)
        return pb.GetActivityResponse(activity=activity_pb(activity))

    async def ListActivities(self, request: pb.ListActivitiesRequest, context: Context) -> Any:
        page = await self.service.list_activities(
            ActivityQuery(
                due_from=_time(request, "due_from"),
                due_before=_time(request, "due_before"),
                owner=request.owner,
                status=enum_word(pb.ActivityStatus, request.status),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListActivitiesResponse(
            activities=[activity_pb(a) for a in page.activities],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def ListOverdueFollowUps(
        self, request: pb.ListOverdueFollowUpsRequest, context: Context
    ) -> Any:
        overdue = await self.service.overdue_follow_ups(request.owner)
        response = pb.ListOverdueFollowUpsResponse()
        for owner, items in overdue.items():
            activities = [await self.service.get_activity(a.activity_id) for a in items]
            response.owners.append(
                pb.OwnerFollowUps(owner=owner, activities=[activity_pb(a) for a in activities])
            )
        return response

    # -- forecast, funnel, win rate

    async def GetForecast(self, request: pb.GetForecastRequest, context: Context) -> Any:
        rows = await self.service.get_forecast(
            ForecastQuery(
                period=enum_word(pb.ForecastPeriod, request.period),
                start=request.start or None,
                end=request.end or None,
                owner=request.owner,
                pipeline_id=request.pipeline_id,
            )
        )
        return pb.GetForecastResponse(
            rows=[
                pb.ForecastRow(
                    period=r.period,
                    owner=r.owner,
                    category=enum_number(pb.ForecastCategory, r.category),
                    deals=r.deals,
                    amount=money_pb(r.amount, r.currency),
                    weighted_amount=money_pb(r.weighted_amount, r.currency),
                )
                for r in rows
            ]
        )

    async def GetFunnel(self, request: pb.GetFunnelRequest, context: Context) -> Any:
        return funnel_pb(await self.service.get_funnel(request.pipeline_id))

    async def GetWinRate(self, request: pb.GetWinRateRequest, context: Context) -> Any:
        result = await self.service.get_win_rate(
            WinRateQuery(
                pipeline_id=request.pipeline_id,
                owner=request.owner,
                start=request.start or None,
                end=request.end or None,
            )
        )
        return win_rate_pb(result)


def grpc_service(service: PipelineService) -> GrpcService:
    """The servicer as `crm_common.server.serve()` registers it."""
    return GrpcService(
        PipelineServicer(service),
        pipeline_pb2_grpc.add_PipelineServiceServicer_to_server,
        SERVICE_NAME,
    )
