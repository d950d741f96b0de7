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
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from crm_common.auth.gate import ACTING_USER_KEY, OPEN_GRPC_PREFIXES, AccessGate
from crm_common.auth.http_gate import admission, refusal_headers, secure_openapi
from crm_common.auth.principal import Principal, current_principal
from crm_common.commands import Caller
from crm_common.errors import (
    CrmError,
    IdempotencyKeyReused,
    NotFound,
    PermissionDenied,
    RateLimited,
    RuleViolated,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
    VersionConflict,
    WaitTimedOut,
)
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
    (RuleViolated, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    (WaitTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    (IdempotencyKeyReused, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
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


def _admit_grpc(
    gate: AccessGate, method: str, context: grpc.aio.ServicerContext[Any, Any]
) -> Principal:
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    principal = gate.admit(
        method.rsplit("/", 1)[-1], metadata.get("authorization"), metadata.get(ACTING_USER_KEY)
    )
    certificate = _certificate_name(context)
    if certificate is not None:
        # A partner's identity is the same whether read from its certificate or its token.
        if "partner" in principal.roles and principal.client != certificate:
            raise Unauthenticated(
                f"the token's client {principal.client!r} is not the certificate's {certificate!r}"
            )
        principal = replace(principal, certificate=certificate)
    return principal


# grpcio ships no type information, so its base classes are Any to mypy.
class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits every call through the gate (health and reflection excepted) and turns
    `CrmError`s raised by unary handlers into rich gRPC statuses."""

    def __init__(self, gate: AccessGate) -> None:
        self.gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        open_method = method.startswith(OPEN_GRPC_PREFIXES)
        inner = handler.unary_unary
        gate = self.gate

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if not open_method:
                    current_principal.set(_admit_grpc(gate, method, context))
                return await inner(request, context)
            except CrmError as error:
                code, status = grpc_status_of(error)
                trailers: list[tuple[str, str | bytes]] = [
                    ("grpc-status-details-bin", status.SerializeToString())
                ]
                if isinstance(error, RateLimited):
                    trailers.append(("retry-after", str(max(1, round(error.retry_after)))))
                await context.abort(code, error.message, trailing_metadata=tuple(trailers))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if isinstance(error, grpc.aio.AbortError):
                    raise
                # Never the exception's text or class on the wire: it may name internals
                # or another customer's data. The log has it, under the trace id.
                incident = _incident_id()
                log.exception("%s failed (incident %s)", method, incident)
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"
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
        body: dict[str, Any] = {"error": type(error).__name__, "message": error.message}
        if isinstance(error, ValidationFailed):
            body["detail"] = [{"field": e.field, "message": e.message} for e in error.errors]
        if isinstance(error, VersionConflict):
            body["expected_version"] = error.expected
            body["actual_version"] = error.actual
        return JSONResponse(body, status_code=status, headers=refusal_headers(error))

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


def service_app(gate: AccessGate, *, title: str, description: str, version: str = "1") -> FastAPI:
    """The REST app of a service: every route behind the gate, errors mapped once,
    the bearer scheme and the refusals in the OpenAPI document."""
    app = FastAPI(
        title=title,
        version=version,
        description=description,
        dependencies=[Depends(admission(gate))],
    )
    install_error_handlers(app)
    secure_openapi(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

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
    gate: AccessGate,
    grpc_services: Sequence[GrpcService],
    http_app: FastAPI,
    on_stop: Sequence[Callable[[], Any]] = (),
) -> None:
    """Runs gRPC and REST until SIGTERM/SIGINT, then shuts down gracefully.

    `http_app` comes from `service_app(gate, ...)`; the gRPC methods pass the same gate.
    """
    FastAPIInstrumentor.instrument_app(http_app, excluded_urls="healthz")

    server = grpc.aio.server(
        # The OpenTelemetry gRPC instrumentation is untyped.
        interceptors=[aio_server_interceptor(), AccessInterceptor(gate)],  # type: ignore[no-untyped-call]
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
    credentials = server_credentials(settings)
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
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
