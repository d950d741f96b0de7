"""The loyalty membership in the 360 view, on plain documents: one loyalty event at a time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from contact_events import T0
from loyalty_events import (
    adjusted,
    cancelled,
    closed_by_merge,
    downgrade_scheduled,
    earned,
    enrolled,
    envelope,
    expired,
    membership_merged,
    merge_undone,
    moved_lot,
    released,
    reopened,
    rules_published,
    spent,
    tier_changed,
    when,
)

from crm_analytics.document import Detached, Loaded, UnknownEvent, is_known
from crm_analytics.from_loyalty import (
    ADAPTER,
    RECENT_ENTRIES,
    apply_loyalty_event,
    expiring_soon,
    mark_seen,
)
from crm_analytics.rest_api import to_json

ADA, DAN = "p-ada", "p-dan"
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


# -- a membership moved by a contacts merge, and back by its undo ----------------------------


def apply_with_fan_out(docs, event):
    """Applies `event` as the store does: to its customer's document, then each
    `Detached` fan-out to the document it names."""
    outcome = ADAPTER.apply(event, Loaded(docs, {}))
    assert outcome is not None and outcome.applied
    docs = {**docs, outcome.doc["_id"]: outcome.doc}
    for fan_out in outcome.fan_out:
        assert isinstance(fan_out, Detached)
        if docs.get(fan_out.customer_id) is not None:
            docs[fan_out.customer_id] = fan_out.change(docs[fan_out.customer_id])
    return docs


def two_members():
    """ADA with 30 points of her own; DAN with 260 left of a lot of 300 and an
    order's 70 locked."""
    ada = replay(enrolled(ADA, 1), earned(ADA, 2, 2, "A1", 30, T0 + 300 * DAY))
    dan = replay(
        enrolled(DAN, 3),
        earned(DAN, 4, 2, "D1", 300, T0 + 20 * DAY),
        earned(DAN, 5, 3, "D2", 70, T0 + 200 * DAY, locked_until=T0 + 14 * DAY, order_id="o-9"),
        spent(DAN, 6, 4, D1=40),
    )
    return {ADA: ada, DAN: dan}


def moved_from_dan():
    return [
        moved_lot("D1", 260, T0 + 20 * DAY, spent=40),
        moved_lot("D2", 70, T0 + 200 * DAY, locked_until=T0 + 14 * DAY, order_id="o-9"),
    ]


def test_a_merged_membership_shows_on_the_survivor_as_if_earned_there():
    docs = two_members()
    merged = membership_merged(ADA, 8, 3, DAN, moved_from_dan(), merged_enrolled_at=when(3))
    assert list(ADAPTER.customers_touched(merged)) == [ADA, DAN]
    docs = apply_with_fan_out(docs, closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"]))
    docs = apply_with_fan_out(docs, merged)

    ada = docs[ADA]
    assert balance(ada) == {"active": 290, "locked": 70, "expired": 0, "spent": 40, "cancelled": 0}
    assert [lot["lot_id"] for lot in ada["loyalty"]["lots"]] == ["A1", "D1", "D2"]
    # The lot keeps its expiry date: it counts among the points expiring soon.
    soon = expiring_soon(ada["loyalty"], T0 + 10 * DAY)
    assert [(lot["lot_id"], lot["remaining"]) for lot in soon] == [("D1", 260)]
    # DAN enrolled later than ADA: her membership still counts from her own enrolment.
    assert ada["loyalty"]["enrolled_at"] == when(1)
    entry = ada["timeline"][0]
    assert (entry["kind"], entry["summary"]) == (
        "loyalty.merged_in",
        "Membership merged in (contacts merged): 330 points",
    )
    assert ada["loyalty"]["recent_entries"][0]["points"] == 330

    dan = docs[DAN]
    assert balance(dan) == {"active": 0, "locked": 0, "expired": 0, "spent": 0, "cancelled": 0}
    assert dan["loyalty"]["lots"] == []
    assert dan["loyalty"]["closed_by_merge"] == {
        "survivor_id": ADA,
        "merge_id": "mg-1",
        "closed_at": when(7),
    }
    assert dan["loyalty"]["recent_entries"][0]["points"] == -330
    assert expiring_soon(dan["loyalty"], T0 + 10 * DAY) == []
    assert to_json(dan)["loyalty"]["balance"]["active"] == 0

    # Later events of the survivor's member act on the lots that came.
    docs = apply_with_fan_out(docs, released(ADA, 9, 4, D2=70))
    docs = apply_with_fan_out(docs, spent(ADA, 10, 5, A1=30, D1=70))
    assert balance(docs[ADA]) == {
        "active": 260,
        "locked": 0,
        "expired": 0,
        "spent": 140,
        "cancelled": 0,
    }


def test_either_order_of_the_two_members_events_gives_the_same_documents():
    closed = closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"])
    merged = membership_merged(ADA, 8, 3, DAN, moved_from_dan())
    one = apply_with_fan_out(apply_with_fan_out(two_members(), closed), merged)
    other = apply_with_fan_out(apply_with_fan_out(two_members(), merged), closed)
    assert one == other


def test_a_redelivered_merge_moves_nothing_twice():
    docs = two_members()
    merged = membership_merged(ADA, 8, 3, DAN, moved_from_dan())
    docs = apply_with_fan_out(docs, closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"]))
    docs = apply_with_fan_out(docs, merged)
    again = ADAPTER.apply(merged, Loaded(docs, {}))
    assert again is not None and again.applied is False and again.fan_out == []
    closed = apply_loyalty_event(docs[DAN], closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"]))
    assert closed.applied is False


def test_an_undone_merge_gives_the_lots_back_as_they_are_now():
    docs = two_members()
    docs = apply_with_fan_out(docs, closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"]))
    docs = apply_with_fan_out(docs, membership_merged(ADA, 8, 3, DAN, moved_from_dan()))
    # The survivor spent 100 of D1 meanwhile, and the order's lock ended.
    docs = apply_with_fan_out(docs, released(ADA, 9, 4, D2=70))
    docs = apply_with_fan_out(docs, spent(ADA, 10, 5, D1=100))

    back = [
        moved_lot("D1", 160, T0 + 20 * DAY, spent=140),
        moved_lot("D2", 70, T0 + 200 * DAY, order_id="o-9"),
    ]
    docs = apply_with_fan_out(docs, merge_undone(ADA, 11, 6, DAN, ["D1", "D2"]))
    docs = apply_with_fan_out(docs, reopened(DAN, 12, 6, ADA, back))

    ada = docs[ADA]
    # ADA's view is as before the merge: her own lot, nothing of DAN's history.
    assert balance(ada) == {"active": 30, "locked": 0, "expired": 0, "spent": 0, "cancelled": 0}
    assert [lot["lot_id"] for lot in ada["loyalty"]["lots"]] == ["A1"]
    assert ada["timeline"][0]["summary"] == "Points given back (merge undone): 230 points"
    dan = docs[DAN]
    assert "closed_by_merge" not in dan["loyalty"]
    assert balance(dan) == {"active": 230, "locked": 0, "expired": 0, "spent": 140, "cancelled": 0}
    assert [(lot["lot_id"], lot["remaining"]) for lot in dan["loyalty"]["lots"]] == [
        ("D1", 160),
        ("D2", 70),
    ]
    assert dan["timeline"][0]["kind"] == "loyalty.reopened"
    assert dan["timeline"][0]["summary"] == "Membership reopened (merge undone): 230 points"


def test_a_merge_that_enrolled_the_survivor_brings_the_tier_and_the_earlier_enrolment():
    earlier = when(1) - 400 * DAY
    docs = {DAN: replay(enrolled(DAN, 1), earned(DAN, 2, 2, "D1", 500, T0 + 90 * DAY))}
    docs = apply_with_fan_out(docs, enrolled(ADA, 4))
    moved = [moved_lot("D1", 500, T0 + 90 * DAY)]
    docs = apply_with_fan_out(
        docs, membership_merged(ADA, 5, 2, DAN, moved, tier="gold", merged_enrolled_at=earlier)
    )
    part = docs[ADA]["loyalty"]
    assert (part["tier"], part["tier_changed_at"], part["enrolled_at"]) == (
        "gold",
        when(5),
        earlier,
    )
    assert part["balance"]["active"] == 500
    assert to_json(docs[ADA])["loyalty"]["tier"] == "gold"


def test_a_malformed_merge_is_refused_and_changes_nothing():
    docs = two_members()
    wrong = moved_lot("D1", 260, T0 + 20 * DAY, spent=40)
    wrong.earned = 200
    with pytest.raises(ValueError, match="does not add up"):
        ADAPTER.apply(membership_merged(ADA, 8, 3, DAN, [wrong]), Loaded(docs, {}))
    with pytest.raises(ValueError, match="names no contact"):
        ADAPTER.apply(membership_merged(ADA, 8, 3, "", moved_from_dan()), Loaded(docs, {}))
    with pytest.raises(ValueError, match="names no survivor"):
        ADAPTER.apply(closed_by_merge(DAN, 7, 5, "", ["D1"]), Loaded(docs, {}))
    assert docs == two_members()


def test_a_survivor_behind_the_merged_members_undo_ends_as_in_log_order():
    """The survivor's partition lags: the merged member's undo (and its fan-out)
    is applied before the survivor's merge. Its totals wait for the history and
    end as when every event is applied in log order."""
    back = [
        moved_lot("D1", 160, T0 + 20 * DAY, spent=140),
        moved_lot("D2", 70, T0 + 200 * DAY, order_id="o-9"),
    ]
    ada_events = [
        membership_merged(ADA, 8, 3, DAN, moved_from_dan()),
        released(ADA, 9, 4, D2=70),
        spent(ADA, 10, 5, D1=100),
        merge_undone(ADA, 11, 6, DAN, ["D1", "D2"]),
    ]
    dan_events = [closed_by_merge(DAN, 7, 5, ADA, ["D1", "D2"]), reopened(DAN, 12, 6, ADA, back)]
    in_order = two_members()
    for event in sorted([*ada_events, *dan_events], key=lambda e: e.position):
        in_order = apply_with_fan_out(in_order, event)
    lagging = two_members()
    for event in [*dan_events, *ada_events]:
        lagging = apply_with_fan_out(lagging, event)
        assert all(min(balance(doc).values()) >= 0 for doc in lagging.values())
    assert lagging == in_order
    assert "moved_out_pending" not in lagging[ADA]["loyalty"]
    assert balance(lagging[ADA])["spent"] == 0
