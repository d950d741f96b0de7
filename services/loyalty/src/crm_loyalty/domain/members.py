"""`Member`: one contact's loyalty account, its lots, its orders and its tier.

Methods take checked values and refuse with `RuleViolated` (or
`InsufficientPoints`) before any event is triggered, so a refused command
changes nothing. State changes only in the events' `apply`, so replaying the
events rebuilds the same ledger. Order handling is idempotent in the
aggregate itself (an order earns once, a return cancels once), whatever the
transport's redelivery and the request ids' retention.

A merge of contacts closes the merged contact's member (`merge_into`,
`MergedAway`: `merged_into` names the survivor) and moves its open lots and
orders onto the survivor's member (`take_over`, `MergedIn`), lots whole with
their expiry dates. The survivor remembers each merge it took over, so an
undo (`give_back` and `restore`) moves back exactly those lots and the lots
earned since by commands naming the merged contact (`via`), each as it is now.
The relay publishes them (`events_out`: MembershipMerged,
MembershipClosedByMerge, MembershipMergeUndone, MembershipReopened).
"""

from __future__ import annotations

import calendar
import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated
from crm_common.privacy.declaration import PersonalData
from crm_loyalty.domain.ledger import (
    Balance,
    Lot,
    allocate,
    available,
    balance_of,
    due_for_expiry,
    due_for_release,
    take,
)
from crm_loyalty.domain.tiers import SPEND, TierPolicy

_LOT_FIELDS = frozenset(f.name for f in dataclasses.fields(Lot))
MEMBER_NAMESPACE = uuid.UUID("8a0f6c52-3c1e-4b7a-a1d9-52e7d4f0b613")
#: Lots from manual adjustments (their reason starts so) do not count towards tiers.
ADJUSTMENT = "adjustment"
#: Lots from event bonuses (their reason starts so) do not count towards tiers either.
BONUS = "bonus"
CHANNELS = ("web", "store", "app", "call_center", "erp")


class OrderNotKnown(RuleViolated):
    """A return or cancellation of an order this member never placed (yet)."""


def member_id(contact_id: str) -> uuid.UUID:
    """The member of a contact: one per contact, by construction."""
    return uuid.uuid5(MEMBER_NAMESPACE, contact_id)


def member_number(contact_id: str) -> str:
    """A ten-digit number derived from the contact, with a Luhn check digit."""
    digits = f"{int(member_id(contact_id).hex[:15], 16) % 10**9:09d}"
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return digits + str((10 - total % 10) % 10)


@dataclass
class OrderRecord:
    lot_id: str
    lines: dict[str, int]
    returned_lines: set[str] = field(default_factory=set)
    returns: set[str] = field(default_factory=set)


class Member(Aggregate):
    """A contact's loyalty account."""

    class Created(Aggregate.Created):
        customer_id: str
        member_number: str
        channel: str
        at: datetime
        #: "MM-DD" (the birthday bonus), "" when not given.
        birthday: str = ""
        #: The contact id of the member who referred this one, "" for none.
        referred_by: str = ""
        # A birthday and who referred them are the person's; erased, both read as not given.
        # The subject is the member, one per contact by construction (`member_id`).
        personal_data = PersonalData(
            "birthday", "referred_by", redacted={"birthday": "", "referred_by": ""}
        )

    class Earned(Aggregate.Event):
        customer_id: str
        lot_id: str
        points: int
        expires_at: datetime
        locked_until: datetime | None
        order_id: str
        rule_version: int
        reason: str
        lines: dict[str, int]
        at: datetime
        #: Money spent per line (decimal text) in `currency`, for tiers by spend.
        spend: dict[str, str] | None = None
        currency: str = ""
        #: An event bonus: "first_purchase", "birthday:<year>", "referee",
        #: "referrer:<contact id of the new member>"; "" for other earnings.
        bonus: str = ""
        #: The contact the command named when it was merged into this member's
        #: contact ("" for this member's own): what an undone merge gives back.
        via: str = ""

        def apply(self, aggregate: Any) -> None:
            aggregate._add_lot(self)
            if self.bonus:
                aggregate.bonuses.add(self.bonus)

    class ReferralSettled(Aggregate.Event):
        """The referral of this member was rewarded (its first purchase landed)."""

        customer_id: str
        referred_by: str
        at: datetime
        # Who referred the member, as at enrolment.
        personal_data = PersonalData("referred_by", redacted={"referred_by": ""})

        def apply(self, aggregate: Any) -> None:
            aggregate.referral_settled = True

    class Spent(Aggregate.Event):
        customer_id: str
        points: int
        lots: dict[str, int]
        reference: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            take(aggregate.lots, self.lots, "spent")

    class Adjusted(Aggregate.Event):
        customer_id: str
        points: int
        lots: dict[str, int]
        reason: str
        adjusted_by: str
        lot_id: str
        expires_at: datetime
        at: datetime

        def apply(self, aggregate: Any) -> None:
            if self.points > 0:
                aggregate._add_lot(self, reason=f"{ADJUSTMENT}: {self.reason}")
            else:
                take(aggregate.lots, self.lots, "spent")

    class Released(Aggregate.Event):
        customer_id: str
        lots: dict[str, int]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            for lot_id in self.lots:
                aggregate.lots[lot_id].locked_until = None

    class Cancelled(Aggregate.Event):
        customer_id: str
        lots: dict[str, int]
        order_id: str
        return_id: str
        line_ids: list[str]
        at: datetime
        #: Points the return should have cancelled but that were spent already and
        #: not covered by the member's other lots.
        unrecovered: int = 0

        def apply(self, aggregate: Any) -> None:
            take(aggregate.lots, self.lots, "cancelled")
            order = aggregate.orders[self.order_id]
            order.returned_lines.update(self.line_ids)
            order.returns.add(self.return_id)

    class Expired(Aggregate.Event):
        customer_id: str
        lots: dict[str, int]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            take(aggregate.lots, self.lots, "expired")

    class TierChanged(Aggregate.Event):
        customer_id: str
        from_tier: str
        to_tier: str
        qualifying_points: int
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.tier = self.to_tier
            aggregate.downgrade_due = None
            aggregate.downgrade_to = ""

    class DowngradeScheduled(Aggregate.Event):
        """A lower tier is due at `due_at` unless points come back; None: called off."""

        customer_id: str
        to_tier: str
        due_at: datetime | None
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.downgrade_due = self.due_at
            aggregate.downgrade_to = self.to_tier

    # -- merges of contacts (published: see events_out) --

    class MergedAway(Aggregate.Event):
        """The member's contact was merged into `into`: its open lots and its orders
        went to that contact's member, and this membership is closed."""

        customer_id: str
        into: str
        reference: str
        lots: list[str]
        orders: list[str]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            for lot_id in self.lots:
                hand_over(aggregate.lots[lot_id], self.into)
            for order_id in self.orders:
                aggregate.orders.pop(order_id, None)
            aggregate.merged_into = self.into
            aggregate.merge_reference = self.reference

    class MergedIn(Aggregate.Event):
        """The member of a contact merged into this one came along: its lots (whole,
        expiry dates kept), its orders, its bonuses given; a birthday and a referrer
        this member had not given; the tier when the merge enrolled this member."""

        customer_id: str
        merged: str
        reference: str
        lots: list[dict[str, Any]]
        orders: dict[str, dict[str, Any]]
        bonuses: list[str]
        tier: str
        enrolled_at: datetime | None
        referral_settled: bool
        at: datetime
        birthday: str = ""
        referred_by: str = ""
        # The merged member's birthday and referrer, now this person's.
        personal_data = PersonalData(
            "birthday", "referred_by", redacted={"birthday": "", "referred_by": ""}
        )

        def apply(self, aggregate: Any) -> None:
            for state in self.lots:
                aggregate._put_lot(state)
            for order_id, order in self.orders.items():
                aggregate.orders[order_id] = order_of(order)
            aggregate.bonuses.update(self.bonuses)
            if self.tier:
                aggregate.tier = self.tier
            if self.enrolled_at is not None and self.enrolled_at < aggregate.enrolled_at:
                aggregate.enrolled_at = self.enrolled_at
            if self.referral_settled:
                aggregate.referral_settled = True
            if self.birthday:
                aggregate.birthday = self.birthday
            if self.referred_by:
                aggregate.referred_by = self.referred_by
            aggregate._merges()[merge_key(self.reference, self.merged)] = {
                "merged": self.merged,
                "lots": [state["lot_id"] for state in self.lots],
                "orders": list(self.orders),
                "birthday": bool(self.birthday),
                "referred_by": bool(self.referred_by),
                "undone": False,
            }

    class MergeReversed(Aggregate.Event):
        """A merge undone: what came from `merged`, and what was earned since by
        commands naming it, went back to its member."""

        customer_id: str
        merged: str
        reference: str
        lots: list[str]
        orders: list[str]
        clear_birthday: bool
        clear_referrer: bool
        at: datetime

        def apply(self, aggregate: Any) -> None:
            for lot_id in self.lots:
                hand_over(aggregate.lots[lot_id], self.merged)
            for order_id in self.orders:
                aggregate.orders.pop(order_id, None)
            if self.clear_birthday:
                aggregate.birthday = ""
            if self.clear_referrer:
                aggregate.referred_by = ""
            record = aggregate._merges().get(merge_key(self.reference, self.merged))
            if record is not None:
                record["undone"] = True

    class MergeRestored(Aggregate.Event):
        """This membership is open again: its merge into `survivor` was undone."""

        customer_id: str
        survivor: str
        reference: str
        lots: list[dict[str, Any]]
        orders: dict[str, dict[str, Any]]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            for state in self.lots:
                aggregate._put_lot({**state, "via": ""})
            for order_id, order in self.orders.items():
                aggregate.orders[order_id] = order_of(order)
            aggregate.merged_into = ""
            aggregate.merge_reference = ""

    #: The contact this member's contact was merged into ("" while open), and the merge.
    #: (Class defaults: snapshots taken before merges existed lack them.)
    merged_into = ""
    merge_reference = ""

    def __init__(
        self,
        customer_id: str,
        member_number: str,
        channel: str,
        at: datetime,
        birthday: str = "",
        referred_by: str = "",
    ) -> None:
        self.customer_id = customer_id
        self.member_number = member_number
        self.channel = channel
        self.enrolled_at = at
        self.birthday = birthday
        self.referred_by = referred_by
        self.bonuses: set[str] = set()
        self.referral_settled = False
        self.tier = ""
        self.downgrade_due: datetime | None = None
        self.downgrade_to = ""
        self.lots: dict[str, Lot] = {}
        self.orders: dict[str, OrderRecord] = {}

    @staticmethod
    def create_id(customer_id: str, **_: Any) -> uuid.UUID:
        return member_id(customer_id)

    @classmethod
    def enrol(
        cls,
        contact_id: str,
        channel: str,
        tier: str,
        at: datetime,
        birthday: str = "",
        referred_by: str = "",
    ) -> Member:
        if channel not in CHANNELS:
            raise RuleViolated(f"unknown enrolment channel {channel!r}")
        if referred_by == contact_id:
            raise RuleViolated("a member cannot refer itself")
        member = cls(
            customer_id=contact_id,
            member_number=member_number(contact_id),
            channel=channel,
            at=at,
            birthday=birthday,
            referred_by=referred_by,
        )
        member.tier = tier
        return member

    # -- state helpers (called by events) ------------------------------------------

    def _add_lot(self, event: Any, reason: str | None = None) -> None:
        lines = dict(getattr(event, "lines", {}) or {})
        lot = Lot(
            lot_id=event.lot_id,
            seq=len(self.lots),
            earned=event.points,
            earned_at=event.at,
            expires_at=event.expires_at,
            locked_until=getattr(event, "locked_until", None),
            order_id=getattr(event, "order_id", ""),
            rule_version=getattr(event, "rule_version", 0),
            reason=event.reason if reason is None else reason,
            lines=lines,
            remaining=event.points,
            spend=dict(getattr(event, "spend", None) or {}),
            currency=getattr(event, "currency", "") or "",
            via=getattr(event, "via", "") or "",
        )
        self.lots[lot.lot_id] = lot
        if lot.order_id:
            self.orders[lot.order_id] = OrderRecord(lot.lot_id, lines)

    def _put_lot(self, state: dict[str, Any]) -> None:
        """A lot moved in by a merge or its undo: a lot held here before keeps its place."""
        known = self.lots.get(state["lot_id"])
        lot = lot_of(state, known.seq if known is not None else len(self.lots))
        lot.check()
        self.lots[lot.lot_id] = lot

    def _merges(self) -> dict[str, dict[str, Any]]:
        """The merges this member took over, by `merge_key`: what each brought."""
        merges: dict[str, dict[str, Any]] = self.__dict__.setdefault("merges", {})
        return merges

    def _lot_id(self) -> str:
        return f"{self.id}:{len(self.lots) + 1}"

    # -- reading ------------------------------------------------------------------

    @property
    def balance(self) -> Balance:
        return balance_of(self.lots.values())

    def qualifying_points(self, policy: TierPolicy, at: datetime) -> int:
        """What tiers count in the rolling window: points earned by purchases less
        what returns cancelled (basis points), or whole currency units spent less
        returned lines (basis spend; other currencies do not count)."""
        since = at - policy.window
        window = [
            lot
            for lot in self.lots.values()
            if lot.earned_at > since
            and not lot.held_by
            and not lot.reason.startswith((ADJUSTMENT, BONUS))
        ]
        if policy.basis == SPEND:
            total = Decimal(0)
            for lot in window:
                if lot.currency != policy.currency:
                    continue
                order = self.orders.get(lot.order_id) if lot.order_id else None
                returned = order.returned_lines if order is not None else set()
                total += sum(
                    (Decimal(v) for k, v in lot.spend.items() if k not in returned), Decimal(0)
                )
            return int(total)
        return sum(lot.earned - lot.cancelled for lot in window)

    @property
    def has_purchased(self) -> bool:
        """Whether any purchase or order earned a lot (not adjustments, not bonuses)."""
        return any(
            not lot.held_by and not lot.reason.startswith((ADJUSTMENT, BONUS))
            for lot in self.lots.values()
        )

    def birthday_due(self, at: datetime) -> int | None:
        """The year whose birthday bonus is due at `at`, or None: on or after the
        birthday (29 February: the 28th in other years), a birthday on or after
        the enrolment, not given for that year yet."""
        if not self.birthday:
            return None
        month, day = (int(x) for x in self.birthday.split("-"))
        year = at.year
        if month == 2 and day == 29 and not calendar.isleap(year):
            day = 28
        when = date(year, month, day)
        if at.date() < when or when < self.enrolled_at.date():
            return None
        return None if f"birthday:{year}" in self.bonuses else year

    # -- commands -----------------------------------------------------------------

    def award_bonus(
        self,
        bonus: str,
        points: int,
        *,
        expires_at: datetime,
        rule_version: int,
        at: datetime,
        locked_until: datetime | None = None,
    ) -> str | None:
        """An event bonus as a lot of its own (None, and nothing, for 0 points or a
        bonus given before): `reason` "bonus: <bonus>"."""
        if points <= 0 or bonus in self.bonuses:
            return None
        lot_id = self._lot_id()
        self.trigger_event(
            self.Earned,
            customer_id=self.customer_id,
            lot_id=lot_id,
            points=points,
            expires_at=expires_at,
            locked_until=locked_until,
            order_id="",
            rule_version=rule_version,
            reason=f"{BONUS}: {bonus.split(':')[0].replace('_', ' ')}",
            lines={},
            at=at,
            bonus=bonus,
        )
        return lot_id

    def settle_referral(self, at: datetime) -> bool:
        """Marks the referral rewarded; False when there is none or it was."""
        if not self.referred_by or self.referral_settled:
            return False
        self.trigger_event(
            self.ReferralSettled, customer_id=self.customer_id, referred_by=self.referred_by, at=at
        )
        return True

    def earn(
        self,
        points: int,
        *,
        expires_at: datetime,
        rule_version: int,
        reason: str,
        at: datetime,
        locked_until: datetime | None = None,
        order_id: str = "",
        lines: dict[str, int] | None = None,
        spend: dict[str, str] | None = None,
        currency: str = "",
        via: str = "",
    ) -> str | None:
        """Adds a lot; None (and no event) for zero points. `via`: the merged contact
        the command named, when it answers for this member."""
        if points < 0:
            raise RuleViolated("earned points cannot be negative")
        if points == 0:
            return None
        lot_id = self._lot_id()
        self.trigger_event(
            self.Earned,
            customer_id=self.customer_id,
            lot_id=lot_id,
            points=points,
            expires_at=expires_at,
            locked_until=locked_until,
            order_id=order_id,
            rule_version=rule_version,
            reason=reason,
            lines=dict(lines or {}),
            at=at,
            spend=dict(spend or {}),
            currency=currency,
            via=via,
        )
        return lot_id

    def knows_order(self, order_id: str) -> bool:
        return order_id in self.orders

    def place_order(
        self,
        order_id: str,
        lines: dict[str, int],
        *,
        expires_at: datetime,
        locked_until: datetime,
        rule_version: int,
        at: datetime,
        spend: dict[str, str] | None = None,
        currency: str = "",
        via: str = "",
    ) -> bool:
        """Earns an order's points, locked for its return window. False: already placed
        (a redelivery), nothing happens. An order worth no points still records a
        zero lot, so its later return is recognised."""
        if order_id in self.orders:
            return False
        self.trigger_event(
            self.Earned,
            customer_id=self.customer_id,
            lot_id=self._lot_id(),
            points=sum(lines.values()),
            expires_at=expires_at,
            locked_until=locked_until,
            order_id=order_id,
            rule_version=rule_version,
            reason="order",
            lines=dict(lines),
            at=at,
            spend=dict(spend or {}),
            currency=currency,
            via=via,
        )
        return True

    def return_order(
        self, order_id: str, return_id: str, line_ids: list[str], at: datetime
    ) -> int | None:
        """Cancels the points of the returned lines (all lines not returned yet when
        none are named: a cancellation is the return "cancelled" of the whole order).

        None: this return was applied already. The points come from the order's
        lot, locked or released. When some of them were spent meanwhile (after
        the return window), the rest is taken back from the member's other
        available lots, first to expire first; what even those cannot cover is
        recorded as `unrecovered` (the balance never goes negative). Returns the
        points cancelled.
        """
        order = self.orders.get(order_id)
        if order is None:
            raise OrderNotKnown(f"order {order_id!r} is not known for this member")
        if return_id in order.returns:
            return None
        unknown = [line for line in line_ids if line not in order.lines]
        if unknown:
            raise RuleViolated(f"order {order_id!r} has no lines {', '.join(unknown)}")
        wanted = [
            line for line in (line_ids or list(order.lines)) if line not in order.returned_lines
        ]
        owed = sum(order.lines[line] for line in wanted)
        lot = self.lots[order.lot_id]
        taken: dict[str, int] = {}
        own = min(owed, lot.remaining)
        if own:
            taken[lot.lot_id] = own
        short = owed - own
        if short:
            others = [x for x in self.lots.values() if x.lot_id != lot.lot_id]
            back = min(short, available(others, at))
            if back:
                for lot_id, points in allocate(others, back, at).items():
                    taken[lot_id] = taken.get(lot_id, 0) + points
            short -= back
        self.trigger_event(
            self.Cancelled,
            customer_id=self.customer_id,
            lots=taken,
            order_id=order_id,
            return_id=return_id,
            line_ids=wanted,
            at=at,
            unrecovered=short,
        )
        return sum(taken.values())

    def spend(self, points: int, reference: str, at: datetime) -> dict[str, int]:
        allocation = allocate(self.lots.values(), points, at)
        self.trigger_event(
            self.Spent,
            customer_id=self.customer_id,
            points=points,
            lots=allocation,
            reference=reference,
            at=at,
        )
        return allocation

    def adjust(
        self, points: int, reason: str, adjusted_by: str, expires_at: datetime, at: datetime
    ) -> None:
        if points == 0:
            raise RuleViolated("an adjustment of 0 points changes nothing")
        if not reason.strip():
            raise RuleViolated("an adjustment needs a reason")
        allocation = allocate(self.lots.values(), -points, at) if points < 0 else {}
        self.trigger_event(
            self.Adjusted,
            customer_id=self.customer_id,
            points=points,
            lots=allocation,
            reason=reason,
            adjusted_by=adjusted_by,
            lot_id=self._lot_id() if points > 0 else "",
            expires_at=expires_at,
            at=at,
        )

    def settle(self, at: datetime) -> tuple[int, int]:
        """Releases the locks whose return window ended, then expires the lots past
        their expiry. Idempotent: what was released or expired is not again."""
        released = due_for_release(self.lots.values(), at)
        if released:
            self.trigger_event(self.Released, customer_id=self.customer_id, lots=released, at=at)
        expired = due_for_expiry(self.lots.values(), at)
        if expired:
            self.trigger_event(self.Expired, customer_id=self.customer_id, lots=expired, at=at)
        return sum(released.values()), sum(expired.values())

    # -- merges of contacts ------------------------------------------------------------

    def merge_into(
        self, survivor: str, reference: str, at: datetime
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Closes this membership for the merge `reference` of its contact into
        `survivor`: the lots that still hold points or belong to an order (so a
        later return finds them) and the orders leave. Returns them as they were,
        for the survivor's member (`take_over`)."""
        if self.merged_into:
            raise RuleViolated(
                f"the membership of {self.customer_id} was merged into {self.merged_into} already"
            )
        if survivor == self.customer_id:
            raise RuleViolated("a contact cannot be merged into itself")
        moving = [
            lot
            for lot in self.lots.values()
            if not lot.held_by and (lot.remaining > 0 or lot.order_id)
        ]
        lots = [lot_state(lot) for lot in moving]
        orders = {order_id: order_state(o) for order_id, o in self.orders.items()}
        self.trigger_event(
            self.MergedAway,
            customer_id=self.customer_id,
            into=survivor,
            reference=reference,
            lots=[lot.lot_id for lot in moving],
            orders=list(orders),
            at=at,
        )
        return lots, orders

    def take_over(
        self,
        merged: Member,
        reference: str,
        lots: list[dict[str, Any]],
        orders: dict[str, dict[str, Any]],
        at: datetime,
        *,
        enrolled_by_merge: bool,
    ) -> None:
        """What `merged.merge_into` gave, onto this member's ledger. A member the
        merge enrolled takes the merged member's tier and enrolment date; a birthday
        or a referrer this member had not given is taken from the merged one."""
        referrer = merged.referred_by
        if self.referred_by or referrer == self.customer_id:
            referrer = ""
        self.trigger_event(
            self.MergedIn,
            customer_id=self.customer_id,
            merged=merged.customer_id,
            reference=reference,
            lots=lots,
            orders=orders,
            bonuses=sorted(merged.bonuses),
            tier=merged.tier if enrolled_by_merge else "",
            enrolled_at=merged.enrolled_at,
            referral_settled=bool(referrer) and merged.referral_settled,
            at=at,
            birthday="" if self.birthday else merged.birthday,
            referred_by=referrer,
        )

    def took_over(self, reference: str, merged: str) -> bool:
        """Whether the merge `reference` of `merged` into this member was taken over
        and not undone."""
        record = self._merges().get(merge_key(reference, merged))
        return record is not None and not record["undone"]

    def give_back(
        self, merged: str, reference: str, at: datetime
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]] | None:
        """Undoes the merge `reference` of `merged` into this member: the lots it
        brought and the lots earned since by commands naming it (each as it is now:
        what was spent, expired or cancelled of it meanwhile stays so), with their
        orders, go back. None: not taken over, or given back already."""
        record = self._merges().get(merge_key(reference, merged))
        if record is None or record["undone"]:
            return None
        brought = [lot_id for lot_id in record["lots"] if lot_id in self.lots]
        since = [
            lot.lot_id
            for lot in self.lots.values()
            if lot.via == merged and not lot.held_by and lot.lot_id not in brought
        ]
        ids = brought + since
        for lot_id in ids:
            holder = self.lots[lot_id].held_by
            if holder:
                raise RuleViolated(
                    f"points of {merged} moved on to {holder} by a later merge: undo that first"
                )
        orders = {
            order_id: order_state(order)
            for order_id, order in self.orders.items()
            if order_id in record["orders"] or order.lot_id in since
        }
        lots = [lot_state(self.lots[lot_id]) for lot_id in ids]
        self.trigger_event(
            self.MergeReversed,
            customer_id=self.customer_id,
            merged=merged,
            reference=reference,
            lots=ids,
            orders=list(orders),
            clear_birthday=bool(record["birthday"]),
            clear_referrer=bool(record["referred_by"]),
            at=at,
        )
        return lots, orders

    def restore(
        self,
        survivor: str,
        reference: str,
        lots: list[dict[str, Any]],
        orders: dict[str, dict[str, Any]],
        at: datetime,
    ) -> None:
        """Opens this membership again with what the survivor gave back."""
        if self.merged_into != survivor or self.merge_reference != reference:
            raise RuleViolated(
                f"the membership of {self.customer_id} is not closed by merge {reference}"
            )
        self.trigger_event(
            self.MergeRestored,
            customer_id=self.customer_id,
            survivor=survivor,
            reference=reference,
            lots=lots,
            orders=orders,
            at=at,
        )

    def review_tier(self, policy: TierPolicy, at: datetime) -> str | None:
        """Upgrades at once; downgrades once the points stayed below for the grace
        period. Returns the new tier when it changed."""
        points = self.qualifying_points(policy, at)
        target = policy.tier_for(points)
        current = self.tier or policy.lowest
        if policy.rank(target) > policy.rank(current):
            self._change_tier(current, target, points, at)
            return target
        if policy.rank(target) == policy.rank(current):
            if self.downgrade_due is not None:
                self.trigger_event(
                    self.DowngradeScheduled,
                    customer_id=self.customer_id,
                    to_tier="",
                    due_at=None,
                    at=at,
                )
            return None
        if self.downgrade_due is None:
            self.trigger_event(
                self.DowngradeScheduled,
                customer_id=self.customer_id,
                to_tier=target,
                due_at=at + policy.grace,
                at=at,
            )
            return None
        if at >= self.downgrade_due:
            self._change_tier(current, target, points, at)
            return target
        return None

    def _change_tier(self, current: str, target: str, points: int, at: datetime) -> None:
        self.trigger_event(
            self.TierChanged,
            customer_id=self.customer_id,
            from_tier=current,
            to_tier=target,
            qualifying_points=points,
            at=at,
        )


def merge_key(reference: str, merged: str) -> str:
    return f"{reference}|{merged}"


def hand_over(lot: Lot, holder: str) -> None:
    """The lot is `holder`'s now: here it counts as moved, whole."""
    lot.held_by = holder
    lot.moved = lot.earned
    lot.remaining = lot.spent = lot.expired = lot.cancelled = 0
    lot.locked_until = None


_LOT_TIMES = ("earned_at", "expires_at", "locked_until")


def lot_state(lot: Lot) -> dict[str, Any]:
    """A lot as an event carries it (times as ISO text)."""
    state = dataclasses.asdict(lot)
    for name in _LOT_TIMES:
        value = state[name]
        state[name] = value.isoformat() if value is not None else None
    del state["seq"], state["held_by"], state["moved"]
    return state


def lot_of(state: dict[str, Any], seq: int) -> Lot:
    values = dict(state)
    for name in _LOT_TIMES:
        value = values.get(name)
        values[name] = datetime.fromisoformat(value) if value else None
    return Lot(
        seq=seq,
        **{k: v for k, v in values.items() if k in _LOT_FIELDS and k not in ("seq", "held_by")},
    )


def order_state(order: OrderRecord) -> dict[str, Any]:
    return {
        "lot_id": order.lot_id,
        "lines": dict(order.lines),
        "returned_lines": sorted(order.returned_lines),
        "returns": sorted(order.returns),
    }


def order_of(state: dict[str, Any]) -> OrderRecord:
    return OrderRecord(
        state["lot_id"],
        dict(state["lines"]),
        set(state.get("returned_lines", ())),
        set(state.get("returns", ())),
    )


def expiry_of(at: datetime, days: int) -> datetime:
    return at + timedelta(days=days)
