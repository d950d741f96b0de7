"""End to end over the real processes: forecast, funnel and win rate of a seeded
data set equal the figures this module computes itself from what it sent.

The data set is a pipeline of this test's own with deals of three owners of
this test's own (so the other tests sharing the service change nothing here):
deals in EUR, USD and JPY with close dates over several months, moved forward
and back, won, lost and reopened, re-priced, re-dated and reassigned. Then the
pipeline itself changes (a stage is re-weighted and re-categorised, two stages
swap places, one is retired) and every figure is checked again, since the
service documents that forecasts and funnels follow the pipeline as it is at
query time.

The expected figures come from the test's own record only: money in integer
minor units, weighted amounts as exact fractions rounded half-even once per
row, durations in integer microseconds. The service's clock stamps every
change (the commands take no time of the caller's), so the record keeps the
timestamps the service answered with; everything computed from them is the
test's own.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx

from crm.contacts.v1 import contacts_pb2 as c
from crm.pipeline.v1 import pipeline_pb2 as p

# Who the stubs call as (tests/conftest.py): a real token of this user.
E2E_CALLER = ("admin", "e2e-forecaster")
MINOR_UNITS = {"EUR": 2, "USD": 2, "JPY": 0}
OPEN = ("pipeline", "best_case", "commit", "omitted")
# stage id, name, probability (percent, as sent), category
STAGES = [
    ("lead", "Lead in", "10", "pipeline"),
    ("discovery", "Discovery", "12.5", "pipeline"),
    ("propose", "Propose", "33.33", "best_case"),
    ("negotiate", "Negotiate", "67.5", "commit"),
    ("parked", "Parked", "5", "omitted"),
    ("won", "Won", "100", "closed_won"),
    ("lost", "Lost", "0", "closed_lost"),
]

# What happens to a deal after it is opened (in the stage given first, or the
# pipeline's first open stage): ("move", stage), ("win",), ("lose",),
# ("reopen",), ("amount",), ("currency",), ("close_date",), ("owner",), ("lines",).
JOURNEYS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("", []),
    ("", [("move", "discovery")]),
    ("", [("move", "discovery"), ("move", "propose")]),
    ("", [("move", "discovery"), ("move", "propose"), ("move", "negotiate")]),
    ("", [("move", "propose"), ("move", "discovery")]),
    (
        "",
        [
            ("move", "discovery"),
            ("move", "propose"),
            ("move", "negotiate"),
            ("move", "propose"),
            ("move", "negotiate"),
            ("win",),
        ],
    ),
    ("", [("win",)]),
    ("", [("move", "discovery"), ("lose",)]),
    (
        "",
        [
            ("move", "discovery"),
            ("move", "propose"),
            ("lose",),
            ("reopen",),
            ("move", "negotiate"),
            ("win",),
        ],
    ),
    ("", [("move", "discovery"), ("move", "negotiate"), ("win",), ("reopen",)]),
    ("", [("move", "parked")]),
    ("propose", [("move", "negotiate"), ("win",)]),
    ("negotiate", [("lose",)]),
    ("", [("amount",), ("move", "discovery"), ("close_date",)]),
    ("discovery", [("owner",), ("move", "propose")]),
    ("", [("lines",), ("move", "propose"), ("win",)]),
    ("", [("move", "parked"), ("move", "discovery")]),
    ("propose", [("currency",), ("move", "negotiate"), ("close_date",)]),
    ("negotiate", [("move", "propose"), ("lose",), ("reopen",)]),
]
DEALS = 48
PERIODS = {"month": p.FORECAST_PERIOD_MONTH, "quarter": p.FORECAST_PERIOD_QUARTER}
# Forecast windows, in days from today (None: unbounded), cutting through months.
WINDOWS = [(17, 75, "quarter"), (3, 40, "month"), (None, 50, "month"), (60, None, "quarter")]
# Line items of the ("lines",) step: quantity, unit price, discount percent.
LINES = [("3", "19.99", "15"), ("1.5", "200", "0"), ("7", "0.35", "33.33")]


# -- the test's own record ----------------------------------------------------------


@dataclass
class StageDef:
    name: str
    probability: str
    category: str
    retired: bool = False


@dataclass
class Board:
    """The pipeline as the test defined and changed it."""

    stages: dict[str, StageDef]
    order: list[str]

    def position(self, stage_id: str) -> int | None:
        return self.order.index(stage_id) if stage_id in self.order else None

    def is_open(self, stage_id: str) -> bool:
        return self.stages[stage_id].category in OPEN

    def listed(self) -> list[str]:
        """Active stages in order, then retired ones."""
        return self.order + [s for s, d in self.stages.items() if d.retired]


@dataclass
class Stay:
    stage: str
    entered: int  # microseconds since the epoch
    left: int | None
    regression: bool


@dataclass
class Deal:
    owner: str
    units: int  # in the currency's minor unit
    currency: str
    expected: date
    steps: list[tuple[str, ...]]
    first_stage: str
    id: str = ""
    version: int = 0
    status: str = "open"
    opened: int = 0
    closed: int | None = None
    closed_on: date | None = None
    stays: list[Stay] = field(default_factory=list)

    @property
    def stage(self) -> str:
        return self.stays[-1].stage

    @property
    def day(self) -> date:
        """The day the forecast files the deal under."""
        if self.status != "open":
            assert self.closed_on is not None
            return self.closed_on
        return self.expected


def money_text(units: int, currency: str) -> str:
    digits = MINOR_UNITS[currency]
    if digits == 0:
        return str(units)
    whole, part = divmod(units, 10**digits)
    return f"{whole}.{part:0{digits}d}"


def units_of(text: str, currency: str) -> int:
    value = Fraction(text) * 10 ** MINOR_UNITS[currency]
    assert value.denominator == 1, text
    return int(value)


def micros(stamp: Any) -> int:
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


def ratio_text(part: int, whole: int) -> str:
    """part / whole with 4 places, rounded half-even; empty without a whole."""
    if whole == 0:
        return ""
    tenths = round(Fraction(part * 10_000, whole))
    return f"{tenths // 10_000}.{tenths % 10_000:04d}"


def average_micros(spans: list[int]) -> int | None:
    return round(Fraction(sum(spans), len(spans))) if spans else None


def period_of(day: date, period: str) -> str:
    if period == "month":
        return f"{day.year:04d}-{day.month:02d}"
    return f"{day.year:04d}-Q{(day.month + 2) // 3}"


def category_number(word: str) -> int:
    return int(p.ForecastCategory.Value(f"FORECAST_CATEGORY_{word.upper()}"))


# -- expected figures ----------------------------------------------------------------

Row = tuple[int, str, str]  # deals, amount, weighted amount


def expected_forecast(
    deals: Iterable[Deal],
    board: Board,
    period: str,
    owner: str | None = None,
    start: date | None = None,
    end: date | None = None,
) -> dict[tuple[str, str, str, str], Row]:
    groups: dict[tuple[str, str, str, str], list[Any]] = defaultdict(lambda: [0, 0, Fraction(0)])
    for deal in deals:
        if owner is not None and deal.owner != owner:
            continue
        if (start and deal.day < start) or (end and deal.day > end):
            continue
        stage = board.stages[deal.stage]
        row = groups[(period_of(deal.day, period), deal.owner, stage.category, deal.currency)]
        row[0] += 1
        row[1] += deal.units
        row[2] += deal.units * Fraction(stage.probability) / 100
    return {
        key: (count, money_text(units, key[3]), money_text(round(weighted), key[3]))
        for key, (count, units, weighted) in groups.items()
    }


@dataclass(frozen=True)
class FunnelRow:
    stage_id: str
    name: str
    category: str
    retired: bool
    entered: int
    entries: int
    regressions: int
    advanced: int | None
    conversion: str
    amounts: dict[str, str]
    average_micros: int | None


def expected_funnel(deals: list[Deal], board: Board) -> list[FunnelRow]:
    rows = []
    for stage_id in board.listed():
        spec = board.stages[stage_id]
        here = board.position(stage_id)
        entered = entries = regressions = advanced = 0
        units: dict[str, int] = defaultdict(int)
        stays: list[int] = []
        for deal in deals:
            visits = [i for i, s in enumerate(deal.stays) if s.stage == stage_id]
            if not visits:
                continue
            entered += 1
            entries += len(visits)
            regressions += sum(deal.stays[i].regression for i in visits)
            units[deal.currency] += deal.units
            for i in visits:
                left = deal.stays[i].left
                if left is not None:
                    stays.append(left - deal.stays[i].entered)

            def further(later: str, here: int | None = here) -> bool:
                if board.stages[later].category == "closed_won":
                    return True
                there = board.position(later)
                return (
                    board.is_open(later) and here is not None and there is not None and there > here
                )

            if any(further(s.stage) for s in deal.stays[visits[0] + 1 :]):
                advanced += 1
        is_open = spec.category in OPEN
        rows.append(
            FunnelRow(
                stage_id=stage_id,
                name=spec.name,
                category=spec.category,
                retired=spec.retired,
                entered=entered,
                entries=entries,
                regressions=regressions,
                advanced=advanced if is_open else None,
                conversion=ratio_text(advanced, entered) if is_open else "",
                amounts={cur: money_text(u, cur) for cur, u in units.items()},
                average_micros=average_micros(stays),
            )
        )
    return rows


@dataclass(frozen=True)
class WinRateFigures:
    won: int
    lost: int
    rate: str
    won_amounts: dict[str, str]
    average_cycle_micros: int | None


def expected_win_rate(
    deals: Iterable[Deal],
    owner: str | None = None,
    start: date | None = None,
    end: date | None = None,
) -> WinRateFigures:
    won = lost = 0
    units: dict[str, int] = defaultdict(int)
    cycles: list[int] = []
    for deal in deals:
        if deal.status == "open" or (owner is not None and deal.owner != owner):
            continue
        assert deal.closed_on is not None and deal.closed is not None
        if (start and deal.closed_on < start) or (end and deal.closed_on > end):
            continue
        if deal.status == "won":
            won += 1
            units[deal.currency] += deal.units
            cycles.append(deal.closed - deal.opened)
        else:
            lost += 1
    return WinRateFigures(
        won,
        lost,
        ratio_text(won, won + lost),
        {cur: money_text(u, cur) for cur, u in units.items()},
        average_micros(cycles),
    )


# -- what the service answers, in the same shapes ----------------------------------------


def forecast_of(reply: p.GetForecastResponse) -> dict[tuple[str, str, str, str], Row]:
    rows = {
        (
            r.period,
            r.owner,
            p.ForecastCategory.Name(r.category).removeprefix("FORECAST_CATEGORY_").lower(),
            r.amount.currency,
        ): (r.deals, r.amount.amount, r.weighted_amount.amount)
        for r in reply.rows
    }
    assert len(rows) == len(reply.rows), "one row per period, owner, category and currency"
    assert all(r.amount.currency == r.weighted_amount.currency for r in reply.rows)
    return rows


def forecast_json(body: dict[str, Any]) -> dict[tuple[str, str, str, str], Row]:
    rows = {
        (r["period"], r["owner"], r["category"], r["amount"]["currency"]): (
            r["deals"],
            r["amount"]["amount"],
            r["weighted_amount"]["amount"],
        )
        for r in body["rows"]
    }
    assert len(rows) == len(body["rows"])
    return rows


def duration_micros(message: Any, name: str) -> int | None:
    if not message.HasField(name):
        return None
    span = getattr(message, name)
    return int(span.seconds) * 1_000_000 + int(span.nanos) // 1000


def funnel_of(reply: p.GetFunnelResponse) -> list[FunnelRow]:
    return [
        FunnelRow(
            stage_id=s.stage_id,
            name=s.name,
            category=p.ForecastCategory.Name(s.category).removeprefix("FORECAST_CATEGORY_").lower(),
            retired=s.retired,
            entered=s.entered,
            entries=s.entries,
            regressions=s.regressions,
            advanced=s.advanced if s.HasField("advanced") else None,
            conversion=s.conversion,
            amounts={m.currency: m.amount for m in s.amounts},
            average_micros=duration_micros(s, "average_time_in_stage"),
        )
        for s in reply.stages
    ]


def funnel_json(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (
            s["stage_id"],
            s["name"],
            s["category"],
            s["retired"],
            s["entered"],
            s["entries"],
            s["regressions"],
            s["advanced"],
            s["conversion"] or "",
            {m["currency"]: m["amount"] for m in s["amounts"]},
            s["average_seconds_in_stage"],
        )
        for s in body["stages"]
    ]


def funnel_as_json(rows: list[FunnelRow]) -> list[tuple[Any, ...]]:
    """The expected rows as the REST API words them (seconds as a float)."""
    return [
        (
            r.stage_id,
            r.name,
            r.category,
            r.retired,
            r.entered,
            r.entries,
            r.regressions,
            r.advanced,
            r.conversion,
            r.amounts,
            None if r.average_micros is None else r.average_micros / 1_000_000,
        )
        for r in rows
    ]


def win_rate_of(reply: p.GetWinRateResponse) -> WinRateFigures:
    return WinRateFigures(
        reply.won,
        reply.lost,
        reply.rate,
        {m.currency: m.amount for m in reply.won_amounts},
        duration_micros(reply, "average_cycle"),
    )


# -- seeding through the API ---------------------------------------------------------------


def plan(rng: random.Random, owners: list[str], today: date) -> list[Deal]:
    deals = []
    for i in range(DEALS):
        first_stage, steps = JOURNEYS[i % len(JOURNEYS)]
        needs_cents = any(s[0] in ("lines", "currency") for s in steps)
        currency = "EUR" if needs_cents else rng.choice(["EUR", "EUR", "USD", "JPY"])
        concrete: list[tuple[str, ...]] = []
        for step in steps:
            if step[0] == "amount":
                concrete.append(("amount", str(rng.randint(1, 9_999_999))))
            elif step[0] == "currency":
                concrete.append(("currency", "USD", str(rng.randint(1, 9_999_999))))
            elif step[0] == "close_date":
                concrete.append(("close_date", str(rng.randint(1, 120))))
            elif step[0] == "owner":
                concrete.append(("owner", owners[(i + 1) % len(owners)]))
            else:
                concrete.append(step)
        deals.append(
            Deal(
                owner=owners[i % len(owners)],
                units=rng.randint(1, 50_000_000),
                currency=currency,
                expected=today + timedelta(days=rng.randint(1, 120)),
                steps=concrete,
                first_stage=first_stage,
            )
        )
    # Alone in their rows (closing far beyond the others), amounts whose weighted
    # value is exactly half a minor unit: half-even rounds 0.5 JPY and 0.005 EUR
    # down to 0 and 1.5 JPY up to 2.
    for n, (units, currency) in enumerate([(4, "JPY"), (4, "EUR"), (12, "JPY")]):
        deals.append(
            Deal(
                owner=owners[n],
                units=units,
                currency=currency,
                expected=today + timedelta(days=300),
                steps=[],
                first_stage="discovery",
            )
        )
    return deals


class Seeder:
    def __init__(self, pipeline: Any, pipeline_id: str, board: Board, customer_id: str) -> None:
        self.pipeline = pipeline
        self.pipeline_id = pipeline_id
        self.board = board
        self.customer_id = customer_id

    def _took(self, deal: Deal, written: Any, regression: bool | None = None) -> None:
        """Records a write; with `regression`, the deal entered a new stage."""
        assert written.result.version == deal.version + 1, "one event per command"
        deal.version = written.result.version
        opportunity = written.opportunity
        if regression is not None:
            visit = opportunity.history[-1]
            at = micros(visit.entered_at)
            deal.stays[-1].left = at
            deal.stays.append(Stay(visit.stage_id, at, None, regression))
            # The service's record of the stay agrees with the test's.
            assert (visit.stage_id, visit.regression) == (deal.stage, regression)
        assert opportunity.stage_id == deal.stage
        assert (opportunity.amount.amount, opportunity.amount.currency) == (
            money_text(deal.units, deal.currency),
            deal.currency,
        )

    async def open(self, deal: Deal, name: str) -> None:
        opened = await self.pipeline.OpenOpportunity(
            p.OpenOpportunityRequest(
                pipeline_id=self.pipeline_id,
                stage_id=deal.first_stage,
                name=name,
                customer_id=self.customer_id,
                company_id=self.customer_id,
                owner=deal.owner,
                amount=p.Money(
                    amount=money_text(deal.units, deal.currency), currency=deal.currency
                ),
                expected_close_date=deal.expected.isoformat(),
            ),
        )
        deal.id = opened.opportunity.id
        deal.version = opened.result.version
        deal.opened = micros(opened.opportunity.opened_at)
        deal.stays = [Stay(deal.first_stage or self.board.order[0], deal.opened, None, False)]
        assert opened.opportunity.stage_id == deal.stage

    async def move(self, deal: Deal, stage_id: str) -> None:
        now, then = self.board.position(stage_id), self.board.position(deal.stage)
        regression = now is not None and then is not None and now < then
        moved = await self.pipeline.MoveOpportunity(
            p.MoveOpportunityRequest(
                opportunity_id=deal.id, expected_version=deal.version, stage_id=stage_id
            ),
        )
        self._took(deal, moved, regression)

    async def step(self, deal: Deal, step: tuple[str, ...]) -> None:
        kind = step[0]
        ident, version = deal.id, deal.version
        if kind == "move":
            await self.move(deal, step[1])
        elif kind in ("win", "lose"):
            # Closed on the day the deal opened: never before it, never in the future.
            closed_on = datetime.fromtimestamp(deal.opened / 1_000_000, UTC).date()
            if kind == "win":
                written = await self.pipeline.WinOpportunity(
                    p.WinOpportunityRequest(
                        opportunity_id=ident,
                        expected_version=version,
                        closed_on=closed_on.isoformat(),
                    ),
                )
            else:
                written = await self.pipeline.LoseOpportunity(
                    p.LoseOpportunityRequest(
                        opportunity_id=ident,
                        expected_version=version,
                        reason="went with a competitor",
                        closed_on=closed_on.isoformat(),
                    ),
                )
            deal.status = "won" if kind == "win" else "lost"
            deal.closed_on = closed_on
            self._took(deal, written, regression=False)
            assert deal.stage == deal.status
            deal.closed = micros(written.opportunity.closed_at)
            assert deal.closed == deal.stays[-1].entered
        elif kind == "reopen":
            written = await self.pipeline.ReopenOpportunity(
                p.ReopenOpportunityRequest(opportunity_id=ident, expected_version=version),
            )
            back_to = next(s.stage for s in reversed(deal.stays) if self.board.is_open(s.stage))
            deal.status, deal.closed, deal.closed_on = "open", None, None
            self._took(deal, written, regression=True)
            assert deal.stage == back_to
        elif kind in ("amount", "currency"):
            if kind == "currency":
                deal.currency = step[1]
            deal.units = int(step[-1])
            written = await self.pipeline.ChangeAmount(
                p.ChangeAmountRequest(
                    opportunity_id=ident,
                    expected_version=version,
                    amount=p.Money(
                        amount=money_text(deal.units, deal.currency), currency=deal.currency
                    ),
                ),
            )
            self._took(deal, written)
        elif kind == "close_date":
            opened_on = datetime.fromtimestamp(deal.opened / 1_000_000, UTC).date()
            deal.expected = opened_on + timedelta(days=int(step[1]))
            written = await self.pipeline.ChangeExpectedCloseDate(
                p.ChangeExpectedCloseDateRequest(
                    opportunity_id=ident,
                    expected_version=version,
                    expected_close_date=deal.expected.isoformat(),
                ),
            )
            self._took(deal, written)
            assert written.opportunity.expected_close_date == deal.expected.isoformat()
        elif kind == "owner":
            deal.owner = step[1]
            written = await self.pipeline.ReassignOpportunity(
                p.ReassignOpportunityRequest(
                    opportunity_id=ident, expected_version=version, owner=deal.owner
                ),
            )
            self._took(deal, written)
        elif kind == "lines":
            # Each line: quantity x unit price x (1 - discount), rounded half-even to the cent.
            deal.units = sum(
                round(Fraction(q) * Fraction(u) * 100 * (100 - Fraction(d)) / 100)
                for q, u, d in LINES
            )
            written = await self.pipeline.SetLineItems(
                p.SetLineItemsRequest(
                    opportunity_id=ident,
                    expected_version=version,
                    line_items=[
                        p.LineItemInput(
                            product_id=f"sku-{n}",
                            product_name=f"Product {n}",
                            quantity=q,
                            unit_price=u,
                            discount_percent=d,
                        )
                        for n, (q, u, d) in enumerate(LINES)
                    ],
                ),
            )
            self._took(deal, written)
        else:  # pragma: no cover - a typo in JOURNEYS
            raise AssertionError(step)

    async def run(self, deal: Deal, name: str, gate: asyncio.Semaphore) -> None:
        async with gate:
            await self.open(deal, name)
            for step in deal.steps:
                await self.step(deal, step)


# -- the test ------------------------------------------------------------------------------


async def check_everything(
    pipeline: Any,
    http: httpx.AsyncClient,
    pipeline_id: str,
    board: Board,
    deals: list[Deal],
    owners: list[str],
    today: date,
) -> None:
    # Forecast over gRPC: the whole pipeline by month and by quarter, each owner
    # alone, and windows cutting through months (inclusive at both ends).
    for period, number in PERIODS.items():
        reply = await pipeline.GetForecast(
            p.GetForecastRequest(period=number, pipeline_id=pipeline_id)
        )
        assert forecast_of(reply) == expected_forecast(deals, board, period)
    for owner in owners:
        reply = await pipeline.GetForecast(
            p.GetForecastRequest(
                period=p.FORECAST_PERIOD_MONTH, pipeline_id=pipeline_id, owner=owner
            )
        )
        wanted = expected_forecast(deals, board, "month", owner=owner)
        assert wanted, f"{owner} has deals"
        assert forecast_of(reply) == wanted
    for first, last, period in WINDOWS:
        start = None if first is None else today + timedelta(days=first)
        end = None if last is None else today + timedelta(days=last)
        reply = await pipeline.GetForecast(
            p.GetForecastRequest(
                period=PERIODS[period],
                pipeline_id=pipeline_id,
                start=start.isoformat() if start else "",
                end=end.isoformat() if end else "",
            )
        )
        wanted = expected_forecast(deals, board, period, start=start, end=end)
        assert wanted, (first, last)
        assert forecast_of(reply) == wanted, (first, last, period)
    # ... and over REST, for one owner by quarter.
    response = await http.get(
        "/forecast", params={"period": "quarter", "pipeline_id": pipeline_id, "owner": owners[1]}
    )
    assert response.status_code == 200, response.text
    assert forecast_json(response.json()) == expected_forecast(
        deals, board, "quarter", owner=owners[1]
    )

    # The funnel of the pipeline, over gRPC and REST.
    wanted_funnel = expected_funnel(deals, board)
    reply = await pipeline.GetFunnel(p.GetFunnelRequest(pipeline_id=pipeline_id))
    assert (reply.pipeline_id, reply.deals) == (pipeline_id, len(deals))
    assert funnel_of(reply) == wanted_funnel
    response = await http.get(f"/pipelines/{pipeline_id}/funnel")
    assert response.status_code == 200, response.text
    assert response.json()["deals"] == len(deals)
    assert funnel_json(response.json()) == funnel_as_json(wanted_funnel)

    # Win rate and cycle length: the pipeline, each owner, a window of close days.
    reply = await pipeline.GetWinRate(p.GetWinRateRequest(pipeline_id=pipeline_id))
    assert win_rate_of(reply) == expected_win_rate(deals)
    for owner in owners:
        reply = await pipeline.GetWinRate(p.GetWinRateRequest(pipeline_id=pipeline_id, owner=owner))
        assert win_rate_of(reply) == expected_win_rate(deals, owner=owner)
    later = today + timedelta(days=1)
    reply = await pipeline.GetWinRate(
        p.GetWinRateRequest(pipeline_id=pipeline_id, start=later.isoformat())
    )
    assert win_rate_of(reply) == expected_win_rate(deals, start=later)
    response = await http.get("/win-rate", params={"pipeline_id": pipeline_id})
    assert response.status_code == 200, response.text
    figures = expected_win_rate(deals)
    body = response.json()
    assert (body["won"], body["lost"], body["rate"]) == (figures.won, figures.lost, figures.rate)
    assert {m["currency"]: m["amount"] for m in body["won_amounts"]} == figures.won_amounts
    assert figures.average_cycle_micros is not None
    assert body["average_cycle_seconds"] == figures.average_cycle_micros / 1_000_000


def coverage(deals: list[Deal], board: Board) -> None:
    """The seeded data set has what the figures are meant to be tested on."""
    assert len({d.owner for d in deals}) == 3
    assert {d.currency for d in deals} == set(MINOR_UNITS)
    open_deals = [d for d in deals if d.status == "open"]
    assert len({period_of(d.day, "month") for d in open_deals}) >= 3
    assert len({period_of(d.day, "quarter") for d in open_deals}) >= 2
    assert sum(d.status == "won" for d in deals) >= 5
    assert sum(d.status == "lost" for d in deals) >= 3
    assert any(s.regression and board.is_open(s.stage) for d in deals for s in d.stays[1:])
    assert any(d.stays[i].stage in ("won", "lost") for d in deals for i in range(len(d.stays) - 1))


async def test_forecast_funnel_and_win_rate_match_a_seeded_data_set(
    platform: Any, pipeline: Any, contacts: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    owners = [f"ada-{tag}", f"bo-{tag}", f"cy-{tag}"]
    today = datetime.now(UTC).date()
    company = await contacts.CreateCompany(c.CreateCompanyRequest(name=f"Forecast Buyers {tag}"))
    defined = await pipeline.DefinePipeline(
        p.DefinePipelineRequest(
            name=f"Forecast {tag}",
            stages=[
                p.StageInput(stage_id=i, name=n, probability=pr, category=category_number(cat))
                for i, n, pr, cat in STAGES
            ],
        ),
    )
    pipeline_id = defined.pipeline.id
    board = Board({i: StageDef(n, pr, cat) for i, n, pr, cat in STAGES}, [s[0] for s in STAGES])
    deals = plan(random.Random(20260331), owners, today)
    seeder = Seeder(pipeline, pipeline_id, board, company.result.id)
    gate = asyncio.Semaphore(8)
    await asyncio.gather(
        *(seeder.run(deal, f"Deal {n} {tag}", gate) for n, deal in enumerate(deals))
    )
    coverage(deals, board)

    async with httpx.AsyncClient(
        base_url=platform.pipeline_http, timeout=30, headers=platform.headers(*E2E_CALLER)
    ) as http:
        await check_everything(pipeline, http, pipeline_id, board, deals, owners, today)

        # The pipeline changes; forecast and funnel follow it as it is now.
        version = defined.result.version

        async def changed(call: Any, request: Any) -> None:
            nonlocal version
            request.pipeline_id, request.expected_version = pipeline_id, version
            version = (await call(request)).result.version

        await changed(
            pipeline.ChangeStageSettings,
            p.ChangeStageSettingsRequest(
                stage_id="discovery",
                probability="21.75",
                category=p.FORECAST_CATEGORY_BEST_CASE,
            ),
        )
        board.stages["discovery"].probability = "21.75"
        board.stages["discovery"].category = "best_case"
        # Negotiate now comes before propose: deals that went on from propose to
        # negotiate no longer advanced from propose, and the other way round.
        board.order = ["lead", "discovery", "negotiate", "propose", "parked", "won", "lost"]
        await changed(pipeline.ReorderStages, p.ReorderStagesRequest(stage_ids=board.order))
        await changed(pipeline.RetireStage, p.RetireStageRequest(stage_id="parked"))
        board.order.remove("parked")
        board.stages["parked"].retired = True

        # Moves under the new order: propose -> negotiate is now a step back,
        # leaving the retired stage is neither.
        in_propose = next(d for d in deals if d.stage == "propose")
        await seeder.move(in_propose, "negotiate")
        assert in_propose.stays[-1].regression
        in_parked = next(d for d in deals if d.stage == "parked")
        await seeder.move(in_parked, "discovery")
        assert not in_parked.stays[-1].regression
        assert any(d.stage == "parked" for d in deals), "a deal still sits in the retired stage"

        await check_everything(pipeline, http, pipeline_id, board, deals, owners, today)
