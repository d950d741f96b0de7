"""One OpenTelemetry setup for every process of the platform.

Traces follow a command from the REST or gRPC call through the event store
(the W3C `traceparent` is stored with each event), the relay (which publishes
it in the Kafka headers) into the projection that applies it. Spans are
exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None


def setup_telemetry(service_name: str) -> TracerProvider:
    """Installs the tracer provider of this process (once)."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.namespace": "crm"})
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_telemetry() -> None:
    if _provider is not None:
        _provider.shutdown()


def current_traceparent() -> str | None:
    """The W3C traceparent of the active span, if any."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    if not traceparent:
        return otel_context.Context()
    return propagate.extract({"traceparent": traceparent})


def kafka_headers_with_context(
    headers: list[tuple[str, bytes]], ctx: otel_context.Context | None = None
) -> list[tuple[str, bytes]]:
    """Adds the trace context of `ctx` (or the current one) to Kafka headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return headers + [(k, v.encode()) for k, v in carrier.items()]


def context_from_kafka_headers(
    headers: Iterable[tuple[str, bytes]] | None,
) -> otel_context.Context:
    carrier = {k: v.decode("utf-8", "replace") for k, v in headers or () if v is not None}
    return propagate.extract(carrier)
