"""Builders of pipeline events, as the pipeline service publishes them."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaProducer
from contact_events import T0, comparable, ts
from contact_events import expected_documents as expected_contact_documents

from crm.events.v1 import pipeline_pb2 as events_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.from_pipeline import (
    PIPELINE_PAYLOADS,
    apply_pipeline_definition,
    apply_pipeline_event,
)
from crm_common.relay import audit_headers, cloudevent_headers
from crm_common.telemetry import kafka_headers_with_context

PIPELINE = "pl-sales"
STAGES = [
    ("qualify", "Qualify", pipeline_pb2.FORECAST_CATEGORY_PIPELINE),
    ("propose", "Proposal", pipeline_pb2.FORECAST_CATEGORY_BEST_CASE),
    ("negotiate", "Negotiation", pipeline_pb2.FORECAST_CATEGORY_COMMIT),
    ("won", "Closed won", pipeline_pb2.FORECAST_CATEGORY_CLOSED_WON),
    ("lost", "Closed lost", pipeline_pb2.FORECAST_CATEGORY_CLOSED_LOST),
]
OPEN_STAGES = ["qualify", "propose", "negotiate"]


def money(amount: str, currency: str = "EUR") -> pipeline_pb2.Money:
    return pipeline_pb2.Money(amount=amount, currency=currency)


def envelope(
    customer_id: str, aggregate_id: str, position: int, version: int = 1
) -> events_pb2.PipelineEvent:
    # Pipeline positions are a log of their own; times sit half a minute off
    # the contacts' ones so the two sources never tie in a timeline.
    return events_pb2.PipelineEvent(
        customer_id=customer_id,
        aggregate_id=aggregate_id,
        version=version,
        position=position,
        occurred_at=ts(when(position)),
        actor="grace",
        client="test",
    )


def when(position: int) -> datetime:
    """The time of the pipeline event at `position`."""
    return T0 + timedelta(minutes=position, seconds=30)


# -- pipelines --------------------------------------------------------------------------


def pipeline_defined(
    position: int, pipeline_id: str = PIPELINE, name: str = "Sales"
) -> events_pb2.PipelineEvent:
    event = envelope("", pipeline_id, position)
    event.pipeline_defined.CopyFrom(
        events_pb2.PipelineDefined(
            name=name,
            stages=[
                pipeline_pb2.Stage(stage_id=s, name=n, probability="10", category=c)
                for s, n, c in STAGES
            ],
        )
    )
    return event


def stage_renamed(
    position: int, version: int, stage_id: str, name: str, pipeline_id: str = PIPELINE
) -> events_pb2.PipelineEvent:
    event = envelope("", pipeline_id, position, version)
    event.stage_renamed.CopyFrom(events_pb2.StageRenamed(stage_id=stage_id, name=name))
    return event


def stage_added(
    position: int, version: int, stage_id: str, name: str, at_index: int
) -> events_pb2.PipelineEvent:
    event = envelope("", PIPELINE, position, version)
    event.stage_added.CopyFrom(
        events_pb2.StageAdded(
            stage=pipeline_pb2.Stage(
                stage_id=stage_id,
                name=name,
                probability="50",
                category=pipeline_pb2.FORECAST_CATEGORY_BEST_CASE,
            ),
            position=at_index,
        )
    )
    return event


def stages_reordered(position: int, version: int, order: list[str]) -> events_pb2.PipelineEvent:
    event = envelope("", PIPELINE, position, version)
    event.stages_reordered.stage_ids.extend(order)
    return event


def stage_retired(position: int, version: int, stage_id: str) -> events_pb2.PipelineEvent:
    event = envelope("", PIPELINE, position, version)
    event.stage_retired.stage_id = stage_id
    return event


# -- leads and activities ---------------------------------------------------------------


def lead_created(position: int, lead_id: str) -> events_pb2.PipelineEvent:
    event = envelope("", lead_id, position)
    event.lead_created.CopyFrom(
        events_pb2.LeadCreated(given_name="Lin", family_name="Lead", email="lin@example.com")
    )
    return event


def lead_converted(
    position: int, lead_id: str, customer_id: str, opportunity_id: str, version: int = 3
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, lead_id, position, version)
    event.lead_converted.CopyFrom(
        events_pb2.LeadConverted(person_id=customer_id, opportunity_id=opportunity_id)
    )
    return event


def activity_scheduled(
    position: int, customer_id: str, activity_id: str, deal_id: str
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, activity_id, position)
    event.activity_scheduled.CopyFrom(
        events_pb2.ActivityScheduled(
            subject_kind=pipeline_pb2.SUBJECT_KIND_OPPORTUNITY,
            subject_id=deal_id,
            kind=pipeline_pb2.ACTIVITY_KIND_CALL,
            title="follow up",
            owner="grace",
            due_at=ts(T0 + timedelta(days=3)),
        )
    )
    return event


# -- opportunities ----------------------------------------------------------------------


def opened(
    customer_id: str,
    position: int,
    deal_id: str,
    amount: str = "1000.00",
    currency: str = "EUR",
    name: str = "Difference engine",
    stage_id: str = "qualify",
    pipeline_id: str = PIPELINE,
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position)
    event.opportunity_opened.CopyFrom(
        events_pb2.OpportunityOpened(
            pipeline_id=pipeline_id,
            stage_id=stage_id,
            name=name,
            person_id=customer_id,
            owner="grace",
            amount=money(amount, currency),
            expected_close_date="2026-12-31",
            kind=pipeline_pb2.OPPORTUNITY_KIND_NEW_BUSINESS,
        )
    )
    return event


def moved(
    customer_id: str, position: int, deal_id: str, version: int, to: str, frm: str = ""
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_stage_changed.CopyFrom(
        events_pb2.OpportunityStageChanged(from_stage_id=frm, stage_id=to)
    )
    return event


def amount_changed(
    customer_id: str, position: int, deal_id: str, version: int, amount: str, currency: str = "EUR"
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_amount_changed.amount.CopyFrom(money(amount, currency))
    return event


def line_items_changed(
    customer_id: str, position: int, deal_id: str, version: int, amount: str, currency: str = "EUR"
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_line_items_changed.CopyFrom(
        events_pb2.OpportunityLineItemsChanged(
            line_items=[
                pipeline_pb2.LineItem(
                    product_id="gears",
                    product_name="Gears",
                    quantity="1",
                    unit_price=amount,
                    total=amount,
                )
            ],
            amount=money(amount, currency),
        )
    )
    return event


def close_date_changed(
    customer_id: str, position: int, deal_id: str, version: int, day: str
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_expected_close_date_changed.expected_close_date = day
    return event


def reassigned(
    customer_id: str, position: int, deal_id: str, version: int, owner: str
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_owner_changed.owner = owner
    return event


def won(
    customer_id: str,
    position: int,
    deal_id: str,
    version: int,
    amount: str = "1000.00",
    currency: str = "EUR",
    closed_on: str = "2026-11-20",
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_won.CopyFrom(
        events_pb2.OpportunityWon(
            stage_id="won",
            person_id=customer_id,
            amount=money(amount, currency),
            closed_on=closed_on,
        )
    )
    return event


def lost(
    customer_id: str,
    position: int,
    deal_id: str,
    version: int,
    reason: str = "price",
    closed_on: str = "2026-11-21",
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_lost.CopyFrom(
        events_pb2.OpportunityLost(stage_id="lost", reason=reason, closed_on=closed_on)
    )
    return event


def reopened(
    customer_id: str, position: int, deal_id: str, version: int, stage_id: str = "negotiate"
) -> events_pb2.PipelineEvent:
    event = envelope(customer_id, deal_id, position, version)
    event.opportunity_reopened.stage_id = stage_id
    return event


# -- a whole story ----------------------------------------------------------------------


def deal_story(seed: int, customers: list[str], steps: int = 300) -> list[Any]:
    """A pipeline with renamed stages, leads, and deals of `customers`, in log order.

    Amounts are random cents in two currencies; deals are moved, re-priced,
    won, lost and reopened at random, as the service allows.
    """
    rng = random.Random(seed)
    position = 0
    events: list[Any] = []
    versions: dict[str, int] = {}
    deals: dict[str, dict[str, Any]] = {}

    def nxt(aggregate_id: str) -> tuple[int, int]:
        nonlocal position
        position += 1
        versions[aggregate_id] = versions.get(aggregate_id, 0) + 1
        return position, versions[aggregate_id]

    pos, _ = nxt(PIPELINE)
    events.append(pipeline_defined(pos))

    def cents() -> str:
        return str(Decimal(rng.randrange(1, 5_000_000)) / 100)

    for step in range(steps):
        roll = rng.random()
        if roll < 0.04:
            pos, version = nxt(PIPELINE)
            stage = rng.choice(OPEN_STAGES)
            events.append(stage_renamed(pos, version, stage, f"{stage.title()} v{step}"))
        elif roll < 0.08:
            lead = f"lead-{seed}-{step}"
            pos, _ = nxt(lead)
            events.append(lead_created(pos, lead))
        elif roll < 0.25 or not deals:
            customer = rng.choice(customers)
            deal_id = f"d-{seed}-{step}"
            currency = rng.choice(["EUR", "USD"])
            pos, _ = nxt(deal_id)
            events.append(opened(customer, pos, deal_id, cents(), currency, name=f"Deal {step}"))
            deals[deal_id] = {"customer": customer, "status": "open", "currency": currency}
        else:
            deal_id = rng.choice(sorted(deals))
            deal = deals[deal_id]
            customer = deal["customer"]
            pos, version = nxt(deal_id)
            if deal["status"] != "open":
                events.append(reopened(customer, pos, deal_id, version, rng.choice(OPEN_STAGES)))
                deal["status"] = "open"
            elif roll < 0.45:
                events.append(moved(customer, pos, deal_id, version, rng.choice(OPEN_STAGES)))
            elif roll < 0.55:
                amount = cents()
                events.append(
                    amount_changed(customer, pos, deal_id, version, amount, deal["currency"])
                )
            elif roll < 0.6:
                events.append(activity_scheduled(pos, customer, f"a-{seed}-{step}", deal_id))
            elif roll < 0.8:
                events.append(won(customer, pos, deal_id, version, cents(), deal["currency"]))
                deal["status"] = "won"
            else:
                events.append(lost(customer, pos, deal_id, version, f"reason {step}"))
                deal["status"] = "lost"
    return events


def expected_documents(contact_events: list[Any], pipeline_events: list[Any]) -> dict[str, Any]:
    """The 360 documents both topics must give: contacts first, then the deals.

    The projection consumes the two topics interleaved in whatever order; the
    documents must not depend on it.
    """
    docs = expected_contact_documents(contact_events)
    for event in pipeline_events:
        if event.customer_id and event.WhichOneof("payload") not in PIPELINE_PAYLOADS:
            applied = apply_pipeline_event(docs.get(event.customer_id), event)
            docs[event.customer_id] = comparable(applied.doc)
    return docs


def expected_pipelines(pipeline_events: list[Any]) -> dict[str, Any]:
    pipelines: dict[str, Any] = {}
    for event in pipeline_events:
        if event.WhichOneof("payload") in PIPELINE_PAYLOADS:
            pipelines[event.aggregate_id] = apply_pipeline_definition(
                pipelines.get(event.aggregate_id), event
            ).doc
    return pipelines


async def publish(
    bootstrap: str, topic: str, events: list[Any], audit: dict[str, str] | None = None
) -> None:
    """Publishes like the pipeline relay: keyed by customer (or aggregate), CloudEvents."""
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
                ce_type="crm.pipeline.v1." + "".join(p.title() for p in payload.split("_")),
                source="/crm/pipeline",
                subject=key,
                time_=event.occurred_at.ToDatetime(tzinfo=UTC),
                proto_message="crm.events.v1.PipelineEvent",
                position=event.position,
            )
            # The audit headers the relay adds: the event's own actor and client by default.
            meta = {"actor": event.actor, "client": event.client, "command": payload}
            headers += audit_headers({**meta, **(audit or {})})
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


def customer_moved(
    to_customer: str,
    from_customer: str,
    position: int,
    deal_id: str,
    version: int,
    *,
    merge_id: str = "m-1",
    undone: bool = False,
) -> events_pb2.PipelineEvent:
    """A deal (lead, activity) re-keyed by a contacts merge or given back by its undo."""
    event = envelope(to_customer, deal_id, position, version)
    event.customer_moved.CopyFrom(
        events_pb2.CustomerMoved(
            from_customer_id=from_customer,
            to_customer_id=to_customer,
            merge_id=merge_id,
            undone=undone,
            fields=["customer_id", "person_id"],
        )
    )
    return event
