"""`crm-pipeline serve|relay`: the pipeline service's processes."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging

from crm_common.logs import setup_logging
from crm_common.relay import run_relay
from crm_common.server import serve
from crm_common.settings import Settings
from crm_common.telemetry import setup_telemetry, shutdown_telemetry
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.contacts_client import GrpcContacts
from crm_pipeline.events_out import PROTO_MESSAGE, to_wire
from crm_pipeline.grpc_api import grpc_service
from crm_pipeline.rest_api import create_app

SERVICE = "pipeline"
log = logging.getLogger("crm_pipeline")


async def run_serve(settings: Settings) -> None:
    contacts = GrpcContacts(settings.grpc_target("contacts"))
    service = PipelineService(create_application(settings), contacts)
    try:
        # Load every deal before taking traffic, not in the first query.
        position = await asyncio.to_thread(service.read_model.catch_up)
        log.info("pipeline read model ready at position %d", position)
        # The loaded read model is millions of long-lived objects: keep them out
        # of the collector's full passes, which otherwise stall queries.
        gc.freeze()
        await serve(
            settings,
            grpc_services=[grpc_service(service)],
            http_app=create_app(service),
        )
    finally:
        # After serve() has drained both servers: pending commands finish first.
        service.close()
        await contacts.close()


async def run_relay_process(settings: Settings) -> None:
    await run_relay(
        settings, to_wire=to_wire, app_factory=create_application, proto_message=PROTO_MESSAGE
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crm-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="gRPC and REST API of leads, pipelines and deals")
    commands.add_parser("relay", help="publish the event log to crm.pipeline.events")
    args = parser.parse_args(argv)

    setup_logging(SERVICE)
    setup_telemetry(SERVICE)
    settings = Settings.from_env(SERVICE)
    try:
        if args.command == "serve":
            asyncio.run(run_serve(settings))
        else:
            asyncio.run(run_relay_process(settings))
    finally:
        shutdown_telemetry()


if __name__ == "__main__":
    main()
