"""The cost of a usage report, from the genai-prices package or the user's own prices.

genai-prices knows the published prices of most providers' models. Looking a
model up there takes about 100 microseconds, so each (provider, model, usage)
is computed once and remembered, unless the model's price depends on the time
(DeepSeek's off-peak hours, a price change on a date): that one is the price at
the time of the call. A model it does not know is *unpriced* (``None``), never
a silent $0.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from multirun.errors import ConfigurationError
from multirun.usage import is_cost

_logger = logging.getLogger(__name__)

#: Costs are kept as integers of this many units per US dollar, so that sums are exact.
COST_UNITS_PER_USD = 1_000_000_000


def cost_units_of(cost_usd: float) -> int:
    """A cost in integer units, to the nearest one. A cost so large that its units overflow a
    float (over ~1.8e299 dollars) is a whole number of dollars already, converted exactly."""
    units = cost_usd * COST_UNITS_PER_USD
    if units == math.inf:
        return int(cost_usd) * COST_UNITS_PER_USD
    return round(units)


@lru_cache(maxsize=256)  # round(x, 3) takes ~0.5 us; shares() asks before each step under a policy
def cost_limit_units(max_cost_usd: float) -> int:
    """A cost limit in integer units: ``cost_units >= cost_limit_units(x)`` exactly when the
    spend is at least ``x`` dollars.

    ``x * COST_UNITS_PER_USD`` carries float noise (``0.067`` gives ``67000000.00000001``), which
    would let a run that spent exactly its limit go on; it is rounded off before the ceiling.
    A limit below one unit is one unit: nothing spent is under any limit ``x > 0``. A limit so
    large that its units overflow a float (over ~1.8e299 dollars) is a whole number of dollars
    already, converted exactly.
    """
    units = max_cost_usd * COST_UNITS_PER_USD
    if math.isinf(units):
        return int(max_cost_usd) * COST_UNITS_PER_USD
    return max(math.ceil(round(units, 3)), 1)


@dataclass(frozen=True)
class Price:
    """A user's price for a model, in US dollars per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None

    def __post_init__(self) -> None:
        for field in ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok"):
            value = getattr(self, field)
            if value is not None and not is_cost(value):
                raise ConfigurationError(f"Price.{field} must be a finite number >= 0, got {value!r}")

    def cost(self, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int) -> float:
        uncached = max(input_tokens - cache_read - cache_write, 0)
        read_price = self.input_per_mtok if self.cache_read_per_mtok is None else self.cache_read_per_mtok
        write_price = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        total = (
            uncached * self.input_per_mtok
            + cache_read * read_price
            + cache_write * write_price
            + output_tokens * self.output_per_mtok
        )
        return total / 1_000_000


class PriceBook:
    """Prices models: the user's overrides first, then genai-prices."""

    def __init__(self, overrides: Mapping[str, Price | Mapping[str, float]] | None = None) -> None:
        self._overrides: dict[str, Price] = {}
        self._lock = threading.Lock()
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigurationError(
                f"prices must be a mapping of model name to multirun.Price, got {overrides!r}"
            )
        for model, price in (overrides or {}).items():
            self.set_price(model, price)

    def set_price(self, model: str, price: Price | Mapping[str, float]) -> None:
        """Use ``price`` for ``model``, ahead of genai-prices: for that exact name, and for that
        name followed by a date or version suffix (``gpt-4o-2024-08-06`` for ``gpt-4o``) unless
        that full name has an override of its own."""
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"prices: a model name must be a non-empty string, got {model!r}")
        if isinstance(price, Mapping):
            try:
                price = Price(**price)
            except TypeError as exc:
                raise ConfigurationError(
                    f"prices[{model!r}]: {exc}; expected input_per_mtok, output_per_mtok, "
                    "cache_read_per_mtok, cache_write_per_mtok"
                ) from None
        if not isinstance(price, Price):
            raise ConfigurationError(f"prices[{model!r}] must be a Price or a dict, got {price!r}")
        with self._lock:
            self._overrides[model] = price

    def cost_usd(
        self,
        model: str | None,
        *,
        provider: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        at: datetime | None = None,
        service_tier: str | None = None,
    ) -> float | None:
        """The cost in USD, or None when the model has no known price. ``at``: the time of the
        call (default now), for the prices that depend on it (DeepSeek's off-peak hours);
        ``service_tier``: the tier the call was served at (OpenAI's ``flex``, ``priority``),
        for the prices that depend on it (a price of one's own does not)."""
        if not model:
            return None
        overrides = self._overrides
        if overrides:
            override = overrides.get(model)
            if override is None:  # "gpt-4o-2024-08-06" reported, "gpt-4o" given
                base = _without_version(model)
                override = overrides.get(base) if base is not None else None
            if override is not None:
                return override.cost(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        return _published_cost(
            model,
            provider,
            input_tokens,
            output_tokens,
            cache_read_tokens,
            cache_write_tokens,
            at,
            service_tier,
        )


# a date or version suffix that a provider appends to a model's name in its responses:
# -2024-08-06, -20241022, -0613, -002, -latest, -v1, -v2:0 (Bedrock), @20241022 (Vertex)
_VERSION_SUFFIX = re.compile(r"[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4}|latest|v\d+(?::\d+)?)$")


@lru_cache(maxsize=1024)
def _without_version(model: str) -> str | None:
    """``model`` without its date or version suffix; None if it has none."""
    match = _VERSION_SUFFIX.search(model)
    return model[: match.start()] if match is not None and match.start() > 0 else None


# genai-prices names providers by id; map the GenAI semantic convention names that differ.
_PROVIDER_IDS = {
    "azure.ai.openai": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "aws.bedrock": "aws",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
}


# genai-prices' ids that the GenAI conventions name otherwise, the other way round
_PROVIDER_NAMES = {
    "azure": "azure.ai.openai",
    "google": "gcp.gen_ai",
    "aws": "aws.bedrock",
    "mistral": "mistral_ai",
    "x-ai": "x_ai",
}


@lru_cache(maxsize=256)
def provider_at(url: str) -> str | None:
    """The provider (its GenAI conventions name) whose API is at ``url`` (``https://api.groq.com``),
    as genai-prices knows their URLs; None for a URL it does not know.

    An OpenAI-compatible server reached through the OpenAI SDK is named "openai" by its
    instrumentation, and only its URL tells which provider bills the call."""
    from genai_prices import data_snapshot

    try:
        provider = data_snapshot.get_snapshot().find_provider(None, None, url)
    except LookupError:
        return None
    except Exception:  # a price table problem must not break the agent
        _logger.warning("genai-prices could not look up the provider at %r", url, exc_info=True)
        return None
    return _PROVIDER_NAMES.get(provider.id, provider.id)


def _published_cost(
    model: str,
    provider: str | None,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    at: datetime | None = None,
    service_tier: str | None = None,
) -> float | None:
    """genai-prices' cost of the usage, at time ``at`` (default now) and ``service_tier``; None
    if it has no price."""
    found = _published_model(model, provider)
    if found is None:
        return None
    tokens = (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
    if found[2]:  # DeepSeek's off-peak hours, a price that changes on a date: never cached
        return _calc(found, *tokens, at, service_tier)
    return _cached_cost(model, provider, *tokens, service_tier)


# (genai-prices' provider, its model, whether the model's price depends on the time)
_Found = tuple[Any, Any, bool]


@lru_cache(maxsize=1024)
def _published_model(model: str, provider: str | None) -> _Found | None:
    """genai-prices' entry of ``model`` at ``provider``, or by the model name alone if that
    provider is not one it knows, or does not list it; None if it has no price."""
    from genai_prices import data_snapshot  # imported on first use: it loads a large price table

    snapshot = data_snapshot.get_snapshot()
    provider_id = _PROVIDER_IDS.get(provider, provider) if provider else None
    try:
        try:
            found = snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            if provider_id is None:
                return None
            try:  # the provider name may be one genai-prices does not use; try by model alone
                found = snapshot.find_provider_model(model, None, None, None)
            except LookupError:
                return None
    except Exception:  # a price table problem must not break the agent
        _logger.warning("genai-prices could not price model %r", model, exc_info=True)
        return None
    prices = found[1].prices
    timed = isinstance(prices, list) and any(price.constraint is not None for price in prices)
    return found[0], found[1], timed


@lru_cache(maxsize=8192)  # a lookup takes about 100 microseconds
def _cached_cost(
    model: str,
    provider: str | None,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    service_tier: str | None,
) -> float | None:
    found = _published_model(model, provider)
    assert found is not None  # only asked for a model found
    return _calc(
        found, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, None, service_tier
    )


def _calc(
    found: _Found,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    at: datetime | None,
    service_tier: str | None = None,
) -> float | None:
    import genai_prices

    usage = genai_prices.Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens or None,
        cache_write_tokens=cache_write_tokens or None,
    )
    provider, model_info, _ = found
    try:
        when = at or datetime.now(timezone.utc)
        if service_tier is not None and _prices_tiers():
            context = {"service_tier": service_tier}
            result = model_info.calc_price(
                usage, provider, genai_request_timestamp=when, price_context=context
            )
        else:
            result = model_info.calc_price(usage, provider, genai_request_timestamp=when)
    except Exception:  # a price table problem must not break the agent
        _logger.warning("genai-prices could not price model %r", model_info.id, exc_info=True)
        return None
    return float(result.total_price)


@lru_cache(maxsize=1)
def _prices_tiers() -> bool:
    """Whether the installed genai-prices prices a service tier (``price_context``, 0.2 on);
    an older one prices every tier at the standard price."""
    from genai_prices.types import ModelInfo

    return "price_context" in inspect.signature(ModelInfo.calc_price).parameters
