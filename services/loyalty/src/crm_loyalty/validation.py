"""Inputs into domain values: canonicalise, bound, then check.

Every refusal is a `ValidationFailed` naming the field paths the client sent
(`lines[1].amount`); money goes through `crm_common.money`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

from crm_common.errors import FieldErrors, ValidationFailed
from crm_common.money import canonical_currency, decimal_places, parse_amount, parse_decimal
from crm_loyalty.domain import CHANNELS, Campaign, Rules
from crm_loyalty.inputs import (
    MemberQuery,
    PlacedOrder,
    Purchase,
    ReturnedOrder,
    RewardInput,
    RulesInput,
)

MAX_ID = 100
MAX_TEXT = 500
MAX_LINES = 500
MAX_POINTS = 10**9
MAX_BONUS = 10**6

T = TypeVar("T")


@dataclass(frozen=True)
class Line:
    line_id: str
    amount: Decimal
    currency: str
    category: str


def identifier(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise ValidationFailed.of(field, "is required")
    if len(value) > MAX_ID:
        raise ValidationFailed.of(field, f"must be at most {MAX_ID} characters")
    return value


def channel(word: str | None) -> str:
    if word is None:
        raise ValidationFailed.of("channel", f"is required (one of {', '.join(CHANNELS)})")
    if word not in CHANNELS:
        raise ValidationFailed.of("channel", f"must be one of {', '.join(CHANNELS)}")
    return word


def points(value: int, field: str = "points", *, signed: bool = False) -> int:
    if value == 0 or (value < 0 and not signed):
        raise ValidationFailed.of(field, "must be positive" if not signed else "must not be 0")
    if abs(value) > MAX_POINTS:
        raise ValidationFailed.of(field, f"must be at most {MAX_POINTS} in size")
    return value


def text(value: str, field: str, *, required: bool = False) -> str:
    value = value.strip()
    if required and not value:
        raise ValidationFailed.of(field, "is required")
    if len(value) > MAX_TEXT:
        raise ValidationFailed.of(field, f"must be at most {MAX_TEXT} characters")
    return value


def _lines(
    raw: list[tuple[str, str, str, str]], errors: FieldErrors, prefix: str = "lines"
) -> list[Line]:
    if not raw:
        errors.add(prefix, "needs at least one line")
    if len(raw) > MAX_LINES:
        errors.add(prefix, f"must have at most {MAX_LINES} lines")
        return []
    lines: list[Line] = []
    seen: set[str] = set()
    for index, (line_id, amount, currency, category) in enumerate(raw):
        where = f"{prefix}[{index}]"
        line_id = line_id.strip() or str(index + 1)
        if line_id in seen:
            errors.add(f"{where}.line_id", f"{line_id!r} appears twice")
        seen.add(line_id)
        try:
            code = canonical_currency(currency, f"{where}.currency")
            number = parse_amount(
                amount, code, f"{where}.amount", currency_field=f"{where}.currency"
            )
        except ValidationFailed as error:
            for e in error.errors:
                errors.add(e.field, e.message)
            continue
        lines.append(Line(line_id, number, code, category.strip().lower()[:MAX_ID]))
    return lines


def purchase(value: Purchase) -> tuple[list[Line], str]:
    errors = FieldErrors()
    lines = _lines([(x.line_id, x.amount, x.currency, x.category) for x in value.lines], errors)
    errors.raise_if_any()
    return lines, text(value.reference, "reference")


def placed_order(value: PlacedOrder) -> list[Line]:
    identifier(value.order_id, "order_id")
    identifier(value.customer_ref, "customer_ref")
    errors = FieldErrors()
    lines = _lines([(x.line_id, x.amount, value.currency, x.category) for x in value.lines], errors)
    errors.raise_if_any()
    return lines


def returned_order(value: ReturnedOrder) -> list[str]:
    identifier(value.order_id, "order_id")
    identifier(value.customer_ref, "customer_ref")
    identifier(value.return_id, "return_id")
    return [identifier(line, f"line_ids[{i}]") for i, line in enumerate(value.line_ids)]


def _factor(value: str, field: str, errors: FieldErrors) -> Decimal | None:
    try:
        number = parse_decimal(value, field)
    except ValidationFailed as error:
        for e in error.errors:
            errors.add(e.field, e.message)
        return None
    if number < 0 or number > 1000:
        errors.add(field, "must be between 0 and 1000")
        return None
    # Bounded after parsing: `1e-999999` is in range but is no multiplier anyone means.
    if decimal_places(number) > 4:
        errors.add(field, "has at most 4 decimal places")
        return None
    # Canonical text: no exponent, no trailing zeros (`100`, `1.5`).
    exact = number.quantize(Decimal("0.0001")).normalize()
    return exact.quantize(Decimal(1)) if exact == exact.to_integral_value() else exact


def rules(value: RulesInput) -> Rules:
    """Checked rules (version 0: the store gives the version when they are published)."""
    errors = FieldErrors()
    rates: dict[str, Decimal] = {}
    if not value.rates:
        errors.add("rates", "needs a rate for at least one currency")
    for code, rate in value.rates.items():
        try:
            currency = canonical_currency(code, f"rates.{code}")
        except ValidationFailed as error:
            for e in error.errors:
                errors.add(e.field, e.message)
            continue
        checked = _factor(rate, f"rates.{code}", errors)
        if checked is not None:
            rates[currency] = checked
    tiers = {
        k.strip().lower(): f
        for k, v in value.tier_multipliers.items()
        if (f := _factor(v, f"tier_multipliers.{k}", errors)) is not None
    }
    categories = {
        k.strip().lower(): f
        for k, v in value.category_multipliers.items()
        if (f := _factor(v, f"category_multipliers.{k}", errors)) is not None
    }
    campaigns: list[Campaign] = []
    for index, c in enumerate(value.campaigns):
        where = f"campaigns[{index}]"
        factor = _factor(c.factor, f"{where}.factor", errors)
        if not c.name.strip():
            errors.add(f"{where}.name", "is required")
        if c.starts_at is None or c.ends_at is None:
            errors.add(where, "needs starts_at and ends_at")
            continue
        starts, ends = c.starts_at.astimezone(UTC), c.ends_at.astimezone(UTC)
        if ends <= starts:
            errors.add(f"{where}.ends_at", "must be after starts_at")
        if factor is not None:
            campaigns.append(
                Campaign(
                    c.name.strip(),
                    factor,
                    starts,
                    ends,
                    tuple(x.strip().lower() for x in c.categories),
                )
            )
    if not 1 <= value.lot_lifetime_days <= 3650:
        errors.add("lot_lifetime_days", "must be between 1 and 3650")
    if not 0 <= value.return_window_days <= 365:
        errors.add("return_window_days", "must be between 0 and 365")
    first = bonus(value.first_purchase_bonus, "first_purchase_bonus", errors)
    birthday_points = bonus(value.birthday_bonus, "birthday_bonus", errors)
    referrer = bonus(value.referrer_bonus, "referrer_bonus", errors)
    referee = bonus(value.referee_bonus, "referee_bonus", errors)
    errors.raise_if_any()
    return Rules(
        version=0,
        rates=rates,
        tier_multipliers=tiers,
        category_multipliers=categories,
        campaigns=tuple(campaigns),
        lot_lifetime_days=value.lot_lifetime_days,
        return_window_days=value.return_window_days,
        first_purchase_bonus=first,
        birthday_bonus=birthday_points,
        referrer_bonus=referrer,
        referee_bonus=referee,
    )


def moment(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    if value.tzinfo is None:
        raise ValidationFailed.of("occurred_at", "needs a time zone")
    return value.astimezone(UTC)


MAX_STOCK = 10**7
CODE_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def reward_code(value: str, field: str = "code") -> str:
    code = identifier(value, field).lower()
    if not set(code) <= CODE_CHARACTERS:
        raise ValidationFailed.of(field, "may hold only letters, digits, '-', '_' and '.'")
    return code


def quantity(value: int, field: str, *, zero: bool = False) -> int:
    if value < 0 or (value == 0 and not zero):
        raise ValidationFailed.of(field, "must be 0 or more" if zero else "must be positive")
    if value > MAX_STOCK:
        raise ValidationFailed.of(field, f"must be at most {MAX_STOCK}")
    return value


def _collect(errors: FieldErrors, check: Callable[[], T]) -> T | None:
    """The checked value, or None with the refusal added to `errors`."""
    try:
        return check()
    except ValidationFailed as error:
        for e in error.errors:
            errors.add(e.field, e.message)
        return None


def reward(value: RewardInput) -> RewardInput:
    errors = FieldErrors()
    code = _collect(errors, lambda: reward_code(value.code))
    name = _collect(errors, lambda: text(value.name, "name", required=True))
    price = _collect(errors, lambda: points(value.points))
    stock = _collect(errors, lambda: quantity(value.stock, "stock", zero=True))
    starts, ends = value.valid_from, value.valid_until
    for field, at in (("valid_from", starts), ("valid_until", ends)):
        if at is not None and at.tzinfo is None:
            errors.add(field, "needs a time zone")
    errors.raise_if_any()
    assert code is not None and name is not None and price is not None and stock is not None
    starts = starts.astimezone(UTC) if starts else None
    ends = ends.astimezone(UTC) if ends else None
    if starts and ends and ends <= starts:
        raise ValidationFailed.of("valid_until", "must be after valid_from")
    return RewardInput(code, name, price, stock, starts, ends)


def birthday(value: str | None) -> str:
    """ "MM-DD" (a month and day: the year is nobody's business here), or ""."""
    value = (value or "").strip()
    if not value:
        return ""
    try:
        month, day = (int(x) for x in value.split("-"))
        # 2000 is a leap year: 02-29 is a birthday.
        datetime(2000, month, day)
    except ValueError:
        raise ValidationFailed.of("birthday", "must be a month and day, MM-DD") from None
    return f"{month:02d}-{day:02d}"


def bonus(value: int, field: str, errors: FieldErrors) -> int:
    if not 0 <= value <= MAX_BONUS:
        errors.add(field, f"must be from 0 to {MAX_BONUS} points")
        return 0
    return value


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: How `ListMembers` sorts: by contact id, or by available balance, highest first.
BY_CONTACT = "contact_id"
BY_AVAILABLE = "available_desc"
MEMBER_ORDERS = (BY_CONTACT, BY_AVAILABLE)


@dataclass(frozen=True)
class MemberFilter:
    """A checked `MemberQuery` (the page token is read by the query tables,
    which know what a position in each order is)."""

    tier: str
    min_available: int
    expiring_before: datetime | None
    order_by: str
    page_size: int
    page_token: str


def member_query(value: MemberQuery, tiers: tuple[str, ...]) -> MemberFilter:
    """Every mistake of the listing at once, each naming its field."""
    errors = FieldErrors()
    tier = value.tier.strip()
    if tier and tier not in tiers:
        errors.add("tier", f"must be one of {', '.join(tiers)} (or empty)")
    if not 0 <= value.min_available <= MAX_POINTS:
        errors.add("min_available", f"must be from 0 to {MAX_POINTS}")
    before = value.expiring_before
    if before is not None and before.tzinfo is None:
        errors.add("expiring_before", "needs a time zone")
        before = None
    elif before is not None:
        try:
            before = before.astimezone(UTC)
        except OverflowError:
            errors.add("expiring_before", "is not a time any calendar holds")
            before = None
    order = value.order_by or BY_CONTACT
    if order not in MEMBER_ORDERS:
        errors.add("order_by", f"must be one of {', '.join(MEMBER_ORDERS)}")
    size = value.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    if len(value.page_token) > MAX_TEXT:
        errors.add("page_token", "is not a page token of this listing")
    errors.raise_if_any()
    return MemberFilter(
        tier,
        value.min_available,
        before,
        order,
        size,
        value.page_token.strip(),
    )
