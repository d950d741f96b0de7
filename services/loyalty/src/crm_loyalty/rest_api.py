"""REST adapter: the loyalty API as JSON (OpenAPI at /docs and /openapi.json).

Every route's `operation_id` is the name of the gRPC method doing the same,
which is what the access policy (`crm_common/auth/access.yaml`) lists.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, Field

from crm_common.auth.gate import AccessGate
from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller, service_app
from crm_loyalty.application import LoyaltyService
from crm_loyalty.domain import Rules
from crm_loyalty.inputs import CampaignInput, Purchase, PurchaseLineInput, RulesInput
from crm_loyalty.views import MemberView, TierView, Written

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


class TierModel(BaseModel):
    contact_id: str
    tier: str
    qualifying_points: int
    next_tier: str
    points_to_next_tier: int

    @classmethod
    def of(cls, view: TierView) -> TierModel:
        return cls(**vars(view))


class Enrolment(BaseModel):
    contact_id: str = Field(max_length=100)
    channel: str | None = Field(None, description="web, store, app, call_center or erp")


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
        )


class RulesWrite(BaseModel):
    id: str
    version: int
    position: int
    replayed: bool
    rules: RulesModel


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
        return MemberWrite.of(await service.enrol(caller, body.contact_id, body.channel), response)

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

    return app
