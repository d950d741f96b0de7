"""Merging contacts through the application, REST and gRPC: over real event stores
(SQLite and PostgreSQL) for the rules, in process behind the access gate for the
adapters. The merge rules themselves are `test_contacts_merging.py`'s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from contacts_support import Clock, log_length

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.server import AccessInterceptor
from crm_contacts.application import ContactsService
from crm_contacts.domain import PersonProfile
from crm_contacts.grpc_api import grpc_service
from crm_contacts.inputs import (
    ChannelInput,
    ContactQuery,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_contacts.rest_api import create_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for, grpc_auth


def caller(**kw: Any) -> Caller:
    return Caller(actor="grace", client="tests", **kw)


def person(given: str, family: str, email: str, *tags: str) -> NewPerson:
    return NewPerson(
        given_name=given,
        family_name=family,
        channels=[ChannelInput("email", email, True)],
        tags=list(tags),
    )


async def create(service: ContactsService, new: NewPerson) -> str:
    return str((await service.create_person(caller(), new)).outcome.id)


async def log(service: ContactsService, contact_id: str, summary: str) -> str:
    written = await service.log_interaction(
        caller(), InteractionInput(contact_id=contact_id, kind="call", summary=summary)
    )
    return str(written.outcome.extra["interaction_id"])


def emails(view: Any) -> set[str]:
    assert isinstance(view.profile, PersonProfile)
    return {ch.address for ch in view.profile.channels}


async def found(service: ContactsService, email: str) -> list[str]:
    page = await service.list_contacts(ContactQuery(email=email))
    return [v.id for v in page.contacts]


# -- the application, on SQLite and PostgreSQL ------------------------------------------


async def test_two_contacts_merge_and_the_merged_id_reads_as_the_survivor(
    service: ContactsService,
) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com", "vip"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com", "analytical"))
    said = await log(service, dupe, "asked about the engine")

    merged = await service.merge_contacts(caller(), ada, [dupe], {"family_name": dupe})

    assert merged.outcome.id == ada
    # The merge's last event: waiting for this position sees the whole merge.
    assert merged.outcome.position == log_length(service.app)
    view = merged.contact
    assert view.display_name == "Ada King"
    assert emails(view) == {"ada@example.com", "ada.king@example.com"}
    assert set(view.profile.tags) == {"vip", "analytical"}
    assert [i.interaction_id for i in view.interactions] == [said]

    redirected = await service.get_contact(dupe)
    assert redirected.id == ada
    assert redirected.redirected_from == dupe
    assert redirected.display_name == "Ada King"
    assert (await service.get_contact(ada)).redirected_from is None


async def test_three_contacts_merge_into_one(service: ContactsService) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    two = await create(service, person("Ada", "L.", "a.l@example.com"))
    three = await create(service, person("A.", "Lovelace", "al@example.com"))

    merged = await service.merge_contacts(caller(), ada, [two, three], {})

    assert emails(merged.contact) == {"ada@example.com", "a.l@example.com", "al@example.com"}
    for gone in (two, three):
        view = await service.get_contact(gone)
        assert (view.id, view.redirected_from) == (ada, gone)
    assert await found(service, "al@example.com") == [ada]


async def test_a_tombstone_refuses_commands_naming_its_survivor(
    service: ContactsService,
) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com"))
    other = await create(service, person("Charles", "Babbage", "cb@example.com"))
    await service.merge_contacts(caller(), ada, [dupe], {})
    before = log_length(service.app)

    with pytest.raises(RuleViolated, match=ada):
        await service.update_person(
            caller(), PersonChanges(id=dupe, fields=frozenset({"owner"}), owner="bob")
        )
    with pytest.raises(RuleViolated, match=ada):
        await log(service, dupe, "hello?")
    with pytest.raises(RuleViolated, match=ada):
        await service.merge_contacts(caller(), other, [dupe], {})
    with pytest.raises(RuleViolated, match=ada):
        await service.merge_contacts(caller(), dupe, [other], {})
    assert log_length(service.app) == before


async def test_the_search_drops_a_merged_contact_and_lists_it_again_after_undo(
    service: ContactsService,
) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com", "analytical"))
    assert await found(service, "ada.king@example.com") == [dupe]

    merged = await service.merge_contacts(caller(), ada, [dupe], {})
    assert await found(service, "ada.king@example.com") == [ada]
    page = await service.list_contacts(ContactQuery(query="ada"))
    assert [v.id for v in page.contacts] == [ada]
    tagged = await service.list_contacts(ContactQuery(tag="analytical"))
    assert [v.id for v in tagged.contacts] == [ada]

    await service.undo_merge(caller(), ada, merged.outcome.extra["merge_id"])
    assert await found(service, "ada.king@example.com") == [dupe]
    assert await found(service, "ada@example.com") == [ada]
    page = await service.list_contacts(ContactQuery(query="ada"))
    assert sorted(v.id for v in page.contacts) == sorted([ada, dupe])


async def test_undo_restores_both_and_keeps_what_happened_since(
    service: ContactsService, clock: Clock
) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com"))
    theirs = await log(service, dupe, "asked about the engine")
    dupe_before = await service.get_contact(dupe)
    merged = await service.merge_contacts(caller(), ada, [dupe], {"family_name": dupe})
    clock.advance(days=3)
    since = await log(service, ada, "called back after the merge")

    undone = await service.undo_merge(caller(), ada, merged.outcome.extra["merge_id"])

    assert undone.outcome.position == log_length(service.app)
    survivor = undone.contact
    assert survivor.display_name == "Ada Lovelace"
    assert emails(survivor) == {"ada@example.com"}
    assert [i.interaction_id for i in survivor.interactions] == [since]
    back = await service.get_contact(dupe)
    assert (back.id, back.redirected_from) == (dupe, None)
    assert back.profile == dupe_before.profile
    assert [i.interaction_id for i in back.interactions] == [theirs]
    # Both take commands again.
    await log(service, dupe, "welcome back")
    with pytest.raises(RuleViolated, match="undone already"):
        await service.undo_merge(caller(), ada, merged.outcome.extra["merge_id"])


async def test_undo_outside_the_window_is_refused(service: ContactsService, clock: Clock) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com"))
    merged = await service.merge_contacts(caller(), ada, [dupe], {})
    clock.advance(days=30, seconds=1)
    before = log_length(service.app)

    with pytest.raises(RuleViolated, match="undo window"):
        await service.undo_merge(caller(), ada, merged.outcome.extra["merge_id"])
    assert log_length(service.app) == before
    assert (await service.get_contact(dupe)).redirected_from == dupe
    with pytest.raises(NotFound):
        await service.undo_merge(caller(), ada, "no-such-merge")


async def test_a_retried_merge_answers_the_first_outcome(service: ContactsService) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com"))
    first = await service.merge_contacts(caller(request_id="merge-1"), ada, [dupe], {})
    after = log_length(service.app)

    again = await service.merge_contacts(caller(request_id="merge-1"), ada, [dupe], {})

    assert again.outcome.replayed
    assert again.outcome.extra["merge_id"] == first.outcome.extra["merge_id"]
    assert (again.outcome.version, again.outcome.position) == (
        first.outcome.version,
        first.outcome.position,
    )
    assert log_length(service.app) == after


async def test_bad_merges_are_refused_naming_the_field_and_write_nothing(
    service: ContactsService,
) -> None:
    ada = await create(service, person("Ada", "Lovelace", "ada@example.com"))
    dupe = await create(service, person("Ada", "King", "ada.king@example.com"))
    company = (
        await service.create_company(caller(), NewCompany(name="Analytical Engines"))
    ).outcome.id
    unknown = "00000000-0000-4000-8000-000000000000"
    before = log_length(service.app)

    for merged_ids, choices, field in [
        ([ada], {}, "merged_ids[0]"),
        ([], {}, "merged_ids"),
        ([dupe, dupe], {}, "merged_ids[1]"),
        ([company], {}, "merged_ids[0]"),
        ([unknown], {}, "merged_ids[0]"),
        ([dupe, "not an id"], {}, "merged_ids[1]"),
        ([dupe], {"family_name": unknown}, "choices.family_name"),
        ([dupe], {"colour": dupe}, "choices.colour"),
    ]:
        with pytest.raises(ValidationFailed) as refused:
            await service.merge_contacts(caller(), ada, merged_ids, choices)
        assert field in [e.field for e in refused.value.errors], (merged_ids, choices)
    with pytest.raises(NotFound):
        await service.merge_contacts(caller(), unknown, [dupe], {})
    assert log_length(service.app) == before
    assert (await service.get_contact(dupe)).redirected_from is None


# -- the adapters (SQLite: the store is not the point) -----------------------------------


@pytest.fixture
async def http(
    sqlite_service: ContactsService, identity: Identity
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        sqlite_service,
        gate_for("contacts", identity),
        pseudonym_key=identity.pseudonym_key.read_bytes(),
    )
    grace = bearer(identity.mint("sales", subject="grace", client="rest-tests"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://contacts", headers=grace
    ) as client:
        yield client


async def rest_person(http: httpx.AsyncClient, given: str, family: str, email: str) -> str:
    body = {
        "given_name": given,
        "family_name": family,
        "channels": [{"channel": "email", "address": email}],
    }
    response = await http.post("/persons", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_rest_merge_redirect_and_undo(http: httpx.AsyncClient, identity: Identity) -> None:
    ada = await rest_person(http, "Ada", "Lovelace", "ada@example.com")
    dupe = await rest_person(http, "Ada", "King", "ada.king@example.com")

    service_agent = bearer(identity.mint("service"))
    refused = await http.post(
        f"/contacts/{ada}/merge", json={"merged_ids": [dupe]}, headers=service_agent
    )
    assert refused.status_code == 403, refused.text
    bad = await http.post(f"/contacts/{ada}/merge", json={"merged_ids": [ada]})
    assert bad.status_code == 422, bad.text
    assert [d["field"] for d in bad.json()["detail"]] == ["merged_ids[0]"]

    merged = await http.post(
        f"/contacts/{ada}/merge",
        json={"merged_ids": [dupe], "choices": {"family_name": dupe}},
        headers={"Idempotency-Key": "merge-ada"},
    )
    assert merged.status_code == 200, merged.text
    reply = merged.json()
    assert reply["id"] == ada and reply["position"] > 0 and reply["merge_id"]
    assert reply["contact"]["name"] == "Ada King"
    again = await http.post(
        f"/contacts/{ada}/merge",
        json={"merged_ids": [dupe], "choices": {"family_name": dupe}},
        headers={"Idempotency-Key": "merge-ada"},
    )
    assert again.json()["replayed"] and again.json()["merge_id"] == reply["merge_id"]

    read = (await http.get(f"/contacts/{dupe}")).json()
    assert (read["id"], read["redirected_from"]) == (ada, dupe)
    assert (await http.get(f"/contacts/{ada}")).json()["redirected_from"] is None
    tombstone = await http.post(
        f"/contacts/{dupe}/interactions", json={"kind": "call", "summary": "hi"}
    )
    assert tombstone.status_code == 409 and ada in tombstone.text

    undone = await http.post(f"/contacts/{ada}/merges/{reply['merge_id']}/undo")
    assert undone.status_code == 200, undone.text
    assert undone.json()["contact"]["name"] == "Ada Lovelace"
    read = (await http.get(f"/contacts/{dupe}")).json()
    assert (read["id"], read["redirected_from"]) == (dupe, None)
    late = await http.post(f"/contacts/{ada}/merges/{reply['merge_id']}/undo")
    assert late.status_code == 409, late.text


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


async def test_grpc_merge_redirect_and_undo(stub: Any, identity: Identity) -> None:
    sales = grpc_auth(identity.mint("sales", subject="grace", client="grpc-tests"))

    async def new(given: str, family: str, email: str) -> str:
        request = c.CreatePersonRequest(
            given_name=given,
            family_name=family,
            channels=[c.NewChannelIdentity(channel=c.CHANNEL_EMAIL, address=email)],
        )
        return str((await stub.CreatePerson(request, metadata=sales)).result.id)

    ada = await new("Ada", "Lovelace", "ada@example.com")
    dupe = await new("Ada", "King", "ada.king@example.com")
    request = c.MergeContactsRequest(survivor_id=ada, merged_ids=[dupe], request_id="m-1")

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.MergeContacts(request, metadata=grpc_auth(identity.mint("analyst")))
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.MergeContacts(
            c.MergeContactsRequest(survivor_id=ada, merged_ids=[ada]), metadata=sales
        )
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "merged_ids[0]" in (bad.value.details() or "")

    merged = await stub.MergeContacts(request, metadata=sales)
    assert merged.result.id == ada and merged.merge_id
    assert merged.contact.given_name == "Ada"
    read = (await stub.GetContact(c.GetContactRequest(id=dupe), metadata=sales)).contact
    assert (read.id, read.redirected_from) == (ada, dupe)

    undone = await stub.UndoMerge(
        c.UndoMergeRequest(survivor_id=ada, merge_id=merged.merge_id), metadata=sales
    )
    assert undone.result.id == ada
    read = (await stub.GetContact(c.GetContactRequest(id=dupe), metadata=sales)).contact
    assert (read.id, read.redirected_from) == (dupe, "")
