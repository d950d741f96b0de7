"""Whole-event encryption, the defence in depth beside the personal fields:
every stored event and snapshot encrypted with the `eventsourcing` library's
`AESCipher` (AES-GCM of the `cryptography` package), under a key from
configuration (`CRM_EVENT_CIPHER_KEYS`, `id:base64key` entries as for master
keys, current first).

Each ciphertext starts with a marker and the id of its key, so that
- a store that held clear events before the cipher was turned on stays
  readable (mixed history: state without the marker is clear JSON, which
  never starts with a zero byte);
- rotation needs no re-encryption: a new key first encrypts what is written
  from then on, the older ones still decrypt what they encrypted.
"""

from __future__ import annotations

import base64
from pathlib import Path

from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import Cipher
from eventsourcing.utils import Environment

from crm_common.privacy.masterkeys import MasterKeyError, parse_master_keys

KEYS_VAR = "CRM_EVENT_CIPHER_KEYS"
KEYS_FILE_VAR = "CRM_EVENT_CIPHER_KEYS_FILE"
MARKER = b"\x00E1"


class StoreCipher(Cipher):
    """The library's AES-GCM cipher with a key id in front; reads clear state as is."""

    def __init__(self, environment: Environment) -> None:
        text = environment.get(KEYS_VAR) or ""
        file = environment.get(KEYS_FILE_VAR) or ""
        if not text.strip() and file.strip():
            try:
                text = Path(file.strip()).read_text()
            except OSError as error:
                raise MasterKeyError(f"cannot read {KEYS_FILE_VAR}: {error.strerror}") from None
        if not text.strip():
            raise MasterKeyError(f"{KEYS_VAR} lists no key for the event cipher")
        self._ciphers: dict[bytes, AESCipher] = {}
        self._current = b""
        for key in parse_master_keys(text, source=KEYS_VAR):
            encoded = base64.b64encode(key.secret).decode("ascii")
            cipher = AESCipher(Environment(env={AESCipher.CIPHER_KEY: encoded}))
            key_id = key.id.encode()
            self._ciphers[key_id] = cipher
            self._current = self._current or key_id

    def encrypt(self, plaintext: bytes) -> bytes:
        cipher = self._ciphers[self._current]
        return MARKER + bytes([len(self._current)]) + self._current + cipher.encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        if not ciphertext.startswith(MARKER):
            return ciphertext  # written before the cipher was turned on
        length = ciphertext[len(MARKER)]
        start = len(MARKER) + 1
        key_id = ciphertext[start : start + length]
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise MasterKeyError(
                f"a stored event is encrypted with key {key_id.decode(errors='replace')!r}, "
                f"which {KEYS_VAR} does not list"
            )
        try:
            return cipher.decrypt(ciphertext[start + length :])
        except ValueError:
            raise ValueError("a stored event failed authentication: it was altered") from None
