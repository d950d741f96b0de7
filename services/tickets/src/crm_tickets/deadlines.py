"""The tickets query model: open cases and their SLA deadlines, each customer's
cases, and the SLA record of every case, in tables of the service's own database.

`CaseTables` projects every case the event log touches (its state after each
batch, folded by the case's own events: `crm_common.querystore`) into:

- `ticket_queue`: each unsolved case's team, status, queue rank (a target
  breached and still owed, a deadline running, or nothing running) and urgency;
  the queue order is an index, so a page of a team's queue reads that page;
- `ticket_deadlines`: the warnings and breaches still to raise, indexed by due
  time: the SLA scanner's `due(now)` is a range read of the deadlines that are
  due, whatever the number of open cases;
- `ticket_cases`: every case (closed ones too) with its customer (the current
  one: a contacts merge moves the case, its undo moves it back), team and
  opening time (each customer's cases, the newest first) and its SLA record
  (how each clock instance ended, the business seconds to the first reply and
  to resolution), which `compliance` sums in SQL;
- `ticket_surveys`: each survey response (CSAT, CES, NPS) with its case's team,
  when it was recorded and the UTC month and week that instant falls in, which
  `satisfaction` groups and averages in SQL.

`TicketsQuery` keeps the tables up to date (`QuerySide`: each event applied
exactly once whichever process stored it, shared by every replica) and answers
the queries; each query first applies what was stored since (usually nothing:
`follow` keeps the tables fresh), so a caller always sees its own writes. A
process starts without reading the log and holds no record in memory: a few
recently touched cases in a bounded cache. The tables only say what is due;
whether a warning or breach is raised is the case's decision (exactly once).

No table holds personal data: a case's subject, description, replies, notes
and survey comment stay in the events (sealed under the customer's key); the
rows hold ids (the customer's contact id is a pseudonym), teams, statuses,
times, SLA figures and survey scores. Erasing a customer (destroying the key)
changes no row, and a rebuild after it, which reads the texts as "[erased]",
writes the same rows.

Instants are stored as epoch microseconds (UTC): they sort as the instants do
whatever offset they were written with. Lists page by the key of the last row
a page answered (keyset), never by an offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.application import Application

from crm_common.querystore import AggregateProjection, QueryDatabase, QuerySide, Tx
from crm_tickets.domain import TARGET_KINDS, Case, Deadline

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The urgency of a case with no clock running: after every instant.
FAR = 253_402_300_799_999_999
#: Queue ranks: a target breached and still owed, a deadline running, nothing running.
BREACHED, RUNNING, WAITING = 0, 1, 2
#: How each clock instance ended, as `ticket_cases` counts them.
OUTCOMES = ("met", "breached", "open")
#: Cases the projection keeps between batches (the rest are loaded when touched).
CASE_CACHE = 1_000
#: Deadlines the scanner reads at a time.
DUE_PAGE = 500
#: The trend's buckets: the column of `ticket_surveys` holding each response's.
INTERVALS = {"month": "month_start", "week": "week_start"}
#: NPS answers from this score are promoters, up to `DETRACTOR_MAX` detractors.
PROMOTER_MIN, DETRACTOR_MAX = 9, 6

OUTCOME_COLUMNS = [f"{kind}_{state}" for kind in TARGET_KINDS for state in OUTCOMES]


def micros(at: datetime) -> int:
    """An aware instant as integer microseconds since the epoch."""
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def instant(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


@dataclass(frozen=True)
class QueueEntry:
    case_id: str
    team: str
    status: str
    rank: int
    #: BREACHED: when the oldest owed breach fell due; RUNNING: the next breach;
    #: WAITING: `FAR`.
    urgent_at: int
    opened_at: int

    @property
    def key(self) -> tuple[int, int, int, str]:
        """The queue order, and the page token's content."""
        return (self.rank, self.urgent_at, self.opened_at, self.case_id)


@dataclass(frozen=True)
class Durations:
    """Business seconds to a target over a set of cases: how many, mean and p90."""

    count: int
    mean: float
    p90: float


@dataclass(frozen=True)
class Compliance:
    cases: int
    #: kind -> (met, breached, open), in `TARGET_KINDS` order, kinds with none left out.
    targets: dict[str, tuple[int, int, int]]
    first_reply: Durations
    resolution: Durations


@dataclass(frozen=True)
class CaseRecord:
    """What compliance needs of one case, kept after it is closed."""

    team: str
    customer_id: str
    opened_at: datetime
    #: kind -> [met, breached, open] clock instances.
    outcomes: dict[str, list[int]]
    first_reply_seconds: float | None
    resolution_seconds: float | None


def record_of(case: Case) -> CaseRecord:
    outcomes = {kind: [0, 0, 0] for kind in TARGET_KINDS}
    first_reply: float | None = None
    resolution: float | None = None
    for finished in case.finished_clocks:
        outcomes[finished["kind"]][OUTCOMES.index(finished["state"])] += 1
    for kind in TARGET_KINDS:
        clock = case.clocks.get(kind)
        if clock is None:
            continue
        state = case.clock_state(kind)
        outcomes[kind][OUTCOMES.index(state if state in ("met", "breached") else "open")] += 1
        if clock["met_at"] is not None and kind == "first_response":
            first_reply = float(clock["consumed"])
        if clock["met_at"] is not None and kind == "resolution":
            resolution = float(clock["consumed"])
    return CaseRecord(
        case.team, case.customer_id, case.opened_at, outcomes, first_reply, resolution
    )


def month_start(at: datetime) -> datetime:
    """The first instant (UTC) of the calendar month `at` falls in."""
    utc = at.astimezone(UTC)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def week_start(at: datetime) -> datetime:
    """The first instant (UTC) of the Monday-to-Sunday week `at` falls in."""
    utc = at.astimezone(UTC)
    return datetime(utc.year, utc.month, utc.day, tzinfo=UTC) - timedelta(days=utc.weekday())


@dataclass(frozen=True)
class SurveyRow:
    """One bucket of survey responses, as `satisfaction` sums them."""

    start: datetime
    responses: int
    csat_mean: float
    ces_responses: int
    ces_mean: float
    nps_responses: int
    promoters: int
    detractors: int


def queue_rank(case: Case, deadlines: list[Deadline]) -> tuple[int, int]:
    """The case's rank and urgency in its team's queue."""
    owed = [
        datetime.fromisoformat(c["breached_due_at"])
        for c in case.clocks.values()
        if c["breached"] and c["met_at"] is None and c.get("breached_due_at")
    ]
    if owed:
        return BREACHED, micros(min(owed))
    breaches = [d.at for d in deadlines if d.what == "breach"]
    if breaches:
        return RUNNING, micros(min(breaches))
    return WAITING, FAR


class CaseTables(AggregateProjection):
    """The rows of each case, rewritten after every batch that changed it."""

    name = "tickets_cases"
    #: 2: `ticket_surveys`.
    version = 2
    tables = ("ticket_queue", "ticket_deadlines", "ticket_cases", "ticket_surveys")
    kinds = (Case,)

    def __init__(self, app: Application[UUID], cache_size: int = CASE_CACHE) -> None:
        super().__init__(app, cache_size)

    @property
    def cached(self) -> int:
        """Cases held in memory (at most `cache_size`)."""
        return len(self._cache)

    def create(self, tx: Tx) -> None:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS ticket_queue ("
            " case_id TEXT PRIMARY KEY, team TEXT NOT NULL, status TEXT NOT NULL,"
            " rank INTEGER NOT NULL, urgent_at BIGINT NOT NULL, opened_at BIGINT NOT NULL)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_queue_by_team"
            " ON ticket_queue (team, rank, urgent_at, opened_at, case_id)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_queue_by_urgency"
            " ON ticket_queue (rank, urgent_at, opened_at, case_id)"
        )
        tx.execute(
            "CREATE TABLE IF NOT EXISTS ticket_deadlines ("
            " case_id TEXT NOT NULL, kind TEXT NOT NULL, what TEXT NOT NULL,"
            " due_at BIGINT NOT NULL, deadline_version INTEGER NOT NULL,"
            " cycle INTEGER NOT NULL, PRIMARY KEY (case_id, kind, what))"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_deadlines_by_due"
            " ON ticket_deadlines (due_at, case_id, kind, what)"
        )
        outcomes = "".join(f" {column} INTEGER NOT NULL," for column in OUTCOME_COLUMNS)
        tx.execute(
            "CREATE TABLE IF NOT EXISTS ticket_cases ("
            " case_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, team TEXT NOT NULL,"
            f" opened_at BIGINT NOT NULL,{outcomes}"
            " first_reply_seconds DOUBLE PRECISION, resolution_seconds DOUBLE PRECISION)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_cases_by_customer"
            " ON ticket_cases (customer_id, opened_at, case_id)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_cases_by_team ON ticket_cases (team, opened_at)"
        )
        tx.execute(
            "CREATE TABLE IF NOT EXISTS ticket_surveys ("
            " case_id TEXT PRIMARY KEY, team TEXT NOT NULL, answered_at BIGINT NOT NULL,"
            " month_start BIGINT NOT NULL, week_start BIGINT NOT NULL,"
            " csat INTEGER NOT NULL, ces INTEGER, nps INTEGER)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_surveys_by_team"
            " ON ticket_surveys (team, answered_at)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS ticket_surveys_by_time ON ticket_surveys (answered_at)"
        )

    def project(self, tx: Tx, aggregate: Any) -> None:
        if not isinstance(aggregate, Case):
            return
        key = str(aggregate.id)
        self._record(tx, key, record_of(aggregate))
        if aggregate.satisfaction is not None:
            self._survey(tx, key, aggregate.team, aggregate.satisfaction)
        tx.execute("DELETE FROM ticket_deadlines WHERE case_id = ?", (key,))
        if aggregate.status == "closed":
            tx.execute("DELETE FROM ticket_queue WHERE case_id = ?", (key,))
            return
        deadlines = aggregate.deadlines()
        tx.executemany(
            "INSERT INTO ticket_deadlines (case_id, kind, what, due_at, deadline_version, cycle)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(key, d.kind, d.what, micros(d.at), d.deadline_version, d.cycle) for d in deadlines],
        )
        if aggregate.status == "solved":
            tx.execute("DELETE FROM ticket_queue WHERE case_id = ?", (key,))
            return
        rank, urgent_at = queue_rank(aggregate, deadlines)
        tx.execute(
            "INSERT INTO ticket_queue (case_id, team, status, rank, urgent_at, opened_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (case_id) DO UPDATE SET"
            " team = excluded.team, status = excluded.status, rank = excluded.rank,"
            " urgent_at = excluded.urgent_at",
            (key, aggregate.team, aggregate.status, rank, urgent_at, micros(aggregate.opened_at)),
        )

    def _record(self, tx: Tx, key: str, record: CaseRecord) -> None:
        counts = [n for kind in TARGET_KINDS for n in record.outcomes[kind]]
        columns = ", ".join(OUTCOME_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in OUTCOME_COLUMNS)
        tx.execute(
            f"INSERT INTO ticket_cases (case_id, customer_id, team, opened_at, {columns},"
            " first_reply_seconds, resolution_seconds)"
            f" VALUES ({tx.placeholders(6 + len(OUTCOME_COLUMNS))})"
            " ON CONFLICT (case_id) DO UPDATE SET customer_id = excluded.customer_id,"
            f" team = excluded.team, {updates},"
            " first_reply_seconds = excluded.first_reply_seconds,"
            " resolution_seconds = excluded.resolution_seconds",
            (
                key,
                record.customer_id,
                record.team,
                micros(record.opened_at),
                *counts,
                record.first_reply_seconds,
                record.resolution_seconds,
            ),
        )

    @staticmethod
    def _survey(tx: Tx, key: str, team: str, survey: dict[str, Any]) -> None:
        """The case's survey response; its team follows the case's (as compliance's)."""
        at = datetime.fromisoformat(survey["at"])
        tx.execute(
            "INSERT INTO ticket_surveys (case_id, team, answered_at, month_start, week_start,"
            " csat, ces, nps) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (case_id) DO UPDATE SET team = excluded.team",
            (
                key,
                team,
                micros(at),
                micros(month_start(at)),
                micros(week_start(at)),
                survey["csat"],
                survey["ces"],
                survey["nps"],
            ),
        )


QUEUE_COLUMNS = "case_id, team, status, rank, urgent_at, opened_at"


def _entry(row: tuple[Any, ...]) -> QueueEntry:
    case_id, team, status, rank, urgent_at, opened_at = row
    return QueueEntry(str(case_id), team, status, int(rank), int(urgent_at), int(opened_at))


class TicketsQuery:
    """The query tables of the service, followed from its event log."""

    def __init__(
        self, app: Application[UUID], database: QueryDatabase, cache_size: int = CASE_CACHE
    ) -> None:
        self.database = database
        self.tables = CaseTables(app, cache_size)
        self.side = QuerySide(app, database, [self.tables])

    def catch_up(self) -> int:
        """Applies what was stored since the tables' position; the position reached."""
        return self.side.catch_up()

    def follow(self, interval: float = 0.2) -> None:
        self.side.follow(interval)

    def close(self) -> None:
        self.side.close()

    def due(
        self, now: datetime, after: tuple[int, str, str, str] | None = None, limit: int = DUE_PAGE
    ) -> list[Deadline]:
        """Up to `limit` warnings and breaches due at `now` (after the deadline whose
        `due_key` is `after`), earliest first: an index range, never the open cases."""
        self.catch_up()
        sql = (
            "SELECT case_id, kind, what, due_at, deadline_version, cycle FROM ticket_deadlines"
            " WHERE due_at <= ?"
        )
        params: list[Any] = [micros(now)]
        if after is not None:
            sql += " AND (due_at, case_id, kind, what) > (?, ?, ?, ?)"
            params += after
        sql += " ORDER BY due_at, case_id, kind, what LIMIT ?"
        with self.database.read() as tx:
            rows = tx.all(sql, [*params, limit])
        return [
            Deadline(str(case_id), kind, what, instant(int(due)), int(version), int(cycle))
            for case_id, kind, what, due, version, cycle in rows
        ]

    def queue(
        self, team: str, after: tuple[int, int, int, str] | None, limit: int
    ) -> list[QueueEntry]:
        """A page of a team's unsolved cases by SLA urgency: a target breached and still
        owed first (the oldest breach first), then the nearest deadline, then the cases
        with no clock running (paused, or every target met); ties by opening time."""
        self.catch_up()
        sql = f"SELECT {QUEUE_COLUMNS} FROM ticket_queue WHERE team = ?"
        params: list[Any] = [team]
        if after is not None:
            sql += " AND (rank, urgent_at, opened_at, case_id) > (?, ?, ?, ?)"
            params += after
        sql += " ORDER BY rank, urgent_at, opened_at, case_id LIMIT ?"
        with self.database.read() as tx:
            return [_entry(row) for row in tx.all(sql, [*params, limit])]

    def at_risk(
        self, until: datetime, team: str, after: tuple[int, int, int, str] | None, limit: int
    ) -> list[QueueEntry]:
        """A page of the unsolved cases with a breach still to raise that falls due
        before `until` (overdue ones too), the nearest first."""
        self.catch_up()
        sql = f"SELECT {QUEUE_COLUMNS} FROM ticket_queue WHERE rank = ? AND urgent_at <= ?"
        params: list[Any] = [RUNNING, micros(until)]
        if team:
            sql += " AND team = ?"
            params.append(team)
        if after is not None:
            sql += " AND (rank, urgent_at, opened_at, case_id) > (?, ?, ?, ?)"
            params += after
        sql += " ORDER BY rank, urgent_at, opened_at, case_id LIMIT ?"
        with self.database.read() as tx:
            return [_entry(row) for row in tx.all(sql, [*params, limit])]

    def customer_cases(
        self, customer_id: str, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        """A page of a customer's cases as (opening time, case id), the newest first."""
        self.catch_up()
        sql = "SELECT opened_at, case_id FROM ticket_cases WHERE customer_id = ?"
        params: list[Any] = [customer_id]
        if after is not None:
            sql += " AND (opened_at, case_id) < (?, ?)"
            params += after
        sql += " ORDER BY opened_at DESC, case_id DESC LIMIT ?"
        with self.database.read() as tx:
            return [(int(at), str(ident)) for at, ident in tx.all(sql, [*params, limit])]

    def case_ids_of(self, customer_ids: list[str], page: int = DUE_PAGE) -> list[str]:
        """Every case (closed ones too) of the customers, read a page at a time."""
        found: list[str] = []
        for customer in customer_ids:
            after: tuple[int, str] | None = None
            while True:
                rows = self.customer_cases(customer, after, page)
                found.extend(ident for _, ident in rows)
                if len(rows) < page:
                    break
                after = rows[-1]
        return found

    def compliance(self, team: str, start: datetime, end: datetime) -> Compliance:
        """The SLA outcomes of the team's cases opened in [start, end), summed in SQL;
        the p90s read one row each from the period's durations in order."""
        self.catch_up()
        where = "WHERE team = ? AND opened_at >= ? AND opened_at < ?"
        period = (team, micros(start), micros(end))
        sums = ", ".join(f"SUM({c})" for c in OUTCOME_COLUMNS)
        with self.database.read() as tx:
            row = tx.one(f"SELECT COUNT(*), {sums} FROM ticket_cases {where}", period)
            assert row is not None
            first_reply = self._durations(tx, "first_reply_seconds", where, period)
            resolution = self._durations(tx, "resolution_seconds", where, period)
        counts = [int(n or 0) for n in row[1:]]
        targets: dict[str, tuple[int, int, int]] = {}
        for i, kind in enumerate(TARGET_KINDS):
            met, breached, still_open = counts[3 * i : 3 * i + 3]
            if met + breached + still_open:
                targets[kind] = (met, breached, still_open)
        return Compliance(int(row[0]), targets, first_reply, resolution)

    @staticmethod
    def _durations(tx: Tx, column: str, where: str, period: tuple[Any, ...]) -> Durations:
        """Count, mean and p90 (nearest rank) of a duration column over the period."""
        filtered = f"FROM ticket_cases {where} AND {column} IS NOT NULL"
        row = tx.one(f"SELECT COUNT(*), SUM({column}) {filtered}", period)
        if row is None or not row[0]:
            return Durations(0, 0.0, 0.0)
        count = int(row[0])
        rank = max(-(-9 * count // 10) - 1, 0)  # ceil(0.9 n) - 1, in integers
        p90 = tx.one(
            f"SELECT {column} {filtered} ORDER BY {column} LIMIT 1 OFFSET ?", [*period, rank]
        )
        assert p90 is not None
        return Durations(count, float(row[1]) / count, float(p90[0]))

    def satisfaction(
        self, team: str, start: datetime, end: datetime, interval: str
    ) -> list[SurveyRow]:
        """The survey responses recorded in [start, end) (of `team`, or of every team
        when empty), grouped by UTC month or week and summed in SQL; buckets without
        responses are left out."""
        self.catch_up()
        bucket = INTERVALS[interval]
        where = "WHERE answered_at >= ? AND answered_at < ?"
        params: list[Any] = [micros(start), micros(end)]
        if team:
            where += " AND team = ?"
            params.append(team)
        sql = (
            f"SELECT {bucket}, COUNT(*), AVG(CAST(csat AS DOUBLE PRECISION)), COUNT(ces),"
            " AVG(CAST(ces AS DOUBLE PRECISION)), COUNT(nps),"
            " SUM(CASE WHEN nps >= ? THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN nps <= ? THEN 1 ELSE 0 END)"
            f" FROM ticket_surveys {where} GROUP BY {bucket} ORDER BY {bucket}"
        )
        with self.database.read() as tx:
            rows = tx.all(sql, [PROMOTER_MIN, DETRACTOR_MAX, *params])
        return [
            SurveyRow(
                instant(int(at)),
                int(count),
                float(csat or 0),
                int(ces_count),
                float(ces or 0),
                int(nps_count),
                int(promoters or 0),
                int(detractors or 0),
            )
            for at, count, csat, ces_count, ces, nps_count, promoters, detractors in rows
        ]
