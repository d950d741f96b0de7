"""Query tables: the query side of a write service, kept in its own database.

A write service answers lists, searches and reports over all of its records
(contacts' search, pipeline's board and forecast, tickets' queues and
deadlines). Those answers come from tables in the service's own database (the
SQLite file of its events, or its PostgreSQL schema), not from memory: a
process starts in the time it takes to open a connection, whatever the
history, and its memory does not grow with the number of records.

The tables follow the service's notification log (the same log the relay
publishes) as **tracked projections**: a batch of events is applied and the
projection's position recorded in one transaction, so each event is applied
exactly once whatever crashes, and any number of replicas share the tables.
Before a query, `QuerySide.catch_up()` applies what was stored since (usually
nothing, or the caller's own last write), so a client always sees its own
committed writes, whichever replica made them; a background `follow()` keeps
the tables fresh so that a query rarely has anything to apply.

A projection has a `version`. When the code's version differs from the one
its tables were built by (a new release changed their shape), its tables are
dropped, created anew and rebuilt from the log; that is the only time the log
is read from the start.

Two ways to write a projection:
- `QueryProjection.apply(tx, events)`: the events of a batch, in log order;
- `AggregateProjection.project(tx, aggregate)`: the state of each aggregate
  the batch touched, after the batch's events (one call per aggregate per
  batch); the aggregates are folded from the events by their own `mutate`, so
  the query side can never disagree with the write side about what an event
  means. A bounded cache keeps recently touched aggregates; one not in it is
  loaded from the repository (from its latest snapshot).

SQL is written once for both stores: `?` placeholders (turned into `%s` for
PostgreSQL, so a literal `%` belongs in a parameter, e.g. LIKE patterns),
`INSERT ... ON CONFLICT ... DO UPDATE`, and the types both understand (TEXT,
BIGINT, INTEGER, DOUBLE PRECISION; amounts as TEXT or as integers of minor
units). A text column that orders results is declared `COLLATE "C"` on
PostgreSQL, so rows sort by code point as Python and SQLite sort strings,
whatever the server's locale.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, CanInitAggregate

from crm_common.eventstore import _conninfo, creating_tables, ensure_postgres_schema
from crm_common.settings import Settings

log = logging.getLogger(__name__)

#: Notifications read and applied per transaction.
DEFAULT_BATCH = 500
#: Aggregates an `AggregateProjection` keeps between batches.
DEFAULT_AGGREGATE_CACHE = 10_000

TRACKING_TABLE = "query_tracking"


class Tx:
    """One transaction on the query tables; SQL with `?` placeholders."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self.cursor = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Tx:
        self.cursor.execute(self._sql(sql), tuple(params))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cursor.executemany(self._sql(sql), [tuple(r) for r in rows])

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self.cursor.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.execute(sql, params).fetchall()

    def placeholders(self, count: int) -> str:
        """`?, ?, ?` for an `IN (...)` of `count` values."""
        return ", ".join("?" * count)


class QueryDatabase:
    """Connections to the service's own database for its query tables.

    SQLite: the service's events file (WAL; each thread its own connection;
    a write transaction is `BEGIN IMMEDIATE`, so writers of all processes on
    the file queue for its lock). PostgreSQL: a small pool of connections
    whose search path is the service's schema.
    """

    def __init__(self, settings: Settings, *, pool_size: int = 4) -> None:
        self.settings = settings
        self.dialect = settings.event_store
        self._local = threading.local()
        self._closed = False
        if self.dialect == "postgres":
            from psycopg_pool import ConnectionPool

            ensure_postgres_schema(settings)
            schema = settings.postgres["schema"]
            self._pool: Any = ConnectionPool(
                _conninfo(settings),
                min_size=1,
                max_size=pool_size,
                kwargs={"options": f"-c search_path={schema}"},
                open=True,
                name=f"{settings.service}-query",
            )
        else:
            settings.service_dir.mkdir(parents=True, exist_ok=True)
            self.path = str(settings.service_dir / "events.sqlite")
            self._connections: list[sqlite3.Connection] = []
            self._lock = threading.Lock()

    # -- SQLite connections, one per thread --

    def _sqlite(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            # Deleted and rewritten rows are overwritten in the file, so an erased
            # person's values do not linger in free pages of the query tables.
            conn.execute("PRAGMA secure_delete=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        if self.dialect == "postgres":
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield Tx(cur, "postgres")
            return
        conn = self._sqlite()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield Tx(conn.cursor(), "sqlite")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction: one consistent view of the tables."""
        if self.dialect == "postgres":
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION READ ONLY")
                yield Tx(cur, "postgres")
            return
        conn = self._sqlite()
        conn.execute("BEGIN")
        try:
            yield Tx(conn.cursor(), "sqlite")
        finally:
            conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.dialect == "postgres":
            self._pool.close()
        else:
            with self._lock:
                for conn in self._connections:
                    with contextlib.suppress(sqlite3.ProgrammingError):
                        conn.close()  # one made by a thread that has gone may refuse
                self._connections.clear()


class QueryProjection(ABC):
    """Tables of a query side and what each event does to them."""

    #: Names the projection's tracking row; unique within a service.
    name: ClassVar[str]
    #: Bumped whenever the tables' shape or content rules change: the tables
    #: are then dropped, created and rebuilt from the start of the log.
    version: ClassVar[int]
    #: The projection's tables, dropped on a version change.
    tables: ClassVar[tuple[str, ...]]

    @abstractmethod
    def create(self, tx: Tx) -> None:
        """Creates the tables and their indexes (`IF NOT EXISTS`)."""

    @abstractmethod
    def apply(self, tx: Tx, events: Sequence[Any]) -> None:
        """Applies one batch of the log's events, in log order."""

    def reset(self) -> None:
        """Forgets whatever the projection keeps between batches (after a
        failed batch, whose transaction was rolled back)."""
        return None

    def drop(self, tx: Tx) -> None:
        for table in self.tables:
            tx.execute(f"DROP TABLE IF EXISTS {table}")


class AggregateProjection(QueryProjection):
    """A projection of aggregate states: `project` is called once per batch
    for each aggregate of `kinds` that the batch changed, with its state after
    the batch."""

    kinds: ClassVar[tuple[type[Aggregate], ...]]

    def __init__(self, app: Application[UUID], cache_size: int = DEFAULT_AGGREGATE_CACHE):
        self.app = app
        self.cache_size = cache_size
        self._cache: OrderedDict[UUID, Any] = OrderedDict()
        self._event_kinds = tuple(kind.Event for kind in self.kinds)

    @abstractmethod
    def project(self, tx: Tx, aggregate: Any) -> None:
        """Writes the rows of `aggregate` (its state after this batch)."""

    def apply(self, tx: Tx, events: Sequence[Any]) -> None:
        touched: dict[UUID, Any] = {}
        for event in events:
            if not isinstance(event, self._event_kinds):
                continue
            aggregate = self._fold(event)
            if aggregate is not None:
                touched[aggregate.id] = aggregate
        for aggregate in touched.values():
            self.project(tx, aggregate)

    def _fold(self, event: Any) -> Any:
        ident = event.originator_id
        cached = self._cache.pop(ident, None)
        if isinstance(event, CanInitAggregate) and event.originator_version == 1:
            aggregate = event.mutate(None)
        elif cached is not None and cached.version == event.originator_version - 1:
            aggregate = event.mutate(cached)
        else:
            try:
                aggregate = self.app.repository.get(ident, version=event.originator_version)
            except AggregateNotFoundError:
                return None
        if aggregate is None:
            return None
        self._cache[ident] = aggregate
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return aggregate

    def reset(self) -> None:
        self._cache.clear()

    @property
    def cached(self) -> int:
        """How many aggregates the projection holds between batches (bounded by `cache_size`)."""
        return len(self._cache)


@dataclass
class ProjectionState:
    name: str
    version: int
    position: int


class QuerySide:
    """Keeps a service's query projections up to date with its event log."""

    def __init__(
        self,
        app: Application[UUID],
        database: QueryDatabase,
        projections: Sequence[QueryProjection],
        *,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        names = [p.name for p in projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projection names must be unique: {names}")
        self.app = app
        self.database = database
        self.projections = list(projections)
        self.batch = batch
        self.applied = 0  # events applied by this process, for tests and logs
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._open()

    # -- opening: tables, versions --

    def _open(self) -> None:
        # Replicas starting together on a new store: one creates the tables, the
        # others find them (PostgreSQL's CREATE TABLE IF NOT EXISTS races itself).
        with creating_tables(self.database.settings), self.database.write() as tx:
            tx.execute(
                f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} ("
                " projection TEXT PRIMARY KEY,"
                " version INTEGER NOT NULL,"
                " position BIGINT NOT NULL)"
            )
            for projection in self.projections:
                row = tx.one(
                    f"SELECT version FROM {TRACKING_TABLE} WHERE projection = ?",
                    (projection.name,),
                )
                if row is not None and int(row[0]) == projection.version:
                    projection.create(tx)  # indexes added since, if any
                    continue
                if row is not None:
                    log.warning(
                        "query tables %r are of version %s, this release builds %s: "
                        "rebuilding them from the event log",
                        projection.name,
                        row[0],
                        projection.version,
                    )
                projection.drop(tx)
                projection.create(tx)
                tx.execute(
                    f"INSERT INTO {TRACKING_TABLE} (projection, version, position) "
                    "VALUES (?, ?, 0) ON CONFLICT (projection) DO UPDATE "
                    "SET version = excluded.version, position = 0",
                    (projection.name, projection.version),
                )

    def states(self) -> list[ProjectionState]:
        with self.database.read() as tx:
            rows = tx.all(f"SELECT projection, version, position FROM {TRACKING_TABLE}")
        known = {p.name for p in self.projections}
        return [ProjectionState(n, int(v), int(p)) for n, v, p in rows if n in known]

    def position(self) -> int:
        """The position every projection has applied (the lowest of them)."""
        states = self.states()
        return min((s.position for s in states), default=0)

    def lag(self) -> int:
        """Events stored but not yet applied by the slowest projection."""
        return max(0, self._log_end() - self.position())

    def _log_end(self) -> int:
        recorder: Any = self.app.recorder
        return int(recorder.max_notification_id() or 0)

    # -- catching up --

    def catch_up(self) -> int:
        """Applies every event stored before the call; returns the log position reached."""
        end = self._log_end()
        if self.position() >= end:
            return end
        with self._lock:  # this process's threads queue here, other processes on the row lock
            for projection in self.projections:
                while self._step(projection, end):
                    pass
        return end

    def _step(self, projection: QueryProjection, end: int) -> bool:
        """Applies one batch up to `end`; False when the projection has reached it.

        The batch is read and decoded before the write transaction begins (on
        SQLite a write transaction holds the lock commands need too); inside
        it the position is checked again, and a batch another process applied
        meanwhile is dropped and read anew."""
        recorder: Any = self.app.recorder
        start = self._position_of(projection)
        if start >= end:
            return False
        notifications = recorder.select_notifications(start + 1, self.batch, stop=end)
        if not notifications:
            return False
        events = [self.app.mapper.to_domain_event(n) for n in notifications]
        last = int(notifications[-1].id)
        try:
            with self.database.write() as tx:
                row = tx.one(
                    f"SELECT position FROM {TRACKING_TABLE} WHERE projection = ?"
                    + (" FOR UPDATE" if tx.dialect == "postgres" else ""),
                    (projection.name,),
                )
                position = int(row[0]) if row is not None else 0
                if position != start:
                    return position < end  # another process moved it: read again
                projection.apply(tx, events)
                tx.execute(
                    f"UPDATE {TRACKING_TABLE} SET position = ? WHERE projection = ?",
                    (last, projection.name),
                )
        except BaseException:
            projection.reset()
            raise
        self.applied += len(notifications)
        return last < end

    def _position_of(self, projection: QueryProjection) -> int:
        with self.database.read() as tx:
            row = tx.one(
                f"SELECT position FROM {TRACKING_TABLE} WHERE projection = ?", (projection.name,)
            )
        return int(row[0]) if row is not None else 0

    # -- following in the background --

    def follow(self, interval: float = 0.2) -> None:
        """Catches up every `interval` seconds in a daemon thread until `close`."""
        if self._follower is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.catch_up()
                except Exception:
                    log.exception("query tables could not catch up; trying again")
                    self._stop.wait(min(5.0, interval * 10))

        self._follower = threading.Thread(target=run, name="query-follower", daemon=True)
        self._follower.start()

    def wait_until(self, position: int, timeout: float = 10.0) -> bool:
        """Catches up until `position` is applied or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.catch_up() >= position and self.position() >= position:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
            self._follower = None
        self.database.close()
