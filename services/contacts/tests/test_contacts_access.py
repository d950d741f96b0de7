"""Identity and access of `crm-contacts serve`, the real process, over both transports.

Every call carries a real signed token of the session's development identity
(the `identity` fixture). Refused calls are refused the same way on gRPC and
REST and change nothing (the event store's notification log is read before
and after); each role sees exactly the fields the access policy gives it; the
actor stored on events is the verified subject, whatever a header claims;
partners reach only the contacts carrying their tag; an idempotency key is
its caller's own and cannot be used to read another request's outcome.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from contacts_support import log_length, sqlite_settings

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.auth.issuer import TokenIssuer, new_private_key_pem
from crm_common.auth.redaction import pseudonym
from crm_contacts.application import ContactsApplication, create_application
from crm_deploy.identity import AUDIENCE, ISSUER, Identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    bearer,
    clean_environment,
    grpc_auth,
    start_process,
    stop_gracefully,
    wait_serving,
)

ADA = {
    "given_name": "Ada",
    "family_name": "Lovelace",
    "channels": [{"channel": "email", "address": "ada@example.com"}],
    "tags": ["vip"],
    "custom_fields": {"budget": {"type": "money", "value": "1234.50", "currency": "EUR"}},
}


@dataclass
class Api:
    """A running `crm-contacts serve`: its gRPC stub, its REST client and its store."""

    stub: Any
    http: httpx.AsyncClient
    store: ContactsApplication
    identity: Identity

    def events(self) -> int:
        """The length of the event store's notification log."""
        return log_length(self.store)

    def stored_meta(self) -> list[dict[str, Any]]:
        """The audit metadata of every stored contact event (command receipts left out)."""
        recorder: Any = self.store.recorder
        events = [
            self.store.mapper.to_domain_event(n) for n in recorder.select_notifications(1, 10_000)
        ]
        return [
            dict(e.__dict__.get("_meta", {}))
            for e in events
            if not type(e).__module__.startswith("crm_common")
        ]


@pytest.fixture
async def api(
    tmp_path: Path, identity: Identity, processes: list[subprocess.Popen[bytes]]
) -> AsyncIterator[Api]:
    grpc_port, http_port = free_port(), free_port()
    env = clean_environment(
        tmp_path,
        identity,
        CRM_CONTACTS_GRPC_PORT=str(grpc_port),
        CRM_CONTACTS_HTTP_PORT=str(http_port),
    )
    target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    log = tmp_path / "serve.log"
    server = start_process("contacts", "serve", env, log, processes)
    await wait_serving(target, base, server, log)
    # The test reads the store with the process's master keys (events are sealed).
    store = create_application(
        dataclasses.replace(sqlite_settings(tmp_path), master_keys_file=str(identity.master_keys))
    )
    try:
        async with (
            grpc.aio.insecure_channel(target) as channel,
            httpx.AsyncClient(base_url=base, timeout=10) as http,
        ):
            yield Api(contacts_pb2_grpc.ContactsServiceStub(channel), http, store, identity)
        await stop_gracefully(server, log)
    finally:
        store.close()


def _b64(part: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def refused_tokens(identity: Identity) -> dict[str, str]:
    """Tokens that must not get in, by why; each would otherwise be an admin's."""
    users_key, kid, now = identity.users_key.read_bytes(), identity.users_kid(), time.time()

    def issuer(
        key: bytes = users_key, iss: str = ISSUER, aud: str = AUDIENCE, at: float = now
    ) -> TokenIssuer:
        return TokenIssuer(key, kid, iss, aud, clock=lambda: at)

    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "roles": ["admin"],
              "client_id": "console", "iat": int(now), "exp": int(now) + 600}  # fmt: skip
    return {
        "expired": issuer(at=now - 7200).mint("mallory", ["admin"], client="console"),
        "not yet valid": issuer().mint(
            "mallory", ["admin"], client="console", not_before=now + 3600
        ),
        "forged signature": issuer(key=new_private_key_pem()).mint(
            "mallory", ["admin"], client="console"
        ),
        "alg none": f"{_b64({'alg': 'none', 'kid': kid, 'typ': 'JWT'})}.{_b64(claims)}.",
        "wrong issuer": issuer(iss="someone-else").mint("mallory", ["admin"], client="console"),
        "wrong audience": issuer(aud="another-api").mint("mallory", ["admin"], client="console"),
        "garbage": "not-a-token",
    }


async def grpc_refusal(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    code: grpc.StatusCode = refused.value.code()
    return code


async def create_ada(api: Api, token: str, **headers: str) -> dict[str, Any]:
    created = await api.http.post("/persons", json=ADA, headers={**bearer(token), **headers})
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    return body


async def test_bad_tokens_wrong_roles_and_partners_outside_their_grant_change_nothing(
    api: Api, identity: Identity
) -> None:
    sales = identity.mint("sales", subject="grace")
    ada = await create_ada(api, sales)
    ada_id = ada["id"]
    await api.http.post(
        f"/contacts/{ada_id}/interactions",
        json={"kind": "call", "summary": "first call"},
        headers=bearer(sales),
    )
    before = api.events()
    contact_before = (await api.http.get(f"/contacts/{ada_id}", headers=bearer(sales))).json()

    # -- not authenticated: 401 with a challenge / UNAUTHENTICATED ------------------------
    unauthenticated: dict[str, dict[str, str]] = {"no token": {}}
    unauthenticated |= {why: bearer(t) for why, t in refused_tokens(identity).items()}
    for why, headers in unauthenticated.items():
        for response in (
            await api.http.post("/persons", json=ADA, headers=headers),
            await api.http.patch(f"/persons/{ada_id}", json={"family_name": "X"}, headers=headers),
            await api.http.get(f"/contacts/{ada_id}", headers=headers),
            await api.http.get("/contacts", headers=headers),
        ):
            assert response.status_code == 401, (why, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer"), why
            assert response.json()["error"] == "Unauthenticated", why
            assert "Ada" not in response.text and "Lovelace" not in response.text
        metadata = tuple(headers.items())
        for call in (
            api.stub.CreatePerson(c.CreatePersonRequest(given_name="Eve"), metadata=metadata),
            api.stub.UpdatePerson(
                c.UpdatePersonRequest(id=ada_id, update_mask=["family_name"], family_name="X"),
                metadata=metadata,
            ),
            api.stub.GetContact(c.GetContactRequest(id=ada_id), metadata=metadata),
            api.stub.ListContacts(c.ListContactsRequest(), metadata=metadata),
        ):
            assert await grpc_refusal(call) == grpc.StatusCode.UNAUTHENTICATED, why

    # -- authenticated, not allowed: 403 / PERMISSION_DENIED ---------------------------------
    forbidden = {
        # Analysts read; they do not register people.
        "wrong role (analyst writes)": (identity.mint("analyst"), "create"),
        # The ERP integration reads contacts; it does not change them.
        "wrong role (erp-integration writes)": (identity.mint("erp-integration"), "update"),
        # The platform's own services may read one contact or look one up by email
        # or phone (a lead converting); they do not browse.
        "wrong role (platform searches)": (
            identity.platform_issuer().mint("service:pipeline", ["platform"], client="pipeline"),
            "list",
        ),
        # A partner reaches only the contacts carrying its tag.
        "partner outside its grant (reads)": (identity.mint("partner", client="acme"), "get"),
        "partner outside its grant (writes)": (identity.mint("partner", client="acme"), "update"),
        "partner outside its grant (logs)": (identity.mint("partner", client="acme"), "log"),
        # A partner whose client has no grant reaches nothing.
        "partner without a grant": (identity.mint("partner", client="globex"), "list"),
    }

    def rest(what: str, token: str) -> Awaitable[httpx.Response]:
        headers = bearer(token)
        if what == "create":
            return api.http.post("/persons", json=ADA, headers=headers)
        if what == "update":
            return api.http.patch(f"/persons/{ada_id}", json={"family_name": "X"}, headers=headers)
        if what == "get":
            return api.http.get(f"/contacts/{ada_id}", headers=headers)
        if what == "list":
            return api.http.get("/contacts", headers=headers)
        return api.http.post(
            f"/contacts/{ada_id}/interactions",
            json={"kind": "call", "summary": "from outside"},
            headers=headers,
        )

    def rpc(what: str, token: str) -> Awaitable[Any]:
        metadata = grpc_auth(token)
        if what == "create":
            return api.stub.CreatePerson(c.CreatePersonRequest(given_name="Eve"), metadata=metadata)
        if what == "update":
            return api.stub.UpdatePerson(
                c.UpdatePersonRequest(id=ada_id, update_mask=["family_name"], family_name="X"),
                metadata=metadata,
            )
        if what == "get":
            return api.stub.GetContact(c.GetContactRequest(id=ada_id), metadata=metadata)
        if what == "list":
            return api.stub.ListContacts(c.ListContactsRequest(), metadata=metadata)
        return api.stub.LogInteraction(
            c.LogInteractionRequest(
                contact_id=ada_id, kind=c.INTERACTION_KIND_CALL, summary="from outside"
            ),
            metadata=metadata,
        )

    for why, (token, what) in forbidden.items():
        response = await rest(what, token)
        assert response.status_code == 403, (why, response.text)
        assert response.json()["error"] == "PermissionDenied", why
        assert "Lovelace" not in response.text
        call = rpc(what, token)
        assert await grpc_refusal(call) == grpc.StatusCode.PERMISSION_DENIED, why

    # Nothing was written, and the contact is as it was.
    assert api.events() == before
    contact_after = (await api.http.get(f"/contacts/{ada_id}", headers=bearer(sales))).json()
    assert contact_after == contact_before
    listed = (await api.http.get("/contacts", headers=bearer(sales))).json()
    assert listed["total_size"] == 1


async def test_each_role_sees_exactly_its_fields_on_both_transports(
    api: Api, identity: Identity
) -> None:
    sales = identity.mint("sales", subject="grace")
    ada = (await create_ada(api, sales))["id"]
    logged = await api.http.post(
        f"/contacts/{ada}/interactions",
        json={"kind": "call", "summary": "asked about the engine"},
        headers=bearer(sales),
    )
    assert logged.status_code == 201, logged.text
    everything = {"custom_fields", "interactions"}

    # One contact: sales, service agents, marketing, analysts and admins see custom fields
    # and interactions; the ERP integration sees neither (REST: left out; gRPC: cleared).
    for role, sees in {
        "sales": everything,
        "service": everything,
        "marketing": everything,
        "analyst": everything,
        "admin": everything,
        "erp-integration": set(),
    }.items():
        token = identity.mint(role)
        got = await api.http.get(f"/contacts/{ada}", headers=bearer(token))
        assert got.status_code == 200, (role, got.text)
        assert everything & set(got.json()) == sees, role
        # Analysts read one contact as they read a list: names as pseudonyms, or any id
        # from a list would read back in clear.
        name = (
            pseudonym("Ada Lovelace", identity.pseudonym_key.read_bytes())
            if role == "analyst"
            else "Ada Lovelace"
        )
        assert got.json()["name"] == name, role
        message = (
            await api.stub.GetContact(c.GetContactRequest(id=ada), metadata=grpc_auth(token))
        ).contact
        shown = {f for f in everything if len(getattr(message, f))}
        assert shown == sees, role
        assert message.name == name, role

    # A search: analysts get names and addresses only as pseudonyms (stable for the
    # platform's key, so counting and joining still work); everyone else in clear.
    key = identity.pseudonym_key.read_bytes()
    for role in ("sales", "service", "analyst"):
        token = identity.mint(role)
        page = (await api.http.get("/contacts", headers=bearer(token))).json()
        [found] = page["contacts"]
        listed = (
            await api.stub.ListContacts(c.ListContactsRequest(), metadata=grpc_auth(token))
        ).contacts[0]
        if role == "analyst":
            masked = [pseudonym(v, key) for v in ("Ada Lovelace", "Ada", "Lovelace")]
            address = pseudonym("ada@example.com", key)
        else:
            masked, address = ["Ada Lovelace", "Ada", "Lovelace"], "ada@example.com"
        assert [found["name"], found["given_name"], found["family_name"]] == masked, role
        assert [listed.name, listed.given_name, listed.family_name] == masked, role
        assert found["channels"][0]["address"] == listed.channels[0].address == address, role
        assert found["custom_fields"] == {
            "budget": {"type": "money", "value": "1234.50", "currency": "EUR"}
        }, role
        assert found["tags"] == list(listed.tags) == ["vip"], role
    assert "Ada" not in json.dumps(
        (await api.http.get("/contacts", headers=bearer(identity.mint("analyst")))).json()
    )

    # The contact echoed by a write follows the same rules as a read.
    partner = identity.mint("partner", subject="acme-system", client="acme")
    mine = await api.http.post("/persons", json=ADA, headers=bearer(partner))
    assert mine.status_code == 201, mine.text
    assert not everything & set(mine.json()["contact"])
    over_grpc = await api.stub.CreatePerson(
        c.CreatePersonRequest(
            given_name="Grace",
            custom_fields={"budget": c.CustomFieldValue(type="text", value="secret")},
        ),
        metadata=grpc_auth(partner),
    )
    assert not over_grpc.contact.custom_fields
    # ... and the partner's own contacts carry its tag.
    assert mine.json()["contact"]["tags"] == ["partner:acme", "vip"]
    assert list(over_grpc.contact.tags) == ["partner:acme"]


async def test_a_partner_works_only_within_its_grant(api: Api, identity: Identity) -> None:
    sales = identity.mint("sales", subject="grace")
    partner = identity.mint("partner", subject="acme-system", client="acme")
    theirs = (await create_ada(api, sales))["id"]
    foreign_company = (
        await api.http.post("/companies", json={"name": "Engines"}, headers=bearer(sales))
    ).json()["id"]

    mine = (await api.http.post("/persons", json=ADA, headers=bearer(partner))).json()["id"]
    own_company = (
        await api.stub.CreateCompany(
            c.CreateCompanyRequest(name="Acme"), metadata=grpc_auth(partner)
        )
    ).result.id
    # Its own contacts: read, changed, related.
    got = await api.http.get(f"/contacts/{mine}", headers=bearer(partner))
    assert got.status_code == 200 and "partner:acme" in got.json()["tags"]
    changed = await api.http.patch(
        f"/persons/{mine}", json={"tags": ["gold"]}, headers=bearer(partner)
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["contact"]["tags"] == ["gold", "partner:acme"]  # its tag stays
    linked = await api.stub.LinkPersonToCompany(
        c.LinkPersonToCompanyRequest(person_id=mine, company_id=own_company, role="buyer"),
        metadata=grpc_auth(partner),
    )
    assert linked.result.version == 3

    before = api.events()
    # A search finds only its own contacts, even when asked for the others by name.
    for params, expected in (
        ({}, [own_company, mine]),
        ({"query": "Lovelace"}, [mine]),
        ({"tag": "gold"}, [mine]),
        ({"tag": "vip"}, []),
        ({"email": "ada@example.com"}, [mine]),
        ({"query": "Engines"}, []),
    ):
        page = (await api.http.get("/contacts", params=params, headers=bearer(partner))).json()
        assert [x["id"] for x in page["contacts"]] == expected, params
        assert page["total_size"] == len(expected)
    listed = await api.stub.ListContacts(
        c.ListContactsRequest(query="Lovelace"), metadata=grpc_auth(partner)
    )
    assert [x.id for x in listed.contacts] == [mine]
    # Anything else is refused, not hidden: reading, changing, relating to it.
    for response in (
        await api.http.get(f"/contacts/{theirs}", headers=bearer(partner)),
        await api.http.patch(f"/persons/{theirs}", json={"owner": "x"}, headers=bearer(partner)),
        await api.http.put(
            f"/persons/{mine}/companies/{foreign_company}", json={}, headers=bearer(partner)
        ),
        await api.http.post(
            f"/contacts/{theirs}/consents",
            json={"channel": "email", "address": "ada@example.com", "status": "withdrawn"},
            headers=bearer(partner),
        ),
        # Nor may it hand a contact to another partner.
        await api.http.patch(
            f"/persons/{mine}", json={"tags": ["partner:globex"]}, headers=bearer(partner)
        ),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "PermissionDenied"
    for call in (
        api.stub.GetContact(c.GetContactRequest(id=theirs), metadata=grpc_auth(partner)),
        api.stub.UpdatePerson(
            c.UpdatePersonRequest(id=theirs, update_mask=["owner"], owner="x", expected_version=9),
            metadata=grpc_auth(partner),
        ),
        api.stub.UnlinkPersonFromCompany(
            c.UnlinkPersonFromCompanyRequest(person_id=theirs, company_id=foreign_company),
            metadata=grpc_auth(partner),
        ),
    ):
        assert await grpc_refusal(call) == grpc.StatusCode.PERMISSION_DENIED
    assert api.events() == before
    # Unknown contacts are unknown to partners too.
    missing = await api.http.get(
        "/contacts/00000000-0000-4000-8000-000000000000", headers=bearer(partner)
    )
    assert missing.status_code == 404


async def test_the_actor_stored_is_the_verified_subject_whatever_a_header_says(
    api: Api, identity: Identity
) -> None:
    token = identity.mint("sales", subject="ada", client="sales-console")
    forged = {"x-crm-actor": "mallory", "x-crm-client": "forged-client"}
    created = await create_ada(api, token, **forged)
    await api.stub.UpdatePerson(
        c.UpdatePersonRequest(id=created["id"], update_mask=["owner"], owner="ada"),
        metadata=(*grpc_auth(token), *forged.items()),
    )
    # A platform service acting for a user: the user is the actor, the service the client.
    service = identity.platform_issuer().mint("service:pipeline", ["platform"], client="pipeline")
    acting = {**bearer(service), "x-crm-acting-user": f"Bearer {token}", **forged}
    assert (await api.http.post("/companies", json={"name": "Engines"}, headers=acting)).is_success
    assert [(m["actor"], m["client"], m["command"]) for m in api.stored_meta()] == [
        ("ada", "sales-console", "CreatePerson"),
        ("ada", "sales-console", "UpdatePerson"),
        ("ada", "pipeline", "CreateCompany"),
    ]


async def test_an_idempotency_key_is_its_callers_own_and_never_answers_another_request(
    api: Api, identity: Identity
) -> None:
    ada_token = identity.mint("sales", subject="ada")
    bob_token = identity.mint("sales", subject="bob")
    key = {"Idempotency-Key": "signup-1"}

    # Two callers, one key, two records: each gets its own outcome.
    first = await create_ada(api, ada_token, **key)
    grace = {**ADA, "given_name": "Grace", "family_name": "Hopper", "channels": []}
    second = await api.http.post("/persons", json=grace, headers={**bearer(bob_token), **key})
    assert second.status_code == 201, second.text
    assert second.json()["id"] != first["id"]
    assert second.json()["contact"]["name"] == "Grace Hopper"
    assert (first["replayed"], second.json()["replayed"]) == (False, False)
    # A real retry is still answered with the first outcome.
    retried = await api.http.post("/persons", json=ADA, headers={**bearer(ada_token), **key})
    assert (retried.status_code, retried.json()["id"], retried.json()["replayed"]) == (
        200,
        first["id"],
        True,
    )

    before = api.events()
    # One caller reusing its key for another request: another payload, another person.
    other_payload = {**ADA, "given_name": "Augusta"}
    refused = [
        await api.http.post("/persons", json=other_payload, headers={**bearer(ada_token), **key}),
        await api.http.patch(
            f"/persons/{second.json()['id']}",
            json={"owner": "ada"},
            headers={**bearer(ada_token), **key},
        ),
    ]
    await api.http.patch(
        f"/persons/{first['id']}",
        json={"owner": "ada"},
        headers={**bearer(ada_token), "Idempotency-Key": "own-1"},
    )
    after_own = api.events()
    refused.append(
        await api.http.patch(
            f"/persons/{second.json()['id']}",
            json={"owner": "ada"},
            headers={**bearer(ada_token), "Idempotency-Key": "own-1"},
        )
    )
    for response in refused:
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "IdempotencyKeyReused"
        for secret in (first["id"], "Ada", "Lovelace", "ada@example.com", "CreatePerson"):
            assert secret not in response.text
    assert api.events() == after_own == before + 2  # only the one genuine update

    # Over gRPC: FAILED_PRECONDITION, and as little said.
    metadata = grpc_auth(ada_token)
    await api.stub.CreatePerson(
        c.CreatePersonRequest(given_name="Hedy", request_id="grpc-1"), metadata=metadata
    )
    length = api.events()
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await api.stub.CreatePerson(
            c.CreatePersonRequest(given_name="Katherine", request_id="grpc-1"), metadata=metadata
        )
    assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Hedy" not in (reused.value.details() or "")
    bob_same_key = await api.stub.CreatePerson(
        c.CreatePersonRequest(given_name="Katherine", request_id="grpc-1"),
        metadata=grpc_auth(bob_token),
    )
    assert not bob_same_key.result.replayed
    assert api.events() == length + 2  # Bob's person and its receipt

    # The first records are unchanged.
    ada_now = (await api.http.get(f"/contacts/{first['id']}", headers=bearer(ada_token))).json()
    assert (ada_now["given_name"], ada_now["version"]) == ("Ada", 2)
    grace_now = await api.http.get(f"/contacts/{second.json()['id']}", headers=bearer(bob_token))
    assert (grace_now.json()["owner"], grace_now.json()["version"]) == ("", 1)


async def test_who_sees_pseudonyms_cannot_search_by_the_values_behind_them(
    api: Api, identity: Identity
) -> None:
    await create_ada(api, identity.mint("sales", subject="grace"))
    analyst, sales = identity.mint("analyst"), identity.mint("sales")
    for params in ({"email": "ada@example.com"}, {"query": "Lovelace"}, {"phone": "+41446681800"}):
        refused = await api.http.get("/contacts", params=params, headers=bearer(analyst))
        assert refused.status_code == 403, (params, refused.text)
        assert "pseudonyms" in refused.json()["message"]
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await api.stub.ListContacts(
            c.ListContactsRequest(email="ada@example.com"), metadata=grpc_auth(analyst)
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Filters that reveal no one stay open; roles that see clear data search as before.
    by_tag = await api.http.get("/contacts", params={"tag": "vip"}, headers=bearer(analyst))
    assert by_tag.status_code == 200 and by_tag.json()["contacts"]
    by_email = await api.http.get(
        "/contacts", params={"email": "ada@example.com"}, headers=bearer(sales)
    )
    assert by_email.status_code == 200 and by_email.json()["contacts"]
