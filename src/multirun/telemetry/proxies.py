"""The OpenTelemetry SDK's provider and tracer behind the proxies an SDK puts in front of them.

Logfire sets as the global TracerProvider a proxy of an SDK ``TracerProvider`` (its
``provider``), whose tracers are proxies of the SDK's tracers (their ``tracer``), so that
``logfire.configure`` can swap the provider behind them. multirun's spans go through the proxies
(Logfire adds its attributes to them); its span processors, its sampler's wrapper and its guard
of the span processors go to the SDK objects behind, which hold them.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider


def sdk_provider(provider: Any) -> TracerProvider | None:
    """``provider`` if it is the SDK's, else the SDK provider a proxy of it wraps, else None."""
    if isinstance(provider, TracerProvider):
        return provider
    inner = getattr(provider, "provider", None)  # Logfire's ProxyTracerProvider
    return inner if isinstance(inner, TracerProvider) else None


def sdk_tracer(tracer: Any) -> SdkTracer | None:
    """``tracer`` if it is the SDK's, else the SDK tracer a proxy of it wraps, else None."""
    if isinstance(tracer, SdkTracer):
        return tracer
    inner = getattr(tracer, "tracer", None)  # Logfire's _ProxyTracer
    return inner if isinstance(inner, SdkTracer) else None
