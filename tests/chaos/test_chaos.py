"""Chaos: faults under a bounded mixed load, then a verification from first
principles (docs/reliability.md, "Chaos").

The load writes contacts and pipeline over REST; every command carries an
idempotency key and is retried with that key until it is acknowledged. While
it runs, each fault is injected in turn and the platform is left to recover:
a killed process is started again at once (as the stack's supervisor does),
then the test waits until every process's `/readyz` says ready again.

Afterwards, with nothing but the raw event stores (SQL on SQLite), a Kafka
consumer of the suite's own reading every topic from the beginning, the
document store and the health ports:

- every acknowledged command is stored once and is on its topic once;
- every published event of every store is on its topic, and nothing is on a
  topic that no store holds;
- the poison event is set aside in `relay_dead_letters`, never published, and
  every event stored after it is published once;
- every 360 document equals the one a fresh rebuild (into another database)
  makes;
- every process is ready again, but the relay holding the dead letter, which
  says what it waits for.

Recovery times are measured and printed (docs/reliability.md records a run);
no timing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from chaos_load import ChaosClient
from chaos_verify import (
    MARKER,
    dead_letters,
    markers_of_creates,
    published,
    read_model,
    read_store,
    read_topics,
    readiness,
    rebuild_into,
    wait_until,
)

from crm_common.settings import Settings, topic_of
from crm_deploy.stack import INFRA, SERVICE_PROCESSES, Stack

pytestmark = pytest.mark.servers

#: The relay that gets the poison event, and what its `/readyz` then waits for.
POISONED = "contacts-relay"
OPERATOR_WAIT = "an operator"
RELAYED = sorted({p.service for p in SERVICE_PROCESSES if p.name.endswith("-relay")})


@dataclass(frozen=True)
class Fault:
    kind: str  # kill, stop, poison
    target: str
    #: kill: how long the process stays dead before it is started again;
    #: stop: how long it stays stopped (past its Kafka session and health timeouts).
    seconds: float = 1.0

    @property
    def label(self) -> str:
        if self.kind == "kill":
            return f"SIGKILL {self.target}"
        if self.kind == "stop":
            return f"SIGSTOP {self.target} {self.seconds:.0f} s"
        return f"poison event into {self.target}"


@dataclass
class Recovery:
    fault: str
    #: From the fault until every process is ready again.
    health_seconds: float
    #: From the fault until a write sent at that moment shows in the 360 view.
    view_seconds: float


WORKERS = [p.name for p in SERVICE_PROCESSES if not p.api]
APIS = [p.name for p in SERVICE_PROCESSES if p.api]


def short_plan() -> list[Fault]:
    """One or two faults of each kind, in sequence."""
    return [
        Fault("kill", "contacts-relay"),
        Fault("kill", "analytics-projector"),
        Fault("kill", "contacts-api"),
        Fault("kill", "kafka", 2.0),
        Fault("kill", "zookeeper", 2.0),
        Fault("kill", "secantus", 2.0),
        Fault("stop", "analytics-projector", 15.0),
        Fault("poison", POISONED),
        Fault("kill", "pipeline-relay"),
    ]


def long_plan() -> list[Fault]:
    """Every process of the platform killed, twice; SIGSTOPs past every timeout."""
    plan: list[Fault] = []
    for round_ in range(2):
        plan += [Fault("kill", name, 1.0 + 2.0 * round_) for name in WORKERS]
        plan += [Fault("kill", name, 1.0 + 2.0 * round_) for name in APIS]
        plan += [Fault("kill", name, 2.0 + 4.0 * round_) for name in INFRA]
        if round_ == 0:
            plan.append(Fault("poison", POISONED))
    plan += [
        Fault("stop", "analytics-projector", 30.0),
        Fault("stop", "contacts-relay", 30.0),
        Fault("stop", "contacts-api", 15.0),
        Fault("stop", "kafka", 25.0),
    ]
    return plan


def ready(stack: Stack, poisoned: bool) -> bool:
    """Every process answers ready; the poisoned relay may wait for an operator."""
    for name in INFRA:
        if not stack.process(name).is_running():
            return False
    for row in SERVICE_PROCESSES:
        status, body = readiness(stack, row.name)
        if status == 200:
            continue
        waiting = str(body.get("waiting_for") or "")
        if (
            poisoned
            and row.name == POISONED
            and status == 503
            and waiting.startswith(OPERATOR_WAIT)
        ):
            continue
        return False
    return True


def inject_poison(stack: Stack, marker: str) -> str:
    """Stores a person whose first event is over the broker's limit straight into
    the contacts event store, as an older release might have: `originator id:1`."""
    from crm_contacts.application import create_application
    from crm_contacts.domain.lifecycle import LifecycleStage
    from crm_contacts.domain.persons import Person, PersonProfile

    settings = Settings(
        service="contacts",
        data_dir=stack.config.data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
        kafka_bootstrap=stack.kafka_bootstrap,
    )
    app = create_application(settings)
    try:
        person = Person.register(
            PersonProfile(
                given_name="x" * 1_200_000,
                family_name=marker,
                lifecycle_stage=LifecycleStage.LEAD,
            )
        )
        app.save(person)
        return f"{person.id}:1"
    finally:
        app.close()


async def apply_fault(
    stack: Stack, client: ChaosClient, fault: Fault, state: dict[str, Any]
) -> Recovery:
    started = time.monotonic()
    # A write sent the moment the fault strikes: when does the 360 view show it?
    probe = asyncio.create_task(_probe_view(client))
    if fault.kind == "kill":
        process = stack.process(fault.target)
        await asyncio.to_thread(process.kill)
        await asyncio.sleep(fault.seconds)
        await asyncio.to_thread(stack.restart, fault.target)
        await asyncio.to_thread(process.wait_ready, 240)
        if fault.target.endswith("-relay"):
            service = fault.target.removesuffix("-relay")
            state["relay_kills"][service] += 1
            if state["poisoned"]:
                state["relay_kills"][f"{service}-after-poison"] += 1
    elif fault.kind == "stop":
        pid = stack.process(fault.target).pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(fault.seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
    else:
        marker = f"chaos-{client.run}-poison"
        state["poison"] = await asyncio.to_thread(inject_poison, stack, marker)
        state["poisoned"] = True

        def set_aside() -> bool:
            rows = dead_letters(stack, "contacts")
            status, _body = readiness(stack, POISONED)
            return any(r["event"] == state["poison"] for r in rows) and status == 503

        await wait_until(set_aside, 120, "the poison event set aside")
    poisoned = bool(state.get("poisoned"))
    health = await wait_until(lambda: ready(stack, poisoned), 240, f"ready after {fault.label}")
    seen = await probe
    return Recovery(fault.label, health - started, seen - started)


async def _probe_view(client: ChaosClient) -> float:
    ack = await client.create_person()
    return await client.seen_in_360(ack)


def caught_up(stack: Stack) -> bool:
    """Every worker has nothing left to do (lag 0 in its own health report)."""
    for name in WORKERS:
        _, body = readiness(stack, name)
        if body.get("lag_events") not in (0, None):
            return False
    return True


# -- the path a kill cannot easily reach ------------------------------------------------


async def test_a_command_committed_but_never_acknowledged_replays_when_retried(
    chaos_stack: Stack,
) -> None:
    """The client sends a create and its connection is cut after the store has
    committed it, before the answer is read: the client never learns the
    outcome. Its retry with the same key answers the recorded outcome
    (`replayed`), and the store holds the person once."""
    client = ChaosClient(chaos_stack, secrets.token_hex(4))
    try:
        marker, key = client.marker(), str(uuid.uuid4())
        body = json.dumps(
            {"given_name": "Unacknowledged", "family_name": marker, "tags": [marker]}
        ).encode()
        port = chaos_stack.config.service_ports["contacts"][1]
        request = (
            f"POST /persons HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"authorization: {client.headers['authorization']}\r\n"
            f"idempotency-key: {key}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()

        def stored() -> list[str]:
            events = read_store(chaos_stack, "contacts")
            return [
                e.event
                for e in published("contacts", events)
                if e.event.endswith(":1") and marker.encode() in MARKER.findall(e.state)
            ]

        await wait_until(lambda: len(stored()) == 1, 60, "the command committed")
        # Cut before reading a byte of the answer: the outcome never reaches the client.
        writer.transport.abort()
        [first] = stored()

        retried = await client.http.post(
            f"{client.contacts}/persons",
            content=body,
            headers={"Idempotency-Key": key, "content-type": "application/json"},
        )
        assert retried.status_code == 200, retried.text
        answer = retried.json()
        assert answer["replayed"] is True
        assert f"{answer['id']}:{answer['version']}" == first
        # Nothing stored twice: still one person with this marker, one receipt.
        await asyncio.sleep(0.5)
        assert stored() == [first]
        counts = markers_of_creates("contacts", read_store(chaos_stack, "contacts"))
        assert counts[marker] == 1
    finally:
        await client.close()


# -- the chaos run ----------------------------------------------------------------------


@pytest.mark.timeout(1800)
async def test_faults_under_load_lose_and_double_nothing(
    chaos_stack: Stack, chaos_long: bool
) -> None:
    long_form = chaos_long
    plan = long_plan() if long_form else short_plan()
    rate = 25.0 if long_form else 15.0
    settle = 8.0 if long_form else 2.0
    client = ChaosClient(chaos_stack, secrets.token_hex(4))
    state: dict[str, Any] = {"relay_kills": Counter(), "poisoned": False, "poison": None}
    recoveries: list[Recovery] = []
    stop = asyncio.Event()
    try:
        load = asyncio.create_task(client.run_for(rate, stop))
        await asyncio.sleep(settle)
        for fault in plan:
            recoveries.append(await apply_fault(chaos_stack, client, fault, state))
            await asyncio.sleep(settle)
        stop.set()
        await load
        poison_position = _position_of(chaos_stack, state["poison"])

        # Health back unaided.
        assert ready(chaos_stack, True), "a process did not come back"
        status, body = readiness(chaos_stack, POISONED)
        assert status == 503 and str(body["waiting_for"]).startswith(OPERATOR_WAIT), body
        assert body.get("open_dead_letters") == 1, body

        # Every worker caught up before the topics and the view are read.
        await wait_until(lambda: caught_up(chaos_stack), 180, "workers caught up")
        partitions = {topic_of(s): chaos_stack.config.topics[topic_of(s)] for s in RELAYED}
        topics = await read_topics(chaos_stack.kafka_bootstrap, partitions)
        figures = _verify_topics_and_stores(chaos_stack, client, state, topics, poison_position)

        # Every 360 document equals a fresh rebuild's.
        database = f"chaos_rebuild_{client.run}"
        await asyncio.to_thread(rebuild_into, chaos_stack, database)
        live = await asyncio.to_thread(read_model, chaos_stack, "crm")
        rebuilt = await asyncio.to_thread(read_model, chaos_stack, database)
        assert live.keys() == rebuilt.keys()
        differing = [k for k in live if live[k] != rebuilt[k]]
        assert not differing, differing[:5]
        persons = {a.id for a in client.persons}
        assert persons <= live.keys()
    finally:
        stop.set()
        await client.close()

    seconds = client.figures.seconds
    print(f"\nchaos ({'long' if long_form else 'short'} form), {time.strftime('%Y-%m-%d')}")
    print(
        f"load: {len(client.acks)} commands acknowledged in {seconds:.0f} s "
        f"({len(client.acks) / seconds:.1f}/s offered {rate:.0f}/s), "
        f"{client.figures.retries} retries, {client.figures.replayed} answered as replays"
    )
    for r in recoveries:
        print(
            f"{r.fault:40} ready after {r.health_seconds:5.1f} s, 360 after {r.view_seconds:5.1f} s"
        )
    print(
        f"events stored {figures['stored']}, published {figures['published']}, lost 0, "
        f"duplicates on the topics {figures['duplicates']}, dead letters {figures['dead_letters']}"
    )


def _position_of(stack: Stack, event: str | None) -> int:
    assert event is not None, "the poison event was not injected"
    for e in read_store(stack, "contacts"):
        if e.event == event:
            return e.position
    raise AssertionError(f"{event} is not in the contacts event store")


def _verify_topics_and_stores(
    stack: Stack,
    client: ChaosClient,
    state: dict[str, Any],
    topics: dict[str, list[str]],
    poison_position: int,
) -> dict[str, int]:
    stored_total = published_total = duplicates_total = letters_total = 0
    stores = {s: read_store(stack, s) for s in RELAYED}
    for service in RELAYED:
        events = stores[service]
        on_topic = Counter(topics[topic_of(service)])
        letters = dead_letters(stack, service)
        set_aside = {str(r["event"]) for r in letters}
        expected = [e.event for e in published(service, events) if e.event not in set_aside]
        everything = {e.event for e in events}
        lost = [e for e in expected if e not in on_topic]
        assert not lost, f"{service}: {len(lost)} stored events never published: {lost[:5]}"
        foreign = [e for e in on_topic if e not in everything]
        assert not foreign, f"{service}: on the topic but in no store: {foreign[:5]}"
        assert not set_aside & on_topic.keys(), f"{service}: a dead letter was published"
        doubled = {e: n for e, n in on_topic.items() if n > 1}
        # Not even a relay killed between the broker's acknowledgement and its
        # tracking write publishes twice: on restart it reads what the topic holds.
        assert not doubled, (service, state["relay_kills"][service], list(doubled.items())[:5])
        if service == "contacts":
            assert [str(r["event"]) for r in letters] == [state["poison"]]
            assert [str(r["state"]) for r in letters] == ["open"]
            assert "too large" in str(letters[0]["reason"])
            later = [e.event for e in events if e.position > poison_position]
            later_published = [
                e for e in published(service, events) if e.position > poison_position
            ]
            assert later, "no event was stored after the poison event"
            # Every event after the poison one: published exactly once.
            once = [e.event for e in later_published if on_topic[e.event] != 1]
            assert not once, once[:5]
        stored_total += len(expected)
        published_total += sum(on_topic.values())
        duplicates_total += sum(n - 1 for n in doubled.values())
        letters_total += len(letters)

    # Every acknowledged command: stored once, on its topic.
    in_store = {s: {e.event for e in stores[s]} for s in RELAYED}
    on_topics = {s: Counter(topics[topic_of(s)]) for s in RELAYED}
    for ack in client.acks:
        ident = f"{ack.id}:{ack.version}"
        assert ident in in_store[ack.service], f"{ack.operation} {ident} not stored"
        assert on_topics[ack.service][ident] >= 1, f"{ident} not published"
    for service in RELAYED:
        creates = markers_of_creates(service, stores[service])
        for ack in client.acks:
            if ack.service == service and ack.operation.startswith("create"):
                assert creates[ack.marker] == 1, (ack, creates[ack.marker])
        # (a follower may create in one service what a command created in another)
        acked = {a.marker for a in client.acks}
        strays = [
            m
            for m in creates
            if m.startswith(f"chaos-{client.run}-") and m not in acked and not m.endswith("poison")
        ]
        assert not strays, f"{service}: stored but never acknowledged: {strays[:5]}"
    return {
        "stored": stored_total,
        "published": published_total,
        "duplicates": duplicates_total,
        "dead_letters": letters_total,
    }
