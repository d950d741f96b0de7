"""`Reward`: one entry of the rewards catalogue, with its price in points and its stock.

A redemption reserves one unit of stock here and spends the price from the
member's lots in the same decision (one save of both aggregates, each
version-checked): two redemptions racing on the last unit, or on one member's
points, cannot both succeed. A reward is named by its code, chosen when it is
defined (`coffee-mug`); the catalogue never forgets a code, a retired reward
stays visible and can no longer be redeemed or restocked.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated

REWARD_NAMESPACE = uuid.UUID("1d7b9f0e-6a43-4c2e-8b5d-3f9e2a71c4d8")


class OutOfStock(RuleViolated):
    """The reward has no unit left: nothing changed."""


def reward_id(code: str) -> uuid.UUID:
    return uuid.uuid5(REWARD_NAMESPACE, code)


class Reward(Aggregate):
    class Defined(Aggregate.Created):
        customer_id: str
        code: str
        name: str
        points: int
        stock: int
        valid_from: datetime | None
        valid_until: datetime | None
        at: datetime

    class Restocked(Aggregate.Event):
        customer_id: str
        code: str
        quantity: int
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.stock += self.quantity

    class Retired(Aggregate.Event):
        customer_id: str
        code: str
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.retired = True

    class Reserved(Aggregate.Event):
        """One unit taken by a redemption of member `contact_id` for `points`."""

        customer_id: str
        code: str
        contact_id: str
        redemption_id: str
        points: int
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.stock -= 1
            aggregate.reserved += 1

    def __init__(
        self,
        customer_id: str,
        code: str,
        name: str,
        points: int,
        stock: int,
        valid_from: datetime | None,
        valid_until: datetime | None,
        at: datetime,
    ) -> None:
        self.code = code
        self.name = name
        self.points = points
        self.stock = stock
        self.valid_from = valid_from
        self.valid_until = valid_until
        self.defined_at = at
        self.retired = False
        self.reserved = 0

    @staticmethod
    def create_id(code: str, **_: Any) -> uuid.UUID:
        return reward_id(code)

    @classmethod
    def define(
        cls,
        code: str,
        name: str,
        points: int,
        stock: int,
        valid_from: datetime | None,
        valid_until: datetime | None,
        at: datetime,
    ) -> Reward:
        if points <= 0:
            raise RuleViolated("a reward's price must be a positive number of points")
        if stock < 0:
            raise RuleViolated("stock cannot be negative")
        if valid_from and valid_until and valid_until <= valid_from:
            raise RuleViolated("valid_until must be after valid_from")
        return cls._create(
            cls.Defined,
            id=reward_id(code),
            customer_id="",
            code=code,
            name=name,
            points=points,
            stock=stock,
            valid_from=valid_from,
            valid_until=valid_until,
            at=at,
        )

    def available(self, at: datetime) -> bool:
        if self.retired:
            return False
        if self.valid_from is not None and at < self.valid_from:
            return False
        return self.valid_until is None or at < self.valid_until

    def restock(self, quantity: int, at: datetime) -> None:
        if self.retired:
            raise RuleViolated(f"reward {self.code!r} is retired")
        if quantity <= 0:
            raise RuleViolated("restock by a positive quantity")
        self.trigger_event(self.Restocked, customer_id="", code=self.code, quantity=quantity, at=at)

    def retire(self, at: datetime) -> bool:
        """False when it was retired already (nothing happens)."""
        if self.retired:
            return False
        self.trigger_event(self.Retired, customer_id="", code=self.code, at=at)
        return True

    def reserve(self, contact_id: str, redemption_id: str, at: datetime) -> int:
        """Takes one unit for a redemption; returns the price to spend."""
        if self.retired:
            raise RuleViolated(f"reward {self.code!r} is retired")
        if not self.available(at):
            raise RuleViolated(f"reward {self.code!r} cannot be redeemed at this time")
        if self.stock <= 0:
            raise OutOfStock(f"reward {self.code!r} is out of stock")
        self.trigger_event(
            self.Reserved,
            customer_id="",
            code=self.code,
            contact_id=contact_id,
            redemption_id=redemption_id,
            points=self.points,
            at=at,
        )
        return self.points
