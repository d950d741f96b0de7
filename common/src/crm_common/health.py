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

`GET /readyz` answers 200 only while the worker is also doing its work: it
has gone round at least once and its last round met no error (a relay that
cannot reach Kafka is alive but not ready). `GET /metrics` renders the
process's metrics in the Prometheus text format (`crm_common.metrics`).

Each change between working and waiting is logged once, by the platform in
its own words (`relay crm.contacts.events: waiting for Kafka: ...`, then
`... Kafka answers again after 12.3 s`), rather than by every retry.

An API has no loop of its own: `Dependencies` checks its hard dependencies
(the document store of the 360 view) every few seconds and beats its
heartbeat, so its health port, its gRPC health and its REST `/healthz` all
say NOT_SERVING while one of them is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crm_common import metrics

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 120.0
#: A worker that has not measured its lag for this long is not caught up as far
#: as anyone knows (its loop waits for Kafka or its store).
LAG_FRESH_FOR = 10.0


def dependency_of(error: BaseException | str) -> str:
    """What a worker waits for when it meets `error`: Kafka, the document store, ..."""
    if isinstance(error, str):
        return "a dependency"
    module = type(error).__module__
    if module.startswith(("aiokafka", "kafka")):
        return "Kafka"
    if module.startswith(("pymongo", "bson")):
        return "the document store"
    if module.startswith(("psycopg", "sqlite3", "eventsourcing")):
        return "the event store"
    return "a dependency"


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
        self._waiting_for: str | None = None
        self._lag_events: int | None = None
        self._caught_up_at = self._started
        self._lag_at = self._started
        self._dead_letters = 0
        metrics.track_worker(self)

    def beat(self) -> None:
        """The loop went round."""
        self._last = self._clock()
        self.rounds += 1

    def failed(self, error: BaseException | str, *, waiting_for: str | None = None) -> None:
        """The loop went round, but hit an error it will retry after (waiting for
        `waiting_for`, by default what the error's origin says)."""
        self.beat()
        self.last_error = error if isinstance(error, str) else repr(error)
        waiting_for = waiting_for or dependency_of(error)
        if self._error_at is None or waiting_for != self._waiting_for:
            # Once per change of state: the retries that follow say nothing new.
            log.warning("%s: waiting for %s: %s", self.worker, waiting_for, self.last_error)
            self._error_at = self._last
        self._waiting_for = waiting_for

    def recovered(self) -> None:
        """The loop did its work again after an error."""
        self.beat()
        if self._error_at is not None:
            log.info(
                "%s: %s answers again after %.1f s",
                self.worker,
                self._waiting_for or "its dependency",
                self._last - self._error_at,
            )
        self.last_error = None
        self._error_at = None
        self._waiting_for = None

    def lag(self, events: int) -> None:
        """How many events the worker has yet to publish or apply, as it last saw."""
        self._lag_events = max(0, events)
        self._lag_at = self._clock()
        if self._lag_events == 0:
            self._caught_up_at = self._lag_at

    def dead_letter(self, count: int = 1) -> None:
        """The worker set `count` records aside (they can never be published or applied)."""
        self._dead_letters += count

    @property
    def lag_events(self) -> int | None:
        """Events yet to publish or apply; None until the worker has said."""
        return self._lag_events

    @property
    def lag_seconds(self) -> float | None:
        """Seconds since the worker last had nothing left to do (0 while it has not).

        An upper bound of the age of the oldest event it has yet to handle.
        """
        if self._lag_events is None:
            return None
        now = self._clock()
        if self._lag_events == 0 and now - self._lag_at < LAG_FRESH_FOR:
            return 0.0
        # Behind, or no longer measuring (waiting for Kafka: falling behind unseen).
        return now - self._caught_up_at

    @property
    def dead_letters(self) -> int:
        return self._dead_letters

    @property
    def age(self) -> float:
        """Seconds since the loop last went round."""
        return self._clock() - self._last

    @property
    def alive(self) -> bool:
        return self.age < self.stale_after

    @property
    def ready(self) -> bool:
        """Alive, gone round at least once, and its last round met no error."""
        return self.alive and self.rounds > 0 and self.last_error is None

    def report(self, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        now = self._clock()
        body: dict[str, Any] = {
            "worker": self.worker,
            "status": "ok" if self.alive else "stale",
            "ready": self.ready,
            "waiting_for": self._waiting_for,
            "seconds_since_beat": round(now - self._last, 3),
            "stale_after_seconds": self.stale_after,
            "uptime_seconds": round(now - self._started, 3),
            "rounds": self.rounds,
            "last_error": self.last_error,
            "seconds_since_error": (
                None if self._error_at is None else round(now - self._error_at, 3)
            ),
            "lag_events": self._lag_events,
            "lag_seconds": None if (lag := self.lag_seconds) is None else round(lag, 3),
            "dead_letters": self._dead_letters,
        }
        if details:
            body.update(details)
        return body


class JointHeartbeat(Heartbeat):
    """The heartbeat of a process running several consumers: alive only while
    every one is, ready only while every one is. Its report has the fields of
    every worker's (errors joined, lags summed, the worst of the times) and each
    member's own report under `members`. The members report their lag and dead
    letters to the metrics themselves; the joint heartbeat adds only whether the
    process is up (`crm_worker_up`)."""

    def __init__(self, worker: str, members: Sequence[Heartbeat]) -> None:
        super().__init__(worker)
        self.members = list(members)

    @property
    def stale_after(self) -> float:
        members = getattr(self, "members", [])
        return max((m.stale_after for m in members), default=DEFAULT_STALE_AFTER)

    @stale_after.setter
    def stale_after(self, value: float) -> None:
        if value <= 0:
            raise ValueError("stale_after must be positive")
        for member in getattr(self, "members", []):
            member.stale_after = value

    @property
    def age(self) -> float:
        return max(m.age for m in self.members)

    @property
    def alive(self) -> bool:
        return all(m.alive for m in self.members)

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.members)

    def report(self, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        reports = [m.report() for m in self.members]

        def known(name: str) -> list[Any]:
            return [r[name] for r in reports if r[name] is not None]

        errors = [f"{r['worker']}: {r['last_error']}" for r in reports if r["last_error"]]
        lags, behind, since_error = (
            known("lag_events"),
            known("lag_seconds"),
            known("seconds_since_error"),
        )
        body: dict[str, Any] = {
            "worker": self.worker,
            "status": "ok" if self.alive else "stale",
            "ready": self.ready,
            "waiting_for": ", ".join(known("waiting_for")) or None,
            "seconds_since_beat": max(r["seconds_since_beat"] for r in reports),
            "stale_after_seconds": self.stale_after,
            "uptime_seconds": min(r["uptime_seconds"] for r in reports),
            "rounds": min(r["rounds"] for r in reports),
            "last_error": "; ".join(errors) or None,
            "seconds_since_error": max(since_error) if since_error else None,
            "lag_events": sum(lags) if lags else None,
            "lag_seconds": max(behind) if behind else None,
            "dead_letters": sum(r["dead_letters"] for r in reports),
            "not_ready": [m.worker for m in self.members if not m.ready],
            "members": reports,
        }
        if details:
            body.update(details)
        return body


def consumer_lag(consumer: Any, partitions: Sequence[Any], next_offsets: Mapping[Any, int]) -> int:
    """Records of `partitions` not yet applied, from the end offsets the Kafka consumer
    last saw (no request): the last stable offset (read_committed), else the high
    watermark, less the offset the worker applies next."""
    lag = 0
    for tp in partitions:
        end = consumer.last_stable_offset(tp)
        if end is None or end < 0:
            end = consumer.highwater(tp)
        if end is not None and end >= 0:
            lag += max(0, end - next_offsets.get(tp, 0))
    return lag


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
    if path not in ("/healthz", "/livez", "/readyz", "/metrics"):
        return _response(
            404,
            "Not Found",
            b"served here: GET /healthz, /readyz, /metrics\n",
            "text/plain",
        )
    if method not in ("GET", "HEAD"):
        return _response(405, "Method Not Allowed", b"use GET\n", "text/plain")
    if path == "/metrics":
        response = _response(200, "OK", metrics.prometheus_text(), metrics.PROMETHEUS_CONTENT_TYPE)
    else:
        try:
            extra = details() if details else None
        except Exception as error:  # the report must not take the probe down with it
            extra = {"details_error": repr(error)}
        body = json.dumps(heartbeat.report(extra), default=str).encode() + b"\n"
        good = heartbeat.ready if path == "/readyz" else heartbeat.alive
        status, reason = (200, "OK") if good else (503, "Service Unavailable")
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
    """Serves `GET /healthz`, `/readyz` and `/metrics` while the block runs; yields
    the bound port.

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
    log.info("%s serves GET /healthz, /readyz, /metrics on %s:%d", heartbeat.worker, host, bound)
    try:
        yield bound
    finally:
        server.close()
        await server.wait_closed()


# -- the hard dependencies of an API ---------------------------------------------------


@dataclass(frozen=True)
class Dependency:
    """Something an API cannot answer without: `check` raises while it is down.

    `check` is blocking (it runs in a thread) and must give up within a couple
    of seconds (a client timeout of its own).
    """

    name: str
    check: Callable[[], object]


class Dependencies:
    """Checks an API's hard dependencies every `interval` seconds and beats its heartbeat:
    `failed` while one is down (NOT_SERVING), `recovered` once all answer again."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        dependencies: Sequence[Dependency],
        *,
        interval: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        self.heartbeat = heartbeat
        self.dependencies = list(dependencies)
        self.interval = interval
        self.timeout = timeout

    @property
    def serving(self) -> bool:
        return self.heartbeat.last_error is None

    async def check_once(self) -> bool:
        """Checks every dependency once; True when all answer."""
        problems, down = [], []
        for dependency in self.dependencies:
            try:
                await asyncio.wait_for(asyncio.to_thread(dependency.check), self.timeout)
                metrics.set_dependency_up(dependency.name, True)
            except Exception as error:
                metrics.set_dependency_up(dependency.name, False)
                down.append(dependency.name)
                problems.append(f"{dependency.name}: {error!r}"[:500])
        if problems:
            self.heartbeat.failed("; ".join(problems), waiting_for=", ".join(down))
        elif self.heartbeat.last_error is not None or self.heartbeat.rounds == 0:
            self.heartbeat.recovered()
        else:
            self.heartbeat.beat()
        return not problems

    async def watch(
        self, stop: asyncio.Event, on_change: Callable[[bool], Any] | None = None
    ) -> None:
        """Checks until `stop` is set; calls `on_change(serving)` at each change (and first)."""
        serving: bool | None = None
        while not stop.is_set():
            now = await self.check_once()
            if now != serving:
                serving = now
                if on_change is not None:
                    result = on_change(now)
                    if asyncio.iscoroutine(result):
                        await result
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
