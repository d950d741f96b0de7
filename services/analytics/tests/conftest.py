"""Fixtures of the analytics tests: real servers, started once per test run."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
from contact_events import create_topic
from local_servers import Servers, start_all, stop_all
from pymongo import MongoClient
from pymongo.database import Database

from crm_analytics.customer360 import Doc
from crm_analytics.store import connect


@pytest.fixture(scope="session")
def analytics_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("analytics-servers")
    servers, processes = start_all(root)
    try:
        yield servers
    finally:
        stop_all(processes)
        if not os.environ.get("CRM_KEEP_TEST_DATA"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mongo(analytics_servers: Servers) -> Iterator[MongoClient[Doc]]:
    client = connect(analytics_servers.mongo_url)
    yield client
    client.close()


@pytest.fixture
def database(mongo: MongoClient[Doc]) -> Database[Doc]:
    """A database of its own per test: no test sees another's documents or offsets."""
    return mongo[f"analytics_{uuid.uuid4().hex[:10]}"]


@pytest.fixture
async def topic(analytics_servers: Servers) -> str:
    name = f"crm.contacts.events.{uuid.uuid4().hex[:8]}"
    await create_topic(analytics_servers.kafka_bootstrap, name)
    return name
