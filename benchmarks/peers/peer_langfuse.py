"""Langfuse: ``@observe`` (sync, async, generator), spans to the counting exporter.

``Langfuse(span_exporter=...)`` replaces the OTLP exporter to the Langfuse API
with the counting exporter; everything else is Langfuse's default (its own
TracerProvider, set as the global one; its LangfuseSpanProcessor, a
BatchSpanProcessor subclass, with its transforming exporter in front of ours;
input and output capture on). Placeholder keys, and a base URL on the loopback
that nothing listens on: the network guard would report any call to it.
"""

from __future__ import annotations

from typing import Any

from _peer import Peer

LABEL = "Langfuse"
DECORATOR = "`@observe` (langfuse)"
PACKAGES = ["langfuse"]
ENV = {
    "LANGFUSE_PUBLIC_KEY": "pk-lf-benchmark",
    "LANGFUSE_SECRET_KEY": "sk-lf-benchmark",
    "LANGFUSE_BASE_URL": "http://127.0.0.1:9",
    "LANGFUSE_HOST": "http://127.0.0.1:9",
}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    from langfuse import Langfuse, observe

    client = Langfuse(span_exporter=exporter)
    calls = {"sync": observe(work), "async": observe(work_async), "gen": observe(work_gen)}
    return Peer(
        calls=calls,
        flush=client.flush,
        shutdown=client.shutdown,
        notes=["`Langfuse(span_exporter=counting)`; input/output capture on (the default)."],
    )
