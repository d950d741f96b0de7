"""Identity and access of `crm-pipeline serve`, the real process, over both transports.

One `crm-contacts serve` and one `crm-pipeline serve` run for the module, both
trusting the session's development identity; every call carries a real signed
token. Refused calls are refused alike on gRPC and REST and change nothing (the
event stores' notification logs are read before and after). A lead conversion
reaches contacts with the pipeline's own credentials and the converting user's
token: contacts names that user as the actor and the pipeline as the client. An
idempotency key is its caller's own and bound to the request it was first used
for.

The contacts process runs under a policy in which administrators may not
register contacts (everything else as shipped), so that a user whose role may
convert leads but not create contacts exists: the contacts service, not only
the pipeline, refuses such a conversion.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import yaml
from pipeline_support import sqlite_settings

from crm.pipeline.v1 import pipeline_pb2 as pb
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_common.auth.access import DEFAULT_POLICY
from crm_common.auth.issuer import TokenIssuer, new_private_key_pem
from crm_contacts.application import ContactsApplication
from crm_contacts.application import create_application as create_contacts
from crm_deploy.identity import AUDIENCE, ISSUER, Identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    bearer,
    clean_environment,
    grpc_auth,
    kill_leftovers,
    start_process,
    stop_gracefully,
    wait_serving,
)
from crm_pipeline.application import PipelineApplication, create_application

pytestmark = pytest.mark.servers

STAGES = [
    {"stage_id": "qualify", "name": "Qualify", "probability": "10", "category": "pipeline"},
    {"stage_id": "won", "name": "Won", "probability": "100", "category": "closed_won"},
    {"stage_id": "lost", "name": "Lost", "probability": "0", "category": "closed_lost"},
]


def _length(app: Any) -> int:
    return int(app.recorder.max_notification_id() or 0)


def _meta(app: Any) -> list[dict[str, Any]]:
    """The audit metadata of every stored event, command receipts left out."""
    events = [app.mapper.to_domain_event(n) for n in app.recorder.select_notifications(1, 10_000)]
    return [
        dict(e.__dict__.get("_meta", {}))
        for e in events
        if not type(e).__module__.startswith("crm_common")
    ]


@dataclass
class Stack:
    """The running processes: the pipeline's stub and REST client, both event stores."""

    stub: Any
    http: httpx.AsyncClient
    pipeline: PipelineApplication
    contacts: ContactsApplication
    identity: Identity

    def events(self) -> tuple[int, int]:
        """The length of both event stores' notification logs (pipeline, contacts)."""
        return _length(self.pipeline), _length(self.contacts)

    async def pipeline_id(self) -> str:
        admin = bearer(self.identity.mint("admin", subject="root"))
        defined = await self.http.post(
            "/pipelines", json={"name": "Sales", "stages": STAGES}, headers=admin
        )
        assert defined.status_code == 201, defined.text
        return str(defined.json()["id"])

    async def deal(self, token: str, pipeline_id: str, amount: str = "1000") -> str:
        opened = await self.http.post(
            "/opportunities",
            json={
                "pipeline_id": pipeline_id,
                "name": "Renewal",
                "customer_id": "company-1",
                "owner": "ann",
                "amount": {"amount": amount, "currency": "EUR"},
                "expected_close_date": "2099-03-31",
            },
            headers=bearer(token),
        )
        assert opened.status_code == 201, opened.text
        return str(opened.json()["id"])

    async def qualified_lead(self, token: str, family_name: str) -> str:
        lead = await self.http.post(
            "/leads",
            json={
                "given_name": "Ada",
                "family_name": family_name,
                "company_name": f"{family_name} Engines",
                "email": f"{family_name.lower()}@example.org",
                "source": "web",
                "owner": "ann",
            },
            headers=bearer(token),
        )
        assert lead.status_code == 201, lead.text
        lead_id = str(lead.json()["id"])
        qualified = await self.http.post(
            f"/leads/{lead_id}/qualify", json={"score": 70}, headers=bearer(token)
        )
        assert qualified.status_code == 200, qualified.text
        return lead_id


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, identity: Identity
) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("pipeline-access")
    policy = yaml.safe_load(DEFAULT_POLICY.read_text())
    for operation in ("CreatePerson", "CreateCompany"):
        roles = policy["operations"]["contacts"][operation]
        policy["operations"]["contacts"][operation] = [r for r in roles if r != "admin"]
    contacts_policy = root / "contacts-access.yaml"
    contacts_policy.write_text(yaml.safe_dump(policy))

    started: list[subprocess.Popen[bytes]] = []
    ports = {name: (free_port(), free_port()) for name in ("contacts", "pipeline")}
    contacts_target = f"127.0.0.1:{ports['contacts'][0]}"
    env = clean_environment(
        root,
        identity,
        CRM_CONTACTS_GRPC_PORT=str(ports["contacts"][0]),
        CRM_CONTACTS_HTTP_PORT=str(ports["contacts"][1]),
        CRM_PIPELINE_GRPC_PORT=str(ports["pipeline"][0]),
        CRM_PIPELINE_HTTP_PORT=str(ports["pipeline"][1]),
        CRM_CONTACTS_GRPC_TARGET=contacts_target,
    )
    logs = {name: root / f"{name}.log" for name in ports}
    contacts = start_process(
        "contacts", "serve", {**env, "CRM_ACCESS_POLICY": str(contacts_policy)},
        logs["contacts"], started,
    )  # fmt: skip
    pipeline = start_process("pipeline", "serve", env, logs["pipeline"], started)
    try:
        await wait_serving(
            contacts_target, f"http://127.0.0.1:{ports['contacts'][1]}", contacts, logs["contacts"]
        )
        target = f"127.0.0.1:{ports['pipeline'][0]}"
        base = f"http://127.0.0.1:{ports['pipeline'][1]}"
        await wait_serving(target, base, pipeline, logs["pipeline"])
        # The processes' master keys (if the identity has them), to read their stores.
        keys = env.get("CRM_MASTER_KEYS_FILE", "")
        pipeline_store = create_application(
            dataclasses.replace(sqlite_settings(root), master_keys_file=keys)
        )
        contacts_store = create_contacts(
            dataclasses.replace(sqlite_settings(root, "contacts"), master_keys_file=keys)
        )
        try:
            async with (
                grpc.aio.insecure_channel(target) as channel,
                httpx.AsyncClient(base_url=base, timeout=20) as http,
            ):
                yield Stack(
                    pipeline_pb2_grpc.PipelineServiceStub(channel),
                    http,
                    pipeline_store,
                    contacts_store,
                    identity,
                )
        finally:
            pipeline_store.close()
            contacts_store.close()
        await stop_gracefully(pipeline, logs["pipeline"])
        await stop_gracefully(contacts, logs["contacts"])
    finally:
        kill_leftovers(started)


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
    }


async def grpc_refusal(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


def _convert(pipeline_id: str, **more: Any) -> dict[str, Any]:
    return {
        "pipeline_id": pipeline_id,
        "amount": {"amount": "5000", "currency": "EUR"},
        "expected_close_date": "2099-06-30",
        **more,
    }


async def test_bad_tokens_and_wrong_roles_are_refused_on_both_transports_and_change_nothing(
    stack: Stack, identity: Identity
) -> None:
    sales = identity.mint("sales", subject="ann")
    pipeline_id = await stack.pipeline_id()
    deal = await stack.deal(sales, pipeline_id)
    lead = await stack.qualified_lead(sales, "Refused")
    before = stack.events()
    deal_before = (await stack.http.get(f"/opportunities/{deal}", headers=bearer(sales))).json()

    # The same six operations on each transport: win, change, convert, define a
    # pipeline, read a deal, the forecast. Each a factory: a call is only made when
    # the test means it to be.
    def rest_calls(headers: dict[str, str]) -> list[Callable[[], Awaitable[httpx.Response]]]:
        http = stack.http
        return [
            lambda: http.post(f"/opportunities/{deal}/win", json={}, headers=headers),
            lambda: http.post(
                f"/opportunities/{deal}/amount",
                json={"amount": "1", "currency": "EUR"},
                headers=headers,
            ),
            lambda: http.post(
                f"/leads/{lead}/convert", json=_convert(pipeline_id), headers=headers
            ),
            lambda: http.post("/pipelines", json={"name": "X", "stages": STAGES}, headers=headers),
            lambda: http.get(f"/opportunities/{deal}", headers=headers),
            lambda: http.get("/forecast", headers=headers),
        ]

    def grpc_calls(metadata: tuple[tuple[str, str], ...]) -> list[Callable[[], Awaitable[Any]]]:
        stub = stack.stub
        return [
            lambda: stub.WinOpportunity(
                pb.WinOpportunityRequest(opportunity_id=deal), metadata=metadata
            ),
            lambda: stub.ChangeAmount(
                pb.ChangeAmountRequest(
                    opportunity_id=deal, amount=pb.Money(amount="1", currency="EUR")
                ),
                metadata=metadata,
            ),
            lambda: stub.ConvertLead(
                pb.ConvertLeadRequest(
                    lead_id=lead,
                    pipeline_id=pipeline_id,
                    amount=pb.Money(amount="5000", currency="EUR"),
                    expected_close_date="2099-06-30",
                ),
                metadata=metadata,
            ),
            lambda: stub.DefinePipeline(pb.DefinePipelineRequest(name="X"), metadata=metadata),
            lambda: stub.GetOpportunity(pb.GetOpportunityRequest(id=deal), metadata=metadata),
            lambda: stub.GetForecast(pb.GetForecastRequest(), metadata=metadata),
        ]

    # -- not authenticated: 401 with a challenge / UNAUTHENTICATED ------------------------
    unauthenticated: dict[str, dict[str, str]] = {"no token": {}}
    unauthenticated |= {why: bearer(t) for why, t in refused_tokens(identity).items()}
    for why, headers in unauthenticated.items():
        for call in rest_calls(headers):
            response = await call()
            assert response.status_code == 401, (why, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer"), why
            assert response.json()["error"] == "Unauthenticated", why
            assert "Renewal" not in response.text
        for rpc in grpc_calls(tuple(headers.items())):
            error = await grpc_refusal(rpc())
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, why

    # -- authenticated, not allowed: 403 / PERMISSION_DENIED -------------------------------
    service_agent, marketing = identity.mint("service"), identity.mint("marketing")
    analyst = identity.mint("analyst")
    platform = identity.platform_issuer().mint("service:contacts", ["platform"], client="contacts")
    forbidden: dict[str, tuple[dict[str, str], list[int]]] = {
        # Service agents and marketing do not close deals, change them or convert leads.
        "service agent": (bearer(service_agent), [0, 1, 2, 3]),
        "marketing": (bearer(marketing), [0, 1, 2, 3]),
        # Analysts read and report; they write nothing.
        "analyst writes": (bearer(analyst), [0, 1, 2, 3]),
        # Pipelines are defined by administrators only.
        "sales defines a pipeline": (bearer(sales), [3]),
        # The platform's own services have no business with deals.
        "a platform service": (bearer(platform), [0, 1, 2, 3, 4, 5]),
        # A user cannot claim to act for another user.
        "a user acting for a user": (
            {**bearer(sales), "x-crm-acting-user": f"Bearer {identity.mint('admin')}"},
            [0, 1, 2, 3, 4, 5],
        ),
    }
    for why, (headers, refused) in forbidden.items():
        rest, rpcs = rest_calls(headers), grpc_calls(tuple(headers.items()))
        for n in refused:
            response = await rest[n]()
            assert response.status_code == 403, (why, n, response.text)
            assert response.json()["error"] == "PermissionDenied", why
            assert "Renewal" not in response.text
            error = await grpc_refusal(rpcs[n]())
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (why, n)

    # Reading is what the analyst's role is for.
    assert (await stack.http.get("/forecast", headers=bearer(analyst))).status_code == 200
    assert stack.events() == before
    after = (await stack.http.get(f"/opportunities/{deal}", headers=bearer(sales))).json()
    assert after == deal_before
    lead_now = await stack.stub.GetLead(pb.GetLeadRequest(id=lead), metadata=grpc_auth(sales))
    assert lead_now.lead.status == pb.LEAD_STATUS_QUALIFIED


async def test_a_conversion_names_the_user_on_the_contacts_side_and_the_pipeline_as_client(
    stack: Stack, identity: Identity
) -> None:
    ada = identity.mint("sales", subject="ada", client="sales-console")
    bea = identity.mint("sales", subject="bea", client="mobile")
    pipeline_id = await stack.pipeline_id()

    # REST: a new person and a new company, related.
    lead = await stack.qualified_lead(ada, "Lovelace")
    converted = await stack.http.post(
        f"/leads/{lead}/convert",
        json=_convert(pipeline_id, create_company=True),
        headers={**bearer(ada), "Idempotency-Key": "convert-lovelace"},
    )
    assert converted.status_code == 201, converted.text
    # gRPC: a new person only.
    other = await stack.qualified_lead(bea, "Babbage")
    reply = await stack.stub.ConvertLead(
        pb.ConvertLeadRequest(
            request_id="convert-babbage",
            lead_id=other,
            pipeline_id=pipeline_id,
            amount=pb.Money(amount="700", currency="EUR"),
            expected_close_date="2099-06-30",
        ),
        metadata=grpc_auth(bea),
    )
    assert reply.lead.status == pb.LEAD_STATUS_CONVERTED

    written = {
        (m["actor"], m["client"], m["command"])
        for m in _meta(stack.contacts)
        if m.get("actor") in ("ada", "bea")
    }
    assert written == {
        ("ada", "pipeline", "CreatePerson"),
        ("ada", "pipeline", "CreateCompany"),
        ("ada", "pipeline", "LinkPersonToCompany"),
        ("bea", "pipeline", "CreatePerson"),
    }
    # Nothing on the contacts side is recorded as done by the pipeline itself.
    assert not [m for m in _meta(stack.contacts) if m.get("actor", "").startswith("service:")]
    # On the pipeline side the user and the application they used.
    conversions = {
        (m["actor"], m["client"]) for m in _meta(stack.pipeline) if m["command"] == "ConvertLead"
    }
    assert {("ada", "sales-console"), ("bea", "mobile")} <= conversions


async def test_a_user_who_may_convert_but_not_register_contacts_is_refused_and_nothing_changes(
    stack: Stack, identity: Identity
) -> None:
    # Under the contacts process's policy administrators may not create contacts,
    # while the pipeline lets them convert leads.
    admin = identity.mint("admin", subject="root")
    pipeline_id = await stack.pipeline_id()
    lead = await stack.qualified_lead(admin, "Refusal")
    before = stack.events()
    refused = await stack.http.post(
        f"/leads/{lead}/convert", json=_convert(pipeline_id), headers=bearer(admin)
    )
    assert refused.status_code == 403, refused.text
    assert "CreatePerson" in refused.json()["message"]
    error = await grpc_refusal(
        stack.stub.ConvertLead(
            pb.ConvertLeadRequest(
                lead_id=lead,
                pipeline_id=pipeline_id,
                amount=pb.Money(amount="5000", currency="EUR"),
                expected_close_date="2099-06-30",
                create_company=True,
            ),
            metadata=grpc_auth(admin),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stack.events() == before
    got = await stack.stub.GetLead(pb.GetLeadRequest(id=lead), metadata=grpc_auth(admin))
    assert (got.lead.status, got.lead.opportunity_id) == (pb.LEAD_STATUS_QUALIFIED, "")


async def test_an_idempotency_key_is_its_callers_own_and_bound_to_its_request(
    stack: Stack, identity: Identity
) -> None:
    ann = identity.mint("sales", subject="ann")
    bob = identity.mint("sales", subject="bob")
    pipeline_id = await stack.pipeline_id()
    first, second = await stack.deal(ann, pipeline_id), await stack.deal(bob, pipeline_id)

    async def change(token: str, deal: str, amount: str, key: str) -> httpx.Response:
        return await stack.http.post(
            f"/opportunities/{deal}/amount",
            json={"amount": amount, "currency": "EUR"},
            headers={**bearer(token), "Idempotency-Key": key},
        )

    # REST: two callers, one key, two records: each gets its own outcome.
    mine = await change(ann, first, "111", "same-key")
    theirs = await change(bob, second, "222", "same-key")
    assert (mine.status_code, theirs.status_code) == (200, 200), (mine.text, theirs.text)
    assert (mine.json()["id"], mine.json()["replayed"]) == (first, False)
    assert (theirs.json()["id"], theirs.json()["replayed"]) == (second, False)
    assert theirs.json()["opportunity"]["amount"]["amount"] == "222.00"
    # gRPC: the same.
    request_id = "same-request-id"
    mine_grpc = await stack.stub.ChangeAmount(
        pb.ChangeAmountRequest(
            request_id=request_id,
            opportunity_id=first,
            amount=pb.Money(amount="333", currency="EUR"),
        ),
        metadata=grpc_auth(ann),
    )
    theirs_grpc = await stack.stub.ChangeAmount(
        pb.ChangeAmountRequest(
            request_id=request_id,
            opportunity_id=second,
            amount=pb.Money(amount="444", currency="EUR"),
        ),
        metadata=grpc_auth(bob),
    )
    assert (mine_grpc.result.id, mine_grpc.result.replayed) == (first, False)
    assert (theirs_grpc.result.id, theirs_grpc.result.replayed) == (second, False)
    assert theirs_grpc.opportunity.amount.amount == "444.00"

    # One caller reusing its key for another request: refused, nothing of the first
    # record said, nothing written, both records as they were.
    before = stack.events()
    seen = {
        d: (await stack.http.get(f"/opportunities/{d}", headers=bearer(ann))).json()
        for d in (first, second)
    }
    reused = await change(ann, second, "999", "same-key")
    assert (reused.status_code, reused.json()["error"]) == (422, "IdempotencyKeyReused")
    assert first not in reused.text and "111" not in reused.text and "333" not in reused.text
    other_amount = await change(ann, first, "999", "same-key")
    assert other_amount.status_code == 422, other_amount.text
    error = await grpc_refusal(
        stack.stub.ChangeAmount(
            pb.ChangeAmountRequest(
                request_id=request_id,
                opportunity_id=second,
                amount=pb.Money(amount="999", currency="EUR"),
            ),
            metadata=grpc_auth(ann),
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert first not in (error.details() or "") and "333" not in (error.details() or "")
    assert stack.events() == before
    for deal, was in seen.items():
        now = (await stack.http.get(f"/opportunities/{deal}", headers=bearer(ann))).json()
        assert now == was
    # The same request again is a retry: the first outcome, nothing written.
    retried = await change(ann, first, "111", "same-key")
    assert (retried.status_code, retried.json()["replayed"]) == (200, True)
    assert retried.json()["id"] == first
    assert stack.events() == before


async def test_a_partner_reads_only_the_leads_it_brought(stack: Stack, identity: Identity) -> None:
    acme = identity.mint("partner", subject="acme-system", client="acme")
    sales = identity.mint("sales", subject="ann")
    lead = {
        "family_name": "Partnered",
        "email": "p@example.org",
        "source": "partner",
        "owner": "ann",
    }
    brought = await stack.http.post("/leads", json=lead, headers=bearer(acme))
    assert brought.status_code == 201, brought.text
    mine = brought.json()["id"]
    # Its own lead on both transports; everyone else (with their roles) sees it too.
    assert (await stack.http.get(f"/leads/{mine}", headers=bearer(acme))).status_code == 200
    got = await stack.stub.GetLead(pb.GetLeadRequest(id=mine), metadata=grpc_auth(acme))
    assert got.lead.family_name == "Partnered"
    assert (await stack.http.get(f"/leads/{mine}", headers=bearer(sales))).status_code == 200

    other = await stack.http.post(
        "/leads", json={**lead, "family_name": "Direct", "source": "web"}, headers=bearer(sales)
    )
    theirs = other.json()["id"]
    before = stack.events()
    refused = await stack.http.get(f"/leads/{theirs}", headers=bearer(acme))
    assert (refused.status_code, refused.json()["error"]) == (403, "PermissionDenied")
    assert "Direct" not in refused.text
    error = await grpc_refusal(
        stack.stub.GetLead(pb.GetLeadRequest(id=theirs), metadata=grpc_auth(acme))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # Deals are not a partner's business at all; a partner without a grant gets nothing.
    assert (await stack.http.get("/opportunities", headers=bearer(acme))).status_code == 403
    stranger = identity.mint("partner", subject="globex-system", client="globex")
    nobody = await stack.http.post("/leads", json=lead, headers=bearer(stranger))
    assert (nobody.status_code, nobody.json()["error"]) == (403, "PermissionDenied")
    error = await grpc_refusal(
        stack.stub.CreateLead(
            pb.CreateLeadRequest(family_name="X", phone="+1", source=pb.LEAD_SOURCE_WEB, owner="a"),
            metadata=grpc_auth(stranger),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stack.events() == before
