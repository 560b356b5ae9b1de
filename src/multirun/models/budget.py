"""Budget: the resource limits of a run, and BudgetStatus, a snapshot of what is spent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from multirun.errors import spent_text
from multirun.models._base import MAX_COUNT_LIMIT, Amount, Count, Model, Settings, utcnow
from multirun.pricing import COST_UNITS_PER_USD, cost_limit_units, cost_units_of

if TYPE_CHECKING:
    from multirun.models.run import Run


class Budget(Settings):
    """Limits of a run. Only the limits that are set are enforced; ``max_sub_agents=0`` is set
    (no sub-agent may start)."""

    max_tokens: Count | None = Field(default=None, gt=0, le=MAX_COUNT_LIMIT)
    max_cost_usd: Amount | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_steps: Count | None = Field(default=None, gt=0, le=MAX_COUNT_LIMIT)
    max_duration_seconds: Amount | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_sub_agents: Count | None = Field(default=None, ge=0, le=MAX_COUNT_LIMIT)

    def is_exceeded(self, run: Run) -> bool:
        """True if ``run`` has reached any limit that is set."""
        return self.get_exceeded_reason(run) is not None

    def get_exceeded_reason(self, run: Run) -> str | None:
        """A sentence naming the first limit ``run`` reached, or None."""
        duration = None
        if run.started_at is not None:
            end = run.completed_at or utcnow()
            duration = (end - run.started_at).total_seconds()
        found = first_exceeded(
            self,
            tokens=run.tokens_used,
            cost_units=cost_units_of(run.cost_usd),
            steps=len(run.steps),
            duration_seconds=duration,
            sub_agents=None,
        )
        if found is None:
            return None
        limit, used, maximum = found
        return f"{limit} ({spent_text(limit, used, maximum)})"

    def limits(self) -> dict[str, float]:
        """The limits that are set, by field name."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def first_exceeded(
    budget: Budget,
    *,
    tokens: int,
    cost_units: int,
    steps: int,
    duration_seconds: float | None,
    sub_agents: int | None,
) -> tuple[str, float, float] | None:
    """The first limit reached as ``(field name, used, limit)``, or None.

    A limit counts as reached when usage is at or over it for tokens, cost and
    duration (nothing more can be spent), and over it for steps and sub-agents
    (the count includes the one about to start). Cost is compared in integer units, as the
    ledgers compare it before each step, so float noise in the limit cannot make them disagree.
    """
    if budget.max_tokens is not None and tokens >= budget.max_tokens:
        return "max_tokens", tokens, budget.max_tokens
    if budget.max_cost_usd is not None and cost_units >= cost_limit_units(budget.max_cost_usd):
        return "max_cost_usd", cost_units / COST_UNITS_PER_USD, budget.max_cost_usd
    if budget.max_steps is not None and steps > budget.max_steps:
        return "max_steps", steps, budget.max_steps
    if (
        budget.max_duration_seconds is not None
        and duration_seconds is not None
        and duration_seconds >= budget.max_duration_seconds
    ):
        return "max_duration_seconds", duration_seconds, budget.max_duration_seconds
    if budget.max_sub_agents is not None and sub_agents is not None and sub_agents > budget.max_sub_agents:
        return "max_sub_agents", sub_agents, budget.max_sub_agents
    return None


class BudgetStatus(Model):
    """What a run has spent against its budget, at one moment."""

    tokens_used: int = 0
    tokens_remaining: int | None = None
    cost_used_usd: float = 0.0
    cost_remaining_usd: float | None = None
    steps_used: int = 0
    steps_remaining: int | None = None
    duration_seconds: float = 0.0
    sub_agents_used: int = 0
    percentage_used: float = 0.0
    is_exceeded: bool = False

    @property
    def used(self) -> dict[str, float]:
        return {
            "tokens": self.tokens_used,
            "cost_usd": self.cost_used_usd,
            "steps": self.steps_used,
            "duration_seconds": self.duration_seconds,
            "sub_agents": self.sub_agents_used,
        }

    @property
    def remaining(self) -> dict[str, float | None]:
        return {
            "tokens": self.tokens_remaining,
            "cost_usd": self.cost_remaining_usd,
            "steps": self.steps_remaining,
        }
