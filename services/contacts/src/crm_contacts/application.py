"""The contacts application layer, shared by the gRPC and REST adapters.

Writes go through the shared command bus (optimistic concurrency, request-id
replay, audit metadata, group commit); reads load aggregates from the event
store. Searching uses `ContactDirectory`, an in-memory index that follows the
event store's notification log, so it sees the writes of every replica of
the service and is rebuilt by reading the log again after a restart.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import uuid
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application

from crm_common.commands import CommandBus, CommandContext, UnitOfWork, WriteOutcome
from crm_common.errors import FieldErrors, NotFound
from crm_common.eventstore import application_env, creating_tables
from crm_common.settings import Settings
from crm_contacts import validation
from crm_contacts.domain import (
    PHONE_CHANNELS,
    Affiliation,
    Channel,
    Company,
    CompanyProfile,
    Consent,
    ConsentStatus,
    Contact,
    ContactKind,
    Interaction,
    Person,
    PersonProfile,
    with_consent,
)
from crm_contacts.inputs import (
    CompanyChanges,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    ContactQuery,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)

SERVICE = "contacts"
RECENT_INTERACTIONS = 50
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class ContactsApplication(Application[UUID]):
    """The event store of persons and companies."""

    name = "contacts"


def create_application(settings: Settings) -> ContactsApplication:
    """The application on the configured event store (SQLite or PostgreSQL)."""
    with creating_tables(settings):
        return ContactsApplication(env=application_env(settings))


# -- what readers see -----------------------------------------------------------------------


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

    @property
    def display_name(self) -> str:
        return self.profile.display_name


def view_of(contact: Contact, interactions: int = RECENT_INTERACTIONS) -> ContactView:
    affiliations: tuple[Affiliation, ...] = ()
    if isinstance(contact, Person):
        affiliations = tuple(contact.affiliations.values())
    profile: PersonProfile | CompanyProfile = contact.profile  # type: ignore[attr-defined]
    return ContactView(
        id=str(contact.id),
        kind=contact.KIND,
        version=contact.version,
        profile=profile,
        affiliations=affiliations,
        interactions=tuple(contact.recent_interactions(interactions)),
        created_at=contact.created_on,
        updated_at=contact.modified_on,
    )


@dataclass(frozen=True)
class ContactWrite:
    """The outcome of a write and the contact as it stands after it."""

    outcome: WriteOutcome
    contact: ContactView


@dataclass(frozen=True)
class ContactPage:
    contacts: list[ContactView]
    next_page_token: str
    total_size: int


# -- search -------------------------------------------------------------------------------------


def _sort_key(view: ContactView) -> tuple[str, str]:
    return view.display_name.casefold(), view.id


def _encode_token(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[str, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        name, ident = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(name, str) or not isinstance(ident, str):
            raise ValueError(token)
    except (ValueError, TypeError, binascii.Error):
        errors = FieldErrors()
        errors.add("page_token", "is not a page token of this search")
        errors.raise_if_any()
        raise AssertionError("unreachable") from None
    return name, ident


class ContactDirectory:
    """Search over all contacts: an in-memory index following the event log.

    Before each search it reads the notification log from where it stopped
    (`select_notifications`), so it includes every write committed before the
    search, whichever process made it. Names match as case-insensitive
    substrings (a scan), emails, phone numbers and tags exactly (hash indexes).
    Results are ordered by display name then id; a page token holds the sort
    key of the last contact shown, so paging stays stable while contacts are
    added.
    """

    def __init__(self, app: Application[UUID], batch_size: int = 1000) -> None:
        self.app = app
        self.batch_size = batch_size
        self.position = 0
        self._lock = threading.Lock()
        self._contacts: dict[str, ContactView] = {}
        self._order: list[tuple[str, str]] = []
        self._emails: dict[str, set[str]] = {}
        self._phones: dict[str, set[str]] = {}
        self._tags: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._contacts)

    # -- following the log --

    def catch_up(self) -> int:
        """Applies every event stored since the last call; returns the position."""
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> int:
        recorder: Any = self.app.recorder
        while True:
            notifications = recorder.select_notifications(self.position + 1, self.batch_size)
            for notification in notifications:
                self._apply(self.app.mapper.to_domain_event(notification))
                self.position = notification.id
            if len(notifications) < self.batch_size:
                return self.position

    def _apply(self, event: Any) -> None:
        name = type(event).__name__
        ident = str(event.originator_id)
        data: dict[str, Any] = event.__dict__
        before = self._contacts.get(ident)
        after: ContactView | None
        if name in ("PersonRegistered", "CompanyRegistered"):
            person = name == "PersonRegistered"
            after = ContactView(
                id=ident,
                kind=ContactKind.PERSON if person else ContactKind.COMPANY,
                version=event.originator_version,
                profile=(
                    PersonProfile.from_dict(data["profile"])
                    if person
                    else CompanyProfile.from_dict(data["profile"])
                ),
                affiliations=(),
                interactions=(),
                created_at=event.timestamp,
                updated_at=event.timestamp,
            )
        elif before is None:
            return  # not a contact's event (e.g. a command receipt)
        elif name == "PersonProfileUpdated":
            after = replace(before, profile=PersonProfile.from_dict(data["profile"]))
        elif name == "CompanyProfileUpdated":
            after = replace(before, profile=CompanyProfile.from_dict(data["profile"]))
        elif name == "PersonLinkedToCompany":
            link = Affiliation(data["company_id"], data["company_name"], data["role"])
            others = tuple(a for a in before.affiliations if a.company_id != link.company_id)
            after = replace(before, affiliations=(*others, link))
        elif name == "PersonUnlinkedFromCompany":
            kept = tuple(a for a in before.affiliations if a.company_id != data["company_id"])
            after = replace(before, affiliations=kept)
        elif name == "ConsentRecorded" and isinstance(before.profile, PersonProfile):
            consent = Consent(ConsentStatus(data["status"]), data["source"], data["at"])
            channel = Channel(data["channel"])
            profile = with_consent(before.profile, channel, data["address"], consent)
            after = replace(before, profile=profile)
        else:  # an interaction: only the version and time move
            after = before
        after = replace(after, version=event.originator_version, updated_at=event.timestamp)
        self._index(before, after)

    def _index(self, before: ContactView | None, after: ContactView) -> None:
        if before is not None:
            self._order.pop(bisect_right(self._order, _sort_key(before)) - 1)
            for index, keys in self._keys(before):
                for key in keys:
                    index[key].discard(before.id)
                    if not index[key]:
                        del index[key]
        insort(self._order, _sort_key(after))
        for index, keys in self._keys(after):
            for key in keys:
                index.setdefault(key, set()).add(after.id)
        self._contacts[after.id] = after

    def _keys(self, view: ContactView) -> Iterable[tuple[dict[str, set[str]], set[str]]]:
        channels = view.profile.channels if isinstance(view.profile, PersonProfile) else ()
        yield self._emails, {c.address for c in channels if c.channel is Channel.EMAIL}
        yield self._phones, {c.address for c in channels if c.channel in PHONE_CHANNELS}
        yield self._tags, set(view.profile.tags)

    # -- searching --

    def search(self, query: ContactQuery) -> ContactPage:
        errors = FieldErrors()
        size = query.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        email = phone = None
        if query.email:
            email = validation.email_address(query.email)
            if email is None:
                errors.add("email", "is not an email address")
        if query.phone:
            phone = validation.phone_number(query.phone)
            if phone is None:
                errors.add("phone", "is not a phone number in international format")
        kind = validation.enum_of(errors, "kind", ContactKind, query.kind, required=False)
        errors.raise_if_any()
        after = _decode_token(query.page_token) if query.page_token else None
        text = query.query.strip().casefold()
        tag = " ".join(query.tag.split()).lower()

        with self._lock:
            self._catch_up()
            candidates: set[str] | None = None
            for index, key in ((self._emails, email), (self._phones, phone), (self._tags, tag)):
                if key:
                    found = index.get(key, set())
                    candidates = found if candidates is None else candidates & found

            def wanted(view: ContactView) -> bool:
                if kind is not None and view.kind is not kind:
                    return False
                return not text or _matches(view, text)

            if candidates is None:
                keys = [k for k in self._order if wanted(self._contacts[k[1]])]
            else:
                keys = sorted(
                    _sort_key(self._contacts[i]) for i in candidates if wanted(self._contacts[i])
                )
            start = bisect_right(keys, after) if after is not None else 0
            page = keys[start : start + size]
            views = [self._contacts[ident] for _, ident in page]
        more = start + size < len(keys)
        return ContactPage(views, _encode_token(page[-1]) if more else "", len(keys))


def _matches(view: ContactView, text: str) -> bool:
    profile = view.profile
    names: tuple[str, ...] = (profile.display_name,)
    if isinstance(profile, PersonProfile):
        names = (profile.given_name, profile.family_name, profile.display_name)
    return any(text in name.casefold() for name in names)


# -- the service ---------------------------------------------------------------------------


class ContactsService:
    """Use cases of the contacts service; both adapters call these."""

    def __init__(
        self,
        app: ContactsApplication,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.app = app
        self.bus = CommandBus(app, SERVICE)
        self.directory = ContactDirectory(app)
        self.clock = clock

    def close(self) -> None:
        """Stops the command bus (after pending commands) and closes the store."""
        self.bus.close()
        self.app.close()

    async def _write(
        self, ctx: CommandContext, decide: Callable[[UnitOfWork], Any]
    ) -> ContactWrite:
        outcome = await self.bus.execute_async(ctx, decide)
        if isinstance(outcome.subject, Contact):
            view = view_of(outcome.subject)
        else:  # a replay: show the contact as it is now
            view = await self.get_contact(outcome.id)
        return ContactWrite(outcome, view)

    async def create_person(self, ctx: CommandContext, new: NewPerson) -> ContactWrite:
        profile = validation.new_person_profile(new, self.clock())
        return await self._write(ctx, lambda uow: uow.add(Person.register(profile)))

    async def update_person(self, ctx: CommandContext, changes: PersonChanges) -> ContactWrite:
        now = self.clock()

        def decide(uow: UnitOfWork) -> Person:
            person = uow.get(changes.id, Person)
            person.change_profile(validation.changed_person_profile(person.profile, changes, now))
            return person

        return await self._write(ctx, decide)

    async def create_company(self, ctx: CommandContext, new: NewCompany) -> ContactWrite:
        profile = validation.new_company_profile(new)
        return await self._write(ctx, lambda uow: uow.add(Company.register(profile)))

    async def update_company(self, ctx: CommandContext, changes: CompanyChanges) -> ContactWrite:
        def decide(uow: UnitOfWork) -> Company:
            company = uow.get(changes.id, Company)
            company.change_profile(validation.changed_company_profile(company.profile, changes))
            return company

        return await self._write(ctx, decide)

    async def link_person_to_company(self, ctx: CommandContext, link: CompanyLink) -> ContactWrite:
        role = validation.link_role(link.role)

        def decide(uow: UnitOfWork) -> Person:
            person = uow.get(link.person_id, Person)
            company = uow.get(link.company_id, Company, subject=False)
            person.link_to_company(company, role)
            return person

        return await self._write(ctx, decide)

    async def unlink_person_from_company(
        self, ctx: CommandContext, unlink: CompanyUnlink
    ) -> ContactWrite:
        def decide(uow: UnitOfWork) -> Person:
            person = uow.get(unlink.person_id, Person)
            person.unlink_from_company(unlink.company_id)
            return person

        return await self._write(ctx, decide)

    async def record_consent(self, ctx: CommandContext, consent: ConsentInput) -> ContactWrite:
        channel, address, status, source = validation.consent_of(consent)
        now = self.clock()

        def decide(uow: UnitOfWork) -> Contact:
            contact = uow.get(consent.contact_id, Contact)
            contact.record_consent(channel, address, status, source, now)
            return contact

        return await self._write(ctx, decide)

    async def log_interaction(
        self, ctx: CommandContext, interaction: InteractionInput
    ) -> ContactWrite:
        """Logs an interaction; its id is in `outcome.extra["interaction_id"]`."""
        logged = validation.interaction_of(interaction, str(uuid.uuid4()), self.clock())

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact = uow.get(interaction.contact_id, Contact)
            contact.log_interaction(logged)
            return contact, {"interaction_id": logged.interaction_id}

        return await self._write(ctx, decide)

    async def become_customer(self, ctx: CommandContext, contact_id: str) -> ContactWrite:
        """A deal of the contact was won: makes it a customer unless it is one already.

        Never refused by the lifecycle rule: a customer or advocate is left as
        it is (no event). `outcome.extra["promoted"]` says whether the stage
        changed ("true") or not ("false"), for replays too.
        """

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact = uow.get(contact_id, Contact)
            promoted = contact.become_customer()
            return contact, {"promoted": "true" if promoted else "false"}

        return await self._write(ctx, decide)

    async def get_contact(self, contact_id: str) -> ContactView:
        return await asyncio.to_thread(self.load, contact_id)

    def load(self, contact_id: str) -> ContactView:
        try:
            ident = UUID(contact_id)
        except (ValueError, AttributeError, TypeError):
            raise NotFound("Contact", contact_id) from None
        try:
            contact: Any = self.app.repository.get(ident)
        except AggregateNotFoundError:
            raise NotFound("Contact", contact_id) from None
        if not isinstance(contact, Contact):
            raise NotFound("Contact", contact_id)
        return view_of(contact)

    async def list_contacts(self, query: ContactQuery) -> ContactPage:
        return await asyncio.to_thread(self.directory.search, query)
