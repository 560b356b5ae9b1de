"""The workload the stack tests send through the Collector: every metric, every alert.

Run as a script (``python stack_workload.py --endpoint http://127.0.0.1:4318``),
in its own process so that its OpenTelemetry providers are its own. It runs
``--rounds`` rounds, a second apart (metrics are exported every
``OTEL_METRIC_EXPORT_INTERVAL`` ms, so Prometheus sees every counter grow), of:

- ``research_crew``: the bundled demo (LLM and tool steps, a retry, a stream, a checkpoint);
  cheap and healthy: no alert may fire for it.
- ``runaway_crew``: no budget, gpt-4o calls of millions of tokens: dollars a
  second, far over any sane cost-rate threshold (MultiRunCostOverrun).
- ``capped_crew``: smaller calls (7 cents) under ``Budget(max_cost_usd=0.05)``: the
  budget refuses the second step (MultiRunBudgetExceeded), and the spend stays low.
- ``flaky_crew``: a tool that always fails, under a circuit breaker that opens
  after two failures (MultiRunCircuitBreakerOpen, MultiRunStepFailureRatio).
- ``frugal_crew``: a degradation rule that falls back to a cheaper model and a
  rate limit that makes steps wait (policy decisions ``fallback`` and ``wait``).

It prints one JSON line: the service name and the number of rounds.

With ``--lose-spans`` it is another service, ``multirun-e2e-lossy``: one round of the
demo whose spans go to a port where nothing listens while its metrics reach the
Collector, so every span is dropped (MultiRunSpansDropped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time

import multirun
from multirun import agent, demo, run, step
from multirun.context import get_current_step_context
from multirun.errors import BudgetExceededError, PolicyViolation
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import (
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    RateLimitRule,
)

SERVICE_NAME = "multirun-e2e"
LOSSY_SERVICE_NAME = "multirun-e2e-lossy"
EXPENSIVE_MODEL = "gpt-4o"  # 2.50 USD per million input tokens, 10 USD per million output tokens
CHEAP_MODEL = "gpt-4o-mini"


@step(kind=StepKind.LLM_CALL, model=EXPENSIVE_MODEL)
def huge_prompt(tokens: int) -> str:
    """A model call with a large context: 7 USD at gpt-4o prices for 2 million tokens (and 10% out)."""
    model = get_current_step_context().model or EXPENSIVE_MODEL
    multirun.report_usage(model, provider="openai", input_tokens=tokens, output_tokens=tokens // 10)
    return "more"


@step(kind=StepKind.TOOL_CALL)
def flaky_lookup(query: str) -> str:
    """A tool whose backend is down."""
    raise ConnectionError(f"lookup of {query!r}: connection refused")


@agent(name="looper")
def looper(calls: int, tokens: int = 2_000_000) -> None:
    for _ in range(calls):
        huge_prompt(tokens)


@run(name="runaway_crew")
def runaway_crew(calls: int) -> None:
    looper(calls)


@run(name="capped_crew", budget=Budget(max_cost_usd=0.05))
def capped_crew() -> None:
    looper(3, tokens=20_000)  # the first call spends about 7 cents; the budget refuses the second


@agent(name="searcher")
def searcher(queries: int) -> None:
    for number in range(queries):
        # the agent carries on; the circuit breaker refuses the tool once it is open
        with contextlib.suppress(ConnectionError, PolicyViolation):
            flaky_lookup(f"query {number}")


@run(
    name="flaky_crew",
    policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2, recovery_time_seconds=600)),
)
def flaky_crew(queries: int) -> None:
    searcher(queries)


@step(kind=StepKind.LLM_CALL, model=EXPENSIVE_MODEL)
def answer(question: str) -> str:
    model = get_current_step_context().model or EXPENSIVE_MODEL  # the policy may have switched it
    multirun.report_usage(model, provider="openai", input_tokens=20_000, output_tokens=2_000)
    return f"{model} answers {question}"


@agent(name="answerer")
def answerer(questions: int) -> None:
    for number in range(questions):
        answer(f"question {number}")


@run(
    name="frugal_crew",
    budget=Budget(max_cost_usd=10.0),
    policy=Policy(
        graceful_degradation=GracefulDegradationRule(
            fallback_model=CHEAP_MODEL, trigger=DegradationTrigger.COST_PERCENTAGE, threshold=0.5
        ),
        rate_limit=RateLimitRule(requests_per_minute=1200),
    ),
)
def frugal_crew(questions: int) -> None:
    answerer(questions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="the Collector's OTLP/HTTP address")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument("--lose-spans", action="store_true", help="send the spans where nothing listens")
    args = parser.parse_args(argv)
    if args.lose_spans:
        return lose_spans(args.endpoint)

    client = multirun.init(
        endpoint=args.endpoint, service_name=SERVICE_NAME, local_dir=tempfile.mkdtemp(prefix="multirun-e2e-")
    )
    for number in range(args.rounds):
        if number:
            time.sleep(args.pause)
        demo.run_demo()
        runaway_crew(5)
        with contextlib.suppress(BudgetExceededError):
            capped_crew()
        flaky_crew(8)  # 8 a round: MultiRunStepFailureRatio wants at least 10 steps in 10 minutes
        frugal_crew(4)
    client.force_flush()
    json.dump({"service": SERVICE_NAME, "rounds": args.rounds}, sys.stdout)
    print()
    return 0


def lose_spans(endpoint: str) -> int:
    """The demo once, its spans to a closed port (each export fails), its metrics to ``endpoint``."""
    from opentelemetry import metrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    nowhere = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=1)
    client = multirun.init(
        endpoint=endpoint,
        span_exporter=nowhere,
        service_name=LOSSY_SERVICE_NAME,
        local_dir=tempfile.mkdtemp(prefix="multirun-e2e-"),
    )
    demo.run_demo()
    client.force_flush(timeout_millis=10_000)  # fails: the spans are counted dropped
    metrics.get_meter_provider().force_flush()  # type: ignore[attr-defined]  # the SDK's, made by init
    json.dump({"service": LOSSY_SERVICE_NAME, "rounds": 1}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
