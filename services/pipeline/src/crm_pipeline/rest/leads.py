"""Leads: create, read, list, qualify, disqualify, convert into a deal."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from crm_common.server import IdempotencyKey, IfMatch, expected_version, http_caller
from crm_pipeline.inputs import LeadConversion, LeadQuery, NewLead
from crm_pipeline.rest.models import (
    CHANGE,
    CREATE,
    QUERY,
    READ,
    Conversion,
    ConversionWrite,
    LeadCreate,
    LeadList,
    LeadModel,
    LeadWrite,
    Qualification,
    Reason,
)
from crm_pipeline.rest.service import Service

router = APIRouter(prefix="/leads", tags=["leads"])


@router.post(
    "",
    status_code=201,
    response_model=LeadWrite,
    responses=CREATE,
    summary="Create a lead",
    operation_id="CreateLead",
)
async def create_lead(
    request: Request,
    response: Response,
    body: LeadCreate,
    service: Service,
    idempotency_key: IdempotencyKey = None,
) -> LeadWrite:
    written = await service.create_lead(
        http_caller(request, idempotency_key), NewLead(**body.model_dump())
    )
    return LeadWrite.of(written, response)


@router.get(
    "",
    response_model=LeadList,
    responses=QUERY,
    summary="Leads, filtered and paged (a partner lists only the leads it brought)",
    operation_id="ListLeads",
)
async def list_leads(
    request: Request,
    service: Service,
    status: Annotated[
        str, Query(description="new, qualified, disqualified or converted; empty: every lead")
    ] = "",
    owner: str = "",
    page_size: Annotated[int, Query(description="1..200, default 50")] = 0,
    page_token: str = "",
) -> LeadList:
    page = await service.list_leads(
        LeadQuery(status or None, owner, page_size, page_token), http_caller(request)
    )
    return LeadList(
        leads=[LeadModel.of(lead) for lead in page.leads],
        next_page_token=page.next_page_token,
        total_size=page.total_size,
    )


@router.get(
    "/{lead_id}", response_model=LeadModel, responses=READ, summary="A lead", operation_id="GetLead"
)
async def get_lead(request: Request, lead_id: str, service: Service) -> LeadModel:
    return LeadModel.of(await service.get_lead(lead_id, http_caller(request)))


@router.post(
    "/{lead_id}/qualify",
    response_model=LeadWrite,
    responses=CHANGE,
    summary="Qualify a lead with a score",
    operation_id="QualifyLead",
)
async def qualify_lead(
    request: Request,
    lead_id: str,
    body: Qualification,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> LeadWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return LeadWrite.of(await service.qualify_lead(caller, lead_id, body.score))


@router.post(
    "/{lead_id}/disqualify",
    response_model=LeadWrite,
    responses=CHANGE,
    summary="Disqualify a lead",
    operation_id="DisqualifyLead",
)
async def disqualify_lead(
    request: Request,
    lead_id: str,
    body: Reason,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> LeadWrite:
    caller = http_caller(request, idempotency_key, expected_version(if_match))
    return LeadWrite.of(await service.disqualify_lead(caller, lead_id, body.reason))


@router.post(
    "/{lead_id}/convert",
    status_code=201,
    response_model=ConversionWrite,
    responses={**CREATE, 503: {"description": "The contacts service could not be reached"}},
    summary="Convert a qualified lead into an opportunity",
    operation_id="ConvertLead",
)
async def convert_lead(
    request: Request,
    response: Response,
    lead_id: str,
    body: Conversion,
    service: Service,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> ConversionWrite:
    written = await service.convert_lead(
        http_caller(request, idempotency_key, expected_version(if_match)),
        LeadConversion(
            lead_id=lead_id,
            pipeline_id=body.pipeline_id,
            amount=body.amount.amount,
            currency=body.amount.currency,
            expected_close_date=body.expected_close_date,
            opportunity_name=body.opportunity_name,
            person_id=body.person_id,
            company_id=body.company_id,
            create_company=body.create_company,
            owner=body.owner,
        ),
    )
    return ConversionWrite.of(written, response)
