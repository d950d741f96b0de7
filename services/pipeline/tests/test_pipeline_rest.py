"""The REST API as a frontend sees it: JSON in and out, the platform's errors, a
sales user's token (`ann`) on every request and an administrator's where pipelines
are defined."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pipeline_support import Clock, InProcessContacts, sqlite_settings

from crm.pipeline.v1 import pipeline_pb2 as pb
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.rest import create_app

STAGES = [
    {"stage_id": "qualify", "name": "Qualify", "probability": "10", "category": "pipeline"},
    {"stage_id": "propose", "name": "Propose", "probability": "40", "category": "best_case"},
    {"stage_id": "won", "name": "Won", "probability": "100", "category": "closed_won"},
    {"stage_id": "lost", "name": "Lost", "probability": "0", "category": "closed_lost"},
]


class Api(httpx.AsyncClient):
    """The pipeline API as a sales user calls it; `admin` are an administrator's headers."""

    admin: dict[str, str]


@pytest.fixture
async def http(tmp_path: Path, identity: Identity) -> AsyncIterator[Api]:
    contacts = ContactsService(create_contacts(sqlite_settings(tmp_path, "contacts")))
    service = PipelineService(
        create_application(sqlite_settings(tmp_path)), InProcessContacts(contacts), clock=Clock()
    )
    app = create_app(service, gate_for("pipeline", identity))
    try:
        async with Api(
            transport=httpx.ASGITransport(app=app),
            base_url="http://pipeline",
            headers=bearer(identity.mint("sales", subject="ann", client="web")),
        ) as client:
            client.admin = bearer(identity.mint("admin", subject="root", client="web"))
            yield client
    finally:
        service.close()
        contacts.close()


def fields(response: httpx.Response) -> list[str]:
    return [d["field"] for d in response.json()["detail"]]


async def new_deal(http: Api, **changes: Any) -> dict[str, Any]:
    pipeline = await http.post(
        "/pipelines", json={"name": "Sales", "stages": STAGES}, headers=http.admin
    )
    assert pipeline.status_code == 201, pipeline.text
    body = {
        "pipeline_id": pipeline.json()["id"],
        "name": "Renewal",
        "customer_id": "company-1",
        "owner": "ann",
        "amount": {"amount": "1200.5", "currency": "EUR"},
        "expected_close_date": "2026-03-31",
        **changes,
    }
    created = await http.post("/opportunities", json=body)
    assert created.status_code == 201, created.text
    reply: dict[str, Any] = created.json()
    return reply


async def test_a_deal_is_opened_moved_and_won_as_json(http: Api) -> None:
    reply = await new_deal(http)
    deal = reply["opportunity"]
    assert deal["amount"] == {"amount": "1200.50", "currency": "EUR"}
    assert (deal["stage_id"], deal["status"], deal["kind"]) == ("qualify", "open", "new_business")
    moved = await http.post(
        f"/opportunities/{reply['id']}/stage",
        json={"stage_id": "propose"},
        headers={"If-Match": "1"},
    )
    assert moved.status_code == 200, moved.text
    assert [v["stage_id"] for v in moved.json()["opportunity"]["history"]] == ["qualify", "propose"]
    lines = await http.put(
        f"/opportunities/{reply['id']}/line-items",
        json={
            "line_items": [
                {
                    "product_id": "sku",
                    "quantity": "3",
                    "unit_price": "99.99",
                    "discount_percent": "10",
                }
            ]
        },
    )
    assert lines.json()["opportunity"]["line_items"][0]["total"] == "269.97"
    assert lines.json()["opportunity"]["amount"]["amount"] == "269.97"
    won = await http.post(
        f"/opportunities/{reply['id']}/win", json={}, headers={"Idempotency-Key": "win-1"}
    )
    assert won.json()["opportunity"]["status"] == "won"
    again = await http.post(
        f"/opportunities/{reply['id']}/win", json={}, headers={"Idempotency-Key": "win-1"}
    )
    assert (again.status_code, again.json()["replayed"]) == (200, True)
    forecast = await http.get("/forecast", params={"period": "quarter"})
    assert forecast.json()["rows"] == [
        {
            "period": "2026-Q1",
            "owner": "ann",
            "category": "closed_won",
            "deals": 1,
            "amount": {"amount": "269.97", "currency": "EUR"},
            "weighted_amount": {"amount": "269.97", "currency": "EUR"},
        }
    ]
    funnel = await http.get(f"/pipelines/{deal['pipeline_id']}/funnel")
    assert [(s["stage_id"], s["entered"]) for s in funnel.json()["stages"]] == [
        ("qualify", 1),
        ("propose", 1),
        ("won", 1),
        ("lost", 0),
    ]
    rate = await http.get("/win-rate")
    assert (rate.json()["won"], rate.json()["rate"]) == (1, "1.0000")


async def test_errors_are_422_404_and_409(http: Api) -> None:
    reply = await new_deal(http)
    deal_id = reply["id"]
    bad = await http.post(
        "/opportunities",
        json={
            "pipeline_id": reply["opportunity"]["pipeline_id"],
            "name": "X",
            "customer_id": "c",
            "owner": "ann",
            "amount": {"amount": "-1", "currency": "EUR"},
            "expected_close_date": "2026-01-01",
        },
    )
    assert bad.status_code == 422
    assert fields(bad) == ["amount"]
    no_amount = await http.post("/opportunities", json={"name": "X"})
    assert no_amount.status_code == 422
    assert "amount" in fields(no_amount)
    assert (await http.get("/opportunities/not-an-id")).status_code == 404
    stale = await http.post(
        f"/opportunities/{deal_id}/owner", json={"owner": "bob"}, headers={"If-Match": 'W/"7"'}
    )
    assert stale.status_code == 409
    assert stale.json()["actual_version"] == 1
    await http.post(f"/opportunities/{deal_id}/lose", json={"reason": "price"})
    closed = await http.post(
        f"/opportunities/{deal_id}/amount", json={"amount": "1", "currency": "EUR"}
    )
    assert closed.status_code == 409
    assert "reopen" in closed.json()["message"]
    again = await http.post(f"/opportunities/{deal_id}/lose", json={"reason": "price"})
    assert again.status_code == 409
    garbled = await http.post(
        f"/opportunities/{deal_id}/reopen", json={}, headers={"If-Match": "yesterday"}
    )
    assert (garbled.status_code, fields(garbled)) == (422, ["If-Match"])


async def test_leads_activities_and_the_openapi_document(http: Api) -> None:
    lead = await http.post(
        "/leads",
        json={"family_name": "Byron", "email": "ada@example.org", "source": "web", "owner": "bob"},
    )
    assert lead.status_code == 201, lead.text
    lead_id = lead.json()["id"]
    assert (await http.post(f"/leads/{lead_id}/qualify", json={"score": 120})).status_code == 422
    await http.post(f"/leads/{lead_id}/qualify", json={"score": 60})
    pipeline = await http.post(
        "/pipelines", json={"name": "Sales", "stages": STAGES}, headers=http.admin
    )
    converted = await http.post(
        f"/leads/{lead_id}/convert",
        json={
            "pipeline_id": pipeline.json()["id"],
            "amount": {"amount": "500", "currency": "USD"},
            "expected_close_date": "2026-06-30",
        },
    )
    assert converted.status_code == 201, converted.text
    opportunity_id = converted.json()["opportunity_id"]
    assert converted.json()["lead"]["status"] == "converted"
    assert converted.json()["person_matched"] is False
    task = await http.post(
        "/activities",
        json={
            "subject_kind": "opportunity",
            "subject_id": opportunity_id,
            "kind": "call",
            "title": "Kick-off",
            "owner": "bob",
            "due_at": "2026-02-01T10:00:00+00:00",
        },
    )
    assert task.status_code == 201, task.text
    overdue = await http.get("/follow-ups/overdue")
    assert [
        (o["owner"], [a["title"] for a in o["activities"]]) for o in overdue.json()["owners"]
    ] == [("bob", ["Kick-off"])]
    listed = await http.get("/opportunities", params={"status": "open", "owner": "bob"})
    assert [d["id"] for d in listed.json()["opportunities"]] == [opportunity_id]
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/leads/{lead_id}/convert", "/forecast", "/follow-ups/overdue"} <= set(paths)


async def test_every_route_is_named_by_its_grpc_method_and_needs_a_token(http: Api) -> None:
    document = (await http.get("/openapi.json", headers={"authorization": ""})).json()
    operations = [op for methods in document["paths"].values() for op in methods.values()]
    grpc_methods = set(pb.DESCRIPTOR.services_by_name["PipelineService"].methods_by_name)
    assert {op["operationId"] for op in operations} == grpc_methods
    assert len(operations) == len(grpc_methods) == 35
    for operation in operations:
        assert operation["security"] == [{"bearer": []}]
        assert {"401", "403", "429"} <= set(operation["responses"])
    anonymous = await http.get("/forecast", headers={"authorization": ""})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"]
    # A sales user may not define pipelines; nothing is written.
    refused = await http.post("/pipelines", json={"name": "Sales", "stages": STAGES})
    assert (refused.status_code, refused.json()["error"]) == (403, "PermissionDenied")
    assert (await http.get("/pipelines")).json()["pipelines"] == []


async def test_leads_and_activities_due_in_a_range_are_listed_as_json(http: Api) -> None:
    ids = []
    for n, owner in enumerate(["bob", "ann", "bob"]):
        created = await http.post(
            "/leads",
            json={
                "family_name": f"Lead {n}",
                "email": f"{n}@x.org",
                "source": "web",
                "owner": owner,
            },
        )
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    # Created at the same time (the test's clock stands still): by id.
    page = await http.get("/leads", params={"owner": "bob", "page_size": 1})
    assert page.status_code == 200, page.text
    rest = await http.get(
        "/leads", params={"owner": "bob", "page_token": page.json()["next_page_token"]}
    )
    listed = [lead["id"] for reply in (page, rest) for lead in reply.json()["leads"]]
    assert listed == sorted([ids[0], ids[2]])
    assert (page.json()["total_size"], rest.json()["next_page_token"]) == (2, "")
    bad = await http.get("/leads", params={"status": "hot"})
    assert (bad.status_code, fields(bad)) == (422, ["status"])

    for title, due in (("Tue", "2026-02-10T10:00:00+01:00"), ("Mon", "2026-02-09T08:00:00Z")):
        task = await http.post(
            "/activities",
            json={
                "subject_kind": "lead",
                "subject_id": ids[1],
                "kind": "task",
                "title": title,
                "owner": "ann",
                "due_at": due,
            },
        )
        assert task.status_code == 201, task.text
    week = await http.get(
        "/activities",
        params={"due_from": "2026-02-09T00:00:00Z", "due_before": "2026-02-16T00:00:00Z"},
    )
    assert week.status_code == 200, week.text
    assert [a["title"] for a in week.json()["activities"]] == ["Mon", "Tue"]
    monday = await http.get(
        "/activities",
        params={"due_from": "2026-02-09T00:00:00Z", "due_before": "2026-02-10T00:00:00Z"},
    )
    assert [a["title"] for a in monday.json()["activities"]] == ["Mon"]
    naive = await http.get("/activities", params={"due_from": "2026-02-09T00:00:00"})
    assert (naive.status_code, fields(naive)) == (422, ["due_from"])
