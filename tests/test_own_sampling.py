"""multirun's spans are sampled as the application's sampler samples them.

A ParentBased sampler (the SDK's default) is not called for a child of a sampled local span:
multirun gives the answer it would (sample, the parent's trace state), a step's cheapest
path. These tests hold the decisions to the sampler's own wherever that shortcut would differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import multirun
from multirun import client as client_module
from multirun import run, step
from multirun.context import get_current_run_context

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def sampled_by(tmp_path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """``sampled_by(sampler)``: multirun configured on a provider with that sampler; its exporter."""
    providers: list[TracerProvider] = []

    def configure(sampler: Sampler) -> InMemorySpanExporter:
        exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=sampler)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
        multirun.init(tracer_provider=provider, checkpoint_uri=str(tmp_path / "blobs"), metrics=False)
        return exporter

    yield configure
    client_module._configured = None
    for provider in providers:
        provider.shutdown()


recorded: list[bool] = []


@step
def look_up(query: str) -> str:
    recorded.append(trace.get_current_span().is_recording())
    return query.upper()


@step
def secret(query: str) -> str:
    recorded.append(trace.get_current_span().is_recording())
    return query[::-1]


@run
def job() -> str:
    get_current_run_context().set_state("k", 1)
    return look_up("a") + secret("b") + look_up("c")


def names(spans: Sequence[ReadableSpan]) -> list[str]:
    return sorted(span.name for span in spans)


def test_steps_of_a_run_under_a_callers_traceparent_carry_its_trace_state(sampled_by) -> None:
    exporter = sampled_by(DEFAULT_ON)
    carrier = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01", "tracestate": "vendor=abc,other=1"}
    token = otel_context.attach(TraceContextTextMapPropagator().extract(carrier))
    try:
        assert job() == "AbC"
    finally:
        otel_context.detach(token)
    spans = exporter.get_finished_spans()
    assert names(spans) == ["invoke_workflow job", "step look_up", "step look_up", "step secret"]
    for span in spans:
        assert span.context.trace_id == int(TRACE_ID, 16)
        assert span.context.trace_flags.sampled
        assert dict(span.context.trace_state) == {"vendor": "abc", "other": "1"}, span.name


def test_a_sampler_that_drops_the_children_of_sampled_spans_drops_the_steps(sampled_by) -> None:
    recorded.clear()
    exporter = sampled_by(ParentBased(ALWAYS_ON, local_parent_sampled=ALWAYS_OFF))
    assert job() == "AbC"
    assert names(exporter.get_finished_spans()) == ["invoke_workflow job"]
    assert recorded == [False, False, False]


class _NoSecrets(ParentBased):
    """A ParentBased of the application's that decides some children itself."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if name == "step secret":
            return SamplingResult(Decision.DROP)
        return super().should_sample(parent_context, trace_id, name, kind, attributes, links)


def test_a_parent_based_sampler_of_the_applications_own_decides_each_step(sampled_by) -> None:
    recorded.clear()
    exporter = sampled_by(_NoSecrets(ALWAYS_ON))
    assert job() == "AbC"
    assert names(exporter.get_finished_spans()) == ["invoke_workflow job", "step look_up", "step look_up"]
    assert recorded == [True, False, True]


def test_a_parent_based_sampler_changed_in_place_decides_each_step(sampled_by) -> None:
    recorded.clear()
    sampler = ParentBased(ALWAYS_ON)
    decide = sampler.should_sample

    def no_secrets(parent_context: Context | None, trace_id: int, name: str, *args: Any) -> SamplingResult:
        return (
            SamplingResult(Decision.DROP)
            if name == "step secret"
            else decide(parent_context, trace_id, name, *args)
        )

    sampler.should_sample = no_secrets  # type: ignore[method-assign]
    exporter = sampled_by(sampler)
    assert job() == "AbC"
    assert names(exporter.get_finished_spans()) == ["invoke_workflow job", "step look_up", "step look_up"]
    assert recorded == [True, False, True]


def test_a_sampler_that_drops_the_children_of_remote_spans_drops_the_run(sampled_by) -> None:
    recorded.clear()
    exporter = sampled_by(ParentBased(ALWAYS_ON, remote_parent_sampled=ALWAYS_OFF))
    carrier = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    token = otel_context.attach(TraceContextTextMapPropagator().extract(carrier))
    try:
        assert job() == "AbC"
    finally:
        otel_context.detach(token)
    assert exporter.get_finished_spans() == ()
    assert recorded == [False, False, False]
