"""What the consoles' browser tests share: calls to the platform's REST APIs as a
user of a role, a pipeline's stages, and signing in through the development form."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from playwright.sync_api import expect

from crm_deploy.identity import Identity
from crm_deploy.testing import bearer


@dataclass
class Apis:
    urls: dict[str, str]
    identity: Identity

    def headers(self, role: str, subject: str | None = None) -> dict[str, str]:
        return bearer(self.identity.mint(role, subject=subject, client="console-tests"))

    def call(
        self,
        role: str,
        method: str,
        service: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """A REST call as a user with `role`; fails the test unless it succeeds."""
        reply = httpx.request(
            method,
            f"{self.urls[service]}{path}",
            timeout=30,
            headers={**self.headers(role), **(headers or {})},
            **kwargs,
        )
        assert reply.is_success, f"{method} {service}{path}: {reply.status_code} {reply.text}"
        return reply.json()


STAGES = [
    ("qualify", "Qualify", "10", "pipeline"),
    ("propose", "Propose", "40", "best_case"),
    ("negotiate", "Negotiate", "70", "commit"),
    ("won", "Won", "100", "closed_won"),
    ("lost", "Lost", "0", "closed_lost"),
]


def in_days(days: int) -> str:
    return (datetime.now(UTC).date() + timedelta(days=days)).isoformat()


def sign_in(page: Any, url: str, role: str, user: str) -> None:
    page.goto(url)
    expect(page).to_have_url(re.compile(r"/signin"))
    page.get_by_label("Role").select_option(role)
    page.get_by_label("User name").fill(user)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text(user, exact=True)).to_be_visible()
