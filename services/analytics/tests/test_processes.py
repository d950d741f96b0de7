"""`crm-analytics serve|project|rebuild` as real processes over the real servers.

These use the service's real topics, `crm.contacts.events` and
`crm.pipeline.events` (under a prefix of their own); every test reads into a
database of its own, and `published` / `published_deals` list everything on
the topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pipeline_events as deals
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import TopicAlreadyExistsError
from contact_events import (
    comparable,
    create_topic,
    interaction,
    person_registered,
    publish,
    story,
)
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pipeline_events import deal_story
from pymongo.database import Database

from crm.contacts.v1 import contacts_pb2
from crm.customer360.v1 import customer360_pb2, customer360_pb2_grpc
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.store import PROJECTION, sources
from crm_common.projection import stored_offsets
from crm_deploy.process import free_port
from crm_deploy.testing import bearer, grpc_auth

# The processes here run on a topic prefix of their own, so nothing else the
# session publishes to crm.contacts.events reaches them (and vice versa).
TOPIC_PREFIX = f"t{uuid.uuid4().hex[:8]}.crm"
TOPIC = f"{TOPIC_PREFIX}.contacts.events"
PIPELINE_TOPIC = f"{TOPIC_PREFIX}.pipeline.events"


@pytest.fixture(scope="module")
async def published(analytics_servers) -> list[Any]:
    """Everything on the real topic; a big story, so a projector can be killed mid-way."""
    # Every source's topic must exist for `project` to start; only these two get events.
    for source in sources():
        with contextlib.suppress(TopicAlreadyExistsError):
            await create_topic(analytics_servers.kafka_bootstrap, f"{TOPIC_PREFIX}.{source}.events")
    events = story(seed=10, persons=300, companies=30, steps=3000)
    await publish(analytics_servers.kafka_bootstrap, TOPIC, events)
    return events


@pytest.fixture(scope="module")
async def published_deals(analytics_servers, published) -> list[Any]:
    """Everything on the real pipeline topic: deals of the story's customers."""
    with contextlib.suppress(TopicAlreadyExistsError):
        await create_topic(analytics_servers.kafka_bootstrap, PIPELINE_TOPIC)
    customers = sorted({e.contact_id for e in published})[:200]
    events = deal_story(seed=10, customers=customers, steps=1500)
    await deals.publish(analytics_servers.kafka_bootstrap, PIPELINE_TOPIC, events)
    return events


def env_for(servers: Any, database: Database[Any], tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        CRM_MONGO_URL=servers.mongo_url,
        CRM_MONGO_DB=database.name,
        CRM_KAFKA_BOOTSTRAP=servers.kafka_bootstrap,
        CRM_DATA_DIR=str(tmp_path),
        CRM_TOPIC_PREFIX=TOPIC_PREFIX,
        CRM_LOG_LEVEL="INFO",
    )
    # The session's identity: the API trusts its keys, the tests mint its tokens.
    env.update(servers.identity.env())
    env.update(extra)
    return env


def start(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "crm_analytics.main", command],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        # The fixtures created the topics with create_topic's three partitions.
        return await consumer.end_offsets(
            [TopicPartition(t, p) for t in (TOPIC, PIPELINE_TOPIC) for p in range(3)]
        )
    finally:
        await consumer.stop()


async def until(
    predicate: Any, timeout: float, what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            state = "exited" if process.poll() is not None else "timed out"
            raise AssertionError(f"{state} waiting for {what}:\n{log.read_text()[-4000:]}")
        await asyncio.sleep(0.05)


def documents(database: Database[Any]) -> dict[str, Any]:
    return {d["_id"]: comparable(d) for d in database.customer360.find()}


async def test_a_projector_killed_mid_stream_resumes_exactly(
    analytics_servers, published, published_deals, database, tmp_path, processes
):
    env = env_for(analytics_servers, database, tmp_path)
    log = tmp_path / "project.log"
    total = len(published) + len(published_deals)
    killed_at = []
    for _ in range(2):
        before = sum(stored_offsets(database, PROJECTION).values())
        projector = start("project", env, log)
        processes.append(projector)
        await until(
            lambda b=before: sum(stored_offsets(database, PROJECTION).values()) > b,
            30,
            "the projector to commit a batch",
            projector,
            log,
        )
        projector.send_signal(signal.SIGKILL)
        projector.wait(10)
        killed_at.append(sum(stored_offsets(database, PROJECTION).values()))
    assert killed_at[0] < total, "the first kill should land mid-stream"

    ends = await end_offsets(analytics_servers.kafka_bootstrap)
    health_port = free_port()
    projector = start("project", {**env, "CRM_HEALTH_PORT": str(health_port)}, log)
    processes.append(projector)
    await until(
        lambda: stored_offsets(database, PROJECTION) == ends,
        60,
        "the projector to catch up",
        projector,
        log,
    )
    # Its liveness endpoint reports the work it did since it started.
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{health_port}/healthz", timeout=5)
    assert health.status_code == 200, health.text
    report = health.json()
    assert (report["status"], report["projection"]) == ("ok", PROJECTION)
    assert report["records"] > 0 and report["batches"] > 0
    assert report["last_error"] is None
    projector.send_signal(signal.SIGTERM)
    assert projector.wait(10) == 0, log.read_text()
    assert documents(database) == deals.expected_documents(published, published_deals)
    assert database.projection_dead_letters.count_documents({}) == 0


async def test_rebuild_replaces_the_view_and_reports_what_it_did(
    analytics_servers, published, published_deals, database, tmp_path
):
    env = env_for(analytics_servers, database, tmp_path)
    # Something stale that the rebuild must throw away.
    database.customer360.insert_one({"_id": "stale", "kind": "person"})
    database.customer360_pipelines.insert_one({"_id": "stale", "name": "Old"})
    database.audit.insert_one({"_id": "stale", "customer_id": "stale", "actor": "mallory"})
    first = subprocess.run(
        [sys.executable, "-m", "crm_analytics.main", "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    expected = deals.expected_documents(published, published_deals)
    events = len(published) + len(published_deals)
    assert f"{events} events, {len(expected)} documents, 0 dead letters" in first.stdout
    assert documents(database) == expected
    assert any(d.get("deals") for d in expected.values())
    # The audit trail is rebuilt too: one entry per event (a redelivery is the same event).
    distinct = {(e.contact_id, e.position) for e in published} | {
        (e.aggregate_id, e.version) for e in published_deals
    }
    assert database.audit.count_documents({}) == len(distinct)
    assert database.audit.count_documents({"actor": "mallory"}) == 0
    assert {p["_id"]: p for p in database.customer360_pipelines.find()} == (
        deals.expected_pipelines(published_deals)
    )
    assert stored_offsets(database, PROJECTION) == await end_offsets(
        analytics_servers.kafka_bootstrap
    )


@pytest.fixture
async def service(
    analytics_servers, published, published_deals, database, tmp_path, processes
) -> AsyncIterator[dict[str, Any]]:
    grpc_port, http_port = free_port(), free_port()
    env = env_for(
        analytics_servers,
        database,
        tmp_path,
        CRM_ANALYTICS_GRPC_PORT=str(grpc_port),
        CRM_ANALYTICS_HTTP_PORT=str(http_port),
    )
    server = start("serve", env, tmp_path / "serve.log")
    projector = start("project", env, tmp_path / "project.log")
    processes.extend([server, projector])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
        await asyncio.sleep(0.1)
    yield {
        "stub": customer360_pb2_grpc.Customer360ServiceStub(channel),
        "http": f"http://127.0.0.1:{http_port}",
        "grpc": f"127.0.0.1:{grpc_port}",
        "server": server,
        "projector": projector,
    }
    await channel.close()


async def test_the_service_answers_over_grpc_and_http_and_stops_cleanly(
    analytics_servers, published, published_deals, database, tmp_path, service
):
    stub = service["stub"]
    sales = grpc_auth(analytics_servers.identity.mint("sales"))
    headers = bearer(analytics_servers.identity.mint("sales"))
    # Wait for the last events of the story's customer, like a writer would.
    last = published[-1]
    wait_for = {"contacts": last.position}
    customer_deals = [e for e in published_deals if e.customer_id == last.contact_id]
    if customer_deals:
        wait_for["pipeline"] = customer_deals[-1].position
    reply = await stub.GetCustomer360(
        customer360_pb2.GetCustomer360Request(
            customer_id=last.contact_id, wait_for=wait_for, wait_timeout_ms=30_000
        ),
        timeout=30,
        metadata=sales,
    )
    view = reply.customer
    assert view.customer_id == last.contact_id
    assert dict(view.positions) == wait_for
    expected = deals.expected_documents(published, published_deals)[last.contact_id]
    assert view.display_name == expected["display_name"]
    assert [e.entry_id for e in view.timeline] == [e["entry_id"] for e in expected["timeline"]]
    assert [(d.opportunity_id, d.amount.amount) for d in view.deals] == [
        (d["opportunity_id"], d["amount"]) for d in expected.get("deals", [])
    ]
    assert (
        view.updated_at.ToDatetime().isoformat()
        == expected["updated_at"].replace(tzinfo=None).isoformat()
    )

    # A new customer, then read-your-writes through the whole running service.
    zoe = [person_registered("zoe", 100_000), interaction("zoe", 100_001, "zoe-1", "first call")]
    await publish(analytics_servers.kafka_bootstrap, TOPIC, zoe)
    published.extend(zoe)
    reply = await stub.GetCustomer360(
        customer360_pb2.GetCustomer360Request(
            customer_id="zoe", wait_for={"contacts": 100_001}, wait_timeout_ms=10_000
        ),
        timeout=15,
        metadata=sales,
    )
    assert reply.customer.kind == contacts_pb2.CONTACT_KIND_PERSON
    assert reply.customer.timeline[0].summary == "first call"
    assert reply.customer.timeline[0].channel == contacts_pb2.CHANNEL_PHONE
    assert reply.customer.channels[0].consent.status == contacts_pb2.CONSENT_STATUS_GRANTED
    assert reply.customer.custom_fields["budget"].currency == "EUR"

    async with httpx.AsyncClient(base_url=service["http"], headers=headers) as http:
        view = await http.get("/customers/zoe/360", params={"wait_for": "contacts:100001"})
        assert view.status_code == 200
        assert view.json()["display_name"] == "Ada Lovelace"
        assert (await http.get("/customers/nobody/360")).status_code == 404
        slow = await http.get("/customers/zoe/360?wait_for=contacts:999999&timeout_ms=100")
        assert slow.status_code == 504

    # A deal of the new customer, won: read-your-writes on the pipeline's position.
    zoe_deals = [
        deals.opened("zoe", 100_000, "zoe-d1", "4999.90", name="Engine"),
        deals.won("zoe", 100_001, "zoe-d1", 2, "4999.90"),
    ]
    await deals.publish(analytics_servers.kafka_bootstrap, PIPELINE_TOPIC, zoe_deals)
    published_deals.extend(zoe_deals)
    # The stage names come from the pipeline's own partition, in no fixed
    # order relative to the deals: wait until the definition is applied.
    await until(
        lambda: database.customer360_pipelines.find_one({"_id": deals.PIPELINE}) is not None,
        30,
        "the pipeline definition to be applied",
        service["projector"],
        tmp_path / "project.log",
    )
    reply = await stub.GetCustomer360(
        customer360_pb2.GetCustomer360Request(
            customer_id="zoe", wait_for={"pipeline": 100_001}, wait_timeout_ms=10_000
        ),
        timeout=15,
        metadata=sales,
    )
    [deal] = reply.customer.deals
    assert (deal.opportunity_id, deal.name) == ("zoe-d1", "Engine")
    assert deal.status == pipeline_pb2.OPPORTUNITY_STATUS_WON
    assert (deal.stage_id, deal.pipeline_name) == ("won", "Sales")
    assert [(m.amount, m.currency) for m in reply.customer.lifetime_won_revenue] == [
        ("4999.90", "EUR")
    ]
    async with httpx.AsyncClient(base_url=service["http"], headers=headers) as http:
        view = (await http.get("/customers/zoe/360", params={"wait_for": "pipeline:100001"})).json()
        assert view["deals"][0]["amount"] == {"amount": "4999.90", "currency": "EUR"}
        assert view["lifetime_won_revenue"] == [{"amount": "4999.90", "currency": "EUR"}]

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetCustomer360(
            customer360_pb2.GetCustomer360Request(customer_id="nobody"), metadata=sales
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as slow_rpc:
        await stub.GetCustomer360(
            customer360_pb2.GetCustomer360Request(
                customer_id="zoe", wait_for={"contacts": 999_999}, wait_timeout_ms=200
            ),
            metadata=sales,
        )
    assert slow_rpc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.GetCustomer360(
            customer360_pb2.GetCustomer360Request(
                customer_id="zoe", wait_for={"contacts": 1}, wait_timeout_ms=60_000
            ),
            metadata=sales,
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = dict(invalid.value.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["wait_timeout_ms"]

    for process in (service["server"], service["projector"]):
        process.send_signal(signal.SIGTERM)
    assert service["projector"].wait(15) == 0
    # A graceful stop: both servers drained, the store closed, exit status 0.
    assert service["server"].wait(15) == 0


async def test_a_projector_stuck_on_the_document_store_reports_stale_until_it_moves_again(
    analytics_servers, database, tmp_path, processes
):
    """The liveness probe's view of a hang: with the document store frozen
    (SIGSTOP: connections stay open, nothing answers), the projector's write
    never returns, its loop stops going round, and /healthz turns 503 after
    CRM_HEALTH_STALE_SECONDS; once the store answers again, it is 200 again
    and nothing was lost."""
    prefix = f"t{uuid.uuid4().hex[:8]}.crm"
    for service in sources():
        await create_topic(analytics_servers.kafka_bootstrap, f"{prefix}.{service}.events")
    events = story(seed=31, persons=30, companies=4, steps=120)
    first, rest = events[:60], events[60:]
    health_port = free_port()
    env = env_for(
        analytics_servers,
        database,
        tmp_path,
        CRM_TOPIC_PREFIX=prefix,
        CRM_HEALTH_PORT=str(health_port),
        CRM_HEALTH_STALE_SECONDS="3",
    )
    log = tmp_path / "project.log"
    projector = start("project", env, log)
    processes.append(projector)
    await publish(analytics_servers.kafka_bootstrap, f"{prefix}.contacts.events", first)
    await until(
        lambda: sum(stored_offsets(database, PROJECTION).values()) == len(first),
        60,
        "the first events",
        projector,
        log,
    )
    url = f"http://127.0.0.1:{health_port}/healthz"

    async def health_until(status: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                reply = await http.get(url, timeout=5)
                if reply.status_code == status:
                    return dict(reply.json())
                assert projector.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (status, reply.status_code, reply.text)
                await asyncio.sleep(0.2)

    # Idle but going round: alive, though nothing arrives.
    await asyncio.sleep(4)
    assert (await health_until(200, 5))["records"] == len(first)

    store = psutil.Process(analytics_servers.process("secantus").pid)
    store.suspend()
    try:
        await publish(analytics_servers.kafka_bootstrap, f"{prefix}.contacts.events", rest)
        stale = await health_until(503, 30)
        assert stale["status"] == "stale" and stale["seconds_since_beat"] >= 3
    finally:
        store.resume()
    fresh = await health_until(200, 60)
    assert fresh["status"] == "ok"
    await until(
        lambda: sum(stored_offsets(database, PROJECTION).values()) == len(events),
        60,
        "the rest of the events",
        projector,
        log,
    )
    projector.send_signal(signal.SIGTERM)
    assert projector.wait(15) == 0, log.read_text()[-3000:]
