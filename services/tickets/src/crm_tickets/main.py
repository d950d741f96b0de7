"""`crm-tickets serve|relay|sla|follow`: the tickets service's processes.

`serve` runs the gRPC and REST API and, beside it, the SLA scanner: every
replica raises the deadlines that fall due, and each is raised exactly once
whatever the number of replicas (see `crm_tickets.application`). `sla` runs
the scanner alone, for a deployment that wants it apart from the API.

Both read the query tables of `crm_tickets.deadlines` in the service's own
database: a process starts without reading the event log, applying only what
was stored since the tables' position (`serve` then follows the log in the
background; the scanner reads the due deadlines from the tables).

`CRM_TICKETS_SLA_INTERVAL` (seconds, default 5) is how often the scanner
looks; `CRM_TICKETS_REOPEN_WINDOW` (seconds, default 7 days) how long a solved
case may be reopened; `CRM_TICKETS_LOYALTY_DEADLINE_MS` (default 300) how long
opening a case waits for the customer's tier (`CRM_LOYALTY_GRPC_TARGET`).

`follow` honours the contacts topic (`crm_tickets.contact_changes`): an erased
person's case texts are erased (their keys destroyed), a merge moves the
merged contacts' cases to the survivor and its undo gives them back.

Time is injectable: with `CRM_TICKETS_CLOCK_FILE` set, the processes take
"now" from that file (one ISO 8601 instant with its offset, read at every
use), so tests and drills move the service through days of business hours at
once. Unset (production), the clock is the system's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from crm_common.cli import Process, run_cli
from crm_common.contact_events import ContactEventsFollower
from crm_common.health import Heartbeat
from crm_common.lifecycle import run_worker
from crm_common.privacy.export import personal_data_service
from crm_common.relay import run_relay
from crm_common.server import access_gate, serve
from crm_common.settings import Settings
from crm_tickets.application import (
    DEFAULT_REOPEN_WINDOW_SECONDS,
    TicketsApplication,
    TicketsService,
    create_application,
)
from crm_tickets.contact_changes import TicketsContactChanges
from crm_tickets.contacts_client import GrpcContacts
from crm_tickets.domain import Case
from crm_tickets.events_out import PROTO_MESSAGE, CaseEvents
from crm_tickets.grpc_api import grpc_service
from crm_tickets.loyalty_client import GrpcLoyaltyTiers
from crm_tickets.rest_api import create_app

SERVICE = "tickets"
log = logging.getLogger("crm_tickets")


class FileClock:
    """Now, as written in a file (an ISO 8601 instant with its offset)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> datetime:
        at = datetime.fromisoformat(self.path.read_text().strip())
        if at.tzinfo is None:
            raise ValueError(f"{self.path}: the instant needs its offset (Z or +hh:mm)")
        return at


def _clock() -> Callable[[], datetime]:
    path = os.environ.get("CRM_TICKETS_CLOCK_FILE", "")
    return FileClock(Path(path)) if path else (lambda: datetime.now(UTC))


def _interval() -> float:
    return float(os.environ.get("CRM_TICKETS_SLA_INTERVAL", "5"))


def _service(
    settings: Settings,
    contacts: GrpcContacts | None = None,
    tiers: GrpcLoyaltyTiers | None = None,
) -> TicketsService:
    window = int(os.environ.get("CRM_TICKETS_REOPEN_WINDOW", DEFAULT_REOPEN_WINDOW_SECONDS))
    return TicketsService(
        create_application(settings),
        contacts,
        clock=_clock(),
        reopen_window_seconds=window,
        tiers=tiers,
    )


def start_query(service: TicketsService) -> None:
    """Brings the query tables up to the log's end (what was stored while no process
    followed it: nothing to read otherwise) and follows it from then on, so a query
    rarely has anything to apply first."""
    lag = service.query.side.lag()
    if lag:
        log.info("query tables: applying %d events stored since they were last followed", lag)
    service.query.catch_up()
    service.query.follow()


async def scan_until(service: TicketsService, stop: asyncio.Event, heartbeat: Heartbeat) -> None:
    """Raises due SLA deadlines every interval until `stop` is set."""
    interval = _interval()
    while not stop.is_set():
        try:
            await service.raise_due_deadlines()
            heartbeat.beat()
        except Exception as error:  # keep scanning: the next round retries
            heartbeat.failed(error)
            log.exception("SLA scan failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def run_serve(settings: Settings) -> None:
    gate = access_gate(settings)
    contacts = GrpcContacts(settings)
    tiers = GrpcLoyaltyTiers(settings)
    service = _service(settings, contacts, tiers)
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(start_query, service)
        scanner = asyncio.create_task(scan_until(service, stop, Heartbeat("tickets-sla")))
        try:
            await serve(
                settings,
                gate=gate,
                grpc_services=[
                    grpc_service(service),
                    personal_data_service(SERVICE, service.export_personal_data),
                ],
                http_app=create_app(service, gate),
            )
        finally:
            stop.set()
            await scanner
    finally:
        service.close()
        await contacts.close()
        await tiers.close()


async def run_sla(settings: Settings) -> None:
    service = _service(settings)
    heartbeat = Heartbeat("tickets-sla")
    try:
        await run_worker(settings, heartbeat, lambda stop: scan_until(service, stop, heartbeat))
    finally:
        service.close()


async def run_follow(settings: Settings) -> None:
    """Follows the contacts topic until SIGTERM/SIGINT; then finishes the batch."""
    service = _service(settings)
    follower = ContactEventsFollower(
        SERVICE, TicketsContactChanges(service), bootstrap=settings.kafka_bootstrap
    )
    try:
        await run_worker(
            settings, follower.heartbeat, follower.run, details=follower.health_details
        )
    finally:
        service.close()
        stats = follower.stats
        log.info(
            "follower %s stopped: %d records, %d erasures, %d merges, %d undone, %d passed over",
            follower.group_id,
            stats.records,
            stats.erased,
            stats.merged,
            stats.undone,
            stats.skipped,
        )


async def run_relay_process(settings: Settings) -> None:
    apps: list[TicketsApplication] = []

    def factory(settings: Settings) -> TicketsApplication:
        app = create_application(settings)
        apps.append(app)
        return app

    def load(case_id: UUID, version: int) -> Case:
        case: Case = apps[0].repository.get(case_id, version=version)
        return case

    await run_relay(
        settings, to_wire=CaseEvents(load), app_factory=factory, proto_message=PROTO_MESSAGE
    )


PROCESSES = {
    "serve": Process(
        "gRPC and REST API of cases and SLA policies, with the SLA scanner", run_serve
    ),
    "relay": Process("publish the event log to crm.tickets.events", run_relay_process),
    "sla": Process("raise due SLA warnings and breaches (exactly once)", run_sla),
    "follow": Process(
        "honour erasures and merges of contacts (from crm.contacts.events)", run_follow
    ),
}


def main(argv: list[str] | None = None) -> None:
    run_cli(SERVICE, PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
