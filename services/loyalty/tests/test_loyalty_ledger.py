"""The ledger by lot: examples, then properties over any sequence of operations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from eventsourcing.domain import Aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_common.errors import RuleViolated
from crm_loyalty.domain import DEFAULT_TIERS, InsufficientPoints, Member, OrderNotKnown

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def days(n: float) -> timedelta:
    return timedelta(days=n)


def member() -> Member:
    return Member.enrol("contact-1", "web", "basic", T0)


def replayed(m: Member) -> Member:
    """The member rebuilt from its events alone."""
    events = m.collect_events()
    rebuilt: Aggregate | None = None
    for e in events:
        rebuilt = e.mutate(rebuilt)
    assert isinstance(rebuilt, Member)
    return rebuilt


def test_spending_takes_the_lots_that_expire_first() -> None:
    m = member()
    late = m.earn(100, expires_at=T0 + days(300), rule_version=1, reason="a", at=T0)
    soon = m.earn(50, expires_at=T0 + days(30), rule_version=1, reason="b", at=T0)
    taken = m.spend(70, "gift", T0 + days(1))
    assert taken == {soon: 50, late: 20}
    assert m.balance.active == 80 and m.balance.spent == 70


def test_a_redemption_above_the_balance_is_refused_and_changes_nothing() -> None:
    m = member()
    m.earn(40, expires_at=T0 + days(30), rule_version=1, reason="a", at=T0)
    version = m.version
    with pytest.raises(InsufficientPoints):
        m.spend(41, "too much", T0)
    assert m.version == version and m.balance.active == 40


def test_locked_points_are_not_spendable_until_released() -> None:
    m = member()
    m.place_order(
        "o1",
        {"1": 30},
        expires_at=T0 + days(365),
        locked_until=T0 + days(14),
        rule_version=1,
        at=T0,
    )
    assert m.balance.locked == 30 and m.balance.active == 0
    with pytest.raises(InsufficientPoints):
        m.spend(1, "x", T0 + days(1))
    assert m.settle(T0 + days(14)) == (30, 0)
    assert m.balance.active == 30 and m.balance.locked == 0


def test_an_order_earns_once_and_a_return_cancels_its_lines_once() -> None:
    m = member()
    lines = {"1": 10, "2": 25}
    kwargs = {"expires_at": T0 + days(365), "locked_until": T0 + days(14), "rule_version": 3}
    assert m.place_order("o1", lines, at=T0, **kwargs)  # type: ignore[arg-type]
    assert not m.place_order("o1", lines, at=T0, **kwargs)  # type: ignore[arg-type]
    assert m.return_order("o1", "r1", ["2"], T0 + days(2)) == 25
    assert m.return_order("o1", "r1", ["2"], T0 + days(2)) is None
    assert m.balance.locked == 10 and m.balance.cancelled == 25
    # A whole-order return then cancels only what is left.
    assert m.return_order("o1", "r2", [], T0 + days(3)) == 10
    with pytest.raises(OrderNotKnown):
        m.return_order("o2", "r1", [], T0)


def test_expiry_happens_once() -> None:
    m = member()
    m.earn(10, expires_at=T0 + days(5), rule_version=1, reason="a", at=T0)
    assert m.settle(T0 + days(5)) == (0, 10)
    version = m.version
    assert m.settle(T0 + days(6)) == (0, 0)
    assert m.version == version
    assert m.balance.expired == 10


def test_adjustments_need_a_reason_and_never_overdraw() -> None:
    m = member()
    with pytest.raises(RuleViolated):
        m.adjust(5, " ", "admin-1", T0 + days(10), T0)
    m.adjust(5, "goodwill", "admin-1", T0 + days(10), T0)
    with pytest.raises(InsufficientPoints):
        m.adjust(-6, "correction", "admin-1", T0 + days(10), T0)
    m.adjust(-5, "correction", "admin-1", T0 + days(10), T0)
    assert m.balance.active == 0 and m.balance.spent == 5


def test_tiers_go_up_at_once_and_down_after_the_grace_period() -> None:
    m = member()
    m.earn(1_200, expires_at=T0 + days(900), rule_version=1, reason="buy", at=T0)
    assert m.review_tier(DEFAULT_TIERS, T0) == "silver"
    later = T0 + days(366)  # the earning left the window
    assert m.review_tier(DEFAULT_TIERS, later) is None
    assert m.downgrade_due == later + DEFAULT_TIERS.grace
    assert m.review_tier(DEFAULT_TIERS, later + days(10)) is None
    assert m.review_tier(DEFAULT_TIERS, later + DEFAULT_TIERS.grace) == "basic"


# -- properties -------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("earn"), st.integers(0, 500), st.integers(1, 400)),
    st.tuples(st.just("order"), st.integers(0, 500), st.integers(1, 400)),
    st.tuples(st.just("spend"), st.integers(1, 600), st.integers(0, 0)),
    st.tuples(st.just("return"), st.integers(0, 30), st.integers(0, 2)),
    st.tuples(st.just("settle"), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("adjust"), st.integers(-300, 300), st.integers(1, 400)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(operation, st.integers(0, 40)), max_size=40))
def test_any_sequence_keeps_the_ledger_whole(
    steps: list[tuple[tuple[str, int, int], int]],
) -> None:
    m = member()
    now = T0
    orders: list[str] = []
    for (kind, amount, extra), advance in steps:
        now += days(advance)
        before = {k: (v.remaining, v.spent) for k, v in m.lots.items()}
        try:
            if kind == "earn":
                m.earn(amount, expires_at=now + days(extra), rule_version=1, reason="p", at=now)
            elif kind == "order":
                order_id = f"o{len(orders)}"
                orders.append(order_id)
                m.place_order(
                    order_id,
                    {"1": amount // 2, "2": amount - amount // 2},
                    expires_at=now + days(extra),
                    locked_until=now + days(14),
                    rule_version=1,
                    at=now,
                )
            elif kind == "spend":
                expected_order = [
                    lot.lot_id
                    for lot in sorted(m.lots.values(), key=lambda x: (x.expires_at, x.seq))
                    if lot.spendable(now) > 0
                ]
                taken = m.spend(amount, "r", now)
                # The first-to-expire lots give first: all but the last are emptied.
                assert list(taken) == expected_order[: len(taken)]
                for lot_id in list(taken)[:-1]:
                    assert before[lot_id][0] == taken[lot_id]
            elif kind == "return" and orders:
                line_ids = [[], ["1"], ["2"]][extra]
                m.return_order(orders[amount % len(orders)], f"r{amount}", line_ids, now)
            elif kind == "settle":
                m.settle(now)
            elif kind == "adjust" and amount != 0:
                m.adjust(amount, "fix", "admin", now + days(extra), now)
        except InsufficientPoints:
            assert {k: (v.remaining, v.spent) for k, v in m.lots.items()} == before
        balance = m.balance
        for lot in m.lots.values():
            lot.check()
        assert min(balance.active, balance.locked, balance.expired, balance.spent) >= 0
        assert balance.earned == sum(lot.earned for lot in m.lots.values())
    rebuilt = replayed(m)
    assert rebuilt.balance == m.balance
    assert {k: vars(v) for k, v in rebuilt.lots.items()} == {k: vars(v) for k, v in m.lots.items()}
