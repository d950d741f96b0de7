"""Personal values as tokens: AES-256-GCM under the subject's data key.

A token is text, `pd1.<subject>.<base64url(nonce | ciphertext | tag)>`:
the format version, the key id (the subject: one key per subject), a 96-bit
random nonce and the authenticated ciphertext. The subject is also the
associated data, so a ciphertext moved under another subject's name does not
decrypt. A token never contains the clear value.

Decrypting a token of an erased subject (its key destroyed) gives
`REDACTED`, the text `"[erased]"`, never an error; a token that was altered
or is not a token raises `InvalidToken`, whose message names neither the
value nor the key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any, Final

from cryptography.exceptions import InvalidTag

from crm_common.privacy.client import ERASED, DataKey, KeyClient
from crm_common.privacy.declaration import REDACTED

VERSION: Final = "pd1"
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16


class InvalidToken(ValueError):
    """A token that is malformed, altered, or sealed under another subject."""


def _aad(subject: str) -> bytes:
    return f"{VERSION}|{subject}".encode()


def check_subject(subject: str) -> str:
    if not subject or any(c.isspace() or c == "." for c in subject) or len(subject) > 200:
        raise ValueError("a subject id is 1 to 200 characters without spaces or dots")
    return subject


def seal(key: DataKey, plaintext: bytes) -> str:
    """`plaintext` as a token under `key`."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = key.aead.encrypt(nonce, plaintext, _aad(key.subject))
    body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
    return f"{VERSION}.{key.subject}.{body}"


def parse(token: str) -> tuple[str, bytes]:
    """(subject, nonce | ciphertext | tag) of a well-formed token."""
    if not isinstance(token, str):
        raise InvalidToken("not a personal data token")
    version, _, rest = token.partition(".")
    subject, _, body = rest.rpartition(".")
    if version != VERSION or not subject or not body:
        raise InvalidToken("not a personal data token (expected pd1.<subject>.<data>)")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken(f"the personal data token of {subject} is damaged") from None
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise InvalidToken(f"the personal data token of {subject} is too short")
    return subject, raw


def subject_of(token: str) -> str:
    return parse(token)[0]


def unseal(key: DataKey, token: str) -> bytes:
    """The plaintext of a token sealed under `key`; `InvalidToken` if altered."""
    subject, raw = parse(token)
    if subject != key.subject:
        raise InvalidToken(f"a personal data token of {subject} is not one of {key.subject}")
    try:
        return key.aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(subject))
    except InvalidTag:
        raise InvalidToken(
            f"the personal data token of {subject} failed authentication: it was altered"
        ) from None


class PersonalDataCipher:
    """Encrypts and decrypts single personal values (text or anything JSON
    can hold) for a subject, with the keys of one `KeyClient`."""

    def __init__(self, keys: KeyClient) -> None:
        self.keys = keys

    def encrypt(self, subject: str, value: Any) -> str:
        """`value` as a token (owner only: it may create the subject's key)."""
        key = self.keys.key_for_writing(check_subject(subject))
        plaintext = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        return seal(key, plaintext)

    def decrypt(self, token: str, purpose: str = "read") -> Any:
        """The value of a token, or `REDACTED` when its subject was erased."""
        subject = subject_of(token)
        key = self.keys.key_for_reading(subject, purpose)
        if key is ERASED or not isinstance(key, DataKey):
            return REDACTED
        return json.loads(unseal(key, token))
