"""The application layer over real event stores: SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from contacts_support import Clock, log_length

from crm_common.commands import Caller
from crm_common.errors import (
    IdempotencyKeyReused,
    NotFound,
    RuleViolated,
    ValidationFailed,
    VersionConflict,
)
from crm_common.settings import Settings
from crm_contacts.application import ContactsApplication, ContactsService, create_application
from crm_contacts.domain import ConsentStatus, ContactKind, LifecycleStage, PersonProfile
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    ContactQuery,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_deploy.testing import postgres_settings


def caller(**kw: Any) -> Caller:
    return Caller(actor="grace", client="tests", **kw)


ADA = NewPerson(
    given_name="Ada",
    family_name="Lovelace",
    channels=[
        ChannelInput("email", "Ada@Example.com", True, "granted", "web-form:newsletter"),
        ChannelInput("phone", "+44 20 7946 0018"),
    ],
    tags=["VIP"],
    custom_fields={"budget": CustomFieldInput("money", "1234.5", "EUR")},
    owner="grace",
)


async def create(service: ContactsService, new: NewPerson = ADA, **kw: Any) -> str:
    written = await service.create_person(caller(**kw), new)
    return written.outcome.id


def profile(view: Any) -> PersonProfile:
    assert isinstance(view.profile, PersonProfile)
    return view.profile


async def test_a_created_person_is_read_back_as_written(service: ContactsService) -> None:
    written = await service.create_person(caller(), ADA)
    assert (written.outcome.version, written.outcome.replayed) == (1, False)
    assert written.outcome.position == log_length(service.app)

    got = await service.get_contact(written.outcome.id)
    assert got == written.contact
    assert got.kind is ContactKind.PERSON
    ada = profile(got)
    assert ada.display_name == "Ada Lovelace"
    assert ada.lifecycle_stage is LifecycleStage.LEAD
    assert ada.tags == ("vip",)
    assert ada.custom_fields["budget"].value == "1234.50"
    email, phone = ada.channels
    assert (email.address, email.preferred) == ("ada@example.com", True)
    assert email.consent is not None
    assert (email.consent.status, email.consent.source) == (
        ConsentStatus.GRANTED,
        "web-form:newsletter",
    )
    assert (phone.address, phone.consent) == ("+442079460018", None)


async def test_a_day_in_the_life_of_a_contact(service: ContactsService, clock: Clock) -> None:
    person_id = await create(service)
    acme = await service.create_company(
        caller(), NewCompany(name="Analytical Engines", domain="engines.example")
    )
    company_id = acme.outcome.id

    linked = await service.link_person_to_company(
        caller(expected_version=1), CompanyLink(person_id, company_id, "CTO")
    )
    assert linked.outcome.version == 2
    clock.advance(hours=1)
    consent = await service.record_consent(
        caller(),
        ConsentInput(person_id, "email", "ADA@example.com", "withdrawn", "call:agent-7"),
    )
    logged = await service.log_interaction(
        caller(),
        InteractionInput(person_id, "call", "outbound", "phone", "demo of the engine"),
    )
    updated = await service.update_person(
        caller(expected_version=4),
        PersonChanges(
            person_id,
            frozenset({"lifecycle_stage", "family_name"}),
            family_name="King",
            lifecycle_stage="customer",
        ),
    )
    renamed = await service.update_company(
        caller(expected_version=1),
        CompanyChanges(company_id, frozenset({"name"}), name="Analytical Engines Ltd"),
    )
    positions = [
        linked.outcome.position,
        consent.outcome.position,
        logged.outcome.position,
        updated.outcome.position,
        renamed.outcome.position,
    ]
    assert positions == sorted(positions) and len(set(positions)) == 5

    ada = await service.get_contact(person_id)
    assert ada.version == 5
    assert profile(ada).display_name == "Ada King"
    assert profile(ada).lifecycle_stage is LifecycleStage.CUSTOMER
    [affiliation] = ada.affiliations
    # The person keeps the name the company had when the link was made.
    assert (affiliation.company_id, affiliation.company_name, affiliation.role) == (
        company_id,
        "Analytical Engines",
        "CTO",
    )
    email = profile(ada).channels[0]
    assert email.consent is not None
    assert (email.consent.status, email.consent.source, email.consent.recorded_at) == (
        ConsentStatus.WITHDRAWN,
        "call:agent-7",
        clock.now,
    )
    [call] = ada.interactions
    assert (call.interaction_id, call.summary, call.occurred_at) == (
        logged.outcome.extra["interaction_id"],
        "demo of the engine",
        clock.now,
    )

    unlinked = await service.unlink_person_from_company(
        caller(), CompanyUnlink(person_id, company_id)
    )
    assert unlinked.contact.affiliations == ()
    with pytest.raises(RuleViolated):
        await service.unlink_person_from_company(caller(), CompanyUnlink(person_id, company_id))


async def test_search_by_name_email_phone_tag_and_kind(service: ContactsService) -> None:
    ada = await create(service)
    grace = await create(
        service,
        NewPerson(
            given_name="Grace",
            family_name="Hopper",
            channels=[ChannelInput("whatsapp", "+1 202 555 0143")],
            tags=["navy", "vip"],
        ),
    )
    lovelace_ltd = (
        await service.create_company(caller(), NewCompany(name="Lovelace Ltd"))
    ).outcome.id

    async def ids(**query: Any) -> list[str]:
        page = await service.list_contacts(ContactQuery(**query))
        assert page.total_size == len(page.contacts)
        return [c.id for c in page.contacts]

    assert await ids(query="LOVE") == [ada, lovelace_ltd]  # by display name, then id
    assert await ids(query="ada lovelace") == [ada]
    assert await ids(query="love", kind="company") == [lovelace_ltd]
    assert await ids(email=" ADA@example.COM ") == [ada]
    assert await ids(phone="0044 20 7946 0018") == [ada]
    assert await ids(phone="+12025550143") == [grace]
    assert await ids(tag="VIP") == [ada, grace]
    assert await ids(tag="vip", query="hop") == [grace]
    assert await ids(tag="nobody") == []
    assert await ids(kind="person") == [ada, grace]
    assert await ids() == [ada, grace, lovelace_ltd]


async def test_search_follows_every_change(service: ContactsService) -> None:
    ada = await create(service)
    await service.update_person(
        caller(),
        PersonChanges(
            ada,
            frozenset({"tags", "channels", "given_name"}),
            given_name="Augusta",
            tags=["board"],
            channels=[ChannelInput("email", "augusta@example.com")],
        ),
    )
    assert (await service.list_contacts(ContactQuery(email="ada@example.com"))).contacts == []
    assert (await service.list_contacts(ContactQuery(tag="vip"))).contacts == []
    assert (await service.list_contacts(ContactQuery(query="ada "))).contacts == []
    [found] = (await service.list_contacts(ContactQuery(email="augusta@example.com"))).contacts
    assert (found.id, found.version, profile(found).tags) == (ada, 2, ("board",))


async def test_page_tokens_walk_every_match_exactly_once(service: ContactsService) -> None:
    created = set()
    for i in range(23):
        created.add(await create(service, NewPerson(given_name=f"Ada{i:02d}", tags=["walk"])))
    await create(service, NewPerson(given_name="Other"))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await service.list_contacts(ContactQuery(tag="walk", page_size=5, page_token=token))
        assert page.total_size == (23 if pages < 2 else 25)
        seen.extend(c.id for c in page.contacts)
        pages += 1
        if pages == 2:
            # A contact added behind the pages already read is not shown twice,
            # one added ahead of them is shown once.
            early = await create(service, NewPerson(given_name="Aaron", tags=["walk"]))
            late = await create(service, NewPerson(given_name="Zoe", tags=["walk"]))
            created.add(late)
            assert early
        token = page.next_page_token
        if not token:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 24
    assert set(seen) == created
    names = [profile(await service.get_contact(i)).given_name for i in seen]
    assert names == sorted(names)


async def test_bad_searches_name_the_field(service: ContactsService) -> None:
    for query, field in [
        (ContactQuery(page_size=201), "page_size"),
        (ContactQuery(page_size=-1), "page_size"),
        (ContactQuery(email="not-an-email"), "email"),
        (ContactQuery(phone="call me"), "phone"),
        (ContactQuery(kind="robot"), "kind"),
        (ContactQuery(page_token="garbage!"), "page_token"),
    ]:
        with pytest.raises(ValidationFailed) as refused:
            await service.list_contacts(query)
        assert [e.field for e in refused.value.errors] == [field]


async def test_a_stale_expected_version_is_refused_and_writes_nothing(
    service: ContactsService,
) -> None:
    ada = await create(service)
    await service.update_person(
        caller(expected_version=1),
        PersonChanges(ada, frozenset({"given_name"}), given_name="Augusta"),
    )
    before = log_length(service.app)
    with pytest.raises(VersionConflict) as stale:
        await service.update_person(
            caller(expected_version=1),
            PersonChanges(ada, frozenset({"given_name"}), given_name="Byron"),
        )
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    with pytest.raises(VersionConflict):
        await service.log_interaction(
            caller(expected_version=3), InteractionInput(ada, "call", summary="x")
        )
    assert log_length(service.app) == before
    got = await service.get_contact(ada)
    assert (got.version, profile(got).given_name) == (2, "Augusta")


async def test_a_retried_request_id_returns_the_first_outcome_and_writes_nothing(
    service: ContactsService,
) -> None:
    first = await service.create_person(caller(request_id="req-1"), ADA)
    after_first = log_length(service.app)
    again = await service.create_person(caller(request_id="req-1"), ADA)
    assert (again.outcome.id, again.outcome.version, again.outcome.position) == (
        first.outcome.id,
        first.outcome.version,
        first.outcome.position,
    )
    assert (first.outcome.replayed, again.outcome.replayed) == (False, True)
    assert again.contact == first.contact
    assert log_length(service.app) == after_first
    assert (await service.list_contacts(ContactQuery(email="ada@example.com"))).total_size == 1

    call = InteractionInput(first.outcome.id, "call", summary="once")
    logged = await service.log_interaction(caller(request_id="req-2"), call)
    retried = await service.log_interaction(caller(request_id="req-2"), call)
    assert retried.outcome.extra == logged.outcome.extra
    assert len((await service.get_contact(first.outcome.id)).interactions) == 1

    # The same request id for another command, or the same command on other input, is
    # refused without a word about the first request, and writes nothing.
    length = log_length(service.app)
    for other in (
        service.create_company(caller(request_id="req-1"), NewCompany(name="Acme")),
        service.create_person(caller(request_id="req-1"), replace(ADA, given_name="Augusta")),
        service.log_interaction(caller(request_id="req-2"), replace(call, summary="twice")),
    ):
        with pytest.raises(IdempotencyKeyReused) as reused:
            await other
        assert first.outcome.id not in reused.value.message
        assert "Ada" not in reused.value.message
    assert log_length(service.app) == length


async def test_a_won_deal_makes_a_customer_once_and_leaves_an_advocate_alone(
    service: ContactsService,
) -> None:
    ada = await create(service, replace(ADA, lifecycle_stage="opportunity"))
    acme = (await service.create_company(caller(), NewCompany(name="Acme"))).outcome
    fan = (
        await service.create_company(caller(), NewCompany(name="Fans", lifecycle_stage="advocate"))
    ).outcome
    for contact_id in (ada, acme.id):
        won = await service.become_customer(caller(request_id=f"won-1:{contact_id}"), contact_id)
        assert (won.outcome.replayed, won.outcome.extra) == (False, {"promoted": "true"})
        assert won.contact.profile.lifecycle_stage is LifecycleStage.CUSTOMER
        assert won.contact.version == 2
    # Its search entry follows.
    found = await service.list_contacts(ContactQuery(query="Ada"))
    assert [c.profile.lifecycle_stage for c in found.contacts] == [LifecycleStage.CUSTOMER]

    length = log_length(service.app)
    again = await service.become_customer(caller(request_id=f"won-1:{ada}"), ada)
    assert (again.outcome.replayed, again.outcome.version) == (True, 2)
    assert again.outcome.extra == {"promoted": "true"}
    # A second deal won: already a customer, nothing recorded but the receipt.
    second = await service.become_customer(caller(request_id=f"won-2:{ada}"), ada)
    assert (second.outcome.version, second.outcome.extra) == (2, {"promoted": "false"})
    advocate = await service.become_customer(caller(), fan.id)
    assert advocate.contact.profile.lifecycle_stage is LifecycleStage.ADVOCATE
    assert advocate.contact.version == 1
    assert log_length(service.app) == length + 1  # the second request's receipt

    with pytest.raises(NotFound):
        await service.become_customer(caller(), "9c1f0b1e-0000-4000-8000-000000000000")
    assert log_length(service.app) == length + 1


async def test_concurrent_retries_of_one_request_write_once(service: ContactsService) -> None:
    results = await asyncio.gather(
        *(service.create_person(caller(request_id="burst"), ADA) for _ in range(8))
    )
    assert len({r.outcome.id for r in results}) == 1
    assert sorted(r.outcome.replayed for r in results) == [False] + [True] * 7
    assert (await service.list_contacts(ContactQuery(email="ada@example.com"))).total_size == 1


async def test_bad_input_and_unknown_ids_write_nothing(service: ContactsService) -> None:
    ada = await create(service)
    before = log_length(service.app)
    missing = "00000000-0000-4000-8000-000000000000"

    with pytest.raises(ValidationFailed) as refused:
        await service.create_person(
            caller(),
            replace(
                ADA,
                given_name="X" * 201,
                channels=[ChannelInput("email", "not-an-email")],
                custom_fields={"budget": CustomFieldInput("colour", "red")},
            ),
        )
    assert [e.field for e in refused.value.errors] == [
        "given_name",
        "custom_fields.budget.type",
        "channels[0].address",
    ]
    with pytest.raises(ValidationFailed):
        await service.update_person(caller(), PersonChanges(ada, frozenset({"lifecycle_stage"})))
    with pytest.raises(RuleViolated):
        await service.update_person(
            caller(),
            PersonChanges(ada, frozenset({"lifecycle_stage"}), lifecycle_stage="subscriber"),
        )
    with pytest.raises(NotFound):
        await service.log_interaction(
            caller(), InteractionInput(missing, "call", summary="to nobody")
        )
    with pytest.raises(NotFound):
        await service.link_person_to_company(caller(), CompanyLink(ada, missing, "CTO"))
    with pytest.raises(NotFound):
        # A person is not a company.
        await service.link_person_to_company(caller(), CompanyLink(ada, ada, "CTO"))
    with pytest.raises(NotFound):
        await service.update_company(
            caller(), CompanyChanges(ada, frozenset({"name"}), name="Acme")
        )
    with pytest.raises(NotFound):
        await service.get_contact("not-a-uuid")
    with pytest.raises(NotFound):
        await service.get_contact(missing)
    assert log_length(service.app) == before
    assert (await service.get_contact(ada)).version == 1


async def test_a_change_that_changes_nothing_records_nothing(service: ContactsService) -> None:
    ada = await create(service)
    before = log_length(service.app)
    same = await service.update_person(
        caller(expected_version=1),
        PersonChanges(ada, frozenset({"tags"}), tags=["vip"]),
    )
    assert (same.outcome.version, log_length(service.app)) == (1, before)
    assert same.outcome.position == before


async def test_a_restarted_application_sees_everything(
    store_settings: Settings, clock: Clock
) -> None:
    first = ContactsService(create_application(store_settings), clock=clock)
    try:
        ada = await create(first, request_id="ada-once")
        acme = (
            await first.create_company(caller(), NewCompany(name="Acme", tags=["b2b"]))
        ).outcome.id
        await first.link_person_to_company(caller(), CompanyLink(ada, acme, "buyer"))
        clock.advance(minutes=5)
        await first.log_interaction(caller(), InteractionInput(ada, "visit", summary="tea"))
        before = await first.get_contact(ada)
    finally:
        first.close()

    second = ContactsService(create_application(store_settings), clock=clock)
    try:
        assert await second.get_contact(ada) == before
        assert [c.id for c in (await second.list_contacts(ContactQuery(tag="b2b"))).contacts] == [
            acme
        ]
        [found] = (await second.list_contacts(ContactQuery(email="ada@example.com"))).contacts
        assert (found.id, found.version, found.affiliations) == (ada, 3, before.affiliations)
        replay = await second.create_person(caller(request_id="ada-once"), ADA)
        assert (replay.outcome.id, replay.outcome.replayed) == (ada, True)
        assert replay.outcome.position == (await first_position(second, ada))
    finally:
        second.close()


async def first_position(service: ContactsService, contact_id: str) -> int:
    """The log position of a contact's first event."""
    recorder: Any = service.app.recorder
    for notification in recorder.select_notifications(1, 1000):
        if str(notification.originator_id) == contact_id:
            return int(notification.id)
    raise AssertionError(contact_id)


async def test_interactions_logged_late_show_in_time_order(
    service: ContactsService, clock: Clock
) -> None:
    ada = await create(service)
    for summary, hours_ago in [("newest", 0), ("oldest", 48), ("middle", 24)]:
        await service.log_interaction(
            caller(),
            InteractionInput(
                ada, "mail", summary=summary, occurred_at=clock.now - timedelta(hours=hours_ago)
            ),
        )
    got = await service.get_contact(ada)
    assert [i.summary for i in got.interactions] == ["newest", "middle", "oldest"]


async def test_a_second_replica_finds_what_the_first_one_wrote(
    store_settings: Settings, clock: Clock
) -> None:
    one = ContactsService(create_application(store_settings), clock=clock)
    two = ContactsService(create_application(store_settings), clock=clock)
    try:
        assert (await two.list_contacts(ContactQuery())).total_size == 0
        ada = await create(one)
        [found] = (await two.list_contacts(ContactQuery(email="ada@example.com"))).contacts
        assert found.id == ada
        await two.update_person(
            caller(expected_version=1),
            PersonChanges(ada, frozenset({"tags"}), tags=["board"]),
        )
        with pytest.raises(VersionConflict):
            await one.update_person(
                caller(expected_version=1),
                PersonChanges(ada, frozenset({"tags"}), tags=["stale"]),
            )
        [moved] = (await one.list_contacts(ContactQuery(tag="board"))).contacts
        assert (moved.id, moved.version) == (ada, 2)
    finally:
        one.close()
        two.close()


def assert_all_come_up_together(settings: Settings, processes: int = 8) -> None:
    """`processes` applications created at the same moment on `settings`'
    store all come up, and they share one store."""
    barrier = threading.Barrier(processes)

    def start(_: int) -> ContactsApplication:
        barrier.wait()
        return create_application(settings)

    with ThreadPoolExecutor(processes) as pool:
        apps = list(pool.map(start, range(processes)))
    try:
        assert len({app.recorder.max_notification_id() for app in apps}) == 1
    finally:
        for app in apps:
            app.close()


@pytest.mark.postgres
def test_replicas_starting_together_on_a_fresh_schema_all_come_up(postgres_schema: str) -> None:
    """Eight processes' worth of applications created at once on an empty
    schema (replicas rolled out together)."""
    assert_all_come_up_together(postgres_settings("contacts", postgres_schema))


def test_processes_starting_together_on_a_fresh_sqlite_file_all_come_up(tmp_path: Path) -> None:
    """The local stack starts a service's API, relay and follower at once on a
    new data directory: each one opens the new SQLite file, which the first
    switches to WAL mode (an exclusive lock). Tried on five new files."""
    settings = replace(Settings.from_env("contacts"), event_store="sqlite")
    for attempt in range(5):
        assert_all_come_up_together(replace(settings, data_dir=tmp_path / str(attempt)))
