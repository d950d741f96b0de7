"""The application over SQLite: cases, policies, and the SLA scanner raising
each deadline exactly once, with two replicas on one store and across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from tickets_support import Clock, KnownContacts, office_terms, sqlite_settings

from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_tickets.application import TicketsService, create_application
from crm_tickets.domain import Case
from crm_tickets.inputs import NewCase, SurveyInput

AGENT = Caller(actor="agent-7", client="test")
ADMIN = Caller(actor="admin-1", client="test")


def service(tmp_path: Path, clock: Clock) -> TicketsService:
    return TicketsService(
        create_application(sqlite_settings(tmp_path)), KnownContacts("contact-1"), clock=clock
    )


def breaches(svc: TicketsService, case_id: str) -> list[str]:
    case = svc.app.repository.get(__import__("uuid").UUID(case_id))
    assert isinstance(case, Case)
    return [
        h["what"] for h in case.history if h["what"] in ("SlaWarned", "SlaBreached", "Escalated")
    ]


async def test_unknown_contacts_and_bad_input_are_refused(tmp_path: Path) -> None:
    svc = service(tmp_path, Clock())
    try:
        with pytest.raises(NotFound, match="Contact"):
            await svc.open_case(AGENT, NewCase("nobody", "email", "Help", team="support"))
        with pytest.raises(ValidationFailed) as error:
            await svc.open_case(AGENT, NewCase("contact-1", "fax", "", team="support"))
        assert [e.field for e in error.value.errors] == ["channel", "subject"]
    finally:
        svc.close()


async def test_deadlines_are_raised_once_by_two_replicas_and_after_a_restart(
    tmp_path: Path,
) -> None:
    clock = Clock()  # Monday 09:00 UTC = 10:00 Berlin
    first, second = service(tmp_path, clock), service(tmp_path, clock)
    try:
        policy = await first.define_sla_policy(ADMIN, "Office", office_terms())
        opened = await first.open_case(
            AGENT,
            NewCase(
                "contact-1", "chat", "Cannot log in", team="support", policy_id=policy.outcome.id
            ),
        )
        case_id = opened.outcome.id
        assert await first.raise_due_deadlines() == 0
        clock.advance(minutes=50)  # the warning is due (15 min before 11:00 Berlin)
        counts = [await first.raise_due_deadlines(), await second.raise_due_deadlines()]
        assert counts == [1, 0]
    finally:
        first.close()
        second.close()
    # Everything down while the breach falls due; back a week later.
    clock.advance(days=7)
    again, other = service(tmp_path, clock), service(tmp_path, clock)
    try:
        assert sum([await other.raise_due_deadlines(), await again.raise_due_deadlines()]) == 2
        assert await again.raise_due_deadlines() == 0
        assert breaches(again, case_id) == [
            "SlaWarned",
            "SlaBreached",
            "Escalated",
            "SlaBreached",
            "Escalated",
        ]
        view = await again.get_case(case_id)
        assert {c.kind: c.state for c in view.clocks} == {
            "first_response": "breached",
            "resolution": "breached",
        }
        assert (view.priority, view.team) == ("urgent", "tier2")
    finally:
        again.close()
        other.close()


async def test_a_policy_revision_applies_to_new_cases_only(tmp_path: Path) -> None:
    svc = service(tmp_path, Clock())
    try:
        policy = await svc.define_sla_policy(ADMIN, "Office", office_terms())
        new = NewCase("contact-1", "web", "Invoice", team="billing", policy_id=policy.outcome.id)
        before = await svc.open_case(AGENT, new)
        await svc.revise_sla_policy(ADMIN, policy.outcome.id, office_terms(first_response=7200))
        after = await svc.open_case(AGENT, new)
        old, current = await svc.get_case(before.outcome.id), await svc.get_case(after.outcome.id)
        assert (old.policy_version, old.clocks[0].target_seconds) == (1, 3600)
        assert (current.policy_version, current.clocks[0].target_seconds) == (2, 7200)
        await svc.retire_sla_policy(ADMIN, policy.outcome.id)
        with pytest.raises(NotFound):
            await svc.open_case(AGENT, new)
        queue = await svc.team_queue("billing")
        assert [c.id for c in queue.cases] == [before.outcome.id, after.outcome.id]
    finally:
        svc.close()


async def test_replies_notes_status_and_satisfaction(tmp_path: Path) -> None:
    clock = Clock()
    svc = service(tmp_path, clock)
    try:
        opened = await svc.open_case(AGENT, NewCase("contact-1", "phone", "Refund", team="support"))
        case_id = opened.outcome.id
        assert (opened.subject.tier, opened.subject.tier_source) == ("standard", "default")
        await svc.add_internal_note(AGENT, case_id, "VIP, be nice")
        await svc.reply_to_case(AGENT, case_id, "agent", "On it")
        with pytest.raises(RuleViolated):
            await svc.record_satisfaction(AGENT, case_id, SurveyInput(5))
        await svc.change_case_status(AGENT, case_id, "solved")
        retried = Caller(actor="agent-7", client="test", request_id="csat-1")
        first = await svc.record_satisfaction(retried, case_id, SurveyInput(4, comment="ok"))
        replay = await svc.record_satisfaction(retried, case_id, SurveyInput(4, comment="ok"))
        assert (replay.outcome.replayed, replay.outcome.version) == (True, first.outcome.version)
        view = await svc.get_case(case_id)
        assert [m.internal for m in view.messages] == [True, False]
        assert view.satisfaction is not None and view.satisfaction.csat == 4
        assert [h.what for h in view.history] == [
            "Opened",
            "NoteAdded",
            "Replied",
            "StatusChanged",
            "SatisfactionRecorded",
        ]
    finally:
        svc.close()
