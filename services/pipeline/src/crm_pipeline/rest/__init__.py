"""REST adapter for the frontends: the pipeline API as JSON.

One router per resource (`leads`, `pipelines`, `opportunities`,
`activities`, `reports`); request bodies and response models in `models`.
Every write answers `{id, version, position, replayed, <subject>}`;
`Idempotency-Key` makes a write safe to retry (a retry answers the first
outcome, 200 instead of 201, and writes nothing); `If-Match` carries the
version of the command's subject the client last saw (409 when it is stale).

Errors are raised as `CrmError`s; `crm_common.server.install_error_handlers`
(installed by `serve()`) turns them into 422 / 404 / 409.
"""

from __future__ import annotations

from fastapi import FastAPI

from crm_pipeline.application import PipelineService
from crm_pipeline.rest import activities, leads, opportunities, pipelines, reports

DESCRIPTION = """Leads, pipelines with ordered stages, opportunities (deals) with line items
and stage history, activities, and the forecast, funnel and win rate.

Every write answers `{id, version, position, replayed, <subject>}`. Send
`Idempotency-Key` to make a write safe to retry and `If-Match` with the version
you last saw to refuse lost updates (409). `x-crm-actor` and `x-crm-client` name
who writes, through which client.

Errors: 422 `{"detail": [{"field", "message"}]}` for invalid input, 404 for
something unknown, 409 for a stale version or a change the rules refuse
(closing a closed deal, changing a closed deal without reopening it).
"""


def create_app(service: PipelineService) -> FastAPI:
    app = FastAPI(title="CRM pipeline", version="1", description=DESCRIPTION)
    app.state.service = service
    for module in (leads, pipelines, opportunities, activities, reports):
        app.include_router(module.router)
    return app
