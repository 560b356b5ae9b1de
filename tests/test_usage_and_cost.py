"""Token usage, cost, roll-ups and the budget check before each step.

Reference 000 (@step checks the budget before execution), 001 (Run, Agent and
Budget models), 002 (StepContext.complete) and DESIGN.md (gen_ai.usage.*,
gen_ai.usage.cost.*, multirun.tokens_used / multirun.cost_usd roll-ups, a
model with no known price is unpriced, never a silent $0).
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import genai_prices
import pytest
from opentelemetry.trace import StatusCode

import multirun
from multirun import agent, run, step
from multirun.context import (
    get_current_agent_context,
    get_current_run_context,
    get_current_step_context,
)
from multirun.errors import BudgetExceededError, StepError
from multirun.models import Agent, Budget, Run, StepKind

UNKNOWN_MODEL = "no-such-model-anywhere-7f3a"


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def published_price(model: str, **usage: int) -> float:
    return float(genai_prices.calc_price(genai_prices.Usage(**usage), model).total_price)


def reinit(traced: Any, **options: Any) -> multirun.MultiRunClient:
    client = multirun.init(tracer_provider=traced.provider, **options)
    client.clock = traced.clock
    return client


# ---------------------------------------------------------------------------
# report_usage on a step


def test_report_usage_sets_genai_usage_token_attributes(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> str:
        multirun.report_usage(
            "gpt-4o-mini",
            input_tokens=1200,
            output_tokens=300,
            cached_input_tokens=200,
            reasoning_tokens=50,
        )
        return "ok"

    @run
    def main() -> str:
        return ask()

    main()

    a = attrs(traced.span("chat gpt-4o-mini"))
    assert a["gen_ai.usage.input_tokens"] == 1200
    assert a["gen_ai.usage.output_tokens"] == 300
    assert a["gen_ai.usage.cache_read.input_tokens"] == 200
    assert a["gen_ai.usage.reasoning.output_tokens"] == 50


def test_report_usage_counts_input_plus_output_tokens_in_step_total(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(
            "gpt-4o-mini", input_tokens=1200, output_tokens=300, cached_input_tokens=200, reasoning_tokens=50
        )

    @run
    def main() -> None:
        ask()

    main()

    assert attrs(traced.span("chat gpt-4o-mini"))["multirun.tokens_used"] == 1500


def test_two_reports_in_one_step_are_summed(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=10)
        multirun.report_usage("gpt-4o-mini", input_tokens=200, output_tokens=20)

    @run
    def main() -> None:
        ask()

    main()

    a = attrs(traced.span("chat gpt-4o-mini"))
    assert a["gen_ai.usage.input_tokens"] == 300
    assert a["gen_ai.usage.output_tokens"] == 30
    assert a["multirun.tokens_used"] == 330


def test_cost_of_known_model_comes_from_genai_prices(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=500)

    @run
    def main() -> None:
        ask()

    main()

    expected = published_price("gpt-4o-mini", input_tokens=1000, output_tokens=500)
    assert expected > 0
    a = attrs(traced.span("chat gpt-4o-mini"))
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(expected, rel=1e-9)
    assert a["gen_ai.usage.cost.currency"] == "USD"
    assert a["gen_ai.usage.cost.source"] == "local"
    assert a["multirun.cost_usd"] == pytest.approx(expected, rel=1e-9)


def test_cost_of_cached_input_uses_genai_prices_cache_read_price(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(
            "gpt-4o-mini", input_tokens=10_000, output_tokens=1000, cached_input_tokens=4000
        )

    @run
    def main() -> None:
        ask()

    main()

    expected = published_price("gpt-4o-mini", input_tokens=10_000, output_tokens=1000, cache_read_tokens=4000)
    uncached = published_price("gpt-4o-mini", input_tokens=10_000, output_tokens=1000)
    assert expected < uncached
    assert attrs(traced.span("chat gpt-4o-mini"))["gen_ai.usage.cost.amount"] == pytest.approx(
        expected, rel=1e-9
    )


def test_cached_input_larger_than_input_is_read_as_anthropic_style_uncached_input(traced) -> None:
    # Anthropic's API (and instrumentations that copy it) gives input_tokens without the cached
    # ones: 50 uncached + 10,000 cached cannot be "10,000 cached out of 50"
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(
            "claude-3-5-haiku-latest",
            provider="anthropic",
            input_tokens=50,
            output_tokens=100,
            cached_input_tokens=10_000,
        )

    @run
    def main() -> None:
        ask()

    main()

    expected = published_price(
        "claude-3-5-haiku-latest", input_tokens=10_050, output_tokens=100, cache_read_tokens=10_000
    )
    a = attrs(traced.span("chat claude-3-5-haiku-latest"))
    assert "multirun.cost.unpriced" not in a
    assert a["gen_ai.usage.input_tokens"] == 10_050
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(expected, rel=1e-9)
    assert a["multirun.tokens_used"] == 10_150


def test_cost_reported_by_provider_is_used_as_is(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=10, cost_usd=0.125)

    @run
    def main() -> None:
        ask()

    main()

    a = attrs(traced.span("chat gpt-4o-mini"))
    assert a["gen_ai.usage.cost.amount"] == 0.125
    assert a["gen_ai.usage.cost.source"] == "provider"


def test_unknown_model_is_flagged_unpriced_without_cost_amount(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=100, output_tokens=50)

    @run
    def main() -> None:
        ask()

    main()

    a = attrs(traced.span(f"chat {UNKNOWN_MODEL}"))
    assert a["multirun.cost.unpriced"] is True
    assert "gen_ai.usage.cost.amount" not in a
    assert a["gen_ai.usage.input_tokens"] == 100
    assert a["multirun.tokens_used"] == 150


def test_unknown_model_marks_run_span_unpriced(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=100, output_tokens=50)

    @run
    def main() -> None:
        ask()

    main()

    a = attrs(traced.span("invoke_workflow main"))
    assert a["multirun.cost.unpriced"] is True
    assert a["multirun.tokens_used"] == 150


def test_priced_model_does_not_mark_run_unpriced(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    @run
    def main() -> None:
        ask()

    main()

    assert "multirun.cost.unpriced" not in attrs(traced.span("invoke_workflow main"))
    assert "multirun.cost.unpriced" not in attrs(traced.span("chat gpt-4o-mini"))


def test_user_price_override_prices_unknown_model(traced) -> None:
    reinit(traced, prices={"my-model": multirun.Price(input_per_mtok=1, output_per_mtok=2)})

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("my-model", input_tokens=1_000_000, output_tokens=500_000)

    @run
    def main() -> None:
        ask()

    main()

    a = attrs(traced.span("chat my-model"))
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(2.0)
    assert "multirun.cost.unpriced" not in a
    assert attrs(traced.span("invoke_workflow main"))["multirun.cost_usd"] == pytest.approx(2.0)


def test_user_price_override_takes_precedence_over_genai_prices(traced) -> None:
    reinit(traced, prices={"gpt-4o-mini": multirun.Price(input_per_mtok=10, output_per_mtok=0)})

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100_000, output_tokens=100_000)

    @run
    def main() -> None:
        ask()

    main()

    assert attrs(traced.span("chat gpt-4o-mini"))["gen_ai.usage.cost.amount"] == pytest.approx(1.0)


def test_a_price_override_applies_to_the_dated_name_a_response_reports(traced) -> None:
    # prices={"gpt-4o": ...}, and the API answers "gpt-4o-2024-08-06": the user's price, not
    # genai-prices'. An exact override wins over the undated one; another model is not matched
    reinit(
        traced,
        prices={
            "gpt-4o": multirun.Price(input_per_mtok=10, output_per_mtok=0),
            "gpt-4o-2024-05-13": multirun.Price(input_per_mtok=20, output_per_mtok=0),
            "claude-3-5-sonnet": multirun.Price(input_per_mtok=30, output_per_mtok=0),
        },
    )
    reported = [
        "gpt-4o-2024-08-06",
        "gpt-4o-2024-05-13",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-sonnet-latest",
        "gpt-4o-mini-2024-07-18",
    ]

    @step
    def ask(model: str) -> None:
        multirun.report_usage(model, input_tokens=100_000, output_tokens=0)

    @run
    def main() -> None:
        for model in reported:
            ask(model)

    main()
    costs = [
        attrs(s)["multirun.cost_usd"] for s in sorted(traced.named("step ask"), key=lambda s: s.start_time)
    ]
    published = published_price("gpt-4o-mini-2024-07-18", input_tokens=100_000)
    assert costs == pytest.approx([1.0, 2.0, 3.0, 3.0, published])
    assert published != pytest.approx(1.0)


def test_report_usage_outside_run_does_nothing(traced) -> None:
    multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=10)
    assert traced.spans() == []


# ---------------------------------------------------------------------------
# StepContext.complete inside a step


def test_step_context_complete_records_tokens_and_cost_on_step_span(traced) -> None:
    @step
    def work() -> str:
        multirun.context.get_current_step_context().complete("done", tokens_used=500, cost_usd=0.01)
        return "done"

    @run
    def main() -> str:
        return work()

    assert main() == "done"

    a = attrs(traced.span("step work"))
    assert a["multirun.tokens_used"] == 500
    assert a["multirun.cost_usd"] == pytest.approx(0.01)
    assert a["multirun.step.status"] == "completed"


@pytest.mark.parametrize("tokens_used", [-1, 2**64, True, 1.5])
def test_step_context_complete_refuses_a_bad_tokens_used_naming_it(traced, tokens_used) -> None:
    @step
    def work() -> None:
        multirun.context.get_current_step_context().complete("done", tokens_used=tokens_used)

    @run
    def main() -> None:
        work()

    with pytest.raises(multirun.errors.ConfigurationError, match=r"^tokens_used must be"):
        main()


async def test_awaited_step_context_complete_rolls_up_into_run(traced) -> None:
    runs: list[Run] = []

    @step
    async def work() -> str:
        await get_current_step_context().complete("done", tokens_used=250, cost_usd=0.02)
        return "done"

    @run
    async def main() -> str:
        runs.append(get_current_run_context().run)
        await work()
        return await work()

    assert await main() == "done"

    a = attrs(traced.span("invoke_workflow main"))
    assert a["multirun.tokens_used"] == 500
    assert a["multirun.cost_usd"] == pytest.approx(0.04)
    assert runs[0].tokens_used == 500
    assert runs[0].cost_usd == pytest.approx(0.04)


# ---------------------------------------------------------------------------
# roll-ups


def test_run_span_totals_equal_sum_over_llm_steps(traced) -> None:
    runs: list[Run] = []

    @step(kind=StepKind.LLM_CALL)
    def ask(i: int, o: int) -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=i, output_tokens=o)

    @step
    def plain() -> None:
        return None

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        ask(1000, 100)
        plain()
        ask(2000, 300)

    main()

    llm = traced.named("chat gpt-4o-mini")
    assert len(llm) == 2
    tokens = sum(attrs(s)["multirun.tokens_used"] for s in llm)
    cost = sum(attrs(s)["gen_ai.usage.cost.amount"] for s in llm)
    run_attrs = attrs(traced.span("invoke_workflow main"))
    assert tokens == 3400
    assert run_attrs["multirun.tokens_used"] == 3400
    assert run_attrs["multirun.cost_usd"] == pytest.approx(cost, rel=1e-9)
    expected = published_price("gpt-4o-mini", input_tokens=1000, output_tokens=100) + (
        published_price("gpt-4o-mini", input_tokens=2000, output_tokens=300)
    )
    assert run_attrs["multirun.cost_usd"] == pytest.approx(expected, rel=1e-9)


def test_run_model_totals_match_run_span(traced) -> None:
    runs: list[Run] = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=700, output_tokens=70)

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        ask()
        ask()

    main()

    run_attrs = attrs(traced.span("invoke_workflow main"))
    assert runs[0].tokens_used == 1540
    assert run_attrs["multirun.tokens_used"] == 1540
    assert runs[0].cost_usd == pytest.approx(run_attrs["multirun.cost_usd"], rel=1e-12)
    assert runs[0].cost_usd == pytest.approx(
        2 * published_price("gpt-4o-mini", input_tokens=700, output_tokens=70), rel=1e-9
    )


def test_agent_spans_sum_only_their_own_steps(traced) -> None:
    agents: dict[str, Agent] = {}

    @step(kind=StepKind.LLM_CALL)
    def ask(n: int) -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=n, cost_usd=n / 10_000)

    @agent(name="alpha")
    def alpha() -> None:
        agents["alpha"] = get_current_agent_context().agent
        ask(100)
        ask(200)

    @agent(name="beta")
    def beta() -> None:
        agents["beta"] = get_current_agent_context().agent
        ask(1000)

    @run
    def main() -> None:
        alpha()
        beta()

    main()

    a = attrs(traced.span("invoke_agent alpha"))
    b = attrs(traced.span("invoke_agent beta"))
    assert a["multirun.tokens_used"] == 300
    assert a["multirun.cost_usd"] == pytest.approx(0.03)
    assert b["multirun.tokens_used"] == 1000
    assert b["multirun.cost_usd"] == pytest.approx(0.1)
    assert agents["alpha"].tokens_used == 300
    assert agents["alpha"].cost_usd == pytest.approx(0.03)
    assert agents["beta"].tokens_used == 1000
    assert agents["beta"].cost_usd == pytest.approx(0.1)
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1300


def test_parent_step_rollup_includes_children_without_own_usage_attributes(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask(n: int) -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=n, cost_usd=n / 1000)

    @step
    def plan() -> None:
        ask(10)
        ask(20)

    @run
    def main() -> None:
        plan()

    main()

    a = attrs(traced.span("step plan"))
    assert a["multirun.tokens_used"] == 30
    assert a["multirun.cost_usd"] == pytest.approx(0.03)
    assert not any(k.startswith("gen_ai.usage.") for k in a)


def test_nested_usage_is_not_double_counted_in_run_total(traced) -> None:
    runs: list[Run] = []

    @step(kind=StepKind.LLM_CALL)
    def ask(n: int) -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=n, cost_usd=n / 1000)

    @step(kind=StepKind.LLM_CALL)
    def outer() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=5, cost_usd=0.005)
        ask(10)
        ask(20)

    @agent
    def worker() -> None:
        outer()

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        worker()

    main()

    outer_span = next(
        s for s in traced.named(f"chat {UNKNOWN_MODEL}") if attrs(s)["multirun.step.name"] == "outer"
    )
    assert attrs(outer_span)["multirun.tokens_used"] == 35
    assert attrs(outer_span)["gen_ai.usage.input_tokens"] == 5
    assert attrs(traced.span("invoke_agent worker"))["multirun.tokens_used"] == 35
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 35
    assert runs[0].tokens_used == 35
    assert runs[0].cost_usd == pytest.approx(0.035)


def test_usage_of_agent_called_inside_step_rolls_up_through_every_level(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=100, cost_usd=0.1)

    @agent(name="inner")
    def inner() -> None:
        ask()

    @step
    def delegate() -> None:
        inner()

    @agent(name="outer")
    def outer() -> None:
        delegate()

    @run
    def main() -> None:
        outer()

    main()

    for name in (
        f"chat {UNKNOWN_MODEL}",
        "invoke_agent inner",
        "step delegate",
        "invoke_agent outer",
        "invoke_workflow main",
    ):
        assert attrs(traced.span(name))["multirun.tokens_used"] == 100, name


def test_usage_reported_in_agent_outside_step_counts_for_agent_and_run(traced) -> None:
    @agent(name="talker")
    def talker() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=40, cost_usd=0.004)

    @run
    def main() -> None:
        talker()

    main()

    assert attrs(traced.span("invoke_agent talker"))["multirun.tokens_used"] == 40
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 40


def test_usage_reported_from_many_threads_sums_exactly(traced) -> None:
    runs: list[Run] = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=7, cost_usd=0.001)

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        with ThreadPoolExecutor(max_workers=8) as pool:
            for f in [pool.submit(ask) for _ in range(200)]:
                f.result()

    main()

    assert runs[0].tokens_used == 1400
    assert runs[0].cost_usd == pytest.approx(0.2)
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1400
    assert attrs(traced.span("invoke_workflow main"))["multirun.steps_used"] == 200


# ---------------------------------------------------------------------------
# budget check before a step


def test_max_steps_stops_third_step_before_its_body_runs(traced) -> None:
    bodies: list[int] = []

    @step
    def work(i: int) -> int:
        bodies.append(i)
        return i

    @run(budget=Budget(max_steps=2))
    def main() -> None:
        for i in range(3):
            work(i)

    with pytest.raises(BudgetExceededError):
        main()

    assert bodies == [0, 1]
    spans = sorted(traced.named("step work"), key=lambda s: s.start_time or 0)
    assert [s.attributes["multirun.step.status"] for s in spans] == ["completed", "completed", "failed"]
    refused = spans[2].attributes
    assert refused["multirun.policy.decision"] == "abort"
    assert refused["multirun.policy.rule"] == "budget"
    assert refused["multirun.budget.exceeded_limit"] == "max_steps"
    assert refused["error.type"] == "multirun.errors.BudgetExceededError"


def test_max_steps_error_names_limit_used_and_maximum(traced) -> None:
    @step
    def work() -> None:
        return None

    @run(budget=Budget(max_steps=2))
    def main() -> None:
        for _ in range(3):
            work()

    with pytest.raises(BudgetExceededError) as info:
        main()

    error = info.value
    assert error.limit == "max_steps"
    assert error.maximum == 2
    assert error.used == 2  # two steps ran; the third never did
    assert "max_steps" in str(error)
    assert str(error) == "budget exceeded: max_steps (2 of 2 steps used; step 3 refused)"


def test_budget_exceeded_fails_the_run(traced) -> None:
    runs: list[Run] = []

    @step
    def work() -> None:
        return None

    @run(budget=Budget(max_steps=2))
    def main() -> None:
        runs.append(get_current_run_context().run)
        for _ in range(3):
            work()

    with pytest.raises(BudgetExceededError):
        main()

    span = traced.span("invoke_workflow main")
    assert runs[0].status.value == "failed"
    assert attrs(span)["multirun.run.status"] == "failed"
    assert attrs(span)["multirun.budget.exceeded_limit"] == "max_steps"
    assert attrs(span)["error.type"] == "multirun.errors.BudgetExceededError"
    assert span.status.status_code is StatusCode.ERROR


def test_max_tokens_stops_next_step_after_report_usage_crosses_it(traced) -> None:
    bodies: list[str] = []

    @step(kind=StepKind.LLM_CALL)
    def ask(tag: str) -> None:
        bodies.append(tag)
        multirun.report_usage("gpt-4o-mini", input_tokens=80, output_tokens=40)

    @run(budget=Budget(max_tokens=100))
    def main() -> None:
        ask("first")
        ask("second")

    with pytest.raises(BudgetExceededError) as info:
        main()

    assert bodies == ["first"]
    assert info.value.limit == "max_tokens"
    assert info.value.used == 120
    assert info.value.maximum == 100
    assert "max_tokens" in str(info.value)
    assert "120" in str(info.value)
    assert "100" in str(info.value)


def test_max_tokens_not_reached_lets_steps_run(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=30, output_tokens=10)

    @run(budget=Budget(max_tokens=100))
    def main() -> str:
        ask()
        ask()
        return "fine"

    assert main() == "fine"
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 80


def test_max_cost_stops_next_step_after_cost_crosses_it(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=1, cost_usd=0.6)

    @run(budget=Budget(max_cost_usd=1.0))
    def main() -> None:
        ask()
        ask()
        ask()

    with pytest.raises(BudgetExceededError) as info:
        main()

    assert info.value.limit == "max_cost_usd"
    assert len(traced.named(f"chat {UNKNOWN_MODEL}")) == 2


# limit * 10**9 is not an integer in floating point for 0.067 and 0.534 (67000000.00000001); the
# last is a sum of prices with float noise, its units a hair above the integer its cost rounds to
COST_LIMITS = [0.067, 0.534, 1.1, 3.4575920550000916]


@pytest.mark.parametrize("limit", COST_LIMITS)
def test_spending_exactly_the_cost_limit_stops_the_next_step(traced, limit: float) -> None:
    calls = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        calls.append(1)
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=1, cost_usd=limit)

    @run(budget=Budget(max_cost_usd=limit))
    def main() -> None:
        ask()
        status = multirun.context.get_current_run_context().budget_status()
        assert (status.is_exceeded, status.percentage_used, status.cost_remaining_usd) == (True, 100, 0)
        ask()

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert info.value.limit == "max_cost_usd"
    assert len(calls) == 1


def test_max_duration_stops_next_step_once_clock_passes_it(traced) -> None:
    bodies: list[str] = []

    @step
    def slow() -> str:
        traced.clock.now += 6  # the step takes six seconds of the run's five
        return "ok"

    @step
    def after() -> None:
        bodies.append("after")

    @run(budget=Budget(max_duration_seconds=5))
    def main() -> None:
        slow()
        after()

    with pytest.raises(BudgetExceededError) as info:
        main()

    assert bodies == []
    assert info.value.limit == "max_duration_seconds"
    assert info.value.maximum == 5


@pytest.mark.parametrize("limit", [0.3, 5.0])
def test_a_step_taking_exactly_the_duration_limit_stops_the_next_step(traced, limit: float) -> None:
    # started + 0.3 is 1000.3 on the fake clock, but 1000.3 - started is 0.2999999999999545
    bodies: list[str] = []
    statuses = []

    @step
    def slow() -> None:
        traced.clock.now += limit

    @step
    def after() -> None:
        bodies.append("after")

    @run(budget=Budget(max_duration_seconds=limit))
    def main() -> None:
        slow()
        statuses.append(get_current_run_context().budget_status())
        after()

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert (info.value.limit, info.value.used, info.value.maximum) == ("max_duration_seconds", limit, limit)
    assert bodies == []
    assert (statuses[0].is_exceeded, statuses[0].percentage_used) == (True, 100)


def test_retry_backoff_never_sleeps_past_the_run_deadline(traced) -> None:
    calls = {"n": 0}

    @step(retry=3, retry_delay=1.0)
    def flaky() -> str:
        calls["n"] += 1
        raise ConnectionError("again")

    @run(budget=Budget(max_duration_seconds=5))
    def main() -> None:
        flaky()

    with pytest.raises(StepError):
        main()

    # after sleeping 1 s and 2 s, the next 4 s backoff would end past the 5 s deadline
    assert traced.clock.sleeps == [1.0, 2.0]
    assert calls["n"] == 3


def test_sub_run_steps_count_against_parent_max_steps(traced) -> None:
    bodies: list[int] = []

    @step
    def work(i: int) -> None:
        bodies.append(i)

    @run(name="child")
    def child() -> None:
        for i in range(5):
            work(i)

    @run(name="parent", budget=Budget(max_steps=3))
    def parent() -> None:
        child()

    with pytest.raises(BudgetExceededError) as info:
        parent()
    assert bodies == [0, 1, 2]
    assert info.value.limit == "max_steps"


def test_step_with_check_budget_false_runs_past_the_limit(traced) -> None:
    bodies: list[int] = []

    @step(check_budget=False)
    def work(i: int) -> None:
        bodies.append(i)

    @run(budget=Budget(max_steps=1))
    def main() -> None:
        for i in range(3):
            work(i)

    main()
    assert bodies == [0, 1, 2]


def test_max_sub_agents_zero_allows_none_and_its_status_says_so(traced) -> None:
    bodies: list[str] = []
    statuses = []

    @step
    def work() -> None:
        bodies.append("work")

    @agent(name="helper")
    def helper() -> None:
        work()

    @run(budget=Budget(max_sub_agents=0))
    def main() -> None:
        statuses.append(get_current_run_context().budget_status())
        with pytest.raises(BudgetExceededError) as info:
            helper()
        assert info.value.limit == "max_sub_agents"
        statuses.append(get_current_run_context().budget_status())

    main()
    assert bodies == []
    before, after = statuses
    assert (before.is_exceeded, before.percentage_used) == (False, 0)
    assert (after.is_exceeded, after.percentage_used) == (True, 100)


def test_budget_exceeded_error_is_not_retried(traced) -> None:
    bodies: list[int] = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=500, cost_usd=0.0)

    @step(retry=3)
    def guarded() -> None:
        bodies.append(1)

    @run(budget=Budget(max_tokens=100))
    def main() -> None:
        ask()
        guarded()

    with pytest.raises(BudgetExceededError):
        main()
    assert bodies == []
    assert traced.clock.sleeps == []


def test_parent_run_budget_holds_across_sub_run(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=150, cost_usd=0.0)

    @run(name="child")
    def child() -> None:
        ask()
        ask()

    @run(name="parent", budget=Budget(max_tokens=100))
    def parent() -> None:
        child()

    with pytest.raises(BudgetExceededError) as info:
        parent()
    assert info.value.limit == "max_tokens"
    assert len(traced.named(f"chat {UNKNOWN_MODEL}")) == 1


def test_concurrent_threads_total_steps_hold_max_steps(traced) -> None:
    ran: list[int] = []
    lock = threading.Lock()

    @step
    def work(i: int) -> None:
        with lock:
            ran.append(i)

    @run(budget=Budget(max_steps=10))
    def main() -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(work, i) for i in range(40)]
        errors = [f.exception() for f in futures]
        assert sum(isinstance(e, BudgetExceededError) for e in errors) == 30

    main()
    assert len(ran) == 10


@pytest.mark.parametrize("limit", [1e300, sys.float_info.max])
def test_a_huge_cost_limit_is_a_limit_never_reached(traced, limit: float) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=1, cost_usd=1000.0)

    @run(budget=Budget(max_cost_usd=limit))
    def main() -> float:
        ask()
        ask()
        return multirun.context.get_current_run_context().budget_status().percentage_used

    assert main() == 0.0


def test_a_huge_reported_cost_is_charged_and_stops_the_run(traced) -> None:
    # its nano-dollars overflow a float: a whole number of dollars, charged as such
    calls = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        calls.append(1)
        multirun.report_usage(UNKNOWN_MODEL, input_tokens=1, cost_usd=1e300)

    @run(budget=Budget(max_cost_usd=1.0))
    def main() -> None:
        ask()
        ask()

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert (info.value.limit, info.value.used, info.value.maximum) == ("max_cost_usd", 1e300, 1.0)
    assert str(info.value) == "budget exceeded: max_cost_usd ($1e+300 of $1 spent)"
    assert len(calls) == 1


def test_budget_status_is_one_moment_even_when_a_charge_lands_while_it_is_taken() -> None:
    from multirun.enforcement.ledger import RunLedger

    ledgers: list[RunLedger] = []

    def clock_of_a_busy_run() -> float:
        # another thread's step charges its tokens while status() reads the clock
        if ledgers and ledgers[0].tokens == 50:
            ledgers[0].charge(60, 0)
        return 1000.0

    ledger = RunLedger(clock=clock_of_a_busy_run, budget=Budget(max_tokens=100))
    ledgers.append(ledger)
    ledger.charge(50, 0)
    status = ledger.status(ledger.budget)
    if status.tokens_used == 50:
        assert (status.percentage_used, status.is_exceeded) == (50.0, False)
    else:
        assert (status.tokens_used, status.percentage_used, status.is_exceeded) == (110, 110.0, True)
