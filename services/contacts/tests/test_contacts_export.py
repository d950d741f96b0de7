"""A person's export (`ExportPerson`) through the service, on SQLite and PostgreSQL.

The document holds contacts' part (the contact with every interaction, the
custom fields with their labels, company links, consent, the contacts merged
into the person with their own histories, the full event history) and every
other service's; here the service gathers from none of them (the real client,
configured with no services), so the document is contacts' alone. A merged id
exports its survivor and says so; an unknown id is NOT_FOUND; a company is
refused; an export is recorded on the person (audited); after an erase the
export shows "[erased]" with the business facts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest
from contacts_support import Clock, log_length
from test_contacts_erase import (
    ADMIN,
    COMPANY,
    DUP_EMAIL,
    DUP_SUMMARY,
    EMAIL,
    GIVEN,
    HOME,
    ROLE,
    SUMMARIES,
    person_with_history,
)

from crm_common.errors import NotFound, ValidationFailed
from crm_common.privacy import REDACTED, new_master_key
from crm_common.privacy.export import export_json
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.definitions import FieldDefinitionInput
from crm_contacts.personal_data_client import PersonalDataClients


@pytest.fixture
async def contacts(store_settings: Settings, clock: Clock) -> AsyncIterator[ContactsService]:
    keyed = dataclasses.replace(store_settings, master_keys=new_master_key("m-export"))
    remote = PersonalDataClients(keyed, services=())
    service = ContactsService(create_application(keyed), clock=clock, remote_exports=remote)
    yield service
    service.close()
    await remote.close()


async def test_the_export_holds_everything_contacts_keeps_about_the_person(
    contacts: ContactsService, clock: Clock
) -> None:
    await contacts.fields.define(
        ADMIN,
        "person",
        FieldDefinitionInput(key="home_email", label="Home email", type="email"),
    )
    person_id, company_id, dup_id = await person_with_history(contacts, clock)
    stored = log_length(contacts.app)

    exported = await contacts.export_person(ADMIN, person_id)

    assert exported.services == ["contacts"]
    document = json.loads(export_json(exported.document))  # what the APIs send
    assert set(document) == {"person", "redirected_from", "exported_at", "services"}
    assert (document["person"], document["redirected_from"]) == (person_id, None)
    assert datetime.fromisoformat(document["exported_at"]) == clock.now
    assert set(document["services"]) == {"contacts"}
    part = document["services"]["contacts"]
    assert set(part) == {"contact", "custom_fields", "companies", "consent", "merged", "history"}

    contact = part["contact"]
    assert (contact["id"], contact["given_name"], contact["erased"]) == (person_id, GIVEN, False)
    assert {c["address"] for c in contact["channels"]} == {EMAIL, "+302107654321", DUP_EMAIL}
    # Every interaction, the merged duplicate's too.
    assert sorted(i["summary"] for i in contact["interactions"]) == sorted(
        [*SUMMARIES, DUP_SUMMARY]
    )
    assert contact["interactions_total"] == 3
    assert part["custom_fields"] == [
        {
            "key": "home_email",
            "label": "Home email",
            "type": "email",
            "value": HOME,
            "currency": "",
            "retired": False,
        }
    ]
    assert part["companies"] == [{"company_id": company_id, "company_name": COMPANY, "role": ROLE}]
    [recorded] = part["consent"]["recorded"]
    assert (recorded["address"], recorded["status"], recorded["source"]) == (
        EMAIL,
        "withdrawn",
        "call:agent-7",
    )
    [merged] = part["merged"]
    assert merged["id"] == dup_id
    assert [h["type"] for h in merged["history"]] == [
        "PersonRegistered",
        "InteractionLogged",
        "ContactMergedInto",
    ]
    assert merged["history"][1]["fields"]["interaction"]["summary"] == DUP_SUMMARY
    history = part["history"]
    assert [h["version"] for h in history] == list(range(1, len(history) + 1))
    assert [h["type"] for h in history][:3] == [
        "PersonRegistered",
        "PersonLinkedToCompany",
        "ConsentRecorded",
    ]
    assert "ContactsMerged" in [h["type"] for h in history]
    assert all(h["actor"] == "root" and h["client"] == "tests" for h in history)
    assert history[1]["fields"] == {
        "company_id": company_id,
        "company_name": COMPANY,
        "role": ROLE,
    }

    # The export is on the record, naming who made it and which services answered.
    assert log_length(contacts.app) == stored + 1
    last: Any = list(contacts.app.events.get(UUID(person_id)))[-1]
    assert type(last).__name__ == "PersonalDataExported"
    assert last.services == ["contacts"]
    assert last.__dict__["_meta"]["actor"] == "root"

    # A merged id exports its survivor, and says so.
    again = await contacts.export_person(ADMIN, dup_id)
    assert (again.document["person"], again.document["redirected_from"]) == (person_id, dup_id)
    assert again.document["services"]["contacts"]["contact"]["redirected_from"] == dup_id


async def test_an_export_of_no_person_is_refused_and_an_erased_one_reads_erased(
    contacts: ContactsService, clock: Clock
) -> None:
    person_id, company_id, _ = await person_with_history(contacts, clock)
    stored = log_length(contacts.app)
    with pytest.raises(NotFound):
        await contacts.export_person(ADMIN, "8d4c1b8e-2a0f-4c43-9f3f-0c1d2e3f4a5b")
    with pytest.raises(ValidationFailed) as company:
        await contacts.export_person(ADMIN, company_id)
    assert [e.field for e in company.value.errors] == ["id"]
    assert log_length(contacts.app) == stored

    await contacts.erase_person(ADMIN, person_id, "DSR-9")
    part = (await contacts.export_person(ADMIN, person_id)).document["services"]["contacts"]
    text = export_json(part)
    for value in (GIVEN, EMAIL, DUP_EMAIL, HOME, ROLE, *SUMMARIES, DUP_SUMMARY):
        assert value not in text
    contact = part["contact"]
    assert (contact["erased"], contact["name"], contact["lifecycle_stage"]) == (
        True,
        REDACTED,
        "customer",
    )
    assert part["companies"] == [
        {"company_id": company_id, "company_name": COMPANY, "role": REDACTED}
    ]
    erased = [h for h in part["history"] if h["type"] == "PersonErased"]
    assert [h["fields"]["reference"] for h in erased] == ["DSR-9"]
