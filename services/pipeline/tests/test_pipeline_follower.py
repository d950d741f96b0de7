"""`crm-pipeline follow` honours merges and erasures from the contacts topic,
as a real process over the Kafka the tests start.

The test publishes `crm.events.v1.ContactEvent` records the way the contacts
relay does (keyed by contact, CloudEvents headers) to a topic of its own
prefix; the process works on a pipeline store (SQLite, with master keys) in
the test's directory, which the test reads afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka import AIOKafkaProducer
from pipeline_support import STAGES, Clock

from crm.events.v1 import contacts_pb2 as events_pb
from crm_common.commands import Caller
from crm_common.privacy import REDACTED, new_master_key
from crm_common.relay import cloudevent_headers
from crm_common.settings import Settings
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_deploy.testing import clean_environment, start_process, stop_gracefully
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.inputs import NewActivity, NewOpportunity, OpportunityQuery

CALLER = Caller(actor="ann", client="follower-test")
TITLE = "Ring Augusta about the engine"


def settings_of(tmp_path: Path, master: str) -> Settings:
    return Settings(
        service="pipeline",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
        master_keys=master,
    )


async def publish(bootstrap: str, topic: str, *messages: events_pb.ContactEvent) -> None:
    """Publishes like the contacts relay: keyed by contact, CloudEvents headers."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for message in messages:
            payload = message.WhichOneof("payload")
            assert payload is not None
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
                topic, message.SerializeToString(), key=message.contact_id.encode(), headers=headers
            )
    finally:
        await producer.stop()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.2)


async def test_the_follow_process_moves_a_merged_contacts_deals_and_erases_a_person(
    tmp_path: Path, local_stack: Stack, processes: list[subprocess.Popen[bytes]]
) -> None:
    master = new_master_key("m-follow")
    settings = settings_of(tmp_path, master)
    survivor, merged, erased = (f"person-{uuid.uuid4().hex[:8]}" for _ in range(3))
    clock = Clock()
    writer = PipelineService(create_application(settings), clock=clock)
    try:
        pipeline_id = (await writer.define_pipeline(CALLER, "Direct", STAGES)).outcome.id

        async def deal(customer: str, name: str) -> str:
            new = NewOpportunity(pipeline_id, name, customer, "ann", "1000", "EUR", "2026-05-31")
            return str((await writer.open_opportunity(CALLER, new)).outcome.id)

        moved = await deal(merged, "Twin's deal")
        kept = await deal(erased, "Augusta's deal")
        due = clock() + timedelta(days=1)
        call = NewActivity("opportunity", kept, "call", TITLE, "ann", due)
        activity_id = (await writer.schedule_activity(CALLER, call)).outcome.id
    finally:
        writer.close()

    prefix = f"test-{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}.contacts.events"
    env = clean_environment(
        tmp_path,
        CRM_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap,
        CRM_TOPIC_PREFIX=prefix,
        CRM_MASTER_KEYS=master,
    )
    log = tmp_path / "follow.log"
    process = start_process("pipeline", "follow", env, log, processes)
    await asyncio.to_thread(ensure_topics, local_stack.kafka_bootstrap, {topic: 3})
    await publish(
        local_stack.kafka_bootstrap,
        topic,
        events_pb.ContactEvent(
            contact_id=survivor,
            version=5,
            position=11,
            actor="root",
            contacts_merged=events_pb.ContactsMerged(merge_id="merge-9", merged_ids=[merged]),
        ),
        events_pb.ContactEvent(
            contact_id=erased,
            version=3,
            position=12,
            actor="root",
            person_erased=events_pb.PersonErased(reference="dsr-9"),
        ),
    )

    reader = PipelineService(create_application(settings), clock=clock)
    try:

        async def honoured() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            page = await reader.list_opportunities(OpportunityQuery(customer_id=survivor))
            activity = await reader.get_activity(activity_id)
            return [d.id for d in page.opportunities] == [moved] and activity.title == REDACTED

        await eventually(honoured, "the merge and the erasure honoured")
    finally:
        reader.close()
    # A process that never held the erased person's key (the reader's cache keeps
    # a key it read for up to CRM_KEY_CACHE_TTL_SECONDS).
    fresh = PipelineService(create_application(settings), clock=clock)
    try:
        assert (await fresh.get_opportunity(kept)).name == REDACTED
        assert (await fresh.get_opportunity(moved)).name == "Twin's deal"
        assert (await fresh.get_opportunity(moved)).customer_id == survivor
    finally:
        fresh.close()
    await stop_gracefully(process, log)
    text = log.read_text()
    assert "1 persons erased, 1 merges, 0 undone" in text
