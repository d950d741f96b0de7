"""End to end over the real processes: a member's earning and tier upgrade
through the loyalty service (gRPC), and an order an ERP publishes to the inbound
topic (`crm.erp.orders`, consumed by `crm-loyalty ingest`) → the loyalty event
store → relay → Kafka → the analytics projector → MongoDB → the 360 view,
read with `wait_for loyalty:<position>` and `wait_for erp.orders:<offset + 1>`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2 as c
from crm.contacts.v1 import contacts_pb2_grpc
from crm.customer360.v1 import customer360_pb2 as v
from crm.erp.v1 import orders_pb2 as erp
from crm.loyalty.v1 import loyalty_pb2 as lp
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_loyalty.simulator import ErpMessage, publish

# Marketing runs the programme and reads the 360 view.
E2E_CALLER = ("marketing", "e2e-marketer")


def request_id() -> str:
    return f"e2e-{uuid.uuid4().hex}"


@pytest.fixture
async def loyalty(platform: Any, caller: tuple[str, str]) -> Any:
    port = platform.stack.config.service_ports["loyalty"][0]
    async with platform.channel(f"127.0.0.1:{port}", *caller) as channel:
        yield loyalty_pb2_grpc.LoyaltyServiceStub(channel)


async def new_person(platform: Any) -> str:
    async with platform.channel(platform.contacts_grpc, "marketing", "e2e-marketer") as channel:
        created = await contacts_pb2_grpc.ContactsServiceStub(channel).CreatePerson(
            c.CreatePersonRequest(given_name="Ada", family_name=f"Byron{uuid.uuid4().hex[:6]}")
        )
    return str(created.result.id)


async def view(stub: Any, customer_id: str, wait_for: dict[str, int]) -> v.Customer360:
    response = await stub.GetCustomer360(
        v.GetCustomer360Request(customer_id=customer_id, wait_for=wait_for, wait_timeout_ms=20000)
    )
    return response.customer


def purchase(amount: str) -> list[lp.PurchaseLine]:
    return [
        lp.PurchaseLine(
            line_id="1", amount=lp.Money(amount=amount, currency="EUR"), category="garden"
        )
    ]


async def test_earning_and_a_tier_upgrade_show_in_the_360_view(
    platform: Any, loyalty: Any, customer360: Any
) -> None:
    person_id = await new_person(platform)
    enrolled = await loyalty.EnrolMember(
        lp.EnrolMemberRequest(
            request_id=request_id(), contact_id=person_id, channel=lp.ENROLMENT_CHANNEL_WEB
        )
    )
    doc = await view(customer360, person_id, {"loyalty": enrolled.result.position})
    assert doc.loyalty.member_number
    assert doc.loyalty.enrolment_channel == "web"
    assert doc.loyalty.balance == v.PointsBalance()

    small = await loyalty.EarnPoints(
        lp.EarnPointsRequest(
            request_id=request_id(),
            contact_id=person_id,
            lines=purchase("120.00"),
            reference="till-1",
        )
    )
    doc = await view(customer360, person_id, {"loyalty": small.result.position})
    assert doc.loyalty.balance.active == small.points > 0
    tier_before = await loyalty.GetTier(lp.GetTierRequest(contact_id=person_id))
    assert tier_before.next_tier  # there is a tier above to reach

    # Enough for the next tier: upgraded at once.
    needed = tier_before.points_to_next_tier
    big = await loyalty.EarnPoints(
        lp.EarnPointsRequest(
            request_id=request_id(),
            contact_id=person_id,
            lines=purchase(f"{needed + 10}.00"),
            reference="till-2",
        )
    )
    tier_after = await loyalty.GetTier(lp.GetTierRequest(contact_id=person_id))
    assert tier_after.tier == tier_before.next_tier

    doc = await view(customer360, person_id, {"loyalty": big.result.position})
    part = doc.loyalty
    assert part.balance.active == small.points + big.points
    assert part.tier == tier_after.tier
    assert part.qualifying_points == tier_after.qualifying_points
    assert part.HasField("tier_changed_at")
    assert [e.kind for e in part.recent_entries][:2] == ["earned", "earned"]
    assert [e.points for e in part.recent_entries][:2] == [big.points, small.points]
    kinds = [e.kind for e in doc.timeline if e.source == "loyalty"]
    assert kinds[0] == "loyalty.tier_changed"
    assert kinds.count("loyalty.earned") == 2
    assert "loyalty.enrolled" in kinds

    # REST: typed, null where unset.
    async with httpx.AsyncClient(base_url=platform.analytics_http, timeout=30) as http:
        reply = await http.get(
            f"/customers/{person_id}/360",
            params={"wait_for": f"loyalty:{big.result.position}"},
            headers=platform.headers("marketing"),
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["loyalty"]["tier"] == tier_after.tier
    assert body["loyalty"]["balance"]["active"] == small.points + big.points
    assert body["loyalty"]["downgrade"] is None
    assert body["tickets"] is None


async def test_an_erp_order_shows_once_its_record_position_is_applied(
    platform: Any, loyalty: Any, customer360: Any
) -> None:
    person_id = await new_person(platform)
    enrolled = await loyalty.EnrolMember(
        lp.EnrolMemberRequest(
            request_id=request_id(), contact_id=person_id, channel=lp.ENROLMENT_CHANNEL_STORE
        )
    )
    order_id = f"o-{uuid.uuid4().hex[:10]}"
    placed_at = Timestamp()
    placed_at.FromDatetime(datetime.now(UTC))
    order = erp.OrderEvent(
        order_id=order_id,
        customer_ref=person_id,
        occurred_at=placed_at,
        placed=erp.OrderPlaced(
            currency="EUR",
            lines=[
                erp.OrderLine(
                    line_id="1", sku="SPADE", category="garden", quantity=1, amount="40.00"
                ),
                erp.OrderLine(
                    line_id="2", sku="SEEDS", category="garden", quantity=3, amount="9.00"
                ),
            ],
        ),
    )
    [(partition, offset)] = await publish(
        platform.stack.kafka_bootstrap,
        [ErpMessage(person_id, "crm.erp.v1.OrderPlaced", order, f"erp-{order_id}")],
    )

    doc = await view(
        customer360, person_id, {"erp.orders": offset + 1, "loyalty": enrolled.result.position}
    )
    assert doc.positions["erp.orders"] >= offset + 1
    part = doc.loyalty
    # The balance the loyalty service itself shows: the order's points, locked
    # during its return window (how many depends on the earning rules in force).
    member = (await loyalty.GetMember(lp.GetMemberRequest(contact_id=person_id))).member
    assert member.balance.locked > 0
    assert (part.balance.locked, part.balance.active) == (member.balance.locked, 0)
    [entry] = [e for e in part.recent_entries if e.kind == "earned"]
    assert (entry.points, entry.detail) == (member.balance.locked, f"order {order_id}")
    assert partition >= 0
