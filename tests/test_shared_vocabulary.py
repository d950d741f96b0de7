"""The services speak one vocabulary: what one accepts as a currency, every other does."""

from __future__ import annotations

import itertools
import string

from crm_common.errors import FieldErrors, ValidationFailed
from crm_common.money import CURRENCIES
from crm_contacts.inputs import CustomFieldInput
from crm_contacts.validation import custom_field_of
from crm_pipeline.validation import one_money


def contacts_accepts(code: str) -> bool:
    """A money custom field on a person or company."""
    errors = FieldErrors()
    custom_field_of(errors, "custom_fields.budget", CustomFieldInput("money", "12", code))
    return not errors.errors


def pipeline_accepts(code: str) -> bool:
    """The amount of a deal."""
    try:
        one_money("12", code)
    except ValidationFailed:
        return False
    return True


def candidates() -> list[str]:
    codes = ["".join(c) for c in itertools.product(string.ascii_uppercase, repeat=3)]
    spelled = [f" {c.lower()} " for c in CURRENCIES] + [c.title() for c in CURRENCIES]
    return [*codes, *spelled, "", "EURO", "E", "€", "12"]


def test_every_currency_one_service_accepts_every_other_accepts() -> None:
    disagreements = [c for c in candidates() if contacts_accepts(c) != pipeline_accepts(c)]
    assert not disagreements, disagreements[:20]


def test_the_accepted_currencies_are_exactly_the_shared_table() -> None:
    accepted = {c for c in candidates() if pipeline_accepts(c) and c == c.strip().upper()}
    assert accepted == set(CURRENCIES)
    assert "XCG" in accepted and "ANG" not in accepted
