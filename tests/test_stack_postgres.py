"""`crm-stack up --postgres`: the write services store their events in PostgreSQL,
the personal data in them sealed, their data keys in their schemas where the
services that consume their events find them.

Runs its own stack (not the session's) through the command line on free
ports in a scratch directory, with only the contacts API, and a PostgreSQL
the stack starts itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.sql import SQL, Identifier

from crm_common.privacy import key_client
from crm_common.settings import Settings
from crm_deploy.postgres import PostgresTarget
from crm_deploy.process import free_port, port_in_use
from crm_deploy.stack import Stack, StackConfig, load_state
from crm_deploy.testing import postgres_cells, settings_in

pytestmark = pytest.mark.servers

CRM_STACK = str(Path(sys.executable).with_name("crm-stack"))


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "OTEL_"))}
    env.update(
        CRM_DATA_DIR=str(tmp_path / "var"),
        CRM_KAFKA_PORT=str(free_port()),
        CRM_ZOOKEEPER_PORT=str(free_port()),
        CRM_MONGO_PORT=str(free_port()),
        CRM_POSTGRES_PORT=str(free_port()),
        CRM_CONTACTS_GRPC_PORT=str(free_port()),
        CRM_CONTACTS_HTTP_PORT=str(free_port()),
        CRM_CONTACTS_API_HEALTH_PORT=str(free_port()),
    )
    yield env
    subprocess.run([CRM_STACK, "down"], env=env, capture_output=True, timeout=180)


def crm_stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CRM_STACK, *args], env=env, capture_output=True, text=True, timeout=300)


def stored_events(port: int, schema: str) -> int:
    """Rows in the tables of `schema` (the service's event store) on the stack's server."""
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        ]
        total = 0
        for table in tables:
            row = conn.execute(
                SQL("SELECT count(*) FROM {}.{}").format(Identifier(schema), Identifier(table))
            ).fetchone()
            total += int(row[0]) if row else 0
        return total


def postgres_settings_of(stack_env: dict[str, str], service: str) -> Settings:
    """The settings a process of `service` of the running stack reads."""
    data_dir = Path(stack_env["CRM_DATA_DIR"])
    state = load_state(data_dir)
    assert state is not None
    settings: Settings = settings_in(
        Stack(StackConfig.from_json(state["config"])).service_env(), service
    )
    return settings


def found_in_schema(port: int, schema: str, values: list[str]) -> list[str]:
    """Those of `values` a raw read of every row of every table of `schema` finds."""
    target = PostgresTarget("127.0.0.1", port)
    blobs = [blob for where, blob in postgres_cells(target) if where.startswith(f"{schema}.")]
    return [value for value in values if any(value.encode() in blob for blob in blobs)]


def test_up_with_postgres_stores_a_services_events_there(stack_env: dict[str, str]) -> None:
    up = crm_stack(stack_env, "up", "--detach", "--postgres", "--only", "contacts-api")
    assert up.returncode == 0, up.stderr
    assert "CRM platform ready" in up.stdout
    pg_port = int(stack_env["CRM_POSTGRES_PORT"])
    assert f"PostgreSQL 127.0.0.1:{pg_port}" in up.stdout
    before = stored_events(pg_port, "contacts")

    data_dir = Path(stack_env["CRM_DATA_DIR"])
    token = (data_dir / "identity" / "tokens" / "sales.jwt").read_text().strip()
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack_env['CRM_CONTACTS_HTTP_PORT']}/persons",
        data=json.dumps(
            {
                "given_name": "Ada",
                "family_name": "Lovelace",
                "channels": [{"channel": "email", "address": "ada@example.com"}],
            }
        ).encode(),
        headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status in (200, 201)
        created = json.loads(reply.read())
    assert created["position"] >= 1

    # The event is in the contacts schema of the stack's PostgreSQL, not in a SQLite file.
    assert stored_events(pg_port, "contacts") > before
    assert not list((data_dir / "contacts").glob("*.sqlite"))

    # Sealed under the person's data key, kept in the same schema, wrapped by the
    # stack's development master key: the name is nowhere in clear there.
    settings = postgres_settings_of(stack_env, "contacts")
    assert settings.master_keys_file == str(data_dir / "identity" / "master-keys")
    assert found_in_schema(pg_port, "contacts", ["Lovelace", "ada@example.com"]) == []
    # A consumer of the contacts topic (the 360 projector) finds and reads that key.
    projector = key_client(postgres_settings_of(stack_env, "analytics"), owner="contacts")
    owner = key_client(settings)
    assert projector is not None and owner is not None
    try:
        key = projector.key_for_reading(created["id"], purpose="360 view")
        assert key == owner.key_for_reading(created["id"])
        assert [a.accessor for a in owner.store.accesses(created["id"])] == ["analytics"]
    finally:
        projector.close()
        owner.close()

    down = crm_stack(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert not port_in_use(pg_port, "127.0.0.1"), "the stack's PostgreSQL is still running"


def test_a_server_named_by_the_environment_is_used_instead_of_starting_one() -> None:
    env = {
        "CRM_POSTGRES_HOST": "db.internal",
        "CRM_POSTGRES_PORT": "6432",
        "CRM_POSTGRES_USER": "crm",
        "CRM_POSTGRES_PASSWORD": "secret",
    }
    config = StackConfig.from_env(env, postgres=True)
    service_env = Stack(config).service_env()
    assert service_env["CRM_EVENT_STORE"] == "postgres"
    assert (service_env["CRM_POSTGRES_HOST"], service_env["CRM_POSTGRES_PORT"]) == (
        "db.internal",
        "6432",
    )
    assert (service_env["CRM_POSTGRES_USER"], service_env["CRM_POSTGRES_PASSWORD"]) == (
        "crm",
        "secret",
    )
    # Each service in the schema named after it: no schema forced on all of them.
    assert "CRM_POSTGRES_SCHEMA" not in service_env
    # And the setting survives the state file the other commands read.
    assert StackConfig.from_json(config.to_json()).postgres_target == config.postgres_target
    # Without the flag the services stay on SQLite files.
    assert StackConfig.from_env(env).postgres_target is None
