"""gRPC over TLS, and partners on mutual TLS: identity from certificate and token alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from crm_common.auth.access import AccessPolicy
from crm_common.auth.gate import AccessGate
from crm_common.auth.principal import current_principal
from crm_common.server import AccessInterceptor, server_credentials
from crm_common.settings import Settings
from crm_deploy.identity import Identity
from crm_deploy.testing import gate_for, grpc_auth

POLICY = """
operations:
  ledger:
    ReadBalance: [partner, sales]
partners:
  acme:
    tag: "partner:acme"
"""


def _handler() -> grpc.GenericRpcHandler:
    async def read(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
        principal = current_principal.get()
        assert principal is not None
        await context.send_initial_metadata((("x-certificate", principal.certificate or ""),))
        return empty_pb2.Empty()

    return grpc.method_handlers_generic_handler(
        "crm.ledger.v1.Ledger",
        {
            "ReadBalance": grpc.unary_unary_rpc_method_handler(
                read,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            )
        },
    )


@pytest.fixture
async def address(tmp_path: Path, identity: Identity) -> AsyncIterator[str]:
    policy = tmp_path / "access.yaml"
    policy.write_text(POLICY)
    gate = AccessGate("ledger", gate_for("ledger", identity).verifier, AccessPolicy.load(policy))
    tls = identity.root / "tls"
    settings = replace(
        Settings.from_env("ledger"),
        grpc_tls_cert=str(tls / "server.pem"),
        grpc_tls_key=str(tls / "server.key.pem"),
        grpc_client_ca=str(tls / "ca.pem"),
        grpc_client_auth="require",
    )
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    server.add_generic_rpc_handlers((_handler(),))
    credentials = server_credentials(settings)
    assert credentials is not None
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"localhost:{port}"
    finally:
        await server.stop(grace=None)


def channel(identity: Identity, address: str, client: str | None) -> grpc.aio.Channel:
    tls = identity.root / "tls"
    key = cert = None
    if client is not None:
        key = (tls / f"{client}.key.pem").read_bytes()
        cert = (tls / f"{client}.pem").read_bytes()
    credentials = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(), private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(address, credentials)


async def read(ch: grpc.aio.Channel, token: str) -> grpc.aio.UnaryUnaryCall[Any, Any]:
    call = ch.unary_unary(
        "/crm.ledger.v1.Ledger/ReadBalance",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )(empty_pb2.Empty(), metadata=grpc_auth(token), timeout=10)
    await call
    return call


async def test_a_partner_with_its_certificate_and_its_token_is_admitted(
    address: str, identity: Identity
) -> None:
    async with channel(identity, address, "partner-acme") as ch:
        call = await read(ch, identity.mint("partner", subject="acme-erp", client="acme"))
        assert dict(await call.initial_metadata())["x-certificate"] == "acme"


async def test_a_token_of_another_partner_over_this_certificate_is_refused(
    address: str, identity: Identity
) -> None:
    async with channel(identity, address, "partner-acme") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read(ch, identity.mint("partner", subject="globex-erp", client="globex"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "certificate" in (refused.value.details() or "")


async def test_without_a_client_certificate_the_connection_is_refused(
    address: str, identity: Identity
) -> None:
    async with channel(identity, address, None) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read(ch, identity.mint("partner", client="acme"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_alone_is_not_enough(address: str, identity: Identity) -> None:
    async with channel(identity, address, "partner-acme") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read(ch, "")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
