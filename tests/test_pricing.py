"""The price book: genai-prices' prices, as they stand at the time of the call."""

from __future__ import annotations

from datetime import datetime, timezone

import genai_prices
import pytest

from multirun.pricing import PriceBook

PEAK = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
OFF_PEAK = datetime(2026, 3, 2, 20, 0, tzinfo=timezone.utc)


def published(model: str, at: datetime, **usage: int) -> float:
    price = genai_prices.calc_price(genai_prices.Usage(**usage), model, genai_request_timestamp=at)
    return float(price.total_price)


def test_a_price_that_depends_on_the_hour_is_the_one_at_the_time_of_each_call() -> None:
    # DeepSeek bills less in its off-peak hours (16:30-00:30 UTC): a process running past them
    # must not keep charging the price of its first call for the same token counts
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}
    assert published("deepseek-chat", PEAK, **usage) != published("deepseek-chat", OFF_PEAK, **usage)
    book = PriceBook()
    for at in (PEAK, OFF_PEAK, PEAK):
        cost = book.cost_usd("deepseek-chat", provider="deepseek", at=at, **usage)
        assert cost == pytest.approx(published("deepseek-chat", at, **usage))


def test_a_price_that_does_not_depend_on_the_time_is_the_same_at_any_time() -> None:
    book = PriceBook()
    usage = {"input_tokens": 1_000_000, "output_tokens": 1_000_000}
    assert book.cost_usd("gpt-4o-mini", provider="openai", at=PEAK, **usage) == pytest.approx(0.75)
    assert book.cost_usd("gpt-4o-mini", provider="openai", at=OFF_PEAK, **usage) == pytest.approx(0.75)
    assert book.cost_usd("gpt-4o-mini", provider="openai", **usage) == pytest.approx(0.75)
