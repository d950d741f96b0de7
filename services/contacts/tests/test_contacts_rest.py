"""The REST API in process (ASGI), behind the access gate, called with a sales
user's real signed token (who may see every field)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from contacts_support import log_length

from crm_contacts.application import ContactsService
from crm_contacts.rest_api import create_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for

ADA = {
    "given_name": "Ada",
    "family_name": "Lovelace",
    "channels": [
        {
            "channel": "email",
            "address": "Ada@Example.com",
            "preferred": True,
            "consent_status": "granted",
            "consent_source": "web-form:newsletter",
        },
        {"channel": "phone", "address": "+44 20 7946 0018"},
    ],
    "lifecycle_stage": "lead",
    "tags": ["VIP"],
    "custom_fields": {"budget": {"type": "money", "value": "1234.5", "currency": "EUR"}},
    "owner": "grace",
}


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
    grace = bearer(identity.mint("sales", subject="grace", client="rest-tests"))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://contacts", headers=grace
    ) as client:
        yield client


def fields(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    return [d["field"] for d in response.json()["detail"]]


async def create_ada(http: httpx.AsyncClient, **headers: str) -> dict[str, Any]:
    response = await http.post("/persons", json=ADA, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_created_person_reads_back_with_words_and_utc_times(
    http: httpx.AsyncClient,
) -> None:
    body = await create_ada(http)
    assert set(body) == {"id", "version", "position", "replayed", "contact", "possible_duplicates"}
    assert (body["version"], body["replayed"], body["possible_duplicates"]) == (1, False, [])
    assert body["position"] > 0
    contact = body["contact"]
    assert contact["id"] == body["id"]
    assert (contact["kind"], contact["name"], contact["lifecycle_stage"]) == (
        "person",
        "Ada Lovelace",
        "lead",
    )
    assert (contact["domain"], contact["industry"]) == (None, None)
    assert contact["tags"] == ["vip"]
    assert contact["custom_fields"] == {
        "budget": {"type": "money", "value": "1234.50", "currency": "EUR"}
    }
    email, phone = contact["channels"]
    assert (email["channel"], email["address"], email["preferred"]) == (
        "email",
        "ada@example.com",
        True,
    )
    assert email["consent"] == {
        "status": "granted",
        "source": "web-form:newsletter",
        "recorded_at": "2026-11-02T09:00:00Z",
    }
    assert (phone["address"], phone["consent"]) == ("+442079460018", None)
    assert contact["created_at"].endswith("Z")

    got = await http.get(f"/contacts/{body['id']}")
    assert got.status_code == 200
    assert got.json() == contact


async def test_an_idempotency_key_replays_the_create(
    http: httpx.AsyncClient, sqlite_service: ContactsService
) -> None:
    one = await http.post("/persons", json=ADA, headers={"Idempotency-Key": "k-1"})
    length = log_length(sqlite_service.app)
    two = await http.post("/persons", json=ADA, headers={"Idempotency-Key": "k-1"})
    assert (one.status_code, two.status_code) == (201, 200)
    assert two.json()["id"] == one.json()["id"]
    assert two.json()["position"] == one.json()["position"]
    assert (one.json()["replayed"], two.json()["replayed"]) == (False, True)
    assert log_length(sqlite_service.app) == length
    found = await http.get("/contacts", params={"email": "ada@example.com"})
    assert found.json()["total_size"] == 1

    too_long = await http.post("/persons", json=ADA, headers={"Idempotency-Key": "k" * 201})
    assert fields(too_long) == ["request_id"]


async def test_if_match_refuses_a_stale_version_with_409(http: httpx.AsyncClient) -> None:
    ada = await create_ada(http)
    url = f"/persons/{ada['id']}"
    patched = await http.patch(
        url,
        json={"lifecycle_stage": "customer", "given_name": "Augusta"},
        headers={"If-Match": "1"},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2
    contact = patched.json()["contact"]
    assert (contact["given_name"], contact["family_name"], contact["lifecycle_stage"]) == (
        "Augusta",
        "Lovelace",
        "customer",
    )

    conflict = await http.patch(url, json={"given_name": "Byron"}, headers={"If-Match": "1"})
    assert conflict.status_code == 409, conflict.text
    assert "version" in conflict.json()["message"]
    assert (conflict.json()["expected_version"], conflict.json()["actual_version"]) == (1, 2)

    etag_style = await http.patch(url, json={"owner": "ada"}, headers={"If-Match": 'W/"2"'})
    assert etag_style.status_code == 200, etag_style.text
    malformed = await http.patch(url, json={"owner": "x"}, headers={"If-Match": "yesterday"})
    assert fields(malformed) == ["If-Match"]
    got = (await http.get(f"/contacts/{ada['id']}")).json()
    assert (got["version"], got["given_name"], got["owner"]) == (3, "Augusta", "ada")


async def test_a_patch_changes_only_the_fields_it_names(http: httpx.AsyncClient) -> None:
    ada = await create_ada(http)
    url = f"/persons/{ada['id']}"
    patched = await http.patch(
        url,
        json={
            "custom_fields": {"since": {"type": "date", "value": "2020-01-31"}},
            "channels": [{"channel": "email", "address": "ada@example.com"}],
        },
    )
    contact = patched.json()["contact"]
    assert sorted(contact["custom_fields"]) == ["budget", "since"]
    [email] = contact["channels"]
    assert email["consent"]["status"] == "granted"  # kept with the identity
    assert (contact["tags"], contact["owner"]) == (["vip"], "grace")
    removed = await http.patch(url, json={"remove_custom_fields": ["budget"]})
    assert sorted(removed.json()["contact"]["custom_fields"]) == ["since"]

    assert fields(await http.patch(url, json={})) == ["body"]
    assert fields(await http.patch(url, json={"nickname": "Countess"})) == ["nickname"]
    assert fields(await http.patch(url, json={"lifecycle_stage": None})) == ["lifecycle_stage"]
    assert fields(await http.patch(url, json={"lifecycle_stage": "VIP"})) == ["lifecycle_stage"]
    back = await http.patch(url, json={"lifecycle_stage": "subscriber"})
    assert back.status_code == 409
    assert "from lead to subscriber" in back.json()["message"]


async def test_bad_input_is_422_naming_each_field_and_writes_nothing(
    http: httpx.AsyncClient, sqlite_service: ContactsService
) -> None:
    refused = await http.post(
        "/persons",
        json={
            "given_name": "X" * 500,
            "family_name": "Nobody",
            "channels": [{"channel": "phone", "address": "call me maybe"}],
            "custom_fields": {"budget": {"type": "colour", "value": "red"}},
        },
    )
    assert set(fields(refused)) == {
        "given_name",
        "channels[0].address",
        "custom_fields.budget.type",
    }
    assert refused.json()["error"] == "ValidationFailed"
    no_name = await http.post("/companies", json={"domain": "example.com"})
    assert fields(no_name) == ["name"]
    wrong_type = await http.post("/persons", json={"given_name": "Ada", "tags": "vip"})
    assert fields(wrong_type) == ["tags"]
    assert log_length(sqlite_service.app) == 0
    listed = await http.get("/contacts", params={"query": "Nobody"})
    assert listed.json()["total_size"] == 0


async def test_unknown_contacts_are_404(http: httpx.AsyncClient) -> None:
    missing = str(uuid.uuid4())
    for response in (
        await http.get(f"/contacts/{missing}"),
        await http.get("/contacts/not-a-uuid"),
        await http.patch(f"/persons/{missing}", json={"given_name": "X"}),
        await http.patch(f"/companies/{missing}", json={"name": "X"}),
        await http.post(
            f"/contacts/{missing}/interactions", json={"kind": "call", "summary": "to nobody"}
        ),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "NotFound"


async def test_companies_relations_consent_and_interactions(http: httpx.AsyncClient) -> None:
    ada = await create_ada(http)
    person_id = ada["id"]
    company = await http.post(
        "/companies",
        json={"name": "Analytical Engines", "domain": "engines.example", "tags": ["b2b"]},
    )
    assert company.status_code == 201, company.text
    company_id = company.json()["id"]
    assert company.json()["contact"]["kind"] == "company"
    assert company.json()["contact"]["given_name"] is None

    linked = await http.put(
        f"/persons/{person_id}/companies/{company_id}",
        json={"role": "CTO"},
        headers={"If-Match": "1"},
    )
    assert linked.status_code == 200, linked.text
    assert linked.json()["contact"]["affiliations"] == [
        {"company_id": company_id, "company_name": "Analytical Engines", "role": "CTO"}
    ]
    renamed = await http.patch(f"/companies/{company_id}", json={"industry": "machinery"})
    assert renamed.json()["contact"]["industry"] == "machinery"

    consent = await http.post(
        f"/contacts/{person_id}/consents",
        json={
            "channel": "phone",
            "address": "0044 20 7946 0018",
            "status": "granted",
            "source": "call:agent-7",
        },
    )
    assert consent.status_code == 201, consent.text
    phone = consent.json()["contact"]["channels"][1]
    assert (phone["consent"]["status"], phone["consent"]["source"]) == ("granted", "call:agent-7")
    stranger = await http.post(
        f"/contacts/{person_id}/consents",
        json={"channel": "sms", "address": "+41446681800", "status": "granted"},
    )
    assert fields(stranger) == ["address"]

    mail = await http.post(
        f"/contacts/{person_id}/interactions",
        json={
            "kind": "mail",
            "direction": "inbound",
            "channel": "email",
            "summary": "Asked for the notes",
            "occurred_at": "2026-11-01T10:00:00+01:00",
        },
    )
    assert mail.status_code == 201, mail.text
    assert mail.json()["interaction_id"]
    [shown] = mail.json()["contact"]["interactions"]
    assert shown == {
        "interaction_id": mail.json()["interaction_id"],
        "kind": "mail",
        "direction": "inbound",
        "channel": "email",
        "summary": "Asked for the notes",
        "occurred_at": "2026-11-01T09:00:00Z",
        "owner": "",
    }
    naive = await http.post(
        f"/contacts/{person_id}/interactions",
        json={"kind": "call", "summary": "x", "occurred_at": "2026-11-01T10:00:00"},
    )
    assert fields(naive) == ["occurred_at"]

    unlinked = await http.delete(f"/persons/{person_id}/companies/{company_id}")
    assert unlinked.status_code == 200
    assert unlinked.json()["contact"]["affiliations"] == []
    again = await http.delete(f"/persons/{person_id}/companies/{company_id}")
    assert again.status_code == 409
    assert again.json()["error"] == "RuleViolated"


async def test_search_filters_and_pages(http: httpx.AsyncClient) -> None:
    ada = (await create_ada(http))["id"]
    others = []
    for name in ("Grace", "Hedy", "Katherine", "Mary"):
        response = await http.post(
            "/persons", json={"given_name": name, "family_name": "Pioneer", "tags": ["pioneer"]}
        )
        others.append(response.json()["id"])
    company = (await http.post("/companies", json={"name": "Pioneer Works"})).json()["id"]

    async def ids(**params: Any) -> list[str]:
        response = await http.get("/contacts", params=params)
        assert response.status_code == 200, response.text
        return [x["id"] for x in response.json()["contacts"]]

    assert await ids(email="ADA@example.com") == [ada]
    assert await ids(phone="+44 (20) 7946-0018") == [ada]
    assert await ids(tag="Pioneer") == others
    assert await ids(query="pioneer", kind="company") == [company]
    assert await ids(query="pioneer", kind="person") == others

    seen: list[str] = []
    token = ""
    while True:
        response = await http.get(
            "/contacts", params={"query": "pioneer", "page_size": 2, "page_token": token}
        )
        page = response.json()
        assert page["total_size"] == 5
        seen.extend(x["id"] for x in page["contacts"])
        token = page["next_page_token"]
        if not token:
            break
    assert seen == [*others, company]

    assert fields(await http.get("/contacts", params={"page_size": "many"})) == ["page_size"]
    assert fields(await http.get("/contacts", params={"page_size": 201})) == ["page_size"]
    assert fields(await http.get("/contacts", params={"kind": "robot"})) == ["kind"]
    assert fields(await http.get("/contacts", params={"page_token": "%%%"})) == ["page_token"]


async def test_the_openapi_document_describes_the_api(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    routes = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == {
        ("/persons", "post"),
        ("/persons/{person_id}", "patch"),
        ("/companies", "post"),
        ("/companies/{company_id}", "patch"),
        ("/persons/{person_id}/companies/{company_id}", "put"),
        ("/persons/{person_id}/companies/{company_id}", "delete"),
        ("/contacts/{contact_id}/consents", "post"),
        ("/contacts/{contact_id}/interactions", "post"),
        ("/contacts/{contact_id}/interactions", "get"),
        ("/contacts/{survivor_id}/merge", "post"),
        ("/contacts/{survivor_id}/merges/{merge_id}/undo", "post"),
        ("/contacts/{contact_id}", "get"),
        ("/contacts/{contact_id}/erase", "post"),
        ("/contacts/{contact_id}/export", "get"),
        ("/contacts", "get"),
        ("/custom-fields/{kind}", "get"),
        ("/custom-fields/{kind}", "post"),
        ("/custom-fields/{kind}/{key}", "patch"),
        ("/custom-fields/{kind}/{key}/retire", "post"),
        ("/custom-fields/{kind}/{key}/restore", "post"),
        ("/imports", "post"),
        ("/imports/{import_id}", "get"),
        ("/imports/{import_id}/failures", "get"),
        ("/duplicates/check", "post"),
        ("/contacts/{contact_id}/duplicates", "get"),
        ("/duplicates", "get"),
    }
    schemas = document["components"]["schemas"]
    channel = schemas["NewChannelIdentity"]["properties"]["channel"]
    assert "email" in channel["enum"] and channel["description"]
    assert all(p.get("description") for p in schemas["PersonCreate"]["properties"].values())
    patch = document["paths"]["/persons/{person_id}"]["patch"]
    headers = {p["name"] for p in patch["parameters"] if p["in"] == "header"}
    assert headers == {"If-Match", "Idempotency-Key"}
    search = document["paths"]["/contacts"]["get"]
    assert {p["name"] for p in search["parameters"]} == {
        "query",
        "email",
        "phone",
        "tag",
        "kind",
        "page_size",
        "page_token",
    }
    # Each route carries its gRPC method's name: one line of access.yaml governs both.
    operations = {
        operation["operationId"]
        for item in document["paths"].values()
        for operation in item.values()
    }
    assert operations == {
        "CreatePerson",
        "UpdatePerson",
        "CreateCompany",
        "UpdateCompany",
        "LinkPersonToCompany",
        "UnlinkPersonFromCompany",
        "RecordConsent",
        "LogInteraction",
        "MergeContacts",
        "UndoMerge",
        "GetContact",
        "ErasePerson",
        "ExportPerson",
        "ListContacts",
        "ListInteractions",
        "ListCustomFields",
        "DefineCustomField",
        "ReviseCustomField",
        "RetireCustomField",
        "RestoreCustomField",
        "ImportContacts",
        "GetImport",
        "GetImportFailures",
        "CheckDuplicates",
        "ListContactDuplicates",
        "ScanDuplicates",
    }
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["security"] == [{"bearer": []}]
            assert {"401", "403"} <= set(operation["responses"])
    # Fields some roles do not see may be left out of a contact.
    contact = next(v for k, v in schemas.items() if k.startswith("Contact") and "kind" in str(v))
    assert not {"custom_fields", "interactions", "interactions_total"} & set(contact["required"])


@pytest.mark.parametrize("number", ["1e999999", "1e-999999", "9e999998"])
async def test_a_number_too_large_to_write_out_is_refused_and_nothing_is_stored(
    http: httpx.AsyncClient, sqlite_service: ContactsService, number: str
) -> None:
    ada = await create_ada(http)
    length = log_length(sqlite_service.app)
    field = {"budget": {"type": "number", "value": number}}
    created = await http.post("/persons", json={"family_name": "Byron", "custom_fields": field})
    patched = await http.patch(f"/persons/{ada['id']}", json={"custom_fields": field})
    for reply in (created, patched):
        assert reply.status_code == 422, reply.text
        assert reply.json()["detail"][0]["field"] == "custom_fields.budget.value"
        assert len(reply.text) < 1000
    assert log_length(sqlite_service.app) == length


async def test_custom_field_definitions_are_an_admins_and_values_follow_them(
    http: httpx.AsyncClient, identity: Identity
) -> None:
    admin = bearer(identity.mint("admin", subject="root", client="rest-tests"))
    segment = {
        "key": "segment",
        "label": "Segment",
        "type": "choice",
        "options": ["smb", "enterprise"],
        "required": True,
    }
    refused = await http.post("/custom-fields/person", json=segment)  # grace is sales
    assert refused.status_code == 403, refused.text
    defined = await http.post("/custom-fields/person", json=segment, headers=admin)
    assert defined.status_code == 201, defined.text
    assert defined.json()["fields"]["definitions"][0]["options"] == ["smb", "enterprise"]
    bad = await http.post(
        "/custom-fields/person", json={**segment, "key": "Bad Key"}, headers=admin
    )
    assert fields(bad) == ["key"]

    # Everyone reads the definitions; a value outside the options is refused.
    listed = await http.get("/custom-fields/person")
    assert listed.status_code == 200 and listed.json()["version"] == 2
    person = {**ADA, "custom_fields": {"segment": {"type": "choice", "value": "huge"}}}
    assert fields(await http.post("/persons", json=person)) == ["custom_fields.segment.value"]
    person["custom_fields"] = {"segment": {"type": "choice", "value": "smb"}}
    created = await http.post("/persons", json=person)
    assert created.status_code == 201, created.text

    grown = await http.patch(
        "/custom-fields/person/segment",
        json={"options": ["smb", "enterprise", "public"]},
        headers=admin,
    )
    assert grown.status_code == 200 and grown.json()["fields"]["definitions"][0]["revision"] == 2
    shrunk = await http.patch(
        "/custom-fields/person/segment", json={"options": ["smb"]}, headers=admin
    )
    assert fields(shrunk) == ["options"]
    retired = await http.post("/custom-fields/person/segment/retire", headers=admin)
    assert [d["retired"] for d in retired.json()["fields"]["definitions"]] == [True]
    contact = (await http.get(f"/contacts/{created.json()['id']}")).json()
    assert "segment" not in contact["custom_fields"]
    assert (
        await http.post("/custom-fields/person/nothing/retire", headers=admin)
    ).status_code == 404
    assert (await http.get("/custom-fields/deal")).status_code == 422
