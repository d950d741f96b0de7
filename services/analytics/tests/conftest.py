"""Fixtures of the analytics tests, over the session's shared local stack."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from contact_events import create_topic
from pymongo import MongoClient
from pymongo.database import Database

from crm_analytics.store import connect
from crm_deploy.stack import Stack


@pytest.fixture(scope="session")
def analytics_servers(local_stack: Stack) -> Stack:
    """Kafka and the document store of the shared stack (`kafka_bootstrap`, `mongo_url`)."""
    return local_stack


@pytest.fixture(scope="session")
def mongo(local_stack: Stack) -> Iterator[MongoClient[dict[str, Any]]]:
    client = connect(local_stack.mongo_url)
    yield client
    client.close()


@pytest.fixture
def database(mongo: MongoClient[dict[str, Any]]) -> Database[Any]:
    """A database of its own per test: no test sees another's documents or offsets."""
    return mongo[f"analytics_{uuid.uuid4().hex[:10]}"]


@pytest.fixture
async def topic(local_stack: Stack) -> str:
    name = f"crm.contacts.events.{uuid.uuid4().hex[:8]}"
    await create_topic(local_stack.kafka_bootstrap, name)
    return name


@pytest.fixture
async def pipeline_topic(local_stack: Stack) -> str:
    name = f"crm.pipeline.events.{uuid.uuid4().hex[:8]}"
    await create_topic(local_stack.kafka_bootstrap, name)
    return name
