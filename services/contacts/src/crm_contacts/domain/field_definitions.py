"""Custom-field definitions: what custom fields a person or a company may
carry, of which type, with which options, required or unique.

One `FieldCatalogue` aggregate per kind of contact holds its definitions, so
each change is an event (`FieldDefined`, `FieldRevised`, `FieldRetired`,
`FieldRestored`) and the definitions in force at any moment can be read back
from the log. The rules keep stored values readable: a field's type never
changes, an option is never taken away (a new one may be added), and retiring
a field hides it from reads and refuses new values while every value already
recorded stays in the contacts' history. Values are checked against their
definition by `crm_contacts.validation.defined_field_of`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from crm_contacts.domain.contacts import ContactKind
from crm_contacts.domain.custom_fields import FieldType

KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_LABEL = 100
MAX_OPTIONS = 200
MAX_OPTION = 100
MAX_DEFINITIONS = 200
CHOICE_TYPES = frozenset({FieldType.CHOICE, FieldType.MULTI_CHOICE})


class DefinitionRefused(ValueError):
    """A change to the definitions that the rules do not allow (field, reason)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class FieldDefinition:
    key: str
    label: str
    type: FieldType
    required: bool = False
    unique: bool = False
    #: The choices of a choice or multi-choice field, in display order.
    options: tuple[str, ...] = ()
    #: A money field's currency, when all its values must be in one.
    currency: str = ""
    retired: bool = False
    #: 1 when defined, +1 on each revision, retirement or restoration.
    revision: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "type": str(self.type),
            "required": self.required,
            "unique": self.unique,
            "options": list(self.options),
            "currency": self.currency,
            "retired": self.retired,
            "revision": self.revision,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FieldDefinition:
        return cls(
            key=data["key"],
            label=data["label"],
            type=FieldType(data["type"]),
            required=bool(data.get("required", False)),
            unique=bool(data.get("unique", False)),
            options=tuple(data.get("options", ())),
            currency=data.get("currency", ""),
            retired=bool(data.get("retired", False)),
            revision=int(data.get("revision", 1)),
        )


def check_definition(definition: FieldDefinition) -> None:
    """The rules of one definition on its own."""
    if not KEY.match(definition.key):
        raise DefinitionRefused("key", "must match ^[a-z][a-z0-9_]{0,63}$")
    if not definition.label.strip() or len(definition.label) > MAX_LABEL:
        raise DefinitionRefused("label", f"must be 1 to {MAX_LABEL} characters")
    if definition.type in CHOICE_TYPES:
        if not definition.options:
            raise DefinitionRefused("options", f"a {definition.type} field needs its options")
        if len(definition.options) > MAX_OPTIONS:
            raise DefinitionRefused("options", f"at most {MAX_OPTIONS} options")
        if len(set(definition.options)) != len(definition.options):
            raise DefinitionRefused("options", "must not repeat an option")
        for option in definition.options:
            if not option.strip() or option != option.strip() or len(option) > MAX_OPTION:
                raise DefinitionRefused(
                    "options", f"each option must be 1 to {MAX_OPTION} characters, untrimmed"
                )
            if "\n" in option or ";" in option:
                raise DefinitionRefused("options", "an option must not contain ';' or a newline")
    elif definition.options:
        raise DefinitionRefused(
            "options", f"only choice fields have options, not {definition.type}"
        )
    if definition.currency and definition.type is not FieldType.MONEY:
        raise DefinitionRefused("currency", "only money fields have a currency")
    if definition.unique and definition.type in (FieldType.BOOLEAN, FieldType.MULTI_CHOICE):
        raise DefinitionRefused("unique", f"a {definition.type} field cannot be unique")


class FieldCatalogue(Aggregate):
    """The custom-field definitions of one kind of contact."""

    @staticmethod
    def create_id(kind: ContactKind) -> UUID:
        return uuid5(NAMESPACE_URL, f"crm:contacts:field-catalogue:{kind}")

    @classmethod
    def open(cls, kind: ContactKind, at: datetime) -> FieldCatalogue:
        return cls._create(cls.Opened, id=cls.create_id(kind), kind=str(kind), at=at)

    class Opened(Aggregate.Created):
        kind: str
        at: datetime

    def __init__(self, kind: str, at: datetime) -> None:
        self.kind = ContactKind(kind)
        self.definitions: dict[str, FieldDefinition] = {}

    # -- reading --

    def active(self) -> dict[str, FieldDefinition]:
        return {k: d for k, d in self.definitions.items() if not d.retired}

    def get(self, key: str) -> FieldDefinition:
        found = self.definitions.get(key)
        if found is None:
            raise DefinitionRefused("key", f"no custom field {key!r} is defined for {self.kind}s")
        return found

    # -- commands --

    def define(self, definition: FieldDefinition, at: datetime, actor: str = "") -> None:
        check_definition(definition)
        existing = self.definitions.get(definition.key)
        if existing is not None:
            state = "retired (restore it instead)" if existing.retired else "defined already"
            raise DefinitionRefused("key", f"custom field {definition.key!r} is {state}")
        if len(self.definitions) >= MAX_DEFINITIONS:
            raise DefinitionRefused("key", f"at most {MAX_DEFINITIONS} custom fields per kind")
        fresh = replace(definition, retired=False, revision=1)
        self._defined(fresh.to_dict(), at, actor)

    def revise(
        self,
        key: str,
        at: datetime,
        *,
        label: str | None = None,
        required: bool | None = None,
        unique: bool | None = None,
        options: tuple[str, ...] | None = None,
        actor: str = "",
    ) -> bool:
        """Changes what may change; False (and no event) when nothing would."""
        before = self.get(key)
        if before.retired:
            raise DefinitionRefused("key", f"custom field {key!r} is retired; restore it first")
        after = before
        if label is not None:
            after = replace(after, label=label)
        if required is not None:
            after = replace(after, required=required)
        if unique is not None:
            after = replace(after, unique=unique)
        if options is not None:
            dropped = [o for o in before.options if o not in options]
            if dropped:
                raise DefinitionRefused(
                    "options",
                    f"options cannot be taken away (values may hold them): {', '.join(dropped)}",
                )
            after = replace(after, options=tuple(options))
        if after == before:
            return False
        check_definition(after)
        self._revised(replace(after, revision=before.revision + 1).to_dict(), at, actor)
        return True

    def retire(self, key: str, at: datetime, actor: str = "") -> bool:
        before = self.get(key)
        if before.retired:
            return False
        self._retired(key, at, actor)
        return True

    def restore(self, key: str, at: datetime, actor: str = "") -> bool:
        before = self.get(key)
        if not before.retired:
            return False
        self._restored(key, at, actor)
        return True

    # -- events --

    @event("FieldDefined")
    def _defined(self, definition: dict[str, Any], at: datetime, actor: str) -> None:
        found = FieldDefinition.from_dict(definition)
        self.definitions[found.key] = found

    @event("FieldRevised")
    def _revised(self, definition: dict[str, Any], at: datetime, actor: str) -> None:
        found = FieldDefinition.from_dict(definition)
        self.definitions[found.key] = found

    @event("FieldRetired")
    def _retired(self, key: str, at: datetime, actor: str) -> None:
        before = self.definitions[key]
        self.definitions[key] = replace(before, retired=True, revision=before.revision + 1)

    @event("FieldRestored")
    def _restored(self, key: str, at: datetime, actor: str) -> None:
        before = self.definitions[key]
        self.definitions[key] = replace(before, retired=False, revision=before.revision + 1)
