"""Pydantic models of runs, agents, steps, budgets, policies and checkpoints."""

from multirun.models.agent import Agent, AgentConfig, AgentStatus
from multirun.models.budget import Budget, BudgetStatus
from multirun.models.checkpoint import Checkpoint, CheckpointMeta
from multirun.models.policy import (
    BackoffStrategy,
    BudgetRule,
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    Policy,
    PolicyDecision,
    RateLimitRule,
    RetryRule,
)
from multirun.models.run import Run, RunPatch, RunStatus
from multirun.models.step import Step, StepKind, StepStatus

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentStatus",
    "BackoffStrategy",
    "Budget",
    "BudgetRule",
    "BudgetStatus",
    "Checkpoint",
    "CheckpointMeta",
    "CircuitBreakerRule",
    "DegradationTrigger",
    "GracefulDegradationRule",
    "Policy",
    "PolicyDecision",
    "RateLimitRule",
    "RetryRule",
    "Run",
    "RunPatch",
    "RunStatus",
    "Step",
    "StepKind",
    "StepStatus",
]
