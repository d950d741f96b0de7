"""The customer's tier, asked of the loyalty service over gRPC.

`GrpcLoyaltyTiers.tier_of` calls `crm.loyalty.v1.LoyaltyService/GetTier` with
this service's own credentials only (the tier decides the SLA targets, which
is the platform's business, not the acting user's: a partner opening a case
gets the same targets as an agent would) and a short deadline
(`CRM_TICKETS_LOYALTY_DEADLINE_MS`, default 300 ms). It never raises and never
waits longer than the deadline: when loyalty does not know the contact as a
member, is unreachable, does not answer in time or refuses, the answer is the
documented default tier with the reason in its source.
"""

from __future__ import annotations

import os

import grpc

from crm.loyalty.v1 import loyalty_pb2, loyalty_pb2_grpc
from crm_common.auth.principal import current_principal
from crm_common.clients import call_metadata, service_channel, service_credentials
from crm_common.settings import Settings
from crm_tickets.application import TierAnswer
from crm_tickets.domain import DEFAULT_TIER

#: How long opening a case waits for the tier before it takes the default.
DEFAULT_DEADLINE_MS = 300

REASONS = {
    grpc.StatusCode.NOT_FOUND: "not a member",
    grpc.StatusCode.INVALID_ARGUMENT: "not a member",
    grpc.StatusCode.UNAVAILABLE: "loyalty unreachable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "loyalty did not answer in time",
    grpc.StatusCode.PERMISSION_DENIED: "loyalty refused",
    grpc.StatusCode.UNAUTHENTICATED: "loyalty refused",
}


def deadline_seconds() -> float:
    return int(os.environ.get("CRM_TICKETS_LOYALTY_DEADLINE_MS", DEFAULT_DEADLINE_MS)) / 1000


class GrpcLoyaltyTiers:
    """`TierPort` over the loyalty gRPC API (`CRM_LOYALTY_GRPC_TARGET`)."""

    def __init__(
        self, settings: Settings, *, target: str | None = None, deadline: float | None = None
    ) -> None:
        self.settings = settings
        self.target = target or settings.grpc_target("loyalty")
        self.deadline = deadline_seconds() if deadline is None else deadline
        self.credentials = service_credentials(settings)
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> loyalty_pb2_grpc.LoyaltyServiceStub:
        if self._channel is None:
            self._channel = service_channel(self.target, self.settings)
        return loyalty_pb2_grpc.LoyaltyServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def tier_of(self, contact_id: str) -> TierAnswer:
        acting = current_principal.set(None)  # the service's own call, no acting user
        try:
            metadata = call_metadata(self.credentials)
        finally:
            current_principal.reset(acting)
        try:
            reply = await self._stub().GetTier(
                loyalty_pb2.GetTierRequest(contact_id=contact_id),
                timeout=self.deadline,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            reason = REASONS.get(error.code(), f"loyalty failed ({error.code().name})")
            return TierAnswer(DEFAULT_TIER, f"default: {reason}")
        tier = reply.tier.strip().lower()
        if not tier:
            return TierAnswer(DEFAULT_TIER, "default: no tier")
        return TierAnswer(tier, "loyalty")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
