"""`CRM_API_WORKERS`: several processes of one API on the same ports (crm_common.server)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import httpx
import psutil

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
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


async def _workers_of(api: subprocess.Popen[bytes], count: int) -> list[psutil.Process]:
    """The extra processes, once all `count` are there."""
    for _ in range(300):
        children = psutil.Process(api.pid).children()
        if len(children) == count:
            return children
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(children)} worker processes, not {count}")


async def test_workers_share_the_ports_and_stop_together(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    grpc_port, http_port, health_port = free_port(), free_port(), free_port()
    env = clean_environment(
        tmp_path,
        identity,
        CRM_CONTACTS_GRPC_PORT=str(grpc_port),
        CRM_CONTACTS_HTTP_PORT=str(http_port),
        CRM_HEALTH_PORT=str(health_port),
        CRM_API_WORKERS="2",
    )
    target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    log = tmp_path / "serve.log"
    token = identity.mint("sales", subject="grace")
    api = start_process("contacts", "serve", env, log, processes)
    await wait_serving(target, base, api, log)
    (worker,) = await _workers_of(api, 1)
    while "worker 1 of 2" not in log.read_text():
        await asyncio.sleep(0.1)

    # Connections land on either process; every one is served, on both protocols.
    ids = set()
    for i in range(6):
        async with grpc.aio.insecure_channel(target) as channel:
            created = await contacts_pb2_grpc.ContactsServiceStub(channel).CreatePerson(
                c.CreatePersonRequest(given_name=f"Ada{i}", family_name="Lovelace"),
                metadata=grpc_auth(token),
            )
            ids.add(created.result.id)
        async with httpx.AsyncClient(base_url=base, headers=bearer(token)) as http:
            reply = await http.post("/persons", json={"given_name": f"Grace{i}"}, timeout=10)
            assert reply.status_code == 201, reply.text
            ids.add(reply.json()["id"])
    assert len(ids) == 12
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{health_port}/healthz", timeout=5)
        assert health.status_code == 200

    await stop_gracefully(api, log)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


async def test_a_worker_that_dies_stops_the_first_process_with_an_error(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = clean_environment(
        tmp_path,
        identity,
        CRM_CONTACTS_GRPC_PORT=str(grpc_port),
        CRM_CONTACTS_HTTP_PORT=str(http_port),
        CRM_API_WORKERS="3",
    )
    log = tmp_path / "serve.log"
    api = start_process("contacts", "serve", env, log, processes)
    await wait_serving(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", api, log)
    first, second = await _workers_of(api, 2)
    first.kill()
    code = await asyncio.to_thread(api.wait, 60)
    assert code != 0
    assert "exited with status" in log.read_text()
    await asyncio.to_thread(second.wait, 30)
