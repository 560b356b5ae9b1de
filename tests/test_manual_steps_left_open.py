"""A step made by hand (``start_step``) that the program never completes nor fails, because an
error left its code between ``start_step`` and ``complete``: its agent's end fails it, so its
span is exported and no model says it is still running."""

from __future__ import annotations

import asyncio

import pytest

import multirun
from multirun import run, step
from multirun.context import RunContext, get_current_agent_context, get_current_run_context
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
