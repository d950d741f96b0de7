"""The 360 read model in MongoDB (plain pymongo: SecantusDB locally, MongoDB by URL).

One document per customer in `customer360`, `_id` = the customer (contact) id,
built from the contacts topic (`from_contacts.py`) and the pipeline topic
(`from_pipeline.py`), typed in `document.py`; one document per sales pipeline
in `customer360_pipelines`, whose stage names a read joins into the deals. A
batch from the projection is applied with a handful of round trips, whatever
its size: a few `find`s load every document the batch touches, the events are
applied in memory in log order, one `bulk_write` replaces each touched
document once (many events on one customer coalesce into one write), one
`update_many` per renamed company carries the new name to its linked persons,
and one more `bulk_write` replaces the touched pipelines. The document store
is the slowest part of the local stack (SecantusDB: a few hundred single
writes per second), so this shape, not the per-event work, decides the
projection's throughput.

Aggregations through arrays of subdocuments (`"$companies.company_id"` in an
expression) come back missing on SecantusDB; nothing here uses them, and
queries over such arrays use plain filters or `$elemMatch`, which work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from google.protobuf.message import DecodeError
from pymongo import InsertOne, MongoClient, ReplaceOne, UpdateMany
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database

from crm.events.v1 import contacts_pb2 as events_pb2
from crm.events.v1 import pipeline_pb2 as pipeline_events_pb2
from crm_analytics import from_contacts, from_pipeline
from crm_analytics.audit import (
    AUDIT_COLLECTION,
    AuditEntry,
    AuditPage,
    audit_entry,
    ensure_audit_indexes,
    find_entries,
)
from crm_analytics.document import (
    Applied,
    AppliedToPipeline,
    CompanyRenamed,
    Customer360,
    MembershipChanged,
    PipelineNames,
    UnknownEvent,
    advance,
    applied_position,
    new_document,
    to_datetime,
)
from crm_common.projection import (
    DEAD_LETTERS_COLLECTION,
    park_dead_letters,
    projection_span,
    reset_offsets,
)
from crm_common.records import Record, where
from crm_common.registry import service
from crm_common.settings import topic_of

log = logging.getLogger(__name__)

PROJECTION = "customer360"
COLLECTION = "customer360"
# The names of the pipelines and their stages, which the deals show (see from_pipeline.py).
PIPELINES_COLLECTION = "customer360_pipelines"
# SecantusDB answers `$in` in time growing with the square of the list (500 ids:
# 160 ms, 10 x 50 ids: 39 ms); small chunks cost a real MongoDB nothing.
LOAD_CHUNK = 50

Event: TypeAlias = events_pb2.ContactEvent | pipeline_events_pb2.PipelineEvent
_Stored = TypeVar("_Stored", Customer360, PipelineNames, AuditEntry)
_Decoded = TypeVar("_Decoded", events_pb2.ContactEvent, pipeline_events_pb2.PipelineEvent)


def sources() -> tuple[str, ...]:
    """The services whose topics the 360 view is built from (the registry's list)."""
    consumed: tuple[str, ...] = service("analytics").consumes
    return consumed


def default_topics() -> dict[str, str]:
    """The topic of each source service, as this environment names it."""
    return {source: topic_of(source) for source in sources()}


def connect(url: str) -> MongoClient[dict[str, Any]]:
    # tz_aware: every timestamp in the documents is UTC and must come back so.
    return MongoClient(url, tz_aware=True)


def _decode(record: Record, message: type[_Decoded], subject: str) -> _Decoded:
    """The event in the record, refused when it names no subject or position."""
    if record.value is None:
        raise ValueError("record without value")
    event = message.FromString(record.value)
    subject_id = getattr(event, subject)
    if not subject_id:
        raise ValueError(f"event without {subject}")
    if event.position <= 0:
        raise ValueError(f"event of {subject_id} without position")
    return event


def decode_contact_event(record: Record) -> events_pb2.ContactEvent:
    return _decode(record, events_pb2.ContactEvent, "contact_id")


def decode_pipeline_event(record: Record) -> pipeline_events_pb2.PipelineEvent:
    """A pipeline event; `customer_id` is empty for pipelines and unconverted leads."""
    return _decode(record, pipeline_events_pb2.PipelineEvent, "aggregate_id")


DECODERS: dict[str, Callable[[Record], Event]] = {
    from_contacts.SOURCE: decode_contact_event,
    from_pipeline.SOURCE: decode_pipeline_event,
}


class Customer360Store:
    """Reads and writes the 360 documents; the projection's read model.

    `topics` maps each source service to the topic its events are read from
    (by default every source of the registry). The database holds the
    projection's offsets and dead letters too, hence its untyped documents.
    """

    def __init__(self, database: Database[Any], topics: Mapping[str, str] | None = None) -> None:
        topics = default_topics() if topics is None else topics
        unknown = sorted(set(topics) - set(DECODERS))
        if unknown:
            raise ValueError(f"no decoder for source {', '.join(unknown)}")
        self.database = database
        self.collection: Collection[Customer360] = database[COLLECTION]
        self.pipelines: Collection[PipelineNames] = database[PIPELINES_COLLECTION]
        self.audit: Collection[AuditEntry] = database[AUDIT_COLLECTION]
        self.topics = dict(topics)
        self.sources = {topic: source for source, topic in topics.items()}

    def ensure_indexes(self) -> None:
        # The rename fan-out finds the persons linked to a company.
        self.collection.create_index("companies.company_id")
        # The audit trail, per customer and per actor (creates the collection too).
        ensure_audit_indexes(self.database)
        # Created up front: not every document store creates collections
        # inside a transaction.
        if PIPELINES_COLLECTION not in self.database.list_collection_names():
            self.database.create_collection(PIPELINES_COLLECTION)

    def get(self, customer_id: str) -> Customer360 | None:
        return self.collection.find_one({"_id": customer_id})

    def with_names(self, doc: Customer360) -> Customer360:
        """The document with the pipeline and stage names of its deals, as last known."""
        ids = from_pipeline.pipelines_referenced(doc)
        if not ids:
            return doc
        known: dict[str, PipelineNames | None] = {
            p["_id"]: p for p in self.pipelines.find({"_id": {"$in": ids}})
        }
        return from_pipeline.with_names(doc, known)

    def drop(self) -> None:
        """Forgets the read models and where their projection stood (before a rebuild)."""
        self.collection.drop()
        self.pipelines.drop()
        self.audit.drop()
        self.database[DEAD_LETTERS_COLLECTION].delete_many({"projection": PROJECTION})
        reset_offsets(self.database, PROJECTION)

    def count(self) -> int:
        return self.collection.count_documents({})

    def audit_trail(
        self,
        *,
        customer_id: str | None,
        actor: str | None,
        since: datetime | None,
        until: datetime | None,
        page_size: int,
        after: dict[str, Any] | None,
    ) -> AuditPage:
        """One page of the audit trail, newest first (see `audit.py`)."""
        return find_entries(
            self.audit,
            customer_id=customer_id,
            actor=actor,
            since=since,
            until=until,
            page_size=page_size,
            after=after,
        )

    # -- the projection's read model ------------------------------------------------------

    @staticmethod
    def _load(
        session: ClientSession, collection: Collection[_Stored], ids: set[str]
    ) -> dict[str, _Stored | None]:
        docs: dict[str, _Stored | None] = dict.fromkeys(ids)
        ordered = sorted(ids)
        for start in range(0, len(ordered), LOAD_CHUNK):
            chunk = ordered[start : start + LOAD_CHUNK]
            for doc in collection.find({"_id": {"$in": chunk}}, session=session):
                docs[doc["_id"]] = doc
        return docs

    def apply_batch(self, session: ClientSession, records: Sequence[Record]) -> Mapping[str, int]:
        failures: list[tuple[Record, str]] = []
        events: list[tuple[Record, Event]] = []
        for record in records:
            source = self.sources.get(record.topic)
            if source is None:
                failures.append((record, f"no decoder for topic {record.topic}"))
                continue
            try:
                events.append((record, DECODERS[source](record)))
            except (DecodeError, ValueError) as error:
                failures.append((record, f"undecodable: {error}"))

        ids: set[str] = set()
        pipeline_ids: set[str] = set()
        for _, e in events:
            if isinstance(e, events_pb2.ContactEvent):
                ids.add(e.contact_id)
                ids.update(from_contacts.companies_referenced(e))
            elif from_pipeline.is_pipeline_definition(e):
                pipeline_ids.add(e.aggregate_id)
            elif e.customer_id:
                ids.add(e.customer_id)
        docs = self._load(session, self.collection, ids)
        found = {i for i, d in docs.items() if d is not None}
        pipelines = self._load(session, self.pipelines, pipeline_ids)

        touched: set[str] = set()
        touched_pipelines: set[str] = set()
        renames: dict[str, CompanyRenamed] = {}
        # One audit entry per event, redeliveries included (one id, one entry).
        audit: dict[str, AuditEntry] = {}
        applied = duplicates = no_customer = 0
        for record, event in events:
            with projection_span(record, PROJECTION) as span:
                customer_id = (
                    event.contact_id
                    if isinstance(event, events_pb2.ContactEvent)
                    else event.customer_id
                )
                span.set_attribute("crm.customer_id", customer_id)
                span.set_attribute("crm.position", event.position)
                entry = audit_entry(
                    record,
                    self.sources[record.topic],
                    event.position,
                    to_datetime(event.occurred_at),
                )
                # CloudEvents: one source and id, one event; the first one consumed wins.
                audit.setdefault(entry["_id"], entry)
                try:
                    outcome = self._apply(event, customer_id, docs, pipelines)
                except UnknownEvent as error:
                    failures.append((record, str(error)))
                    self._mark_seen(docs, touched, record, event)
                    continue
                except Exception as error:
                    # One event the code cannot apply must not stop the projection;
                    # it is parked with the reason and the documents stay untouched.
                    log.exception("cannot apply event at position %d", event.position)
                    failures.append((record, f"{type(error).__name__}: {error}"))
                    continue
                if outcome is None:
                    no_customer += 1
                    continue
                if not outcome.applied:
                    duplicates += 1
                    span.set_attribute("crm.duplicate", True)
                    continue
                applied += 1
                if isinstance(outcome, AppliedToPipeline):
                    pipelines[outcome.doc["_id"]] = outcome.doc
                    touched_pipelines.add(outcome.doc["_id"])
                    continue
                docs[customer_id] = outcome.doc
                touched.add(customer_id)
                for fan_out in outcome.fan_out:
                    if isinstance(fan_out, MembershipChanged):
                        docs[fan_out.company_id] = from_contacts.apply_membership(
                            docs.get(fan_out.company_id), fan_out
                        )
                        touched.add(fan_out.company_id)
                    else:
                        # Within a company's partition positions only grow: the last wins.
                        renames[fan_out.company_id] = fan_out

        written = {i: d for i in sorted(touched) if (d := docs[i]) is not None}
        if written:
            # A document looked up in this transaction and not found is
            # inserted, which costs the store less than an upsert; any other
            # (found, or not looked up: a fan-out) is replaced or upserted.
            self.collection.bulk_write(
                [
                    InsertOne(d)
                    if i in ids and i not in found
                    else ReplaceOne({"_id": i}, d, upsert=True)
                    for i, d in written.items()
                ],
                session=session,
                ordered=False,
            )
        if renames:
            # After the replacements, so persons written in this batch get the name too.
            self.collection.bulk_write(
                [self._rename_update(r) for r in renames.values()],
                session=session,
                ordered=False,
            )
        if touched_pipelines:
            self.pipelines.bulk_write(
                [
                    ReplaceOne({"_id": i}, names, upsert=True)
                    for i in sorted(touched_pipelines)
                    if (names := pipelines[i]) is not None
                ],
                session=session,
                ordered=False,
            )
        # Entries of events consumed before (a relay publishing a suffix again)
        # exist already; inserts cost the store less than upserts.
        recorded = self._load(session, self.audit, set(audit))
        new_entries = [InsertOne(e) for i, e in audit.items() if recorded[i] is None]
        if new_entries:
            self.audit.bulk_write(new_entries, session=session, ordered=False)
        for record, reason in failures:
            log.warning("dead letter %s: %s", where(record), reason)
        park_dead_letters(session, self.database, PROJECTION, failures)
        return {
            "applied": applied,
            "duplicates": duplicates,
            "no_customer": no_customer,
            "dead_letters": len(failures),
            "documents_written": len(touched),
            "pipelines_written": len(touched_pipelines),
            "renames": len(renames),
            "audit_entries": len(new_entries),
        }

    @staticmethod
    def _apply(
        event: Event,
        customer_id: str,
        docs: Mapping[str, Customer360 | None],
        pipelines: Mapping[str, PipelineNames | None],
    ) -> Applied | AppliedToPipeline | None:
        """Applies one event in memory; None for a pipeline event of no customer (yet)."""
        if isinstance(event, events_pb2.ContactEvent):
            return from_contacts.apply_event(docs[customer_id], event, docs)
        if from_pipeline.is_pipeline_definition(event):
            return from_pipeline.apply_pipeline_definition(pipelines[event.aggregate_id], event)
        if not customer_id:
            # A lead before its conversion: nothing of a customer yet.
            from_pipeline.payload_of(event)
            return None
        return from_pipeline.apply_pipeline_event(docs[customer_id], event)

    def _mark_seen(
        self,
        docs: dict[str, Customer360 | None],
        touched: set[str],
        record: Record,
        event: Event,
    ) -> None:
        # An event type this version does not know still counts as seen, so
        # a reader waiting for its position is not held up until the timeout;
        # the event itself is in the dead letters, and a rebuild after an
        # upgrade applies it. A pipeline event may be the customer's first.
        source = self.sources[record.topic]
        if isinstance(event, events_pb2.ContactEvent):
            customer_id, doc = event.contact_id, docs.get(event.contact_id)
        else:
            customer_id = event.customer_id
            if not customer_id:
                return
            doc = docs.get(customer_id) or new_document(customer_id)
        if doc is not None and applied_position(doc, source) < event.position:
            doc = doc.copy()
            advance(doc, event.position, to_datetime(event.occurred_at), source)
            docs[customer_id] = doc
            touched.add(customer_id)

    @staticmethod
    def _rename_update(rename: CompanyRenamed) -> UpdateMany:
        # Same rule as from_contacts.apply_rename, done by the server for every
        # linked person at once: only names older than the rename change.
        before = {"$lt": rename.position}
        older = {"company_id": rename.company_id, "name_position": before}
        return UpdateMany(
            # The plain field condition lets SecantusDB use the index; on
            # `$elemMatch` alone it scans the whole collection.
            {"companies.company_id": rename.company_id, "companies": {"$elemMatch": older}},
            {
                "$set": {
                    "companies.$[m].company_name": rename.company_name,
                    "companies.$[m].name_position": rename.position,
                }
            },
            array_filters=[{"m.company_id": rename.company_id, "m.name_position": before}],
        )
