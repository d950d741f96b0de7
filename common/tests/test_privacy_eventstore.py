"""Personal data encrypted at rest in the event store (crm_common.eventstore
with crm_common.privacy), on SQLite and PostgreSQL, with a test-only
aggregate whose events declare personal fields:

- a raw scan of every row of the store (events, snapshots, keys) finds no
  clear personal value, and the aggregates load as they were;
- after the subject's key is destroyed, loading gives the redaction marker,
  a raw scan still finds nothing, and nothing personal can be stored again;
- rotating the master key while commands run loses nothing: old and new
  events stay readable once the old master key is gone;
- stores written before encryption stay readable (mixed history), also
  under the optional whole-event cipher;
- an altered token is refused clearly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import MapperDeserialisationError
from psycopg.sql import SQL, Identifier

from crm_common.eventstore import SnapshottingApplication, application_env
from crm_common.privacy import REDACTED, PersonalData, SubjectErased, new_master_key
from crm_common.privacy.declaration import Path as FieldPath
from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings, postgres_target

OLD = new_master_key("m-old")
NEW = new_master_key("m-new")
INTERVAL = 3
NAME, FAMILY = "Augusta", "Lovelace-Byron"
EMAIL, PHONE = "augusta.ada@example.org", "+44 20 7946 0018"
NOTE = "prefers calls after 17:00 about the engine"
CLEAR = (NAME, FAMILY, EMAIL, PHONE, NOTE, "augusta.ada", "7946 0018")


class Customer(Aggregate):
    """A test-only aggregate with personal data in nested fields."""

    class Registered(Aggregate.Created):
        profile: dict[str, Any]
        personal_data = PersonalData(
            "profile.given_name",
            "profile.family_name",
            "profile.emails",
            "profile.phones.*.number",
            redacted={"profile.emails": []},
        )

    class Renamed(Aggregate.Event):
        family_name: str
        personal_data = PersonalData("family_name")

    class Scored(Aggregate.Event):
        points: int

    @event(Registered)
    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = profile
        self.points = 0

    @event(Renamed)
    def rename(self, family_name: str) -> None:
        self.profile = {**self.profile, "family_name": family_name}

    @event(Scored)
    def score(self, points: int) -> None:
        self.points += points


class Order(Aggregate):
    """An aggregate that holds personal data of another subject (the customer)."""

    class Placed(Aggregate.Created):
        customer_id: str
        amount: int

    class NoteAdded(Aggregate.Event):
        customer_id: str
        note: str
        personal_data = PersonalData("note", subject="customer_id")

    @event(Placed)
    def __init__(self, customer_id: str, amount: int) -> None:
        self.customer_id = customer_id
        self.amount = amount
        self.notes: list[str] = []

    @event(NoteAdded)
    def add_note(self, customer_id: str, note: str) -> None:
        self.notes.append(note)


class ShopApplication(SnapshottingApplication):
    name = "shop"
    snapshot_kinds = (Customer, Order)


def profile(n: int = 0) -> dict[str, Any]:
    return {
        "given_name": NAME if n == 0 else f"{NAME}{n}",
        "family_name": FAMILY,
        "emails": [EMAIL],
        "phones": [{"kind": "mobile", "number": PHONE}, {"kind": "work", "number": None}],
        "city": "London",
    }


def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(
        service="shop",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings of an empty store without master keys: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        yield sqlite_settings(tmp_path)
        return
    postgres_target()
    schema = f"privacy_shop_{uuid.uuid4().hex[:10]}"
    try:
        yield dataclasses.replace(postgres_settings("shop", schema), data_dir=tmp_path)
    finally:
        drop_schema(schema)


def app(settings: Settings, keys: str | None = OLD, **extra: str) -> ShopApplication:
    if keys is not None:
        settings = dataclasses.replace(settings, master_keys=keys)
    return ShopApplication(
        env=application_env(settings, CRM_SNAPSHOT_INTERVAL=str(INTERVAL), **extra)
    )


def raw_values(settings: Settings) -> list[bytes]:
    """Every value of every row of every table of the store, as bytes."""
    values: list[Any] = []
    if settings.event_store == "sqlite":
        for file in sorted(settings.service_dir.glob("*.sqlite")):
            with sqlite3.connect(file) as db:
                tables = [
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for table in tables:
                    values.extend(v for row in db.execute(f'SELECT * FROM "{table}"') for v in row)
    else:
        schema = settings.postgres["schema"]
        with psycopg.connect(**postgres_target().connect_kwargs()) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema=%s",
                    (schema,),
                )
            ]
            for table in tables:
                rows = conn.execute(SQL("SELECT * FROM {}").format(Identifier(schema, table)))
                values.extend(v for row in rows for v in row)
    assert values, "the store holds no rows"
    return [v if isinstance(v, bytes) else str(v).encode() for v in values if v is not None]


def clear_values_in_store(settings: Settings) -> list[str]:
    """The clear personal values a raw scan finds (the SQLite files' bytes too)."""
    blobs = raw_values(settings)
    if settings.event_store == "sqlite":
        blobs += [p.read_bytes() for p in settings.service_dir.glob("*.sqlite*")]
    return [v for v in CLEAR if any(v.encode() in b for b in blobs)]


def stored_event_count(shop: ShopApplication) -> int:
    return len(shop.recorder.select_notifications(1, 1_000_000))


# -- at rest --------------------------------------------------------------------------------


def test_personal_values_are_sealed_in_events_and_snapshots_and_load_back(store: Settings) -> None:
    shop = app(store)
    customer = Customer(profile=profile())
    customer.score(5)
    customer.rename(FAMILY)  # version 3: a snapshot is taken
    order = Order(customer_id=str(customer.id), amount=120)
    order.add_note(str(customer.id), NOTE)
    shop.save(customer, order)
    assert shop.snapshots is not None
    assert [s.originator_version for s in shop.snapshots.get(customer.id)] == [3]
    assert list(shop.snapshots.get(order.id)) == []  # holds another subject's data: never

    assert clear_values_in_store(store) == []
    assert "London" in b"".join(raw_values(store)).decode(errors="replace")  # not personal: clear
    loaded: Customer = shop.repository.get(customer.id)
    assert loaded.profile == profile() and loaded.points == 5
    assert vars(loaded) == vars(shop.replay(customer.id))
    assert shop.repository.get(order.id).notes == [NOTE]
    shop.close()

    again = app(store)  # another process, its own key cache
    assert again.repository.get(customer.id).profile == profile()
    again.close()


def test_erasing_a_subject_redacts_it_everywhere_and_for_good(store: Settings) -> None:
    shop = app(store)
    customer, other = Customer(profile=profile()), Customer(profile=profile(1))
    for c in (customer, other):
        c.rename(FAMILY)
        c.score(1)  # version 3: snapshots of both
    order = Order(customer_id=str(customer.id), amount=120)
    order.add_note(str(customer.id), NOTE)
    shop.save(customer, other, order)
    keys = shop.personal_data_keys
    assert keys is not None

    assert keys.destroy(str(customer.id)) is True
    erased: Customer = shop.repository.get(customer.id)
    assert erased.profile == {
        "given_name": REDACTED,
        "family_name": REDACTED,
        "emails": [],
        "phones": [{"kind": "mobile", "number": REDACTED}, {"kind": "work", "number": None}],
        "city": "London",
    }
    assert erased.points == 1  # the anonymous facts remain
    assert shop.repository.get(order.id).notes == [REDACTED]
    assert shop.repository.get(other.id).profile["given_name"] == f"{NAME}1"

    with pytest.raises(SubjectErased):
        erased.rename("Someone")
        shop.save(erased)
    erased = shop.repository.get(customer.id)
    erased.score(2)  # nothing personal: still stored
    erased.score(3)  # version 5, then 6: no snapshot is taken of an erased subject
    shop.save(erased)
    assert shop.snapshots is not None
    stored = shop.snapshots.recorder.select_events(customer.id)
    assert [s.originator_version for s in stored] == [3]
    assert shop.repository.get(customer.id).points == 6
    assert clear_values_in_store(store) == []
    shop.close()

    elsewhere = app(store)  # a process that never had the key
    assert elsewhere.repository.get(customer.id).profile["family_name"] == REDACTED
    elsewhere.close()


def test_a_raw_scan_after_an_erase_finds_nothing(store: Settings) -> None:
    shop = app(store)
    customer = Customer(profile=profile())
    customer.rename(FAMILY)
    customer.score(1)
    shop.save(customer)
    assert shop.personal_data_keys is not None
    shop.personal_data_keys.destroy(str(customer.id))
    # The rows are what they were: ciphertext whose key is gone.
    assert clear_values_in_store(store) == []
    assert shop.repository.get(customer.id).profile["given_name"] == REDACTED
    shop.close()


# -- mixed history and the whole-event cipher --------------------------------------------------


def test_events_stored_before_encryption_stay_readable(store: Settings) -> None:
    before = app(store, keys=None)
    old = Customer(profile=profile())
    before.save(old)
    before.close()
    assert NAME in clear_values_in_store(store)  # stored as the event carried it

    after = app(store)
    loaded: Customer = after.repository.get(old.id)
    assert loaded.profile == profile()
    loaded.rename("Stone")
    new = Customer(profile=profile(2))
    after.save(loaded, new)
    assert after.repository.get(old.id).profile["family_name"] == "Stone"
    assert after.repository.get(new.id).profile == profile(2)
    after.close()

    unconfigured = app(store, keys=None)
    with pytest.raises(MapperDeserialisationError, match="no master keys are configured"):
        unconfigured.repository.get(new.id)
    unconfigured.close()


def test_the_whole_event_cipher_reads_older_clear_events_and_rotates(store: Settings) -> None:
    first, second = new_master_key("e1"), new_master_key("e2")
    plain = app(store)
    old = Customer(profile=profile())
    plain.save(old)
    plain.close()

    ciphered = app(dataclasses.replace(store, event_cipher_keys=first))
    new = Customer(profile=profile(3))
    ciphered.save(new)
    ciphered.close()
    rows = b"".join(raw_values(store))
    assert b"London" in rows  # the older event is clear but for its personal fields
    assert rows.count(b"London") == 1  # the newer one is encrypted whole

    rotated = app(dataclasses.replace(store, event_cipher_keys=f"{second},{first}"))
    newer = Customer(profile=profile(4))
    rotated.save(newer)
    for c in (old, new, newer):
        assert rotated.repository.get(c.id).profile["emails"] == [EMAIL]
    rotated.close()

    forgotten = app(dataclasses.replace(store, event_cipher_keys=second))
    with pytest.raises(MapperDeserialisationError, match="'e1', which CRM_EVENT_CIPHER_KEYS"):
        forgotten.repository.get(new.id)
    forgotten.close()


def test_without_master_keys_the_store_works_as_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sqlite_settings(tmp_path)
    shop = app(settings, keys=None)
    assert shop.personal_data_keys is None
    customer = Customer(profile=profile())
    order = Order(customer_id=str(customer.id), amount=1)
    for _ in range(INTERVAL - 1):
        customer.rename(FAMILY)
        order.add_note(str(customer.id), NOTE)
    with caplog.at_level(logging.WARNING):
        shop.save(customer, order)
        shop.save(Customer(profile=profile(5)))
    assert shop.snapshots is not None
    assert len(list(shop.snapshots.get(order.id))) == 1  # every kind, as before
    assert len(list(shop.snapshots.get(customer.id))) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(warnings) == [
        "Customer.Registered declares personal data but no master keys are configured: "
        "stored unencrypted",
        "Customer.Renamed declares personal data but no master keys are configured: "
        "stored unencrypted",
        "Order.NoteAdded declares personal data but no master keys are configured: "
        "stored unencrypted",
    ]
    assert not (settings.service_dir / "keys.sqlite").exists()
    shop.close()


# -- tampering --------------------------------------------------------------------------------


def test_an_altered_token_in_the_store_is_refused_clearly(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    shop = app(settings)
    customer = Customer(profile=profile())
    shop.save(customer)
    shop.close()
    with sqlite3.connect(settings.service_dir / "events.sqlite") as db:
        (state,) = db.execute("SELECT state FROM stored_events").fetchone()
        at = state.index(b'"t":"pd1.') + 60
        altered = state[:at] + (b"A" if state[at : at + 1] != b"A" else b"B") + state[at + 1 :]
        db.execute("UPDATE stored_events SET state=?", (altered,))
    shop = app(settings)
    with pytest.raises(
        MapperDeserialisationError, match="failed authentication: it was altered"
    ) as refused:
        shop.repository.get(customer.id)
    assert not [v for v in CLEAR if v in str(refused.value)]
    shop.close()


def test_declarations_are_checked_when_the_class_is_written() -> None:
    with pytest.raises(ValueError, match="at least one field path"):
        PersonalData()
    with pytest.raises(ValueError, match="not a field path"):
        PersonalData("profile..name")
    with pytest.raises(ValueError, match="not declared personal"):
        PersonalData("name", redacted={"email": ""})
    with pytest.raises(ValueError, match="one field, not a pattern"):
        PersonalData("name", subject="people.*")
    path: FieldPath = ("profile", "phones", 0, "number")
    assert PersonalData("profile.phones.*.number").redacted_for(path) == REDACTED


# -- rotation while commands run ---------------------------------------------------------------


def test_rotating_the_master_key_while_commands_run_loses_nothing(
    store: Settings, tmp_path: Path
) -> None:
    keys_file = tmp_path / "master-keys"
    keys_file.write_text(OLD)
    settings = dataclasses.replace(store, master_keys_file=str(keys_file))
    replicas = [app(settings, keys=None), app(settings, keys=None)]
    writers_per_replica, customers_each = 2, 25
    written: dict[uuid.UUID, str] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []
    halfway = threading.Event()

    def write(shop: ShopApplication, w: int) -> None:
        try:
            for i in range(customers_each):
                customer = Customer(profile=profile())
                customer.rename(f"Family-{w}-{i}")
                shop.save(customer)
                with lock:
                    written[customer.id] = f"Family-{w}-{i}"
                    if len(written) >= writers_per_replica * len(replicas) * customers_each // 2:
                        halfway.set()
        except BaseException as error:
            failures.append(error)

    threads = [
        threading.Thread(target=write, args=(shop, n * writers_per_replica + w))
        for n, shop in enumerate(replicas)
        for w in range(writers_per_replica)
    ]
    for t in threads:
        t.start()
    assert halfway.wait(120)
    # Rotation: the new key first (every replica picks the file up), then re-wrap.
    keys_file.write_text(f"{NEW}\n{OLD}\n")
    for shop in replicas:
        assert shop.personal_data_keys is not None
        shop.personal_data_keys.ring.reload()
    operator = app(settings, keys=None)
    assert operator.personal_data_keys is not None
    moved_during = operator.personal_data_keys.rewrap(batch=10)
    for t in threads:
        t.join()
    assert failures == []
    moved_after = operator.personal_data_keys.rewrap()
    total = writers_per_replica * len(replicas) * customers_each
    assert 0 < moved_during + moved_after <= total
    assert operator.personal_data_keys.store.count_by_master_key() == {"m-new": total}
    operator.close()
    for shop in replicas:
        shop.close()

    keys_file.write_text(NEW)  # the old master key removed
    reader = app(settings, keys=None)
    assert stored_event_count(reader) == 2 * total
    for customer_id, family in written.items():
        assert reader.repository.get(customer_id).profile["family_name"] == family
    reader.close()
    assert clear_values_in_store(store) == []


def test_the_rewrap_command_moves_keys_to_the_current_master_key(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    shop = app(settings)
    customers = [Customer(profile=profile(n)) for n in range(5)]
    shop.save(*customers)
    shop.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRM_", "POSTGRES_"))}
    env.update(CRM_DATA_DIR=str(tmp_path), CRM_EVENT_STORE="sqlite", CRM_MASTER_KEYS=f"{NEW},{OLD}")
    done = subprocess.run(
        [sys.executable, "-m", "crm_common.privacy", "shop", "rewrap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "5 data keys re-wrapped under master key 'm-new'" in done.stdout
    assert "m-new: 5" in done.stdout and "m-old" not in done.stdout
    assert OLD.split(":")[1] not in done.stdout + done.stderr

    reader = app(settings, keys=NEW)
    assert [reader.repository.get(c.id).profile["given_name"] for c in customers] == [
        profile(n)["given_name"] for n in range(5)
    ]
    reader.close()

    env["CRM_MASTER_KEYS"] = "m1:short"
    refused = subprocess.run(
        [sys.executable, "-m", "crm_common.privacy", "shop", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "not base64" in refused.stderr


def test_the_command_bus_seals_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size check maps an event for the save: its personal values are sealed
    (and the state transcoded) once per command, not once more by the save."""
    from crm_common.commands import CommandBus, CommandContext, UnitOfWork
    from crm_common.privacy import mapper as mapper_module

    shop = app(sqlite_settings(tmp_path))
    bus = CommandBus(shop, "shop")
    sealed: list[str] = []
    real_seal = mapper_module.seal

    def counting_seal(key: Any, plaintext: bytes) -> str:
        sealed.append(key.subject)
        return real_seal(key, plaintext)

    monkeypatch.setattr(mapper_module, "seal", counting_seal)
    try:

        def register(uow: UnitOfWork) -> Customer:
            return uow.add(Customer(profile=profile()))

        outcome = bus.execute(CommandContext("Register", actor="ada"), register)
        assert len(sealed) == 1
        loaded = shop.repository.get(uuid.UUID(outcome.id))
        assert loaded.profile["given_name"] == NAME
        assert EMAIL not in "".join(clear_values_in_store(sqlite_settings(tmp_path)))
    finally:
        bus.close()
        shop.close()
