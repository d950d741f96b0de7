"""Health that tells the truth, over the real processes: every worker on a health
port of its own, ready only while it does its work; an API NOT_SERVING / 503 while
a hard dependency of its calls is down."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from aiokafka.errors import KafkaConnectionError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm_common.health import Dependencies, Dependency, Heartbeat
from crm_common.logs import RepeatFilter
from crm_deploy.identity import Identity
from crm_deploy.process import ManagedProcess, free_port
from crm_deploy.servers import secantus_process, secantus_url
from crm_deploy.stack import SERVICE_PROCESSES
from crm_deploy.testing import clean_environment, start_process, wait_serving

WORKERS = [row.name for row in SERVICE_PROCESSES if not row.api]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the figures and the words of one worker (no servers) ----------------------------


def test_lag_in_events_and_seconds() -> None:
    clock = Clock()
    beat = Heartbeat("customer360 projection", clock=clock)
    assert (beat.lag_events, beat.lag_seconds) == (None, None)  # not measured yet
    beat.lag(0)
    clock.now += 5
    beat.lag(0)
    assert (beat.lag_events, beat.lag_seconds) == (0, 0.0)
    beat.lag(40)  # behind since it was last caught up, 5 s ago... at least
    clock.now += 3
    beat.lag(25)
    assert beat.lag_events == 25 and beat.lag_seconds == 3.0
    beat.lag(0)
    assert beat.lag_seconds == 0.0
    # No longer measuring (waiting for Kafka): not known to be caught up any more.
    clock.now += 30
    assert beat.lag_seconds == 30.0
    report = beat.report()
    assert (report["lag_events"], report["lag_seconds"]) == (0, 30.0)


def test_ready_only_after_a_round_without_error() -> None:
    clock = Clock()
    beat = Heartbeat("crm.contacts.events relay", stale_after=60, clock=clock)
    assert beat.alive and not beat.ready
    beat.beat()
    assert beat.ready
    beat.failed(KafkaConnectionError("broker down"))
    assert beat.alive and not beat.ready
    assert beat.report()["waiting_for"] == "Kafka"
    beat.recovered()
    assert beat.ready and beat.report()["waiting_for"] is None
    clock.now += 61
    assert not beat.alive and not beat.ready


def test_waiting_is_logged_once_per_change_of_state(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    beat = Heartbeat("crm.contacts.events relay", clock=clock)
    caplog.set_level(logging.INFO, logger="crm_common.health")
    for _ in range(40):  # a retry every few hundred ms while Kafka is away
        beat.failed(KafkaConnectionError("Unable to bootstrap from 127.0.0.1:9092"))
        clock.now += 0.25
    beat.recovered()
    beat.recovered()
    lines = [r.getMessage() for r in caplog.records if r.name == "crm_common.health"]
    assert lines == [
        "crm.contacts.events relay: waiting for Kafka: "
        "KafkaConnectionError('Unable to bootstrap from 127.0.0.1:9092')",
        "crm.contacts.events relay: Kafka answers again after 10.0 s",
    ], lines


def test_the_client_librarys_repeats_are_held_back_not_hidden() -> None:
    clock = Clock()
    quiet = RepeatFilter("aiokafka", window=60, clock=clock)

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (), None)

    shown = [quiet.filter(record("aiokafka.conn", "Unable connect to %s")) for _ in range(40)]
    assert shown.count(True) == 1
    # Another message of the library, and the platform's own lines, are not held back.
    assert quiet.filter(record("aiokafka.cluster", "Unable to update metadata"))
    assert all(quiet.filter(record("crm_common.relay", "same line")) for _ in range(5))
    clock.now += 61
    again = record("aiokafka.conn", "Unable connect to %s")
    assert quiet.filter(again)
    assert "39 like it in the last 60 s not shown" in str(again.msg)


async def test_an_api_is_not_serving_while_a_dependency_is_down() -> None:
    down = {"store": False}

    def ping() -> None:
        if down["store"]:
            raise ConnectionError("no answer on 27017")

    watch = Dependencies(Heartbeat("analytics api"), [Dependency("document store", ping)])
    assert await watch.check_once() and watch.serving and watch.heartbeat.ready
    down["store"] = True
    assert not await watch.check_once()
    assert not watch.serving and not watch.heartbeat.ready
    report = watch.heartbeat.report()
    assert report["waiting_for"] == "document store" and "27017" in report["last_error"]
    assert report["status"] == "ok"  # alive all the same: restarting would not help
    down["store"] = False
    assert await watch.check_once() and watch.serving


# -- over the real processes --------------------------------------------------------


async def test_every_worker_serves_its_own_health_port(platform: Any) -> None:
    ports = platform.stack.config.health_ports
    assert len({ports[row.name] for row in SERVICE_PROCESSES}) == len(SERVICE_PROCESSES)
    seen = {}
    async with httpx.AsyncClient() as http:
        for name in WORKERS:
            base = f"http://127.0.0.1:{ports[name]}"
            # Ready: the stack waited for it before the platform fixture returned.
            ready = await http.get(f"{base}/readyz", timeout=5)
            assert ready.status_code == 200, (name, ready.text)
            body = ready.json()
            assert body["ready"] is True and body["last_error"] is None
            seen[name] = body["worker"]
            live = await http.get(f"{base}/healthz", timeout=5)
            assert live.status_code == 200
            page = await http.get(f"{base}/metrics", timeout=5)
            assert page.status_code == 200
            assert f'crm_worker_up{{worker="{body["worker"]}"}} 1.0' in page.text
            missing = await http.get(f"{base}/nothing-here", timeout=5)
            assert missing.status_code == 404
    # Each port is its own process: no two answer for the same worker.
    assert len(set(seen.values())) == len(WORKERS)
    relay = seen["contacts-relay"]
    assert relay.endswith("relay") and "contacts" in relay


async def test_analytics_is_not_serving_while_the_document_store_is_down(
    tmp_path: Path, identity: Identity, processes: list[Any]
) -> None:
    """The 360 view cannot answer without its document store: gRPC health says
    NOT_SERVING, REST /healthz and the health port's /readyz 503 naming it, while
    it is down; SERVING again once it is back."""
    mongo_port = free_port()
    store = secantus_process(
        storage_dir=tmp_path / "secantus",
        run_dir=tmp_path / "run",
        log_path=tmp_path / "secantus.log",
        port=mongo_port,
        cache_size="64M",
    )
    store.start()
    try:
        store.wait_ready()
        await _analytics_follows_its_store(store, mongo_port, tmp_path, identity, processes)
    finally:
        store.stop()


async def _analytics_follows_its_store(
    store: ManagedProcess,
    mongo_port: int,
    tmp_path: Path,
    identity: Identity,
    processes: list[Any],
) -> None:
    grpc_port, http_port, health_port = free_port(), free_port(), free_port()
    env = clean_environment(
        tmp_path,
        identity,
        CRM_MONGO_URL=secantus_url(mongo_port),
        CRM_ANALYTICS_GRPC_PORT=str(grpc_port),
        CRM_ANALYTICS_HTTP_PORT=str(http_port),
        CRM_HEALTH_PORT=str(health_port),
    )
    log = tmp_path / "analytics-api.log"
    api = start_process("analytics", "serve", env, log, processes)
    http_url = f"http://127.0.0.1:{http_port}"
    await wait_serving(f"127.0.0.1:{grpc_port}", http_url, api, log)

    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
        httpx.AsyncClient() as http,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def state() -> tuple[int, int, int, dict[str, Any]]:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            rest = await http.get(f"{http_url}/healthz", timeout=5)
            ready = await http.get(f"http://127.0.0.1:{health_port}/readyz", timeout=5)
            return reply.status, rest.status_code, ready.status_code, ready.json()

        async def until(expected: tuple[int, int, int], timeout: float) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                *now, body = await state()
                if tuple(now) == expected:
                    return body
                assert api.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (expected, now, body)
                await asyncio.sleep(0.2)

        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await until((serving, 200, 200), 10)

        store.kill()
        down = await until((not_serving, 503, 503), 30)
        assert down["waiting_for"] == "document store"
        rest = await http.get(f"{http_url}/healthz", timeout=5)
        assert rest.json()["status"] == "unavailable"
        assert "document store" in rest.json()["reason"]
        page = await http.get(f"http://127.0.0.1:{health_port}/metrics", timeout=5)
        assert 'crm_dependency_up{dependency="document store"} 0.0' in page.text
        # The process stays up: restarting it would not bring the store back.
        assert api.poll() is None

        store.start()
        store.wait_ready()
        await until((serving, 200, 200), 60)
        page = await http.get(f"http://127.0.0.1:{health_port}/metrics", timeout=5)
        assert 'crm_dependency_up{dependency="document store"} 1.0' in page.text
        # A caller who saw NOT_SERVING would see the service named too.
        named = await health.Check(
            health_pb2.HealthCheckRequest(service="crm.customer360.v1.Customer360Service"),
            timeout=5,
        )
        assert named.status == serving
    assert not log.read_text().count("Traceback")
    with_grpc_errors = [line for line in log.read_text().splitlines() if '"level": "error"' in line]
    assert not with_grpc_errors, with_grpc_errors


# -- what `up` waits for --------------------------------------------------------------


def test_up_takes_a_worker_holding_dead_letters_as_ready_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A relay with an open dead letter publishes everything else: the stack is usable,
    so `up` goes on (with a warning naming what waits); any other 503 keeps it waiting."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from crm_deploy.stack import worker_probe

    answers = {
        "/ready": (200, {"ready": True}),
        "/dead-letters": (503, {"waiting_for": "an operator to re-drive or skip its dead letters"}),
        "/kafka": (503, {"waiting_for": "Kafka"}),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers[self.path]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        process = ManagedProcess(
            "contacts-relay",
            ["true"],
            log_path=Path("unused.log"),
            pid_path=Path("unused.pid"),
            probe=lambda _p: True,
        )
        assert worker_probe(base + "/ready")(process)
        assert not worker_probe(base + "/kafka")(process)
        held = worker_probe(base + "/dead-letters")
        assert held(process) and held(process)
        warnings = capsys.readouterr().err.splitlines()
        assert warnings == [
            "warning: contacts-relay is waiting for an operator to re-drive or skip "
            "its dead letters"
        ]
        assert not worker_probe("http://127.0.0.1:1/readyz")(process)
    finally:
        server.shutdown()
