"""gRPC adapter: crm.customer360.v1.Customer360Service over the queries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2
from crm.customer360.v1 import customer360_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.audit import AuditEntry
from crm_analytics.document import Consent, Customer360, Deal, aware, stored_word
from crm_analytics.query import DEFAULT_WAIT_MS, MAX_WAIT_MS, Customer360Queries
from crm_analytics.visibility import customer360_for, principal
from crm_common.auth.gate import AccessGate
from crm_common.auth.redaction import redact_message
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

    def __init__(self, queries: Customer360Queries, gate: AccessGate) -> None:
        self.queries = queries
        self.gate = gate

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
        doc, hidden = await customer360_for(
            self.queries,
            self.gate,
            principal(),
            request.customer_id,
            dict(request.wait_for),
            timeout_ms,
        )
        customer = redact_message(to_proto(doc), hidden)
        return customer360_pb2.GetCustomer360Response(customer=customer)

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
