"""ListTimeline: a customer's whole timeline as one caller may see it, for both adapters.

The same customer and the same rules as GetCustomer360 (`visibility.py`):
an unknown customer is NotFound, a partner reads only the customers carrying
its tag, a merged contact answers with its survivor's timeline and a
survivor's folds in the entries of the contacts merged into it. Roles that
may not see the 360 view's `timeline` get no entries (and a total of 0);
those that may not see `deals.amount` get the deals' summaries without it;
analysts get the summaries as the same pseudonyms as the 360 view's
`timeline.summary` (the adapters apply `hidden` and `pseudonymised` with the
360 view's paths, so both answers agree entry by entry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crm_analytics.document import TimelineEntry
from crm_analytics.query import MAX_ID_LENGTH, Customer360Queries
from crm_analytics.store import sources as known_sources
from crm_analytics.timeline import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, parse_page_token
from crm_analytics.visibility import AMOUNT_PATH, customer360_for, without_amounts
from crm_common.auth.gate import AccessGate
from crm_common.auth.principal import Principal
from crm_common.errors import FieldErrors

#: The 360 view's path of the timeline (hidden from some roles).
TIMELINE_PATH = "timeline"


@dataclass(frozen=True)
class TimelineRequest:
    customer_id: str
    page_size: int
    page_token: str | None
    after: dict[str, Any] | None
    sources: tuple[str, ...]


@dataclass(frozen=True)
class VisibleTimeline:
    """A page of the timeline for one caller, and how its reply is to be shaped
    (paths of the 360 view's reply: `timeline.summary`, ...)."""

    customer_id: str
    entries: list[TimelineEntry]
    next_page_token: str | None
    total: int
    hidden: frozenset[str]
    pseudonymised: frozenset[str]


def timeline_request(
    customer_id: str,
    page_size: int | None,
    page_token: str | None,
    sources: Sequence[str],
    *,
    sources_field: str = "sources",
) -> TimelineRequest:
    """The validated question; ValidationFailed naming every bad field.

    `page_size` 0 or None is the default (50); `sources_field` is how the
    transport names the filter (`sources` on gRPC, `source` on REST).
    """
    errors = FieldErrors()
    if not customer_id:
        errors.add("customer_id", "is required")
    elif len(customer_id) > MAX_ID_LENGTH:
        errors.add("customer_id", f"is longer than {MAX_ID_LENGTH} characters")
    if page_size is not None and not 0 <= page_size <= MAX_PAGE_SIZE:
        errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    after: dict[str, Any] | None = None
    if page_token:
        try:
            after = parse_page_token(page_token)
        except ValueError as error:
            errors.add("page_token", str(error))
    known = known_sources()
    for source in sources:
        if source not in known:
            errors.add(sources_field, f"unknown source {source[:50]!r} (known: {', '.join(known)})")
    errors.raise_if_any()
    return TimelineRequest(
        customer_id,
        page_size or DEFAULT_PAGE_SIZE,
        page_token or None,
        after,
        tuple(dict.fromkeys(sources)),
    )


async def timeline_for(
    queries: Customer360Queries,
    gate: AccessGate,
    caller: Principal,
    request: TimelineRequest,
) -> VisibleTimeline:
    """One page of the customer's timeline as `caller` may see it."""
    visible = await customer360_for(queries, gate, caller, request.customer_id)
    doc = visible.doc
    if TIMELINE_PATH in visible.hidden:
        return VisibleTimeline(doc["_id"], [], None, 0, visible.hidden, visible.pseudonymised)
    page = await asyncio.to_thread(
        queries.store.timeline_page,
        [doc["_id"], *doc.get("merged_ids", [])],
        request.sources,
        request.page_size,
        request.page_token,
        request.after,
        doc.get("timeline", []),
    )
    entries = page.entries
    if AMOUNT_PATH in visible.hidden:
        shown = without_amounts({"_id": doc["_id"], "customer_id": doc["_id"], "timeline": entries})
        entries = shown["timeline"]
    return VisibleTimeline(
        doc["_id"],
        entries,
        page.next_page_token,
        page.total,
        visible.hidden,
        visible.pseudonymised,
    )
