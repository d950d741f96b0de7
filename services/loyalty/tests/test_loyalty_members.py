"""The members listing and the query tables, on SQLite and PostgreSQL.

`ListMembers` answers from the members table: its rows agree with `GetMember`,
its filters and orders select and sort what the marketing console asks for,
its keyset pages walk every member exactly once, and a bad question is
refused naming the field. The schedule's walk over every member reads the
same table a page at a time. A service started again over a store of a few
thousand members answers at once from the stored tables, with the same
answers, without reading the log again and without holding the members in
memory; a real `crm-loyalty serve` process started again over such a store
answers the listing as before, having applied only what was written since.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from loyalty_support import T0, Clock, KnownContacts, sqlite_settings

from crm.loyalty.v1 import loyalty_pb2 as pb
from crm.loyalty.v1 import loyalty_pb2_grpc
from crm_common.commands import Caller
from crm_common.errors import ValidationFailed
from crm_common.querystore import QueryDatabase
from crm_common.settings import Settings
from crm_deploy.identity import Identity
from crm_deploy.process import free_port
from crm_deploy.testing import (
    clean_environment,
    grpc_auth,
    postgres_settings,
    postgres_target,
    start_process,
    stop_gracefully,
    wait_serving,
)
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.domain import DEFAULT_TIERS, Member, expiry_of
from crm_loyalty.inputs import MemberQuery, Purchase, PurchaseLineInput, RewardInput
from crm_loyalty.query_tables import LoyaltyQueries
from crm_loyalty.views import MemberSummaryView

ADMIN = Caller(actor="mia", client="marketing-console")
MEMBERS = [f"m-{i:02d}" for i in range(12)]


@pytest.fixture
def contacts() -> KnownContacts:
    return KnownContacts(*MEMBERS, "m-12", "a-first")


async def walk(service: LoyaltyService, query: MemberQuery) -> list[MemberSummaryView]:
    """Every page of a listing, in order."""
    rows: list[MemberSummaryView] = []
    token = ""
    for _ in range(100):
        page = await service.list_members(
            MemberQuery(
                query.tier,
                query.min_available,
                query.expiring_before,
                query.order_by,
                query.page_size,
                token,
            )
        )
        assert len(page.members) <= (query.page_size or 50)
        rows.extend(page.members)
        token = page.next_page_token
        if not token:
            return rows
    raise AssertionError("the pages never ended")


async def populate(service: LoyaltyService, clock: Clock) -> None:
    """m-00 without points; m-i earns i * 150 points on day i (expiring 365 days
    later); m-07 and up reach silver; m-05 spends 100."""
    for contact in MEMBERS:
        await service.enrol(ADMIN, contact, "web")
    for i, contact in enumerate(MEMBERS[1:], start=1):
        clock.advance(days=1)
        purchase = Purchase([PurchaseLineInput("1", str(i * 150), "EUR")])
        await service.earn(ADMIN, contact, purchase)
    await service.redeem(ADMIN, "m-05", 100, "voucher")


async def test_the_listing_agrees_with_each_member_and_filters_and_sorts(
    service: LoyaltyService, clock: Clock
) -> None:
    await populate(service, clock)
    rows = await walk(service, MemberQuery(page_size=5))
    assert [r.contact_id for r in rows] == MEMBERS
    for row in rows:
        member = await service.get_member(row.contact_id)
        assert (row.tier, row.balance, row.version) == (member.tier, member.balance, member.version)
        assert row.earned == member.balance.earned
        assert row.enrolled_at == member.enrolled_at
        unlocked = [lot for lot in member.lots if lot.remaining and not lot.locked]
        soonest = min((lot.expires_at for lot in unlocked), default=None)
        assert row.next_expiry_at == soonest
        assert row.next_expiry_points == sum(
            lot.remaining for lot in unlocked if lot.expires_at == soonest
        )
    by_contact = {r.contact_id: r for r in rows}
    assert by_contact["m-00"].next_expiry_at is None
    assert by_contact["m-05"].balance.active == 650 and by_contact["m-05"].balance.spent == 100

    silver = await walk(service, MemberQuery(tier="silver", page_size=2))
    assert [r.contact_id for r in silver] == MEMBERS[7:]
    rich = await walk(service, MemberQuery(min_available=700))
    assert [r.contact_id for r in rich] == MEMBERS[6:]

    ranked = await walk(service, MemberQuery(order_by="available_desc", page_size=4))
    assert [r.contact_id for r in ranked] == [
        r.contact_id for r in sorted(rows, key=lambda r: (-r.balance.active, r.contact_id))
    ]
    assert ranked[0].contact_id == "m-11" and ranked[-1].contact_id == "m-00"

    # m-i's points expire on day i + 365: before day 368.5 only m-01 .. m-03's.
    soon = T0 + timedelta(days=368, hours=12)
    expiring = await walk(service, MemberQuery(expiring_before=soon, page_size=2))
    assert [r.contact_id for r in expiring] == ["m-01", "m-02", "m-03"]

    both = await walk(
        service,
        MemberQuery(tier="basic", min_available=300, order_by="available_desc", page_size=1),
    )
    assert [(r.contact_id, r.balance.active) for r in both] == [
        ("m-06", 900),
        ("m-05", 650),
        ("m-04", 600),
        ("m-03", 450),
        ("m-02", 300),
    ]


async def test_a_write_is_listed_at_once_and_pages_neither_repeat_nor_skip(
    service: LoyaltyService, clock: Clock
) -> None:
    await populate(service, clock)
    first = await service.list_members(MemberQuery(page_size=5))
    assert [r.contact_id for r in first.members] == MEMBERS[:5]
    # Enrolled between two pages: before the first page's end in contact order.
    await service.enrol(ADMIN, "a-first", "store")
    await service.enrol(ADMIN, "m-12", "store")
    await service.earn(ADMIN, "m-12", Purchase([PurchaseLineInput("1", "5000", "EUR")]))
    rest = await walk(service, MemberQuery(page_size=5))
    assert rest[0].contact_id == "a-first"  # read-your-writes: no waiting
    token = first.next_page_token
    seen = [r.contact_id for r in first.members]
    while token:
        page = await service.list_members(MemberQuery(page_size=5, page_token=token))
        seen.extend(r.contact_id for r in page.members)
        token = page.next_page_token
    assert seen == [*MEMBERS, "m-12"]
    top = await service.list_members(MemberQuery(order_by="available_desc", page_size=1))
    assert [(r.contact_id, r.tier, r.balance.active) for r in top.members] == [
        ("m-12", "gold", 5000)
    ]


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        (MemberQuery(page_size=201), ["page_size"]),
        (MemberQuery(page_size=-1), ["page_size"]),
        (MemberQuery(tier="platinum"), ["tier"]),
        (MemberQuery(min_available=-1), ["min_available"]),
        (MemberQuery(order_by="name"), ["order_by"]),
        (MemberQuery(expiring_before=T0.replace(tzinfo=None)), ["expiring_before"]),
        (
            MemberQuery(expiring_before=datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))),
            ["expiring_before"],
        ),
        (MemberQuery(page_token="garbage!"), ["page_token"]),
        (MemberQuery(page_token="W10"), ["page_token"]),
        (MemberQuery(tier="platinum", page_size=500), ["tier", "page_size"]),
    ],
)
async def test_bad_listings_are_refused_naming_the_field(
    service: LoyaltyService, query: MemberQuery, fields: list[str]
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        await service.list_members(query)
    assert [e.field for e in refused.value.errors] == fields


async def test_a_page_token_serves_only_its_own_listing(
    service: LoyaltyService, clock: Clock
) -> None:
    await populate(service, clock)
    page = await service.list_members(MemberQuery(tier="basic", page_size=2))
    token = page.next_page_token
    assert token
    for other in (
        MemberQuery(page_size=2, page_token=token),
        MemberQuery(tier="basic", order_by="available_desc", page_size=2, page_token=token),
        MemberQuery(tier="basic", min_available=1, page_size=2, page_token=token),
    ):
        with pytest.raises(ValidationFailed) as refused:
            await service.list_members(other)
        assert [e.field for e in refused.value.errors] == ["page_token"]
    same = await service.list_members(MemberQuery(tier="basic", page_size=2, page_token=token))
    assert [r.contact_id for r in same.members] == ["m-02", "m-03"]


async def test_the_schedule_walks_every_member_a_page_at_a_time(
    service: LoyaltyService, clock: Clock
) -> None:
    await populate(service, clock)
    service.queries.walk_page = 3
    held = sum(r.balance.active for r in await walk(service, MemberQuery()))
    clock.advance(days=366)
    assert await service.settle_all(ADMIN) == (0, held)
    assert await service.settle_all(ADMIN) == (0, 0)
    rows = await walk(service, MemberQuery())
    assert {r.balance.active for r in rows} == {0}
    assert {r.next_expiry_at for r in rows} == {None}


async def test_the_rewards_catalogue_is_read_from_its_table(service: LoyaltyService) -> None:
    await service.define_reward(ADMIN, RewardInput("mug-b", "Mug", 100, 5))
    await service.define_reward(
        ADMIN, RewardInput("bag", "Bag", 300, 1, T0, T0 + timedelta(days=30))
    )
    await service.retire_reward(ADMIN, "mug-b")
    listed = await service.list_rewards()
    assert [(r.code, r.valid_from, r.valid_until) for r in listed] == [
        ("bag", T0, T0 + timedelta(days=30))
    ]
    everything = await service.list_rewards(include_retired=True)
    assert [(r.code, r.retired) for r in everything] == [("bag", False), ("mug-b", True)]
    assert everything == [await service.get_reward("bag"), await service.get_reward("mug-b")]


# -- a restart over a large store ----------------------------------------------------

LARGE = 3_000


def fill(settings: Settings) -> list[str]:
    """A store of LARGE members, each with one earning (saved straight through the
    event store: the point is the size of the history, not the commands)."""
    app = create_application(settings)
    contacts = [f"big-{i:05d}" for i in range(LARGE)]
    try:
        for start in range(0, LARGE, 500):
            batch = []
            for i, contact in enumerate(contacts[start : start + 500], start=start):
                member = Member.enrol(contact, "erp", "basic", T0)
                at = T0 + timedelta(minutes=i)
                member.earn(
                    (i * 37) % 2_000 + 1,
                    expires_at=expiry_of(at, 365 + i % 90),
                    rule_version=0,
                    reason="order",
                    at=at,
                )
                batch.append(member)
            app.save(*batch)
    finally:
        app.close()
    return contacts


@pytest.mark.timeout(600)
async def test_a_restart_over_thousands_of_members_answers_at_once_from_the_tables(
    store_settings: Settings, clock: Clock
) -> None:
    contacts = fill(store_settings)
    queries = [
        MemberQuery(page_size=200),
        MemberQuery(order_by="available_desc", page_size=200),
        MemberQuery(min_available=1_500, expiring_before=T0 + timedelta(days=400)),
    ]
    app = create_application(store_settings)
    first = LoyaltyService(
        app,
        KnownContacts(),
        clock=clock,
        queries=LoyaltyQueries(app, store_settings, DEFAULT_TIERS, cache_size=100),
    )
    try:
        before = [await walk(first, q) for q in queries]
        assert [r.contact_id for r in before[0]] == contacts
        assert first.queries.side.applied == 2 * LARGE
        # The process kept no more aggregates than its cache holds.
        assert len(first.queries.tables._cache) <= 100
        end = first.queries.side.position()
    finally:
        first.close()

    app = create_application(store_settings)
    again = LoyaltyService(app, KnownContacts(), clock=clock)
    try:
        side = again.queries.side
        assert side.position() == end and side.lag() == 0
        after = [await walk(again, q) for q in queries]
        assert after == before
        # Nothing was read from the log, and no member is held in memory.
        assert side.applied == 0 and len(again.queries.tables._cache) == 0
        # A write after the restart: only it is applied.
        await again.redeem(ADMIN, contacts[0], 1, "one point")
        [row] = (await again.list_members(MemberQuery(page_size=1))).members
        assert (row.contact_id, row.balance.spent) == (contacts[0], 1)
        assert side.applied == 1
    finally:
        again.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def process_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[Settings, dict[str, str]]:
    """A store for `crm-loyalty serve` processes: its settings here and the
    environment that puts a process on it."""
    if request.param == "sqlite":
        return sqlite_settings(tmp_path / "loyalty"), {}
    schema: str = request.getfixturevalue("postgres_schema")
    return postgres_settings("loyalty", schema), {
        **postgres_target().env(schema),
        "CRM_EVENT_STORE": "postgres",
    }


@pytest.mark.timeout(600)
async def test_a_restarted_serve_process_answers_the_listing_as_before(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    identity: Identity,
    process_store: tuple[Settings, dict[str, str]],
) -> None:
    settings, store_env = process_store
    contacts = fill(settings)
    grpc_port, http_port = free_port(), free_port()
    env = clean_environment(
        tmp_path / "loyalty",
        identity,
        CRM_LOYALTY_GRPC_PORT=str(grpc_port),
        CRM_LOYALTY_HTTP_PORT=str(http_port),
        CRM_CONTACTS_GRPC_TARGET=f"127.0.0.1:{free_port()}",
        **store_env,
    )
    log = tmp_path / "serve.log"
    target = f"127.0.0.1:{grpc_port}"
    marketing = grpc_auth(identity.mint("marketing", subject="mia"))

    async def listing() -> list[tuple[str, int, int]]:
        rows: list[tuple[str, int, int]] = []
        token = ""
        async with grpc.aio.insecure_channel(target) as channel:
            stub = loyalty_pb2_grpc.LoyaltyServiceStub(channel)  # type: ignore[no-untyped-call]
            while True:
                page = await stub.ListMembers(
                    pb.ListMembersRequest(
                        order_by=pb.MEMBER_ORDER_AVAILABLE_DESC, page_size=200, page_token=token
                    ),
                    metadata=marketing,
                    timeout=10,
                )
                rows += [(m.contact_id, m.balance.active, m.version) for m in page.members]
                token = page.next_page_token
                if not token:
                    return rows

    async def start() -> subprocess.Popen[bytes]:
        serve = start_process("loyalty", "serve", env, log, processes)
        await wait_serving(target, f"http://127.0.0.1:{http_port}", serve, log)
        return serve

    serve = await start()
    before = await listing()
    assert sorted(c for c, _, _ in before) == contacts
    await stop_gracefully(serve, log)
    position = tracked_position(settings)
    assert position == 2 * LARGE

    # Written while no process served: the restarted one applies only these.
    app = create_application(settings)
    try:
        app.save(Member.enrol("zz-late", "web", "basic", T0))
    finally:
        app.close()
    serve = await start()
    after = await listing()
    assert after == [*before, ("zz-late", 0, 1)]
    assert tracked_position(settings) == position + 1
    await stop_gracefully(serve, log)


def tracked_position(settings: Settings) -> int:
    """Where the query tables stand in the log (their tracking row)."""
    database = QueryDatabase(settings)
    try:
        with database.read() as tx:
            row = tx.one("SELECT position FROM query_tracking WHERE projection = 'loyalty'")
        assert row is not None
        return int(row[0])
    finally:
        database.close()
