"""The business-hours calculator against hand-computed cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crm_common.errors import ValidationFailed
from crm_tickets.domain import WEEKDAYS, BusinessCalendar

WEEK = tuple((d, "09:00", "17:00") for d in WEEKDAYS[:5])
H = 3600.0


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


UTC_OFFICE = BusinessCalendar("UTC", WEEK)


def test_within_one_day() -> None:
    assert UTC_OFFICE.between(utc(2026, 2, 2, 10), utc(2026, 2, 2, 12, 30)) == 2.5 * H


def test_overnight_span_counts_only_working_hours() -> None:
    # Mon 16:00 -> Tue 10:00: one hour on Monday, one on Tuesday.
    assert UTC_OFFICE.between(utc(2026, 2, 2, 16), utc(2026, 2, 3, 10)) == 2 * H
    assert UTC_OFFICE.add(utc(2026, 2, 2, 16), 2 * H) == utc(2026, 2, 3, 10)


def test_weekend_span() -> None:
    # Fri 15:00 + 4 h -> Mon 11:00.
    assert UTC_OFFICE.add(utc(2026, 2, 6, 15), 4 * H) == utc(2026, 2, 9, 11)
    assert UTC_OFFICE.between(utc(2026, 2, 6, 15), utc(2026, 2, 9, 11)) == 4 * H


def test_started_outside_hours_starts_at_opening() -> None:
    assert UTC_OFFICE.add(utc(2026, 2, 7, 12), 1 * H) == utc(2026, 2, 9, 10)


def test_holidays_are_skipped() -> None:
    calendar = BusinessCalendar("UTC", WEEK, ("2026-02-03",))
    # Mon 16:00 + 2 h: one hour Monday, Tuesday is a holiday, one hour Wednesday.
    assert calendar.add(utc(2026, 2, 2, 16), 2 * H) == utc(2026, 2, 4, 10)


def test_target_ending_exactly_at_closing_time_ends_there() -> None:
    assert UTC_OFFICE.add(utc(2026, 2, 2, 9), 8 * H) == utc(2026, 2, 2, 17)
    assert UTC_OFFICE.add(utc(2026, 2, 2, 9), 8 * H + 1) == utc(2026, 2, 3, 9, 0, 1)


def test_a_team_far_from_utc() -> None:
    tokyo = BusinessCalendar("Asia/Tokyo", WEEK)
    # 09:00 Tokyo is 00:00 UTC. Sunday 23:00 UTC is Monday 08:00 in Tokyo.
    assert tokyo.add(utc(2026, 2, 1, 23), 1 * H) == utc(2026, 2, 2, 1)
    # Friday 17:00 Tokyo = 08:00 UTC; one more hour lands on Monday 10:00 Tokyo.
    assert tokyo.add(utc(2026, 2, 6, 7), 2 * H) == utc(2026, 2, 9, 1)


def test_spring_forward_keeps_local_hours() -> None:
    berlin = BusinessCalendar("Europe/Berlin", WEEK)
    zone = ZoneInfo("Europe/Berlin")
    # Friday 27 March 2026 is CET (UTC+1); Monday 30 March is CEST (UTC+2).
    start = datetime(2026, 3, 27, 16, tzinfo=zone)
    assert berlin.add(start, 2 * H) == datetime(2026, 3, 30, 10, tzinfo=zone)
    assert berlin.add(start, 2 * H).astimezone(UTC) == utc(2026, 3, 30, 8)


def test_fall_back_keeps_local_hours() -> None:
    berlin = BusinessCalendar("Europe/Berlin", WEEK)
    zone = ZoneInfo("Europe/Berlin")
    # Friday 23 October 2026 CEST; Monday 26 October CET (the switch is on Sunday 25).
    start = datetime(2026, 10, 23, 16, tzinfo=zone)
    assert berlin.add(start, 2 * H).astimezone(UTC) == utc(2026, 10, 26, 9)
    assert berlin.between(start, datetime(2026, 10, 26, 10, tzinfo=zone)) == 2 * H


def test_a_day_of_24_hours_around_the_clock() -> None:
    always = BusinessCalendar.always_open("Europe/Berlin")
    zone = ZoneInfo("Europe/Berlin")
    # The night of 29 March 2026 has 23 hours of wall time.
    assert (
        always.between(datetime(2026, 3, 29, 0, tzinfo=zone), datetime(2026, 3, 30, 0, tzinfo=zone))
        == 23 * H
    )


def test_bad_calendars_are_refused_with_their_field() -> None:
    with pytest.raises(ValidationFailed) as error:
        BusinessCalendar("Mars/Olympus", WEEK)
    assert error.value.errors[0].field == "calendar.timezone"
    with pytest.raises(ValidationFailed) as error:
        BusinessCalendar("UTC", (("mon", "17:00", "09:00"),))
    assert error.value.errors[0].field == "calendar.hours[0]"


instants = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
)


@given(instants, st.floats(min_value=0, max_value=200 * H))
def test_add_then_between_gives_back_the_seconds(start: datetime, seconds: float) -> None:
    calendar = BusinessCalendar("America/New_York", WEEK, ("2026-07-03",))
    end = calendar.add(start, seconds)
    assert calendar.between(start, end) == pytest.approx(seconds, abs=1e-3)


@given(
    instants, st.floats(min_value=0, max_value=100 * H), st.floats(min_value=0, max_value=100 * H)
)
def test_between_adds_up_over_a_split(start: datetime, a: float, b: float) -> None:
    calendar = BusinessCalendar("Asia/Kolkata", WEEK)
    middle, end = start + timedelta(seconds=a), start + timedelta(seconds=a + b)
    assert calendar.between(start, middle) + calendar.between(middle, end) == pytest.approx(
        calendar.between(start, end), abs=1e-3
    )


def test_a_far_team_across_its_own_daylight_saving_end() -> None:
    # Auckland leaves daylight saving (UTC+13 -> UTC+12) on Sunday 5 April 2026.
    auckland = BusinessCalendar("Pacific/Auckland", WEEK)
    friday_16 = utc(2026, 4, 3, 3)  # Friday 16:00 NZDT
    monday_10 = utc(2026, 4, 5, 22)  # Monday 10:00 NZST (still Sunday in UTC)
    assert auckland.add(friday_16, 2 * H) == monday_10
    assert auckland.between(friday_16, monday_10) == 2 * H
