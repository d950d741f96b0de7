"""Twelve-factor configuration: environment variables with local-stack defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from crm_common.registry import SERVICES

#: gRPC and HTTP port of every service in the local stack (from the registry).
DEFAULT_PORTS: dict[str, tuple[int, int]] = {s.name: (s.grpc_port, s.http_port) for s in SERVICES}


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value else default


@dataclass(frozen=True)
class Settings:
    """What a service process needs to know about its surroundings."""

    service: str
    data_dir: Path
    bind_host: str
    grpc_port: int
    http_port: int
    event_store: str
    postgres: dict[str, str] = field(default_factory=dict)
    kafka_bootstrap: str = "127.0.0.1:9092"
    mongo_url: str = "mongodb://127.0.0.1:27017/?replicaSet=secantus"
    mongo_db: str = "crm"
    #: Port of a worker's `GET /healthz` (relays, projectors, followers); None:
    #: not served. The APIs report health on their own ports instead.
    health_port: int | None = None
    #: Seconds without a round of a worker's loop after which it reports stale.
    health_stale_after: float = 120.0
    #: An API closes each gRPC connection after this long (clients reconnect and
    #: find replicas added since).
    grpc_max_connection_age_ms: int = 300_000

    @classmethod
    def from_env(cls, service: str) -> Settings:
        grpc_default, http_default = DEFAULT_PORTS.get(service, (50050, 8080))
        prefix = f"CRM_{service.upper()}"
        event_store = _env("CRM_EVENT_STORE", "sqlite").lower()
        if event_store not in ("sqlite", "postgres"):
            raise ValueError(f"CRM_EVENT_STORE must be 'sqlite' or 'postgres', not {event_store!r}")
        stale_after = float(_env("CRM_HEALTH_STALE_SECONDS", "120"))
        if stale_after <= 0:
            raise ValueError(f"CRM_HEALTH_STALE_SECONDS must be positive, not {stale_after}")
        return cls(
            service=service,
            data_dir=Path(_env("CRM_DATA_DIR", "./var")).resolve(),
            bind_host=_env("CRM_BIND_HOST", "127.0.0.1"),
            grpc_port=int(_env(f"{prefix}_GRPC_PORT", str(grpc_default))),
            http_port=int(_env(f"{prefix}_HTTP_PORT", str(http_default))),
            event_store=event_store,
            postgres={
                "host": _env("CRM_POSTGRES_HOST", "127.0.0.1"),
                "port": _env("CRM_POSTGRES_PORT", "5432"),
                "dbname": _env("CRM_POSTGRES_DBNAME", "postgres"),
                "user": _env("CRM_POSTGRES_USER", "postgres"),
                "password": _env("CRM_POSTGRES_PASSWORD", ""),
                "schema": _env("CRM_POSTGRES_SCHEMA", service),
            },
            kafka_bootstrap=_env("CRM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            mongo_url=_env("CRM_MONGO_URL", "mongodb://127.0.0.1:27017/?replicaSet=secantus"),
            mongo_db=_env("CRM_MONGO_DB", "crm"),
            health_port=int(port) if (port := _env("CRM_HEALTH_PORT", "")) else None,
            health_stale_after=stale_after,
            grpc_max_connection_age_ms=int(_env("CRM_GRPC_MAX_CONNECTION_AGE_MS", "300000")),
        )

    @property
    def service_dir(self) -> Path:
        return self.data_dir / self.service

    def grpc_target(self, service: str) -> str:
        """Where this process reaches another service's gRPC API."""
        grpc_default, _ = DEFAULT_PORTS[service]
        port = _env(f"CRM_{service.upper()}_GRPC_PORT", str(grpc_default))
        return _env(f"CRM_{service.upper()}_GRPC_TARGET", f"127.0.0.1:{port}")


def topic_of(service: str) -> str:
    """The Kafka topic a service publishes its domain events to.

    `CRM_TOPIC_PREFIX` (default `crm`) lets several environments share one
    Kafka cluster: `staging.crm` gives `staging.crm.contacts.events`.
    """
    return f"{_env('CRM_TOPIC_PREFIX', 'crm')}.{service}.events"
