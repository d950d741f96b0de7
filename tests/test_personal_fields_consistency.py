"""What a service declares personal in its domain events (`PersonalData`) and
what its contract marks personal in the published messages
(`(crm.privacy.v1.personal)`) agree: every declared value that a service's
`events_out.to_wire` publishes lands in a marked field, so that the relay
seals it.

One sample event per declared, published event class, with a distinctive
text at each declared path, goes through the service's own `to_wire`; the
payload is sealed as the relay seals it (`crm_common.privacy.wire`, with data
keys from a real key store in the test's directory) and no distinctive text
may remain in the bytes. A failure names the payload field that carried the
value in clear: that field needs the mark in its .proto.
"""

from __future__ import annotations

import copy
import importlib
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from crm_common.privacy import (
    KeyClient,
    KeyStoreLocation,
    MasterKeyRing,
    PersonalDataCipher,
    new_master_key,
)
from crm_common.privacy.declaration import put
from crm_common.privacy.mapper import declaration_of
from crm_common.privacy.wire import open_message, seal_message
from crm_common.registry import event_sources
from crm_common.settings import Settings

MASTER = new_master_key("consistency")
AT = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
CUSTOMER = "3f2a9c4e-5b6d-4e7f-8a9b-0c1d2e3f4a5b"


def _profile() -> dict[str, Any]:
    return {
        "given_name": "given",
        "family_name": "family",
        "lifecycle_stage": "lead",
        "tags": ["vip"],
        "custom_fields": {
            "hobby": {"type": "text", "value": "sailing", "currency": ""},
            "budget": {"type": "money", "value": "1200.00", "currency": "EUR"},
        },
        "channels": [
            {"channel": "email", "address": "a@example.org", "preferred": True, "consent": None},
            {
                "channel": "phone",
                "address": "+12025550100",
                "preferred": False,
                "consent": {"status": "granted", "source": "web", "recorded_at": AT},
            },
        ],
        "owner": "user-1",
    }


#: The state of one sample event of every declared class a service publishes,
#: by service and class name (`Person.PersonRegistered`); the declared personal
#: values are replaced by distinctive texts before publishing.
SAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "contacts": {
        "Person.PersonRegistered": {"profile": _profile()},
        "Person.PersonProfileUpdated": {
            "profile": _profile(),
            "changed_fields": ["given_name", "channels"],
            "cause": "",
        },
        "Person.PersonLinkedToCompany": {
            "company_id": str(uuid.uuid4()),
            "company_name": "Analytical Engines Ltd",
            "role": "chief",
        },
        "Person.ConsentRecorded": {
            "channel": "email",
            "address": "a@example.org",
            "status": "granted",
            "source": "web-form:newsletter",
            "at": AT,
        },
        "Contact.InteractionLogged": {
            "interaction": {
                "interaction_id": "i-1",
                "kind": "call",
                "direction": "inbound",
                "channel": "phone",
                "summary": "talked",
                "occurred_at": AT,
                "owner": "user-1",
            }
        },
        "Contact.ContactsMerged": {
            "merge_id": "m-1",
            "merged_ids": [str(uuid.uuid4())],
            "before": _profile(),
            "after": _profile(),
            "interactions": [{"interaction_id": "i-2", "summary": "taken over"}],
            "affiliations": [{"company_id": "c-1", "role": "buyer"}],
            "at": AT,
            "actor": "user-1",
        },
        "Contact.ContactMergeUndone": {
            "merge_id": "m-1",
            "restored_ids": [str(uuid.uuid4())],
            "profile": _profile(),
            "interactions": ["i-2"],
            "affiliations": ["c-1"],
            "at": AT,
            "actor": "user-1",
        },
    },
    "pipeline": {
        "Lead.Created": {
            "customer_id": "",
            "given_name": "given",
            "family_name": "family",
            "company_name": "Analytical Engines Ltd",
            "email": "a@example.org",
            "phone": "+12025550100",
            "source": "web",
            "campaign": "spring",
            "owner": "user-1",
            "at": AT,
            "partner_tag": "",
        },
        "Opportunity.Opened": {
            "customer_id": CUSTOMER,
            "pipeline_id": "p-1",
            "stage_id": "s-1",
            "name": "deal",
            "person_id": CUSTOMER,
            "company_id": "",
            "owner": "user-1",
            "amount": Decimal("1200.50"),
            "currency": "EUR",
            "expected_close_date": date(2026, 12, 1),
            "kind": "new_business",
            "related_deal_ids": [],
            "lead_id": "",
            "at": AT,
        },
        "Activity.Scheduled": {
            "customer_id": CUSTOMER,
            "subject_kind": "opportunity",
            "subject_id": "o-1",
            "kind": "call",
            "title": "call",
            "owner": "user-1",
            "due_at": AT,
            "at": AT,
        },
        "Activity.Completed": {"customer_id": CUSTOMER, "outcome": "done", "at": AT},
        "Activity.Cancelled": {"customer_id": CUSTOMER, "reason": "gone", "at": AT},
    },
    "tickets": {
        "Case.Opened": {
            "customer_id": CUSTOMER,
            "at": AT,
            "channel": "email",
            "subject": "broken",
            "description": "it broke",
            "category": "billing",
            "priority": "normal",
            "team": "support",
            "assignee": "",
            "tier": "gold",
            "tier_source": "loyalty",
            "policy_id": "sla-1",
            "policy_version": 1,
            "terms": {},
            "reopen_window_seconds": 3600,
        },
        "Case.Replied": {
            "customer_id": CUSTOMER,
            "at": AT,
            "author": "user-1",
            "author_kind": "agent",
            "body": "answer",
        },
        "Case.NoteAdded": {"customer_id": CUSTOMER, "at": AT, "author": "user-1", "body": "note"},
        "Case.SatisfactionRecorded": {
            "customer_id": CUSTOMER,
            "at": AT,
            "csat": 5,
            "ces": 2,
            "nps": 9,
            "comment": "great",
        },
    },
    "loyalty": {
        "Member.Created": {
            "customer_id": CUSTOMER,
            "member_number": "M-000123",
            "channel": "web",
            "at": AT,
            "birthday": "1815-12-10",
            "referred_by": "friend",
        },
        "Member.MergedIn": {
            "customer_id": CUSTOMER,
            "merged": str(uuid.uuid4()),
            "reference": "m-1",
            "lots": [
                {
                    "lot_id": "l-1",
                    "earned": 120,
                    "earned_at": AT.isoformat(),
                    "expires_at": AT.isoformat(),
                    "locked_until": None,
                    "order_id": "o-1",
                    "rule_version": 1,
                    "reason": "order",
                    "lines": {"1": 120},
                    "spend": {"1": "120.00"},
                    "currency": "EUR",
                    "remaining": 100,
                    "spent": 20,
                    "expired": 0,
                    "cancelled": 0,
                    "via": "",
                }
            ],
            "orders": {"o-1": {"lot_id": "l-1", "lines": {"1": 120}}},
            "bonuses": [],
            "tier": "silver",
            "enrolled_at": AT,
            "referral_settled": False,
            "at": AT,
            "birthday": "12-10",
            "referred_by": "friend",
        },
    },
}


#: Declared classes whose personal values the service publishes none of (a reply's
#: or a note's body, a satisfaction comment: the message says that it happened).
KEPT_IN: dict[str, tuple[str, ...]] = {
    "tickets": ("Case.NoteAdded", "Case.Replied", "Case.SatisfactionRecorded"),
    # A merge publishes the lots and orders that came, not the birthday or the
    # referrer the survivor took over.
    "loyalty": ("Member.MergedIn",),
}


def events_out(service: str) -> Any:
    return importlib.import_module(f"crm_{service}.events_out")


def published_classes(service: str) -> dict[str, type]:
    """The event classes a service's `to_wire` publishes, by qualified name."""
    module = events_out(service)
    table = getattr(module, "PAYLOADS", None) or module.FILLERS
    return {cls.__qualname__: cls for cls in table}


def declared_published(service: str) -> list[str]:
    return sorted(
        name
        for name, cls in published_classes(service).items()
        if declaration_of(cls, {}) is not None
    )


CASES = [(service, name) for service in sorted(SAMPLES) for name in sorted(SAMPLES[service])]


def test_every_declared_published_event_class_has_a_sample() -> None:
    """A new declared event class must be checked here too."""
    assert sorted(SAMPLES) == sorted(event_sources())
    for service in event_sources():
        assert sorted(SAMPLES[service]) == declared_published(service), service


@pytest.fixture(scope="module")
def ciphers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PersonalDataCipher]]:
    """Each write service's own data keys (SQLite key stores)."""
    root: Path = tmp_path_factory.mktemp("keys")
    clients: dict[str, KeyClient] = {}
    for service in event_sources():
        settings = Settings(
            service=service,
            data_dir=root,
            bind_host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            event_store="sqlite",
        )
        store = KeyStoreLocation.of(settings).open()
        clients[service] = KeyClient(store, MasterKeyRing.from_text(MASTER), service)
    yield {service: PersonalDataCipher(client) for service, client in clients.items()}
    for client in clients.values():
        client.close()


def sample_event(service: str, name: str) -> tuple[Any, list[str]]:
    """The sample event, and the distinctive texts at its declared personal paths."""
    event_class = published_classes(service)[name]
    state: dict[str, Any] = copy.deepcopy(SAMPLES[service][name])
    state.update(originator_id=uuid.uuid4(), originator_version=1, timestamp=AT)
    declaration = declaration_of(event_class, state)
    assert declaration is not None
    _, taken = declaration.take(state)
    markers: list[str] = []
    for index, (path, value) in enumerate(taken):
        if isinstance(value, str) and value:
            marker = f"Qz{index}x{name.rsplit('.', 1)[1]}Personal"
            state = put(state, path, marker)
            markers.append(marker)
    assert markers, f"{name}: the sample sets none of its declared personal values"
    event: Any = object.__new__(event_class)
    object.__setattr__(event, "__dict__", state)
    return event, markers


def clear_fields(message: Message, marker: str, prefix: str = "") -> list[str]:
    """The paths of the text fields of `message` that hold `marker` in clear."""
    found: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    found += clear_fields(item, marker, f"{path}[{key}].")
                elif marker in str(item):
                    found.append(f"{path}[{key}]")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for index, item in enumerate(items):
                found += clear_fields(
                    item, marker, f"{path}[{index}]." if field.is_repeated else f"{path}."
                )
        elif field.type == FieldDescriptor.TYPE_STRING:
            texts = value if field.is_repeated else [value]
            if any(marker in text for text in texts):
                found.append(path)
    return found


@pytest.mark.parametrize(("service", "name"), CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_declared_personal_values_are_published_only_in_marked_fields(
    service: str, name: str, ciphers: dict[str, PersonalDataCipher]
) -> None:
    module = events_out(service)
    envelope = message_factory.GetMessageClass(
        descriptor_pool.Default().FindMessageTypeByName(module.PROTO_MESSAGE)
    )
    event, markers = sample_event(service, name)
    wire = module.to_wire(event, {"actor": "user-1", "client": "crm-web"}, 42)
    assert wire is not None, f"{name} is not published"
    key, ce_type, payload = wire
    published = [m for m in markers if m.encode() in payload]
    # Either the sample is right and some declared value goes out, or the class is
    # one whose personal values stay in the service (then nothing can leak anyway).
    assert bool(published) == (name not in KEPT_IN.get(service, ())), (name, len(published))
    message = envelope.FromString(payload)
    declaration = declaration_of(type(event), vars(event))
    assert declaration is not None
    seal_message(message, declaration.subject_in(vars(event)), ciphers[service])
    sealed = message.SerializeToString()
    in_clear = {m: clear_fields(message, m) for m in markers if m.encode() in sealed}
    assert not in_clear, (
        f"{name}: declared personal values published in fields {module.PROTO_MESSAGE} does "
        f"not mark (crm.privacy.v1.personal): {sorted({f for fs in in_clear.values() for f in fs})}"
    )
    assert not any(m in key or m in ce_type for m in markers), "a personal value as the key"
    # Nothing but the personal texts changed: opened again, it is the service's message.
    open_message(message, ciphers[service], "test")
    assert message == envelope.FromString(payload)
    if name == "Opportunity.Opened":  # amounts stay readable without any key
        assert b"1200.50" in sealed and CUSTOMER.encode() in sealed
