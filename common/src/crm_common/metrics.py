"""OpenTelemetry metrics of every process of the platform.

Each process has one meter provider (`setup_metrics`, called by
`crm_common.telemetry.setup_telemetry`) with two readers:

- a Prometheus reader, always: `prometheus_text()` renders every instrument in
  the Prometheus text format, and each process serves it as `GET /metrics` on
  its health port (`CRM_HEALTH_PORT`, see `crm_common.health`), so the figures
  can be read with curl and scraped without a collector;
- an OTLP/gRPC exporter, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the same
  variable that turns on trace export), every `OTEL_METRIC_EXPORT_INTERVAL`
  milliseconds (default 60000).

What is measured (Prometheus names in brackets):

- every gRPC call: `crm.rpc.server.duration` [`crm_rpc_server_duration_seconds`],
  a histogram by `rpc_method` and `rpc_grpc_status_code`: its count is the
  rate, the non-OK codes the errors, the buckets the latency;
- every REST request: `crm.http.server.duration` [`crm_http_server_duration_seconds`]
  by `http_route` (the route's template, never the raw path), `http_request_method`
  and `http_response_status_code`;
- every worker (relay, projector, follower): `crm.worker.lag.events` and
  `crm.worker.lag.seconds` by `worker` (gauges, see `crm_common.health.Heartbeat.lag`),
  `crm.worker.up` (1 while its loop goes round and its dependencies answer),
  `crm.worker.retries` (each time it starts over after an error, by `worker`
  and `dependency`) and `crm.dead_letters` (records set aside, by `worker`);
- an API's hard dependencies: `crm.dependency.up` by `dependency`;
- the process itself: `process_start_time_seconds` (a restart shows as a new
  value), CPU seconds, resident memory, open file descriptors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, Protocol
from weakref import WeakSet

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

#: The content type of `prometheus_text()`.
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Latency buckets in seconds: from a cached read to a wait that timed out.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_provider: MeterProvider | None = None
_registry: CollectorRegistry | None = None
meter = metrics.get_meter("crm_common")


class WorkerFigures(Protocol):
    """What a worker's heartbeat tells the metrics (crm_common.health.Heartbeat)."""

    worker: str

    @property
    def lag_events(self) -> int | None: ...

    @property
    def lag_seconds(self) -> float | None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def dead_letters(self) -> int: ...


_workers: WeakSet[Any] = WeakSet()
#: Name -> is it up, of the hard dependencies an API checks (crm_common.health.Dependencies).
_dependencies: MutableMapping[str, bool] = {}


def track_worker(figures: WorkerFigures) -> None:
    """Reports this worker's lag, state and dead letters from now on."""
    _workers.add(figures)


def forget_worker(figures: WorkerFigures) -> None:
    _workers.discard(figures)


def set_dependency_up(name: str, up: bool) -> None:
    _dependencies[name] = up


def _each_worker() -> Iterator[WorkerFigures]:
    yield from sorted(list(_workers), key=lambda w: str(w.worker))


def _lag_events(_: CallbackOptions) -> Iterable[Observation]:
    for w in _each_worker():
        if w.lag_events is not None:
            yield Observation(w.lag_events, {"worker": w.worker})


def _lag_seconds(_: CallbackOptions) -> Iterable[Observation]:
    for w in _each_worker():
        if w.lag_seconds is not None:
            yield Observation(round(w.lag_seconds, 3), {"worker": w.worker})


def _worker_up(_: CallbackOptions) -> Iterable[Observation]:
    for w in _each_worker():
        yield Observation(1 if w.ready else 0, {"worker": w.worker})


def _dead_letters(_: CallbackOptions) -> Iterable[Observation]:
    for w in _each_worker():
        yield Observation(w.dead_letters, {"worker": w.worker})


def _dependency_up(_: CallbackOptions) -> Iterable[Observation]:
    for name, up in sorted(_dependencies.items()):
        yield Observation(1 if up else 0, {"dependency": name})


rpc_duration = meter.create_histogram(
    "crm.rpc.server.duration", unit="s", description="gRPC calls served, by method and status"
)
http_duration = meter.create_histogram(
    "crm.http.server.duration",
    unit="s",
    description="REST requests served, by route template, method and status",
)
worker_retries = meter.create_counter(
    "crm.worker.retries",
    unit="{retry}",
    description="Times a worker started over after an error, by the dependency that failed",
)
meter.create_observable_gauge(
    "crm.worker.lag.events",
    callbacks=[_lag_events],
    unit="{event}",
    description="Events a worker has yet to publish or apply",
)
meter.create_observable_gauge(
    "crm.worker.lag.seconds",
    callbacks=[_lag_seconds],
    unit="s",
    description="Seconds since the worker last had nothing left to publish or apply (0 while so)",
)
meter.create_observable_gauge(
    "crm.worker.up",
    callbacks=[_worker_up],
    description="1 while the worker's loop goes round and its dependencies answer",
)
meter.create_observable_counter(
    "crm.dead_letters",
    callbacks=[_dead_letters],
    unit="{record}",
    description="Records a worker set aside because they can never be published or applied",
)
meter.create_observable_gauge(
    "crm.dependency.up",
    callbacks=[_dependency_up],
    description="1 while a hard dependency of an API answers",
)


def setup_metrics(resource: Resource) -> MeterProvider:
    """Installs this process's meter provider (once): Prometheus always, OTLP when configured."""
    global _provider, _registry
    if _provider is not None:
        return _provider
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    readers: list[MetricReader] = [
        PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    ]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        log.info("exporting metrics to %s", os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"])
    latency = ExplicitBucketHistogramAggregation(LATENCY_BUCKETS)
    provider = MeterProvider(
        resource=resource,
        metric_readers=readers,
        views=[
            View(instrument_name="crm.rpc.server.duration", aggregation=latency),
            View(instrument_name="crm.http.server.duration", aggregation=latency),
        ],
    )
    metrics.set_meter_provider(provider)
    _provider, _registry = provider, registry
    return provider


def shutdown_metrics() -> None:
    if _provider is not None:
        _provider.shutdown()


def prometheus_text() -> bytes:
    """Every metric of this process in the Prometheus text format (empty before setup)."""
    if _registry is None:
        return b"# metrics are not set up in this process\n"
    return bytes(generate_latest(_registry))


# -- instrumentation of the APIs ----------------------------------------------------


def record_http(route: str, method: str, status: int, seconds: float) -> None:
    """Records `crm.http.server.duration` of one REST request (`crm_common.server`):
    `route` is the template FastAPI matched (`/persons/{person_id}`), so ids never
    become labels, or `unmatched`. The attribute sets are made once each."""
    key = (route, method, status)
    attributes = _http_attributes.get(key)
    if attributes is None:
        if len(_http_attributes) > 10_000:  # methods are the client's words: bounded
            _http_attributes.clear()
        attributes = _http_attributes[key] = {
            "http.route": route,
            "http.request.method": method,
            "http.response.status_code": status,
        }
    http_duration.record(seconds, attributes)


_http_attributes: dict[tuple[str, str, int], dict[str, Any]] = {}


def rpc_recorder(method: str) -> Callable[[str, float], None]:
    """Records `crm.rpc.server.duration` of one gRPC method: `record(code, seconds)`.

    Made once per method when the server registers it (`crm_common.server`); the
    attribute sets are made once per status code, not on every call."""
    by_code: dict[str, dict[str, str]] = {}

    def record(code: str, seconds: float) -> None:
        attributes = by_code.get(code)
        if attributes is None:
            attributes = by_code[code] = {"rpc.method": method, "rpc.grpc.status_code": code}
        rpc_duration.record(seconds, attributes)

    return record


def status_name(code: object, default: str) -> str:
    """The name of a gRPC status code as the aio context reports it (enum, int or None)."""
    if code is None:
        return default
    name = getattr(code, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(code, int):
        import grpc

        for status in grpc.StatusCode:
            if status.value[0] == code:
                return str(status.name)
    return default
