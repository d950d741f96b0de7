"""`crm-loyalty serve|relay|ingest`: the loyalty service's processes.

`ingest` (also run as `follow`, the registry's follower role) consumes the ERP
orders topic and, beside it in the same process, the contacts topic
(`crm_loyalty.contact_changes`: erased persons, merges and their undo); the
process stops on one signal and is healthy only while both consumers are. Its
pace is set by `CRM_LOYALTY_PARKED_RETRY_SECONDS` (default 30: how often
parked orders are tried again) and `CRM_LOYALTY_SETTLE_SECONDS` (default 60:
how often return windows are released and lots expired) and
`CRM_LOYALTY_PARK_LIMIT_SECONDS` (default 604800, a week: how long a parked
order is retried before it is dead-lettered to
`<prefix>.erp.orders.dead-letter`).

Both read the tier configuration at start (`CRM_LOYALTY_TIERS_YAML`, or the
file `CRM_LOYALTY_TIERS_FILE` names, default the packaged `tiers.yaml`;
`crm_loyalty.tier_config`) and exit with status 2,
naming every mistake, when it is not valid.

`serve` answers lists from the query tables in the service's own database
(`crm_loyalty.query_tables`): at start it applies only what was stored since
they were last written (nothing is read from the start of the log), then
follows the log in the background so that a query rarely has anything to apply.

`crm-loyalty simulate-erp ...` publishes a simulated ERP order stream
(`crm_loyalty.simulator`; `crm-loyalty simulate-erp --help`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from crm_common.cli import Process, run_cli
from crm_common.contact_events import ContactEventsFollower
from crm_common.health import JointHeartbeat
from crm_common.lifecycle import run_together, run_worker
from crm_common.privacy.export import personal_data_service
from crm_common.relay import run_relay
from crm_common.server import access_gate, serve
from crm_common.settings import Settings
from crm_loyalty import tier_config
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.contact_changes import LoyaltyContactChanges
from crm_loyalty.contacts_client import GrpcContacts
from crm_loyalty.domain import TierPolicy
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


def tier_policy() -> TierPolicy | None:
    """The tier configuration (`crm_loyalty.tier_config.load`); None,
    with every mistake logged, when it cannot be used."""
    try:
        policy = tier_config.load()
    except tier_config.TierConfigError as error:
        log.error("%s", error)
        return None
    log.info(
        "tiers by %s over %s days: %s",
        policy.basis,
        policy.window.days,
        ", ".join(f"{t.name} {t.threshold}" for t in policy.tiers),
    )
    return policy


async def run_serve(settings: Settings) -> int | None:
    tiers = tier_policy()
    if tiers is None:
        return 2
    gate = access_gate(settings)
    contacts = GrpcContacts(settings)
    service = LoyaltyService(create_application(settings), contacts, tiers=tiers)
    try:
        # Only what is missing from the query tables: ready in seconds at any size.
        await asyncio.to_thread(service.queries.side.catch_up)
    except BaseException:
        service.close()
        await contacts.close()
        raise
    service.queries.side.follow()
    exports = personal_data_service(SERVICE, service.export_personal_data)
    try:
        await serve(
            settings,
            gate=gate,
            grpc_services=[grpc_service(service), exports],
            http_app=create_app(service, gate),
            on_stop=[service.close],
        )
    finally:
        await contacts.close()
    return None


async def run_relay_process(settings: Settings) -> None:
    await run_relay(
        settings, to_wire=to_wire, app_factory=create_application, proto_message=PROTO_MESSAGE
    )


async def run_ingest(settings: Settings) -> int | None:
    tiers = tier_policy()
    if tiers is None:
        return 2
    contacts = GrpcContacts(settings)
    service = LoyaltyService(create_application(settings), contacts, tiers=tiers)
    ingest = OrderIngest(
        service,
        bootstrap=settings.kafka_bootstrap,
        retry_interval=_seconds("CRM_LOYALTY_PARKED_RETRY_SECONDS", 30),
        settle_interval=_seconds("CRM_LOYALTY_SETTLE_SECONDS", 60),
        park_limit=_seconds("CRM_LOYALTY_PARK_LIMIT_SECONDS", 7 * 86400),
    )
    follower = ContactEventsFollower(
        SERVICE, LoyaltyContactChanges(service), bootstrap=settings.kafka_bootstrap
    )
    heartbeat = JointHeartbeat(
        f"{SERVICE} ingest and contacts follower", [ingest.heartbeat, follower.heartbeat]
    )

    def details() -> dict[str, Any]:
        return {"ingest": ingest.health_details(), "contacts_follower": follower.health_details()}

    async def both(stop: asyncio.Event) -> None:
        await run_together(stop, ingest.run, follower.run)

    try:
        await run_worker(settings, heartbeat, both, details=details)
    finally:
        service.close()
        await contacts.close()
    return None


INGEST = Process(
    "consume ERP orders into points; expire and release on schedule; "
    "honour erased and merged contacts",
    run_ingest,
)
PROCESSES = {
    "serve": Process("gRPC and REST API of members, points, rules and tiers", run_serve),
    "relay": Process("publish the event log to crm.loyalty.events", run_relay_process),
    "ingest": INGEST,
    # The registry's follower role runs `crm-<service> follow`.
    "follow": INGEST,
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["simulate-erp"]:
        # A tool, not a process of the service: its own options.
        from crm_loyalty import simulator

        sys.exit(simulator.main(args[1:]))
    run_cli(SERVICE, PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
