"""Support code of the pipeline tests: a hand-moved clock, the
contacts service in process behind `ContactsPort`, a standard pipeline, gRPC stubs
that carry a real token."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from crm_common.auth.issuer import ServiceCredentials
from crm_common.auth.principal import Principal, current_principal
from crm_common.commands import Caller
from crm_common.errors import NotFound, PermissionDenied
from crm_common.settings import Settings
from crm_contacts.application import ContactsService
from crm_contacts.inputs import ChannelInput, CompanyLink, ContactQuery, NewCompany, NewPerson
from crm_deploy.identity import Identity
from crm_deploy.testing import grpc_auth
from crm_pipeline.application import CompanyToRegister, PersonToRegister
from crm_pipeline.inputs import StageInput


class Clock:
    """The service's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 2, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def _platform_caller(request_id: str | None) -> Caller:
    """The caller contacts sees: the pipeline's credentials, acting for the current
    request's user when there is one (as `GrpcContacts` calls it)."""
    user = current_principal.get()
    if user is None:
        return Caller(client="pipeline", request_id=request_id)
    principal = Principal(
        "service:pipeline", frozenset({"platform"}), "pipeline", on_behalf_of=user
    )
    return Caller(
        actor=principal.actor, client="pipeline", request_id=request_id, principal=principal
    )


class InProcessContacts:
    """`ContactsPort` over the contacts application in the same process."""

    def __init__(self, service: ContactsService) -> None:
        self.service = service
        self.calls = 0
        #: What `authorize` refuses, to stand for a user the contacts policy refuses.
        self.refused: set[str] = set()

    async def authorize(self, operations: Iterable[str]) -> None:
        refused = sorted(set(operations) & self.refused)
        if refused:
            raise PermissionDenied(f"{refused[0]} is not allowed to the roles (test)")

    async def ensure_exists(self, kind: str, contact_id: str) -> None:
        self.calls += 1
        contact = await self.service.get_contact(contact_id)
        if contact.kind.value != kind:
            raise NotFound(kind.capitalize(), contact_id)

    async def find_persons(self, email: str, phone: str) -> list[str]:
        self.calls += 1
        page = await self.service.list_contacts(
            ContactQuery(email=email, phone=phone, kind="person", page_size=20),
            _platform_caller(None),
        )
        return [contact.id for contact in page.contacts]

    async def register_person(self, person: PersonToRegister, request_id: str | None) -> str:
        self.calls += 1
        channels = [ChannelInput("email", person.email)] if person.email else []
        if person.phone:
            channels.append(ChannelInput("phone", person.phone))
        written = await self.service.create_person(
            _platform_caller(request_id),
            NewPerson(
                given_name=person.given_name,
                family_name=person.family_name,
                channels=channels,
                lifecycle_stage="opportunity",
                owner=person.owner,
            ),
        )
        return written.outcome.id

    async def register_company(self, company: CompanyToRegister, request_id: str | None) -> str:
        self.calls += 1
        written = await self.service.create_company(
            _platform_caller(request_id),
            NewCompany(name=company.name, lifecycle_stage="opportunity", owner=company.owner),
        )
        return written.outcome.id

    async def link_person_to_company(
        self, person_id: str, company_id: str, request_id: str | None
    ) -> None:
        self.calls += 1
        await self.service.link_person_to_company(
            _platform_caller(request_id),
            CompanyLink(person_id, company_id, "buyer"),
        )


STAGES = [
    StageInput("qualify", "Qualify", "10", "pipeline"),
    StageInput("propose", "Propose", "40", "best_case"),
    StageInput("negotiate", "Negotiate", "70", "commit"),
    StageInput("won", "Won", "100", "closed_won"),
    StageInput("lost", "Lost", "0", "closed_lost"),
]


def sqlite_settings(data_dir: Path, service: str = "pipeline") -> Settings:
    return Settings(
        service=service,
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


class WithToken:
    """A gRPC stub whose calls carry `token` unless they name their own metadata."""

    def __init__(self, stub: Any, token: str) -> None:
        self._stub = stub
        self.token = token

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(request: Any, *, metadata: Any = None, **options: Any) -> Any:
            if metadata is None:
                metadata = grpc_auth(self.token)
            return method(request, metadata=metadata, **options)

        return call


def service_credentials_of(identity: Identity, service: str = "pipeline") -> ServiceCredentials:
    """A platform service's own credentials, signed with the identity's platform key."""
    return ServiceCredentials(identity.platform_issuer(), service)
