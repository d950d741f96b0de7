"""The pipeline honours erased persons and merged contacts, on SQLite and PostgreSQL.

With master keys, erasing a person destroys the keys of exactly the subjects
holding their data here (the contact and the contacts merged into it, the
leads converted into them, the activities of those leads and deals), after
which a raw scan of every table of the service (events, snapshots, keys,
query tables) finds none of their names, addresses or texts, while a
bystander's stay readable and the amounts, stages and forecast are
unchanged; the query tables rebuilt from the log are the same. A merge
moves deals, leads and activities to the survivor and its undo moves them
back, keeping what happened since. A record handled twice writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pipeline_support import STAGES, Clock, InProcessContacts

from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_common.privacy import REDACTED, new_master_key
from crm_common.settings import Settings
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_deploy.testing import (
    drop_schema,
    found_in_clear,
    postgres_settings,
    postgres_target,
    stored_rows,
)
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.contact_changes import PipelineContactChanges
from crm_pipeline.domain import Activity
from crm_pipeline.inputs import (
    ForecastQuery,
    LeadConversion,
    NewActivity,
    NewLead,
    NewOpportunity,
    OpportunityQuery,
    WinRateQuery,
)

CALLER = Caller(actor="ann", client="tests")
GIVEN, FAMILY = "Augusta", "Lovelace-Byron"
EMAIL, PHONE = "augusta.ada@example.org", "+44 20 7946 0018"
LEAD_TITLE = "Call Augusta about the difference engine"
DEAL_TITLE = "Demo at Lovelace-Byron's home in Ockham"
OUTCOME = "She wants the brochure sent to her private address"
REASON = "Augusta is travelling until March"
SECOND_DEAL = "Augusta's analytical engine"
MERGED_DEAL = "A. A. Lovelace, Ockham Park"
MERGED_TITLE = "Post the Ockham Park contract"
COMPANY_DEAL = "Ockham Estates fleet"
SIGN_TITLE = "Ask Augusta to sign for the estate"
#: What no row of any table may hold once the person is erased.
PERSONAL = (
    *(GIVEN, FAMILY, EMAIL, "augusta.ada", PHONE, "7946 0018"),
    *(LEAD_TITLE, DEAL_TITLE, OUTCOME, REASON, SECOND_DEAL, MERGED_DEAL, MERGED_TITLE),
    SIGN_TITLE,
)
#: A bystander's data, which the erasure must not touch.
OTHER_GIVEN, OTHER_FAMILY, OTHER_EMAIL = "Mary", "Somerville", "mary@example.org"
OTHER_TITLE = "Send Mary the atlas proofs"


def store_settings(kind: str, tmp_path: Path, master: str) -> Iterator[Settings]:
    if kind == "sqlite":
        yield Settings(
            service="pipeline",
            data_dir=tmp_path,
            bind_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            event_store="sqlite",
            master_keys=master,
        )
        return
    schema = f"pipeline_cc_{uuid.uuid4().hex[:10]}"
    yield dataclasses.replace(postgres_settings("pipeline", schema, tmp_path), master_keys=master)
    drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def keyed(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """An empty store with master keys, snapshots every 3 events: SQLite, then PostgreSQL."""
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    yield from store_settings(request.param, tmp_path, new_master_key("m-pipeline"))


@pytest.fixture
def contacts(tmp_path: Path) -> Iterator[ContactsService]:
    service = ContactsService(
        create_contacts(
            Settings(
                service="contacts",
                data_dir=tmp_path,
                bind_host="127.0.0.1",
                grpc_port=0,
                http_port=0,
                event_store="sqlite",
            )
        )
    )
    yield service
    service.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pipeline(keyed: Settings, contacts: ContactsService, clock: Clock) -> Iterator[PipelineService]:
    service = PipelineService(create_application(keyed), InProcessContacts(contacts), clock=clock)
    yield service
    service.close()


def every_table(settings: Settings) -> list[str]:
    """Every table of the service's store: events, snapshots, keys, query tables."""
    if settings.event_store == "sqlite":
        names: set[str] = set()
        for file in settings.service_dir.glob("*.sqlite"):
            with contextlib.closing(sqlite3.connect(file)) as db:
                names |= {
                    str(r[0])
                    for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                    if not str(r[0]).startswith("sqlite_")
                }
        return sorted(names)
    with psycopg.connect(**postgres_target().connect_kwargs()) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (settings.postgres["schema"],),
        ).fetchall()
    return sorted(str(r[0]) for r in rows)


def in_clear(settings: Settings, values: tuple[str, ...]) -> list[str]:
    tables = every_table(settings)
    assert {"query_activities", "query_leads", "query_deals", "privacy_data_keys"} <= set(tables)
    return [str(v) for v in found_in_clear(settings, tables, values)]


def destroyed_subjects(settings: Settings) -> set[str]:
    rows = found_rows(settings, "privacy_data_keys")
    return {str(r["subject_id"]) for r in rows if r["destroyed_at"] is not None}


def found_rows(settings: Settings, table: str) -> list[dict[str, Any]]:
    return [dict(row) for row in stored_rows(settings, [table])[table]]


async def activity(pipeline: PipelineService, kind: str, subject_id: str, title: str) -> str:
    new = NewActivity(kind, subject_id, "call", title, "ann", pipeline.clock() + timedelta(days=2))
    return str((await pipeline.schedule_activity(CALLER, new)).outcome.id)


@dataclasses.dataclass
class Person:
    lead_id: str
    person_id: str
    deal_id: str
    activities: list[str]


async def converted(
    pipeline: PipelineService,
    pipeline_id: str,
    new: NewLead,
    title: str,
    amount: str = "25000",
) -> Person:
    """A lead with an activity, qualified and converted into a new person's deal,
    with an activity on the deal."""
    lead_id = (await pipeline.create_lead(CALLER, new)).outcome.id
    on_lead = await activity(pipeline, "lead", lead_id, title)
    await pipeline.qualify_lead(CALLER, lead_id, 80)
    conversion = LeadConversion(lead_id, pipeline_id, amount, "EUR", "2026-04-30")
    extra = (await pipeline.convert_lead(CALLER, conversion)).outcome.extra
    deal_id = extra["opportunity_id"]
    on_deal = await activity(pipeline, "opportunity", deal_id, title)
    return Person(lead_id, extra["person_id"], deal_id, [on_lead, on_deal])


def erased(person: str, merged: tuple[str, ...] = (), version: int = 12) -> ContactChange:
    return ContactChange("person_erased", person, merged, "dsr-17", f"{person}:{version}", "root")


def merged(survivor: str, others: tuple[str, ...], version: int = 5) -> ContactChange:
    return ContactChange(
        "contacts_merged", survivor, others, "merge-1", f"{survivor}:{version}", "root"
    )


def undone(survivor: str, restored: tuple[str, ...], version: int = 6) -> ContactChange:
    return ContactChange(
        "contact_merge_undone", survivor, restored, "merge-1", f"{survivor}:{version}", "root"
    )


def log_end(pipeline: PipelineService) -> int:
    return int(pipeline.app.recorder.max_notification_id() or 0)


async def test_an_erased_person_leaves_no_trace_in_any_table_and_the_figures_stay(
    pipeline: PipelineService, keyed: Settings, clock: Clock
) -> None:
    pipeline_id = (await pipeline.define_pipeline(CALLER, "Direct", STAGES)).outcome.id
    ada = await converted(
        pipeline,
        pipeline_id,
        NewLead(FAMILY, "event", "bob", GIVEN, email=EMAIL, phone=PHONE, campaign="expo-2026"),
        LEAD_TITLE,
    )
    mary = await converted(
        pipeline,
        pipeline_id,
        NewLead(OTHER_FAMILY, "web", "bob", OTHER_GIVEN, email=OTHER_EMAIL),
        OTHER_TITLE,
        amount="900",
    )
    # More of Ada: texts on her deal, a second deal, and a deal of a contact merged into her.
    done = await activity(pipeline, "opportunity", ada.deal_id, DEAL_TITLE)
    cancelled = await activity(pipeline, "opportunity", ada.deal_id, DEAL_TITLE)
    second = await pipeline.open_opportunity(
        CALLER,
        NewOpportunity(pipeline_id, SECOND_DEAL, ada.person_id, "ann", "1200", "EUR", "2026-05-31"),
    )
    earlier_self = f"person-{uuid.uuid4().hex[:8]}"
    old_deal = await pipeline.open_opportunity(
        CALLER,
        NewOpportunity(pipeline_id, MERGED_DEAL, earlier_self, "ann", "300", "EUR", "2026-05-31"),
    )
    on_old_deal = await activity(pipeline, "opportunity", old_deal.outcome.id, MERGED_TITLE)
    # A company's deal with Ada as its contact: the name is the company's, the texts hers.
    company = f"company-{uuid.uuid4().hex[:8]}"
    company_deal = await pipeline.open_opportunity(
        CALLER,
        NewOpportunity(
            pipeline_id,
            COMPANY_DEAL,
            company,
            "ann",
            "5000",
            "EUR",
            "2026-05-31",
            person_id=ada.person_id,
            company_id=company,
        ),
    )
    on_company_deal = await activity(pipeline, "opportunity", company_deal.outcome.id, SIGN_TITLE)
    clock.advance(days=1)
    await pipeline.complete_activity(CALLER, done, OUTCOME)
    await pipeline.cancel_activity(CALLER, cancelled, REASON)
    await pipeline.change_amount(CALLER, ada.deal_id, "27500.50", "EUR")
    clock.advance(days=1)
    await pipeline.win_opportunity(CALLER, ada.deal_id)
    clock.advance(days=5)  # every open activity is overdue now

    forecast = await pipeline.get_forecast(ForecastQuery())
    rate = await pipeline.get_win_rate(WinRateQuery(pipeline_id=pipeline_id))
    deals_before = {
        d.id: d for d in (await pipeline.list_opportunities(OpportunityQuery())).opportunities
    }
    # The scan reaches the query tables: the titles are there in clear.
    assert in_clear(keyed, (LEAD_TITLE, OTHER_TITLE, MERGED_TITLE)) == [
        LEAD_TITLE,
        OTHER_TITLE,
        MERGED_TITLE,
    ]
    changes = PipelineContactChanges(pipeline)

    await changes.person_erased(erased(ada.person_id, (earlier_self,)))

    assert in_clear(keyed, PERSONAL) == []
    ada_activities = {*ada.activities, done, cancelled, on_old_deal, on_company_deal}
    assert destroyed_subjects(keyed) == {ada.person_id, earlier_self, ada.lead_id, *ada_activities}
    # Ada's records read as erased, with every business fact kept.
    lead = await pipeline.get_lead(ada.lead_id)
    assert (lead.given_name, lead.family_name, lead.email, lead.phone) == (REDACTED,) * 4
    assert (lead.status, lead.score, lead.campaign) == ("converted", 80, "expo-2026")
    after = {d.id: d for d in (await pipeline.list_opportunities(OpportunityQuery())).opportunities}
    for deal_id in (ada.deal_id, second.outcome.id, old_deal.outcome.id):
        assert after[deal_id] == dataclasses.replace(deals_before[deal_id], name=REDACTED)
    assert after[mary.deal_id] == deals_before[mary.deal_id]
    assert after[company_deal.outcome.id] == deals_before[company_deal.outcome.id]
    assert after[company_deal.outcome.id].name == COMPANY_DEAL
    assert await pipeline.get_forecast(ForecastQuery()) == forecast
    assert await pipeline.get_win_rate(WinRateQuery(pipeline_id=pipeline_id)) == rate
    seen = {a: await pipeline.get_activity(a) for a in ada_activities}
    assert {v.title for v in seen.values()} == {REDACTED}
    assert (seen[done].status, seen[done].outcome) == ("completed", REDACTED)
    # The overdue list (from the query tables) shows Ada's as erased, Mary's as they were.
    overdue = {a.activity_id: a.title for a in (await pipeline.overdue_follow_ups())["ann"]}
    assert overdue == {
        **dict.fromkeys([*ada.activities, on_old_deal, on_company_deal], REDACTED),
        **dict.fromkeys(mary.activities, OTHER_TITLE),
    }
    # Mary is untouched.
    other = await pipeline.get_lead(mary.lead_id)
    assert (other.given_name, other.email) == (OTHER_GIVEN, OTHER_EMAIL)
    assert in_clear(keyed, (OTHER_TITLE,)) == [OTHER_TITLE]

    # The record delivered again writes nothing.
    end = log_end(pipeline)
    await changes.person_erased(erased(ada.person_id, (earlier_self,)))
    assert log_end(pipeline) == end

    # Rebuilt from the log, the query tables are the same.
    rows = sorted(map(str, found_rows(keyed, "query_activities")))
    with pipeline.read_model.side.database.write() as tx:
        tx.execute("UPDATE query_tracking SET version = 0")
    rebuilt = PipelineService(create_application(keyed), clock=clock)
    try:
        rebuilt.read_model.catch_up()
        assert sorted(map(str, found_rows(keyed, "query_activities"))) == rows
        assert await rebuilt.get_forecast(ForecastQuery()) == forecast
    finally:
        rebuilt.close()
    assert in_clear(keyed, PERSONAL) == []


async def test_a_merge_moves_deals_leads_and_activities_and_its_undo_moves_them_back(
    pipeline: PipelineService, keyed: Settings, clock: Clock
) -> None:
    pipeline_id = (await pipeline.define_pipeline(CALLER, "Direct", STAGES)).outcome.id
    twin = await converted(
        pipeline, pipeline_id, NewLead(FAMILY, "event", "bob", GIVEN, email=EMAIL), LEAD_TITLE
    )
    direct = await pipeline.open_opportunity(
        CALLER,
        NewOpportunity(
            pipeline_id, SECOND_DEAL, twin.person_id, "ann", "1200", "EUR", "2026-05-31"
        ),
    )
    survivor = f"person-{uuid.uuid4().hex[:8]}"
    kept = await pipeline.open_opportunity(
        CALLER, NewOpportunity(pipeline_id, "Kept", survivor, "ann", "700", "EUR", "2026-05-31")
    )
    moved_deals = {twin.deal_id, direct.outcome.id}
    forecast = await pipeline.get_forecast(ForecastQuery())
    changes = PipelineContactChanges(pipeline)

    async def deals_of(customer: str) -> set[str]:
        page = await pipeline.list_opportunities(OpportunityQuery(customer_id=customer))
        return {d.id for d in page.opportunities}

    await changes.contacts_merged(merged(survivor, (twin.person_id,)))

    assert await deals_of(survivor) == {*moved_deals, kept.outcome.id}
    assert await deals_of(twin.person_id) == set()
    deal = await pipeline.get_opportunity(twin.deal_id)
    assert (deal.customer_id, deal.person_id, deal.name) == (
        survivor,
        survivor,
        f"{GIVEN} {FAMILY}",
    )
    lead = await pipeline.get_lead(twin.lead_id)
    assert (lead.person_id, lead.status) == (survivor, "converted")
    on_deal = pipeline.load(twin.activities[1], Activity)
    assert on_deal.customer_id == survivor
    assert await pipeline.get_forecast(ForecastQuery()) == forecast
    end = log_end(pipeline)
    await changes.contacts_merged(merged(survivor, (twin.person_id,)))
    assert log_end(pipeline) == end

    # Moved, then won: it goes back won.
    clock.advance(days=1)
    await pipeline.win_opportunity(CALLER, direct.outcome.id)
    await changes.merge_undone(undone(survivor, (twin.person_id,)))

    assert await deals_of(twin.person_id) == moved_deals
    assert await deals_of(survivor) == {kept.outcome.id}
    back = await pipeline.get_opportunity(direct.outcome.id)
    assert (back.customer_id, back.status, back.name) == (twin.person_id, "won", SECOND_DEAL)
    lead = await pipeline.get_lead(twin.lead_id)
    assert (lead.person_id, lead.opportunity_id) == (twin.person_id, twin.deal_id)
    assert pipeline.load(twin.activities[1], Activity).customer_id == twin.person_id
    end = log_end(pipeline)
    await changes.merge_undone(undone(survivor, (twin.person_id,)))
    await changes.contacts_merged(merged(survivor, (twin.person_id,)))
    assert log_end(pipeline) == end
    assert await deals_of(survivor) == {kept.outcome.id}
