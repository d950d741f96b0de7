"""End to end over the real processes: contacts (gRPC and REST) → event
store → relay → Kafka → projector → MongoDB → the 360 view (gRPC and REST)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from crm.contacts.v1 import contacts_pb2 as c
from crm.customer360.v1 import customer360_pb2 as v

# Who the stubs call as (tests/conftest.py): a real token of this user.
E2E_CALLER = ("sales", "e2e-agent")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def new_person(**overrides: Any) -> c.CreatePersonRequest:
    tag = uuid.uuid4().hex[:8]
    request = c.CreatePersonRequest(
        given_name="Ada",
        family_name=f"Lovelace{tag}",
        channels=[
            c.NewChannelIdentity(
                channel=c.CHANNEL_EMAIL,
                address=f"ada.{tag}@example.com",
                preferred=True,
                consent_status=c.CONSENT_STATUS_GRANTED,
                consent_source="web-form:newsletter",
            )
        ],
        lifecycle_stage=c.LIFECYCLE_STAGE_LEAD,
        tags=["vip"],
        custom_fields={"budget": c.CustomFieldValue(type="money", value="1234.50", currency="EUR")},
        owner="grace",
    )
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


async def view(stub: Any, customer_id: str, position: int) -> v.Customer360:
    response = await stub.GetCustomer360(
        v.GetCustomer360Request(
            customer_id=customer_id, wait_for={"contacts": position}, wait_timeout_ms=15000
        )
    )
    return response.customer


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    bad_request = error_details_pb2.BadRequest()
    assert status.details and status.details[0].Unpack(bad_request)
    return [violation.field for violation in bad_request.field_violations]


async def test_grpc_writes_show_in_the_360_view(contacts: Any, customer360: Any) -> None:
    created = await contacts.CreatePerson(new_person())
    person_id = created.result.id
    assert created.result.version == 1 and created.result.position > 0

    doc = await view(customer360, person_id, created.result.position)
    assert doc.given_name == "Ada"
    assert doc.kind == c.CONTACT_KIND_PERSON
    assert doc.lifecycle_stage == c.LIFECYCLE_STAGE_LEAD
    assert list(doc.tags) == ["vip"]
    assert doc.custom_fields["budget"].value == "1234.50"
    assert doc.channels[0].consent.status == c.CONSENT_STATUS_GRANTED
    assert doc.channels[0].consent.source == "web-form:newsletter"

    updated = await contacts.UpdatePerson(
        c.UpdatePersonRequest(
            id=person_id,
            expected_version=1,
            update_mask=["family_name", "lifecycle_stage", "tags"],
            family_name="King",
            lifecycle_stage=c.LIFECYCLE_STAGE_OPPORTUNITY,
            tags=["vip", "board"],
        ),
    )
    assert updated.result.version == 2
    doc = await view(customer360, person_id, updated.result.position)
    assert (doc.given_name, doc.family_name) == ("Ada", "King")
    assert doc.display_name == "Ada King"
    assert doc.lifecycle_stage == c.LIFECYCLE_STAGE_OPPORTUNITY
    assert sorted(doc.tags) == ["board", "vip"]

    company = await contacts.CreateCompany(
        c.CreateCompanyRequest(name=unique("Analytical Engines "), domain="engines.example"),
    )
    linked = await contacts.LinkPersonToCompany(
        c.LinkPersonToCompanyRequest(person_id=person_id, company_id=company.result.id, role="CTO"),
    )
    call = await contacts.LogInteraction(
        c.LogInteractionRequest(
            contact_id=person_id,
            kind=c.INTERACTION_KIND_CALL,
            direction=c.DIRECTION_OUTBOUND,
            channel=c.CHANNEL_PHONE,
            summary="Walked through the analytical engine demo",
        ),
    )
    assert call.interaction_id
    position = max(linked.result.position, call.result.position)
    doc = await view(customer360, person_id, position)
    assert [(m.company_id, m.role) for m in doc.companies] == [(company.result.id, "CTO")]
    assert doc.companies[0].company_name == company.contact.name
    calls = [e for e in doc.timeline if e.kind == "interaction.call"]
    assert [(e.entry_id, e.summary, e.direction) for e in calls] == [
        (call.interaction_id, "Walked through the analytical engine demo", c.DIRECTION_OUTBOUND)
    ]
    assert doc.positions["contacts"] >= position


async def test_the_platform_stores_its_events_in_postgresql(platform: Any, contacts: Any) -> None:
    """The end-to-end tests run on the production event store: a write through
    the contacts API is a row of the contacts schema in PostgreSQL, at the
    position the API answered."""
    import psycopg
    from psycopg.sql import SQL, Identifier

    created = await contacts.CreatePerson(new_person())
    with psycopg.connect(**platform.postgres.connect_kwargs()) as conn:
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'contacts'"
            )
        }
        events = next(t for t in tables if t.endswith("_events") and "snapshot" not in t)
        row = conn.execute(
            SQL("SELECT originator_version FROM {}.{} WHERE notification_id = %s").format(
                Identifier("contacts"), Identifier(events)
            ),
            (created.result.position,),
        ).fetchone()
    assert row == (1,), f"no event at position {created.result.position} in contacts.{events}"


async def test_rest_writes_show_in_the_360_view(platform: Any) -> None:
    email = f"{unique('grace.')}@example.com"
    async with httpx.AsyncClient(timeout=30, headers=platform.headers(*E2E_CALLER)) as http:
        created = await http.post(
            f"{platform.contacts_http}/persons",
            json={
                "given_name": "Grace",
                "family_name": "Hopper",
                "channels": [
                    {
                        "channel": "email",
                        "address": email,
                        "consent_status": "granted",
                        "consent_source": "call:agent-7",
                    }
                ],
                "lifecycle_stage": "lead",
                "tags": ["navy"],
            },
        )
        assert created.status_code == 201, created.text
        body = created.json()
        person_id, position = body["id"], body["position"]

        got = await http.get(
            f"{platform.analytics_http}/customers/{person_id}/360",
            params={"wait_for": f"contacts:{position}", "timeout_ms": 15000},
        )
        assert got.status_code == 200, got.text
        doc = got.json()
        assert doc["display_name"] == "Grace Hopper"
        assert doc["channels"][0]["address"] == email
        assert doc["channels"][0]["consent"]["status"] == "granted"

        patched = await http.patch(
            f"{platform.contacts_http}/persons/{person_id}",
            json={"lifecycle_stage": "customer"},
            headers={"If-Match": str(body["version"])},
        )
        assert patched.status_code == 200, patched.text
        mail = await http.post(
            f"{platform.contacts_http}/contacts/{person_id}/interactions",
            json={
                "kind": "mail",
                "direction": "inbound",
                "channel": "email",
                "summary": "Asked for the COBOL manual",
            },
        )
        assert mail.status_code == 201, mail.text
        position = max(patched.json()["position"], mail.json()["position"])
        got = await http.get(
            f"{platform.analytics_http}/customers/{person_id}/360",
            params={"wait_for": f"contacts:{position}", "timeout_ms": 15000},
        )
        doc = got.json()
        assert doc["lifecycle_stage"] == "customer"
        assert [e["summary"] for e in doc["timeline"] if e["kind"] == "interaction.mail"] == [
            "Asked for the COBOL manual"
        ]

        found = await http.get(f"{platform.contacts_http}/contacts", params={"email": email})
        assert found.status_code == 200
        assert [x["id"] for x in found.json()["contacts"]] == [person_id]


async def test_a_stale_expected_version_is_refused_and_changes_nothing(
    platform: Any, contacts: Any
) -> None:
    created = await contacts.CreatePerson(new_person())
    person_id = created.result.id
    first = await contacts.UpdatePerson(
        c.UpdatePersonRequest(
            id=person_id, expected_version=1, update_mask=["given_name"], given_name="Augusta"
        )
    )
    assert first.result.version == 2

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await contacts.UpdatePerson(
            c.UpdatePersonRequest(
                id=person_id, expected_version=1, update_mask=["given_name"], given_name="Byron"
            )
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED

    async with httpx.AsyncClient(timeout=30, headers=platform.headers(*E2E_CALLER)) as http:
        conflict = await http.patch(
            f"{platform.contacts_http}/persons/{person_id}",
            json={"given_name": "Byron"},
            headers={"If-Match": "1"},
        )
    assert conflict.status_code == 409, conflict.text
    assert "version" in conflict.json()["message"]

    contact = (await contacts.GetContact(c.GetContactRequest(id=person_id))).contact
    assert (contact.version, contact.given_name) == (2, "Augusta")


async def test_a_retried_request_id_writes_once(platform: Any, contacts: Any) -> None:
    request = new_person(request_id=unique("req-"))
    first = await contacts.CreatePerson(request)
    again = await contacts.CreatePerson(request)
    assert again.result.id == first.result.id
    assert again.result.position == first.result.position
    assert (first.result.replayed, again.result.replayed) == (False, True)
    email = request.channels[0].address
    listed = await contacts.ListContacts(c.ListContactsRequest(email=email))
    assert listed.total_size == 1

    key = unique("idem-")
    body = {"given_name": "Katherine", "family_name": unique("Johnson")}
    async with httpx.AsyncClient(timeout=30, headers=platform.headers(*E2E_CALLER)) as http:
        one = await http.post(
            f"{platform.contacts_http}/persons", json=body, headers={"Idempotency-Key": key}
        )
        two = await http.post(
            f"{platform.contacts_http}/persons", json=body, headers={"Idempotency-Key": key}
        )
        assert one.status_code == 201 and two.status_code == 200
        assert one.json()["id"] == two.json()["id"]
        assert two.json()["replayed"] is True
        found = await http.get(
            f"{platform.contacts_http}/contacts", params={"query": body["family_name"]}
        )
    assert found.json()["total_size"] == 1


async def test_bad_input_is_refused_and_writes_nothing(platform: Any, contacts: Any) -> None:
    family = unique("Nobody")
    bad = new_person(family_name=family)
    bad.channels[0].address = "not-an-email"
    bad.custom_fields["budget"].type = "colour"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await contacts.CreatePerson(bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = bad_request_fields(refused.value)
    assert "channels[0].address" in fields
    assert any(f.startswith("custom_fields.budget") for f in fields)

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await contacts.LogInteraction(
            c.LogInteractionRequest(
                contact_id=str(uuid.uuid4()),
                kind=c.INTERACTION_KIND_CALL,
                direction=c.DIRECTION_INBOUND,
                channel=c.CHANNEL_PHONE,
                summary="to nobody",
            )
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    async with httpx.AsyncClient(timeout=30, headers=platform.headers(*E2E_CALLER)) as http:
        rest = await http.post(
            f"{platform.contacts_http}/persons",
            json={
                "given_name": "X" * 500,
                "family_name": family,
                "channels": [{"channel": "phone", "address": "call me maybe"}],
            },
        )
        assert rest.status_code == 422, rest.text
        detail = {d["field"] for d in rest.json()["detail"]}
        assert {"given_name", "channels[0].address"} <= detail
        missing = await http.get(f"{platform.contacts_http}/contacts/{uuid.uuid4()}")
        assert missing.status_code == 404
        listed = await http.get(f"{platform.contacts_http}/contacts", params={"query": family})
    assert listed.json()["total_size"] == 0
