"""Agent: a named actor within a run, and AgentConfig, a reusable template."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import Field

from multirun.models._base import Model, new_id, utcnow
from multirun.models.budget import Budget


class AgentStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Agent(Model):
    id: str = Field(default_factory=new_id)
    run_id: str = ""
    agent_config_id: str | None = None
    name: str = ""
    status: AgentStatus = AgentStatus.PENDING
    tokens_used: int = 0
    cost_usd: float = 0.0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None
    metadata: dict[str, Any] | None = None


class AgentConfig(Model):
    id: str = Field(default_factory=new_id)
    workspace_id: str = ""
    name: str = ""
    description: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    default_budget: Budget | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
