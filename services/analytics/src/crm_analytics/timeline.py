"""A customer's whole timeline, one stored entry per document, paged newest first.

The 360 document keeps only its newest `TIMELINE_LIMIT` entries (every event
rewrites it, so it must stay small). Every entry is also kept in the
collection `customer360_timeline`, one document per entry, `_id` = the entry
id, with the customer it happened to:

    {_id, customer_id, source, kind, summary, occurred_at, direction,
     channel, owner, position}

The projector writes the entries an event adds in the same transaction as
the customer's document (`Customer360Store.apply_prepared`, through
`document.collect_timeline`); a redelivered event adds nothing (the
document's position drops it) and an entry written again replaces itself,
so redeliveries change nothing. A rebuild drops the collection with the
documents and writes it again from the topics.

Entries stay with the customer they happened to: a deal or case moved by a
contacts merge takes no entry along (as in the document), and the survivor's
timeline folds in the entries of the contacts merged into it when it is read
(`customer_ids` of a page), like GetCustomer360 does.

An erased person's entries are redacted like the document's timeline
(`personal_data.redact_entry`): the summaries read "[erased]" but those the
view writes from anonymous facts; kinds, sources and times stay.

Pages are keyset pages in the order of the document's timeline (time,
then position, then id, all descending), over the index
(customer_id, occurred_at desc, position desc, _id desc): entries added
while a client pages (newer than its first page) neither repeat nor shift
what it reads next. The page token is opaque: the sort key of the last
entry given.

What a page costs. SecantusDB reads every index entry of a query's range
and sorts them before it applies the limit (a customer with 100,000
entries: 5 to 10 s for any page of 50, 2.6 s for a count). So a page never
asks for an open range:

- the customer's stats (`customer360_timeline_stats`, one document per
  customer: entries per source and the oldest time, kept in the same
  transaction as the entries) answer `total` and tell where the history ends;
- a page within the newest entries the 360 document holds is answered from
  the document (same entries, same order);
- any other page reads time windows going back from the cursor, the first
  sized from the density of the document's entries, each next one four times
  wider, until the page is full or the oldest entry is passed (then the
  entries without a time, which sort last).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from pymongo import DESCENDING, InsertOne, ReplaceOne, UpdateMany, UpdateOne
from pymongo.collection import Collection

from crm_analytics.audit import after_token
from crm_analytics.document import TimelineEntry, aware, timeline_key
from crm_analytics.personal_data import ANONYMOUS_SUMMARIES
from crm_common.privacy import REDACTED

TIMELINE_COLLECTION = "customer360_timeline"
#: Per customer: `{_id, counts: {source: entries}, oldest}`.
STATS_COLLECTION = "customer360_timeline_stats"
#: How much wider each further time window of a page is.
WIDEN = 4
_MILLISECOND = timedelta(milliseconds=1)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
ORDER = [("occurred_at", DESCENDING), ("position", DESCENDING), ("_id", DESCENDING)]


class TimelineRow(TypedDict):
    """One stored entry: a `TimelineEntry` with the customer it happened to."""

    _id: str
    customer_id: str
    source: str
    kind: str
    summary: str
    occurred_at: datetime | None
    direction: str | None
    channel: str | None
    owner: str
    position: int


@dataclass(frozen=True)
class TimelinePage:
    entries: list[TimelineEntry]
    #: Where the next page starts; None after the last page.
    next_page_token: str | None
    #: The customer's entries in all (with the filter applied).
    total: int


def timeline_row(customer_id: str, entry: TimelineEntry) -> TimelineRow:
    return {
        "_id": entry["entry_id"],
        "customer_id": customer_id,
        "source": entry["source"],
        "kind": entry["kind"],
        "summary": entry["summary"],
        "occurred_at": entry["occurred_at"],
        "direction": entry["direction"],
        "channel": entry["channel"],
        "owner": entry["owner"],
        "position": int(entry["position"]),
    }


def as_entry(row: TimelineRow) -> TimelineEntry:
    when = row.get("occurred_at")
    return {
        "entry_id": row["_id"],
        "source": row.get("source", ""),
        "kind": row.get("kind", ""),
        "summary": row.get("summary", ""),
        "occurred_at": aware(when) if when is not None else None,
        "direction": row.get("direction"),
        "channel": row.get("channel"),
        "owner": row.get("owner", ""),
        "position": int(row.get("position", 0)),
    }


def ensure_timeline_indexes(collection: Collection[TimelineRow]) -> None:
    collection.create_index(
        [("customer_id", 1), ("occurred_at", -1), ("position", -1), ("_id", -1)],
        name="customer_newest_first",
    )


def writes(
    rows: Iterable[TimelineRow], existing: set[str]
) -> list[InsertOne[TimelineRow] | ReplaceOne[TimelineRow]]:
    """The writes of entries added by a batch, in the order of their ids: new
    ones inserted, `existing` ones (an entry an event wrote again) replaced."""
    return [
        ReplaceOne({"_id": r["_id"]}, r) if r["_id"] in existing else InsertOne(r)
        for r in sorted(rows, key=_row_id)
    ]


def stats_updates(new_rows: Iterable[TimelineRow]) -> list[UpdateOne]:
    """The stats of the customers of entries new to the collection."""
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, datetime] = {}
    for row in new_rows:
        customer = row["customer_id"]
        per_source = counts.setdefault(customer, {})
        per_source[row["source"]] = per_source.get(row["source"], 0) + 1
        when = row["occurred_at"]
        if when is not None and (customer not in oldest or when < oldest[customer]):
            oldest[customer] = when
    updates = []
    for customer in sorted(counts):
        change: dict[str, Any] = {
            "$inc": {f"counts.{source}": n for source, n in sorted(counts[customer].items())}
        }
        if customer in oldest:
            change["$min"] = {"oldest": oldest[customer]}
        updates.append(UpdateOne({"_id": customer}, change, upsert=True))
    return updates


def _row_id(row: TimelineRow) -> str:
    return row["_id"]


def erase_update(customer_ids: Sequence[str]) -> UpdateMany:
    """Redacts the stored entries of erased customers, as `redact_entry` does."""
    return UpdateMany(
        {
            "customer_id": {"$in": list(customer_ids)},
            "kind": {"$nin": sorted(ANONYMOUS_SUMMARIES)},
            # An empty summary held nothing: it stays empty.
            "summary": {"$nin": ["", REDACTED]},
        },
        {"$set": {"summary": REDACTED}},
    )


def page_token(row: TimelineRow) -> str:
    """The token of the page after `row` (opaque to clients)."""
    when = row.get("occurred_at")
    after = {
        "t": aware(when).isoformat() if when is not None else None,
        "p": int(row["position"]),
        "i": row["_id"],
    }
    return base64.urlsafe_b64encode(json.dumps(after).encode()).decode().rstrip("=")


def parse_page_token(token: str) -> dict[str, Any]:
    """The filter of the entries after a page token; ValueError if it is not one."""
    return after_token(token)


def _key(entry: TimelineEntry) -> tuple[datetime, int, str]:
    return timeline_key(entry)


def _cursor(after: dict[str, Any] | None, token: str | None) -> tuple[datetime, int, str] | None:
    if not token or after is None:
        return None
    parsed = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
    when = aware(datetime.fromisoformat(parsed["t"])) if parsed["t"] is not None else None
    return timeline_key(
        {
            "entry_id": str(parsed["i"]),
            "source": "",
            "kind": "",
            "summary": "",
            "occurred_at": when,
            "direction": None,
            "channel": None,
            "owner": "",
            "position": int(parsed["p"]),
        }
    )


def _entry_token(entry: TimelineEntry) -> str:
    return page_token(timeline_row("", entry))


def find_timeline(
    collection: Collection[TimelineRow],
    stats: Collection[dict[str, Any]],
    *,
    customer_ids: Sequence[str],
    sources: Sequence[str],
    page_size: int,
    after: dict[str, Any] | None,
    token: str | None,
    newest: Sequence[TimelineEntry],
) -> TimelinePage:
    """One page of the entries of these customers (a survivor and the contacts
    merged into it), newest first, with the (already validated) filter.

    `newest` is the timeline the customers' (folded) 360 document holds: the
    newest entries of the whole history, newest first.
    """
    ids = list(dict.fromkeys(customer_ids))
    known = list(stats.find({"_id": {"$in": ids}}))
    everything = sum(int(n) for s in known for n in (s.get("counts") or {}).values())
    total = sum(
        int(n)
        for s in known
        for source, n in (s.get("counts") or {}).items()
        if not sources or source in sources
    )
    oldest = min((aware(s["oldest"]) for s in known if s.get("oldest") is not None), default=None)
    cursor = _cursor(after, token)
    shown = [e for e in newest if not sources or e["source"] in sources]
    ahead = [e for e in shown if cursor is None or _key(e) < cursor]
    if len(ahead) > page_size or (known and everything <= len(newest)):
        # Within the newest entries the document holds (or all there are).
        entries = list(ahead[:page_size])
        more = len(ahead) > page_size
        return TimelinePage(entries, _entry_token(entries[-1]) if more else None, total)

    base: dict[str, Any] = {"customer_id": ids[0] if len(ids) == 1 else {"$in": ids}}
    if sources:
        base["source"] = sources[0] if len(sources) == 1 else {"$in": list(sources)}

    def read(when: Any, limit: int) -> list[TimelineRow]:
        # Plain conditions only: with an `$or` next to them SecantusDB reads
        # the customer's whole range instead of the window's.
        return list(collection.find({**base, "occurred_at": when}).sort(ORDER).limit(limit))

    found: list[TimelineRow] = []
    start = cursor[0] if cursor is not None else (_key(newest[0])[0] if newest else None)
    undated_cursor = after is not None and "$or" not in after
    if undated_cursor or start is None or oldest is None:
        # Past every dated entry, or nothing to size windows with: one plain read.
        query = {"$and": [base, after]} if after else base
        found = list(collection.find(query).sort(ORDER).limit(page_size + 1))
    else:
        if cursor is not None:
            # The cursor's own time: the entries after it in (position, id).
            same = collection.find(
                {**base, "occurred_at": cursor[0], "position": {"$lte": cursor[1]}}
            )
            # Ties on time and position (entries of different sources) by id.
            ahead_rows = [r for r in same.sort(ORDER) if _key(as_entry(r)) < cursor]
            found = ahead_rows[: page_size + 1]
        window = _first_window(newest, page_size)
        high: datetime | None = cursor[0] if cursor is not None else None
        low = start - window
        while len(found) <= page_size:
            # `$gt` a millisecond before (BSON's precision), not `$gte`: with an
            # upper bound next to it SecantusDB leaves out entries at `low` itself.
            span: dict[str, Any] = {"$gt": low - _MILLISECOND}
            if high is not None:
                span["$lt"] = high
            found += read(span, page_size + 1 - len(found))
            if len(found) > page_size:
                break
            if low <= oldest:
                found += read(None, page_size + 1 - len(found))
                break
            window *= WIDEN
            high, low = low, max(low - window, oldest)
    rows = found[:page_size]
    more = len(found) > page_size
    return TimelinePage(
        [as_entry(r) for r in rows], page_token(rows[-1]) if more and rows else None, total
    )


def _first_window(newest: Sequence[TimelineEntry], page_size: int) -> timedelta:
    """A time window likely to hold a page, from the density of the newest entries."""
    dated = [_key(e)[0] for e in newest if e["occurred_at"] is not None]
    if len(dated) < 2 or dated[0] <= dated[-1]:
        return timedelta(hours=1)
    per_entry = (dated[0] - dated[-1]) / (len(dated) - 1)
    return max(per_entry * (page_size + 1) * 2, timedelta(seconds=1))
