"""Business hours: a team's working week, holidays and time zone.

`BusinessCalendar.between(a, b)` is the business time between two instants;
`BusinessCalendar.add(start, seconds)` is the instant at which `seconds` of
business time have passed since `start`. Both work on wall-clock intervals
in the calendar's own time zone, so a working day stays 09:00-17:00 local
across both daylight-saving switches (a day of 23 or 25 hours has the same
working hours). A target that ends exactly at closing time ends there, not at
the next opening.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property, lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from crm_common.errors import ValidationFailed

#: Mon..Sun as the calendar's keys.
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: How far `add` looks for working time before giving up (a calendar of holidays only).
MAX_DAYS = 3660


def _parse_time(text: str, path: str) -> time:
    if text == "24:00":
        return time.max
    try:
        hour, minute = text.split(":")
        return time(int(hour), int(minute))
    except ValueError:
        raise ValidationFailed.of(path, f"{text!r} is not a time of day HH:MM") from None


@dataclass(frozen=True)
class BusinessCalendar:
    """Working hours per weekday (`{"mon": ("09:00", "17:00"), ...}`; a missing day is
    closed), holiday dates, and the IANA time zone they are counted in."""

    timezone: str = "UTC"
    hours: tuple[tuple[str, str, str], ...] = field(
        default=tuple((d, "09:00", "17:00") for d in WEEKDAYS[:5])
    )
    holidays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # IANA names are short; a long one would reach the file system as a path.
        if not self.timezone or len(self.timezone) > 64:
            raise ValidationFailed.of("calendar.timezone", "must be an IANA time zone name")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValidationFailed.of(
                "calendar.timezone", f"unknown time zone {self.timezone[:64]!r}"
            ) from None
        seen = set()
        for i, (day, start, end) in enumerate(self.hours):
            if day not in WEEKDAYS or day in seen:
                raise ValidationFailed.of(
                    f"calendar.hours[{i}].day", f"must be one of {', '.join(WEEKDAYS)}, once"
                )
            seen.add(day)
            if _parse_time(start, f"calendar.hours[{i}].start") >= _parse_time(
                end, f"calendar.hours[{i}].end"
            ):
                raise ValidationFailed.of(f"calendar.hours[{i}]", "must open before it closes")
        for i, text in enumerate(self.holidays):
            try:
                date.fromisoformat(text)
            except ValueError:
                raise ValidationFailed.of(
                    f"calendar.holidays[{i}]", f"{text!r} is not a date YYYY-MM-DD"
                ) from None

    @classmethod
    def always_open(cls, timezone: str = "UTC") -> BusinessCalendar:
        return cls(timezone, tuple((d, "00:00", "24:00") for d in WEEKDAYS))

    # -- as stored data

    def to_data(self) -> dict[str, Any]:
        return {
            "timezone": self.timezone,
            "hours": [list(h) for h in self.hours],
            "holidays": list(self.holidays),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> BusinessCalendar:
        """The calendar of stored terms (the same terms give the same, shared instance:
        every case of a policy version counts in one calendar)."""
        seen = _BY_DATA.get(id(data))
        if seen is not None and seen[0] is data:
            return seen[1]
        calendar = _calendar(
            data["timezone"],
            tuple((d, s, e) for d, s, e in data["hours"]),
            tuple(data["holidays"]),
        )
        if len(_BY_DATA) >= 4096:
            _BY_DATA.clear()
        _BY_DATA[id(data)] = (data, calendar)
        return calendar

    # -- the arithmetic

    @cached_property
    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def _week(self) -> dict[int, tuple[time, time]]:
        """weekday number -> (opens, closes) local time; closes is time.max for 24:00."""
        return {
            WEEKDAYS.index(d): (_parse_time(start, "start"), _parse_time(end, "end"))
            for d, start, end in self.hours
        }

    @cached_property
    def _holiday_dates(self) -> frozenset[date]:
        return frozenset(date.fromisoformat(text) for text in self.holidays)

    @cached_property
    def _days(self) -> dict[date, list[tuple[datetime, datetime]]]:
        """The working intervals of the days asked for so far (a few years at most)."""
        return {}

    def _open_intervals(self, day: date) -> list[tuple[datetime, datetime]]:
        """The day's working interval as aware UTC instants (empty when closed)."""
        known = self._days.get(day)
        if known is None:
            known = self._days[day] = self._day_intervals(day)
        return known

    def _day_intervals(self, day: date) -> list[tuple[datetime, datetime]]:
        hours = self._week.get(day.weekday())
        if hours is None or day in self._holiday_dates:
            return []
        zone = self._zone
        opens = datetime.combine(day, hours[0], zone)
        if hours[1] == time.max:
            closes = datetime.combine(day + timedelta(days=1), time(0), zone)
        else:
            closes = datetime.combine(day, hours[1], zone)
        return [(opens.astimezone(UTC), closes.astimezone(UTC))]

    def _days_from(self, instant: datetime) -> Iterator[date]:
        day = instant.astimezone(self._zone).date() - timedelta(days=1)
        for _ in range(MAX_DAYS):
            yield day
            day += timedelta(days=1)

    def between(self, start: datetime, end: datetime) -> float:
        """Business seconds in [start, end) (0 when end is not after start)."""
        if end <= start:
            return 0.0
        total = 0.0
        for day in self._days_from(start):
            for opens, closes in self._open_intervals(day):
                lo, hi = max(opens, start), min(closes, end)
                if hi > lo:
                    total += (hi - lo).total_seconds()
            if datetime.combine(day, time(0), self._zone) > end:
                break
        return total

    def add(self, start: datetime, seconds: float) -> datetime:
        """The instant at which `seconds` of business time have passed since `start`."""
        remaining = seconds
        if remaining <= 0:
            return start
        for day in self._days_from(start):
            for opens, closes in self._open_intervals(day):
                lo = max(opens, start)
                if closes <= lo:
                    continue
                available = (closes - lo).total_seconds()
                if remaining <= available:
                    return lo + timedelta(seconds=remaining)
                remaining -= available
        raise ValidationFailed.of("calendar", f"no working time within {MAX_DAYS} days")


#: Stored calendar data -> its calendar, by the data's identity (the data is kept with
#: it, so an id is never reused while its entry lives): cases that share their terms
#: (the query model keeps one copy of each) skip even building the cache key.
_BY_DATA: dict[int, tuple[dict[str, Any], BusinessCalendar]] = {}


@lru_cache(maxsize=1024)
def _calendar(
    timezone: str, hours: tuple[tuple[str, str, str], ...], holidays: tuple[str, ...]
) -> BusinessCalendar:
    return BusinessCalendar(timezone, hours, holidays)
