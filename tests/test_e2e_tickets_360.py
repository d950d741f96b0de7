"""End to end over the real processes: a case opened, answered, solved and rated
through the tickets service (gRPC) → its event store → relay → Kafka → the
analytics projector → MongoDB → the 360 view (gRPC and REST), read with
`wait_for tickets:<position>`."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm.customer360.v1 import customer360_pb2 as v
from crm.tickets.v1 import tickets_pb2 as t
from crm.tickets.v1 import tickets_pb2_grpc

# Service agents work the cases and read the 360 view.
E2E_CALLER = ("service", "e2e-agent")

CLOCK_STATES = {
    t.CLOCK_STATE_RUNNING: "running",
    t.CLOCK_STATE_PAUSED: "paused",
    t.CLOCK_STATE_MET: "met",
    t.CLOCK_STATE_BREACHED: "breached",
}


def request_id() -> str:
    return f"e2e-{uuid.uuid4().hex}"


@pytest.fixture
async def tickets(platform: Any, caller: tuple[str, str]) -> Any:
    port = platform.stack.config.service_ports["tickets"][0]
    async with platform.channel(f"127.0.0.1:{port}", *caller) as channel:
        yield tickets_pb2_grpc.TicketsServiceStub(channel)


async def new_person(platform: Any) -> str:
    async with platform.channel(platform.contacts_grpc, "service", "e2e-agent") as channel:
        created = await contacts_pb2_grpc.ContactsServiceStub(channel).CreatePerson(
            c.CreatePersonRequest(
                given_name="Grace", family_name=f"Hopper{uuid.uuid4().hex[:6]}", owner="bob"
            )
        )
    return str(created.result.id)


async def view(stub: Any, customer_id: str, position: int) -> v.Customer360:
    response = await stub.GetCustomer360(
        v.GetCustomer360Request(
            customer_id=customer_id, wait_for={"tickets": position}, wait_timeout_ms=20000
        )
    )
    return response.customer


def clock_states(case: Any) -> dict[str, str]:
    return {clock.kind: CLOCK_STATES[clock.state] for clock in case.clocks}


async def test_a_solved_case_with_its_csat_shows_in_the_360_view(
    platform: Any, tickets: Any, customer360: Any
) -> None:
    person_id = await new_person(platform)
    opened = await tickets.OpenCase(
        t.OpenCaseRequest(
            request_id=request_id(),
            customer_id=person_id,
            channel=t.CHANNEL_EMAIL,
            subject="Invoice 4711 charged twice",
            description="Please refund one of them.",
            category="billing",
            priority=t.PRIORITY_HIGH,
            team="billing",
            assignee="bob",
        )
    )
    case_id = opened.result.id

    # The open case, with its SLA as the tickets service has it.
    doc = await view(customer360, person_id, opened.result.position)
    [case] = doc.tickets.open_cases
    assert case.case_id == case_id
    assert case.subject == "Invoice 4711 charged twice"
    assert (case.status, case.priority, case.channel) == (
        t.CASE_STATUS_NEW,
        t.PRIORITY_HIGH,
        t.CHANNEL_EMAIL,
    )
    assert (case.team, case.assignee, case.category) == ("billing", "bob", "billing")
    assert {k.kind: k.state for k in case.sla.clocks} == clock_states(opened.case)
    assert case.sla.state == "running"
    running = [k.due_at.ToDatetime() for k in opened.case.clocks if k.HasField("due_at")]
    # The view keeps times at millisecond precision, as the document store does.
    earliest = min(running)
    earliest = earliest.replace(microsecond=earliest.microsecond // 1000 * 1000)
    assert case.sla.next_deadline.ToDatetime() == earliest
    assert case.sla.breached is False
    assert (case.sla.tier, case.sla.tier_source) == (opened.case.tier, opened.case.tier_source)
    assert [e.kind for e in doc.timeline if e.source == "tickets"] == ["case.opened"]

    replied = await tickets.ReplyToCase(
        t.ReplyToCaseRequest(
            request_id=request_id(),
            case_id=case_id,
            expected_version=opened.result.version,
            author_kind=t.AUTHOR_KIND_AGENT,
            body="Refunded, sorry about that.",
        )
    )
    solved = await tickets.ChangeCaseStatus(
        t.ChangeCaseStatusRequest(
            request_id=request_id(),
            case_id=case_id,
            expected_version=replied.result.version,
            status=t.CASE_STATUS_SOLVED,
        )
    )
    rated = await tickets.RecordSatisfaction(
        t.RecordSatisfactionRequest(
            request_id=request_id(), case_id=case_id, csat=5, ces=2, nps=9, comment="quick!"
        )
    )
    assert rated.result.position > solved.result.position

    doc = await view(customer360, person_id, rated.result.position)
    assert list(doc.tickets.open_cases) == []
    [case] = doc.tickets.recent_cases
    assert case.status == t.CASE_STATUS_SOLVED
    assert case.HasField("solved_at")
    # The SLA state after solving: the clocks as the tickets service reports them.
    assert {k.kind: k.state for k in case.sla.clocks} == clock_states(rated.case)
    assert case.sla.clocks and all(k.state == "met" for k in case.sla.clocks)
    assert case.sla.state == "met"
    assert not case.sla.HasField("next_deadline")
    assert (case.satisfaction.csat, case.satisfaction.ces, case.satisfaction.nps) == (5, 2, 9)
    summary = doc.tickets.satisfaction
    assert (summary.responses, summary.csat_average, summary.nps_average) == (1, 5.0, 9.0)
    kinds = [e.kind for e in doc.timeline if e.source == "tickets"]
    assert kinds == ["case.satisfaction", "case.solved", "case.opened"]
    assert doc.positions["tickets"] >= rated.result.position

    # The same over REST, typed, with the read-your-writes key of the tickets service.
    async with httpx.AsyncClient(base_url=platform.analytics_http, timeout=30) as http:
        reply = await http.get(
            f"/customers/{person_id}/360",
            params={"wait_for": f"tickets:{rated.result.position}"},
            headers=platform.headers("service"),
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        [case_json] = body["tickets"]["recent_cases"]
        assert case_json["status"] == "solved"
        assert case_json["sla"]["state"] == "met"
        assert case_json["sla"]["next_deadline"] is None
        assert case_json["satisfaction"] == {
            "csat": 5,
            "ces": 2,
            "nps": 9,
            "recorded_at": case_json["satisfaction"]["recorded_at"],
        }
        assert body["tickets"]["satisfaction"]["csat_average"] == 5.0
        assert body["loyalty"] is None  # not a member

        # Analysts get the subject as a pseudonym, the same for every read.
        seen = []
        for _ in range(2):
            reply = await http.get(
                f"/customers/{person_id}/360", headers=platform.headers("analyst")
            )
            assert reply.status_code == 200, reply.text
            seen.append(reply.json()["tickets"]["recent_cases"][0]["subject"])
        assert seen[0] == seen[1] and seen[0].startswith("pseudonym:")
        assert "Invoice" not in reply.text

        # Partners see no cases (and this customer is not theirs anyway).
        reply = await http.get(f"/customers/{person_id}/360", headers=platform.headers("partner"))
        assert reply.status_code == 403


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    bad_request = error_details_pb2.BadRequest()
    assert status.details and status.details[0].Unpack(bad_request)
    return [violation.field for violation in bad_request.field_violations]


@pytest.mark.parametrize(
    "wait_for", [{"ticket": 1}, {"tickets": -1}, {"erp.order": 3}, {"loyalty": -5}]
)
async def test_a_bad_wait_for_is_refused_over_grpc(customer360: Any, wait_for: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await customer360.GetCustomer360(
            v.GetCustomer360Request(customer_id="anyone", wait_for=wait_for)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["wait_for"]


@pytest.mark.parametrize(
    "value",
    ["tickets:9223372036854775808", "tickets:99999999999999999999999", "tickets:", "erp:x", "7"],
)
async def test_a_bad_wait_for_is_refused_over_rest(platform: Any, value: str) -> None:
    async with httpx.AsyncClient(base_url=platform.analytics_http, timeout=30) as http:
        reply = await http.get(
            "/customers/anyone/360", params={"wait_for": value}, headers=platform.headers()
        )
    assert reply.status_code == 422, reply.text
    assert "wait_for" in reply.text
