"""The audit trail: who did what to a customer, when, through which client.

A read model of its own, collection `audit`, built by the same projection as
the 360 view and written in the same transaction as the 360 change of each
batch: one entry per event of every consumed topic, `_id` =
`<source>:<ce_id>` (the CloudEvents id is unique within a source service),
so a record consumed twice is one entry. Each entry holds the record's key
(the customer: a contact id; for a lead not converted yet or a pipeline
definition, the lead's or the pipeline's id), the source service, the
CloudEvents type, id and time, the event's position, and the audit headers
the relays put on every record (`crm_common.relay.AUDIT_HEADERS`): the
verified actor, the client, the command and the request id.

Read newest first (by time, then position, then id) per customer or per
actor, in pages whose token is where the previous page ended (keyset paging:
entries arriving meanwhile neither shift nor repeat a page).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from pymongo import DESCENDING
from pymongo.collection import Collection
from pymongo.database import Database

from crm_analytics.document import aware
from crm_common.records import Record, header
from crm_common.relay import AUDIT_HEADERS

AUDIT_COLLECTION = "audit"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Newest first; ties (one command's events share a time) by position, then id.
ORDER = [("occurred_at", DESCENDING), ("position", DESCENDING), ("_id", DESCENDING)]


class AuditEntry(TypedDict):
    _id: str
    customer_id: str
    source: str
    event_type: str
    event_id: str
    occurred_at: datetime | None
    actor: str
    client: str
    command: str
    request_id: str
    position: int


def parse_time(text: str | None) -> datetime | None:
    """A CloudEvents time (`2026-11-02T09:00:00.123Z`) as an aware datetime."""
    if not text:
        return None
    try:
        return aware(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def audit_entry(
    record: Record, source: str, position: int, occurred_at: datetime | None
) -> AuditEntry:
    """The entry of one consumed event; `occurred_at` when the record names no time."""
    event_id = header(record, "ce_id") or f"{record.topic}:{record.partition}@{record.offset}"
    key = bytes(record.key).decode("utf-8", "replace") if record.key else ""
    audit = {field: header(record, name) or "" for field, name in AUDIT_HEADERS.items()}
    return {
        "_id": f"{source}:{event_id}",
        "customer_id": key,
        "source": source,
        "event_type": header(record, "ce_type") or "",
        "event_id": event_id,
        "occurred_at": parse_time(header(record, "ce_time")) or occurred_at,
        "actor": audit["actor"],
        "client": audit["client"],
        "command": audit["command"],
        "request_id": audit["request_id"],
        "position": position,
    }


def ensure_audit_indexes(database: Database[Any]) -> None:
    """One index per question: a customer's entries and an actor's, newest first."""
    collection = database[AUDIT_COLLECTION]
    collection.create_index([("customer_id", 1), *ORDER], name="by_customer")
    collection.create_index([("actor", 1), *ORDER], name="by_actor")


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    #: Where the next page starts; None after the last page.
    next_page_token: str | None


def page_token(entry: AuditEntry) -> str:
    """The token of the page after `entry` (opaque to clients)."""
    when = entry["occurred_at"]
    after = {
        "t": aware(when).isoformat() if when is not None else None,
        "p": entry["position"],
        "i": entry["_id"],
    }
    return base64.urlsafe_b64encode(json.dumps(after).encode()).decode().rstrip("=")


def after_token(token: str) -> dict[str, Any]:
    """The filter of the entries after a page token; ValueError if it is not one."""
    try:
        padded = token + "=" * (-len(token) % 4)
        after = json.loads(base64.urlsafe_b64decode(padded.encode()))
        when = None if after["t"] is None else aware(datetime.fromisoformat(after["t"]))
        position, ident = int(after["p"]), str(after["i"])
        if not 0 <= position < 2**63:
            raise ValueError(position)
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError) as error:
        raise ValueError("is not a page token this service gave") from error
    if when is None:
        # Entries without a time sort last (null is the smallest value).
        return {
            "occurred_at": None,
            "$or": [{"position": {"$lt": position}}, {"position": position, "_id": {"$lt": ident}}],
        }
    return {
        "$or": [
            {"occurred_at": {"$lt": when}},
            {"occurred_at": None},
            {"occurred_at": when, "position": {"$lt": position}},
            {"occurred_at": when, "position": position, "_id": {"$lt": ident}},
        ]
    }


def find_entries(
    collection: Collection[AuditEntry],
    *,
    customer_id: str | None,
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    page_size: int,
    after: dict[str, Any] | None,
) -> AuditPage:
    """One page of the entries matching the (already validated) question."""
    conditions: list[dict[str, Any]] = []
    if customer_id:
        conditions.append({"customer_id": customer_id})
    if actor:
        conditions.append({"actor": actor})
    if since is not None:
        conditions.append({"occurred_at": {"$gte": aware(since)}})
    if until is not None:
        conditions.append({"occurred_at": {"$lt": aware(until)}})
    if after:
        conditions.append(after)
    query = conditions[0] if len(conditions) == 1 else {"$and": conditions}
    found: Sequence[AuditEntry] = list(collection.find(query).sort(ORDER).limit(page_size + 1))
    entries = list(found[:page_size])
    more = len(found) > page_size
    return AuditPage(entries, page_token(entries[-1]) if more and entries else None)
