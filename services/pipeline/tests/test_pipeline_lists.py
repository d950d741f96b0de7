"""The lists the department consoles page through: leads by status and owner,
and activities due in a time range, on SQLite and PostgreSQL.

Pages follow one another without gaps or repeats, even when records are
added between two pages; a partner lists only the leads it brought; bad
filters, sizes and tokens are refused naming the field, and change nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import STAGES, Clock, sqlite_settings

from crm_common.auth.principal import Principal
from crm_common.commands import Caller
from crm_common.errors import PermissionDenied, ValidationFailed
from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.inputs import (
    ActivityQuery,
    LeadQuery,
    NewActivity,
    NewLead,
    NewOpportunity,
)

ANN = Caller(actor="ann", client="tests")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield sqlite_settings(tmp_path)
        return
    schema = f"pipeline_test_{uuid.uuid4().hex[:10]}"
    yield postgres_settings("pipeline", schema, tmp_path)
    drop_schema(schema)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(settings: Settings, clock: Clock) -> Iterator[PipelineService]:
    pipeline_service = PipelineService(create_application(settings), clock=clock)
    yield pipeline_service
    pipeline_service.close()


async def new_lead(service: PipelineService, clock: Clock, owner: str, n: int, **by: Any) -> str:
    clock.advance(minutes=1)
    caller = by.get("caller", ANN)
    written = await service.create_lead(
        caller, NewLead(family_name=f"Lead {n}", source="web", owner=owner, email=f"{n}@x.org")
    )
    return written.outcome.id


async def every_page(service: PipelineService, query: LeadQuery, **by: Any) -> list[list[str]]:
    pages = []
    while True:
        page = await service.list_leads(query, by.get("caller"))
        pages.append([lead.id for lead in page.leads])
        if not page.next_page_token:
            return pages
        query = LeadQuery(query.status, query.owner, query.page_size, page.next_page_token)


async def test_leads_are_listed_by_status_and_owner_in_keyset_pages(
    service: PipelineService, clock: Clock
) -> None:
    ids = [await new_lead(service, clock, ["ann", "bob"][n % 2], n) for n in range(9)]
    for lead_id in ids[:4]:
        await service.qualify_lead(ANN, lead_id, 70)
    await service.disqualify_lead(ANN, ids[4], "no budget")

    everything = await every_page(service, LeadQuery(page_size=4))
    assert everything == [ids[0:4], ids[4:8], ids[8:9]]
    first = await service.list_leads(LeadQuery(status="qualified", owner="ann"))
    assert ([lead.id for lead in first.leads], first.total_size) == ([ids[0], ids[2]], 2)
    assert [lead.status for lead in first.leads] == ["qualified", "qualified"]
    new = await service.list_leads(LeadQuery(status="new"))
    assert [lead.id for lead in new.leads] == ids[5:]

    # A lead added between two pages shows on a later page, nothing twice.
    page = await service.list_leads(LeadQuery(owner="bob", page_size=2))
    assert [lead.id for lead in page.leads] == [ids[1], ids[3]]
    late = await new_lead(service, clock, "bob", 99)
    rest = await every_page(service, LeadQuery("", "bob", 2, page.next_page_token))
    assert rest == [[ids[5], ids[7]], [late]]


async def test_a_partner_lists_only_the_leads_it_brought(
    service: PipelineService, clock: Clock
) -> None:
    # The shipped policy grants the partner client `acme` the leads it brings.
    acme = Principal("partner:acme", frozenset({"partner"}), "acme")
    other = Principal("partner:other", frozenset({"partner"}), "other")
    as_acme = Caller(actor=acme.actor, client="acme", principal=acme)
    ours = await new_lead(service, clock, "ann", 1)
    theirs = [await new_lead(service, clock, "ann", n, caller=as_acme) for n in (2, 3)]
    listed = await service.list_leads(LeadQuery(), as_acme)
    assert ([lead.id for lead in listed.leads], listed.total_size) == (theirs, 2)
    everyone = await service.list_leads(LeadQuery(), ANN)
    assert [lead.id for lead in everyone.leads] == [ours, *theirs]
    with pytest.raises(PermissionDenied):
        await service.list_leads(
            LeadQuery(), Caller(actor=other.actor, client="other", principal=other)
        )


async def test_activities_due_in_a_range_by_due_time(
    service: PipelineService, clock: Clock
) -> None:
    pipeline_id = (await service.define_pipeline(ANN, "Direct", STAGES)).outcome.id
    deal_id = (
        await service.open_opportunity(
            ANN,
            NewOpportunity(
                pipeline_id=pipeline_id,
                name="Fleet",
                customer_id="company-1",
                owner="ann",
                amount="100",
                currency="EUR",
                expected_close_date="2026-03-31",
            ),
        )
    ).outcome.id
    monday = datetime(2026, 2, 9, 0, 0, tzinfo=UTC)
    due = {
        "before": monday - timedelta(minutes=1),
        "mon 9:00": monday + timedelta(hours=9),
        "mon 9:00 bob": monday + timedelta(hours=9),
        "tue": monday + timedelta(days=1, hours=14),
        "fri": monday + timedelta(days=4, hours=17),
        "next mon": monday + timedelta(days=7),
    }
    ids = {}
    for title, at in due.items():
        owner = "bob" if "bob" in title else "ann"
        written = await service.schedule_activity(
            ANN, NewActivity("opportunity", deal_id, "task", title, owner, at)
        )
        ids[title] = written.outcome.id
    await service.complete_activity(ANN, ids["tue"], "done")

    week = ActivityQuery(due_from=monday, due_before=monday + timedelta(days=7))
    page = await service.list_activities(week)
    titles = [a.title for a in page.activities]
    # Same due time: by id.
    same = sorted(["mon 9:00", "mon 9:00 bob"], key=lambda t: ids[t])
    assert titles == [*same, "tue", "fri"]
    assert page.total_size == 4 and page.next_page_token == ""
    open_ann = await service.list_activities(
        ActivityQuery(monday, monday + timedelta(days=7), "ann", "open")
    )
    assert [a.title for a in open_ann.activities] == ["mon 9:00", "fri"]
    # In pages of one, across the tie of two activities due at the same time.
    seen: list[str] = []
    query = ActivityQuery(monday, monday + timedelta(days=7), page_size=1)
    while True:
        one = await service.list_activities(query)
        seen += [a.title for a in one.activities]
        if not one.next_page_token:
            break
        query = ActivityQuery(monday, monday + timedelta(days=7), "", None, 1, one.next_page_token)
    assert seen == titles
    everything = await service.list_activities(ActivityQuery(page_size=200))
    assert everything.activities[0].title == "before"
    assert everything.total_size == len(due)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (LeadQuery(status="hot"), "status"),
        (LeadQuery(page_size=201), "page_size"),
        (LeadQuery(page_token="garbage!"), "page_token"),
        (LeadQuery(page_token="eyJvZmZzZXQiOiAxLCAiYWZ0ZXIiOiBbIngiLCAxXX0"), "page_token"),
        # An offset no store can take.
        (LeadQuery(page_token="eyJvZmZzZXQiOiAxMTgwNTkxNjIwNzE3NDExMzAzNDI0fQ"), "page_token"),
        (ActivityQuery(status="late"), "status"),
        (ActivityQuery(due_from=datetime(2026, 2, 1)), "due_from"),
        (
            ActivityQuery(
                due_from=datetime(2026, 2, 2, tzinfo=UTC),
                due_before=datetime(2026, 2, 1, tzinfo=UTC),
            ),
            "due_before",
        ),
    ],
)
async def test_bad_list_queries_are_refused_naming_the_field(
    service: PipelineService, query: LeadQuery | ActivityQuery, field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        if isinstance(query, LeadQuery):
            await service.list_leads(query)
        else:
            await service.list_activities(query)
    assert [e.field for e in caught.value.errors] == [field]


async def test_a_filter_no_stored_text_can_hold_matches_nothing(
    service: PipelineService, clock: Clock
) -> None:
    await new_lead(service, clock, "ann", 1)
    for query in (LeadQuery(owner="ann\x00"), LeadQuery(owner="\x00")):
        page = await service.list_leads(query)
        assert (page.leads, page.total_size, page.next_page_token) == ([], 0, "")
    activities = await service.list_activities(ActivityQuery(owner="\x00"))
    assert activities.total_size == 0
