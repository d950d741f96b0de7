"""The rewards catalogue over a real event store (SQLite and PostgreSQL): stock
and points are taken in one decision; racing redemptions from two replicas
(two command buses on one store) never overspend either."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from loyalty_support import T0, Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.settings import Settings
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain import InsufficientPoints
from crm_loyalty.domain.rewards import OutOfStock
from crm_loyalty.inputs import RewardInput
from crm_loyalty.views import MemberView, RewardView

ADMIN = Caller(actor="admin-1", client="console")


def rid(request_id: str) -> Caller:
    return Caller(actor="agent-7", client="console", request_id=request_id)


async def test_define_restock_retire_and_redeem(service: LoyaltyService, clock: Clock) -> None:
    await service.enrol(ADMIN, "c-1", "web")
    await service.adjust(ADMIN, "c-1", 500, "welcome")
    defined = await service.define_reward(ADMIN, RewardInput(" Coffee-Mug ", "Mug", 200, 1))
    assert isinstance(defined.subject, RewardView)
    assert (defined.subject.code, defined.subject.stock) == ("coffee-mug", 1)
    with pytest.raises(RuleViolated):
        await service.define_reward(ADMIN, RewardInput("coffee-mug", "Other", 1, 1))

    redeemed = await service.redeem_reward(rid("red-1"), "c-1", "coffee-mug")
    assert isinstance(redeemed.subject, MemberView)
    assert redeemed.subject.balance.active == 300 and redeemed.subject.balance.spent == 200
    assert redeemed.reward is not None and (redeemed.reward.stock, redeemed.reward.reserved) == (
        0,
        1,
    )
    again = await service.redeem_reward(rid("red-1"), "c-1", "coffee-mug")
    assert again.outcome.replayed
    with pytest.raises(OutOfStock):
        await service.redeem_reward(ADMIN, "c-1", "coffee-mug")
    assert (await service.get_member("c-1")).balance.active == 300

    await service.restock_reward(ADMIN, "coffee-mug", 5)
    assert (await service.get_reward("coffee-mug")).stock == 5
    await service.retire_reward(ADMIN, "coffee-mug")
    with pytest.raises(RuleViolated):
        await service.redeem_reward(ADMIN, "c-1", "coffee-mug")
    with pytest.raises(RuleViolated):
        await service.restock_reward(ADMIN, "coffee-mug", 1)
    assert await service.list_rewards() == []
    assert [r.code for r in await service.list_rewards(include_retired=True)] == ["coffee-mug"]
    with pytest.raises(NotFound):
        await service.redeem_reward(ADMIN, "c-1", "no-such-reward")


async def test_a_reward_above_the_balance_or_out_of_its_validity_changes_nothing(
    service: LoyaltyService, clock: Clock
) -> None:
    await service.enrol(ADMIN, "c-1", "web")
    await service.adjust(ADMIN, "c-1", 100, "welcome")
    await service.define_reward(ADMIN, RewardInput("lounge", "Lounge pass", 150, 3))
    await service.define_reward(
        ADMIN,
        RewardInput("summer", "Summer gift", 10, 3, T0 + timedelta(days=1), T0 + timedelta(days=2)),
    )
    with pytest.raises(InsufficientPoints):
        await service.redeem_reward(ADMIN, "c-1", "lounge")
    with pytest.raises(RuleViolated):
        await service.redeem_reward(ADMIN, "c-1", "summer")
    assert (await service.get_reward("lounge")).stock == 3
    assert (await service.get_reward("summer")).stock == 3
    assert (await service.get_member("c-1")).balance.active == 100
    clock.advance(days=1, hours=1)
    await service.redeem_reward(ADMIN, "c-1", "summer")
    assert (await service.get_member("c-1")).balance.active == 90


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (RewardInput("", "x", 1, 1), "code"),
        (RewardInput("a b", "x", 1, 1), "code"),
        (RewardInput("a", "", 1, 1), "name"),
        (RewardInput("a", "x", 0, 1), "points"),
        (RewardInput("a", "x", 1, -1), "stock"),
        (RewardInput("a", "x", 1, 1, T0, T0), "valid_until"),
    ],
)
async def test_bad_rewards_are_refused_naming_the_field(
    service: LoyaltyService, value: RewardInput, field: str
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await service.define_reward(ADMIN, value)
    assert refused.value.errors[0].field == field
    assert await service.list_rewards(include_retired=True) == []


async def test_two_replicas_racing_never_overspend_points_or_stock(
    store_settings: Settings, clock: Clock, contacts: KnownContacts
) -> None:
    """Two command buses on one store (as two replicas are): every redemption
    decides on what it read, the store refuses the second save of a version, the
    loser decides again on fresh state."""
    contacts.known.update(f"c-{i}" for i in range(3, 9))
    first = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    second = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        for i in range(1, 9):
            await first.enrol(ADMIN, f"c-{i}", "web")
        await first.adjust(ADMIN, "c-1", 1000, "grant")
        for i in range(2, 9):
            await first.adjust(ADMIN, f"c-{i}", 100, "grant")
        # One member, points for 3 of 8 racing redemptions; stock is plenty.
        await first.define_reward(ADMIN, RewardInput("voucher", "Voucher", 300, 100))
        # The last units: 3 left, 7 members racing for them with points to spare.
        await first.define_reward(ADMIN, RewardInput("last", "Last ones", 10, 3))
        one_member = [
            (first if i % 2 else second).redeem_reward(ADMIN, "c-1", "voucher") for i in range(8)
        ]
        last_units = [
            (first if i % 2 else second).redeem_reward(ADMIN, f"c-{i}", "last") for i in range(2, 9)
        ]
        results = await asyncio.gather(*one_member, *last_units, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(
                result, InsufficientPoints | OutOfStock
            ):
                raise result
        member_wins = [r for r in results[:8] if not isinstance(r, BaseException)]
        unit_wins = [r for r in results[8:] if not isinstance(r, BaseException)]
        assert len(member_wins) == 3 and len(unit_wins) == 3

        fresh = LoyaltyService(create_application(store_settings), contacts, clock=clock)
        try:
            c1 = await fresh.get_member("c-1")
            assert (c1.balance.active, c1.balance.spent) == (100, 900)
            voucher, last = await fresh.get_reward("voucher"), await fresh.get_reward("last")
            assert (voucher.stock, voucher.reserved) == (97, 3)
            assert (last.stock, last.reserved) == (0, 3)
            spent = [(await fresh.get_member(f"c-{i}")).balance.spent for i in range(2, 9)]
            assert sorted(spent) == [0, 0, 0, 0, 10, 10, 10]
        finally:
            fresh.close()
    finally:
        first.close()
        second.close()


async def test_catalogue_events_are_published_keyed_by_the_reward(service: LoyaltyService) -> None:
    from crm.events.v1 import loyalty_pb2 as events_pb
    from crm_loyalty.events_out import to_wire

    await service.enrol(ADMIN, "c-1", "web")
    await service.adjust(ADMIN, "c-1", 50, "welcome")
    defined = await service.define_reward(ADMIN, RewardInput("pin", "Pin", 20, 2))
    await service.restock_reward(ADMIN, "pin", 3)
    await service.redeem_reward(ADMIN, "c-1", "pin")
    await service.retire_reward(ADMIN, "pin")
    wires = []
    for n in service.app.recorder.select_notifications(1, 100):
        event = service.app.mapper.to_domain_event(n)
        wire = to_wire(event, getattr(event, "_meta", {}), n.id)
        if wire is not None:
            wires.append((wire[0], wire[1], events_pb.LoyaltyEvent.FromString(wire[2])))
    rewards = [(k, t, m) for k, t, m in wires if t.startswith("crm.loyalty.v1.Reward")]
    assert [t for _, t, _ in rewards] == [
        "crm.loyalty.v1.RewardDefined",
        "crm.loyalty.v1.RewardRestocked",
        "crm.loyalty.v1.RewardReserved",
        "crm.loyalty.v1.RewardRetired",
    ]
    assert {k for k, _, _ in rewards} == {defined.outcome.id}
    reserved = rewards[2][2].reward_reserved
    assert (reserved.code, reserved.contact_id, reserved.redemption_id, reserved.points) == (
        "pin",
        "c-1",
        "pin:1",
        20,
    )
    spent = [m for _, t, m in wires if t == "crm.loyalty.v1.PointsSpent"]
    assert [m.points_spent.reference for m in spent] == ["reward:pin:1"]
