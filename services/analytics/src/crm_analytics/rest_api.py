"""REST adapter for the frontends: the 360 view as JSON.

Errors are raised as CrmError; `crm_common.server.serve()` installs the
handlers that turn them into 404 / 422 / 504.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query

from crm_analytics.customer360 import Doc
from crm_analytics.query import MAX_WAIT_MS, Customer360Queries
from crm_common.errors import ValidationFailed


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_wait_for(values: list[str]) -> dict[str, int]:
    """`["contacts:123", ...]` -> `{"contacts": 123}` (the highest per source)."""
    wait_for: dict[str, int] = {}
    for value in values:
        source, sep, position = value.rpartition(":")
        if not sep or not source or not position.isdigit():
            raise ValidationFailed.of(
                "wait_for", f"{value!r} is not <source>:<position>, e.g. contacts:123"
            )
        wait_for[source] = max(wait_for.get(source, 0), int(position))
    return wait_for


def deal_json(deal: Doc) -> dict[str, Any]:
    return {
        "opportunity_id": deal["opportunity_id"],
        "version": int(deal.get("version", 0)),
        "name": deal.get("name", ""),
        "pipeline_id": deal.get("pipeline_id", ""),
        "pipeline_name": deal.get("pipeline_name", ""),
        "stage_id": deal.get("stage_id", ""),
        "stage_name": deal.get("stage_name", ""),
        "amount": {"amount": deal.get("amount", ""), "currency": deal.get("currency", "")},
        "status": deal.get("status", "unspecified"),
        "expected_close_date": deal.get("expected_close_date") or None,
        "owner": deal.get("owner", ""),
        "person_id": deal.get("person_id", ""),
        "company_id": deal.get("company_id", ""),
        "kind": deal.get("kind", "unspecified"),
        "opened_at": iso(deal.get("opened_at")),
        "stage_entered_at": iso(deal.get("stage_entered_at")),
        "closed_on": deal.get("closed_on") or None,
        "closed_at": iso(deal.get("closed_at")),
        "lost_reason": deal.get("lost_reason", ""),
    }


def to_json(doc: Doc) -> dict[str, Any]:
    """The stored document as the API shows it: enums as words, ISO-8601 times.

    A customer known so far only from its deals (its contacts events not
    applied yet) has kind `unspecified` and none of the person's or company's
    fields.
    """
    kind = doc.get("kind") or "unspecified"
    body: dict[str, Any] = {
        "customer_id": doc["_id"],
        "kind": kind,
        "display_name": doc.get("display_name", ""),
    }
    if kind == "person":
        body["given_name"] = doc.get("given_name", "")
        body["family_name"] = doc.get("family_name", "")
    elif kind == "company":
        body["domain"] = doc.get("domain", "")
        body["industry"] = doc.get("industry", "")
    body["lifecycle_stage"] = doc.get("lifecycle_stage", "unspecified")
    body["owner"] = doc.get("owner", "")
    body["tags"] = list(doc.get("tags", []))
    body["custom_fields"] = {
        name: {
            "type": v.get("type", ""),
            "value": v.get("value", ""),
            "currency": v.get("currency", ""),
        }
        for name, v in (doc.get("custom_fields") or {}).items()
    }
    if kind == "person":
        body["channels"] = [
            {
                "channel": c.get("channel"),
                "address": c.get("address", ""),
                "preferred": bool(c.get("preferred")),
                "consent": {
                    "status": (c.get("consent") or {}).get("status", "unspecified"),
                    "source": (c.get("consent") or {}).get("source", ""),
                    "recorded_at": iso((c.get("consent") or {}).get("recorded_at")),
                },
            }
            for c in doc.get("channels", [])
        ]
        body["companies"] = [
            {
                "company_id": c["company_id"],
                "company_name": c.get("company_name", ""),
                "role": c.get("role", ""),
            }
            for c in doc.get("companies", [])
        ]
    elif kind == "company":
        body["members"] = [
            {"person_id": m["person_id"], "role": m.get("role", ""), "since": iso(m.get("since"))}
            for m in doc.get("members", [])
        ]
    body["timeline"] = [
        {
            "entry_id": e["entry_id"],
            "source": e.get("source", ""),
            "kind": e.get("kind", ""),
            "summary": e.get("summary", ""),
            "occurred_at": iso(e.get("occurred_at")),
            "direction": e.get("direction", "unspecified"),
            "channel": e.get("channel", "unspecified"),
            "owner": e.get("owner", ""),
        }
        for e in doc.get("timeline", [])
    ]
    body["deals"] = [deal_json(d) for d in doc.get("deals", [])]
    body["lifetime_won_revenue"] = [
        {"amount": m["amount"], "currency": m["currency"]}
        for m in doc.get("lifetime_won_revenue", [])
    ]
    body["positions"] = {k: int(v) for k, v in (doc.get("positions") or {}).items()}
    body["created_at"] = iso(doc.get("created_at"))
    body["updated_at"] = iso(doc.get("updated_at"))
    return body


def create_app(queries: Customer360Queries) -> FastAPI:
    app = FastAPI(
        title="CRM analytics",
        version="1",
        description="Read models built from every service's events: the 360-degree customer view.",
    )

    @app.get("/customers/{customer_id}/360", summary="The 360-degree view of one customer")
    async def get_customer360(
        customer_id: str,
        wait_for: Annotated[
            list[str],
            Query(
                description="Wait until this write is visible: `<source>:<position>`, "
                "e.g. `contacts:123` or `pipeline:45` (the position a write returned); "
                "repeatable."
            ),
        ] = [],  # noqa: B006 - FastAPI copies query defaults per request
        timeout_ms: Annotated[
            int | None,
            Query(ge=0, le=MAX_WAIT_MS, description="How long to wait (default 5000 ms)."),
        ] = None,
    ) -> dict[str, Any]:
        doc = await queries.get_customer360(customer_id, parse_wait_for(wait_for), timeout_ms)
        return to_json(doc)

    return app
