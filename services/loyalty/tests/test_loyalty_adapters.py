"""gRPC and REST adapters in process, behind the real access gate, with real tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

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
    sqlite_service: LoyaltyService, identity: Identity
) -> AsyncIterator[loyalty_pb2_grpc.LoyaltyServiceStub]:
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate_for("loyalty", identity))])
    api = grpc_service(sqlite_service)
    api.add_to_server(api.servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield loyalty_pb2_grpc.LoyaltyServiceStub(channel)  # type: ignore[no-untyped-call]
    await server.stop(None)


@pytest.fixture
async def http(
    sqlite_service: LoyaltyService, identity: Identity
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(sqlite_service, gate_for("loyalty", identity))
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
    http: httpx.AsyncClient, identity: Identity, sqlite_service: LoyaltyService
) -> None:
    service = sqlite_service
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
        "ListMembers",
        "GetTier",
        "EarnPoints",
        "RedeemPoints",
        "AdjustPoints",
        "GetEarningRules",
        "PublishEarningRules",
        "DefineReward",
        "ListRewards",
        "RestockReward",
        "RetireReward",
        "RedeemReward",
        "ListParkedOrders",
        "RedriveParkedOrder",
    }


async def test_rewards_over_rest_and_grpc_with_the_roles_of_the_policy(
    http: httpx.AsyncClient, stub: Any, identity: Identity
) -> None:
    admin = bearer(identity.mint("admin", subject="ada"))
    agent = bearer(identity.mint("service", subject="agent-7"))
    await http.post("/members", json={"contact_id": "c-1", "channel": "app"}, headers=admin)
    await http.post(
        "/members/c-1/adjustments", json={"points": 250, "reason": "goodwill"}, headers=admin
    )
    denied = await http.post(
        "/rewards", json={"code": "mug", "name": "Mug", "points": 100}, headers=agent
    )
    assert denied.status_code == 403
    bad = await http.post("/rewards", json={"code": "a b", "name": "", "points": 0}, headers=admin)
    assert bad.status_code == 422
    assert {d["field"] for d in bad.json()["detail"]} == {"code", "name", "points"}
    defined = await http.post(
        "/rewards", json={"code": "Mug", "name": "Mug", "points": 100, "stock": 1}, headers=admin
    )
    assert defined.status_code == 201 and defined.json()["reward"]["code"] == "mug"
    redeemed = await http.post(
        "/members/c-1/reward-redemptions",
        json={"code": "mug"},
        headers={**agent, "Idempotency-Key": "red-1"},
    )
    assert redeemed.status_code == 201, redeemed.text
    body = redeemed.json()
    assert body["member"]["balance"]["active"] == 150 and body["reward"]["stock"] == 0
    assert body["redemption_id"] == "mug:1"
    empty = await http.post("/members/c-1/reward-redemptions", json={"code": "mug"}, headers=agent)
    assert empty.status_code == 409 and "out of stock" in empty.text
    restocked = await http.post("/rewards/mug/restock", json={"quantity": 2}, headers=admin)
    assert restocked.json()["reward"]["stock"] == 2
    listed = await http.get("/rewards", headers=agent)
    assert [(r["code"], r["stock"], r["reserved"]) for r in listed.json()] == [("mug", 2, 1)]

    grpc_admin = grpc_auth(identity.mint("admin", subject="ada"))
    reply = await stub.RedeemReward(
        pb.RedeemRewardRequest(contact_id="c-1", code="mug"), metadata=grpc_admin
    )
    assert reply.member.balance.active == 50 and reply.reward.reserved == 2
    with pytest.raises(grpc.aio.AioRpcError) as poor:
        await stub.RedeemReward(
            pb.RedeemRewardRequest(contact_id="c-1", code="mug"), metadata=grpc_admin
        )
    assert poor.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await stub.RetireReward(pb.RetireRewardRequest(code="mug"), metadata=grpc_admin)
    listed_grpc = await stub.ListRewards(pb.ListRewardsRequest(), metadata=grpc_admin)
    assert list(listed_grpc.rewards) == []
    everything = await stub.ListRewards(
        pb.ListRewardsRequest(include_retired=True), metadata=grpc_admin
    )
    assert [(r.code, r.retired) for r in everything.rewards] == [("mug", True)]


async def test_parked_orders_are_listed_for_the_erp_team_and_redriven_by_an_admin(
    http: httpx.AsyncClient, stub: Any, identity: Identity, sqlite_service: LoyaltyService
) -> None:
    from crm_common.commands import Caller

    ingest = Caller(actor="erp", client="crm-loyalty-ingest")
    await sqlite_service.park(ingest, "o-7:placed", "ghost", "placed", b"raw", "unknown customer")
    await sqlite_service.dead_letter(ingest, "o-7:placed", "limit reached", "crm.erp.orders.dl")
    erp_team = bearer(identity.mint("erp-integration", subject="erp"))
    admin = bearer(identity.mint("admin", subject="ada"))
    listed = await http.get("/erp/parked-orders", headers=erp_team)
    assert listed.status_code == 200
    [entry] = listed.json()
    assert (entry["key"], entry["state"], entry["reason"]) == (
        "o-7:placed",
        "dead_lettered",
        "limit reached",
    )
    assert (await http.get("/erp/parked-orders?state=parked", headers=erp_team)).json() == []
    assert (await http.get("/erp/parked-orders?state=x", headers=erp_team)).status_code == 422
    refused = await http.post("/erp/parked-orders/o-7:placed/redrive", headers=erp_team)
    assert refused.status_code == 403
    redriven = await http.post("/erp/parked-orders/o-7:placed/redrive", headers=admin)
    assert redriven.status_code == 200 and redriven.json()["state"] == "parked"
    again = await http.post("/erp/parked-orders/o-7:placed/redrive", headers=admin)
    assert again.status_code == 409
    reply = await stub.ListParkedOrders(
        pb.ListParkedOrdersRequest(state="parked"),
        metadata=grpc_auth(identity.mint("admin", subject="ada")),
    )
    assert [(o.key, o.payload, o.source_offset) for o in reply.orders] == [
        ("o-7:placed", b"raw", -1)
    ]


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields a gRPC INVALID_ARGUMENT names in its google.rpc.BadRequest details."""
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    fields: list[str] = []
    for detail in status.details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            fields += [v.field for v in request.field_violations]
    return fields


async def test_members_are_listed_for_marketing_and_analysts_over_rest(
    http: httpx.AsyncClient, identity: Identity
) -> None:
    admin = bearer(identity.mint("admin", subject="ada"))
    for contact, points in (("c-1", 40), ("c-2", 90)):
        await http.post("/members", json={"contact_id": contact, "channel": "app"}, headers=admin)
        await http.post(
            f"/members/{contact}/adjustments",
            json={"points": points, "reason": "welcome"},
            headers=admin,
        )
    assert (await http.get("/members")).status_code == 401
    for role in ("service", "sales", "partner", "erp-integration"):
        refused = await http.get("/members", headers=bearer(identity.mint(role)))
        assert refused.status_code == 403, role
    marketing = bearer(identity.mint("marketing", subject="mia"))
    listed = await http.get("/members", params={"order_by": "available_desc"}, headers=marketing)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["next_page_token"] == ""
    assert [(m["contact_id"], m["tier"], m["balance"]["active"]) for m in body["members"]] == [
        ("c-2", "basic", 90),
        ("c-1", "basic", 40),
    ]
    row = body["members"][0]
    member = (await http.get("/members/c-2", headers=marketing)).json()
    assert row["earned"] == 90 and row["version"] == member["version"]
    assert row["next_expiry_at"] == member["lots"][0]["expires_at"]
    assert row["next_expiry_points"] == 90
    # Analysts see the same rows: ids and figures, as GetMember shows them.
    analyst = await http.get(
        "/members", params={"order_by": "available_desc"}, headers=bearer(identity.mint("analyst"))
    )
    assert analyst.status_code == 200 and analyst.json() == body

    seen, token = [], ""
    while True:
        params = {"page_size": 1, **({"page_token": token} if token else {})}
        page = (await http.get("/members", params=params, headers=marketing)).json()
        seen += [m["contact_id"] for m in page["members"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == ["c-1", "c-2"]
    rich = await http.get("/members", params={"min_available": 50}, headers=marketing)
    assert [m["contact_id"] for m in rich.json()["members"]] == ["c-2"]
    later = await http.get(
        "/members", params={"expiring_before": "2099-01-01T00:00:00Z"}, headers=marketing
    )
    assert len(later.json()["members"]) == 2

    for params, field in (
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_size": 0, "page_token": "W10"}, "page_token"),
        ({"page_size": 201}, "page_size"),
        ({"page_size": "many"}, "page_size"),
        ({"tier": "platinum"}, "tier"),
        ({"order_by": "name"}, "order_by"),
        ({"expiring_before": "2026-01-01T00:00:00"}, "expiring_before"),
        ({"expiring_before": "soon"}, "expiring_before"),
        ({"min_available": -5}, "min_available"),
    ):
        bad = await http.get("/members", params=params, headers=marketing)
        assert bad.status_code == 422, (params, bad.text)
        assert bad.json()["error"] == "ValidationFailed"
        assert [d["field"] for d in bad.json()["detail"]] == [field], params
    # A token of one listing is refused by another.
    first = await http.get("/members", params={"page_size": 1}, headers=marketing)
    other = await http.get(
        "/members",
        params={
            "page_size": 1,
            "order_by": "available_desc",
            "page_token": first.json()["next_page_token"],
        },
        headers=marketing,
    )
    assert other.status_code == 422 and other.json()["detail"][0]["field"] == "page_token"


async def test_members_are_listed_over_grpc_with_the_roles_of_the_policy(
    stub: Any, identity: Identity, sqlite_service: LoyaltyService
) -> None:
    from crm_common.commands import Caller

    admin = Caller(actor="ada", client="console")
    for contact, points in (("c-1", 40), ("c-2", 90)):
        await sqlite_service.enrol(admin, contact, "web")
        await sqlite_service.adjust(admin, contact, points, "welcome")
    marketing = grpc_auth(identity.mint("marketing", subject="mia"))
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.ListMembers(
            pb.ListMembersRequest(), metadata=grpc_auth(identity.mint("service"))
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ranked = await stub.ListMembers(
        pb.ListMembersRequest(order_by=pb.MEMBER_ORDER_AVAILABLE_DESC, page_size=1),
        metadata=marketing,
    )
    assert [(m.contact_id, m.balance.active) for m in ranked.members] == [("c-2", 90)]
    assert ranked.members[0].next_expiry_points == 90
    assert ranked.members[0].next_expiry_at.seconds > 0
    rest = await stub.ListMembers(
        pb.ListMembersRequest(
            order_by=pb.MEMBER_ORDER_AVAILABLE_DESC,
            page_size=1,
            page_token=ranked.next_page_token,
        ),
        metadata=marketing,
    )
    assert [m.contact_id for m in rest.members] == ["c-1"] and rest.next_page_token == ""
    analyst = await stub.ListMembers(
        pb.ListMembersRequest(min_available=50), metadata=grpc_auth(identity.mint("analyst"))
    )
    assert [m.contact_id for m in analyst.members] == ["c-2"]
    for request, fields in (
        (pb.ListMembersRequest(page_token="garbage"), ["page_token"]),
        (pb.ListMembersRequest(page_token=ranked.next_page_token), ["page_token"]),
        (pb.ListMembersRequest(page_size=500, tier="gold-ish"), ["tier", "page_size"]),
        (pb.ListMembersRequest(order_by=7), ["order_by"]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ListMembers(request, metadata=marketing)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(invalid.value) == fields
