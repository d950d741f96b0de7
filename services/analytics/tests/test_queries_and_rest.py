"""Read-your-writes and the REST API, in process, over the real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import httpx
import pipeline_events as deals
import pytest
from contact_events import (
    company_registered,
    company_renamed,
    interaction,
    linked,
    person_registered,
    publish,
)
from pipeline_events import publish as publish_deals
from pymongo.database import Database

from crm.contacts.v1 import contacts_pb2
from crm.customer360.v1 import customer360_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.grpc_api import to_proto
from crm_analytics.query import Customer360Queries
from crm_analytics.rest_api import create_app, parse_wait_for, to_json
from crm_analytics.store import Customer360Store
from crm_common.errors import NotFound, ValidationFailed, WaitTimedOut
from crm_common.projection import ProjectionConsumer
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for


@pytest.fixture
async def running(
    analytics_servers, database: Database[Any], topic: str, pipeline_topic: str
) -> AsyncIterator[Any]:
    """A projector following the test's topics, and the queries over its store."""
    store = Customer360Store(database, topics={"contacts": topic, "pipeline": pipeline_topic})
    store.ensure_indexes()
    consumer = ProjectionConsumer(
        projection="customer360",
        topics=[topic, pipeline_topic],
        read_model=store,
        mongo=database.client,
        database=database.name,
        bootstrap=analytics_servers.kafka_bootstrap,
        poll_timeout_ms=50,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))

    async def write(*events: Any) -> None:
        await publish(analytics_servers.kafka_bootstrap, topic, list(events))

    async def sell(*events: Any) -> None:
        await publish_deals(analytics_servers.kafka_bootstrap, pipeline_topic, list(events))

    async def define(*events: Any) -> None:
        """Publishes pipeline definitions and waits until their names are known.

        They sit in another partition than the customers' deals, so a read
        that waited for a deal's position may come before them.
        """
        await sell(*events)
        for event in events:
            for _ in range(200):
                known = database.customer360_pipelines.find_one({"_id": event.aggregate_id})
                if known and known["position"] >= event.position:
                    break
                await asyncio.sleep(0.025)
            else:
                raise AssertionError(f"pipeline position {event.position} not applied")

    class Running:
        queries = Customer360Queries(store)

    Running.write = staticmethod(write)  # type: ignore[attr-defined]
    Running.sell = staticmethod(sell)  # type: ignore[attr-defined]
    Running.define = staticmethod(define)  # type: ignore[attr-defined]
    yield Running
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_read_returns_as_soon_as_its_write_is_applied(running):
    await running.write(person_registered("ryw", 10))
    doc = await running.queries.get_customer360("ryw", {"contacts": 10}, 5000)
    assert doc["display_name"] == "Ada Lovelace"

    read = asyncio.create_task(running.queries.get_customer360("ryw", {"contacts": 11}, 5000))
    await asyncio.sleep(0.3)
    assert not read.done(), "the read must wait for position 11"
    written = time.monotonic()
    await running.write(interaction("ryw", 11, "i-1", "asked for a quote"))
    doc = await read
    latency = time.monotonic() - written
    assert doc["positions"]["contacts"] == 11
    assert doc["timeline"][0]["summary"] == "asked for a quote"
    assert latency < 1.0, f"the read saw its write only after {latency:.2f} s"


async def test_a_wait_for_a_position_never_applied_times_out(running):
    await running.write(person_registered("late", 1))
    await running.queries.get_customer360("late", {"contacts": 1})
    started = time.monotonic()
    with pytest.raises(WaitTimedOut, match="contacts position 99"):
        await running.queries.get_customer360("late", {"contacts": 99}, 300)
    assert 0.29 < time.monotonic() - started < 1.5


async def test_an_unknown_customer_is_not_found_at_once(running):
    started = time.monotonic()
    with pytest.raises(NotFound):
        await running.queries.get_customer360("nobody")
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("wait_for", "timeout_ms", "field"),
    [
        ({"pipeline-x": 3}, None, "wait_for"),
        ({"contacts": -1}, None, "wait_for"),
        ({"contacts": 1}, 30001, "wait_timeout_ms"),
        ({}, -5, "wait_timeout_ms"),
        ({"ticket": 1}, None, "wait_for"),
        ({"erp.orders": -2}, None, "wait_for"),
        ({"loyalty": 2**63}, None, "wait_for"),
    ],
)
async def test_invalid_reads_are_refused_naming_the_field(running, wait_for, timeout_ms, field):
    with pytest.raises(ValidationFailed) as refused:
        await running.queries.get_customer360("x", wait_for, timeout_ms)
    assert [e.field for e in refused.value.errors] == [field]


@pytest.fixture
async def http(running, identity: Identity) -> AsyncIterator[httpx.AsyncClient]:
    """The REST app behind the real gate, called by a sales user (who sees every field)."""
    key = identity.pseudonym_key.read_bytes().strip()
    app = create_app(running.queries, gate_for("analytics", identity), key)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://analytics", headers=bearer(identity.mint("sales"))
    ) as client:
        yield client


async def test_rest_shows_the_360_view_as_json(running, http):
    await running.write(
        company_registered("acme", 1, "Acme"),
        person_registered("ada", 2),
        linked("ada", 3, "acme", "Acme", role="cto"),
        interaction("ada", 4, "i-1", "demo call"),
        company_renamed("acme", 5, "Acme Analytical"),
    )
    response = await http.get(
        "/customers/ada/360",
        params=[("wait_for", "contacts:4"), ("timeout_ms", "5000")],
    )
    assert response.status_code == 200, response.text
    ada = response.json()
    assert ada["customer_id"] == "ada"
    assert ada["kind"] == "person"
    assert ada["lifecycle_stage"] == "lead"
    assert ada["channels"][0]["channel"] == "email"
    assert ada["channels"][0]["consent"]["status"] == "granted"
    assert ada["channels"][0]["consent"]["recorded_at"] == "2026-11-02T09:00:00.000Z"
    budget = {"type": "money", "value": "1234.50", "currency": "EUR"}
    assert ada["custom_fields"] == {"budget": budget}
    kinds = [e["kind"] for e in ada["timeline"]]
    assert kinds == ["interaction.call", "company.linked", "profile.created"]
    assert ada["timeline"][1]["summary"] == "Linked to Acme as cto"
    assert ada["timeline"][0]["direction"] == "outbound"
    assert ada["timeline"][0]["occurred_at"] == "2026-11-02T09:04:00.000Z"
    assert ada["updated_at"] == "2026-11-02T09:04:00.000Z"
    assert ada["positions"] == {"contacts": 4}

    # The rename reaches Ada's view once the company's position 5 is applied.
    acme = (await http.get("/customers/acme/360", params={"wait_for": "contacts:5"})).json()
    assert acme["members"] == [
        {"person_id": "ada", "role": "cto", "since": "2026-11-02T09:03:00.000Z"}
    ]
    ada = (await http.get("/customers/ada/360")).json()
    assert ada["companies"] == [
        {"company_id": "acme", "company_name": "Acme Analytical", "role": "cto"}
    ]


async def test_an_analyst_reads_names_addresses_and_timeline_texts_as_pseudonyms(
    running, http, identity: Identity
):
    """The 360 view shows an analyst the person no more than contacts' GetContact
    does: names, addresses and the timeline's texts (which quote interactions)
    as stable pseudonyms; counts and kinds stay readable."""
    await running.write(person_registered("eve", 1), interaction("eve", 2, "i-9", "spoke with Eve"))
    clear = (await http.get("/customers/eve/360", params={"wait_for": "contacts:2"})).json()
    analyst = bearer(identity.mint("analyst"))
    seen = [(await http.get("/customers/eve/360", headers=analyst)).json() for _ in range(2)]
    assert seen[0] == seen[1], "a pseudonym is stable from one read to the next"
    masked = seen[0]
    for name in ("display_name", "given_name", "family_name"):
        assert clear[name]
        assert masked[name].startswith("pseudonym:") and clear[name] not in masked[name]
    assert masked["channels"][0]["address"].startswith("pseudonym:")
    assert masked["channels"][0]["channel"] == clear["channels"][0]["channel"]
    assert [e["kind"] for e in masked["timeline"]] == [e["kind"] for e in clear["timeline"]]
    assert all(e["summary"].startswith("pseudonym:") for e in masked["timeline"] if e["summary"])
    assert "spoke with Eve" not in str(masked)


async def test_rest_errors_are_404_504_and_422(running, http):
    await running.write(person_registered("bob", 1))
    await running.queries.get_customer360("bob", {"contacts": 1})

    missing = await http.get("/customers/nobody/360")
    assert missing.status_code == 404
    assert missing.json()["error"] == "NotFound"

    slow = await http.get("/customers/bob/360?wait_for=contacts:50&timeout_ms=200")
    assert slow.status_code == 504
    assert slow.json()["error"] == "WaitTimedOut"

    for bad in ("contacts", "contacts:abc", ":5", "contacts:-3"):
        malformed = await http.get("/customers/bob/360", params={"wait_for": bad})
        assert malformed.status_code == 422, bad
        assert [d["field"] for d in malformed.json()["detail"]] == ["wait_for"]

    unknown = await http.get("/customers/bob/360", params={"wait_for": "billing:5"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["field"] == "wait_for"

    too_long = await http.get("/customers/bob/360?wait_for=contacts:1&timeout_ms=30001")
    assert too_long.status_code == 422
    assert too_long.json()["detail"][0]["field"] == "timeout_ms"


# -- deals ----------------------------------------------------------------------------------


async def test_a_read_waits_for_its_pipeline_write(running):
    await running.write(person_registered("cus", 3))
    await running.define(deals.pipeline_defined(1))
    await running.sell(deals.opened("cus", 2, "d-1", "900.00"))
    doc = await running.queries.get_customer360("cus", {"contacts": 3, "pipeline": 2}, 5000)
    assert [d["status"] for d in doc["deals"]] == ["open"]

    read = asyncio.create_task(running.queries.get_customer360("cus", {"pipeline": 4}, 5000))
    await asyncio.sleep(0.3)
    assert not read.done(), "the read must wait for pipeline position 4"
    await running.sell(
        deals.moved("cus", 3, "d-1", 2, "negotiate"), deals.won("cus", 4, "d-1", 3, "900.00")
    )
    doc = await read
    assert doc["positions"] == {"contacts": 3, "pipeline": 4}
    [deal] = doc["deals"]
    assert (deal["status"], deal["stage_id"], deal["stage_name"]) == ("won", "won", "Closed won")
    assert doc["lifetime_won_revenue"] == [{"amount": "900.00", "currency": "EUR"}]

    with pytest.raises(WaitTimedOut, match="pipeline position 99"):
        await running.queries.get_customer360("cus", {"pipeline": 99}, 200)


async def test_a_customer_known_only_from_its_deals_is_shown(running):
    # The lead conversion registered the person in contacts, but the contacts
    # projection has not got there yet: the deal is shown all the same.
    await running.sell(deals.opened("fresh", 7, "d-7", "50.00"))
    doc = await running.queries.get_customer360("fresh", {"pipeline": 7}, 5000)
    assert doc["deals"][0]["opportunity_id"] == "d-7"
    assert "kind" not in doc
    await running.write(person_registered("fresh", 20))
    doc = await running.queries.get_customer360("fresh", {"contacts": 20}, 5000)
    assert doc["kind"] == "person"
    assert doc["deals"][0]["opportunity_id"] == "d-7"


async def test_rest_shows_the_deals_and_the_lifetime_revenue(running, http):
    await running.write(company_registered("acme", 1, "Acme"))
    await running.define(deals.pipeline_defined(1))
    await running.sell(
        deals.opened("acme", 2, "d-1", "1200.00", name="Gears"),
        deals.opened("acme", 3, "d-2", "300.50", "USD", name="Levers"),
        deals.opened("acme", 4, "d-3", "75.25", name="Cogs"),
        deals.won("acme", 5, "d-1", 2, "1200.00"),
        deals.won("acme", 6, "d-3", 2, "75.25"),
        deals.lost("acme", 7, "d-2", 2, "no budget"),
    )
    response = await http.get(
        "/customers/acme/360", params=[("wait_for", "pipeline:7"), ("wait_for", "contacts:1")]
    )
    assert response.status_code == 200, response.text
    acme = response.json()
    assert acme["kind"] == "company"
    assert acme["lifetime_won_revenue"] == [{"amount": "1275.25", "currency": "EUR"}]
    assert [d["name"] for d in acme["deals"]] == ["Cogs", "Levers", "Gears"]
    _, levers, gears = acme["deals"]
    assert levers == {
        "opportunity_id": "d-2",
        "version": 2,
        "name": "Levers",
        "pipeline_id": "pl-sales",
        "pipeline_name": "Sales",
        "stage_id": "lost",
        "stage_name": "Closed lost",
        "amount": {"amount": "300.50", "currency": "USD"},
        "status": "lost",
        "expected_close_date": "2026-12-31",
        "owner": "grace",
        "person_id": "acme",
        "company_id": "",
        "kind": "new_business",
        "opened_at": "2026-11-02T09:03:30.000Z",
        "stage_entered_at": "2026-11-02T09:07:30.000Z",
        "closed_on": "2026-11-21",
        "closed_at": "2026-11-02T09:07:30.000Z",
        "lost_reason": "no budget",
    }
    assert gears["status"] == "won"
    assert gears["closed_on"] == "2026-11-20"
    assert [e["kind"] for e in acme["timeline"][:2]] == ["deal.lost", "deal.won"]
    assert acme["positions"] == {"contacts": 1, "pipeline": 7}

    # A stage rename shows in every deal in that stage, without rewriting them.
    await running.define(deals.stage_renamed(8, 2, "won", "Signed"))
    acme = (await http.get("/customers/acme/360")).json()
    assert [(d["name"], d["stage_name"]) for d in acme["deals"]] == [
        ("Cogs", "Signed"),
        ("Levers", "Closed lost"),
        ("Gears", "Signed"),
    ]

    # A customer known only from its deals: kind unset (null), no profile fields.
    await running.sell(deals.opened("solo", 9, "d-9", "5.00"))
    solo = (await http.get("/customers/solo/360", params={"wait_for": "pipeline:9"})).json()
    assert solo["kind"] is None
    assert solo["lifecycle_stage"] is None
    assert "given_name" not in solo and "domain" not in solo
    assert solo["deals"][0]["amount"] == {"amount": "5.00", "currency": "EUR"}
    assert solo["lifetime_won_revenue"] == []


async def test_grpc_message_carries_the_deals_and_the_revenue(running):
    await running.write(person_registered("grc", 1))
    await running.define(deals.pipeline_defined(1))
    await running.sell(
        deals.opened("grc", 2, "d-1", "19.99", "GBP", name="Manual"),
        deals.won("grc", 3, "d-1", 2, "19.99", "GBP"),
        deals.opened("grc", 4, "d-2", "5.01", "GBP", name="Spare"),
        deals.won("grc", 5, "d-2", 2, "5.01", "GBP", closed_on="2026-11-22"),
        deals.reopened("grc", 6, "d-2", 3, "negotiate"),
    )
    doc = await running.queries.get_customer360("grc", {"pipeline": 6}, 5000)
    message = customer360_pb2.Customer360.FromString(to_proto(doc).SerializeToString())
    assert [(m.amount, m.currency) for m in message.lifetime_won_revenue] == [("19.99", "GBP")]
    spare, manual = message.deals
    assert manual.status == pipeline_pb2.OPPORTUNITY_STATUS_WON
    assert (manual.amount.amount, manual.amount.currency) == ("19.99", "GBP")
    assert (manual.stage_id, manual.stage_name, manual.pipeline_name) == (
        "won",
        "Closed won",
        "Sales",
    )
    assert manual.closed_on == "2026-11-20"
    assert manual.closed_at.ToDatetime(tzinfo=UTC) == deals.when(3)
    assert spare.status == pipeline_pb2.OPPORTUNITY_STATUS_OPEN
    assert (spare.stage_id, spare.stage_name) == ("negotiate", "Negotiation")
    assert spare.closed_on == "" and not spare.HasField("closed_at")
    assert spare.version == 3
    assert spare.kind == pipeline_pb2.OPPORTUNITY_KIND_NEW_BUSINESS
    assert message.positions["pipeline"] == 6


def test_a_document_written_before_unset_became_null_reads_as_unset():
    # Documents written before the change spelled unset "unspecified"; a rebuild
    # rewrites them, and until then both adapters read it as unset.
    old = {
        "_id": "old",
        "customer_id": "old",
        "kind": "person",
        "display_name": "Ada",
        "given_name": "Ada",
        "family_name": "",
        "lifecycle_stage": "unspecified",
        "tags": [],
        "custom_fields": {},
        "owner": "",
        "channels": [
            {
                "channel": "unspecified",
                "address": "ada@example.com",
                "preferred": False,
                "consent": {"status": "unspecified", "source": "", "recorded_at": None},
            }
        ],
        "companies": [],
        "timeline": [
            {
                "entry_id": "d-1:1",
                "source": "pipeline",
                "kind": "deal.opened",
                "summary": "Deal opened",
                "occurred_at": None,
                "direction": "unspecified",
                "channel": "unspecified",
                "owner": "",
                "position": 1,
            }
        ],
        "deals": [
            {
                "opportunity_id": "d-1",
                "version": 1,
                "name": "",
                "pipeline_id": "",
                "stage_id": "",
                "status": "open",
                "amount": "1.00",
                "currency": "EUR",
                "expected_close_date": "",
                "owner": "",
                "person_id": "",
                "company_id": "",
                "kind": "unspecified",
                "opened_at": None,
                "stage_entered_at": None,
                "closed_on": "",
                "closed_at": None,
                "lost_reason": "",
            }
        ],
        "positions": {"contacts": 1, "pipeline": 1},
    }
    body = to_json(old)
    assert body["lifecycle_stage"] is None
    assert body["channels"][0]["channel"] is None
    assert body["channels"][0]["consent"]["status"] is None
    assert (body["timeline"][0]["direction"], body["timeline"][0]["channel"]) == (None, None)
    assert body["deals"][0]["kind"] is None

    message = to_proto(old)
    assert message.lifecycle_stage == contacts_pb2.LIFECYCLE_STAGE_UNSPECIFIED
    assert message.channels[0].channel == contacts_pb2.CHANNEL_UNSPECIFIED
    assert message.channels[0].consent.status == contacts_pb2.CONSENT_STATUS_UNSPECIFIED
    assert message.timeline[0].direction == contacts_pb2.DIRECTION_UNSPECIFIED
    assert message.deals[0].kind == pipeline_pb2.OPPORTUNITY_KIND_UNSPECIFIED


# -- the audit trail ----------------------------------------------------------------------


async def test_the_audit_trail_has_one_entry_per_event_redeliveries_included_once(running):
    registered = person_registered("aud", 1)
    await running.write(registered)
    await running.write(interaction("aud", 2, "i-1", "call"))
    await running.sell(deals.lead_created(1, "lead-1"))  # no customer yet: keyed by the lead
    await running.sell(deals.opened("aud", 2, "d-1", "10.00"))
    await running.write(registered)  # the relay publishing a suffix again
    await running.queries.get_customer360("aud", {"contacts": 2, "pipeline": 2}, 5000)

    async def trail(**question: str) -> list[tuple[str, str, int]]:
        for _ in range(100):  # the lead's entry commits with its own batch
            page = await running.queries.get_audit_trail(**question)
            if page.entries:
                break
            await asyncio.sleep(0.05)
        return [(e["source"], e["event_type"], e["position"]) for e in page.entries]

    assert await trail(customer_id="aud") == [
        ("pipeline", "crm.pipeline.v1.OpportunityOpened", 2),
        ("contacts", "crm.contacts.v1.InteractionLogged", 2),
        ("contacts", "crm.contacts.v1.PersonRegistered", 1),
    ]
    assert await trail(customer_id="lead-1") == [("pipeline", "crm.pipeline.v1.LeadCreated", 1)]
    by_actor = await running.queries.get_audit_trail(actor="ada", page_size=1)
    [entry] = by_actor.entries
    assert (entry["actor"], entry["client"]) == ("ada", "test")
    assert by_actor.next_page_token is not None


@pytest.mark.parametrize(
    "value",
    [
        "tickets:9223372036854775808",
        "loyalty:123456789012345678901234",
        "erp.orders:",
        "tickets:-1",
        "tickets:\u00b2",
        "42",
    ],
)
def test_a_rest_wait_for_that_is_no_position_is_refused_naming_it(value):
    with pytest.raises(ValidationFailed) as refused:
        parse_wait_for([value])
    assert [e.field for e in refused.value.errors] == ["wait_for"]


def test_rest_wait_for_takes_every_source_and_the_erp_position():
    assert parse_wait_for(
        ["tickets:7", "loyalty:9", "erp.orders:9223372036854775807", "tickets:3"]
    ) == {"tickets": 7, "loyalty": 9, "erp.orders": 2**63 - 1}
