"""One OpenTelemetry setup for every process of the platform.

Traces follow a command from the REST or gRPC call through the event store
(the W3C `traceparent` is stored with each event), the relay (which publishes
it in the Kafka headers) into the projection that applies it. Spans are
exported over OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
Metrics (`crm_common.metrics`) share the resource and the endpoint, and are
also readable as `GET /metrics` on the process's health port.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from crm_common.metrics import setup_metrics, shutdown_metrics

log = logging.getLogger(__name__)
_provider: TracerProvider | None = None


def setup_telemetry(service_name: str) -> TracerProvider:
    """Installs the tracer and meter providers of this process (once)."""
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create(
        {
            "service.name": service_name,
            "service.namespace": "crm",
            # Several processes of one service (API, relay, ...) and replicas.
            "service.instance.id": os.environ.get("CRM_POD_NAME")
            or f"{socket.gethostname()}-{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    trace.set_tracer_provider(provider)
    setup_metrics(resource)
    _provider = provider
    return provider


def shutdown_telemetry() -> None:
    if _provider is not None:
        _provider.shutdown()
    shutdown_metrics()


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
