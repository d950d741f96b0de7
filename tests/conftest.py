"""Cross-service fixtures: the whole platform as real processes.

`platform` starts every service process (contacts API, relay and follower,
pipeline API and relay, analytics API and projector) once per test session on
top of the shared `local_stack` (real Kafka and SecantusDB on free ports), with
traces exported to an in-process OTLP receiver so a test can see what the
processes really export.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from otlp_collector import OtlpCollector

from crm.contacts.v1 import contacts_pb2_grpc
from crm.customer360.v1 import customer360_pb2_grpc
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_deploy.stack import SERVICE_PROCESSES as STACK_PROCESSES

# Every process of the platform (crm_common.registry, through the stack's table).
SERVICE_PROCESSES = [p.name for p in STACK_PROCESSES]


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
        )
    finally:
        local_stack.stop_services(SERVICE_PROCESSES)


@pytest.fixture
async def contacts(platform: Platform) -> Any:
    async with grpc.aio.insecure_channel(platform.contacts_grpc) as channel:
        yield contacts_pb2_grpc.ContactsServiceStub(channel)


@pytest.fixture
async def customer360(platform: Platform) -> Any:
    async with grpc.aio.insecure_channel(platform.analytics_grpc) as channel:
        yield customer360_pb2_grpc.Customer360ServiceStub(channel)


@pytest.fixture
async def pipeline(platform: Platform) -> Any:
    async with grpc.aio.insecure_channel(platform.pipeline_grpc) as channel:
        yield pipeline_pb2_grpc.PipelineServiceStub(channel)
