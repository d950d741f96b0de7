"""Unique custom fields over the real stores (SQLite, then PostgreSQL): a second
live contact never gets a value another holds (normalised), concurrent creates
with one value leave one winner (in one process and across two writers on one
store), a merge, an erase, a changed value or a field no longer unique free the
value, and a field becomes unique only when no value is shared. Then the
refusals on gRPC (ALREADY_EXISTS) and REST (409)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from contacts_support import Clock, log_length
from google.rpc import error_details_pb2, status_pb2

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.commands import Caller
from crm_common.privacy import new_master_key
from crm_common.server import AccessInterceptor
from crm_common.settings import Settings
from crm_contacts.already_exists import UniqueValueTaken
from crm_contacts.application import ContactsService, create_application
from crm_contacts.definitions import FieldDefinitionInput, FieldRevision
from crm_contacts.grpc_api import grpc_service
from crm_contacts.inputs import CustomFieldInput, NewCompany, NewPerson, PersonChanges
from crm_contacts.rest_api import create_app
from crm_contacts.unique_values import UniqueConflicts
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for, grpc_auth

ADMIN = Caller(actor="root", client="tests")


def person(member: str | None = None, given: str = "Ada", **more: str) -> NewPerson:
    fields = {"member_no": CustomFieldInput("", member)} if member is not None else {}
    fields |= {k: CustomFieldInput("", v) for k, v in more.items()}
    # Names and no channels: the duplicate check has nothing to say about them.
    return NewPerson(given_name=given, family_name="Tester", custom_fields=fields)


def set_member(ident: str, member: str) -> PersonChanges:
    return PersonChanges(
        id=ident,
        fields=frozenset({"custom_fields"}),
        custom_fields={"member_no": CustomFieldInput("", member)},
    )


async def define_member_no(service: ContactsService, unique: bool = True) -> None:
    await service.fields.define(
        ADMIN, "person", FieldDefinitionInput("member_no", "Member number", "text", unique=unique)
    )


async def created(service: ContactsService, new: NewPerson) -> str:
    return str((await service.create_person(ADMIN, new)).contact.id)


async def test_a_unique_value_is_refused_to_a_second_contact_normalised(
    service: ContactsService,
) -> None:
    await define_member_no(service)
    ada = await created(service, person(" AB-12 "))
    before = log_length(service.app)

    with pytest.raises(UniqueValueTaken) as taken:
        await service.create_person(ADMIN, person("ab-12", given="Grace"))
    assert (taken.value.field, taken.value.holder) == ("member_no", ada)
    assert "member_no" in taken.value.message and ada in taken.value.message
    assert log_length(service.app) == before

    # Nor by an update; another value is fine, and so is the holder's own change.
    grace = await created(service, person("CD-34", given="Grace"))
    with pytest.raises(UniqueValueTaken):
        await service.update_person(ADMIN, set_member(grace, "Ab-12"))
    await service.update_person(ADMIN, set_member(ada, "ab-12"))  # the same value, its own
    assert (await service.get_contact(grace)).profile.custom_fields["member_no"].value == "CD-34"

    # A changed value frees the old one.
    await service.update_person(ADMIN, set_member(ada, "EF-56"))
    await service.update_person(ADMIN, set_member(grace, "AB-12"))
    alan = await created(service, person("cd-34 ", given="Alan"))  # grace gave it up
    assert (await service.get_contact(alan)).profile.custom_fields["member_no"].value == "cd-34"


async def test_concurrent_creates_with_one_value_leave_one_winner(
    service: ContactsService, store_settings: Settings, clock: Clock
) -> None:
    await define_member_no(service)
    # A second writer on the same store: another replica of the service.
    other = ContactsService(create_application(store_settings), clock=clock)
    try:
        await other.fields.listed("person")
        attempts = [
            (service if i % 2 else other).create_person(ADMIN, person("ZZ-1", given=f"P{i}"))
            for i in range(8)
        ]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    finally:
        other.close()
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(won) == 1, outcomes
    assert all(isinstance(o, UniqueValueTaken) for o in lost), lost
    # The winner holds it (a refusal decided within a batch that then lost to the
    # other writer may name the batch's own claimant; the value is taken either way).
    with pytest.raises(UniqueValueTaken) as taken:
        await service.create_person(ADMIN, person("zz-1", given="Late"))
    assert taken.value.holder == won[0].contact.id


async def test_a_field_no_longer_unique_or_retired_lifts_the_rule(
    service: ContactsService,
) -> None:
    await define_member_no(service)
    ada = await created(service, person("AB-12"))
    await service.fields.revise(ADMIN, "person", FieldRevision("member_no", unique=False))
    grace = await created(service, person("ab-12", given="Grace"))  # allowed now

    # Unique again while two contacts share a value: refused naming them, nothing written.
    before = log_length(service.app)
    with pytest.raises(UniqueConflicts) as shared:
        await service.fields.revise(ADMIN, "person", FieldRevision("member_no", unique=True))
    assert shared.value.conflicts == [sorted([ada, grace])]
    assert ada in shared.value.message and grace in shared.value.message
    assert log_length(service.app) == before
    listed = await service.fields.listed("person")
    assert [d.unique for d in listed.definitions] == [False]

    # Once the duplicate is gone it becomes unique, and the values held then are claimed.
    await service.update_person(ADMIN, set_member(grace, "GH-78"))
    await service.fields.revise(ADMIN, "person", FieldRevision("member_no", unique=True))
    with pytest.raises(UniqueValueTaken) as taken:
        await service.create_person(ADMIN, person("gh-78", given="Alan"))
    assert taken.value.holder == grace

    # Retired, the field takes no values at all; restored, the claims still hold.
    await service.fields.retire(ADMIN, "person", "member_no")
    await service.update_person(
        ADMIN, PersonChanges(id=ada, fields=frozenset({"given_name"}), given_name="Augusta")
    )
    await service.fields.restore(ADMIN, "person", "member_no")
    with pytest.raises(UniqueValueTaken):
        await service.create_person(ADMIN, person("AB-12", given="Alan"))


async def test_a_merge_keeps_working_and_the_tombstone_holds_nothing(
    service: ContactsService,
) -> None:
    await define_member_no(service)
    ada = await created(service, person("AB-12"))
    dup = await created(service, person("CD-34", given="Ada L."))

    await service.merge_contacts(ADMIN, ada, [dup], {})
    # The survivor keeps its own value; the tombstone's is free.
    assert (await service.get_contact(ada)).profile.custom_fields["member_no"].value == "AB-12"
    grace = await created(service, person("cd-34", given="Grace"))
    with pytest.raises(UniqueValueTaken) as taken:
        await service.create_person(ADMIN, person("ab-12", given="Alan"))
    assert taken.value.holder == ada

    # A survivor taking over a merged contact's value holds it from then on.
    bob = await created(service, person(given="Bob"))
    await service.merge_contacts(ADMIN, bob, [grace], {})
    assert (await service.get_contact(bob)).profile.custom_fields["member_no"].value == "cd-34"
    with pytest.raises(UniqueValueTaken) as taken_over:
        await service.create_person(ADMIN, person("CD-34", given="Alan"))
    assert taken_over.value.holder == bob


async def test_an_undone_merge_gives_the_values_back_unless_taken_meanwhile(
    service: ContactsService,
) -> None:
    await define_member_no(service)
    ada = await created(service, person(given="Ada"))
    dup = await created(service, person("CD-34", given="Ada L."))
    merged = await service.merge_contacts(ADMIN, ada, [dup], {})
    await service.undo_merge(ADMIN, ada, merged.outcome.extra["merge_id"])
    # The survivor gave the value back; the contact given back holds it again.
    assert "member_no" not in (await service.get_contact(ada)).profile.custom_fields
    with pytest.raises(UniqueValueTaken) as taken:
        await service.create_person(ADMIN, person("cd-34", given="Grace"))
    assert taken.value.holder == dup

    # Merged again, and the survivor gives the value up; someone else takes it:
    # the undo would make two holders, so it is refused and changes nothing.
    again = await service.merge_contacts(ADMIN, ada, [dup], {})
    await service.update_person(ADMIN, set_member(ada, "EF-56"))
    grace = await created(service, person("CD-34", given="Grace"))
    before = log_length(service.app)
    with pytest.raises(UniqueValueTaken) as refused:
        await service.undo_merge(ADMIN, ada, again.outcome.extra["merge_id"])
    assert refused.value.holder == grace
    assert log_length(service.app) == before


async def test_an_erased_person_holds_no_value(store_settings: Settings, clock: Clock) -> None:
    keyed = dataclasses.replace(store_settings, master_keys=new_master_key("m-unique"))
    service = ContactsService(create_application(keyed), clock=clock)
    try:
        await define_member_no(service)
        ada = await created(service, person("AB-12"))
        await service.erase_person(ADMIN, ada, "DSR-7")
        grace = await created(service, person("ab-12", given="Grace"))
        assert (await service.get_contact(grace)).profile.custom_fields["member_no"].value == (
            "ab-12"
        )
    finally:
        service.close()


# -- gRPC and REST ----------------------------------------------------------------------------


@pytest.fixture
async def stub(sqlite_service: ContactsService, identity: Identity) -> AsyncIterator[Any]:
    gate = gate_for("contacts", identity)
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    service = grpc_service(sqlite_service, gate, identity.pseudonym_key.read_bytes())
    service.add_to_server(service.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield contacts_pb2_grpc.ContactsServiceStub(channel)
    finally:
        await server.stop(grace=None)


async def test_grpc_refuses_a_taken_value_with_already_exists(
    stub: Any, sqlite_service: ContactsService, identity: Identity
) -> None:
    await sqlite_service.fields.define(
        ADMIN, "company", FieldDefinitionInput("vat_no", "VAT number", "text", unique=True)
    )
    acme = await sqlite_service.create_company(
        ADMIN, NewCompany(name="Acme", custom_fields={"vat_no": CustomFieldInput("", "CHE-1")})
    )
    sales = grpc_auth(identity.mint("sales", subject="grace", client="grpc-tests"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateCompany(
            c.CreateCompanyRequest(
                name="Acme Corp", custom_fields={"vat_no": c.CustomFieldValue(value="che-1 ")}
            ),
            metadata=sales,
        )
    assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
    trailers = dict(refused.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info, resource = error_details_pb2.ErrorInfo(), error_details_pb2.ResourceInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(resource)
    assert info.reason == "UNIQUE_VALUE_TAKEN"
    assert dict(info.metadata) == {"field": "vat_no", "contact_id": acme.contact.id}
    assert resource.resource_name == acme.contact.id


async def test_rest_refuses_a_taken_value_with_409(
    sqlite_service: ContactsService, identity: Identity
) -> None:
    app = create_app(
        sqlite_service,
        gate_for("contacts", identity),
        pseudonym_key=identity.pseudonym_key.read_bytes(),
    )
    sales = bearer(identity.mint("sales", subject="grace", client="rest-tests"))
    await define_member_no(sqlite_service)
    ada = await created(sqlite_service, person("AB-12"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://contacts", headers=sales
    ) as http:
        body = {
            "given_name": "Grace",
            "custom_fields": {"member_no": {"type": "text", "value": "ab-12"}},
        }
        refused = await http.post("/persons", json=body)
        assert refused.status_code == 409, refused.text
        answer = refused.json()
        assert (answer["reason"], answer["field"], answer["contact_id"]) == (
            "UNIQUE_VALUE_TAKEN",
            "custom_fields.member_no",
            ada,
        )
        grace = await http.post("/persons", json={**body, "custom_fields": {}})
        patched = await http.patch(
            f"/persons/{grace.json()['id']}",
            json={"custom_fields": {"member_no": {"type": "text", "value": "AB-12"}}},
        )
        assert patched.status_code == 409, patched.text
        assert patched.json()["contact_id"] == ada
