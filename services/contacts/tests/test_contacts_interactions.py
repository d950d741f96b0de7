"""A contact's interactions as their own paged query (ListInteractions), and
GetContact saying how many there are next to the most recent 50.

The application runs on SQLite and PostgreSQL (`service`); the adapters run in
process behind the access gate with real signed tokens of several roles.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
from contacts_support import log_length
from google.rpc import error_details_pb2, status_pb2

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.commands import Caller
from crm_common.errors import ValidationFailed
from crm_common.server import AccessInterceptor
from crm_contacts.application import ContactsService
from crm_contacts.grpc_api import grpc_service
from crm_contacts.inputs import InteractionInput, InteractionQuery, NewPerson
from crm_contacts.rest_api import create_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for, grpc_auth

#: Enough for three pages of 50 (the last one short) and more than GetContact shows.
LOGGED = 120
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


def caller() -> Caller:
    return Caller(actor="grace", client="tests")


async def person(service: ContactsService, given_name: str = "Ada") -> str:
    written = await service.create_person(
        caller(), NewPerson(given_name=given_name, family_name="Lovelace")
    )
    return written.outcome.id


async def log_shuffled(service: ContactsService, contact_id: str) -> list[str]:
    """Logs `LOGGED` interactions at shuffled times, some sharing a time; returns
    their summaries in the order a reader must see them (newest first, and of
    equal times the later logged first)."""
    # 100 distinct minutes, 20 of them twice: ties exercise the logging order.
    minutes = list(range(100)) + list(range(0, 100, 5))
    random.Random(14).shuffle(minutes)
    logged: list[tuple[datetime, int, str]] = []
    for n, minute in enumerate(minutes):
        when = START + timedelta(minutes=minute)
        summary = f"call {n} at minute {minute}"
        await service.log_interaction(
            caller(), InteractionInput(contact_id, "call", summary=summary, occurred_at=when)
        )
        logged.append((when, n, summary))
    return [summary for _, _, summary in sorted(logged, reverse=True)]


async def all_pages(service: ContactsService, contact_id: str) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await service.list_interactions(InteractionQuery(contact_id, page_token=token))
        assert page.total_size == LOGGED
        pages.append([i.summary for i in page.interactions])
        token = page.next_page_token
        if not token:
            return pages


async def test_every_interaction_is_paged_once_newest_first(service: ContactsService) -> None:
    ada = await person(service)
    expected = await log_shuffled(service, ada)

    pages = await all_pages(service, ada)
    assert [len(p) for p in pages] == [50, 50, 20]
    seen = [summary for page in pages for summary in page]
    assert seen == expected
    assert len(set(seen)) == LOGGED

    # GetContact shows the most recent 50 and says how many there are.
    contact = await service.get_contact(ada)
    assert [i.summary for i in contact.interactions] == expected[:50]
    assert contact.interactions_total == LOGGED

    # Another page size pages the same order.
    first = await service.list_interactions(InteractionQuery(ada, page_size=200))
    assert [i.summary for i in first.interactions] == expected
    assert first.next_page_token == ""


async def test_an_interaction_logged_between_pages_neither_repeats_nor_skips_one(
    service: ContactsService,
) -> None:
    ada = await person(service)
    for n in range(5):
        await service.log_interaction(
            caller(),
            InteractionInput(
                ada, "mail", summary=f"mail {n}", occurred_at=START + timedelta(days=n)
            ),
        )
    first = await service.list_interactions(InteractionQuery(ada, page_size=2))
    assert [i.summary for i in first.interactions] == ["mail 4", "mail 3"]
    await service.log_interaction(
        caller(), InteractionInput(ada, "chat", summary="newest", occurred_at=START.replace(2027))
    )
    rest = await service.list_interactions(
        InteractionQuery(ada, page_size=50, page_token=first.next_page_token)
    )
    assert [i.summary for i in rest.interactions] == ["mail 2", "mail 1", "mail 0"]
    assert (rest.next_page_token, rest.total_size) == ("", 6)


async def test_bad_page_sizes_and_tokens_are_refused_naming_the_field(
    service: ContactsService,
) -> None:
    ada = await person(service)
    for query, field in [
        (InteractionQuery(ada, page_size=201), "page_size"),
        (InteractionQuery(ada, page_size=-1), "page_size"),
        (InteractionQuery(ada, page_token="%%%"), "page_token"),
        (InteractionQuery(ada, page_token="bm90IGEgdG9rZW4"), "page_token"),
    ]:
        with pytest.raises(ValidationFailed) as refused:
            await service.list_interactions(query)
        assert [e.field for e in refused.value.errors] == [field]


async def test_a_merged_id_answers_with_the_survivors_interactions(
    service: ContactsService,
) -> None:
    ada = await person(service)
    dupe = await person(service, "Augusta")
    for contact_id, summary in [(ada, "ada's call"), (dupe, "augusta's call")]:
        await service.log_interaction(
            caller(), InteractionInput(contact_id, "call", summary=summary)
        )
    await service.merge_contacts(caller(), ada, [dupe], {})

    page = await service.list_interactions(InteractionQuery(dupe))
    assert (page.contact_id, page.redirected_from, page.total_size) == (ada, dupe, 2)
    assert sorted(i.summary for i in page.interactions) == ["ada's call", "augusta's call"]
    direct = await service.list_interactions(InteractionQuery(ada))
    assert (direct.contact_id, direct.redirected_from) == (ada, None)


# -- the adapters, behind the access gate ------------------------------------------------


@pytest.fixture
async def http(
    sqlite_service: ContactsService, identity: Identity
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        sqlite_service,
        gate_for("contacts", identity),
        pseudonym_key=identity.pseudonym_key.read_bytes(),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://contacts") as client:
        yield client


@pytest.fixture
async def channel(
    sqlite_service: ContactsService, identity: Identity
) -> AsyncIterator[grpc.aio.Channel]:
    gate = gate_for("contacts", identity)
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    service = grpc_service(sqlite_service, gate, identity.pseudonym_key.read_bytes())
    service.add_to_server(service.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
            yield opened
    finally:
        await server.stop(grace=None)


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    bad_request = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(details).details[0].Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


async def test_rest_and_grpc_page_the_same_interactions(
    sqlite_service: ContactsService,
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    identity: Identity,
) -> None:
    ada = await person(sqlite_service)
    expected = await log_shuffled(sqlite_service, ada)
    sales = identity.mint("sales", subject="grace")

    # REST: three pages, then GetContact with its 50 and the total.
    seen: list[str] = []
    token = ""
    while True:
        got = await http.get(
            f"/contacts/{ada}/interactions",
            params={"page_token": token} if token else {},
            headers=bearer(sales),
        )
        assert got.status_code == 200, got.text
        body: dict[str, Any] = got.json()
        assert (body["contact_id"], body["total_size"], body["redirected_from"]) == (
            ada,
            LOGGED,
            None,
        )
        seen.extend(i["summary"] for i in body["interactions"])
        token = body["next_page_token"]
        if not token:
            break
    assert seen == expected
    contact = (await http.get(f"/contacts/{ada}", headers=bearer(sales))).json()
    assert len(contact["interactions"]) == 50
    assert contact["interactions_total"] == LOGGED

    bad = await http.get(
        f"/contacts/{ada}/interactions", params={"page_token": "%%%"}, headers=bearer(sales)
    )
    assert bad.status_code == 422
    assert [d["field"] for d in bad.json()["detail"]] == ["page_token"]
    too_many = await http.get(
        f"/contacts/{ada}/interactions", params={"page_size": 201}, headers=bearer(sales)
    )
    assert [d["field"] for d in too_many.json()["detail"]] == ["page_size"]
    unknown = await http.get(
        "/contacts/00000000-0000-0000-0000-000000000000/interactions", headers=bearer(sales)
    )
    assert unknown.status_code == 404

    # gRPC: the same order, page by page.
    stub: Any = contacts_pb2_grpc.ContactsServiceStub(channel)
    auth = grpc_auth(sales)
    seen = []
    token = ""
    sizes = []
    while True:
        reply = await stub.ListInteractions(
            c.ListInteractionsRequest(contact_id=ada, page_token=token), metadata=auth
        )
        assert (reply.contact_id, reply.total_size) == (ada, LOGGED)
        sizes.append(len(reply.interactions))
        seen.extend(i.summary for i in reply.interactions)
        token = reply.next_page_token
        if not token:
            break
    assert (sizes, seen) == ([50, 50, 20], expected)
    got_contact = (await stub.GetContact(c.GetContactRequest(id=ada), metadata=auth)).contact
    assert (len(got_contact.interactions), got_contact.interactions_total) == (50, LOGGED)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListInteractions(
            c.ListInteractionsRequest(contact_id=ada, page_token="%%%"), metadata=auth
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["page_token"]


async def test_roles_that_may_not_see_interactions_are_refused(
    sqlite_service: ContactsService,
    http: httpx.AsyncClient,
    channel: grpc.aio.Channel,
    identity: Identity,
) -> None:
    ada = await person(sqlite_service)
    await sqlite_service.log_interaction(caller(), InteractionInput(ada, "call", summary="hello"))
    length = log_length(sqlite_service.app)
    stub: Any = contacts_pb2_grpc.ContactsServiceStub(channel)

    # The ERP integration reads contacts but not their interactions: refused, and its
    # GetContact shows neither the interactions nor how many there are.
    erp = identity.mint("erp-integration")
    refused = await http.get(f"/contacts/{ada}/interactions", headers=bearer(erp))
    assert refused.status_code == 403, refused.text
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.ListInteractions(
            c.ListInteractionsRequest(contact_id=ada), metadata=grpc_auth(erp)
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    contact = (await http.get(f"/contacts/{ada}", headers=bearer(erp))).json()
    assert not {"interactions", "interactions_total"} & set(contact)
    message = (await stub.GetContact(c.GetContactRequest(id=ada), metadata=grpc_auth(erp))).contact
    assert (len(message.interactions), message.interactions_total) == (0, 0)

    # Partners may not see interactions either (docs/security.md): refused, even for
    # a contact within their grant.
    partner = identity.mint("partner", subject="acme-system", client="acme")
    outside = await http.get(f"/contacts/{ada}/interactions", headers=bearer(partner))
    assert outside.status_code == 403, outside.text
    assert log_length(sqlite_service.app) == length
    mine = await http.post(
        "/persons",
        json={"given_name": "Charles", "family_name": "Babbage"},
        headers=bearer(partner),
    )
    assert mine.status_code == 201, mine.text
    within = await http.get(f"/contacts/{mine.json()['id']}/interactions", headers=bearer(partner))
    assert within.status_code == 403, within.text

    # Analysts may see interactions, so they may page them.
    analyst = identity.mint("analyst")
    read = await http.get(f"/contacts/{ada}/interactions", headers=bearer(analyst))
    assert [i["summary"] for i in read.json()["interactions"]] == ["hello"]
