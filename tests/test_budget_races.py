"""Budgets under concurrency: exact totals, and overshoot bounded by the steps in flight."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import multirun
from multirun import agent, run, step
from multirun.context import get_current_run_context
from multirun.errors import BudgetExceededError
from multirun.models import Budget

THREADS = 8
ATTEMPTS_PER_WORKER = 200


def race_threads(body, *, barrier_parties: int = THREADS) -> list[int]:
    """Run ``body`` in THREADS threads started together; each returns how many steps it completed."""
    barrier = threading.Barrier(barrier_parties)

    def worker() -> int:
        barrier.wait()
        return body()

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(lambda _: worker(), range(THREADS)))


def spend_until_refused(fn) -> int:
    done = 0
    for _ in range(ATTEMPTS_PER_WORKER):
        try:
            fn()
        except BudgetExceededError:
            break
        done += 1
    return done


@pytest.mark.parametrize(
    ("budget", "tokens_per_step", "cost_per_step", "limit_steps"),
    [
        (Budget(max_steps=500), 0, 0.0, 500),
        (Budget(max_tokens=10_000), 7, 0.0, None),
        (Budget(max_cost_usd=0.05), 0, 0.0001, None),
    ],
    ids=["max_steps", "max_tokens", "max_cost_usd"],
)
def test_threads_racing_a_limit_leave_exact_totals_and_bounded_overshoot(
    traced, budget, tokens_per_step, cost_per_step, limit_steps
) -> None:
    @step
    def spend() -> None:
        if tokens_per_step or cost_per_step:
            multirun.report_usage("m", output_tokens=tokens_per_step, cost_usd=cost_per_step)

    @run(budget=budget)
    def main() -> tuple[list[int], int, int, float]:
        done = race_threads(lambda: spend_until_refused(spend))
        ctx = get_current_run_context()
        return done, ctx.ledger.steps, ctx.tokens_used, ctx.cost_usd

    done, steps, tokens, cost = main()
    total = sum(done)
    assert steps == total  # every started step counted once, refused ones not at all
    assert tokens == total * tokens_per_step
    assert cost == pytest.approx(total * cost_per_step, abs=1e-12)
    if limit_steps is not None:
        assert total == limit_steps  # the step count is checked and taken under one lock: exact
    elif tokens_per_step:
        crossed_at = -(-budget.max_tokens // tokens_per_step)  # ceil
        assert crossed_at <= total <= crossed_at + THREADS - 1
    else:
        crossed_at = round(budget.max_cost_usd / cost_per_step)
        assert crossed_at <= total <= crossed_at + THREADS - 1


async def test_asyncio_tasks_racing_max_tokens_leave_exact_totals(traced) -> None:
    @step
    async def spend() -> None:
        await asyncio.sleep(0)  # let other tasks start their step between check and charge
        multirun.report_usage("m", output_tokens=10, cost_usd=0.0)

    @run(budget=Budget(max_tokens=1_000))
    async def main() -> tuple[int, int]:
        async def worker() -> int:
            done = 0
            for _ in range(100):
                try:
                    await spend()
                except BudgetExceededError:
                    break
                done += 1
            return done

        done = await asyncio.gather(*(worker() for _ in range(50)))
        return sum(done), get_current_run_context().tokens_used

    total, tokens = await main()
    assert tokens == total * 10
    # up to one step per task may be in flight when the limit is crossed
    assert 100 <= total <= 100 + 50 - 1


def test_max_sub_agents_refuses_the_steps_of_one_agent_too_many(traced) -> None:
    @step
    def work() -> None:
        pass

    @agent(name="helper")
    def helper() -> None:
        work()

    @run(budget=Budget(max_sub_agents=3))
    def main() -> int:
        started = 0
        for _ in range(5):
            try:
                helper()
            except BudgetExceededError as exc:
                assert exc.limit == "max_sub_agents"
                break
            started += 1
        return started

    assert main() == 3


def test_duration_limit_uses_the_monotonic_clock_not_the_wall_clock(traced, monkeypatch) -> None:
    import time as time_module

    @step
    def work() -> None:
        pass

    @run(budget=Budget(max_duration_seconds=60))
    def main() -> None:
        work()
        # the system clock jumps a day ahead: the run is not over
        real_time = time_module.time
        monkeypatch.setattr(time_module, "time", lambda: real_time() + 86_400)
        work()
        traced.clock.now += 61  # the monotonic clock passes the limit: it is
        work()

    with pytest.raises(BudgetExceededError, match="max_duration_seconds"):
        main()
    statuses = [s.attributes["multirun.step.status"] for s in traced.named("step work")]
    assert sorted(statuses) == ["completed", "completed", "failed"]


def test_threads_starting_agents_at_once_count_each_and_no_agent_past_the_limit_runs_a_step(traced) -> None:
    ran: list[int] = []

    @step
    def work(i: int) -> None:
        ran.append(i)

    @agent(name="helper")
    def helper(i: int) -> None:
        work(i)

    @run(budget=Budget(max_sub_agents=3))
    def main() -> tuple[list[BaseException | None], int]:
        barrier = threading.Barrier(THREADS)

        def start(i: int) -> BaseException | None:
            barrier.wait()
            try:
                helper(i)
            except BudgetExceededError as exc:
                return exc
            return None

        with ThreadPoolExecutor(THREADS) as pool:
            outcomes = list(pool.map(start, range(THREADS)))
        return outcomes, get_current_run_context().budget_status().sub_agents_used

    outcomes, started = main()
    refused = [o for o in outcomes if o is not None]
    assert started == THREADS  # every agent that started is counted once
    assert {getattr(o, "limit", None) for o in refused} <= {"max_sub_agents"}
    # an agent counts itself before its first step asks the budget: no fourth agent gets a step
    assert len(ran) <= 3
    assert len(ran) + len(refused) == THREADS


async def test_asyncio_tasks_starting_agents_at_once_leave_no_agent_past_the_limit_a_step(traced) -> None:
    ran: list[int] = []

    @step
    async def work(i: int) -> None:
        ran.append(i)

    @agent(name="helper")
    async def helper(i: int) -> None:
        await asyncio.sleep(0)  # every task starts its agent before any asks for a step
        await work(i)

    @run(budget=Budget(max_sub_agents=3))
    async def main() -> tuple[list[BaseException | None], int]:
        outcomes = await asyncio.gather(*(helper(i) for i in range(10)), return_exceptions=True)
        return outcomes, get_current_run_context().budget_status().sub_agents_used

    outcomes, started = await main()
    assert started == 10
    assert all(isinstance(o, BudgetExceededError) and o.limit == "max_sub_agents" for o in outcomes)
    assert ran == []  # ten agents were counted before the first step asked


def test_threads_racing_the_deadline_start_no_more_steps_than_were_in_flight(traced) -> None:
    traced.clock.advance_on_sleep = False
    lock = threading.Lock()

    @step
    def tick() -> None:
        with lock:
            traced.clock.now += 1  # each step takes one second of the run's fifty

    @run(budget=Budget(max_duration_seconds=50))
    def main() -> tuple[list[int], int]:
        done = race_threads(lambda: spend_until_refused(tick))
        return done, get_current_run_context().ledger.steps

    done, steps = main()
    total = sum(done)
    assert steps == total
    # no step starts once 50 seconds have passed: past them, only those already in flight end
    assert 50 <= total <= 50 + THREADS - 1


def test_a_run_ended_while_its_threads_still_spend_keeps_the_totals_its_span_was_given(traced) -> None:
    """README: usage reported after the run ended is in no run's total. The Run model and the
    agent's model say what their spans say, however much a thread the run left spends after."""
    spending = threading.Event()
    stop = threading.Event()

    @step
    def spend() -> None:
        multirun.report_usage("m", output_tokens=10, cost_usd=0.001)

    def keep_spending() -> None:
        while not stop.is_set():
            spend()
            spending.set()

    @agent(name="helper")
    def helper() -> threading.Thread:
        worker = threading.Thread(target=keep_spending)
        worker.start()
        spending.wait()
        return worker

    @run(name="main")
    def main() -> tuple[Any, threading.Thread]:
        return get_current_run_context(), helper()

    ctx, worker = main()
    for _ in range(50):  # and still after the run ended
        spend()
    stop.set()
    worker.join()
    run_span = traced.span("invoke_workflow main").attributes
    assert (ctx.run.tokens_used, ctx.run.cost_usd) == (
        run_span["multirun.tokens_used"],
        run_span["multirun.cost_usd"],
    )
    (agent_model,) = [a.agent for a in ctx.agents if a.agent.name == "helper"]
    agent_span = traced.span("invoke_agent helper").attributes
    assert agent_model.tokens_used == agent_span["multirun.tokens_used"]
    assert agent_model.cost_usd == agent_span["multirun.cost_usd"]


def test_a_retry_whose_backoff_saw_other_threads_spend_the_budget_is_not_made(traced) -> None:
    """A retry is not made once the budget is spent; that holds when the budget was spent by
    another thread while the step waited out its backoff, not only before."""
    attempts: list[int] = []
    backing_off, spent = threading.Event(), threading.Event()

    def sleep(seconds: float) -> None:
        backing_off.set()
        spent.wait(5)

    traced.clock.sleep = sleep  # type: ignore[method-assign]

    @step(retry=2, retry_delay=1.0)
    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("reset by peer")
        multirun.report_usage("m", output_tokens=100)

    @step
    def big() -> None:
        multirun.report_usage("m", output_tokens=1_000)

    @run(name="main", budget=Budget(max_tokens=500))
    def main() -> int:
        def other() -> None:
            backing_off.wait(5)
            big()
            spent.set()

        worker = threading.Thread(target=other)
        worker.start()
        with pytest.raises(BudgetExceededError, match="max_tokens"):
            flaky()
        worker.join()
        return get_current_run_context().tokens_used

    assert main() == 1_000
    assert len(attempts) == 1
    (flaky_span,) = traced.named("step flaky")
    assert flaky_span.attributes["multirun.step.status"] == "failed"
    # recorded as a refusal before a step is: the decision, the rule and the limit
    assert flaky_span.attributes["multirun.policy.decision"] == "abort"
    assert flaky_span.attributes["multirun.policy.rule"] == "budget"
    assert flaky_span.attributes["multirun.budget.exceeded_limit"] == "max_tokens"
