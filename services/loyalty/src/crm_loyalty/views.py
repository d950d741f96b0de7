"""What readers see: frozen views built from the aggregates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from crm_common.commands import WriteOutcome
from crm_loyalty.domain import Balance, Member, Rules, TierPolicy


@dataclass(frozen=True)
class LotView:
    lot_id: str
    earned: int
    remaining: int
    spent: int
    expired: int
    cancelled: int
    locked: bool
    earned_at: datetime
    expires_at: datetime
    locked_until: datetime | None
    order_id: str
    rule_version: int
    reason: str


@dataclass(frozen=True)
class MemberView:
    id: str
    contact_id: str
    member_number: str
    channel: str
    enrolled_at: datetime
    tier: str
    balance: Balance
    lots: tuple[LotView, ...]
    version: int


@dataclass(frozen=True)
class TierView:
    contact_id: str
    tier: str
    qualifying_points: int
    next_tier: str
    points_to_next_tier: int


@dataclass(frozen=True)
class ParkedView:
    key: str
    customer_ref: str
    kind: str
    payload: str
    reason: str


@dataclass(frozen=True)
class Written:
    outcome: WriteOutcome
    subject: MemberView | Rules


def member_view(member: Member, policy: TierPolicy) -> MemberView:
    return MemberView(
        id=str(member.id),
        contact_id=member.customer_id,
        member_number=member.member_number,
        channel=member.channel,
        enrolled_at=member.enrolled_at,
        tier=member.tier or policy.lowest,
        balance=member.balance,
        lots=tuple(
            LotView(
                lot_id=lot.lot_id,
                earned=lot.earned,
                remaining=lot.remaining,
                spent=lot.spent,
                expired=lot.expired,
                cancelled=lot.cancelled,
                locked=lot.locked,
                earned_at=lot.earned_at,
                expires_at=lot.expires_at,
                locked_until=lot.locked_until,
                order_id=lot.order_id,
                rule_version=lot.rule_version,
                reason=lot.reason,
            )
            for lot in member.lots.values()
        ),
        version=member.version,
    )


def tier_view(member: Member, policy: TierPolicy, at: datetime) -> TierView:
    points = member.qualifying_points(policy, at)
    tier = member.tier or policy.lowest
    following = policy.next_of(tier)
    return TierView(
        contact_id=member.customer_id,
        tier=tier,
        qualifying_points=points,
        next_tier=following.name if following else "",
        points_to_next_tier=max(0, following.threshold - points) if following else 0,
    )
