"""Snapshots of cases, on SQLite and PostgreSQL.

A case's replies, notes, SLA warnings and breaches are its events; every
`CRM_SNAPSHOT_INTERVAL` events the store keeps a snapshot, a load reads only
the events after it, and what it loads is the case a full replay builds,
field for field (its SLA clocks and deadlines included). The API answers the
same with and without snapshots, the notification log (what the relay
publishes) holds events only, and a store written before snapshots existed
still loads.
"""

from __future__ import annotations

from uuid import UUID

import pytest
from tickets_support import Clock, KnownContacts, office_terms

from crm_common.commands import Caller
from crm_common.settings import Settings
from crm_deploy.testing import assert_loads_from_snapshot, assert_log_holds_events_only
from crm_tickets.application import TicketsService, create_application
from crm_tickets.inputs import NewCase

AGENT = Caller(actor="agent-7", client="test")
CUSTOMER = Caller(actor="contact-1", client="test")
ADMIN = Caller(actor="admin-1", client="test")
INTERVAL = 10


def service(settings: Settings, clock: Clock) -> TicketsService:
    return TicketsService(create_application(settings), KnownContacts("contact-1"), clock=clock)


async def busy_case(svc: TicketsService, clock: Clock) -> str:
    policy = await svc.define_sla_policy(ADMIN, "Office", office_terms())
    opened = await svc.open_case(
        AGENT,
        NewCase("contact-1", "chat", "Cannot log in", team="support", policy_id=policy.outcome.id),
    )
    case_id = opened.outcome.id
    await svc.assign_case(AGENT, case_id, "agent-7")
    for i in range(6):
        clock.advance(minutes=40)
        await svc.raise_due_deadlines()
        await svc.reply_to_case(CUSTOMER, case_id, "customer", f"still broken ({i})")
        await svc.reply_to_case(AGENT, case_id, "agent", f"looking into it ({i})")
        await svc.add_internal_note(AGENT, case_id, f"note {i}")
    await svc.add_internal_note(AGENT, case_id, "handing over")
    return case_id


async def test_cases_load_from_snapshots(
    store_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    clock = Clock()
    svc = service(store_settings, clock)
    try:
        case_id = await busy_case(svc, clock)
        case = assert_loads_from_snapshot(svc.app, UUID(case_id), monkeypatch, INTERVAL)
        assert case.version > 2 * INTERVAL
        view = await svc.get_case(case_id)
        policy_version = svc.app.repository.get(UUID(case.policy_id)).version
        assert_log_holds_events_only(svc.app, case.version + policy_version)
    finally:
        svc.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    plain = service(store_settings, clock)
    try:
        assert plain.app.snapshots is None
        assert await plain.get_case(case_id) == view
    finally:
        plain.close()


async def test_a_store_written_without_snapshots_still_loads(
    store_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", "0")
    clock = Clock()
    before = service(store_settings, clock)
    try:
        case_id = await busy_case(before, clock)
        view = await before.get_case(case_id)
    finally:
        before.close()

    monkeypatch.setenv("CRM_SNAPSHOT_INTERVAL", str(INTERVAL))
    after = service(store_settings, clock)
    try:
        assert after.app.snapshots is not None
        assert list(after.app.snapshots.get(UUID(case_id))) == []
        assert await after.get_case(case_id) == view
        for i in range(INTERVAL):
            await after.add_internal_note(AGENT, case_id, f"after the upgrade {i}")
        assert_loads_from_snapshot(after.app, UUID(case_id), monkeypatch, INTERVAL)
    finally:
        after.close()
