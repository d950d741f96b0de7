"""gRPC adapter: crm.loyalty.v1.LoyaltyService over the application layer.

Translation only; errors are raised as `CrmError`s and mapped by the shared
server (`crm_common.server`).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from crm.loyalty.v1 import loyalty_pb2 as pb
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_common.enums import enum_word
from crm_common.server import GrpcService, grpc_caller
from crm_loyalty.application import LoyaltyService
from crm_loyalty.domain import Rules
from crm_loyalty.inputs import CampaignInput, Purchase, PurchaseLineInput, RulesInput
from crm_loyalty.messages import (
    from_timestamp,
    member_pb,
    rules_pb,
    tier_pb,
    write_result,
)
from crm_loyalty.views import MemberView, Written

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoyaltyService"].full_name

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _member(written: Written) -> pb.Member:
    assert isinstance(written.subject, MemberView)
    return member_pb(written.subject)


def rules_input(rules: pb.EarningRules) -> RulesInput:
    return RulesInput(
        rates={r.currency: r.points_per_unit for r in rules.rates},
        tier_multipliers={m.key: m.factor for m in rules.tier_multipliers},
        category_multipliers={m.key: m.factor for m in rules.category_multipliers},
        campaigns=[
            CampaignInput(
                c.name,
                c.factor,
                from_timestamp(c.starts_at, f"rules.campaigns[{i}].starts_at"),
                from_timestamp(c.ends_at, f"rules.campaigns[{i}].ends_at"),
                list(c.categories),
            )
            for i, c in enumerate(rules.campaigns)
        ],
        lot_lifetime_days=rules.lot_lifetime_days or 365,
        return_window_days=rules.return_window_days,
    )


class LoyaltyServicer(loyalty_pb2_grpc.LoyaltyServiceServicer):
    def __init__(self, service: LoyaltyService) -> None:
        self.service = service

    async def EnrolMember(
        self, request: pb.EnrolMemberRequest, context: Context
    ) -> pb.EnrolMemberResponse:
        written = await self.service.enrol(
            grpc_caller(context, request.request_id),
            request.contact_id,
            enum_word(pb.EnrolmentChannel, request.channel),
        )
        return pb.EnrolMemberResponse(result=write_result(written.outcome), member=_member(written))

    async def GetMember(
        self, request: pb.GetMemberRequest, context: Context
    ) -> pb.GetMemberResponse:
        return pb.GetMemberResponse(
            member=member_pb(await self.service.get_member(request.contact_id))
        )

    async def EarnPoints(
        self, request: pb.EarnPointsRequest, context: Context
    ) -> pb.EarnPointsResponse:
        purchase = Purchase(
            [
                PurchaseLineInput(
                    line.line_id, line.amount.amount, line.amount.currency, line.category
                )
                for line in request.lines
            ],
            request.reference,
        )
        written = await self.service.earn(
            grpc_caller(context, request.request_id, request.expected_version),
            request.contact_id,
            purchase,
        )
        return pb.EarnPointsResponse(
            result=write_result(written.outcome),
            member=_member(written),
            points=int(written.outcome.extra.get("points", "0")),
        )

    async def RedeemPoints(
        self, request: pb.RedeemPointsRequest, context: Context
    ) -> pb.RedeemPointsResponse:
        written = await self.service.redeem(
            grpc_caller(context, request.request_id, request.expected_version),
            request.contact_id,
            request.points,
            request.reference,
        )
        return pb.RedeemPointsResponse(
            result=write_result(written.outcome), member=_member(written)
        )

    async def AdjustPoints(
        self, request: pb.AdjustPointsRequest, context: Context
    ) -> pb.AdjustPointsResponse:
        written = await self.service.adjust(
            grpc_caller(context, request.request_id, request.expected_version),
            request.contact_id,
            request.points,
            request.reason,
        )
        return pb.AdjustPointsResponse(
            result=write_result(written.outcome), member=_member(written)
        )

    async def PublishEarningRules(
        self, request: pb.PublishEarningRulesRequest, context: Context
    ) -> pb.PublishEarningRulesResponse:
        written = await self.service.publish_rules(
            grpc_caller(context, request.request_id, request.expected_version),
            rules_input(request.rules),
        )
        assert isinstance(written.subject, Rules)
        return pb.PublishEarningRulesResponse(
            result=write_result(written.outcome), rules=rules_pb(written.subject)
        )

    async def GetEarningRules(
        self, request: pb.GetEarningRulesRequest, context: Context
    ) -> pb.GetEarningRulesResponse:
        return pb.GetEarningRulesResponse(rules=rules_pb(await self.service.get_rules()))

    async def GetTier(self, request: pb.GetTierRequest, context: Context) -> pb.GetTierResponse:
        return tier_pb(await self.service.get_tier(request.contact_id))


def grpc_service(service: LoyaltyService) -> GrpcService:
    return GrpcService(
        LoyaltyServicer(service),
        loyalty_pb2_grpc.add_LoyaltyServiceServicer_to_server,
        SERVICE_NAME,
    )
