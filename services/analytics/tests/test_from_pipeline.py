"""The deals in the 360 view, on plain documents: one pipeline event at a time."""

from __future__ import annotations

import pytest
from contact_events import interaction, person_registered
from pipeline_events import (
    activity_scheduled,
    amount_changed,
    close_date_changed,
    envelope,
    lead_converted,
    line_items_changed,
    lost,
    moved,
    opened,
    pipeline_defined,
    reassigned,
    reopened,
    stage_added,
    stage_renamed,
    stage_retired,
    stages_reordered,
    when,
    won,
)

from crm_analytics.document import UnknownEvent
from crm_analytics.from_contacts import apply_event
from crm_analytics.from_pipeline import (
    apply_pipeline_definition,
    apply_pipeline_event,
    is_known,
    pipelines_referenced,
    with_names,
)

ADA = "p-ada"


def replay(*events, doc=None):
    for event in events:
        if event.DESCRIPTOR.name == "ContactEvent":
            doc = apply_event(doc, event).doc
        else:
            doc = apply_pipeline_event(doc, event).doc
    return doc


def deal_of(doc, deal_id):
    [deal] = [d for d in doc["deals"] if d["opportunity_id"] == deal_id]
    return deal


def test_an_opened_deal_shows_with_its_stage_amount_and_dates():
    doc = replay(person_registered(ADA, 1), opened(ADA, 7, "d-1", "1250.50", "EUR"))
    deal = deal_of(doc, "d-1")
    assert deal == {
        "opportunity_id": "d-1",
        "version": 1,
        "name": "Difference engine",
        "pipeline_id": "pl-sales",
        "stage_id": "qualify",
        "status": "open",
        "amount": "1250.50",
        "currency": "EUR",
        "expected_close_date": "2026-12-31",
        "owner": "grace",
        "person_id": ADA,
        "company_id": "",
        "kind": "new_business",
        "opened_at": when(7),
        "stage_entered_at": when(7),
        "closed_on": "",
        "closed_at": None,
        "lost_reason": "",
    }
    assert doc["lifetime_won_revenue"] == []
    assert doc["positions"] == {"contacts": 1, "pipeline": 7}
    assert doc["updated_at"] == when(7)
    assert doc["timeline"][0]["kind"] == "deal.opened"
    assert doc["timeline"][0]["source"] == "pipeline"
    assert doc["timeline"][0]["summary"] == "Deal Difference engine opened (1250.50 EUR)"


def test_stage_moves_and_changes_keep_the_current_values():
    doc = replay(
        opened(ADA, 1, "d-1"),
        moved(ADA, 2, "d-1", 2, "propose", "qualify"),
        amount_changed(ADA, 3, "d-1", 3, "1800.00"),
        line_items_changed(ADA, 4, "d-1", 4, "2100.25"),
        close_date_changed(ADA, 5, "d-1", 5, "2027-01-15"),
        reassigned(ADA, 6, "d-1", 6, "alan"),
        # A move back to an earlier stage is just another move here.
        moved(ADA, 8, "d-1", 7, "qualify", "propose"),
    )
    deal = deal_of(doc, "d-1")
    assert (deal["stage_id"], deal["stage_entered_at"]) == ("qualify", when(8))
    assert (deal["amount"], deal["currency"]) == ("2100.25", "EUR")
    assert deal["expected_close_date"] == "2027-01-15"
    assert deal["owner"] == "alan"
    assert deal["version"] == 7
    assert deal["status"] == "open"
    assert doc["lifetime_won_revenue"] == []
    # Only openings and closings reach the timeline.
    assert [e["kind"] for e in doc["timeline"]] == ["deal.opened"]


def test_won_deals_add_up_exactly_per_currency():
    doc = replay(
        opened(ADA, 1, "d-1", "0.10"),
        opened(ADA, 2, "d-2", "0.20"),
        opened(ADA, 3, "d-3", "99999999999999.99", "USD"),
        opened(ADA, 4, "d-4", "500", "JPY"),
        won(ADA, 5, "d-1", 2, "0.10", closed_on="2026-11-20"),
        won(ADA, 6, "d-2", 2, "0.20"),
        won(ADA, 7, "d-3", 2, "99999999999999.99", "USD"),
    )
    # 0.1 + 0.2 in binary floating point would be 0.30000000000000004.
    assert doc["lifetime_won_revenue"] == [
        {"amount": "0.30", "currency": "EUR"},
        {"amount": "99999999999999.99", "currency": "USD"},
    ]
    deal = deal_of(doc, "d-1")
    assert deal["status"] == "won"
    assert deal["stage_id"] == "won"
    assert deal["closed_on"] == "2026-11-20"
    assert deal["closed_at"] == when(5)
    assert deal_of(doc, "d-4")["status"] == "open"
    doc = replay(won(ADA, 8, "d-4", 2, "500", "JPY"), doc=doc)
    assert {"amount": "500", "currency": "JPY"} in doc["lifetime_won_revenue"]
    assert doc["timeline"][0]["summary"] == "Deal Difference engine won (500 JPY)"


def test_the_won_amount_is_the_one_the_deal_was_won_at():
    doc = replay(opened(ADA, 1, "d-1", "100.00"), won(ADA, 2, "d-1", 2, "120.00"))
    assert deal_of(doc, "d-1")["amount"] == "120.00"
    assert doc["lifetime_won_revenue"] == [{"amount": "120.00", "currency": "EUR"}]


def test_a_lost_deal_keeps_its_reason_and_adds_no_revenue():
    doc = replay(
        opened(ADA, 1, "d-1", "300.00"),
        lost(ADA, 2, "d-1", 2, "went with a competitor", closed_on="2026-11-21"),
    )
    deal = deal_of(doc, "d-1")
    assert deal["status"] == "lost"
    assert deal["lost_reason"] == "went with a competitor"
    assert (deal["closed_on"], deal["closed_at"]) == ("2026-11-21", when(2))
    assert deal["stage_id"] == "lost"
    assert doc["lifetime_won_revenue"] == []
    assert doc["timeline"][0]["summary"] == "Deal Difference engine lost: went with a competitor"


def test_reopening_a_won_deal_takes_it_out_of_revenue_until_won_again():
    doc = replay(
        opened(ADA, 1, "d-1", "100.00"),
        opened(ADA, 2, "d-2", "50.00"),
        won(ADA, 3, "d-1", 2, "100.00"),
        won(ADA, 4, "d-2", 2, "50.00"),
    )
    assert doc["lifetime_won_revenue"] == [{"amount": "150.00", "currency": "EUR"}]

    doc = replay(reopened(ADA, 5, "d-1", 3, "negotiate"), doc=doc)
    deal = deal_of(doc, "d-1")
    assert deal["status"] == "open"
    assert (deal["stage_id"], deal["stage_entered_at"]) == ("negotiate", when(5))
    assert (deal["closed_on"], deal["closed_at"], deal["lost_reason"]) == ("", None, "")
    assert doc["lifetime_won_revenue"] == [{"amount": "50.00", "currency": "EUR"}]

    doc = replay(amount_changed(ADA, 6, "d-1", 4, "80.00"), won(ADA, 7, "d-1", 5, "80.00"), doc=doc)
    assert doc["lifetime_won_revenue"] == [{"amount": "130.00", "currency": "EUR"}]
    # Reopening a lost deal clears its reason.
    doc = replay(lost(ADA, 8, "d-2", 3), reopened(ADA, 9, "d-2", 4), doc=doc)
    assert deal_of(doc, "d-2")["lost_reason"] == ""
    assert doc["lifetime_won_revenue"] == [{"amount": "80.00", "currency": "EUR"}]
    assert [e["kind"] for e in doc["timeline"][:3]] == ["deal.reopened", "deal.lost", "deal.won"]


def test_a_redelivered_or_older_event_changes_nothing():
    first = replay(opened(ADA, 1, "d-1", "100.00"), won(ADA, 2, "d-1", 2, "100.00"))
    for event in (won(ADA, 2, "d-1", 2, "100.00"), opened(ADA, 1, "d-1", "999.00")):
        again = apply_pipeline_event(first, event)
        assert again.applied is False
        assert again.doc == first
    assert first["lifetime_won_revenue"] == [{"amount": "100.00", "currency": "EUR"}]


def test_contacts_and_pipeline_positions_are_separate():
    # The contacts log is at 40 already; pipeline position 3 is still new.
    doc = replay(person_registered(ADA, 40), opened(ADA, 3, "d-1"), interaction(ADA, 41, "i-1"))
    assert doc["positions"] == {"contacts": 41, "pipeline": 3}
    assert apply_pipeline_event(doc, opened(ADA, 3, "d-1")).applied is False
    assert apply_event(doc, interaction(ADA, 41, "i-1")).applied is False


def test_a_deal_before_the_contacts_first_event_is_kept_and_filled_in_later():
    deal_first = replay(opened(ADA, 5, "d-1", "700.00"), won(ADA, 6, "d-1", 2, "700.00"))
    assert deal_first["_id"] == ADA
    assert "kind" not in deal_first
    assert is_known(deal_first)
    assert deal_first["lifetime_won_revenue"] == [{"amount": "700.00", "currency": "EUR"}]

    doc = replay(person_registered(ADA, 1), interaction(ADA, 2, "i-1"), doc=deal_first)
    assert doc["kind"] == "person"
    assert doc["display_name"] == "Ada Lovelace"
    assert deal_of(doc, "d-1")["status"] == "won"
    assert doc["positions"] == {"pipeline": 6, "contacts": 2}
    # The same document whichever topic was consumed first.
    contacts_first = replay(
        person_registered(ADA, 1),
        interaction(ADA, 2, "i-1"),
        opened(ADA, 5, "d-1", "700.00"),
        won(ADA, 6, "d-1", 2, "700.00"),
    )
    assert doc == contacts_first
    assert [e["entry_id"] for e in doc["timeline"]] == ["d-1:2", "d-1:1", "i-1", f"{ADA}:created"]


def test_events_that_change_no_deal_still_move_the_position():
    doc = replay(
        person_registered(ADA, 1),
        lead_converted(4, "lead-1", ADA, "d-1"),
        activity_scheduled(5, ADA, "a-1", "d-1"),
    )
    assert doc["positions"]["pipeline"] == 5
    assert "deals" not in doc
    # A customer only known from such an event is known (a reader can wait for it).
    assert is_known(replay(activity_scheduled(9, "c-new", "a-2", "d-9")))
    assert not is_known({"_id": "c-acme", "customer_id": "c-acme", "members": []})


def test_a_deal_whose_opening_was_not_seen_keeps_what_is_known():
    doc = replay(won(ADA, 9, "d-old", 4, "42.00"))
    deal = deal_of(doc, "d-old")
    assert (deal["status"], deal["amount"], deal["version"]) == ("won", "42.00", 4)
    assert doc["lifetime_won_revenue"] == [{"amount": "42.00", "currency": "EUR"}]
    assert doc["timeline"][0]["summary"] == "Deal d-old won (42.00 EUR)"


def test_deals_are_listed_most_recently_opened_first():
    doc = replay(opened(ADA, 1, "d-b"), opened(ADA, 2, "d-a"), won(ADA, 3, "d-b", 2))
    assert [d["opportunity_id"] for d in doc["deals"]] == ["d-a", "d-b"]


def test_events_this_version_cannot_apply_are_refused_and_change_nothing():
    doc = replay(opened(ADA, 1, "d-1"))
    with pytest.raises(UnknownEvent, match="no known payload"):
        apply_pipeline_event(doc, envelope(ADA, "d-1", 2, 2))
    with pytest.raises(ValueError, match="amount: 'lots' is not a decimal number"):
        apply_pipeline_event(doc, amount_changed(ADA, 3, "d-1", 2, "lots"))
    with pytest.raises(ValueError, match="customer_id"):
        apply_pipeline_event(doc, opened("", 4, "d-2"))
    assert doc == replay(opened(ADA, 1, "d-1"))


# -- pipeline and stage names -----------------------------------------------------------


def define(*events, pipeline=None):
    for event in events:
        pipeline = apply_pipeline_definition(pipeline, event).doc
    return pipeline


def names(pipeline):
    return [(s["stage_id"], s["name"], s["retired"]) for s in pipeline["stages"]]


def test_stage_names_follow_the_pipeline_events():
    pipeline = define(pipeline_defined(1))
    assert pipeline["name"] == "Sales"
    assert pipeline["position"] == 1
    pipeline = define(
        stage_renamed(2, 2, "propose", "Proposal sent"),
        stage_added(3, 3, "demo", "Demo", 1),
        stages_reordered(4, 4, ["qualify", "propose", "demo", "negotiate", "won", "lost"]),
        stage_retired(5, 5, "qualify"),
        pipeline=pipeline,
    )
    assert names(pipeline) == [
        ("propose", "Proposal sent", False),
        ("demo", "Demo", False),
        ("negotiate", "Negotiation", False),
        ("won", "Closed won", False),
        ("lost", "Closed lost", False),
        ("qualify", "Qualify", True),
    ]
    # Redelivered: nothing changes.
    again = apply_pipeline_definition(pipeline, stage_renamed(2, 2, "propose", "Proposal"))
    assert again.applied is False
    assert again.doc == pipeline


def test_deals_show_the_names_as_last_known():
    doc = replay(
        opened(ADA, 10, "d-1"),
        moved(ADA, 11, "d-1", 2, "propose"),
        opened(ADA, 12, "d-2", stage_id="qualify", pipeline_id="pl-other"),
    )
    assert pipelines_referenced(doc) == ["pl-other", "pl-sales"]
    pipeline = define(pipeline_defined(1), stage_renamed(20, 2, "propose", "Proposal sent"))
    shown = with_names(doc, {"pl-sales": pipeline})
    assert [(d["pipeline_name"], d["stage_name"]) for d in shown["deals"]] == [
        ("", ""),  # pl-other's definition has not been seen yet
        ("Sales", "Proposal sent"),
    ]
    assert "pipeline_name" not in doc["deals"][0], "the stored document is not changed"
