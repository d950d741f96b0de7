"""Protobuf timestamps from callers, checked before they become datetimes.

`Timestamp.ToDatetime` raises for values a client can send but no calendar
holds (negative nanos, seconds before year 1 or after 9999): those are
refused here as invalid input naming the field, never an internal error.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from crm_common.errors import ValidationFailed

_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


def datetime_of(stamp: Timestamp, field: str) -> datetime:
    """The timestamp as an aware UTC datetime; `ValidationFailed` naming `field` if none."""
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise ValidationFailed.of(field, "nanos must be from 0 to 999,999,999")
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS:
        raise ValidationFailed.of(field, "must be between the years 1 and 9999")
    return stamp.ToDatetime(tzinfo=UTC)
