"""Contacts follow the pipeline's won deals, over the Kafka the tests start.

Each test publishes `crm.events.v1.PipelineEvent` records the way the
pipeline's relay does (key, CloudEvents headers) to a topic of its own, and
runs the follower (in process, or `crm-contacts follow` as a real process)
against a contacts event store in its temporary directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from contacts_support import log_length, sqlite_settings

from crm.events.v1 import pipeline_pb2 as events_pb
from crm.pipeline.v1 import pipeline_pb2 as pipeline_pb
from crm_common.commands import Caller
from crm_common.relay import cloudevent_headers
from crm_contacts.application import ContactsService, create_application
from crm_contacts.follower import OpportunityFollower
from crm_contacts.inputs import NewCompany, NewPerson, PersonChanges
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_deploy.testing import clean_environment, start_process, stop_gracefully

PARTITIONS = 3
GRACE = Caller(actor="grace", client="follower-test")


# -- publishing pipeline events as the relay does ------------------------------------


def won(
    deal: str, *, person: str = "", company: str = "", version: int = 4, actor: str = "ann"
) -> events_pb.PipelineEvent:
    return events_pb.PipelineEvent(
        customer_id=company or person,
        aggregate_id=deal,
        version=version,
        position=version,
        actor=actor,
        client="crm-pipeline",
        opportunity_won=events_pb.OpportunityWon(
            stage_id="won",
            person_id=person,
            company_id=company,
            amount=pipeline_pb.Money(amount="1200.00", currency="EUR"),
            closed_on="2026-03-02",
        ),
    )


def opened(deal: str, *, person: str = "", company: str = "") -> events_pb.PipelineEvent:
    return events_pb.PipelineEvent(
        customer_id=company or person,
        aggregate_id=deal,
        version=1,
        position=1,
        opportunity_opened=events_pb.OpportunityOpened(
            pipeline_id="sales", stage_id="qualify", name="Deal", person_id=person
        ),
    )


async def publish(bootstrap: str, topic: str, *messages: events_pb.PipelineEvent | bytes) -> None:
    """Publishes like the relay: keyed by customer, CloudEvents headers; bytes as they are."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for message in messages:
            if isinstance(message, bytes):
                headers = [("ce_type", b"crm.pipeline.v1.OpportunityWon")]
                await producer.send_and_wait(topic, message, key=b"garbage", headers=headers)
                continue
            payload = message.WhichOneof("payload")
            ce_type = "crm.pipeline.v1." + "".join(p.title() for p in payload.split("_"))
            key = message.customer_id or message.aggregate_id
            headers = cloudevent_headers(
                ce_id=f"{message.aggregate_id}:{message.version}",
                ce_type=ce_type,
                source="/crm/pipeline",
                subject=key,
                time_=datetime.now(UTC),
                proto_message="crm.events.v1.PipelineEvent",
                position=message.position,
            )
            await producer.send_and_wait(
                topic, message.SerializeToString(), key=key.encode(), headers=headers
            )
    finally:
        await producer.stop()


def new_topic(stack: Stack) -> str:
    topic = f"test-{uuid.uuid4().hex[:10]}.pipeline.events"
    ensure_topics(stack.kafka_bootstrap, {topic: PARTITIONS})
    return topic


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)


# -- running a follower in process ---------------------------------------------------------


class Running:
    """A follower running as a task until `stop()`."""

    def __init__(self, follower: OpportunityFollower) -> None:
        self.follower = follower
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(follower.run(self._stop))

    async def handled(self, records: int, timeout: float = 60) -> None:
        """Waits until the group's committed offsets are past `records` records in all."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.follower.bootstrap)
        await admin.start()
        try:

            async def check() -> bool:
                assert not self._task.done(), self._task
                try:
                    committed = await admin.list_consumer_group_offsets(self.follower.group_id)
                except KafkaError:  # the group's coordinator is not elected yet
                    return False
                return sum(o.offset for o in committed.values() if o.offset > 0) >= records

            await eventually(check, f"{records} records committed", timeout)
        finally:
            await admin.close()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 30)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ContactsService]:
    contacts = ContactsService(create_application(sqlite_settings(tmp_path)))
    yield contacts
    contacts.close()


@pytest.fixture
async def follow(
    service: ContactsService, local_stack: Stack
) -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(topic: str, group: str, on: ContactsService | None = None) -> Running:
        running = Running(
            OpportunityFollower(
                on or service,
                bootstrap=local_stack.kafka_bootstrap,
                topic=topic,
                group_id=group,
                retry_backoff=0.2,
            )
        )
        started.append(running)
        return running

    yield start
    for running in started:
        if not running._task.done():
            await running.stop()


async def person_at(service: ContactsService, stage: str) -> str:
    written = await service.create_person(
        GRACE, NewPerson(given_name="Ada", family_name=uuid.uuid4().hex[:6], lifecycle_stage=stage)
    )
    return written.outcome.id


async def company_at(service: ContactsService, stage: str) -> str:
    written = await service.create_company(
        GRACE, NewCompany(name=f"Engines {uuid.uuid4().hex[:6]}", lifecycle_stage=stage)
    )
    return written.outcome.id


async def stage_and_version(service: ContactsService, contact_id: str) -> tuple[str, int]:
    contact = await service.get_contact(contact_id)
    return str(contact.profile.lifecycle_stage), contact.version


def stored_events(service: ContactsService, contact_id: str) -> list[Any]:
    return list(service.app.repository.event_store.get(uuid.UUID(contact_id)))


# -- the tests -----------------------------------------------------------------------------


async def test_an_opened_deal_makes_leads_opportunities_and_a_won_one_customers_once(
    service: ContactsService, follow: Callable[..., Running], local_stack: Stack
) -> None:
    person = await person_at(service, "opportunity")
    company = await company_at(service, "lead")
    deal = str(uuid.uuid4())
    topic = new_topic(local_stack)
    await publish(
        local_stack.kafka_bootstrap,
        topic,
        opened(deal, person=person, company=company),
        won(deal, person=person, company=company, actor="ann"),
    )
    running = follow(topic, "contacts-follower-a")
    await running.handled(2)

    # The person was an opportunity already: only the won deal moved it. The
    # company was a lead: the opened deal made it an opportunity, then a customer.
    assert await stage_and_version(service, person) == ("customer", 2)
    assert await stage_and_version(service, company) == ("customer", 3)
    opened_change, won_change = stored_events(service, company)[-2:]
    assert opened_change.profile["lifecycle_stage"] == "opportunity"
    assert opened_change.cause == f"deal_opened: deal {deal}"
    assert won_change.cause == f"deal_won: deal {deal}"
    change = stored_events(service, person)[-1]
    assert type(change).__name__ == "PersonProfileUpdated"
    assert change.changed_fields == ["lifecycle_stage"]
    # Who won the deal is who made the contact a customer; the follower says it was him.
    assert change._meta["actor"] == "ann"
    assert change._meta["client"] == "crm-contacts-follower"
    assert change._meta["request_id"] == f"opportunity-won:{deal}:4:{person}"
    assert running.follower.stats.promoted == 3

    # The same event delivered again (a relay that published a suffix twice).
    length = log_length(service.app)
    await publish(
        local_stack.kafka_bootstrap, topic, won(deal, person=person, company=company, actor="ann")
    )
    await running.handled(3)
    assert log_length(service.app) == length
    assert await stage_and_version(service, person) == ("customer", 2)
    assert running.follower.stats.replayed == 2


async def test_a_contact_further_along_is_left_as_it_is_and_others_come_back(
    service: ContactsService, follow: Callable[..., Running], local_stack: Stack
) -> None:
    advocate = await person_at(service, "advocate")
    customer = await company_at(service, "customer")
    churned = await person_at(service, "customer")  # once a customer, then churned
    await service.update_person(
        GRACE,
        PersonChanges(id=churned, fields=frozenset({"lifecycle_stage"}), lifecycle_stage="churned"),
    )
    lost = await company_at(service, "lost")
    before = {c: await stage_and_version(service, c) for c in (advocate, customer, churned, lost)}
    topic = new_topic(local_stack)
    await publish(
        local_stack.kafka_bootstrap,
        topic,
        won(str(uuid.uuid4()), person=advocate, company=customer),
        won(str(uuid.uuid4()), person=churned),
        won(str(uuid.uuid4()), company=lost),
    )
    running = follow(topic, "contacts-follower-b")
    await running.handled(3)

    # Nothing recorded for who is a customer or further along, and no error.
    assert await stage_and_version(service, advocate) == before[advocate]
    assert await stage_and_version(service, customer) == before[customer]
    # Who churned or was lost is a customer again.
    assert await stage_and_version(service, churned) == ("customer", before[churned][1] + 1)
    assert await stage_and_version(service, lost) == ("customer", before[lost][1] + 1)
    stats = running.follower.stats
    assert (stats.promoted, stats.unchanged, stats.skipped) == (2, 2, 0)


async def test_records_it_cannot_use_are_passed_over_and_the_rest_applied(
    service: ContactsService, follow: Callable[..., Running], local_stack: Stack
) -> None:
    person = await person_at(service, "lead")
    topic = new_topic(local_stack)
    length = log_length(service.app)
    await publish(
        local_stack.kafka_bootstrap,
        topic,
        b"\xff\xfenot a protobuf",
        won(str(uuid.uuid4()), person=str(uuid.uuid4())),  # unknown here
        won(str(uuid.uuid4()), company="company-7"),  # not a contact id at all
        won(str(uuid.uuid4()), person=person),
    )
    running = follow(topic, "contacts-follower-c")
    await running.handled(4)
    assert await stage_and_version(service, person) == ("customer", 2)
    assert log_length(service.app) == length + 2  # the change and its receipt
    assert running.follower.stats.skipped == 3


async def test_offsets_are_committed_only_after_the_command_succeeded(
    service: ContactsService,
    follow: Callable[..., Running],
    local_stack: Stack,
    tmp_path: Path,
) -> None:
    person = await person_at(service, "opportunity")
    topic = new_topic(local_stack)
    await publish(local_stack.kafka_bootstrap, topic, won(str(uuid.uuid4()), person=person))

    # A follower whose command bus cannot write: it keeps retrying, commits nothing.
    broken = ContactsService(create_application(sqlite_settings(tmp_path)))
    broken.bus.close()
    failing = follow(topic, "contacts-follower-d", on=broken)

    async def retried() -> bool:
        return failing.follower.stats.retries >= 2

    await eventually(retried, "the failing command retried")
    await failing.stop()
    broken.close()
    assert failing.follower.stats.commits == {}
    assert await stage_and_version(service, person) == ("opportunity", 1)

    # The next member of the group gets the record again and succeeds.
    healthy = follow(topic, "contacts-follower-d")
    await healthy.handled(1)
    assert await stage_and_version(service, person) == ("customer", 2)


async def test_a_restarted_follower_resumes_and_a_new_group_writes_nothing_twice(
    service: ContactsService, follow: Callable[..., Running], local_stack: Stack
) -> None:
    first, second = await person_at(service, "lead"), await person_at(service, "lead")
    topic = new_topic(local_stack)
    await publish(local_stack.kafka_bootstrap, topic, won(str(uuid.uuid4()), person=first))
    running = follow(topic, "contacts-follower-e")
    await running.handled(1)
    await running.stop()

    await publish(local_stack.kafka_bootstrap, topic, won(str(uuid.uuid4()), person=second))
    again = follow(topic, "contacts-follower-e")
    await again.handled(2)
    # The restarted member starts after what its group committed.
    assert again.follower.stats.records == 1
    assert await stage_and_version(service, second) == ("customer", 2)

    # A group that never ran reads the whole topic: every command is a replay.
    length = log_length(service.app)
    fresh = follow(topic, "contacts-follower-f")
    await fresh.handled(2)
    assert log_length(service.app) == length
    assert (fresh.follower.stats.replayed, fresh.follower.stats.promoted) == (2, 0)


# -- `crm-contacts follow` as a process -------------------------------------------------------


async def test_the_follow_process_makes_customers_and_stops_gracefully(
    tmp_path: Path, local_stack: Stack, processes: list[subprocess.Popen[bytes]]
) -> None:
    contacts = ContactsService(create_application(sqlite_settings(tmp_path)))
    try:
        person = await person_at(contacts, "opportunity")
    finally:
        contacts.close()
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}.pipeline.events"
    env = clean_environment(
        tmp_path, CRM_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap, CRM_TOPIC_PREFIX=prefix
    )
    log = tmp_path / "follow.log"
    process = start_process("contacts", "follow", env, log, processes)
    # The topic appears after the follower started: it waits for it.
    await asyncio.sleep(1.0)
    assert process.poll() is None, log.read_text()[-3000:]
    await asyncio.to_thread(ensure_topics, local_stack.kafka_bootstrap, {topic: PARTITIONS})
    await publish(local_stack.kafka_bootstrap, topic, won(str(uuid.uuid4()), person=person))

    # The process's key client (the identity's master keys, when it has them).
    keys = env.get("CRM_MASTER_KEYS_FILE", "")
    reader_settings = dataclasses.replace(sqlite_settings(tmp_path), master_keys_file=keys)
    reader = ContactsService(create_application(reader_settings))
    try:

        async def customer() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return (await stage_and_version(reader, person))[0] == "customer"

        await eventually(customer, "the person became a customer")
    finally:
        reader.close()
    await stop_gracefully(process, log)
    text = log.read_text()
    assert f"follower {prefix}.contacts-follower follows {topic}" in text
    assert "1 contacts moved" in text
