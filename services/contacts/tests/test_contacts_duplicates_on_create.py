"""The duplicate check on create (`CRM_CONTACTS_DUPLICATES_ON_CREATE`): warn lists
the look-alikes with their reasons, refuse writes nothing and names them unless
the request allows a duplicate, off checks nothing; a partner only ever hears of
its own contacts. Over the real stores (SQLite, then PostgreSQL), then over gRPC
and REST behind the access gate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from contacts_support import Clock, log_length, sqlite_settings
from google.rpc import error_details_pb2, status_pb2

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.auth.principal import Principal
from crm_common.commands import Caller
from crm_common.server import AccessInterceptor
from crm_common.settings import Settings
from crm_contacts.already_exists import LikelyDuplicate
from crm_contacts.application import ContactsService, create_application
from crm_contacts.grpc_api import grpc_service
from crm_contacts.inputs import ChannelInput, NewPerson
from crm_contacts.rest_api import create_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for, grpc_auth

WEB = Caller(actor="web-form", client="website")
ACME = Caller(
    actor="acme-system",
    client="acme",
    principal=Principal(subject="acme-system", roles=frozenset({"partner"}), client="acme"),
)


def ada(*channels: ChannelInput, given: str = "Ada", family: str = "Lovelace") -> NewPerson:
    return NewPerson(given_name=given, family_name=family, channels=channels)


def email(address: str) -> ChannelInput:
    return ChannelInput("email", address)


def phone(number: str) -> ChannelInput:
    return ChannelInput("phone", number)


def summary(found: Any) -> list[tuple[str, float, list[str]]]:
    return [(d.contact_id, d.score, [r.detail for r in d.reasons]) for d in found]


@pytest.fixture
def refusing(store_settings: Settings, clock: Clock) -> Iterator[ContactsService]:
    contacts = ContactsService(
        create_application(store_settings), clock=clock, duplicates_on_create="refuse"
    )
    yield contacts
    contacts.close()


async def test_warn_creates_and_lists_the_look_alikes_with_their_reasons(
    service: ContactsService,
) -> None:
    assert service.duplicates_on_create == "warn"  # the default
    first = await service.create_person(WEB, ada(email("Ada@gmail.com")))
    assert first.possible_duplicates == ()
    by_phone = await service.create_person(
        WEB, ada(phone("+41 44 668 18 00"), given="Augusta", family="King")
    )

    again = await service.create_person(
        WEB, ada(email("ada@gmail.com"), phone("+41446681800"), given="A.", family="King")
    )
    assert summary(again.possible_duplicates) == sorted(
        [
            (first.contact.id, 1.0, ["same email ada@gmail.com"]),
            (by_phone.contact.id, 0.9, ["same phone +41446681800"]),
        ],
        key=lambda d: -d[1],
    )
    # Created all the same, and it reads back.
    assert (await service.get_contact(again.contact.id)).id == again.contact.id


async def test_refuse_writes_nothing_and_names_the_look_alikes(
    refusing: ContactsService,
) -> None:
    first = await refusing.create_person(WEB, ada(email("ada@gmail.com")))
    before = log_length(refusing.app)

    with pytest.raises(LikelyDuplicate) as refused:
        await refusing.create_person(WEB, ada(email("ADA@gmail.com"), given="Augusta"))
    assert summary(refused.value.candidates) == [
        (first.contact.id, 1.0, ["same email ada@gmail.com"])
    ]
    assert first.contact.id in refused.value.message
    assert log_length(refusing.app) == before

    # The user looked and says it is someone else: allow_duplicate creates it,
    # still telling which contact it looks like.
    allowed = await refusing.create_person(
        WEB, ada(email("ada@gmail.com"), given="Augusta"), allow_duplicate=True
    )
    assert allowed.contact.id != first.contact.id
    assert [d.contact_id for d in allowed.possible_duplicates] == [first.contact.id]
    assert log_length(refusing.app) > before


async def test_refuse_lets_weak_look_alikes_through_as_a_warning(
    refusing: ContactsService,
) -> None:
    # Names alike and a work domain in common: 0.8 by the default rules, under the
    # refuse threshold (0.9): created, with the warning.
    first = await refusing.create_person(WEB, ada(email("ada@analytical.example")))
    second = await refusing.create_person(
        WEB, ada(email("lovelace@analytical.example"), given="Ada", family="Lovelace")
    )
    [found] = second.possible_duplicates
    assert found.contact_id == first.contact.id
    assert found.score < refusing.duplicate_rules.refuse_threshold
    assert found.reasons[0].rule == "name_domain"


async def test_a_retried_create_is_replayed_not_refused_as_its_own_duplicate(
    refusing: ContactsService,
) -> None:
    caller = Caller(actor="web-form", client="website", request_id="form-42")
    first = await refusing.create_person(caller, ada(email("ada@gmail.com")))
    again = await refusing.create_person(caller, ada(email("ada@gmail.com")))
    assert again.outcome.replayed
    assert again.contact.id == first.contact.id
    assert again.possible_duplicates == ()  # never itself


async def test_off_checks_nothing(store_settings: Settings, clock: Clock) -> None:
    contacts = ContactsService(
        create_application(store_settings), clock=clock, duplicates_on_create="off"
    )
    try:
        await contacts.create_person(WEB, ada(email("ada@gmail.com")))
        second = await contacts.create_person(WEB, ada(email("ada@gmail.com")))
        assert second.possible_duplicates == ()
        assert contacts._duplicate_index is None  # not even opened
    finally:
        contacts.close()


async def test_a_partner_hears_only_of_its_own_contacts(refusing: ContactsService) -> None:
    # Someone else's Ada: a partner creating the same email is neither refused nor
    # told about it (that would say the platform knows this address).
    await refusing.create_person(WEB, ada(email("ada@gmail.com")))
    before = log_length(refusing.app)
    mine = await refusing.create_person(ACME, ada(email("ada@gmail.com")))
    assert mine.possible_duplicates == ()
    assert log_length(refusing.app) > before

    # Its own contact is its to see: the next create is refused naming it only.
    with pytest.raises(LikelyDuplicate) as refused:
        await refusing.create_person(ACME, ada(email("ada@gmail.com"), given="Augusta"))
    assert [d.contact_id for d in refused.value.candidates] == [mine.contact.id]


# -- gRPC and REST ----------------------------------------------------------------------------


@pytest.fixture
async def refusing_sqlite(tmp_path: Path, clock: Clock) -> AsyncIterator[ContactsService]:
    contacts = ContactsService(
        create_application(sqlite_settings(tmp_path)), clock=clock, duplicates_on_create="refuse"
    )
    yield contacts
    contacts.close()


@pytest.fixture
async def stub(refusing_sqlite: ContactsService, identity: Identity) -> AsyncIterator[Any]:
    gate = gate_for("contacts", identity)
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    service = grpc_service(refusing_sqlite, gate, identity.pseudonym_key.read_bytes())
    service.add_to_server(service.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield contacts_pb2_grpc.ContactsServiceStub(channel)
    finally:
        await server.stop(grace=None)


def grpc_person(address: str, given: str = "Ada", **more: Any) -> c.CreatePersonRequest:
    return c.CreatePersonRequest(
        given_name=given,
        family_name="Lovelace",
        channels=[c.NewChannelIdentity(channel=c.CHANNEL_EMAIL, address=address)],
        **more,
    )


async def test_grpc_refuses_with_already_exists_naming_the_candidates(
    stub: Any, refusing_sqlite: ContactsService, identity: Identity
) -> None:
    sales = grpc_auth(identity.mint("sales", subject="grace", client="grpc-tests"))
    first = await stub.CreatePerson(grpc_person("ada@gmail.com"), metadata=sales)
    before = log_length(refusing_sqlite.app)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreatePerson(grpc_person("Ada@gmail.com", "Augusta"), metadata=sales)
    assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert first.result.id in (refused.value.details() or "")
    trailers = dict(refused.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info, resource = error_details_pb2.ErrorInfo(), error_details_pb2.ResourceInfo()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(resource)
    assert (info.reason, info.metadata["contact_ids"]) == ("POSSIBLE_DUPLICATES", first.result.id)
    assert resource.resource_name == first.result.id
    assert "same email ada@gmail.com" in resource.description
    assert log_length(refusing_sqlite.app) == before

    allowed = await stub.CreatePerson(
        grpc_person("ada@gmail.com", "Augusta", allow_duplicate=True), metadata=sales
    )
    [found] = allowed.possible_duplicates
    assert (found.contact_id, found.score, list(found.reasons)) == (
        first.result.id,
        1.0,
        ["same email ada@gmail.com"],
    )


@pytest.fixture
async def http(refusing_sqlite: ContactsService, identity: Identity) -> AsyncIterator[Any]:
    app = create_app(
        refusing_sqlite,
        gate_for("contacts", identity),
        pseudonym_key=identity.pseudonym_key.read_bytes(),
    )
    sales = bearer(identity.mint("sales", subject="grace", client="rest-tests"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://contacts", headers=sales
    ) as client:
        yield client


async def test_rest_answers_409_with_the_candidates_and_allow_duplicate_creates(
    http: httpx.AsyncClient, refusing_sqlite: ContactsService
) -> None:
    person = {
        "given_name": "Ada",
        "family_name": "Lovelace",
        "channels": [{"channel": "phone", "address": "+41 44 668 18 00"}],
    }
    first = await http.post("/persons", json=person)
    assert first.status_code == 201, first.text
    assert first.json()["possible_duplicates"] == []
    before = log_length(refusing_sqlite.app)

    refused = await http.post("/persons", json={**person, "given_name": "Augusta"})
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["reason"] == "POSSIBLE_DUPLICATES"
    assert first.json()["id"] in body["message"]
    assert body["possible_duplicates"] == [
        {
            "contact_id": first.json()["id"],
            "score": 0.9,
            "reasons": [{"rule": "phone", "score": 0.9, "detail": "same phone +41446681800"}],
        }
    ]
    assert log_length(refusing_sqlite.app) == before

    allowed = await http.post(
        "/persons", json={**person, "given_name": "Augusta", "allow_duplicate": True}
    )
    assert allowed.status_code == 201, allowed.text
    assert [d["contact_id"] for d in allowed.json()["possible_duplicates"]] == [first.json()["id"]]
    bad = await http.post("/persons", json={**person, "allow_duplicate": "perhaps"})
    assert bad.status_code == 422
