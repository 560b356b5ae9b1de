"""Behaviour of @run, @agent, @step and @checkpoint, checked on the spans they export.

Reference 000 (decorators) and DESIGN.md (span names and attributes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import multirun
from multirun import agent, checkpoint, run, step
from multirun.context import RunContext, get_current_agent_context, get_current_run_context
from multirun.errors import ConfigurationError, StepError
from multirun.models import AgentStatus, Budget, Run, RunStatus, StepKind
from multirun.models.policy import BackoffStrategy

KINDS = ["function", "coroutine", "generator", "async_generator"]


# ---------------------------------------------------------------------------
# helpers


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def hex_id(span: Any) -> str:
    return format(span.context.span_id, "016x")


def parent_span_id(span: Any) -> int | None:
    return None if span.parent is None else span.parent.span_id


def build(kind: str, decorate: Any) -> Any:
    """A function of ``kind`` that gives back [x, x + 1], decorated with ``decorate``."""
    if kind == "function":

        def work(x: int) -> list[int]:
            return [x, x + 1]

    elif kind == "coroutine":

        async def work(x: int) -> list[int]:  # type: ignore[misc]
            await asyncio.sleep(0)
            return [x, x + 1]

    elif kind == "generator":

        def work(x: int):  # type: ignore[no-untyped-def,misc]
            yield x
            yield x + 1

    else:

        async def work(x: int):  # type: ignore[no-untyped-def,misc]
            yield x
            await asyncio.sleep(0)
            yield x + 1

    return decorate(work)


async def call(kind: str, fn: Any, *args: Any) -> Any:
    """Call ``fn`` the way a function of ``kind`` is called and collect what it gives."""
    if kind == "function":
        return fn(*args)
    if kind == "coroutine":
        return await fn(*args)
    if kind == "generator":
        return list(fn(*args))
    return [item async for item in fn(*args)]


def reinit(traced: Any, **options: Any) -> multirun.MultiRunClient:
    """Configure multirun again on the fixture's provider and clock, with other options."""
    client = multirun.init(tracer_provider=traced.provider, **options)
    client.clock = traced.clock
    return client


# ---------------------------------------------------------------------------
# imports exactly as the reference writes them


def test_decorators_import_from_multirun_package() -> None:
    import multirun.decorators as decorators

    assert (run, step, checkpoint, agent) == (
        decorators.run,
        decorators.step,
        decorators.checkpoint,
        decorators.agent,
    )


# ---------------------------------------------------------------------------
# bare and parameterized, on every kind of function


@pytest.mark.parametrize("kind", KINDS)
async def test_bare_run_exports_one_workflow_span_and_returns_result(traced, kind) -> None:
    fn = build(kind, run)

    assert await call(kind, fn, 3) == [3, 4]

    spans = traced.spans()
    assert [s.name for s in spans] == ["invoke_workflow work"]
    assert spans[0].parent is None
    assert attrs(spans[0])["multirun.run.status"] == "completed"


@pytest.mark.parametrize("kind", KINDS)
async def test_run_with_parameters_uses_given_name_and_budget(traced, kind) -> None:
    fn = build(kind, run(name="pipeline", budget=Budget(max_steps=7)))

    assert await call(kind, fn, 10) == [10, 11]

    span = traced.span("invoke_workflow pipeline")
    assert attrs(span)["gen_ai.workflow.name"] == "pipeline"
    assert attrs(span)["multirun.budget.max_steps"] == 7


@pytest.mark.parametrize("kind", KINDS)
async def test_bare_step_inside_run_exports_one_child_span(traced, kind) -> None:
    inner = build(kind, step)

    @run
    async def main() -> Any:
        return await call(kind, inner, 5)

    assert await main() == [5, 6]

    step_span = traced.span("step work")
    run_span = traced.span("invoke_workflow main")
    assert parent_span_id(step_span) == run_span.context.span_id
    assert step_span.context.trace_id == run_span.context.trace_id
    assert attrs(step_span)["multirun.step.status"] == "completed"
    assert len(traced.spans()) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_step_with_parameters_uses_given_name_and_kind(traced, kind) -> None:
    inner = build(kind, step(name="lookup", kind=StepKind.TOOL_CALL))

    @run
    async def main() -> Any:
        return await call(kind, inner, 1)

    assert await main() == [1, 2]

    span = traced.span("execute_tool lookup")
    assert attrs(span)["multirun.step.name"] == "lookup"
    assert attrs(span)["multirun.step.kind"] == "tool_call"
    assert parent_span_id(span) == traced.span("invoke_workflow main").context.span_id


@pytest.mark.parametrize("kind", KINDS)
async def test_bare_agent_inside_run_exports_agent_span_under_run(traced, kind) -> None:
    fn = build(kind, agent)

    @run
    async def main() -> Any:
        return await call(kind, fn, 2)

    assert await main() == [2, 3]

    agent_span = traced.span("invoke_agent work")
    assert parent_span_id(agent_span) == traced.span("invoke_workflow main").context.span_id
    assert attrs(agent_span)["multirun.agent.status"] == "completed"


@pytest.mark.parametrize("kind", KINDS)
async def test_agent_with_parameters_uses_given_name(traced, kind) -> None:
    fn = build(kind, agent(name="researcher", agent_config_id="ac_123", metadata={"m": 1}))

    @run
    async def main() -> Any:
        return await call(kind, fn, 8)

    assert await main() == [8, 9]

    span = traced.span("invoke_agent researcher")
    assert attrs(span)["gen_ai.agent.name"] == "researcher"
    assert attrs(span)["multirun.agent.config_id"] == "ac_123"


@pytest.mark.parametrize("kind", KINDS)
async def test_checkpoint_bare_and_with_parameters_return_result(traced, kind) -> None:
    bare = build(kind, checkpoint)
    named = build(kind, checkpoint(name="search_complete"))
    seen: list[list[str]] = []

    @run
    async def main() -> Any:
        first = await call(kind, bare, 1)
        second = await call(kind, named, 2)
        seen.append([c.name for c in get_current_run_context().run.checkpoints])
        return first + second

    assert await main() == [1, 2, 2, 3]
    assert seen == [["after_work", "search_complete"]]


@pytest.mark.parametrize("kind", KINDS)
async def test_step_outside_run_returns_same_result_and_exports_no_span(traced, kind) -> None:
    fn = build(kind, step(retry=2, kind=StepKind.LLM_CALL))

    assert await call(kind, fn, 4) == [4, 5]
    assert traced.spans() == []


def test_decorated_function_keeps_name_and_docstring(traced) -> None:
    @step
    def documented() -> None:
        """The docstring."""

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "The docstring."


def test_generator_step_records_number_of_items_streamed(traced) -> None:
    @step
    def stream():  # type: ignore[no-untyped-def]
        yield from range(4)

    @run
    def main() -> list[int]:
        return list(stream())

    assert main() == [0, 1, 2, 3]
    assert attrs(traced.span("step stream"))["multirun.step.stream_items"] == 4


async def test_async_generator_step_records_number_of_items_streamed(traced) -> None:
    @step
    async def stream():  # type: ignore[no-untyped-def]
        for i in range(3):
            yield i

    @run
    async def main() -> list[int]:
        return [i async for i in stream()]

    assert await main() == [0, 1, 2]
    assert attrs(traced.span("step stream"))["multirun.step.stream_items"] == 3


def test_generator_step_closed_early_records_items_handed_out(traced) -> None:
    @step
    def stream():  # type: ignore[no-untyped-def]
        yield from range(5)

    @run
    def main() -> list[int]:
        taken = []
        for item in stream():
            taken.append(item)
            if len(taken) == 2:
                break
        return taken

    assert main() == [0, 1]
    a = attrs(traced.span("step stream"))
    assert a["multirun.step.status"] == "completed"
    assert a["multirun.step.stream_items"] == 2


async def test_async_generator_step_closed_early_records_items_handed_out(traced) -> None:
    @step
    async def stream():  # type: ignore[no-untyped-def]
        for i in range(5):
            yield i

    @run
    async def main() -> list[int]:
        taken = []
        items = stream()
        async for item in items:
            taken.append(item)
            if len(taken) == 2:
                break
        await items.aclose()
        return taken

    assert await main() == [0, 1]
    a = attrs(traced.span("step stream"))
    assert a["multirun.step.status"] == "completed"
    assert a["multirun.step.stream_items"] == 2


@pytest.mark.parametrize("retry", [0, 1])
@pytest.mark.parametrize("kind", ["generator", "async_generator"])
async def test_generator_step_called_with_wrong_arguments_fails_with_the_type_error(
    traced, kind, retry
) -> None:
    """The call that makes the generator raises: the step fails with it (retried first, if it
    has retries), as a function step whose call raises does (its span was never ended, and no
    backend ever saw it)."""

    def sync_stream(n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    async def async_stream(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    stream = step(name="stream", retry=retry)(sync_stream if kind == "generator" else async_stream)

    @run
    async def main() -> None:
        with pytest.raises(StepError if retry else TypeError) as raised:
            if kind == "generator":
                list(stream(1, 2))
            else:
                [item async for item in stream(1, 2)]
        error = raised.value.__cause__ if retry else raised.value
        assert isinstance(error, TypeError) and "positional argument" in str(error)

    await main()
    a = attrs(traced.span("step stream"))
    assert a["multirun.step.status"] == "failed"
    assert a["multirun.step.attempt"] == 1 + retry
    assert traced.span("invoke_workflow main").attributes["multirun.run.status"] == "completed"


def test_checkpoint_outside_run_just_runs(traced) -> None:
    @checkpoint(name="alone")
    def work() -> int:
        return 5

    assert work() == 5
    assert traced.spans() == []


# ---------------------------------------------------------------------------
# @agent outside any run


def test_agent_outside_run_starts_run_of_same_name(traced) -> None:
    @agent(name="solo")
    def work() -> str:
        return "done"

    assert work() == "done"

    run_span = traced.span("invoke_workflow solo")
    agent_span = traced.span("invoke_agent solo")
    assert parent_span_id(agent_span) == run_span.context.span_id
    assert attrs(run_span)["gen_ai.workflow.name"] == "solo"
    assert attrs(run_span)["multirun.run.status"] == "completed"
    assert attrs(agent_span)["multirun.agent.status"] == "completed"


async def test_async_agent_outside_run_failure_fails_its_run(traced) -> None:
    @agent
    async def broken() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        await broken()

    run_span = traced.span("invoke_workflow broken")
    assert attrs(run_span)["multirun.run.status"] == "failed"
    assert run_span.status.status_code is StatusCode.ERROR
    assert attrs(traced.span("invoke_agent broken"))["multirun.agent.status"] == "failed"


async def test_a_cancelled_run_and_its_agents_end_cancelled_not_failed(traced) -> None:
    """RunStatus and AgentStatus have CANCELLED (reference 001): a run whose task is
    cancelled did not fail, and neither did the agents it was running."""
    models: list[Any] = []
    started = asyncio.Event()

    @agent
    async def researcher() -> None:
        models.append(get_current_agent_context())
        started.set()
        await asyncio.Event().wait()

    @run
    async def crew() -> None:
        models.append(get_current_run_context())
        get_current_agent_context()  # the default agent, started
        await researcher()

    task = asyncio.create_task(crew())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    run_ctx, researcher_ctx = models
    assert run_ctx.run.status is RunStatus.CANCELLED
    assert researcher_ctx.agent.status is AgentStatus.CANCELLED
    assert run_ctx.default_agent.agent.status is AgentStatus.CANCELLED
    assert attrs(traced.span("invoke_workflow crew"))["multirun.run.status"] == "cancelled"
    assert attrs(traced.span("invoke_agent researcher"))["multirun.agent.status"] == "cancelled"
    assert attrs(traced.span("invoke_workflow crew"))["error.type"] == "asyncio.exceptions.CancelledError"


async def test_a_run_context_left_by_a_cancellation_ends_cancelled(traced) -> None:
    ctx = RunContext(traced.client, Run(name="manual"))

    async def body() -> None:
        async with ctx:
            agent_ctx = ctx.start_agent("a")
            async with agent_ctx:
                await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctx.run.status is RunStatus.CANCELLED
    assert ctx.agents[0].agent.status is AgentStatus.CANCELLED


def test_a_run_failed_by_hand_with_a_cancellation_is_failed(traced) -> None:
    """``fail`` marks the run failed, whatever the error (reference 002)."""
    ctx = RunContext(traced.client, Run(name="manual"))
    ctx.fail(asyncio.CancelledError())
    assert ctx.run.status is RunStatus.FAILED


# ---------------------------------------------------------------------------
# span names and attributes (DESIGN.md, attribute conventions)


def test_run_span_has_workflow_attributes_and_run_id(traced) -> None:
    ids: list[str] = []

    @run(name="wf")
    def main() -> int:
        ids.append(get_current_run_context().run.id)
        return 1

    main()

    a = attrs(traced.span("invoke_workflow wf"))
    assert a["gen_ai.operation.name"] == "invoke_workflow"
    assert a["gen_ai.workflow.name"] == "wf"
    assert a["multirun.run.id"] == ids[0]
    assert a["multirun.run.status"] == "completed"


def test_run_span_carries_budget_limits_that_are_set(traced) -> None:
    @run(budget=Budget(max_tokens=100_000, max_cost_usd=1.5, max_steps=50))
    def main() -> None:
        return None

    main()

    a = attrs(traced.span("invoke_workflow main"))
    budget_attrs = {k: v for k, v in a.items() if k.startswith("multirun.budget.")}
    assert budget_attrs == {
        "multirun.budget.max_tokens": 100_000,
        "multirun.budget.max_cost_usd": 1.5,
        "multirun.budget.max_steps": 50,
    }


def test_agent_span_has_agent_name_and_id_of_agent_model(traced) -> None:
    ids: list[str] = []

    @agent(name="planner")
    def plan() -> None:
        ids.append(get_current_agent_context().agent.id)

    @run
    def main() -> None:
        plan()

    main()

    a = attrs(traced.span("invoke_agent planner"))
    assert a["gen_ai.operation.name"] == "invoke_agent"
    assert a["gen_ai.agent.name"] == "planner"
    assert a["gen_ai.agent.id"] == ids[0]


def test_llm_step_span_is_named_after_model_reported_by_report_usage(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> str:
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5, provider="openai")
        return "answer"

    @run
    def main() -> str:
        return ask()

    assert main() == "answer"

    a = attrs(traced.span("chat gpt-4o-mini"))
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.response.model"] == "gpt-4o-mini"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["multirun.step.kind"] == "llm_call"
    assert a["multirun.step.name"] == "ask"


def test_llm_step_span_is_named_after_model_given_to_step(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> str:
        return "answer"

    @run
    def main() -> str:
        return ask()

    main()

    a = attrs(traced.span("chat gpt-4o"))
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-4o"


def test_llm_step_keeps_request_model_name_and_records_reported_response_model(traced) -> None:
    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> str:
        multirun.report_usage("gpt-4o-2024-08-06", input_tokens=3, output_tokens=4)
        return "answer"

    @run
    def main() -> str:
        return ask()

    main()

    a = attrs(traced.span("chat gpt-4o"))
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"


def test_tool_step_span_is_execute_tool_with_tool_name(traced) -> None:
    @step(kind=StepKind.TOOL_CALL)
    def web_search(q: str) -> str:
        return q.upper()

    @run
    def main() -> str:
        return web_search("x")

    assert main() == "X"

    a = attrs(traced.span("execute_tool web_search"))
    assert a["gen_ai.operation.name"] == "execute_tool"
    assert a["gen_ai.tool.name"] == "web_search"
    assert a["multirun.step.kind"] == "tool_call"


def test_other_step_span_is_step_name_with_kind(traced) -> None:
    @step(kind=StepKind.DECISION)
    def choose() -> int:
        return 2

    @run
    def main() -> int:
        return choose()

    main()

    a = attrs(traced.span("step choose"))
    assert a["multirun.step.kind"] == "decision"
    assert a["multirun.step.name"] == "choose"


def test_an_llm_step_is_a_client_span_and_runs_agents_tools_and_other_steps_are_internal(traced) -> None:
    """The GenAI conventions' span kinds: an inference span is CLIENT (the model is served
    elsewhere); invoke_workflow, an in-process invoke_agent and execute_tool are INTERNAL.
    Backends that derive service graphs and span metrics from the kind (Tempo, Datadog) see the
    model call as the outbound request it is."""

    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def ask() -> str:
        return "answer"

    @step(kind=StepKind.LLM_CALL, model="gpt-4o")
    def fail() -> str:
        raise TimeoutError("slow")

    @step(kind=StepKind.TOOL_CALL)
    def web_search() -> str:
        return "found"

    @step(kind=StepKind.SUB_AGENT)
    def helper() -> None:
        return None

    @step
    def parse() -> int:
        return 1

    @agent(name="planner")
    def plan() -> None:
        ask()
        with pytest.raises(TimeoutError):
            fail()
        web_search()
        helper()
        parse()

    @run(name="wf")
    def main() -> None:
        plan()

    main()

    kinds = {span.name: span.kind for span in traced.spans()}
    assert kinds == {
        "chat gpt-4o": SpanKind.CLIENT,
        "execute_tool web_search": SpanKind.INTERNAL,
        "invoke_agent helper": SpanKind.INTERNAL,
        "step parse": SpanKind.INTERNAL,
        "invoke_agent planner": SpanKind.INTERNAL,
        "invoke_workflow wf": SpanKind.INTERNAL,
    }
    assert [span.kind for span in traced.named("chat gpt-4o")] == [SpanKind.CLIENT, SpanKind.CLIENT]


def test_every_step_span_has_id_name_kind_status_and_attempt(traced) -> None:
    @step
    def parse() -> int:
        return 1

    @run
    def main() -> int:
        return parse()

    main()

    span = traced.span("step parse")
    a = attrs(span)
    assert a["multirun.step.id"] == hex_id(span)
    assert a["multirun.step.name"] == "parse"
    assert a["multirun.step.kind"] == "function"
    assert a["multirun.step.status"] == "completed"
    assert a["multirun.step.attempt"] == 1


def test_failed_step_records_error_type_and_error_status(traced) -> None:
    @step
    def explode() -> None:
        raise ValueError("bad value")

    @run
    def main() -> None:
        explode()

    with pytest.raises(ValueError, match="bad value"):
        main()

    span = traced.span("step explode")
    assert attrs(span)["multirun.step.status"] == "failed"
    assert attrs(span)["error.type"] == "ValueError"
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_failed_run_records_status_failed_error_type_and_error_status(traced) -> None:
    runs: list[Any] = []

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        raise TypeError("wrong")

    with pytest.raises(TypeError, match="wrong"):
        main()

    span = traced.span("invoke_workflow main")
    assert attrs(span)["multirun.run.status"] == "failed"
    assert attrs(span)["error.type"] == "TypeError"
    assert span.status.status_code is StatusCode.ERROR
    assert runs[0].status.value == "failed"
    assert runs[0].error == "wrong"


def test_failed_agent_inside_run_is_marked_failed_and_reraises(traced) -> None:
    @agent
    def worker() -> None:
        raise RuntimeError("agent broke")

    @run
    def main() -> None:
        worker()

    with pytest.raises(RuntimeError, match="agent broke"):
        main()

    a = attrs(traced.span("invoke_agent worker"))
    assert a["multirun.agent.status"] == "failed"
    assert a["error.type"] == "RuntimeError"


# ---------------------------------------------------------------------------
# retries


def flaky(failures: int, error: type[Exception] = ConnectionError) -> Any:
    """A callable that raises ``error`` ``failures`` times, then returns "ok"; counts calls."""
    calls = {"n": 0}

    def body() -> str:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise error(f"failure {calls['n']}")
        return "ok"

    body.calls = calls  # type: ignore[attr-defined]
    return body


@pytest.mark.parametrize(
    ("strategy", "delay", "expected"),
    [
        (BackoffStrategy.CONSTANT, 0.5, [0.5, 0.5, 0.5]),
        (BackoffStrategy.LINEAR, 2.0, [2.0, 4.0, 6.0]),
        (BackoffStrategy.EXPONENTIAL, 1.0, [1.0, 2.0, 4.0]),
    ],
)
def test_retry_sleeps_follow_backoff_strategy(traced, strategy, delay, expected) -> None:
    body = flaky(3)

    @step(retry=3, retry_delay=delay, retry_strategy=strategy)
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    assert main() == "ok"
    assert traced.clock.sleeps == expected
    assert body.calls["n"] == 4


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("linear", [3.0, 6.0, 7.0, 7.0]),
        ("exponential", [3.0, 6.0, 7.0, 7.0]),
        ("constant", [3.0, 3.0, 3.0, 3.0]),
    ],
)
def test_retry_delay_is_capped_by_retry_max_delay(traced, strategy, expected) -> None:
    body = flaky(4)

    @step(retry=4, retry_delay=3.0, retry_max_delay=7.0, retry_strategy=strategy)
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    assert main() == "ok"
    assert traced.clock.sleeps == expected


async def test_async_step_retries_with_async_sleeps(traced) -> None:
    body = flaky(2)

    @step(retry=2, retry_delay=0.25)
    async def fetch() -> str:
        return body()

    @run
    async def main() -> str:
        return await fetch()

    assert await main() == "ok"
    assert traced.clock.sleeps == [0.25, 0.5]


def test_generator_step_failing_before_first_item_is_retried(traced) -> None:
    body = flaky(1)

    @step(retry=1, retry_delay=1.0)
    def stream():  # type: ignore[no-untyped-def]
        yield body()
        yield "more"

    @run
    def main() -> list[str]:
        return list(stream())

    assert main() == ["ok", "more"]
    assert traced.clock.sleeps == [1.0]
    assert attrs(traced.span("step stream"))["multirun.step.attempt"] == 2


@pytest.mark.parametrize("kind", ["generator", "async_generator"])
async def test_generator_step_failing_after_an_item_is_not_retried_and_fails_with_step_error(
    traced, kind
) -> None:
    """Its consumer has the first item already: another attempt would hand it out again."""
    attempts: list[int] = []

    def sync_stream():  # type: ignore[no-untyped-def]
        attempts.append(1)
        yield "first"
        raise ConnectionError("cut")

    async def async_stream():  # type: ignore[no-untyped-def]
        attempts.append(1)
        yield "first"
        raise ConnectionError("cut")

    stream = step(name="stream", retry=2)(sync_stream if kind == "generator" else async_stream)
    seen: list[str] = []

    @run
    async def main() -> None:
        if kind == "generator":
            seen.extend(stream())
        else:
            async for item in stream():
                seen.append(item)

    with pytest.raises(StepError) as info:
        await main()
    assert isinstance(info.value.__cause__, ConnectionError)
    assert (seen, attempts, traced.clock.sleeps) == (["first"], [1], [])
    a = attrs(traced.span("step stream"))
    assert (a["multirun.step.status"], a["multirun.step.attempt"]) == ("failed", 1)


def test_retry_on_retries_listed_exception_types(traced) -> None:
    body = flaky(2, TimeoutError)

    @step(retry=2, retry_delay=1.0, retry_on=(ConnectionError, TimeoutError))
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    assert main() == "ok"
    assert body.calls["n"] == 3


def test_retry_on_does_not_retry_other_exception_types(traced) -> None:
    body = flaky(5, ValueError)

    @step(retry=3, retry_delay=1.0, retry_on=(ConnectionError,))
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    with pytest.raises((StepError, ValueError)) as info:
        main()

    assert body.calls["n"] == 1
    assert traced.clock.sleeps == []
    assert attrs(traced.span("step fetch"))["multirun.step.attempt"] == 1
    error = info.value
    original = error.__cause__ if isinstance(error, StepError) else error
    assert isinstance(original, ValueError)
    assert str(original) == "failure 1"


def test_step_error_after_last_attempt_has_last_error_as_cause(traced) -> None:
    errors: list[Exception] = []

    @step(retry=3, retry_delay=1.0)
    def fetch() -> None:
        error = ConnectionError(f"attempt {len(errors) + 1}")
        errors.append(error)
        raise error

    @run
    def main() -> None:
        fetch()

    with pytest.raises(StepError) as info:
        main()

    assert len(errors) == 4
    assert info.value.__cause__ is errors[-1]
    assert info.value.attempts == 4
    assert info.value.step_name == "fetch"


@pytest.mark.parametrize(
    "error",
    [
        StepError("fetch", 3, ConnectionError("down")),
        multirun.BudgetExceededError("max_steps", 2, 2, "run-1"),
        multirun.PolicyViolation("circuit_breaker", "circuit open for 'fetch'"),
        multirun.errors.LedgerUnavailableError("redis://h:6379/0", "run-1", "check", OSError("refused")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_multirun_errors_survive_pickle_and_copy(error: Exception) -> None:
    """A process pool, multiprocessing or a task queue pickles the error a worker raised, and
    ``copy.copy`` rebuilds it: both must give the same error back, not a TypeError."""
    import copy
    import pickle

    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert vars(again).keys() == vars(error).keys()
        for name, value in vars(error).items():
            assert repr(getattr(again, name)) == repr(value)


def test_each_failed_attempt_is_an_exception_event_with_attempt_and_delay(traced) -> None:
    body = flaky(10)

    @step(retry=3, retry_delay=1.0)
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    with pytest.raises(StepError):
        main()

    span = traced.span("step fetch")
    events = [e for e in span.events if e.name == "exception"]
    assert len(events) == 4
    retried = [
        (e.attributes["multirun.step.attempt"], e.attributes["multirun.step.retry_delay_seconds"])
        for e in events[:3]
    ]
    assert retried == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert [e.attributes["exception.message"] for e in events] == [
        "failure 1",
        "failure 2",
        "failure 3",
        "failure 4",
    ]


def test_span_of_retried_step_records_final_attempt_number(traced) -> None:
    body = flaky(2)

    @step(retry=5, retry_delay=1.0)
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    main()

    a = attrs(traced.span("step fetch"))
    assert a["multirun.step.attempt"] == 3
    assert a["multirun.step.status"] == "completed"


def test_span_of_step_failing_all_attempts_is_failed_with_error_type(traced) -> None:
    body = flaky(10)

    @step(retry=2, retry_delay=1.0)
    def fetch() -> str:
        return body()

    @run
    def main() -> str:
        return fetch()

    with pytest.raises(StepError):
        main()

    span = traced.span("step fetch")
    assert attrs(span)["multirun.step.attempt"] == 3
    assert attrs(span)["multirun.step.status"] == "failed"
    assert attrs(span)["error.type"] == "ConnectionError"
    assert span.status.status_code is StatusCode.ERROR


def test_retry_zero_reraises_original_exception_unchanged(traced) -> None:
    original = ConnectionError("down")

    @step
    def fetch() -> None:
        raise original

    @run
    def main() -> None:
        fetch()

    with pytest.raises(ConnectionError) as info:
        main()

    assert info.value is original
    assert traced.clock.sleeps == []


async def test_async_retry_zero_reraises_original_exception_unchanged(traced) -> None:
    original = KeyError("missing")

    @step(retry=0)
    async def fetch() -> None:
        raise original

    @run
    async def main() -> None:
        await fetch()

    with pytest.raises(KeyError) as info:
        await main()

    assert info.value is original


def test_step_outside_run_is_not_retried(traced) -> None:
    body = flaky(1)

    @step(retry=3)
    def fetch() -> str:
        return body()

    with pytest.raises(ConnectionError):
        fetch()
    assert body.calls["n"] == 1


# ---------------------------------------------------------------------------
# content capture


def shouted() -> str:
    """A run of one step, ``shout("hello")``, which returns ``"HELLO"``: its span is ``step shout``."""

    @step
    def shout(text: str) -> str:
        return text.upper()

    @run
    def main() -> str:
        return shout("hello")

    return main()


def test_content_is_not_captured_by_default(traced, monkeypatch) -> None:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    reinit(traced)

    assert shouted() == "HELLO"

    a = attrs(traced.span("step shout"))
    assert "multirun.step.input" not in a
    assert "multirun.step.output" not in a


def test_content_is_captured_with_init_capture_content(traced) -> None:
    reinit(traced, capture_content=True)

    shouted()

    a = attrs(traced.span("step shout"))
    assert a["multirun.step.input"] == "hello"
    assert a["multirun.step.output"] == "HELLO"


def test_content_is_captured_with_genai_capture_environment_variable(traced, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    reinit(traced)

    shouted()

    a = attrs(traced.span("step shout"))
    assert a["multirun.step.input"] == "hello"
    assert a["multirun.step.output"] == "HELLO"


@pytest.mark.parametrize(
    ("value", "captured"),
    [("SPAN_ONLY", True), ("span_and_event", True), ("EVENT_ONLY", False), ("NO_CONTENT", False)],
)
def test_the_genai_capture_variable_s_content_modes_are_honoured(
    traced, monkeypatch, caplog, value: str, captured: bool
) -> None:
    # the modes of opentelemetry-util-genai, which the GenAI instrumentations read: content was
    # recorded only for "true", so SPAN_ONLY silently recorded nothing
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", value)
    with caplog.at_level(logging.WARNING, logger="multirun"):
        reinit(traced)

    shouted()
    assert ("multirun.step.input" in attrs(traced.span("step shout"))) is captured
    assert not [r for r in caplog.records if "CAPTURE_MESSAGE_CONTENT" in r.getMessage()]


def test_a_genai_capture_variable_that_is_no_setting_is_one_warning_naming_it(
    traced, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "enabled")
    with caplog.at_level(logging.WARNING, logger="multirun"):
        reinit(traced)
        reinit(traced)  # the same value again: said once
    said = [r.getMessage() for r in caplog.records if "OTEL_INSTRUMENTATION_GENAI_CAPTURE" in r.getMessage()]
    assert len(said) == 1, said
    assert "'enabled'" in said[0] and "not recorded" in said[0]


def test_captured_ten_megabyte_argument_is_truncated_to_content_limit(traced) -> None:
    reinit(traced, capture_content=True, content_limit=1000)
    huge = "x" * (10 * 1024 * 1024)

    @step
    def measure(text: str) -> int:
        return len(text)

    @run
    def main() -> int:
        return measure(huge)

    assert main() == 10 * 1024 * 1024

    recorded = attrs(traced.span("step measure"))["multirun.step.input"]
    assert len(recorded) <= 1000
    assert recorded[:900] == "x" * 900


def test_captured_output_is_truncated_to_content_limit(traced) -> None:
    reinit(traced, capture_content=True, content_limit=100)

    @step
    def grow() -> str:
        return "y" * 5000

    @run
    def main() -> str:
        return grow()

    assert len(main()) == 5000

    recorded = attrs(traced.span("step grow"))["multirun.step.output"]
    assert len(recorded) <= 100
    assert recorded[:50] == "y" * 50


def _tools() -> Any:
    """A class with steps above ``@staticmethod`` and ``@classmethod`` (made at call time: the
    decorators run when the test does)."""

    class Tools:
        @step
        @staticmethod
        def double(x: int) -> int:
            return 2 * x

        @step
        @classmethod
        def name_of(cls) -> str:
            return cls.__name__

        @step
        @staticmethod
        async def fetch(x: int) -> int:
            await asyncio.sleep(0)
            raise TimeoutError(f"slow {x}")

    return Tools


class _AsyncTool:
    """A callable object whose ``__call__`` is a coroutine function."""

    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0)
        raise ConnectionError(f"down {x}")


def test_step_above_staticmethod_and_classmethod_works_through_class_and_instance(traced) -> None:
    tools = _tools()

    @run
    def main() -> tuple[int, int, str, str]:
        return tools.double(2), tools().double(3), tools.name_of(), tools().name_of()

    assert main() == (4, 6, "Tools", "Tools")
    assert len(traced.named("step double")) == 2
    assert len(traced.named("step name_of")) == 2


async def test_async_staticmethod_and_async_callable_object_steps_are_awaited_in_their_span(traced) -> None:
    tools = _tools()
    tool = step(name="tool")(_AsyncTool())

    @run
    async def main() -> None:
        with pytest.raises(TimeoutError):
            await tools.fetch(1)
        with pytest.raises(ConnectionError):
            await tool(2)

    await main()
    for name, error in (("step fetch", "TimeoutError"), ("step tool", "ConnectionError")):
        a = attrs(traced.span(name))
        assert a["multirun.step.status"] == "failed"
        assert a["error.type"] == error


def test_checkpoint_of_a_partial_or_a_callable_object_takes_the_name_it_is_given(traced) -> None:
    """Like the other decorators, @checkpoint decorates any callable; one without a name of
    its own is named with name=... (it raised AttributeError: no __name__)."""

    class Search:
        def __call__(self, query: str) -> list[str]:
            return [query]

    def add(a: int, b: int) -> int:
        return a + b

    search = checkpoint(name="searched")(Search())
    added = checkpoint(name="added", result_key="sum")(functools.partial(add, 1))

    taken: list[Any] = []

    @run
    def main() -> tuple[list[str], int]:
        result = search("otel"), added(2)
        taken.extend(get_current_run_context().run.checkpoints)
        return result

    assert main() == (["otel"], 3)
    states = {c.name: traced.client.checkpoints.load(c.id).state for c in taken}
    assert states == {"searched": {"result": ["otel"]}, "added": {"sum": 3}}
    with pytest.raises(ConfigurationError, match=r"^@checkpoint: pass name=\.\.\."):
        checkpoint(Search())


def _not_async_aware(func: Any) -> Any:
    """A decorator written for plain functions: its wrapper is no coroutine function, though
    calling it returns the coroutine of the ``async def`` it wraps."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


async def test_a_step_whose_callable_returns_a_coroutine_awaits_it_in_the_step_with_its_retries(
    traced,
) -> None:
    """A lambda around an async call (or a decorator that is not async-aware) is no coroutine
    function, yet what it does happens when its coroutine is awaited: the step spans that, and
    a failure there is retried and fails the step, as for an ``async def``. (The step ended
    'completed' when the coroutine was made, and its retries were never made.)"""
    calls: list[str] = []

    async def fetch(url: str) -> str:
        calls.append(url)
        await asyncio.sleep(0)
        if len(calls) < 3:
            raise ConnectionError("down")
        return await parse(url)

    @step
    async def parse(url: str) -> str:
        return f"page {url}"

    fetch_step = step(name="fetch", retry=2)(lambda url: fetch(url))

    @step(retry=1)
    @_not_async_aware
    async def broken(x: int) -> int:
        await asyncio.sleep(0)
        raise TimeoutError(f"slow {x}")

    @run
    async def main() -> str:
        with pytest.raises(StepError) as info:
            await broken(1)
        assert isinstance(info.value.__cause__, TimeoutError)
        return await fetch_step("a")

    assert await main() == "page a"
    assert calls == ["a", "a", "a"]
    fetched = traced.span("step fetch")
    assert attrs(fetched)["multirun.step.status"] == "completed"
    assert attrs(fetched)["multirun.step.attempt"] == 3
    assert traced.parent_of(traced.span("step parse")) is fetched
    failed = attrs(traced.span("step broken"))
    assert (failed["multirun.step.status"], failed["error.type"]) == ("failed", "TimeoutError")
    assert failed["multirun.step.attempt"] == 2


async def test_a_run_and_a_checkpoint_whose_callable_returns_a_coroutine_end_when_it_is_awaited(
    traced,
) -> None:
    """The run is current while the coroutine runs (its steps were outside any run), and the
    checkpoint keeps the awaited value (it tried to keep the coroutine object)."""

    @step
    async def search(query: str) -> list[str]:
        await asyncio.sleep(0)
        return [query]

    taken: list[Any] = []

    async def research(query: str) -> list[str]:
        found = await save(query)
        taken.extend(get_current_run_context().run.checkpoints)
        return found

    save = checkpoint(name="searched")(lambda query: search(query))
    main = run(name="main")(lambda query: research(query))

    assert await main("otel") == ["otel"]
    assert traced.parent_of(traced.span("step search")) is traced.span("invoke_workflow main")
    assert [(c.name, traced.client.checkpoints.load(c.id).state) for c in taken] == [
        ("searched", {"result": ["otel"]})
    ]


async def test_a_step_whose_callable_returned_a_coroutine_runs_again_after_a_restore(traced) -> None:
    """Its recorded value is not served: a value is no coroutine to await."""
    calls: list[str] = []
    crash = True

    async def fetch(url: str) -> str:
        calls.append(url)
        await asyncio.sleep(0)
        return f"page {url}"

    fetch_step = step(name="fetch")(lambda url: fetch(url))

    @run(checkpoint_on_error=False)
    async def job() -> str:
        page = await fetch_step("a")
        get_current_run_context().checkpoint(name="fetched")
        if crash:
            raise RuntimeError("crash")
        return page

    with pytest.raises(RuntimeError):
        await job()
    crash = False
    run_id = traced.span("invoke_workflow job").attributes["multirun.run.id"]
    with multirun.resume(run_id=run_id):
        assert await job() == "page a"
    assert calls == ["a", "a"]


def duration(span: Any) -> float:
    """The span's seconds, and 5 ms: a timer of the event loop may fire that early by the wall clock."""
    return (span.end_time - span.start_time) / 1e9 + 0.005


async def test_a_step_that_returns_a_task_or_gather_times_the_work_and_records_its_failure(traced) -> None:
    """A plain function that starts work and returns its future: the caller gets that very
    object (to cancel it, wait on it), and the step ends when it is done, failed with its error.
    (It ended as it returned: its span did not time the work, and a failure was not the step's.)"""

    async def work(seconds: float, fail: bool = False) -> str:
        await asyncio.sleep(seconds)
        if fail:
            raise ConnectionError("down")
        return f"slept {seconds}"

    started: list[Any] = []

    @step
    def start(seconds: float) -> asyncio.Task[str]:
        started.append(asyncio.ensure_future(work(seconds)))
        return started[-1]

    @step(retry=2)
    def both() -> asyncio.Future[list[str]]:
        return asyncio.gather(work(0.01), work(0.05, fail=True))

    @run
    async def main() -> str:
        task = start(0.1)
        assert task is started[0] and not task.done()
        with pytest.raises(ConnectionError, match="down"):
            await both()
        return await task

    assert await main() == "slept 0.1"
    await asyncio.sleep(0)  # the done callbacks of the last future ran
    started_span = traced.span("step start")
    assert attrs(started_span)["multirun.step.status"] == "completed"
    assert duration(started_span) >= 0.1
    failed = traced.span("step both")
    assert attrs(failed)["multirun.step.status"] == "failed"
    assert attrs(failed)["error.type"] == "ConnectionError"
    assert attrs(failed)["multirun.step.attempt"] == 1  # the work was under way: no retry
    assert duration(failed) >= 0.05
    assert [e.name for e in failed.events] == ["exception"]


async def test_a_step_whose_returned_task_is_cancelled_ends_failed_with_the_cancellation(traced) -> None:
    @step
    def start() -> asyncio.Task[None]:
        return asyncio.ensure_future(asyncio.sleep(10))

    @run
    async def main() -> None:
        task = start()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await main()
    started = attrs(traced.span("step start"))
    assert started["multirun.step.status"] == "failed"
    assert started["error.type"] == "asyncio.exceptions.CancelledError"


def test_a_step_that_returns_an_executor_future_times_the_work_and_records_its_failure(traced) -> None:
    import concurrent.futures
    import time

    def work(seconds: float) -> float:
        time.sleep(seconds)
        if seconds > 0.1:
            raise TimeoutError(f"slow {seconds}")
        return seconds

    with concurrent.futures.ThreadPoolExecutor(2) as pool:

        @step
        def submit(seconds: float) -> concurrent.futures.Future[float]:
            return pool.submit(work, seconds)

        @run
        def main() -> float:
            quick, slow = submit(0.1), submit(0.15)
            with pytest.raises(TimeoutError):
                slow.result()
            return quick.result()

        assert main() == 0.1
    # submitted in turn: on a loaded machine the quick one may end after the slow one
    quick, slow = sorted(traced.named("step submit"), key=lambda s: s.start_time)
    assert attrs(quick)["multirun.step.status"] == "completed" and duration(quick) >= 0.1
    assert attrs(slow)["multirun.step.status"] == "failed" and duration(slow) >= 0.15
    assert attrs(slow)["error.type"] == "TimeoutError"


def test_a_step_whose_future_outlives_its_run_ends_with_it_marked_unfinished(traced) -> None:
    """As a stream returned and not read: the step ends with its agent (here the run's), not
    when the work is done, long after, or never."""
    import concurrent.futures
    import threading

    go = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:

        @step
        def submit() -> concurrent.futures.Future[bool]:
            return pool.submit(go.wait, 10)

        @run
        def main() -> concurrent.futures.Future[bool]:
            return submit()

        future = main()
        submitted = traced.span("step submit")  # ended already
        go.set()
        assert future.result() is True
    assert attrs(submitted)["multirun.step.status"] == "completed"
    assert attrs(submitted)["multirun.step.unfinished"] is True
    assert submitted.end_time <= traced.span("invoke_workflow main").end_time
    assert len(traced.named("step submit")) == 1  # ended once


class _Unprintable:
    """An object of the program whose ``str`` and ``repr`` raise (a proxy, a half-built object)."""

    def __str__(self) -> str:
        raise RuntimeError("str explodes")

    def __repr__(self) -> str:
        raise RuntimeError("repr explodes")


def test_captured_content_that_cannot_be_rendered_never_fails_the_step(traced) -> None:
    reinit(traced, capture_content=True)

    @step
    def echo(value: Any) -> Any:
        return value

    @run
    def main() -> Any:
        return echo(_Unprintable()), echo([_Unprintable()]), echo({"k": _Unprintable()})

    assert all(isinstance(v, (_Unprintable, list, dict)) for v in main())

    spans = traced.named("step echo")
    assert len(spans) == 3
    for span in spans:
        a = attrs(span)
        assert a["multirun.step.status"] == "completed"
        assert "_Unprintable" in a["multirun.step.input"]
        assert "_Unprintable" in a["multirun.step.output"]


def test_finished_steps_leave_no_reference_cycles_for_the_garbage_collector(traced) -> None:
    """A step is freed by reference counting: cycles would make every step cost a GC pass."""
    import gc

    @step
    def work() -> int:
        return 1

    @step
    async def work_async() -> int:
        return 2

    @step
    def stream() -> Any:
        yield 1

    cyclic: list[object] = []

    @run(name="main")
    async def main() -> None:
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(50):
                work()
                await work_async()
                list(stream())
            gc.collect()  # the run is alive: only what the steps left in cycles is found
            cyclic.extend(o for o in gc.garbage if isinstance(o, multirun.context.StepContext))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()

    asyncio.run(main())
    assert cyclic == []


def test_an_ended_run_and_its_steps_are_freed_without_the_garbage_collector(traced) -> None:
    """Short runs must not leave their steps (and spans) for the cyclic GC to find; what a
    run kept of them is in ``Run.steps``, and each agent still lists its own."""
    import gc

    @step
    def work() -> int:
        return 1

    @agent(name="helper")
    def helper() -> None:
        work()

    @run(name="short")
    def short() -> None:
        work()
        helper()

    short()  # warm up: first calls build caches
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            short()
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, multirun.context.StepContext)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []

    kept: dict[str, Any] = {}

    @run(name="kept")
    def kept_run() -> None:
        kept["run"] = multirun.context.get_current_run_context()
        kept["agent"] = multirun.context.get_current_run_context().default_agent
        work()
        work()

    kept_run()
    assert [s.name for s in kept["run"].run.steps] == ["work", "work"]
    assert [s.name for s in kept["agent"].steps] == ["work", "work"]


def test_a_step_error_after_one_attempt_says_attempt(traced) -> None:
    """retry_on that does not match: no retry, and the message counts one attempt."""
    from multirun.errors import StepError

    @step(retry=2, retry_on=(KeyError,))
    def parse() -> None:
        raise ValueError("bad input")

    @run
    def job() -> None:
        parse()

    with pytest.raises(StepError) as info:
        job()
    assert str(info.value) == "step 'parse' failed after 1 attempt: ValueError: bad input"
    assert isinstance(info.value.__cause__, ValueError)


async def test_a_step_cancelled_in_its_backoff_says_it_made_one_attempt(traced) -> None:
    """Cancelled while it waits to retry, the step made one attempt: its span says 1, not 2."""
    from multirun.clock import Clock

    traced.client.clock = Clock()  # a real sleep, really cancelled
    failed = asyncio.Event()

    @step(retry=2, retry_delay=30.0)
    async def fetch() -> str:
        failed.set()
        raise ConnectionError("reset")

    @run
    async def job() -> str:
        return await fetch()

    task = asyncio.create_task(job())
    await failed.wait()
    await asyncio.sleep(0.01)  # in its backoff now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    span = traced.span("step fetch")
    assert attrs(span)["multirun.step.attempt"] == 1
    retried = [e for e in span.events if "multirun.step.retry_delay_seconds" in (e.attributes or {})]
    assert [e.attributes["multirun.step.attempt"] for e in retried] == [1]


def interrupted_by_alarm(job: Any) -> None:
    """Call ``job``, which sets an ``ITIMER_REAL`` alarm: the alarm is a Ctrl-C
    (KeyboardInterrupt), which must end the call. The timer and handler are put back after."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            job()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_step_interrupted_in_its_backoff_says_it_made_one_attempt(traced) -> None:
    """Ctrl-C while a sync step waits to retry: one attempt was made, and its span says so."""
    import signal

    from multirun.clock import Clock

    class CtrlCInTheBackoff(Clock):
        """Real time; Ctrl-C comes 0.05 s into a sleep (set from the step, it could come
        before the backoff began on a loaded machine)."""

        def sleep(self, seconds: float) -> None:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            super().sleep(seconds)

    traced.client.clock = CtrlCInTheBackoff()

    @step(retry=2, retry_delay=30.0)
    def fetch() -> str:
        raise ConnectionError("reset")

    @run
    def job() -> str:
        return fetch()

    interrupted_by_alarm(job)
    span = traced.span("step fetch")
    assert attrs(span)["multirun.step.attempt"] == 1


class SlowToSay(ConnectionError):
    """An error whose message takes long enough to tell for a Ctrl-C (the alarm) to come."""

    def __str__(self) -> str:
        import signal
        import time

        signal.setitimer(signal.ITIMER_REAL, 0.05)
        time.sleep(5)  # Ctrl-C comes meanwhile
        return "reset"


@pytest.mark.parametrize("retries", [2, 0], ids=["before a retry", "with no retry left"])
def test_ctrl_c_while_a_failure_is_recorded_ends_the_step_failed(traced, retries: int) -> None:
    """Ctrl-C while multirun records a failed attempt (here: while it reads the error's
    message), before its retry or as the step's final failure, ends the step as failed with
    the interrupt, and the run too; either left the span open, never exported, and the step
    missing from the trace."""

    @step(retry=retries, retry_delay=30.0)
    def fetch() -> str:
        raise SlowToSay()

    @run
    def job() -> str:
        return fetch()

    interrupted_by_alarm(job)
    fetched = attrs(traced.span("step fetch"))
    assert fetched["multirun.step.status"] == "failed"
    assert fetched["error.type"] == "KeyboardInterrupt"
    assert fetched["multirun.step.attempt"] == 1
    assert traced.span("step fetch").status.status_code is StatusCode.ERROR
    assert attrs(traced.span("invoke_workflow job"))["multirun.run.status"] == "failed"


def test_ctrl_c_while_a_run_records_its_failure_still_ends_its_span(traced) -> None:
    """Ctrl-C while a failed run records its error (here: while it reads the error's message)
    ends the run as failed with the interrupt; it left the run's span, the trace's root, open."""

    @multirun.agent(name="helper")
    def helper() -> None:
        raise SlowToSay()

    @run
    def job() -> None:
        helper()

    interrupted_by_alarm(job)
    for name in ("invoke_workflow job", "invoke_agent helper"):
        ended = traced.span(name)
        assert ended.status.status_code is StatusCode.ERROR
        assert attrs(ended)["error.type"] == "KeyboardInterrupt"
    assert attrs(traced.span("invoke_workflow job"))["multirun.run.status"] == "failed"
    assert attrs(traced.span("invoke_agent helper"))["multirun.agent.status"] == "failed"
