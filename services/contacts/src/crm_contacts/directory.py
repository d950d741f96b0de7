"""`ContactDirectory`: search over all contacts, an in-memory index that
follows the event store's notification log."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import threading
from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import replace
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import DomainEventProtocol

from crm_common.errors import FieldErrors
from crm_contacts import validation
from crm_contacts.domain import (
    PHONE_CHANNELS,
    Affiliation,
    Channel,
    Company,
    CompanyProfile,
    Consent,
    ConsentStatus,
    Contact,
    ContactKind,
    Person,
    PersonProfile,
    with_consent,
)
from crm_contacts.inputs import ContactQuery
from crm_contacts.views import ContactPage, ContactView

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


def _sort_key(view: ContactView) -> tuple[str, str]:
    return view.display_name.casefold(), view.id


def _encode_token(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[str, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        name, ident = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(name, str) or not isinstance(ident, str):
            raise ValueError(token)
    except (ValueError, TypeError, binascii.Error):
        errors = FieldErrors()
        errors.add("page_token", "is not a page token of this search")
        errors.raise_if_any()
        raise AssertionError("unreachable") from None
    return name, ident


# -- what each event does to the view of its contact ------------------------------------
#
# Each takes the view before the event (None for a registration) and returns the
# view after it, before the version and time move; None: not a contact's event.


@functools.singledispatch
def _applied(event: Contact.Event, before: ContactView | None) -> ContactView | None:
    return None  # an event that changes nothing searchable (or a newer kind): ignored


@_applied.register
def _(event: Person.PersonRegistered, before: ContactView | None) -> ContactView | None:
    return _registered(event, ContactKind.PERSON, PersonProfile.from_dict(event.profile))


@_applied.register
def _(event: Company.CompanyRegistered, before: ContactView | None) -> ContactView | None:
    return _registered(event, ContactKind.COMPANY, CompanyProfile.from_dict(event.profile))


def _registered(
    event: Contact.Created, kind: ContactKind, profile: PersonProfile | CompanyProfile
) -> ContactView:
    return ContactView(
        id=str(event.originator_id),
        kind=kind,
        version=event.originator_version,
        profile=profile,
        affiliations=(),
        interactions=(),
        created_at=event.timestamp,
        updated_at=event.timestamp,
    )


@_applied.register
def _(event: Person.PersonProfileUpdated, before: ContactView | None) -> ContactView | None:
    if before is None:
        return None
    return replace(before, profile=PersonProfile.from_dict(event.profile))


@_applied.register
def _(event: Company.CompanyProfileUpdated, before: ContactView | None) -> ContactView | None:
    if before is None:
        return None
    return replace(before, profile=CompanyProfile.from_dict(event.profile))


@_applied.register
def _(event: Person.PersonLinkedToCompany, before: ContactView | None) -> ContactView | None:
    if before is None:
        return None
    link = Affiliation(event.company_id, event.company_name, event.role)
    others = tuple(a for a in before.affiliations if a.company_id != link.company_id)
    return replace(before, affiliations=(*others, link))


@_applied.register
def _(event: Person.PersonUnlinkedFromCompany, before: ContactView | None) -> ContactView | None:
    if before is None:
        return None
    kept = tuple(a for a in before.affiliations if a.company_id != event.company_id)
    return replace(before, affiliations=kept)


@_applied.register
def _(event: Person.ConsentRecorded, before: ContactView | None) -> ContactView | None:
    if before is None or not isinstance(before.profile, PersonProfile):
        return None
    consent = Consent(ConsentStatus(event.status), event.source, event.at)
    profile = with_consent(before.profile, Channel(event.channel), event.address, consent)
    return replace(before, profile=profile)


@_applied.register
def _(event: Contact.InteractionLogged, before: ContactView | None) -> ContactView | None:
    # Search results show no interactions: only the version and time move.
    return before


class ContactDirectory:
    """Search over all contacts: an in-memory index following the event log.

    Before each search it reads the notification log from where it stopped
    (`select_notifications`), so it includes every write committed before the
    search, whichever process made it. Names match as case-insensitive
    substrings (a scan), emails, phone numbers and tags exactly (hash indexes).
    Results are ordered by display name then id; a page token holds the sort
    key of the last contact shown, so paging stays stable while contacts are
    added.
    """

    def __init__(self, app: Application[UUID], batch_size: int = 1000) -> None:
        self.app = app
        self.batch_size = batch_size
        self.position = 0
        self._lock = threading.Lock()
        self._contacts: dict[str, ContactView] = {}
        self._order: list[tuple[str, str]] = []
        self._emails: dict[str, set[str]] = {}
        self._phones: dict[str, set[str]] = {}
        self._tags: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._contacts)

    # -- following the log --

    def catch_up(self) -> int:
        """Applies every event stored since the last call; returns the position."""
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> int:
        recorder: Any = self.app.recorder
        while True:
            notifications = recorder.select_notifications(self.position + 1, self.batch_size)
            for notification in notifications:
                self._apply(self.app.mapper.to_domain_event(notification))
                self.position = notification.id
            if len(notifications) < self.batch_size:
                return self.position

    def _apply(self, event: DomainEventProtocol[Any]) -> None:
        if not isinstance(event, Contact.Event):
            return  # not a contact's event (e.g. a command receipt)
        before = self._contacts.get(str(event.originator_id))
        after = _applied(event, before)
        if after is None:
            return
        after = replace(after, version=event.originator_version, updated_at=event.timestamp)
        self._index(before, after)

    def _index(self, before: ContactView | None, after: ContactView) -> None:
        if before is not None:
            self._order.pop(bisect_right(self._order, _sort_key(before)) - 1)
            for index, keys in self._keys(before):
                for key in keys:
                    index[key].discard(before.id)
                    if not index[key]:
                        del index[key]
        insort(self._order, _sort_key(after))
        for index, keys in self._keys(after):
            for key in keys:
                index.setdefault(key, set()).add(after.id)
        self._contacts[after.id] = after

    def _keys(self, view: ContactView) -> Iterable[tuple[dict[str, set[str]], set[str]]]:
        channels = view.profile.channels if isinstance(view.profile, PersonProfile) else ()
        yield self._emails, {c.address for c in channels if c.channel is Channel.EMAIL}
        yield self._phones, {c.address for c in channels if c.channel in PHONE_CHANNELS}
        yield self._tags, set(view.profile.tags)

    # -- searching --

    def search(self, query: ContactQuery, *, within_tag: str | None = None) -> ContactPage:
        """One page of the contacts matching `query`; with `within_tag`, only among the
        contacts carrying that (canonical) tag: a partner's search sees its grant only."""
        errors = FieldErrors()
        size = query.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            errors.add("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        email = phone = None
        if query.email:
            email = validation.email_address(query.email)
            if email is None:
                errors.add("email", "is not an email address")
        if query.phone:
            phone = validation.phone_number(query.phone)
            if phone is None:
                errors.add("phone", "is not a phone number in international format")
        kind = validation.enum_of(errors, "kind", ContactKind, query.kind, required=False)
        errors.raise_if_any()
        after = _decode_token(query.page_token) if query.page_token else None
        text = query.query.strip().casefold()
        tag = " ".join(query.tag.split()).lower()

        with self._lock:
            self._catch_up()
            candidates: set[str] | None = None
            for index, key in ((self._emails, email), (self._phones, phone), (self._tags, tag)):
                if key:
                    found = index.get(key, set())
                    candidates = found if candidates is None else candidates & found
            if within_tag is not None:
                granted = self._tags.get(within_tag, set())
                candidates = granted if candidates is None else candidates & granted

            def wanted(view: ContactView) -> bool:
                if kind is not None and view.kind is not kind:
                    return False
                return not text or _matches(view, text)

            if candidates is None:
                keys = [k for k in self._order if wanted(self._contacts[k[1]])]
            else:
                keys = sorted(
                    _sort_key(self._contacts[i]) for i in candidates if wanted(self._contacts[i])
                )
            start = bisect_right(keys, after) if after is not None else 0
            page = keys[start : start + size]
            views = [self._contacts[ident] for _, ident in page]
        more = start + size < len(keys)
        return ContactPage(views, _encode_token(page[-1]) if more else "", len(keys))


def _matches(view: ContactView, text: str) -> bool:
    profile = view.profile
    names: tuple[str, ...] = (profile.display_name,)
    if isinstance(profile, PersonProfile):
        names = (profile.given_name, profile.family_name, profile.display_name)
    return any(text in name.casefold() for name in names)
