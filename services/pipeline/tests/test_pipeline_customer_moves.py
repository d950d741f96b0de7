"""Pure domain rules of moving a deal's, lead's or activity's customer when
contacts are merged, and of giving it back when the merge is undone."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from test_pipeline_domain import new_lead, open_deal, sales_pipeline

from crm_pipeline.domain import Activity, Opportunity

T1 = datetime(2026, 1, 6, 9, 0, tzinfo=UTC)


def moved_fields(deal: Opportunity) -> list[tuple[str, str, str, list[str], bool]]:
    return [
        (e.customer_id, e.from_customer_id, e.to_customer_id, e.fields, e.undone)
        for e in deal.collect_events()
        if isinstance(e, Opportunity.CustomerMoved)
    ]


def test_a_company_deal_moves_only_the_person_that_was_merged() -> None:
    deal = open_deal(sales_pipeline())

    assert deal.move_customer(["person-1"], "person-9", "merge-1", T1) == 1

    assert (deal.customer_id, deal.person_id, deal.company_id) == (
        "company-1",
        "person-9",
        "company-1",
    )
    # The published key stays the deal's customer, the company.
    assert moved_fields(deal) == [("company-1", "person-1", "person-9", ["person_id"], False)]


def test_a_merge_moves_once_and_its_undo_gives_back_only_what_it_moved() -> None:
    pipeline = sales_pipeline()
    deal = open_deal(pipeline, customer_id="person-1", company_id="")
    deal.move_customer(["person-1", "person-2"], "person-9", "merge-1", T1)
    assert deal.move_customer(["person-1"], "person-9", "merge-1", T1) == 0
    deal.win(pipeline, T1 + timedelta(hours=1), date(2026, 1, 6))
    deal.collect_events()

    assert deal.undo_customer_move("merge-1", T1 + timedelta(days=1)) == 1

    assert (deal.customer_id, deal.person_id, deal.status) == ("person-1", "person-1", "won")
    assert moved_fields(deal) == [
        ("person-1", "person-9", "person-1", ["customer_id", "person_id"], True)
    ]
    # Undone once: again, or the merge delivered again, changes nothing.
    assert deal.undo_customer_move("merge-1", T1 + timedelta(days=1)) == 0
    assert deal.move_customer(["person-1"], "person-9", "merge-1", T1) == 0


def test_an_undo_leaves_a_field_a_later_merge_moved_on() -> None:
    deal = open_deal(sales_pipeline(), customer_id="person-1", company_id="")
    deal.move_customer(["person-1"], "person-9", "merge-1", T1)
    deal.move_customer(["person-9"], "person-7", "merge-2", T1)
    deal.collect_events()

    # The first merge's survivor is no longer the deal's: nothing to give back.
    assert deal.undo_customer_move("merge-1", T1) == 0
    assert deal.customer_id == "person-7"
    assert deal.undo_customer_move("merge-2", T1) == 1
    assert deal.customer_id == "person-9"


def test_an_undo_gives_back_only_the_restored_contacts() -> None:
    lead = new_lead()
    lead.qualify(70, T1)
    lead.convert(person_id="person-1", company_id="", opportunity_id="deal-1", at=T1)
    lead.move_customer(["person-1"], "person-9", "merge-1", T1)

    assert lead.undo_customer_move("merge-1", T1, restored=["person-3"]) == 0
    assert lead.undo_customer_move("merge-1", T1, restored=["person-1"]) == 1
    assert (lead.customer_id, lead.person_id) == ("person-1", "person-1")


def test_an_erased_activity_reads_erased_and_is_marked_once() -> None:
    deal = open_deal(sales_pipeline(), customer_id="person-1", company_id="")
    activity = Activity.schedule(
        subject=deal, kind="call", title="Call Ada", owner="ann", due_at=T1, at=T1
    )
    activity.complete("She said yes", T1)

    assert activity.erase_personal_data("dsr-1", T1) is True
    assert activity.erase_personal_data("dsr-1", T1) is False

    assert (activity.title, activity.outcome, activity.status) == (
        "[erased]",
        "[erased]",
        "completed",
    )
    assert [type(e).__name__ for e in activity.collect_events()][-1] == "PersonalDataErased"
