"""The sales pipeline's write model: leads, pipelines, opportunities, activities.

Four aggregates, each event-sourced with the `eventsourcing` library:

- `Lead`: a prospect with source and campaign; qualified with a score,
  disqualified with a reason, or converted into an opportunity linked to a
  person and (optionally) a company of the contacts service.
- `Pipeline`: an ordered list of stages, each with a default probability and
  a forecast category. Stages are added, renamed, re-weighted, reordered and
  retired; a stage id is never reused, so old events keep their meaning.
- `Opportunity`: amount and currency, expected close date, owner, line
  items, stage history with time in stage, won/lost with reason, reopening.
  Winning or losing moves the deal into the pipeline's closed-won or
  closed-lost stage, so the stage history has no gaps.
- `Activity`: a call, mail, meeting or task with a due date on a lead or an
  opportunity. Activities are their own aggregate: they are many, they keep
  their own lifecycle (reschedule, complete, cancel), following up on a won
  or lost deal is normal business, and scheduling one must not contend for
  the deal's version with the salesperson editing the deal.

Every public method validates first and raises `ValidationFailed` (malformed
input, with field names) or `RuleViolated` (not allowed in the current
state) before any event is triggered, so a refused command changes nothing.
Every change carries `at`, the time it happened, given by the application's
clock: time in stage is computed from these, not from the wall clock.
Every event carries `customer_id` (the contact id of the customer, empty
when not known yet) because the published events are keyed by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Transcoding

from crm_common.errors import FieldErrors, RuleViolated, ValidationFailed
from crm_pipeline.money import (
    CURRENCIES,
    Money,
    check_currency,
    decimal_places,
    parse_amount,
    parse_decimal,
    round_money,
)

# -- vocabularies -------------------------------------------------------------

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

STAGE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
MAX_TEXT = 500
MAX_LINE_ITEMS = 200


def _text(errors: FieldErrors, field: str, value: str, *, required: bool = True) -> str:
    value = (value or "").strip()
    if required and not value:
        errors.add(field, "is required")
    elif len(value) > MAX_TEXT:
        errors.add(field, f"must be at most {MAX_TEXT} characters")
    return value


def _choice(errors: FieldErrors, field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        errors.add(field, f"must be one of {', '.join(allowed)}")
    return value


def _check_aware(field: str, at: datetime) -> None:
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise ValidationFailed.of(field, "must be a timezone-aware time")


def _plain(number: Decimal) -> Decimal:
    """`number` without trailing zeros and never in exponent notation (10, not 1E+1)."""
    return number.quantize(Decimal(1).scaleb(-decimal_places(number)))


# -- Lead -----------------------------------------------------------------------


class Lead(Aggregate):
    """A prospect not yet known to be a customer."""

    class Created(Aggregate.Created):
        customer_id: str
        given_name: str
        family_name: str
        company_name: str
        email: str
        phone: str
        source: str
        campaign: str
        owner: str
        at: datetime

    class Qualified(Aggregate.Event):
        customer_id: str
        score: int
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "qualified"
            aggregate.score = self.score

    class Disqualified(Aggregate.Event):
        customer_id: str
        reason: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "disqualified"
            aggregate.disqualify_reason = self.reason

    class Converted(Aggregate.Event):
        customer_id: str
        person_id: str
        company_id: str
        opportunity_id: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "converted"
            aggregate.customer_id = self.customer_id
            aggregate.person_id = self.person_id
            aggregate.company_id = self.company_id
            aggregate.opportunity_id = self.opportunity_id
            aggregate.converted_at = self.at

    def __init__(
        self,
        customer_id: str,
        given_name: str,
        family_name: str,
        company_name: str,
        email: str,
        phone: str,
        source: str,
        campaign: str,
        owner: str,
        at: datetime,
    ) -> None:
        self.customer_id = customer_id
        self.given_name = given_name
        self.family_name = family_name
        self.company_name = company_name
        self.email = email
        self.phone = phone
        self.source = source
        self.campaign = campaign
        self.owner = owner
        self.created_at = at
        self.status = "new"
        self.score: int | None = None
        self.disqualify_reason = ""
        self.person_id = ""
        self.company_id = ""
        self.opportunity_id = ""
        self.converted_at: datetime | None = None

    @classmethod
    def create(
        cls,
        *,
        given_name: str = "",
        family_name: str,
        company_name: str = "",
        email: str = "",
        phone: str = "",
        source: str,
        campaign: str = "",
        owner: str,
        at: datetime,
    ) -> Lead:
        errors = FieldErrors()
        given_name = _text(errors, "given_name", given_name, required=False)
        family_name = _text(errors, "family_name", family_name)
        company_name = _text(errors, "company_name", company_name, required=False)
        email = _text(errors, "email", email, required=False).lower()
        if email and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
            errors.add("email", "is not an email address")
        phone = _text(errors, "phone", phone, required=False)
        if not email and not phone:
            errors.add("email", "an email or a phone number is required")
        _choice(errors, "source", source, LEAD_SOURCES)
        campaign = _text(errors, "campaign", campaign, required=False)
        owner = _text(errors, "owner", owner)
        errors.raise_if_any()
        _check_aware("at", at)
        return cls._create(
            cls.Created,
            customer_id="",
            given_name=given_name,
            family_name=family_name,
            company_name=company_name,
            email=email,
            phone=phone,
            source=source,
            campaign=campaign,
            owner=owner,
            at=at,
        )

    def _ensure_open(self, action: str) -> None:
        if self.status == "converted":
            raise RuleViolated(f"lead {self.id} was converted; it cannot be {action}")
        if self.status == "disqualified":
            raise RuleViolated(f"lead {self.id} is disqualified; it cannot be {action}")

    def qualify(self, score: int, at: datetime) -> None:
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 100:
            raise ValidationFailed.of("score", "must be a whole number from 0 to 100")
        _check_aware("at", at)
        self._ensure_open("qualified")
        self.trigger_event(self.Qualified, customer_id=self.customer_id, score=score, at=at)

    def disqualify(self, reason: str, at: datetime) -> None:
        errors = FieldErrors()
        reason = _text(errors, "reason", reason)
        errors.raise_if_any()
        _check_aware("at", at)
        self._ensure_open("disqualified")
        self.trigger_event(self.Disqualified, customer_id=self.customer_id, reason=reason, at=at)

    def ensure_convertible(self) -> None:
        self._ensure_open("converted")
        if self.status != "qualified":
            raise RuleViolated(f"lead {self.id} must be qualified before it is converted")

    def convert(
        self, *, person_id: str, company_id: str, opportunity_id: str, at: datetime
    ) -> None:
        if not person_id:
            raise ValidationFailed.of("person_id", "is required")
        _check_aware("at", at)
        self.ensure_convertible()
        self.trigger_event(
            self.Converted,
            customer_id=company_id or person_id,
            person_id=person_id,
            company_id=company_id,
            opportunity_id=opportunity_id,
            at=at,
        )


# -- Pipeline -------------------------------------------------------------------


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
class StageSpec:
    """A stage as a command describes it."""

    stage_id: str
    name: str
    probability: str | Decimal | int
    category: str


def _probability(value: str | Decimal | int, field: str) -> Decimal:
    number = parse_decimal(value, field)
    if not 0 <= number <= 100:
        raise ValidationFailed.of(field, "must be a percentage from 0 to 100")
    if decimal_places(number) > 2:
        raise ValidationFailed.of(field, "has at most 2 decimal places")
    return number.quantize(Decimal("0.01"))


def _stage_spec(spec: StageSpec, prefix: str) -> dict[str, Any]:
    errors = FieldErrors()
    if not STAGE_ID.match(spec.stage_id or ""):
        errors.add(
            f"{prefix}.stage_id",
            "must be 1-40 characters of a-z, 0-9, '_' or '-', starting with a letter or digit",
        )
    name = _text(errors, f"{prefix}.name", spec.name)
    _choice(errors, f"{prefix}.category", spec.category, FORECAST_CATEGORIES)
    errors.raise_if_any()
    probability = _probability(spec.probability, f"{prefix}.probability")
    if spec.category == CLOSED_WON and probability != 100:
        raise ValidationFailed.of(f"{prefix}.probability", "a closed-won stage has 100")
    if spec.category == CLOSED_LOST and probability != 0:
        raise ValidationFailed.of(f"{prefix}.probability", "a closed-lost stage has 0")
    return {
        "stage_id": spec.stage_id,
        "name": name,
        "probability": probability,
        "category": spec.category,
    }


class Pipeline(Aggregate):
    """Ordered stages a deal moves through."""

    class Defined(Aggregate.Created):
        customer_id: str
        name: str
        stages: list[dict[str, Any]]

    class StageAdded(Aggregate.Event):
        customer_id: str
        stage_id: str
        name: str
        probability: Decimal
        category: str
        position: int

        def apply(self, aggregate: Any) -> None:
            aggregate.stages[self.stage_id] = Stage(
                self.stage_id, self.name, self.probability, self.category
            )
            aggregate.order.insert(self.position, self.stage_id)

    class StageRenamed(Aggregate.Event):
        customer_id: str
        stage_id: str
        name: str

        def apply(self, aggregate: Any) -> None:
            aggregate.stages[self.stage_id].name = self.name

    class StageSettingsChanged(Aggregate.Event):
        customer_id: str
        stage_id: str
        probability: Decimal
        category: str

        def apply(self, aggregate: Any) -> None:
            stage = aggregate.stages[self.stage_id]
            stage.probability = self.probability
            stage.category = self.category

    class StagesReordered(Aggregate.Event):
        customer_id: str
        stage_ids: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.order = list(self.stage_ids)

    class StageRetired(Aggregate.Event):
        customer_id: str
        stage_id: str

        def apply(self, aggregate: Any) -> None:
            aggregate.stages[self.stage_id].retired = True
            aggregate.order.remove(self.stage_id)

    def __init__(self, customer_id: str, name: str, stages: list[dict[str, Any]]) -> None:
        self.customer_id = customer_id
        self.name = name
        self.stages: dict[str, Stage] = {
            s["stage_id"]: Stage(s["stage_id"], s["name"], s["probability"], s["category"])
            for s in stages
        }
        # Active stages in order; retired stages keep their record but leave the order.
        self.order: list[str] = [s["stage_id"] for s in stages]

    @classmethod
    def define(cls, name: str, stages: list[StageSpec]) -> Pipeline:
        errors = FieldErrors()
        name = _text(errors, "name", name)
        errors.raise_if_any()
        specs = [_stage_spec(spec, f"stages[{i}]") for i, spec in enumerate(stages)]
        ids = [s["stage_id"] for s in specs]
        if len(set(ids)) != len(ids):
            raise ValidationFailed.of("stages", "stage ids must be unique")
        cls._check_shape([s["category"] for s in specs], "stages")
        return cls._create(cls.Defined, customer_id="", name=name, stages=specs)

    @staticmethod
    def _check_shape(categories: list[str], field: str) -> None:
        if not any(c in OPEN_CATEGORIES for c in categories):
            raise ValidationFailed.of(field, "a pipeline needs at least one open stage")
        if CLOSED_WON not in categories:
            raise ValidationFailed.of(field, "a pipeline needs a closed-won stage")
        if CLOSED_LOST not in categories:
            raise ValidationFailed.of(field, "a pipeline needs a closed-lost stage")

    # -- queries

    def stage(self, stage_id: str, field: str = "stage_id") -> Stage:
        try:
            return self.stages[stage_id]
        except KeyError:
            raise ValidationFailed.of(
                field, f"{stage_id!r} is not a stage of pipeline {self.name!r}"
            ) from None

    def active_stage(self, stage_id: str, field: str = "stage_id") -> Stage:
        stage = self.stage(stage_id, field)
        if stage.retired:
            raise ValidationFailed.of(field, f"stage {stage_id!r} is retired")
        return stage

    def position(self, stage_id: str) -> int | None:
        try:
            return self.order.index(stage_id)
        except ValueError:
            return None

    def first_open_stage(self) -> Stage:
        return next(self.stages[s] for s in self.order if self.stages[s].is_open)

    def closing_stage(self, category: str) -> Stage:
        return next(self.stages[s] for s in self.order if self.stages[s].category == category)

    # -- commands

    def add_stage(self, spec: StageSpec, position: int | None = None) -> None:
        fields = _stage_spec(spec, "stage")
        if spec.stage_id in self.stages:
            raise ValidationFailed.of(
                "stage.stage_id", f"{spec.stage_id!r} is or was already a stage of this pipeline"
            )
        if position is None:
            position = len(self.order)
        if not 0 <= position <= len(self.order):
            raise ValidationFailed.of("position", f"must be from 0 to {len(self.order)}")
        self.trigger_event(self.StageAdded, customer_id="", position=position, **fields)

    def rename_stage(self, stage_id: str, name: str) -> None:
        errors = FieldErrors()
        name = _text(errors, "name", name)
        errors.raise_if_any()
        stage = self.active_stage(stage_id)
        if stage.name != name:
            self.trigger_event(self.StageRenamed, customer_id="", stage_id=stage_id, name=name)

    def change_stage_settings(
        self, stage_id: str, probability: str | Decimal | int, category: str
    ) -> None:
        stage = self.active_stage(stage_id)
        fields = _stage_spec(StageSpec(stage_id, stage.name, probability, category), "stage")
        if stage.is_open != (category in OPEN_CATEGORIES) or (
            not stage.is_open and category != stage.category
        ):
            raise RuleViolated(
                "a stage's category may only change among the open categories "
                f"({', '.join(OPEN_CATEGORIES)}); closing stages keep theirs"
            )
        if (stage.probability, stage.category) != (fields["probability"], category):
            self.trigger_event(
                self.StageSettingsChanged,
                customer_id="",
                stage_id=stage_id,
                probability=fields["probability"],
                category=category,
            )

    def reorder_stages(self, stage_ids: list[str]) -> None:
        if sorted(stage_ids) != sorted(self.order) or len(set(stage_ids)) != len(stage_ids):
            raise ValidationFailed.of(
                "stage_ids", "must name every active stage of the pipeline exactly once"
            )
        if stage_ids != self.order:
            self.trigger_event(self.StagesReordered, customer_id="", stage_ids=list(stage_ids))

    def retire_stage(self, stage_id: str) -> None:
        stage = self.active_stage(stage_id)
        remaining = [self.stages[s].category for s in self.order if s != stage_id]
        try:
            self._check_shape(remaining, "stage_id")
        except ValidationFailed as refused:
            raise RuleViolated(
                f"stage {stage_id!r} cannot be retired: {refused.errors[0].message}"
            ) from None
        self.trigger_event(self.StageRetired, customer_id="", stage_id=stage.stage_id)


# -- Opportunity ------------------------------------------------------------------


@dataclass(frozen=True)
class LineItem:
    product_id: str
    product_name: str
    quantity: Decimal
    unit_price: Decimal
    discount_percent: Decimal
    total: Decimal


@dataclass(frozen=True)
class LineItemSpec:
    product_id: str
    product_name: str
    quantity: str | Decimal | int
    unit_price: str | Decimal | int
    discount_percent: str | Decimal | int = "0"


def line_item(spec: LineItemSpec, currency: str, prefix: str) -> LineItem:
    """Validates one line and computes its total, rounded half-even once."""
    errors = FieldErrors()
    product_id = _text(errors, f"{prefix}.product_id", spec.product_id)
    product_name = _text(errors, f"{prefix}.product_name", spec.product_name, required=False)
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
    with localcontext() as exact:
        # Enough digits for the largest allowed line: the only rounding is round_money's.
        exact.prec = 60
        total = round_money(quantity * unit_price * (100 - discount) / 100, currency)
    return LineItem(
        product_id,
        product_name,
        _plain(quantity),
        _plain(unit_price),
        discount.quantize(Decimal("0.01")),
        total,
    )


@dataclass(frozen=True)
class StageVisit:
    """One stay of a deal in one stage; `left_at` is None for the current one."""

    stage_id: str
    entered_at: datetime
    left_at: datetime | None
    regression: bool


class Opportunity(Aggregate):
    """A deal: what is sold, to whom, for how much, and where it stands."""

    class Opened(Aggregate.Created):
        customer_id: str
        pipeline_id: str
        stage_id: str
        name: str
        person_id: str
        company_id: str
        owner: str
        amount: Decimal
        currency: str
        expected_close_date: date
        kind: str
        related_deal_ids: list[str]
        lead_id: str
        at: datetime

    class AmountChanged(Aggregate.Event):
        customer_id: str
        amount: Decimal
        currency: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.amount = Money(self.amount, self.currency)

    class LineItemsChanged(Aggregate.Event):
        customer_id: str
        line_items: list[LineItem]
        amount: Decimal
        currency: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.line_items = list(self.line_items)
            aggregate.amount = Money(self.amount, self.currency)

    class ExpectedCloseDateChanged(Aggregate.Event):
        customer_id: str
        expected_close_date: date
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.expected_close_date = self.expected_close_date

    class OwnerChanged(Aggregate.Event):
        customer_id: str
        owner: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.owner = self.owner

    class StageChanged(Aggregate.Event):
        customer_id: str
        from_stage_id: str
        stage_id: str
        regression: bool
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate._enter(self.stage_id, self.at, self.regression)

    class Won(Aggregate.Event):
        # The person and company of the deal ride along: consumers (contacts'
        # lifecycle stage, loyalty) act on them without asking this service.
        customer_id: str
        person_id: str
        company_id: str
        stage_id: str
        amount: Decimal
        currency: str
        closed_on: date
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate._enter(self.stage_id, self.at, False)
            aggregate.status = "won"
            aggregate.closed_on = self.closed_on
            aggregate.closed_at = self.at

    class Lost(Aggregate.Event):
        customer_id: str
        stage_id: str
        reason: str
        closed_on: date
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate._enter(self.stage_id, self.at, False)
            aggregate.status = "lost"
            aggregate.lost_reason = self.reason
            aggregate.closed_on = self.closed_on
            aggregate.closed_at = self.at

    class Reopened(Aggregate.Event):
        customer_id: str
        stage_id: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate._enter(self.stage_id, self.at, True)
            aggregate.status = "open"
            aggregate.lost_reason = ""
            aggregate.closed_on = None
            aggregate.closed_at = None
            aggregate.reopen_count += 1

    def __init__(
        self,
        customer_id: str,
        pipeline_id: str,
        stage_id: str,
        name: str,
        person_id: str,
        company_id: str,
        owner: str,
        amount: Decimal,
        currency: str,
        expected_close_date: date,
        kind: str,
        related_deal_ids: list[str],
        lead_id: str,
        at: datetime,
    ) -> None:
        self.customer_id = customer_id
        self.pipeline_id = pipeline_id
        self.name = name
        self.person_id = person_id
        self.company_id = company_id
        self.owner = owner
        self.amount = Money(amount, currency)
        self.expected_close_date = expected_close_date
        self.kind = kind
        self.related_deal_ids = list(related_deal_ids)
        self.lead_id = lead_id
        self.opened_at = at
        self.line_items: list[LineItem] = []
        self.status = "open"
        self.lost_reason = ""
        self.closed_on: date | None = None
        self.closed_at: datetime | None = None
        self.reopen_count = 0
        self.stage_id = stage_id
        self.history: list[StageVisit] = [StageVisit(stage_id, at, None, False)]

    def _enter(self, stage_id: str, at: datetime, regression: bool) -> None:
        self.history[-1] = replace(self.history[-1], left_at=at)
        self.history.append(StageVisit(stage_id, at, None, regression))
        self.stage_id = stage_id

    # -- creation

    @classmethod
    def open(
        cls,
        *,
        pipeline: Pipeline,
        name: str,
        customer_id: str,
        owner: str,
        amount: str | Decimal | int,
        currency: str,
        expected_close_date: date,
        at: datetime,
        stage_id: str = "",
        person_id: str = "",
        company_id: str = "",
        kind: str = "new_business",
        related_deals: list[Opportunity] | None = None,
        lead_id: str = "",
    ) -> Opportunity:
        errors = FieldErrors()
        name = _text(errors, "name", name)
        customer_id = _text(errors, "customer_id", customer_id)
        owner = _text(errors, "owner", owner)
        _choice(errors, "kind", kind, OPPORTUNITY_KINDS)
        money: Money | None = None
        if currency not in CURRENCIES:
            errors.add("currency", f"{currency!r} is not an ISO 4217 currency code")
        else:
            try:
                money = Money.of(amount, currency)
            except ValidationFailed as refused:
                errors.errors.extend(refused.errors)
        errors.raise_if_any()
        assert money is not None
        _check_aware("at", at)
        if stage_id:
            stage = pipeline.active_stage(stage_id)
            if not stage.is_open:
                raise ValidationFailed.of(
                    "stage_id", "a deal opens in an open stage; win or lose it to close it"
                )
        else:
            stage = pipeline.first_open_stage()
        check_close_date(expected_close_date, at, "expected_close_date")
        related = related_deals or []
        if kind == "new_business" and related:
            raise ValidationFailed.of("related_deal_ids", "only cross-sell and up-sell link deals")
        if kind != "new_business" and not related:
            raise ValidationFailed.of(
                "related_deal_ids", f"a {kind.replace('_', '-')} deal names earlier won deals"
            )
        for deal in related:
            if deal.status != "won":
                raise RuleViolated(f"deal {deal.id} is not won; only won deals can be built on")
            if deal.customer_id != customer_id:
                raise RuleViolated(f"deal {deal.id} belongs to another customer")
        return cls._create(
            cls.Opened,
            customer_id=customer_id,
            pipeline_id=str(pipeline.id),
            stage_id=stage.stage_id,
            name=name,
            person_id=person_id,
            company_id=company_id,
            owner=owner,
            amount=money.amount,
            currency=money.currency,
            expected_close_date=expected_close_date,
            kind=kind,
            related_deal_ids=[str(d.id) for d in related],
            lead_id=lead_id,
            at=at,
        )

    # -- queries

    def time_in_stages(self, now: datetime) -> dict[str, timedelta]:
        """Total time spent in each stage over all stays; the current stay runs to `now`."""
        totals: dict[str, timedelta] = {}
        for visit in self.history:
            left = visit.left_at if visit.left_at is not None else max(now, visit.entered_at)
            totals[visit.stage_id] = totals.get(visit.stage_id, timedelta()) + (
                left - visit.entered_at
            )
        return totals

    # -- guards

    @property
    def is_closed(self) -> bool:
        return self.status != "open"

    def _ensure_open(self, what: str) -> None:
        if self.is_closed:
            raise RuleViolated(
                f"opportunity {self.id} is closed ({self.status}); reopen it before {what}"
            )

    def _ensure_time(self, at: datetime) -> None:
        _check_aware("at", at)
        if at < self.history[-1].entered_at:
            raise ValidationFailed.of("at", "is before the deal's last stage change")

    def _ensure_pipeline(self, pipeline: Pipeline) -> None:
        if str(pipeline.id) != self.pipeline_id:
            raise ValidationFailed.of("pipeline_id", "the deal belongs to another pipeline")

    # -- commands

    def change_amount(self, amount: str | Decimal | int, currency: str, at: datetime) -> None:
        check_currency(currency)
        value = parse_amount(amount, currency)
        self._ensure_open("changing its amount")
        self._ensure_time(at)
        if self.line_items:
            raise RuleViolated("the amount of a deal with line items is the sum of its lines")
        if Money(value, currency) != self.amount:
            self.trigger_event(
                self.AmountChanged,
                customer_id=self.customer_id,
                amount=value,
                currency=currency,
                at=at,
            )

    def set_line_items(self, items: list[LineItemSpec], at: datetime) -> None:
        if len(items) > MAX_LINE_ITEMS:
            raise ValidationFailed.of("line_items", f"at most {MAX_LINE_ITEMS} lines")
        currency = self.amount.currency
        lines = [line_item(spec, currency, f"line_items[{i}]") for i, spec in enumerate(items)]
        self._ensure_open("changing its line items")
        self._ensure_time(at)
        total = round_money(sum((line.total for line in lines), Decimal(0)), currency)
        # With no lines left the deal keeps its amount.
        amount = total if lines else self.amount.amount
        parse_amount(amount, currency, "line_items")
        if lines != self.line_items:
            self.trigger_event(
                self.LineItemsChanged,
                customer_id=self.customer_id,
                line_items=lines,
                amount=amount,
                currency=currency,
                at=at,
            )

    def change_expected_close_date(self, expected: date, at: datetime) -> None:
        check_close_date(expected, self.opened_at, "expected_close_date")
        self._ensure_open("changing its expected close date")
        self._ensure_time(at)
        if expected != self.expected_close_date:
            self.trigger_event(
                self.ExpectedCloseDateChanged,
                customer_id=self.customer_id,
                expected_close_date=expected,
                at=at,
            )

    def reassign(self, owner: str, at: datetime) -> None:
        errors = FieldErrors()
        owner = _text(errors, "owner", owner)
        errors.raise_if_any()
        self._ensure_open("reassigning it")
        self._ensure_time(at)
        if owner != self.owner:
            self.trigger_event(self.OwnerChanged, customer_id=self.customer_id, owner=owner, at=at)

    def change_stage(self, pipeline: Pipeline, stage_id: str, at: datetime) -> None:
        self._ensure_pipeline(pipeline)
        target = pipeline.active_stage(stage_id)
        if not target.is_open:
            raise ValidationFailed.of(
                "stage_id", "closing stages are entered by winning or losing the deal"
            )
        self._ensure_open("moving it")
        self._ensure_time(at)
        if stage_id == self.stage_id:
            return
        now, then = pipeline.position(stage_id), pipeline.position(self.stage_id)
        regression = now is not None and then is not None and now < then
        self.trigger_event(
            self.StageChanged,
            customer_id=self.customer_id,
            from_stage_id=self.stage_id,
            stage_id=stage_id,
            regression=regression,
            at=at,
        )

    def _close_date(self, closed_on: date | None, at: datetime) -> date:
        closed = closed_on or at.date()
        check_close_date(closed, self.opened_at, "closed_on")
        if closed > at.date():
            raise ValidationFailed.of("closed_on", "cannot be in the future")
        return closed

    def win(self, pipeline: Pipeline, at: datetime, closed_on: date | None = None) -> None:
        self._ensure_pipeline(pipeline)
        if self.is_closed:
            raise RuleViolated(f"opportunity {self.id} is already closed ({self.status})")
        self._ensure_time(at)
        closed = self._close_date(closed_on, at)
        stage = pipeline.closing_stage(CLOSED_WON)
        self.trigger_event(
            self.Won,
            customer_id=self.customer_id,
            person_id=self.person_id,
            company_id=self.company_id,
            stage_id=stage.stage_id,
            amount=self.amount.amount,
            currency=self.amount.currency,
            closed_on=closed,
            at=at,
        )

    def lose(
        self, pipeline: Pipeline, reason: str, at: datetime, closed_on: date | None = None
    ) -> None:
        errors = FieldErrors()
        reason = _text(errors, "reason", reason)
        errors.raise_if_any()
        self._ensure_pipeline(pipeline)
        if self.is_closed:
            raise RuleViolated(f"opportunity {self.id} is already closed ({self.status})")
        self._ensure_time(at)
        closed = self._close_date(closed_on, at)
        stage = pipeline.closing_stage(CLOSED_LOST)
        self.trigger_event(
            self.Lost,
            customer_id=self.customer_id,
            stage_id=stage.stage_id,
            reason=reason,
            closed_on=closed,
            at=at,
        )

    def reopen(self, pipeline: Pipeline, at: datetime, stage_id: str = "") -> None:
        """Back to `stage_id`, or to the open stage the deal was closed from."""
        self._ensure_pipeline(pipeline)
        if not self.is_closed:
            raise RuleViolated(f"opportunity {self.id} is open; only closed deals reopen")
        self._ensure_time(at)
        if not stage_id:
            stage_id = next(
                v.stage_id for v in reversed(self.history) if pipeline.stage(v.stage_id).is_open
            )
            if pipeline.stage(stage_id).retired:
                raise ValidationFailed.of(
                    "stage_id", f"the deal was closed from {stage_id!r}, now retired: name a stage"
                )
        target = pipeline.active_stage(stage_id)
        if not target.is_open:
            raise ValidationFailed.of("stage_id", "a deal reopens in an open stage")
        self.trigger_event(self.Reopened, customer_id=self.customer_id, stage_id=stage_id, at=at)


def check_close_date(value: date, opened_at: datetime, field: str) -> None:
    if not isinstance(value, date) or isinstance(value, datetime):
        raise ValidationFailed.of(field, "must be a date")
    if value < opened_at.date():
        raise ValidationFailed.of(
            field, f"{value.isoformat()} is before the deal was opened ({opened_at.date()})"
        )


# -- Activity -------------------------------------------------------------------------


class Activity(Aggregate):
    """A call, mail, meeting or task due on a lead or an opportunity."""

    class Scheduled(Aggregate.Created):
        customer_id: str
        subject_kind: str
        subject_id: str
        kind: str
        title: str
        owner: str
        due_at: datetime
        at: datetime

    class Rescheduled(Aggregate.Event):
        customer_id: str
        due_at: datetime
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.due_at = self.due_at

    class Completed(Aggregate.Event):
        customer_id: str
        outcome: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "completed"
            aggregate.outcome = self.outcome
            aggregate.finished_at = self.at

    class Cancelled(Aggregate.Event):
        customer_id: str
        reason: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.status = "cancelled"
            aggregate.outcome = self.reason
            aggregate.finished_at = self.at

    def __init__(
        self,
        customer_id: str,
        subject_kind: str,
        subject_id: str,
        kind: str,
        title: str,
        owner: str,
        due_at: datetime,
        at: datetime,
    ) -> None:
        self.customer_id = customer_id
        self.subject_kind = subject_kind
        self.subject_id = subject_id
        self.kind = kind
        self.title = title
        self.owner = owner
        self.due_at = due_at
        self.scheduled_at = at
        self.status = "open"
        self.outcome = ""
        self.finished_at: datetime | None = None

    @classmethod
    def schedule(
        cls,
        *,
        subject: Lead | Opportunity,
        kind: str,
        title: str,
        owner: str,
        due_at: datetime,
        at: datetime,
    ) -> Activity:
        errors = FieldErrors()
        _choice(errors, "kind", kind, ACTIVITY_KINDS)
        title = _text(errors, "title", title)
        owner = _text(errors, "owner", owner)
        errors.raise_if_any()
        _check_aware("due_at", due_at)
        _check_aware("at", at)
        return cls._create(
            cls.Scheduled,
            customer_id=subject.customer_id,
            subject_kind="lead" if isinstance(subject, Lead) else "opportunity",
            subject_id=str(subject.id),
            kind=kind,
            title=title,
            owner=owner,
            due_at=due_at,
            at=at,
        )

    def _ensure_open(self) -> None:
        if self.status != "open":
            raise RuleViolated(f"activity {self.id} is already {self.status}")

    def reschedule(self, due_at: datetime, at: datetime) -> None:
        _check_aware("due_at", due_at)
        _check_aware("at", at)
        self._ensure_open()
        if due_at != self.due_at:
            self.trigger_event(self.Rescheduled, customer_id=self.customer_id, due_at=due_at, at=at)

    def complete(self, outcome: str, at: datetime) -> None:
        errors = FieldErrors()
        outcome = _text(errors, "outcome", outcome, required=False)
        errors.raise_if_any()
        _check_aware("at", at)
        self._ensure_open()
        self.trigger_event(self.Completed, customer_id=self.customer_id, outcome=outcome, at=at)

    def cancel(self, reason: str, at: datetime) -> None:
        errors = FieldErrors()
        reason = _text(errors, "reason", reason, required=False)
        errors.raise_if_any()
        _check_aware("at", at)
        self._ensure_open()
        self.trigger_event(self.Cancelled, customer_id=self.customer_id, reason=reason, at=at)


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
