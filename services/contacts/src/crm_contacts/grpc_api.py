"""gRPC adapter: crm.contacts.v1.ContactsService over the application layer.

Requests become the plain inputs of `crm_contacts.inputs` (enums as
lower-case words, None when unspecified); results become protobuf messages.
Every method is behind the access gate (`crm_common.server.serve()` wraps each one);
replies clear the fields the caller's roles may not see (`fields.contacts` of
the policy) and give analysts pseudonyms for the personal fields of a search.
Who may reach which contact (partners) is the application's rule.

Errors are raised as `CrmError`s; the shared server turns them into statuses
with details (see `crm_common.server`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import grpc

from crm.contacts.v1 import contacts_pb2 as pb
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.auth.gate import AccessGate
from crm_common.auth.redaction import pseudonymise_message, redact_message
from crm_common.commands import Caller, WriteOutcome
from crm_common.enums import enum_number, enum_word
from crm_common.errors import Unauthenticated
from crm_common.privacy.export import export_json
from crm_common.server import GrpcService, grpc_caller
from crm_common.timestamps import datetime_of
from crm_contacts.application import ContactsService
from crm_contacts.definitions import DefinitionsView, FieldDefinitionInput, FieldRevision
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    ContactQuery,
    CustomFieldInput,
    InteractionInput,
    InteractionQuery,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_contacts.messages import contact_pb, interaction_pb, possible_duplicate_pb
from crm_contacts.views import ContactView

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ContactsService"].full_name

R = TypeVar("R")


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

    def __init__(self, service: ContactsService, gate: AccessGate, pseudonym_key: bytes) -> None:
        self.service = service
        self.gate = gate
        self.pseudonym_key = pseudonym_key

    def _contact(self, caller: Caller, view: ContactView, operation: str = "") -> pb.Contact:
        """The contact without the fields the caller may not see (cleared); with
        `operation`, the personal fields it pseudonymises for the caller as pseudonyms."""
        principal = caller.principal
        if principal is None:  # the gate admitted every call; never guess
            raise Unauthenticated("the request was not authenticated")
        message = contact_pb(view)
        redact_message(message, self.gate.hidden_fields(principal))
        if operation:
            paths = self.gate.pseudonymised_fields(principal, operation)
            pseudonymise_message(message, paths, self.pseudonym_key)
        return message

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
            allow_duplicate=request.allow_duplicate,
        )
        return pb.CreatePersonResponse(
            result=write_result(written.outcome),
            contact=self._contact(caller, written.contact),
            possible_duplicates=[possible_duplicate_pb(d) for d in written.possible_duplicates],
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
            result=write_result(written.outcome), contact=self._contact(caller, written.contact)
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
            result=write_result(written.outcome), contact=self._contact(caller, written.contact)
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
            result=write_result(written.outcome), contact=self._contact(caller, written.contact)
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
            datetime_of(request.occurred_at, "occurred_at")
            if request.HasField("occurred_at")
            else None
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

    async def MergeContacts(
        self, request: pb.MergeContactsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MergeContactsResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.merge_contacts(
            caller, request.survivor_id, list(request.merged_ids), dict(request.choices)
        )
        return pb.MergeContactsResponse(
            result=write_result(written.outcome),
            contact=self._contact(caller, written.contact),
            merge_id=written.outcome.extra.get("merge_id", ""),
        )

    async def UndoMerge(
        self, request: pb.UndoMergeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UndoMergeResponse:
        caller = grpc_caller(context, request.request_id, request.expected_version)
        written = await self.service.undo_merge(caller, request.survivor_id, request.merge_id)
        return pb.UndoMergeResponse(
            result=write_result(written.outcome), contact=self._contact(caller, written.contact)
        )

    async def ErasePerson(
        self, request: pb.ErasePersonRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ErasePersonResponse:
        caller = grpc_caller(context, request.request_id)
        written = await self.service.erase_person(caller, request.id, request.reference)
        return pb.ErasePersonResponse(
            result=write_result(written.outcome),
            already_erased=written.outcome.extra.get("already_erased") == "true",
            contact=self._contact(caller, written.contact),
        )

    async def ExportPerson(
        self, request: pb.ExportPersonRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExportPersonResponse:
        caller = grpc_caller(context)
        exported = await self.service.export_person(caller, request.id)
        return pb.ExportPersonResponse(
            document_json=export_json(exported.document), services=exported.services
        )

    async def GetContact(
        self, request: pb.GetContactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetContactResponse:
        caller = grpc_caller(context)
        view = await self.service.get_contact(request.id, caller)
        return pb.GetContactResponse(contact=self._contact(caller, view, "GetContact"))

    async def ListInteractions(
        self, request: pb.ListInteractionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListInteractionsResponse:
        caller = grpc_caller(context)
        page = await self.service.list_interactions(
            InteractionQuery(
                contact_id=request.contact_id,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
            caller,
        )
        return pb.ListInteractionsResponse(
            interactions=[interaction_pb(i) for i in page.interactions],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
            redirected_from=page.redirected_from or "",
            contact_id=page.contact_id,
        )

    async def ListContacts(
        self, request: pb.ListContactsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListContactsResponse:
        caller = grpc_caller(context)
        page = await self.service.list_contacts(
            ContactQuery(
                query=request.query,
                email=request.email,
                phone=request.phone,
                tag=request.tag,
                kind=enum_word(pb.ContactKind, request.kind),
                page_size=request.page_size,
                page_token=request.page_token,
            ),
            caller,
        )
        return pb.ListContactsResponse(
            contacts=[self._contact(caller, view, "ListContacts") for view in page.contacts],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    # -- custom-field definitions --

    async def ListCustomFields(
        self, request: pb.ListCustomFieldsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListCustomFieldsResponse:
        listed = await self.service.fields.listed(
            enum_word(pb.ContactKind, request.kind) or "", request.include_retired
        )
        return pb.ListCustomFieldsResponse(fields=custom_fields_pb(listed))

    async def DefineCustomField(
        self, request: pb.DefineCustomFieldRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DefineCustomFieldResponse:
        given = request.definition
        written = await self.service.fields.define(
            grpc_caller(context, request.request_id),
            enum_word(pb.ContactKind, request.kind) or "",
            FieldDefinitionInput(
                key=given.key,
                label=given.label,
                type=given.type,
                required=given.required,
                unique=given.unique,
                options=tuple(given.options),
                currency=given.currency,
            ),
        )
        return pb.DefineCustomFieldResponse(
            result=write_result(written.outcome), fields=custom_fields_pb(written.definitions)
        )

    async def ReviseCustomField(
        self, request: pb.ReviseCustomFieldRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReviseCustomFieldResponse:
        written = await self.service.fields.revise(
            grpc_caller(context, request.request_id),
            enum_word(pb.ContactKind, request.kind) or "",
            FieldRevision(
                key=request.key,
                label=request.label if request.HasField("label") else None,
                required=request.required if request.HasField("required") else None,
                unique=request.unique if request.HasField("unique") else None,
                options=tuple(request.options) if request.set_options else None,
            ),
        )
        return pb.ReviseCustomFieldResponse(
            result=write_result(written.outcome), fields=custom_fields_pb(written.definitions)
        )

    async def RetireCustomField(
        self, request: pb.RetireCustomFieldRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RetireCustomFieldResponse:
        written = await self.service.fields.retire(
            grpc_caller(context, request.request_id),
            enum_word(pb.ContactKind, request.kind) or "",
            request.key,
        )
        return pb.RetireCustomFieldResponse(
            result=write_result(written.outcome), fields=custom_fields_pb(written.definitions)
        )

    async def RestoreCustomField(
        self, request: pb.RestoreCustomFieldRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RestoreCustomFieldResponse:
        written = await self.service.fields.restore(
            grpc_caller(context, request.request_id),
            enum_word(pb.ContactKind, request.kind) or "",
            request.key,
        )
        return pb.RestoreCustomFieldResponse(
            result=write_result(written.outcome), fields=custom_fields_pb(written.definitions)
        )


def custom_fields_pb(view: DefinitionsView) -> pb.CustomFields:
    return pb.CustomFields(
        kind=enum_number(pb.ContactKind, str(view.kind)),
        version=view.version,
        definitions=[
            pb.CustomFieldDefinition(
                key=d.key,
                label=d.label,
                type=str(d.type),
                required=d.required,
                unique=d.unique,
                options=list(d.options),
                currency=d.currency,
                retired=d.retired,
                revision=d.revision,
            )
            for d in view.definitions
        ],
    )


def grpc_service(service: ContactsService, gate: AccessGate, pseudonym_key: bytes) -> GrpcService:
    """The servicer as `crm_common.server.serve()` registers it (behind `gate`, whose
    policy also decides the fields of its replies)."""
    return GrpcService(
        ContactsServicer(service, gate, pseudonym_key),
        contacts_pb2_grpc.add_ContactsServiceServicer_to_server,
        SERVICE_NAME,
    )
