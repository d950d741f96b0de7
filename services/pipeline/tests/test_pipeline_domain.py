"""The pipeline's aggregates: leads, pipelines, opportunities and activities.

Pure domain tests: no store, no transport. Every refusal is checked for a
clear error (field name or rule) and for changing nothing: no pending event,
the aggregate's state exactly as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import checked
import pytest

from crm_common.errors import CrmError, RuleViolated, ValidationFailed
from crm_pipeline.domain import Lead, Opportunity, Pipeline
from crm_pipeline.inputs import LineItemInput, StageInput

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def at(days: float = 0, hours: float = 0) -> datetime:
    return T0 + timedelta(days=days, hours=hours)


def sales_pipeline() -> Pipeline:
    pipeline = checked.define_pipeline(
        "Direct sales",
        [
            StageInput("qualify", "Qualify", "10", "pipeline"),
            StageInput("propose", "Propose", "40", "best_case"),
            StageInput("negotiate", "Negotiate", "70", "commit"),
            StageInput("won", "Won", "100", "closed_won"),
            StageInput("lost", "Lost", "0", "closed_lost"),
        ],
    )
    pipeline.collect_events()
    return pipeline


def open_deal(pipeline: Pipeline, **changes: Any) -> Opportunity:
    fields: dict[str, Any] = {
        "pipeline": pipeline,
        "name": "Fleet renewal",
        "customer_id": "company-1",
        "person_id": "person-1",
        "company_id": "company-1",
        "owner": "ann",
        "amount": "12000",
        "currency": "EUR",
        "expected_close_date": date(2026, 3, 31),
        "at": T0,
    }
    fields.update(changes)
    deal = checked.open_deal(**fields)
    deal.collect_events()
    return deal


def new_lead(**changes: Any) -> Lead:
    fields: dict[str, Any] = {
        "given_name": "Ada",
        "family_name": "Byron",
        "company_name": "Analytical Engines Ltd",
        "email": "Ada@Example.org",
        "source": "event",
        "campaign": "spring-expo",
        "owner": "ann",
        "at": T0,
    }
    fields.update(changes)
    lead = checked.create_lead(**fields)
    lead.collect_events()
    return lead


def refused(aggregate: Any, error: type[CrmError], command: Callable[[], object]) -> CrmError:
    """Runs a command that must be refused; asserts that it changed nothing."""
    assert aggregate.collect_events() == []
    before = copy.deepcopy(vars(aggregate))
    with pytest.raises(error) as caught:
        command()
    assert aggregate.collect_events() == [], "a refused command triggered an event"
    assert vars(aggregate) == before, "a refused command changed the aggregate"
    return caught.value


def fields_of(error: CrmError) -> list[str]:
    assert isinstance(error, ValidationFailed)
    return [e.field for e in error.errors]


def names(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


# -- leads -------------------------------------------------------------------------------------


def test_a_lead_keeps_its_source_and_campaign_and_starts_new() -> None:
    lead = checked.create_lead(
        family_name="Byron",
        email="Ada@Example.org",
        source="event",
        campaign="spring-expo",
        owner="ann",
        at=T0,
    )
    (created,) = lead.collect_events()
    assert type(created).__name__ == "Created"
    assert (created.source, created.campaign, created.email) == (
        "event",
        "spring-expo",
        "ada@example.org",
    )
    assert (lead.status, lead.score, lead.created_at) == ("new", None, T0)


def test_a_lead_with_bad_fields_is_refused_naming_every_field() -> None:
    with pytest.raises(ValidationFailed) as caught:
        checked.create_lead(family_name=" ", source="fax", owner="", email="not-an-address", at=T0)
    assert set(fields_of(caught.value)) == {"family_name", "source", "owner", "email"}


def test_a_lead_needs_a_way_to_reach_it() -> None:
    with pytest.raises(ValidationFailed) as caught:
        checked.create_lead(family_name="Byron", source="web", owner="ann", at=T0)
    assert fields_of(caught.value) == ["email"]
    assert "phone" in caught.value.message


def test_a_lead_refuses_a_time_without_a_timezone() -> None:
    with pytest.raises(ValidationFailed) as caught:
        new_lead(at=datetime(2026, 1, 5, 9, 0))
    assert fields_of(caught.value) == ["at"]


def test_qualifying_records_the_score_and_may_rescore() -> None:
    lead = new_lead()
    checked.qualify(lead, 60, at(1))
    checked.qualify(lead, 85, at(2))
    assert [e.score for e in lead.collect_events()] == [60, 85]
    assert (lead.status, lead.score) == ("qualified", 85)


@pytest.mark.parametrize("score", [-1, 101, 50.5, True, "80"])
def test_a_score_outside_0_to_100_is_refused(score: Any) -> None:
    lead = new_lead()
    error = refused(lead, ValidationFailed, lambda: checked.qualify(lead, score, at(1)))
    assert fields_of(error) == ["score"]


def test_a_disqualified_lead_keeps_its_reason_and_cannot_be_qualified_or_converted() -> None:
    lead = new_lead()
    refused(lead, ValidationFailed, lambda: checked.disqualify(lead, "  ", at(1)))
    checked.disqualify(lead, "no budget this year", at(1))
    lead.collect_events()
    assert (lead.status, lead.disqualify_reason) == ("disqualified", "no budget this year")
    error = refused(lead, RuleViolated, lambda: checked.qualify(lead, 70, at(2)))
    assert "disqualified" in error.message
    refused(
        lead,
        RuleViolated,
        lambda: lead.convert(person_id="p", company_id="", opportunity_id="o", at=at(2)),
    )


def test_only_a_qualified_lead_converts_and_it_remembers_what_it_became() -> None:
    lead = new_lead()
    error = refused(
        lead,
        RuleViolated,
        lambda: lead.convert(person_id="p-1", company_id="c-1", opportunity_id="o-1", at=at(1)),
    )
    assert "qualified" in error.message
    checked.qualify(lead, 80, at(1))
    lead.collect_events()
    refused(
        lead,
        ValidationFailed,
        lambda: lead.convert(person_id="", company_id="c-1", opportunity_id="o-1", at=at(2)),
    )
    lead.convert(person_id="p-1", company_id="c-1", opportunity_id="o-1", at=at(2))
    (converted,) = lead.collect_events()
    assert type(converted).__name__ == "Converted"
    # A lead with a company becomes that company's business.
    assert converted.customer_id == "c-1"
    assert (lead.status, lead.person_id, lead.company_id, lead.opportunity_id) == (
        "converted",
        "p-1",
        "c-1",
        "o-1",
    )
    assert lead.converted_at == at(2)
    error = refused(
        lead,
        RuleViolated,
        lambda: lead.convert(person_id="p-2", company_id="", opportunity_id="o-2", at=at(3)),
    )
    assert "converted" in error.message


def test_a_lead_without_a_company_becomes_the_persons_business() -> None:
    lead = new_lead(company_name="")
    checked.qualify(lead, 50, at(1))
    lead.convert(person_id="p-9", company_id="", opportunity_id="o-9", at=at(1))
    assert lead.customer_id == "p-9"


# -- pipelines ---------------------------------------------------------------------------------


def test_a_pipeline_keeps_its_stages_in_order_with_probability_and_category() -> None:
    pipeline = sales_pipeline()
    assert pipeline.order == ["qualify", "propose", "negotiate", "won", "lost"]
    propose = pipeline.stage("propose")
    assert (propose.name, propose.probability, propose.category) == (
        "Propose",
        Decimal("40.00"),
        "best_case",
    )
    assert isinstance(propose.probability, Decimal)


@pytest.mark.parametrize(
    ("stages", "field"),
    [
        (
            [StageInput("a", "A", "10", "pipeline"), StageInput("a", "A2", "100", "closed_won")],
            "stages",
        ),
        (
            [StageInput("a", "A", "10", "pipeline"), StageInput("l", "L", "0", "closed_lost")],
            "stages",
        ),
        (
            [StageInput("w", "W", "100", "closed_won"), StageInput("l", "L", "0", "closed_lost")],
            "stages",
        ),
        ([StageInput("A B", "A", "10", "pipeline")], "stages[0].stage_id"),
        ([StageInput("a", "A", "101", "pipeline")], "stages[0].probability"),
        ([StageInput("a", "A", "10.005", "pipeline")], "stages[0].probability"),
        ([StageInput("a", "A", 0.5, "pipeline")], "stages[0].probability"),
        ([StageInput("a", "A", "10", "maybe")], "stages[0].category"),
        ([StageInput("w", "W", "90", "closed_won")], "stages[0].probability"),
        ([StageInput("l", "L", "5", "closed_lost")], "stages[0].probability"),
    ],
)
def test_a_malformed_pipeline_is_refused(stages: list[StageInput], field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        checked.define_pipeline("Broken", stages)
    assert field in fields_of(caught.value)


def test_a_stage_added_renamed_and_reordered_keeps_its_id() -> None:
    pipeline = sales_pipeline()
    checked.add_stage(pipeline, StageInput("demo", "Demo", "25", "pipeline"), position=1)
    checked.rename_stage(pipeline, "demo", "Product demo")
    pipeline.reorder_stages(["qualify", "propose", "demo", "negotiate", "won", "lost"])
    events = pipeline.collect_events()
    assert names(events) == ["StageAdded", "StageRenamed", "StagesReordered"]
    assert all(e.stage_id == "demo" for e in events[:2])
    assert pipeline.order == ["qualify", "propose", "demo", "negotiate", "won", "lost"]
    assert pipeline.stage("demo").name == "Product demo"
    # Renaming to the same name records nothing.
    checked.rename_stage(pipeline, "demo", "Product demo")
    assert pipeline.collect_events() == []


def test_bad_stage_changes_are_refused_and_change_nothing() -> None:
    pipeline = sales_pipeline()
    error = refused(
        pipeline,
        ValidationFailed,
        lambda: checked.add_stage(pipeline, StageInput("propose", "Again", "20", "pipeline")),
    )
    assert fields_of(error) == ["stage.stage_id"]
    error = refused(
        pipeline,
        ValidationFailed,
        lambda: checked.add_stage(
            pipeline, StageInput("later", "Later", "20", "pipeline"), position=9
        ),
    )
    assert fields_of(error) == ["position"]
    error = refused(pipeline, ValidationFailed, lambda: checked.rename_stage(pipeline, "nope", "X"))
    assert fields_of(error) == ["stage_id"]
    error = refused(
        pipeline, ValidationFailed, lambda: pipeline.reorder_stages(["won", "lost", "qualify"])
    )
    assert fields_of(error) == ["stage_ids"]
    error = refused(
        pipeline,
        ValidationFailed,
        lambda: pipeline.reorder_stages(["qualify", "qualify", "propose", "negotiate", "won"]),
    )
    assert fields_of(error) == ["stage_ids"]


def test_stage_settings_change_among_open_categories_only() -> None:
    pipeline = sales_pipeline()
    checked.change_stage_settings(pipeline, "propose", "45.5", "commit")
    (changed,) = pipeline.collect_events()
    assert (changed.probability, changed.category) == (Decimal("45.50"), "commit")
    error = refused(
        pipeline,
        RuleViolated,
        lambda: checked.change_stage_settings(pipeline, "propose", "100", "closed_won"),
    )
    assert "open categories" in error.message
    refused(
        pipeline,
        RuleViolated,
        lambda: checked.change_stage_settings(pipeline, "won", "0", "pipeline"),
    )


def test_a_retired_stage_leaves_the_order_but_keeps_its_record_and_id() -> None:
    pipeline = sales_pipeline()
    pipeline.retire_stage("propose")
    (retired,) = pipeline.collect_events()
    assert retired.stage_id == "propose"
    assert pipeline.order == ["qualify", "negotiate", "won", "lost"]
    assert pipeline.stage("propose").retired
    assert pipeline.stage("propose").name == "Propose"
    # Its id is never given to another stage.
    error = refused(
        pipeline,
        ValidationFailed,
        lambda: checked.add_stage(pipeline, StageInput("propose", "New propose", "30", "pipeline")),
    )
    assert "already" in error.message
    refused(pipeline, ValidationFailed, lambda: pipeline.retire_stage("propose"))


def test_a_pipeline_keeps_one_open_one_won_and_one_lost_stage() -> None:
    pipeline = sales_pipeline()
    error = refused(pipeline, RuleViolated, lambda: pipeline.retire_stage("won"))
    assert "closed-won" in error.message
    refused(pipeline, RuleViolated, lambda: pipeline.retire_stage("lost"))
    pipeline.retire_stage("qualify")
    pipeline.retire_stage("propose")
    pipeline.collect_events()
    error = refused(pipeline, RuleViolated, lambda: pipeline.retire_stage("negotiate"))
    assert "open stage" in error.message


# -- opportunities: opening --------------------------------------------------------------------


def test_a_deal_opens_in_the_first_open_stage_with_an_exact_amount() -> None:
    pipeline = sales_pipeline()
    deal = checked.open_deal(
        pipeline=pipeline,
        name="Fleet renewal",
        customer_id="company-1",
        owner="ann",
        amount="12000",
        currency="EUR",
        expected_close_date=date(2026, 3, 31),
        at=T0,
    )
    (opened,) = deal.collect_events()
    assert type(opened).__name__ == "Opened"
    assert (opened.stage_id, opened.pipeline_id) == ("qualify", str(pipeline.id))
    assert str(deal.amount.amount) == "12000.00"
    assert isinstance(deal.amount.amount, Decimal)
    assert (deal.status, deal.stage_id, deal.opened_at) == ("open", "qualify", T0)
    yen = open_deal(pipeline, amount="1500000", currency="JPY")
    assert str(yen.amount.amount) == "1500000"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": "-1"}, "amount"),
        ({"amount": "-0.01"}, "amount"),
        ({"amount": 100.0}, "amount"),
        ({"amount": "12,000"}, "amount"),
        ({"amount": "NaN"}, "amount"),
        ({"amount": "1000000000000000"}, "amount"),
        ({"amount": "10.001"}, "amount"),
        ({"amount": "10.5", "currency": "JPY"}, "amount"),
        ({"currency": "XXX"}, "currency"),
        ({"currency": "EURO"}, "currency"),
        ({"stage_id": "nowhere"}, "stage_id"),
        ({"stage_id": "won"}, "stage_id"),
        ({"expected_close_date": date(2026, 1, 4)}, "expected_close_date"),
        ({"expected_close_date": "2026-03-31"}, "expected_close_date"),
        ({"at": datetime(2026, 1, 5, 9, 0)}, "at"),
        ({"kind": "barter"}, "kind"),
        ({"owner": ""}, "owner"),
    ],
)
def test_a_deal_with_bad_input_is_refused_naming_the_field(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        open_deal(sales_pipeline(), **changes)
    assert field in fields_of(caught.value)


def test_all_malformed_fields_of_a_new_deal_are_reported_together() -> None:
    with pytest.raises(ValidationFailed) as caught:
        open_deal(sales_pipeline(), name="", customer_id="", amount="-5")
    assert set(fields_of(caught.value)) == {"name", "customer_id", "amount"}


def test_a_deal_may_close_on_the_day_it_opens() -> None:
    deal = open_deal(sales_pipeline(), expected_close_date=T0.date())
    assert deal.expected_close_date == T0.date()


# -- opportunities: stages and time in stage ---------------------------------------------------


def test_stage_moves_forward_and_back_are_recorded_with_regressions() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.change_stage(pipeline, "negotiate", at(2))
    deal.change_stage(pipeline, "propose", at(5))
    deal.change_stage(pipeline, "negotiate", at(6))
    events = deal.collect_events()
    assert [(e.from_stage_id, e.stage_id, e.regression) for e in events] == [
        ("qualify", "negotiate", False),
        ("negotiate", "propose", True),
        ("propose", "negotiate", False),
    ]
    assert [(v.stage_id, v.regression) for v in deal.history] == [
        ("qualify", False),
        ("negotiate", False),
        ("propose", True),
        ("negotiate", False),
    ]
    assert deal.history[-1].left_at is None
    # Staying where it is records nothing.
    deal.change_stage(pipeline, "negotiate", at(7))
    assert deal.collect_events() == []


def test_time_in_stage_adds_up_every_stay() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.change_stage(pipeline, "propose", at(3))
    deal.change_stage(pipeline, "qualify", at(4))
    deal.change_stage(pipeline, "propose", at(4, hours=12))
    assert deal.time_in_stages(now=at(10)) == {
        "qualify": timedelta(days=3, hours=12),
        "propose": timedelta(days=1) + timedelta(days=5, hours=12),
    }


def test_regression_follows_the_current_stage_order() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline, stage_id="propose")
    pipeline.reorder_stages(["negotiate", "propose", "qualify", "won", "lost"])
    deal.change_stage(pipeline, "negotiate", at(1))
    (moved,) = deal.collect_events()
    assert moved.regression


def test_bad_stage_moves_are_refused_and_change_nothing() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.change_stage(pipeline, "propose", at(2))
    deal.collect_events()
    error = refused(deal, ValidationFailed, lambda: deal.change_stage(pipeline, "demo", at(3)))
    assert fields_of(error) == ["stage_id"]
    error = refused(deal, ValidationFailed, lambda: deal.change_stage(pipeline, "won", at(3)))
    assert "winning or losing" in error.message
    error = refused(deal, ValidationFailed, lambda: deal.change_stage(pipeline, "qualify", at(1)))
    assert fields_of(error) == ["at"]
    other = sales_pipeline()
    error = refused(deal, ValidationFailed, lambda: deal.change_stage(other, "qualify", at(3)))
    assert fields_of(error) == ["pipeline_id"]
    pipeline.retire_stage("negotiate")
    error = refused(deal, ValidationFailed, lambda: deal.change_stage(pipeline, "negotiate", at(3)))
    assert "retired" in error.message


def test_a_deal_in_a_retired_stage_keeps_its_stage_and_can_move_on() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline, stage_id="propose")
    pipeline.retire_stage("propose")
    assert deal.stage_id == "propose"
    deal.change_stage(pipeline, "negotiate", at(1))
    (moved,) = deal.collect_events()
    assert (moved.from_stage_id, moved.stage_id, moved.regression) == (
        "propose",
        "negotiate",
        False,
    )


# -- opportunities: won, lost, reopened --------------------------------------------------------


def test_winning_moves_the_deal_into_the_won_stage() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.change_stage(pipeline, "negotiate", at(3))
    deal.win(pipeline, at(10))
    events = deal.collect_events()
    won = events[-1]
    assert type(won).__name__ == "Won"
    assert (won.stage_id, won.closed_on, won.person_id, won.company_id) == (
        "won",
        date(2026, 1, 15),
        "person-1",
        "company-1",
    )
    assert (won.amount, won.currency) == (Decimal("12000.00"), "EUR")
    assert (deal.status, deal.stage_id, deal.closed_at) == ("won", "won", at(10))
    assert deal.history[-2].left_at == at(10)


def test_losing_needs_a_reason_and_keeps_it() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    error = refused(deal, ValidationFailed, lambda: checked.lose(deal, pipeline, "", at(2)))
    assert fields_of(error) == ["reason"]
    checked.lose(deal, pipeline, "went with a competitor", at(2), closed_on=date(2026, 1, 6))
    (lost,) = deal.collect_events()
    assert (lost.stage_id, lost.reason, lost.closed_on) == (
        "lost",
        "went with a competitor",
        date(2026, 1, 6),
    )
    assert (deal.status, deal.lost_reason) == ("lost", "went with a competitor")


def test_closing_a_closed_deal_is_refused() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.win(pipeline, at(5))
    deal.collect_events()
    error = refused(deal, RuleViolated, lambda: deal.win(pipeline, at(6)))
    assert "already closed" in error.message
    error = refused(deal, RuleViolated, lambda: checked.lose(deal, pipeline, "changed mind", at(6)))
    assert "already closed" in error.message


def test_a_closed_deal_cannot_change_until_it_is_reopened() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    checked.lose(deal, pipeline, "no budget", at(5))
    deal.collect_events()
    commands: list[Callable[[], object]] = [
        lambda: checked.change_amount(deal, "500", "EUR", at(6)),
        lambda: checked.set_line_items(deal, [LineItemInput("sku-1", "Seat", "1", "10")], at(6)),
        lambda: deal.change_expected_close_date(date(2026, 6, 30), at(6)),
        lambda: checked.reassign(deal, "bob", at(6)),
        lambda: deal.change_stage(pipeline, "propose", at(6)),
    ]
    for command in commands:
        error = refused(deal, RuleViolated, command)
        assert "reopen" in error.message
    deal.reopen(pipeline, at(7))
    checked.change_amount(deal, "500", "EUR", at(8))
    checked.reassign(deal, "bob", at(8))
    assert names(deal.collect_events()) == ["Reopened", "AmountChanged", "OwnerChanged"]
    assert (deal.status, deal.amount.amount, deal.owner) == ("open", Decimal("500.00"), "bob")


def test_reopening_returns_to_the_stage_the_deal_was_closed_from() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.change_stage(pipeline, "negotiate", at(2))
    checked.lose(deal, pipeline, "no budget", at(5))
    deal.reopen(pipeline, at(9))
    reopened = deal.collect_events()[-1]
    assert (reopened.stage_id, deal.stage_id, deal.status) == ("negotiate", "negotiate", "open")
    assert (deal.lost_reason, deal.closed_on, deal.closed_at, deal.reopen_count) == (
        "",
        None,
        None,
        1,
    )
    # Reopening counts as going back.
    assert deal.history[-1].regression
    deal.win(pipeline, at(12))
    deal.reopen(pipeline, at(13), stage_id="propose")
    assert (deal.stage_id, deal.reopen_count) == ("propose", 2)


def test_bad_reopens_are_refused() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    error = refused(deal, RuleViolated, lambda: deal.reopen(pipeline, at(1)))
    assert "only closed deals reopen" in error.message
    deal.change_stage(pipeline, "propose", at(1))
    deal.win(pipeline, at(2))
    deal.collect_events()
    refused(deal, ValidationFailed, lambda: deal.reopen(pipeline, at(3), stage_id="lost"))
    refused(deal, ValidationFailed, lambda: deal.reopen(pipeline, at(1)))
    pipeline.retire_stage("propose")
    error = refused(deal, ValidationFailed, lambda: deal.reopen(pipeline, at(3)))
    assert "retired" in error.message
    deal.reopen(pipeline, at(3), stage_id="negotiate")
    assert deal.stage_id == "negotiate"


@pytest.mark.parametrize(
    ("closed_on", "message"),
    [(date(2026, 1, 4), "before the deal was opened"), (date(2026, 1, 9), "future")],
)
def test_a_close_date_before_opening_or_in_the_future_is_refused(
    closed_on: date, message: str
) -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    error = refused(deal, ValidationFailed, lambda: deal.win(pipeline, at(2), closed_on=closed_on))
    assert fields_of(error) == ["closed_on"]
    assert message in error.message


def test_an_expected_close_date_before_opening_is_refused() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    error = refused(
        deal, ValidationFailed, lambda: deal.change_expected_close_date(date(2025, 12, 31), at(1))
    )
    assert fields_of(error) == ["expected_close_date"]
    deal.change_expected_close_date(date(2026, 2, 28), at(1))
    assert deal.expected_close_date == date(2026, 2, 28)


@pytest.mark.parametrize(
    ("amount", "currency", "field"),
    [("-10", "EUR", "amount"), ("10", "ZZZ", "currency"), ("0.5", "JPY", "amount")],
)
def test_a_bad_amount_change_is_refused(amount: str, currency: str, field: str) -> None:
    deal = open_deal(sales_pipeline())
    error = refused(
        deal, ValidationFailed, lambda: checked.change_amount(deal, amount, currency, at(1))
    )
    assert fields_of(error) == [field]


# -- line items --------------------------------------------------------------------------------


def test_line_items_with_discounts_make_the_amount_in_exact_decimals() -> None:
    deal = open_deal(sales_pipeline())
    checked.set_line_items(
        deal,
        [
            LineItemInput("sku-seat", "Seat licence", "10", "99.99", "15"),
            LineItemInput("sku-setup", "Onboarding", "1", "1500"),
            LineItemInput("sku-hours", "Consulting hours", "2.5", "120.10", "2.5"),
        ],
        at(1),
    )
    (changed,) = deal.collect_events()
    # 10 x 99.99 x 0.85 = 849.915 -> 849.92 (half-even); 2.5 x 120.10 x 0.975 = 292.74375 -> 292.74
    assert [line.total for line in changed.line_items] == [
        Decimal("849.92"),
        Decimal("1500.00"),
        Decimal("292.74"),
    ]
    assert changed.amount == Decimal("2642.66")
    assert deal.amount.amount == Decimal("2642.66")
    assert all(isinstance(line.total, Decimal) for line in deal.line_items)
    assert [str(line.quantity) for line in deal.line_items] == ["10", "1", "2.5"]
    assert str(deal.line_items[0].discount_percent) == "15.00"


def test_line_totals_round_half_even_once() -> None:
    deal = open_deal(sales_pipeline(), currency="JPY", amount="0")
    checked.set_line_items(
        deal, [LineItemInput("a", "", "1", "2.5"), LineItemInput("b", "", "1", "3.5")], at(1)
    )
    assert [line.total for line in deal.line_items] == [Decimal(2), Decimal(4)]
    assert deal.amount.amount == Decimal(6)


def test_the_amount_of_a_deal_with_lines_is_their_sum() -> None:
    deal = open_deal(sales_pipeline())
    checked.set_line_items(deal, [LineItemInput("sku-1", "Seat", "3", "100")], at(1))
    deal.collect_events()
    error = refused(deal, RuleViolated, lambda: checked.change_amount(deal, "1", "EUR", at(2)))
    assert "sum of its lines" in error.message
    # Same lines again: nothing recorded.
    checked.set_line_items(deal, [LineItemInput("sku-1", "Seat", "3.000", "100.00")], at(2))
    assert deal.collect_events() == []
    # Without lines the deal keeps its last amount.
    checked.set_line_items(deal, [], at(3))
    assert deal.amount.amount == Decimal("300.00")
    assert deal.line_items == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (LineItemInput("", "Seat", "1", "10"), "line_items[0].product_id"),
        (LineItemInput("s", "Seat", "0", "10"), "line_items[0].quantity"),
        (LineItemInput("s", "Seat", 1.5, "10"), "line_items[0].quantity"),
        (LineItemInput("s", "Seat", "1", "-10"), "line_items[0].unit_price"),
        (LineItemInput("s", "Seat", "1", 9.99), "line_items[0].unit_price"),
        (LineItemInput("s", "Seat", "1", "10", "101"), "line_items[0].discount_percent"),
        (LineItemInput("s", "Seat", "1", "10", "-5"), "line_items[0].discount_percent"),
    ],
)
def test_a_bad_line_item_is_refused_naming_the_field(spec: LineItemInput, field: str) -> None:
    deal = open_deal(sales_pipeline())
    error = refused(deal, ValidationFailed, lambda: checked.set_line_items(deal, [spec], at(1)))
    assert fields_of(error) == [field]


# -- cross-sell and up-sell --------------------------------------------------------------------


def test_a_cross_sell_links_to_the_customers_earlier_won_deals() -> None:
    pipeline = sales_pipeline()
    first = open_deal(pipeline)
    first.win(pipeline, at(3))
    more = open_deal(pipeline, kind="cross_sell", related_deals=[first], at=at(4))
    assert (more.kind, more.related_deal_ids) == ("cross_sell", [str(first.id)])


def test_a_cross_sell_needs_won_deals_of_the_same_customer() -> None:
    pipeline = sales_pipeline()
    open_one = open_deal(pipeline)
    with pytest.raises(RuleViolated, match="not won"):
        open_deal(pipeline, kind="up_sell", related_deals=[open_one])
    elsewhere = open_deal(pipeline, customer_id="company-2")
    elsewhere.win(pipeline, at(1))
    with pytest.raises(RuleViolated, match="another customer"):
        open_deal(pipeline, kind="up_sell", related_deals=[elsewhere], at=at(2))
    with pytest.raises(ValidationFailed) as caught:
        open_deal(pipeline, kind="cross_sell")
    assert fields_of(caught.value) == ["related_deal_ids"]
    with pytest.raises(ValidationFailed):
        open_deal(pipeline, related_deals=[elsewhere], at=at(2))


# -- activities --------------------------------------------------------------------------------


def test_activities_are_scheduled_on_leads_and_deals_and_finish_once() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    lead = new_lead()
    call = checked.schedule_activity(
        subject=lead, kind="call", title="Intro call", owner="ann", due_at=at(2), at=at(0)
    )
    task = checked.schedule_activity(
        subject=deal, kind="task", title="Send quote", owner="bob", due_at=at(3), at=at(0)
    )
    assert (call.subject_kind, call.subject_id) == ("lead", str(lead.id))
    assert (task.subject_kind, task.subject_id, task.customer_id) == (
        "opportunity",
        str(deal.id),
        "company-1",
    )
    task.collect_events()
    task.reschedule(at(5), at(1))
    checked.complete(task, "quote sent", at(4))
    assert names(task.collect_events()) == ["Rescheduled", "Completed"]
    assert (task.status, task.due_at, task.outcome) == ("completed", at(5), "quote sent")
    error = refused(task, RuleViolated, lambda: checked.complete(task, "again", at(5)))
    assert "already completed" in error.message
    refused(task, RuleViolated, lambda: task.reschedule(at(9), at(5)))
    call.collect_events()
    checked.cancel(call, "lead unreachable", at(1))
    assert names(call.collect_events()) == ["Cancelled"]
    assert call.status == "cancelled"
    refused(call, RuleViolated, lambda: checked.complete(call, "", at(2)))


def test_a_follow_up_on_a_won_deal_is_allowed() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline)
    deal.win(pipeline, at(2))
    follow_up = checked.schedule_activity(
        subject=deal, kind="follow_up", title="Kick-off", owner="ann", due_at=at(9), at=at(3)
    )
    assert follow_up.status == "open"


def test_bad_activities_are_refused() -> None:
    lead = new_lead()
    with pytest.raises(ValidationFailed) as caught:
        checked.schedule_activity(
            subject=lead, kind="fax", title="", owner="", due_at=at(1), at=at(0)
        )
    assert set(fields_of(caught.value)) == {"kind", "title", "owner"}
    with pytest.raises(ValidationFailed) as caught:
        checked.schedule_activity(
            subject=lead,
            kind="call",
            title="Call",
            owner="ann",
            due_at=datetime(2026, 1, 6, 9, 0),
            at=at(0),
        )
    assert fields_of(caught.value) == ["due_at"]
