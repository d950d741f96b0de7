"""Earning rules as versioned data, and the one aggregate that holds them.

Points of a purchase line = amount x rate of its currency x the multiplier
of the member's tier x that of the line's category x those of the campaigns
running at the time (for that category), rounded down to whole points.
Every publication is a new version (the aggregate's version); each earning
records the version it was computed with. Version 0 is the built-in default
that applies until rules are published.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any

from eventsourcing.domain import Aggregate

RULES_ID = uuid.uuid5(uuid.UUID("0c5f3e4a-51d2-4a8e-9d5b-7d2a6c1b9e10"), "earning-rules")


@dataclass(frozen=True)
class Campaign:
    name: str
    factor: Decimal
    starts_at: datetime
    ends_at: datetime
    categories: tuple[str, ...] = ()

    def applies(self, category: str, at: datetime) -> bool:
        running = self.starts_at <= at < self.ends_at
        return running and (not self.categories or category in self.categories)


@dataclass(frozen=True)
class Rules:
    version: int
    rates: dict[str, Decimal]
    tier_multipliers: dict[str, Decimal] = field(default_factory=dict)
    category_multipliers: dict[str, Decimal] = field(default_factory=dict)
    campaigns: tuple[Campaign, ...] = ()
    lot_lifetime_days: int = 365
    return_window_days: int = 30
    #: Event bonuses, in points (0: none): a member's first purchase, its birthday
    #: (once a year), and a referral (to the referrer and to the new member, when
    #: the new member's first purchase lands).
    first_purchase_bonus: int = 0
    birthday_bonus: int = 0
    referrer_bonus: int = 0
    referee_bonus: int = 0

    def points(self, amount: Decimal, currency: str, category: str, tier: str, at: datetime) -> int:
        """Points of one line; 0 for a currency without a rate."""
        rate = self.rates.get(currency)
        if rate is None or amount <= 0:
            return 0
        factor = rate * self.tier_multipliers.get(tier, Decimal(1))
        factor *= self.category_multipliers.get(category, Decimal(1))
        for campaign in self.campaigns:
            if campaign.applies(category, at):
                factor *= campaign.factor
        return int((amount * factor).to_integral_value(rounding=ROUND_DOWN))

    def to_data(self) -> dict[str, Any]:
        """Plain JSON-able data (what the events store)."""
        return {
            "rates": {k: str(v) for k, v in self.rates.items()},
            "tier_multipliers": {k: str(v) for k, v in self.tier_multipliers.items()},
            "category_multipliers": {k: str(v) for k, v in self.category_multipliers.items()},
            "campaigns": [
                {
                    "name": c.name,
                    "factor": str(c.factor),
                    "starts_at": c.starts_at.isoformat(),
                    "ends_at": c.ends_at.isoformat(),
                    "categories": list(c.categories),
                }
                for c in self.campaigns
            ],
            "lot_lifetime_days": self.lot_lifetime_days,
            "return_window_days": self.return_window_days,
            "first_purchase_bonus": self.first_purchase_bonus,
            "birthday_bonus": self.birthday_bonus,
            "referrer_bonus": self.referrer_bonus,
            "referee_bonus": self.referee_bonus,
        }

    @classmethod
    def from_data(cls, version: int, data: dict[str, Any]) -> Rules:
        return cls(
            version=version,
            rates={k: Decimal(v) for k, v in data["rates"].items()},
            tier_multipliers={k: Decimal(v) for k, v in data["tier_multipliers"].items()},
            category_multipliers={k: Decimal(v) for k, v in data["category_multipliers"].items()},
            campaigns=tuple(
                Campaign(
                    c["name"],
                    Decimal(c["factor"]),
                    datetime.fromisoformat(c["starts_at"]),
                    datetime.fromisoformat(c["ends_at"]),
                    tuple(c["categories"]),
                )
                for c in data["campaigns"]
            ),
            lot_lifetime_days=int(data["lot_lifetime_days"]),
            return_window_days=int(data["return_window_days"]),
            # Rules published before bonuses existed have none.
            first_purchase_bonus=int(data.get("first_purchase_bonus", 0)),
            birthday_bonus=int(data.get("birthday_bonus", 0)),
            referrer_bonus=int(data.get("referrer_bonus", 0)),
            referee_bonus=int(data.get("referee_bonus", 0)),
        )


DEFAULT_RULES = Rules(version=0, rates={"EUR": Decimal(1), "USD": Decimal(1), "GBP": Decimal(1)})


class EarningRules(Aggregate):
    """The published earning rules; one aggregate, its version is the rules' version."""

    class Created(Aggregate.Created):
        customer_id: str
        rules: dict[str, Any]
        at: datetime

    class Published(Aggregate.Event):
        customer_id: str
        rules: dict[str, Any]
        at: datetime

        def apply(self, aggregate: Any) -> None:
            aggregate.data = self.rules

    def __init__(self, customer_id: str, rules: dict[str, Any], at: datetime) -> None:
        self.data = rules

    @staticmethod
    def create_id(*_: Any, **__: Any) -> uuid.UUID:
        return RULES_ID

    @classmethod
    def first(cls, rules: Rules, at: datetime) -> EarningRules:
        return cls(customer_id="", rules=rules.to_data(), at=at)

    def publish(self, rules: Rules, at: datetime) -> None:
        self.trigger_event(self.Published, customer_id="", rules=rules.to_data(), at=at)

    @property
    def rules(self) -> Rules:
        return Rules.from_data(self.version, self.data)
