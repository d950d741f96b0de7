"""The ledger by lot: pure rules over a member's lots, no events, no storage.

Each earning is a `Lot` with its own expiry. Points leave a lot by being
spent, expired or cancelled (an order returned); a lot may be locked (an
order's return window) and then counts as locked, not spendable. For every
lot `earned == remaining + spent + expired + cancelled` and no figure is ever
negative, so the balance (the sums over the lots) never is either.

A merge of contacts moves a member's lots to the survivor's member whole
(`held_by`, `moved`): each lot counts in one balance only.

Spending takes the lots that expire first (ties: the older lot first).
`allocate` decides which lots give how much and refuses, before anything
changes, when the spendable points do not cover the amount.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from crm_common.errors import RuleViolated


class InsufficientPoints(RuleViolated):
    """A redemption or deduction above the available balance: nothing changed."""


@dataclass
class Lot:
    """One earning and what became of its points."""

    lot_id: str
    seq: int
    earned: int
    earned_at: datetime
    expires_at: datetime
    locked_until: datetime | None
    order_id: str
    rule_version: int
    reason: str
    #: Points per order line (what a return of those lines cancels).
    lines: dict[str, int]
    #: Money spent per line (decimal text) and its currency; empty when not known.
    spend: dict[str, str] = field(default_factory=dict)
    currency: str = ""
    remaining: int = 0
    spent: int = 0
    expired: int = 0
    cancelled: int = 0
    #: The contact whose member holds the lot now (a merge moved it there, or an
    #: undone merge moved it back): "" while it is this member's. A lot held
    #: elsewhere counts here as `moved` whole (its figures went with it).
    held_by: str = ""
    moved: int = 0
    #: The contact a command named when it earned this lot for the member it was
    #: merged into ("" for the member's own): what an undone merge gives back.
    via: str = ""

    @property
    def locked(self) -> bool:
        return self.locked_until is not None

    def spendable(self, at: datetime) -> int:
        if self.locked or self.expires_at <= at:
            return 0
        return self.remaining

    def check(self) -> None:
        """The lot's invariant (an assertion: breaking it is a bug, not a refusal)."""
        parts = (self.remaining, self.spent, self.expired, self.cancelled, self.moved)
        assert min(parts) >= 0, f"negative figure in lot {self.lot_id}: {parts}"
        assert sum(parts) == self.earned, f"lot {self.lot_id} does not add up: {parts}"


@dataclass(frozen=True)
class Balance:
    active: int = 0
    locked: int = 0
    expired: int = 0
    spent: int = 0
    cancelled: int = 0

    @property
    def earned(self) -> int:
        return self.active + self.locked + self.expired + self.spent + self.cancelled


def balance_of(lots: Iterable[Lot]) -> Balance:
    """The balance by state: always the sums over the lots."""
    active = locked = expired = spent = cancelled = 0
    for lot in lots:
        if lot.locked:
            locked += lot.remaining
        else:
            active += lot.remaining
        expired += lot.expired
        spent += lot.spent
        cancelled += lot.cancelled
    return Balance(active, locked, expired, spent, cancelled)


def spend_order(lots: Iterable[Lot], at: datetime) -> list[Lot]:
    """The spendable lots in the order spending takes them: first to expire first."""
    return sorted(
        (lot for lot in lots if lot.spendable(at) > 0), key=lambda lot: (lot.expires_at, lot.seq)
    )


def available(lots: Iterable[Lot], at: datetime) -> int:
    return sum(lot.spendable(at) for lot in lots)


def allocate(lots: Iterable[Lot], points: int, at: datetime) -> dict[str, int]:
    """Which lots give how many of `points`; InsufficientPoints when they cannot."""
    if points <= 0:
        raise RuleViolated("points to take must be positive")
    candidates = spend_order(lots, at)
    have = sum(lot.spendable(at) for lot in candidates)
    if have < points:
        raise InsufficientPoints(f"{points} points asked, {have} available")
    taken: dict[str, int] = {}
    left = points
    for lot in candidates:
        if left == 0:
            break
        take = min(left, lot.spendable(at))
        taken[lot.lot_id] = take
        left -= take
    return taken


def take(lots: Mapping[str, Lot], allocation: Mapping[str, int], into: str) -> None:
    """Moves allocated points from `remaining` to `spent`, `expired` or `cancelled`."""
    for lot_id, points in allocation.items():
        lot = lots[lot_id]
        lot.remaining -= points
        setattr(lot, into, getattr(lot, into) + points)
        lot.check()


def due_for_expiry(lots: Iterable[Lot], at: datetime) -> dict[str, int]:
    """Unlocked lots past their expiry that still hold points."""
    return {
        lot.lot_id: lot.remaining
        for lot in sorted(lots, key=lambda lot: (lot.expires_at, lot.seq))
        if not lot.locked and lot.remaining > 0 and lot.expires_at <= at
    }


def due_for_release(lots: Iterable[Lot], at: datetime) -> dict[str, int]:
    """Locked lots whose return window has ended."""
    return {
        lot.lot_id: lot.remaining
        for lot in lots
        if lot.locked_until is not None and lot.locked_until <= at
    }
