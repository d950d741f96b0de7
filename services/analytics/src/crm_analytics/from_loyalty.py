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
  cancelled by a return, expired, tier changed; a membership merged in, points
  given back and a membership reopened (below).
- `closed_by_merge` while a contacts merge has closed the membership.
- `positions["erp.orders"]`: the highest ERP order record position
  (`erp_position`, the record's offset + 1 in its partition of the inbound
  topic) of the member's applied events, so an ERP publisher can wait for its
  order to show. A customer's orders sit in one partition (keyed by the
  customer), so one number per customer suffices; the partition is kept too.

A contacts merge moves the merged contact's membership onto the survivor's
(`MembershipMerged` on the survivor, `MembershipClosedByMerge` on the merged
contact), and its undo moves back what it brought (`MembershipMergeUndone`
on the survivor, `MembershipReopened` on the merged contact):

- The survivor's document takes the moved lots as if earned there: their
  remaining points (locked or not) in its balance and its open lots, with
  their expiry dates (so they count among the points expiring soon), what
  was spent, expired or cancelled of them in its totals, and the merged
  member's tier when the merge enrolled the survivor; a ledger entry and a
  timeline entry note the points that came. The undo takes them out again
  as they are then (what the survivor spent of them stays spent where it
  happened: on the lot, which goes back).
- The merged contact's document keeps its part, closed (`closed_by_merge`:
  the survivor and the merge): no open lots and no points left; what was
  used up before the merge stays in its totals, as the loyalty service
  keeps those lots on the closed membership. Reopened by the undo, it takes
  the lots given back, with a timeline entry.

Each of the four events changes its own member's document, idempotent by
its position. The event listing the lots with their figures
(`MembershipMerged`, `MembershipReopened`) takes those figures out of the
other contact's totals too (a `Detached` fan-out, applied once with the
event), while the event naming the lots (`MembershipClosedByMerge`,
`MembershipMergeUndone`) takes them out of its own document's open lots:
either order of the two gives the same documents. What a fan-out finds not
yet in the totals (the other member's partition is behind) waits in
`moved_out_pending` and leaves them as that history arrives. The other
contact's document must hold its loyalty part by then, as it does live: a
fan-out to a document without one changes nothing (a rebuild, which reads
the members' partitions one number at a time, may apply a survivor's merge
before the merged member's first event; that history then stays counted in
the merged contact's totals as well).

Idempotent by position (`positions.loyalty`); times come from the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial

from crm.events.v1 import loyalty_pb2 as events_pb2
from crm_analytics.document import (
    Applied,
    Customer360,
    Detached,
    FanOut,
    LedgerEntry,
    Loaded,
    LoyaltyPart,
    MembershipClosed,
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
        self.pending = dict(part.get("moved_out_pending") or {})
        self.part = part
        self.entries: list[tuple[str, int, str]] = []
        self.timeline: tuple[str, str] | None = None
        self.fan_out: list[FanOut] = []

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

    def remove(self, lot_ids: Iterable[str]) -> int:
        """Takes the lots out of the open ones (moved elsewhere, whole); returns
        the points they still held."""
        total = 0
        for lot_id in lot_ids:
            lot = self.lots.pop(lot_id, None)
            if lot is not None:
                self.order.remove(lot_id)
                total += lot["remaining"]
        return total

    def put(self, lots: Iterable[events_pb2.MovedLot]) -> int:
        """Lots moved in whole: their remaining points open here, what left them
        before counts in the totals. Returns the points they hold."""
        total = 0
        for lot in lots:
            _check_moved(lot)
            locked = to_datetime(lot.locked_until) is not None
            self.add_lot(lot.lot_id, lot.remaining, to_datetime(lot.expires_at), locked)
            self.totals["spent"] += lot.spent
            self.totals["expired"] += lot.expired
            self.totals["cancelled"] += lot.cancelled
            total += lot.remaining
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


# -- a membership moved by a contacts merge, and back by its undo ---------------------------


def _check_moved(lot: events_pb2.MovedLot) -> None:
    parts = (lot.remaining, lot.spent, lot.expired, lot.cancelled)
    if min(parts) < 0 or sum(parts) != lot.earned:
        raise ValueError(f"moved lot {lot.lot_id} does not add up: {lot.earned} earned, {parts}")


_HISTORY = ("spent", "expired", "cancelled")


def settle(totals: dict[str, int], pending: dict[str, int]) -> None:
    """Takes what is pending out of the totals, as far as they hold it: the rest
    stays pending until more history arrives, so a total never goes negative and
    the order the two members' events are applied in does not matter."""
    for name in _HISTORY:
        taken = min(pending.get(name, 0), totals[name])
        if taken > 0:
            totals[name] -= taken
            pending[name] -= taken
        if not pending.get(name):
            pending.pop(name, None)


def without_moved_history(doc: Customer360, lots: Sequence[events_pb2.MovedLot]) -> Customer360:
    """The document whose member the lots left, whole: what was spent, expired or
    cancelled of them leaves its totals (its open lots go with the event that
    names them, on its own member); what the totals do not hold yet stays
    pending (`moved_out_pending`)."""
    part = doc.get("loyalty")
    if part is None:
        return doc
    balance = part["balance"]
    totals = {
        "spent": balance["spent"],
        "expired": balance["expired"],
        "cancelled": balance["cancelled"],
    }
    pending = dict(part.get("moved_out_pending") or {})
    for lot in lots:
        for name in _HISTORY:
            pending[name] = pending.get(name, 0) + getattr(lot, name)
    settle(totals, pending)
    new = doc.copy()
    updated: LoyaltyPart = {
        **part,
        "balance": {
            "active": balance["active"],
            "locked": balance["locked"],
            "expired": totals["expired"],
            "spent": totals["spent"],
            "cancelled": totals["cancelled"],
        },
    }
    _keep_pending(updated, pending)
    new["loyalty"] = updated
    return new


def _keep_pending(part: LoyaltyPart, pending: dict[str, int]) -> None:
    if pending:
        part["moved_out_pending"] = pending
    else:
        part.pop("moved_out_pending", None)


def _detached(change: _Change, other: str, lots: Sequence[events_pb2.MovedLot]) -> None:
    if other and other != change.event.customer_id:
        change.fan_out.append(Detached(other, partial(without_moved_history, lots=list(lots))))


def _merged_in(change: _Change, part: LoyaltyPart) -> None:
    merged = change.event.membership_merged
    if not merged.merged_contact_id:
        raise ValueError(f"MembershipMerged at position {change.event.position} names no contact")
    points = change.put(merged.lots)
    if merged.tier:
        # The merge enrolled this member with the merged member's tier.
        part["tier"] = merged.tier
        part["tier_changed_at"] = change.when
    since = to_datetime(merged.merged_enrolled_at)
    if since is not None and (part["enrolled_at"] is None or since < aware(part["enrolled_at"])):
        part["enrolled_at"] = since
    change.entries.append(("merged_in", points, f"from {merged.merged_contact_id}"))
    change.timeline = (
        "loyalty.merged_in",
        f"Membership merged in (contacts merged): {_points(points)}",
    )
    _detached(change, merged.merged_contact_id, merged.lots)


def _closed_by_merge(change: _Change, part: LoyaltyPart) -> None:
    closed = change.event.membership_closed_by_merge
    if not closed.survivor_id:
        raise ValueError(
            f"MembershipClosedByMerge at position {change.event.position} names no survivor"
        )
    points = change.remove(closed.lot_ids)
    record: MembershipClosed = {
        "survivor_id": closed.survivor_id,
        "merge_id": closed.merge_id,
        "closed_at": change.when,
    }
    part["closed_by_merge"] = record
    # No timeline entry: the survivor's view (which this contact's id now
    # answers with) notes the points that came.
    change.entries.append(("merged_away", -points, f"into {closed.survivor_id}"))


def _merge_undone(change: _Change, part: LoyaltyPart) -> None:
    undone = change.event.membership_merge_undone
    points = change.remove(undone.lot_ids)
    change.entries.append(("given_back", -points, f"to {undone.merged_contact_id}"))
    change.timeline = (
        "loyalty.given_back",
        f"Points given back (merge undone): {_points(points)}",
    )


def _reopened(change: _Change, part: LoyaltyPart) -> None:
    reopened = change.event.membership_reopened
    points = change.put(reopened.lots)
    part.pop("closed_by_merge", None)
    change.entries.append(("reopened", points, f"from {reopened.survivor_id}"))
    change.timeline = (
        "loyalty.reopened",
        f"Membership reopened (merge undone): {_points(points)}",
    )
    _detached(change, reopened.survivor_id, reopened.lots)


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
_MERGE_HANDLERS: dict[str, Handler] = {
    "membership_merged": _merged_in,
    "membership_closed_by_merge": _closed_by_merge,
    "membership_merge_undone": _merge_undone,
    "membership_reopened": _reopened,
}
_HANDLERS = {**_MEMBER_HANDLERS, **_MERGE_HANDLERS}

#: Payloads of a member's ledger and tier.
MEMBER_PAYLOADS = frozenset(_MEMBER_HANDLERS)
#: Payloads of a membership moved by a contacts merge or its undo (on either member).
MERGE_PAYLOADS = frozenset(_MERGE_HANDLERS)
#: Payloads of no customer (the earning rules, the rewards catalogue: a
#: redemption reaches the member as its PointsSpent): nothing to apply.
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
    payload = payload_name(event, frozenset(_HANDLERS) | CATALOGUE_PAYLOADS)
    if payload in CATALOGUE_PAYLOADS:
        raise ValueError(f"{payload} at position {event.position} names a customer")
    before = current.get("loyalty") or empty_part()
    part: LoyaltyPart = {**before}
    change = _Change(before, event)
    _HANDLERS[payload](change, part)
    settle(change.totals, change.pending)
    _keep_pending(part, change.pending)
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
    return Applied(new, applied=True, fan_out=change.fan_out)


# -- the source -------------------------------------------------------------------------


def decode(record: Record) -> events_pb2.LoyaltyEvent:
    """A loyalty event; `customer_id` is empty for the earning rules."""
    return decode_event(record, events_pb2.LoyaltyEvent, "aggregate_id")


def _apply(event: events_pb2.LoyaltyEvent, loaded: Loaded) -> Outcome:
    if not event.customer_id:
        payload = payload_name(event, frozenset(_HANDLERS) | CATALOGUE_PAYLOADS)
        if payload in _HANDLERS:
            raise ValueError(f"{payload} at position {event.position} without customer_id")
        return None
    return apply_loyalty_event(loaded.docs.get(event.customer_id), event)


def _customers_touched(event: events_pb2.LoyaltyEvent) -> list[str]:
    """The member's customer, and for a merge or an undo listing the moved lots'
    figures, the other contact (whose totals they leave)."""
    if not event.customer_id:
        return []
    payload = event.WhichOneof("payload")
    other = ""
    if payload == "membership_merged":
        other = event.membership_merged.merged_contact_id
    elif payload == "membership_reopened":
        other = event.membership_reopened.survivor_id
    if other and other != event.customer_id:
        return [event.customer_id, other]
    return [event.customer_id]


#: How the store consumes the loyalty topic.
ADAPTER: SourceAdapter[events_pb2.LoyaltyEvent] = SourceAdapter(
    source=SOURCE,
    decode=decode,
    customer_of=lambda e: e.customer_id,
    customers_touched=_customers_touched,
    apply=_apply,
    extra_positions=(ERP_ORDERS,),
    mark_seen=mark_seen,
)
