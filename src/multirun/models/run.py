"""Run: one execution of an agent program, and RunPatch, a partial update of it."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import Field

from multirun.models._base import Model, new_id, utcnow
from multirun.models.budget import Budget
from multirun.models.checkpoint import CheckpointMeta
from multirun.models.policy import Policy
from multirun.models.step import Step


class RunStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # checkpointed, waiting for replay


class Run(Model):
    id: str = Field(default_factory=new_id)
    name: str = ""
    status: RunStatus = RunStatus.PENDING
    parent_id: str | None = None
    steps: list[Step] = Field(default_factory=list)
    current_step_id: str | None = None
    checkpoints: list[CheckpointMeta] = Field(default_factory=list)
    latest_checkpoint_id: str | None = None
    budget: Budget | None = None
    tokens_used: int = 0
    cost_usd: float = 0.0
    policy: Policy | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: bytes | None = None
    error: str | None = None


class RunPatch(Model):
    """A partial update: only the fields that are not None are applied."""

    name: str | None = None
    status: RunStatus | None = None
    current_step_id: str | None = None
    latest_checkpoint_id: str | None = None
    budget: Budget | None = None
    tokens_used: int | None = None
    cost_usd: float | None = None
    policy: Policy | None = None
    metadata: dict[str, Any] | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: bytes | None = None
    error: str | None = None

    def apply(self, run: Run) -> Run:
        """Return a copy of ``run`` with the fields of this patch that are set."""
        changes = {k: v for k, v in self if v is not None}
        return run.model_copy(update=changes)
