"""The application over a real SQLite event store."""

from __future__ import annotations

import asyncio

import pytest
from loyalty_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_loyalty.application import CustomerNotKnown, LoyaltyService
from crm_loyalty.domain import InsufficientPoints, OrderNotKnown
from crm_loyalty.inputs import (
    OrderLineInput,
    PlacedOrder,
    Purchase,
    PurchaseLineInput,
    ReturnedOrder,
    RulesInput,
)
from crm_loyalty.views import MemberView

ADMIN = Caller(actor="admin-1", client="console")


def rid(request_id: str) -> Caller:
    return Caller(actor="agent-7", client="console", request_id=request_id)


def member(written: object) -> MemberView:
    subject = written.subject  # type: ignore[attr-defined]
    assert isinstance(subject, MemberView)
    return subject


async def test_enrolment_checks_the_contact_and_happens_once(service: LoyaltyService) -> None:
    written = await service.enrol(rid("e1"), "c-1", "web")
    view = member(written)
    assert view.member_number.isdigit() and len(view.member_number) == 10
    assert view.channel == "web" and view.tier == "basic"
    again = await service.enrol(rid("e1"), "c-1", "web")
    assert again.outcome.replayed and again.outcome.id == written.outcome.id
    with pytest.raises(RuleViolated):
        await service.enrol(rid("e2"), "c-1", "store")
    with pytest.raises(NotFound):
        await service.enrol(ADMIN, "nobody", "web")
    with pytest.raises(ValidationFailed):
        await service.enrol(ADMIN, "c-2", "carrier-pigeon")


async def test_earning_follows_the_published_rules_and_records_their_version(
    service: LoyaltyService,
) -> None:
    await service.enrol(ADMIN, "c-1", "store")
    rules = await service.publish_rules(
        ADMIN,
        RulesInput(
            rates={"eur": "2", "USD": "1.5"},
            category_multipliers={"shoes": "3"},
            lot_lifetime_days=90,
        ),
    )
    assert rules.outcome.version == 1
    written = await service.earn(
        ADMIN,
        "c-1",
        Purchase(
            [
                PurchaseLineInput("1", "10.99", "EUR", "shoes"),  # 10.99*2*3 = 65.94 -> 65
                PurchaseLineInput("2", "3.50", "USD"),  # 5.25 -> 5
            ],
            "till 4",
        ),
    )
    assert written.outcome.extra["points"] == "70"
    (lot,) = member(written).lots
    assert lot.earned == 70 and lot.rule_version == 1 and not lot.locked
    assert (lot.expires_at - lot.earned_at).days == 90
    with pytest.raises(ValidationFailed) as refused:
        await service.earn(ADMIN, "c-1", Purchase([PurchaseLineInput("1", "1.001", "EUR")]))
    assert refused.value.errors[0].field == "lines[0].amount"


async def test_a_redemption_above_the_balance_changes_nothing(service: LoyaltyService) -> None:
    await service.enrol(ADMIN, "c-1", "web")
    await service.adjust(ADMIN, "c-1", 50, "welcome")
    before = await service.get_member("c-1")
    with pytest.raises(InsufficientPoints):
        await service.redeem(ADMIN, "c-1", 51, "mug")
    assert await service.get_member("c-1") == before
    spent = member(await service.redeem(ADMIN, "c-1", 50, "mug"))
    assert spent.balance.active == 0 and spent.balance.spent == 50


async def test_concurrent_redemptions_never_overspend(service: LoyaltyService) -> None:
    await service.enrol(ADMIN, "c-1", "web")
    await service.adjust(ADMIN, "c-1", 100, "welcome")
    results = await asyncio.gather(
        *(service.redeem(rid(f"r{i}"), "c-1", 30, "gift") for i in range(8)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3
    assert all(isinstance(r, InsufficientPoints) for r in results if isinstance(r, BaseException))
    final = await service.get_member("c-1")
    assert final.balance.active == 10 and final.balance.spent == 90


async def test_an_order_earns_once_locked_then_released_and_a_return_cancels_its_lines(
    service: LoyaltyService, clock: Clock
) -> None:
    order = PlacedOrder(
        "o-1",
        "c-2",
        "EUR",
        [OrderLineInput("1", "100.00", "books"), OrderLineInput("2", "40.00", "toys")],
    )
    first = await service.place_order(rid("erp:o-1:placed"), order)
    assert first.applied and first.points == 140
    # A redelivery with a new request id (receipts expired) still earns nothing.
    again = await service.place_order(rid("erp:o-1:placed:late"), order)
    assert not again.applied
    view = await service.get_member("c-2")
    assert view.channel == "erp" and view.balance.locked == 140 and view.balance.active == 0
    returned = ReturnedOrder("o-1", "c-2", "ret-1", ["2"])
    assert (await service.return_order(rid("erp:o-1:returned:ret-1"), returned)).points == 40
    assert not (await service.return_order(rid("x"), returned)).applied
    clock.advance(days=31)
    await service.settle_all(ADMIN)
    view = await service.get_member("c-2")
    assert (view.balance.active, view.balance.locked, view.balance.cancelled) == (100, 0, 40)
    with pytest.raises(OrderNotKnown):
        await service.return_order(ADMIN, ReturnedOrder("o-9", "c-2", "r", []))


async def test_an_order_of_an_unknown_customer_is_refused_for_parking(
    service: LoyaltyService, contacts: KnownContacts
) -> None:
    order = PlacedOrder("o-2", "c-new", "EUR", [OrderLineInput("1", "10", "")])
    with pytest.raises(CustomerNotKnown):
        await service.place_order(ADMIN, order)
    assert await service.park(ADMIN, "o-2:placed", "c-new", "placed", b"raw", "unknown")
    assert not await service.park(ADMIN, "o-2:placed", "c-new", "placed", b"raw", "unknown")
    assert [p.key for p in await service.parked()] == ["o-2:placed"]
    contacts.known.add("c-new")
    assert (await service.place_order(ADMIN, order)).points == 10
    await service.unpark(ADMIN, "o-2:placed")
    assert await service.parked() == []


async def test_expiry_runs_once_and_tiers_follow_the_points(
    service: LoyaltyService, clock: Clock
) -> None:
    await service.enrol(ADMIN, "c-1", "app")
    written = await service.earn(ADMIN, "c-1", Purchase([PurchaseLineInput("1", "1200", "EUR")]))
    assert member(written).tier == "silver"
    tier = await service.get_tier("c-1")
    assert (tier.next_tier, tier.points_to_next_tier) == ("gold", 3_800)
    clock.advance(days=366)
    assert await service.settle_all(ADMIN) == (0, 1200)
    assert await service.settle_all(ADMIN) == (0, 0)
    assert (await service.get_member("c-1")).tier == "silver"  # grace period
    clock.advance(days=30)
    await service.settle_all(ADMIN)
    assert (await service.get_tier("c-1")).tier == "basic"


def test_multipliers_are_bounded_after_they_are_parsed() -> None:
    from crm_common.errors import FieldErrors
    from crm_loyalty.validation import _factor

    for given, kept in (("1.5", "1.5"), ("2.000", "2"), ("1E+2", "100"), ("0", "0")):
        errors = FieldErrors()
        assert str(_factor(given, "factor", errors)) == kept and not errors.errors
    for refused in ("1e-999999", "1e999999", "0.00001", "-1", "NaN"):
        errors = FieldErrors()
        assert _factor(refused, "factor", errors) is None and errors.errors, refused
