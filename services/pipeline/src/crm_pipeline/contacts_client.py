"""`ContactsPort` over the contacts service's gRPC API.

Lead conversion checks and registers contacts through this client. The
contacts service's refusals come back as this platform's errors: an unknown
contact is `NotFound`, bad input is `ValidationFailed` naming the contacts
field under `contact.` (for instance `contact.channels[0].address`), a stale
or refused write is `RuleViolated`, a call the acting user's roles may not make
is `PermissionDenied`. An unreachable contacts service (or one that does not
accept this service's credentials) is an error of its own
(`ContactsUnavailable`), not a refusal of the client's input.

Every call carries the pipeline's own credentials (`service:pipeline`, role
`platform`, signed with its service key) and, when it is made for a user's
request (a lead conversion), that user's token in `x-crm-acting-user`: the
contacts service checks the call against both, records the user as the actor
and the pipeline as the client (`crm_common.clients.call_metadata`). Before a
conversion calls anything, `authorize` checks the access policy so that a user
who may convert leads but not register contacts is refused before any contact
is written. `find_persons` searches with `ListContacts` (exact email, or phone)
so that a conversion lands on the person who already has the lead's address.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from crm.contacts.v1 import contacts_pb2 as pb
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.auth.access import AccessPolicy
from crm_common.auth.issuer import ServiceCredentials
from crm_common.auth.principal import current_principal
from crm_common.clients import call_metadata, service_channel, service_credentials
from crm_common.errors import (
    FieldError,
    NotFound,
    PermissionDenied,
    RateLimited,
    RuleViolated,
    Unavailable,
    ValidationFailed,
)
from crm_common.settings import Settings
from crm_pipeline.application import CompanyToRegister, PersonToRegister

CONTACTS = "contacts"
#: How many persons sharing a lead's email a refused conversion names at most.
MATCHES_LISTED = 20
KINDS = {"person": pb.CONTACT_KIND_PERSON, "company": pb.CONTACT_KIND_COMPANY}


class ContactsUnavailable(Unavailable):
    """The contacts service did not answer; nothing was converted."""


def _refusal(error: grpc.aio.AioRpcError, kind: str, ident: str) -> Exception:
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(kind.capitalize(), ident)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        fields: list[FieldError] = []
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else []:
            request = error_details_pb2.BadRequest()
            if detail.Unpack(request):
                fields += [
                    FieldError(f"contact.{v.field}", v.description)
                    for v in request.field_violations
                ]
        return ValidationFailed(fields or [FieldError("contact", error.details() or "")])
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
        return RuleViolated(f"the contacts service refused: {error.details()}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"the contacts service refused: {error.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RateLimited(f"the contacts service is busy: {error.details()}", _retry_after(error))
    if code == grpc.StatusCode.UNAUTHENTICATED:
        # This service's credentials (or the user's token passed along) were not
        # accepted: a fault of the platform's set-up, not of the client's input.
        return ContactsUnavailable(
            f"the contacts service did not accept the credentials of the call: {error.details()}"
        )
    return ContactsUnavailable(f"the contacts service failed: {code.name} {error.details()}")


def _retry_after(error: grpc.aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after" and isinstance(value, str):
            try:
                return max(1.0, float(value))
            except ValueError:
                break
    return 1.0


class GrpcContacts:
    """The contacts service at `target` (host:port, or `dns:///name:port` for
    every replica), over one channel (TLS when `settings` configure it), called
    with this service's `credentials`.

    `policy` (the access policy the API's gate enforces) lets `authorize` refuse
    a conversion the acting user may not make before anything is written; without
    one the contacts service alone decides, call by call.
    """

    def __init__(
        self,
        target: str,
        credentials: ServiceCredentials,
        *,
        settings: Settings | None = None,
        policy: AccessPolicy | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.credentials = credentials
        self.settings = settings
        self.policy = policy
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    @classmethod
    def configured(cls, settings: Settings, policy: AccessPolicy | None = None) -> GrpcContacts:
        """The contacts service as the settings name it, with this service's credentials."""
        return cls(
            settings.grpc_target(CONTACTS),
            service_credentials(settings),
            settings=settings,
            policy=policy,
        )

    def _stub(self) -> contacts_pb2_grpc.ContactsServiceStub:
        if self._channel is None:
            self._channel = service_channel(self.target, self.settings)
        # The generated gRPC module has no type stubs (only the messages have).
        return contacts_pb2_grpc.ContactsServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def authorize(self, operations: Iterable[str]) -> None:
        """Refuses (`PermissionDenied`) when the user of the current request may not
        have the contacts service run one of `operations` for them."""
        principal = current_principal.get()
        if self.policy is None or principal is None:
            return
        for operation in operations:
            allowed = self.policy.roles_for(CONTACTS, operation)
            if not principal.has_any(allowed):
                raise PermissionDenied(
                    f"this needs {operation} of the contacts service, which is not allowed "
                    f"to the roles {', '.join(sorted(principal.acting_roles)) or '(none)'}"
                )

    async def _call(self, method: str, request: Any, kind: str, ident: str = "") -> Any:
        try:
            return await getattr(self._stub(), method)(
                request, timeout=self.timeout, metadata=call_metadata(self.credentials)
            )
        except grpc.aio.AioRpcError as error:
            raise _refusal(error, kind, ident) from None

    async def ensure_exists(self, kind: str, contact_id: str) -> None:
        reply = await self._call(
            "GetContact", pb.GetContactRequest(id=contact_id), kind, contact_id
        )
        if reply.contact.kind != KINDS[kind]:
            raise NotFound(kind.capitalize(), contact_id)

    async def find_persons(self, email: str, phone: str) -> list[str]:
        # A handful is enough: one is the match, more are listed for the user to pick.
        reply = await self._call(
            "ListContacts",
            pb.ListContactsRequest(
                email=email, phone=phone, kind=pb.CONTACT_KIND_PERSON, page_size=MATCHES_LISTED
            ),
            "person",
        )
        return [str(contact.id) for contact in reply.contacts]

    async def register_person(self, person: PersonToRegister, request_id: str | None) -> str:
        channels = []
        if person.email:
            channels.append(pb.NewChannelIdentity(channel=pb.CHANNEL_EMAIL, address=person.email))
        if person.phone:
            channels.append(pb.NewChannelIdentity(channel=pb.CHANNEL_PHONE, address=person.phone))
        reply = await self._call(
            "CreatePerson",
            pb.CreatePersonRequest(
                request_id=request_id or "",
                given_name=person.given_name,
                family_name=person.family_name,
                channels=channels,
                lifecycle_stage=pb.LIFECYCLE_STAGE_OPPORTUNITY,
                owner=person.owner,
            ),
            "person",
        )
        return str(reply.result.id)

    async def register_company(self, company: CompanyToRegister, request_id: str | None) -> str:
        reply = await self._call(
            "CreateCompany",
            pb.CreateCompanyRequest(
                request_id=request_id or "",
                name=company.name,
                lifecycle_stage=pb.LIFECYCLE_STAGE_OPPORTUNITY,
                owner=company.owner,
            ),
            "company",
        )
        return str(reply.result.id)

    async def link_person_to_company(
        self, person_id: str, company_id: str, request_id: str | None
    ) -> None:
        await self._call(
            "LinkPersonToCompany",
            pb.LinkPersonToCompanyRequest(
                request_id=request_id or "", person_id=person_id, company_id=company_id
            ),
            "person",
            person_id,
        )
