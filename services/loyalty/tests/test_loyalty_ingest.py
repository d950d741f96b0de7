"""The ERP ingest in process over the session's Kafka and a real SQLite store:
what cannot apply is parked, then dead-lettered to its topic with the reason
(never dropped), listed for an operator and re-driven."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp
from loyalty_support import Clock, KnownContacts, sqlite_settings

from crm.erp.v1 import orders_pb2 as erp
from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated
from crm_deploy.servers import ensure_topics
from crm_deploy.stack import Stack
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain import Member
from crm_loyalty.ingest import OrderIngest

ADMIN = Caller(actor="admin-1", client="console")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.2)


def order(order_id: str, customer: str, currency: str = "EUR") -> bytes:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return erp.OrderEvent(
        order_id=order_id,
        customer_ref=customer,
        occurred_at=stamp,
        placed=erp.OrderPlaced(
            currency=currency, lines=[erp.OrderLine(line_id="1", amount="25.00", quantity=1)]
        ),
    ).SerializeToString()


@pytest.mark.timeout(120)
async def test_unapplicable_orders_are_dead_lettered_listed_and_redriven(
    tmp_path: Path, local_stack: Stack, clock: Clock
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}.crm"
    inbound, dead = f"{prefix}.erp.orders", f"{prefix}.erp.orders.dead-letter"
    ensure_topics(local_stack.kafka_bootstrap, {inbound: 2, dead: 1})
    contacts = KnownContacts("c-1")
    service = LoyaltyService(create_application(sqlite_settings(tmp_path)), contacts, clock=clock)
    ingest = OrderIngest(
        service,
        bootstrap=local_stack.kafka_bootstrap,
        topic=inbound,
        group_id=f"{prefix}.loyalty-ingest",
        retry_interval=0.2,
        settle_interval=3600,
        park_limit=3600,
        dead_letter_topic_name=dead,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(ingest.run(stop))
    producer = AIOKafkaProducer(bootstrap_servers=local_stack.kafka_bootstrap, acks="all")
    await producer.start()
    consumer = AIOKafkaConsumer(
        dead, bootstrap_servers=local_stack.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"m-1"),
            ("ce_type", b"crm.erp.v1.OrderPlaced"),
            ("ce_source", b"/erp/test"),
        ]
        await producer.send_and_wait(inbound, order("o-1", "c-1"), key=b"c-1", headers=headers)
        ghost = await producer.send_and_wait(
            inbound, order("o-2", "ghost"), key=b"ghost", headers=headers
        )
        await producer.send_and_wait(inbound, order("o-3", "c-1", "XXX"), key=b"c-1")
        await producer.send_and_wait(inbound, b"\xff\xff not protobuf", key=b"c-1")

        async def states() -> dict[str, str]:
            return {p.key: p.state for p in await service.parked()}

        async def settled() -> bool:
            return list((await states()).values()).count("dead_lettered") == 2

        await eventually(settled)
        found = await states()
        assert found["o-2:placed"] == "parked"
        assert found["o-3:placed"] == "dead_lettered"
        assert [s for k, s in found.items() if k.startswith("undecodable:")] == ["dead_lettered"]
        assert (await service.get_member("c-1")).balance.locked == 25

        letters: list[tuple[bytes | None, dict[str, bytes]]] = []

        async def collect(count: int) -> bool:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                letters.extend((r.key, {k: bytes(v) for k, v in r.headers}) for r in records)
            return len(letters) >= count

        await eventually(lambda: collect(2))
        reasons = {h["crm_parked_key"].decode(): h["crm_dead_letter_reason"] for _, h in letters}
        assert b"ISO 4217" in reasons["o-3:placed"]
        assert [k for k in reasons if k.startswith("undecodable:")]
        # Every dead letter carries CloudEvents attributes, its own or reconstructed.
        assert all(h["ce_specversion"] == b"1.0" and h["ce_type"] for _, h in letters)

        # The unknown customer stays parked until the limit, then is dead-lettered too.
        clock.advance(hours=2)
        await eventually(lambda: collect(3))
        ghost_letter = letters[2]
        assert ghost_letter[0] == b"ghost"
        assert ghost_letter[1]["ce_id"] == b"m-1"  # the record's own headers
        assert b"parking limit" in ghost_letter[1]["crm_dead_letter_reason"]

        async def ghost_dead() -> bool:
            return "o-2:placed" in {p.key for p in await service.parked("dead_lettered")}

        # Published first, then marked: the mark follows.
        await eventually(ghost_dead)
        assert await service.parked("parked") == []

        # An operator re-drives it: parked again, its limit counted afresh; a second
        # re-drive of what is not dead-lettered is refused, an unknown key not found.
        redriven = await service.redrive(ADMIN, "o-2:placed")
        assert redriven.state == "parked" and "re-driven by admin-1" in redriven.reason
        with pytest.raises(RuleViolated):
            await service.redrive(ADMIN, "o-2:placed")
        with pytest.raises(NotFound):
            await service.redrive(ADMIN, "o-9:placed")

        # The customer becomes known: the order applies once, and its events name
        # the record it came from.
        contacts.known.add("ghost")

        async def applied() -> bool:
            return "o-2:placed" not in await states()

        await eventually(applied)
        member = await service.get_member("ghost")
        assert member.balance.locked == 25 and member.channel == "erp"
        assert ingest.stats.dead_lettered == 3 and ingest.stats.unparked == 1
        earned = [
            e
            for n in service.app.recorder.select_notifications(1, 1000)
            if isinstance(e := service.app.mapper.to_domain_event(n), Member.Earned)
            and e.order_id == "o-2"
        ]
        assert [(e._erp_partition, e._erp_position) for e in earned] == [  # type: ignore[attr-defined]
            (ghost.partition, ghost.offset + 1)
        ]
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 30)
        await producer.stop()
        await consumer.stop()
        service.close()
