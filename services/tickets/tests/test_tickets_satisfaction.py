"""The satisfaction trend on SQLite and PostgreSQL: survey responses grouped by
UTC month or week with their CSAT and CES means and NPS, per team or for every
team, the months and weeks without responses included, the same after a
restart, and bad arguments refused naming the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tickets_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.errors import ValidationFailed
from crm_common.settings import Settings
from crm_tickets.application import TicketsService, buckets, create_application
from crm_tickets.inputs import NewCase, SurveyInput, Triage
from crm_tickets.views import SatisfactionTrendView

AGENT = Caller(actor="agent-7", client="test")
#: A Monday (2026-02-02 09:00 UTC): the first responses of each scenario.
START = datetime(2026, 2, 2, 9, tzinfo=UTC)
JAN = datetime(2026, 1, 1, tzinfo=UTC)
APR = datetime(2026, 4, 1, tzinfo=UTC)


def service(settings: Settings, clock: Clock) -> TicketsService:
    return TicketsService(create_application(settings), KnownContacts("contact-1"), clock=clock)


async def answered(svc: TicketsService, team: str, survey: SurveyInput) -> str:
    """A case of `team` solved and answered at the clock's time; its id."""
    opened = await svc.open_case(AGENT, NewCase("contact-1", "email", "Help", team=team))
    await svc.change_case_status(AGENT, opened.outcome.id, "solved")
    await svc.record_satisfaction(AGENT, opened.outcome.id, survey)
    return opened.outcome.id


async def seed(svc: TicketsService, clock: Clock) -> str:
    """February (week of the 2nd): desk 5 (NPS 10), 4 (NPS 8, CES 2), billing 2 (NPS 3, CES
    6); week of the 9th: desk 3 (no NPS). March 2nd: desk 1 (NPS 0, CES 7). An unanswered
    solved case. Returns the billing case's id."""
    await answered(svc, "desk", SurveyInput(5, nps=10))
    await answered(svc, "desk", SurveyInput(4, ces=2, nps=8))
    billing = await answered(svc, "billing", SurveyInput(2, ces=6, nps=3))
    clock.advance(days=7)
    await answered(svc, "desk", SurveyInput(3))
    clock.now = datetime(2026, 3, 2, 23, 59, tzinfo=UTC)
    await answered(svc, "desk", SurveyInput(1, ces=7, nps=0))
    unanswered = await svc.open_case(AGENT, NewCase("contact-1", "email", "Quiet", team="desk"))
    await svc.change_case_status(AGENT, unanswered.outcome.id, "solved")
    return billing


def figures(trend: SatisfactionTrendView) -> list[tuple[str, int, float, float, float]]:
    return [
        (p.start.date().isoformat(), p.responses, p.csat_mean, p.ces_mean, p.nps)
        for p in trend.periods
    ]


async def test_the_trend_by_month_and_week_per_team_and_after_a_restart(
    store_settings: Settings,
) -> None:
    clock = Clock(START)
    svc = service(store_settings, clock)
    try:
        billing = await seed(svc, clock)
        monthly = await svc.satisfaction_trend("", JAN, APR, "month")
        # February: CSAT (5+4+2+3)/4, CES (2+6)/2, NPS 1 promoter 1 detractor of 3.
        assert figures(monthly) == [
            ("2026-01-01", 0, 0.0, 0.0, 0.0),
            ("2026-02-01", 4, 3.5, 4.0, 0.0),
            ("2026-03-01", 1, 1.0, 7.0, -100.0),
        ]
        february = monthly.periods[1]
        assert (february.nps_responses, february.promoters, february.passives) == (3, 1, 1)
        assert (february.detractors, february.ces_responses) == (1, 2)
        desk = await svc.satisfaction_trend("Desk", JAN, APR, "")
        assert (desk.team, desk.interval) == ("desk", "month")
        assert figures(desk)[1] == ("2026-02-01", 3, 4.0, 2.0, 50.0)
        weekly = await svc.satisfaction_trend(
            "", datetime(2026, 2, 4, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC), "week"
        )
        # The first week is cut to the period: Monday's responses are before it.
        assert [(p.start.isoformat(), p.responses) for p in weekly.periods] == [
            ("2026-02-04T00:00:00+00:00", 0),
            ("2026-02-09T00:00:00+00:00", 1),
            ("2026-02-16T00:00:00+00:00", 0),
            ("2026-02-23T00:00:00+00:00", 0),
            ("2026-03-02T00:00:00+00:00", 1),
        ]
        assert weekly.periods[-1].end == datetime(2026, 3, 3, tzinfo=UTC)
        # A case moved to another team after its survey counts for the team it is in now.
        await svc.triage_case(AGENT, billing, Triage("access", "normal", "desk"))
        desk_now = await svc.satisfaction_trend("desk", JAN, APR, "month")
        assert figures(desk_now)[1] == ("2026-02-01", 4, 3.5, 4.0, 0.0)
        assert (await svc.satisfaction_trend("billing", JAN, APR, "month")).periods[
            1
        ].responses == 0
    finally:
        svc.close()
    restarted = service(store_settings, clock)
    try:
        assert restarted.query.tables.cached == 0
        again = await restarted.satisfaction_trend("", JAN, APR, "month")
        assert figures(again) == figures(monthly)
    finally:
        restarted.close()


async def test_bad_intervals_and_periods_are_refused_naming_the_field(
    store_settings: Settings,
) -> None:
    svc = service(store_settings, Clock(START))
    try:
        for args, field in [
            (("", JAN, APR, "day"), "interval"),
            (("", None, APR, "month"), "period_start"),
            (("", JAN, datetime(2026, 4, 1), "month"), "period_end"),
            (("", APR, JAN, "week"), "period_end"),
            (("", JAN, JAN + timedelta(days=367), "month"), "period_end"),
        ]:
            with pytest.raises(ValidationFailed) as refused:
                await svc.satisfaction_trend(*args)  # type: ignore[arg-type]
            assert field in [e.field for e in refused.value.errors], (args, refused.value)
    finally:
        svc.close()


def test_buckets_are_the_calendar_months_and_weeks_cut_to_the_period() -> None:
    start = datetime(2025, 12, 31, 22, tzinfo=UTC)
    end = datetime(2026, 1, 14, tzinfo=UTC)
    assert [(b.date(), s, e.date()) for b, s, e in buckets(start, end, "month")] == [
        (datetime(2025, 12, 1).date(), start, datetime(2026, 1, 1).date()),
        (datetime(2026, 1, 1).date(), datetime(2026, 1, 1, tzinfo=UTC), end.date()),
    ]
    weeks = [b.date().isoformat() for b, _, _ in buckets(start, end, "week")]
    assert weeks == ["2025-12-29", "2026-01-05", "2026-01-12"]
