"""REST adapter for the frontends: the 360 view and the audit trail as JSON.

The app comes from `crm_common.server.service_app`: every route is behind
the access gate (its `operation_id` is the gRPC method's name, which
`access.yaml` lists), and errors raised as CrmError become 401 / 403 / 404 /
422 / 429 / 504. Replies hold only what the caller may see (`visibility.py`):
the fields the policy hides are left out.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, NotRequired, cast

from fastapi import FastAPI, Query
from typing_extensions import TypedDict

from crm_analytics.audit import MAX_PAGE_SIZE, AuditEntry
from crm_analytics.document import (
    CaseSummary,
    Customer360,
    Deal,
    LoyaltyPart,
    TicketsPart,
    aware,
    stored_word,
)
from crm_analytics.from_tickets import averages
from crm_analytics.query import MAX_POSITION, MAX_WAIT_MS, Customer360Queries
from crm_analytics.timeline_view import timeline_for, timeline_request
from crm_analytics.visibility import customer360_for, principal
from crm_common.auth.gate import AccessGate
from crm_common.auth.redaction import pseudonymise, redact
from crm_common.errors import ValidationFailed
from crm_common.server import service_app

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
    # Left out for roles that may not see what a deal is worth (service agents).
    amount: NotRequired[AmountReply]
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


class SlaClockReply(TypedDict):
    kind: str
    state: str | None
    due_at: str | None
    remaining_seconds: int | None
    warn_at: str | None


class CaseSlaReply(TypedDict):
    """The SLA as the case's latest event left it; `state` is the worst clock's
    (breached, running, paused, met), `next_deadline` the earliest due time of a
    running clock, `breached` whether any target of the case was breached."""

    policy_id: str
    policy_version: int
    tier: str
    tier_source: str
    state: str | None
    next_deadline: str | None
    breached: bool
    clocks: list[SlaClockReply]


class CaseSatisfactionReply(TypedDict):
    csat: int
    ces: int | None
    nps: int | None
    recorded_at: str | None


class CaseReply(TypedDict):
    case_id: str
    version: int
    # Personal data: analysts get a pseudonym.
    subject: str
    status: str | None
    priority: str | None
    channel: str | None
    category: str
    team: str
    assignee: str
    opened_at: str | None
    solved_at: str | None
    closed_at: str | None
    sla: CaseSlaReply | None
    satisfaction: CaseSatisfactionReply | None


class SatisfactionSummaryReply(TypedDict):
    responses: int
    csat_average: float | None
    ces_average: float | None
    nps_average: float | None


class TicketsReply(TypedDict):
    """Open cases the most urgent first; the newest 20 solved or closed ones."""

    open_cases: list[CaseReply]
    recent_cases: list[CaseReply]
    satisfaction: SatisfactionSummaryReply


class PointsBalanceReply(TypedDict):
    active: int
    locked: int
    expired: int
    spent: int
    cancelled: int


class TierDowngradeReply(TypedDict):
    to_tier: str
    due_at: str | None


class ExpiringLotReply(TypedDict):
    lot_id: str
    points: int
    expires_at: str | None


class LedgerEntryReply(TypedDict):
    entry_id: str
    kind: str
    points: int
    detail: str
    occurred_at: str | None


class LoyaltyReply(TypedDict):
    """The membership. `tier` is null before the first tier change; progress to the
    next tier is not in the view (the thresholds are the loyalty service's
    configuration, not in its events). `expiring_soon`: unlocked lots expiring within
    30 days of the request."""

    member_number: str
    enrolment_channel: str
    enrolled_at: str | None
    balance: PointsBalanceReply
    tier: str | None
    qualifying_points: int | None
    tier_changed_at: str | None
    downgrade: TierDowngradeReply | None
    expiring_soon: list[ExpiringLotReply]
    points_expiring_soon: int
    recent_entries: list[LedgerEntryReply]


class Customer360Reply(TypedDict):
    """A person has the name fields, channels and companies; a company has domain,
    industry and members; a customer known so far only from its deals has neither
    (and kind null). `custom_fields`, `timeline`, `deals` and
    `lifetime_won_revenue` (and each deal's `amount`) are left out for the roles
    the access policy does not show them to."""

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
    custom_fields: NotRequired[dict[str, CustomFieldReply]]
    channels: NotRequired[list[ChannelReply]]
    companies: NotRequired[list[CompanyReply]]
    members: NotRequired[list[MemberReply]]
    timeline: NotRequired[list[TimelineEntryReply]]
    deals: NotRequired[list[DealReply]]
    lifetime_won_revenue: NotRequired[list[AmountReply]]
    # Null until a case of the customer is known / while not a loyalty member.
    tickets: NotRequired[TicketsReply | None]
    loyalty: NotRequired[LoyaltyReply | None]
    positions: dict[str, int]
    created_at: str | None
    updated_at: str | None
    #: The person's personal data was erased: every personal value reads "[erased]".
    erased: bool


class AuditEntryReply(TypedDict):
    customer_id: str
    source: str
    event_type: str
    event_id: str
    occurred_at: str | None
    actor: str
    client: str
    command: str
    request_id: str
    position: int


class AuditTrailReply(TypedDict):
    """Newest first; `next_page_token` (null after the last page) asks for the next page."""

    entries: list[AuditEntryReply]
    next_page_token: str | None


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return aware(when).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_POSITION = re.compile(r"[0-9]{1,19}")


def parse_wait_for(values: list[str]) -> dict[str, int]:
    """`["contacts:123", ...]` -> `{"contacts": 123}` (the highest per source)."""
    wait_for: dict[str, int] = {}
    for value in values:
        source, sep, position = value.rpartition(":")
        if not sep or not source or not _POSITION.fullmatch(position):
            raise ValidationFailed.of(
                "wait_for", f"{value[:200]!r} is not <source>:<position>, e.g. tickets:123"
            )
        if int(position) > MAX_POSITION:
            raise ValidationFailed.of(
                "wait_for", f"position of {source[:200]!r} is beyond {MAX_POSITION}"
            )
        wait_for[source] = max(wait_for.get(source, 0), int(position))
    return wait_for


def case_json(case: CaseSummary) -> CaseReply:
    sla = case.get("sla")
    answer = case.get("satisfaction")
    return {
        "case_id": case["case_id"],
        "version": int(case.get("version", 0)),
        "subject": case.get("subject", ""),
        "status": stored_word(case.get("status")),
        "priority": stored_word(case.get("priority")),
        "channel": stored_word(case.get("channel")),
        "category": case.get("category", ""),
        "team": case.get("team", ""),
        "assignee": case.get("assignee", ""),
        "opened_at": iso(case.get("opened_at")),
        "solved_at": iso(case.get("solved_at")),
        "closed_at": iso(case.get("closed_at")),
        "sla": None
        if sla is None
        else {
            "policy_id": sla["policy_id"],
            "policy_version": int(sla["policy_version"]),
            "tier": sla["tier"],
            "tier_source": sla["tier_source"],
            "state": sla["state"],
            "next_deadline": iso(sla["next_deadline"]),
            "breached": bool(sla["breached"]),
            "clocks": [
                {
                    "kind": c["kind"],
                    "state": c["state"],
                    "due_at": iso(c["due_at"]),
                    "remaining_seconds": c["remaining_seconds"],
                    "warn_at": iso(c["warn_at"]),
                }
                for c in sla["clocks"]
            ],
        },
        "satisfaction": None
        if answer is None
        else {
            "csat": answer["csat"],
            "ces": answer["ces"],
            "nps": answer["nps"],
            "recorded_at": iso(answer["recorded_at"]),
        },
    }


def tickets_json(part: TicketsPart) -> TicketsReply:
    means = averages(part["satisfaction"])
    return {
        "open_cases": [case_json(c) for c in part["open_cases"]],
        "recent_cases": [case_json(c) for c in part["recent_cases"]],
        "satisfaction": {
            "responses": int(part["satisfaction"]["responses"]),
            "csat_average": means["csat_average"],
            "ces_average": means["ces_average"],
            "nps_average": means["nps_average"],
        },
    }


def loyalty_json(part: LoyaltyPart) -> LoyaltyReply:
    soon = part.get("expiring_soon", [])
    downgrade = part["downgrade"]
    return {
        "member_number": part["member_number"],
        "enrolment_channel": part["enrolment_channel"],
        "enrolled_at": iso(part["enrolled_at"]),
        "balance": {
            "active": part["balance"]["active"],
            "locked": part["balance"]["locked"],
            "expired": part["balance"]["expired"],
            "spent": part["balance"]["spent"],
            "cancelled": part["balance"]["cancelled"],
        },
        "tier": part["tier"],
        "qualifying_points": part["qualifying_points"],
        "tier_changed_at": iso(part["tier_changed_at"]),
        "downgrade": None
        if downgrade is None
        else {"to_tier": downgrade["to_tier"], "due_at": iso(downgrade["due_at"])},
        "expiring_soon": [
            {
                "lot_id": lot["lot_id"],
                "points": lot["remaining"],
                "expires_at": iso(lot["expires_at"]),
            }
            for lot in soon
        ],
        "points_expiring_soon": sum(lot["remaining"] for lot in soon),
        "recent_entries": [
            {
                "entry_id": e["entry_id"],
                "kind": e["kind"],
                "points": int(e["points"]),
                "detail": e["detail"],
                "occurred_at": iso(e["occurred_at"]),
            }
            for e in part["recent_entries"]
        ],
    }


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
        "tickets": None,
        "loyalty": None,
        "positions": {},
        "created_at": None,
        "updated_at": None,
        "erased": bool(doc.get("erased")),
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
    tickets = doc.get("tickets")
    body["tickets"] = tickets_json(tickets) if tickets is not None else None
    loyalty = doc.get("loyalty")
    body["loyalty"] = loyalty_json(loyalty) if loyalty is not None else None
    body["positions"] = {k: int(v) for k, v in (doc.get("positions") or {}).items()}
    body["created_at"] = iso(doc.get("created_at"))
    body["updated_at"] = iso(doc.get("updated_at"))
    return body


class TimelinePageReply(TypedDict):
    """A page of the customer's whole timeline, newest first."""

    customer_id: str
    entries: list[TimelineEntryReply]
    # Pass it as `page_token` for the next page; null after the last page.
    next_page_token: str | None
    # Entries of the customer in all (with the filter applied).
    total: int


def audit_entry_json(entry: AuditEntry) -> AuditEntryReply:
    return {
        "customer_id": entry["customer_id"],
        "source": entry["source"],
        "event_type": entry["event_type"],
        "event_id": entry["event_id"],
        "occurred_at": iso(entry["occurred_at"]),
        "actor": entry["actor"],
        "client": entry["client"],
        "command": entry["command"],
        "request_id": entry["request_id"],
        "position": int(entry["position"]),
    }


def create_app(queries: Customer360Queries, gate: AccessGate, pseudonym_key: bytes) -> FastAPI:
    app = service_app(
        gate,
        title="CRM analytics",
        description="Read models built from every service's events: the 360-degree customer "
        "view and the audit trail.",
    )

    @app.get(
        "/customers/{customer_id}/360",
        summary="The 360-degree view of one customer",
        operation_id="GetCustomer360",
    )
    async def get_customer360(
        customer_id: str,
        wait_for: Annotated[
            list[str],
            Query(
                description="Wait until this write is visible: `<source>:<position>`, "
                "e.g. `contacts:123`, `pipeline:45`, `tickets:7` or `loyalty:9` (the "
                "position a write returned), or `erp.orders:<offset + 1>` for an ERP order "
                "record; repeatable."
            ),
        ] = [],  # noqa: B006 - FastAPI copies query defaults per request
        timeout_ms: Annotated[
            int | None,
            Query(ge=0, le=MAX_WAIT_MS, description="How long to wait (default 5000 ms)."),
        ] = None,
    ) -> Customer360Reply:
        visible = await customer360_for(
            queries, gate, principal(), customer_id, parse_wait_for(wait_for), timeout_ms
        )
        body = redact(to_json(visible.doc), visible.hidden)
        return cast(Customer360Reply, pseudonymise(body, visible.pseudonymised, pseudonym_key))

    @app.get(
        "/customers/{customer_id}/timeline",
        summary="A customer's whole timeline, newest first, page by page",
        operation_id="ListTimeline",
    )
    async def list_timeline(
        customer_id: str,
        page_size: Annotated[
            int | None, Query(description="Entries per page (default 50, at most 500).")
        ] = None,
        page_token: Annotated[
            str | None, Query(description="The `next_page_token` of the previous page.")
        ] = None,
        source: Annotated[
            list[str],
            Query(
                description="Only entries of this source service (`contacts`, `pipeline`, "
                "`tickets`, `loyalty`); repeatable; all when not given."
            ),
        ] = [],  # noqa: B006 - FastAPI copies query defaults per request
    ) -> TimelinePageReply:
        question = timeline_request(
            customer_id, page_size, page_token, source, sources_field="source"
        )
        visible = await timeline_for(queries, gate, principal(), question)
        # Shaped as the 360 view's timeline is, with its paths (see grpc_api).
        shaped = to_json(
            {
                "_id": visible.customer_id,
                "customer_id": visible.customer_id,
                "timeline": visible.entries,
            }
        )
        body = pseudonymise(
            redact({"timeline": shaped["timeline"]}, visible.hidden),
            visible.pseudonymised,
            pseudonym_key,
        )
        return {
            "customer_id": visible.customer_id,
            "entries": body.get("timeline", []),
            "next_page_token": visible.next_page_token,
            "total": visible.total,
        }

    @app.get(
        "/audit",
        summary="Who did what to a customer (or what one actor did), when, through which client",
        operation_id="GetAuditTrail",
    )
    async def get_audit_trail(
        customer_id: Annotated[
            str | None, Query(description="The customer (contact id) whose events to list.")
        ] = None,
        actor: Annotated[
            str | None, Query(description="The user (or service) whose actions to list.")
        ] = None,
        since: Annotated[
            datetime | None, Query(description="Only entries at or after this time (ISO-8601).")
        ] = None,
        until: Annotated[
            datetime | None, Query(description="Only entries before this time (ISO-8601).")
        ] = None,
        page_size: Annotated[
            int | None,
            Query(ge=1, le=MAX_PAGE_SIZE, description="Entries per page (default 50)."),
        ] = None,
        page_token: Annotated[
            str | None, Query(description="The `next_page_token` of the previous page.")
        ] = None,
    ) -> AuditTrailReply:
        page = await queries.get_audit_trail(
            customer_id=customer_id,
            actor=actor,
            since=since,
            until=until,
            page_size=page_size,
            page_token=page_token,
        )
        return {
            "entries": [audit_entry_json(e) for e in page.entries],
            "next_page_token": page.next_page_token,
        }

    return app
