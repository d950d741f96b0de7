"""Bootstrap of a service process: gRPC and REST over one application layer.

Every service builds its REST app with `service_app()` and calls `serve()`
with its servicers and that app, and gets, in one place: authentication and
authorization of every call (`crm_common.auth`, docs/security.md), the
standard health service and server reflection, error mapping (see
`crm_common.errors`), TLS and client certificates for gRPC when configured,
OpenTelemetry instrumentation of both protocols, and graceful shutdown on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crm_common.auth.gate import ACTING_USER_KEY, OPEN_GRPC_PREFIXES, AccessGate
from crm_common.auth.http_gate import admission, refusal_headers, secure_openapi
from crm_common.auth.principal import Principal, current_principal
from crm_common.commands import Caller
from crm_common.errors import (
    AlreadyExists,
    CrmError,
    FieldError,
    IdempotencyKeyReused,
    MalformedRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    RuleViolated,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
    VersionConflict,
    WaitTimedOut,
)
from crm_common.health import Dependencies, Dependency, Heartbeat, serve_health
from crm_common.metrics import record_http, rpc_recorder, status_name
from crm_common.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcService:
    """A servicer, the generated function that registers it, and its full name."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    full_name: str


# -- errors on the wire --------------------------------------------------------

_GRPC_CODES: list[tuple[type[CrmError], grpc.StatusCode, int]] = [
    (ValidationFailed, grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    (VersionConflict, grpc.StatusCode.ABORTED, code_pb2.ABORTED),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
    (RuleViolated, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    (WaitTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    (IdempotencyKeyReused, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    (MalformedRequest, grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
]

_HTTP_STATUS: list[tuple[type[CrmError], int]] = [
    (ValidationFailed, 422),
    (NotFound, 404),
    (VersionConflict, 409),
    (RuleViolated, 409),
    (WaitTimedOut, 504),
    (Unavailable, 503),
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (RateLimited, 429),
    (IdempotencyKeyReused, 422),
    (RequestTooLarge, 413),
    (MalformedRequest, 400),
]

#: The largest request body (REST) or message (gRPC) a service accepts, in bytes:
#: `CRM_MAX_REQUEST_BYTES`, 1 MiB by default. A larger one is refused with 413 /
#: RESOURCE_EXHAUSTED before it is read whole.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


def max_request_bytes() -> int:
    value = os.environ.get("CRM_MAX_REQUEST_BYTES", "").strip()
    if not value:
        return DEFAULT_MAX_REQUEST_BYTES
    if not value.isdigit() or int(value) < 1024:
        raise RuntimeError(f"CRM_MAX_REQUEST_BYTES={value!r}: a number of bytes, at least 1024")
    return int(value)


def grpc_status_of(error: CrmError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC status for an error, with google.rpc details where useful."""
    code, numeric = grpc.StatusCode.UNKNOWN, code_pb2.UNKNOWN
    for kind, grpc_code, rpc_code in _GRPC_CODES:
        if isinstance(error, kind):
            code, numeric = grpc_code, rpc_code
            break
    status = status_pb2.Status(code=numeric, message=error.message)
    detail = any_pb2.Any()
    if isinstance(error, MalformedRequest):
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="request", description=error.message
                    )
                ]
            )
        )
        status.details.append(detail)
    elif isinstance(error, ValidationFailed):
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=e.field, description=e.message
                    )
                    for e in error.errors
                ]
            )
        )
        status.details.append(detail)
    elif isinstance(error, NotFound):
        detail.Pack(
            error_details_pb2.ResourceInfo(
                resource_type=error.kind, resource_name=error.ident, description=error.message
            )
        )
        status.details.append(detail)
    elif isinstance(error, AlreadyExists):
        detail.Pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain="crm", metadata=error.metadata()
            )
        )
        status.details.append(detail)
        for thing in error.in_the_way():
            resource = any_pb2.Any()
            resource.Pack(
                error_details_pb2.ResourceInfo(
                    resource_type=thing.kind,
                    resource_name=thing.ident,
                    description=thing.description,
                )
            )
            status.details.append(resource)
    elif isinstance(error, IdempotencyKeyReused):
        # FAILED_PRECONDITION is also a business rule's refusal: the reason tells them apart.
        detail.Pack(error_details_pb2.ErrorInfo(reason="IDEMPOTENCY_KEY_REUSED", domain="crm"))
        status.details.append(detail)
    elif isinstance(error, VersionConflict):
        detail.Pack(
            error_details_pb2.ErrorInfo(
                reason="VERSION_CONFLICT",
                domain="crm",
                metadata={"expected": str(error.expected), "actual": str(error.actual)},
            )
        )
        status.details.append(detail)
    return code, status


def access_gate(settings: Settings) -> AccessGate:
    """The gate of an API process, from its settings (refuses to start without keys)."""
    try:
        return AccessGate.configure(
            settings.service,
            jwks=settings.auth_jwks,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            policy_file=settings.access_policy or None,
            rate=settings.rate_limit_per_client,
            burst=settings.rate_limit_burst or settings.rate_limit_per_client,
        )
    except FileNotFoundError as error:
        raise RuntimeError(
            f"no key set at {settings.auth_jwks} (CRM_AUTH_JWKS): every API needs one to "
            "verify tokens; in the local stack `deploy/crm identity` creates it"
        ) from error


def _certificate_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    names = (context.auth_context() or {}).get("x509_common_name") or ()
    return names[0].decode("utf-8", "replace") if names else None


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The call's text metadata by key (binary values left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _admit_grpc(
    gate: AccessGate,
    operation: str,
    metadata: Mapping[str, str],
    context: grpc.aio.ServicerContext[Any, Any],
    certificates: bool = True,
) -> Principal:
    principal = gate.admit(operation, metadata.get("authorization"), metadata.get(ACTING_USER_KEY))
    certificate = _certificate_name(context) if certificates else None
    if certificate is not None:
        # A partner's identity is the same whether read from its certificate or its token.
        if "partner" in principal.roles and principal.client != certificate:
            raise Unauthenticated(
                f"the token's client {principal.client!r} is not the certificate's {certificate!r}"
            )
        principal = replace(principal, certificate=certificate)
    return principal


# grpcio ships no type information, so its base classes are Any to mypy.
@dataclass(frozen=True)
class _Malformed:
    """What a request's bytes became when they are not a message of the method's type."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, answering `_Malformed` instead of raising: grpcio
    would answer UNKNOWN naming the exception's class."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError, TypeError) as error:
            return _Malformed(str(error)[:200])

    return deserialize


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


async def _abort_with(error: CrmError, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Ends the call with the status of `error` and its google.rpc details."""
    code, status = grpc_status_of(error)
    trailers: list[tuple[str, str | bytes]] = [
        ("grpc-status-details-bin", status.SerializeToString())
    ]
    if isinstance(error, RateLimited):
        trailers.append(("retry-after", str(max(1, round(error.retry_after)))))
    await context.abort(code, error.message, trailing_metadata=tuple(trailers))


def _guarded(
    gate: AccessGate,
    method: str,
    inner: UnaryBehavior,
    *,
    certificates: bool = True,
) -> Callable[..., Awaitable[Any]]:
    """`inner` behind the gate (health and reflection excepted), its `CrmError`s as rich
    statuses, a request that is not a message of the method's type INVALID_ARGUMENT,
    anything else INTERNAL naming an incident. Built once per method, not per call.

    `certificates=False` skips reading a client certificate (a server that asks for
    none); `metadata`, when given, is the call's metadata already read (`_served`
    reads it once for the trace context and the gate)."""
    open_method = method.startswith(OPEN_GRPC_PREFIXES)
    operation = method.rsplit("/", 1)[-1]

    async def guarded(
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        try:
            if not open_method:
                if metadata is None:
                    metadata = _metadata(context)
                principal = _admit_grpc(gate, operation, metadata, context, certificates)
                current_principal.set(principal)
            if isinstance(request, _Malformed):
                raise MalformedRequest(
                    f"the request is not a {operation} request message: "
                    f"{request.error or 'malformed protobuf'}"
                )
            return await inner(request, context)
        except CrmError as error:
            await _abort_with(error, context)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            # Never the exception's text or class on the wire: it may name internals
            # or another customer's data. The log has it, under the trace id.
            incident = _incident_id()
            log.exception("%s failed (incident %s)", method, incident)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

    return guarded


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits every call through the gate (health and reflection excepted) and turns
    `CrmError`s raised by unary handlers into rich gRPC statuses (a request that is
    not a message of the method's type too: INVALID_ARGUMENT).

    For a server built by hand (the adapters' tests); `serve()` wraps each method once
    when it is registered instead (`_ServedMethods`), which costs no interceptor per
    call. The guarded handler of each method is made once and kept here too."""

    def __init__(self, gate: AccessGate) -> None:
        self.gate = gate
        #: Method -> (the behaviour it wrapped, the guarded handler).
        self._handlers: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler.unary_unary:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            _guarded(self.gate, method, handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = (handler.unary_unary, wrapped)
        return wrapped


# -- every method of serve(), wrapped once ------------------------------------------

_tracer = trace.get_tracer("crm_common.server")
#: Status codes that are the server's failure, not the caller's (OpenTelemetry's
#: semantic conventions for gRPC servers): their spans are marked as errors.
_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def _served(
    gate: AccessGate, method: str, handler: grpc.RpcMethodHandler, *, certificates: bool
) -> grpc.RpcMethodHandler:
    """One unary method as `serve()` registers it, built once at start: a server span
    (continuing the caller's `traceparent`), the duration metric by status, the gate
    and the error mapping, all in one coroutine per call.

    This is what the OpenTelemetry gRPC interceptor, the metrics interceptor and
    `AccessInterceptor` did as three interceptors; an interceptor costs the gRPC
    server a coroutine and a new method handler on every call."""
    if handler is None or handler.unary_unary is None:
        return handler
    service, _, operation = method[1:].rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": operation}
    record = rpc_recorder(method)
    guarded = _guarded(gate, method, handler.unary_unary, certificates=certificates)

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        metadata = _metadata(context)
        parent = propagate.extract(metadata) if "traceparent" in metadata else None
        code = "UNKNOWN"
        with _tracer.start_as_current_span(
            method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await guarded(request, context, metadata)
                code = status_name(context.code(), "OK")
                return response
            except grpc.aio.AbortError:
                code = status_name(context.code(), "UNKNOWN")
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                record(code, time.perf_counter() - started)
                if span.is_recording():
                    span.set_attributes(attributes)
                    span.set_attribute("rpc.grpc.status_code", code)
                    if code in _SERVER_ERRORS:
                        span.set_status(trace.StatusCode.ERROR, code)

    return grpc.unary_unary_rpc_method_handler(
        call,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class _ServedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose methods are wrapped by `_served` (once per method)."""

    def __init__(self, inner: Any, wrap: Callable[[str, Any], Any]) -> None:
        self.inner = inner
        self.wrap = wrap
        self._handlers: dict[str, Any] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            found = self.inner.service(handler_call_details)
            if found is None:
                return None
            handler = self._handlers[method] = self.wrap(method, found)
        return handler


class _ServedMethods:
    """The server as a service's generated `add_..._to_server` sees it: each method
    it registers is wrapped once by `_served` before the real server gets it."""

    def __init__(self, server: grpc.aio.Server, wrap: Callable[[str, Any], Any]) -> None:
        self.server = server
        self.wrap = wrap

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_ServedGeneric(h, self.wrap) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.server.add_registered_method_handlers(
            service, {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )


def field_path(loc: Sequence[str | int]) -> str:
    """`("channels", 0, "address")` -> `channels[0].address`: the spelling the domain's
    own field errors use, so a client sees one naming whatever caught the mistake."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def _incident_id() -> str:
    """The trace id of the current span (what an operator searches the logs for)."""
    span = trace.get_current_span().get_span_context()
    return format(span.trace_id, "032x") if span.is_valid else uuid.uuid4().hex


def install_error_handlers(app: FastAPI) -> None:
    """Maps `CrmError`s and request validation to clear HTTP errors; anything else
    to a 500 that names an incident id, never the exception."""

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        incident = _incident_id()
        log.error(
            "%s %s failed (incident %s)",
            request.method,
            request.url.path,
            incident,
            exc_info=error,
        )
        return JSONResponse(
            {"error": "InternalError", "message": f"internal error (incident {incident})"},
            status_code=500,
        )

    @app.exception_handler(CrmError)
    async def crm_error(_: Request, error: CrmError) -> JSONResponse:
        status = 500
        for kind, http_status in _HTTP_STATUS:
            if isinstance(error, kind):
                status = http_status
                break
        body = _error_body(error)
        if isinstance(error, ValidationFailed):
            body["detail"] = [{"field": e.field, "message": e.message} for e in error.errors]
        if isinstance(error, VersionConflict):
            body["expected_version"] = error.expected
            body["actual_version"] = error.actual
        return JSONResponse(body, status_code=status, headers=refusal_headers(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        unparsable = [e for e in error.errors() if e.get("type") == "json_invalid"]
        if unparsable:
            problem = (unparsable[0].get("ctx") or {}).get("error") or "JSON decode error"
            where = [p for p in unparsable[0].get("loc", ()) if isinstance(p, int)]
            malformed = MalformedRequest(
                f"the body is not JSON: {problem}" + (f" at character {where[0]}" if where else "")
            )
            return JSONResponse(_error_body(malformed), status_code=400)
        detail = []
        for e in error.errors():
            loc = [p for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
            detail.append({"field": field_path(loc), "message": e.get("msg", "")})
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
        return JSONResponse(
            {"error": "ValidationFailed", "message": message, "detail": detail},
            status_code=422,
        )

    @app.exception_handler(HTTPException)
    async def http_refusal(request: Request, error: HTTPException) -> JSONResponse:
        # The framework's own refusals (no such route, method, unreadable body), in
        # the platform's shape instead of `{"detail": ...}`.
        status = error.status_code
        text = str(error.detail)
        kind = _HTTP_KINDS.get(status, "RequestRefused")
        if status == 400 and text == "There was an error parsing the body":
            text = "the body is not UTF-8 JSON"
        elif status == 404 and text == "Not Found":
            text = f"no operation at {request.url.path}"
        elif status == 405:
            text = f"{request.method} is not an operation of {request.url.path}"
        body: dict[str, Any] = {"error": kind, "message": text}
        if status in (400, 413):
            body["detail"] = [{"field": "body", "message": text}]
        return JSONResponse(body, status_code=status, headers=error.headers)


_HTTP_KINDS = {
    400: "MalformedRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "RequestTooLarge",
}


# -- who is asking ---------------------------------------------------------------


def _caller(principal: Principal | None, request_id: str | None, version: int | None) -> Caller:
    if principal is None:
        # Only reachable if a route or method escaped the gate: refuse, never guess.
        raise Unauthenticated("the request was not authenticated")
    return Caller(
        actor=principal.actor,
        client=principal.client,
        request_id=request_id or None,
        expected_version=version or None,
        principal=principal,
    )


def grpc_caller(
    context: grpc.aio.ServicerContext[Any, Any],
    request_id: str = "",
    expected_version: int = 0,
) -> Caller:
    """The caller of a gRPC request, as the gate admitted it (request id and version
    from the request message)."""
    return _caller(current_principal.get(), request_id, expected_version)


IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description="The version of the contact, lead, deal or pipeline as the client last "
        'saw it (`3`, `"3"` or `W/"3"`); the write is refused with 409 if it has changed since.',
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="A client-chosen key (at most 200 characters): a retry with the same key "
        "answers the first outcome with `replayed: true` and writes nothing.",
    ),
]


def expected_version(if_match: str | None) -> int | None:
    """The version in an If-Match header: `3`, `"3"` or `W/"3"`; None when absent."""
    if if_match is None or not if_match.strip():
        return None
    value = if_match.strip().removeprefix("W/").strip('"')
    if not value.isdigit() or int(value) < 1:
        raise ValidationFailed.of(
            "If-Match", f'{if_match[:40]!r} is not a version the client saw (e.g. 3 or "3")'
        )
    return int(value)


def http_caller(
    request: Request,
    request_id: str | None = None,
    expected_version: int | None = None,
) -> Caller:
    """The caller of a REST request, as the gate admitted it (`Idempotency-Key` unless
    the body names a request id)."""
    principal = request.scope.get("state", {}).get("principal")
    return _caller(
        principal if isinstance(principal, Principal) else None,
        request_id or request.headers.get("idempotency-key"),
        expected_version,
    )


# -- requests too large or unreadable ----------------------------------------------


def _error_body(error: CrmError) -> dict[str, Any]:
    body: dict[str, Any] = {"error": type(error).__name__, "message": error.message}
    if isinstance(error, AlreadyExists):
        body["error"] = "AlreadyExists"
        body.update(error.body())
    if isinstance(error, MalformedRequest | RequestTooLarge):
        body["detail"] = [{"field": "body", "message": error.message}]
    return body


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413 without reading it whole:
    at once when its Content-Length says so, else as soon as the bytes received
    pass the limit (chunked bodies), before the route parses anything."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        refusal: CrmError | None = None
        if declared is not None:
            if not declared.strip().isdigit():
                refusal = MalformedRequest("the Content-Length header is not a number of bytes")
            elif int(declared) > limit:
                refusal = _too_large(limit)
        if refusal is not None:
            await _send_error(send, refusal)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI answers an HTTPException raised while it reads the body.
                    raise HTTPException(413, _too_large(limit).message)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except HTTPException as error:  # read outside a route: answered here
            if started or error.status_code != 413:
                raise
            await _send_error(send, _too_large(limit))


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body is larger than {limit} bytes")


async def _send_error(send: Send, error: CrmError) -> None:
    status = next((code for kind, code in _HTTP_STATUS if isinstance(error, kind)), 500)
    payload = json.dumps(_error_body(error)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# -- the documented errors ---------------------------------------------------------

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The platform's one error shape; `detail` names each field at fault.",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "The kind, e.g. ValidationFailed"},
        "message": {"type": "string"},
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "expected_version": {"type": "integer", "description": "409 on a stale version"},
        "actual_version": {"type": "integer", "description": "409 on a stale version"},
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def documented_errors(method: str, path: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The error responses an operation can answer, besides 401/403/429 (the gate's)."""
    body = "requestBody" in operation
    params = {p.get("name", "") for p in operation.get("parameters", ())}
    errors = {
        "404": "The addressed entity, or one the request names, does not exist.",
        "422": "The input is invalid (`detail` names each field); nothing was written.",
        "503": "A service or store this one depends on cannot answer; retry later.",
    }
    if body:
        errors["400"] = "The body is not JSON, or not UTF-8; nothing was written."
        errors["413"] = "The body is larger than the service accepts (1 MiB unless configured)."
    if method in ("post", "put", "patch", "delete"):
        errors["409"] = (
            "The version the client saw is stale (`expected_version`, `actual_version`), "
            "or a business rule refuses the change in the entity's current state."
        )
    if any(p.startswith("wait") for p in params):
        errors["504"] = "The read waited for a write it did not see in time."
    return {status: _error_response(text) for status, text in sorted(errors.items())}


def document_errors(app: FastAPI) -> None:
    """Every operation's OpenAPI responses describe the errors it answers, in the
    platform's shape (`Error`), instead of FastAPI's own 422 body."""
    previous = app.openapi

    def document() -> dict[str, Any]:
        if app.openapi_schema is not None and "Error" in app.openapi_schema.get(
            "components", {}
        ).get("schemas", {}):
            return app.openapi_schema
        schema = previous()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = _ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                for status, response in documented_errors(method, path, operation).items():
                    if status == "422" or status not in responses:
                        responses[status] = response
        app.openapi_schema = schema
        return schema

    app.openapi = document  # type: ignore[method-assign]


def _query_names(dependant: Any) -> frozenset[str]:
    """The query parameters a route (and every dependency it has) reads."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


async def refuse_unknown_query(request: Request) -> None:
    """A query parameter the operation does not have is refused (422) rather than
    ignored: `?limt=5` would otherwise answer as if no limit had been asked for."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = getattr(route, "_crm_query_names", None)
    if known is None:
        known = _query_names(dependant)
        route._crm_query_names = known  # type: ignore[union-attr]
    unknown = sorted({name for name in request.query_params if name not in known})
    if unknown:
        raise ValidationFailed(
            [
                FieldError(name[:60], "is not a query parameter of this operation")
                for name in unknown[:10]
            ]
        )


def service_app(gate: AccessGate, *, title: str, description: str, version: str = "1") -> FastAPI:
    """The REST app of a service: every route behind the gate, errors mapped once,
    the bearer scheme and the refusals in the OpenAPI document."""
    app = FastAPI(
        title=title,
        version=version,
        description=description,
        dependencies=[Depends(admission(gate)), Depends(refuse_unknown_query)],
        # `serve()` traces and measures every request itself (`HttpTelemetry`).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=max_request_bytes())
    secure_openapi(app)
    document_errors(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        # 503 while a hard dependency is down (serve() checks them, crm_common.health).
        watch = getattr(request.app.state, "dependencies", None)
        if isinstance(watch, Dependencies) and not watch.serving:
            body = {"status": "unavailable", "reason": watch.heartbeat.last_error}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    return app


# -- the process -------------------------------------------------------------------


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port when a certificate is configured; client certificates
    asked for (`optional`) or required (`require`) when a client CA is given."""
    if not settings.grpc_tls_cert:
        if settings.grpc_client_auth != "none":
            raise RuntimeError("CRM_GRPC_CLIENT_AUTH needs CRM_GRPC_TLS_CERT and _KEY")
        return None
    with open(settings.grpc_tls_cert, "rb") as cert, open(settings.grpc_tls_key, "rb") as key:
        pair = (key.read(), cert.read())
    client_ca = None
    if settings.grpc_client_auth != "none":
        if not settings.grpc_client_ca:
            raise RuntimeError("CRM_GRPC_CLIENT_AUTH needs CRM_GRPC_CLIENT_CA")
        with open(settings.grpc_client_ca, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=client_ca,
        require_client_auth=settings.grpc_client_auth == "require",
    )


#: Allocations between two collections of the youngest generation (Python's default
#: is 700): a command allocates thousands of short-lived objects, most freed by
#: reference counting, so the default collects several times per command.
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Before serving: what the process built at start (the store's connections, a
    service's in-memory indexes, the imported modules) is moved out of the garbage
    collector's sight (`gc.freeze`), and young collections run less often. A full
    collection otherwise walks every long-lived object again, time and again,
    under load."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class HttpTelemetry:
    """ASGI middleware around a service's whole REST app: a server span per request
    (continuing the caller's `traceparent`, named by the route's template once it is
    known) and `crm.http.server.duration` by route template, method and status.

    `serve()` puts it outside the app's error handling, so that the 500 reply's
    incident id is the request's trace id. It replaces the OpenTelemetry FastAPI
    instrumentation (a span for the request and two more for its body and reply)
    and FastAPI's own, which the apps of `service_app` turn off.
    """

    def __init__(self, app: ASGIApp, *, skip: frozenset[str] = frozenset({"/healthz"})) -> None:
        self.app = app
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.skip:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = str(scope.get("method", ""))
        status = 500

        async def noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with _tracer.start_as_current_span(
            method, context=_http_parent(scope), kind=trace.SpanKind.SERVER
        ) as span:
            try:
                await self.app(scope, receive, noted)
            finally:
                template = getattr(scope.get("route"), "path", None)
                record_http(
                    str(template or "unmatched"), method, status, time.perf_counter() - started
                )
                if span.is_recording():
                    if template:
                        span.update_name(f"{method} {template}")
                        span.set_attribute("http.route", str(template))
                    span.set_attribute("http.request.method", method)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.StatusCode.ERROR)


_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def _http_parent(scope: Scope) -> Any:
    """The caller's trace context from the request's headers; None without one."""
    carrier = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in scope.get("headers") or ()
        if k in _TRACE_HEADERS
    }
    return propagate.extract(carrier) if "traceparent" in carrier else None


def _instrument(app: FastAPI) -> None:
    """Wraps the app's whole middleware stack (error handling included) in `HttpTelemetry`."""
    build = app.build_middleware_stack

    def build_with_telemetry() -> ASGIApp:
        return HttpTelemetry(build())

    app.build_middleware_stack = build_with_telemetry  # type: ignore[method-assign]
    app.middleware_stack = None


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling.

    uvicorn re-raises a captured SIGTERM after it returns, which would kill
    the process before the gRPC server drains and the `on_stop` callbacks
    (closing the command bus and the event store) run. `serve()` installs
    the process's signal handlers itself and stops both servers in order.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


# -- worker processes ---------------------------------------------------------------

#: `CRM_API_WORKERS`: how many processes serve one API instance (one pod), all
#: on the same gRPC and REST ports (SO_REUSEPORT: the kernel spreads connections).
WORKERS_VAR = "CRM_API_WORKERS"
#: Set in the extra processes the first one starts: their number (1, 2, ...).
WORKER_INDEX_VAR = "CRM_API_WORKER_INDEX"
MAX_WORKERS = 32


def api_workers() -> int:
    """`CRM_API_WORKERS`, 1 by default (one process)."""
    value = os.environ.get(WORKERS_VAR, "").strip()
    if not value:
        return 1
    if not value.isdigit() or not 1 <= int(value) <= MAX_WORKERS:
        raise RuntimeError(
            f"{WORKERS_VAR}={value!r}: a number of processes from 1 to {MAX_WORKERS}"
        )
    return int(value)


def _start_workers(count: int) -> list[subprocess.Popen[bytes]]:
    """The extra worker processes of this API: the same command line, run again.

    Each builds its own application (its own store connections, its own command
    bus and group commit) and binds the same ports. Only the first process serves
    the health port (`CRM_HEALTH_PORT`): the probes and `/metrics` are its own."""
    workers = []
    for index in range(1, count):
        env = dict(os.environ)
        env[WORKER_INDEX_VAR] = str(index)
        env.pop("CRM_HEALTH_PORT", None)
        workers.append(subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env))
    return workers


async def _stop_workers(workers: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """SIGTERM to every worker, then wait for each to drain and exit (or kill it)."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            await asyncio.to_thread(worker.wait, timeout)
        except subprocess.TimeoutExpired:
            log.error("API worker %d did not stop in %.0f s: killed", worker.pid, timeout)
            worker.kill()


async def _watch_workers(
    workers: list[subprocess.Popen[bytes]], stop: Callable[[str], None]
) -> None:
    """Stops the first process when a worker exits on its own (the pod restarts
    whole, rather than serving on fewer processes than configured); in a worker,
    stops it when the first process is gone."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(1.0)
        for worker in workers:
            if worker.poll() is not None:
                stop(f"API worker {worker.pid} exited with status {worker.returncode}")
                return
        if not workers and os.environ.get(WORKER_INDEX_VAR) and os.getppid() != parent:
            stop("the first API process is gone")
            return


def _shared_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def serve(
    settings: Settings,
    *,
    gate: AccessGate,
    grpc_services: Sequence[GrpcService],
    http_app: FastAPI,
    on_stop: Sequence[Callable[[], Any]] = (),
    dependencies: Sequence[Dependency] = (),
) -> None:
    """Runs gRPC and REST until SIGTERM/SIGINT, then shuts down gracefully.

    `http_app` comes from `service_app(gate, ...)`; the gRPC methods pass the same gate.
    While one of `dependencies` is down, gRPC health says NOT_SERVING and REST
    `/healthz` 503; `settings.health_port`, when set, serves `/healthz`,
    `/readyz` and `/metrics` (crm_common.health).
    """
    workers = api_workers()
    first = not os.environ.get(WORKER_INDEX_VAR)
    settle_heap()
    _instrument(http_app)
    watch = Dependencies(
        Heartbeat(f"{settings.service} api", stale_after=settings.health_stale_after),
        dependencies,
    )
    http_app.state.dependencies = watch

    # No interceptors: each method is wrapped once as it is registered (`_served`).
    server = grpc.aio.server(
        options=[
            # Larger messages are refused with RESOURCE_EXHAUSTED, unread.
            ("grpc.max_receive_message_length", max_request_bytes()),
            # One process per port, unless several workers share it on purpose.
            ("grpc.so_reuseport", 1 if workers > 1 else 0),
            # Clients reconnect (and resolve the replicas again) every few
            # minutes, so replicas added since get their share of long-lived
            # channels; calls in flight get a minute to finish, more than the
            # longest wait a read may ask for (30 s).
            ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", 60_000),
        ],
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [s.full_name for s in grpc_services]
    certificates = settings.grpc_client_auth != "none"
    methods = _ServedMethods(
        server, lambda method, h: _served(gate, method, h, certificates=certificates)
    )
    for service in grpc_services:
        service.add_to_server(service.servicer, methods)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.bind_host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()

    async def set_health(serving: bool) -> None:
        reply = health_pb2.HealthCheckResponse
        for name in ["", *names]:
            await health.set(name, reply.SERVING if serving else reply.NOT_SERVING)

    await set_health(await watch.check_once())
    stopped = asyncio.Event()
    watching = asyncio.create_task(watch.watch(stopped, on_change=set_health))
    ops = contextlib.AsyncExitStack()
    await ops.enter_async_context(
        serve_health(watch.heartbeat, host=settings.bind_host, port=settings.health_port)
    )

    config = uvicorn.Config(
        http_app,
        host=settings.bind_host,
        port=settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    http_server = _HttpServer(config)
    sockets = [_shared_socket(settings.bind_host, settings.http_port)] if workers > 1 else None
    loop = asyncio.get_running_loop()
    failure: list[str] = []

    def request_stop() -> None:
        http_server.should_exit = True

    def fail(reason: str) -> None:
        log.error("%s: stopping", reason)
        failure.append(reason)
        request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    extra = _start_workers(workers) if first and workers > 1 else []
    supervising = asyncio.create_task(_watch_workers(extra, fail)) if workers > 1 else None
    log.info(
        "%s serving gRPC on %s and REST on http://%s:%s%s",
        settings.service,
        address,
        settings.bind_host,
        settings.http_port,
        f" (worker {os.environ.get(WORKER_INDEX_VAR) or 0} of {workers})" if workers > 1 else "",
    )
    try:
        # Returns once SIGTERM/SIGINT asked the HTTP server to stop.
        await http_server.serve(sockets=sockets)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if supervising is not None:
            supervising.cancel()
        stopping_workers = asyncio.create_task(_stop_workers(extra))
        stopped.set()
        await watching
        await ops.aclose()
        await health.enter_graceful_shutdown()
        await server.stop(grace=5)
        for stop in on_stop:
            stop()
        await stopping_workers
    if failure:
        raise RuntimeError(failure[0])
