"""REST routes of CSV imports (`crm_contacts.import_jobs`): upload a file with
its column mapping, follow the job's progress, download its failed rows.

Only REST: a file of up to 200 MiB is an HTTP upload streamed to disk, not a
gRPC message. The file is the request body itself (`text/csv`), the mapping a
JSON query parameter, so the upload is streamed without a form parser.

The app-wide request body limit (`CRM_MAX_REQUEST_BYTES`, 1 MiB by default)
would refuse any real file, so `include_imports` gives `POST /imports` the
import's own limit (`import_jobs.MAX_FILE_BYTES`) and leaves every other
route's as it was.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from crm_common.errors import ValidationFailed
from crm_common.server import BodyLimit, http_caller
from crm_contacts.application import ContactsService
from crm_contacts.import_jobs import ImportJobs, ImportView, JobState, Outcome, RowResult
from crm_contacts.imports import ColumnMapping, MappingRefused

#: Content types an upload may declare (a spreadsheet's CSV export, or none in particular).
CSV_TYPES = frozenset({"text/csv", "application/csv", "text/plain", "application/octet-stream"})
MAX_FAILURES_PAGE = 1000


class ImportProgress(BaseModel):
    line: int = Field(description="The last line of the file done (with every line before it).")
    rows_done: int
    created: int
    updated: int
    unchanged: int = Field(description="Matched contacts the row would not change: no event.")
    skipped: int = Field(description="Rows an earlier run of the same file imported already.")
    failed: int


class FailedRow(BaseModel):
    line: int = Field(description="The row's line in the file (the header is line 1).")
    reason: str
    cells: dict[str, str] = Field(description="The row's mapped cells, by column.")


class ImportReply(BaseModel):
    id: str
    kind: str
    state: str = Field(description=f"One of: {', '.join(JobState)}.")
    dry_run: bool
    file_name: str
    size: int = Field(description="Bytes.")
    digest: str = Field(description="Of the file and the mapping: the same for a re-run.")
    columns: dict[str, str]
    match_on: str
    progress: ImportProgress
    error: str = Field(description="Why a failed job stopped (bad rows never stop a job).")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    failures: list[FailedRow] = Field(
        description="A dry run's first failed rows; every one is in `/imports/{id}/failures`."
    )


class FailurePage(BaseModel):
    failures: list[FailedRow]
    next_page_token: str


def _failed(row: RowResult) -> FailedRow:
    return FailedRow(line=row.line, reason=row.reason, cells=dict(row.cells))


def import_reply(view: ImportView) -> ImportReply:
    counts = view.progress.counts
    return ImportReply(
        id=view.id,
        kind=str(view.kind),
        state=str(view.state),
        dry_run=view.dry_run,
        file_name=view.file_name,
        size=view.size,
        digest=view.digest,
        columns=dict(view.columns),
        match_on=view.match_on,
        progress=ImportProgress(
            line=view.progress.line,
            rows_done=view.progress.rows,
            created=counts[Outcome.CREATED],
            updated=counts[Outcome.UPDATED],
            unchanged=counts[Outcome.UNCHANGED],
            skipped=counts[Outcome.SKIPPED],
            failed=counts[Outcome.FAILED],
        ),
        error=view.error,
        created_at=view.created_at,
        updated_at=view.updated_at,
        finished_at=view.finished_at,
        failures=[_failed(f) for f in view.failures],
    )


def mapping_of(text: str) -> ColumnMapping:
    """The `mapping` parameter: `{"kind", "columns": {column: field}, "match_on"}`."""
    try:
        data: Any = json.loads(text)
    except ValueError:
        raise ValidationFailed.of("mapping", "is not JSON") from None
    if not isinstance(data, Mapping):
        raise ValidationFailed.of("mapping", "must be a JSON object")
    try:
        return ColumnMapping.from_dict(data)
    except MappingRefused as refused:
        raise refused_field(refused) from None


def refused_field(refused: MappingRefused) -> ValidationFailed:
    """A refused mapping as a 422 naming its field (`mapping.columns.Email`, `file`)."""
    name = refused.field if refused.field == "file" else f"mapping.{refused.field}"
    return ValidationFailed.of(name, refused.reason)


class ImportBodyLimit(BodyLimit):
    """The app's body limit, but the import's own for the upload route."""

    def __init__(self, app: ASGIApp, limit: int, import_limit: int) -> None:
        super().__init__(app, limit)
        self.uploads = BodyLimit(app, import_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/imports":
            await self.uploads(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _with_upload_limit(middleware: Middleware, import_limit: int) -> Middleware:
    """The app's `BodyLimit` as an `ImportBodyLimit` with the same limit; others as they are."""
    factory: Any = middleware.cls
    if factory is not BodyLimit:
        return middleware
    options: dict[str, Any] = dict(middleware.kwargs)
    limit = int(options.get("limit", middleware.args[0] if middleware.args else 0))
    return Middleware(ImportBodyLimit, limit=limit, import_limit=import_limit)


def include_imports(app: FastAPI, service: ContactsService) -> ImportJobs:
    """Adds the import routes to the service's REST app (`app.state.imports` holds
    the jobs); unfinished jobs are resumed when the app starts."""
    jobs = ImportJobs(service)
    app.state.imports = jobs
    app.include_router(import_router(jobs))
    app.user_middleware[:] = [
        _with_upload_limit(m, jobs.max_file_bytes) for m in app.user_middleware
    ]
    app.router.on_startup.append(jobs.start)
    app.router.on_shutdown.append(jobs.aclose)
    return jobs


def import_router(jobs: ImportJobs) -> APIRouter:
    router = APIRouter(tags=["imports"])

    @router.post(
        "/imports",
        operation_id="ImportContacts",
        status_code=202,
        response_model=ImportReply,
        summary="Import persons or companies from a CSV file",
        responses={
            200: {"model": ImportReply, "description": "A dry run's report (nothing written)"},
            413: {"description": "The file is larger than 200 MiB"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"text/csv": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def import_contacts(
        request: Request,
        mapping: Annotated[
            str,
            Query(
                description='JSON: {"kind": "person"|"company", "columns": {"<column>": '
                '"<field>|custom:<key>"}, "match_on": "email"|"domain"}'
            ),
        ],
        dry_run: Annotated[
            bool, Query(description="Report what the import would do; write nothing.")
        ] = False,
        file_name: Annotated[str, Query(max_length=200)] = "",
    ) -> JSONResponse:
        jobs.start()
        caller = http_caller(request)
        wanted = mapping_of(mapping)
        declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if declared and declared not in CSV_TYPES:
            raise ValidationFailed.of(
                "content-type", f"must be text/csv (the file itself as the body), not {declared}"
            )

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                yield chunk

        try:
            view = await jobs.submit(caller, wanted, body(), file_name=file_name, dry_run=dry_run)
        except MappingRefused as refused:
            raise refused_field(refused) from None
        reply = import_reply(view).model_dump(mode="json")
        return JSONResponse(reply, status_code=200 if dry_run else 202)

    @router.get(
        "/imports/{import_id}",
        operation_id="GetImport",
        response_model=ImportReply,
        summary="An import's state and progress",
    )
    async def get_import(import_id: Annotated[str, Path(max_length=100)]) -> ImportReply:
        jobs.start()
        return import_reply(await jobs.get(import_id))

    @router.get(
        "/imports/{import_id}/failures",
        operation_id="GetImportFailures",
        summary="An import's failed rows: CSV (line, reason, the row's cells), or JSON pages",
        responses={
            200: {
                "model": FailurePage,
                "description": "CSV (`format=csv`, the default) or a JSON page (`format=json`)",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            }
        },
    )
    async def get_import_failures(
        import_id: Annotated[str, Path(max_length=100)],
        format: Annotated[str, Query(pattern="^(csv|json)$")] = "csv",
        page_size: Annotated[int, Query(ge=1, le=MAX_FAILURES_PAGE)] = 100,
        page_token: Annotated[str, Query(max_length=20)] = "",
    ) -> Any:
        if format == "json":
            if page_token and not page_token.isdigit():
                raise ValidationFailed.of("page_token", "is not a page token of this report")
            page = await jobs.failures(import_id, int(page_token or 0), page_size)
            return FailurePage(
                failures=[_failed(f) for f in page.failures],
                next_page_token=str(page.next_after) if page.next_after else "",
            )
        lines = await jobs.failures_csv(import_id)
        return StreamingResponse(
            (line async for line in lines),
            media_type="text/csv; charset=utf-8",
            headers={
                "content-disposition": f'attachment; filename="import-{import_id}-failures.csv"'
            },
        )

    return router
