"""The 360 rules on plain documents: one event at a time, no servers."""

from __future__ import annotations

from datetime import timedelta

import pytest
from contact_events import (
    at,
    company_registered,
    company_renamed,
    consent,
    envelope,
    interaction,
    linked,
    person_registered,
    person_updated,
    unlinked,
)

from crm.contacts.v1 import contacts_pb2
from crm_analytics.document import (
    TIMELINE_LIMIT,
    CompanyRenamed,
    MembershipChanged,
    UnknownEvent,
    is_registered,
    stored_word,
)
from crm_analytics.from_contacts import apply_event, apply_membership, apply_rename

ADA, ACME = "p-ada", "c-acme"


def replay(*events, doc=None):
    for event in events:
        doc = apply_event(doc, event).doc
    return doc


def test_a_registered_person_has_profile_channels_consent_and_a_created_entry():
    doc = replay(person_registered(ADA, 3))
    assert doc["_id"] == doc["customer_id"] == ADA
    assert doc["kind"] == "person"
    assert doc["display_name"] == "Ada Lovelace"
    assert (doc["given_name"], doc["family_name"]) == ("Ada", "Lovelace")
    assert doc["lifecycle_stage"] == "lead"
    assert doc["tags"] == ["vip"]
    assert doc["owner"] == "grace"
    assert doc["custom_fields"] == {
        "budget": {"type": "money", "value": "1234.50", "currency": "EUR"}
    }
    [channel] = doc["channels"]
    assert channel["channel"] == "email"
    assert channel["address"] == "ada@example.com"
    assert channel["preferred"] is True
    assert channel["consent"]["status"] == "granted"
    assert channel["consent"]["source"] == "web-form:newsletter"
    [entry] = doc["timeline"]
    assert entry["kind"] == "profile.created"
    assert entry["occurred_at"] == at(3)
    assert doc["positions"] == {"contacts": 3}
    assert doc["updated_at"] == doc["created_at"] == at(3)
    assert is_registered(doc)


def test_a_profile_update_replaces_the_profile():
    doc = replay(
        person_registered(ADA, 3),
        person_updated(
            ADA,
            9,
            family="King",
            tags=["vip", "board"],
            stage=contacts_pb2.LIFECYCLE_STAGE_CUSTOMER,
        ),
    )
    assert doc["display_name"] == "Ada King"
    assert doc["tags"] == ["vip", "board"]
    assert doc["lifecycle_stage"] == "customer"
    assert doc["positions"]["contacts"] == 9
    assert doc["updated_at"] == at(9)
    assert doc["created_at"] == at(3)


def test_a_company_has_its_profile_and_no_person_fields():
    doc = replay(company_registered(ACME, 1))
    assert doc["kind"] == "company"
    assert doc["display_name"] == "Analytical Engines Ltd"
    assert (doc["domain"], doc["industry"]) == ("engines.example", "machinery")
    assert doc["lifecycle_stage"] == "customer"
    assert doc["members"] == []
    assert "given_name" not in doc


def test_consent_changes_the_matching_channel_or_adds_one():
    doc = replay(
        person_registered(ADA, 1),
        consent(ADA, 2, "ada@example.com", contacts_pb2.CONSENT_STATUS_WITHDRAWN),
        consent(ADA, 3, "+441234", contacts_pb2.CONSENT_STATUS_GRANTED, contacts_pb2.CHANNEL_SMS),
    )
    email, sms = doc["channels"]
    assert (email["address"], email["consent"]["status"]) == ("ada@example.com", "withdrawn")
    assert email["consent"]["source"] == "call:agent-7"
    assert email["consent"]["recorded_at"] == at(2)
    assert (sms["channel"], sms["address"], sms["preferred"]) == ("sms", "+441234", False)
    assert sms["consent"]["status"] == "granted"


def test_interactions_are_in_the_timeline_newest_first_even_when_logged_late():
    doc = replay(
        person_registered(ADA, 1),
        interaction(ADA, 2, "i-1", "first call"),
        interaction(ADA, 3, "i-2", "meeting", kind=contacts_pb2.INTERACTION_KIND_MEETING),
        # Logged now, happened before the first call.
        interaction(ADA, 4, "i-0", "backdated", occurred=at(1) + timedelta(seconds=30)),
    )
    assert [e["entry_id"] for e in doc["timeline"]] == ["i-2", "i-1", "i-0", f"{ADA}:created"]
    meeting = doc["timeline"][0]
    assert meeting["kind"] == "interaction.meeting"
    assert meeting["summary"] == "meeting"
    assert (meeting["direction"], meeting["channel"], meeting["owner"]) == (
        "outbound",
        "phone",
        "grace",
    )
    assert meeting["source"] == "contacts"


def test_the_timeline_keeps_the_newest_entries_only():
    events = [person_registered(ADA, 1)]
    events += [interaction(ADA, p, f"i-{p}") for p in range(2, TIMELINE_LIMIT + 12)]
    doc = replay(*events)
    assert len(doc["timeline"]) == TIMELINE_LIMIT
    assert doc["timeline"][0]["entry_id"] == f"i-{TIMELINE_LIMIT + 11}"
    assert doc["timeline"][-1]["entry_id"] == "i-12"


def test_a_duplicate_event_changes_nothing():
    doc = replay(person_registered(ADA, 1), interaction(ADA, 2, "i-1"))
    again = apply_event(doc, interaction(ADA, 2, "i-1"))
    assert not again.applied
    assert again.doc == doc
    assert len(doc["timeline"]) == 2


def test_an_older_event_arriving_late_is_ignored():
    doc = replay(person_registered(ADA, 1), person_updated(ADA, 7, family="King"))
    late = apply_event(doc, person_updated(ADA, 5, family="Byron"))
    assert not late.applied
    assert late.doc["display_name"] == "Ada King"
    assert late.doc["positions"]["contacts"] == 7


def test_applying_never_changes_the_callers_document():
    doc = replay(person_registered(ADA, 1))
    before = repr(doc)
    apply_event(doc, consent(ADA, 2, "ada@example.com", contacts_pb2.CONSENT_STATUS_WITHDRAWN))
    apply_event(doc, linked(ADA, 3, ACME, "Acme"))
    assert repr(doc) == before


def test_linking_and_unlinking_a_person_tells_the_company():
    doc = replay(person_registered(ADA, 1))
    result = apply_event(doc, linked(ADA, 4, ACME, "Analytical Engines Ltd", role="cto"))
    assert result.doc["companies"] == [
        {
            "company_id": ACME,
            "company_name": "Analytical Engines Ltd",
            "role": "cto",
            "name_position": 4,
        }
    ]
    [change] = result.fan_out
    assert change == MembershipChanged(ACME, ADA, "cto", 4, at(4))
    company = apply_membership(replay(company_registered(ACME, 2)), change)
    assert company["members"] == [{"person_id": ADA, "role": "cto", "since": at(4)}]

    result = apply_event(result.doc, unlinked(ADA, 6, ACME))
    assert result.doc["companies"] == []
    [change] = result.fan_out
    assert change.role is None
    assert apply_membership(company, change)["members"] == []


def test_a_member_arriving_before_the_company_waits_in_a_placeholder():
    change = apply_event(replay(person_registered(ADA, 5)), linked(ADA, 6, ACME, "Acme")).fan_out[0]
    placeholder = apply_membership(None, change)
    assert not is_registered(placeholder)
    company = apply_event(placeholder, company_registered(ACME, 2)).doc
    assert is_registered(company)
    assert [m["person_id"] for m in company["members"]] == [ADA]


def test_a_company_rename_fans_out_to_its_persons():
    company = replay(company_registered(ACME, 1, "Acme"))
    result = apply_event(company, company_renamed(ACME, 8, "Acme Analytical"))
    assert result.doc["display_name"] == "Acme Analytical"
    assert result.fan_out == [CompanyRenamed(ACME, "Acme Analytical", 8, at(8))]

    person = replay(person_registered(ADA, 2), linked(ADA, 3, ACME, "Acme"))
    renamed = apply_rename(person, result.fan_out[0])
    assert renamed["companies"][0]["company_name"] == "Acme Analytical"
    assert renamed["updated_at"] == at(3)  # the person's own last event


def test_a_rename_consumed_late_does_not_overwrite_a_newer_name():
    # The person linked after the rename, with the new name; the rename
    # itself is consumed later from the company's partition.
    person = replay(person_registered(ADA, 2), linked(ADA, 9, ACME, "Acme Analytical"))
    stale = CompanyRenamed(ACME, "Acme", 5, at(5))
    assert apply_rename(person, stale) is person


def test_a_link_consumed_after_a_later_rename_takes_the_newer_name():
    company = replay(
        company_registered(ACME, 1, "Acme"), company_renamed(ACME, 8, "Acme Analytical")
    )
    person = replay(person_registered(ADA, 2))
    # Linked at position 5, when the company was still called Acme.
    doc = apply_event(person, linked(ADA, 5, ACME, "Acme"), {ACME: company}).doc
    assert doc["companies"][0]["company_name"] == "Acme Analytical"
    assert doc["companies"][0]["name_position"] == 8


def test_an_event_without_a_known_payload_is_refused():
    with pytest.raises(UnknownEvent):
        apply_event(None, envelope(ADA, 4))


def test_an_event_without_contact_id_is_refused():
    with pytest.raises(ValueError):
        apply_event(None, person_registered("", 4))


def test_unset_enums_are_none_in_the_document():
    event = interaction(ADA, 2, "i-1")
    event.interaction_logged.interaction.direction = contacts_pb2.DIRECTION_UNSPECIFIED
    event.interaction_logged.interaction.channel = contacts_pb2.CHANNEL_UNSPECIFIED
    doc = replay(person_registered(ADA, 1, stage=contacts_pb2.LIFECYCLE_STAGE_UNSPECIFIED), event)
    assert doc["lifecycle_stage"] is None
    logged = doc["timeline"][0]
    assert (logged["direction"], logged["channel"]) == (None, None)
    created = doc["timeline"][1]
    assert (created["direction"], created["channel"]) == (None, None)


def test_documents_written_before_unset_became_none_read_as_unset():
    assert stored_word("unspecified") is None
    assert stored_word("") is None
    assert stored_word(None) is None
    assert stored_word("customer") == "customer"
