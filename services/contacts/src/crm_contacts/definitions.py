"""The custom-field definitions as the contacts service uses them: the
commands that change them and the definitions in force, read once per
couple of seconds rather than once per command.

A create or update of a contact checks its custom-field values against the
definitions of its kind (`validation.custom_fields_of`); a read hides the
values of retired fields (kept in the contact's history). The definitions a
process uses are at most `CACHE_SECONDS` old when another replica changed
them; a change made through this process is seen by it at once.

A field that becomes unique (defined so, revised to `unique: true`, or a unique
field restored) while live contacts hold values of it: refused, naming the
contacts that share a value (`unique_values.UniqueConflicts`), when any value is
shared; otherwise the same command claims every value for its holder
(`crm_contacts.unique_values`), so that from then on no second contact gets one.
The values are read from the directory's query tables caught up with the log
just before the command: a contact written in that moment, or by another
replica still trusting its cached definitions (`CACHE_SECONDS`), may keep a
value unclaimed; such a value is claimed by the next write that gives it to a
contact, and the duplicate check of the definition (revise it again) lists it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application

from crm_common.commands import Caller, CommandBus, UnitOfWork, WriteOutcome
from crm_common.errors import FieldErrors, NotFound, ValidationFailed
from crm_common.money import canonical_currency
from crm_contacts.domain import ContactKind, FieldType
from crm_contacts.domain.field_definitions import (
    DefinitionRefused,
    FieldCatalogue,
    FieldDefinition,
)
from crm_contacts.unique_values import UniqueConflicts, claim_existing, conflicts_of
from crm_contacts.views import ContactView

#: The live contacts holding each (normalised) value of a field, by value.
Holders = Callable[[ContactKind, str], dict[str, list[str]]]

#: How long a process trusts the definitions it read.
CACHE_SECONDS = 2.0


@dataclass(frozen=True)
class FieldDefinitionInput:
    key: str
    label: str
    type: str
    required: bool = False
    unique: bool = False
    options: tuple[str, ...] = ()
    currency: str = ""


@dataclass(frozen=True)
class FieldRevision:
    key: str
    label: str | None = None
    required: bool | None = None
    unique: bool | None = None
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DefinitionsView:
    kind: ContactKind
    #: The catalogue's version (0: nothing was ever defined for this kind).
    version: int
    definitions: tuple[FieldDefinition, ...]


@dataclass(frozen=True)
class DefinitionsWrite:
    outcome: WriteOutcome
    definitions: DefinitionsView


def kind_of(value: str) -> ContactKind:
    try:
        return ContactKind(value.strip().lower())
    except ValueError:
        raise ValidationFailed.of("kind", "must be 'person' or 'company'") from None


def _refused(error: DefinitionRefused) -> ValidationFailed:
    return ValidationFailed.of(error.field, error.reason)


def definition_of(given: FieldDefinitionInput) -> FieldDefinition:
    errors = FieldErrors()
    try:
        kind = FieldType(given.type.strip().lower())
    except ValueError:
        errors.add("type", f"must be one of {', '.join(t.value for t in FieldType)}")
        errors.raise_if_any()
        raise AssertionError("unreachable") from None
    currency = canonical_currency(given.currency) if given.currency.strip() else ""
    return FieldDefinition(
        key=given.key.strip(),
        label=given.label.strip(),
        type=kind,
        required=given.required,
        unique=given.unique,
        options=tuple(given.options),
        currency=currency,
    )


class FieldDefinitions:
    """The definitions of each kind of contact: cached reads and the commands."""

    def __init__(
        self, app: Application[UUID], bus: CommandBus, clock: Callable[[], datetime]
    ) -> None:
        self.app = app
        self.bus = bus
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[ContactKind, tuple[float, FieldCatalogue | None]] = {}
        #: Who holds a field's values (the service sets it: the directory's tables);
        #: None: a field made unique claims nothing that exists.
        self.holders: Holders | None = None

    # -- reading --

    def _catalogue(self, kind: ContactKind, fresh: bool = False) -> FieldCatalogue | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(kind)
            if cached is not None and cached[0] > now and not fresh:
                return cached[1]
        try:
            found: Any = self.app.repository.get(FieldCatalogue.create_id(kind))
        except AggregateNotFoundError:
            found = None
        catalogue = found if isinstance(found, FieldCatalogue) else None
        with self._lock:
            self._cache[kind] = (now + CACHE_SECONDS, catalogue)
        return catalogue

    def current(self, kind: ContactKind) -> Mapping[str, FieldDefinition]:
        """Every definition of `kind` (retired ones too), at most `CACHE_SECONDS` old."""
        catalogue = self._catalogue(kind)
        return {} if catalogue is None else dict(catalogue.definitions)

    def hide_retired(self, view: ContactView) -> ContactView:
        """`view` without the values of retired fields."""
        definitions = self.current(view.kind)
        retired = {k for k, d in definitions.items() if d.retired}
        shown = view.profile.custom_fields
        if not retired or not retired & set(shown):
            return view
        kept = {k: v for k, v in shown.items() if k not in retired}
        return replace(view, profile=replace(view.profile, custom_fields=kept))

    async def listed(self, kind: str, include_retired: bool = False) -> DefinitionsView:
        which = kind_of(kind)
        catalogue = await asyncio.to_thread(self._catalogue, which, True)
        return self._view(which, catalogue, include_retired)

    @staticmethod
    def _view(
        kind: ContactKind, catalogue: FieldCatalogue | None, include_retired: bool = True
    ) -> DefinitionsView:
        if catalogue is None:
            return DefinitionsView(kind, 0, ())
        shown = tuple(d for d in catalogue.definitions.values() if include_retired or not d.retired)
        return DefinitionsView(kind, catalogue.version, shown)

    # -- changing --

    async def _write(
        self,
        caller: Caller,
        command: str,
        kind: ContactKind,
        change: Callable[..., Any],
        *args: Any,
        then: Callable[[UnitOfWork, FieldCatalogue], None] | None = None,
    ) -> DefinitionsWrite:
        now = self.clock()

        def decide(uow: UnitOfWork) -> FieldCatalogue:
            ident = FieldCatalogue.create_id(kind)
            if uow.exists(ident, FieldCatalogue):
                catalogue = uow.get(ident, FieldCatalogue)
            else:
                if command != "DefineCustomField":
                    raise NotFound("CustomField", f"{kind}:{args[0] if args else ''}")
                catalogue = uow.add(FieldCatalogue.open(kind, now))
            try:
                change(catalogue, now, caller.actor)
            except DefinitionRefused as refused:
                raise _refused(refused) from None
            if then is not None:
                then(uow, catalogue)
            return catalogue

        outcome = await self.bus.execute_async(caller.command(command, str(kind), *args), decide)
        catalogue = await asyncio.to_thread(self._catalogue, kind, True)
        return DefinitionsWrite(outcome, self._view(kind, catalogue))

    async def define(
        self, caller: Caller, kind: str, given: FieldDefinitionInput
    ) -> DefinitionsWrite:
        which = kind_of(kind)
        definition = definition_of(given)

        def change(catalogue: FieldCatalogue, now: datetime, actor: str) -> None:
            catalogue.define(definition, now, actor)

        then = await self._becoming_unique(which, definition.key) if definition.unique else None
        return await self._write(
            caller, "DefineCustomField", which, change, definition.to_dict(), then=then
        )

    async def _becoming_unique(
        self, kind: ContactKind, key: str
    ) -> Callable[[UnitOfWork, FieldCatalogue], None] | None:
        """What a command making `key` unique does after its change: claims the values
        live contacts hold; `UniqueConflicts` (before any command) when some are shared."""
        if self.holders is None:
            return None
        holders = await asyncio.to_thread(self.holders, kind, key)
        conflicts = conflicts_of(holders)
        if conflicts:
            raise UniqueConflicts(key, conflicts)

        def claim(uow: UnitOfWork, catalogue: FieldCatalogue) -> None:
            if catalogue.definitions[key].unique and not catalogue.definitions[key].retired:
                claim_existing(uow, kind, key, holders)

        return claim

    async def revise(self, caller: Caller, kind: str, revision: FieldRevision) -> DefinitionsWrite:
        which = kind_of(kind)
        then = None
        if revision.unique and not self._is_unique(which, revision.key):
            then = await self._becoming_unique(which, revision.key)

        def change(catalogue: FieldCatalogue, now: datetime, actor: str) -> None:
            try:
                catalogue.get(revision.key)
            except DefinitionRefused:
                raise NotFound("CustomField", f"{which}:{revision.key}") from None
            catalogue.revise(
                revision.key,
                now,
                label=revision.label.strip() if revision.label is not None else None,
                required=revision.required,
                unique=revision.unique,
                options=revision.options,
                actor=actor,
            )

        return await self._write(
            caller, "ReviseCustomField", which, change, revision.key, revision, then=then
        )

    def _is_unique(self, kind: ContactKind, key: str) -> bool:
        """Whether `key` is a unique field in force now (read fresh)."""
        catalogue = self._catalogue(kind, fresh=True)
        found = catalogue.definitions.get(key) if catalogue is not None else None
        return found is not None and found.unique and not found.retired

    async def retire(self, caller: Caller, kind: str, key: str) -> DefinitionsWrite:
        return await self._toggle(caller, kind, key, retire=True)

    async def restore(self, caller: Caller, kind: str, key: str) -> DefinitionsWrite:
        return await self._toggle(caller, kind, key, retire=False)

    async def _toggle(
        self, caller: Caller, kind: str, key: str, *, retire: bool
    ) -> DefinitionsWrite:
        which = kind_of(kind)

        def change(catalogue: FieldCatalogue, now: datetime, actor: str) -> None:
            try:
                catalogue.get(key)
            except DefinitionRefused:
                raise NotFound("CustomField", f"{which}:{key}") from None
            if retire:
                catalogue.retire(key, now, actor)
            else:
                catalogue.restore(key, now, actor)

        then = None
        if not retire:
            catalogue = self._catalogue(which, fresh=True)
            found = catalogue.definitions.get(key) if catalogue is not None else None
            if found is not None and found.unique and found.retired:
                then = await self._becoming_unique(which, key)
        command = "RetireCustomField" if retire else "RestoreCustomField"
        return await self._write(caller, command, which, change, key, then=then)
