"""`crm-contacts serve|relay` as real processes, started the way the local stack does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_deploy.process import free_port

COMMAND = str(Path(sys.executable).with_name("crm-contacts"))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CRM_", "POSTGRES_"))}
    env.update(CRM_DATA_DIR=str(tmp_path), CRM_EVENT_STORE="sqlite", **extra)
    return env


def start(
    command: str, env: dict[str, str], log: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [COMMAND, command], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    started.append(process)
    return process


async def wait_serving(grpc_target: str, http_url: str, process: Any, log: Path) -> None:
    """The local stack's readiness check: gRPC health SERVING and GET /healthz 200."""
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(grpc_target) as channel, httpx.AsyncClient() as http:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise AssertionError(f"exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                healthz = await http.get(f"{http_url}/healthz", timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING and healthz.is_success:
                    return
            except (grpc.aio.AioRpcError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in time:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)


async def stop(process: subprocess.Popen[bytes], log: Path) -> int:
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 30)
    assert code == 0, log.read_text()[-3000:]
    return code


async def test_serve_answers_grpc_and_rest_and_keeps_its_data_across_restarts(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = environment(
        tmp_path,
        CRM_CONTACTS_GRPC_PORT=str(grpc_port),
        CRM_CONTACTS_HTTP_PORT=str(http_port),
    )
    target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    log = tmp_path / "serve.log"

    first = start("serve", env, log, processes)
    await wait_serving(target, base, first, log)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        created = await stub.CreatePerson(
            c.CreatePersonRequest(given_name="Ada", family_name="Lovelace", request_id="r-1")
        )
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="crm.contacts.v1.ContactsService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in listed for s in r.list_services_response.service}
        assert "crm.contacts.v1.ContactsService" in services
    async with httpx.AsyncClient(base_url=base) as http:
        rest = await http.post(
            "/persons", json={"given_name": "Grace", "family_name": "Hopper"}, timeout=10
        )
        assert rest.status_code == 201, rest.text
        bad = await http.post("/persons", json={"given_name": ""}, timeout=10)
        assert bad.status_code == 422
        assert [d["field"] for d in bad.json()["detail"]] == ["given_name"]
    await stop(first, log)
    assert (tmp_path / "contacts" / "events.sqlite").exists()

    second = start("serve", env, log, processes)
    await wait_serving(target, base, second, log)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        again = await stub.CreatePerson(
            c.CreatePersonRequest(given_name="Ada", family_name="Lovelace", request_id="r-1")
        )
        assert (again.result.id, again.result.replayed) == (created.result.id, True)
        found = await stub.ListContacts(c.ListContactsRequest())
        assert sorted(x.name for x in found.contacts) == ["Ada Lovelace", "Grace Hopper"]
    await stop(second, log)


async def test_relay_runs_until_stopped_while_kafka_is_unreachable(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    health_port = free_port()
    env = environment(
        tmp_path,
        CRM_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        CRM_HEALTH_PORT=str(health_port),
    )
    log = tmp_path / "relay.log"
    relay = start("relay", env, log, processes)
    deadline = time.monotonic() + 60
    while "relay crm.contacts.events starts after position 0" not in log.read_text():
        assert relay.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    # Without a broker it keeps retrying instead of exiting: alive (a restart
    # would not bring the broker back), and its health report says why it
    # publishes nothing.
    async with httpx.AsyncClient() as http:
        while True:
            health = await http.get(f"http://127.0.0.1:{health_port}/healthz", timeout=5)
            report = health.json()
            if report["last_error"] is not None:
                break
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.1)
    assert health.status_code == 200
    assert report["status"] == "ok"
    assert "Kafka" in report["last_error"] or "Connect" in report["last_error"], report
    assert (report["topic"], report["position"], report["published"]) == (
        "crm.contacts.events",
        0,
        0,
    )
    assert relay.poll() is None, log.read_text()[-3000:]
    await stop(relay, log)
    assert "relay crm.contacts.events stopped at position 0" in log.read_text()
