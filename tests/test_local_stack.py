"""The `crm-stack` command as an operator uses it: up, status, down, up again, wipe,
restart one process, Kafka back at once after a crash, health and metrics per process.

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

from crm_deploy.process import free_port, read_pid_file

# Starts the whole stack through its command line.
pytestmark = pytest.mark.servers

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


def test_up_refuses_a_busy_port_and_names_it(stack_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(stack_env["CRM_KAFKA_PORT"])))
        squatter.listen()
        up = crm_stack(stack_env, "up", "--detach", "--only", ONLY)
    assert up.returncode != 0
    assert f"kafka ({stack_env['CRM_KAFKA_PORT']})" in up.stderr + up.stdout
    assert pids(stack_env) == {}
