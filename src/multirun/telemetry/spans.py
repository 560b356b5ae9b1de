"""Span names and start attributes of runs, agents and steps (GenAI conventions)."""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Span

from multirun.models.step import StepKind
from multirun.telemetry import attributes as a

_OPERATION = {
    StepKind.LLM_CALL: a.OP_CHAT,
    StepKind.TOOL_CALL: a.OP_EXECUTE_TOOL,
    StepKind.SUB_AGENT: a.OP_INVOKE_AGENT,
}


def run_span_name(name: str) -> str:
    return f"{a.OP_INVOKE_WORKFLOW} {name}"


def agent_span_name(name: str) -> str:
    return f"{a.OP_INVOKE_AGENT} {name}"


def step_span_name(kind: StepKind, name: str, model: str | None) -> str:
    """``chat {model}`` for LLM calls, ``execute_tool {name}`` for tools, else ``step {name}``."""
    if kind is StepKind.LLM_CALL:
        return f"{a.OP_CHAT} {model}" if model else a.OP_CHAT
    if kind is StepKind.TOOL_CALL:
        return f"{a.OP_EXECUTE_TOOL} {name}"
    if kind is StepKind.SUB_AGENT:
        return f"{a.OP_INVOKE_AGENT} {name}"
    return f"step {name}"


def step_start_attributes(kind: StepKind, name: str, model: str | None) -> dict[str, Any]:
    """The attributes a step's span starts with; built once per decorated function.

    Only what the GenAI conventions ask for at span creation, for samplers
    (operation, tool or agent name, requested model); a plain function step
    starts with none, because each attribute given to the SDK costs about a
    microsecond. The ``multirun.step.*`` attributes are set as the step ends.
    """
    attrs: dict[str, Any] = {}
    operation = _OPERATION.get(kind)
    if operation is not None:
        attrs[a.GEN_AI_OPERATION_NAME] = operation
    if kind is StepKind.TOOL_CALL:
        attrs[a.GEN_AI_TOOL_NAME] = name
    if kind is StepKind.SUB_AGENT:
        attrs[a.GEN_AI_AGENT_NAME] = name
    if model and kind is StepKind.LLM_CALL:
        attrs[a.GEN_AI_REQUEST_MODEL] = model
    return attrs


def set_end_attributes(span: Span, attributes: dict[str, Any]) -> None:
    """Set attributes on a span about to end, the cheap way when it is safe.

    The SDK validates every value it is given (about 1 to 1.5 microseconds
    each, most of a step's overhead). The values multirun sets at the end of a
    step are already valid strings, numbers and booleans, so on an SDK span
    with room left and no value-length limit they go straight into its
    attribute dict; anywhere else, through ``set_attributes``.
    """
    # plain attribute reads in a try: about 1,000 instructions cheaper than getattr with defaults
    try:
        store = span._attributes  # type: ignore[attr-defined]
        raw = store._dict
        direct = (
            type(raw) is dict
            and store.max_value_len is None
            and len(raw) + len(attributes) <= (store.maxlen or 0)
        )
    except AttributeError:  # no SDK span, or another version's
        direct = False
    if direct:
        raw.update(attributes)
    else:
        span.set_attributes(attributes)
