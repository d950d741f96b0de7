"""Personal fields of published messages, sealed and opened by their mark.

A field of a protobuf message is personal when the contract marks it
`[(crm.privacy.v1.personal) = true]` (proto/crm/privacy/v1/privacy.proto).
The relays seal every such field that is set, in the message and in every
message nested in it (repeated and map values included), as one token each
under the data key of the event's subject (`PersonalDataCipher`), before
the message goes on a topic. A consumer allowed to read the owner's keys
opens them again; a token of an erased subject opens as `"[erased]"`.

Which fields are personal is read from the descriptors once per message
type, so the contract is the one place that says it, for the relays, the
consumers and the AsyncAPI document alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from crm.privacy.v1 import privacy_pb2
from crm_common.privacy.client import SubjectErased
from crm_common.privacy.declaration import REDACTED
from crm_common.privacy.tokens import VERSION, PersonalDataCipher

TOKEN_PREFIX = f"{VERSION}."


def is_personal(field: FieldDescriptor) -> bool:
    """Whether the contract marks `field` as personal data."""
    options = field.GetOptions()
    return bool(options.Extensions[privacy_pb2.personal])


def _target(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    target = field.message_type
    if target is None:
        raise TypeError(f"{field.full_name} is not a message field")
    return target


@cache
def _plan(descriptor: Descriptor) -> tuple[tuple[str, str], ...]:
    """(field name, how) for the fields of `descriptor` that are or may hold
    personal data: "text", "texts" (repeated), "message", "messages"
    (repeated) or "map" (a map with message values)."""
    steps: list[tuple[str, str]] = []
    for field in descriptor.fields:
        repeated = field.is_repeated
        if is_personal(field):
            if field.type != FieldDescriptor.TYPE_STRING:
                # A sealed value is text: a number, a message or a map marked
                # personal could not be published sealed. Refuse the contract.
                raise TypeError(f"{field.full_name} is marked personal but is not a string field")
            steps.append((field.name, "texts" if repeated else "text"))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target = _target(field)
            if target.GetOptions().map_entry:
                value = target.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_MESSAGE and _plan(_target(value)):
                    steps.append((field.name, "map"))
            elif _plan(target):
                steps.append((field.name, "messages" if repeated else "message"))
    return tuple(steps)


def personal_paths(descriptor: Descriptor, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the personal fields reachable from `descriptor`
    (`*` for every item of a list or value of a map), for documentation."""
    for name, how in _plan(descriptor):
        field = descriptor.fields_by_name[name]
        path = f"{prefix}{name}"
        if how == "text":
            yield path
        elif how == "texts":
            yield f"{path}.*"
        elif how == "message":
            yield from personal_paths(_target(field), f"{path}.")
        elif how == "messages":
            yield from personal_paths(_target(field), f"{path}.*.")
        else:
            value = _target(field).fields_by_name["value"]
            yield from personal_paths(_target(value), f"{path}.*.")


def _walk(message: Message, change: Callable[[str], str]) -> int:
    """Applies `change` to every non-empty personal text in `message`; the count."""
    changed = 0
    for name, how in _plan(message.DESCRIPTOR):
        if how == "text":
            value = getattr(message, name)
            if value:
                setattr(message, name, change(value))
                changed += 1
        elif how == "texts":
            values = getattr(message, name)
            for index, value in enumerate(values):
                if value:
                    values[index] = change(value)
                    changed += 1
        elif how == "message":
            if message.HasField(name):
                changed += _walk(getattr(message, name), change)
        elif how == "messages":
            for item in getattr(message, name):
                changed += _walk(item, change)
        else:
            for item in getattr(message, name).values():
                changed += _walk(item, change)
    return changed


def has_personal_fields(descriptor: Descriptor) -> bool:
    """Whether messages of this type can carry personal data at all."""
    return bool(_plan(descriptor))


def seal_message(message: Message, subject: str, cipher: PersonalDataCipher) -> int:
    """Seals, in place, every personal text of `message` under `subject`'s key;
    returns how many. Texts already sealed, and the redaction marker of an
    erased subject, are left as they are; any other text of an erased
    subject (stored before encryption was on) is published as the marker."""

    def seal(value: str) -> str:
        if value.startswith(TOKEN_PREFIX) or value == REDACTED:
            return value
        try:
            return cipher.encrypt(subject, value)
        except SubjectErased:
            return REDACTED

    return _walk(message, seal)


def open_message(
    message: Message, cipher: PersonalDataCipher, purpose: str = "consume events"
) -> int:
    """Opens, in place, every sealed personal text of `message` (an erased
    subject's as `"[erased]"`); clear texts (published before sealing) stay.
    Returns how many tokens were opened."""
    opened_count = 0

    def open_(value: str) -> str:
        nonlocal opened_count
        if not value.startswith(TOKEN_PREFIX):
            return value
        opened_count += 1
        opened: Any = cipher.decrypt(value, purpose)
        return opened if isinstance(opened, str) else str(opened)

    _walk(message, open_)
    return opened_count


def sealed_texts(message: Message) -> list[str]:
    """The personal texts of `message` as they are (for tests and checks)."""
    found: list[str] = []

    def note(value: str) -> str:
        found.append(value)
        return value

    _walk(message, note)
    return found
