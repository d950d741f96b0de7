"""REST adapter for the frontends: the contacts API as JSON.

Enums are lower-case words (`"email"`, `"customer"`), times ISO-8601 UTC.
Every write answers `{id, version, position, replayed, contact}`; `position`
can be handed to the 360 view (`wait_for=contacts:<position>`) to read one's
own write. `Idempotency-Key` makes a write safe to retry (a retry answers the
first outcome, 200 instead of 201, and writes nothing); `If-Match` carries the
version the client last saw (409 when it is stale).

Every route is behind the access gate (`crm_common.server.service_app`): a
bearer token whose roles `access.yaml` lists for the route's `operation_id`
(the gRPC method's name). Replies leave out the fields the caller's roles may
not see (`fields.contacts` of the policy) and give analysts pseudonyms for the
personal fields of a search; who may reach which contact (partners) is the
application's rule.

Errors are raised as `CrmError`s; the handlers `service_app` installs turn
them into 401 / 403 / 422 / 404 / 409.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from crm_common.auth.gate import AccessGate
from crm_common.auth.redaction import pseudonymise, redact
from crm_common.commands import Caller, WriteOutcome
from crm_common.errors import Unauthenticated, ValidationFailed
from crm_common.privacy.export import export_json
from crm_common.server import (
    IdempotencyKey,
    IfMatch,
    expected_version,
    http_caller,
    service_app,
)
from crm_contacts.application import (
    DEFAULT_INTERACTION_PAGE,
    MAX_INTERACTION_PAGE,
    ContactsService,
)
from crm_contacts.definitions import (
    DefinitionsView,
    DefinitionsWrite,
    FieldDefinitionInput,
    FieldRevision,
)
from crm_contacts.directory import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from crm_contacts.domain import (
    Channel,
    ConsentStatus,
    ContactKind,
    Direction,
    FieldType,
    InteractionKind,
    LifecycleStage,
    PersonProfile,
)
from crm_contacts.domain import (
    ChannelIdentity as ChannelIdentityValue,
)
from crm_contacts.domain import (
    Interaction as InteractionValue,
)
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
from crm_contacts.rest_duplicates import include_duplicates
from crm_contacts.rest_imports import include_imports
from crm_contacts.views import RECENT_INTERACTIONS, ContactPage, ContactView, ContactWrite


def _words(kind: type[StrEnum], *, nullable: bool = False) -> dict[str, Any]:
    words: list[str | None] = [m.value for m in kind]
    return {"enum": [*words, None] if nullable else words}


def _word_field(
    kind: type[StrEnum], description: str, *, nullable: bool | None = None, **kw: Any
) -> Any:
    """A field holding one of an enum's lower-case words (or null: by default when the
    field's default is null)."""
    choices = ", ".join(m.value for m in kind)
    if nullable is None:
        nullable = "default" in kw and kw["default"] is None
    return Field(
        description=f"{description} One of: {choices}.",
        json_schema_extra=_words(kind, nullable=nullable),
        **kw,
    )


# -- request bodies ---------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CustomFieldValue(_Body):
    """A typed custom field value."""

    type: str = _word_field(FieldType, "The field's type.")
    value: str = Field(
        "",
        description="Canonical text: a decimal for number and money (`1234.50`), "
        "`YYYY-MM-DD` for date.",
    )
    currency: str = Field("", description="ISO 4217 code; required for money, empty otherwise.")


class NewChannelIdentity(_Body):
    channel: str = _word_field(Channel, "The channel.")
    address: str = Field(
        description="Email address, phone number (international format, kept in E.164) "
        "or the handle on the channel."
    )
    preferred: bool = Field(False, description="The preferred identity of its channel.")
    consent_status: str | None = _word_field(
        ConsentStatus, "Consent captured together with the identity (optional).", default=None
    )
    consent_source: str = Field(
        "", description="Where that consent came from, e.g. `web-form:newsletter`."
    )


_TAGS_HELP = "Tags; kept in lower case, sorted, without duplicates."
_FIELDS_HELP = "Custom fields by key (`^[a-z][a-z0-9_]{0,63}$`)."


class PersonCreate(_Body):
    given_name: str = Field("", description="Given name; a person needs a given or family name.")
    family_name: str = Field("", description="Family name.")
    channels: list[NewChannelIdentity] = Field(
        default_factory=list, description="Channel identities, each with optional consent."
    )
    lifecycle_stage: str | None = _word_field(
        LifecycleStage, "Lifecycle stage; a new contact starts as a lead.", default=None
    )
    tags: list[str] = Field(default_factory=list, description=_TAGS_HELP)
    custom_fields: dict[str, CustomFieldValue] = Field(
        default_factory=dict, description=_FIELDS_HELP
    )
    owner: str = Field("", description="The user who owns the contact.")
    allow_duplicate: bool = Field(
        False,
        description="Create it even though it looks like existing contacts (with "
        "CRM_CONTACTS_DUPLICATES_ON_CREATE=refuse such a create is refused with 409).",
    )


class PersonPatch(_Body):
    """Only the fields present in the body change."""

    given_name: str | None = Field(None, description="New given name.")
    family_name: str | None = Field(None, description="New family name.")
    lifecycle_stage: str | None = _word_field(
        LifecycleStage,
        "New lifecycle stage: forward through the funnel, or churned (a customer or advocate) "
        "or lost (before becoming a customer); back from churned or lost to any stage.",
        default=None,
    )
    tags: list[str] | None = Field(None, description="Replaces the tags. " + _TAGS_HELP)
    custom_fields: dict[str, CustomFieldValue] | None = Field(
        None, description="Sets these custom fields; the other keys stay."
    )
    remove_custom_fields: list[str] | None = Field(
        None, description="Removes these custom field keys."
    )
    owner: str | None = Field(None, description="New owner.")
    channels: list[NewChannelIdentity] | None = Field(
        None,
        description="Replaces the channel identities; an identity kept keeps its consent "
        "unless a new one is given.",
    )


class CompanyCreate(_Body):
    name: str = Field(description="The company's name.")
    domain: str = Field("", description="Web domain, e.g. `example.com`.")
    industry: str = Field("", description="Industry.")
    lifecycle_stage: str | None = _word_field(
        LifecycleStage, "Lifecycle stage; a new contact starts as a lead.", default=None
    )
    tags: list[str] = Field(default_factory=list, description=_TAGS_HELP)
    custom_fields: dict[str, CustomFieldValue] = Field(
        default_factory=dict, description=_FIELDS_HELP
    )
    owner: str = Field("", description="The user who owns the contact.")


class CompanyPatch(_Body):
    """Only the fields present in the body change."""

    name: str | None = Field(None, description="New name (the linked persons see it).")
    domain: str | None = Field(None, description="New web domain.")
    industry: str | None = Field(None, description="New industry.")
    lifecycle_stage: str | None = _word_field(
        LifecycleStage, "New lifecycle stage (see PATCH /persons).", default=None
    )
    tags: list[str] | None = Field(None, description="Replaces the tags. " + _TAGS_HELP)
    custom_fields: dict[str, CustomFieldValue] | None = Field(
        None, description="Sets these custom fields; the other keys stay."
    )
    remove_custom_fields: list[str] | None = Field(
        None, description="Removes these custom field keys."
    )
    owner: str | None = Field(None, description="New owner.")


class CompanyRole(_Body):
    role: str = Field("", description="The person's role at the company, e.g. `CTO`.")


class ConsentCreate(_Body):
    channel: str = _word_field(Channel, "The channel of the identity.")
    address: str = Field(description="The identity's address on that channel.")
    status: str = _word_field(ConsentStatus, "The consent given or withdrawn.")
    source: str = Field("", description="Where it came from, e.g. `call:agent-7`.")


class MergeCreate(_Body):
    merged_ids: list[str] = Field(
        description="The one or two contacts (of the survivor's kind) folded into the survivor."
    )
    choices: dict[str, str] = Field(
        default_factory=dict,
        description="Per field, the id of the contact whose value the survivor keeps "
        "(keys: given_name, family_name, name, domain, industry, owner, lifecycle_stage, "
        "`custom_fields.<key>`); a field not named keeps the survivor's value, or the "
        "first one given when the survivor has none.",
    )


class EraseCreate(_Body):
    reference: str = Field(
        "",
        max_length=1000,
        description="The data subject request the erase fulfils (e.g. `DSR-2026-0042`; at "
        "most 200 characters, no control characters). It stays readable: never the "
        "person's own words.",
    )


class InteractionCreate(_Body):
    kind: str = _word_field(InteractionKind, "What kind of interaction.")
    direction: str | None = _word_field(Direction, "Who reached out.", default=None)
    channel: str | None = _word_field(Channel, "Over which channel.", default=None)
    summary: str = Field(description="What it was about.")
    occurred_at: datetime | None = Field(
        None, description="When it happened (with a time zone); default: now."
    )
    owner: str = Field("", description="The user who had the interaction.")


# -- replies ----------------------------------------------------------------------------


class Consent(BaseModel):
    status: str = _word_field(ConsentStatus, "Granted or withdrawn.")
    source: str = Field(description="Where the consent came from.")
    recorded_at: datetime = Field(description="When it was recorded.")


class ChannelIdentity(BaseModel):
    channel: str = _word_field(Channel, "The channel.")
    address: str = Field(description="Email in lower case, phone numbers in E.164, or a handle.")
    preferred: bool
    consent: Consent | None = Field(description="The latest consent; null when none recorded.")


class Affiliation(BaseModel):
    company_id: str
    company_name: str = Field(description="The company's name when the link was made.")
    role: str


class Interaction(BaseModel):
    interaction_id: str
    kind: str = _word_field(InteractionKind, "What kind of interaction.")
    direction: str | None = _word_field(
        Direction, "Who reached out; null if not given.", nullable=True
    )
    channel: str | None = _word_field(Channel, "The channel; null if not given.", nullable=True)
    summary: str
    occurred_at: datetime
    owner: str


class Contact(BaseModel):
    """A person or a company."""

    id: str
    kind: str = _word_field(ContactKind, "Person or company.")
    version: int = Field(description="Changes with every write; send it back in If-Match.")
    name: str = Field(description="Display name: given and family name, or the company's name.")
    given_name: str | None = Field(description="Persons only (null for a company).")
    family_name: str | None = Field(description="Persons only (null for a company).")
    domain: str | None = Field(description="Companies only (null for a person).")
    industry: str | None = Field(description="Companies only (null for a person).")
    lifecycle_stage: str = _word_field(LifecycleStage, "Lifecycle stage.")
    tags: list[str]
    custom_fields: dict[str, CustomFieldValue] = Field(
        default_factory=dict,
        description="Left out for the roles that may not see custom fields (docs/security.md).",
    )
    owner: str
    channels: list[ChannelIdentity] = Field(description="Persons only (empty for a company).")
    affiliations: list[Affiliation] = Field(
        description="The companies a person belongs to (empty for a company)."
    )
    interactions: list[Interaction] = Field(
        default_factory=list,
        description=f"The most recent {RECENT_INTERACTIONS} interactions, newest first (empty "
        "in search results); `GET /contacts/{id}/interactions` pages through all of them. "
        "Left out for the roles that may not see them (docs/security.md).",
    )
    interactions_total: int = Field(
        0,
        description="How many interactions the contact has (0 in search results); left out "
        "with `interactions`.",
    )
    created_at: datetime
    updated_at: datetime
    redirected_from: str | None = Field(
        None,
        description="Set when the id asked for was merged into this contact: the id asked "
        "for (this contact is its survivor).",
    )
    erased: bool = Field(
        False,
        description="The person was erased (`POST /contacts/{id}/erase`): every personal "
        'value reads "[erased]".',
    )


class WriteReply(BaseModel):
    id: str = Field(description="The contact written.")
    version: int = Field(description="Its version after the write.")
    position: int = Field(
        description="Position of the write in the contacts event log; "
        "`wait_for=contacts:<position>` on the 360 view reads it."
    )
    replayed: bool = Field(description="True when this answers a retried Idempotency-Key.")
    contact: Contact = Field(description="The contact after the write (now, for a replay).")


class DuplicateReasonReply(BaseModel):
    rule: str = Field(description="One of: email, phone, name_domain.")
    score: float
    detail: str = Field(description='What matched, e.g. "same email ada@example.com".')


class PossibleDuplicateReply(BaseModel):
    contact_id: str
    score: float = Field(description="0..1: the best score of the reasons.")
    reasons: list[DuplicateReasonReply]


class PersonCreatedReply(WriteReply):
    possible_duplicates: list[PossibleDuplicateReply] = Field(
        default_factory=list,
        description="Existing contacts that look like this one, best first "
        "(CRM_CONTACTS_DUPLICATES_ON_CREATE: warn, or refuse below its threshold).",
    )


class MergeReply(WriteReply):
    merge_id: str = Field(description="The merge's id, for an undo.")


class EraseReply(WriteReply):
    already_erased: bool = Field(
        description="True when the person had been erased before: nothing new was recorded "
        "(their keys were destroyed again, which changes nothing)."
    )


class InteractionReply(WriteReply):
    interaction_id: str = Field(description="The id of the logged interaction.")


class InteractionList(BaseModel):
    contact_id: str = Field(description="The contact (the survivor of a merged id).")
    interactions: list[Interaction] = Field(
        description="Newest first by occurrence; equal times, the later logged first."
    )
    next_page_token: str = Field(description="Pass as page_token for the next page; empty at end.")
    total_size: int = Field(description="How many interactions the contact has.")
    redirected_from: str | None = Field(
        None, description="Set when the id asked for was merged into `contact_id`: that id."
    )


class ContactList(BaseModel):
    contacts: list[Contact]
    next_page_token: str = Field(description="Pass as page_token for the next page; empty at end.")
    total_size: int = Field(description="How many contacts match in all.")


class CustomFieldDefinitionBody(_Body):
    """A new custom field of persons or of companies."""

    key: str = Field(description="`^[a-z][a-z0-9_]{0,63}$`; the key values are stored under.")
    label: str = Field(description="What people see, 1 to 100 characters.")
    type: str = _word_field(FieldType, "The field's type; it never changes.")
    required: bool = False
    unique: bool = False
    options: list[str] = Field(
        default_factory=list, description="The choices of a choice or multi_choice field."
    )
    currency: str = Field("", description="A money field's one currency (ISO 4217), if any.")


class CustomFieldRevisionBody(_Body):
    """What changes; an omitted member stays as it is."""

    label: str | None = None
    required: bool | None = None
    unique: bool | None = None
    options: list[str] | None = Field(
        None, description="Every option after the change: options may be added, not taken away."
    )


class CustomFieldDefinitionReply(BaseModel):
    key: str
    label: str
    type: str
    required: bool
    unique: bool
    options: list[str]
    currency: str
    retired: bool
    revision: int = Field(description="1 when defined, one more on each change.")


class CustomFieldsReply(BaseModel):
    kind: str
    version: int = Field(description="The definitions' version (0: none ever defined).")
    definitions: list[CustomFieldDefinitionReply]


class CustomFieldsWriteReply(BaseModel):
    id: str = Field(description="The definitions' id (one per kind of contact).")
    version: int
    position: int
    replayed: bool
    fields: CustomFieldsReply


KindPath = Annotated[str, Path(description="`person` or `company`.")]


def custom_fields_json(view: DefinitionsView) -> CustomFieldsReply:
    return CustomFieldsReply(
        kind=str(view.kind),
        version=view.version,
        definitions=[
            CustomFieldDefinitionReply(
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


def custom_fields_write(written: DefinitionsWrite) -> CustomFieldsWriteReply:
    outcome = written.outcome
    return CustomFieldsWriteReply(
        id=outcome.id,
        version=outcome.version,
        position=outcome.position,
        replayed=outcome.replayed,
        fields=custom_fields_json(written.definitions),
    )


# -- conversions ------------------------------------------------------------------------


def _channel_json(identity: ChannelIdentityValue) -> ChannelIdentity:
    consent = identity.consent
    return ChannelIdentity(
        channel=str(identity.channel),
        address=identity.address,
        preferred=identity.preferred,
        consent=None
        if consent is None
        else Consent(
            status=str(consent.status), source=consent.source, recorded_at=consent.recorded_at
        ),
    )


def _interaction_json(interaction: InteractionValue) -> Interaction:
    return Interaction(
        interaction_id=interaction.interaction_id,
        kind=str(interaction.kind),
        direction=None if interaction.direction is None else str(interaction.direction),
        channel=None if interaction.channel is None else str(interaction.channel),
        summary=interaction.summary,
        occurred_at=interaction.occurred_at,
        owner=interaction.owner,
    )


def contact_json(view: ContactView) -> Contact:
    profile = view.profile
    names: dict[str, str | None]
    if isinstance(profile, PersonProfile):
        names = {
            "given_name": profile.given_name,
            "family_name": profile.family_name,
            "domain": None,
            "industry": None,
        }
        channels = [_channel_json(c) for c in profile.channels]
    else:
        names = {
            "given_name": None,
            "family_name": None,
            "domain": profile.domain,
            "industry": profile.industry,
        }
        channels = []
    return Contact(
        id=view.id,
        kind=str(view.kind),
        version=view.version,
        name=view.display_name,
        **names,
        lifecycle_stage=str(profile.lifecycle_stage),
        tags=list(profile.tags),
        custom_fields={
            key: CustomFieldValue(type=str(v.type), value=v.value, currency=v.currency)
            for key, v in profile.custom_fields.items()
        },
        owner=profile.owner,
        channels=channels,
        affiliations=[
            Affiliation(company_id=a.company_id, company_name=a.company_name, role=a.role)
            for a in view.affiliations
        ],
        interactions=[_interaction_json(i) for i in view.interactions],
        interactions_total=view.interactions_total,
        created_at=view.created_at,
        updated_at=view.updated_at,
        redirected_from=view.redirected_from,
        erased=view.erased,
    )


def _reply_fields(outcome: WriteOutcome, view: ContactView) -> dict[str, Any]:
    return {
        "id": outcome.id,
        "version": outcome.version,
        "position": outcome.position,
        "replayed": outcome.replayed,
        "contact": contact_json(view),
    }


def write_reply(written: ContactWrite) -> WriteReply:
    return WriteReply(**_reply_fields(written.outcome, written.contact))


def _custom_fields(fields: Mapping[str, CustomFieldValue] | None) -> dict[str, CustomFieldInput]:
    return {
        key: CustomFieldInput(type=v.type, value=v.value, currency=v.currency)
        for key, v in (fields or {}).items()
    }


def _channels(channels: Sequence[NewChannelIdentity] | None) -> list[ChannelInput]:
    return [
        ChannelInput(
            channel=c.channel,
            address=c.address,
            preferred=c.preferred,
            consent_status=c.consent_status,
            consent_source=c.consent_source,
        )
        for c in channels or ()
    ]


def _mask(body: BaseModel) -> frozenset[str]:
    """The fields a PATCH body names; removing custom fields is a custom_fields change."""
    fields = set(body.model_fields_set)
    if "remove_custom_fields" in fields:
        fields.discard("remove_custom_fields")
        fields.add("custom_fields")
    if not fields:
        names = ", ".join(type(body).model_fields)
        raise ValidationFailed.of("body", f"names no field to change; any of: {names}")
    return frozenset(fields)


def _created(outcome: WriteOutcome) -> int:
    return 200 if outcome.replayed else 201


# -- the application ------------------------------------------------------------------


DESCRIPTION = """People and companies, their relations, consent per channel identity and
the interaction log.

Every route needs `Authorization: Bearer <token>`; the roles allowed per
operation (the `operationId`s) and the fields each role sees are in
docs/security.md. The user the token names (and its client) is stored with
the events. Partners reach only the contacts carrying their tag.

Every write answers `{id, version, position, replayed, contact}`. Send
`Idempotency-Key` to make a write safe to retry (a key is the caller's own; the
same key with a different request is refused with 422) and `If-Match` with the
version you last saw to refuse lost updates (409).

Errors: 401 without a valid token, 403 when the caller's roles or grant do not
allow it, 422 `{"detail": [{"field", "message"}]}` for invalid input, 404 for an
unknown contact, 409 for a stale version or a change a business rule refuses.
"""


def create_app(service: ContactsService, gate: AccessGate, *, pseudonym_key: bytes) -> FastAPI:
    """The REST app behind `gate`; `pseudonym_key` keys the pseudonyms analysts see."""
    app = service_app(gate, title="CRM contacts", version="1", description=DESCRIPTION)

    def shown(
        caller: Caller,
        reply: BaseModel,
        *,
        contacts_at: str = "",
        status_code: int = 200,
        operation: str = "",
    ) -> JSONResponse:
        """The reply without what the caller may not see; with `operation`, the
        personal fields that operation pseudonymises for the caller as pseudonyms.
        The policy's paths are within a contact, found at `contacts_at`."""
        principal = caller.principal
        if principal is None:  # the gate admitted every request; never guess
            raise Unauthenticated("the request was not authenticated")
        prefix = f"{contacts_at}." if contacts_at else ""
        document = reply.model_dump(mode="json")
        redact(document, [prefix + path for path in gate.hidden_fields(principal)])
        if operation:
            paths = gate.pseudonymised_fields(principal, operation)
            pseudonymise(document, [prefix + path for path in paths], pseudonym_key)
        return JSONResponse(document, status_code=status_code)

    @app.post(
        "/persons",
        operation_id="CreatePerson",
        status_code=201,
        response_model=PersonCreatedReply,
        tags=["persons"],
        summary="Register a person",
        responses={200: {"description": "A replay of an earlier Idempotency-Key"}},
    )
    async def create_person(
        request: Request,
        body: PersonCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key)
        written = await service.create_person(
            caller,
            NewPerson(
                given_name=body.given_name,
                family_name=body.family_name,
                channels=_channels(body.channels),
                lifecycle_stage=body.lifecycle_stage,
                tags=body.tags,
                custom_fields=_custom_fields(body.custom_fields),
                owner=body.owner,
            ),
            allow_duplicate=body.allow_duplicate,
        )
        reply = PersonCreatedReply(
            **_reply_fields(written.outcome, written.contact),
            possible_duplicates=[
                PossibleDuplicateReply.model_validate(d.to_dict())
                for d in written.possible_duplicates
            ],
        )
        return shown(caller, reply, contacts_at="contact", status_code=_created(written.outcome))

    @app.patch(
        "/persons/{person_id}",
        operation_id="UpdatePerson",
        response_model=WriteReply,
        tags=["persons"],
        summary="Change some of a person's fields",
    )
    async def update_person(
        request: Request,
        person_id: str,
        body: PersonPatch,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.update_person(
            caller,
            PersonChanges(
                id=person_id,
                fields=_mask(body),
                given_name=body.given_name or "",
                family_name=body.family_name or "",
                lifecycle_stage=body.lifecycle_stage,
                tags=body.tags or [],
                custom_fields=_custom_fields(body.custom_fields),
                remove_custom_fields=body.remove_custom_fields or [],
                owner=body.owner or "",
                channels=_channels(body.channels),
            ),
        )
        return shown(caller, write_reply(written), contacts_at="contact")

    @app.post(
        "/companies",
        operation_id="CreateCompany",
        status_code=201,
        response_model=WriteReply,
        tags=["companies"],
        summary="Register a company",
        responses={200: {"description": "A replay of an earlier Idempotency-Key"}},
    )
    async def create_company(
        request: Request,
        body: CompanyCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key)
        written = await service.create_company(
            caller,
            NewCompany(
                name=body.name,
                domain=body.domain,
                industry=body.industry,
                lifecycle_stage=body.lifecycle_stage,
                tags=body.tags,
                custom_fields=_custom_fields(body.custom_fields),
                owner=body.owner,
            ),
        )
        return shown(
            caller,
            write_reply(written),
            contacts_at="contact",
            status_code=_created(written.outcome),
        )

    @app.patch(
        "/companies/{company_id}",
        operation_id="UpdateCompany",
        response_model=WriteReply,
        tags=["companies"],
        summary="Change some of a company's fields",
    )
    async def update_company(
        request: Request,
        company_id: str,
        body: CompanyPatch,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.update_company(
            caller,
            CompanyChanges(
                id=company_id,
                fields=_mask(body),
                name=body.name or "",
                domain=body.domain or "",
                industry=body.industry or "",
                lifecycle_stage=body.lifecycle_stage,
                tags=body.tags or [],
                custom_fields=_custom_fields(body.custom_fields),
                remove_custom_fields=body.remove_custom_fields or [],
                owner=body.owner or "",
            ),
        )
        return shown(caller, write_reply(written), contacts_at="contact")

    @app.put(
        "/persons/{person_id}/companies/{company_id}",
        operation_id="LinkPersonToCompany",
        response_model=WriteReply,
        tags=["persons"],
        summary="Relate a person to a company with a role (again: changes the role)",
    )
    async def link_person_to_company(
        request: Request,
        person_id: str,
        company_id: str,
        body: Annotated[CompanyRole | None, Body()] = None,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        role = body.role if body is not None else ""
        written = await service.link_person_to_company(
            caller, CompanyLink(person_id=person_id, company_id=company_id, role=role)
        )
        return shown(caller, write_reply(written), contacts_at="contact")

    @app.delete(
        "/persons/{person_id}/companies/{company_id}",
        operation_id="UnlinkPersonFromCompany",
        response_model=WriteReply,
        tags=["persons"],
        summary="End a person's relation to a company",
    )
    async def unlink_person_from_company(
        request: Request,
        person_id: str,
        company_id: str,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.unlink_person_from_company(
            caller, CompanyUnlink(person_id=person_id, company_id=company_id)
        )
        return shown(caller, write_reply(written), contacts_at="contact")

    @app.post(
        "/contacts/{contact_id}/consents",
        operation_id="RecordConsent",
        status_code=201,
        response_model=WriteReply,
        tags=["contacts"],
        summary="Record consent (granted or withdrawn) for one channel identity",
        responses={200: {"description": "A replay of an earlier Idempotency-Key"}},
    )
    async def record_consent(
        request: Request,
        contact_id: str,
        body: ConsentCreate,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.record_consent(
            caller,
            ConsentInput(
                contact_id=contact_id,
                channel=body.channel,
                address=body.address,
                status=body.status,
                source=body.source,
            ),
        )
        return shown(
            caller,
            write_reply(written),
            contacts_at="contact",
            status_code=_created(written.outcome),
        )

    @app.post(
        "/contacts/{contact_id}/interactions",
        operation_id="LogInteraction",
        status_code=201,
        response_model=InteractionReply,
        tags=["contacts"],
        summary="Log a call, mail, chat, meeting or visit",
        responses={200: {"description": "A replay of an earlier Idempotency-Key"}},
    )
    async def log_interaction(
        request: Request,
        contact_id: str,
        body: InteractionCreate,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.log_interaction(
            caller,
            InteractionInput(
                contact_id=contact_id,
                kind=body.kind,
                direction=body.direction,
                channel=body.channel,
                summary=body.summary,
                occurred_at=body.occurred_at,
                owner=body.owner,
            ),
        )
        reply = InteractionReply(
            **_reply_fields(written.outcome, written.contact),
            interaction_id=written.outcome.extra.get("interaction_id", ""),
        )
        return shown(caller, reply, contacts_at="contact", status_code=_created(written.outcome))

    @app.post(
        "/contacts/{survivor_id}/merge",
        operation_id="MergeContacts",
        response_model=MergeReply,
        tags=["contacts"],
        summary="Merge one or two duplicates into a survivor (they become redirects)",
    )
    async def merge_contacts(
        request: Request,
        survivor_id: str,
        body: MergeCreate,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.merge_contacts(caller, survivor_id, body.merged_ids, body.choices)
        reply = MergeReply(
            **_reply_fields(written.outcome, written.contact),
            merge_id=written.outcome.extra.get("merge_id", ""),
        )
        return shown(caller, reply, contacts_at="contact")

    @app.post(
        "/contacts/{survivor_id}/merges/{merge_id}/undo",
        operation_id="UndoMerge",
        response_model=WriteReply,
        tags=["contacts"],
        summary="Undo the survivor's latest merge (within the undo window)",
    )
    async def undo_merge(
        request: Request,
        survivor_id: str,
        merge_id: str,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.undo_merge(caller, survivor_id, merge_id)
        return shown(caller, write_reply(written), contacts_at="contact")

    @app.post(
        "/contacts/{contact_id}/erase",
        operation_id="ErasePerson",
        response_model=EraseReply,
        tags=["privacy"],
        summary="Erase a person: their data keys are destroyed, their personal data reads "
        '"[erased]" everywhere (admins; cannot be undone)',
        responses={
            409: {
                "description": "A contact merged into another (erase the survivor), or "
                "no personal data encryption is configured (CRM_MASTER_KEYS)"
            },
            422: {"description": "A company, or a bad reference"},
        },
    )
    async def erase_person(
        request: Request,
        contact_id: str,
        body: EraseCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        caller = http_caller(request, idempotency_key)
        written = await service.erase_person(caller, contact_id, body.reference)
        reply = EraseReply(
            **_reply_fields(written.outcome, written.contact),
            already_erased=written.outcome.extra.get("already_erased") == "true",
        )
        return shown(caller, reply, contacts_at="contact")

    @app.get(
        "/contacts/{contact_id}/export",
        operation_id="ExportPerson",
        tags=["privacy"],
        summary="Everything the platform holds about a person, as one JSON document "
        "(admins; docs/privacy-export.md)",
        responses={
            200: {
                "description": "The document, as an attachment",
                "content": {"application/json": {}},
            },
            503: {"description": "A service did not answer: no incomplete export is given"},
        },
    )
    async def export_person(request: Request, contact_id: str) -> Response:
        caller = http_caller(request)
        exported = await service.export_person(caller, contact_id)
        return Response(
            export_json(exported.document),
            media_type="application/json",
            headers={
                "Content-Disposition": (f'attachment; filename="person-{exported.person_id}.json"')
            },
        )

    @app.get(
        "/contacts/{contact_id}",
        operation_id="GetContact",
        response_model=Contact,
        tags=["contacts"],
        summary=f"One person or company, with its {RECENT_INTERACTIONS} most recent interactions",
    )
    async def get_contact(request: Request, contact_id: str) -> JSONResponse:
        caller = http_caller(request)
        contact = await service.get_contact(contact_id, caller)
        return shown(caller, contact_json(contact), operation="GetContact")

    @app.get(
        "/contacts/{contact_id}/interactions",
        operation_id="ListInteractions",
        response_model=InteractionList,
        tags=["contacts"],
        summary="All of a contact's interactions, newest first; paged",
    )
    async def list_interactions(
        request: Request,
        contact_id: str,
        page_size: Annotated[
            int,
            Query(description=f"1..{MAX_INTERACTION_PAGE}; default {DEFAULT_INTERACTION_PAGE}."),
        ] = 0,
        page_token: Annotated[
            str, Query(description="The next_page_token of the previous page.")
        ] = "",
    ) -> JSONResponse:
        caller = http_caller(request)
        page = await service.list_interactions(
            InteractionQuery(contact_id=contact_id, page_size=page_size, page_token=page_token),
            caller,
        )
        reply = InteractionList(
            contact_id=page.contact_id,
            interactions=[_interaction_json(i) for i in page.interactions],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
            redirected_from=page.redirected_from,
        )
        return shown(caller, reply)

    @app.get(
        "/contacts",
        operation_id="ListContacts",
        response_model=ContactList,
        tags=["contacts"],
        summary="Search contacts by name, email, phone, tag and kind; paged",
    )
    async def list_contacts(
        request: Request,
        query: Annotated[
            str, Query(description="Part of a given, family or company name (any case).")
        ] = "",
        email: Annotated[str, Query(description="An email address (exact, any case).")] = "",
        phone: Annotated[
            str, Query(description="A phone number in international format (exact).")
        ] = "",
        tag: Annotated[str, Query(description="A tag (exact, any case).")] = "",
        kind: Annotated[
            str | None,
            Query(
                description="`person` or `company`.",
                json_schema_extra=_words(ContactKind, nullable=True),
            ),
        ] = None,
        page_size: Annotated[
            int,
            Query(description=f"1..{MAX_PAGE_SIZE}; default {DEFAULT_PAGE_SIZE}."),
        ] = 0,
        page_token: Annotated[
            str, Query(description="The next_page_token of the previous page.")
        ] = "",
    ) -> JSONResponse:
        caller = http_caller(request)
        page: ContactPage = await service.list_contacts(
            ContactQuery(
                query=query,
                email=email,
                phone=phone,
                tag=tag,
                kind=kind,
                page_size=page_size,
                page_token=page_token,
            ),
            caller,
        )
        reply = ContactList(
            contacts=[contact_json(view) for view in page.contacts],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )
        return shown(caller, reply, contacts_at="contacts", operation="ListContacts")

    # -- custom-field definitions --

    @app.get(
        "/custom-fields/{kind}",
        operation_id="ListCustomFields",
        response_model=CustomFieldsReply,
        tags=["custom fields"],
        summary="The custom-field definitions of persons or of companies",
    )
    async def list_custom_fields(
        kind: KindPath, include_retired: bool = False
    ) -> CustomFieldsReply:
        return custom_fields_json(await service.fields.listed(kind, include_retired))

    @app.post(
        "/custom-fields/{kind}",
        operation_id="DefineCustomField",
        status_code=201,
        response_model=CustomFieldsWriteReply,
        tags=["custom fields"],
        summary="Define a custom field",
    )
    async def define_custom_field(
        request: Request,
        kind: KindPath,
        body: CustomFieldDefinitionBody,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        written = await service.fields.define(
            http_caller(request, idempotency_key),
            kind,
            FieldDefinitionInput(
                key=body.key,
                label=body.label,
                type=body.type,
                required=body.required,
                unique=body.unique,
                options=tuple(body.options),
                currency=body.currency,
            ),
        )
        reply = custom_fields_write(written).model_dump(mode="json")
        return JSONResponse(reply, status_code=_created(written.outcome))

    @app.patch(
        "/custom-fields/{kind}/{key}",
        operation_id="ReviseCustomField",
        response_model=CustomFieldsWriteReply,
        tags=["custom fields"],
        summary="Change a custom field's label, required, unique or options",
    )
    async def revise_custom_field(
        request: Request,
        kind: KindPath,
        key: str,
        body: CustomFieldRevisionBody,
        idempotency_key: IdempotencyKey = None,
    ) -> CustomFieldsWriteReply:
        written = await service.fields.revise(
            http_caller(request, idempotency_key),
            kind,
            FieldRevision(
                key=key,
                label=body.label,
                required=body.required,
                unique=body.unique,
                options=tuple(body.options) if body.options is not None else None,
            ),
        )
        return custom_fields_write(written)

    @app.post(
        "/custom-fields/{kind}/{key}/retire",
        operation_id="RetireCustomField",
        response_model=CustomFieldsWriteReply,
        tags=["custom fields"],
        summary="Retire a custom field: hidden, no new values, history kept",
    )
    async def retire_custom_field(
        request: Request, kind: KindPath, key: str, idempotency_key: IdempotencyKey = None
    ) -> CustomFieldsWriteReply:
        written = await service.fields.retire(http_caller(request, idempotency_key), kind, key)
        return custom_fields_write(written)

    @app.post(
        "/custom-fields/{kind}/{key}/restore",
        operation_id="RestoreCustomField",
        response_model=CustomFieldsWriteReply,
        tags=["custom fields"],
        summary="Bring a retired custom field back",
    )
    async def restore_custom_field(
        request: Request, kind: KindPath, key: str, idempotency_key: IdempotencyKey = None
    ) -> CustomFieldsWriteReply:
        written = await service.fields.restore(http_caller(request, idempotency_key), kind, key)
        return custom_fields_write(written)

    include_imports(app, service)  # POST /imports, GET /imports/{id}[/failures]

    include_duplicates(app, service)  # POST /duplicates/check, GET /duplicates, .../duplicates
    return app
