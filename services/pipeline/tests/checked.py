"""The domain's commands with raw client values, checked by `crm_pipeline.validation`
first, as the application runs them: the domain tests state what a client sees."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from crm_common.errors import ValidationFailed
from crm_pipeline import validation
from crm_pipeline.domain import Activity, Lead, Opportunity, Pipeline
from crm_pipeline.inputs import LineItemInput, NewActivity, NewLead, NewOpportunity, StageInput


def create_lead(*, at: datetime, **fields: Any) -> Lead:
    lead = validation.new_lead(
        NewLead(**{"family_name": "", "source": None, "owner": "", **fields})
    )
    return Lead.create(
        given_name=lead.given_name,
        family_name=lead.family_name,
        company_name=lead.company_name,
        email=lead.email,
        phone=lead.phone,
        source=lead.source or "",
        campaign=lead.campaign,
        owner=lead.owner,
        at=at,
    )


def qualify(lead: Lead, score: Any, at: datetime) -> None:
    lead.qualify(validation.score(score), at)


def disqualify(lead: Lead, reason: str, at: datetime) -> None:
    lead.disqualify(validation.one_text("reason", reason), at)


def define_pipeline(name: str, stages: Sequence[StageInput]) -> Pipeline:
    return Pipeline.define(*validation.new_pipeline(name, stages))


def add_stage(pipeline: Pipeline, spec: StageInput, position: int | None = None) -> None:
    pipeline.add_stage(validation.stage(spec, "stage"), position)


def rename_stage(pipeline: Pipeline, stage_id: str, name: str) -> None:
    pipeline.rename_stage(stage_id, validation.one_text("name", name))


def change_stage_settings(
    pipeline: Pipeline, stage_id: str, probability: Any, category: Any
) -> None:
    pipeline.active_stage(stage_id)
    checked, word = validation.stage_settings(probability, category)
    pipeline.change_stage_settings(stage_id, checked, word)


def open_deal(
    *,
    pipeline: Pipeline,
    at: datetime,
    expected_close_date: Any,
    related_deals: list[Opportunity] | None = None,
    lead_id: str = "",
    **fields: Any,
) -> Opportunity:
    if not isinstance(expected_close_date, date) or isinstance(expected_close_date, datetime):
        # The application reads dates from text; a domain call takes a date.
        raise ValidationFailed.of("expected_close_date", "must be a date")
    new = NewOpportunity(
        **{
            "pipeline_id": str(pipeline.id),
            "name": "",
            "customer_id": "",
            "owner": "",
            "amount": "0",
            "currency": "EUR",
            "expected_close_date": expected_close_date,
            **fields,
        }
    )
    terms = validation.new_opportunity(new)
    return Opportunity.open(
        pipeline=pipeline,
        name=terms.name,
        customer_id=terms.customer_id,
        owner=terms.owner,
        amount=terms.amount,
        expected_close_date=terms.expected_close_date,
        at=at,
        stage_id=new.stage_id,
        person_id=new.person_id,
        company_id=new.company_id,
        kind=terms.kind,
        related_deals=related_deals,
        lead_id=lead_id,
    )


def change_amount(deal: Opportunity, amount: Any, currency: str, at: datetime) -> None:
    deal.change_amount(validation.one_money(amount, currency), at)


def set_line_items(deal: Opportunity, items: Sequence[LineItemInput], at: datetime) -> None:
    deal.set_line_items(validation.line_items(items, deal.amount.currency), at)


def reassign(deal: Opportunity, owner: str, at: datetime) -> None:
    deal.reassign(validation.one_text("owner", owner), at)


def lose(
    deal: Opportunity, pipeline: Pipeline, reason: str, at: datetime, closed_on: date | None = None
) -> None:
    deal.lose(pipeline, validation.one_text("reason", reason), at, closed_on)


def schedule_activity(*, subject: Lead | Opportunity, at: datetime, **fields: Any) -> Activity:
    new = validation.new_activity(
        NewActivity(
            **{
                "subject_kind": "lead" if isinstance(subject, Lead) else "opportunity",
                "subject_id": str(subject.id),
                "kind": None,
                "title": "",
                "owner": "",
                "due_at": None,
                **fields,
            }
        )
    )
    assert new.due_at is not None
    return Activity.schedule(
        subject=subject,
        kind=new.kind or "",
        title=new.title,
        owner=new.owner,
        due_at=new.due_at,
        at=at,
    )


def complete(activity: Activity, outcome: str, at: datetime) -> None:
    activity.complete(validation.one_text("outcome", outcome, required=False), at)


def cancel(activity: Activity, reason: str, at: datetime) -> None:
    activity.cancel(validation.one_text("reason", reason, required=False), at)
