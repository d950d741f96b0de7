"""REST routes of duplicate detection (`crm_contacts.duplicate_index`): check a
contact about to be created, list an existing contact's look-alikes, and scan
the whole base for candidate pairs.

Only REST for now: the gRPC API has no duplicate methods yet.

The scan is computed once per log position and kept (one result) in the API
process: paging through it, or asking again while nothing was written, does
not scan again. A page token holds the last pair shown (score and ids), so a
page after a write continues where the previous one stopped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, FastAPI, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from crm_common.errors import FieldErrors, NotFound, ValidationFailed
from crm_contacts import validation
from crm_contacts.application import ContactsService
from crm_contacts.duplicate_index import Candidate, DuplicateIndex
from crm_contacts.duplicates import Facts, Pair, Reason, facts_for_company, facts_for_person
from crm_contacts.inputs import NewCompany

MAX_SCAN_PAGE = 500
MAX_ADDRESSES = 20


class DuplicateCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field("person", description="One of: person, company.")
    given_name: str = Field("", max_length=200, description="A person's given name.")
    family_name: str = Field("", max_length=200, description="A person's family name.")
    name: str = Field("", max_length=200, description="A company's name (or a person's, whole).")
    emails: list[str] = Field(default_factory=list, description="A person's email addresses.")
    phones: list[str] = Field(
        default_factory=list, description="A person's phone numbers, international format."
    )
    company_ids: list[str] = Field(
        default_factory=list, description="The companies a person works at: their domains count."
    )
    domain: str = Field(
        "", max_length=300, description="A company's web domain (for a person: their company's)."
    )


class ReasonReply(BaseModel):
    rule: str = Field(description="One of: email, phone, name_domain.")
    score: float
    detail: str


class LookAlike(BaseModel):
    id: str
    kind: str
    name: str = Field(description="The contact's display name.")
    score: float = Field(description="0..1: the best score of the reasons.")
    reasons: list[ReasonReply]


class LookAlikes(BaseModel):
    duplicates: list[LookAlike]


class ContactRef(BaseModel):
    id: str
    name: str


class PairReply(BaseModel):
    first: ContactRef
    second: ContactRef
    score: float
    reasons: list[ReasonReply]


class PairPage(BaseModel):
    pairs: list[PairReply]
    next_page_token: str
    total_size: int = Field(description="Pairs at or above `min_score`.")
    position: int = Field(description="The log position the scan reflects.")


def _reasons(reasons: tuple[Reason, ...]) -> list[ReasonReply]:
    return [ReasonReply(rule=r.rule, score=r.score, detail=r.detail) for r in reasons]


def _look_alikes(found: list[Candidate]) -> LookAlikes:
    return LookAlikes(
        duplicates=[
            LookAlike(
                id=c.match.other,
                kind=c.kind,
                name=c.name,
                score=c.match.score,
                reasons=_reasons(c.match.reasons),
            )
            for c in found
        ]
    )


def facts_of_check(index: DuplicateIndex, body: DuplicateCheck) -> Facts:
    """What a check compares, validated: every bad field named at once."""
    errors = FieldErrors()
    if body.kind not in ("person", "company"):
        errors.add("kind", "must be person or company")
    if len(body.emails) > MAX_ADDRESSES:
        errors.add("emails", f"at most {MAX_ADDRESSES} addresses")
    if len(body.phones) > MAX_ADDRESSES:
        errors.add("phones", f"at most {MAX_ADDRESSES} numbers")
    if len(body.company_ids) > MAX_ADDRESSES:
        errors.add("company_ids", f"at most {MAX_ADDRESSES} companies")
    emails = []
    for i, raw in enumerate(body.emails[:MAX_ADDRESSES]):
        if (email := validation.email_address(raw)) is None:
            errors.add(f"emails[{i}]", "is not an email address")
        else:
            emails.append(email)
    phones = []
    for i, raw in enumerate(body.phones[:MAX_ADDRESSES]):
        if (phone := validation.phone_number(raw)) is None:
            errors.add(f"phones[{i}]", "is not a phone number in international format")
        else:
            phones.append(phone)
    domain = _domain_of(errors, body.domain) if body.domain else ""
    name = " ".join(body.name.split()) or " ".join(f"{body.given_name} {body.family_name}".split())
    if not name:
        errors.add("name", "a name is needed (name, or given_name and family_name)")
    company_domains: list[str] = []
    if body.company_ids:
        if body.kind == "company":
            errors.add("company_ids", "only a person works at companies")
        wanted = body.company_ids[:MAX_ADDRESSES]
        known = index.domains_of_companies(wanted)
        for i, ident in enumerate(wanted):
            if ident not in known:
                errors.add(f"company_ids[{i}]", "no such company")
            company_domains.extend(known.get(ident, ()))
    errors.raise_if_any()
    if body.kind == "company":
        if emails or phones:
            raise ValidationFailed.of("kind", "a company has no emails or phones to compare")
        return facts_for_company("", name, domain)
    domains = [*company_domains, *([domain] if domain else [])]
    return facts_for_person("", name, emails, phones, domains)


def _domain_of(errors: FieldErrors, value: str) -> str:
    """A domain as companies store it (the same check as a company's own)."""
    try:
        return validation.new_company_profile(NewCompany(name="-", domain=value)).domain
    except ValidationFailed as failed:
        for error in failed.errors:
            errors.add("domain", error.message)
        return ""


def _encode(pair: Pair) -> str:
    text = json.dumps([pair.score, pair.first, pair.second])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(token: str) -> tuple[float, str, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        score, first, second = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return float(score), str(first), str(second)
    except (ValueError, TypeError, binascii.Error):
        raise ValidationFailed.of("page_token", "is not a page token of this scan") from None


class LazyIndex:
    """The service's index (`ContactsService.duplicate_index`, which the check on
    create uses too), opened by the first request that needs it: an app that is
    never asked about duplicates never creates (nor builds) the tables."""

    def __init__(self, service: ContactsService) -> None:
        self.service = service
        #: The service read them at start: malformed rules stop the app, not a request.
        self.rules = service.duplicate_rules

    def __call__(self) -> DuplicateIndex:
        return self.service.duplicate_index

    def close(self) -> None:
        """The service closes the index with the rest of its stores."""


def include_duplicates(app: FastAPI, service: ContactsService) -> LazyIndex:
    """Adds the duplicate routes to the service's REST app (`app.state.duplicates`
    holds the index, opened with the first request to it)."""
    lazy = LazyIndex(service)
    app.state.duplicates = lazy
    app.include_router(duplicate_router(lazy))
    app.router.on_shutdown.append(lazy.close)
    return lazy


def duplicate_router(opened: Callable[[], DuplicateIndex]) -> APIRouter:
    router = APIRouter(tags=["duplicates"])

    @router.post(
        "/duplicates/check",
        operation_id="CheckDuplicates",
        response_model=LookAlikes,
        summary="The existing contacts that look like this one, and why (before a create)",
    )
    async def check_duplicates(body: DuplicateCheck) -> LookAlikes:
        index = await asyncio.to_thread(opened)
        facts = await asyncio.to_thread(facts_of_check, index, body)
        return _look_alikes(await asyncio.to_thread(index.check, facts))

    @router.get(
        "/contacts/{contact_id}/duplicates",
        operation_id="ListContactDuplicates",
        response_model=LookAlikes,
        summary="The contacts that look like an existing one, and why",
    )
    async def list_contact_duplicates(
        contact_id: Annotated[str, Path(max_length=100)],
    ) -> LookAlikes:
        index = await asyncio.to_thread(opened)
        facts = await asyncio.to_thread(index.facts_of, contact_id)
        if facts is None:
            raise NotFound("Contact", contact_id)
        return _look_alikes(await asyncio.to_thread(index.check, facts))

    @router.get(
        "/duplicates",
        operation_id="ScanDuplicates",
        response_model=PairPage,
        summary="Candidate duplicate pairs over the whole base, best first",
    )
    async def scan_duplicates(
        min_score: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
        page_size: Annotated[int, Query(ge=1, le=MAX_SCAN_PAGE)] = 100,
        page_token: Annotated[str, Query(max_length=500)] = "",
    ) -> PairPage:
        after = _decode(page_token) if page_token else None
        index = await asyncio.to_thread(opened)
        result = await asyncio.to_thread(index.scan)
        wanted = [p for p in result.pairs if p.score >= min_score]
        if after is not None:
            last = (-after[0], after[1], after[2])
            wanted_after = [p for p in wanted if (-p.score, p.first, p.second) > last]
        else:
            wanted_after = wanted
        shown = wanted_after[:page_size]
        more = len(wanted_after) > page_size
        return PairPage(
            pairs=[
                PairReply(
                    first=ContactRef(id=p.first, name=result.names.get(p.first, "")),
                    second=ContactRef(id=p.second, name=result.names.get(p.second, "")),
                    score=p.score,
                    reasons=_reasons(p.reasons),
                )
                for p in shown
            ],
            next_page_token=_encode(shown[-1]) if more else "",
            total_size=len(wanted),
            position=result.position,
        )

    return router
