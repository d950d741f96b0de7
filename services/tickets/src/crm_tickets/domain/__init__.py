"""The tickets write model: cases and SLA policies.

One module per aggregate (`cases`, `policies`), the business-hours
arithmetic (`calendar`) and the vocabulary (`values`). No transport, storage
or protobuf here; input checks live in `crm_tickets.validation`. Every change
carries `at`, given by the application's clock, and every case event carries
`customer_id` (the contact the case is about: the published events are keyed
by it).
"""

from crm_tickets.domain.calendar import WEEKDAYS, BusinessCalendar
from crm_tickets.domain.cases import Case, Deadline
from crm_tickets.domain.policies import SlaPolicy, Targets, policy_terms
from crm_tickets.domain.values import (
    CHANNELS,
    DEFAULT_TIER,
    PRIORITIES,
    STATUSES,
    TARGET_KINDS,
    TIERS,
    TRANSITIONS,
    check_aware,
)

__all__ = [
    "CHANNELS",
    "DEFAULT_TIER",
    "PRIORITIES",
    "STATUSES",
    "TARGET_KINDS",
    "TIERS",
    "TRANSITIONS",
    "WEEKDAYS",
    "BusinessCalendar",
    "Case",
    "Deadline",
    "SlaPolicy",
    "Targets",
    "check_aware",
    "policy_terms",
]
