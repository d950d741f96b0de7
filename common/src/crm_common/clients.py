"""Channels from one service to another's gRPC API.

A gRPC channel keeps its HTTP/2 connections open, so a Kubernetes Service
(one virtual address, balanced per connection) would pin a caller to one
replica of the callee. The Helm chart therefore gives each API a headless
Service and its callers a `dns:///` target: the channel resolves every
ready replica and spreads calls over them (`round_robin`). The servers close
connections after a while (`crm_common.server`), so callers resolve again
and find replicas that were added since. A plain `host:port` or a list
`ipv4:a:p,b:p` works the same way.

After the callee was unreachable, the channel tries again within a second
or so: a call retried once it is back should not meet a backoff left over
from its outage (gRPC's defaults start at 1 s and grow to two minutes). The
minimum is also the timeout of each connection attempt, so it stays well
above a connect within a cluster.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from crm.contacts.v1 import contacts_pb2, contacts_pb2_grpc
from crm_common.auth.gate import ACTING_USER_KEY
from crm_common.auth.issuer import ServiceCredentials, TokenIssuer
from crm_common.auth.principal import current_principal
from crm_common.errors import CrmError, NotFound, PermissionDenied, RateLimited, Unavailable
from crm_common.settings import Settings

CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def service_channel(target: str, settings: Settings | None = None) -> grpc.aio.Channel:
    """A channel to another service of the platform: TLS when `CRM_GRPC_TLS_CA` is set
    (with this service's client certificate when one is configured), otherwise
    plaintext on the cluster's network (or a mesh's mTLS)."""
    if settings is None or not settings.grpc_tls_ca:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    key = cert = None
    if settings.grpc_client_cert:
        key = Path(settings.grpc_client_key).read_bytes()
        cert = Path(settings.grpc_client_cert).read_bytes()
    credentials = grpc.ssl_channel_credentials(
        Path(settings.grpc_tls_ca).read_bytes(), private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def service_credentials(settings: Settings) -> ServiceCredentials:
    """This service's own credentials for calling the others (docs/security.md)."""
    try:
        issuer = TokenIssuer.from_file(
            settings.service_key_file,
            settings.service_key_id,
            settings.auth_issuer,
            settings.auth_audience,
        )
    except FileNotFoundError as error:
        raise RuntimeError(
            f"no service key at {settings.service_key_file} (CRM_SERVICE_KEY_FILE): a service "
            "calling another needs one; in the local stack `deploy/crm identity` creates it"
        ) from error
    return ServiceCredentials(issuer, settings.service)


def call_metadata(credentials: ServiceCredentials) -> tuple[tuple[str, str], ...]:
    """The metadata of a call to another service: this service's own token, and the
    token of the user the current request is for, so the callee checks both and the
    audit names the user."""
    metadata = [("authorization", f"Bearer {credentials.token()}")]
    principal = current_principal.get()
    if principal is not None and principal.user_token and "platform" not in principal.roles:
        metadata.append((ACTING_USER_KEY, f"Bearer {principal.user_token}"))
    elif principal is not None and principal.on_behalf_of is not None:
        metadata.append((ACTING_USER_KEY, f"Bearer {principal.on_behalf_of.token}"))
    return tuple(metadata)


def refusal_of(error: grpc.aio.AioRpcError, service: str) -> CrmError:
    """What another service's refusal means to this service's caller.

    Its verdicts about the caller pass through (not found, invalid, not allowed,
    too many requests); anything else means the other service could not help
    now (`Unavailable`), never this service's own failure.
    """
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{service}: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimited(f"{service}: {details}", retry_after=1.0)
    return Unavailable(f"the {service} service could not answer: {code.name} {details}")


class ContactsLookup:
    """Whether a contact exists, asked of the contacts service with the platform's
    credentials (and the acting user's token, so a partner's grant applies)."""

    def __init__(self, settings: Settings, timeout: float = 5.0) -> None:
        self.settings = settings
        self.target = settings.grpc_target("contacts")
        self.timeout = timeout
        self.credentials = service_credentials(settings)
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> contacts_pb2_grpc.ContactsServiceStub:
        if self._channel is None:
            self._channel = service_channel(self.target, self.settings)
        return contacts_pb2_grpc.ContactsServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def ensure_exists(self, contact_id: str) -> None:
        """Returns if the contact exists and the caller may reach it; raises otherwise."""
        try:
            await self._stub().GetContact(
                contacts_pb2.GetContactRequest(id=contact_id),
                timeout=self.timeout,
                metadata=call_metadata(self.credentials),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise NotFound("Contact", contact_id) from None
            raise refusal_of(error, "contacts") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
