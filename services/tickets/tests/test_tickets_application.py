"""The application over SQLite: cases, policies, and the SLA scanner raising
each deadline exactly once, with two replicas on one store and across restarts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from tickets_support import Clock, KnownContacts, office_terms

from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.settings import Settings
from crm_tickets.application import TicketsService, create_application
from crm_tickets.domain import Case
from crm_tickets.inputs import NewCase, SurveyInput

AGENT = Caller(actor="agent-7", client="test")
ADMIN = Caller(actor="admin-1", client="test")


def service(settings: Settings, clock: Clock) -> TicketsService:
    return TicketsService(create_application(settings), KnownContacts("contact-1"), clock=clock)


def breaches(svc: TicketsService, case_id: str) -> list[str]:
    case = svc.app.repository.get(__import__("uuid").UUID(case_id))
    assert isinstance(case, Case)
    return [
        h["what"] for h in case.history if h["what"] in ("SlaWarned", "SlaBreached", "Escalated")
    ]


async def test_unknown_contacts_and_bad_input_are_refused(store_settings: Settings) -> None:
    svc = service(store_settings, Clock())
    try:
        with pytest.raises(NotFound, match="Contact"):
            await svc.open_case(AGENT, NewCase("nobody", "email", "Help", team="support"))
        with pytest.raises(ValidationFailed) as error:
            await svc.open_case(AGENT, NewCase("contact-1", "fax", "", team="support"))
        assert [e.field for e in error.value.errors] == ["channel", "subject"]
    finally:
        svc.close()


async def test_deadlines_are_raised_once_by_two_replicas_and_after_a_restart(
    store_settings: Settings,
) -> None:
    clock = Clock()  # Monday 09:00 UTC = 10:00 Berlin
    first, second = service(store_settings, clock), service(store_settings, clock)
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
    again, other = service(store_settings, clock), service(store_settings, clock)
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


async def test_a_policy_revision_applies_to_new_cases_only(store_settings: Settings) -> None:
    svc = service(store_settings, Clock())
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


async def test_replies_notes_status_and_satisfaction(store_settings: Settings) -> None:
    clock = Clock()
    svc = service(store_settings, clock)
    try:
        opened = await svc.open_case(AGENT, NewCase("contact-1", "phone", "Refund", team="support"))
        case_id = opened.outcome.id
        assert (opened.subject.tier, opened.subject.tier_source) == (
            "standard",
            "default: loyalty not configured",
        )
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


async def test_the_queue_puts_breaches_first_then_the_nearest_deadline_then_paused(
    store_settings: Settings,
) -> None:
    clock = Clock()  # Monday 09:00 UTC
    svc = service(store_settings, clock)
    try:
        policy = await svc.define_sla_policy(ADMIN, "Office", office_terms(escalate_team=""))
        pid = policy.outcome.id

        async def open_(subject: str, priority: str = "normal") -> str:
            new = NewCase("contact-1", "email", subject, team="desk", priority=priority)
            opened = await svc.open_case(AGENT, replace(new, policy_id=pid))
            return opened.outcome.id

        late = await open_("late")  # first response due 11:00 Berlin = 10:00 UTC
        clock.advance(minutes=30)
        paused = await open_("paused")
        await svc.change_case_status(AGENT, paused, "pending")
        clock.advance(minutes=10)
        soon = await open_("soon")  # due 10:40 UTC
        clock.advance(minutes=10)
        later = await open_("later")  # due 10:50 UTC
        clock.advance(minutes=40)  # 10:30 UTC: `late` is overdue
        await svc.raise_due_deadlines()
        queue = await svc.team_queue("desk")
        assert [c.subject for c in queue.cases] == ["late", "soon", "later", "paused"]
        first_page = await svc.team_queue("desk", page_size=3)
        rest = await svc.team_queue("desk", 3, first_page.next_page_token)
        assert [c.id for c in first_page.cases + rest.cases] == [late, soon, later, paused]
        assert rest.next_page_token == ""
        risky = await svc.cases_at_risk(15, "desk")
        assert [c.id for c in risky.cases] == [soon]
        risky = await svc.cases_at_risk(30)
        assert [c.id for c in risky.cases] == [soon, later]
        with pytest.raises(ValidationFailed) as error:
            await svc.cases_at_risk(0)
        assert error.value.errors[0].field == "within_minutes"
        with pytest.raises(ValidationFailed) as error:
            await svc.team_queue("desk", page_size=501)
        assert error.value.errors[0].field == "page_size"
        with pytest.raises(ValidationFailed) as error:
            await svc.team_queue("desk", page_token="abc")
        assert error.value.errors[0].field == "page_token"
    finally:
        svc.close()


async def test_customer_history_and_sla_compliance(store_settings: Settings) -> None:
    clock = Clock()  # Monday 09:00 UTC = 10:00 Berlin
    svc = service(store_settings, clock)
    svc.contacts = KnownContacts("contact-1", "contact-2")
    try:
        terms = office_terms(
            first_response=3600, resolution=4 * 3600, next_reply=1800, escalate_team=""
        )
        pid = (await svc.define_sla_policy(ADMIN, "Office", terms)).outcome.id
        ids = []
        for n in range(3):
            new = NewCase("contact-1", "web", f"case {n}", team="desk", policy_id=pid)
            ids.append((await svc.open_case(AGENT, new)).outcome.id)
            clock.advance(minutes=1)
        other = NewCase("contact-2", "web", "elsewhere", team="desk", policy_id=pid)
        await svc.open_case(AGENT, other)
        # case 0: first reply after 20 min, solved after 2 h: met, met.
        clock.advance(minutes=17)
        await svc.reply_to_case(AGENT, ids[0], "agent", "hello")
        # case 1: first reply after 2 h (breached), the customer answers, the agent is
        # quick (next reply met), solved after 3 h.
        clock.advance(minutes=100)
        await svc.raise_due_deadlines()
        await svc.reply_to_case(AGENT, ids[1], "agent", "sorry")
        await svc.reply_to_case(AGENT, ids[1], "customer", "still broken")
        clock.advance(minutes=10)
        await svc.reply_to_case(AGENT, ids[1], "agent", "fixed")
        await svc.change_case_status(AGENT, ids[0], "solved")
        clock.advance(minutes=60)
        await svc.change_case_status(AGENT, ids[1], "solved")
        await svc.change_case_status(AGENT, ids[1], "closed")
        history = await svc.customer_cases("contact-1", page_size=2)
        assert [c.id for c in history.cases] == [ids[2], ids[1]]
        rest = await svc.customer_cases("contact-1", 2, history.next_page_token)
        assert [c.id for c in rest.cases] == [ids[0]]
        start, end = clock.now - timedelta(days=1), clock.now + timedelta(days=1)
        report = await svc.sla_compliance("desk", start, end)
        assert report.cases == 4
        by_kind = {t.kind: (t.met, t.breached, t.open) for t in report.targets}
        # case 2 and the other customer's case are still waiting for their first reply,
        # and have breached it by now (raised by the scan at 10:58).
        assert by_kind["first_response"] == (1, 3, 0)
        assert by_kind["next_reply"] == (1, 0, 0)
        assert by_kind["resolution"] == (2, 0, 2)
        assert {t.kind: t.share_met for t in report.targets}["first_response"] == 0.25
        # Business seconds to the first reply: 20 min and 119 min; mean and p90.
        assert report.first_reply_count == 2
        assert report.first_reply_mean_seconds == pytest.approx((20 + 119) * 60 / 2)
        assert report.first_reply_p90_seconds == pytest.approx(119 * 60)
        assert report.resolution_count == 2
        empty = await svc.sla_compliance("desk", end, end + timedelta(days=1))
        assert (empty.cases, empty.targets, empty.first_reply_mean_seconds) == (0, [], 0.0)
        with pytest.raises(ValidationFailed) as error:
            await svc.sla_compliance("desk", end, start)
        assert error.value.errors[0].field == "period_end"
        with pytest.raises(ValidationFailed) as error:
            await svc.sla_compliance("desk", None, end)
        assert error.value.errors[0].field == "period_start"
    finally:
        svc.close()
