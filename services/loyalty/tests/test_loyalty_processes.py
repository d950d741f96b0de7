"""The loyalty processes over the real local stack: contacts and loyalty APIs,
the relay and the ERP ingest, Kafka in between."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp
from loyalty_support import sqlite_settings

from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm.erp.v1 import orders_pb2 as erp
from crm.events.v1 import loyalty_pb2 as events_pb
from crm.loyalty.v1 import loyalty_pb2 as pb
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_deploy.testing import grpc_auth
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.ingest import erp_topic

PROCESSES = ["contacts-api", "loyalty-api", "loyalty-relay", "loyalty-follower"]


def order_event(order_id: str, customer: str, **payload: Any) -> bytes:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return erp.OrderEvent(
        order_id=order_id, customer_ref=customer, occurred_at=stamp, **payload
    ).SerializeToString()


def placed(*amounts: str) -> erp.OrderPlaced:
    return erp.OrderPlaced(
        currency="EUR",
        lines=[
            erp.OrderLine(line_id=str(i + 1), sku=f"sku-{i}", quantity=1, amount=a)
            for i, a in enumerate(amounts)
        ],
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.2)


async def test_erp_orders_flow_into_points_once_and_the_ledger_is_published(
    local_stack: Stack,
) -> None:
    topic = erp_topic()
    ensure_topics(local_stack.kafka_bootstrap, {topic: 3})
    local_stack.start_services(
        PROCESSES,
        extra_env={"CRM_LOYALTY_PARKED_RETRY_SECONDS": "1", "CRM_LOYALTY_SETTLE_SECONDS": "1"},
    )
    identity = local_stack.identity
    admin = grpc_auth(identity.mint("admin", subject="ada"))
    ports = local_stack.config.service_ports
    producer = AIOKafkaProducer(bootstrap_servers=local_stack.kafka_bootstrap, acks="all")
    await producer.start()

    async def send(customer: str, value: bytes, ce_type: str) -> None:
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_type", ce_type.encode()),
            ("ce_source", b"/erp/test"),
            ("content-type", b"application/protobuf; proto=crm.erp.v1.OrderEvent"),
        ]
        await producer.send_and_wait(topic, value, key=customer.encode(), headers=headers)

    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['contacts'][0]}") as contacts_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports['loyalty'][0]}") as channel,
        ):
            contacts = contacts_pb2_grpc.ContactsServiceStub(contacts_channel)  # type: ignore[no-untyped-call]
            person = await contacts.CreatePerson(
                contacts_pb2.CreatePersonRequest(given_name="Ida", family_name="Lind"),
                metadata=admin,
            )
            customer = person.result.id
            loyalty = loyalty_pb2_grpc.LoyaltyServiceStub(channel)  # type: ignore[no-untyped-call]

            # Enrolment checks the contact over the contacts service, with the
            # platform's credentials and the user's token.
            missing = None
            try:
                await loyalty.EnrolMember(
                    pb.EnrolMemberRequest(contact_id="ghost", channel=pb.ENROLMENT_CHANNEL_WEB),
                    metadata=admin,
                )
            except grpc.aio.AioRpcError as error:
                missing = error.code()
            assert missing == grpc.StatusCode.NOT_FOUND

            placed_1 = order_event("o-1", customer, placed=placed("100.00", "40.00"))
            await send(customer, placed_1, "crm.erp.v1.OrderPlaced")
            await send(customer, placed_1, "crm.erp.v1.OrderPlaced")  # redelivered
            # Reordered: the return of o-2 before o-2 itself.
            returned_2 = order_event(
                "o-2", customer, returned=erp.OrderReturned(return_id="r-1", line_ids=["2"])
            )
            await send(customer, returned_2, "crm.erp.v1.OrderReturned")
            await send(
                customer,
                order_event("o-2", customer, placed=placed("10.00", "5.00")),
                "crm.erp.v1.OrderPlaced",
            )
            await send("ghost", order_event("o-3", "ghost", placed=placed("9")), "x")

            async def applied() -> bool:
                try:
                    reply = await loyalty.GetMember(
                        pb.GetMemberRequest(contact_id=customer), metadata=admin
                    )
                except grpc.aio.AioRpcError:
                    return False
                balance = reply.member.balance
                return (balance.locked, balance.cancelled) == (150, 5)

            await eventually(applied)
            member = (
                await loyalty.GetMember(pb.GetMemberRequest(contact_id=customer), metadata=admin)
            ).member
            assert member.channel == pb.ENROLMENT_CHANNEL_ERP
            assert sorted(lot.order_id for lot in member.lots) == ["o-1", "o-2"]

            # The ingest killed mid-stream and started again applies nothing twice.
            local_stack.process("loyalty-follower").kill()
            await send(customer, placed_1, "crm.erp.v1.OrderPlaced")
            local_stack.restart("loyalty-follower")
            await asyncio.sleep(3)
            again = (
                await loyalty.GetMember(pb.GetMemberRequest(contact_id=customer), metadata=admin)
            ).member
            assert again.balance == member.balance and len(again.lots) == 2

        # The unknown customer's order is parked in the store, not dropped.
        reader = LoyaltyService(create_application(sqlite_settings(local_stack.config.data_dir)))
        try:
            parked = await reader.parked()
        finally:
            reader.close()
        assert [(p.key, p.customer_ref) for p in parked] == [("o-3:placed", "ghost")]

        # The relay published the ledger, keyed by the contact, as CloudEvents.
        consumer = AIOKafkaConsumer(
            "crm.loyalty.events",
            bootstrap_servers=local_stack.kafka_bootstrap,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        seen: list[tuple[str, dict[str, bytes]]] = []
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(seen) < 4:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        if r.key == customer.encode():
                            headers = {k: bytes(v) for k, v in r.headers}
                            seen.append((headers["ce_type"].decode(), headers))
                            event = events_pb.LoyaltyEvent.FromString(r.value or b"")
                            assert event.customer_id == customer
        finally:
            await consumer.stop()
        types = [t for t, _ in seen]
        assert types[:4] == [
            "crm.loyalty.v1.MemberEnrolled",
            "crm.loyalty.v1.PointsEarned",
            "crm.loyalty.v1.PointsEarned",
            "crm.loyalty.v1.PointsCancelled",
        ]
        assert seen[0][1]["ce_specversion"] == b"1.0"
    finally:
        await producer.stop()
        local_stack.stop_services(PROCESSES)
