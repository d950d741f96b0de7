"""The local stack: infrastructure servers plus the service processes, as one object.

Used by the `crm-stack` command and by the test fixtures alike. Everything
lives under one data directory::

    <data_dir>/zookeeper/     ZooKeeper's snapshots and transaction log
    <data_dir>/kafka-logs/    Kafka's partitions
    <data_dir>/secantus/      the document store (WiredTiger)
    <data_dir>/postgres/      PostgreSQL's cluster, with `--postgres` (StackConfig.postgres)
    <data_dir>/kafka-dist/    the Kafka distribution, extracted once
    <data_dir>/<service>/     a service's own files (its event store, its key store)
    <data_dir>/identity/      keys, tokens, certificates and the master keys file
    <data_dir>/logs/          one log per process
    <data_dir>/run/           pid files, generated configs, stack state

With `StackConfig.postgres` (`crm-stack up --postgres`) every write service
stores its events in PostgreSQL, each in the schema named after it: a server
the stack starts itself (`crm_deploy.postgres.EmbeddedPostgres`, PostgreSQL's
default durability, on 127.0.0.1 and `postgres_port`), or the one that
CRM_POSTGRES_HOST (with `_PORT`, `_DBNAME`, `_USER`, `_PASSWORD`) names.

Every service process serves `GET /healthz`, `/readyz` and `/metrics` on a
health port of its own (`StackConfig.health_ports`, listed by `crm-stack status`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crm_common.registry import COMMANDS, SERVICES, event_sources, inbound_topics
from crm_common.settings import DEFAULT_PORTS, inbound_topic, topic_of
from crm_deploy.identity import Identity, ensure_certificates, ensure_identity
from crm_deploy.postgres import EmbeddedPostgres, PostgresTarget, wait_for
from crm_deploy.process import (
    ManagedProcess,
    Probe,
    ProcessFailed,
    all_probes,
    free_port,
    grpc_health_probe,
    http_probe,
    port_in_use,
)
from crm_deploy.servers import (
    clear_stale_broker,
    ensure_topics,
    kafka_home,
    kafka_process,
    secantus_process,
    secantus_url,
    zookeeper_process,
)

log = logging.getLogger("crm_deploy.stack")

HOST = "127.0.0.1"
INFRA = ("zookeeper", "kafka", "secantus")
#: The write services whose topics the platform creates (planned ones too, so
#: that consumers such as ERP systems can subscribe before the service ships).
TOPIC_SERVICES = event_sources()
TOPIC_PARTITIONS = 6


#: What a worker's `/readyz` names while it works on but holds records it could
#: not publish or apply (crm_common.relay): ready for `up`, with a warning.
OPERATOR_WAIT = "an operator"


def worker_probe(url: str) -> Probe:
    """Ready when the worker's `GET /readyz` answers 200, or 503 only because it
    holds dead letters for an operator (it publishes everything else: the stack is
    usable, and `deploy/crm status` goes on showing what waits); that is said once."""
    warned: list[bool] = []

    def probe(_process: ManagedProcess) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return int(reply.status) == 200
        except urllib.error.HTTPError as error:
            try:
                waiting_for = str(json.loads(error.read() or b"{}").get("waiting_for") or "")
            except ValueError:
                return False
            if not waiting_for.startswith(OPERATOR_WAIT):
                return False
            if not warned:
                warned.append(True)
                print(f"warning: {_process.name} is waiting for {waiting_for}", file=sys.stderr)
            return True
        except OSError:
            return False

    return probe


@dataclass(frozen=True)
class ServiceProcess:
    """One row of the process table: a process name, its command, its service."""

    name: str
    command: tuple[str, ...]
    service: str
    #: API processes are ready when gRPC health says SERVING and GET /healthz is 200;
    #: the others (relays, followers, projectors) when their health port's `GET /readyz`
    #: is 200: they reached Kafka and their store (a relay: it is publishing).
    api: bool

    def argv(self) -> list[str]:
        executable, *args = self.command
        return [str(Path(sys.executable).with_name(executable)), *args]


#: Every service process of the platform, from the registry (crm_common.registry).
SERVICE_PROCESSES: tuple[ServiceProcess, ...] = tuple(
    ServiceProcess(
        svc.process_name(role),
        (svc.distribution, COMMANDS[role]),
        svc.name,
        api=role == "api",
    )
    for svc in SERVICES
    for role in svc.roles
)


#: The department consoles (`crm-consoles serve <console>`, docs/frontends.md): each
#: on its own port, with the development sign-in; `up` starts them after the services.
CONSOLE_PORTS: dict[str, int] = {
    "sales": 8091,
    "service": 8092,
    "marketing": 8093,
    "management": 8094,
}
CONSOLE_PROCESSES: tuple[ServiceProcess, ...] = tuple(
    ServiceProcess(f"{name}-console", ("crm-consoles", "serve", name), "consoles", api=False)
    for name in CONSOLE_PORTS
)
#: Everything `up` starts besides the infrastructure.
STACK_PROCESSES: tuple[ServiceProcess, ...] = (*SERVICE_PROCESSES, *CONSOLE_PROCESSES)


def service_process(name: str) -> ServiceProcess:
    for row in STACK_PROCESSES:
        if row.name == name:
            return row
    known = ", ".join(r.name for r in STACK_PROCESSES)
    raise KeyError(f"no service process {name!r} (known: {known})")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    return int(value) if value else default


#: The first health port of the local stack: each service process gets the next one.
FIRST_HEALTH_PORT = 9101


def health_port_variable(process: str) -> str:
    """`contacts-relay` -> `CRM_CONTACTS_RELAY_HEALTH_PORT` (moves that process's port)."""
    return f"CRM_{process.upper().replace('-', '_')}_HEALTH_PORT"


def default_health_ports(env: Mapping[str, str] | None = None) -> dict[str, int]:
    env = env or {}
    return {
        **{
            row.name: _env_int(env, health_port_variable(row.name), FIRST_HEALTH_PORT + i)
            for i, row in enumerate(SERVICE_PROCESSES)
        },
        # A console answers /healthz and /readyz on the port its pages are served on.
        **{
            row.name: _env_int(env, health_port_variable(row.name), port)
            for row, port in zip(CONSOLE_PROCESSES, CONSOLE_PORTS.values(), strict=True)
        },
    }


@dataclass
class StackConfig:
    """Where the stack keeps its data and which ports it listens on (127.0.0.1 only)."""

    data_dir: Path = field(default_factory=lambda: Path("var").resolve())
    kafka_port: int = 9092
    zookeeper_port: int = 2181
    mongo_port: int = 27017
    service_ports: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    #: Process name -> its health port (`GET /healthz`, `/readyz`, `/metrics`).
    health_ports: dict[str, int] = field(default_factory=default_health_ports)
    topics: dict[str, int] = field(
        default_factory=lambda: {
            **{topic_of(s): TOPIC_PARTITIONS for s in TOPIC_SERVICES},
            **{inbound_topic(t): TOPIC_PARTITIONS for t in inbound_topics()},
        }
    )
    kafka_heap: str = "384m"
    zookeeper_heap: str = "64m"
    mongo_cache_size: str = "256M"
    mongo_sync_on_commit: bool = True
    #: The development identity (keys, tokens, certificates); default <data_dir>/identity.
    identity_dir: Path | None = None
    #: Every write service on PostgreSQL instead of a SQLite file (`up --postgres`).
    postgres: bool = False
    #: Where a PostgreSQL the stack starts itself listens (not when CRM_POSTGRES_HOST is set).
    postgres_port: int = 5432
    #: A server of one's own (CRM_POSTGRES_HOST etc.) instead of starting one.
    postgres_server: PostgresTarget | None = None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, postgres: bool = False
    ) -> StackConfig:
        env = os.environ if env is None else env
        return cls(
            postgres=postgres,
            postgres_port=_env_int(env, "CRM_POSTGRES_PORT", 5432),
            postgres_server=postgres_server(env) if postgres else None,
            data_dir=Path(env.get("CRM_DATA_DIR") or "var").resolve(),
            kafka_port=_env_int(env, "CRM_KAFKA_PORT", 9092),
            zookeeper_port=_env_int(env, "CRM_ZOOKEEPER_PORT", 2181),
            mongo_port=_env_int(env, "CRM_MONGO_PORT", 27017),
            service_ports={
                service: (
                    _env_int(env, f"CRM_{service.upper()}_GRPC_PORT", grpc),
                    _env_int(env, f"CRM_{service.upper()}_HTTP_PORT", http),
                )
                for service, (grpc, http) in DEFAULT_PORTS.items()
            },
            health_ports=default_health_ports(env),
        )

    @classmethod
    def for_tests(cls, root: Path, identity_dir: Path | None = None) -> StackConfig:
        """A stack under `root` on free ports, so it never meets a developer's stack."""
        return cls(
            identity_dir=identity_dir,
            data_dir=Path(root).resolve(),
            kafka_port=free_port(),
            zookeeper_port=free_port(),
            mongo_port=free_port(),
            service_ports={s: (free_port(), free_port()) for s in DEFAULT_PORTS},
            health_ports={row.name: free_port() for row in STACK_PROCESSES},
            postgres_port=free_port(),
        )

    @property
    def identity(self) -> Identity:
        return Identity(self.identity_dir or self.data_dir / "identity")

    def env(self) -> dict[str, str]:
        """The environment variables that describe this stack to `crm-stack` and services."""
        env = {
            **self.identity.env(),
            "CRM_DATA_DIR": str(self.data_dir),
            "CRM_KAFKA_PORT": str(self.kafka_port),
            "CRM_ZOOKEEPER_PORT": str(self.zookeeper_port),
            "CRM_MONGO_PORT": str(self.mongo_port),
            "CRM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CRM_MONGO_URL": self.mongo_url,
        }
        for service, (grpc, http) in self.service_ports.items():
            env[f"CRM_{service.upper()}_GRPC_PORT"] = str(grpc)
            env[f"CRM_{service.upper()}_HTTP_PORT"] = str(http)
        return env

    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.kafka_port}"

    @property
    def mongo_url(self) -> str:
        return secantus_url(self.mongo_port, HOST)

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "kafka_port": self.kafka_port,
            "zookeeper_port": self.zookeeper_port,
            "mongo_port": self.mongo_port,
            "service_ports": {k: list(v) for k, v in self.service_ports.items()},
            "health_ports": dict(self.health_ports),
            "topics": self.topics,
            "kafka_heap": self.kafka_heap,
            "zookeeper_heap": self.zookeeper_heap,
            "mongo_cache_size": self.mongo_cache_size,
            "mongo_sync_on_commit": self.mongo_sync_on_commit,
            "identity_dir": str(self.identity.root),
            "postgres": self.postgres,
            "postgres_port": self.postgres_port,
            "postgres_server": (
                dataclasses.asdict(self.postgres_server) if self.postgres_server else None
            ),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackConfig:
        return cls(
            data_dir=Path(data["data_dir"]),
            kafka_port=int(data["kafka_port"]),
            zookeeper_port=int(data["zookeeper_port"]),
            mongo_port=int(data["mongo_port"]),
            service_ports={k: (int(v[0]), int(v[1])) for k, v in data["service_ports"].items()},
            health_ports={
                **default_health_ports(),
                **{k: int(v) for k, v in data.get("health_ports", {}).items()},
            },
            topics={k: int(v) for k, v in data["topics"].items()},
            kafka_heap=data["kafka_heap"],
            zookeeper_heap=data["zookeeper_heap"],
            mongo_cache_size=data["mongo_cache_size"],
            mongo_sync_on_commit=bool(data["mongo_sync_on_commit"]),
            identity_dir=Path(data["identity_dir"]) if data.get("identity_dir") else None,
            postgres=bool(data.get("postgres", False)),
            postgres_port=int(data.get("postgres_port", 5432)),
            postgres_server=(
                PostgresTarget(**data["postgres_server"]) if data.get("postgres_server") else None
            ),
        )

    @property
    def postgres_target(self) -> PostgresTarget | None:
        """Where the write services store their events; None: SQLite files."""
        if not self.postgres:
            return None
        return self.postgres_server or PostgresTarget(HOST, self.postgres_port)


def postgres_server(env: Mapping[str, str]) -> PostgresTarget | None:
    """The PostgreSQL server CRM_POSTGRES_HOST (and `_PORT`, ...) names, if any."""
    host = env.get("CRM_POSTGRES_HOST")
    if not host:
        return None
    return PostgresTarget(
        host=host,
        port=_env_int(env, "CRM_POSTGRES_PORT", 5432),
        dbname=env.get("CRM_POSTGRES_DBNAME") or "postgres",
        user=env.get("CRM_POSTGRES_USER") or "postgres",
        password=env.get("CRM_POSTGRES_PASSWORD") or "",
    )


class Stack:
    """ZooKeeper, Kafka, SecantusDB and the service processes of one data directory."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._infra: dict[str, ManagedProcess] = {}
        self._services: dict[str, ManagedProcess] = {}
        #: The PostgreSQL this stack started itself (`StackConfig.postgres`).
        self._postgres: EmbeddedPostgres | None = None
        #: Extra environment each service process was started with (for restarts).
        self._service_env: dict[str, dict[str, str]] = {}

    # -- addresses ------------------------------------------------------------

    @property
    def kafka_bootstrap(self) -> str:
        return self.config.kafka_bootstrap

    @property
    def mongo_url(self) -> str:
        return self.config.mongo_url

    def endpoints(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Name → address of everything the stack serves (for the ready banner)."""
        endpoints = {
            "kafka": self.kafka_bootstrap,
            "zookeeper": f"{HOST}:{self.config.zookeeper_port}",
            "document store": self.mongo_url,
        }
        target = self.config.postgres_target
        if target is not None:
            endpoints["event stores"] = (
                f"PostgreSQL {target.host}:{target.port}, database {target.dbname}, "
                "a schema per service"
            )
        wanted = set(names) if names is not None else {r.name for r in STACK_PROCESSES}
        for row in SERVICE_PROCESSES:
            if row.name not in wanted or not row.api:
                continue
            grpc, http = self.config.service_ports[row.service]
            endpoints[f"{row.service} gRPC"] = f"{HOST}:{grpc}"
            endpoints[f"{row.service} REST"] = f"http://{HOST}:{http} (OpenAPI: /docs)"
        for row in CONSOLE_PROCESSES:
            if row.name in wanted:
                endpoints[f"{row.command[-1]} console"] = (
                    f"http://{HOST}:{self.config.health_ports[row.name]} (development sign-in)"
                )
        endpoints["health, metrics"] = (
            f"http://{HOST}:<port>/healthz, /readyz, /metrics (ports: deploy/crm status)"
        )
        endpoints["tokens"] = f"{self.identity.tokens}/<role>.jwt (deploy/crm identity)"
        endpoints["data dir"] = str(self.config.data_dir)
        endpoints["logs"] = str(self.config.logs_dir)
        return endpoints

    # -- processes ------------------------------------------------------------

    def process(self, name: str) -> ManagedProcess:
        if name in self._infra:
            return self._infra[name]
        if name in self._services:
            return self._services[name]
        raise KeyError(f"{name} has not been started in this stack")

    def processes(self) -> list[ManagedProcess]:
        """Every process started so far, infrastructure first."""
        return [*self._infra.values(), *self._services.values()]

    def _infra_processes(self) -> dict[str, ManagedProcess]:
        c = self.config
        run, logs = c.run_dir, c.logs_dir
        home = kafka_home(c.data_dir / "kafka-dist")
        return {
            "zookeeper": zookeeper_process(
                home=home,
                data_dir=c.data_dir / "zookeeper",
                run_dir=run,
                log_path=logs / "zookeeper.log",
                port=c.zookeeper_port,
                heap=c.zookeeper_heap,
                host=HOST,
            ),
            "kafka": kafka_process(
                home=home,
                logs_dir=c.data_dir / "kafka-logs",
                run_dir=run,
                log_path=logs / "kafka.log",
                port=c.kafka_port,
                zookeeper_port=c.zookeeper_port,
                heap=c.kafka_heap,
                host=HOST,
            ),
            "secantus": secantus_process(
                storage_dir=c.data_dir / "secantus",
                run_dir=run,
                log_path=logs / "secantus.log",
                port=c.mongo_port,
                cache_size=c.mongo_cache_size,
                sync_on_commit=c.mongo_sync_on_commit,
                host=HOST,
            ),
        }

    def _check_ports(self, ports: dict[str, int]) -> None:
        busy = [f"{what} ({port})" for what, port in ports.items() if port_in_use(port, HOST)]
        if busy:
            raise RuntimeError(
                "ports already in use on 127.0.0.1: "
                + ", ".join(busy)
                + " (another stack running? set CRM_*_PORT to move this one)"
            )

    @property
    def identity(self) -> Identity:
        """The stack's development identity: `identity.mint("sales")` is a sales user's token."""
        return self.config.identity

    def ensure_identity(self, *, rotate: bool = False, rotate_master_key: bool = False) -> Identity:
        """Keys (the master keys that seal personal data too), a token per role and the
        development certificates (what is missing)."""
        identity = ensure_identity(
            self.identity.root, rotate=rotate, rotate_master_key=rotate_master_key
        )
        ensure_certificates(identity.root / "tls")
        return identity

    def start_infra(self) -> None:
        """ZooKeeper then Kafka, SecantusDB beside them; then the platform's topics."""
        c = self.config
        self.ensure_identity()
        for d in ("zookeeper", "kafka-logs", "secantus", "logs", "run"):
            (c.data_dir / d).mkdir(parents=True, exist_ok=True)
        self._check_ports(
            {"zookeeper": c.zookeeper_port, "kafka": c.kafka_port, "secantus": c.mongo_port}
        )
        self.save_state()
        self._infra = self._infra_processes()

        def kafka_chain() -> None:
            self._infra["zookeeper"].start()
            self._infra["zookeeper"].wait_ready()
            self._infra["kafka"].start()
            self._infra["kafka"].wait_ready()
            ensure_topics(self.kafka_bootstrap, c.topics)

        def document_store() -> None:
            self._infra["secantus"].start()
            self._infra["secantus"].wait_ready()

        with ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(kafka_chain),
                pool.submit(document_store),
                pool.submit(self._start_postgres),
            ]
            errors = [f.exception() for f in futures]
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            self.stop()
            if isinstance(failure, ProcessFailed):
                raise failure
            raise RuntimeError(f"infrastructure did not start: {failure}") from failure

    def _start_postgres(self) -> None:
        """The event stores' PostgreSQL (with `StackConfig.postgres`): the server
        CRM_POSTGRES_HOST names must answer, else one is started under <data_dir>/postgres."""
        c = self.config
        if not c.postgres:
            return
        if c.postgres_server is not None:
            reason = wait_for(c.postgres_server, timeout=10)
            if reason:
                raise RuntimeError(f"CRM_POSTGRES_HOST is set but unusable: {reason}")
            return
        self._check_ports({"postgres": c.postgres_port})
        server = EmbeddedPostgres(port=c.postgres_port, durable=True)
        server.start(c.data_dir / "postgres")
        self._postgres = server

    def service_env(self, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a service process: the caller's plus the stack's addresses."""
        env = dict(os.environ)
        env.update(self.config.env())
        target = self.config.postgres_target
        if target is not None:
            # Each write service in the schema named after it (the production default).
            env.update(target.env("unused"))
            del env["CRM_POSTGRES_SCHEMA"]
        env.setdefault("CRM_EVENT_STORE", "sqlite")
        if extra_env:
            env.update(extra_env)
        return env

    def health_url(self, name: str, path: str = "/healthz") -> str:
        """`GET /healthz` (or `/readyz`, `/metrics`) of a service process."""
        return f"http://{HOST}:{self.config.health_ports[name]}{path}"

    def _service(self, row: ServiceProcess, extra_env: Mapping[str, str] | None) -> ManagedProcess:
        probe: Probe
        if row.api:
            grpc, http = self.config.service_ports[row.service]
            probe = all_probes(
                grpc_health_probe(f"{HOST}:{grpc}"), http_probe(f"http://{HOST}:{http}/healthz")
            )
        else:
            # Ready once it does its work: a relay publishes, a projector applies.
            probe = worker_probe(self.health_url(row.name, "/readyz"))
        env = self.service_env(extra_env)
        env["CRM_HEALTH_PORT"] = str(self.config.health_ports[row.name])
        if row.service == "consoles":
            env["CRM_CONSOLE_PORT"] = env["CRM_HEALTH_PORT"]
            env["CRM_CONSOLE_DEV_IDENTITY_DIR"] = str(self.identity.root)
            for service, (_, http) in self.config.service_ports.items():
                env[f"CRM_{service.upper()}_URL"] = f"http://{HOST}:{http}"
        return ManagedProcess(
            row.name,
            row.argv(),
            log_path=self.config.logs_dir / f"{row.name}.log",
            pid_path=self.config.run_dir / f"{row.name}.pid",
            probe=probe,
            env=env,
            cwd=self.config.data_dir,
        )

    def start_services(
        self, names: Iterable[str] | None = None, extra_env: Mapping[str, str] | None = None
    ) -> list[ManagedProcess]:
        """Starts service processes (all of the table by default) and waits until ready."""
        rows = list(STACK_PROCESSES) if names is None else [service_process(n) for n in names]
        ports: dict[str, int] = {}
        for row in rows:
            ports[f"{row.name} health"] = self.config.health_ports[row.name]
            if row.api:
                grpc, http = self.config.service_ports[row.service]
                ports[f"{row.service} gRPC"], ports[f"{row.service} REST"] = grpc, http
        self._check_ports(ports)
        for row in rows:
            (self.config.data_dir / row.service).mkdir(parents=True, exist_ok=True)
        started = []
        for row in rows:
            process = self._service(row, extra_env)
            self._services[row.name] = process
            process.start()
            started.append(process)
        try:
            for process in started:
                process.wait_ready()
        except ProcessFailed:
            self.stop_services([p.name for p in started])
            raise
        return started

    def restart(self, name: str) -> ManagedProcess:
        """Starts a stopped or crashed process again, with the same command and env.

        Kafka first gets its broker registration cleared: a broker killed
        without a clean shutdown leaves it in ZooKeeper until its session
        times out, and a broker that starts before then exits at once.
        """
        process = self.process(name)
        if name == "kafka":
            cleared = clear_stale_broker(f"{HOST}:{self.config.zookeeper_port}", broker_id=0)
            if cleared:
                log.info("cleared the registration a crashed Kafka left: %s", cleared)
        process.start()
        return process

    def stop_services(self, names: Iterable[str] | None = None) -> None:
        wanted = list(self._services) if names is None else list(names)
        processes = [self._services[n] for n in wanted if n in self._services]
        if processes:
            with ThreadPoolExecutor(len(processes)) as pool:
                list(pool.map(lambda p: p.stop(), processes))

    def stop(self) -> None:
        """Services first, then Kafka, then ZooKeeper, then SecantusDB, then the
        PostgreSQL the stack started; each gracefully."""
        self.stop_services()
        for name in ("kafka", "zookeeper", "secantus"):
            if name in self._infra:
                self._infra[name].stop()
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None

    # -- state shared with other crm-stack commands ---------------------------

    @property
    def state_path(self) -> Path:
        return self.config.run_dir / "stack.json"

    def save_state(self, **extra: Any) -> None:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        state = {"config": self.config.to_json(), "updated": time.time(), **extra}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)


def load_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((data_dir / "run" / "stack.json").read_text())
        return data
    except (FileNotFoundError, json.JSONDecodeError):
        return None
