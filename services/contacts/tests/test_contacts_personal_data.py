"""A person's personal data at rest in the contacts store, on SQLite and PostgreSQL.

With master keys configured, the service's own commands for a person
(registration, changes, a company link, consent, interactions, becoming a
customer) leave none of their name, addresses, custom field values, role or
interaction summaries in clear in any row of the event, snapshot or key
tables, while the service still shows them. Once the person's key is
destroyed, loading shows the redaction marker where they were and the
business facts (stage, tags, consent, links, counts) as they were, and a
write carrying personal data for the person is refused with `SubjectErased`.

The query tables (`directory_*`) are left out of the scan: they still hold
names and addresses in clear (docs/security.md, "Privacy").
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from contacts_support import Clock, log_length

from crm_common.commands import Caller
from crm_common.privacy import REDACTED, SubjectErased, new_master_key
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.domain import ConsentStatus, LifecycleStage, PersonProfile
from crm_contacts.inputs import (
    ChannelInput,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    ContactQuery,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_deploy.testing import found_in_clear, stored_rows

CALLER = Caller(actor="grace", client="tests")
GIVEN, FAMILY, NEW_FAMILY = "Augusta", "Lovelace-Byron", "King-Noel"
EMAIL, PHONE = "augusta.ada@example.org", "+442079460018"
HOME_EMAIL = "augusta.home@example.net"
ROLE = "Chief Analyst"
SUMMARY = "Augusta asked for the engine notes at her home address"
COMPANY, COMPANY_SUMMARY = "Analytical Engines Ltd", "Met Augusta King-Noel at the fair"
#: What no stored row may hold in clear (the phone also without its country code).
PERSONAL = (
    *(GIVEN, FAMILY, NEW_FAMILY, EMAIL, "augusta.ada", PHONE, "2079460018"),
    *(HOME_EMAIL, ROLE, SUMMARY, COMPANY_SUMMARY),
)
#: Event, snapshot and key tables (the query tables are not scanned).
STORED_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("contacts_events", "contacts_snapshots"),
}
KEY_TABLES = ("privacy_data_keys", "privacy_key_access")


@pytest.fixture
def keyed(store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The store with master keys, snapshots every 3 events."""
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    return dataclasses.replace(store_settings, master_keys=new_master_key("m-contacts"))


@pytest.fixture
async def contacts(keyed: Settings, clock: Clock) -> AsyncIterator[ContactsService]:
    service = ContactsService(create_application(keyed), clock=clock)
    yield service
    service.close()


def scanned(settings: Settings) -> tuple[str, ...]:
    """The event, snapshot and key tables of the store of `settings`."""
    return (*STORED_TABLES[settings.event_store], *KEY_TABLES)


def in_clear(settings: Settings, values: tuple[str, ...] = PERSONAL) -> list[str]:
    """The `values` a raw scan of the stored rows finds."""
    return found_in_clear(settings, scanned(settings), values)


def person(view: Any) -> PersonProfile:
    assert isinstance(view.profile, PersonProfile)
    return view.profile


async def busy_person(contacts: ContactsService, clock: Clock) -> tuple[str, str]:
    """A person with a history through the service's commands; (person id, company id)."""
    new = NewPerson(
        given_name=GIVEN,
        family_name=FAMILY,
        channels=[
            ChannelInput("email", EMAIL, True, "granted", "web-form:newsletter"),
            ChannelInput("phone", PHONE),
        ],
        tags=["vip"],
        custom_fields={"home_email": CustomFieldInput("email", HOME_EMAIL)},
        owner="grace",
    )
    person_id = (await contacts.create_person(CALLER, new)).outcome.id
    company_id = (await contacts.create_company(CALLER, NewCompany(name=COMPANY))).outcome.id
    await contacts.link_person_to_company(CALLER, CompanyLink(person_id, company_id, ROLE))
    clock.advance(hours=1)
    await contacts.record_consent(
        CALLER, ConsentInput(person_id, "email", EMAIL, "withdrawn", "call:agent-7")
    )
    await contacts.log_interaction(CALLER, InteractionInput(person_id, "call", summary=SUMMARY))
    await contacts.update_person(
        CALLER, PersonChanges(person_id, frozenset({"family_name"}), family_name=NEW_FAMILY)
    )
    await contacts.become_customer(CALLER, person_id, "deal won")
    await contacts.log_interaction(
        CALLER, InteractionInput(company_id, "visit", summary=COMPANY_SUMMARY)
    )
    return person_id, company_id


async def test_a_persons_data_is_sealed_at_rest_and_shown_by_the_service(
    contacts: ContactsService, keyed: Settings, clock: Clock
) -> None:
    person_id, company_id = await busy_person(contacts, clock)

    assert in_clear(keyed) == []
    rows = stored_rows(keyed, scanned(keyed))
    snapshots = rows[STORED_TABLES[keyed.event_store][1]]
    assert snapshots, "the person's snapshot (version 6) is stored and was scanned"
    # What is not personal stays readable: the company's name, the consent's source.
    assert in_clear(keyed, (COMPANY, "web-form:newsletter", "call:agent-7")) == [
        COMPANY,
        "web-form:newsletter",
        "call:agent-7",
    ]

    shown = await contacts.get_contact(person_id)
    ada = person(shown)
    assert (ada.given_name, ada.family_name) == (GIVEN, NEW_FAMILY)
    assert [c.address for c in ada.channels] == [EMAIL, PHONE]
    assert ada.custom_fields["home_email"].value == HOME_EMAIL
    assert [(a.company_name, a.role) for a in shown.affiliations] == [(COMPANY, ROLE)]
    assert [i.summary for i in shown.interactions] == [SUMMARY]
    company = await contacts.get_contact(company_id)
    assert [i.summary for i in company.interactions] == [COMPANY_SUMMARY]
    found = await contacts.list_contacts(ContactQuery(email=EMAIL))
    assert [(c.id, person(c).given_name) for c in found.contacts] == [(person_id, GIVEN)]

    again = ContactsService(create_application(keyed), clock=clock)  # its own key cache
    try:
        assert (await again.get_contact(person_id)) == shown
    finally:
        again.close()


async def test_an_erased_person_reads_redacted_with_the_business_facts_kept(
    contacts: ContactsService, keyed: Settings, clock: Clock
) -> None:
    person_id, company_id = await busy_person(contacts, clock)
    before = await contacts.get_contact(person_id)
    keys = contacts.app.personal_data_keys
    assert keys is not None

    assert keys.destroy(person_id) is True

    for service in (contacts, ContactsService(create_application(keyed), clock=clock)):
        erased = await service.get_contact(person_id)
        profile = person(erased)
        assert (profile.given_name, profile.family_name) == (REDACTED, REDACTED)
        assert [c.address for c in profile.channels] == [REDACTED, REDACTED]
        assert profile.custom_fields["home_email"].value == REDACTED
        assert [a.role for a in erased.affiliations] == [REDACTED]
        assert [i.summary for i in erased.interactions] == [REDACTED]
        # The anonymous facts are as they were.
        assert profile.lifecycle_stage is LifecycleStage.CUSTOMER
        assert profile.tags == ("vip",)
        assert [c.channel for c in profile.channels] == [c.channel for c in person(before).channels]
        consent = profile.channels[0].consent
        assert consent is not None
        assert (consent.status, consent.source) == (ConsentStatus.WITHDRAWN, "call:agent-7")
        assert [(a.company_id, a.company_name) for a in erased.affiliations] == [
            (company_id, COMPANY)
        ]
        assert [(i.kind, i.occurred_at) for i in erased.interactions] == [
            (i.kind, i.occurred_at) for i in before.interactions
        ]
        assert erased.version == before.version
        # The company's own interaction is sealed under the company's key.
        company = await service.get_contact(company_id)
        assert [i.summary for i in company.interactions] == [COMPANY_SUMMARY]
        if service is not contacts:
            service.close()
    assert in_clear(keyed) == []


async def test_a_write_of_personal_data_for_an_erased_person_is_refused(
    contacts: ContactsService, keyed: Settings, clock: Clock
) -> None:
    person_id, company_id = await busy_person(contacts, clock)
    keys = contacts.app.personal_data_keys
    assert keys is not None
    keys.destroy(person_id)
    stored = log_length(contacts.app)

    refused = [
        contacts.update_person(CALLER, PersonChanges(person_id, frozenset({"tags"}), tags=["x"])),
        contacts.log_interaction(CALLER, InteractionInput(person_id, "mail", summary="hello")),
        contacts.link_person_to_company(CALLER, CompanyLink(person_id, company_id, "Buyer")),
    ]
    for write in refused:
        with pytest.raises(SubjectErased):
            await write
    assert log_length(contacts.app) == stored

    # A change without personal data is still stored.
    unlinked = await contacts.unlink_person_from_company(
        CALLER, CompanyUnlink(person_id, company_id)
    )
    assert unlinked.contact.affiliations == ()
    assert log_length(contacts.app) == stored + 1
    assert in_clear(keyed) == []
