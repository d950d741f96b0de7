"""Configuration of a console process: environment variables with local-stack defaults.

- `CRM_CONSOLE_BIND_HOST`, `CRM_CONSOLE_PORT`: where the console listens (default
  127.0.0.1 and the console's port).
- `CRM_CONSOLE_PUBLIC_URL`: the address users reach it at (the OIDC redirect;
  `https://` makes the cookies `Secure`).
- `CRM_CONSOLE_SESSION_KEY_FILE`: the secret that encrypts the session cookie
  (every replica of a console shares it).
- `CRM_<SERVICE>_URL`: the public REST API of each service (default: the local stack's).
- `CRM_OIDC_ISSUER`, `CRM_OIDC_CLIENT_ID`, `CRM_OIDC_CLIENT_SECRET`, `CRM_OIDC_SCOPES`,
  `CRM_OIDC_API_TOKEN`: the identity provider (production sign-in) and which of its
  tokens the APIs get (`access_token`, the default, or `id_token`).
- `CRM_CONSOLE_DEV_IDENTITY_DIR`: development sign-in with the local stack's
  identity; production values never set it.
- `CRM_CONSOLE_LIVE_INTERVAL_SECONDS`: how often an open page's live stream reads
  its API (default 2; 0.5 to 60).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from crm_common.registry import SERVICES

#: The consoles and the port each listens on in the local stack.
CONSOLE_PORTS: dict[str, int] = {
    "sales": 8091,
    "service": 8092,
    "marketing": 8093,
    "management": 8094,
}

#: The services whose REST APIs the consoles call.
API_SERVICES: tuple[str, ...] = tuple(s.name for s in SERVICES if not s.planned)


class ConfigError(ValueError):
    """A setting is missing or wrong; the process refuses to start."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    scopes: str = "openid profile email"
    #: The token of the issuer's reply that the APIs verify.
    api_token: str = "access_token"


@dataclass(frozen=True)
class ConsoleSettings:
    console: str
    bind_host: str
    port: int
    public_url: str
    session_key: bytes
    api_urls: Mapping[str, str] = field(default_factory=dict)
    oidc: OidcSettings | None = None
    #: The development identity's directory; None: development sign-in is refused.
    dev_identity_dir: Path | None = None
    dev_issuer: str = "crm-local"
    dev_audience: str = "crm-platform"
    #: Seconds between two reads of a page's live stream (crm_consoles.live).
    live_interval: float = 2.0

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @classmethod
    def from_env(cls, console: str, env: Mapping[str, str] | None = None) -> ConsoleSettings:
        env = os.environ if env is None else env
        if console not in CONSOLE_PORTS:
            raise ConfigError(f"no console {console!r} (known: {', '.join(CONSOLE_PORTS)})")

        def get(name: str, default: str = "") -> str:
            return env.get(name, "") or default

        port = int(get("CRM_CONSOLE_PORT", str(CONSOLE_PORTS[console])))
        host = get("CRM_CONSOLE_BIND_HOST", "127.0.0.1")
        public_url = get("CRM_CONSOLE_PUBLIC_URL", f"http://127.0.0.1:{port}").rstrip("/")
        api_urls = {
            s.name: get(f"CRM_{s.name.upper()}_URL", f"http://127.0.0.1:{s.http_port}").rstrip("/")
            for s in SERVICES
            if s.name in API_SERVICES
        }
        dev_dir = get("CRM_CONSOLE_DEV_IDENTITY_DIR")
        oidc = None
        if get("CRM_OIDC_ISSUER"):
            api_token = get("CRM_OIDC_API_TOKEN", "access_token")
            if api_token not in ("access_token", "id_token"):
                raise ConfigError("CRM_OIDC_API_TOKEN must be access_token or id_token")
            if not get("CRM_OIDC_CLIENT_ID"):
                raise ConfigError("CRM_OIDC_ISSUER is set but CRM_OIDC_CLIENT_ID is not")
            oidc = OidcSettings(
                issuer=get("CRM_OIDC_ISSUER").rstrip("/"),
                client_id=get("CRM_OIDC_CLIENT_ID"),
                client_secret=get("CRM_OIDC_CLIENT_SECRET"),
                scopes=get("CRM_OIDC_SCOPES", "openid profile email"),
                api_token=api_token,
            )
        if oidc is None and not dev_dir:
            raise ConfigError(
                "no sign-in configured: set CRM_OIDC_ISSUER (production) or "
                "CRM_CONSOLE_DEV_IDENTITY_DIR (local development)"
            )
        try:
            live_interval = float(get("CRM_CONSOLE_LIVE_INTERVAL_SECONDS", "2"))
        except ValueError:
            live_interval = -1.0
        if not 0.5 <= live_interval <= 60:
            raise ConfigError("CRM_CONSOLE_LIVE_INTERVAL_SECONDS must be a number from 0.5 to 60")
        key_file = get("CRM_CONSOLE_SESSION_KEY_FILE")
        if key_file:
            session_key = Path(key_file).read_bytes().strip()
            if len(session_key) < 32:
                raise ConfigError("the session key must hold at least 32 bytes")
        elif dev_dir:
            # Local development only: sessions end when the process does.
            session_key = os.urandom(32).hex().encode()
        else:
            raise ConfigError("CRM_CONSOLE_SESSION_KEY_FILE is required with OIDC sign-in")
        return cls(
            console=console,
            bind_host=host,
            port=port,
            public_url=public_url,
            session_key=session_key,
            api_urls=api_urls,
            oidc=oidc,
            dev_identity_dir=Path(dev_dir) if dev_dir else None,
            dev_issuer=get("CRM_AUTH_ISSUER", "crm-local"),
            dev_audience=get("CRM_AUTH_AUDIENCE", "crm-platform"),
            live_interval=live_interval,
        )
