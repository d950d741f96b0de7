"""Builders of loyalty events, as the loyalty service publishes them."""

from __future__ import annotations

from datetime import datetime, timedelta

from contact_events import T0, ts

from crm.events.v1 import loyalty_pb2 as events_pb2


def when(position: int) -> datetime:
    """The time of the loyalty event at `position` (off the other sources' times)."""
    return T0 + timedelta(minutes=position, seconds=45)


def member_of(customer_id: str) -> str:
    return f"m-{customer_id}"


def envelope(
    customer_id: str, position: int, version: int, erp_position: int = 0
) -> events_pb2.LoyaltyEvent:
    return events_pb2.LoyaltyEvent(
        customer_id=customer_id,
        aggregate_id=member_of(customer_id),
        version=version,
        position=position,
        occurred_at=ts(when(position)),
        actor="ada",
        client="shop",
        erp_partition=1 if erp_position else 0,
        erp_position=erp_position,
    )


def lots(**points: int) -> list[events_pb2.LotPoints]:
    return [events_pb2.LotPoints(lot_id=k, points=v) for k, v in points.items()]


def enrolled(customer_id: str, position: int) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, 1)
    event.member_enrolled.CopyFrom(events_pb2.MemberEnrolled(member_number="M-0001", channel="web"))
    return event


def earned(
    customer_id: str,
    position: int,
    version: int,
    lot_id: str,
    points: int,
    expires: datetime,
    locked_until: datetime | None = None,
    order_id: str = "",
    erp_position: int = 0,
) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version, erp_position)
    message = events_pb2.PointsEarned(
        lot_id=lot_id,
        points=points,
        expires_at=ts(expires),
        order_id=order_id,
        rule_version=1,
        reason="order" if order_id else "bonus",
    )
    if locked_until is not None:
        message.locked_until.CopyFrom(ts(locked_until))
    event.points_earned.CopyFrom(message)
    return event


def spent(customer_id: str, position: int, version: int, **taken: int) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version)
    event.points_spent.CopyFrom(
        events_pb2.PointsSpent(points=sum(taken.values()), lots=lots(**taken), reference="r-1")
    )
    return event


def released(customer_id: str, position: int, version: int, **lot: int) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version)
    event.points_released.lots.extend(lots(**lot))
    return event


def cancelled(
    customer_id: str, position: int, version: int, order_id: str, erp_position: int = 0, **lot: int
) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version, erp_position)
    event.points_cancelled.CopyFrom(
        events_pb2.PointsCancelled(lots=lots(**lot), order_id=order_id, return_id="ret-1")
    )
    return event


def expired(customer_id: str, position: int, version: int, **lot: int) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version)
    event.points_expired.lots.extend(lots(**lot))
    return event


def adjusted(
    customer_id: str, position: int, version: int, points: int, **lot: int
) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version)
    event.points_adjusted.CopyFrom(
        events_pb2.PointsAdjusted(
            points=points, lots=lots(**lot), reason="goodwill", adjusted_by="carol"
        )
    )
    return event


def tier_changed(
    customer_id: str, position: int, version: int, to_tier: str, points: int, from_tier: str = ""
) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version)
    event.tier_changed.CopyFrom(
        events_pb2.TierChanged(from_tier=from_tier, to_tier=to_tier, qualifying_points=points)
    )
    return event


def downgrade_scheduled(
    customer_id: str, position: int, version: int, to_tier: str, due: datetime | None
) -> events_pb2.LoyaltyEvent:
    event = envelope(customer_id, position, version)
    event.tier_downgrade_scheduled.to_tier = to_tier
    if due is not None:
        event.tier_downgrade_scheduled.due_at.CopyFrom(ts(due))
    return event


def rules_published(position: int) -> events_pb2.LoyaltyEvent:
    event = events_pb2.LoyaltyEvent(
        aggregate_id="rules", version=1, position=position, occurred_at=ts(when(position))
    )
    event.earning_rules_published.CopyFrom(
        events_pb2.EarningRulesPublished(rules_version=1, rules_json="{}")
    )
    return event


def moved_lot(
    lot_id: str,
    remaining: int,
    expires: datetime,
    *,
    spent: int = 0,
    expired: int = 0,
    cancelled: int = 0,
    locked_until: datetime | None = None,
    order_id: str = "",
) -> events_pb2.MovedLot:
    """A lot as a merge or its undo carries it (earned = the sum of its states)."""
    lot = events_pb2.MovedLot(
        lot_id=lot_id,
        earned=remaining + spent + expired + cancelled,
        remaining=remaining,
        spent=spent,
        expired=expired,
        cancelled=cancelled,
        earned_at=ts(T0),
        expires_at=ts(expires),
        order_id=order_id,
        reason="order" if order_id else "bonus",
    )
    if locked_until is not None:
        lot.locked_until.CopyFrom(ts(locked_until))
    return lot


def membership_merged(
    survivor: str,
    position: int,
    version: int,
    merged: str,
    moved: list[events_pb2.MovedLot],
    *,
    tier: str = "",
    merged_enrolled_at: datetime | None = None,
    merge_id: str = "mg-1",
) -> events_pb2.LoyaltyEvent:
    event = envelope(survivor, position, version)
    message = events_pb2.MembershipMerged(
        merge_id=merge_id,
        merged_contact_id=merged,
        lots=moved,
        order_ids=[lot.order_id for lot in moved if lot.order_id],
        tier=tier,
    )
    if merged_enrolled_at is not None:
        message.merged_enrolled_at.CopyFrom(ts(merged_enrolled_at))
    event.membership_merged.CopyFrom(message)
    return event


def closed_by_merge(
    merged: str,
    position: int,
    version: int,
    survivor: str,
    lot_ids: list[str],
    merge_id: str = "mg-1",
) -> events_pb2.LoyaltyEvent:
    event = envelope(merged, position, version)
    event.membership_closed_by_merge.CopyFrom(
        events_pb2.MembershipClosedByMerge(merge_id=merge_id, survivor_id=survivor, lot_ids=lot_ids)
    )
    return event


def merge_undone(
    survivor: str,
    position: int,
    version: int,
    merged: str,
    lot_ids: list[str],
    merge_id: str = "mg-1",
) -> events_pb2.LoyaltyEvent:
    event = envelope(survivor, position, version)
    event.membership_merge_undone.CopyFrom(
        events_pb2.MembershipMergeUndone(
            merge_id=merge_id, merged_contact_id=merged, lot_ids=lot_ids
        )
    )
    return event


def reopened(
    merged: str,
    position: int,
    version: int,
    survivor: str,
    moved: list[events_pb2.MovedLot],
    merge_id: str = "mg-1",
) -> events_pb2.LoyaltyEvent:
    event = envelope(merged, position, version)
    event.membership_reopened.CopyFrom(
        events_pb2.MembershipReopened(
            merge_id=merge_id,
            survivor_id=survivor,
            lots=moved,
            order_ids=[lot.order_id for lot in moved if lot.order_id],
        )
    )
    return event
