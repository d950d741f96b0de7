"""The event store's recorders keep the library's recorder contract.

`crm_common.eventstore` subclasses the library's SQLite and PostgreSQL
application recorders to add `position_of`. The library's own recorder test
cases run against those subclasses here, on a real SQLite file and in a fresh
PostgreSQL schema, together with tests of the addition itself.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.sqlite import SQLiteDatastore

from crm_common.eventstore import (
    PositionedPostgresApplicationRecorder,
    PositionedSQLiteApplicationRecorder,
)
from crm_deploy.testing import create_schema, drop_schema, postgres_target

try:
    from eventsourcing.tests.persistence import ApplicationRecorderTestCase
except ModuleNotFoundError as missing:  # the library's test module imports its cipher
    LIBRARY_CASES_MISSING: str | None = (
        f"the library's recorder test cases cannot be imported ({missing}); "
        "they need pycryptodome among the dev dependencies"
    )
else:
    LIBRARY_CASES_MISSING = None


def sqlite_recorder(directory: str) -> PositionedSQLiteApplicationRecorder:
    datastore = SQLiteDatastore(str(Path(directory) / "events.sqlite"))
    recorder = PositionedSQLiteApplicationRecorder(datastore)
    recorder.create_table()
    return recorder


def postgres_recorder(schema: str) -> tuple[PositionedPostgresApplicationRecorder, Any]:
    target = postgres_target()
    datastore = PostgresDatastore(
        dbname=target.dbname,
        host=target.host,
        port=str(target.port),
        user=target.user,
        password=target.password,
        schema=schema,
        pool_size=4,
        max_overflow=12,
    )
    recorder = PositionedPostgresApplicationRecorder(datastore)
    recorder.create_table()
    return recorder, datastore


# -- the addition: position_of ------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def recorder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        yield sqlite_recorder(str(tmp_path))
        return
    schema: str = request.getfixturevalue("postgres_schema")
    create_schema(schema)
    postgres, datastore = postgres_recorder(schema)
    yield postgres
    datastore.close()


def test_position_of_is_the_notification_id_of_the_stored_event(recorder: Any) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    recorder.insert_events(
        [
            StoredEvent(first, 1, "topic1", b"a"),
            StoredEvent(second, 1, "topic1", b"b"),
            StoredEvent(first, 2, "topic2", b"c"),
        ]
    )
    ids = {
        (n.originator_id, n.originator_version): n.id for n in recorder.select_notifications(1, 10)
    }
    assert len(set(ids.values())) == 3
    assert recorder.position_of(first, 1) == ids[(first, 1)]
    assert recorder.position_of(first, 2) == ids[(first, 2)]
    assert recorder.position_of(second, 1) == ids[(second, 1)]


def test_position_of_an_event_never_stored_is_none(recorder: Any) -> None:
    known = uuid.uuid4()
    recorder.insert_events([StoredEvent(known, 1, "topic1", b"a")])
    assert recorder.position_of(known, 2) is None
    assert recorder.position_of(uuid.uuid4(), 1) is None


# -- the library's contract -----------------------------------------------------------------

if LIBRARY_CASES_MISSING is not None:

    def test_the_library_recorder_cases() -> None:
        pytest.skip(str(LIBRARY_CASES_MISSING))

else:

    class TestPositionedSQLiteApplicationRecorder(
        ApplicationRecorderTestCase[PositionedSQLiteApplicationRecorder]
    ):
        def setUp(self) -> None:
            self.directory = tempfile.TemporaryDirectory()

        def tearDown(self) -> None:
            self.directory.cleanup()

        def create_recorder(self) -> PositionedSQLiteApplicationRecorder:
            return sqlite_recorder(self.directory.name)

    @pytest.mark.postgres
    class TestPositionedPostgresApplicationRecorder(
        ApplicationRecorderTestCase[PositionedPostgresApplicationRecorder]
    ):
        def setUp(self) -> None:
            self.schema = f"contacts_rec_{uuid.uuid4().hex[:12]}"
            create_schema(self.schema)
            self.datastores: list[Any] = []

        def tearDown(self) -> None:
            for datastore in self.datastores:
                datastore.close()
            drop_schema(self.schema)

        def create_recorder(self) -> PositionedPostgresApplicationRecorder:
            recorder, datastore = postgres_recorder(self.schema)
            self.datastores.append(datastore)
            return recorder
