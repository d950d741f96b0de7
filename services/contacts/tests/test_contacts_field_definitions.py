"""Custom-field definitions (crm_contacts.domain.field_definitions) and values
checked against them (crm_contacts.validation.defined_field_of): pure domain."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from crm_common.errors import FieldErrors
from crm_contacts.domain import ContactKind, FieldType
from crm_contacts.domain.field_definitions import (
    DefinitionRefused,
    FieldCatalogue,
    FieldDefinition,
)
from crm_contacts.inputs import CustomFieldInput
from crm_contacts.validation import custom_field_of, defined_field_of

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def catalogue() -> FieldCatalogue:
    fields = FieldCatalogue.open(ContactKind.PERSON, NOW)
    fields.define(
        FieldDefinition("segment", "Segment", FieldType.CHOICE, options=("smb", "enterprise")),
        NOW,
    )
    fields.define(
        FieldDefinition(
            "interests", "Interests", FieldType.MULTI_CHOICE, options=("golf", "wine", "art")
        ),
        NOW,
    )
    fields.define(FieldDefinition("budget", "Budget", FieldType.MONEY, currency="EUR"), NOW)
    fields.define(FieldDefinition("seats", "Seats", FieldType.NUMBER, required=True), NOW)
    return fields


def check(definition: FieldDefinition, value: str, type_: str = "", currency: str = ""):
    errors = FieldErrors()
    found = defined_field_of(
        errors, "custom_fields.x", definition, CustomFieldInput(type_, value, currency)
    )
    return found, [(e.field, e.message) for e in errors.errors]


def test_definitions_are_events_and_the_catalogue_reads_back_from_them() -> None:
    fields = catalogue()
    events = fields.collect_events()
    assert [type(e).__name__ for e in events] == ["Opened"] + ["FieldDefined"] * 4
    replayed = None
    for e in events:
        replayed = e.mutate(replayed)
    assert replayed is not None and replayed.definitions == fields.definitions
    assert fields.id == FieldCatalogue.create_id(ContactKind.PERSON)
    assert fields.id != FieldCatalogue.create_id(ContactKind.COMPANY)


def test_a_choice_outside_the_options_is_refused_naming_them() -> None:
    fields = catalogue()
    assert check(fields.get("segment"), "smb")[0].value == "smb"
    value, errors = check(fields.get("segment"), "huge")
    assert value is None
    assert errors == [("custom_fields.x.value", "'huge' is not one of 'smb', 'enterprise'")]


def test_multi_choice_keeps_the_definitions_order_and_refuses_unknown_options() -> None:
    fields = catalogue()
    assert check(fields.get("interests"), "art, golf")[0].value == "golf;art"
    assert check(fields.get("interests"), "golf;chess")[1][0][1].startswith("'chess' is not one of")


def test_types_are_checked_and_kept_canonical() -> None:
    def field(t: FieldType) -> FieldDefinition:
        return FieldDefinition("x", "X", t)

    assert check(field(FieldType.BOOLEAN), "Yes")[0].value == "true"
    assert check(field(FieldType.BOOLEAN), "maybe")[1] == [
        ("custom_fields.x.value", "'maybe' is not true or false")
    ]
    assert check(field(FieldType.NUMBER), "12")[0].value == "12"
    assert check(field(FieldType.NUMBER), "1.5")[1] == [
        ("custom_fields.x.value", "must be a whole number")
    ]
    assert check(field(FieldType.DECIMAL), "1.50")[0].value == "1.5"
    assert check(field(FieldType.EMAIL), " Ada@Example.ORG ")[0].value == "ada@example.org"
    assert check(field(FieldType.PHONE), "0041 44 668 18 00")[0].value == "+41446681800"
    assert (
        check(field(FieldType.URL), "https://example.org/a?b")[0].value == "https://example.org/a?b"
    )
    assert check(field(FieldType.URL), "javascript:alert(1)")[0] is None
    assert check(field(FieldType.DATE), "2026-02-30")[0] is None
    assert check(field(FieldType.TEXT), "x", type_="number")[1] == [
        ("custom_fields.x.type", "'x' is a text field")
    ]


def test_a_money_field_with_a_currency_takes_it_as_default_and_refuses_others() -> None:
    budget = catalogue().get("budget")
    found, errors = check(budget, "1200.5")
    assert errors == [] and (found.value, found.currency) == ("1200.50", "EUR")
    assert check(budget, "10", currency="USD")[1] == [("custom_fields.x.currency", "must be EUR")]


def test_rules_keep_stored_values_readable() -> None:
    fields = catalogue()
    with pytest.raises(DefinitionRefused, match=r"options cannot be taken away.*smb"):
        fields.revise("segment", NOW, options=("enterprise",))
    assert fields.revise("segment", NOW, options=("smb", "enterprise", "public"))
    assert fields.get("segment").revision == 2
    assert not fields.revise("segment", NOW, label="Segment")  # nothing changes: no event
    assert fields.retire("segment", NOW)
    assert "segment" not in fields.active()
    value, errors = check(fields.get("segment"), "smb")
    assert value is None and errors == [("custom_fields.x", "custom field 'segment' is retired")]
    with pytest.raises(DefinitionRefused, match="retired \\(restore it instead\\)"):
        fields.define(FieldDefinition("segment", "Again", FieldType.TEXT), NOW)
    assert fields.restore("segment", NOW) and "segment" in fields.active()


@pytest.mark.parametrize(
    ("definition", "field", "reason"),
    [
        (FieldDefinition("Bad Key", "L", FieldType.TEXT), "key", "must match"),
        (FieldDefinition("k", " ", FieldType.TEXT), "label", "1 to 100"),
        (FieldDefinition("k", "L", FieldType.CHOICE), "options", "needs its options"),
        (FieldDefinition("k", "L", FieldType.CHOICE, options=("a", "a")), "options", "repeat"),
        (FieldDefinition("k", "L", FieldType.TEXT, options=("a",)), "options", "only choice"),
        (FieldDefinition("k", "L", FieldType.TEXT, currency="EUR"), "currency", "only money"),
        (FieldDefinition("k", "L", FieldType.BOOLEAN, unique=True), "unique", "cannot be unique"),
    ],
)
def test_bad_definitions_are_refused_clearly(
    definition: FieldDefinition, field: str, reason: str
) -> None:
    fields = FieldCatalogue.open(ContactKind.COMPANY, NOW)
    with pytest.raises(DefinitionRefused) as refused:
        fields.define(definition, NOW)
    assert refused.value.field == field and reason in refused.value.reason
    assert fields.definitions == {}


def test_undefined_values_keep_their_old_rules_but_multi_choice_needs_a_definition() -> None:
    errors = FieldErrors()
    assert custom_field_of(errors, "f", CustomFieldInput("number", "1.25")).value == "1.25"
    assert custom_field_of(errors, "f", CustomFieldInput("boolean", "no")).value == "false"
    assert errors.errors == []
    assert custom_field_of(errors, "f", CustomFieldInput("multi_choice", "a")) is None
    assert "needs a field definition" in errors.errors[0].message
