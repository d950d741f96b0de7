"""Fixtures of the tickets tests: the service over a real event store.

SQLite stores live in the test's temporary directory. PostgreSQL tests run on
the tests' own PostgreSQL server (`crm_deploy.testing.postgres_target`), each
in a schema of its own that is dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tickets_support import sqlite_settings

from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings, postgres_target


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema, dropped after the test."""
    postgres_target()
    schema = f"tickets_test_{uuid.uuid4().hex[:12]}"
    yield schema
    drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The settings of an empty event store: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_settings(tmp_path)
    schema: str = request.getfixturevalue("postgres_schema")
    return postgres_settings("tickets", schema)
