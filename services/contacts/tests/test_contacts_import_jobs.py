"""CSV import jobs (crm_contacts.import_jobs, rest_imports): the in-process
service on SQLite and PostgreSQL, the REST routes over ASGI behind the gate.

What a user notices: good rows become contacts, every bad row is reported
with its line and reason, a second run of the same file and a dry run write
nothing, an update touches only the mapped fields, and a job stopped midway
ends, once resumed, with the contacts an uninterrupted one makes.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from contacts_support import log_length

from crm_common.commands import Caller
from crm_common.errors import RequestTooLarge
from crm_common.settings import Settings
from crm_contacts.application import ContactsService, create_application
from crm_contacts.definitions import FieldDefinitionInput
from crm_contacts.domain import PersonProfile
from crm_contacts.import_jobs import ImportJobs, ImportView, JobState, Outcome
from crm_contacts.imports import ColumnMapping, MappingRefused
from crm_contacts.inputs import ChannelInput, ContactQuery, CustomFieldInput, NewCompany, NewPerson
from crm_contacts.rest_api import create_app
from crm_deploy.identity import Identity
from crm_deploy.testing import bearer, gate_for

IMPORTER = Caller(actor="importer", client="import-tests")
ADMIN = Caller(actor="admin", client="import-tests")
PERSONS = {
    "kind": "person",
    "columns": {
        "First": "given_name",
        "Last": "family_name",
        "Email": "email",
        "Segment": "custom:segment",
        "Region": "custom:region",
    },
}
HEADER = "First,Last,Email,Segment,Region"


async def chunks(data: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def csv_bytes(header: str, rows: list[str]) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


async def define_fields(service: ContactsService) -> None:
    """A choice field and a required text field on persons."""
    await service.fields.define(
        ADMIN,
        "person",
        FieldDefinitionInput("segment", "Segment", "choice", options=("smb", "ent")),
    )
    await service.fields.define(
        ADMIN, "person", FieldDefinitionInput("region", "Region", "text", required=True)
    )


async def run(jobs: ImportJobs, data: bytes, mapping: Mapping[str, Any] = PERSONS) -> ImportView:
    view = await jobs.submit(IMPORTER, ColumnMapping.from_dict(mapping), chunks(data))
    return await jobs.wait(view.id)


async def all_failures(jobs: ImportJobs, job_id: str) -> dict[int, str]:
    found: dict[int, str] = {}
    after = 0
    while True:
        page = await jobs.failures(job_id, after, 500)
        found.update((f.line, f.reason) for f in page.failures)
        if not page.next_after:
            return found
        after = page.next_after


async def persons(service: ContactsService) -> dict[str, PersonProfile]:
    """Every person by email, walking the directory's pages."""
    found: dict[str, PersonProfile] = {}
    token = ""
    while True:
        page = await service.list_contacts(
            ContactQuery(kind="person", page_size=200, page_token=token)
        )
        for view in page.contacts:
            assert isinstance(view.profile, PersonProfile)
            for channel in view.profile.channels:
                if str(channel.channel) == "email":
                    assert channel.address not in found, f"{channel.address} twice"
                    found[channel.address] = view.profile
        if not page.next_page_token:
            return found
        token = page.next_page_token


def counts(view: ImportView) -> dict[str, int]:
    return {str(o): n for o, n in view.progress.counts.items() if n}


# -- the file of the issue: 10,000 rows, a few hundred bad ones ----------------------------


def big_file(rows: int = 10_000) -> tuple[bytes, dict[int, str]]:
    """The file and, by line, what each bad row's reason must name."""
    lines: list[str] = []
    bad: dict[int, str] = {}
    for i in range(rows):
        line = i + 2  # the header is line 1
        email, segment, region = f"person{i}@example.com", ("smb", "ent")[i % 2], f"r{i % 7}"
        if i % 50 == 0:
            email, bad[line] = f"not-an-email-{i}", f"email 'not-an-email-{i}' is not valid"
        elif i % 71 == 0 and (i - 1) % 50 != 0:
            email = f"PERSON{i - 1}@example.com"
            bad[line] = f"duplicate of line {line - 1} (email person{i - 1}@example.com)"
        elif i % 89 == 0:
            region, bad[line] = "", "custom_fields.region: is required (Region)"
        elif i % 97 == 0:
            segment, bad[line] = "galaxy", "custom_fields.segment.value: 'galaxy' is not one of"
        lines.append(f"Given{i},Family{i},{email},{segment},{region}")
    return csv_bytes(HEADER, lines), bad


async def test_a_big_file_imports_its_good_rows_reports_every_bad_one_and_runs_again_as_nothing(
    service: ContactsService,
) -> None:
    await define_fields(service)
    data, bad = big_file()
    assert 300 < len(bad) < 600
    jobs = ImportJobs(service)
    try:
        first = await run(jobs, data)
        assert first.state is JobState.DONE and first.error == ""
        good = 10_000 - len(bad)
        assert counts(first) == {"created": good, "failed": len(bad)}
        assert first.progress.rows == 10_000 and first.progress.line == 10_001

        failures = await all_failures(jobs, first.id)
        assert set(failures) == set(bad)
        for line, reason in bad.items():
            assert reason in failures[line], (line, failures[line])

        imported = await persons(service)
        assert len(imported) == good
        sample = imported["person1@example.com"]
        assert (sample.given_name, sample.family_name) == ("Given1", "Family1")
        assert sample.custom_fields["segment"].value == "ent"

        stored = log_length(service.app)
        again = await run(jobs, data)
        assert again.state is JobState.DONE
        assert counts(again) == {"skipped": good, "failed": len(bad)}
        assert set(await all_failures(jobs, again.id)) == set(bad)
        assert log_length(service.app) == stored
    finally:
        await jobs.aclose()


# -- dry run, updates, companies --------------------------------------------------------


async def existing_ada(service: ContactsService) -> str:
    written = await service.create_person(
        IMPORTER,
        NewPerson(
            given_name="Ada",
            family_name="Lovelace",
            channels=(
                ChannelInput("email", "ada@example.com", preferred=True),
                ChannelInput("phone", "+44 20 7946 0018"),
            ),
            tags=("vip",),
            custom_fields={
                "segment": CustomFieldInput("choice", "smb"),
                "region": CustomFieldInput("text", "north"),
            },
            owner="grace",
        ),
    )
    return str(written.outcome.id)


async def test_a_dry_run_reports_what_the_import_would_do_and_writes_nothing(
    service: ContactsService,
) -> None:
    await define_fields(service)
    await existing_ada(service)
    await service.create_person(
        IMPORTER,
        NewPerson(
            given_name="Bob",
            channels=(ChannelInput("email", "bob@example.com"),),
            custom_fields={"region": CustomFieldInput("text", "south")},
        ),
    )
    data = csv_bytes(
        HEADER,
        [
            "Ada,Lovelace,ADA@example.com,ent,north",  # an update: segment
            "Bob,,bob@example.com,,south",  # as it is: unchanged
            "Cy,Young,cy@example.com,smb,east",  # new
            "Dee,,dee@example.com,smb,",  # missing the required region
        ],
    )
    jobs = ImportJobs(service)
    try:
        stored = log_length(service.app)
        dry = await jobs.submit(
            IMPORTER, ColumnMapping.from_dict(PERSONS), chunks(data), dry_run=True
        )
        assert dry.state is JobState.DONE and dry.dry_run
        assert counts(dry) == {"created": 1, "updated": 1, "unchanged": 1, "failed": 1}
        assert [(f.line, f.reason) for f in dry.failures] == [
            (5, "custom_fields.region: is required (Region)")
        ]
        assert log_length(service.app) == stored
        assert set(await persons(service)) == {"ada@example.com", "bob@example.com"}

        real = await run(jobs, data)
        assert counts(real) == counts(dry)
        assert set(await persons(service)) == {
            "ada@example.com",
            "bob@example.com",
            "cy@example.com",
        }
    finally:
        await jobs.aclose()


async def test_an_update_by_email_changes_only_the_mapped_fields(service: ContactsService) -> None:
    await define_fields(service)
    ada = await existing_ada(service)
    mapping = {
        "kind": "person",
        "columns": {
            "E-mail": "email",
            "Given": "given_name",
            "Segment": "custom:segment",
            "Mobile": "mobile",
        },
    }
    data = csv_bytes(
        "E-mail,Given,Segment,Mobile,Ignored", ["Ada@Example.com,Augusta,ent,+44 7700 900123,x"]
    )
    jobs = ImportJobs(service)
    try:
        view = await run(jobs, data, mapping)
        assert counts(view) == {"updated": 1}
        after = service.load(ada)
        profile = after.profile
        assert isinstance(profile, PersonProfile)
        assert (profile.given_name, profile.family_name) == ("Augusta", "Lovelace")
        assert profile.custom_fields["segment"].value == "ent"
        assert profile.custom_fields["region"].value == "north"
        assert profile.tags == ("vip",) and profile.owner == "grace"
        assert sorted((str(c.channel), c.address) for c in profile.channels) == [
            ("email", "ada@example.com"),
            ("phone", "+442079460018"),
            ("sms", "+447700900123"),
        ]
        assert after.version == 2

        # The same values again, another file (a new request id): nothing to change, no event.
        stored = log_length(service.app)
        same = csv_bytes(
            "E-mail,Given,Segment,Mobile", ["ada@example.com,Augusta,ent,+447700900123"]
        )
        view = await run(jobs, same, mapping)
        assert counts(view) == {"unchanged": 1}
        assert log_length(service.app) == stored and service.load(ada).version == 2
    finally:
        await jobs.aclose()


async def test_companies_match_on_their_domain(service: ContactsService) -> None:
    written = await service.create_company(
        IMPORTER, NewCompany(name="Acme", domain="acme.example", industry="rockets")
    )
    mapping = {
        "kind": "company",
        "columns": {"Name": "name", "Web": "domain", "Tags": "tags"},
        "match_on": "domain",
    }
    data = csv_bytes(
        "Name,Web,Tags",
        ["Acme Corp,ACME.example.,b2b", "Globex,globex.example,", "Bad,not a domain,"],
    )
    jobs = ImportJobs(service)
    try:
        view = await run(jobs, data, mapping)
        assert counts(view) == {"updated": 1, "created": 1, "failed": 1}
        acme = service.load(written.outcome.id).profile
        assert (acme.name, acme.tags, acme.industry) == (
            "Acme Corp",
            ("b2b",),
            "rockets",
        )
        page = await service.list_contacts(ContactQuery(kind="company"))
        assert sorted(v.display_name for v in page.contacts) == ["Acme Corp", "Globex"]
        assert (await all_failures(jobs, view.id)) == {4: "domain 'not a domain' is not valid"}
    finally:
        await jobs.aclose()


async def test_refused_mappings_keep_nothing(service: ContactsService) -> None:
    jobs = ImportJobs(service)
    try:
        data = csv_bytes("Name,Mail", ["Ada,ada@example.com"])
        with pytest.raises(MappingRefused) as refused:
            await jobs.submit(IMPORTER, ColumnMapping.from_dict(PERSONS), chunks(data))
        assert refused.value.field == "columns"
        custom = {
            "kind": "person",
            "columns": {"Mail": "email", "Name": "custom:erp_id"},
            "match_on": "custom:erp_id",
        }
        with pytest.raises(MappingRefused) as refused:
            await jobs.submit(IMPORTER, ColumnMapping.from_dict(custom), chunks(data))
        assert refused.value.field == "match_on"
        small = ImportJobs(service, max_file_bytes=1000)
        big = csv_bytes("First,Email", [f"P{i},p{i}@example.com" for i in range(100)])
        with pytest.raises(RequestTooLarge):
            await small.submit(IMPORTER, ColumnMapping.from_dict(SIMPLE), chunks(big, 100))
        assert list(jobs.files.glob("*")) == []
        assert log_length(service.app) == 0
    finally:
        await jobs.aclose()


# -- stopped midway, resumed -------------------------------------------------------------


def resumable_file(rows: int) -> bytes:
    lines = []
    for i in range(rows):
        email = f"r{i}@example.com" if i % 40 else f"broken{i}"
        lines.append(f"G{i},F{i},{email},smb,r")
    return csv_bytes(HEADER, lines)


async def test_a_stopped_import_resumes_and_ends_as_an_uninterrupted_one(
    store_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rows = 1500
    data = resumable_file(rows)
    mapping = ColumnMapping.from_dict(PERSONS)

    # Uninterrupted, on a store of its own (SQLite) for the comparison.
    from contacts_support import sqlite_settings

    reference = ContactsService(create_application(sqlite_settings(tmp_path_factory.mktemp("ref"))))
    await define_fields(reference)
    jobs = ImportJobs(reference)
    expected = await run(jobs, data)
    expected_persons = await persons(reference)
    await jobs.aclose()
    reference.close()

    service = ContactsService(create_application(store_settings))
    await define_fields(service)
    jobs = ImportJobs(service, in_flight=8)
    started = await jobs.submit(IMPORTER, mapping, chunks(data))
    task = jobs.task(started.id)
    assert task is not None
    while (await jobs.get(started.id)).progress.rows < 300:
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped = await jobs.get(started.id)
    assert stopped.state is JobState.RUNNING and 300 <= stopped.progress.rows < rows
    await jobs.aclose()
    service.close()  # the process stops: its pending commands are stored first

    service = ContactsService(create_application(store_settings))
    try:
        jobs = ImportJobs(service)
        assert await jobs.resume() == [started.id]
        resumed = await jobs.wait(started.id)
        assert resumed.state is JobState.DONE
        assert counts(resumed) == counts(expected)
        assert await all_failures(jobs, started.id) == await all_failures_of(expected, data)
        assert await persons(service) == expected_persons
        await jobs.aclose()
    finally:
        service.close()


async def all_failures_of(view: ImportView, data: bytes) -> dict[int, str]:
    """The failures an uninterrupted run of `data` reports (one bad email in 40 rows)."""
    found = {}
    for line, row in enumerate(csv.reader(io.StringIO(data.decode())), start=1):
        if line > 1 and "@" not in row[2]:
            found[line] = f"email {row[2]!r} is not valid"
    assert len(found) == view.progress.counts[Outcome.FAILED]
    return found


# -- REST ------------------------------------------------------------------------------


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
    marketing = bearer(identity.mint("marketing", subject="mia", client="rest-tests"))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://contacts", headers=marketing
    ) as client:
        yield client, identity
    await app.state.imports.aclose()


def query(mapping: Mapping[str, Any], **more: str) -> str:
    extra = "".join(f"&{k}={v}" for k, v in more.items())
    return f"/imports?mapping={quote(json.dumps(mapping))}{extra}"


SIMPLE = {"kind": "person", "columns": {"First": "given_name", "Email": "email"}}


def padded_file(rows: int) -> Iterator[str]:
    """Rows with a wide column the mapping leaves out: a file over the app's 1 MiB limit."""
    yield "First,Email,Notes"
    for i in range(rows):
        email = f"p{i}@example.com" if i != 3 else "nobody"
        yield f"P{i},{email},{'n' * 9000}"


async def test_rest_uploads_reports_progress_and_the_failed_rows_as_csv(
    rest: tuple[httpx.AsyncClient, Identity],
) -> None:
    http, _ = rest
    body = ("\n".join(padded_file(150)) + "\n").encode()
    assert len(body) > 1024 * 1024
    headers = {"content-type": "text/csv"}

    dry = await http.post(query(SIMPLE, dry_run="true"), content=body, headers=headers)
    assert dry.status_code == 200, dry.text
    report = dry.json()
    assert report["dry_run"] and report["state"] == "done"
    assert report["progress"]["created"] == 149 and report["progress"]["failed"] == 1
    assert report["failures"] == [
        {
            "line": 5,
            "reason": "email 'nobody' is not valid",
            "cells": {"First": "P3", "Email": "nobody"},
        }
    ]

    started = await http.post(query(SIMPLE, file_name="leads.csv"), content=body, headers=headers)
    assert started.status_code == 202, started.text
    job = started.json()["id"]
    for _ in range(600):
        progress = (await http.get(f"/imports/{job}")).json()
        if progress["state"] == "done":
            break
        await asyncio.sleep(0.05)
    assert progress["file_name"] == "leads.csv"
    assert progress["progress"] == {
        "line": 151,
        "rows_done": 150,
        "created": 149,
        "updated": 0,
        "unchanged": 0,
        "skipped": 0,
        "failed": 1,
    }

    report_csv = await http.get(f"/imports/{job}/failures")
    assert report_csv.status_code == 200
    assert report_csv.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(report_csv.text))) == [
        ["line", "reason", "First", "Email"],
        ["5", "email 'nobody' is not valid", "P3", "nobody"],
    ]
    page = (await http.get(f"/imports/{job}/failures?format=json&page_size=1")).json()
    assert page == {"failures": report["failures"], "next_page_token": ""}


async def test_rest_refusals_name_the_field_and_keep_nothing(
    rest: tuple[httpx.AsyncClient, Identity],
) -> None:
    http, identity = rest
    body = b"First,Email\nAda,ada@example.com\n"
    headers = {"content-type": "text/csv"}

    wrong = await http.post(
        query({"kind": "person", "columns": {"Mail": "email"}}), content=body, headers=headers
    )
    assert wrong.status_code == 422
    assert wrong.json()["detail"][0]["field"] == "mapping.columns"
    unknown = await http.post(
        query({"kind": "person", "columns": {"Email": "e_mail"}}), content=body, headers=headers
    )
    assert [d["field"] for d in unknown.json()["detail"]] == ["mapping.columns.Email"]
    not_json = await http.post("/imports?mapping=%7Bnope", content=body, headers=headers)
    assert [d["field"] for d in not_json.json()["detail"]] == ["mapping"]
    latin1 = await http.post(
        query(SIMPLE),
        content="First,Email\nRené,r@example.com\n".encode("latin-1"),
        headers=headers,
    )
    assert [d["field"] for d in latin1.json()["detail"]] == ["file"]

    assert (await http.get("/imports/no-such-import")).status_code == 404
    assert (await http.get("/imports/no-such-import/failures")).status_code == 404

    agent = bearer(identity.mint("service", subject="sam", client="rest-tests"))
    denied = await http.post(query(SIMPLE), content=body, headers={**headers, **agent})
    assert denied.status_code == 403
    assert (await http.get("/contacts?kind=person")).json()["total_size"] == 0
