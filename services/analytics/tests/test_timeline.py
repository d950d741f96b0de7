"""The 360 view's whole timeline: what reaches it, the timeline collection the
projector keeps next to the documents, and ListTimeline's pages over the real
document store (REST here; gRPC through the real processes in test_access.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pipeline_events as deals
import pytest
from contact_events import (
    T0,
    consent,
    envelope,
    interaction,
    linked,
    person_profile,
    person_registered,
    publish,
    unlinked,
)
from pymongo.database import Database
from test_merged_customers import merged, merged_into

from crm.contacts.v1 import contacts_pb2
from crm.events.v1 import contacts_pb2 as contact_events_pb2
from crm.events.v1 import pipeline_pb2 as events_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_analytics.document import TIMELINE_LIMIT
from crm_analytics.from_contacts import apply_event
from crm_analytics.from_pipeline import apply_pipeline_event
from crm_analytics.personal_data import erase_document
from crm_analytics.query import Customer360Queries
from crm_analytics.rest_api import create_app
from crm_analytics.store import Customer360Store
from crm_analytics.timeline import STATS_COLLECTION, TIMELINE_COLLECTION, parse_page_token
from crm_analytics.timeline_view import timeline_request
from crm_common.errors import ValidationFailed
from crm_common.privacy import REDACTED
from crm_common.projection import ProjectionConsumer
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for

# -- what reaches the timeline (pure) ------------------------------------------------------


def updated(contact_id: str, position: int, stage: int, cause: str = "") -> Any:
    event = envelope(contact_id, position, 2)
    event.person_profile_updated.CopyFrom(
        contact_events_pb2.PersonProfileUpdated(
            profile=person_profile(stage=stage),
            changed_fields=["lifecycle_stage"],
            cause=cause,
        )
    )
    return event


def erased(contact_id: str, position: int) -> Any:
    event = envelope(contact_id, position, 9)
    event.person_erased.reference = "dsr-7"
    return event


def activity(
    customer_id: str, activity_id: str, position: int, version: int, payload: str, **fields: Any
) -> Any:
    event = deals.envelope(customer_id, activity_id, position, version)
    message = {
        "activity_scheduled": events_pb2.ActivityScheduled,
        "activity_completed": events_pb2.ActivityCompleted,
        "activity_cancelled": events_pb2.ActivityCancelled,
        "activity_rescheduled": events_pb2.ActivityRescheduled,
    }[payload](**fields)
    getattr(event, payload).CopyFrom(message)
    return event


def scheduled(customer_id: str, activity_id: str, position: int, title: str, kind: int) -> Any:
    return activity(
        customer_id,
        activity_id,
        position,
        1,
        "activity_scheduled",
        kind=kind,
        title=title,
        owner="grace",
        subject_kind=pipeline_pb2.SUBJECT_KIND_OPPORTUNITY,
        subject_id="d-1",
    )


def kinds_and_summaries(doc: Any) -> list[tuple[str, str]]:
    return [(e["kind"], e["summary"]) for e in doc["timeline"]]


def test_lifecycle_consent_and_company_links_reach_the_timeline() -> None:
    doc = None
    for event in (
        person_registered("ada", 1),
        updated("ada", 2, contacts_pb2.LIFECYCLE_STAGE_CUSTOMER, cause="deal_won: d-9"),
        updated("ada", 3, contacts_pb2.LIFECYCLE_STAGE_ADVOCATE),
        consent("ada", 4, "ada@example.org", contacts_pb2.CONSENT_STATUS_WITHDRAWN),
        linked("ada", 5, "acme", "Acme", role="cto"),
        unlinked("ada", 6, "acme"),
    ):
        doc = apply_event(doc, event).doc
    assert kinds_and_summaries(doc) == [
        ("company.unlinked", "Unlinked from company acme"),
        ("company.linked", "Linked to Acme as cto"),
        (
            "consent.recorded",
            "Consent withdrawn for email ada@example.org (call:agent-7)",
        ),
        ("profile.lifecycle_changed", "Lifecycle stage customer -> advocate"),
        ("profile.lifecycle_changed", "Lifecycle stage lead -> customer (deal_won: d-9)"),
        ("profile.created", "Person Ada Lovelace registered"),
    ]
    # An update that leaves the stage as it is adds nothing.
    again = apply_event(doc, updated("ada", 7, contacts_pb2.LIFECYCLE_STAGE_ADVOCATE)).doc
    assert len(again["timeline"]) == len(doc["timeline"])


def test_activities_and_tasks_reach_the_timeline_with_their_titles() -> None:
    doc = None
    for event in (
        scheduled("ada", "a-1", 1, "Call about the renewal", pipeline_pb2.ACTIVITY_KIND_CALL),
        scheduled("ada", "a-2", 2, "Send the contract", pipeline_pb2.ACTIVITY_KIND_TASK),
        scheduled("ada", "a-3", 3, "Visit", pipeline_pb2.ACTIVITY_KIND_FOLLOW_UP),
        activity("ada", "a-1", 4, 2, "activity_completed", outcome="renews in May"),
        activity("ada", "a-2", 5, 2, "activity_cancelled", reason="sent by mail"),
        activity("ada", "a-3", 6, 2, "activity_rescheduled"),
    ):
        doc = apply_pipeline_event(doc, event).doc
    assert kinds_and_summaries(doc) == [
        ("activity.cancelled", "Task cancelled: Send the contract (sent by mail)"),
        ("activity.completed", "Call completed: Call about the renewal (renews in May)"),
        ("activity.scheduled", "Follow up scheduled: Visit"),
        ("activity.scheduled", "Task scheduled: Send the contract"),
        ("activity.scheduled", "Call scheduled: Call about the renewal"),
    ]
    assert {e["owner"] for e in doc["timeline"]} == {"grace"}
    # Only the open activity's title is kept, and an erase redacts it with the summaries.
    assert list(doc["activities"]) == ["a-3"]
    gone = erase_document(doc)
    assert gone["activities"]["a-3"]["title"] == REDACTED
    assert {e["summary"] for e in gone["timeline"]} == {REDACTED}
    # Completed after the erase: the entry names no title (and is redacted anyway).
    later = apply_pipeline_event(gone, activity("ada", "a-3", 7, 3, "activity_completed")).doc
    assert later["timeline"][0]["summary"] == "Follow up completed: [erased]"


@pytest.mark.parametrize(
    ("page_size", "page_token", "sources", "field"),
    [
        (-1, "", [], "page_size"),
        (501, "", [], "page_size"),
        (10, "not-a-token", [], "page_token"),
        (10, "eyJ0IjogMX0", [], "page_token"),
        (10, "", ["billing"], "sources"),
    ],
)
def test_a_bad_page_question_is_refused_naming_the_field(
    page_size: int, page_token: str, sources: list[str], field: str
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        timeline_request("ada", page_size, page_token, sources)
    assert [e.field for e in refused.value.errors] == [field]


# -- over the real document store ------------------------------------------------------------


@pytest.fixture
async def projector(
    analytics_servers: Any, database: Database[Any], topic: str, pipeline_topic: str
) -> AsyncIterator[Any]:
    """A projector following the test's topics; the store and queries over it."""
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
    bootstrap = analytics_servers.kafka_bootstrap

    class Projector:
        queries = Customer360Queries(store)

        @staticmethod
        async def write(*events: Any) -> None:
            await publish(bootstrap, topic, list(events))

        @staticmethod
        async def sell(*events: Any) -> None:
            await deals.publish(bootstrap, pipeline_topic, list(events))

        @staticmethod
        async def applied(customer_id: str, source: str, position: int) -> None:
            await Projector.queries.get_customer360(customer_id, {source: position}, 30000)

    Projector.store = store  # type: ignore[attr-defined]
    Projector.consumer = consumer  # type: ignore[attr-defined]
    yield Projector
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def as_role(projector: Any, identity: Identity) -> AsyncIterator[Any]:
    """`as_role(role, client=...)`: the REST app behind the real gate, called with that role."""
    key = identity.pseudonym_key.read_bytes().strip()
    app = create_app(projector.queries, gate_for("analytics", identity), key)
    transport = httpx.ASGITransport(app=app)
    clients: list[httpx.AsyncClient] = []

    def client(role: str, client: str = "console") -> httpx.AsyncClient:
        made = httpx.AsyncClient(
            transport=transport,
            base_url="http://analytics",
            headers=bearer(identity.mint(role, client=client)),
        )
        clients.append(made)
        return made

    yield client
    for made in clients:
        await made.aclose()


async def all_pages(http: httpx.AsyncClient, customer: str, **params: Any) -> list[Any]:
    """Every page of the customer's timeline, each as it came."""
    pages: list[Any] = []
    token = None
    while True:
        query = {**params, **({"page_token": token} if token else {})}
        response = await http.get(f"/customers/{customer}/timeline", params=query)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        token = pages[-1]["next_page_token"]
        if token is None:
            return pages


ENTRIES = 1200


async def test_1200_entries_page_through_newest_first_with_concurrent_new_entries(
    projector: Any, as_role: Any, database: Database[Any]
) -> None:
    interactions = [
        interaction("big", i + 2, f"i-{i:04d}", f"call {i}", occurred=T0 + timedelta(minutes=i + 2))
        for i in range(ENTRIES - 1)
    ]
    await projector.write(person_registered("big", 1), *interactions)
    await projector.applied("big", "contacts", ENTRIES)
    stored = database[TIMELINE_COLLECTION]
    assert stored.count_documents({"customer_id": "big"}) == ENTRIES
    # The document keeps its newest 500, as before.
    view = await projector.queries.get_customer360("big")
    assert len(view["timeline"]) == TIMELINE_LIMIT

    http = as_role("sales")
    seen: list[str] = []
    totals: list[int] = []
    token = None
    page_times: list[float] = []
    position = ENTRIES
    while True:
        params: dict[str, Any] = {"page_size": 100}
        if token:
            params["page_token"] = token
        started = time.perf_counter()
        response = await http.get("/customers/big/timeline", params=params)
        page_times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [e["entry_id"] for e in page["entries"]]
        totals.append(page["total"])
        token = page["next_page_token"]
        if token is None:
            break
        if len(totals) in (3, 7):
            # New entries while the client pages: one newer than everything
            # (not in this paging: it would be on a new first page), one that
            # happened long ago and is logged late (still ahead of the cursor).
            position += 1
            await projector.write(
                interaction("big", position, f"new-{position}", "fresh", T0 + timedelta(days=9))
            )
            position += 1
            await projector.write(
                interaction("big", position, f"old-{position}", "late", T0 - timedelta(days=9))
            )
            await projector.applied("big", "contacts", position)
    late = [f"old-{ENTRIES + 2}", f"old-{ENTRIES + 4}"]
    expected = [f"i-{i:04d}" for i in reversed(range(ENTRIES - 1))] + ["big:created", *late[::-1]]
    assert seen == expected, "every entry once, newest first, no gap"
    assert totals[0] == ENTRIES and totals[-1] == ENTRIES + 4
    first = (await http.get("/customers/big/timeline", params={"page_size": 3})).json()
    assert [e["entry_id"] for e in first["entries"]] == [
        f"new-{ENTRIES + 3}",
        f"new-{ENTRIES + 1}",
        "i-1198",
    ]
    assert first["entries"][2] == {
        "entry_id": "i-1198",
        "source": "contacts",
        "kind": "interaction.call",
        "summary": "call 1198",
        "occurred_at": (T0 + timedelta(minutes=1200)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "direction": "outbound",
        "channel": "phone",
        "owner": "grace",
    }
    print(f"\n{len(page_times)} pages of 100 of {ENTRIES}: max {max(page_times) * 1000:.0f} ms")

    # The default page is 50; a token is opaque but names where it stands.
    default = (await http.get("/customers/big/timeline")).json()
    assert len(default["entries"]) == 50
    assert parse_page_token(default["next_page_token"])


async def test_filters_roles_and_bad_questions(projector: Any, as_role: Any) -> None:
    await projector.write(
        person_registered("ada", 1, tags=["partner:acme"]),
        interaction("ada", 2, "i-1", "spoke with Ada about gears"),
        person_registered("eve", 3),
    )
    await projector.sell(
        deals.opened("ada", 1, "d-1", "1200.00", name="Gears"),
        scheduled("ada", "a-1", 2, "Demo for Ada", pipeline_pb2.ACTIVITY_KIND_MEETING),
    )
    await projector.applied("ada", "contacts", 2)
    await projector.applied("ada", "pipeline", 2)
    sales = as_role("sales")

    everything = (await sales.get("/customers/ada/timeline")).json()
    assert [e["kind"] for e in everything["entries"]] == [
        "activity.scheduled",
        "interaction.call",
        "deal.opened",
        "profile.created",
    ]
    assert everything["total"] == 4
    assert everything["entries"][0]["summary"] == "Meeting scheduled: Demo for Ada"
    deal_summary = everything["entries"][2]["summary"]
    assert deal_summary == "Deal Gears opened (1200.00 EUR)"
    assert deal_summary.endswith("(1200.00 EUR)")
    pipeline = (await sales.get("/customers/ada/timeline", params={"source": "pipeline"})).json()
    assert [e["entry_id"] for e in pipeline["entries"]] == ["a-1:1", "d-1:1"]
    assert pipeline["total"] == 2
    both = await sales.get("/customers/ada/timeline", params=[("source", "pipeline")] * 2)
    assert both.json()["total"] == 2

    # Service agents see no amounts, in the timeline either.
    service = (await as_role("service").get("/customers/ada/timeline")).json()
    assert service["entries"][2]["summary"] == "Deal Gears opened"

    # Analysts: the summaries as the same pseudonyms as the 360 view's timeline.
    analyst = as_role("analyst")
    masked = (await analyst.get("/customers/ada/timeline")).json()
    view = (await analyst.get("/customers/ada/360")).json()
    assert {e["entry_id"]: e["summary"] for e in masked["entries"]} == {
        e["entry_id"]: e["summary"] for e in view["timeline"]
    }
    assert all(e["summary"].startswith("pseudonym:") for e in masked["entries"])
    assert "Ada" not in str(masked)

    # Partners: a customer not tagged for them is refused; a tagged one shows
    # no timeline, as its 360 view does.
    partner = as_role("partner", client="acme")
    refused = await partner.get("/customers/eve/timeline")
    assert refused.status_code == 403
    assert (await partner.get("/customers/nobody/timeline")).status_code == 403
    tagged = await partner.get("/customers/ada/timeline")
    assert tagged.status_code == 200
    assert tagged.json() == {
        "customer_id": "ada",
        "entries": [],
        "next_page_token": None,
        "total": 0,
    }

    missing = await sales.get("/customers/nobody/timeline")
    assert missing.status_code == 404
    assert missing.json()["error"] == "NotFound"
    for params, field in (
        ({"page_size": 0}, None),
        ({"page_size": 501}, "page_size"),
        ({"page_size": -3}, "page_size"),
        ({"page_token": "bm9wZQ"}, "page_token"),
        ({"source": "billing"}, "source"),
    ):
        answer = await sales.get("/customers/ada/timeline", params=params)
        if field is None:
            assert answer.status_code == 200
            continue
        assert answer.status_code == 422, params
        assert [d["field"] for d in answer.json()["detail"]] == [field], params


async def test_a_survivor_pages_through_the_merged_contacts_entries(
    projector: Any, as_role: Any
) -> None:
    await projector.write(
        person_registered("ada", 1),
        person_registered("dup", 2),
        interaction("dup", 3, "i-dup", "asked for a quote"),
        merged("ada", 4, "dup"),
        merged_into("dup", "ada", 5),
    )
    await projector.applied("dup", "contacts", 5)
    await projector.applied("ada", "contacts", 4)
    sales = as_role("sales")
    survivor = (await sales.get("/customers/ada/timeline", params={"page_size": 2})).json()
    assert survivor["total"] == 4
    pages = await all_pages(sales, "ada", page_size=2)
    ids = [e["entry_id"] for p in pages for e in p["entries"]]
    assert ids == ["ada:merge:m-1", "i-dup", "dup:created", "ada:created"]
    # The merged contact's id answers with the survivor's timeline.
    assert (await all_pages(sales, "dup", page_size=2)) == pages
    for page in pages:
        assert page["customer_id"] == "ada"


async def test_an_erase_redacts_the_whole_timeline_and_a_rebuild_gives_the_same(
    analytics_servers: Any, projector: Any, database: Database[Any]
) -> None:
    interactions = [
        interaction("gone", i + 2, f"g-{i}", f"Gone said {i}", occurred=T0 + timedelta(minutes=i))
        for i in range(TIMELINE_LIMIT + 100)
    ]
    last = TIMELINE_LIMIT + 101
    await projector.write(
        person_registered("gone", 1),
        *interactions,
        updated("gone", last + 1, contacts_pb2.LIFECYCLE_STAGE_CUSTOMER, cause="deal_won: d-1"),
        person_registered("kept", last + 2),
        interaction("kept", last + 3, "k-1", "Kept said hello"),
    )
    await projector.sell(
        scheduled("gone", "a-1", 1, "Call Gone back", pipeline_pb2.ACTIVITY_KIND_CALL)
    )
    await projector.applied("kept", "contacts", last + 3)
    await projector.applied("gone", "pipeline", 1)
    stored = database[TIMELINE_COLLECTION]
    # The oldest entries are no longer in the document, only in the collection.
    assert stored.find_one({"_id": "g-0"})["summary"] == "Gone said 0"

    await projector.write(erased("gone", last + 4))
    await projector.applied("gone", "contacts", last + 4)
    rows = list(stored.find({"customer_id": "gone"}))
    assert len(rows) == TIMELINE_LIMIT + 100 + 4
    summaries = {r["kind"]: set() for r in rows}
    for row in rows:
        summaries[row["kind"]].add(row["summary"])
    assert summaries == {
        "interaction.call": {REDACTED},
        "profile.created": {REDACTED},
        "activity.scheduled": {REDACTED},
        "profile.lifecycle_changed": {"Lifecycle stage lead -> customer (deal_won: d-1)"},
        "profile.erased": {"Personal data erased (dsr-7)"},
    }
    assert "Gone" not in str(rows)
    assert stored.find_one({"_id": "k-1"})["summary"] == "Kept said hello"
    # A later entry of the erased person is stored redacted too.
    await projector.sell(
        activity("gone", "a-1", 2, 2, "activity_completed", outcome="Gone will call")
    )
    await projector.applied("gone", "pipeline", 2)
    assert stored.find_one({"_id": "a-1:2"})["summary"] == REDACTED

    # The rebuild (what `crm-analytics rebuild` does): the same collection.
    before = sorted(stored.find(), key=lambda r: r["_id"])
    stats = list(database[STATS_COLLECTION].find({}, {"_id": 1, "counts": 1, "oldest": 1}))
    assert {s["_id"]: s["counts"] for s in stats} == {
        "gone": {"contacts": TIMELINE_LIMIT + 100 + 3, "pipeline": 2},
        "kept": {"contacts": 2},
    }
    store = projector.store
    await asyncio.to_thread(store.drop)
    await asyncio.to_thread(store.ensure_indexes)
    rebuilt = Customer360Store(database, topics=store.topics)
    consumer = ProjectionConsumer(
        projection="customer360-rebuild-check",
        topics=list(store.topics.values()),
        read_model=rebuilt,
        mongo=database.client,
        database=database.name,
        bootstrap=analytics_servers.kafka_bootstrap,
        poll_timeout_ms=50,
    )
    await consumer.run_until_caught_up()
    after = sorted(stored.find(), key=lambda r: r["_id"])
    assert after == before
    assert list(database[STATS_COLLECTION].find({}, {"_id": 1, "counts": 1, "oldest": 1})) == stats
