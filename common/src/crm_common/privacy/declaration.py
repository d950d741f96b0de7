"""How a domain event says which of its fields are personal, and whose.

One line in the event class, in the service's domain module:

    class PersonRegistered(Contact.Created):
        profile: dict[str, Any]
        personal_data = PersonalData(
            "profile.given_name", "profile.family_name", "profile.channels.*.address"
        )

A path names a field of the event, then keys of nested mappings; `*` stands
for every item of a list or every value of a mapping. The subject (whose
key encrypts them) is the aggregate by default (`originator_id`), or the
field `subject` names (`subject="contact_id"`). After an erase each personal
value reads as `REDACTED` ("[erased]"), or as the value `redacted` gives for
its path (an empty list for a list of addresses, say), so that the
aggregate's mutators still get a value of the type they expect.

This module imports nothing but the standard library: a domain module may
import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from uuid import UUID

#: The text a personal value reads as once its subject was erased.
REDACTED: Final = "[erased]"

Path = tuple[str | int, ...]


class PersonalData:
    """The personal fields of an event class and the field naming their subject."""

    __slots__ = ("_redacted", "patterns", "subject")

    def __init__(
        self,
        *paths: str,
        subject: str = "originator_id",
        redacted: Mapping[str, Any] | None = None,
    ) -> None:
        if not paths:
            raise ValueError("PersonalData needs at least one field path")
        self.patterns: tuple[tuple[str, ...], ...] = tuple(_split(p) for p in paths)
        self.subject: tuple[str, ...] = _split(subject)
        if "*" in self.subject:
            raise ValueError("the subject of personal data is one field, not a pattern")
        redacted = dict(redacted or {})
        unknown = set(redacted) - set(paths)
        if unknown:
            raise ValueError(f"redacted values for paths not declared personal: {sorted(unknown)}")
        self._redacted = {_split(p): v for p, v in redacted.items()}

    def __repr__(self) -> str:
        paths = ", ".join(repr(".".join(p)) for p in self.patterns)
        return f"PersonalData({paths}, subject={'.'.join(self.subject)!r})"

    def subject_in(self, state: Mapping[str, Any]) -> str:
        """The subject id the event's state names (a UUID in its canonical text)."""
        node: Any = state
        for segment in self.subject:
            if not isinstance(node, Mapping) or segment not in node:
                raise ValueError(f"the event has no subject field {'.'.join(self.subject)!r}")
            node = node[segment]
        if isinstance(node, UUID):
            return str(node)
        if not isinstance(node, str) or not node:
            raise ValueError(f"the subject field {'.'.join(self.subject)!r} holds no id")
        try:
            return str(UUID(node))
        except ValueError:
            return node

    def take(self, state: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[Path, Any]]]:
        """A copy of `state` with every personal value replaced by None (the
        containers on the way copied, `state` untouched), and the values taken
        with their concrete paths. None values are left where they are."""
        taken: list[tuple[Path, Any]] = []
        result: Any = dict(state)
        for pattern in self.patterns:
            result = _take(result, pattern, (), taken)
        return result, taken

    def redacted_for(self, path: Path) -> Any:
        """What the value at a concrete `path` reads as after an erase."""
        for pattern, value in self._redacted.items():
            if _matches(pattern, path):
                return value
        return REDACTED


def _split(path: str) -> tuple[str, ...]:
    segments = tuple(path.split("."))
    if not path or any(not s for s in segments):
        raise ValueError(f"{path!r} is not a field path (names separated by dots, or *)")
    return segments


def _matches(pattern: tuple[str, ...], path: Path) -> bool:
    return len(pattern) == len(path) and all(
        p == "*" or p == str(s) for p, s in zip(pattern, path, strict=True)
    )


def _take(node: Any, pattern: tuple[str, ...], prefix: Path, taken: list[tuple[Path, Any]]) -> Any:
    if not pattern:
        if node is not None:
            taken.append((prefix, node))
        return None
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        if isinstance(node, list | tuple):
            items = [_take(v, rest, (*prefix, i), taken) for i, v in enumerate(node)]
            return tuple(items) if isinstance(node, tuple) else items
        if isinstance(node, Mapping):
            return {k: _take(v, rest, (*prefix, k), taken) for k, v in node.items()}
        return node
    if isinstance(node, Mapping) and head in node:
        copy = dict(node)
        copy[head] = _take(node[head], rest, (*prefix, head), taken)
        return copy
    return node


def put(node: Any, path: Path, value: Any) -> Any:
    """`node` with `value` at the concrete `path` (containers rebuilt where
    they are tuples)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        node[head] = put(node.get(head), rest, value)
        return node
    if isinstance(node, list) and isinstance(head, int) and head < len(node):
        node[head] = put(node[head], rest, value)
        return node
    if isinstance(node, tuple) and isinstance(head, int) and head < len(node):
        items = list(node)
        items[head] = put(items[head], rest, value)
        return tuple(items)
    raise ValueError("the stored event's personal data does not fit its fields")
