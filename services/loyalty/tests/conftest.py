"""Fixtures of the loyalty tests: the service over a real event store.

SQLite stores live in the test's temporary directory. PostgreSQL tests run on
the tests' own PostgreSQL server (`crm_deploy.testing.postgres_target`), each
in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from loyalty_support import Clock, KnownContacts, sqlite_settings

from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings, postgres_target
from crm_loyalty.application import LoyaltyService, create_application


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def contacts() -> KnownContacts:
    return KnownContacts("c-1", "c-2")


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema, dropped after the test."""
    postgres_target()
    schema = f"loyalty_test_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The settings of an empty event store: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_settings(tmp_path)
    schema: str = request.getfixturevalue("postgres_schema")
    return postgres_settings("loyalty", schema)


@pytest.fixture
async def service(
    store_settings: Settings, clock: Clock, contacts: KnownContacts
) -> AsyncIterator[LoyaltyService]:
    loyalty = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    yield loyalty
    loyalty.close()


@pytest.fixture
async def sqlite_service(
    tmp_path: Path, clock: Clock, contacts: KnownContacts
) -> AsyncIterator[LoyaltyService]:
    """The service on SQLite only (adapter tests, where the store is not the point)."""
    loyalty = LoyaltyService(create_application(sqlite_settings(tmp_path)), contacts, clock=clock)
    yield loyalty
    loyalty.close()
