"""`crm-loyalty serve|relay|ingest`: the loyalty service's processes.

`ingest` (also run as `follow`, the registry's follower role) consumes the ERP
orders topic. Its pace is set by `CRM_LOYALTY_PARKED_RETRY_SECONDS` (default
30: how often parked orders are tried again) and `CRM_LOYALTY_SETTLE_SECONDS`
(default 60: how often return windows are released and lots expired).
"""

from __future__ import annotations

import logging
import os

from crm_common.cli import Process, run_cli
from crm_common.lifecycle import run_worker
from crm_common.relay import run_relay
from crm_common.server import access_gate, serve
from crm_common.settings import Settings
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.contacts_client import GrpcContacts
from crm_loyalty.events_out import PROTO_MESSAGE, to_wire
from crm_loyalty.grpc_api import grpc_service
from crm_loyalty.ingest import OrderIngest
from crm_loyalty.rest_api import create_app

SERVICE = "loyalty"
log = logging.getLogger("crm_loyalty")


def _seconds(name: str, default: float) -> float:
    value = float(os.environ.get(name) or default)
    if value <= 0:
        raise ValueError(f"{name} must be positive, not {value}")
    return value


async def run_serve(settings: Settings) -> None:
    gate = access_gate(settings)
    contacts = GrpcContacts(settings)
    service = LoyaltyService(create_application(settings), contacts)
    try:
        await serve(
            settings,
            gate=gate,
            grpc_services=[grpc_service(service)],
            http_app=create_app(service, gate),
            on_stop=[service.close],
        )
    finally:
        await contacts.close()


async def run_relay_process(settings: Settings) -> None:
    await run_relay(
        settings, to_wire=to_wire, app_factory=create_application, proto_message=PROTO_MESSAGE
    )


async def run_ingest(settings: Settings) -> None:
    contacts = GrpcContacts(settings)
    service = LoyaltyService(create_application(settings), contacts)
    ingest = OrderIngest(
        service,
        bootstrap=settings.kafka_bootstrap,
        retry_interval=_seconds("CRM_LOYALTY_PARKED_RETRY_SECONDS", 30),
        settle_interval=_seconds("CRM_LOYALTY_SETTLE_SECONDS", 60),
    )
    try:
        await run_worker(settings, ingest.heartbeat, ingest.run, details=ingest.health_details)
    finally:
        service.close()
        await contacts.close()


INGEST = Process("consume ERP orders into points; expire and release on schedule", run_ingest)
PROCESSES = {
    "serve": Process("gRPC and REST API of members, points, rules and tiers", run_serve),
    "relay": Process("publish the event log to crm.loyalty.events", run_relay_process),
    "ingest": INGEST,
    # The registry's follower role runs `crm-<service> follow`.
    "follow": INGEST,
}


def main(argv: list[str] | None = None) -> None:
    run_cli(SERVICE, PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
