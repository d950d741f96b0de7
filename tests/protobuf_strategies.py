"""Hypothesis strategies for any protobuf request message, from its descriptor:
strings of every kind (empty, long, odd unicode, numbers in text), integers at
their limits, enum numbers known and unknown, nested messages, repeated fields
and maps. Used to fuzz the gRPC APIs."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

_ODD_TEXT = [
    "1e999999", "-1e999999", "NaN", "Infinity", "0", "-1", "12.345", " eur ", "ANG", "EUR",
    "2026-02-30", "not-a-uuid", "00000000-0000-0000-0000-000000000000", "a" * 300,
    "\u0000", "\u202e", "'; DROP TABLE x;--", "ada@example.com", "+41 44 668 18 00",
]  # fmt: skip

_TEXT = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.sampled_from(_ODD_TEXT),
    # Long values without the cost of drawing each character.
    st.tuples(st.sampled_from("xé😀"), st.integers(1000, 100_000)).map(lambda p: p[0] * p[1]),
)

_INT = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    return _INT[field.type]


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type with any subset of their fields set."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            fields[field.name] = st.dictionaries(
                _scalar(key, depth), _scalar(value, depth), max_size=3
            )
        elif field.is_repeated:
            fields[field.name] = st.lists(_scalar(field, depth), max_size=3)
        else:
            fields[field.name] = _scalar(field, depth)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for name in draw(st.sets(st.sampled_from(sorted(fields)) if fields else st.nothing())):
            value = draw(fields[name])
            field = descriptor.fields_by_name[name]
            try:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    target = getattr(message, name)
                    for k, v in value.items():
                        if isinstance(v, Message):
                            target[k].CopyFrom(v)
                        else:
                            target[k] = v
                elif field.is_repeated:
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        getattr(message, name).extend(value)
                    else:
                        getattr(message, name).extend(value)
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(message, name).CopyFrom(value)
                else:
                    setattr(message, name, value)
            except (ValueError, TypeError):
                # A value the runtime itself refuses (an unknown closed-enum number in a
                # map, a lone surrogate): the wire could never carry it either.
                continue
        return message

    return build()
