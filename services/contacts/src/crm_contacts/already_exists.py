"""Refusals because something alike already exists: a create refused as a likely
duplicate (`CRM_CONTACTS_DUPLICATES_ON_CREATE=refuse`), a value of a unique
custom field another contact holds.

Both are `crm_common.errors.AlreadyExists`: gRPC ALREADY_EXISTS (an `ErrorInfo`
with the reason, and a `ResourceInfo` per contact in the way) and HTTP 409
with the contacts named in the body.
"""

from __future__ import annotations

from collections.abc import Sequence

from crm_common.errors import AlreadyExists, InTheWay
from crm_contacts.views import PossibleDuplicate

#: ErrorInfo reasons.
POSSIBLE_DUPLICATES = "POSSIBLE_DUPLICATES"
UNIQUE_VALUE_TAKEN = "UNIQUE_VALUE_TAKEN"


class LikelyDuplicate(AlreadyExists):
    """A create refused because existing contacts look like the new one
    (`allow_duplicate` creates it anyway)."""

    reason = POSSIBLE_DUPLICATES

    def __init__(self, candidates: Sequence[PossibleDuplicate]) -> None:
        self.candidates = tuple(candidates)
        named = ", ".join(
            f"{c.contact_id} ({c.reasons[0].detail if c.reasons else 'alike'})"
            for c in self.candidates[:5]
        )
        more = len(self.candidates) - 5
        super().__init__(
            f"{len(self.candidates)} existing contact(s) look like this one: {named}"
            + (f" and {more} more" if more > 0 else "")
            + "; check them, or create anyway with allow_duplicate"
        )

    def metadata(self) -> dict[str, str]:
        return {"contact_ids": ",".join(c.contact_id for c in self.candidates)}

    def in_the_way(self) -> list[InTheWay]:
        return [
            InTheWay(
                "Contact",
                c.contact_id,
                f"score {c.score:.2f}: " + "; ".join(r.detail for r in c.reasons),
            )
            for c in self.candidates
        ]

    def body(self) -> dict[str, object]:
        return {
            **super().body(),
            "possible_duplicates": [c.to_dict() for c in self.candidates],
        }


class UniqueValueTaken(AlreadyExists):
    """A value of a unique custom field that another live contact holds."""

    reason = UNIQUE_VALUE_TAKEN

    def __init__(self, field: str, holder: str) -> None:
        self.field = field
        self.holder = holder
        super().__init__(
            f"custom field {field!r} is unique and contact {holder} holds this value already"
        )

    def metadata(self) -> dict[str, str]:
        return {"field": self.field, "contact_id": self.holder}

    def in_the_way(self) -> list[InTheWay]:
        return [InTheWay("Contact", self.holder, f"holds the value of custom field {self.field!r}")]

    def body(self) -> dict[str, object]:
        return {
            **super().body(),
            "field": f"custom_fields.{self.field}",
            "contact_id": self.holder,
        }
