"""Events already in an event store: those written before the domain became a
package still load, and the search index ignores events it does not know."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent

from crm_contacts.application import ContactsService
from crm_contacts.domain import (
    Channel,
    ChannelIdentity,
    Company,
    CompanyProfile,
    ConsentStatus,
    ContactKind,
    Direction,
    Interaction,
    InteractionKind,
    LifecycleStage,
    Person,
    PersonProfile,
)
from crm_contacts.events_out import contact_event, to_wire
from crm_contacts.inputs import ContactQuery

AT = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _old_topic(event: Any) -> str:
    """The topic the event had when every aggregate lived in `crm_contacts.domain`
    (`Person.PersonRegistered`; `Contact.InteractionLogged` for either kind)."""
    return f"crm_contacts.domain:{type(event).__qualname__}"


def _store_under_old_topics(service: ContactsService, *aggregates: Aggregate) -> list[str]:
    mapper = service.app.mapper
    stored: list[StoredEvent] = []
    for aggregate in aggregates:
        for event in aggregate.collect_events():
            current = mapper.to_stored_event(event)
            stored.append(dataclasses.replace(current, topic=_old_topic(event)))
    service.app.recorder.insert_events(stored)
    return [event.topic for event in stored]


def _story() -> tuple[Person, Company]:
    engines = Company.register(CompanyProfile("Analytical Engines", LifecycleStage.LEAD))
    engines.change_profile(dataclasses.replace(engines.profile, domain="engines.example"))
    engines.log_interaction(
        Interaction("i-1", InteractionKind.VISIT, None, None, "factory tour", AT, "grace")
    )
    email = ChannelIdentity(Channel.EMAIL, "ada@example.com")
    ada = Person.register(PersonProfile("Ada", "Lovelace", LifecycleStage.LEAD, channels=(email,)))
    ada.change_profile(dataclasses.replace(ada.profile, tags=("vip",)))
    ada.link_to_company(engines, "CTO")
    ada.record_consent(Channel.EMAIL, "ada@example.com", ConsentStatus.GRANTED, "form", AT)
    ada.log_interaction(
        Interaction("i-2", InteractionKind.CALL, Direction.INBOUND, Channel.PHONE, "hi", AT, "")
    )
    society = Company.register(CompanyProfile("Royal Society", LifecycleStage.LEAD))
    ada.link_to_company(society, "fellow")
    ada.unlink_from_company(str(society.id))
    return ada, engines


async def test_events_stored_under_the_old_module_topics_still_load(
    service: ContactsService,
) -> None:
    ada, engines = _story()
    topics = _store_under_old_topics(service, engines, ada)
    assert "crm_contacts.domain:Person.PersonRegistered" in topics
    assert "crm_contacts.domain:Contact.InteractionLogged" in topics
    assert "crm_contacts.domain:Company.CompanyProfileUpdated" in topics

    person = await service.get_contact(str(ada.id))
    assert person.version == ada.version == 7
    assert person.profile == ada.profile
    assert person.profile.tags == ("vip",)
    assert isinstance(person.profile, PersonProfile)
    consent = person.profile.channels[0].consent
    assert consent is not None and consent.status is ConsentStatus.GRANTED
    assert [(a.company_name, a.role) for a in person.affiliations] == [
        ("Analytical Engines", "CTO")
    ]
    assert [i.summary for i in person.interactions] == ["hi"]

    company = await service.get_contact(str(engines.id))
    assert (company.kind, company.version) == (ContactKind.COMPANY, 3)
    assert [i.summary for i in company.interactions] == ["factory tour"]

    page = await service.list_contacts(ContactQuery(email="ada@example.com"))
    assert [(c.id, c.version) for c in page.contacts] == [(str(ada.id), 7)]

    # The relay publishes them under the same CloudEvents types as ever.
    notifications = service.app.recorder.select_notifications(1, 100)
    events = [service.app.mapper.to_domain_event(n) for n in notifications]
    types = [to_wire(e, {}, n.id) for e, n in zip(events, notifications, strict=True)]
    assert [t[1].removeprefix("crm.contacts.v1.") for t in types if t is not None] == [
        "CompanyRegistered",
        "CompanyProfileUpdated",
        "InteractionLogged",
        "PersonRegistered",
        "PersonProfileUpdated",
        "PersonLinkedToCompany",
        "ConsentRecorded",
        "InteractionLogged",
        "PersonLinkedToCompany",
        "PersonUnlinkedFromCompany",
    ]
    logged = contact_event(events[2], {}, 3)
    assert logged.interaction_logged.interaction.summary == "factory tour"


class Merged(Person.Event):
    """A kind of event a newer version of the service might store."""

    into: str


async def test_the_search_index_ignores_events_it_does_not_know(
    service: ContactsService,
) -> None:
    ada = Person.register(PersonProfile("Ada", "Lovelace", LifecycleStage.LEAD, tags=("vip",)))
    service.app.save(ada)
    assert [c.version for c in (await service.list_contacts(ContactQuery(tag="vip"))).contacts] == [
        1
    ]

    ada.trigger_event(Merged, into="somebody else")
    service.app.save(ada)
    page = await service.list_contacts(ContactQuery(tag="vip"))
    # Not taken for an interaction: the contact is as the known events left it.
    assert [(c.id, c.version, c.display_name) for c in page.contacts] == [
        (str(ada.id), 1, "Ada Lovelace")
    ]
    assert service.directory.position == 2

    # A later known event applies as usual.
    ada.change_profile(dataclasses.replace(ada.profile, given_name="Augusta Ada"))
    service.app.save(ada)
    page = await service.list_contacts(ContactQuery(tag="vip"))
    assert [(c.version, c.display_name) for c in page.contacts] == [(3, "Augusta Ada Lovelace")]
