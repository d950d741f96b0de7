"""Verification from first principles: the event stores read raw (SQLite), every
topic read from the beginning by a consumer of the suite's own, the 360 view
compared with a fresh rebuild into another database, and each process's health
port."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
from aiokafka import AIOKafkaConsumer, TopicPartition
from eventsourcing.utils import resolve_topic

from crm_deploy.stack import Stack

MARKER = re.compile(rb"chaos-[0-9a-f]+-[0-9]+")


@dataclass(frozen=True)
class StoredEvent:
    position: int
    event: str  # originator id:version, as the relay's ce_id names it
    topic: str  # the stored event's class
    state: bytes


def read_store(stack: Stack, service: str) -> list[StoredEvent]:
    """Every event of a service's SQLite event store, read with SQL (the chaos
    stack runs every service on SQLite)."""
    path = stack.config.data_dir / service / "events.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            "SELECT rowid, originator_id, originator_version, topic, state "
            "FROM stored_events ORDER BY rowid"
        ).fetchall()
    finally:
        db.close()
    return [
        StoredEvent(int(r[0]), f"{_uuid(r[1])}:{int(r[2])}", str(r[3]), bytes(r[4])) for r in rows
    ]


def _uuid(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return str(uuid.UUID(bytes=bytes(value)))
    return str(uuid.UUID(str(value)))


def published(service: str, events: list[StoredEvent]) -> list[StoredEvent]:
    """The events the relay publishes: all but the service's own bookkeeping
    (`INTERNAL_EVENTS` of its `events_out`: receipts and the like)."""
    internal = importlib.import_module(f"crm_{service}.events_out").INTERNAL_EVENTS
    kinds: dict[str, bool] = {}
    out = []
    for e in events:
        if e.topic not in kinds:
            kinds[e.topic] = issubclass(resolve_topic(e.topic), internal)
        if not kinds[e.topic]:
            out.append(e)
    return out


def dead_letters(stack: Stack, service: str) -> list[dict[str, Any]]:
    path = stack.config.data_dir / service / "events.sqlite"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'relay_dead_letters'"
        ).fetchone()
        if not exists:
            return []
        return [dict(r) for r in db.execute("SELECT * FROM relay_dead_letters")]
    finally:
        db.close()


def markers_of_creates(service: str, events: list[StoredEvent]) -> Counter[str]:
    """How many entities the store holds per load marker (first events only)."""
    found: Counter[str] = Counter()
    for e in published(service, events):
        if e.event.endswith(":1"):
            for m in set(MARKER.findall(e.state)):
                found[m.decode()] += 1
    return found


async def read_topics(bootstrap: str, topics: dict[str, int]) -> dict[str, list[str]]:
    """Every record of every topic (name -> partitions) from the beginning: the
    `ce_id` of each, in order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t, count in topics.items() for p in range(count)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        seen: dict[str, list[str]] = {t: [] for t in topics}
        deadline = time.monotonic() + 120
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError("the topics could not be read to their end in 120 s")
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    headers = dict(record.headers or ())
                    seen[tp.topic].append(headers.get("ce_id", b"?").decode())
        return seen
    finally:
        await consumer.stop()


def readiness(stack: Stack, name: str) -> tuple[int, dict[str, Any]]:
    """A process's `GET /readyz`: status and body (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(stack.health_url(name, "/readyz"), timeout=2) as reply:
            return int(reply.status), json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return int(error.code), json.loads(error.read() or b"{}")
        except ValueError:
            return int(error.code), {}
    except (OSError, ValueError):
        return 0, {}


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    for company in doc.get("companies", []):
        company.pop("name_position", None)
    return doc


def rebuild_into(stack: Stack, database: str) -> str:
    """`crm-analytics rebuild` into another database of the same document store."""
    env = stack.service_env({"CRM_MONGO_DB": database})
    done = subprocess.run(
        [str(Path(sys.executable).with_name("crm-analytics")), "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def read_model(stack: Stack, database: str) -> dict[str, dict[str, Any]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(stack.mongo_url)
    try:
        return {str(d["_id"]): comparable(d) for d in client[database]["customer360"].find()}
    finally:
        client.close()


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `check()` (sync, run in a thread) until true; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        if await asyncio.to_thread(check):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        await asyncio.sleep(0.2)
