"""Forecast, funnel, win rate, cycle length and overdue follow-ups.

Deals are driven through the real aggregates (open, move, win, lose,
reopen) and turned into the query side's records by the read model's
mapping. Expected figures never come from the code under test: for the small
data set they are worked out by hand (in the comments); for the seeded data
set the test keeps its own plain script of what it did to each deal and
computes the figures from that, in integer cents and basis points.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

import checked
import pytest

from crm_common.errors import ValidationFailed
from crm_pipeline.domain import Activity, Opportunity, Pipeline
from crm_pipeline.forecast import (
    ForecastRow,
    forecast,
    funnel,
    overdue_follow_ups,
    win_rate,
)
from crm_pipeline.inputs import StageInput
from crm_pipeline.read_model import activity_info, deal_info, pipeline_info


def day(month: int, dom: int, hour: int = 9) -> datetime:
    return datetime(2026, month, dom, hour, 0, tzinfo=UTC)


STAGES = [
    StageInput("qualify", "Qualify", "10", "pipeline"),
    StageInput("propose", "Propose", "40", "best_case"),
    StageInput("negotiate", "Negotiate", "70", "commit"),
    StageInput("won", "Won", "100", "closed_won"),
    StageInput("lost", "Lost", "0", "closed_lost"),
]


def deal(
    pipeline: Pipeline,
    owner: str,
    amount: str,
    opened: datetime,
    expected: date,
    currency: str = "EUR",
) -> Opportunity:
    return checked.open_deal(
        pipeline=pipeline,
        name=f"{owner} {amount}",
        customer_id=f"customer-{owner}",
        owner=owner,
        amount=amount,
        currency=currency,
        expected_close_date=expected,
        at=opened,
    )


# -- a small data set, worked out by hand ------------------------------------------------------


@pytest.fixture
def small() -> tuple[Pipeline, list[Opportunity]]:
    p = checked.define_pipeline("Direct", STAGES)
    d1 = deal(p, "ann", "1000.05", day(1, 5), date(2026, 3, 31))
    d2 = deal(p, "ann", "2000", day(1, 5), date(2026, 3, 15))
    d2.change_stage(p, "propose", day(1, 10))
    d3 = deal(p, "bob", "3000", day(1, 5), date(2026, 3, 1))
    d3.change_stage(p, "propose", day(1, 7))
    d3.change_stage(p, "negotiate", day(1, 12))
    d3.win(p, day(2, 2))
    d4 = deal(p, "bob", "500", day(1, 5), date(2026, 2, 1))
    d4.change_stage(p, "propose", day(1, 8))
    checked.lose(d4, p, "price", day(1, 20))
    d5 = deal(p, "ann", "1234.56", day(1, 6), date(2026, 4, 10))
    d5.change_stage(p, "negotiate", day(1, 9))
    d5.change_stage(p, "propose", day(1, 14))
    d5.change_stage(p, "negotiate", day(1, 16))
    d6 = deal(p, "ann", "999.99", day(1, 6), date(2026, 3, 20), currency="USD")
    d7 = deal(p, "ann", "10.05", day(1, 6), date(2026, 3, 2))
    return p, [d1, d2, d3, d4, d5, d6, d7]


def row(period: str, owner: str, category: str, currency: str, n: int, a: str, w: str) -> Any:
    return ForecastRow(period, owner, category, currency, n, Decimal(a), Decimal(w))


def test_forecast_by_month_weights_each_row_once(small: Any) -> None:
    p, deals = small
    rows = forecast([deal_info(d) for d in deals], {str(p.id): pipeline_info(p)}, period="month")
    assert rows == [
        # d4 lost on 20 January; a lost deal weighs nothing.
        row("2026-01", "bob", "closed_lost", "EUR", 1, "500.00", "0.00"),
        # d3 won on 2 February: a closed deal falls in the month it closed.
        row("2026-02", "bob", "closed_won", "EUR", 1, "3000.00", "3000.00"),
        # d2 in propose (40 %): 2000 x 0.4.
        row("2026-03", "ann", "best_case", "EUR", 1, "2000.00", "800.00"),
        # d1 + d7 in qualify (10 %): 100.005 + 1.005 = 101.010 -> 101.01, where rounding
        # each deal first would give 100.00 + 1.00.
        row("2026-03", "ann", "pipeline", "EUR", 2, "1010.10", "101.01"),
        # Currencies are never added up: d6 is a row of its own; 99.999 -> 100.00.
        row("2026-03", "ann", "pipeline", "USD", 1, "999.99", "100.00"),
        # d5 in negotiate (70 %): 864.192 -> 864.19.
        row("2026-04", "ann", "commit", "EUR", 1, "1234.56", "864.19"),
    ]


def test_forecast_by_quarter_with_owner_and_date_filters(small: Any) -> None:
    p, deals = small
    infos, pipelines = [deal_info(d) for d in deals], {str(p.id): pipeline_info(p)}
    rows = forecast(infos, pipelines, period="quarter", owner="ann")
    assert [(r.period, r.category, r.currency, r.amount, r.weighted_amount) for r in rows] == [
        ("2026-Q1", "best_case", "EUR", Decimal("2000.00"), Decimal("800.00")),
        ("2026-Q1", "pipeline", "EUR", Decimal("1010.10"), Decimal("101.01")),
        ("2026-Q1", "pipeline", "USD", Decimal("999.99"), Decimal("100.00")),
        ("2026-Q2", "commit", "EUR", Decimal("1234.56"), Decimal("864.19")),
    ]
    march = forecast(infos, pipelines, start=date(2026, 3, 2), end=date(2026, 3, 20))
    # d7 (2 March), d2 (15 March), d6 (20 March); not d3 (won in February), not d1 (31 March).
    assert [(r.category, r.currency, r.deals, r.amount) for r in march] == [
        ("best_case", "EUR", 1, Decimal("2000.00")),
        ("pipeline", "EUR", 1, Decimal("10.05")),
        ("pipeline", "USD", 1, Decimal("999.99")),
    ]
    with pytest.raises(ValidationFailed) as caught:
        forecast(infos, pipelines, period="week")
    assert caught.value.errors[0].field == "period"
    with pytest.raises(ValidationFailed) as caught:
        forecast(infos, pipelines, start=date(2026, 3, 2), end=date(2026, 3, 1))
    assert caught.value.errors[0].field == "end"


def test_re_weighting_a_stage_re_weights_the_forecast(small: Any) -> None:
    p, deals = small
    checked.change_stage_settings(p, "propose", "55", "commit")
    rows = forecast([deal_info(deals[1])], {str(p.id): pipeline_info(p)})
    assert [(r.category, r.weighted_amount) for r in rows] == [("commit", Decimal("1100.00"))]


def test_funnel_counts_entries_regressions_conversion_and_time_in_stage(small: Any) -> None:
    p, deals = small
    result = funnel([deal_info(d) for d in deals], pipeline_info(p))
    assert result.deals == 7
    stages = {s.stage_id: s for s in result.stages}
    assert list(stages) == ["qualify", "propose", "negotiate", "won", "lost"]
    q, pr, n, w, lo = (stages[s] for s in ("qualify", "propose", "negotiate", "won", "lost"))
    # Every deal starts in qualify; d2, d3, d4 and d5 moved on from it.
    assert (q.entered, q.entries, q.regressions, q.advanced) == (7, 7, 0, 4)
    assert q.conversion == Decimal("0.5714")
    assert q.amounts == {"EUR": Decimal("7744.66"), "USD": Decimal("999.99")}
    # Completed stays in qualify: d2 5 days, d3 2, d4 3, d5 3.
    assert q.average_time_in_stage == timedelta(days=3, hours=6)
    # propose: d2 (still there), d3 -> negotiate, d4 -> lost, d5 came back to it and moved on.
    assert (pr.entered, pr.entries, pr.regressions, pr.advanced) == (4, 4, 1, 2)
    assert pr.conversion == Decimal("0.5000")
    assert pr.amounts == {"EUR": Decimal("6734.56")}
    # d3 5 days, d4 12 days, d5 2 days.
    assert pr.average_time_in_stage == timedelta(days=6, hours=8)
    # negotiate: d3 won from it; d5 entered it twice and is back in it, not further.
    assert (n.entered, n.entries, n.regressions, n.advanced) == (2, 3, 0, 1)
    assert n.conversion == Decimal("0.5000")
    # d3 12 January -> 2 February (21 days), d5 9 -> 14 January (5 days).
    assert n.average_time_in_stage == timedelta(days=13)
    assert (w.entered, w.advanced, w.conversion, w.amounts) == (
        1,
        None,
        None,
        {"EUR": Decimal("3000.00")},
    )
    assert (lo.entered, lo.amounts, lo.average_time_in_stage) == (
        1,
        {"EUR": Decimal("500.00")},
        None,
    )


def test_win_rate_and_cycle_length(small: Any) -> None:
    _, deals = small
    infos = [deal_info(d) for d in deals]
    overall = win_rate(infos)
    assert (overall.won, overall.lost, overall.rate) == (1, 1, Decimal("0.5000"))
    assert overall.won_amounts == {"EUR": Decimal("3000.00")}
    # d3: opened 5 January 09:00, won 2 February 09:00.
    assert overall.average_cycle == timedelta(days=28)
    january = win_rate(infos, end=date(2026, 1, 31))
    assert (january.won, january.lost, january.rate, january.average_cycle) == (
        0,
        1,
        Decimal("0.0000"),
        None,
    )
    assert win_rate(infos, owner="ann").rate is None


def test_overdue_follow_ups_per_owner_most_overdue_first() -> None:
    p = checked.define_pipeline("Direct", STAGES)
    opportunity = deal(p, "ann", "100", day(1, 5), date(2026, 3, 1))
    lead = checked.create_lead(
        family_name="Lovelace", email="a@example.org", source="web", owner="bob", at=day(1, 1)
    )

    def task(subject: Any, owner: str, due: datetime, title: str) -> Activity:
        return checked.schedule_activity(
            subject=subject, kind="task", title=title, owner=owner, due_at=due, at=day(1, 5)
        )

    late = task(opportunity, "ann", day(1, 18), "send contract")
    done = task(opportunity, "ann", day(1, 19), "call back")
    checked.complete(done, "called", day(1, 19))
    later = task(opportunity, "ann", day(1, 12), "send quote")
    on_time = task(lead, "bob", day(1, 20, 12), "intro call")
    stale = task(lead, "bob", day(1, 10), "first mail")
    dropped = task(lead, "bob", day(1, 3), "old idea")
    checked.cancel(dropped, "not needed", day(1, 4))
    future = task(lead, "chen", day(1, 25), "demo")
    activities = [activity_info(a) for a in (late, done, later, on_time, stale, dropped, future)]
    now = day(1, 20, 12)
    overdue = overdue_follow_ups(activities, now)
    assert {o: [a.title for a in items] for o, items in overdue.items()} == {
        "ann": ["send quote", "send contract"],
        "bob": ["first mail"],
    }
    assert [a.subject_kind for a in overdue["bob"]] == ["lead"]
    assert list(overdue_follow_ups(activities, now, owner="bob")) == ["bob"]


# -- a seeded data set with independently computed expectations --------------------------------


PROBABILITY_BP = {"qualify": 1000, "propose": 4000, "negotiate": 7000, "won": 10000, "lost": 0}
CATEGORY = {s.stage_id: s.category for s in STAGES}
OPEN = ["qualify", "propose", "negotiate"]
ORDER = ["qualify", "propose", "negotiate", "won", "lost"]


@dataclass
class Script:
    """What the test did to one deal, in plain values."""

    owner: str
    currency: str
    cents: int
    opened: datetime
    expected: date
    # (stage, entered at, entered by going back)
    path: list[tuple[str, datetime, bool]] = field(default_factory=list)
    closed: date | None = None


def seeded(seed: int, count: int) -> tuple[Pipeline, list[Opportunity], list[Script]]:
    rng = random.Random(seed)
    p = checked.define_pipeline("Seeded", STAGES)
    deals, scripts = [], []
    for _ in range(count):
        opened = day(1, 1) + timedelta(hours=rng.randrange(0, 24 * 60))
        script = Script(
            owner=rng.choice(["ann", "bob", "chen"]),
            currency=rng.choice(["EUR", "EUR", "USD"]),
            cents=rng.randrange(0, 5_000_000),
            opened=opened,
            expected=opened.date() + timedelta(days=rng.randrange(0, 200)),
        )
        first = rng.choice(OPEN)
        script.path.append((first, opened, False))
        opportunity = checked.open_deal(
            pipeline=p,
            name="deal",
            customer_id="c",
            owner=script.owner,
            amount=f"{script.cents // 100}.{script.cents % 100:02d}",
            currency=script.currency,
            expected_close_date=script.expected,
            at=opened,
            stage_id=first,
        )
        now = opened
        for _ in range(rng.randrange(0, 8)):
            now += timedelta(hours=rng.randrange(1, 24 * 10))
            current = script.path[-1][0]
            roll = rng.random()
            if current in OPEN and roll < 0.15:
                opportunity.win(p, now)
                script.path.append(("won", now, False))
                script.closed = now.date()
            elif current in OPEN and roll < 0.3:
                checked.lose(opportunity, p, "no", now)
                script.path.append(("lost", now, False))
                script.closed = now.date()
            elif current not in OPEN:
                target = rng.choice(OPEN)
                opportunity.reopen(p, now, target)
                script.path.append((target, now, True))
                script.closed = None
            else:
                target = rng.choice([s for s in OPEN if s != current])
                opportunity.change_stage(p, target, now)
                back = ORDER.index(target) < ORDER.index(current)
                script.path.append((target, now, back))
        deals.append(opportunity)
        scripts.append(script)
    return p, deals, scripts


def half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2):
        quotient += 1
    return quotient


def cents_text(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def test_seeded_forecast_matches_an_independent_computation() -> None:
    p, deals, scripts = seeded(seed=20260105, count=400)
    infos, pipelines = [deal_info(d) for d in deals], {str(p.id): pipeline_info(p)}
    for period in ("month", "quarter"):
        expected: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        for s in scripts:
            when = s.closed or s.expected
            label = (
                f"{when.year}-{when.month:02d}"
                if period == "month"
                else f"{when.year}-Q{(when.month + 2) // 3}"
            )
            stage = s.path[-1][0]
            sums = expected[(label, s.owner, CATEGORY[stage], s.currency)]
            sums[0] += 1
            sums[1] += s.cents
            sums[2] += s.cents * PROBABILITY_BP[stage]
        want = [
            (*key, n, cents_text(c), cents_text(half_even(w, 10000)))
            for key, (n, c, w) in sorted(expected.items())
        ]
        got = [
            (r.period, r.owner, r.category, r.currency, r.deals, r.amount, r.weighted_amount)
            for r in forecast(infos, pipelines, period=period)
        ]
        assert got == want, period


def test_seeded_funnel_and_win_rate_match_an_independent_computation() -> None:
    p, deals, scripts = seeded(seed=7, count=300)
    result = funnel([deal_info(d) for d in deals], pipeline_info(p))
    rows = {s.stage_id: s for s in result.stages}
    for stage in ORDER:
        entered = entries = regressions = advanced = 0
        amounts: dict[str, int] = defaultdict(int)
        stays: list[timedelta] = []
        for s in scripts:
            visits = [i for i, (name, _, _) in enumerate(s.path) if name == stage]
            if not visits:
                continue
            entered += 1
            entries += len(visits)
            regressions += sum(1 for i in visits if s.path[i][2])
            amounts[s.currency] += s.cents
            stays += [s.path[i + 1][1] - s.path[i][1] for i in visits if i + 1 < len(s.path)]
            later = [name for name, _, _ in s.path[visits[0] + 1 :]]
            if stage in OPEN and any(
                name == "won" or (name in OPEN and OPEN.index(name) > OPEN.index(stage))
                for name in later
            ):
                advanced += 1
        got = rows[stage]
        assert (got.entered, got.entries, got.regressions) == (entered, entries, regressions)
        assert got.amounts == {c: cents_text(v) for c, v in sorted(amounts.items())}
        if stage in OPEN:
            ratio = round(Fraction(advanced, entered), 4)
            assert (got.advanced, got.conversion) == (advanced, Decimal(str(float(ratio))))
        else:
            assert (got.advanced, got.conversion) == (None, None)
        total_seconds = sum(int(stay.total_seconds()) for stay in stays)
        assert got.average_time_in_stage == (
            timedelta(seconds=total_seconds) / len(stays) if stays else None
        )

    closed = [s for s in scripts if s.closed]
    won = [s for s in closed if s.path[-1][0] == "won"]
    rate = win_rate([deal_info(d) for d in deals])
    assert (rate.won, rate.lost) == (len(won), len(closed) - len(won))
    assert rate.rate == Decimal(str(float(round(Fraction(len(won), len(closed)), 4)))).quantize(
        Decimal("0.0001")
    )
    cycle_seconds = sum(int((s.path[-1][1] - s.opened).total_seconds()) for s in won)
    assert rate.average_cycle == timedelta(seconds=cycle_seconds) / len(won)
