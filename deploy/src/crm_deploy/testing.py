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
import dataclasses
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


# -- raw scans of a whole stack: everything someone holding its disks would read ---------


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def sqlite_cells(data_dir: Path) -> Iterator[tuple[str, bytes]]:
    """Every non-NULL cell of every table of every SQLite file under `data_dir`
    (the services' event, key and query stores), as (file/table, raw bytes)."""
    import sqlite3

    for file in sorted(Path(data_dir).rglob("*.sqlite")):
        # Read only: the services may be writing meanwhile (WAL lets both go on).
        with contextlib.closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True)) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                where = f"{file.relative_to(data_dir)}/{table}"
                for row in db.execute(f'SELECT * FROM "{table}"'):
                    yield from ((where, _as_bytes(v)) for v in row if v is not None)


def postgres_cells(target: PostgresTarget) -> Iterator[tuple[str, bytes]]:
    """Every non-NULL cell of every table of every schema of `target`'s database
    (bytea as its bytes, everything else as PostgreSQL's text for it)."""
    import psycopg
    from psycopg.sql import SQL, Identifier

    with psycopg.connect(**target.connect_kwargs()) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, table in tables:
            result = conn.execute(SQL("SELECT * FROM {}").format(Identifier(schema, table)))
            for row in result:
                yield from ((f"{schema}.{table}", _as_bytes(v)) for v in row if v is not None)


async def kafka_records(bootstrap: str) -> list[tuple[str, bytes]]:
    """Every record of every topic of the broker from the beginning (aborted
    transactions too), as (topic, key + value + every header's name and value)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    # Every topic as the broker lists it (a consumer's first metadata can be empty).
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        names = sorted(await admin.list_topics())
        described = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    partitions = [
        TopicPartition(d["topic"], part["partition"])
        for d in described
        if d["error_code"] == 0
        for part in d["partitions"]
    ]
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 60
        idle = 0
        # Until every partition is read to its end; a partition ending in a
        # transaction marker (never delivered) is done once nothing more comes.
        while idle < 4:
            behind = [tp for tp in partitions if await consumer.position(tp) < ends[tp]]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise AssertionError("could not read every Kafka record within 60 s")
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                for r in records:
                    parts = [r.key or b"", r.value or b""]
                    parts += [b"%s=%s" % (k.encode(), v or b"") for k, v in r.headers]
                    found.append((tp.topic, b"\n".join(parts)))
        return found
    finally:
        await consumer.stop()


def documents(mongo_url: str, skip: Iterable[str] = ()) -> Iterator[tuple[str, bytes]]:
    """Every document of every collection of every database of the document
    store but those named in `skip`, as (database.collection, its raw BSON)."""
    from bson.raw_bson import RawBSONDocument
    from pymongo import MongoClient

    skipped = set(skip)
    with MongoClient(mongo_url, document_class=RawBSONDocument) as client:
        for database in client.list_database_names():
            if database in skipped:
                continue
            for collection in client[database].list_collection_names():
                for document in client[database][collection].find({}):
                    yield f"{database}.{collection}", bytes(document.raw)


def found_where(cells: Iterable[tuple[str, bytes]], values: Iterable[str]) -> dict[str, list[str]]:
    """Each of `values` found in clear in `cells`, with where it was found."""
    wanted = {v: v.encode() for v in values}
    found: dict[str, set[str]] = {}
    for where, blob in cells:
        for value, encoded in wanted.items():
            if encoded in blob:
                found.setdefault(value, set()).add(where)
    return {v: sorted(w) for v, w in found.items()}


# -- one person's history in every service (the erase test and benchmark) -----------------


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every call that does not carry one."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.extend(grpc_auth(self.token))
        return await continuation(details._replace(metadata=grpc.aio.Metadata(*metadata)), request)


class PlatformClients:
    """gRPC stubs of every API of a stack (`service_ports`), calling as one user
    of `identity` with `role`: `contacts`, `pipeline`, `tickets`, `loyalty`,
    `customer360`. Use as `async with PlatformClients(...) as clients:`."""

    def __init__(
        self,
        service_ports: dict[str, tuple[int, int]],
        identity: Identity,
        role: str = "admin",
        subject: str | None = None,
    ) -> None:
        from crm.contacts.v1 import contacts_pb2_grpc
        from crm.customer360.v1 import customer360_pb2_grpc
        from crm.loyalty.v1 import loyalty_pb2_grpc
        from crm.pipeline.v1 import pipeline_pb2_grpc
        from crm.tickets.v1 import tickets_pb2_grpc

        token = identity.mint(role, subject=subject or f"e2e-{role}", client="e2e-tests")
        self._channels: dict[str, grpc.aio.Channel] = {
            service: grpc.aio.insecure_channel(
                f"127.0.0.1:{ports[0]}", interceptors=[_BearerToken(token)]
            )
            for service, ports in service_ports.items()
        }
        ch = self._channels
        # The generated stubs are untyped (mypy sees them so in the whole tree only).
        untyped: Any = contacts_pb2_grpc.ContactsServiceStub
        self.contacts = untyped(ch["contacts"])
        untyped = pipeline_pb2_grpc.PipelineServiceStub
        self.pipeline = untyped(ch["pipeline"])
        untyped = tickets_pb2_grpc.TicketsServiceStub
        self.tickets = untyped(ch["tickets"])
        untyped = loyalty_pb2_grpc.LoyaltyServiceStub
        self.loyalty = untyped(ch["loyalty"])
        untyped = customer360_pb2_grpc.Customer360ServiceStub
        self.customer360 = untyped(ch["analytics"])

    async def __aenter__(self) -> PlatformClients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for channel in self._channels.values():
            await channel.close()


@dataclasses.dataclass
class PersonalValues:
    """What one person told the platform, each value unique to the run."""

    given_name: str
    family_name: str
    email: str
    #: As given (E.164, so also as stored).
    phone: str
    role: str
    birthday: str
    summaries: list[str] = dataclasses.field(default_factory=list)
    deal_names: list[str] = dataclasses.field(default_factory=list)
    activity_titles: list[str] = dataclasses.field(default_factory=list)
    case_subjects: list[str] = dataclasses.field(default_factory=list)
    replies: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def unique(cls) -> PersonalValues:
        import secrets

        tag = secrets.token_hex(4)
        return cls(
            given_name=f"Ysolde{tag}",
            family_name=f"Quintrell{tag}",
            email=f"ysolde.{tag}@example.org",
            phone=f"+414466{secrets.randbelow(10**5):05d}",
            role=f"Head gardener {tag}",
            birthday="07-19",
        )

    def every_value(self) -> list[str]:
        """Every personal value, for raw scans (the phone's digits without '+')."""
        return [
            self.given_name,
            self.family_name,
            self.email,
            self.phone.lstrip("+"),
            self.role,
            self.birthday,
            *self.summaries,
            *self.deal_names,
            *self.activity_titles,
            *self.case_subjects,
            *self.replies,
        ]


@dataclasses.dataclass
class PersonHistory:
    """The ids and business facts of a person's history across the services."""

    person_id: str
    company_id: str
    pipeline_id: str
    deal_ids: list[str]
    activity_ids: list[str]
    case_ids: list[str]
    #: Per source (contacts, pipeline, tickets, loyalty): the latest write's position.
    positions: dict[str, int]
    #: Total of the deals' amounts (EUR), all won.
    won_amount: Any
    points: int


async def create_history(
    clients: PlatformClients,
    personal: PersonalValues,
    *,
    interactions: int = 2,
    deals: int = 1,
    activities_per_deal: int = 1,
    cases: int = 1,
    replies_per_case: int = 1,
    earnings: int = 1,
) -> PersonHistory:
    """A person with a company link, consent, interactions; deals named after
    them with activities, all won; cases with replies; a loyalty membership with
    a birthday and a ledger of earnings. Fills `personal`'s lists."""
    import uuid
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from google.protobuf.timestamp_pb2 import Timestamp

    from crm.contacts.v1 import contacts_pb2 as c
    from crm.loyalty.v1 import loyalty_pb2 as lp
    from crm.pipeline.v1 import pipeline_pb2 as p
    from crm.tickets.v1 import tickets_pb2 as t

    def rid() -> str:
        return f"history-{uuid.uuid4().hex}"

    tag = personal.family_name
    positions: dict[str, int] = {}
    created = await clients.contacts.CreatePerson(
        c.CreatePersonRequest(
            request_id=rid(),
            given_name=personal.given_name,
            family_name=personal.family_name,
            channels=[
                c.NewChannelIdentity(channel=c.CHANNEL_EMAIL, address=personal.email),
                c.NewChannelIdentity(channel=c.CHANNEL_PHONE, address=personal.phone),
            ],
            owner="e2e-seller",
        )
    )
    person_id = created.result.id
    company = await clients.contacts.CreateCompany(
        c.CreateCompanyRequest(request_id=rid(), name=f"Glasshouse {uuid.uuid4().hex[:6]} Ltd")
    )
    await clients.contacts.LinkPersonToCompany(
        c.LinkPersonToCompanyRequest(
            request_id=rid(),
            person_id=person_id,
            company_id=company.result.id,
            role=personal.role,
        )
    )
    written = await clients.contacts.RecordConsent(
        c.RecordConsentRequest(
            request_id=rid(),
            contact_id=person_id,
            channel=c.CHANNEL_EMAIL,
            address=personal.email,
            status=c.CONSENT_STATUS_GRANTED,
            source="web form",
        )
    )
    positions["contacts"] = written.result.position
    for n in range(interactions):
        summary = f"{personal.given_name} asked about the frost cover, note {n}"
        personal.summaries.append(summary)
        logged = await clients.contacts.LogInteraction(
            c.LogInteractionRequest(
                request_id=rid(),
                contact_id=person_id,
                kind=c.INTERACTION_KIND_CALL,
                direction=c.DIRECTION_INBOUND,
                channel=c.CHANNEL_PHONE,
                summary=summary,
            )
        )
        positions["contacts"] = logged.result.position

    defined = await clients.pipeline.DefinePipeline(
        p.DefinePipelineRequest(
            request_id=rid(),
            name=f"Garden sales {uuid.uuid4().hex[:6]}",
            stages=[
                p.StageInput(
                    stage_id="qualify",
                    name="Qualify",
                    probability="10",
                    category=p.FORECAST_CATEGORY_PIPELINE,
                ),
                p.StageInput(
                    stage_id="won",
                    name="Won",
                    probability="100",
                    category=p.FORECAST_CATEGORY_CLOSED_WON,
                ),
                p.StageInput(
                    stage_id="lost",
                    name="Lost",
                    probability="0",
                    category=p.FORECAST_CATEGORY_CLOSED_LOST,
                ),
            ],
        )
    )
    pipeline_id = defined.pipeline.id
    close = (datetime.now(UTC).date() + timedelta(days=20)).isoformat()
    deal_ids: list[str] = []
    activity_ids: list[str] = []
    won_amount = Decimal("0")
    for d in range(deals):
        name = f"{tag} greenhouse {d}"
        personal.deal_names.append(name)
        amount = Decimal("4321.00") + d
        opened = await clients.pipeline.OpenOpportunity(
            p.OpenOpportunityRequest(
                request_id=rid(),
                pipeline_id=pipeline_id,
                name=name,
                customer_id=person_id,
                person_id=person_id,
                owner="e2e-seller",
                amount=p.Money(amount=f"{amount:.2f}", currency="EUR"),
                expected_close_date=close,
            )
        )
        deal_id = opened.opportunity.id
        deal_ids.append(deal_id)
        for a in range(activities_per_deal):
            title = f"Call {personal.given_name} about frost, {d}.{a}"
            personal.activity_titles.append(title)
            due = Timestamp()
            due.FromDatetime(datetime.now(UTC) + timedelta(days=2))
            scheduled = await clients.pipeline.ScheduleActivity(
                p.ScheduleActivityRequest(
                    request_id=rid(),
                    subject_kind=p.SUBJECT_KIND_OPPORTUNITY,
                    subject_id=deal_id,
                    kind=p.ACTIVITY_KIND_CALL,
                    title=title,
                    owner="e2e-seller",
                    due_at=due,
                )
            )
            activity_ids.append(scheduled.activity.id)
        won = await clients.pipeline.WinOpportunity(
            p.WinOpportunityRequest(request_id=rid(), opportunity_id=deal_id)
        )
        positions["pipeline"] = won.result.position
        won_amount += amount

    case_ids: list[str] = []
    for k in range(cases):
        subject = f"The heater of {tag} broke ({k})"
        personal.case_subjects.append(subject)
        opened_case = await clients.tickets.OpenCase(
            t.OpenCaseRequest(
                request_id=rid(),
                customer_id=person_id,
                channel=t.CHANNEL_EMAIL,
                subject=subject,
                description=f"{personal.given_name} writes it stopped at night ({k}).",
                category="repairs",
                priority=t.PRIORITY_NORMAL,
                team="repairs",
            )
        )
        case_ids.append(opened_case.result.id)
        version = opened_case.result.version
        positions["tickets"] = opened_case.result.position
        for r in range(replies_per_case):
            body = f"Dear {personal.given_name}, a new heater is on its way ({k}.{r})."
            personal.replies.append(body)
            replied = await clients.tickets.ReplyToCase(
                t.ReplyToCaseRequest(
                    request_id=rid(),
                    case_id=opened_case.result.id,
                    expected_version=version,
                    author_kind=t.AUTHOR_KIND_AGENT,
                    body=body,
                )
            )
            version = replied.result.version
            positions["tickets"] = replied.result.position

    enrolled = await clients.loyalty.EnrolMember(
        lp.EnrolMemberRequest(
            request_id=rid(),
            contact_id=person_id,
            channel=lp.ENROLMENT_CHANNEL_WEB,
            birthday=personal.birthday,
        )
    )
    positions["loyalty"] = enrolled.result.position
    points = 0
    for e in range(earnings):
        earned = await clients.loyalty.EarnPoints(
            lp.EarnPointsRequest(
                request_id=rid(),
                contact_id=person_id,
                lines=[
                    lp.PurchaseLine(
                        line_id="1",
                        amount=lp.Money(amount="120.00", currency="EUR"),
                        category="garden",
                    )
                ],
                reference=f"till-{e}",
            )
        )
        points += earned.points
        positions["loyalty"] = earned.result.position
    return PersonHistory(
        person_id=person_id,
        company_id=company.result.id,
        pipeline_id=pipeline_id,
        deal_ids=deal_ids,
        activity_ids=activity_ids,
        case_ids=case_ids,
        positions=positions,
        won_amount=won_amount,
        points=points,
    )


def settings_in(env: dict[str, str], service: str) -> Settings:
    """The settings a process of `service` reads from the environment `env`."""
    from unittest import mock

    with mock.patch.dict(os.environ, env, clear=True):
        return Settings.from_env(service)


def erased_subjects(env: dict[str, str], history: PersonHistory) -> dict[str, dict[str, str]]:
    """Per owning service, the state of each data key of the person's subjects
    ("destroyed", "live", or "none" when the store has no row), read from the
    key stores of a stack whose services run with `env`: contacts and tickets
    the person, pipeline the person and the activities of their deals, loyalty
    the person's member."""
    from crm_common.privacy.keystore import KeyStoreLocation
    from crm_loyalty.domain.members import member_id

    subjects = {
        "contacts": [history.person_id],
        "pipeline": [history.person_id, *history.activity_ids],
        "tickets": [history.person_id],
        "loyalty": [str(member_id(history.person_id))],
    }
    states: dict[str, dict[str, str]] = {}
    for owner, ids in subjects.items():
        store = KeyStoreLocation.of(settings_in(env, owner)).open()
        try:
            rows = {s: store.fetch(s) for s in ids}
        finally:
            store.close()
        states[owner] = {
            s: "none" if row is None else "destroyed" if row.destroyed else "live"
            for s, row in rows.items()
        }
    return states
