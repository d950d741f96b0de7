"""The gate on both transports: what passes, what is refused and how it is said."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi import APIRouter, Request
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from crm_common.auth.access import AccessPolicy
from crm_common.auth.gate import AccessGate, RateLimiter
from crm_common.auth.principal import current_principal
from crm_common.server import AccessInterceptor, http_caller, service_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for, grpc_auth


class Amount(BaseModel):
    cents: int


POLICY = """
operations:
  ledger:
    ReadBalance: [sales, analyst]
    Deposit: [sales, platform]
"""


@pytest.fixture
def gate(tmp_path: Path, identity: Identity) -> AccessGate:
    policy = tmp_path / "access.yaml"
    policy.write_text(POLICY)
    base = gate_for("ledger", identity)
    return AccessGate("ledger", base.verifier, AccessPolicy.load(policy))


@pytest.fixture
async def http(gate: AccessGate) -> AsyncIterator[httpx.AsyncClient]:
    app = service_app(gate, title="ledger", description="a test API")

    @app.get("/balance", operation_id="ReadBalance")
    async def read_balance() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/deposits", operation_id="Deposit")
    async def deposit(request: Request) -> dict[str, str]:
        return {"actor": http_caller(request).actor}

    @app.get("/unlisted")
    async def unlisted() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
        yield client


async def test_rest_admits_a_listed_role_and_refuses_everything_else(
    http: httpx.AsyncClient, identity: Identity
) -> None:
    ok = await http.get("/balance", headers=bearer(identity.mint("analyst")))
    assert ok.status_code == 200, ok.text
    missing = await http.get("/balance")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith('Bearer realm="crm"')
    assert missing.json()["error"] == "Unauthenticated"
    garbage = await http.get("/balance", headers={"authorization": "Bearer nonsense"})
    assert garbage.status_code == 401 and "not a JWT" in garbage.json()["message"]
    basic = await http.get("/balance", headers={"authorization": "Basic YTpi"})
    assert basic.status_code == 401
    wrong_role = await http.post("/deposits", headers=bearer(identity.mint("analyst")))
    assert wrong_role.status_code == 403 and "Deposit" in wrong_role.json()["message"]
    unlisted = await http.get("/unlisted", headers=bearer(identity.mint("admin")))
    assert unlisted.status_code == 403


async def test_rest_keeps_health_and_the_openapi_document_open_and_documents_the_scheme(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.get("/healthz")).status_code == 200
    document = (await http.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    operation = document["paths"]["/balance"]["get"]
    assert operation["security"] == [{"bearer": []}]
    assert {"401", "403", "429"} <= set(operation["responses"])
    assert (await http.get("/nowhere")).status_code == 404


async def test_only_a_platform_service_may_act_for_a_user_and_the_user_bounds_it(
    http: httpx.AsyncClient, identity: Identity
) -> None:
    service = identity.platform_issuer().mint("service:pipeline", ["platform"], client="pipeline")
    sales, analyst = identity.mint("sales"), identity.mint("analyst")
    acting = {**bearer(service), "x-crm-acting-user": f"Bearer {sales}"}
    admitted = await http.post("/deposits", headers=acting)
    assert admitted.status_code == 200
    assert admitted.json() == {"actor": "dev-sales"}  # the audit names the user
    # The service may deposit, the analyst it acts for may not.
    bounded = {**bearer(service), "x-crm-acting-user": f"Bearer {analyst}"}
    assert (await http.post("/deposits", headers=bounded)).status_code == 403
    # A user cannot claim to act for another user.
    forged = {**bearer(sales), "x-crm-acting-user": f"Bearer {analyst}"}
    assert (await http.post("/deposits", headers=forged)).status_code == 403


async def test_the_caller_names_the_verified_user_not_a_header(identity: Identity) -> None:
    gate = gate_for("ledger", identity)
    principal = gate.authenticate(f"Bearer {identity.mint('sales', subject='ada')}")

    class FakeRequest:
        scope: dict[str, Any] = {"state": {"principal": principal}}
        headers = {"x-crm-actor": "mallory", "idempotency-key": "k-1"}

    caller = http_caller(FakeRequest())  # type: ignore[arg-type]
    assert (caller.actor, caller.request_id, caller.scope) == ("ada", "k-1", "ada")


def test_the_rate_limit_refuses_a_flood_and_lets_the_client_recover() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("console")
    with pytest.raises(Exception) as refused:
        limiter.take("console")
    assert "too many requests" in str(refused.value)
    limiter.take("another-client")
    now[0] += 0.2
    limiter.take("console")


# -- gRPC -----------------------------------------------------------------------------


def _deposit_handler() -> grpc.GenericRpcHandler:
    async def deposit(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
        principal = current_principal.get()
        assert principal is not None
        await context.send_initial_metadata((("x-actor", principal.actor),))
        return empty_pb2.Empty()

    return grpc.method_handlers_generic_handler(
        "crm.ledger.v1.Ledger",
        {
            "Deposit": grpc.unary_unary_rpc_method_handler(
                deposit,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            )
        },
    )


@pytest.fixture
async def channel(gate: AccessGate) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    server.add_generic_rpc_handlers((_deposit_handler(),))
    health = __import__("grpc_health.v1._async", fromlist=["HealthServicer"]).HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(grace=None)


def _deposit(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        "/crm.ledger.v1.Ledger/Deposit",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )


async def test_grpc_admits_a_listed_role_and_says_who(
    channel: grpc.aio.Channel, identity: Identity
) -> None:
    call = _deposit(channel)(
        empty_pb2.Empty(), metadata=grpc_auth(identity.mint("sales", subject="ada"))
    )
    await call
    assert dict(await call.initial_metadata())["x-actor"] == "ada"


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer forged"),), grpc.StatusCode.UNAUTHENTICATED),
        ("analyst", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_grpc_refuses_missing_forged_and_unauthorised_calls(
    channel: grpc.aio.Channel, identity: Identity, metadata: Any, code: grpc.StatusCode
) -> None:
    if isinstance(metadata, str):
        metadata = grpc_auth(identity.mint(metadata))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _deposit(channel)(empty_pb2.Empty(), metadata=metadata)
    assert refused.value.code() == code


async def test_grpc_health_needs_no_token(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as answer:
        await stub.Check(health_pb2.HealthCheckRequest(service="unknown"))
    assert answer.value.code() == grpc.StatusCode.NOT_FOUND  # answered, not refused


async def test_an_unexpected_failure_says_neither_its_class_nor_its_text(
    gate: AccessGate, identity: Identity
) -> None:
    app = service_app(gate, title="ledger", description="a test API")

    @app.get("/balance", operation_id="ReadBalance")
    async def read_balance() -> dict[str, str]:
        raise ValueError("customer 42 owes 1,000,000")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
        reply = await client.get("/balance", headers=bearer(identity.mint("sales")))
    assert reply.status_code == 500
    assert "incident" in reply.json()["message"]
    assert "ValueError" not in reply.text and "42" not in reply.text.split("incident")[0]

    async def broken(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
        raise ValueError("customer 42 owes 1,000,000")

    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "crm.ledger.v1.Ledger",
                {
                    "ReadBalance": grpc.unary_unary_rpc_method_handler(
                        broken,
                        request_deserializer=empty_pb2.Empty.FromString,
                        response_serializer=empty_pb2.Empty.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(
                "/crm.ledger.v1.Ledger/ReadBalance",
                request_serializer=empty_pb2.Empty.SerializeToString,
                response_deserializer=empty_pb2.Empty.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(empty_pb2.Empty(), metadata=grpc_auth(identity.mint("sales")))
    finally:
        await server.stop(grace=None)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    details = failed.value.details() or ""
    assert "ValueError" not in details and "owes" not in details and "incident" in details


async def test_routes_of_included_routers_pass_the_gate_before_their_body_is_read(
    gate: AccessGate, identity: Identity
) -> None:
    app = service_app(gate, title="ledger", description="a test API")
    router = APIRouter(prefix="/accounts")

    @router.post("/{account}/deposits", operation_id="Deposit")
    async def deposit(account: str, body: Amount) -> dict[str, int]:
        return {"cents": body.cents}

    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
        ok = await client.post(
            "/accounts/a/deposits", json={"cents": 5}, headers=bearer(identity.mint("sales"))
        )
        assert ok.status_code == 200 and ok.json() == {"cents": 5}
        # No token and a broken body: refused for the token, the body never looked at.
        anonymous = await client.post("/accounts/a/deposits", json={"cents": "lots"})
        assert anonymous.status_code == 401 and "www-authenticate" in anonymous.headers
        analyst = await client.post(
            "/accounts/a/deposits", json={"cents": 5}, headers=bearer(identity.mint("analyst"))
        )
        assert analyst.status_code == 403
