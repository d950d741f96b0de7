"""Keeps a started stack running: restarts crashed processes with backoff, stops on signal.

Other `crm-stack` commands talk to a running supervisor through files in
`<data_dir>/run/`:

- `supervisor.pid`: the supervisor itself (SIGTERM stops the whole stack);
- `<process>.pid`: each child, written at every (re)start;
- `hold/<process>`: while this marker exists the supervisor leaves that
  process stopped instead of restarting it (`rebuild-360` holds the projector);
- `restart/<process>`: `crm-stack restart` asks for a stop and start of that
  process; the supervisor writes the outcome into the file (`ok <pid>` or
  `failed: <reason>`) once the process is ready again or has failed;
- `stack.json`: the configuration and the state (`starting`, `ready`,
  `failed`, `stopped`) with the endpoints once ready, and the restarts of
  each process since.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

from crm_deploy.process import ManagedProcess, ProcessFailed, write_pid_file
from crm_deploy.stack import Stack

log = logging.getLogger("crm_deploy.supervisor")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: A process that has run this long since its last start is considered healthy again.
HEALTHY_AFTER = 60.0
TICK = 0.5


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the stack was still starting."""


def hold_dir(run_dir: Path) -> Path:
    return run_dir / "hold"


def is_held(run_dir: Path, name: str) -> bool:
    return (hold_dir(run_dir) / name).exists()


def restart_dir(run_dir: Path) -> Path:
    return run_dir / "restart"


#: What a restart request file holds until the supervisor has handled it.
RESTART_PENDING = "pending"


class Supervisor:
    def __init__(self, stack: Stack, names: Iterable[str] | None = None) -> None:
        self.stack = stack
        self.names = list(names) if names is not None else None
        self.stopping = threading.Event()
        self._starting = True
        self._backoff: dict[str, float] = {}
        self._restart_at: dict[str, float] = {}
        self._held: set[str] = set()
        self.restarts = 0
        #: Restarts of each process since the stack started (crashes and requests).
        self.restarts_of: dict[str, int] = {}
        self._ready_state: dict[str, object] = {}

    @property
    def run_dir(self) -> Path:
        return self.stack.config.run_dir

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping the stack", signal.Signals(signum).name)
        self.stopping.set()
        if self._starting:
            self._starting = False
            raise Interrupted()

    def start(self) -> dict[str, str]:
        """Starts infrastructure and services; returns the endpoints. Raises on failure."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_pid_file(self.run_dir / "supervisor.pid", _own_pid())
        for marker in [*hold_dir(self.run_dir).glob("*"), *restart_dir(self.run_dir).glob("*")]:
            marker.unlink()
        started = time.perf_counter()
        self.stack.save_state(status="starting")
        try:
            self.stack.start_infra()
            log.info("infrastructure ready in %.1f s", time.perf_counter() - started)
            self.stack.start_services(self.names)
        except Interrupted:
            self.stack.stop()
            self.stack.save_state(status="stopped")
            raise
        except BaseException as exc:
            self._starting = False
            self.stack.stop()
            reason = str(exc) if isinstance(exc, ProcessFailed) else f"{type(exc).__name__}: {exc}"
            self.stack.save_state(status="failed", error=reason)
            raise
        self._starting = False
        seconds = time.perf_counter() - started
        endpoints = self.stack.endpoints(self.names)
        self._ready_state = {
            "status": "ready",
            "endpoints": endpoints,
            "startup_seconds": round(seconds, 2),
            "processes": [p.name for p in self.stack.processes()],
        }
        self.stack.save_state(**self._ready_state, restarts=self.restarts_of)
        log.info("stack ready in %.1f s", seconds)
        return endpoints

    def supervise(self) -> None:
        """Watches the processes until SIGINT/SIGTERM, then stops everything gracefully."""
        try:
            while not self.stopping.wait(TICK):
                self.tick()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log.info("stopping services, Kafka, ZooKeeper, SecantusDB")
        started = time.perf_counter()
        self.stack.stop()
        self.stack.save_state(status="stopped")
        (self.run_dir / "supervisor.pid").unlink(missing_ok=True)
        log.info("stack stopped in %.1f s", time.perf_counter() - started)

    def tick(self) -> None:
        self._handle_restart_requests()
        now = time.monotonic()
        for process in self.stack.processes():
            name = process.name
            if process.is_running():
                if process.uptime() > HEALTHY_AFTER:
                    self._backoff.pop(name, None)
                continue
            if is_held(self.run_dir, name):
                if name not in self._held:
                    self._held.add(name)
                    self._restart_at.pop(name, None)
                    log.info("%s is held: not restarting it until released", name)
                continue
            if name in self._held:
                # Released after an intentional stop: back at once, not a crash.
                self._held.discard(name)
                self._restart(process, "released")
                continue
            if name not in self._restart_at:
                delay = self._backoff.get(name, BACKOFF_FIRST)
                self._backoff[name] = min(delay * 2, BACKOFF_MAX)
                self._restart_at[name] = now + delay
                log.warning(
                    "%s exited with status %s; restarting in %.0f s (log: %s)",
                    name,
                    process.returncode,
                    delay,
                    process.log_path,
                )
            elif now >= self._restart_at[name]:
                del self._restart_at[name]
                self._restart(process, "crashed")

    def _restart(self, process: ManagedProcess, why: str) -> None:
        try:
            self.stack.restart(process.name)
            self._count_restart(process.name)
            log.info("%s restarted (%s), pid %s", process.name, why, process.pid)
        except OSError as exc:
            log.error("could not restart %s: %s", process.name, exc)

    def _count_restart(self, name: str) -> None:
        self.restarts += 1
        self.restarts_of[name] = self.restarts_of.get(name, 0) + 1
        if self._ready_state:
            self.stack.save_state(**self._ready_state, restarts=self.restarts_of)

    def _handle_restart_requests(self) -> None:
        """Stops and starts each process `crm-stack restart` asked for; answers in its file."""
        for request in sorted(restart_dir(self.run_dir).glob("*")):
            if request.suffix == ".tmp":
                continue
            try:
                if request.read_text().strip() != RESTART_PENDING:
                    continue  # answered already; the command removes it
            except FileNotFoundError:
                continue
            request.write_text(self.restart_now(request.name) + "\n")

    def restart_now(self, name: str) -> str:
        """Stops `name` gracefully, starts it again and waits until it is ready."""
        try:
            process = self.stack.process(name)
        except KeyError:
            return f"failed: {name} is not a process of this stack"
        log.info("restarting %s on request", name)
        process.stop()
        self._restart_at.pop(name, None)
        try:
            self.stack.restart(name)
            process.wait_ready()
        except (OSError, ProcessFailed) as exc:
            log.error("%s did not come back: %s", name, exc)
            return f"failed: {exc}"
        self._count_restart(name)
        log.info("%s restarted on request, pid %s", name, process.pid)
        return f"ok {process.pid}"


def _own_pid() -> int:
    import os

    return os.getpid()
