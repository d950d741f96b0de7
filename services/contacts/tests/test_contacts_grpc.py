"""The gRPC API on a real in-process server behind the access interceptor `serve()`
installs, called with a sales user's real signed token (who may see every field)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from contacts_support import log_length
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.server import AccessInterceptor
from crm_contacts.application import ContactsService
from crm_contacts.grpc_api import grpc_service
from crm_deploy.identity import Identity
from crm_deploy.testing import gate_for, grpc_auth


class WithToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends `token` with every call that names no other."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        metadata = list(client_call_details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.extend(grpc_auth(self.token))
        return await continuation(client_call_details._replace(metadata=metadata), request)


@pytest.fixture
async def stub(sqlite_service: ContactsService, identity: Identity) -> AsyncIterator[Any]:
    """A client of the servicer behind the same interceptor `serve()` installs."""
    gate = gate_for("contacts", identity)
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    service = grpc_service(sqlite_service, gate, identity.pseudonym_key.read_bytes())
    service.add_to_server(service.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    grace = identity.mint("sales", subject="grace", client="grpc-tests")
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=[WithToken(grace)]
        ) as channel:
            yield contacts_pb2_grpc.ContactsServiceStub(channel)
    finally:
        await server.stop(grace=None)


def new_person(**overrides: Any) -> c.CreatePersonRequest:
    request = c.CreatePersonRequest(
        given_name="Ada",
        family_name="Lovelace",
        channels=[
            c.NewChannelIdentity(
                channel=c.CHANNEL_EMAIL,
                address="Ada@Example.com",
                preferred=True,
                consent_status=c.CONSENT_STATUS_GRANTED,
                consent_source="web-form:newsletter",
            )
        ],
        lifecycle_stage=c.LIFECYCLE_STAGE_LEAD,
        tags=["vip"],
        custom_fields={"budget": c.CustomFieldValue(type="money", value="1234.5", currency="EUR")},
        owner="grace",
    )
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    return status_pb2.Status.FromString(details)


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    bad_request = error_details_pb2.BadRequest()
    assert status_details(error).details[0].Unpack(bad_request)
    return [violation.field for violation in bad_request.field_violations]


async def test_a_person_is_created_read_and_found(stub: Any) -> None:
    created = await stub.CreatePerson(new_person())
    assert (created.result.version, created.result.replayed) == (1, False)
    assert created.result.position > 0
    contact = created.contact
    assert contact.id == created.result.id
    assert (contact.kind, contact.name, contact.lifecycle_stage) == (
        c.CONTACT_KIND_PERSON,
        "Ada Lovelace",
        c.LIFECYCLE_STAGE_LEAD,
    )
    assert contact.custom_fields["budget"] == c.CustomFieldValue(
        type="money", value="1234.50", currency="EUR"
    )
    [email] = contact.channels
    assert (email.channel, email.address, email.preferred) == (
        c.CHANNEL_EMAIL,
        "ada@example.com",
        True,
    )
    assert (email.consent.status, email.consent.source) == (
        c.CONSENT_STATUS_GRANTED,
        "web-form:newsletter",
    )

    got = await stub.GetContact(c.GetContactRequest(id=contact.id))
    assert got.contact == contact
    listed = await stub.ListContacts(c.ListContactsRequest(email="ADA@example.com"))
    assert [x.id for x in listed.contacts] == [contact.id]
    assert listed.total_size == 1


async def test_the_actor_and_client_come_from_the_verified_token_not_a_header(
    stub: Any, sqlite_service: ContactsService, identity: Identity
) -> None:
    token = identity.mint("sales", subject="e2e-agent", client="grpc-tests")
    forged = (("x-crm-actor", "mallory"), ("x-crm-client", "forged-client"))
    await stub.CreatePerson(new_person(), metadata=(*grpc_auth(token), *forged))
    recorder: Any = sqlite_service.app.recorder
    [stored] = recorder.select_notifications(1, 10)
    event = sqlite_service.app.mapper.to_domain_event(stored)
    meta = event.__dict__["_meta"]
    assert (meta["actor"], meta["client"], meta["command"]) == (
        "e2e-agent",
        "grpc-tests",
        "CreatePerson",
    )


async def test_updates_follow_the_mask_and_a_stale_version_is_aborted(
    stub: Any, sqlite_service: ContactsService
) -> None:
    person_id = (await stub.CreatePerson(new_person())).result.id
    updated = await stub.UpdatePerson(
        c.UpdatePersonRequest(
            id=person_id,
            expected_version=1,
            update_mask=["family_name", "lifecycle_stage", "tags"],
            given_name="ignored: not in the mask",
            family_name="King",
            lifecycle_stage=c.LIFECYCLE_STAGE_OPPORTUNITY,
            tags=["vip", "board"],
        )
    )
    assert updated.result.version == 2
    assert (updated.contact.given_name, updated.contact.family_name) == ("Ada", "King")
    assert updated.contact.lifecycle_stage == c.LIFECYCLE_STAGE_OPPORTUNITY
    assert list(updated.contact.tags) == ["board", "vip"]

    before = log_length(sqlite_service.app)
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.UpdatePerson(
            c.UpdatePersonRequest(
                id=person_id, expected_version=1, update_mask=["given_name"], given_name="Byron"
            )
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    info = error_details_pb2.ErrorInfo()
    assert status_details(stale.value).details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == (
        "VERSION_CONFLICT",
        {"expected": "1", "actual": "2"},
    )
    assert log_length(sqlite_service.app) == before
    contact = (await stub.GetContact(c.GetContactRequest(id=person_id))).contact
    assert (contact.version, contact.given_name) == (2, "Ada")


async def test_a_retried_request_id_answers_the_first_outcome(
    stub: Any, sqlite_service: ContactsService
) -> None:
    request = new_person(request_id="req-42")
    first = await stub.CreatePerson(request)
    length = log_length(sqlite_service.app)
    again = await stub.CreatePerson(request)
    assert (again.result.id, again.result.version, again.result.position) == (
        first.result.id,
        first.result.version,
        first.result.position,
    )
    assert (first.result.replayed, again.result.replayed) == (False, True)
    assert again.contact == first.contact
    assert log_length(sqlite_service.app) == length

    call = c.LogInteractionRequest(
        request_id="req-43",
        contact_id=first.result.id,
        kind=c.INTERACTION_KIND_CALL,
        summary="once only",
    )
    logged = await stub.LogInteraction(call)
    retried = await stub.LogInteraction(call)
    assert logged.interaction_id and retried.interaction_id == logged.interaction_id
    assert retried.result.replayed

    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await stub.CreateCompany(c.CreateCompanyRequest(request_id="req-42", name="Acme"))
    assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "req-42" in (reused.value.details() or "")
    assert first.result.id not in (reused.value.details() or "")


async def test_bad_input_is_invalid_argument_naming_each_field(
    stub: Any, sqlite_service: ContactsService
) -> None:
    bad = new_person()
    bad.channels[0].address = "not-an-email"
    bad.custom_fields["budget"].type = "colour"
    bad.given_name = "X" * 201
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreatePerson(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == [
        "given_name",
        "custom_fields.budget.type",
        "channels[0].address",
    ]
    assert "channels[0].address" in refused.value.details()
    assert log_length(sqlite_service.app) == 0

    with pytest.raises(grpc.aio.AioRpcError) as unspecified:
        await stub.LogInteraction(
            c.LogInteractionRequest(contact_id=str(uuid.uuid4()), summary="what kind?")
        )
    assert bad_request_fields(unspecified.value) == ["kind"]

    company_id = (await stub.CreateCompany(c.CreateCompanyRequest(name="Acme"))).result.id
    length = log_length(sqlite_service.app)
    with pytest.raises(grpc.aio.AioRpcError) as no_mask:
        await stub.UpdateCompany(c.UpdateCompanyRequest(id=company_id, name="Acme Ltd"))
    assert no_mask.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(no_mask.value) == ["update_mask"]

    with pytest.raises(grpc.aio.AioRpcError) as big_page:
        await stub.ListContacts(c.ListContactsRequest(page_size=500))
    assert bad_request_fields(big_page.value) == ["page_size"]
    assert log_length(sqlite_service.app) == length


async def test_unknown_contacts_are_not_found(stub: Any) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.GetContact(c.GetContactRequest(id=missing))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_details_pb2.ResourceInfo()
    assert status_details(unknown.value).details[0].Unpack(info)
    assert info.resource_name == missing

    for call in (
        stub.LogInteraction(
            c.LogInteractionRequest(
                contact_id=missing, kind=c.INTERACTION_KIND_CALL, summary="to nobody"
            )
        ),
        stub.GetContact(c.GetContactRequest(id="not-a-uuid")),
        stub.UpdatePerson(
            c.UpdatePersonRequest(id=missing, update_mask=["given_name"], given_name="X")
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_relations_consent_and_interactions(stub: Any) -> None:
    person_id = (await stub.CreatePerson(new_person())).result.id
    company = await stub.CreateCompany(
        c.CreateCompanyRequest(
            name="Analytical Engines", domain="Engines.Example", industry="machinery"
        )
    )
    assert (company.contact.kind, company.contact.domain) == (
        c.CONTACT_KIND_COMPANY,
        "engines.example",
    )
    linked = await stub.LinkPersonToCompany(
        c.LinkPersonToCompanyRequest(
            person_id=person_id, company_id=company.result.id, role="CTO", expected_version=1
        )
    )
    assert linked.result.version == 2
    consent = await stub.RecordConsent(
        c.RecordConsentRequest(
            contact_id=person_id,
            channel=c.CHANNEL_EMAIL,
            address="ada@example.com",
            status=c.CONSENT_STATUS_WITHDRAWN,
            source="call:agent-7",
        )
    )
    occurred = Timestamp()
    occurred.FromDatetime(datetime(2026, 10, 1, 12, 0, tzinfo=UTC))
    call = await stub.LogInteraction(
        c.LogInteractionRequest(
            contact_id=person_id,
            kind=c.INTERACTION_KIND_MEETING,
            direction=c.DIRECTION_OUTBOUND,
            channel=c.CHANNEL_PHONE,
            summary="Walked through the analytical engine demo",
            occurred_at=occurred,
            owner="grace",
        )
    )
    assert call.result.position > consent.result.position > linked.result.position

    contact = (await stub.GetContact(c.GetContactRequest(id=person_id))).contact
    assert [(a.company_id, a.company_name, a.role) for a in contact.affiliations] == [
        (company.result.id, "Analytical Engines", "CTO")
    ]
    assert contact.channels[0].consent.status == c.CONSENT_STATUS_WITHDRAWN
    assert contact.channels[0].consent.source == "call:agent-7"
    [meeting] = contact.interactions
    assert meeting.interaction_id == call.interaction_id
    assert (meeting.kind, meeting.direction, meeting.channel, meeting.owner) == (
        c.INTERACTION_KIND_MEETING,
        c.DIRECTION_OUTBOUND,
        c.CHANNEL_PHONE,
        "grace",
    )
    assert meeting.occurred_at == occurred

    unlinked = await stub.UnlinkPersonFromCompany(
        c.UnlinkPersonFromCompanyRequest(person_id=person_id, company_id=company.result.id)
    )
    assert unlinked.result.version == 5
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.UnlinkPersonFromCompany(
            c.UnlinkPersonFromCompanyRequest(person_id=person_id, company_id=company.result.id)
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_lifecycle_move_back_is_a_failed_precondition(stub: Any) -> None:
    person_id = (
        await stub.CreatePerson(new_person(lifecycle_stage=c.LIFECYCLE_STAGE_CUSTOMER))
    ).result.id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.UpdatePerson(
            c.UpdatePersonRequest(
                id=person_id,
                update_mask=["lifecycle_stage"],
                lifecycle_stage=c.LIFECYCLE_STAGE_LEAD,
            )
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "from customer to lead" in refused.value.details()


async def test_list_contacts_pages_through_every_match_once(stub: Any) -> None:
    ids = set()
    for i in range(7):
        created = await stub.CreatePerson(c.CreatePersonRequest(given_name=f"Page{i}", tags=["p"]))
        ids.add(created.result.id)
    await stub.CreateCompany(c.CreateCompanyRequest(name="Page Company", tags=["p"]))
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListContacts(
            c.ListContactsRequest(
                tag="p", kind=c.CONTACT_KIND_PERSON, page_size=3, page_token=token
            )
        )
        assert page.total_size == 7
        seen.extend(x.id for x in page.contacts)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 7 and set(seen) == ids
