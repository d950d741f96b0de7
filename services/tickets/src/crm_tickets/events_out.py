"""Stored domain events as the public `crm.events.v1.TicketEvent` messages.

The relay calls `to_wire` for every event of the notification log. Each event
of a case or SLA policy becomes one message with the CloudEvents type
`crm.tickets.v1.<PayloadName>` (`SlaBreached`, ...), keyed by the case's
contact id (the policy's id for policy events; for `CaseCustomerMoved`, the
case's new owner). Command receipts are internal
and not published; an event this module does not know is an error, never a
silent skip.

Every message carries the actor and client of the command that caused it, and
every case event carries `sla`: the case's SLA state right after the event
(policy and version, tier and its source, and each clock's state, due time,
warning time or time left). `CaseEvents` works that state out: it keeps the
cases it has seen recently and applies each event to its case, and loads a
case from the event store at the event's version when it has not got the
version just before (a relay restarted in the middle of the log, a case not
seen for long). The snapshot depends only on the stored events, never on the
clock, so publishing a suffix again gives the same messages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

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


def sla_pb(case: Case) -> events_pb.CaseSla:
    """The case's SLA state as it stands (`Case.sla_clocks`)."""
    return events_pb.CaseSla(
        policy_id=case.policy_id,
        policy_version=case.policy_version,
        tier=case.tier,
        tier_source=case.tier_source,
        clocks=[
            events_pb.SlaClock(
                kind=c["kind"],
                state=c["state"],
                due_at=timestamp(c["due_at"]),
                remaining_seconds=c["remaining_seconds"] or 0,
                warn_at=timestamp(c["warn_at"]),
            )
            for c in case.sla_clocks()
        ],
    )


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
                cycle=d.get("cycle", 1),
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
                cycle=d.get("cycle", 1),
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
    Case.CustomerMoved: (
        "CaseCustomerMoved",
        "case_customer_moved",
        lambda m, d: m.case_customer_moved.CopyFrom(
            events_pb.CaseCustomerMoved(
                from_customer_id=d["from_customer_id"],
                to_customer_id=d["to_customer_id"],
                merge_id=d["merge_id"],
                undone=d["undone"],
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


def to_wire(
    event: Any, meta: dict[str, Any], position: int, *, case: Case | None = None
) -> tuple[str, str, bytes] | None:
    """(key, CloudEvents type, payload) of a stored event; None for internal events.
    `case` is the case as it stands after the event (its SLA state goes along)."""
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
        actor=str(meta.get("actor") or ""),
        client=str(meta.get("client") or ""),
    )
    if case is not None:
        message.sla.CopyFrom(sla_pb(case))
    fill(message, data)
    return customer or str(event.originator_id), CE_TYPE_PREFIX + name, message.SerializeToString()


CASE_EVENTS = tuple(t for t in FILLERS if issubclass(t, (Case.Opened, Case.Event)))


class CaseEvents:
    """The relay's `to_wire`: each case event with its case's SLA state after it.

    `load(case_id, version)` reads a case from the event store as it stood at a
    version; it is called only when the case is not kept at the version before the
    event. At most `keep` cases are kept (the most recently published)."""

    def __init__(self, load: Callable[[UUID, int], Case], keep: int = 2_000) -> None:
        self.load = load
        self.keep = keep
        self.loads = 0
        self._cases: OrderedDict[UUID, Case] = OrderedDict()

    def case_after(self, event: Any) -> Case:
        ident: UUID = event.originator_id
        version: int = event.originator_version
        case = self._cases.pop(ident, None)
        if isinstance(event, Case.Opened):
            case = event.mutate(None)
        elif case is not None and case.version == version - 1:
            case = event.mutate(case)
        else:
            self.loads += 1
            case = self.load(ident, version)
        assert case is not None
        self._cases[ident] = case
        while len(self._cases) > self.keep:
            self._cases.popitem(last=False)
        return case

    def __call__(
        self, event: Any, meta: dict[str, Any], position: int
    ) -> tuple[str, str, bytes] | None:
        case = self.case_after(event) if isinstance(event, CASE_EVENTS) else None
        return to_wire(event, meta, position, case=case)
