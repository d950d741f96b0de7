"""Bootstrap of a service process: gRPC and REST over one application layer.

Every service calls `serve()` with its servicers and its FastAPI app and
gets, in one place: the standard health service and server reflection,
error mapping (see `crm_common.errors`), OpenTelemetry instrumentation of
both protocols, and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from crm_common.commands import Caller
from crm_common.errors import (
    CrmError,
    NotFound,
    RuleViolated,
    Unavailable,
    ValidationFailed,
    VersionConflict,
    WaitTimedOut,
)
from crm_common.settings import Settings

log = logging.getLogger(__name__)

ACTOR_KEY = "x-crm-actor"
CLIENT_KEY = "x-crm-client"


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
    (RuleViolated, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    (WaitTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
]

_HTTP_STATUS: list[tuple[type[CrmError], int]] = [
    (ValidationFailed, 422),
    (NotFound, 404),
    (VersionConflict, 409),
    (RuleViolated, 409),
    (WaitTimedOut, 504),
    (Unavailable, 503),
]


def grpc_status_of(error: CrmError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC status for an error, with google.rpc details where useful."""
    code, numeric = grpc.StatusCode.UNKNOWN, code_pb2.UNKNOWN
    for kind, grpc_code, rpc_code in _GRPC_CODES:
        if isinstance(error, kind):
            code, numeric = grpc_code, rpc_code
            break
    status = status_pb2.Status(code=numeric, message=error.message)
    detail = any_pb2.Any()
    if isinstance(error, ValidationFailed):
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


# grpcio ships no type information, so its base classes are Any to mypy.
class _ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns `CrmError`s raised by unary handlers into rich gRPC statuses."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner(request, context)
            except CrmError as error:
                code, status = grpc_status_of(error)
                await context.abort(
                    code,
                    error.message,
                    trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
                )

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
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


def install_error_handlers(app: FastAPI) -> None:
    """Maps `CrmError`s and request validation to clear HTTP errors."""

    @app.exception_handler(CrmError)
    async def crm_error(_: Request, error: CrmError) -> JSONResponse:
        status = 500
        for kind, http_status in _HTTP_STATUS:
            if isinstance(error, kind):
                status = http_status
                break
        body: dict[str, Any] = {"error": type(error).__name__, "message": error.message}
        if isinstance(error, ValidationFailed):
            body["detail"] = [{"field": e.field, "message": e.message} for e in error.errors]
        if isinstance(error, VersionConflict):
            body["expected_version"] = error.expected
            body["actual_version"] = error.actual
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        detail = []
        for e in error.errors():
            loc = [p for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
            detail.append({"field": field_path(loc), "message": e.get("msg", "")})
        message = "; ".join(f"{d['field']}: {d['message']}" for d in detail)
        return JSONResponse(
            {"error": "ValidationFailed", "message": message, "detail": detail},
            status_code=422,
        )


# -- who is asking ---------------------------------------------------------------


def grpc_caller(
    context: grpc.aio.ServicerContext[Any, Any],
    request_id: str = "",
    expected_version: int = 0,
) -> Caller:
    """The caller of a gRPC request (request id and version from the request message)."""
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return Caller(
        actor=metadata.get(ACTOR_KEY, "anonymous"),
        client=metadata.get(CLIENT_KEY, "grpc"),
        request_id=request_id or None,
        expected_version=expected_version or None,
    )


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
    """The caller of a REST request (`Idempotency-Key` unless the body names a request id)."""
    return Caller(
        actor=request.headers.get(ACTOR_KEY, "anonymous"),
        client=request.headers.get(CLIENT_KEY, "rest"),
        request_id=request_id or request.headers.get("idempotency-key") or None,
        expected_version=expected_version or None,
    )


# -- the process -------------------------------------------------------------------


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


async def serve(
    settings: Settings,
    *,
    grpc_services: Sequence[GrpcService],
    http_app: FastAPI,
    on_stop: Sequence[Callable[[], Any]] = (),
) -> None:
    """Runs gRPC and REST until SIGTERM/SIGINT, then shuts down gracefully."""
    install_error_handlers(http_app)
    FastAPIInstrumentor.instrument_app(http_app, excluded_urls="healthz")

    @http_app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    server = grpc.aio.server(
        # The OpenTelemetry gRPC instrumentation is untyped.
        interceptors=[aio_server_interceptor(), _ErrorInterceptor()],  # type: ignore[no-untyped-call]
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
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
    for service in grpc_services:
        service.add_to_server(service.servicer, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.bind_host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    for name in ["", *names]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    config = uvicorn.Config(
        http_app,
        host=settings.bind_host,
        port=settings.http_port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    http_server = _HttpServer(config)
    loop = asyncio.get_running_loop()

    def request_stop() -> None:
        http_server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    log.info(
        "%s serving gRPC on %s and REST on http://%s:%s",
        settings.service,
        address,
        settings.bind_host,
        settings.http_port,
    )
    try:
        # Returns once SIGTERM/SIGINT asked the HTTP server to stop.
        await http_server.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await health.enter_graceful_shutdown()
        await server.stop(grace=5)
        for stop in on_stop:
            stop()
