"""The gate every request passes: authenticate, then authorize, then admit.

One `AccessGate` per API process, used by the shared gRPC interceptor and
the shared REST middleware (`crm_common.server`), so every service gets the
same checks by construction. Health, reflection and the OpenAPI documents
are open; everything else needs a valid bearer token whose roles the access
policy lists for the operation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from crm_common.auth.access import AccessPolicy
from crm_common.auth.keys import KeySet
from crm_common.auth.principal import Principal
from crm_common.auth.tokens import TokenPolicy, TokenVerifier
from crm_common.errors import PermissionDenied, RateLimited, Unauthenticated

#: Metadata / header by which a platform service passes on the token of the user it
#: acts for, so that the audit names the user and the user's roles bound the call.
ACTING_USER_KEY = "x-crm-acting-user"

#: gRPC methods that need no token.
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: REST paths that need no token.
OPEN_HTTP_PATHS = frozenset(
    {"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
)


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value."""
    if not authorization:
        raise Unauthenticated("a bearer token is required (Authorization: Bearer <token>)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token.strip()


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: `rate` requests a second, bursts up to `burst`."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) > 10_000:
                    self._buckets.clear()  # bounded memory; a reset only forgives
                bucket = self._buckets[client] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1:
                retry = (1 - bucket.tokens) / self.rate
                raise RateLimited(f"too many requests from client {client!r}", retry_after=retry)
            bucket.tokens -= 1


class AccessGate:
    """Authentication and authorization for the operations of one service."""

    def __init__(
        self,
        service: str,
        verifier: TokenVerifier,
        policy: AccessPolicy,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.service = service
        self.verifier = verifier
        self.policy = policy
        self.limiter = limiter or RateLimiter(rate=0, burst=0)

    @classmethod
    def configure(
        cls,
        service: str,
        *,
        jwks: str,
        issuer: str,
        audience: str,
        policy_file: str | None = None,
        rate: float = 0.0,
        burst: float = 0.0,
        leeway: float = 30.0,
    ) -> AccessGate:
        policy = AccessPolicy.load(policy_file) if policy_file else AccessPolicy.load()
        verifier = TokenVerifier(KeySet(jwks), TokenPolicy(issuer, audience, leeway=leeway))
        return cls(service, verifier, policy, RateLimiter(rate, burst))

    def authenticate(self, authorization: str | None, acting_user: str | None = None) -> Principal:
        principal = self.verifier.verify(bearer_token(authorization))
        if acting_user:
            if "platform" not in principal.roles:
                raise PermissionDenied(
                    f"only the platform's services may act for a user ({ACTING_USER_KEY})"
                )
            user = self.verifier.verify(bearer_token(acting_user))
            if "platform" in user.roles:
                raise Unauthenticated(f"{ACTING_USER_KEY} must be a user's token")
            principal = replace(principal, on_behalf_of=user)
        return principal

    def hidden_fields(self, principal: Principal) -> frozenset[str]:
        """The reply fields of this service the principal may not see (`auth.redaction`)."""
        return self.policy.hidden_fields(principal, self.service)

    def pseudonymised_fields(self, principal: Principal, operation: str) -> frozenset[str]:
        return self.policy.pseudonymised_fields(principal, self.service, operation)

    def admit(
        self, operation: str, authorization: str | None, acting_user: str | None = None
    ) -> Principal:
        """The caller of `operation`, or `Unauthenticated`/`PermissionDenied`/`RateLimited`."""
        principal = self.authenticate(authorization, acting_user)
        self.policy.check(principal, self.service, operation)
        self.limiter.take(principal.client)
        return principal
