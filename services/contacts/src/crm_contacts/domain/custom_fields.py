"""Typed custom field values, kept in canonical text (see `validation`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class FieldType(StrEnum):
    """A custom field's type. A value given without a definition may be of any
    type but the choice types; a defined field fixes its type. `number` of a
    defined field is a whole number; an undefined `number` value, as before
    definitions existed, is any decimal."""

    TEXT = "text"
    NUMBER = "number"
    DECIMAL = "decimal"
    DATE = "date"
    BOOLEAN = "boolean"
    MONEY = "money"
    #: One of the definition's options (free text where no definition names them).
    CHOICE = "choice"
    #: Some of the definition's options, kept in the definition's order, `;`-separated.
    MULTI_CHOICE = "multi_choice"
    URL = "url"
    EMAIL = "email"
    PHONE = "phone"


@dataclass(frozen=True)
class CustomField:
    """A typed custom field value in canonical text."""

    type: FieldType
    value: str
    currency: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"type": str(self.type), "value": self.value, "currency": self.currency}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CustomField:
        return cls(FieldType(data["type"]), data["value"], data.get("currency", ""))


def fields_to_dict(fields: Mapping[str, CustomField]) -> dict[str, dict[str, str]]:
    return {name: value.to_dict() for name, value in sorted(fields.items())}


def fields_from_dict(data: Mapping[str, Any]) -> dict[str, CustomField]:
    return {name: CustomField.from_dict(value) for name, value in data.items()}
