"""The loyalty application layer, shared by the gRPC and REST adapters and the
ERP ingest process.

Writes go through the shared command bus (optimistic concurrency, request-id
replay, audit metadata, group commit). A member is named by its contact id;
enrolling checks the contact over the contacts service (`ContactsPort`).
ERP orders are idempotent twice over: their request ids derive from the
order (`erp:<order>:placed`), and the member aggregate itself applies an
order's placement and each return once, whatever the receipts' retention.
Lists (members, the rewards catalogue, the schedule's walk over every member)
read the query tables (`crm_loyalty.query_tables`), never the whole log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from crm_common.commands import Caller, CommandBus, CommandContext, UnitOfWork, WriteOutcome
from crm_common.errors import NotFound, RuleViolated, ValidationFailed
from crm_common.eventstore import SnapshottingApplication, application_env, creating_tables
from crm_common.privacy import ERASED, REDACTED, MissingDataKey, PersonalData
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
from crm_loyalty.domain.parking import DEAD_LETTERED, PARKED, PARKING_ID, ParkedOrders
from crm_loyalty.domain.rewards import Reward, reward_id
from crm_loyalty.inputs import (
    ErpSource,
    MemberQuery,
    PlacedOrder,
    Purchase,
    ReturnedOrder,
    RewardInput,
    RulesInput,
)
from crm_loyalty.query_tables import LoyaltyQueries
from crm_loyalty.views import (
    MemberPage,
    MemberView,
    ParkedView,
    RewardView,
    TierView,
    Written,
    member_view,
    reward_view,
    tier_view,
)

SERVICE = "loyalty"
#: Merges followed from a contact to the member answering for it, at most.
MAX_MERGE_HOPS = 20


class LoyaltyApplication(SnapshottingApplication):
    """The event store of members, earning rules and parked ERP orders."""

    name = "loyalty"
    #: A member's ledger, a reward's every redemption, every parked order.
    snapshot_kinds = (Member, Reward, ParkedOrders)
    #: Where the store is: the query tables live in the same database.
    settings: Settings | None = None


def create_application(settings: Settings) -> LoyaltyApplication:
    with creating_tables(settings):
        app = LoyaltyApplication(env=application_env(settings))
    app.settings = settings
    return app


#: Attributes of stored member events written because of an ERP order record
#: (infrastructure metadata riding in the stored event state, like the audit
#: metadata): the record's partition and position (offset + 1).
ERP_PARTITION = "_erp_partition"
ERP_POSITION = "_erp_position"


def stamp_source(aggregate: Any, source: ErpSource | None) -> None:
    """Marks the aggregate's pending events as caused by the ERP record `source`."""
    if source is None:
        return
    for event in aggregate.pending_events:
        object.__setattr__(event, ERP_PARTITION, source.partition)
        object.__setattr__(event, ERP_POSITION, source.position)


def parked_view(key: str, e: dict[str, str]) -> ParkedView:
    position = int(e.get("source_position", "0") or 0)
    return ParkedView(
        key,
        e["customer_ref"],
        e["kind"],
        e["payload"],
        e["reason"],
        ErpSource(int(e.get("source_partition", "0") or 0), position) if position else None,
        e.get("state", "parked"),
        datetime.fromisoformat(e["parked_at"]) if e.get("parked_at") else None,
        datetime.fromisoformat(e["dead_lettered_at"]) if e.get("dead_lettered_at") else None,
        [(k, base64.b64decode(v)) for k, v in json.loads(e.get("headers") or "[]")],
    )


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
        queries: LoyaltyQueries | None = None,
    ) -> None:
        """`queries`: the query side; by default one over the application's own
        database (its tables are created if missing, nothing is read from the log)."""
        self.app = app
        self.contacts = contacts
        self.clock = clock
        self.tiers = tiers
        self.bus = CommandBus(app, SERVICE)
        if queries is None:
            if app.settings is None:
                raise RuntimeError("the application was not made by create_application")
            queries = LoyaltyQueries(app, app.settings, tiers)
        self.queries = queries

    def close(self) -> None:
        self.queries.close()
        self.bus.close()
        self.app.close()

    # -- plumbing ---------------------------------------------------------------

    def _load(self, ident: UUID) -> Any:
        try:
            return self.app.repository.get(ident)
        except AggregateNotFoundError:
            return None

    def _member(self, contact_id: str) -> Member:
        """The member answering for `contact_id`: its own, or the member its contact
        was merged into."""
        member = self._own_member(contact_id)
        seen = {contact_id}
        while member.merged_into:
            target = member.merged_into
            if target in seen or len(seen) > MAX_MERGE_HOPS:
                raise RuleViolated(f"the membership of {contact_id} was merged in a circle")
            seen.add(target)
            member = self._own_member(target)
        return member

    def _own_member(self, contact_id: str) -> Member:
        member = self._load(member_id(contact_id))
        if not isinstance(member, Member):
            raise NotFound("Member", contact_id)
        return member

    def _resolve(self, uow: UnitOfWork, contact_id: str) -> tuple[Member, str]:
        """The member a command naming `contact_id` acts on, and `via`: the contact
        named when its contact was merged into that member's ("" for its own)."""
        member = uow.get(member_id(contact_id), Member)
        seen = {contact_id}
        while member.merged_into:
            target = member.merged_into
            if target in seen or len(seen) > MAX_MERGE_HOPS:
                raise RuleViolated(f"the membership of {contact_id} was merged in a circle")
            seen.add(target)
            member = uow.get(member_id(target), Member, subject=False)
        return member, "" if member.customer_id == contact_id else contact_id

    def _sealed_inputs(self, contact_id: str, *values: str) -> tuple[str, ...]:
        """Personal inputs as the request's fingerprint takes them: an HMAC under the
        member's data key (so a receipt cannot be matched against guessed birthdays
        once the key is destroyed), or the values without master keys. Raises
        `SubjectErased` for an erased contact."""
        keys = self.app.personal_data_keys
        if keys is None:
            return values
        key = keys.key_for_writing(str(member_id(contact_id)))
        text = json.dumps(values, separators=(",", ":")).encode()
        return (hmac.new(key.secret, text, hashlib.sha256).hexdigest(),)

    async def _write(self, ctx: CommandContext, decide: Callable[[UnitOfWork], Any]) -> Written:
        outcome: WriteOutcome = await self.bus.execute_async(ctx, decide)
        subject = outcome.subject
        if subject is None:
            subject = await asyncio.to_thread(self._load, UUID(outcome.id))
        if isinstance(subject, EarningRules):
            return Written(outcome, subject.rules)
        if isinstance(subject, Reward):
            return Written(outcome, reward_view(subject))
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

    async def enrol(
        self,
        caller: Caller,
        contact_id: str,
        channel: str | None,
        *,
        birthday: str | None = None,
        referred_by: str | None = None,
    ) -> Written:
        """Enrols a contact. `birthday` ("MM-DD", given by the member at enrolment)
        earns the birthday bonus once a year; `referred_by` names the member who
        referred this one (both get the referral bonuses at its first purchase)."""
        contact_id = validation.identifier(contact_id, "contact_id")
        word = validation.channel(channel)
        day = validation.birthday(birthday)
        referrer = (referred_by or "").strip()
        if referrer:
            referrer = validation.identifier(referrer, "referred_by")
        await self._ensure_contact(contact_id)

        personal = await asyncio.to_thread(self._sealed_inputs, contact_id, day, referrer)

        def decide(uow: UnitOfWork) -> Member:
            if uow.exists(member_id(contact_id), Member):
                merged_into = uow.get(member_id(contact_id), Member, subject=False).merged_into
                if merged_into:
                    raise RuleViolated(
                        f"contact {contact_id} was merged into {merged_into}: "
                        "its membership is that contact's"
                    )
                raise RuleViolated(f"contact {contact_id} is a member already")
            if referrer and not uow.exists(member_id(referrer), Member):
                raise ValidationFailed.of("referred_by", f"{referrer} is not a member")
            return uow.add(
                Member.enrol(contact_id, word, self.tiers.lowest, self.clock(), day, referrer)
            )

        ctx = caller.command("EnrolMember", contact_id, word, *personal)
        return await self._write(ctx, decide)

    def _purchase_bonuses(
        self,
        uow: UnitOfWork,
        member: Member,
        rules: Rules,
        at: datetime,
        locked_until: datetime | None,
    ) -> None:
        """The first purchase's bonuses, in the decision of that purchase: the first
        purchase bonus, and a referral's (to both members, once)."""
        expires = expiry_of(at, rules.lot_lifetime_days)
        version = rules.version
        member.award_bonus(
            "first_purchase",
            rules.first_purchase_bonus,
            expires_at=expires,
            rule_version=version,
            at=at,
            locked_until=locked_until,
        )
        if member.settle_referral(at):
            member.award_bonus(
                "referee",
                rules.referee_bonus,
                expires_at=expires,
                rule_version=version,
                at=at,
                locked_until=locked_until,
            )
            if uow.exists(member_id(member.referred_by), Member):
                referrer = uow.get(member_id(member.referred_by), Member, subject=False)
                while referrer.merged_into:  # the member the referrer's contact is now
                    referrer = uow.get(member_id(referrer.merged_into), Member, subject=False)
                referrer.award_bonus(
                    f"referrer:{member.customer_id}",
                    rules.referrer_bonus,
                    expires_at=expires,
                    rule_version=version,
                    at=at,
                )

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
            member, via = self._resolve(uow, contact_id)
            rules = self._rules_in(uow)
            at = self.clock()
            first = not member.has_purchased
            tier = member.tier or self.tiers.lowest
            points = sum(
                rules.points(line.amount, line.currency, line.category, tier, at) for line in lines
            )
            # One lot, one currency of spend: the first line's (tiers by spend count it).
            currency = lines[0].currency if lines else ""
            member.earn(
                points,
                expires_at=expiry_of(at, rules.lot_lifetime_days),
                rule_version=rules.version,
                reason=reference or "purchase",
                at=at,
                spend={x.line_id: str(x.amount) for x in lines if x.currency == currency},
                currency=currency,
                via=via,
            )
            if first and member.has_purchased:
                self._purchase_bonuses(uow, member, rules, at, None)
            member.review_tier(self.tiers, at)
            return member, {"points": str(points), "rule_version": str(rules.version)}

        return await self._write(caller.command("EarnPoints", contact_id, purchase), decide)

    async def redeem(self, caller: Caller, contact_id: str, points: int, reference: str) -> Written:
        contact_id = validation.identifier(contact_id, "contact_id")
        points = validation.points(points)
        reference = validation.text(reference, "reference")

        def decide(uow: UnitOfWork) -> Member:
            member, _ = self._resolve(uow, contact_id)
            member.spend(points, reference, self.clock())
            return member

        ctx = caller.command("RedeemPoints", contact_id, points, reference)
        return await self._write(ctx, decide)

    async def adjust(self, caller: Caller, contact_id: str, points: int, reason: str) -> Written:
        contact_id = validation.identifier(contact_id, "contact_id")
        points = validation.points(points, signed=True)
        reason = validation.text(reason, "reason", required=True)

        def decide(uow: UnitOfWork) -> Member:
            member, _ = self._resolve(uow, contact_id)
            rules = self._rules_in(uow)
            at = self.clock()
            member.adjust(points, reason, caller.actor, expiry_of(at, rules.lot_lifetime_days), at)
            return member

        ctx = caller.command("AdjustPoints", contact_id, points, reason)
        return await self._write(ctx, decide)

    async def settle(self, caller: Caller, contact_id: str) -> Written:
        """Gives a birthday bonus that is due, releases ended return windows, expires
        lots past their expiry, reviews the tier. Safe to run by several replicas at
        once and again after a restart: what is done is not again (the birthday bonus
        of a year is in the member's state, and the store refuses a second writer of
        the same version)."""

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member, _ = self._resolve(uow, contact_id)
            at = self.clock()
            year = member.birthday_due(at)
            if year is not None:
                rules = self._rules_in(uow)
                member.award_bonus(
                    f"birthday:{year}",
                    rules.birthday_bonus,
                    expires_at=expiry_of(at, rules.lot_lifetime_days),
                    rule_version=rules.version,
                    at=at,
                )
            released, expired = member.settle(at)
            member.review_tier(self.tiers, at)
            return member, {"released": str(released), "expired": str(expired)}

        return await self._write(caller.command("SettleLedger", contact_id), decide)

    async def settle_all(self, caller: Caller) -> tuple[int, int]:
        """`settle` for every member, walking the members table a page at a time
        in contact id order; returns (points released, points expired)."""
        released = expired = 0
        after = ""
        while True:
            page = await asyncio.to_thread(self.queries.contact_ids, after)
            for contact_id in page:
                written = await self.settle(caller, contact_id)
                released += int(written.outcome.extra.get("released", "0"))
                expired += int(written.outcome.extra.get("expired", "0"))
            if not page:
                return released, expired
            after = page[-1]

    async def list_members(self, query: MemberQuery) -> MemberPage:
        """A page of members (tier, balance, next expiry) from the members table."""
        checked = validation.member_query(query, tuple(t.name for t in self.tiers.tiers))
        return await asyncio.to_thread(self.queries.members, checked)

    # -- the rewards catalogue --------------------------------------------------

    async def define_reward(self, caller: Caller, value: RewardInput) -> Written:
        reward = validation.reward(value)

        def decide(uow: UnitOfWork) -> Reward:
            if uow.exists(reward_id(reward.code), Reward):
                raise RuleViolated(f"reward {reward.code!r} is in the catalogue already")
            return uow.add(
                Reward.define(
                    reward.code,
                    reward.name,
                    reward.points,
                    reward.stock,
                    reward.valid_from,
                    reward.valid_until,
                    self.clock(),
                )
            )

        return await self._write(caller.command("DefineReward", reward), decide)

    async def restock_reward(self, caller: Caller, code: str, quantity: int) -> Written:
        code = validation.reward_code(code)
        quantity = validation.quantity(quantity, "quantity")

        def decide(uow: UnitOfWork) -> Reward:
            reward = uow.get(reward_id(code), Reward)
            reward.restock(quantity, self.clock())
            return reward

        return await self._write(caller.command("RestockReward", code, quantity), decide)

    async def retire_reward(self, caller: Caller, code: str) -> Written:
        code = validation.reward_code(code)

        def decide(uow: UnitOfWork) -> Reward:
            reward = uow.get(reward_id(code), Reward)
            reward.retire(self.clock())
            return reward

        return await self._write(caller.command("RetireReward", code), decide)

    async def get_reward(self, code: str) -> RewardView:
        code = validation.reward_code(code)
        reward = await asyncio.to_thread(self._load, reward_id(code))
        if not isinstance(reward, Reward):
            raise NotFound("Reward", code)
        return reward_view(reward)

    async def list_rewards(self, *, include_retired: bool = False) -> list[RewardView]:
        """The catalogue in code order, from the rewards table."""
        return await asyncio.to_thread(self.queries.rewards, include_retired=include_retired)

    async def redeem_reward(self, caller: Caller, contact_id: str, code: str) -> Written:
        """One unit of the reward's stock and its price in points, in one decision:
        both aggregates are saved together, each version-checked, so neither the
        last unit nor the member's points can go twice. Refused (and nothing
        changes) when the reward is out of stock, retired, outside its validity,
        or the member's available points do not cover its price."""
        contact_id = validation.identifier(contact_id, "contact_id")
        code = validation.reward_code(code)
        decided: list[RewardView] = []

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member, _ = self._resolve(uow, contact_id)
            reward = uow.get(reward_id(code), Reward, subject=False)
            at = self.clock()
            redemption = f"{code}:{reward.reserved + 1}"
            price = reward.reserve(contact_id, redemption, at)
            member.spend(price, f"reward:{redemption}", at)
            decided.append(reward_view(reward))
            return member, {"reward": code, "redemption": redemption, "points": str(price)}

        written = await self._write(caller.command("RedeemReward", contact_id, code), decide)
        # The reward as this redemption left it (a replayed request: as it is now).
        reward = decided[-1] if decided and not written.outcome.replayed else None
        if reward is None:
            reward = await self.get_reward(code)
        return Written(written.outcome, written.subject, reward)

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

    async def place_order(
        self, caller: Caller, order: PlacedOrder, source: ErpSource | None = None
    ) -> OrderOutcome:
        """Earns an order's points, locked for the return window. A customer who is a
        contact but no member yet is enrolled (channel erp); one the contacts service
        does not know raises `CustomerNotKnown`. The events carry `source` (the
        inbound record); an order placed before writes none."""
        lines = validation.placed_order(order)
        customer = order.customer_ref.strip()
        await self._ensure_member(caller, customer)

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member, via = self._resolve(uow, customer)
            rules = self._rules_in(uow)
            at = validation.moment(order.occurred_at, self.clock())
            first = not member.has_purchased
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
                spend={line.line_id: str(line.amount) for line in lines},
                currency=lines[0].currency if lines else "",
                via=via,
            )
            if placed and first:
                locked = expiry_of(at, rules.return_window_days)
                self._purchase_bonuses(uow, member, rules, at, locked)
            if placed:
                member.review_tier(self.tiers, self.clock())
            stamp_source(member, source)
            return member, {"applied": str(placed).lower(), "points": str(sum(points.values()))}

        ctx = caller.command("RecordOrderPlaced", customer, order)
        written = await self._write(ctx, decide)
        extra = written.outcome.extra
        return OrderOutcome(written, extra.get("applied") == "true", int(extra.get("points", "0")))

    async def return_order(
        self, caller: Caller, returned: ReturnedOrder, source: ErpSource | None = None
    ) -> OrderOutcome:
        """Cancels the points of the returned lines once per return; `OrderNotKnown`
        when the order was not placed (yet), `NotFound` when there is no member."""
        line_ids = validation.returned_order(returned)
        customer = returned.customer_ref.strip()

        def decide(uow: UnitOfWork) -> tuple[Member, dict[str, str]]:
            member, _ = self._resolve(uow, customer)
            at = validation.moment(returned.occurred_at, self.clock())
            cancelled = member.return_order(
                returned.order_id.strip(), returned.return_id.strip(), line_ids, at
            )
            if cancelled is not None:
                member.review_tier(self.tiers, self.clock())
            stamp_source(member, source)
            applied = cancelled is not None
            return member, {"applied": str(applied).lower(), "points": str(cancelled or 0)}

        ctx = caller.command("RecordOrderReturned", customer, returned)
        written = await self._write(ctx, decide)
        extra = written.outcome.extra
        return OrderOutcome(written, extra.get("applied") == "true", int(extra.get("points", "0")))

    # -- parked ERP messages ----------------------------------------------------

    async def park(
        self,
        caller: Caller,
        key: str,
        customer_ref: str,
        kind: str,
        payload: bytes,
        reason: str,
        source: ErpSource | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> bool:
        def decide(uow: UnitOfWork) -> tuple[ParkedOrders, dict[str, str]]:
            at = self.clock()
            if uow.exists(PARKING_ID, ParkedOrders):
                parking = uow.get(PARKING_ID, ParkedOrders)
            else:
                parking = uow.add(ParkedOrders(customer_id="", at=at))
            text = base64.b64encode(payload).decode()
            where = (source.partition, source.position) if source else (0, 0)
            kept = json.dumps([[k, base64.b64encode(v).decode()] for k, v in headers or []])
            parked = parking.park(key, customer_ref, kind, text, reason, at, where, kept)
            return parking, {"parked": str(parked).lower()}

        outcome = await self.bus.execute_async(caller.command("ParkOrder", key), decide)
        return outcome.extra.get("parked") == "true"

    async def unpark(self, caller: Caller, key: str) -> None:
        def decide(uow: UnitOfWork) -> ParkedOrders:
            parking = uow.get(PARKING_ID, ParkedOrders)
            parking.unpark(key, self.clock())
            return parking

        await self.bus.execute_async(caller.command("UnparkOrder", key), decide)

    async def parked(self, state: str = "") -> list[ParkedView]:
        """Parked and dead-lettered ERP messages, in the order they were parked;
        `state` (parked, dead_lettered) keeps only those."""
        if state not in ("", PARKED, DEAD_LETTERED):
            raise ValidationFailed.of("state", f"must be {PARKED} or {DEAD_LETTERED} (or empty)")
        parking = await asyncio.to_thread(self._load, PARKING_ID)
        if not isinstance(parking, ParkedOrders):
            return []
        views = [parked_view(key, e) for key, e in parking.entries.items()]
        return [v for v in views if not state or v.state == state]

    async def dead_letter(self, caller: Caller, key: str, reason: str, topic: str) -> bool:
        def decide(uow: UnitOfWork) -> tuple[ParkedOrders, dict[str, str]]:
            parking = uow.get(PARKING_ID, ParkedOrders)
            done = parking.dead_letter(key, reason, topic, self.clock())
            return parking, {"dead_lettered": str(done).lower()}

        outcome = await self.bus.execute_async(caller.command("DeadLetterOrder", key), decide)
        return outcome.extra.get("dead_lettered") == "true"

    async def redrive(self, caller: Caller, key: str) -> ParkedView:
        """A dead-lettered ERP message parked again, to be retried from a fresh start.
        Refused (nothing changes) when it is not dead-lettered."""
        key = validation.identifier(key, "key")

        def decide(uow: UnitOfWork) -> ParkedOrders:
            if not uow.exists(PARKING_ID, ParkedOrders):
                raise NotFound("ParkedOrder", key)
            parking = uow.get(PARKING_ID, ParkedOrders)
            if not parking.redrive(key, caller.actor, self.clock()):
                raise RuleViolated(f"{key!r} is not dead-lettered: it is retried already")
            return parking

        await self.bus.execute_async(caller.command("RedriveParkedOrder", key), decide)
        for entry in await self.parked():
            if entry.key == key:
                return entry
        raise NotFound("ParkedOrder", key)

    # -- contacts erased and merged (`crm_loyalty.contact_changes`) --------------

    async def erase_members(self, contact_ids: Sequence[str]) -> int:
        """Crypto-shreds the members of `contact_ids` (an erased person and the
        contacts merged into them): their data keys are destroyed, so birthday and
        referrer read as not given in every event and snapshot, and an enrolment
        of any of them is refused from now on (`SubjectErased`). Points, lots and
        tier stay. The query tables hold no personal data, so nothing else has to
        go. Idempotent; returns the keys destroyed by this call."""
        keys = self.app.personal_data_keys
        if keys is None:
            raise RuleViolated(
                "loyalty runs without master keys: its personal data is not sealed, "
                "so destroying keys cannot erase it"
            )
        subjects = [member_id(contact_id) for contact_id in dict.fromkeys(contact_ids)]

        def destroy() -> int:
            destroyed = sum(1 for subject in subjects if keys.destroy(str(subject)))
            cache = getattr(self.app.repository, "cache", None)
            for subject in subjects:  # a cached member holds the opened values
                if cache is not None:
                    with contextlib.suppress(KeyError):
                        cache.get(subject, evict=True)
            return destroyed

        return await asyncio.to_thread(destroy)

    async def merge_members(
        self, caller: Caller, survivor: str, merged: Sequence[str], reference: str
    ) -> int:
        """Honours the merge `reference` of the contacts `merged` into `survivor`:
        each merged contact's membership moves onto the survivor's member (enrolled
        by the merge, with the merged member's tier and enrolment date, when the
        survivor was no member) and is closed with a pointer to it. Commands naming
        a merged contact afterwards act for the survivor's member. `caller.request_id`
        is the base of one request id per merged contact. Returns the memberships
        moved by this call (0 when none of them is a member, or all were moved)."""
        survivor = validation.identifier(survivor, "contact_id")
        moved = 0
        for contact in dict.fromkeys(merged):
            if contact == survivor:
                continue
            member = await asyncio.to_thread(self._load, member_id(contact))
            if not isinstance(member, Member):
                continue  # not a member: nothing to move
            if member.merged_into == survivor and member.merge_reference == reference:
                continue  # honoured before
            ctx = dataclasses.replace(
                caller, request_id=f"{caller.request_id}:{contact}" if caller.request_id else ""
            ).command("MergeMembers", survivor, contact, reference)
            await self.bus.execute_async(ctx, self._merge_decision(survivor, contact, reference))
            moved += 1
        return moved

    def _merge_decision(
        self, survivor: str, contact: str, reference: str
    ) -> Callable[[UnitOfWork], Member]:
        def decide(uow: UnitOfWork) -> Member:
            member = uow.get(member_id(contact), Member)
            if member.merged_into == survivor and member.merge_reference == reference:
                return member
            at = self.clock()
            ident = member_id(survivor)
            enrolled = not uow.exists(ident, Member)
            if enrolled:
                channel, tier = member.channel, member.tier or self.tiers.lowest
                target = uow.add(Member.enrol(survivor, channel, tier, at))
            else:
                target = uow.get(ident, Member, subject=False)
                if target.merged_into:
                    raise RuleViolated(
                        f"the survivor {survivor} was merged into {target.merged_into} itself"
                    )
            lots, orders = member.merge_into(survivor, reference, at)
            target.take_over(member, reference, lots, orders, at, enrolled_by_merge=enrolled)
            target.review_tier(self.tiers, at)
            return target

        return decide

    async def unmerge_members(
        self, caller: Caller, survivor: str, restored: Sequence[str], reference: str
    ) -> int:
        """Undoes what `merge_members` did for the merge `reference`: each restored
        contact's membership opens again with the lots it brought (as they are now)
        and the lots earned since by commands naming it. Returns the memberships
        given back by this call."""
        survivor = validation.identifier(survivor, "contact_id")
        given = 0
        for contact in dict.fromkeys(restored):
            target = await asyncio.to_thread(self._load, member_id(survivor))
            if not isinstance(target, Member) or not target.took_over(reference, contact):
                continue  # nothing of it came along, or given back before
            ctx = dataclasses.replace(
                caller, request_id=f"{caller.request_id}:{contact}" if caller.request_id else ""
            ).command("UnmergeMembers", survivor, contact, reference)
            await self.bus.execute_async(ctx, self._unmerge_decision(survivor, contact, reference))
            given += 1
        return given

    def _unmerge_decision(
        self, survivor: str, contact: str, reference: str
    ) -> Callable[[UnitOfWork], Member]:
        def decide(uow: UnitOfWork) -> Member:
            target = uow.get(member_id(survivor), Member)
            at = self.clock()
            back = target.give_back(contact, reference, at)
            if back is None:
                return target
            member = uow.get(member_id(contact), Member, subject=False)
            member.restore(survivor, reference, back[0], back[1], at)
            target.review_tier(self.tiers, at)
            member.review_tier(self.tiers, at)
            return target

        return decide

    # -- the personal data export -----------------------------------------------

    def export_personal_data(self, contact_id: str) -> dict[str, Any]:
        """Everything loyalty holds about a contact (`ExportPersonalData`): its
        membership (None when it is no member), the lots of its ledger, and the
        history of its member's events, personal values opened, or "[erased]" once
        the member's key is destroyed. Runs in a thread."""
        member = self._load(member_id(contact_id))
        if not isinstance(member, Member):
            return {"member": None, "ledger": [], "history": []}
        erased = self._is_erased(member)

        def personal(value: str) -> str:
            return REDACTED if erased else value

        document = {
            "contact_id": member.customer_id,
            "member_number": member.member_number,
            "channel": member.channel,
            "enrolled_at": member.enrolled_at,
            "tier": member.tier or self.tiers.lowest,
            "birthday": personal(member.birthday),
            "referred_by": personal(member.referred_by),
            "merged_into": member.merged_into,
            "balance": dataclasses.asdict(member.balance),
        }
        ledger = [
            {k: v for k, v in dataclasses.asdict(lot).items() if k != "seq"}
            for lot in member.lots.values()
        ]
        history = []
        for event in self.app.repository.event_store.get(member.id):
            entry: dict[str, Any] = {
                "event": type(event).__name__,
                "version": event.originator_version,
                "timestamp": getattr(event, "timestamp", None),
            }
            for name, value in vars(event).items():
                if not name.startswith("_") and name not in _NOT_EXPORTED:
                    entry[name] = value
            declared = getattr(type(event), "personal_data", None)
            if erased and isinstance(declared, PersonalData):
                for pattern in declared.patterns:
                    if len(pattern) == 1 and pattern[0] in entry:
                        entry[pattern[0]] = REDACTED
            history.append(entry)
        return {"member": document, "ledger": ledger, "history": history}

    def _is_erased(self, member: Member) -> bool:
        keys = self.app.personal_data_keys
        if keys is None:
            return False
        try:
            return keys.key_for_reading(str(member.id), "export") is ERASED
        except MissingDataKey:
            return False


#: Event attributes the export leaves out: the aggregate's bookkeeping.
_NOT_EXPORTED = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})
