"""Data keys per person (crm_common.privacy): master keys from configuration,
the key store on SQLite and PostgreSQL (race-safe creation, destruction that
leaves a tombstone, re-wrapping under a new master key), the key client's
bounded cache, the audit of reads by other services, and personal values as
tokens (never the clear value; altered tokens refused; erased subjects read
as the redaction marker)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_common.errors import PermissionDenied
from crm_common.privacy import (
    ERASED,
    REDACTED,
    DataKey,
    InvalidToken,
    KeyCache,
    KeyClient,
    KeyStoreLocation,
    MasterKeyError,
    MasterKeyRing,
    PersonalDataCipher,
    SubjectErased,
    new_master_key,
)
from crm_common.privacy.masterkeys import parse_master_keys
from crm_common.settings import Settings
from crm_deploy.testing import drop_schema, postgres_settings, postgres_target

OLD = new_master_key("old")
NEW = new_master_key("new")


def sqlite_settings(tmp_path: Path, service: str = "contacts") -> Settings:
    return Settings(
        service=service,
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings of the contacts service on an empty store: SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        yield sqlite_settings(tmp_path)
        return
    postgres_target()
    schema = f"privacy_keys_{uuid.uuid4().hex[:10]}"
    try:
        yield dataclasses.replace(postgres_settings("contacts", schema), data_dir=tmp_path)
    finally:
        drop_schema(schema)


def client(
    settings: Settings,
    keys: str = OLD,
    accessor: str | None = None,
    owner: str = "contacts",
    cache_size: int = 10_000,
) -> KeyClient:
    store = KeyStoreLocation.of(settings, owner).open()
    return KeyClient(store, MasterKeyRing.from_text(keys), accessor or owner, cache_size=cache_size)


# -- master keys ------------------------------------------------------------------------------


def test_master_keys_are_an_ordered_list_and_bad_entries_are_refused_without_their_secret() -> None:
    keys = parse_master_keys(f"{NEW}, {OLD}\n")
    assert [k.id for k in keys] == ["new", "old"]
    short = "k1:" + base64.b64encode(b"s3cret-material-16").decode()
    with pytest.raises(MasterKeyError, match="has 18 bytes") as refused:
        parse_master_keys(short)
    assert "s3cret" not in str(refused.value) and short.split(":")[1] not in str(refused.value)
    for text, message in [
        ("", "no master key"),
        ("nokey", "not 'id:base64key'"),
        ("k1:***", "not base64"),
        (f"{OLD} {OLD}", "listed twice"),
    ]:
        with pytest.raises(MasterKeyError, match=message):
            parse_master_keys(text)


def test_a_ring_from_a_file_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "master-keys"
    path.write_text(OLD)
    now = [0.0]
    ring = MasterKeyRing(parse_master_keys(OLD), path=path, clock=lambda: now[0])
    key_id, wrapped = ring.wrap("s1", b"k" * 32)
    path.write_text(f"{NEW},{OLD}")
    os.utime(path, ns=(1, 1))
    assert ring.current.id == "old"  # not looked at yet
    now[0] = 10.0
    assert ring.current.id == "new"
    assert ring.unwrap("s1", key_id, wrapped) == b"k" * 32
    path.write_text("broken")
    os.utime(path, ns=(2, 2))
    now[0] = 20.0
    assert ring.current.id == "new"  # a broken file keeps the last good list


def test_a_wrapped_key_moved_to_another_subject_does_not_unwrap() -> None:
    ring = MasterKeyRing.from_text(OLD)
    key_id, wrapped = ring.wrap("alice", b"k" * 32)
    with pytest.raises(MasterKeyError, match="altered"):
        ring.unwrap("bob", key_id, wrapped)
    with pytest.raises(MasterKeyError, match="not configured"):
        MasterKeyRing.from_text(NEW).unwrap("alice", key_id, wrapped)


# -- the key store ----------------------------------------------------------------------------


def test_replicas_racing_for_a_new_subject_all_get_the_one_stored_key(settings: Settings) -> None:
    replicas = [client(settings) for _ in range(4)]
    subject = str(uuid.uuid4())
    barrier = threading.Barrier(len(replicas))
    got: list[DataKey] = []

    def create(replica: KeyClient) -> None:
        barrier.wait()
        got.append(replica.key_for_writing(subject))

    threads = [threading.Thread(target=create, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len({k.secret for k in got}) == 1
    assert replicas[0].store.count_by_master_key() == {"old": 1}
    for r in replicas:
        r.close()


def test_a_destroyed_key_is_never_created_again(settings: Settings) -> None:
    owner, replica = client(settings), client(settings)
    subject = str(uuid.uuid4())
    key = owner.key_for_writing(subject)
    assert owner.key_for_reading(subject) == key
    assert owner.destroy(subject) is True
    row = owner.store.fetch(subject)
    assert row is not None and row.destroyed and row.wrapped is None and row.master_key_id is None
    assert owner.key_for_reading(subject) is ERASED
    with pytest.raises(SubjectErased):
        owner.key_for_writing(subject)
    with pytest.raises(SubjectErased):
        replica.key_for_writing(subject)  # another process: from the store's tombstone
    # A subject erased before it ever had a key gets a tombstone all the same.
    never = str(uuid.uuid4())
    assert owner.destroy(never) is False
    with pytest.raises(SubjectErased):
        replica.key_for_writing(never)
    assert owner.store.count_by_master_key() == {"destroyed": 2}
    owner.close()
    replica.close()


def test_sqlite_destroy_leaves_no_copy_of_the_wrapped_key_in_the_files(tmp_path: Path) -> None:
    owner = client(sqlite_settings(tmp_path))
    subjects = [str(uuid.uuid4()) for _ in range(20)]
    for s in subjects:
        owner.key_for_writing(s)
    wrapped = [row.wrapped for s in subjects if (row := owner.store.fetch(s)) and row.wrapped]
    for s in subjects:
        owner.destroy(s)
    files = b"".join(p.read_bytes() for p in (tmp_path / "contacts").glob("keys.sqlite*"))
    assert not [w for w in wrapped if w in files]
    owner.close()


def test_rewrap_moves_every_live_key_to_the_current_master_key(settings: Settings) -> None:
    before = client(settings, keys=OLD)
    subjects = [str(uuid.uuid4()) for _ in range(30)]
    keys = {s: before.key_for_writing(s).secret for s in subjects}
    before.destroy(subjects[0])
    before.close()
    rotating = client(settings, keys=f"{NEW},{OLD}")
    assert rotating.rewrap(batch=7) == 29
    assert rotating.store.count_by_master_key() == {"new": 29, "destroyed": 1}
    rotating.close()
    after = client(settings, keys=NEW)  # the old master key removed
    for s in subjects[1:]:
        got = after.key_for_reading(s)
        assert isinstance(got, DataKey) and got.secret == keys[s]
    assert after.key_for_reading(subjects[0]) is ERASED
    after.close()


# -- the cache --------------------------------------------------------------------------------


def test_the_cache_is_bounded_by_entries_and_by_age() -> None:
    now = [0.0]
    cache = KeyCache(max_entries=3, ttl=60, clock=lambda: now[0])
    for i in range(5):
        cache.put(f"s{i}", DataKey(f"s{i}", b"k" * 32))
    assert len(cache) == 3 and cache.get("s0") is None and cache.get("s1") is None
    cache.get("s2")  # used: s3 is now the least recently used
    cache.put("s5", DataKey("s5", b"k" * 32))
    assert cache.get("s3") is None and cache.get("s2") is not None
    now[0] = 59.9
    assert cache.get("s5") is not None
    now[0] = 60.0
    assert cache.get("s5") is None and cache.get("s2") is None
    with pytest.raises(ValueError):
        KeyCache(max_entries=0)


def test_a_destroyed_key_leaves_this_process_at_once_and_others_within_the_ttl(
    settings: Settings,
) -> None:
    now = [0.0]
    here = client(settings)
    elsewhere = KeyClient(
        KeyStoreLocation.of(settings).open(),
        MasterKeyRing.from_text(OLD),
        "contacts",
        ttl=30,
        clock=lambda: now[0],
    )
    subject = str(uuid.uuid4())
    key = here.key_for_writing(subject)
    assert elsewhere.key_for_reading(subject) == key
    here.destroy(subject)
    assert here.key_for_reading(subject) is ERASED
    assert elsewhere.key_for_reading(subject) == key  # cached, within its ttl
    now[0] = 30.0
    assert elsewhere.key_for_reading(subject) is ERASED
    here.close()
    elsewhere.close()


def test_a_client_holds_no_more_keys_than_its_bound(settings: Settings) -> None:
    bounded = client(settings, cache_size=10)
    for _ in range(25):
        bounded.key_for_writing(str(uuid.uuid4()))
    assert len(bounded.cache) == 10
    bounded.close()


# -- who may read: the audit ------------------------------------------------------------------


def test_reads_by_another_service_are_audited_and_never_log_the_key(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    owner = client(settings)
    projector = client(settings, accessor="analytics")  # analytics consumes contacts
    subject = str(uuid.uuid4())
    key = owner.key_for_writing(subject)
    owner.key_for_reading(subject)
    assert owner.store.accesses() == []  # the owner's own reads are not audited
    with caplog.at_level(logging.INFO, logger="crm_common.privacy.client"):
        assert projector.key_for_reading(subject, purpose="project customer360") == key
    [access] = owner.store.accesses(subject)
    assert (access.accessor, access.owner, access.subject, access.purpose) == (
        "analytics",
        "contacts",
        subject,
        "project customer360",
    )
    [record] = [r for r in caplog.records if r.getMessage().startswith("personal data key read")]
    assert record.__dict__["accessor"] == "analytics" and record.__dict__["subject"] == subject
    logged = " ".join(f"{k}={v!r}" for k, v in record.__dict__.items())
    assert key.secret.hex() not in logged and repr(key.secret) not in logged
    with pytest.raises(PermissionDenied, match="only contacts may create"):
        projector.key_for_writing(str(uuid.uuid4()))
    with pytest.raises(PermissionDenied, match="only contacts may destroy"):
        projector.destroy(subject)
    owner.close()
    projector.close()


def test_a_service_that_does_not_consume_the_owner_may_not_read_its_keys(tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied, match="pipeline may not read"):
        client(sqlite_settings(tmp_path), accessor="pipeline", owner="tickets")


# -- tokens -----------------------------------------------------------------------------------


def test_a_token_never_holds_the_clear_value_and_reads_redacted_once_erased(tmp_path: Path) -> None:
    owner = client(sqlite_settings(tmp_path))
    cipher = PersonalDataCipher(owner)
    subject = str(uuid.uuid4())
    value = {"email": "ada@example.com", "phones": ["+44 20 7946 0018"]}
    token = cipher.encrypt(subject, value)
    assert token.startswith(f"pd1.{subject}.")
    assert "ada@" not in token and "7946" not in token
    assert cipher.encrypt(subject, value) != token  # a fresh nonce every time
    assert cipher.decrypt(token) == value
    assert cipher.decrypt(cipher.encrypt(subject, "Ada")) == "Ada"
    owner.destroy(subject)
    assert cipher.decrypt(token) == REDACTED
    with pytest.raises(SubjectErased):
        cipher.encrypt(subject, "again")
    owner.close()


def test_an_altered_token_is_refused_clearly(tmp_path: Path) -> None:
    owner = client(sqlite_settings(tmp_path))
    cipher = PersonalDataCipher(owner)
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    token = cipher.encrypt(alice, "Ada Lovelace")
    cipher.encrypt(bob, "Bob")
    head, body = token.rsplit(".", 1)
    flipped = body[:-3] + ("A" if body[-3] != "A" else "B") + body[-2:]
    with pytest.raises(InvalidToken, match="failed authentication: it was altered") as refused:
        cipher.decrypt(f"{head}.{flipped}")
    assert "Ada" not in str(refused.value)
    with pytest.raises(InvalidToken, match="failed authentication"):
        cipher.decrypt(token.replace(alice, bob))  # sealed for alice, presented as bob's
    for broken in ("Ada Lovelace", "pd1.x", f"pd1.{alice}.!!!", f"pd2.{alice}.{body}"):
        with pytest.raises(InvalidToken):
            cipher.decrypt(broken)
    owner.close()
