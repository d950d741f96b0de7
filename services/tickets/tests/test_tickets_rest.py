"""The REST adapter in process, behind the real access gate with real signed tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tickets_support import Clock, KnownContacts, sqlite_settings

from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for
from crm_tickets.application import TicketsService, create_application
from crm_tickets.rest_api import create_app


@pytest.fixture
async def http(tmp_path: Path, identity: Identity) -> AsyncIterator[httpx.AsyncClient]:
    service = TicketsService(
        create_application(sqlite_settings(tmp_path)), KnownContacts("contact-1"), clock=Clock()
    )
    app = create_app(service, gate_for("tickets", identity))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tickets") as client:
        yield client
    service.close()


async def test_every_route_names_its_operation_and_is_in_the_policy(
    http: httpx.AsyncClient,
) -> None:
    from crm_common.auth.access import AccessPolicy

    document = (await http.get("/openapi.json")).json()
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    listed = set(AccessPolicy.load().operations["tickets"])
    # The export is gRPC only: contacts gathers every service's answer into one document.
    assert operations == listed - {"ExportPersonalData"}


async def test_tokens_roles_and_errors(http: httpx.AsyncClient, identity: Identity) -> None:
    body = {"customer_id": "contact-1", "channel": "email", "subject": "Hi", "team": "support"}
    assert (await http.post("/cases", json=body)).status_code == 401
    marketing = bearer(identity.mint("marketing"))
    refused = await http.post("/cases", json=body, headers=marketing)
    assert refused.status_code == 403, refused.text
    agent = bearer(identity.mint("service", subject="agent-7"))
    unknown = await http.post("/cases", json={**body, "customer_id": "x"}, headers=agent)
    assert unknown.status_code == 404
    headers = {**agent, "Idempotency-Key": "k-1"}
    opened = await http.post("/cases", json=body, headers=headers)
    assert opened.status_code == 201, opened.text
    again = await http.post("/cases", json=body, headers=headers)
    assert (again.status_code, again.json()["id"]) == (200, opened.json()["id"])
    other = await http.post("/cases", json={**body, "subject": "Other"}, headers=headers)
    assert other.status_code == 422
    case = opened.json()["case"]
    assert (case["status"], case["history"][0]["what"]) == ("new", "Opened")
    stale = await http.post(
        f"/cases/{case['id']}/status", json={"status": "open"}, headers={**agent, "If-Match": "7"}
    )
    assert stale.status_code == 409
    read = await http.get(f"/cases/{case['id']}", headers=marketing)
    assert read.status_code == 200 and read.json()["clocks"][0]["state"] == "running"


async def test_the_queries_over_rest_and_their_refusals(
    http: httpx.AsyncClient, identity: Identity
) -> None:
    agent = bearer(identity.mint("service", subject="agent-7"))
    body = {"customer_id": "contact-1", "channel": "web", "subject": "Hi", "team": "Desk"}
    opened = (await http.post("/cases", json=body, headers=agent)).json()
    # Monday 09:00 UTC; the default first response (normal: 8 business hours) is due 17:00.
    risky = await http.get("/cases/at-risk", params={"within_minutes": 480}, headers=agent)
    assert risky.status_code == 200, risky.text
    assert [c["id"] for c in risky.json()["cases"]] == [opened["id"]]
    calm = await http.get("/cases/at-risk", params={"within_minutes": 60}, headers=agent)
    assert calm.json() == {"cases": [], "next_page_token": ""}
    queue = await http.get("/teams/desk/queue", headers=agent)
    assert [c["id"] for c in queue.json()["cases"]] == [opened["id"]]
    history = await http.get("/customers/contact-1/cases", headers=agent)
    assert [c["id"] for c in history.json()["cases"]] == [opened["id"]]
    report = await http.get(
        "/teams/desk/sla-compliance",
        params={"period_start": "2026-02-01T00:00:00Z", "period_end": "2026-03-01T00:00:00Z"},
        headers=agent,
    )
    assert report.status_code == 200, report.text
    document = report.json()
    assert document["cases"] == 1
    assert {t["kind"]: t["open"] for t in document["targets"]} == {
        "first_response": 1,
        "resolution": 1,
    }
    solved = await http.post(
        f"/cases/{opened['id']}/status", json={"status": "solved"}, headers=agent
    )
    assert solved.status_code == 200, solved.text
    survey = {"csat": 4, "ces": 3, "nps": 9}
    answered = await http.post(f"/cases/{opened['id']}/satisfaction", json=survey, headers=agent)
    assert answered.status_code == 200, answered.text
    february = {"period_start": "2026-02-01T00:00:00Z", "period_end": "2026-03-01T00:00:00Z"}
    analyst = bearer(identity.mint("analyst"))
    trend = await http.get(
        "/satisfaction", params={**february, "team": "desk", "interval": "week"}, headers=analyst
    )
    assert trend.status_code == 200, trend.text
    weeks = trend.json()["periods"]
    assert [(w["start"][:10], w["responses"]) for w in weeks] == [
        ("2026-02-01", 0),
        ("2026-02-02", 1),
        ("2026-02-09", 0),
        ("2026-02-16", 0),
        ("2026-02-23", 0),
    ]
    assert (weeks[1]["csat_mean"], weeks[1]["ces_mean"], weeks[1]["nps"]) == (4.0, 3.0, 100.0)
    for path, params, field in [
        ("/satisfaction", {**february, "interval": "day"}, "interval"),
        ("/satisfaction", {**february, "period_start": "2026-02-01T00:00:00"}, "period_start"),
        ("/satisfaction", {"period_start": "2026-02-01T00:00:00Z"}, "period_end"),
        ("/cases/at-risk", {"within_minutes": 0}, "within_minutes"),
        ("/teams/desk/queue", {"page_size": 501}, "page_size"),
        ("/customers/contact-1/cases", {"page_token": "x"}, "page_token"),
        ("/teams/desk/sla-compliance", {"period_end": "2026-03-01T00:00:00Z"}, "period_start"),
    ]:
        refused = await http.get(path, params=params, headers=agent)
        assert refused.status_code == 422, (path, refused.text)
        assert field in [d["field"] for d in refused.json()["detail"]], refused.text
    marketing = bearer(identity.mint("marketing"))
    assert (await http.get("/cases/at-risk", headers=marketing)).status_code == 403
    refused = await http.get("/satisfaction", params=february, headers=marketing)
    assert refused.status_code == 403, refused.text
