"""Tickets honours what the contacts topic says (`crm_tickets.contact_changes`),
on SQLite and PostgreSQL with master keys: a merge moves the merged contacts'
cases to the survivor and its undo gives back exactly those, an erased person's
case texts are gone from every table while the SLA figures and the survey
trend stay, and each change delivered again writes nothing.

The changes are handed to `TicketsContactChanges` as the follower hands them
(`test_tickets_follower.py` runs them through Kafka).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from tickets_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_common.errors import RuleViolated
from crm_common.privacy import REDACTED, new_master_key
from crm_common.privacy.export import export_json
from crm_common.settings import Settings
from crm_deploy.testing import found_in_clear, stored_rows
from crm_tickets.application import TicketsService, create_application
from crm_tickets.contact_changes import TicketsContactChanges
from crm_tickets.inputs import NewCase, SurveyInput

AGENT = Caller(actor="agent-7", client="tests")
SURVIVOR = str(uuid.UUID("7b0c6c1e-52a4-4c55-8a1e-0f8d0c3b9a01"))
MERGED = str(uuid.UUID("7b0c6c1e-52a4-4c55-8a1e-0f8d0c3b9a02"))
OTHER = str(uuid.UUID("7b0c6c1e-52a4-4c55-8a1e-0f8d0c3b9a03"))
MERGE = "merge-0001"

SUBJECT = "Henrietta Quaverly cannot sign in"
DESCRIPTION = "Locked out of henrietta.q@example.net, call +44 20 7946 0555"
AGENT_REPLY = "Dear Henrietta, we reset your password"
CUSTOMER_REPLY = "Thanks, Henrietta from henrietta.q@example.net"
NOTE = "Quaverly phoned twice from +44 20 7946 0555"
COMMENT = "Henrietta is pleased with the quick help"
OLD_SUBJECT = "Hattie Quaverly: invoice address wrong"
OLD_REPLY = "Hattie, your invoice now goes to 12 Quill Lane"
LATER_NOTE = "Spoke with Quaverly about 12 Quill Lane again"
#: What no stored row may hold in clear after the erase (nor before: keys are on).
TEXTS = (
    SUBJECT,
    DESCRIPTION,
    AGENT_REPLY,
    CUSTOMER_REPLY,
    NOTE,
    COMMENT,
    OLD_SUBJECT,
    OLD_REPLY,
    LATER_NOTE,
)
WORDS = ("Henrietta", "Hattie", "Quaverly", "henrietta.q", "7946 0555", "Quill Lane")
QUERY_TABLES = ("query_tracking", "ticket_queue", "ticket_deadlines", "ticket_cases")
EVENT_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("tickets_events", "tickets_snapshots"),
}
KEY_TABLES = ("privacy_data_keys", "privacy_key_access")


@pytest.fixture
def keyed(store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    return dataclasses.replace(store_settings, master_keys=new_master_key("m-tickets"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def service_on(settings: Settings, clock: Clock) -> TicketsService:
    return TicketsService(
        create_application(settings), KnownContacts(SURVIVOR, MERGED, OTHER), clock=clock
    )


@pytest.fixture
def tickets(keyed: Settings, clock: Clock) -> Iterator[TicketsService]:
    service = service_on(keyed, clock)
    yield service
    service.close()


def every_table(settings: Settings) -> tuple[str, ...]:
    return (
        *EVENT_TABLES[settings.event_store],
        *KEY_TABLES,
        *QUERY_TABLES,
        "ticket_surveys",
    )


def rows_of(settings: Settings, tables: tuple[str, ...]) -> dict[str, list[str]]:
    """Every row of the tables, in an order of their own (a rebuild inserts anew)."""
    return {t: sorted(map(repr, rows)) for t, rows in stored_rows(settings, tables).items()}


def log_length(service: TicketsService) -> int:
    recorder: Any = service.app.recorder
    return int(recorder.max_notification_id() or 0)


def merged(survivor: str = SURVIVOR, others: tuple[str, ...] = (MERGED,)) -> ContactChange:
    return ContactChange("contacts_merged", survivor, others, MERGE, f"{survivor}:7", "marketer-2")


def undone(survivor: str = SURVIVOR, others: tuple[str, ...] = (MERGED,)) -> ContactChange:
    return ContactChange(
        "contact_merge_undone", survivor, others, MERGE, f"{survivor}:9", "marketer-2"
    )


def erased(person: str = SURVIVOR, others: tuple[str, ...] = (MERGED,)) -> ContactChange:
    return ContactChange("person_erased", person, others, "erase-0001", f"{person}:12", "admin-1")


async def customer_ids(service: TicketsService, customer: str) -> list[str]:
    return [c.id for c in (await service.customer_cases(customer)).cases]


async def two_customers(tickets: TicketsService, clock: Clock) -> dict[str, str]:
    """The survivor's solved case with replies, a note and a survey; the merged
    contact's open case with a reply; another customer's case."""
    new = NewCase(SURVIVOR, "email", SUBJECT, DESCRIPTION, "access", "high", "support")
    solved = (await tickets.open_case(AGENT, new)).outcome.id
    clock.advance(minutes=20)
    await tickets.reply_to_case(AGENT, solved, "agent", AGENT_REPLY)
    clock.advance(minutes=30)
    await tickets.reply_to_case(AGENT, solved, "customer", CUSTOMER_REPLY)
    await tickets.add_internal_note(AGENT, solved, NOTE)
    clock.advance(minutes=10)
    await tickets.change_case_status(AGENT, solved, "solved")
    await tickets.record_satisfaction(AGENT, solved, SurveyInput(4, 2, 9, COMMENT))
    old = NewCase(MERGED, "phone", OLD_SUBJECT, "", "billing", "normal", "support")
    moved = (await tickets.open_case(AGENT, old)).outcome.id
    clock.advance(minutes=5)
    await tickets.reply_to_case(AGENT, moved, "agent", OLD_REPLY)
    other = NewCase(OTHER, "chat", "Printer on fire", "", "hardware", "low", "support")
    bystander = (await tickets.open_case(AGENT, other)).outcome.id
    return {"solved": solved, "moved": moved, "bystander": bystander}


async def test_a_merge_moves_the_cases_and_its_undo_gives_back_exactly_those(
    tickets: TicketsService, clock: Clock
) -> None:
    cases = await two_customers(tickets, clock)
    changes = TicketsContactChanges(tickets)

    await changes.contacts_merged(merged())

    assert await customer_ids(tickets, SURVIVOR) == [cases["moved"], cases["solved"]]
    assert await customer_ids(tickets, MERGED) == []
    case = await tickets.get_case(cases["moved"])
    assert case.customer_id == SURVIVOR
    assert case.history[-1].what == "CustomerMoved"
    assert case.history[-1].details["from_customer_id"] == MERGED
    assert case.history[-1].details["merge_id"] == MERGE
    # The merged contact's texts stay readable (sealed under its own key).
    assert (case.subject, [m.body for m in case.messages]) == (OLD_SUBJECT, [OLD_REPLY])
    [event] = list(tickets.app.repository.event_store.get(uuid.UUID(cases["moved"])))[-1:]
    assert event._meta["actor"] == "marketer-2"
    assert event._meta["client"] == "tickets-contacts-follower"
    assert event._meta["request_id"] == f"{SURVIVOR}:7:{cases['moved']}"

    # Delivered again (a rebalance, a restart): nothing is written.
    length = log_length(tickets)
    await changes.contacts_merged(merged())
    assert log_length(tickets) == length

    # Work goes on under the survivor, then the merge is undone.
    clock.advance(minutes=15)
    await tickets.add_internal_note(AGENT, cases["moved"], LATER_NOTE)
    await tickets.change_case_status(AGENT, cases["moved"], "pending")
    await changes.merge_undone(undone())

    assert await customer_ids(tickets, SURVIVOR) == [cases["solved"]]
    assert await customer_ids(tickets, MERGED) == [cases["moved"]]
    back = await tickets.get_case(cases["moved"])
    assert (back.customer_id, back.status) == (MERGED, "pending")
    assert [m.body for m in back.messages] == [OLD_REPLY, LATER_NOTE]
    assert back.history[-1].details["undone"] == "True"
    assert (await tickets.get_case(cases["solved"])).customer_id == SURVIVOR
    assert await customer_ids(tickets, OTHER) == [cases["bystander"]]

    length = log_length(tickets)
    await changes.merge_undone(undone())
    await changes.contacts_merged(merged())  # the old merge event once more
    assert log_length(tickets) == length
    assert await customer_ids(tickets, MERGED) == [cases["moved"]]


async def test_an_erased_customer_leaves_no_text_in_any_table_and_the_figures_stay(
    tickets: TicketsService, keyed: Settings, clock: Clock
) -> None:
    cases = await two_customers(tickets, clock)
    changes = TicketsContactChanges(tickets)
    await changes.contacts_merged(merged())
    clock.advance(minutes=15)
    await tickets.add_internal_note(AGENT, cases["moved"], LATER_NOTE)
    period = (clock() - timedelta(days=1), clock() + timedelta(days=1))
    compliance = await tickets.sla_compliance("support", *period)
    trend = await tickets.satisfaction_trend("support", *period, "month")
    assert (compliance.cases, trend.periods[0].responses) == (3, 1)
    queue = [c.id for c in (await tickets.team_queue("support")).cases]
    exported = tickets.export_personal_data(SURVIVOR)
    assert {c["case"]["subject"] for c in exported["cases"]} == {SUBJECT, OLD_SUBJECT}

    await changes.person_erased(erased())

    tables = every_table(keyed)
    assert found_in_clear(keyed, tables, TEXTS + WORDS) == []
    # The scan reads the rows: the business facts are found.
    facts = ("support", "billing", "agent-7", SURVIVOR, cases["solved"])
    assert found_in_clear(keyed, tables, facts) == list(facts)
    for case_id in (cases["solved"], cases["moved"]):
        case = await tickets.get_case(case_id)
        assert (case.subject, case.description) == (REDACTED, REDACTED)
        assert {m.body for m in case.messages} == {REDACTED}
    solved = await tickets.get_case(cases["solved"])
    assert solved.satisfaction is not None
    assert (solved.satisfaction.csat, solved.satisfaction.comment) == (4, REDACTED)
    assert (await tickets.get_case(cases["bystander"])).subject == "Printer on fire"
    assert await tickets.sla_compliance("support", *period) == compliance
    assert await tickets.satisfaction_trend("support", *period, "month") == trend
    assert [c.id for c in (await tickets.team_queue("support")).cases] == queue
    document = export_json(tickets.export_personal_data(SURVIVOR))
    assert [w for w in WORDS if w in document] == []
    assert json.loads(document)["cases"][0]["case"]["subject"] == REDACTED

    # Again (a redelivery): nothing changes.
    rows = rows_of(keyed, tables)
    await changes.person_erased(erased())
    assert rows_of(keyed, tables) == rows

    # Rebuilt from the log, the query tables hold the same rows (and no text).
    projected = (*QUERY_TABLES[1:], "ticket_surveys")
    query_rows = rows_of(keyed, projected)
    with tickets.query.database.write() as tx:
        tx.execute("UPDATE query_tracking SET version = 0")
    rebuilt = service_on(keyed, clock)
    try:
        rebuilt.query.catch_up()
        assert rebuilt.query.side.states()[0].position == log_length(rebuilt)
        assert rows_of(keyed, projected) == query_rows
        assert await rebuilt.sla_compliance("support", *period) == compliance
        assert await rebuilt.satisfaction_trend("support", *period, "month") == trend
    finally:
        rebuilt.close()
    assert found_in_clear(keyed, tables, TEXTS + WORDS) == []


async def test_without_master_keys_an_erase_is_refused_and_changes_nothing(
    store_settings: Settings, clock: Clock
) -> None:
    tickets = service_on(store_settings, clock)
    try:
        await tickets.open_case(AGENT, NewCase(SURVIVOR, "web", SUBJECT, team="support"))
        length = log_length(tickets)
        with pytest.raises(RuleViolated, match="no master keys"):
            await TicketsContactChanges(tickets).person_erased(erased())
        assert log_length(tickets) == length
        assert (await tickets.customer_cases(SURVIVOR)).cases[0].subject == SUBJECT
    finally:
        tickets.close()
