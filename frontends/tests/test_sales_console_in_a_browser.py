"""The sales console in headless Chromium over the real platform: sign in, find
a customer, open the 360 page, work the pipeline board (drag, keyboard, a
refusal shown in place), pick a lead from the inbox and convert it, see follow-ups
overdue and due later, and a user whose role has no access to the pipeline sees
the refusal."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from console_support import STAGES, Apis, in_days, sign_in
from playwright.sync_api import expect


@pytest.fixture(scope="module")
def world(apis: Apis) -> dict[str, Any]:
    """A pipeline, a customer with an open and a won deal, a follow-up of the open deal
    overdue and one due later, and a new lead."""
    tag = uuid.uuid4().hex[:6]
    pipeline = apis.call(
        "admin",
        "POST",
        "pipeline",
        "/pipelines",
        json={
            "name": f"Enterprise {tag}",
            "stages": [
                {"stage_id": i, "name": n, "probability": p, "category": c} for i, n, p, c in STAGES
            ],
        },
    )["id"]
    person = apis.call(
        "sales",
        "POST",
        "contacts",
        "/persons",
        json={
            "given_name": "Ada",
            "family_name": f"Lovelace{tag}",
            "channels": [
                {
                    "channel": "email",
                    "address": f"ada.{tag}@example.com",
                    "consent_status": "granted",
                    "consent_source": "web-form",
                }
            ],
        },
    )["id"]

    def deal(name: str, amount: str) -> dict[str, Any]:
        reply: dict[str, Any] = apis.call(
            "sales",
            "POST",
            "pipeline",
            "/opportunities",
            json={
                "pipeline_id": pipeline,
                "name": name,
                "customer_id": person,
                "person_id": person,
                "owner": "e2e-seller",
                "amount": {"amount": amount, "currency": "EUR"},
                "expected_close_date": in_days(20),
            },
        )
        return reply["opportunity"]

    open_deal = deal(f"Analytical engine {tag}", "12000.00")
    closed = deal(f"Difference engine {tag}", "5000.00")
    apis.call(
        "sales",
        "POST",
        "pipeline",
        f"/opportunities/{closed['id']}/win",
        json={},
        headers={"if-match": str(closed["version"])},
    )
    now = datetime.now(UTC)
    for title, due in ((f"Send the contract {tag}", -1), (f"Call about the engine {tag}", 3)):
        apis.call(
            "sales",
            "POST",
            "pipeline",
            "/activities",
            json={
                "subject_kind": "opportunity",
                "subject_id": open_deal["id"],
                "kind": "follow_up",
                "title": title,
                "owner": "e2e-seller",
                "due_at": (now + timedelta(days=due)).isoformat(),
            },
        )
    lead = apis.call(
        "marketing",
        "POST",
        "pipeline",
        "/leads",
        json={
            "given_name": "Katherine",
            "family_name": f"Johnson{tag}",
            "company_name": f"Orbital {tag}",
            "email": f"katherine.{tag}@example.com",
            "source": "web",
            "owner": "e2e-seller",
        },
    )["id"]
    return {
        "tag": tag,
        "pipeline": pipeline,
        "person": person,
        "deal": open_deal,
        "won": closed,
        "lead": lead,
    }


def column(page: Any, stage: str) -> Any:
    return page.locator(f'section.column[data-stage="{stage}"]')


def test_a_salesperson_works_customers_deals_and_leads(
    page: Any, consoles: Any, apis: Apis, world: dict[str, Any], screenshot: Any
) -> None:
    url = consoles("sales")
    sign_in(page, url, "sales", "e2e-seller")
    page.goto(f"{url}/#/board?pipeline={world['pipeline']}")
    deal, won = world["deal"], world["won"]
    card = page.locator(f'[data-id="{deal["id"]}"]')
    expect(column(page, "qualify").locator(f'[data-id="{deal["id"]}"]')).to_be_visible()
    expect(column(page, "won").locator(f'[data-id="{won["id"]}"]')).to_be_visible()
    screenshot(page, "sales-board")

    # Drag to the next stage: the API moves it.
    card.drag_to(column(page, "propose"))
    expect(column(page, "propose").locator(f'[data-id="{deal["id"]}"]')).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="is now in Propose")).to_be_visible()
    stored = apis.call("sales", "GET", "pipeline", f"/opportunities/{deal['id']}")
    assert stored["stage_id"] == "propose"

    # By keyboard: focus the card, arrow right.
    card = page.locator(f'[data-id="{deal["id"]}"]')
    card.focus()
    page.keyboard.press("ArrowRight")
    expect(column(page, "negotiate").locator(f'[data-id="{deal["id"]}"]')).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="is now in Negotiate")).to_be_visible()
    assert (
        apis.call("sales", "GET", "pipeline", f"/opportunities/{deal['id']}")["stage_id"]
        == "negotiate"
    )

    # A won deal cannot move back without reopening: the API refuses, the card returns,
    # and the refusal is shown in its column.
    page.locator(f'[data-id="{won["id"]}"]').drag_to(column(page, "propose"))
    alert = column(page, "won").get_by_role("alert")
    expect(alert).to_contain_text("was not moved to Propose")
    expect(alert).to_contain_text("Refused")
    expect(column(page, "won").locator(f'[data-id="{won["id"]}"]')).to_be_visible()
    assert apis.call("sales", "GET", "pipeline", f"/opportunities/{won['id']}")["status"] == "won"
    screenshot(page, "sales-board-refusal")

    # Won by dragging into the Won column; the 360 page shows it (read-your-writes).
    page.locator(f'[data-id="{deal["id"]}"]').drag_to(column(page, "won"))
    expect(column(page, "won").locator(f'[data-id="{deal["id"]}"]')).to_contain_text("won")

    # Find the customer from the top search and open the 360 page.
    page.get_by_label("Search customers").fill(f"Lovelace{world['tag']}")
    page.get_by_label("Search customers").press("Enter")
    page.get_by_role("link", name=f"Ada Lovelace{world['tag']}").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Ada Lovelace{world['tag']}")
    deals = page.locator("section", has=page.get_by_role("heading", name="Deals"))
    expect(deals.get_by_role("row", name=re.compile(deal["name"]))).to_contain_text("won")
    expect(
        page.locator("section", has=page.get_by_role("heading", name="Contact and consent"))
    ).to_contain_text("granted")

    # Log a call: the timeline shows it right away.
    page.get_by_label("Summary").fill(f"Walked through the engine {world['tag']}")
    page.get_by_role("button", name="Log interaction").click()
    expect(page.locator(".timeline")).to_contain_text(f"Walked through the engine {world['tag']}")
    screenshot(page, "sales-customer-360")

    # The deal page, reached from the 360 page.
    page.get_by_role("link", name=deal["name"]).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(deal["name"])
    expect(page.get_by_role("table", name="Stage history")).to_contain_text("Negotiate")
    screenshot(page, "sales-deal")

    # The lead, picked from the inbox of new leads: qualify, then convert to a deal.
    page.goto(f"{url}/#/leads")
    page.get_by_role("table", name="Leads, oldest first").get_by_role(
        "link", name=f"Katherine Johnson{world['tag']}"
    ).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Katherine Johnson{world['tag']}")
    page.get_by_label(re.compile(r"^Score")).fill("80")
    page.get_by_role("button", name="Qualify", exact=True).click()
    expect(page.locator(".header-meta")).to_contain_text("qualified")
    page.get_by_label("Pipeline").select_option(world["pipeline"])
    page.get_by_label("Amount").fill("1500.00")
    screenshot(page, "sales-lead")
    page.get_by_role("button", name="Convert to a deal").click()
    expect(page).to_have_url(re.compile(r"#/deal/"))
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Orbital {world['tag']} deal")
    lead = apis.call("sales", "GET", "pipeline", f"/leads/{world['lead']}")
    assert lead["status"] == "converted" and lead["opportunity_id"] in page.url

    page.goto(f"{url}/#/leads?status=converted")
    expect(
        page.get_by_role("row", name=re.compile(f"Katherine Johnson{world['tag']}"))
    ).to_contain_text("converted")
    screenshot(page, "sales-leads")
    page.goto(f"{url}/#/forecast")
    # One chart per currency; this test's deals are in EUR (others of the
    # session may add charts in other currencies).
    expect(page.get_by_role("img", name="Forecast by month and category, EUR")).to_be_visible()
    screenshot(page, "sales-forecast")
    page.goto(f"{url}/#/tasks")
    expect(page.get_by_role("heading", level=1)).to_have_text("Tasks")
    overdue = page.locator("section", has=page.get_by_role("heading", name=re.compile("^Overdue")))
    expect(overdue).to_contain_text(f"Send the contract {world['tag']}")
    later = page.locator("section", has=page.get_by_role("heading", name=re.compile("^Due later")))
    expect(later).to_contain_text(f"Call about the engine {world['tag']}")
    expect(later).not_to_contain_text(f"Send the contract {world['tag']}")
    screenshot(page, "sales-tasks")


def test_a_role_without_access_to_the_pipeline_sees_the_refusal(
    page: Any, consoles: Any, world: dict[str, Any], screenshot: Any
) -> None:
    url = consoles("sales")
    sign_in(page, url, "service", "e2e-agent")
    # The navigation offers only what the role may use ...
    expect(page.get_by_role("navigation").get_by_role("link", name="Pipeline board")).to_have_count(
        0
    )
    expect(page.get_by_role("navigation").get_by_role("link", name="Customers")).to_be_visible()
    # ... and the pipeline API's own refusal is shown, not an empty board.
    page.goto(f"{url}/#/board?pipeline={world['pipeline']}")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Not allowed for your role")
    expect(alert).to_contain_text("service")
    screenshot(page, "sales-refused")
