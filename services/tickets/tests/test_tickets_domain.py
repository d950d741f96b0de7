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


def _reply(case: Case, who: str, at: datetime) -> None:
    case.reply(author=who, author_kind=who, body="b", at=at)


def test_each_customer_reply_starts_a_next_reply_clock_until_the_agent_answers() -> None:
    case = open_case(sla_terms(office_terms(next_reply=2 * 3600)))
    # Before the first response the first-response clock covers a customer's reply.
    _reply(case, "customer", MON_9 + timedelta(minutes=5))
    assert "next_reply" not in case.clocks
    _reply(case, "agent", MON_9 + timedelta(minutes=30))
    # Monday 16:00 Berlin: the customer writes; two business hours run to Tuesday 10:00.
    _reply(case, "customer", MON_9 + timedelta(hours=7))
    assert case.clock_state("next_reply") == "running"
    due = {(d.kind, d.what): d for d in case.deadlines()}
    first = due[("next_reply", "breach")]
    assert (first.at, first.cycle) == (MON_9 + timedelta(days=1, hours=1), 1)
    assert due[("next_reply", "warning")].at == MON_9 + timedelta(days=1, minutes=45)
    # A second customer message does not restart the clock the agent already owes.
    _reply(case, "customer", MON_9 + timedelta(hours=7, minutes=30))
    assert case.clocks["next_reply"]["cycle"] == 1
    # The agent is late: the breach of cycle 1 is raised once.
    late = MON_9 + timedelta(days=1, hours=2)
    assert case.raise_deadline("next_reply", "breach", first.deadline_version, late)
    assert not case.raise_deadline("next_reply", "breach", first.deadline_version, late)
    _reply(case, "agent", late)
    assert case.clock_state("next_reply") == "breached"
    # The next customer reply is a new instance with its own, higher deadline version.
    _reply(case, "customer", late + timedelta(minutes=10))
    second = next(d for d in case.deadlines() if (d.kind, d.what) == ("next_reply", "breach"))
    assert second.cycle == 2 and second.deadline_version > first.deadline_version
    assert case.clock_state("next_reply") == "running"
    # The old instance's deadline can never be raised again under the new cycle.
    assert not case.raise_deadline("next_reply", "breach", first.deadline_version, late.max)
    _reply(case, "agent", late + timedelta(minutes=40))
    assert case.clock_state("next_reply") == "met"
    events = case.collect_events()
    breaches = [e for e in events if isinstance(e, Case.SlaBreached)]
    assert [(e.kind, e.cycle) for e in breaches] == [("next_reply", 1)]
    # The policy's escalation acts on a next-reply breach too.
    escalations = [e for e in events if isinstance(e, Case.Escalated)]
    assert [(e.kind, e.priority, e.team) for e in escalations] == [("next_reply", "high", "tier2")]


def test_next_reply_pauses_while_pending_and_the_snapshot_says_how_much_is_left() -> None:
    case = open_case(sla_terms(office_terms(next_reply=2 * 3600)))
    _reply(case, "agent", MON_9)
    _reply(case, "customer", MON_9 + timedelta(hours=1))  # 10:00, due 12:00
    case.change_status("pending", MON_9 + timedelta(hours=2))  # 1 h used
    clocks = {c["kind"]: c for c in case.sla_clocks()}
    assert clocks["next_reply"]["state"] == "paused"
    assert clocks["next_reply"]["remaining_seconds"] == 3600
    assert clocks["next_reply"]["due_at"] is None
    assert clocks["first_response"]["state"] == "met"
    # Pending over the weekend: the clocks run again from Monday 09:00.
    monday = MON_9 + timedelta(days=7)
    case.change_status("open", monday)
    clocks = {c["kind"]: c for c in case.sla_clocks()}
    assert clocks["next_reply"]["due_at"] == monday + timedelta(hours=1)
    assert clocks["next_reply"]["warn_at"] == monday + timedelta(minutes=45)
    assert [c["kind"] for c in case.sla_clocks()] == ["first_response", "next_reply", "resolution"]


def test_a_tier_without_targets_of_its_own_uses_the_default_tiers() -> None:
    terms = sla_terms(office_terms(first_response=600))
    case = Case.open(
        customer_id="contact-1",
        channel="email",
        subject="s",
        description="",
        category="",
        priority="high",
        team="support",
        assignee="",
        tier="vip",
        tier_source="loyalty",
        policy_id="",
        policy_version=0,
        terms=terms,
        reopen_window_seconds=3600,
        at=MON_9,
    )
    assert case.clocks["first_response"]["target"] == 600


STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["open", "pending", "on_hold", "agent", "customer", "solved", "reopen", "scan"]
        ),
        st.integers(min_value=0, max_value=3 * 24 * 3600),
    ),
    max_size=30,
)


def _paused_within(
    pauses: list[tuple[datetime, datetime]], start: datetime, end: datetime, case: Case
) -> float:
    total = 0.0
    for lo, hi in pauses:
        lo, hi = max(lo, start), min(hi, end)
        if hi > lo:
            total += case.calendar.between(lo, hi)
    return total


@settings(max_examples=80, deadline=None)
@given(STEPS, st.booleans())
def test_running_and_paused_time_add_up_to_the_business_wall_time(
    steps: list[tuple[str, int]], pause_on_hold: bool
) -> None:
    """For every clock instance (first response, each next-reply cycle, resolution):
    business time used + business time paused = business wall time from its start to
    its end; and no target instance is ever reported met once its breach was raised,
    nor breached without a breach event (a breach only when its deadline had passed)."""
    terms = sla_terms(
        office_terms(
            pause_on_hold=pause_on_hold,
            first_response=4 * 3600,
            next_reply=3 * 3600,
            resolution=10**6,
        )
    )
    case = open_case(terms)
    at = MON_9
    pauses: list[tuple[datetime, datetime]] = []
    paused_since: datetime | None = None
    ended: list[tuple[str, dict]] = []  # type: ignore[type-arg]

    def check(kind: str, clock: dict, end: datetime) -> None:  # type: ignore[type-arg]
        start = datetime.fromisoformat(clock["started_at"])
        if clock["met_at"]:
            end = datetime.fromisoformat(clock["met_at"])
        closed = pauses + ([(paused_since, end)] if paused_since else [])
        used = case.business_seconds_used(kind, end) if not clock["met_at"] else clock["consumed"]
        wall = case.calendar.between(start, end)
        assert used + _paused_within(closed, start, end, case) == pytest.approx(wall, abs=1e-3)

    for what, gap in steps:
        at += timedelta(seconds=gap)
        before = case.status
        next_reply = case.clocks.get("next_reply")
        try:
            if what == "scan":
                for d in case.deadlines():
                    if d.at <= at:
                        case.raise_deadline(d.kind, d.what, d.deadline_version, at)
                continue
            if what in ("agent", "customer"):
                _reply(case, what, at)
            else:
                case.change_status("open" if what == "reopen" else what, at)
        except RuleViolated:
            continue
        if next_reply is not None and case.clocks.get("next_reply") is not next_reply:
            ended.append(("next_reply", next_reply))  # an earlier cycle, finished
        was_paused = case._pauses(before)
        now_paused = case._pauses(case.status)
        if not was_paused and now_paused:
            paused_since = at
        elif was_paused and not now_paused and paused_since is not None:
            pauses.append((paused_since, at))
            paused_since = None
        if case.status == "solved":
            break
    end = at + timedelta(hours=1)
    for kind, clock in ended + list(case.clocks.items()):
        check(kind, clock, end)
    breached = {(e.kind, e.cycle) for e in case.collect_events() if isinstance(e, Case.SlaBreached)}
    for kind, clock in ended + list(case.clocks.items()):
        instance = (kind, clock.get("cycle", 1))
        if clock["breached"]:
            assert instance in breached
        else:
            assert instance not in breached
        # met on time and breached exclude each other; met late reports "breached".
        if instance in breached and clock["met_at"]:
            assert datetime.fromisoformat(clock["met_at"]) >= datetime.fromisoformat(
                clock["breached_due_at"]
            )
    for c in case.sla_clocks():
        assert c["state"] in ("running", "paused", "met", "breached")
        assert (c["state"] == "breached") == case.clocks[c["kind"]]["breached"]


def test_a_pause_spanning_a_holiday_weekend() -> None:
    # Thursday 2 April 2026 16:00 in Berlin (CEST); Good Friday is a holiday.
    thursday_16 = datetime(2026, 4, 2, 14, tzinfo=UTC)
    case = open_case(at=thursday_16)
    _reply(case, "agent", thursday_16 + timedelta(minutes=10))
    case.change_status("pending", thursday_16 + timedelta(minutes=30))
    tuesday_10 = datetime(2026, 4, 7, 8, tzinfo=UTC)
    _reply(case, "customer", tuesday_10)
    # Paused over Thursday's last half hour, Friday (holiday), the weekend, Monday
    # and Tuesday's first hour: only the 30 minutes before the pause were used.
    assert case.business_seconds_used("resolution", tuesday_10) == 1800
    breach = next(d for d in case.deadlines() if (d.kind, d.what) == ("resolution", "breach"))
    # 7.5 h left from Tuesday 10:00: 7 h to closing, then 30 minutes on Wednesday.
    assert breach.at == datetime(2026, 4, 8, 7, 30, tzinfo=UTC)


def test_a_merge_moves_a_case_once_and_its_undo_gives_it_back_with_what_happened() -> None:
    case = open_case()
    case.change_status("solved", MON_9)
    case.change_status("closed", MON_9)  # a closed case still follows its customer
    assert case.move_to_customer("survivor", "merge-1", MON_9) is True
    assert case.move_to_customer("survivor", "merge-1", MON_9) is False
    assert case.customer_id == "survivor" and case.moved_by("merge-1")
    events = case.collect_events()
    assert [type(e).__name__ for e in events][-1] == "CustomerMoved"
    assert events[-1].customer_id == "survivor"  # the event belongs to the new owner

    # Only the merge that moved it, and only to a restored contact, gives it back.
    assert case.give_back("merge-2", ("contact-1",), MON_9) is False
    assert case.give_back("merge-1", ("someone-else",), MON_9) is False
    assert case.give_back("merge-1", ("contact-1",), MON_9) is True
    assert case.give_back("merge-1", ("contact-1",), MON_9) is False
    assert (case.customer_id, case.status, case.moved_by("merge-1")) == (
        "contact-1",
        "closed",
        False,
    )
    [back] = case.collect_events()
    assert (back.from_customer_id, back.to_customer_id, back.undone) == (
        "survivor",
        "contact-1",
        True,
    )
    # The merge delivered again after its undo (its receipts expired) moves nothing.
    assert case.move_to_customer("survivor", "merge-1", MON_9) is False
    with pytest.raises(RuleViolated, match="needs the new customer"):
        case.move_to_customer("", "merge-3", MON_9)
