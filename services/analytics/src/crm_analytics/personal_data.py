"""Personal data in the 360 view: sealed payloads opened, erased persons redacted.

Opening. The relays publish every field the event contracts mark personal
(`crm.privacy.v1.personal`) as a token `pd1.<subject>.<data>`, sealed under
the subject's key in the source service's key store. The projector opens
them right after decoding a record (`Customer360Store.prepare_batch`), for
every source in that one place, with a `PersonalDataCipher` over a key
client of the source's store (`crm_common.privacy.key_client(settings,
owner=<source>)`: a consumer's read, allowed by the registry and audited by
the owner's store, purpose "project 360"). Each process builds its ciphers
once (`PayloadOpener.from_settings`), so their key caches live as long as
the process. A token of an erased subject opens as `"[erased]"`.

Without master keys a process has no cipher: clear texts (published before
sealing was turned on) are projected as they are, and a token is kept as
its text, with one warning per process, instead of stopping the projector.

Erasing. `person_erased` (contacts) replaces every personal value of the
person's document, and of the documents of the contacts merged into it,
by `"[erased]"` (`redact_document`; their entries in the timeline
collection too, `redact_entry`) and flags them `erased`; the anonymous
facts (ids, amounts, stages, statuses, counts, points, revenue, the kinds
and times of timeline entries) stay. A document flagged so is redacted
again after every later event, whatever its source, so nothing personal
comes back (a late payload in clear, a deal's lost reason typed by a user).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.message import Message

from crm_analytics.document import (
    ChannelEntry,
    CompanyLink,
    Customer360,
    CustomField,
    Deal,
    LedgerEntry,
    Member,
    OpenActivity,
    TimelineEntry,
)
from crm_common.privacy import REDACTED, PersonalDataCipher, key_client
from crm_common.privacy.wire import TOKEN_PREFIX, open_message, sealed_texts
from crm_common.settings import Settings

log = logging.getLogger(__name__)

#: Why the projector reads another service's keys (the owner's audit names it).
PURPOSE = "project 360"

#: Timeline entries whose summary the view writes itself from anonymous facts
#: only (how many duplicates, which services): they stay readable after an erase.
ANONYMOUS_SUMMARIES = frozenset(
    {
        "profile.merged",
        "profile.merge_undone",
        "profile.erased",
        "privacy.exported",
        # Stage words and the rule that fired (a deal id): the stage itself stays too.
        "profile.lifecycle_changed",
    }
)

_warned = threading.Event()


def _warn_without_keys(source: str) -> None:
    """One warning per process: sealed payloads arrive but no master keys are configured."""
    if _warned.is_set():
        return
    _warned.set()
    log.warning(
        "sealed personal data on the %s topic but no master keys are configured "
        "(CRM_MASTER_KEYS / CRM_MASTER_KEYS_FILE): the 360 view shows the tokens as they "
        "are until the projection is rebuilt with keys",
        source,
    )


class PayloadOpener:
    """Opens the sealed personal fields of the events of each source service."""

    def __init__(self, ciphers: Mapping[str, PersonalDataCipher | None] | None = None) -> None:
        #: source service -> its cipher; a source without one has no keys configured.
        self.ciphers: dict[str, PersonalDataCipher | None] = dict(ciphers or {})

    @classmethod
    def from_settings(cls, settings: Settings, sources: Iterable[str]) -> PayloadOpener:
        """A cipher per source over the source's key store, or none at all when
        `settings` configure no master keys."""
        ciphers: dict[str, PersonalDataCipher | None] = {}
        for source in sources:
            keys = key_client(settings, owner=source)
            ciphers[source] = PersonalDataCipher(keys) if keys is not None else None
        return cls(ciphers)

    def open(self, source: str, message: Message) -> int:
        """Opens, in place, the sealed texts of `message` of `source`; how many.

        Raises `InvalidToken` (a ValueError) for an altered token and
        `MissingDataKey` for a subject the source's key store does not know.
        """
        cipher = self.ciphers.get(source)
        if cipher is not None:
            return open_message(message, cipher, PURPOSE)
        if any(text.startswith(TOKEN_PREFIX) for text in sealed_texts(message)):
            _warn_without_keys(source)
        return 0

    def close(self) -> None:
        for cipher in self.ciphers.values():
            if cipher is not None:
                cipher.keys.close()


# -- erasure -----------------------------------------------------------------------------


def _redacted(text: str) -> str:
    # An empty value held nothing: it stays empty (not given, rather than erased).
    return REDACTED if text else text


def _channel(entry: ChannelEntry) -> ChannelEntry:
    return {**entry, "address": _redacted(entry["address"])}


def _custom_field(value: CustomField) -> CustomField:
    return {**value, "value": _redacted(value["value"])}


def _company(link: CompanyLink) -> CompanyLink:
    return {**link, "role": _redacted(link["role"])}


def _member(member: Member) -> Member:
    return {**member, "role": _redacted(member["role"])}


def redact_entry(entry: TimelineEntry) -> TimelineEntry:
    """A timeline entry of an erased person: its summary reads "[erased]",
    unless the view wrote it from anonymous facts only."""
    if entry["kind"] in ANONYMOUS_SUMMARIES:
        return entry
    return {**entry, "summary": _redacted(entry["summary"])}


def _deal(deal: Deal) -> Deal:
    # The name is the customer's (a deal is named after them); the lost reason is free text.
    return {
        **deal,
        "name": _redacted(deal["name"]),
        "lost_reason": _redacted(deal["lost_reason"]),
    }


def _ledger(entry: LedgerEntry) -> LedgerEntry:
    return {**entry, "detail": _redacted(entry["detail"])}


def _activity(activity: OpenActivity) -> OpenActivity:
    return {**activity, "title": _redacted(activity["title"])}


def _case(case: Any) -> Any:
    return {**case, "subject": _redacted(case["subject"])}


def redact_document(doc: Customer360) -> Customer360:
    """A copy of `doc` with every personal value replaced by `"[erased]"`.

    Personal: the names, channel addresses, custom field values, roles at
    companies, timeline summaries (but those the view writes from anonymous
    facts), deal names and lost reasons, the titles of open activities, case
    subjects and the details of loyalty ledger entries. Everything else
    stays: ids, kinds, tags, owners, stages, statuses, amounts and revenue,
    counts, points, consent states, times and positions. Idempotent.
    """
    redacted = doc.copy()
    for name in ("display_name", "given_name", "family_name"):
        value = redacted.get(name)
        if isinstance(value, str):
            redacted[name] = _redacted(value)
    if "channels" in doc:
        redacted["channels"] = [_channel(c) for c in doc["channels"]]
    if "custom_fields" in doc:
        redacted["custom_fields"] = {k: _custom_field(v) for k, v in doc["custom_fields"].items()}
    if "companies" in doc:
        redacted["companies"] = [_company(c) for c in doc["companies"]]
    if "members" in doc:
        redacted["members"] = [_member(m) for m in doc["members"]]
    if "timeline" in doc:
        redacted["timeline"] = [redact_entry(e) for e in doc["timeline"]]
    if "deals" in doc:
        redacted["deals"] = [_deal(d) for d in doc["deals"]]
    if "activities" in doc:
        redacted["activities"] = {k: _activity(a) for k, a in doc["activities"].items()}
    tickets = doc.get("tickets")
    if tickets is not None:
        redacted["tickets"] = {
            **tickets,
            "open_cases": [_case(c) for c in tickets["open_cases"]],
            "recent_cases": [_case(c) for c in tickets["recent_cases"]],
        }
    loyalty = doc.get("loyalty")
    if loyalty is not None:
        redacted["loyalty"] = {
            **loyalty,
            "recent_entries": [_ledger(e) for e in loyalty["recent_entries"]],
        }
    return redacted


def erase_document(doc: Customer360) -> Customer360:
    """`doc` redacted and flagged `erased` (kept redacted from then on)."""
    erased = redact_document(doc)
    erased["erased"] = True
    return erased


def is_erased(doc: Customer360 | None) -> bool:
    return bool(doc and doc.get("erased"))
