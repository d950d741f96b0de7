"""The 360 read model in MongoDB (plain pymongo: SecantusDB locally, MongoDB by URL).

One document per customer in `customer360`, `_id` = the customer (contact) id,
built from the topic of every source service, each consumed through the
adapter of its module (`from_contacts.py`, `from_pipeline.py`,
`from_tickets.py`, `from_loyalty.py`: decoder, the customer of an event, the
documents it touches, how to apply it), typed in `document.py`; one document per sales pipeline
in `customer360_pipelines`, whose stage names a read joins into the deals. A
batch from the projection is applied with a handful of round trips, whatever
its size: a few `find`s load every document the batch touches, the events are
applied in memory in log order, one `bulk_write` replaces each touched
document once (many events on one customer coalesce into one write), one
`update_many` per renamed company carries the new name to its linked persons,
one more `bulk_write` replaces the touched pipelines, and one writes the
timeline entries the batch added to `customer360_timeline` (the whole
history, paged by ListTimeline; see `timeline.py`). The document store
is the slowest part of the local stack (SecantusDB: a few hundred single
writes per second), so this shape, not the per-event work, decides the
projection's throughput.

Personal data: a record's sealed personal fields are opened right after it
is decoded, for every source (`prepare_batch`, with the `PayloadOpener` of
`personal_data.py`); a customer erased (`person_erased`) stays redacted
after any later event, its roles in its companies' member lists, the
summaries of its entries in the timeline collection and its dead letters go
with it.

Aggregations through arrays of subdocuments (`"$companies.company_id"` in an
expression) come back missing on SecantusDB; nothing here uses them, and
queries over such arrays use plain filters or `$elemMatch`, which work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from pymongo import InsertOne, MongoClient, ReplaceOne, UpdateMany
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database

from crm_analytics import from_contacts, from_loyalty, from_pipeline, from_tickets
from crm_analytics.audit import (
    AUDIT_COLLECTION,
    AuditEntry,
    AuditPage,
    audit_entry,
    ensure_audit_indexes,
    find_entries,
)
from crm_analytics.document import (
    AppliedToPipeline,
    CompanyRenamed,
    Customer360,
    Detached,
    Loaded,
    MembershipChanged,
    PersonErased,
    PipelineNames,
    SourceAdapter,
    TimelineEntry,
    UnknownEvent,
    advance,
    applied_position,
    collect_timeline,
    new_document,
    to_datetime,
)
from crm_analytics.personal_data import (
    PayloadOpener,
    erase_document,
    is_erased,
    redact_document,
    redact_entry,
)
from crm_analytics.timeline import (
    STATS_COLLECTION,
    TIMELINE_COLLECTION,
    TimelinePage,
    TimelineRow,
    ensure_timeline_indexes,
    erase_update,
    find_timeline,
    stats_updates,
    timeline_row,
    writes,
)
from crm_common.privacy import REDACTED, MissingDataKey
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
#: Records per transaction while rebuilding (`crm-analytics rebuild`): the more
#: of a customer's events one chunk holds, the fewer times its document is read
#: and written. Bounded so a transaction stays well inside the store's limits.
REBUILD_BATCH = 5000

_Stored = TypeVar("_Stored", Customer360, PipelineNames, AuditEntry, TimelineRow)


@dataclass(frozen=True)
class PreparedBatch:
    """A batch decoded outside its transaction (`Customer360Store.prepare_batch`)."""

    events: tuple[tuple[Record, SourceAdapter[Any], Message], ...]
    #: Records that cannot be decoded, with the reason: dead letters.
    failures: tuple[tuple[Record, str], ...]
    #: The customers' and pipelines' documents applying the events touches.
    customers: frozenset[str]
    pipelines: frozenset[str]


#: Every source the code can consume, by service name.
ADAPTERS: dict[str, SourceAdapter[Any]] = {
    adapter.source: adapter
    for adapter in (
        from_contacts.ADAPTER,
        from_pipeline.ADAPTER,
        from_tickets.ADAPTER,
        from_loyalty.ADAPTER,
    )
}


def sources() -> tuple[str, ...]:
    """The services whose topics the 360 view is built from (the registry's list)."""
    consumed: tuple[str, ...] = service("analytics").consumes
    return consumed


def waitable_positions() -> tuple[str, ...]:
    """What a reader may wait for: each source's position, and the further ones
    their documents record (`erp.orders`, the ERP order records loyalty applied)."""
    extra = [p for s in sources() if s in ADAPTERS for p in ADAPTERS[s].extra_positions]
    return (*sources(), *extra)


def default_topics() -> dict[str, str]:
    """The topic of each source service, as this environment names it."""
    return {source: topic_of(source) for source in sources()}


def connect(url: str) -> MongoClient[dict[str, Any]]:
    # tz_aware: every timestamp in the documents is UTC and must come back so.
    return MongoClient(url, tz_aware=True)


class Customer360Store:
    """Reads and writes the 360 documents; the projection's read model.

    `topics` maps each source service to the topic its events are read from
    (by default every source of the registry). The database holds the
    projection's offsets and dead letters too, hence its untyped documents.
    """

    def __init__(
        self,
        database: Database[Any],
        topics: Mapping[str, str] | None = None,
        opener: PayloadOpener | None = None,
    ) -> None:
        topics = default_topics() if topics is None else topics
        unknown = sorted(set(topics) - set(ADAPTERS))
        if unknown:
            raise ValueError(f"no adapter for source {', '.join(unknown)}")
        self.database = database
        self.collection: Collection[Customer360] = database[COLLECTION]
        self.pipelines: Collection[PipelineNames] = database[PIPELINES_COLLECTION]
        self.audit: Collection[AuditEntry] = database[AUDIT_COLLECTION]
        #: Every timeline entry, one document each (see timeline.py).
        self.timeline: Collection[TimelineRow] = database[TIMELINE_COLLECTION]
        #: Per customer: its entries per source and the oldest time.
        self.timeline_stats: Collection[dict[str, Any]] = database[STATS_COLLECTION]
        self.topics = dict(topics)
        self.sources = {topic: source for source, topic in topics.items()}
        self.adapters = {topic: ADAPTERS[source] for source, topic in topics.items()}
        #: Opens the sealed personal fields of every source's events (no keys: none).
        self.opener = opener if opener is not None else PayloadOpener()

    def ensure_indexes(self) -> None:
        # The rename fan-out finds the persons linked to a company.
        self.collection.create_index("companies.company_id")
        # The audit trail, per customer and per actor (creates the collection too).
        ensure_audit_indexes(self.database)
        # Created up front: not every document store creates collections
        # inside a transaction.
        existing = self.database.list_collection_names()
        for name in (PIPELINES_COLLECTION, TIMELINE_COLLECTION, STATS_COLLECTION):
            if name not in existing:
                self.database.create_collection(name)
        # A customer's timeline, newest first (creates nothing more).
        ensure_timeline_indexes(self.timeline)

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
        self.timeline.drop()
        self.timeline_stats.drop()
        self.audit.drop()
        self.database[DEAD_LETTERS_COLLECTION].delete_many({"projection": PROJECTION})
        reset_offsets(self.database, PROJECTION)

    def count(self) -> int:
        return self.collection.count_documents({})

    def timeline_page(
        self,
        customer_ids: Sequence[str],
        sources: Sequence[str],
        page_size: int,
        page_token: str | None,
        after: dict[str, Any] | None,
        newest: Sequence[TimelineEntry],
    ) -> TimelinePage:
        """One page of the customers' whole timeline, newest first; `newest` is
        the timeline their (folded) document holds (see `timeline.py`)."""
        return find_timeline(
            self.timeline,
            self.timeline_stats,
            customer_ids=customer_ids,
            sources=sources,
            page_size=page_size,
            after=after,
            token=page_token,
            newest=newest,
        )

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

    def prepare_batch(self, records: Sequence[Record]) -> PreparedBatch:
        """Decodes a batch and finds the documents it touches, outside any transaction
        (the projection does it while the previous batch commits)."""
        failures: list[tuple[Record, str]] = []
        events: list[tuple[Record, SourceAdapter[Any], Message]] = []
        for record in records:
            adapter = self.adapters.get(record.topic)
            if adapter is None:
                failures.append((record, f"no decoder for topic {record.topic}"))
                continue
            try:
                event = adapter.decode(record)
            except (DecodeError, ValueError) as error:
                failures.append((record, f"undecodable: {error}"))
                continue
            # The one place where every source's personal fields are opened.
            try:
                self.opener.open(adapter.source, event)
            except (ValueError, MissingDataKey) as error:
                failures.append((record, f"personal data cannot be opened: {error}"))
                continue
            events.append((record, adapter, event))
        ids: set[str] = set()
        pipeline_ids: set[str] = set()
        for _, adapter, e in events:
            ids.update(adapter.customers_touched(e))
            pipeline_ids.update(adapter.pipelines_touched(e))
        return PreparedBatch(
            tuple(events), tuple(failures), frozenset(ids), frozenset(pipeline_ids)
        )

    def apply_batch(self, session: ClientSession, records: Sequence[Record]) -> Mapping[str, int]:
        return self.apply_prepared(session, [self.prepare_batch(records)])

    def apply_prepared(
        self, session: ClientSession, prepared: Sequence[PreparedBatch]
    ) -> Mapping[str, int]:
        """Applies the prepared parts of one batch (in order) with one write per document.

        Every document the batch touches is loaded once, all of a customer's
        events fold into it in memory in log order, and each touched document
        is written once, whatever the number of its events in the batch.
        """
        events = [e for part in prepared for e in part.events]
        failures = [f for part in prepared for f in part.failures]
        ids: set[str] = set().union(*(part.customers for part in prepared))
        pipeline_ids: set[str] = set().union(*(part.pipelines for part in prepared))
        docs = self._load(session, self.collection, ids)
        found = {i for i, d in docs.items() if d is not None}
        pipelines = self._load(session, self.pipelines, pipeline_ids)
        loaded = Loaded(docs, pipelines)

        touched: set[str] = set()
        touched_pipelines: set[str] = set()
        renames: dict[str, CompanyRenamed] = {}
        erased: set[str] = set()
        # One audit entry per event, redeliveries included (one id, one entry).
        audit: dict[str, AuditEntry] = {}
        applied = duplicates = no_customer = 0
        # The timeline entries of the events applied, for the timeline collection
        # (by customer and entry id; the last wins).
        added: dict[tuple[str, str], TimelineEntry] = {}
        for record, adapter, event in events:
            position: int = getattr(event, "position")  # noqa: B009 - every event has one
            with projection_span(record, PROJECTION) as span:
                customer_id = adapter.customer_of(event)
                span.set_attribute("crm.customer_id", customer_id)
                span.set_attribute("crm.position", position)
                entry = audit_entry(
                    record,
                    adapter.source,
                    position,
                    to_datetime(getattr(event, "occurred_at")),  # noqa: B009
                )
                # CloudEvents: one source and id, one event; the first one consumed wins.
                audit.setdefault(entry["_id"], entry)
                try:
                    with collect_timeline() as entries:
                        outcome = adapter.apply(event, loaded)
                except UnknownEvent as error:
                    failures.append((record, str(error)))
                    self._mark_seen(docs, touched, adapter, event)
                    continue
                except Exception as error:
                    # One event the code cannot apply must not stop the projection;
                    # it is parked with the reason and the documents stay untouched.
                    log.exception("cannot apply event at position %d", position)
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
                added.update(entries)
                if isinstance(outcome, AppliedToPipeline):
                    pipelines[outcome.doc["_id"]] = outcome.doc
                    touched_pipelines.add(outcome.doc["_id"])
                    continue
                person_erased = is_erased(outcome.doc)
                if person_erased:
                    # Whatever the event brought, the erased customer stays redacted.
                    outcome.doc = redact_document(outcome.doc)
                docs[outcome.doc["_id"]] = outcome.doc
                touched.add(outcome.doc["_id"])
                for fan_out in outcome.fan_out:
                    if isinstance(fan_out, MembershipChanged):
                        if person_erased and fan_out.role is not None:
                            fan_out = replace(fan_out, role=REDACTED)
                        docs[fan_out.company_id] = from_contacts.apply_membership(
                            docs.get(fan_out.company_id), fan_out
                        )
                        touched.add(fan_out.company_id)
                    elif isinstance(fan_out, Detached):
                        left = docs.get(fan_out.customer_id)
                        if left is not None:
                            docs[fan_out.customer_id] = fan_out.change(left)
                            touched.add(fan_out.customer_id)
                    elif isinstance(fan_out, PersonErased):
                        for contact_id in fan_out.contact_ids:
                            doc = docs.get(contact_id) or new_document(contact_id)
                            docs[contact_id] = erase_document(doc)
                            touched.add(contact_id)
                            erased.add(contact_id)
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
        rows = [
            timeline_row(
                customer_id, redact_entry(entry) if is_erased(docs.get(customer_id)) else entry
            )
            for (customer_id, _), entry in added.items()
        ]
        if rows:
            # In the same transaction as the documents; an erased customer's
            # entries are written redacted, like its document's timeline.
            stored = self._load(session, self.timeline, {r["_id"] for r in rows})
            existing = {i for i, row in stored.items() if row is not None}
            self.timeline.bulk_write(writes(rows, existing), session=session, ordered=False)
            new_rows = [r for r in rows if r["_id"] not in existing]
            if new_rows:
                self.timeline_stats.bulk_write(
                    stats_updates(new_rows), session=session, ordered=False
                )
        if renames:
            # After the replacements, so persons written in this batch get the name too.
            self.collection.bulk_write(
                [self._rename_update(r) for r in renames.values()],
                session=session,
                ordered=False,
            )
        if erased:
            # The erased persons' roles in the member lists of their companies
            # (after the replacements, like the renames).
            self.collection.bulk_write(
                [self._erase_roles_update(i) for i in sorted(erased)],
                session=session,
                ordered=False,
            )
            # Their whole timeline, beyond the newest entries the documents keep.
            self.timeline.bulk_write([erase_update(sorted(erased))], session=session)
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
        # exist already; inserts cost the store less than upserts. In the order
        # of their ids: SecantusDB inserts a batch sorted by `_id` about twice
        # as fast as the same batch in event order (5,400 against 2,300
        # entries/s, with the trail's two indexes).
        recorded = self._load(session, self.audit, set(audit))
        new_entries = [InsertOne(audit[i]) for i in sorted(audit) if recorded[i] is None]
        if new_entries:
            self.audit.bulk_write(new_entries, session=session, ordered=False)
        for record, reason in failures:
            log.warning("dead letter %s: %s", where(record), reason)
        park_dead_letters(session, self.database, PROJECTION, failures)
        if erased:
            # A parked record may hold a payload published before sealing, in clear.
            self.database[DEAD_LETTERS_COLLECTION].delete_many(
                {"projection": PROJECTION, "key": {"$in": [i.encode() for i in sorted(erased)]}},
                session=session,
            )
        return {
            "applied": applied,
            "duplicates": duplicates,
            "no_customer": no_customer,
            "dead_letters": len(failures),
            "documents_written": len(touched),
            "pipelines_written": len(touched_pipelines),
            "renames": len(renames),
            "audit_entries": len(new_entries),
            "erased": len(erased),
            "timeline_entries": len(rows),
        }

    @staticmethod
    def _mark_seen(
        docs: dict[str, Customer360 | None],
        touched: set[str],
        adapter: SourceAdapter[Any],
        event: Any,
    ) -> None:
        # An event type this version does not know still counts as seen, so
        # a reader waiting for its position is not held up until the timeout;
        # the event itself is in the dead letters, and a rebuild after an
        # upgrade applies it. An event of a source other than contacts may be
        # the customer's first.
        customer_id = adapter.customer_of(event)
        if not customer_id:
            return
        doc = docs.get(customer_id)
        if doc is None:
            if not adapter.creates_documents:
                return
            doc = new_document(customer_id)
        if applied_position(doc, adapter.source) < event.position:
            doc = doc.copy()
            if adapter.mark_seen is not None:
                adapter.mark_seen(doc, event)
            else:
                advance(doc, event.position, to_datetime(event.occurred_at), adapter.source)
            docs[customer_id] = doc
            touched.add(customer_id)

    @staticmethod
    def _erase_roles_update(person_id: str) -> UpdateMany:
        return UpdateMany(
            {"members.person_id": person_id},
            {"$set": {"members.$[m].role": REDACTED}},
            array_filters=[{"m.person_id": person_id}],
        )

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
