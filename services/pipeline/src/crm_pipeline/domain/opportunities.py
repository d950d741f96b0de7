"""`Opportunity`: a deal with amount and currency, expected close date, owner,
line items, stage history with time in stage, won/lost with reason, reopening.
Winning or losing moves the deal into the pipeline's closed-won or
closed-lost stage, so the stage history has no gaps.

Methods take values `crm_pipeline.validation` has already checked and keep
the deal's invariants: stages of its own pipeline, open deals only change,
times never go back, close dates not before opening nor in the future.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated, ValidationFailed
from crm_common.money import Money, parse_amount, round_money
from crm_common.privacy.declaration import PersonalData
from crm_pipeline.domain.customers import (
    CUSTOMER_FIELDS,
    apply_move,
    move_customers,
    undo_customer_moves,
)
from crm_pipeline.domain.pipelines import Pipeline
from crm_pipeline.domain.values import (
    CLOSED_LOST,
    CLOSED_WON,
    LineItem,
    StageVisit,
    check_aware,
)


def check_close_date(value: date, opened_at: datetime, field: str) -> None:
    if not isinstance(value, date) or isinstance(value, datetime):
        raise ValidationFailed.of(field, "must be a date")
    if value < opened_at.date():
        raise ValidationFailed.of(
            field, f"{value.isoformat()} is before the deal was opened ({opened_at.date()})"
        )


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
        # A deal of a person is named after them (a converted lead's name): the customer's.
        personal_data = PersonalData("name", subject="customer_id")

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

    class CustomerMoved(Aggregate.Event):
        # A contacts merge (or its undo) moved the deal's customer, person or company
        # (`fields`, those that held `from_customer_id`); `customer_id` is the deal's
        # customer after the move.
        customer_id: str
        from_customer_id: str
        to_customer_id: str
        merge_id: str
        undone: bool
        fields: list[str]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            apply_move(aggregate, self)

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
        self.customer_moves: list[dict[str, Any]] = []

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
        amount: Money,
        expected_close_date: date,
        at: datetime,
        stage_id: str = "",
        person_id: str = "",
        company_id: str = "",
        kind: str = "new_business",
        related_deals: list[Opportunity] | None = None,
        lead_id: str = "",
    ) -> Opportunity:
        check_aware("at", at)
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
            amount=amount.amount,
            currency=amount.currency,
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
        check_aware("at", at)
        if at < self.history[-1].entered_at:
            raise ValidationFailed.of("at", "is before the deal's last stage change")

    def _ensure_pipeline(self, pipeline: Pipeline) -> None:
        if str(pipeline.id) != self.pipeline_id:
            raise ValidationFailed.of("pipeline_id", "the deal belongs to another pipeline")

    # -- commands

    def change_amount(self, amount: Money, at: datetime) -> None:
        self._ensure_open("changing its amount")
        self._ensure_time(at)
        if self.line_items:
            raise RuleViolated("the amount of a deal with line items is the sum of its lines")
        if amount != self.amount:
            self.trigger_event(
                self.AmountChanged,
                customer_id=self.customer_id,
                amount=amount.amount,
                currency=amount.currency,
                at=at,
            )

    def set_line_items(self, lines: list[LineItem], at: datetime) -> None:
        """Lines priced in the deal's currency (see `LineItem.priced`)."""
        currency = self.amount.currency
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
                line_items=list(lines),
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

    # -- contacts merged and unmerged: closed deals move too (they stay as they are)

    def move_customer(self, merged: list[str], to_id: str, merge_id: str, at: datetime) -> int:
        """The deal's customer, person or company that is one of `merged` becomes
        `to_id`; returns how many moves were recorded (none when already moved)."""
        return move_customers(self, CUSTOMER_FIELDS, merged, to_id, merge_id, at)

    def undo_customer_move(
        self, merge_id: str, at: datetime, restored: list[str] | None = None
    ) -> int:
        """Gives back what merge `merge_id` moved; returns how many moves were recorded."""
        return undo_customer_moves(self, merge_id, at, restored)
