"""`crm-contacts serve|relay|follow`: the contacts service's processes.

`follow` runs, in one process under one stop signal and one health endpoint
(alive and ready only while each of them is), the follower of the pipeline
topic (deals opened and won: `crm_contacts.follower`), the follower of the
loyalty topic (purchases: `crm_contacts.churn`) and the churn sweep, every
`CRM_CONTACTS_CHURN_SWEEP_SECONDS` (default 3600), of the customers without a
purchase for `CRM_CONTACTS_CHURN_AFTER_DAYS` (default 180). A bad value of
either exits with status 2, naming it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from crm_common.cli import Process, run_cli
from crm_common.health import JointHeartbeat
from crm_common.lifecycle import run_together, run_worker
from crm_common.privacy.export import personal_data_service
from crm_common.relay import run_relay
from crm_common.server import access_gate, serve
from crm_common.settings import Settings
from crm_contacts.application import (
    ContactsService,
    create_application,
    merge_undo_window_from_env,
)
from crm_contacts.churn import (
    ChurnSweep,
    PurchaseFollower,
    PurchaseLedger,
    churn_after_from_env,
    sweep_interval_from_env,
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


async def run_follow(settings: Settings) -> int | None:
    """Follows deals and purchases and sweeps for churn until SIGTERM/SIGINT."""
    try:
        churn_after = churn_after_from_env()
        interval = sweep_interval_from_env()
    except ValueError as error:
        log.error("%s", error)
        return 2
    service = ContactsService(create_application(settings))
    try:
        ledger = PurchaseLedger.open(service)
    except BaseException:
        service.close()
        raise
    follower = OpportunityFollower(service, bootstrap=settings.kafka_bootstrap, purchases=ledger)
    purchases = PurchaseFollower(service, ledger, bootstrap=settings.kafka_bootstrap)
    sweep = ChurnSweep(service, ledger, churn_after=churn_after, interval=interval)
    heartbeat = JointHeartbeat(
        f"{SERVICE} followers and churn sweep",
        [follower.heartbeat, purchases.heartbeat, sweep.heartbeat],
    )

    def details() -> dict[str, Any]:
        return {
            "deals": follower.health_details(),
            "purchases": purchases.health_details(),
            "churn": sweep.health_details(),
        }

    async def all_of_them(stop: asyncio.Event) -> None:
        await run_together(stop, follower.run, purchases.run, sweep.run)

    try:
        await run_worker(settings, heartbeat, all_of_them, details=details)
    finally:
        service.close()
        ledger.close()
        stats = follower.stats
        log.info(
            "follower %s stopped: %d records, %d contacts moved, %d already were, "
            "%d replayed, %d passed over",
            follower.group_id,
            stats.records,
            stats.promoted,
            stats.unchanged,
            stats.replayed,
            stats.skipped,
        )
        log.info(
            "purchases follower %s stopped: %d records, %d purchases, %d customers back; "
            "churn sweep: %d sweeps, %d churned",
            purchases.group_id,
            purchases.stats.records,
            purchases.stats.purchases,
            purchases.stats.returned,
            sweep.stats.sweeps,
            sweep.stats.churned,
        )
    return None


PROCESSES = {
    "serve": Process("gRPC and REST API of people and companies", run_serve),
    "relay": Process("publish the event log to crm.contacts.events", run_relay_process),
    "follow": Process(
        "lifecycle rules: deals (crm.pipeline.events), purchases (crm.loyalty.events), churn sweep",
        run_follow,
    ),
}


def main(argv: list[str] | None = None) -> None:
    run_cli(SERVICE, PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
