"""The tickets topic into the 360 view: a customer's cases, their SLA, satisfaction.

Pure functions over the stored documents (`document.py`), like
`from_pipeline` for the pipeline topic. The tickets service publishes
`crm.events.v1.TicketEvent` keyed by the case's contact id, so one
customer's cases arrive in log order; every event of a case carries the
case's SLA as it stands right after it (`sla`: the policy, the tier, one
clock per target), so the view copies the latest instead of running the SLA
engine again. Events of SLA policies carry no customer: they change no
document and are not dead letters.

What the document keeps (`tickets`, see `document.TicketsPart`):

- `open_cases`: every case not solved or closed, the most urgent first (a
  breached case, then the nearest deadline, then the oldest): subject,
  status, priority, team, assignee, channel, category, and its SLA: the
  worst clock's state (breached, running, paused, met), the next deadline
  (the earliest `due_at` of a running clock) and whether any target was
  breached (it stays so after a late reply or a reopening).
- `recent_cases`: the newest `RECENT_CASES` solved or closed cases, the most
  recently solved first; a reopened case goes back to the open ones.
- `satisfaction`: sums and counts of every survey answer of the customer
  (the averages are computed on read), and on each case its own answer.
- Timeline entries (source `tickets`) for a case opened, solved, reopened,
  a target breached and a survey answered. They name channel, priority and
  scores, never the subject: the subject is personal data and is shown (or
  pseudonymised) only where the case is.

A case re-keyed by a contacts merge (`case_customer_moved`, keyed by the new
owner) moves, with its SLA and its survey answer, from the document of the
contact it left to the new owner's, which notes it on its timeline; the
timeline entries it had stay where they happened. An undone merge moves it
back the same way.

Idempotent by position (`positions.tickets`); times come from the events.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial

from crm.events.v1 import tickets_pb2 as events_pb2
from crm.tickets.v1 import tickets_pb2
from crm_analytics.document import (
    Applied,
    CaseSatisfaction,
    CaseSla,
    CaseSummary,
    Customer360,
    Detached,
    FanOut,
    Loaded,
    Outcome,
    SatisfactionTotals,
    SlaClock,
    SourceAdapter,
    TicketsPart,
    TimelineEntry,
    add_to_timeline,
    advance,
    applied_position,
    aware,
    decode_event,
    new_document,
    payload_name,
    to_datetime,
)
from crm_common.enums import enum_word
from crm_common.records import Record

SOURCE = "tickets"
#: How many solved or closed cases the view keeps (the full history stays in tickets).
RECENT_CASES = 20
#: Worst first: the case's SLA state is that of its worst clock.
CLOCK_RANK = {"breached": 3, "running": 2, "paused": 1, "met": 0}
_DONE = ("solved", "closed")
_FAR = datetime.max.replace(tzinfo=None)


# -- the document part ------------------------------------------------------------------


def empty_part() -> TicketsPart:
    return {
        "open_cases": [],
        "recent_cases": [],
        "satisfaction": {
            "responses": 0,
            "csat_sum": 0,
            "ces_sum": 0,
            "ces_count": 0,
            "nps_sum": 0,
            "nps_count": 0,
        },
    }


def _skeleton(case_id: str) -> CaseSummary:
    return {
        "case_id": case_id,
        "version": 0,
        "subject": "",
        "status": None,
        "priority": None,
        "channel": None,
        "category": "",
        "team": "",
        "assignee": "",
        "opened_at": None,
        "solved_at": None,
        "closed_at": None,
        "sla": None,
        "satisfaction": None,
    }


def _naive(when: datetime | None) -> datetime:
    return aware(when).replace(tzinfo=None) if when is not None else _FAR


def _urgency(case: CaseSummary) -> tuple[int, datetime, datetime, str]:
    sla = case["sla"]
    breached = bool(sla and sla["state"] == "breached")
    deadline = sla["next_deadline"] if sla else None
    return (0 if breached else 1, _naive(deadline), _naive(case["opened_at"]), case["case_id"])


def _recency(case: CaseSummary) -> tuple[datetime, str]:
    when = case["solved_at"] or case["closed_at"] or case["opened_at"]
    return (_naive(when) if when is not None else datetime.min, case["case_id"])


def averages(totals: SatisfactionTotals) -> dict[str, float | None]:
    """The customer's mean CSAT (1-5), CES (1-7) and NPS answer (0-10); None without answers."""

    def mean(total: int, count: int) -> float | None:
        return round(total / count, 2) if count else None

    return {
        "csat_average": mean(totals["csat_sum"], totals["responses"]),
        "ces_average": mean(totals["ces_sum"], totals["ces_count"]),
        "nps_average": mean(totals["nps_sum"], totals["nps_count"]),
    }


# -- the SLA an event carries -----------------------------------------------------------


def _clock(clock: events_pb2.SlaClock) -> SlaClock:
    return {
        "kind": clock.kind,
        "state": clock.state or None,
        "due_at": to_datetime(clock.due_at),
        "remaining_seconds": clock.remaining_seconds if clock.state == "paused" else None,
        "warn_at": to_datetime(clock.warn_at),
    }


def case_sla(sla: events_pb2.CaseSla, breached_before: bool) -> CaseSla:
    """The case's SLA from the state an event carries."""
    clocks = [_clock(c) for c in sla.clocks]
    states = [c["state"] for c in clocks if c["state"] in CLOCK_RANK]
    running = [c["due_at"] for c in clocks if c["state"] == "running" and c["due_at"]]
    return {
        "policy_id": sla.policy_id,
        "policy_version": sla.policy_version,
        "tier": sla.tier,
        "tier_source": sla.tier_source,
        "state": max(states, key=CLOCK_RANK.__getitem__) if states else None,
        "next_deadline": min(running, key=aware) if running else None,
        "breached": breached_before or "breached" in states,
        "clocks": clocks,
    }


# -- one handler per payload ------------------------------------------------------------

# A handler changes the case (a copy) and the totals; it may name a timeline entry.
Handler = Callable[
    [CaseSummary, events_pb2.TicketEvent, datetime | None, SatisfactionTotals],
    tuple[str, str] | None,
]


def _words(*parts: str | None) -> str:
    return ", ".join(p.replace("_", " ") for p in parts if p)


def _opened(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> tuple[str, str]:
    opened = event.case_opened
    case["subject"] = opened.subject
    case["channel"] = enum_word(tickets_pb2.Channel, opened.channel)
    case["category"] = opened.category
    case["priority"] = enum_word(tickets_pb2.Priority, opened.priority)
    case["team"] = opened.team
    case["assignee"] = opened.assignee
    case["opened_at"] = when
    case["status"] = case["status"] or "new"
    if case["sla"] is None and not event.HasField("sla"):
        # Events written before the SLA travelled with every event: what the opening knew.
        case["sla"] = case_sla(
            events_pb2.CaseSla(
                policy_id=opened.policy_id,
                policy_version=opened.policy_version,
                tier=opened.tier,
                tier_source=opened.tier_source,
            ),
            False,
        )
    detail = _words(case["channel"], f"{case['priority']} priority" if case["priority"] else "")
    return "case.opened", f"Case opened ({detail})" if detail else "Case opened"


def _triaged(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> None:
    triaged = event.case_triaged
    case["category"] = triaged.category
    case["priority"] = enum_word(tickets_pb2.Priority, triaged.priority)
    case["team"] = triaged.team


def _assigned(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> None:
    case["assignee"] = event.case_assigned.assignee


def _sla_only(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> None:
    """Replies, notes and warnings change the case's SLA only (carried by every event)."""


def _status_changed(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> tuple[str, str] | None:
    before = case["status"]
    status = enum_word(tickets_pb2.CaseStatus, event.case_status_changed.status)
    case["status"] = status
    if status == "solved":
        case["solved_at"] = when
        return "case.solved", "Case solved"
    if status == "closed":
        case["closed_at"] = when
        case["solved_at"] = case["solved_at"] or when
        return None
    if before in _DONE:
        case["solved_at"] = None
        case["closed_at"] = None
        return "case.reopened", f"Case reopened ({_words(status)})"
    return None


def _breached(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> tuple[str, str]:
    kind = event.sla_breached.kind
    if case["sla"] is not None:
        case["sla"] = {**case["sla"], "breached": True}
    return "case.sla_breached", f"SLA breached: {_words(kind) or 'a'} target"


def _escalated(
    case: CaseSummary, event: events_pb2.TicketEvent, when: datetime | None, _: SatisfactionTotals
) -> None:
    escalated = event.case_escalated
    case["priority"] = enum_word(tickets_pb2.Priority, escalated.priority) or case["priority"]
    case["team"] = escalated.team or case["team"]


def _satisfaction(
    case: CaseSummary,
    event: events_pb2.TicketEvent,
    when: datetime | None,
    totals: SatisfactionTotals,
) -> tuple[str, str]:
    recorded = event.satisfaction_recorded
    if not 1 <= recorded.csat <= 5:
        raise ValueError(f"CSAT {recorded.csat} at position {event.position} is not 1-5")
    answer: CaseSatisfaction = {
        "csat": recorded.csat,
        # The contract: CES 0 and NPS -1 are "not answered".
        "ces": recorded.ces if 1 <= recorded.ces <= 7 else None,
        "nps": recorded.nps if 0 <= recorded.nps <= 10 else None,
        "recorded_at": when,
    }
    case["satisfaction"] = answer
    totals["responses"] += 1
    totals["csat_sum"] += answer["csat"]
    if answer["ces"] is not None:
        totals["ces_sum"] += answer["ces"]
        totals["ces_count"] += 1
    if answer["nps"] is not None:
        totals["nps_sum"] += answer["nps"]
        totals["nps_count"] += 1
    scores = [f"CSAT {answer['csat']}/5"]
    if answer["ces"] is not None:
        scores.append(f"CES {answer['ces']}/7")
    if answer["nps"] is not None:
        scores.append(f"NPS {answer['nps']}/10")
    return "case.satisfaction", "Satisfaction: " + ", ".join(scores)


_CASE_HANDLERS: dict[str, Handler] = {
    "case_opened": _opened,
    "case_triaged": _triaged,
    "case_assigned": _assigned,
    "case_replied": _sla_only,
    "case_note_added": _sla_only,
    "case_status_changed": _status_changed,
    "sla_warned": _sla_only,
    "sla_breached": _breached,
    "case_escalated": _escalated,
    "satisfaction_recorded": _satisfaction,
}

#: Payloads of a case, and those of an SLA policy (no customer: nothing to apply).
MOVED = "case_customer_moved"
CASE_PAYLOADS = frozenset(_CASE_HANDLERS) | {MOVED}
POLICY_PAYLOADS = frozenset({"sla_policy_defined", "sla_policy_revised", "sla_policy_retired"})


# -- applying ---------------------------------------------------------------------------


def _timeline_entry(
    event: events_pb2.TicketEvent, case: CaseSummary, kind: str, summary: str
) -> TimelineEntry:
    return {
        "entry_id": f"{event.aggregate_id}:{event.version}",
        "source": SOURCE,
        "kind": kind,
        "summary": summary,
        "occurred_at": to_datetime(event.occurred_at),
        "direction": None,
        "channel": None,
        "owner": case["assignee"],
        "position": event.position,
    }


def apply_ticket_event(doc: Customer360 | None, event: events_pb2.TicketEvent) -> Applied:
    """Applies one event of a case to its customer's document (created if None).

    Never changes `doc`: the result is a shallow copy with new values for every
    changed field, as in `from_contacts.apply_event`.
    """
    if not event.customer_id:
        raise ValueError("case event without customer_id")
    current = doc if doc is not None else new_document(event.customer_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    payload = payload_name(event, CASE_PAYLOADS | POLICY_PAYLOADS)
    if payload in POLICY_PAYLOADS:
        raise ValueError(f"{payload} at position {event.position} names a customer")
    if not event.aggregate_id:
        raise ValueError(f"{payload} at position {event.position} without aggregate_id")
    when = to_datetime(event.occurred_at)
    part = current.get("tickets") or empty_part()
    open_cases = list(part["open_cases"])
    recent = list(part["recent_cases"])
    totals: SatisfactionTotals = {**part["satisfaction"]}
    found = next((c for c in open_cases + recent if c["case_id"] == event.aggregate_id), None)
    case = found.copy() if found is not None else _skeleton(event.aggregate_id)
    if event.HasField("sla"):
        case["sla"] = case_sla(event.sla, bool(case["sla"] and case["sla"]["breached"]))
    entry = _CASE_HANDLERS[payload](case, event, when, totals)
    case["version"] = max(case["version"], event.version)

    open_cases = [c for c in open_cases if c["case_id"] != case["case_id"]]
    recent = [c for c in recent if c["case_id"] != case["case_id"]]
    if case["status"] in _DONE:
        recent.append(case)
    else:
        open_cases.append(case)
    open_cases.sort(key=_urgency)
    recent.sort(key=_recency, reverse=True)
    new = current.copy()
    new["tickets"] = {
        "open_cases": open_cases,
        "recent_cases": recent[:RECENT_CASES],
        "satisfaction": totals,
    }
    if entry is not None:
        add_to_timeline(new, _timeline_entry(event, case, *entry))
    advance(new, event.position, when, SOURCE)
    return Applied(new, applied=True)


# -- a case moving to another customer ----------------------------------------------------


def _answer_totals(totals: SatisfactionTotals, case: CaseSummary, sign: int) -> None:
    answer = case["satisfaction"]
    if answer is None:
        return
    totals["responses"] += sign
    totals["csat_sum"] += sign * answer["csat"]
    if answer["ces"] is not None:
        totals["ces_sum"] += sign * answer["ces"]
        totals["ces_count"] += sign
    if answer["nps"] is not None:
        totals["nps_sum"] += sign * answer["nps"]
        totals["nps_count"] += sign


def _sorted_part(
    open_cases: list[CaseSummary], recent: list[CaseSummary], totals: SatisfactionTotals
) -> TicketsPart:
    open_cases.sort(key=_urgency)
    recent.sort(key=_recency, reverse=True)
    return {"open_cases": open_cases, "recent_cases": recent[:RECENT_CASES], "satisfaction": totals}


def without_case(doc: Customer360, case_id: str) -> Customer360:
    """The document without the case (and without its survey answer in the totals)."""
    part = doc.get("tickets")
    if not part:
        return doc
    cases = part["open_cases"] + part["recent_cases"]
    gone = next((c for c in cases if c["case_id"] == case_id), None)
    if gone is None:
        return doc
    totals: SatisfactionTotals = {**part["satisfaction"]}
    _answer_totals(totals, gone, -1)
    new = doc.copy()
    new["tickets"] = _sorted_part(
        [c for c in part["open_cases"] if c["case_id"] != case_id],
        [c for c in part["recent_cases"] if c["case_id"] != case_id],
        totals,
    )
    return new


def apply_case_moved(
    doc: Customer360 | None, left: Customer360 | None, event: events_pb2.TicketEvent
) -> Applied:
    """The case of `event` moves from `left` (the document of the contact it
    left, when there is one) to `doc`, the new owner's."""
    moved = event.case_customer_moved
    current = doc if doc is not None else new_document(event.customer_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    when = to_datetime(event.occurred_at)
    part = left.get("tickets") if left is not None else None
    cases = part["open_cases"] + part["recent_cases"] if part else []
    found = next((c for c in cases if c["case_id"] == event.aggregate_id), None)
    case = found.copy() if found is not None else _skeleton(event.aggregate_id)
    if event.HasField("sla"):
        case["sla"] = case_sla(event.sla, bool(case["sla"] and case["sla"]["breached"]))
    case["version"] = max(case["version"], event.version)
    mine = current.get("tickets") or empty_part()
    totals: SatisfactionTotals = {**mine["satisfaction"]}
    open_cases = [c for c in mine["open_cases"] if c["case_id"] != case["case_id"]]
    recent = [c for c in mine["recent_cases"] if c["case_id"] != case["case_id"]]
    if not any(c["case_id"] == case["case_id"] for c in mine["open_cases"] + mine["recent_cases"]):
        _answer_totals(totals, case, +1)
    (recent if case["status"] in _DONE else open_cases).append(case)
    new = current.copy()
    new["tickets"] = _sorted_part(open_cases, recent, totals)
    kind, summary = (
        ("case.returned", "Case given back (merge undone)")
        if moved.undone
        else ("case.moved_in", "Case moved in (contacts merged)")
    )
    add_to_timeline(new, _timeline_entry(event, case, kind, summary))
    advance(new, event.position, when, SOURCE)
    fan_out: list[FanOut] = (
        [Detached(moved.from_customer_id, partial(without_case, case_id=case["case_id"]))]
        if found is not None and moved.from_customer_id != event.customer_id
        else []
    )
    return Applied(new, applied=True, fan_out=fan_out)


# -- the source -------------------------------------------------------------------------


def decode(record: Record) -> events_pb2.TicketEvent:
    """A tickets event; `customer_id` is empty for SLA policies."""
    return decode_event(record, events_pb2.TicketEvent, "aggregate_id")


def _apply(event: events_pb2.TicketEvent, loaded: Loaded) -> Outcome:
    if not event.customer_id:
        # An SLA policy's event: no customer's view changes. A case event
        # without its customer is malformed, and so is a payload not known.
        payload = payload_name(event, CASE_PAYLOADS | POLICY_PAYLOADS)
        if payload in CASE_PAYLOADS:
            raise ValueError(f"{payload} at position {event.position} without customer_id")
        return None
    if event.WhichOneof("payload") == MOVED:
        left = loaded.docs.get(event.case_customer_moved.from_customer_id)
        return apply_case_moved(loaded.docs.get(event.customer_id), left, event)
    return apply_ticket_event(loaded.docs.get(event.customer_id), event)


def _customers_touched(event: events_pb2.TicketEvent) -> list[str]:
    if not event.customer_id:
        return []
    if event.WhichOneof("payload") == MOVED and event.case_customer_moved.from_customer_id:
        return [event.customer_id, event.case_customer_moved.from_customer_id]
    return [event.customer_id]


#: How the store consumes the tickets topic.
ADAPTER: SourceAdapter[events_pb2.TicketEvent] = SourceAdapter(
    source=SOURCE,
    decode=decode,
    customer_of=lambda e: e.customer_id,
    customers_touched=_customers_touched,
    apply=_apply,
)
