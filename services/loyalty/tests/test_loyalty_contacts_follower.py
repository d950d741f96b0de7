"""Loyalty follows the contacts topic over the Kafka the tests start.

Each test publishes `crm.events.v1.ContactEvent` records the way the contacts
relay does (keyed by contact, CloudEvents headers) to topics of its own: in
process through a `ContactEventsFollower`, and as the real `crm-loyalty
follow` process, which runs it beside the ERP ingest under one stop signal and
one health endpoint. The export is served over gRPC behind the real access
gate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from loyalty_support import Clock, KnownContacts, sqlite_settings

from crm.events.v1 import contacts_pb2 as events_pb
from crm.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from crm_common.commands import Caller
from crm_common.contact_events import ContactChange, ContactEventsFollower
from crm_common.health import Heartbeat, JointHeartbeat
from crm_common.lifecycle import run_together
from crm_common.privacy import new_master_key
from crm_common.privacy.export import personal_data_service
from crm_common.relay import cloudevent_headers
from crm_common.server import AccessInterceptor
from crm_common.settings import Settings
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_deploy.testing import (
    clean_environment,
    gate_for,
    grpc_auth,
    start_process,
    stop_gracefully,
)
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.contact_changes import LoyaltyContactChanges
from crm_loyalty.inputs import Purchase, PurchaseLineInput, RulesInput

ADMIN = Caller(actor="admin-1", client="console")
ANN = "2b3c4d5e-0000-4000-8000-00000000a001"
BOB = "2b3c4d5e-0000-4000-8000-00000000b002"
DAN = "2b3c4d5e-0000-4000-8000-00000000d004"
BIRTHDAY = "05-17"


# -- publishing contacts events as the relay does ---------------------------------------------


def merged(survivor: str, *others: str, merge: str, version: int) -> events_pb.ContactEvent:
    return events_pb.ContactEvent(
        contact_id=survivor,
        version=version,
        position=version,
        actor="grace",
        contacts_merged=events_pb.ContactsMerged(merge_id=merge, merged_ids=list(others)),
    )


def undone(survivor: str, *others: str, merge: str, version: int) -> events_pb.ContactEvent:
    return events_pb.ContactEvent(
        contact_id=survivor,
        version=version,
        position=version,
        actor="grace",
        contact_merge_undone=events_pb.ContactMergeUndone(
            merge_id=merge, restored_ids=list(others)
        ),
    )


def erased(person: str, *others: str, version: int) -> events_pb.ContactEvent:
    return events_pb.ContactEvent(
        contact_id=person,
        version=version,
        position=version,
        actor="dpo",
        person_erased=events_pb.PersonErased(reference="dsr-1", merged_ids=list(others)),
    )


async def publish(bootstrap: str, topic: str, *messages: events_pb.ContactEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for message in messages:
            payload = message.WhichOneof("payload")
            ce_type = "crm.contacts.v1." + "".join(p.title() for p in payload.split("_"))
            headers = cloudevent_headers(
                ce_id=f"{message.contact_id}:{message.version}",
                ce_type=ce_type,
                source="/crm/contacts",
                subject=message.contact_id,
                time_=datetime.now(UTC),
                proto_message="crm.events.v1.ContactEvent",
                position=message.position,
            )
            await producer.send_and_wait(
                topic,
                message.SerializeToString(),
                key=message.contact_id.encode(),
                headers=headers,
            )
    finally:
        await producer.stop()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)


async def committed(bootstrap: str, group: str, records: int, task: asyncio.Task[Any]) -> None:
    """Waits until the group's committed offsets are past `records` records in all."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:

        async def check() -> bool:
            assert not task.done(), task
            try:
                offsets = await admin.list_consumer_group_offsets(group)
            except KafkaError:  # the group's coordinator is not elected yet
                return False
            done: int = sum(o.offset for o in offsets.values() if o.offset > 0)
            return done >= records

        await eventually(check, f"{records} records committed")
    finally:
        await admin.close()


def keyed_settings(data_dir: Path, master_keys: str) -> Settings:
    return dataclasses.replace(sqlite_settings(data_dir), master_keys=master_keys)


def log_length(service: LoyaltyService) -> int:
    recorder: Any = service.app.recorder
    return int(recorder.max_notification_id() or 0)


@pytest.fixture
async def loyalty(tmp_path: Path) -> AsyncIterator[LoyaltyService]:
    settings = keyed_settings(tmp_path, new_master_key("m-loyalty"))
    service = LoyaltyService(
        create_application(settings), KnownContacts(ANN, BOB, DAN), clock=Clock()
    )
    yield service
    service.close()


async def members(service: LoyaltyService) -> None:
    await service.publish_rules(ADMIN, RulesInput(rates={"EUR": "1"}))
    await service.enrol(ADMIN, DAN, "app")
    await service.earn(ADMIN, DAN, Purchase([PurchaseLineInput("1", "90", "EUR")], "till-1"))
    await service.enrol(ADMIN, BOB, "web", birthday=BIRTHDAY)
    await service.earn(ADMIN, BOB, Purchase([PurchaseLineInput("2", "40", "EUR")], "till-2"))


# -- the follower in process ---------------------------------------------------------------


async def test_merges_undos_and_erasures_from_the_contacts_topic_apply_once(
    loyalty: LoyaltyService, local_stack: Stack
) -> None:
    bootstrap = local_stack.kafka_bootstrap
    topic = f"test-{uuid.uuid4().hex[:10]}.contacts.events"
    ensure_topics(bootstrap, {topic: 3})
    group = f"loyalty-follower-{uuid.uuid4().hex[:6]}"
    await members(loyalty)
    follower = ContactEventsFollower(
        "loyalty",
        LoyaltyContactChanges(loyalty),
        bootstrap=bootstrap,
        topic=topic,
        group_id=group,
        retry_backoff=0.2,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await publish(bootstrap, topic, merged(ANN, DAN, merge="m-1", version=5))
        await committed(bootstrap, group, 1, task)
        ann = await loyalty.get_member(ANN)
        assert ann.contact_id == ANN and ann.balance.active == 90
        assert (await loyalty.get_member(DAN)).contact_id == ANN

        # The same records again (a relay that published a suffix twice): nothing new.
        length = log_length(loyalty)
        await publish(bootstrap, topic, merged(ANN, DAN, merge="m-1", version=5))
        await committed(bootstrap, group, 2, task)
        assert log_length(loyalty) == length

        await publish(
            bootstrap,
            topic,
            undone(ANN, DAN, merge="m-1", version=6),
            erased(BOB, version=9),
        )
        await committed(bootstrap, group, 4, task)
        dan = await loyalty.get_member(DAN)
        assert dan.contact_id == DAN and dan.balance.active == 90
        assert (await loyalty.get_member(ANN)).balance.active == 0
        bob = await loyalty.get_member(BOB)
        assert (bob.birthday, bob.balance.active) == ("", 40)

        length = log_length(loyalty)
        await publish(
            bootstrap,
            topic,
            undone(ANN, DAN, merge="m-1", version=6),
            erased(BOB, version=9),
        )
        await committed(bootstrap, group, 6, task)
        assert log_length(loyalty) == length
        assert follower.stats.merged == 2 and follower.stats.undone == 2
        assert follower.stats.erased == 2 and follower.stats.skipped == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# -- the export over gRPC --------------------------------------------------------------------


async def test_the_export_is_served_to_admins_over_grpc_and_refused_to_sales(
    loyalty: LoyaltyService, identity: Identity
) -> None:
    await members(loyalty)
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate_for("loyalty", identity))])
    api = personal_data_service("loyalty", loyalty.export_personal_data)
    api.add_to_server(api.servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = privacy_pb2_grpc.PersonalDataServiceStub(channel)
            admin = grpc_auth(identity.mint("admin", subject="ada"))
            sales = grpc_auth(identity.mint("sales", subject="sam"))
            request = privacy_pb2.ExportPersonalDataRequest(contact_id=BOB)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.ExportPersonalData(request, metadata=sales)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

            reply = await stub.ExportPersonalData(request, metadata=admin)
            assert reply.service == "loyalty"
            document = json.loads(reply.document_json)
            assert document["member"]["contact_id"] == BOB
            assert document["member"]["birthday"] == BIRTHDAY
            assert [lot["remaining"] for lot in document["ledger"]] == [40]
            assert document["history"][0]["event"] == "Created"

            erase = ContactChange("person_erased", BOB, (), "dsr-2", f"{BOB}:3", "dpo")
            await LoyaltyContactChanges(loyalty).person_erased(erase)
            reply = await stub.ExportPersonalData(request, metadata=admin)
            document = json.loads(reply.document_json)
            assert document["member"]["birthday"] == "[erased]"
            assert document["history"][0]["birthday"] == "[erased]"
            assert document["member"]["balance"]["active"] == 40

            none = await stub.ExportPersonalData(
                privacy_pb2.ExportPersonalDataRequest(contact_id=ANN), metadata=admin
            )
            assert json.loads(none.document_json) == {"member": None, "ledger": [], "history": []}
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await stub.ExportPersonalData(
                    privacy_pb2.ExportPersonalDataRequest(contact_id=" "), metadata=admin
                )
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)


# -- one process, two consumers -------------------------------------------------------------


def test_the_joint_heartbeat_is_healthy_only_while_both_consumers_are() -> None:
    now = [0.0]
    ingest = Heartbeat("ingest", clock=lambda: now[0])
    contacts = Heartbeat("contacts follower", clock=lambda: now[0])
    joint = JointHeartbeat("loyalty follower", [ingest, contacts])
    joint.stale_after = 30
    assert (ingest.stale_after, contacts.stale_after) == (30, 30)
    assert not joint.ready  # neither has gone round yet
    ingest.beat()
    assert not joint.ready
    contacts.beat()
    assert joint.ready and joint.alive
    ingest.lag(3)
    contacts.lag(4)
    contacts.failed("Kafka is down")
    assert joint.alive and not joint.ready
    report = joint.report()
    assert report["not_ready"] == ["contacts follower"]
    assert report["last_error"] == "contacts follower: Kafka is down"
    assert report["lag_events"] == 7
    assert [member["worker"] for member in report["members"]] == ["ingest", "contacts follower"]
    contacts.recovered()
    assert joint.report()["last_error"] is None
    now[0] = 31
    ingest.beat()
    assert not joint.alive  # the contacts follower is stuck
    assert joint.report()["status"] == "stale"


async def test_when_one_consumer_fails_the_other_is_stopped_and_the_failure_raised() -> None:
    stopped: list[str] = []

    async def steady(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.append("steady")

    async def failing(stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the consumer broke")

    with pytest.raises(RuntimeError, match="the consumer broke"):
        await asyncio.wait_for(run_together(asyncio.Event(), steady, failing), 5)
    assert stopped == ["steady"]
    stop = asyncio.Event()
    both = asyncio.create_task(run_together(stop, steady, steady))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(both, 5)


async def test_crm_loyalty_follow_runs_both_consumers_under_one_health_and_one_signal(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    local_stack: Stack,
    identity: Identity,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}.crm"
    contacts_topic = f"{prefix}.contacts.events"
    ensure_topics(
        local_stack.kafka_bootstrap,
        {contacts_topic: 3, f"{prefix}.erp.orders": 3, f"{prefix}.erp.orders.dead-letter": 1},
    )
    keys = new_master_key("m-loyalty")
    data_dir = tmp_path / "loyalty"
    settings = keyed_settings(data_dir, keys)
    service = LoyaltyService(create_application(settings), KnownContacts(ANN, BOB, DAN))
    try:
        await members(service)
    finally:
        service.close()
    health = free_port()
    env = clean_environment(
        data_dir,
        identity,
        CRM_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap,
        CRM_TOPIC_PREFIX=prefix,
        CRM_MASTER_KEYS=keys,
        CRM_HEALTH_PORT=str(health),
        CRM_CONTACTS_GRPC_TARGET=f"127.0.0.1:{free_port()}",
    )
    log = tmp_path / "follow.log"
    process = start_process("loyalty", "follow", env, log, processes)

    def probe(path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}{path}", timeout=2) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except (urllib.error.URLError, ConnectionError):
            return 0, {}

    async def ready() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        status, _ = await asyncio.to_thread(probe, "/readyz")
        return status == 200

    await eventually(ready, "both consumers ready", timeout=90)
    _, body = await asyncio.to_thread(probe, "/healthz")
    workers = [member["worker"] for member in body["members"]]
    assert len(workers) == 2 and any("contacts" in w for w in workers), body
    assert "ingest" in body and "contacts_follower" in body
    assert body["ready"] is True and body["last_error"] is None
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=2) as reply:
        page = reply.read().decode()
    assert f'crm_worker_up{{worker="{body["worker"]}"}} 1.0' in page

    await publish(
        local_stack.kafka_bootstrap, contacts_topic, merged(ANN, DAN, merge="m-9", version=4)
    )

    async def moved() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        reader = LoyaltyService(create_application(settings), KnownContacts())
        try:
            member = await reader.get_member(DAN)
            return bool(member.contact_id == ANN)
        finally:
            reader.close()

    await eventually(moved, "DAN's membership moved onto ANN")
    await stop_gracefully(process, log)
