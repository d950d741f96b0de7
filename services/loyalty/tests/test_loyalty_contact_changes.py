"""Loyalty honours erased and merged contacts, on SQLite and PostgreSQL.

The changes come as the contacts follower hands them over
(`crm_loyalty.contact_changes.LoyaltyContactChanges`); the Kafka side is in
test_loyalty_contacts_follower.py. Every test runs with master keys, as
production does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from loyalty_support import Clock, KnownContacts

from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_common.errors import RuleViolated
from crm_common.privacy import SubjectErased, new_master_key
from crm_common.privacy.export import export_json
from crm_common.settings import Settings
from crm_deploy import testing
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.contact_changes import LoyaltyContactChanges
from crm_loyalty.domain.members import member_id
from crm_loyalty.events_out import to_wire
from crm_loyalty.inputs import (
    MemberQuery,
    OrderLineInput,
    PlacedOrder,
    Purchase,
    PurchaseLineInput,
    ReturnedOrder,
    RulesInput,
)
from crm_loyalty.views import MemberView

ADMIN = Caller(actor="admin-1", client="console")
ANN = "1a2b3c4d-0000-4000-8000-00000000a001"
BOB = "1a2b3c4d-0000-4000-8000-00000000b002"
CAT = "1a2b3c4d-0000-4000-8000-00000000c003"
DAN = "1a2b3c4d-0000-4000-8000-00000000d004"
ANN_BIRTHDAY = "11-29"
DAN_BIRTHDAY = "07-14"
RULES = RulesInput(rates={"EUR": "1"}, first_purchase_bonus=50, referrer_bonus=200)
STORED_TABLES = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgres": ("loyalty_events", "loyalty_snapshots"),
}
KEY_TABLES = ("privacy_data_keys", "privacy_key_access")
QUERY_TABLES = ("members", "rewards", "query_tracking")


@pytest.fixture
def keyed(store_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The store with master keys, snapshots every 3 events."""
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "3")
    return dataclasses.replace(store_settings, master_keys=new_master_key("m-loyalty"))


@pytest.fixture
def loyalty(keyed: Settings, clock: Clock) -> Iterator[LoyaltyService]:
    service = LoyaltyService(
        create_application(keyed), KnownContacts(ANN, BOB, CAT, DAN), clock=clock
    )
    yield service
    service.close()


def change(kind: str, contact: str, *others: str, reference: str = "merge-1") -> ContactChange:
    """A change as the follower hands it over; its event id is the same for the same
    arguments (a redelivery)."""
    return ContactChange(kind, contact, others, reference, f"{contact}:{reference}:{kind}", "grace")


async def exported(service: LoyaltyService, contact_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(service.export_personal_data, contact_id)


def log_length(service: LoyaltyService) -> int:
    recorder: Any = service.app.recorder
    return int(recorder.max_notification_id() or 0)


def purchase(line: str, amount: str) -> Purchase:
    return Purchase([PurchaseLineInput(line, amount, "EUR")], f"till-{line}")


def every_table(settings: Settings) -> tuple[str, ...]:
    return (*STORED_TABLES[settings.event_store], *KEY_TABLES, *QUERY_TABLES)


def rows_of(settings: Settings, contact_id: str) -> bytes:
    """Every stored row about the member of `contact_id`: its events, its
    snapshots and its row of the members table."""
    tables = testing.stored_rows(settings, every_table(settings))
    ident = member_id(contact_id)
    own = [
        row
        for table in STORED_TABLES[settings.event_store]
        for row in tables[table]
        if uuid.UUID(str(row["originator_id"])) == ident
    ]
    own += [row for row in tables["members"] if row["contact_id"] == contact_id]
    assert own, f"the rows of {contact_id} were scanned"
    cells = [v for row in own for v in row.values() if v is not None]
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in cells)


# -- erasure ---------------------------------------------------------------------------------


async def test_an_erased_person_leaves_no_birthday_or_referrer_readable_and_keeps_the_points(
    loyalty: LoyaltyService, keyed: Settings, clock: Clock
) -> None:
    changes = LoyaltyContactChanges(loyalty)
    await loyalty.publish_rules(ADMIN, RULES)
    await loyalty.enrol(ADMIN, BOB, "web")
    enrolling = dataclasses.replace(ADMIN, request_id="enrol-ann")
    await loyalty.enrol(enrolling, ANN, "store", birthday=ANN_BIRTHDAY, referred_by=BOB)
    await loyalty.earn(ADMIN, ANN, purchase("1", "120"))
    await loyalty.enrol(ADMIN, DAN, "app", birthday=DAN_BIRTHDAY)
    await loyalty.earn(ADMIN, DAN, purchase("2", "30"))
    await changes.contacts_merged(change("contacts_merged", ANN, DAN))
    before = await loyalty.get_member(ANN)
    tier = await loyalty.get_tier(ANN)
    referrer = await loyalty.get_member(BOB)
    assert (before.birthday, before.referred_by) == (ANN_BIRTHDAY, BOB)
    assert before.balance.active == 120 + 50 + 30 + 50
    assert referrer.balance.active == 200

    erased = change("person_erased", ANN, DAN, reference="dsr-7")
    await changes.person_erased(erased)
    length = log_length(loyalty)
    await changes.person_erased(erased)  # delivered again: nothing more happens
    assert log_length(loyalty) == length

    after = await loyalty.get_member(ANN)
    assert after == dataclasses.replace(before, birthday="", referred_by="")
    assert await loyalty.get_tier(ANN) == tier
    dan = await exported(loyalty, DAN)
    assert dan["member"]["birthday"] == "[erased]"
    ann = await exported(loyalty, ANN)
    assert (ann["member"]["birthday"], ann["member"]["referred_by"]) == ("[erased]", "[erased]")
    assert ann["member"]["balance"]["active"] == before.balance.active
    for contact in (ANN, DAN):
        with pytest.raises(SubjectErased):
            await loyalty.enrol(ADMIN, contact, "web", birthday="01-02")

    # A raw scan of every table: no birthday, and the referrer nowhere in the member's rows.
    births = [f'"{ANN_BIRTHDAY}"', f'"{DAN_BIRTHDAY}"']
    assert testing.found_in_clear(keyed, every_table(keyed), births) == []
    assert BOB.encode() not in rows_of(keyed, ANN)
    assert uuid.UUID(BOB).hex.encode() not in rows_of(keyed, ANN)
    # The enrolment's receipt cannot be matched against guessed birthdays.
    guesses = [
        enrolling.command("EnrolMember", ANN, "store", day, BOB).fingerprint
        for day in (ANN_BIRTHDAY, "01-01", "")
    ]
    assert testing.found_in_clear(keyed, every_table(keyed), guesses) == []
    # The scan sees the business facts next to them.
    assert testing.found_in_clear(keyed, every_table(keyed), [ANN, "till-1"]) == [ANN, "till-1"]

    # The query tables rebuilt from the log after the erase hold nothing more.
    with loyalty.queries.side.database.write() as tx:
        tx.execute("UPDATE query_tracking SET version = 0")
    rebuilt = LoyaltyService(create_application(keyed), KnownContacts(), clock=clock)
    try:
        page = await rebuilt.list_members(MemberQuery())
        assert {m.contact_id: m.balance.active for m in page.members} == {
            ANN: before.balance.active,
            BOB: referrer.balance.active,
        }
    finally:
        rebuilt.close()
    assert testing.found_in_clear(keyed, every_table(keyed), births) == []
    assert BOB.encode() not in rows_of(keyed, ANN)


async def test_an_erase_without_master_keys_is_refused(
    store_settings: Settings, clock: Clock
) -> None:
    service = LoyaltyService(create_application(store_settings), KnownContacts(ANN), clock=clock)
    try:
        await service.enrol(ADMIN, ANN, "web", birthday=ANN_BIRTHDAY)
        with pytest.raises(RuleViolated, match="without master keys"):
            await LoyaltyContactChanges(service).person_erased(change("person_erased", ANN))
        assert (await service.get_member(ANN)).birthday == ANN_BIRTHDAY
    finally:
        service.close()


# -- merges ----------------------------------------------------------------------------------


async def test_a_merged_member_moves_onto_a_survivor_who_was_no_member_and_back(
    loyalty: LoyaltyService, keyed: Settings, clock: Clock
) -> None:
    changes = LoyaltyContactChanges(loyalty)
    await loyalty.publish_rules(ADMIN, RULES)
    await loyalty.enrol(ADMIN, DAN, "app", birthday=DAN_BIRTHDAY)
    await loyalty.earn(ADMIN, DAN, purchase("1", "1200"))
    await loyalty.redeem(ADMIN, DAN, 40, "voucher-1")
    order = PlacedOrder(
        order_id="o-9",
        customer_ref=DAN,
        currency="EUR",
        lines=[OrderLineInput("a", "70", "shoes")],
    )
    await loyalty.place_order(ADMIN, order)
    dan = await loyalty.get_member(DAN)
    dan_tier = await loyalty.get_tier(DAN)
    clock.advance(days=2)

    merged = change("contacts_merged", ANN, DAN)
    await changes.contacts_merged(merged)
    length = log_length(loyalty)
    await changes.contacts_merged(merged)  # delivered again: nothing more is written
    assert log_length(loyalty) == length

    ann = await loyalty.get_member(ANN)
    assert ann.contact_id == ANN
    assert (ann.birthday, ann.channel, ann.enrolled_at) == (DAN_BIRTHDAY, "app", dan.enrolled_at)
    assert dan.tier != "basic" and ann.tier == dan.tier
    assert (await loyalty.get_tier(ANN)).tier == dan_tier.tier
    assert ann.balance == dan.balance
    # The lots came with their expiry dates, the order's lot still locked.
    assert {(x.lot_id, x.remaining, x.expires_at, x.locked) for x in ann.lots} == {
        (x.lot_id, x.remaining, x.expires_at, x.locked) for x in dan.lots
    }
    # The merged contact answers for the survivor; its own membership is closed.
    assert await loyalty.get_member(DAN) == ann
    closed = await exported(loyalty, DAN)
    assert closed["member"]["merged_into"] == ANN
    assert closed["member"]["balance"]["active"] == 0
    listed = await loyalty.list_members(MemberQuery())
    assert [m.contact_id for m in listed.members] == [ANN]
    with pytest.raises(RuleViolated, match=f"merged into {ANN}"):
        await loyalty.enrol(ADMIN, DAN, "web")

    # Points earned, spent and returned under the merged contact's id land on the survivor.
    earned = await loyalty.earn(ADMIN, DAN, purchase("2", "25"))
    assert isinstance(earned.subject, MemberView) and earned.subject.contact_id == ANN
    await loyalty.redeem(ADMIN, DAN, 10, "voucher-2")
    returned = ReturnedOrder(order_id="o-9", customer_ref=DAN, return_id="r-1", line_ids=["a"])
    assert (await loyalty.return_order(ADMIN, returned)).points == 70
    await loyalty.earn(ADMIN, ANN, purchase("3", "5"))  # the survivor's own
    ann = await loyalty.get_member(ANN)
    assert ann.balance.active == dan.balance.active + 25 - 10 + 5
    assert ann.balance.locked == 0

    undone = change("contact_merge_undone", ANN, DAN)
    await changes.merge_undone(undone)
    length = log_length(loyalty)
    await changes.merge_undone(undone)
    assert log_length(loyalty) == length

    # Back: the lots it brought as they are now (10 of them were spent meanwhile,
    # the returned order cancelled), and the 25 earned under its id since.
    dan_again = await loyalty.get_member(DAN)
    assert dan_again.contact_id == DAN and dan_again.merged_into == ""
    assert dan_again.birthday == DAN_BIRTHDAY
    assert dan_again.balance.active == dan.balance.active + 25 - 10
    assert dan_again.balance.cancelled == 70
    assert {x.lot_id for x in dan.lots} < {x.lot_id for x in dan_again.lots}
    # The survivor stays a member with its own purchase only.
    ann_again = await loyalty.get_member(ANN)
    assert ann_again.balance.active == 5 and len(ann_again.lots) == 1
    assert ann_again.birthday == ""
    listed = await loyalty.list_members(MemberQuery())
    assert [m.contact_id for m in listed.members] == sorted([ANN, DAN])
    # Reloaded from the store (snapshots included), the same.
    again = LoyaltyService(create_application(keyed), KnownContacts(), clock=clock)
    try:
        assert await again.get_member(DAN) == dan_again
        assert await again.get_member(ANN) == ann_again
    finally:
        again.close()
    # The relay publishes the merge's moves too (test_loyalty_merge_events.py).
    recorder: Any = loyalty.app.recorder
    kept = set()
    for notification in recorder.select_notifications(1, 10_000):
        event = loyalty.app.mapper.to_domain_event(notification)
        if to_wire(event, {}, notification.id) is None:
            kept.add(type(event).__name__)
    assert not {"MergedAway", "MergedIn", "MergeReversed", "MergeRestored"} & kept


async def test_two_members_merged_keep_their_expiry_dates_and_an_undo_gives_back(
    loyalty: LoyaltyService, clock: Clock
) -> None:
    changes = LoyaltyContactChanges(loyalty)
    await loyalty.publish_rules(ADMIN, RULES)
    await loyalty.enrol(ADMIN, BOB, "web")
    await loyalty.earn(ADMIN, BOB, purchase("1", "100"))
    clock.advance(days=30)
    await loyalty.enrol(ADMIN, CAT, "store", birthday=ANN_BIRTHDAY)
    await loyalty.earn(ADMIN, CAT, purchase("2", "80"))
    bob, cat = await loyalty.get_member(BOB), await loyalty.get_member(CAT)

    await changes.contacts_merged(change("contacts_merged", BOB, CAT, reference="m-7"))
    merged = await loyalty.get_member(BOB)
    assert merged.contact_id == BOB
    assert merged.balance.active == bob.balance.active + cat.balance.active
    assert merged.birthday == ANN_BIRTHDAY  # BOB had given none
    expiries = {x.lot_id: x.expires_at for x in (*bob.lots, *cat.lots)}
    assert {x.lot_id: x.expires_at for x in merged.lots} == expiries
    # A redemption takes the lots that expire first: all of BOB's own, then CAT's.
    await loyalty.redeem(ADMIN, CAT, 170, "voucher-3")
    spent = {x.lot_id: x.spent for x in (await loyalty.get_member(BOB)).lots}
    assert sum(spent.values()) == 170
    assert all(spent[x.lot_id] == x.earned for x in bob.lots)

    # An undo of another merge changes nothing.
    length = log_length(loyalty)
    await changes.merge_undone(change("contact_merge_undone", BOB, CAT, reference="m-other"))
    assert log_length(loyalty) == length

    await changes.merge_undone(change("contact_merge_undone", BOB, CAT, reference="m-7"))
    cat_again = await loyalty.get_member(CAT)
    bob_again = await loyalty.get_member(BOB)
    taken_from_cat = 170 - bob.balance.active
    assert cat_again.balance.active == cat.balance.active - taken_from_cat
    assert cat_again.balance.spent == taken_from_cat
    assert bob_again.balance.active == 0 and bob_again.balance.spent == bob.balance.active
    assert bob_again.birthday == "" and cat_again.birthday == ANN_BIRTHDAY
    assert {x.lot_id for x in cat_again.lots} == {x.lot_id for x in cat.lots}
    # The merge can be honoured again afterwards (a second merge of the same contacts).
    await changes.contacts_merged(change("contacts_merged", BOB, CAT, reference="m-8"))
    assert (await loyalty.get_member(CAT)).contact_id == BOB


async def test_a_merge_of_contacts_that_are_no_members_writes_nothing(
    loyalty: LoyaltyService,
) -> None:
    changes = LoyaltyContactChanges(loyalty)
    await loyalty.enrol(ADMIN, BOB, "web")
    length = log_length(loyalty)
    await changes.contacts_merged(change("contacts_merged", ANN, CAT, DAN))
    await changes.merge_undone(change("contact_merge_undone", ANN, CAT, DAN))
    assert log_length(loyalty) == length


async def test_the_export_names_every_lot_and_event_of_the_member(
    loyalty: LoyaltyService,
) -> None:
    assert await exported(loyalty, ANN) == {
        "member": None,
        "ledger": [],
        "history": [],
    }
    await loyalty.publish_rules(ADMIN, RULES)
    await loyalty.enrol(ADMIN, BOB, "web")
    await loyalty.enrol(ADMIN, ANN, "store", birthday=ANN_BIRTHDAY, referred_by=BOB)
    await loyalty.earn(ADMIN, ANN, purchase("1", "40"))

    document = json.loads(export_json(await exported(loyalty, ANN)))
    member = document["member"]
    assert (member["birthday"], member["referred_by"], member["merged_into"]) == (
        ANN_BIRTHDAY,
        BOB,
        "",
    )
    assert sorted(lot["reason"] for lot in document["ledger"]) == [
        "bonus: first purchase",
        "till-1",
    ]
    events = [entry["event"] for entry in document["history"]]
    assert events[0] == "Created" and "ReferralSettled" in events
    assert document["history"][0]["birthday"] == ANN_BIRTHDAY
