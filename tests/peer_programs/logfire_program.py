"""multirun's @run and @step in a program that configured Logfire first (no network).

``python logfire_program.py MODE``: ``traced`` (Logfire's provider, nesting both ways, budgets),
``raising`` (the same with a span processor that raises for multirun's spans), ``sampled``
(Logfire's head sampling leaves every trace out), ``exporter`` (``multirun.init(span_exporter=...)``
next to Logfire), ``reconfigure`` (the same, then ``logfire.configure`` again, with a span processor
that raises, between two runs).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import logfire
from _report import FOREIGN_CALL, FOREIGN_CALL_ATTRIBUTES, report
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

mode = sys.argv[1]
warnings: list[str] = []


class Warnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("multirun") and record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())


logging.getLogger("multirun").addHandler(Warnings())


class Raising(SpanProcessor):
    """An application's span processor with a bug that multirun's spans meet."""

    def on_start(self, span, parent_context=None):  # type: ignore[no-untyped-def]
        if span.instrumentation_scope.name == "multirun":
            raise RuntimeError("processor bug")


exported = InMemorySpanExporter()
processors = [SimpleSpanProcessor(exported)]
if mode == "raising":
    processors.append(Raising())
logfire.configure(
    send_to_logfire=False,
    console=False,
    additional_span_processors=processors,
    sampling=logfire.SamplingOptions(head=0.0) if mode == "sampled" else None,
)
logfires = trace.get_tracer_provider()

import multirun  # noqa: E402
import multirun.client  # noqa: E402
from multirun import run, step  # noqa: E402
from multirun.context import get_current_run_context  # noqa: E402
from multirun.errors import BudgetExceededError  # noqa: E402
from multirun.models import Budget, StepKind  # noqa: E402

own = InMemorySpanExporter()
if mode in ("exporter", "reconfigure"):
    multirun.init(span_exporter=own)

other_instrumentation = trace.get_tracer("some.llm.instrumentation")


@logfire.instrument("instrumented inside a step")
def instrumented() -> None:
    pass


@step
def plain() -> None:
    with logfire.span("logfire span inside a step"):
        instrumented()


@step(kind=StepKind.LLM_CALL)
def ask() -> None:
    # a model call another instrumentation traced, its usage on its span
    with other_instrumentation.start_as_current_span(FOREIGN_CALL, attributes=FOREIGN_CALL_ATTRIBUTES):
        time.sleep(0.02)


@run
def main() -> Any:
    plain()
    ask()
    return get_current_run_context().run


@run(budget=Budget(max_tokens=1500))
def capped() -> None:
    for _ in range(3):
        ask()


if mode == "reconfigure":
    # the first run, under the first configuration
    try:
        capped()
    except BudgetExceededError as error:
        first_refusal = str(error)
    logfires.force_flush()
    before = len(own.get_finished_spans())
    # a second configure, as a notebook cell run again or a test fixture does: Logfire puts a new
    # SDK provider behind its proxies
    exported = InMemorySpanExporter()
    processors = [SimpleSpanProcessor(exported), Raising()]
    logfire.configure(send_to_logfire=False, console=False, additional_span_processors=processors)
    refusal = None
    try:
        capped()
    except BudgetExceededError as error:
        refusal = str(error)
    steps = [s.model_dump(mode="json") for s in main().steps]
    logfires.force_flush()
    report(
        exported.get_finished_spans(),
        first_refusal=first_refusal,
        refusal=refusal,
        steps=steps,
        own_after=[s.name for s in own.get_finished_spans()[before:]],
        same_global=trace.get_tracer_provider() is logfires,
        warnings=warnings,
    )
    sys.exit()

with logfire.span("logfire span around a run"):
    steps = [s.model_dump(mode="json") for s in main().steps]
refusal = None
try:
    capped()
except BudgetExceededError as error:
    refusal = str(error)
logfires.force_flush()
client = multirun.client.configured_client()
report(
    exported.get_finished_spans(),
    own=[s.name for s in own.get_finished_spans()],
    same_global=trace.get_tracer_provider() is logfires,
    client_uses_it=client is not None and client.tracer_provider is logfires,
    owned_provider=multirun.client._owned_provider is not None,
    steps=steps,
    refusal=refusal,
    warnings=warnings,
)
