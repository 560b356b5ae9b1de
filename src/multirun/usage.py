"""TokenUsage: one report of what an LLM call consumed."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from multirun.errors import ConfigurationError

_logger = logging.getLogger(__name__)


def is_cost(value: object) -> bool:
    """True for an amount of money that can be charged: a finite int or float >= 0, not a bool."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 <= value < math.inf  # NaN fails both comparisons
    )


# report_usage's names of the fields that TokenUsage names otherwise, for its error messages
_REPORT_USAGE_NAMES = {"cache_read_tokens": "cache_read_tokens (cached_input_tokens)"}


# The most tokens one report may count: spans carry counts as OTLP 64-bit integers, and the
# shared ledger (Redis) counts in them.
MAX_TOKENS = 2**63 - 1

# the token counts whose unusable value was logged, by source and field: once each, as a
# misbehaving server's (or instrumentation's) every call would say it again
_warned_counts: set[tuple[str, str]] = set()


def usable_count(value: object, source: str, field: str) -> int | float:
    """``value`` if it is a token count (a number from 0 to ``MAX_TOKENS``, not a bool); else 0,
    with a warning naming ``field`` of ``source`` ("a span", "a response of openai"), logged once
    per field: one bad count (negative, NaN, infinite, past a 64-bit integer) must not lose, or
    fail, the call's other counts."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value  # NaN fails both comparisons
    if (source, field) not in _warned_counts:
        _warned_counts.add((source, field))
        _logger.warning(
            "multirun: %s gave %s=%r, which is no token count: counted as 0 (its other counts are "
            "charged). Logged once per field.",
            source,
            field,
            value,
        )
    return 0


_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


@dataclass(frozen=True, init=False)
class TokenUsage:
    """Tokens of one model call. ``input_tokens`` includes cached input, as in the GenAI conventions.
    ``service_tier``: the tier the provider served it at (OpenAI's ``flex``, ``priority``...),
    which its price depends on."""

    model: str | None = None
    provider: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    service_tier: str | None = None

    def __init__(
        self,
        model: str | None = None,
        provider: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_usd: float | None = None,
        service_tier: str | None = None,
    ) -> None:
        # One is made per model call. Written by hand for speed: the common case (plain ints
        # >= 0, string names) is checked in one expression, and the fields are stored straight
        # into the instance dict, which the frozen dataclass's own __init__ does one by one.
        if not (
            type(input_tokens) is int
            and type(output_tokens) is int
            and type(cache_read_tokens) is int
            and type(cache_write_tokens) is int
            and type(reasoning_tokens) is int
            and 0
            <= input_tokens | output_tokens | cache_read_tokens | cache_write_tokens | reasoning_tokens
            <= MAX_TOKENS
        ):
            _check_counts(
                input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens
            )
        if cost_usd is not None and not is_cost(cost_usd):
            raise ConfigurationError(f"cost_usd must be a finite number >= 0, got {cost_usd!r}")
        if (
            (model is not None and type(model) is not str)
            or (provider is not None and type(provider) is not str)
            or (service_tier is not None and type(service_tier) is not str)
        ):
            _check_names(model, provider, service_tier)
        cached = cache_read_tokens + cache_write_tokens
        if cached > input_tokens:
            # cannot be a part of the input: the input was given without it, as Anthropic's API
            # does. Counted in, so the tokens are all charged and the price lookup (which refuses
            # cached > input, leaving the call unpriced) works.
            input_tokens += cached
        fields = self.__dict__
        fields["model"] = model
        fields["provider"] = provider
        fields["input_tokens"] = input_tokens
        fields["output_tokens"] = output_tokens
        fields["cache_read_tokens"] = cache_read_tokens
        fields["cache_write_tokens"] = cache_write_tokens
        fields["reasoning_tokens"] = reasoning_tokens
        fields["cost_usd"] = cost_usd
        fields["service_tier"] = service_tier

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _check_counts(*counts: object) -> None:
    """Raise for the first token count that is not an int >= 0 (a bool is not one)."""
    for field, value in zip(_COUNTS, counts, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            shown = _REPORT_USAGE_NAMES.get(field, field)
            raise ConfigurationError(f"{shown} must be an int from 0 to 2**63-1, got {value!r}")


def _check_names(model: object, provider: object, service_tier: object) -> None:
    """Raise if the model, the provider or the service tier is given and is not a string."""
    for field, value in (("model", model), ("provider", provider), ("service_tier", service_tier)):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"{field} must be a string, got {value!r}")
