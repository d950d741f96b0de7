"""Whose a lead, deal or activity is, when contacts merges or erases people.

When contacts merges contacts into a survivor, every lead, deal and activity
naming a merged contact (as its customer, person or company) is moved to the
survivor by a `CustomerMoved` event of its own; undoing the merge moves back
exactly the fields that merge moved, whatever happened to the record since
(a deal won meanwhile stays won). Each aggregate keeps its moves
(`customer_moves`) so that an undo knows what to give back and a repeated
move or undo changes nothing.

The functions here are shared by the three aggregates; each declares its own
`CustomerMoved` event class (the stored topic names the aggregate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crm_pipeline.domain.values import check_aware

#: Which fields of each kind of aggregate hold a contact id.
CUSTOMER_FIELDS = ("customer_id", "person_id", "company_id")


@dataclass(frozen=True)
class Move:
    """One move to apply: `fields` held `from_id` and will hold `to_id`."""

    from_id: str
    to_id: str
    fields: tuple[str, ...]


def moves_of(aggregate: Any) -> list[dict[str, Any]]:
    """The moves an aggregate went through (empty for one stored before merges)."""
    moves: list[dict[str, Any]] = getattr(aggregate, "customer_moves", None) or []
    return moves


def moves_for_merge(
    aggregate: Any, fields: Sequence[str], merged: Sequence[str], to_id: str, merge_id: str
) -> list[Move]:
    """The moves a merge of `merged` into `to_id` asks of the aggregate: the
    fields holding a merged id, unless this merge already moved them."""
    done = {m["from"] for m in moves_of(aggregate) if m["merge_id"] == merge_id}
    result = []
    for from_id in dict.fromkeys(merged):
        if not from_id or from_id == to_id or from_id in done:
            continue
        holding = tuple(f for f in fields if getattr(aggregate, f) == from_id)
        if holding:
            result.append(Move(from_id, to_id, holding))
    return result


def moves_to_undo(
    aggregate: Any, merge_id: str, restored: Sequence[str] | None = None
) -> list[Move]:
    """The moves that give back what merge `merge_id` moved (and is not undone
    yet), of the contacts `restored` (all of them when None): the fields it
    moved that still hold the survivor."""
    result = []
    for move in moves_of(aggregate):
        if move["merge_id"] != merge_id or move["undone"]:
            continue
        if restored is not None and move["from"] not in restored:
            continue
        holding = tuple(f for f in move["fields"] if getattr(aggregate, f) == move["to"])
        result.append(Move(move["to"], move["from"], holding))
    return result


def customer_after(aggregate: Any, move: Move) -> str:
    """The aggregate's `customer_id` once `move` is applied."""
    if "customer_id" in move.fields:
        return move.to_id
    return str(aggregate.customer_id)


def apply_move(aggregate: Any, event: Any) -> None:
    """What a `CustomerMoved` event does to its aggregate."""
    for name in event.fields:
        setattr(aggregate, name, event.to_customer_id)
    moves = list(moves_of(aggregate))
    if event.undone:
        moves = [
            {**m, "undone": True}
            if (m["merge_id"], m["from"], m["to"])
            == (event.merge_id, event.to_customer_id, event.from_customer_id)
            else m
            for m in moves
        ]
    else:
        moves.append(
            {
                "merge_id": event.merge_id,
                "from": event.from_customer_id,
                "to": event.to_customer_id,
                "fields": list(event.fields),
                "undone": False,
            }
        )
    aggregate.customer_moves = moves


def move_customers(
    aggregate: Any,
    fields: Sequence[str],
    merged: Sequence[str],
    to_id: str,
    merge_id: str,
    at: datetime,
) -> int:
    """Moves the aggregate's fields holding a merged id to `to_id` (one
    `CustomerMoved` per merged id); returns how many events it triggered."""
    moves = moves_for_merge(aggregate, fields, merged, to_id, merge_id)
    for move in moves:
        _trigger(aggregate, move, merge_id, False, at)
    return len(moves)


def undo_customer_moves(
    aggregate: Any, merge_id: str, at: datetime, restored: Sequence[str] | None = None
) -> int:
    """Gives back what merge `merge_id` moved of the contacts `restored` (all when
    None); returns how many events it triggered."""
    moves = [m for m in moves_to_undo(aggregate, merge_id, restored) if m.fields]
    for move in moves:
        _trigger(aggregate, move, merge_id, True, at)
    return len(moves)


def _trigger(aggregate: Any, move: Move, merge_id: str, undone: bool, at: datetime) -> None:
    check_aware("at", at)
    aggregate.trigger_event(
        aggregate.CustomerMoved,
        customer_id=customer_after(aggregate, move),
        from_customer_id=move.from_id,
        to_customer_id=move.to_id,
        merge_id=merge_id,
        undone=undone,
        fields=list(move.fields),
        at=at,
    )
