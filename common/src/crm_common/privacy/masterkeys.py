"""Master keys: the keys that wrap every person's data key.

They come from configuration, never from the database that holds what they
wrap: `CRM_MASTER_KEYS` (or the file `CRM_MASTER_KEYS_FILE`, the form a
Kubernetes Secret mounts) is an ordered list of `id:base64key` entries,
separated by commas, spaces or new lines. The first entry is the current
key, which wraps new data keys; the others still unwrap what they wrapped
until `python -m crm_common.privacy <service> rewrap` has moved every data
key to the current one. A key is 32 random bytes (AES-256), for example
`python -c "import os, base64; print(base64.b64encode(os.urandom(32)).decode())"`.

Errors name an entry by its position and id, never by its key material.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEYS_VAR = "CRM_MASTER_KEYS"
MASTER_KEYS_FILE_VAR = "CRM_MASTER_KEYS_FILE"
KEY_BYTES = 32
NONCE_BYTES = 12
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_WRAP_CONTEXT = b"crm-data-key-v1"
#: How often a ring read from a file looks whether the file changed (seconds).
FILE_CHECK_SECONDS = 5.0


class MasterKeyError(ValueError):
    """The master keys are missing, malformed, or cannot unwrap a data key."""


@dataclass(frozen=True)
class MasterKey:
    id: str
    secret: bytes = field(repr=False)


def parse_master_keys(text: str, source: str = MASTER_KEYS_VAR) -> tuple[MasterKey, ...]:
    """The keys listed in `text` (`id:base64key` entries), current first."""
    entries = [e for e in re.split(r"[\s,]+", text.strip()) if e]
    if not entries:
        raise MasterKeyError(f"{source} lists no master key")
    keys: list[MasterKey] = []
    for position, entry in enumerate(entries, start=1):
        key_id, sep, encoded = entry.partition(":")
        if not sep or not _ID.match(key_id):
            raise MasterKeyError(
                f"{source}: entry {position} is not 'id:base64key' with an id of letters, "
                "digits, '.', '_' or '-' (at most 64)"
            )
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise MasterKeyError(f"{source}: the key of {key_id!r} is not base64") from None
        if len(secret) != KEY_BYTES:
            raise MasterKeyError(
                f"{source}: the key of {key_id!r} has {len(secret)} bytes, "
                f"a master key has {KEY_BYTES} (AES-256)"
            )
        if any(k.id == key_id for k in keys):
            raise MasterKeyError(f"{source}: the id {key_id!r} is listed twice")
        keys.append(MasterKey(key_id, secret))
    return tuple(keys)


def new_master_key(key_id: str) -> str:
    """A fresh `id:base64key` entry."""
    if not _ID.match(key_id):
        raise MasterKeyError(f"{key_id!r} is not a valid master key id")
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode('ascii')}"


def _wrap_aad(subject: str, key_id: str) -> bytes:
    # Binds a wrapped key to its subject and master key: a wrapped key copied
    # onto another subject's row does not unwrap.
    return b"|".join((_WRAP_CONTEXT, key_id.encode(), subject.encode()))


class MasterKeyRing:
    """The configured master keys: wraps with the current one, unwraps with
    the one a data key names. A ring read from a file follows the file: it
    looks at most every `FILE_CHECK_SECONDS` whether it changed and takes the
    new list (a broken file keeps the last good list), so a rotation needs no
    restart."""

    def __init__(
        self,
        keys: tuple[MasterKey, ...],
        *,
        path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not keys:
            raise MasterKeyError("a master key ring needs at least one key")
        self._keys = keys
        self._path = path
        self._clock = clock
        self._mtime = path.stat().st_mtime_ns if path is not None else 0
        self._checked = clock()
        self._lock = threading.Lock()

    @classmethod
    def from_text(cls, text: str) -> MasterKeyRing:
        return cls(parse_master_keys(text))

    @classmethod
    def from_file(cls, path: Path | str) -> MasterKeyRing:
        path = Path(path)
        return cls(_read_file(path), path=path)

    @classmethod
    def from_config(cls, text: str | None, file: str | None) -> MasterKeyRing | None:
        """The ring configured by the variable's text or, when it is empty, the
        file; None when neither is set (personal data is then not encrypted)."""
        if text and text.strip():
            return cls.from_text(text)
        if file and file.strip():
            return cls.from_file(file.strip())
        return None

    @property
    def keys(self) -> tuple[MasterKey, ...]:
        self._follow_file()
        return self._keys

    @property
    def current(self) -> MasterKey:
        return self.keys[0]

    def replace(self, keys: tuple[MasterKey, ...]) -> None:
        """Takes a new list of keys (a rotation in a running process)."""
        if not keys:
            raise MasterKeyError("a master key ring needs at least one key")
        with self._lock:
            self._keys = keys

    def wrap(self, subject: str, data_key: bytes) -> tuple[str, bytes]:
        """(master key id, wrapped data key) under the current key."""
        master = self.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(master.secret).encrypt(nonce, data_key, _wrap_aad(subject, master.id))
        return master.id, nonce + sealed

    def unwrap(self, subject: str, key_id: str, wrapped: bytes) -> bytes:
        master = next((k for k in self.keys if k.id == key_id), None)
        if master is None:
            raise MasterKeyError(
                f"the data key of subject {subject} is wrapped by master key {key_id!r}, "
                f"which is not configured (configured: {', '.join(k.id for k in self.keys)})"
            )
        try:
            return AESGCM(master.secret).decrypt(
                wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(subject, key_id)
            )
        except InvalidTag:
            raise MasterKeyError(
                f"the data key of subject {subject} does not unwrap with master key "
                f"{key_id!r}: the row was altered or the key is not the one that wrapped it"
            ) from None

    def _follow_file(self) -> None:
        if self._path is None or self._clock() - self._checked < FILE_CHECK_SECONDS:
            return
        with self._lock:
            self._checked = self._clock()
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._keys = _read_file(self._path)
                    self._mtime = mtime
            except (OSError, MasterKeyError):
                pass  # keep the last good list; the next check tries again

    def reload(self) -> None:
        """Re-reads the file now (a ring from a file only)."""
        if self._path is not None:
            with self._lock:
                self._keys = _read_file(self._path)
                self._mtime = self._path.stat().st_mtime_ns


def _read_file(path: Path) -> tuple[MasterKey, ...]:
    try:
        text = path.read_text()
    except OSError as error:
        raise MasterKeyError(f"cannot read the master keys file {path}: {error.strerror}") from None
    return parse_master_keys(text, source=str(path))
