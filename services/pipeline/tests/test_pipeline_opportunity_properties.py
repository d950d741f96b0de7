"""Property-based tests of the opportunity state machine.

Hypothesis issues random sequences of commands (valid and invalid) to one
opportunity on a pipeline whose stages are also added and retired along the
way. After every step:

- the deal is in a valid state (the invariants below);
- a refused command raised a clear error and changed nothing (no event, the
  same state as before, the same pipeline);
- an accepted command did what it said, and a command the rules forbid
  (closing a closed deal, changing a closed deal) was refused;
- the events collected so far, stored and loaded again through the
  application's mapper (its JSON transcoder with the service's
  transcodings), rebuild an aggregate equal to the live one.
"""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import checked
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from crm_common.errors import CrmError, RuleViolated, ValidationFailed
from crm_common.money import CURRENCIES, round_money
from crm_pipeline.application import PipelineApplication
from crm_pipeline.domain import CLOSED_LOST, CLOSED_WON, OPEN_CATEGORIES, Opportunity, Pipeline
from crm_pipeline.inputs import LineItemInput, StageInput

T0 = datetime(2026, 3, 2, 8, 30, tzinfo=UTC)
MAPPER = PipelineApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}).mapper

amounts = st.one_of(
    st.decimals(min_value=0, max_value=10**7, places=2).map(str),
    st.decimals(min_value=0, max_value=10**4, places=3).map(str),
    st.sampled_from(["0", "-1", "-0.01", "12,5", "NaN", "1E+20", " 7 "]),
    st.floats(min_value=0, max_value=100, allow_nan=False),
)
currencies = st.sampled_from(["EUR", "EUR", "USD", "JPY", "KWD", "XXX", "eur"])
# Time mostly moves on, but often steps back a little: commands dated before the
# deal's last stage change must be refused.
hours = st.one_of(st.integers(min_value=-12, max_value=0), st.integers(min_value=1, max_value=480))
reasons = st.sampled_from(["", "  ", "price", "timing", "competitor"])
owners = st.sampled_from(["", "ann", "bob", "chen"])
line_specs = st.lists(
    st.builds(
        LineItemInput,
        product_id=st.sampled_from(["", "sku-1", "sku-2", "sku-3"]),
        product_name=st.just("Product"),
        quantity=st.one_of(
            st.decimals(min_value=0, max_value=50, places=2).map(str),
            st.sampled_from(["-1", "1", "3", 2.5]),
        ),
        unit_price=st.one_of(
            st.decimals(min_value=0, max_value=5000, places=4).map(str),
            st.sampled_from(["-5", "19.99"]),
        ),
        discount_percent=st.sampled_from(["0", "5", "12.5", "100", "101", "-1"]),
    ),
    max_size=4,
)


def state_of(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def rebuilt(events: list[Any]) -> Any:
    aggregate = None
    for stored in [MAPPER.to_stored_event(e) for e in events]:
        aggregate = MAPPER.to_domain_event(stored).mutate(aggregate)
    return aggregate


class OpportunityMachine(RuleBasedStateMachine):
    pipeline: Pipeline
    deal: Opportunity

    @initialize(amount=st.decimals(min_value=0, max_value=10**6, places=2), currency=currencies)
    def open_deal(self, amount: Decimal, currency: str) -> None:
        self.pipeline = checked.define_pipeline(
            "Sales",
            [
                StageInput("qualify", "Qualify", "10", "pipeline"),
                StageInput("propose", "Propose", "40", "best_case"),
                StageInput("negotiate", "Negotiate", "75", "commit"),
                StageInput("won", "Won", "100", "closed_won"),
                StageInput("lost", "Lost", "0", "closed_lost"),
            ],
        )
        self.pipeline_events = self.pipeline.collect_events()
        self.now = T0
        self.added = 0
        currency = currency if currency in CURRENCIES else "EUR"
        amount = round_money(amount, currency)
        self.deal = checked.open_deal(
            pipeline=self.pipeline,
            name="Deal",
            customer_id="customer-1",
            owner="ann",
            amount=amount,
            currency=currency,
            expected_close_date=T0.date() + timedelta(days=30),
            at=T0,
        )
        self.events = self.deal.collect_events()
        self.refusals = 0

    # -- running commands ----------------------------------------------------------------------

    def run(self, command: Any) -> CrmError | None:
        """Runs a deal command; a refusal must leave deal and pipeline untouched."""
        before = copy.deepcopy(state_of(self.deal))
        pipeline_before = copy.deepcopy(state_of(self.pipeline))
        try:
            command()
        except CrmError as error:
            assert isinstance(error, ValidationFailed | RuleViolated), error
            assert error.message
            if isinstance(error, ValidationFailed):
                assert all(e.field for e in error.errors)
            assert self.deal.collect_events() == []
            assert state_of(self.deal) == before
            assert state_of(self.pipeline) == pipeline_before
            self.refusals += 1
            return error
        self.events.extend(self.deal.collect_events())
        return None

    def when(self, step: int) -> datetime:
        self.now = max(T0, self.now + timedelta(hours=step))
        return self.now

    def stage_ids(self) -> list[str]:
        return [*self.pipeline.stages, "ghost"]

    # -- rules: the deal -----------------------------------------------------------------------

    @rule(pick=st.integers(min_value=0, max_value=20), step=hours)
    def change_stage(self, pick: int, step: int) -> None:
        ids = self.stage_ids()
        stage_id = ids[pick % len(ids)]
        was_closed = self.deal.is_closed
        error = self.run(lambda: self.deal.change_stage(self.pipeline, stage_id, self.when(step)))
        if was_closed:
            assert error is not None
        if error is None:
            assert self.deal.stage_id == stage_id

    @rule(step=hours, days_back=st.integers(min_value=-3, max_value=40))
    def win(self, step: int, days_back: int) -> None:
        at = self.when(step)
        closed_on = at.date() - timedelta(days=days_back)
        was_closed = self.deal.is_closed
        error = self.run(lambda: self.deal.win(self.pipeline, at, closed_on))
        if was_closed:
            assert isinstance(error, RuleViolated)
        if error is None:
            assert (self.deal.status, self.deal.closed_on) == ("won", closed_on)

    @rule(step=hours, reason=reasons)
    def lose(self, step: int, reason: str) -> None:
        was_closed = self.deal.is_closed
        error = self.run(lambda: checked.lose(self.deal, self.pipeline, reason, self.when(step)))
        if was_closed:
            assert error is not None
        if error is None:
            assert (self.deal.status, self.deal.lost_reason) == ("lost", reason.strip())

    @rule(step=hours, pick=st.integers(min_value=-1, max_value=20))
    def reopen(self, step: int, pick: int) -> None:
        ids = self.stage_ids()
        stage_id = "" if pick < 0 else ids[pick % len(ids)]
        was_closed = self.deal.is_closed
        error = self.run(lambda: self.deal.reopen(self.pipeline, self.when(step), stage_id))
        if not was_closed:
            assert isinstance(error, RuleViolated)
        if error is None:
            assert self.deal.status == "open"

    @rule(amount=amounts, currency=currencies, step=hours)
    def change_amount(self, amount: Any, currency: str, step: int) -> None:
        was_closed = self.deal.is_closed
        error = self.run(
            lambda: checked.change_amount(self.deal, amount, currency, self.when(step))
        )
        if was_closed:
            assert error is not None
        if error is None:
            assert self.deal.amount.amount == Decimal(str(amount).strip())
            # Currency codes are canonicalised: " eur" is EUR.
            assert self.deal.amount.currency == currency.strip().upper()

    @rule(items=line_specs, step=hours)
    def set_line_items(self, items: list[LineItemInput], step: int) -> None:
        was_closed = self.deal.is_closed
        error = self.run(lambda: checked.set_line_items(self.deal, items, self.when(step)))
        if was_closed:
            assert error is not None

    @rule(days=st.integers(min_value=-5, max_value=400), step=hours)
    def change_expected_close_date(self, days: int, step: int) -> None:
        expected = T0.date() + timedelta(days=days)
        error = self.run(lambda: self.deal.change_expected_close_date(expected, self.when(step)))
        if days < 0:
            assert isinstance(error, ValidationFailed)

    @rule(owner=owners, step=hours)
    def reassign(self, owner: str, step: int) -> None:
        self.run(lambda: checked.reassign(self.deal, owner, self.when(step)))

    # -- rules: the pipeline changes under the deal --------------------------------------------

    @rule(category=st.sampled_from(OPEN_CATEGORIES), position=st.integers(0, 8))
    def add_stage(self, category: str, position: int) -> None:
        self.added += 1
        spec = StageInput(f"extra-{self.added}", f"Extra {self.added}", "50", category)
        try:
            checked.add_stage(self.pipeline, spec, position)
        except ValidationFailed:
            return
        self.pipeline_events.extend(self.pipeline.collect_events())

    @rule(pick=st.integers(min_value=0, max_value=20))
    def retire_stage(self, pick: int) -> None:
        ids = self.stage_ids()
        try:
            self.pipeline.retire_stage(ids[pick % len(ids)])
        except CrmError:
            assert self.pipeline.collect_events() == []
            return
        self.pipeline_events.extend(self.pipeline.collect_events())

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def is_valid(self) -> None:
        deal, pipeline = self.deal, self.pipeline
        stage = pipeline.stage(deal.stage_id)
        expected_category = {"open": None, "won": CLOSED_WON, "lost": CLOSED_LOST}[deal.status]
        if expected_category is None:
            assert stage.is_open
            assert deal.closed_on is None and deal.closed_at is None and deal.lost_reason == ""
        else:
            assert stage.category == expected_category
            assert deal.closed_on is not None and deal.closed_at is not None
            assert deal.opened_at.date() <= deal.closed_on <= deal.closed_at.date()
        assert (deal.lost_reason != "") == (deal.status == "lost")
        # Money: exact, non-negative, in a known currency, to its minor unit.
        money = deal.amount
        assert money.currency in CURRENCIES
        assert isinstance(money.amount, Decimal) and money.amount >= 0
        assert money.amount == round_money(money.amount, money.currency)
        assert money.amount.as_tuple().exponent == -CURRENCIES[money.currency]
        if deal.line_items:
            assert money.amount == sum(line.total for line in deal.line_items)
        assert deal.expected_close_date >= deal.opened_at.date()
        # Stage history: contiguous stays ending in the current stage.
        history = deal.history
        assert history[0].entered_at == deal.opened_at
        assert history[-1].stage_id == deal.stage_id and history[-1].left_at is None
        for earlier, later in itertools.pairwise(history):
            assert earlier.left_at == later.entered_at
            assert earlier.entered_at <= later.entered_at
            assert earlier.stage_id != later.stage_id
        assert deal.version == len(self.events)

    @invariant()
    def replay_rebuilds_the_same_aggregates(self) -> None:
        assert state_of(rebuilt(self.events)) == state_of(self.deal)
        assert state_of(rebuilt(self.pipeline_events)) == state_of(self.pipeline)


OpportunityMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOpportunityStateMachine = OpportunityMachine.TestCase


def test_the_machine_reaches_every_status() -> None:
    """The random walk is not stuck: a plain sequence closes, reopens and closes again."""
    machine = OpportunityMachine()
    machine.open_deal(Decimal("100.00"), "EUR")
    machine.change_stage(1, 24)
    machine.win(24, 0)
    machine.reopen(1, -1)
    machine.lose(1, "price")
    machine.is_valid()
    machine.replay_rebuilds_the_same_aggregates()
    assert machine.deal.status == "lost"
    assert [type(e).__name__ for e in machine.events] == [
        "Opened",
        "StageChanged",
        "Won",
        "Reopened",
        "Lost",
    ]
    machine.teardown()


def test_a_stored_event_keeps_decimals_and_dates_as_such() -> None:
    machine = OpportunityMachine()
    machine.open_deal(Decimal("100.00"), "EUR")
    machine.set_line_items([LineItemInput("sku-1", "Seat", "10", "19.99", "12.5")], 1)
    machine.win(2, 0)
    stored = [MAPPER.to_stored_event(e) for e in machine.events]
    assert b'"quantity":"10"' in stored[1].state
    loaded = [MAPPER.to_domain_event(s) for s in stored]
    assert loaded[1].line_items[0].total == Decimal("174.91")
    assert isinstance(loaded[2].closed_on, date) and not isinstance(loaded[2].closed_on, datetime)
