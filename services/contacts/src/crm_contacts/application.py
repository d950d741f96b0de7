"""The contacts application layer, shared by the gRPC and REST adapters and
the follower.

Each command is a method of `ContactsService` that names itself
(`caller.command("CreatePerson")`) and goes through the shared command bus
(optimistic concurrency, request-id replay, audit metadata, group commit);
reads load aggregates from the event store. Searching uses
`crm_contacts.directory.ContactDirectory`, an in-memory index that follows the
event store's notification log, so it sees the writes of every replica of the
service and is rebuilt by reading the log again after a restart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application

from crm_common.commands import Caller, CommandBus, CommandContext, UnitOfWork
from crm_common.errors import NotFound
from crm_common.eventstore import application_env, creating_tables
from crm_common.settings import Settings
from crm_contacts import validation
from crm_contacts.directory import ContactDirectory
from crm_contacts.domain import Company, Contact, Person
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
from crm_contacts.views import ContactPage, ContactView, ContactWrite, view_of

SERVICE = "contacts"


class ContactsApplication(Application[UUID]):
    """The event store of persons and companies."""

    name = "contacts"


def create_application(settings: Settings) -> ContactsApplication:
    """The application on the configured event store (SQLite or PostgreSQL)."""
    with creating_tables(settings):
        return ContactsApplication(env=application_env(settings))


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

    async def create_person(self, caller: Caller, new: NewPerson) -> ContactWrite:
        profile = validation.new_person_profile(new, self.clock())
        return await self._write(
            caller.command("CreatePerson"), lambda uow: uow.add(Person.register(profile))
        )

    async def update_person(self, caller: Caller, changes: PersonChanges) -> ContactWrite:
        now = self.clock()

        def decide(uow: UnitOfWork) -> Person:
            person: Person = uow.get(changes.id, Person)
            person.change_profile(validation.changed_person_profile(person.profile, changes, now))
            return person

        return await self._write(caller.command("UpdatePerson"), decide)

    async def create_company(self, caller: Caller, new: NewCompany) -> ContactWrite:
        profile = validation.new_company_profile(new)
        return await self._write(
            caller.command("CreateCompany"), lambda uow: uow.add(Company.register(profile))
        )

    async def update_company(self, caller: Caller, changes: CompanyChanges) -> ContactWrite:
        def decide(uow: UnitOfWork) -> Company:
            company: Company = uow.get(changes.id, Company)
            company.change_profile(validation.changed_company_profile(company.profile, changes))
            return company

        return await self._write(caller.command("UpdateCompany"), decide)

    async def link_person_to_company(self, caller: Caller, link: CompanyLink) -> ContactWrite:
        role = validation.link_role(link.role)

        def decide(uow: UnitOfWork) -> Person:
            person: Person = uow.get(link.person_id, Person)
            company: Company = uow.get(link.company_id, Company, subject=False)
            person.link_to_company(company, role)
            return person

        return await self._write(caller.command("LinkPersonToCompany"), decide)

    async def unlink_person_from_company(
        self, caller: Caller, unlink: CompanyUnlink
    ) -> ContactWrite:
        def decide(uow: UnitOfWork) -> Person:
            person: Person = uow.get(unlink.person_id, Person)
            person.unlink_from_company(unlink.company_id)
            return person

        return await self._write(caller.command("UnlinkPersonFromCompany"), decide)

    async def record_consent(self, caller: Caller, consent: ConsentInput) -> ContactWrite:
        channel, address, status, source = validation.consent_of(consent)
        now = self.clock()

        def decide(uow: UnitOfWork) -> Contact:
            contact: Contact = uow.get(consent.contact_id, Contact)
            contact.record_consent(channel, address, status, source, now)
            return contact

        return await self._write(caller.command("RecordConsent"), decide)

    async def log_interaction(self, caller: Caller, interaction: InteractionInput) -> ContactWrite:
        """Logs an interaction; its id is in `outcome.extra["interaction_id"]`."""
        logged = validation.interaction_of(interaction, str(uuid.uuid4()), self.clock())

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact: Contact = uow.get(interaction.contact_id, Contact)
            contact.log_interaction(logged)
            return contact, {"interaction_id": logged.interaction_id}

        return await self._write(caller.command("LogInteraction"), decide)

    async def become_customer(self, caller: Caller, contact_id: str) -> ContactWrite:
        """A deal of the contact was won: makes it a customer unless it is one already.

        Never refused by the lifecycle rule: a customer or advocate is left as
        it is (no event). `outcome.extra["promoted"]` says whether the stage
        changed ("true") or not ("false"), for replays too.
        """

        def decide(uow: UnitOfWork) -> tuple[Contact, dict[str, str]]:
            contact: Contact = uow.get(contact_id, Contact)
            promoted = contact.become_customer()
            return contact, {"promoted": "true" if promoted else "false"}

        return await self._write(caller.command("BecomeCustomer"), decide)

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
