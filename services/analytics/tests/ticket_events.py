"""Builders of tickets events, as the tickets service publishes them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from contact_events import T0, ts

from crm.events.v1 import tickets_pb2 as events_pb2
from crm.tickets.v1 import tickets_pb2
from crm_common.relay import audit_headers, cloudevent_headers
from crm_common.telemetry import kafka_headers_with_context


def when(position: int) -> datetime:
    """The time of the tickets event at `position` (off the other sources' times)."""
    return T0 + timedelta(minutes=position, seconds=15)


def clock(
    kind: str, state: str, due: datetime | None = None, remaining: int = 0
) -> events_pb2.SlaClock:
    message = events_pb2.SlaClock(kind=kind, state=state, remaining_seconds=remaining)
    if due is not None:
        message.due_at.CopyFrom(ts(due))
    return message


def sla(*clocks: events_pb2.SlaClock, tier: str = "gold") -> events_pb2.CaseSla:
    return events_pb2.CaseSla(
        policy_id="pol-1", policy_version=2, tier=tier, tier_source="loyalty", clocks=clocks
    )


def envelope(
    customer_id: str,
    case_id: str,
    position: int,
    version: int,
    case_sla: events_pb2.CaseSla | None = None,
) -> events_pb2.TicketEvent:
    event = events_pb2.TicketEvent(
        customer_id=customer_id,
        aggregate_id=case_id,
        version=version,
        position=position,
        occurred_at=ts(when(position)),
        actor="bob",
        client="service-desk",
    )
    if case_sla is not None:
        event.sla.CopyFrom(case_sla)
    return event


def opened(
    customer_id: str,
    case_id: str,
    position: int,
    *,
    subject: str = "Printer on fire",
    priority: int = tickets_pb2.PRIORITY_HIGH,
    first_due: datetime | None = None,
) -> events_pb2.TicketEvent:
    due = first_due or when(position) + timedelta(hours=4)
    event = envelope(
        customer_id,
        case_id,
        position,
        1,
        sla(
            clock("first_response", "running", due),
            clock("resolution", "running", due + timedelta(days=2)),
        ),
    )
    event.case_opened.CopyFrom(
        events_pb2.CaseOpened(
            channel=tickets_pb2.CHANNEL_EMAIL,
            subject=subject,
            category="hardware",
            priority=priority,
            team="support",
            assignee="bob",
            tier="gold",
            tier_source="loyalty",
            policy_id="pol-1",
            policy_version=2,
        )
    )
    return event


def status(
    customer_id: str,
    case_id: str,
    position: int,
    version: int,
    word: int,
    case_sla: events_pb2.CaseSla | None = None,
) -> events_pb2.TicketEvent:
    event = envelope(customer_id, case_id, position, version, case_sla)
    event.case_status_changed.status = word
    return event


def breached(
    customer_id: str, case_id: str, position: int, version: int, case_sla: events_pb2.CaseSla
) -> events_pb2.TicketEvent:
    event = envelope(customer_id, case_id, position, version, case_sla)
    event.sla_breached.CopyFrom(
        events_pb2.SlaBreached(kind="first_response", due_at=ts(when(position)), cycle=1)
    )
    return event


def replied(
    customer_id: str, case_id: str, position: int, version: int, case_sla: events_pb2.CaseSla
) -> events_pb2.TicketEvent:
    event = envelope(customer_id, case_id, position, version, case_sla)
    event.case_replied.CopyFrom(
        events_pb2.CaseReplied(author_kind=tickets_pb2.AUTHOR_KIND_AGENT, author="bob")
    )
    return event


def satisfaction(
    customer_id: str,
    case_id: str,
    position: int,
    version: int,
    csat: int,
    ces: int = 0,
    nps: int = -1,
) -> events_pb2.TicketEvent:
    event = envelope(customer_id, case_id, position, version, sla(clock("resolution", "met")))
    event.satisfaction_recorded.CopyFrom(
        events_pb2.SatisfactionRecorded(csat=csat, ces=ces, nps=nps)
    )
    return event


def policy_defined(position: int, policy_id: str = "pol-1") -> events_pb2.TicketEvent:
    event = events_pb2.TicketEvent(
        aggregate_id=policy_id, version=1, position=position, occurred_at=ts(when(position))
    )
    event.sla_policy_defined.CopyFrom(events_pb2.SlaPolicyDefined(name="Gold"))
    return event


async def publish(bootstrap: str, topic: str, events: list[Any], source: str = "tickets") -> None:
    """Publishes like a relay: keyed by customer (or aggregate), CloudEvents, audit headers."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        acks = []
        for event in events:
            payload = event.WhichOneof("payload") or "unknown"
            key = event.customer_id or event.aggregate_id
            headers = cloudevent_headers(
                ce_id=f"{event.aggregate_id}:{event.version}",
                ce_type=f"crm.{source}.v1." + "".join(p.title() for p in payload.split("_")),
                source=f"/crm/{source}",
                subject=key,
                time_=event.occurred_at.ToDatetime(tzinfo=UTC),
                proto_message=event.DESCRIPTOR.full_name,
                position=event.position,
            )
            meta = {"actor": event.actor, "client": event.client, "command": payload}
            headers += audit_headers(meta)
            acks.append(
                await producer.send(
                    topic,
                    event.SerializeToString(),
                    key=key.encode(),
                    headers=kafka_headers_with_context(headers),
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def moved(
    to_customer: str,
    from_customer: str,
    case_id: str,
    position: int,
    version: int,
    *,
    merge_id: str = "m-1",
    undone: bool = False,
) -> events_pb2.TicketEvent:
    """A case re-keyed by a contacts merge (or given back by its undo), keyed by its new owner."""
    event = envelope(to_customer, case_id, position, version)
    event.case_customer_moved.CopyFrom(
        events_pb2.CaseCustomerMoved(
            from_customer_id=from_customer,
            to_customer_id=to_customer,
            merge_id=merge_id,
            undone=undone,
        )
    )
    return event
