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
    #: Identity and access (docs/security.md). The key set (JWKS file or URL) the
    #: bearer tokens are verified with; the issuer and audience they must name.
    auth_jwks: str = ""
    auth_issuer: str = "crm-local"
    auth_audience: str = "crm-platform"
    #: The access policy file; empty: the one shipped in crm_common.auth.
    access_policy: str = ""
    #: This service's own signing key (its calls to other services) and its kid.
    service_key_file: str = ""
    service_key_id: str = "platform-1"
    #: The secret that keys pseudonyms of personal data (bulk queries for analysts).
    pseudonym_key_file: str = ""
    #: Requests a second (and burst) each client may send; 0: no limit.
    rate_limit_per_client: float = 0.0
    rate_limit_burst: float = 0.0
    #: gRPC TLS: server certificate and key (PEM); with a client CA, client
    #: certificates are asked for, and required when `grpc_client_auth` is "require".
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_client_ca: str = ""
    grpc_client_auth: str = "none"
    #: Calling other services over TLS: the CA that signed their certificates, and
    #: this service's own client certificate and key (when they require one).
    grpc_tls_ca: str = ""
    grpc_client_cert: str = ""
    grpc_client_key: str = ""
    #: Privacy (docs/security.md, "Privacy"). The master keys that wrap every
    #: person's data key: `id:base64key` entries, current first (the variable's
    #: text, or a file such as a mounted Secret). Neither set: personal data is
    #: stored as the events carry it.
    master_keys: str = field(default="", repr=False)
    master_keys_file: str = ""
    #: Where the data keys live: empty (beside the events: SQLite
    #: `keys.sqlite` in the service's directory, or the service's PostgreSQL
    #: schema), `postgresql://...` (another database) or `sqlite:<directory>`.
    key_store_url: str = field(default="", repr=False)
    #: The key client's cache: at most this many data keys, each for at most
    #: this many seconds (how long another process may still use a destroyed key).
    key_cache_size: int = 10_000
    key_cache_ttl: float = 60.0
    #: Whole-event encryption (defence in depth, beside the personal fields):
    #: `id:base64key` entries as for master keys, current first; empty: off.
    event_cipher_keys: str = field(default="", repr=False)
    event_cipher_keys_file: str = ""

    @classmethod
    def from_env(cls, service: str) -> Settings:
        grpc_default, http_default = DEFAULT_PORTS.get(service, (50050, 8080))
        prefix = f"CRM_{service.upper()}"
        event_store = _env("CRM_EVENT_STORE", "sqlite").lower()
        if event_store not in ("sqlite", "postgres"):
            raise ValueError(f"CRM_EVENT_STORE must be 'sqlite' or 'postgres', not {event_store!r}")
        client_auth = _env("CRM_GRPC_CLIENT_AUTH", "none").lower()
        if client_auth not in ("none", "optional", "require"):
            raise ValueError(
                f"CRM_GRPC_CLIENT_AUTH must be 'none', 'optional' or 'require', not {client_auth!r}"
            )
        data_dir = Path(_env("CRM_DATA_DIR", "./var")).resolve()
        identity = data_dir / "identity"
        stale_after = float(_env("CRM_HEALTH_STALE_SECONDS", "120"))
        key_cache_size = int(_env("CRM_KEY_CACHE_SIZE", "10000"))
        key_cache_ttl = float(_env("CRM_KEY_CACHE_TTL_SECONDS", "60"))
        if key_cache_size < 1 or key_cache_ttl <= 0:
            raise ValueError(
                "CRM_KEY_CACHE_SIZE must be at least 1 and CRM_KEY_CACHE_TTL_SECONDS positive"
            )
        if stale_after <= 0:
            raise ValueError(f"CRM_HEALTH_STALE_SECONDS must be positive, not {stale_after}")
        return cls(
            service=service,
            data_dir=data_dir,
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
            auth_jwks=_env("CRM_AUTH_JWKS", str(identity / "jwks.json")),
            auth_issuer=_env("CRM_AUTH_ISSUER", "crm-local"),
            auth_audience=_env("CRM_AUTH_AUDIENCE", "crm-platform"),
            access_policy=_env("CRM_ACCESS_POLICY", ""),
            service_key_file=_env("CRM_SERVICE_KEY_FILE", str(identity / "platform.key.pem")),
            service_key_id=_env("CRM_SERVICE_KEY_ID", "platform-1"),
            pseudonym_key_file=_env("CRM_PSEUDONYM_KEY_FILE", str(identity / "pseudonym.key")),
            rate_limit_per_client=float(_env("CRM_RATE_LIMIT_PER_CLIENT", "0")),
            rate_limit_burst=float(_env("CRM_RATE_LIMIT_BURST", "0")),
            grpc_tls_cert=_env("CRM_GRPC_TLS_CERT", ""),
            grpc_tls_key=_env("CRM_GRPC_TLS_KEY", ""),
            grpc_client_ca=_env("CRM_GRPC_CLIENT_CA", ""),
            grpc_client_auth=client_auth,
            grpc_tls_ca=_env("CRM_GRPC_TLS_CA", ""),
            grpc_client_cert=_env("CRM_GRPC_CLIENT_CERT", ""),
            grpc_client_key=_env("CRM_GRPC_CLIENT_KEY", ""),
            master_keys=_env("CRM_MASTER_KEYS", ""),
            master_keys_file=_env("CRM_MASTER_KEYS_FILE", ""),
            key_store_url=_env("CRM_KEY_STORE_URL", ""),
            key_cache_size=key_cache_size,
            key_cache_ttl=key_cache_ttl,
            event_cipher_keys=_env("CRM_EVENT_CIPHER_KEYS", ""),
            event_cipher_keys_file=_env("CRM_EVENT_CIPHER_KEYS_FILE", ""),
        )

    def pseudonym_key(self) -> bytes:
        """The key of pseudonyms; refuses to run without one rather than use a default."""
        try:
            key = Path(self.pseudonym_key_file).read_bytes().strip()
        except FileNotFoundError:
            raise RuntimeError(
                f"no pseudonym key at {self.pseudonym_key_file} (CRM_PSEUDONYM_KEY_FILE)"
            ) from None
        if len(key) < 16:
            raise RuntimeError(f"the pseudonym key in {self.pseudonym_key_file} is too short")
        return key

    @property
    def service_dir(self) -> Path:
        return self.data_dir / self.service

    def grpc_target(self, service: str) -> str:
        """Where this process reaches another service's gRPC API."""
        grpc_default, _ = DEFAULT_PORTS[service]
        port = _env(f"CRM_{service.upper()}_GRPC_PORT", str(grpc_default))
        return _env(f"CRM_{service.upper()}_GRPC_TARGET", f"127.0.0.1:{port}")


def topic_prefix() -> str:
    """`CRM_TOPIC_PREFIX` (default `crm`)."""
    return _env("CRM_TOPIC_PREFIX", "crm")


def inbound_topic(name: str) -> str:
    """An inbound topic other systems publish to: `erp.orders` -> `crm.erp.orders`."""
    return f"{topic_prefix()}.{name}"


def topic_of(service: str) -> str:
    """The Kafka topic a service publishes its domain events to.

    `CRM_TOPIC_PREFIX` (default `crm`) lets several environments share one
    Kafka cluster: `staging.crm` gives `staging.crm.contacts.events`.
    """
    return f"{topic_prefix()}.{service}.events"
