"""What callers ask the contacts service for, before validation.

Plain values as both adapters (gRPC and REST) receive them: enums are
lower-case words ("email", "customer") or None when not given. Nothing here
is trusted; `crm_contacts.validation` turns these into domain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class CustomFieldInput:
    type: str
    value: str
    currency: str = ""


@dataclass(frozen=True)
class ChannelInput:
    channel: str | None
    address: str
    preferred: bool = False
    # Optional consent captured together with the identity.
    consent_status: str | None = None
    consent_source: str = ""


@dataclass(frozen=True)
class NewPerson:
    given_name: str = ""
    family_name: str = ""
    channels: Sequence[ChannelInput] = ()
    # None: a new contact starts as a lead.
    lifecycle_stage: str | None = None
    tags: Sequence[str] = ()
    custom_fields: Mapping[str, CustomFieldInput] = field(default_factory=dict)
    owner: str = ""


@dataclass(frozen=True)
class PersonChanges:
    """Only the fields named in `fields` change (a field mask).

    `custom_fields` in `fields` sets the given keys and removes those in
    `remove_custom_fields`; the other keys stay. `channels` replaces the list
    (identities kept keep their consent unless a new one is given).
    """

    id: str
    fields: frozenset[str]
    given_name: str = ""
    family_name: str = ""
    lifecycle_stage: str | None = None
    tags: Sequence[str] = ()
    custom_fields: Mapping[str, CustomFieldInput] = field(default_factory=dict)
    remove_custom_fields: Sequence[str] = ()
    owner: str = ""
    channels: Sequence[ChannelInput] = ()


@dataclass(frozen=True)
class NewCompany:
    name: str = ""
    domain: str = ""
    industry: str = ""
    lifecycle_stage: str | None = None
    tags: Sequence[str] = ()
    custom_fields: Mapping[str, CustomFieldInput] = field(default_factory=dict)
    owner: str = ""


@dataclass(frozen=True)
class CompanyChanges:
    """Field-mask update of a company; see `PersonChanges`."""

    id: str
    fields: frozenset[str]
    name: str = ""
    domain: str = ""
    industry: str = ""
    lifecycle_stage: str | None = None
    tags: Sequence[str] = ()
    custom_fields: Mapping[str, CustomFieldInput] = field(default_factory=dict)
    remove_custom_fields: Sequence[str] = ()
    owner: str = ""


@dataclass(frozen=True)
class CompanyLink:
    person_id: str
    company_id: str
    role: str = ""


@dataclass(frozen=True)
class CompanyUnlink:
    person_id: str
    company_id: str


@dataclass(frozen=True)
class ConsentInput:
    contact_id: str
    channel: str | None
    address: str
    status: str | None
    source: str = ""


@dataclass(frozen=True)
class InteractionInput:
    contact_id: str
    kind: str | None
    direction: str | None = None
    channel: str | None = None
    summary: str = ""
    # None: when the command is accepted.
    occurred_at: datetime | None = None
    owner: str = ""


@dataclass(frozen=True)
class ContactQuery:
    """Filters of a contact search; all given filters must match."""

    query: str = ""
    email: str = ""
    phone: str = ""
    tag: str = ""
    kind: str | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class InteractionQuery:
    """A page of one contact's interactions (ListInteractions)."""

    contact_id: str
    page_size: int = 0
    page_token: str = ""
