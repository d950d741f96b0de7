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
