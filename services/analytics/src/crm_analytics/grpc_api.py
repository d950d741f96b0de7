"""gRPC adapter: crm.customer360.v1.Customer360Service over the queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2
from crm.customer360.v1 import customer360_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm.tickets.v1 import tickets_pb2
from crm_analytics.audit import AuditEntry
from crm_analytics.document import (
    CaseSummary,
    Consent,
    Customer360,
    Deal,
    LoyaltyPart,
    TicketsPart,
    aware,
    stored_word,
)
from crm_analytics.from_tickets import averages
from crm_analytics.query import DEFAULT_WAIT_MS, MAX_WAIT_MS, Customer360Queries
from crm_analytics.timeline_view import timeline_for, timeline_request
from crm_analytics.visibility import customer360_for, principal
from crm_common.auth.gate import AccessGate
from crm_common.auth.redaction import pseudonymise_message, redact_message
from crm_common.enums import ProtoEnum, enum_number
from crm_common.errors import ValidationFailed
from crm_common.timestamps import datetime_of


def _number(enum: ProtoEnum, word: str | None) -> Any:
    # Typed Any like `enum_number`: the number fits whichever enum field it is for.
    return enum_number(enum, stored_word(word))


def _timestamp(target: Timestamp, when: datetime | None) -> None:
    if when is not None:
        target.FromDatetime(aware(when))


def _consent(consent: Consent) -> contacts_pb2.Consent:
    message = contacts_pb2.Consent(
        status=_number(contacts_pb2.ConsentStatus, consent.get("status")),
        source=consent.get("source", ""),
    )
    _timestamp(message.recorded_at, consent.get("recorded_at"))
    return message


def _deal(deal: Deal) -> customer360_pb2.Deal:
    message = customer360_pb2.Deal(
        opportunity_id=deal["opportunity_id"],
        version=int(deal.get("version", 0)),
        name=deal.get("name", ""),
        pipeline_id=deal.get("pipeline_id", ""),
        pipeline_name=deal.get("pipeline_name", ""),
        stage_id=deal.get("stage_id", ""),
        stage_name=deal.get("stage_name", ""),
        amount=pipeline_pb2.Money(amount=deal.get("amount", ""), currency=deal.get("currency", "")),
        status=_number(pipeline_pb2.OpportunityStatus, deal.get("status")),
        expected_close_date=deal.get("expected_close_date", ""),
        owner=deal.get("owner", ""),
        person_id=deal.get("person_id", ""),
        company_id=deal.get("company_id", ""),
        kind=_number(pipeline_pb2.OpportunityKind, deal.get("kind")),
        closed_on=deal.get("closed_on", ""),
        lost_reason=deal.get("lost_reason", ""),
    )
    _timestamp(message.opened_at, deal.get("opened_at"))
    _timestamp(message.stage_entered_at, deal.get("stage_entered_at"))
    _timestamp(message.closed_at, deal.get("closed_at"))
    return message


def _case(case: CaseSummary) -> customer360_pb2.CaseSummary:
    message = customer360_pb2.CaseSummary(
        case_id=case["case_id"],
        version=int(case.get("version", 0)),
        subject=case.get("subject", ""),
        status=_number(tickets_pb2.CaseStatus, case.get("status")),
        priority=_number(tickets_pb2.Priority, case.get("priority")),
        channel=_number(tickets_pb2.Channel, case.get("channel")),
        category=case.get("category", ""),
        team=case.get("team", ""),
        assignee=case.get("assignee", ""),
    )
    _timestamp(message.opened_at, case.get("opened_at"))
    _timestamp(message.solved_at, case.get("solved_at"))
    _timestamp(message.closed_at, case.get("closed_at"))
    sla = case.get("sla")
    if sla is not None:
        message.sla.CopyFrom(
            customer360_pb2.CaseSlaState(
                policy_id=sla["policy_id"],
                policy_version=int(sla["policy_version"]),
                tier=sla["tier"],
                tier_source=sla["tier_source"],
                state=sla["state"] or "",
                breached=bool(sla["breached"]),
            )
        )
        _timestamp(message.sla.next_deadline, sla["next_deadline"])
        for clock in sla["clocks"]:
            item = customer360_pb2.CaseSlaClock(kind=clock["kind"], state=clock["state"] or "")
            if clock["remaining_seconds"] is not None:
                item.remaining_seconds = int(clock["remaining_seconds"])
            _timestamp(item.due_at, clock["due_at"])
            _timestamp(item.warn_at, clock["warn_at"])
            message.sla.clocks.append(item)
    answer = case.get("satisfaction")
    if answer is not None:
        message.satisfaction.csat = int(answer["csat"])
        if answer["ces"] is not None:
            message.satisfaction.ces = int(answer["ces"])
        if answer["nps"] is not None:
            message.satisfaction.nps = int(answer["nps"])
        _timestamp(message.satisfaction.recorded_at, answer["recorded_at"])
    return message


def _tickets(part: TicketsPart) -> customer360_pb2.CustomerCases:
    message = customer360_pb2.CustomerCases(
        open_cases=[_case(c) for c in part["open_cases"]],
        recent_cases=[_case(c) for c in part["recent_cases"]],
    )
    totals = part["satisfaction"]
    message.satisfaction.responses = int(totals["responses"])
    for name, value in averages(totals).items():
        if value is not None:
            setattr(message.satisfaction, name, value)
    return message


def _loyalty(part: LoyaltyPart) -> customer360_pb2.LoyaltyMembership:
    balance = part["balance"]
    message = customer360_pb2.LoyaltyMembership(
        member_number=part["member_number"],
        enrolment_channel=part["enrolment_channel"],
        balance=customer360_pb2.PointsBalance(
            active=balance["active"],
            locked=balance["locked"],
            expired=balance["expired"],
            spent=balance["spent"],
            cancelled=balance["cancelled"],
        ),
        tier=part["tier"] or "",
    )
    _timestamp(message.enrolled_at, part["enrolled_at"])
    if part["qualifying_points"] is not None:
        message.qualifying_points = int(part["qualifying_points"])
    _timestamp(message.tier_changed_at, part["tier_changed_at"])
    downgrade = part["downgrade"]
    if downgrade is not None:
        message.downgrade.to_tier = downgrade["to_tier"]
        _timestamp(message.downgrade.due_at, downgrade["due_at"])
    for lot in part.get("expiring_soon", []):
        item = customer360_pb2.ExpiringLot(lot_id=lot["lot_id"], points=lot["remaining"])
        _timestamp(item.expires_at, lot["expires_at"])
        message.expiring_soon.append(item)
    message.points_expiring_soon = sum(lot["remaining"] for lot in part.get("expiring_soon", []))
    for entry in part["recent_entries"]:
        ledger = customer360_pb2.LedgerEntry(
            entry_id=entry["entry_id"],
            kind=entry["kind"],
            points=int(entry["points"]),
            detail=entry["detail"],
        )
        _timestamp(ledger.occurred_at, entry["occurred_at"])
        message.recent_entries.append(ledger)
    return message


def to_proto(doc: Customer360) -> customer360_pb2.Customer360:
    """The stored document as the public message."""
    message = customer360_pb2.Customer360(
        customer_id=doc["_id"],
        kind=_number(contacts_pb2.ContactKind, doc.get("kind")),
        display_name=doc.get("display_name", ""),
        given_name=doc.get("given_name", ""),
        family_name=doc.get("family_name", ""),
        lifecycle_stage=_number(contacts_pb2.LifecycleStage, doc.get("lifecycle_stage")),
        tags=doc.get("tags", []),
        owner=doc.get("owner", ""),
        domain=doc.get("domain", ""),
        industry=doc.get("industry", ""),
        positions={k: int(v) for k, v in (doc.get("positions") or {}).items()},
        erased=bool(doc.get("erased")),
    )
    for name, value in (doc.get("custom_fields") or {}).items():
        message.custom_fields[name].CopyFrom(
            contacts_pb2.CustomFieldValue(
                type=value.get("type", ""),
                value=value.get("value", ""),
                currency=value.get("currency", ""),
            )
        )
    for channel in doc.get("channels", []):
        message.channels.append(
            customer360_pb2.ChannelConsent(
                channel=_number(contacts_pb2.Channel, channel.get("channel")),
                address=channel.get("address", ""),
                preferred=bool(channel.get("preferred")),
                consent=_consent(channel.get("consent")),
            )
        )
    for company in doc.get("companies", []):
        message.companies.append(
            customer360_pb2.CompanyMembership(
                company_id=company["company_id"],
                company_name=company.get("company_name", ""),
                role=company.get("role", ""),
            )
        )
    for entry in doc.get("timeline", []):
        item = customer360_pb2.TimelineEntry(
            entry_id=entry["entry_id"],
            source=entry.get("source", ""),
            kind=entry.get("kind", ""),
            summary=entry.get("summary", ""),
            direction=_number(contacts_pb2.Direction, entry.get("direction")),
            channel=_number(contacts_pb2.Channel, entry.get("channel")),
            owner=entry.get("owner", ""),
        )
        _timestamp(item.occurred_at, entry.get("occurred_at"))
        message.timeline.append(item)
    message.deals.extend(_deal(d) for d in doc.get("deals", []))
    message.lifetime_won_revenue.extend(
        pipeline_pb2.Money(amount=m["amount"], currency=m["currency"])
        for m in doc.get("lifetime_won_revenue", [])
    )
    tickets = doc.get("tickets")
    if tickets is not None:
        message.tickets.CopyFrom(_tickets(tickets))
    loyalty = doc.get("loyalty")
    if loyalty is not None:
        message.loyalty.CopyFrom(_loyalty(loyalty))
    _timestamp(message.updated_at, doc.get("updated_at"))
    return message


def audit_entry_proto(entry: AuditEntry) -> customer360_pb2.AuditEntry:
    message = customer360_pb2.AuditEntry(
        customer_id=entry["customer_id"],
        source=entry["source"],
        event_type=entry["event_type"],
        event_id=entry["event_id"],
        actor=entry["actor"],
        client=entry["client"],
        command=entry["command"],
        request_id=entry["request_id"],
        position=int(entry["position"]),
    )
    _timestamp(message.occurred_at, entry["occurred_at"])
    return message


def _time(request: Any, field: str) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        when: datetime = datetime_of(getattr(request, field), field)
    except (ValueError, OverflowError, OSError):
        raise ValidationFailed.of(field, "is not a valid time") from None
    return when


class Customer360Servicer:
    """`crm.customer360.v1.Customer360Service`; registered by the generated
    `add_Customer360ServiceServicer_to_server`, which looks up one method per
    RPC (so a new RPC without a method here fails at start, not per call).

    Every call has passed the gate (`crm_common.server.AccessInterceptor`);
    the reply holds only what the caller may see (`visibility.py`). Errors
    are raised as CrmError; the shared server maps them to statuses.
    """

    def __init__(self, queries: Customer360Queries, gate: AccessGate, pseudonym_key: bytes) -> None:
        self.queries = queries
        self.gate = gate
        self.pseudonym_key = pseudonym_key

    async def GetCustomer360(
        self,
        request: customer360_pb2.GetCustomer360Request,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> customer360_pb2.GetCustomer360Response:
        timeout_ms: int | None = request.wait_timeout_ms or None
        remaining = context.time_remaining()
        valid = timeout_ms is None or 0 < timeout_ms <= MAX_WAIT_MS
        if request.wait_for and remaining is not None and valid:
            # Answer DEADLINE_EXCEEDED ourselves shortly before the caller gives up.
            budget = max(1, min(int(remaining * 1000) - 50, MAX_WAIT_MS))
            timeout_ms = min(timeout_ms or DEFAULT_WAIT_MS, budget)
        visible = await customer360_for(
            self.queries,
            self.gate,
            principal(),
            request.customer_id,
            dict(request.wait_for),
            timeout_ms,
        )
        customer = redact_message(to_proto(visible.doc), visible.hidden)
        pseudonymise_message(customer, visible.pseudonymised, self.pseudonym_key)
        return customer360_pb2.GetCustomer360Response(customer=customer)

    async def ListTimeline(
        self,
        request: customer360_pb2.ListTimelineRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> customer360_pb2.ListTimelineResponse:
        question = timeline_request(
            request.customer_id, request.page_size, request.page_token, list(request.sources)
        )
        visible = await timeline_for(self.queries, self.gate, principal(), question)
        # Shaped as the 360 view's timeline is, with its paths: the same entries
        # come out of both RPCs the same way.
        shaped = to_proto(
            {
                "_id": visible.customer_id,
                "customer_id": visible.customer_id,
                "timeline": visible.entries,
            }
        )
        redact_message(shaped, visible.hidden)
        pseudonymise_message(shaped, visible.pseudonymised, self.pseudonym_key)
        return customer360_pb2.ListTimelineResponse(
            entries=shaped.timeline,
            next_page_token=visible.next_page_token or "",
            total=visible.total,
        )

    async def GetAuditTrail(
        self,
        request: customer360_pb2.GetAuditTrailRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> customer360_pb2.GetAuditTrailResponse:
        page = await self.queries.get_audit_trail(
            customer_id=request.customer_id,
            actor=request.actor,
            since=_time(request, "since"),
            until=_time(request, "until"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return customer360_pb2.GetAuditTrailResponse(
            entries=[audit_entry_proto(e) for e in page.entries],
            next_page_token=page.next_page_token or "",
        )
