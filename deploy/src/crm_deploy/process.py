"""One server process of the local stack: start, readiness, graceful stop, pid file."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

STOP_TIMEOUT = 15.0
READY_TIMEOUT = 90.0

#: A readiness probe: called with the process every 100 ms until it returns True.
Probe = Callable[["ManagedProcess"], bool]


class ProcessFailed(RuntimeError):
    """A process exited or did not become ready; carries the tail of its log."""

    def __init__(self, name: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{name}: {reason}\n--- last lines of its log ---\n{log_tail}")
        self.name = name
        self.reason = reason
        self.log_tail = log_tail


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_picked: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now, below the kernel's ephemeral
    range: a port handed out for a later server must not be taken in between by
    the outgoing connection of some client (Kafka's, the document store's)."""
    low, _ = _ephemeral_range()
    candidates = list(range(20000, max(20001, low)))
    random.shuffle(candidates)
    for port in candidates[:2000]:
        if port not in _picked and not port_in_use(port, host):
            _picked.add(port)
            return port
    with socket.socket() as s:  # a machine whose whole range is ephemeral
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something holds the port. Connections of a stopped server that
    linger in TIME_WAIT do not count: the servers bind with SO_REUSEADDR too."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log yet)"
    return "\n".join(text.splitlines()[-lines:])


# -- readiness probes ---------------------------------------------------------


def tcp_probe(port: int, host: str = "127.0.0.1") -> Probe:
    return lambda _process: port_open(port, host)


def alive_probe(seconds: float = 1.0) -> Probe:
    """For processes without a port (relays, projectors): still running after a while."""
    return lambda process: process.uptime() >= seconds


def http_probe(url: str) -> Probe:
    def probe(_process: ManagedProcess) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return int(reply.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    return probe


def grpc_health_probe(target: str) -> Probe:
    def probe(_process: ManagedProcess) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def all_probes(*probes: Probe) -> Probe:
    return lambda process: all(p(process) for p in probes)


# -- pid files ----------------------------------------------------------------


@dataclass(frozen=True)
class PidRecord:
    """What a pid file holds: the pid and the process's start time (guards pid reuse)."""

    pid: int
    started: float

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None when it is gone."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.started) > 1.0:
                return None
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.Error:
            return None


def read_pid_file(path: Path) -> PidRecord | None:
    try:
        pid, started = path.read_text().split()
        return PidRecord(int(pid), float(started))
    except (FileNotFoundError, ValueError):
        return None


def write_pid_file(path: Path, pid: int) -> None:
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid} {started}\n")
    tmp.replace(path)


def stop_pid(record: PidRecord, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a process known only by its pid file; SIGKILL it after `timeout`."""
    process = record.process()
    if process is None:
        return
    with contextlib.suppress(psutil.Error):
        process.terminate()
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(5)


# -- the managed process ------------------------------------------------------


class ManagedProcess:
    """A child process with a log file, a pid file, a readiness probe and a graceful stop.

    Children run in a session of their own, so a Ctrl-C on the terminal reaches
    only the supervisor, which then stops them in order.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        pid_path: Path,
        probe: Probe,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.pid_path = pid_path
        self.probe = probe
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self._popen: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} running={self.is_running()}>"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def uptime(self) -> float:
        return time.monotonic() - self._started_at if self.is_running() else 0.0

    def start(self) -> None:
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            log.write(f"--- {stamp} starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._started_at = time.monotonic()
        write_pid_file(self.pid_path, self._popen.pid)

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def wait_ready(self, timeout: float | None = None) -> None:
        """Polls the probe until it passes; raises ProcessFailed on exit or timeout."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            if not self.is_running():
                raise ProcessFailed(
                    self.name,
                    f"exited with status {self.returncode} while starting",
                    tail(self.log_path),
                )
            if self.probe(self):
                return
            if time.monotonic() > deadline:
                raise ProcessFailed(self.name, "not ready in time", tail(self.log_path))
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL. Returns the exit status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget_pid_file()
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would (the pid file stays, like after a real crash)."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()
        self._popen.wait(10)

    def rss_bytes(self) -> int | None:
        if not self.is_running() or self.pid is None:
            return None
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def _forget_pid_file(self) -> None:
        record = read_pid_file(self.pid_path)
        if record is not None and record.pid == self.pid:
            self.pid_path.unlink(missing_ok=True)


def process_rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
