"""Event store setup: the `eventsourcing` library's SQLite or PostgreSQL
module, chosen by configuration, with one addition to its recorders: finding
the log position of a stored event (`position_of`), which a retried command
needs to hand back the position of its first outcome.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol
from uuid import UUID

import psycopg
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from psycopg.sql import SQL, Identifier

from crm_common.settings import Settings


class PositionedRecorder(Protocol):
    def position_of(self, originator_id: UUID | str, originator_version: int) -> int | None:
        """The notification id (log position) of one stored event, if stored."""


class PositionedSQLiteApplicationRecorder(SQLiteApplicationRecorder):
    """SQLite application recorder that can find an event's log position."""

    def position_of(self, originator_id: UUID | str, originator_version: int) -> int | None:
        key = originator_id.hex if isinstance(originator_id, UUID) else originator_id
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                f"SELECT rowid FROM {self.events_table_name} "
                "WHERE originator_id=? AND originator_version=?",
                (key, originator_version),
            )
            row = c.fetchone()
        return None if row is None else int(row[0])


class PositionedPostgresApplicationRecorder(PostgresApplicationRecorder):
    """PostgreSQL application recorder that can find an event's log position."""

    def position_of(self, originator_id: UUID | str, originator_version: int) -> int | None:
        statement = SQL(
            "SELECT notification_id FROM {schema}.{table} "
            "WHERE originator_id=%s AND originator_version=%s"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
        )
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(statement, (originator_id, originator_version), prepare=True)
            row = curs.fetchone()
        return None if row is None else int(row["notification_id"])


def _conninfo(settings: Settings) -> str:
    pg = settings.postgres
    return psycopg.conninfo.make_conninfo(
        host=pg["host"],
        port=pg["port"],
        dbname=pg["dbname"],
        user=pg["user"],
        password=pg["password"] or None,
        connect_timeout=10,
    )


def ensure_postgres_schema(settings: Settings) -> None:
    """The library creates tables but not schemas; each service has its own."""
    with psycopg.connect(_conninfo(settings), autocommit=True) as conn:
        conn.execute(
            SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(settings.postgres["schema"]))
        )


@contextmanager
def creating_tables(settings: Settings) -> Iterator[None]:
    """Serialises the construction of applications and recorders (which open
    the store and create its tables if missing) among the processes of a
    service.

    PostgreSQL's `CREATE TABLE IF NOT EXISTS` is not safe against itself:
    replicas starting together on a fresh schema fail with a duplicate
    `pg_type` key; the schema's advisory lock makes the first create and the
    others find the tables. SQLite: every new connection asks for WAL mode,
    and switching a new file to WAL takes an exclusive lock that a second
    process opening the file at that moment does not wait for ("database is
    locked"); an exclusive `flock` on a file beside the database does the
    same job for the processes of one machine, which are the only ones that
    can share a SQLite file."""
    if settings.event_store == "postgres":
        with psycopg.connect(_conninfo(settings), autocommit=True) as conn:
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (settings.postgres["schema"],))
            try:
                yield
            finally:
                conn.execute(
                    "SELECT pg_advisory_unlock(hashtext(%s))", (settings.postgres["schema"],)
                )
        return
    settings.service_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.service_dir / "events.sqlite.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def application_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment for an `eventsourcing` Application of this service."""
    env: dict[str, str]
    if settings.event_store == "postgres":
        ensure_postgres_schema(settings)
        pg = settings.postgres
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "APPLICATION_RECORDER_TOPIC": (
                "crm_common.eventstore:PositionedPostgresApplicationRecorder"
            ),
            "POSTGRES_HOST": pg["host"],
            "POSTGRES_PORT": pg["port"],
            "POSTGRES_DBNAME": pg["dbname"],
            "POSTGRES_USER": pg["user"],
            "POSTGRES_PASSWORD": pg["password"],
            "POSTGRES_SCHEMA": pg["schema"],
            "POSTGRES_POOL_SIZE": "8",
            "POSTGRES_MAX_OVERFLOW": "8",
            "POSTGRES_CONNECT_TIMEOUT": "10",
            "POSTGRES_LOCK_TIMEOUT": "10",
        }
    else:
        settings.service_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "APPLICATION_RECORDER_TOPIC": (
                "crm_common.eventstore:PositionedSQLiteApplicationRecorder"
            ),
            "SQLITE_DBNAME": str(settings.service_dir / "events.sqlite"),
            "SQLITE_LOCK_TIMEOUT": "30",
        }
    env.update(extra)
    return env


def recorder_position_of(recorder: Any, originator_id: UUID | str, version: int) -> int | None:
    finder = getattr(recorder, "position_of", None)
    if finder is None:
        raise TypeError(
            f"{type(recorder).__name__} cannot find event positions; configure the "
            "application with crm_common.eventstore.application_env()"
        )
    result: int | None = finder(originator_id, version)
    return result
