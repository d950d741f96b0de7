"""The loyalty query side: members and rewards as tables in the service's own database.

Lists over every member (`ListMembers`, the schedule's walk in `settle_all`)
and the rewards catalogue (`ListRewards`) are answered from two tables kept
by a tracked projection of the event log (`crm_common.querystore`), not from
lists in memory: a process is ready as soon as it has opened a connection,
whatever the number of members, and holds only a bounded cache of recently
changed aggregates. Each row is written from the aggregate's state after a
batch of its events (folded by the aggregate's own `mutate`), so a row never
disagrees with what `GetMember` or `GetReward` would answer.

- `members`: one row per member: tier, the balance by state (`available` is
  the balance's `active`: points that are neither locked nor used, as
  `GetMember` shows them), lifetime earned, the soonest expiry of unlocked
  points and how many expire then, the last change of the account, the
  enrolment and the version. Times are epoch microseconds (sortable in both
  stores). Indexed for every listing's filter and order. A membership closed
  by a merge of contacts has no row. No personal data (birthday, referrer)
  is ever written here, so an erased member's row stays as it is.
- `rewards`: one row per reward of the catalogue, in code order.

Pages are keyset pages: a token holds the last row's sort key (and a
fingerprint of the filters), so a page never repeats or skips a member
because others were enrolled or changed meanwhile, and a page costs the same
however deep it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.application import Application

from crm_common.errors import ValidationFailed
from crm_common.querystore import AggregateProjection, QueryDatabase, QuerySide, Tx
from crm_common.settings import Settings
from crm_loyalty.domain import Balance, Member, TierPolicy
from crm_loyalty.domain.rewards import Reward
from crm_loyalty.validation import BY_AVAILABLE, MemberFilter
from crm_loyalty.views import MemberPage, MemberSummaryView, RewardView

#: Member and reward aggregates kept between batches (a member's ledger can be
#: long: a smaller cache than the library's default).
CACHE_SIZE = 1_000
#: Members read per page of the schedule's walk.
WALK_PAGE = 500

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_MEMBER_COLUMNS = (
    "contact_id, tier, available, locked, expired, spent, cancelled, earned, "
    "next_expiry_at, next_expiry_points, last_activity_at, enrolled_at, version"
)
_REWARD_COLUMNS = "code, name, points, stock, reserved, valid_from, valid_until, retired, version"


def micros(at: datetime) -> int:
    """Epoch microseconds of an aware time (exact: no floating point)."""
    delta = at - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def moment(value: Any) -> datetime:
    return EPOCH + timedelta(microseconds=int(value))


def next_expiry(member: Member) -> tuple[datetime | None, int]:
    """The soonest expiry of the member's unlocked points and how many expire then."""
    soonest: datetime | None = None
    points = 0
    for lot in member.lots.values():
        if lot.locked or lot.remaining <= 0:
            continue
        if soonest is None or lot.expires_at < soonest:
            soonest, points = lot.expires_at, lot.remaining
        elif lot.expires_at == soonest:
            points += lot.remaining
    return soonest, points


class LoyaltyTables(AggregateProjection):
    """The `members` and `rewards` tables, written from Member and Reward states."""

    name = "loyalty"
    version = 1
    tables = ("members", "rewards")
    kinds = (Member, Reward)

    def __init__(
        self, app: Application[UUID], tiers: TierPolicy, cache_size: int = CACHE_SIZE
    ) -> None:
        super().__init__(app, cache_size)
        self.tiers = tiers

    def create(self, tx: Tx) -> None:
        # Keys compare byte by byte in both stores (PostgreSQL's default collation
        # would follow the locale), so pages and the catalogue come in one order.
        key = 'TEXT COLLATE "C"' if tx.dialect == "postgres" else "TEXT"
        tx.execute(
            "CREATE TABLE IF NOT EXISTS members ("
            f" contact_id {key} PRIMARY KEY,"
            " member_id TEXT NOT NULL,"
            f" tier {key} NOT NULL,"
            " available BIGINT NOT NULL,"
            " locked BIGINT NOT NULL,"
            " expired BIGINT NOT NULL,"
            " spent BIGINT NOT NULL,"
            " cancelled BIGINT NOT NULL,"
            " earned BIGINT NOT NULL,"
            " next_expiry_at BIGINT,"
            " next_expiry_points BIGINT NOT NULL,"
            " last_activity_at BIGINT NOT NULL,"
            " enrolled_at BIGINT NOT NULL,"
            " version BIGINT NOT NULL)"
        )
        # Every listing's filter and order: by tier, by available balance
        # (highest first, ties by contact id), by soonest expiry.
        tx.execute("CREATE INDEX IF NOT EXISTS members_tier ON members (tier, contact_id)")
        tx.execute(
            "CREATE INDEX IF NOT EXISTS members_available ON members (available DESC, contact_id)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS members_tier_available "
            "ON members (tier, available DESC, contact_id)"
        )
        tx.execute(
            "CREATE INDEX IF NOT EXISTS members_next_expiry ON members (next_expiry_at, contact_id)"
        )
        tx.execute(
            "CREATE TABLE IF NOT EXISTS rewards ("
            f" code {key} PRIMARY KEY,"
            " name TEXT NOT NULL,"
            " points BIGINT NOT NULL,"
            " stock BIGINT NOT NULL,"
            " reserved BIGINT NOT NULL,"
            " valid_from TEXT,"
            " valid_until TEXT,"
            " retired INTEGER NOT NULL,"
            " version BIGINT NOT NULL)"
        )
        tx.execute("CREATE INDEX IF NOT EXISTS rewards_retired ON rewards (retired, code)")

    def project(self, tx: Tx, aggregate: Any) -> None:
        if isinstance(aggregate, Member):
            self._member(tx, aggregate)
        elif isinstance(aggregate, Reward):
            self._reward(tx, aggregate)

    def _member(self, tx: Tx, member: Member) -> None:
        if member.merged_into:
            # A membership closed by a merge of contacts is listed no more (the
            # survivor's member holds its lots); an undone merge writes it again.
            tx.execute("DELETE FROM members WHERE contact_id = ?", (member.customer_id,))
            return
        balance = member.balance
        expiry, expiring = next_expiry(member)
        tx.execute(
            f"INSERT INTO members (member_id, {_MEMBER_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (contact_id) DO UPDATE SET tier = excluded.tier, "
            "available = excluded.available, locked = excluded.locked, "
            "expired = excluded.expired, spent = excluded.spent, "
            "cancelled = excluded.cancelled, earned = excluded.earned, "
            "next_expiry_at = excluded.next_expiry_at, "
            "next_expiry_points = excluded.next_expiry_points, "
            "last_activity_at = excluded.last_activity_at, version = excluded.version",
            (
                str(member.id),
                member.customer_id,
                # The enrolment's tier is not an event: a member never moved is
                # at the lowest tier, as `GetMember` shows it.
                member.tier or self.tiers.lowest,
                balance.active,
                balance.locked,
                balance.expired,
                balance.spent,
                balance.cancelled,
                balance.earned,
                micros(expiry) if expiry is not None else None,
                expiring,
                micros(member.modified_on),
                micros(member.enrolled_at),
                member.version,
            ),
        )

    def _reward(self, tx: Tx, reward: Reward) -> None:
        tx.execute(
            f"INSERT INTO rewards ({_REWARD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (code) DO UPDATE SET name = excluded.name, "
            "points = excluded.points, stock = excluded.stock, "
            "reserved = excluded.reserved, valid_from = excluded.valid_from, "
            "valid_until = excluded.valid_until, retired = excluded.retired, "
            "version = excluded.version",
            (
                reward.code,
                reward.name,
                reward.points,
                reward.stock,
                reward.reserved,
                reward.valid_from.isoformat() if reward.valid_from else None,
                reward.valid_until.isoformat() if reward.valid_until else None,
                1 if reward.retired else 0,
                reward.version,
            ),
        )


# -- page tokens -------------------------------------------------------------------


def _fingerprint(query: MemberFilter) -> str:
    """Ties a token to its listing: the same token with other filters is refused."""
    before = micros(query.expiring_before) if query.expiring_before else None
    text = json.dumps([query.tier, query.min_available, before, query.order_by])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _encode_token(query: MemberFilter, key: list[Any]) -> str:
    raw = json.dumps([_fingerprint(query), *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(query: MemberFilter) -> list[Any]:
    """The last row's sort key from the query's page token."""
    try:
        padded = query.page_token + "=" * (-len(query.page_token) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(value, list) or not value or value[0] != _fingerprint(query):
            raise ValueError(query.page_token)
        key = value[1:]
        if query.order_by == BY_AVAILABLE:
            if len(key) != 2 or type(key[0]) is not int or not isinstance(key[1], str):
                raise ValueError(query.page_token)
        elif len(key) != 1 or not isinstance(key[0], str):
            raise ValueError(query.page_token)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed.of(
            "page_token", "is not a page token of this listing (same filters and order)"
        ) from None
    return key


# -- reading ------------------------------------------------------------------------


def _summary(row: tuple[Any, ...]) -> MemberSummaryView:
    (contact, tier, available, locked, expired, spent, cancelled, earned) = row[:8]
    expiry, expiring, activity, enrolled, version = row[8:]
    return MemberSummaryView(
        contact_id=contact,
        tier=tier,
        balance=Balance(int(available), int(locked), int(expired), int(spent), int(cancelled)),
        earned=int(earned),
        next_expiry_at=moment(expiry) if expiry is not None else None,
        next_expiry_points=int(expiring),
        last_activity_at=moment(activity),
        enrolled_at=moment(enrolled),
        version=int(version),
    )


def _reward_view(row: tuple[Any, ...]) -> RewardView:
    code, name, points, stock, reserved, valid_from, valid_until, retired, version = row
    return RewardView(
        code=code,
        name=name,
        points=int(points),
        stock=int(stock),
        reserved=int(reserved),
        valid_from=datetime.fromisoformat(valid_from) if valid_from else None,
        valid_until=datetime.fromisoformat(valid_until) if valid_until else None,
        retired=bool(retired),
        version=int(version),
    )


class LoyaltyQueries:
    """The query side of the loyalty service: the tables, kept up to date, and
    the queries over them. Each query first applies what was stored since (usually
    nothing), so a caller sees its own committed writes."""

    def __init__(
        self,
        app: Application[UUID],
        settings: Settings,
        tiers: TierPolicy,
        *,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.tables = LoyaltyTables(app, tiers, cache_size)
        self.side = QuerySide(app, QueryDatabase(settings), [self.tables])
        #: Members per page of the schedule's walk (`contact_ids`).
        self.walk_page = WALK_PAGE

    def close(self) -> None:
        self.side.close()

    def members(self, query: MemberFilter) -> MemberPage:
        """One page of a member listing."""
        after = _decode_token(query) if query.page_token else None
        where: list[str] = []
        params: list[Any] = []
        if query.tier:
            where.append("tier = ?")
            params.append(query.tier)
        if query.min_available:
            where.append("available >= ?")
            params.append(query.min_available)
        if query.expiring_before is not None:
            where.append("next_expiry_at < ?")
            params.append(micros(query.expiring_before))
        if query.order_by == BY_AVAILABLE:
            order = "available DESC, contact_id"
            if after is not None:
                where.append("(available < ? OR (available = ? AND contact_id > ?))")
                params.extend([after[0], after[0], after[1]])
        else:
            order = "contact_id"
            if after is not None:
                where.append("contact_id > ?")
                params.append(after[0])
        sql = f"SELECT {_MEMBER_COLUMNS} FROM members"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order} LIMIT ?"
        params.append(query.page_size + 1)
        self.side.catch_up()
        with self.side.database.read() as tx:
            rows = tx.all(sql, params)
        members = [_summary(row) for row in rows[: query.page_size]]
        token = ""
        if len(rows) > query.page_size:
            last = members[-1]
            key: list[Any] = [last.contact_id]
            if query.order_by == BY_AVAILABLE:
                key = [last.balance.active, last.contact_id]
            token = _encode_token(query, key)
        return MemberPage(members, token)

    def contact_ids(self, after: str = "") -> list[str]:
        """A page of members' contact ids after `after`, in contact id order (a
        keyset walk: members enrolled meanwhile are met when their turn comes)."""
        self.side.catch_up()
        with self.side.database.read() as tx:
            rows = tx.all(
                "SELECT contact_id FROM members WHERE contact_id > ? ORDER BY contact_id LIMIT ?",
                (after, self.walk_page),
            )
        return [str(row[0]) for row in rows]

    def rewards(self, *, include_retired: bool = False) -> list[RewardView]:
        """The catalogue in code order; retired rewards only when asked for."""
        sql = f"SELECT {_REWARD_COLUMNS} FROM rewards"
        if not include_retired:
            sql += " WHERE retired = 0"
        self.side.catch_up()
        with self.side.database.read() as tx:
            rows = tx.all(sql + " ORDER BY code")
        return [_reward_view(row) for row in rows]
