"""Churn: a customer without a purchase for the churn period churns, a purchase
brings them back.

The rules themselves are pure domain tests. The rest runs over the Kafka the
tests start: loyalty `PointsEarned` records published the way loyalty's relay
does, on a topic of the test's own, followed by `PurchaseFollower` in process
against a contacts store in the test's temporary directory; the sweep runs on
a clock the test moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from contacts_support import Clock, log_length, sqlite_settings
from google.protobuf.timestamp_pb2 import Timestamp
from test_contacts_follower import eventually, won
from test_contacts_follower import publish as publish_deals

from crm.events.v1 import loyalty_pb2 as loyalty_pb
from crm_common.commands import Caller
from crm_common.relay import cloudevent_headers
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.churn import (
    ChurnSweep,
    PurchaseFollower,
    PurchaseLedger,
    churn_after_from_env,
    sweep_interval_from_env,
)
from crm_contacts.domain.lifecycle import (
    LifecycleRule,
    LifecycleStage,
    check_stage_change,
    stage_after_rule,
)
from crm_contacts.follower import OpportunityFollower
from crm_contacts.inputs import NewPerson, PersonChanges
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_deploy.testing import clean_environment, start_process, stop_gracefully

GRACE = Caller(actor="grace", client="churn-test")
START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


# -- the rules --------------------------------------------------------------------------


def test_no_purchase_churns_only_a_customer() -> None:
    churned = {
        stage: stage_after_rule(LifecycleRule.NO_PURCHASE, stage) for stage in LifecycleStage
    }
    assert churned[LifecycleStage.CUSTOMER] is LifecycleStage.CHURNED
    # An advocate, and who never was a customer, stay where they are.
    assert {s for s, after in churned.items() if after is not None} == {LifecycleStage.CUSTOMER}
    check_stage_change(LifecycleStage.CUSTOMER, LifecycleStage.CHURNED)


def test_a_purchase_brings_back_only_who_churned() -> None:
    back = {stage: stage_after_rule(LifecycleRule.PURCHASE, stage) for stage in LifecycleStage}
    assert back[LifecycleStage.CHURNED] is LifecycleStage.CUSTOMER
    assert {s for s, after in back.items() if after is not None} == {LifecycleStage.CHURNED}
    check_stage_change(LifecycleStage.CHURNED, LifecycleStage.CUSTOMER)


def test_the_periods_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRM_CONTACTS_CHURN_AFTER_DAYS", raising=False)
    monkeypatch.delenv("CRM_CONTACTS_CHURN_SWEEP_SECONDS", raising=False)
    assert churn_after_from_env() == timedelta(days=180)
    assert sweep_interval_from_env() == 3600
    monkeypatch.setenv("CRM_CONTACTS_CHURN_AFTER_DAYS", "90")
    monkeypatch.setenv("CRM_CONTACTS_CHURN_SWEEP_SECONDS", "60")
    assert churn_after_from_env() == timedelta(days=90)
    assert sweep_interval_from_env() == 60
    for bad in ("0", "half a year", "-3"):
        monkeypatch.setenv("CRM_CONTACTS_CHURN_AFTER_DAYS", bad)
        with pytest.raises(ValueError, match="CRM_CONTACTS_CHURN_AFTER_DAYS"):
            churn_after_from_env()
    monkeypatch.setenv("CRM_CONTACTS_CHURN_SWEEP_SECONDS", "0")
    with pytest.raises(ValueError, match="CRM_CONTACTS_CHURN_SWEEP_SECONDS"):
        sweep_interval_from_env()


# -- loyalty events as loyalty's relay publishes them ----------------------------------------


def earned(
    contact: str, order: str, at: datetime, *, version: int = 2, bonus: str = ""
) -> loyalty_pb.LoyaltyEvent:
    when = Timestamp()
    when.FromDatetime(at)
    return loyalty_pb.LoyaltyEvent(
        customer_id=contact,
        aggregate_id=contact,
        version=version,
        position=version,
        occurred_at=when,
        actor="erp",
        client="crm-loyalty-ingest",
        points_earned=loyalty_pb.PointsEarned(
            lot_id=str(uuid.uuid4()),
            points=120,
            order_id=order if not bonus else "",
            reason="order" if not bonus else f"bonus: {bonus}",
            bonus=bonus,
        ),
    )


async def publish(bootstrap: str, topic: str, *messages: loyalty_pb.LoyaltyEvent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for message in messages:
            payload = message.WhichOneof("payload")
            ce_type = "crm.loyalty.v1." + "".join(p.title() for p in payload.split("_"))
            headers = cloudevent_headers(
                ce_id=f"{message.aggregate_id}:{message.version}",
                ce_type=ce_type,
                source="/crm/loyalty",
                subject=message.customer_id,
                time_=datetime.now(UTC),
                proto_message="crm.events.v1.LoyaltyEvent",
                position=message.position,
            )
            await producer.send_and_wait(
                topic,
                message.SerializeToString(),
                key=message.customer_id.encode(),
                headers=headers,
            )
    finally:
        await producer.stop()


class Running:
    """A purchases follower running as a task until `stop()`."""

    def __init__(self, follower: PurchaseFollower) -> None:
        self.follower = follower
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(follower.run(self._stop))

    async def handled(self, records: int, timeout: float = 60) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.follower.bootstrap)
        await admin.start()
        try:

            async def check() -> bool:
                assert not self._task.done(), self._task
                try:
                    committed = await admin.list_consumer_group_offsets(self.follower.group_id)
                except KafkaError:
                    return False
                return bool(sum(o.offset for o in committed.values() if o.offset > 0) >= records)

            await eventually(check, f"{records} records committed", timeout)
        finally:
            await admin.close()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 30)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def service(tmp_path: Path, clock: Clock) -> AsyncIterator[ContactsService]:
    contacts = ContactsService(create_application(sqlite_settings(tmp_path)), clock=clock)
    yield contacts
    contacts.close()


@pytest.fixture
def ledger(service: ContactsService) -> Iterator[PurchaseLedger]:
    opened = PurchaseLedger.open(service)
    yield opened
    opened.close()


@pytest.fixture
async def follow(
    service: ContactsService, ledger: PurchaseLedger, local_stack: Stack
) -> AsyncIterator[Callable[[], Running]]:
    topic = f"test-{uuid.uuid4().hex[:10]}.loyalty.events"
    ensure_topics(local_stack.kafka_bootstrap, {topic: 3})
    started: list[Running] = []

    def start() -> Running:
        running = Running(
            PurchaseFollower(
                service,
                ledger,
                bootstrap=local_stack.kafka_bootstrap,
                topic=topic,
                group_id=f"contacts-purchases-{uuid.uuid4().hex[:6]}",
                retry_backoff=0.2,
            )
        )
        started.append(running)
        return running

    yield start
    for running in started:
        if not running._task.done():
            await running.stop()


async def customer(service: ContactsService) -> str:
    written = await service.create_person(
        GRACE,
        NewPerson(given_name="Ada", family_name=uuid.uuid4().hex[:6], lifecycle_stage="customer"),
    )
    return str(written.outcome.id)


async def stage_of(service: ContactsService, contact_id: str) -> str:
    return str((await service.get_contact(contact_id)).profile.lifecycle_stage)


def stored_events(service: ContactsService, contact_id: str) -> list[Any]:
    return list(service.app.repository.event_store.get(uuid.UUID(contact_id)))


# -- over Kafka --------------------------------------------------------------------------


async def test_an_old_purchase_churns_a_customer_and_a_new_one_brings_them_back(
    service: ContactsService,
    ledger: PurchaseLedger,
    follow: Callable[[], Running],
    local_stack: Stack,
    clock: Clock,
) -> None:
    quiet = await customer(service)
    busy = await customer(service)
    never = await customer(service)  # no purchase known: nothing to count from
    bought = START - timedelta(days=200)
    running = follow()
    topic = running.follower.topic
    await publish(
        local_stack.kafka_bootstrap,
        topic,
        earned(quiet, "SO-1", bought - timedelta(days=30)),
        earned(quiet, "SO-2", bought),
        earned(quiet, "", bought, version=3, bonus="first_purchase"),  # not a purchase
        earned(busy, "SO-3", START - timedelta(days=20)),
    )
    await running.handled(4)
    assert ledger.last_purchase(quiet) == (bought, "order SO-2")
    assert running.follower.stats.purchases == 3

    sweep = ChurnSweep(service, ledger, churn_after=timedelta(days=180), clock=clock)
    assert await sweep.sweep() == 1
    assert await stage_of(service, quiet) == "churned"
    assert await stage_of(service, busy) == "customer"
    assert await stage_of(service, never) == "customer"
    change = stored_events(service, quiet)[-1]
    assert change.profile["lifecycle_stage"] == "churned"
    assert change.cause == "no_purchase: no purchase since 2026-04-16 (order SO-2)"
    assert change._meta["request_id"] == f"no-purchase:{quiet}:{bought.isoformat()}"

    # A repeated sweep, later too, writes nothing; nor does a second replica
    # sweeping before the first one's marks were written.
    length = log_length(service.app)
    clock.advance(hours=1)
    assert await sweep.sweep() == 0
    with ledger.database.write() as tx:
        tx.execute("UPDATE contacts_purchases SET swept_for = 0")
    assert await ChurnSweep(service, ledger, clock=clock).sweep() == 0
    assert log_length(service.app) == length
    assert await stage_of(service, quiet) == "churned"
    # The other customer's purchase ages too.
    clock.advance(days=170)
    assert await sweep.sweep() == 1
    assert await stage_of(service, busy) == "churned"

    # An order placed after the churn makes the first one a customer again,
    # the order named as the cause.
    await publish(local_stack.kafka_bootstrap, topic, earned(quiet, "SO-9", clock.now))
    await running.handled(5)
    assert await stage_of(service, quiet) == "customer"
    back = stored_events(service, quiet)[-1]
    assert back.cause == "purchase: order SO-9"
    assert back._meta["request_id"] == f"purchase:{quiet}:SO-9"
    assert running.follower.stats.returned == 1

    # The same events delivered again (and an order from before the churn,
    # late): nothing is written, and nobody is churned or brought back again.
    length = log_length(service.app)
    await publish(
        local_stack.kafka_bootstrap,
        topic,
        earned(quiet, "SO-9", clock.now),
        earned(busy, "SO-3", START - timedelta(days=20)),
        earned(quiet, "SO-2", bought),
    )
    await running.handled(8)
    assert await sweep.sweep() == 0
    assert log_length(service.app) == length
    assert await stage_of(service, quiet) == "customer"
    assert await stage_of(service, busy) == "churned"
    assert ledger.last_purchase(quiet) == (clock.now, "order SO-9")


async def test_who_is_not_a_customer_or_was_merged_is_not_churned(
    service: ContactsService, ledger: PurchaseLedger, clock: Clock
) -> None:
    advocate = await customer(service)
    await service.update_person(
        GRACE,
        PersonChanges(
            id=advocate, fields=frozenset({"lifecycle_stage"}), lifecycle_stage="advocate"
        ),
    )
    survivor = await customer(service)
    merged = await customer(service)
    await service.merge_contacts(GRACE, survivor, [merged], {})
    # A survivor of whom only the merged contact's purchases are known.
    only_theirs, bought_before = await customer(service), await customer(service)
    await service.merge_contacts(GRACE, only_theirs, [bought_before], {})
    ledger.record(bought_before, START - timedelta(days=5), "order SO-theirs")
    old = START - timedelta(days=365)
    for contact in (advocate, survivor):
        ledger.record(contact, old, "order SO-old")
    # The merged contact bought lately (under its old id): that counts for the survivor.
    ledger.record(merged, START - timedelta(days=10), "order SO-new")
    ledger.record(str(uuid.uuid4()), old, "order SO-unknown")  # a contact unknown here
    length = log_length(service.app)
    tombstone = len(stored_events(service, merged))

    sweep = ChurnSweep(service, ledger, churn_after=timedelta(days=180), clock=clock)
    assert await sweep.sweep() == 0
    assert log_length(service.app) == length
    assert await stage_of(service, advocate) == "advocate"
    assert await stage_of(service, survivor) == "customer"
    assert ledger.last_purchase(survivor) == (START - timedelta(days=10), "order SO-new")

    # Once the merged contacts' purchases are old as well, the survivors churn
    # (the tombstones themselves never do); the cause names the merged one's order.
    clock.advance(days=200)
    assert await sweep.sweep() + await sweep.sweep() == 2
    assert await stage_of(service, survivor) == "churned"
    assert await stage_of(service, only_theirs) == "churned"
    assert stored_events(service, only_theirs)[-1].cause.endswith("(order SO-theirs)")
    assert len(stored_events(service, merged)) == tombstone
    assert sweep.stats.churned == 2


async def test_a_won_deal_is_a_purchase_too(
    service: ContactsService, ledger: PurchaseLedger, local_stack: Stack, clock: Clock
) -> None:
    person = await customer(service)
    ledger.record(person, START - timedelta(days=300), "order SO-1")
    sweep = ChurnSweep(service, ledger, churn_after=timedelta(days=180), clock=clock)
    assert await sweep.sweep() == 1
    assert await stage_of(service, person) == "churned"

    deal = str(uuid.uuid4())
    message = won(deal, person=person)
    message.occurred_at.FromDatetime(START + timedelta(days=1))
    topic = f"test-{uuid.uuid4().hex[:10]}.pipeline.events"
    ensure_topics(local_stack.kafka_bootstrap, {topic: 3})
    await publish_deals(local_stack.kafka_bootstrap, topic, message)
    follower = OpportunityFollower(
        service,
        bootstrap=local_stack.kafka_bootstrap,
        topic=topic,
        group_id=f"contacts-follower-{uuid.uuid4().hex[:6]}",
        purchases=ledger,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))

    async def recorded() -> bool:
        assert not task.done(), task
        return bool(ledger.last_purchase(person) == (START + timedelta(days=1), f"deal {deal}"))

    try:
        await eventually(recorded, "the won deal recorded as a purchase")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    # The deal made them a customer; the sweep counts from the deal now.
    assert await stage_of(service, person) == "customer"
    clock.advance(days=100)
    assert await sweep.sweep() == 0
    clock.advance(days=100)
    assert await sweep.sweep() == 1
    assert await stage_of(service, person) == "churned"
    assert stored_events(service, person)[-1].cause == (
        f"no_purchase: no purchase since 2026-11-03 (deal {deal})"
    )


async def test_the_follow_process_churns_and_brings_back(
    tmp_path: Path, local_stack: Stack, processes: list[subprocess.Popen[bytes]]
) -> None:
    contacts = ContactsService(create_application(sqlite_settings(tmp_path)))
    try:
        person = await customer(contacts)
    finally:
        contacts.close()
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    topic = f"{prefix}.loyalty.events"
    ensure_topics(local_stack.kafka_bootstrap, {topic: 3, f"{prefix}.pipeline.events": 3})
    env = clean_environment(
        tmp_path,
        CRM_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap,
        CRM_TOPIC_PREFIX=prefix,
        CRM_CONTACTS_CHURN_AFTER_DAYS="30",
        CRM_CONTACTS_CHURN_SWEEP_SECONDS="0.5",
    )
    log = tmp_path / "follow.log"
    process = start_process("contacts", "follow", env, log, processes)
    now = datetime.now(UTC)
    await publish(
        local_stack.kafka_bootstrap, topic, earned(person, "SO-1", now - timedelta(days=45))
    )
    # The process's key client (the identity's master keys, when it has them).
    keys = env.get("CRM_MASTER_KEYS_FILE", "")
    reader_settings = dataclasses.replace(sqlite_settings(tmp_path), master_keys_file=keys)
    reader = ContactsService(create_application(reader_settings))
    try:

        async def at(stage: str) -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return await stage_of(reader, person) == stage

        await eventually(lambda: at("churned"), "the customer churned")
        await publish(local_stack.kafka_bootstrap, topic, earned(person, "SO-2", now))
        await eventually(lambda: at("customer"), "the customer came back")
    finally:
        reader.close()
    await stop_gracefully(process, log)
    text = log.read_text()
    assert f"purchases follower {prefix}.contacts-purchases follows {topic}" in text
    assert "2 purchases, 1 customers back" in text
    assert "1 churned" in text


async def test_the_follow_process_refuses_a_bad_churn_period(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = clean_environment(tmp_path, CRM_CONTACTS_CHURN_AFTER_DAYS="six months")
    log = tmp_path / "follow.log"
    process = start_process("contacts", "follow", env, log, processes)
    assert await asyncio.to_thread(process.wait, 30) == 2
    assert "CRM_CONTACTS_CHURN_AFTER_DAYS must be a whole number" in log.read_text()


async def test_the_ledger_keeps_the_latest_purchase_on_either_store(
    store_settings: Settings,
) -> None:
    service = ContactsService(create_application(store_settings))
    ledger = PurchaseLedger.open(service)
    try:
        contact = str(uuid.uuid4())
        first, later = START - timedelta(days=300), START - timedelta(days=200)
        assert ledger.record(contact, later, "order B").latest
        assert not ledger.record(contact, first, "order A").latest  # late: kept out
        assert not ledger.record(contact, later, "order B").latest  # again: nothing
        assert ledger.last_purchase(contact) == (later, "order B")
        [aged] = ledger.aged(START - timedelta(days=180))
        assert (aged.contact_id, aged.what) == (contact, "order B")
        ledger.swept(contact, aged.last_purchase, churned=True)
        assert ledger.aged(START - timedelta(days=180)) == []
        # Only a purchase after the one churned for is a return.
        assert ledger.record(contact, later, "order B").churned_for == 0
        back = ledger.record(contact, START, "order C")
        assert back.churned_for == aged.last_purchase
        ledger.came_back(contact, back.churned_for)
        assert ledger.record(contact, START, "order C").churned_for == 0
        ledger.forget(contact)
        assert ledger.last_purchase(contact) is None
    finally:
        ledger.close()
        service.close()
