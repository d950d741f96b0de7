"""The customer's tier from a real loyalty gRPC API (in process, behind its real
access gate, asked with the platform's own signed token), and the documented
default whenever loyalty cannot say: not a member, unreachable, too slow."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from tickets_support import Clock, KnownContacts, office_terms, sqlite_settings

from crm_common.commands import Caller
from crm_common.server import AccessInterceptor
from crm_common.settings import Settings
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import gate_for
from crm_loyalty.application import LoyaltyService
from crm_loyalty.application import create_application as loyalty_application
from crm_loyalty.grpc_api import grpc_service as loyalty_grpc
from crm_tickets.application import TicketsService, create_application
from crm_tickets.inputs import NewCase, TargetInput
from crm_tickets.loyalty_client import GrpcLoyaltyTiers

AGENT = Caller(actor="agent-7", client="test")
MEMBER, STRANGER = str(uuid.uuid4()), str(uuid.uuid4())


def tickets_settings(tmp_path: Path, identity: Identity) -> Settings:
    env = identity.env()
    return replace(
        sqlite_settings(tmp_path / "tickets"),
        auth_issuer=env["CRM_AUTH_ISSUER"],
        auth_audience=env["CRM_AUTH_AUDIENCE"],
        service_key_file=env["CRM_SERVICE_KEY_FILE"],
        service_key_id=env["CRM_SERVICE_KEY_ID"],
    )


@pytest.fixture
async def loyalty_target(tmp_path: Path, identity: Identity) -> AsyncIterator[str]:
    """A real loyalty API on a free port, with one member."""
    settings = replace(sqlite_settings(tmp_path / "loyalty"), service="loyalty")
    loyalty = LoyaltyService(loyalty_application(settings), KnownContacts(MEMBER, STRANGER))
    await loyalty.enrol(AGENT, MEMBER, "web")
    server = grpc.aio.server(interceptors=[AccessInterceptor(gate_for("loyalty", identity))])
    api = loyalty_grpc(loyalty)
    api.add_to_server(api.servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)
    loyalty.close()


@pytest.fixture
def silent_target() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


async def open_with(
    tmp_path: Path, identity: Identity, target: str, customer: str
) -> tuple[str, str, int, float]:
    """Opens a case with the tier from `target`: (tier, source, first-response target,
    seconds it took)."""
    tiers = GrpcLoyaltyTiers(tickets_settings(tmp_path, identity), target=target, deadline=0.3)
    svc = TicketsService(
        create_application(sqlite_settings(tmp_path / f"tickets-{uuid.uuid4().hex[:6]}")),
        KnownContacts(MEMBER, STRANGER),
        clock=Clock(),
        tiers=tiers,
    )
    try:
        terms = office_terms(first_response=3600)
        terms = replace(terms, targets=[*terms.targets, TargetInput("basic", "normal", 600, 7200)])
        pid = (await svc.define_sla_policy(AGENT, "Tiered", terms)).outcome.id
        started = time.monotonic()
        opened = await svc.open_case(
            AGENT, NewCase(customer, "email", "Help", team="desk", policy_id=pid)
        )
        took = time.monotonic() - started
        case = opened.subject
        first = next(c for c in case.clocks if c.kind == "first_response")  # type: ignore[union-attr]
        return case.tier, case.tier_source, first.target_seconds, took  # type: ignore[union-attr]
    finally:
        svc.close()
        await tiers.close()


async def test_a_member_gets_the_tier_loyalty_gives_and_its_targets(
    tmp_path: Path, identity: Identity, loyalty_target: str
) -> None:
    tier, source, target, _ = await open_with(tmp_path, identity, loyalty_target, MEMBER)
    assert (tier, source, target) == ("basic", "loyalty", 600)


async def test_a_contact_who_is_not_a_member_gets_the_default(
    tmp_path: Path, identity: Identity, loyalty_target: str
) -> None:
    tier, source, target, _ = await open_with(tmp_path, identity, loyalty_target, STRANGER)
    assert (tier, source, target) == ("standard", "default: not a member", 3600)


async def test_unreachable_loyalty_gives_the_default_at_once(
    tmp_path: Path, identity: Identity
) -> None:
    tier, source, _, took = await open_with(tmp_path, identity, f"127.0.0.1:{free_port()}", MEMBER)
    assert (tier, source) == ("standard", "default: loyalty unreachable")
    assert took < 5  # bounded by the deadline, never a hang (generous for a busy machine)


async def test_a_loyalty_that_does_not_answer_costs_the_deadline_only(
    tmp_path: Path, identity: Identity, silent_target: str
) -> None:
    tier, source, _, took = await asyncio.wait_for(
        open_with(tmp_path, identity, silent_target, MEMBER), timeout=10
    )
    assert tier == "standard"
    assert source in ("default: loyalty did not answer in time", "default: loyalty unreachable")
    assert took < 5


async def test_a_token_loyalty_refuses_gives_the_default(
    tmp_path: Path, identity: Identity, loyalty_target: str
) -> None:
    settings = replace(tickets_settings(tmp_path, identity), service_key_id="unknown-key")
    tiers = GrpcLoyaltyTiers(settings, target=loyalty_target, deadline=0.3)
    try:
        answer = await tiers.tier_of(MEMBER)
    finally:
        await tiers.close()
    assert (answer.tier, answer.source) == ("standard", "default: loyalty refused")
