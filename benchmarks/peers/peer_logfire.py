"""Pydantic Logfire: ``@logfire.instrument()`` (sync, async, generator), spans to the counting exporter.

``logfire.configure(send_to_logfire=False, console=False,
additional_span_processors=[BatchSpanProcessor(counting)])``: nothing is sent
to Logfire, nothing printed; its own processor chain (scrubbing, attribute
handling, the pending-span machinery) runs as it does by default, with the
counting exporter behind it. Argument extraction on (the default). The
generator variant passes ``allow_generator=True``, which Logfire asks for on
generators (it warns otherwise; the span is the same).
"""

from __future__ import annotations

from typing import Any

from _peer import Peer

LABEL = "Logfire"
DECORATOR = "`@logfire.instrument()`"
PACKAGES = ["logfire"]
ENV = {"LOGFIRE_SEND_TO_LOGFIRE": "false", "LOGFIRE_CONSOLE": "false", "LOGFIRE_IGNORE_NO_CONFIG": "1"}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    import logfire
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    processor = BatchSpanProcessor(exporter)
    logfire.configure(
        send_to_logfire=False,
        console=False,
        service_name="bench-peers",
        additional_span_processors=[processor],
    )
    calls = {
        "sync": logfire.instrument()(work),
        "async": logfire.instrument()(work_async),
        "gen": logfire.instrument(allow_generator=True)(work_gen),
    }

    def flush() -> None:
        logfire.force_flush()
        processor.force_flush()

    return Peer(
        calls=calls,
        flush=flush,
        shutdown=logfire.shutdown if hasattr(logfire, "shutdown") else processor.shutdown,
        notes=[
            "`logfire.configure(send_to_logfire=False, console=False, "
            "additional_span_processors=[BatchSpanProcessor(counting)])`."
        ],
    )
