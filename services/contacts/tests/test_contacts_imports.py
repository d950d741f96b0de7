"""CSV import rows (crm_contacts.imports): reading a file against a column
mapping, every bad row reported with its line and reasons; pure domain."""

from __future__ import annotations

import io

import pytest

from crm_contacts.domain import ContactKind
from crm_contacts.imports import ColumnMapping, ImportRow, MappingRefused, RowFailure, read_rows
from crm_contacts.validation import email_address

PERSONS = ColumnMapping(
    ContactKind.PERSON,
    {
        "First": "given_name",
        "Last": "family_name",
        "E-mail": "email",
        "Tel": "phone",
        "Tags": "tags",
        "Segment": "custom:segment",
    },
)


def rows(text: str, mapping: ColumnMapping = PERSONS):
    return list(
        read_rows(
            io.StringIO(text),
            mapping,
            custom_types={"segment": "choice"},
            normalise_match=email_address,
        )
    )


def test_rows_become_the_inputs_the_api_takes() -> None:
    [row] = rows(
        "First,Last,E-mail,Tel,Tags,Segment,Ignored\n"
        "Ada,Lovelace, Ada@Example.org ,+44 20 7946 0000,vip; newsletter,smb,x\n"
    )
    assert isinstance(row, ImportRow) and row.line == 2
    assert row.match_value == "ada@example.org"
    person = row.person
    assert person is not None
    assert (person.given_name, person.family_name) == ("Ada", "Lovelace")
    assert [(c.channel, c.address) for c in person.channels] == [
        ("email", "Ada@Example.org"),
        ("phone", "+44 20 7946 0000"),
    ]
    assert person.tags == ("vip", "newsletter")
    assert person.custom_fields["segment"].type == "choice"
    assert person.custom_fields["segment"].value == "smb"


def test_bad_rows_are_reported_with_line_and_reason_and_never_stop_the_others() -> None:
    found = rows(
        "First,Last,E-mail,Tel,Tags,Segment\n"
        "Ada,Lovelace,ada@example.org,,,\n"  # line 2
        "Bob,,not-an-email,,,\n"  # line 3
        "Cy,,,,,\n"  # line 4: nothing to match on
        '"Dee ""D""","Multi\nLine",ADA@example.org,,,\n'  # lines 5-6: the same email as line 2
        "Eve,,eve@example.org,,,,extra\n"  # line 7: a cell too many
        "Fay,,fay@example.org,,,\n"  # line 8
    )
    assert [(r.line, type(r).__name__) for r in found] == [
        (2, "ImportRow"),
        (3, "RowFailure"),
        (4, "RowFailure"),
        (6, "RowFailure"),
        (7, "RowFailure"),
        (8, "ImportRow"),
    ]
    failures = {r.line: r.reason for r in found if isinstance(r, RowFailure)}
    assert failures[3] == "email 'not-an-email' is not valid"
    assert failures[4] == "email is empty (the import matches on it)"
    assert failures[6] == "duplicate of line 2 (email ada@example.org)"
    assert failures[7] == "has 7 cells, the header 6"


def test_a_mapping_that_cannot_import_is_refused_before_any_row() -> None:
    with pytest.raises(MappingRefused, match="not in the file's header: 'Tel'"):
        rows("First,Last,E-mail,Tags,Segment\nA,B,a@example.org,,\n")
    with pytest.raises(MappingRefused, match="no custom field is defined for: tier"):
        list(
            read_rows(
                io.StringIO("E,T\na@example.org,x\n"),
                ColumnMapping(ContactKind.PERSON, {"E": "email", "T": "custom:tier"}),
            )
        )
    with pytest.raises(MappingRefused, match="'birthday' is not a person field"):
        ColumnMapping(ContactKind.PERSON, {"E": "email", "B": "birthday"})
    with pytest.raises(MappingRefused, match="is mapped from 'E' already"):
        ColumnMapping(ContactKind.PERSON, {"E": "email", "F": "email"})
    with pytest.raises(MappingRefused, match="'email' is not mapped"):
        ColumnMapping(ContactKind.PERSON, {"N": "given_name"})
    with pytest.raises(MappingRefused, match="no header line"):
        rows("")


def test_companies_match_on_their_domain_or_a_unique_custom_field() -> None:
    mapping = ColumnMapping.from_dict(
        {
            "kind": "company",
            "columns": {"Name": "name", "Web": "domain", "ERP": "custom:erp_no"},
            "match_on": "custom:erp_no",
        }
    )
    [row] = list(
        read_rows(
            io.StringIO("Name,Web,ERP\nAcme,acme.example,C-1\n"),
            mapping,
            custom_types={"erp_no": "text"},
        )
    )
    assert isinstance(row, ImportRow) and row.match_value == "C-1"
    assert row.company is not None and row.company.domain == "acme.example"
    assert (
        mapping.fingerprint()
        == ColumnMapping.from_dict(
            {
                "kind": "company",
                "columns": {"ERP": "custom:erp_no", "Web": "domain", "Name": "name"},
                "match_on": "custom:erp_no",
            }
        ).fingerprint()
    )
