"""Policy: the rules that decide, before each step, to proceed, wait, fall back or abort."""

from __future__ import annotations

import builtins
import sys
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from multirun.models._base import MAX_COUNT_LIMIT, Amount, Count, Settings


class PolicyDecision(str, Enum):
    PROCEED = "proceed"
    WAIT = "wait"
    FALLBACK = "fallback"
    ABORT = "abort"


class BackoffStrategy(str, Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


class DegradationTrigger(str, Enum):
    """What makes a GracefulDegradationRule switch to its fallback model."""

    BUDGET_PERCENTAGE = "budget_percentage"  # share of the tightest budget limit used, 0-100
    COST_PERCENTAGE = "cost_percentage"  # share of max_cost_usd used, 0-100
    TOKEN_PERCENTAGE = "token_percentage"  # share of max_tokens used, 0-100
    CONSECUTIVE_FAILURES = "consecutive_failures"  # failed LLM steps in a row


class BudgetRule(Settings):
    max_tokens: Count | None = Field(default=None, gt=0, le=MAX_COUNT_LIMIT)
    max_cost_usd: Amount | None = Field(default=None, gt=0, allow_inf_nan=False)


# The longest wait a rule or a step may ask for: a clock cannot wait much longer (time.sleep
# refuses ~290 years). Also the longest a rate limit may space two requests: a positive value as
# tiny as 1e-320 would space them inf seconds apart.
MAX_WAIT_SECONDS = 1e9  # about 31 years
MAX_REQUEST_INTERVAL_SECONDS = MAX_WAIT_SECONDS


class RateLimitRule(Settings):
    requests_per_minute: Amount = Field(gt=0)
    model: str | None = Field(default=None, min_length=1)  # "" would match no step: refused

    @field_validator("requests_per_minute")
    @classmethod
    def _spaces_requests_a_clock_can_wait(cls, value: float) -> float:
        least = 60.0 / MAX_REQUEST_INTERVAL_SECONDS
        if value < least:
            raise ValueError(f"must be at least {least:g}, one request every 31 years")
        return value


DEFAULT_BASE_DELAY_SECONDS = 1.0


class RetryRule(Settings):
    max_attempts: Count = Field(default=3, ge=1)
    backoff: BackoffStrategy = BackoffStrategy.EXPONENTIAL
    # finite: an infinite wait is no retry at all
    base_delay_seconds: Amount = Field(
        default=DEFAULT_BASE_DELAY_SECONDS, ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False
    )
    max_delay_seconds: Amount = Field(default=60.0, ge=0, le=MAX_WAIT_SECONDS, allow_inf_nan=False)

    @model_validator(mode="after")
    def _base_delay_within_its_cap(self) -> RetryRule:
        """A base delay given (or assigned) above its cap is refused when the rule retries: the
        cap would win, silently. A cap below the default base delay lowers it."""
        base, cap = self.base_delay_seconds, self.max_delay_seconds
        if "base_delay_seconds" not in self.model_fields_set:
            # the default, as the cap lowers it: what every delay is, and what model_dump then
            # writes, so that the rule dumped is read back (a base of 1 s over a cap of 0.5 s,
            # given, would be refused); the cap raised again gives the default back
            self.__dict__["base_delay_seconds"] = min(DEFAULT_BASE_DELAY_SECONDS, cap)
        elif base > cap and self.max_attempts > 1:  # a rule that never retries never waits
            raise ValueError(
                f"base_delay_seconds must be at most max_delay_seconds, which caps every delay: "
                f"got {self.base_delay_seconds:g} with max_delay_seconds={self.max_delay_seconds:g}"
            )
        return self


def _exception_classes(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_exception_class(item) for item in value)
    return value


def _exception_class(value: Any) -> Any:
    """An exception class, from itself or from its import path as JSON gives it
    (``"builtins.TimeoutError"``, or a builtin's bare name). The module must be imported
    already: reading a policy never imports code."""
    if not isinstance(value, str):
        return value
    parts = value.split(".")
    found: Any = getattr(builtins, value, None) if len(parts) == 1 else None
    for split in range(len(parts) - 1, 0, -1):  # the longest module name that is imported
        module = sys.modules.get(".".join(parts[:split]))
        if module is not None:
            found = module
            for name in parts[split:]:
                found = getattr(found, name, None)
            break
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ValueError(f"{value!r} names no exception class of an imported module")
    return found


def _import_paths(classes: tuple[type[BaseException], ...]) -> list[str]:
    return [f"{error.__module__}.{error.__qualname__}" for error in classes]


# Exception classes; in JSON, their import paths (both schemas say so: they are read back too)
ExceptionClasses = Annotated[
    tuple[type[BaseException], ...],
    BeforeValidator(_exception_classes),
    PlainSerializer(_import_paths, return_type=list[str], when_used="json"),
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]


class CircuitBreakerRule(Settings):
    """Open the circuit of a step after ``failure_threshold`` failures in a row.

    ``excluded_errors`` are exception classes that do not count as failures
    (budget and policy aborts never count).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    failure_threshold: Count = Field(default=5, ge=1)
    recovery_time_seconds: Amount = Field(default=60.0, ge=0)
    excluded_errors: ExceptionClasses = ()


class GracefulDegradationRule(Settings):
    fallback_model: str = Field(min_length=1)
    trigger: DegradationTrigger = DegradationTrigger.BUDGET_PERCENTAGE
    threshold: Amount = Field(default=80.0, ge=0)

    @model_validator(mode="after")
    def _percentage_in_range(self) -> GracefulDegradationRule:
        # a percentage over 100 could never trigger: the budget refuses steps at 100
        if self.trigger is not DegradationTrigger.CONSECUTIVE_FAILURES and self.threshold > 100:
            raise ValueError(
                f"threshold is a percentage for trigger {self.trigger.value!r}: "
                f"0 to 100, got {self.threshold:g}"
            )
        return self


class Policy(Settings):
    """A collection of rules; every field is optional."""

    budget: BudgetRule | None = None
    rate_limit: RateLimitRule | None = None
    retry: RetryRule | None = None
    circuit_breaker: CircuitBreakerRule | None = None
    graceful_degradation: GracefulDegradationRule | None = None
