"""Every bad input gets the platform's one error shape, over REST and gRPC, and
writes nothing.

REST: `{error, message, detail: [{field, message}]}` with a 4xx status (400 for a
body that cannot be parsed, 413 for one over the limit, 422 for invalid values);
gRPC: INVALID_ARGUMENT (RESOURCE_EXHAUSTED for a message over the limit) with
google.rpc details. Never a 5xx, never an internal class name. Against the
running platform (every API process of the local stack).
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2
from psycopg.sql import SQL, Identifier

from crm.contacts.v1 import contacts_pb2
from crm.pipeline.v1 import pipeline_pb2
from crm_common.registry import SERVICES
from crm_common.server import DEFAULT_MAX_REQUEST_BYTES

API_SERVICES = [s.name for s in SERVICES if "api" in s.roles]
#: The APIs that take request bodies (analytics only answers reads).
WRITE_SERVICES = [s for s in API_SERVICES if s != "analytics"]
#: Words that would give away the implementation behind an error.
INTERNAL_WORDS = ("<class", "Error'>", "DecodeError", "decimal.", "Overflow", "Traceback")


def addresses(platform: Any, service: str) -> tuple[str, str]:
    grpc_port, http_port = platform.stack.config.service_ports[service]
    return f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"


def stored_events(platform: Any, service: str) -> int:
    """How many events the service's event store holds (read beside the service:
    the platform's write services store in PostgreSQL, a schema each)."""
    with psycopg.connect(**platform.postgres.connect_kwargs()) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (service,),
            )
            if name.endswith("_events") and "snapshot" not in name
        ]
        assert len(tables) == 1, f"the event table of {service} among {tables}"
        row = conn.execute(
            SQL("SELECT COUNT(*) FROM {}.{}").format(Identifier(service), Identifier(tables[0]))
        ).fetchone()
    assert row is not None
    return int(row[0])


def assert_error_shape(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, (reply.status_code, reply.text[:300])
    body = reply.json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    for item in body.get("detail", []):
        assert set(item) == {"field", "message"}, item
    assert not any(word in reply.text for word in INTERNAL_WORDS), reply.text[:300]
    return dict(body)


def a_write_operation(platform: Any, service: str, *, or_read: bool = False) -> tuple[str, str]:
    """(method, path) of an operation with a JSON body and no path parameter (or of
    any operation, if `or_read` and there is none: the body limit holds for every request)."""
    _, http = addresses(platform, service)
    document = httpx.get(f"{http}/openapi.json", timeout=10).json()
    for path, operations in sorted(document["paths"].items()):
        for method, operation in operations.items():
            if "requestBody" in operation and "{" not in path:
                return method.upper(), path
    if or_read:
        path, operations = sorted(document["paths"].items())[0]
        return next(iter(operations)).upper(), path
    raise AssertionError(f"{service} has no write operation")


@pytest.fixture
def admin(platform: Any) -> dict[str, str]:
    return dict(platform.headers("admin", "error-contract"))


@pytest.fixture
def written(platform: Any) -> Iterator[Any]:
    """Asserts, after the test, that nothing was stored in the services it names."""
    watched: dict[str, int] = {}

    def watch(*services: str) -> None:
        for service in services:
            watched[service] = stored_events(platform, service)

    yield watch
    for service, before in watched.items():
        assert stored_events(platform, service) == before, f"{service} stored something"


# -- REST: bodies that cannot be parsed, or are too large -------------------------------


@pytest.mark.parametrize("service", WRITE_SERVICES)
def test_malformed_json_and_invalid_utf8_get_400_in_the_error_shape(
    platform: Any, admin: dict[str, str], service: str
) -> None:
    method, path = a_write_operation(platform, service)
    _, http = addresses(platform, service)
    headers = {**admin, "content-type": "application/json"}
    for content in (b'{"given_name": "Ada", ', b'{"name": "\xff\xfe"}', b"\x00\x01"):
        reply = httpx.request(method, f"{http}{path}", content=content, headers=headers)
        body = assert_error_shape(reply, 400)
        assert body["error"] == "MalformedRequest"
        assert body["detail"] == [{"field": "body", "message": body["message"]}]


@pytest.mark.parametrize("service", API_SERVICES)
def test_a_body_over_the_limit_gets_413_without_being_read_whole(
    platform: Any, admin: dict[str, str], service: str
) -> None:
    method, path = a_write_operation(platform, service, or_read=True)
    _, http = addresses(platform, service)
    headers = {**admin, "content-type": "application/json"}
    big = b'{"tags": ["' + b"x" * (DEFAULT_MAX_REQUEST_BYTES + 10) + b'"]}'
    body = assert_error_shape(
        httpx.request(method, f"{http}{path}", content=big, headers=headers, timeout=30), 413
    )
    assert body["error"] == "RequestTooLarge"

    # Announced as 10 GB: refused on the header alone (nothing like it is sent).
    status, text = announce_and_send(http, method, path, admin, 10**10, b"{}")
    assert status == 413 and b"RequestTooLarge" in text

    if service not in WRITE_SERVICES:
        return  # its routes never read a body; the length check above is what holds
    # Chunked, with no length announced: refused once the limit is passed, long
    # before the 16 MiB the client is ready to send.
    status, text, sent = send_chunked(http, method, path, admin, chunks=64, size=256 * 1024)
    assert status == 413 and b"RequestTooLarge" in text
    assert sent < 64


@pytest.mark.parametrize("service", API_SERVICES)
def test_unknown_routes_and_methods_answer_in_the_error_shape(
    platform: Any, admin: dict[str, str], service: str
) -> None:
    _, http = addresses(platform, service)
    assert (
        assert_error_shape(httpx.get(f"{http}/no-such-thing", headers=admin), 404)["error"]
        == "NotFound"
    )
    method, path = a_write_operation(platform, service, or_read=True)
    other = "PUT" if method != "PUT" else "POST"
    reply = httpx.request(other, f"{http}{path}", headers=admin, json={})
    if reply.status_code == 405:
        assert_error_shape(reply, 405)


def announce_and_send(
    http: str, method: str, path: str, headers: dict[str, str], length: int, body: bytes
) -> tuple[int, bytes]:
    """Sends a request whose Content-Length says `length`, then only `body`; the
    status and body of the answer (an HTTP client would refuse to do this)."""
    host, port = http.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + ["content-type: application/json"]
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, text = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), text


def send_chunked(
    http: str, method: str, path: str, headers: dict[str, str], *, chunks: int, size: int
) -> tuple[int, bytes, int]:
    """Streams a chunked JSON body until the server answers; (status, body, chunks sent)."""
    host, port = http.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", "transfer-encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + ["content-type: application/json"]
    answer, sent = b"", 0
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        connection.sendall(b"b\r\n" + b'{"tags": ["' + b"\r\n")
        connection.setblocking(False)
        for _ in range(chunks):
            with contextlib.suppress(BlockingIOError):
                answer += connection.recv(65536)
            if answer:
                break
            connection.setblocking(True)
            try:
                connection.sendall(f"{size:x}\r\n".encode() + b"x" * size + b"\r\n")
            except OSError:
                break  # closed by the server after its answer
            connection.setblocking(False)
            sent += 1
            time.sleep(0.01)
        connection.setblocking(True)
        while b"\r\n\r\n" not in answer or b"RequestTooLarge" not in answer:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, text = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), text, sent


def test_a_query_parameter_the_operation_does_not_have_is_refused(
    platform: Any, admin: dict[str, str]
) -> None:
    _, http = addresses(platform, "contacts")
    assert httpx.get(f"{http}/contacts", params={"page_size": 5}, headers=admin).status_code == 200
    reply = httpx.get(f"{http}/contacts", params={"page_sise": 5}, headers=admin)
    body = assert_error_shape(reply, 422)
    assert body["detail"] == [
        {"field": "page_sise", "message": "is not a query parameter of this operation"}
    ]


# -- REST and gRPC: values out of range --------------------------------------------------

HUGE_NUMBERS = ["1e1000000", "-9e999998", "1e-999999", "1e999999999999999999999"]


def test_contacts_number_custom_fields_out_of_range_are_refused(
    platform: Any, admin: dict[str, str], written: Any
) -> None:
    written("contacts")
    _, http = addresses(platform, "contacts")
    for value in HUGE_NUMBERS:
        reply = httpx.post(
            f"{http}/persons",
            headers=admin,
            json={
                "given_name": "Ada",
                "family_name": "Lovelace",
                "custom_fields": {"score": {"type": "number", "value": value}},
            },
        )
        body = assert_error_shape(reply, 422)
        assert any("score" in d["field"] for d in body["detail"]), body


async def test_contacts_grpc_refuses_numbers_out_of_range(platform: Any, written: Any) -> None:
    written("contacts")
    async with platform.channel(platform.contacts_grpc, "admin", "error-contract") as channel:
        stub = contacts_pb2_grpc_stub(channel)
        for value in HUGE_NUMBERS:
            request = contacts_pb2.CreatePersonRequest(given_name="Ada", family_name="Lovelace")
            request.custom_fields["score"].type = "number"
            request.custom_fields["score"].value = value
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreatePerson(request)
            assert_invalid_argument(caught.value, "score")


def contacts_pb2_grpc_stub(channel: grpc.aio.Channel) -> Any:
    from crm.contacts.v1 import contacts_pb2_grpc

    return contacts_pb2_grpc.ContactsServiceStub(channel)


def assert_invalid_argument(error: grpc.aio.AioRpcError, field: str | None = None) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert not any(word in (error.details() or "") for word in INTERNAL_WORDS), error.details()
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, "no google.rpc status details"
    status = status_pb2.Status.FromString(raw)
    bad = error_details_pb2.BadRequest()
    assert status.details and status.details[0].Unpack(bad)
    if field is not None:
        assert any(field in v.field for v in bad.field_violations), bad


AMOUNTS = ["1e30", "1" * 29, "1e1000000", "0.0000000000000000000000000001", "9" * 40]


def test_pipeline_money_out_of_range_is_refused(
    platform: Any, admin: dict[str, str], written: Any
) -> None:
    written("pipeline")
    _, http = addresses(platform, "pipeline")
    for amount in AMOUNTS:
        reply = httpx.post(
            f"{http}/opportunities",
            headers=admin,
            json={
                "pipeline_id": str(uuid.uuid4()),
                "name": "Overflow",
                "customer_id": str(uuid.uuid4()),
                "owner": "error-contract",
                "expected_close_date": "2099-01-01",
                "amount": {"amount": amount, "currency": "EUR"},
            },
        )
        body = assert_error_shape(reply, 422)
        assert any("amount" in d["field"] for d in body["detail"]), body


async def test_pipeline_grpc_refuses_money_out_of_range(platform: Any, written: Any) -> None:
    from crm.pipeline.v1 import pipeline_pb2_grpc

    written("pipeline")
    async with platform.channel(platform.pipeline_grpc, "admin", "error-contract") as channel:
        stub = pipeline_pb2_grpc.PipelineServiceStub(channel)
        for amount in AMOUNTS:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.OpenOpportunity(
                    pipeline_pb2.OpenOpportunityRequest(
                        pipeline_id=str(uuid.uuid4()),
                        name="Overflow",
                        customer_id=str(uuid.uuid4()),
                        owner="error-contract",
                        expected_close_date="2099-01-01",
                        amount=pipeline_pb2.Money(amount=amount, currency="EUR"),
                    )
                )
            assert_invalid_argument(caught.value, "amount")


def test_wait_positions_out_of_range_are_refused_at_once(
    platform: Any, admin: dict[str, str]
) -> None:
    _, http = addresses(platform, "analytics")
    for position in ("9223372036854775808", "-1", "1e3", "99999999999999999999999"):
        reply = httpx.get(
            f"{http}/customers/{uuid.uuid4()}/360",
            params={"wait_for": f"contacts:{position}"},
            headers=admin,
            timeout=10,
        )
        body = assert_error_shape(reply, 422)
        assert any("wait_for" in d["field"] for d in body["detail"]), body


# -- gRPC: bytes that are no message, messages over the limit ---------------------------


async def raw_call(address: str, method: str, payload: bytes, metadata: Any) -> Any:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        call = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(payload, metadata=metadata, timeout=30)
    return caught.value


@pytest.mark.parametrize("service", API_SERVICES)
async def test_malformed_protobuf_gets_invalid_argument_naming_no_class(
    platform: Any, service: str
) -> None:
    address, _ = addresses(platform, service)
    metadata = platform.metadata("admin", "error-contract")
    methods = await served_methods(address)
    assert methods, f"{service} serves no method"
    for method in methods:
        # A field 1 of wire type 2 claiming more bytes than follow; then a bad tag.
        for payload in (b"\x0a\xff\xff\xff\x0f", b"\xff\xff\xff\xff\xff"):
            error = await raw_call(address, method, payload, metadata)
            assert_invalid_argument(error)


async def served_methods(address: str) -> list[str]:
    import importlib
    import pkgutil

    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    import crm

    for module in pkgutil.walk_packages(crm.__path__, "crm."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names: list[str] = []
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = [s.name for s in reply.list_services_response.service]
            break
    return [
        f"/{name}/{m.name}"
        for name in names
        if name.startswith("crm.")
        for m in descriptor_pool.Default().FindServiceByName(name).methods
    ]


async def test_a_string_field_that_is_not_utf8_gets_invalid_argument(
    platform: Any, written: Any
) -> None:
    written("contacts")
    # Field 2 of CreatePersonRequest (given_name, a string) holding bytes no UTF-8 text has.
    error = await raw_call(
        platform.contacts_grpc,
        "/crm.contacts.v1.ContactsService/CreatePerson",
        b"\x12\x02\xff\xfe\x1a\x08Lovelace",
        platform.metadata("admin", "error-contract"),
    )
    assert_invalid_argument(error, "request")


async def test_a_grpc_message_over_the_limit_gets_resource_exhausted(
    platform: Any, written: Any
) -> None:
    written("contacts")
    request = contacts_pb2.CreatePersonRequest(
        given_name="Ada", family_name="Lovelace", tags=["x" * 1024] * 1100
    )
    assert request.ByteSize() > DEFAULT_MAX_REQUEST_BYTES
    error = await raw_call(
        platform.contacts_grpc,
        "/crm.contacts.v1.ContactsService/CreatePerson",
        request.SerializeToString(),
        platform.metadata("admin", "error-contract"),
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_openapi_documents_describe_the_errors_in_the_platform_shape(
    platform: Any,
) -> None:
    for service in API_SERVICES:
        _, http = addresses(platform, service)
        document = httpx.get(f"{http}/openapi.json", timeout=10).json()
        schemas = document["components"]["schemas"]
        assert set(schemas["Error"]["required"]) == {"error", "message"}
        assert "HTTPValidationError" not in schemas
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                responses = operation["responses"]
                shape = responses["422"]["content"]["application/json"]["schema"]
                assert shape == {"$ref": "#/components/schemas/Error"}, (service, path)
                assert {"404", "503"} <= set(responses), (service, method, path)
                if "requestBody" in operation:
                    assert {"400", "413"} <= set(responses), (service, method, path)
