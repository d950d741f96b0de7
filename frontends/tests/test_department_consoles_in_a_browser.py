"""The service, marketing and management consoles in headless Chromium over the
real platform: an agent works a case from the team queue to solved; a marketer
sees a member's tier, balance and rewards (and the tickets reports' refusal); a
manager's dashboards draw from the pipeline and tickets reports, the satisfaction
trend included."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from console_support import STAGES, Apis, in_days, sign_in
from playwright.sync_api import expect

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


@pytest.fixture(scope="module")
def service_world(apis: Apis) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    team = f"support-{tag}"
    policy = apis.call(
        "admin",
        "POST",
        "tickets",
        "/sla-policies",
        json={
            "name": f"Around the clock {tag}",
            "terms": {
                "targets": [
                    {
                        "tier": "standard",
                        "priority": p,
                        "first_response_seconds": 3600,
                        "resolution_seconds": 86400,
                    }
                    for p in ("low", "normal", "high", "urgent")
                ],
                "calendar": {
                    "timezone": "UTC",
                    "hours": [{"day": d, "opens": "00:00", "closes": "23:59"} for d in DAYS],
                },
            },
        },
    )["id"]
    person = apis.call(
        "sales",
        "POST",
        "contacts",
        "/persons",
        json={
            "given_name": "Grace",
            "family_name": f"Hopper{tag}",
        },
    )["id"]
    case = apis.call(
        "service",
        "POST",
        "tickets",
        "/cases",
        json={
            "customer_id": person,
            "channel": "email",
            "subject": f"Invoice shows the wrong VAT {tag}",
            "team": team,
            "priority": "high",
            "policy_id": policy,
        },
    )["id"]
    # A second case of the team, solved and answered: the satisfaction trend has it.
    answered = apis.call(
        "service",
        "POST",
        "tickets",
        "/cases",
        json={"customer_id": person, "channel": "web", "subject": f"Thanks {tag}", "team": team},
    )["id"]
    apis.call("service", "POST", "tickets", f"/cases/{answered}/status", json={"status": "solved"})
    apis.call(
        "service",
        "POST",
        "tickets",
        f"/cases/{answered}/satisfaction",
        json={"csat": 5, "ces": 2, "nps": 10},
    )
    apis.call(
        "marketing", "POST", "loyalty", "/members", json={"contact_id": person, "channel": "web"}
    )
    apis.call(
        "marketing",
        "POST",
        "loyalty",
        f"/members/{person}/earnings",
        json={"lines": [{"amount": "250.00", "currency": "EUR"}], "reference": f"o-{tag}"},
        headers={"idempotency-key": f"earn-{tag}"},
    )
    apis.call(
        "marketing",
        "POST",
        "loyalty",
        "/rewards",
        json={"code": f"mug-{tag}", "name": f"Coffee mug {tag}", "points": 100, "stock": 20},
    )
    pipeline = apis.call(
        "admin",
        "POST",
        "pipeline",
        "/pipelines",
        json={
            "name": f"Renewals {tag}",
            "stages": [
                {"stage_id": i, "name": n, "probability": p, "category": c} for i, n, p, c in STAGES
            ],
        },
    )["id"]
    for n, amount in enumerate(("4000.00", "2500.00", "900.00")):
        deal = apis.call(
            "sales",
            "POST",
            "pipeline",
            "/opportunities",
            json={
                "pipeline_id": pipeline,
                "name": f"Renewal {n} {tag}",
                "customer_id": person,
                "owner": "e2e-seller",
                "amount": {"amount": amount, "currency": "EUR"},
                "expected_close_date": in_days(10 + 30 * n),
            },
        )["opportunity"]
        if n == 0:
            apis.call(
                "sales",
                "POST",
                "pipeline",
                f"/opportunities/{deal['id']}/win",
                json={},
                headers={"if-match": str(deal["version"])},
            )
    return {"tag": tag, "team": team, "person": person, "case": case, "pipeline": pipeline}


def test_an_agent_answers_and_solves_a_case_from_the_queue(
    page: Any, consoles: Any, apis: Apis, service_world: dict[str, Any], screenshot: Any
) -> None:
    url, tag = consoles("service"), service_world["tag"]
    sign_in(page, url, "service", "e2e-agent")
    page.goto(f"{url}/#/queue?team={service_world['team']}")
    row = page.get_by_role("row", name=re.compile(f"wrong VAT {tag}"))
    expect(row).to_contain_text(re.compile(r"\d+m \d\ds left"))
    expect(row.get_by_role("link", name=f"Grace Hopper{tag}")).to_be_visible()
    screenshot(page, "service-queue")

    row.get_by_role("link", name=f"Invoice shows the wrong VAT {tag}").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Invoice shows the wrong VAT {tag}")
    page.get_by_label("Reply to the customer").fill("The corrected invoice is on its way.")
    page.get_by_role("button", name="Send reply").click()
    expect(page.locator(".messages")).to_contain_text("The corrected invoice is on its way.")
    page.get_by_label("Internal note (the customer does not see it)").fill(
        "Finance fixed the VAT rate."
    )
    page.get_by_role("button", name="Add note").click()
    expect(page.locator(".message-internal")).to_contain_text("Finance fixed the VAT rate.")
    page.get_by_label("Status", exact=True).select_option("solved")
    page.get_by_role("button", name="Change status").click()
    expect(page.locator(".header-meta")).to_contain_text("solved")
    screenshot(page, "service-case")
    assert (
        apis.call("service", "GET", "tickets", f"/cases/{service_world['case']}")["status"]
        == "solved"
    )

    page.goto(f"{url}/#/queue?team={service_world['team']}")
    expect(page.get_by_text(f"The {service_world['team']} queue is empty.")).to_be_visible()


def test_a_marketer_sees_members_and_rewards(
    page: Any, consoles: Any, service_world: dict[str, Any], screenshot: Any
) -> None:
    url, tag = consoles("marketing"), service_world["tag"]
    sign_in(page, url, "marketing", "e2e-marketer")
    # Every member, most points first (ListMembers): this test's member is among them.
    page.goto(f"{url}/#/members?min=250")
    expect(
        page.get_by_role("table", name="Members").get_by_role("row", name=re.compile(tag))
    ).to_contain_text("250")
    page.goto(f"{url}/#/members?q=Hopper{tag}")
    page.get_by_role("row", name=re.compile(f"Grace Hopper{tag}")).get_by_role(
        "link", name="open"
    ).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Grace Hopper{tag}")
    expect(page.locator(".kpi-active")).to_have_text("250")
    screenshot(page, "marketing-member")
    page.goto(f"{url}/#/rewards")
    expect(page.get_by_role("table", name="Rewards")).to_contain_text(f"Coffee mug {tag}")
    screenshot(page, "marketing-rewards")
    # The service reports are not for marketing: each section shows the API's refusal.
    page.goto(f"{url}/#/service-levels?teams={service_world['team']}")
    trend = page.locator(
        "section", has=page.get_by_role("heading", name="Satisfaction (CSAT / NPS)")
    )
    expect(trend.get_by_role("alert")).to_contain_text("Not allowed for your role")


def test_a_manager_sees_the_dashboards(
    page: Any, consoles: Any, service_world: dict[str, Any], screenshot: Any
) -> None:
    url = consoles("management")
    sign_in(page, url, "analyst", "e2e-manager")
    page.goto(f"{url}/#/dashboard?pipeline={service_world['pipeline']}")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sales dashboard")
    expect(page.get_by_role("table", name="Funnel")).to_contain_text("Qualify")
    expect(page.locator(".kpi-box").first).to_contain_text("Win rate")
    # The charts are drawn by the charting library (loaded on demand, under the CSP).
    funnel = page.get_by_role("img", name=re.compile("Deals that entered each stage"))
    expect(funnel).to_be_visible()
    expect(page.locator("figure.chart-figure", has=funnel)).to_have_attribute("data-drawn", "true")
    screenshot(page, "management-dashboard")
    page.goto(f"{url}/#/service-levels?teams={service_world['team']}&interval=month")
    expect(page.get_by_role("table", name="SLA compliance")).to_contain_text(service_world["team"])
    # The satisfaction trend of every team, by month: this month has this test's answer.
    month = datetime.now(UTC).strftime("%Y-%m")
    row = page.get_by_role("table", name="Satisfaction by period").get_by_role("row", name=month)
    expect(row.locator("td").nth(1)).not_to_have_text("0")
    trend = page.get_by_role("img", name="Mean CSAT and NPS by month, every team")
    expect(page.locator("figure.chart-figure", has=trend)).to_have_attribute("data-drawn", "true")
    screenshot(page, "management-service-levels")
