"""Worker liveness: the heartbeat and its `GET /healthz` endpoint."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from crm_common.health import Heartbeat, health_response, serve_health
from crm_common.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status_and_body(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def test_a_heartbeat_goes_stale_when_the_loop_stops_going_round() -> None:
    clock = Clock()
    beat = Heartbeat("crm.contacts.events relay", stale_after=60, clock=clock)
    assert beat.alive
    clock.now += 59.9
    assert beat.alive
    clock.now += 0.2
    assert not beat.alive
    beat.beat()
    assert beat.alive and beat.age == 0 and beat.rounds == 1


def test_an_error_keeps_the_worker_alive_and_is_reported_until_it_recovers() -> None:
    clock = Clock()
    beat = Heartbeat("customer360 projection", stale_after=30, clock=clock)
    beat.failed(ConnectionError("broker down"))
    clock.now += 12
    report = beat.report({"lag": 7})
    assert report["status"] == "ok"
    assert report["last_error"] == "ConnectionError('broker down')"
    assert report["seconds_since_error"] == 12
    assert report["lag"] == 7
    beat.recovered()
    assert beat.report()["last_error"] is None


def test_healthz_is_200_while_fresh_and_503_once_stale() -> None:
    clock = Clock()
    beat = Heartbeat("relay", stale_after=10, clock=clock)
    status, body = status_and_body(
        health_response(b"GET /healthz HTTP/1.1\r\n", beat, lambda: {"position": 42})
    )
    assert status == 200
    assert body["status"] == "ok" and body["position"] == 42 and body["worker"] == "relay"
    clock.now += 11
    status, body = status_and_body(health_response(b"GET /healthz HTTP/1.1\r\n", beat, None))
    assert status == 503
    assert body["status"] == "stale" and body["seconds_since_beat"] == 11


def test_healthz_refuses_other_paths_methods_and_garbage() -> None:
    beat = Heartbeat("relay")
    assert status_and_body(health_response(b"GET / HTTP/1.1\r\n", beat, None))[0] == 404
    assert status_and_body(health_response(b"POST /healthz HTTP/1.1\r\n", beat, None))[0] == 405
    assert status_and_body(health_response(b"\x16\x03\x01\x02\r\n", beat, None))[0] == 400


def test_a_failing_details_callback_does_not_fail_the_probe() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("no figures")

    status, body = status_and_body(
        health_response(b"GET /healthz HTTP/1.1\r\n", Heartbeat("relay"), broken)
    )
    assert status == 200
    assert "no figures" in str(body["details_error"])


def test_a_non_positive_stale_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        Heartbeat("relay", stale_after=0)
    monkeypatch.setenv("CRM_HEALTH_STALE_SECONDS", "-5")
    with pytest.raises(ValueError, match="CRM_HEALTH_STALE_SECONDS"):
        Settings.from_env("contacts")


async def test_served_over_http_on_its_own_port() -> None:
    clock = Clock()
    beat = Heartbeat("follower", stale_after=5, clock=clock)
    async with serve_health(beat, host="127.0.0.1", port=0, details=lambda: {"records": 3}) as port:
        assert port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            fresh = await http.get("/healthz", timeout=5)
            assert fresh.status_code == 200
            assert fresh.json()["records"] == 3
            assert fresh.headers["content-type"] == "application/json"
            head = await http.head("/healthz", timeout=5)
            assert head.status_code == 200 and head.content == b""
            clock.now += 6
            stale = await http.get("/healthz", timeout=5)
            assert stale.status_code == 503
            assert stale.json()["status"] == "stale"
            assert (await http.get("/status", timeout=5)).status_code == 404
            scraped = await http.get("/metrics", timeout=5)
            assert scraped.status_code == 200
            assert scraped.headers["content-type"].startswith("text/plain")
    # Closed with the block.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_without_a_port_nothing_is_served() -> None:
    async with serve_health(Heartbeat("relay"), host="127.0.0.1", port=None) as port:
        assert port is None
