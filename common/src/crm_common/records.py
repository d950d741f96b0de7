"""Kafka records as consumers see them: headers and the span that continues
the producer's trace. Used by every projection and follower."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TypeAlias

from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from crm_common.telemetry import context_from_kafka_headers

Record: TypeAlias = ConsumerRecord[bytes, bytes]

_tracer = trace.get_tracer("crm_common.records")


def header(record: Record, name: str) -> str | None:
    """A header's value as text (CloudEvents attributes: `ce_type`, `ce_id`, ...)."""
    for key, value in record.headers or ():
        if key == name and value is not None:
            return bytes(value).decode("utf-8", "replace")
    return None


def where(record: Record) -> str:
    """`topic:partition@offset`, for logs."""
    return f"{record.topic}:{record.partition}@{record.offset}"


@contextlib.contextmanager
def consuming_span(
    record: Record,
    name: str,
    tracer: trace.Tracer | None = None,
    attributes: Mapping[str, str] | None = None,
) -> Iterator[Span]:
    """A consumer span continuing the trace that published the record."""
    with (tracer or _tracer).start_as_current_span(
        name,
        context=context_from_kafka_headers(record.headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation": "process",
            "messaging.destination.name": record.topic,
            "messaging.kafka.destination.partition": record.partition,
            "messaging.kafka.message.offset": record.offset,
            **(attributes or {}),
        },
    ) as span:
        yield span
