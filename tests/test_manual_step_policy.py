"""Steps made by hand (``start_step`` ... ``complete``/``fail``) are governed as decorated
steps are: the budget and the policy decide before each one starts."""

from __future__ import annotations

import asyncio

import pytest

from multirun import run, step
from multirun.checkpoints.hashing import input_hash
from multirun.context import get_current_agent_context
from multirun.errors import BudgetExceededError, PolicyViolation
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import (
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    RateLimitRule,
)
from multirun.telemetry import attributes as attr


def attrs_of(traced, name: str) -> list[dict]:
    spans = sorted(traced.named(name), key=lambda s: s.start_time or 0)
    return [dict(s.attributes or {}) for s in spans]


async def test_a_manual_step_over_the_budget_is_refused_at_start_step_with_a_refused_span(traced) -> None:
    started: list[int] = []

    @run(budget=Budget(max_steps=2))
    async def main() -> None:
        agent_ctx = get_current_agent_context()
        for i in range(3):
            step_ctx = await agent_ctx.start_step("tally", input_args=(i,))
            started.append(i)
            await step_ctx.complete(i)

    with pytest.raises(BudgetExceededError) as info:
        await main()

    assert info.value.limit == "max_steps"
    assert started == [0, 1]
    refused = attrs_of(traced, "step tally")[2]
    assert refused[attr.STEP_STATUS] == "failed"
    assert refused[attr.POLICY_DECISION] == "abort"
    assert refused[attr.POLICY_RULE] == "budget"
    assert refused[attr.BUDGET_EXCEEDED_LIMIT] == "max_steps"


def test_an_open_circuit_refuses_manual_steps_whose_failures_opened_it(traced) -> None:
    attempts: list[int] = []

    @run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2, recovery_time_seconds=30)))
    def main() -> list[str]:
        agent_ctx = get_current_agent_context()
        outcomes = []
        for i in range(4):
            try:
                step_ctx = agent_ctx.start_step("fetch", kind=StepKind.TOOL_CALL, input_args=(i,))
            except PolicyViolation as refused:
                outcomes.append(f"open:{refused.rule}")
                continue
            attempts.append(i)
            step_ctx.fail(ConnectionError("down"))
            outcomes.append("error")
        return outcomes

    assert main() == ["error", "error", "open:circuit_breaker", "open:circuit_breaker"]
    assert attempts == [0, 1]
    refused = attrs_of(traced, "execute_tool fetch")[2]
    assert (refused[attr.POLICY_DECISION], refused[attr.POLICY_RULE]) == ("abort", "circuit_breaker")


def test_a_half_open_circuit_closes_when_the_manual_probe_completes(traced) -> None:
    @run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30)))
    def main() -> None:
        agent_ctx = get_current_agent_context()
        agent_ctx.start_step("fetch").fail(ConnectionError("down"))
        traced.clock.now += 31  # half-open: one probe goes through
        agent_ctx.start_step("fetch").complete("ok")
        agent_ctx.start_step("fetch").complete("ok")  # closed again by the probe's success

    main()
    assert [a[attr.STEP_STATUS] for a in attrs_of(traced, "step fetch")] == [
        "failed",
        "completed",
        "completed",
    ]


def test_a_manual_probe_left_unfinished_by_an_error_does_not_keep_the_circuit_half_open(traced) -> None:
    # the usual slip: code between start_step and complete raises, and the step is never ended.
    # The circuit is shared by every run of the process: its probe must not be held for good
    policy = Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30))

    @run(policy=policy)
    def main(outcome: str) -> str:
        agent_ctx = get_current_agent_context()
        step_ctx = agent_ctx.start_step("fetch", kind=StepKind.TOOL_CALL)
        if outcome == "down":
            step_ctx.fail(ConnectionError("down"))
        elif outcome == "slip":
            raise KeyError("parsing the answer")  # before complete(): the step is left open
        else:
            step_ctx.complete(outcome)
        return outcome

    assert main("down") == "down"
    traced.clock.now += 31  # half-open: the next call is the probe
    with pytest.raises(KeyError):
        main("slip")
    assert main("up") == "up"  # another run probes, and closes the circuit
    assert main("up") == "up"


def test_a_manual_llm_step_gets_the_fallback_model_once_the_run_degraded(traced) -> None:
    seen: list[str | None] = []

    @run(
        budget=Budget(max_tokens=1000),
        policy=Policy(
            graceful_degradation=GracefulDegradationRule(
                fallback_model="gpt-4o-mini", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
            )
        ),
    )
    def main() -> None:
        agent_ctx = get_current_agent_context()
        for _ in range(3):
            step_ctx = agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="gpt-4o")
            seen.append(step_ctx.model)
            step_ctx.complete("answer", tokens_used=300, cost_usd=0.0)

    main()
    assert seen == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    degraded = attrs_of(traced, "chat gpt-4o-mini")
    assert [(a[attr.POLICY_DECISION], a[attr.POLICY_RULE]) for a in degraded] == [
        ("fallback", "graceful_degradation")
    ]


def test_a_sync_manual_llm_step_waits_for_its_rate_limit_slot(traced) -> None:
    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        agent_ctx = get_current_agent_context()
        for _ in range(3):
            agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m").complete("a")

    main()
    assert traced.clock.sleeps == [1.0, 1.0]
    found = attrs_of(traced, "chat m")
    assert [a[attr.POLICY_DECISION] for a in found] == ["proceed", "wait", "wait"]
    assert [a.get(attr.POLICY_WAIT_SECONDS) for a in found] == [None, 1.0, 1.0]


async def test_an_awaited_manual_llm_step_waits_for_its_rate_limit_slot_without_blocking(
    traced, monkeypatch
) -> None:
    def blocking_sleep(seconds: float) -> None:
        raise AssertionError("an async program's step waited with a blocking sleep")

    monkeypatch.setattr(traced.clock, "sleep", blocking_sleep)

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    async def main() -> None:
        agent_ctx = get_current_agent_context()
        for _ in range(3):
            step_ctx = await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")
            await step_ctx.complete("a")

    await main()
    assert traced.clock.sleeps == [1.0, 1.0]


async def test_a_manual_step_cancelled_while_it_waits_for_its_slot_ends_its_span(traced) -> None:
    import asyncio

    async def cancelled_sleep(seconds: float) -> None:
        raise asyncio.CancelledError

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    async def main() -> None:
        agent_ctx = get_current_agent_context()
        await (await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")).complete("a")
        traced.clock.async_sleep = cancelled_sleep  # type: ignore[method-assign]
        await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")

    with pytest.raises(asyncio.CancelledError):
        await main()
    assert [a[attr.STEP_STATUS] for a in attrs_of(traced, "chat m")] == ["completed", "failed"]


def test_a_manual_step_the_budget_refuses_does_not_use_up_a_rate_limit_slot(traced) -> None:
    policy = Policy(rate_limit=RateLimitRule(requests_per_minute=60))

    @run(budget=Budget(max_steps=1), policy=policy)
    def spent() -> None:
        agent_ctx = get_current_agent_context()
        agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m").complete("a")  # the slot at 0 s
        with pytest.raises(BudgetExceededError):
            agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")  # takes no slot

    @run(policy=policy)
    def other() -> None:
        get_current_agent_context().start_step("ask", kind=StepKind.LLM_CALL, model="m").complete("b")

    spent()
    started = traced.clock.now
    other()
    assert traced.clock.now - started == 1.0  # the slot at 1 s, not the one after the refused step's


def test_a_manual_step_from_before_the_circuit_opened_cannot_decide_it_while_a_probe_is_in_flight(
    traced,
) -> None:
    @run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30)))
    def main() -> None:
        agent_ctx = get_current_agent_context()
        slow = agent_ctx.start_step("fetch")  # in flight while the circuit opens
        agent_ctx.start_step("fetch").fail(ConnectionError("down"))  # opens it
        traced.clock.now += 31
        probe = agent_ctx.start_step("fetch")  # half-open: the one probe
        slow.complete("late")  # a success from before the circuit opened: not the probe's
        with pytest.raises(PolicyViolation, match="circuit"):
            agent_ctx.start_step("fetch")  # the probe is still in flight
        probe.fail(ConnectionError("still down"))  # the probe decides: open again
        with pytest.raises(PolicyViolation, match="circuit"):
            agent_ctx.start_step("fetch")

    main()


def test_a_manual_step_that_waited_for_its_slot_does_not_go_through_a_circuit_that_opened_meanwhile(
    traced,
) -> None:
    policy = Policy(
        rate_limit=RateLimitRule(requests_per_minute=60),
        circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
    )

    @run(policy=policy)
    def main() -> None:
        agent_ctx = get_current_agent_context()
        agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m").complete("a")  # the slot at 0 s

        def meanwhile(seconds: float) -> None:
            traced.clock.now += seconds
            agent_ctx.start_step("ask").fail(ConnectionError("down"))  # the same dependency: it opens

        traced.clock.sleep = meanwhile  # type: ignore[method-assign]
        with pytest.raises(PolicyViolation, match="circuit"):
            agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")  # waits 1 s for its slot

    main()
    refused = attrs_of(traced, "chat m")[1]
    assert (refused[attr.POLICY_DECISION], refused[attr.POLICY_RULE]) == ("abort", "circuit_breaker")
    assert refused[attr.STEP_STATUS] == "failed"


async def test_an_awaited_manual_step_that_waited_for_its_slot_is_refused_by_a_circuit_that_opened(
    traced,
) -> None:
    policy = Policy(
        rate_limit=RateLimitRule(requests_per_minute=60),
        circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
    )

    @run(policy=policy)
    async def main() -> None:
        agent_ctx = get_current_agent_context()
        await (await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")).complete("a")

        async def meanwhile(seconds: float) -> None:
            traced.clock.now += seconds
            await (await agent_ctx.start_step("ask")).fail(ConnectionError("down"))

        traced.clock.async_sleep = meanwhile  # type: ignore[method-assign]
        with pytest.raises(PolicyViolation, match="circuit"):
            await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")

    await main()
    assert attrs_of(traced, "chat m")[1][attr.POLICY_RULE] == "circuit_breaker"


def test_a_manual_step_interrupted_while_it_waits_for_its_slot_gives_the_slot_back(traced) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        agent_ctx = get_current_agent_context()
        agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m").complete("a")  # the slot at 0 s
        sleep = traced.clock.sleep
        traced.clock.sleep = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")  # interrupted waiting for 1 s
        traced.clock.sleep = sleep  # type: ignore[method-assign]
        agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m").complete("c")

    main()
    steps = attrs_of(traced, "chat m")
    assert steps[1][attr.STEP_STATUS] == "failed"
    assert steps[2][attr.POLICY_WAIT_SECONDS] == 1.0  # the slot the interrupted step never used


async def test_an_awaited_manual_step_cancelled_while_it_waits_gives_its_slot_back(traced) -> None:
    async def hang(seconds: float) -> None:
        await asyncio.sleep(3600)  # a real wait, so that the cancellation lands in it

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    async def main() -> None:
        agent_ctx = get_current_agent_context()
        await (await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")).complete("a")
        instant_sleep = traced.clock.async_sleep
        traced.clock.async_sleep = hang  # type: ignore[method-assign]
        waiting = agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")  # the slot at 1 s
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(waiting, timeout=0.05)
        traced.clock.async_sleep = instant_sleep  # type: ignore[method-assign]
        await (await agent_ctx.start_step("ask", kind=StepKind.LLM_CALL, model="m")).complete("c")

    await main()
    steps = attrs_of(traced, "chat m")
    assert steps[1][attr.STEP_STATUS] == "failed"
    assert steps[2][attr.POLICY_WAIT_SECONDS] == 1.0


def test_a_refused_decorated_step_and_a_refused_manual_step_carry_the_same_input_hash(traced) -> None:
    @step(name="tally")
    def tally(i: int) -> int:
        return i

    @run(budget=Budget(max_steps=1))
    def main() -> None:
        tally(0)
        with pytest.raises(BudgetExceededError):
            tally(1)
        with pytest.raises(BudgetExceededError):
            get_current_agent_context().start_step("tally", input_args=(1,))

    main()

    ran, decorated, manual = attrs_of(traced, "step tally")
    assert ran[attr.STEP_INPUT_HASH] == input_hash((0,), {})
    assert decorated[attr.STEP_STATUS] == manual[attr.STEP_STATUS] == "failed"
    assert decorated[attr.STEP_INPUT_HASH] == manual[attr.STEP_INPUT_HASH] == input_hash((1,), {})
