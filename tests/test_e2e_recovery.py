"""Crash recovery, tracing and rebuild of the whole write → read path, over
the real processes."""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pymongo

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm.customer360.v1 import customer360_pb2 as v
from crm.customer360.v1 import customer360_pb2_grpc
from crm_deploy.testing import postgres_env

PERSONS = 60
ROUNDS = 12  # per person: one update or one interaction per round
CONCURRENCY = 16


async def test_killing_relay_and_projector_mid_stream_loses_and_doubles_nothing(
    platform: Any, customer360: Any
) -> None:
    """SIGKILL the relay and the projector (twice each) while ~800 commands
    are in flight; after restarts every 360 document matches the write model
    exactly: every interaction once, the last profile, the last position."""
    rng = random.Random(7)
    relay = platform.process("contacts-relay")
    projector = platform.process("analytics-projector")
    async with platform.channel(platform.contacts_grpc) as channel:
        stub = contacts_pb2_grpc.ContactsServiceStub(channel)
        run = secrets.token_hex(4)
        created = await asyncio.gather(
            *(
                stub.CreatePerson(
                    c.CreatePersonRequest(
                        given_name=f"Crash{i}",
                        family_name=f"Test{run}",
                        lifecycle_stage=c.LIFECYCLE_STAGE_LEAD,
                    )
                )
                for i in range(PERSONS)
            )
        )
        ids = [r.result.id for r in created]
        last_position: dict[str, int] = {r.result.id: r.result.position for r in created}
        interactions: dict[str, list[str]] = defaultdict(list)
        plan = [(ident, rng.random() < 0.6) for _ in range(ROUNDS) for ident in ids]
        rng.shuffle(plan)
        done = 0
        # Restarts here do not wait for readiness: a kill may land while a
        # process is still starting, which is one more moment to survive.
        milestones = {
            len(plan) // 6: relay.kill,
            len(plan) // 3: projector.kill,
            len(plan) // 2: relay.start,
            (2 * len(plan)) // 3: projector.start,
            (3 * len(plan)) // 4: relay.kill,
            (4 * len(plan)) // 5: relay.start,
            (5 * len(plan)) // 6: projector.kill,
        }
        actions: list[asyncio.Future[Any]] = []
        crasher = ThreadPoolExecutor(1)
        queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        # One writer per person at a time keeps each person's order simple.
        locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

        async def writer() -> None:
            nonlocal done
            while not queue.empty():
                ident, interaction = queue.get_nowait()
                async with locks[ident]:
                    if interaction:
                        reply = await stub.LogInteraction(
                            c.LogInteractionRequest(
                                contact_id=ident,
                                kind=c.INTERACTION_KIND_CHAT,
                                direction=c.DIRECTION_INBOUND,
                                channel=c.CHANNEL_WHATSAPP,
                                summary=f"message {len(interactions[ident])}",
                            )
                        )
                        interactions[ident].append(reply.interaction_id)
                    else:
                        reply = await stub.UpdatePerson(
                            c.UpdatePersonRequest(
                                id=ident,
                                update_mask=["tags"],
                                tags=[f"t{rng.randrange(1000)}"],
                            )
                        )
                    last_position[ident] = max(last_position[ident], reply.result.position)
                done += 1
                action = milestones.pop(done, None)
                if action is not None:
                    # One thread, in milestone order: a kill never overtakes a start.
                    actions.append(asyncio.get_running_loop().run_in_executor(crasher, action))

        await asyncio.gather(*(writer() for _ in range(CONCURRENCY)))
        await asyncio.gather(*actions)
        crasher.shutdown()
        # Whatever state the kills left them in, both run again now.
        for name in ("contacts-relay", "analytics-projector"):
            if not platform.process(name).is_running():
                await asyncio.to_thread(platform.restart, name)

        for ident in ids:
            truth = (await stub.GetContact(c.GetContactRequest(id=ident))).contact
            doc = (
                await customer360.GetCustomer360(
                    v.GetCustomer360Request(
                        customer_id=ident,
                        wait_for={"contacts": last_position[ident]},
                        wait_timeout_ms=30000,
                    )
                )
            ).customer
            assert doc.positions["contacts"] == last_position[ident]
            assert (doc.given_name, doc.family_name) == (truth.given_name, truth.family_name)
            assert sorted(doc.tags) == sorted(truth.tags)
            chats = [e.entry_id for e in doc.timeline if e.kind == "interaction.chat"]
            # Each interaction exactly once, newest first.
            assert chats == list(reversed(interactions[ident])), ident
            assert sorted(i.interaction_id for i in truth.interactions) == sorted(chats)


async def test_one_trace_links_the_command_and_the_projection(platform: Any) -> None:
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    async with httpx.AsyncClient(timeout=30, headers=platform.headers()) as http:
        created = await http.post(
            f"{platform.contacts_http}/persons",
            json={"given_name": "Traced", "family_name": secrets.token_hex(4)},
            headers={"traceparent": traceparent},
        )
        assert created.status_code == 201, created.text
        body = created.json()
        seen = await http.get(
            f"{platform.analytics_http}/customers/{body['id']}/360",
            params={"wait_for": f"contacts:{body['position']}", "timeout_ms": 15000},
        )
        assert seen.status_code == 200

    wanted = {
        ("contacts", "command CreatePerson"),
        ("contacts", "publish crm.contacts.v1.PersonRegistered"),
        ("analytics", "project crm.contacts.v1.PersonRegistered"),
    }

    def complete(spans: list[Any]) -> bool:
        # Three processes export on their own schedules: wait for all three.
        return wanted <= {(s.service, s.name) for s in spans if s.trace_id == trace_id}

    spans = await asyncio.to_thread(platform.collector.wait_for, complete, 20.0)
    mine = [s for s in spans if s.trace_id == trace_id]
    names = {(s.service, s.name) for s in mine}
    # The command, the relay's publish and the projection sit in one trace.
    assert wanted <= names, names


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    for company in doc.get("companies", []):
        company.pop("name_position", None)
    return doc


async def test_rebuild_reproduces_the_360_view(platform: Any, contacts: Any) -> None:
    created = await contacts.CreatePerson(
        c.CreatePersonRequest(given_name="Before", family_name="Rebuild")
    )
    async with platform.channel(platform.analytics_grpc) as channel:
        await customer360_pb2_grpc.Customer360ServiceStub(channel).GetCustomer360(
            v.GetCustomer360Request(
                customer_id=created.result.id,
                wait_for={"contacts": created.result.position},
                wait_timeout_ms=15000,
            )
        )
    projector = platform.process("analytics-projector")
    await asyncio.to_thread(projector.stop)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(platform.mongo_url)
    try:
        collection = client["crm"]["customer360"]
        before = {d["_id"]: _comparable(d) for d in collection.find()}
        assert created.result.id in before
        # The platform's stores are in PostgreSQL: the rebuild reads the owners'
        # data keys there, as the projector does.
        env = {**platform.stack.service_env(), **postgres_env(platform.postgres)}
        rebuild = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).with_name("crm-analytics")), "rebuild"],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert rebuild.returncode == 0, rebuild.stderr[-3000:]
        assert f"{len(before)} documents" in rebuild.stdout
        after = {d["_id"]: _comparable(d) for d in collection.find()}
        assert after == before
    finally:
        client.close()
        await asyncio.to_thread(platform.restart, "analytics-projector")
