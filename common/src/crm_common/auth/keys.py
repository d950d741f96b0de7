"""The keys that sign tokens: a JWKS document from a file or a URL.

Every key must name its `kid` and its `alg`; a token is verified only with
the key its `kid` names and only with that key's algorithm (the algorithm is
pinned per key, so `none` or HMAC with a public key cannot be slipped in).
Symmetric (HMAC) keys are refused outright: every service holds the key set,
so a shared secret would let any of them forge tokens.

Keys rotate without a restart: a file is re-read when it changes (checked at
most every `check_every` seconds), a URL is fetched again after `ttl`
seconds, and an unknown `kid` triggers one early reload (at most every
`check_every` seconds) so that a newly published key is picked up at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwt import PyJWK

log = logging.getLogger(__name__)

#: The asymmetric algorithms a key may be pinned to.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class KeySetError(ValueError):
    """The key set cannot be read or holds a key that may not be used."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    key: Any  # the public key object PyJWT verifies with


def parse_jwks(document: dict[str, Any]) -> dict[str, SigningKey]:
    """The usable keys of a JWKS document, by kid; refuses the whole set on a bad key."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise KeySetError("a JWKS document has a 'keys' list")
    parsed: dict[str, SigningKey] = {}
    for raw in keys:
        if not isinstance(raw, dict):
            raise KeySetError("every key of a JWKS document is an object")
        kid, alg = raw.get("kid"), raw.get("alg")
        if not isinstance(kid, str) or not kid:
            raise KeySetError("every key names its 'kid'")
        if alg not in ALLOWED_ALGORITHMS:
            raise KeySetError(
                f"key {kid!r}: 'alg' must be one of {sorted(ALLOWED_ALGORITHMS)}, not {alg!r}"
            )
        if raw.get("kty") == "oct":
            raise KeySetError(f"key {kid!r}: symmetric keys are not accepted")
        if raw.get("use", "sig") != "sig":
            continue
        if "d" in raw:
            raise KeySetError(f"key {kid!r}: a published key set must not hold private keys")
        try:
            jwk = PyJWK(raw, algorithm=alg)
        except Exception as error:  # PyJWT raises several types for a malformed key
            raise KeySetError(f"key {kid!r} is not a valid {alg} key: {error}") from None
        if kid in parsed:
            raise KeySetError(f"kid {kid!r} appears twice")
        parsed[kid] = SigningKey(kid, str(alg), jwk.key)
    return parsed


def _read_source(source: str, timeout: float) -> dict[str, Any]:
    if source.startswith(("https://", "http://")):
        with urllib.request.urlopen(source, timeout=timeout) as response:
            document = json.loads(response.read(1_000_000))
    else:
        document = json.loads(Path(source).read_text())
    if not isinstance(document, dict):
        raise KeySetError(f"{source}: not a JWKS document")
    return document


class KeySet:
    """The current keys of one JWKS source (a file path or an http(s) URL)."""

    def __init__(
        self,
        source: str,
        *,
        ttl: float = 300.0,
        check_every: float = 5.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._is_url = source.startswith(("https://", "http://"))
        self._ttl = ttl
        self._check_every = check_every
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, SigningKey] = {}
        self._loaded_at = float("-inf")
        self._checked_at = float("-inf")
        self._mtime: float | None = None
        #: Goes up with every (re)load, so that what was verified with the old
        #: keys is verified again (`TokenVerifier`'s cache).
        self.generation = 0
        self._load()

    def _load(self) -> None:
        keys = parse_jwks(_read_source(self.source, self._timeout))
        self._keys = keys
        self.generation += 1
        now = self._clock()
        self._loaded_at = self._checked_at = now
        if not self._is_url:
            self._mtime = Path(self.source).stat().st_mtime

    def _refresh(self, *, eager: bool) -> None:
        now = self._clock()
        if now - self._checked_at < self._check_every:
            return
        self._checked_at = now
        try:
            if self._is_url:
                if eager or now - self._loaded_at >= self._ttl:
                    self._load()
            elif Path(self.source).stat().st_mtime != self._mtime:
                self._load()
        except (OSError, ValueError) as error:
            # Keep verifying with the keys we have; a broken publication must not lock
            # everyone out.
            log.error("key set %s could not be reloaded (%s); keeping the last good one",
                      self.source, error)  # fmt: skip

    def get(self, kid: str) -> SigningKey | None:
        """The key named `kid`, reloading the set first if it may have changed."""
        with self._lock:
            self._refresh(eager=False)
            key = self._keys.get(kid)
            if key is None:
                self._refresh(eager=True)
                key = self._keys.get(kid)
            return key

    def current_generation(self) -> int:
        """The generation of the keys, after looking whether they changed."""
        with self._lock:
            self._refresh(eager=False)
            return self.generation

    def kids(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)
