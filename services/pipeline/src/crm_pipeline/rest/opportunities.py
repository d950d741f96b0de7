"""Opportunities (deals): open, list, read, and every change of a deal."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from crm_common.commands import Caller
from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller
from crm_pipeline.inputs import LineItemInput, NewOpportunity, OpportunityQuery
from crm_pipeline.rest.models import (
    CHANGE,
    CREATE,
    QUERY,
    READ,
    CloseDate,
    LineItems,
    Loss,
    MoneyBody,
    OpportunityCreate,
    OpportunityList,
    OpportunityModel,
    OpportunityWrite,
    Owner,
    Reopen,
    StageMove,
    Win,
)
from crm_pipeline.rest.service import Service

router = APIRouter(prefix="/opportunities", tags=["opportunities"])


def _caller(request: Request, if_match: str | None, idempotency_key: str | None) -> Caller:
    return http_caller(request, idempotency_key, expected_version(if_match))


@router.post(
    "",
    status_code=201,
    response_model=OpportunityWrite,
    responses=CREATE,
    summary="Open a deal",
    operation_id="OpenOpportunity",
)
async def open_opportunity(
    request: Request,
    response: Response,
    body: OpportunityCreate,
    service: Service,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    fields = body.model_dump(exclude={"amount"})
    written = await service.open_opportunity(
        http_caller(request, idempotency_key),
        NewOpportunity(amount=body.amount.amount, currency=body.amount.currency, **fields),
    )
    return OpportunityWrite.of(written, response)


@router.get(
    "",
    response_model=OpportunityList,
    responses=QUERY,
    summary="Deals, filtered and paged",
    operation_id="ListOpportunities",
)
async def list_opportunities(
    service: Service,
    pipeline_id: str = "",
    owner: str = "",
    customer_id: str = "",
    status: Annotated[str, Query(description="open, won or lost; empty: every deal")] = "",
    page_size: Annotated[int, Query(description="1..200, default 50")] = 0,
    page_token: str = "",
) -> OpportunityList:
    page = await service.list_opportunities(
        OpportunityQuery(pipeline_id, owner, customer_id, status or None, page_size, page_token)
    )
    return OpportunityList(
        opportunities=[OpportunityModel.of(d) for d in page.opportunities],
        next_page_token=page.next_page_token,
        total_size=page.total_size,
    )


@router.get(
    "/{opportunity_id}",
    response_model=OpportunityModel,
    responses=READ,
    summary="A deal",
    operation_id="GetOpportunity",
)
async def get_opportunity(opportunity_id: str, service: Service) -> OpportunityModel:
    return OpportunityModel.of(await service.get_opportunity(opportunity_id))


@router.post(
    "/{opportunity_id}/amount",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Change the amount of a deal without line items",
    operation_id="ChangeAmount",
)
async def change_amount(
    request: Request,
    opportunity_id: str,
    body: MoneyBody,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.change_amount(
        _caller(request, if_match, idempotency_key), opportunity_id, body.amount, body.currency
    )
    return OpportunityWrite.of(written)


@router.put(
    "/{opportunity_id}/line-items",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Replace the line items (the amount becomes their sum)",
    operation_id="SetLineItems",
)
async def set_line_items(
    request: Request,
    opportunity_id: str,
    body: LineItems,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    items = [LineItemInput(**line.model_dump()) for line in body.line_items]
    written = await service.set_line_items(
        _caller(request, if_match, idempotency_key), opportunity_id, items
    )
    return OpportunityWrite.of(written)


@router.post(
    "/{opportunity_id}/expected-close-date",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Change the expected close date",
    operation_id="ChangeExpectedCloseDate",
)
async def change_expected_close_date(
    request: Request,
    opportunity_id: str,
    body: CloseDate,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.change_expected_close_date(
        _caller(request, if_match, idempotency_key), opportunity_id, body.expected_close_date
    )
    return OpportunityWrite.of(written)


@router.post(
    "/{opportunity_id}/owner",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Reassign a deal",
    operation_id="ReassignOpportunity",
)
async def reassign_opportunity(
    request: Request,
    opportunity_id: str,
    body: Owner,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.reassign_opportunity(
        _caller(request, if_match, idempotency_key), opportunity_id, body.owner
    )
    return OpportunityWrite.of(written)


@router.post(
    "/{opportunity_id}/stage",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Move a deal to another open stage, forward or back",
    operation_id="MoveOpportunity",
)
async def move_opportunity(
    request: Request,
    opportunity_id: str,
    body: StageMove,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.move_opportunity(
        _caller(request, if_match, idempotency_key), opportunity_id, body.stage_id
    )
    return OpportunityWrite.of(written)


@router.post(
    "/{opportunity_id}/win",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Win",
    operation_id="WinOpportunity",
)
async def win_opportunity(
    request: Request,
    opportunity_id: str,
    body: Win,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.win_opportunity(
        _caller(request, if_match, idempotency_key), opportunity_id, body.closed_on
    )
    return OpportunityWrite.of(written)


@router.post(
    "/{opportunity_id}/lose",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Lose, with a reason",
    operation_id="LoseOpportunity",
)
async def lose_opportunity(
    request: Request,
    opportunity_id: str,
    body: Loss,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.lose_opportunity(
        _caller(request, if_match, idempotency_key), opportunity_id, body.reason, body.closed_on
    )
    return OpportunityWrite.of(written)


@router.post(
    "/{opportunity_id}/reopen",
    response_model=OpportunityWrite,
    responses=CHANGE,
    summary="Reopen a closed deal",
    operation_id="ReopenOpportunity",
)
async def reopen_opportunity(
    request: Request,
    opportunity_id: str,
    body: Reopen,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> OpportunityWrite:
    written = await service.reopen_opportunity(
        _caller(request, if_match, idempotency_key), opportunity_id, body.stage_id
    )
    return OpportunityWrite.of(written)
