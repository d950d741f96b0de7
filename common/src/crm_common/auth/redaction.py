"""Leaving out what a caller may not see, and pseudonyms for personal data.

Paths are dotted through nested objects and lists alike: `deals.amount`
reaches the `amount` of every deal of a document, or of every element of a
repeated `deals` field of a protobuf message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def redact(document: Any, paths: Iterable[str]) -> Any:
    """Removes every path from a JSON-like document (in place) and returns it."""
    for path in paths:
        _drop(document, path.split("."))
    return document


def _drop(node: Any, parts: list[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _drop(item, parts)
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    if head not in node:
        return
    if rest:
        _drop(node[head], rest)
    else:
        del node[head]


def redact_message(message: M, paths: Iterable[str]) -> M:
    """Clears every path of a protobuf message (in place) and returns it."""
    for path in paths:
        _clear(message, path.split("."))
    return message


def _clear(message: Message, parts: list[str]) -> None:
    head, rest = parts[0], parts[1:]
    if head not in message.DESCRIPTOR.fields_by_name:
        return
    if not rest:
        message.ClearField(head)
        return
    value = getattr(message, head)
    descriptor = message.DESCRIPTOR.fields_by_name[head]
    if descriptor.is_repeated:
        for item in value:
            if isinstance(item, Message):
                _clear(item, rest)
    elif isinstance(value, Message) and message.HasField(head):
        _clear(value, rest)


def pseudonym(value: str, key: bytes) -> str:
    """A stable stand-in for a personal value: equal values stay equal (counting and
    joining still work), the value cannot be read back without the key."""
    if not value:
        return value
    digest = hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]
    return f"pseudonym:{digest}"


def pseudonymise(document: Any, paths: Iterable[str], key: bytes) -> Any:
    """Replaces the text at every path of a JSON-like document by its pseudonym."""
    for path in paths:
        _replace(document, path.split("."), key)
    return document


def _replace(node: Any, parts: list[str], key: bytes) -> None:
    if isinstance(node, list):
        for item in node:
            _replace(item, parts, key)
        return
    if not isinstance(node, dict) or parts[0] not in node:
        return
    if len(parts) > 1:
        _replace(node[parts[0]], parts[1:], key)
    elif isinstance(node[parts[0]], str):
        node[parts[0]] = pseudonym(node[parts[0]], key)
    elif isinstance(node[parts[0]], list):
        node[parts[0]] = [pseudonym(v, key) if isinstance(v, str) else v for v in node[parts[0]]]


def pseudonymise_message(message: M, paths: Iterable[str], key: bytes) -> M:
    """Replaces the string at every path of a protobuf message by its pseudonym."""
    for path in paths:
        _replace_message(message, path.split("."), key)
    return message


def _replace_message(message: Message, parts: list[str], key: bytes) -> None:
    head, rest = parts[0], parts[1:]
    descriptor = message.DESCRIPTOR.fields_by_name.get(head)
    if descriptor is None:
        return
    value = getattr(message, head)
    repeated = descriptor.is_repeated
    if rest:
        for item in value if repeated else [value]:
            if isinstance(item, Message):
                _replace_message(item, rest, key)
    elif repeated and descriptor.type == descriptor.TYPE_STRING:
        replaced = [pseudonym(v, key) for v in value]
        del value[:]
        value.extend(replaced)
    elif descriptor.type == descriptor.TYPE_STRING:
        setattr(message, head, pseudonym(value, key))
