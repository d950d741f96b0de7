"""The key client: how a service, and any consumer allowed to, obtains the
data key of a subject.

- The owner (the service whose store holds the key) gets or creates keys:
  creation is insert-if-absent, so replicas racing for a new subject all end
  up with the one key that won. Only the owner creates and destroys.
- Another service may read an owner's keys only if the registry says it
  consumes the owner's events (`crm_common.registry`): the 360 projector
  reads contacts' keys, say. Every such read from the store is audited: a
  row in the owner's `privacy_key_access` and a log line (who, whose
  subject, purpose), never the key.
- Keys are cached unwrapped in the process, bounded by entries (least
  recently used out first) and by age (`ttl`, default 60 s). A key destroyed
  through this client leaves its cache at once; any other process stops
  using it within `ttl` seconds, when its cached copy expires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crm_common.errors import PermissionDenied, RuleViolated
from crm_common.privacy.keystore import KeyAccess, KeyStore
from crm_common.privacy.masterkeys import KEY_BYTES, MasterKeyRing
from crm_common.registry import SERVICES

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 10_000
#: Seconds a process keeps using a cached key: the longest another process
#: may still decrypt a subject after its key was destroyed elsewhere.
DEFAULT_CACHE_TTL = 60.0


class SubjectErased(RuleViolated):
    """New personal data for a subject whose key was destroyed: erasure is final."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"the personal data of {subject} was erased; none can be stored again")
        self.subject = subject


class MissingDataKey(RuntimeError):
    """Encrypted data names a subject the key store has no row for (a lost or
    wrong key store, never an erasure: erasure leaves a tombstone)."""


@dataclass(frozen=True)
class DataKey:
    """A subject's unwrapped AES-256 key; the key never shows in a repr. Its
    AES-GCM instance is built once (a third of the cost of sealing a value)."""

    subject: str
    secret: bytes = field(repr=False)
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aead", AESGCM(self.secret))


class _Erased:
    def __repr__(self) -> str:
        return "ERASED"


#: What the cache and `key_for_reading` give for a subject whose key was destroyed.
ERASED: Final = _Erased()


class KeyCache:
    """At most `max_entries` keys, each for at most `ttl` seconds; the least
    recently used leaves first. Thread-safe."""

    def __init__(
        self,
        max_entries: int = DEFAULT_CACHE_SIZE,
        ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("a key cache needs at least one entry and a positive ttl")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, DataKey | _Erased]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, subject: str) -> DataKey | _Erased | None:
        with self._lock:
            entry = self._entries.get(subject)
            if entry is None:
                return None
            expires, value = entry
            if self._clock() >= expires:
                del self._entries[subject]
                return None
            self._entries.move_to_end(subject)
            return value

    def put(self, subject: str, value: DataKey | _Erased) -> None:
        with self._lock:
            self._entries[subject] = (self._clock() + self.ttl, value)
            self._entries.move_to_end(subject)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def evict(self, subject: str) -> None:
        with self._lock:
            self._entries.pop(subject, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def may_read_keys_of(accessor: str, owner: str) -> bool:
    """The owner itself, or a service the registry says consumes the owner's events."""
    if accessor == owner:
        return True
    return any(s.name == accessor and owner in s.consumes for s in SERVICES)


class KeyClient:
    """Data keys of one owner's subjects, for one accessing service."""

    def __init__(
        self,
        store: KeyStore,
        ring: MasterKeyRing,
        accessor: str,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
        may_read: Callable[[str, str], bool] = may_read_keys_of,
    ) -> None:
        if not may_read(accessor, store.owner):
            raise PermissionDenied(
                f"{accessor} may not read the personal data keys of {store.owner}"
            )
        self.store = store
        self.ring = ring
        self.accessor = accessor
        self.cache = KeyCache(cache_size, ttl, clock)

    @property
    def owner(self) -> str:
        return self.store.owner

    @property
    def is_owner(self) -> bool:
        return self.accessor == self.store.owner

    def key_for_writing(self, subject: str) -> DataKey:
        """The subject's key, created if it has none. Owner only; refuses an
        erased subject (`SubjectErased`)."""
        self._require_owner("create")
        cached = self.cache.get(subject)
        if isinstance(cached, DataKey):
            return cached
        if cached is ERASED:
            raise SubjectErased(subject)
        row = self.store.fetch(subject)
        if row is None:
            secret = os.urandom(KEY_BYTES)
            master_key_id, wrapped = self.ring.wrap(subject, secret)
            if self.store.insert_if_absent(subject, wrapped, master_key_id):
                key = DataKey(subject, secret)
                self.cache.put(subject, key)
                return key
            row = self.store.fetch(subject)  # the one a racing replica stored first
            if row is None:
                raise MissingDataKey(f"the key of {subject} vanished while it was created")
        value = self._from_row(subject, row.wrapped, row.master_key_id)
        if isinstance(value, _Erased):
            raise SubjectErased(subject)
        return value

    def key_for_reading(self, subject: str, purpose: str = "read") -> DataKey | _Erased:
        """The subject's key, or `ERASED`. Audited when the accessor is not the owner."""
        cached = self.cache.get(subject)
        if cached is not None:
            return cached
        row = self.store.fetch(subject)
        if not self.is_owner:
            self._audit(subject, purpose)
        if row is None:
            raise MissingDataKey(
                f"no data key for subject {subject} in the key store of {self.owner}"
            )
        return self._from_row(subject, row.wrapped, row.master_key_id)

    def destroy(self, subject: str) -> bool:
        """Crypto-shredding: the subject's key is gone for good (a tombstone
        stays); True when there was a key to destroy. Owner only."""
        self._require_owner("destroy")
        destroyed = self.store.destroy(subject)
        self.cache.put(subject, ERASED)
        log.info(
            "personal data key destroyed",
            extra={"owner": self.owner, "subject": subject, "had_key": destroyed},
        )
        return destroyed

    def rewrap(self, batch: int = 500) -> int:
        """Wraps every live key under the current master key; the number
        re-wrapped. Keys and events are untouched otherwise. Owner only."""
        self._require_owner("rewrap")
        moved = 0
        while True:
            current = self.ring.current.id
            rows = self.store.wrapped_by_other_than(current, batch)
            if not rows:
                return moved
            for row in rows:
                assert row.wrapped is not None and row.master_key_id is not None
                secret = self.ring.unwrap(row.subject, row.master_key_id, row.wrapped)
                new_id, wrapped = self.ring.wrap(row.subject, secret)
                # Compare-and-set: a key destroyed meanwhile stays destroyed.
                if self.store.replace_wrapping(row.subject, row.master_key_id, wrapped, new_id):
                    moved += 1

    def _from_row(
        self, subject: str, wrapped: bytes | None, master_key_id: str | None
    ) -> DataKey | _Erased:
        if wrapped is None or master_key_id is None:
            self.cache.put(subject, ERASED)
            return ERASED
        key = DataKey(subject, self.ring.unwrap(subject, master_key_id, wrapped))
        self.cache.put(subject, key)
        return key

    def _audit(self, subject: str, purpose: str) -> None:
        access = KeyAccess(datetime.now(UTC), self.accessor, self.owner, subject, purpose)
        self.store.record_access(access)
        log.info(
            "personal data key read by another service",
            extra={
                "accessor": access.accessor,
                "owner": access.owner,
                "subject": access.subject,
                "purpose": access.purpose,
            },
        )

    def _require_owner(self, what: str) -> None:
        if not self.is_owner:
            raise PermissionDenied(
                f"only {self.owner} may {what} its personal data keys, not {self.accessor}"
            )

    def close(self) -> None:
        self.store.close()
