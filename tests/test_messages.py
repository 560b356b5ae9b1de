"""Messages a user reads: budget refusals for every limit, and usage reported outside a run."""

from __future__ import annotations

import logging

import pytest

import multirun
from multirun import context as context_module
from multirun import run, step
from multirun.enforcement.ledger import RunLedger
from multirun.enforcement.redis_ledger import _refusal
from multirun.errors import BudgetExceededError
from multirun.models import Budget
from multirun.pricing import COST_UNITS_PER_USD

# ---------------------------------------------------------------------------
# BudgetExceededError: the limit, the amount used and the limit, in words


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refusal(ledger: RunLedger) -> str:
    with pytest.raises(BudgetExceededError) as info:
        ledger.begin_step()
    return str(info.value)


def test_max_steps_says_how_many_ran_and_which_step_was_refused() -> None:
    ledger = RunLedger(budget=Budget(max_steps=2))
    ledger.begin_step()
    ledger.begin_step()
    assert refusal(ledger) == "budget exceeded: max_steps (2 of 2 steps used; step 3 refused)"


def test_max_tokens_names_tokens() -> None:
    ledger = RunLedger(budget=Budget(max_tokens=1000))
    ledger.charge(1200, 0)
    assert refusal(ledger) == "budget exceeded: max_tokens (1200 of 1000 tokens used)"


def test_max_cost_usd_is_in_dollars() -> None:
    ledger = RunLedger(budget=Budget(max_cost_usd=0.01))
    ledger.charge(0, round(0.0125 * COST_UNITS_PER_USD))
    assert refusal(ledger) == "budget exceeded: max_cost_usd ($0.0125 of $0.01 spent)"


def test_max_duration_seconds_says_seconds_elapsed() -> None:
    clock = Clock()
    ledger = RunLedger(clock=clock, budget=Budget(max_duration_seconds=5))
    clock.now += 5.25
    assert refusal(ledger) == "budget exceeded: max_duration_seconds (5.25 of 5 seconds elapsed)"


def test_max_sub_agents_says_sub_agents_started() -> None:
    ledger = RunLedger(budget=Budget(max_sub_agents=2))
    for _ in range(3):
        ledger.count_sub_agent()
    assert refusal(ledger) == "budget exceeded: max_sub_agents (3 of 2 sub-agents started)"


@pytest.mark.parametrize(
    ("limit", "used", "maximum", "message"),
    [
        ("max_steps", 2, "2", "budget exceeded: max_steps (2 of 2 steps used; step 3 refused)"),
        ("max_tokens", 1200, "1000", "budget exceeded: max_tokens (1200 of 1000 tokens used)"),
        (
            "max_cost_usd",
            round(0.0125 * COST_UNITS_PER_USD),
            "0.01",
            "budget exceeded: max_cost_usd ($0.0125 of $0.01 spent)",
        ),
        (
            "max_duration_seconds",
            5_250_000,
            "5",
            "budget exceeded: max_duration_seconds (5.25 of 5 seconds elapsed)",
        ),
        ("max_sub_agents", 3, "2", "budget exceeded: max_sub_agents (3 of 2 sub-agents started)"),
    ],
)
def test_the_redis_ledger_words_its_refusals_the_same(
    limit: str, used: int, maximum: str, message: str
) -> None:
    # a Redis script reports integer units (nano-dollars, microseconds) and the limit as stored
    assert str(_refusal(limit, used, maximum, "run-1")) == message


def test_the_refusal_of_a_run_names_limit_used_and_maximum(traced) -> None:
    @step
    def work() -> None:
        return None

    @run(budget=Budget(max_steps=1))
    def main() -> None:
        work()
        work()

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert (info.value.limit, info.value.used, info.value.maximum) == ("max_steps", 1, 1)
    assert str(info.value) == "budget exceeded: max_steps (1 of 1 steps used; step 2 refused)"


# ---------------------------------------------------------------------------
# report_usage outside any run: charged nowhere, said once per process


@pytest.fixture
def not_warned_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_module, "_outside_run_warned", False)


def usage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    warnings = [r for r in caplog.records if r.name.startswith("multirun") and r.levelno == logging.WARNING]
    return [r.getMessage() for r in warnings if "outside any run" in r.getMessage()]


def test_usage_reported_outside_a_run_warns_once_per_process(not_warned_yet, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)
        multirun.report_usage("claude-3-5-haiku", input_tokens=1)

    assert usage_warnings(caplog) == [
        "multirun: report_usage('gpt-4o-mini') was called outside any run, so its usage is not charged "
        "anywhere; call it inside a @run (or a step of one). This warning is logged once per process."
    ]


def test_usage_reported_inside_a_run_does_not_warn(traced, not_warned_yet, caplog) -> None:
    @step
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)

    @run
    def main() -> None:
        ask()
        multirun.report_usage("gpt-4o-mini", input_tokens=1)  # the run's own, outside any step

    with caplog.at_level(logging.WARNING, logger="multirun"):
        main()
    assert usage_warnings(caplog) == []
