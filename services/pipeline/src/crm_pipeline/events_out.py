"""Stored domain events as the public `crm.events.v1.PipelineEvent` messages.

The relay calls `to_wire` for every event of the notification log. Each
event of a lead, pipeline, opportunity or activity becomes one message with
the CloudEvents type `crm.pipeline.v1.<PayloadName>` (`OpportunityWon`, ...),
keyed by the customer's contact id, or by the aggregate's id while the
customer is not known. Command receipts are internal and not published. An
event this module does not know is an error, not a silent skip: the relay
must never drop part of a deal's history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from crm.events.v1 import pipeline_pb2 as events_pb
from crm.pipeline.v1 import pipeline_pb2 as pb
from crm_common.commands import CommandReceipt
from crm_common.enums import enum_number
from crm_pipeline.domain import Activity, Lead, Opportunity, Pipeline
from crm_pipeline.messages import (
    decimal_text,
    iso,
    line_item_pb,
    money_pb,
    stage_pb,
    timestamp,
)
from crm_pipeline.views import StageView

CE_TYPE_PREFIX = "crm.pipeline.v1."
PROTO_MESSAGE = events_pb.PipelineEvent.DESCRIPTOR.full_name

#: Not published: command receipts, and the marker that an activity's person was
#: erased (the erasure itself is on the contacts topic, which every consumer
#: honours; the marker only tells this service's query tables to drop the title).
INTERNAL_EVENTS: tuple[type[Any], ...] = (CommandReceipt.Event, Activity.PersonalDataErased)


class UnpublishableEvent(TypeError):
    """A stored event that has no public form in `crm.events.v1.PipelineEvent`."""


Data = Mapping[str, Any]
Fill = Callable[[events_pb.PipelineEvent, Data], None]


def _stage(data: Data) -> pb.Stage:
    return stage_pb(
        StageView(data["stage_id"], data["name"], data["probability"], data["category"])
    )


def _lead_created(m: events_pb.PipelineEvent, d: Data) -> None:
    m.lead_created.CopyFrom(
        events_pb.LeadCreated(
            given_name=d["given_name"],
            family_name=d["family_name"],
            company_name=d["company_name"],
            email=d["email"],
            phone=d["phone"],
            source=enum_number(pb.LeadSource, d["source"]),
            campaign=d["campaign"],
            owner=d["owner"],
        )
    )


def _lead_converted(m: events_pb.PipelineEvent, d: Data) -> None:
    m.lead_converted.CopyFrom(
        events_pb.LeadConverted(
            person_id=d["person_id"],
            company_id=d["company_id"],
            opportunity_id=d["opportunity_id"],
        )
    )


def _pipeline_defined(m: events_pb.PipelineEvent, d: Data) -> None:
    m.pipeline_defined.CopyFrom(
        events_pb.PipelineDefined(name=d["name"], stages=[_stage(s) for s in d["stages"]])
    )


def _stage_added(m: events_pb.PipelineEvent, d: Data) -> None:
    m.stage_added.CopyFrom(events_pb.StageAdded(stage=_stage(d), position=d["position"]))


def _stage_settings_changed(m: events_pb.PipelineEvent, d: Data) -> None:
    m.stage_settings_changed.CopyFrom(
        events_pb.StageSettingsChanged(
            stage_id=d["stage_id"],
            probability=decimal_text(d["probability"].normalize()),
            category=enum_number(pb.ForecastCategory, d["category"]),
        )
    )


def _opportunity_opened(m: events_pb.PipelineEvent, d: Data) -> None:
    m.opportunity_opened.CopyFrom(
        events_pb.OpportunityOpened(
            pipeline_id=d["pipeline_id"],
            stage_id=d["stage_id"],
            name=d["name"],
            person_id=d["person_id"],
            company_id=d["company_id"],
            owner=d["owner"],
            amount=money_pb(d["amount"], d["currency"]),
            expected_close_date=iso(d["expected_close_date"]),
            kind=enum_number(pb.OpportunityKind, d["kind"]),
            related_opportunity_ids=d["related_deal_ids"],
            lead_id=d["lead_id"],
        )
    )


def _line_items_changed(m: events_pb.PipelineEvent, d: Data) -> None:
    m.opportunity_line_items_changed.CopyFrom(
        events_pb.OpportunityLineItemsChanged(
            line_items=[line_item_pb(line) for line in d["line_items"]],
            amount=money_pb(d["amount"], d["currency"]),
        )
    )


def _won(m: events_pb.PipelineEvent, d: Data) -> None:
    m.opportunity_won.CopyFrom(
        events_pb.OpportunityWon(
            stage_id=d["stage_id"],
            person_id=d["person_id"],
            company_id=d["company_id"],
            amount=money_pb(d["amount"], d["currency"]),
            closed_on=iso(d["closed_on"]),
        )
    )


def _activity_scheduled(m: events_pb.PipelineEvent, d: Data) -> None:
    m.activity_scheduled.CopyFrom(
        events_pb.ActivityScheduled(
            subject_kind=enum_number(pb.SubjectKind, d["subject_kind"]),
            subject_id=d["subject_id"],
            kind=enum_number(pb.ActivityKind, d["kind"]),
            title=d["title"],
            owner=d["owner"],
            due_at=timestamp(d["due_at"]),
        )
    )


def _customer_moved(m: events_pb.PipelineEvent, d: Data) -> None:
    m.customer_moved.CopyFrom(
        events_pb.CustomerMoved(
            from_customer_id=d["from_customer_id"],
            to_customer_id=d["to_customer_id"],
            merge_id=d["merge_id"],
            undone=d["undone"],
            fields=d["fields"],
        )
    )


#: Stored event type -> public payload name and filler.
PAYLOADS: dict[type[Any], tuple[str, Fill]] = {
    Lead.Created: ("LeadCreated", _lead_created),
    Lead.Qualified: (
        "LeadQualified",
        lambda m, d: m.lead_qualified.CopyFrom(events_pb.LeadQualified(score=d["score"])),
    ),
    Lead.Disqualified: (
        "LeadDisqualified",
        lambda m, d: m.lead_disqualified.CopyFrom(events_pb.LeadDisqualified(reason=d["reason"])),
    ),
    Lead.Converted: ("LeadConverted", _lead_converted),
    Lead.CustomerMoved: ("CustomerMoved", _customer_moved),
    Pipeline.Defined: ("PipelineDefined", _pipeline_defined),
    Pipeline.StageAdded: ("StageAdded", _stage_added),
    Pipeline.StageRenamed: (
        "StageRenamed",
        lambda m, d: m.stage_renamed.CopyFrom(
            events_pb.StageRenamed(stage_id=d["stage_id"], name=d["name"])
        ),
    ),
    Pipeline.StageSettingsChanged: ("StageSettingsChanged", _stage_settings_changed),
    Pipeline.StagesReordered: (
        "StagesReordered",
        lambda m, d: m.stages_reordered.CopyFrom(
            events_pb.StagesReordered(stage_ids=d["stage_ids"])
        ),
    ),
    Pipeline.StageRetired: (
        "StageRetired",
        lambda m, d: m.stage_retired.CopyFrom(events_pb.StageRetired(stage_id=d["stage_id"])),
    ),
    Opportunity.Opened: ("OpportunityOpened", _opportunity_opened),
    Opportunity.AmountChanged: (
        "OpportunityAmountChanged",
        lambda m, d: m.opportunity_amount_changed.CopyFrom(
            events_pb.OpportunityAmountChanged(amount=money_pb(d["amount"], d["currency"]))
        ),
    ),
    Opportunity.LineItemsChanged: ("OpportunityLineItemsChanged", _line_items_changed),
    Opportunity.ExpectedCloseDateChanged: (
        "OpportunityExpectedCloseDateChanged",
        lambda m, d: m.opportunity_expected_close_date_changed.CopyFrom(
            events_pb.OpportunityExpectedCloseDateChanged(
                expected_close_date=iso(d["expected_close_date"])
            )
        ),
    ),
    Opportunity.OwnerChanged: (
        "OpportunityOwnerChanged",
        lambda m, d: m.opportunity_owner_changed.CopyFrom(
            events_pb.OpportunityOwnerChanged(owner=d["owner"])
        ),
    ),
    Opportunity.StageChanged: (
        "OpportunityStageChanged",
        lambda m, d: m.opportunity_stage_changed.CopyFrom(
            events_pb.OpportunityStageChanged(
                from_stage_id=d["from_stage_id"],
                stage_id=d["stage_id"],
                regression=d["regression"],
            )
        ),
    ),
    Opportunity.Won: ("OpportunityWon", _won),
    Opportunity.CustomerMoved: ("CustomerMoved", _customer_moved),
    Opportunity.Lost: (
        "OpportunityLost",
        lambda m, d: m.opportunity_lost.CopyFrom(
            events_pb.OpportunityLost(
                stage_id=d["stage_id"], reason=d["reason"], closed_on=iso(d["closed_on"])
            )
        ),
    ),
    Opportunity.Reopened: (
        "OpportunityReopened",
        lambda m, d: m.opportunity_reopened.CopyFrom(
            events_pb.OpportunityReopened(stage_id=d["stage_id"])
        ),
    ),
    Activity.Scheduled: ("ActivityScheduled", _activity_scheduled),
    Activity.CustomerMoved: ("CustomerMoved", _customer_moved),
    Activity.Rescheduled: (
        "ActivityRescheduled",
        lambda m, d: m.activity_rescheduled.CopyFrom(
            events_pb.ActivityRescheduled(due_at=timestamp(d["due_at"]))
        ),
    ),
    Activity.Completed: (
        "ActivityCompleted",
        lambda m, d: m.activity_completed.CopyFrom(
            events_pb.ActivityCompleted(outcome=d["outcome"])
        ),
    ),
    Activity.Cancelled: (
        "ActivityCancelled",
        lambda m, d: m.activity_cancelled.CopyFrom(events_pb.ActivityCancelled(reason=d["reason"])),
    ),
}


def payload_name(event: Any) -> str:
    known = PAYLOADS.get(type(event))
    if known is None:
        raise UnpublishableEvent(
            f"{type(event).__module__}.{type(event).__qualname__} has no PipelineEvent payload"
        )
    return known[0]


def pipeline_event(event: Any, meta: Mapping[str, Any], position: int) -> events_pb.PipelineEvent:
    """The public message of one stored pipeline event."""
    name = payload_name(event)
    message = events_pb.PipelineEvent(
        customer_id=event.customer_id,
        aggregate_id=str(event.originator_id),
        version=event.originator_version,
        position=position,
        occurred_at=timestamp(event.timestamp),
        actor=str(meta.get("actor") or ""),
        client=str(meta.get("client") or ""),
    )
    PAYLOADS[type(event)][1](message, event.__dict__)
    assert message.WhichOneof("payload") is not None, name
    return message


def to_wire(event: Any, meta: dict[str, Any], position: int) -> tuple[str, str, bytes] | None:
    """(key, CloudEvents type, payload) for the relay; None for internal events."""
    if isinstance(event, INTERNAL_EVENTS):
        return None
    message = pipeline_event(event, meta, position)
    key = message.customer_id or message.aggregate_id
    return key, CE_TYPE_PREFIX + payload_name(event), message.SerializeToString()
