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
- `updated_at` is the time of the customer's own latest event, never the
  clock, so a rebuild produces the same documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, NotRequired, Required, TypedDict

from google.protobuf.timestamp_pb2 import Timestamp

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
    positions: Positions
    created_at: datetime | None
    updated_at: datetime


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


FanOut = CompanyRenamed | MembershipChanged


@dataclass
class Applied:
    doc: Customer360
    applied: bool
    fan_out: list[FanOut] = field(default_factory=list)


@dataclass
class AppliedToPipeline:
    doc: PipelineNames
    applied: bool


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


def is_registered(doc: Customer360 | None) -> bool:
    """A document only becomes a customer with its registration event.

    Until then it may exist as a placeholder holding members that arrived
    first (a person's link consumed before the company's registration).
    """
    return bool(doc and doc.get("kind") in ("person", "company"))


def _timeline_key(entry: TimelineEntry) -> tuple[datetime, int, str]:
    # Entries of different sources may tie on time and (their own logs')
    # position; the id settles it, so the order never depends on which
    # topic was consumed first.
    return aware(entry["occurred_at"] or datetime.min), entry["position"], entry["entry_id"]


def add_to_timeline(doc: Customer360, entry: TimelineEntry, limit: int = TIMELINE_LIMIT) -> None:
    """Inserts newest first by occurrence (interactions may be logged late)."""
    timeline = [e for e in doc.get("timeline", []) if e["entry_id"] != entry["entry_id"]]
    timeline.append(entry)
    timeline.sort(key=_timeline_key, reverse=True)
    doc["timeline"] = timeline[:limit]
