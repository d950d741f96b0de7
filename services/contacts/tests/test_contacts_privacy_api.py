"""Erase and export over the real `crm-contacts serve` process (gRPC and REST),
with the development identity's master keys and real signed tokens.

Only admins may erase or export (a sales user is refused, nothing written);
an erase is audited (the event names the admin), answers a retried
Idempotency-Key with the first outcome, and an erase of an erased person says
so without a new event; the erased person reads `erased: true` with "[erased]"
values and takes no personal data. Contacts' own part of an export
(`ExportPersonalData`) holds every interaction and the whole history; with
the other services down the export fails UNAVAILABLE naming them, and records
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from contacts_support import log_length, sqlite_settings

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from crm_common.privacy import REDACTED
from crm_contacts.application import ContactsApplication, create_application
from crm_contacts.personal_data_client import EXPORTED_SERVICES
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    bearer,
    clean_environment,
    grpc_auth,
    start_process,
    stop_gracefully,
    wait_serving,
)

INTERACTIONS = 55  # more than GetContact shows


@dataclass
class Api:
    contacts: Any
    privacy: Any
    http: httpx.AsyncClient
    store: ContactsApplication
    admin: str
    sales: str

    def events(self) -> int:
        return log_length(self.store)

    def types(self, contact_id: str) -> list[str]:
        return [type(e).__name__ for e in self.store.events.get(uuid.UUID(contact_id))]


@pytest.fixture
async def api(
    tmp_path: Path, identity: Identity, processes: list[subprocess.Popen[bytes]]
) -> AsyncIterator[Api]:
    grpc_port, http_port = free_port(), free_port()
    # The other services "run" where nothing listens: an export cannot be complete.
    down = {f"CRM_{s.upper()}_GRPC_TARGET": f"127.0.0.1:{free_port()}" for s in EXPORTED_SERVICES}
    env = clean_environment(
        tmp_path,
        identity,
        CRM_CONTACTS_GRPC_PORT=str(grpc_port),
        CRM_CONTACTS_HTTP_PORT=str(http_port),
        **down,
    )
    assert "CRM_MASTER_KEYS_FILE" in env, "the development identity provides master keys"
    target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    log = tmp_path / "serve.log"
    server = start_process("contacts", "serve", env, log, processes)
    await wait_serving(target, base, server, log)
    # The test reads the store with the same master keys as the process.
    store = create_application(
        dataclasses.replace(sqlite_settings(tmp_path), master_keys_file=str(identity.master_keys))
    )
    try:
        async with (
            grpc.aio.insecure_channel(target) as channel,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
        ):
            yield Api(
                contacts_pb2_grpc.ContactsServiceStub(channel),
                privacy_pb2_grpc.PersonalDataServiceStub(channel),
                http,
                store,
                identity.mint("admin", subject="root", client="privacy-tests"),
                identity.mint("sales", subject="grace", client="privacy-tests"),
            )
        await stop_gracefully(server, log)
    finally:
        store.close()


async def busy_person(api: Api) -> tuple[str, str]:
    """A person with a company link, consent and many interactions; (id, company id)."""
    auth = grpc_auth(api.sales)
    created = await api.contacts.CreatePerson(
        c.CreatePersonRequest(
            given_name="Emmy",
            family_name="Noether",
            channels=[
                c.NewChannelIdentity(
                    channel=c.CHANNEL_EMAIL,
                    address="emmy.noether@example.org",
                    consent_status=c.CONSENT_STATUS_GRANTED,
                    consent_source="web-form",
                )
            ],
        ),
        metadata=auth,
    )
    person_id = created.result.id
    company = await api.contacts.CreateCompany(
        c.CreateCompanyRequest(name="Mathematisches Institut"), metadata=auth
    )
    await api.contacts.LinkPersonToCompany(
        c.LinkPersonToCompanyRequest(
            person_id=person_id, company_id=company.result.id, role="Lecturer"
        ),
        metadata=auth,
    )
    for n in range(INTERACTIONS):
        await api.contacts.LogInteraction(
            c.LogInteractionRequest(
                contact_id=person_id, kind=c.INTERACTION_KIND_CALL, summary=f"Emmy call {n}"
            ),
            metadata=auth,
        )
    return person_id, company.result.id


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_only_admins_erase_or_export_and_a_refusal_writes_nothing(api: Api) -> None:
    person_id, company_id = await busy_person(api)
    stored = api.events()
    sales = grpc_auth(api.sales)

    for call in (
        api.contacts.ErasePerson(c.ErasePersonRequest(id=person_id), metadata=sales),
        api.contacts.ExportPerson(c.ExportPersonRequest(id=person_id), metadata=sales),
        api.privacy.ExportPersonalData(
            privacy_pb2.ExportPersonalDataRequest(contact_id=person_id), metadata=sales
        ),
    ):
        assert (await refused(call)).code() == grpc.StatusCode.PERMISSION_DENIED
    erase = await api.http.post(
        f"/contacts/{person_id}/erase", json={"reference": "DSR-1"}, headers=bearer(api.sales)
    )
    assert erase.status_code == 403, erase.text
    export = await api.http.get(f"/contacts/{person_id}/export", headers=bearer(api.sales))
    assert export.status_code == 403, export.text

    admin = grpc_auth(api.admin)
    unknown = await refused(
        api.contacts.ErasePerson(c.ErasePersonRequest(id=str(uuid.uuid4())), metadata=admin)
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    company = await refused(
        api.contacts.ErasePerson(c.ErasePersonRequest(id=company_id), metadata=admin)
    )
    assert company.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only a person can be erased" in (company.details() or "")
    bad = await api.http.post(
        f"/contacts/{person_id}/erase",
        json={"reference": "DSR\u0007"},
        headers=bearer(api.admin),
    )
    assert bad.status_code == 422, bad.text
    assert [d["field"] for d in bad.json()["detail"]] == ["reference"]
    missing = await api.http.post(
        f"/contacts/{uuid.uuid4()}/erase", json={"reference": "DSR-1"}, headers=bearer(api.admin)
    )
    assert missing.status_code == 404, missing.text

    assert api.events() == stored
    got = await api.contacts.GetContact(c.GetContactRequest(id=person_id), metadata=admin)
    assert (got.contact.erased, got.contact.given_name) == (False, "Emmy")


async def test_contacts_part_holds_every_interaction_and_an_incomplete_export_is_refused(
    api: Api,
) -> None:
    person_id, company_id = await busy_person(api)
    admin = grpc_auth(api.admin)

    part = await api.privacy.ExportPersonalData(
        privacy_pb2.ExportPersonalDataRequest(contact_id=person_id), metadata=admin
    )
    assert part.service == "contacts"
    document = json.loads(part.document_json)
    contact = document["contact"]
    assert (contact["id"], contact["given_name"], contact["erased"]) == (
        person_id,
        "Emmy",
        False,
    )
    assert len(contact["interactions"]) == contact["interactions_total"] == INTERACTIONS
    assert {i["summary"] for i in contact["interactions"]} == {
        f"Emmy call {n}" for n in range(INTERACTIONS)
    }
    assert document["companies"] == [
        {"company_id": company_id, "company_name": "Mathematisches Institut", "role": "Lecturer"}
    ]
    assert [(r["address"], r["status"], r["source"]) for r in document["consent"]["current"]] == [
        ("emmy.noether@example.org", "granted", "web-form")
    ]
    history = document["history"]
    assert [h["type"] for h in history] == api.types(person_id)
    assert [h["version"] for h in history] == list(range(1, INTERACTIONS + 3))
    assert {h["actor"] for h in history} == {"grace"}
    assert history[0]["fields"]["profile"]["given_name"] == "Emmy"
    assert history[1]["fields"]["role"] == "Lecturer"

    stored = api.events()
    down = await refused(
        api.contacts.ExportPerson(c.ExportPersonRequest(id=person_id), metadata=admin)
    )
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    for service in EXPORTED_SERVICES:
        assert service in (down.details() or "")
    rest = await api.http.get(f"/contacts/{person_id}/export", headers=bearer(api.admin))
    assert rest.status_code == 503, rest.text
    assert "PersonalDataExported" not in api.types(person_id)
    assert api.events() == stored


async def test_an_admin_erases_a_person_once_audited_and_they_read_erased(api: Api) -> None:
    person_id, company_id = await busy_person(api)
    admin = grpc_auth(api.admin)
    key = {"Idempotency-Key": f"erase-{uuid.uuid4()}", **bearer(api.admin)}

    first = await api.http.post(
        f"/contacts/{person_id}/erase", json={"reference": "DSR-2026-0042"}, headers=key
    )
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["already_erased"], body["replayed"]) == (False, False)
    assert (body["contact"]["erased"], body["contact"]["name"]) == (True, REDACTED)
    stored = api.events()
    retried = await api.http.post(
        f"/contacts/{person_id}/erase", json={"reference": "DSR-2026-0042"}, headers=key
    )
    assert retried.status_code == 200, retried.text
    assert (retried.json()["replayed"], retried.json()["version"]) == (True, body["version"])

    again = api.contacts.ErasePerson(
        c.ErasePersonRequest(id=person_id, reference="DSR-2026-0043"), metadata=admin
    )
    reply = await again
    assert reply.already_erased and reply.contact.erased
    assert reply.result.version == body["version"]
    assert api.types(person_id).count("PersonErased") == 1
    assert api.events() == stored

    [erased] = [
        e for e in api.store.events.get(uuid.UUID(person_id)) if type(e).__name__ == "PersonErased"
    ]
    meta = erased.__dict__["_meta"]
    assert (meta["actor"], meta["client"], meta["command"]) == (
        "root",
        "privacy-tests",
        "ErasePerson",
    )

    got = (await api.contacts.GetContact(c.GetContactRequest(id=person_id), metadata=admin)).contact
    assert got.erased is True
    assert (got.name, got.given_name, got.family_name) == (REDACTED, REDACTED, REDACTED)
    assert [ch.address for ch in got.channels] == [REDACTED]
    assert [(a.company_id, a.role) for a in got.affiliations] == [(company_id, REDACTED)]
    assert got.interactions_total == INTERACTIONS
    rest = await api.http.get(f"/contacts/{person_id}", headers=bearer(api.admin))
    assert (rest.json()["erased"], rest.json()["name"]) == (True, REDACTED)

    change = await refused(
        api.contacts.UpdatePerson(
            c.UpdatePersonRequest(id=person_id, update_mask=["given_name"], given_name="Emmy"),
            metadata=admin,
        )
    )
    assert change.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "erased" in (change.details() or "")
    patched = await api.http.patch(
        f"/persons/{person_id}", json={"family_name": "Noether"}, headers=bearer(api.admin)
    )
    assert patched.status_code == 409, patched.text
    assert "erased" in patched.text
    found = await api.http.get(
        "/contacts", params={"email": "emmy.noether@example.org"}, headers=bearer(api.admin)
    )
    assert found.status_code == 200 and found.json()["contacts"] == [], found.text
    assert api.events() == stored
