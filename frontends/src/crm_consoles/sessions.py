"""The signed-in user's session, kept in one encrypted cookie.

The cookie holds the user's token, who they are, their roles and a CSRF
secret, encrypted and authenticated (AES-128-CBC + HMAC, `Fernet`) with the
console's session key, so every replica reads it and the browser's scripts
never see the token (`HttpOnly`). `SameSite=Strict` keeps other sites'
requests from carrying it; state-changing calls must also echo the CSRF
secret in `X-CSRF-Token`, which only the console's own pages know.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import jwt
from cryptography.fernet import Fernet, InvalidToken


@dataclass(frozen=True)
class Session:
    token: str
    subject: str
    roles: tuple[str, ...]
    expires_at: int
    csrf: str
    #: How the user signed in: "oidc" or "development".
    via: str
    name: str = ""

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    @classmethod
    def for_token(cls, token: str, via: str) -> Session:
        """A session for a token the APIs will verify; its claims are read (not
        verified: the APIs do that on every call) to show who is signed in."""
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        roles = claims.get("roles") or []
        if isinstance(roles, str):
            roles = roles.split()
        return cls(
            token=token,
            subject=str(claims.get("sub", "")),
            roles=tuple(sorted(str(r) for r in roles)),
            expires_at=int(claims.get("exp", time.time() + 3600)),
            csrf=secrets.token_urlsafe(24),
            via=via,
            name=str(claims.get("name") or claims.get("preferred_username") or ""),
        )


class SessionCodec:
    """Seals sessions (and the short-lived sign-in state) into cookie values."""

    def __init__(self, key: bytes, purpose: str) -> None:
        derived = hashlib.sha256(b"crm-console:" + purpose.encode() + b":" + key).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, data: dict[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(data).encode()).decode()

    def open(self, value: str | None, max_age: int | None = None) -> dict[str, Any] | None:
        if not value:
            return None
        try:
            raw = self._fernet.decrypt(value.encode(), ttl=max_age)
        except (InvalidToken, ValueError):
            return None
        data = json.loads(raw)
        return data if isinstance(data, dict) else None

    def seal_session(self, session: Session) -> str:
        return self.seal(asdict(session))

    def open_session(self, value: str | None) -> Session | None:
        data = self.open(value)
        if data is None:
            return None
        try:
            session = Session(**{**data, "roles": tuple(data["roles"])})
        except (TypeError, KeyError):
            return None
        return None if session.expired else session


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
