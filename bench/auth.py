"""What authentication and authorization cost per command.

The contacts API's `CreatePerson` over gRPC on loopback, 16 concurrent
clients, twice in the same run and process, alternating rounds:

- *checked*: the service as it runs, behind `AccessInterceptor` (every call's
  ES256 token verified, issuer, audience and times checked, the policy
  consulted, the rate limiter asked);
- *unchecked*: the same servicer and command path behind an interceptor the
  benchmark builds itself, which hands every call a fixed principal. The
  services have no such switch; only this benchmark constructs it.

Recorded: commands per second and the process's CPU time per command, and the
ratio checked/unchecked. Also the cost of one token verification alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.baseline import _settings
from bench.load import create_person_request
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.auth.principal import Principal, current_principal
from crm_common.server import AccessInterceptor, GrpcService
from crm_contacts.application import ContactsService, create_application
from crm_contacts.grpc_api import grpc_service
from crm_deploy.identity import ensure_identity
from crm_deploy.testing import gate_for, grpc_auth

CLIENTS = 16


# grpcio ships no type information, so its base classes are Any to mypy.
class _FixedPrincipal(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The unchecked path: every call runs as one principal, nothing verified."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        inner = handler.unary_unary
        principal = self.principal

        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            current_principal.set(principal)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class AuthCost:
    checked_per_second: float
    unchecked_per_second: float
    checked_cpu_ms: float
    unchecked_cpu_ms: float
    verify_us: float
    cached_us: float

    @property
    def throughput_ratio(self) -> float:
        return self.checked_per_second / self.unchecked_per_second

    @property
    def cpu_ratio(self) -> float:
        return self.checked_cpu_ms / self.unchecked_cpu_ms


async def _round(interceptor: Any, api: GrpcService, token: str, commands: int
                 ) -> tuple[float, float]:  # fmt: skip
    server = grpc.aio.server(interceptors=[interceptor])
    api.add_to_server(api.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    metadata = grpc_auth(token)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = contacts_pb2_grpc.ContactsServiceStub(channel)
            await stub.CreatePerson(create_person_request(), metadata=metadata)  # warm up
            remaining = commands

            async def client() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await stub.CreatePerson(create_person_request(), metadata=metadata)

            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await server.stop(grace=None)
    return commands / wall, cpu / commands * 1000


async def measure_auth_cost(scratch: Path, commands: int = 2000, rounds: int = 3) -> AuthCost:
    identity = ensure_identity(scratch / "identity")
    gate = gate_for("contacts", identity)
    token = identity.mint("sales", subject="bench", client="bench")
    principal = gate.authenticate(f"Bearer {token}")
    service = ContactsService(create_application(_settings(scratch, "sqlite", "", "contacts")))
    checked: list[tuple[float, float]] = []
    unchecked: list[tuple[float, float]] = []
    api = grpc_service(service, gate, identity.pseudonym_key.read_bytes())
    try:
        for _ in range(rounds):
            checked.append(await _round(AccessInterceptor(gate), api, token, commands))
            unchecked.append(await _round(_FixedPrincipal(principal), api, token, commands))
    finally:
        service.close()
    started = time.perf_counter()
    for _ in range(500):
        gate.verifier.claims(token)  # the signature and claims checked in full
    verify_us = (time.perf_counter() - started) / 500 * 1e6
    started = time.perf_counter()
    for _ in range(2000):
        gate.verifier.verify(token)  # a token seen before: only its times
    cached_us = (time.perf_counter() - started) / 2000 * 1e6

    def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
        return max(r[0] for r in runs), min(r[1] for r in runs)

    (c_rate, c_cpu), (u_rate, u_cpu) = best(checked), best(unchecked)
    return AuthCost(c_rate, u_rate, c_cpu, u_cpu, verify_us, cached_us)


def render_auth(cost: AuthCost) -> str:
    return "\n".join(
        [
            "## Cost of authentication and authorization",
            "",
            f"contacts `CreatePerson` over gRPC on loopback, {CLIENTS} clients, SQLite, one "
            "process (server and clients), best of 3 alternating rounds:",
            "",
            "| path | commands/s | CPU per command | ratio to unchecked |",
            "|---|---|---|---|",
            f"| unchecked (fixed principal, built by the benchmark) | "
            f"{cost.unchecked_per_second:,.0f} | {cost.unchecked_cpu_ms:.2f} ms | 1.00x |",
            f"| checked (token verified, policy, rate limiter) | {cost.checked_per_second:,.0f} "
            f"| {cost.checked_cpu_ms:.2f} ms | {cost.throughput_ratio:.2f}x throughput, "
            f"{cost.cpu_ratio:.2f}x CPU |",
            "",
            f"Verifying a token in full (ES256 signature, claims): {cost.verify_us:.0f} µs; "
            f"a token verified before (kept until it expires or the keys change): "
            f"{cost.cached_us:.0f} µs.",
            "",
        ]
    )


def main() -> None:
    """`python -m bench.auth`: this measurement alone."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="crm-bench-auth-") as scratch:
        print(render_auth(asyncio.run(measure_auth_cost(Path(scratch)))))


if __name__ == "__main__":
    main()
