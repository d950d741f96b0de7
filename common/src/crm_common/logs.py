"""JSON log lines, one per record, for every process of the platform."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from opentelemetry import trace


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Lets each distinct message of a chatty library through once per `window` seconds.

    While Kafka is down, aiokafka logs the same few ERROR lines (a refused
    connection, a failed metadata update) dozens of times a second per
    worker. The first of each still shows, with the count of the ones held
    back since; the worker's own line (crm_common.health) says once what it
    waits for and once when it is back.
    """

    def __init__(
        self, prefix: str, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.window = window
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        shown = self._seen.get(key)
        if shown is not None and now - shown[0] < self.window:
            self._seen[key] = (shown[0], shown[1] + 1)
            return False
        held = shown[1] if shown is not None else 0
        if held:
            record.msg = f"{record.msg} ({held} like it in the last {self.window:.0f} s not shown)"
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        return True


def setup_logging(service: str) -> None:
    """Logs to stderr as JSON; the level comes from CRM_LOG_LEVEL (default INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("CRM_LOG_LEVEL", "INFO").upper())
    # aiokafka is chatty at INFO about every (re)connection, and repeats its
    # errors many times a second while the broker is away.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    handler.addFilter(_AIOKAFKA_REPEATS)


#: One filter for the process, so that setting logging up twice keeps one memory.
_AIOKAFKA_REPEATS = RepeatFilter("aiokafka")
