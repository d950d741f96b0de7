"""Live updates: server-sent events that tell an open page its data changed.

    GET /live/<view>/<key>    text/event-stream for one page's data

A page that shows data others change (the 360 page, the pipeline board, the team
queue, a loyalty member) opens one stream. The console reads, on the server and
with the user's own token, the same public REST API the page reads, every
`CRM_CONSOLE_LIVE_INTERVAL_SECONDS` (2 by default), reduces the answer to what
the page shows (the 360 view's change positions, deals' and cases' versions, a
member's version, tier and balance) and sends `changed` only when that differs
from the previous read; the page then fetches and draws again. The console still
holds no data and reads no database: a stream is a loop of the user's own API
calls, bounded three ways:

- per connection: one read per interval, and the stream ends after
  `LIFETIME` seconds (the browser's EventSource reconnects, re-checking the
  session), when the session's token expires, or when the browser goes away;
- per session: at most `PER_SESSION` open streams (a further one is refused
  with 429 `TooManyStreams`);
- per process: at most `PER_PROCESS` open streams.

Events: `ready` (the first read succeeded: updates are on), `changed`, and
`refused` (the API refused the read: 401, 403, 404; the stream ends and the
page says so). A read that fails for a while (the API down) sends `unavailable`
once and the stream keeps trying.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

#: Open streams one session may hold (a person with a few tabs), and one process.
PER_SESSION = 4
PER_PROCESS = 200
#: Seconds a stream lives before the browser reconnects (and the session is re-read).
LIFETIME = 600.0
#: Seconds between keep-alive comments, so that proxies keep an idle stream open.
KEEP_ALIVE = 15.0
#: Milliseconds the browser waits before reconnecting a closed stream.
RETRY_MS = 3000
#: API answers that end a stream: the user may not (or no longer) read this.
FINAL_STATUSES = frozenset({401, 403, 404})


@dataclass(frozen=True)
class Watch:
    """What one page's stream reads, and what of the answer the page shows."""

    service: str
    path: str
    query: tuple[tuple[str, str], ...]
    fingerprint: Callable[[Any], Any]
    #: A 404 is a state the page shows (not a member yet), not a refusal.
    missing_is_state: bool = False


def _positions(doc: Any) -> Any:
    """The 360 view: its change positions (one per source) move with every change applied."""
    return doc.get("positions") or doc


def _deals(reply: Any) -> Any:
    return sorted((d["id"], d["version"]) for d in reply.get("opportunities", []))


def _cases(reply: Any) -> Any:
    # Not the clocks' `used_seconds`: it grows with time, not with a change.
    return [(c["id"], c["version"]) for c in reply.get("cases", [])]


def _member(reply: Any) -> Any:
    return (reply.get("version"), reply.get("tier"), reply.get("balance"))


#: The views a page can follow, by name: the key (a customer, pipeline, team) to a Watch.
VIEWS: dict[str, Callable[[str], Watch]] = {
    "customer": lambda key: Watch(
        "analytics", f"customers/{quote(key, safe='')}/360", (), _positions
    ),
    "board": lambda key: Watch(
        "pipeline", "opportunities", (("pipeline_id", key), ("page_size", "200")), _deals
    ),
    "queue": lambda key: Watch(
        "tickets", f"teams/{quote(key, safe='')}/queue", (("page_size", "100"),), _cases
    ),
    "member": lambda key: Watch(
        "loyalty", f"members/{quote(key, safe='')}", (), _member, missing_is_state=True
    ),
}


def event(name: str, data: dict[str, Any] | None = None) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data or {})}\n\n"


class StreamLimits:
    """Counts the open streams per session and per process."""

    def __init__(self, per_session: int = PER_SESSION, per_process: int = PER_PROCESS) -> None:
        self.per_session = per_session
        self.per_process = per_process
        self.open: Counter[str] = Counter()

    def acquire(self, session_key: str) -> bool:
        if self.open[session_key] >= self.per_session or self.total >= self.per_process:
            return False
        self.open[session_key] += 1
        return True

    def release(self, session_key: str) -> None:
        self.open[session_key] -= 1
        if self.open[session_key] <= 0:
            del self.open[session_key]

    @property
    def total(self) -> int:
        return sum(self.open.values())


async def follow(
    http: httpx.AsyncClient,
    url: str,
    watch: Watch,
    token: str,
    *,
    interval: float,
    expires_at: int,
    gone: Callable[[], Any],
    release: Callable[[], None],
) -> AsyncIterator[str]:
    """The stream of one page: reads `url` as the user every `interval` seconds and
    says `changed` when what the page shows changed. `gone()` is awaited to learn
    whether the browser went away; `release()` frees the connection's slot."""
    headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
    last: str | None = None
    down = False
    began = time.monotonic()
    quiet_since = began
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while time.monotonic() - began < LIFETIME and time.time() < expires_at:
            if await gone():
                return
            try:
                reply = await http.get(url, params=watch.query, headers=headers)
            except httpx.HTTPError:
                reply = None
            if reply is not None and reply.status_code == 404 and watch.missing_is_state:
                reply = httpx.Response(200, json={"missing": True})
            if reply is not None and reply.status_code in FINAL_STATUSES:
                body = _json(reply)
                yield event(
                    "refused",
                    {"status": reply.status_code, "message": body.get("message", "")},
                )
                return
            if reply is None or reply.status_code != 200:
                if not down:
                    yield event("unavailable", {"status": reply.status_code if reply else 0})
                    down = True
            else:
                down = False
                seen = hashlib.sha256(
                    json.dumps(watch.fingerprint(_json(reply)), sort_keys=True).encode()
                ).hexdigest()
                if last is None:
                    yield event("ready")
                elif seen != last:
                    yield event("changed")
                    quiet_since = time.monotonic()
                last = seen
            if time.monotonic() - quiet_since >= KEEP_ALIVE:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(interval)
    finally:
        release()


def _json(reply: httpx.Response) -> Any:
    try:
        return reply.json()
    except ValueError:
        return {}
