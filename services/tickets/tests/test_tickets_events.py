"""The published form of the events: every case event carries the case's SLA state
after it (the contract the 360 view reads), and the actor and client of its command."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from tickets_support import Clock, KnownContacts, office_terms, sqlite_settings

from crm.events.v1 import tickets_pb2 as events_pb
from crm_common.commands import Caller
from crm_tickets.application import TicketsService, create_application
from crm_tickets.domain import Case
from crm_tickets.events_out import CaseEvents
from crm_tickets.inputs import NewCase

AGENT = Caller(actor="agent-7", client="desk-app")


def published(svc: TicketsService, wire: CaseEvents, start: int = 1) -> list[Any]:
    recorder: Any = svc.app.recorder
    out = []
    for n in recorder.select_notifications(start, 1000):
        event = svc.app.mapper.to_domain_event(n)
        message = wire(event, dict(getattr(event, "_meta", None) or {}), n.id)
        if message is not None:
            out.append((message[1], events_pb.TicketEvent.FromString(message[2])))
    return out


async def test_every_case_event_carries_the_sla_state_after_it(tmp_path: Any) -> None:
    clock = Clock()  # Monday 09:00 UTC = 10:00 Berlin
    svc = TicketsService(
        create_application(sqlite_settings(tmp_path)), KnownContacts("contact-1"), clock=clock
    )
    try:
        terms = office_terms(first_response=3600, next_reply=1800, escalate_team="")
        pid = (await svc.define_sla_policy(AGENT, "Office", terms)).outcome.id
        opened = await svc.open_case(
            AGENT, NewCase("contact-1", "chat", "Locked out", team="desk", policy_id=pid)
        )
        case_id = opened.outcome.id
        clock.advance(minutes=20)
        await svc.reply_to_case(AGENT, case_id, "agent", "Try again?")
        await svc.reply_to_case(AGENT, case_id, "customer", "No luck")
        await svc.change_case_status(AGENT, case_id, "on_hold")
        clock.advance(hours=2)
        await svc.raise_due_deadlines()  # the next reply (10:50 Berlin) is overdue

        def load(ident: UUID, version: int) -> Case:
            case: Case = svc.app.repository.get(ident, version=version)
            return case

        following = CaseEvents(load)
        messages = published(svc, following)
        assert following.loads == 0  # it followed every case from its opening
        kinds = [ce_type.rsplit(".", 1)[1] for ce_type, _ in messages]
        assert kinds == [
            "SlaPolicyDefined",
            "CaseOpened",
            "CaseReplied",
            "CaseReplied",
            "CaseStatusChanged",
            "SlaBreached",
            "CaseEscalated",
        ]
        policy_event = messages[0][1]
        assert not policy_event.HasField("sla")
        for _, m in messages[1:]:
            assert m.HasField("sla")
            assert (m.sla.policy_id, m.sla.policy_version) == (pid, 1)
            assert (m.sla.tier, m.sla.tier_source) == (
                "standard",
                "default: loyalty not configured",
            )
        assert messages[1][1].actor == "agent-7" and messages[1][1].client == "desk-app"
        assert messages[5][1].actor == "service:tickets"

        def clocks(m: Any) -> dict[str, tuple[str, str, int, str]]:
            return {
                c.kind: (
                    c.state,
                    c.due_at.ToJsonString() if c.HasField("due_at") else "",
                    c.remaining_seconds,
                    c.warn_at.ToJsonString() if c.HasField("warn_at") else "",
                )
                for c in m.sla.clocks
            }

        assert clocks(messages[1][1])["first_response"] == (
            "running",
            "2026-02-02T10:00:00Z",
            0,
            "2026-02-02T09:45:00Z",
        )
        after_customer = clocks(messages[3][1])
        assert after_customer["first_response"][0] == "met"
        assert after_customer["next_reply"][:2] == ("running", "2026-02-02T09:50:00Z")
        # on hold does not pause these terms: the clock keeps running
        assert clocks(messages[4][1])["next_reply"][0] == "running"
        breached = clocks(messages[5][1])["next_reply"]
        assert breached[:2] == ("breached", "2026-02-02T09:50:00Z")
        assert messages[5][1].sla_breached.cycle == 1

        # A relay that starts in the middle of the log loads the case once and
        # publishes the same messages.
        fresh = CaseEvents(load)
        again = published(svc, fresh, start=4)
        assert fresh.loads == 1
        assert [m.SerializeToString() for _, m in again] == [
            m.SerializeToString() for _, m in messages[3:]
        ]
    finally:
        svc.close()


async def test_a_case_moved_by_a_merge_is_published_under_its_new_owner(tmp_path: Any) -> None:
    svc = TicketsService(
        create_application(sqlite_settings(tmp_path)),
        KnownContacts("contact-1", "contact-2"),
        clock=Clock(),
    )
    try:
        opened = await svc.open_case(AGENT, NewCase("contact-2", "chat", "Hi", team="desk"))
        case_id = opened.outcome.id
        args = {"survivor": "contact-1", "merge_id": "m-1", "event_id": "contact-1:4"}
        assert await svc.move_customer_cases(merged=["contact-2"], actor="ann", **args) == 1
        undo = {"survivor": "contact-1", "merge_id": "m-1", "event_id": "contact-1:5"}
        assert await svc.give_back_customer_cases(restored=["contact-2"], actor="ann", **undo) == 1

        def load(ident: UUID, version: int) -> Case:
            case: Case = svc.app.repository.get(ident, version=version)
            return case

        messages = published(svc, CaseEvents(load))
        moves = [(t, m) for t, m in messages if t.endswith("CaseCustomerMoved")]
        assert [(m.customer_id, m.aggregate_id, m.actor) for _, m in moves] == [
            ("contact-1", case_id, "ann"),
            ("contact-2", case_id, "ann"),
        ]
        assert [
            (p.from_customer_id, p.to_customer_id, p.merge_id, p.undone)
            for p in (m.case_customer_moved for _, m in moves)
        ] == [("contact-2", "contact-1", "m-1", False), ("contact-1", "contact-2", "m-1", True)]
        assert moves[0][1].sla.clocks  # the SLA state goes along, as with every case event
    finally:
        svc.close()
