"""Metrics read the way an operator reads them: `GET /metrics` on each process's
health port, in the Prometheus text format, over the real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROJECTOR = "analytics-projector"
PROJECTOR_WORKER = "customer360 projection"
#: How long the projector stays stopped while the load goes on.
STOPPED_FOR = 6.0
#: Commands a second of the load (bounded: it runs for seconds, not minutes).
RATE = 25


def metrics_url(platform: Any, process: str) -> str:
    return f"http://127.0.0.1:{platform.stack.config.health_ports[process]}/metrics"


def samples(text: str, name: str) -> dict[str, float]:
    """`labels -> value` of every sample of one metric in a Prometheus text page."""
    found = {}
    # Label values may hold braces themselves (`http_route="/contacts/{contact_id}"`).
    pattern = re.compile(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def worker_value(text: str, name: str, worker: str) -> float | None:
    for labels, value in samples(text, name).items():
        if f'worker="{worker}"' in labels:
            return value
    return None


async def scrape(http: httpx.AsyncClient, url: str) -> str | None:
    try:
        reply = await http.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return reply.text


async def test_the_projector_lag_rises_while_it_is_stopped_and_falls_to_zero(
    platform: Any,
) -> None:
    """SIGSTOP the projector while contacts are written; once it runs again its lag
    metric (in events and in seconds) is above zero, then falls back to zero."""
    projector = platform.process(PROJECTOR)
    url = metrics_url(platform, PROJECTOR)
    run = secrets.token_hex(4)
    written = 0
    stop_load = asyncio.Event()

    async def load(stub: Any) -> None:
        nonlocal written
        while not stop_load.is_set():
            started = time.monotonic()
            await stub.CreatePerson(
                c.CreatePersonRequest(given_name=f"Lag{written}", family_name=f"Metric{run}")
            )
            written += 1
            await asyncio.sleep(max(0.0, 1 / RATE - (time.monotonic() - started)))

    async with (
        platform.channel(platform.contacts_grpc) as channel,
        httpx.AsyncClient() as http,
    ):
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        writer = asyncio.create_task(load(stub))
        try:
            # Running: the projector keeps up (lag 0 at some scrape).
            deadline = time.monotonic() + 60
            while True:
                text = await scrape(http, url)
                if text and worker_value(text, "crm_worker_lag_events", PROJECTOR_WORKER) == 0:
                    break
                assert time.monotonic() < deadline, f"projector lag never 0:\n{text}"
                await asyncio.sleep(0.2)

            os.kill(projector.pid, signal.SIGSTOP)
            try:
                before = written
                await asyncio.sleep(STOPPED_FOR)
                assert written > before + 10, "the load did not go on while it was stopped"
            finally:
                os.kill(projector.pid, signal.SIGCONT)

            # Behind: the first scrapes after it resumes show a lag above zero.
            events_seen, seconds_seen = 0.0, 0.0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (events_seen and seconds_seen):
                text = await scrape(http, url)
                if text:
                    events = worker_value(text, "crm_worker_lag_events", PROJECTOR_WORKER) or 0
                    seconds = worker_value(text, "crm_worker_lag_seconds", PROJECTOR_WORKER) or 0
                    events_seen = max(events_seen, events)
                    seconds_seen = max(seconds_seen, seconds)
                await asyncio.sleep(0.05)
        finally:
            stop_load.set()
            await writer
        assert events_seen > 0, "the lag in events never rose above zero"
        assert seconds_seen > 0, "the lag in seconds never rose above zero"

        # Caught up: back to zero once the load has stopped.
        deadline = time.monotonic() + 60
        while True:
            text = await scrape(http, url)
            if text:
                events = worker_value(text, "crm_worker_lag_events", PROJECTOR_WORKER)
                seconds = worker_value(text, "crm_worker_lag_seconds", PROJECTOR_WORKER)
                if events == 0 and seconds == 0:
                    break
            assert time.monotonic() < deadline, f"the lag did not fall to zero:\n{text}"
            await asyncio.sleep(0.2)
        assert worker_value(text, "crm_worker_up", PROJECTOR_WORKER) == 1


async def test_rpc_and_route_metrics_count_calls_errors_and_latency(platform: Any) -> None:
    """Each gRPC method and REST route has a latency histogram whose count grows with
    every call, labelled with its status: errors are told from successes."""
    url = metrics_url(platform, "contacts-api")
    method = "/crm.contacts.v1.ContactsService/GetContact"
    async with (
        platform.channel(platform.contacts_grpc) as channel,
        httpx.AsyncClient(base_url=platform.contacts_http, headers=platform.headers()) as http,
    ):
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        created = await stub.CreatePerson(
            c.CreatePersonRequest(given_name="Metered", family_name=secrets.token_hex(4))
        )
        before = await http.get(url)
        await stub.GetContact(c.GetContactRequest(id=created.result.id))
        missing = 0
        for _ in range(2):
            try:
                await stub.GetContact(
                    c.GetContactRequest(id="00000000-0000-0000-0000-000000000000")
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                missing += 1
        assert missing == 2
        assert (await http.get(f"/contacts/{created.result.id}")).status_code == 200
        assert (await http.get("/contacts/00000000-0000-0000-0000-000000000000")).status_code == 404
        after = (await http.get(url)).text

    def count(text: str, name: str, *labels: str) -> float:
        return sum(
            v for k, v in samples(text, f"{name}_count").items() if all(x in k for x in labels)
        )

    rpc = "crm_rpc_server_duration_seconds"
    ok = (f'rpc_method="{method}"', 'rpc_grpc_status_code="OK"')
    not_found = (f'rpc_method="{method}"', 'rpc_grpc_status_code="NOT_FOUND"')
    assert count(after, rpc, *ok) == count(before.text, rpc, *ok) + 1
    assert count(after, rpc, *not_found) == count(before.text, rpc, *not_found) + 2
    route = 'http_route="/contacts/{contact_id}"'
    http_metric = "crm_http_server_duration_seconds"
    http_lines = [line for line in after.splitlines() if line.startswith(f"{http_metric}_count")]
    assert count(after, http_metric, route, 'http_response_status_code="200"') >= 1, http_lines
    assert count(after, http_metric, route, 'http_response_status_code="404"') >= 1
    # Ids never become labels.
    assert created.result.id not in after
    # Latency buckets are there for each.
    assert f'{rpc}_bucket{{le="0.1",' in after


def test_the_load_generator_drives_mixed_traffic_and_reports_it(
    platform: Any, tmp_path: Path
) -> None:
    """`python -m bench.loadgen` against the running stack: every operation of the mix
    runs, none fails, the report has percentiles, and the API's metrics saw the calls."""
    url = metrics_url(platform, "contacts-api")

    def creates(text: str) -> float:
        return sum(
            v
            for k, v in samples(text, "crm_rpc_server_duration_seconds_count").items()
            if "CreatePerson" in k
        )

    before = creates(httpx.get(url).text)
    figures = tmp_path / "load.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--rate",
            "30",
            "--duration",
            "4",
            "--data-dir",
            str(platform.stack.config.data_dir),
            "--json",
            str(figures),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "p95 ms" in result.stdout and "operations in" in result.stdout
    assert " ok " in result.stderr  # the progress line
    document = json.loads(figures.read_text())
    for name, op in document["operations"].items():
        assert op["ok"] > 0 and op["errors"] == {}, (name, op)
        assert op["p50_ms"] <= op["p95_ms"] <= op["p99_ms"] <= op["max_ms"]
    gr = document["operations"]["create-person-grpc"]["ok"]
    assert creates(httpx.get(url).text) >= before + gr


def test_the_load_generator_refuses_an_unknown_operation() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--mix", "delete-everything=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown operation 'delete-everything'" in result.stderr
