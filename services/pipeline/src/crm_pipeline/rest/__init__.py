"""REST adapter for the frontends: the pipeline API as JSON.

One router per resource (`leads`, `pipelines`, `opportunities`,
`activities`, `reports`); request bodies and response models in `models`.
Every write answers `{id, version, position, replayed, <subject>}`;
`Idempotency-Key` makes a write safe to retry (a retry answers the first
outcome, 200 instead of 201, and writes nothing); `If-Match` carries the
version of the command's subject the client last saw (409 when it is stale).

The app starts from `crm_common.server.service_app`: every route is behind the
access gate (a bearer token whose roles `crm_common/auth/access.yaml` lists for
the route's `operation_id`, the name of the gRPC method doing the same), errors
are raised as `CrmError`s and answered as 401 / 403 / 422 / 404 / 409 / 429,
and `/healthz` is served.
"""

from __future__ import annotations

from fastapi import FastAPI

from crm_common.auth.gate import AccessGate
from crm_common.server import service_app
from crm_pipeline.application import PipelineService
from crm_pipeline.rest import activities, leads, opportunities, pipelines, reports

DESCRIPTION = """Leads, pipelines with ordered stages, opportunities (deals) with line items
and stage history, activities, and the forecast, funnel and win rate.

Every write answers `{id, version, position, replayed, <subject>}`. Send
`Idempotency-Key` to make a write safe to retry and `If-Match` with the version
you last saw to refuse lost updates (409). A key reused for a different request
is refused (422) and says nothing of the first.

Every operation needs `Authorization: Bearer <token>`; the token's roles decide
which operations a caller may run (401 without a valid token, 403 for a role
the operation is not open to). The audit trail of every write names the
token's subject and client.

Errors: 422 `{"detail": [{"field", "message"}]}` for invalid input, 404 for
something unknown, 409 for a stale version or a change the rules refuse
(closing a closed deal, changing a closed deal without reopening it).
"""


def create_app(service: PipelineService, gate: AccessGate) -> FastAPI:
    app = service_app(gate, title="CRM pipeline", description=DESCRIPTION)
    app.state.service = service
    for module in (leads, pipelines, opportunities, activities, reports):
        # Included routes get the app's dependencies, the access gate first.
        app.include_router(module.router)
    return app
