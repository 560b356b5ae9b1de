"""multirun's @run and @step next to Langfuse's @observe (its OpenTelemetry SDK, v3 on), in a
program whose Langfuse client exports to an in-memory exporter: no Langfuse server.

``python langfuse_program.py BASE_URL [multirun]``: BASE_URL a local address where no server
listens; ``multirun``: Langfuse exports multirun's spans too, not only those its default filter
keeps (spans with ``gen_ai.*`` attributes, of Langfuse and of the LLM instrumentations it knows).
"""

from __future__ import annotations

import sys
from typing import Any

from _report import FOREIGN_CALL, FOREIGN_CALL_ATTRIBUTES, report
from langfuse import Langfuse, observe
from langfuse.span_filter import is_default_export_span
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def multirun_too(span: Any) -> bool:
    return is_default_export_span(span) or span.instrumentation_scope.name == "multirun"


exported = InMemorySpanExporter()
langfuse = Langfuse(
    public_key="pk-lf-test",
    secret_key="sk-lf-test",
    base_url=sys.argv[1],
    span_exporter=exported,
    should_export_span=multirun_too if sys.argv[2:] == ["multirun"] else None,
)
langfuses = trace.get_tracer_provider()

import multirun.client  # noqa: E402
from multirun import run, step  # noqa: E402
from multirun.models import StepKind  # noqa: E402

other_instrumentation = trace.get_tracer("some.llm.instrumentation")


@observe(name="observed inside a step")
def observed() -> None:
    pass


@step
def plain() -> None:
    observed()


@step(kind=StepKind.LLM_CALL)
def ask() -> None:
    observed()
    with other_instrumentation.start_as_current_span(FOREIGN_CALL, attributes=FOREIGN_CALL_ATTRIBUTES):
        pass


@run
def main() -> None:
    plain()
    ask()


@observe(name="observed around a run")
def around() -> None:
    main()


around()
langfuse.flush()
client = multirun.client.configured_client()
report(
    exported.get_finished_spans(),
    same_global=trace.get_tracer_provider() is langfuses,
    client_uses_it=client is not None and client.tracer_provider is langfuses,
    owned_provider=multirun.client._owned_provider is not None,
)
