"""The tickets vocabulary: channels, priorities, statuses, SLA targets."""

from __future__ import annotations

from datetime import datetime

from crm_common.errors import ValidationFailed

CHANNELS = ("email", "phone", "chat", "web", "social")
PRIORITIES = ("low", "normal", "high", "urgent")
STATUSES = ("new", "open", "pending", "on_hold", "solved", "closed")
#: The SLA targets a policy sets per priority and tier.
TARGET_KINDS = ("first_response", "resolution")
#: The customer tier a case uses while the loyalty service does not exist or does
#: not answer in time (the case records where its tier came from).
DEFAULT_TIER = "standard"
TIERS = ("standard", "silver", "gold", "platinum")

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
