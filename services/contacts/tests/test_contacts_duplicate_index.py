"""The duplicate index over a real event store (SQLite, then PostgreSQL): the
check, the scan, tombstones, the rules from configuration, and the REST routes
behind the access gate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from contacts_support import sqlite_settings

from crm_common.commands import Caller
from crm_contacts import duplicate_index
from crm_contacts.application import ContactsService, create_application
from crm_contacts.duplicate_index import DuplicateIndex, rules_from_environment
from crm_contacts.duplicates import DEFAULT_RULES, facts_for_company, facts_for_person
from crm_contacts.inputs import (
    ChannelInput,
    CompanyChanges,
    CompanyLink,
    NewCompany,
    NewPerson,
    PersonChanges,
)
from crm_contacts.rest_api import create_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for

WEB = Caller(actor="web-form", client="website")
SHOP = Caller(actor="shop", client="point-of-sale")


@pytest.fixture
def index(service: ContactsService) -> Iterator[DuplicateIndex]:
    opened = DuplicateIndex.open(service.app)
    yield opened
    opened.close()


async def person(
    service: ContactsService, caller: Caller, given: str, family: str, *channels: ChannelInput
) -> str:
    new = NewPerson(given_name=given, family_name=family, channels=channels)
    return (await service.create_person(caller, new)).contact.id


async def company(service: ContactsService, name: str, domain: str) -> str:
    return (await service.create_company(WEB, NewCompany(name=name, domain=domain))).contact.id


def email(address: str) -> ChannelInput:
    return ChannelInput("email", address)


def phone(number: str) -> ChannelInput:
    return ChannelInput("phone", number)


async def test_a_person_created_twice_through_two_channels_is_found_with_its_reason(
    service: ContactsService, index: DuplicateIndex
) -> None:
    ada = await person(service, WEB, "Ada", "Lovelace", email("Ada@Example.org"))
    king = await person(service, SHOP, "Augusta", "King", email("ada@example.org"))

    # Before a third create: the same email, however it is typed.
    found = index.check(facts_for_person("", "A. King", ["ada@example.org"], []))
    # Equal scores: by id.
    assert [(c.match.other, c.name) for c in found] == sorted(
        [(ada, "Ada Lovelace"), (king, "Augusta King")]
    )
    assert [r.rule for r in found[0].match.reasons] == ["email"]
    assert found[0].match.score == 1.0

    # An existing contact's look-alikes: the other one, never itself.
    own = index.facts_of(king)
    assert own is not None
    [match] = index.check(own)
    assert (match.match.other, match.match.reasons[0].detail) == (ada, "same email ada@example.org")

    # A phone in common, written differently: found by the phone rule.
    grace = await person(service, WEB, "Grace", "Hopper", phone("+1 (202) 555-0143"))
    hopper = await person(service, SHOP, "G.", "Hopper", phone("001 202 555 0143"))
    other = index.facts_of(hopper)
    assert other is not None
    [by_phone] = index.check(other)
    assert (by_phone.match.other, [r.rule for r in by_phone.match.reasons]) == (grace, ["phone"])
    assert by_phone.match.score == DEFAULT_RULES.rules[1].score


async def test_names_alike_at_one_domain_are_look_alikes_and_unalike_names_are_not(
    service: ContactsService, index: DuplicateIndex
) -> None:
    acme = await company(service, "Acme Corporation", "acme-corp.com")
    jon = await person(service, WEB, "Jonathan", "Smith", email("jon@acme-corp.com"))
    # No email in common: the company link gives the second one the domain.
    jonathon = await person(service, SHOP, "Jonathon", "Smith", email("jsmith@gmail.com"))
    await service.link_person_to_company(WEB, CompanyLink(jonathon, acme))
    await person(service, SHOP, "Maria", "Garcia", email("maria@acme-corp.com"))

    facts = index.facts_of(jonathon)
    assert facts is not None and "acme-corp.com" in facts.domains
    [match] = index.check(facts)
    assert match.match.other == jon
    assert [r.rule for r in match.match.reasons] == ["name_domain"]
    assert "same domain acme-corp.com" in match.match.reasons[0].detail

    # A company alike by name and domain, before it is created.
    [same] = index.check(facts_for_company("", "ACME Corp.", "acme-corp.com"))
    assert (same.match.other, same.kind, same.name) == (acme, "company", "Acme Corporation")

    # The same names at a free mail provider's domain say nothing.
    await person(service, WEB, "Li", "Wei", email("li.wei@gmail.com"))
    lone = facts_for_person("", "Li Wei", ["wei.li@gmail.com"], [])
    assert index.check(lone) == []


async def test_a_company_domain_change_rekeys_the_persons_working_there(
    service: ContactsService, index: DuplicateIndex
) -> None:
    initech = await company(service, "Initech", "initech.com")
    peter = await person(service, WEB, "Peter", "Gibbons", email("peter@gmail.com"))
    await service.link_person_to_company(WEB, CompanyLink(peter, initech))
    peter_facts = index.facts_of(peter)
    assert peter_facts is not None and peter_facts.domains == {"initech.com"}
    changes = CompanyChanges(id=initech, fields=frozenset({"domain"}), domain="initrode.com")
    await service.update_company(WEB, changes)
    moved = index.facts_of(peter)
    assert moved is not None and moved.domains == {"initrode.com"}
    look_alike = facts_for_person("", "Peter Gibbon", [], [], ["initrode.com"])
    assert [c.match.other for c in index.check(look_alike)] == [peter]


async def test_the_scan_lists_each_pair_once_with_its_best_score(
    service: ContactsService, index: DuplicateIndex
) -> None:
    acme = await company(service, "Acme", "acme.io")
    one = await person(
        service, WEB, "Ada", "Lovelace", email("ada@acme.io"), phone("+44 20 7946 0018")
    )
    two = await person(
        service, SHOP, "Ada", "Lovelace", email("ada@acme.io"), phone("+442079460018")
    )
    await service.link_person_to_company(WEB, CompanyLink(two, acme))
    three = await person(service, SHOP, "Grace", "Hopper", phone("+1 202 555 0143"))
    four = await person(service, WEB, "Grace", "Hopper", phone("+12025550143"))
    await person(service, WEB, "Alan", "Turing", email("alan@example.net"))

    result = index.scan()
    pairs = {(p.first, p.second): p for p in result.pairs}
    assert set(pairs) == {tuple(sorted((one, two))), tuple(sorted((three, four)))}
    ada = pairs[tuple(sorted((one, two)))]
    # Email, phone and name at one domain all hold: one pair, scored by the best.
    assert ada.score == 1.0
    assert {r.rule for r in ada.reasons} == {"email", "phone", "name_domain"}
    assert pairs[tuple(sorted((three, four)))].score == 0.9
    assert [p.score for p in result.pairs] == [1.0, 0.9]
    assert result.names[one] == "Ada Lovelace"
    # Asked again with nothing written: the same result, not a new scan.
    assert index.scan() is result


async def test_a_merged_tombstone_is_no_candidate(
    service: ContactsService, index: DuplicateIndex
) -> None:
    ada = await person(service, WEB, "Ada", "Lovelace", email("ada@example.org"))
    king = await person(service, SHOP, "Augusta", "King", email("ada@example.org"))
    assert len(index.scan().pairs) == 1

    await service.merge_contacts(WEB, ada, [king], {})

    assert index.facts_of(king) is None
    probe = facts_for_person("", "Ada King", ["ada@example.org"], [])
    assert [c.match.other for c in index.check(probe)] == [ada]
    assert index.scan().pairs == ()


async def test_an_edit_that_removes_the_shared_email_removes_the_pair(
    service: ContactsService, index: DuplicateIndex
) -> None:
    ada = await person(service, WEB, "Ada", "Lovelace", email("ada@example.org"))
    await person(service, SHOP, "Augusta", "King", email("ada@example.org"))
    await service.update_person(
        WEB,
        PersonChanges(
            id=ada, fields=frozenset({"channels"}), channels=(email("lovelace@example.com"),)
        ),
    )
    assert index.scan().pairs == ()


def test_rules_come_from_json_or_a_yaml_file_and_bad_ones_are_refused(tmp_path: Path) -> None:
    assert rules_from_environment({}) is DEFAULT_RULES
    given = {"rules": [{"kind": "email", "score": 0.95}], "report_threshold": 0.6}
    rules = rules_from_environment({"CRM_CONTACTS_DUPLICATE_RULES": json.dumps(given)})
    assert [(r.kind, r.score) for r in rules.rules] == [("email", 0.95)]
    assert rules.report_threshold == 0.6
    file = tmp_path / "rules.yaml"
    file.write_text(
        "rules:\n"
        "  - {kind: phone, score: 0.7}\n"
        "  - {kind: name_domain, score: 0.8, threshold: 0.9}\n"
    )
    rules = rules_from_environment({"CRM_CONTACTS_DUPLICATE_RULES_FILE": str(file)})
    assert [r.kind for r in rules.rules] == ["phone", "name_domain"]
    for bad in ("{", '{"rules": []}', '{"rules": [{"kind": "fax", "score": 1}]}', "[]"):
        with pytest.raises(ValueError):
            rules_from_environment({"CRM_CONTACTS_DUPLICATE_RULES": bad})


async def test_rules_without_a_kind_ignore_its_keys(service: ContactsService) -> None:
    only_phone = rules_from_environment(
        {"CRM_CONTACTS_DUPLICATE_RULES": '{"rules": [{"kind": "phone", "score": 0.9}]}'}
    )
    index = DuplicateIndex.open(service.app, rules=only_phone)
    try:
        await person(service, WEB, "Ada", "Lovelace", email("ada@example.org"))
        await person(service, SHOP, "Augusta", "King", email("ada@example.org"))
        assert index.check(facts_for_person("", "Ada", ["ada@example.org"], [])) == []
        assert index.scan().pairs == ()
    finally:
        index.close()


async def test_a_key_too_common_is_left_out_of_a_check(
    service: ContactsService, index: DuplicateIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(duplicate_index, "MAX_CANDIDATES_PER_KEY", 3)
    ada = await person(service, WEB, "Ada", "Lovelace", email("ada@bigcorp.example"))
    facts = facts_for_person("", "Ada Lovelace", ["a.lovelace@bigcorp.example"], [])
    assert [c.match.other for c in index.check(facts)] == [ada]  # names alike, one domain

    for i in range(3):
        await person(service, SHOP, "Someone", f"Else{i}", email(f"s{i}@bigcorp.example"))
    # Four at the domain: it says nothing any more; an email in common still does.
    assert index.check(facts) == []
    both = facts_for_person("", "Ada Lovelace", ["ada@bigcorp.example"], [])
    assert [(c.match.other, c.match.reasons[0].rule) for c in index.check(both)] == [(ada, "email")]


# -- REST -------------------------------------------------------------------------------------


@pytest.fixture
async def rest(
    sqlite_service: ContactsService, identity: Identity
) -> AsyncIterator[tuple[httpx.AsyncClient, Identity]]:
    app = create_app(
        sqlite_service,
        gate_for("contacts", identity),
        pseudonym_key=identity.pseudonym_key.read_bytes(),
    )
    transport = httpx.ASGITransport(app=app)
    sales = bearer(identity.mint("sales", subject="grace", client="rest-tests"))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://contacts", headers=sales
    ) as client:
        yield client, identity
    app.state.duplicates.close()


def fields(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    return [d["field"] for d in response.json()["detail"]]


async def test_rest_check_list_and_scan_round_trip(
    rest: tuple[httpx.AsyncClient, Identity], sqlite_service: ContactsService
) -> None:
    http, _ = rest
    ada = await person(sqlite_service, WEB, "Ada", "Lovelace", email("ada@example.org"))
    king = await person(sqlite_service, SHOP, "Augusta", "King", email("Ada@example.org"))
    for i in range(3):
        await person(sqlite_service, WEB, "Twin", f"No{i}", phone("+41 44 668 18 00"))

    checked = await http.post(
        "/duplicates/check",
        json={"kind": "person", "given_name": "Ada", "emails": [" ADA@example.org "]},
    )
    assert checked.status_code == 200, checked.text
    found = checked.json()["duplicates"]
    assert [(d["id"], d["name"], d["score"]) for d in found] == sorted(
        [(ada, "Ada Lovelace", 1.0), (king, "Augusta King", 1.0)]
    )
    assert found[0]["reasons"] == [
        {"rule": "email", "score": 1.0, "detail": "same email ada@example.org"}
    ]

    listed = await http.get(f"/contacts/{king}/duplicates")
    assert [d["id"] for d in listed.json()["duplicates"]] == [ada]
    assert (await http.get("/contacts/no-such-id/duplicates")).status_code == 404

    # Four pairs: paged two by two, each once, best first.
    seen: list[tuple[str, str]] = []
    token = ""
    scores = []
    while True:
        page = await http.get("/duplicates", params={"page_size": 2, "page_token": token})
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["total_size"] == 4
        seen += [(p["first"]["id"], p["second"]["id"]) for p in body["pairs"]]
        scores += [p["score"] for p in body["pairs"]]
        token = body["next_page_token"]
        if not token:
            break
    assert len(seen) == len(set(seen)) == 4
    assert scores == sorted(scores, reverse=True) == [1.0, 0.9, 0.9, 0.9]
    best = await http.get("/duplicates", params={"min_score": 0.95})
    [pair] = best.json()["pairs"]
    assert {
        (pair["first"]["id"], pair["first"]["name"]),
        (pair["second"]["id"], pair["second"]["name"]),
    } == {
        (ada, "Ada Lovelace"),
        (king, "Augusta King"),
    }


async def test_rest_refuses_bad_input_and_analysts(
    rest: tuple[httpx.AsyncClient, Identity], sqlite_service: ContactsService
) -> None:
    http, identity = rest
    bad = await http.post(
        "/duplicates/check",
        json={"given_name": "Ada", "emails": ["ok@example.org", "not-an-email"], "phones": ["12"]},
    )
    assert fields(bad) == ["emails[1]", "phones[0]"]
    assert fields(await http.post("/duplicates/check", json={"emails": ["a@b.org"]})) == ["name"]
    assert fields(await http.post("/duplicates/check", json={"name": "X", "kind": "robot"})) == [
        "kind"
    ]
    assert fields(
        await http.post("/duplicates/check", json={"name": "X", "company_ids": ["nope"]})
    ) == ["company_ids[0]"]
    assert fields(
        await http.post("/duplicates/check", json={"kind": "company", "name": "X", "domain": "no"})
    ) == ["domain"]
    assert fields(await http.get("/duplicates", params={"page_token": "%%%"})) == ["page_token"]
    assert fields(await http.get("/duplicates", params={"min_score": 2})) == ["min_score"]

    analyst = bearer(identity.mint("analyst", subject="ann", client="rest-tests"))
    for response in (
        await http.post("/duplicates/check", json={"name": "Ada"}, headers=analyst),
        await http.get("/duplicates", headers=analyst),
        await http.get("/contacts/x/duplicates", headers=analyst),
    ):
        assert response.status_code == 403, response.text


def test_the_service_refuses_to_start_with_malformed_rules_or_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read once, when the service starts (the check on create and the routes use them).
    monkeypatch.setenv("CRM_CONTACTS_DUPLICATE_RULES", '{"rules": [{"kind": "fax", "score": 1}]}')
    app = create_application(sqlite_settings(tmp_path))
    try:
        with pytest.raises(ValueError, match="rule kind"):
            ContactsService(app)
        monkeypatch.delenv("CRM_CONTACTS_DUPLICATE_RULES")
        monkeypatch.setenv("CRM_CONTACTS_DUPLICATES_ON_CREATE", "sometimes")
        with pytest.raises(ValueError, match="CRM_CONTACTS_DUPLICATES_ON_CREATE"):
            ContactsService(app)
    finally:
        app.close()
