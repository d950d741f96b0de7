"""The person aggregate: a profile with channel identities and consent, and
the companies the person belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import event

from crm_common.errors import RuleViolated, ValidationFailed
from crm_common.privacy.declaration import REDACTED, PersonalData
from crm_contacts.domain.channels import Channel, ChannelIdentity, Consent, ConsentStatus
from crm_contacts.domain.companies import Company
from crm_contacts.domain.contacts import Contact, ContactKind
from crm_contacts.domain.custom_fields import CustomField, fields_from_dict, fields_to_dict
from crm_contacts.domain.lifecycle import LifecycleStage, check_stage_change


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
            "custom_fields": fields_to_dict(self.custom_fields),
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
            custom_fields=fields_from_dict(data["custom_fields"]),
            channels=tuple(ChannelIdentity.from_dict(c) for c in data["channels"]),
            owner=data["owner"],
        )


@dataclass(frozen=True)
class Affiliation:
    company_id: str
    company_name: str
    role: str


def with_consent(
    profile: PersonProfile, channel: Channel, address: str, consent: Consent
) -> PersonProfile:
    """The profile with a new consent on one of its channel identities."""
    channels = tuple(
        replace(c, consent=consent) if c.key == (channel, address) else c for c in profile.channels
    )
    return replace(profile, channels=channels)


def erased_profile(profile: Mapping[str, Any]) -> dict[str, Any]:
    """A person's profile (as a dict) with every personal value "[erased]": what
    its declared fields read once the person's key is destroyed."""
    erased = dict(profile)
    for name in ("given_name", "family_name"):
        if name in erased:
            erased[name] = REDACTED
    if "channels" in erased:
        erased["channels"] = [{**c, "address": REDACTED} for c in erased["channels"]]
    if "custom_fields" in erased:
        erased["custom_fields"] = {
            k: {**v, "value": REDACTED} for k, v in erased["custom_fields"].items()
        }
    return erased


class Person(Contact):
    KIND = ContactKind.PERSON

    class PersonRegistered(Contact.Created):
        profile: dict[str, Any]
        # Names and channel addresses identify the person, custom field values describe
        # them; tags, stage, owner, consent status and field keys are the business's words.
        personal_data = PersonalData(
            "profile.given_name",
            "profile.family_name",
            "profile.channels.*.address",
            "profile.custom_fields.*.value",
        )

    class PersonProfileUpdated(Contact.Event):
        profile: dict[str, Any]
        changed_fields: list[str]
        #: Why, when not a caller's edit: a lifecycle rule and what fired it
        #: (events recorded before causes existed have none).
        cause: str
        # The whole profile again: the same fields as at registration.
        personal_data = PersonalData(
            "profile.given_name",
            "profile.family_name",
            "profile.channels.*.address",
            "profile.custom_fields.*.value",
        )

    class PersonLinkedToCompany(Contact.Event):
        company_id: str
        company_name: str
        role: str
        # A role at a named company singles a person out (the company's name is not theirs).
        personal_data = PersonalData("role")

    class PersonUnlinkedFromCompany(Contact.Event):
        company_id: str

    class ConsentRecorded(Contact.Event):
        channel: str
        address: str
        status: str
        source: str
        at: datetime
        # The address is the person's; status, source and time are the consent's facts.
        personal_data = PersonalData("address")

    class PersonErased(Contact.Event):
        """The person was erased (an admin's `ErasePerson`): their data keys, and
        those of the contacts merged into them (`merged_ids`), are destroyed, so
        every personal value of theirs reads "[erased]" from now on. Holds no
        personal data: `reference` names the data subject request."""

        reference: str
        merged_ids: list[str]

    class PersonalDataExported(Contact.Event):
        """An admin exported everything the platform holds about the person (the
        services that answered); the document itself is not stored."""

        services: list[str]

    @event(PersonRegistered)
    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = PersonProfile.from_dict(profile)
        self.affiliations: dict[str, Affiliation] = {}
        self.interactions = []

    @property
    def display_name(self) -> str:
        return self.profile.display_name

    @property
    def lifecycle_stage(self) -> LifecycleStage:
        return self.profile.lifecycle_stage

    @classmethod
    def register(cls, profile: PersonProfile) -> Person:
        return cls(profile=profile.to_dict())

    def change_profile(self, profile: PersonProfile, cause: str = "") -> list[str]:
        """Records the new profile if anything changed; returns what changed."""
        check_stage_change(self.profile.lifecycle_stage, profile.lifecycle_stage)
        changed = self.profile.changed_fields(profile)
        if changed:
            self._profile_updated(profile=profile.to_dict(), changed_fields=changed, cause=cause)
        return changed

    def change_stage(self, stage: LifecycleStage, cause: str = "") -> list[str]:
        return self.change_profile(replace(self.profile, lifecycle_stage=stage), cause)

    @event(PersonProfileUpdated)
    def _profile_updated(
        self, profile: dict[str, Any], changed_fields: list[str], cause: str = ""
    ) -> None:
        self.profile = PersonProfile.from_dict(profile)

    def link_to_company(self, company: Company, role: str) -> None:
        current = self.affiliations.get(str(company.id))
        if current is not None and current.role == role:
            return  # already so: linking again is a no-op
        self._linked(company_id=str(company.id), company_name=company.profile.name, role=role)

    @event(PersonLinkedToCompany)
    def _linked(self, company_id: str, company_name: str, role: str) -> None:
        self.affiliations[company_id] = Affiliation(company_id, company_name, role)

    def unlink_from_company(self, company_id: str) -> None:
        if company_id not in self.affiliations:
            raise RuleViolated(f"person {self.id} is not linked to company {company_id}")
        self._unlinked(company_id=company_id)

    @event(PersonUnlinkedFromCompany)
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

    def _set_profile(self, profile: dict[str, Any]) -> None:
        self.profile = PersonProfile.from_dict(profile)

    @property
    def erased_merged_ids(self) -> tuple[str, ...]:
        """The contacts merged into the person that were erased with them."""
        return tuple(getattr(self, "_erased_merged_ids", ()))

    def erase(self, reference: str, merged_ids: list[str]) -> bool:
        """Records the erase; False (and nothing recorded) when already erased."""
        if self.erased:
            return False
        self._person_erased(reference=reference, merged_ids=list(merged_ids))
        return True

    @event(PersonErased)
    def _person_erased(self, reference: str, merged_ids: list[str]) -> None:
        # What the events read once the keys are destroyed, at once: a state
        # folded before the destroy (a projection's, a command's) shows no more
        # than a reload after it.
        self._erased = True
        self._erased_merged_ids = list(merged_ids)
        self.profile = PersonProfile.from_dict(erased_profile(self.profile.to_dict()))
        self.affiliations = {k: replace(a, role=REDACTED) for k, a in self.affiliations.items()}
        self.interactions = [replace(i, summary=REDACTED) for i in self.interactions]
        self._merge_records = {
            merge_id: replace(
                record,
                before=erased_profile(record.before),
                after=erased_profile(record.after),
            )
            for merge_id, record in self.merges.items()
        }

    def record_export(self, services: list[str]) -> None:
        self._exported(services=list(services))

    @event(PersonalDataExported)
    def _exported(self, services: list[str]) -> None:
        pass

    def _add_affiliations(self, links: list[dict[str, str]]) -> None:
        for link in links:
            self.affiliations.setdefault(
                link["company_id"],
                Affiliation(link["company_id"], link["company_name"], link["role"]),
            )

    def _remove_affiliations(self, company_ids: list[str]) -> None:
        for company_id in company_ids:
            self.affiliations.pop(company_id, None)

    @event(ConsentRecorded)
    def _consent_recorded(
        self, channel: str, address: str, status: str, source: str, at: datetime
    ) -> None:
        consent = Consent(ConsentStatus(status), source, at)
        self.profile = with_consent(self.profile, Channel(channel), address, consent)
