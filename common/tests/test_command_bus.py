"""The command bus over a real SQLite event store file."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from crm_common.auth.principal import Principal
from crm_common.commands import Caller, CommandBus, CommandContext, UnitOfWork
from crm_common.errors import (
    IdempotencyKeyReused,
    NotFound,
    RuleViolated,
    VersionConflict,
)
from crm_common.eventstore import application_env
from crm_common.settings import Settings


class Account(Aggregate):
    @event("Opened")
    def __init__(self, holder: str) -> None:
        self.holder = holder
        self.balance = 0

    def deposit(self, amount: int) -> None:
        if amount <= 0:
            raise RuleViolated("deposits must be positive")
        self._deposited(amount)

    @event("Deposited")
    def _deposited(self, amount: int) -> None:
        self.balance += amount


def settings_for(tmp_path: Path) -> Settings:
    return Settings(
        service="ledger",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Application[UUID]]:
    application: Application[UUID] = Application(env=application_env(settings_for(tmp_path)))
    yield application
    application.close()


@pytest.fixture
def bus(app: Application[UUID]) -> Iterator[CommandBus]:
    command_bus = CommandBus(app, "ledger")
    yield command_bus
    command_bus.close()


def open_account(holder: str = "ada") -> object:
    return lambda uow: uow.add(Account(holder))


def deposit(account_id: str, amount: int) -> object:
    def decide(uow: UnitOfWork) -> Account:
        account = uow.get(account_id, Account)
        account.deposit(amount)
        return account

    return decide


def log_size(app: Application[UUID]) -> int:
    return app.recorder.max_notification_id() or 0  # type: ignore[attr-defined]


def test_a_command_returns_the_subject_version_and_its_log_position(bus, app):
    opened = bus.execute(CommandContext("Open"), open_account())
    deposited = bus.execute(CommandContext("Deposit"), deposit(opened.id, 5))
    assert (opened.version, deposited.version) == (1, 2)
    assert deposited.position == log_size(app) and deposited.position > opened.position
    assert app.repository.get(UUID(opened.id)).balance == 5


def test_a_stale_expected_version_is_refused_and_writes_nothing(bus, app):
    opened = bus.execute(CommandContext("Open"), open_account())
    bus.execute(CommandContext("Deposit", expected_version=1), deposit(opened.id, 5))
    before = log_size(app)
    with pytest.raises(VersionConflict) as refused:
        bus.execute(CommandContext("Deposit", expected_version=1), deposit(opened.id, 7))
    assert (refused.value.expected, refused.value.actual) == (1, 2)
    assert log_size(app) == before
    assert app.repository.get(UUID(opened.id)).balance == 5


def test_a_retried_request_id_returns_the_first_outcome_and_writes_once(bus, app):
    opened = bus.execute(CommandContext("Open"), open_account())
    first = bus.execute(CommandContext("Deposit", request_id="r-1"), deposit(opened.id, 5))
    after_first = log_size(app)
    again = bus.execute(CommandContext("Deposit", request_id="r-1"), deposit(opened.id, 5))
    assert again.replayed and not first.replayed
    assert (again.id, again.version, again.position) == (first.id, first.version, first.position)
    assert log_size(app) == after_first
    assert app.repository.get(UUID(opened.id)).balance == 5


def test_a_request_id_cannot_be_reused_for_another_command(bus):
    bus.execute(CommandContext("Open", request_id="r-2"), open_account())
    with pytest.raises(IdempotencyKeyReused):
        bus.execute(CommandContext("Close", request_id="r-2"), open_account())


def test_a_request_id_reused_with_other_inputs_is_refused_and_reveals_nothing(bus, app):
    ada, grace = Caller(actor="ada", request_id="k-1"), Caller(actor="ada", request_id="k-1")
    first = bus.execute(ada.command("Open", "first"), open_account())
    size = log_size(app)
    with pytest.raises(IdempotencyKeyReused) as refused:
        bus.execute(grace.command("Open", "second"), open_account())
    assert first.id not in refused.value.message
    assert log_size(app) == size
    assert bus.execute(ada.command("Open", "first"), open_account()).replayed


def test_request_ids_are_scoped_by_the_authenticated_principal(bus):
    ada = Principal("ada", frozenset({"sales"}), "console")
    eve = Principal("eve", frozenset({"sales"}), "console")
    first = bus.execute(Caller(request_id="k-2", principal=ada).command("Open"), open_account())
    other = bus.execute(Caller(request_id="k-2", principal=eve).command("Open"), open_account())
    assert not other.replayed and other.id != first.id


def test_a_receipt_past_its_retention_lets_the_request_id_start_a_new_request(app):
    bus = CommandBus(app, "test", receipt_retention=timedelta(0))
    try:
        first = bus.execute(CommandContext("Open", request_id="k-3"), open_account())
        again = bus.execute(CommandContext("Open", request_id="k-3"), open_account())
        assert not again.replayed and again.id != first.id
    finally:
        bus.close()


def test_unknown_and_malformed_ids_are_not_found(bus):
    with pytest.raises(NotFound):
        bus.execute(CommandContext("Deposit"), deposit("not-a-uuid", 1))
    with pytest.raises(NotFound):
        bus.execute(CommandContext("Deposit"), deposit(str(UUID(int=7)), 1))


def test_concurrent_commands_share_transactions_and_all_land(bus, app):
    opened = bus.execute(CommandContext("Open"), open_account())
    futures = [
        bus.submit(CommandContext("Deposit", request_id=f"d-{i}"), deposit(opened.id, 1))
        for i in range(300)
    ]
    outcomes = [f.result(timeout=30) for f in futures]
    assert sorted(o.version for o in outcomes) == list(range(2, 302))
    assert app.repository.get(UUID(opened.id)).balance == 300
    # Queued commands were grouped: far fewer saves than commands.
    assert bus.batches < 300


def test_a_failing_command_in_a_batch_is_undone_alone(app):
    bus = CommandBus(app, "ledger")
    try:
        opened = bus.execute(CommandContext("Open"), open_account())
        gate = threading.Event()
        # Hold the writer so the next commands queue up into one batch.
        blocker = bus.submit(
            CommandContext("Hold"), lambda uow: (gate.wait(5), uow.add(Account("blocker")))[1]
        )

        def deposit_then_fail(uow: UnitOfWork) -> Account:
            account = uow.get(opened.id, Account)
            account.deposit(100)
            raise RuleViolated("changed my mind")

        good_1 = bus.submit(CommandContext("Deposit"), deposit(opened.id, 1))
        bad = bus.submit(CommandContext("Deposit"), deposit_then_fail)
        good_2 = bus.submit(CommandContext("Deposit"), deposit(opened.id, 2))
        gate.set()
        blocker.result(10)
        assert good_1.result(10).version == 2
        with pytest.raises(RuleViolated):
            bad.result(10)
        assert good_2.result(10).version == 3
        assert app.repository.get(UUID(opened.id)).balance == 3
    finally:
        bus.close()


def test_two_replicas_writing_one_aggregate_never_lose_an_update(tmp_path):
    env = application_env(settings_for(tmp_path))
    app_a: Application[UUID] = Application(env=env)
    app_b: Application[UUID] = Application(env=env)
    bus_a, bus_b = CommandBus(app_a, "ledger"), CommandBus(app_b, "ledger")
    try:
        opened = bus_a.execute(CommandContext("Open"), open_account())
        futures = []
        for i in range(100):
            bus = bus_a if i % 2 else bus_b
            futures.append(bus.submit(CommandContext("Deposit"), deposit(opened.id, 1)))
        for f in futures:
            f.result(timeout=60)
        assert app_a.repository.get(UUID(opened.id)).balance == 100
    finally:
        bus_a.close()
        bus_b.close()
        app_a.close()
        app_b.close()


def test_a_caller_carries_who_and_how_into_the_command_the_application_names(bus, app):
    caller = Caller(actor="ada", client="sales-console", request_id="r-9")
    opened = bus.execute(caller.command("Open"), open_account())
    again = bus.execute(caller.command("Open"), open_account())
    assert again.replayed and again.id == opened.id
    stored = next(iter(app.events.get(UUID(opened.id))))
    assert stored._meta["actor"] == "ada" and stored._meta["client"] == "sales-console"
    assert stored._meta["command"] == "Open"
    stale = Caller(expected_version=7).command("Deposit")
    with pytest.raises(VersionConflict):
        bus.execute(stale, deposit(opened.id, 1))
