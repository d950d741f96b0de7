"""What the loyalty commands and queries take: plain values as the adapters
read them (enums as lower-case words, None when unset), checked by
`crm_loyalty.validation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class PurchaseLineInput:
    line_id: str
    amount: str
    currency: str
    category: str = ""


@dataclass(frozen=True)
class Purchase:
    lines: list[PurchaseLineInput]
    reference: str = ""


@dataclass(frozen=True)
class CampaignInput:
    name: str
    factor: str
    starts_at: datetime | None
    ends_at: datetime | None
    categories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RulesInput:
    rates: dict[str, str]
    tier_multipliers: dict[str, str] = field(default_factory=dict)
    category_multipliers: dict[str, str] = field(default_factory=dict)
    campaigns: list[CampaignInput] = field(default_factory=list)
    lot_lifetime_days: int = 365
    return_window_days: int = 30
    first_purchase_bonus: int = 0
    birthday_bonus: int = 0
    referrer_bonus: int = 0
    referee_bonus: int = 0


@dataclass(frozen=True)
class OrderLineInput:
    line_id: str
    amount: str
    category: str = ""
    sku: str = ""
    quantity: int = 1


@dataclass(frozen=True)
class PlacedOrder:
    order_id: str
    customer_ref: str
    currency: str
    lines: list[OrderLineInput]
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class ReturnedOrder:
    order_id: str
    customer_ref: str
    #: Unique per return of the order; a cancellation is the return "cancelled".
    return_id: str
    #: Empty: the whole order.
    line_ids: list[str] = field(default_factory=list)
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class ErpSource:
    """The inbound record an ERP order event was read from: its partition and
    the consumer position after it (offset + 1). Not part of what the order asks
    for: a redelivery at another offset is the same request."""

    partition: int
    position: int


@dataclass(frozen=True)
class RewardInput:
    #: The reward's code in the catalogue (`coffee-mug`), chosen once.
    code: str
    name: str
    points: int
    stock: int
    valid_from: datetime | None = None
    valid_until: datetime | None = None


@dataclass(frozen=True)
class MemberQuery:
    """A listing of members (`ListMembers`): filters, order and page."""

    #: A tier name; "" for every tier.
    tier: str = ""
    #: Only members whose available balance is at least this; 0: any.
    min_available: int = 0
    #: Only members with points expiring before this time; None: any.
    expiring_before: datetime | None = None
    #: contact_id (None: the default) or available_desc.
    order_by: str | None = None
    #: 1..200; 0: the default (50).
    page_size: int = 0
    page_token: str = ""
