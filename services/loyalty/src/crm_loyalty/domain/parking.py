"""`ParkedOrders`: ERP order messages that could not be applied yet.

An order for a customer the platform does not know yet, or a return that
arrived before its order, is stored here (never dropped) and retried until it
applies; then it is unparked. One aggregate holds them all: the store orders
the parking and unparking of concurrent consumers.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

PARKING_ID = uuid.uuid5(uuid.UUID("0c5f3e4a-51d2-4a8e-9d5b-7d2a6c1b9e10"), "parked-orders")


class ParkedOrders(Aggregate):
    class Created(Aggregate.Created):
        customer_id: str
        at: datetime

    class Parked(Aggregate.Event):
        customer_id: str
        key: str
        kind: str
        payload: str
        reason: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.entries[self.key] = {
                "customer_ref": self.customer_id,
                "kind": self.kind,
                "payload": self.payload,
                "reason": self.reason,
                "parked_at": self.at.isoformat(),
            }

    class Unparked(Aggregate.Event):
        customer_id: str
        key: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.entries.pop(self.key, None)

    def __init__(self, customer_id: str, at: datetime) -> None:
        self.entries: dict[str, dict[str, str]] = {}

    @staticmethod
    def create_id(*_: Any, **__: Any) -> uuid.UUID:
        return PARKING_ID

    def park(
        self, key: str, customer_ref: str, kind: str, payload: str, reason: str, at: datetime
    ) -> bool:
        """False when `key` is parked already (a redelivery)."""
        if key in self.entries:
            return False
        self.trigger_event(
            self.Parked,
            customer_id=customer_ref,
            key=key,
            kind=kind,
            payload=payload,
            reason=reason,
            at=at,
        )
        return True

    def unpark(self, key: str, at: datetime) -> bool:
        entry = self.entries.get(key)
        if entry is None:
            return False
        self.trigger_event(self.Unparked, customer_id=entry["customer_ref"], key=key, at=at)
        return True
