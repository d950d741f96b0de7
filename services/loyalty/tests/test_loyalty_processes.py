"""The loyalty processes end to end: `crm-contacts serve`, `crm-loyalty serve`,
`relay` and `ingest` as real processes on their own free ports and topics (a
unique topic prefix) over the session's Kafka, fed by the ERP simulator.

Simulated orders flow through Kafka into points; a return cancels exactly the
points of its lines; redelivered and reordered messages change nothing; an
order for a customer the contacts service does not know is parked and applied
once the customer is known; an ingest SIGKILLed mid-stream and started again
applies nothing twice (checked in the store); the published events carry the
position of the order record that caused them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from loyalty_support import sqlite_settings

from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm.events.v1 import loyalty_pb2 as events_pb
from crm.loyalty.v1 import loyalty_pb2 as pb
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_deploy.testing import (
    clean_environment,
    grpc_auth,
    start_process,
    stop_gracefully,
    wait_serving,
)
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain import Member
from crm_loyalty.simulator import Shape, expected_points, order_stream, publish


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.3)


def stored_earnings(data_dir: Path, identity: Identity) -> Counter[str]:
    """How many times each order earned, read from the loyalty event store (with
    the master keys the processes sealed the members' personal data under)."""
    settings = dataclasses.replace(
        sqlite_settings(data_dir), master_keys_file=str(identity.master_keys)
    )
    reader = LoyaltyService(create_application(settings))
    try:
        app = reader.app
        counts: Counter[str] = Counter()
        for n in app.recorder.select_notifications(1, 1_000_000):
            event: Any = app.mapper.to_domain_event(n)
            if isinstance(event, Member.Earned) and event.order_id:
                counts[event.order_id] += 1
        return counts
    finally:
        reader.close()


@pytest.mark.timeout(300)
async def test_simulated_erp_orders_become_points_exactly_once_across_a_sigkill(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    local_stack: Stack,
    identity: Identity,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}.crm"
    inbound, outbound = f"{prefix}.erp.orders", f"{prefix}.loyalty.events"
    ensure_topics(local_stack.kafka_bootstrap, {inbound: 3, outbound: 3})
    ports = {name: free_port() for name in ("cg", "ch", "cg2", "ch2", "lg", "lh")}
    common = {
        "CRM_KAFKA_BOOTSTRAP": local_stack.kafka_bootstrap,
        "CRM_TOPIC_PREFIX": prefix,
        "CRM_LOYALTY_GRPC_PORT": str(ports["lg"]),
        "CRM_LOYALTY_HTTP_PORT": str(ports["lh"]),
        "CRM_CONTACTS_GRPC_TARGET": f"127.0.0.1:{ports['cg']}",
        "CRM_LOYALTY_PARKED_RETRY_SECONDS": "1",
        "CRM_LOYALTY_SETTLE_SECONDS": "5",
    }
    contacts_a = clean_environment(
        tmp_path / "contacts-a",
        identity,
        **common,
        CRM_CONTACTS_GRPC_PORT=str(ports["cg"]),
        CRM_CONTACTS_HTTP_PORT=str(ports["ch"]),
    )
    # A second contacts store, where the late customer is created.
    contacts_b = clean_environment(
        tmp_path / "contacts-b",
        identity,
        **common,
        CRM_CONTACTS_GRPC_PORT=str(ports["cg2"]),
        CRM_CONTACTS_HTTP_PORT=str(ports["ch2"]),
    )
    env = clean_environment(tmp_path / "loyalty", identity, **common)
    logs = tmp_path
    admin = grpc_auth(identity.mint("admin", subject="ada"))

    async def create_people(target: str, *names: str) -> list[str]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = contacts_pb2_grpc.ContactsServiceStub(channel)  # type: ignore[no-untyped-call]
            ids = []
            for name in names:
                reply = await stub.CreatePerson(
                    contacts_pb2.CreatePersonRequest(given_name=name, family_name="Lind"),
                    metadata=admin,
                )
                ids.append(reply.result.id)
            return ids

    contacts = start_process("contacts", "serve", contacts_a, logs / "contacts-a.log", processes)
    other = start_process("contacts", "serve", contacts_b, logs / "contacts-b.log", processes)
    await wait_serving(
        f"127.0.0.1:{ports['cg']}", f"http://127.0.0.1:{ports['ch']}", contacts,
        logs / "contacts-a.log",
    )  # fmt: skip
    await wait_serving(
        f"127.0.0.1:{ports['cg2']}", f"http://127.0.0.1:{ports['ch2']}", other,
        logs / "contacts-b.log",
    )  # fmt: skip
    customers = await create_people(f"127.0.0.1:{ports['cg']}", "Ida", "Ola", "Per")
    [late] = await create_people(f"127.0.0.1:{ports['cg2']}", "Liv")
    await stop_gracefully(other, logs / "contacts-b.log")

    serve = start_process("loyalty", "serve", env, logs / "serve.log", processes)
    relay = start_process("loyalty", "relay", env, logs / "relay.log", processes)
    ingest = start_process("loyalty", "ingest", env, logs / "ingest.log", processes)
    await wait_serving(
        f"127.0.0.1:{ports['lg']}", f"http://127.0.0.1:{ports['lh']}", serve, logs / "serve.log"
    )

    # A realistic stream with returns, cancellations, redeliveries and reorderings.
    shape = Shape(return_rate=0.25, cancel_rate=0.1, redeliver_rate=0.15, reorder_rate=0.1)
    stream = order_stream(customers, 60, seed=7, days=5, shape=shape, prefix="a")
    late_stream = order_stream([late], 2, seed=8, days=5, shape=Shape(0, 0, 0, 0), prefix="b")
    offsets = await publish(local_stack.kafka_bootstrap, stream + late_stream, topic=inbound)
    kinds = Counter(m.event.WhichOneof("payload") for m in stream)
    assert kinds["returned"] and kinds["cancelled"]
    assert len({m.ce_id for m in stream}) < len(stream), "the stream redelivers"
    expected = expected_points(stream + late_stream)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['lg']}") as channel:
        loyalty = loyalty_pb2_grpc.LoyaltyServiceStub(channel)  # type: ignore[no-untyped-call]

        async def member(contact: str) -> pb.Member | None:
            try:
                reply = await loyalty.GetMember(
                    pb.GetMemberRequest(contact_id=contact), metadata=admin
                )
            except grpc.aio.AioRpcError:
                return None
            return reply.member

        async def all_applied(who: list[str]) -> bool:
            for contact in who:
                found = await member(contact)
                if found is None:
                    return False
                earned, cancelled = expected.get(contact, (0, 0))
                balance = found.balance
                if (balance.locked + balance.active + balance.cancelled, balance.cancelled) != (
                    earned,
                    cancelled,
                ):
                    return False
            return True

        await eventually(lambda: all_applied(customers))
        # Within the return window the points are locked; a return cancelled exactly
        # the points of its lines (the oracle sums them line by line).
        for contact in customers:
            found = await member(contact)
            assert found is not None and found.balance.active == 0
            assert found.channel == pb.ENROLMENT_CHANNEL_ERP

        # The late customer is unknown to the contacts service the ingest asks: parked.
        async def parked_late() -> bool:
            reader = LoyaltyService(create_application(sqlite_settings(tmp_path / "loyalty")))
            try:
                return {p.customer_ref for p in await reader.parked()} == {late}
            finally:
                reader.close()

        await eventually(parked_late)
        assert await member(late) is None
        # The customer becomes known: that contacts store now answers on the port.
        await stop_gracefully(contacts, logs / "contacts-a.log")
        contacts_b["CRM_CONTACTS_GRPC_PORT"] = str(ports["cg"])
        contacts_b["CRM_CONTACTS_HTTP_PORT"] = str(ports["ch"])
        contacts = start_process(
            "contacts", "serve", contacts_b, logs / "contacts-b.log", processes
        )
        await eventually(lambda: all_applied([late]))

        # SIGKILL mid-stream, then start again: nothing applies twice.
        more = order_stream(customers, 150, seed=9, days=5, shape=shape, prefix="c")
        publishing = asyncio.create_task(
            publish(local_stack.kafka_bootstrap, more, topic=inbound, rate=150)
        )
        await asyncio.sleep(0.6)
        ingest.send_signal(signal.SIGKILL)
        ingest.wait(10)
        offsets += await publishing
        # Everything (the first stream too) delivered again, as a replaying ERP would.
        await publish(local_stack.kafka_bootstrap, stream + more, topic=inbound)
        ingest = start_process("loyalty", "ingest", env, logs / "ingest.log", processes)
        expected = expected_points(stream + late_stream + more)
        await eventually(lambda: all_applied([*customers, late]), timeout=120)

    earnings = stored_earnings(tmp_path / "loyalty", identity)
    placed = {m.event.order_id for m in stream + late_stream + more if m.event.HasField("placed")}
    assert set(earnings) == placed
    assert set(earnings.values()) == {1}

    # The relay published the ledger; each earning names the record that caused it.
    consumer = AIOKafkaConsumer(
        outbound, bootstrap_servers=local_stack.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    earned: dict[str, tuple[int, int]] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(earned) != placed:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = events_pb.LoyaltyEvent.FromString(record.value or b"")
                    if event.WhichOneof("payload") == "points_earned":
                        earned[event.points_earned.order_id] = (
                            event.erp_partition,
                            event.erp_position,
                        )
    finally:
        await consumer.stop()
    assert set(earned) == placed
    first_offsets: dict[str, set[tuple[int, int]]] = {}
    for message, (partition, offset) in zip(stream + late_stream + more, offsets, strict=False):
        if message.event.HasField("placed"):
            first_offsets.setdefault(message.event.order_id, set()).add((partition, offset + 1))
    # The earning names the record it came from (the copies published again later
    # changed nothing, so they name nothing).
    for order_id, position in earned.items():
        assert position in first_offsets[order_id], (order_id, position)
    await stop_gracefully(ingest, logs / "ingest.log")
    await stop_gracefully(relay, logs / "relay.log")
    await stop_gracefully(serve, logs / "serve.log")
