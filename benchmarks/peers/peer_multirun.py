"""multirun-otel: ``@multirun.step`` inside a ``@multirun.run`` that has a Budget and a Policy.

``multirun.init(tracer_provider=...)`` on an SDK TracerProvider with one
BatchSpanProcessor to the counting exporter (multirun adds its own span
processor to it); checkpoints to memory; metrics on (the process's global
MeterProvider, the API's no-op one here, as in an app that has not configured
metrics). Each batch is one call of a ``@run`` function, whose loop of steps is
what is timed; the run span is exported too (one per batch).
"""

from __future__ import annotations

from typing import Any

from _peer import Peer

LABEL = "multirun-otel"
DECORATOR = "`@multirun.step` in a `@multirun.run(budget=Budget(...), policy=Policy(...))`"
PACKAGES = ["multirun-otel"]
ENV: dict[str, str] = {}


def setup(exporter: Any, work: Any, work_async: Any, work_gen: Any) -> Peer:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    import multirun
    from multirun.models import Budget, Policy
    from multirun.models.policy import CircuitBreakerRule, RateLimitRule, RetryRule

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    multirun.init(tracer_provider=provider, checkpoint_uri="memory://bench-peers")

    budget = Budget(max_tokens=10**15, max_cost_usd=1e12, max_steps=10**15, max_duration_seconds=1e9)
    policy = Policy(
        retry=RetryRule(),
        rate_limit=RateLimitRule(requests_per_minute=1e9),
        circuit_breaker=CircuitBreakerRule(),
    )
    governed = multirun.run(name="bench-peers", budget=budget, policy=policy)

    def wrap(mode: str, batch: Any) -> Any:
        if mode == "async":

            async def in_run_async(n: int) -> int:
                return await batch(n)

            return governed(in_run_async)

        def in_run(n: int) -> int:
            return batch(n)

        return governed(in_run)

    calls = {
        "sync": multirun.step(work),
        "async": multirun.step(work_async),
        "gen": multirun.step(work_gen),
    }
    return Peer(
        calls=calls,
        flush=provider.force_flush,
        shutdown=provider.shutdown,
        wrap=wrap,
        notes=[
            "Budget(max_tokens, max_cost_usd, max_steps, max_duration_seconds) and "
            "Policy(retry, rate_limit, circuit_breaker) on the run; one run per batch."
        ],
    )
