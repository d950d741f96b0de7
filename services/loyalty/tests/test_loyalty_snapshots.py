"""Snapshots of members, rewards and parked orders, on SQLite and PostgreSQL.

A member's ledger and a popular reward's redemptions grow without end; every
`CRM_SNAPSHOT_INTERVAL` events the store keeps a snapshot, a load reads only
the events after it, and what it loads is the aggregate a full replay builds,
field for field. The API answers the same with and without snapshots, and the
notification log (what the relay publishes) holds events only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from loyalty_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.settings import Settings
from crm_deploy.testing import assert_loads_from_snapshot, assert_log_holds_events_only
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain import member_id
from crm_loyalty.domain.parking import PARKING_ID
from crm_loyalty.domain.rewards import reward_id
from crm_loyalty.inputs import ErpSource, Purchase, PurchaseLineInput, RewardInput

ADMIN = Caller(actor="admin-1", client="console")
INTERVAL = 10


@pytest.fixture
def snapshotting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    yield


async def busy_member_and_reward(service: LoyaltyService) -> None:
    await service.enrol(ADMIN, "c-1", "web")
    await service.define_reward(ADMIN, RewardInput("mug", "Mug", 5, 1000))
    for i in range(12):
        await service.earn(
            ADMIN, "c-1", Purchase([PurchaseLineInput(str(i), "12.50", "EUR")], f"r-{i}")
        )
        await service.redeem_reward(ADMIN, "c-1", "mug")
    await service.adjust(ADMIN, "c-1", 7, "goodwill")


async def test_members_and_rewards_load_from_snapshots(
    store_settings: Settings,
    clock: Clock,
    contacts: KnownContacts,
    snapshotting: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        await busy_member_and_reward(service)
        member = assert_loads_from_snapshot(service.app, member_id("c-1"), monkeypatch, INTERVAL)
        reward = assert_loads_from_snapshot(service.app, reward_id("mug"), monkeypatch, INTERVAL)
        assert reward.reserved == 12
        assert member.version > 2 * INTERVAL
        member_view = await service.get_member("c-1")
        reward_view = await service.get_reward("mug")
        versions = member.version + reward.version
        assert_log_holds_events_only(service.app, versions)
    finally:
        service.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    plain = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        assert plain.app.snapshots is None
        assert await plain.get_member("c-1") == member_view
        assert await plain.get_reward("mug") == reward_view
    finally:
        plain.close()


async def test_a_store_written_without_snapshots_still_loads_and_gains_them(
    store_settings: Settings,
    clock: Clock,
    contacts: KnownContacts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    before = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        await busy_member_and_reward(before)
        member_view = await before.get_member("c-1")
    finally:
        before.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    after = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        assert after.app.snapshots is not None
        assert list(after.app.snapshots.get(member_id("c-1"))) == []
        assert await after.get_member("c-1") == member_view
        version = after.app.repository.get(member_id("c-1")).version
        for i in range(INTERVAL):
            await after.adjust(ADMIN, "c-1", 1, f"after upgrade {i}")
        assert after.app.repository.get(member_id("c-1")).version == version + INTERVAL
        assert_loads_from_snapshot(after.app, member_id("c-1"), monkeypatch, INTERVAL)
        assert (await after.get_member("c-1")).balance.active == member_view.balance.active + 10
    finally:
        after.close()


async def test_parked_orders_load_from_snapshots(
    store_settings: Settings,
    clock: Clock,
    contacts: KnownContacts,
    snapshotting: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        for i in range(12):
            clock.advance(minutes=1)
            source = ErpSource(i % 3, 100 + i)
            headers = [("ce_id", f"id-{i}".encode()), ("raw", b"\x00\xff")]
            await service.park(
                ADMIN, f"o-{i}:placed", "ghost", "placed", b"raw", "unknown", source, headers
            )
        for i in range(0, 12, 3):
            await service.dead_letter(ADMIN, f"o-{i}:placed", "never known", "crm.erp.dead")
        parking = assert_loads_from_snapshot(service.app, PARKING_ID, monkeypatch, INTERVAL)
        assert len(parking.entries) == 12
        views = await service.parked()
    finally:
        service.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    plain = LoyaltyService(create_application(store_settings), contacts, clock=clock)
    try:
        assert await plain.parked() == views
    finally:
        plain.close()


def test_a_bad_interval_is_refused_at_start(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from loyalty_support import sqlite_settings

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "often")
    with pytest.raises(ValueError, match="CRM_SNAPSHOT_INTERVAL"):
        create_application(sqlite_settings(tmp_path))
