"""The consoles' live updates without a browser: a stream over a real contacts
REST API (in process, on SQLite) says `ready`, then `changed` only when what
the page shows changed; a refused read ends the stream; streams are counted
and capped; and the charting library the pages load is the pinned, licensed
build."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_bff import CONSOLE, Routes, console, contacts, dev_signin, settings_for

from crm_consoles.config import ConfigError, ConsoleSettings
from crm_consoles.live import PER_SESSION, StreamLimits, Watch, follow
from crm_deploy.identity import Identity

__all__ = ["contacts"]  # the fixture, shared with test_bff
# (Named to run before the browser tests: their Playwright keeps a loop in this thread.)
ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "frontends" / "src" / "crm_consoles" / "static"


async def collect(stream: AsyncIterator[str], events: list[str]) -> None:
    """Appends the name of each event of the stream (comments and `retry:` skipped)."""
    async for chunk in stream:
        if chunk.startswith("event: "):
            events.append(chunk.split("\n", 1)[0].removeprefix("event: "))


async def until(events: list[str], count: int) -> None:
    for _ in range(200):
        if len(events) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {events} after 10 s")


def watch_person(person: str) -> Watch:
    return Watch("contacts", f"contacts/{person}", (), lambda c: c.get("version"))


async def test_a_stream_says_changed_only_when_the_data_changed(
    contacts: Any, identity: Identity
) -> None:
    token = identity.mint("sales", subject="ada")
    released: list[bool] = []
    async with httpx.AsyncClient(
        transport=Routes({"contacts.test": contacts}), base_url="http://contacts.test"
    ) as api:
        headers = {"authorization": f"Bearer {token}"}
        person = (
            await api.post("/persons", json={"family_name": "Hopper"}, headers=headers)
        ).json()["id"]
        stream = follow(
            api,
            f"http://contacts.test/contacts/{person}",
            watch_person(person),
            token,
            interval=0.05,
            expires_at=2**31,
            gone=lambda: asyncio.sleep(0, result=False),
            release=lambda: released.append(True),
        )
        events: list[str] = []
        reader = asyncio.create_task(collect(stream, events))
        await until(events, 1)
        # Nothing changes: many reads later, still no further event.
        await asyncio.sleep(0.5)
        assert events == ["ready"]
        version = (await api.get(f"/contacts/{person}", headers=headers)).json()["version"]
        patched = await api.patch(
            f"/persons/{person}",
            json={"tags": ["vip"]},
            headers={**headers, "if-match": str(version)},
        )
        assert patched.status_code == 200, patched.text
        await until(events, 2)
        assert events == ["ready", "changed"]
        reader.cancel()  # the browser goes away
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert released == [True]


async def test_a_refused_read_ends_the_stream_with_the_apis_message(contacts: Any) -> None:
    released: list[bool] = []
    async with httpx.AsyncClient(transport=Routes({"contacts.test": contacts})) as api:
        stream = follow(
            api,
            "http://contacts.test/contacts/nobody",
            watch_person("nobody"),
            "not-a-token",
            interval=0.05,
            expires_at=2**31,
            gone=lambda: asyncio.sleep(0, result=False),
            release=lambda: released.append(True),
        )
        chunks = [chunk async for chunk in stream]
    refused = [c for c in chunks if c.startswith("event: refused")]
    assert len(refused) == 1 and json.loads(refused[0].split("data: ", 1)[1])["status"] == 401
    assert released == [True]


async def test_live_streams_need_a_session_and_a_known_view(
    identity: Identity, contacts: Any
) -> None:
    async with await console(settings_for(identity), {"contacts.test": contacts}) as client:
        assert (await client.get("/live/customer/c-1")).status_code == 401
        await dev_signin(client, "sales", "ada")
        unknown = await client.get("/live/everything/c-1")
        assert unknown.status_code == 404 and "no live updates" in unknown.json()["message"]
        assert (await client.get(f"{CONSOLE}/live/board/")).status_code == 404


def test_streams_are_capped_per_session_and_per_process() -> None:
    limits = StreamLimits(per_process=6)
    assert all(limits.acquire("session-a") for _ in range(PER_SESSION))
    assert not limits.acquire("session-a")
    limits.release("session-a")
    assert limits.acquire("session-a")
    assert limits.acquire("session-b") and limits.acquire("session-b")
    assert not limits.acquire("session-c")  # the process is full
    assert limits.total == 6


def test_the_live_interval_must_be_sensible() -> None:
    env = {"CRM_CONSOLE_DEV_IDENTITY_DIR": "identity"}
    assert ConsoleSettings.from_env("sales", env).live_interval == 2.0
    for wrong in ("0", "fast", "3600"):
        with pytest.raises(ConfigError, match="LIVE_INTERVAL"):
            ConsoleSettings.from_env("sales", {**env, "CRM_CONSOLE_LIVE_INTERVAL_SECONDS": wrong})


def test_the_vendored_chart_library_is_the_pinned_build_with_its_licence() -> None:
    pinned = json.loads((ROOT / "package.json").read_text())["devDependencies"]["chart.js"]
    build = (STATIC / "vendor" / "chart.umd.min.js").read_text()
    assert build.startswith(f"/*!\n * Chart.js v{pinned}\n")
    assert "Released under the MIT License" in build[:300]
    assert "MIT License" in (STATIC / "vendor" / "chart.js.LICENSE.md").read_text()
    installed = ROOT / "node_modules" / "chart.js" / "dist" / "chart.umd.min.js"
    if installed.exists():  # after `npm install`: the copy is the package's own file
        assert installed.read_text() == build
