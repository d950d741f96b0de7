"""Views and domain values as protobuf messages (gRPC replies and events)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from crm.loyalty.v1 import loyalty_pb2 as pb
from crm_common.commands import WriteOutcome
from crm_common.enums import enum_number
from crm_common.timestamps import datetime_of
from crm_loyalty.domain import Balance, Rules
from crm_loyalty.views import MemberSummaryView, MemberView, ParkedView, RewardView, TierView


def timestamp(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(at.astimezone(UTC))
    return stamp


def from_timestamp(stamp: Timestamp, field: str) -> datetime | None:
    """None for an unset timestamp; one no calendar holds is refused naming `field`."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return datetime_of(stamp, field)


def write_result(outcome: WriteOutcome) -> pb.WriteResult:
    return pb.WriteResult(
        id=outcome.id, version=outcome.version, position=outcome.position, replayed=outcome.replayed
    )


def balance_pb(balance: Balance) -> pb.Balance:
    return pb.Balance(
        active=balance.active,
        locked=balance.locked,
        expired=balance.expired,
        spent=balance.spent,
        cancelled=balance.cancelled,
    )


def member_pb(view: MemberView) -> pb.Member:
    return pb.Member(
        id=view.id,
        contact_id=view.contact_id,
        member_number=view.member_number,
        channel=enum_number(pb.EnrolmentChannel, view.channel),
        enrolled_at=timestamp(view.enrolled_at),
        tier=view.tier,
        balance=balance_pb(view.balance),
        lots=[
            pb.Lot(
                lot_id=lot.lot_id,
                earned=lot.earned,
                remaining=lot.remaining,
                spent=lot.spent,
                expired=lot.expired,
                cancelled=lot.cancelled,
                locked=lot.locked,
                earned_at=timestamp(lot.earned_at),
                expires_at=timestamp(lot.expires_at),
                locked_until=timestamp(lot.locked_until),
                order_id=lot.order_id,
                rule_version=lot.rule_version,
                reason=lot.reason,
            )
            for lot in view.lots
        ],
        version=view.version,
        birthday=view.birthday,
        referred_by=view.referred_by,
    )


def member_summary_pb(view: MemberSummaryView) -> pb.MemberSummary:
    return pb.MemberSummary(
        contact_id=view.contact_id,
        tier=view.tier,
        balance=balance_pb(view.balance),
        earned=view.earned,
        next_expiry_at=timestamp(view.next_expiry_at),
        next_expiry_points=view.next_expiry_points,
        last_activity_at=timestamp(view.last_activity_at),
        enrolled_at=timestamp(view.enrolled_at),
        version=view.version,
    )


def tier_pb(view: TierView) -> pb.GetTierResponse:
    return pb.GetTierResponse(
        contact_id=view.contact_id,
        tier=view.tier,
        qualifying_points=view.qualifying_points,
        next_tier=view.next_tier,
        points_to_next_tier=view.points_to_next_tier,
        basis=view.basis,
        currency=view.currency,
    )


def rules_pb(rules: Rules) -> pb.EarningRules:
    return pb.EarningRules(
        version=rules.version,
        rates=[pb.Rate(currency=k, points_per_unit=str(v)) for k, v in rules.rates.items()],
        tier_multipliers=[
            pb.Multiplier(key=k, factor=str(v)) for k, v in rules.tier_multipliers.items()
        ],
        category_multipliers=[
            pb.Multiplier(key=k, factor=str(v)) for k, v in rules.category_multipliers.items()
        ],
        campaigns=[
            pb.Campaign(
                name=c.name,
                factor=str(c.factor),
                starts_at=timestamp(c.starts_at),
                ends_at=timestamp(c.ends_at),
                categories=list(c.categories),
            )
            for c in rules.campaigns
        ],
        lot_lifetime_days=rules.lot_lifetime_days,
        return_window_days=rules.return_window_days,
        first_purchase_bonus=rules.first_purchase_bonus,
        birthday_bonus=rules.birthday_bonus,
        referrer_bonus=rules.referrer_bonus,
        referee_bonus=rules.referee_bonus,
    )


def reward_pb(view: RewardView) -> pb.Reward:
    return pb.Reward(
        code=view.code,
        name=view.name,
        points=view.points,
        stock=view.stock,
        reserved=view.reserved,
        valid_from=timestamp(view.valid_from),
        valid_until=timestamp(view.valid_until),
        retired=view.retired,
        version=view.version,
    )


def parked_pb(view: ParkedView) -> pb.ParkedOrder:
    return pb.ParkedOrder(
        key=view.key,
        customer_ref=view.customer_ref,
        kind=view.kind,
        reason=view.reason,
        state=view.state,
        parked_at=timestamp(view.parked_at),
        dead_lettered_at=timestamp(view.dead_lettered_at),
        source_partition=view.source.partition if view.source else -1,
        source_offset=view.source.position - 1 if view.source else -1,
        payload=base64.b64decode(view.payload),
    )
