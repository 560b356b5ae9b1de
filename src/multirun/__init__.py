"""multirun: observe and govern AI agents with OpenTelemetry.

import multirun
from multirun import run, step
from multirun.models import Budget, StepKind

@step(kind=StepKind.LLM_CALL)
def ask(prompt: str) -> str:
    multirun.report_usage("gpt-4o-mini", input_tokens=12, output_tokens=40)
    return "..."

@run(budget=Budget(max_cost_usd=1.0))
def main() -> str:
    return ask("hello")
"""

from multirun import _otel_imports  # noqa: F401  (first: OpenTelemetry imported despite a bad variable)
from multirun.checkpoints.resume import resume
from multirun.client import MultiRunClient, get_client, init, init_local
from multirun.context import report_usage
from multirun.decorators import agent, checkpoint, run, step
from multirun.errors import (
    BudgetExceededError,
    CheckpointError,
    ConfigurationError,
    DeterminismError,
    LedgerUnavailableError,
    MultiRunError,
    PolicyViolation,
    ReplayError,
    StepError,
    StepNotEndedError,
)
from multirun.pricing import Price
from multirun.propagation import continue_run, inject
from multirun.usage import TokenUsage
from multirun.vocabulary import act, observe, synthesize, think

__version__ = "0.1.0"

__all__ = [
    "BudgetExceededError",
    "CheckpointError",
    "ConfigurationError",
    "DeterminismError",
    "LedgerUnavailableError",
    "MultiRunClient",
    "MultiRunError",
    "PolicyViolation",
    "Price",
    "ReplayError",
    "StepError",
    "StepNotEndedError",
    "TokenUsage",
    "__version__",
    "act",
    "agent",
    "checkpoint",
    "continue_run",
    "get_client",
    "init",
    "init_local",
    "inject",
    "observe",
    "report_usage",
    "resume",
    "run",
    "step",
    "synthesize",
    "think",
]
