"""The context API of reference 002: accessors, RunContext, AgentContext, StepContext."""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import multirun
from multirun import agent, run, step
from multirun import client as client_module
from multirun.context import (
    AgentContext,
    RunContext,
    StepContext,
    get_current_agent_context,
    get_current_client,
    get_current_run_context,
    get_current_step_context,
    has_active_agent,
    has_active_client,
    has_active_run,
)
from multirun.models import AgentStatus, Budget, Run, RunStatus, Step, StepKind, StepStatus


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def is_child(child: Any, parent: Any) -> bool:
    return child.parent is not None and child.parent.span_id == parent.context.span_id


# ---------------------------------------------------------------------------
# accessors


def test_context_accessors_import_as_reference_writes_them() -> None:
    import multirun.context as context

    assert context.get_current_run_context is get_current_run_context
    assert context.get_current_agent_context is get_current_agent_context
    assert context.get_current_client is get_current_client
    assert context.has_active_run is has_active_run
    assert context.has_active_agent is has_active_agent
    assert context.has_active_client is has_active_client


def test_has_active_run_and_agent_are_false_outside_a_run(traced) -> None:
    assert has_active_run() is False
    assert has_active_agent() is False


def test_has_active_client_is_false_when_nothing_configured(monkeypatch) -> None:
    monkeypatch.setattr(client_module, "_configured", None)
    assert has_active_client() is False


def test_has_active_client_is_true_after_init_outside_a_run(traced) -> None:
    assert has_active_client() is True


def test_has_active_run_agent_and_client_are_true_inside_a_run(traced) -> None:
    seen: list[tuple[bool, bool, bool]] = []

    @run
    def main() -> None:
        seen.append((has_active_run(), has_active_agent(), has_active_client()))

    main()
    assert seen == [(True, True, True)]


def test_has_active_agent_is_true_inside_an_agent(traced) -> None:
    seen: list[bool] = []

    @agent
    def worker() -> None:
        seen.append(has_active_agent())

    @run
    def main() -> None:
        worker()

    main()
    assert seen == [True]


def test_get_current_run_context_raises_runtime_error_outside_a_run(traced) -> None:
    with pytest.raises(RuntimeError):
        get_current_run_context()


def test_get_current_agent_context_raises_runtime_error_outside_a_run(traced) -> None:
    with pytest.raises(RuntimeError):
        get_current_agent_context()


def test_get_current_client_raises_runtime_error_when_nothing_configured(monkeypatch) -> None:
    monkeypatch.setattr(client_module, "_configured", None)
    with pytest.raises(RuntimeError):
        get_current_client()


def test_get_current_step_context_raises_runtime_error_outside_a_step(traced) -> None:
    seen: list[str] = []

    @run
    def main() -> None:
        try:
            get_current_step_context()
        except RuntimeError:
            seen.append("raised")

    main()
    assert seen == ["raised"]


def test_accessors_inside_run_return_the_run_its_agent_and_client(traced) -> None:
    seen: dict[str, Any] = {}

    @agent(name="worker")
    def worker() -> None:
        seen["agent"] = get_current_agent_context()
        seen["run_in_agent"] = get_current_run_context()

    @run(name="accessors")
    def main() -> None:
        seen["run"] = get_current_run_context()
        seen["client"] = get_current_client()
        seen["default_agent"] = get_current_agent_context()
        worker()

    main()

    assert isinstance(seen["run"], RunContext)
    assert seen["run"].run.name == "accessors"
    assert seen["run_in_agent"] is seen["run"]
    assert seen["client"] is traced.client
    assert isinstance(seen["agent"], AgentContext)
    assert seen["agent"].agent.name == "worker"
    assert seen["agent"].is_default is False
    assert seen["agent"].run_context is seen["run"]
    assert seen["default_agent"].is_default is True


def test_get_current_step_context_inside_step_is_that_step(traced) -> None:
    seen: list[StepContext] = []

    @step(kind=StepKind.TOOL_CALL)
    def tool() -> None:
        seen.append(get_current_step_context())

    @run
    def main() -> None:
        tool()

    main()
    assert seen[0].step.name == "tool"
    assert seen[0].step.kind is StepKind.TOOL_CALL


async def test_accessors_are_isolated_between_concurrent_runs(traced) -> None:
    import asyncio

    seen: list[tuple[str, str]] = []

    def make(name: str) -> Any:
        @run(name=name)
        async def body() -> None:
            await asyncio.sleep(0)
            seen.append((name, get_current_run_context().run.name))
            await asyncio.sleep(0)
            seen.append((name, get_current_run_context().run.name))

        return body

    await asyncio.gather(make("a")(), make("b")())
    assert sorted(seen) == [("a", "a"), ("a", "a"), ("b", "b"), ("b", "b")]


# ---------------------------------------------------------------------------
# state


def test_set_state_then_get_state_returns_value(traced) -> None:
    seen: list[Any] = []

    @run
    def main() -> None:
        ctx = get_current_run_context()
        ctx.set_state("results", [1, 2])
        ctx.set_state("iteration", 5)
        seen.append((ctx.get_state("results"), ctx.get_state("iteration")))

    main()
    assert seen == [([1, 2], 5)]


def test_get_state_returns_default_for_missing_key(traced) -> None:
    seen: list[Any] = []

    @run
    def main() -> None:
        ctx = get_current_run_context()
        seen.append((ctx.get_state("iteration", default=0), ctx.get_state("nothing")))

    main()
    assert seen == [(0, None)]


def test_state_set_in_one_step_is_seen_in_the_next(traced) -> None:
    @step
    def write() -> None:
        get_current_run_context().set_state("k", "v")

    @step
    def read() -> str:
        return get_current_run_context().get_state("k")

    @run
    def main() -> str:
        write()
        return read()

    assert main() == "v"


def test_agent_state_is_separate_from_run_state(traced) -> None:
    seen: list[Any] = []

    @agent
    def worker() -> None:
        ctx = get_current_agent_context()
        ctx.set_state("key", "agent value")
        seen.append(ctx.get_state("key"))
        seen.append(get_current_run_context().get_state("key", default="none"))

    @run
    def main() -> None:
        worker()

    main()
    assert seen == ["agent value", "none"]


# ---------------------------------------------------------------------------
# RunContext used by hand


async def test_run_context_async_with_exports_completed_run_span(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        assert get_current_run_context() is ctx
        assert has_active_run() is True

    assert has_active_run() is False
    a = attrs(traced.span("invoke_workflow x"))
    assert a["multirun.run.status"] == "completed"
    assert a["multirun.run.id"] == ctx.run.id
    assert ctx.run.status is RunStatus.COMPLETED


def test_run_context_sync_with_exports_completed_run_span(traced) -> None:
    with RunContext(client=traced.client, run=Run(name="y")) as ctx:
        assert get_current_run_context() is ctx

    assert has_active_run() is False
    assert attrs(traced.span("invoke_workflow y"))["multirun.run.status"] == "completed"
    assert ctx.run.status is RunStatus.COMPLETED


def test_run_context_with_exits_failed_on_exception(traced) -> None:
    with pytest.raises(ValueError), RunContext(client=traced.client, run=Run(name="z")) as ctx:
        raise ValueError("inside")

    span = traced.span("invoke_workflow z")
    assert attrs(span)["multirun.run.status"] == "failed"
    assert span.status.status_code is StatusCode.ERROR
    assert ctx.run.status is RunStatus.FAILED
    assert ctx.run.error == "inside"


async def test_decorated_steps_inside_manual_run_context_are_traced(traced) -> None:
    @step
    async def work() -> int:
        return 7

    async with RunContext(client=traced.client, run=Run(name="manual")):
        assert await work() == 7

    assert is_child(traced.span("step work"), traced.span("invoke_workflow manual"))


async def test_start_agent_and_async_with_scopes_agent_span(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(
            name="researcher", agent_config_id="ac_123", metadata={"model": "gpt-4"}
        )
        async with agent_ctx:
            assert get_current_agent_context() is agent_ctx

    agent_span = traced.span("invoke_agent researcher")
    assert is_child(agent_span, traced.span("invoke_workflow x"))
    assert attrs(agent_span)["gen_ai.agent.id"] == agent_ctx.agent.id
    assert attrs(agent_span)["multirun.agent.status"] == "completed"
    assert agent_ctx.agent.status is AgentStatus.COMPLETED
    assert agent_ctx.agent.agent_config_id == "ac_123"
    assert agent_ctx.agent.metadata == {"model": "gpt-4"}
    assert agent_ctx.agent.run_id == ctx.run.id
    assert ctx.agents == [agent_ctx]


async def test_start_step_then_complete_exports_step_span_under_agent(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(name="researcher")
        async with agent_ctx:
            step_ctx = await agent_ctx.start_step(
                name="call_llm",
                kind=StepKind.LLM_CALL,
                input_args=("prompt",),
                input_kwargs={},
            )
            await step_ctx.complete("result", tokens_used=500, cost_usd=0.01)

    step_spans = [s for s in traced.spans() if attrs(s).get("multirun.step.name") == "call_llm"]
    assert len(step_spans) == 1
    span = step_spans[0]
    assert is_child(span, traced.span("invoke_agent researcher"))
    assert attrs(span)["multirun.step.status"] == "completed"
    assert attrs(span)["multirun.tokens_used"] == 500
    assert attrs(span)["multirun.cost_usd"] == pytest.approx(0.01)
    assert step_ctx.step.status is StepStatus.COMPLETED
    assert step_ctx.step.tokens_used == 500
    assert step_ctx.step.cost_usd == pytest.approx(0.01)


async def test_step_complete_updates_agent_and_run_totals(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(name="researcher")
        async with agent_ctx:
            for _ in range(2):
                step_ctx = await agent_ctx.start_step(name="call_llm", kind=StepKind.LLM_CALL)
                await step_ctx.complete("r", tokens_used=500, cost_usd=0.01)

    assert agent_ctx.agent.tokens_used == 1000
    assert agent_ctx.agent.cost_usd == pytest.approx(0.02)
    assert ctx.run.tokens_used == 1000
    assert ctx.run.cost_usd == pytest.approx(0.02)
    assert attrs(traced.span("invoke_agent researcher"))["multirun.tokens_used"] == 1000
    assert attrs(traced.span("invoke_workflow x"))["multirun.tokens_used"] == 1000
    assert [s.name for s in agent_ctx.steps] == ["call_llm", "call_llm"]


async def test_step_complete_without_a_cost_prices_the_tokens_as_output_of_the_steps_model(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = ctx.default_agent
        priced = await agent_ctx.start_step("call_llm", kind=StepKind.LLM_CALL, model="gpt-4o")
        await priced.complete("r", tokens_used=100)
        unknown = await agent_ctx.start_step("call_llm", kind=StepKind.LLM_CALL)  # no model to price
        await unknown.complete("r", tokens_used=100)

    assert priced.cost_usd == pytest.approx(traced.client.prices.cost_usd("gpt-4o", output_tokens=100))
    assert priced.cost_usd > 0
    assert not priced.unpriced
    assert (unknown.cost_usd, unknown.unpriced) == (0.0, True)


async def test_step_fail_marks_step_failed_with_error(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(name="a")
        async with agent_ctx:
            step_ctx = await agent_ctx.start_step(name="flaky")
            await step_ctx.fail(TimeoutError("slow"))

    span = traced.span("step flaky")
    assert attrs(span)["multirun.step.status"] == "failed"
    assert attrs(span)["error.type"] == "TimeoutError"
    assert span.status.status_code is StatusCode.ERROR
    assert step_ctx.step.status is StepStatus.FAILED
    assert step_ctx.step.error == "slow"


async def test_run_complete_completes_agents_and_run(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(name="a")
        await ctx.complete({"answer": 42})

    assert ctx.run.status is RunStatus.COMPLETED
    assert agent_ctx.agent.status is AgentStatus.COMPLETED
    assert json.loads(ctx.run.result) == {"answer": 42}
    assert attrs(traced.span("invoke_workflow x"))["multirun.run.status"] == "completed"
    assert attrs(traced.span("invoke_agent a"))["multirun.agent.status"] == "completed"


async def test_run_fail_fails_active_agents_and_run(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        done_agent = await ctx.start_agent(name="done")
        async with done_agent:
            pass
        active_agent = await ctx.start_agent(name="active")
        await ctx.fail(RuntimeError("gave up"))

    assert ctx.run.status is RunStatus.FAILED
    assert ctx.run.error == "gave up"
    assert active_agent.agent.status is AgentStatus.FAILED
    assert done_agent.agent.status is AgentStatus.COMPLETED
    run_span = traced.span("invoke_workflow x")
    assert attrs(run_span)["multirun.run.status"] == "failed"
    assert attrs(run_span)["error.type"] == "RuntimeError"
    assert run_span.status.status_code is StatusCode.ERROR
    assert attrs(traced.span("invoke_agent active"))["multirun.agent.status"] == "failed"


@pytest.mark.parametrize("end", ["complete", "fail"])
async def test_a_run_context_ended_without_being_entered_keeps_its_final_status(traced, end: str) -> None:
    """A RunContext made by hand and ended at once (never entered, no agent started): its span
    starts as it ends, and the run model still says how it ended, in order of time."""
    ctx = RunContext(client=traced.client, run=Run(name="x"))
    if end == "complete":
        await ctx.complete("done")
    else:
        await ctx.fail(RuntimeError("gave up"))

    status = RunStatus.COMPLETED if end == "complete" else RunStatus.FAILED
    assert ctx.run.status is status
    assert ctx.run.started_at is not None and ctx.run.completed_at is not None
    assert ctx.run.started_at <= ctx.run.completed_at
    assert attrs(traced.span("invoke_workflow x"))["multirun.run.status"] == status.value


async def test_agent_async_with_exits_failed_on_exception(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(name="a")
        with pytest.raises(LookupError):
            async with agent_ctx:
                raise LookupError("nope")

    assert agent_ctx.agent.status is AgentStatus.FAILED
    assert agent_ctx.agent.error == "nope"
    assert attrs(traced.span("invoke_agent a"))["multirun.agent.status"] == "failed"


async def test_start_agent_outside_the_run_context_is_still_under_the_run(traced) -> None:
    # the run context held as an object, never entered: its agent and steps are still its own
    ctx = RunContext(client=traced.client, run=Run(name="held"))
    agent_ctx = await ctx.start_agent(name="a")
    step_ctx = await agent_ctx.start_step(name="s")
    await step_ctx.complete("r", tokens_used=5, cost_usd=0.01)
    await agent_ctx.complete()
    await ctx.complete()

    assert is_child(traced.span("invoke_agent a"), traced.span("invoke_workflow held"))
    assert is_child(traced.span("step s"), traced.span("invoke_agent a"))
    assert ctx.run.tokens_used == 5


async def test_start_step_on_an_agent_not_entered_is_under_that_agent(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        agent_ctx = await ctx.start_agent(name="a")
        step_ctx = await agent_ctx.start_step(name="s")
        await step_ctx.complete("r")
        await agent_ctx.complete()

    assert is_child(traced.span("step s"), traced.span("invoke_agent a"))


def test_start_step_inside_a_decorated_step_is_nested_under_it(traced) -> None:
    @step
    def outer() -> None:
        inner = get_current_agent_context().start_step(name="inner")
        inner.complete(None)

    @run
    def main() -> None:
        outer()

    main()
    assert is_child(traced.span("step inner"), traced.span("step outer"))


async def test_completing_a_step_twice_is_refused_and_charges_once(traced) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        step_ctx = await get_current_agent_context().start_step(name="s")
        await step_ctx.complete("r", tokens_used=10, cost_usd=0.5)
        with pytest.raises(RuntimeError, match=r"'s' .*already completed"):
            await step_ctx.complete("r", tokens_used=10, cost_usd=0.5)
        with pytest.raises(RuntimeError, match="already completed"):
            await step_ctx.fail("late")

    assert ctx.run.tokens_used == 10
    assert ctx.run.cost_usd == pytest.approx(0.5)
    assert step_ctx.step.status is StepStatus.COMPLETED


@pytest.mark.parametrize("cost", [float("nan"), float("inf")])
async def test_step_complete_refuses_a_cost_that_is_not_finite(traced, cost: float) -> None:
    async with RunContext(client=traced.client, run=Run(name="x")) as ctx:
        step_ctx = await get_current_agent_context().start_step(name="s")
        with pytest.raises(multirun.ConfigurationError, match="cost_usd must be a finite number >= 0"):
            await step_ctx.complete("r", tokens_used=10, cost_usd=cost)
        with pytest.raises(multirun.ConfigurationError, match="cost_usd"):
            multirun.report_usage("gpt-4o", input_tokens=1, cost_usd=cost)
        await step_ctx.complete("r")

    assert ctx.run.tokens_used == 0


def test_decorated_run_model_is_completed_with_timestamps(traced) -> None:
    runs: list[Run] = []

    @run
    def main() -> str:
        runs.append(get_current_run_context().run)
        assert runs[0].status is RunStatus.RUNNING
        return "r"

    main()

    model = runs[0]
    assert model.status is RunStatus.COMPLETED
    assert model.started_at is not None
    assert model.completed_at is not None
    assert model.completed_at >= model.started_at
    assert json.loads(model.result) == "r"


# ---------------------------------------------------------------------------
# budget_status


def test_budget_status_reports_used_remaining_and_percentage(traced) -> None:
    seen: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("no-such-model-x", input_tokens=250, cost_usd=0.1)

    @run(budget=Budget(max_tokens=1000, max_cost_usd=1.0, max_steps=10))
    def main() -> None:
        ask()
        seen.append(get_current_run_context().budget_status())

    main()

    status = seen[0]
    assert status.tokens_used == 250
    assert status.tokens_remaining == 750
    assert status.cost_used_usd == pytest.approx(0.1)
    assert status.cost_remaining_usd == pytest.approx(0.9)
    assert status.steps_used == 1
    assert status.steps_remaining == 9
    assert status.percentage_used == pytest.approx(25.0)
    assert status.is_exceeded is False


def test_usage_totals_of_the_run_and_agent_models_are_set_fields(traced) -> None:
    """The totals a run and its agents are charged are set as pydantic sets a field: they are
    in ``model_fields_set`` and in ``model_dump(exclude_unset=True)``."""
    seen: dict[str, Any] = {}

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("no-such-model-x", input_tokens=250, output_tokens=50, cost_usd=0.1)

    @agent(name="asker")
    def asker() -> None:
        ask()
        seen["agent"] = get_current_agent_context().agent

    @run
    def main() -> None:
        asker()
        seen["run"] = get_current_run_context().run

    main()

    for model in (seen["run"], seen["agent"]):
        assert {"tokens_used", "cost_usd"} <= model.model_fields_set
        dumped = model.model_dump(exclude_unset=True)
        assert dumped["tokens_used"] == 300
        assert dumped["cost_usd"] == pytest.approx(0.1)


def test_budget_status_without_budget_has_no_remaining(traced) -> None:
    seen: list[Any] = []

    @step
    def work() -> None:
        return None

    @run
    def main() -> None:
        work()
        seen.append(get_current_run_context().budget_status())

    main()

    status = seen[0]
    assert status.steps_used == 1
    assert status.tokens_remaining is None
    assert status.cost_remaining_usd is None
    assert status.steps_remaining is None
    assert status.is_exceeded is False


def test_budget_status_is_exceeded_when_tokens_reach_limit(traced) -> None:
    seen: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("no-such-model-x", input_tokens=120, cost_usd=0.0)

    @run(budget=Budget(max_tokens=100))
    def main() -> None:
        ask()
        seen.append(get_current_run_context().budget_status())

    main()

    assert seen[0].is_exceeded is True
    assert seen[0].tokens_remaining == 0
    assert seen[0].percentage_used == pytest.approx(120.0)


# ---------------------------------------------------------------------------
# Run.steps


def test_run_steps_are_filled_after_the_run(traced) -> None:
    runs: list[Run] = []

    @step(kind=StepKind.TOOL_CALL)
    def first() -> None:
        return None

    @step
    def second() -> None:
        raise ValueError("boom")

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        first()
        with contextlib.suppress(ValueError):
            second()

    main()

    steps = runs[0].steps
    assert [(s.name, s.kind, s.status) for s in steps] == [
        ("first", StepKind.TOOL_CALL, StepStatus.COMPLETED),
        ("second", StepKind.FUNCTION, StepStatus.FAILED),
    ]
    assert all(s.run_id == runs[0].id for s in steps)
    assert steps[1].error == "boom"
    span_ids = {format(s.context.span_id, "016x") for s in traced.spans()}
    assert {s.id for s in steps} <= span_ids


def test_run_steps_read_any_way_after_the_run_are_the_same_steps(traced) -> None:
    """Run.steps is built when first read; every way of reading a Run sees it."""
    import copy
    import pickle

    runs: list[Run] = []

    @step
    def work(i: int) -> int:
        return i

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        work(1)
        work(2)

    for _ in range(8):
        main()
    names = ["work", "work"]
    dumped, as_json, printed, copied, deep, pickled, iterated, first = runs
    assert [s["name"] for s in dumped.model_dump()["steps"]] == names
    assert list(dumped.model_dump()) == list(Run.model_fields)  # the declared field order
    assert [s["name"] for s in json.loads(as_json.model_dump_json())["steps"]] == names
    assert "steps=[Step(" in repr(printed)
    assert [s.name for s in copy.copy(copied).steps] == names
    assert [s.name for s in deep.model_copy(deep=True).steps] == names
    assert [s.name for s in pickle.loads(pickle.dumps(pickled)).steps] == names
    assert [s.name for s in dict(iterated)["steps"]] == names
    assert first == first.model_copy() and first.steps is first.steps
    assert Run.model_json_schema(mode="serialization") == Run.model_json_schema()


def test_a_finished_run_held_by_the_program_keeps_neither_its_state_nor_a_traceback_alive(traced) -> None:
    import gc
    import weakref

    class Big:
        pass

    refs: list[weakref.ref[Any]] = []
    runs: list[Run] = []

    @step
    def work(i: int) -> int:
        return i

    @step
    def fails() -> None:
        big = Big()
        refs.append(weakref.ref(big))  # a local of the failed step's frame
        raise ValueError("boom")

    @run
    def main() -> None:
        ctx = get_current_run_context()
        big = Big()
        refs.extend([weakref.ref(big), weakref.ref(ctx)])
        ctx.set_state("big", big)
        work(1)
        with contextlib.suppress(ValueError):
            fails()
        runs.append(ctx.run)

    main()
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]
    assert [s.name for s in runs[0].steps] == ["work", "fails"]
    assert runs[0].steps[1].error == "boom"


def test_run_steps_are_the_same_for_threads_reading_them_at_once_and_stay_set() -> None:
    import threading
    import time

    def slow_build() -> list[Step]:
        time.sleep(0.05)
        return [Step(name="a"), Step(name="b")]

    finished = Run(name="x")
    finished._fill_steps_later(slow_build)
    seen: list[int] = []
    readers = [threading.Thread(target=lambda: seen.append(len(finished.steps))) for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert seen == [2, 2, 2, 2]
    assert "steps" in finished.model_fields_set
    assert [s["name"] for s in finished.model_dump(exclude_unset=True)["steps"]] == ["a", "b"]

    replaced = Run(name="y")
    replaced._fill_steps_later(slow_build)
    replaced.steps = [Step(name="mine")]
    assert [s.name for s in replaced.steps] == ["mine"]
    assert list(replaced.model_dump()) == list(Run.model_fields)
    assert replaced == Run.model_validate(replaced.model_dump())


def test_run_steps_are_bounded_by_step_history(traced) -> None:
    client = multirun.init(tracer_provider=traced.provider, step_history=3)
    client.clock = traced.clock
    runs: list[Run] = []

    def work(i: int) -> int:
        return i

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        for i in range(5):
            step(name=f"s{i}")(work)(i)

    main()

    assert [s.name for s in runs[0].steps] == ["s2", "s3", "s4"]
    assert attrs(traced.span("invoke_workflow main"))["multirun.steps_used"] == 5


def test_the_steps_a_run_keeps_do_not_keep_their_spans_alive(traced) -> None:
    # a run keeps its last step_history steps (100 by default): were their SDK spans kept too,
    # 1,000 concurrent runs would hold 100,000 spans (about 280 MiB) and walk them at every GC
    spans: list[weakref.ref[Any]] = []
    ended: list[Any] = []
    times: list[tuple[int | None, int | None]] = []

    @step
    def work() -> None:
        spans.append(weakref.ref(get_current_step_context().span))

    @run
    def main() -> None:
        work()
        kept = get_current_run_context().history
        assert [s.name for s in kept] == ["work"]
        gc.collect()
        ended.append(kept[0].span)  # a stand-in now: the step's span context, recording nothing
        times.append(kept[0]._times())

    main()

    assert spans[0]() is None
    exported = traced.span("step work")
    context = ended[0].get_span_context()
    assert (context.trace_id, context.span_id) == (exported.context.trace_id, exported.context.span_id)
    assert not ended[0].is_recording()
    assert times[0] == (exported.start_time, exported.end_time)


def test_run_current_step_id_is_the_step_running_now(traced) -> None:
    seen: list[tuple[str, str | None]] = []

    def current() -> str | None:
        return get_current_run_context().run.current_step_id

    @step
    def inner() -> None:
        seen.append(("inner", current()))
        seen.append(("inner is", get_current_step_context().id))

    @step
    def outer() -> None:
        seen.append(("outer", current()))
        seen.append(("outer is", get_current_step_context().id))
        inner()
        seen.append(("outer again", current()))

    @run
    async def main() -> Run:
        seen.append(("before", current()))
        outer()
        seen.append(("between", current()))
        step_ctx = await get_current_agent_context().start_step("by_hand")
        seen.append(("by_hand", current()))
        seen.append(("by_hand is", step_ctx.id))
        await step_ctx.complete(None)
        seen.append(("after", current()))
        return get_current_run_context().run

    import asyncio

    finished = asyncio.run(main())
    found = dict(seen)
    assert found["before"] is None
    assert found["outer"] == found["outer is"] == found["outer again"]
    assert found["inner"] == found["inner is"] != found["outer"]
    assert found["between"] is None
    assert found["by_hand"] == found["by_hand is"]
    assert found["after"] is None
    assert finished.current_step_id is None


def test_step_models_hold_the_input_and_output_the_trace_records_when_content_is_captured(traced) -> None:
    """Content is opt-in: with capture_content the Step models hold the serialized input and
    output that the step's span records (cut to content_limit); without it, neither."""
    runs: list[Run] = []

    @step
    def shout(text: str, times: int = 1) -> dict[str, Any]:
        return {"said": text.upper() * times}

    @run
    async def main() -> None:
        runs.append(get_current_run_context().run)
        shout("hi", times=2)
        step_ctx = await get_current_agent_context().start_step("by_hand", input_args=("q",))
        await step_ctx.complete(["a", 1])

    import asyncio

    asyncio.run(main())
    assert [(s.input_data, s.output_data) for s in runs[0].steps] == [(None, None), (None, None)]

    client = multirun.init(tracer_provider=traced.provider, capture_content=True, content_limit=40)
    client.clock = traced.clock
    traced.exporter.clear()
    asyncio.run(main())
    shouted, by_hand = runs[1].steps
    assert shouted.input_data == b'{"args": ["hi"], "kwargs": {"times": 2}}'
    assert shouted.output_data == b'{"said": "HIHI"}'
    assert (by_hand.input_data, by_hand.output_data) == (b"q", b'["a", 1]')
    span = attrs(traced.span("step shout"))
    assert shouted.input_data.decode() == span["multirun.step.input"]
    assert shouted.output_data.decode() == span["multirun.step.output"]


def test_nested_step_model_has_parent_step_id(traced) -> None:
    runs: list[Run] = []

    @step
    def inner() -> None:
        return None

    @step
    def outer() -> None:
        inner()

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        outer()

    main()

    by_name = {s.name: s for s in runs[0].steps}
    assert by_name["inner"].parent_step_id == by_name["outer"].id
    assert by_name["outer"].parent_step_id is None


def test_step_model_agent_id_is_the_agent_it_ran_in(traced) -> None:
    runs: list[Run] = []
    agents: list[str] = []

    @step
    def work() -> None:
        return None

    @agent
    def worker() -> None:
        agents.append(get_current_agent_context().agent.id)
        work()

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        worker()

    main()
    assert runs[0].steps[0].agent_id == agents[0]


def test_budget_on_run_model_is_checked_with_is_exceeded(traced) -> None:
    runs: list[Run] = []

    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("no-such-model-x", input_tokens=150, cost_usd=0.0)

    @run(budget=Budget(max_tokens=1000))
    def main() -> None:
        runs.append(get_current_run_context().run)
        ask()

    main()

    model = runs[0]
    assert model.budget is not None
    assert model.budget.is_exceeded(model) is False
    assert model.budget.get_exceeded_reason(model) is None
    assert Budget(max_tokens=100).is_exceeded(model) is True
    reason = Budget(max_tokens=100).get_exceeded_reason(model)
    assert reason is not None
    assert "max_tokens" in reason
    assert "150" in reason
    assert "100" in reason


@pytest.mark.parametrize("sampled_out", ["sampler ALWAYS_OFF", "OTEL_SDK_DISABLED (a no-op tracer)"])
def test_steps_whose_spans_are_not_recorded_keep_their_ids_times_and_durations(
    tmp_path, sampled_out: str
) -> None:
    """A run sampled out, or with the SDK disabled, still has Step models as reference 001 gives
    them: an id of their own (a no-op tracer's spans all have span id 0), their start and end
    time and latency_ms, and multirun.step.duration records how long they took, not 0."""
    import time

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from opentelemetry.trace import NoOpTracerProvider

    from multirun.context import RunContext

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    tracers = TracerProvider(sampler=ALWAYS_OFF) if "ALWAYS_OFF" in sampled_out else NoOpTracerProvider()
    own = multirun.MultiRunClient(
        tracer_provider=tracers, meter_provider=meters, checkpoint_store=str(tmp_path / "blobs")
    )
    seen: dict[str, Any] = {}

    @step(kind=StepKind.TOOL_CALL)
    def inner() -> None:
        time.sleep(0.005)

    @step
    def outer() -> None:
        seen["current"] = get_current_run_context().run.current_step_id
        inner()

    with RunContext(client=own, run=Run(name="quiet")) as ctx:
        outer()
        outer()
        manual = ctx.default_agent.start_step("by_hand")
        time.sleep(0.005)
        manual.complete(None)
        assert manual.step.latency_ms >= 5
    steps = ctx.run.steps

    assert [s.name for s in steps] == ["inner", "outer", "inner", "outer", "by_hand"]
    ids = [s.id for s in steps]
    assert len(set(ids)) == 5 and all(len(i) == 16 and int(i, 16) for i in ids)
    assert [s.parent_step_id for s in steps] == [ids[1], None, ids[3], None, None]
    assert seen["current"] == ids[3]
    for s in steps:
        assert s.started_at is not None and s.completed_at is not None
        assert s.completed_at >= s.started_at
    assert all(s.latency_ms >= 5 for s in steps)
    data = reader.get_metrics_data()
    assert data is not None
    (tool_steps,) = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "multirun.step.duration"
        for point in metric.data.data_points
    ]
    assert tool_steps.count == 2 and tool_steps.min >= 0.005
    meters.shutdown()
