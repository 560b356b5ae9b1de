"""Keys under which the current run, agent and step live in the OpenTelemetry context."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from opentelemetry import context as otel_context
from opentelemetry.context import Context

# The API's own key of the current span: a step builds its context in one copy with it.
from opentelemetry.trace.propagation import _SPAN_KEY as SPAN_KEY

if TYPE_CHECKING:
    from multirun.context import AgentContext, RunContext, StepContext

RUN_KEY = otel_context.create_key("multirun-run")
AGENT_KEY = otel_context.create_key("multirun-agent")
STEP_KEY = otel_context.create_key("multirun-step")


def run_in(ctx: Context) -> RunContext | None:
    """The run current in ``ctx``, if any."""
    return cast("RunContext | None", ctx.get(RUN_KEY))


def agent_in(ctx: Context) -> AgentContext | None:
    """The agent explicitly started in ``ctx``, if any (not the run's default agent)."""
    return cast("AgentContext | None", ctx.get(AGENT_KEY))


def step_in(ctx: Context) -> StepContext | None:
    """The step current in ``ctx``, if any."""
    return cast("StepContext | None", ctx.get(STEP_KEY))


__all__ = ["AGENT_KEY", "RUN_KEY", "SPAN_KEY", "STEP_KEY", "agent_in", "run_in", "step_in"]
