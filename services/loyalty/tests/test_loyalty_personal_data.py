"""A member's personal data at rest in the loyalty store, on SQLite and PostgreSQL.

Loyalty knows a person by their contact id only; what it holds about them
is their birthday and who referred them. With master keys configured, the
service's own commands (enrolment with a birthday and a referrer, a first
purchase that settles the referral, the birthday bonus, a redemption) leave
neither in clear in any row of the event, snapshot or key tables, while the
service still shows them. The subject is the member, one per contact by
construction (`member_id`), so a member's snapshots stay: they are sealed
whole under its key. Once that key is destroyed, loading shows birthday and
referrer as not given, and the ledger (points, lots, tier) is unchanged and
goes on; an enrolment of an erased contact is refused with `SubjectErased`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from loyalty_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.privacy import SubjectErased, new_master_key
from crm_common.settings import Settings
from crm_deploy import testing
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain.members import member_id
from crm_loyalty.inputs import Purchase, PurchaseLineInput, RulesInput

ADMIN = Caller(actor="admin-1", client="console")
REFERRER = "0b6f2a9e-6c2d-4d1a-9b7e-3f1c2d4e5a60"
MEMBER = "7c3e1f0a-2b4d-4e6f-8a9b-0c1d2e3f4a5b"
NEWCOMER = "9e8d7c6b-5a49-4382-b1a0-f9e8d7c6b5a4"
BIRTHDAY = "03-04"  # T0 is 1 March: due 3 days later
RULES = RulesInput(
    rates={"EUR": "1"},
    first_purchase_bonus=50,
    birthday_bonus=100,
    referrer_bonus=200,
    referee_bonus=25,
)
STORED_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("loyalty_events", "loyalty_snapshots"),
}
KEY_TABLES = ("privacy_data_keys", "privacy_key_access")


@pytest.fixture
def keyed(store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The store with master keys, snapshots every 3 events."""
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    return dataclasses.replace(store_settings, master_keys=new_master_key("m-loyalty"))


@pytest.fixture
def loyalty(keyed: Settings, clock: Clock) -> Iterator[LoyaltyService]:
    known = KnownContacts(REFERRER, MEMBER, NEWCOMER)
    service = LoyaltyService(create_application(keyed), known, clock=clock)
    yield service
    service.close()


def stored_rows(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Every row of the event, snapshot and key tables, by table."""
    return testing.stored_rows(settings, (*STORED_TABLES[settings.event_store], *KEY_TABLES))


def as_bytes(rows: list[dict[str, Any]]) -> bytes:
    values = [v for row in rows for v in row.values() if v is not None]
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in values)


def in_clear(settings: Settings) -> list[str]:
    """What a raw scan finds of the birthday (anywhere), and of the referrer's
    contact id in the rows of the referred member (its events and snapshots)."""
    tables = stored_rows(settings)
    everything = as_bytes([row for rows in tables.values() for row in rows])
    referee = member_id(MEMBER)
    own = [
        row
        for table in STORED_TABLES[settings.event_store]
        for row in tables[table]
        if uuid.UUID(str(row["originator_id"])) == referee
    ]
    assert own, "the referred member's rows were scanned"
    found = []
    if f'"{BIRTHDAY}"'.encode() in everything:
        found.append(BIRTHDAY)
    if REFERRER.encode() in as_bytes(own) or uuid.UUID(REFERRER).hex.encode() in as_bytes(own):
        found.append(REFERRER)
    return found


def snapshot_count(settings: Settings) -> int:
    return len(stored_rows(settings)[STORED_TABLES[settings.event_store][1]])


async def busy_member(loyalty: LoyaltyService, clock: Clock) -> None:
    """A referred member with a birthday, a first purchase, the birthday bonus, a redemption."""
    await loyalty.publish_rules(ADMIN, RULES)
    await loyalty.enrol(ADMIN, REFERRER, "web")
    await loyalty.enrol(ADMIN, MEMBER, "store", birthday=BIRTHDAY, referred_by=REFERRER)
    purchase = Purchase([PurchaseLineInput("1", "120", "EUR")], "till-7")
    await loyalty.earn(ADMIN, MEMBER, purchase)
    clock.advance(days=4)
    await loyalty.settle(ADMIN, MEMBER)
    await loyalty.redeem(ADMIN, MEMBER, 40, "voucher-1")


async def test_a_members_data_is_sealed_at_rest_and_shown_by_the_service(
    loyalty: LoyaltyService, keyed: Settings, clock: Clock
) -> None:
    await busy_member(loyalty, clock)

    assert in_clear(keyed) == []
    assert snapshot_count(keyed) > 0, "a member's snapshot was taken and scanned"
    member = await loyalty.get_member(MEMBER)
    assert (member.birthday, member.referred_by) == (BIRTHDAY, REFERRER)
    assert sorted(lot.reason for lot in member.lots) == [
        "bonus: birthday",
        "bonus: first purchase",
        "bonus: referee",
        "till-7",
    ]
    again = LoyaltyService(create_application(keyed), KnownContacts(), clock=clock)
    try:
        assert await again.get_member(MEMBER) == member
    finally:
        again.close()


async def test_an_erased_member_reads_as_not_given_with_the_ledger_kept(
    loyalty: LoyaltyService, keyed: Settings, clock: Clock
) -> None:
    await busy_member(loyalty, clock)
    before = await loyalty.get_member(MEMBER)
    tier = await loyalty.get_tier(MEMBER)
    keys = loyalty.app.personal_data_keys
    assert keys is not None

    assert keys.destroy(str(member_id(MEMBER))) is True

    again = LoyaltyService(create_application(keyed), KnownContacts(MEMBER), clock=clock)
    try:
        for service in (loyalty, again):
            erased = await service.get_member(MEMBER)
            assert erased == dataclasses.replace(before, birthday="", referred_by="")
            assert erased.balance.active == before.balance.active > 0
            assert await service.get_tier(MEMBER) == tier
        # The ledger goes on: points earned and spent without personal data.
        stored = await again.earn(ADMIN, MEMBER, Purchase([PurchaseLineInput("2", "30", "EUR")]))
        assert stored.outcome.version == before.version + 1
        await again.redeem(ADMIN, MEMBER, 10, "voucher-2")
        after = await again.get_member(MEMBER)
        assert after.balance.active == before.balance.active + 30 - 10
        assert (after.birthday, after.referred_by) == ("", "")
    finally:
        again.close()
    # The referrer's own record is untouched.
    referrer = await loyalty.get_member(REFERRER)
    assert [lot.reason for lot in referrer.lots] == ["bonus: referrer"]
    assert in_clear(keyed) == []


async def test_an_erased_contact_cannot_be_enrolled(
    loyalty: LoyaltyService, keyed: Settings, clock: Clock
) -> None:
    await busy_member(loyalty, clock)
    keys = loyalty.app.personal_data_keys
    assert keys is not None
    keys.destroy(str(member_id(NEWCOMER)))  # erased before it was ever a member
    log: Any = loyalty.app.recorder
    stored = log.max_notification_id()

    with pytest.raises(SubjectErased):
        await loyalty.enrol(ADMIN, NEWCOMER, "web", birthday="12-24")
    with pytest.raises(SubjectErased):
        await loyalty.enrol(ADMIN, NEWCOMER, "web")
    assert log.max_notification_id() == stored
    assert in_clear(keyed) == []
