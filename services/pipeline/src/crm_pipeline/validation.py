"""Input checks and normalisation: pure functions from inputs to domain values.

Each function canonicalises (trims, lower-cases an email, upper-cases a
currency), then bounds (lengths, ranges, digits), then checks, collecting
every problem of a request in a `FieldErrors` where they are independent,
and raises one `ValidationFailed` naming the offending field paths
(`stages[0].probability`, `line_items[2].quantity`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from crm_common.errors import FieldErrors, ValidationFailed
from crm_common.money import Money, decimal_places, parse_decimal
from crm_pipeline.domain import (
    ACTIVITY_KINDS,
    CLOSED_LOST,
    CLOSED_WON,
    FORECAST_CATEGORIES,
    LEAD_SOURCES,
    OPPORTUNITY_KINDS,
    OPPORTUNITY_STATUSES,
    SUBJECT_KINDS,
    LineItem,
    Stage,
    check_aware,
)
from crm_pipeline.inputs import (
    ActivityQuery,
    LeadConversion,
    LeadQuery,
    LineItemInput,
    NewActivity,
    NewLead,
    NewOpportunity,
    Number,
    OpportunityQuery,
    StageInput,
)

MAX_TEXT = 500
MAX_LINE_ITEMS = 200
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

STAGE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


# -- small pieces -------------------------------------------------------------------------


def text(errors: FieldErrors, field: str, value: str, *, required: bool = True) -> str:
    value = (value or "").strip()
    if required and not value:
        errors.add(field, "is required")
    elif len(value) > MAX_TEXT:
        errors.add(field, f"must be at most {MAX_TEXT} characters")
    return value


def one_text(field: str, value: str, *, required: bool = True) -> str:
    """One text field on its own: a reason, a name, an owner."""
    errors = FieldErrors()
    cleaned = text(errors, field, value, required=required)
    errors.raise_if_any()
    return cleaned


def choice(errors: FieldErrors, field: str, value: str | None, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        errors.add(field, f"must be one of {', '.join(allowed)}")
        return ""
    return value


def optional_date(value: str | date | None, field: str) -> date | None:
    """An ISO-8601 calendar date given as text or as a date; None when not given."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ValidationFailed.of(field, f"{value!r} is not an ISO-8601 date") from None


def required_date(value: str | date | None, field: str) -> date:
    """A required ISO-8601 calendar date."""
    day = optional_date(value, field)
    if day is None:
        raise ValidationFailed.of(field, "is required")
    return day


def due_at(value: datetime | None) -> datetime:
    if value is None:
        raise ValidationFailed.of("due_at", "is required")
    check_aware("due_at", value)
    return value


def money(errors: FieldErrors, amount: Number, currency: str) -> Money | None:
    """The amount in its canonical currency, or None with the problems in `errors`."""
    try:
        return Money.of(amount, currency)
    except ValidationFailed as refused:
        errors.errors.extend(refused.errors)
        return None


def one_money(amount: Number, currency: str) -> Money:
    return Money.of(amount, currency)


# -- leads -------------------------------------------------------------------------------------


def new_lead(new: NewLead) -> NewLead:
    """The lead's fields trimmed, its email in lower case; refused naming every bad field."""
    errors = FieldErrors()
    given_name = text(errors, "given_name", new.given_name, required=False)
    family_name = text(errors, "family_name", new.family_name)
    company_name = text(errors, "company_name", new.company_name, required=False)
    email = text(errors, "email", new.email, required=False).lower()
    if email and not _EMAIL.fullmatch(email):
        errors.add("email", "is not an email address")
    phone = text(errors, "phone", new.phone, required=False)
    if not email and not phone:
        errors.add("email", "an email or a phone number is required")
    source = choice(errors, "source", new.source, LEAD_SOURCES)
    campaign = text(errors, "campaign", new.campaign, required=False)
    owner = text(errors, "owner", new.owner)
    errors.raise_if_any()
    return NewLead(
        family_name=family_name,
        source=source,
        owner=owner,
        given_name=given_name,
        company_name=company_name,
        email=email,
        phone=phone,
        campaign=campaign,
    )


def score(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValidationFailed.of("score", "must be a whole number from 0 to 100")
    return value


@dataclass(frozen=True)
class ConversionTerms:
    """The deal a conversion opens: its amount and expected close date."""

    amount: Money
    expected_close_date: date


def conversion_terms(conversion: LeadConversion) -> ConversionTerms:
    expected = required_date(conversion.expected_close_date, "expected_close_date")
    return ConversionTerms(one_money(conversion.amount, conversion.currency), expected)


# -- pipelines ---------------------------------------------------------------------------------


def probability(value: Number, field: str) -> Decimal:
    number = parse_decimal(value, field)
    if not 0 <= number <= 100:
        raise ValidationFailed.of(field, "must be a percentage from 0 to 100")
    if decimal_places(number) > 2:
        raise ValidationFailed.of(field, "has at most 2 decimal places")
    return number.quantize(Decimal("0.01"))


def stage(spec: StageInput, prefix: str) -> Stage:
    errors = FieldErrors()
    if not STAGE_ID.match(spec.stage_id or ""):
        errors.add(
            f"{prefix}.stage_id",
            "must be 1-40 characters of a-z, 0-9, '_' or '-', starting with a letter or digit",
        )
    name = text(errors, f"{prefix}.name", spec.name)
    category = choice(errors, f"{prefix}.category", spec.category, FORECAST_CATEGORIES)
    errors.raise_if_any()
    return Stage(
        spec.stage_id, name, stage_probability(spec.probability, category, prefix), category
    )


def stage_probability(value: Number, category: str, prefix: str) -> Decimal:
    """A stage's probability, which a closing stage's category fixes."""
    number = probability(value, f"{prefix}.probability")
    if category == CLOSED_WON and number != 100:
        raise ValidationFailed.of(f"{prefix}.probability", "a closed-won stage has 100")
    if category == CLOSED_LOST and number != 0:
        raise ValidationFailed.of(f"{prefix}.probability", "a closed-lost stage has 0")
    return number


def new_pipeline(name: str, stages: Sequence[StageInput]) -> tuple[str, list[Stage]]:
    cleaned = one_text("name", name)
    return cleaned, [stage(spec, f"stages[{i}]") for i, spec in enumerate(stages)]


def stage_settings(value: Number, category: str | None) -> tuple[Decimal, str]:
    errors = FieldErrors()
    word = choice(errors, "stage.category", category, FORECAST_CATEGORIES)
    errors.raise_if_any()
    return stage_probability(value, word, "stage"), word


# -- opportunities -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpportunityTerms:
    """A new deal's own fields, checked; the pipeline and related deals are the domain's."""

    name: str
    customer_id: str
    owner: str
    kind: str
    amount: Money
    expected_close_date: date


def new_opportunity(new: NewOpportunity) -> OpportunityTerms:
    expected = required_date(new.expected_close_date, "expected_close_date")
    errors = FieldErrors()
    name = text(errors, "name", new.name)
    customer_id = text(errors, "customer_id", new.customer_id)
    owner = text(errors, "owner", new.owner)
    kind = choice(errors, "kind", new.kind or "new_business", OPPORTUNITY_KINDS)
    amount = money(errors, new.amount, new.currency)
    errors.raise_if_any()
    assert amount is not None
    return OpportunityTerms(name, customer_id, owner, kind, amount, expected)


def line_item(spec: LineItemInput, currency: str, prefix: str) -> LineItem:
    """One line in the deal's currency, priced."""
    errors = FieldErrors()
    product_id = text(errors, f"{prefix}.product_id", spec.product_id)
    product_name = text(errors, f"{prefix}.product_name", spec.product_name, required=False)
    errors.raise_if_any()
    quantity = parse_decimal(spec.quantity, f"{prefix}.quantity")
    if quantity <= 0 or quantity >= Decimal(10) ** 9 or decimal_places(quantity) > 6:
        raise ValidationFailed.of(
            f"{prefix}.quantity", "must be more than 0, below 10^9, at most 6 decimal places"
        )
    unit_price = parse_decimal(spec.unit_price, f"{prefix}.unit_price")
    if unit_price < 0 or unit_price >= Decimal(10) ** 12 or decimal_places(unit_price) > 6:
        raise ValidationFailed.of(
            f"{prefix}.unit_price", "must be 0 or more, below 10^12, at most 6 decimal places"
        )
    discount = parse_decimal(spec.discount_percent, f"{prefix}.discount_percent")
    if not 0 <= discount <= 100 or decimal_places(discount) > 2:
        raise ValidationFailed.of(
            f"{prefix}.discount_percent", "must be a percentage from 0 to 100"
        )
    return LineItem.priced(product_id, product_name, quantity, unit_price, discount, currency)


def line_items(specs: Sequence[LineItemInput], currency: str) -> list[LineItem]:
    if len(specs) > MAX_LINE_ITEMS:
        raise ValidationFailed.of("line_items", f"at most {MAX_LINE_ITEMS} lines")
    return [line_item(spec, currency, f"line_items[{i}]") for i, spec in enumerate(specs)]


@dataclass(frozen=True)
class Page:
    """Which records of a listing a query asks for."""

    offset: int
    size: int
    status: str | None
    #: The sort key of the last record of the previous page: the page starts
    #: after it (keyset paging; a token without one pages by offset).
    after: tuple[int, str] | None = None


def page_token(offset: int, after: tuple[int, str] | None = None) -> str:
    """An opaque token of the next page: its offset and the last record's sort key."""
    content: dict[str, object] = {"offset": offset}
    if after is not None:
        content["after"] = [after[0], after[1]]
    return base64.urlsafe_b64encode(json.dumps(content).encode()).decode().rstrip("=")


def _bounded(number: object) -> bool:
    """An integer the stores keep (a sort key or an offset of 64 bits)."""
    return isinstance(number, int) and not isinstance(number, bool) and abs(number) < 2**62


def _position_of(token: str) -> tuple[int, tuple[int, str] | None]:
    try:
        padded = token + "=" * (-len(token) % 4)
        content = json.loads(base64.urlsafe_b64decode(padded.encode()))
        offset = content["offset"]
        if not _bounded(offset) or offset < 0:
            raise ValueError(token)
        after = content.get("after")
        if after is None:
            return offset, None
        key, ident = after
        if not _bounded(key) or not isinstance(ident, str) or "\x00" in ident:
            raise ValueError(token)
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        raise ValidationFailed.of("page_token", "is not a page token of this listing") from None
    return offset, (key, ident)


def opportunity_page(query: OpportunityQuery) -> Page:
    return _page(query.page_size, query.page_token, query.status, OPPORTUNITY_STATUSES)


LEAD_STATUSES = ("new", "qualified", "disqualified", "converted")
ACTIVITY_STATUSES = ("open", "completed", "cancelled")


def lead_page(query: LeadQuery) -> Page:
    return _page(query.page_size, query.page_token, query.status, LEAD_STATUSES)


def activity_page(query: ActivityQuery) -> Page:
    """The page asked for; the due range must be aware times, in order."""
    errors = FieldErrors()
    for field in ("due_from", "due_before"):
        value = getattr(query, field)
        if value is not None and (value.tzinfo is None or value.utcoffset() is None):
            errors.add(field, "must carry a time zone")
    if (
        not errors.errors
        and query.due_from is not None
        and query.due_before is not None
        and query.due_before <= query.due_from
    ):
        errors.add("due_before", "must be after due_from")
    errors.raise_if_any()
    return _page(query.page_size, query.page_token, query.status, ACTIVITY_STATUSES)


def _page(size: int, token: str, status: str | None, statuses: Sequence[str]) -> Page:
    errors = FieldErrors()
    size = size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    status = status or None
    if status is not None and status not in statuses:
        errors.add("status", f"must be one of {', '.join(statuses)}")
    errors.raise_if_any()
    offset, after = _position_of(token) if token else (0, None)
    return Page(offset, size, status, after)


# -- activities --------------------------------------------------------------------------------


def new_activity(new: NewActivity) -> NewActivity:
    if new.subject_kind not in SUBJECT_KINDS:
        raise ValidationFailed.of("subject_kind", f"must be one of {', '.join(SUBJECT_KINDS)}")
    errors = FieldErrors()
    kind = choice(errors, "kind", new.kind, ACTIVITY_KINDS)
    title = text(errors, "title", new.title)
    owner = text(errors, "owner", new.owner)
    errors.raise_if_any()
    return NewActivity(new.subject_kind, new.subject_id, kind, title, owner, due_at(new.due_at))
