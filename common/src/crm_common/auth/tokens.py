"""Bearer tokens: signed JWTs checked for signature, issuer, audience and time."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from crm_common.auth.keys import KeySet
from crm_common.auth.principal import ROLES, Principal
from crm_common.errors import Unauthenticated

#: The longest token accepted, a bound on what a caller may send.
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True)
class TokenPolicy:
    """What a valid token of this platform looks like."""

    issuer: str
    audience: str
    #: Seconds of clock difference tolerated on exp, nbf and iat.
    leeway: float = 30.0
    #: Tokens valid for longer than this are refused (bounds a stolen token's use).
    max_lifetime: float = 24 * 3600.0


class TokenVerifier:
    """Turns a bearer token into a `Principal`, or refuses it with `Unauthenticated`.

    A client sends the same token with every call until it expires, and checking
    an ES256 signature costs far more than the rest of a call's routing: the
    verified claims of recent tokens are kept (bounded, per key-set generation)
    and only their times are checked again.
    """

    CACHE_SIZE = 10_000

    def __init__(
        self, keys: KeySet, policy: TokenPolicy, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys = keys
        self.policy = policy
        self._clock = clock
        self._verified: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._generation = -1
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        claims = self._cached(token)
        if claims is None:
            claims = self.claims(token)
            with self._lock:
                self._verified[token] = claims
                if len(self._verified) > self.CACHE_SIZE:
                    self._verified.popitem(last=False)
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("the token's 'roles' claim must be a list of role names")
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise Unauthenticated(f"the token names unknown roles: {', '.join(unknown)}")
        client = claims.get("client_id") or claims.get("azp") or "unknown"
        return Principal(
            subject=str(claims["sub"]),
            roles=frozenset(roles),
            client=str(client)[:200],
            token_id=str(claims["jti"]) if "jti" in claims else None,
            claims=claims,
            token=token,
        )

    def _cached(self, token: str) -> dict[str, Any] | None:
        generation = self.keys.current_generation()
        with self._lock:
            if generation != self._generation:
                self._verified.clear()
                self._generation = generation
                return None
            claims = self._verified.get(token)
            if claims is None:
                return None
            self._verified.move_to_end(token)
        now, leeway = self._clock(), self.policy.leeway
        if claims["exp"] + leeway <= now or claims.get("nbf", 0) - leeway > now:
            with self._lock:
                self._verified.pop(token, None)
            return None  # verified again, and refused with the precise reason
        return claims

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of a token."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("the bearer token is missing or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("the bearer token is not a JWT") from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Unauthenticated("the token names no key ('kid')")
        key = self.keys.get(kid)
        if key is None:
            raise Unauthenticated(f"the token is signed with an unknown key {kid[:64]!r}")
        if header.get("alg") != key.algorithm:
            raise Unauthenticated(f"key {kid!r} signs with {key.algorithm} only")
        p = self.policy
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=p.audience,
                issuer=p.issuer,
                leeway=p.leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                "the token comes from an issuer this platform does not trust"
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        # PyJWT checks iat only for type; a token issued in the future is not valid yet.
        now = self._clock()
        issued = claims["iat"]
        if not isinstance(issued, int | float) or issued > now + p.leeway:
            raise Unauthenticated("the token is not valid yet")
        if claims["exp"] - issued > p.max_lifetime:
            raise Unauthenticated("the token's lifetime exceeds what this platform accepts")
        return claims
