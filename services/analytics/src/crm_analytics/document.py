"""The 360 document as stored, its parts, and the rules every source shares.

The shapes are TypedDicts because the document is what MongoDB stores and
returns: plain dicts, typed here once for the projectors, the store, the
queries and both adapters. Enum fields hold the lower-case word of the
contract's enum (`crm_common.enums`), `None` when unset.

Shared rules, whichever topic an event comes from:

- Idempotent by position: a document records the last position it applied
  per source service (`positions.<source>`); an event at or below it is a
  redelivery and changes nothing.
- The timeline keeps the newest `TIMELINE_LIMIT` entries, newest first by
  occurrence: every event rewrites the whole document, so it must stay small.
  Every entry added is also handed to the collector the store opens around
  a batch (`collect_timeline`), which keeps the whole history in a
  collection of its own (`timeline.py`).
- `updated_at` is the time of the customer's own latest event, never the
  clock, so a rebuild produces the same documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, NotRequired, Required, TypedDict, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from crm_common.records import Record

TIMELINE_LIMIT = 500
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Documents written before unset became None spell it so; readers treat it as unset.
_LEGACY_UNSET = "unspecified"


class UnknownEvent(ValueError):
    """The event decoded but carries no payload this version knows."""


# -- the parts --------------------------------------------------------------------------


class Consent(TypedDict):
    status: str | None
    source: str
    recorded_at: datetime | None


class ChannelEntry(TypedDict):
    """A channel of a person with its consent."""

    channel: str | None
    address: str
    preferred: bool
    consent: Consent


class CustomField(TypedDict):
    type: str
    value: str
    currency: str


class CompanyLink(TypedDict):
    """A company a person belongs to.

    `name_position` is bookkeeping (the position the shown name is from) and
    may differ between rebuilds; it is not part of the API.
    """

    company_id: str
    company_name: str
    role: str
    name_position: int


class Member(TypedDict):
    """A person belonging to a company."""

    person_id: str
    role: str
    since: datetime


class TimelineEntry(TypedDict):
    entry_id: str
    source: str
    kind: str
    summary: str
    occurred_at: datetime | None
    direction: str | None
    channel: str | None
    owner: str
    position: int


DealStatus = Literal["open", "won", "lost"]


class Deal(TypedDict):
    """An opportunity of the customer; amounts are decimal text, as the events carry them."""

    opportunity_id: str
    version: int
    name: str
    pipeline_id: str
    stage_id: str
    status: DealStatus
    amount: str
    currency: str
    expected_close_date: str
    owner: str
    person_id: str
    company_id: str
    kind: str | None
    opened_at: datetime | None
    stage_entered_at: datetime | None
    closed_on: str
    closed_at: datetime | None
    lost_reason: str
    # Joined in when the view is read (`from_pipeline.with_names`), never stored.
    pipeline_name: NotRequired[str]
    stage_name: NotRequired[str]


class OpenActivity(TypedDict):
    """An activity (call, meeting, task, ...) scheduled and not completed or
    cancelled yet: what its later timeline entries name. `title` is personal."""

    kind: str | None
    title: str
    owner: str


class Amount(TypedDict):
    amount: str
    currency: str


#: The last applied position per source service: `{"contacts": 4711, "pipeline": 815}`.
Positions = dict[str, int]


class Profile(TypedDict, total=False):
    """What the contacts profile events set (a person's or a company's fields)."""

    kind: Literal["person", "company"]
    display_name: str
    given_name: str
    family_name: str
    domain: str
    industry: str
    lifecycle_stage: str | None
    tags: list[str]
    custom_fields: dict[str, CustomField]
    channels: list[ChannelEntry]
    owner: str


# -- the tickets part (from_tickets.py) ---------------------------------------------------


class SlaClock(TypedDict):
    """One target of a case as the case's latest event tells it."""

    kind: str
    state: str | None
    due_at: datetime | None
    remaining_seconds: int | None
    warn_at: datetime | None


class CaseSla(TypedDict):
    """The SLA a case is measured by, and its state after the case's latest event."""

    policy_id: str
    policy_version: int
    tier: str
    tier_source: str
    #: The worst clock's state (breached, running, paused, met); None without clocks.
    state: str | None
    #: The earliest `due_at` of a running clock.
    next_deadline: datetime | None
    #: Some target of the case was breached (it stays so when met late or reopened).
    breached: bool
    clocks: list[SlaClock]


class CaseSatisfaction(TypedDict):
    csat: int
    ces: int | None
    nps: int | None
    recorded_at: datetime | None


class CaseSummary(TypedDict):
    """A case of the customer; `subject` is personal (see visibility.py)."""

    case_id: str
    version: int
    subject: str
    status: str | None
    priority: str | None
    channel: str | None
    category: str
    team: str
    assignee: str
    opened_at: datetime | None
    solved_at: datetime | None
    closed_at: datetime | None
    sla: CaseSla | None
    satisfaction: CaseSatisfaction | None


class SatisfactionTotals(TypedDict):
    """Sums and counts of every survey answer of the customer (averages are computed on read)."""

    responses: int
    csat_sum: int
    ces_sum: int
    ces_count: int
    nps_sum: int
    nps_count: int


class TicketsPart(TypedDict):
    #: Cases not solved or closed, most urgent first.
    open_cases: list[CaseSummary]
    #: Solved and closed cases, most recently solved first, the newest `RECENT_CASES`.
    recent_cases: list[CaseSummary]
    satisfaction: SatisfactionTotals


# -- the loyalty part (from_loyalty.py) ---------------------------------------------------


class PointsBalance(TypedDict):
    active: int
    locked: int
    expired: int
    spent: int
    cancelled: int


class OpenLot(TypedDict):
    """A lot that still holds points."""

    lot_id: str
    remaining: int
    expires_at: datetime | None
    locked: bool


class LedgerEntry(TypedDict):
    entry_id: str
    kind: str
    #: Signed: what the entry added to (or took from) the member's points.
    points: int
    detail: str
    occurred_at: datetime | None


class TierDowngrade(TypedDict):
    to_tier: str
    due_at: datetime | None


class MembershipClosed(TypedDict):
    """A membership closed by a contacts merge: its points went to the survivor's."""

    survivor_id: str
    merge_id: str
    closed_at: datetime | None


class LoyaltyPart(TypedDict):
    member_number: str
    enrolment_channel: str
    enrolled_at: datetime | None
    balance: PointsBalance
    #: None until the member's first tier change (the enrolment event names no tier).
    tier: str | None
    #: The qualifying points the latest tier change was decided on, and when.
    qualifying_points: int | None
    tier_changed_at: datetime | None
    downgrade: TierDowngrade | None
    lots: list[OpenLot]
    recent_entries: list[LedgerEntry]
    #: Set while a contacts merge has closed the membership (see from_loyalty.py).
    closed_by_merge: NotRequired[MembershipClosed]
    #: Spent, expired and cancelled points of lots that moved to another member,
    #: still to leave the totals once their history arrives (from_loyalty.py).
    moved_out_pending: NotRequired[dict[str, int]]
    # Computed when the view is read (`from_loyalty.expiring_soon`), never stored.
    expiring_soon: NotRequired[list[OpenLot]]


class Customer360(Profile, total=False):
    """One customer's document, `_id` = the contact id.

    Every part but the ids appears with the first event that sets it: a
    document may hold only deals (its contacts events not consumed yet) or
    only members (a company whose registration is not consumed yet).
    """

    _id: Required[str]
    customer_id: Required[str]
    companies: list[CompanyLink]
    members: list[Member]
    timeline: list[TimelineEntry]
    deals: list[Deal]
    lifetime_won_revenue: list[Amount]
    #: Open activities by id (see from_pipeline.py).
    activities: dict[str, OpenActivity]
    tickets: TicketsPart
    loyalty: LoyaltyPart
    positions: Positions
    created_at: datetime | None
    updated_at: datetime
    #: A merge's survivor: the contacts merged into it (their documents stay).
    merged_ids: list[str]
    #: A contact merged into another: the survivor's id.
    merged_into: str
    #: The person was erased: every personal value reads "[erased]", now and
    #: after any later event (see personal_data.py).
    erased: bool


class Stage(TypedDict):
    stage_id: str
    name: str
    category: str | None
    retired: bool


class PipelineNames(TypedDict, total=False):
    """A sales pipeline's names, which a read joins into the deals.

    Active stages in their order, then the retired ones; `position` drops
    redeliveries.
    """

    _id: Required[str]
    name: str
    stages: Required[list[Stage]]
    position: int


# -- what applying an event gives ---------------------------------------------------------


@dataclass(frozen=True)
class CompanyRenamed:
    """Persons linked to the company show its new name (where theirs is older)."""

    company_id: str
    company_name: str
    position: int
    occurred_at: datetime


@dataclass(frozen=True)
class MembershipChanged:
    """A person joined (`role` set) or left (`role` None) the company's members."""

    company_id: str
    person_id: str
    role: str | None
    position: int
    occurred_at: datetime


@dataclass(frozen=True)
class PersonErased:
    """The documents of these contacts (a person's and those merged into it
    before) are redacted, and so are their roles in their companies' members."""

    contact_ids: tuple[str, ...]
    position: int


@dataclass(frozen=True)
class Detached:
    """Something of this customer's document moved to another customer's (a
    case or a deal re-keyed by a contacts merge, or given back by its undo):
    `change` takes it out of the document it left."""

    customer_id: str
    change: Callable[[Customer360], Customer360]


FanOut = CompanyRenamed | MembershipChanged | PersonErased | Detached


@dataclass
class Applied:
    doc: Customer360
    applied: bool
    fan_out: list[FanOut] = field(default_factory=list)


@dataclass
class AppliedToPipeline:
    doc: PipelineNames
    applied: bool


# -- a source of the view ----------------------------------------------------------------

E = TypeVar("E", bound=Message)
Outcome = Applied | AppliedToPipeline | None


@dataclass(frozen=True)
class Loaded:
    """What a batch loaded: the customers' documents and the pipelines' names, by id."""

    docs: Mapping[str, Customer360 | None]
    pipelines: Mapping[str, PipelineNames | None]


@dataclass(frozen=True)
class SourceAdapter(Generic[E]):
    """How the store consumes one source service's topic.

    Each `from_<source>.py` module offers one (`ADAPTER`); the store knows no
    source by name. `apply` is pure: it returns the changed copies (None for an
    event of no customer, such as a pipeline definition's or an SLA policy's,
    which changes no customer), raises UnknownEvent for a payload this version
    does not know and ValueError for a malformed event.
    """

    #: The service name: the registry's, and the key of `positions`.
    source: str
    #: The event in a record (DecodeError / ValueError when it is not one).
    decode: Callable[[Record], E]
    #: The customer the event is about; "" for none.
    customer_of: Callable[[E], str]
    #: The customer documents applying it reads or changes (the customer's included).
    customers_touched: Callable[[E], Iterable[str]]
    apply: Callable[[E, Loaded], Outcome]
    #: The pipelines' names documents it reads or changes.
    pipelines_touched: Callable[[E], Iterable[str]] = lambda _: ()
    #: Whether an event of a customer with no document yet creates one (every
    #: source but contacts, whose documents start with the registration).
    creates_documents: bool = True
    #: Further positions its documents record, which a reader may wait for.
    extra_positions: tuple[str, ...] = ()
    #: Records in a document that an event it cannot apply (a payload this
    #: version does not know) was seen; by default the source's position.
    mark_seen: Callable[[Customer360, E], None] | None = None


def decode_event(record: Record, message: type[E], subject: str) -> E:
    """The event in the record, refused when it names no subject or position."""
    if record.value is None:
        raise ValueError("record without value")
    event = message.FromString(record.value)
    subject_id = getattr(event, subject)
    if not subject_id:
        raise ValueError(f"event without {subject}")
    if getattr(event, "position", 0) <= 0:
        raise ValueError(f"event of {subject_id} without position")
    return event


def payload_name(event: Any, known: Iterable[str]) -> str:
    """The event's payload (its oneof `payload`); UnknownEvent for one not in `known`."""
    payload: str | None = event.WhichOneof("payload")
    if payload is None:
        raise UnknownEvent(f"event at position {event.position} has no known payload")
    if payload not in known:
        raise UnknownEvent(f"event at position {event.position} carries {payload}")
    return payload


# -- shared rules -----------------------------------------------------------------------


def stored_word(word: str | None) -> str | None:
    """An enum word as a document holds it; unset (however it was written) is None."""
    if not word or word == _LEGACY_UNSET:
        return None
    return word


def to_datetime(ts: Timestamp) -> datetime | None:
    """A protobuf timestamp at millisecond precision, as BSON stores it."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    millis = ts.seconds * 1000 + ts.nanos // 1_000_000
    return datetime.fromtimestamp(millis / 1000, UTC).replace(microsecond=(millis % 1000) * 1000)


def aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def new_document(customer_id: str) -> Customer360:
    return {"_id": customer_id, "customer_id": customer_id}


def applied_position(doc: Customer360 | None, source: str) -> int:
    if not doc:
        return 0
    return int((doc.get("positions") or {}).get(source, 0))


def advance(doc: Customer360, position: int, occurred_at: datetime | None, source: str) -> None:
    """Records that the document has seen `position` of `source`."""
    doc["positions"] = {**(doc.get("positions") or {}), source: position}
    if occurred_at is not None:
        previous = doc.get("updated_at")
        if previous is None or aware(previous) < occurred_at:
            doc["updated_at"] = occurred_at


def is_known(doc: Customer360 | None) -> bool:
    """Some event of the customer itself has been applied.

    A registration, or any event of a source other than contacts (a deal, a
    case, a membership); a placeholder holding only the members of a company
    not registered yet is not known.
    """
    if is_registered(doc):
        return True
    positions: Positions = (doc.get("positions") if doc else None) or {}
    return any(int(p) > 0 for source, p in positions.items() if source != "contacts")


def is_registered(doc: Customer360 | None) -> bool:
    """A document only becomes a customer with its registration event.

    Until then it may exist as a placeholder holding members that arrived
    first (a person's link consumed before the company's registration).
    """
    return bool(doc and doc.get("kind") in ("person", "company"))


def timeline_key(entry: TimelineEntry) -> tuple[datetime, int, str]:
    # Entries of different sources may tie on time and (their own logs')
    # position; the id settles it, so the order never depends on which
    # topic was consumed first.
    return aware(entry["occurred_at"] or datetime.min), entry["position"], entry["entry_id"]


#: Entries added while a collector is open, per customer and entry id (the last wins).
_added: ContextVar[dict[tuple[str, str], TimelineEntry] | None] = ContextVar(
    "timeline_added", default=None
)


@contextmanager
def collect_timeline() -> Iterator[dict[tuple[str, str], TimelineEntry]]:
    """Collects every entry `add_to_timeline` adds inside the block, keyed by
    (customer id, entry id): also those the document's limit cuts off at once
    (an old interaction logged late, a rebuild batch with more than the limit
    of one customer's entries)."""
    added: dict[tuple[str, str], TimelineEntry] = {}
    token = _added.set(added)
    try:
        yield added
    finally:
        _added.reset(token)


def add_to_timeline(doc: Customer360, entry: TimelineEntry, limit: int = TIMELINE_LIMIT) -> None:
    """Inserts newest first by occurrence (interactions may be logged late)."""
    added = _added.get()
    if added is not None:
        added[(doc["_id"], entry["entry_id"])] = entry
    timeline = [e for e in doc.get("timeline", []) if e["entry_id"] != entry["entry_id"]]
    timeline.append(entry)
    timeline.sort(key=timeline_key, reverse=True)
    doc["timeline"] = timeline[:limit]
