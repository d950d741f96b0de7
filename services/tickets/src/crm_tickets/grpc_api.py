"""gRPC adapter: crm.tickets.v1.TicketsService over the application layer.

Translation only: requests become the application's inputs (enums as the
domain's lower-case words, None when unspecified), results become protobuf
messages; errors are `CrmError`s the shared server maps to statuses.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from crm.tickets.v1 import tickets_pb2 as pb
from crm.tickets.v1 import tickets_pb2_grpc
from crm_common.commands import WriteOutcome
from crm_common.enums import enum_word
from crm_common.server import GrpcService, grpc_caller
from crm_common.timestamps import datetime_of
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
from crm_tickets.messages import case_pb, compliance_pb, policy_pb, trend_pb
from crm_tickets.views import CaseView, PolicyView, Written

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TicketsService"].full_name
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def write_result(outcome: WriteOutcome) -> pb.WriteResult:
    return pb.WriteResult(
        id=outcome.id, version=outcome.version, position=outcome.position, replayed=outcome.replayed
    )


def _case(written: Written) -> tuple[pb.WriteResult, pb.Case]:
    assert isinstance(written.subject, CaseView)
    return write_result(written.outcome), case_pb(written.subject)


def _policy(written: Written) -> tuple[pb.WriteResult, pb.SlaPolicy]:
    assert isinstance(written.subject, PolicyView)
    return write_result(written.outcome), policy_pb(written.subject)


def terms_input(terms: pb.SlaTerms) -> SlaTermsInput:
    return SlaTermsInput(
        targets=[
            TargetInput(
                t.tier,
                enum_word(pb.Priority, t.priority),
                t.first_response_seconds,
                t.resolution_seconds,
                t.next_reply_seconds,
            )
            for t in terms.targets
        ],
        calendar=CalendarInput(
            terms.calendar.timezone,
            [WeekdayInput(h.day, h.opens, h.closes) for h in terms.calendar.hours],
            list(terms.calendar.holidays),
        ),
        warning_seconds=terms.warning_seconds,
        pause_on_hold=terms.pause_on_hold,
        escalate_priority=terms.escalate_priority,
        escalate_team=terms.escalate_team,
    )


class TicketsServicer(tickets_pb2_grpc.TicketsServiceServicer):
    def __init__(self, service: TicketsService) -> None:
        self.service = service

    async def OpenCase(self, request: pb.OpenCaseRequest, context: Context) -> pb.OpenCaseResponse:
        written = await self.service.open_case(
            grpc_caller(context, request.request_id),
            NewCase(
                customer_id=request.customer_id,
                channel=enum_word(pb.Channel, request.channel),
                subject=request.subject,
                description=request.description,
                category=request.category,
                priority=enum_word(pb.Priority, request.priority),
                team=request.team,
                assignee=request.assignee,
                policy_id=request.policy_id,
            ),
        )
        result, case = _case(written)
        return pb.OpenCaseResponse(result=result, case=case)

    async def TriageCase(
        self, request: pb.TriageCaseRequest, context: Context
    ) -> pb.TriageCaseResponse:
        written = await self.service.triage_case(
            grpc_caller(context, request.request_id, request.expected_version),
            request.case_id,
            Triage(request.category, enum_word(pb.Priority, request.priority), request.team),
        )
        result, case = _case(written)
        return pb.TriageCaseResponse(result=result, case=case)

    async def AssignCase(
        self, request: pb.AssignCaseRequest, context: Context
    ) -> pb.AssignCaseResponse:
        written = await self.service.assign_case(
            grpc_caller(context, request.request_id, request.expected_version),
            request.case_id,
            request.assignee,
        )
        result, case = _case(written)
        return pb.AssignCaseResponse(result=result, case=case)

    async def ReplyToCase(
        self, request: pb.ReplyToCaseRequest, context: Context
    ) -> pb.ReplyToCaseResponse:
        written = await self.service.reply_to_case(
            grpc_caller(context, request.request_id, request.expected_version),
            request.case_id,
            enum_word(pb.AuthorKind, request.author_kind),
            request.body,
        )
        result, case = _case(written)
        return pb.ReplyToCaseResponse(result=result, case=case)

    async def AddInternalNote(
        self, request: pb.AddInternalNoteRequest, context: Context
    ) -> pb.AddInternalNoteResponse:
        written = await self.service.add_internal_note(
            grpc_caller(context, request.request_id, request.expected_version),
            request.case_id,
            request.body,
        )
        result, case = _case(written)
        return pb.AddInternalNoteResponse(result=result, case=case)

    async def ChangeCaseStatus(
        self, request: pb.ChangeCaseStatusRequest, context: Context
    ) -> pb.ChangeCaseStatusResponse:
        written = await self.service.change_case_status(
            grpc_caller(context, request.request_id, request.expected_version),
            request.case_id,
            enum_word(pb.CaseStatus, request.status),
        )
        result, case = _case(written)
        return pb.ChangeCaseStatusResponse(result=result, case=case)

    async def RecordSatisfaction(
        self, request: pb.RecordSatisfactionRequest, context: Context
    ) -> pb.RecordSatisfactionResponse:
        written = await self.service.record_satisfaction(
            grpc_caller(context, request.request_id),
            request.case_id,
            SurveyInput(
                request.csat,
                request.ces if request.HasField("ces") else None,
                request.nps if request.HasField("nps") else None,
                request.comment,
            ),
        )
        result, case = _case(written)
        return pb.RecordSatisfactionResponse(result=result, case=case)

    async def GetCase(self, request: pb.GetCaseRequest, context: Context) -> pb.GetCaseResponse:
        return pb.GetCaseResponse(case=case_pb(await self.service.get_case(request.case_id)))

    async def ListTeamQueue(
        self, request: pb.ListTeamQueueRequest, context: Context
    ) -> pb.ListTeamQueueResponse:
        page = await self.service.team_queue(request.team, request.page_size, request.page_token)
        return pb.ListTeamQueueResponse(
            cases=[case_pb(c) for c in page.cases], next_page_token=page.next_page_token
        )

    async def ListCasesAtRisk(
        self, request: pb.ListCasesAtRiskRequest, context: Context
    ) -> pb.ListCasesAtRiskResponse:
        page = await self.service.cases_at_risk(
            request.within_minutes, request.team, request.page_size, request.page_token
        )
        return pb.ListCasesAtRiskResponse(
            cases=[case_pb(c) for c in page.cases], next_page_token=page.next_page_token
        )

    async def ListCustomerCases(
        self, request: pb.ListCustomerCasesRequest, context: Context
    ) -> pb.ListCustomerCasesResponse:
        page = await self.service.customer_cases(
            request.customer_id, request.page_size, request.page_token
        )
        return pb.ListCustomerCasesResponse(
            cases=[case_pb(c) for c in page.cases], next_page_token=page.next_page_token
        )

    async def GetSlaCompliance(
        self, request: pb.GetSlaComplianceRequest, context: Context
    ) -> pb.GetSlaComplianceResponse:
        start = (
            datetime_of(request.period_start, "period_start")
            if request.HasField("period_start")
            else None
        )
        end = (
            datetime_of(request.period_end, "period_end")
            if request.HasField("period_end")
            else None
        )
        view = await self.service.sla_compliance(request.team, start, end)
        return pb.GetSlaComplianceResponse(compliance=compliance_pb(view))

    async def GetSatisfactionTrend(
        self, request: pb.GetSatisfactionTrendRequest, context: Context
    ) -> pb.GetSatisfactionTrendResponse:
        start = (
            datetime_of(request.period_start, "period_start")
            if request.HasField("period_start")
            else None
        )
        end = (
            datetime_of(request.period_end, "period_end")
            if request.HasField("period_end")
            else None
        )
        view = await self.service.satisfaction_trend(request.team, start, end, request.interval)
        return pb.GetSatisfactionTrendResponse(trend=trend_pb(view))

    async def DefineSlaPolicy(
        self, request: pb.DefineSlaPolicyRequest, context: Context
    ) -> pb.DefineSlaPolicyResponse:
        written = await self.service.define_sla_policy(
            grpc_caller(context, request.request_id), request.name, terms_input(request.terms)
        )
        result, policy = _policy(written)
        return pb.DefineSlaPolicyResponse(result=result, policy=policy)

    async def ReviseSlaPolicy(
        self, request: pb.ReviseSlaPolicyRequest, context: Context
    ) -> pb.ReviseSlaPolicyResponse:
        written = await self.service.revise_sla_policy(
            grpc_caller(context, request.request_id, request.expected_version),
            request.policy_id,
            terms_input(request.terms),
        )
        result, policy = _policy(written)
        return pb.ReviseSlaPolicyResponse(result=result, policy=policy)

    async def RetireSlaPolicy(
        self, request: pb.RetireSlaPolicyRequest, context: Context
    ) -> pb.RetireSlaPolicyResponse:
        written = await self.service.retire_sla_policy(
            grpc_caller(context, request.request_id, request.expected_version), request.policy_id
        )
        result, policy = _policy(written)
        return pb.RetireSlaPolicyResponse(result=result, policy=policy)

    async def GetSlaPolicy(
        self, request: pb.GetSlaPolicyRequest, context: Context
    ) -> pb.GetSlaPolicyResponse:
        view = await self.service.get_sla_policy(request.policy_id)
        return pb.GetSlaPolicyResponse(policy=policy_pb(view))


def grpc_service(service: TicketsService) -> GrpcService:
    return GrpcService(
        TicketsServicer(service),
        tickets_pb2_grpc.add_TicketsServiceServicer_to_server,
        SERVICE_NAME,
    )
