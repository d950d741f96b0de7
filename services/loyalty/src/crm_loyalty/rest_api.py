"""REST adapter: the loyalty API as JSON (OpenAPI at /docs and /openapi.json).

Every route's `operation_id` is the name of the gRPC method doing the same,
which is what the access policy (`crm_common/auth/access.yaml`) lists.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field

from crm_common.auth.gate import AccessGate
from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller, service_app
from crm_loyalty.application import LoyaltyService
from crm_loyalty.domain import Rules
from crm_loyalty.inputs import (
    CampaignInput,
    MemberQuery,
    Purchase,
    PurchaseLineInput,
    RewardInput,
    RulesInput,
)
from crm_loyalty.validation import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MEMBER_ORDERS
from crm_loyalty.views import (
    MemberPage,
    MemberSummaryView,
    MemberView,
    ParkedView,
    RewardView,
    TierView,
    Written,
)

DESCRIPTION = """Loyalty members (one per contact), their points on a ledger by lot, the
earning rules and tiers.

Each earning is a lot with its own expiry; a redemption takes the lots that expire
first and is refused (409) above the available balance. The balance by state
(active, locked, expired, spent, cancelled) is the sum of the lots.

Every write answers `{id, version, position, replayed, ...}`; send `Idempotency-Key`
to make it safe to retry and `If-Match` with the member's version to refuse lost
updates. Every operation needs `Authorization: Bearer <token>`.
"""

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid bearer token"},
    403: {"description": "the token's roles may not run this operation"},
    404: {"description": "no such member (or contact)"},
    409: {"description": "stale version, or a rule refused the change (not enough points)"},
    422: {"description": "invalid input: `{detail: [{field, message}]}`"},
}


class BalanceModel(BaseModel):
    active: int
    locked: int
    expired: int
    spent: int
    cancelled: int


class LotModel(BaseModel):
    lot_id: str
    earned: int
    remaining: int
    spent: int
    expired: int
    cancelled: int
    locked: bool
    earned_at: datetime
    expires_at: datetime
    locked_until: datetime | None
    order_id: str
    rule_version: int
    reason: str


class MemberModel(BaseModel):
    id: str
    contact_id: str
    member_number: str
    channel: str
    enrolled_at: datetime
    tier: str
    balance: BalanceModel
    lots: list[LotModel]
    version: int
    birthday: str
    referred_by: str

    @classmethod
    def of(cls, view: MemberView) -> MemberModel:
        return cls(
            id=view.id,
            contact_id=view.contact_id,
            member_number=view.member_number,
            channel=view.channel,
            enrolled_at=view.enrolled_at,
            tier=view.tier,
            balance=BalanceModel(**vars(view.balance)),
            lots=[LotModel(**vars(lot)) for lot in view.lots],
            version=view.version,
            birthday=view.birthday,
            referred_by=view.referred_by,
        )


class MemberWrite(BaseModel):
    id: str
    version: int
    position: int
    replayed: bool
    points: int | None = None
    member: MemberModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> MemberWrite:
        assert isinstance(written.subject, MemberView)
        outcome = written.outcome
        if response is not None and outcome.replayed:
            response.status_code = 200
        points = outcome.extra.get("points")
        return cls(
            id=outcome.id,
            version=outcome.version,
            position=outcome.position,
            replayed=outcome.replayed,
            points=int(points) if points is not None else None,
            member=MemberModel.of(written.subject),
        )


class MemberSummaryModel(BaseModel):
    contact_id: str
    tier: str
    balance: BalanceModel = Field(description="`active` is the available balance")
    earned: int = Field(description="every point ever earned")
    next_expiry_at: datetime | None = Field(
        description="the soonest expiry of unlocked points; null when there are none"
    )
    next_expiry_points: int = Field(description="points expiring at next_expiry_at")
    last_activity_at: datetime = Field(description="when the account last changed")
    enrolled_at: datetime
    version: int

    @classmethod
    def of(cls, view: MemberSummaryView) -> MemberSummaryModel:
        return cls(
            contact_id=view.contact_id,
            tier=view.tier,
            balance=BalanceModel(**vars(view.balance)),
            earned=view.earned,
            next_expiry_at=view.next_expiry_at,
            next_expiry_points=view.next_expiry_points,
            last_activity_at=view.last_activity_at,
            enrolled_at=view.enrolled_at,
            version=view.version,
        )


class MemberList(BaseModel):
    members: list[MemberSummaryModel]
    next_page_token: str = Field(description="Pass as page_token for the next page; empty at end.")

    @classmethod
    def of(cls, page: MemberPage) -> MemberList:
        return cls(
            members=[MemberSummaryModel.of(m) for m in page.members],
            next_page_token=page.next_page_token,
        )


class TierModel(BaseModel):
    contact_id: str
    tier: str
    qualifying_points: int
    next_tier: str
    points_to_next_tier: int
    basis: str = Field(description="what tiers count: points, or spend (whole currency units)")
    currency: str

    @classmethod
    def of(cls, view: TierView) -> TierModel:
        return cls(**vars(view))


class Enrolment(BaseModel):
    contact_id: str = Field(max_length=100)
    channel: str | None = Field(None, description="web, store, app, call_center or erp")
    birthday: str | None = Field(None, description="MM-DD, for the birthday bonus")
    referred_by: str | None = Field(None, description="the referring member's contact id")


class PurchaseLineModel(BaseModel):
    line_id: str = ""
    amount: str = Field(description="decimal text in the currency, e.g. 19.99")
    currency: str
    category: str = ""


class PurchaseModel(BaseModel):
    lines: list[PurchaseLineModel]
    reference: str = ""


class Redemption(BaseModel):
    points: int
    reference: str = ""


class Adjustment(BaseModel):
    points: int = Field(description="positive: a new lot; negative: taken first-to-expire")
    reason: str


class CampaignModel(BaseModel):
    name: str
    factor: str
    starts_at: datetime
    ends_at: datetime
    categories: list[str] = []


class RulesModel(BaseModel):
    version: int = 0
    rates: dict[str, str] = Field(description="points per currency unit, by ISO 4217 code")
    tier_multipliers: dict[str, str] = {}
    category_multipliers: dict[str, str] = {}
    campaigns: list[CampaignModel] = []
    lot_lifetime_days: int = 365
    return_window_days: int = 30
    first_purchase_bonus: int = 0
    birthday_bonus: int = 0
    referrer_bonus: int = 0
    referee_bonus: int = 0

    @classmethod
    def of(cls, rules: Rules) -> RulesModel:
        data = rules.to_data()
        return cls(version=rules.version, **data)

    def to_input(self) -> RulesInput:
        return RulesInput(
            rates=self.rates,
            tier_multipliers=self.tier_multipliers,
            category_multipliers=self.category_multipliers,
            campaigns=[
                CampaignInput(c.name, c.factor, c.starts_at, c.ends_at, c.categories)
                for c in self.campaigns
            ],
            lot_lifetime_days=self.lot_lifetime_days,
            return_window_days=self.return_window_days,
            first_purchase_bonus=self.first_purchase_bonus,
            birthday_bonus=self.birthday_bonus,
            referrer_bonus=self.referrer_bonus,
            referee_bonus=self.referee_bonus,
        )


class RulesWrite(BaseModel):
    id: str
    version: int
    position: int
    replayed: bool
    rules: RulesModel


class RewardModel(BaseModel):
    code: str
    name: str
    points: int = Field(description="the price in points")
    stock: int = Field(description="units left")
    reserved: int = Field(description="units redeemed so far")
    valid_from: datetime | None
    valid_until: datetime | None
    retired: bool
    version: int

    @classmethod
    def of(cls, view: RewardView) -> RewardModel:
        return cls(**vars(view))


class RewardDefinition(BaseModel):
    code: str = Field(description="letters, digits, '-', '_', '.'; stored in lower case")
    name: str
    points: int
    stock: int = 0
    valid_from: datetime | None = None
    valid_until: datetime | None = None


class Restock(BaseModel):
    quantity: int


class RewardWrite(BaseModel):
    id: str
    version: int
    position: int
    replayed: bool
    reward: RewardModel

    @classmethod
    def of(cls, written: Written, response: Response | None = None) -> RewardWrite:
        assert isinstance(written.subject, RewardView)
        outcome = written.outcome
        if response is not None and outcome.replayed:
            response.status_code = 200
        return cls(
            id=outcome.id,
            version=outcome.version,
            position=outcome.position,
            replayed=outcome.replayed,
            reward=RewardModel.of(written.subject),
        )


class RewardRedemption(BaseModel):
    code: str


class RewardRedeemed(MemberWrite):
    reward: RewardModel
    redemption_id: str


class ParkedOrderModel(BaseModel):
    key: str
    customer_ref: str
    kind: str = Field(description="placed, returned, cancelled, refused or undecodable")
    reason: str
    state: str = Field(description="parked (retried) or dead_lettered")
    parked_at: datetime | None
    dead_lettered_at: datetime | None
    source_partition: int = Field(description="-1: not known")
    source_offset: int = Field(description="-1: not known")
    payload: str = Field(description="the message as received, base64 (crm.erp.v1.OrderEvent)")

    @classmethod
    def of(cls, view: ParkedView) -> ParkedOrderModel:
        return cls(
            key=view.key,
            customer_ref=view.customer_ref,
            kind=view.kind,
            reason=view.reason,
            state=view.state,
            parked_at=view.parked_at,
            dead_lettered_at=view.dead_lettered_at,
            source_partition=view.source.partition if view.source else -1,
            source_offset=view.source.position - 1 if view.source else -1,
            payload=view.payload,
        )


def _service(request: Request) -> LoyaltyService:
    service: LoyaltyService = request.app.state.service
    return service


Service = Annotated[LoyaltyService, Depends(_service)]


def create_app(service: LoyaltyService, gate: AccessGate) -> FastAPI:
    app = service_app(gate, title="CRM loyalty", description=DESCRIPTION)
    app.state.service = service

    @app.post(
        "/members",
        status_code=201,
        response_model=MemberWrite,
        responses=ERRORS,
        summary="Enrol a contact as a member",
        operation_id="EnrolMember",
        tags=["members"],
    )
    async def enrol(
        request: Request,
        response: Response,
        body: Enrolment,
        service: Service,
        idempotency_key: IdempotencyKey = None,
    ) -> MemberWrite:
        caller = http_caller(request, idempotency_key)
        written = await service.enrol(
            caller,
            body.contact_id,
            body.channel,
            birthday=body.birthday,
            referred_by=body.referred_by,
        )
        return MemberWrite.of(written, response)

    @app.get(
        "/members",
        response_model=MemberList,
        responses=ERRORS,
        summary="Members with tier, balance and next expiry, filtered, in keyset pages",
        operation_id="ListMembers",
        tags=["members"],
    )
    async def list_members(
        service: Service,
        tier: Annotated[str, Query(description="A tier name; empty: every tier.")] = "",
        min_available: Annotated[
            int, Query(description="Only members with at least this available balance.")
        ] = 0,
        expiring_before: Annotated[
            datetime | None,
            Query(description="Only members with points expiring before this time (with zone)."),
        ] = None,
        order_by: Annotated[
            str,
            Query(
                description="`contact_id` (default) or `available_desc` (highest first).",
                json_schema_extra={"enum": ["", *MEMBER_ORDERS]},
            ),
        ] = "",
        page_size: Annotated[
            int, Query(description=f"1..{MAX_PAGE_SIZE}; default {DEFAULT_PAGE_SIZE}.")
        ] = 0,
        page_token: Annotated[
            str, Query(description="The next_page_token of the previous page.")
        ] = "",
    ) -> MemberList:
        page = await service.list_members(
            MemberQuery(
                tier=tier,
                min_available=min_available,
                expiring_before=expiring_before,
                order_by=order_by or None,
                page_size=page_size,
                page_token=page_token,
            )
        )
        return MemberList.of(page)

    @app.get(
        "/members/{contact_id}",
        response_model=MemberModel,
        responses=ERRORS,
        summary="A member with its balance and lots",
        operation_id="GetMember",
        tags=["members"],
    )
    async def get_member(contact_id: str, service: Service) -> MemberModel:
        return MemberModel.of(await service.get_member(contact_id))

    @app.get(
        "/members/{contact_id}/tier",
        response_model=TierModel,
        responses=ERRORS,
        summary="A member's tier and progress to the next",
        operation_id="GetTier",
        tags=["members"],
    )
    async def get_tier(contact_id: str, service: Service) -> TierModel:
        return TierModel.of(await service.get_tier(contact_id))

    @app.post(
        "/members/{contact_id}/earnings",
        status_code=201,
        response_model=MemberWrite,
        responses=ERRORS,
        summary="Earn points for a purchase (one lot, current rules)",
        operation_id="EarnPoints",
        tags=["ledger"],
    )
    async def earn(
        contact_id: str,
        request: Request,
        response: Response,
        body: PurchaseModel,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> MemberWrite:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        purchase = Purchase(
            [PurchaseLineInput(x.line_id, x.amount, x.currency, x.category) for x in body.lines],
            body.reference,
        )
        return MemberWrite.of(await service.earn(caller, contact_id, purchase), response)

    @app.post(
        "/members/{contact_id}/redemptions",
        status_code=201,
        response_model=MemberWrite,
        responses=ERRORS,
        summary="Spend points, first-to-expire lots first",
        operation_id="RedeemPoints",
        tags=["ledger"],
    )
    async def redeem(
        contact_id: str,
        request: Request,
        response: Response,
        body: Redemption,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> MemberWrite:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.redeem(caller, contact_id, body.points, body.reference)
        return MemberWrite.of(written, response)

    @app.post(
        "/members/{contact_id}/adjustments",
        status_code=201,
        response_model=MemberWrite,
        responses=ERRORS,
        summary="Adjust points by hand, with a reason",
        operation_id="AdjustPoints",
        tags=["ledger"],
    )
    async def adjust(
        contact_id: str,
        request: Request,
        response: Response,
        body: Adjustment,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> MemberWrite:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.adjust(caller, contact_id, body.points, body.reason)
        return MemberWrite.of(written, response)

    @app.get(
        "/earning-rules",
        response_model=RulesModel,
        responses=ERRORS,
        summary="The current earning rules",
        operation_id="GetEarningRules",
        tags=["rules"],
    )
    async def get_rules(service: Service) -> RulesModel:
        return RulesModel.of(await service.get_rules())

    @app.put(
        "/earning-rules",
        response_model=RulesWrite,
        responses=ERRORS,
        summary="Publish a new version of the earning rules",
        operation_id="PublishEarningRules",
        tags=["rules"],
    )
    async def publish_rules(
        request: Request,
        body: RulesModel,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> RulesWrite:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.publish_rules(caller, body.to_input())
        assert isinstance(written.subject, Rules)
        outcome = written.outcome
        return RulesWrite(
            id=outcome.id,
            version=outcome.version,
            position=outcome.position,
            replayed=outcome.replayed,
            rules=RulesModel.of(written.subject),
        )

    @app.post(
        "/rewards",
        status_code=201,
        response_model=RewardWrite,
        responses=ERRORS,
        summary="Define a reward of the catalogue: its price in points and its stock",
        operation_id="DefineReward",
        tags=["rewards"],
    )
    async def define_reward(
        request: Request,
        response: Response,
        body: RewardDefinition,
        service: Service,
        idempotency_key: IdempotencyKey = None,
    ) -> RewardWrite:
        caller = http_caller(request, idempotency_key)
        value = RewardInput(
            body.code, body.name, body.points, body.stock, body.valid_from, body.valid_until
        )
        return RewardWrite.of(await service.define_reward(caller, value), response)

    @app.get(
        "/rewards",
        response_model=list[RewardModel],
        responses=ERRORS,
        summary="The rewards catalogue (retired ones with include_retired=true)",
        operation_id="ListRewards",
        tags=["rewards"],
    )
    async def list_rewards(service: Service, include_retired: bool = False) -> list[RewardModel]:
        rewards = await service.list_rewards(include_retired=include_retired)
        return [RewardModel.of(r) for r in rewards]

    @app.post(
        "/rewards/{code}/restock",
        response_model=RewardWrite,
        responses=ERRORS,
        summary="Add units to a reward's stock",
        operation_id="RestockReward",
        tags=["rewards"],
    )
    async def restock_reward(
        code: str,
        request: Request,
        body: Restock,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> RewardWrite:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        return RewardWrite.of(await service.restock_reward(caller, code, body.quantity))

    @app.post(
        "/rewards/{code}/retire",
        response_model=RewardWrite,
        responses=ERRORS,
        summary="Retire a reward: listed, no longer redeemable",
        operation_id="RetireReward",
        tags=["rewards"],
    )
    async def retire_reward(
        code: str,
        request: Request,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> RewardWrite:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        return RewardWrite.of(await service.retire_reward(caller, code))

    @app.post(
        "/members/{contact_id}/reward-redemptions",
        status_code=201,
        response_model=RewardRedeemed,
        responses=ERRORS,
        summary="Redeem a reward: one unit of stock and its price in points, together",
        operation_id="RedeemReward",
        tags=["rewards"],
    )
    async def redeem_reward(
        contact_id: str,
        request: Request,
        response: Response,
        body: RewardRedemption,
        service: Service,
        idempotency_key: IdempotencyKey = None,
        if_match: IfMatch = None,
    ) -> RewardRedeemed:
        caller = http_caller(request, idempotency_key, expected_version(if_match))
        written = await service.redeem_reward(caller, contact_id, body.code)
        base = MemberWrite.of(written, response)
        assert written.reward is not None
        return RewardRedeemed(
            **base.model_dump(),
            reward=RewardModel.of(written.reward),
            redemption_id=written.outcome.extra.get("redemption", ""),
        )

    @app.get(
        "/erp/parked-orders",
        response_model=list[ParkedOrderModel],
        responses=ERRORS,
        summary="ERP messages not applied: parked (retried) and dead-lettered",
        operation_id="ListParkedOrders",
        tags=["erp"],
    )
    async def list_parked(service: Service, state: str = "") -> list[ParkedOrderModel]:
        return [ParkedOrderModel.of(p) for p in await service.parked(state)]

    @app.post(
        "/erp/parked-orders/{key}/redrive",
        response_model=ParkedOrderModel,
        responses=ERRORS,
        summary="Park a dead-lettered ERP message again, to be retried afresh",
        operation_id="RedriveParkedOrder",
        tags=["erp"],
    )
    async def redrive(
        key: str, request: Request, service: Service, idempotency_key: IdempotencyKey = None
    ) -> ParkedOrderModel:
        caller = http_caller(request, idempotency_key)
        return ParkedOrderModel.of(await service.redrive(caller, key))

    return app
