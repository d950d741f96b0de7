"""The pipeline's channel to contacts over two real `crm-contacts serve`
replicas sharing one store: calls are spread over both, and when one goes
away the calls go on to the other."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import psutil
from pipeline_support import service_credentials_of

from crm_common.errors import Unavailable
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import clean_environment, start_process, wait_serving
from crm_pipeline.application import PersonToRegister
from crm_pipeline.contacts_client import GrpcContacts


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    times = psutil.Process(process.pid).cpu_times()
    return float(times.user + times.system)


async def test_calls_spread_over_the_replicas_and_survive_losing_one(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], identity: Identity
) -> None:
    replicas = []
    for n in range(2):
        grpc_port, http_port = free_port(), free_port()
        # The replicas trust the session's identity, whose platform key signs the
        # pipeline's own credentials.
        env = clean_environment(
            tmp_path,
            identity,
            CRM_CONTACTS_GRPC_PORT=str(grpc_port),
            CRM_CONTACTS_HTTP_PORT=str(http_port),
        )
        log = tmp_path / f"contacts-{n}.log"
        process = start_process("contacts", "serve", env, log, processes)
        replicas.append((process, grpc_port, http_port, log))
    for process, grpc_port, http_port, log in replicas:
        await wait_serving(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", process, log)

    target = "ipv4:" + ",".join(f"127.0.0.1:{grpc_port}" for _, grpc_port, _, _ in replicas)
    contacts = GrpcContacts(target, service_credentials_of(identity), timeout=10)
    try:
        people = [
            await contacts.register_person(
                PersonToRegister("Ada", f"Replica{i}", email="", phone="", owner="sales"),
                request_id=f"replicas-{i}",
            )
            for i in range(4)
        ]
        before = [cpu_seconds(p) for p, *_ in replicas]
        for _ in range(100):
            for person in people:
                await contacts.ensure_exists("person", person)
        used = [cpu_seconds(p) - b for (p, *_), b in zip(replicas, before, strict=True)]
        # Each replica did a fair part of the 400 lookups (round robin: half each).
        assert min(used) > 0.25 * sum(used), used

        # One replica goes away for good: lookups carry on on the other. At
        # most the calls in flight on the lost connection fail, as UNAVAILABLE.
        lost = replicas[0][0]
        lost.send_signal(signal.SIGKILL)
        await asyncio.to_thread(lost.wait, 10)
        failed = 0
        for _ in range(20):
            for person in people:
                try:
                    await contacts.ensure_exists("person", person)
                except Unavailable:
                    failed += 1
        assert failed <= 2, f"{failed} of 80 lookups failed after one replica was lost"
        # Everything written through either replica is in the one store.
        again = await contacts.register_person(
            PersonToRegister("Ada", "Replica0", email="", phone="", owner="sales"),
            request_id="replicas-0",
        )
        assert again == people[0]
    finally:
        await contacts.close()
