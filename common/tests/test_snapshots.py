"""Snapshots (crm_common.eventstore): the state encoding keeps every Python
type an aggregate holds, a snapshot that cannot be used falls back to a full
replay, a state that cannot be encoded means no snapshot (and a successful
save), and the interval is read from `CRM_SNAPSHOT_INTERVAL`. On a real
SQLite store; the services' `*_snapshots` tests cover their aggregates on
SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, NamedTuple
from uuid import UUID

import pytest
from eventsourcing.domain import Aggregate, event

from crm_common.eventstore import (
    DEFAULT_SNAPSHOT_INTERVAL,
    SnapshottingApplication,
    application_env,
    decode_state,
    encode_state,
    snapshot_interval,
)
from crm_common.settings import Settings


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Size(Enum):
    SMALL = 1
    LARGE = 2


@dataclasses.dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    sku: str
    quantity: int
    price: Money


class Point(NamedTuple):
    x: int
    y: int


class Unencodable:
    pass


class Ledger(Aggregate):
    """A long-lived aggregate holding every kind of value a snapshot must keep."""

    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.entries: list[Line] = []
        self.tags: set[str] = set()
        self.by_day: dict[date, Money] = {}
        self.colours: tuple[Colour, ...] = ()
        self.size = Size.SMALL
        self.extra: Any = None

    @event("Booked")
    def book(self, line: dict[str, Any], day: str, tag: str) -> None:
        price = Money(Decimal(line["price"]), "EUR")
        self.entries.append(Line(line["sku"], line["quantity"], price))
        self.tags.add(tag)
        self.by_day[date.fromisoformat(day)] = price
        self.colours = (*self.colours, Colour.RED if len(self.entries) % 2 else Colour.BLUE)
        self.size = Size.LARGE if len(self.entries) > 3 else Size.SMALL

    @event("Spoiled")
    def spoil(self) -> None:
        self.extra = Unencodable()


class LedgerApplication(SnapshottingApplication):
    name = "ledgers"
    snapshot_kinds = (Ledger,)


def settings(tmp_path: Path) -> Settings:
    return Settings(
        service="ledgers",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


def app(tmp_path: Path, interval: int | str) -> LedgerApplication:
    return LedgerApplication(
        env=application_env(settings(tmp_path), CRM_SNAPSHOT_INTERVAL=str(interval))
    )


def book(ledger: Ledger, n: int) -> None:
    for i in range(n):
        ledger.book(
            {"sku": f"sku-{i}", "quantity": i, "price": f"{i}.10"},
            f"2026-01-{1 + i % 28:02d}",
            f"tag-{i % 3}",
        )


def test_the_encoding_keeps_types_through_json() -> None:
    value = {
        "money": Money(Decimal("1.10"), "EUR"),
        "line": Line("a", 2, Money(Decimal("0.5"), "USD")),
        "colours": (Colour.RED, Colour.BLUE),
        "size": Size.LARGE,
        "days": {date(2026, 1, 2): time(9, 30), 7: timedelta(hours=3)},
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "ids": frozenset({UUID(int=1), UUID(int=2)}),
        "set": {"b", "a"},
        "point": Point(1, 2),
        "raw": b"\x00\xff",
        "~": "a key that looks like a tag",
        "nested": [[1, 2.5, None, True, "x"]],
    }
    decoded = decode_state(json.loads(json.dumps(encode_state(value))))
    assert decoded == value
    assert type(decoded["colours"]) is tuple and type(decoded["colours"][0]) is Colour
    assert type(decoded["point"]) is Point and type(decoded["ids"]) is frozenset
    assert decoded["money"].amount.as_tuple() == Decimal("1.10").as_tuple()
    with pytest.raises(TypeError, match="Unencodable"):
        encode_state({"x": Unencodable()})


def test_a_long_lived_aggregate_loads_from_its_snapshot(tmp_path: Path) -> None:
    store = app(tmp_path, 10)
    ledger = Ledger("ann")
    book(ledger, 24)
    store.save(ledger)  # versions 1..25 in one save: the snapshot at 20
    [snapshot] = store.snapshots.get(ledger.id) if store.snapshots else []
    assert snapshot.originator_version == 20
    loaded = store.repository.get(ledger.id)
    replayed = store.replay(ledger.id)
    assert encode_state(vars(loaded)) == encode_state(vars(replayed)) == encode_state(vars(ledger))
    assert loaded.version == 25 and loaded.entries == ledger.entries
    # Snapshots are not in the notification log.
    assert len(store.recorder.select_notifications(1, 1000)) == 25


def test_a_snapshot_that_cannot_be_used_falls_back_to_a_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = app(tmp_path, 5)
    ledger = Ledger("ann")
    book(ledger, 6)
    store.save(ledger)
    assert store.snapshots is not None
    [snapshot] = store.snapshots.get(ledger.id)
    # A snapshot naming a class that no longer exists (renamed since).
    broken = dataclasses.replace(
        snapshot,
        originator_version=snapshot.originator_version,
        state={"format": 1, "state": {"x": {"~": "object", "c": "gone.module:Gone", "v": {}}}},
    )
    with store.snapshots.recorder.datastore.transaction(commit=True) as c:  # type: ignore[attr-defined]
        c.execute("DELETE FROM stored_snapshots")
    store.snapshots.put([broken])
    with caplog.at_level(logging.WARNING, "crm_common.eventstore"):
        loaded = store.repository.get(ledger.id)
    assert "unusable" in caplog.text
    assert encode_state(vars(loaded)) == encode_state(vars(store.replay(ledger.id)))


def test_a_state_that_cannot_be_snapshotted_still_saves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = app(tmp_path, 5)
    ledger = Ledger("ann")
    book(ledger, 3)
    ledger.spoil()  # version 5: the snapshot is due but cannot be taken
    with caplog.at_level(logging.WARNING, "crm_common.eventstore"):
        store.save(ledger)
    assert "no snapshot" in caplog.text
    assert store.snapshots is not None and list(store.snapshots.get(ledger.id)) == []
    assert store.repository.get(ledger.id).version == 5


def test_the_interval_is_configured_and_checked(tmp_path: Path) -> None:
    assert snapshot_interval(None) == snapshot_interval("") == DEFAULT_SNAPSHOT_INTERVAL == 50
    assert snapshot_interval("200") == 200
    off = app(tmp_path / "off", 0)
    assert off.snapshots is None
    ledger = Ledger("ann")
    book(ledger, 60)
    off.save(ledger)
    assert off.repository.get(ledger.id).version == 61
    for bad in ("-1", "often", "2.5"):
        with pytest.raises(ValueError, match="CRM_SNAPSHOT_INTERVAL"):
            app(tmp_path / "bad", bad)


def test_only_the_named_kinds_are_snapshotted(tmp_path: Path) -> None:
    class Other(Aggregate):
        @event("Started")
        def __init__(self) -> None:
            self.n = 0

        @event("Counted")
        def count(self) -> None:
            self.n += 1

    store = app(tmp_path, 5)
    other = Other()
    for _ in range(12):
        other.count()
    store.save(other)
    assert store.snapshots is not None and list(store.snapshots.get(other.id)) == []
    assert store.repository.get(other.id).n == 12
