"""A step made by hand (``start_step``) that the program never completes nor fails, because an
error left its code between ``start_step`` and ``complete``: its agent's end fails it, so its
span is exported and no model says it is still running."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

import multirun
from multirun import run, step
from multirun.context import RunContext, StepContext, get_current_agent_context, get_current_run_context
from multirun.models import Run, StepKind, StepStatus
from multirun.telemetry import attributes as attr


def exception_types(span) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.attributes["exception.type"] for e in span.events if e.name == "exception"]


async def test_a_manual_step_left_open_by_an_error_in_a_run_context_is_exported_failed(traced) -> None:
    with pytest.raises(KeyError):
        async with RunContext(run=Run(name="job")) as run_ctx:
            agent_ctx = run_ctx.default_agent
            await agent_ctx.start_step("call_llm", kind=StepKind.LLM_CALL, model="gpt-4o")
            raise KeyError("parsing the answer")  # complete() is never reached

    span = traced.span("chat gpt-4o")  # exported: its span ended
    assert span.attributes[attr.STEP_STATUS] == "failed"
    assert span.attributes[attr.ERROR_TYPE] == "multirun.errors.StepNotEndedError"
    assert exception_types(span) == ["multirun.errors.StepNotEndedError"]
    assert "never completed or failed" in span.status.description
    assert [s.status for s in run_ctx.run.steps] == [StepStatus.FAILED]
    assert "never completed or failed" in (run_ctx.run.steps[0].error or "")
    assert run_ctx.run.current_step_id is None


def test_manual_steps_left_open_under_nested_steps_end_with_their_agent_innermost_first(traced) -> None:
    @step
    def outer() -> None:
        agent_ctx = get_current_agent_context()
        agent_ctx.start_step("first")
        agent_ctx.start_step("second")
        raise ValueError("boom")

    @run(name="nested")
    def main() -> None:
        run_ctx = get_current_run_context()
        with run_ctx.start_agent("worker"):
            outer()

    with pytest.raises(ValueError):
        main()
    first, second = traced.span("step first"), traced.span("step second")
    assert first.parent.span_id == traced.span("step outer").context.span_id
    for span in (first, second):
        assert span.attributes[attr.STEP_STATUS] == "failed"
        assert exception_types(span) == ["multirun.errors.StepNotEndedError"]
    assert second.end_time <= first.end_time  # the latest started ends first
    agent_span = traced.span("invoke_agent worker")
    assert first.end_time <= agent_span.end_time


async def test_a_manual_step_left_open_in_a_cancelled_agent_says_so(traced) -> None:
    started = asyncio.Event()

    @run(name="waiter")
    async def main() -> None:
        run_ctx = get_current_run_context()
        async with run_ctx.start_agent("worker") as agent_ctx:
            await agent_ctx.start_step("fetch", kind=StepKind.TOOL_CALL)
            started.set()
            await asyncio.sleep(60)

    task = asyncio.ensure_future(main())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    span = traced.span("execute_tool fetch")
    assert span.attributes[attr.STEP_STATUS] == "failed"  # a step has no cancelled status
    assert "its agent ended cancelled" in span.status.description


def test_a_manual_step_left_open_runs_again_when_the_run_is_resumed(traced) -> None:
    fetched: list[int] = []

    @run(name="fetcher")
    def main(slip: bool) -> int:
        agent_ctx = get_current_agent_context()
        found, result = agent_ctx.get_step_result("fetch", (1,))
        if found:
            return result
        step_ctx = agent_ctx.start_step("fetch", kind=StepKind.TOOL_CALL, input_args=(1,))
        fetched.append(1)
        get_current_run_context().checkpoint(name="after_fetch")
        if slip:
            raise KeyError("parsing the answer")
        step_ctx.complete(10)
        return 10

    with pytest.raises(KeyError):
        main(True)
    run_id = traced.span("invoke_workflow fetcher").attributes[attr.RUN_ID]
    with multirun.resume(run_id=run_id):
        assert main(False) == 10
    assert fetched == [1, 1]  # not served: it never completed


@pytest.mark.parametrize("end", ["complete", "fail"])
def test_a_step_ended_by_hand_while_its_agent_ends_on_another_thread_ends_once(traced, end: str) -> None:
    # the agent's end (failing the steps left open) and the program's complete() or fail() of
    # such a step, on two threads at once: exactly one of them ends it, and the program is told
    # which. Both did: the step was kept twice, its span and its model could disagree, and
    # complete() returned for a step that ended failed
    rounds = 300
    traced.client.step_history = 2 * rounds  # the run keeps every step (a step kept twice too)
    outcomes: dict[str, str] = {}
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns often
    try:
        with RunContext(run=Run(name="racing")) as run_ctx:
            for round_ in range(rounds):
                agent_ctx = run_ctx.start_agent("worker")
                step_ctx = agent_ctx.start_step("call_llm", kind=StepKind.LLM_CALL, model="gpt-4o")
                barrier = threading.Barrier(2)

                def by_the_program(
                    step_ctx: StepContext = step_ctx, barrier: threading.Barrier = barrier
                ) -> None:
                    barrier.wait()
                    try:
                        if end == "complete":
                            step_ctx.complete("answer", tokens_used=10, cost_usd=0.5)
                        else:
                            step_ctx.fail("no answer")
                        outcomes[step_ctx.id] = "ended by the program"
                    except RuntimeError as refused:
                        assert "already failed" in str(refused)
                        outcomes[step_ctx.id] = "ended by its agent"

                thread = threading.Thread(target=by_the_program)
                thread.start()
                barrier.wait()
                for _ in range(round_ % 100 * 60):  # the other thread wakes up meanwhile, or not
                    pass
                agent_ctx.complete(None)
                thread.join()
    finally:
        sys.setswitchinterval(switch)

    steps = run_ctx.run.steps
    assert sorted(model.id for model in steps) == sorted(outcomes)  # each step kept once
    exported = {s.attributes[attr.STEP_ID]: s for s in traced.named("chat gpt-4o")}
    assert len(exported) == rounds
    program_won = 0
    for model in steps:
        span = exported[model.id]
        assert span.attributes[attr.STEP_STATUS] == model.status.value  # the span and the model agree
        assert span.attributes.get(attr.TOKENS_USED, 0) == model.tokens_used
        if outcomes[model.id] == "ended by its agent":
            assert model.status is StepStatus.FAILED and "never completed" in (model.error or "")
        elif end == "complete":
            program_won += 1
            assert (model.status, model.tokens_used) == (StepStatus.COMPLETED, 10)
        else:
            program_won += 1
            assert (model.status, model.error) == (StepStatus.FAILED, "no answer")
    # which side wins a round is up to the scheduler (on a busy machine one side may win them
    # all): the invariants above hold whichever it is
    assert run_ctx.run.tokens_used == (10 * program_won if end == "complete" else 0)


def test_a_step_whose_usage_is_refused_by_unpriced_fail_ends_failed_with_the_refusal(traced) -> None:
    # complete() claims the step before its usage is charged (so that its agent's end on
    # another thread cannot end it meanwhile): a refused report must not leave it claimed and open
    multirun.init(tracer_provider=traced.provider, unpriced="fail")
    with RunContext(run=Run(name="job")) as run_ctx:
        step_ctx = run_ctx.default_agent.start_step("ask", kind=StepKind.LLM_CALL, model="my-private-model")
        with pytest.raises(multirun.PolicyViolation, match="unpriced"):
            step_ctx.complete("answer", tokens_used=30)
        with pytest.raises(RuntimeError, match="already failed"):
            step_ctx.fail("too late")

    assert run_ctx.run.tokens_used == 30  # counted, as a decorated step's refused call is
    span = traced.span("chat my-private-model")
    assert span.attributes[attr.STEP_STATUS] == "failed"
    assert exception_types(span) == ["multirun.errors.PolicyViolation"]
    assert [s.status for s in run_ctx.run.steps] == [StepStatus.FAILED]
