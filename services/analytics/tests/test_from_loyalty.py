"""The loyalty membership in the 360 view, on plain documents: one loyalty event at a time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from contact_events import T0
from loyalty_events import (
    adjusted,
    cancelled,
    downgrade_scheduled,
    earned,
    enrolled,
    envelope,
    expired,
    released,
    rules_published,
    spent,
    tier_changed,
    when,
)

from crm_analytics.document import Loaded, UnknownEvent, is_known
from crm_analytics.from_loyalty import (
    ADAPTER,
    RECENT_ENTRIES,
    apply_loyalty_event,
    expiring_soon,
    mark_seen,
)
from crm_analytics.rest_api import to_json

ADA = "p-ada"
DAY = timedelta(days=1)


def replay(*events, doc=None):
    for event in events:
        doc = apply_loyalty_event(doc, event).doc
    return doc


def balance(doc):
    return doc["loyalty"]["balance"]


def test_an_enrolled_member_shows_with_an_empty_balance_and_no_tier_yet():
    doc = replay(enrolled(ADA, 3))
    part = doc["loyalty"]
    assert (part["member_number"], part["enrolment_channel"]) == ("M-0001", "web")
    assert part["enrolled_at"] == when(3)
    assert balance(doc) == {"active": 0, "locked": 0, "expired": 0, "spent": 0, "cancelled": 0}
    assert part["tier"] is None
    assert is_known(doc)
    assert doc["timeline"][0]["kind"] == "loyalty.enrolled"


def test_the_balance_follows_every_state_a_lot_goes_through():
    doc = replay(
        enrolled(ADA, 1),
        earned(ADA, 2, 2, "L1", 100, T0 + 300 * DAY),
        earned(ADA, 3, 3, "L2", 50, T0 + 200 * DAY, locked_until=T0 + 14 * DAY, order_id="o-1"),
    )
    assert balance(doc) == {"active": 100, "locked": 50, "expired": 0, "spent": 0, "cancelled": 0}
    doc = replay(spent(ADA, 4, 4, L1=30), doc=doc)
    assert balance(doc)["active"] == 70
    assert balance(doc)["spent"] == 30
    # A return cancels locked points: they leave `locked`, not `active`.
    doc = replay(cancelled(ADA, 5, 5, "o-1", L2=20), doc=doc)
    assert balance(doc) == {"active": 70, "locked": 30, "expired": 0, "spent": 30, "cancelled": 20}
    doc = replay(released(ADA, 6, 6, L2=30), doc=doc)
    assert balance(doc) == {"active": 100, "locked": 0, "expired": 0, "spent": 30, "cancelled": 20}
    doc = replay(expired(ADA, 7, 7, L1=70), adjusted(ADA, 8, 8, -10, L2=10), doc=doc)
    assert balance(doc) == {"active": 20, "locked": 0, "expired": 70, "spent": 40, "cancelled": 20}
    doc = replay(adjusted(ADA, 9, 9, 25, L3=25), doc=doc)
    assert balance(doc)["active"] == 45
    # Earned = the sum over every state, as on the ledger.
    assert sum(balance(doc).values()) == 100 + 50 + 25
    # Spent lots leave the list of open lots.
    assert [lot["lot_id"] for lot in doc["loyalty"]["lots"]] == ["L2", "L3"]


def test_the_balance_never_goes_negative_on_a_lot_never_seen():
    doc = replay(enrolled(ADA, 1), earned(ADA, 2, 2, "L1", 10, T0 + 30 * DAY))
    doc = replay(spent(ADA, 3, 3, L1=10, L0=5), doc=doc)
    assert balance(doc)["active"] == 0
    assert balance(doc)["spent"] == 15


def test_points_expiring_soon_are_the_unlocked_lots_of_the_next_30_days():
    now = T0 + 10 * DAY
    doc = replay(
        enrolled(ADA, 1),
        earned(ADA, 2, 2, "soon", 40, now + 5 * DAY),
        earned(ADA, 3, 3, "sooner", 10, now + 2 * DAY),
        earned(ADA, 4, 4, "later", 99, now + 31 * DAY),
        earned(ADA, 5, 5, "locked", 7, now + 3 * DAY, locked_until=now + DAY, order_id="o-9"),
    )
    soon = expiring_soon(doc["loyalty"], now)
    assert [(lot["lot_id"], lot["remaining"]) for lot in soon] == [("sooner", 10), ("soon", 40)]
    # Kept up to date as lots are spent and expire.
    doc = replay(spent(ADA, 6, 6, sooner=10, soon=15), doc=doc)
    assert [(lot["lot_id"], lot["remaining"]) for lot in expiring_soon(doc["loyalty"], now)] == [
        ("soon", 25)
    ]
    # Six days on, "soon" has passed its expiry and "later" entered the window.
    assert [lot["lot_id"] for lot in expiring_soon(doc["loyalty"], now + 6 * DAY)] == ["later"]
    doc = replay(released(ADA, 7, 7, locked=7), doc=doc)
    assert [lot["lot_id"] for lot in expiring_soon(doc["loyalty"], now)] == ["locked", "soon"]


def test_a_tier_change_shows_the_tier_and_its_qualifying_points():
    doc = replay(
        enrolled(ADA, 1),
        tier_changed(ADA, 2, 2, "basic", 0),
        tier_changed(ADA, 3, 3, "gold", 5200, from_tier="basic"),
    )
    part = doc["loyalty"]
    assert (part["tier"], part["qualifying_points"], part["tier_changed_at"]) == (
        "gold",
        5200,
        when(3),
    )
    assert doc["timeline"][0]["summary"] == "Tier changed from basic to gold"
    doc = replay(downgrade_scheduled(ADA, 4, 4, "silver", when(4) + 30 * DAY), doc=doc)
    assert doc["loyalty"]["downgrade"] == {"to_tier": "silver", "due_at": when(4) + 30 * DAY}
    doc = replay(downgrade_scheduled(ADA, 5, 5, "", None), doc=doc)
    assert doc["loyalty"]["downgrade"] is None
    assert to_json(doc)["loyalty"]["tier"] == "gold"


def test_recent_ledger_entries_are_bounded_and_newest_first():
    events = [enrolled(ADA, 1)]
    for n in range(RECENT_ENTRIES + 3):
        events.append(earned(ADA, 2 + n, 2 + n, f"L{n}", n + 1, T0 + 300 * DAY))
    doc = replay(*events)
    entries = doc["loyalty"]["recent_entries"]
    assert len(entries) == RECENT_ENTRIES
    assert entries[0]["points"] == RECENT_ENTRIES + 3
    assert entries[0]["kind"] == "earned"
    doc = replay(spent(ADA, 100, 100, L0=1), doc=doc)
    assert doc["loyalty"]["recent_entries"][0] | {"occurred_at": None} == {
        "entry_id": "m-p-ada:100",
        "kind": "spent",
        "points": -1,
        "detail": "r-1",
        "occurred_at": None,
    }


def test_the_erp_order_position_is_recorded_and_only_grows():
    doc = replay(
        enrolled(ADA, 1),
        earned(ADA, 2, 2, "L1", 10, T0 + 90 * DAY, order_id="o-1", erp_position=41),
        cancelled(ADA, 3, 3, "o-1", erp_position=57, L1=10),
    )
    assert doc["positions"] == {"loyalty": 3, "erp.orders": 57}
    doc = replay(spent(ADA, 4, 4), doc=doc)
    assert doc["positions"]["erp.orders"] == 57


def test_an_unknown_payload_still_moves_both_positions():
    unknown = envelope(ADA, 9, 9, erp_position=80)
    with pytest.raises(UnknownEvent):
        apply_loyalty_event(None, unknown)
    doc = {"_id": ADA, "customer_id": ADA}
    mark_seen(doc, unknown)
    assert doc["positions"] == {"loyalty": 9, "erp.orders": 80}


def test_a_redelivered_event_changes_nothing():
    doc = replay(enrolled(ADA, 1), earned(ADA, 2, 2, "L1", 10, T0 + 90 * DAY))
    again = apply_loyalty_event(doc, earned(ADA, 2, 2, "L1", 10, T0 + 90 * DAY))
    assert again.applied is False
    assert balance(again.doc)["active"] == 10


def test_earning_rules_change_no_customer():
    assert ADAPTER.apply(rules_published(4), Loaded({}, {})) is None
    assert list(ADAPTER.customers_touched(rules_published(4))) == []
