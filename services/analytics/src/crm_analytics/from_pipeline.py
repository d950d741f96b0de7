"""The pipeline topic into the 360 view: a customer's deals, and the names
of the pipelines and their stages.

Pure functions over the stored documents (`document.py`), like
`from_contacts` for the contacts topic.
The pipeline service publishes `crm.events.v1.PipelineEvent` keyed by the
customer's contact id, so one customer's deals arrive in log order; events
of a pipeline definition (stages, names) carry no customer and are keyed by
the pipeline, so they arrive in their own order, in another partition.

Rules that matter:

- Idempotent by position, per source (`positions.pipeline`, next to the
  contacts one; see `document.py`).
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
  keeps one small document per pipeline (`apply_pipeline_definition`) and the
  query joins the names in when it reads (`with_names`).
- Times come from the events only, never from the clock.

Each payload of `crm.events.v1.PipelineEvent` is in one of four tables,
keyed by its oneof name: `_DEAL_HANDLERS`, `_DEFINITION_HANDLERS`,
`_ACTIVITY_HANDLERS` (an activity scheduled, completed or cancelled is a
timeline entry; its title, personal data, opened from the sealed payload,
is kept while the activity is open so its completion can name it), or
`OTHER_PAYLOADS` (leads and reschedules: they only move the position);
`customer_moved` (a contacts merge re-keyed a deal, lead or activity, or an
undone merge gave it back) takes a deal, with its revenue, from the view of
the contact it left to the new owner's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Context, Decimal
from functools import partial

from crm.events.v1 import pipeline_pb2 as events_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.document import (
    EPOCH,
    Amount,
    Applied,
    AppliedToPipeline,
    Customer360,
    Deal,
    DealStatus,
    Detached,
    FanOut,
    Loaded,
    OpenActivity,
    Outcome,
    PipelineNames,
    SourceAdapter,
    Stage,
    TimelineEntry,
    UnknownEvent,
    add_to_timeline,
    advance,
    applied_position,
    aware,
    decode_event,
    is_registered,
    new_document,
    to_datetime,
)
from crm_common.enums import enum_word
from crm_common.errors import ValidationFailed
from crm_common.money import parse_decimal
from crm_common.records import Record

SOURCE = "pipeline"

# Enough digits for any sum of amounts below 10**15 each: the sums are exact.
_EXACT = Context(prec=60)


# -- money ------------------------------------------------------------------------------


def decimal_text(text: str, field: str) -> str:
    """The amount as the event carries it, checked to be a finite decimal.

    ValueError otherwise: a malformed event, not a caller's input.
    """
    try:
        parse_decimal(text, field)
    except ValidationFailed as error:
        raise ValueError(str(error)) from None
    return text


def won_revenue(deals: list[Deal]) -> list[Amount]:
    """`[{"amount": "1234.50", "currency": "EUR"}, ...]` over the won deals, by currency."""
    totals: dict[str, Decimal] = {}
    for deal in deals:
        if deal["status"] == "won" and deal["currency"]:
            currency = deal["currency"]
            totals[currency] = _EXACT.add(
                totals.get(currency, Decimal(0)), Decimal(deal["amount"] or "0")
            )
    return [
        {"amount": format(total, "f"), "currency": currency}
        for currency, total in sorted(totals.items())
    ]


# -- a customer's deals -----------------------------------------------------------------


def _deal_skeleton(opportunity_id: str) -> Deal:
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
        "kind": None,
        "opened_at": None,
        "stage_entered_at": None,
        "closed_on": "",
        "closed_at": None,
        "lost_reason": "",
    }


def _deal_order(deal: Deal) -> tuple[datetime, str]:
    return aware(deal["opened_at"] or EPOCH), deal["opportunity_id"]


def _title(deal: Deal) -> str:
    return deal["name"] or deal["opportunity_id"]


def _money_summary(deal: Deal) -> str:
    if not deal["amount"]:
        return ""
    return f" ({deal['amount']} {deal['currency']})"


def _set_amount(deal: Deal, amount: pipeline_pb2.Money) -> None:
    deal["amount"] = decimal_text(amount.amount, "amount")
    deal["currency"] = amount.currency


def _enter_stage(deal: Deal, stage_id: str, when: datetime | None) -> None:
    deal["stage_id"] = stage_id
    deal["stage_entered_at"] = when


def _close(
    deal: Deal, status: DealStatus, closed_on: str, lost_reason: str, when: datetime | None
) -> None:
    deal["status"] = status
    deal["closed_on"] = closed_on
    deal["closed_at"] = when
    deal["lost_reason"] = lost_reason


# A deal handler changes the deal (a copy) and may name a timeline entry: (kind, summary).
DealHandler = Callable[[Deal, events_pb2.PipelineEvent, datetime | None], tuple[str, str] | None]


def _opened(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> tuple[str, str]:
    opened = event.opportunity_opened
    deal["name"] = opened.name
    deal["pipeline_id"] = opened.pipeline_id
    _enter_stage(deal, opened.stage_id, when)
    deal["status"] = "open"
    _set_amount(deal, opened.amount)
    deal["expected_close_date"] = opened.expected_close_date
    deal["owner"] = opened.owner
    deal["person_id"] = opened.person_id
    deal["company_id"] = opened.company_id
    deal["kind"] = enum_word(pipeline_pb2.OpportunityKind, opened.kind)
    deal["opened_at"] = when
    return "deal.opened", f"Deal {_title(deal)} opened{_money_summary(deal)}"


def _amount_changed(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> None:
    _set_amount(deal, event.opportunity_amount_changed.amount)


def _line_items_changed(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> None:
    # Line items are not copied: the amount is their total.
    _set_amount(deal, event.opportunity_line_items_changed.amount)


def _expected_close_date_changed(
    deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None
) -> None:
    deal["expected_close_date"] = event.opportunity_expected_close_date_changed.expected_close_date


def _owner_changed(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> None:
    deal["owner"] = event.opportunity_owner_changed.owner


def _stage_changed(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> None:
    _enter_stage(deal, event.opportunity_stage_changed.stage_id, when)


def _won(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> tuple[str, str]:
    won = event.opportunity_won
    _enter_stage(deal, won.stage_id, when)
    _close(deal, "won", won.closed_on, "", when)
    if won.HasField("amount") and won.amount.currency:
        # The amount the deal was won at is the revenue.
        _set_amount(deal, won.amount)
    deal["person_id"] = deal["person_id"] or won.person_id
    deal["company_id"] = deal["company_id"] or won.company_id
    return "deal.won", f"Deal {_title(deal)} won{_money_summary(deal)}"


def _lost(deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None) -> tuple[str, str]:
    lost = event.opportunity_lost
    _enter_stage(deal, lost.stage_id, when)
    _close(deal, "lost", lost.closed_on, lost.reason, when)
    return "deal.lost", f"Deal {_title(deal)} lost: {lost.reason}"


def _reopened(
    deal: Deal, event: events_pb2.PipelineEvent, when: datetime | None
) -> tuple[str, str]:
    _enter_stage(deal, event.opportunity_reopened.stage_id, when)
    deal["status"] = "open"
    deal["closed_on"] = ""
    deal["closed_at"] = None
    deal["lost_reason"] = ""
    return "deal.reopened", f"Deal {_title(deal)} reopened"


_DEAL_HANDLERS: dict[str, DealHandler] = {
    "opportunity_opened": _opened,
    "opportunity_amount_changed": _amount_changed,
    "opportunity_line_items_changed": _line_items_changed,
    "opportunity_expected_close_date_changed": _expected_close_date_changed,
    "opportunity_owner_changed": _owner_changed,
    "opportunity_stage_changed": _stage_changed,
    "opportunity_won": _won,
    "opportunity_lost": _lost,
    "opportunity_reopened": _reopened,
}


def _timeline_entry(
    event: events_pb2.PipelineEvent, deal: Deal, kind: str, summary: str, when: datetime | None
) -> TimelineEntry:
    return {
        "entry_id": f"{event.aggregate_id}:{event.version}",
        "source": SOURCE,
        "kind": kind,
        "summary": summary,
        "occurred_at": when,
        "direction": None,
        "channel": None,
        "owner": deal["owner"],
        "position": event.position,
    }


def _apply_to_deals(doc: Customer360, event: events_pb2.PipelineEvent, payload: str) -> None:
    if not event.aggregate_id:
        raise ValueError(f"{payload} at position {event.position} without aggregate_id")
    when = to_datetime(event.occurred_at)
    deals = list(doc.get("deals") or [])
    index = next(
        (i for i, d in enumerate(deals) if d["opportunity_id"] == event.aggregate_id), None
    )
    deal = deals[index].copy() if index is not None else _deal_skeleton(event.aggregate_id)
    entry = _DEAL_HANDLERS[payload](deal, event, when)
    deal["version"] = max(deal["version"], event.version)
    if index is None:
        deals.append(deal)
    else:
        deals[index] = deal
    deals.sort(key=_deal_order, reverse=True)
    doc["deals"] = deals
    doc["lifetime_won_revenue"] = won_revenue(deals)
    if entry is not None:
        add_to_timeline(doc, _timeline_entry(event, deal, *entry, when))


# -- pipeline definitions ---------------------------------------------------------------


def _stage(stage: pipeline_pb2.Stage) -> Stage:
    return {
        "stage_id": stage.stage_id,
        "name": stage.name,
        "category": enum_word(pipeline_pb2.ForecastCategory, stage.category),
        "retired": False,
    }


def _find(stages: list[Stage], stage_id: str) -> Stage | None:
    return next((s for s in stages if s["stage_id"] == stage_id), None)


def _retired_last(stages: list[Stage]) -> list[Stage]:
    return [*(s for s in stages if not s["retired"]), *(s for s in stages if s["retired"])]


# A definition handler changes the pipeline's names (a copy with copied stages).
DefinitionHandler = Callable[[PipelineNames, events_pb2.PipelineEvent], None]


def _pipeline_defined(names: PipelineNames, event: events_pb2.PipelineEvent) -> None:
    names["name"] = event.pipeline_defined.name
    names["stages"] = [_stage(s) for s in event.pipeline_defined.stages]


def _stage_added(names: PipelineNames, event: events_pb2.PipelineEvent) -> None:
    added = _stage(event.stage_added.stage)
    stages = [s for s in names["stages"] if s["stage_id"] != added["stage_id"]]
    active = [s for s in stages if not s["retired"]]
    retired = [s for s in stages if s["retired"]]
    index = max(0, min(event.stage_added.position, len(active)))
    names["stages"] = [*active[:index], added, *active[index:], *retired]


def _stage_renamed(names: PipelineNames, event: events_pb2.PipelineEvent) -> None:
    renamed = event.stage_renamed
    stage = _find(names["stages"], renamed.stage_id)
    if stage is not None:
        stage["name"] = renamed.name
    else:
        names["stages"].append(
            {"stage_id": renamed.stage_id, "name": renamed.name, "category": None, "retired": False}
        )


def _stage_settings_changed(names: PipelineNames, event: events_pb2.PipelineEvent) -> None:
    changed = event.stage_settings_changed
    stage = _find(names["stages"], changed.stage_id)
    if stage is not None:
        stage["category"] = enum_word(pipeline_pb2.ForecastCategory, changed.category)


def _stages_reordered(names: PipelineNames, event: events_pb2.PipelineEvent) -> None:
    order = {stage_id: i for i, stage_id in enumerate(event.stages_reordered.stage_ids)}
    active = [s for s in names["stages"] if not s["retired"]]
    active.sort(key=lambda s: order.get(s["stage_id"], len(order)))
    names["stages"] = [*active, *(s for s in names["stages"] if s["retired"])]


def _stage_retired(names: PipelineNames, event: events_pb2.PipelineEvent) -> None:
    stage = _find(names["stages"], event.stage_retired.stage_id)
    if stage is not None:
        stage["retired"] = True
        names["stages"] = _retired_last(names["stages"])


_DEFINITION_HANDLERS: dict[str, DefinitionHandler] = {
    "pipeline_defined": _pipeline_defined,
    "stage_added": _stage_added,
    "stage_renamed": _stage_renamed,
    "stage_settings_changed": _stage_settings_changed,
    "stages_reordered": _stages_reordered,
    "stage_retired": _stage_retired,
}

# -- activities (calls, meetings, tasks, ...) -----------------------------------------------


def _activity_word(kind: str | None) -> str:
    word = (kind or "activity").replace("_", " ")
    return word[:1].upper() + word[1:]


def _activity_entry(
    event: events_pb2.PipelineEvent, kind: str, summary: str, owner: str
) -> TimelineEntry:
    return {
        "entry_id": f"{event.aggregate_id}:{event.version}",
        "source": SOURCE,
        "kind": kind,
        "summary": summary,
        "occurred_at": to_datetime(event.occurred_at),
        "direction": None,
        "channel": None,
        "owner": owner or event.actor,
        "position": event.position,
    }


def _activity_scheduled(doc: Customer360, event: events_pb2.PipelineEvent) -> None:
    scheduled = event.activity_scheduled
    activity: OpenActivity = {
        "kind": enum_word(pipeline_pb2.ActivityKind, scheduled.kind),
        "title": scheduled.title,
        "owner": scheduled.owner,
    }
    doc["activities"] = {**(doc.get("activities") or {}), event.aggregate_id: activity}
    what = _activity_word(activity["kind"])
    summary = f"{what} scheduled: {activity['title']}" if activity["title"] else f"{what} scheduled"
    add_to_timeline(doc, _activity_entry(event, "activity.scheduled", summary, scheduled.owner))


def _activity_ended(doc: Customer360, event: events_pb2.PipelineEvent, how: str, note: str) -> None:
    """Completed or cancelled: the entry names the activity, which is open no more."""
    activities = dict(doc.get("activities") or {})
    activity = activities.pop(event.aggregate_id, None)
    doc["activities"] = activities
    what = _activity_word(activity["kind"] if activity else None)
    title = f": {activity['title']}" if activity and activity["title"] else ""
    detail = f" ({note})" if note else ""
    owner = activity["owner"] if activity else ""
    add_to_timeline(
        doc, _activity_entry(event, f"activity.{how}", f"{what} {how}{title}{detail}", owner)
    )


_ACTIVITY_HANDLERS: dict[str, Callable[[Customer360, events_pb2.PipelineEvent], None]] = {
    "activity_scheduled": _activity_scheduled,
    "activity_completed": lambda doc, e: _activity_ended(
        doc, e, "completed", e.activity_completed.outcome
    ),
    "activity_cancelled": lambda doc, e: _activity_ended(
        doc, e, "cancelled", e.activity_cancelled.reason
    ),
}


#: Payloads that change a deal, those of a pipeline definition, and an activity's.
DEAL_PAYLOADS = frozenset(_DEAL_HANDLERS)
PIPELINE_PAYLOADS = frozenset(_DEFINITION_HANDLERS)
ACTIVITY_PAYLOADS = frozenset(_ACTIVITY_HANDLERS)
#: Payloads of leads and reschedules: they move the customer's position only.
OTHER_PAYLOADS = frozenset(
    {
        "lead_created",
        "lead_qualified",
        "lead_disqualified",
        "lead_converted",
        "activity_rescheduled",
    }
)


MOVED = "customer_moved"
#: A record re-keyed by a contacts merge (or given back by its undo).
MOVED_PAYLOADS = frozenset({MOVED})


def payload_of(event: events_pb2.PipelineEvent) -> str:
    """The event's payload name; UnknownEvent for one this version does not know."""
    payload: str | None = event.WhichOneof("payload")
    if payload is None:
        raise UnknownEvent(f"event at position {event.position} has no known payload")
    known = DEAL_PAYLOADS | PIPELINE_PAYLOADS | ACTIVITY_PAYLOADS | OTHER_PAYLOADS | MOVED_PAYLOADS
    if payload not in known:
        raise UnknownEvent(f"event at position {event.position} carries {payload}")
    return payload


def is_pipeline_definition(event: events_pb2.PipelineEvent) -> bool:
    return event.WhichOneof("payload") in PIPELINE_PAYLOADS


# -- applying ---------------------------------------------------------------------------


def apply_pipeline_event(doc: Customer360 | None, event: events_pb2.PipelineEvent) -> Applied:
    """Applies one pipeline event of a customer to the customer's document.

    `doc` None creates the document (it may hold no contacts data yet). Never
    changes `doc`: the result is a shallow copy with new values for every
    changed field, as in `from_contacts.apply_event`.
    """
    if not event.customer_id:
        raise ValueError("event without customer_id")
    current = doc if doc is not None else new_document(event.customer_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    payload = payload_of(event)
    if payload in PIPELINE_PAYLOADS:
        raise ValueError(f"{payload} at position {event.position} names a customer")
    new = current.copy()
    if payload in DEAL_PAYLOADS:
        _apply_to_deals(new, event, payload)
    elif payload in ACTIVITY_PAYLOADS:
        _ACTIVITY_HANDLERS[payload](new, event)
    advance(new, event.position, to_datetime(event.occurred_at), SOURCE)
    return Applied(new, applied=True)


def apply_pipeline_definition(
    pipeline: PipelineNames | None, event: events_pb2.PipelineEvent
) -> AppliedToPipeline:
    """Applies one event of a pipeline aggregate to the pipeline's names document.

    `{_id: pipeline_id, name, stages: [{stage_id, name, category, retired}],
    position}`: active stages in their order, then the retired ones. The
    pipeline's events sit in one partition in order; `position` drops
    redeliveries.
    """
    if not event.aggregate_id:
        raise ValueError("pipeline event without aggregate_id")
    current: PipelineNames = (
        pipeline if pipeline is not None else {"_id": event.aggregate_id, "stages": []}
    )
    if event.position <= current.get("position", 0):
        return AppliedToPipeline(current, applied=False)
    payload = payload_of(event)
    handler = _DEFINITION_HANDLERS.get(payload)
    if handler is None:
        raise ValueError(f"{payload} at position {event.position} is not a pipeline definition")
    new = current.copy()
    new["stages"] = [s.copy() for s in current["stages"]]
    handler(new, event)
    new["position"] = event.position
    return AppliedToPipeline(new, applied=True)


def pipelines_referenced(doc: Customer360 | None) -> list[str]:
    """The pipelines whose names the document's deals show."""
    if doc is None:
        return []
    return sorted({d["pipeline_id"] for d in doc.get("deals", []) if d["pipeline_id"]})


def with_names(doc: Customer360, pipelines: Mapping[str, PipelineNames | None]) -> Customer360:
    """The document with `pipeline_name` and `stage_name` on every deal, as last known."""
    if not doc.get("deals"):
        return doc
    deals: list[Deal] = []
    for deal in doc.get("deals", []):
        pipeline = pipelines.get(deal["pipeline_id"])
        stages = pipeline["stages"] if pipeline else []
        stage = _find(stages, deal["stage_id"])
        named = deal.copy()
        named["pipeline_name"] = pipeline.get("name", "") if pipeline else ""
        named["stage_name"] = stage["name"] if stage else ""
        deals.append(named)
    named_doc = doc.copy()
    named_doc["deals"] = deals
    return named_doc


def is_known(doc: Customer360 | None) -> bool:
    """Some event of the customer itself has been applied (a registration or a pipeline event).

    A placeholder holding only the members of a company not registered yet is
    not known.
    """
    return is_registered(doc) or applied_position(doc, SOURCE) > 0


# -- the source ---------------------------------------------------------------------------


def without_deal(doc: Customer360, opportunity_id: str) -> Customer360:
    """The document without the deal (and without its amount in the revenue)."""
    deals = doc.get("deals") or []
    if not any(d["opportunity_id"] == opportunity_id for d in deals):
        return doc
    new = doc.copy()
    new["deals"] = [d for d in deals if d["opportunity_id"] != opportunity_id]
    new["lifetime_won_revenue"] = won_revenue(new["deals"])
    return new


def without_activity(doc: Customer360, activity_id: str) -> Customer360:
    """The document without the open activity (it moved to another customer)."""
    activities = doc.get("activities") or {}
    if activity_id not in activities:
        return doc
    new = doc.copy()
    new["activities"] = {k: a for k, a in activities.items() if k != activity_id}
    return new


def apply_customer_moved(
    doc: Customer360 | None, left: Customer360 | None, event: events_pb2.PipelineEvent
) -> Applied:
    """A record re-keyed to `event.customer_id`: a deal found in `left` (the view
    of the contact it left) moves here with its amount; a lead or an activity
    only moves the position, as their other events do."""
    moved = event.customer_moved
    current = doc if doc is not None else new_document(event.customer_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    when = to_datetime(event.occurred_at)
    new = current.copy()
    their_deals = (left.get("deals") or []) if left is not None else []
    found = next((d for d in their_deals if d["opportunity_id"] == event.aggregate_id), None)
    fan_out: list[FanOut] = []
    if found is not None and moved.from_customer_id != event.customer_id:
        deal = found.copy()
        deal["version"] = max(deal["version"], event.version)
        # The deal's person or company that was the merged contact is the survivor now.
        for moved_field in ("person_id", "company_id"):
            if moved_field in moved.fields and deal[moved_field] == moved.from_customer_id:
                deal[moved_field] = moved.to_customer_id
        deals = [d for d in new.get("deals") or [] if d["opportunity_id"] != deal["opportunity_id"]]
        deals.append(deal)
        deals.sort(key=_deal_order, reverse=True)
        new["deals"] = deals
        new["lifetime_won_revenue"] = won_revenue(deals)
        kind, summary = (
            ("deal.returned", f"Deal given back (merge undone): {_title(deal)}")
            if moved.undone
            else ("deal.moved_in", f"Deal moved in (contacts merged): {_title(deal)}")
        )
        add_to_timeline(new, _timeline_entry(event, deal, kind, summary, when))
        fan_out.append(
            Detached(
                moved.from_customer_id, partial(without_deal, opportunity_id=deal["opportunity_id"])
            )
        )
    their_activities = (left.get("activities") or {}) if left is not None else {}
    activity = their_activities.get(event.aggregate_id)
    if activity is not None and moved.from_customer_id != event.customer_id:
        # An open activity moves with what its completion will name; its
        # entries so far stay in the timeline where they happened.
        new["activities"] = {**(new.get("activities") or {}), event.aggregate_id: activity}
        fan_out.append(
            Detached(
                moved.from_customer_id,
                partial(without_activity, activity_id=event.aggregate_id),
            )
        )
    advance(new, event.position, when, SOURCE)
    return Applied(new, applied=True, fan_out=fan_out)


def decode(record: Record) -> events_pb2.PipelineEvent:
    """A pipeline event; `customer_id` is empty for pipelines and unconverted leads."""
    return decode_event(record, events_pb2.PipelineEvent, "aggregate_id")


def _customers_touched(event: events_pb2.PipelineEvent) -> list[str]:
    if is_pipeline_definition(event) or not event.customer_id:
        return []
    if event.WhichOneof("payload") == MOVED and event.customer_moved.from_customer_id:
        return [event.customer_id, event.customer_moved.from_customer_id]
    return [event.customer_id]


def _pipelines_touched(event: events_pb2.PipelineEvent) -> list[str]:
    return [event.aggregate_id] if is_pipeline_definition(event) else []


def _apply(event: events_pb2.PipelineEvent, loaded: Loaded) -> Outcome:
    if is_pipeline_definition(event):
        return apply_pipeline_definition(loaded.pipelines.get(event.aggregate_id), event)
    if not event.customer_id:
        # A lead before its conversion: nothing of a customer yet.
        payload_of(event)
        return None
    if event.WhichOneof("payload") == MOVED:
        left = loaded.docs.get(event.customer_moved.from_customer_id)
        return apply_customer_moved(loaded.docs.get(event.customer_id), left, event)
    return apply_pipeline_event(loaded.docs.get(event.customer_id), event)


#: How the store consumes the pipeline topic.
ADAPTER: SourceAdapter[events_pb2.PipelineEvent] = SourceAdapter(
    source=SOURCE,
    decode=decode,
    customer_of=lambda e: e.customer_id,
    customers_touched=_customers_touched,
    apply=_apply,
    pipelines_touched=_pipelines_touched,
)
