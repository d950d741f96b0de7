"""The gate on the REST side: a dependency of every route of a service's app.

It admits the caller for the route's `operation_id` (the same name the gRPC
method has) before the route reads anything, and leaves the principal in the
request state and in `current_principal`. Refusals are the JSON errors of
every other refusal (`crm_common.server`): 401 with `WWW-Authenticate:
Bearer`, 403, or 429 with `Retry-After`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi

from crm_common.auth.gate import ACTING_USER_KEY, OPEN_HTTP_PATHS, AccessGate
from crm_common.auth.principal import current_principal
from crm_common.errors import CrmError, PermissionDenied, RateLimited, Unauthenticated


def admission(gate: AccessGate) -> Callable[[Request], Awaitable[None]]:
    """The dependency every route of a service's app runs before anything else (even
    before its body is read): the caller admitted for the route's `operation_id` (the
    same name as the gRPC method), left in the request state and `current_principal`.
    A route without an operation id in the policy is open to no one."""

    # Async, so that the principal set here is the one the endpoint sees.
    async def admit(request: Request) -> None:
        if request.scope.get("path") in OPEN_HTTP_PATHS:
            return
        route = request.scope.get("route")
        operation = getattr(route, "operation_id", None) or ""
        if not operation:
            raise PermissionDenied("this route is not open to any role")
        principal = gate.admit(
            operation,
            request.headers.get("authorization"),
            request.headers.get(ACTING_USER_KEY),
        )
        request.scope.setdefault("state", {})["principal"] = principal
        current_principal.set(principal)

    return admit


def refusal_headers(error: CrmError) -> dict[str, str]:
    """`WWW-Authenticate` for 401, `Retry-After` for 429."""
    if isinstance(error, Unauthenticated):
        description = error.message.replace('"', "'")
        return {
            "www-authenticate": (
                f'Bearer realm="crm", error="invalid_token", error_description="{description}"'
            )
        }
    if isinstance(error, RateLimited):
        return {"retry-after": str(max(1, math.ceil(error.retry_after)))}
    return {}


_REFUSALS: dict[str, Any] = {
    "401": {"description": "No valid bearer token (see `WWW-Authenticate`).",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}}}},
    "403": {"description": "The caller's roles may not run this operation.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}}}},
    "429": {"description": "Too many requests from this client; see `Retry-After`.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}}}},
}  # fmt: skip


def secure_openapi(app: FastAPI) -> None:
    """The OpenAPI document states the bearer scheme and the refusals of every operation."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
        }
        components.setdefault("schemas", {})["Refusal"] = {
            "type": "object",
            "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        }
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_HTTP_PATHS:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]
                for status, response in _REFUSALS.items():
                    operation.setdefault("responses", {}).setdefault(status, response)
        app.openapi_schema = schema
        return schema

    app.openapi = document  # type: ignore[method-assign]
