"""Step: the atomic unit of execution within a run."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import Field

from multirun.models._base import Model, new_id


class StepKind(str, Enum):
    FUNCTION = "function"
    LLM_CALL = "llm_call"
    TOOL_CALL = "tool_call"
    SUB_AGENT = "sub_agent"
    DECISION = "decision"
    CHECKPOINT = "checkpoint"


class StepStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # served from the replay cache


class Step(Model):
    id: str = Field(default_factory=new_id)
    run_id: str = ""
    agent_id: str = ""
    name: str = ""
    kind: StepKind = StepKind.FUNCTION
    status: StepStatus = StepStatus.PENDING
    parent_step_id: str | None = None
    input_hash: str = ""
    # serialized input and output, as the step's span records them: with content capture only
    input_data: bytes | None = None
    output_data: bytes | None = None
    policy_decision: str | None = None
    tokens_used: int = 0
    cost_usd: float = 0.0
    latency_ms: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None
    attempt: int = 1
