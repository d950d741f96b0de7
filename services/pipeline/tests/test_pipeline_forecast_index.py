"""The query tables, kept up to date deal by deal, give the same figures as
computing them from every deal.

The forecast's day sums and the funnel's stage sums are what the service
answers forecast and funnel queries from. A random sales workload (deals
opened, moved back and forth, re-priced, re-dated, reassigned, won, lost,
reopened; stages re-weighted, re-categorised, reordered, added and retired)
is projected into the tables step by step (SQLite and PostgreSQL); at
checkpoints their answers are compared with the plain `forecast()`,
`funnel()` and `win_rate()` over every deal as it stands, for many query
shapes. Then the same through the service over a real store, and a service
started anew over the store against the one that followed it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import checked
import pytest
from pipeline_support import Clock, sqlite_settings

from crm_common.commands import Caller
from crm_common.errors import CrmError, ValidationFailed
from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.domain import Opportunity, Pipeline
from crm_pipeline.forecast import PipelineInfo, forecast, funnel, win_rate
from crm_pipeline.inputs import ForecastQuery, NewOpportunity, StageInput
from crm_pipeline.read_model import ReadModel, deal_info, pipeline_info

DIRECT = [
    StageInput("qualify", "Qualify", "10", "pipeline"),
    StageInput("propose", "Propose", "40", "best_case"),
    StageInput("negotiate", "Negotiate", "70", "commit"),
    StageInput("won", "Won", "100", "closed_won"),
    StageInput("lost", "Lost", "0", "closed_lost"),
]
RENEWALS = [
    StageInput("review", "Review", "50", "best_case"),
    StageInput("quote", "Quote", "80", "commit"),
    StageInput("parked", "Parked", "5", "omitted"),
    StageInput("renewed", "Renewed", "100", "closed_won"),
    StageInput("churned", "Churned", "0", "closed_lost"),
]
OWNERS = ["ann", "bob", "chen", "dana"]
CURRENCIES = ["EUR", "EUR", "USD", "JPY"]
OPEN_CATEGORIES = ["pipeline", "best_case", "commit", "omitted"]


def query_shapes(pipeline_ids: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
    """Every combination of period, owner and pipeline, over whole, cut and open ranges."""
    ranges: list[tuple[date | None, date | None]] = [
        (None, None),
        (date(2026, 2, 1), date(2026, 4, 30)),  # whole months only
        (date(2026, 2, 14), date(2026, 5, 3)),  # cuts through two months
        (date(2026, 3, 10), date(2026, 3, 20)),  # inside one month
        # A day short of whole months at either end.
        (date(2026, 2, 2), date(2026, 3, 30)),
        (date(2026, 4, 2), date(2026, 5, 30)),
        (date(2026, 1, 2), date(2026, 6, 29)),
        (date(2026, 3, 5), None),
        (None, date(2026, 4, 17)),
    ]
    for _ in range(3):
        first = date(2026, 1, 1) + timedelta(days=rng.randrange(0, 200))
        ranges.append((first, first + timedelta(days=rng.randrange(0, 120))))
    for period in ("month", "quarter"):
        for owner in (None, *OWNERS, "nobody"):
            for pipeline_id in (None, *pipeline_ids):
                for start, end in ranges:
                    yield {
                        "period": period,
                        "owner": owner,
                        "pipeline_id": pipeline_id,
                        "start": start,
                        "end": end,
                    }


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield sqlite_settings(tmp_path)
        return
    schema = f"pipeline_test_{uuid.uuid4().hex[:10]}"
    yield postgres_settings("pipeline", schema, tmp_path)
    drop_schema(schema)


@pytest.fixture
def tables(settings: Settings) -> Iterator[ReadModel]:
    """Query tables over an empty store, fed aggregates by the test."""
    model = ReadModel(create_application(settings), settings)
    yield model
    model.close()
    model.side.app.close()


def record(tables: ReadModel, *aggregates: Opportunity | Pipeline) -> None:
    """Writes the aggregates' rows as the projection does for a batch of their events."""
    with tables.side.database.write() as tx:
        tables.projection.write(tx, aggregates)


def assert_same_figures(
    tables: ReadModel,
    deals: list[Opportunity],
    pipelines: list[Pipeline],
    rng: random.Random,
) -> None:
    infos = [deal_info(d) for d in deals]
    by_id: dict[str, PipelineInfo] = {str(p.id): pipeline_info(p) for p in pipelines}
    shapes = 0
    for shape in query_shapes(list(by_id), rng):
        assert tables.forecast(**shape) == forecast(infos, by_id, **shape), shape
        shapes += 1
    assert shapes > 300
    for info in by_id.values():
        assert tables.funnel(info.pipeline_id) == funnel(infos, info)
        assert tables.win_rate(pipeline_id=info.pipeline_id) == win_rate(
            infos, pipeline_id=info.pipeline_id
        )
    for owner in (None, *OWNERS):
        window = {"start": date(2026, 2, 1), "end": date(2026, 4, 30)}
        assert tables.win_rate(owner=owner, **window) == win_rate(infos, owner=owner, **window)


class Workload:
    """Random sales work on real aggregates, with a clock that only moves forward."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
        self.pipelines = [
            checked.define_pipeline("Direct", DIRECT),
            checked.define_pipeline("Renewals", RENEWALS),
        ]
        self.deals: list[Opportunity] = []
        self.added = 0

    def step(self) -> Opportunity | Pipeline | None:
        """One command; returns the deal or pipeline it changed, if it changed one."""
        rng = self.rng
        self.now += timedelta(hours=rng.randrange(1, 7))
        roll = rng.random()
        try:
            if not self.deals or roll < 0.2:
                return self._open()
            if roll < 0.95:
                return self._work(rng.choice(self.deals))
            pipeline = rng.choice(self.pipelines)
            self._change_pipeline(pipeline)
            return pipeline
        except CrmError:
            pass  # refused: nothing changed
        return None

    def _open(self) -> Opportunity:
        rng = self.rng
        pipeline = rng.choice(self.pipelines)
        currency = rng.choice(CURRENCIES)
        amount = rng.randrange(0, 10**7)
        deal = checked.open_deal(
            pipeline=pipeline,
            name="deal",
            customer_id=f"customer-{rng.randrange(50)}",
            owner=rng.choice(OWNERS),
            amount=str(amount) if currency == "JPY" else f"{amount // 100}.{amount % 100:02d}",
            currency=currency,
            expected_close_date=self.now.date() + timedelta(days=rng.randrange(0, 150)),
            at=self.now,
            stage_id=rng.choice([s for s in pipeline.order if pipeline.stages[s].is_open] + [""]),
        )
        self.deals.append(deal)
        return deal

    def _work(self, deal: Opportunity) -> Opportunity:
        rng = self.rng
        pipeline = next(p for p in self.pipelines if str(p.id) == deal.pipeline_id)
        open_stages = [s for s in pipeline.order if pipeline.stages[s].is_open]
        action = rng.choice(["move", "move", "move", "amount", "date", "owner", "win", "lose"])
        if deal.is_closed:
            deal.reopen(pipeline, self.now, rng.choice([*open_stages, ""]))
        elif action == "move":
            deal.change_stage(pipeline, rng.choice(open_stages), self.now)
        elif action == "amount":
            digits = {"JPY": 0}.get(deal.amount.currency, 2)
            value = rng.randrange(0, 10**7)
            checked.change_amount(
                deal,
                str(value) if digits == 0 else f"{value // 100}.{value % 100:02d}",
                deal.amount.currency,
                self.now,
            )
        elif action == "date":
            deal.change_expected_close_date(
                deal.opened_at.date() + timedelta(days=rng.randrange(0, 200)), self.now
            )
        elif action == "owner":
            checked.reassign(deal, rng.choice(OWNERS), self.now)
        elif action == "win":
            deal.win(pipeline, self.now)
        else:
            checked.lose(deal, pipeline, "price", self.now)
        return deal

    def _change_pipeline(self, pipeline: Pipeline) -> None:
        rng = self.rng
        open_stages = [s for s in pipeline.order if pipeline.stages[s].is_open]
        action = rng.choice(["weight", "weight", "reorder", "add", "retire"])
        if action == "weight":
            checked.change_stage_settings(
                pipeline,
                rng.choice(open_stages),
                str(rng.randrange(0, 101)),
                rng.choice(OPEN_CATEGORIES),
            )
        elif action == "reorder":
            order = list(pipeline.order)
            rng.shuffle(order)
            pipeline.reorder_stages(order)
        elif action == "add":
            self.added += 1
            checked.add_stage(
                pipeline,
                StageInput(f"extra-{self.added}", "Extra", "25", rng.choice(OPEN_CATEGORIES)),
                rng.randrange(0, len(pipeline.order) + 1),
            )
        else:
            pipeline.retire_stage(rng.choice(open_stages))


@pytest.mark.parametrize("seed", [1, 20260301])
def test_the_tables_give_the_figures_of_every_deal_through_a_random_workload(
    tables: ReadModel, seed: int
) -> None:
    work = Workload(seed)
    record(tables, *work.pipelines)
    checkpoints = 0
    for step in range(1, 1201):
        changed = work.step()
        if changed is not None:
            record(tables, changed)
        if step % 300 == 0:
            assert_same_figures(tables, work.deals, work.pipelines, work.rng)
            checkpoints += 1
    assert checkpoints == 4
    # The workload reached the states that matter: every kind of deal, changed pipelines.
    statuses = {d.status for d in work.deals}
    assert statuses == {"open", "won", "lost"}
    assert any(d.reopen_count for d in work.deals)
    assert any(v.regression for d in work.deals for v in d.history)
    assert any(p.version > 1 for p in work.pipelines)


def test_recording_a_deal_again_replaces_what_it_counted(tables: ReadModel) -> None:
    pipeline = checked.define_pipeline("Direct", DIRECT)
    at = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    deal = checked.open_deal(
        pipeline=pipeline,
        name="Fleet",
        customer_id="c",
        owner="ann",
        amount="1000",
        currency="EUR",
        expected_close_date=date(2026, 3, 31),
        at=at,
    )
    record(tables, pipeline)
    for _ in range(3):  # recording the same state again counts it once
        record(tables, deal)
    [row] = tables.forecast()
    assert (row.period, row.category, row.deals, str(row.amount)) == (
        "2026-03",
        "pipeline",
        1,
        "1000.00",
    )
    deal.change_stage(pipeline, "negotiate", at + timedelta(days=2))
    checked.reassign(deal, "bob", at + timedelta(days=3))
    deal.win(pipeline, at + timedelta(days=40))
    record(tables, deal)
    # Nothing left of the open deal in March: one won deal in February, bob's.
    [row] = tables.forecast()
    assert (row.period, row.owner, row.category, row.deals, str(row.weighted_amount)) == (
        "2026-02",
        "bob",
        "closed_won",
        1,
        "1000.00",
    )
    result = tables.funnel(str(pipeline.id))
    assert result is not None
    assert result.deals == 1
    assert [(s.stage_id, s.entered) for s in result.stages] == [
        ("qualify", 1),
        ("propose", 0),
        ("negotiate", 1),
        ("won", 1),
        ("lost", 0),
    ]
    assert result.stages[0].average_time_in_stage == timedelta(days=2)


def test_the_tables_refuse_what_forecast_refuses(tables: ReadModel) -> None:
    with pytest.raises(ValidationFailed) as caught:
        tables.forecast(period="week")
    assert caught.value.errors[0].field == "period"
    with pytest.raises(ValidationFailed) as caught:
        tables.forecast(start=date(2026, 3, 2), end=date(2026, 3, 1))
    assert caught.value.errors[0].field == "end"


# -- through the service, over a real store ------------------------------------------------------


def ctx(command: str) -> Caller:
    return Caller(actor="ann", client="test")


async def test_the_service_answers_from_the_tables_what_every_deal_gives(
    settings: Settings,
) -> None:
    clock = Clock()
    service = PipelineService(create_application(settings), clock=clock)
    rng = random.Random(5)
    try:
        pipeline_id = (
            await service.define_pipeline(ctx("DefinePipeline"), "Direct", DIRECT)
        ).outcome.id
        deal_ids: list[str] = []
        for step in range(1, 241):
            clock.advance(hours=rng.randrange(1, 20))
            roll = rng.random()
            try:
                if not deal_ids or roll < 0.3:
                    written = await service.open_opportunity(
                        ctx("OpenOpportunity"),
                        NewOpportunity(
                            pipeline_id=pipeline_id,
                            name="deal",
                            customer_id="c",
                            owner=rng.choice(OWNERS),
                            amount=f"{rng.randrange(0, 10**6)}.{rng.randrange(100):02d}",
                            currency=rng.choice(["EUR", "USD"]),
                            expected_close_date=clock.now.date()
                            + timedelta(days=rng.randrange(0, 90)),
                        ),
                    )
                    deal_ids.append(written.outcome.id)
                elif roll < 0.75:
                    await service.move_opportunity(
                        ctx("MoveOpportunity"),
                        rng.choice(deal_ids),
                        rng.choice(["qualify", "propose", "negotiate"]),
                    )
                elif roll < 0.85:
                    await service.win_opportunity(ctx("WinOpportunity"), rng.choice(deal_ids))
                elif roll < 0.9:
                    await service.reopen_opportunity(ctx("ReopenOpportunity"), rng.choice(deal_ids))
                elif roll < 0.95:
                    await service.change_amount(
                        ctx("ChangeAmount"), rng.choice(deal_ids), f"{rng.randrange(10**5)}", "EUR"
                    )
                else:
                    await service.change_stage_settings(
                        ctx("ChangeStageSettings"),
                        pipeline_id,
                        rng.choice(["qualify", "propose", "negotiate"]),
                        str(rng.randrange(101)),
                        rng.choice(OPEN_CATEGORIES),
                    )
            except CrmError:
                pass
            if step % 60 == 0:
                # Each query catches up first, then answers from the tables; the
                # figures to expect come from every deal loaded from the store.
                deals = [deal_info(service.load(i, Opportunity)) for i in deal_ids]
                pipelines = {pipeline_id: pipeline_info(service.load(pipeline_id, Pipeline))}
                for period in ("month", "quarter"):
                    for owner in ("", "ann"):
                        got = await service.get_forecast(ForecastQuery(period=period, owner=owner))
                        want = forecast(deals, pipelines, period=period, owner=owner or None)
                        assert got == want
                    cut = await service.get_forecast(
                        ForecastQuery(period=period, start="2026-02-10", end="2026-04-20")
                    )
                    assert cut == forecast(
                        deals,
                        pipelines,
                        period=period,
                        start=date(2026, 2, 10),
                        end=date(2026, 4, 20),
                    )
                assert await service.get_funnel(pipeline_id) == funnel(
                    deals, pipelines[pipeline_id]
                )
        followed = (
            await service.get_forecast(ForecastQuery(period="quarter")),
            await service.get_funnel(pipeline_id),
        )
    finally:
        service.close()
    # A service started anew over the store answers as the one that followed it.
    rebuilt = PipelineService(create_application(settings), clock=clock)
    try:
        assert followed == (
            await rebuilt.get_forecast(ForecastQuery(period="quarter")),
            await rebuilt.get_funnel(pipeline_id),
        )
        assert followed[1].deals == len(deal_ids) > 40
    finally:
        rebuilt.close()
