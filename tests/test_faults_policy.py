"""Budget and policy under pressure (issue 8, cases 9-14): races, clock jumps, retries that must not
happen, half-open circuits, unpriced models and degradation that must not flap."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multirun
from multirun import run, step
from multirun.checkpoints.store import CheckpointStore
from multirun.clock import Clock
from multirun.context import get_current_run_context, get_current_step_context
from multirun.enforcement.ledger import RunLedger
from multirun.enforcement.policy import RateLimiter
from multirun.enforcement.redis_ledger import LedgerUnavailableError
from multirun.errors import BudgetExceededError, PolicyViolation
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import CircuitBreakerRule, DegradationTrigger, GracefulDegradationRule
from multirun.pricing import COST_UNITS_PER_USD
from multirun.telemetry import attributes as attr

if TYPE_CHECKING:
    from redis_server import RedisServer

pytest_plugins = ["redis_server"]

# ---------------------------------------------------------------------------
# 9. threads and asyncio tasks racing every limit


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.sampled_from(["max_tokens", "max_cost_usd", "max_steps"]),
    per_step=st.integers(min_value=1, max_value=1_000),
    steps_to_limit=st.integers(min_value=1, max_value=60),
    threads=st.integers(min_value=2, max_value=8),
)
def test_9_threads_racing_any_limit_leave_exact_totals_and_overshoot_below_the_steps_in_flight(
    limit: str, per_step: int, steps_to_limit: int, threads: int
) -> None:
    cost_units = per_step * 1_000  # nano-dollars
    maximum = {
        "max_tokens": per_step * steps_to_limit,
        "max_cost_usd": cost_units * steps_to_limit / COST_UNITS_PER_USD,
        "max_steps": steps_to_limit,
    }[limit]
    ledger = RunLedger(budget=Budget(**{limit: maximum}))
    barrier = threading.Barrier(threads)

    def worker() -> int:
        barrier.wait()
        done = 0
        while True:
            try:
                ledger.begin_step()
            except BudgetExceededError as exc:
                assert exc.limit == limit
                return done
            ledger.charge(per_step, cost_units)
            done += 1

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda _: worker(), range(threads)))
    assert (ledger.steps, ledger.tokens, ledger.cost_units) == (total, total * per_step, total * cost_units)
    if limit == "max_steps":
        assert total == steps_to_limit  # counted and checked under one lock: exact
    else:
        assert steps_to_limit <= total <= steps_to_limit + threads - 1


@settings(max_examples=25, deadline=None)
@given(steps_to_limit=st.integers(min_value=1, max_value=60), threads=st.integers(min_value=2, max_value=8))
def test_9_threads_stepping_in_sub_runs_hold_the_parents_max_steps_exactly(
    steps_to_limit: int, threads: int
) -> None:
    parent = RunLedger(budget=Budget(max_steps=steps_to_limit))
    children = [RunLedger(parent) for _ in range(2)]  # two sibling sub-runs share the parent's limit
    barrier = threading.Barrier(threads)

    def worker(i: int) -> int:
        barrier.wait()
        done = 0
        while True:
            try:
                children[i % 2].begin_step()
            except BudgetExceededError:
                return done
            done += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: between check and count too
    try:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(worker, range(threads)))
    finally:
        sys.setswitchinterval(interval)
    assert parent.steps == total == steps_to_limit


def test_9_threads_each_running_asyncio_tasks_share_one_exact_budget(traced: Any) -> None:
    @step
    async def spend() -> None:
        await asyncio.sleep(0)  # let the other tasks begin their steps before this one charges
        multirun.report_usage("m", output_tokens=3, cost_usd=0.000_001)

    async def tasks(n: int) -> int:
        async def one() -> int:
            done = 0
            while True:
                try:
                    await spend()
                except BudgetExceededError:
                    return done
                done += 1

        return sum(await asyncio.gather(*(one() for _ in range(n))))

    @run(budget=Budget(max_steps=1_000))
    def main() -> tuple[int, int, float, int]:
        with ThreadPoolExecutor(4) as pool:
            done = sum(pool.map(lambda _: asyncio.run(tasks(10)), range(4)))
        ctx = get_current_run_context()
        return done, ctx.tokens_used, ctx.cost_usd, ctx.ledger.steps

    done, tokens, cost, steps = main()
    assert done == steps == 1_000
    assert tokens == 3_000
    assert cost == pytest.approx(0.001, abs=1e-12)


# ---------------------------------------------------------------------------
# 10. the wall clock jumps


@pytest.fixture
def wall_clock_set_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the system clock reads a day earlier than it did: someone set it back."""
    real_time, real_time_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() - 86_400)
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 86_400 * 10**9)


def test_10_a_duration_limit_runs_out_on_time_when_the_wall_clock_is_set_back(
    traced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced.client.clock = Clock()  # real time for this test
    real_time = time.time

    @step
    def work() -> None:
        pass

    @run(budget=Budget(max_duration_seconds=0.2))
    def main() -> None:
        work()
        monkeypatch.setattr(time, "time", lambda: real_time() - 86_400)
        time.sleep(0.3)  # past the limit, whatever the wall clock says
        work()

    with pytest.raises(BudgetExceededError, match="max_duration_seconds"):
        main()


def test_10_the_newest_checkpoint_is_found_when_the_wall_clock_is_set_back(
    traced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_time_ns = time.time_ns

    @run
    def main() -> tuple[str, str]:
        ctx = get_current_run_context()
        ctx.set_state("n", 1)
        ctx.checkpoint(name="first")
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 86_400 * 10**9)
        ctx.set_state("n", 2)
        second = ctx.checkpoint(name="second").value.id
        return ctx.run.id, second

    run_id, second = main()
    store: CheckpointStore = traced.client.checkpoints
    assert store.latest(run_id) == second
    assert store.load(store.latest(run_id)).state == {"n": 2}  # resume goes on from the newest


# ---------------------------------------------------------------------------
# 12. a half-open circuit lets exactly one concurrent probe through


def breaker(**kwargs: Any) -> Policy:
    return Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=2, recovery_time_seconds=30, **kwargs))


def test_12_callers_racing_into_a_half_open_circuit_make_exactly_one_probe(traced: Any) -> None:
    state = {"down": True}
    probes: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    @step
    def fetch() -> str:
        if state["down"]:
            raise ConnectionError("down")
        probes.append(threading.current_thread().name)
        inside.set()
        release.wait(30)
        return "ok"

    @run(policy=breaker())
    def main() -> list[str]:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch()
        state["down"] = False
        traced.clock.now += 31  # the recovery time has passed: the next caller probes
        barrier = threading.Barrier(16)

        def caller() -> str:
            barrier.wait()  # all sixteen arrive at the half-open circuit together
            try:
                return fetch()
            except PolicyViolation:
                return "refused"

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(caller) for _ in range(16)]
            assert inside.wait(30)  # one of them is probing, and holds on until released
            finished = 0
            deadline = time.monotonic() + 30
            while finished < 15 and time.monotonic() < deadline:
                finished = sum(f.done() for f in futures)
                time.sleep(0.01)
            release.set()
            return [f.result(30) for f in futures]

    results = main()
    assert len(probes) == 1
    assert sorted(results) == ["ok"] + ["refused"] * 15


async def test_12_asyncio_tasks_at_a_half_open_circuit_make_exactly_one_probe(traced: Any) -> None:
    state = {"down": True}
    probes = 0

    @step
    async def fetch() -> str:
        nonlocal probes
        if state["down"]:
            raise ConnectionError("down")
        probes += 1
        await asyncio.sleep(0.01)  # the other tasks arrive while the probe is in flight
        return "ok"

    async def attempt() -> str:
        try:
            return await fetch()
        except PolicyViolation:
            return "refused"

    @run(policy=breaker())
    async def main() -> list[str]:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await fetch()
        state["down"] = False
        traced.clock.now += 31
        return list(await asyncio.gather(*(attempt() for _ in range(10))))

    results = await main()
    assert probes == 1
    assert sorted(results) == ["ok"] + ["refused"] * 9


def test_12_a_probe_the_ledger_could_not_count_is_given_back(
    traced: Any, fresh_redis_server: RedisServer
) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=fresh_redis_server.url + "?timeout=0.3")
    traced.client = multirun.get_client()
    traced.client.clock = traced.clock
    state = {"down": True}

    @step
    def fetch() -> str:
        if state["down"]:
            raise ConnectionError("down")
        return "ok"

    @run(policy=breaker())
    def first() -> None:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                fetch()
        traced.clock.now += 31  # half-open: the next call claims the probe...
        fresh_redis_server.freeze()  # ...and then the ledger cannot count its step
        try:
            with pytest.raises(LedgerUnavailableError):
                fetch()
        finally:
            fresh_redis_server.thaw()

    first()
    state["down"] = False

    @run(policy=breaker())
    def second() -> str:
        return fetch()  # the probe was given back: this call probes and closes the circuit

    assert second() == "ok"
    assert second() == "ok"


@settings(max_examples=300, deadline=None)
@given(
    calls=st.lists(
        st.tuples(  # (its backoff, whether it runs, the time that passes before the next call)
            st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.5, 4.0]), st.booleans(), st.sampled_from([0.0, 0.3, 1.0])
        ),
        min_size=1,
        max_size=12,
    ),
    order=st.randoms(use_true_random=False),
)
def test_12_slots_given_back_in_any_order_are_free_again_and_never_handed_out_twice(
    calls: list[tuple[float, bool, float]], order: Any
) -> None:
    """Calls reserve slots (some after a backoff), some are refused or cancelled while they wait,
    in any order, as time goes by: no two calls ever hold overlapping slots, and once the unused
    slots are given back the next call starts no later than the first of them still ahead."""
    limiter = RateLimiter(60.0)  # a slot a second
    now, held, unused = 0.0, [], []
    for backoff, used, later in calls:
        _, slot = limiter.reserve(now, now + backoff, float("inf"))  # type: ignore[misc]
        (held if used else unused).append(slot)
        now += later
    order.shuffle(unused)
    for slot in unused:
        limiter.give_back(slot)
    _, slot = limiter.reserve(now, now, float("inf"))  # type: ignore[misc]
    starts = sorted([s.start for s in held] + [slot.start])
    assert all(b - a > 1.0 - 1e-9 for a, b in itertools.pairwise(starts))  # 2.3 - 1.3 < 1.0
    free_again = [s.start for s in unused if s.start >= now]
    if free_again:
        assert slot.start <= min(free_again)


# ---------------------------------------------------------------------------
# 13. a model with no price


def test_13_by_default_an_unpriced_model_counts_its_tokens_and_is_flagged_never_zero(traced: Any) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("my-private-model", input_tokens=70, output_tokens=30)

    @run(budget=Budget(max_tokens=1_000, max_cost_usd=1.0))
    def main() -> tuple[int, float, int]:
        ask()
        ctx = get_current_run_context()
        return ctx.tokens_used, ctx.cost_usd, ctx.ledger.unpriced_reports

    assert main() == (100, 0.0, 1)
    llm = traced.span("chat my-private-model").attributes or {}
    assert llm[attr.UNPRICED] is True
    assert attr.GEN_AI_USAGE_COST_AMOUNT not in llm  # no "$0" anywhere
    assert traced.span("invoke_workflow main").attributes[attr.UNPRICED] is True  # type: ignore[index]


def test_13_unpriced_fail_counts_flags_and_refuses(traced: Any) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")
    calls: list[str] = []

    @step(kind=StepKind.LLM_CALL, retry=3, retry_delay=0)
    def ask(model: str) -> str:
        calls.append(model)
        multirun.report_usage(model, input_tokens=70, output_tokens=30)
        return "answer"

    @run
    def main() -> tuple[str, int]:
        priced = ask("gpt-4o-mini")  # a known price: runs as usual
        try:
            ask("my-private-model")
        except PolicyViolation as exc:
            assert exc.rule == "unpriced"
            assert "my-private-model" in str(exc) and "prices=" in str(exc)
        ctx = get_current_run_context()
        return priced, ctx.tokens_used

    assert main() == ("answer", 200)  # the refused call's tokens were counted
    assert calls == ["gpt-4o-mini", "my-private-model"]  # and it was not retried
    refused = traced.span("chat my-private-model")
    assert refused.attributes[attr.STEP_STATUS] == "failed"  # type: ignore[index]
    assert refused.attributes[attr.UNPRICED] is True  # type: ignore[index]


def test_13_unpriced_fail_accepts_a_cost_given_by_the_provider(traced: Any) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("my-private-model", input_tokens=10, cost_usd=0.002)

    @run
    def main() -> float:
        ask()
        return get_current_run_context().cost_usd

    assert main() == pytest.approx(0.002)


@pytest.mark.parametrize("value", ["FAIL", "strict", 1, True])
def test_13_unpriced_accepts_only_flag_or_fail(traced: Any, value: Any) -> None:
    from multirun.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="unpriced must be one of flag, fail"):
        multirun.init(tracer_provider=traced.provider, unpriced=value)


# ---------------------------------------------------------------------------
# 14. degradation switches once and never flaps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(outcomes=st.lists(st.booleans(), min_size=1, max_size=30), threshold=st.integers(1, 4))
def test_14_after_threshold_failures_in_a_row_every_later_llm_step_uses_the_fallback(
    traced: Any, outcomes: list[bool], threshold: int
) -> None:
    seen: list[str | None] = []

    @step(kind=StepKind.LLM_CALL, model="primary")
    def ask(ok: bool) -> str:
        seen.append(get_current_step_context().model)
        if not ok:
            raise TimeoutError("overloaded")  # the fallback model fails too, sometimes
        return "answer"

    policy = Policy(
        graceful_degradation=GracefulDegradationRule(
            fallback_model="fallback", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=threshold
        )
    )

    @run(policy=policy)
    def main() -> None:
        for ok in outcomes:
            with contextlib.suppress(TimeoutError):
                ask(ok)

    main()
    # expected: the primary model until `threshold` failures in a row, then the fallback for good
    expected: list[str] = []
    in_a_row, degraded = 0, False
    for ok in outcomes:
        degraded = degraded or in_a_row >= threshold
        expected.append("fallback" if degraded else "primary")
        in_a_row = 0 if ok else in_a_row + 1
    assert seen == expected  # at most one switch, and never back


def test_14_threads_that_cross_the_threshold_together_switch_once(traced: Any) -> None:
    seen: list[str | None] = []
    lock = threading.Lock()

    @step(kind=StepKind.LLM_CALL, model="primary")
    def ask() -> None:
        model = get_current_step_context().model
        with lock:
            seen.append(model)
        multirun.report_usage(model, output_tokens=10, cost_usd=0.0)

    policy = Policy(
        graceful_degradation=GracefulDegradationRule(
            fallback_model="fallback", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=50
        )
    )

    @run(budget=Budget(max_tokens=10_000), policy=policy)
    def main() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: [ask() for _ in range(100)], range(8)))

    main()
    assert len(seen) == 800
    first_fallback = seen.index("fallback")
    # a step that began before the switch may still finish on the primary model; none starts on it after
    assert seen[first_fallback:].count("primary") <= 8
    assert 500 <= seen.count("primary") <= 500 + 8
