"""Duplicate detection rules (crm_contacts.duplicates): pure domain tests."""

from __future__ import annotations

import pytest

from crm_contacts.duplicates import (
    DEFAULT_RULES,
    DuplicateRules,
    Facts,
    Rule,
    best_matches,
    compare,
    facts_for_company,
    facts_for_person,
    jaro_winkler,
    name_similarity,
    normalised_name,
    scan,
    web_domain,
)


def person(ident: str, name: str, emails=(), phones=(), companies=()) -> Facts:
    return facts_for_person(ident, name, list(emails), list(phones), list(companies))


def test_names_are_compared_without_case_accents_punctuation_or_word_order() -> None:
    assert normalised_name("  Zoë  O'Brien-Smith ") == "zoe o brien smith"
    assert name_similarity("Ada Lovelace", "LOVELACE, Ada") == 1.0
    assert name_similarity("Jonathan Smith", "Jonathon Smith") > 0.9
    assert name_similarity("Ada Lovelace", "Grace Hopper") < 0.6
    assert jaro_winkler("martha", "marhta") == pytest.approx(0.9611, abs=1e-4)
    assert jaro_winkler("", "x") == 0.0


def test_same_email_is_the_strongest_evidence_and_says_so() -> None:
    a = person("a", "Ada Lovelace", emails=["ada@example.org"])
    b = person("b", "A. King", emails=["ada@example.org"], phones=["+441234567890"])
    match = compare(a, b)
    assert match is not None and match.other == "b" and match.score == 1.0
    assert match.reasons[0].rule == "email"
    assert "ada@example.org" in match.reasons[0].detail


def test_same_phone_scores_below_email() -> None:
    a = person("a", "Ada", phones=["+441234567890"])
    b = person("b", "Someone Else", phones=["+441234567890"])
    match = compare(a, b)
    assert match is not None and match.score == 0.9 and match.reasons[0].rule == "phone"


def test_similar_names_count_only_with_a_shared_work_domain() -> None:
    a = person("a", "Jonathan Smith", emails=["jsmith@acme.example"])
    b = person("b", "Jonathon Smith", emails=["jon@acme.example"])
    c = person("c", "Jonathon Smith", emails=["jon@gmail.com"])  # a free mail domain
    d = person("d", "Jonathon Smith", companies=["https://www.acme.example/about"])
    ab = compare(a, b)
    assert ab is not None and ab.reasons[0].rule == "name_domain"
    assert "acme.example" in ab.reasons[0].detail and 0.7 < ab.score < 0.8
    assert compare(a, c) is None
    assert compare(a, d) is not None  # the domain of the company the person works at
    unlike = person("e", "Maria Garcia", emails=["maria@acme.example"])
    assert compare(a, unlike) is None


def test_persons_and_companies_are_never_paired_nor_a_contact_with_itself() -> None:
    company = facts_for_company("c1", "Acme", "acme.example")
    someone = person("p1", "Acme", emails=["info@acme.example"])
    assert compare(company, someone) is None
    assert compare(someone, someone) is None


def test_rules_are_data_and_bad_rules_are_refused_clearly() -> None:
    rules = DuplicateRules.from_config(
        {"rules": [{"kind": "phone", "score": 0.6}], "report_threshold": 0.7}
    )
    a = person("a", "A", phones=["+15551234567"], emails=["x@example.org"])
    b = person("b", "B", phones=["+15551234567"], emails=["x@example.org"])
    assert compare(a, b, rules) is None  # email is not a rule here; phone scores below 0.7
    with pytest.raises(ValueError, match="rule kind must be one of"):
        Rule("surname", 0.5)
    with pytest.raises(ValueError, match="score must be in"):
        Rule("email", 1.5)
    with pytest.raises(ValueError, match="on_create"):
        DuplicateRules((Rule("email", 1.0),), on_create="ignore")
    with pytest.raises(ValueError, match="malformed"):
        DuplicateRules.from_config({"rules": [{"score": 1}]})


def test_best_matches_come_best_first() -> None:
    new = person("n", "Jonathan Smith", emails=["js@acme.example"], phones=["+15550001111"])
    candidates = [
        person("phone", "Other", phones=["+15550001111"]),
        person("email", "Other", emails=["js@acme.example"]),
        person("name", "Jonathon Smith", emails=["j@acme.example"]),
        person("none", "Nobody", emails=["n@else.example"]),
    ]
    assert [m.other for m in best_matches(new, candidates)] == ["email", "phone", "name"]


def test_a_scan_finds_each_pair_once_with_its_best_reason() -> None:
    base = [
        person("1", "Ada Lovelace", emails=["ada@example.org"], phones=["+441111111111"]),
        person("2", "Ada King", emails=["ada@example.org"], phones=["+441111111111"]),
        person("3", "Grace Hopper", phones=["+15550002222"]),
        person("4", "G. Hopper", phones=["+15550002222"]),
        person("5", "Alan Turing", emails=["alan@example.net"]),
        facts_for_company("6", "Acme Ltd", "https://acme.example"),
        facts_for_company("7", "ACME Limited", "acme.example"),
    ]
    pairs = scan(base, DEFAULT_RULES)
    assert [(p.first, p.second, p.score) for p in pairs][:2] == [("1", "2", 1.0), ("3", "4", 0.9)]
    assert {(p.first, p.second) for p in pairs} == {("1", "2"), ("3", "4"), ("6", "7")}


def test_web_domains_are_read_from_urls() -> None:
    assert web_domain("https://www.Example.com/about") == "example.com"
    assert web_domain("example.com:8443") == "example.com"
    assert web_domain("localhost") is None
