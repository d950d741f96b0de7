"""What readers see: frozen views built from the aggregates."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from crm_common.commands import WriteOutcome
from crm_loyalty.domain import Balance, Member, Rules, TierPolicy
from crm_loyalty.domain.rewards import Reward
from crm_loyalty.inputs import ErpSource


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
    birthday: str = ""
    referred_by: str = ""
    #: The contact this member's contact was merged into ("" for an open membership):
    #: its lots are there, and commands naming this contact answer for that member.
    merged_into: str = ""


@dataclass(frozen=True)
class TierView:
    contact_id: str
    tier: str
    qualifying_points: int
    next_tier: str
    points_to_next_tier: int
    basis: str = "points"
    currency: str = ""


@dataclass(frozen=True)
class ParkedView:
    key: str
    customer_ref: str
    kind: str
    payload: str
    reason: str
    #: The inbound record it was read from (None: not known).
    source: ErpSource | None = None
    #: parked (retried) or dead_lettered (published to the dead-letter topic).
    state: str = "parked"
    parked_at: datetime | None = None
    dead_lettered_at: datetime | None = None
    #: The Kafka headers the record came with (CloudEvents attributes).
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class RewardView:
    code: str
    name: str
    points: int
    #: Units left to redeem.
    stock: int
    #: Units redeemed so far.
    reserved: int
    valid_from: datetime | None
    valid_until: datetime | None
    retired: bool
    version: int


@dataclass(frozen=True)
class MemberSummaryView:
    """A member as a listing shows it (a row of the members table)."""

    contact_id: str
    tier: str
    #: `active` is the available balance.
    balance: Balance
    #: Every point ever earned.
    earned: int
    #: The soonest expiry of the member's unlocked points and how many expire
    #: then; None and 0 when it holds none.
    next_expiry_at: datetime | None
    next_expiry_points: int
    last_activity_at: datetime
    enrolled_at: datetime
    version: int


@dataclass(frozen=True)
class MemberPage:
    members: list[MemberSummaryView]
    #: "" after the last page.
    next_page_token: str


@dataclass(frozen=True)
class Written:
    outcome: WriteOutcome
    subject: MemberView | Rules | RewardView
    #: A redemption's reward, besides its member (the subject).
    reward: RewardView | None = None


def reward_view(reward: Reward) -> RewardView:
    return RewardView(
        code=reward.code,
        name=reward.name,
        points=reward.points,
        stock=reward.stock,
        reserved=reward.reserved,
        valid_from=reward.valid_from,
        valid_until=reward.valid_until,
        retired=reward.retired,
        version=reward.version,
    )


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
            # A lot a merge moved to another member is shown there, not here.
            if not lot.held_by
        ),
        version=member.version,
        birthday=member.birthday,
        referred_by=member.referred_by,
        merged_into=member.merged_into,
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
        basis=policy.basis,
        currency=policy.currency,
    )
