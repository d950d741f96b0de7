"""The cases in the 360 view, on plain documents: one tickets event at a time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from contact_events import person_registered
from ticket_events import (
    breached,
    clock,
    envelope,
    opened,
    policy_defined,
    replied,
    satisfaction,
    sla,
    status,
    when,
)

from crm.tickets.v1 import tickets_pb2
from crm_analytics.document import Loaded, UnknownEvent, is_known
from crm_analytics.from_contacts import apply_event
from crm_analytics.from_tickets import ADAPTER, RECENT_CASES, apply_ticket_event
from crm_analytics.rest_api import to_json

ADA = "p-ada"
SOLVED = tickets_pb2.CASE_STATUS_SOLVED
OPEN = tickets_pb2.CASE_STATUS_OPEN
PENDING = tickets_pb2.CASE_STATUS_PENDING


def replay(*events, doc=None):
    for event in events:
        if event.DESCRIPTOR.name == "ContactEvent":
            doc = apply_event(doc, event).doc
        else:
            doc = apply_ticket_event(doc, event).doc
    return doc


def case_of(doc, case_id):
    cases = doc["tickets"]["open_cases"] + doc["tickets"]["recent_cases"]
    [case] = [c for c in cases if c["case_id"] == case_id]
    return case


def test_an_opened_case_shows_with_its_sla_and_next_deadline():
    due = when(7) + timedelta(hours=4)
    doc = replay(person_registered(ADA, 1), opened(ADA, "k-1", 7, first_due=due))
    [case] = doc["tickets"]["open_cases"]
    assert case["case_id"] == "k-1"
    assert case["subject"] == "Printer on fire"
    assert (case["status"], case["priority"], case["channel"]) == ("new", "high", "email")
    assert (case["team"], case["assignee"], case["category"]) == ("support", "bob", "hardware")
    assert case["opened_at"] == when(7)
    assert case["sla"]["state"] == "running"
    assert case["sla"]["next_deadline"] == due  # the first response, before the resolution
    assert case["sla"]["breached"] is False
    assert (case["sla"]["policy_id"], case["sla"]["policy_version"]) == ("pol-1", 2)
    assert [c["kind"] for c in case["sla"]["clocks"]] == ["first_response", "resolution"]
    assert doc["tickets"]["recent_cases"] == []
    assert doc["positions"] == {"contacts": 1, "tickets": 7}
    # The timeline names channel and priority, never the subject (personal data).
    [entry] = [e for e in doc["timeline"] if e["source"] == "tickets"]
    assert (entry["kind"], entry["summary"]) == (
        "case.opened",
        "Case opened (email, high priority)",
    )
    assert entry["owner"] == "bob"


def test_the_sla_state_is_the_worst_clock_and_paused_clocks_have_no_deadline():
    paused = sla(
        clock("first_response", "met"),
        clock("resolution", "paused", remaining=3600),
    )
    doc = replay(opened(ADA, "k-1", 7), status(ADA, "k-1", 8, 2, PENDING, paused))
    case = case_of(doc, "k-1")
    assert case["status"] == "pending"
    assert case["sla"]["state"] == "paused"
    assert case["sla"]["next_deadline"] is None
    assert case["sla"]["clocks"][1]["remaining_seconds"] == 3600
    assert case["sla"]["clocks"][0]["remaining_seconds"] is None


def test_a_breach_marks_the_case_and_puts_it_first():
    late = when(5) + timedelta(minutes=5)
    doc = replay(
        opened(ADA, "k-early", 5, first_due=late),
        opened(ADA, "k-later", 6, first_due=when(6) + timedelta(days=3)),
    )
    assert [c["case_id"] for c in doc["tickets"]["open_cases"]] == ["k-early", "k-later"]
    doc = replay(
        breached(
            ADA,
            "k-later",
            9,
            2,
            sla(clock("first_response", "breached", when(9)), clock("resolution", "running", late)),
        ),
        doc=doc,
    )
    assert [c["case_id"] for c in doc["tickets"]["open_cases"]] == ["k-later", "k-early"]
    case = case_of(doc, "k-later")
    assert case["sla"]["state"] == "breached"
    assert case["sla"]["breached"] is True
    assert doc["timeline"][0]["kind"] == "case.sla_breached"
    assert doc["timeline"][0]["summary"] == "SLA breached: first response target"


def test_a_breach_stays_visible_after_a_late_reply_and_a_reopening():
    met_late = sla(clock("first_response", "met"), clock("resolution", "running", when(30)))
    doc = replay(
        opened(ADA, "k-1", 5),
        breached(ADA, "k-1", 6, 2, sla(clock("first_response", "breached", when(6)))),
        replied(ADA, "k-1", 7, 3, met_late),
        status(ADA, "k-1", 8, 4, SOLVED, sla(clock("resolution", "met"))),
        status(ADA, "k-1", 9, 5, OPEN, met_late),
    )
    case = case_of(doc, "k-1")
    assert case["status"] == "open"
    assert case["sla"]["state"] == "running"
    assert case["sla"]["breached"] is True
    assert case["solved_at"] is None
    assert doc["tickets"]["recent_cases"] == []
    assert [e["kind"] for e in doc["timeline"]][:2] == ["case.reopened", "case.solved"]


def test_a_solved_case_moves_to_the_recent_ones_with_its_satisfaction():
    doc = replay(
        opened(ADA, "k-1", 5),
        opened(ADA, "k-2", 6),
        status(ADA, "k-1", 7, 2, SOLVED, sla(clock("resolution", "met"))),
        satisfaction(ADA, "k-1", 8, 3, csat=5, ces=2, nps=9),
        status(ADA, "k-2", 9, 2, SOLVED, sla(clock("resolution", "met"))),
        satisfaction(ADA, "k-2", 10, 3, csat=2),
    )
    assert doc["tickets"]["open_cases"] == []
    assert [c["case_id"] for c in doc["tickets"]["recent_cases"]] == ["k-2", "k-1"]
    k1 = case_of(doc, "k-1")
    assert k1["solved_at"] == when(7)
    assert k1["satisfaction"] == {"csat": 5, "ces": 2, "nps": 9, "recorded_at": when(8)}
    # Not answered: CES 0 and NPS -1 on the wire, None here.
    assert case_of(doc, "k-2")["satisfaction"]["ces"] is None
    assert case_of(doc, "k-2")["satisfaction"]["nps"] is None

    reply = to_json(doc)["tickets"]
    assert reply is not None
    assert reply["satisfaction"] == {
        "responses": 2,
        "csat_average": 3.5,
        "ces_average": 2.0,
        "nps_average": 9.0,
    }
    assert doc["timeline"][0]["summary"] == "Satisfaction: CSAT 2/5"
    assert doc["timeline"][2]["summary"] == "Satisfaction: CSAT 5/5, CES 2/7, NPS 9/10"


def test_only_the_newest_solved_cases_are_kept():
    events = []
    for n in range(RECENT_CASES + 5):
        events.append(opened(ADA, f"k-{n:02}", 10 + 2 * n))
        events.append(status(ADA, f"k-{n:02}", 11 + 2 * n, 2, SOLVED))
    doc = replay(*events)
    recent = doc["tickets"]["recent_cases"]
    assert len(recent) == RECENT_CASES
    assert recent[0]["case_id"] == f"k-{RECENT_CASES + 4:02}"
    assert recent[-1]["case_id"] == "k-05"


def test_a_redelivered_event_changes_nothing():
    first = replay(opened(ADA, "k-1", 5), satisfaction(ADA, "k-1", 6, 2, csat=4))
    again = apply_ticket_event(first, satisfaction(ADA, "k-1", 6, 2, csat=4))
    assert again.applied is False
    assert again.doc is first
    assert first["tickets"]["satisfaction"]["responses"] == 1


def test_a_case_first_makes_the_customer_known():
    doc = replay(opened(ADA, "k-1", 5))
    assert is_known(doc)
    assert "kind" not in doc
    # The contacts events fill in the rest, in either order.
    later = replay(person_registered(ADA, 1), doc=doc)
    assert later["tickets"] == doc["tickets"]
    assert later["kind"] == "person"


def test_sla_policy_events_change_no_customer_and_are_not_dead_letters():
    assert ADAPTER.apply(policy_defined(3), Loaded({}, {})) is None
    assert ADAPTER.customer_of(policy_defined(3)) == ""
    assert list(ADAPTER.customers_touched(policy_defined(3))) == []


def test_an_unknown_payload_is_refused_as_unknown_and_a_case_without_customer_as_malformed():
    with pytest.raises(UnknownEvent):
        apply_ticket_event(None, envelope(ADA, "k-1", 5, 1))
    headless = opened(ADA, "k-1", 5)
    headless.customer_id = ""
    with pytest.raises(ValueError, match="without customer_id"):
        ADAPTER.apply(headless, Loaded({}, {}))


def test_a_csat_out_of_range_is_a_malformed_event():
    with pytest.raises(ValueError, match="CSAT 9"):
        replay(opened(ADA, "k-1", 5), satisfaction(ADA, "k-1", 6, 2, csat=9))
