"""Queries of the 360 view, with read-your-writes by position.

A write in a source service returns the position of its event in that
service's log. The customer's events sit in one partition in order, and the
customer's document records the last position it applied per source
(`positions.<source>`), so "is my write visible?" is a question about that
one document: wait until `positions[source] >= position`, not for a global
watermark.

The wait polls the document every `poll_interval` (20 ms): one indexed
point read. A change stream per waiter would answer a few milliseconds
sooner but holds a server cursor per waiting request; see the README for
the measurements behind that choice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from crm_analytics.audit import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, AuditPage, after_token
from crm_analytics.document import (
    TIMELINE_LIMIT,
    Customer360,
    applied_position,
    aware,
    is_known,
    timeline_key,
)
from crm_analytics.from_loyalty import expiring_soon
from crm_analytics.store import Customer360Store, waitable_positions
from crm_common.errors import FieldErrors, NotFound, WaitTimedOut

DEFAULT_WAIT_MS = 5000
MAX_WAIT_MS = 30000
MAX_ID_LENGTH = 200
#: Positions are int64 in every contract.
MAX_POSITION = 2**63 - 1


class Customer360Queries:
    def __init__(
        self,
        store: Customer360Store,
        *,
        poll_interval: float = 0.02,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        # What "expiring soon" is measured from.
        self.clock = clock

    async def get_customer360(
        self,
        customer_id: str,
        wait_for: Mapping[str, int] | None = None,
        timeout_ms: int | None = None,
    ) -> Customer360:
        """The customer's document, once it has applied `wait_for` (if given).

        The deals carry the names of their pipeline and stage as last known.
        The loyalty part gets the points expiring soon as of the clock.
        `wait_for` names a source service (`contacts`, `pipeline`, `tickets`,
        `loyalty`) or `erp.orders` (the position of an ERP order record in
        its partition of the inbound topic: its offset + 1).
        Raises NotFound when no event of the customer itself has been applied
        (neither its registration nor any other source's event), WaitTimedOut
        when the positions were not reached in time.
        """
        wait_for = dict(wait_for or {})
        errors = FieldErrors()
        known = waitable_positions()
        if not customer_id:
            errors.add("customer_id", "is required")
        elif len(customer_id) > MAX_ID_LENGTH:
            errors.add("customer_id", f"is longer than {MAX_ID_LENGTH} characters")
        for source, position in wait_for.items():
            if source not in known:
                errors.add("wait_for", f"unknown source {source!r} (known: {', '.join(known)})")
            elif not 0 <= position <= MAX_POSITION:
                errors.add("wait_for", f"position of {source} must be between 0 and {MAX_POSITION}")
        if timeout_ms is not None and not 0 <= timeout_ms <= MAX_WAIT_MS:
            errors.add("wait_timeout_ms", f"must be between 0 and {MAX_WAIT_MS}")
        errors.raise_if_any()

        doc = await asyncio.to_thread(self.store.get, customer_id)
        if wait_for and not _reached(doc, wait_for):
            doc = await self._wait(customer_id, wait_for, timeout_ms or DEFAULT_WAIT_MS)
        if not is_known(doc):
            raise NotFound("customer", customer_id)
        assert doc is not None
        return await asyncio.to_thread(self.shown, doc)

    def shown(self, doc: Customer360) -> Customer360:
        """The stored document as the view shows it: merged customers folded in,
        the deals' pipeline and stage names joined in, the points expiring soon."""
        named = self.store.with_names(self._merged(doc))
        loyalty = named.get("loyalty")
        if loyalty is None:
            return named
        soon = expiring_soon(loyalty, self.clock())
        return {**named, "loyalty": {**loyalty, "expiring_soon": soon}}

    def known(self, customer_id: str) -> Customer360 | None:
        """The customer's document as shown, or None while none of its own events
        was applied (a blocking read, for callers off the event loop)."""
        doc = self.store.get(customer_id)
        return self.shown(doc) if doc is not None and is_known(doc) else None

    def _merged(self, doc: Customer360) -> Customer360:
        """The view of a merged customer: a contact merged into another answers
        with the survivor's view (its `customer_id` says whose); a survivor's
        view folds in what the documents of the contacts it took over hold
        (deals, cases, timeline, companies), which other sources may still
        record under their ids. Folded when read, so an undone merge leaves
        both views as they were, with what happened since."""
        survivor_id = doc.get("merged_into")
        if survivor_id:
            survivor = self.store.get(survivor_id)
            if survivor is not None and is_known(survivor):
                doc = survivor
        merged = [d for i in doc.get("merged_ids", []) if (d := self.store.get(i)) is not None]
        return fold_merged(doc, merged) if merged else doc

    async def get_audit_trail(
        self,
        *,
        customer_id: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
    ) -> AuditPage:
        """Who did what to a customer, or what an actor did: a page, newest first.

        At least one of `customer_id` and `actor`; with both, entries match
        both. `since` is inclusive, `until` exclusive.
        """
        since = aware(since) if since is not None else None
        until = aware(until) if until is not None else None
        errors = FieldErrors()
        if not customer_id and not actor:
            errors.add("customer_id", "customer_id or actor is required")
        for field, value in (("customer_id", customer_id), ("actor", actor)):
            if value and len(value) > MAX_ID_LENGTH:
                errors.add(field, f"is longer than {MAX_ID_LENGTH} characters")
        if since is not None and until is not None and until <= since:
            errors.add("until", "must be after since")
        if page_size is not None and not 0 <= page_size <= MAX_PAGE_SIZE:
            errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        after: dict[str, Any] | None = None
        if page_token:
            try:
                after = after_token(page_token)
            except ValueError as error:
                errors.add("page_token", str(error))
        errors.raise_if_any()
        return await asyncio.to_thread(
            self.store.audit_trail,
            customer_id=customer_id or None,
            actor=actor or None,
            since=since,
            until=until,
            page_size=page_size or DEFAULT_PAGE_SIZE,
            after=after,
        )

    async def _wait(
        self, customer_id: str, wait_for: dict[str, int], timeout_ms: int
    ) -> Customer360:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimedOut(
                    f"customer {customer_id!r} did not reach "
                    + ", ".join(f"{s} position {p}" for s, p in wait_for.items())
                    + f" within {timeout_ms} ms"
                )
            await asyncio.sleep(min(self.poll_interval, remaining))
            doc = await asyncio.to_thread(self.store.get, customer_id)
            if doc is not None and _reached(doc, wait_for):
                return doc


def _reached(doc: Customer360 | None, wait_for: Mapping[str, int]) -> bool:
    return all(applied_position(doc, source) >= p for source, p in wait_for.items())


def fold_merged(survivor: Customer360, merged: Sequence[Customer360]) -> Customer360:
    """`survivor` with the deals, cases, timeline entries and company links of
    the documents of the contacts merged into it (each once)."""
    folded: Customer360 = survivor.copy()
    deals = {d["opportunity_id"]: d for d in survivor.get("deals", [])}
    timeline = {e["entry_id"]: e for e in survivor.get("timeline", [])}
    companies = {c["company_id"]: c for c in survivor.get("companies", [])}
    tickets = survivor.get("tickets")
    for other in merged:
        for deal in other.get("deals", []):
            deals.setdefault(deal["opportunity_id"], deal)
        for entry in other.get("timeline", []):
            timeline.setdefault(entry["entry_id"], entry)
        for link in other.get("companies", []):
            companies.setdefault(link["company_id"], link)
        theirs = other.get("tickets")
        if theirs is not None:
            if tickets is None:
                tickets = theirs
            else:
                tickets = {
                    **tickets,
                    "open_cases": [*tickets["open_cases"], *theirs["open_cases"]],
                    "recent_cases": [*tickets["recent_cases"], *theirs["recent_cases"]],
                }
        # A membership a merge closed moved to the survivor: nothing to fold.
        theirs_loyalty = other.get("loyalty")
        if "loyalty" not in folded and theirs_loyalty and not theirs_loyalty.get("closed_by_merge"):
            folded["loyalty"] = theirs_loyalty
    if deals:
        folded["deals"] = list(deals.values())
    if timeline:
        folded["timeline"] = sorted(timeline.values(), key=timeline_key, reverse=True)[
            :TIMELINE_LIMIT
        ]
    if companies:
        folded["companies"] = list(companies.values())
    if tickets is not None:
        folded["tickets"] = tickets
    return folded
