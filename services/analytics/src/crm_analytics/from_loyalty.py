"""The loyalty topic into the 360 view: a member's points, tier and ledger.

Pure functions over the stored documents (`document.py`), like
`from_pipeline` for the pipeline topic. The loyalty service publishes
`crm.events.v1.LoyaltyEvent` keyed by the member's contact id, so one
member's ledger arrives in log order; events of the earning rules carry no
customer and change no document, nor do those of the rewards catalogue (a
reward's redemption reaches the member as its `PointsSpent`).

What the document keeps (`loyalty`, see `document.LoyaltyPart`):

- The member number, the enrolment channel and time.
- The balance by state, the way the loyalty service counts it: `active` and
  `locked` are the points the open lots still hold (locked while an order's
  return window runs), `expired`, `spent` and `cancelled` what left the lots
  that way. It is recomputed from the lots after every event, so it never
  goes negative, whatever the events say.
- The open lots (`lot_id`, points left, expiry, locked): what a read turns
  into the points expiring soon (unlocked lots expiring within the next
  `EXPIRING_DAYS` days of the reading time); a lot leaves the list once
  spent, expired or cancelled to nothing. A lot from a positive manual
  adjustment has no expiry in the events and is never listed as expiring.
- The tier as the latest `TierChanged` set it (None before the first one:
  the enrolment event names no tier), the qualifying points that change was
  decided on and when, and a scheduled downgrade. Progress to the next tier
  is not in the view: the tiers' thresholds are the loyalty service's
  configuration and are not in its events (its `GetTier` answers it).
- The newest `RECENT_ENTRIES` ledger entries (signed points).
- Timeline entries (source `loyalty`): enrolled, points earned, redeemed,
  cancelled by a return, expired, tier changed.
- `positions["erp.orders"]`: the highest ERP order record position
  (`erp_position`, the record's offset + 1 in its partition of the inbound
  topic) of the member's applied events, so an ERP publisher can wait for its
  order to show. A customer's orders sit in one partition (keyed by the
  customer), so one number per customer suffices; the partition is kept too.

Idempotent by position (`positions.loyalty`); times come from the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from crm.events.v1 import loyalty_pb2 as events_pb2
from crm_analytics.document import (
    Applied,
    Customer360,
    LedgerEntry,
    Loaded,
    LoyaltyPart,
    OpenLot,
    Outcome,
    PointsBalance,
    SourceAdapter,
    TimelineEntry,
    add_to_timeline,
    advance,
    applied_position,
    aware,
    decode_event,
    new_document,
    payload_name,
    to_datetime,
)
from crm_common.records import Record

SOURCE = "loyalty"
#: The position of the ERP order records a member's events came from.
ERP_ORDERS = "erp.orders"
RECENT_ENTRIES = 20
EXPIRING_DAYS = 30


# -- the document part ------------------------------------------------------------------


def empty_part() -> LoyaltyPart:
    return {
        "member_number": "",
        "enrolment_channel": "",
        "enrolled_at": None,
        "balance": {"active": 0, "locked": 0, "expired": 0, "spent": 0, "cancelled": 0},
        "tier": None,
        "qualifying_points": None,
        "tier_changed_at": None,
        "downgrade": None,
        "lots": [],
        "recent_entries": [],
    }


def expiring_soon(part: LoyaltyPart, now: datetime) -> list[OpenLot]:
    """The unlocked lots whose points expire within `EXPIRING_DAYS` of `now`, soonest first."""
    until = aware(now) + timedelta(days=EXPIRING_DAYS)
    lots = [
        lot
        for lot in part["lots"]
        if not lot["locked"]
        and lot["remaining"] > 0
        and lot["expires_at"] is not None
        and aware(now) < aware(lot["expires_at"]) <= until
    ]
    return sorted(lots, key=lambda lot: (aware(lot["expires_at"] or now), lot["lot_id"]))


class _Change:
    """One event being applied to a copy of the member's part."""

    def __init__(self, part: LoyaltyPart, event: events_pb2.LoyaltyEvent) -> None:
        self.event = event
        self.when = to_datetime(event.occurred_at)
        self.lots = {lot["lot_id"]: lot.copy() for lot in part["lots"]}
        self.order = [lot["lot_id"] for lot in part["lots"]]
        balance = part["balance"]
        self.totals = {
            "expired": balance["expired"],
            "spent": balance["spent"],
            "cancelled": balance["cancelled"],
        }
        self.part = part
        self.entries: list[tuple[str, int, str]] = []
        self.timeline: tuple[str, str] | None = None

    def add_lot(self, lot_id: str, points: int, expires_at: datetime | None, locked: bool) -> None:
        if points <= 0:
            return  # an order worth no points: nothing to hold
        if lot_id not in self.lots:
            self.order.append(lot_id)
        self.lots[lot_id] = {
            "lot_id": lot_id,
            "remaining": points,
            "expires_at": expires_at,
            "locked": locked,
        }

    def take(self, lots: Iterable[events_pb2.LotPoints], into: str) -> int:
        """Moves points out of the lots into `spent`, `expired` or `cancelled`."""
        total = 0
        for taken in lots:
            if taken.points < 0:
                raise ValueError(f"negative points for lot {taken.lot_id}")
            lot = self.lots.get(taken.lot_id)
            if lot is not None:
                # A lot whose earning was never seen (a topic trimmed by retention)
                # has nothing here to take from; the total still counts.
                lot["remaining"] = max(0, lot["remaining"] - taken.points)
            self.totals[into] += taken.points
            total += taken.points
        return total

    def balance(self) -> PointsBalance:
        open_lots = self.lots.values()
        return {
            "active": sum(lot["remaining"] for lot in open_lots if not lot["locked"]),
            "locked": sum(lot["remaining"] for lot in open_lots if lot["locked"]),
            "expired": self.totals["expired"],
            "spent": self.totals["spent"],
            "cancelled": self.totals["cancelled"],
        }


# -- one handler per payload ------------------------------------------------------------

Handler = Callable[[_Change, LoyaltyPart], None]


def _points(n: int) -> str:
    return f"{n} point" if abs(n) == 1 else f"{n} points"


def _enrolled(change: _Change, part: LoyaltyPart) -> None:
    enrolled = change.event.member_enrolled
    part["member_number"] = enrolled.member_number
    part["enrolment_channel"] = enrolled.channel
    part["enrolled_at"] = change.when
    change.timeline = ("loyalty.enrolled", f"Joined the loyalty programme ({enrolled.channel})")


def _earned(change: _Change, part: LoyaltyPart) -> None:
    earned = change.event.points_earned
    if earned.points < 0:
        raise ValueError(f"PointsEarned of {earned.points} points")
    locked = earned.HasField("locked_until") and to_datetime(earned.locked_until) is not None
    change.add_lot(earned.lot_id, earned.points, to_datetime(earned.expires_at), locked)
    detail = f"order {earned.order_id}" if earned.order_id else earned.reason
    change.entries.append(("earned", earned.points, detail))
    if earned.points:
        held = " (locked during the return window)" if locked else ""
        change.timeline = ("loyalty.earned", f"Earned {_points(earned.points)}{held}")


def _spent(change: _Change, part: LoyaltyPart) -> None:
    spent = change.event.points_spent
    total = change.take(spent.lots, "spent")
    change.entries.append(("spent", -total, spent.reference))
    change.timeline = ("loyalty.redeemed", f"Redeemed {_points(total)}")


def _adjusted(change: _Change, part: LoyaltyPart) -> None:
    adjusted = change.event.points_adjusted
    if adjusted.points > 0:
        lot_id = adjusted.lots[0].lot_id if adjusted.lots else f"{change.event.aggregate_id}:adj"
        # The event names no expiry for the new lot.
        change.add_lot(lot_id, adjusted.points, None, False)
        points = adjusted.points
    else:
        points = -change.take(adjusted.lots, "spent")
    change.entries.append(("adjusted", points, adjusted.reason))


def _released(change: _Change, part: LoyaltyPart) -> None:
    total = 0
    for released in change.event.points_released.lots:
        lot = change.lots.get(released.lot_id)
        if lot is not None:
            lot["locked"] = False
        total += released.points
    change.entries.append(("released", total, "return window ended"))


def _cancelled(change: _Change, part: LoyaltyPart) -> None:
    cancelled = change.event.points_cancelled
    total = change.take(cancelled.lots, "cancelled")
    change.entries.append(("cancelled", -total, f"order {cancelled.order_id} returned"))
    if total:
        change.timeline = ("loyalty.cancelled", f"{_points(total)} cancelled by a return")


def _expired(change: _Change, part: LoyaltyPart) -> None:
    total = change.take(change.event.points_expired.lots, "expired")
    change.entries.append(("expired", -total, ""))
    change.timeline = ("loyalty.expired", f"{_points(total)} expired")


def _tier_changed(change: _Change, part: LoyaltyPart) -> None:
    tier = change.event.tier_changed
    part["tier"] = tier.to_tier or None
    part["qualifying_points"] = tier.qualifying_points
    part["tier_changed_at"] = change.when
    part["downgrade"] = None
    start = f"from {tier.from_tier} " if tier.from_tier else ""
    change.timeline = ("loyalty.tier_changed", f"Tier changed {start}to {tier.to_tier}")


def _downgrade_scheduled(change: _Change, part: LoyaltyPart) -> None:
    scheduled = change.event.tier_downgrade_scheduled
    due_at = to_datetime(scheduled.due_at)
    part["downgrade"] = (
        {"to_tier": scheduled.to_tier, "due_at": due_at} if scheduled.to_tier and due_at else None
    )


_MEMBER_HANDLERS: dict[str, Handler] = {
    "member_enrolled": _enrolled,
    "points_earned": _earned,
    "points_spent": _spent,
    "points_adjusted": _adjusted,
    "points_released": _released,
    "points_cancelled": _cancelled,
    "points_expired": _expired,
    "tier_changed": _tier_changed,
    "tier_downgrade_scheduled": _downgrade_scheduled,
}

#: Payloads of a member, and those of no customer (the earning rules, the rewards
#: catalogue: a redemption reaches the member as its PointsSpent): nothing to apply.
MEMBER_PAYLOADS = frozenset(_MEMBER_HANDLERS)
CATALOGUE_PAYLOADS = frozenset(
    {
        "earning_rules_published",
        "reward_defined",
        "reward_restocked",
        "reward_retired",
        "reward_reserved",
    }
)


# -- applying ---------------------------------------------------------------------------


def _advance_erp(doc: Customer360, event: events_pb2.LoyaltyEvent) -> None:
    if event.erp_position > 0:
        positions = doc.get("positions") or {}
        doc["positions"] = {
            **positions,
            ERP_ORDERS: max(int(positions.get(ERP_ORDERS, 0)), event.erp_position),
        }


def mark_seen(doc: Customer360, event: events_pb2.LoyaltyEvent) -> None:
    """An event not applied (a payload this version does not know) still moves
    both positions, so neither kind of reader waits for it in vain."""
    advance(doc, event.position, to_datetime(event.occurred_at), SOURCE)
    _advance_erp(doc, event)


def apply_loyalty_event(doc: Customer360 | None, event: events_pb2.LoyaltyEvent) -> Applied:
    """Applies one event of a member to its customer's document (created if None).

    Never changes `doc`: the result is a shallow copy with new values for every
    changed field, as in `from_contacts.apply_event`.
    """
    if not event.customer_id:
        raise ValueError("member event without customer_id")
    current = doc if doc is not None else new_document(event.customer_id)
    if event.position <= applied_position(current, SOURCE):
        return Applied(current, applied=False)
    payload = payload_name(event, MEMBER_PAYLOADS | CATALOGUE_PAYLOADS)
    if payload in CATALOGUE_PAYLOADS:
        raise ValueError(f"{payload} at position {event.position} names a customer")
    before = current.get("loyalty") or empty_part()
    part: LoyaltyPart = {**before}
    change = _Change(before, event)
    _MEMBER_HANDLERS[payload](change, part)
    part["lots"] = [lot for i in change.order if (lot := change.lots[i])["remaining"] > 0]
    part["balance"] = change.balance()
    entries: list[LedgerEntry] = [
        {
            "entry_id": f"{event.aggregate_id}:{event.version}",
            "kind": kind,
            "points": points,
            "detail": detail,
            "occurred_at": change.when,
        }
        for kind, points, detail in change.entries
    ]
    part["recent_entries"] = (entries + list(before["recent_entries"]))[:RECENT_ENTRIES]
    new = current.copy()
    new["loyalty"] = part
    if change.timeline is not None:
        kind, summary = change.timeline
        entry: TimelineEntry = {
            "entry_id": f"{event.aggregate_id}:{event.version}",
            "source": SOURCE,
            "kind": kind,
            "summary": summary,
            "occurred_at": change.when,
            "direction": None,
            "channel": None,
            "owner": "",
            "position": event.position,
        }
        add_to_timeline(new, entry)
    mark_seen(new, event)
    return Applied(new, applied=True)


# -- the source -------------------------------------------------------------------------


def decode(record: Record) -> events_pb2.LoyaltyEvent:
    """A loyalty event; `customer_id` is empty for the earning rules."""
    return decode_event(record, events_pb2.LoyaltyEvent, "aggregate_id")


def _apply(event: events_pb2.LoyaltyEvent, loaded: Loaded) -> Outcome:
    if not event.customer_id:
        payload = payload_name(event, MEMBER_PAYLOADS | CATALOGUE_PAYLOADS)
        if payload in MEMBER_PAYLOADS:
            raise ValueError(f"{payload} at position {event.position} without customer_id")
        return None
    return apply_loyalty_event(loaded.docs.get(event.customer_id), event)


#: How the store consumes the loyalty topic.
ADAPTER: SourceAdapter[events_pb2.LoyaltyEvent] = SourceAdapter(
    source=SOURCE,
    decode=decode,
    customer_of=lambda e: e.customer_id,
    customers_touched=lambda e: [e.customer_id] if e.customer_id else [],
    apply=_apply,
    extra_positions=(ERP_ORDERS,),
    mark_seen=mark_seen,
)
