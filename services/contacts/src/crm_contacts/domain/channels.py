"""Channel identities of a person (email, phone, messengers) and the consent
recorded for each.

Events store plain JSON-able dicts; these immutable values are built from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any


class Channel(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    SMS = "sms"
    WHATSAPP = "whatsapp"
    WECHAT = "wechat"
    LINE = "line"
    MESSENGER = "messenger"


# Channels whose address is a phone number (kept in E.164).
PHONE_CHANNELS = frozenset({Channel.PHONE, Channel.SMS, Channel.WHATSAPP})


class ConsentStatus(StrEnum):
    GRANTED = "granted"
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class Consent:
    status: ConsentStatus
    source: str
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "source": self.source,
            "recorded_at": self.recorded_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Consent:
        return cls(ConsentStatus(data["status"]), data["source"], data["recorded_at"])


@dataclass(frozen=True)
class ChannelIdentity:
    channel: Channel
    # Email in lower case, phone numbers in E.164, other handles as given.
    address: str
    preferred: bool = False
    consent: Consent | None = None

    @property
    def key(self) -> tuple[Channel, str]:
        return self.channel, self.address

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": str(self.channel),
            "address": self.address,
            "preferred": self.preferred,
            "consent": None if self.consent is None else self.consent.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelIdentity:
        consent = data.get("consent")
        return cls(
            Channel(data["channel"]),
            data["address"],
            bool(data.get("preferred", False)),
            None if consent is None else Consent.from_dict(consent),
        )


def merge_channels(
    current: tuple[ChannelIdentity, ...], wanted: tuple[ChannelIdentity, ...]
) -> tuple[ChannelIdentity, ...]:
    """The channel list after a replace: known identities keep their consent
    unless the request brings a new one."""
    known = {c.key: c for c in current}
    merged = []
    for identity in wanted:
        before = known.get(identity.key)
        if identity.consent is None and before is not None and before.consent is not None:
            identity = replace(identity, consent=before.consent)
        elif (
            identity.consent is not None
            and before is not None
            and before.consent is not None
            and (before.consent.status, before.consent.source)
            == (identity.consent.status, identity.consent.source)
        ):
            identity = replace(identity, consent=before.consent)  # unchanged: keep its time
        merged.append(identity)
    return tuple(merged)
