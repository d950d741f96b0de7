"""What every service holding data about contacts must honour from the
contacts topic: an erased person, and a merge and its undo.

`ContactEventsFollower` consumes `crm.contacts.events` as a member of the
service's own consumer group (`<prefix>.<service>-contacts-follower`) and
hands three events to the service's `ContactChanges`:

- `person_erased`: destroy the keys of everything the service holds about
  the person (and the contacts merged into them), and remove their personal
  data from its query tables; the anonymous facts stay;
- `contacts_merged`: move what it holds of the merged contacts to the
  survivor (deals, leads, activities, cases, a membership);
- `merge_undone`: give back what it moved for that merge.

Every other event is passed over without being decoded. The handlers must be
idempotent (a record may be handled twice: a rebalance, a restart): commands
carry request ids derived from the event, destroying a key twice is
harmless. A `CrmError` that says the record can never succeed (an unknown
contact, a rule refusing it) is logged and passed over; anything else is
retried from the same record with a growing pause (`RetryLater`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError
from opentelemetry import trace

from crm.events.v1 import contacts_pb2 as events_pb
from crm_common.errors import CrmError, NotFound, RuleViolated, ValidationFailed
from crm_common.following import GroupMember, GroupProgress, RetryLater
from crm_common.health import Heartbeat
from crm_common.records import Record, consuming_span, header, where
from crm_common.settings import topic_of

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_common.contact_events")

CE_TYPE_PREFIX = "crm.contacts.v1."
#: The payloads a service must honour, by the CloudEvents type's last part.
HONOURED = {
    "PersonErased": "person_erased",
    "ContactsMerged": "contacts_merged",
    "ContactMergeUndone": "contact_merge_undone",
}
#: Errors that say the record itself can never succeed: logged and passed over.
PERMANENT: tuple[type[CrmError], ...] = (NotFound, ValidationFailed, RuleViolated)


@dataclass(frozen=True)
class ContactChange:
    """One contacts event a service must honour."""

    kind: str  # person_erased, contacts_merged, contact_merge_undone
    #: The erased person, the survivor of the merge, or the survivor whose
    #: merge was undone.
    contact_id: str
    #: Erase: contacts merged into the person earlier; merge: the merged
    #: contacts; undo: the restored contacts.
    others: tuple[str, ...]
    #: The merge (merge and undo), or the erase's reference.
    reference: str
    #: A stable id of the event (`<contact id>:<version>`), for request ids.
    event_id: str
    actor: str


class ContactChanges(Protocol):
    """What a service does on each change (all idempotent)."""

    async def person_erased(self, change: ContactChange) -> None: ...

    async def contacts_merged(self, change: ContactChange) -> None: ...

    async def merge_undone(self, change: ContactChange) -> None: ...


def change_of(record: Record) -> ContactChange | None:
    """The change a contacts record asks for, or None for every other event.

    Raises `DecodeError` for a value that is not a `ContactEvent`."""
    ce_type = header(record, "ce_type")
    if ce_type is not None and ce_type.removeprefix(CE_TYPE_PREFIX) not in HONOURED:
        return None
    message = events_pb.ContactEvent.FromString(record.value or b"")
    payload = message.WhichOneof("payload")
    event_id = f"{message.contact_id}:{message.version}"
    actor = message.actor or "contacts"
    if payload == "person_erased":
        erased = message.person_erased
        return ContactChange(
            payload, message.contact_id, tuple(erased.merged_ids), erased.reference, event_id, actor
        )
    if payload == "contacts_merged":
        merged = message.contacts_merged
        return ContactChange(
            payload, message.contact_id, tuple(merged.merged_ids), merged.merge_id, event_id, actor
        )
    if payload == "contact_merge_undone":
        undone = message.contact_merge_undone
        return ContactChange(
            payload,
            message.contact_id,
            tuple(undone.restored_ids),
            undone.merge_id,
            event_id,
            actor,
        )
    return None


@dataclass
class ContactEventsProgress(GroupProgress):
    erased: int = 0
    merged: int = 0
    undone: int = 0
    skipped: int = 0


def default_group_id(service: str) -> str:
    """`<prefix>.<service>-contacts-follower`, after the topic prefix."""
    prefix = topic_of("contacts").removesuffix(".contacts.events")
    return f"{prefix}.{service}-contacts-follower"


class ContactEventsFollower(GroupMember):
    """Feeds erasures and merges from the contacts topic to one service."""

    def __init__(
        self,
        service: str,
        changes: ContactChanges,
        *,
        bootstrap: str,
        topic: str | None = None,
        group_id: str | None = None,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        retry_backoff: float = 0.5,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.service = service
        self.changes = changes
        stats = ContactEventsProgress()
        super().__init__(
            topic=topic or topic_of("contacts"),
            bootstrap=bootstrap,
            group_id=group_id or default_group_id(service),
            client_id=f"crm-{service}-contacts-follower",
            stats=stats,
            max_records=max_records,
            poll_timeout_ms=poll_timeout_ms,
            retry_backoff=retry_backoff,
            heartbeat=heartbeat,
            what="contacts follower",
        )
        self.stats: ContactEventsProgress = stats

    async def run(self, stop: asyncio.Event) -> None:
        """Follows the contacts topic until `stop` is set."""
        await self.consume(stop)

    async def handle(self, record: Record) -> None:
        at = where(record)
        try:
            change = change_of(record)
        except DecodeError as error:
            log.error("%s: %s is not a ContactEvent (%s); passed over", self.group_id, at, error)
            self.stats.skipped += 1
            return
        if change is None:
            return
        with consuming_span(record, f"honour {change.kind}", tracer):
            try:
                if change.kind == "person_erased":
                    await self.changes.person_erased(change)
                    self.stats.erased += 1
                elif change.kind == "contacts_merged":
                    await self.changes.contacts_merged(change)
                    self.stats.merged += 1
                else:
                    await self.changes.merge_undone(change)
                    self.stats.undone += 1
            except PERMANENT as error:
                log.warning(
                    "%s: %s: %s of %s not honoured: %s; passed over",
                    self.group_id,
                    at,
                    change.kind,
                    change.contact_id,
                    error.message,
                )
                self.stats.skipped += 1
            except Exception as error:
                log.error(
                    "%s: %s: %s of %s failed (%r); retrying in %.1f s",
                    self.group_id,
                    at,
                    change.kind,
                    change.contact_id,
                    error,
                    self._backoff,
                )
                self.heartbeat.failed(f"{change.kind} of {change.contact_id} at {at}: {error!r}")
                raise RetryLater from error
