"""Helpers of the loyalty tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from crm_common.errors import NotFound
from crm_common.settings import Settings

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(
        service="loyalty",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


class KnownContacts:
    """The contacts port of application tests: which contact ids exist. (The
    process test runs the real contacts service.)"""

    def __init__(self, *known: str) -> None:
        self.known = set(known)

    async def ensure_exists(self, contact_id: str) -> None:
        if contact_id not in self.known:
            raise NotFound("Contact", contact_id)
