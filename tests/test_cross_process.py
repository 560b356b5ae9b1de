"""A run whose sub-agents work in other processes: one trace, one shared ledger in Redis."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import multirun
from multirun import agent, run, step
from multirun.errors import BudgetExceededError
from multirun.models import Budget, StepKind

pytest_plugins = ["redis_server"]

CALLS_PER_WORKER = 20
TOKENS_PER_CALL = 150  # 100 in, 50 out


def worker(carrier: dict[str, str], ledger_uri: str) -> dict[str, Any]:
    """A worker process: continues the run, spends, and reports what its spans looked like."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    multirun.init(tracer_provider=provider, ledger_uri=ledger_uri, metrics=False)

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def summarize(i: int) -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    @agent(name="summarizer")
    def summarizer() -> int:
        done = 0
        for i in range(CALLS_PER_WORKER):
            try:
                summarize(i)
            except BudgetExceededError:
                break
            done += 1
        return done

    with multirun.continue_run(carrier):
        done = summarizer()
    spans = exporter.get_finished_spans()
    agent_span = next(s for s in spans if s.name == "invoke_agent summarizer")
    return {
        "done": done,
        "trace_id": agent_span.context.trace_id,
        "agent_parent": agent_span.parent.span_id if agent_span.parent else None,
    }


def run_workers(carriers: list[dict[str, str]], ledger_uri: str) -> list[dict[str, Any]]:
    with multiprocessing.get_context("spawn").Pool(len(carriers)) as pool:
        return pool.starmap(worker, [(c, ledger_uri) for c in carriers])


@pytest.mark.parametrize("max_tokens", [None, 4000])
def test_workers_in_other_processes_spend_one_shared_ledger(traced, redis_server, max_tokens) -> None:
    client = multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    results: list[dict[str, Any]] = []

    @step
    def dispatch() -> None:
        carriers = [multirun.inject() for _ in range(3)]
        results.extend(run_workers(carriers, redis_server.url))

    @run(budget=Budget(max_tokens=max_tokens) if max_tokens else None)
    def crew() -> str:
        dispatch()
        return multirun.context.get_current_run_context().run.id

    crew()
    run_span = traced.span("invoke_workflow crew")
    dispatch_span = traced.span("step dispatch")
    done = sum(r["done"] for r in results)
    if max_tokens is None:
        assert done == 3 * CALLS_PER_WORKER
    else:
        # the limit is reached at the step that takes the total to 4000 or more: at most the steps in
        # flight when it was crossed (one per worker) go past it
        assert 4000 // TOKENS_PER_CALL <= done <= 4000 // TOKENS_PER_CALL + 3
    assert run_span.attributes["multirun.tokens_used"] == done * TOKENS_PER_CALL
    assert {r["trace_id"] for r in results} == {run_span.context.trace_id}
    assert {r["agent_parent"] for r in results} == {dispatch_span.context.span_id}
    client.force_flush()


def test_continue_run_without_a_run_in_the_carrier_says_what_to_do(traced) -> None:
    with pytest.raises(multirun.ConfigurationError, match=r"multirun.inject\(\)"), multirun.continue_run({}):
        pass
