"""People and companies as event-sourced aggregates.

Nothing here knows about gRPC, HTTP or storage. Commands arrive as values
that `crm_contacts.validation` has already checked and normalised; the
aggregates apply the business rules and record what happened. Every profile
event carries the whole profile after the change (consumers replace instead
of patching), and a change that changes nothing records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from eventsourcing.domain import Aggregate, event

from crm_common.errors import RuleViolated, ValidationFailed


class ContactKind(StrEnum):
    PERSON = "person"
    COMPANY = "company"


class LifecycleStage(StrEnum):
    SUBSCRIBER = "subscriber"
    LEAD = "lead"
    OPPORTUNITY = "opportunity"
    CUSTOMER = "customer"
    ADVOCATE = "advocate"
    CHURNED = "churned"
    LOST = "lost"


# The funnel a contact moves forward through; churned and lost are exits.
FUNNEL: tuple[LifecycleStage, ...] = (
    LifecycleStage.SUBSCRIBER,
    LifecycleStage.LEAD,
    LifecycleStage.OPPORTUNITY,
    LifecycleStage.CUSTOMER,
    LifecycleStage.ADVOCATE,
)
# Only someone who was a customer can churn; who never became one is lost.
CAN_CHURN = frozenset({LifecycleStage.CUSTOMER, LifecycleStage.ADVOCATE})
CAN_BE_LOST = frozenset(
    {LifecycleStage.SUBSCRIBER, LifecycleStage.LEAD, LifecycleStage.OPPORTUNITY}
)
# Who a won deal leaves as they are: already a customer, or further along.
CUSTOMER_ALREADY = frozenset({LifecycleStage.CUSTOMER, LifecycleStage.ADVOCATE})


def check_stage_change(current: LifecycleStage, wanted: LifecycleStage) -> None:
    """Refuses a lifecycle move the funnel does not allow.

    Within the funnel a contact only moves forward (stages may be skipped).
    A customer or advocate can churn, a subscriber, lead or opportunity can be
    lost, and a churned or lost contact can come back at any funnel stage.
    A stage set by mistake is undone through churned or lost, so that the
    funnel reports never count a contact going backwards.
    """
    if wanted == current:
        return
    if wanted is LifecycleStage.CHURNED:
        allowed = current in CAN_CHURN
    elif wanted is LifecycleStage.LOST:
        allowed = current in CAN_BE_LOST
    elif current in (LifecycleStage.CHURNED, LifecycleStage.LOST):
        allowed = True
    else:
        allowed = FUNNEL.index(wanted) > FUNNEL.index(current)
    if not allowed:
        raise RuleViolated(f"lifecycle_stage cannot change from {current} to {wanted}")


class Channel(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    SMS = "sms"
    WHATSAPP = "whatsapp"
    WECHAT = "wechat"
    LINE = "line"
    MESSENGER = "messenger"


# Channels whose address is a phone number (kept in E.164).
PHONE_CHANNELS = frozenset({Channel.PHONE, Channel.SMS, Channel.WHATSAPP})


class ConsentStatus(StrEnum):
    GRANTED = "granted"
    WITHDRAWN = "withdrawn"


class InteractionKind(StrEnum):
    CALL = "call"
    MAIL = "mail"
    CHAT = "chat"
    MEETING = "meeting"
    VISIT = "visit"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class FieldType(StrEnum):
    TEXT = "text"
    NUMBER = "number"
    DATE = "date"
    MONEY = "money"
    CHOICE = "choice"


# -- values ---------------------------------------------------------------------------
#
# Events store plain JSON-able dicts (strings, booleans, lists, datetimes);
# the aggregates keep these immutable values built from them.


@dataclass(frozen=True)
class CustomField:
    """A typed custom field value in canonical text (see `validation`)."""

    type: FieldType
    value: str
    currency: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"type": str(self.type), "value": self.value, "currency": self.currency}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CustomField:
        return cls(FieldType(data["type"]), data["value"], data.get("currency", ""))


@dataclass(frozen=True)
class Consent:
    status: ConsentStatus
    source: str
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "source": self.source,
            "recorded_at": self.recorded_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Consent:
        return cls(ConsentStatus(data["status"]), data["source"], data["recorded_at"])


@dataclass(frozen=True)
class ChannelIdentity:
    channel: Channel
    # Email in lower case, phone numbers in E.164, other handles as given.
    address: str
    preferred: bool = False
    consent: Consent | None = None

    @property
    def key(self) -> tuple[Channel, str]:
        return self.channel, self.address

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": str(self.channel),
            "address": self.address,
            "preferred": self.preferred,
            "consent": None if self.consent is None else self.consent.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelIdentity:
        consent = data.get("consent")
        return cls(
            Channel(data["channel"]),
            data["address"],
            bool(data.get("preferred", False)),
            None if consent is None else Consent.from_dict(consent),
        )


@dataclass(frozen=True)
class Affiliation:
    company_id: str
    company_name: str
    role: str


@dataclass(frozen=True)
class Interaction:
    interaction_id: str
    kind: InteractionKind
    direction: Direction | None
    channel: Channel | None
    summary: str
    occurred_at: datetime
    owner: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "interaction_id": self.interaction_id,
            "kind": str(self.kind),
            "direction": None if self.direction is None else str(self.direction),
            "channel": None if self.channel is None else str(self.channel),
            "summary": self.summary,
            "occurred_at": self.occurred_at,
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interaction:
        direction = data.get("direction")
        channel = data.get("channel")
        return cls(
            data["interaction_id"],
            InteractionKind(data["kind"]),
            None if direction is None else Direction(direction),
            None if channel is None else Channel(channel),
            data["summary"],
            data["occurred_at"],
            data.get("owner", ""),
        )


def _fields_to_dict(fields: Mapping[str, CustomField]) -> dict[str, dict[str, str]]:
    return {name: value.to_dict() for name, value in sorted(fields.items())}


def _fields_from_dict(data: Mapping[str, Any]) -> dict[str, CustomField]:
    return {name: CustomField.from_dict(value) for name, value in data.items()}


@dataclass(frozen=True)
class PersonProfile:
    """Everything a person's profile events carry."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "given_name",
        "family_name",
        "lifecycle_stage",
        "tags",
        "custom_fields",
        "channels",
        "owner",
    )

    given_name: str
    family_name: str
    lifecycle_stage: LifecycleStage
    tags: tuple[str, ...] = ()
    custom_fields: Mapping[str, CustomField] = field(default_factory=dict)
    channels: tuple[ChannelIdentity, ...] = ()
    owner: str = ""

    @property
    def display_name(self) -> str:
        return " ".join(p for p in (self.given_name, self.family_name) if p)

    def changed_fields(self, other: PersonProfile) -> list[str]:
        return [f for f in self.FIELDS if getattr(self, f) != getattr(other, f)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "given_name": self.given_name,
            "family_name": self.family_name,
            "lifecycle_stage": str(self.lifecycle_stage),
            "tags": list(self.tags),
            "custom_fields": _fields_to_dict(self.custom_fields),
            "channels": [c.to_dict() for c in self.channels],
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PersonProfile:
        return cls(
            given_name=data["given_name"],
            family_name=data["family_name"],
            lifecycle_stage=LifecycleStage(data["lifecycle_stage"]),
            tags=tuple(data["tags"]),
            custom_fields=_fields_from_dict(data["custom_fields"]),
            channels=tuple(ChannelIdentity.from_dict(c) for c in data["channels"]),
            owner=data["owner"],
        )


@dataclass(frozen=True)
class CompanyProfile:
    """Everything a company's profile events carry."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "name",
        "domain",
        "industry",
        "lifecycle_stage",
        "tags",
        "custom_fields",
        "owner",
    )

    name: str
    lifecycle_stage: LifecycleStage
    domain: str = ""
    industry: str = ""
    tags: tuple[str, ...] = ()
    custom_fields: Mapping[str, CustomField] = field(default_factory=dict)
    owner: str = ""

    @property
    def display_name(self) -> str:
        return self.name

    def changed_fields(self, other: CompanyProfile) -> list[str]:
        return [f for f in self.FIELDS if getattr(self, f) != getattr(other, f)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "domain": self.domain,
            "industry": self.industry,
            "lifecycle_stage": str(self.lifecycle_stage),
            "tags": list(self.tags),
            "custom_fields": _fields_to_dict(self.custom_fields),
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompanyProfile:
        return cls(
            name=data["name"],
            domain=data["domain"],
            industry=data["industry"],
            lifecycle_stage=LifecycleStage(data["lifecycle_stage"]),
            tags=tuple(data["tags"]),
            custom_fields=_fields_from_dict(data["custom_fields"]),
            owner=data["owner"],
        )


# -- aggregates -------------------------------------------------------------------------


class Contact(Aggregate):
    """What persons and companies share: an interaction log."""

    KIND: ClassVar[ContactKind]
    if TYPE_CHECKING:  # set by each kind's registration (not an event field)
        interactions: list[Interaction]

    @property
    def display_name(self) -> str:
        raise NotImplementedError

    def log_interaction(self, interaction: Interaction) -> None:
        self._interaction_logged(interaction=interaction.to_dict())

    @event("InteractionLogged")
    def _interaction_logged(self, interaction: dict[str, Any]) -> None:
        self.interactions.append(Interaction.from_dict(interaction))

    def record_consent(
        self, channel: Channel, address: str, status: ConsentStatus, source: str, at: datetime
    ) -> None:
        raise ValidationFailed.of("address", f"a {self.KIND} has no {channel} identities")

    def become_customer(self) -> bool:
        """A deal of this contact was won: it is a customer from now on.

        A customer or advocate stays as it is (nothing is recorded), so a won
        deal never moves a contact back in the funnel; any other stage,
        churned and lost included, moves forward to customer. Returns whether
        the stage changed.
        """
        profile: PersonProfile | CompanyProfile = self.profile  # type: ignore[attr-defined]
        if profile.lifecycle_stage in CUSTOMER_ALREADY:
            return False
        changed: list[str] = self.change_profile(  # type: ignore[attr-defined]
            replace(profile, lifecycle_stage=LifecycleStage.CUSTOMER)
        )
        return bool(changed)

    def recent_interactions(self, limit: int) -> list[Interaction]:
        """Newest first by occurrence; equal times in the order they were logged."""
        ordered = sorted(
            enumerate(self.interactions), key=lambda p: (p[1].occurred_at, p[0]), reverse=True
        )
        return [i for _, i in ordered[:limit]]


class Person(Contact):
    KIND = ContactKind.PERSON

    @event("PersonRegistered")
    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = PersonProfile.from_dict(profile)
        self.affiliations: dict[str, Affiliation] = {}
        self.interactions = []

    @property
    def display_name(self) -> str:
        return self.profile.display_name

    @classmethod
    def register(cls, profile: PersonProfile) -> Person:
        return cls(profile=profile.to_dict())

    def change_profile(self, profile: PersonProfile) -> list[str]:
        """Records the new profile if anything changed; returns what changed."""
        check_stage_change(self.profile.lifecycle_stage, profile.lifecycle_stage)
        changed = self.profile.changed_fields(profile)
        if changed:
            self._profile_updated(profile=profile.to_dict(), changed_fields=changed)
        return changed

    @event("PersonProfileUpdated")
    def _profile_updated(self, profile: dict[str, Any], changed_fields: list[str]) -> None:
        self.profile = PersonProfile.from_dict(profile)

    def link_to_company(self, company: Company, role: str) -> None:
        current = self.affiliations.get(str(company.id))
        if current is not None and current.role == role:
            return  # already so: linking again is a no-op
        self._linked(company_id=str(company.id), company_name=company.profile.name, role=role)

    @event("PersonLinkedToCompany")
    def _linked(self, company_id: str, company_name: str, role: str) -> None:
        self.affiliations[company_id] = Affiliation(company_id, company_name, role)

    def unlink_from_company(self, company_id: str) -> None:
        if company_id not in self.affiliations:
            raise RuleViolated(f"person {self.id} is not linked to company {company_id}")
        self._unlinked(company_id=company_id)

    @event("PersonUnlinkedFromCompany")
    def _unlinked(self, company_id: str) -> None:
        del self.affiliations[company_id]

    def record_consent(
        self, channel: Channel, address: str, status: ConsentStatus, source: str, at: datetime
    ) -> None:
        identity = next((c for c in self.profile.channels if c.key == (channel, address)), None)
        if identity is None:
            raise ValidationFailed.of("address", f"the person has no {channel} identity {address}")
        current = identity.consent
        if current is not None and (current.status, current.source) == (status, source):
            return  # nothing new to record
        self._consent_recorded(
            channel=str(channel), address=address, status=str(status), source=source, at=at
        )

    @event("ConsentRecorded")
    def _consent_recorded(
        self, channel: str, address: str, status: str, source: str, at: datetime
    ) -> None:
        consent = Consent(ConsentStatus(status), source, at)
        self.profile = with_consent(self.profile, Channel(channel), address, consent)


class Company(Contact):
    KIND = ContactKind.COMPANY

    @event("CompanyRegistered")
    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = CompanyProfile.from_dict(profile)
        self.interactions = []

    @property
    def display_name(self) -> str:
        return self.profile.name

    @classmethod
    def register(cls, profile: CompanyProfile) -> Company:
        return cls(profile=profile.to_dict())

    def change_profile(self, profile: CompanyProfile) -> list[str]:
        """Records the new profile if anything changed; returns what changed."""
        check_stage_change(self.profile.lifecycle_stage, profile.lifecycle_stage)
        changed = self.profile.changed_fields(profile)
        if changed:
            self._profile_updated(profile=profile.to_dict(), changed_fields=changed)
        return changed

    @event("CompanyProfileUpdated")
    def _profile_updated(self, profile: dict[str, Any], changed_fields: list[str]) -> None:
        self.profile = CompanyProfile.from_dict(profile)


def with_consent(
    profile: PersonProfile, channel: Channel, address: str, consent: Consent
) -> PersonProfile:
    """The profile with a new consent on one of its channel identities."""
    channels = tuple(
        replace(c, consent=consent) if c.key == (channel, address) else c for c in profile.channels
    )
    return replace(profile, channels=channels)


def merge_channels(
    current: tuple[ChannelIdentity, ...], wanted: tuple[ChannelIdentity, ...]
) -> tuple[ChannelIdentity, ...]:
    """The channel list after a replace: known identities keep their consent
    unless the request brings a new one."""
    known = {c.key: c for c in current}
    merged = []
    for identity in wanted:
        before = known.get(identity.key)
        if identity.consent is None and before is not None and before.consent is not None:
            identity = replace(identity, consent=before.consent)
        elif (
            identity.consent is not None
            and before is not None
            and before.consent is not None
            and (before.consent.status, before.consent.source)
            == (identity.consent.status, identity.consent.source)
        ):
            identity = replace(identity, consent=before.consent)  # unchanged: keep its time
        merged.append(identity)
    return tuple(merged)
