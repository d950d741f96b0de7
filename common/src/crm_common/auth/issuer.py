"""Signing tokens: the platform services' own credentials, and the development
identity provider of the local stack and the tests.

In production users' tokens come from the enterprise's identity provider;
the services only verify them. What the platform signs itself is its
services' credentials: each service holds a private key (a Kubernetes
Secret) whose public half is in the key set, and mints itself short-lived
tokens with the `platform` role for its calls to other services.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ALGORITHM = "ES256"


def new_private_key_pem() -> bytes:
    """A fresh P-256 private key (ES256), PEM-encoded."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_jwk(private_key_pem: bytes, kid: str) -> dict[str, Any]:
    """The public half of a private key as a JWK pinned to ES256."""
    private = serialization.load_pem_private_key(private_key_pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def jwks_document(keys: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {"keys": list(keys)}


@dataclass(frozen=True)
class TokenIssuer:
    """Signs tokens with one private key."""

    private_key_pem: bytes
    kid: str
    issuer: str
    audience: str
    clock: Callable[[], float] = time.time

    @classmethod
    def from_file(cls, path: Path | str, kid: str, issuer: str, audience: str) -> TokenIssuer:
        return cls(Path(path).read_bytes(), kid, issuer, audience)

    def mint(
        self,
        subject: str,
        roles: Iterable[str],
        *,
        client: str,
        lifetime: float = 3600.0,
        not_before: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "roles": sorted(roles),
            "client_id": client,
            "iat": now,
            "exp": now + int(lifetime),
            "jti": uuid.uuid4().hex,
        }
        if not_before is not None:
            claims["nbf"] = int(not_before)
        claims.update(extra or {})
        token: str = jwt.encode(
            claims, self.private_key_pem, algorithm=ALGORITHM, headers={"kid": self.kid}
        )
        return token


class ServiceCredentials:
    """A platform service's own bearer token, minted when needed and reused until
    a minute before it expires."""

    LIFETIME = 600.0

    def __init__(self, issuer: TokenIssuer, service: str) -> None:
        self._issuer = issuer
        self.service = service
        self._lock = threading.Lock()
        self._token = ""
        self._expires = 0.0

    def token(self) -> str:
        with self._lock:
            now = self._issuer.clock()
            if now >= self._expires - 60:
                self._token = self._issuer.mint(
                    f"service:{self.service}",
                    ["platform"],
                    client=self.service,
                    lifetime=self.LIFETIME,
                )
                self._expires = now + self.LIFETIME
            return self._token
