"""Liveness of the worker processes: relays, projectors, followers.

A worker's loop goes round at least every few seconds, whether there is work
or not, and whether its broker and stores answer or not (it retries with a
capped backoff). Each round calls `Heartbeat.beat()`. A worker whose loop has
not gone round for `stale_after` seconds is stuck: waiting on a connection
that never answers, or a thread that never returns. Restarting it is the
cure, and that is what its liveness probe tells the orchestrator to do.

`serve_health()` answers `GET /healthz` on a port of its own, on the
worker's event loop: 200 while the heartbeat is fresh, 503 once it is stale,
and no answer at all when the event loop itself is blocked. The body is a
JSON object with the worker's own figures (position, records, lag, the last
error), for people as much as for probes. A worker that cannot reach Kafka
stays alive (restarting would not help) and says so in `last_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 120.0


class Heartbeat:
    """When a worker's loop last went round, and what it last reported."""

    def __init__(
        self,
        worker: str,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.worker = worker
        self.stale_after = stale_after
        self._clock = clock
        self._started = clock()
        self._last = self._started
        self.rounds = 0
        self.last_error: str | None = None
        self._error_at: float | None = None

    def beat(self) -> None:
        """The loop went round."""
        self._last = self._clock()
        self.rounds += 1

    def failed(self, error: BaseException | str) -> None:
        """The loop went round, but hit an error it will retry after."""
        self.beat()
        self.last_error = error if isinstance(error, str) else repr(error)
        self._error_at = self._last

    def recovered(self) -> None:
        """The loop did its work again after an error."""
        self.beat()
        self.last_error = None
        self._error_at = None

    @property
    def age(self) -> float:
        """Seconds since the loop last went round."""
        return self._clock() - self._last

    @property
    def alive(self) -> bool:
        return self.age < self.stale_after

    def report(self, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        now = self._clock()
        body: dict[str, Any] = {
            "worker": self.worker,
            "status": "ok" if self.alive else "stale",
            "seconds_since_beat": round(now - self._last, 3),
            "stale_after_seconds": self.stale_after,
            "uptime_seconds": round(now - self._started, 3),
            "rounds": self.rounds,
            "last_error": self.last_error,
            "seconds_since_error": (
                None if self._error_at is None else round(now - self._error_at, 3)
            ),
        }
        if details:
            body.update(details)
        return body


Details = Callable[[], Mapping[str, Any]]


def _response(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def health_response(request_line: bytes, heartbeat: Heartbeat, details: Details | None) -> bytes:
    """The whole HTTP response to one request line."""
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response(400, "Bad Request", b"malformed request line\n", "text/plain")
    method, target, _ = parts
    path = target.split("?", 1)[0]
    if path not in ("/healthz", "/livez"):
        return _response(404, "Not Found", b"only GET /healthz is served here\n", "text/plain")
    if method not in ("GET", "HEAD"):
        return _response(405, "Method Not Allowed", b"use GET\n", "text/plain")
    try:
        extra = details() if details else None
    except Exception as error:  # the report must not take the probe down with it
        extra = {"details_error": repr(error)}
    body = json.dumps(heartbeat.report(extra), default=str).encode() + b"\n"
    status, reason = (200, "OK") if heartbeat.alive else (503, "Service Unavailable")
    response = _response(status, reason, body, "application/json")
    if method == "HEAD":
        return response[: response.index(b"\r\n\r\n") + 4]
    return response


@contextlib.asynccontextmanager
async def serve_health(
    heartbeat: Heartbeat,
    *,
    host: str,
    port: int | None,
    details: Details | None = None,
) -> AsyncIterator[int | None]:
    """Serves `GET /healthz` while the block runs; yields the bound port.

    `port` None: serves nothing (the local stack runs workers without it).
    """
    if port is None:
        yield None
        return

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            # Headers are read and ignored; the answer depends on the path only.
            while True:
                line = await asyncio.wait_for(reader.readline(), 5)
                if line in (b"\r\n", b"\n", b""):
                    break
            writer.write(health_response(request_line, heartbeat, details))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    log.info("%s serves GET /healthz on %s:%d", heartbeat.worker, host, bound)
    try:
        yield bound
    finally:
        server.close()
        await server.wait_closed()
