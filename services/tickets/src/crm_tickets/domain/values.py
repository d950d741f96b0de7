"""The tickets vocabulary: channels, priorities, statuses, SLA targets."""

from __future__ import annotations

from datetime import datetime

from crm_common.errors import ValidationFailed

CHANNELS = ("email", "phone", "chat", "web", "social")
PRIORITIES = ("low", "normal", "high", "urgent")
STATUSES = ("new", "open", "pending", "on_hold", "solved", "closed")
#: The SLA targets a policy sets per priority and tier: the first public agent
#: reply, the next agent reply after each customer reply (one clock instance per
#: such reply), and solving the case.
TARGET_KINDS = ("first_response", "next_reply", "resolution")
#: The customer tier a case uses when the loyalty service does not know the
#: customer as a member, does not answer in time, or refuses (the case records
#: why in its `tier_source`); also the targets a case falls back to when its
#: policy sets none for the customer's tier.
DEFAULT_TIER = "standard"
#: The tiers of the default terms. Policies may name any tier word (the loyalty
#: service's tiers are data too: basic, silver, gold, vip out of the box).
TIERS = ("standard", "basic", "silver", "gold", "platinum", "vip")

#: status -> the statuses a case may move to from it (reopening is `solved -> open`).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "new": ("open", "pending", "on_hold", "solved"),
    "open": ("pending", "on_hold", "solved"),
    "pending": ("open", "on_hold", "solved"),
    "on_hold": ("open", "pending", "solved"),
    "solved": ("open", "closed"),
    "closed": (),
}


def check_aware(field: str, at: datetime) -> None:
    if at.tzinfo is None:
        raise ValidationFailed.of(field, "must carry a time zone")
