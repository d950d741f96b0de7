"""The baseline: the eventsourcing library's bare `Application.save()` loop,
one save per command, on the same kind of store the service uses."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench import postgres as bench_postgres
from crm_common.commands import Caller
from crm_common.eventstore import application_env
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.inputs import ChannelInput, NewPerson


class BenchPerson(Aggregate):
    """Shaped like a registered person: names, one email channel, tags."""

    @event("Registered")
    def __init__(
        self, given_name: str, family_name: str, channels: list[dict[str, str]], tags: list[str]
    ) -> None:
        self.given_name = given_name
        self.family_name = family_name
        self.channels = channels
        self.tags = tags


def _settings(data_dir: Path, store: str, schema: str, service: str) -> Settings:
    return Settings(
        service=service,
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store=store,
        postgres=bench_postgres.settings(schema) if store == "postgres" else {},
    )


def bare_save_loop(data_dir: Path, store: str, count: int, schema: str = "bench_baseline") -> float:
    """Creates `count` aggregates, one `save()` each; returns saves per second."""
    settings = _settings(data_dir, store, schema, "baseline")
    app: Application[UUID] = Application(env=application_env(settings))
    try:
        started = time.perf_counter()
        for i in range(count):
            app.save(
                BenchPerson(
                    given_name=f"Given{i}",
                    family_name=f"Family{i}",
                    channels=[{"channel": "email", "address": f"p{i}@example.com"}],
                    tags=["bench"],
                )
            )
        elapsed = time.perf_counter() - started
    finally:
        app.close()
    return count / elapsed


def _new_person(i: int) -> NewPerson:
    tag = uuid.uuid4().hex[:10]
    return NewPerson(
        given_name=f"Bench{i}",
        family_name=f"Person{tag}",
        channels=[
            ChannelInput(
                channel="email",
                address=f"bench.{tag}.{i}@example.com",
                consent_status="granted",
                consent_source="bench",
            )
        ],
        lifecycle_stage="lead",
        tags=["bench"],
    )


async def application_layer_creates(
    data_dir: Path, store: str, count: int, concurrency: int, schema: str
) -> float:
    """The contacts service's own use case (`ContactsService.create_person`:
    validation, command bus with group commit, position lookup, reply view)
    called in-process by `concurrency` callers, without gRPC; commands/s."""
    service = ContactsService(create_application(_settings(data_dir, store, schema, "contacts")))

    remaining = count

    bench = Caller(actor="bench", client="bench")

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await service.create_person(bench, _new_person(remaining))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)
    finally:
        service.close()
