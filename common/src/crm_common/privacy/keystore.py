"""The key store: one wrapped data key per subject (a person), kept apart
from the events, and the audit of key reads by other services.

Two tables, in the owning service's store unless `CRM_KEY_STORE_URL` names
another database:

- `privacy_data_keys`: subject id -> wrapped AES-256 key, the id of the
  master key that wrapped it, when it was created, when it was destroyed.
  Destroying a key (crypto-shredding) overwrites the wrapped key and the
  master key id with NULL and keeps the row as a tombstone, so that no key
  is ever created again for that subject.
- `privacy_key_access`: who (the reading service), whose key (owner,
  subject), when and for what purpose; one row per read of a key by a
  service that does not own it.

SQLite: the file `keys.sqlite` beside the service's events, with
`secure_delete` on and the write-ahead log truncated after a destroy, so the
destroyed wrapped key is overwritten in the file rather than left in a free
page. PostgreSQL: the service's schema (or the schema of the same name in
the database `CRM_KEY_STORE_URL` names).

The store only keeps rows; wrapping, caching and auditing are the key
client's (`crm_common.privacy.client`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row
from psycopg.sql import SQL, Identifier
from psycopg_pool import ConnectionPool

from crm_common.settings import Settings

KEYS_TABLE = "privacy_data_keys"
ACCESS_TABLE = "privacy_key_access"
LOCATION_VAR = "CRM_KEY_STORE_LOCATION"


@dataclass(frozen=True)
class KeyRow:
    """A subject's row: a wrapped key, or a tombstone (`destroyed_at` set)."""

    subject: str
    wrapped: bytes | None
    master_key_id: str | None
    created_at: datetime
    destroyed_at: datetime | None

    @property
    def destroyed(self) -> bool:
        return self.destroyed_at is not None


@dataclass(frozen=True)
class KeyAccess:
    """One read of a subject's key by a service that does not own it."""

    at: datetime
    accessor: str
    owner: str
    subject: str
    purpose: str


class KeyStore(Protocol):
    """Rows of one owning service's data keys."""

    owner: str

    def insert_if_absent(self, subject: str, wrapped: bytes, master_key_id: str) -> bool:
        """Stores a key unless the subject already has a row (key or tombstone);
        True when this call stored it."""

    def fetch(self, subject: str) -> KeyRow | None: ...

    def destroy(self, subject: str) -> bool:
        """Overwrites the subject's key and leaves a tombstone (also when it
        had none); True when a key was destroyed by this call."""

    def wrapped_by_other_than(self, master_key_id: str, limit: int) -> list[KeyRow]:
        """Live keys wrapped by another master key than `master_key_id`."""

    def replace_wrapping(
        self, subject: str, old_master_key_id: str, wrapped: bytes, master_key_id: str
    ) -> bool:
        """Re-wrapped key, stored only if the row is still wrapped by the old key."""

    def record_access(self, access: KeyAccess) -> None: ...

    def accesses(self, subject: str | None = None) -> list[KeyAccess]: ...

    def count_by_master_key(self) -> dict[str, int]:
        """Live keys per master key id, and tombstones under `"destroyed"`."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class KeyStoreLocation:
    """Where one owner's key store is: a SQLite file, or a PostgreSQL database
    and schema. Travels to the application in its environment
    (`CRM_KEY_STORE_LOCATION`, JSON without secrets but the database
    password, like the event store's own settings)."""

    owner: str
    kind: str
    path: str = ""
    conninfo: str = ""
    schema: str = ""

    @classmethod
    def of(cls, settings: Settings, owner: str | None = None) -> KeyStoreLocation:
        """The key store of `owner` (default: this service) as `settings` configure it.

        `CRM_KEY_STORE_URL` unset: SQLite `<data dir>/<owner>/keys.sqlite`, or
        the event store's PostgreSQL database in the owner's schema;
        `postgresql://...`: that database, the owner's schema; `sqlite:<dir>`:
        `<dir>/<owner>/keys.sqlite`."""
        owner = owner or settings.service
        url = settings.key_store_url.strip()
        own_schema = settings.postgres.get("schema", owner) if owner == settings.service else owner
        if url.startswith(("postgresql://", "postgres://")):
            return cls(owner, "postgres", conninfo=url, schema=own_schema or owner)
        if url.startswith("sqlite:"):
            root = Path(url.removeprefix("sqlite:")).resolve()
            return cls(owner, "sqlite", path=str(root / owner / "keys.sqlite"))
        if url:
            raise ValueError(
                "CRM_KEY_STORE_URL must be a postgresql:// URL or sqlite:<directory>, "
                f"not {url.split('://')[0]!r}..."
            )
        if settings.event_store == "postgres":
            pg = settings.postgres
            conninfo = psycopg.conninfo.make_conninfo(
                host=pg["host"],
                port=pg["port"],
                dbname=pg["dbname"],
                user=pg["user"],
                password=pg["password"] or None,
                connect_timeout=10,
            )
            return cls(owner, "postgres", conninfo=conninfo, schema=own_schema or owner)
        return cls(owner, "sqlite", path=str(settings.data_dir / owner / "keys.sqlite"))

    def to_env(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "kind": self.kind,
                "path": self.path,
                "conninfo": self.conninfo,
                "schema": self.schema,
            }
        )

    @classmethod
    def from_env(cls, text: str) -> KeyStoreLocation:
        data = json.loads(text)
        return cls(
            **{k: str(data.get(k, "")) for k in ("owner", "kind", "path", "conninfo", "schema")}
        )

    def open(self) -> KeyStore:
        if self.kind == "postgres":
            return PostgresKeyStore(self.owner, self.conninfo, self.schema)
        if self.kind == "sqlite":
            return SQLiteKeyStore(self.owner, Path(self.path))
        raise ValueError(f"unknown key store kind {self.kind!r}")


def _now() -> datetime:
    return datetime.now(UTC)


# -- SQLite --------------------------------------------------------------------------------


class SQLiteKeyStore:
    """The key store in a SQLite file of its own."""

    def __init__(self, owner: str, path: Path) -> None:
        self.owner = owner
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A deleted or overwritten value is zeroed in the file, not left in a free page.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (
                subject_id TEXT PRIMARY KEY,
                wrapped_key BLOB,
                master_key_id TEXT,
                created_at TEXT NOT NULL,
                destroyed_at TEXT
            );
            CREATE TABLE IF NOT EXISTS {ACCESS_TABLE} (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                at TEXT NOT NULL,
                accessor TEXT NOT NULL,
                owner TEXT NOT NULL,
                subject_id TEXT NOT NULL,
                purpose TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS {ACCESS_TABLE}_subject ON {ACCESS_TABLE} (subject_id);
            """
        )

    @contextmanager
    def _cursor(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cursor = self._db.cursor()
            try:
                yield cursor
            finally:
                cursor.close()

    def insert_if_absent(self, subject: str, wrapped: bytes, master_key_id: str) -> bool:
        with self._cursor() as c:
            c.execute(
                f"INSERT INTO {KEYS_TABLE} (subject_id, wrapped_key, master_key_id, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (subject_id) DO NOTHING",
                (subject, wrapped, master_key_id, _now().isoformat()),
            )
            return c.rowcount == 1

    def fetch(self, subject: str) -> KeyRow | None:
        with self._cursor() as c:
            c.execute(
                "SELECT subject_id, wrapped_key, master_key_id, created_at, destroyed_at "
                f"FROM {KEYS_TABLE} WHERE subject_id=?",
                (subject,),
            )
            row = c.fetchone()
        return None if row is None else _sqlite_row(row)

    def destroy(self, subject: str) -> bool:
        now = _now().isoformat()
        with self._cursor() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(f"SELECT wrapped_key FROM {KEYS_TABLE} WHERE subject_id=?", (subject,))
                row = c.fetchone()
                had_key = row is not None and row[0] is not None
                c.execute(
                    f"INSERT INTO {KEYS_TABLE} "
                    "(subject_id, wrapped_key, master_key_id, created_at, destroyed_at) "
                    "VALUES (?, NULL, NULL, ?, ?) ON CONFLICT (subject_id) DO UPDATE SET "
                    "wrapped_key=NULL, master_key_id=NULL, "
                    "destroyed_at=COALESCE(destroyed_at, excluded.destroyed_at)",
                    (subject, now, now),
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            # Earlier frames of the log may still hold the page with the key.
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return had_key

    def wrapped_by_other_than(self, master_key_id: str, limit: int) -> list[KeyRow]:
        with self._cursor() as c:
            c.execute(
                "SELECT subject_id, wrapped_key, master_key_id, created_at, destroyed_at "
                f"FROM {KEYS_TABLE} WHERE wrapped_key IS NOT NULL AND master_key_id<>? "
                "ORDER BY subject_id LIMIT ?",
                (master_key_id, limit),
            )
            return [_sqlite_row(r) for r in c.fetchall()]

    def replace_wrapping(
        self, subject: str, old_master_key_id: str, wrapped: bytes, master_key_id: str
    ) -> bool:
        with self._cursor() as c:
            c.execute(
                f"UPDATE {KEYS_TABLE} SET wrapped_key=?, master_key_id=? "
                "WHERE subject_id=? AND master_key_id=? AND wrapped_key IS NOT NULL",
                (wrapped, master_key_id, subject, old_master_key_id),
            )
            return c.rowcount == 1

    def record_access(self, access: KeyAccess) -> None:
        with self._cursor() as c:
            c.execute(
                f"INSERT INTO {ACCESS_TABLE} (at, accessor, owner, subject_id, purpose) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    access.at.isoformat(),
                    access.accessor,
                    access.owner,
                    access.subject,
                    access.purpose,
                ),
            )

    def accesses(self, subject: str | None = None) -> list[KeyAccess]:
        query = f"SELECT at, accessor, owner, subject_id, purpose FROM {ACCESS_TABLE}"
        params: tuple[Any, ...] = ()
        if subject is not None:
            query += " WHERE subject_id=?"
            params = (subject,)
        with self._cursor() as c:
            c.execute(query + " ORDER BY id", params)
            rows = c.fetchall()
        return [KeyAccess(datetime.fromisoformat(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def count_by_master_key(self) -> dict[str, int]:
        with self._cursor() as c:
            c.execute(
                f"SELECT COALESCE(master_key_id, 'destroyed'), COUNT(*) FROM {KEYS_TABLE} "
                "GROUP BY 1"
            )
            return {str(k): int(n) for k, n in c.fetchall()}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _sqlite_row(row: tuple[Any, ...]) -> KeyRow:
    return KeyRow(
        subject=row[0],
        wrapped=bytes(row[1]) if row[1] is not None else None,
        master_key_id=row[2],
        created_at=datetime.fromisoformat(row[3]),
        destroyed_at=datetime.fromisoformat(row[4]) if row[4] else None,
    )


# -- PostgreSQL ----------------------------------------------------------------------------


class PostgresKeyStore:
    """The key store in a PostgreSQL schema (the owning service's)."""

    def __init__(self, owner: str, conninfo: str, schema: str, pool_size: int = 4) -> None:
        self.owner = owner
        self.schema = schema
        self._keys = Identifier(schema, KEYS_TABLE)
        self._access = Identifier(schema, ACCESS_TABLE)
        self._pool: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=True,
            name=f"keys-{owner}",
        )
        self._create_tables()

    def _create_tables(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            # CREATE ... IF NOT EXISTS is not safe against itself: replicas
            # starting together take turns.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.schema}.privacy",))
            conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(self.schema)))
            conn.execute(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "subject_id text PRIMARY KEY, wrapped_key bytea, master_key_id text, "
                    "created_at timestamptz NOT NULL, destroyed_at timestamptz)"
                ).format(self._keys)
            )
            conn.execute(
                SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "id bigserial PRIMARY KEY, at timestamptz NOT NULL, accessor text NOT NULL, "
                    "owner text NOT NULL, subject_id text NOT NULL, purpose text NOT NULL)"
                ).format(self._access)
            )
            conn.execute(
                SQL("CREATE INDEX IF NOT EXISTS {} ON {} (subject_id)").format(
                    Identifier(f"{ACCESS_TABLE}_subject"), self._access
                )
            )

    def insert_if_absent(self, subject: str, wrapped: bytes, master_key_id: str) -> bool:
        with self._pool.connection() as conn:
            cursor = conn.execute(
                SQL(
                    "INSERT INTO {} (subject_id, wrapped_key, master_key_id, created_at) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (subject_id) DO NOTHING"
                ).format(self._keys),
                (subject, wrapped, master_key_id, _now()),
            )
            return int(cursor.rowcount) == 1

    def fetch(self, subject: str) -> KeyRow | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                SQL(
                    "SELECT subject_id, wrapped_key, master_key_id, created_at, destroyed_at "
                    "FROM {} WHERE subject_id=%s"
                ).format(self._keys),
                (subject,),
            ).fetchone()
        return None if row is None else _pg_row(row)

    def destroy(self, subject: str) -> bool:
        now = _now()
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                SQL("SELECT wrapped_key FROM {} WHERE subject_id=%s FOR UPDATE").format(self._keys),
                (subject,),
            ).fetchone()
            conn.execute(
                SQL(
                    "INSERT INTO {t} "
                    "(subject_id, wrapped_key, master_key_id, created_at, destroyed_at) "
                    "VALUES (%s, NULL, NULL, %s, %s) ON CONFLICT (subject_id) DO UPDATE SET "
                    "wrapped_key=NULL, master_key_id=NULL, "
                    "destroyed_at=COALESCE({t}.destroyed_at, EXCLUDED.destroyed_at)"
                ).format(t=self._keys),
                (subject, now, now),
            )
        return row is not None and row["wrapped_key"] is not None

    def wrapped_by_other_than(self, master_key_id: str, limit: int) -> list[KeyRow]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                SQL(
                    "SELECT subject_id, wrapped_key, master_key_id, created_at, destroyed_at "
                    "FROM {} WHERE wrapped_key IS NOT NULL AND master_key_id<>%s "
                    "ORDER BY subject_id LIMIT %s"
                ).format(self._keys),
                (master_key_id, limit),
            ).fetchall()
        return [_pg_row(r) for r in rows]

    def replace_wrapping(
        self, subject: str, old_master_key_id: str, wrapped: bytes, master_key_id: str
    ) -> bool:
        with self._pool.connection() as conn:
            cursor = conn.execute(
                SQL(
                    "UPDATE {} SET wrapped_key=%s, master_key_id=%s "
                    "WHERE subject_id=%s AND master_key_id=%s AND wrapped_key IS NOT NULL"
                ).format(self._keys),
                (wrapped, master_key_id, subject, old_master_key_id),
            )
            return int(cursor.rowcount) == 1

    def record_access(self, access: KeyAccess) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                SQL(
                    "INSERT INTO {} (at, accessor, owner, subject_id, purpose) "
                    "VALUES (%s, %s, %s, %s, %s)"
                ).format(self._access),
                (access.at, access.accessor, access.owner, access.subject, access.purpose),
            )

    def accesses(self, subject: str | None = None) -> list[KeyAccess]:
        query = SQL("SELECT at, accessor, owner, subject_id, purpose FROM {}").format(self._access)
        params: tuple[Any, ...] = ()
        if subject is not None:
            query = query + SQL(" WHERE subject_id=%s")
            params = (subject,)
        with self._pool.connection() as conn:
            rows = conn.execute(query + SQL(" ORDER BY id"), params).fetchall()
        return [
            KeyAccess(r["at"], r["accessor"], r["owner"], r["subject_id"], r["purpose"])
            for r in rows
        ]

    def count_by_master_key(self) -> dict[str, int]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                SQL(
                    "SELECT COALESCE(master_key_id, 'destroyed') AS k, COUNT(*) AS n "
                    "FROM {} GROUP BY 1"
                ).format(self._keys)
            ).fetchall()
        return {str(r["k"]): int(r["n"]) for r in rows}

    def close(self) -> None:
        self._pool.close()


def _pg_row(row: dict[str, Any]) -> KeyRow:
    wrapped = row["wrapped_key"]
    return KeyRow(
        subject=row["subject_id"],
        wrapped=bytes(wrapped) if wrapped is not None else None,
        master_key_id=row["master_key_id"],
        created_at=row["created_at"],
        destroyed_at=row["destroyed_at"],
    )
