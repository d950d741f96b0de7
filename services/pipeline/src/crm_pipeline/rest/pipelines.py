"""Pipelines and their stages: define, read, add, rename, re-weight, reorder, retire."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller
from crm_pipeline.inputs import StageInput
from crm_pipeline.rest.models import (
    CHANGE,
    CREATE,
    READ,
    PipelineCreate,
    PipelineList,
    PipelineModel,
    PipelineWrite,
    StageAdd,
    StageOrder,
    StageRename,
    StageSettings,
)
from crm_pipeline.rest.service import Service

router = APIRouter(prefix="/pipelines", tags=["pipelines"])


@router.post(
    "",
    status_code=201,
    response_model=PipelineWrite,
    responses=CREATE,
    summary="Define a pipeline",
    operation_id="DefinePipeline",
)
async def define_pipeline(
    request: Request,
    response: Response,
    body: PipelineCreate,
    service: Service,
    idempotency_key: IdempotencyKey = None,
) -> PipelineWrite:
    written = await service.define_pipeline(
        http_caller(request, idempotency_key),
        body.name,
        [StageInput(**s.model_dump()) for s in body.stages],
    )
    return PipelineWrite.of(written, response)


@router.get("", response_model=PipelineList, summary="Every pipeline", operation_id="ListPipelines")
async def list_pipelines(service: Service) -> PipelineList:
    return PipelineList(pipelines=[PipelineModel.of(p) for p in await service.list_pipelines()])


@router.get(
    "/{pipeline_id}",
    response_model=PipelineModel,
    responses=READ,
    summary="A pipeline",
    operation_id="GetPipeline",
)
async def get_pipeline(pipeline_id: str, service: Service) -> PipelineModel:
    return PipelineModel.of(await service.get_pipeline(pipeline_id))


@router.post(
    "/{pipeline_id}/stages",
    response_model=PipelineWrite,
    responses=CHANGE,
    summary="Add a stage",
    operation_id="AddStage",
)
async def add_stage(
    request: Request,
    pipeline_id: str,
    body: StageAdd,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> PipelineWrite:
    written = await service.add_stage(
        http_caller(request, idempotency_key, expected_version(if_match)),
        pipeline_id,
        StageInput(**body.stage.model_dump()),
        body.position,
    )
    return PipelineWrite.of(written)


@router.post(
    "/{pipeline_id}/stages/{stage_id}/rename",
    response_model=PipelineWrite,
    responses=CHANGE,
    summary="Rename a stage (its id stays)",
    operation_id="RenameStage",
)
async def rename_stage(
    request: Request,
    pipeline_id: str,
    stage_id: str,
    body: StageRename,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> PipelineWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return PipelineWrite.of(await service.rename_stage(caller, pipeline_id, stage_id, body.name))


@router.post(
    "/{pipeline_id}/stages/{stage_id}/settings",
    response_model=PipelineWrite,
    responses=CHANGE,
    summary="Change a stage's probability and forecast category",
    operation_id="ChangeStageSettings",
)
async def change_stage_settings(
    request: Request,
    pipeline_id: str,
    stage_id: str,
    body: StageSettings,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> PipelineWrite:
    written = await service.change_stage_settings(
        http_caller(request, idempotency_key, expected_version(if_match)),
        pipeline_id,
        stage_id,
        body.probability,
        body.category,
    )
    return PipelineWrite.of(written)


@router.post(
    "/{pipeline_id}/stage-order",
    response_model=PipelineWrite,
    responses=CHANGE,
    summary="Reorder the stages",
    operation_id="ReorderStages",
)
async def reorder_stages(
    request: Request,
    pipeline_id: str,
    body: StageOrder,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> PipelineWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return PipelineWrite.of(await service.reorder_stages(caller, pipeline_id, body.stage_ids))


@router.post(
    "/{pipeline_id}/stages/{stage_id}/retire",
    response_model=PipelineWrite,
    responses=CHANGE,
    summary="Retire a stage (it leaves the order; deals and history keep its id)",
    operation_id="RetireStage",
)
async def retire_stage(
    request: Request,
    pipeline_id: str,
    stage_id: str,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> PipelineWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return PipelineWrite.of(await service.retire_stage(caller, pipeline_id, stage_id))
