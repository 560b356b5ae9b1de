"""AgentOps: ``@agentops.task`` (sync, async, generator), spans to the counting exporter.

``agentops.init`` builds its own TracerProvider (set as the global one) with a
BatchSpanProcessor to an authenticated OTLP exporter, and a MeterProvider with
a periodic OTLP metric exporter; neither takes a custom exporter (the
``exporter`` setting is accepted but not used by its tracing core), so the two
exporter classes are replaced, before ``init``, by the counting span exporter
and a metric exporter that drops everything. No API key (so no authentication
call), no auto-started session (each call is its own trace, as for the other
peers); everything else is AgentOps' default.
"""

from __future__ import annotations

from typing import Any

from _peer import Peer

LABEL = "AgentOps"
DECORATOR = "`@agentops.task`"
PACKAGES = ["agentops"]
ENV = {
    "AGENTOPS_API_ENDPOINT": "http://127.0.0.1:9",
    "AGENTOPS_APP_URL": "http://127.0.0.1:9",
    "AGENTOPS_EXPORTER_ENDPOINT": "http://127.0.0.1:9/v1/traces",
    "AGENTOPS_LOG_LEVEL": "ERROR",
}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    import agentops
    import agentops.sdk.core as core
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class DropMetrics(MetricExporter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            """Nothing to release."""

    core.AuthenticatedOTLPExporter = lambda *args, **kwargs: exporter  # type: ignore[assignment]
    core.OTLPMetricExporter = DropMetrics  # type: ignore[assignment]
    agentops.init(api_key=None, auto_start_session=False)
    provider = core.tracer.provider

    calls = {
        "sync": agentops.task(work),
        "async": agentops.task(work_async),
        "gen": agentops.task(work_gen),
    }
    return Peer(
        calls=calls,
        flush=provider.force_flush,
        shutdown=provider.shutdown,
        notes=[
            "its OTLP span and metric exporter classes replaced before `agentops.init` "
            "(no custom-exporter setting reaches its tracing core); no API key, no auto session."
        ],
    )
