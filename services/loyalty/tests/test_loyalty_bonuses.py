"""Event bonuses over a real event store: first purchase, birthday (once a year,
across restarts and replicas), referral (both members, once); their amounts are
part of the versioned earning rules and each bonus records the version."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from loyalty_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.errors import ValidationFailed
from crm_common.settings import Settings
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.inputs import OrderLineInput, PlacedOrder, Purchase, PurchaseLineInput, RulesInput
from crm_loyalty.views import LotView

ADMIN = Caller(actor="admin-1", client="console")
RULES = RulesInput(
    rates={"EUR": "1"},
    first_purchase_bonus=50,
    birthday_bonus=100,
    referrer_bonus=200,
    referee_bonus=25,
)


def bonus_lots(lots: tuple[LotView, ...]) -> list[tuple[str, int, int]]:
    return [(x.reason, x.earned, x.rule_version) for x in lots if x.reason.startswith("bonus")]


async def test_first_purchase_and_referral_bonuses_land_once_with_the_first_purchase(
    service: LoyaltyService, contacts: KnownContacts
) -> None:
    contacts.known.add("c-3")
    await service.publish_rules(ADMIN, RULES)
    await service.enrol(ADMIN, "c-1", "web")
    with pytest.raises(ValidationFailed):
        await service.enrol(ADMIN, "c-2", "web", referred_by="c-3")  # not a member
    await service.enrol(ADMIN, "c-2", "web", referred_by="c-1")
    # Bonuses do not come with an adjustment, only with a purchase.
    await service.adjust(ADMIN, "c-2", 10, "goodwill")
    assert bonus_lots((await service.get_member("c-2")).lots) == []

    order = PlacedOrder("o-1", "c-2", "EUR", [OrderLineInput("1", "30", "")])
    await service.place_order(ADMIN, order)
    referee = await service.get_member("c-2")
    assert bonus_lots(referee.lots) == [("bonus: first purchase", 50, 1), ("bonus: referee", 25, 1)]
    # Locked like the order for its return window.
    assert referee.balance.locked == 30 + 50 + 25
    referrer = await service.get_member("c-1")
    assert bonus_lots(referrer.lots) == [("bonus: referrer", 200, 1)]

    # The next purchases, and a redelivery, give nothing more.
    await service.place_order(ADMIN, order)
    await service.earn(ADMIN, "c-2", Purchase([PurchaseLineInput("1", "5", "EUR")]))
    assert len(bonus_lots((await service.get_member("c-2")).lots)) == 2
    assert len(bonus_lots((await service.get_member("c-1")).lots)) == 1
    # Bonuses do not count towards tiers.
    assert (await service.get_tier("c-2")).qualifying_points == 35


async def test_the_birthday_bonus_comes_once_a_year_whoever_settles(
    store_settings: Settings, contacts: KnownContacts
) -> None:
    clock = Clock(datetime(2026, 2, 27, 12, tzinfo=UTC))
    first = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    second = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        await first.publish_rules(ADMIN, RULES)
        with pytest.raises(ValidationFailed):
            await first.enrol(ADMIN, "c-1", "app", birthday="02-30")
        await first.enrol(ADMIN, "c-1", "app", birthday="2-29")
        assert (await first.get_member("c-1")).birthday == "02-29"
        await first.settle_all(ADMIN)
        assert bonus_lots((await first.get_member("c-1")).lots) == []
        # 2026 has no 29 February: the 28th. Two replicas settle at once, twice each.
        clock.advance(days=1)
        await asyncio.gather(*(s.settle_all(ADMIN) for s in (first, second, first, second)))
        # A replica started afresh (a restart) settles again.
        restarted = LoyaltyService(create_application(store_settings), contacts, clock=clock)
        try:
            await restarted.settle_all(ADMIN)
            assert bonus_lots((await restarted.get_member("c-1")).lots) == [
                ("bonus: birthday", 100, 1)
            ]
            clock.advance(days=366)
            await restarted.settle_all(ADMIN)
            assert len(bonus_lots((await restarted.get_member("c-1")).lots)) == 2
        finally:
            restarted.close()
    finally:
        first.close()
        second.close()


async def test_bonus_amounts_are_checked_and_versioned(service: LoyaltyService) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await service.publish_rules(ADMIN, RulesInput(rates={"EUR": "1"}, birthday_bonus=-1))
    assert refused.value.errors[0].field == "birthday_bonus"
    await service.publish_rules(ADMIN, RULES)
    await service.publish_rules(ADMIN, RulesInput(rates={"EUR": "1"}, first_purchase_bonus=7))
    rules = await service.get_rules()
    assert (rules.version, rules.first_purchase_bonus, rules.birthday_bonus) == (2, 7, 0)
    await service.enrol(ADMIN, "c-1", "web")
    await service.earn(ADMIN, "c-1", Purchase([PurchaseLineInput("1", "5", "EUR")]))
    assert bonus_lots((await service.get_member("c-1")).lots) == [("bonus: first purchase", 7, 2)]
