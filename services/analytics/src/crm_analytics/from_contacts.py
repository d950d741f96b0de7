"""The contacts topic into the 360 view: how one contacts event changes one document.

Pure functions over the stored document (`document.Customer360`), with no
MongoDB and no Kafka, so every rule is testable on its own. The store loads
the documents, calls `apply_event` in log order, and writes the results.
Each payload of `crm.events.v1.ContactEvent` has one handler in `_HANDLERS`,
keyed by its oneof name.

Rules that matter (the shared ones are in `document.py`):

- Profile events carry the full profile after the change, so they replace
  the profile fields instead of patching them.
- Effects on other documents are returned as fan-out instructions instead of
  being applied here: a company's rename must reach the persons linked to it
  (`CompanyRenamed`, applied by the store with one update over all of them),
  and a person's link or unlink changes the company's member list
  (`MembershipChanged`).
- Nothing depends on the order in which different customers' partitions are
  consumed, so a rebuild produces the same documents.
- The timeline tells what happened to the contact: its registration,
  interactions, lifecycle changes (with the rule that caused them), consent
  changes, company links and unlinks, merges, erasure and exports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crm.contacts.v1 import contacts_pb2
from crm.events.v1 import contacts_pb2 as events_pb2
from crm_analytics.document import (
    EPOCH,
    Applied,
    ChannelEntry,
    CompanyLink,
    CompanyRenamed,
    Consent,
    Customer360,
    CustomField,
    FanOut,
    Loaded,
    Member,
    MembershipChanged,
    PersonErased,
    SourceAdapter,
    TimelineEntry,
    UnknownEvent,
    add_to_timeline,
    advance,
    applied_position,
    aware,
    decode_event,
    new_document,
    to_datetime,
)
from crm_analytics.personal_data import erase_document
from crm_common.enums import enum_word
from crm_common.records import Record

SOURCE = "contacts"


# -- conversions ------------------------------------------------------------------------


def _consent(consent: contacts_pb2.Consent) -> Consent:
    return {
        "status": enum_word(contacts_pb2.ConsentStatus, consent.status),
        "source": consent.source,
        "recorded_at": to_datetime(consent.recorded_at),
    }


def _channels(channels: Iterable[contacts_pb2.ChannelIdentity]) -> list[ChannelEntry]:
    return [
        {
            "channel": enum_word(contacts_pb2.Channel, c.channel),
            "address": c.address,
            "preferred": c.preferred,
            "consent": _consent(c.consent),
        }
        for c in channels
    ]


def _custom_fields(
    fields: Mapping[str, contacts_pb2.CustomFieldValue],
) -> dict[str, CustomField]:
    return {
        name: {"type": v.type, "value": v.value, "currency": v.currency}
        for name, v in sorted(fields.items())
    }


def _person_name(given: str, family: str) -> str:
    return " ".join(p for p in (given, family) if p)


def _set_person_profile(doc: Customer360, profile: events_pb2.PersonProfile) -> None:
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


def _set_company_profile(doc: Customer360, profile: events_pb2.CompanyProfile) -> None:
    doc["kind"] = "company"
    doc["display_name"] = profile.name
    doc["domain"] = profile.domain
    doc["industry"] = profile.industry
    doc["lifecycle_stage"] = enum_word(contacts_pb2.LifecycleStage, profile.lifecycle_stage)
    doc["tags"] = list(profile.tags)
    doc["custom_fields"] = _custom_fields(profile.custom_fields)
    doc["owner"] = profile.owner
    doc.setdefault("members", [])


def _entry(
    event: events_pb2.ContactEvent,
    *,
    entry_id: str,
    kind: str,
    summary: str,
    occurred_at: datetime | None,
    direction: str | None = None,
    channel: str | None = None,
    owner: str = "",
) -> TimelineEntry:
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


# -- one handler per payload ------------------------------------------------------------


@dataclass
class _Change:
    """One event being applied: the document before, the copy it changes, and its effects."""

    event: events_pb2.ContactEvent
    before: Customer360
    doc: Customer360
    occurred_at: datetime | None
    companies: Mapping[str, Customer360 | None]
    fan_out: list[FanOut] = field(default_factory=list)


def _note(
    change: _Change,
    key: str,
    kind: str,
    summary: str,
    *,
    occurred_at: datetime | None = None,
    channel: str | None = None,
) -> None:
    """A timeline entry for a change of the contact by the event's actor; its id
    is `<contact id>:<key>` (the same in a rebuild)."""
    add_to_timeline(
        change.doc,
        _entry(
            change.event,
            entry_id=f"{change.event.contact_id}:{key}",
            kind=kind,
            summary=summary,
            occurred_at=occurred_at or change.occurred_at,
            channel=channel,
            owner=change.event.actor,
        ),
    )


def _registered(change: _Change, what: str) -> None:
    change.doc.setdefault("created_at", change.occurred_at)
    _note(change, "created", "profile.created", f"{what} {change.doc['display_name']} registered")


def _person_registered(change: _Change) -> None:
    _set_person_profile(change.doc, change.event.person_registered.profile)
    _registered(change, "Person")


def _lifecycle_changed(change: _Change, cause: str) -> None:
    """A timeline entry when the profile's lifecycle stage changed (an edit, or
    a lifecycle rule: `cause` names it and what fired it)."""
    before = change.before.get("lifecycle_stage")
    after = change.doc.get("lifecycle_stage")
    if before == after or not change.before.get("kind"):
        return
    why = f" ({cause})" if cause else ""
    _note(
        change,
        f"{change.event.position}:lifecycle",
        "profile.lifecycle_changed",
        f"Lifecycle stage {before or 'unset'} -> {after or 'unset'}{why}",
    )


def _person_profile_updated(change: _Change) -> None:
    update = change.event.person_profile_updated
    _set_person_profile(change.doc, update.profile)
    _lifecycle_changed(change, update.cause)


def _company_registered(change: _Change) -> None:
    _set_company_profile(change.doc, change.event.company_registered.profile)
    _registered(change, "Company")


def _company_profile_updated(change: _Change) -> None:
    update = change.event.company_profile_updated
    _set_company_profile(change.doc, update.profile)
    _lifecycle_changed(change, update.cause)
    if change.before.get("display_name") != update.profile.name or (
        "name" in update.changed_fields
    ):
        change.fan_out.append(
            CompanyRenamed(
                company_id=change.event.contact_id,
                company_name=update.profile.name,
                position=change.event.position,
                occurred_at=change.occurred_at or EPOCH,
            )
        )


def _person_linked_to_company(change: _Change) -> None:
    event, link = change.event, change.event.person_linked_to_company
    # The event carries the name at link time; a company document that has
    # applied a later position knows a newer one (its rename may have been
    # consumed first, since the company's events sit in another partition).
    name, name_position = link.company_name, event.position
    company = change.companies.get(link.company_id)
    if (
        company
        and company.get("kind") == "company"
        and applied_position(company, SOURCE) > event.position
    ):
        name, name_position = company.get("display_name", name), applied_position(company, SOURCE)
    companies = [c for c in change.doc.get("companies", []) if c["company_id"] != link.company_id]
    companies.append(
        {
            "company_id": link.company_id,
            "company_name": name,
            "role": link.role,
            "name_position": name_position,
        }
    )
    change.doc["companies"] = companies
    role = f" as {link.role}" if link.role else ""
    # The event's name, not a newer one known from the company: the
    # entry must not depend on the order the partitions were consumed in.
    _note(
        change, f"{event.position}:linked", "company.linked", f"Linked to {link.company_name}{role}"
    )
    change.fan_out.append(
        MembershipChanged(
            company_id=link.company_id,
            person_id=event.contact_id,
            role=link.role,
            position=event.position,
            occurred_at=change.occurred_at or EPOCH,
        )
    )


def _person_unlinked_from_company(change: _Change) -> None:
    event = change.event
    company_id = event.person_unlinked_from_company.company_id
    change.doc["companies"] = [
        c for c in change.doc.get("companies", []) if c["company_id"] != company_id
    ]
    # The id: the name the person's link shows depends on which renames
    # were consumed yet, and the entry must be the same in a rebuild.
    _note(
        change,
        f"{event.position}:unlinked",
        "company.unlinked",
        f"Unlinked from company {company_id}",
    )
    change.fan_out.append(
        MembershipChanged(
            company_id=company_id,
            person_id=change.event.contact_id,
            role=None,
            position=change.event.position,
            occurred_at=change.occurred_at or EPOCH,
        )
    )


def _consent_recorded(change: _Change) -> None:
    recorded = change.event.consent_recorded
    channel = enum_word(contacts_pb2.Channel, recorded.channel)
    channels: list[ChannelEntry] = []
    found = False
    for entry in change.doc.get("channels", []):
        if entry["channel"] == channel and entry["address"] == recorded.address:
            entry = {**entry, "consent": _consent(recorded.consent)}
            found = True
        channels.append(entry)
    if not found:
        channels.append(
            {
                "channel": channel,
                "address": recorded.address,
                "preferred": False,
                "consent": _consent(recorded.consent),
            }
        )
    change.doc["channels"] = channels
    status = enum_word(contacts_pb2.ConsentStatus, recorded.consent.status) or "unset"
    source = f" ({recorded.consent.source})" if recorded.consent.source else ""
    _note(
        change,
        f"{change.event.position}:consent",
        "consent.recorded",
        f"Consent {status} for {channel or 'a channel'} {recorded.address}{source}",
        occurred_at=to_datetime(recorded.consent.recorded_at) or change.occurred_at,
        channel=channel,
    )


def _interaction_logged(change: _Change) -> None:
    event, i = change.event, change.event.interaction_logged.interaction
    add_to_timeline(
        change.doc,
        _entry(
            event,
            entry_id=i.interaction_id or f"{event.contact_id}:{event.version}",
            kind=f"interaction.{enum_word(contacts_pb2.InteractionKind, i.kind)}",
            summary=i.summary,
            occurred_at=to_datetime(i.occurred_at) or change.occurred_at,
            direction=enum_word(contacts_pb2.Direction, i.direction),
            channel=enum_word(contacts_pb2.Channel, i.channel),
            owner=i.owner,
        ),
    )


def _set_merged_profile(doc: Customer360, message: Any) -> None:
    """A merge event's profile: a person's or a company's, whichever it holds."""
    if message.HasField("person_profile"):
        _set_person_profile(doc, message.person_profile)
    elif message.HasField("company_profile"):
        _set_company_profile(doc, message.company_profile)


def _contacts_merged(change: _Change) -> None:
    """The survivor of a merge: its profile after it, and the contacts it took
    over. Their own documents stay (what other sources keep recording under
    their ids lands there) and point here; a read of the survivor's view
    names them (`merged_ids`)."""
    merged = change.event.contacts_merged
    _set_merged_profile(change.doc, merged)
    ids = list(dict.fromkeys([*change.doc.get("merged_ids", []), *merged.merged_ids]))
    change.doc["merged_ids"] = ids
    _note(
        change,
        f"merge:{merged.merge_id}",
        "profile.merged",
        f"Merged with {len(merged.merged_ids)} duplicate(s)",
    )


def _contact_merge_undone(change: _Change) -> None:
    undone = change.event.contact_merge_undone
    _set_merged_profile(change.doc, undone)
    restored = set(undone.restored_ids)
    change.doc["merged_ids"] = [i for i in change.doc.get("merged_ids", []) if i not in restored]
    _note(
        change,
        f"unmerge:{undone.merge_id}",
        "profile.merge_undone",
        f"Merge undone: {len(restored)} contact(s) restored",
    )


def _contact_merged_into(change: _Change) -> None:
    change.doc["merged_into"] = change.event.contact_merged_into.survivor_id


def _contact_unmerged(change: _Change) -> None:
    change.doc.pop("merged_into", None)


def _person_erased(change: _Change) -> None:
    """The person's personal data was erased (crypto-shredded) in contacts: the
    document keeps the anonymous facts, every personal value reads "[erased]",
    and the documents of the contacts merged into the person follow (fan-out)."""
    event, erased = change.event, change.event.person_erased
    reference = f" ({erased.reference})" if erased.reference else ""
    _note(change, "erased", "profile.erased", f"Personal data erased{reference}")
    change.doc = erase_document(change.doc)
    ids = dict.fromkeys([event.contact_id, *erased.merged_ids])
    change.fan_out.append(PersonErased(tuple(ids), event.position))


def _personal_data_exported(change: _Change) -> None:
    """Who exported everything held about the person, and when (GDPR audit)."""
    event, exported = change.event, change.event.personal_data_exported
    services = ", ".join(exported.services)
    _note(
        change,
        f"exported:{event.position}",
        "privacy.exported",
        f"Personal data exported ({services})" if services else "Personal data exported",
    )


_HANDLERS: dict[str, Callable[[_Change], None]] = {
    "person_registered": _person_registered,
    "person_profile_updated": _person_profile_updated,
    "company_registered": _company_registered,
    "company_profile_updated": _company_profile_updated,
    "person_linked_to_company": _person_linked_to_company,
    "person_unlinked_from_company": _person_unlinked_from_company,
    "consent_recorded": _consent_recorded,
    "interaction_logged": _interaction_logged,
    "contacts_merged": _contacts_merged,
    "contact_merge_undone": _contact_merge_undone,
    "contact_merged_into": _contact_merged_into,
    "contact_unmerged": _contact_unmerged,
    "person_erased": _person_erased,
    "personal_data_exported": _personal_data_exported,
}
#: The payloads of `ContactEvent` this version applies.
PAYLOADS = frozenset(_HANDLERS)

# The company document each link payload reads or changes.
_COMPANY_OF: dict[str, Callable[[events_pb2.ContactEvent], str]] = {
    "person_linked_to_company": lambda e: e.person_linked_to_company.company_id,
    "person_unlinked_from_company": lambda e: e.person_unlinked_from_company.company_id,
}


# -- applying ---------------------------------------------------------------------------


def apply_event(
    doc: Customer360 | None,
    event: events_pb2.ContactEvent,
    companies: Mapping[str, Customer360 | None] | None = None,
) -> Applied:
    """Applies one event to its contact's document (created if `doc` is None).

    Never changes `doc`: the result is a shallow copy in which every changed
    field is a new value (cheap even with a full timeline, and a failed
    event leaves the caller's document intact). `companies` holds the
    current documents of the companies a link event refers to (see
    `companies_referenced`).
    """
    if not event.contact_id:
        raise ValueError("event without contact_id")
    current = doc if doc is not None else new_document(event.contact_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    payload = event.WhichOneof("payload")
    if payload is None:
        raise UnknownEvent(f"event at position {event.position} has no known payload")
    handler = _HANDLERS.get(payload)
    if handler is None:  # a payload added to the contract after this code was written
        raise UnknownEvent(f"event at position {event.position} carries {payload}")
    change = _Change(
        event=event,
        before=current,
        doc=current.copy(),
        occurred_at=to_datetime(event.occurred_at),
        companies=companies or {},
    )
    handler(change)
    advance(change.doc, event.position, change.occurred_at, SOURCE)
    return Applied(change.doc, applied=True, fan_out=change.fan_out)


def apply_membership(company: Customer360 | None, change: MembershipChanged) -> Customer360:
    """The company side of a link or unlink (a placeholder if not registered yet)."""
    doc = company.copy() if company is not None else new_document(change.company_id)
    members = [m for m in doc.get("members", []) if m["person_id"] != change.person_id]
    if change.role is not None:
        member: Member = {
            "person_id": change.person_id,
            "role": change.role,
            "since": change.occurred_at,
        }
        members.append(member)
    # Links come from the persons' partitions in any order; sorting keeps the
    # document the same whatever order they were consumed in.
    members.sort(key=lambda m: (aware(m["since"] or EPOCH), m["person_id"]))
    doc["members"] = members
    return doc


def apply_rename(person: Customer360, change: CompanyRenamed) -> Customer360:
    """The person side of a company rename; the store does the same in one update.

    Only memberships whose name is older than the rename change, so a rename
    consumed late never overwrites a newer name from a later link.
    """
    companies: list[CompanyLink] = []
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
    if not changed:
        return person
    renamed = person.copy()
    renamed["companies"] = companies
    return renamed


def companies_referenced(event: events_pb2.ContactEvent) -> list[str]:
    """Company documents that applying `event` reads or changes."""
    company_of = _COMPANY_OF.get(event.WhichOneof("payload") or "")
    return [company_of(event)] if company_of else []


def erased_with(event: events_pb2.ContactEvent) -> list[str]:
    """The contacts merged into a person whose erasure `event` is (their documents too)."""
    if event.WhichOneof("payload") != "person_erased":
        return []
    return list(event.person_erased.merged_ids)


# -- the source ---------------------------------------------------------------------------


def decode(record: Record) -> events_pb2.ContactEvent:
    return decode_event(record, events_pb2.ContactEvent, "contact_id")


def _apply(event: events_pb2.ContactEvent, loaded: Loaded) -> Applied:
    return apply_event(loaded.docs.get(event.contact_id), event, loaded.docs)


#: How the store consumes the contacts topic. A document starts with its
#: registration: an event of a contact never seen creates nothing when it
#: cannot be applied.
ADAPTER: SourceAdapter[events_pb2.ContactEvent] = SourceAdapter(
    source=SOURCE,
    decode=decode,
    customer_of=lambda e: e.contact_id,
    customers_touched=lambda e: [e.contact_id, *companies_referenced(e), *erased_with(e)],
    apply=_apply,
    creates_documents=False,
)
