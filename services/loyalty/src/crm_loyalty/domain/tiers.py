"""Tiers as configuration: thresholds over a rolling window, by points or by spend.

With basis `points` a member qualifies by the points its purchases earned in
the window (less what returns cancelled); with basis `spend`, by the money it
spent in the window in the policy's currency (less returned lines). A member
moves up as soon as it reaches a higher tier and down only once it has stayed
below its tier for the grace period. The configuration is data (`TierPolicy`,
read from a file at start: `crm_loyalty.tier_config`), not code paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Tier:
    name: str
    #: Qualifying points (earned in the window, less what returns cancelled) to reach it.
    threshold: int


POINTS = "points"
SPEND = "spend"
BASES = (POINTS, SPEND)


@dataclass(frozen=True)
class TierPolicy:
    tiers: tuple[Tier, ...]
    window: timedelta = timedelta(days=365)
    grace: timedelta = timedelta(days=30)
    #: What thresholds count: points earned, or money spent (whole units of `currency`).
    basis: str = POINTS
    currency: str = ""

    def __post_init__(self) -> None:
        thresholds = [t.threshold for t in self.tiers]
        if not self.tiers or thresholds[0] != 0 or thresholds != sorted(set(thresholds)):
            raise ValueError("tiers need rising thresholds starting at 0")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {', '.join(BASES)}")
        if self.basis == SPEND and not self.currency:
            raise ValueError("a policy by spend needs its currency")

    @property
    def lowest(self) -> str:
        return self.tiers[0].name

    def rank(self, name: str) -> int:
        for index, tier in enumerate(self.tiers):
            if tier.name == name:
                return index
        return 0

    def tier_for(self, points: int) -> str:
        reached = self.tiers[0]
        for tier in self.tiers:
            if points >= tier.threshold:
                reached = tier
        return reached.name

    def next_of(self, name: str) -> Tier | None:
        rank = self.rank(name)
        return self.tiers[rank + 1] if rank + 1 < len(self.tiers) else None


DEFAULT_TIERS = TierPolicy(
    tiers=(Tier("basic", 0), Tier("silver", 1_000), Tier("gold", 5_000), Tier("vip", 20_000)),
)
