"""The policy rules: rate limit, circuit breaker, graceful degradation, retry defaults."""

from __future__ import annotations

import asyncio
import math
import threading

import pydantic
import pytest

import multirun
from multirun import run, step
from multirun.context import get_current_run_context, get_current_step_context
from multirun.errors import BudgetExceededError, PolicyViolation, StepError
from multirun.models import Budget, Policy, Run, StepKind
from multirun.models.policy import (
    BackoffStrategy,
    BudgetRule,
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    RateLimitRule,
    RetryRule,
)
from multirun.telemetry import attributes as attr


def attrs_of(traced, name: str) -> list[dict]:
    spans = sorted(traced.named(name), key=lambda s: s.start_time or 0)
    return [dict(s.attributes or {}) for s in spans]


# ---------------------------------------------------------------------------
# budget rule


def test_a_budget_rule_tightens_the_runs_budget_and_its_status_reports_against_it(traced) -> None:
    calls = []
    statuses = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        calls.append(1)
        multirun.report_usage("gpt-4o-mini", input_tokens=150)

    @run(budget=Budget(max_tokens=1000), policy=Policy(budget=BudgetRule(max_tokens=200)))
    def main() -> None:
        ask()
        ask()
        statuses.append(multirun.context.get_current_run_context().budget_status())
        ask()

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert (info.value.limit, info.value.maximum, len(calls)) == ("max_tokens", 200, 2)
    status = statuses[0]
    assert (status.is_exceeded, status.tokens_remaining, status.percentage_used) == (True, 0, 150)


def test_the_run_span_shows_the_limits_a_budget_rule_tightened(traced) -> None:
    policy = Policy(budget=BudgetRule(max_tokens=200, max_cost_usd=5.0))

    @run(budget=Budget(max_tokens=1000, max_cost_usd=1.0, max_steps=10), policy=policy)
    def main() -> None:
        pass

    main()
    span = traced.span("invoke_workflow main").attributes
    limits = {k: v for k, v in span.items() if k.startswith("multirun.budget.max_")}
    assert limits == {
        "multirun.budget.max_tokens": 200,
        "multirun.budget.max_cost_usd": 1.0,
        "multirun.budget.max_steps": 10,
    }


# ---------------------------------------------------------------------------
# rate limit


def test_rate_limit_paces_llm_steps_and_shows_the_wait_on_the_span(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        pass

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        for _ in range(3):
            ask()

    main()
    assert traced.clock.sleeps == [1.0, 1.0]
    found = attrs_of(traced, "chat gpt-4o-mini")
    assert [a[attr.POLICY_DECISION] for a in found] == ["proceed", "wait", "wait"]
    assert [a.get(attr.POLICY_WAIT_SECONDS) for a in found] == [None, 1.0, 1.0]
    assert found[1][attr.POLICY_RULE] == "rate_limit"


def test_rate_limit_for_one_model_leaves_other_models_alone(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def big() -> None:
        pass

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def small() -> None:
        pass

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=30, model="gpt-4o")))
    def main() -> None:
        for _ in range(3):
            small()
        big()
        big()

    main()
    assert traced.clock.sleeps == [2.0]


def test_rate_limit_is_shared_by_threads(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    traced.clock.advance_on_sleep = False

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=120)))
    def main() -> None:
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    main()
    # four reservations half a second apart: waits of 0, 0.5, 1.0 and 1.5 seconds (any order)
    assert sorted(traced.clock.sleeps) == [0.5, 1.0, 1.5]


async def test_rate_limit_waits_with_asyncio_sleep_in_async_steps(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    async def ask() -> None:
        await asyncio.sleep(0)

    traced.clock.advance_on_sleep = False

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    async def main() -> None:
        await asyncio.gather(ask(), ask(), ask())

    await main()
    assert sorted(traced.clock.sleeps) == [1.0, 2.0]


def test_rate_limit_that_would_wait_past_the_deadline_aborts(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    @run(
        budget=Budget(max_duration_seconds=10),
        policy=Policy(rate_limit=RateLimitRule(requests_per_minute=4)),
    )
    def main() -> None:
        ask()
        ask()  # the next slot is 15 s away, past the 10 s deadline

    with pytest.raises(PolicyViolation, match="rate_limit"):
        main()
    refused = attrs_of(traced, "chat m")[1]
    assert refused[attr.POLICY_DECISION] == "abort"
    assert refused[attr.STEP_STATUS] == "failed"


def test_a_step_the_budget_refuses_does_not_use_up_a_rate_limit_slot(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    policy = Policy(rate_limit=RateLimitRule(requests_per_minute=60))

    @run(budget=Budget(max_steps=1), policy=policy)
    def spent() -> None:
        ask()  # the slot at 0 s
        with pytest.raises(BudgetExceededError):
            ask()  # refused: it never calls the model, so it takes no slot

    @run(policy=policy)
    def other() -> None:
        ask()

    spent()
    started = traced.clock.now
    other()
    assert traced.clock.now - started == 1.0  # the slot at 1 s, not the one after the refused step's


def test_a_retry_in_its_backoff_leaves_the_free_slots_before_its_own_to_other_calls(
    traced, monkeypatch
) -> None:
    clock = traced.clock
    clock.advance_on_sleep = False
    in_backoff, other_done = threading.Event(), threading.Event()
    sleep = clock.sleep

    def sleeping(seconds: float) -> None:
        sleep(seconds)
        if seconds == 30:  # the retry waits out its backoff while another run calls the model
            in_backoff.set()
            assert other_done.wait(30)

    monkeypatch.setattr(clock, "sleep", sleeping)
    policy = Policy(rate_limit=RateLimitRule(requests_per_minute=60))
    attempts: list[int] = []

    @step(kind=StepKind.LLM_CALL, model="m", retry=1, retry_delay=30)
    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("blip")

    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> str:
        return "ok"

    @run(policy=policy)
    def retrying() -> None:
        flaky()

    @run(budget=Budget(max_duration_seconds=10), policy=policy)
    def other() -> str:
        return ask()

    thread = threading.Thread(target=retrying)
    thread.start()
    try:
        assert in_backoff.wait(30)
        assert other() == "ok"  # the slot 1 s away, not the one after the retry's, 31 s away
    finally:
        other_done.set()
        thread.join(30)
    [asked] = [a for a in attrs_of(traced, "chat m") if a[attr.STEP_NAME] == "ask"]
    assert (asked[attr.POLICY_DECISION], asked[attr.POLICY_WAIT_SECONDS]) == ("wait", 1.0)
    assert len(attempts) == 2


def test_a_rate_limit_too_small_to_space_requests_is_refused_naming_the_parameter() -> None:
    from pydantic import ValidationError

    for tiny in (1e-320, 1e-12):  # one request every inf seconds; every 1.9 million years
        with pytest.raises(ValidationError, match="requests_per_minute") as info:
            RateLimitRule(requests_per_minute=tiny)
        assert "at least" in str(info.value)
    assert RateLimitRule(requests_per_minute=0.001).requests_per_minute == 0.001  # one every 1000 min


# ---------------------------------------------------------------------------
# circuit breaker


def breaker_policy(**kwargs) -> Policy:
    return Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2, recovery_time_seconds=30, **kwargs))


def test_circuit_opens_after_threshold_and_fails_fast(traced) -> None:
    calls = {"n": 0}

    @step
    def fetch() -> None:
        calls["n"] += 1
        raise ConnectionError("down")

    @run(policy=breaker_policy())
    def main() -> list[str]:
        outcomes = []
        for _ in range(4):
            try:
                fetch()
            except ConnectionError:
                outcomes.append("error")
            except PolicyViolation as exc:
                outcomes.append(f"open:{exc.rule}")
        return outcomes

    assert main() == ["error", "error", "open:circuit_breaker", "open:circuit_breaker"]
    assert calls["n"] == 2
    refused = attrs_of(traced, "step fetch")[2]
    assert refused[attr.POLICY_DECISION] == "abort"
    assert refused[attr.POLICY_RULE] == "circuit_breaker"


@pytest.mark.parametrize(
    ("recovery", "said"),
    [
        (30.0, "it is tried again 30s after it opened"),
        (math.inf, "it stays open: recovery_time_seconds is inf"),
    ],
)
def test_an_open_circuit_says_when_it_is_tried_again(traced, recovery: float, said: str) -> None:
    @step
    def fetch() -> None:
        raise ConnectionError("down")

    policy = Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=recovery))

    @run(policy=policy)
    def main() -> str:
        with pytest.raises(ConnectionError):
            fetch()
        with pytest.raises(PolicyViolation) as refused:
            fetch()
        return str(refused.value)

    assert said in main()


def test_half_open_circuit_lets_exactly_one_probe_through(traced) -> None:
    fail = {"on": True}
    entered = threading.Event()
    release = threading.Event()
    calls = {"n": 0}

    @step
    def fetch() -> str:
        calls["n"] += 1
        if fail["on"]:
            raise ConnectionError("down")
        entered.set()
        release.wait(5)
        return "ok"

    @run(policy=breaker_policy())
    def main() -> list[str]:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch()
        traced.clock.now += 31  # past recovery_time_seconds: half-open
        fail["on"] = False
        results: list[str] = []

        def probe() -> None:
            try:
                results.append(fetch())
            except PolicyViolation:
                results.append("refused")

        first = threading.Thread(target=probe)
        first.start()
        assert entered.wait(5)
        others = [threading.Thread(target=probe) for _ in range(3)]
        for t in others:
            t.start()
        for t in others:
            t.join()
        release.set()
        first.join()
        results.append(fetch())  # closed again after the probe succeeded
        return results

    assert main() == ["refused", "refused", "refused", "ok", "ok"]
    assert calls["n"] == 4


def test_failed_probe_opens_the_circuit_again(traced) -> None:
    @step
    def fetch() -> None:
        raise ConnectionError("still down")

    @run(policy=breaker_policy())
    def main() -> list[str]:
        seen = []
        for advance in (0, 0, 31, 0):
            traced.clock.now += advance
            try:
                fetch()
            except ConnectionError:
                seen.append("error")
            except PolicyViolation:
                seen.append("open")
        return seen

    assert main() == ["error", "error", "error", "open"]


def test_a_call_that_started_before_the_circuit_opened_and_succeeds_after_does_not_close_it(traced) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    @step
    def fetch(how: str) -> None:
        calls.append(how)
        if how == "slow":
            started.set()
            assert release.wait(10)
        else:
            raise ConnectionError("down")

    @run(policy=breaker_policy())
    def main() -> None:
        slow = threading.Thread(target=fetch, args=("slow",))
        slow.start()  # in flight while the circuit opens
        assert started.wait(10)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch("fail")  # opens the circuit
        release.set()
        slow.join()  # a success from before: not the probe, the circuit stays open
        with pytest.raises(PolicyViolation, match="circuit"):
            fetch("fail")

    main()
    assert calls == ["slow", "fail", "fail"]


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    """``fn(*args)`` started in a thread; the list gets its result or the error it raised."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(fn(*args))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("late", ["success", "failure"])
@pytest.mark.parametrize("probe_succeeds", [True, False])
def test_only_the_probe_decides_a_half_open_circuit_not_a_call_from_before_it_opened(
    traced, late: str, probe_succeeds: bool
) -> None:
    gates = {"slow": (threading.Event(), threading.Event()), "probe": (threading.Event(), threading.Event())}
    calls: list[str] = []

    @step
    def fetch(how: str) -> str:
        calls.append(how)
        if how in gates:
            started, release = gates[how]
            started.set()
            assert release.wait(10)
        if how == "fail" or (how == "slow" and late == "failure") or (how == "probe" and not probe_succeeds):
            raise ConnectionError("down")
        return how

    @run(policy=breaker_policy())
    def main() -> None:
        slow, _ = in_thread(fetch, "slow")  # in flight while the circuit opens
        assert gates["slow"][0].wait(10)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch("fail")
        traced.clock.now += 31  # half-open
        probe, probed = in_thread(fetch, "probe")
        assert gates["probe"][0].wait(10)
        gates["slow"][1].set()
        slow.join()  # its late outcome neither closes the circuit nor opens it again
        with pytest.raises(PolicyViolation, match="circuit"):
            fetch("other")  # the probe is still in flight
        gates["probe"][1].set()
        probe.join()
        assert probed == ["probe"] if probe_succeeds else isinstance(probed[0], ConnectionError)
        if probe_succeeds:
            assert fetch("other") == "other"
        else:
            with pytest.raises(PolicyViolation, match="circuit"):
                fetch("other")

    main()
    assert calls == ["slow", "fail", "fail", "probe"] + (["other"] if probe_succeeds else [])


def test_a_late_failure_while_the_circuit_is_open_does_not_restart_its_recovery_time(traced) -> None:
    started, release = threading.Event(), threading.Event()

    @step
    def fetch(how: str) -> str:
        if how == "slow":
            started.set()
            assert release.wait(10)
        if how != "ok":
            raise ConnectionError("down")
        return how

    @run(policy=breaker_policy())
    def main() -> str:
        slow, _ = in_thread(fetch, "slow")
        assert started.wait(10)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch("fail")  # opens the circuit, at 0 s
        traced.clock.now += 20
        release.set()
        slow.join()  # fails at 20 s: a call from before the circuit opened
        traced.clock.now += 11  # 31 s after the circuit opened: half-open
        return fetch("ok")

    assert main() == "ok"


def test_a_call_that_is_not_the_probe_cannot_give_the_probe_back(traced) -> None:
    gates = {"slow": (threading.Event(), threading.Event()), "probe": (threading.Event(), threading.Event())}
    calls: list[str] = []

    @step
    def fetch(how: str) -> str:
        calls.append(how)
        if how in gates:
            started, release = gates[how]
            started.set()
            assert release.wait(10)
        if how == "slow":
            raise ValueError("bad input")  # an excluded error: says nothing of the dependency
        if how == "fail":
            raise ConnectionError("down")
        return how

    @run(policy=breaker_policy(excluded_errors=(ValueError,)))
    def main() -> None:
        slow, _ = in_thread(fetch, "slow")
        assert gates["slow"][0].wait(10)
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch("fail")
        traced.clock.now += 31
        probe, probed = in_thread(fetch, "probe")
        assert gates["probe"][0].wait(10)
        gates["slow"][1].set()
        slow.join()
        with pytest.raises(PolicyViolation, match="circuit"):
            fetch("other")  # a second probe while the first is in flight
        gates["probe"][1].set()
        probe.join()
        assert probed == ["probe"]
        assert fetch("other") == "other"

    main()
    assert calls == ["slow", "fail", "fail", "probe", "other"]


async def test_a_task_cancelled_while_another_probes_does_not_let_a_second_probe_through(traced) -> None:
    gates = {"slow": (asyncio.Event(), asyncio.Event()), "probe": (asyncio.Event(), asyncio.Event())}
    calls: list[str] = []

    @step
    async def fetch(how: str) -> str:
        calls.append(how)
        if how in gates:
            started, release = gates[how]
            started.set()
            await release.wait()
        if how == "fail":
            raise ConnectionError("down")
        return how

    @run(policy=breaker_policy())
    async def main() -> None:
        slow = asyncio.create_task(fetch("slow"))
        await gates["slow"][0].wait()
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await fetch("fail")
        traced.clock.now += 31
        probe = asyncio.create_task(fetch("probe"))
        await gates["probe"][0].wait()
        slow.cancel()  # a call from before the circuit opened, cancelled while the probe is in flight
        with pytest.raises(asyncio.CancelledError):
            await slow
        with pytest.raises(PolicyViolation, match="circuit"):
            await fetch("other")
        gates["probe"][1].set()
        assert await probe == "probe"
        assert await fetch("other") == "other"

    await main()
    assert calls == ["slow", "fail", "fail", "probe", "other"]


def test_excluded_errors_do_not_count_towards_the_threshold(traced) -> None:
    @step
    def parse() -> None:
        raise ValueError("bad input, not an outage")

    @run(policy=breaker_policy(excluded_errors=(ValueError,)))
    def main() -> int:
        errors = 0
        for _ in range(5):
            with pytest.raises(ValueError):
                parse()
            errors += 1
        return errors

    assert main() == 5


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="asyncio.TaskGroup is Python 3.11+")
def test_excluded_errors_raised_together_by_a_task_group_do_not_count_either(traced) -> None:
    calls = {"n": 0}

    async def check(item: str) -> None:
        raise ValueError(f"bad input {item!r}, not an outage")

    @step
    async def parse_all() -> None:
        calls["n"] += 1
        async with asyncio.TaskGroup() as group:
            for item in ("a", "b"):
                group.create_task(check(item))

    @run(policy=breaker_policy(excluded_errors=(ValueError,)))
    async def main() -> None:
        for _ in range(5):
            with pytest.raises(Exception) as raised:
                await parse_all()
            assert type(raised.value).__name__ == "ExceptionGroup"

    asyncio.run(main())
    assert calls["n"] == 5  # the circuit never opened


# ---------------------------------------------------------------------------
# graceful degradation


def test_degradation_switches_llm_steps_to_the_fallback_model_once_over_threshold(traced) -> None:
    seen_models: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> None:
        model = get_current_step_context().model
        seen_models.append(model)
        multirun.report_usage(model, input_tokens=300, output_tokens=0, cost_usd=0.0)

    @run(
        budget=Budget(max_tokens=1000),
        policy=Policy(
            graceful_degradation=GracefulDegradationRule(
                fallback_model="gpt-4o-mini", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
            )
        ),
    )
    def main() -> None:
        for _ in range(3):
            ask()

    main()
    assert seen_models == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    spans = attrs_of(traced, "chat gpt-4o") + attrs_of(traced, "chat gpt-4o-mini")
    assert [a[attr.GEN_AI_REQUEST_MODEL] for a in spans] == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert spans[2][attr.POLICY_DECISION] == "fallback"
    assert spans[2][attr.POLICY_RULE] == "graceful_degradation"


def test_a_step_that_waits_for_its_slot_and_gets_the_fallback_model_shows_both(traced) -> None:
    # the wait is the step's decision, but the switch of model must not vanish behind it
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> None:
        multirun.report_usage(get_current_step_context().model, input_tokens=300, cost_usd=0.0)

    @run(
        budget=Budget(max_tokens=1000),
        policy=Policy(
            rate_limit=RateLimitRule(requests_per_minute=60),
            graceful_degradation=GracefulDegradationRule(
                fallback_model="gpt-4o-mini", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
            ),
        ),
    )
    def main() -> None:
        for _ in range(3):
            ask()

    main()
    [both] = attrs_of(traced, "chat gpt-4o-mini")
    assert (both[attr.POLICY_DECISION], both[attr.POLICY_RULE]) == ("wait", "rate_limit")
    assert both[attr.POLICY_WAIT_SECONDS] == 1.0
    assert both[attr.GEN_AI_REQUEST_MODEL] == both[attr.POLICY_FALLBACK_MODEL] == "gpt-4o-mini"
    waited = attrs_of(traced, "chat gpt-4o")
    assert [attr.POLICY_FALLBACK_MODEL in a for a in waited] == [False, False]


def test_a_fallback_alone_is_its_steps_decision_and_names_the_fallback_model(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> None:
        multirun.report_usage(get_current_step_context().model, input_tokens=600, cost_usd=0.0)

    rule = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
    )

    @run(budget=Budget(max_tokens=10_000), policy=Policy(graceful_degradation=rule))
    def main() -> None:
        for _ in range(10):
            ask()

    main()
    found = attrs_of(traced, "chat gpt-4o-mini")
    assert len(found) == 1
    assert [(a[attr.POLICY_DECISION], a[attr.POLICY_RULE]) for a in found] == [
        ("fallback", "graceful_degradation")
    ]
    assert found[0][attr.POLICY_FALLBACK_MODEL] == "gpt-4o-mini"
    assert attr.POLICY_WAIT_SECONDS not in found[0]


def test_degradation_by_default_follows_the_most_used_limit_of_the_budget(traced) -> None:
    seen: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> None:
        seen.append(get_current_step_context().model)
        traced.clock.now += 1

    # the default trigger: 80% of the limit most used. After 8 steps that is the duration
    # (8 of 10 seconds), not the steps (8 of 20)
    @run(
        budget=Budget(max_steps=20, max_duration_seconds=10),
        policy=Policy(graceful_degradation=GracefulDegradationRule(fallback_model="gpt-4o-mini")),
    )
    def main() -> float:
        for _ in range(9):
            ask()
        return get_current_run_context().budget_status().percentage_used

    assert main() == 90.0
    assert seen == ["gpt-4o"] * 8 + ["gpt-4o-mini"]
    chats = attrs_of(traced, "chat gpt-4o-mini")
    assert [(a[attr.GEN_AI_REQUEST_MODEL], a[attr.POLICY_DECISION]) for a in chats] == [
        ("gpt-4o-mini", "fallback")
    ]


def test_a_sub_run_degrades_with_its_parent_once_the_parents_budget_passes_the_threshold(traced) -> None:
    # a sub-run spends its parent's budget too: once the parent uses the fallback model, the
    # sub-runs it calls do as well, rather than switching back to the primary model
    seen: list[tuple[str, str | None]] = []
    policy = Policy(
        graceful_degradation=GracefulDegradationRule(
            fallback_model="gpt-4o-mini", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
        )
    )

    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask(who: str, tokens: int) -> None:
        model = get_current_step_context().model
        seen.append((who, model))
        multirun.report_usage(model, input_tokens=tokens, cost_usd=0.0)

    @run(policy=policy)
    def researcher(tokens: int) -> None:
        ask("researcher", tokens)

    @run(budget=Budget(max_tokens=1000), policy=policy)
    def main() -> None:
        researcher(600)  # 60% of the parent's tokens
        ask("main", 10)
        researcher(10)

    main()
    assert seen == [("researcher", "gpt-4o"), ("main", "gpt-4o-mini"), ("researcher", "gpt-4o-mini")]


def test_usage_a_degraded_step_reports_without_a_model_is_priced_as_the_fallback_model(traced) -> None:
    from multirun.pricing import PriceBook

    traced.client.prices = PriceBook({"primary": multirun.Price(10, 10), "cheap": multirun.Price(1, 1)})
    seen_models: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="primary")
    def ask() -> None:
        seen_models.append(get_current_step_context().model)
        multirun.report_usage(input_tokens=1_000_000)  # the step's model, whichever the policy chose

    policy = Policy(
        graceful_degradation=GracefulDegradationRule(
            fallback_model="cheap", trigger=DegradationTrigger.COST_PERCENTAGE, threshold=50
        )
    )

    @run(budget=Budget(max_cost_usd=20.0), policy=policy)
    def main() -> float:
        ask()  # $10 of $20: degraded from here on
        ask()
        return multirun.context.get_current_run_context().cost_usd

    assert main() == 11.0
    assert seen_models == ["primary", "cheap"]
    assert not any(s.attributes.get(attr.UNPRICED) for s in traced.spans())


def test_a_retry_that_gets_the_fallback_model_names_it_on_its_span(traced) -> None:
    seen: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="gpt-4o", retry=1, retry_delay=0)
    def ask() -> str:
        seen.append(get_current_step_context().model)
        if len(seen) == 1:
            raise ConnectionError("blip")  # the run degrades: the retry asks for the fallback model
        return "ok"

    rule = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=1
    )

    @run(policy=Policy(graceful_degradation=rule))
    def main() -> str:
        return ask()

    assert main() == "ok"
    assert seen == ["gpt-4o", "gpt-4o-mini"]
    [span] = attrs_of(traced, "chat gpt-4o-mini")
    assert span[attr.GEN_AI_REQUEST_MODEL] == span[attr.POLICY_FALLBACK_MODEL] == "gpt-4o-mini"
    assert span[attr.POLICY_DECISION] == "fallback"


def test_degradation_does_not_flap_when_the_fallback_model_fails_too(traced) -> None:
    seen_models: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="primary")
    def ask() -> None:
        seen_models.append(get_current_step_context().model)
        raise TimeoutError("model overloaded")

    @run(
        policy=Policy(
            graceful_degradation=GracefulDegradationRule(
                fallback_model="fallback", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=2
            )
        )
    )
    def main() -> None:
        for _ in range(5):
            with pytest.raises(TimeoutError):
                ask()

    main()
    assert seen_models == ["primary", "primary", "fallback", "fallback", "fallback"]


# ---------------------------------------------------------------------------
# retry rule and errors that are never retried


def test_policy_retry_rule_is_the_default_for_steps_without_retry(traced) -> None:
    calls = {"n": 0}

    @step
    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("blip")
        return "ok"

    policy = Policy(retry=RetryRule(max_attempts=3, backoff=BackoffStrategy.LINEAR, base_delay_seconds=2))

    @run(policy=policy)
    def main() -> str:
        return flaky()

    assert main() == "ok"
    assert traced.clock.sleeps == [2.0, 4.0]


def test_a_step_retried_by_the_policy_retry_rule_fails_with_step_error_as_with_its_own_retry(traced) -> None:
    calls = {"n": 0}

    @step
    def flaky() -> None:
        calls["n"] += 1
        raise ConnectionError("blip")

    @run(policy=Policy(retry=RetryRule(max_attempts=3, base_delay_seconds=0)))
    def main() -> None:
        flaky()

    with pytest.raises(StepError) as raised:
        main()
    assert (calls["n"], raised.value.attempts) == (3, 3)
    assert isinstance(raised.value.__cause__, ConnectionError)


def test_a_retry_rule_of_one_attempt_retries_nothing_and_raises_the_error_itself(traced) -> None:
    @step
    def flaky() -> None:
        raise ConnectionError("blip")

    @run(policy=Policy(retry=RetryRule(max_attempts=1)))
    def main() -> None:
        flaky()

    with pytest.raises(ConnectionError):
        main()


_RELOADS = {
    "keywords": lambda model: type(model)(**model.model_dump()),
    "model_validate": lambda model: type(model).model_validate(model.model_dump()),
    "json": lambda model: type(model).model_validate_json(model.model_dump_json()),
    "json-mode dict": lambda model: type(model).model_validate(model.model_dump(mode="json")),
}


@pytest.mark.parametrize("reload", _RELOADS.values(), ids=_RELOADS.keys())
@pytest.mark.parametrize("cap", [0.5, 0.0])
def test_a_retry_rule_whose_cap_lowers_the_default_delay_is_read_back_from_its_dump(
    traced, reload, cap: float
) -> None:
    """A cap below the default base delay (1 s) lowers it; the rule's dump, read back, was
    refused as a base delay of 1 s given above its cap. Read back, it waits as it did."""
    rule = RetryRule(max_attempts=3, max_delay_seconds=cap)
    assert reload(rule) == rule
    assert reload(Policy(retry=rule)) == Policy(retry=rule)
    run_model = Run(name="r", policy=Policy(retry=rule))
    assert reload(run_model).policy == run_model.policy
    calls = {"n": 0}

    @step
    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("blip")
        return "ok"

    @run(policy=reload(Policy(retry=rule)))
    def main() -> str:
        return flaky()

    assert main() == "ok"
    assert traced.clock.sleeps == ([cap, cap] if cap else [])  # no wait is no sleep


def test_a_retry_rule_whose_cap_is_raised_again_has_the_default_delay_back(traced) -> None:
    """The default base delay lowered by a cap comes back when the cap is raised: the rule
    keeps no delay of its own that nobody gave."""
    rule = RetryRule(max_attempts=2, backoff=BackoffStrategy.CONSTANT, max_delay_seconds=0.5)
    rule.max_delay_seconds = 60
    assert RetryRule(**rule.model_dump()) == RetryRule(max_attempts=2, backoff=BackoffStrategy.CONSTANT)
    calls = {"n": 0}

    @step
    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] < 2:
            raise ConnectionError("blip")

    @run(policy=Policy(retry=rule))
    def main() -> None:
        flaky()

    main()
    assert traced.clock.sleeps == [1.0]


def test_a_copy_with_an_update_is_validated_as_a_new_rule_would_be() -> None:
    """pydantic's model_copy(update=...) does not validate: a copy could hold a budget the
    constructor refuses, or keep a delay derived from the cap it changes (its dump then read
    back refused)."""
    lowered = RetryRule().model_copy(update={"max_delay_seconds": 0.5})
    assert lowered.base_delay_seconds == 0.5 and RetryRule(**lowered.model_dump()) == lowered
    raised = RetryRule(max_delay_seconds=0.5).model_copy(update={"max_delay_seconds": 60})
    assert raised == RetryRule()  # the default base delay back, as for an assignment
    with pytest.raises(pydantic.ValidationError, match="max_tokens"):
        Budget(max_tokens=10).model_copy(update={"max_tokens": -1})
    with pytest.raises(pydantic.ValidationError, match="base_delay_seconds"):
        RetryRule(max_delay_seconds=5).model_copy(update={"base_delay_seconds": 10})
    policy = Policy(retry=RetryRule(max_attempts=2))
    assert policy.model_copy(update={"retry": RetryRule(max_attempts=5)}).retry.max_attempts == 5  # type: ignore[union-attr]
    assert policy.model_copy() == policy and policy.model_copy(deep=True) == policy

    class OwnedBudget(Budget):
        _owner: str = pydantic.PrivateAttr("nobody")

    owned = OwnedBudget(max_tokens=10)
    owned._owner = "alice"
    for deep in (False, True):  # a subclass's private attributes are copied, as pydantic's copy does
        assert owned.model_copy(update={"max_tokens": 20}, deep=deep)._owner == "alice"


def test_a_retry_rule_of_one_attempt_takes_a_base_delay_above_its_cap_it_never_waits(traced) -> None:
    """No retry, no delay to cap (as @step(retry=0) takes any retry_delay): it was refused. The
    rule made to retry is refused then."""
    rule = RetryRule(max_attempts=1, base_delay_seconds=120, max_delay_seconds=60)
    assert RetryRule(**rule.model_dump()) == rule

    @step
    def flaky() -> None:
        raise ConnectionError("blip")

    @run(policy=Policy(retry=rule))
    def main() -> None:
        flaky()

    with pytest.raises(ConnectionError):
        main()
    assert traced.clock.sleeps == []
    with pytest.raises(pydantic.ValidationError, match=r"base_delay_seconds .*120.*max_delay_seconds.*60"):
        rule.max_attempts = 2
    assert rule.max_attempts == 1


def test_budget_exceeded_inside_a_step_is_not_retried(traced) -> None:
    calls = {"n": 0}

    @step
    def inner() -> None:
        pass

    @step(retry=3, retry_delay=0)
    def outer() -> None:
        calls["n"] += 1
        inner()

    @run(budget=Budget(max_steps=1))
    def main() -> None:
        outer()

    with pytest.raises(BudgetExceededError):
        main()
    assert calls["n"] == 1


class AuthenticationError(Exception):
    """Shaped like the OpenAI and Anthropic SDKs' error of a bad API key."""


def test_authentication_errors_are_not_retried(traced) -> None:
    calls = {"n": 0}

    @step(retry=3, retry_delay=0)
    def call_api() -> None:
        calls["n"] += 1
        raise AuthenticationError("invalid api key")

    @run
    def main() -> None:
        call_api()

    with pytest.raises(AuthenticationError):
        main()
    assert calls["n"] == 1


def test_steps_without_a_policy_record_the_proceed_decision(traced) -> None:
    @step
    def work() -> None:
        pass

    @run
    def main() -> None:
        work()

    main()
    assert attrs_of(traced, "step work")[0][attr.POLICY_DECISION] == "proceed"


def test_the_step_model_says_which_decision_let_the_step_through_as_its_span_does(traced) -> None:
    decisions: list[str | None] = []

    def note() -> None:
        decisions.append(get_current_step_context().step.policy_decision)

    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        note()

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        step(name="work")(note)()
        ask()
        ask()

    main()
    assert decisions == ["proceed", "proceed", "wait"]
    assert [a[attr.POLICY_DECISION] for a in attrs_of(traced, "chat m")] == ["proceed", "wait"]


def test_step_error_still_wraps_retryable_failures(traced) -> None:
    @step(retry=1, retry_delay=0)
    def flaky() -> None:
        raise ConnectionError("x")

    @run
    def main() -> None:
        flaky()

    with pytest.raises(StepError):
        main()


def test_a_probe_refused_by_the_budget_does_not_keep_the_circuit_half_open(traced) -> None:
    fail = {"on": True}

    @step
    def fetch() -> str:
        if fail["on"]:
            raise ConnectionError("down")
        return "ok"

    @step
    def other() -> None:
        pass

    @run(budget=Budget(max_steps=3), policy=breaker_policy())
    def first_run() -> None:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch()
        other()
        traced.clock.now += 31  # half-open: the next fetch claims the probe, then the budget refuses it
        fetch()

    with pytest.raises(BudgetExceededError):
        first_run()

    fail["on"] = False

    @run(policy=breaker_policy())
    def second_run() -> str:
        return fetch()  # the probe was given back: this call may probe, and closes the circuit

    assert second_run() == "ok"


def test_steps_named_per_call_do_not_pile_up_circuits_and_open_ones_are_kept(traced, monkeypatch) -> None:
    from multirun.enforcement import policy as policy_module

    monkeypatch.setattr(policy_module, "MAX_BREAKERS", 50)

    @step
    def fetch() -> None:
        raise ConnectionError("down")

    def lookup(i: int) -> int:
        return i

    @run(policy=breaker_policy())
    def main() -> str:
        for _ in range(2):  # its circuit opens
            with pytest.raises(ConnectionError):
                fetch()
        for i in range(500):  # a tool step named after its argument
            step(name=f"lookup:{i}")(lookup)(i)
        try:
            fetch()
        except PolicyViolation as exc:
            return exc.rule
        return "ran"

    engines = []

    @run(policy=breaker_policy())
    def long_run() -> None:
        from multirun.context import get_current_run_context

        engines.append(get_current_run_context().policy_engine)
        for i in range(500):
            step(name=f"lookup:{i}")(lookup)(i)

    assert main() == "circuit_breaker"  # the open circuit was not forgotten
    long_run()
    assert len(traced.client.policy_state._breakers) <= 50  # the client's, across runs
    assert len(engines[0]._breakers) <= 50  # and one run's view of them


# ---------------------------------------------------------------------------
# a step interrupted while it waits; errors that say nothing of the dependency


def test_a_probe_cancelled_while_it_waits_for_its_slot_gives_the_probe_back(traced) -> None:
    down = {"on": True}

    @step(kind=StepKind.LLM_CALL, model="m")
    async def ask() -> str:
        if down["on"]:
            raise ConnectionError("down")
        return "ok"

    async def hang(seconds: float) -> None:
        await asyncio.sleep(3600)  # a real wait, so that the cancellation lands in it

    instant_sleep = traced.clock.async_sleep

    @run(
        policy=Policy(
            circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
            rate_limit=RateLimitRule(requests_per_minute=1),
        )
    )
    async def main() -> str:
        with pytest.raises(ConnectionError):
            await ask()  # the circuit opens
        traced.clock.now += 31  # half-open: the next call is the probe; its slot is 29 s away
        traced.clock.async_sleep = hang  # type: ignore[method-assign]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ask(), timeout=0.05)  # cancelled while it waits
        traced.clock.async_sleep = instant_sleep  # type: ignore[method-assign]
        down["on"] = False
        return await ask()  # the probe was given back: this call probes, and closes the circuit

    assert asyncio.run(main()) == "ok"
    spans = attrs_of(traced, "chat m")
    assert len(spans) == 3  # the cancelled call's span was ended too
    assert spans[1][attr.STEP_STATUS] == "failed"
    assert spans[1]["error.type"].endswith("CancelledError")


def test_a_step_cancelled_in_its_backoff_ends_its_span(traced) -> None:
    @step(retry=1, retry_delay=5)
    async def fetch() -> None:
        raise ConnectionError("down")

    async def hang(seconds: float) -> None:
        await asyncio.sleep(3600)

    @run
    async def main() -> None:
        traced.clock.async_sleep = hang  # type: ignore[method-assign]
        await asyncio.wait_for(fetch(), timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
    ended = dict(traced.span("step fetch").attributes or {})
    assert ended[attr.STEP_STATUS] == "failed"
    assert ended["error.type"].endswith("CancelledError")


def test_an_interrupt_during_a_rate_limit_wait_ends_the_step_span(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        ask()
        traced.clock.sleep = interrupted  # type: ignore[method-assign]
        ask()  # waits 1 s for its slot, and is interrupted there

    with pytest.raises(KeyboardInterrupt):
        main()
    waited = attrs_of(traced, "chat m")[1]
    assert waited[attr.POLICY_DECISION] == "wait"
    assert waited[attr.STEP_STATUS] == "failed"
    assert waited["error.type"] == "KeyboardInterrupt"


def test_a_step_interrupted_while_it_waits_for_its_slot_gives_the_slot_back(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        ask()  # the slot at 0 s
        sleep = traced.clock.sleep
        traced.clock.sleep = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            ask()  # reserves the slot at 1 s, and is interrupted while it waits: it never runs
        traced.clock.sleep = sleep  # type: ignore[method-assign]
        ask()

    main()
    # the slot at 1 s was not used: the next call has it, instead of waiting for the one at 2 s
    assert attrs_of(traced, "chat m")[2][attr.POLICY_WAIT_SECONDS] == 1.0


async def test_a_step_cancelled_while_it_waits_gives_its_slot_back_for_a_slot_or_a_retry(traced) -> None:
    down = {"on": False}
    hang_longer_than = {"seconds": 0.0}

    @step(kind=StepKind.LLM_CALL, model="m", retry=1, retry_delay=5)
    async def ask() -> None:
        if down["on"]:
            raise ConnectionError("down")

    async def sleep(seconds: float) -> None:
        if seconds > hang_longer_than["seconds"]:
            await asyncio.sleep(3600)  # a real wait, so that the cancellation lands in it
        traced.clock.now += seconds

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    async def main() -> None:
        traced.clock.async_sleep = sleep  # type: ignore[method-assign]
        await ask()  # the slot at 0 s
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ask(), timeout=0.05)  # cancelled while it waits for the slot at 1 s
        down["on"], hang_longer_than["seconds"] = True, 1.0
        with pytest.raises(asyncio.TimeoutError):
            # the slot at 1 s again; it fails there, and is cancelled in its backoff (its retry's slot: 6 s)
            await asyncio.wait_for(ask(), timeout=0.05)
        down["on"], hang_longer_than["seconds"] = False, float("inf")
        await ask()

    await main()
    # neither cancelled wait used its slot: the last call has the one at 2 s, not the one at 7 s
    waits = [a.get(attr.POLICY_WAIT_SECONDS) for a in attrs_of(traced, "chat m")]
    assert waits == [None, 1.0, 1.0, 1.0]


async def test_calls_cancelled_together_while_they_wait_give_every_slot_back(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    async def ask() -> None:
        pass

    async def sleep(seconds: float) -> None:
        traced.clock.sleeps.append(seconds)
        await asyncio.sleep(3600)  # a real wait, so that the cancellation lands in it

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    async def main() -> None:
        await ask()  # the slot at 0 s
        traced.clock.async_sleep = sleep  # type: ignore[method-assign]
        with pytest.raises(asyncio.TimeoutError):
            # the slots at 1, 2, 3, 4 and 5 s; the batch times out, cancelled in the order it began
            await asyncio.wait_for(asyncio.gather(*(ask() for _ in range(5))), timeout=0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ask(), timeout=0.05)

    await main()
    # none of the five used its slot: the next call waits for the one at 1 s, not the one at 5 s
    assert traced.clock.sleeps == [1.0, 2.0, 3.0, 4.0, 5.0, 1.0]


def test_a_cancelled_call_does_not_count_as_a_failure_of_the_dependency(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="big")
    async def ask(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "answer"

    @run(
        policy=Policy(
            circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
            graceful_degradation=GracefulDegradationRule(
                trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=1, fallback_model="small"
            ),
        )
    )
    async def main() -> str:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ask(10), timeout=0.01)  # the caller gave up, the model did not fail
        return await ask(0)

    assert asyncio.run(main()) == "answer"
    assert attrs_of(traced, "chat big")[1][attr.POLICY_DECISION] == "proceed"


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="asyncio.TaskGroup is Python 3.11+")
def test_a_budget_refusal_inside_an_exception_group_is_not_retried(traced) -> None:
    calls = {"n": 0}

    @step
    async def leaf() -> None:
        pass

    @step(retry=3, retry_delay=1)
    async def fan_out() -> None:
        calls["n"] += 1
        async with asyncio.TaskGroup() as group:
            group.create_task(leaf())
            group.create_task(leaf())

    @run(budget=Budget(max_steps=2))
    async def main() -> None:
        await fan_out()

    with pytest.raises(BaseException) as raised:
        asyncio.run(main())
    assert not isinstance(raised.value, StepError)
    assert raised.value.subgroup(BudgetExceededError) is not None  # type: ignore[attr-defined]
    assert calls["n"] == 1
    assert traced.clock.sleeps == []


# ---------------------------------------------------------------------------
# a sub-run waits and retries within its parent's limits


def test_retries_in_a_sub_run_stop_at_the_parents_deadline(traced) -> None:
    started: list[float] = []

    @step(retry=3, retry_delay=8)
    def flaky() -> None:
        started.append(traced.clock.now)
        raise ConnectionError("blip")

    @run
    def child() -> None:
        flaky()

    @run(budget=Budget(max_duration_seconds=10))
    def parent() -> None:
        child()

    with pytest.raises(StepError):
        parent()
    assert [t - started[0] for t in started] == [0, 8]  # a third attempt would start at 16 s


def test_a_rate_limit_wait_in_a_sub_run_past_the_parents_deadline_aborts(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=4)))
    def child() -> None:
        ask()
        ask()  # the next slot is 15 s away, past the parent's 10 s

    @run(budget=Budget(max_duration_seconds=10))
    def parent() -> None:
        child()

    with pytest.raises(PolicyViolation, match="rate_limit"):
        parent()
    assert traced.clock.sleeps == []


def test_retries_in_a_sub_run_stop_once_the_parents_budget_is_spent(traced) -> None:
    calls = {"n": 0}

    @step(retry=3, retry_delay=1)
    def expensive() -> None:
        calls["n"] += 1
        multirun.report_usage("m", input_tokens=150, cost_usd=0.0)
        raise ConnectionError("blip")

    @run
    def child() -> None:
        expensive()

    @run(budget=Budget(max_tokens=100))
    def parent() -> None:
        child()

    with pytest.raises(StepError):
        parent()
    assert calls["n"] == 1


def test_a_retry_whose_backoff_ends_at_the_deadline_is_not_made(traced) -> None:
    calls = {"n": 0}

    @step(retry=1, retry_delay=10)
    def flaky() -> None:
        calls["n"] += 1
        raise ConnectionError("blip")

    @run(budget=Budget(max_duration_seconds=10))
    def main() -> None:
        flaky()

    with pytest.raises(StepError):
        main()
    assert calls["n"] == 1  # at 10 of 10 seconds a new step would be refused too


def test_a_failure_whose_retry_the_deadline_stops_counts_once_towards_the_circuit(traced) -> None:
    calls = {"n": 0}

    @step(retry=1, retry_delay=10)
    def flaky() -> None:
        calls["n"] += 1
        raise ConnectionError("blip")

    @run(budget=Budget(max_duration_seconds=10), policy=breaker_policy())
    def main() -> None:
        with pytest.raises(StepError):
            flaky()  # one failure of two: the circuit stays closed
        with pytest.raises(StepError):
            flaky()

    main()
    assert calls["n"] == 2


def test_a_failure_whose_retry_the_deadline_stops_counts_once_towards_degradation(traced) -> None:
    seen_models: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="primary", retry=1, retry_delay=10)
    def ask() -> None:
        seen_models.append(get_current_step_context().model)
        raise TimeoutError("model overloaded")

    policy = Policy(
        graceful_degradation=GracefulDegradationRule(
            fallback_model="fallback", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=2
        )
    )

    @run(budget=Budget(max_duration_seconds=10), policy=policy)
    def main() -> None:
        for _ in range(2):
            with pytest.raises(StepError):
                ask()

    main()
    assert seen_models == ["primary", "primary"]  # two failures in a row: the third call degrades


# ---------------------------------------------------------------------------
# retry attempts ask the policy like any call


def test_retry_attempts_of_an_llm_step_are_paced_by_the_rate_limit(traced) -> None:
    calls: list[float] = []

    @step(kind=StepKind.LLM_CALL, model="m", retry=2, retry_delay=0)
    def ask() -> None:
        calls.append(traced.clock.now)
        if len(calls) < 3:
            raise ConnectionError("blip")

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        ask()

    main()
    assert [t - calls[0] for t in calls] == [0, 1, 2]  # one request a second, retries included


def test_a_retry_that_waits_for_its_slot_shows_the_wait_on_its_span(traced) -> None:
    calls: list[float] = []

    @step(kind=StepKind.LLM_CALL, model="m", retry=1, retry_delay=2)
    def ask() -> None:
        calls.append(traced.clock.now)
        if len(calls) == 1:
            raise ConnectionError("blip")

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=6)))
    def main() -> None:
        ask()

    main()
    assert calls[1] - calls[0] == 10  # its slot starts 10 s after the first: 8 s past its backoff
    [span] = attrs_of(traced, "chat m")
    assert (span[attr.POLICY_DECISION], span[attr.POLICY_RULE]) == ("wait", "rate_limit")
    assert span[attr.POLICY_WAIT_SECONDS] == 8.0


def test_a_half_open_probe_with_retries_sends_exactly_one_request(traced) -> None:
    calls = {"n": 0}

    @step(retry=5, retry_delay=0)
    def fetch() -> None:
        calls["n"] += 1
        raise ConnectionError("down")

    @run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2, recovery_time_seconds=30)))
    def main() -> None:
        with pytest.raises(PolicyViolation, match="circuit"):
            fetch()  # two attempts open the circuit; the third is not sent
        assert calls["n"] == 2
        traced.clock.now += 31
        with pytest.raises(PolicyViolation, match="circuit"):
            fetch()  # the probe fails: open again, no retry behind it

    main()
    assert calls["n"] == 3


def test_a_retry_whose_backoff_ends_after_the_recovery_time_probes_the_circuit(traced) -> None:
    calls: list[float] = []

    @step(retry=1, retry_delay=40)
    def fetch() -> str:
        calls.append(traced.clock.now)
        if len(calls) == 1:
            raise ConnectionError("down")  # opens the circuit
        return "ok"

    @run(policy=Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30)))
    def main() -> str:
        return fetch()

    assert main() == "ok"  # the retry starts 40 s later, when the circuit is half-open: it is the probe
    assert [t - calls[0] for t in calls] == [0, 40]


async def test_a_retry_does_not_go_through_a_circuit_that_opened_during_its_backoff(traced) -> None:
    calls: list[str] = []
    in_backoff, go_on = asyncio.Event(), asyncio.Event()

    @step(retry=1, retry_delay=10)
    async def fetch(who: str) -> None:
        calls.append(who)
        raise ConnectionError("down")

    async def backoff(seconds: float) -> None:
        in_backoff.set()
        await go_on.wait()
        traced.clock.now += seconds

    @run(policy=breaker_policy())
    async def main() -> None:
        traced.clock.async_sleep = backoff  # type: ignore[method-assign]
        first = asyncio.create_task(fetch("a"))
        await in_backoff.wait()  # "a" failed once, and waits out its backoff
        with pytest.raises(PolicyViolation, match="circuit"):
            await fetch("b")  # the second failure in a row opens the circuit
        go_on.set()
        with pytest.raises(PolicyViolation, match="circuit") as info:
            await first  # its retry, due 10 s later, finds the circuit open
        assert isinstance(info.value.__cause__, ConnectionError)

    await main()
    assert calls == ["a", "b"]
    first_span = attrs_of(traced, "step fetch")[0]
    assert (first_span[attr.POLICY_DECISION], first_span[attr.POLICY_RULE]) == ("abort", "circuit_breaker")


async def test_a_step_that_waited_for_its_slot_does_not_go_through_a_circuit_that_opened_meanwhile(
    traced,
) -> None:
    calls: list[str] = []
    inside, fail = asyncio.Event(), asyncio.Event()
    waiting, go_on = asyncio.Event(), asyncio.Event()

    @step(kind=StepKind.LLM_CALL, model="m")
    async def ask(who: str) -> None:
        calls.append(who)
        if who == "a":
            inside.set()
            await fail.wait()
        raise ConnectionError("down")

    async def slot_wait(seconds: float) -> None:
        waiting.set()
        await go_on.wait()
        traced.clock.now += seconds

    policy = Policy(
        rate_limit=RateLimitRule(requests_per_minute=60),
        circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
    )

    @run(policy=policy)
    async def main() -> None:
        traced.clock.async_sleep = slot_wait  # type: ignore[method-assign]
        a = asyncio.create_task(ask("a"))  # the slot at 0 s
        await inside.wait()
        b = asyncio.create_task(ask("b"))  # the slot at 1 s: waits for it while the circuit is closed
        await waiting.wait()
        fail.set()
        with pytest.raises(ConnectionError):
            await a  # opens the circuit
        go_on.set()
        with pytest.raises(PolicyViolation, match="circuit"):
            await b

    await main()
    assert calls == ["a"]
    refused = attrs_of(traced, "chat m")[1]
    assert (refused[attr.POLICY_DECISION], refused[attr.POLICY_RULE]) == ("abort", "circuit_breaker")


def test_exponential_backoff_over_many_attempts_stays_at_its_cap() -> None:
    from multirun.decorators import backoff_delay

    assert backoff_delay(BackoffStrategy.EXPONENTIAL, 0.5, 1.0, 5000) == 1.0


def test_a_rate_limit_for_an_empty_model_name_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="model"):
        RateLimitRule(requests_per_minute=60, model="")


def test_a_circuit_opened_after_the_shared_table_was_pruned_is_seen_by_other_runs(
    traced, monkeypatch
) -> None:
    from multirun.enforcement import policy as policy_module

    monkeypatch.setattr(policy_module, "MAX_BREAKERS", 50)
    down = {"on": False}
    calls: list[str] = []

    @step
    def fetch(who: str) -> None:
        calls.append(who)
        if down["on"]:
            raise ConnectionError("down")

    def lookup(i: int) -> int:
        return i

    policy = breaker_policy()

    @run(policy=policy)
    def tools_run() -> None:
        for i in range(60):  # fills the shared table past MAX_BREAKERS: it is pruned
            step(name=f"lookup:{i}")(lookup)(i)

    @run(policy=policy)
    def other_run() -> str:
        try:
            fetch("B")
        except PolicyViolation:
            return "refused"
        return "called"

    @run(policy=policy)
    def long_run() -> str:
        fetch("A")  # this run now knows the healthy circuit of fetch
        tools_run()
        down["on"] = True
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch("A")  # opens the circuit
        return other_run()

    assert long_run() == "refused"
    assert calls == ["A", "A", "A"]


def test_a_probe_that_succeeds_after_the_shared_table_was_pruned_closes_the_circuit(
    traced, monkeypatch
) -> None:
    from multirun.enforcement import policy as policy_module

    monkeypatch.setattr(policy_module, "MAX_BREAKERS", 50)
    down = {"on": True}

    def lookup(i: int) -> int:
        return i

    @step
    def fetch() -> str:
        if down["on"]:
            raise ConnectionError("down")
        for i in range(60):  # tool steps named per call: the shared table is pruned meanwhile
            step(name=f"lookup:{i}")(lookup)(i)
        return "ok"

    @run(policy=breaker_policy())
    def main() -> list[str]:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch()
        traced.clock.now += 31
        down["on"] = False
        return [fetch(), fetch()]  # the probe closes the circuit: the next call goes through

    assert main() == ["ok", "ok"]


def test_retries_of_a_step_with_check_budget_false_go_on_after_the_budget_is_spent(traced) -> None:
    attempts = {"n": 0}

    @step
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100)

    @step(check_budget=False, retry=2, retry_delay=0)
    def save() -> str:  # must run however much was spent: the results are paid for
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionError("blip")
        return "saved"

    @run(budget=Budget(max_tokens=100))
    def main() -> str:
        ask()  # spends the whole budget
        return save()

    assert main() == "saved"
    assert attempts["n"] == 3


def test_a_step_with_check_budget_false_waits_and_retries_past_the_deadline(traced) -> None:
    attempts: list[float] = []

    @step(kind=StepKind.LLM_CALL, model="m")
    def ask() -> None:
        pass

    @step(kind=StepKind.LLM_CALL, model="m", check_budget=False, retry=1, retry_delay=20)
    def summarize() -> str:
        attempts.append(traced.clock.now)
        if len(attempts) == 1:
            raise ConnectionError("blip")
        return "summary"

    @run(
        budget=Budget(max_duration_seconds=10),
        policy=Policy(rate_limit=RateLimitRule(requests_per_minute=4)),
    )
    def main() -> str:
        ask()
        return summarize()  # its slot is 15 s away, past the 10 s deadline; its retry 20 s later

    assert main() == "summary"
    assert [t - 1000 for t in attempts] == [15, 35]


# ---------------------------------------------------------------------------
# sub-runs without a policy of their own


def test_a_rate_limit_set_on_the_top_run_paces_the_llm_calls_of_its_sub_runs(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> None:
        pass

    @run
    def researcher() -> None:
        ask()
        ask()

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        ask()
        researcher()  # no policy of its own: the parent's window paces it

    main()
    assert traced.clock.sleeps == [1.0, 1.0]
    assert [a[attr.POLICY_DECISION] for a in attrs_of(traced, "chat gpt-4o")] == ["proceed", "wait", "wait"]


def test_a_sub_run_without_a_policy_shares_its_parents_circuit_retry_rule_and_degradation(traced) -> None:
    seen: list[str | None] = []
    calls = {"fetch": 0}

    @step
    def fetch() -> None:
        calls["fetch"] += 1
        raise ConnectionError("down")

    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask(fail: bool) -> None:
        seen.append(get_current_step_context().model)
        if fail:
            raise TimeoutError("slow")

    @run
    def inner(fail: bool) -> None:
        ask(fail)

    @run  # no policy either: the nearest run with one governs it
    def worker() -> list[str]:
        outcomes = []
        for _ in range(2):
            try:
                fetch()
            except PolicyViolation as refused:  # the circuit the first attempt opened
                outcomes.append(refused.rule)
        return outcomes

    policy = Policy(
        circuit_breaker=CircuitBreakerRule(
            failure_threshold=1, recovery_time_seconds=30, excluded_errors=(TimeoutError,)
        ),
        retry=RetryRule(max_attempts=2, backoff=BackoffStrategy.CONSTANT, base_delay_seconds=1),
        graceful_degradation=GracefulDegradationRule(
            fallback_model="gpt-4o-mini", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=1
        ),
    )

    @run(policy=policy)
    def main() -> list[str]:
        @run
        def middle() -> list[str]:
            return worker()

        outcome = middle()
        with pytest.raises((TimeoutError, StepError)):
            inner(True)  # switches the run tree to the fallback model
        inner(False)
        return outcome

    # the RetryRule's retry, and the next call, refused by the circuit the first attempt opened
    assert main() == ["circuit_breaker", "circuit_breaker"]
    assert calls["fetch"] == 1
    assert seen[-1] == "gpt-4o-mini"  # the parent's degradation switch, flipped in a sub-run


def test_a_sub_run_without_a_policy_shows_the_policy_that_governs_it(traced) -> None:
    # its Run model said policy=None while its parent's rate limit paced it
    policy = Policy(rate_limit=RateLimitRule(requests_per_minute=60))
    own = Policy(retry=RetryRule(max_attempts=2))

    @run
    def researcher() -> Policy | None:
        return get_current_run_context().run.policy

    @run(policy=own)
    def reviewer() -> Policy | None:
        return get_current_run_context().run.policy

    @run(policy=policy)
    def main() -> list[Policy | None]:
        @run
        def middle() -> Policy | None:
            return researcher()  # two levels down: still the top run's

        return [researcher(), middle(), reviewer()]

    assert main() == [policy, policy, own]
    assert main()[0] is policy  # the same rules, not a copy that could differ
    assert researcher() is None  # a top run without a policy has none


def test_a_sub_run_with_a_policy_of_its_own_keeps_it(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> None:
        pass

    @run(policy=Policy(retry=RetryRule(max_attempts=2)))  # no rate limit in its own policy
    def researcher() -> None:
        ask()
        ask()

    @run(policy=Policy(rate_limit=RateLimitRule(requests_per_minute=60)))
    def main() -> None:
        researcher()

    main()
    assert traced.clock.sleeps == []
