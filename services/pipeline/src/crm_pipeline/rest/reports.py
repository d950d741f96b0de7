"""Reports over every deal: forecast, funnel, win rate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from crm_pipeline.inputs import ForecastQuery, WinRateQuery
from crm_pipeline.rest.models import (
    QUERY,
    READ,
    ForecastModel,
    ForecastRowModel,
    FunnelModel,
    WinRateModel,
)
from crm_pipeline.rest.service import Service

router = APIRouter(tags=["reports"])


@router.get(
    "/forecast",
    response_model=ForecastModel,
    responses=QUERY,
    summary="Weighted and unweighted forecast",
    operation_id="GetForecast",
)
async def get_forecast(
    service: Service,
    period: Annotated[str, Query(description="month or quarter")] = "month",
    start: Annotated[str, Query(description="YYYY-MM-DD, inclusive")] = "",
    end: Annotated[str, Query(description="YYYY-MM-DD, inclusive")] = "",
    owner: str = "",
    pipeline_id: str = "",
) -> ForecastModel:
    rows = await service.get_forecast(
        ForecastQuery(
            period=period or None, start=start, end=end, owner=owner, pipeline_id=pipeline_id
        )
    )
    return ForecastModel(rows=[ForecastRowModel.of(r) for r in rows])


@router.get(
    "/pipelines/{pipeline_id}/funnel",
    response_model=FunnelModel,
    responses=READ,
    summary="Conversion funnel",
    operation_id="GetFunnel",
)
async def get_funnel(pipeline_id: str, service: Service) -> FunnelModel:
    return FunnelModel.of(await service.get_funnel(pipeline_id))


@router.get(
    "/win-rate",
    response_model=WinRateModel,
    responses=QUERY,
    summary="Win rate and average cycle length",
    operation_id="GetWinRate",
)
async def get_win_rate(
    service: Service, pipeline_id: str = "", owner: str = "", start: str = "", end: str = ""
) -> WinRateModel:
    result = await service.get_win_rate(
        WinRateQuery(pipeline_id=pipeline_id, owner=owner, start=start, end=end)
    )
    return WinRateModel.of(result)
