"""Merged customers in the 360 view: the merge events on the survivor and the
contacts taken over, and the survivor's view folded when it is read (pure)."""

from __future__ import annotations

from typing import Any

from contact_events import envelope, interaction, person_profile, person_registered

from crm_analytics.document import Customer360
from crm_analytics.from_contacts import apply_event
from crm_analytics.query import fold_merged


def applied(doc: Customer360 | None, event: Any) -> Customer360:
    return apply_event(doc, event).doc


def merged(survivor: str, position: int, *others: str) -> Any:
    event = envelope(survivor, position, version=5)
    event.contacts_merged.merge_id = "m-1"
    event.contacts_merged.merged_ids.extend(others)
    event.contacts_merged.person_profile.CopyFrom(person_profile("Ada", "King"))
    return event


def merged_into(loser: str, survivor: str, position: int) -> Any:
    event = envelope(loser, position, version=3)
    event.contact_merged_into.merge_id = "m-1"
    event.contact_merged_into.survivor_id = survivor
    return event


def undone(survivor: str, position: int, *restored: str) -> Any:
    event = envelope(survivor, position, version=6)
    event.contact_merge_undone.merge_id = "m-1"
    event.contact_merge_undone.restored_ids.extend(restored)
    event.contact_merge_undone.person_profile.CopyFrom(person_profile("Ada", "Lovelace"))
    return event


def unmerged(loser: str, position: int) -> Any:
    event = envelope(loser, position, version=4)
    event.contact_unmerged.merge_id = "m-1"
    return event


def test_a_merge_links_the_documents_and_an_undo_unlinks_them() -> None:
    ada = applied(None, person_registered("ada", 1))
    dup = applied(None, person_registered("dup", 2, given="Ada", family="K."))
    ada = applied(ada, merged("ada", 10, "dup"))
    dup = applied(dup, merged_into("dup", "ada", 11))
    assert ada["merged_ids"] == ["dup"] and ada["family_name"] == "King"
    assert ada["timeline"][0]["kind"] == "profile.merged"
    assert dup["merged_into"] == "ada"

    ada = applied(ada, undone("ada", 12, "dup"))
    dup = applied(dup, unmerged("dup", 13))
    assert ada["merged_ids"] == [] and ada["family_name"] == "Lovelace"
    assert "merged_into" not in dup
    # Redelivered: the positions make each event count once.
    assert applied(ada, undone("ada", 12, "dup")) == ada


def test_the_survivors_view_folds_in_the_merged_documents_each_once() -> None:
    ada = applied(None, person_registered("ada", 1))
    ada = applied(ada, interaction("ada", 3, "i-ada"))
    dup = applied(None, person_registered("dup", 2, given="Ada", family="K."))
    dup = applied(dup, interaction("dup", 4, "i-dup"))
    deal = {"opportunity_id": "o-1", "name": "Engines", "amount": "10.00", "currency": "EUR"}
    dup["deals"] = [deal]  # type: ignore[typeddict-item]
    dup["companies"] = [{"company_id": "c-1", "company_name": "Acme", "role": "cto"}]  # type: ignore[typeddict-item]
    ada["deals"] = [deal]  # type: ignore[typeddict-item]  # the same deal, already re-keyed
    view = fold_merged(ada, [dup])
    assert [d["opportunity_id"] for d in view["deals"]] == ["o-1"]
    assert [c["company_id"] for c in view["companies"]] == ["c-1"]
    entries = [e["entry_id"] for e in view["timeline"]]
    assert "i-ada" in entries and "i-dup" in entries and len(entries) == len(set(entries))
    assert view["_id"] == "ada"
    assert "companies" not in ada or ada["companies"] == []  # the stored document is untouched
