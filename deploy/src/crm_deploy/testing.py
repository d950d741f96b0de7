"""Helpers of the tests that run the services' processes for real.

The fixture `processes` (the repository's conftest.py) collects what a test
starts and kills what is still running at its end; these functions start a
service's console script the way the local stack does, wait until an API
answers its health checks, and stop a process the way Kubernetes does.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm_common.auth.gate import AccessGate
from crm_common.eventstore import SnapshottingApplication, encode_state
from crm_common.settings import Settings
from crm_deploy.identity import Identity, ensure_identity
from crm_deploy.postgres import EmbeddedPostgres, PostgresTarget, wait_for

Started = list[subprocess.Popen[bytes]]


def clean_environment(
    data_dir: Path, identity: Identity | None = None, **extra: str
) -> dict[str, str]:
    """This process's environment without any platform setting (CRM_*, OTEL_*,
    POSTGRES_*), on a SQLite store under `data_dir`, trusting `identity`'s keys
    (default: a development identity under `data_dir`), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CRM_", "POSTGRES_"))}
    env.update(CRM_DATA_DIR=str(data_dir), CRM_EVENT_STORE="sqlite")
    env.update((identity or ensure_identity(data_dir / "identity")).env())
    env.update(extra)
    return env


# -- identity: real signed tokens, never a switch that turns checking off ------------


def bearer(token: str) -> dict[str, str]:
    """HTTP headers carrying a bearer token."""
    return {"authorization": f"Bearer {token}"}


def grpc_auth(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


def gate_for(service: str, identity: Identity) -> AccessGate:
    """The gate an API process of `service` would build, trusting `identity`'s keys."""
    env = identity.env()
    return AccessGate.configure(
        service,
        jwks=env["CRM_AUTH_JWKS"],
        issuer=env["CRM_AUTH_ISSUER"],
        audience=env["CRM_AUTH_AUDIENCE"],
    )


def start_process(
    service: str, command: str, env: dict[str, str], log: Path, started: Started
) -> subprocess.Popen[bytes]:
    """`crm-<service> <command>` with its output appended to `log`."""
    script = str(Path(sys.executable).with_name(f"crm-{service}"))
    process = subprocess.Popen(
        [script, command], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    started.append(process)
    return process


async def wait_serving(
    grpc_target: str,
    http_url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60,
) -> None:
    """The local stack's readiness check: gRPC health SERVING and GET /healthz 200."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(grpc_target) as channel, httpx.AsyncClient() as http:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise AssertionError(f"exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                healthz = await http.get(f"{http_url}/healthz", timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING and healthz.is_success:
                    return
            except (grpc.aio.AioRpcError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in time:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)


async def stop_gracefully(process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """SIGTERM, then the process must exit 0 within `timeout` seconds."""
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, timeout)
    assert code == 0, log.read_text()[-3000:]


def kill_leftovers(started: Started) -> None:
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# -- PostgreSQL: the production event store, on every machine -----------------------


@functools.cache
def postgres_target() -> PostgresTarget:
    """The PostgreSQL server of this test process, started on first use.

    By default a server of its own (`crm_deploy.postgres.EmbeddedPostgres`, fsync
    off, stopped when the process exits), so the PostgreSQL tests run alike on
    every machine. `CRM_TEST_POSTGRES_HOST` (with `_PORT`, `_DBNAME`, `_USER`,
    `_PASSWORD`) points them at an existing server instead.
    """
    host = os.environ.get("CRM_TEST_POSTGRES_HOST")
    if host:
        target = PostgresTarget(
            host=host,
            port=int(os.environ.get("CRM_TEST_POSTGRES_PORT", "5432")),
            dbname=os.environ.get("CRM_TEST_POSTGRES_DBNAME", "postgres"),
            user=os.environ.get("CRM_TEST_POSTGRES_USER", "postgres"),
            password=os.environ.get("CRM_TEST_POSTGRES_PASSWORD", ""),
        )
        reason = wait_for(target, timeout=10)
        if reason:
            raise RuntimeError(f"CRM_TEST_POSTGRES_HOST is set but unusable: {reason}")
        return target
    server = EmbeddedPostgres(durable=False)
    target = server.start()
    atexit.register(server.stop)
    return target


def postgres_settings(service: str, schema: str, data_dir: Path = Path("unused")) -> Settings:
    """Settings of `service` on the tests' PostgreSQL, in `schema` (created on first use)."""
    return Settings(
        service=service,
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="postgres",
        postgres=postgres_target().settings(schema),
    )


def create_schema(schema: str) -> None:
    import psycopg
    from psycopg.sql import SQL, Identifier

    with psycopg.connect(**postgres_target().connect_kwargs(), autocommit=True) as conn:
        conn.execute(SQL("CREATE SCHEMA {}").format(Identifier(schema)))


def drop_schema(schema: str) -> None:
    import psycopg
    from psycopg.sql import SQL, Identifier

    with psycopg.connect(**postgres_target().connect_kwargs(), autocommit=True) as conn:
        conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))


@contextlib.contextmanager
def postgres_database(prefix: str = "crm_test") -> Iterator[PostgresTarget]:
    """A fresh database on the tests' PostgreSQL (its own schemas start empty
    whatever ran before), dropped afterwards; yields where it answers."""
    import dataclasses
    import uuid

    import psycopg
    from psycopg.sql import SQL, Identifier

    server = postgres_target()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(**server.connect_kwargs(), autocommit=True) as conn:
        conn.execute(SQL("CREATE DATABASE {}").format(Identifier(name)))
    try:
        yield dataclasses.replace(server, dbname=name)
    finally:
        with psycopg.connect(**server.connect_kwargs(), autocommit=True) as conn:
            conn.execute(SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(Identifier(name)))


def postgres_env(target: PostgresTarget) -> dict[str, str]:
    """CRM_* variables that put every service process on `target`, each service in
    the schema named after it (the production default)."""
    env = target.env("unused")
    del env["CRM_POSTGRES_SCHEMA"]
    return env


# -- personal data at rest: what a raw reader of the store would see -----------------


def stored_rows(settings: Settings, tables: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Every row of `tables` in the store of `settings`, read raw (column to
    value), by table: the SQLite files in `settings.service_dir`, or the schema
    of `settings.postgres` on the tests' PostgreSQL.

    For the personal data tests, which scan the event, snapshot and key tables
    the way someone holding the database but no master key would. Each table
    must exist (with no rows is fine); one that does not fails the test.
    """
    wanted = tuple(tables)
    found: dict[str, list[dict[str, Any]]] = {}
    if settings.event_store == "sqlite":
        import sqlite3

        for file in sorted(settings.service_dir.glob("*.sqlite")):
            with contextlib.closing(sqlite3.connect(file)) as db:
                names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
                for table in (t for t in wanted if t in names):
                    cursor = db.execute(f'SELECT * FROM "{table}"')
                    columns = [c[0] for c in cursor.description]
                    rows = [dict(zip(columns, row, strict=True)) for row in cursor]
                    found.setdefault(table, []).extend(rows)
    else:
        import psycopg
        from psycopg.sql import SQL, Identifier

        schema = settings.postgres["schema"]
        with psycopg.connect(**postgres_target().connect_kwargs()) as conn:
            for table in wanted:
                result = conn.execute(SQL("SELECT * FROM {}").format(Identifier(schema, table)))
                columns = [c.name for c in result.description or ()]
                found[table] = [dict(zip(columns, row, strict=True)) for row in result]
    missing = sorted(set(wanted) - set(found))
    assert not missing, f"a table to scan is missing: {missing}"
    return found


def found_in_clear(settings: Settings, tables: Iterable[str], values: Iterable[str]) -> list[str]:
    """Those of `values` that a raw scan of every row of `tables` finds (see
    `stored_rows`), in their order: what the store holds in clear.

    For the personal data tests: a person's data must not be found, the
    business facts next to it must be (so the scan is seen to work).
    """
    rows = (row for table in stored_rows(settings, tables).values() for row in table)
    cells = (v for row in rows for v in row.values() if v is not None)
    blob = b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in cells)
    return [v for v in values if v.encode() in blob]


# -- snapshots: what every service's snapshot tests check ------------------------------


def assert_loads_from_snapshot(
    app: SnapshottingApplication, aggregate_id: UUID, monkeypatch: Any, interval: int
) -> Any:
    """The aggregate loads from its latest snapshot (taken every `interval`
    events), reading only the events after it, and equals a replay of all its
    events field for field. `monkeypatch` is pytest's, to count the reads."""
    assert app.snapshots is not None
    replayed = app.replay(aggregate_id)
    [snapshot] = app.snapshots.get(aggregate_id, desc=True, limit=1)
    assert snapshot.originator_version == replayed.version - replayed.version % interval
    assert snapshot.originator_version >= interval
    reads: list[Any] = []
    real_get = app.events.get

    def counting_get(*args: Any, **kwargs: Any) -> Any:
        events = list(real_get(*args, **kwargs))
        reads.append((kwargs.get("gt"), len(events)))
        return events

    monkeypatch.setattr(app.events, "get", counting_get)
    loaded: Any = app.repository.get(aggregate_id)
    monkeypatch.undo()
    assert reads == [(snapshot.originator_version, replayed.version - snapshot.originator_version)]
    assert type(loaded) is type(replayed)
    assert encode_state(vars(loaded)) == encode_state(vars(replayed))
    return loaded


def assert_log_holds_events_only(app: SnapshottingApplication, versions: int) -> None:
    notifications = app.recorder.select_notifications(1, 100_000)
    assert len(notifications) == versions
    assert not any("Snapshot" in n.topic for n in notifications)
