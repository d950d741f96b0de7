"""The service's query side: tables in its own database, following its event log.

Lists, the board, forecasts, funnels, win rates and overdue follow-ups span
every deal, not one. They are answered by SQL over query tables kept in the
service's own database (its SQLite events file, or its PostgreSQL schema) by
`crm_common.querystore`: a tracked projection applies each stored event
exactly once, whichever replica gets to it, and a query first applies what
was stored since (usually nothing), so a client sees its own committed writes.
A process starts without reading the log again and holds no per-record state:
its memory does not grow with the number of deals.

`PipelineProjection` folds leads, pipelines, deals and activities with their
own `mutate` (so the tables never disagree with the write side about what an
event means) and writes one row per aggregate, plus running sums that keep
the big reports cheap whatever the number of deals:

- `query_forecast_days`: deals and amounts per close day, owner, pipeline,
  stage and currency; a forecast adds up the days of its range in SQL and
  weighs each stage's sum by the stage's probability *at query time*, so
  re-weighting a stage re-weights the forecast at once;
- `query_funnel_stages` / `query_funnel_amounts`: per stage, the deals that
  entered it, counted by the set of stages they entered afterwards (whether
  a deal "advanced" depends on the stages' current order, judged at query
  time), with entries, regressions and completed stays; and the amounts of
  the deals that entered it, per currency.

Lead and activity rows keep their customer's ids (customer, person,
company), so that the records held about a contact are found for an
erasure, a merge or an export (`ReadModel.held`). The only column holding
personal data is `query_activities.title`: `Activity.PersonalDataErased`
turns it to "[erased]" when the person is erased.

A deal's change first takes back what its previous row added to the sums,
then adds the new one. The figures equal those of the plain functions of
`crm_pipeline.forecast` over every deal (the tests compare them).

Money stays exact: an amount is kept as text and as an integer of its
currency's minor units, split into a high and a low part (`SPLIT`) so that
sums of any size stay within 64-bit integers on both stores. Times are epoch
microseconds (durations add up exactly), days ISO text (sortable).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.application import Application

from crm_common.errors import ValidationFailed
from crm_common.money import minor_units, round_money
from crm_common.querystore import (
    DEFAULT_AGGREGATE_CACHE,
    AggregateProjection,
    QueryDatabase,
    QuerySide,
    Tx,
)
from crm_common.settings import Settings
from crm_pipeline.domain import Activity, Lead, Opportunity, Pipeline
from crm_pipeline.forecast import (
    PERIODS,
    ActivityInfo,
    DealInfo,
    ForecastRow,
    Funnel,
    FunnelStage,
    PipelineInfo,
    StageInfo,
    VisitInfo,
    WinRate,
    is_further,
    period_of,
    ratio,
    stage_shares,
)

#: Amounts in minor units are kept as `high * SPLIT + low`.
SPLIT = 10**9
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def micros(at: datetime) -> int:
    """Epoch microseconds of an aware time: sortable, and differences are exact."""
    return (at - EPOCH) // MICROSECOND


def split_amount(amount: Decimal, currency: str) -> tuple[int, int]:
    """An amount as (high, low) integers of the currency's minor units."""
    units = amount.scaleb(minor_units(currency))
    if units != units.to_integral_value():
        raise ValueError(f"{amount} {currency} is not a whole number of minor units")
    return divmod(int(units), SPLIT)


def joined_amount(high: Any, low: Any, currency: str) -> Decimal:
    """The sum of amounts from the sums of their (high, low) parts, exact to the minor unit."""
    return Decimal(int(high) * SPLIT + int(low)).scaleb(-minor_units(currency))


def text_order(tx: Tx, column: str) -> str:
    """`column` compared byte by byte (as Python compares str), whatever the database's locale."""
    return f'{column} COLLATE "C"' if tx.dialect == "postgres" else column


TABLES = (
    "query_pipelines",
    "query_deals",
    "query_deal_stages",
    "query_forecast_days",
    "query_funnel_stages",
    "query_funnel_amounts",
    "query_leads",
    "query_activities",
)


class PipelineProjection(AggregateProjection):
    """Rows of leads, pipelines, deals and activities, and the report sums.

    The rows of a batch are written together (a few statements per table,
    not per aggregate), and the sums' changes are added up in the batch
    first, so a busy day's deals cost one update per sum they touch.
    """

    name = "pipeline"
    #: 2: leads and activities keep their customer's ids (erasures, merges, export).
    version = 2
    kinds = (Lead, Pipeline, Opportunity, Activity)
    tables = TABLES

    def __init__(self, app: Application[UUID], cache_size: int = DEFAULT_AGGREGATE_CACHE):
        super().__init__(app, cache_size)
        self._batch: list[Any] = []

    def create(self, tx: Tx) -> None:
        for sql in _schema(tx):
            tx.execute(sql)

    def apply(self, tx: Tx, events: Sequence[Any]) -> None:
        self._batch = []
        super().apply(tx, events)
        batch, self._batch = self._batch, []
        self.write(tx, batch)

    def project(self, tx: Tx, aggregate: Any) -> None:
        self._batch.append(aggregate)

    def write(self, tx: Tx, aggregates: Sequence[Any]) -> None:
        """Writes the rows of `aggregates`, each as it stands (one of each at most)."""
        pipelines = [a for a in aggregates if isinstance(a, Pipeline)]
        leads = [a for a in aggregates if isinstance(a, Lead)]
        activities = [a for a in aggregates if isinstance(a, Activity)]
        deals = [a for a in aggregates if isinstance(a, Opportunity)]
        tx.executemany(
            "INSERT INTO query_pipelines (pipeline_id, version, name, stages) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (pipeline_id) DO UPDATE SET version = excluded.version,"
            " name = excluded.name, stages = excluded.stages",
            [_pipeline_row(p) for p in pipelines],
        )
        tx.executemany(
            "INSERT INTO query_leads (lead_id, version, status, owner, partner_tag, created_us,"
            " customer_id, person_id, company_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (lead_id) DO UPDATE SET version = excluded.version,"
            " status = excluded.status, owner = excluded.owner,"
            " partner_tag = excluded.partner_tag, customer_id = excluded.customer_id,"
            " person_id = excluded.person_id, company_id = excluded.company_id",
            [_lead_row(lead) for lead in leads],
        )
        tx.executemany(
            "INSERT INTO query_activities (activity_id, version, subject_kind, subject_id,"
            " kind, title, owner, status, due_at, due_us, customer_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (activity_id)"
            " DO UPDATE SET version = excluded.version, title = excluded.title,"
            " owner = excluded.owner, status = excluded.status, due_at = excluded.due_at,"
            " due_us = excluded.due_us, customer_id = excluded.customer_id",
            [_activity_row(a) for a in activities],
        )
        if deals:
            self._deals(tx, deals)

    def _deals(self, tx: Tx, deals: Sequence[Opportunity]) -> None:
        sums = _Sums()
        idents = [str(d.id) for d in deals]
        for chunk in _chunks(idents):
            marks = tx.placeholders(len(chunk))
            olds = tx.all(
                "SELECT deal_id, pipeline_id, stage_id, owner, currency, amount_high,"
                f" amount_low, forecast_day FROM query_deals WHERE deal_id IN ({marks})",
                chunk,
            )
            old_by_id = {str(r[0]): r for r in olds}
            for ident, stage_id, later, entries, regressions, stay_us, completed in tx.all(
                "SELECT deal_id, stage_id, later, entries, regressions, stay_us, completed"
                f" FROM query_deal_stages WHERE deal_id IN ({marks})",
                chunk,
            ):
                _, pipeline_id, _, _, currency, high, low, _ = old_by_id[str(ident)]
                sums.share(
                    pipeline_id,
                    stage_id,
                    later,
                    (int(entries), int(regressions), int(stay_us), int(completed)),
                    currency,
                    (int(high), int(low)),
                    -1,
                )
            for _, pipeline_id, stage_id, owner, currency, high, low, day in olds:
                sums.forecast(
                    (day, owner, pipeline_id, stage_id, currency), (-1, -int(high), -int(low))
                )
            tx.execute(f"DELETE FROM query_deal_stages WHERE deal_id IN ({marks})", chunk)
            tx.execute(f"DELETE FROM query_deals WHERE deal_id IN ({marks})", chunk)
        rows = []
        stage_rows = []
        for deal in deals:
            row = _deal_row(deal)
            rows.append(row)
            ident, currency, high, low, day = row[0], row[9], row[11], row[12], row[15]
            sums.forecast(
                (day, deal.owner, deal.pipeline_id, deal.stage_id, currency), (1, high, low)
            )
            for share in stage_shares(deal.history):
                later = ",".join(sorted(share.later))
                counts = (
                    share.entries,
                    share.regressions,
                    share.stays // MICROSECOND,
                    share.completed,
                )
                stage_rows.append((ident, share.stage_id, later, *counts))
                sums.share(
                    deal.pipeline_id, share.stage_id, later, counts, currency, (high, low), 1
                )
        tx.executemany(
            "INSERT INTO query_deals (deal_id, version, pipeline_id, stage_id, owner, status,"
            " customer_id, person_id, company_id, currency, amount, amount_high, amount_low,"
            " expected_close_date, closed_on, forecast_day, opened_us, closed_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        tx.executemany(
            "INSERT INTO query_deal_stages (deal_id, stage_id, later, entries, regressions,"
            " stay_us, completed) VALUES (?, ?, ?, ?, ?, ?, ?)",
            stage_rows,
        )
        sums.write(tx)


def _chunks(items: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: The sums' tables: their key columns and the columns added up (`deals` first).
SUMS = {
    "query_forecast_days": (
        ("day", "owner", "pipeline_id", "stage_id", "currency"),
        ("deals", "amount_high", "amount_low"),
    ),
    "query_funnel_stages": (
        ("pipeline_id", "stage_id", "later"),
        ("deals", "entries", "regressions", "stay_us", "completed"),
    ),
    "query_funnel_amounts": (
        ("pipeline_id", "stage_id", "currency"),
        ("deals", "amount_high", "amount_low"),
    ),
}


class _Sums:
    """The changes a batch makes to the sums, added up before they are written."""

    def __init__(self) -> None:
        self.changes: dict[str, dict[tuple[Any, ...], list[int]]] = {t: {} for t in SUMS}

    def add(self, table: str, key: tuple[Any, ...], counts: Sequence[int]) -> None:
        current = self.changes[table].get(key)
        if current is None:
            self.changes[table][key] = list(counts)
        else:
            for i, count in enumerate(counts):
                current[i] += count

    def forecast(self, key: tuple[Any, ...], counts: Sequence[int]) -> None:
        self.add("query_forecast_days", key, counts)

    def share(
        self,
        pipeline_id: str,
        stage_id: str,
        later: str,
        counts: tuple[int, int, int, int],
        currency: str,
        amount: tuple[int, int],
        sign: int,
    ) -> None:
        self.add(
            "query_funnel_stages",
            (pipeline_id, stage_id, later),
            (sign, *(sign * c for c in counts)),
        )
        self.add(
            "query_funnel_amounts",
            (pipeline_id, stage_id, currency),
            (sign, sign * amount[0], sign * amount[1]),
        )

    def write(self, tx: Tx) -> None:
        """Adds the changes to the rows (created at need); a row whose `deals`
        drops to nothing is deleted, so the sums stay as small as what they count."""
        for table, (keys, counts) in SUMS.items():
            changes = [(k, c) for k, c in self.changes[table].items() if any(c)]
            columns = [*keys, *counts]
            tx.executemany(
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({tx.placeholders(len(columns))})"
                f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
                + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counts),
                [(*k, *c) for k, c in changes],
            )
            where = " AND ".join(f"{k} = ?" for k in keys)
            tx.executemany(
                f"DELETE FROM {table} WHERE {where} AND deals = 0",
                [k for k, c in changes if c[0] < 0],
            )


def _schema(tx: Tx) -> list[str]:
    def by(column: str) -> str:
        return text_order(tx, column)

    return [
        "CREATE TABLE IF NOT EXISTS query_pipelines ("
        " pipeline_id TEXT PRIMARY KEY, version INTEGER NOT NULL, name TEXT NOT NULL,"
        " stages TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS query_deals ("
        " deal_id TEXT PRIMARY KEY, version INTEGER NOT NULL, pipeline_id TEXT NOT NULL,"
        " stage_id TEXT NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL,"
        " customer_id TEXT NOT NULL, person_id TEXT NOT NULL, company_id TEXT NOT NULL,"
        " currency TEXT NOT NULL, amount TEXT NOT NULL, amount_high BIGINT NOT NULL,"
        " amount_low BIGINT NOT NULL, expected_close_date TEXT NOT NULL,"
        " closed_on TEXT, forecast_day TEXT NOT NULL, opened_us BIGINT NOT NULL,"
        " closed_us BIGINT)",
        "CREATE INDEX IF NOT EXISTS query_deals_opened"
        f" ON query_deals (opened_us, {by('deal_id')})",
        "CREATE INDEX IF NOT EXISTS query_deals_owner"
        f" ON query_deals (owner, opened_us, {by('deal_id')})",
        "CREATE INDEX IF NOT EXISTS query_deals_pipeline"
        f" ON query_deals (pipeline_id, opened_us, {by('deal_id')})",
        "CREATE INDEX IF NOT EXISTS query_deals_customer"
        f" ON query_deals (customer_id, opened_us, {by('deal_id')})",
        "CREATE INDEX IF NOT EXISTS query_deals_person ON query_deals (person_id)",
        "CREATE INDEX IF NOT EXISTS query_deals_company ON query_deals (company_id)",
        "CREATE INDEX IF NOT EXISTS query_deals_status"
        f" ON query_deals (status, opened_us, {by('deal_id')})",
        "CREATE INDEX IF NOT EXISTS query_deals_closed ON query_deals (status, closed_on)",
        "CREATE TABLE IF NOT EXISTS query_deal_stages ("
        " deal_id TEXT NOT NULL, stage_id TEXT NOT NULL, later TEXT NOT NULL,"
        " entries INTEGER NOT NULL, regressions INTEGER NOT NULL,"
        " stay_us BIGINT NOT NULL, completed INTEGER NOT NULL,"
        " PRIMARY KEY (deal_id, stage_id))",
        "CREATE TABLE IF NOT EXISTS query_forecast_days ("
        " day TEXT NOT NULL, owner TEXT NOT NULL, pipeline_id TEXT NOT NULL,"
        " stage_id TEXT NOT NULL, currency TEXT NOT NULL, deals BIGINT NOT NULL,"
        " amount_high BIGINT NOT NULL, amount_low BIGINT NOT NULL,"
        " PRIMARY KEY (day, owner, pipeline_id, stage_id, currency))",
        "CREATE INDEX IF NOT EXISTS query_forecast_days_owner ON query_forecast_days (owner, day)",
        "CREATE TABLE IF NOT EXISTS query_funnel_stages ("
        " pipeline_id TEXT NOT NULL, stage_id TEXT NOT NULL, later TEXT NOT NULL,"
        " deals BIGINT NOT NULL, entries BIGINT NOT NULL, regressions BIGINT NOT NULL,"
        " stay_us BIGINT NOT NULL, completed BIGINT NOT NULL,"
        " PRIMARY KEY (pipeline_id, stage_id, later))",
        "CREATE TABLE IF NOT EXISTS query_funnel_amounts ("
        " pipeline_id TEXT NOT NULL, stage_id TEXT NOT NULL, currency TEXT NOT NULL,"
        " deals BIGINT NOT NULL, amount_high BIGINT NOT NULL, amount_low BIGINT NOT NULL,"
        " PRIMARY KEY (pipeline_id, stage_id, currency))",
        "CREATE TABLE IF NOT EXISTS query_leads ("
        " lead_id TEXT PRIMARY KEY, version INTEGER NOT NULL, status TEXT NOT NULL,"
        " owner TEXT NOT NULL, partner_tag TEXT NOT NULL, created_us BIGINT NOT NULL,"
        " customer_id TEXT NOT NULL, person_id TEXT NOT NULL, company_id TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS query_leads_customer ON query_leads (customer_id)",
        "CREATE INDEX IF NOT EXISTS query_leads_person ON query_leads (person_id)",
        "CREATE INDEX IF NOT EXISTS query_leads_company ON query_leads (company_id)",
        "CREATE INDEX IF NOT EXISTS query_leads_created"
        f" ON query_leads (created_us, {by('lead_id')})",
        "CREATE INDEX IF NOT EXISTS query_leads_status"
        f" ON query_leads (status, owner, created_us, {by('lead_id')})",
        "CREATE INDEX IF NOT EXISTS query_leads_owner"
        f" ON query_leads (owner, created_us, {by('lead_id')})",
        "CREATE TABLE IF NOT EXISTS query_activities ("
        " activity_id TEXT PRIMARY KEY, version INTEGER NOT NULL,"
        " subject_kind TEXT NOT NULL, subject_id TEXT NOT NULL, kind TEXT NOT NULL,"
        " title TEXT NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL,"
        " due_at TEXT NOT NULL, due_us BIGINT NOT NULL, customer_id TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS query_activities_subject ON query_activities (subject_id)",
        "CREATE INDEX IF NOT EXISTS query_activities_customer ON query_activities (customer_id)",
        "CREATE INDEX IF NOT EXISTS query_activities_due"
        f" ON query_activities (status, due_us, {by('activity_id')})",
        "CREATE INDEX IF NOT EXISTS query_activities_due_any"
        f" ON query_activities (due_us, {by('activity_id')})",
        "CREATE INDEX IF NOT EXISTS query_activities_owner"
        f" ON query_activities (owner, status, due_us, {by('activity_id')})",
    ]


def _pipeline_row(pipeline: Pipeline) -> tuple[Any, ...]:
    stages = [
        [s.stage_id, s.name, str(s.probability), s.category, s.retired]
        for s in pipeline.ordered_stages()
    ]
    return (str(pipeline.id), pipeline.version, pipeline.name, json.dumps(stages))


def _lead_row(lead: Lead) -> tuple[Any, ...]:
    return (
        str(lead.id),
        lead.version,
        lead.status,
        lead.owner,
        lead.partner_tag,
        micros(lead.created_at),
        lead.customer_id,
        lead.person_id,
        lead.company_id,
    )


def _activity_row(activity: Activity) -> tuple[Any, ...]:
    return (
        str(activity.id),
        activity.version,
        activity.subject_kind,
        activity.subject_id,
        activity.kind,
        activity.title,
        activity.owner,
        activity.status,
        activity.due_at.isoformat(),
        micros(activity.due_at),
        activity.customer_id,
    )


def _deal_row(deal: Opportunity) -> tuple[Any, ...]:
    currency = deal.amount.currency
    high, low = split_amount(deal.amount.amount, currency)
    day = deal.expected_close_date
    if deal.status != "open" and deal.closed_on is not None:
        day = deal.closed_on
    return (
        str(deal.id),
        deal.version,
        deal.pipeline_id,
        deal.stage_id,
        deal.owner,
        deal.status,
        deal.customer_id,
        deal.person_id,
        deal.company_id,
        currency,
        str(deal.amount.amount),
        high,
        low,
        deal.expected_close_date.isoformat(),
        deal.closed_on.isoformat() if deal.closed_on else None,
        day.isoformat(),
        micros(deal.opened_at),
        micros(deal.closed_at) if deal.closed_at else None,
    )


# -- queries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    """One page of a keyset-paged list: the ids with the version their rows hold
    (load them at that version, for a page as of one moment), the total
    matching, and where the next page starts (None: this is the last)."""

    items: list[tuple[str, int]]
    total: int
    after: tuple[int, str] | None


@dataclass(frozen=True)
class Held:
    """What the pipeline holds about some contacts (ids, sorted)."""

    deals: list[str]
    leads: list[str]
    activities: list[str]


class ReadModel:
    """The query tables and the queries over them, caught up before each query."""

    def __init__(
        self,
        app: Application[UUID],
        settings: Settings,
        *,
        cache_size: int = DEFAULT_AGGREGATE_CACHE,
    ) -> None:
        self.projection = PipelineProjection(app, cache_size=cache_size)
        self.side = QuerySide(app, QueryDatabase(settings), [self.projection])

    def catch_up(self) -> int:
        """Applies what was stored since the tables' position; returns the position."""
        return self.side.catch_up()

    def follow(self) -> None:
        self.side.follow()

    def close(self) -> None:
        self.side.close()

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """A read transaction over tables that hold every write committed before it."""
        self.side.catch_up()
        with self.side.database.read() as tx:
            yield tx

    # -- pipelines

    def pipelines(self) -> list[tuple[PipelineInfo, int]]:
        """Every pipeline with its version."""
        with self.reading() as tx:
            rows = tx.all("SELECT pipeline_id, version, name, stages FROM query_pipelines")
        return [(_pipeline_info(r), int(r[1])) for r in rows]

    # -- deals

    def deals(
        self,
        *,
        pipeline_id: str = "",
        owner: str = "",
        customer_id: str = "",
        status: str | None = None,
        size: int,
        offset: int = 0,
        after: tuple[int, str] | None = None,
    ) -> Listed:
        """Deals by opening time (then id), `size` of them from `after` (or `offset`)."""
        conditions = [
            ("pipeline_id = ?", pipeline_id),
            ("owner = ?", owner),
            ("customer_id = ?", customer_id),
            ("status = ?", status),
        ]
        with self.reading() as tx:
            rows, total, last = _page(
                tx, "query_deals", "deal_id", "opened_us", conditions, size, offset, after
            )
        return Listed(rows, total, last)

    # -- what is held about contacts (erasure, merges, export)

    def held(self, contact_ids: Sequence[str], *, subjects: bool = True) -> Held:
        """The deals whose customer, person or company is one of `contact_ids`, the
        leads converted into one of them, and the activities whose customer is one
        of them or (`subjects`) whose lead or deal is one of those."""
        ids = sorted({i for i in contact_ids if i and "\x00" not in i})
        deals: set[str] = set()
        leads: set[str] = set()
        activities: set[str] = set()
        with self.reading() as tx:
            for chunk in _chunks(ids):
                marks = tx.placeholders(len(chunk))
                for table, ident, found in (
                    ("query_deals", "deal_id", deals),
                    ("query_leads", "lead_id", leads),
                ):
                    rows = tx.all(
                        f"SELECT {ident} FROM {table} WHERE customer_id IN ({marks})"
                        f" OR person_id IN ({marks}) OR company_id IN ({marks})",
                        [*chunk, *chunk, *chunk],
                    )
                    found.update(str(r[0]) for r in rows)
                rows = tx.all(
                    f"SELECT activity_id FROM query_activities WHERE customer_id IN ({marks})",
                    chunk,
                )
                activities.update(str(r[0]) for r in rows)
            if subjects:
                for chunk in _chunks(sorted(deals | leads)):
                    rows = tx.all(
                        "SELECT activity_id FROM query_activities WHERE subject_id IN"
                        f" ({tx.placeholders(len(chunk))})",
                        chunk,
                    )
                    activities.update(str(r[0]) for r in rows)
        return Held(sorted(deals), sorted(leads), sorted(activities))

    # -- leads

    def leads(
        self,
        *,
        status: str | None = None,
        owner: str = "",
        partner_tag: str = "",
        size: int,
        offset: int = 0,
        after: tuple[int, str] | None = None,
    ) -> Listed:
        """Leads by creation time (then id), `size` of them from `after` (or `offset`)."""
        conditions = [
            ("status = ?", status),
            ("owner = ?", owner),
            ("partner_tag = ?", partner_tag),
        ]
        with self.reading() as tx:
            rows, total, last = _page(
                tx, "query_leads", "lead_id", "created_us", conditions, size, offset, after
            )
        return Listed(rows, total, last)

    def forecast(
        self,
        *,
        period: str = "month",
        start: date | None = None,
        end: date | None = None,
        owner: str | None = None,
        pipeline_id: str | None = None,
    ) -> list[ForecastRow]:
        """The rows `forecast()` gives over every deal, with the same arguments."""
        if period not in PERIODS:
            raise ValidationFailed.of("period", f"must be one of {', '.join(PERIODS)}")
        if start and end and end < start:
            raise ValidationFailed.of("end", "is before start")
        where, params = _where(
            [
                ("day >= ?", start.isoformat() if start else None),
                ("day <= ?", end.isoformat() if end else None),
                ("owner = ?", owner),
                ("pipeline_id = ?", pipeline_id),
            ]
        )
        month = "substr(day, 1, 7)"
        with self.reading() as tx:
            pipelines = tx.all("SELECT pipeline_id, version, name, stages FROM query_pipelines")
            cells = tx.all(
                f"SELECT {month}, owner, pipeline_id, stage_id, currency, SUM(deals),"
                f" SUM(amount_high), SUM(amount_low) FROM query_forecast_days{where}"
                f" GROUP BY {month}, owner, pipeline_id, stage_id, currency",
                params,
            )
        stages = {
            (info.pipeline_id, s.stage_id): s
            for info in (_pipeline_info(r) for r in pipelines)
            for s in info.stages
        }
        groups: dict[tuple[str, str, str, str], list[Any]] = defaultdict(
            lambda: [0, Decimal(0), Decimal(0)]
        )
        for label, who, pid, stage_id, currency, count, high, low in cells:
            stage = stages[(pid, stage_id)]
            amount = joined_amount(high, low, currency)
            year, mon = label.split("-")
            row = groups[
                (period_of(date(int(year), int(mon), 1), period), who, stage.category, currency)
            ]
            row[0] += int(count)
            row[1] += amount
            # In percent points; divided once per row below (exact: a division by
            # 100 only moves the decimal point).
            row[2] += amount * stage.probability
        return [
            ForecastRow(p, o, c, cur, v[0], v[1], round_money(v[2] / 100, cur))
            for (p, o, c, cur), v in sorted(groups.items())
        ]

    def funnel(self, pipeline_id: str) -> Funnel | None:
        """The funnel `funnel()` gives over every deal; None for an unknown pipeline."""
        if "\x00" in pipeline_id:
            return None
        with self.reading() as tx:
            row = tx.one(
                "SELECT pipeline_id, version, name, stages FROM query_pipelines"
                " WHERE pipeline_id = ?",
                (pipeline_id,),
            )
            if row is None:
                return None
            count = tx.one("SELECT COUNT(*) FROM query_deals WHERE pipeline_id = ?", (pipeline_id,))
            shares = tx.all(
                "SELECT stage_id, later, deals, entries, regressions, stay_us, completed"
                " FROM query_funnel_stages WHERE pipeline_id = ?",
                (pipeline_id,),
            )
            amounts = tx.all(
                "SELECT stage_id, currency, amount_high, amount_low FROM query_funnel_amounts"
                " WHERE pipeline_id = ?",
                (pipeline_id,),
            )
        pipeline = _pipeline_info(row)
        by_stage: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        for share in shares:
            by_stage[share[0]].append(share)
        money: dict[str, dict[str, Decimal]] = defaultdict(dict)
        for stage_id, currency, high, low in amounts:
            money[stage_id][currency] = joined_amount(high, low, currency)
        return Funnel(
            pipeline.pipeline_id,
            int(count[0]) if count else 0,
            tuple(
                _funnel_stage(pipeline, stage, by_stage[stage.stage_id], money[stage.stage_id])
                for stage in pipeline.stages
            ),
        )

    def win_rate(
        self,
        *,
        pipeline_id: str | None = None,
        owner: str | None = None,
        start: date | None = None,
        end: date | None = None,
    ) -> WinRate:
        """What `win_rate()` gives over every deal, with the same arguments."""
        where, params = _where(
            [
                ("status IN ('won', 'lost')", True),
                ("closed_on IS NOT NULL AND closed_us IS NOT NULL", True),
                ("pipeline_id = ?", pipeline_id),
                ("owner = ?", owner),
                ("closed_on >= ?", start.isoformat() if start else None),
                ("closed_on <= ?", end.isoformat() if end else None),
            ]
        )
        with self.reading() as tx:
            rows = tx.all(
                "SELECT status, currency, COUNT(*), SUM(amount_high), SUM(amount_low),"
                f" SUM(closed_us - opened_us) FROM query_deals{where} GROUP BY status, currency",
                params,
            )
        won = lost = 0
        amounts: dict[str, Decimal] = {}
        cycle_us = 0
        for status, currency, count, high, low, cycles in rows:
            if status == "won":
                won += int(count)
                amounts[currency] = joined_amount(high, low, currency)
                cycle_us += int(cycles)
            else:
                lost += int(count)
        average = timedelta(microseconds=cycle_us) / won if won else None
        return WinRate(won, lost, ratio(won, won + lost), dict(sorted(amounts.items())), average)

    # -- activities

    def activities(
        self,
        *,
        due_from: datetime | None = None,
        due_before: datetime | None = None,
        owner: str = "",
        status: str | None = None,
        size: int,
        offset: int = 0,
        after: tuple[int, str] | None = None,
    ) -> Listed:
        """Activities due in [`due_from`, `due_before`) by due time (then id)."""
        conditions = [
            ("due_us >= ?", micros(due_from) if due_from else None),
            ("due_us < ?", micros(due_before) if due_before else None),
            ("owner = ?", owner),
            ("status = ?", status),
        ]
        with self.reading() as tx:
            rows, total, last = _page(
                tx, "query_activities", "activity_id", "due_us", conditions, size, offset, after
            )
        return Listed(rows, total, last)

    def overdue(self, now: datetime, owner: str | None = None) -> dict[str, list[ActivityInfo]]:
        """Open activities due before `now`, per owner, most overdue first."""
        where, params = _where(
            [("status = ?", "open"), ("due_us < ?", micros(now)), ("owner = ?", owner)]
        )
        with self.reading() as tx:
            rows = tx.all(
                "SELECT activity_id, subject_kind, subject_id, kind, title, owner, due_at,"
                f" status FROM query_activities{where} ORDER BY {text_order(tx, 'owner')},"
                f" due_us, {text_order(tx, 'activity_id')}",
                params,
            )
        result: dict[str, list[ActivityInfo]] = {}
        for row in rows:
            info = _activity_info(row)
            result.setdefault(info.owner, []).append(info)
        return result


def _where(conditions: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """` WHERE a AND b` of the conditions whose value is given (True: no parameter)."""
    clauses: list[str] = []
    params: list[Any] = []
    for clause, value in conditions:
        if value is None or value == "":
            continue
        if isinstance(value, str) and "\x00" in value:
            # No stored text holds a NUL (and PostgreSQL refuses one as a parameter).
            clauses.append("1 = 0")
            continue
        clauses.append(clause)
        if value is not True:
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _page(
    tx: Tx,
    table: str,
    ident: str,
    sort: str,
    conditions: Sequence[tuple[str, Any]],
    size: int,
    offset: int,
    after: tuple[int, str] | None,
) -> tuple[list[tuple[str, int]], int, tuple[int, str] | None]:
    """A page of `table` by (`sort`, `ident`): its rows' (id, version), the total
    matching, and the sort key of its last row when more follow.
    A page starts after the key `after` (keyset); `offset` only serves without one."""
    where, params = _where(conditions)
    total = tx.one(f"SELECT COUNT(*) FROM {table}{where}", params)
    key = text_order(tx, ident)
    if after is not None:
        where += (" AND " if where else " WHERE ") + (f"({sort} > ? OR ({sort} = ? AND {key} > ?))")
        params += [after[0], after[0], after[1]]
    rows = tx.all(
        f"SELECT {ident}, version, {sort} FROM {table}{where}"
        f" ORDER BY {sort}, {key} LIMIT ? OFFSET ?",
        [*params, size + 1, 0 if after is not None else offset],
    )
    last = (int(rows[size - 1][2]), str(rows[size - 1][0])) if len(rows) > size else None
    return (
        [(str(r[0]), int(r[1])) for r in rows[:size]],
        int(total[0]) if total else 0,
        last,
    )


def _pipeline_info(row: Sequence[Any]) -> PipelineInfo:
    pipeline_id, _, name, stages = row
    return PipelineInfo(
        str(pipeline_id),
        str(name),
        tuple(
            StageInfo(stage_id, stage_name, Decimal(probability), category, bool(retired))
            for stage_id, stage_name, probability, category, retired in json.loads(stages)
        ),
    )


def _funnel_stage(
    pipeline: PipelineInfo,
    stage: StageInfo,
    shares: list[tuple[Any, ...]],
    amounts: dict[str, Decimal],
) -> FunnelStage:
    entered = entries = regressions = stay_us = completed = advanced = 0
    here = pipeline.active_position(stage.stage_id)
    for _, later, deals, n_entries, n_regressions, n_stay_us, n_completed in shares:
        entered += int(deals)
        entries += int(n_entries)
        regressions += int(n_regressions)
        stay_us += int(n_stay_us)
        completed += int(n_completed)
        if stage.is_open and any(
            is_further(pipeline, here, s) for s in (later.split(",") if later else ())
        ):
            advanced += int(deals)
    return FunnelStage(
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
        average_time_in_stage=(timedelta(microseconds=stay_us) / completed if completed else None),
    )


def _activity_info(row: Sequence[Any]) -> ActivityInfo:
    activity_id, subject_kind, subject_id, kind, title, owner, due_at, status = row
    return ActivityInfo(
        activity_id=str(activity_id),
        subject_kind=subject_kind,
        subject_id=subject_id,
        kind=kind,
        title=title,
        owner=owner,
        due_at=datetime.fromisoformat(due_at),
        status=status,
    )


# -- plain records of aggregates, for the functions of `crm_pipeline.forecast` -----------------


def pipeline_info(pipeline: Pipeline) -> PipelineInfo:
    return PipelineInfo(
        str(pipeline.id),
        pipeline.name,
        tuple(
            StageInfo(s.stage_id, s.name, s.probability, s.category, s.retired)
            for s in pipeline.ordered_stages()
        ),
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
