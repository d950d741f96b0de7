"""The case aggregate: the status machine, the SLA clocks, deadlines raised once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tickets_support import office_terms

from crm_common.errors import RuleViolated
from crm_tickets.application import DEFAULT_TERMS
from crm_tickets.domain import Case
from crm_tickets.validation import sla_terms

MON_9 = datetime(2026, 2, 2, 8, 0, tzinfo=UTC)  # 09:00 in Berlin


def open_case(terms: dict | None = None, at: datetime = MON_9) -> Case:  # type: ignore[type-arg]
    return Case.open(
        customer_id="contact-1",
        channel="email",
        subject="Printer on fire",
        description="",
        category="hardware",
        priority="normal",
        team="support",
        assignee="",
        tier="standard",
        tier_source="default",
        policy_id="",
        policy_version=0,
        terms=terms or sla_terms(office_terms()),
        reopen_window_seconds=3600,
        at=at,
    )


def test_illegal_transitions_name_the_allowed_ones() -> None:
    case = open_case()
    case.change_status("solved", MON_9)
    with pytest.raises(RuleViolated, match="allowed: open, closed"):
        case.change_status("pending", MON_9)
    case.change_status("closed", MON_9)
    with pytest.raises(RuleViolated, match="closed case is final"):
        case.change_status("open", MON_9)


def test_reopen_only_within_the_window() -> None:
    case = open_case()
    case.change_status("solved", MON_9)
    case.change_status("open", MON_9 + timedelta(minutes=59))
    case.change_status("solved", MON_9 + timedelta(hours=1))
    with pytest.raises(RuleViolated, match="within 3600 s"):
        case.change_status("open", MON_9 + timedelta(hours=2, seconds=1))


def test_deadlines_follow_business_hours_and_pause_while_pending() -> None:
    case = open_case()
    due = {(d.kind, d.what): d.at for d in case.deadlines()}
    assert due[("first_response", "warning")] == MON_9 + timedelta(minutes=45)
    assert due[("first_response", "breach")] == MON_9 + timedelta(hours=1)
    assert due[("resolution", "breach")] == MON_9 + timedelta(hours=8)
    # Pending for a day from 10:00: the resolution clock stops with 1 h used.
    case.reply(
        author="agent-7", author_kind="agent", body="Which model?", at=MON_9 + timedelta(minutes=30)
    )
    case.change_status("pending", MON_9 + timedelta(hours=1))
    assert [d.kind for d in case.deadlines()] == []
    # The customer answers on Tuesday 09:00: 7 business hours left, due Tuesday 16:00.
    case.reply(author="contact-1", author_kind="customer", body="X1", at=MON_9 + timedelta(days=1))
    assert case.status == "open"
    (breach,) = [d for d in case.deadlines() if d.what == "breach"]
    assert breach.at == MON_9 + timedelta(days=1, hours=7)
    assert case.clock_state("first_response") == "met"


def test_a_breach_is_raised_once_and_escalates() -> None:
    case = open_case()
    warning = next(d for d in case.deadlines() if d.what == "warning")
    assert not case.raise_deadline(warning.kind, "warning", warning.deadline_version, MON_9)
    soon, later = MON_9 + timedelta(minutes=50), MON_9 + timedelta(hours=1)
    assert case.raise_deadline("first_response", "warning", warning.deadline_version, soon)
    assert not case.raise_deadline("first_response", "warning", warning.deadline_version, soon)
    assert case.raise_deadline("first_response", "breach", warning.deadline_version, later)
    assert not case.raise_deadline("first_response", "breach", warning.deadline_version, later)
    assert (case.priority, case.team) == ("high", "tier2")
    assert case.clock_state("first_response") == "breached"
    events = [e.__class__.__name__ for e in case.collect_events()]
    assert events.count("SlaBreached") == 1 and events.count("Escalated") == 1
    # A late reply does not turn a breached target into a met one.
    case.reply(author="a", author_kind="agent", body="sorry", at=later)
    assert case.clock_state("first_response") == "breached"


def test_a_moved_deadline_is_not_raised_under_its_old_version() -> None:
    case = open_case()
    (first,) = [d for d in case.deadlines() if (d.kind, d.what) == ("first_response", "breach")]
    case.change_status("pending", MON_9 + timedelta(minutes=10))
    case.change_status("open", MON_9 + timedelta(minutes=20))
    assert not case.raise_deadline(
        "first_response", "breach", first.deadline_version, MON_9 + timedelta(hours=2)
    )


def test_satisfaction_only_after_solving_and_once() -> None:
    case = open_case(DEFAULT_TERMS)
    with pytest.raises(RuleViolated, match="solve it first"):
        case.record_satisfaction(csat=5, ces=None, nps=None, comment="", at=MON_9)
    case.change_status("solved", MON_9)
    case.record_satisfaction(csat=4, ces=2, nps=9, comment="quick", at=MON_9)
    with pytest.raises(RuleViolated, match="already"):
        case.record_satisfaction(csat=5, ces=None, nps=None, comment="", at=MON_9)


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["open", "pending", "on_hold", "agent", "customer", "solved", "reopen"]),
        st.integers(min_value=0, max_value=3 * 24 * 3600),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(STEPS, st.booleans())
def test_running_and_paused_time_add_up_to_the_business_wall_time(
    steps: list[tuple[str, int]], pause_on_hold: bool
) -> None:
    terms = sla_terms(office_terms(pause_on_hold=pause_on_hold, resolution=10**6))
    case = open_case(terms)
    calendar = case.calendar
    at = MON_9
    paused = 0.0
    paused_since: datetime | None = None
    for what, gap in steps:
        at += timedelta(seconds=gap)
        before = case.status
        try:
            if what in ("agent", "customer"):
                case.reply(author="x", author_kind=what, body="b", at=at)
            else:
                case.change_status("open" if what == "reopen" else what, at)
        except RuleViolated:
            continue
        was_paused = case._pauses(before)
        now_paused = case._pauses(case.status)
        if not was_paused and now_paused:
            paused_since = at
        elif was_paused and not now_paused and paused_since is not None:
            paused += calendar.between(paused_since, at)
            paused_since = None
        if case.status == "solved":
            break
        for kind in case.clocks:
            state = case.clock_state(kind)
            assert state in ("running", "paused", "met", "breached")
    clock = case.clocks["resolution"]
    end = datetime.fromisoformat(clock["met_at"]) if clock["met_at"] else at + timedelta(hours=1)
    if paused_since is not None:
        paused += calendar.between(paused_since, end)
    used = case.business_seconds_used("resolution", end)
    assert used + paused == pytest.approx(calendar.between(MON_9, end), abs=1e-3)
