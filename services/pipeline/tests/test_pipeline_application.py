"""The pipeline application over a real event store: SQLite, and PostgreSQL.

Every test runs on both stores (the PostgreSQL runs are marked `postgres` and
use the tests' own server, `crm_deploy.testing.postgres_target`). Lead conversion
talks to the real contacts application, in process, through `ContactsPort`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import STAGES, Clock, InProcessContacts

from crm_common.auth.principal import Principal, current_principal
from crm_common.commands import Caller
from crm_common.errors import (
    IdempotencyKeyReused,
    NotFound,
    PermissionDenied,
    RuleViolated,
    ValidationFailed,
    VersionConflict,
)
from crm_common.settings import Settings
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_contacts.inputs import ChannelInput, ContactQuery, NewCompany, NewPerson
from crm_deploy.testing import drop_schema, postgres_settings
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.inputs import (
    ForecastQuery,
    LeadConversion,
    LineItemInput,
    NewActivity,
    NewLead,
    NewOpportunity,
    OpportunityQuery,
    StageInput,
    WinRateQuery,
)
from crm_pipeline.views import Written


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield Settings(
            service="pipeline",
            data_dir=tmp_path,
            bind_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            event_store="sqlite",
        )
        return
    schema = f"pipeline_test_{uuid.uuid4().hex[:10]}"
    yield postgres_settings("pipeline", schema, tmp_path)
    drop_schema(schema)


@pytest.fixture
def contacts(tmp_path: Path) -> Iterator[ContactsService]:
    service = ContactsService(
        create_contacts(
            Settings(
                service="contacts",
                data_dir=tmp_path,
                bind_host="127.0.0.1",
                grpc_port=0,
                http_port=0,
                event_store="sqlite",
            )
        )
    )
    yield service
    service.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def port(contacts: ContactsService) -> InProcessContacts:
    return InProcessContacts(contacts)


@pytest.fixture
def service(settings: Settings, port: InProcessContacts, clock: Clock) -> Iterator[PipelineService]:
    pipeline_service = PipelineService(create_application(settings), port, clock=clock)
    yield pipeline_service
    pipeline_service.close()


def ctx(command: str, request_id: str | None = None, expected: int | None = None) -> Caller:
    # The command names itself in the application; `command` only says what the test runs.
    return Caller(actor="ann", request_id=request_id, expected_version=expected)


def log_size(service: PipelineService) -> int:
    return service.app.recorder.max_notification_id() or 0  # type: ignore[attr-defined]


async def define(service: PipelineService) -> str:
    written = await service.define_pipeline(ctx("DefinePipeline"), "Direct sales", STAGES)
    return written.outcome.id


async def open_deal(service: PipelineService, pipeline_id: str, **changes: Any) -> str:
    fields: dict[str, Any] = {
        "pipeline_id": pipeline_id,
        "name": "Fleet renewal",
        "customer_id": "company-1",
        "owner": "ann",
        "amount": "12000",
        "currency": "EUR",
        "expected_close_date": "2026-03-31",
    }
    fields.update(changes)
    written = await service.open_opportunity(ctx("OpenOpportunity"), NewOpportunity(**fields))
    return written.outcome.id


async def qualified_lead(service: PipelineService, **changes: Any) -> str:
    fields: dict[str, Any] = {
        "given_name": "Ada",
        "family_name": "Byron",
        "company_name": "Analytical Engines",
        "email": "ada@example.org",
        "source": "event",
        "campaign": "expo-2026",
        "owner": "bob",
    }
    fields.update(changes)
    lead = await service.create_lead(ctx("CreateLead"), NewLead(**fields))
    await service.qualify_lead(ctx("QualifyLead"), lead.outcome.id, 80)
    return lead.outcome.id


# -- leads and conversion ---------------------------------------------------------------------


async def test_a_converted_lead_becomes_a_deal_of_a_new_contact_and_company(
    service: PipelineService, contacts: ContactsService
) -> None:
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)
    converted = await service.convert_lead(
        ctx("ConvertLead", request_id="convert-1"),
        LeadConversion(
            lead_id=lead_id,
            pipeline_id=pipeline_id,
            amount="25000",
            currency="EUR",
            expected_close_date="2026-04-30",
            create_company=True,
        ),
    )
    extra = converted.outcome.extra
    lead = await service.get_lead(lead_id)
    assert (lead.status, lead.opportunity_id) == ("converted", extra["opportunity_id"])
    assert (lead.person_id, lead.company_id) == (extra["person_id"], extra["company_id"])
    deal = await service.get_opportunity(extra["opportunity_id"])
    assert (deal.customer_id, deal.person_id, deal.lead_id) == (
        extra["company_id"],
        extra["person_id"],
        lead_id,
    )
    assert (deal.name, deal.owner, deal.stage_id) == ("Analytical Engines", "bob", "qualify")
    assert deal.amount.amount == Decimal("25000.00")
    person = await contacts.get_contact(extra["person_id"])
    company = await contacts.get_contact(extra["company_id"])
    assert person.display_name == "Ada Byron"
    assert person.profile.lifecycle_stage.value == "opportunity"
    assert [a.company_id for a in person.affiliations] == [extra["company_id"]]
    assert company.display_name == "Analytical Engines"


async def test_a_retried_conversion_registers_nobody_twice(
    service: PipelineService, contacts: ContactsService
) -> None:
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service, email="grace@example.org")
    conversion = LeadConversion(
        lead_id=lead_id,
        pipeline_id=pipeline_id,
        amount="100",
        currency="EUR",
        expected_close_date="2026-04-30",
    )
    first = await service.convert_lead(ctx("ConvertLead", request_id="c-7"), conversion)
    with pytest.raises(RuleViolated):
        # Without its request id a second conversion is a new command: refused.
        await service.convert_lead(ctx("ConvertLead"), conversion)
    again = await service.convert_lead(ctx("ConvertLead", request_id="c-7"), conversion)
    assert again.outcome.replayed
    assert again.outcome.extra == first.outcome.extra
    found = await contacts.list_contacts(ContactQuery(email="grace@example.org"))
    assert [c.id for c in found.contacts] == [first.outcome.extra["person_id"]]


async def test_a_conversion_to_an_existing_person_checks_that_it_exists(
    service: PipelineService, contacts: ContactsService
) -> None:
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)
    existing = await contacts.create_person(Caller(), NewPerson(family_name="Byron"))
    company = await contacts.create_company(Caller(), NewCompany(name="Engines"))

    def conversion(person_id: str) -> LeadConversion:
        return LeadConversion(
            lead_id=lead_id,
            pipeline_id=pipeline_id,
            amount="10",
            currency="EUR",
            expected_close_date="2026-03-01",
            person_id=person_id,
        )

    before = log_size(service)
    with pytest.raises(NotFound) as unknown:
        await service.convert_lead(ctx("ConvertLead"), conversion(str(uuid.uuid4())))
    assert "person_id" in str(unknown.value)
    with pytest.raises(NotFound):
        await service.convert_lead(ctx("ConvertLead"), conversion(company.outcome.id))
    assert log_size(service) == before
    converted = await service.convert_lead(ctx("ConvertLead"), conversion(existing.outcome.id))
    assert converted.outcome.extra["person_matched"] == "true"
    deal = await service.get_opportunity(converted.outcome.extra["opportunity_id"])
    assert (deal.customer_id, deal.company_id) == (existing.outcome.id, "")
    # The named person was used as it is: nobody was registered.
    assert (await contacts.list_contacts(ContactQuery())).total_size == 2


async def persons(contacts: ContactsService) -> list[str]:
    page = await contacts.list_contacts(ContactQuery(kind="person", page_size=200))
    return sorted(c.id for c in page.contacts)


def converting(lead_id: str, pipeline_id: str, **changes: Any) -> LeadConversion:
    fields: dict[str, Any] = {
        "lead_id": lead_id,
        "pipeline_id": pipeline_id,
        "amount": "300",
        "currency": "EUR",
        "expected_close_date": "2026-04-30",
    }
    fields.update(changes)
    return LeadConversion(**fields)


async def test_a_lead_whose_email_exists_converts_into_that_person(
    service: PipelineService, contacts: ContactsService
) -> None:
    existing = await contacts.create_person(
        Caller(),
        NewPerson(
            given_name="Augusta",
            family_name="King",
            channels=[ChannelInput("email", "Ada@Example.org")],
        ),
    )
    person_id = existing.outcome.id
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)  # ada@example.org
    converted = await service.convert_lead(
        ctx("ConvertLead", request_id="match-1"),
        converting(lead_id, pipeline_id, create_company=True),
    )
    extra = converted.outcome.extra
    assert (extra["person_id"], extra["person_matched"]) == (person_id, "true")
    assert await persons(contacts) == [person_id]
    deal = await service.get_opportunity(extra["opportunity_id"])
    assert (deal.person_id, deal.customer_id) == (person_id, extra["company_id"])
    assert (await service.get_lead(lead_id)).person_id == person_id
    person = await contacts.get_contact(person_id)
    # The existing contact keeps its own name; it gains the lead's company.
    assert person.display_name == "Augusta King"
    assert [a.company_id for a in person.affiliations] == [extra["company_id"]]
    again = await service.convert_lead(
        ctx("ConvertLead", request_id="match-1"),
        converting(lead_id, pipeline_id, create_company=True),
    )
    assert again.outcome.replayed and again.outcome.extra == extra


async def test_a_lead_with_a_new_email_registers_a_new_person(
    service: PipelineService, contacts: ContactsService
) -> None:
    other = await contacts.create_person(
        Caller(),
        NewPerson(family_name="Hopper", channels=[ChannelInput("email", "grace@example.org")]),
    )
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)
    converted = await service.convert_lead(ctx("ConvertLead"), converting(lead_id, pipeline_id))
    extra = converted.outcome.extra
    assert extra["person_matched"] == "false"
    assert await persons(contacts) == sorted([other.outcome.id, extra["person_id"]])


async def test_a_lead_without_email_is_matched_by_its_phone(
    service: PipelineService, contacts: ContactsService
) -> None:
    existing = await contacts.create_person(
        Caller(),
        NewPerson(family_name="Byron", channels=[ChannelInput("phone", "+44 20 7946 0018")]),
    )
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service, email="", phone="+442079460018")
    converted = await service.convert_lead(ctx("ConvertLead"), converting(lead_id, pipeline_id))
    assert converted.outcome.extra["person_id"] == existing.outcome.id
    assert converted.outcome.extra["person_matched"] == "true"
    assert await persons(contacts) == [existing.outcome.id]


async def test_a_lead_whose_email_several_persons_have_is_refused_until_one_is_named(
    service: PipelineService, contacts: ContactsService
) -> None:
    twins = [
        await contacts.create_person(
            Caller(),
            NewPerson(family_name=name, channels=[ChannelInput("email", "ada@example.org")]),
        )
        for name in ("Byron", "Lovelace")
    ]
    ids = [t.outcome.id for t in twins]
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)
    before = log_size(service)
    with pytest.raises(RuleViolated) as refused:
        await service.convert_lead(
            ctx("ConvertLead"), converting(lead_id, pipeline_id, create_company=True)
        )
    assert all(i in str(refused.value) for i in ids) and "person_id" in str(refused.value)
    assert log_size(service) == before
    assert await persons(contacts) == sorted(ids)
    assert (await contacts.list_contacts(ContactQuery(kind="company"))).total_size == 0
    assert (await service.get_lead(lead_id)).status == "qualified"
    converted = await service.convert_lead(
        ctx("ConvertLead"), converting(lead_id, pipeline_id, person_id=ids[1])
    )
    extra = converted.outcome.extra
    assert (extra["person_id"], extra["person_matched"]) == (ids[1], "true")
    assert await persons(contacts) == sorted(ids)


@pytest.mark.parametrize(
    ("changes", "error", "field"),
    [
        ({"amount": "-1"}, ValidationFailed, "amount"),
        ({"currency": "ZZZ"}, ValidationFailed, "currency"),
        ({"expected_close_date": "31/03/2026"}, ValidationFailed, "expected_close_date"),
        ({"expected_close_date": "2026-01-01"}, ValidationFailed, "expected_close_date"),
        ({"pipeline_id": "nope"}, NotFound, None),
        ({"lead_id": str(uuid.uuid4())}, NotFound, None),
    ],
)
async def test_a_refused_conversion_writes_nothing_anywhere(
    service: PipelineService,
    contacts: ContactsService,
    port: InProcessContacts,
    changes: dict[str, Any],
    error: type[Exception],
    field: str | None,
) -> None:
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)
    fields: dict[str, Any] = {
        "lead_id": lead_id,
        "pipeline_id": pipeline_id,
        "amount": "100",
        "currency": "EUR",
        "expected_close_date": "2026-04-30",
        "create_company": True,
    }
    fields.update(changes)
    before = log_size(service)
    with pytest.raises(error) as caught:
        await service.convert_lead(ctx("ConvertLead"), LeadConversion(**fields))
    if field is not None:
        assert isinstance(caught.value, ValidationFailed)
        assert [e.field for e in caught.value.errors] == [field]
    assert log_size(service) == before
    assert (await contacts.list_contacts(ContactQuery())).total_size == 0
    assert (await service.get_lead(lead_id)).status == "qualified"


async def test_an_unqualified_lead_is_not_converted_and_contacts_is_not_asked(
    service: PipelineService, port: InProcessContacts
) -> None:
    pipeline_id = await define(service)
    lead = await service.create_lead(
        ctx("CreateLead"), NewLead(family_name="Hopper", source="web", owner="ann", phone="+44 1")
    )
    with pytest.raises(RuleViolated, match="qualified"):
        await service.convert_lead(
            ctx("ConvertLead"),
            LeadConversion(lead.outcome.id, pipeline_id, "1", "EUR", "2026-04-30"),
        )
    assert port.calls == 0
    with pytest.raises(VersionConflict):
        await service.qualify_lead(ctx("QualifyLead", expected=2), lead.outcome.id, 50)


async def test_a_conversion_its_user_may_not_have_contacts_make_is_refused_before_any_call(
    service: PipelineService, contacts: ContactsService, port: InProcessContacts
) -> None:
    pipeline_id = await define(service)
    lead_id = await qualified_lead(service)
    # The user may convert, but not relate people to companies in contacts: nothing
    # is registered there (no person left without its company) and nothing here.
    port.refused = {"LinkPersonToCompany"}
    before = log_size(service)
    with pytest.raises(PermissionDenied, match="LinkPersonToCompany"):
        await service.convert_lead(
            ctx("ConvertLead"),
            LeadConversion(lead_id, pipeline_id, "1", "EUR", "2026-04-30", create_company=True),
        )
    assert (port.calls, log_size(service)) == (0, before)
    assert (await contacts.list_contacts(ContactQuery())).total_size == 0
    assert (await service.get_lead(lead_id)).status == "qualified"


def as_user(subject: str, request_id: str) -> Caller:
    principal = Principal(subject, frozenset({"sales"}), "web")
    return Caller(actor=subject, client="web", request_id=request_id, principal=principal)


async def test_a_request_id_is_its_callers_own_and_bound_to_its_request(
    service: PipelineService, port: InProcessContacts
) -> None:
    pipeline_id = await define(service)
    first = await qualified_lead(service, email="ada@example.org")
    second = await qualified_lead(service, email="grace@example.org")

    async def convert(user: str, key: str, lead_id: str) -> Written:
        caller = as_user(user, key)
        # The user of the request, as the shared server code sets it.
        token = current_principal.set(caller.principal)
        try:
            return await service.convert_lead(
                caller, LeadConversion(lead_id, pipeline_id, "100", "EUR", "2026-04-30")
            )
        finally:
            current_principal.reset(token)

    mine = await convert("ann", "key-1", first)
    theirs = await convert("bob", "key-1", second)
    assert (mine.outcome.id, theirs.outcome.id) == (first, second)
    assert not mine.outcome.replayed and not theirs.outcome.replayed
    calls, before = port.calls, log_size(service)
    with pytest.raises(IdempotencyKeyReused) as reused:
        await convert("ann", "key-1", second)
    assert first not in reused.value.message
    with pytest.raises(IdempotencyKeyReused):
        await service.qualify_lead(as_user("ann", "key-1"), second, 10)
    assert (port.calls, log_size(service)) == (calls, before)
    again = await convert("ann", "key-1", first)
    assert (again.outcome.id, again.outcome.replayed) == (first, True)
    assert again.outcome.extra == mine.outcome.extra


# -- deals ------------------------------------------------------------------------------------


async def test_a_deal_moves_back_and_forth_is_won_and_refuses_to_close_again(
    service: PipelineService, clock: Clock
) -> None:
    pipeline_id = await define(service)
    deal_id = await open_deal(service, pipeline_id)
    clock.advance(days=2)
    await service.move_opportunity(ctx("MoveOpportunity"), deal_id, "negotiate")
    clock.advance(days=3)
    await service.move_opportunity(ctx("MoveOpportunity"), deal_id, "propose")
    clock.advance(days=1)
    moved = await service.move_opportunity(ctx("MoveOpportunity", expected=3), deal_id, "negotiate")
    assert moved.outcome.version == 4
    clock.advance(days=4)
    won = await service.win_opportunity(ctx("WinOpportunity", request_id="win-1"), deal_id)
    assert (won.subject.status, won.subject.closed_on) == ("won", date(2026, 2, 12))
    before = log_size(service)
    with pytest.raises(RuleViolated, match="already closed"):
        await service.win_opportunity(ctx("WinOpportunity"), deal_id)
    with pytest.raises(RuleViolated, match="reopen"):
        await service.change_amount(ctx("ChangeAmount"), deal_id, "1", "EUR")
    with pytest.raises(VersionConflict):
        await service.reopen_opportunity(ctx("ReopenOpportunity", expected=4), deal_id)
    replay = await service.win_opportunity(ctx("WinOpportunity", request_id="win-1"), deal_id)
    assert (replay.outcome.replayed, replay.outcome.version) == (True, 5)
    assert log_size(service) == before
    deal = await service.get_opportunity(deal_id)
    assert [(v.stage_id, v.regression) for v in deal.history] == [
        ("qualify", False),
        ("negotiate", False),
        ("propose", True),
        ("negotiate", False),
        ("won", False),
    ]
    stays = [(v.left_at or clock.now) - v.entered_at for v in deal.history]
    assert sum(
        (d for v, d in zip(deal.history, stays, strict=True) if v.stage_id == "negotiate"),
        timedelta(),
    ) == timedelta(days=7)


async def test_bad_deal_input_is_refused_with_the_field_and_writes_nothing(
    service: PipelineService,
) -> None:
    pipeline_id = await define(service)
    before = log_size(service)
    for changes, field in [
        ({"amount": "-5"}, "amount"),
        ({"currency": "ABC"}, "currency"),
        ({"stage_id": "ghost"}, "stage_id"),
        ({"expected_close_date": "2026-02-01"}, "expected_close_date"),
        ({"expected_close_date": "soon"}, "expected_close_date"),
    ]:
        with pytest.raises(ValidationFailed) as caught:
            await open_deal(service, pipeline_id, **changes)
        assert field in [e.field for e in caught.value.errors]
    with pytest.raises(NotFound):
        await open_deal(service, str(uuid.uuid4()))
    assert log_size(service) == before


async def test_money_and_dates_survive_the_store_and_a_restart(
    settings: Settings, port: InProcessContacts, clock: Clock
) -> None:
    first = PipelineService(create_application(settings), port, clock=clock)
    try:
        pipeline_id = await define(first)
        deal_id = await open_deal(first, pipeline_id, currency="KWD", amount="10.125")
        await first.set_line_items(
            ctx("SetLineItems"),
            deal_id,
            [
                LineItemInput("sku-1", "Seat", "3", "19.995", "10"),
                LineItemInput("sku-2", "Kit", "1", "5"),
            ],
        )
        clock.advance(days=1)
        await first.lose_opportunity(ctx("LoseOpportunity"), deal_id, "timing", "2026-02-02")
    finally:
        first.close()
    second = PipelineService(create_application(settings), port, clock=clock)
    try:
        deal = await second.get_opportunity(deal_id)
        # 3 x 19.995 x 0.9 = 53.9865 -> 53.986 (KWD has 3 decimals, half-even); + 5.000.
        assert [line.total for line in deal.line_items] == [Decimal("53.986"), Decimal("5.000")]
        assert (deal.amount.amount, deal.amount.currency) == (Decimal("58.986"), "KWD")
        assert (deal.closed_on, deal.lost_reason) == (date(2026, 2, 2), "timing")
        assert deal.expected_close_date == date(2026, 3, 31)
        page = await second.list_opportunities(OpportunityQuery(status="lost"))
        assert [d.id for d in page.opportunities] == [deal.id]
    finally:
        second.close()


# -- activities ---------------------------------------------------------------------------------


async def test_overdue_follow_ups_per_owner(service: PipelineService, clock: Clock) -> None:
    pipeline_id = await define(service)
    deal_id = await open_deal(service, pipeline_id)
    lead_id = await qualified_lead(service)

    async def schedule(kind: str, subject: str, owner: str, due_in_days: float, title: str) -> str:
        written = await service.schedule_activity(
            ctx("ScheduleActivity"),
            NewActivity(
                kind, subject, "task", title, owner, clock.now + timedelta(days=due_in_days)
            ),
        )
        return written.outcome.id

    await schedule("opportunity", deal_id, "ann", 1, "send quote")
    done = await schedule("opportunity", deal_id, "ann", 2, "call back")
    await schedule("lead", lead_id, "bob", 3, "intro call")
    await schedule("lead", lead_id, "bob", 10, "demo")
    await service.complete_activity(ctx("CompleteActivity"), done, "called")
    with pytest.raises(RuleViolated, match="already completed"):
        await service.complete_activity(ctx("CompleteActivity"), done, "again")
    with pytest.raises(NotFound):
        await schedule("lead", deal_id, "ann", 1, "wrong kind of subject")
    with pytest.raises(ValidationFailed):
        await schedule("contact", deal_id, "ann", 1, "unknown kind of subject")
    clock.advance(days=5)
    overdue = await service.overdue_follow_ups()
    assert {o: [a.title for a in items] for o, items in overdue.items()} == {
        "ann": ["send quote"],
        "bob": ["intro call"],
    }
    assert list(await service.overdue_follow_ups("bob")) == ["bob"]


# -- queries over every deal ---------------------------------------------------------------------


async def test_forecast_funnel_and_win_rate_see_every_committed_write(
    service: PipelineService, clock: Clock
) -> None:
    pipeline_id = await define(service)
    a = await open_deal(service, pipeline_id, owner="ann", amount="1000")
    b = await open_deal(
        service, pipeline_id, owner="bob", amount="3000", expected_close_date="2026-05-15"
    )
    c = await open_deal(service, pipeline_id, owner="bob", amount="500")
    clock.advance(days=2)
    await service.move_opportunity(ctx("MoveOpportunity"), a, "propose")
    await service.move_opportunity(ctx("MoveOpportunity"), b, "negotiate")
    clock.advance(days=4)
    await service.win_opportunity(ctx("WinOpportunity"), b)
    await service.lose_opportunity(ctx("LoseOpportunity"), c, "price")

    rows = await service.get_forecast(ForecastQuery(period="quarter"))
    assert [(r.period, r.owner, r.category, r.amount, r.weighted_amount) for r in rows] == [
        # a: propose (40 %); b won on 8 February; c lost on 8 February.
        ("2026-Q1", "ann", "best_case", Decimal("1000.00"), Decimal("400.00")),
        ("2026-Q1", "bob", "closed_lost", Decimal("500.00"), Decimal("0.00")),
        ("2026-Q1", "bob", "closed_won", Decimal("3000.00"), Decimal("3000.00")),
    ]
    assert [
        r.owner for r in await service.get_forecast(ForecastQuery(owner="ann", end="2026-03-31"))
    ] == ["ann"]
    with pytest.raises(ValidationFailed) as caught:
        await service.get_forecast(ForecastQuery(start="yesterday"))
    assert caught.value.errors[0].field == "start"

    result = await service.get_funnel(pipeline_id)
    stages = {s.stage_id: s for s in result.stages}
    assert (stages["qualify"].entered, stages["qualify"].advanced) == (3, 2)
    # a and b left qualify after 2 days, c (lost from it) after 6.
    assert stages["qualify"].average_time_in_stage == timedelta(days=10) / 3
    assert (stages["negotiate"].entered, stages["negotiate"].conversion) == (1, Decimal(1))
    with pytest.raises(NotFound):
        await service.get_funnel(str(uuid.uuid4()))

    rate = await service.get_win_rate(WinRateQuery(pipeline_id=pipeline_id))
    assert (rate.won, rate.lost, rate.rate) == (1, 1, Decimal("0.5"))
    assert rate.average_cycle == timedelta(days=6)

    page = await service.list_opportunities(OpportunityQuery(owner="bob", page_size=1))
    assert page.total_size == 2
    rest = await service.list_opportunities(
        OpportunityQuery(owner="bob", page_size=1, page_token=page.next_page_token)
    )
    assert {page.opportunities[0].id, rest.opportunities[0].id} == {b, c}
    assert rest.next_page_token == ""
    with pytest.raises(ValidationFailed):
        await service.list_opportunities(OpportunityQuery(page_token="garbage!"))


async def test_pipelines_change_without_rewriting_deals(service: PipelineService) -> None:
    pipeline_id = await define(service)
    deal_id = await open_deal(service, pipeline_id, stage_id="propose")
    await service.add_stage(
        ctx("AddStage"), pipeline_id, StageInput("demo", "Demo", "25", "pipeline"), 1
    )
    await service.rename_stage(ctx("RenameStage"), pipeline_id, "propose", "Proposal")
    await service.retire_stage(ctx("RetireStage"), pipeline_id, "propose")
    with pytest.raises(RuleViolated):
        await service.retire_stage(ctx("RetireStage"), pipeline_id, "won")
    pipeline = await service.get_pipeline(pipeline_id)
    assert [s.stage_id for s in pipeline.stages if not s.retired] == [
        "qualify",
        "demo",
        "negotiate",
        "won",
        "lost",
    ]
    deal = await service.get_opportunity(deal_id)
    assert deal.stage_id == "propose"
    result = await service.get_funnel(pipeline_id)
    assert [(s.stage_id, s.name, s.retired, s.entered) for s in result.stages][-1] == (
        "propose",
        "Proposal",
        True,
        1,
    )
    listed = await service.list_pipelines()
    assert [str(p.id) for p in listed] == [pipeline_id]
    with pytest.raises(NotFound):
        await service.get_pipeline(deal_id)
