"""What callers ask the pipeline service for, before validation.

Plain values as both adapters (gRPC and REST) receive them: enums are
lower-case words ("best_case", "cross_sell") or None when not given; money
and dates are the text the client sent. Nothing here is trusted;
`crm_pipeline.validation` turns these into domain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

Number = str | Decimal | int


@dataclass(frozen=True)
class NewLead:
    family_name: str
    source: str | None
    owner: str
    given_name: str = ""
    company_name: str = ""
    email: str = ""
    phone: str = ""
    campaign: str = ""


@dataclass(frozen=True)
class LeadConversion:
    lead_id: str
    pipeline_id: str
    amount: Number
    currency: str
    expected_close_date: str | date
    opportunity_name: str = ""
    # Empty: register a new person from the lead.
    person_id: str = ""
    # Empty and create_company: register the lead's company and link the person.
    company_id: str = ""
    create_company: bool = False
    # Empty: the lead's owner.
    owner: str = ""


@dataclass(frozen=True)
class StageInput:
    """A stage as a command describes it."""

    stage_id: str
    name: str
    probability: Number
    category: str | None


@dataclass(frozen=True)
class NewOpportunity:
    pipeline_id: str
    name: str
    customer_id: str
    owner: str
    amount: Number
    currency: str
    expected_close_date: str | date
    # Empty: the pipeline's first open stage.
    stage_id: str = ""
    person_id: str = ""
    company_id: str = ""
    # None: new business.
    kind: str | None = None
    related_opportunity_ids: Sequence[str] = ()


@dataclass(frozen=True)
class LineItemInput:
    product_id: str
    product_name: str
    quantity: Number
    unit_price: Number
    discount_percent: Number = "0"


@dataclass(frozen=True)
class NewActivity:
    subject_kind: str | None
    subject_id: str
    kind: str | None
    title: str
    owner: str
    due_at: datetime | None


@dataclass(frozen=True)
class OpportunityQuery:
    pipeline_id: str = ""
    owner: str = ""
    customer_id: str = ""
    # None: deals of every status.
    status: str | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ForecastQuery:
    # None: by month.
    period: str | None = None
    start: str | date | None = None
    end: str | date | None = None
    owner: str = ""
    pipeline_id: str = ""


@dataclass(frozen=True)
class WinRateQuery:
    pipeline_id: str = ""
    owner: str = ""
    start: str | date | None = None
    end: str | date | None = None


@dataclass(frozen=True)
class LeadQuery:
    # None: leads of every status.
    status: str | None = None
    owner: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class ActivityQuery:
    # Due times from `due_from` (inclusive) to `due_before` (exclusive); None: unbounded.
    due_from: datetime | None = None
    due_before: datetime | None = None
    owner: str = ""
    # None: activities of every status.
    status: str | None = None
    page_size: int = 0
    page_token: str = ""
