"""gRPC and REST adapters in process, behind the real access gate, with real tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from crm.loyalty.v1 import loyalty_pb2 as pb
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_common.server import AccessInterceptor
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import bearer, gate_for, grpc_auth
from crm_loyalty.application import LoyaltyService
from crm_loyalty.grpc_api import grpc_service
from crm_loyalty.rest_api import create_app


@pytest.fixture
async def stub(
    service: LoyaltyService, identity: Identity
) -> AsyncIterator[loyalty_pb2_grpc.LoyaltyServiceStub]:
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate_for("loyalty", identity))])
    api = grpc_service(service)
    api.add_to_server(api.servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield loyalty_pb2_grpc.LoyaltyServiceStub(channel)  # type: ignore[no-untyped-call]
    await server.stop(None)


@pytest.fixture
async def http(service: LoyaltyService, identity: Identity) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service, gate_for("loyalty", identity))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://loyalty") as client:
        yield client


async def test_grpc_enrol_earn_redeem_and_tier_with_the_roles_of_the_policy(
    stub: Any, identity: Identity
) -> None:
    marketing = grpc_auth(identity.mint("marketing", subject="mia"))
    agent = grpc_auth(identity.mint("service", subject="agent-7"))
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await stub.GetTier(pb.GetTierRequest(contact_id="c-1"))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.EnrolMember(
            pb.EnrolMemberRequest(contact_id="c-1", channel=pb.ENROLMENT_CHANNEL_WEB),
            metadata=agent,
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    enrolled = await stub.EnrolMember(
        pb.EnrolMemberRequest(
            request_id="e-1", contact_id="c-1", channel=pb.ENROLMENT_CHANNEL_STORE
        ),
        metadata=marketing,
    )
    assert enrolled.member.channel == pb.ENROLMENT_CHANNEL_STORE
    earned = await stub.EarnPoints(
        pb.EarnPointsRequest(
            contact_id="c-1",
            expected_version=enrolled.result.version,
            lines=[pb.PurchaseLine(line_id="1", amount=pb.Money(amount="80", currency="EUR"))],
        ),
        metadata=marketing,
    )
    assert earned.points == 80 and earned.member.balance.active == 80
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RedeemPoints(pb.RedeemPointsRequest(contact_id="c-1", points=81), metadata=agent)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    redeemed = await stub.RedeemPoints(
        pb.RedeemPointsRequest(contact_id="c-1", points=30, reference="voucher"), metadata=agent
    )
    assert redeemed.member.balance.spent == 30
    tier = await stub.GetTier(pb.GetTierRequest(contact_id="c-1"), metadata=agent, timeout=0.5)
    assert tier.tier == "basic" and tier.next_tier == "silver"
    assert tier.points_to_next_tier == 920
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.AdjustPoints(
            pb.AdjustPointsRequest(contact_id="c-1", points=5, reason="x", expected_version=1),
            metadata=marketing,
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED


async def test_rest_writes_and_reads_with_the_audit_of_the_token(
    http: httpx.AsyncClient, identity: Identity, service: LoyaltyService
) -> None:
    admin = bearer(identity.mint("admin", subject="ada"))
    assert (await http.get("/members/c-1")).status_code == 401
    created = await http.post(
        "/members",
        json={"contact_id": "c-1", "channel": "app"},
        headers={**admin, "Idempotency-Key": "k1"},
    )
    assert created.status_code == 201, created.text
    replay = await http.post(
        "/members",
        json={"contact_id": "c-1", "channel": "app"},
        headers={**admin, "Idempotency-Key": "k1"},
    )
    assert replay.status_code == 200 and replay.json()["replayed"] is True
    rules = await http.put(
        "/earning-rules", json={"rates": {"EUR": "1"}, "tier_multipliers": {}}, headers=admin
    )
    assert rules.status_code == 200 and rules.json()["rules"]["version"] == 1
    adjusted = await http.post(
        "/members/c-1/adjustments", json={"points": 25, "reason": "goodwill"}, headers=admin
    )
    assert adjusted.status_code == 201 and adjusted.json()["member"]["balance"]["active"] == 25
    too_much = await http.post("/members/c-1/redemptions", json={"points": 26}, headers=admin)
    assert too_much.status_code == 409
    bad = await http.post(
        "/members/c-1/earnings",
        json={"lines": [{"amount": "x", "currency": "EUR"}]},
        headers=admin,
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "lines[0].amount"
    sales = bearer(identity.mint("sales"))
    assert (await http.get("/members/c-1", headers=sales)).status_code == 403
    # The audit trail names the token's subject.
    stored = [
        service.app.mapper.to_domain_event(n)
        for n in service.app.recorder.select_notifications(1, 100)
    ]
    assert {getattr(e, "_meta", {}).get("actor") for e in stored} >= {"ada"}
    schema = (await http.get("/openapi.json")).json()
    operations = {op["operationId"] for path in schema["paths"].values() for op in path.values()}
    assert operations == {
        "EnrolMember",
        "GetMember",
        "GetTier",
        "EarnPoints",
        "RedeemPoints",
        "AdjustPoints",
        "GetEarningRules",
        "PublishEarningRules",
    }
