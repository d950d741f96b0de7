"""Live updates in headless Chromium over the real platform: a page left open
shows what changed elsewhere without being reloaded (the console's server-sent
events). A salesperson wins a deal on the board and the customer's 360 page in
another tab shows it won; an agent works a case to solved and the open team queue
follows; an ERP order lifts a member's tier on the marketer's open member page."""

from __future__ import annotations

import asyncio
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from console_support import STAGES, Apis, in_days, sign_in
from google.protobuf.timestamp_pb2 import Timestamp
from playwright.sync_api import expect

from crm.erp.v1 import orders_pb2 as erp
from crm_loyalty.simulator import ErpMessage, publish

#: How long a change may take to reach an open page: the API's write, the read
#: model's projection (the 360 view), the console's next read (every 2 s), the event.
LIVE = 20_000
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def mark(tab: Any) -> None:
    """Marks the tab's document: a reload would replace it, and the mark with it."""
    tab.evaluate("window.crmNotReloaded = true")
    expect(tab.locator('.live[data-live="on"]')).to_be_visible()


def assert_not_reloaded(tab: Any) -> None:
    assert tab.evaluate("window.crmNotReloaded === true"), "the page was reloaded"


def test_a_deal_won_on_the_board_shows_on_an_open_360_page(
    page: Any, browser: Any, consoles: Any, apis: Apis
) -> None:
    tag = uuid.uuid4().hex[:6]
    pipeline = apis.call(
        "admin",
        "POST",
        "pipeline",
        "/pipelines",
        json={
            "name": f"Live {tag}",
            "stages": [
                {"stage_id": i, "name": n, "probability": p, "category": c} for i, n, p, c in STAGES
            ],
        },
    )["id"]
    person = apis.call(
        "sales", "POST", "contacts", "/persons", json={"given_name": "Mary", "family_name": tag}
    )["id"]
    deal = apis.call(
        "sales",
        "POST",
        "pipeline",
        "/opportunities",
        json={
            "pipeline_id": pipeline,
            "name": f"Jacquard loom {tag}",
            "customer_id": person,
            "owner": "e2e-seller",
            "amount": {"amount": "8000.00", "currency": "EUR"},
            "expected_close_date": in_days(15),
        },
    )["opportunity"]
    url = consoles("sales")
    sign_in(page, url, "sales", "e2e-seller")

    customer = browser.new_page()
    try:
        customer.goto(f"{url}/#/customer/{person}")
        deals = customer.locator("section", has=customer.get_by_role("heading", name="Deals"))
        row = deals.get_by_role("row", name=re.compile(deal["name"]))
        expect(row).to_contain_text("open", timeout=LIVE)
        mark(customer)

        page.goto(f"{url}/#/board?pipeline={pipeline}")
        card = page.locator(f'[data-id="{deal["id"]}"]')
        card.drag_to(page.locator('section.column[data-stage="won"]'))
        expect(card).to_contain_text("won")

        expect(row).to_contain_text("won", timeout=LIVE)
        expect(deals).to_contain_text("Lifetime won revenue")
        assert_not_reloaded(customer)
    finally:
        customer.close()


@pytest.fixture(scope="module")
def queue_world(apis: Apis) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    policy = apis.call(
        "admin",
        "POST",
        "tickets",
        "/sla-policies",
        json={
            "name": f"Live queue {tag}",
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
        "sales", "POST", "contacts", "/persons", json={"given_name": "Alan", "family_name": tag}
    )["id"]
    return {"tag": tag, "team": f"desk-{tag}", "policy": policy, "person": person}


def test_an_open_queue_follows_a_case_from_opened_to_solved(
    page: Any, browser: Any, consoles: Any, apis: Apis, queue_world: dict[str, Any]
) -> None:
    url, tag, team = consoles("service"), queue_world["tag"], queue_world["team"]
    sign_in(page, url, "service", "e2e-agent")
    queue = browser.new_page()
    try:
        queue.goto(f"{url}/#/queue?team={team}")
        expect(queue.get_by_text(f"The {team} queue is empty.")).to_be_visible()
        mark(queue)

        # The customer writes in: the case joins the open queue.
        case = apis.call(
            "service",
            "POST",
            "tickets",
            "/cases",
            json={
                "customer_id": queue_world["person"],
                "channel": "email",
                "subject": f"Printer on fire {tag}",
                "team": team,
                "priority": "urgent",
                "policy_id": queue_world["policy"],
            },
        )["id"]
        row = queue.get_by_role("row", name=re.compile(f"Printer on fire {tag}"))
        expect(row).to_contain_text(re.compile(r"\d+m \d\ds left"), timeout=LIVE)
        expect(row).to_contain_text("unassigned")

        # The agent opens it, takes it, replies and solves it in the other tab ...
        page.goto(f"{url}/#/case/{case}")
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Printer on fire {tag}")
        page.get_by_role("button", name="Assign").click()
        expect(page.locator(".facts")).to_contain_text("e2e-agent")
        # ... and the queue shows who has it, without a reload.
        expect(row).to_contain_text("e2e-agent", timeout=LIVE)

        page.get_by_label("Reply to the customer").fill("Unplug it; a technician is coming.")
        page.get_by_role("button", name="Send reply").click()
        expect(page.locator(".messages")).to_contain_text("a technician is coming")
        page.get_by_label("Status", exact=True).select_option("solved")
        page.get_by_role("button", name="Change status").click()
        expect(page.locator(".header-meta")).to_contain_text("solved")

        expect(queue.get_by_text(f"The {team} queue is empty.")).to_be_visible(timeout=LIVE)
        assert_not_reloaded(queue)
    finally:
        queue.close()


def erp_order(customer: str, amount: str) -> ErpMessage:
    order_id = f"live-{uuid.uuid4().hex[:10]}"
    placed_at = Timestamp()
    placed_at.FromDatetime(datetime.now(UTC))
    order = erp.OrderEvent(
        order_id=order_id,
        customer_ref=customer,
        occurred_at=placed_at,
        placed=erp.OrderPlaced(
            currency="EUR",
            lines=[
                erp.OrderLine(
                    line_id="1", sku="TV-55", category="electronics", quantity=1, amount=amount
                )
            ],
        ),
    )
    return ErpMessage(customer, "crm.erp.v1.OrderPlaced", order, f"erp-{order_id}")


def test_an_erp_order_lifts_the_tier_on_an_open_member_page(
    page: Any, consoles: Any, apis: Apis, local_stack: Any, screenshot: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    person = apis.call(
        "sales", "POST", "contacts", "/persons", json={"given_name": "Hedy", "family_name": tag}
    )["id"]
    apis.call(
        "marketing", "POST", "loyalty", "/members", json={"contact_id": person, "channel": "store"}
    )
    url = consoles("marketing")
    sign_in(page, url, "marketing", "e2e-marketer")
    page.goto(f"{url}/#/member/{person}")
    header = page.locator(".page-header .header-meta")
    expect(header).to_contain_text("basic")
    mark(page)

    # The ERP's order, on the inbound topic (from a thread: Playwright runs a loop here).
    order = erp_order(person, "1500.00")
    with ThreadPoolExecutor(1) as erp_system:
        erp_system.submit(asyncio.run, publish(local_stack.kafka_bootstrap, [order])).result()

    expect(header).to_contain_text("silver", timeout=LIVE)
    expect(page.locator(".kpi-locked")).not_to_have_text("0")
    assert_not_reloaded(page)
    assert apis.call("marketing", "GET", "loyalty", f"/members/{person}")["tier"] == "silver"
    screenshot(page, "marketing-member-live")
