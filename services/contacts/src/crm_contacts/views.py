"""What readers see: contacts as the APIs and the events show them, built
from the aggregates (or, in the directory, from their events)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crm_common.commands import WriteOutcome
from crm_common.privacy.declaration import REDACTED
from crm_contacts.domain import (
    Affiliation,
    Company,
    CompanyProfile,
    Contact,
    ContactKind,
    Interaction,
    Person,
    PersonProfile,
)

# How many interactions a contact shows, newest first (ListInteractions pages
# through all of them; `interactions_total` says how many there are).
RECENT_INTERACTIONS = 50


@dataclass(frozen=True)
class ContactView:
    """A person or a company as the APIs show it."""

    id: str
    kind: ContactKind
    version: int
    profile: PersonProfile | CompanyProfile
    affiliations: tuple[Affiliation, ...]
    # The most recent interactions, newest first (empty in search results).
    interactions: tuple[Interaction, ...]
    created_at: datetime
    updated_at: datetime
    #: How many interactions the contact has, so a reader knows when
    #: `interactions` is not all of them (0 in search results, like `interactions`).
    interactions_total: int = 0
    #: The id asked for when it was merged into this contact (a read of a
    #: tombstone answers with its survivor and says so); None otherwise.
    redirected_from: str | None = None
    #: The person was erased: every personal value reads "[erased]".
    erased: bool = False

    @property
    def display_name(self) -> str:
        return REDACTED if self.erased else self.profile.display_name


def view_of(contact: Contact, interactions: int = RECENT_INTERACTIONS) -> ContactView:
    profile: PersonProfile | CompanyProfile
    affiliations: tuple[Affiliation, ...] = ()
    if isinstance(contact, Person):
        profile = contact.profile
        affiliations = tuple(contact.affiliations.values())
    elif isinstance(contact, Company):
        profile = contact.profile
    else:
        raise TypeError(f"{type(contact).__qualname__} is not a kind of contact")
    return ContactView(
        id=str(contact.id),
        kind=contact.KIND,
        version=contact.version,
        profile=profile,
        affiliations=affiliations,
        interactions=tuple(contact.recent_interactions(interactions)),
        created_at=contact.created_on,
        updated_at=contact.modified_on,
        interactions_total=len(contact.interactions),
        erased=contact.erased,
    )


@dataclass(frozen=True)
class DuplicateReason:
    """One rule a look-alike meets (`crm_contacts.duplicates.Reason`)."""

    rule: str
    score: float
    detail: str


@dataclass(frozen=True)
class PossibleDuplicate:
    """An existing contact that looks like the one being created, and why."""

    contact_id: str
    score: float
    reasons: tuple[DuplicateReason, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "contact_id": self.contact_id,
            "score": self.score,
            "reasons": [
                {"rule": r.rule, "score": r.score, "detail": r.detail} for r in self.reasons
            ],
        }


@dataclass(frozen=True)
class ContactWrite:
    """The outcome of a write and the contact as it stands after it."""

    outcome: WriteOutcome
    contact: ContactView
    #: A create's look-alikes (`CRM_CONTACTS_DUPLICATES_ON_CREATE`), best first.
    possible_duplicates: tuple[PossibleDuplicate, ...] = ()


@dataclass(frozen=True)
class ContactPage:
    """One page of a search."""

    contacts: list[ContactView]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class InteractionPage:
    """One page of a contact's interactions, newest first."""

    contact_id: str
    interactions: list[Interaction]
    next_page_token: str
    total_size: int
    #: The id asked for when it was merged into `contact_id`; None otherwise.
    redirected_from: str | None = None


@dataclass(frozen=True)
class PersonExport:
    """Everything the platform holds about a person (docs/privacy-export.md)."""

    person_id: str
    #: {"person", "redirected_from", "exported_at", "services": {service: part}}.
    document: dict[str, Any]
    #: The services whose parts it holds, contacts first.
    services: list[str]
    #: The id asked for when it was merged into the person; None otherwise.
    redirected_from: str | None = None
