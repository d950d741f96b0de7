"""Unique custom fields: a definition with `unique: true` lets one live contact
hold a value at a time.

Enforced in the command itself, by the event store: each value of a unique
field that a contact comes to hold is a small aggregate, `UniqueValue`, whose
id is derived from (kind, field key, normalised value) and which names its
holder. The command that gives a contact such a value writes an event to that
aggregate (creates it, or hands it over), in the same save as the contact's own
events. Two commands that want one value therefore write the same aggregate at
the same version: within a batch of the command bus the second sees the first
(the batch's shared view), and across processes or replicas the second save
fails on the store's (aggregate id, version) constraint, is retried alone on
fresh state, and is refused. No window, no lock, whatever the number of replicas.

A claim is checked when it is contested, not kept in step with every change:
its holder holds the value only while it is live (not merged into another
contact, not erased), the field is still unique and not retired, and its
current value is still the same. A merge (the tombstone holds nothing; the
survivor claims what it takes over), an erase, a changed or removed value and
a retired definition thus free the value without touching the claim.

Values are compared normalised: text (and choices, URLs) trimmed and
case-folded, email addresses in lower case, phone numbers in E.164 (as stored),
money with its currency.

The claim stores no value, only its holder; its id is a name-based UUID of the
value (a hash, which a guess of the value could confirm).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from crm_common.commands import UnitOfWork
from crm_common.errors import NotFound, RuleViolated
from crm_contacts.already_exists import UniqueValueTaken
from crm_contacts.directory import CONTACTS, ContactDirectory
from crm_contacts.domain import Contact, ContactKind, CustomField, FieldType
from crm_contacts.domain.field_definitions import FieldCatalogue, FieldDefinition

NAMESPACE = UUID("3b0f6c1e-5d7a-5a28-8e64-91c2f0d4b7a3")
#: Directory rows read per query while looking for the values a field holds.
SCAN_PAGE = 1000
#: Conflicts a refusal names at most (the message; the count is always given).
MAX_CONFLICTS_NAMED = 20
_FOLDED = (FieldType.TEXT, FieldType.CHOICE, FieldType.URL)


def normalised(value: CustomField) -> str:
    """How two values of a unique field are compared (see the module)."""
    if value.type in _FOLDED:
        return value.value.strip().casefold()
    if value.type is FieldType.EMAIL:
        return value.value.strip().lower()
    if value.type is FieldType.MONEY:
        return f"{value.value.strip()} {value.currency}"
    return value.value.strip()


def unique_values(contact: Contact, definitions: Mapping[str, FieldDefinition]) -> dict[str, str]:
    """The normalised values `contact` holds of unique fields in force (none for a
    tombstone or an erased person)."""
    if contact.merged_into is not None or contact.erased:
        return {}
    profile = getattr(contact, "profile", None)
    fields: Mapping[str, CustomField] = getattr(profile, "custom_fields", {}) or {}
    held: dict[str, str] = {}
    for key, value in fields.items():
        definition = definitions.get(key)
        if definition is None or not definition.unique or definition.retired:
            continue
        held[key] = normalised(value)
    return held


class UniqueValue(Aggregate):
    """Which contact claimed one value of a unique field (see the module).

    Its events are internal like the definitions they enforce (the relay leaves
    the definitions' events out of the published stream)."""

    class Event(FieldCatalogue.Event):
        pass

    class Claimed(Event, Aggregate.Created):
        kind: str
        key: str
        holder: str

    @staticmethod
    def create_id(kind: str, key: str, value: str) -> UUID:
        return uuid5(NAMESPACE, f"{kind}\n{key}\n{value}")

    @classmethod
    def claim(cls, ident: UUID, kind: str, key: str, holder: str) -> UniqueValue:
        return cls._create(cls.Claimed, id=ident, kind=kind, key=key, holder=holder)

    def __init__(self, kind: str, key: str, holder: str) -> None:
        self.kind = kind
        self.key = key
        self.holder = holder

    @event("HandedOver")
    def hand_over(self, holder: str) -> None:
        self.holder = holder


def claim_values(
    uow: UnitOfWork,
    contact: Contact,
    before: Mapping[str, str],
    definitions: Mapping[str, FieldDefinition],
) -> None:
    """Claims, within the command of `uow`, every unique value `contact` holds now
    that it did not hold before the command (`before`: `unique_values` then);
    `UniqueValueTaken` names the live contact holding one already."""
    kind = str(contact.KIND)
    me = str(contact.id)
    for key, value in sorted(unique_values(contact, definitions).items()):
        if before.get(key) == value:
            continue
        ident = UniqueValue.create_id(kind, key, value)
        try:
            claimed = uow.get(ident, UniqueValue, subject=False)
        except NotFound:
            uow.add(UniqueValue.claim(ident, kind, key, me))
            continue
        if claimed.holder != me and _holds(uow, claimed.holder, key, value, definitions):
            raise UniqueValueTaken(key, claimed.holder)
        # An event even when this contact held it before: a concurrent claim of
        # the same value must collide with this one.
        claimed.hand_over(me)


def _holds(
    uow: UnitOfWork,
    holder_id: str,
    key: str,
    value: str,
    definitions: Mapping[str, FieldDefinition],
) -> bool:
    """Whether the claim's holder (as this batch sees it) still holds `value`."""
    try:
        holder = uow.get(holder_id, Contact, subject=False)
    except NotFound:
        return False
    return unique_values(holder, definitions).get(key) == value


# -- making a field unique ------------------------------------------------------------------


class UniqueConflicts(RuleViolated):
    """A field cannot become unique: live contacts share values of it already.
    Nothing was written; `conflicts` lists the contact ids of each shared value."""

    def __init__(self, key: str, conflicts: Sequence[Sequence[str]]) -> None:
        self.key = key
        self.conflicts = [list(c) for c in conflicts]
        named = "; ".join(" and ".join(c) for c in self.conflicts[:MAX_CONFLICTS_NAMED])
        more = len(self.conflicts) - MAX_CONFLICTS_NAMED
        super().__init__(
            f"custom field {key!r} cannot be unique: {len(self.conflicts)} value(s) are "
            f"shared by several contacts ({named}"
            + (f"; and {more} more" if more > 0 else "")
            + "); change or remove them, or merge the contacts, then try again"
        )


def existing_holders(
    directory: ContactDirectory, kind: ContactKind, key: str
) -> dict[str, list[str]]:
    """The live contacts of `kind` holding a value of `key`, by normalised value, as
    the directory shows them once caught up with the log (an erased person holds
    none; a tombstone has no row)."""
    directory.catch_up()
    holders: dict[str, list[str]] = defaultdict(list)
    after = ""
    database = directory.query_side.database
    while True:
        with database.read() as tx:
            rows = tx.all(
                f"SELECT id, view FROM {CONTACTS} WHERE kind = ? AND id > ? ORDER BY id LIMIT ?",
                (str(kind), after, SCAN_PAGE),
            )
        for ident, data in rows:
            stored = json.loads(data)
            raw = stored["profile"].get("custom_fields", {}).get(key)
            if raw is None or stored.get("erased"):
                continue
            holders[normalised(CustomField.from_dict(raw))].append(str(ident))
        if len(rows) < SCAN_PAGE:
            return dict(holders)
        after = str(rows[-1][0])


def conflicts_of(holders: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The values held by more than one contact, as their holders' ids."""
    return sorted(sorted(ids) for ids in holders.values() if len(ids) > 1)


def claim_existing(
    uow: UnitOfWork, kind: ContactKind, key: str, holders: Mapping[str, Sequence[str]]
) -> None:
    """Claims, within the command making `key` unique, each value for the one
    contact holding it (`existing_holders`, without conflicts)."""
    for value, ids in sorted(holders.items()):
        ident = UniqueValue.create_id(str(kind), key, value)
        try:
            claimed = uow.get(ident, UniqueValue, subject=False)
        except NotFound:
            uow.add(UniqueValue.claim(ident, str(kind), key, ids[0]))
            continue
        if claimed.holder != ids[0]:
            claimed.hand_over(ids[0])
