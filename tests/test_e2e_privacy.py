"""End to end over the real stack, master keys on: a person's history in every
service, their export, their erasure, and then nothing of them in clear anywhere.

A stack of its own (Kafka, the document store and every service process, as
`deploy/crm up` runs them), once with the write services on SQLite files and
once on PostgreSQL, so that every table, topic and collection it scans holds
only what this test wrote. The person has a company link, consent, interactions,
a won deal named after them with an activity, a case with a reply and a
loyalty membership with a birthday and points. The admin exports them (every
service's part holds their data), a sales user may not erase them, the admin
does. Once every service has honoured it (their data keys destroyed, the 360
view redacted), a raw read of every row of every store, every Kafka record
(value and headers) and every document finds none of their personal values,
while the business facts (the deal's amount in the forecast and the 360
revenue, the case count, the points balance) are unchanged, also after the
360 view is rebuilt from the topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from crm.contacts.v1 import contacts_pb2 as c
from crm.customer360.v1 import customer360_pb2 as v
from crm.loyalty.v1 import loyalty_pb2 as lp
from crm.pipeline.v1 import pipeline_pb2 as p
from crm.tickets.v1 import tickets_pb2 as t
from crm_deploy.identity import Identity
from crm_deploy.postgres import PostgresTarget
from crm_deploy.stack import SERVICE_PROCESSES, Stack, StackConfig
from crm_deploy.testing import (
    PersonalValues,
    PersonHistory,
    PlatformClients,
    create_history,
    documents,
    erased_subjects,
    found_where,
    kafka_records,
    postgres_cells,
    postgres_database,
    postgres_env,
    sqlite_cells,
)

pytestmark = pytest.mark.servers

PROJECTOR = "analytics-projector"
#: The document store's replication log (`local.oplog.rs`, a capped collection) keeps
#: every write made to the 360 view, with the values it wrote, until newer writes
#: overwrite it: like the write-ahead logs of SQLite and PostgreSQL, a remnant of
#: the server, not a document anyone reads, so the scan leaves it out (the end of
#: the test checks that it is the only place left).
SERVER_LOGS = ("local",)
#: How long every service may take to honour an erase (relay, Kafka, followers).
HONOUR_DEADLINE = 60.0


@dataclass
class ErasingStack:
    stack: Stack
    #: The extra environment of every service process (PostgreSQL, key cache).
    env: dict[str, str]
    postgres: PostgresTarget | None

    @property
    def identity(self) -> Identity:
        return self.stack.identity

    def clients(self, role: str = "admin") -> PlatformClients:
        return PlatformClients(self.stack.config.service_ports, self.identity, role)

    def service_env(self) -> dict[str, str]:
        return dict(self.stack.service_env(self.env))

    def stored_cells(self) -> Iterator[tuple[str, bytes]]:
        """Every cell of every table of every service's store."""
        yield from sqlite_cells(self.stack.config.data_dir)
        if self.postgres is not None:
            yield from postgres_cells(self.postgres)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def erasing_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, identity: Identity
) -> Iterator[ErasingStack]:
    root = tmp_path_factory.mktemp(f"erase-{request.param}")
    stack = Stack(StackConfig.for_tests(root, identity_dir=identity.root))
    # Another process than the one that destroyed a key forgets it within this
    # (CRM_KEY_CACHE_TTL_SECONDS, 60 s by default): the APIs show the erase soon.
    env = {"CRM_KEY_CACHE_TTL_SECONDS": "2"}
    resources = contextlib.ExitStack()
    target = None
    if request.param == "postgres":
        target = resources.enter_context(postgres_database("crm_erase"))
        env.update(postgres_env(target))
    stack.start_infra()
    try:
        stack.start_services([row.name for row in SERVICE_PROCESSES], extra_env=env)
        yield ErasingStack(stack, env, target)
    finally:
        stack.stop()
        resources.close()
        if not os.environ.get("CRM_KEEP_TEST_DATA"):
            shutil.rmtree(root, ignore_errors=True)


# -- reading what the services show ------------------------------------------------------


async def view(clients: PlatformClients, person_id: str, wait_for: dict[str, int]) -> Any:
    reply = await clients.customer360.GetCustomer360(
        v.GetCustomer360Request(customer_id=person_id, wait_for=wait_for, wait_timeout_ms=30000)
    )
    return reply.customer


def in_clear(message: Any, values: list[str]) -> list[str]:
    """Those of `values` a reply shows (its fields, as JSON and as wire bytes)."""
    text = json_format.MessageToJson(message) + message.SerializeToString().decode(errors="ignore")
    return [value for value in values if value in text]


@dataclass(frozen=True)
class BusinessFacts:
    """What the business counts, which an erase leaves as it was."""

    forecast: list[tuple[str, str, str, int]]
    revenue: list[tuple[str, str]]
    deal_amounts: list[tuple[str, str]]
    cases: int
    cases_in_view: int
    balance: tuple[int, int]
    balance_in_view: tuple[int, int]


async def business_facts(
    clients: PlatformClients, history: PersonHistory, wait_for: dict[str, int]
) -> BusinessFacts:
    forecast = await clients.pipeline.GetForecast(
        p.GetForecastRequest(pipeline_id=history.pipeline_id)
    )
    cases = await clients.tickets.ListCustomerCases(
        t.ListCustomerCasesRequest(customer_id=history.person_id)
    )
    member = await clients.loyalty.GetMember(lp.GetMemberRequest(contact_id=history.person_id))
    doc = await view(clients, history.person_id, wait_for)
    return BusinessFacts(
        forecast=sorted(
            (r.period, r.amount.amount, r.amount.currency, r.deals) for r in forecast.rows
        ),
        revenue=[(m.amount, m.currency) for m in doc.lifetime_won_revenue],
        deal_amounts=sorted((d.amount.amount, d.amount.currency) for d in doc.deals),
        cases=len(cases.cases),
        cases_in_view=len(doc.tickets.open_cases) + len(doc.tickets.recent_cases),
        balance=(member.member.balance.active, member.member.balance.locked),
        balance_in_view=(doc.loyalty.balance.active, doc.loyalty.balance.locked),
    )


async def wait_until_honoured(
    erasing: ErasingStack,
    clients: PlatformClients,
    history: PersonHistory,
    personal: PersonalValues,
    wait_for: dict[str, int],
) -> None:
    """Until every owner destroyed the person's keys and the 360 view shows none
    of their values; fails naming what is still missing."""
    deadline = time.monotonic() + HONOUR_DEADLINE
    env = erasing.service_env()
    while True:
        keys = await asyncio.to_thread(erased_subjects, env, history)
        pending = {
            f"{owner} key of {subject}: {state}"
            for owner, states in keys.items()
            for subject, state in states.items()
            if state != "destroyed"
        }
        shown = in_clear(await view(clients, history.person_id, wait_for), personal.every_value())
        if shown:
            pending.add(f"the 360 view still shows {shown}")
        if not pending:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not honoured within {HONOUR_DEADLINE:.0f} s: {sorted(pending)}")
        await asyncio.sleep(0.5)


async def shown_by_the_apis(
    clients: PlatformClients, history: PersonHistory, values: list[str]
) -> dict[str, Any]:
    """The deals, cases and membership as the APIs show them, once none shows
    `values` (or after a few times the key cache's lifetime: then as they are)."""
    deadline = time.monotonic() + 15
    while True:
        deals = [
            await clients.pipeline.GetOpportunity(p.GetOpportunityRequest(id=deal_id))
            for deal_id in history.deal_ids
        ]
        cases = await clients.tickets.ListCustomerCases(
            t.ListCustomerCasesRequest(customer_id=history.person_id)
        )
        member = await clients.loyalty.GetMember(lp.GetMemberRequest(contact_id=history.person_id))
        replies = {"deals": deals, "cases": cases, "member": member}
        shown = [r for r in (*deals, cases, member) if in_clear(r, values)]
        if not shown or time.monotonic() > deadline:
            return replies
        await asyncio.sleep(0.5)


async def anything_in_clear(erasing: ErasingStack, values: list[str]) -> dict[str, Any]:
    """Where a raw read of the stores, Kafka and the document store finds `values`."""
    stack = erasing.stack
    stores = await asyncio.to_thread(lambda: found_where(erasing.stored_cells(), values))
    topics = found_where(await kafka_records(stack.kafka_bootstrap), values)
    docs = await asyncio.to_thread(
        lambda: found_where(documents(stack.mongo_url, skip=SERVER_LOGS), values)
    )
    return {"stores": stores, "kafka": topics, "documents": docs}


async def rebuild_the_360_view(erasing: ErasingStack) -> None:
    """What `deploy/crm rebuild-360` does: the projector stopped, `crm-analytics
    rebuild` from the topics, the projector started again."""
    stack = erasing.stack
    stack.stop_services([PROJECTOR])
    executable = str(Path(sys.executable).with_name("crm-analytics"))
    log = stack.config.logs_dir / "analytics-rebuild.log"
    with log.open("ab") as out:
        result = await asyncio.to_thread(
            subprocess.run,
            [executable, "rebuild"],
            env=erasing.service_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, log.read_text()[-3000:]
    stack.restart(PROJECTOR)
    await asyncio.to_thread(stack.process(PROJECTOR).wait_ready)


# -- the test ----------------------------------------------------------------------------------


async def test_an_erased_person_is_nowhere_in_clear_and_the_business_facts_stay(
    erasing_stack: ErasingStack,
) -> None:
    erasing = erasing_stack
    personal = PersonalValues.unique()
    async with erasing.clients("admin") as admin, erasing.clients("sales") as sales:
        history = await create_history(admin, personal)
        values = personal.every_value()
        before = await business_facts(admin, history, history.positions)
        assert before.revenue == [(f"{history.won_amount:.2f}", "EUR")]
        assert before.deal_amounts == [(f"{history.won_amount:.2f}", "EUR")]
        assert before.cases == before.cases_in_view == 1
        assert before.balance == before.balance_in_view and history.points > 0
        assert before.balance[0] + before.balance[1] == history.points
        assert [(amount, deals) for _, amount, _, deals in before.forecast] == [
            (f"{history.won_amount:.2f}", 1)
        ]

        # The export gathers every service's part, each with the person's data.
        exported = await admin.contacts.ExportPerson(c.ExportPersonRequest(id=history.person_id))
        document = json.loads(exported.document_json)
        parts = {name: json.dumps(part) for name, part in document["services"].items()}
        assert {"contacts", "pipeline", "tickets", "loyalty"} <= set(exported.services)
        assert set(exported.services) == set(parts)
        expected = {
            "contacts": [personal.given_name, personal.family_name, personal.email,
                         personal.phone, personal.role, *personal.summaries],
            "pipeline": [*personal.deal_names, *personal.activity_titles],
            "tickets": [*personal.case_subjects, *personal.replies],
            "loyalty": [personal.birthday],
        }  # fmt: skip
        if "analytics" in parts:
            expected["analytics"] = [personal.given_name, personal.family_name, personal.email]
        for service, wanted in expected.items():
            missing = [value for value in wanted if value not in parts[service]]
            assert not missing, f"the {service} part of the export lacks {missing}"

        # Only an admin erases; a refused erase changes nothing.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sales.contacts.ErasePerson(
                c.ErasePersonRequest(id=history.person_id, reference="DSR-2026-0001")
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        still = await admin.contacts.GetContact(c.GetContactRequest(id=history.person_id))
        assert not still.contact.erased
        assert still.contact.given_name == personal.given_name

        erased = await admin.contacts.ErasePerson(
            c.ErasePersonRequest(id=history.person_id, reference="DSR-2026-0001")
        )
        wait_for = {**history.positions, "contacts": erased.result.position}
        await wait_until_honoured(erasing, admin, history, personal, wait_for)

        # Each service shows the erase (an API process forgets a destroyed key it
        # had cached within CRM_KEY_CACHE_TTL_SECONDS), and counts as before.
        contact = await admin.contacts.GetContact(c.GetContactRequest(id=history.person_id))
        assert contact.contact.erased
        assert not in_clear(contact, values)
        replies = await shown_by_the_apis(admin, history, values)
        assert replies["deals"] and not any(in_clear(d, values) for d in replies["deals"])
        assert all(Decimal(d.opportunity.amount.amount) > 0 for d in replies["deals"])
        assert not in_clear(replies["cases"], values)
        assert replies["member"].member.birthday == ""
        assert await business_facts(admin, history, wait_for) == before

        # Nothing of them in clear in any store, topic or document; the scans see
        # the stack's data (the person's id is in each of them).
        found = await anything_in_clear(erasing, values)
        assert found == {"stores": {}, "kafka": {}, "documents": {}}
        seen = await anything_in_clear(erasing, [history.person_id])
        assert all(seen[where] for where in ("stores", "kafka", "documents")), seen

        # The 360 view rebuilt from the topics has none of them either.
        await rebuild_the_360_view(erasing)
        rebuilt = await view(admin, history.person_id, wait_for)
        assert not in_clear(rebuilt, values)
        assert await business_facts(admin, history, wait_for) == before
        docs = await asyncio.to_thread(
            lambda: found_where(documents(erasing.stack.mongo_url, skip=SERVER_LOGS), values)
        )
        assert docs == {}
        # What the scan left out: the document store's replication log still holds
        # the values the 360 view was written with before the erase.
        logged = await asyncio.to_thread(
            lambda: found_where(documents(erasing.stack.mongo_url), [personal.family_name])
        )
        assert set(logged.get(personal.family_name, [])) <= {"local.oplog.rs"}
