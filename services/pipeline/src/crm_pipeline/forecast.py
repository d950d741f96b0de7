"""Forecast, funnel, win rate and overdue follow-ups: pure functions.

They work on a plain read-side representation of deals, pipelines and
activities (the dataclasses below), not on aggregates, so that the same
figures can be computed from the service's own event store, from a read model
in a document store, or from a hand-written data set in a test. They are the
definition: the service answers from its query tables (`read_model.py`, sums
kept in SQL), and the tests hold those answers to these functions.

Definitions:

- Forecast rows group deals by period (month "2026-03" or quarter
  "2026-Q1"), owner, forecast category and currency (amounts of different
  currencies are never added up). An open deal falls in the period of its
  expected close date, a closed deal in the period of its close date. The
  weighted amount uses the probability its stage has *at the time of the
  query*, so re-weighting a stage re-weights the forecast. Sums are exact;
  each row's weighted amount is rounded half-even to the minor unit once.
- The funnel lists the pipeline's active stages in their current order,
  then its retired stages. For each stage: `entered` counts distinct deals
  that were ever in the stage, `entries` counts every entry (a deal moved
  back and forth enters again), `regressions` the entries made by moving a
  deal back to an earlier stage (or reopening it), `amounts` sums the
  current amounts of the distinct deals that entered (per currency).
  `advanced` counts the deals that, after first entering the stage, later
  entered an open stage further along the current order or a closed-won
  stage; `conversion` is advanced / entered. The average time in stage is
  over completed stays only (a deal still sitting in a stage has not
  finished its time there).
- Win rate is won / (won + lost) over closed deals; the cycle length of a
  closed deal runs from its opening to its closing time, averaged over won
  deals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

from crm_common.errors import ValidationFailed
from crm_common.money import round_money
from crm_pipeline.domain import OPEN_CATEGORIES


@dataclass(frozen=True)
class StageInfo:
    stage_id: str
    name: str
    probability: Decimal
    category: str
    retired: bool = False

    @property
    def is_open(self) -> bool:
        return self.category in OPEN_CATEGORIES


@dataclass(frozen=True)
class PipelineInfo:
    pipeline_id: str
    name: str
    # Active stages in their order, then retired stages.
    stages: tuple[StageInfo, ...]

    def stage(self, stage_id: str) -> StageInfo:
        for s in self.stages:
            if s.stage_id == stage_id:
                return s
        raise KeyError(stage_id)

    def active_position(self, stage_id: str) -> int | None:
        active = [s.stage_id for s in self.stages if not s.retired]
        return active.index(stage_id) if stage_id in active else None


@dataclass(frozen=True)
class VisitInfo:
    stage_id: str
    entered_at: datetime
    left_at: datetime | None
    regression: bool = False


@dataclass(frozen=True)
class DealInfo:
    deal_id: str
    pipeline_id: str
    stage_id: str
    owner: str
    amount: Decimal
    currency: str
    expected_close_date: date
    status: str  # open, won, lost
    opened_at: datetime
    closed_at: datetime | None = None
    closed_on: date | None = None
    customer_id: str = ""
    name: str = ""
    history: tuple[VisitInfo, ...] = ()


@dataclass(frozen=True)
class ActivityInfo:
    activity_id: str
    subject_kind: str
    subject_id: str
    kind: str
    title: str
    owner: str
    due_at: datetime
    status: str  # open, completed, cancelled


# -- forecast -------------------------------------------------------------------------


PERIODS = ("month", "quarter")


def period_of(day: date, period: str) -> str:
    if period == "month":
        return f"{day.year:04d}-{day.month:02d}"
    if period == "quarter":
        return f"{day.year:04d}-Q{(day.month - 1) // 3 + 1}"
    raise ValidationFailed.of("period", f"must be one of {', '.join(PERIODS)}")


@dataclass(frozen=True)
class ForecastRow:
    period: str
    owner: str
    category: str
    currency: str
    deals: int
    amount: Decimal
    weighted_amount: Decimal


def forecast(
    deals: Iterable[DealInfo],
    pipelines: dict[str, PipelineInfo],
    *,
    period: str = "month",
    start: date | None = None,
    end: date | None = None,
    owner: str | None = None,
    pipeline_id: str | None = None,
) -> list[ForecastRow]:
    """Rows sorted by period, owner, category, currency; `start`/`end` inclusive."""
    if period not in PERIODS:
        raise ValidationFailed.of("period", f"must be one of {', '.join(PERIODS)}")
    if start and end and end < start:
        raise ValidationFailed.of("end", "is before start")
    groups: dict[tuple[str, str, str, str], list[Decimal]] = defaultdict(
        lambda: [Decimal(0), Decimal(0), Decimal(0)]
    )
    for deal in deals:
        if owner is not None and deal.owner != owner:
            continue
        if pipeline_id is not None and deal.pipeline_id != pipeline_id:
            continue
        day = (
            deal.closed_on if deal.status != "open" and deal.closed_on else deal.expected_close_date
        )
        if (start and day < start) or (end and day > end):
            continue
        stage = pipelines[deal.pipeline_id].stage(deal.stage_id)
        key = (period_of(day, period), deal.owner, stage.category, deal.currency)
        row = groups[key]
        row[0] += 1
        row[1] += deal.amount
        row[2] += deal.amount * stage.probability / 100
    return [
        ForecastRow(p, o, c, cur, int(v[0]), v[1], round_money(v[2], cur))
        for (p, o, c, cur), v in sorted(groups.items())
    ]


# -- funnel ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FunnelStage:
    stage_id: str
    name: str
    category: str
    retired: bool
    entered: int
    entries: int
    regressions: int
    advanced: int | None
    conversion: Decimal | None
    amounts: dict[str, Decimal] = field(default_factory=dict)
    average_time_in_stage: timedelta | None = None


@dataclass(frozen=True)
class Funnel:
    pipeline_id: str
    deals: int
    stages: tuple[FunnelStage, ...]


def ratio(part: int, whole: int) -> Decimal | None:
    if whole == 0:
        return None
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"))


def funnel(deals: Iterable[DealInfo], pipeline: PipelineInfo) -> Funnel:
    mine = [d for d in deals if d.pipeline_id == pipeline.pipeline_id]
    rows = []
    for stage in pipeline.stages:
        entered = 0
        entries = 0
        regressions = 0
        advanced = 0
        amounts: dict[str, Decimal] = defaultdict(Decimal)
        stays: list[timedelta] = []
        here = pipeline.active_position(stage.stage_id)
        for deal in mine:
            visits = [(i, v) for i, v in enumerate(deal.history) if v.stage_id == stage.stage_id]
            if not visits:
                continue
            entered += 1
            entries += len(visits)
            regressions += sum(1 for _, v in visits if v.regression)
            amounts[deal.currency] += deal.amount
            stays.extend(v.left_at - v.entered_at for _, v in visits if v.left_at is not None)
            first = visits[0][0]
            if stage.is_open and any(
                is_further(pipeline, here, later.stage_id) for later in deal.history[first + 1 :]
            ):
                advanced += 1
        average = sum(stays, timedelta()) / len(stays) if stays else None
        rows.append(
            FunnelStage(
                stage_id=stage.stage_id,
                name=stage.name,
                category=stage.category,
                retired=stage.retired,
                entered=entered,
                entries=entries,
                regressions=regressions,
                advanced=advanced if stage.is_open else None,
                conversion=ratio(advanced, entered) if stage.is_open else None,
                amounts=dict(sorted(amounts.items())),
                average_time_in_stage=average,
            )
        )
    return Funnel(pipeline.pipeline_id, len(mine), tuple(rows))


def is_further(pipeline: PipelineInfo, here: int | None, stage_id: str) -> bool:
    target = pipeline.stage(stage_id)
    if target.category == "closed_won":
        return True
    if not target.is_open or here is None:
        return False
    there = pipeline.active_position(stage_id)
    return there is not None and there > here


# -- win rate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRate:
    won: int
    lost: int
    rate: Decimal | None
    won_amounts: dict[str, Decimal]
    average_cycle: timedelta | None


def win_rate(
    deals: Iterable[DealInfo],
    *,
    pipeline_id: str | None = None,
    owner: str | None = None,
    start: date | None = None,
    end: date | None = None,
) -> WinRate:
    """Over deals closed between `start` and `end` (inclusive, by close date)."""
    won = lost = 0
    amounts: dict[str, Decimal] = defaultdict(Decimal)
    cycles: list[timedelta] = []
    for deal in deals:
        if deal.status == "open" or deal.closed_on is None or deal.closed_at is None:
            continue
        if pipeline_id is not None and deal.pipeline_id != pipeline_id:
            continue
        if owner is not None and deal.owner != owner:
            continue
        if (start and deal.closed_on < start) or (end and deal.closed_on > end):
            continue
        if deal.status == "won":
            won += 1
            amounts[deal.currency] += deal.amount
            cycles.append(deal.closed_at - deal.opened_at)
        else:
            lost += 1
    average = sum(cycles, timedelta()) / len(cycles) if cycles else None
    return WinRate(won, lost, ratio(won, won + lost), dict(sorted(amounts.items())), average)


# -- overdue follow-ups -------------------------------------------------------------------


def overdue_follow_ups(
    activities: Iterable[ActivityInfo], now: datetime, owner: str | None = None
) -> dict[str, list[ActivityInfo]]:
    """Open activities due before `now`, per owner, most overdue first."""
    result: dict[str, list[ActivityInfo]] = defaultdict(list)
    for activity in activities:
        if activity.status != "open" or activity.due_at >= now:
            continue
        if owner is not None and activity.owner != owner:
            continue
        result[activity.owner].append(activity)
    return {
        o: sorted(items, key=lambda a: (a.due_at, a.activity_id))
        for o, items in sorted(result.items())
    }


# -- what one deal adds to a funnel, whatever the pipeline's order ----------------------------


class Visit(Protocol):
    """One stay in a stage: a `VisitInfo`, or the aggregate's own record of it."""

    @property
    def stage_id(self) -> str: ...

    @property
    def entered_at(self) -> datetime: ...

    @property
    def left_at(self) -> datetime | None: ...

    @property
    def regression(self) -> bool: ...


class StageShare(NamedTuple):
    """One deal's part in one stage's row."""

    stage_id: str
    entries: int
    regressions: int
    stays: timedelta
    completed: int
    # The stages the deal entered after it first entered this one: whether it
    # "advanced" depends on the pipeline's current order, known at query time.
    later: frozenset[str]


def stage_shares(history: Sequence[Visit]) -> tuple[StageShare, ...]:
    ids = [v.stage_id for v in history]
    # stage id -> [first visit, entries, regressions, completed stays' time, completed stays]
    parts: dict[str, list[Any]] = {}
    for i, visit in enumerate(history):
        part = parts.get(ids[i])
        if part is None:
            part = parts[ids[i]] = [i, 0, 0, timedelta(), 0]
        part[1] += 1
        if visit.regression:
            part[2] += 1
        if visit.left_at is not None:
            part[3] += visit.left_at - visit.entered_at
            part[4] += 1
    return tuple(
        StageShare(s, entries, regressions, stays, completed, frozenset(ids[first + 1 :]))
        for s, (first, entries, regressions, stays, completed) in parts.items()
    )
