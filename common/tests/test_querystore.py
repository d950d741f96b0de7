"""Query tables (crm_common.querystore) on real SQLite and PostgreSQL stores:
each event applied exactly once whatever the replicas and failures, a restart
answers from the stored tables without reading the log again, and a new
version of a projection rebuilds its tables from the log."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from crm_common.eventstore import application_env
from crm_common.querystore import AggregateProjection, QueryDatabase, QuerySide, Tx
from crm_common.settings import Settings


class Tally(Aggregate):
    @event("Opened")
    def __init__(self, name: str) -> None:
        self.name = name
        self.total = 0

    @event("Counted")
    def count(self, amount: int) -> None:
        self.total += amount


class Tallies(AggregateProjection):
    name = "tallies"
    version = 1
    tables = ("tallies",)
    kinds = (Tally,)

    def __init__(self, app: Application[UUID], fail_on: str | None = None) -> None:
        super().__init__(app, cache_size=4)
        self.fail_on = fail_on
        self.projected = 0

    def create(self, tx: Tx) -> None:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS tallies ("
            " id TEXT PRIMARY KEY, name TEXT NOT NULL, total BIGINT NOT NULL,"
            " version BIGINT NOT NULL)"
        )

    def project(self, tx: Tx, aggregate: Any) -> None:
        if aggregate.name == self.fail_on:
            raise RuntimeError("a projection that fails on this tally")
        self.projected += 1
        tx.execute(
            "INSERT INTO tallies (id, name, total, version) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
            "total = excluded.total, version = excluded.version",
            (str(aggregate.id), aggregate.name, aggregate.total, aggregate.version),
        )


class TalliesV2(Tallies):
    """The next release: the same table with a new column."""

    version = 2

    def create(self, tx: Tx) -> None:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS tallies ("
            " id TEXT PRIMARY KEY, name TEXT NOT NULL, total BIGINT NOT NULL,"
            " version BIGINT NOT NULL, doubled BIGINT NOT NULL)"
        )

    def project(self, tx: Tx, aggregate: Any) -> None:
        tx.execute(
            "INSERT INTO tallies (id, name, total, version, doubled) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET total = excluded.total, "
            "version = excluded.version, doubled = excluded.doubled",
            (
                str(aggregate.id),
                aggregate.name,
                aggregate.total,
                aggregate.version,
                2 * aggregate.total,
            ),
        )


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield Settings(
            service="tally",
            data_dir=tmp_path,
            bind_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            event_store="sqlite",
        )
        return
    from crm_deploy.testing import drop_schema, postgres_settings

    schema = f"tally_{uuid.uuid4().hex[:8]}"
    yield postgres_settings("tally", schema)
    drop_schema(schema)


def open_app(settings: Settings) -> Application[UUID]:
    return Application(env=application_env(settings))


def totals(side: QuerySide) -> dict[str, tuple[str, int, int]]:
    side.catch_up()
    with side.database.read() as tx:
        rows = tx.all("SELECT id, name, total, version FROM tallies")
    return {r[0]: (r[1], int(r[2]), int(r[3])) for r in rows}


def test_tables_follow_the_log_and_a_restart_reads_nothing_again(settings: Settings) -> None:
    app = open_app(settings)
    side = QuerySide(app, QueryDatabase(settings), [Tallies(app)], batch=7)
    tallies = [Tally(f"t{i}") for i in range(10)]
    for t in tallies:
        for n in range(1, 6):
            t.count(n)
    app.save(*tallies)
    assert side.catch_up() == 60
    expected = {str(t.id): (t.name, 15, 6) for t in tallies}
    assert totals(side) == expected
    side.close()

    # A new process: the tables are there, nothing is read from the log again.
    app2 = open_app(settings)
    projection = Tallies(app2)
    side2 = QuerySide(app2, QueryDatabase(settings), [projection])
    assert totals(side2) == expected
    assert side2.applied == 0 and projection.projected == 0

    # Writes after the restart: only they are applied, including to an
    # aggregate this process never saw (loaded from the store, not the cache).
    first = app2.repository.get(tallies[0].id)
    first.count(100)
    app2.save(first, Tally("new"))
    found = totals(side2)
    assert found[str(first.id)] == ("t0", 115, 7)
    assert sorted(name for name, _, _ in found.values())[-1] == "t9"
    assert len(found) == 11
    assert side2.applied == 2
    side2.close()


def test_a_failing_batch_changes_nothing_and_is_applied_once_it_can(settings: Settings) -> None:
    app = open_app(settings)
    good, bad = Tally("good"), Tally("bad")
    good.count(1)
    app.save(good, bad)
    failing = Tallies(app, fail_on="bad")
    side = QuerySide(app, QueryDatabase(settings), [failing])
    with pytest.raises(RuntimeError, match="fails on this tally"):
        side.catch_up()
    assert side.position() == 0
    with side.database.read() as tx:
        assert tx.all("SELECT id FROM tallies") == []
    failing.fail_on = None
    assert totals(side) == {str(good.id): ("good", 1, 2), str(bad.id): ("bad", 0, 1)}
    side.close()


def test_replicas_writing_and_catching_up_at_once_apply_every_event_once(
    settings: Settings,
) -> None:
    """Two processes' worth of writers and query sides on one store: every
    count lands exactly once in the shared table."""
    apps = [open_app(settings), open_app(settings)]
    sides = [QuerySide(a, QueryDatabase(settings), [Tallies(a)], batch=5) for a in apps]
    tallies = [Tally(f"r{i}") for i in range(4)]
    apps[0].save(*tallies)
    errors: list[BaseException] = []

    def writer(app: Application[UUID], which: int) -> None:
        try:
            for step in range(30):
                while True:
                    t = app.repository.get(tallies[(step + which) % 4].id)
                    t.count(1)
                    try:
                        app.save(t)
                        break
                    except Exception as exc:  # the other writer got that version first
                        if "IntegrityError" not in type(exc).__name__:
                            raise
        except BaseException as exc:
            errors.append(exc)

    def reader(side: QuerySide) -> None:
        try:
            for _ in range(40):
                side.catch_up()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(apps[i], i)) for i in range(2)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    for side in sides:
        found = totals(side)
        assert sum(total for _, total, _ in found.values()) == 60
        assert {version for _, total, version in found.values()} == {
            total + 1 for _, total, _ in found.values()
        }
    assert sum(s.applied for s in sides) == 4 + 60
    for side in sides:
        side.close()


def test_a_new_version_rebuilds_its_tables_from_the_log(settings: Settings) -> None:
    app = open_app(settings)
    t = Tally("v")
    t.count(21)
    app.save(t)
    side = QuerySide(app, QueryDatabase(settings), [Tallies(app)])
    side.catch_up()
    side.close()
    upgraded = QuerySide(app, QueryDatabase(settings), [TalliesV2(app)])
    assert upgraded.position() == 0 and upgraded.lag() == 2
    upgraded.catch_up()
    with upgraded.database.read() as tx:
        assert tx.all("SELECT name, total, doubled FROM tallies") == [("v", 21, 42)]
    upgraded.close()
