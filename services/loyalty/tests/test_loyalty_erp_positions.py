"""The contract with the 360 view: every event an ERP order record causes carries
the record's partition and position (offset + 1); a redelivery causes none."""

from __future__ import annotations

from typing import Any

from crm.events.v1 import loyalty_pb2 as events_pb
from crm_common.commands import Caller
from crm_loyalty.application import LoyaltyService
from crm_loyalty.events_out import to_wire
from crm_loyalty.inputs import ErpSource, OrderLineInput, PlacedOrder, ReturnedOrder

ERP = Caller(actor="erp", client="crm-loyalty-ingest")


def published(service: LoyaltyService, after: int = 0) -> list[events_pb.LoyaltyEvent]:
    """What the relay would publish from the store, after log position `after`."""
    app = service.app
    out: list[events_pb.LoyaltyEvent] = []
    for notification in app.recorder.select_notifications(after + 1, 1000):
        event: Any = app.mapper.to_domain_event(notification)
        wire = to_wire(event, getattr(event, "_meta", {}), notification.id)
        if wire is not None:
            out.append(events_pb.LoyaltyEvent.FromString(wire[2]))
    return out


def last_position(service: LoyaltyService) -> int:
    return service.app.recorder.max_notification_id() or 0


async def test_order_events_carry_the_inbound_position_and_a_redelivery_writes_none(
    service: LoyaltyService,
) -> None:
    order = PlacedOrder(
        "o-1", "c-1", "EUR", [OrderLineInput("1", "100", "books"), OrderLineInput("2", "0.5", "")]
    )
    await service.place_order(ERP, order, ErpSource(partition=2, position=41))
    events = [e for e in published(service) if e.customer_id == "c-1"]
    by_payload = {e.WhichOneof("payload"): e for e in events}
    # The enrolment the order caused is not the order's event; the earning is.
    assert by_payload["member_enrolled"].erp_position == 0
    earned = by_payload["points_earned"]
    assert (earned.erp_partition, earned.erp_position) == (2, 41)
    assert earned.points_earned.points == 100 and earned.points_earned.order_id == "o-1"

    mark = last_position(service)
    again = await service.place_order(
        Caller(actor="erp", client="x", request_id="other"), order, ErpSource(2, 57)
    )
    assert not again.applied
    assert published(service, mark) == []

    # A return of 0 points (the line earned none) still writes an event at its position.
    zero = ReturnedOrder("o-1", "c-1", "r-1", ["2"])
    assert (await service.return_order(ERP, zero, ErpSource(2, 60))).points == 0
    after_return = published(service, mark)
    assert [e.WhichOneof("payload") for e in after_return] == ["points_cancelled"]
    assert (after_return[0].erp_partition, after_return[0].erp_position) == (2, 60)

    mark = last_position(service)
    assert not (await service.return_order(ERP, zero, ErpSource(2, 61))).applied
    assert published(service, mark) == []


async def test_an_order_worth_no_points_still_writes_an_event(service: LoyaltyService) -> None:
    order = PlacedOrder("o-0", "c-2", "JPY", [OrderLineInput("1", "10", "")])
    outcome = await service.place_order(ERP, order, ErpSource(0, 7))
    assert outcome.applied and outcome.points == 0
    earned = [e for e in published(service) if e.WhichOneof("payload") == "points_earned"]
    assert [(e.points_earned.points, e.erp_position) for e in earned] == [(0, 7)]


async def test_commands_not_from_the_erp_carry_no_position(service: LoyaltyService) -> None:
    await service.enrol(Caller(actor="a", client="c"), "c-1", "web")
    await service.adjust(Caller(actor="a", client="c"), "c-1", 10, "welcome")
    assert {(e.erp_partition, e.erp_position) for e in published(service)} == {(0, 0)}
