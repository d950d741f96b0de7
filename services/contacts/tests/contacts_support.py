"""Helpers of the contacts tests: SQLite settings, a hand-moved clock (PostgreSQL's are
`crm_deploy.testing`'s)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from crm_common.settings import Settings
from crm_contacts.application import ContactsApplication


def sqlite_settings(data_dir: Path) -> Settings:
    return Settings(
        service="contacts",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


class Clock:
    """A clock the test moves by hand, so times in results are known."""

    def __init__(self, start: datetime = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def log_length(app: ContactsApplication) -> int:
    """How many events the store holds (its notification log's last id)."""
    recorder: Any = app.recorder
    return int(recorder.max_notification_id() or 0)
