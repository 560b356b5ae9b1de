"""Span names and start attributes of runs, agents and steps (GenAI conventions)."""

from __future__ import annotations

from typing import Any

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
    """The attributes every span of this step starts with; built once per decorated function."""
    # decision "proceed" is the default; a step the policy treats otherwise overwrites it at its end
    attrs: dict[str, Any] = {a.STEP_NAME: name, a.STEP_KIND: kind.value, a.POLICY_DECISION: "proceed"}
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
