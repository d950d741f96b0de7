"""The company aggregate: a profile the persons linked to it refer to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from eventsourcing.domain import event

from crm_contacts.domain.contacts import Contact, ContactKind
from crm_contacts.domain.custom_fields import CustomField, fields_from_dict, fields_to_dict
from crm_contacts.domain.lifecycle import LifecycleStage, check_stage_change


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
            "custom_fields": fields_to_dict(self.custom_fields),
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
            custom_fields=fields_from_dict(data["custom_fields"]),
            owner=data["owner"],
        )


class Company(Contact):
    KIND = ContactKind.COMPANY
    # No profile event declares personal data: a company's name, domain, industry and
    # custom fields are the company's, not a person's (its interactions are, see `Contact`).

    class CompanyRegistered(Contact.Created):
        profile: dict[str, Any]

    class CompanyProfileUpdated(Contact.Event):
        profile: dict[str, Any]
        changed_fields: list[str]
        #: Why, when not a caller's edit: a lifecycle rule and what fired it
        #: (events recorded before causes existed have none).
        cause: str

    @event(CompanyRegistered)
    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = CompanyProfile.from_dict(profile)
        self.interactions = []

    @property
    def display_name(self) -> str:
        return self.profile.name

    @property
    def lifecycle_stage(self) -> LifecycleStage:
        return self.profile.lifecycle_stage

    @classmethod
    def register(cls, profile: CompanyProfile) -> Company:
        return cls(profile=profile.to_dict())

    def change_profile(self, profile: CompanyProfile, cause: str = "") -> list[str]:
        """Records the new profile if anything changed; returns what changed."""
        check_stage_change(self.profile.lifecycle_stage, profile.lifecycle_stage)
        changed = self.profile.changed_fields(profile)
        if changed:
            self._profile_updated(profile=profile.to_dict(), changed_fields=changed, cause=cause)
        return changed

    def change_stage(self, stage: LifecycleStage, cause: str = "") -> list[str]:
        return self.change_profile(replace(self.profile, lifecycle_stage=stage), cause)

    @event(CompanyProfileUpdated)
    def _profile_updated(
        self, profile: dict[str, Any], changed_fields: list[str], cause: str = ""
    ) -> None:
        self.profile = CompanyProfile.from_dict(profile)

    def _set_profile(self, profile: dict[str, Any]) -> None:
        self.profile = CompanyProfile.from_dict(profile)
