"""The event store's mapper with personal data encrypted at rest.

Before an event is transcoded, the values its class declares personal
(`PersonalData`) are taken out of its state (None left in their place) and
stored, transcoded together, as one token under the subject's data key in
the state's `_personal` entry, with the paths they came from. Loading puts
them back before anything else sees the event (upcasters included); when
the subject was erased they come back as the declaration's redacted values.

Snapshots of an aggregate that has any event with personal data are sealed
whole under the aggregate's own key (the subject is the aggregate id); an
erased subject's snapshot cannot be opened, so the repository replays the
events (which read redacted) instead, and no new snapshot is taken for it.
An aggregate holding personal data of other subjects (an event declaring
`subject="contact_id"`) is never snapshotted: erasing that contact could not
reach the copy in its snapshot, so it is replayed from its events.

Events without a declaration, and events stored before encryption was turned
on (no `_personal` entry), are stored and read exactly as the library does.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from functools import cache, lru_cache
from typing import Any, cast
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol, Snapshot
from eventsourcing.persistence import (
    Cipher,
    Compressor,
    Mapper,
    MapperDeserialisationError,
    StoredEvent,
    Transcoder,
    find_id_convertor,
)
from eventsourcing.utils import resolve_topic

from crm_common.privacy.client import ERASED, DataKey, KeyClient
from crm_common.privacy.declaration import REDACTED, PersonalData, put
from crm_common.privacy.tokens import InvalidToken, seal, subject_of, unseal

log = logging.getLogger(__name__)

#: The state entry that holds an event's sealed personal values.
ENVELOPE = "_personal"
_WHOLE_SNAPSHOT = PersonalData("state")


class ErasedSnapshot(Exception):
    """A snapshot whose subject was erased: replay the events instead."""


class PersonalDataNotConfigured(RuntimeError):
    """Encrypted personal data to read, but no master keys configured."""


def holds_personal_data(aggregate_class: type) -> bool:
    """Whether any event class of the aggregate (or its bases) declares personal data."""
    return _holds_personal_data(aggregate_class)


def may_snapshot(aggregate_class: type) -> bool:
    """False for an aggregate with personal data of subjects other than itself."""
    return not any(d.subject != ("originator_id",) for d in _declarations(aggregate_class))


def _holds_personal_data(aggregate_class: type) -> bool:
    return bool(_declarations(aggregate_class))


@cache
def _declarations(aggregate_class: type) -> tuple[PersonalData, ...]:
    found: list[PersonalData] = []
    for owner in aggregate_class.__mro__:
        for member in vars(owner).values():
            declared = getattr(member, "personal_data", None) if isinstance(member, type) else None
            if isinstance(declared, PersonalData):
                found.append(declared)
    return tuple(found)


class SnapshotRefused(Exception):
    """A snapshot of an aggregate that holds other subjects' personal data."""


@lru_cache(maxsize=4096)
def _snapshot_declaration(aggregate_topic: str) -> PersonalData | None:
    try:
        aggregate_class = resolve_topic(aggregate_topic)
    except Exception:
        return None
    if not _holds_personal_data(aggregate_class):
        return None
    if not may_snapshot(aggregate_class):
        raise SnapshotRefused(f"{aggregate_topic} holds other subjects' personal data")
    return _WHOLE_SNAPSHOT


def declaration_of(event_class: type, state: dict[str, Any]) -> PersonalData | None:
    if issubclass(event_class, Snapshot):
        topic = state.get("topic")
        return _snapshot_declaration(topic) if isinstance(topic, str) else None
    declared = getattr(event_class, "personal_data", None)
    return declared if isinstance(declared, PersonalData) else None


class PersonalDataMapper(Mapper[UUID]):
    """`Mapper` that seals declared personal values under their subject's key."""

    def __init__(
        self,
        transcoder: Transcoder,
        compressor: Compressor | None = None,
        cipher: Cipher | None = None,
        keys: KeyClient | None = None,
    ) -> None:
        super().__init__(transcoder=transcoder, compressor=compressor, cipher=cipher)
        self.keys = keys
        self._warned: set[type] = set()
        # Events mapped ahead of their save (the command bus checks each
        # command's stored size first): id -> (the event, its stored form).
        self._premapped: dict[int, tuple[object, StoredEvent]] = {}

    def premap(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        """Maps an event ahead of its save; the save then takes this stored form
        instead of mapping (sealing, transcoding, encrypting) it a second time.
        Call `forget_premapped()` once the save is done or abandoned."""
        stored = self.to_stored_event(domain_event)
        self._premapped[id(domain_event)] = (domain_event, stored)
        return stored

    def forget_premapped(self) -> None:
        self._premapped.clear()

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        if self._premapped:
            hit = self._premapped.pop(id(domain_event), None)
            if hit is not None and hit[0] is domain_event:
                return hit[1]
        event_class = type(domain_event)
        state = vars(domain_event)
        if self.keys is None:
            if not issubclass(event_class, Snapshot) and declaration_of(event_class, state):
                self._warn_unencrypted(event_class)
            return super().to_stored_event(domain_event)
        declaration = declaration_of(event_class, state)
        if declaration is None:
            return super().to_stored_event(domain_event)
        subject = declaration.subject_in(state)
        sealed_state, taken = declaration.take(state)
        if not taken:
            return super().to_stored_event(domain_event)
        key = self.keys.key_for_writing(subject)
        plaintext = self.transcoder.encode([value for _, value in taken])
        sealed_state[ENVELOPE] = {"p": [list(path) for path, _ in taken], "t": seal(key, plaintext)}
        stand_in = object.__new__(event_class)
        object.__setattr__(stand_in, "__dict__", sealed_state)
        return super().to_stored_event(stand_in)

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        event_class = resolve_topic(stored_event.topic)
        try:
            data = stored_event.state
            if self.cipher:
                data = self.cipher.decrypt(data)
            if self.compressor:
                data = self.compressor.decompress(data)
            event_state: dict[str, Any] = self.transcoder.decode(data)
            envelope = event_state.pop(ENVELOPE, None)
            if envelope is not None:
                self._open(event_class, event_state, envelope)
        except ErasedSnapshot:
            raise
        except Exception as error:
            raise MapperDeserialisationError(
                f"Failed to deserialise state of stored event with topic "
                f"'{stored_event.topic}', originator_id '{stored_event.originator_id}' and "
                f"originator_version {stored_event.originator_version}: {error}"
            ) from error
        convert_id = find_id_convertor(
            event_class, cast(Hashable, type(stored_event.originator_id))
        )
        event_state["originator_id"] = convert_id(stored_event.originator_id)
        event_state["originator_version"] = stored_event.originator_version
        class_version = getattr(event_class, "class_version", 1)
        from_version = event_state.pop("class_version", 1)
        while from_version < class_version:
            getattr(event_class, f"upcast_v{from_version}_v{from_version + 1}")(event_state)
            from_version += 1
        domain_event = object.__new__(event_class)
        object.__setattr__(domain_event, "__dict__", event_state)
        return cast(DomainEventProtocol[UUID], domain_event)

    def _open(self, event_class: type, state: dict[str, Any], envelope: dict[str, Any]) -> None:
        token = envelope["t"]
        paths = [tuple(p) for p in envelope["p"]]
        if self.keys is None:
            raise PersonalDataNotConfigured(
                "the event holds encrypted personal data and no master keys are configured "
                "(CRM_MASTER_KEYS or CRM_MASTER_KEYS_FILE)"
            )
        subject = subject_of(token)
        key = self.keys.key_for_reading(subject, purpose="load events")
        values: list[Any]
        if key is ERASED or not isinstance(key, DataKey):
            if issubclass(event_class, Snapshot):
                raise ErasedSnapshot(subject)
            declared = declaration_of(event_class, state)
            values = [declared.redacted_for(p) if declared else REDACTED for p in paths]
        else:
            values = self.transcoder.decode(unseal(key, token))
            if not isinstance(values, list) or len(values) != len(paths):
                raise InvalidToken(f"the personal data of {subject} does not fit its paths")
        for path, value in zip(paths, values, strict=True):
            put(state, path, value)

    def _warn_unencrypted(self, event_class: type) -> None:
        if event_class not in self._warned:
            self._warned.add(event_class)
            log.warning(
                "%s declares personal data but no master keys are configured: stored unencrypted",
                event_class.__qualname__,
            )
