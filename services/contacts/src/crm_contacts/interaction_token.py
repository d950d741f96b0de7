"""Page tokens of ListInteractions: where the previous page ended (the last
interaction's occurrence and its place in the logging order), opaque to clients.

A key rather than an offset: an interaction logged while a client pages
(usually the newest, on the first page) neither repeats nor skips one."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from crm_common.errors import FieldErrors
from crm_contacts.domain.interactions import InteractionKey


def encode(key: InteractionKey) -> str:
    when, sequence = key
    raw = json.dumps([when.isoformat(), sequence], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, errors: FieldErrors) -> InteractionKey | None:
    """The key a token names; a token this service did not give is added to
    `errors` (None returned)."""
    try:
        padded = token + "=" * (-len(token) % 4)
        when, sequence = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(when, str) or not isinstance(sequence, int) or sequence < 0:
            raise ValueError(token)
        at = datetime.fromisoformat(when)
        if at.tzinfo is None:
            raise ValueError(token)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        errors.add("page_token", "is not a page token of this contact's interactions")
        return None
    return at, sequence
