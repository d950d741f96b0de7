"""Who is calling: the authenticated principal of a request."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

#: The roles of the platform. `platform` is held by the services' own credentials.
ROLES: tuple[str, ...] = (
    "sales",
    "service",
    "marketing",
    "analyst",
    "admin",
    "partner",
    "erp-integration",
    "platform",
)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller, from a verified token (and, for partners, a certificate).

    `subject` is who holds the credential (a user, a partner system, a
    platform service); `client` the application it came through. When a
    platform service calls on behalf of a user, `on_behalf_of` is that user,
    verified from the user's own token, and the audit names the user.
    """

    subject: str
    roles: frozenset[str]
    client: str
    token_id: str | None = None
    on_behalf_of: Principal | None = None
    #: The subject of the client certificate when the connection was mTLS.
    certificate: str | None = None
    claims: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    #: The bearer token itself, so that a platform service acting for this user can
    #: pass it on (`crm_common.clients`); never logged.
    token: str = field(default="", compare=False, repr=False)

    @property
    def user_token(self) -> str:
        """The token of the user this request is for (passed on to other services)."""
        return self.on_behalf_of.token if self.on_behalf_of else self.token

    @property
    def actor(self) -> str:
        """Who the audit trail names: the user a service acts for, else the subject."""
        return self.on_behalf_of.subject if self.on_behalf_of else self.subject

    @property
    def acting_roles(self) -> frozenset[str]:
        """The roles that decide what the request may see and do.

        A platform service acting for a user gets no more than that user may.
        """
        return self.on_behalf_of.roles if self.on_behalf_of else self.roles

    def has_any(self, roles: frozenset[str] | set[str]) -> bool:
        return bool(self.acting_roles & roles)


#: The principal of the request being handled (set by the shared server code).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "crm_principal", default=None
)
