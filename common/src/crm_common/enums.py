"""Protobuf enums as the lower-case words the domain, REST and documents use.

One mapping for every service, with one spelling of "unset": the zero value
(`<PREFIX>_UNSPECIFIED`) is `None`, and `None` (or an empty word) is zero.
`LIFECYCLE_STAGE_CUSTOMER` <-> `"customer"`. A number the stubs do not know
(a newer producer) becomes its digits, so a validator can refuse it naming
the field, and the digits map back to the same number.
"""

from __future__ import annotations

import functools
from typing import Any

# A generated enum wrapper: each enum is its own type in the stubs.
ProtoEnum = Any


@functools.cache
def _prefix(enum: ProtoEnum) -> str:
    # The zero value of every enum in proto/ is <PREFIX>_UNSPECIFIED (buf lint enforces it).
    zero: str = enum.Name(0)
    return zero.removesuffix("UNSPECIFIED")


@functools.cache
def _number_of(enum: ProtoEnum, word: str) -> int:
    return int(enum.Value(_prefix(enum) + word.upper()))


def enum_word(enum: ProtoEnum, number: int) -> str | None:
    """The word of an enum number; None for the unset zero value."""
    if number == 0:
        return None
    try:
        name: str = enum.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix(_prefix(enum)).lower()


def enum_number(enum: ProtoEnum, word: str | None) -> Any:
    """The number of a word; 0 for None or an empty word.

    Raises ValueError for a word the enum does not know. Typed Any: the
    number fits the field of whichever enum was asked for.
    """
    if not word:
        return 0
    if word.isdigit():
        return int(word)
    return _number_of(enum, word)


def enum_words(enum: ProtoEnum) -> tuple[str, ...]:
    """Every word of an enum, unset excluded, in declaration order."""
    return tuple(w for n in enum.values() if n and (w := enum_word(enum, n)) is not None)
