"""The shared vocabulary (crm_common.enums, crm_common.money) every service uses."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from decimal import Decimal

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

import crm
from crm_common.enums import enum_number, enum_word, enum_words
from crm_common.errors import ValidationFailed
from crm_common.money import CURRENCIES, Money, canonical_currency, parse_amount, round_money


def _nested(message: Descriptor) -> Iterator[EnumDescriptor]:
    yield from message.enum_types
    for inner in message.nested_types:
        yield from _nested(inner)


def every_proto_enum() -> list[EnumDescriptor]:
    """Every enum declared in proto/, at top level or inside a message."""
    found: dict[str, EnumDescriptor] = {}
    for module in pkgutil.walk_packages(crm.__path__, "crm."):
        if not module.name.endswith("_pb2"):
            continue
        file = importlib.import_module(module.name).DESCRIPTOR
        for enum in file.enum_types_by_name.values():
            found[enum.full_name] = enum
        for message in file.message_types_by_name.values():
            for enum in _nested(message):
                found[enum.full_name] = enum
    return [found[name] for name in sorted(found)]


ENUMS = every_proto_enum()


def test_the_contracts_declare_enums_to_check() -> None:
    names = {e.full_name for e in ENUMS}
    assert "crm.contacts.v1.LifecycleStage" in names
    assert "crm.pipeline.v1.ForecastCategory" in names


@pytest.mark.parametrize("descriptor", ENUMS, ids=lambda e: e.full_name)
def test_every_enum_value_round_trips_through_its_word(descriptor: EnumDescriptor) -> None:
    enum = EnumTypeWrapper(descriptor)
    assert descriptor.values[0].number == 0
    assert descriptor.values[0].name.endswith("_UNSPECIFIED")
    assert enum_word(enum, 0) is None
    assert enum_number(enum, None) == 0
    assert enum_number(enum, "") == 0
    words = set()
    for value in descriptor.values[1:]:
        word = enum_word(enum, value.number)
        assert word is not None and word == word.lower() and word.isidentifier()
        assert enum_number(enum, word) == value.number
        words.add(word)
    assert set(enum_words(enum)) == words


def test_an_enum_number_from_a_newer_producer_keeps_its_number() -> None:
    enum = EnumTypeWrapper(ENUMS[0])
    unknown = max(v.number for v in ENUMS[0].values) + 100
    assert enum_word(enum, unknown) == str(unknown)
    assert enum_number(enum, str(unknown)) == unknown


def test_an_unknown_word_is_refused() -> None:
    enum = EnumTypeWrapper(ENUMS[0])
    with pytest.raises(ValueError):
        enum_number(enum, "no_such_word")


def test_currency_codes_are_canonicalised_before_they_are_checked() -> None:
    assert canonical_currency(" eur ") == "EUR"
    assert canonical_currency("jpy") == "JPY"
    for refused in ("", "EURO", "XAU", "ANG", "XTS"):
        with pytest.raises(ValidationFailed):
            canonical_currency(refused)


def test_amounts_are_exact_to_the_minor_unit_of_their_currency() -> None:
    assert parse_amount("100", "EUR") == Decimal("100.00")
    assert parse_amount("7", "JPY") == Decimal("7")
    assert parse_amount("1.234", "BHD") == Decimal("1.234")
    with pytest.raises(ValidationFailed) as refused:
        parse_amount("1.005", "USD")
    assert "at most 2 decimal places" in str(refused.value.errors)
    assert Money.of("12.5", "usd") == Money(Decimal("12.50"), "USD")
    assert round_money(Decimal("0.125"), "EUR") == Decimal("0.12")


@pytest.mark.parametrize("value", ["1e999999", "-1e999999", "9e999998", "1e15", "NaN", "Infinity"])
def test_huge_or_non_finite_amounts_are_refused_without_expanding_them(value: str) -> None:
    with pytest.raises(ValidationFailed):
        parse_amount(value, "EUR", allow_negative=True)


def test_floats_are_refused() -> None:
    with pytest.raises(ValidationFailed):
        parse_amount(1.5, "EUR")  # type: ignore[arg-type]


def test_every_currency_has_a_sane_minor_unit() -> None:
    assert len(CURRENCIES) > 150
    assert set(CURRENCIES.values()) <= {0, 2, 3, 4}
    assert all(len(code) == 3 and code.isupper() for code in CURRENCIES)


def test_timestamps_no_calendar_holds_are_refused_naming_the_field() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    from crm_common.timestamps import datetime_of

    assert datetime_of(Timestamp(seconds=0), "at").year == 1970
    for bad in (Timestamp(seconds=1, nanos=-5), Timestamp(seconds=-(10**12)),
                Timestamp(seconds=10**13)):  # fmt: skip
        with pytest.raises(ValidationFailed) as refused:
            datetime_of(bad, "occurred_at")
        assert refused.value.errors[0].field == "occurred_at"
