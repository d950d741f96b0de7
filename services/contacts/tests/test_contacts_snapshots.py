"""Snapshots of persons and companies, on SQLite and PostgreSQL.

A contact's every interaction is one of its events; every
`CRM_SNAPSHOT_INTERVAL` events the store keeps a snapshot, a load reads only
the events after it, and what it loads is the contact a full replay builds,
field for field. The API answers the same with and without snapshots, and the
notification log (what the relay publishes) holds events only; a store
written before snapshots existed still loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from uuid import UUID

import pytest
from contacts_support import Clock

from crm_common.commands import Caller
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.inputs import (
    ChannelInput,
    CompanyLink,
    ConsentInput,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
)
from crm_deploy.testing import assert_loads_from_snapshot, assert_log_holds_events_only

CALLER = Caller(actor="grace", client="tests")
INTERVAL = 10
ADA = NewPerson(
    given_name="Ada",
    family_name="Lovelace",
    channels=[
        ChannelInput("email", "ada@example.com", True, "granted", "web-form:newsletter"),
        ChannelInput("phone", "+44 20 7946 0018"),
    ],
    tags=["VIP"],
    custom_fields={"budget": CustomFieldInput("money", "1234.5", "EUR")},
    owner="grace",
)


@pytest.fixture
def snapshotting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    yield


async def busy_contacts(service: ContactsService, clock: Clock) -> tuple[str, str]:
    person_id = (await service.create_person(CALLER, ADA)).outcome.id
    company_id = (await service.create_company(CALLER, NewCompany(name="Engines"))).outcome.id
    await service.link_person_to_company(CALLER, CompanyLink(person_id, company_id, "CTO"))
    await service.record_consent(
        CALLER, ConsentInput(person_id, "email", "ada@example.com", "withdrawn", "call")
    )
    for i in range(12):
        clock.advance(minutes=5)
        for contact_id in (person_id, company_id):
            await service.log_interaction(
                CALLER, InteractionInput(contact_id, "call", "outbound", "phone", f"call {i}")
            )
    return person_id, company_id


async def test_persons_and_companies_load_from_snapshots(
    store_settings: Settings, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    service = ContactsService(create_application(store_settings), clock=clock)
    try:
        person_id, company_id = await busy_contacts(service, clock)
        person = assert_loads_from_snapshot(service.app, UUID(person_id), monkeypatch, INTERVAL)
        company = assert_loads_from_snapshot(service.app, UUID(company_id), monkeypatch, INTERVAL)
        assert len(person.interactions) == 12 and len(company.interactions) == 12
        views = [await service.get_contact(i) for i in (person_id, company_id)]
        assert_log_holds_events_only(service.app, person.version + company.version)
    finally:
        service.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    plain = ContactsService(create_application(store_settings), clock=clock)
    try:
        assert plain.app.snapshots is None
        assert [await plain.get_contact(i) for i in (person_id, company_id)] == views
    finally:
        plain.close()


async def test_a_store_written_without_snapshots_still_loads(
    store_settings: Settings, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    before = ContactsService(create_application(store_settings), clock=clock)
    try:
        person_id, _ = await busy_contacts(before, clock)
        view = await before.get_contact(person_id)
    finally:
        before.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    after = ContactsService(create_application(store_settings), clock=clock)
    try:
        assert after.app.snapshots is not None
        assert list(after.app.snapshots.get(UUID(person_id))) == []
        assert await after.get_contact(person_id) == view
        for i in range(INTERVAL):
            await after.log_interaction(
                CALLER, InteractionInput(person_id, "mail", "inbound", "email", f"mail {i}")
            )
        person = assert_loads_from_snapshot(after.app, UUID(person_id), monkeypatch, INTERVAL)
        assert len(person.interactions) == 12 + INTERVAL
    finally:
        after.close()
