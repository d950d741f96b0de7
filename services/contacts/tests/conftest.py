"""Fixtures of the contacts tests: the service over a real event store.

SQLite stores live in the test's temporary directory. PostgreSQL tests run on
the tests' own PostgreSQL server (`crm_deploy.testing.postgres_target`), each
in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from contacts_support import Clock, sqlite_settings

from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_deploy.testing import drop_schema, postgres_settings, postgres_target


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema, dropped after the test."""
    postgres_target()
    schema = f"contacts_test_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The settings of an empty event store: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_settings(tmp_path)
    schema: str = request.getfixturevalue("postgres_schema")
    return postgres_settings("contacts", schema)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(store_settings: Settings, clock: Clock) -> AsyncIterator[ContactsService]:
    contacts = ContactsService(create_application(store_settings), clock=clock)
    yield contacts
    contacts.close()


@pytest.fixture
async def sqlite_service(tmp_path: Path, clock: Clock) -> AsyncIterator[ContactsService]:
    """The service on SQLite only (for adapter tests, where the store is not the point)."""
    contacts = ContactsService(create_application(sqlite_settings(tmp_path)), clock=clock)
    yield contacts
    contacts.close()
