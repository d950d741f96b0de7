"""`crm-analytics serve|project|rebuild`: the analytics service's processes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pymongo import MongoClient

from crm.customer360.v1 import customer360_pb2_grpc
from crm_analytics.export import Customer360Exporter
from crm_analytics.grpc_api import Customer360Servicer
from crm_analytics.personal_data import PayloadOpener
from crm_analytics.query import Customer360Queries
from crm_analytics.rest_api import create_app
from crm_analytics.store import PROJECTION, REBUILD_BATCH, Customer360Store, connect, sources
from crm_common.cli import Process, run_cli
from crm_common.health import Dependency
from crm_common.lifecycle import run_worker, stop_on_signals
from crm_common.privacy.export import personal_data_service
from crm_common.projection import ProjectionConsumer
from crm_common.server import GrpcService, access_gate, serve
from crm_common.settings import Settings

log = logging.getLogger("crm_analytics")


def projection(
    settings: Settings, store: Customer360Store, max_records: int = 500
) -> ProjectionConsumer:
    return ProjectionConsumer(
        projection=PROJECTION,
        topics=list(store.topics.values()),
        read_model=store,
        mongo=store.database.client,
        database=settings.mongo_db,
        bootstrap=settings.kafka_bootstrap,
        max_records=max_records,
    )


def document_store_check(url: str) -> tuple[Dependency, Callable[[], None]]:
    """Every read of the 360 view needs the document store: a ping with a client of
    its own that gives up within two seconds (and its close)."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        url, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000, socketTimeoutMS=2000
    )
    return Dependency("document store", lambda: client.admin.command("ping")), client.close


async def run_serve(settings: Settings) -> None:
    gate = access_gate(settings)
    # Refuses to start without the pseudonym key, before opening the store.
    pseudonym_key = settings.pseudonym_key()
    client = connect(settings.mongo_url)
    store = Customer360Store(client[settings.mongo_db])
    queries = Customer360Queries(store)
    document_store, close_check = document_store_check(settings.mongo_url)
    await serve(
        settings,
        gate=gate,
        grpc_services=[
            GrpcService(
                Customer360Servicer(queries, gate, pseudonym_key),
                customer360_pb2_grpc.add_Customer360ServiceServicer_to_server,
                "crm.customer360.v1.Customer360Service",
            ),
            # The analytics part of a person's export (admins and the platform).
            personal_data_service("analytics", Customer360Exporter(queries)),
        ],
        http_app=create_app(queries, gate, pseudonym_key),
        on_stop=[client.close, close_check],
        # NOT_SERVING / 503 while the document store is down.
        dependencies=[document_store],
    )


def payload_opener(settings: Settings) -> PayloadOpener:
    """The ciphers of every source's key store, once per process (their key
    caches live as long as it does); none without master keys."""
    return PayloadOpener.from_settings(settings, sources())


async def run_project(settings: Settings) -> None:
    client = connect(settings.mongo_url)
    opener = payload_opener(settings)
    try:
        store = Customer360Store(client[settings.mongo_db], opener=opener)
        await asyncio.to_thread(store.ensure_indexes)
        consumer = projection(settings, store)
        await run_worker(
            settings, consumer.heartbeat, consumer.run, details=consumer.health_details
        )
        log.info(
            "projection %s stopped after %d records: %s",
            PROJECTION,
            consumer.stats.records,
            consumer.stats.counters,
        )
    finally:
        opener.close()
        client.close()


async def run_rebuild(settings: Settings) -> int:
    client = connect(settings.mongo_url)
    opener = payload_opener(settings)
    try:
        store = Customer360Store(client[settings.mongo_db], opener=opener)
        started = time.perf_counter()
        await asyncio.to_thread(store.drop)
        await asyncio.to_thread(store.ensure_indexes)
        with stop_on_signals() as stop:
            consumer = projection(settings, store, max_records=REBUILD_BATCH)
            # In each source's log order: a record a contacts merge moved to another
            # customer meets its earlier events (another partition) before the move.
            result = await consumer.run_until_caught_up(stop, in_log_order=True)
        docs = await asyncio.to_thread(store.count)
        seconds = time.perf_counter() - started
        print(
            f"rebuilt {PROJECTION}: {result.records} events, {docs} documents, "
            f"{result.counters.get('dead_letters', 0)} dead letters in {seconds:.1f} s",
            flush=True,
        )
        return 1 if stop.is_set() else 0
    finally:
        opener.close()
        client.close()


PROCESSES = {
    "serve": Process("gRPC and REST API of the 360 view", run_serve),
    "project": Process(
        "keep the 360 view and the audit trail up to date from the topics", run_project
    ),
    "rebuild": Process(
        "drop the 360 view and the audit trail, rebuild them from the topics, exit", run_rebuild
    ),
}


def main(argv: list[str] | None = None) -> None:
    run_cli("analytics", PROCESSES, description=__doc__, argv=argv)


if __name__ == "__main__":
    main()
