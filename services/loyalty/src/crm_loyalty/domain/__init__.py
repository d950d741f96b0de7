"""The loyalty write model: members with their ledger by lot, earning rules, tiers.

`ledger` holds the pure rules of lots (allocation first-to-expire, expiry,
release, the balance as the sums over the lots); `members` the `Member`
aggregate that applies them through events; `rules` the versioned earning
rules; `tiers` the tier configuration. No transport, storage or protobuf here.
"""

from crm_loyalty.domain.ledger import Balance, InsufficientPoints, Lot, balance_of
from crm_loyalty.domain.members import (
    ADJUSTMENT,
    CHANNELS,
    Member,
    OrderNotKnown,
    expiry_of,
    member_id,
    member_number,
)
from crm_loyalty.domain.rules import DEFAULT_RULES, RULES_ID, Campaign, EarningRules, Rules
from crm_loyalty.domain.tiers import DEFAULT_TIERS, Tier, TierPolicy

__all__ = [
    "ADJUSTMENT",
    "CHANNELS",
    "DEFAULT_RULES",
    "DEFAULT_TIERS",
    "RULES_ID",
    "Balance",
    "Campaign",
    "EarningRules",
    "InsufficientPoints",
    "Lot",
    "Member",
    "OrderNotKnown",
    "Rules",
    "Tier",
    "TierPolicy",
    "balance_of",
    "expiry_of",
    "member_id",
    "member_number",
]
