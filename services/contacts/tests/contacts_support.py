"""Helpers of the contacts tests: event store settings, a hand-moved clock."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

from crm_common.settings import Settings
from crm_contacts.application import ContactsApplication

PG = {"host": "127.0.0.1", "port": "5432", "dbname": "test", "user": "postgres", "password": ""}


@functools.cache
def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        with psycopg.connect(
            host=PG["host"],
            port=PG["port"],
            dbname=PG["dbname"],
            user=PG["user"],
            connect_timeout=3,
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return f"PostgreSQL on {PG['host']}:{PG['port']} is not reachable: {first_line}"
    return None


def sqlite_settings(data_dir: Path) -> Settings:
    return Settings(
        service="contacts",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


def postgres_settings(schema: str) -> Settings:
    return Settings(
        service="contacts",
        data_dir=Path("unused"),
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="postgres",
        postgres={**PG, "schema": schema},
    )


def drop_schema(schema: str) -> None:
    with psycopg.connect(
        host=PG["host"], port=PG["port"], dbname=PG["dbname"], user=PG["user"], autocommit=True
    ) as conn:
        conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))


class Clock:
    """A clock the test moves by hand, so times in results are known."""

    def __init__(self, start: datetime = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def log_length(app: ContactsApplication) -> int:
    """How many events the store holds (its notification log's last id)."""
    recorder: Any = app.recorder
    return int(recorder.max_notification_id() or 0)
