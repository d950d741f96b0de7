"""gRPC adapter: crm.contacts.v1.ContactsService over the application layer.

Requests become the plain inputs of `crm_contacts.inputs` (enums as
lower-case words, None when unspecified); results become protobuf messages.
Errors are raised as `CrmError`s; the shared server turns them into statuses
with details (see `crm_common.server`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC
from typing import Any

import grpc

from crm.contacts.v1 import contacts_pb2 as pb
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.commands import WriteOutcome
from crm_common.enums import enum_word
from crm_common.server import GrpcService, grpc_caller
from crm_contacts.application import ContactsService
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    ContactQuery,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_contacts.messages import contact_pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ContactsService"].full_name


def write_result(outcome: WriteOutcome) -> pb.WriteResult:
    return pb.WriteResult(
        id=outcome.id,
        version=outcome.version,
        position=outcome.position,
        replayed=outcome.replayed,
    )


def _custom_fields(fields: Mapping[str, pb.CustomFieldValue]) -> dict[str, CustomFieldInput]:
    return {
        key: CustomFieldInput(type=value.type, value=value.value, currency=value.currency)
        for key, value in fields.items()
    }


def _channels(channels: Iterable[pb.NewChannelIdentity]) -> list[ChannelInput]:
    return [
        ChannelInput(
            channel=enum_word(pb.Channel, c.channel),
            address=c.address,
            preferred=c.preferred,
            consent_status=enum_word(pb.ConsentStatus, c.consent_status),
            consent_source=c.consent_source,
        )
        for c in channels
    ]


class ContactsServicer:
    """Translation only: every rule lives in the domain and the application.

    Implements every rpc of `ContactsService`, so it needs no generated base
    class (whose only job is answering UNIMPLEMENTED, and which is untyped).
    """

    def __init__(self, service: ContactsService) -> None:
        self.service = service

    async def CreatePerson(
        self, request: pb.CreatePersonRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreatePersonResponse:
        caller = grpc_caller(context, request.request_id)
        written = await self.service.create_person(
            caller,
            NewPerson(
                given_name=request.given_name,
                family_name=request.family_name,
                channels=_channels(request.channels),
                lifecycle_stage=enum_word(pb.LifecycleStage, request.lifecycle_stage),
                tags=list(request.tags),
                custom_fields=_custom_fields(request.custom_fields),
                owner=request.owner,
            ),
        )
        return pb.CreatePersonResponse(
            result=write_result(written.outcome), contact=contact_pb(written.contact)
        )

    async def UpdatePerson(
        self, request: pb.UpdatePersonRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdatePersonResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.update_person(
            caller,
            PersonChanges(
                id=request.id,
                fields=frozenset(request.update_mask),
                given_name=request.given_name,
                family_name=request.family_name,
                lifecycle_stage=enum_word(pb.LifecycleStage, request.lifecycle_stage),
                tags=list(request.tags),
                custom_fields=_custom_fields(request.custom_fields),
                remove_custom_fields=list(request.remove_custom_fields),
                owner=request.owner,
                channels=_channels(request.channels),
            ),
        )
        return pb.UpdatePersonResponse(
            result=write_result(written.outcome), contact=contact_pb(written.contact)
        )

    async def CreateCompany(
        self, request: pb.CreateCompanyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateCompanyResponse:
        caller = grpc_caller(context, request.request_id)
        written = await self.service.create_company(
            caller,
            NewCompany(
                name=request.name,
                domain=request.domain,
                industry=request.industry,
                lifecycle_stage=enum_word(pb.LifecycleStage, request.lifecycle_stage),
                tags=list(request.tags),
                custom_fields=_custom_fields(request.custom_fields),
                owner=request.owner,
            ),
        )
        return pb.CreateCompanyResponse(
            result=write_result(written.outcome), contact=contact_pb(written.contact)
        )

    async def UpdateCompany(
        self, request: pb.UpdateCompanyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateCompanyResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.update_company(
            caller,
            CompanyChanges(
                id=request.id,
                fields=frozenset(request.update_mask),
                name=request.name,
                domain=request.domain,
                industry=request.industry,
                lifecycle_stage=enum_word(pb.LifecycleStage, request.lifecycle_stage),
                tags=list(request.tags),
                custom_fields=_custom_fields(request.custom_fields),
                remove_custom_fields=list(request.remove_custom_fields),
                owner=request.owner,
            ),
        )
        return pb.UpdateCompanyResponse(
            result=write_result(written.outcome), contact=contact_pb(written.contact)
        )

    async def LinkPersonToCompany(
        self, request: pb.LinkPersonToCompanyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LinkPersonToCompanyResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.link_person_to_company(
            caller,
            CompanyLink(
                person_id=request.person_id, company_id=request.company_id, role=request.role
            ),
        )
        return pb.LinkPersonToCompanyResponse(result=write_result(written.outcome))

    async def UnlinkPersonFromCompany(
        self,
        request: pb.UnlinkPersonFromCompanyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.UnlinkPersonFromCompanyResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.unlink_person_from_company(
            caller, CompanyUnlink(person_id=request.person_id, company_id=request.company_id)
        )
        return pb.UnlinkPersonFromCompanyResponse(result=write_result(written.outcome))

    async def RecordConsent(
        self, request: pb.RecordConsentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecordConsentResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.record_consent(
            caller,
            ConsentInput(
                contact_id=request.contact_id,
                channel=enum_word(pb.Channel, request.channel),
                address=request.address,
                status=enum_word(pb.ConsentStatus, request.status),
                source=request.source,
            ),
        )
        return pb.RecordConsentResponse(result=write_result(written.outcome))

    async def LogInteraction(
        self, request: pb.LogInteractionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LogInteractionResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        occurred_at = (
            request.occurred_at.ToDatetime(tzinfo=UTC) if request.HasField("occurred_at") else None
        )
        written = await self.service.log_interaction(
            caller,
            InteractionInput(
                contact_id=request.contact_id,
                kind=enum_word(pb.InteractionKind, request.kind),
                direction=enum_word(pb.Direction, request.direction),
                channel=enum_word(pb.Channel, request.channel),
                summary=request.summary,
                occurred_at=occurred_at,
                owner=request.owner,
            ),
        )
        return pb.LogInteractionResponse(
            result=write_result(written.outcome),
            interaction_id=written.outcome.extra.get("interaction_id", ""),
        )

    async def GetContact(
        self, request: pb.GetContactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetContactResponse:
        view = await self.service.get_contact(request.id)
        return pb.GetContactResponse(contact=contact_pb(view))

    async def ListContacts(
        self, request: pb.ListContactsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListContactsResponse:
        page = await self.service.list_contacts(
            ContactQuery(
                query=request.query,
                email=request.email,
                phone=request.phone,
                tag=request.tag,
                kind=enum_word(pb.ContactKind, request.kind),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListContactsResponse(
            contacts=[contact_pb(view) for view in page.contacts],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )


def grpc_service(service: ContactsService) -> GrpcService:
    """The servicer as `crm_common.server.serve()` registers it."""
    return GrpcService(
        ContactsServicer(service),
        contacts_pb2_grpc.add_ContactsServiceServicer_to_server,
        SERVICE_NAME,
    )
