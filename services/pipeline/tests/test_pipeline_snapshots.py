"""Snapshots of opportunities and pipelines, on SQLite and PostgreSQL.

A deal's stage moves, amounts, line items, close dates and owners are its
events; every `CRM_SNAPSHOT_INTERVAL` events the store keeps a snapshot, a
load reads only the events after it, and what it loads is the deal a full
replay builds, field for field (money, line items, stage history included).
The API answers the same with and without snapshots, the notification log
(what the relay publishes) holds events only, and a store written before
snapshots existed still loads.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from pipeline_support import STAGES, Clock, sqlite_settings

from crm_common.commands import Caller
from crm_common.settings import Settings
from crm_deploy.testing import (
    assert_loads_from_snapshot,
    assert_log_holds_events_only,
    drop_schema,
    postgres_settings,
)
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.inputs import LineItemInput, NewOpportunity

ANN = Caller(actor="ann", client="tests")
INTERVAL = 10


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield sqlite_settings(tmp_path)
        return
    schema = f"pipeline_test_{uuid.uuid4().hex[:10]}"
    yield postgres_settings("pipeline", schema, tmp_path)
    drop_schema(schema)


async def busy_deal(service: PipelineService, clock: Clock) -> tuple[str, str]:
    pipeline_id = (await service.define_pipeline(ANN, "Direct sales", STAGES)).outcome.id
    new = NewOpportunity(
        pipeline_id=pipeline_id,
        name="Fleet renewal",
        customer_id="company-1",
        owner="ann",
        amount="12000",
        currency="EUR",
        expected_close_date="2026-03-31",
    )
    deal_id = (await service.open_opportunity(ANN, new)).outcome.id
    for i in range(5):
        clock.advance(days=1)
        await service.move_opportunity(ANN, deal_id, ("propose", "negotiate")[i % 2])
        await service.change_amount(ANN, deal_id, f"{12000 + i}.50", "EUR")
        await service.reassign_opportunity(ANN, deal_id, ("bob", "ann")[i % 2])
        await service.change_expected_close_date(ANN, deal_id, f"2026-04-{10 + i}")
    await service.set_line_items(
        ANN,
        deal_id,
        [LineItemInput("sku-1", "Seat", "3", "19.995", "10"), LineItemInput("sku-2", "Kit", 1, 5)],
    )
    return pipeline_id, deal_id


async def test_opportunities_load_from_snapshots(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    clock = Clock()
    service = PipelineService(create_application(settings), None, clock=clock)
    try:
        pipeline_id, deal_id = await busy_deal(service, clock)
        deal = assert_loads_from_snapshot(service.app, UUID(deal_id), monkeypatch, INTERVAL)
        assert deal.version > 2 * INTERVAL
        view = await service.get_opportunity(deal_id)
        for i in range(INTERVAL + 2):
            await service.rename_stage(ANN, pipeline_id, "propose", f"Propose ({i})")
        pipeline = assert_loads_from_snapshot(service.app, UUID(pipeline_id), monkeypatch, INTERVAL)
        assert pipeline.stages["propose"].name == f"Propose ({INTERVAL + 1})"
        pipeline_view = await service.get_pipeline(pipeline_id)
        pipeline_version = service.app.repository.get(UUID(pipeline_id)).version
        assert_log_holds_events_only(service.app, deal.version + pipeline_version)
    finally:
        service.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    plain = PipelineService(create_application(settings), None, clock=clock)
    try:
        assert plain.app.snapshots is None
        assert await plain.get_opportunity(deal_id) == view
        assert await plain.get_pipeline(pipeline_id) == pipeline_view
    finally:
        plain.close()


async def test_a_store_written_without_snapshots_still_loads(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    clock = Clock()
    before = PipelineService(create_application(settings), None, clock=clock)
    try:
        _, deal_id = await busy_deal(before, clock)
        view = await before.get_opportunity(deal_id)
    finally:
        before.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    after = PipelineService(create_application(settings), None, clock=clock)
    try:
        assert after.app.snapshots is not None
        assert list(after.app.snapshots.get(UUID(deal_id))) == []
        assert await after.get_opportunity(deal_id) == view
        for i in range(INTERVAL):
            await after.reassign_opportunity(ANN, deal_id, f"owner-{i}")
        deal = assert_loads_from_snapshot(after.app, UUID(deal_id), monkeypatch, INTERVAL)
        assert deal.owner == f"owner-{INTERVAL - 1}"
    finally:
        after.close()
