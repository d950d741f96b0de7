"""The PostgreSQL the benchmarks measure: a server of the run's own, with
PostgreSQL's default durability (every commit waits for its WAL flush, as in
production), so a fresh machine measures the production store too.
`CRM_BENCH_POSTGRES_HOST` (with `_PORT`, `_DBNAME`, `_USER`, `_PASSWORD`)
measures an existing server instead."""

from __future__ import annotations

import atexit
import functools
import os

import psycopg
from psycopg.sql import SQL, Identifier

from crm_deploy.postgres import EmbeddedPostgres, PostgresTarget


@functools.cache
def target() -> PostgresTarget:
    host = os.environ.get("CRM_BENCH_POSTGRES_HOST")
    if host:
        return PostgresTarget(
            host=host,
            port=int(os.environ.get("CRM_BENCH_POSTGRES_PORT", "5432")),
            dbname=os.environ.get("CRM_BENCH_POSTGRES_DBNAME", "postgres"),
            user=os.environ.get("CRM_BENCH_POSTGRES_USER", "postgres"),
            password=os.environ.get("CRM_BENCH_POSTGRES_PASSWORD", ""),
        )
    server = EmbeddedPostgres(durable=True)
    started = server.start()
    atexit.register(server.stop)
    return started


def settings(schema: str) -> dict[str, str]:
    """`Settings.postgres` for `schema`."""
    result: dict[str, str] = target().settings(schema)
    return result


def env(schema: str) -> dict[str, str]:
    """The CRM_POSTGRES_* variables of a service process on `schema`."""
    result: dict[str, str] = target().env(schema)
    return result


def drop_schema(schema: str) -> None:
    with psycopg.connect(**target().connect_kwargs(), autocommit=True) as conn:
        conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))
