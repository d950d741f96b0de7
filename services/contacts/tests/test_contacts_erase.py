"""Erasing a person (`ErasePerson`), on SQLite and PostgreSQL, through the service.

A refused erase writes nothing and destroys no key. An erase of a person with
a history (a company link, consent, interactions, a duplicate merged into
them) records `PersonErased`, destroys the keys of the person and of the
merged contact, and leaves none of their name, addresses, role or summaries in
clear in any row of the store: events, snapshots, keys, the directory's and
the duplicate index's query tables. The business facts stay (stage, tags,
the company link, counts), a search by what was erased finds nothing, and a
rebuild of the query tables from the events gives the same rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from contacts_support import Clock, log_length

from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.privacy import REDACTED, SubjectErased, new_master_key
from crm_common.querystore import TRACKING_TABLE, QueryDatabase
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.directory import CONTACTS, KEY_TABLES, ContactDirectory
from crm_contacts.domain import LifecycleStage, Person, PersonProfile
from crm_contacts.duplicate_index import FACTS, KEYS, LINKS, DuplicateIndex
from crm_contacts.inputs import (
    ChannelInput,
    CompanyLink,
    ConsentInput,
    ContactQuery,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_deploy.testing import found_in_clear, stored_rows

ADMIN = Caller(actor="root", client="tests")
GIVEN, FAMILY = "Hypatia", "Theonsdottir"
EMAIL, PHONE = "hypatia.theon@example.org", "+302107654321"
DUP_GIVEN, DUP_EMAIL = "Hypatiah", "h.theon@example.net"
HOME = "hypatia.home@example.net"
ROLE = "Head Librarian"
SUMMARIES = ("Hypatia asked about the astrolabe", "Hypatia wants the conic sections")
DUP_SUMMARY = "Hypatiah called about her order"
COMPANY = "Museion of Alexandria"
PERSONAL = (
    *(GIVEN, FAMILY, EMAIL, "hypatia.theon", PHONE, "2107654321"),
    *(DUP_GIVEN, DUP_EMAIL, HOME, ROLE, *SUMMARIES, DUP_SUMMARY),
)
STORED_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("contacts_events", "contacts_snapshots"),
}
PRIVACY_TABLES = ("privacy_data_keys", "privacy_key_access")
QUERY_TABLES = (CONTACTS, *KEY_TABLES, FACTS, LINKS, KEYS)


@pytest.fixture
def keyed(store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    return dataclasses.replace(store_settings, master_keys=new_master_key("m-erase"))


@pytest.fixture
async def contacts(keyed: Settings, clock: Clock) -> AsyncIterator[ContactsService]:
    service = ContactsService(create_application(keyed), clock=clock)
    yield service
    service.close()


def every_table(settings: Settings) -> tuple[str, ...]:
    return (*STORED_TABLES[settings.event_store], *PRIVACY_TABLES, *QUERY_TABLES)


def profile_of(view: Any) -> PersonProfile:
    assert isinstance(view.profile, PersonProfile)
    return view.profile


async def person_with_history(contacts: ContactsService, clock: Clock) -> tuple[str, str, str]:
    """(person id, company id, the id of a duplicate merged into the person)."""
    new = NewPerson(
        given_name=GIVEN,
        family_name=FAMILY,
        channels=[
            ChannelInput("email", EMAIL, True, "granted", "web-form:newsletter"),
            ChannelInput("phone", PHONE),
        ],
        tags=["vip"],
        custom_fields={"home_email": CustomFieldInput("email", HOME)},
        owner="grace",
    )
    person_id = (await contacts.create_person(ADMIN, new)).outcome.id
    company_id = (await contacts.create_company(ADMIN, NewCompany(name=COMPANY))).outcome.id
    await contacts.link_person_to_company(ADMIN, CompanyLink(person_id, company_id, ROLE))
    clock.advance(hours=1)
    await contacts.record_consent(
        ADMIN, ConsentInput(person_id, "email", EMAIL, "withdrawn", "call:agent-7")
    )
    for summary in SUMMARIES:
        clock.advance(minutes=5)
        await contacts.log_interaction(ADMIN, InteractionInput(person_id, "call", summary=summary))
    dup = NewPerson(given_name=DUP_GIVEN, channels=[ChannelInput("email", DUP_EMAIL)])
    dup_id = (await contacts.create_person(ADMIN, dup)).outcome.id
    await contacts.log_interaction(ADMIN, InteractionInput(dup_id, "mail", summary=DUP_SUMMARY))
    await contacts.merge_contacts(ADMIN, person_id, [dup_id], {})
    await contacts.become_customer(ADMIN, person_id, "deal won")
    return person_id, company_id, dup_id


def query_rows(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """The query tables' rows, sorted (to compare before and after a rebuild)."""
    rows = stored_rows(settings, QUERY_TABLES)
    return {t: sorted(tuple(sorted(r.items())) for r in rows[t]) for t in QUERY_TABLES}


def rebuilt(contacts: ContactsService, settings: Settings) -> None:
    """Has the directory and the duplicate index rebuilt from the event log, as a
    new release of their tables would."""
    database = QueryDatabase(settings)
    try:
        with database.write() as tx:
            tx.execute(f"UPDATE {TRACKING_TABLE} SET version = 0")
    finally:
        database.close()
    fresh = QueryDatabase(settings)
    directory = ContactDirectory(contacts.app, fresh)
    try:
        directory.catch_up()
    finally:
        directory.close()
    index = DuplicateIndex.open(contacts.app)
    try:
        index.catch_up()
    finally:
        index.close()


async def test_refused_erases_write_nothing(
    contacts: ContactsService, keyed: Settings, store_settings: Settings, clock: Clock
) -> None:
    person_id, company_id, dup_id = await person_with_history(contacts, clock)
    stored = log_length(contacts.app)

    with pytest.raises(NotFound):
        await contacts.erase_person(ADMIN, "3c0b3f9e-43a4-4c62-a8de-7d7b0a7d2f10", "DSR-1")
    with pytest.raises(NotFound):
        await contacts.erase_person(ADMIN, "not-an-id", "DSR-1")
    with pytest.raises(ValidationFailed) as company:
        await contacts.erase_person(ADMIN, company_id, "DSR-1")
    assert [e.field for e in company.value.errors] == ["id"]
    assert "only a person can be erased" in company.value.message
    with pytest.raises(RuleViolated) as merged:
        await contacts.erase_person(ADMIN, dup_id, "DSR-1")
    assert f"erase {person_id} instead" in merged.value.message
    for reference in ("x" * 201, "DSR-1\nsecond line", "DSR\x00"):
        with pytest.raises(ValidationFailed) as bad:
            await contacts.erase_person(ADMIN, person_id, reference)
        assert [e.field for e in bad.value.errors] == ["reference"]

    # Without master keys nothing could be shredded: refused before anything.
    unkeyed = ContactsService(create_application(store_settings), clock=clock)
    try:
        with pytest.raises(RuleViolated) as no_keys:
            await unkeyed.erase_person(ADMIN, person_id, "DSR-1")
        assert no_keys.value.message == (
            "personal data encryption is not configured (CRM_MASTER_KEYS)"
        )
    finally:
        unkeyed.close()

    assert log_length(contacts.app) == stored
    shown = await contacts.get_contact(person_id)
    assert (shown.erased, profile_of(shown).given_name) == (False, GIVEN)
    keys = stored_rows(keyed, ["privacy_data_keys"])["privacy_data_keys"]
    assert keys and all(row["destroyed_at"] is None for row in keys)


async def test_an_erase_leaves_no_personal_data_in_any_table_and_keeps_the_facts(
    contacts: ContactsService, keyed: Settings, clock: Clock
) -> None:
    person_id, company_id, dup_id = await person_with_history(contacts, clock)
    index = DuplicateIndex.open(contacts.app)
    try:
        index.catch_up()
        found = await contacts.list_contacts(ContactQuery(email=EMAIL))
        assert [c.id for c in found.contacts] == [person_id]
        # The scan sees the query tables in clear before the erase.
        assert GIVEN in found_in_clear(keyed, QUERY_TABLES, (GIVEN,))
        stored = log_length(contacts.app)

        written = await contacts.erase_person(ADMIN, person_id, "DSR-2026-0042")

        assert written.outcome.extra["already_erased"] == "false"
        assert log_length(contacts.app) == stored + 1
        [erased_event] = [
            e
            for e in contacts.app.events.get(UUID(person_id))
            if isinstance(e, Person.PersonErased)
        ]
        assert (erased_event.reference, erased_event.merged_ids) == ("DSR-2026-0042", [dup_id])
        index.catch_up()
        await contacts.list_contacts(ContactQuery())  # the directory catches up
    finally:
        index.close()

    assert found_in_clear(keyed, every_table(keyed), PERSONAL) == []
    # What is not personal is still there: the company, the consent's source, the reference.
    assert found_in_clear(
        keyed, every_table(keyed), (COMPANY, "call:agent-7", "DSR-2026-0042")
    ) == [
        COMPANY,
        "call:agent-7",
        "DSR-2026-0042",
    ]

    for service in (contacts, ContactsService(create_application(keyed), clock=clock)):
        shown = await service.get_contact(person_id)
        profile = profile_of(shown)
        assert shown.erased is True
        assert shown.display_name == REDACTED
        assert (profile.given_name, profile.family_name) == (REDACTED, REDACTED)
        assert {c.address for c in profile.channels} == {REDACTED}
        assert profile.custom_fields["home_email"].value == REDACTED
        assert [(a.company_id, a.company_name, a.role) for a in shown.affiliations] == [
            (company_id, COMPANY, REDACTED)
        ]
        assert shown.interactions_total == 3
        assert {i.summary for i in shown.interactions} == {REDACTED}
        assert (profile.lifecycle_stage, profile.tags) == (LifecycleStage.CUSTOMER, ("vip",))
        # The merged duplicate reads as its survivor, and its own events are shredded.
        redirected = await service.get_contact(dup_id)
        assert (redirected.id, redirected.redirected_from) == (person_id, dup_id)
        if service is not contacts:
            service.close()

    for query in (
        ContactQuery(email=EMAIL),
        ContactQuery(email=DUP_EMAIL),
        ContactQuery(phone=PHONE),
        ContactQuery(query=GIVEN),
        ContactQuery(query=FAMILY),
    ):
        assert (await contacts.list_contacts(query)).contacts == []
    [listed] = (await contacts.list_contacts(ContactQuery(tag="vip"))).contacts
    assert (listed.id, listed.display_name, listed.erased) == (person_id, REDACTED, True)

    before = query_rows(keyed)
    rebuilt(contacts, keyed)
    assert query_rows(keyed) == before
    assert found_in_clear(keyed, every_table(keyed), PERSONAL) == []


async def test_an_erased_person_takes_no_personal_data_and_a_second_erase_records_nothing(
    contacts: ContactsService, keyed: Settings, clock: Clock
) -> None:
    person_id, company_id, _ = await person_with_history(contacts, clock)
    await contacts.erase_person(ADMIN, person_id, "DSR-7")
    stored = log_length(contacts.app)

    again = await contacts.erase_person(ADMIN, person_id, "DSR-8")
    assert again.outcome.extra["already_erased"] == "true"
    assert again.contact.erased is True
    assert log_length(contacts.app) == stored

    for write in (
        contacts.update_person(
            ADMIN, PersonChanges(person_id, frozenset({"given_name"}), given_name="Hypatia")
        ),
        contacts.log_interaction(ADMIN, InteractionInput(person_id, "mail", summary="hello")),
        contacts.link_person_to_company(ADMIN, CompanyLink(person_id, company_id, "Curator")),
    ):
        with pytest.raises(SubjectErased):
            await write
    assert log_length(contacts.app) == stored
    await contacts.list_contacts(ContactQuery())  # the directory's tables, caught up
    index = DuplicateIndex.open(contacts.app)
    try:
        index.catch_up()
    finally:
        index.close()
    assert found_in_clear(keyed, every_table(keyed), (*PERSONAL, "Curator", "hello")) == []
