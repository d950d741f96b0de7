"""An ERP simulator: realistic order streams on the inbound topic.

`crm-loyalty simulate-erp` publishes `crm.erp.v1.OrderEvent` messages to
`<prefix>.erp.orders` the way an ERP system does: keyed by the customer
reference, with the CloudEvents attributes as Kafka headers (binary content
mode). The stream is drawn from a seeded random generator, so the same
arguments give the same stream:

- customers given by id, or drawn from the contacts service's contacts;
- orders of one to five lines across product categories, amounts by category,
  more orders in the months that sell more (seasonality);
- some orders are returned (whole or some lines) or cancelled afterwards;
- now and then a message is delivered twice, or a customer's return overtakes
  the order it returns (reordered within the customer).

`expected_points` says what the default earning rules (1 point per currency
unit, rounded down per line) give per customer for a stream, so tests and the
benchmark can check what was applied.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal

from aiokafka import AIOKafkaProducer
from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm.erp.v1 import orders_pb2 as erp_pb
from crm_common.clients import service_channel
from crm_common.settings import Settings, inbound_topic

log = logging.getLogger(__name__)

CONTENT_TYPE = b"application/protobuf; proto=crm.erp.v1.OrderEvent"
#: Category: (lowest, highest) line amount.
CATEGORIES: dict[str, tuple[int, int]] = {
    "groceries": (3, 60),
    "books": (6, 45),
    "toys": (8, 90),
    "shoes": (30, 180),
    "garden": (10, 140),
    "electronics": (40, 900),
}
#: How many orders a month sees, January first (December sells most).
SEASON = (0.8, 0.7, 0.9, 0.95, 1.0, 1.0, 0.85, 0.9, 1.0, 1.05, 1.35, 1.9)


@dataclass(frozen=True)
class ErpMessage:
    """One message of the stream: the Kafka key, the CloudEvents type, the order event."""

    key: str
    ce_type: str
    event: erp_pb.OrderEvent
    ce_id: str


@dataclass(frozen=True)
class Shape:
    """How the stream looks (rates are per order)."""

    return_rate: float = 0.12
    cancel_rate: float = 0.04
    redeliver_rate: float = 0.03
    reorder_rate: float = 0.03
    currency: str = "EUR"


def _stamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _message(
    kind: str, order_id: str, customer: str, at: datetime, **payload: object
) -> ErpMessage:
    event = erp_pb.OrderEvent(
        order_id=order_id,
        customer_ref=customer,
        occurred_at=_stamp(at),
        **payload,  # type: ignore[arg-type]
    )
    return ErpMessage(customer, f"crm.erp.v1.{kind}", event, str(uuid.uuid4()))


def order_stream(
    customers: Sequence[str],
    count: int,
    *,
    seed: int = 1,
    start: datetime | None = None,
    days: float = 30,
    shape: Shape = Shape(),
    prefix: str = "sim",
) -> list[ErpMessage]:
    """`count` orders of `customers` over `days` from `start` (default: `days` ago),
    with their returns and cancellations, redeliveries and reorderings."""
    if not customers:
        raise ValueError("the stream needs at least one customer")
    if count < 0 or days <= 0:
        raise ValueError("count must be 0 or more and days positive")
    rng = random.Random(seed)
    begin = start or datetime.now(UTC) - timedelta(days=days)
    span = timedelta(days=days)
    # Order times, denser in the busy months: rejection sampling on SEASON.
    times: list[datetime] = []
    while len(times) < count:
        at = begin + span * rng.random()
        if rng.random() * max(SEASON) <= SEASON[at.month - 1]:
            times.append(at)
    times.sort()
    out: list[ErpMessage] = []
    for number, at in enumerate(times, 1):
        customer = rng.choice(customers)
        order_id = f"{prefix}-{seed}-{number}"
        lines = []
        for line in range(rng.randint(1, 5)):
            category = rng.choice(list(CATEGORIES))
            low, high = CATEGORIES[category]
            quantity = rng.choice((1, 1, 1, 2, 3))
            amount = Decimal(rng.randint(low * 100, high * 100)) / 100 * quantity
            lines.append(
                erp_pb.OrderLine(
                    line_id=str(line + 1),
                    sku=f"{category[:3].upper()}-{rng.randint(1000, 9999)}",
                    category=category,
                    quantity=quantity,
                    amount=f"{amount:.2f}",
                )
            )
        placed = _message(
            "OrderPlaced",
            order_id,
            customer,
            at,
            placed=erp_pb.OrderPlaced(currency=shape.currency, lines=lines),
        )
        follow: ErpMessage | None = None
        draw = rng.random()
        if draw < shape.cancel_rate:
            follow = _message(
                "OrderCancelled",
                order_id,
                customer,
                at + timedelta(hours=rng.randint(1, 48)),
                cancelled=erp_pb.OrderCancelled(reason="customer request"),
            )
        elif draw < shape.cancel_rate + shape.return_rate:
            returned = [x.line_id for x in lines if rng.random() < 0.5]
            follow = _message(
                "OrderReturned",
                order_id,
                customer,
                at + timedelta(days=rng.randint(1, 20)),
                returned=erp_pb.OrderReturned(return_id=f"{order_id}-r1", line_ids=returned),
            )
        if follow is not None and rng.random() < shape.reorder_rate / max(
            shape.cancel_rate + shape.return_rate, 1e-9
        ):
            out += [follow, placed]
        else:
            out.append(placed)
            if follow is not None:
                out.append(follow)
        if out and rng.random() < shape.redeliver_rate:
            out.append(rng.choice(out))
    return out


def expected_points(messages: Sequence[ErpMessage]) -> dict[str, tuple[int, int]]:
    """(points earned, points cancelled) per customer under the default earning
    rules (1 point per unit, rounded down per line), each order and return once."""
    lines: dict[str, dict[str, int]] = {}
    owner: dict[str, str] = {}
    returned: dict[str, set[str]] = {}
    seen: set[str] = set()
    for message in messages:
        event = message.event
        if event.WhichOneof("payload") == "placed" and event.order_id not in lines:
            lines[event.order_id] = {
                x.line_id: int(Decimal(x.amount).to_integral_value(rounding=ROUND_DOWN))
                for x in event.placed.lines
            }
            owner[event.order_id] = event.customer_ref
    for message in messages:
        event = message.event
        kind = event.WhichOneof("payload")
        if kind == "placed":
            continue
        key = f"{event.order_id}:{event.returned.return_id if kind == 'returned' else kind}"
        if key in seen:
            continue
        seen.add(key)
        ids = list(event.returned.line_ids) if kind == "returned" else []
        done = returned.setdefault(event.order_id, set())
        done.update(ids or lines[event.order_id])
    totals: dict[str, tuple[int, int]] = {}
    for order_id, points in lines.items():
        earned, cancelled = totals.get(owner[order_id], (0, 0))
        gone = sum(points[x] for x in returned.get(order_id, set()))
        totals[owner[order_id]] = (earned + sum(points.values()), cancelled + gone)
    return totals


def headers_of(message: ErpMessage, source: str) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", message.ce_id.encode()),
        ("ce_type", message.ce_type.encode()),
        ("ce_source", source.encode()),
        ("ce_time", message.event.occurred_at.ToJsonString().encode()),
        ("ce_subject", message.event.order_id.encode()),
        ("content-type", CONTENT_TYPE),
    ]


async def publish(
    bootstrap: str,
    messages: Sequence[ErpMessage],
    *,
    topic: str | None = None,
    rate: float | None = None,
    source: str = "/erp/simulator",
) -> list[tuple[int, int]]:
    """Publishes `messages` in order (at most `rate` a second when given), every
    one acknowledged by the brokers; returns each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        began = time.monotonic()
        pending = []
        for index, message in enumerate(messages):
            if rate:
                ahead = began + index / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            pending.append(
                await producer.send(
                    topic or inbound_topic("erp.orders"),
                    message.event.SerializeToString(),
                    key=message.key.encode(),
                    headers=headers_of(message, source),
                )
            )
        sent = await asyncio.gather(*pending)
        return [(m.partition, m.offset) for m in sent]
    finally:
        await producer.stop()


async def contacts_of(settings: Settings, limit: int, token: str) -> list[str]:
    """Up to `limit` contact ids from the contacts service (its first pages), asked
    with `token` (the ERP's own: role erp-integration)."""
    ids: list[str] = []
    async with service_channel(settings.grpc_target("contacts"), settings) as channel:
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)  # type: ignore[no-untyped-call]
        token = ""
        while len(ids) < limit:
            reply = await stub.ListContacts(
                contacts_pb2.ListContactsRequest(page_size=min(100, limit), page_token=token),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
            ids += [c.id for c in reply.contacts]
            token = reply.next_page_token
            if not token:
                break
    return ids[:limit]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crm-loyalty simulate-erp",
        description="Publish a simulated ERP order stream to <prefix>.erp.orders.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--customers", help="comma-separated contact ids")
    who.add_argument(
        "--from-contacts", type=int, metavar="N", help="draw N customers from the contacts service"
    )
    p.add_argument("--count", type=int, default=100, help="orders to place (default 100)")
    p.add_argument("--rate", type=float, default=None, help="messages per second at most")
    p.add_argument("--days", type=float, default=30, help="days the orders span, up to now")
    p.add_argument("--seed", type=int, default=1, help="the same seed gives the same stream")
    p.add_argument("--source", default="/erp/simulator", help="the CloudEvents source")
    p.add_argument("--return-rate", type=float, default=Shape.return_rate)
    p.add_argument("--cancel-rate", type=float, default=Shape.cancel_rate)
    p.add_argument("--redeliver-rate", type=float, default=Shape.redeliver_rate)
    p.add_argument("--reorder-rate", type=float, default=Shape.reorder_rate)
    p.add_argument("--currency", default=Shape.currency)
    p.add_argument(
        "--order-prefix", default=None, help="order ids start so (default: new for every run)"
    )
    return p


async def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.customers:
        customers = [c.strip() for c in args.customers.split(",") if c.strip()]
    else:
        token = os.environ.get("CRM_ERP_TOKEN", "")
        if not token:
            print("--from-contacts needs CRM_ERP_TOKEN (an erp-integration token)", file=sys.stderr)
            return 2
        customers = await contacts_of(settings, args.from_contacts, token)
    if not customers:
        print("no customers to simulate orders for", file=sys.stderr)
        return 2
    shape = Shape(
        args.return_rate, args.cancel_rate, args.redeliver_rate, args.reorder_rate, args.currency
    )
    messages = order_stream(
        customers,
        args.count,
        seed=args.seed,
        days=args.days,
        shape=shape,
        prefix=args.order_prefix or f"sim-{uuid.uuid4().hex[:8]}",
    )
    sent = await publish(settings.kafka_bootstrap, messages, rate=args.rate, source=args.source)
    print(
        f"published {len(sent)} messages ({args.count} orders, {len(customers)} customers) "
        f"to {inbound_topic('erp.orders')}"
    )
    return 0


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    if args.count < 0 or (args.rate is not None and args.rate <= 0) or args.days <= 0:
        print("--count must be 0 or more, --rate and --days positive", file=sys.stderr)
        return 2
    return asyncio.run(run(args, Settings.from_env("loyalty")))
