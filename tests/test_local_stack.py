"""The `crm-stack` command as an operator uses it: up, status, down, up again, wipe,
restart one process, Kafka back at once after a crash, health and metrics per process;
the development master keys every process of the stack seals personal data with.

Runs its own stack (not the session's) on free ports in a scratch directory,
with only the analytics processes, so it stays quick.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pymongo import MongoClient

from crm_common.privacy import key_client
from crm_common.privacy.keystore import KeyStoreLocation
from crm_common.privacy.masterkeys import MASTER_KEYS_FILE_VAR, parse_master_keys
from crm_common.registry import SERVICES
from crm_common.settings import Settings
from crm_deploy.identity import Identity
from crm_deploy.process import free_port, read_pid_file
from crm_deploy.stack import STACK_PROCESSES, Stack, StackConfig

# The tests that start the stack through its command line are marked `servers`
# one by one; the master key tests at the end start nothing.

CRM_STACK = str(Path(sys.executable).with_name("crm-stack"))
ONLY = "analytics-api,analytics-projector"


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "OTEL_"))}
    env.update(
        CRM_DATA_DIR=str(tmp_path / "var"),
        CRM_KAFKA_PORT=str(free_port()),
        CRM_ZOOKEEPER_PORT=str(free_port()),
        CRM_MONGO_PORT=str(free_port()),
        CRM_ANALYTICS_GRPC_PORT=str(free_port()),
        CRM_ANALYTICS_HTTP_PORT=str(free_port()),
        CRM_ANALYTICS_API_HEALTH_PORT=str(free_port()),
        CRM_ANALYTICS_PROJECTOR_HEALTH_PORT=str(free_port()),
    )
    yield env
    # Whatever a failed test left running.
    subprocess.run([CRM_STACK, "down"], env=env, capture_output=True, timeout=180)


def crm_stack(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CRM_STACK, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def mongo_url(env: dict[str, str]) -> str:
    return f"mongodb://127.0.0.1:{env['CRM_MONGO_PORT']}/?replicaSet=secantus"


def pids(env: dict[str, str]) -> dict[str, int]:
    run = Path(env["CRM_DATA_DIR"]) / "run"
    found = {}
    for name in ("zookeeper", "kafka", "secantus", "analytics-api", "analytics-projector"):
        record = read_pid_file(run / f"{name}.pid")
        if record is not None and record.process() is not None:
            found[name] = record.pid
    return found


@pytest.mark.servers
def test_up_status_down_up_keeps_data_and_wipe_deletes_it(stack_env: dict[str, str]) -> None:
    up = crm_stack(stack_env, "up", "--detach", "--only", ONLY)
    assert up.returncode == 0, up.stderr
    assert "CRM platform ready" in up.stdout
    for port in ("CRM_KAFKA_PORT", "CRM_MONGO_PORT", "CRM_ANALYTICS_GRPC_PORT"):
        assert f"127.0.0.1:{stack_env[port]}" in up.stdout
    assert f"http://127.0.0.1:{stack_env['CRM_ANALYTICS_HTTP_PORT']}" in up.stdout

    status = crm_stack(stack_env, "status")
    assert status.returncode == 0
    running = {line.split()[0] for line in status.stdout.splitlines() if " running " in line}
    assert running == {"zookeeper", "kafka", "secantus", "analytics-api", "analytics-projector"}
    # Each service process on a health port of its own, ready, listed by status.
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if " running " in line}
    for process, variable in (
        ("analytics-api", "CRM_ANALYTICS_API_HEALTH_PORT"),
        ("analytics-projector", "CRM_ANALYTICS_PROJECTOR_HEALTH_PORT"),
    ):
        port = stack_env[variable]
        assert f" {port} " in rows[process] and rows[process].endswith("ready"), status.stdout
        health = get_json(f"http://127.0.0.1:{port}/healthz")
        assert health["ready"] is True and health["status"] == "ok"
        metrics = get_text(f"http://127.0.0.1:{port}/metrics")
        assert "process_start_time_seconds" in metrics
    projector_port = stack_env["CRM_ANALYTICS_PROJECTOR_HEALTH_PORT"]
    assert get_json(f"http://127.0.0.1:{projector_port}/healthz")["worker"].endswith("projection")
    started = pids(stack_env)

    with MongoClient(mongo_url(stack_env)) as client:
        client.crm.notes.insert_one({"_id": "kept", "text": "survives down and up"})

    down = crm_stack(stack_env, "down")
    assert down.returncode == 0, down.stderr
    assert not any(psutil.pid_exists(pid) for pid in started.values())
    assert crm_stack(stack_env, "status").returncode == 3

    again = crm_stack(stack_env, "up", "--detach", "--only", ONLY)
    assert again.returncode == 0, again.stderr
    with MongoClient(mongo_url(stack_env)) as client:
        assert client.crm.notes.find_one({"_id": "kept"})["text"] == "survives down and up"

    refused = crm_stack(stack_env, "wipe")
    assert refused.returncode == 1 and "running" in refused.stdout
    assert crm_stack(stack_env, "down").returncode == 0
    wiped = crm_stack(stack_env, "wipe")
    assert wiped.returncode == 0
    assert not Path(stack_env["CRM_DATA_DIR"]).exists()


@pytest.mark.servers
def test_the_supervisor_restarts_a_crashed_process(stack_env: dict[str, str]) -> None:
    assert crm_stack(stack_env, "up", "--detach", "--only", ONLY).returncode == 0
    victim = pids(stack_env)["analytics-projector"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = pids(stack_env).get("analytics-projector")
        if now is not None and now != victim:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the projector was not restarted within 30 s")
    assert crm_stack(stack_env, "down").returncode == 0


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def get_json(url: str) -> dict[str, object]:
    body: dict[str, object] = json.loads(get_text(url))
    return body


def restarts(env: dict[str, str]) -> dict[str, int]:
    state = json.loads((Path(env["CRM_DATA_DIR"]) / "run" / "stack.json").read_text())
    return dict(state.get("restarts") or {})


@pytest.mark.servers
def test_restart_one_process_of_a_running_stack(stack_env: dict[str, str]) -> None:
    assert crm_stack(stack_env, "up", "--detach", "--only", ONLY).returncode == 0
    before = pids(stack_env)

    # `up --only` on a running stack used to print the banner and do nothing.
    refused = crm_stack(stack_env, "up", "--detach", "--only", "analytics-projector")
    assert refused.returncode == 1
    assert "crm-stack restart" in refused.stderr
    unknown = crm_stack(stack_env, "restart", "no-such-process")
    assert unknown.returncode == 2 and "known:" in unknown.stderr

    restarted = crm_stack(stack_env, "restart", "analytics-projector")
    assert restarted.returncode == 0, restarted.stderr
    assert "restarted and ready" in restarted.stdout
    after = pids(stack_env)
    assert after["analytics-projector"] != before["analytics-projector"]
    assert not psutil.pid_exists(before["analytics-projector"])
    # Only that one.
    for name in ("zookeeper", "kafka", "secantus", "analytics-api"):
        assert after[name] == before[name]
    assert restarts(stack_env) == {"analytics-projector": 1}
    port = stack_env["CRM_ANALYTICS_PROJECTOR_HEALTH_PORT"]
    assert get_json(f"http://127.0.0.1:{port}/readyz")["ready"] is True
    assert crm_stack(stack_env, "down").returncode == 0


@pytest.mark.servers
def test_kafka_killed_comes_back_on_the_first_restart(stack_env: dict[str, str]) -> None:
    """A broker killed with -9 leaves its registration in ZooKeeper until its session
    times out; the supervisor clears it, so the first restart succeeds."""
    assert crm_stack(stack_env, "up", "--detach", "--only", ONLY).returncode == 0
    victim = pids(stack_env)["kafka"]
    log = Path(stack_env["CRM_DATA_DIR"]) / "logs" / "kafka.log"
    os.kill(victim, signal.SIGKILL)
    port = int(stack_env["CRM_KAFKA_PORT"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = pids(stack_env).get("kafka")
        if (
            now is not None
            and now != victim
            and "started (kafka.server.KafkaServer)"
            in (log.read_text(errors="replace").rsplit("starting kafka", 1)[-1])
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"Kafka was not back within 90 s:\n{log.read_text()[-3000:]}")
    with socket.create_connection(("127.0.0.1", port), 5):
        pass
    last_start = log.read_text(errors="replace").rsplit("starting kafka", 1)[-1]
    assert "NodeExistsException" not in last_start
    assert restarts(stack_env).get("kafka") == 1  # one restart, no crash loop
    supervisor_log = (Path(stack_env["CRM_DATA_DIR"]) / "logs" / "supervisor.log").read_text()
    assert "cleared the registration a crashed Kafka left: /brokers/ids/0" in supervisor_log
    # The projector finds the broker again and says it is ready.
    projector = stack_env["CRM_ANALYTICS_PROJECTOR_HEALTH_PORT"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if get_json(f"http://127.0.0.1:{projector}/readyz")["ready"] is True:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the projector did not get ready again after Kafka came back")
    assert crm_stack(stack_env, "down").returncode == 0


@pytest.mark.servers
def test_up_refuses_a_busy_port_and_names_it(stack_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(stack_env["CRM_KAFKA_PORT"])))
        squatter.listen()
        up = crm_stack(stack_env, "up", "--detach", "--only", ONLY)
    assert up.returncode != 0
    assert f"kafka ({stack_env['CRM_KAFKA_PORT']})" in up.stderr + up.stdout
    assert pids(stack_env) == {}


# -- master keys: personal data is sealed in the local stack too ---------------------


def test_identity_writes_the_master_keys_once_and_a_rotation_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "OTEL_"))}
    env["CRM_DATA_DIR"] = str(tmp_path / "var")
    first = crm_stack(env, "identity", timeout=60)
    assert first.returncode == 0, first.stderr
    path = tmp_path / "var" / "identity" / "master-keys"
    assert f"master keys (CRM_MASTER_KEYS_FILE, never overwritten): {path}" in first.stdout
    # Readable by its owner only, one valid AES-256 entry.
    assert path.stat().st_mode & 0o777 == 0o600
    [created] = parse_master_keys(path.read_text())
    assert created.secret not in first.stdout.encode()

    # Run again (every `up` does): the file is left exactly as it was.
    text = path.read_text()
    again = crm_stack(env, "identity", "--rotate", timeout=60)
    assert again.returncode == 0, again.stderr
    assert path.read_text() == text

    rotated = crm_stack(env, "identity", "--rotate-master-key", timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    new, old = parse_master_keys(path.read_text())
    assert old == created and new.id != created.id and new.secret != created.secret
    assert f"current: {new.id}; still unwrapping: {created.id}" in rotated.stdout
    assert "rewrap" in rotated.stdout
    assert path.stat().st_mode & 0o777 == 0o600


def _settings_of(process_env: dict[str, str], service: str, monkeypatch: pytest.MonkeyPatch
                 ) -> Settings:  # fmt: skip
    """The settings a process of `service` reads from the environment the stack gives it."""
    with monkeypatch.context() as patch:
        patch.setattr(os, "environ", dict(process_env))
        return Settings.from_env(service)


@pytest.mark.parametrize("postgres", [False, True], ids=["sqlite", "postgres"])
def test_every_process_of_the_stack_seals_with_the_master_keys_and_finds_each_owners_keys(
    tmp_path: Path, postgres: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = StackConfig.for_tests(tmp_path / "var")
    config.postgres = postgres
    stack = Stack(config)
    identity = stack.ensure_identity()
    assert identity.master_keys.exists()
    envs = {row.name: dict(stack._service(row, None).env or {}) for row in STACK_PROCESSES}
    for name, env in envs.items():
        assert env[MASTER_KEYS_FILE_VAR] == str(identity.master_keys), name
    # The rebuild of the 360 view runs with the stack's service environment too.
    assert stack.service_env()[MASTER_KEYS_FILE_VAR] == str(identity.master_keys)

    # A consumer (the registry's `consumes`) looks for an owner's keys where the
    # owner's own processes keep them: the same file, or the same schema.
    for consumer in (s for s in SERVICES if s.consumes):
        consumer_env = envs[consumer.process_name(consumer.roles[-1])]
        reader = _settings_of(consumer_env, consumer.name, monkeypatch)
        for owner in consumer.consumes:
            own = _settings_of(envs[f"{owner}-api"], owner, monkeypatch)
            assert KeyStoreLocation.of(reader, owner) == KeyStoreLocation.of(own), (
                consumer.name,
                owner,
            )
    if postgres:
        return  # the stack's PostgreSQL is not running here: tests/test_stack_postgres.py

    # On SQLite, for real: a key contacts creates is the key the projector reads.
    contacts = key_client(_settings_of(envs["contacts-api"], "contacts", monkeypatch))
    projector = key_client(
        _settings_of(envs["analytics-projector"], "analytics", monkeypatch), owner="contacts"
    )
    assert contacts is not None and projector is not None
    try:
        written = contacts.key_for_writing("person-1")
        assert projector.key_for_reading("person-1", purpose="360 view") == written
        assert [a.accessor for a in contacts.store.accesses("person-1")] == ["analytics"]
        assert (tmp_path / "var" / "contacts" / "keys.sqlite").exists()
    finally:
        contacts.close()
        projector.close()


def test_a_development_identity_from_before_master_keys_gets_them_on_the_next_up(
    tmp_path: Path,
) -> None:
    stack = Stack(StackConfig.for_tests(tmp_path / "var"))
    identity = stack.ensure_identity()
    identity.master_keys.unlink()
    assert MASTER_KEYS_FILE_VAR not in Identity(identity.root).env()
    stack.ensure_identity()
    assert stack.service_env()[MASTER_KEYS_FILE_VAR] == str(identity.master_keys)
    assert len(identity.master_key_ids()) == 1
