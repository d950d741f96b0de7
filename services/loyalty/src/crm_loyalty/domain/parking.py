"""`ParkedOrders`: ERP order messages that could not be applied yet.

An order for a customer the platform does not know yet, or a return that
arrived before its order, is stored here (never dropped) and retried until it
applies; then it is unparked. One that does not apply within the parking
limit, or can never apply as sent (refused, undecodable), is dead-lettered:
published to the dead-letter topic with the reason and kept here, marked, until
an operator re-drives it (it is then retried again from a fresh start). One
aggregate holds them all: the store orders the changes of concurrent consumers.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import NotFound

PARKED = "parked"
DEAD_LETTERED = "dead_lettered"
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
        #: The inbound record it was read from (partition, offset + 1); 0: unknown.
        source_partition: int = 0
        source_position: int = 0
        #: The record's Kafka headers as JSON ([[name, base64 value], ...]); "" unknown.
        headers: str = ""

        def apply(self, aggregate: Any) -> None:
            aggregate.entries[self.key] = {
                "customer_ref": self.customer_id,
                "kind": self.kind,
                "payload": self.payload,
                "reason": self.reason,
                "parked_at": self.at.isoformat(),
                "source_partition": str(self.source_partition),
                "source_position": str(self.source_position),
                "state": PARKED,
                "dead_lettered_at": "",
                "headers": self.headers,
            }

    class DeadLettered(Aggregate.Event):
        customer_id: str
        key: str
        reason: str
        topic: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            entry = aggregate.entries.get(self.key)
            if entry is not None:
                entry["state"] = DEAD_LETTERED
                entry["reason"] = self.reason
                entry["dead_lettered_at"] = self.at.isoformat()

    class Redriven(Aggregate.Event):
        customer_id: str
        key: str
        by: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            entry = aggregate.entries.get(self.key)
            if entry is not None:
                entry["state"] = PARKED
                entry["parked_at"] = self.at.isoformat()
                entry["dead_lettered_at"] = ""
                entry["reason"] = f"re-driven by {self.by}; was: {entry['reason']}"

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
        self,
        key: str,
        customer_ref: str,
        kind: str,
        payload: str,
        reason: str,
        at: datetime,
        source: tuple[int, int] = (0, 0),
        headers: str = "",
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
            source_partition=source[0],
            source_position=source[1],
            headers=headers,
        )
        return True

    def dead_letter(self, key: str, reason: str, topic: str, at: datetime) -> bool:
        """Marks a parked entry as published to the dead-letter topic; False when it
        is not parked (gone, or dead-lettered already)."""
        entry = self.entries.get(key)
        if entry is None or entry.get("state", PARKED) != PARKED:
            return False
        self.trigger_event(
            self.DeadLettered,
            customer_id=entry["customer_ref"],
            key=key,
            reason=reason,
            topic=topic,
            at=at,
        )
        return True

    def redrive(self, key: str, by: str, at: datetime) -> bool:
        """A dead-lettered entry parked again, its limit counted afresh; False when
        it is not dead-lettered."""
        entry = self.entries.get(key)
        if entry is None:
            raise NotFound("ParkedOrder", key)
        if entry.get("state", PARKED) != DEAD_LETTERED:
            return False
        self.trigger_event(self.Redriven, customer_id=entry["customer_ref"], key=key, by=by, at=at)
        return True

    def unpark(self, key: str, at: datetime) -> bool:
        entry = self.entries.get(key)
        if entry is None:
            return False
        self.trigger_event(self.Unparked, customer_id=entry["customer_ref"], key=key, at=at)
        return True
