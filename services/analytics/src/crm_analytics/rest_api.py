"""REST adapter for the frontends: the 360 view as JSON.

Errors are raised as CrmError; `crm_common.server.serve()` installs the
handlers that turn them into 404 / 422 / 504.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, NotRequired

from fastapi import FastAPI, Query
from typing_extensions import TypedDict

from crm_analytics.document import Customer360, Deal, aware, stored_word
from crm_analytics.query import MAX_WAIT_MS, Customer360Queries
from crm_common.errors import ValidationFailed

# -- the reply ---------------------------------------------------------------------------
# Enum fields are lower-case words, null when unset; times ISO-8601 UTC, null when unknown.


class AmountReply(TypedDict):
    amount: str
    currency: str


class CustomFieldReply(TypedDict):
    type: str
    value: str
    currency: str


class ConsentReply(TypedDict):
    status: str | None
    source: str
    recorded_at: str | None


class ChannelReply(TypedDict):
    channel: str | None
    address: str
    preferred: bool
    consent: ConsentReply


class CompanyReply(TypedDict):
    company_id: str
    company_name: str
    role: str


class MemberReply(TypedDict):
    person_id: str
    role: str
    since: str | None


class TimelineEntryReply(TypedDict):
    entry_id: str
    source: str
    kind: str
    summary: str
    occurred_at: str | None
    direction: str | None
    channel: str | None
    owner: str


class DealReply(TypedDict):
    opportunity_id: str
    version: int
    name: str
    pipeline_id: str
    pipeline_name: str
    stage_id: str
    stage_name: str
    amount: AmountReply
    status: str | None
    expected_close_date: str | None
    owner: str
    person_id: str
    company_id: str
    kind: str | None
    opened_at: str | None
    stage_entered_at: str | None
    closed_on: str | None
    closed_at: str | None
    lost_reason: str


class Customer360Reply(TypedDict):
    """A person has the name fields, channels and companies; a company has domain,
    industry and members; a customer known so far only from its deals has neither
    (and kind null)."""

    customer_id: str
    kind: str | None
    display_name: str
    given_name: NotRequired[str]
    family_name: NotRequired[str]
    domain: NotRequired[str]
    industry: NotRequired[str]
    lifecycle_stage: str | None
    owner: str
    tags: list[str]
    custom_fields: dict[str, CustomFieldReply]
    channels: NotRequired[list[ChannelReply]]
    companies: NotRequired[list[CompanyReply]]
    members: NotRequired[list[MemberReply]]
    timeline: list[TimelineEntryReply]
    deals: list[DealReply]
    lifetime_won_revenue: list[AmountReply]
    positions: dict[str, int]
    created_at: str | None
    updated_at: str | None


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return aware(when).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def deal_json(deal: Deal) -> DealReply:
    return {
        "opportunity_id": deal["opportunity_id"],
        "version": deal.get("version", 0),
        "name": deal.get("name", ""),
        "pipeline_id": deal.get("pipeline_id", ""),
        "pipeline_name": deal.get("pipeline_name", ""),
        "stage_id": deal.get("stage_id", ""),
        "stage_name": deal.get("stage_name", ""),
        "amount": {"amount": deal.get("amount", ""), "currency": deal.get("currency", "")},
        "status": stored_word(deal.get("status")),
        "expected_close_date": deal.get("expected_close_date") or None,
        "owner": deal.get("owner", ""),
        "person_id": deal.get("person_id", ""),
        "company_id": deal.get("company_id", ""),
        "kind": stored_word(deal.get("kind")),
        "opened_at": iso(deal.get("opened_at")),
        "stage_entered_at": iso(deal.get("stage_entered_at")),
        "closed_on": deal.get("closed_on") or None,
        "closed_at": iso(deal.get("closed_at")),
        "lost_reason": deal.get("lost_reason", ""),
    }


def to_json(doc: Customer360) -> Customer360Reply:
    """The stored document as the API shows it: enums as words, ISO-8601 times."""
    kind = stored_word(doc.get("kind"))
    body: Customer360Reply = {
        "customer_id": doc["_id"],
        "kind": kind,
        "display_name": doc.get("display_name", ""),
        "lifecycle_stage": None,
        "owner": "",
        "tags": [],
        "custom_fields": {},
        "timeline": [],
        "deals": [],
        "lifetime_won_revenue": [],
        "positions": {},
        "created_at": None,
        "updated_at": None,
    }
    if kind == "person":
        body["given_name"] = doc.get("given_name", "")
        body["family_name"] = doc.get("family_name", "")
    elif kind == "company":
        body["domain"] = doc.get("domain", "")
        body["industry"] = doc.get("industry", "")
    body["lifecycle_stage"] = stored_word(doc.get("lifecycle_stage"))
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
                "channel": stored_word(c.get("channel")),
                "address": c.get("address", ""),
                "preferred": bool(c.get("preferred")),
                "consent": {
                    "status": stored_word(c["consent"].get("status")),
                    "source": c["consent"].get("source", ""),
                    "recorded_at": iso(c["consent"].get("recorded_at")),
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
            "direction": stored_word(e.get("direction")),
            "channel": stored_word(e.get("channel")),
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
    ) -> Customer360Reply:
        doc = await queries.get_customer360(customer_id, parse_wait_for(wait_for), timeout_ms)
        return to_json(doc)

    return app
