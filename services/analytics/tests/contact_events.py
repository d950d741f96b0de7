"""Builders of contacts events, as the contacts service publishes them."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from google.protobuf.timestamp_pb2 import Timestamp

from crm.contacts.v1 import contacts_pb2
from crm.events.v1 import contacts_pb2 as events_pb2
from crm_analytics.document import MembershipChanged
from crm_analytics.from_contacts import apply_event, apply_membership, apply_rename
from crm_common.relay import audit_headers, cloudevent_headers
from crm_common.telemetry import kafka_headers_with_context

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def at(position: int) -> datetime:
    """A deterministic time per position, so expected documents are easy to write."""
    return T0 + timedelta(minutes=position)


def envelope(contact_id: str, position: int, version: int = 1) -> events_pb2.ContactEvent:
    return events_pb2.ContactEvent(
        contact_id=contact_id,
        version=version,
        position=position,
        occurred_at=ts(at(position)),
        actor="ada",
        client="test",
    )


def email(address: str, status: int = contacts_pb2.CONSENT_STATUS_GRANTED) -> object:
    return contacts_pb2.ChannelIdentity(
        channel=contacts_pb2.CHANNEL_EMAIL,
        address=address,
        preferred=True,
        consent=contacts_pb2.Consent(
            status=status, source="web-form:newsletter", recorded_at=ts(T0)
        ),
    )


def person_profile(given: str = "Ada", family: str = "Lovelace", **kw: object) -> object:
    profile = events_pb2.PersonProfile(
        given_name=given,
        family_name=family,
        lifecycle_stage=kw.get("stage", contacts_pb2.LIFECYCLE_STAGE_LEAD),  # type: ignore[arg-type]
        tags=kw.get("tags", ["vip"]),  # type: ignore[arg-type]
        channels=kw.get("channels", [email(f"{given.lower()}@example.com")]),  # type: ignore[arg-type]
        owner=str(kw.get("owner", "grace")),
    )
    profile.custom_fields["budget"].CopyFrom(
        contacts_pb2.CustomFieldValue(type="money", value="1234.50", currency="EUR")
    )
    return profile


def person_registered(contact_id: str, position: int, **kw: object) -> events_pb2.ContactEvent:
    event = envelope(contact_id, position)
    event.person_registered.profile.CopyFrom(person_profile(**kw))  # type: ignore[arg-type]
    return event


def person_updated(
    contact_id: str, position: int, version: int = 2, **kw: object
) -> events_pb2.ContactEvent:
    event = envelope(contact_id, position, version)
    event.person_profile_updated.profile.CopyFrom(person_profile(**kw))  # type: ignore[arg-type]
    event.person_profile_updated.changed_fields.extend(["family_name"])
    return event


def company_profile(name: str = "Analytical Engines Ltd") -> events_pb2.CompanyProfile:
    return events_pb2.CompanyProfile(
        name=name,
        domain="engines.example",
        industry="machinery",
        lifecycle_stage=contacts_pb2.LIFECYCLE_STAGE_CUSTOMER,
        tags=["key-account"],
        owner="grace",
    )


def company_registered(
    contact_id: str, position: int, name: str = "Analytical Engines Ltd"
) -> events_pb2.ContactEvent:
    event = envelope(contact_id, position)
    event.company_registered.profile.CopyFrom(company_profile(name))
    return event


def company_renamed(
    contact_id: str, position: int, name: str, version: int = 2
) -> events_pb2.ContactEvent:
    event = envelope(contact_id, position, version)
    event.company_profile_updated.profile.CopyFrom(company_profile(name))
    event.company_profile_updated.changed_fields.append("name")
    return event


def linked(
    person_id: str, position: int, company_id: str, company_name: str, role: str = "buyer"
) -> events_pb2.ContactEvent:
    event = envelope(person_id, position, 2)
    event.person_linked_to_company.CopyFrom(
        events_pb2.PersonLinkedToCompany(
            company_id=company_id, company_name=company_name, role=role
        )
    )
    return event


def unlinked(person_id: str, position: int, company_id: str) -> events_pb2.ContactEvent:
    event = envelope(person_id, position, 3)
    event.person_unlinked_from_company.company_id = company_id
    return event


def consent(
    person_id: str, position: int, address: str, status: int, channel: int = 1
) -> events_pb2.ContactEvent:
    event = envelope(person_id, position, 2)
    event.consent_recorded.CopyFrom(
        events_pb2.ConsentRecorded(
            channel=channel,  # type: ignore[arg-type]
            address=address,
            consent=contacts_pb2.Consent(
                status=status,  # type: ignore[arg-type]
                source="call:agent-7",
                recorded_at=ts(at(position)),
            ),
        )
    )
    return event


def interaction(
    person_id: str,
    position: int,
    interaction_id: str,
    summary: str = "Talked about the difference engine",
    occurred: datetime | None = None,
    kind: int = contacts_pb2.INTERACTION_KIND_CALL,
) -> events_pb2.ContactEvent:
    event = envelope(person_id, position, 2)
    event.interaction_logged.interaction.CopyFrom(
        contacts_pb2.Interaction(
            interaction_id=interaction_id,
            kind=kind,  # type: ignore[arg-type]
            direction=contacts_pb2.DIRECTION_OUTBOUND,
            channel=contacts_pb2.CHANNEL_PHONE,
            summary=summary,
            occurred_at=ts(occurred or at(position)),
            owner="grace",
        )
    )
    return event


# -- a whole story, as the contacts service would publish it -----------------------------


def story(seed: int, persons: int = 40, companies: int = 8, steps: int = 360) -> list[Any]:
    """Registrations, then a random mix of every event type, in log order."""
    rng = random.Random(seed)
    tag = f"s{seed}"
    position = 0
    versions: dict[str, int] = {}
    names: dict[str, str] = {}
    links: dict[str, set[str]] = {}
    events: list[Any] = []

    def next_position(contact_id: str) -> tuple[int, int]:
        nonlocal position
        position += 1
        versions[contact_id] = versions.get(contact_id, 0) + 1
        return position, versions[contact_id]

    company_ids = [f"{tag}-c{i}" for i in range(companies)]
    person_ids = [f"{tag}-p{i}" for i in range(persons)]
    for cid in company_ids:
        names[cid] = f"Company {cid}"
        pos, _ = next_position(cid)
        events.append(company_registered(cid, pos, names[cid]))
    for pid in person_ids:
        pos, _ = next_position(pid)
        events.append(person_registered(pid, pos, given=f"Given{pid}", family="Family"))
        links[pid] = set()
    for step in range(steps):
        roll = rng.random()
        pid = rng.choice(person_ids)
        if roll < 0.1:
            cid = rng.choice(company_ids)
            names[cid] = f"Company {cid} v{step}"
            pos, version = next_position(cid)
            events.append(company_renamed(cid, pos, names[cid], version))
        elif roll < 0.3:
            cid = rng.choice(company_ids)
            pos, _ = next_position(pid)
            events.append(linked(pid, pos, cid, names[cid], rng.choice(["buyer", "cto", "cfo"])))
            links[pid].add(cid)
        elif roll < 0.37 and links[pid]:
            cid = sorted(links[pid])[0]
            pos, _ = next_position(pid)
            events.append(unlinked(pid, pos, cid))
            links[pid].discard(cid)
        elif roll < 0.5:
            pos, _ = next_position(pid)
            status = rng.choice([1, 2])
            events.append(consent(pid, pos, f"given{pid}@example.com".lower(), status))
        elif roll < 0.6:
            pos, version = next_position(pid)
            events.append(person_updated(pid, pos, version, given=f"Given{pid}", family=f"F{step}"))
        else:
            pos, _ = next_position(pid)
            events.append(interaction(pid, pos, f"{pid}-i{step}", f"call {step}"))
    return events


def expected_documents(events: list[Any]) -> dict[str, dict[str, Any]]:
    """The documents the projection must end with: the rules replayed in log order."""
    docs: dict[str, Any] = {}
    for event in events:
        result = apply_event(docs.get(event.contact_id), event, docs)
        if not result.applied:
            continue
        docs[event.contact_id] = result.doc
        for fan_out in result.fan_out:
            if isinstance(fan_out, MembershipChanged):
                docs[fan_out.company_id] = apply_membership(docs.get(fan_out.company_id), fan_out)
            else:
                for ident, doc in docs.items():
                    docs[ident] = apply_rename(doc, fan_out)
    return {ident: comparable(doc) for ident, doc in docs.items()}


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """A document without the bookkeeping that may differ between consumption orders."""
    doc = dict(doc)
    if "companies" in doc:
        doc["companies"] = [
            {k: v for k, v in c.items() if k != "name_position"} for c in doc["companies"]
        ]
    return doc


async def publish(
    bootstrap: str, topic: str, events: list[Any], audit: dict[str, str] | None = None
) -> None:
    """Publishes like the relay: keyed by contact, CloudEvents headers, idempotent."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        acks = []
        for event in events:
            payload = event.WhichOneof("payload") or "unknown"
            ce_type = "crm.contacts.v1." + "".join(p.title() for p in payload.split("_"))
            headers = cloudevent_headers(
                # Unique per event like the relay's `<id>:<version>` (the stories here
                # do not keep versions apart), the same for a redelivery.
                ce_id=f"{event.contact_id}@{event.position}",
                ce_type=ce_type,
                source="/crm/contacts",
                subject=event.contact_id,
                time_=event.occurred_at.ToDatetime(tzinfo=UTC),
                proto_message="crm.events.v1.ContactEvent",
                position=event.position,
            )
            # The audit headers the relay adds: the event's own actor and client by default.
            meta = {"actor": event.actor, "client": event.client, "command": payload}
            headers += audit_headers({**meta, **(audit or {})})
            acks.append(
                await producer.send(
                    topic,
                    event.SerializeToString(),
                    key=event.contact_id.encode(),
                    headers=kafka_headers_with_context(headers),
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
