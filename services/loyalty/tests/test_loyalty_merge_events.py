"""A contacts merge and its undo as the relay publishes them: each member's event
keyed by its own contact, the survivor's listing the lots that came with their
points and expiry dates, the merged member's naming what left (on SQLite and
PostgreSQL)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from loyalty_support import Clock, KnownContacts

from crm.events.v1 import loyalty_pb2 as events_pb
from crm_common.commands import Caller
from crm_common.contact_events import ContactChange
from crm_loyalty.application import LoyaltyService
from crm_loyalty.contact_changes import LoyaltyContactChanges
from crm_loyalty.events_out import to_wire
from crm_loyalty.inputs import OrderLineInput, PlacedOrder, Purchase, PurchaseLineInput, RulesInput
from crm_loyalty.messages import timestamp
from crm_loyalty.views import LotView, MemberView

ADMIN = Caller(actor="admin-1", client="console")
ANN = "2b3c4d5e-0000-4000-8000-00000000a001"
DAN = "2b3c4d5e-0000-4000-8000-00000000d004"
RULES = RulesInput(rates={"EUR": "1"}, first_purchase_bonus=50)

Published = tuple[str, str, events_pb.LoyaltyEvent]


@pytest.fixture
def contacts() -> KnownContacts:
    return KnownContacts(ANN, DAN)


def change(kind: str, survivor: str, other: str, reference: str = "merge-1") -> ContactChange:
    return ContactChange(kind, survivor, (other,), reference, f"{survivor}:{kind}", "grace")


def log_end(service: LoyaltyService) -> int:
    recorder: Any = service.app.recorder
    return int(recorder.max_notification_id() or 0)


def published(service: LoyaltyService, after: int) -> list[Published]:
    """(key, CloudEvents type, message) of what the relay publishes past `after`."""
    app = service.app
    out: list[Published] = []
    recorder: Any = app.recorder
    for notification in recorder.select_notifications(after + 1, 1000):
        event: Any = app.mapper.to_domain_event(notification)
        wire = to_wire(event, getattr(event, "_meta", {}), notification.id)
        if wire is not None:
            key, ce_type, payload = wire
            out.append((key, ce_type, events_pb.LoyaltyEvent.FromString(payload)))
    return out


def of_type(events: list[Published], name: str) -> list[tuple[str, events_pb.LoyaltyEvent]]:
    return [(key, m) for key, t, m in events if t == f"crm.loyalty.v1.{name}"]


def figures(lot: events_pb.MovedLot | LotView) -> tuple[Any, ...]:
    return (lot.lot_id, lot.earned, lot.remaining, lot.spent, lot.expired, lot.cancelled)


def moved_lots(member: MemberView) -> list[LotView]:
    """The lots a merge or an undo moves: those holding points or an order's."""
    return [lot for lot in member.lots if lot.remaining > 0 or lot.order_id]


def stamp(at: datetime | None) -> Timestamp:
    """A time as the message holds it (unset: the empty timestamp)."""
    return timestamp(at) or Timestamp()


def purchase(line: str, amount: str) -> Purchase:
    return Purchase([PurchaseLineInput(line, amount, "EUR")], f"till-{line}")


async def test_a_merge_of_two_members_and_its_undo_are_published_on_both_members(
    service: LoyaltyService, clock: Clock
) -> None:
    changes = LoyaltyContactChanges(service)
    await service.publish_rules(ADMIN, RULES)
    await service.enrol(ADMIN, ANN, "web")
    await service.earn(ADMIN, ANN, purchase("1", "30"))
    await service.enrol(ADMIN, DAN, "app")
    await service.earn(ADMIN, DAN, purchase("2", "300"))
    await service.redeem(ADMIN, DAN, 40, "voucher-1")
    order = PlacedOrder("o-9", DAN, "EUR", [OrderLineInput("a", "70", "shoes")])
    await service.place_order(ADMIN, order)
    dan = await service.get_member(DAN)
    clock.advance(days=1)

    mark = log_end(service)
    await changes.contacts_merged(change("contacts_merged", ANN, DAN))
    events = published(service, mark)
    [(key, closed)] = of_type(events, "MembershipClosedByMerge")
    assert key == DAN == closed.customer_id
    moved = moved_lots(dan)
    assert closed.membership_closed_by_merge == events_pb.MembershipClosedByMerge(
        merge_id="merge-1",
        survivor_id=ANN,
        lot_ids=[lot.lot_id for lot in moved],
        order_ids=["o-9"],
    )
    [(key, merged)] = of_type(events, "MembershipMerged")
    assert key == ANN == merged.customer_id
    came = merged.membership_merged
    assert (came.merge_id, came.merged_contact_id, came.tier) == ("merge-1", DAN, "")
    assert list(came.order_ids) == ["o-9"]
    assert came.merged_enrolled_at == stamp(dan.enrolled_at)
    # Whole, with what was spent of them, their expiry dates and the order's lock.
    assert [figures(lot) for lot in came.lots] == [figures(lot) for lot in moved]
    assert [(lot.expires_at, lot.locked_until, lot.order_id) for lot in came.lots] == [
        (stamp(lot.expires_at), stamp(lot.locked_until), lot.order_id) for lot in moved
    ]
    assert sum(lot.remaining for lot in came.lots) == dan.balance.active + dan.balance.locked
    assert sum(lot.spent for lot in came.lots) == 40
    # Nothing of the merge stays unpublished: the survivor's member now holds the points.
    ann = await service.get_member(ANN)
    assert ann.balance.active == 30 + 50 + dan.balance.active

    # Spent on the survivor meanwhile (its own 80 first: they expire first), the
    # points stay spent on the lots that go back.
    await service.redeem(ADMIN, DAN, 100, "voucher-2")
    mark = log_end(service)
    await changes.merge_undone(change("contact_merge_undone", ANN, DAN))
    events = published(service, mark)
    [(key, undone)] = of_type(events, "MembershipMergeUndone")
    assert key == ANN
    assert undone.membership_merge_undone == events_pb.MembershipMergeUndone(
        merge_id="merge-1",
        merged_contact_id=DAN,
        lot_ids=[lot.lot_id for lot in moved],
        order_ids=["o-9"],
    )
    [(key, reopened)] = of_type(events, "MembershipReopened")
    assert key == DAN
    back = reopened.membership_reopened
    assert (back.merge_id, back.survivor_id, list(back.order_ids)) == ("merge-1", ANN, ["o-9"])
    dan_again = await service.get_member(DAN)
    assert [figures(lot) for lot in back.lots] == [figures(lot) for lot in moved_lots(dan_again)]
    assert sum(lot.spent for lot in back.lots) == 40 + 100 - 80
    for lot in [*came.lots, *back.lots]:
        assert lot.earned == lot.remaining + lot.spent + lot.expired + lot.cancelled

    # A redelivered undo publishes nothing.
    mark = log_end(service)
    await changes.merge_undone(change("contact_merge_undone", ANN, DAN))
    assert published(service, mark) == []


async def test_a_merge_that_enrols_the_survivor_publishes_its_enrolment_and_the_tier(
    service: LoyaltyService, clock: Clock
) -> None:
    changes = LoyaltyContactChanges(service)
    await service.publish_rules(ADMIN, RULES)
    await service.enrol(ADMIN, DAN, "store")
    await service.earn(ADMIN, DAN, purchase("1", "2500"))
    dan = await service.get_member(DAN)
    clock.advance(days=1)

    mark = log_end(service)
    await changes.contacts_merged(change("contacts_merged", ANN, DAN, reference="m-2"))
    events = published(service, mark)
    on_ann = [m.WhichOneof("payload") for key, _, m in events if key == ANN]
    assert on_ann[:2] == ["member_enrolled", "membership_merged"]
    [(_, enrolled)] = of_type(events, "MemberEnrolled")
    assert enrolled.member_enrolled.channel == "store"
    [(_, merged)] = of_type(events, "MembershipMerged")
    assert dan.tier and merged.membership_merged.tier == dan.tier
    assert [figures(lot) for lot in merged.membership_merged.lots] == [
        figures(lot) for lot in moved_lots(dan)
    ]
    assert [m.WhichOneof("payload") for key, _, m in events if key == DAN] == [
        "membership_closed_by_merge"
    ]
