"""Vocabulary and values shared by the pipeline's aggregates.

The words are the lower-case forms of the `crm.pipeline.v1` enums; stages,
line items and stage visits are the value objects the aggregates keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, localcontext

from eventsourcing.persistence import Transcoding

from crm_common.errors import ValidationFailed
from crm_common.money import decimal_places, round_money

LEAD_SOURCES = (
    "web",
    "email",
    "phone",
    "referral",
    "event",
    "partner",
    "advertising",
    "social",
    "other",
)
OPEN_CATEGORIES = ("pipeline", "best_case", "commit", "omitted")
CLOSED_WON = "closed_won"
CLOSED_LOST = "closed_lost"
FORECAST_CATEGORIES = (*OPEN_CATEGORIES, CLOSED_WON, CLOSED_LOST)
OPPORTUNITY_KINDS = ("new_business", "cross_sell", "up_sell")
ACTIVITY_KINDS = ("call", "email", "meeting", "task", "follow_up")
SUBJECT_KINDS = ("lead", "opportunity")
OPPORTUNITY_STATUSES = ("open", "won", "lost")


def check_aware(field: str, at: datetime) -> None:
    """Every recorded time is timezone-aware: time in stage is computed from them."""
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise ValidationFailed.of(field, "must be a timezone-aware time")


def plain(number: Decimal) -> Decimal:
    """`number` without trailing zeros and never in exponent notation (10, not 1E+1)."""
    return number.quantize(Decimal(1).scaleb(-decimal_places(number)))


@dataclass
class Stage:
    stage_id: str
    name: str
    probability: Decimal
    category: str
    retired: bool = False

    @property
    def is_open(self) -> bool:
        return self.category in OPEN_CATEGORIES


@dataclass(frozen=True)
class LineItem:
    product_id: str
    product_name: str
    quantity: Decimal
    unit_price: Decimal
    discount_percent: Decimal
    total: Decimal

    @classmethod
    def priced(
        cls,
        product_id: str,
        product_name: str,
        quantity: Decimal,
        unit_price: Decimal,
        discount_percent: Decimal,
        currency: str,
    ) -> LineItem:
        """A line with its total, rounded half-even once to the currency's minor unit."""
        with localcontext() as exact:
            # Enough digits for the largest allowed line: the only rounding is round_money's.
            exact.prec = 60
            total = round_money(quantity * unit_price * (100 - discount_percent) / 100, currency)
        return cls(
            product_id,
            product_name,
            plain(quantity),
            plain(unit_price),
            discount_percent.quantize(Decimal("0.01")),
            total,
        )


@dataclass(frozen=True)
class StageVisit:
    """One stay of a deal in one stage; `left_at` is None for the current one."""

    stage_id: str
    entered_at: datetime
    left_at: datetime | None
    regression: bool


# -- storage of value types ---------------------------------------------------------


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


class LineItemAsDict(Transcoding):
    type = LineItem
    name = "crm_line_item"

    def encode(self, obj: LineItem) -> dict[str, str]:
        return {
            "product_id": obj.product_id,
            "product_name": obj.product_name,
            "quantity": str(obj.quantity),
            "unit_price": str(obj.unit_price),
            "discount_percent": str(obj.discount_percent),
            "total": str(obj.total),
        }

    def decode(self, data: dict[str, str]) -> LineItem:
        return LineItem(
            data["product_id"],
            data["product_name"],
            Decimal(data["quantity"]),
            Decimal(data["unit_price"]),
            Decimal(data["discount_percent"]),
            Decimal(data["total"]),
        )


TRANSCODINGS: tuple[Transcoding, ...] = (DateAsISO(), LineItemAsDict())
