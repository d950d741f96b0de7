"""Stored events as the public `crm.events.v1.PipelineEvent` messages.

A scenario that makes every kind of event is run through the application on
a real SQLite store; the notification log is then mapped exactly as the
relay maps it (`to_wire` with the stored metadata).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import STAGES, Clock, InProcessContacts, sqlite_settings

from crm.events.v1 import pipeline_pb2 as events_pb
from crm.pipeline.v1 import pipeline_pb2 as pb
from crm_common.commands import Caller
from crm_contacts.application import ContactsService
from crm_contacts.application import create_application as create_contacts
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.events_out import (
    PAYLOADS,
    PROTO_MESSAGE,
    UnpublishableEvent,
    pipeline_event,
    to_wire,
)
from crm_pipeline.inputs import (
    LeadConversion,
    LineItemInput,
    NewActivity,
    NewLead,
    NewOpportunity,
    StageInput,
)


def ctx(command: str, request_id: str | None = None) -> Caller:
    return Caller(actor="ann", client="web", request_id=request_id)


@pytest.fixture
async def published(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Runs the scenario; yields the wire messages and the ids involved."""
    clock = Clock()
    contacts = ContactsService(create_contacts(sqlite_settings(tmp_path, "contacts")))
    service = PipelineService(
        create_application(sqlite_settings(tmp_path)), InProcessContacts(contacts), clock=clock
    )
    try:
        p = (await service.define_pipeline(ctx("DefinePipeline"), "Sales", STAGES)).outcome.id
        await service.add_stage(ctx("AddStage"), p, StageInput("demo", "Demo", "25", "pipeline"))
        await service.rename_stage(ctx("RenameStage"), p, "demo", "Product demo")
        await service.change_stage_settings(ctx("ChangeStageSettings"), p, "demo", "30", "pipeline")
        await service.reorder_stages(
            ctx("ReorderStages"), p, ["qualify", "demo", "propose", "negotiate", "won", "lost"]
        )
        await service.retire_stage(ctx("RetireStage"), p, "demo")
        lead = await service.create_lead(
            ctx("CreateLead"),
            NewLead(family_name="Byron", source="web", owner="bob", email="ada@example.org"),
        )
        await service.qualify_lead(ctx("QualifyLead"), lead.outcome.id, 70)
        other = await service.create_lead(
            ctx("CreateLead"), NewLead(family_name="Other", source="phone", owner="bob", phone="1")
        )
        await service.disqualify_lead(ctx("DisqualifyLead"), other.outcome.id, "spam")
        converted = await service.convert_lead(
            ctx("ConvertLead"),
            LeadConversion(lead.outcome.id, p, "5000", "EUR", "2026-04-30"),
        )
        deal = (
            await service.open_opportunity(
                ctx("OpenOpportunity", request_id="open-1"),
                NewOpportunity(p, "Renewal", "company-9", "ann", "12000", "EUR", "2026-03-31"),
            )
        ).outcome.id
        clock.advance(hours=1)
        await service.change_amount(ctx("ChangeAmount"), deal, "13000", "EUR")
        await service.set_line_items(
            ctx("SetLineItems"), deal, [LineItemInput("sku-1", "Seat", "10", "1300", "0")]
        )
        await service.change_expected_close_date(ctx("ChangeExpectedCloseDate"), deal, "2026-04-15")
        await service.reassign_opportunity(ctx("ReassignOpportunity"), deal, "chen")
        await service.move_opportunity(ctx("MoveOpportunity"), deal, "negotiate")
        clock.advance(days=1)
        await service.win_opportunity(ctx("WinOpportunity"), deal)
        clock.advance(days=1)
        await service.reopen_opportunity(ctx("ReopenOpportunity"), deal)
        await service.lose_opportunity(ctx("LoseOpportunity"), deal, "budget cut")
        task = await service.schedule_activity(
            ctx("ScheduleActivity"),
            NewActivity("opportunity", deal, "call", "Call back", "chen", clock.now),
        )
        await service.reschedule_activity(
            ctx("RescheduleActivity"), task.outcome.id, clock.now + timedelta(days=1)
        )
        await service.complete_activity(ctx("CompleteActivity"), task.outcome.id, "done")
        second = await service.schedule_activity(
            ctx("ScheduleActivity"),
            NewActivity("lead", other.outcome.id, "email", "Mail", "bob", clock.now),
        )
        await service.cancel_activity(ctx("CancelActivity"), second.outcome.id, "")
        customer = converted.outcome.extra["person_id"]
        # Contacts merges the customer into another person, then erases that person.
        await service.move_customers("person-kept", [customer], "merge-1", "person-kept:7", "eve")
        await service.erase_person("company-9", [], "erase-1", "company-9:3", "eve")

        app = service.app
        notifications = app.recorder.select_notifications(1, 1000)  # type: ignore[attr-defined]
        wires = []
        for n in notifications:
            event = app.mapper.to_domain_event(n)
            meta = dict(getattr(event, "_meta", {}) or {})
            wires.append((event, to_wire(event, meta, n.id), n.id))
        yield {
            "wires": wires,
            "pipeline": p,
            "deal": deal,
            "lead": lead.outcome.id,
            "customer": converted.outcome.extra["person_id"],
            "converted": converted.outcome.extra["opportunity_id"],
        }
    finally:
        service.close()
        contacts.close()


def decoded(published: dict[str, Any]) -> list[tuple[str, str, events_pb.PipelineEvent]]:
    result = []
    for _, wire, _ in published["wires"]:
        if wire is not None:
            key, ce_type, payload = wire
            result.append((key, ce_type, events_pb.PipelineEvent.FromString(payload)))
    return result


async def test_every_kind_of_event_is_published_and_receipts_are_not(
    published: dict[str, Any],
) -> None:
    wires = published["wires"]
    skipped = {type(event).__qualname__ for event, wire, _ in wires if wire is None}
    assert skipped == {"CommandReceipt.Recorded", "Activity.PersonalDataErased"}
    types = {ce_type for _, ce_type, _ in decoded(published)}
    assert types == {f"crm.pipeline.v1.{name}" for name, _ in PAYLOADS.values()}
    assert PROTO_MESSAGE == "crm.events.v1.PipelineEvent"
    for key, ce_type, message in decoded(published):
        # The payload set is the one the type names.
        payload = message.WhichOneof("payload")
        assert payload is not None
        assert ce_type == "crm.pipeline.v1." + payload.title().replace("_", "")
        assert key == (message.customer_id or message.aggregate_id)


async def test_the_envelope_carries_position_version_actor_and_customer(
    published: dict[str, Any],
) -> None:
    for event, wire, position in published["wires"]:
        if wire is None:
            continue
        message = events_pb.PipelineEvent.FromString(wire[2])
        assert (message.position, message.version) == (position, event.originator_version)
        assert message.aggregate_id == str(event.originator_id)
        assert (message.actor, message.client) in {
            ("ann", "web"),
            ("eve", "pipeline-contacts-follower"),
        }
        assert message.occurred_at.ToDatetime().year >= 2026
    messages = [m for _, _, m in decoded(published)]
    deal_events = [m for m in messages if m.aggregate_id == published["deal"]]
    assert {m.customer_id for m in deal_events} == {"company-9"}
    lead_events = [m for m in messages if m.aggregate_id == published["lead"]]
    # A lead's customer is known from its conversion on.
    assert [m.customer_id for m in lead_events] == ["", "", published["customer"], "person-kept"]


async def test_a_merge_publishes_each_record_moved_keyed_by_its_new_customer(
    published: dict[str, Any],
) -> None:
    moved = [
        (k, m) for k, _, m in decoded(published) if m.WhichOneof("payload") == "customer_moved"
    ]
    # The converted lead and its deal; the deal of company-9 stays where it is.
    assert {m.aggregate_id for _, m in moved} == {published["lead"], published["converted"]}
    for key, m in moved:
        assert key == m.customer_id == "person-kept"
        assert (m.customer_moved.from_customer_id, m.customer_moved.to_customer_id) == (
            published["customer"],
            "person-kept",
        )
        assert (m.customer_moved.merge_id, m.customer_moved.undone) == ("merge-1", False)


async def test_money_dates_and_stages_are_exact_text(published: dict[str, Any]) -> None:
    by_payload: dict[str, list[Any]] = {}
    for _, _, m in decoded(published):
        name = m.WhichOneof("payload")
        assert name is not None
        by_payload.setdefault(name, []).append(getattr(m, name))
    opened = next(o for o in by_payload["opportunity_opened"] if o.name == "Renewal")
    assert (opened.amount.amount, opened.amount.currency) == ("12000.00", "EUR")
    assert (opened.expected_close_date, opened.kind) == (
        "2026-03-31",
        pb.OPPORTUNITY_KIND_NEW_BUSINESS,
    )
    (lines,) = by_payload["opportunity_line_items_changed"]
    assert [
        (li.quantity, li.unit_price, li.discount_percent, li.total) for li in lines.line_items
    ] == [("10", "1300", "0.00", "13000.00")]
    (won,) = by_payload["opportunity_won"]
    assert (won.stage_id, won.amount.amount, won.closed_on) == ("won", "13000.00", "2026-02-03")
    (lost,) = by_payload["opportunity_lost"]
    assert (lost.reason, lost.stage_id) == ("budget cut", "lost")
    (defined,) = by_payload["pipeline_defined"]
    assert [(s.stage_id, s.probability, s.category) for s in defined.stages][:2] == [
        ("qualify", "10", pb.FORECAST_CATEGORY_PIPELINE),
        ("propose", "40", pb.FORECAST_CATEGORY_BEST_CASE),
    ]
    (settings,) = by_payload["stage_settings_changed"]
    assert (settings.stage_id, settings.probability) == ("demo", "30")
    (reopened,) = by_payload["opportunity_reopened"]
    assert reopened.stage_id == "negotiate"
    moves = by_payload["opportunity_stage_changed"]
    assert [(m.from_stage_id, m.stage_id, m.regression) for m in moves] == [
        ("qualify", "negotiate", False)
    ]
    (scheduled, _) = by_payload["activity_scheduled"]
    assert (scheduled.subject_kind, scheduled.kind) == (
        pb.SUBJECT_KIND_OPPORTUNITY,
        pb.ACTIVITY_KIND_CALL,
    )


async def test_an_unknown_event_is_an_error_not_a_silent_skip(published: dict[str, Any]) -> None:
    event, _, position = published["wires"][0]

    class Stranger:
        pass

    stranger = Stranger()
    stranger.__dict__.update(event.__dict__)
    with pytest.raises(UnpublishableEvent):
        to_wire(stranger, {}, position)
    with pytest.raises(UnpublishableEvent):
        pipeline_event(stranger, {}, position)
