"""Support code of the pipeline tests: PostgreSQL settings, a hand-moved clock, the
contacts service in process behind `ContactsPort`, a standard pipeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from crm_common.commands import Caller
from crm_common.errors import NotFound
from crm_common.settings import Settings
from crm_contacts.application import ContactsService
from crm_contacts.inputs import ChannelInput, CompanyLink, NewCompany, NewPerson
from crm_pipeline.application import CompanyToRegister, PersonToRegister
from crm_pipeline.inputs import StageInput

POSTGRES = {
    "host": "127.0.0.1",
    "port": "5432",
    "dbname": "test",
    "user": "postgres",
    "password": "",
}


def postgres_reachable() -> str | None:
    try:
        with psycopg.connect(
            host=POSTGRES["host"],
            port=POSTGRES["port"],
            dbname=POSTGRES["dbname"],
            user=POSTGRES["user"],
            connect_timeout=3,
        ):
            return None
    except psycopg.OperationalError as error:
        return f"PostgreSQL on {POSTGRES['host']}:{POSTGRES['port']} is unreachable: {error}"


class Clock:
    """The service's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 2, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class InProcessContacts:
    """`ContactsPort` over the contacts application in the same process."""

    def __init__(self, service: ContactsService) -> None:
        self.service = service
        self.calls = 0

    async def ensure_exists(self, kind: str, contact_id: str) -> None:
        self.calls += 1
        contact = await self.service.get_contact(contact_id)
        if contact.kind.value != kind:
            raise NotFound(kind.capitalize(), contact_id)

    async def register_person(self, person: PersonToRegister, request_id: str | None) -> str:
        self.calls += 1
        channels = [ChannelInput("email", person.email)] if person.email else []
        written = await self.service.create_person(
            Caller(client="pipeline", request_id=request_id),
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
            Caller(client="pipeline", request_id=request_id),
            NewCompany(name=company.name, lifecycle_stage="opportunity", owner=company.owner),
        )
        return written.outcome.id

    async def link_person_to_company(
        self, person_id: str, company_id: str, request_id: str | None
    ) -> None:
        self.calls += 1
        await self.service.link_person_to_company(
            Caller(client="pipeline", request_id=request_id),
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
