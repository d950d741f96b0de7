"""Contacts' part of a person's export (docs/privacy-export.md): everything the
contacts store holds about one person, as a JSON-ready mapping.

Built from the person's aggregate and its stored events (their personal
values opened, or "[erased]" once the person was erased): the contact as
`GetContact` shows it but with every interaction, the custom fields with
their definitions' labels, the company links, the consent records, the
contacts merged into the person with their own histories, and the person's
full event history (type, version, time, who, and the event's fields).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from eventsourcing.application import Application

from crm_contacts.domain import Contact, Person, PersonProfile
from crm_contacts.domain.field_definitions import FieldDefinition
from crm_contacts.views import ContactView

#: Fields every stored event has, shown as the history entry's own keys.
_ENVELOPE = frozenset(
    {"originator_id", "originator_version", "timestamp", "originator_topic", "_meta"}
)


def plain(value: Any) -> Any:
    """`value` as JSON holds it: times ISO 8601, ids and amounts as text."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, UUID | Decimal):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def contact_document(view: ContactView) -> dict[str, Any]:
    """The contact as the REST `GET /contacts/{id}` shows it (every field)."""
    profile = view.profile
    document: dict[str, Any] = {
        "id": view.id,
        "kind": str(view.kind),
        "version": view.version,
        "name": view.display_name,
        "given_name": profile.given_name if isinstance(profile, PersonProfile) else None,
        "family_name": profile.family_name if isinstance(profile, PersonProfile) else None,
        "lifecycle_stage": str(profile.lifecycle_stage),
        "tags": list(profile.tags),
        "custom_fields": {
            key: {"type": str(v.type), "value": v.value, "currency": v.currency}
            for key, v in profile.custom_fields.items()
        },
        "owner": profile.owner,
        "channels": (
            [plain(c.to_dict()) for c in profile.channels]
            if isinstance(profile, PersonProfile)
            else []
        ),
        "affiliations": [
            {"company_id": a.company_id, "company_name": a.company_name, "role": a.role}
            for a in view.affiliations
        ],
        "interactions": [plain(i.to_dict()) for i in view.interactions],
        "interactions_total": view.interactions_total,
        "created_at": view.created_at.isoformat(),
        "updated_at": view.updated_at.isoformat(),
        "erased": view.erased,
    }
    return document


def history(app: Application[UUID], contact_id: UUID) -> list[dict[str, Any]]:
    """Every stored event of the contact, oldest first: its type, version, time,
    who recorded it (actor, client, command, request id) and its fields."""
    entries = []
    stored: Iterable[Any] = app.events.get(contact_id)
    for event in stored:
        meta: Mapping[str, Any] = getattr(event, "_meta", None) or {}
        fields = {k: v for k, v in vars(event).items() if k not in _ENVELOPE}
        entries.append(
            {
                "type": type(event).__name__,
                "version": event.originator_version,
                "at": event.timestamp.isoformat(),
                "actor": str(meta.get("actor") or ""),
                "client": str(meta.get("client") or ""),
                "command": str(meta.get("command") or ""),
                "request_id": str(meta.get("request_id") or ""),
                "fields": plain(fields),
            }
        )
    return entries


def _consent_records(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "channel": e["fields"]["channel"],
            "address": e["fields"]["address"],
            "status": e["fields"]["status"],
            "source": e["fields"]["source"],
            "recorded_at": e["fields"]["at"],
            "actor": e["actor"],
        }
        for e in events
        if e["type"] == "ConsentRecorded"
    ]


def contacts_part(
    app: Application[UUID],
    person: Person,
    view: ContactView,
    definitions: Mapping[str, FieldDefinition],
    merged: Iterable[Contact],
) -> dict[str, Any]:
    """Contacts' part of the export of `person` (`view`: as GetContact shows it, with
    every interaction); `merged`: the contacts merged into the person."""
    events = history(app, person.id)
    profile = person.profile
    custom_fields = []
    for key, value in sorted(profile.custom_fields.items()):
        definition = definitions.get(key)
        custom_fields.append(
            {
                "key": key,
                "label": definition.label if definition is not None else key,
                "type": str(value.type),
                "value": value.value,
                "currency": value.currency,
                "retired": bool(definition is not None and definition.retired),
            }
        )
    current_consent = [
        {
            "channel": str(c.channel),
            "address": c.address,
            "status": str(c.consent.status),
            "source": c.consent.source,
            "recorded_at": c.consent.recorded_at.isoformat(),
        }
        for c in profile.channels
        if c.consent is not None
    ]
    return {
        "contact": contact_document(view),
        "custom_fields": custom_fields,
        "companies": [
            {"company_id": a.company_id, "company_name": a.company_name, "role": a.role}
            for a in person.affiliations.values()
        ],
        "consent": {
            "current": current_consent,
            "recorded": _consent_records(events),
        },
        "merged": [
            {
                "id": str(other.id),
                "kind": str(other.KIND),
                "name": other.display_name,
                "history": history(app, other.id),
            }
            for other in merged
        ],
        "history": events,
    }
