"""The chaos suite's client: a bounded mixed load whose every command carries an
idempotency key and is retried with that key until it is acknowledged.

Each command names itself with a marker (`chaos-<run>-<n>`) written into the
entity it creates, so that the verification can find, in the raw event
stores, every entity the load created and count it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from crm_deploy.stack import Stack
from crm_deploy.testing import bearer

#: How long one command may take, retries included, before the load gives up
#: on it (a fault recovers within seconds; this only bounds a broken run).
ACK_DEADLINE = 180.0
#: Statuses a client retries with the same key: the platform could not answer.
RETRIED = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Ack:
    """One acknowledged command: what it wrote, and the key it was sent with."""

    service: str
    operation: str
    key: str
    marker: str
    id: str
    version: int
    position: int
    replayed: bool


@dataclass
class LoadFigures:
    started: float = 0.0
    finished: float = 0.0
    attempts: int = 0
    retries: int = 0
    replayed: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)


class ChaosClient:
    """REST writes to contacts and pipeline, each retried until acknowledged."""

    def __init__(self, stack: Stack, run: str, seed: int = 7) -> None:
        ports = stack.config.service_ports
        self.contacts = f"http://127.0.0.1:{ports['contacts'][1]}"
        self.pipeline = f"http://127.0.0.1:{ports['pipeline'][1]}"
        self.analytics = f"http://127.0.0.1:{ports['analytics'][1]}"
        self.headers = bearer(stack.identity.mint("admin", subject="chaos", client="e2e-tests"))
        self.run = run
        self.rng = random.Random(seed)
        self.acks: list[Ack] = []
        self.persons: list[Ack] = []
        self.figures = LoadFigures()
        self._count = 0
        self.http = httpx.AsyncClient(timeout=10.0, headers=self.headers)

    async def close(self) -> None:
        await self.http.aclose()

    def marker(self) -> str:
        self._count += 1
        return f"chaos-{self.run}-{self._count}"

    async def send(self, method: str, url: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        """Sends until a 200/201 answers; the same key every time."""
        deadline = time.monotonic() + ACK_DEADLINE
        pause = 0.2
        attempt = 0
        while True:
            attempt += 1
            self.figures.attempts += 1
            if attempt > 1:
                self.figures.retries += 1
            try:
                reply = await self.http.request(
                    method, url, json=body, headers={"Idempotency-Key": key}
                )
            except httpx.HTTPError:
                reply = None
            if reply is not None and reply.status_code in (200, 201):
                answer: dict[str, Any] = reply.json()
                return answer
            if reply is not None and reply.status_code not in RETRIED:
                raise AssertionError(
                    f"{method} {url} refused: {reply.status_code} {reply.text[:500]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {url} not acknowledged in {ACK_DEADLINE} s")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 1.0)

    def _ack(self, service: str, operation: str, key: str, marker: str, answer: Any) -> Ack:
        ack = Ack(
            service,
            operation,
            key,
            marker,
            str(answer["id"]),
            int(answer["version"]),
            int(answer["position"]),
            bool(answer.get("replayed", False)),
        )
        self.acks.append(ack)
        self.figures.by_operation[operation] = self.figures.by_operation.get(operation, 0) + 1
        if ack.replayed:
            self.figures.replayed += 1
        return ack

    async def create_person(self) -> Ack:
        marker, key = self.marker(), str(uuid.uuid4())
        # The marker also goes where it stays readable in the store: names are
        # sealed under the person's key, tags are not.
        body = {"given_name": "Chaos", "family_name": marker, "tags": ["chaos", marker]}
        answer = await self.send("POST", f"{self.contacts}/persons", body, key)
        ack = self._ack("contacts", "create-person", key, marker, answer)
        self.persons.append(ack)
        return ack

    async def update_person(self, person: Ack) -> Ack:
        marker, key = self.marker(), str(uuid.uuid4())
        body = {"tags": ["chaos", marker]}
        answer = await self.send("PATCH", f"{self.contacts}/persons/{person.id}", body, key)
        return self._ack("contacts", "update-person", key, marker, answer)

    async def create_lead(self) -> Ack:
        marker, key = self.marker(), str(uuid.uuid4())
        body = {
            "family_name": marker,
            "company_name": "Chaos Ltd",
            "email": f"{marker}@example.com",
            # Readable in the store (the name and email are sealed).
            "campaign": marker,
            "source": "web",
            "owner": "chaos",
        }
        answer = await self.send("POST", f"{self.pipeline}/leads", body, key)
        return self._ack("pipeline", "create-lead", key, marker, answer)

    async def one(self) -> None:
        roll = self.rng.random()
        if roll < 0.35 and self.persons:
            await self.update_person(self.rng.choice(self.persons))
        elif roll < 0.8:
            await self.create_person()
        else:
            await self.create_lead()

    async def run_for(self, rate: float, stop: asyncio.Event, max_in_flight: int = 64) -> None:
        """Open loop at `rate` commands a second until `stop`; then waits until
        every command started is acknowledged."""
        self.figures.started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        gate = asyncio.Semaphore(max_in_flight)
        tick = 1.0 / rate
        next_at = time.monotonic()

        async def guarded() -> None:
            async with gate:
                await self.one()

        while not stop.is_set():
            task = asyncio.create_task(guarded())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += tick
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        if tasks:
            await asyncio.gather(*tasks)
        self.figures.finished = time.monotonic()

    async def seen_in_360(self, ack: Ack, deadline: float = ACK_DEADLINE) -> float:
        """Waits until the 360 view shows the write; returns when (monotonic)."""
        until = time.monotonic() + deadline
        while True:
            try:
                reply = await self.http.get(
                    f"{self.analytics}/customers/{ack.id}/360",
                    params={"wait_for": f"contacts:{ack.position}", "timeout_ms": 5000},
                    timeout=10.0,
                )
                if reply.status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            if time.monotonic() > until:
                raise AssertionError(f"{ack.id} not in the 360 view after {deadline} s")
            await asyncio.sleep(0.2)
