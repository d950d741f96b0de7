"""Identity and access over the real `crm-analytics serve` and `project` processes,
on both transports: who is refused, what each role sees of one customer, the
partner's grant, and the audit trail (admins only).

The processes read topics of their own (a prefix per module) into a database
of their own; the events carry the audit headers the relays put on records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pipeline_events as deals
import pytest
from contact_events import at, create_topic, interaction, person_registered, publish
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import MongoClient
from test_processes import start

from crm.customer360.v1 import customer360_pb2, customer360_pb2_grpc
from crm.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from crm_analytics.store import sources
from crm_common.auth.issuer import TokenIssuer, new_private_key_pem
from crm_deploy.identity import AUDIENCE, ISSUER, Identity
from crm_deploy.process import free_port
from crm_deploy.testing import bearer, grpc_auth

PREFIX = f"t{uuid.uuid4().hex[:8]}.crm"
ACME = "p-acme"  # tagged for the partner acme
OTHER = "p-other"  # not tagged


@pytest.fixture(scope="module")
async def api(local_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """serve + project over this module's topics and database, with two customers."""
    identity: Identity = local_stack.identity
    for source in sources():
        await create_topic(local_stack.kafka_bootstrap, f"{PREFIX}.{source}.events")
    tmp = tmp_path_factory.mktemp("analytics-access")
    database = f"analytics_{uuid.uuid4().hex[:10]}"
    grpc_port, http_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        **identity.env(),
        "CRM_MONGO_URL": local_stack.mongo_url,
        "CRM_MONGO_DB": database,
        "CRM_KAFKA_BOOTSTRAP": local_stack.kafka_bootstrap,
        "CRM_DATA_DIR": str(tmp),
        "CRM_TOPIC_PREFIX": PREFIX,
        "CRM_ANALYTICS_GRPC_PORT": str(grpc_port),
        "CRM_ANALYTICS_HTTP_PORT": str(http_port),
    }
    started = [start("serve", env, tmp / "serve.log"), start("project", env, tmp / "project.log")]
    contacts_topic, pipeline_topic = f"{PREFIX}.contacts.events", f"{PREFIX}.pipeline.events"
    bootstrap = local_stack.kafka_bootstrap
    await publish(
        bootstrap,
        contacts_topic,
        [person_registered(ACME, 1, tags=["partner:acme", "vip"])],
        audit={
            "actor": "ada",
            "client": "sales-console",
            "command": "CreatePerson",
            "request_id": "req-ada-1",
        },
    )
    await publish(
        bootstrap,
        contacts_topic,
        [interaction(ACME, 2, "i-1", "asked about the invoice")],
        audit={"actor": "bob", "client": "service-desk", "command": "LogInteraction"},
    )
    await publish(bootstrap, contacts_topic, [person_registered(OTHER, 3, tags=["vip"])])
    await deals.publish(
        bootstrap,
        pipeline_topic,
        [
            deals.pipeline_defined(1),
            deals.opened(ACME, 2, "d-1", "1200.00", name="Gears"),
            deals.won(ACME, 3, "d-1", 2, "1200.00"),
        ],
        audit={"actor": "grace", "client": "sales-console", "command": "WinOpportunity"},
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        if time.monotonic() > deadline or started[0].poll() is not None:
            raise AssertionError((tmp / "serve.log").read_text()[-3000:])
        await asyncio.sleep(0.1)
    base = f"http://127.0.0.1:{http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        admin = bearer(identity.mint("admin"))
        for customer, wait_for in ((ACME, ["contacts:2", "pipeline:3"]), (OTHER, ["contacts:3"])):
            ready = await http.get(
                f"/customers/{customer}/360",
                params=[("wait_for", w) for w in wait_for] + [("timeout_ms", "20000")],
                headers=admin,
            )
            assert ready.status_code == 200, ready.text
        # The pipeline's names come from their own partition: wait for them as well.
        mongo: MongoClient[dict[str, Any]] = MongoClient(local_stack.mongo_url)
        try:
            for _ in range(400):
                if mongo[database].customer360_pipelines.find_one({"_id": deals.PIPELINE}):
                    break
                await asyncio.sleep(0.05)
        finally:
            mongo.close()

        class Api:
            stub = customer360_pb2_grpc.Customer360ServiceStub(channel)
            privacy = privacy_pb2_grpc.PersonalDataServiceStub(channel)

        Api.http = http  # type: ignore[attr-defined]
        Api.identity = identity  # type: ignore[attr-defined]
        Api.tmp = tmp  # type: ignore[attr-defined]
        yield Api
    await channel.close()
    for process in started:
        process.terminate()
        process.wait(15)


def _refusals(identity: Identity) -> dict[str, tuple[str | None, str]]:
    """Tokens that must be refused: (token, what) -> expected kind."""
    past = TokenIssuer(
        identity.users_key.read_bytes(),
        identity.users_kid(),
        ISSUER,
        AUDIENCE,
        clock=lambda: time.time() - 7200,
    )
    forged = TokenIssuer(new_private_key_pem(), identity.users_kid(), ISSUER, AUDIENCE)
    stranger = TokenIssuer(
        identity.users_key.read_bytes(), identity.users_kid(), "elsewhere", AUDIENCE
    )
    users = identity.users_issuer()
    return {
        "no token": (None, "unauthenticated"),
        "expired": (past.mint("ada", ["sales"], client="c"), "unauthenticated"),
        "not yet valid": (
            users.mint("ada", ["sales"], client="c", not_before=time.time() + 3600),
            "unauthenticated",
        ),
        "forged": (forged.mint("ada", ["admin"], client="c"), "unauthenticated"),
        "wrong issuer": (stranger.mint("ada", ["admin"], client="c"), "unauthenticated"),
        "wrong role": (identity.mint("erp-integration"), "denied"),
    }


async def test_every_call_needs_a_valid_token_of_a_listed_role(api: Any) -> None:
    request = customer360_pb2.GetCustomer360Request(customer_id=ACME)
    for what, (token, kind) in _refusals(api.identity).items():
        headers = bearer(token) if token else {}
        for path in (f"/customers/{ACME}/360", f"/audit?customer_id={ACME}"):
            refused = await api.http.get(path, headers=headers)
            expected = 401 if kind == "unauthenticated" else 403
            assert refused.status_code == expected, (what, path, refused.text)
            assert set(refused.json()) == {"error", "message"}, what
            if expected == 401:
                assert refused.headers["www-authenticate"].startswith("Bearer"), what
        metadata = grpc_auth(token) if token else ()
        for call, message in (
            (api.stub.GetCustomer360, request),
            (api.stub.GetAuditTrail, customer360_pb2.GetAuditTrailRequest(customer_id=ACME)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(message, metadata=metadata, timeout=10)
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if kind == "unauthenticated"
                else grpc.StatusCode.PERMISSION_DENIED
            )
            assert error.value.code() == code, (what, error.value.details())
    # Health and the OpenAPI document stay open.
    assert (await api.http.get("/healthz")).status_code == 200
    document = (await api.http.get("/openapi.json")).json()
    assert document["paths"]["/audit"]["get"]["operationId"] == "GetAuditTrail"
    assert document["paths"]["/customers/{customer_id}/360"]["get"]["security"] == [{"bearer": []}]


ALWAYS = {"customer_id", "kind", "display_name", "given_name", "family_name",
          "lifecycle_stage", "owner", "tags", "channels", "companies", "positions",
          "created_at", "updated_at", "erased"}  # fmt: skip


async def test_each_role_sees_exactly_its_fields_on_both_transports(api: Any) -> None:
    views = {}
    for role in ("sales", "service", "partner"):
        token = api.identity.mint(role, client="acme" if role == "partner" else "console")
        reply = await api.http.get(f"/customers/{ACME}/360", headers=bearer(token))
        assert reply.status_code == 200, (role, reply.text)
        message = await api.stub.GetCustomer360(
            customer360_pb2.GetCustomer360Request(customer_id=ACME),
            metadata=grpc_auth(token),
            timeout=10,
        )
        views[role] = (reply.json(), message.customer)

    sales, sales_pb = views["sales"]
    assert set(sales) == ALWAYS | {
        "custom_fields",
        "timeline",
        "deals",
        "lifetime_won_revenue",
        "tickets",
        "loyalty",
    }
    # No case and no membership yet: null, not left out.
    assert (sales["tickets"], sales["loyalty"]) == (None, None)
    assert sales["deals"][0]["amount"] == {"amount": "1200.00", "currency": "EUR"}
    assert sales["lifetime_won_revenue"] == [{"amount": "1200.00", "currency": "EUR"}]
    assert "Deal Gears won (1200.00 EUR)" in [e["summary"] for e in sales["timeline"]]
    assert sales_pb.deals[0].amount.amount == "1200.00"
    assert [m.amount for m in sales_pb.lifetime_won_revenue] == ["1200.00"]
    assert sales_pb.custom_fields["budget"].value == "1234.50"

    # Service agents: the deals and the timeline, but nothing of what the customer is worth.
    service, service_pb = views["service"]
    assert set(service) == ALWAYS | {"custom_fields", "timeline", "deals", "tickets", "loyalty"}
    assert [d["status"] for d in service["deals"]] == ["won"]
    assert "amount" not in service["deals"][0]
    summaries = [e["summary"] for e in service["timeline"]]
    assert "Deal Gears won" in summaries and "Deal Gears opened" in summaries
    assert not any("1200" in s for s in summaries), summaries
    assert "asked about the invoice" in summaries
    assert service_pb.deals[0].stage_id == "won" and not service_pb.deals[0].HasField("amount")
    assert list(service_pb.lifetime_won_revenue) == []
    assert not any("1200" in e.summary for e in service_pb.timeline)
    assert service_pb.custom_fields["budget"].value == "1234.50"

    # The partner: the profile of a customer it was granted, no deals, revenue,
    # timeline or custom fields.
    partner, partner_pb = views["partner"]
    assert set(partner) == ALWAYS
    assert partner["display_name"] == sales["display_name"]
    assert "partner:acme" in partner["tags"]
    assert (list(partner_pb.deals), list(partner_pb.timeline)) == ([], [])
    assert list(partner_pb.lifetime_won_revenue) == [] and not partner_pb.custom_fields
    assert partner_pb.display_name == sales_pb.display_name


async def test_list_timeline_pages_with_the_360_views_redactions_on_both_transports(
    api: Any,
) -> None:
    """ListTimeline through the real `serve`: the same entries as the 360 view's
    timeline, page by page, redacted per role the same way on both transports."""
    replies: dict[str, Any] = {}
    for role in ("sales", "service", "analyst", "partner"):
        token = api.identity.mint(role, client="acme" if role == "partner" else "console")
        pages, entries, page_token = [], [], ""
        while True:
            message = await api.stub.ListTimeline(
                customer360_pb2.ListTimelineRequest(
                    customer_id=ACME, page_size=2, page_token=page_token
                ),
                metadata=grpc_auth(token),
                timeout=10,
            )
            pages.append(message)
            entries += list(message.entries)
            page_token = message.next_page_token
            if not page_token:
                break
        rest = await api.http.get(f"/customers/{ACME}/timeline", headers=bearer(token))
        assert rest.status_code == 200, (role, rest.text)
        view = await api.stub.GetCustomer360(
            customer360_pb2.GetCustomer360Request(customer_id=ACME),
            metadata=grpc_auth(token),
            timeout=10,
        )
        replies[role] = (pages, entries, rest.json(), view.customer)

    pages, entries, rest, view = replies["sales"]
    assert [e.kind for e in entries] == [
        "deal.won",
        "deal.opened",
        "interaction.call",
        "profile.created",
    ]
    assert len(pages) == 2 and {p.total for p in pages} == {4}
    assert list(entries) == list(view.timeline)
    assert [e["summary"] for e in rest["entries"]] == [e.summary for e in entries]
    assert "(1200.00 EUR)" in entries[1].summary
    # Service agents: no amounts in the summaries either.
    _, service, service_rest, _ = replies["service"]
    assert [e.summary for e in service] == [
        e.summary.removesuffix(" (1200.00 EUR)") for e in entries
    ]
    assert service_rest["entries"][1]["summary"] == service[1].summary
    # Analysts: the 360 view's pseudonyms, entry by entry.
    _, analyst, analyst_rest, analyst_view = replies["analyst"]
    assert list(analyst) == list(analyst_view.timeline)
    assert all(e.summary.startswith("pseudonym:") for e in analyst)
    assert [e["summary"] for e in analyst_rest["entries"]] == [e.summary for e in analyst]
    # Partners do not see a timeline in the 360 view: none here either.
    partner_pages, partner, partner_rest, _ = replies["partner"]
    assert partner == [] and partner_pages[0].total == 0
    assert partner_rest["entries"] == [] and partner_rest["total"] == 0

    sales = api.identity.mint("sales")
    for request, field in (
        (customer360_pb2.ListTimelineRequest(customer_id=ACME, page_size=501), "page_size"),
        (customer360_pb2.ListTimelineRequest(customer_id=ACME, page_token="x!"), "page_token"),
        (customer360_pb2.ListTimelineRequest(customer_id=ACME, sources=["billing"]), "sources"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await api.stub.ListTimeline(request, metadata=grpc_auth(sales), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (error.value.details() or ""), error.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await api.stub.ListTimeline(
            customer360_pb2.ListTimelineRequest(customer_id="nobody"),
            metadata=grpc_auth(sales),
            timeout=10,
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_partner_outside_its_grant_is_refused(api: Any) -> None:
    acme = api.identity.mint("partner", subject="acme-system", client="acme")
    nobody_granted = api.identity.mint("partner", subject="globex-system", client="globex")
    cases = [
        (acme, OTHER),  # a customer without the partner's tag
        (acme, "nobody"),  # unknown: the same answer, so existence does not leak
        (nobody_granted, ACME),  # a partner with no grant at all
    ]
    for token, customer in cases:
        refused = await api.http.get(f"/customers/{customer}/360", headers=bearer(token))
        assert refused.status_code == 403, (customer, refused.text)
        assert refused.json()["error"] == "PermissionDenied"
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await api.stub.GetCustomer360(
                customer360_pb2.GetCustomer360Request(customer_id=customer),
                metadata=grpc_auth(token),
                timeout=10,
            )
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, customer
    # Others still get a plain 404 for an unknown customer.
    sales = bearer(api.identity.mint("sales"))
    assert (await api.http.get("/customers/nobody/360", headers=sales)).status_code == 404


async def test_the_audit_trail_says_who_did_what_when_through_which_client(api: Any) -> None:
    admin = api.identity.mint("admin", subject="root")
    reply = await api.http.get("/audit", params={"customer_id": ACME}, headers=bearer(admin))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["next_page_token"] is None
    trail = [
        (e["source"], e["position"], e["actor"], e["client"], e["command"], e["request_id"])
        for e in body["entries"]
    ]
    # Newest first (the events' own times), every source.
    assert trail == [
        ("pipeline", 3, "grace", "sales-console", "WinOpportunity", ""),
        ("pipeline", 2, "grace", "sales-console", "WinOpportunity", ""),
        ("contacts", 2, "bob", "service-desk", "LogInteraction", ""),
        ("contacts", 1, "ada", "sales-console", "CreatePerson", "req-ada-1"),
    ]
    first = body["entries"][-1]
    assert first["customer_id"] == ACME
    assert first["event_type"] == "crm.contacts.v1.PersonRegistered"
    assert first["event_id"] == f"{ACME}@1"
    assert first["occurred_at"] == "2026-11-02T09:01:00.000Z"

    # The same over gRPC, a page at a time.
    seen: list[tuple[str, int]] = []
    token = ""
    while True:
        page = await api.stub.GetAuditTrail(
            customer360_pb2.GetAuditTrailRequest(customer_id=ACME, page_size=3, page_token=token),
            metadata=grpc_auth(admin),
            timeout=10,
        )
        seen += [(e.source, e.position) for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert seen == [(s, p) for s, p, *_ in trail]

    # Per actor, and within a time window.
    bob = (await api.http.get("/audit", params={"actor": "bob"}, headers=bearer(admin))).json()
    assert [(e["customer_id"], e["command"]) for e in bob["entries"]] == [(ACME, "LogInteraction")]
    since = Timestamp(seconds=int(at(1).timestamp()))
    windowed = await api.stub.GetAuditTrail(
        customer360_pb2.GetAuditTrailRequest(customer_id=ACME, actor="ada", since=since),
        metadata=grpc_auth(admin),
        timeout=10,
    )
    assert [e.command for e in windowed.entries] == ["CreatePerson"]
    window = await api.http.get(
        "/audit",
        params={"customer_id": ACME, "until": "2026-11-02T09:01:00Z"},
        headers=bearer(admin),
    )
    assert window.json()["entries"] == []

    # Bad questions are refused naming the field; other roles are refused.
    for params, field in (
        ({}, "customer_id"),
        ({"customer_id": ACME, "page_token": "garbage"}, "page_token"),
        ({"customer_id": ACME, "page_size": "0"}, "page_size"),
        (
            {"actor": "bob", "since": "2026-11-03T00:00:00Z", "until": "2026-11-02T00:00:00Z"},
            "until",
        ),
    ):
        bad = await api.http.get("/audit", params=params, headers=bearer(admin))
        assert bad.status_code == 422, (params, bad.text)
        assert [d["field"] for d in bad.json()["detail"]] == [field], params
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await api.stub.GetAuditTrail(
            customer360_pb2.GetAuditTrailRequest(), metadata=grpc_auth(admin), timeout=10
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for role in ("sales", "service", "analyst", "partner"):
        token = api.identity.mint(role, client="acme")
        refused = await api.http.get("/audit", params={"customer_id": ACME}, headers=bearer(token))
        assert refused.status_code == 403, role
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await api.stub.GetAuditTrail(
                customer360_pb2.GetAuditTrailRequest(customer_id=ACME),
                metadata=grpc_auth(token),
                timeout=10,
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, role


async def test_an_admin_exports_what_the_view_holds_about_a_person(api: Any) -> None:
    admin = grpc_auth(api.identity.mint("admin", subject="root"))
    reply = await api.privacy.ExportPersonalData(
        privacy_pb2.ExportPersonalDataRequest(contact_id=ACME), metadata=admin, timeout=10
    )
    assert reply.service == "analytics"
    export = json.loads(reply.document_json)
    assert set(export) == {"customer_360", "audit_trail", "timeline"}
    view = export["customer_360"]
    # Every field, whatever a role would see: the same document an admin reads over REST.
    shown = await api.http.get(f"/customers/{ACME}/360", headers=bearer(api.identity.mint("admin")))
    assert view == shown.json()
    assert (view["given_name"], view["custom_fields"]["budget"]["value"]) == ("Ada", "1234.50")
    assert view["deals"][0]["name"] == "Gears" and view["erased"] is False
    assert [(e["source"], e["position"], e["command"]) for e in export["audit_trail"]] == [
        ("pipeline", 3, "WinOpportunity"),
        ("pipeline", 2, "WinOpportunity"),
        ("contacts", 2, "LogInteraction"),
        ("contacts", 1, "CreatePerson"),
    ]
    # The whole timeline (here as short as the document's), as an admin pages it.
    assert export["timeline"] == view["timeline"]
    assert [e["kind"] for e in export["timeline"]][-1] == "profile.created"

    # Someone the view never saw: an empty part, not an error.
    unknown = await api.privacy.ExportPersonalData(
        privacy_pb2.ExportPersonalDataRequest(contact_id="p-never-seen"), metadata=admin, timeout=10
    )
    assert json.loads(unknown.document_json) == {
        "customer_360": {},
        "audit_trail": [],
        "timeline": [],
    }
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await api.privacy.ExportPersonalData(
            privacy_pb2.ExportPersonalDataRequest(contact_id=" "), metadata=admin, timeout=10
        )
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Nobody else may export.
    for role in ("sales", "service", "analyst"):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await api.privacy.ExportPersonalData(
                privacy_pb2.ExportPersonalDataRequest(contact_id=ACME),
                metadata=grpc_auth(api.identity.mint(role)),
                timeout=10,
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, role


def test_the_logs_hold_no_tokens(api: Any) -> None:
    # Whatever was refused or answered above, no bearer token reached the logs.
    logs = "".join(p.read_text() for p in Path(api.tmp).glob("*.log"))
    assert "eyJ" not in logs
