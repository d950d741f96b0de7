"""A service started anew over a large store answers at once, from its tables.

The query side lives in the store (SQLite file or PostgreSQL schema), not in
the process: a new service over a store of thousands of deals, leads and
activities gives the same lists and reports as the one that built the
tables, without applying a single event of the log, and holds none of the
records in memory (the projection's aggregate cache is empty, and stays
within its bound while later writes are applied).
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
from pipeline_support import STAGES, sqlite_settings

from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings
from crm_pipeline.application import PipelineApplication, PipelineService, create_application
from crm_pipeline.domain import Opportunity, Pipeline
from crm_pipeline.forecast import forecast
from crm_pipeline.inputs import ForecastQuery, OpportunityQuery, WinRateQuery
from crm_pipeline.read_model import deal_info, pipeline_info

DEALS = 3000
LEADS = 500
ACTIVITIES = 1000
OWNERS = ["ann", "bob", "chen", "dana", "eve"]
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield sqlite_settings(tmp_path)
        return
    schema = f"pipeline_test_{uuid.uuid4().hex[:10]}"
    yield postgres_settings("pipeline", schema, tmp_path)
    drop_schema(schema)


def fill(app: PipelineApplication, rng: random.Random) -> tuple[Pipeline, list[Opportunity]]:
    """A pipeline, deals opened, moved, won and lost, leads, and their activities."""
    pipeline = checked.define_pipeline("Direct sales", STAGES)
    app.save(pipeline)
    deals: list[Opportunity] = []
    pending: list[Any] = []
    for i in range(DEALS):
        at = START + timedelta(hours=i)
        deal = checked.open_deal(
            pipeline=pipeline,
            name=f"deal {i}",
            customer_id=f"customer-{i % 400}",
            owner=rng.choice(OWNERS),
            amount=f"{rng.randrange(10**7) // 100}.{rng.randrange(100):02d}",
            currency=rng.choice(["EUR", "EUR", "USD"]),
            expected_close_date=at.date() + timedelta(days=rng.randrange(1, 200)),
            at=at,
        )
        later = at + timedelta(days=rng.randrange(1, 20))
        roll = rng.random()
        if roll < 0.5:
            deal.change_stage(pipeline, rng.choice(["propose", "negotiate"]), later)
        if roll < 0.2:
            deal.win(pipeline, later + timedelta(days=1))
        elif roll < 0.3:
            checked.lose(deal, pipeline, "price", later + timedelta(days=1))
        deals.append(deal)
        pending.append(deal)
        if i < ACTIVITIES:
            pending.append(
                checked.schedule_activity(
                    subject=deal,
                    at=at,
                    kind="task",
                    title=f"call {i}",
                    owner=deal.owner,
                    due_at=at + timedelta(days=rng.randrange(1, 300)),
                )
            )
        if i < LEADS:
            pending.append(
                checked.create_lead(
                    at=at,
                    family_name=f"Lead {i}",
                    email=f"l{i}@example.com",
                    source="web",
                    owner="ann",
                )
            )
        if len(pending) >= 300:
            app.save(*pending)
            pending = []
    app.save(*pending)
    return pipeline, deals


def answers(service: PipelineService, pipeline_id: str) -> Any:
    """Every list and report the service gives, as plain values."""

    async def gather() -> Any:
        pages = []
        query = OpportunityQuery(owner="bob", page_size=200)
        while True:
            page = await service.list_opportunities(query)
            pages.append(([d.id for d in page.opportunities], page.total_size))
            if not page.next_page_token:
                break
            query = OpportunityQuery(owner="bob", page_size=200, page_token=page.next_page_token)
        won = await service.list_opportunities(OpportunityQuery(status="won", page_size=7))
        return (
            await service.list_pipelines(),
            pages,
            [d.id for d in won.opportunities],
            won.total_size,
            await service.get_forecast(ForecastQuery(period="month")),
            await service.get_forecast(ForecastQuery(period="quarter", owner="ann")),
            await service.get_funnel(pipeline_id),
            await service.get_win_rate(WinRateQuery(pipeline_id=pipeline_id)),
            await service.overdue_follow_ups(),
        )

    return gather()


async def test_a_new_service_answers_from_the_stored_tables_without_reading_the_log(
    settings: Settings,
) -> None:
    rng = random.Random(15)
    first = PipelineService(create_application(settings), clock=lambda: NOW, query_cache=200)
    try:
        pipeline, deals = fill(first.app, rng)
        before = await answers(first, str(pipeline.id))
        # Building the tables kept no more aggregates than the cache's bound.
        assert first.read_model.side.applied > DEALS
        assert len(first.read_model.projection._cache) <= 200
    finally:
        first.close()
    pages, won_total, funnel, overdue = before[1], before[3], before[6], before[8]
    # The store is as large as meant, and the answers are the figures of every deal.
    assert sum(len(ids) for ids, _ in pages) == pages[0][1] > DEALS // 10
    assert funnel.deals == DEALS
    assert won_total > 0
    assert sum(len(items) for items in overdue.values()) > 100
    infos = [deal_info(d) for d in deals]
    assert before[4] == forecast(infos, {str(pipeline.id): pipeline_info(pipeline)})

    app = create_application(settings)
    log_end = app.recorder.max_notification_id()  # type: ignore[attr-defined]
    second = PipelineService(app, clock=lambda: NOW, query_cache=50)
    try:
        # Ready before any query: the tables are at the end of the log.
        assert second.read_model.side.position() == log_end
        assert await answers(second, str(pipeline.id)) == before
        assert second.read_model.side.applied == 0
        assert len(second.read_model.projection._cache) == 0

        # Later writes are applied as they come, within the cache's bound.
        more = [
            checked.open_deal(
                pipeline=pipeline,
                name=f"late {i}",
                customer_id="late",
                owner="zoe",
                amount="100",
                currency="EUR",
                expected_close_date=date(2026, 7, 1),
                at=NOW,
            )
            for i in range(120)
        ]
        second.app.save(*more)
        rows = await second.get_forecast(ForecastQuery(owner="zoe"))
        assert [(r.period, r.deals, str(r.amount)) for r in rows] == [("2026-07", 120, "12000.00")]
        assert second.read_model.side.applied == 120
        assert len(second.read_model.projection._cache) <= 50
    finally:
        second.close()
