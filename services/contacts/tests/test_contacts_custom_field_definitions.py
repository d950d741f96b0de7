"""Custom-field definitions through the contacts service, on SQLite and
PostgreSQL: values are checked against their definition on create and update,
required fields are required, retiring a field hides its values from reads
without losing them, and every change is a versioned event."""

from __future__ import annotations

from typing import Any

import pytest
from contacts_support import Clock

from crm_common.commands import Caller
from crm_common.errors import NotFound, ValidationFailed
from crm_contacts.application import ContactsService
from crm_contacts.definitions import FieldDefinitionInput, FieldRevision
from crm_contacts.inputs import ChannelInput, CustomFieldInput, NewCompany, NewPerson, PersonChanges

ADMIN = Caller(actor="root", client="admin-console")


def errors_of(refused: pytest.ExceptionInfo[ValidationFailed]) -> list[tuple[str, str]]:
    return [(e.field, e.message) for e in refused.value.errors]


def ada(**custom: CustomFieldInput) -> NewPerson:
    return NewPerson(
        given_name="Ada",
        family_name="Lovelace",
        channels=[ChannelInput("email", "ada@example.org")],
        custom_fields=custom,
    )


async def define_segment(service: ContactsService) -> Any:
    return await service.fields.define(
        ADMIN,
        "person",
        FieldDefinitionInput(
            "segment", "Segment", "choice", required=True, options=("smb", "enterprise")
        ),
    )


async def test_values_follow_their_definition(service: ContactsService, clock: Clock) -> None:
    written = await define_segment(service)
    assert written.definitions.version == 2  # opened, then the field defined
    assert [d.key for d in written.definitions.definitions] == ["segment"]
    await service.fields.define(
        ADMIN,
        "person",
        FieldDefinitionInput("interests", "Interests", "multi_choice", options=("golf", "wine")),
    )

    with pytest.raises(ValidationFailed) as refused:
        await service.create_person(ADMIN, ada(segment=CustomFieldInput("", "huge")))
    assert errors_of(refused) == [
        ("custom_fields.segment.value", "'huge' is not one of 'smb', 'enterprise'")
    ]
    with pytest.raises(ValidationFailed) as refused:
        await service.create_person(ADMIN, ada())
    assert errors_of(refused) == [("custom_fields.segment", "is required (Segment)")]

    created = await service.create_person(
        ADMIN,
        ada(segment=CustomFieldInput("", "smb"), interests=CustomFieldInput("", "wine, golf")),
    )
    shown = created.contact.profile.custom_fields
    assert (shown["segment"].value, shown["interests"].value) == ("smb", "golf;wine")

    person = created.contact.id
    with pytest.raises(ValidationFailed) as refused:
        await service.update_person(
            ADMIN,
            PersonChanges(
                id=person, fields=frozenset({"custom_fields"}), remove_custom_fields=["segment"]
            ),
        )
    assert errors_of(refused) == [("custom_fields.segment", "is required (Segment)")]
    # A company has definitions of its own: none here, so any typed value goes.
    company = await service.create_company(
        ADMIN, NewCompany(name="Acme", custom_fields={"segment": CustomFieldInput("text", "x")})
    )
    assert company.contact.profile.custom_fields["segment"].value == "x"


async def test_retiring_hides_values_without_losing_them(
    service: ContactsService, clock: Clock
) -> None:
    await define_segment(service)
    created = await service.create_person(ADMIN, ada(segment=CustomFieldInput("", "smb")))
    person = created.contact.id

    retired = await service.fields.retire(ADMIN, "person", "segment")
    assert [d.retired for d in retired.definitions.definitions] == [True]
    assert "segment" not in (await service.get_contact(person)).profile.custom_fields
    # New values for it are refused; creating without it is fine now.
    with pytest.raises(ValidationFailed, match="retired"):
        await service.create_person(ADMIN, ada(segment=CustomFieldInput("", "smb")))
    await service.create_person(ADMIN, ada())

    restored = await service.fields.restore(ADMIN, "person", "segment")
    assert [d.retired for d in restored.definitions.definitions] == [False]
    assert (await service.get_contact(person)).profile.custom_fields["segment"].value == "smb"
    listed = await service.fields.listed("person")
    assert listed.version == restored.definitions.version


async def test_definition_changes_are_checked_and_replayable(
    service: ContactsService, clock: Clock
) -> None:
    await define_segment(service)
    with pytest.raises(ValidationFailed) as refused:
        await service.fields.revise(ADMIN, "person", FieldRevision("segment", options=("smb",)))
    assert errors_of(refused)[0][0] == "options"
    revised = await service.fields.revise(
        ADMIN, "person", FieldRevision("segment", options=("smb", "enterprise", "public"))
    )
    [segment] = revised.definitions.definitions
    assert (segment.options, segment.revision) == (("smb", "enterprise", "public"), 2)
    # A request retried with its request id writes nothing twice.
    again = Caller(actor="root", client="admin-console", request_id="define-tier")
    first = await service.fields.define(
        again, "person", FieldDefinitionInput("tier", "Tier", "text")
    )
    second = await service.fields.define(
        again, "person", FieldDefinitionInput("tier", "Tier", "text")
    )
    assert second.outcome.replayed and second.outcome.version == first.outcome.version
    with pytest.raises(ValidationFailed) as refused:
        await service.fields.define(ADMIN, "person", FieldDefinitionInput("tier", "Again", "text"))
    assert errors_of(refused) == [("key", "custom field 'tier' is defined already")]
    with pytest.raises(ValidationFailed) as refused:
        await service.fields.define(ADMIN, "person", FieldDefinitionInput("x", "X", "colour"))
    assert errors_of(refused)[0][0] == "type"
    with pytest.raises(ValidationFailed) as refused:
        await service.fields.define(
            ADMIN, "person", FieldDefinitionInput("fee", "Fee", "money", currency="X" * 5000)
        )
    assert errors_of(refused)[0][0] == "currency"
    assert [d.key for d in (await service.fields.listed("person")).definitions] == [
        "segment",
        "tier",
    ]
    with pytest.raises(ValidationFailed, match="person' or 'company"):
        await service.fields.listed("deal")
    with pytest.raises(NotFound):
        await service.fields.retire(ADMIN, "company", "segment")
