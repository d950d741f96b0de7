"""The baseline: the eventsourcing library's bare `Application.save()` loop,
one save per command, on the same kind of store the service uses."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from crm_common.eventstore import application_env
from crm_common.settings import Settings


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


def bare_save_loop(data_dir: Path, store: str, count: int, schema: str = "bench_baseline") -> float:
    """Creates `count` aggregates, one `save()` each; returns saves per second."""
    settings = Settings(
        service="baseline",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store=store,
        postgres={
            "host": "127.0.0.1",
            "port": "5432",
            "dbname": "postgres",
            "user": "postgres",
            "password": "",
            "schema": schema,
        },
    )
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
