"""A customer's personal data at rest in the tickets store, on SQLite and PostgreSQL.

With master keys configured, the service's own commands for a customer's
cases (opening, agent and customer replies, an internal note, solving, a
survey with a comment) leave none of the texts in which the customer's name,
email and phone appear in clear in any row of the event, snapshot or key
tables, while the service still shows them. Every case's texts are sealed
under the customer's key (the subject is `customer_id`), so destroying that
one key erases all of them: loading shows the redaction marker where they
were, and the business facts (statuses, priorities, SLA clocks, the survey's
scores, compliance) are unchanged; a write carrying personal data for the
erased customer is refused with `SubjectErased`.

The scan covers the query tables too: they hold ids, teams, statuses, SLA
figures and survey scores, never a case text.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from tickets_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.privacy import REDACTED, SubjectErased, new_master_key
from crm_common.settings import Settings
from crm_deploy.testing import found_in_clear
from crm_tickets.application import TicketsService, create_application
from crm_tickets.inputs import NewCase, SurveyInput, Triage

AGENT = Caller(actor="agent-7", client="tests")
CUSTOMER = str(uuid.UUID("5d1c9a52-0f3b-4f0e-9a43-2b8f1d6c7e11"))
GIVEN, FAMILY = "Augusta", "Lovelace-Byron"
EMAIL, PHONE = "augusta.ada@example.org", "+44 20 7946 0018"
SUBJECT = f"{GIVEN} {FAMILY} cannot sign in"
DESCRIPTION = f"Locked out of {EMAIL}; call back on {PHONE}"
AGENT_REPLY = f"Dear {GIVEN}, we reset your password"
CUSTOMER_REPLY = f"Thanks, this is {GIVEN} from {EMAIL} again"
NOTE = f"{FAMILY} called twice from {PHONE}"
COMMENT = f"Quick help, {GIVEN} is happy"
#: What no stored row may hold in clear.
PERSONAL = (GIVEN, FAMILY, EMAIL, "augusta.ada", PHONE, "7946 0018")
STORED_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("tickets_events", "tickets_snapshots"),
}
KEY_TABLES = ("privacy_data_keys", "privacy_key_access")
QUERY_TABLES = ("ticket_queue", "ticket_deadlines", "ticket_cases", "ticket_surveys")


@pytest.fixture
def keyed(store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The store with master keys, snapshots every 3 events."""
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    return dataclasses.replace(store_settings, master_keys=new_master_key("m-tickets"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tickets(keyed: Settings, clock: Clock) -> Iterator[TicketsService]:
    service = TicketsService(create_application(keyed), KnownContacts(CUSTOMER), clock=clock)
    yield service
    service.close()


def scanned(settings: Settings) -> tuple[str, ...]:
    """The event, snapshot, key and query tables of the store of `settings`."""
    return (*STORED_TABLES[settings.event_store], *KEY_TABLES, *QUERY_TABLES)


def in_clear(settings: Settings, values: tuple[str, ...] = PERSONAL) -> list[str]:
    """The `values` a raw scan of the stored rows finds."""
    return found_in_clear(settings, scanned(settings), values)


async def busy_customer(tickets: TicketsService, clock: Clock) -> tuple[str, str]:
    """A solved case with replies, a note and a survey, and a second case still open."""
    new = NewCase(CUSTOMER, "email", SUBJECT, DESCRIPTION, "access", "high", "support")
    solved = (await tickets.open_case(AGENT, new)).outcome.id
    clock.advance(minutes=20)
    await tickets.reply_to_case(AGENT, solved, "agent", AGENT_REPLY)
    clock.advance(minutes=30)
    await tickets.reply_to_case(AGENT, solved, "customer", CUSTOMER_REPLY)
    await tickets.add_internal_note(AGENT, solved, NOTE)
    clock.advance(minutes=10)
    await tickets.change_case_status(AGENT, solved, "solved")
    await tickets.record_satisfaction(AGENT, solved, SurveyInput(5, 2, 9, COMMENT))
    second = NewCase(CUSTOMER, "phone", f"{GIVEN} again", f"Call {PHONE}", team="support")
    still_open = (await tickets.open_case(AGENT, second)).outcome.id
    return solved, still_open


async def test_a_customers_data_is_sealed_at_rest_and_shown_by_the_service(
    tickets: TicketsService, keyed: Settings, clock: Clock
) -> None:
    solved, still_open = await busy_customer(tickets, clock)

    assert in_clear(keyed) == []
    # What is not personal stays readable: the category, the team, who acted.
    assert in_clear(keyed, ("access", "support", "agent-7")) == ["access", "support", "agent-7"]
    # A case holds its customer's data: it is replayed, never snapshotted.
    assert tickets.app.snapshots is not None
    assert list(tickets.app.snapshots.get(uuid.UUID(solved))) == []

    case = await tickets.get_case(solved)
    assert (case.subject, case.description) == (SUBJECT, DESCRIPTION)
    assert [m.body for m in case.messages] == [AGENT_REPLY, CUSTOMER_REPLY, NOTE]
    assert case.satisfaction is not None and case.satisfaction.comment == COMMENT
    listed = await tickets.customer_cases(CUSTOMER)
    assert [(c.id, c.subject) for c in listed.cases] == [
        (still_open, f"{GIVEN} again"),
        (solved, SUBJECT),
    ]


async def test_an_erased_customer_reads_redacted_with_the_business_facts_kept(
    tickets: TicketsService, keyed: Settings, clock: Clock
) -> None:
    solved, still_open = await busy_customer(tickets, clock)
    before = await tickets.get_case(solved)
    period = (clock() - timedelta(days=1), clock() + timedelta(days=1))
    compliance = await tickets.sla_compliance("support", *period)
    assert (compliance.cases, compliance.first_reply_count) == (2, 1)
    keys = tickets.app.personal_data_keys
    assert keys is not None

    assert keys.destroy(CUSTOMER) is True

    again = TicketsService(create_application(keyed), KnownContacts(CUSTOMER), clock=clock)
    try:
        for service in (tickets, again):
            case = await service.get_case(solved)
            assert (case.subject, case.description) == (REDACTED, REDACTED)
            assert [m.body for m in case.messages] == [REDACTED] * 3
            assert case.satisfaction is not None
            assert case.satisfaction.comment == REDACTED
            # The anonymous facts are as they were.
            assert case == dataclasses.replace(
                before,
                subject=REDACTED,
                description=REDACTED,
                messages=[dataclasses.replace(m, body=REDACTED) for m in before.messages],
                satisfaction=dataclasses.replace(before.satisfaction, comment=REDACTED),
            )
            other = await service.get_case(still_open)
            assert (other.subject, other.status, other.channel) == (REDACTED, "new", "phone")
        assert await again.sla_compliance("support", *period) == compliance
    finally:
        again.close()
    assert in_clear(keyed) == []


async def test_a_write_of_personal_data_for_an_erased_customer_is_refused(
    tickets: TicketsService, keyed: Settings, clock: Clock
) -> None:
    _, still_open = await busy_customer(tickets, clock)
    keys = tickets.app.personal_data_keys
    assert keys is not None
    keys.destroy(CUSTOMER)
    log: Any = tickets.app.recorder
    stored = log.max_notification_id()

    with pytest.raises(SubjectErased):
        await tickets.reply_to_case(AGENT, still_open, "agent", "We are on it")
    with pytest.raises(SubjectErased):
        await tickets.add_internal_note(AGENT, still_open, "no answer")
    with pytest.raises(SubjectErased):
        await tickets.open_case(AGENT, NewCase(CUSTOMER, "web", "Another", team="support"))
    assert log.max_notification_id() == stored

    # The case's handling without personal data goes on.
    clock.advance(minutes=5)
    await tickets.triage_case(AGENT, still_open, Triage("billing", "urgent", "support"))
    await tickets.change_case_status(AGENT, still_open, "solved")
    case = await tickets.get_case(still_open)
    assert (case.category, case.priority, case.status) == ("billing", "urgent", "solved")
    assert log.max_notification_id() == stored + 2
    assert in_clear(keyed) == []
