"""Merging duplicates and undoing a merge (crm_contacts.domain.merging): pure
domain tests on the aggregates; what the events replay to is checked too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from crm_common.errors import RuleViolated, ValidationFailed
from crm_contacts import validation
from crm_contacts.domain import Channel, Company, ConsentStatus, Interaction, Person
from crm_contacts.domain.interactions import InteractionKind
from crm_contacts.domain.merging import merge, undo_merge
from crm_contacts.inputs import ChannelInput, CustomFieldInput, NewCompany, NewPerson

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)


def person(given: str, family: str, *channels: ChannelInput, **kw: Any) -> Person:
    new = NewPerson(given_name=given, family_name=family, channels=channels, **kw)
    p = Person.register(validation.new_person_profile(new, T0))
    p.collect_events()
    return p


def interaction(ident: str, at: datetime) -> Interaction:
    return Interaction(ident, InteractionKind.CALL, None, None, f"call {ident}", at, "rep")


def replayed(start: Any, events: list[Any]) -> Any:
    state = start
    for e in events:
        state = e.mutate(state)
    return state


def test_a_merge_keeps_every_channel_consent_tag_field_link_and_interaction() -> None:
    ada = person(
        "Ada",
        "Lovelace",
        ChannelInput("email", "ada@example.org", preferred=True),
        tags=["vip"],
        lifecycle_stage="lead",
        custom_fields={"segment": CustomFieldInput("text", "smb")},
    )
    dup = person(
        "",
        "King",
        ChannelInput("email", "ada@example.org"),
        ChannelInput("phone", "+441234567890", preferred=True),
        tags=["newsletter"],
        lifecycle_stage="customer",
        custom_fields={
            "segment": CustomFieldInput("text", "enterprise"),
            "region": CustomFieldInput("text", "emea"),
        },
    )
    dup.record_consent(
        Channel.EMAIL, "ada@example.org", ConsentStatus.GRANTED, "form", T0 + timedelta(hours=1)
    )
    acme = Company.register(validation.new_company_profile(NewCompany(name="Acme")))
    dup.link_to_company(acme, "cto")
    dup.log_interaction(interaction("i-1", T0))
    dup.collect_events()

    merge("m-1", ada, [dup], {"family_name": str(dup.id)}, T0 + timedelta(days=1), "admin")

    profile = ada.profile
    assert (profile.given_name, profile.family_name) == ("Ada", "King")
    assert str(profile.lifecycle_stage) == "customer"  # the furthest along the funnel
    assert profile.tags == ("newsletter", "vip")
    assert {k: v.value for k, v in profile.custom_fields.items()} == {
        "segment": "smb",
        "region": "emea",
    }
    email = next(c for c in profile.channels if c.channel is Channel.EMAIL)
    assert email.preferred and email.consent is not None and email.consent.source == "form"
    assert {(str(c.channel), c.address) for c in profile.channels} == {
        ("email", "ada@example.org"),
        ("phone", "+441234567890"),
    }
    assert list(ada.affiliations) == [str(acme.id)]
    assert [i.interaction_id for i in ada.interactions] == ["i-1"]
    assert dup.merged_into == str(ada.id)
    assert [type(e).__name__ for e in ada.collect_events()] == ["ContactsMerged"]
    assert [type(e).__name__ for e in dup.collect_events()] == ["ContactMergedInto"]


def test_undo_restores_both_and_keeps_what_happened_since() -> None:
    ada = person("Ada", "Lovelace", ChannelInput("email", "ada@example.org"), tags=["vip"])
    dup = person("Ada", "King", ChannelInput("phone", "+441234567890"), tags=["golf"])
    dup.log_interaction(interaction("old", T0))
    before_ada, before_dup = ada.profile, dup.profile
    merge("m-1", ada, [dup], {"family_name": str(dup.id)}, T0, "admin")
    # Since the merge: a new tag and a new interaction on the survivor.
    ada.change_profile(
        validation.new_person_profile(
            NewPerson(
                given_name="Ada",
                family_name="King",
                tags=["vip", "golf", "speaker"],
                channels=[
                    ChannelInput("email", "ada@example.org"),
                    ChannelInput("phone", "+441234567890"),
                ],
            ),
            T0,
        )
    )
    ada.log_interaction(interaction("new", T0 + timedelta(days=2)))

    undo_merge("m-1", ada, [dup], T0 + timedelta(days=3), WINDOW, "admin")

    assert dup.merged_into is None and dup.profile == before_dup
    assert ada.profile.family_name == before_ada.family_name  # unchanged since: back
    assert ada.profile.tags == ("speaker", "vip")  # golf came with the merge; speaker since
    assert [c.address for c in ada.profile.channels] == ["ada@example.org"]
    assert [i.interaction_id for i in ada.interactions] == ["new"]
    assert ada.merges["m-1"].undone


def test_the_events_replay_to_the_same_states() -> None:
    """What a load from the store gives: the events alone rebuild survivor and tombstone."""
    ada = Person.register(person("Ada", "Lovelace", ChannelInput("email", "a@example.org")).profile)
    dup = Person.register(person("Ada", "L.", ChannelInput("phone", "+15550001234")).profile)
    ada_events, dup_events = ada.collect_events(), dup.collect_events()
    merge("m", ada, [dup], {}, T0)
    ada_events += ada.collect_events()
    dup_events += dup.collect_events()
    merged_ada, merged_dup = replayed(None, ada_events), replayed(None, dup_events)
    assert merged_ada.profile == ada.profile and merged_ada.merges == ada.merges
    assert merged_dup.merged_into == str(ada.id)
    undo_merge("m", ada, [dup], T0, WINDOW)
    undone = replayed(None, ada_events + ada.collect_events())
    assert undone.profile == ada.profile and undone.merges["m"].undone
    assert replayed(None, dup_events + dup.collect_events()).merged_into is None


def test_bad_merges_are_refused_and_change_nothing() -> None:
    a = person("A", "One", ChannelInput("email", "a@example.org"))
    b = person("B", "Two", ChannelInput("email", "b@example.org"))
    c = person("C", "Three", ChannelInput("email", "c@example.org"))
    d = person("D", "Four", ChannelInput("email", "d@example.org"))
    acme = Company.register(validation.new_company_profile(NewCompany(name="Acme")))
    with pytest.raises(ValidationFailed, match="at most 3"):
        merge("m", a, [b, c, d], {}, T0)
    with pytest.raises(ValidationFailed, match="named twice"):
        merge("m", a, [b, b], {}, T0)
    with pytest.raises(ValidationFailed, match="is not one of the merged contacts"):
        merge("m", a, [b], {"given_name": str(c.id)}, T0)
    with pytest.raises(ValidationFailed, match="is not a field a merge chooses"):
        merge("m", a, [b], {"channels": str(b.id)}, T0)
    with pytest.raises(RuleViolated, match="one kind"):
        merge("m", a, [acme], {}, T0)  # type: ignore[list-item]
    assert a.collect_events() == [] and b.collect_events() == []
    merge("m", a, [b], {}, T0)
    with pytest.raises(RuleViolated, match="was merged into"):
        merge("m2", c, [b], {}, T0)


def test_only_the_latest_merge_within_the_window_can_be_undone() -> None:
    a = person("A", "One", ChannelInput("email", "a@example.org"))
    b = person("B", "Two", ChannelInput("email", "b@example.org"))
    c = person("C", "Three", ChannelInput("email", "c@example.org"))
    merge("m1", a, [b], {}, T0)
    merge("m2", a, [c], {}, T0 + timedelta(hours=1))
    with pytest.raises(RuleViolated, match="only the latest merge"):
        undo_merge("m1", a, [b], T0 + timedelta(hours=2), WINDOW)
    with pytest.raises(RuleViolated, match="older than the undo window"):
        undo_merge("m2", a, [c], T0 + timedelta(days=31), WINDOW)
    undo_merge("m2", a, [c], T0 + timedelta(days=1), WINDOW)
    undo_merge("m1", a, [b], T0 + timedelta(days=1), WINDOW)
    assert [ch.address for ch in a.profile.channels] == ["a@example.org"]
    with pytest.raises(RuleViolated, match="undone already"):
        undo_merge("m1", a, [b], T0 + timedelta(days=1), WINDOW)
