"""The application service as a FastAPI dependency of every router."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from crm_pipeline.application import PipelineService


def _service(request: Request) -> PipelineService:
    service: PipelineService = request.app.state.service
    return service


Service = Annotated[PipelineService, Depends(_service)]
