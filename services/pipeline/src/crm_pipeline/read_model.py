"""The service's own query side: its aggregates, followed from its event log.

Lists, forecasts, funnels and overdue follow-ups need every deal, not one.
The service keeps them in memory by following its own notification log (the
same log the relay publishes): each query first catches up from the last
position it applied, so a client sees its own committed writes. Replaying the
log through the aggregates' own `mutate` means the query side can never
disagree with the write side about what an event means. This is a per-process
cache, rebuilt from the event store on start; the cross-service pipeline read
models (analytics) are built from the Kafka topic instead.

The forecast and the funnel are asked for often and span every deal, so the
read model also keeps their sums up to date as it applies events
(`ForecastIndex`, `FunnelIndex`): a query adds up a few sums per month,
owner and stage instead of visiting each deal.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import CanInitAggregate

from crm_pipeline.domain import Activity, Lead, Opportunity, Pipeline
from crm_pipeline.forecast import (
    ActivityInfo,
    DealInfo,
    ForecastEntry,
    ForecastIndex,
    ForecastRow,
    Funnel,
    FunnelEntry,
    FunnelIndex,
    PipelineInfo,
    StageInfo,
    VisitInfo,
)

KNOWN = (Lead, Pipeline, Opportunity, Activity)


class LocalReadModel:
    def __init__(self, app: Application[UUID], batch: int = 1000) -> None:
        self.app = app
        self.batch = batch
        self.position = 0
        self.aggregates: dict[UUID, Any] = {}
        # The pipelines again, by id: queries need them, not the deals around them.
        self._pipelines: dict[str, Pipeline] = {}
        self.forecast_index = ForecastIndex()
        self.funnel_index = FunnelIndex()
        self._lock = threading.Lock()

    def catch_up(self) -> int:
        """Applies every event stored after the last applied position."""
        with self._lock:
            recorder: Any = self.app.recorder
            # Deals changed by the events applied: indexed once each, after
            # the events (a deal opened and moved in one batch costs one update).
            changed: dict[UUID, Opportunity] = {}
            try:
                while True:
                    notifications = recorder.select_notifications(self.position + 1, self.batch)
                    if not notifications:
                        return self.position
                    for n in notifications:
                        event: Any = self.app.mapper.to_domain_event(n)
                        if isinstance(event, CanInitAggregate):
                            aggregate = event.mutate(None)
                            if isinstance(aggregate, KNOWN):
                                self.aggregates[aggregate.id] = aggregate
                            if isinstance(aggregate, Pipeline):
                                self._pipelines[str(aggregate.id)] = aggregate
                        else:
                            aggregate = self.aggregates.get(event.originator_id)
                            if aggregate is not None:
                                event.mutate(aggregate)
                        if isinstance(aggregate, Opportunity):
                            changed[aggregate.id] = aggregate
                        self.position = n.id
            finally:
                for deal in changed.values():
                    self._index(deal)

    def _index(self, deal: Opportunity) -> None:
        ident = str(deal.id)
        day = deal.expected_close_date
        if deal.status != "open" and deal.closed_on is not None:
            day = deal.closed_on
        self.forecast_index.put(
            ident,
            ForecastEntry(
                deal.pipeline_id,
                deal.stage_id,
                deal.owner,
                deal.amount.currency,
                day,
                deal.amount.amount,
            ),
        )
        self.funnel_index.put(
            ident,
            FunnelEntry(
                deal.pipeline_id,
                deal.amount.currency,
                deal.amount.amount,
                deal.history,
            ),
        )

    def pipeline_infos(self) -> dict[str, PipelineInfo]:
        """Every pipeline as the queries see it; call with the lock held."""
        return {ident: pipeline_info(p) for ident, p in self._pipelines.items()}

    def forecast(self, **filters: Any) -> list[ForecastRow]:
        """`forecast()` over every deal, from the index (see `ForecastIndex.rows`)."""
        self.catch_up()
        with self._lock:
            return self.forecast_index.rows(self.pipeline_infos(), **filters)

    def funnel(self, pipeline_id: str) -> Funnel | None:
        """`funnel()` of one pipeline from the index; None for an unknown pipeline."""
        self.catch_up()
        with self._lock:
            pipeline = self._pipelines.get(pipeline_id)
            if pipeline is None:
                return None
            return self.funnel_index.funnel(pipeline_info(pipeline))

    def snapshot(self) -> tuple[list[DealInfo], dict[str, PipelineInfo], list[ActivityInfo]]:
        """Plain copies of the current state, safe to use outside the lock."""
        self.catch_up()
        with self._lock:
            deals = [deal_info(a) for a in self.aggregates.values() if isinstance(a, Opportunity)]
            pipelines = self.pipeline_infos()
            activities = [
                activity_info(a) for a in self.aggregates.values() if isinstance(a, Activity)
            ]
        return deals, pipelines, activities

    @contextmanager
    def locked(self) -> Iterator[Iterable[Any]]:
        """Every aggregate, caught up, for reading while the lock is held (copy what you keep)."""
        self.catch_up()
        with self._lock:
            yield self.aggregates.values()

    def pipelines(self) -> list[Pipeline]:
        self.catch_up()
        with self._lock:
            return [copy.deepcopy(p) for p in self._pipelines.values()]


def pipeline_info(pipeline: Pipeline) -> PipelineInfo:
    retired = [s for s in pipeline.stages.values() if s.retired]
    ordered = [pipeline.stages[s] for s in pipeline.order] + retired
    return PipelineInfo(
        str(pipeline.id),
        pipeline.name,
        tuple(StageInfo(s.stage_id, s.name, s.probability, s.category, s.retired) for s in ordered),
    )


def deal_info(deal: Opportunity) -> DealInfo:
    return DealInfo(
        deal_id=str(deal.id),
        pipeline_id=deal.pipeline_id,
        stage_id=deal.stage_id,
        owner=deal.owner,
        amount=deal.amount.amount,
        currency=deal.amount.currency,
        expected_close_date=deal.expected_close_date,
        status=deal.status,
        opened_at=deal.opened_at,
        closed_at=deal.closed_at,
        closed_on=deal.closed_on,
        customer_id=deal.customer_id,
        name=deal.name,
        history=tuple(
            VisitInfo(v.stage_id, v.entered_at, v.left_at, v.regression) for v in deal.history
        ),
    )


def activity_info(activity: Activity) -> ActivityInfo:
    return ActivityInfo(
        activity_id=str(activity.id),
        subject_kind=activity.subject_kind,
        subject_id=activity.subject_id,
        kind=activity.kind,
        title=activity.title,
        owner=activity.owner,
        due_at=activity.due_at,
        status=activity.status,
    )
