"""The loyalty application layer, shared by the gRPC and REST adapters and the
ERP ingest process.

Writes go through the shared command bus (optimistic concurrency, request-id
replay, audit metadata, group commit). A member is named by its contact id;
enrolling checks the contact over the contacts service (`ContactsPort`).
ERP orders are idempotent twice over: their request ids derive from the
order (`erp:<order>:placed`), and the member aggregate itself applies an
order's placement and each return once, whatever the receipts' retention.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.utils import get_topic

from crm_common.commands import Caller, CommandBus, CommandContext, UnitOfWork, WriteOutcome
from crm_common.errors import NotFound, RuleViolated
from crm_common.eventstore import application_env, creating_tables
from crm_common.settings import Settings
from crm_loyalty import validation
from crm_loyalty.domain import (
    DEFAULT_RULES,
    DEFAULT_TIERS,
    RULES_ID,
    EarningRules,
    Member,
    Rules,
    TierPolicy,
    expiry_of,
    member_id,
)
from crm_loyalty.domain.parking import PARKING_ID, ParkedOrders
from crm_loyalty.inputs import PlacedOrder, Purchase, ReturnedOrder, RulesInput
from crm_loyalty.views import (
    MemberView,
    ParkedView,
    TierView,
    Written,
    member_view,
    tier_view,
)

SERVICE = "loyalty"


class LoyaltyApplication(Application[UUID]):
    """The event store of members, earning rules and parked ERP orders."""

    name = "loyalty"


def create_application(settings: Settings) -> LoyaltyApplication:
    with creating_tables(settings):
        return LoyaltyApplication(env=application_env(settings))


class ContactsPort(Protocol):
    async def ensure_exists(self, contact_id: str) -> None:
        """Raises NotFound unless `contact_id` is a contact of the platform."""


class CustomerNotKnown(NotFound):
    """An ERP order names a customer the contacts service does not know (yet)."""


@dataclass(frozen=True)
class OrderOutcome:
    written: Written
    #: False when the order (or return) had been applied before: nothing changed.
    applied: bool
    points: int


class LoyaltyService:
    """Use cases of the loyalty service."""

    def __init__(
        self,
        app: LoyaltyApplication,
        contacts: ContactsPort | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        tiers: TierPolicy = DEFAULT_TIERS,
    ) -> None:
        self.app = app
        self.contacts = contacts
        self.clock = clock
        self.tiers = tiers
        self.bus = CommandBus(app, SERVICE)
        self._members_position = 0
        self._contact_ids: list[str] = []

    def close(self) -> None:
        self.bus.close()
        self.app.close()

    # -- plumbing ---------------------------------------------------------------

    def _load(self, ident: UUID) -> Any:
        try:
            return self.app.repository.get(ident)
        except AggregateNotFoundError:
            return None

    def _member(self, contact_id: str) -> Member:
        member = self._load(member_id(contact_id))
        if not isinstance(member, Member):
            raise NotFound("Member", contact_id)
        return member

    async def _write(self, ctx: CommandContext, decide: Callable[[UnitOfWork], Any]) -> Written:
        outcome: WriteOutcome = await self.bus.execute_async(ctx, decide)
        subject = outcome.subject
        if subject is None:
            subject = await asyncio.to_thread(self._load, UUID(outcome.id))
        if isinstance(subject, EarningRules):
            return Written(outcome, subject.rules)
        if not isinstance(subject, Member):
            raise NotFound("Member", outcome.id)
        return Written(outcome, member_view(subject, self.tiers))

    def _rules_in(self, uow: UnitOfWork) -> Rules:
        if not uow.exists(RULES_ID, EarningRules):
            return DEFAULT_RULES
        return uow.get(RULES_ID, EarningRules, subject=False).rules

    async def _ensure_contact(self, contact_id: str) -> None:
        if self.contacts is None:
            raise RuntimeError("the loyalty service was built without a contacts client")
        await self.contacts.ensure_exists(contact_id)

    # -- members ----------------------------------------------------------------

    async def enrol(self, caller: Caller, contact_id: str, channel: str | None) -> Written:
        contact_id = validation.identifier(contact_id, "contact_id")
        word = validation.channel(channel)
        await self._ensure_contact(contact_id)

        def decide(uow: UnitOfWork) -> Member:
            if uow.exists(member_id(contact_id), Member):
                raise RuleViolated(f"contact {contact_id} is a member already")
            return uow.add(Member.enrol(contact_id, word, self.tiers.lowest, self.clock()))

        return await self._write(caller.command("EnrolMember", contact_id, word), decide)

    async def get_member(self, contact_id: str) -> MemberView:
        contact_id = validation.identifier(contact_id, "contact_id")
        member = await asyncio.to_thread(self._member, contact_id)
        return member_view(member, self.tiers)

    async def get_tier(self, contact_id: str) -> TierView:
        contact_id = validation.identifier(contact_id, "contact_id")
        member = await asyncio.to_thread(self._member, contact_id)
        return tier_view(member, self.tiers, self.clock())

    # -- the ledger -------------------------------------------------------------

    async def earn(self, caller: Caller, contact_id: str, purchase: Purchase) -> Written:
        """Points for a purchase (a till, a web shop) under the current rules: one lot."""
        contact_id = validation.identifier(contact_id, "contact_id")
        lines, reference = validation.purchase(purchase)

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member = uow.get(member_id(contact_id), Member)
            rules = self._rules_in(uow)
            at = self.clock()
            tier = member.tier or self.tiers.lowest
            points = sum(
                rules.points(line.amount, line.currency, line.category, tier, at) for line in lines
            )
            member.earn(
                points,
                expires_at=expiry_of(at, rules.lot_lifetime_days),
                rule_version=rules.version,
                reason=reference or "purchase",
                at=at,
            )
            member.review_tier(self.tiers, at)
            return member, {"points": str(points), "rule_version": str(rules.version)}

        return await self._write(caller.command("EarnPoints", contact_id, purchase), decide)

    async def redeem(self, caller: Caller, contact_id: str, points: int, reference: str) -> Written:
        contact_id = validation.identifier(contact_id, "contact_id")
        points = validation.points(points)
        reference = validation.text(reference, "reference")

        def decide(uow: UnitOfWork) -> Member:
            member = uow.get(member_id(contact_id), Member)
            member.spend(points, reference, self.clock())
            return member

        ctx = caller.command("RedeemPoints", contact_id, points, reference)
        return await self._write(ctx, decide)

    async def adjust(self, caller: Caller, contact_id: str, points: int, reason: str) -> Written:
        contact_id = validation.identifier(contact_id, "contact_id")
        points = validation.points(points, signed=True)
        reason = validation.text(reason, "reason", required=True)

        def decide(uow: UnitOfWork) -> Member:
            member = uow.get(member_id(contact_id), Member)
            rules = self._rules_in(uow)
            at = self.clock()
            member.adjust(points, reason, caller.actor, expiry_of(at, rules.lot_lifetime_days), at)
            return member

        ctx = caller.command("AdjustPoints", contact_id, points, reason)
        return await self._write(ctx, decide)

    async def settle(self, caller: Caller, contact_id: str) -> Written:
        """Releases ended return windows, expires lots past their expiry, reviews the
        tier. Safe to run by several replicas at once: what is done is not again."""

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member = uow.get(member_id(contact_id), Member)
            at = self.clock()
            released, expired = member.settle(at)
            member.review_tier(self.tiers, at)
            return member, {"released": str(released), "expired": str(expired)}

        return await self._write(caller.command("SettleLedger", contact_id), decide)

    def contact_ids(self) -> list[str]:
        """Every member's contact id, from the event log (followed incrementally)."""
        topic = get_topic(Member.Created)
        while True:
            batch = self.app.recorder.select_notifications(
                self._members_position + 1, 500, topics=[topic]
            )
            for n in batch:
                created = self.app.mapper.to_domain_event(n)
                self._contact_ids.append(str(getattr(created, "customer_id", "")))
                self._members_position = n.id
            if len(batch) < 500:
                return list(self._contact_ids)

    async def settle_all(self, caller: Caller) -> tuple[int, int]:
        """`settle` for every member; returns (points released, points expired)."""
        released = expired = 0
        for contact_id in await asyncio.to_thread(self.contact_ids):
            written = await self.settle(caller, contact_id)
            released += int(written.outcome.extra.get("released", "0"))
            expired += int(written.outcome.extra.get("expired", "0"))
        return released, expired

    # -- earning rules ----------------------------------------------------------

    async def publish_rules(self, caller: Caller, value: RulesInput) -> Written:
        rules = validation.rules(value)

        def decide(uow: UnitOfWork) -> EarningRules:
            at = self.clock()
            if uow.exists(RULES_ID, EarningRules):
                current = uow.get(RULES_ID, EarningRules)
                current.publish(rules, at)
                return current
            return uow.add(EarningRules.first(rules, at))

        return await self._write(caller.command("PublishEarningRules", value), decide)

    async def get_rules(self) -> Rules:
        current = await asyncio.to_thread(self._load, RULES_ID)
        return current.rules if isinstance(current, EarningRules) else DEFAULT_RULES

    # -- ERP orders -------------------------------------------------------------

    async def _ensure_member(self, caller: Caller, contact_id: str) -> None:
        if await asyncio.to_thread(self._load, member_id(contact_id)) is not None:
            return
        try:
            await self._ensure_contact(contact_id)
        except NotFound:
            raise CustomerNotKnown("Customer", contact_id) from None
        enrolling = Caller(
            actor=caller.actor,
            client=caller.client,
            request_id=f"erp-enrol:{contact_id}",
            principal=caller.principal,
        )

        def decide(uow: UnitOfWork) -> Member:
            ident = member_id(contact_id)
            if uow.exists(ident, Member):
                return uow.get(ident, Member, subject=False)
            return uow.add(Member.enrol(contact_id, "erp", self.tiers.lowest, self.clock()))

        await self.bus.execute_async(enrolling.command("EnrolMember", contact_id, "erp"), decide)

    async def place_order(self, caller: Caller, order: PlacedOrder) -> OrderOutcome:
        """Earns an order's points, locked for the return window. A customer who is a
        contact but no member yet is enrolled (channel erp); one the contacts service
        does not know raises `CustomerNotKnown`."""
        lines = validation.placed_order(order)
        customer = order.customer_ref.strip()
        await self._ensure_member(caller, customer)

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member = uow.get(member_id(customer), Member)
            rules = self._rules_in(uow)
            at = validation.moment(order.occurred_at, self.clock())
            tier = member.tier or self.tiers.lowest
            points = {
                line.line_id: rules.points(line.amount, line.currency, line.category, tier, at)
                for line in lines
            }
            placed = member.place_order(
                order.order_id.strip(),
                points,
                expires_at=expiry_of(at, rules.lot_lifetime_days),
                locked_until=expiry_of(at, rules.return_window_days),
                rule_version=rules.version,
                at=at,
            )
            if placed:
                member.review_tier(self.tiers, self.clock())
            return member, {"applied": str(placed).lower(), "points": str(sum(points.values()))}

        ctx = caller.command("RecordOrderPlaced", customer, order)
        written = await self._write(ctx, decide)
        extra = written.outcome.extra
        return OrderOutcome(written, extra.get("applied") == "true", int(extra.get("points", "0")))

    async def return_order(self, caller: Caller, returned: ReturnedOrder) -> OrderOutcome:
        """Cancels the points of the returned lines once per return; `OrderNotKnown`
        when the order was not placed (yet), `NotFound` when there is no member."""
        line_ids = validation.returned_order(returned)
        customer = returned.customer_ref.strip()

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member = uow.get(member_id(customer), Member)
            at = validation.moment(returned.occurred_at, self.clock())
            cancelled = member.return_order(
                returned.order_id.strip(), returned.return_id.strip(), line_ids, at
            )
            if cancelled is not None:
                member.review_tier(self.tiers, self.clock())
            applied = cancelled is not None
            return member, {"applied": str(applied).lower(), "points": str(cancelled or 0)}

        ctx = caller.command("RecordOrderReturned", customer, returned)
        written = await self._write(ctx, decide)
        extra = written.outcome.extra
        return OrderOutcome(written, extra.get("applied") == "true", int(extra.get("points", "0")))

    # -- parked ERP messages ----------------------------------------------------

    async def park(
        self, caller: Caller, key: str, customer_ref: str, kind: str, payload: bytes, reason: str
    ) -> bool:
        def decide(uow: UnitOfWork) -> tuple[ParkedOrders, dict[str, str]]:
            at = self.clock()
            if uow.exists(PARKING_ID, ParkedOrders):
                parking = uow.get(PARKING_ID, ParkedOrders)
            else:
                parking = uow.add(ParkedOrders(customer_id="", at=at))
            text = base64.b64encode(payload).decode()
            parked = parking.park(key, customer_ref, kind, text, reason, at)
            return parking, {"parked": str(parked).lower()}

        outcome = await self.bus.execute_async(caller.command("ParkOrder", key), decide)
        return outcome.extra.get("parked") == "true"

    async def unpark(self, caller: Caller, key: str) -> None:
        def decide(uow: UnitOfWork) -> ParkedOrders:
            parking = uow.get(PARKING_ID, ParkedOrders)
            parking.unpark(key, self.clock())
            return parking

        await self.bus.execute_async(caller.command("UnparkOrder", key), decide)

    async def parked(self) -> list[ParkedView]:
        parking = await asyncio.to_thread(self._load, PARKING_ID)
        if not isinstance(parking, ParkedOrders):
            return []
        return [
            ParkedView(key, e["customer_ref"], e["kind"], e["payload"], e["reason"])
            for key, e in parking.entries.items()
        ]
