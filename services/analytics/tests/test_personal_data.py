"""Personal data in the 360 view, over real Kafka topics and the real document store.

The events are published as the relays publish them since sealing: every
field the contracts mark personal is a token under the person's key in the
source service's key store (SQLite, with master keys). The projector opens
them with keys of its own reading; once the person is erased (keys destroyed,
`person_erased` published), a raw scan of every collection of the database
finds nothing personal, the anonymous facts are unchanged, and a rebuild
from the topics brings nothing back.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pipeline_events as deals
import pytest
import ticket_events as cases
from aiokafka import AIOKafkaProducer
from bson import encode
from contact_events import (
    company_registered,
    create_topic,
    email,
    envelope,
    interaction,
    linked,
    person_registered,
    publish,
)
from pymongo.database import Database

from crm.contacts.v1 import contacts_pb2
from crm_analytics import personal_data
from crm_analytics.document import PersonErased
from crm_analytics.from_contacts import apply_event
from crm_analytics.grpc_api import to_proto
from crm_analytics.personal_data import PURPOSE, PayloadOpener, redact_document
from crm_analytics.store import Customer360Store, sources
from crm_common.privacy import REDACTED, KeyClient, PersonalDataCipher, key_client, new_master_key
from crm_common.privacy.wire import TOKEN_PREFIX, seal_message, sealed_texts
from crm_common.projection import ProjectionConsumer
from crm_common.settings import Settings

PERSON, DUPLICATE, COMPANY, OTHER = "p-augusta", "p-augusta-2", "c-engines", "p-charles"
GIVEN, FAMILY = "Augusta", "Lovelace-Byron"
EMAIL, PHONE, EMAIL_2 = "augusta.ada@example.org", "+44 20 7946 0018", "a.byron@example.net"
NOTE = "prefers calls after 17:00 about the engine"
FIELD = "owns a loom in Nottinghamshire"
ROLE = "chief analyst"
DEAL = "Augusta's difference engine"
CASE = "Bernoulli numbers come out wrong"
#: What must never be found in clear once the person is erased.
CLEAR = (GIVEN, FAMILY, EMAIL, PHONE, EMAIL_2, NOTE, FIELD, ROLE, DEAL, CASE, "augusta.ada")


def settings(service: str, root: Path, master: str) -> Settings:
    return Settings(
        service=service,
        data_dir=root,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
        master_keys=master,
    )


def owner_keys(service: str, root: Path, master: str) -> KeyClient:
    keys = key_client(settings(service, root, master))
    assert keys is not None
    return keys


def sealed(events: list[Any], subject: Any, keys: KeyClient) -> list[Any]:
    """The events as the relay publishes them: every personal text a token."""
    cipher = PersonalDataCipher(keys)
    for event in events:
        seal_message(event, subject(event), cipher)
        assert all(t.startswith(TOKEN_PREFIX) for t in sealed_texts(event)), event
    return events


def person(
    contact_id: str,
    position: int,
    address: str,
    phone: str = "",
    given: str = GIVEN,
    family: str = FAMILY,
    field: str = FIELD,
) -> Any:
    channels = [email(address)]
    if phone:
        channels.append(
            contacts_pb2.ChannelIdentity(channel=contacts_pb2.CHANNEL_PHONE, address=phone)
        )
    event = person_registered(contact_id, position, given=given, family=family, channels=channels)
    event.person_registered.profile.custom_fields["hobby"].CopyFrom(
        contacts_pb2.CustomFieldValue(type="text", value=field)
    )
    return event


def person_erased(contact_id: str, position: int, merged: list[str]) -> Any:
    event = envelope(contact_id, position, 9)
    event.person_erased.reference = "dsr-2026-0042"
    event.person_erased.merged_ids.extend(merged)
    return event


def raw_text(database: Database[Any]) -> str:
    """Every stored document of every collection of the database, as raw BSON."""
    chunks = []
    for name in database.list_collection_names():
        for doc in database[name].find():
            chunks.append(encode(doc).decode("utf-8", "replace"))
    return "\n".join(chunks)


def facts(doc: dict[str, Any]) -> dict[str, Any]:
    """The anonymous facts of a person's document, which an erase keeps."""
    return {
        "deals": [
            (d["opportunity_id"], d["status"], d["amount"], d["currency"]) for d in doc["deals"]
        ],
        "revenue": doc["lifetime_won_revenue"],
        "timeline": [(e["entry_id"], e["kind"], e["occurred_at"]) for e in doc["timeline"]],
        "cases": [(c["case_id"], c["status"], c["priority"]) for c in doc["tickets"]["open_cases"]],
        "channels": [(c["channel"], c["consent"]["status"]) for c in doc["channels"]],
        "companies": [c["company_id"] for c in doc["companies"]],
        "tags": doc["tags"],
    }


async def project(
    bootstrap: str, database: Database[Any], topics: dict[str, str], opener: PayloadOpener
) -> dict[str, int]:
    store = Customer360Store(database, topics=topics, opener=opener)
    store.ensure_indexes()
    consumer = ProjectionConsumer(
        projection="customer360",
        topics=list(topics.values()),
        read_model=store,
        mongo=database.client,
        database=database.name,
        bootstrap=bootstrap,
        poll_timeout_ms=50,
    )
    result = await consumer.run_until_caught_up()
    return dict(result.counters)


@pytest.fixture
async def topics(analytics_servers: Any) -> dict[str, str]:
    """A topic per source under a prefix of this test's own (`rebuild` reads them all)."""
    prefix = f"t{uuid.uuid4().hex[:8]}.crm"
    names = {s: f"{prefix}.{s}.events" for s in sources()}
    for name in names.values():
        await create_topic(analytics_servers.kafka_bootstrap, name)
    return names


def rebuild(servers: Any, database: Database[Any], topics: dict[str, str], **env: str) -> str:
    """`crm-analytics rebuild` as a process of its own; what it printed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.update(
        CRM_MONGO_URL=servers.mongo_url,
        CRM_MONGO_DB=database.name,
        CRM_KAFKA_BOOTSTRAP=servers.kafka_bootstrap,
        CRM_TOPIC_PREFIX=topics["contacts"].removesuffix(".contacts.events"),
        **env,
    )
    done = subprocess.run(
        [sys.executable, "-m", "crm_analytics.main", "rebuild"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


async def test_sealed_payloads_are_projected_in_clear_and_an_erase_leaves_no_trace(
    analytics_servers: Any, database: Database[Any], topics: dict[str, str], tmp_path: Path
) -> None:
    bootstrap = analytics_servers.kafka_bootstrap
    master = new_master_key("m-1")
    contacts_keys = owner_keys("contacts", tmp_path, master)
    pipeline_keys = owner_keys("pipeline", tmp_path, master)

    await publish(
        bootstrap,
        topics["contacts"],
        [
            company_registered(COMPANY, 1),
            *sealed(
                [
                    person(PERSON, 2, EMAIL, PHONE),
                    interaction(PERSON, 3, "i-1", NOTE),
                    linked(PERSON, 4, COMPANY, "Analytical Engines Ltd", role=ROLE),
                    person(DUPLICATE, 5, EMAIL_2),
                    person(
                        OTHER,
                        6,
                        "charles@example.org",
                        given="Charles",
                        family="Babbage",
                        field="chess",
                    ),
                ],
                lambda e: e.contact_id,
                contacts_keys,
            ),
        ],
    )
    await deals.publish(
        bootstrap,
        topics["pipeline"],
        [
            deals.pipeline_defined(1),
            *sealed(
                [
                    deals.opened(PERSON, 2, "d-1", "1200.00", name=DEAL),
                    deals.won(PERSON, 3, "d-1", 2, "1200.00"),
                    deals.opened(PERSON, 4, "d-2", "80.00", name=DEAL),
                ],
                lambda e: e.customer_id,
                pipeline_keys,
            ),
        ],
    )
    # A record the view cannot decode, with the name in clear: parked as a dead letter.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics["contacts"], f"\x0a\xff{GIVEN} {FAMILY}".encode(), key=PERSON.encode()
        )
    finally:
        await producer.stop()
    # A case published before sealing was turned on: clear, and shown as it is.
    await cases.publish(
        bootstrap, topics["tickets"], [cases.opened(PERSON, "k-1", 1, subject=CASE)]
    )

    opener = PayloadOpener.from_settings(settings("analytics", tmp_path, master), sources())
    counters = await project(bootstrap, database, topics, opener)
    assert counters["dead_letters"] == 1
    assert database.projection_dead_letters.count_documents({"key": PERSON.encode()}) == 1

    doc = database.customer360.find_one({"_id": PERSON})
    assert doc is not None
    assert (doc["given_name"], doc["family_name"]) == (GIVEN, FAMILY)
    assert [c["address"] for c in doc["channels"]] == [EMAIL, PHONE]
    assert doc["custom_fields"]["hobby"]["value"] == FIELD
    assert doc["companies"][0]["role"] == ROLE
    assert NOTE in [e["summary"] for e in doc["timeline"]]
    assert {d["name"] for d in doc["deals"]} == {DEAL}
    assert doc["tickets"]["open_cases"][0]["subject"] == CASE
    company = database.customer360.find_one({"_id": COMPANY})
    assert company is not None and company["members"][0]["role"] == ROLE
    # The projector's reads of the contacts keys are in the owner's audit, with its purpose.
    with sqlite3.connect(tmp_path / "contacts" / "keys.sqlite") as keys_db:
        audited = keys_db.execute(
            "SELECT DISTINCT accessor, subject_id, purpose FROM privacy_key_access"
        ).fetchall()
    assert ("analytics", PERSON, PURPOSE) in audited
    # The scan below sees them while the person is not erased.
    assert [c for c in CLEAR if c in raw_text(database)] == list(CLEAR)
    before = facts(doc)
    other_before = database.customer360.find_one({"_id": OTHER})

    # The erase: contacts and pipeline destroy the keys, contacts publishes it.
    for keys in (contacts_keys, pipeline_keys):
        keys.destroy(PERSON)
        keys.destroy(DUPLICATE)
    await publish(bootstrap, topics["contacts"], [person_erased(PERSON, 7, [DUPLICATE])])
    # A redelivery of the erase and a later deal event change nothing more.
    await publish(bootstrap, topics["contacts"], [person_erased(PERSON, 7, [DUPLICATE])])
    await deals.publish(
        bootstrap, topics["pipeline"], [deals.moved(PERSON, 5, "d-2", 2, "negotiate")]
    )
    counters = await project(bootstrap, database, topics, opener)
    assert counters["duplicates"] == 1 and counters["dead_letters"] == 0
    # The erased person's dead letters are gone with the rest.
    assert database.projection_dead_letters.count_documents({}) == 0

    raw = raw_text(database)
    assert not [c for c in CLEAR if c in raw], "personal data left in the document store"
    erased = database.customer360.find_one({"_id": PERSON})
    assert erased is not None and erased["erased"] is True
    # The API says so on both transports (REST's reply model has the same flag).
    message = to_proto(erased)
    assert message.erased and message.given_name == REDACTED
    assert (erased["display_name"], erased["given_name"]) == (REDACTED, REDACTED)
    assert [c["address"] for c in erased["channels"]] == [REDACTED, REDACTED]
    assert erased["tickets"]["open_cases"][0]["subject"] == REDACTED
    assert {d["name"] for d in erased["deals"]} == {REDACTED}
    # Every anonymous fact stays; the later stage move is applied on top.
    after = facts(erased)
    assert after["deals"] == before["deals"]
    assert [d["stage_id"] for d in erased["deals"] if d["opportunity_id"] == "d-2"] == ["negotiate"]
    assert after["revenue"] == before["revenue"] == [{"amount": "1200.00", "currency": "EUR"}]
    assert [e for e in after["timeline"] if e[1] != "profile.erased"] == before["timeline"]
    [entry] = [e for e in erased["timeline"] if e["kind"] == "profile.erased"]
    assert entry["summary"] == "Personal data erased (dsr-2026-0042)"
    assert after["cases"] == before["cases"]
    assert (after["channels"], after["companies"], after["tags"]) == (
        before["channels"],
        before["companies"],
        before["tags"],
    )
    duplicate = database.customer360.find_one({"_id": DUPLICATE})
    assert duplicate is not None and duplicate["erased"] is True
    assert duplicate["display_name"] == REDACTED
    company = database.customer360.find_one({"_id": COMPANY})
    assert company is not None and company["members"][0] == {
        **company["members"][0],
        "person_id": PERSON,
        "role": REDACTED,
    }
    # Another person is untouched.
    other = database.customer360.find_one({"_id": OTHER})
    assert other == other_before

    # A rebuild from the topics (a process of its own, with the master keys) brings
    # nothing back.
    printed = rebuild(
        analytics_servers, database, topics, CRM_DATA_DIR=str(tmp_path), CRM_MASTER_KEYS=master
    )
    assert "1 dead letters" in printed  # parked again, then deleted by the erase
    raw = raw_text(database)
    assert not [c for c in CLEAR if c in raw], "a rebuild brought personal data back"
    rebuilt = database.customer360.find_one({"_id": PERSON})
    assert rebuilt is not None and rebuilt["erased"] is True
    assert facts(rebuilt)["deals"] == after["deals"]
    assert facts(rebuilt)["revenue"] == after["revenue"]
    assert facts(rebuilt)["cases"] == after["cases"]
    assert database.customer360.find_one({"_id": OTHER})["given_name"] == "Charles"  # type: ignore[index]
    for keys in (contacts_keys, pipeline_keys):
        keys.close()
    opener.close()


async def test_without_master_keys_tokens_stay_as_they_are_with_one_warning(
    analytics_servers: Any,
    database: Database[Any],
    topics: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bootstrap = analytics_servers.kafka_bootstrap
    contacts_keys = owner_keys("contacts", tmp_path, new_master_key("m-1"))
    await publish(
        bootstrap,
        topics["contacts"],
        [
            *sealed([person(PERSON, 1, EMAIL)], lambda e: e.contact_id, contacts_keys),
            person(OTHER, 2, "charles@example.org", given="Charles", family="Babbage"),
        ],
    )
    # The projector's process has no master keys: no cipher at all.
    opener = PayloadOpener.from_settings(settings("analytics", tmp_path, ""), ["contacts"])
    assert opener.ciphers == {"contacts": None}
    personal_data._warned.clear()  # as in a process of its own
    with caplog.at_level(logging.WARNING, logger="crm_analytics.personal_data"):
        counters = await project(bootstrap, database, {"contacts": topics["contacts"]}, opener)
    assert counters["applied"] == 2 and counters["dead_letters"] == 0
    sealed_doc = database.customer360.find_one({"_id": PERSON})
    assert sealed_doc is not None and sealed_doc["given_name"].startswith(
        f"{TOKEN_PREFIX}{PERSON}."
    )
    clear = database.customer360.find_one({"_id": OTHER})
    assert clear is not None and clear["given_name"] == "Charles"
    warnings = [r for r in caplog.records if "no master keys" in r.getMessage()]
    assert len(warnings) == 1
    contacts_keys.close()


async def test_an_altered_token_is_a_dead_letter_and_the_document_is_left_alone(
    analytics_servers: Any, database: Database[Any], topics: dict[str, str], tmp_path: Path
) -> None:
    bootstrap = analytics_servers.kafka_bootstrap
    master = new_master_key("m-1")
    contacts_keys = owner_keys("contacts", tmp_path, master)
    [registered, renamed] = sealed(
        [person(PERSON, 1, EMAIL), person(PERSON, 2, EMAIL)], lambda e: e.contact_id, contacts_keys
    )
    profile = renamed.person_registered.profile
    token = profile.given_name
    middle = len(token) - 12
    profile.given_name = (
        token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    )
    await publish(bootstrap, topics["contacts"], [registered, renamed])
    opener = PayloadOpener.from_settings(settings("analytics", tmp_path, master), ["contacts"])
    database_topics = {"contacts": topics["contacts"]}
    counters = await project(bootstrap, database, database_topics, opener)
    assert counters["applied"] == 1 and counters["dead_letters"] == 1
    [letter] = database.projection_dead_letters.find()
    assert "personal data cannot be opened" in letter["error"]
    assert "altered" in letter["error"]
    doc = database.customer360.find_one({"_id": PERSON})
    assert doc is not None and doc["given_name"] == GIVEN and doc["positions"]["contacts"] == 1
    opener.close()
    contacts_keys.close()


def test_redaction_keeps_the_anonymous_facts_and_is_idempotent() -> None:
    doc: Any = {
        "_id": PERSON,
        "customer_id": PERSON,
        "kind": "person",
        "display_name": f"{GIVEN} {FAMILY}",
        "given_name": GIVEN,
        "family_name": "",
        "tags": ["vip"],
        "custom_fields": {"hobby": {"type": "text", "value": FIELD, "currency": ""}},
        "loyalty": {"recent_entries": [{"entry_id": "e", "kind": "adjusted", "points": 5,
                                        "detail": "birthday gift", "occurred_at": None}]},
    }  # fmt: skip
    once = redact_document(doc)
    assert once == redact_document(once)
    assert (once["display_name"], once["given_name"], once["family_name"]) == (
        REDACTED,
        REDACTED,
        "",
    )
    assert once["custom_fields"]["hobby"] == {"type": "text", "value": REDACTED, "currency": ""}
    assert once["loyalty"]["recent_entries"][0]["points"] == 5
    assert once["loyalty"]["recent_entries"][0]["detail"] == REDACTED
    assert once["tags"] == ["vip"] and doc["given_name"] == GIVEN  # the original is untouched


def test_an_export_is_on_the_timeline_and_an_erase_names_every_document_it_redacts() -> None:
    registered = apply_event(None, person(PERSON, 1, EMAIL)).doc
    exported = envelope(PERSON, 2, 2)
    exported.actor = "root"
    exported.personal_data_exported.services.extend(["contacts", "analytics"])
    doc = apply_event(registered, exported).doc
    [entry] = [e for e in doc["timeline"] if e["kind"] == "privacy.exported"]
    assert entry["summary"] == "Personal data exported (contacts, analytics)"
    assert entry["owner"] == "root" and entry["occurred_at"] is not None

    erase = person_erased(PERSON, 3, [DUPLICATE])
    applied = apply_event(doc, erase)
    assert applied.doc["erased"] is True and applied.doc["given_name"] == REDACTED
    assert applied.fan_out == [PersonErased((PERSON, DUPLICATE), 3)]
    # The export entry is the view's own words: it stays readable.
    assert entry in applied.doc["timeline"]
    # Redelivered: nothing applied again.
    assert apply_event(applied.doc, erase).applied is False
