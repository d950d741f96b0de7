"""How a long-running process learns it should stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from crm_common.health import Details, Heartbeat, dependency_of, serve_health
from crm_common.metrics import worker_retries
from crm_common.settings import Settings

T = TypeVar("T")

log = logging.getLogger(__name__)

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


async def retry_until_stopped(
    attempt: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    heartbeat: Heartbeat,
    retry_on: tuple[type[BaseException], ...],
    what: str,
    then: str,
    first_backoff: float = 0.5,
    max_backoff: float = 10.0,
) -> None:
    """Runs a worker's `attempt` (which returns once `stop` is set) again and
    again after the errors it may recover from, with a doubling backoff that
    `stop` cuts short.

    Each error is reported on the heartbeat (which logs the change from
    working to waiting once) and counted in `crm.worker.retries`; the backoff
    starts over once the worker has told the heartbeat it `recovered()`
    (connected again) since the last error.
    """
    backoff = first_backoff
    while not stop.is_set():
        try:
            await attempt()
        except retry_on as error:
            if heartbeat.last_error is None:
                backoff = first_backoff
            # The heartbeat logs the change to waiting once; each retry only at DEBUG.
            heartbeat.failed(error)
            worker_retries.add(1, {"worker": heartbeat.worker, "dependency": dependency_of(error)})
            log.debug("%s: %r; %s in %.1f s", what, error, then, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, max_backoff)


#: How long `run_together` waits for a work to stop before cancelling it.
STOP_GRACE = 15.0


async def run_together(
    stop: asyncio.Event, *works: Callable[[asyncio.Event], Any], grace: float = STOP_GRACE
) -> None:
    """Runs each work until `stop`; when one ends, the others stop too, and the
    first failure is raised (the process exits and is restarted, not half working).

    A work still running `grace` seconds after the stop (a consumer waiting for
    a topic that does not exist yet answers no stop) is cancelled: what it did
    not commit is read again by the next member, and its commands are idempotent.
    """
    tasks = [
        asyncio.create_task(work(stop), name=getattr(work, "__qualname__", repr(work)))
        for work in works
    ]
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            log.warning(
                "%s did not stop within %.0f s of the stop: cancelled", task.get_name(), grace
            )
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stopped.cancel()
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
