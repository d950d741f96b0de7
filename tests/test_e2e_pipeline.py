"""End to end over the real processes: a lead becomes a deal with a new contact
(pipeline → contacts over gRPC), the deal is won, and contacts follow
(pipeline relay → Kafka → `crm-contacts follow` → the contact is a customer)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest

from crm.contacts.v1 import contacts_pb2 as c
from crm.customer360.v1 import customer360_pb2 as v
from crm.pipeline.v1 import pipeline_pb2 as p

# Who the stubs call as (tests/conftest.py): a real token of this user.
E2E_CALLER = ("admin", "e2e-seller")
STAGES = [
    ("qualify", "Qualify", "10", p.FORECAST_CATEGORY_PIPELINE),
    ("propose", "Propose", "40", p.FORECAST_CATEGORY_BEST_CASE),
    ("negotiate", "Negotiate", "70", p.FORECAST_CATEGORY_COMMIT),
    ("won", "Won", "100", p.FORECAST_CATEGORY_CLOSED_WON),
    ("lost", "Lost", "0", p.FORECAST_CATEGORY_CLOSED_LOST),
]
# How long contacts may take to follow a won deal (relay, Kafka, follower).
FOLLOW_DEADLINE = 60.0


def in_days(days: int) -> str:
    return (datetime.now(UTC).date() + timedelta(days=days)).isoformat()


async def define_pipeline(pipeline: Any) -> str:
    defined = await pipeline.DefinePipeline(
        p.DefinePipelineRequest(
            name=f"Sales {uuid.uuid4().hex[:6]}",
            stages=[
                p.StageInput(stage_id=i, name=n, probability=pr, category=cat)
                for i, n, pr, cat in STAGES
            ],
        ),
    )
    return str(defined.pipeline.id)


async def qualified_lead(pipeline: Any, tag: str) -> p.Lead:
    created = await pipeline.CreateLead(
        p.CreateLeadRequest(
            given_name="Katherine",
            family_name=f"Johnson{tag}",
            company_name=f"Orbital Mechanics {tag}",
            email=f"katherine.{tag}@example.com",
            source=p.LEAD_SOURCE_WEB,
            campaign="spring-webinar",
            owner="e2e-seller",
        ),
    )
    qualified = await pipeline.QualifyLead(
        p.QualifyLeadRequest(lead_id=created.lead.id, expected_version=1, score=80),
    )
    return qualified.lead


def conversion(lead: p.Lead, pipeline_id: str, request_id: str) -> p.ConvertLeadRequest:
    return p.ConvertLeadRequest(
        request_id=request_id,
        lead_id=lead.id,
        expected_version=lead.version,
        create_company=True,
        pipeline_id=pipeline_id,
        opportunity_name="Trajectory software",
        amount=p.Money(amount="1200.00", currency="EUR"),
        expected_close_date=in_days(30),
    )


async def lifecycle_stage_becomes(
    contacts: Any, contact_id: str, wanted: int, deadline: float = FOLLOW_DEADLINE
) -> c.Contact:
    """Polls GetContact until the contact is at `wanted`; fails after `deadline` seconds."""
    until = time.monotonic() + deadline
    while True:
        reply = await contacts.GetContact(c.GetContactRequest(id=contact_id))
        if reply.contact.lifecycle_stage == wanted:
            return reply.contact
        if time.monotonic() > until:
            pytest.fail(
                f"contact {contact_id} still at "
                f"{c.LifecycleStage.Name(reply.contact.lifecycle_stage)} after {deadline} s"
            )
        await asyncio.sleep(0.2)


async def test_a_lead_becomes_a_won_deal_and_its_contacts_become_customers(
    pipeline: Any, contacts: Any, customer360: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    pipeline_id = await define_pipeline(pipeline)
    lead = await qualified_lead(pipeline, tag)

    converted = await pipeline.ConvertLead(conversion(lead, pipeline_id, f"convert-{tag}"))
    assert converted.lead.status == p.LEAD_STATUS_CONVERTED
    deal = converted.opportunity
    person_id, company_id = converted.lead.person_id, converted.lead.company_id
    assert person_id and company_id and converted.lead.opportunity_id == deal.id
    assert (deal.person_id, deal.company_id, deal.customer_id) == (
        person_id,
        company_id,
        company_id,
    )
    assert deal.stage_id == "qualify"
    assert (deal.amount.amount, deal.amount.currency) == ("1200.00", "EUR")

    # The conversion registered the person and the company in contacts, linked.
    person = (await contacts.GetContact(c.GetContactRequest(id=person_id))).contact
    company = (await contacts.GetContact(c.GetContactRequest(id=company_id))).contact
    assert (person.given_name, person.family_name) == ("Katherine", f"Johnson{tag}")
    assert [ch.address for ch in person.channels] == [f"katherine.{tag}@example.com"]
    assert [a.company_id for a in person.affiliations] == [company_id]
    assert company.name == f"Orbital Mechanics {tag}"
    assert person.lifecycle_stage == company.lifecycle_stage == c.LIFECYCLE_STAGE_OPPORTUNITY

    # A retried conversion answers the first outcome and registers nobody twice.
    again = await pipeline.ConvertLead(conversion(lead, pipeline_id, f"convert-{tag}"))
    assert (again.result.id, again.result.replayed) == (converted.result.id, True)
    listed = await contacts.ListContacts(c.ListContactsRequest(query=f"Johnson{tag}"))
    assert [x.id for x in listed.contacts] == [person_id]

    # Through the stages (one step back and forth on the way), then won.
    version = deal.version
    for stage in ("propose", "negotiate", "propose", "negotiate"):
        moved = await pipeline.MoveOpportunity(
            p.MoveOpportunityRequest(
                opportunity_id=deal.id, expected_version=version, stage_id=stage
            ),
        )
        version = moved.result.version
        assert moved.opportunity.stage_id == stage
    assert [v.regression for v in moved.opportunity.history] == [False, False, False, True, False]
    won = await pipeline.WinOpportunity(
        p.WinOpportunityRequest(opportunity_id=deal.id, expected_version=version),
    )
    assert won.opportunity.status == p.OPPORTUNITY_STATUS_WON
    assert won.opportunity.stage_id == "won"

    # Contacts follow: the deal's person and company are customers now.
    person = await lifecycle_stage_becomes(contacts, person_id, c.LIFECYCLE_STAGE_CUSTOMER)
    company = await lifecycle_stage_becomes(contacts, company_id, c.LIFECYCLE_STAGE_CUSTOMER)
    # Exactly one change each: the follower's command, not a second one on redelivery.
    assert company.version == 2

    # The 360 view of the customer (the company) shows the won deal and the revenue.
    doc = (
        await customer360.GetCustomer360(
            v.GetCustomer360Request(
                customer_id=company_id,
                wait_for={"pipeline": won.result.position},
                wait_timeout_ms=15000,
            )
        )
    ).customer
    (shown,) = [d for d in doc.deals if d.opportunity_id == deal.id]
    assert (shown.status, shown.stage_id, shown.name) == (
        p.OPPORTUNITY_STATUS_WON,
        "won",
        "Trajectory software",
    )
    assert (shown.amount.amount, shown.amount.currency) == ("1200.00", "EUR")
    assert (shown.person_id, shown.company_id) == (person_id, company_id)
    assert [(m.amount, m.currency) for m in doc.lifetime_won_revenue] == [("1200.00", "EUR")]
    # ... and, once the contacts' change has travelled there too, a customer.
    until = time.monotonic() + FOLLOW_DEADLINE
    while doc.lifecycle_stage != c.LIFECYCLE_STAGE_CUSTOMER:
        assert time.monotonic() < until, "the 360 view does not show a customer"
        await asyncio.sleep(0.2)
        request = v.GetCustomer360Request(customer_id=company_id)
        doc = (await customer360.GetCustomer360(request)).customer


async def test_a_won_deal_never_moves_a_contact_further_along_back(
    pipeline: Any, contacts: Any
) -> None:
    company = await contacts.CreateCompany(
        c.CreateCompanyRequest(
            name=f"Langley {uuid.uuid4().hex[:6]}", lifecycle_stage=c.LIFECYCLE_STAGE_ADVOCATE
        ),
    )
    company_id = company.result.id
    buyer = await contacts.CreatePerson(
        c.CreatePersonRequest(given_name="Mary", family_name=f"Jackson{uuid.uuid4().hex[:6]}"),
    )
    pipeline_id = await define_pipeline(pipeline)

    async def won_deal(name: str, person_id: str = "") -> None:
        opened = await pipeline.OpenOpportunity(
            p.OpenOpportunityRequest(
                pipeline_id=pipeline_id,
                name=name,
                customer_id=company_id,
                company_id=company_id,
                person_id=person_id,
                owner="e2e-seller",
                amount=p.Money(amount="300", currency="USD"),
                expected_close_date=in_days(10),
            ),
        )
        await pipeline.WinOpportunity(p.WinOpportunityRequest(opportunity_id=opened.opportunity.id))

    # Both deals are the company's, so their events reach contacts in this order.
    await won_deal("Wind tunnel time")
    await won_deal("Wind tunnel time, again", person_id=buyer.result.id)
    await lifecycle_stage_becomes(contacts, buyer.result.id, c.LIFECYCLE_STAGE_CUSTOMER)
    # The advocate company stays an advocate: nothing recorded, nothing refused.
    advocate = (await contacts.GetContact(c.GetContactRequest(id=company_id))).contact
    assert (advocate.lifecycle_stage, advocate.version) == (c.LIFECYCLE_STAGE_ADVOCATE, 1)


async def test_a_closed_deal_refuses_changes_over_grpc_and_rest_and_keeps_its_state(
    platform: Any, pipeline: Any, contacts: Any
) -> None:
    created = await contacts.CreatePerson(
        c.CreatePersonRequest(given_name="Annie", family_name=f"Easley{uuid.uuid4().hex[:6]}"),
    )
    pipeline_id = await define_pipeline(pipeline)
    opened = await pipeline.OpenOpportunity(
        p.OpenOpportunityRequest(
            pipeline_id=pipeline_id,
            name="Battery study",
            customer_id=created.result.id,
            person_id=created.result.id,
            owner="e2e-seller",
            amount=p.Money(amount="5000.00", currency="EUR"),
            expected_close_date=in_days(20),
        ),
    )
    deal_id = opened.opportunity.id
    won = await pipeline.WinOpportunity(p.WinOpportunityRequest(opportunity_id=deal_id))
    before = won.opportunity

    refusals = [
        pipeline.ChangeAmount(
            p.ChangeAmountRequest(
                opportunity_id=deal_id, amount=p.Money(amount="1.00", currency="EUR")
            )
        ),
        pipeline.MoveOpportunity(
            p.MoveOpportunityRequest(opportunity_id=deal_id, stage_id="qualify")
        ),
        pipeline.WinOpportunity(p.WinOpportunityRequest(opportunity_id=deal_id)),
        pipeline.LoseOpportunity(p.LoseOpportunityRequest(opportunity_id=deal_id, reason="late")),
    ]
    for call in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "closed" in (refused.value.details() or "")

    async with httpx.AsyncClient(
        base_url=platform.pipeline_http, timeout=10, headers=platform.headers(*E2E_CALLER)
    ) as http:
        for path, body in [
            (f"/opportunities/{deal_id}/amount", {"amount": "1.00", "currency": "EUR"}),
            (f"/opportunities/{deal_id}/stage", {"stage_id": "qualify"}),
            (f"/opportunities/{deal_id}/win", {}),
            (f"/opportunities/{deal_id}/lose", {"reason": "late"}),
        ]:
            response = await http.post(path, json=body)
            assert response.status_code == 409, (path, response.text)
            assert response.json()["error"] == "RuleViolated"
            assert "closed" in response.json()["message"]
        shown = (await http.get(f"/opportunities/{deal_id}")).json()
    assert (shown["version"], shown["status"], shown["amount"]) == (
        before.version,
        "won",
        {"amount": "5000.00", "currency": "EUR"},
    )
    after = (await pipeline.GetOpportunity(p.GetOpportunityRequest(id=deal_id))).opportunity
    assert after == before


async def test_a_conversion_while_contacts_is_down_is_unavailable_and_converts_nothing(
    platform: Any, pipeline: Any, contacts: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    pipeline_id = await define_pipeline(pipeline)
    lead = await qualified_lead(pipeline, tag)
    await asyncio.to_thread(platform.process("contacts-api").stop)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pipeline.ConvertLead(conversion(lead, pipeline_id, f"down-{tag}"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "contacts" in (refused.value.details() or "")
        async with httpx.AsyncClient(
            base_url=platform.pipeline_http, timeout=30, headers=platform.headers(*E2E_CALLER)
        ) as http:
            response = await http.post(
                f"/leads/{lead.id}/convert",
                json={
                    "pipeline_id": pipeline_id,
                    "amount": {"amount": "1200.00", "currency": "EUR"},
                    "expected_close_date": in_days(30),
                    "create_company": True,
                },
                headers={"Idempotency-Key": f"down-rest-{tag}"},
            )
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "ContactsUnavailable"
        unchanged = (await pipeline.GetLead(p.GetLeadRequest(id=lead.id))).lead
        assert (unchanged.status, unchanged.version) == (p.LEAD_STATUS_QUALIFIED, lead.version)
        assert not unchanged.opportunity_id
    finally:
        await asyncio.to_thread(platform.restart, "contacts-api")

    # Once contacts is back, retrying the same request converts the lead (as a
    # client does on UNAVAILABLE): the pipeline's channel reconnects within its
    # capped backoff (1 s), not gRPC's default of up to two minutes.
    back = time.monotonic()
    while True:
        try:
            converted = await pipeline.ConvertLead(conversion(lead, pipeline_id, f"down-{tag}"))
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            waited = time.monotonic() - back
            assert waited < 20, f"still unavailable {waited:.0f} s after contacts came back"
            await asyncio.sleep(0.2)
    assert converted.lead.status == p.LEAD_STATUS_CONVERTED
    assert not converted.result.replayed


async def test_one_trace_runs_from_winning_the_deal_to_the_new_customer(
    platform: Any, pipeline: Any, contacts: Any
) -> None:
    created = await contacts.CreatePerson(
        c.CreatePersonRequest(given_name="Traced", family_name=secrets.token_hex(4)),
    )
    pipeline_id = await define_pipeline(pipeline)
    opened = await pipeline.OpenOpportunity(
        p.OpenOpportunityRequest(
            pipeline_id=pipeline_id,
            name="Traced deal",
            customer_id=created.result.id,
            person_id=created.result.id,
            owner="e2e-seller",
            amount=p.Money(amount="10", currency="EUR"),
            expected_close_date=in_days(5),
        ),
    )
    trace_id = secrets.token_hex(16)
    async with httpx.AsyncClient(
        base_url=platform.pipeline_http, timeout=10, headers=platform.headers(*E2E_CALLER)
    ) as http:
        response = await http.post(
            f"/opportunities/{opened.opportunity.id}/win",
            json={},
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
    assert response.status_code == 200, response.text
    await lifecycle_stage_becomes(contacts, created.result.id, c.LIFECYCLE_STAGE_CUSTOMER)

    wanted = {
        ("pipeline", "command WinOpportunity"),
        ("pipeline", "publish crm.pipeline.v1.OpportunityWon"),
        ("contacts", "follow OpportunityWon"),
        ("contacts", "command BecomeCustomer"),
    }

    def complete(spans: list[Any]) -> bool:
        return wanted <= {(s.service, s.name) for s in spans if s.trace_id == trace_id}

    spans = await asyncio.to_thread(platform.collector.wait_for, complete, 20.0)
    names = {(s.service, s.name) for s in spans if s.trace_id == trace_id}
    assert wanted <= names, names


def test_the_stack_shows_the_pipeline_endpoints(platform: Any) -> None:
    endpoints = platform.stack.endpoints()
    assert endpoints["pipeline gRPC"] == platform.pipeline_grpc
    assert endpoints["pipeline REST"].startswith(platform.pipeline_http)
