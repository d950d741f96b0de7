"""The gRPC API on a real in-process server, with the platform's error mapping.

Lead conversion goes to a real contacts gRPC server (in process, on its own
SQLite store) through the production `GrpcContacts` client.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from pipeline_support import Clock, WithToken, service_credentials_of, sqlite_settings

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm.pipeline.v1 import pipeline_pb2 as pb
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm_common.auth.gate import AccessGate
from crm_common.server import AccessInterceptor
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_contacts.grpc_api import grpc_service as contacts_grpc_service
from crm_deploy.identity import Identity
from crm_deploy.testing import gate_for
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.contacts_client import GrpcContacts
from crm_pipeline.grpc_api import grpc_service


@dataclass
class Servers:
    #: The pipeline API as a sales user (`ann`) calls it; `admin` as an administrator.
    pipeline: Any
    admin: Any
    contacts: Any
    clock: Clock
    service: PipelineService


async def _start(service: Any, gate: AccessGate) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate)])
    service.add_to_server(service.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def servers(tmp_path: Path, identity: Identity) -> AsyncIterator[Servers]:
    contacts = ContactsService(create_contacts(sqlite_settings(tmp_path, "contacts")))
    contacts_gate = gate_for("contacts", identity)
    contacts_server, contacts_port = await _start(
        contacts_grpc_service(contacts, contacts_gate, identity.pseudonym_key.read_bytes().strip()),
        contacts_gate,
    )
    gate = gate_for("pipeline", identity)
    client = GrpcContacts(
        f"127.0.0.1:{contacts_port}", service_credentials_of(identity), policy=gate.policy
    )
    clock = Clock()
    service = PipelineService(create_application(sqlite_settings(tmp_path)), client, clock=clock)
    server, port = await _start(grpc_service(service), gate)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{contacts_port}") as contacts_channel,
        ):
            pipeline = pipeline_pb2_grpc.PipelineServiceStub(channel)
            yield Servers(
                WithToken(pipeline, identity.mint("sales", subject="ann", client="grpc-tests")),
                WithToken(pipeline, identity.mint("admin", subject="root", client="grpc-tests")),
                WithToken(
                    contacts_pb2_grpc.ContactsServiceStub(contacts_channel),
                    identity.mint("sales", subject="ann", client="grpc-tests"),
                ),
                clock,
                service,
            )
    finally:
        await server.stop(grace=None)
        await contacts_server.stop(grace=None)
        await client.close()
        service.close()
        contacts.close()


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no status details")


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    fields = []
    for detail in status_of(error).details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            fields += [v.field for v in request.field_violations]
    return fields


def stage(stage_id: str, probability: str, category: int) -> pb.StageInput:
    return pb.StageInput(
        stage_id=stage_id, name=stage_id.title(), probability=probability, category=category
    )


async def define(stub: Any) -> str:
    reply = await stub.DefinePipeline(
        pb.DefinePipelineRequest(
            name="Sales",
            stages=[
                stage("qualify", "10", pb.FORECAST_CATEGORY_PIPELINE),
                stage("propose", "40", pb.FORECAST_CATEGORY_BEST_CASE),
                stage("won", "100", pb.FORECAST_CATEGORY_CLOSED_WON),
                stage("lost", "0", pb.FORECAST_CATEGORY_CLOSED_LOST),
            ],
        ),
    )
    return str(reply.pipeline.id)


async def test_a_lead_becomes_a_deal_of_a_new_person_and_company_in_contacts(
    servers: Servers,
) -> None:
    stub = servers.pipeline
    pipeline_id = await define(servers.admin)
    lead = await stub.CreateLead(
        pb.CreateLeadRequest(
            given_name="Ada",
            family_name="Byron",
            company_name="Engines Ltd",
            email="ada@example.org",
            source=pb.LEAD_SOURCE_REFERRAL,
            campaign="partners",
            owner="bob",
        ),
    )
    assert (lead.lead.status, lead.lead.source) == (pb.LEAD_STATUS_NEW, pb.LEAD_SOURCE_REFERRAL)
    assert not lead.lead.HasField("score")
    qualified = await stub.QualifyLead(
        pb.QualifyLeadRequest(lead_id=lead.lead.id, score=75, expected_version=1)
    )
    assert qualified.lead.score == 75
    converted = await stub.ConvertLead(
        pb.ConvertLeadRequest(
            request_id="conv-1",
            lead_id=lead.lead.id,
            pipeline_id=pipeline_id,
            amount=pb.Money(amount="25000", currency="EUR"),
            expected_close_date="2026-05-31",
            create_company=True,
        ),
    )
    deal = converted.opportunity
    assert converted.lead.status == pb.LEAD_STATUS_CONVERTED
    assert not converted.person_matched
    assert converted.lead.opportunity_id == deal.id
    assert (deal.amount.amount, deal.amount.currency, deal.stage_id) == (
        "25000.00",
        "EUR",
        "qualify",
    )
    assert deal.customer_id == converted.lead.company_id
    person = await servers.contacts.GetContact(c.GetContactRequest(id=deal.person_id))
    company = await servers.contacts.GetContact(c.GetContactRequest(id=deal.company_id))
    assert (person.contact.family_name, person.contact.lifecycle_stage) == (
        "Byron",
        c.LIFECYCLE_STAGE_OPPORTUNITY,
    )
    assert [a.company_id for a in person.contact.affiliations] == [deal.company_id]
    assert company.contact.name == "Engines Ltd"
    again = await stub.ConvertLead(
        pb.ConvertLeadRequest(
            request_id="conv-1",
            lead_id=lead.lead.id,
            pipeline_id=pipeline_id,
            amount=pb.Money(amount="25000", currency="EUR"),
            expected_close_date="2026-05-31",
            create_company=True,
        ),
    )
    assert again.result.replayed and again.opportunity.id == deal.id
    found = await servers.contacts.ListContacts(c.ListContactsRequest(email="ada@example.org"))
    assert found.total_size == 1


async def test_a_lead_whose_email_a_contact_has_becomes_a_deal_of_that_contact(
    servers: Servers,
) -> None:
    stub = servers.pipeline
    pipeline_id = await define(servers.admin)
    existing = await servers.contacts.CreatePerson(
        c.CreatePersonRequest(
            given_name="Augusta",
            family_name="King",
            channels=[c.NewChannelIdentity(channel=c.CHANNEL_EMAIL, address="ada@example.org")],
        ),
    )
    lead = await stub.CreateLead(
        pb.CreateLeadRequest(
            family_name="Byron",
            company_name="Engines Ltd",
            email="ada@example.org",
            source=pb.LEAD_SOURCE_WEB,
            owner="bob",
        ),
    )
    await stub.QualifyLead(pb.QualifyLeadRequest(lead_id=lead.lead.id, score=60))
    converted = await stub.ConvertLead(
        pb.ConvertLeadRequest(
            lead_id=lead.lead.id,
            pipeline_id=pipeline_id,
            amount=pb.Money(amount="900", currency="EUR"),
            expected_close_date="2026-05-31",
            create_company=True,
        ),
    )
    person_id = existing.result.id
    assert converted.person_matched
    assert (converted.lead.person_id, converted.opportunity.person_id) == (person_id, person_id)
    found = await servers.contacts.ListContacts(c.ListContactsRequest(email="ada@example.org"))
    assert [p.id for p in found.contacts] == [person_id]
    person = await servers.contacts.GetContact(c.GetContactRequest(id=person_id))
    assert [a.company_id for a in person.contact.affiliations] == [converted.lead.company_id]


async def test_an_unknown_person_of_contacts_is_not_found(servers: Servers) -> None:
    stub = servers.pipeline
    pipeline_id = await define(servers.admin)
    lead = await stub.CreateLead(
        pb.CreateLeadRequest(family_name="X", phone="+4420", source=pb.LEAD_SOURCE_WEB, owner="a"),
    )
    await stub.QualifyLead(pb.QualifyLeadRequest(lead_id=lead.lead.id, score=1))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ConvertLead(
            pb.ConvertLeadRequest(
                lead_id=lead.lead.id,
                pipeline_id=pipeline_id,
                amount=pb.Money(amount="1", currency="EUR"),
                expected_close_date="2026-05-31",
                person_id=str(uuid.uuid4()),
            ),
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "person_id" in (missing.value.details() or "")
    assert (await stub.GetLead(pb.GetLeadRequest(id=lead.lead.id))).lead.status == (
        pb.LEAD_STATUS_QUALIFIED
    )


async def test_refusals_map_to_status_codes_with_details(servers: Servers) -> None:
    stub = servers.pipeline
    pipeline_id = await define(servers.admin)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.OpenOpportunity(
            pb.OpenOpportunityRequest(
                pipeline_id=pipeline_id,
                name="",
                customer_id="c-1",
                owner="ann",
                amount=pb.Money(amount="-3", currency="EUR"),
                expected_close_date="2026-03-01",
            ),
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_fields(bad.value)) == {"name", "amount"}
    with pytest.raises(grpc.aio.AioRpcError) as no_currency:
        await stub.OpenOpportunity(
            pb.OpenOpportunityRequest(
                pipeline_id=pipeline_id,
                name="Deal",
                customer_id="c-1",
                owner="ann",
                amount=pb.Money(amount="3", currency="XXX"),
                expected_close_date="2026-03-01",
            ),
        )
    assert bad_fields(no_currency.value) == ["currency"]

    opened = await stub.OpenOpportunity(
        pb.OpenOpportunityRequest(
            pipeline_id=pipeline_id,
            name="Deal",
            customer_id="c-1",
            owner="ann",
            amount=pb.Money(amount="3000", currency="EUR"),
            expected_close_date="2026-03-01",
        ),
    )
    deal_id = opened.opportunity.id
    won = await stub.WinOpportunity(
        pb.WinOpportunityRequest(opportunity_id=deal_id, request_id="w-1")
    )
    assert won.opportunity.status == pb.OPPORTUNITY_STATUS_WON
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await stub.LoseOpportunity(pb.LoseOpportunityRequest(opportunity_id=deal_id, reason="late"))
    assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already closed" in (closed.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.ReopenOpportunity(
            pb.ReopenOpportunityRequest(opportunity_id=deal_id, expected_version=1)
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.GetOpportunity(pb.GetOpportunityRequest(id=str(uuid.uuid4())))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    replay = await stub.WinOpportunity(
        pb.WinOpportunityRequest(opportunity_id=deal_id, request_id="w-1")
    )
    assert (replay.result.replayed, replay.result.version) == (True, won.result.version)


async def test_forecast_funnel_win_rate_and_follow_ups_over_grpc(servers: Servers) -> None:
    stub, clock = servers.pipeline, servers.clock
    pipeline_id = await define(servers.admin)
    deals = []
    for amount in ("1000.10", "2000"):
        reply = await stub.OpenOpportunity(
            pb.OpenOpportunityRequest(
                pipeline_id=pipeline_id,
                name=f"Deal {amount}",
                customer_id="c-1",
                owner="ann",
                amount=pb.Money(amount=amount, currency="EUR"),
                expected_close_date="2026-03-01",
            ),
        )
        deals.append(reply.opportunity.id)
    clock.advance(days=3)
    await stub.MoveOpportunity(
        pb.MoveOpportunityRequest(opportunity_id=deals[0], stage_id="propose")
    )
    await stub.WinOpportunity(pb.WinOpportunityRequest(opportunity_id=deals[1]))
    forecast = await stub.GetForecast(pb.GetForecastRequest(period=pb.FORECAST_PERIOD_QUARTER))
    assert [
        (r.period, r.category, r.amount.amount, r.weighted_amount.amount) for r in forecast.rows
    ] == [
        # 1000.10 x 40 % = 400.04; the won deal falls in February.
        ("2026-Q1", pb.FORECAST_CATEGORY_BEST_CASE, "1000.10", "400.04"),
        ("2026-Q1", pb.FORECAST_CATEGORY_CLOSED_WON, "2000.00", "2000.00"),
    ]
    funnel = await stub.GetFunnel(pb.GetFunnelRequest(pipeline_id=pipeline_id))
    first = funnel.stages[0]
    assert (first.stage_id, first.entered, first.advanced, first.conversion) == (
        "qualify",
        2,
        2,
        "1.0000",
    )
    assert first.average_time_in_stage.ToTimedelta() == timedelta(days=3)
    assert not funnel.stages[2].HasField("advanced")
    rate = await stub.GetWinRate(pb.GetWinRateRequest(pipeline_id=pipeline_id))
    assert (rate.won, rate.lost, rate.rate) == (1, 0, "1.0000")
    assert rate.average_cycle.ToTimedelta() == timedelta(days=3)

    due = clock.now + timedelta(hours=2)
    task = await stub.ScheduleActivity(
        pb.ScheduleActivityRequest(
            subject_kind=pb.SUBJECT_KIND_OPPORTUNITY,
            subject_id=deals[0],
            kind=pb.ACTIVITY_KIND_FOLLOW_UP,
            title="Chase the proposal",
            owner="ann",
            due_at=Timestamp(seconds=int(due.timestamp())),
        ),
    )
    assert task.activity.customer_id == "c-1"
    clock.advance(days=1)
    overdue = await stub.ListOverdueFollowUps(pb.ListOverdueFollowUpsRequest())
    assert [(o.owner, [a.title for a in o.activities]) for o in overdue.owners] == [
        ("ann", ["Chase the proposal"])
    ]
    with pytest.raises(grpc.aio.AioRpcError) as no_due:
        await stub.ScheduleActivity(
            pb.ScheduleActivityRequest(
                subject_kind=pb.SUBJECT_KIND_OPPORTUNITY,
                subject_id=deals[0],
                kind=pb.ACTIVITY_KIND_CALL,
                title="Call",
                owner="ann",
            ),
        )
    assert bad_fields(no_due.value) == ["due_at"]


async def test_leads_and_activities_due_in_a_range_are_listed_over_grpc(
    servers: Servers,
) -> None:
    stub, clock = servers.pipeline, servers.clock
    leads = []
    for n, owner in enumerate(["ann", "bob", "ann"]):
        clock.advance(minutes=1)
        reply = await stub.CreateLead(
            pb.CreateLeadRequest(
                family_name=f"Lead {n}", email=f"{n}@x.org", source=pb.LEAD_SOURCE_WEB, owner=owner
            )
        )
        leads.append(reply.lead.id)
    await stub.QualifyLead(pb.QualifyLeadRequest(lead_id=leads[2], score=80))
    first = await stub.ListLeads(pb.ListLeadsRequest(owner="ann", page_size=1))
    assert ([lead.id for lead in first.leads], first.total_size) == ([leads[0]], 2)
    rest = await stub.ListLeads(
        pb.ListLeadsRequest(owner="ann", page_size=1, page_token=first.next_page_token)
    )
    assert ([lead.id for lead in rest.leads], rest.next_page_token) == ([leads[2]], "")
    qualified = await stub.ListLeads(pb.ListLeadsRequest(status=pb.LEAD_STATUS_QUALIFIED))
    assert [lead.id for lead in qualified.leads] == [leads[2]]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListLeads(pb.ListLeadsRequest(page_size=500))
    assert (bad.value.code(), bad_fields(bad.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["page_size"],
    )

    start = clock.now
    for hours, title in ((30, "later"), (2, "soon"), (200, "next month")):
        await stub.ScheduleActivity(
            pb.ScheduleActivityRequest(
                subject_kind=pb.SUBJECT_KIND_LEAD,
                subject_id=leads[0],
                kind=pb.ACTIVITY_KIND_TASK,
                title=title,
                owner="ann",
                due_at=Timestamp(seconds=int((start + timedelta(hours=hours)).timestamp())),
            )
        )
    window = pb.ListActivitiesRequest(
        due_from=Timestamp(seconds=int(start.timestamp())),
        due_before=Timestamp(seconds=int((start + timedelta(days=7)).timestamp())),
        status=pb.ACTIVITY_STATUS_OPEN,
    )
    listed = await stub.ListActivities(window)
    assert ([a.title for a in listed.activities], listed.total_size) == (["soon", "later"], 2)
    backwards = pb.ListActivitiesRequest(due_from=window.due_before, due_before=window.due_from)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListActivities(backwards)
    assert bad_fields(refused.value) == ["due_before"]
