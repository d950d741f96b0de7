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
from crm_loyalty.inputs import (
    CampaignInput,
    MemberQuery,
    Purchase,
    PurchaseLineInput,
    RewardInput,
    RulesInput,
)
from crm_loyalty.messages import (
    from_timestamp,
    member_pb,
    member_summary_pb,
    parked_pb,
    reward_pb,
    rules_pb,
    tier_pb,
    write_result,
)
from crm_loyalty.views import MemberView, RewardView, Written

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoyaltyService"].full_name

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _member(written: Written) -> pb.Member:
    assert isinstance(written.subject, MemberView)
    return member_pb(written.subject)


def _reward(written: Written) -> pb.Reward:
    assert isinstance(written.subject, RewardView)
    return reward_pb(written.subject)


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
        first_purchase_bonus=rules.first_purchase_bonus,
        birthday_bonus=rules.birthday_bonus,
        referrer_bonus=rules.referrer_bonus,
        referee_bonus=rules.referee_bonus,
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
            birthday=request.birthday,
            referred_by=request.referred_by,
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

    async def ListMembers(
        self, request: pb.ListMembersRequest, context: Context
    ) -> pb.ListMembersResponse:
        page = await self.service.list_members(
            MemberQuery(
                tier=request.tier,
                min_available=request.min_available,
                expiring_before=from_timestamp(request.expiring_before, "expiring_before"),
                order_by=enum_word(pb.MemberOrder, request.order_by),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListMembersResponse(
            members=[member_summary_pb(m) for m in page.members],
            next_page_token=page.next_page_token,
        )

    async def DefineReward(
        self, request: pb.DefineRewardRequest, context: Context
    ) -> pb.DefineRewardResponse:
        value = RewardInput(
            request.code,
            request.name,
            request.points,
            request.stock,
            from_timestamp(request.valid_from, "valid_from"),
            from_timestamp(request.valid_until, "valid_until"),
        )
        written = await self.service.define_reward(grpc_caller(context, request.request_id), value)
        return pb.DefineRewardResponse(
            result=write_result(written.outcome), reward=_reward(written)
        )

    async def RestockReward(
        self, request: pb.RestockRewardRequest, context: Context
    ) -> pb.RestockRewardResponse:
        written = await self.service.restock_reward(
            grpc_caller(context, request.request_id, request.expected_version),
            request.code,
            request.quantity,
        )
        return pb.RestockRewardResponse(
            result=write_result(written.outcome), reward=_reward(written)
        )

    async def RetireReward(
        self, request: pb.RetireRewardRequest, context: Context
    ) -> pb.RetireRewardResponse:
        written = await self.service.retire_reward(
            grpc_caller(context, request.request_id, request.expected_version), request.code
        )
        return pb.RetireRewardResponse(
            result=write_result(written.outcome), reward=_reward(written)
        )

    async def ListRewards(
        self, request: pb.ListRewardsRequest, context: Context
    ) -> pb.ListRewardsResponse:
        rewards = await self.service.list_rewards(include_retired=request.include_retired)
        return pb.ListRewardsResponse(rewards=[reward_pb(r) for r in rewards])

    async def RedeemReward(
        self, request: pb.RedeemRewardRequest, context: Context
    ) -> pb.RedeemRewardResponse:
        written = await self.service.redeem_reward(
            grpc_caller(context, request.request_id, request.expected_version),
            request.contact_id,
            request.code,
        )
        assert written.reward is not None
        return pb.RedeemRewardResponse(
            result=write_result(written.outcome),
            member=_member(written),
            reward=reward_pb(written.reward),
            redemption_id=written.outcome.extra.get("redemption", ""),
        )

    async def ListParkedOrders(
        self, request: pb.ListParkedOrdersRequest, context: Context
    ) -> pb.ListParkedOrdersResponse:
        parked = await self.service.parked(request.state)
        return pb.ListParkedOrdersResponse(orders=[parked_pb(p) for p in parked])

    async def RedriveParkedOrder(
        self, request: pb.RedriveParkedOrderRequest, context: Context
    ) -> pb.RedriveParkedOrderResponse:
        parked = await self.service.redrive(grpc_caller(context, request.request_id), request.key)
        return pb.RedriveParkedOrderResponse(order=parked_pb(parked))


def grpc_service(service: LoyaltyService) -> GrpcService:
    return GrpcService(
        LoyaltyServicer(service),
        loyalty_pb2_grpc.add_LoyaltyServiceServicer_to_server,
        SERVICE_NAME,
    )
