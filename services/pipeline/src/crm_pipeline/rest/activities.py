"""Activities on leads and deals: schedule, read, reschedule, complete, cancel;
activities due in a time range; overdue follow-ups per owner."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller
from crm_pipeline.inputs import ActivityQuery, NewActivity
from crm_pipeline.rest.models import (
    CHANGE,
    CREATE,
    QUERY,
    READ,
    ActivityCreate,
    ActivityList,
    ActivityModel,
    ActivityWrite,
    Cancellation,
    Due,
    FollowUpModel,
    Outcome,
    OverdueFollowUps,
    OwnerFollowUps,
)
from crm_pipeline.rest.service import Service

router = APIRouter(tags=["activities"])


@router.post(
    "/activities",
    status_code=201,
    response_model=ActivityWrite,
    responses=CREATE,
    summary="Schedule an activity",
    operation_id="ScheduleActivity",
)
async def schedule_activity(
    request: Request,
    response: Response,
    body: ActivityCreate,
    service: Service,
    idempotency_key: IdempotencyKey = None,
) -> ActivityWrite:
    written = await service.schedule_activity(
        http_caller(request, idempotency_key), NewActivity(**body.model_dump())
    )
    return ActivityWrite.of(written, response)


@router.get(
    "/activities/{activity_id}",
    response_model=ActivityModel,
    responses=READ,
    summary="An activity",
    operation_id="GetActivity",
)
async def get_activity(activity_id: str, service: Service) -> ActivityModel:
    return ActivityModel.of(await service.get_activity(activity_id))


@router.post(
    "/activities/{activity_id}/reschedule",
    response_model=ActivityWrite,
    responses=CHANGE,
    summary="Move an open activity's due time",
    operation_id="RescheduleActivity",
)
async def reschedule_activity(
    request: Request,
    activity_id: str,
    body: Due,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> ActivityWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return ActivityWrite.of(await service.reschedule_activity(caller, activity_id, body.due_at))


@router.post(
    "/activities/{activity_id}/complete",
    response_model=ActivityWrite,
    responses=CHANGE,
    summary="Complete an activity with its outcome",
    operation_id="CompleteActivity",
)
async def complete_activity(
    request: Request,
    activity_id: str,
    body: Outcome,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> ActivityWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return ActivityWrite.of(await service.complete_activity(caller, activity_id, body.outcome))


@router.post(
    "/activities/{activity_id}/cancel",
    response_model=ActivityWrite,
    responses=CHANGE,
    summary="Cancel an activity",
    operation_id="CancelActivity",
)
async def cancel_activity(
    request: Request,
    activity_id: str,
    body: Cancellation,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> ActivityWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return ActivityWrite.of(await service.cancel_activity(caller, activity_id, body.reason))


@router.get(
    "/activities",
    response_model=ActivityList,
    responses=QUERY,
    summary="Activities due in a time range, soonest first, filtered and paged",
    operation_id="ListActivities",
)
async def list_activities(
    service: Service,
    due_from: Annotated[
        datetime | None, Query(description="ISO time with its zone, inclusive; empty: unbounded")
    ] = None,
    due_before: Annotated[
        datetime | None, Query(description="ISO time with its zone, exclusive; empty: unbounded")
    ] = None,
    owner: str = "",
    status: Annotated[
        str, Query(description="open, completed or cancelled; empty: every activity")
    ] = "",
    page_size: Annotated[int, Query(description="1..200, default 50")] = 0,
    page_token: str = "",
) -> ActivityList:
    page = await service.list_activities(
        ActivityQuery(due_from, due_before, owner, status or None, page_size, page_token)
    )
    return ActivityList(
        activities=[ActivityModel.of(a) for a in page.activities],
        next_page_token=page.next_page_token,
        total_size=page.total_size,
    )


@router.get(
    "/follow-ups/overdue",
    response_model=OverdueFollowUps,
    summary="Open activities past their due time, per owner, most overdue first",
    operation_id="ListOverdueFollowUps",
)
async def overdue_follow_ups(service: Service, owner: str = "") -> OverdueFollowUps:
    overdue = await service.overdue_follow_ups(owner)
    return OverdueFollowUps(
        owners=[
            OwnerFollowUps(owner=o, activities=[FollowUpModel.of(a) for a in items])
            for o, items in overdue.items()
        ]
    )
