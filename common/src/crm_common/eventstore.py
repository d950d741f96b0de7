"""Event store setup: the `eventsourcing` library's SQLite or PostgreSQL
module, chosen by configuration, with one addition to its recorders: finding
the log position of a stored event (`position_of`), which a retried command
needs to hand back the position of its first outcome.

And snapshots of long-lived aggregates (`SnapshottingApplication`): every
`CRM_SNAPSHOT_INTERVAL` events (default 50) of an aggregate of a kind its
application names, the aggregate's state is stored in the library's snapshot
table (beside the events, not in the notification log, so never relayed), and
a load starts from the latest snapshot and replays only the events after it.

And personal data encrypted at rest (`crm_common.privacy`, docs/security.md
"Privacy"): with master keys configured, the applications' mapper seals the
fields an event class declares personal under the subject's data key, and
snapshots of aggregates with such events whole; `CRM_EVENT_CIPHER_KEYS`
adds the library's whole-event cipher on top.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar, Protocol
from uuid import UUID

import psycopg
from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    Repository,
    project_aggregate,
)
from eventsourcing.domain import Aggregate, DomainEventProtocol, Snapshot
from eventsourcing.persistence import IntegrityError, Mapper, Recording
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import Environment, EnvType, get_topic, resolve_topic, strtobool
from psycopg.sql import SQL, Identifier

from crm_common.privacy.cipher import KEYS_FILE_VAR as EVENT_CIPHER_KEYS_FILE_VAR
from crm_common.privacy.cipher import KEYS_VAR as EVENT_CIPHER_KEYS_VAR
from crm_common.privacy.client import KeyClient, SubjectErased
from crm_common.privacy.config import key_client_from_env, privacy_env
from crm_common.privacy.mapper import ErasedSnapshot, PersonalDataMapper, may_snapshot
from crm_common.settings import Settings

log = logging.getLogger(__name__)


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
    """The library creates tables but not schemas; each service has its own.

    `CREATE SCHEMA IF NOT EXISTS` is not safe against itself either: two
    processes of a service starting together on a fresh database (the API and
    the follower) may both find no schema and one fails on the catalogue's
    unique index. An advisory lock of its own makes them take turns (not the
    one `creating_tables` takes: this runs inside it, on another connection)."""
    schema = settings.postgres["schema"]
    lock = f"create schema {schema}"
    with psycopg.connect(_conninfo(settings), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock,))
        try:
            conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock,))


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
    env.update(privacy_env(settings))
    if settings.event_cipher_keys or settings.event_cipher_keys_file:
        env["CIPHER_TOPIC"] = "crm_common.privacy.cipher:StoreCipher"
        env[EVENT_CIPHER_KEYS_VAR] = settings.event_cipher_keys
        env[EVENT_CIPHER_KEYS_FILE_VAR] = settings.event_cipher_keys_file
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


# -- snapshots ------------------------------------------------------------------------------

#: Events of one long-lived aggregate between two of its snapshots, unless the
#: environment variable `CRM_SNAPSHOT_INTERVAL` says otherwise (0: no snapshots
#: are taken or read).
DEFAULT_SNAPSHOT_INTERVAL = 50
SNAPSHOT_INTERVAL_VAR = "CRM_SNAPSHOT_INTERVAL"


def snapshot_interval(value: str | None) -> int:
    """The snapshot interval configured by `value` (the variable's text)."""
    if value is None or not value.strip():
        return DEFAULT_SNAPSHOT_INTERVAL
    try:
        interval = int(value)
    except ValueError:
        interval = -1
    if interval < 0:
        raise ValueError(
            f"{SNAPSHOT_INTERVAL_VAR} must be a whole number of events "
            f"(0 turns snapshots off), not {value!r}"
        )
    return interval


_TAG = "~"


def encode_state(value: Any) -> Any:
    """`value` as JSON-native data that `decode_state` turns back into an
    equal value of the same types (tuples stay tuples, sets sets, enum
    members and dataclass value objects themselves). Raises TypeError for
    what it cannot represent faithfully, so that no snapshot is stored
    rather than a wrong one."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if isinstance(value, Enum):
        return {_TAG: "enum", "c": get_topic(kind), "v": encode_state(value.value)}
    if kind is list:
        return [encode_state(v) for v in value]
    if kind is dict:
        if _TAG not in value and all(type(k) is str for k in value):
            return {k: encode_state(v) for k, v in value.items()}
        return {_TAG: "map", "v": [[encode_state(k), encode_state(v)] for k, v in value.items()]}
    if kind is tuple:
        return {_TAG: "tuple", "v": [encode_state(v) for v in value]}
    if kind is set or kind is frozenset:
        items = sorted(
            (encode_state(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True)
        )
        return {_TAG: kind.__name__, "v": items}
    if kind is Decimal:
        return {_TAG: "decimal", "v": str(value)}
    if kind is datetime or kind is date or kind is time:
        return {_TAG: kind.__name__, "v": value.isoformat()}
    if kind is timedelta:
        return {_TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if kind is UUID:
        return {_TAG: "uuid", "v": value.hex}
    if kind is bytes:
        return {_TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple) and hasattr(kind, "_fields"):
        return {_TAG: "namedtuple", "c": get_topic(kind), "v": [encode_state(v) for v in value]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        attributes = (
            vars(value)
            if hasattr(value, "__dict__")
            else {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        )
        return {
            _TAG: "object",
            "c": get_topic(kind),
            "v": {name: encode_state(v) for name, v in attributes.items()},
        }
    raise TypeError(f"a snapshot cannot hold a {kind.__module__}.{kind.__qualname__}")


def decode_state(data: Any) -> Any:
    """The value that `encode_state` turned into `data`."""
    if isinstance(data, list):
        return [decode_state(v) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(_TAG)
    if tag is None:
        return {k: decode_state(v) for k, v in data.items()}
    v = data["v"]
    match tag:
        case "enum":
            return resolve_topic(data["c"])(decode_state(v))
        case "map":
            return {decode_state(k): decode_state(x) for k, x in v}
        case "tuple":
            return tuple(decode_state(x) for x in v)
        case "set":
            return {decode_state(x) for x in v}
        case "frozenset":
            return frozenset(decode_state(x) for x in v)
        case "decimal":
            return Decimal(v)
        case "datetime":
            return datetime.fromisoformat(v)
        case "date":
            return date.fromisoformat(v)
        case "time":
            return time.fromisoformat(v)
        case "timedelta":
            return timedelta(days=v[0], seconds=v[1], microseconds=v[2])
        case "uuid":
            return UUID(v)
        case "bytes":
            return base64.b64decode(v)
        case "namedtuple":
            return resolve_topic(data["c"])(*(decode_state(x) for x in v))
        case "object":
            cls = resolve_topic(data["c"])
            obj = cls.__new__(cls)
            for name, x in v.items():
                object.__setattr__(obj, name, decode_state(x))
            return obj
    raise ValueError(f"unknown value tag {tag!r} in a snapshot")


class AggregateSnapshot(Snapshot):
    """A snapshot whose state keeps its Python types through JSON (see
    `encode_state`): no transcodings to register per service, and a value
    it cannot represent means no snapshot rather than a different aggregate."""

    @classmethod
    def take(cls, aggregate: Any) -> AggregateSnapshot:
        taken = super().take(aggregate)
        return dataclasses.replace(taken, state={"format": 1, "state": encode_state(taken.state)})

    def mutate(self, _: None) -> Any:
        if self.state.get("format") != 1:
            raise ValueError(f"unknown snapshot format {self.state.get('format')!r}")
        decoded = dataclasses.replace(self, state=decode_state(self.state["state"]))
        return Snapshot.mutate(decoded, None)


class SnapshotTolerantRepository(Repository[UUID]):
    """A repository that replays all of an aggregate's events when its
    snapshot cannot be used (a renamed class, an unknown format): a snapshot
    only saves time, it never makes an aggregate unloadable."""

    def _reconstruct_aggregate(
        self, aggregate_id: UUID, version: int | None, projector_func: Any
    ) -> Any:
        try:
            return super()._reconstruct_aggregate(aggregate_id, version, projector_func)
        except AggregateNotFoundError:
            raise
        except ErasedSnapshot:
            # The subject was erased: its events read redacted, its snapshot not at all.
            log.debug("snapshot of erased aggregate %s skipped", aggregate_id)
        except Exception:
            if self.snapshot_store is None:
                raise
            log.warning(
                "snapshot of aggregate %s unusable, replaying its events",
                aggregate_id,
                exc_info=True,
            )
        aggregate = projector_func(
            None, self.event_store.get(originator_id=aggregate_id, lte=version)
        )
        if aggregate is None:
            raise AggregateNotFoundError(
                f"Aggregate {aggregate_id!r} version {version!r} not found."
            )
        return aggregate


class SnapshottingApplication(Application[UUID]):
    """An application that snapshots its long-lived aggregates.

    A service names its kinds in `snapshot_kinds`; each save then stores a
    snapshot of every aggregate of those kinds whose version it takes to a
    multiple of the interval (`CRM_SNAPSHOT_INTERVAL`, default
    `DEFAULT_SNAPSHOT_INTERVAL`), in the library's snapshot table (SQLite:
    `stored_snapshots`; PostgreSQL: `<service>_snapshots` in the service's
    schema), outside the notification log that the relay publishes. Loads go
    through the library's repository: the latest snapshot, then the events
    after it. Taking a snapshot happens after the save has committed and a
    failure is logged, never raised: the command has succeeded either way."""

    snapshot_kinds: ClassVar[tuple[type[Aggregate], ...]] = ()
    #: The data keys of this service's subjects; None without master keys.
    personal_data_keys: KeyClient | None = None

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        environment = super().construct_env(name, env)
        self.snapshot_interval = snapshot_interval(environment.get(SNAPSHOT_INTERVAL_VAR))
        enabled = bool(self.snapshot_interval and self.snapshot_kinds)
        environment["IS_SNAPSHOTTING_ENABLED"] = "y" if enabled else "n"
        return environment

    def construct_mapper(self) -> Mapper[UUID]:
        """The library's mapper (transcoder, optional whole-event cipher and
        compressor) that also seals declared personal data when master keys
        are configured (`crm_common.privacy.mapper`)."""
        self.personal_data_keys = key_client_from_env(self.env)
        return PersonalDataMapper(
            transcoder=self.construct_transcoder(),
            compressor=self.factory.compressor(),
            cipher=self.factory.cipher(),
            keys=self.personal_data_keys,
        )

    def close(self) -> None:
        super().close()
        if self.personal_data_keys is not None:
            self.personal_data_keys.close()

    def construct_repository(self) -> Repository[UUID]:
        maxsize = self.env.get(self.AGGREGATE_CACHE_MAXSIZE)
        return SnapshotTolerantRepository(
            event_store=self.events,
            snapshot_store=self.snapshots,
            cache_maxsize=int(maxsize) if maxsize else None,
            fastforward=strtobool(self.env.get(self.AGGREGATE_CACHE_FASTFORWARD, "y")),
            fastforward_skipping=strtobool(
                self.env.get(self.AGGREGATE_CACHE_FASTFORWARD_SKIPPING, "n")
            ),
            deepcopy_from_cache=strtobool(self.env.get(self.DEEPCOPY_FROM_AGGREGATE_CACHE, "y")),
        )

    def snapshot_kind_of(self, event: DomainEventProtocol[UUID]) -> type[Aggregate] | None:
        """The snapshotted kind (or one of them) that stores `event`, or None."""
        event_class = type(event)
        for kind in self.snapshot_kinds:
            # An event a base class's method triggers is the base's event class.
            for owner in kind.__mro__:
                if vars(owner).get(event_class.__name__) is event_class:
                    return kind
        return None

    def may_snapshot(self, event: DomainEventProtocol[UUID]) -> bool:
        """Whether `event` belongs to a snapshotted kind that may be snapshotted:
        with personal data encrypted, not a kind holding other subjects'
        personal data (erasing them could not reach the snapshot's copy)."""
        kind = self.snapshot_kind_of(event)
        if kind is None:
            return False
        return self.personal_data_keys is None or may_snapshot(kind)

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        recordings = super().save(*objs, **kwargs)
        interval = self.snapshot_interval
        if self.snapshots is None or not interval:
            return recordings
        # One snapshot per aggregate and save: at the last multiple it reached.
        due: dict[UUID, int] = {}
        for recording in recordings:
            event = recording.domain_event
            version = event.originator_version
            if version % interval == 0 and self.may_snapshot(event):
                due[event.originator_id] = max(version, due.get(event.originator_id, 0))
        for aggregate_id, version in due.items():
            try:
                self.take_snapshot(aggregate_id, version)
            except IntegrityError:
                pass  # another process of the service took this one
            except SubjectErased:
                pass  # an erased subject's aggregate is replayed, never snapshotted
            except Exception:
                log.warning(
                    "no snapshot of aggregate %s at version %s",
                    aggregate_id,
                    version,
                    exc_info=True,
                )
        return recordings

    def replay(self, aggregate_id: UUID) -> Any:
        """The aggregate from all of its events, ignoring any snapshot."""
        aggregate = project_aggregate(None, self.events.get(aggregate_id))
        if aggregate is None:
            raise AggregateNotFoundError(f"Aggregate {aggregate_id!r} not found.")
        return aggregate

    def take_snapshot(
        self,
        aggregate_id: UUID,
        version: int | None = None,
        projector_func: Any = project_aggregate,
    ) -> None:
        """Stores a snapshot of the aggregate as of `version` (default: latest)."""
        if self.snapshots is None:
            raise RuntimeError(f"snapshots are off ({SNAPSHOT_INTERVAL_VAR}=0)")
        aggregate = self.repository.get(
            aggregate_id, version=version, projector_func=projector_func
        )
        self.snapshots.put([AggregateSnapshot.take(aggregate)])
