"""The gRPC adapter in process, behind the real access gate: the queries, and bad
arguments refused as INVALID_ARGUMENT naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tickets_support import Clock, KnownContacts, sqlite_settings

from crm.tickets.v1 import tickets_pb2 as pb
from crm.tickets.v1 import tickets_pb2_grpc
from crm_common.server import AccessInterceptor
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import gate_for, grpc_auth
from crm_tickets.application import TicketsService, create_application
from crm_tickets.grpc_api import grpc_service


@pytest.fixture
async def stub(
    tmp_path: Path, identity: Identity
) -> AsyncIterator[tickets_pb2_grpc.TicketsServiceStub]:
    service = TicketsService(
        create_application(sqlite_settings(tmp_path)), KnownContacts("contact-1"), clock=Clock()
    )
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate_for("tickets", identity))])
    api = grpc_service(service)
    api.add_to_server(api.servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield tickets_pb2_grpc.TicketsServiceStub(channel)  # type: ignore[no-untyped-call]
    await server.stop(None)
    service.close()


def stamp(text: str) -> Timestamp:
    at = Timestamp()
    at.FromJsonString(text)
    return at


async def test_queries_and_invalid_arguments(
    stub: tickets_pb2_grpc.TicketsServiceStub, identity: Identity
) -> None:
    agent = grpc_auth(identity.mint("service", subject="agent-7"))
    opened = await stub.OpenCase(
        pb.OpenCaseRequest(
            customer_id="contact-1", channel=pb.CHANNEL_PHONE, subject="Hi", team="desk"
        ),
        metadata=agent,
    )
    await stub.ReplyToCase(
        pb.ReplyToCaseRequest(
            case_id=opened.result.id, author_kind=pb.AUTHOR_KIND_AGENT, body="Hello"
        ),
        metadata=agent,
    )
    at_risk = await stub.ListCasesAtRisk(
        pb.ListCasesAtRiskRequest(within_minutes=7 * 24 * 60, team="desk"), metadata=agent
    )
    assert [c.id for c in at_risk.cases] == [opened.result.id]
    history = await stub.ListCustomerCases(
        pb.ListCustomerCasesRequest(customer_id="contact-1"), metadata=agent
    )
    assert [c.id for c in history.cases] == [opened.result.id]
    report = await stub.GetSlaCompliance(
        pb.GetSlaComplianceRequest(
            team="desk",
            period_start=stamp("2026-02-01T00:00:00Z"),
            period_end=stamp("2026-02-08T00:00:00Z"),
        ),
        metadata=agent,
    )
    compliance = report.compliance
    assert (compliance.cases, compliance.first_reply_count) == (1, 1)
    first = next(t for t in compliance.targets if t.kind == "first_response")
    assert (first.met, first.breached, first.share_met) == (1, 0, 1.0)
    await stub.ChangeCaseStatus(
        pb.ChangeCaseStatusRequest(case_id=opened.result.id, status=pb.CASE_STATUS_SOLVED),
        metadata=agent,
    )
    await stub.RecordSatisfaction(
        pb.RecordSatisfactionRequest(case_id=opened.result.id, csat=2, nps=5), metadata=agent
    )
    analyst = grpc_auth(identity.mint("analyst"))
    trend = (
        await stub.GetSatisfactionTrend(
            pb.GetSatisfactionTrendRequest(
                period_start=stamp("2026-01-01T00:00:00Z"),
                period_end=stamp("2026-03-01T00:00:00Z"),
            ),
            metadata=analyst,
        )
    ).trend
    assert trend.interval == "month"
    assert [(p.start.ToJsonString()[:10], p.responses) for p in trend.periods] == [
        ("2026-01-01", 0),
        ("2026-02-01", 1),
    ]
    february = trend.periods[1]
    assert (february.csat_mean, february.nps_responses, february.detractors) == (2.0, 1, 1)
    assert (february.ces_responses, february.nps) == (0, -100.0)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.GetSatisfactionTrend(
            pb.GetSatisfactionTrendRequest(), metadata=grpc_auth(identity.mint("marketing"))
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    january = {
        "period_start": stamp("2026-01-01T00:00:00Z"),
        "period_end": stamp("2026-02-01T00:00:00Z"),
    }
    refusals = [
        (
            stub.GetSatisfactionTrend,
            pb.GetSatisfactionTrendRequest(interval="quarter", **january),
            "interval",
        ),
        (
            stub.GetSatisfactionTrend,
            pb.GetSatisfactionTrendRequest(period_end=january["period_start"]),
            "period_start",
        ),
        (stub.ListCasesAtRisk, pb.ListCasesAtRiskRequest(within_minutes=-5), "within_minutes"),
        (stub.ListCustomerCases, pb.ListCustomerCasesRequest(), "customer_id"),
        (stub.ListTeamQueue, pb.ListTeamQueueRequest(team="desk", page_size=-1), "page_size"),
        (
            stub.GetSlaCompliance,
            pb.GetSlaComplianceRequest(team="desk", period_end=stamp("2026-02-08T00:00:00Z")),
            "period_start",
        ),
    ]
    for method, request, field in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await method(request, metadata=agent)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or ""), refused.value.details()
