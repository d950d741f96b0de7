"""Personal fields of published messages (crm_common.privacy.wire): which
fields the contract marks personal in each event envelope, and how a message
is sealed and opened in place, through nested, repeated and map fields, with
data keys from a real key store (SQLite in the test's directory).

A test-only message type (built here from a descriptor, in a package of its
own) has every shape the relays meet: a personal text, a list of personal
texts, a nested message, a list and a map of messages holding personal
texts, beside fields that are not personal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from crm.events.v1 import contacts_pb2, loyalty_pb2, pipeline_pb2, tickets_pb2
from crm.privacy.v1 import privacy_pb2
from crm_common.errors import PermissionDenied
from crm_common.privacy import (
    REDACTED,
    KeyClient,
    KeyStoreLocation,
    MasterKeyRing,
    PersonalDataCipher,
    new_master_key,
)
from crm_common.privacy.tokens import InvalidToken
from crm_common.privacy.wire import (
    has_personal_fields,
    is_personal,
    open_message,
    personal_paths,
    seal_message,
    sealed_texts,
)
from crm_common.settings import Settings

MASTER = new_master_key("wire")
SUBJECT = "0b5c1f3e-7d0a-4c55-9a57-3f1e2d6c8b90"
OTHER = "5e8d9a60-1f2b-4d3c-8e7f-a1b2c3d4e5f6"
NAME, ALIAS, LABEL, NOTE = "Grace Brewster Hopper", "Amazing Grace", "Cobol notes", "ship it"


# -- the test-only message type ---------------------------------------------------------


def _personal() -> descriptor_pb2.FieldOptions:
    options = descriptor_pb2.FieldOptions()
    options.Extensions[privacy_pb2.personal] = True
    return options


def _field(
    name: str,
    number: int,
    kind: int,
    *,
    repeated: bool = False,
    type_name: str = "",
    personal: bool = False,
) -> descriptor_pb2.FieldDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto(
        name=name,
        number=number,
        type=kind,  # type: ignore[arg-type]
        label=(
            descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            if repeated
            else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        ),
    )
    if type_name:
        field.type_name = type_name
    if personal:
        field.options.CopyFrom(_personal())
    return field


TEXT = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
INT = descriptor_pb2.FieldDescriptorProto.TYPE_INT64
MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE


def _test_types() -> tuple[type[Message], type[Message]]:
    """`crm.test.wire.Holder` and its `Item`, added to the default pool once."""
    pool = descriptor_pool.Default()
    try:
        holder = pool.FindMessageTypeByName("crm.test.wire.Holder")
    except KeyError:
        file = descriptor_pb2.FileDescriptorProto(
            name="crm_test/wire/holder.proto",
            package="crm.test.wire",
            syntax="proto3",
            dependency=[privacy_pb2.DESCRIPTOR.name],
        )
        item = file.message_type.add(name="Item")
        item.field.extend(
            [
                _field("label", 1, TEXT, personal=True),
                _field("amount", 2, INT),
                _field("code", 3, TEXT),
            ]
        )
        plain = file.message_type.add(name="Plain")
        plain.field.append(_field("note", 1, TEXT))
        holder_type = file.message_type.add(name="Holder")
        entry = holder_type.nested_type.add(name="ByKeyEntry")
        entry.options.map_entry = True
        entry.field.extend(
            [_field("key", 1, TEXT), _field("value", 2, MESSAGE, type_name=".crm.test.wire.Item")]
        )
        plain_entry = holder_type.nested_type.add(name="PlainByKeyEntry")
        plain_entry.options.map_entry = True
        plain_entry.field.extend(
            [_field("key", 1, TEXT), _field("value", 2, MESSAGE, type_name=".crm.test.wire.Plain")]
        )
        holder_type.field.extend(
            [
                _field("id", 1, TEXT),
                _field("name", 2, TEXT, personal=True),
                _field("aliases", 3, TEXT, repeated=True, personal=True),
                _field("item", 4, MESSAGE, type_name=".crm.test.wire.Item"),
                _field("items", 5, MESSAGE, repeated=True, type_name=".crm.test.wire.Item"),
                _field(
                    "by_key",
                    6,
                    MESSAGE,
                    repeated=True,
                    type_name=".crm.test.wire.Holder.ByKeyEntry",
                ),
                _field("plain", 7, MESSAGE, type_name=".crm.test.wire.Plain"),
                _field(
                    "plain_by_key",
                    8,
                    MESSAGE,
                    repeated=True,
                    type_name=".crm.test.wire.Holder.PlainByKeyEntry",
                ),
                _field("total", 9, INT),
            ]
        )
        pool.AddSerializedFile(file.SerializeToString())
        holder = pool.FindMessageTypeByName("crm.test.wire.Holder")
    item_descriptor = pool.FindMessageTypeByName("crm.test.wire.Item")
    return (
        message_factory.GetMessageClass(holder),
        message_factory.GetMessageClass(item_descriptor),
    )


Holder, Item = _test_types()


def holder() -> Any:
    message: Any = Holder(id="h-1", name=NAME, total=4200)
    message.aliases.extend([ALIAS, "", "Grandma Cobol"])
    message.item.CopyFrom(Item(label=LABEL, amount=7, code="A1"))
    message.items.extend([Item(label="first", amount=1), Item(label="", amount=2)])
    message.by_key["x"].CopyFrom(Item(label="keyed", amount=3, code="K"))
    message.plain.note = NOTE
    message.plain_by_key["p"].note = NOTE
    return message


# -- keys -----------------------------------------------------------------------------


def settings(tmp_path: Path, service: str) -> Settings:
    return Settings(
        service=service,
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


def keys(tmp_path: Path, accessor: str = "contacts", owner: str = "contacts") -> KeyClient:
    store = KeyStoreLocation.of(settings(tmp_path, accessor), owner).open()
    return KeyClient(store, MasterKeyRing.from_text(MASTER), accessor)


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[KeyClient]:
    client = keys(tmp_path)
    yield client
    client.close()


# -- which fields are personal ----------------------------------------------------------

PROFILE = ("given_name", "family_name", "custom_fields.*.value", "channels.*.address")
EXPECTED_PATHS: dict[str, list[str]] = {
    "crm.events.v1.ContactEvent": [
        *(f"person_registered.profile.{p}" for p in PROFILE),
        *(f"person_profile_updated.profile.{p}" for p in PROFILE),
        "company_registered.profile.custom_fields.*.value",
        "company_profile_updated.profile.custom_fields.*.value",
        "person_linked_to_company.role",
        "consent_recorded.address",
        "interaction_logged.interaction.summary",
        *(f"contacts_merged.person_profile.{p}" for p in PROFILE),
        "contacts_merged.company_profile.custom_fields.*.value",
        *(f"contact_merge_undone.person_profile.{p}" for p in PROFILE),
        "contact_merge_undone.company_profile.custom_fields.*.value",
    ],
    "crm.events.v1.PipelineEvent": [
        "lead_created.given_name",
        "lead_created.family_name",
        "lead_created.email",
        "lead_created.phone",
        "opportunity_opened.name",
        "activity_scheduled.title",
        "activity_completed.outcome",
        "activity_cancelled.reason",
    ],
    "crm.events.v1.TicketEvent": ["case_opened.subject"],
    "crm.events.v1.LoyaltyEvent": ["member_enrolled.referred_by"],
}
ENVELOPES = (
    contacts_pb2.ContactEvent,
    pipeline_pb2.PipelineEvent,
    tickets_pb2.TicketEvent,
    loyalty_pb2.LoyaltyEvent,
)


@pytest.mark.parametrize("envelope", ENVELOPES, ids=lambda e: e.DESCRIPTOR.name)
def test_personal_paths_of_each_event_envelope_are_the_marked_fields(envelope: Any) -> None:
    descriptor = envelope.DESCRIPTOR
    assert list(personal_paths(descriptor)) == EXPECTED_PATHS[descriptor.full_name]
    assert has_personal_fields(descriptor)


def _reachable_fields(descriptor: Descriptor, seen: set[str]) -> Iterator[FieldDescriptor]:
    if descriptor.full_name in seen:
        return
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        yield field
        if field.message_type is not None:
            yield from _reachable_fields(field.message_type, seen)


@pytest.mark.parametrize("envelope", ENVELOPES, ids=lambda e: e.DESCRIPTOR.name)
def test_every_personal_mark_in_the_events_is_on_a_text_the_relays_seal(envelope: Any) -> None:
    """A mark on a number, a list of numbers or a map of texts would be ignored when
    sealing: the value would go out in clear under a contract that says otherwise."""
    marked = [f for f in _reachable_fields(envelope.DESCRIPTOR, set()) if is_personal(f)]
    assert marked
    wrong = [f.full_name for f in marked if f.type != FieldDescriptor.TYPE_STRING]
    assert wrong == []


def test_the_plan_follows_nested_repeated_and_map_fields_and_skips_the_rest() -> None:
    descriptor = cast(Descriptor, Holder.DESCRIPTOR)
    assert list(personal_paths(descriptor)) == [
        "name",
        "aliases.*",
        "item.label",
        "items.*.label",
        "by_key.*.label",
    ]
    plain = descriptor.fields_by_name["plain"].message_type
    assert plain is not None and not has_personal_fields(plain)
    assert list(personal_paths(cast(Descriptor, Item.DESCRIPTOR), "x.")) == ["x.label"]


# -- sealing and opening -----------------------------------------------------------------


def test_sealing_replaces_every_personal_text_and_nothing_else(owner: KeyClient) -> None:
    message = holder()
    before = holder()
    sealed = seal_message(message, SUBJECT, PersonalDataCipher(owner))
    # name, two non-empty aliases, item, first of items, the map's value
    assert sealed == 6
    texts = sealed_texts(message)
    assert len(texts) == 6
    assert all(t.startswith(f"pd1.{SUBJECT}.") for t in texts)
    raw = message.SerializeToString()
    for clear in (NAME, ALIAS, "Grandma Cobol", LABEL, "first", "keyed"):
        assert clear.encode() not in raw, clear
    # Empty personal texts stay empty; what is not personal stays as it was.
    assert message.aliases[1] == "" and message.items[1].label == ""
    assert (message.id, message.total) == ("h-1", 4200)
    assert (message.item.amount, message.item.code) == (7, "A1")
    assert [i.amount for i in message.items] == [1, 2]
    assert (message.by_key["x"].amount, message.by_key["x"].code) == (3, "K")
    assert message.plain.note == NOTE and message.plain_by_key["p"].note == NOTE

    assert open_message(message, PersonalDataCipher(owner)) == 6
    assert message == before


def test_sealed_texts_and_the_erased_marker_are_left_as_they_are(owner: KeyClient) -> None:
    cipher = PersonalDataCipher(owner)
    message = holder()
    seal_message(message, SUBJECT, cipher)
    tokens = sealed_texts(message)
    message.item.label = REDACTED
    again = seal_message(message, SUBJECT, cipher)  # a re-drive of a sealed payload
    assert again == 6
    assert message.item.label == REDACTED
    assert [t for t in sealed_texts(message) if t != REDACTED] == [
        t for i, t in enumerate(tokens) if i != 3
    ]


def test_a_token_opens_only_under_its_own_subject(owner: KeyClient) -> None:
    cipher = PersonalDataCipher(owner)
    message: Any = Holder(name=NAME)
    seal_message(message, SUBJECT, cipher)
    other: Any = Holder(name=NAME)
    seal_message(other, OTHER, cipher)
    assert message.name != other.name  # a key per subject, a nonce per value
    moved = message.name.replace(SUBJECT, OTHER)
    with pytest.raises(InvalidToken) as refused:
        open_message(Holder(name=moved), cipher)
    assert NAME not in str(refused.value)


def test_an_erased_subjects_values_read_erased_sealed_or_not(owner: KeyClient) -> None:
    cipher = PersonalDataCipher(owner)
    published = holder()
    seal_message(published, SUBJECT, cipher)
    owner.destroy(SUBJECT)
    # Published before the erase: opens as the marker.
    assert open_message(published, cipher) == 6
    assert set(sealed_texts(published)) == {REDACTED}
    assert published.id == "h-1" and published.item.amount == 7
    # A clear payload of the erased subject (stored before encryption was on)
    # goes out as the marker: no key can be made for it any more.
    late = holder()
    assert seal_message(late, SUBJECT, cipher) == 6
    assert set(sealed_texts(late)) == {REDACTED}
    for clear in (NAME, ALIAS, LABEL):
        assert clear.encode() not in late.SerializeToString()


def test_clear_texts_stay_when_opened(owner: KeyClient) -> None:
    """A payload published before sealing was turned on reads as it was."""
    message = holder()
    open_message(message, PersonalDataCipher(owner))
    assert message == holder()


def test_a_consumer_the_registry_allows_opens_and_one_it_does_not_is_refused(
    tmp_path: Path, owner: KeyClient
) -> None:
    message = holder()
    seal_message(message, SUBJECT, PersonalDataCipher(owner))
    analytics = keys(tmp_path, accessor="analytics", owner="contacts")
    try:
        assert open_message(message, PersonalDataCipher(analytics), "test") == 6
        assert message == holder()
        accesses = analytics.store.accesses(SUBJECT)
        assert [(a.accessor, a.purpose) for a in accesses] == [("analytics", "test")]
    finally:
        analytics.close()
    with pytest.raises(PermissionDenied):
        keys(tmp_path, accessor="loyalty", owner="pipeline")
