"""Traceloop (OpenLLMetry): ``@task()`` (sync, async, generator), spans to the counting exporter.

``Traceloop.init(exporter=...)``: its TracerProvider (set as the global one)
with a BatchSpanProcessor to the counting exporter; metrics and logging off
(with a custom span exporter and no metrics exporter Traceloop turns metrics
off itself), telemetry off. Everything else is Traceloop's default, content
tracing (inputs and outputs as JSON attributes) and its instrumentation of
every supported library that is installed included.
"""

from __future__ import annotations

from typing import Any

from _peer import Peer

LABEL = "Traceloop"
DECORATOR = "`@task()` (traceloop-sdk)"
PACKAGES = ["traceloop-sdk"]
ENV = {
    "TRACELOOP_TELEMETRY": "false",
    "TRACELOOP_METRICS_ENABLED": "false",
    "TRACELOOP_LOGGING_ENABLED": "false",
    "TRACELOOP_BASE_URL": "http://127.0.0.1:9",
}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    from opentelemetry import trace
    from traceloop.sdk import Traceloop
    from traceloop.sdk.decorators import task

    Traceloop.init(app_name="bench-peers", exporter=exporter, telemetry_enabled=False)
    provider = trace.get_tracer_provider()

    calls = {"sync": task()(work), "async": task()(work_async), "gen": task()(work_gen)}
    return Peer(
        calls=calls,
        flush=provider.force_flush,  # type: ignore[attr-defined]
        shutdown=provider.shutdown,  # type: ignore[attr-defined]
        notes=[
            "`Traceloop.init(exporter=counting, telemetry_enabled=False)`; content tracing on (the default)."
        ],
    )
