"""Cross-service fixtures: the whole platform as real processes.

`platform` starts every service process (contacts API, relay and follower,
pipeline API and relay, analytics API and projector) once per test session on
top of the shared `local_stack` (real Kafka and SecantusDB on free ports), the
write services on PostgreSQL (the tests' own server, a database of the
session's), with traces exported to an in-process OTLP receiver so a test can
see what the processes really export.

Every call carries a real signed token of the session's identity: the stubs
of the `contacts`, `pipeline` and `customer360` fixtures add one (unless the
call brings its own `authorization`) for the test module's `E2E_CALLER`
(role, subject; default an admin), and `platform.headers()` /
`platform.metadata()` / `platform.channel()` give the same to clients a test
makes itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from otlp_collector import OtlpCollector

from crm.contacts.v1 import contacts_pb2_grpc
from crm.customer360.v1 import customer360_pb2_grpc
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_deploy.identity import Identity
from crm_deploy.postgres import PostgresTarget
from crm_deploy.stack import SERVICE_PROCESSES as STACK_PROCESSES
from crm_deploy.testing import bearer, grpc_auth, postgres_database, postgres_env

# Every process of the platform (crm_common.registry, through the stack's table).
SERVICE_PROCESSES = [p.name for p in STACK_PROCESSES]
#: Who the end-to-end tests call as, unless a module sets its own `E2E_CALLER`.
DEFAULT_CALLER = ("admin", "e2e-admin")
E2E_CLIENT = "e2e-tests"


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every call that does not carry one."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.extend(grpc_auth(self.token))
        return await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), request)


@dataclass
class Platform:
    stack: Any
    collector: OtlpCollector
    contacts_grpc: str
    contacts_http: str
    pipeline_grpc: str
    pipeline_http: str
    analytics_grpc: str
    analytics_http: str
    #: The session's identity, which every process trusts.
    identity: Identity
    #: The PostgreSQL database the write services store their events in.
    postgres: PostgresTarget

    def token(self, role: str = "admin", subject: str | None = None) -> str:
        """A real signed token of a user with `role`, through the client `e2e-tests`."""
        return self.identity.mint(role, subject=subject, client=E2E_CLIENT)

    def headers(self, role: str = "admin", subject: str | None = None) -> dict[str, str]:
        """HTTP headers with such a token."""
        return bearer(self.token(role, subject))

    def metadata(self, role: str = "admin", subject: str | None = None) -> tuple[Any, ...]:
        """gRPC metadata with such a token."""
        return grpc_auth(self.token(role, subject))

    def channel(
        self, target: str, role: str = "admin", subject: str | None = None
    ) -> grpc.aio.Channel:
        """A channel whose calls carry such a token."""
        return grpc.aio.insecure_channel(
            target, interceptors=[BearerToken(self.token(role, subject))]
        )

    @property
    def mongo_url(self) -> str:
        return str(self.stack.mongo_url)

    def process(self, name: str) -> Any:
        return self.stack.process(name)

    def restart(self, name: str) -> None:
        """Starts a stopped or killed process again and waits until it is ready."""
        process = self.stack.process(name)
        process.start()
        process.wait_ready()


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[OtlpCollector]:
    collector = OtlpCollector().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def platform(local_stack: Any, otlp_collector: OtlpCollector) -> Iterator[Platform]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        # Export within a fraction of a second instead of the default 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    # The production event store: every write service on PostgreSQL, in a
    # database of the session's own (SQLite is what the service tests cover too).
    database = contextlib.ExitStack()
    postgres = database.enter_context(postgres_database("crm_e2e"))
    env.update(postgres_env(postgres))
    local_stack.start_services(SERVICE_PROCESSES, extra_env=env)
    ports = local_stack.config.service_ports
    try:
        yield Platform(
            stack=local_stack,
            collector=otlp_collector,
            contacts_grpc=f"127.0.0.1:{ports['contacts'][0]}",
            contacts_http=f"http://127.0.0.1:{ports['contacts'][1]}",
            pipeline_grpc=f"127.0.0.1:{ports['pipeline'][0]}",
            pipeline_http=f"http://127.0.0.1:{ports['pipeline'][1]}",
            analytics_grpc=f"127.0.0.1:{ports['analytics'][0]}",
            analytics_http=f"http://127.0.0.1:{ports['analytics'][1]}",
            identity=local_stack.identity,
            postgres=postgres,
        )
    finally:
        local_stack.stop_services(SERVICE_PROCESSES)
        database.close()


@pytest.fixture
def caller(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(role, subject) the test module calls as: its `E2E_CALLER`, else an admin."""
    role, subject = getattr(request.module, "E2E_CALLER", DEFAULT_CALLER)
    return str(role), str(subject)


@pytest.fixture
async def contacts(platform: Platform, caller: tuple[str, str]) -> Any:
    async with platform.channel(platform.contacts_grpc, *caller) as channel:
        yield contacts_pb2_grpc.ContactsServiceStub(channel)


@pytest.fixture
async def customer360(platform: Platform, caller: tuple[str, str]) -> Any:
    async with platform.channel(platform.analytics_grpc, *caller) as channel:
        yield customer360_pb2_grpc.Customer360ServiceStub(channel)


@pytest.fixture
async def pipeline(platform: Platform, caller: tuple[str, str]) -> Any:
    async with platform.channel(platform.pipeline_grpc, *caller) as channel:
        yield pipeline_pb2_grpc.PipelineServiceStub(channel)
