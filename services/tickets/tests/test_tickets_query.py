"""The query tables over a store of a few thousand cases, on SQLite and PostgreSQL:
the team queue pages in the SLA order the cases' own clocks give, and a restarted
service (a new application and service over the same store) answers at once with
the same queues, cases at risk, customer histories, compliance and due deadlines,
without applying anything from the log and without holding the cases in memory."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from tickets_support import Clock, KnownContacts

from crm_common.commands import Caller, UnitOfWork
from crm_common.errors import ValidationFailed
from crm_common.querystore import QueryDatabase
from crm_common.settings import Settings
from crm_tickets.application import (
    DEFAULT_REOPEN_WINDOW_SECONDS,
    DEFAULT_TERMS,
    TicketsService,
    create_application,
)
from crm_tickets.deadlines import FAR, TicketsQuery, micros, queue_rank
from crm_tickets.domain import DEFAULT_TIER, Case

AGENT = Caller(actor="agent-7", client="test")
CASES = 3_000
TEAMS = ["desk", "field", "billing", "access"]
CUSTOMERS = [f"contact-{i}" for i in range(400)]
#: A Monday noon: the cases were opened over the morning (09:00-17:00 UTC hours), so
#: the urgent ones are overdue, others due within the hour.
NOON = datetime(2026, 3, 2, 12, tzinfo=UTC)
SMALL_CACHE = 100


def service(settings: Settings, clock: Clock, cache_size: int | None = None) -> TicketsService:
    app = create_application(settings)
    query = None
    if cache_size is not None:
        query = TicketsQuery(app, QueryDatabase(settings), cache_size=cache_size)
    return TicketsService(app, KnownContacts(*CUSTOMERS), clock=clock, query=query)


async def seed(svc: TicketsService, count: int) -> None:
    """`count` open cases, 500 a command (what a busy desk holds)."""
    rng = random.Random(15)

    def add_all(cases: list[Case]) -> Any:
        def decide(uow: UnitOfWork) -> Case:
            for case in cases:
                uow.add(case)
            return cases[0]

        return decide

    for start in range(0, count, 500):
        cases = [
            Case.open(
                customer_id=rng.choice(CUSTOMERS),
                channel="email",
                subject=f"Case {start + i}",
                description="",
                category="access",
                priority=rng.choice(["low", "normal", "normal", "high", "urgent"]),
                team=rng.choice(TEAMS),
                assignee="",
                tier=DEFAULT_TIER,
                tier_source="default: not a member",
                policy_id="",
                policy_version=0,
                terms=DEFAULT_TERMS,
                reopen_window_seconds=DEFAULT_REOPEN_WINDOW_SECONDS,
                at=NOON - timedelta(seconds=rng.uniform(0, 3 * 3600)),
            )
            for i in range(min(500, count - start))
        ]
        await svc.bus.execute_async(AGENT.command("SeedCases", start), add_all(cases))


async def all_pages(list_page: Any, page_size: int) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await list_page(page_size, token)
        ids += [c.id for c in page.cases]
        token = page.next_page_token
        if not token:
            return ids


async def answers(svc: TicketsService, customers: list[str]) -> dict[str, Any]:
    """What a user sees of the store through the queries."""
    compliance = await svc.sla_compliance("billing", NOON - timedelta(days=1), NOON)
    return {
        "queue": await all_pages(lambda n, t: svc.team_queue("billing", n, t), 200),
        "at_risk": await all_pages(lambda n, t: svc.cases_at_risk(30, "", n, t), 100),
        "customers": [
            await all_pages(lambda n, t, c=c: svc.customer_cases(c, n, t), 3) for c in customers
        ],
        "compliance": compliance,
        "due": [d.request_id for d in await asyncio.to_thread(svc.query.due, NOON, None, CASES)],
    }


async def test_a_restarted_service_answers_at_once_from_the_stored_tables(
    store_settings: Settings,
) -> None:
    clock = Clock(NOON)
    before = service(store_settings, clock, cache_size=SMALL_CACHE)
    try:
        await seed(before, CASES)
        # A few cases worked through the service: replies, a breach, solved and closed.
        worked = (await before.team_queue("billing", page_size=3)).cases
        customers = [*CUSTOMERS[:5], worked[1].customer_id]
        await before.reply_to_case(AGENT, worked[0].id, "agent", "on it")
        await before.change_case_status(AGENT, worked[1].id, "solved")
        await before.change_case_status(AGENT, worked[1].id, "closed")
        await before.change_case_status(AGENT, worked[2].id, "pending")
        seen = await answers(before, customers)
        position = before.query.side.position()
        # Building the tables held a bounded number of cases, never the store.
        assert before.query.tables.cached <= SMALL_CACHE
    finally:
        before.close()

    # The queue is in the SLA order of the cases' own clocks, across pages.
    app = create_application(store_settings)
    try:
        billing: list[Case] = [app.repository.get(UUID(ident)) for ident in seen["queue"]]
        keys = []
        for case in billing:
            rank, urgent = queue_rank(case, case.deadlines())
            keys.append((rank, urgent, micros(case.opened_at), str(case.id)))
        assert keys == sorted(keys) and len(keys) == len(set(seen["queue"]))
        assert all(c.team == "billing" and c.status not in ("solved", "closed") for c in billing)
        assert keys[-1][1] == FAR  # the pending case waits last
    finally:
        app.close()
    assert len(seen["queue"]) > 500 and seen["at_risk"] and seen["due"]
    assert worked[1].id in seen["customers"][-1] and worked[1].id not in seen["queue"]
    # Every billing case is in the compliance report: the queue's and the closed one.
    assert seen["compliance"].cases == len(seen["queue"]) + 1
    assert (seen["compliance"].first_reply_count, seen["compliance"].resolution_count) == (2, 1)

    restarted = service(store_settings, clock)
    try:
        assert await answers(restarted, customers) == seen
        # Nothing was read from the log: the tables were where the first one left them.
        assert restarted.query.side.applied == 0
        assert restarted.query.side.position() == position
        assert restarted.query.tables.cached == 0
        # Its own writes show in its next query (read-your-writes), applying only them.
        await restarted.change_case_status(AGENT, worked[0].id, "solved")
        queue = await all_pages(lambda n, t: restarted.team_queue("billing", n, t), 500)
        assert worked[0].id not in queue
        assert 0 < restarted.query.side.applied <= 2
        # A page token holds the key of its own list: another list refuses it.
        token = (await restarted.team_queue("billing", page_size=1)).next_page_token
        with pytest.raises(ValidationFailed) as error:
            await restarted.customer_cases(CUSTOMERS[0], 10, token)
        assert error.value.errors[0].field == "page_token"
    finally:
        restarted.close()
