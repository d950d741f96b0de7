"""The 360 view's deals: how one pipeline event changes one document.

Pure functions over plain dicts, like `customer360` for the contacts events.
The pipeline service publishes `crm.events.v1.PipelineEvent` keyed by the
customer's contact id, so one customer's deals arrive in log order; events
of a pipeline definition (stages, names) carry no customer and are keyed by
the pipeline, so they arrive in their own order, in another partition.

Rules that matter:

- Idempotent by position, per source: the document records the last
  pipeline position it applied (`positions.pipeline`) next to the contacts
  one; an event at or below it changes nothing.
- Every event of a customer counts, including those that change no deal
  (lead conversions, activities): the position moves, so a reader waiting
  for any pipeline write of the customer is answered.
- A customer's document may not exist yet when its first deal arrives (the
  topics are consumed independently): it is created with what is known, and
  the contacts events fill in the profile later. A deal whose opening was
  never seen (it would have to arrive first, from the same partition) is
  still kept with what the later events tell.
- Money stays `Decimal` text end to end: amounts are stored as the events
  carry them, and `lifetime_won_revenue` is the exact sum, per currency,
  of the deals that are won now. It is computed from the deals every time,
  so reopening a won deal takes its amount out until it is won again.
- Pipeline and stage names are not copied into the customers' documents: a
  stage rename would have to rewrite every document with a deal in that
  stage, and it is consumed in no fixed order relative to them. The store
  keeps one small document per pipeline (`apply_pipeline_event`) and the
  query joins the names in when it reads (`with_names`).
- Times come from the events only, never from the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Context, Decimal, InvalidOperation

from crm.events.v1 import pipeline_pb2 as events_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.customer360 import (
    Applied,
    Doc,
    UnknownEvent,
    add_to_timeline,
    advance,
    applied_position,
    enum_word,
    is_registered,
    new_document,
    to_datetime,
)

SOURCE = "pipeline"

# Enough digits for any sum of amounts below 10**15 each: the sums are exact.
_EXACT = Context(prec=60)

# Payloads that change a deal, and those of a pipeline definition.
DEAL_PAYLOADS = frozenset(
    {
        "opportunity_opened",
        "opportunity_amount_changed",
        "opportunity_line_items_changed",
        "opportunity_expected_close_date_changed",
        "opportunity_owner_changed",
        "opportunity_stage_changed",
        "opportunity_won",
        "opportunity_lost",
        "opportunity_reopened",
    }
)
PIPELINE_PAYLOADS = frozenset(
    {
        "pipeline_defined",
        "stage_added",
        "stage_renamed",
        "stage_settings_changed",
        "stages_reordered",
        "stage_retired",
    }
)
# Payloads of leads and activities: they move the customer's position only.
OTHER_PAYLOADS = frozenset(
    {
        "lead_created",
        "lead_qualified",
        "lead_disqualified",
        "lead_converted",
        "activity_scheduled",
        "activity_rescheduled",
        "activity_completed",
        "activity_cancelled",
    }
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def payload_of(event: events_pb2.PipelineEvent) -> str:
    """The event's payload name; UnknownEvent for one this version does not know."""
    payload = event.WhichOneof("payload")
    if payload is None:
        raise UnknownEvent(f"event at position {event.position} has no known payload")
    if payload not in DEAL_PAYLOADS | PIPELINE_PAYLOADS | OTHER_PAYLOADS:
        raise UnknownEvent(f"event at position {event.position} carries {payload}")
    return payload


def is_pipeline_definition(event: events_pb2.PipelineEvent) -> bool:
    return event.WhichOneof("payload") in PIPELINE_PAYLOADS


# -- money ------------------------------------------------------------------------------


def decimal_text(text: str, field: str) -> str:
    """The amount as the event carries it, checked to be a finite decimal."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{field} {text!r} is not a decimal number") from None
    if not number.is_finite():
        raise ValueError(f"{field} {text!r} is not a finite number")
    return text


def won_revenue(deals: list[Doc]) -> list[Doc]:
    """`[{"amount": "1234.50", "currency": "EUR"}, ...]` over the won deals, by currency."""
    totals: dict[str, Decimal] = {}
    for deal in deals:
        if deal.get("status") == "won" and deal.get("currency"):
            currency = deal["currency"]
            totals[currency] = _EXACT.add(
                totals.get(currency, Decimal(0)), Decimal(deal.get("amount") or "0")
            )
    return [
        {"amount": format(total, "f"), "currency": currency}
        for currency, total in sorted(totals.items())
    ]


# -- a customer's deals -----------------------------------------------------------------


def _deal_skeleton(opportunity_id: str) -> Doc:
    return {
        "opportunity_id": opportunity_id,
        "version": 0,
        "name": "",
        "pipeline_id": "",
        "stage_id": "",
        "status": "open",
        "amount": "",
        "currency": "",
        "expected_close_date": "",
        "owner": "",
        "person_id": "",
        "company_id": "",
        "kind": "unspecified",
        "opened_at": None,
        "stage_entered_at": None,
        "closed_on": "",
        "closed_at": None,
        "lost_reason": "",
    }


def _deal_order(deal: Doc) -> tuple[datetime, str]:
    opened = deal.get("opened_at") or _EPOCH
    if opened.tzinfo is None:
        opened = opened.replace(tzinfo=UTC)
    return opened, deal["opportunity_id"]


def _title(deal: Doc) -> str:
    return str(deal.get("name") or deal["opportunity_id"])


def _money_summary(deal: Doc) -> str:
    if not deal.get("amount"):
        return ""
    return f" ({deal['amount']} {deal['currency']})"


def _timeline_entry(
    event: events_pb2.PipelineEvent, deal: Doc, kind: str, summary: str, when: datetime | None
) -> Doc:
    return {
        "entry_id": f"{event.aggregate_id}:{event.version}",
        "source": SOURCE,
        "kind": kind,
        "summary": summary,
        "occurred_at": when,
        "direction": "unspecified",
        "channel": "unspecified",
        "owner": deal.get("owner", ""),
        "position": event.position,
    }


def _change_deal(
    deal: Doc, event: events_pb2.PipelineEvent, payload: str, when: datetime | None
) -> tuple[str, str] | None:
    """Applies the payload to `deal` (a copy); returns a timeline entry's kind and summary."""
    if payload == "opportunity_opened":
        opened = event.opportunity_opened
        deal.update(
            name=opened.name,
            pipeline_id=opened.pipeline_id,
            stage_id=opened.stage_id,
            status="open",
            amount=decimal_text(opened.amount.amount, "amount"),
            currency=opened.amount.currency,
            expected_close_date=opened.expected_close_date,
            owner=opened.owner,
            person_id=opened.person_id,
            company_id=opened.company_id,
            kind=enum_word(pipeline_pb2.OpportunityKind, opened.kind),
            opened_at=when,
            stage_entered_at=when,
        )
        return "deal.opened", f"Deal {_title(deal)} opened{_money_summary(deal)}"
    if payload == "opportunity_amount_changed":
        amount = event.opportunity_amount_changed.amount
        deal.update(amount=decimal_text(amount.amount, "amount"), currency=amount.currency)
    elif payload == "opportunity_line_items_changed":
        amount = event.opportunity_line_items_changed.amount
        deal.update(amount=decimal_text(amount.amount, "amount"), currency=amount.currency)
    elif payload == "opportunity_expected_close_date_changed":
        deal["expected_close_date"] = (
            event.opportunity_expected_close_date_changed.expected_close_date
        )
    elif payload == "opportunity_owner_changed":
        deal["owner"] = event.opportunity_owner_changed.owner
    elif payload == "opportunity_stage_changed":
        deal.update(stage_id=event.opportunity_stage_changed.stage_id, stage_entered_at=when)
    elif payload == "opportunity_won":
        won = event.opportunity_won
        deal.update(
            stage_id=won.stage_id,
            stage_entered_at=when,
            status="won",
            closed_on=won.closed_on,
            closed_at=when,
            lost_reason="",
        )
        if won.HasField("amount") and won.amount.currency:
            # The amount the deal was won at is the revenue.
            deal.update(
                amount=decimal_text(won.amount.amount, "amount"), currency=won.amount.currency
            )
        deal["person_id"] = deal["person_id"] or won.person_id
        deal["company_id"] = deal["company_id"] or won.company_id
        return "deal.won", f"Deal {_title(deal)} won{_money_summary(deal)}"
    elif payload == "opportunity_lost":
        lost = event.opportunity_lost
        deal.update(
            stage_id=lost.stage_id,
            stage_entered_at=when,
            status="lost",
            closed_on=lost.closed_on,
            closed_at=when,
            lost_reason=lost.reason,
        )
        return "deal.lost", f"Deal {_title(deal)} lost: {lost.reason}"
    elif payload == "opportunity_reopened":
        deal.update(
            stage_id=event.opportunity_reopened.stage_id,
            stage_entered_at=when,
            status="open",
            closed_on="",
            closed_at=None,
            lost_reason="",
        )
        return "deal.reopened", f"Deal {_title(deal)} reopened"
    return None


def apply_pipeline_event(doc: Doc | None, event: events_pb2.PipelineEvent) -> Applied:
    """Applies one pipeline event of a customer to the customer's document.

    `doc` None creates the document (it may hold no contacts data yet). Never
    changes `doc`: the result is a shallow copy with new values for every
    changed field, as in `customer360.apply_event`.
    """
    if not event.customer_id:
        raise ValueError("event without customer_id")
    current = doc if doc is not None else new_document(event.customer_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    payload = payload_of(event)
    if payload in PIPELINE_PAYLOADS:
        raise ValueError(f"{payload} at position {event.position} names a customer")
    new = dict(current)
    when = to_datetime(event.occurred_at)

    if payload in DEAL_PAYLOADS:
        if not event.aggregate_id:
            raise ValueError(f"{payload} at position {event.position} without aggregate_id")
        deals = list(new.get("deals") or [])
        index = next(
            (i for i, d in enumerate(deals) if d["opportunity_id"] == event.aggregate_id), None
        )
        deal = dict(deals[index]) if index is not None else _deal_skeleton(event.aggregate_id)
        entry = _change_deal(deal, event, payload, when)
        deal["version"] = max(int(deal.get("version", 0)), event.version)
        if index is None:
            deals.append(deal)
        else:
            deals[index] = deal
        deals.sort(key=_deal_order, reverse=True)
        new["deals"] = deals
        new["lifetime_won_revenue"] = won_revenue(deals)
        if entry is not None:
            add_to_timeline(new, _timeline_entry(event, deal, *entry, when))

    advance(new, event.position, when, SOURCE)
    return Applied(new, applied=True)


# -- pipeline definitions ---------------------------------------------------------------


def _stage_doc(stage: pipeline_pb2.Stage) -> Doc:
    return {
        "stage_id": stage.stage_id,
        "name": stage.name,
        "category": enum_word(pipeline_pb2.ForecastCategory, stage.category),
        "retired": False,
    }


def apply_pipeline_definition(pipeline: Doc | None, event: events_pb2.PipelineEvent) -> Applied:
    """Applies one event of a pipeline aggregate to the pipeline's names document.

    `{_id: pipeline_id, name, stages: [{stage_id, name, category, retired}],
    position}`: active stages in their order, then the retired ones. The
    pipeline's events sit in one partition in order; `position` drops
    redeliveries.
    """
    if not event.aggregate_id:
        raise ValueError("pipeline event without aggregate_id")
    current: Doc = pipeline if pipeline is not None else {"_id": event.aggregate_id, "stages": []}
    if event.position <= int(current.get("position", 0)):
        return Applied(current, applied=False)
    payload = payload_of(event)
    new = dict(current)
    stages: list[Doc] = [dict(s) for s in current.get("stages", [])]

    def find(stage_id: str) -> Doc | None:
        return next((s for s in stages if s["stage_id"] == stage_id), None)

    if payload == "pipeline_defined":
        new["name"] = event.pipeline_defined.name
        stages = [_stage_doc(s) for s in event.pipeline_defined.stages]
    elif payload == "stage_added":
        added = _stage_doc(event.stage_added.stage)
        stages = [s for s in stages if s["stage_id"] != added["stage_id"]]
        active = [s for s in stages if not s["retired"]]
        retired = [s for s in stages if s["retired"]]
        index = max(0, min(event.stage_added.position, len(active)))
        stages = [*active[:index], added, *active[index:], *retired]
    elif payload == "stage_renamed":
        stage = find(event.stage_renamed.stage_id)
        if stage is not None:
            stage["name"] = event.stage_renamed.name
        else:
            stages.append(
                {
                    "stage_id": event.stage_renamed.stage_id,
                    "name": event.stage_renamed.name,
                    "category": "unspecified",
                    "retired": False,
                }
            )
    elif payload == "stage_settings_changed":
        stage = find(event.stage_settings_changed.stage_id)
        if stage is not None:
            stage["category"] = enum_word(
                pipeline_pb2.ForecastCategory, event.stage_settings_changed.category
            )
    elif payload == "stages_reordered":
        order = {stage_id: i for i, stage_id in enumerate(event.stages_reordered.stage_ids)}
        active = [s for s in stages if not s["retired"]]
        active.sort(key=lambda s: order.get(s["stage_id"], len(order)))
        stages = [*active, *(s for s in stages if s["retired"])]
    elif payload == "stage_retired":
        stage = find(event.stage_retired.stage_id)
        if stage is not None:
            stage["retired"] = True
            stages = [
                *(s for s in stages if not s["retired"]),
                *(s for s in stages if s["retired"]),
            ]
    else:
        raise ValueError(f"{payload} at position {event.position} is not a pipeline definition")

    new["stages"] = stages
    new["position"] = event.position
    return Applied(new, applied=True)


def pipelines_referenced(doc: Doc | None) -> list[str]:
    """The pipelines whose names the document's deals show."""
    return sorted({d["pipeline_id"] for d in (doc or {}).get("deals", []) if d.get("pipeline_id")})


def with_names(doc: Doc, pipelines: Mapping[str, Doc | None]) -> Doc:
    """The document with `pipeline_name` and `stage_name` on every deal, as last known."""
    if not doc.get("deals"):
        return doc
    deals = []
    for deal in doc["deals"]:
        pipeline = pipelines.get(deal.get("pipeline_id", "")) or {}
        stage: Doc = next(
            (s for s in pipeline.get("stages", []) if s["stage_id"] == deal.get("stage_id")), {}
        )
        deals.append(
            {**deal, "pipeline_name": pipeline.get("name", ""), "stage_name": stage.get("name", "")}
        )
    return {**doc, "deals": deals}


def is_known(doc: Doc | None) -> bool:
    """Some event of the customer itself has been applied (a registration or a pipeline event).

    A placeholder holding only the members of a company not registered yet is
    not known.
    """
    return is_registered(doc) or applied_position(doc, SOURCE) > 0
