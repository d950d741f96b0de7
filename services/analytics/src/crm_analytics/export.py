"""The analytics part of a person's export (`ExportPersonalData`).

Served through `crm_common.privacy.export.personal_data_service`, which
contacts' `ExportPerson` gathers with every other service's part. The part
is what the view holds about the contact:

    {
      "customer_360": {...},   # the document as the REST API shows it, every
                               # field, no role's redaction; {} when the view
                               # never applied an event of the contact
      "audit_trail": [...],    # every audit entry of the contact and of the
                               # contacts merged into it, newest first, as
                               # GET /audit shows them
      "timeline": [...],       # every timeline entry (the document keeps the
                               # newest 500), newest first, as
                               # GET /customers/{id}/timeline shows them
    }

A contact the view never saw is not an error: every part is empty.
"""

from __future__ import annotations

from typing import Any

from crm_analytics.audit import MAX_PAGE_SIZE, after_token
from crm_analytics.query import Customer360Queries
from crm_analytics.rest_api import AuditEntryReply, TimelineEntryReply, audit_entry_json, to_json
from crm_analytics.timeline import MAX_PAGE_SIZE as MAX_TIMELINE_PAGE
from crm_analytics.timeline import parse_page_token


class Customer360Exporter:
    """contact id -> the analytics part of the person's export (runs in a thread)."""

    def __init__(self, queries: Customer360Queries) -> None:
        self.queries = queries

    def __call__(self, contact_id: str) -> dict[str, Any]:
        doc = self.queries.known(contact_id)
        view: dict[str, Any] = dict(to_json(doc)) if doc is not None else {}
        ids = [contact_id, *(doc.get("merged_ids", []) if doc is not None else [])]
        trail: list[AuditEntryReply] = []
        for customer_id in dict.fromkeys(ids):
            trail.extend(self._audit_trail(customer_id))
        trail.sort(key=lambda e: (e["occurred_at"] or "", e["position"]), reverse=True)
        timeline = self._timeline(doc) if doc is not None else []
        return {"customer_360": view, "audit_trail": trail, "timeline": timeline}

    def _timeline(self, doc: Any) -> list[TimelineEntryReply]:
        entries: list[TimelineEntryReply] = []
        ids = [doc["_id"], *doc.get("merged_ids", [])]
        token: str | None = None
        while True:
            page = self.queries.store.timeline_page(
                ids,
                (),
                MAX_TIMELINE_PAGE,
                token,
                parse_page_token(token) if token else None,
                doc.get("timeline", []),
            )
            shaped = to_json(
                {"_id": doc["_id"], "customer_id": doc["_id"], "timeline": page.entries}
            )
            entries.extend(shaped["timeline"])
            token = page.next_page_token
            if token is None:
                return entries

    def _audit_trail(self, customer_id: str) -> list[AuditEntryReply]:
        entries: list[AuditEntryReply] = []
        after = None
        while True:
            page = self.queries.store.audit_trail(
                customer_id=customer_id,
                actor=None,
                since=None,
                until=None,
                page_size=MAX_PAGE_SIZE,
                after=after,
            )
            entries.extend(audit_entry_json(e) for e in page.entries)
            if page.next_page_token is None:
                return entries
            after = after_token(page.next_page_token)
