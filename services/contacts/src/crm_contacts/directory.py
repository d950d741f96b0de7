"""`ContactDirectory`: search over all contacts, answered from query tables in
the service's own database (`crm_common.querystore`).

The tables follow the event store's notification log as a tracked projection
of the contacts' states (`ContactTables`): a process opens them and answers at
once, whatever the history, and keeps no record of its own in memory. A
search first applies what was stored since the tables' position (usually
nothing: the API process follows the log in the background), so it sees every
write committed before it, whichever replica made it.

- `directory_contacts`: one row per contact: its kind, its sort key (display
  name casefolded), its lifecycle stage, its version and last change, and the
  view a result page shows, as JSON;
- `directory_emails`, `directory_phones`, `directory_tags`: `(key, contact_id)`
  for the exact lookups (emails in lower case, phone numbers in E.164, tags
  canonical).

A merged contact (a tombstone, `domain.merging`) has no rows: a search lists its
survivor only, and the contact's rows come back when the merge is undone. An
erased person (`Person.PersonErased`) keeps its row with every personal value
"[erased]" (display name and sort key included) and has no email or phone
keys, so no search by their name or addresses finds them.

Names match as case-insensitive substrings: a `LIKE` over the casefolded
display name, which holds the given and the family name of a person (a
substring of either is a substring of it). Results are ordered by sort key,
then id (byte order on both stores: PostgreSQL compares the two columns in the
"C" collation, as Python compares strings); a page token holds the last sort
key shown and the next page starts after it (keyset paging), so walking the
pages shows each match once even while contacts are added.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import Application

from crm_common.errors import FieldErrors
from crm_common.querystore import AggregateProjection, QueryDatabase, QuerySide, Tx
from crm_contacts import validation
from crm_contacts.domain import (
    PHONE_CHANNELS,
    Affiliation,
    Channel,
    Company,
    CompanyProfile,
    Contact,
    ContactKind,
    Person,
    PersonProfile,
)
from crm_contacts.inputs import ContactQuery
from crm_contacts.views import ContactPage, ContactView

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: Contacts the projection keeps folded between batches. A contact not among
#: them is loaded from the store (from its snapshot); the API process's
#: memory does not grow with the number of contacts.
DIRECTORY_CACHE = 1000

CONTACTS = "directory_contacts"
#: Key tables of the exact lookups: table → key column.
KEY_TABLES = {"directory_emails": "email", "directory_phones": "phone", "directory_tags": "tag"}
#: Contacts whose keys one DELETE removes.
DELETE_CHUNK = 500


def _encode_token(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[str, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        name, ident = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(name, str) or not isinstance(ident, str):
            raise ValueError(token)
    except (ValueError, TypeError, binascii.Error):
        errors = FieldErrors()
        errors.add("page_token", "is not a page token of this search")
        errors.raise_if_any()
        raise AssertionError("unreachable") from None
    return name, ident


def _column_text(value: str) -> str:
    """Text as a query column holds it: PostgreSQL's TEXT cannot hold NUL, and
    one contact's name must not stop the tables from following the log."""
    return value.replace("\x00", "")


def _like_pattern(text: str) -> str:
    """`%text%` with LIKE's own characters escaped (`ESCAPE '\\'`)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# -- a result's view, as its row holds it ------------------------------------------------


def _view_of(contact: Person | Company) -> ContactView:
    """The contact as a result page shows it (without interactions)."""
    affiliations = tuple(contact.affiliations.values()) if isinstance(contact, Person) else ()
    return ContactView(
        id=str(contact.id),
        kind=contact.KIND,
        version=contact.version,
        profile=contact.profile,
        affiliations=affiliations,
        interactions=(),
        created_at=contact.created_on,
        updated_at=contact.modified_on,
        erased=contact.erased,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__qualname__} is not JSON serializable")


def _view_json(view: ContactView) -> str:
    return json.dumps(
        {
            "profile": view.profile.to_dict(),
            "affiliations": [[a.company_id, a.company_name, a.role] for a in view.affiliations],
            "created_at": view.created_at,
            "updated_at": view.updated_at,
            "erased": view.erased,
        },
        default=_json_default,
        separators=(",", ":"),
    )


def _view_from_row(ident: str, kind: str, version: int, data: str) -> ContactView:
    stored = json.loads(data)
    profile: PersonProfile | CompanyProfile
    if kind == ContactKind.PERSON:
        profile = PersonProfile.from_dict(_with_consent_times(stored["profile"]))
    else:
        profile = CompanyProfile.from_dict(stored["profile"])
    return ContactView(
        id=ident,
        kind=ContactKind(kind),
        version=int(version),
        profile=profile,
        affiliations=tuple(Affiliation(*a) for a in stored["affiliations"]),
        interactions=(),
        created_at=datetime.fromisoformat(stored["created_at"]),
        updated_at=datetime.fromisoformat(stored["updated_at"]),
        erased=bool(stored.get("erased", False)),
    )


def _with_consent_times(profile: Mapping[str, Any]) -> dict[str, Any]:
    """A stored person profile with its consents' times as datetimes again."""
    channels = []
    for channel in profile["channels"]:
        consent = channel.get("consent")
        if consent is not None:
            at = datetime.fromisoformat(consent["recorded_at"])
            channel = {**channel, "consent": {**consent, "recorded_at": at}}
        channels.append(channel)
    return {**profile, "channels": channels}


# -- the projection -----------------------------------------------------------------------

#: The events that change what a search shows.
KNOWN_EVENTS = (
    Person.PersonRegistered,
    Person.PersonProfileUpdated,
    Person.PersonLinkedToCompany,
    Person.PersonUnlinkedFromCompany,
    Person.ConsentRecorded,
    Company.CompanyRegistered,
    Company.CompanyProfileUpdated,
    Contact.InteractionLogged,
    Contact.ContactsMerged,
    Contact.ContactMergedInto,
    Contact.ContactMergeUndone,
    Contact.ContactUnmerged,
    Person.PersonErased,
    Person.PersonalDataExported,
)


class ContactTables(AggregateProjection):
    """The directory's tables: each contact's row and its lookup keys, written
    from the contact's state after each batch (folded by the aggregates' own
    `mutate`, so the directory never disagrees with `GetContact`)."""

    name = "contact-directory"
    version = 1
    tables = (CONTACTS, *KEY_TABLES)
    #: `Contact`: its interactions are `Contact.InteractionLogged` for either kind.
    kinds = (Contact,)

    def create(self, tx: Tx) -> None:
        # Byte order on PostgreSQL, as in Python and in SQLite's default collation.
        text = 'TEXT COLLATE "C"' if tx.dialect == "postgres" else "TEXT"
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {CONTACTS} ("
            f" id {text} PRIMARY KEY,"
            " kind TEXT NOT NULL,"
            f" sort_key {text} NOT NULL,"
            " display_name TEXT NOT NULL,"
            " lifecycle_stage TEXT NOT NULL,"
            " view TEXT NOT NULL,"
            " version BIGINT NOT NULL,"
            " updated_at TEXT NOT NULL)"
        )
        tx.execute(f"CREATE INDEX IF NOT EXISTS {CONTACTS}_order ON {CONTACTS} (sort_key, id)")
        tx.execute(f"CREATE INDEX IF NOT EXISTS {CONTACTS}_kind ON {CONTACTS} (kind, sort_key, id)")
        for table, key in KEY_TABLES.items():
            tx.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                f" {key} TEXT NOT NULL, contact_id {text} NOT NULL,"
                f" PRIMARY KEY ({key}, contact_id))"
            )
            tx.execute(f"CREATE INDEX IF NOT EXISTS {table}_contact ON {table} (contact_id)")

    def __init__(self, app: Application[UUID], cache_size: int = DIRECTORY_CACHE) -> None:
        super().__init__(app, cache_size=cache_size)
        self._rows: list[tuple[Any, ...]] = []
        self._keys: dict[str, list[tuple[str, str]]] = {table: [] for table in KEY_TABLES}
        #: Tombstones of the batch: their rows are deleted.
        self._gone: list[str] = []

    def apply(self, tx: Tx, events: Sequence[Any]) -> None:
        # A kind of event this release does not know (a newer one's) changes
        # nothing in the tables, its version included: the next known event
        # brings the contact up to date.
        self._clear_rows()
        super().apply(tx, [e for e in events if isinstance(e, KNOWN_EVENTS)])
        self._write(tx)

    def project(self, tx: Tx, aggregate: Any) -> None:
        """Collects the contact's rows: `_write` stores a batch's rows together (a
        few statements a batch rather than a few a contact); a merged contact's
        rows are deleted instead (its survivor's hold what it had)."""
        if aggregate.merged_into is not None:
            self._gone.append(str(aggregate.id))
            return
        view = _view_of(aggregate)
        profile = view.profile
        self._rows.append(
            (
                view.id,
                str(view.kind),
                _column_text(view.display_name.casefold()),
                _column_text(view.display_name),
                str(profile.lifecycle_stage),
                _view_json(view),
                view.version,
                view.updated_at.isoformat(),
            )
        )
        # An erased person is found by nothing personal: no email or phone keys
        # (their addresses read "[erased]"; a rebuild from the events agrees).
        channels = (
            profile.channels if isinstance(profile, PersonProfile) and not view.erased else ()
        )
        keys = {
            "directory_emails": {c.address for c in channels if c.channel is Channel.EMAIL},
            "directory_phones": {c.address for c in channels if c.channel in PHONE_CHANNELS},
            "directory_tags": set(profile.tags),
        }
        for table, values in keys.items():
            self._keys[table].extend((_column_text(k), view.id) for k in sorted(values))

    def _write(self, tx: Tx) -> None:
        self._delete(tx, self._gone)
        if not self._rows:
            self._clear_rows()
            return
        tx.executemany(
            f"INSERT INTO {CONTACTS} (id, kind, sort_key, display_name, lifecycle_stage,"
            " view, version, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET kind = excluded.kind,"
            " sort_key = excluded.sort_key, display_name = excluded.display_name,"
            " lifecycle_stage = excluded.lifecycle_stage, view = excluded.view,"
            " version = excluded.version, updated_at = excluded.updated_at",
            self._rows,
        )
        ids = [row[0] for row in self._rows]
        for table, key in KEY_TABLES.items():
            self._delete_keys(tx, table, ids)
            tx.executemany(
                f"INSERT INTO {table} ({key}, contact_id) VALUES (?, ?)", self._keys[table]
            )
        self._clear_rows()

    @staticmethod
    def _delete_keys(tx: Tx, table: str, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), DELETE_CHUNK):
            chunk = list(ids[start : start + DELETE_CHUNK])
            column = "id" if table == CONTACTS else "contact_id"
            tx.execute(
                f"DELETE FROM {table} WHERE {column} IN ({tx.placeholders(len(chunk))})", chunk
            )

    def _delete(self, tx: Tx, ids: Sequence[str]) -> None:
        """Removes merged contacts from every table (their keys with them)."""
        if not ids:
            return
        for table in (CONTACTS, *KEY_TABLES):
            self._delete_keys(tx, table, ids)

    def _clear_rows(self) -> None:
        self._rows = []
        self._keys = {table: [] for table in KEY_TABLES}
        self._gone = []

    def reset(self) -> None:
        super().reset()
        self._clear_rows()

    @property
    def cached(self) -> int:
        """Contacts folded in memory now (at most `cache_size`)."""
        return len(self._cache)


# -- the directory ------------------------------------------------------------------------


class ContactDirectory:
    """Search over all contacts, from the query tables (see the module)."""

    def __init__(
        self, app: Application[UUID], database: QueryDatabase, *, cache_size: int = DIRECTORY_CACHE
    ) -> None:
        self.tables = ContactTables(app, cache_size=cache_size)
        self.query_side = QuerySide(app, database, [self.tables])

    @property
    def position(self) -> int:
        """The last event of the log the tables hold."""
        return self.query_side.position()

    @property
    def applied(self) -> int:
        """Events this process has applied to the tables."""
        return self.query_side.applied

    def catch_up(self) -> int:
        """Applies what was stored since the tables' position; returns the position."""
        return self.query_side.catch_up()

    def follow(self, interval: float = 0.2) -> None:
        """Keeps the tables up to date in the background, so a search rarely waits."""
        self.query_side.follow(interval)

    def close(self) -> None:
        self.query_side.close()

    # -- searching --

    def search(self, query: ContactQuery, *, within_tag: str | None = None) -> ContactPage:
        """One page of the contacts matching `query`; with `within_tag`, only among the
        contacts carrying that (canonical) tag: a partner's search sees its grant only."""
        errors = FieldErrors()
        size = query.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        email = phone = None
        if query.email:
            email = validation.email_address(query.email)
            if email is None:
                errors.add("email", "is not an email address")
        if query.phone:
            phone = validation.phone_number(query.phone)
            if phone is None:
                errors.add("phone", "is not a phone number in international format")
        kind = validation.enum_of(errors, "kind", ContactKind, query.kind, required=False)
        errors.raise_if_any()
        after = _decode_token(query.page_token) if query.page_token else None
        text = _column_text(query.query.strip().casefold())
        tag = " ".join(query.tag.split()).lower()

        where: list[str] = []
        params: list[Any] = []
        for table, key, value in (
            ("directory_emails", "email", email),
            ("directory_phones", "phone", phone),
            ("directory_tags", "tag", tag),
        ):
            if value:
                where.append(f"id IN (SELECT contact_id FROM {table} WHERE {key} = ?)")
                params.append(_column_text(value))
        if within_tag is not None:  # even an empty grant: it holds nothing
            where.append("id IN (SELECT contact_id FROM directory_tags WHERE tag = ?)")
            params.append(_column_text(within_tag))
        if kind is not None:
            where.append("kind = ?")
            params.append(str(kind))
        if text:
            where.append("sort_key LIKE ? ESCAPE '\\'")
            params.append(_like_pattern(text))

        self.query_side.catch_up()  # read your writes, whichever replica made them
        with self.query_side.database.read() as tx:
            total, rows = self._page(tx, where, params, after, size)
        views = [_view_from_row(*row[1:]) for row in rows[:size]]
        more = len(rows) > size
        token = _encode_token((rows[size - 1][0], rows[size - 1][1])) if more else ""
        return ContactPage(views, token, total)

    @staticmethod
    def _page(
        tx: Tx, where: list[str], params: list[Any], after: tuple[str, str] | None, size: int
    ) -> tuple[int, Sequence[tuple[Any, ...]]]:
        """The number of matches, and the matches after `after` (one more than a page)."""
        matching = " WHERE " + " AND ".join(where) if where else ""
        row = tx.one(f"SELECT COUNT(*) FROM {CONTACTS}{matching}", params)
        total = int(row[0]) if row is not None else 0
        keyset = [*where, "(sort_key, id) > (?, ?)"] if after is not None else where
        rows = tx.all(
            f"SELECT sort_key, id, kind, version, view FROM {CONTACTS}"
            + (" WHERE " + " AND ".join(keyset) if keyset else "")
            + " ORDER BY sort_key, id LIMIT ?",
            [*params, *(after or ()), size + 1],
        )
        return total, rows
