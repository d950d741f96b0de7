"""`crm-contacts serve|relay|follow`: the contacts service's processes."""

from __future__ import annotations

import asyncio
import logging

from crm_common.cli import Process, run_cli
from crm_common.lifecycle import run_worker
from crm_common.privacy.export import personal_data_service
from crm_common.relay import run_relay
from crm_common.server import access_gate, serve
from crm_common.settings import Settings
from crm_contacts.application import (
    ContactsService,
    create_application,
    merge_undo_window_from_env,
)
from crm_contacts.events_out import PROTO_MESSAGE, to_wire
from crm_contacts.follower import OpportunityFollower
from crm_contacts.grpc_api import grpc_service
from crm_contacts.personal_data_client import PersonalDataClients
from crm_contacts.rest_api import create_app

SERVICE = "contacts"
log = logging.getLogger("crm_contacts")


async def run_serve(settings: Settings) -> None:
    # Refuses to start without the key set or the pseudonym key, before opening the store.
    gate = access_gate(settings)
    pseudonym_key = settings.pseudonym_key()
    undo_window = merge_undo_window_from_env()
    remote_exports = PersonalDataClients(settings)
    service = ContactsService(
        create_application(settings),
        policy=gate.policy,
        merge_undo_window=undo_window,
        remote_exports=remote_exports,
    )
    try:
        # The directory's tables are stored: apply only what was written since
        # they were last brought up to date (by any replica), then follow the log
        # in the background so that a search rarely has anything to apply.
        directory = service.directory
        position = await asyncio.to_thread(directory.catch_up)
        log.info(
            "contact directory ready at position %d (%d events applied at start)",
            position,
            directory.applied,
        )
        directory.follow()
        await serve(
            settings,
            gate=gate,
            grpc_services=[
                grpc_service(service, gate, pseudonym_key),
                personal_data_service(SERVICE, service.personal_data),
            ],
            http_app=create_app(service, gate, pseudonym_key=pseudonym_key),
        )
    finally:
        # After serve() has drained both servers: pending commands finish first.
        service.close()
        await remote_exports.close()


async def run_relay_process(settings: Settings) -> None:
    await run_relay(
        settings, to_wire=to_wire, app_factory=create_application, proto_message=PROTO_MESSAGE
    )


async def run_follow(settings: Settings) -> None:
    """Follows the pipeline's won deals until SIGTERM/SIGINT; then finishes the batch."""
    service = ContactsService(create_application(settings))
    follower = OpportunityFollower(service, bootstrap=settings.kafka_bootstrap)
    try:
        await run_worker(
            settings, follower.heartbeat, follower.run, details=follower.health_details
        )
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


PROCESSES = {
    "serve": Process("gRPC and REST API of people and companies", run_serve),
    "relay": Process("publish the event log to crm.contacts.events", run_relay_process),
    "follow": Process(
        "make the contacts of won deals customers (from crm.pipeline.events)", run_follow
    ),
}


def main(argv: list[str] | None = None) -> None:
    run_cli(SERVICE, PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
