"""OpenLIT: ``@openlit.trace`` (sync only), spans to the counting exporter.

``openlit.trace`` wraps a sync call (an ``async def`` or a generator would be
recorded as the coroutine or generator object, untraced), so only the sync
variant is measured. ``openlit.init`` reuses an SDK TracerProvider,
MeterProvider and LoggerProvider that are already set globally: the benchmark
sets them first, the tracer provider with a BatchSpanProcessor to the counting
exporter and the other two with no reader or processor (nothing printed or
sent). ``openlit.init`` downloads a price list from GitHub unless
``pricing_json`` names one: an empty local file is given (the network guard
reports the download when it is not). Content capture on (the default), no
instrumentor disabled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _peer import Peer

LABEL = "OpenLIT"
DECORATOR = "`@openlit.trace`"
PACKAGES = ["openlit"]
ENV = {"OPENLIT_URL": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    import os

    from opentelemetry import _logs, metrics, trace
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider())
    _logs.set_logger_provider(LoggerProvider())

    import openlit

    notes = []
    if os.environ.get("BENCH_OPENLIT_FETCH_PRICES") == "1":  # to show the guard catching it
        openlit.init(application_name="bench-peers")
        notes.append("default pricing download left on")
    else:
        prices = Path("openlit-pricing.json").resolve()
        prices.write_text("{}")
        openlit.init(application_name="bench-peers", pricing_json=str(prices))
        notes.append(
            "global SDK providers set before `openlit.init` (it reuses them); "
            "`pricing_json=` an empty local file (else it downloads prices from GitHub at init)"
        )
    calls = {"sync": openlit.trace(work)}
    return Peer(calls=calls, flush=provider.force_flush, shutdown=provider.shutdown, notes=notes)
