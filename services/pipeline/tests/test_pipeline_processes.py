"""`crm-pipeline serve|relay` as real processes, started the way the local stack does."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pipeline_support import STAGES, Clock, sqlite_settings

from crm.events.v1 import pipeline_pb2 as events_pb
from crm.pipeline.v1 import pipeline_pb2 as pb
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_common.commands import Caller
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.stack import TOPIC_PARTITIONS, Stack
from crm_deploy.testing import (
    clean_environment,
    grpc_auth,
    start_process,
    stop_gracefully,
    wait_serving,
)
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.inputs import NewOpportunity

SERVICE = "pipeline"


def start(
    command: str, env: dict[str, str], log: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    return start_process(SERVICE, command, env, log, started)


TOPIC = "crm.pipeline.events"


def open_request(pipeline_id: str) -> pb.OpenOpportunityRequest:
    return pb.OpenOpportunityRequest(
        request_id="open-1",
        pipeline_id=pipeline_id,
        name="Renewal",
        customer_id="company-1",
        owner="ann",
        amount=pb.Money(amount="900", currency="EUR"),
        expected_close_date="2099-01-31",
    )


async def test_serve_answers_grpc_and_rest_and_keeps_its_deals_across_restarts(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    sales = grpc_auth(identity.mint("sales", subject="ann", client="console"))
    admin = grpc_auth(identity.mint("admin", subject="root", client="console"))
    grpc_port, http_port = free_port(), free_port()
    env = clean_environment(
        tmp_path,
        identity,
        CRM_PIPELINE_GRPC_PORT=str(grpc_port),
        CRM_PIPELINE_HTTP_PORT=str(http_port),
        # Conversion is not used here; nothing listens there.
        CRM_CONTACTS_GRPC_TARGET=f"127.0.0.1:{free_port()}",
    )
    target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    log = tmp_path / "serve.log"

    first = start("serve", env, log, processes)
    await wait_serving(target, base, first, log)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="crm.pipeline.v1.PipelineService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in listed for s in r.list_services_response.service}
        assert "crm.pipeline.v1.PipelineService" in services
        pipeline = await stub.DefinePipeline(
            pb.DefinePipelineRequest(
                name="Sales",
                stages=[
                    pb.StageInput(
                        stage_id=s.stage_id,
                        name=s.name,
                        probability=str(s.probability),
                        category=pb.ForecastCategory.Value(
                            "FORECAST_CATEGORY_" + s.category.upper()
                        ),
                    )
                    for s in STAGES
                ],
            ),
            metadata=admin,
        )
        opened = await stub.OpenOpportunity(open_request(pipeline.pipeline.id), metadata=sales)
    async with httpx.AsyncClient(base_url=base, headers=dict(sales)) as http:
        bad = await http.post(
            f"/opportunities/{opened.opportunity.id}/stage", json={"stage_id": "x"}
        )
        assert (bad.status_code, [d["field"] for d in bad.json()["detail"]]) == (422, ["stage_id"])
    await stop_gracefully(first, log)

    second = start("serve", env, log, processes)
    await wait_serving(target, base, second, log)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        again = await stub.OpenOpportunity(open_request(pipeline.pipeline.id), metadata=sales)
        assert (again.result.id, again.result.replayed) == (opened.result.id, True)
        forecast = await stub.GetForecast(pb.GetForecastRequest(), metadata=sales)
        assert [(r.period, r.amount.amount, r.weighted_amount.amount) for r in forecast.rows] == [
            ("2099-01", "900.00", "90.00")
        ]
    await stop_gracefully(second, log)


async def consume(bootstrap: str, wanted: set[str], timeout: float = 60.0) -> list[Any]:
    """Records of the pipeline topic about the `wanted` aggregates."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(TOPIC, p) for p in range(TOPIC_PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for part in batch.values():
                for record in part:
                    message = events_pb.PipelineEvent.FromString(record.value)
                    if message.aggregate_id in wanted:
                        records.append((record, message))
            if len(records) >= 4:
                return records
        return records
    finally:
        await consumer.stop()


async def test_the_relay_publishes_the_deals_history_keyed_by_customer(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], local_stack: Stack, identity: Identity
) -> None:
    clock = Clock()
    service = PipelineService(create_application(sqlite_settings(tmp_path)), clock=clock)
    try:
        ctx = Caller(actor="ann", client="relay-test")
        pipeline = await service.define_pipeline(ctx, "Relay", STAGES)
        opened = await service.open_opportunity(
            ctx,
            NewOpportunity(
                pipeline.outcome.id, "Deal", "company-7", "ann", "75", "EUR", "2026-03-01"
            ),
        )
        deal = opened.outcome.id
        clock.advance(days=1)
        await service.move_opportunity(ctx, deal, "negotiate")
        await service.win_opportunity(ctx, deal)
    finally:
        service.close()

    env = clean_environment(tmp_path, identity, CRM_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap)
    log = tmp_path / "relay.log"
    relay = start("relay", env, log, processes)
    deadline = time.monotonic() + 60
    while f"relay {TOPIC} starts after position 0" not in log.read_text():
        assert relay.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    try:
        records = await consume(local_stack.kafka_bootstrap, {deal, pipeline.outcome.id})
    finally:
        await stop_gracefully(relay, log)
    deal_records = [(r, m) for r, m in records if m.aggregate_id == deal]
    assert [m.WhichOneof("payload") for _, m in deal_records] == [
        "opportunity_opened",
        "opportunity_stage_changed",
        "opportunity_won",
    ]
    assert {r.key for r, _ in deal_records} == {b"company-7"}
    headers = dict(deal_records[-1][0].headers)
    assert headers["ce_type"] == b"crm.pipeline.v1.OpportunityWon"
    assert headers["ce_source"] == b"/crm/pipeline"
    # The audit trail travels with every record.
    assert (headers["crm_actor"], headers["crm_client"], headers["crm_command"]) == (
        b"ann",
        b"relay-test",
        b"WinOpportunity",
    )
    won = deal_records[-1][1].opportunity_won
    assert (won.amount.amount, won.closed_on) == ("75.00", "2026-02-03")
    (defined,) = [m for _, m in records if m.aggregate_id == pipeline.outcome.id]
    assert defined.WhichOneof("payload") == "pipeline_defined"
