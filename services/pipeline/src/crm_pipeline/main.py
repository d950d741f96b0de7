"""`crm-pipeline serve|relay|follow`: the pipeline service's processes."""

from __future__ import annotations

import asyncio
import logging

from crm_common.cli import Process, run_cli
from crm_common.contact_events import ContactEventsFollower
from crm_common.lifecycle import run_worker
from crm_common.privacy.export import personal_data_service
from crm_common.relay import run_relay
from crm_common.server import access_gate, serve
from crm_common.settings import Settings
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.contact_changes import PipelineContactChanges
from crm_pipeline.contacts_client import GrpcContacts
from crm_pipeline.events_out import PROTO_MESSAGE, to_wire
from crm_pipeline.grpc_api import grpc_service
from crm_pipeline.rest import create_app

SERVICE = "pipeline"
log = logging.getLogger("crm_pipeline")


async def run_serve(settings: Settings) -> None:
    # Refuses to start without a key set to verify tokens or a key to sign its own.
    gate = access_gate(settings)
    contacts = GrpcContacts.configured(settings, policy=gate.policy)
    service = PipelineService(create_application(settings), contacts, policy=gate.policy)
    try:
        # The query tables are in the store: apply only what was stored since they
        # were last brought up to date (nothing, usually), then keep them fresh in
        # the background so that a query rarely has anything to apply.
        position = await asyncio.to_thread(service.read_model.catch_up)
        log.info("pipeline query tables ready at position %d", position)
        service.read_model.follow()
        await serve(
            settings,
            gate=gate,
            grpc_services=[
                grpc_service(service),
                personal_data_service(SERVICE, service.export_person),
            ],
            http_app=create_app(service, gate),
        )
    finally:
        # After serve() has drained both servers: pending commands finish first.
        service.close()
        await contacts.close()


async def run_relay_process(settings: Settings) -> None:
    await run_relay(
        settings, to_wire=to_wire, app_factory=create_application, proto_message=PROTO_MESSAGE
    )


async def run_follow(settings: Settings) -> None:
    """Honours erasures and merges from the contacts topic until SIGTERM/SIGINT."""
    service = PipelineService(create_application(settings))
    follower = ContactEventsFollower(
        SERVICE, PipelineContactChanges(service), bootstrap=settings.kafka_bootstrap
    )
    try:
        await run_worker(
            settings, follower.heartbeat, follower.run, details=follower.health_details
        )
    finally:
        service.close()
        stats = follower.stats
        log.info(
            "follower %s stopped: %d records, %d persons erased, %d merges, %d undone,"
            " %d passed over",
            follower.group_id,
            stats.records,
            stats.erased,
            stats.merged,
            stats.undone,
            stats.skipped,
        )


PROCESSES = {
    "serve": Process("gRPC and REST API of leads, pipelines and deals", run_serve),
    "relay": Process("publish the event log to crm.pipeline.events", run_relay_process),
    "follow": Process(
        "honour erased persons and merged contacts (from crm.contacts.events)", run_follow
    ),
}


def main(argv: list[str] | None = None) -> None:
    run_cli(SERVICE, PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
