"""End to end over the real processes: contacts that stay clean.

One person reaches the platform twice: through a web form (REST) and through
the call centre (gRPC), with the same email address typed differently. The
duplicate check finds the first from the second and says why. Both get deals
in pipeline, the second an open case in tickets, and a sales user merges them
(contacts → relay → Kafka → `crm-pipeline follow` / `crm-tickets follow` →
their relays → the 360 projector). Then:

- pipeline lists every deal under the survivor, tickets gives it the case, and
  the 360 view of the survivor holds both deals and both revenues; the merged
  id still answers, with the survivor, in contacts and in the 360 view;
- while merged, a lead with the survivor's email converts into the survivor
  (no new contact), a deal of the merged contact moves stage and the survivor
  gets a new interaction;
- the undo gives each contact back its own (the survivor keeps what happened
  to it since, the restored contact gets its deals back at their new stage
  and its case), and the 360 views are two again; the email now belongs to
  two persons, so a conversion by it is refused naming both.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import grpc
import httpx
import pytest

from crm.contacts.v1 import contacts_pb2 as c
from crm.customer360.v1 import customer360_pb2 as v
from crm.pipeline.v1 import pipeline_pb2 as p
from crm.pipeline.v1 import pipeline_pb2_grpc
from crm.tickets.v1 import tickets_pb2 as t
from crm.tickets.v1 import tickets_pb2_grpc

# Who the stubs call as (tests/conftest.py): merging is a sales user's job.
E2E_CALLER = ("sales", "e2e-clean-sales")
# How long a change may take to travel: contacts relay, Kafka, a follower, its
# relay, Kafka again, the 360 projector.
FOLLOW_DEADLINE = 60.0
STAGES = [
    ("qualify", "Qualify", "10", p.FORECAST_CATEGORY_PIPELINE),
    ("propose", "Propose", "40", p.FORECAST_CATEGORY_BEST_CASE),
    ("won", "Won", "100", p.FORECAST_CATEGORY_CLOSED_WON),
    ("lost", "Lost", "0", p.FORECAST_CATEGORY_CLOSED_LOST),
]

T = TypeVar("T")


async def eventually(
    what: str, probe: Callable[[], Awaitable[T]], deadline: float = FOLLOW_DEADLINE
) -> T:
    """`probe()`'s answer once its assertions hold; fails naming `what` (and the
    last failed assertion) after `deadline` seconds."""
    until = time.monotonic() + deadline
    while True:
        try:
            return await probe()
        except AssertionError as error:
            if time.monotonic() > until:
                pytest.fail(f"{what}: not so after {deadline:.0f} s: {error}")
        await asyncio.sleep(0.25)


def in_days(days: int) -> str:
    return (datetime.now(UTC).date() + timedelta(days=days)).isoformat()


def money(amount: str) -> p.Money:
    return p.Money(amount=amount, currency="EUR")


def revenue(doc: v.Customer360) -> dict[str, Decimal]:
    return {m.currency: Decimal(m.amount) for m in doc.lifetime_won_revenue}


def kinds(doc: v.Customer360) -> Any:
    """How many timeline entries of each kind the view shows."""
    return Counter(e.kind for e in doc.timeline).items()


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@pytest.fixture
async def tickets(platform: Any) -> Any:
    """Cases are opened by service agents."""
    port = platform.stack.config.service_ports["tickets"][0]
    async with platform.channel(f"127.0.0.1:{port}", "service", "e2e-clean-agent") as channel:
        yield tickets_pb2_grpc.TicketsServiceStub(channel)


@pytest.fixture
async def pipeline_admin(platform: Any) -> Any:
    """Pipelines are defined by an admin."""
    async with platform.channel(platform.pipeline_grpc, "admin", "e2e-clean-admin") as channel:
        yield pipeline_pb2_grpc.PipelineServiceStub(channel)


async def test_duplicates_found_merged_everywhere_and_given_back(
    platform: Any,
    contacts: Any,
    pipeline: Any,
    pipeline_admin: Any,
    tickets: Any,
    customer360: Any,
) -> None:
    tag = uuid.uuid4().hex[:8]
    email = f"ada.lovelace.{tag}@example.com"
    typed_by_the_agent = f"Ada.Lovelace.{tag}@Example.COM"
    phone = f"+4179{secrets.randbelow(10**7):07d}"
    family = f"Lovelace{tag}"
    http = httpx.AsyncClient(
        base_url=platform.contacts_http, timeout=30, headers=platform.headers(*E2E_CALLER)
    )
    async with http:
        # -- the same person twice, through two channels ----------------------------------
        form = await http.post(
            "/persons",
            json={
                "given_name": "Ada",
                "family_name": family,
                "channels": [
                    {
                        "channel": "email",
                        "address": email,
                        "consent_status": "granted",
                        "consent_source": "web-form:newsletter",
                    }
                ],
                "lifecycle_stage": "lead",
            },
        )
        assert form.status_code == 201, form.text
        first = form.json()["id"]

        # The call centre checks before registering the caller, and is told why.
        async def checked() -> list[dict[str, Any]]:
            reply = await http.post(
                "/duplicates/check",
                json={
                    "kind": "person",
                    "given_name": "Augusta Ada",
                    "family_name": family,
                    "emails": [typed_by_the_agent],
                    "phones": [phone],
                },
            )
            assert reply.status_code == 200, reply.text
            found = [d for d in reply.json()["duplicates"] if d["id"] == first]
            assert found, reply.json()
            return found

        [look_alike] = await eventually("the check finds the web form's person", checked)
        assert "email" in {r["rule"] for r in look_alike["reasons"]}, look_alike
        assert 0 < look_alike["score"] <= 1

        call_centre = c.CreatePersonRequest(
            request_id=request_id("call-centre"),
            given_name="Augusta Ada",
            family_name=family,
            channels=[
                c.NewChannelIdentity(
                    channel=c.CHANNEL_PHONE,
                    address=phone,
                    preferred=True,
                    consent_status=c.CONSENT_STATUS_GRANTED,
                    consent_source="call:agent-7",
                ),
                c.NewChannelIdentity(channel=c.CHANNEL_EMAIL, address=typed_by_the_agent),
            ],
            lifecycle_stage=c.LIFECYCLE_STAGE_LEAD,
            owner="e2e-clean-sales",
        )
        try:
            created = await contacts.CreatePerson(call_centre)
        except grpc.aio.AioRpcError as refused:
            # Contacts refusing likely duplicates: the agent looked and creates anyway.
            assert refused.code() == grpc.StatusCode.ALREADY_EXISTS, refused
            assert first in (refused.details() or ""), refused.details()
            call_centre.allow_duplicate = True
            created = await contacts.CreatePerson(call_centre)
        second = created.result.id
        assert second != first
        if created.possible_duplicates:
            # Contacts warning about likely duplicates as it creates: the first, by email.
            warned = {d.contact_id: d for d in created.possible_duplicates}
            assert first in warned, created.possible_duplicates
            assert any("same email" in r for r in warned[first].reasons), warned[first]
        assert created.contact.channels[1].address == email  # stored in lower case

        async def look_alikes_of_second() -> list[dict[str, Any]]:
            reply = await http.get(f"/contacts/{second}/duplicates")
            assert reply.status_code == 200, reply.text
            found = [d for d in reply.json()["duplicates"] if d["id"] == first]
            assert found, reply.json()
            return found

        [look_alike] = await eventually("the second's look-alikes", look_alikes_of_second)
        assert "email" in {r["rule"] for r in look_alike["reasons"]}
        called = await contacts.LogInteraction(
            c.LogInteractionRequest(
                contact_id=second,
                kind=c.INTERACTION_KIND_CALL,
                direction=c.DIRECTION_INBOUND,
                channel=c.CHANNEL_PHONE,
                summary="Asked about the engine's price",
            )
        )
        call_id = called.interaction_id

        # -- deals for both, a case for the second, the 360 views -------------------------
        defined = await pipeline_admin.DefinePipeline(
            p.DefinePipelineRequest(
                name=f"Clean {tag}",
                stages=[
                    p.StageInput(stage_id=i, name=n, probability=pr, category=cat)
                    for i, n, pr, cat in STAGES
                ],
            )
        )
        pipeline_id = defined.pipeline.id

        async def deal(customer: str, name: str, amount: str) -> p.Opportunity:
            opened = await pipeline.OpenOpportunity(
                p.OpenOpportunityRequest(
                    request_id=request_id("deal"),
                    pipeline_id=pipeline_id,
                    name=name,
                    customer_id=customer,
                    person_id=customer,
                    owner="e2e-clean-sales",
                    amount=money(amount),
                    expected_close_date=in_days(30),
                )
            )
            return opened.opportunity

        engine = await deal(first, "Difference engine", "1000.00")
        manual = await deal(second, "Engine manual", "250.00")
        service = await deal(second, "Engine service", "400.00")
        for won in (engine, manual):
            await pipeline.WinOpportunity(p.WinOpportunityRequest(opportunity_id=won.id))
        case = await tickets.OpenCase(
            t.OpenCaseRequest(
                request_id=request_id("case"),
                customer_id=second,
                channel=t.CHANNEL_PHONE,
                subject="The manual is missing a page",
                category="documentation",
                priority=t.PRIORITY_NORMAL,
                team="support",
            )
        )
        case_id = case.result.id

        # Contacts follow the won deals first (both become customers), so the
        # merge below sees both contacts as they will stay.
        async def customers() -> None:
            for ident in (first, second):
                got = (await contacts.GetContact(c.GetContactRequest(id=ident))).contact
                assert got.lifecycle_stage == c.LIFECYCLE_STAGE_CUSTOMER, ident

        await eventually("both contacts become customers", customers)

        async def separate_views() -> None:
            one = await view(customer360, first)
            two = await view(customer360, second)
            assert one.customer_id == first and two.customer_id == second
            assert {d.opportunity_id for d in one.deals} == {engine.id}
            assert {d.opportunity_id for d in two.deals} == {manual.id, service.id}
            assert revenue(one) == {"EUR": Decimal("1000")}
            assert revenue(two) == {"EUR": Decimal("250")}
            assert [x.case_id for x in two.tickets.open_cases] == [case_id]

        await eventually("the 360 views before the merge", separate_views)

        # -- merged by a sales user --------------------------------------------------------
        merged = await contacts.MergeContacts(
            c.MergeContactsRequest(
                request_id=request_id("merge"), survivor_id=first, merged_ids=[second]
            )
        )
        merge_id = merged.merge_id
        survivor = merged.contact
        assert merge_id and survivor.id == first
        assert (survivor.given_name, survivor.family_name) == ("Ada", family)
        assert sorted((ch.channel, ch.address) for ch in survivor.channels) == sorted(
            [(c.CHANNEL_EMAIL, email), (c.CHANNEL_PHONE, phone)]
        )

        # The merged id still resolves: to the survivor, saying so.
        redirected = (await contacts.GetContact(c.GetContactRequest(id=second))).contact
        assert (redirected.id, redirected.redirected_from) == (first, second)
        assert call_id in {i.interaction_id for i in redirected.interactions}
        interactions = await contacts.ListInteractions(c.ListInteractionsRequest(contact_id=second))
        assert (interactions.contact_id, interactions.redirected_from) == (first, second)
        # ... and takes no writes of its own.
        with pytest.raises(grpc.aio.AioRpcError) as tombstone:
            await contacts.LogInteraction(
                c.LogInteractionRequest(
                    contact_id=second,
                    kind=c.INTERACTION_KIND_CALL,
                    direction=c.DIRECTION_INBOUND,
                    channel=c.CHANNEL_PHONE,
                    summary="written to the merged id",
                )
            )
        assert tombstone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert first in (tombstone.value.details() or "")

        # Pipeline re-keys the merged contact's deals to the survivor.
        async def deals_of(customer: str, wanted: set[str]) -> dict[str, p.Opportunity]:
            listed = await pipeline.ListOpportunities(
                p.ListOpportunitiesRequest(customer_id=customer, page_size=50)
            )
            shown = {o.id: o for o in listed.opportunities}
            assert set(shown) == wanted, sorted(shown)
            return shown

        moved = await eventually(
            "pipeline lists every deal under the survivor",
            lambda: deals_of(first, {engine.id, manual.id, service.id}),
        )
        for ident in (manual.id, service.id):
            assert (moved[ident].customer_id, moved[ident].person_id) == (first, first)
        again = (await pipeline.GetOpportunity(p.GetOpportunityRequest(id=manual.id))).opportunity
        assert (again.customer_id, again.status) == (first, p.OPPORTUNITY_STATUS_WON)
        await deals_of(second, set())

        # Tickets gives the survivor the case.
        async def case_of(customer: str) -> None:
            got = (await tickets.GetCase(t.GetCaseRequest(case_id=case_id))).case
            assert got.customer_id == customer

        await eventually("the case moves to the survivor", lambda: case_of(first))

        # One 360 view: both deals and both revenues in the survivor's document.
        async def one_view() -> v.Customer360:
            doc = await view(customer360, first, contacts_at=merged.result.position)
            assert {d.opportunity_id for d in doc.deals} == {engine.id, manual.id, service.id}
            assert revenue(doc) == {"EUR": Decimal("1250")}
            assert [x.case_id for x in doc.tickets.open_cases] == [case_id]
            # Moved into the survivor's own document, not only folded in when read.
            assert kinds(doc) >= {"deal.moved_in": 2, "case.moved_in": 1}.items(), kinds(doc)
            return doc

        folded = await eventually("the survivor's 360 view holds both", one_view)
        assert folded.given_name == "Ada"
        assert call_id in {e.entry_id for e in folded.timeline}
        through_merged_id = await view(customer360, second)
        assert through_merged_id.customer_id == first
        assert {d.opportunity_id for d in through_merged_id.deals} == {
            engine.id,
            manual.id,
            service.id,
        }
        assert revenue(through_merged_id) == {"EUR": Decimal("1250")}

        # -- life goes on while merged -----------------------------------------------------
        later = await contacts.LogInteraction(
            c.LogInteractionRequest(
                contact_id=first,
                kind=c.INTERACTION_KIND_MAIL,
                direction=c.DIRECTION_OUTBOUND,
                channel=c.CHANNEL_EMAIL,
                summary="Sent the engine's brochure",
            )
        )
        proposed = await pipeline.MoveOpportunity(
            p.MoveOpportunityRequest(opportunity_id=service.id, stage_id="propose")
        )
        assert proposed.opportunity.customer_id == first

        # -- a lead with the survivor's email converts into the survivor ------------------
        # (While merged: the email is the survivor's alone. After the undo both persons
        # hold it again, and a conversion by it is refused; see the end.)
        lead = await qualified_lead(pipeline, "Ada", family, email)
        converted = await pipeline.ConvertLead(
            p.ConvertLeadRequest(
                request_id=request_id("convert"),
                lead_id=lead.id,
                expected_version=lead.version,
                pipeline_id=pipeline_id,
                opportunity_name="Analytical engine",
                amount=money("600.00"),
                expected_close_date=in_days(45),
            )
        )
        assert converted.person_matched
        assert converted.lead.person_id == first
        assert converted.opportunity.customer_id == first
        analytical = converted.opportunity
        listed = await contacts.ListContacts(c.ListContactsRequest(email=email))
        assert [x.id for x in listed.contacts] == [first]

        doc = await view(customer360, first, pipeline_at=converted.result.position)
        assert analytical.id in {d.opportunity_id for d in doc.deals}

        # -- the merge undone --------------------------------------------------------------
        undone = await contacts.UndoMerge(
            c.UndoMergeRequest(request_id=request_id("undo"), survivor_id=first, merge_id=merge_id)
        )
        restored = (await contacts.GetContact(c.GetContactRequest(id=second))).contact
        assert (restored.id, restored.redirected_from) == (second, "")
        assert restored.given_name == "Augusta Ada"
        assert sorted((ch.channel, ch.address) for ch in restored.channels) == sorted(
            [(c.CHANNEL_EMAIL, email), (c.CHANNEL_PHONE, phone)]
        )
        # The restored contact gets back what it brought; the survivor keeps what
        # happened to it since the merge.
        assert [i.interaction_id for i in restored.interactions] == [call_id]
        kept = undone.contact
        assert [(ch.channel, ch.address) for ch in kept.channels] == [(c.CHANNEL_EMAIL, email)]
        assert later.interaction_id in {i.interaction_id for i in kept.interactions}
        assert call_id not in {i.interaction_id for i in kept.interactions}

        # Pipeline gives the deals back, the moved one at its new stage; the deal
        # converted into the survivor stays there.
        back = await eventually(
            "pipeline gives the deals back",
            lambda: deals_of(second, {manual.id, service.id}),
        )
        assert (back[service.id].stage_id, back[service.id].person_id) == ("propose", second)
        assert back[manual.id].status == p.OPPORTUNITY_STATUS_WON
        await deals_of(first, {engine.id, analytical.id})
        await eventually("the case goes back", lambda: case_of(second))

        # Two 360 views again.
        async def two_views() -> tuple[v.Customer360, v.Customer360]:
            one = await view(customer360, first, contacts_at=undone.result.position)
            two = await view(customer360, second)
            assert two.customer_id == second
            assert {d.opportunity_id for d in one.deals} == {engine.id, analytical.id}
            assert {d.opportunity_id for d in two.deals} == {manual.id, service.id}
            assert revenue(one) == {"EUR": Decimal("1000")}
            assert revenue(two) == {"EUR": Decimal("250")}
            assert not one.tickets.open_cases
            assert [x.case_id for x in two.tickets.open_cases] == [case_id]
            assert kinds(two) >= {"deal.returned": 2, "case.returned": 1}.items(), kinds(two)
            return one, two

        one, two = await eventually("the 360 views separate again", two_views)
        assert {d.opportunity_id: d.stage_id for d in two.deals}[service.id] == "propose"
        assert later.interaction_id in {e.entry_id for e in one.timeline}
        assert two.given_name == "Augusta Ada"

        # The email is two persons' again: a conversion by it names both.
        another = await qualified_lead(pipeline, "Ada", family, email)
        with pytest.raises(grpc.aio.AioRpcError) as ambiguous:
            await pipeline.ConvertLead(
                p.ConvertLeadRequest(
                    request_id=request_id("convert"),
                    lead_id=another.id,
                    pipeline_id=pipeline_id,
                    amount=money("10.00"),
                    expected_close_date=in_days(45),
                )
            )
        assert ambiguous.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = ambiguous.value.details() or ""
        assert first in details and second in details, details
        unchanged = (await pipeline.GetLead(p.GetLeadRequest(id=another.id))).lead
        assert (unchanged.status, unchanged.opportunity_id) == (p.LEAD_STATUS_QUALIFIED, "")


async def view(
    stub: Any, customer_id: str, *, contacts_at: int = 0, pipeline_at: int = 0
) -> v.Customer360:
    """The customer's 360 view, once it reflects the given positions."""
    wait_for = {
        source: position
        for source, position in (("contacts", contacts_at), ("pipeline", pipeline_at))
        if position
    }
    reply = await stub.GetCustomer360(
        v.GetCustomer360Request(customer_id=customer_id, wait_for=wait_for, wait_timeout_ms=20000)
    )
    return reply.customer


async def qualified_lead(pipeline: Any, given_name: str, family_name: str, email: str) -> p.Lead:
    created = await pipeline.CreateLead(
        p.CreateLeadRequest(
            request_id=request_id("lead"),
            given_name=given_name,
            family_name=family_name,
            email=email,
            source=p.LEAD_SOURCE_WEB,
            owner="e2e-clean-sales",
        )
    )
    qualified = await pipeline.QualifyLead(
        p.QualifyLeadRequest(lead_id=created.lead.id, expected_version=1, score=70)
    )
    return qualified.lead
