"""Budgets charge the calls of other GenAI instrumentations in runs whose trace is sampled out.

Production tracing samples: with ``ParentBased(TraceIdRatioBased(0.1))`` nine runs in ten have
an unsampled trace, and the openai-v2 instrumentation's spans inside them would not be recorded,
so their tokens would reach no budget. multirun has the provider's sampler record (not sample)
a GenAI span that starts inside a run: the usage processor sees it, the export pipeline does
not. The real openai client talks to the local server of test_openai_usage, instrumented by
the real opentelemetry-instrumentation-openai-v2, exported through the SDK's batch processor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import multirun
from multirun import run, step
from multirun.context import RunContext, get_current_run_context
from multirun.errors import BudgetExceededError
from multirun.models import Budget
from test_openai_usage import CANNED, RESPONSE_MODEL, CannedOpenAI, ask, client, llm, price

__all__ = ["client", "llm"]  # fixtures, imported for pytest

LIMIT = CANNED[0].tokens + 100  # the second call goes past it: the third step never starts


def stopped_run(client: openai.OpenAI) -> tuple[RunContext, BudgetExceededError, list[bool]]:
    """A run of steps each making one instrumented call (returning nothing: the call's span is
    the only source of its usage), stopped by its token budget; its context, the error, and
    whether each step's own span was recorded."""
    seen: dict[str, RunContext] = {}
    recorded: list[bool] = []

    @step
    def call(i: int) -> None:
        recorded.append(trace.get_current_span().is_recording())
        ask(client, f"call {i}")

    @run(budget=Budget(max_tokens=LIMIT))
    def main() -> None:
        seen["run"] = get_current_run_context()
        for i in range(4):
            call(i)

    with pytest.raises(BudgetExceededError) as info:
        main()
    return seen["run"], info.value, recorded


def assert_stopped_after_the_second_call(
    ctx: RunContext, error: BudgetExceededError, llm: CannedOpenAI
) -> None:
    spent = CANNED[0].tokens + CANNED[1].tokens
    assert llm.requests == 2  # the third step never sent its request
    assert (error.limit, error.used, error.maximum) == ("max_tokens", spent, LIMIT)
    assert ctx.run.tokens_used == spent
    # priced as the openai span reports the call: the model it answered with, its input and output
    cost = sum(price(RESPONSE_MODEL, c.prompt, c.completion) for c in CANNED[:2])
    assert ctx.run.cost_usd == pytest.approx(cost, rel=1e-6)
    # the third step was stopped before its body ran
    assert [s.tokens_used for s in ctx.run.steps] == [CANNED[0].tokens, CANNED[1].tokens, 0]


def instrumenting(provider: Any) -> Callable[[], None]:
    """Instrument openai now (for ``provider``, None: the global one); returns the undo."""
    instrumentor = OpenAIInstrumentor()
    if provider is None:
        instrumentor.instrument()
    else:
        instrumentor.instrument(tracer_provider=provider)
    return instrumentor.uninstrument


@pytest.fixture
def undo() -> Iterator[list[Callable[[], None]]]:
    undos: list[Callable[[], None]] = []
    yield undos
    for u in undos:
        u()


def app_provider(sampler: str, monkeypatch: pytest.MonkeyPatch) -> TracerProvider:
    """The application's own provider, its sampler set in code or by OTEL_TRACES_SAMPLER."""
    if sampler == "ParentBased(TraceIdRatioBased(0.0))":
        return TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")  # the SDK's shared ALWAYS_OFF
    return TracerProvider()


@pytest.mark.parametrize("sampler", ["ParentBased(TraceIdRatioBased(0.0))", "OTEL_TRACES_SAMPLER=always_off"])
@pytest.mark.parametrize("instrumented", ["before init", "after init"])
def test_a_budget_charges_instrumented_calls_of_a_run_the_apps_sampler_leaves_out(
    tmp_path, monkeypatch, llm, client, undo, sampler: str, instrumented: str
) -> None:
    provider = app_provider(sampler, monkeypatch)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if instrumented == "before init":  # openai-v2 holds its tracer from then on
        undo.append(instrumenting(provider))
    multirun.init(tracer_provider=provider, checkpoint_uri=str(tmp_path / "blobs"))
    if instrumented == "after init":
        undo.append(instrumenting(provider))

    ctx, error, recorded = stopped_run(client)

    assert_stopped_after_the_second_call(ctx, error, llm)
    assert recorded == [False, False]  # multirun's own spans are left unrecorded, as the sampler said
    assert provider.force_flush()
    assert exporter.get_finished_spans() == ()  # nothing of the trace left out is exported
    provider.shutdown()


@pytest.mark.parametrize("instrumented", ["before init", "after init"])
def test_a_budget_charges_instrumented_calls_of_a_run_under_a_callers_unsampled_traceparent(
    tmp_path, llm, client, undo, instrumented: str
) -> None:
    provider = TracerProvider()  # the default sampler: parent-based, so the caller decides
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if instrumented == "before init":
        undo.append(instrumenting(provider))
    multirun.init(tracer_provider=provider, checkpoint_uri=str(tmp_path / "blobs"))
    if instrumented == "after init":
        undo.append(instrumenting(provider))
    unsampled = f"00-{'ab' * 16}-{'cd' * 8}-00"  # flags 00: the caller's trace is not sampled
    caller = TraceContextTextMapPropagator().extract({"traceparent": unsampled})

    token = otel_context.attach(caller)
    try:
        ctx, error, recorded = stopped_run(client)
    finally:
        otel_context.detach(token)

    assert_stopped_after_the_second_call(ctx, error, llm)
    assert recorded == [False, False]
    assert provider.force_flush()
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


@pytest.mark.parametrize("instrumented", ["before init", "after init"])
def test_a_budget_charges_instrumented_calls_when_multiruns_provider_samples_nothing(
    monkeypatch, global_otel, llm, client, undo, instrumented: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    if instrumented == "before init":  # through the global provider, set by init
        undo.append(instrumenting(None))
    own = multirun.init(span_exporter=exporter)
    if instrumented == "after init":
        undo.append(instrumenting(None))

    ctx, error, _ = stopped_run(client)

    assert_stopped_after_the_second_call(ctx, error, llm)
    assert own.force_flush()
    assert exporter.get_finished_spans() == ()


def test_with_the_trace_sampled_nothing_changes(tmp_path, llm, client, undo) -> None:
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    multirun.init(tracer_provider=provider, checkpoint_uri=str(tmp_path / "blobs"))
    undo.append(instrumenting(provider))

    ctx, error, recorded = stopped_run(client)

    assert_stopped_after_the_second_call(ctx, error, llm)
    assert recorded == [True, True]
    assert provider.force_flush()
    spans = exporter.get_finished_spans()
    chats = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert len(chats) == 2 and all(s.context.trace_flags.sampled for s in chats)
    assert sorted(s.name for s in spans) == [
        "chat gpt-4o-mini",
        "chat gpt-4o-mini",
        "invoke_workflow main",
        "step call",
        "step call",
        "step call",
    ]
    provider.shutdown()


def test_multiruns_own_spans_of_a_run_left_out_stay_unrecorded(tmp_path, llm, client, undo) -> None:
    # an agent and an LLM step start with GenAI names too: they stay as the sampler made them, so
    # the run shows as sampled out (its steps keep their own times) and costs what it did
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    multirun.init(tracer_provider=provider, checkpoint_uri=str(tmp_path / "blobs"))
    undo.append(instrumenting(provider))
    recorded: dict[str, bool] = {}

    @step(kind="llm_call", model="gpt-4o-mini")
    def think() -> None:
        recorded["llm step"] = trace.get_current_span().is_recording()
        ask(client, "hm")

    @multirun.agent
    def planner() -> None:
        recorded["agent"] = trace.get_current_span().is_recording()
        think()

    @run
    def main() -> int:
        recorded["run"] = trace.get_current_span().is_recording()
        planner()
        return get_current_run_context().run.tokens_used

    assert main() == CANNED[0].tokens
    assert recorded == {"run": False, "agent": False, "llm step": False}
    provider.shutdown()
