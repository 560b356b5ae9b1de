"""The reference: a bare OpenTelemetry SDK span around the call, nothing else installed.

``with tracer.start_as_current_span(name): return fn(...)`` on an SDK TracerProvider
with one BatchSpanProcessor (SDK defaults) exporting to the counting exporter.
"""

from __future__ import annotations

from typing import Any

from _peer import Peer, bare_decorators

LABEL = "bare OpenTelemetry span"
DECORATOR = "`with tracer.start_as_current_span(name):` (SDK TracerProvider + BatchSpanProcessor)"
PACKAGES = ["opentelemetry-api"]
ENV: dict[str, str] = {}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    calls = bare_decorators(provider.get_tracer("bench.reference"), work, work_async, work_gen)
    return Peer(calls=calls, flush=provider.force_flush, shutdown=provider.shutdown)
