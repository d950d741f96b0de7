"""Support code of the tickets tests: a hand-moved clock, SQLite settings,
the contacts service in process behind `ContactsPort`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from crm_common.errors import NotFound
from crm_common.settings import Settings
from crm_tickets.inputs import CalendarInput, SlaTermsInput, TargetInput, WeekdayInput


class Clock:
    """The service's clock, moved by the test (a Monday 09:00 UTC to start)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2026, 2, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class KnownContacts:
    """`ContactsPort` that knows a fixed set of contact ids."""

    def __init__(self, *known: str) -> None:
        self.known = set(known)
        self.calls = 0

    async def ensure_exists(self, contact_id: str) -> None:
        self.calls += 1
        if contact_id not in self.known:
            raise NotFound("Contact", contact_id)


def sqlite_settings(data_dir: Path) -> Settings:
    return Settings(
        service="tickets",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


def office_terms(
    *,
    first_response: int = 3600,
    resolution: int = 8 * 3600,
    next_reply: int = 0,
    warning: int = 900,
    pause_on_hold: bool = False,
    escalate_team: str = "tier2",
) -> SlaTermsInput:
    """Mon-Fri 09:00-17:00 Europe/Berlin; the same targets for every priority."""
    return SlaTermsInput(
        targets=[
            TargetInput("standard", p, first_response, resolution, next_reply)
            for p in ("low", "normal", "high", "urgent")
        ],
        calendar=CalendarInput(
            "Europe/Berlin",
            [WeekdayInput(d, "09:00", "17:00") for d in ("mon", "tue", "wed", "thu", "fri")],
            ["2026-04-03"],
        ),
        warning_seconds=warning,
        pause_on_hold=pause_on_hold,
        escalate_priority=True,
        escalate_team=escalate_team,
    )
