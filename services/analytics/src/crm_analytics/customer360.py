"""The 360-degree customer view: how one contacts event changes one document.

(The pipeline's events, the customer's deals, are in `deals.py`.)

Pure functions over plain dicts (the document as stored), with no MongoDB and
no Kafka, so every rule is testable on its own. The store layer loads the
documents, calls `apply_event` in log order, and writes the results.

Rules that matter:

- Idempotent by position: each document records the last position it
  applied per source service (`positions.contacts`). The relay publishes at
  least once, so an event whose position is not above it is a duplicate (or
  an older event replayed) and changes nothing.
- Profile events carry the full profile after the change, so they replace
  the profile fields instead of patching them.
- Effects on other documents are returned as fan-out instructions instead of
  being applied here: a company's rename must reach the persons linked to it
  (`CompanyRenamed`, applied by the store with one update over all of them),
  and a person's link or unlink changes the company's member list
  (`MembershipChanged`).
- The timeline keeps the newest `TIMELINE_LIMIT` entries: every event
  rewrites the whole document, so it must stay small (and far below the 16 MB
  document limit); the full interaction log stays with the contacts service.
- Every timestamp comes from the events, never from the clock, and nothing
  depends on the order in which different customers' partitions are
  consumed, so a rebuild produces the same documents. `updated_at` is the
  time of the customer's own latest event (a fan-out does not move it).
  `companies[].name_position` is bookkeeping (the position the shown company
  name is from) and may differ between rebuilds; it is not part of the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2
from crm.events.v1 import contacts_pb2 as events_pb2

SOURCE = "contacts"
TIMELINE_LIMIT = 500

Doc = dict[str, Any]


# A generated protobuf enum class; the stubs give each its own wrapper type.
ProtoEnum = Any


class UnknownEvent(ValueError):
    """The event decoded but carries no payload this version knows."""


# -- enums as words ---------------------------------------------------------------------


def _prefix(enum: ProtoEnum) -> str:
    name = enum.DESCRIPTOR.name
    snake = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name))
    return snake.upper() + "_"


def enum_word(enum: ProtoEnum, value: int) -> str:
    """`LIFECYCLE_STAGE_CUSTOMER` -> `customer`: readable in documents and JSON."""
    try:
        name = enum.Name(value)
    except ValueError:
        return "unspecified"
    return name.removeprefix(_prefix(enum)).lower()


def enum_value(enum: ProtoEnum, word: str | None) -> Any:
    """The inverse of `enum_word`; unknown words map to UNSPECIFIED (0).

    Typed Any: the number fits the field of whichever enum was asked for.
    """
    if not word:
        return 0
    try:
        return int(enum.Value(_prefix(enum) + word.upper()))
    except ValueError:
        return 0


# -- fan-out instructions ---------------------------------------------------------------


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
    doc: Doc
    applied: bool
    fan_out: list[FanOut] = field(default_factory=list)


# -- conversions ------------------------------------------------------------------------


def to_datetime(ts: Timestamp) -> datetime | None:
    """A protobuf timestamp at millisecond precision, as BSON stores it."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    millis = ts.seconds * 1000 + ts.nanos // 1_000_000
    return datetime.fromtimestamp(millis / 1000, UTC).replace(microsecond=(millis % 1000) * 1000)


def _consent(consent: contacts_pb2.Consent) -> Doc:
    return {
        "status": enum_word(contacts_pb2.ConsentStatus, consent.status),
        "source": consent.source,
        "recorded_at": to_datetime(consent.recorded_at),
    }


def _channels(channels: Any) -> list[Doc]:
    return [
        {
            "channel": enum_word(contacts_pb2.Channel, c.channel),
            "address": c.address,
            "preferred": c.preferred,
            "consent": _consent(c.consent),
        }
        for c in channels
    ]


def _custom_fields(fields: Mapping[str, contacts_pb2.CustomFieldValue]) -> Doc:
    return {
        name: {"type": v.type, "value": v.value, "currency": v.currency}
        for name, v in sorted(fields.items())
    }


def _person_name(given: str, family: str) -> str:
    return " ".join(p for p in (given, family) if p)


# -- the document -----------------------------------------------------------------------


def new_document(customer_id: str) -> Doc:
    return {"_id": customer_id, "customer_id": customer_id}


def applied_position(doc: Doc | None, source: str = SOURCE) -> int:
    if not doc:
        return 0
    return int((doc.get("positions") or {}).get(source, 0))


def is_registered(doc: Doc | None) -> bool:
    """A document only becomes a customer with its registration event.

    Until then it may exist as a placeholder holding members that arrived
    first (a person's link consumed before the company's registration).
    """
    return bool(doc and doc.get("kind") in ("person", "company"))


def _set_person_profile(doc: Doc, profile: events_pb2.PersonProfile) -> None:
    doc["kind"] = "person"
    doc["given_name"] = profile.given_name
    doc["family_name"] = profile.family_name
    doc["display_name"] = _person_name(profile.given_name, profile.family_name)
    doc["lifecycle_stage"] = enum_word(contacts_pb2.LifecycleStage, profile.lifecycle_stage)
    doc["tags"] = list(profile.tags)
    doc["custom_fields"] = _custom_fields(profile.custom_fields)
    doc["channels"] = _channels(profile.channels)
    doc["owner"] = profile.owner
    doc.setdefault("companies", [])


def _set_company_profile(doc: Doc, profile: events_pb2.CompanyProfile) -> None:
    doc["kind"] = "company"
    doc["display_name"] = profile.name
    doc["domain"] = profile.domain
    doc["industry"] = profile.industry
    doc["lifecycle_stage"] = enum_word(contacts_pb2.LifecycleStage, profile.lifecycle_stage)
    doc["tags"] = list(profile.tags)
    doc["custom_fields"] = _custom_fields(profile.custom_fields)
    doc["owner"] = profile.owner
    doc.setdefault("members", [])


def _timeline_key(entry: Doc) -> tuple[datetime, int, str]:
    # Entries of different sources may tie on time and (their own logs')
    # position; the id settles it, so the order never depends on which
    # topic was consumed first.
    when = entry.get("occurred_at") or datetime.min.replace(tzinfo=UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when, int(entry.get("position", 0)), str(entry["entry_id"])


def add_to_timeline(doc: Doc, entry: Doc, limit: int = TIMELINE_LIMIT) -> None:
    """Inserts newest first by occurrence (interactions may be logged late)."""
    timeline = [e for e in doc.get("timeline", []) if e["entry_id"] != entry["entry_id"]]
    timeline.append(entry)
    timeline.sort(key=_timeline_key, reverse=True)
    doc["timeline"] = timeline[:limit]


def _entry(
    event: events_pb2.ContactEvent,
    *,
    entry_id: str,
    kind: str,
    summary: str,
    occurred_at: datetime | None,
    direction: str = "unspecified",
    channel: str = "unspecified",
    owner: str = "",
) -> Doc:
    return {
        "entry_id": entry_id,
        "source": SOURCE,
        "kind": kind,
        "summary": summary,
        "occurred_at": occurred_at,
        "direction": direction,
        "channel": channel,
        "owner": owner,
        "position": event.position,
    }


def _record_consent(doc: Doc, consent: events_pb2.ConsentRecorded) -> None:
    channel = enum_word(contacts_pb2.Channel, consent.channel)
    channels = []
    found = False
    for entry in doc.get("channels", []):
        if entry["channel"] == channel and entry["address"] == consent.address:
            entry = {**entry, "consent": _consent(consent.consent)}
            found = True
        channels.append(entry)
    if not found:
        channels.append(
            {
                "channel": channel,
                "address": consent.address,
                "preferred": False,
                "consent": _consent(consent.consent),
            }
        )
    doc["channels"] = channels


def _link(
    doc: Doc,
    event: events_pb2.ContactEvent,
    link: events_pb2.PersonLinkedToCompany,
    company: Doc | None,
) -> None:
    # The event carries the name at link time; a company document that has
    # applied a later position knows a newer one (its rename may have been
    # consumed first, since the company's events sit in another partition).
    name, name_position = link.company_name, event.position
    if company and company.get("kind") == "company" and applied_position(company) > event.position:
        name, name_position = company.get("display_name", name), applied_position(company)
    companies = [c for c in doc.get("companies", []) if c["company_id"] != link.company_id]
    companies.append(
        {
            "company_id": link.company_id,
            "company_name": name,
            "role": link.role,
            "name_position": name_position,
        }
    )
    doc["companies"] = companies


def apply_event(
    doc: Doc | None,
    event: events_pb2.ContactEvent,
    companies: Mapping[str, Doc | None] | None = None,
) -> Applied:
    """Applies one event to its contact's document (created if `doc` is None).

    Never changes `doc`: the result is a shallow copy in which every changed
    field is a new value (cheap even with a full timeline, and a failed
    event leaves the caller's document intact). `companies` holds the current documents of
    the companies a link event refers to (see `companies_referenced`).
    """
    if not event.contact_id:
        raise ValueError("event without contact_id")
    current = doc if doc is not None else new_document(event.contact_id)
    if event.position <= applied_position(current):
        return Applied(current, applied=False)
    payload = event.WhichOneof("payload")
    if payload is None:
        raise UnknownEvent(f"event at position {event.position} has no known payload")
    new = dict(current)
    occurred_at = to_datetime(event.occurred_at)
    fan_out: list[FanOut] = []

    if payload == "person_registered":
        _set_person_profile(new, event.person_registered.profile)
        new.setdefault("created_at", occurred_at)
        add_to_timeline(
            new,
            _entry(
                event,
                entry_id=f"{event.contact_id}:created",
                kind="profile.created",
                summary=f"Person {new['display_name']} registered",
                occurred_at=occurred_at,
                owner=event.actor,
            ),
        )
    elif payload == "person_profile_updated":
        _set_person_profile(new, event.person_profile_updated.profile)
    elif payload == "company_registered":
        _set_company_profile(new, event.company_registered.profile)
        new.setdefault("created_at", occurred_at)
        add_to_timeline(
            new,
            _entry(
                event,
                entry_id=f"{event.contact_id}:created",
                kind="profile.created",
                summary=f"Company {new['display_name']} registered",
                occurred_at=occurred_at,
                owner=event.actor,
            ),
        )
    elif payload == "company_profile_updated":
        update = event.company_profile_updated
        before = current.get("display_name")
        _set_company_profile(new, update.profile)
        if before != update.profile.name or "name" in update.changed_fields:
            fan_out.append(
                CompanyRenamed(
                    company_id=event.contact_id,
                    company_name=update.profile.name,
                    position=event.position,
                    occurred_at=occurred_at or _EPOCH,
                )
            )
    elif payload == "person_linked_to_company":
        link = event.person_linked_to_company
        _link(new, event, link, (companies or {}).get(link.company_id))
        fan_out.append(
            MembershipChanged(
                company_id=link.company_id,
                person_id=event.contact_id,
                role=link.role,
                position=event.position,
                occurred_at=occurred_at or _EPOCH,
            )
        )
    elif payload == "person_unlinked_from_company":
        company_id = event.person_unlinked_from_company.company_id
        new["companies"] = [c for c in new.get("companies", []) if c["company_id"] != company_id]
        fan_out.append(
            MembershipChanged(
                company_id=company_id,
                person_id=event.contact_id,
                role=None,
                position=event.position,
                occurred_at=occurred_at or _EPOCH,
            )
        )
    elif payload == "consent_recorded":
        _record_consent(new, event.consent_recorded)
    elif payload == "interaction_logged":
        i = event.interaction_logged.interaction
        kind = enum_word(contacts_pb2.InteractionKind, i.kind)
        add_to_timeline(
            new,
            _entry(
                event,
                entry_id=i.interaction_id or f"{event.contact_id}:{event.version}",
                kind=f"interaction.{kind}",
                summary=i.summary,
                occurred_at=to_datetime(i.occurred_at) or occurred_at,
                direction=enum_word(contacts_pb2.Direction, i.direction),
                channel=enum_word(contacts_pb2.Channel, i.channel),
                owner=i.owner,
            ),
        )
    else:  # a payload added to the contract after this code was written
        raise UnknownEvent(f"event at position {event.position} carries {payload}")

    advance(new, event.position, occurred_at)
    return Applied(new, applied=True, fan_out=fan_out)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def advance(doc: Doc, position: int, occurred_at: datetime | None, source: str = SOURCE) -> None:
    """Records that the document has seen `position` of `source`."""
    doc["positions"] = {**(doc.get("positions") or {}), source: position}
    if occurred_at is not None:
        previous = doc.get("updated_at")
        if previous is None or _aware(previous) < occurred_at:
            doc["updated_at"] = occurred_at


def apply_membership(company: Doc | None, change: MembershipChanged) -> Doc:
    """The company side of a link or unlink (a placeholder if not registered yet)."""
    doc = dict(company) if company is not None else new_document(change.company_id)
    members = [m for m in doc.get("members", []) if m["person_id"] != change.person_id]
    if change.role is not None:
        members.append(
            {"person_id": change.person_id, "role": change.role, "since": change.occurred_at}
        )
    # Links come from the persons' partitions in any order; sorting keeps the
    # document the same whatever order they were consumed in.
    members.sort(key=lambda m: (_aware(m["since"] or _EPOCH), m["person_id"]))
    doc["members"] = members
    return doc


def apply_rename(person: Doc, change: CompanyRenamed) -> Doc:
    """The person side of a company rename; the store does the same in one update.

    Only memberships whose name is older than the rename change, so a rename
    consumed late never overwrites a newer name from a later link.
    """
    companies = []
    changed = False
    for membership in person.get("companies", []):
        if (
            membership["company_id"] == change.company_id
            and membership.get("name_position", 0) < change.position
        ):
            membership = {
                **membership,
                "company_name": change.company_name,
                "name_position": change.position,
            }
            changed = True
        companies.append(membership)
    return {**person, "companies": companies} if changed else person


def companies_referenced(event: events_pb2.ContactEvent) -> list[str]:
    """Company documents that applying `event` reads or changes."""
    payload = event.WhichOneof("payload")
    if payload == "person_linked_to_company":
        return [event.person_linked_to_company.company_id]
    if payload == "person_unlinked_from_company":
        return [event.person_unlinked_from_company.company_id]
    return []


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
