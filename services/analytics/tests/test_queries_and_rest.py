"""Read-your-writes and the REST API, in process, over the real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from contact_events import (
    company_registered,
    company_renamed,
    interaction,
    linked,
    person_registered,
    publish,
)
from pymongo.database import Database

from crm_analytics.customer360 import Doc
from crm_analytics.query import Customer360Queries
from crm_analytics.rest_api import create_app
from crm_analytics.store import Customer360Store
from crm_common.errors import NotFound, ValidationFailed, WaitTimedOut
from crm_common.projection import ProjectionConsumer
from crm_common.server import install_error_handlers


@pytest.fixture
async def running(analytics_servers, database: Database[Doc], topic: str) -> AsyncIterator[Any]:
    """A projector following the test's topic, and the queries over its store."""
    store = Customer360Store(database, topics=[topic])
    consumer = ProjectionConsumer(
        projection="customer360",
        topics=[topic],
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

    class Running:
        queries = Customer360Queries(store)

    Running.write = staticmethod(write)  # type: ignore[attr-defined]
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
    ],
)
async def test_invalid_reads_are_refused_naming_the_field(running, wait_for, timeout_ms, field):
    with pytest.raises(ValidationFailed) as refused:
        await running.queries.get_customer360("x", wait_for, timeout_ms)
    assert [e.field for e in refused.value.errors] == [field]


@pytest.fixture
async def http(running) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(running.queries)
    install_error_handlers(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://analytics") as client:
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
    assert [e["kind"] for e in ada["timeline"]] == ["interaction.call", "profile.created"]
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
