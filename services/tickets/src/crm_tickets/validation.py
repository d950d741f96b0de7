"""Canonicalise, then bound, then check inputs into domain values.

Refusals are `ValidationFailed` with field paths (`terms.targets[2].priority`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from crm_common.errors import FieldError, FieldErrors, ValidationFailed
from crm_tickets.domain import (
    CHANNELS,
    PRIORITIES,
    STATUSES,
    BusinessCalendar,
    Targets,
    policy_terms,
)
from crm_tickets.inputs import NewCase, SlaTermsInput, SurveyInput, Triage

MAX_TEXT = 200
MAX_BODY = 20_000
MAX_TARGET_SECONDS = 366 * 24 * 3600
#: A customer tier: a lower-case word (the loyalty service's tiers are data).
TIER_WORD = re.compile(r"[a-z][a-z0-9_-]{0,39}")


def text(
    errors: FieldErrors, field: str, value: str, *, required: bool, limit: int = MAX_TEXT
) -> str:
    value = " ".join(value.split()) if limit <= MAX_TEXT else value.strip()
    if required and not value:
        errors.add(field, "is required")
    elif len(value) > limit:
        errors.add(field, f"must be at most {limit} characters")
    return value


def word(errors: FieldErrors, field: str, value: str | None, allowed: tuple[str, ...]) -> str:
    if value is None or value not in allowed:
        errors.add(field, f"must be one of {', '.join(allowed)}")
        return ""
    return value


def ident(field: str, value: str) -> str:
    try:
        return str(UUID(value.strip()))
    except ValueError:
        raise ValidationFailed.of(field, f"{value[:60]!r} is not an id") from None


def new_case(new: NewCase) -> NewCase:
    errors = FieldErrors()
    customer = text(errors, "customer_id", new.customer_id, required=True)
    checked = NewCase(
        customer_id=customer,
        channel=word(errors, "channel", new.channel, CHANNELS),
        subject=text(errors, "subject", new.subject, required=True),
        description=text(errors, "description", new.description, required=False, limit=MAX_BODY),
        category=text(errors, "category", new.category.lower(), required=False),
        priority=word(errors, "priority", new.priority or "normal", PRIORITIES),
        team=text(errors, "team", new.team.lower(), required=True),
        assignee=text(errors, "assignee", new.assignee, required=False),
        policy_id=new.policy_id.strip(),
    )
    errors.raise_if_any()
    if checked.policy_id:
        ident("policy_id", checked.policy_id)
    return checked


def triage(change: Triage) -> Triage:
    errors = FieldErrors()
    checked = Triage(
        category=text(errors, "category", change.category.lower(), required=False),
        priority=word(errors, "priority", change.priority, PRIORITIES),
        team=text(errors, "team", change.team.lower(), required=True),
    )
    errors.raise_if_any()
    return checked


def status(value: str | None) -> str:
    errors = FieldErrors()
    checked = word(errors, "status", value, STATUSES)
    errors.raise_if_any()
    return checked


def body(field: str, value: str) -> str:
    errors = FieldErrors()
    checked = text(errors, field, value, required=True, limit=MAX_BODY)
    errors.raise_if_any()
    return checked


def sla_terms(terms: SlaTermsInput) -> dict[str, Any]:
    errors = FieldErrors()
    targets: Targets = {}
    for i, t in enumerate(terms.targets):
        path = f"terms.targets[{i}]"
        tier = t.tier.lower().strip()
        if not TIER_WORD.fullmatch(tier):
            errors.add(f"{path}.tier", "must be a tier word (a-z, 0-9, _ or -, at most 40)")
            tier = ""
        priority = word(errors, f"{path}.priority", t.priority, PRIORITIES)
        for name in ("first_response_seconds", "resolution_seconds"):
            value = getattr(t, name)
            if not 0 < value <= MAX_TARGET_SECONDS:
                errors.add(f"{path}.{name}", f"must be between 1 and {MAX_TARGET_SECONDS}")
        if not 0 <= t.next_reply_seconds <= MAX_TARGET_SECONDS:
            errors.add(
                f"{path}.next_reply_seconds",
                f"must be between 0 (none) and {MAX_TARGET_SECONDS}",
            )
        if tier and priority:
            if priority in targets.get(tier, {}):
                errors.add(path, f"{tier}/{priority} is set twice")
            kinds = {
                "first_response": t.first_response_seconds,
                "resolution": t.resolution_seconds,
            }
            if t.next_reply_seconds > 0:
                kinds["next_reply"] = t.next_reply_seconds
            targets.setdefault(tier, {})[priority] = kinds
    if not terms.targets:
        errors.add("terms.targets", "needs at least one target")
    if not 0 <= terms.warning_seconds <= MAX_TARGET_SECONDS:
        errors.add("terms.warning_seconds", f"must be between 0 and {MAX_TARGET_SECONDS}")
    escalate_team = text(errors, "terms.escalate_team", terms.escalate_team.lower(), required=False)
    calendar: BusinessCalendar | None = None
    try:
        calendar = BusinessCalendar(
            terms.calendar.timezone.strip() or "UTC",
            tuple((h.day.lower(), h.opens, h.closes) for h in terms.calendar.hours),
            tuple(terms.calendar.holidays),
        )
    except ValidationFailed as error:
        errors.errors += [FieldError(f"terms.{e.field}", e.message) for e in error.errors]
    errors.raise_if_any()
    assert calendar is not None
    return policy_terms(
        targets=targets,
        calendar=calendar,
        warning_seconds=terms.warning_seconds,
        pause_on_hold=terms.pause_on_hold,
        escalate_priority=terms.escalate_priority,
        escalate_team=escalate_team,
    )


def survey(response: SurveyInput) -> SurveyInput:
    errors = FieldErrors()
    if not 1 <= response.csat <= 5:
        errors.add("csat", "must be between 1 and 5")
    if response.ces is not None and not 1 <= response.ces <= 7:
        errors.add("ces", "must be between 1 and 7")
    if response.nps is not None and not 0 <= response.nps <= 10:
        errors.add("nps", "must be between 0 and 10")
    comment = text(errors, "comment", response.comment, required=False, limit=MAX_BODY)
    errors.raise_if_any()
    return SurveyInput(response.csat, response.ces, response.nps, comment)


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_WITHIN_MINUTES = 7 * 24 * 60
MAX_PERIOD = timedelta(days=366)


#: The longest page token a list gives out (a row's sort key, encoded).
MAX_TOKEN = 400


@dataclass(frozen=True)
class Page:
    """A page of a list: its size, and the sort key of the row the page before ended
    on (None: the first page)."""

    after: tuple[int | str, ...] | None
    size: int

    def key(self, *shape: type) -> Any:
        """`after` checked against the list's key (the types of its parts): a token of
        another list, or made up, is refused."""
        if self.after is None:
            return None
        if len(self.after) != len(shape) or not all(
            type(part) is kind for part, kind in zip(self.after, shape, strict=True)
        ):
            raise ValidationFailed.of("page_token", "is not a token this service gave out")
        return self.after


def page_token(key: Sequence[int | str]) -> str:
    """The token of the page after the row whose sort key is `key`."""
    text = json.dumps(list(key), separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _token_key(token: str) -> tuple[int | str, ...] | None:
    """The sort key a token holds; None when it is not one this service gave out."""
    if len(token) > MAX_TOKEN or not token.isascii():
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(key, list) or not key:
        return None
    if not all(type(part) in (int, str) for part in key):
        return None
    return tuple(key)


def page(page_size: int, page_token: str) -> Page:
    """0 means the default size; a token is what a previous page answered as its
    `next_page_token` (the sort key of its last row)."""
    errors = FieldErrors()
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})")
    token = page_token.strip()
    after = _token_key(token) if token else None
    if token and after is None:
        errors.add("page_token", "is not a token this service gave out")
    errors.raise_if_any()
    return Page(after, page_size or DEFAULT_PAGE_SIZE)


def required(field: str, value: str) -> str:
    errors = FieldErrors()
    checked = text(errors, field, value, required=True)
    errors.raise_if_any()
    return checked


def team(field: str, value: str, *, required: bool = True) -> str:
    errors = FieldErrors()
    checked = text(errors, field, value.lower(), required=required)
    errors.raise_if_any()
    return checked


def within_minutes(value: int) -> int:
    if not 1 <= value <= MAX_WITHIN_MINUTES:
        raise ValidationFailed.of("within_minutes", f"must be between 1 and {MAX_WITHIN_MINUTES}")
    return value


def period(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    errors = FieldErrors()
    for name, value in (("period_start", start), ("period_end", end)):
        if value is None:
            errors.add(name, "is required")
        elif value.tzinfo is None:
            errors.add(name, "must carry a time zone")
    errors.raise_if_any()
    assert start is not None and end is not None
    if end <= start:
        raise ValidationFailed.of("period_end", "must be after period_start")
    if end - start > MAX_PERIOD:
        raise ValidationFailed.of("period_end", "the period may span at most 366 days")
    return start, end


#: How the satisfaction trend groups its responses.
INTERVALS = ("month", "week")


def interval(value: str) -> str:
    """month or week (empty: month)."""
    checked = value.strip().lower() or INTERVALS[0]
    if checked not in INTERVALS:
        raise ValidationFailed.of("interval", f"must be one of {', '.join(INTERVALS)}")
    return checked
