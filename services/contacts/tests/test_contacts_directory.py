"""The contact directory's query tables over real SQLite and PostgreSQL stores:
a restarted service answers from the stored tables at once, with the same
results and without reading the log again; names with LIKE's own characters
match literally; results come in byte order of the casefolded names on both
stores."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from contacts_support import Clock, log_length

from crm_common.commands import Caller
from crm_common.querystore import QueryDatabase
from crm_common.settings import Settings
from crm_contacts.application import (
    ContactsApplication,
    ContactsService,
    create_application,
    open_directory,
)
from crm_contacts.directory import ContactDirectory
from crm_contacts.domain import (
    Channel,
    ChannelIdentity,
    Company,
    CompanyProfile,
    Interaction,
    InteractionKind,
    LifecycleStage,
    Person,
    PersonProfile,
)
from crm_contacts.inputs import ContactQuery, NewCompany, NewPerson

#: Contacts in the "large" store: enough that a cache smaller than it has to
#: load contacts back from the store, few enough for a test.
CONTACTS = 3000
#: Aggregates stored per save while building it.
PER_SAVE = 100


def caller() -> Caller:
    return Caller(actor="grace", client="tests")


def fill(app: ContactsApplication, clock: Clock, contacts: int = CONTACTS) -> None:
    """Stores `contacts` persons and companies (tags, emails, phone numbers), then
    changes a tenth of them and logs an interaction on another tenth: persons and
    companies as the write side stores them, many per save."""
    made: list[Person | Company] = []
    for i in range(contacts):
        if i % 10 == 9:
            made.append(
                Company.register(
                    CompanyProfile(
                        name=f"Firm {i:05d}",
                        lifecycle_stage=LifecycleStage.LEAD,
                        tags=(f"group {i % 7}",),
                    )
                )
            )
            continue
        made.append(
            Person.register(
                PersonProfile(
                    given_name=f"Given{i % 97:02d}",
                    family_name=f"Family {i:05d}",
                    lifecycle_stage=LifecycleStage.LEAD,
                    tags=(f"group {i % 7}",),
                    channels=(
                        ChannelIdentity(Channel.EMAIL, f"p{i}@example.com"),
                        ChannelIdentity(Channel.PHONE, f"+4144{i:07d}"),
                    ),
                )
            )
        )
    for start in range(0, len(made), PER_SAVE):
        app.save(*made[start : start + PER_SAVE])
    changed: list[Person | Company] = []
    for i, contact in enumerate(made):
        if i % 10 == 3 and isinstance(contact, Person):
            contact.change_stage(LifecycleStage.OPPORTUNITY)
            changed.append(contact)
        elif i % 10 == 5:
            contact.log_interaction(
                Interaction(f"i-{i}", InteractionKind.CALL, None, None, "hello", clock(), "grace")
            )
            changed.append(contact)
    for start in range(0, len(changed), PER_SAVE):
        app.save(*changed[start : start + PER_SAVE])


SEARCHES = [
    ContactQuery(),
    ContactQuery(page_size=200),
    ContactQuery(query="family 012"),
    ContactQuery(query="given07", page_size=7),
    ContactQuery(tag="group 3", page_size=25),
    ContactQuery(tag="group 3", kind="company"),
    ContactQuery(email="p1234@example.com"),
    ContactQuery(phone="+41 44 000 2345"),
    ContactQuery(kind="company", page_size=3),
]


async def walk(service: ContactsService, query: ContactQuery, pages: int = 4) -> list[Any]:
    """The first `pages` pages of a search, following its tokens."""
    seen = []
    for _ in range(pages):
        page = await service.list_contacts(query)
        seen.append(page)
        if not page.next_page_token:
            break
        query = replace(query, page_token=page.next_page_token)
    return seen


async def test_a_restarted_service_answers_from_the_stored_tables(
    store_settings: Settings, clock: Clock
) -> None:
    app = create_application(store_settings)
    fill(app, clock)
    # A cache far smaller than the store: memory stays bounded while the tables
    # are built, and contacts not in it are loaded back from the store.
    small = ContactDirectory(app, QueryDatabase(store_settings), cache_size=100)
    first = ContactsService(app, clock=clock, directory=small)
    try:
        before = [await walk(first, query) for query in SEARCHES]
        assert first.directory.applied == log_length(app)
        assert 0 < first.directory.tables.cached <= 100
    finally:
        first.close()

    assert before[0][0].total_size == CONTACTS
    assert [len(p.contacts) for p in before[1]] == [200] * 4
    assert before[4][0].total_size == len([i for i in range(CONTACTS) if i % 7 == 3])
    [[found]] = [p.contacts for p in before[6]]
    assert (found.profile.display_name, found.version) == ("Given70 Family 01234", 1)
    [[called]] = [p.contacts for p in before[7]]
    assert (called.profile.display_name, called.version) == ("Given17 Family 02345", 2)

    second = ContactsService(create_application(store_settings), clock=clock)
    try:
        # Nothing to apply: the tables are where the log ends, before any search.
        assert second.directory.position == log_length(second.app)
        assert second.directory.query_side.lag() == 0
        after = [await walk(second, query) for query in SEARCHES]
        assert after == before
        assert second.directory.applied == 0
        # No contact was folded into memory to answer them.
        assert second.directory.tables.cached == 0
        # A write after the restart is found by the next search.
        ada = await second.create_person(caller(), NewPerson(given_name="Ada", tags=["new"]))
        [new] = (await second.list_contacts(ContactQuery(tag="new"))).contacts
        assert new.id == ada.outcome.id
        assert second.directory.applied == 1
    finally:
        second.close()


async def test_names_with_like_characters_match_literally(service: ContactsService) -> None:
    names = ["50% Off", "500 Offers", "A_B Ltd", "AxB Ltd", "Back\\slash", "Backslash"]
    ids = {}
    for name in names:
        ids[name] = (await service.create_company(caller(), NewCompany(name=name))).outcome.id

    async def found(text: str) -> list[str]:
        page = await service.list_contacts(ContactQuery(query=text))
        return [c.profile.display_name for c in page.contacts]

    assert await found("0%") == ["50% Off"]
    assert await found("a_b") == ["A_B Ltd"]
    assert await found("k\\s") == ["Back\\slash"]
    assert await found("%") == ["50% Off"]
    assert await found("_") == ["A_B Ltd"]


async def test_results_come_in_the_order_of_the_casefolded_names(
    service: ContactsService,
) -> None:
    """Byte order of the casefolded display names, then ids, on both stores (a
    PostgreSQL database in a linguistic collation would ignore the hyphen and
    the space, and put `é` beside `e`)."""
    names = ["Émile", "emil", "Zoë", "zoe", "O Neil", "o-neil", "oneil", "ada-b", "adab", "Ab"]
    for name in names:
        await service.create_company(caller(), NewCompany(name=name))
    page = await service.list_contacts(ContactQuery(page_size=4))
    seen = list(page.contacts)
    while page.next_page_token:
        page = await service.list_contacts(
            ContactQuery(page_size=4, page_token=page.next_page_token)
        )
        seen.extend(page.contacts)
    got = [(c.profile.display_name.casefold(), c.id) for c in seen]
    assert got == sorted(got)
    assert [c.profile.display_name for c in seen] == [
        "Ab",
        "ada-b",
        "adab",
        "emil",
        "O Neil",
        "o-neil",
        "oneil",
        "zoe",
        "Zoë",
        "Émile",
    ]


async def test_a_name_with_a_nul_character_does_not_stop_the_directory(
    service: ContactsService,
) -> None:
    """PostgreSQL's TEXT cannot hold NUL: the name is searchable without it and
    the contacts stored after it are found."""
    odd = await service.create_person(caller(), NewPerson(given_name="Nu\x00ll"))
    after = await service.create_person(caller(), NewPerson(given_name="Grace"))
    assert [c.id for c in (await service.list_contacts(ContactQuery(query="null"))).contacts] == [
        odd.outcome.id
    ]
    [grace] = (await service.list_contacts(ContactQuery(query="grace"))).contacts
    assert grace.id == after.outcome.id


def test_replicas_opening_the_tables_together_all_come_up(store_settings: Settings) -> None:
    """Replicas rolled out together on a new store each create the directory's
    tables if missing: all of them open, and they share one set of tables."""
    apps = [create_application(store_settings) for _ in range(6)]
    barrier = threading.Barrier(len(apps))

    def open_one(app: ContactsApplication) -> ContactDirectory:
        barrier.wait()
        return open_directory(app)

    try:
        with ThreadPoolExecutor(len(apps)) as pool:
            directories = list(pool.map(open_one, apps))
        apps[0].save(Company.register(CompanyProfile("Acme", LifecycleStage.LEAD)))
        assert [d.search(ContactQuery()).total_size for d in directories] == [1] * len(apps)
        assert sum(d.applied for d in directories) == 1
        for directory in directories:
            directory.close()
    finally:
        for app in apps:
            app.close()


async def test_a_grant_limits_the_search_to_its_tag(service: ContactsService) -> None:
    tagged = await service.create_company(
        caller(), NewCompany(name="Acme", tags=["partner:acme", "b2b"])
    )
    await service.create_company(caller(), NewCompany(name="Other", tags=["b2b"]))
    directory = service.directory
    within = directory.search(ContactQuery(tag="b2b"), within_tag="partner:acme")
    assert ([c.id for c in within.contacts], within.total_size) == ([tagged.outcome.id], 1)
    assert directory.search(ContactQuery(), within_tag="").total_size == 0
    assert directory.search(ContactQuery()).total_size == 2
