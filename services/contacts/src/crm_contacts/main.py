"""`crm-contacts serve|relay|follow`: the contacts service's processes."""

from __future__ import annotations

import argparse
import asyncio
import logging

from crm_common.lifecycle import stop_on_signals
from crm_common.logs import setup_logging
from crm_common.relay import run_relay
from crm_common.server import serve
from crm_common.settings import Settings
from crm_common.telemetry import setup_telemetry, shutdown_telemetry
from crm_contacts.application import ContactsService, create_application
from crm_contacts.events_out import PROTO_MESSAGE, to_wire
from crm_contacts.follower import OpportunityFollower
from crm_contacts.grpc_api import grpc_service
from crm_contacts.rest_api import create_app

SERVICE = "contacts"
log = logging.getLogger("crm_contacts")


async def run_serve(settings: Settings) -> None:
    service = ContactsService(create_application(settings))
    try:
        # Build the search index before taking traffic, not in the first search.
        indexed = await asyncio.to_thread(service.directory.catch_up)
        log.info(
            "contact directory ready at position %d (%d contacts)", indexed, len(service.directory)
        )
        await serve(
            settings,
            grpc_services=[grpc_service(service)],
            http_app=create_app(service),
        )
    finally:
        # After serve() has drained both servers: pending commands finish first.
        service.close()


async def run_relay_process(settings: Settings) -> None:
    await run_relay(
        settings, to_wire=to_wire, app_factory=create_application, proto_message=PROTO_MESSAGE
    )


async def run_follow(settings: Settings) -> None:
    """Follows the pipeline's won deals until SIGTERM/SIGINT; then finishes the batch."""
    service = ContactsService(create_application(settings))
    follower = OpportunityFollower(service, bootstrap=settings.kafka_bootstrap)
    try:
        with stop_on_signals() as stop:
            await follower.run(stop)
    finally:
        service.close()
        stats = follower.stats
        log.info(
            "follower %s stopped: %d records, %d contacts made customers, %d already were, "
            "%d replayed, %d passed over",
            follower.group_id,
            stats.records,
            stats.promoted,
            stats.unchanged,
            stats.replayed,
            stats.skipped,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crm-contacts", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="gRPC and REST API of people and companies")
    commands.add_parser("relay", help="publish the event log to crm.contacts.events")
    commands.add_parser(
        "follow", help="make the contacts of won deals customers (from crm.pipeline.events)"
    )
    args = parser.parse_args(argv)

    setup_logging(SERVICE)
    setup_telemetry(SERVICE)
    settings = Settings.from_env(SERVICE)
    try:
        if args.command == "serve":
            asyncio.run(run_serve(settings))
        elif args.command == "relay":
            asyncio.run(run_relay_process(settings))
        else:
            asyncio.run(run_follow(settings))
    finally:
        shutdown_telemetry()


if __name__ == "__main__":
    main()
