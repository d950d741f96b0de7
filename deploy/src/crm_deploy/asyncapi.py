"""The event contract as an AsyncAPI 3.0 document, generated from the code.

`crm-stack asyncapi --write` (`make asyncapi`) writes `docs/asyncapi.yaml`;
a test fails when the committed document differs from a fresh generation.
Everything in it comes from the code the platform runs:

- the topics: one `<prefix>.<service>.events` per write service of the
  registry (`crm_common.registry`, names by `crm_common.settings.topic_of`),
  the inbound topics other systems publish to (`inbound_topic`), and any
  dead-letter topic the registry declares;
- the messages: one per member of the `payload` oneof of each topic's
  envelope (the envelope a service publishes is `PROTO_MESSAGE` of its
  `events_out` module; an inbound topic `<system>.<name>` carries the one
  envelope of the package `crm.<system>.v1`), with JSON Schemas derived from
  the protobuf descriptors of `proto/` (compiled with their comments, which
  become the descriptions);
- the headers: the names the relay writes (`crm_common.relay`), each with the
  meaning described here; a header without a description stops the generation;
- personal data: each field the .proto marks `(crm.privacy.v1.personal)` has
  `x-personal: true` and says in its description how it travels; each message
  whose event class declares personal data (`PersonalData`, read through the
  service's `events_out` table) lists in `x-sealed` the paths the relay seals
  (`crm_common.privacy.wire`), and each events channel names in
  `x-personal-data-readers` the services that may read its keys (the
  registry). Besides, the fields `crm_common/auth/access.yaml` names as
  personal (pseudonymised) or restricted for a service, matched by path in the
  payloads of that service's topic, are listed per message (`x-personal`,
  `x-restricted`).
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from crm_common import registry
from crm_common.auth.access import DEFAULT_POLICY, AccessPolicy
from crm_common.privacy.client import may_read_keys_of
from crm_common.privacy.mapper import declaration_of
from crm_common.privacy.wire import is_personal, personal_paths
from crm_common.relay import (
    AUDIT_HEADERS,
    PROTOBUF_CONTENT_TYPE,
    audit_headers,
    cloudevent_headers,
)
from crm_common.settings import inbound_topic, topic_of, topic_prefix
from crm_common.telemetry import kafka_headers_with_context

ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "proto"
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
PROTOBUF_SCHEMA_FORMAT = "application/vnd.google.protobuf;version=3"
#: The oneof of every envelope that holds the event itself.
PAYLOAD_ONEOF = "payload"
#: Envelope fields whose value is the Kafka key, by preference; `aggregate_id`
#: stands in when the event is about no customer.
KEY_FIELDS = ("contact_id", "customer_id", "customer_ref")
FALLBACK_KEY_FIELD = "aggregate_id"
#: What a field the contract marks personal says besides its own description.
PERSONAL_FIELD_TEXT = (
    "Personal data (`crm.privacy.v1.personal`). With master keys configured, the relay "
    "publishes it sealed, as `pd1.<subject>.<data>` (AES-256-GCM under the data key of the "
    "subject the event is about), in every message whose `x-sealed` lists it; it opens as "
    '`"[erased]"` once that subject is erased; events published after the erase carry '
    '`"[erased]"` (or an empty value) instead.'
)
#: The last part of a dead-letter topic's name (`erp.orders.dead-letters`).
DEAD_LETTER_NAME = re.compile(r"(^|[.\-_])(dead[.\-_]?letters?|dlq|dlt)$")

#: What each header the relay writes means. The names are not listed here:
#: they come from the relay's own functions (`relay_header_names`).
HEADER_TEXT: dict[str, str] = {
    "ce_specversion": "CloudEvents spec version.",
    "ce_id": (
        "CloudEvents id: `<aggregate id>:<aggregate version>`. Stable when the relay "
        "publishes the event again, so consumers deduplicate by it."
    ),
    "ce_type": "CloudEvents type: `crm.<service>.v1.<payload message name>`.",
    "ce_source": "CloudEvents source: `/crm/<service>`.",
    "ce_subject": "CloudEvents subject: the message key (see the Kafka key of the message).",
    "ce_time": "When the event happened (RFC 3339, UTC).",
    "content-type": (
        "The payload's media type and protobuf message: "
        "`application/protobuf; proto=<envelope full name>`."
    ),
    "crm_position": (
        "Position of the event in the service's event log (decimal). Strictly "
        "increasing per key; consumers deduplicate by it and pass it to the 360 "
        "view's `wait_for` for read-your-writes."
    ),
    "crm_actor": "Who ran the command (the verified caller's subject).",
    "crm_client": "Through which client the command came.",
    "crm_command": "The command that produced the event (e.g. `CreatePerson`).",
    "crm_request_id": "The request id the caller sent (idempotent retries).",
    "traceparent": (
        "W3C Trace Context of the command that produced the event; consumers continue the trace."
    ),
    "tracestate": "W3C Trace Context vendor state, when the trace has one.",
}
#: Headers present only when the event has them (the audit trail of an event a
#: service raised on its own has no request id; trace context only when traced).
OPTIONAL_HEADERS = frozenset({*AUDIT_HEADERS.values(), "traceparent", "tracestate"})
TRACEPARENT_PATTERN = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class ContractError(RuntimeError):
    """The code does not give what the document needs (a missing envelope, ...)."""


# -- the protobuf definitions ---------------------------------------------------------


@dataclass(frozen=True)
class Protos:
    """The compiled `proto/` tree: descriptors and the comments of the sources."""

    pool: descriptor_pool.DescriptorPool
    #: Full name of a message, enum, field (`Message.field`) or enum value -> comment.
    comments: dict[str, str]
    #: The .proto files of proto/ (not the imported well-known types).
    files: tuple[str, ...]

    def message(self, full_name: str) -> Descriptor:
        try:
            return self.pool.FindMessageTypeByName(full_name)
        except KeyError:
            raise ContractError(f"no message {full_name} in proto/") from None

    def messages_of_package(self, package: str) -> list[Descriptor]:
        found: list[Descriptor] = []
        for name in self.files:
            file = self.pool.FindFileByName(name)
            if file.package == package:
                found.extend(file.message_types_by_name.values())
        return found


_RUN_PROTOC = "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv[1:]))"


def compile_protos(root: Path = PROTO_ROOT) -> Protos:
    """Compiles every .proto under `root` with its comments (grpcio-tools' protoc)."""
    if importlib.util.find_spec("grpc_tools") is None:  # pragma: no cover - installed
        raise ContractError(
            "the AsyncAPI document is compiled from proto/ with grpcio-tools "
            "(a development dependency: deploy/install.sh installs it)"
        )
    files = tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*.proto")))
    if not files:
        raise ContractError(f"no .proto files under {root.name}/")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        argv = [
            "protoc",
            f"-I{root}",
            f"-I{well_known}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ]
        # protoc writes its errors to the process's stderr: run it in a child so
        # they are captured and shown with the failure.
        result = subprocess.run(
            [sys.executable, "-c", _RUN_PROTOC, *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ContractError(f"protoc failed:\n{result.stderr}")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    comments: dict[str, str] = {}
    for file in descriptor_set.file:
        pool.AddSerializedFile(file.SerializeToString())
        comments.update(_comments(file))
    return Protos(pool, comments, files)


def _comment(location: descriptor_pb2.SourceCodeInfo.Location) -> str:
    text = location.leading_comments or location.trailing_comments
    lines = [line.strip() for line in text.strip().splitlines()]
    return " ".join(line for line in lines if line)


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Comments by full name, from the file's source locations."""
    by_path = {
        tuple(loc.path): _comment(loc)
        for loc in file.source_code_info.location
        if loc.leading_comments or loc.trailing_comments
    }
    names: dict[str, str] = {}
    prefix = f"{file.package}." if file.package else ""

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full = f"{scope}{e.name}"
        if path in by_path:
            names[full] = by_path[path]
        for i, value in enumerate(e.value):
            if (*path, 2, i) in by_path:
                names[f"{full}.{value.name}"] = by_path[(*path, 2, i)]

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full = f"{scope}{m.name}"
        if path in by_path:
            names[full] = by_path[path]
        for i, field in enumerate(m.field):
            if (*path, 2, i) in by_path:
                names[f"{full}.{field.name}"] = by_path[(*path, 2, i)]
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), f"{full}.")
        for i, nested_enum in enumerate(m.enum_type):
            enum(nested_enum, (*path, 4, i), f"{full}.")

    for i, m in enumerate(file.message_type):
        message(m, (4, i), prefix)
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), prefix)
    return names


# -- JSON Schemas from descriptors --------------------------------------------------

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "uint32", "minimum": 0},
    # The proto3 JSON mapping writes 64-bit integers as decimal strings.
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_FIXED64: {"type": ["string", "integer"], "format": "uint64"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
#: Well-known types in their proto3 JSON form.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "x-proto-message": "google.protobuf.Timestamp",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "x-proto-message": "google.protobuf.Duration",
    },
}


class SchemaBuilder:
    """JSON Schemas (`components.schemas`) of protobuf messages and enums, by full name."""

    def __init__(self, protos: Protos) -> None:
        self.protos = protos
        self.schemas: dict[str, dict[str, Any]] = {}

    @staticmethod
    def ref(full_name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{full_name}"}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        """A reference to the message's schema, adding it (and what it uses) once."""
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursive types end here
            self.schemas[name] = self._message_schema(descriptor)
        return self.ref(name)

    def _message_schema(self, descriptor: Descriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object"}
        if text := self.protos.comments.get(descriptor.full_name):
            schema["description"] = text
        schema["x-proto-message"] = descriptor.full_name
        properties: dict[str, Any] = {}
        for field in sorted(descriptor.fields, key=lambda f: f.number):
            properties[field.name] = self._field(descriptor, field)
        schema["properties"] = properties
        oneofs = {
            o.name: [f.name for f in o.fields]
            for o in descriptor.oneofs
            if not (len(o.fields) == 1 and o.name == f"_{o.fields[0].name}")
        }
        if oneofs:
            schema["x-proto-oneof"] = oneofs
        schema["additionalProperties"] = False
        return schema

    def _field(self, owner: Descriptor, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self._single(value),
            }
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single(field)}
        else:
            schema = self._single(field)
        if "$ref" in schema:
            # Siblings of $ref are ignored by draft-07 validators: wrap it.
            schema = {"allOf": [schema]}
        text = self.protos.comments.get(f"{owner.full_name}.{field.name}", "")
        if is_personal(field):
            text = f"{text} {PERSONAL_FIELD_TEXT}".strip()
        if text:
            schema["description"] = text
        schema["x-proto-field"] = field.number
        if is_personal(field):
            schema["x-personal"] = True
        return schema

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        name = descriptor.full_name
        if name not in self.schemas:
            schema: dict[str, Any] = {"type": "string"}
            if text := self.protos.comments.get(name):
                schema["description"] = text
            schema["enum"] = [v.name for v in descriptor.values]
            schema["x-proto-enum"] = name
            self.schemas[name] = schema
        return self.ref(name)


def field_paths(
    descriptor: Descriptor, prefix: tuple[str, ...] = (), seen: frozenset[str] = frozenset()
) -> Iterator[tuple[str, ...]]:
    """Every field path of a message, through nested messages, lists and map values
    (a message nested in itself is followed once)."""
    seen = seen | {descriptor.full_name}
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        path = (*prefix, field.name)
        yield path
        target = field.message_type
        if target is None or target.full_name in _WELL_KNOWN:
            continue
        if target.GetOptions().map_entry:
            target = target.fields_by_name["value"].message_type
            if target is None or target.full_name in _WELL_KNOWN:
                continue
        if target.full_name not in seen:
            yield from field_paths(target, path, seen)


# -- what the code says about topics -------------------------------------------------


@dataclass(frozen=True)
class Topic:
    """One topic of the contract."""

    #: Channel id in the document (`contacts-events`).
    ident: str
    #: The address with the prefix as a parameter: `{prefix}.contacts.events`.
    address: str
    #: The address under the default prefix: `crm.contacts.events`.
    example: str
    #: "send": the platform publishes; "receive": the platform consumes.
    action: str
    #: The service that publishes (send) or consumes (receive) it.
    service: str
    envelope: Descriptor
    #: `<prefix of ce_type>` + payload message name = the CloudEvents type.
    ce_type_prefix: str
    ce_source: str | None
    kind: str  # "events", "inbound" or "dead-letters"
    #: The name in the registry: `erp.orders` (inbound and dead-letter topics).
    name: str = ""


def _with_prefix_parameter(topic: str) -> str:
    prefix = topic_prefix()
    if not topic.startswith(prefix + "."):
        raise ContractError(f"topic {topic!r} does not start with the prefix {prefix!r}")
    return "{prefix}" + topic[len(prefix) :]


def _example(address: str) -> str:
    return address.replace("{prefix}", "crm")


def _envelope_of_service(protos: Protos, service: str) -> tuple[Descriptor, str]:
    module_name = f"crm_{service}.events_out"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ContractError(
            f"write service {service!r} has no {module_name} (the module that turns its "
            f"stored events into the public messages): {error}"
        ) from None
    full_name = getattr(module, "PROTO_MESSAGE", None)
    if not isinstance(full_name, str):
        raise ContractError(f"{module_name} has no PROTO_MESSAGE (its envelope's full name)")
    ce_prefix = getattr(module, "CE_TYPE_PREFIX", f"crm.{service}.v1.")
    return protos.message(full_name), str(ce_prefix)


def sealed_payloads(service: str) -> set[str]:
    """The payload messages of a write service whose personal fields its relay seals:
    those an event class declaring personal data (`PersonalData`) becomes, by the
    table of its `events_out` module (class -> payload name first)."""
    module_name = f"crm_{service}.events_out"
    module = importlib.import_module(module_name)
    table = getattr(module, "PAYLOADS", None) or getattr(module, "FILLERS", None)
    if not isinstance(table, dict):
        raise ContractError(
            f"{module_name} has no PAYLOADS (or FILLERS) table of event classes and "
            "payload names: which messages carry sealed personal data is unknown"
        )
    return {
        str(entry[0]) for event_class, entry in table.items() if declaration_of(event_class, {})
    }


def key_readers(service: str) -> list[str]:
    """The services that may read a service's data keys: itself and the consumers
    of its topic the registry names (every read by another service is audited)."""
    return [s.name for s in registry.SERVICES if may_read_keys_of(s.name, service)]


def _envelope_of_package(protos: Protos, package: str, topic: str) -> Descriptor:
    candidates = [
        m for m in protos.messages_of_package(package) if PAYLOAD_ONEOF in m.oneofs_by_name
    ]
    if len(candidates) != 1:
        raise ContractError(
            f"topic {topic!r}: expected one message with a `{PAYLOAD_ONEOF}` oneof in "
            f"{package}, found {[m.full_name for m in candidates]}"
        )
    return candidates[0]


def _dead_letter_names(service: registry.Service) -> list[str]:
    declared = list(getattr(service, "dead_letter_topics", ()) or ())
    named = [t for t in service.inbound_topics if DEAD_LETTER_NAME.search(t)]
    return sorted(set(declared + named))


def topics(protos: Protos) -> list[Topic]:
    """Every topic the platform publishes or consumes, from the registry."""
    found: list[Topic] = []
    for entry in registry.SERVICES:
        if entry.writes_events:
            envelope, ce_prefix = _envelope_of_service(protos, entry.name)
            address = _with_prefix_parameter(topic_of(entry.name))
            found.append(
                Topic(
                    ident=f"{entry.name}-events",
                    address=address,
                    example=_example(address),
                    action="send",
                    service=entry.name,
                    envelope=envelope,
                    ce_type_prefix=ce_prefix,
                    ce_source=f"/crm/{entry.name}",
                    kind="events",
                )
            )
        dead = _dead_letter_names(entry)
        for name in entry.inbound_topics:
            if name in dead:
                continue
            system = name.split(".", 1)[0]
            package = f"crm.{system}.v1"
            envelope = _envelope_of_package(protos, package, name)
            address = _with_prefix_parameter(inbound_topic(name))
            found.append(
                Topic(
                    ident=name.replace(".", "-"),
                    address=address,
                    example=_example(address),
                    action="receive",
                    service=entry.name,
                    envelope=envelope,
                    ce_type_prefix=f"{package}.",
                    ce_source=None,
                    kind="inbound",
                    name=name,
                )
            )
        for name in dead:
            source = next(
                (t for t in found if t.kind == "inbound" and name.startswith(t.name + ".")),
                None,
            )
            if source is None:
                raise ContractError(
                    f"dead-letter topic {name!r} of {entry.name} names no inbound topic it "
                    "sets messages aside from"
                )
            address = _with_prefix_parameter(inbound_topic(name))
            found.append(
                Topic(
                    ident=name.replace(".", "-"),
                    address=address,
                    example=_example(address),
                    action="send",
                    service=entry.name,
                    envelope=source.envelope,
                    ce_type_prefix=source.ce_type_prefix,
                    ce_source=None,
                    kind="dead-letters",
                    name=name,
                )
            )
    return found


def payload_members(envelope: Descriptor) -> list[FieldDescriptor]:
    """The event types an envelope carries: the members of its `payload` oneof."""
    oneof = envelope.oneofs_by_name.get(PAYLOAD_ONEOF)
    if oneof is None:
        raise ContractError(f"{envelope.full_name} has no `{PAYLOAD_ONEOF}` oneof")
    return sorted(oneof.fields, key=lambda f: f.number)


def key_field(envelope: Descriptor) -> tuple[str, str | None]:
    """The envelope field whose value is the Kafka key, and the fallback field."""
    for name in KEY_FIELDS:
        if name in envelope.fields_by_name:
            fallback = FALLBACK_KEY_FIELD if FALLBACK_KEY_FIELD in envelope.fields_by_name else None
            return name, fallback
    raise ContractError(f"{envelope.full_name} has none of the key fields {', '.join(KEY_FIELDS)}")


# -- headers ----------------------------------------------------------------------------


def relay_headers() -> list[tuple[str, bytes]]:
    """The headers the relay writes for an event with a full audit trail and a trace,
    built by the relay's own functions."""
    headers = cloudevent_headers(
        ce_id="00000000-0000-0000-0000-000000000000:1",
        ce_type="crm.example.v1.Example",
        source="/crm/example",
        subject="00000000-0000-0000-0000-000000000000",
        time_=datetime(2026, 1, 1, tzinfo=UTC),
        proto_message="crm.events.v1.Example",
        position=1,
    )
    headers += audit_headers({key: key for key in AUDIT_HEADERS})
    span = NonRecordingSpan(
        SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )
    return kafka_headers_with_context(headers, trace.set_span_in_context(span))


def relay_header_names() -> list[str]:
    return [name for name, _ in relay_headers()]


def _header_schema(name: str, topic: Topic) -> dict[str, Any]:
    text = HEADER_TEXT.get(name)
    if text is None:
        raise ContractError(
            f"the relay writes a header {name!r} that the contract does not describe: "
            "add its meaning to crm_deploy.asyncapi.HEADER_TEXT"
        )
    schema: dict[str, Any] = {"type": "string", "description": text}
    if name == "ce_specversion":
        schema["const"] = dict(relay_headers())[name].decode()
    elif name == "ce_source" and topic.ce_source is not None:
        schema["const"] = topic.ce_source
    elif name == "content-type":
        schema["const"] = f"{PROTOBUF_CONTENT_TYPE}; proto={topic.envelope.full_name}"
    elif name == "ce_time":
        schema["format"] = "date-time"
    elif name == "crm_position":
        schema["pattern"] = "^[1-9][0-9]*$"
    elif name == "traceparent":
        schema["pattern"] = TRACEPARENT_PATTERN
    return schema


#: What an inbound topic's publisher sends: CloudEvents binary mode and the trace.
INBOUND_HEADERS: dict[str, str] = {
    "ce_specversion": "CloudEvents spec version: `1.0`.",
    "ce_id": "Unique per message (e.g. the ERP's own message id); kept on a redelivery.",
    "ce_type": "CloudEvents type: `crm.<system>.v1.<payload message name>`.",
    "ce_source": "The publishing system, e.g. `/erp/sap-emea`.",
    "ce_subject": "What the message is about, e.g. the order id (optional).",
    "ce_time": "When it happened in the publishing system (RFC 3339).",
    "content-type": "`application/protobuf; proto=<envelope full name>`.",
    "traceparent": "W3C Trace Context, optional: the platform continues the trace.",
}
INBOUND_OPTIONAL = frozenset({"ce_subject", "ce_time", "traceparent"})
#: What a dead letter carries besides the original record's CloudEvents headers
#: (filled in by the platform for a record parked without them).
DEAD_LETTER_HEADERS: dict[str, str] = {
    "crm_dead_letter_reason": "Why the platform could not apply the message.",
    "crm_parked_key": "The parked entry (order, kind, return), as an operator re-drives it.",
    "crm_parked_kind": (
        "`placed`, `returned`, `cancelled`, or why it could never apply: `refused`, `undecodable`."
    ),
    "crm_parked_at": "When it was parked first (ISO 8601).",
    "crm_source_record": "The inbound record it came from: `<partition>@<offset>`.",
}
DEAD_LETTER_REQUIRED = ("crm_dead_letter_reason",)
#: What a consumer of each kind of topic recognises a repeated message by.
DEDUPLICATE_BY: dict[str, list[str]] = {
    "events": ["ce_id", "crm_position"],
    "inbound": ["the payload's own identity (erp.orders: order_id, payload kind, return_id)"],
    "dead-letters": ["crm_parked_key"],
}


def headers_schema(topic: Topic) -> dict[str, Any]:
    """The headers every message of a topic carries (`ce_type` is fixed per message)."""
    if topic.kind in ("inbound", "dead-letters"):
        properties: dict[str, Any] = {}
        for name, text in INBOUND_HEADERS.items():
            schema: dict[str, Any] = {"type": "string", "description": text}
            if name == "ce_specversion":
                schema["const"] = "1.0"
            elif name == "content-type":
                schema["const"] = f"{PROTOBUF_CONTENT_TYPE}; proto={topic.envelope.full_name}"
            elif name == "ce_time":
                schema["format"] = "date-time"
            elif name == "traceparent":
                schema["pattern"] = TRACEPARENT_PATTERN
            properties[name] = schema
        required = [n for n in INBOUND_HEADERS if n not in INBOUND_OPTIONAL]
        if topic.kind == "dead-letters":
            for name, text in DEAD_LETTER_HEADERS.items():
                properties[name] = {"type": "string", "description": text}
            required += DEAD_LETTER_REQUIRED
    else:
        names = relay_header_names()
        properties = {name: _header_schema(name, topic) for name in names}
        required = [n for n in names if n not in OPTIONAL_HEADERS]
    return {
        "type": "object",
        "description": (
            f"Kafka record headers of {topic.example} (CloudEvents 1.0, Kafka protocol "
            "binding, binary content mode: each attribute is a `ce_` header, the payload "
            "is the record value). Header values are UTF-8 text."
        ),
        "properties": properties,
        "required": required,
    }


# -- personal data --------------------------------------------------------------------


Rule = tuple[str, ...]


def access_rules(section: str, policy: AccessPolicy) -> tuple[set[Rule], set[Rule]]:
    """The personal and the restricted field paths access.yaml names for the data of
    one topic (`section`: the service that publishes it, or the inbound system).

    Personal: the fields some roles get only as pseudonyms (`pseudonymised`);
    restricted: the fields only some roles see (`fields`). A service's own rules
    name paths of its replies, matched as the trailing part of a payload path. A
    read model's rules (the 360 view's, from a service that publishes nothing)
    name paths of its document: one that starts with a topic's service
    (`tickets.open_cases.subject`) marks that topic's fields of the same name
    (`subject`); one that starts with no service applies to every topic, matched
    as a trailing path like a service's own.
    """
    publishers = set(registry.event_sources())
    views = {s.name for s in registry.SERVICES if not s.writes_events}

    def rules(table: dict[str, list[str]]) -> set[Rule]:
        found: set[Rule] = set()
        for owner, paths in table.items():
            for path in paths:
                parts = tuple(path.split("."))
                if owner == section:
                    found.add(parts)
                elif owner in views and parts[0] == section and len(parts) > 1:
                    found.add(parts[-1:])
                elif owner in views and parts[0] not in publishers:
                    found.add(parts)
        return found

    personal = rules(
        {
            owner: [p for _, fields in operations.values() for p in fields]
            for owner, operations in policy.pseudonymised.items()
        }
    )
    restricted = rules({owner: list(fields) for owner, fields in policy.fields.items()})
    return personal, restricted - personal


def matching_paths(member: FieldDescriptor, rules: set[Rule]) -> list[str]:
    """Paths in one payload (from the envelope) whose trailing names are a rule's path."""
    if member.message_type is None:
        return []
    matched = [
        ".".join(path)
        for path in field_paths(member.message_type, (member.name,))
        if any(path[-len(rule) :] == rule for rule in rules)
    ]
    return sorted(matched)


# -- the document -------------------------------------------------------------------------


def _channel_description(topic: Topic, key: str, fallback: str | None, sealed: bool = False) -> str:
    by = f"`{key}`" + (f" (`{fallback}` when that is empty)" if fallback else "")
    if topic.kind == "events":
        text = (
            f"The domain events of the {topic.service} service, published by its relay "
            f"from the service's event log (the log is the outbox: no dual write). "
            f"Key: {by}. Kafka partitions by the key, so one key's events keep their "
            "order; there is no order between keys. Delivery is at least once: after a "
            "crash the relay may publish a suffix again (idempotent producer, acks=all), "
            "so consumers drop an event whose `ce_id` or `crm_position` they already "
            "applied for that key. The topic's name starts with `CRM_TOPIC_PREFIX` "
            "(default `crm`)."
        )
        if sealed:
            text += (
                f" Personal fields (`x-sealed` of each message) are sealed under the data "
                f"keys of the {topic.service} service; `x-personal-data-readers` names "
                "who may open them."
            )
        return text
    if topic.kind == "inbound":
        return (
            f"Published by other systems, consumed by the {topic.service} service "
            f"(`crm-{topic.service} ingest`, one consumer group). Key: {by}, so one "
            "customer's messages keep their order. The platform applies each message's "
            "effect exactly once although delivery may repeat or reorder messages; a "
            "message for a customer the platform does not know yet is parked and "
            "retried, never dropped. The topic's name starts with `CRM_TOPIC_PREFIX` "
            "(default `crm`)."
        )
    return (
        f"Messages of an inbound topic that the {topic.service} service set aside: still "
        "not applicable when it stopped retrying, or never applicable as sent. The "
        "record value is the original message unchanged (bytes that were no message at "
        "all stay as they came, with `crm_parked_kind` `undecodable`), keyed as it was; "
        "the reason is in `crm_dead_letter_reason`. Published at least once. The "
        "topic's name starts with `CRM_TOPIC_PREFIX` (default `crm`)."
    )


def build_document(protos: Protos | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic, as a plain mapping."""
    protos = protos or compile_protos()
    policy = AccessPolicy.load(DEFAULT_POLICY)
    builder = SchemaBuilder(protos)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic in topics(protos):
        envelope_ref = builder.message(topic.envelope)
        headers_name = f"{topic.ident}.headers"
        builder.schemas[headers_name] = headers_schema(topic)
        headers_ref = SchemaBuilder.ref(headers_name)
        key, fallback = key_field(topic.envelope)
        section = topic.service if topic.kind == "events" else topic.name.split(".", 1)[0]
        personal, restricted = access_rules(section, policy)
        sealing = sealed_payloads(topic.service) if topic.kind == "events" else set()
        channel_messages: dict[str, Any] = {}
        for member in payload_members(topic.envelope):
            if member.message_type is None:
                raise ContractError(f"{topic.envelope.full_name}.{member.name} is not a message")
            type_name = member.message_type.name
            ce_type = f"{topic.ce_type_prefix}{type_name}"
            component = f"{topic.ident}.{type_name}"
            builder.message(member.message_type)
            summary = protos.comments.get(member.message_type.full_name)
            message: dict[str, Any] = {
                "name": ce_type,
                "title": type_name,
            }
            if summary:
                message["summary"] = summary
            message["contentType"] = f"{PROTOBUF_CONTENT_TYPE}; proto={topic.envelope.full_name}"
            message["headers"] = {
                "allOf": [
                    headers_ref,
                    {"properties": {"ce_type": {"type": "string", "const": ce_type}}},
                ]
            }
            message["payload"] = {
                "allOf": [
                    envelope_ref,
                    {
                        "required": [member.name],
                        "description": (
                            f"`{topic.envelope.full_name}` with `{member.name}` set "
                            f"(protobuf binary on the wire; this schema is its proto3 JSON "
                            f"form with the .proto field names)."
                        ),
                    },
                ]
            }
            message["bindings"] = {
                "kafka": {
                    "key": {
                        "type": "string",
                        "description": (
                            f"The envelope's `{key}`"
                            + (f", or `{fallback}` when that is empty" if fallback else "")
                            + " (UTF-8)."
                        ),
                    },
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            }
            marked_personal = matching_paths(member, personal)
            marked_restricted = matching_paths(member, restricted)
            if marked_personal:
                message["x-personal"] = marked_personal
            if marked_restricted:
                message["x-restricted"] = marked_restricted
            if type_name in sealing:
                sealed_paths = sorted(
                    path.replace(".*", "")
                    for path in personal_paths(member.message_type, f"{member.name}.")
                )
                if sealed_paths:
                    message["x-sealed"] = sealed_paths
            message["x-proto-message"] = member.message_type.full_name
            messages[component] = message
            channel_messages[type_name] = {"$ref": f"#/components/messages/{component}"}
        channels[topic.ident] = {
            "address": topic.address,
            "title": topic.example,
            "description": _channel_description(
                topic,
                key,
                fallback,
                any(
                    "x-sealed" in messages[ref["$ref"].rsplit("/", 1)[1]]
                    for ref in channel_messages.values()
                ),
            ),
            "parameters": {"prefix": {"$ref": "#/components/parameters/prefix"}},
            "messages": channel_messages,
            "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING_VERSION}},
            "x-key": key,
            "x-ordering": "per key",
            "x-delivery": "at-least-once",
            "x-deduplicate-by": DEDUPLICATE_BY[topic.kind],
            "x-kind": topic.kind,
        }
        if topic.kind == "events":
            channels[topic.ident]["x-personal-data-readers"] = key_readers(topic.service)
        operation = f"{topic.action}-{topic.ident}"
        operations[operation] = {
            "action": topic.action,
            "channel": {"$ref": f"#/channels/{topic.ident}"},
            "title": (
                f"{topic.service} publishes {topic.example}"
                if topic.action == "send"
                else f"{topic.service} consumes {topic.example}"
            ),
            "messages": [
                {"$ref": f"#/channels/{topic.ident}/messages/{name}"} for name in channel_messages
            ],
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "CRM platform events",
            "version": "v1",
            "description": (
                "Every Kafka topic the CRM platform publishes or consumes: domain events of "
                "the write services and the topics partner systems (ERP) publish to. "
                "Payloads are protobuf (proto3, binary) with CloudEvents headers in binary "
                "content mode; the schemas here are derived from the .proto files in "
                "`proto/` (their proto3 JSON form, field numbers in `x-proto-field`). "
                "Personal data leaves sealed: with master keys configured (CRM_MASTER_KEYS), "
                "each field the .proto marks personal (`x-personal: true` here) goes on the "
                "topic as `pd1.<subject>.<data>`, AES-256-GCM under the data key of the "
                "person (or contact) the event is about, in the messages whose `x-sealed` "
                "lists it; ids, amounts, stages, counts and times stay clear, so consumers "
                "without key access can still count and sum. Only the publishing service "
                "and the consumers the registry names for its topic "
                "(`x-personal-data-readers`) may read its keys, and every read by a consumer "
                "is audited (a row in the owner's `privacy_key_access`, a log line). An erase "
                "destroys the person's key: what the topics hold opens as `[erased]` from "
                "then on. "
                "The guide for integrators is docs/events.md. Generated by `make asyncapi` "
                "from the code; do not edit."
            ),
        },
        "defaultContentType": PROTOBUF_CONTENT_TYPE,
        "servers": {
            "local": {
                "host": "127.0.0.1:9092",
                "protocol": "kafka",
                "description": (
                    "The local stack's broker (`deploy/crm up`). Deployments set their "
                    "brokers with CRM_KAFKA_BOOTSTRAP."
                ),
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "parameters": {
                "prefix": {
                    "default": "crm",
                    "description": (
                        "CRM_TOPIC_PREFIX: lets several environments share one Kafka "
                        "cluster (`staging.crm` gives `staging.crm.contacts.events`)."
                    ),
                    "examples": ["crm", "staging.crm"],
                }
            },
            "schemas": dict(sorted(builder.schemas.items())),
            "messages": messages,
        },
    }


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    """Block style, no aliases (every repeated header schema written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(document: dict[str, Any]) -> str:
    text: str = yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )
    return (
        "# The event contract of the CRM platform (AsyncAPI 3.0). Generated by\n"
        "# `make asyncapi` (crm-stack asyncapi --write) from proto/ and the code: do not\n"
        "# edit; tests/test_asyncapi.py fails when it is out of date.\n" + text
    )


def document_text() -> str:
    """The document exactly as `crm-stack asyncapi --write` writes it."""
    return render(build_document())
