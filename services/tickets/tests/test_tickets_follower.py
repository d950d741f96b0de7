"""Tickets follows the contacts topic over the Kafka the tests start: merges,
their undo and erasures published the way the contacts relay publishes them
reach the cases, each once, whether the follower runs in process or as
`crm-tickets follow`; and the export of a person's cases over gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
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
from tickets_support import Clock, KnownContacts, sqlite_settings

from crm.events.v1 import contacts_pb2 as events_pb
from crm.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from crm_common.commands import Caller
from crm_common.contact_events import ContactEventsFollower
from crm_common.privacy import REDACTED, new_master_key
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
    stored_rows,
)
from crm_tickets.application import TicketsService, create_application
from crm_tickets.contact_changes import TicketsContactChanges
from crm_tickets.inputs import NewCase, SurveyInput

PARTITIONS = 3
AGENT = Caller(actor="agent-7", client="tests")
SURVIVOR, MERGED, ERASED = (str(uuid.uuid4()) for _ in range(3))
MERGE = "merge-7f3a"


def keyed_settings(tmp_path: Path, master_keys: str) -> Settings:
    return dataclasses.replace(sqlite_settings(tmp_path), master_keys=master_keys)


@pytest.fixture
def master_keys() -> str:
    return new_master_key("m-follow")


@pytest.fixture
async def tickets(tmp_path: Path, master_keys: str) -> AsyncIterator[TicketsService]:
    service = TicketsService(
        create_application(keyed_settings(tmp_path, master_keys)),
        KnownContacts(SURVIVOR, MERGED, ERASED),
        clock=Clock(),
    )
    yield service
    service.close()


# -- publishing contacts events as the relay does --------------------------------------


def contact_event(contact_id: str, version: int, **payload: Any) -> events_pb.ContactEvent:
    return events_pb.ContactEvent(
        contact_id=contact_id,
        version=version,
        position=version,
        actor="marketer-2",
        client="crm-contacts",
        **payload,
    )


def merge_of(survivor: str, merged: str, version: int = 5) -> events_pb.ContactEvent:
    return contact_event(
        survivor,
        version,
        contacts_merged=events_pb.ContactsMerged(merge_id=MERGE, merged_ids=[merged]),
    )


def undo_of(survivor: str, restored: str, version: int = 6) -> events_pb.ContactEvent:
    return contact_event(
        survivor,
        version,
        contact_merge_undone=events_pb.ContactMergeUndone(merge_id=MERGE, restored_ids=[restored]),
    )


def erase_of(person: str, *merged: str, version: int = 9) -> events_pb.ContactEvent:
    return contact_event(
        person,
        version,
        person_erased=events_pb.PersonErased(reference="erase-1", merged_ids=list(merged)),
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


async def committed(bootstrap: str, group: str, records: int) -> None:
    """Waits until the group's committed offsets are past `records` records in all."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:

        async def check() -> bool:
            try:
                offsets = await admin.list_consumer_group_offsets(group)
            except KafkaError:  # the group's coordinator is not elected yet
                return False
            return sum(o.offset for o in offsets.values() if o.offset > 0) >= records

        await eventually(check, f"{records} records committed by {group}")
    finally:
        await admin.close()


def log_length(service: TicketsService) -> int:
    recorder: Any = service.app.recorder
    return int(recorder.max_notification_id() or 0)


async def customer_ids(service: TicketsService, customer: str) -> list[str]:
    return [c.id for c in (await service.customer_cases(customer)).cases]


async def case_of(service: TicketsService, customer: str, subject: str) -> str:
    new = NewCase(customer, "email", subject, f"{subject}, in detail", team="support")
    case_id = (await service.open_case(AGENT, new)).outcome.id
    await service.reply_to_case(AGENT, case_id, "agent", f"About {subject}")
    return case_id


# -- the tests -------------------------------------------------------------------------


async def test_merges_undo_and_erasures_from_the_topic_reach_the_cases_once(
    tickets: TicketsService, local_stack: Stack
) -> None:
    moved = await case_of(tickets, MERGED, "Mirabel Oakhurst lost her card")
    kept = await case_of(tickets, SURVIVOR, "Mirabel Oakhurst moved house")
    gone = await case_of(tickets, ERASED, "Theodric Vane wants a refund")
    topic = f"test-{uuid.uuid4().hex[:10]}.contacts.events"
    ensure_topics(local_stack.kafka_bootstrap, {topic: PARTITIONS})
    group = f"tickets-follower-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    follower = ContactEventsFollower(
        "tickets",
        TicketsContactChanges(tickets),
        bootstrap=local_stack.kafka_bootstrap,
        topic=topic,
        group_id=group,
        retry_backoff=0.2,
    )
    task = asyncio.create_task(follower.run(stop))
    try:
        # An event tickets has nothing to do with is passed over undecoded.
        registered = contact_event(SURVIVOR, 1, person_registered=events_pb.PersonRegistered())
        await publish(local_stack.kafka_bootstrap, topic, registered, merge_of(SURVIVOR, MERGED))
        await committed(local_stack.kafka_bootstrap, group, 2)
        assert sorted(await customer_ids(tickets, SURVIVOR)) == sorted([moved, kept])
        assert await customer_ids(tickets, MERGED) == []

        length = log_length(tickets)
        await publish(local_stack.kafka_bootstrap, topic, merge_of(SURVIVOR, MERGED))
        await committed(local_stack.kafka_bootstrap, group, 3)
        assert log_length(tickets) == length

        await publish(
            local_stack.kafka_bootstrap, topic, undo_of(SURVIVOR, MERGED), erase_of(ERASED)
        )
        await committed(local_stack.kafka_bootstrap, group, 5)
        assert await customer_ids(tickets, SURVIVOR) == [kept]
        assert await customer_ids(tickets, MERGED) == [moved]
        assert (await tickets.get_case(gone)).subject == REDACTED
        assert (await tickets.get_case(kept)).subject == "Mirabel Oakhurst moved house"
        assert (follower.stats.merged, follower.stats.undone, follower.stats.erased) == (2, 1, 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not task.exception()


async def test_the_follow_process_erases_and_stops_gracefully(
    tmp_path: Path,
    master_keys: str,
    local_stack: Stack,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    settings = keyed_settings(tmp_path, master_keys)
    service = TicketsService(create_application(settings), KnownContacts(ERASED), clock=Clock())
    try:
        case_id = await case_of(service, ERASED, "Theodric Vane wants a refund")
    finally:
        service.close()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    env = clean_environment(
        tmp_path,
        CRM_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap,
        CRM_TOPIC_PREFIX=prefix,
        CRM_MASTER_KEYS=master_keys,
    )
    topic = f"{prefix}.contacts.events"
    await asyncio.to_thread(ensure_topics, local_stack.kafka_bootstrap, {topic: PARTITIONS})
    await publish(local_stack.kafka_bootstrap, topic, erase_of(ERASED, MERGED))
    log = tmp_path / "follow.log"
    follow = start_process("tickets", "follow", env, log, processes)

    async def destroyed() -> bool:
        assert follow.poll() is None, log.read_text()[-3000:]
        rows = stored_rows(settings, ["privacy_data_keys"])["privacy_data_keys"]
        return {r["subject_id"] for r in rows if r["destroyed_at"] is not None} == {ERASED, MERGED}

    await eventually(destroyed, "the keys of the erased person and the merged contact destroyed")
    await stop_gracefully(follow, log)
    again = TicketsService(create_application(settings), KnownContacts(), clock=Clock())
    try:
        case = await again.get_case(case_id)
        assert (case.subject, [m.body for m in case.messages]) == (REDACTED, [REDACTED])
    finally:
        again.close()


@pytest.fixture
async def privacy_stub(
    tickets: TicketsService, identity: Identity
) -> AsyncIterator[privacy_pb2_grpc.PersonalDataServiceStub]:
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate_for("tickets", identity))])
    api = personal_data_service("tickets", tickets.export_personal_data)
    api.add_to_server(api.servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield privacy_pb2_grpc.PersonalDataServiceStub(channel)  # type: ignore[no-untyped-call]
    await server.stop(None)


async def test_an_admin_exports_a_persons_cases_with_their_whole_history(
    tickets: TicketsService,
    privacy_stub: privacy_pb2_grpc.PersonalDataServiceStub,
    identity: Identity,
) -> None:
    case_id = await case_of(tickets, SURVIVOR, "Mirabel Oakhurst lost her card")
    await tickets.reply_to_case(AGENT, case_id, "customer", "Mirabel here: found it")
    await tickets.add_internal_note(AGENT, case_id, "Oakhurst sounded relieved")
    await tickets.change_case_status(AGENT, case_id, "solved")
    await tickets.record_satisfaction(AGENT, case_id, SurveyInput(5, None, 10, "Lovely, Mirabel"))
    await case_of(tickets, MERGED, "Someone else's case")
    request = privacy_pb2.ExportPersonalDataRequest(contact_id=SURVIVOR)

    answer = await privacy_stub.ExportPersonalData(
        request, metadata=grpc_auth(identity.mint("admin", subject="dpo-1"))
    )

    assert answer.service == "tickets"
    document = json.loads(answer.document_json)
    [exported] = document["cases"]
    assert exported["case"]["id"] == case_id
    assert exported["case"]["subject"] == "Mirabel Oakhurst lost her card"
    assert exported["case"]["status"] == "solved"
    history = [(e["event"], e.get("body") or e.get("comment") or "") for e in exported["history"]]
    assert history == [
        ("Opened", ""),
        ("Replied", "About Mirabel Oakhurst lost her card"),
        ("Replied", "Mirabel here: found it"),
        ("NoteAdded", "Oakhurst sounded relieved"),
        ("StatusChanged", ""),
        ("SatisfactionRecorded", "Lovely, Mirabel"),
    ]
    assert exported["history"][0]["description"] == "Mirabel Oakhurst lost her card, in detail"
    assert exported["history"][-1]["nps"] == 10
    assert "Someone else" not in answer.document_json

    keys = tickets.app.personal_data_keys
    assert keys is not None and keys.destroy(SURVIVOR)
    erased = await privacy_stub.ExportPersonalData(
        request, metadata=grpc_auth(identity.mint("admin", subject="dpo-1"))
    )
    assert "Mirabel" not in erased.document_json
    assert json.loads(erased.document_json)["cases"][0]["case"]["subject"] == REDACTED

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await privacy_stub.ExportPersonalData(
            request, metadata=grpc_auth(identity.mint("sales", subject="ann"))
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await privacy_stub.ExportPersonalData(
            privacy_pb2.ExportPersonalDataRequest(contact_id=" "),
            metadata=grpc_auth(identity.mint("admin", subject="dpo-1")),
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
