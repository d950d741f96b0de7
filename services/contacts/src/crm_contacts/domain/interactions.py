"""Interactions with a contact: calls, mails, chats, meetings, visits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from crm_contacts.domain.channels import Channel


class InteractionKind(StrEnum):
    CALL = "call"
    MAIL = "mail"
    CHAT = "chat"
    MEETING = "meeting"
    VISIT = "visit"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True)
class Interaction:
    interaction_id: str
    kind: InteractionKind
    direction: Direction | None
    channel: Channel | None
    summary: str
    occurred_at: datetime
    owner: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "interaction_id": self.interaction_id,
            "kind": str(self.kind),
            "direction": None if self.direction is None else str(self.direction),
            "channel": None if self.channel is None else str(self.channel),
            "summary": self.summary,
            "occurred_at": self.occurred_at,
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Interaction:
        direction = data.get("direction")
        channel = data.get("channel")
        return cls(
            data["interaction_id"],
            InteractionKind(data["kind"]),
            None if direction is None else Direction(direction),
            None if channel is None else Channel(channel),
            data["summary"],
            data["occurred_at"],
            data.get("owner", ""),
        )


def most_recent(interactions: list[Interaction], limit: int) -> list[Interaction]:
    """Newest first by occurrence; equal times in the order they were logged."""
    ordered = sorted(enumerate(interactions), key=lambda p: (p[1].occurred_at, p[0]), reverse=True)
    return [i for _, i in ordered[:limit]]


#: Where a page of interactions ends: the last one's occurrence and its place
#: in the order the contact's interactions were logged.
InteractionKey = tuple[datetime, int]


def newest_after(
    interactions: list[Interaction], after: InteractionKey | None, limit: int
) -> list[tuple[InteractionKey, Interaction]]:
    """Up to `limit` interactions in `most_recent`'s order, from just past `after`
    (None: from the newest). Keyed by occurrence and logging order rather than an
    offset, so an interaction logged between two pages does not repeat one."""
    keyed = [((i.occurred_at, n), i) for n, i in enumerate(interactions)]
    if after is not None:
        keyed = [(k, i) for k, i in keyed if k < after]
    keyed.sort(key=lambda p: p[0], reverse=True)
    return keyed[:limit]
