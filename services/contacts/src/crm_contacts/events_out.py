"""Stored domain events as the public `crm.events.v1.ContactEvent` messages.

The relay calls `to_wire` for every event of the notification log. Each
contact event becomes one message keyed by the contact id, with the CloudEvents
type `crm.contacts.v1.<EventName>`; internal events (command receipts) are
not published. An event type this module does not know is an error, not a
silent skip: the relay must never drop a contact's history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from crm.contacts.v1 import contacts_pb2 as pb
from crm.events.v1 import contacts_pb2 as events_pb
from crm_common.commands import CommandReceipt
from crm_common.enums import enum_number
from crm_contacts import messages
from crm_contacts.domain import (
    Company,
    CompanyProfile,
    Consent,
    ConsentStatus,
    Contact,
    Interaction,
    Person,
    PersonProfile,
)
from crm_contacts.domain.field_definitions import FieldCatalogue

CE_TYPE_PREFIX = "crm.contacts.v1."
PROTO_MESSAGE = events_pb.ContactEvent.DESCRIPTOR.full_name

# Events of the store that are not part of a contact's history: bookkeeping
# (command receipts) and the custom-field definitions, which the contacts API
# serves (they are not published yet).
INTERNAL_EVENTS: tuple[type[Any], ...] = (CommandReceipt.Event, FieldCatalogue.Event)


class UnpublishableEvent(TypeError):
    """A stored event that has no public form in `crm.events.v1.ContactEvent`."""


Fill = Callable[[events_pb.ContactEvent, Mapping[str, Any]], None]


def _person_registered(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    profile = PersonProfile.from_dict(data["profile"])
    message.person_registered.profile.CopyFrom(messages.person_profile_pb(profile))


def _person_profile_updated(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    profile = PersonProfile.from_dict(data["profile"])
    update = message.person_profile_updated
    update.profile.CopyFrom(messages.person_profile_pb(profile))
    update.changed_fields.extend(data["changed_fields"])
    update.cause = data.get("cause", "")


def _company_registered(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    profile = CompanyProfile.from_dict(data["profile"])
    message.company_registered.profile.CopyFrom(messages.company_profile_pb(profile))


def _company_profile_updated(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    profile = CompanyProfile.from_dict(data["profile"])
    update = message.company_profile_updated
    update.profile.CopyFrom(messages.company_profile_pb(profile))
    update.changed_fields.extend(data["changed_fields"])
    update.cause = data.get("cause", "")


def _person_linked(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    message.person_linked_to_company.CopyFrom(
        events_pb.PersonLinkedToCompany(
            company_id=data["company_id"], company_name=data["company_name"], role=data["role"]
        )
    )


def _person_unlinked(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    message.person_unlinked_from_company.company_id = data["company_id"]


def _consent_recorded(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    consent = Consent(ConsentStatus(data["status"]), data["source"], data["at"])
    message.consent_recorded.CopyFrom(
        events_pb.ConsentRecorded(
            channel=enum_number(pb.Channel, data["channel"]),
            address=data["address"],
            consent=messages.consent_pb(consent),
        )
    )


def _interaction_logged(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    interaction = Interaction.from_dict(data["interaction"])
    message.interaction_logged.interaction.CopyFrom(messages.interaction_pb(interaction))


def _profile_into(target: Any, profile: Mapping[str, Any]) -> None:
    """A merge event's profile, by kind: persons have names, companies a name."""
    if "given_name" in profile:
        target.person_profile.CopyFrom(messages.person_profile_pb(PersonProfile.from_dict(profile)))
    else:
        target.company_profile.CopyFrom(
            messages.company_profile_pb(CompanyProfile.from_dict(profile))
        )


def _absorbed(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    merged = message.contacts_merged
    merged.merge_id = data["merge_id"]
    merged.merged_ids.extend(data["merged_ids"])
    _profile_into(merged, data["after"])
    merged.interaction_ids.extend(i["interaction_id"] for i in data["interactions"])
    merged.company_ids.extend(a["company_id"] for a in data["affiliations"])


def _merged_into(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    message.contact_merged_into.merge_id = data["merge_id"]
    message.contact_merged_into.survivor_id = data["survivor_id"]


def _merge_undone(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    undone = message.contact_merge_undone
    undone.merge_id = data["merge_id"]
    undone.restored_ids.extend(data["restored_ids"])
    _profile_into(undone, data["profile"])
    undone.interaction_ids.extend(data["interactions"])
    undone.company_ids.extend(data["affiliations"])


def _unmerged(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    message.contact_unmerged.merge_id = data["merge_id"]


def _person_erased(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    message.person_erased.reference = data["reference"]
    message.person_erased.merged_ids.extend(data["merged_ids"])


def _personal_data_exported(message: events_pb.ContactEvent, data: Mapping[str, Any]) -> None:
    message.personal_data_exported.services.extend(data["services"])


#: Stored event type -> the name of its payload message in `ContactEvent` (also
#: the CloudEvents type's last part) and how the payload is filled in.
PAYLOADS: dict[type[Any], tuple[str, Fill]] = {
    Person.PersonRegistered: ("PersonRegistered", _person_registered),
    Person.PersonProfileUpdated: ("PersonProfileUpdated", _person_profile_updated),
    Company.CompanyRegistered: ("CompanyRegistered", _company_registered),
    Company.CompanyProfileUpdated: ("CompanyProfileUpdated", _company_profile_updated),
    Person.PersonLinkedToCompany: ("PersonLinkedToCompany", _person_linked),
    Person.PersonUnlinkedFromCompany: ("PersonUnlinkedFromCompany", _person_unlinked),
    Person.ConsentRecorded: ("ConsentRecorded", _consent_recorded),
    Contact.InteractionLogged: ("InteractionLogged", _interaction_logged),
    Contact.ContactsMerged: ("ContactsMerged", _absorbed),
    Contact.ContactMergedInto: ("ContactMergedInto", _merged_into),
    Contact.ContactMergeUndone: ("ContactMergeUndone", _merge_undone),
    Contact.ContactUnmerged: ("ContactUnmerged", _unmerged),
    Person.PersonErased: ("PersonErased", _person_erased),
    Person.PersonalDataExported: ("PersonalDataExported", _personal_data_exported),
}


def _message(
    event: Any, meta: Mapping[str, Any], position: int
) -> tuple[str, events_pb.ContactEvent]:
    payload = PAYLOADS.get(type(event))
    if payload is None:
        raise UnpublishableEvent(
            f"{type(event).__module__}.{type(event).__qualname__} has no ContactEvent payload"
        )
    name, fill = payload
    message = events_pb.ContactEvent(
        contact_id=str(event.originator_id),
        version=event.originator_version,
        position=position,
        occurred_at=messages.timestamp(event.timestamp),
        actor=str(meta.get("actor") or ""),
        client=str(meta.get("client") or ""),
    )
    fill(message, event.__dict__)
    return name, message


def contact_event(event: Any, meta: Mapping[str, Any], position: int) -> events_pb.ContactEvent:
    """The public message of one stored contact event."""
    return _message(event, meta, position)[1]


def to_wire(event: Any, meta: dict[str, Any], position: int) -> tuple[str, str, bytes] | None:
    """(key, CloudEvents type, payload) for the relay; None for internal events."""
    if isinstance(event, INTERNAL_EVENTS):
        return None
    name, message = _message(event, meta, position)
    return message.contact_id, CE_TYPE_PREFIX + name, message.SerializeToString()
