"""Stored events as the public ContactEvent messages, and what the 360 view makes of them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from contacts_support import Clock

from crm.contacts.v1 import contacts_pb2 as pb
from crm.events.v1 import contacts_pb2 as events_pb
from crm_analytics.document import MembershipChanged
from crm_analytics.from_contacts import apply_event, apply_membership, apply_rename
from crm_common.commands import Caller
from crm_contacts import domain, validation
from crm_contacts.application import ContactsService
from crm_contacts.domain.merging import merge, undo_merge
from crm_contacts.events_out import PROTO_MESSAGE, UnpublishableEvent, contact_event, to_wire
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    CompanyLink,
    CompanyUnlink,
    ConsentInput,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)


def domain_event_types() -> set[str]:
    """Every event class the contact aggregates can record."""
    names = set()
    for aggregate in (domain.Contact, domain.Person, domain.Company):
        for value in vars(aggregate).values():
            if isinstance(value, type) and issubclass(value, domain.Contact.Event):
                names.add(value.__name__)
    # The library's generic base classes; registration records its own event.
    return names - {"Event", "Created"}


def caller(**kw: Any) -> Caller:
    return Caller(actor="grace", client="crm-web", **kw)


async def story(service: ContactsService, clock: Clock) -> dict[str, str]:
    """Every kind of write, the way a user would make them."""
    ada = await service.create_person(
        caller(request_id="story-ada"),
        NewPerson(
            given_name="Ada",
            family_name="Lovelace",
            channels=[
                ChannelInput("email", "ada@example.com", True, "granted", "web-form:newsletter"),
                ChannelInput("phone", "+44 20 7946 0018"),
            ],
            tags=["vip"],
            custom_fields={"budget": CustomFieldInput("money", "1234.5", "EUR")},
            owner="grace",
        ),
    )
    person = ada.outcome.id
    clock.advance(minutes=1)
    engines = (
        await service.create_company(
            caller(),
            NewCompany(name="Analytical Engines", domain="engines.example", tags=["b2b"]),
        )
    ).outcome.id
    society = (await service.create_company(caller(), NewCompany(name="Royal Society"))).outcome.id
    await service.link_person_to_company(caller(), CompanyLink(person, engines, "CTO"))
    await service.link_person_to_company(caller(), CompanyLink(person, society, "fellow"))
    await service.unlink_person_from_company(caller(), CompanyUnlink(person, society))
    clock.advance(minutes=1)
    await service.record_consent(
        caller(),
        ConsentInput(person, "phone", "+442079460018", "granted", "call:agent-7"),
    )
    await service.log_interaction(
        caller(),
        InteractionInput(person, "call", "outbound", "phone", "demo of the engine", owner="grace"),
    )
    await service.log_interaction(
        caller(),
        InteractionInput(
            person,
            "mail",
            "inbound",
            "email",
            "asked for the notes",
            occurred_at=clock.now - timedelta(days=1),
        ),
    )
    await service.update_person(
        caller(),
        PersonChanges(
            person,
            frozenset({"lifecycle_stage", "tags"}),
            lifecycle_stage="customer",
            tags=["vip", "board"],
        ),
    )
    await service.update_company(
        caller(),
        CompanyChanges(engines, frozenset({"name"}), name="Analytical Engines Ltd"),
    )
    await service.log_interaction(
        caller(), InteractionInput(engines, "visit", summary="factory tour")
    )
    return {"person": person, "engines": engines, "society": society}


def stored(service: ContactsService) -> list[tuple[Any, dict[str, Any], int]]:
    recorder: Any = service.app.recorder
    out = []
    for notification in recorder.select_notifications(1, 1000):
        event = service.app.mapper.to_domain_event(notification)
        out.append((event, dict(getattr(event, "_meta", {})), notification.id))
    return out


def published(service: ContactsService) -> list[tuple[str, str, events_pb.ContactEvent]]:
    out = []
    for event, meta, position in stored(service):
        wire = to_wire(event, meta, position)
        if wire is not None:
            key, ce_type, payload = wire
            out.append((key, ce_type, events_pb.ContactEvent.FromString(payload)))
    return out


def millis(when: datetime) -> datetime:
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


async def test_every_domain_event_type_is_published(
    sqlite_service: ContactsService, clock: Clock
) -> None:
    await story(sqlite_service, clock)
    names = {type(e).__name__ for e, _, _ in stored(sqlite_service)}
    contact_names = names - {"Recorded"}
    # The story records every event type the aggregates have but the merge and
    # privacy events (test_merge_events_are_published,
    # test_erase_and_export_events_are_published), so each is checked here.
    assert contact_names == domain_event_types() - MERGE_EVENTS - PRIVACY_EVENTS
    payloads = {
        f.message_type.name
        for f in events_pb.ContactEvent.DESCRIPTOR.oneofs_by_name["payload"].fields
    }
    assert contact_names | MERGE_EVENTS | PRIVACY_EVENTS == payloads

    for event, meta, position in stored(sqlite_service):
        wire = to_wire(event, meta, position)
        if type(event).__name__ == "Recorded":
            assert wire is None  # command receipts are internal
            continue
        assert wire is not None
        key, ce_type, payload = wire
        message = events_pb.ContactEvent.FromString(payload)
        name = type(event).__name__
        assert ce_type == f"crm.contacts.v1.{name}"
        assert key == message.contact_id == str(event.originator_id)
        assert message.WhichOneof("payload") is not None
        descriptor = message.DESCRIPTOR.fields_by_name[message.WhichOneof("payload")]
        assert descriptor.message_type.name == name
        assert (message.version, message.position) == (event.originator_version, position)
        assert (message.actor, message.client) == ("grace", "crm-web")
        assert message.occurred_at.ToDatetime(tzinfo=UTC) == event.timestamp
    assert PROTO_MESSAGE == "crm.events.v1.ContactEvent"


MERGE_EVENTS = {"ContactsMerged", "ContactMergedInto", "ContactMergeUndone", "ContactUnmerged"}


def test_merge_events_are_published() -> None:
    """A merge and its undo, recorded on the aggregates, as ERP systems and
    the other services read them: survivor, tombstones, what moved and back."""

    def registered(name: str, email: str) -> domain.Person:
        new = NewPerson(given_name=name, channels=[ChannelInput("email", email)])
        p = domain.Person.register(validation.new_person_profile(new, datetime.now(UTC)))
        p.collect_events()
        return p

    ada = registered("Ada", "ada@example.org")
    dup = registered("Ada L.", "al@example.org")
    at = datetime.now(UTC)
    merge("m-1", ada, [dup], {}, at, "grace")
    undo_merge("m-1", ada, [dup], at, timedelta(days=1), "grace")
    events = ada.collect_events() + dup.collect_events()
    wires = {}
    for position, event in enumerate(events, start=100):
        wire = to_wire(event, {"actor": "grace", "client": "crm-web"}, position)
        assert wire is not None
        key, ce_type, payload = wire
        assert key == str(event.originator_id)
        wires[ce_type.removeprefix("crm.contacts.v1.")] = events_pb.ContactEvent.FromString(payload)
    assert set(wires) == MERGE_EVENTS
    merged = wires["ContactsMerged"].contacts_merged
    assert (merged.merge_id, list(merged.merged_ids)) == ("m-1", [str(dup.id)])
    assert [c.address for c in merged.person_profile.channels] == [
        "ada@example.org",
        "al@example.org",
    ]
    assert wires["ContactMergedInto"].contact_merged_into.survivor_id == str(ada.id)
    undone = wires["ContactMergeUndone"].contact_merge_undone
    assert list(undone.restored_ids) == [str(dup.id)]
    assert [c.address for c in undone.person_profile.channels] == ["ada@example.org"]
    assert wires["ContactUnmerged"].contact_unmerged.merge_id == "m-1"


PRIVACY_EVENTS = {"PersonErased", "PersonalDataExported"}


def test_erase_and_export_events_are_published() -> None:
    """An export and an erase, as the other services read them: which services
    answered, the request's reference and the contacts erased with the person;
    no personal data."""
    new = NewPerson(given_name="Ada", channels=[ChannelInput("email", "ada@example.org")])
    ada = domain.Person.register(validation.new_person_profile(new, datetime.now(UTC)))
    ada.collect_events()
    merged_id = str(uuid.uuid4())
    ada.record_export(["contacts", "pipeline"])
    assert ada.erase("DSR-2026-0042", [merged_id]) is True
    assert ada.erase("DSR-2026-0043", []) is False  # erased once
    wires = {}
    for position, event in enumerate(ada.collect_events(), start=7):
        wire = to_wire(event, {"actor": "root", "client": "console"}, position)
        assert wire is not None
        key, ce_type, payload = wire
        assert key == str(ada.id)
        message = events_pb.ContactEvent.FromString(payload)
        assert (message.actor, message.position) == ("root", position)
        wires[ce_type] = message
    assert set(wires) == {f"crm.contacts.v1.{name}" for name in PRIVACY_EVENTS}
    erased = wires["crm.contacts.v1.PersonErased"].person_erased
    assert (erased.reference, list(erased.merged_ids)) == ("DSR-2026-0042", [merged_id])
    exported = wires["crm.contacts.v1.PersonalDataExported"].personal_data_exported
    assert list(exported.services) == ["contacts", "pipeline"]
    payload = b"".join(m.SerializeToString() for m in wires.values())
    assert b"ada@example.org" not in payload and b"Ada" not in payload


def test_an_event_without_a_public_form_is_an_error_not_a_silent_skip() -> None:
    class Merged(domain.Person.Event):
        pass

    with pytest.raises(UnpublishableEvent, match="Merged"):
        to_wire(
            Merged(originator_id=uuid.uuid4(), originator_version=2, timestamp=datetime.now(UTC)),
            {},
            9,
        )


async def test_profile_events_carry_the_whole_profile(
    sqlite_service: ContactsService, clock: Clock
) -> None:
    ids = await story(sqlite_service, clock)
    events = [m for k, _, m in published(sqlite_service) if k == ids["person"]]
    registered = events[0].person_registered.profile
    assert (registered.given_name, registered.family_name) == ("Ada", "Lovelace")
    assert registered.lifecycle_stage == pb.LIFECYCLE_STAGE_LEAD
    assert registered.custom_fields["budget"] == pb.CustomFieldValue(
        type="money", value="1234.50", currency="EUR"
    )
    email = registered.channels[0]
    assert (email.channel, email.address, email.preferred) == (
        pb.CHANNEL_EMAIL,
        "ada@example.com",
        True,
    )
    assert (email.consent.status, email.consent.source) == (
        pb.CONSENT_STATUS_GRANTED,
        "web-form:newsletter",
    )
    [update] = [e.person_profile_updated for e in events if e.HasField("person_profile_updated")]
    assert sorted(update.changed_fields) == ["lifecycle_stage", "tags"]
    assert update.profile.given_name == "Ada"  # unchanged fields are there too
    assert list(update.profile.tags) == ["board", "vip"]
    assert len(update.profile.channels) == 2
    assert update.profile.channels[1].consent.source == "call:agent-7"


async def test_the_events_build_the_360_view_a_user_expects(
    sqlite_service: ContactsService, clock: Clock
) -> None:
    # Events are stamped by the store's clock, interactions and consent by the
    # service's: an hour ahead puts the registration between the two interactions.
    clock.now = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    started = clock.now
    ids = await story(sqlite_service, clock)
    person, engines, society = ids["person"], ids["engines"], ids["society"]
    messages = [m for _, _, m in published(sqlite_service)]

    docs: dict[str, Any] = {}
    for event in messages:
        result = apply_event(docs.get(event.contact_id), event, docs)
        assert result.applied
        docs[event.contact_id] = result.doc
        for fan_out in result.fan_out:
            if isinstance(fan_out, MembershipChanged):
                docs[fan_out.company_id] = apply_membership(docs.get(fan_out.company_id), fan_out)
            else:
                docs = {ident: apply_rename(doc, fan_out) for ident, doc in docs.items()}
    # Published twice (the relay is at-least-once): nothing changes.
    for event in messages:
        assert not apply_event(docs[event.contact_id], event, docs).applied

    ada = docs[person]
    own = [m for m in messages if m.contact_id == person]
    assert ada["kind"] == "person"
    assert (ada["given_name"], ada["family_name"], ada["display_name"]) == (
        "Ada",
        "Lovelace",
        "Ada Lovelace",
    )
    assert ada["lifecycle_stage"] == "customer"
    assert ada["tags"] == ["board", "vip"]
    assert ada["owner"] == "grace"
    assert ada["custom_fields"] == {
        "budget": {"type": "money", "value": "1234.50", "currency": "EUR"}
    }
    assert [(c["channel"], c["address"], c["preferred"]) for c in ada["channels"]] == [
        ("email", "ada@example.com", True),
        ("phone", "+442079460018", False),
    ]
    assert [c["consent"] for c in ada["channels"]] == [
        {"status": "granted", "source": "web-form:newsletter", "recorded_at": started},
        {"status": "granted", "source": "call:agent-7", "recorded_at": clock.now},
    ]
    # Linked twice, unlinked once; the rename of the company reached the person.
    assert [(c["company_id"], c["company_name"], c["role"]) for c in ada["companies"]] == [
        (engines, "Analytical Engines Ltd", "CTO")
    ]
    # Interactions at the times they happened, and every change of the profile
    # (consent, company links, the lifecycle move) at the time it was recorded.
    assert [(e["kind"], e["summary"]) for e in ada["timeline"]] == [
        ("interaction.call", "demo of the engine"),
        ("consent.recorded", "Consent granted for phone +442079460018 (call:agent-7)"),
        ("profile.lifecycle_changed", "Lifecycle stage lead -> customer"),
        ("company.unlinked", f"Unlinked from company {society}"),
        ("company.linked", "Linked to Royal Society as fellow"),
        ("company.linked", "Linked to Analytical Engines as CTO"),
        ("profile.created", "Person Ada Lovelace registered"),
        ("interaction.mail", "asked for the notes"),
    ]
    times = {e["kind"]: e["occurred_at"] for e in reversed(ada["timeline"])}
    assert times["interaction.call"] == clock.now
    assert times["profile.created"] == millis(own[0].occurred_at.ToDatetime(tzinfo=UTC))
    assert times["interaction.mail"] == clock.now - timedelta(days=1)
    call = ada["timeline"][0]
    assert (call["direction"], call["channel"], call["owner"]) == ("outbound", "phone", "grace")
    assert ada["positions"] == {"contacts": own[-1].position}
    assert ada["created_at"] == millis(own[0].occurred_at.ToDatetime(tzinfo=UTC))
    assert ada["updated_at"] == millis(own[-1].occurred_at.ToDatetime(tzinfo=UTC))

    company = docs[engines]
    assert (company["kind"], company["display_name"], company["domain"]) == (
        "company",
        "Analytical Engines Ltd",
        "engines.example",
    )
    assert [(m["person_id"], m["role"]) for m in company["members"]] == [(person, "CTO")]
    assert [e["summary"] for e in company["timeline"]] == [
        "factory tour",
        "Company Analytical Engines registered",
    ]
    assert docs[society]["members"] == []


def test_consent_and_interaction_events_keep_their_own_times() -> None:
    at = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
    consent = vars(domain.Person)["ConsentRecorded"](
        originator_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
        originator_version=2,
        timestamp=at + timedelta(seconds=1),
        channel="sms",
        address="+41446681800",
        status="withdrawn",
        source="sms-stop",
        at=at,
    )
    message = contact_event(consent, {"actor": "ada"}, 7)
    recorded = message.consent_recorded
    assert (recorded.channel, recorded.address) == (pb.CHANNEL_SMS, "+41446681800")
    assert (recorded.consent.status, recorded.consent.source) == (
        pb.CONSENT_STATUS_WITHDRAWN,
        "sms-stop",
    )
    assert recorded.consent.recorded_at.ToDatetime(tzinfo=UTC) == at
    assert (message.actor, message.client, message.position) == ("ada", "", 7)
