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


def test_a_cancellation_takes_the_order_points_locked_or_not_and_claws_back_what_was_spent() -> (
    None
):
    m = member()
    m.place_order(
        "o-1", {"1": 60, "2": 40}, expires_at=T0 + days(365), locked_until=T0 + days(14),
        rule_version=1, at=T0,
    )  # fmt: skip
    m.earn(30, expires_at=T0 + days(200), rule_version=1, reason="till", at=T0)
    # Cancelled while locked: the whole order, once.
    assert m.return_order("o-1", "cancelled", [], T0 + days(1)) == 100
    assert m.return_order("o-1", "cancelled", [], T0 + days(2)) is None
    assert (m.balance.locked, m.balance.cancelled, m.balance.active) == (0, 100, 30)

    # After the window, 70 of its 100 points were spent: the cancellation takes the
    # 30 left in the order's lot and the 10 of a later lot; 60 stay unrecovered.
    m.place_order(
        "o-2", {"1": 100}, expires_at=T0 + days(365), locked_until=T0 + days(14),
        rule_version=1, at=T0,
    )  # fmt: skip
    m.settle(T0 + days(15))
    m.spend(100, "gift", T0 + days(16))  # the till lot's 30 expire first, then 70 of o-2
    m.earn(10, expires_at=T0 + days(300), rule_version=1, reason="till", at=T0 + days(17))
    assert m.return_order("o-2", "cancelled", [], T0 + days(18)) == 40
    cancelled = [e for e in m.pending_events if isinstance(e, Member.Cancelled)][-1]
    assert cancelled.unrecovered == 60
    assert m.balance.active == 0 and m.balance.cancelled == 140 and m.balance.spent == 100
    # A later return of a line of the cancelled order cancels nothing more.
    assert m.return_order("o-2", "late", ["1"], T0 + days(19)) == 0
    rebuilt = replayed(m)
    assert rebuilt.balance == m.balance


# -- properties -------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("earn"), st.integers(0, 500), st.integers(1, 400)),
    st.tuples(st.just("order"), st.integers(0, 500), st.integers(1, 400)),
    st.tuples(st.just("spend"), st.integers(1, 600), st.integers(0, 0)),
    st.tuples(st.just("return"), st.integers(0, 30), st.integers(0, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 30), st.integers(0, 0)),
    st.tuples(st.just("settle"), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("adjust"), st.integers(-300, 300), st.integers(1, 400)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(operation, st.integers(0, 40)), max_size=40))
def test_any_sequence_keeps_the_ledger_whole(
    steps: list[tuple[tuple[str, int, int], int]],
) -> None:
    """Earn, lock (orders), release and expire (settle), cancel (returns and
    cancellations), spend and adjust, at any times: the balance adds up to an
    independent tally of what each operation reported, no figure goes negative,
    spending takes the earliest-expiring lots first, a return or cancellation
    applies once, locks end with their window, and replaying the events rebuilds
    the same ledger."""
    m = member()
    now = T0
    orders: list[str] = []
    tally = {"earned": 0, "spent": 0, "cancelled": 0, "expired": 0}
    for (kind, amount, extra), advance in steps:
        now += days(advance)
        before = {k: (v.remaining, v.spent) for k, v in m.lots.items()}
        try:
            if kind == "earn":
                m.earn(amount, expires_at=now + days(extra), rule_version=1, reason="p", at=now)
                tally["earned"] += amount
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
                tally["earned"] += amount
            elif kind == "spend":
                expected_order = [
                    lot.lot_id
                    for lot in sorted(m.lots.values(), key=lambda x: (x.expires_at, x.seq))
                    if lot.spendable(now) > 0
                ]
                taken = m.spend(amount, "r", now)
                tally["spent"] += amount
                # The first-to-expire lots give first: all but the last are emptied.
                assert list(taken) == expected_order[: len(taken)]
                for lot_id in list(taken)[:-1]:
                    assert before[lot_id][0] == taken[lot_id]
            elif kind in ("return", "cancel") and orders:
                order_id = orders[amount % len(orders)]
                return_id = f"r{amount}" if kind == "return" else "cancelled"
                line_ids = [[], ["1"], ["2"]][extra] if kind == "return" else []
                points = m.return_order(order_id, return_id, line_ids, now)
                if points is not None:
                    tally["cancelled"] += points
                # Applied once: the same return again changes nothing.
                assert m.return_order(order_id, return_id, line_ids, now) is None
            elif kind == "settle":
                _, expired = m.settle(now)
                tally["expired"] += expired
                assert not any(
                    lot.locked_until is not None and lot.locked_until <= now
                    for lot in m.lots.values()
                )
                assert m.settle(now) == (0, 0)
            elif kind == "adjust" and amount != 0:
                m.adjust(amount, "fix", "admin", now + days(extra), now)
                tally["earned" if amount > 0 else "spent"] += abs(amount)
        except InsufficientPoints:
            assert {k: (v.remaining, v.spent) for k, v in m.lots.items()} == before
        balance = m.balance
        for lot in m.lots.values():
            lot.check()
        assert min(vars(balance).values()) >= 0
        assert (balance.earned, balance.spent, balance.cancelled, balance.expired) == (
            tally["earned"],
            tally["spent"],
            tally["cancelled"],
            tally["expired"],
        )
        assert balance.active + balance.locked == sum(x.remaining for x in m.lots.values())
    rebuilt = replayed(m)
    assert rebuilt.balance == m.balance
    assert {k: vars(v) for k, v in rebuilt.lots.items()} == {k: vars(v) for k, v in m.lots.items()}
