"""`ContactsPort` over the contacts service's gRPC API.

Lead conversion checks and registers contacts through this client. The
contacts service's refusals come back as this platform's errors: an unknown
contact is `NotFound`, bad input is `ValidationFailed` naming the contacts
field under `contact.` (for instance `contact.channels[0].address`), a stale
or refused write is `RuleViolated`. An unreachable contacts service is an
error of its own (`ContactsUnavailable`), not a refusal of the client's input.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from crm.contacts.v1 import contacts_pb2 as pb
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.clients import service_channel
from crm_common.errors import FieldError, NotFound, RuleViolated, Unavailable, ValidationFailed
from crm_pipeline.application import CompanyToRegister, PersonToRegister

CLIENT = "crm-pipeline"
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
    return ContactsUnavailable(f"the contacts service failed: {code.name} {error.details()}")


class GrpcContacts:
    """The contacts service at `target` (host:port, or `dns:///name:port` for
    every replica), over one channel."""

    def __init__(self, target: str, timeout: float = 10.0) -> None:
        self.target = target
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> contacts_pb2_grpc.ContactsServiceStub:
        if self._channel is None:
            self._channel = service_channel(self.target)
        # The generated gRPC module has no type stubs (only the messages have).
        return contacts_pb2_grpc.ContactsServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _call(self, method: str, request: Any, kind: str, ident: str = "") -> Any:
        try:
            return await getattr(self._stub(), method)(
                request, timeout=self.timeout, metadata=(("x-crm-client", CLIENT),)
            )
        except grpc.aio.AioRpcError as error:
            raise _refusal(error, kind, ident) from None

    async def ensure_exists(self, kind: str, contact_id: str) -> None:
        reply = await self._call(
            "GetContact", pb.GetContactRequest(id=contact_id), kind, contact_id
        )
        if reply.contact.kind != KINDS[kind]:
            raise NotFound(kind.capitalize(), contact_id)

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
