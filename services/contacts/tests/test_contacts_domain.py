"""The rules of persons and companies, on the aggregates and input checks alone."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from crm_common.errors import RuleViolated, ValidationFailed
from crm_contacts import validation
from crm_contacts.domain import (
    Channel,
    Company,
    ConsentStatus,
    FieldType,
    LifecycleStage,
    Person,
)
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    CustomFieldInput,
    InteractionInput,
    NewCompany,
    NewPerson,
    PersonChanges,
)

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def fields_of(error: pytest.ExceptionInfo[ValidationFailed]) -> list[str]:
    return [e.field for e in error.value.errors]


def person(**kw: Any) -> Person:
    new = NewPerson(
        given_name=kw.pop("given_name", "Ada"),
        family_name=kw.pop("family_name", "Lovelace"),
        channels=kw.pop(
            "channels",
            [
                ChannelInput("email", "Ada@Example.COM", preferred=True),
                ChannelInput("whatsapp", "+41 44 668 18 00"),
            ],
        ),
        **kw,
    )
    ada = Person.register(validation.new_person_profile(new, T0))
    ada.collect_events()
    return ada


def company(name: str = "Analytical Engines") -> Company:
    acme = Company.register(validation.new_company_profile(NewCompany(name=name)))
    acme.collect_events()
    return acme


def pending(aggregate: Person | Company) -> list[str]:
    return [type(e).__name__ for e in aggregate.collect_events()]


# -- channel identities and consent ----------------------------------------------------------


def test_channel_addresses_are_kept_in_canonical_form() -> None:
    ada = person(
        channels=[
            ChannelInput("email", "  Ada@Example.COM "),
            ChannelInput("phone", "0041 (44) 668-18-00"),
            ChannelInput("wechat", "ada_l"),
        ]
    )
    assert [(c.channel, c.address) for c in ada.profile.channels] == [
        (Channel.EMAIL, "ada@example.com"),
        (Channel.PHONE, "+41446681800"),
        (Channel.WECHAT, "ada_l"),
    ]


def test_the_same_identity_twice_is_refused_even_written_differently() -> None:
    with pytest.raises(ValidationFailed) as refused:
        person(
            channels=[
                ChannelInput("email", "ada@example.com"),
                ChannelInput("email", "ADA@example.com"),
            ]
        )
    assert fields_of(refused) == ["channels[1].address"]


def test_the_same_address_on_two_channels_is_two_identities() -> None:
    ada = person(
        channels=[ChannelInput("sms", "+41446681800"), ChannelInput("whatsapp", "+41446681800")]
    )
    assert len(ada.profile.channels) == 2


def test_only_one_identity_per_channel_is_preferred() -> None:
    with pytest.raises(ValidationFailed) as refused:
        person(
            channels=[
                ChannelInput("email", "a@example.com", preferred=True),
                ChannelInput("email", "b@example.com", preferred=True),
            ]
        )
    assert fields_of(refused) == ["channels[1].preferred"]


def test_every_bad_identity_is_named_in_one_refusal() -> None:
    with pytest.raises(ValidationFailed) as refused:
        person(
            channels=[
                ChannelInput("email", "not-an-email"),
                ChannelInput("fax", "+41446681800"),
                ChannelInput("phone", "call me maybe"),
                ChannelInput(None, "x"),
            ]
        )
    assert fields_of(refused) == [
        "channels[0].address",
        "channels[1].channel",
        "channels[2].address",
        "channels[3].channel",
    ]


def test_consent_is_per_channel_identity_with_source_and_time() -> None:
    ada = person()
    ada.record_consent(Channel.EMAIL, "ada@example.com", ConsentStatus.GRANTED, "web-form", T0)
    email, whatsapp = ada.profile.channels
    assert email.consent is not None
    assert (email.consent.status, email.consent.source, email.consent.recorded_at) == (
        ConsentStatus.GRANTED,
        "web-form",
        T0,
    )
    assert whatsapp.consent is None

    later = T0 + timedelta(days=3)
    ada.record_consent(Channel.EMAIL, "ada@example.com", ConsentStatus.WITHDRAWN, "call", later)
    email, whatsapp = ada.profile.channels
    assert email.consent is not None
    assert (email.consent.status, email.consent.source, email.consent.recorded_at) == (
        ConsentStatus.WITHDRAWN,
        "call",
        later,
    )
    assert whatsapp.consent is None
    assert pending(ada) == ["ConsentRecorded", "ConsentRecorded"]


def test_the_same_consent_again_records_nothing_and_keeps_its_time() -> None:
    ada = person()
    ada.record_consent(Channel.EMAIL, "ada@example.com", ConsentStatus.GRANTED, "web", T0)
    pending(ada)
    ada.record_consent(
        Channel.EMAIL, "ada@example.com", ConsentStatus.GRANTED, "web", T0 + timedelta(hours=1)
    )
    assert pending(ada) == []
    assert ada.profile.channels[0].consent is not None
    assert ada.profile.channels[0].consent.recorded_at == T0


def test_consent_for_an_identity_the_person_does_not_have_is_refused() -> None:
    ada = person()
    with pytest.raises(ValidationFailed) as refused:
        ada.record_consent(Channel.SMS, "+41446681800", ConsentStatus.GRANTED, "web", T0)
    assert fields_of(refused) == ["address"]
    assert pending(ada) == []


def test_a_company_has_no_identities_to_consent_for() -> None:
    with pytest.raises(ValidationFailed) as refused:
        company().record_consent(
            Channel.EMAIL, "info@example.com", ConsentStatus.GRANTED, "web", T0
        )
    assert fields_of(refused) == ["address"]


def test_consent_given_with_an_identity_is_kept_when_the_channels_are_replaced() -> None:
    new = NewPerson(
        given_name="Ada",
        channels=[ChannelInput("email", "ada@example.com", consent_status="granted")],
    )
    ada = Person.register(validation.new_person_profile(new, T0))
    changes = PersonChanges(
        id=str(ada.id),
        fields=frozenset({"channels"}),
        channels=[
            ChannelInput("email", "ada@example.com", preferred=True),
            ChannelInput("sms", "+41446681800", consent_status="withdrawn", consent_source="sms"),
        ],
    )
    later = T0 + timedelta(days=1)
    ada.change_profile(validation.changed_person_profile(ada.profile, changes, later))
    email, sms = ada.profile.channels
    assert email.preferred
    assert email.consent is not None and email.consent.recorded_at == T0
    assert sms.consent is not None
    assert (sms.consent.status, sms.consent.recorded_at) == (ConsentStatus.WITHDRAWN, later)


# -- relations -------------------------------------------------------------------------------


def test_a_person_belongs_to_several_companies_each_with_a_role() -> None:
    ada, engines, society = person(), company("Analytical Engines"), company("Royal Society")
    ada.link_to_company(engines, "CTO")
    ada.link_to_company(society, "fellow")
    assert sorted((a.company_name, a.role) for a in ada.affiliations.values()) == [
        ("Analytical Engines", "CTO"),
        ("Royal Society", "fellow"),
    ]
    assert pending(ada) == ["PersonLinkedToCompany", "PersonLinkedToCompany"]


def test_linking_again_changes_the_role_or_records_nothing() -> None:
    ada, engines = person(), company()
    ada.link_to_company(engines, "CTO")
    pending(ada)
    ada.link_to_company(engines, "CTO")
    assert pending(ada) == []
    ada.link_to_company(engines, "advisor")
    assert pending(ada) == ["PersonLinkedToCompany"]
    assert [a.role for a in ada.affiliations.values()] == ["advisor"]


def test_unlinking_ends_the_relation_once() -> None:
    ada, engines = person(), company()
    ada.link_to_company(engines, "CTO")
    ada.unlink_from_company(str(engines.id))
    assert ada.affiliations == {}
    with pytest.raises(RuleViolated, match="not linked"):
        ada.unlink_from_company(str(engines.id))


def test_a_role_is_limited_in_length() -> None:
    assert validation.link_role("  CTO ") == "CTO"
    with pytest.raises(ValidationFailed) as refused:
        validation.link_role("x" * 101)
    assert fields_of(refused) == ["role"]


# -- custom fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (CustomFieldInput("number", " 1e3 "), ("number", "1000", "")),
        (CustomFieldInput("number", "-0.50"), ("number", "-0.5", "")),
        (CustomFieldInput("money", "1234.5", "eur"), ("money", "1234.50", "EUR")),
        (CustomFieldInput("money", "12.5", " eur "), ("money", "12.50", "EUR")),
        (CustomFieldInput("money", "-5", "CHF"), ("money", "-5.00", "CHF")),
        (CustomFieldInput("money", "5", "XCG"), ("money", "5.00", "XCG")),
        (CustomFieldInput("money", "1200", "JPY"), ("money", "1200", "JPY")),
        (CustomFieldInput("money", "1.2", "KWD"), ("money", "1.200", "KWD")),
        (CustomFieldInput("money", "7.000", "EUR"), ("money", "7.00", "EUR")),
        (CustomFieldInput("date", "2026-02-28"), ("date", "2026-02-28", "")),
        (CustomFieldInput("text", "  likes gears "), ("text", "likes gears", "")),
        (CustomFieldInput("choice", "gold"), ("choice", "gold", "")),
    ],
)
def test_custom_fields_are_stored_in_canonical_text(
    given: CustomFieldInput, stored: tuple[str, str, str]
) -> None:
    ada = person(custom_fields={"field": given})
    value = ada.profile.custom_fields["field"]
    assert (str(value.type), value.value, value.currency) == stored


@pytest.mark.parametrize(
    ("given", "field"),
    [
        (CustomFieldInput("colour", "red"), "custom_fields.budget.type"),
        (CustomFieldInput("number", "twelve"), "custom_fields.budget.value"),
        (CustomFieldInput("number", "NaN"), "custom_fields.budget.value"),
        # Nine characters in, a million digits out: bounded as a number first.
        (CustomFieldInput("number", "1e999999"), "custom_fields.budget.value"),
        (CustomFieldInput("number", "-1e-999999"), "custom_fields.budget.value"),
        (CustomFieldInput("number", "9e999998"), "custom_fields.budget.value"),
        (CustomFieldInput("money", "12.50"), "custom_fields.budget.currency"),
        (CustomFieldInput("money", "12.50", "XYZ"), "custom_fields.budget.currency"),
        # Withdrawn in 2025 (replaced by XCG).
        (CustomFieldInput("money", "12.50", "ANG"), "custom_fields.budget.currency"),
        (CustomFieldInput("money", "twelve", "EUR"), "custom_fields.budget.value"),
        (CustomFieldInput("money", "1e15", "EUR"), "custom_fields.budget.value"),
        (CustomFieldInput("money", "12.5", "JPY"), "custom_fields.budget.value"),
        (CustomFieldInput("date", "2026-02-30"), "custom_fields.budget.value"),
        (CustomFieldInput("date", "30.01.2026"), "custom_fields.budget.value"),
        (CustomFieldInput("text", "x", "EUR"), "custom_fields.budget.currency"),
        (CustomFieldInput("choice", "  "), "custom_fields.budget.value"),
    ],
)
def test_a_custom_field_value_must_fit_its_type(given: CustomFieldInput, field: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        person(custom_fields={"budget": given})
    assert fields_of(refused) == [field]


def test_custom_field_keys_are_lower_case_identifiers() -> None:
    with pytest.raises(ValidationFailed) as refused:
        person(custom_fields={"Budget": CustomFieldInput("text", "x")})
    assert fields_of(refused) == ["custom_fields.Budget"]


def test_custom_fields_change_by_key() -> None:
    ada = person(
        custom_fields={
            "budget": CustomFieldInput("money", "10", "EUR"),
            "since": CustomFieldInput("date", "2020-01-01"),
            "note": CustomFieldInput("text", "old"),
        }
    )
    changes = PersonChanges(
        id=str(ada.id),
        fields=frozenset({"custom_fields"}),
        custom_fields={"budget": CustomFieldInput("money", "20", "EUR")},
        remove_custom_fields=["note"],
    )
    ada.change_profile(validation.changed_person_profile(ada.profile, changes, T0))
    fields = ada.profile.custom_fields
    assert sorted(fields) == ["budget", "since"]
    assert (fields["budget"].type, fields["budget"].value) == (FieldType.MONEY, "20.00")


def test_a_custom_field_cannot_be_set_and_removed_at_once() -> None:
    ada = person()
    changes = PersonChanges(
        id=str(ada.id),
        fields=frozenset({"custom_fields"}),
        custom_fields={"note": CustomFieldInput("text", "x")},
        remove_custom_fields=["note"],
    )
    with pytest.raises(ValidationFailed) as refused:
        validation.changed_person_profile(ada.profile, changes, T0)
    assert fields_of(refused) == ["custom_fields.note"]


# -- profile changes and lifecycle --------------------------------------------------------------


def test_a_new_contact_starts_as_a_lead() -> None:
    assert person().profile.lifecycle_stage is LifecycleStage.LEAD
    assert company().profile.lifecycle_stage is LifecycleStage.LEAD
    assert person(lifecycle_stage="customer").profile.lifecycle_stage is LifecycleStage.CUSTOMER


def stage_change(contact: Person | Company, stage: str) -> list[str]:
    if isinstance(contact, Person):
        changes = PersonChanges(
            id=str(contact.id), fields=frozenset({"lifecycle_stage"}), lifecycle_stage=stage
        )
        return contact.change_profile(
            validation.changed_person_profile(contact.profile, changes, T0)
        )
    company_changes = CompanyChanges(
        id=str(contact.id), fields=frozenset({"lifecycle_stage"}), lifecycle_stage=stage
    )
    return contact.change_profile(
        validation.changed_company_profile(contact.profile, company_changes)
    )


@pytest.mark.parametrize(
    "path",
    [
        ["subscriber", "lead", "opportunity", "customer", "advocate"],
        ["lead", "customer"],
        ["lead", "lost", "lead", "opportunity", "customer", "churned", "customer"],
        ["opportunity", "lost", "opportunity"],
        ["customer", "advocate", "churned", "opportunity"],
    ],
)
def test_the_lifecycle_moves_forward_through_the_funnel_or_out_and_back(path: list[str]) -> None:
    ada = person(lifecycle_stage=path[0])
    for stage in path[1:]:
        assert stage_change(ada, stage) == ["lifecycle_stage"]
        assert ada.profile.lifecycle_stage == stage


@pytest.mark.parametrize(
    ("start", "wanted"),
    [
        ("customer", "lead"),
        ("opportunity", "subscriber"),
        ("advocate", "customer"),
        ("lead", "churned"),
        ("customer", "lost"),
        ("churned", "lost"),
    ],
)
def test_a_lifecycle_move_the_funnel_does_not_allow_is_refused(start: str, wanted: str) -> None:
    acme = Company.register(
        validation.new_company_profile(NewCompany(name="Acme", lifecycle_stage=start))
    )
    acme.collect_events()
    for contact in (person(lifecycle_stage=start), acme):
        with pytest.raises(RuleViolated, match=f"from {start} to {wanted}"):
            stage_change(contact, wanted)
        assert contact.profile.lifecycle_stage == start
        assert pending(contact) == []


@pytest.mark.parametrize(
    ("start", "after"),
    [
        ("subscriber", "customer"),
        ("lead", "customer"),
        ("opportunity", "customer"),
        ("churned", "customer"),
        ("lost", "customer"),
        ("customer", "customer"),
        ("advocate", "advocate"),
    ],
)
def test_a_won_deal_makes_a_customer_and_never_moves_a_contact_back(start: str, after: str) -> None:
    acme = Company.register(
        validation.new_company_profile(NewCompany(name="Acme", lifecycle_stage=start))
    )
    acme.collect_events()
    for contact in (person(lifecycle_stage=start), acme):
        assert contact.become_customer() is (start != after)
        assert contact.profile.lifecycle_stage == after
        recorded: list[Any] = contact.collect_events()
        if start == after:
            assert recorded == []
        else:
            (event,) = recorded
            assert type(event).__name__.endswith("ProfileUpdated")
            assert event.changed_fields == ["lifecycle_stage"]
            assert event.profile["lifecycle_stage"] == "customer"
        # Winning a second deal changes nothing more.
        assert contact.become_customer() is False
        assert pending(contact) == []


def test_a_profile_change_records_what_changed_and_nothing_when_nothing_did() -> None:
    ada = person(tags=["VIP", "board  member"])
    assert ada.profile.tags == ("board member", "vip")
    changes = PersonChanges(
        id=str(ada.id),
        fields=frozenset({"family_name", "tags"}),
        family_name="King",
        tags=["vip", "Board Member"],
    )
    assert ada.change_profile(validation.changed_person_profile(ada.profile, changes, T0)) == [
        "family_name"
    ]
    assert ada.profile.display_name == "Ada King"
    assert ada.change_profile(validation.changed_person_profile(ada.profile, changes, T0)) == []
    assert pending(ada) == ["PersonProfileUpdated"]


def test_an_update_names_its_fields() -> None:
    ada = person()
    for mask, remove, field in [
        (frozenset(), [], "update_mask"),
        (frozenset({"nickname"}), [], "update_mask"),
        (frozenset({"tags"}), ["note"], "remove_custom_fields"),
    ]:
        changes = PersonChanges(id=str(ada.id), fields=mask, remove_custom_fields=remove)
        with pytest.raises(ValidationFailed) as refused:
            validation.changed_person_profile(ada.profile, changes, T0)
        assert fields_of(refused) == [field]


def test_a_person_keeps_a_name() -> None:
    with pytest.raises(ValidationFailed) as refused:
        validation.new_person_profile(NewPerson(given_name=" ", family_name=""), T0)
    assert fields_of(refused) == ["given_name"]
    ada = person()
    changes = PersonChanges(
        id=str(ada.id),
        fields=frozenset({"given_name", "family_name"}),
        given_name="",
        family_name="",
    )
    with pytest.raises(ValidationFailed):
        validation.changed_person_profile(ada.profile, changes, T0)
    only_family = replace(changes, family_name="Lovelace")
    assert validation.changed_person_profile(ada.profile, only_family, T0).display_name == (
        "Lovelace"
    )


def test_a_company_domain_is_a_host_name_in_lower_case() -> None:
    profile = validation.new_company_profile(NewCompany(name="Acme", domain="Engines.Example."))
    assert profile.domain == "engines.example"
    with pytest.raises(ValidationFailed) as refused:
        validation.new_company_profile(NewCompany(name="", domain="not a domain"))
    assert fields_of(refused) == ["name", "domain"]


# -- interactions ------------------------------------------------------------------------------


def interaction(summary: str, occurred_at: datetime | None, **kw: Any) -> Any:
    given = InteractionInput(
        contact_id="x", kind=kw.pop("kind", "call"), summary=summary, occurred_at=occurred_at, **kw
    )
    return validation.interaction_of(given, f"i-{summary}", T0)


def test_interactions_are_shown_newest_first_by_when_they_happened() -> None:
    ada = person()
    ada.log_interaction(interaction("first", T0 - timedelta(days=2)))
    ada.log_interaction(interaction("third", T0))
    # Logged late: sorts by when it happened, not when it was logged.
    ada.log_interaction(interaction("second", T0 - timedelta(days=1)))
    ada.log_interaction(interaction("same time, logged later", T0))
    assert [i.summary for i in ada.recent_interactions(10)] == [
        "same time, logged later",
        "third",
        "second",
        "first",
    ]
    assert [i.summary for i in ada.recent_interactions(2)] == ["same time, logged later", "third"]
    assert pending(ada) == ["InteractionLogged"] * 4


def test_an_interaction_keeps_kind_direction_channel_owner_and_time_in_utc() -> None:
    zurich = timezone(timedelta(hours=1))
    logged = interaction(
        "demo",
        datetime(2026, 11, 2, 10, 0, tzinfo=zurich),
        kind="meeting",
        direction="outbound",
        channel="phone",
        owner="grace",
    )
    acme = company()
    acme.log_interaction(logged)
    [shown] = acme.recent_interactions(1)
    assert (str(shown.kind), str(shown.direction), str(shown.channel), shown.owner) == (
        "meeting",
        "outbound",
        "phone",
        "grace",
    )
    assert shown.occurred_at == T0 and shown.occurred_at.tzinfo == UTC


def test_an_interaction_without_a_time_happened_when_it_was_accepted() -> None:
    assert interaction("now", None).occurred_at == T0


def test_an_interaction_needs_a_kind_a_summary_and_a_time_zone() -> None:
    with pytest.raises(ValidationFailed) as refused:
        validation.interaction_of(
            InteractionInput(
                contact_id="x",
                kind="fax",
                direction="sideways",
                summary=" ",
                occurred_at=datetime(2026, 11, 2, 9, 0),
            ),
            "i-1",
            T0,
        )
    assert fields_of(refused) == ["kind", "direction", "summary", "occurred_at"]
