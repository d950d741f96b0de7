"""Stored domain events as the public `crm.events.v1.LoyaltyEvent` messages.

The relay calls `to_wire` for every event of the notification log: one
message with the CloudEvents type `crm.loyalty.v1.<PayloadName>`, keyed by
the member's contact id (the earning rules by their aggregate id). Command
receipts and parked ERP messages are internal and not published. An event
this module does not know is an error, not a silent skip.

A contacts merge writes two events, one on each member, and so does its
undo; both are published, each keyed by its own member's contact:
`MembershipMerged` (the survivor took the merged membership: its lots with
their points and expiry dates, its orders, its tier when the merge enrolled
the survivor) and `MembershipClosedByMerge` (the merged member, closed:
which lots and orders left), then `MembershipMergeUndone` (the survivor gave
them back: which) and `MembershipReopened` (the merged member, open again:
the lots with their points as they are now). A birthday or a referrer the
survivor took over from the merged member stays in the service.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from crm.events.v1 import loyalty_pb2 as events_pb
from crm_common.commands import CommandReceipt
from crm_loyalty.application import ERP_PARTITION, ERP_POSITION
from crm_loyalty.domain import EarningRules, Member
from crm_loyalty.domain.parking import ParkedOrders
from crm_loyalty.domain.rewards import Reward
from crm_loyalty.messages import timestamp

CE_TYPE_PREFIX = "crm.loyalty.v1."
PROTO_MESSAGE = events_pb.LoyaltyEvent.DESCRIPTOR.full_name

#: Not published: receipts, parked ERP messages, and the mark that a referral
#: was rewarded (its bonuses are published as PointsEarned, `bonus` referee/referrer).
INTERNAL_EVENTS: tuple[type[Any], ...] = (
    CommandReceipt.Event,
    ParkedOrders.Event,
    Member.ReferralSettled,
)


class UnpublishableEvent(TypeError):
    """A stored event that has no public form in `crm.events.v1.LoyaltyEvent`."""


Data = Mapping[str, Any]
Fill = Callable[[events_pb.LoyaltyEvent, Data], None]


def _lots(d: Data) -> list[events_pb.LotPoints]:
    return [events_pb.LotPoints(lot_id=k, points=v) for k, v in d["lots"].items()]


def _earned(m: events_pb.LoyaltyEvent, d: Data) -> None:
    m.points_earned.CopyFrom(
        events_pb.PointsEarned(
            lot_id=d["lot_id"],
            points=d["points"],
            expires_at=timestamp(d["expires_at"]),
            locked_until=timestamp(d["locked_until"]),
            order_id=d["order_id"],
            rule_version=d["rule_version"],
            reason=d["reason"],
            bonus=d.get("bonus", ""),
        )
    )


def _moment(value: Any) -> datetime | None:
    """A time as a moved lot's state holds it (ISO text, or a datetime)."""
    if value is None or value == "":
        return None
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _moved_lots(states: list[Mapping[str, Any]]) -> list[events_pb.MovedLot]:
    """Lots as a merge or its undo carried them (`members.lot_state`)."""
    return [
        events_pb.MovedLot(
            lot_id=state["lot_id"],
            earned=state["earned"],
            remaining=state["remaining"],
            spent=state["spent"],
            expired=state["expired"],
            cancelled=state["cancelled"],
            earned_at=timestamp(_moment(state.get("earned_at"))),
            expires_at=timestamp(_moment(state.get("expires_at"))),
            locked_until=timestamp(_moment(state.get("locked_until"))),
            order_id=state.get("order_id", ""),
            reason=state.get("reason", ""),
        )
        for state in states
    ]


def _merged_in(m: events_pb.LoyaltyEvent, d: Data) -> None:
    m.membership_merged.CopyFrom(
        events_pb.MembershipMerged(
            merge_id=d["reference"],
            merged_contact_id=d["merged"],
            lots=_moved_lots(d["lots"]),
            order_ids=list(d["orders"]),
            tier=d["tier"],
            merged_enrolled_at=timestamp(d["enrolled_at"]),
        )
    )


def _merged_away(m: events_pb.LoyaltyEvent, d: Data) -> None:
    m.membership_closed_by_merge.CopyFrom(
        events_pb.MembershipClosedByMerge(
            merge_id=d["reference"],
            survivor_id=d["into"],
            lot_ids=list(d["lots"]),
            order_ids=list(d["orders"]),
        )
    )


def _merge_reversed(m: events_pb.LoyaltyEvent, d: Data) -> None:
    m.membership_merge_undone.CopyFrom(
        events_pb.MembershipMergeUndone(
            merge_id=d["reference"],
            merged_contact_id=d["merged"],
            lot_ids=list(d["lots"]),
            order_ids=list(d["orders"]),
        )
    )


def _merge_restored(m: events_pb.LoyaltyEvent, d: Data) -> None:
    m.membership_reopened.CopyFrom(
        events_pb.MembershipReopened(
            merge_id=d["reference"],
            survivor_id=d["survivor"],
            lots=_moved_lots(d["lots"]),
            order_ids=list(d["orders"]),
        )
    )


def _rules(m: events_pb.LoyaltyEvent, d: Data, version: int) -> None:
    m.earning_rules_published.CopyFrom(
        events_pb.EarningRulesPublished(
            rules_version=version, rules_json=json.dumps(d["rules"], sort_keys=True)
        )
    )


PAYLOADS: dict[type[Any], tuple[str, Fill]] = {
    Member.Created: (
        "MemberEnrolled",
        lambda m, d: m.member_enrolled.CopyFrom(
            events_pb.MemberEnrolled(
                member_number=d["member_number"],
                channel=d["channel"],
                referred_by=d.get("referred_by", ""),
            )
        ),
    ),
    Member.Earned: ("PointsEarned", _earned),
    Member.Spent: (
        "PointsSpent",
        lambda m, d: m.points_spent.CopyFrom(
            events_pb.PointsSpent(points=d["points"], lots=_lots(d), reference=d["reference"])
        ),
    ),
    Member.Adjusted: (
        "PointsAdjusted",
        lambda m, d: m.points_adjusted.CopyFrom(
            events_pb.PointsAdjusted(
                points=d["points"],
                lots=_lots(d) or [events_pb.LotPoints(lot_id=d["lot_id"], points=d["points"])],
                reason=d["reason"],
                adjusted_by=d["adjusted_by"],
            )
        ),
    ),
    Member.Released: (
        "PointsReleased",
        lambda m, d: m.points_released.CopyFrom(events_pb.PointsReleased(lots=_lots(d))),
    ),
    Member.Cancelled: (
        "PointsCancelled",
        lambda m, d: m.points_cancelled.CopyFrom(
            events_pb.PointsCancelled(
                lots=_lots(d),
                order_id=d["order_id"],
                return_id=d["return_id"],
                line_ids=d["line_ids"],
                unrecovered=d.get("unrecovered", 0),
            )
        ),
    ),
    Member.Expired: (
        "PointsExpired",
        lambda m, d: m.points_expired.CopyFrom(events_pb.PointsExpired(lots=_lots(d))),
    ),
    Member.TierChanged: (
        "TierChanged",
        lambda m, d: m.tier_changed.CopyFrom(
            events_pb.TierChanged(
                from_tier=d["from_tier"],
                to_tier=d["to_tier"],
                qualifying_points=d["qualifying_points"],
            )
        ),
    ),
    Member.DowngradeScheduled: (
        "TierDowngradeScheduled",
        lambda m, d: m.tier_downgrade_scheduled.CopyFrom(
            events_pb.TierDowngradeScheduled(to_tier=d["to_tier"], due_at=timestamp(d["due_at"]))
        ),
    ),
}


PAYLOADS.update(
    {
        Member.MergedIn: ("MembershipMerged", _merged_in),
        Member.MergedAway: ("MembershipClosedByMerge", _merged_away),
        Member.MergeReversed: ("MembershipMergeUndone", _merge_reversed),
        Member.MergeRestored: ("MembershipReopened", _merge_restored),
    }
)


PAYLOADS.update(
    {
        Reward.Defined: (
            "RewardDefined",
            lambda m, d: m.reward_defined.CopyFrom(
                events_pb.RewardDefined(
                    code=d["code"],
                    name=d["name"],
                    points=d["points"],
                    stock=d["stock"],
                    valid_from=timestamp(d["valid_from"]),
                    valid_until=timestamp(d["valid_until"]),
                )
            ),
        ),
        Reward.Restocked: (
            "RewardRestocked",
            lambda m, d: m.reward_restocked.CopyFrom(
                events_pb.RewardRestocked(code=d["code"], quantity=d["quantity"])
            ),
        ),
        Reward.Retired: (
            "RewardRetired",
            lambda m, d: m.reward_retired.CopyFrom(events_pb.RewardRetired(code=d["code"])),
        ),
        Reward.Reserved: (
            "RewardReserved",
            lambda m, d: m.reward_reserved.CopyFrom(
                events_pb.RewardReserved(
                    code=d["code"],
                    contact_id=d["contact_id"],
                    redemption_id=d["redemption_id"],
                    points=d["points"],
                )
            ),
        ),
    }
)


def payload_name(event: Any) -> str:
    if isinstance(event, EarningRules.Created | EarningRules.Published):
        return "EarningRulesPublished"
    known = PAYLOADS.get(type(event))
    if known is None:
        raise UnpublishableEvent(
            f"{type(event).__module__}.{type(event).__qualname__} has no LoyaltyEvent payload"
        )
    return known[0]


def loyalty_event(event: Any, meta: Mapping[str, Any], position: int) -> events_pb.LoyaltyEvent:
    """The public message of one stored loyalty event."""
    name = payload_name(event)
    message = events_pb.LoyaltyEvent(
        customer_id=event.customer_id,
        aggregate_id=str(event.originator_id),
        version=event.originator_version,
        position=position,
        occurred_at=timestamp(event.timestamp),
        actor=str(meta.get("actor") or ""),
        client=str(meta.get("client") or ""),
        erp_partition=int(getattr(event, ERP_PARTITION, 0) or 0),
        erp_position=int(getattr(event, ERP_POSITION, 0) or 0),
    )
    if name == "EarningRulesPublished":
        _rules(message, event.__dict__, event.originator_version)
    else:
        PAYLOADS[type(event)][1](message, event.__dict__)
    assert message.WhichOneof("payload") is not None, name
    return message


def to_wire(event: Any, meta: dict[str, Any], position: int) -> tuple[str, str, bytes] | None:
    """(key, CloudEvents type, payload) for the relay; None for internal events."""
    if isinstance(event, INTERNAL_EVENTS):
        return None
    message = loyalty_event(event, meta, position)
    key = message.customer_id or message.aggregate_id
    return key, CE_TYPE_PREFIX + payload_name(event), message.SerializeToString()
