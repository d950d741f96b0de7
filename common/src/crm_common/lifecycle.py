"""How a long-running process learns it should stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from crm_common.health import Details, Heartbeat, serve_health
from crm_common.settings import Settings

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs.

    Workers (relays, projections, followers) pass it to their loop, finish
    the batch in hand when it is set, and return; the process then exits 0.
    Must be entered from inside the running event loop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def run_worker(
    settings: Settings,
    heartbeat: Heartbeat,
    work: Callable[[asyncio.Event], Awaitable[T]],
    *,
    details: Details | None = None,
) -> T:
    """Runs a worker's loop until SIGTERM or SIGINT, serving its `GET /healthz`
    on `settings.health_port` (when set) meanwhile."""
    heartbeat.stale_after = settings.health_stale_after
    async with serve_health(
        heartbeat, host=settings.bind_host, port=settings.health_port, details=details
    ):
        with stop_on_signals() as stop:
            return await work(stop)
