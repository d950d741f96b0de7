"""`crm-tickets serve|relay|sla` as real processes beside a real `crm-contacts serve`,
over the local stack's Kafka, with real signed tokens: a case opens for a real
contact (and is refused for an unknown one), its events reach the topic keyed by
the contact, and a breach that falls due while the API is down (SIGKILLed before
the deadline, restarted after it) is raised once when it comes back, even with a
second scanner running: an independent consumer reads the topic and finds one
`SlaBreached` and one escalation. The processes' clock is a file the test moves
(`CRM_TICKETS_CLOCK_FILE`) through business hours; nothing sleeps through them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from crm.contacts.v1 import contacts_pb2 as contacts_pb
from crm.contacts.v1 import contacts_pb2_grpc
from crm.events.v1 import tickets_pb2 as events_pb
from crm.tickets.v1 import tickets_pb2 as pb
from crm.tickets.v1 import tickets_pb2_grpc
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.stack import TOPIC_PARTITIONS, Stack
from crm_deploy.testing import (
    bearer,
    clean_environment,
    grpc_auth,
    start_process,
    stop_gracefully,
    wait_serving,
)

TOPIC = "crm.tickets.events"


async def consume(bootstrap: str, case_id: str, wanted: int, timeout: float = 60) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(TOPIC, p) for p in range(TOPIC_PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < wanted:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    message = events_pb.TicketEvent.FromString(record.value)
                    if message.aggregate_id == case_id:
                        found.append((record, message))
        # A little longer: anything published twice would show now.
        for records in (await consumer.getmany(timeout_ms=1500)).values():
            for record in records:
                message = events_pb.TicketEvent.FromString(record.value)
                if message.aggregate_id == case_id:
                    found.append((record, message))
        return found
    finally:
        await consumer.stop()


def office_terms(first_response: int, resolution: int) -> pb.SlaTerms:
    """Mon-Fri 09:00-17:00 in Berlin; a warning 15 minutes before a breach."""
    return pb.SlaTerms(
        targets=[
            pb.SlaTarget(
                tier="standard",
                priority=pb.PRIORITY_NORMAL,
                first_response_seconds=first_response,
                resolution_seconds=resolution,
            )
        ],
        calendar=pb.BusinessCalendar(
            timezone="Europe/Berlin",
            hours=[
                pb.Weekday(day=d, opens="09:00", closes="17:00")
                for d in ("mon", "tue", "wed", "thu", "fri")
            ],
        ),
        warning_seconds=900,
        escalate_priority=True,
        escalate_team="tier2",
    )


@pytest.mark.timeout(240)
async def test_a_case_for_a_real_contact_reaches_the_topic_and_breaches_once_across_a_restart(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    local_stack: Stack,
    identity: Identity,
) -> None:
    ports = {name: free_port() for name in ("cg", "ch", "tg", "th")}
    common = {
        "CRM_KAFKA_BOOTSTRAP": local_stack.kafka_bootstrap,
        "CRM_CONTACTS_GRPC_PORT": str(ports["cg"]),
        "CRM_CONTACTS_HTTP_PORT": str(ports["ch"]),
        "CRM_TICKETS_GRPC_PORT": str(ports["tg"]),
        "CRM_TICKETS_HTTP_PORT": str(ports["th"]),
        "CRM_CONTACTS_GRPC_TARGET": f"127.0.0.1:{ports['cg']}",
        "CRM_TICKETS_SLA_INTERVAL": "0.2",
    }
    clock = tmp_path / "now.txt"
    # Monday 2 February 2026, 09:00 UTC = 10:00 in Berlin.
    clock.write_text("2026-02-02T09:00:00+00:00")
    contacts_env = clean_environment(tmp_path / "contacts", identity, **common)
    env = clean_environment(
        tmp_path / "tickets", identity, CRM_TICKETS_CLOCK_FILE=str(clock), **common
    )
    log = tmp_path / "tickets.log"
    contacts = start_process(
        "contacts", "serve", contacts_env, tmp_path / "contacts.log", processes
    )
    serve = start_process("tickets", "serve", env, log, processes)
    target, base = f"127.0.0.1:{ports['tg']}", f"http://127.0.0.1:{ports['th']}"
    await wait_serving(f"127.0.0.1:{ports['cg']}", f"http://127.0.0.1:{ports['ch']}", contacts,
                       tmp_path / "contacts.log")  # fmt: skip
    await wait_serving(target, base, serve, log)

    agent = grpc_auth(identity.mint("service", subject="agent-7"))
    admin = grpc_auth(identity.mint("admin", subject="admin-1"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['cg']}") as channel:
        person = await contacts_pb2_grpc.ContactsServiceStub(channel).CreatePerson(
            contacts_pb.CreatePersonRequest(given_name="Ada", family_name="King", owner="ann"),
            metadata=agent,
        )
    contact_id = person.result.id

    async with grpc.aio.insecure_channel(target) as channel:
        stub = tickets_pb2_grpc.TicketsServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.OpenCase(
                pb.OpenCaseRequest(
                    customer_id="no-such-contact",
                    channel=pb.CHANNEL_EMAIL,
                    subject="x",
                    team="support",
                ),
                metadata=agent,
            )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await stub.GetCase(pb.GetCaseRequest(case_id="x"))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
        policy = await stub.DefineSlaPolicy(
            pb.DefineSlaPolicyRequest(name="Office", terms=office_terms(3600, 8 * 3600)),
            metadata=admin,
        )
        opened = await stub.OpenCase(
            pb.OpenCaseRequest(
                request_id="open-1",
                customer_id=contact_id,
                channel=pb.CHANNEL_CHAT,
                subject="Cannot log in",
                priority=pb.PRIORITY_NORMAL,
                team="support",
                policy_id=policy.result.id,
            ),
            metadata=agent,
        )
        case_id = opened.result.id
        # First response due 11:00 Berlin (10:00 UTC), its warning at 09:45 UTC.
        due = {c.kind: c.due_at.ToJsonString() for c in opened.case.clocks}
        assert due["first_response"] == "2026-02-02T10:00:00Z"
        clock.write_text("2026-02-02T09:40:00+00:00")
        await asyncio.sleep(1)  # a few scans: nothing is due yet
        quiet = await stub.GetCase(pb.GetCaseRequest(case_id=case_id), metadata=agent)
        assert [h.what for h in quiet.case.history] == ["Opened"]
    # Killed before the deadline; everything stays down while it falls due (the
    # afternoon passes), and comes back at 16:30 Berlin.
    serve.send_signal(signal.SIGKILL)
    serve.wait(10)
    clock.write_text("2026-02-02T15:30:00+00:00")
    restarted = start_process("tickets", "serve", env, log, processes)
    scanner = start_process("tickets", "sla", env, tmp_path / "sla.log", processes)
    await wait_serving(target, base, restarted, log)

    async with httpx.AsyncClient(base_url=base) as http:
        marketing = bearer(identity.mint("marketing"))
        refused_role = await http.post(
            f"/cases/{case_id}/status", json={"status": "solved"}, headers=marketing
        )
        assert refused_role.status_code == 403
        deadline = time.monotonic() + 20
        while True:
            got = await http.get(f"/cases/{case_id}", headers=marketing)
            case = got.json()
            assert got.status_code == 200, (got.status_code, got.text)
            if any(c["state"] == "breached" for c in case["clocks"]):
                break
            assert time.monotonic() < deadline, case
            await asyncio.sleep(0.2)
        assert (case["priority"], case["team"]) == ("high", "tier2")
        # The first reply comes late: the target stays breached.
        late = await http.post(
            f"/cases/{case_id}/replies",
            json={"author_kind": "agent", "body": "Sorry for the wait"},
            headers=bearer(identity.mint("service", subject="agent-7")),
        )
        assert late.status_code == 200, late.text
        clocks = {c["kind"]: c["state"] for c in late.json()["case"]["clocks"]}
        assert clocks["first_response"] == "breached"
        service = bearer(identity.mint("service", subject="agent-7"))
        solved = await http.post(
            f"/cases/{case_id}/status", json={"status": "solved"}, headers=service
        )
        assert solved.status_code == 200
        illegal = await http.post(
            f"/cases/{case_id}/status", json={"status": "pending"}, headers=service
        )
        assert illegal.status_code == 409 and "allowed: open, closed" in illegal.text
        survey = await http.post(
            f"/cases/{case_id}/satisfaction", json={"csat": 5, "comment": "thanks"}, headers=service
        )
        assert survey.status_code == 200
    await stop_gracefully(scanner, tmp_path / "sla.log")
    await stop_gracefully(restarted, log)

    relay = start_process("tickets", "relay", env, tmp_path / "relay.log", processes)
    try:
        records = await consume(local_stack.kafka_bootstrap, case_id, wanted=6)
    finally:
        await stop_gracefully(relay, tmp_path / "relay.log")
    kinds = [m.WhichOneof("payload") for _, m in records]
    # Exactly once: one breach and one escalation, though the API was killed, came
    # back with a second scanner beside it, and both scanned every 0.2 s.
    assert kinds == [
        "case_opened",
        "sla_breached",
        "case_escalated",
        "case_replied",
        "case_status_changed",
        "satisfaction_recorded",
    ], kinds
    assert {r.key for r, _ in records} == {contact_id.encode()}
    headers = dict(records[1][0].headers)
    assert headers["ce_type"] == b"crm.tickets.v1.SlaBreached"
    assert headers["ce_source"] == b"/crm/tickets"
    breach = records[1][1]
    assert breach.sla_breached.kind == "first_response"
    assert breach.sla_breached.due_at.ToJsonString() == "2026-02-02T10:00:00Z"
    assert breach.actor == "service:tickets"
    # Every case event carries the case's SLA state after it (the 360 view's contract).
    assert all(m.HasField("sla") for _, m in records)
    sla_after_breach = {c.kind: c.state for c in breach.sla.clocks}
    assert sla_after_breach == {"first_response": "breached", "resolution": "running"}
    assert records[0][1].actor == "agent-7"
    last = {c.kind: c.state for c in records[-1][1].sla.clocks}
    assert last == {"first_response": "breached", "resolution": "met"}
