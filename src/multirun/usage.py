"""TokenUsage: one report of what an LLM call consumed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from multirun.errors import ConfigurationError


def is_cost(value: object) -> bool:
    """True for an amount of money that can be charged: a finite int or float >= 0, not a bool."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 <= value < math.inf  # NaN fails both comparisons
    )


# report_usage's names of the fields that TokenUsage names otherwise, for its error messages
_REPORT_USAGE_NAMES = {"cache_read_tokens": "cache_read_tokens (cached_input_tokens)"}


@dataclass(frozen=True)
class TokenUsage:
    """Tokens of one model call. ``input_tokens`` includes cached input, as in the GenAI conventions."""

    model: str | None = None
    provider: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None

    def __post_init__(self) -> None:
        for field in (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                shown = _REPORT_USAGE_NAMES.get(field, field)
                raise ConfigurationError(f"{shown} must be an int >= 0, got {value!r}")
        if self.cost_usd is not None and not is_cost(self.cost_usd):
            raise ConfigurationError(f"cost_usd must be a finite number >= 0, got {self.cost_usd!r}")
        cached = self.cache_read_tokens + self.cache_write_tokens
        if cached > self.input_tokens:
            # cannot be a part of the input: the input was given without it, as Anthropic's API
            # does. Counted in, so the tokens are all charged and the price lookup (which refuses
            # cached > input, leaving the call unpriced) works.
            object.__setattr__(self, "input_tokens", self.input_tokens + cached)
        for field in ("model", "provider"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{field} must be a string, got {value!r}")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
