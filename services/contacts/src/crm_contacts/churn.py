"""Churn: customers who stopped buying, and their return.

The lifecycle rules `no_purchase` and `purchase` (`domain.lifecycle`) run on
what contacts knows of each contact's purchases. A purchase is

- an ERP order that earned loyalty points: a `PointsEarned` with an
  `order_id` on the loyalty topic (`crm.events.v1.LoyaltyEvent`, keyed by the
  member's contact id), at the time loyalty recorded it (`occurred_at`);
- a won deal (`OpportunityWon` on the pipeline topic, recorded by
  `crm_contacts.follower.OpportunityFollower`) for each contact of the deal.

`PurchaseLedger` keeps, per contact, the time of the last purchase in a query
table of the service's own database (`contacts_purchases`). Recording is
idempotent by value: the row keeps the latest purchase it was told of, so a
redelivered or late record changes nothing.

`ChurnSweep` runs in the follower process every `CRM_CONTACTS_CHURN_SWEEP_SECONDS`
(default 3600). It looks at each contact whose last purchase is older than
`CRM_CONTACTS_CHURN_AFTER_DAYS` (default 180) and that it has not looked at for
that purchase yet; a customer among them gets a `FollowLifecycleRule` command
with rule `no_purchase` (customer -> churned), cause naming the date of the
last purchase, and request id `no-purchase:<contact id>:<last purchase time>`:
a repeated sweep, or two replicas sweeping together, write it once. Who is
at another stage then (an advocate, a lead who bought through loyalty) is left
as it is and looked at again after their next purchase. Erased persons are
passed over (and their row removed); a merged contact's purchases count for
its survivor, and the merged contact itself is never swept.

`PurchaseFollower` consumes the loyalty topic in the same process. A purchase
newer than the one a contact was churned for runs rule `purchase` (churned ->
customer, cause the order; request id `purchase:<contact id>:<order id>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from google.protobuf.message import DecodeError
from opentelemetry import trace

from crm.events.v1 import loyalty_pb2 as loyalty_pb
from crm_common.commands import Caller
from crm_common.errors import CrmError, NotFound, RuleViolated, ValidationFailed
from crm_common.eventstore import creating_tables
from crm_common.following import GroupMember, GroupProgress, RetryLater
from crm_common.health import Heartbeat
from crm_common.querystore import QueryDatabase, Tx
from crm_common.records import Record, consuming_span, header, where
from crm_common.settings import topic_of
from crm_contacts.application import ContactsService
from crm_contacts.domain import Contact
from crm_contacts.domain.lifecycle import LifecycleRule, LifecycleStage

log = logging.getLogger(__name__)
tracer = trace.get_tracer("crm_contacts.churn")

TABLE = "contacts_purchases"
EARNED_TYPE = "crm.loyalty.v1.PointsEarned"
#: The client the churn commands are recorded with.
CLIENT = "crm-contacts-churn"
#: The actor of the sweep's commands (no person asked for them).
SWEEP_ACTOR = "churn-sweep"
DEFAULT_CHURN_AFTER_DAYS = 180
DEFAULT_SWEEP_SECONDS = 3600.0
#: How soon a failed sweep is tried again (unless the interval is shorter).
RETRY_SECONDS = 30.0
#: Contacts the sweep reads per page.
SWEEP_PAGE = 200
PERMANENT: tuple[type[CrmError], ...] = (NotFound, ValidationFailed, RuleViolated)


def churn_after_from_env() -> timedelta:
    """`CRM_CONTACTS_CHURN_AFTER_DAYS`: whole days without a purchase (at least 1)."""
    raw = os.environ.get("CRM_CONTACTS_CHURN_AFTER_DAYS", "").strip()
    if not raw:
        return timedelta(days=DEFAULT_CHURN_AFTER_DAYS)
    try:
        days = int(raw)
    except ValueError:
        raise ValueError(
            f"CRM_CONTACTS_CHURN_AFTER_DAYS must be a whole number, not {raw!r}"
        ) from None
    if days < 1:
        raise ValueError(f"CRM_CONTACTS_CHURN_AFTER_DAYS must be at least 1, not {days}")
    return timedelta(days=days)


def sweep_interval_from_env() -> float:
    """`CRM_CONTACTS_CHURN_SWEEP_SECONDS`: seconds between sweeps (positive)."""
    raw = os.environ.get("CRM_CONTACTS_CHURN_SWEEP_SECONDS", "").strip()
    if not raw:
        return DEFAULT_SWEEP_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(
            f"CRM_CONTACTS_CHURN_SWEEP_SECONDS must be a number, not {raw!r}"
        ) from None
    if not seconds > 0:
        raise ValueError(f"CRM_CONTACTS_CHURN_SWEEP_SECONDS must be positive, not {raw}")
    return seconds


def micros(at: datetime) -> int:
    """A time as microseconds since the epoch: what the table stores and compares."""
    return int(at.timestamp() * 1_000_000) if at.tzinfo else micros(at.replace(tzinfo=UTC))


def from_micros(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1_000_000, UTC)


# -- the ledger of last purchases --------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """What recording a purchase found."""

    #: Whether it is now the contact's last purchase (False: an older or the same one).
    latest: bool
    #: The last purchase the sweep churned the contact for (0: not churned by it).
    churned_for: int


@dataclass(frozen=True)
class Aged:
    """A contact whose last purchase is older than the churn period."""

    contact_id: str
    last_purchase: int
    what: str


class PurchaseLedger:
    """The last purchase of each contact, in the service's own database."""

    def __init__(self, database: QueryDatabase) -> None:
        self.database = database
        with database.write() as tx:
            _create_table(tx)

    @classmethod
    def open(cls, service: ContactsService) -> PurchaseLedger:
        settings = service.app.settings
        if settings is None:
            raise ValueError("the application was not made by create_application: no settings")
        with creating_tables(settings):
            database = QueryDatabase(settings)
            try:
                return cls(database)
            except BaseException:
                database.close()
                raise

    def close(self) -> None:
        self.database.close()

    def record(self, contact_id: str, at: datetime, what: str) -> Recorded:
        """Notes a purchase of `contact_id` at `at` (`what`: "order <id>", "deal <id>")."""
        when = micros(at)
        with self.database.write() as tx:
            before = tx.one(
                f"SELECT last_purchase, churned_for FROM {TABLE} WHERE contact_id = ?",
                (contact_id,),
            )
            if before is None:
                tx.execute(
                    f"INSERT INTO {TABLE} (contact_id, last_purchase, what, swept_for,"
                    " churned_for) VALUES (?, ?, ?, 0, 0)",
                    (contact_id, when, what),
                )
                return Recorded(latest=True, churned_for=0)
            last, churned_for = int(before[0]), int(before[1])
            if when > last:
                tx.execute(
                    f"UPDATE {TABLE} SET last_purchase = ?, what = ? WHERE contact_id = ?",
                    (when, what, contact_id),
                )
            # A purchase after the one the churn was for brings the contact back,
            # the latest or not (two orders since the churn: either one does).
            due = churned_for if churned_for and when > churned_for else 0
            return Recorded(latest=when > last, churned_for=due)

    def came_back(self, contact_id: str, churned_for: int) -> None:
        """The contact churned for `churned_for` is a customer again (or was passed over)."""
        with self.database.write() as tx:
            tx.execute(
                f"UPDATE {TABLE} SET churned_for = 0 WHERE contact_id = ? AND churned_for = ?",
                (contact_id, churned_for),
            )

    def last_purchase(self, contact_id: str) -> tuple[datetime, str] | None:
        """The contact's last purchase and what it was; None: none known."""
        with self.database.read() as tx:
            row = tx.one(
                f"SELECT last_purchase, what FROM {TABLE} WHERE contact_id = ?", (contact_id,)
            )
        return None if row is None else (from_micros(int(row[0])), str(row[1]))

    def last_of(self, contact_ids: list[str]) -> tuple[int, str] | None:
        """The newest purchase among `contact_ids` (0 rows: None)."""
        if not contact_ids:
            return None
        with self.database.read() as tx:
            row = tx.one(
                f"SELECT last_purchase, what FROM {TABLE} WHERE contact_id IN"
                f" ({tx.placeholders(len(contact_ids))}) ORDER BY last_purchase DESC LIMIT 1",
                contact_ids,
            )
        return None if row is None else (int(row[0]), str(row[1]))

    def aged(self, before: datetime, after_id: str = "", limit: int = SWEEP_PAGE) -> list[Aged]:
        """Contacts whose last purchase is before `before` and was not swept yet."""
        with self.database.read() as tx:
            rows = tx.all(
                f"SELECT contact_id, last_purchase, what FROM {TABLE}"
                " WHERE last_purchase < ? AND swept_for < last_purchase AND contact_id > ?"
                " ORDER BY contact_id LIMIT ?",
                (micros(before), after_id, limit),
            )
        return [Aged(str(r[0]), int(r[1]), str(r[2])) for r in rows]

    def swept(self, contact_id: str, last_purchase: int, *, churned: bool) -> None:
        """The sweep handled the contact's purchase `last_purchase` (and churned it, or not)."""
        with self.database.write() as tx:
            tx.execute(
                f"UPDATE {TABLE} SET swept_for = ?,"
                " churned_for = CASE WHEN ? = 1 THEN ? ELSE churned_for END"
                " WHERE contact_id = ? AND last_purchase = ?",
                (last_purchase, 1 if churned else 0, last_purchase, contact_id, last_purchase),
            )

    def newer(self, contact_id: str, last_purchase: int, what: str) -> None:
        """A survivor's last purchase is a merged contact's newer one."""
        with self.database.write() as tx:
            tx.execute(
                f"UPDATE {TABLE} SET last_purchase = ?, what = ?"
                " WHERE contact_id = ? AND last_purchase < ?",
                (last_purchase, what, contact_id, last_purchase),
            )

    def forget(self, contact_id: str) -> None:
        """An erased person's purchases are not kept."""
        with self.database.write() as tx:
            tx.execute(f"DELETE FROM {TABLE} WHERE contact_id = ?", (contact_id,))


def _create_table(tx: Tx) -> None:
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} ("
        " contact_id TEXT PRIMARY KEY, last_purchase BIGINT NOT NULL, what TEXT NOT NULL,"
        " swept_for BIGINT NOT NULL, churned_for BIGINT NOT NULL)"
    )
    tx.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_last ON {TABLE} (last_purchase)")


# -- the sweep ----------------------------------------------------------------------------


@dataclass
class SweepStats:
    sweeps: int = 0
    looked_at: int = 0
    churned: int = 0
    left: int = 0
    passed_over: int = 0


class ChurnSweep:
    """Churns the customers whose last purchase is older than `churn_after`."""

    def __init__(
        self,
        service: ContactsService,
        ledger: PurchaseLedger,
        *,
        churn_after: timedelta = timedelta(days=DEFAULT_CHURN_AFTER_DAYS),
        interval: float = DEFAULT_SWEEP_SECONDS,
        clock: Callable[[], datetime] | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.service = service
        self.ledger = ledger
        self.churn_after = churn_after
        self.interval = interval
        self.clock = clock or service.clock
        self.heartbeat = heartbeat or Heartbeat("contacts churn sweep")
        self.stats = SweepStats()

    def health_details(self) -> dict[str, Any]:
        return {
            "churn_after_days": self.churn_after.days,
            "interval_seconds": self.interval,
            "sweeps": self.stats.sweeps,
            "churned": self.stats.churned,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps now and then every `interval` seconds until `stop` is set; a
        failed sweep is logged and tried again at the next one."""
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception as error:
                log.error(
                    "churn sweep failed (%r); trying again in %.0f s",
                    error,
                    min(self.interval, RETRY_SECONDS),
                )
                self.heartbeat.failed(f"churn sweep: {error!r}")
                pause = min(self.interval, RETRY_SECONDS)
            else:
                if self.heartbeat.last_error is not None:
                    self.heartbeat.recovered()
                pause = self.interval
            waited = 0.0
            while waited < pause and not stop.is_set():
                self.heartbeat.beat()
                step = min(1.0, pause - waited)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), step)
                waited += step

    async def sweep(self) -> int:
        """One pass over the contacts whose last purchase is old; how many churned."""
        cutoff = self.clock() - self.churn_after
        churned = 0
        after = ""
        while True:
            page = await asyncio.to_thread(self.ledger.aged, cutoff, after)
            if not page:
                break
            for aged in page:
                self.heartbeat.beat()
                if await self._one(aged, cutoff):
                    churned += 1
            after = page[-1].contact_id
        self.stats.sweeps += 1
        if churned:
            log.info("churn sweep: %d customers churned (no purchase since %s)", churned, cutoff)
        return churned

    async def _one(self, aged: Aged, cutoff: datetime) -> bool:
        self.stats.looked_at += 1
        contact = await asyncio.to_thread(self._contact, aged.contact_id)
        if contact is None or contact.erased:
            if contact is not None:
                await asyncio.to_thread(self.ledger.forget, aged.contact_id)
            else:
                await asyncio.to_thread(
                    self.ledger.swept, aged.contact_id, aged.last_purchase, churned=False
                )
            self.stats.passed_over += 1
            return False
        if contact.merged_into is not None:
            # Never swept itself: its purchases count for its survivor.
            survivor = await asyncio.to_thread(self.service._survivor_of, contact)
            await asyncio.to_thread(
                self.ledger.record, str(survivor.id), from_micros(aged.last_purchase), aged.what
            )
            await asyncio.to_thread(
                self.ledger.swept, aged.contact_id, aged.last_purchase, churned=False
            )
            self.stats.passed_over += 1
            return False
        absorbed = await asyncio.to_thread(self.service._absorbed_ids, contact)
        theirs = await asyncio.to_thread(self.ledger.last_of, absorbed)
        if theirs is not None and theirs[0] > aged.last_purchase:
            # A merged contact bought later: that is the survivor's last purchase.
            await asyncio.to_thread(self.ledger.newer, aged.contact_id, *theirs)
            if theirs[0] >= micros(cutoff):
                return False
            aged = Aged(aged.contact_id, theirs[0], theirs[1])
        if contact.lifecycle_stage is not LifecycleStage.CUSTOMER:
            await asyncio.to_thread(
                self.ledger.swept, aged.contact_id, aged.last_purchase, churned=False
            )
            self.stats.left += 1
            return False
        last = from_micros(aged.last_purchase)
        caller = Caller(
            actor=SWEEP_ACTOR,
            client=CLIENT,
            request_id=f"no-purchase:{aged.contact_id}:{last.isoformat()}",
        )
        cause = f"no purchase since {last.date().isoformat()} ({aged.what})"
        try:
            written = await self.service.follow_lifecycle_rule(
                caller, aged.contact_id, LifecycleRule.NO_PURCHASE, cause
            )
        except PERMANENT as error:
            log.warning("churn sweep: contact %s passed over: %s", aged.contact_id, error.message)
            await asyncio.to_thread(
                self.ledger.swept, aged.contact_id, aged.last_purchase, churned=False
            )
            self.stats.passed_over += 1
            return False
        promoted = written.outcome.extra.get("promoted") == "true"
        await asyncio.to_thread(
            self.ledger.swept, aged.contact_id, aged.last_purchase, churned=promoted
        )
        if promoted:
            self.stats.churned += 1
        else:
            self.stats.left += 1
        return promoted

    def _contact(self, contact_id: str) -> Contact | None:
        try:
            contact: Any = self.service.app.repository.get(UUID(contact_id))
        except (ValueError, AggregateNotFoundError):
            return None
        return contact if isinstance(contact, Contact) else None


# -- purchases from the loyalty topic --------------------------------------------------


@dataclass(frozen=True)
class Purchase:
    contact_id: str
    order_id: str
    at: datetime
    actor: str


def purchase_of(record: Record) -> Purchase | None:
    """The purchase a loyalty event says was made: a `PointsEarned` of an order
    for a member; None for anything else. Raises `DecodeError` for a value that
    is not a `LoyaltyEvent`."""
    ce_type = header(record, "ce_type")
    if ce_type is not None and ce_type != EARNED_TYPE:
        return None
    message = loyalty_pb.LoyaltyEvent.FromString(record.value or b"")
    if message.WhichOneof("payload") != "points_earned":
        return None
    earned = message.points_earned
    if not earned.order_id or not message.customer_id:
        return None  # a bonus or an adjustment of no order: not a purchase
    if message.HasField("occurred_at"):
        at = message.occurred_at.ToDatetime(tzinfo=UTC)
    else:
        at = datetime.fromtimestamp((record.timestamp or 0) / 1000, UTC)
    return Purchase(message.customer_id, earned.order_id, at, message.actor or "loyalty")


def default_purchases_group() -> str:
    """`<prefix>.contacts-purchases`, after the topic prefix (`CRM_TOPIC_PREFIX`)."""
    prefix = topic_of("loyalty").removesuffix(".loyalty.events")
    return f"{prefix}.contacts-purchases"


@dataclass
class PurchaseStats(GroupProgress):
    purchases: int = 0
    returned: int = 0
    skipped: int = 0


class PurchaseFollower(GroupMember):
    """Records the loyalty topic's purchases; brings churned customers back."""

    def __init__(
        self,
        service: ContactsService,
        ledger: PurchaseLedger,
        *,
        bootstrap: str,
        topic: str | None = None,
        group_id: str | None = None,
        max_records: int = 200,
        poll_timeout_ms: int = 250,
        retry_backoff: float = 0.5,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.service = service
        self.ledger = ledger
        stats = PurchaseStats()
        super().__init__(
            topic=topic or topic_of("loyalty"),
            bootstrap=bootstrap,
            group_id=group_id or default_purchases_group(),
            client_id="crm-contacts-purchases",
            stats=stats,
            max_records=max_records,
            poll_timeout_ms=poll_timeout_ms,
            retry_backoff=retry_backoff,
            heartbeat=heartbeat,
            what="purchases follower",
        )
        self.stats: PurchaseStats = stats

    async def run(self, stop: asyncio.Event) -> None:
        await self.consume(stop)

    async def handle(self, record: Record) -> None:
        at = where(record)
        try:
            purchase = purchase_of(record)
        except DecodeError as error:
            log.error("purchases: %s is not a LoyaltyEvent (%s); passed over", at, error)
            self.stats.skipped += 1
            return
        if purchase is None:
            return
        with consuming_span(record, "follow PointsEarned", tracer):
            try:
                await self._apply(purchase)
            except PERMANENT as error:
                log.warning(
                    "purchases: %s: contact %s: %s; passed over",
                    at,
                    purchase.contact_id,
                    error.message,
                )
                self.stats.skipped += 1
                return
            except Exception as error:
                log.error(
                    "purchases: %s: contact %s failed (%r); retrying in %.1f s",
                    at,
                    purchase.contact_id,
                    error,
                    self._backoff,
                )
                self.heartbeat.failed(f"contact {purchase.contact_id} at {at}: {error!r}")
                raise RetryLater from error
        if self.heartbeat.last_error is not None:
            self.heartbeat.recovered()

    async def _apply(self, purchase: Purchase) -> None:
        recorded = await asyncio.to_thread(
            self.ledger.record, purchase.contact_id, purchase.at, f"order {purchase.order_id}"
        )
        self.stats.purchases += 1
        if not recorded.churned_for:
            return
        contact = await asyncio.to_thread(self._contact, purchase.contact_id)
        if contact is not None and not contact.erased:
            caller = Caller(
                actor=purchase.actor,
                client=CLIENT,
                request_id=f"purchase:{purchase.contact_id}:{purchase.order_id}",
            )
            written = await self.service.follow_lifecycle_rule(
                caller, purchase.contact_id, LifecycleRule.PURCHASE, f"order {purchase.order_id}"
            )
            if written.outcome.extra.get("promoted") == "true":
                self.stats.returned += 1
                log.info(
                    "contact %s is a customer again (order %s)",
                    purchase.contact_id,
                    purchase.order_id,
                )
        await asyncio.to_thread(self.ledger.came_back, purchase.contact_id, recorded.churned_for)

    def _contact(self, contact_id: str) -> Contact | None:
        try:
            contact: Any = self.service.app.repository.get(UUID(contact_id))
        except (ValueError, AggregateNotFoundError):
            return None
        return contact if isinstance(contact, Contact) else None
