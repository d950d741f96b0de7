"""Stored domain events as the public `crm.events.v1.TicketEvent` messages.

The relay calls `to_wire` for every event of the notification log. Each event
of a case or SLA policy becomes one message with the CloudEvents type
`crm.tickets.v1.<PayloadName>` (`SlaBreached`, ...), keyed by the case's
contact id (the policy's id for policy events). Command receipts are internal
and not published; an event this module does not know is an error, never a
silent skip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from crm.events.v1 import tickets_pb2 as events_pb
from crm.tickets.v1 import tickets_pb2 as pb
from crm_common.commands import CommandReceipt
from crm_common.enums import enum_number
from crm_tickets.domain import Case, SlaPolicy
from crm_tickets.messages import terms_pb, timestamp

CE_TYPE_PREFIX = "crm.tickets.v1."
PROTO_MESSAGE = events_pb.TicketEvent.DESCRIPTOR.full_name
INTERNAL_EVENTS: tuple[type[Any], ...] = (CommandReceipt.Event,)


class UnpublishableEvent(TypeError):
    """A stored event that has no public form in `crm.events.v1.TicketEvent`."""


Data = Mapping[str, Any]
Fill = Callable[[events_pb.TicketEvent, Data], None]


def _priority(word: str) -> Any:
    return enum_number(pb.Priority, word)


FILLERS: dict[type[Any], tuple[str, str, Fill]] = {
    Case.Opened: (
        "CaseOpened",
        "case_opened",
        lambda m, d: m.case_opened.CopyFrom(
            events_pb.CaseOpened(
                channel=enum_number(pb.Channel, d["channel"]),
                subject=d["subject"],
                category=d["category"],
                priority=_priority(d["priority"]),
                team=d["team"],
                assignee=d["assignee"],
                tier=d["tier"],
                tier_source=d["tier_source"],
                policy_id=d["policy_id"],
                policy_version=d["policy_version"],
            )
        ),
    ),
    Case.Triaged: (
        "CaseTriaged",
        "case_triaged",
        lambda m, d: m.case_triaged.CopyFrom(
            events_pb.CaseTriaged(
                category=d["category"], priority=_priority(d["priority"]), team=d["team"]
            )
        ),
    ),
    Case.Assigned: (
        "CaseAssigned",
        "case_assigned",
        lambda m, d: m.case_assigned.CopyFrom(events_pb.CaseAssigned(assignee=d["assignee"])),
    ),
    Case.Replied: (
        "CaseReplied",
        "case_replied",
        lambda m, d: m.case_replied.CopyFrom(
            events_pb.CaseReplied(
                author_kind=enum_number(pb.AuthorKind, d["author_kind"]), author=d["author"]
            )
        ),
    ),
    Case.NoteAdded: (
        "CaseNoteAdded",
        "case_note_added",
        lambda m, d: m.case_note_added.CopyFrom(events_pb.CaseNoteAdded(author=d["author"])),
    ),
    Case.StatusChanged: (
        "CaseStatusChanged",
        "case_status_changed",
        lambda m, d: m.case_status_changed.CopyFrom(
            events_pb.CaseStatusChanged(status=enum_number(pb.CaseStatus, d["status"]))
        ),
    ),
    Case.SlaWarned: (
        "SlaWarned",
        "sla_warned",
        lambda m, d: m.sla_warned.CopyFrom(
            events_pb.SlaWarned(
                kind=d["kind"],
                due_at=timestamp(d["due_at"]),
                deadline_version=d["deadline_version"],
            )
        ),
    ),
    Case.SlaBreached: (
        "SlaBreached",
        "sla_breached",
        lambda m, d: m.sla_breached.CopyFrom(
            events_pb.SlaBreached(
                kind=d["kind"],
                due_at=timestamp(d["due_at"]),
                deadline_version=d["deadline_version"],
            )
        ),
    ),
    Case.Escalated: (
        "CaseEscalated",
        "case_escalated",
        lambda m, d: m.case_escalated.CopyFrom(
            events_pb.CaseEscalated(
                kind=d["kind"],
                priority=_priority(d["priority"]),
                team=d["team"],
                notify_team=d["notify_team"],
            )
        ),
    ),
    Case.SatisfactionRecorded: (
        "SatisfactionRecorded",
        "satisfaction_recorded",
        lambda m, d: m.satisfaction_recorded.CopyFrom(
            events_pb.SatisfactionRecorded(
                csat=d["csat"],
                ces=d["ces"] or 0,
                nps=-1 if d["nps"] is None else d["nps"],
            )
        ),
    ),
    SlaPolicy.Defined: (
        "SlaPolicyDefined",
        "sla_policy_defined",
        lambda m, d: m.sla_policy_defined.CopyFrom(
            events_pb.SlaPolicyDefined(name=d["name"], terms=terms_pb(d["terms"]))
        ),
    ),
    SlaPolicy.Revised: (
        "SlaPolicyRevised",
        "sla_policy_revised",
        lambda m, d: m.sla_policy_revised.CopyFrom(
            events_pb.SlaPolicyRevised(terms=terms_pb(d["terms"]))
        ),
    ),
    SlaPolicy.Retired: (
        "SlaPolicyRetired",
        "sla_policy_retired",
        lambda m, d: m.sla_policy_retired.CopyFrom(events_pb.SlaPolicyRetired()),
    ),
}


def to_wire(event: Any, meta: dict[str, Any], position: int) -> tuple[str, str, bytes] | None:
    """(key, CloudEvents type, payload) of a stored event; None for internal events."""
    if isinstance(event, INTERNAL_EVENTS):
        return None
    entry = FILLERS.get(type(event))
    if entry is None:
        raise UnpublishableEvent(f"no public form for {type(event).__qualname__}")
    name, _, fill = entry
    data = event.__dict__
    customer = str(data.get("customer_id") or "")
    at: datetime = data.get("at", event.timestamp)
    message = events_pb.TicketEvent(
        customer_id=customer,
        aggregate_id=str(event.originator_id),
        version=event.originator_version,
        position=position,
        occurred_at=timestamp(at),
    )
    fill(message, data)
    return customer or str(event.originator_id), CE_TYPE_PREFIX + name, message.SerializeToString()
