"""The event contract (docs/asyncapi.yaml) against the code that produces the events.

The committed document must equal a fresh generation, name every topic and
every payload type of every envelope, promise exactly the headers the relay
writes, and be a valid AsyncAPI 3.0 document by the specification's own
JSON Schema.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from google.protobuf.descriptor import Descriptor
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from crm.erp.v1 import orders_pb2
from crm.events.v1 import contacts_pb2
from crm_common.auth.access import AccessPolicy
from crm_common.commands import Caller
from crm_common.privacy.mapper import declaration_of
from crm_common.privacy.wire import is_personal, personal_paths
from crm_common.registry import SERVICES, event_sources, inbound_topics
from crm_common.relay import WireMessage, build_relay
from crm_common.settings import Settings, inbound_topic, topic_of, topic_prefix
from crm_contacts import events_out as contacts_events_out
from crm_contacts.application import ContactsService, create_application
from crm_contacts.inputs import ChannelInput, NewPerson
from crm_deploy import asyncapi

ROOT = Path(__file__).resolve().parents[1]
SPEC_SCHEMA = ROOT / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"
DOC_URI = "urn:crm:asyncapi"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(asyncapi.DOCUMENT.read_text())
    return loaded


def envelope_of(service: str) -> Descriptor:
    """The envelope a write service publishes, read from its events module's stubs."""
    module = importlib.import_module(f"crm_{service}.events_out")
    full_name = module.PROTO_MESSAGE
    package = importlib.import_module(f"crm.events.v1.{service}_pb2")
    descriptor: Descriptor = package.DESCRIPTOR.message_types_by_name[full_name.rsplit(".", 1)[1]]
    return descriptor


def channel_at(document: dict[str, Any], topic: str) -> dict[str, Any]:
    """The channel whose address (under the default prefix) is `topic`."""
    matches: list[dict[str, Any]] = [
        c for c in document["channels"].values() if under_prefix(c["address"]) == topic
    ]
    assert len(matches) == 1, f"{topic}: {len(matches)} channels in docs/asyncapi.yaml"
    return matches[0]


def under_prefix(address: str) -> str:
    """A channel's address under this environment's CRM_TOPIC_PREFIX."""
    return address.replace("{prefix}", topic_prefix())


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def validator_for(document: dict[str, Any], pointer: str) -> jsonschema.Draft7Validator:
    """A validator of the schema at `pointer`, resolving the document's own $refs."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(document, default_specification=DRAFT7)
    )
    return jsonschema.Draft7Validator({"$ref": f"{DOC_URI}#{pointer}"}, registry=registry)


# -- up to date ------------------------------------------------------------------------


def test_the_committed_document_equals_a_fresh_generation() -> None:
    fresh = asyncapi.document_text()
    committed = asyncapi.DOCUMENT.read_text() if asyncapi.DOCUMENT.exists() else ""
    assert committed == fresh, (
        "docs/asyncapi.yaml is out of date with proto/, the registry or access.yaml: run "
        "`make asyncapi` (crm-stack asyncapi --write) and commit the result"
    )


def test_a_proto_change_changes_the_document(tmp_path: Path) -> None:
    """A new payload type and a new field show up on regeneration (so the test above
    fails until `make asyncapi` ran)."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    orders = tmp_path / "proto" / "crm" / "erp" / "v1" / "orders.proto"
    text = orders.read_text()
    text = text.replace(
        "  oneof payload {\n",
        "  oneof payload {\n    OrderAmended amended = 99;\n",
    )
    text += "\n// The order's lines changed before delivery.\nmessage OrderAmended {\n"
    text += "  repeated OrderLine lines = 1;\n}\n"
    text = text.replace(
        "message OrderCancelled {\n", "message OrderCancelled {\n  string note = 7;\n"
    )
    orders.write_text(text)
    changed = asyncapi.build_document(asyncapi.compile_protos(tmp_path / "proto"))
    message = changed["components"]["messages"]["erp-orders.OrderAmended"]
    assert message["name"] == "crm.erp.v1.OrderAmended"
    assert message["summary"] == "The order's lines changed before delivery."
    cancelled = changed["components"]["schemas"]["crm.erp.v1.OrderCancelled"]
    assert cancelled["properties"]["note"]["x-proto-field"] == 7
    assert asyncapi.render(changed) != asyncapi.DOCUMENT.read_text()


def test_a_broken_proto_is_a_clear_error(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    orders = tmp_path / "proto" / "crm" / "erp" / "v1" / "orders.proto"
    orders.write_text(orders.read_text() + "\nmessage Broken { NoSuchType x = 1; }\n")
    with pytest.raises(asyncapi.ContractError, match="NoSuchType"):
        asyncapi.compile_protos(tmp_path / "proto")


# -- completeness ------------------------------------------------------------------------


def test_every_topic_of_the_registry_has_a_channel_and_an_operation(
    document: dict[str, Any],
) -> None:
    expected = {topic_of(s): "send" for s in event_sources()}
    # Other systems publish the inbound topics; a dead-letter topic among them is the
    # platform's own (it sets aside what it could not apply).
    expected |= {
        inbound_topic(t): "send" if asyncapi.DEAD_LETTER_NAME.search(t) else "receive"
        for t in inbound_topics()
    }
    assert expected, "the registry names no topic"
    for topic, action in expected.items():
        channel = channel_at(document, topic)
        ident = next(k for k, c in document["channels"].items() if c is channel)
        operations = [
            op
            for op in document["operations"].values()
            if op["channel"]["$ref"] == f"#/channels/{ident}"
        ]
        assert [op["action"] for op in operations] == [action], topic
        assert channel["address"].startswith("{prefix}."), "the prefix is configurable"
    described = {under_prefix(c["address"]) for c in document["channels"].values()}
    assert described == set(expected), "the document names topics the registry does not"


def test_a_dead_letter_topic_in_the_registry_becomes_a_channel_the_platform_sends_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = tuple(
        dataclasses.replace(s, inbound_topics=(*s.inbound_topics, "erp.orders.dead-letters"))
        if "erp.orders" in s.inbound_topics
        else s
        for s in SERVICES
    )
    monkeypatch.setattr("crm_common.registry.SERVICES", services)
    document = asyncapi.build_document()
    channel = document["channels"]["erp-orders-dead-letters"]
    assert channel["address"] == "{prefix}.erp.orders.dead-letters"
    assert channel["x-kind"] == "dead-letters"
    assert document["operations"]["send-erp-orders-dead-letters"]["action"] == "send"
    assert set(channel["messages"]) == set(document["channels"]["erp-orders"]["messages"])
    assert not list(spec_validator().iter_errors(document))


def test_every_payload_type_of_every_envelope_is_a_message(document: dict[str, Any]) -> None:
    envelopes: dict[str, Descriptor] = {topic_of(s): envelope_of(s) for s in event_sources()}
    envelopes |= {inbound_topic(t): orders_pb2.OrderEvent.DESCRIPTOR for t in inbound_topics()}
    for topic, envelope in envelopes.items():
        channel = channel_at(document, topic)
        members = envelope.oneofs_by_name["payload"].fields
        assert members, f"{envelope.full_name} carries no payload types"
        for member in members:
            assert member.message_type is not None, f"{member.full_name} is not a message"
            name = member.message_type.name
            assert name in channel["messages"], f"{topic}: {name} is missing"
            message = resolve(document, channel["messages"][name]["$ref"])
            assert message["name"].endswith(f".v1.{name}")
            assert message["contentType"].endswith(f"proto={envelope.full_name}")
            schema = document["components"]["schemas"][member.message_type.full_name]
            assert set(schema["properties"]) == {f.name for f in member.message_type.fields}
        assert len(channel["messages"]) == len(members), f"{topic}: messages of no payload type"
        envelope_schema = document["components"]["schemas"][envelope.full_name]
        assert set(envelope_schema["properties"]) == {f.name for f in envelope.fields}


def test_every_envelope_field_number_is_the_proto_one(document: dict[str, Any]) -> None:
    for service in event_sources():
        envelope = envelope_of(service)
        properties = document["components"]["schemas"][envelope.full_name]["properties"]
        for field in envelope.fields:
            assert properties[field.name]["x-proto-field"] == field.number


# -- headers from the real relay ---------------------------------------------------------


async def relayed_messages(tmp_path: Path) -> list[WireMessage]:
    """Messages the relay builds from events a real contacts service stored, under a trace
    and with a full audit trail (no broker: the relay's own conversion)."""
    settings = Settings(
        service="contacts",
        data_dir=tmp_path,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )
    service = ContactsService(create_application(settings))
    caller = Caller(actor="user-ada", client="crm-web", request_id="req-asyncapi-1")
    span = NonRecordingSpan(
        SpanContext(
            trace_id=0x5B8EFFF798038103D269B633813FC60C,
            span_id=0xEEE19B7EC3C1B174,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )
    try:
        with trace.use_span(span):
            await service.create_person(
                caller,
                NewPerson(
                    given_name="Ada",
                    family_name="Lovelace",
                    channels=[ChannelInput("email", "ada@example.com")],
                ),
            )
    finally:
        service.close()
    relay, app = build_relay(
        settings,
        to_wire=contacts_events_out.to_wire,
        app_factory=create_application,
        proto_message=contacts_events_out.PROTO_MESSAGE,
    )
    try:
        notifications = list(relay.recorder.select_notifications(1, 100))
        # The relay's own conversion (it also returns what it set aside, if anything).
        built: Any = relay._to_messages(notifications)
        messages: list[WireMessage] = built[0] if isinstance(built, tuple) else built
    finally:
        app.close()
    assert messages, "the relay built no message"
    return messages


async def test_the_headers_are_those_the_relay_writes(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    messages = await relayed_messages(tmp_path)
    channel = channel_at(document, topic_of("contacts"))
    for wire in messages:
        written = dict(wire.headers)
        name = wire.ce_type.rsplit(".", 1)[1]
        pointer = channel["messages"][name]["$ref"].removeprefix("#")
        message = resolve(document, channel["messages"][name]["$ref"])
        headers = resolve(document, message["headers"]["allOf"][0]["$ref"])
        # Exactly the relay's names: nothing promised that is not sent, nothing sent
        # that is not described.
        assert set(written) == set(headers["properties"]), sorted(written)
        assert set(headers["required"]) <= set(written)
        as_text = {k: v.decode() for k, v in written.items()}
        errors = [
            e.message for e in validator_for(document, f"{pointer}/headers").iter_errors(as_text)
        ]
        assert not errors, errors
        assert message["name"] == as_text["ce_type"]
        assert as_text["ce_subject"] == wire.key
        # The key is the envelope field the document names.
        envelope = contacts_pb2.ContactEvent.FromString(wire.payload)
        assert getattr(envelope, channel["x-key"]) == wire.key
        # The payload, in its proto3 JSON form, matches the message's schema.
        body = MessageToDict(envelope, preserving_proto_field_name=True)
        errors = [
            e.message for e in validator_for(document, f"{pointer}/payload").iter_errors(body)
        ]
        assert not errors, errors


def test_a_header_the_contract_does_not_describe_stops_the_generation() -> None:
    topic = asyncapi.topics(asyncapi.compile_protos())[0]
    with pytest.raises(asyncapi.ContractError, match="HEADER_TEXT"):
        asyncapi._header_schema("crm_tenant", topic)


def test_a_payload_that_breaks_its_schema_is_caught(document: dict[str, Any]) -> None:
    """The schema check above can fail: a wrong type and an unknown field are refused."""
    channel = channel_at(document, inbound_topic("erp.orders"))
    pointer = channel["messages"]["OrderPlaced"]["$ref"].removeprefix("#") + "/payload"
    good = MessageToDict(
        orders_pb2.OrderEvent(
            order_id="o-1",
            customer_ref="c-1",
            placed=orders_pb2.OrderPlaced(
                currency="EUR", lines=[orders_pb2.OrderLine(line_id="1", amount="9.90")]
            ),
        ),
        preserving_proto_field_name=True,
    )
    validator = validator_for(document, pointer)
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors({**good, "placed": {"lines": "many"}}))
    assert list(validator.iter_errors({**good, "customer": "c-1"}))
    assert list(validator.iter_errors({"order_id": "o-1"})), "a message without its payload"


# -- personal data -------------------------------------------------------------------------


def payload_paths(descriptor: Descriptor, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field path of a message (through messages, lists and map values)."""
    paths: set[tuple[str, ...]] = set()
    for field in descriptor.fields:
        path = (*prefix, field.name)
        paths.add(path)
        target = field.message_type
        if target is not None and target.GetOptions().map_entry:
            target = target.fields_by_name["value"].message_type
        if target is not None and not target.full_name.startswith("google.protobuf."):
            paths |= payload_paths(target, path)
    return paths


def marked(document: dict[str, Any], service: str, key: str) -> set[tuple[str, ...]]:
    channel = channel_at(document, topic_of(service))
    return {
        tuple(path.split("."))
        for ref in channel["messages"].values()
        for path in resolve(document, ref["$ref"]).get(key, [])
    }


def test_personal_fields_are_marked_from_the_access_policy(document: dict[str, Any]) -> None:
    policy = AccessPolicy.load()
    total = 0
    for service in event_sources():
        envelope = envelope_of(service)
        existing = payload_paths(envelope)
        members = {f.name for f in envelope.oneofs_by_name["payload"].fields}
        personal, restricted = asyncapi.access_rules(service, policy)
        for key, rules in (("x-personal", personal), ("x-restricted", restricted)):
            for path in marked(document, service, key):
                total += 1
                assert path in existing, f"{service}: {path} is no field of {envelope.full_name}"
                assert any(path[-len(rule) :] == rule for rule in rules), (service, key, path)
            # Every field of the topic a rule names is marked.
            for path in existing:
                if path[0] in members and any(path[-len(rule) :] == rule for rule in rules):
                    assert path in marked(document, service, key), (service, key, path)
    assert total, "access.yaml names personal fields, none is marked in the events"
    person = marked(document, "contacts", "x-personal")
    assert ("person_registered", "profile", "given_name") in person
    assert ("person_registered", "profile", "channels", "address") in person


def test_the_360_views_rules_reach_the_topics_its_sections_come_from() -> None:
    """A 360 rule `<service>.<section>.<field>` marks `<field>` on the service's topic."""
    policy = AccessPolicy.load()
    views = [s.name for s in SERVICES if not s.writes_events]
    for view in views:
        for _, paths in policy.pseudonymised.get(view, {}).values():
            for path in paths:
                parts = path.split(".")
                if parts[0] in event_sources() and len(parts) > 1:
                    personal, _ = asyncapi.access_rules(parts[0], policy)
                    assert (parts[-1],) in personal, path


# -- AsyncAPI 3.0 ---------------------------------------------------------------------------


def spec_validator() -> jsonschema.protocols.Validator:
    assert SPEC_SCHEMA.exists(), (
        "the AsyncAPI specification's JSON Schema is missing: run "
        "deploy/install.sh --with-node-tools (npm ci installs @asyncapi/specs)"
    )
    schema = json.loads(SPEC_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def test_the_document_is_valid_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
        for e in spec_validator().iter_errors(document)
    ]
    assert not errors, errors[:10]


def test_the_specification_check_catches_a_defect(document: dict[str, Any]) -> None:
    broken = copy.deepcopy(document)
    operation = next(iter(broken["operations"].values()))
    operation["action"] = "publish"  # AsyncAPI 2 wording, not 3.0
    assert list(spec_validator().iter_errors(broken))


# -- personal data sealed on the topics ---------------------------------------------------


def stub_fields(descriptor: Descriptor, seen: set[str]) -> list[Any]:
    """Every field reachable from a message of the generated stubs."""
    if descriptor.full_name in seen:
        return []
    seen.add(descriptor.full_name)
    found: list[Any] = []
    for field in descriptor.fields:
        found.append(field)
        if field.message_type is not None:
            found += stub_fields(field.message_type, seen)
    return found


def test_every_field_the_contract_marks_personal_says_so(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    checked = 0
    for service in event_sources():
        for field in stub_fields(envelope_of(service), set()):
            schema = schemas.get(field.containing_type.full_name)
            if schema is None:  # a well-known type
                continue
            prop = schema["properties"][field.name]
            if is_personal(field):
                checked += 1
                assert prop.get("x-personal") is True, field.full_name
                assert "pd1.<subject>.<data>" in prop["description"], field.full_name
                assert '"[erased]"' in prop["description"], field.full_name
            else:
                assert "x-personal" not in prop, field.full_name
    assert checked >= 15
    given_name = schemas["crm.events.v1.PersonProfile"]["properties"]["given_name"]
    assert given_name["x-personal"] is True
    assert "x-personal" not in schemas["crm.events.v1.ContactEvent"]["properties"]["contact_id"]


def test_each_message_lists_the_paths_its_relay_seals(document: dict[str, Any]) -> None:
    """`x-sealed`: the marked paths of a payload whose event class declares personal
    data (as the relay decides), nothing for the others."""
    for service in event_sources():
        module = importlib.import_module(f"crm_{service}.events_out")
        table = getattr(module, "PAYLOADS", None) or module.FILLERS
        declared = {entry[0] for cls, entry in table.items() if declaration_of(cls, {})}
        channel = channel_at(document, topic_of(service))
        for member in envelope_of(service).oneofs_by_name["payload"].fields:
            assert member.message_type is not None
            name = member.message_type.name
            message = resolve(document, channel["messages"][name]["$ref"])
            expected = sorted(
                p.replace(".*", "") for p in personal_paths(member.message_type, f"{member.name}.")
            )
            if name in declared and expected:
                assert message["x-sealed"] == expected, (service, name)
            else:
                assert "x-sealed" not in message, (service, name)
    contacts = channel_at(document, topic_of("contacts"))["messages"]
    registered = resolve(document, contacts["PersonRegistered"]["$ref"])
    assert "person_registered.profile.given_name" in registered["x-sealed"]
    assert "person_registered.profile.channels.address" in registered["x-sealed"]
    # A company's custom field values go out clear, erasures and exports carry nothing.
    for name in ("CompanyRegistered", "PersonErased", "PersonalDataExported"):
        assert "x-sealed" not in resolve(document, contacts[name]["$ref"]), name


def test_who_may_open_a_topics_personal_fields_is_the_registrys_word(
    document: dict[str, Any],
) -> None:
    for service in event_sources():
        channel = channel_at(document, topic_of(service))
        readers = channel["x-personal-data-readers"]
        assert set(readers) == {
            s.name for s in SERVICES if s.name == service or service in s.consumes
        }
        assert "x-personal-data-readers" in channel["description"]
    assert "analytics" in channel_at(document, topic_of("contacts"))["x-personal-data-readers"]
    info = document["info"]["description"]
    assert "`pd1.<subject>.<data>`" in info and "audited" in info and "[erased]" in info
