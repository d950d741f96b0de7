"""People and companies as event-sourced aggregates.

Nothing here knows about gRPC, HTTP or storage. Commands arrive as values
that `crm_contacts.validation` has already checked and normalised; the
aggregates apply the business rules and record what happened. Every profile
event carries the whole profile after the change (consumers replace instead
of patching), and a change that changes nothing records nothing.

One module per aggregate (`persons`, `companies`, and `contacts` for what
both share), beside the values they hold: `lifecycle`, `channels` (identities
and consent), `custom_fields` and `interactions`.

Events stored before the split name their classes under this package
(`crm_contacts.domain:Person.PersonRegistered`): the names re-exported here
keep those topics resolving.
"""

from crm_contacts.domain.channels import (
    PHONE_CHANNELS,
    Channel,
    ChannelIdentity,
    Consent,
    ConsentStatus,
    merge_channels,
)
from crm_contacts.domain.companies import Company, CompanyProfile
from crm_contacts.domain.contacts import Contact, ContactKind
from crm_contacts.domain.custom_fields import CustomField, FieldType
from crm_contacts.domain.interactions import Direction, Interaction, InteractionKind
from crm_contacts.domain.lifecycle import (
    CAN_BE_LOST,
    CAN_CHURN,
    CUSTOMER_ALREADY,
    FUNNEL,
    LifecycleStage,
    check_stage_change,
)
from crm_contacts.domain.persons import Affiliation, Person, PersonProfile, with_consent

__all__ = [
    "CAN_BE_LOST",
    "CAN_CHURN",
    "CUSTOMER_ALREADY",
    "FUNNEL",
    "PHONE_CHANNELS",
    "Affiliation",
    "Channel",
    "ChannelIdentity",
    "Company",
    "CompanyProfile",
    "Consent",
    "ConsentStatus",
    "Contact",
    "ContactKind",
    "CustomField",
    "Direction",
    "FieldType",
    "Interaction",
    "InteractionKind",
    "LifecycleStage",
    "Person",
    "PersonProfile",
    "check_stage_change",
    "merge_channels",
    "with_consent",
]
