"""`crm-contacts serve|relay` as real processes, started the way the local stack does."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm_common.clients import service_channel
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    bearer,
    clean_environment,
    grpc_auth,
    start_process,
    stop_gracefully,
    wait_serving,
)

SERVICE = "contacts"


def start(
    command: str, env: dict[str, str], log: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    return start_process(SERVICE, command, env, log, started)


async def test_serve_answers_grpc_and_rest_and_keeps_its_data_across_restarts(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    grpc_port, http_port = free_port(), free_port()
    token = identity.mint("sales", subject="grace")
    env = clean_environment(
        tmp_path,
        identity,
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
            c.CreatePersonRequest(given_name="Ada", family_name="Lovelace", request_id="r-1"),
            metadata=grpc_auth(token),
        )
        # Health and reflection need no token.
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="crm.contacts.v1.ContactsService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in listed for s in r.list_services_response.service}
        assert "crm.contacts.v1.ContactsService" in services
    async with httpx.AsyncClient(base_url=base, headers=bearer(token)) as http:
        rest = await http.post(
            "/persons", json={"given_name": "Grace", "family_name": "Hopper"}, timeout=10
        )
        assert rest.status_code == 201, rest.text
        bad = await http.post("/persons", json={"given_name": ""}, timeout=10)
        assert bad.status_code == 422
        assert [d["field"] for d in bad.json()["detail"]] == ["given_name"]
    await stop_gracefully(first, log)
    assert (tmp_path / "contacts" / "events.sqlite").exists()

    second = start("serve", env, log, processes)
    await wait_serving(target, base, second, log)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        again = await stub.CreatePerson(
            c.CreatePersonRequest(given_name="Ada", family_name="Lovelace", request_id="r-1"),
            metadata=grpc_auth(token),
        )
        assert (again.result.id, again.result.replayed) == (created.result.id, True)
        found = await stub.ListContacts(c.ListContactsRequest(), metadata=grpc_auth(token))
        assert sorted(x.name for x in found.contacts) == ["Ada Lovelace", "Grace Hopper"]
    await stop_gracefully(second, log)


async def test_relay_runs_until_stopped_while_kafka_is_unreachable(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    health_port = free_port()
    env = clean_environment(
        tmp_path,
        identity,
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
    await stop_gracefully(relay, log)
    assert "relay crm.contacts.events stopped at position 0" in log.read_text()


async def test_connections_are_recycled_without_failing_a_call(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    """The API closes each gRPC connection after CRM_GRPC_MAX_CONNECTION_AGE_MS
    (here 300 ms instead of 5 minutes), so clients reconnect and find new
    replicas; callers never see it: no call fails while connections come and go."""
    grpc_port, http_port = free_port(), free_port()
    env = clean_environment(
        tmp_path,
        identity,
        CRM_CONTACTS_GRPC_PORT=str(grpc_port),
        CRM_CONTACTS_HTTP_PORT=str(http_port),
        CRM_GRPC_MAX_CONNECTION_AGE_MS="300",
    )
    log = tmp_path / "serve.log"
    server = start("serve", env, log, processes)
    target = f"127.0.0.1:{grpc_port}"
    await wait_serving(target, f"http://127.0.0.1:{http_port}", server, log)
    client_ports: set[int] = set()
    calls = 0
    auth = grpc_auth(identity.mint("sales"))
    async with service_channel(target) as channel:
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        created = await stub.CreatePerson(c.CreatePersonRequest(given_name="Ada"), metadata=auth)
        deadline = time.monotonic() + 4

        async def caller() -> None:
            nonlocal calls
            while time.monotonic() < deadline:
                got = await stub.GetContact(
                    c.GetContactRequest(id=created.result.id), metadata=auth
                )
                assert got.contact.id == created.result.id
                calls += 1

        async def watch() -> None:
            while time.monotonic() < deadline:
                for conn in psutil.Process(server.pid).net_connections("tcp"):
                    if conn.laddr.port == grpc_port and conn.raddr:
                        client_ports.add(conn.raddr.port)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(caller() for _ in range(4)), watch())
    assert calls > 100
    # Connections were replaced several times over the four seconds.
    assert len(client_ports) >= 4, client_ports
    await stop_gracefully(server, log)
