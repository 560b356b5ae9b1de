"""Parent/child links of run, agent and step spans under concurrency, threads and generators.

Reference 002 (contexts are async-safe, backed by contextvars) and DESIGN.md
(one span per run, agent and step).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import multirun
from multirun import agent, run, step
from multirun.context import get_current_run_context
from multirun.models import Run, StepKind


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def is_child(child: Any, parent: Any) -> bool:
    return (
        child.parent is not None
        and child.parent.span_id == parent.context.span_id
        and child.context.trace_id == parent.context.trace_id
    )


# ---------------------------------------------------------------------------
# plain nesting


def test_nested_step_is_child_of_outer_step(traced) -> None:
    @step
    def inner() -> int:
        return 1

    @step
    def outer() -> int:
        return inner() + inner()

    @run
    def main() -> int:
        return outer()

    assert main() == 2

    outer_span = traced.span("step outer")
    inners = traced.named("step inner")
    assert len(inners) == 2
    assert all(is_child(s, outer_span) for s in inners)
    assert is_child(outer_span, traced.span("invoke_workflow main"))


def test_three_levels_of_steps_nest_in_order(traced) -> None:
    @step
    def c() -> str:
        return "c"

    @step
    def b() -> str:
        return "b" + c()

    @step
    def a() -> str:
        return "a" + b()

    @run
    def main() -> str:
        return a()

    assert main() == "abc"
    assert is_child(traced.span("step c"), traced.span("step b"))
    assert is_child(traced.span("step b"), traced.span("step a"))
    assert is_child(traced.span("step a"), traced.span("invoke_workflow main"))


def test_steps_of_an_agent_are_children_of_agent_span(traced) -> None:
    @step
    def search() -> str:
        return "s"

    @agent(name="researcher")
    def research() -> str:
        return search()

    @run
    def main() -> str:
        return research()

    main()

    agent_span = traced.span("invoke_agent researcher")
    assert is_child(traced.span("step search"), agent_span)
    assert is_child(agent_span, traced.span("invoke_workflow main"))


def test_run_with_one_step_and_no_agent_exports_exactly_two_spans(traced) -> None:
    @step
    def only() -> None:
        return None

    @run
    def main() -> None:
        only()

    main()

    assert sorted(s.name for s in traced.spans()) == ["invoke_workflow main", "step only"]


def test_agent_called_inside_step_is_child_of_that_step(traced) -> None:
    @agent(name="helper")
    def helper() -> int:
        return 3

    @step
    def delegate() -> int:
        return helper()

    @run
    def main() -> int:
        return delegate()

    assert main() == 3
    assert is_child(traced.span("invoke_agent helper"), traced.span("step delegate"))


def test_two_sequential_runs_are_separate_traces(traced) -> None:
    @run
    def main() -> None:
        return None

    main()
    main()

    first, second = traced.named("invoke_workflow main")
    assert first.parent is None
    assert second.parent is None
    assert first.context.trace_id != second.context.trace_id


# ---------------------------------------------------------------------------
# asyncio


async def test_steps_under_gather_are_children_of_run_span(traced) -> None:
    @step
    async def fetch(i: int) -> int:
        await asyncio.sleep(0)
        return i * 10

    @run
    async def main() -> list[int]:
        return list(await asyncio.gather(*(fetch(i) for i in range(5))))

    assert await main() == [0, 10, 20, 30, 40]

    run_span = traced.span("invoke_workflow main")
    fetches = traced.named("step fetch")
    assert len(fetches) == 5
    assert all(is_child(s, run_span) for s in fetches)


async def test_agents_under_gather_keep_their_own_steps(traced) -> None:
    @step
    async def work(tag: str) -> str:
        await asyncio.sleep(0)
        return tag

    def make_agent(name: str) -> Any:
        @agent(name=name)
        async def body() -> list[str]:
            out = []
            for i in range(3):
                out.append(await step(name=f"{name}_step")(work)(f"{name}{i}"))
                await asyncio.sleep(0)
            return out

        return body

    alpha, beta = make_agent("alpha"), make_agent("beta")

    @run
    async def main() -> list[list[str]]:
        return list(await asyncio.gather(alpha(), beta()))

    assert await main() == [["alpha0", "alpha1", "alpha2"], ["beta0", "beta1", "beta2"]]

    for name in ("alpha", "beta"):
        agent_span = traced.span(f"invoke_agent {name}")
        own = traced.named(f"step {name}_step")
        assert len(own) == 3
        assert all(is_child(s, agent_span) for s in own)
        inner = [s for s in traced.named("step work") if any(is_child(s, o) for o in own)]
        assert len(inner) == 3


async def test_steps_under_gather_inside_a_step_are_children_of_that_step(traced) -> None:
    @step
    async def leaf(i: int) -> int:
        await asyncio.sleep(0)
        return i

    @step
    async def fan_out() -> int:
        return sum(await asyncio.gather(leaf(1), leaf(2), leaf(3)))

    @run
    async def main() -> int:
        return await fan_out()

    assert await main() == 6

    parent = traced.span("step fan_out")
    assert [is_child(s, parent) for s in traced.named("step leaf")] == [True, True, True]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup needs Python 3.11")
async def test_steps_in_task_group_are_children_of_enclosing_agent(traced) -> None:
    @step
    async def fetch(i: int) -> int:
        await asyncio.sleep(0)
        return i + 1

    @agent(name="grouper")
    async def grouper() -> list[int]:
        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
            tasks = [group.create_task(fetch(i)) for i in range(4)]
        return [t.result() for t in tasks]

    @run
    async def main() -> list[int]:
        return await grouper()

    assert await main() == [1, 2, 3, 4]

    agent_span = traced.span("invoke_agent grouper")
    fetches = traced.named("step fetch")
    assert len(fetches) == 4
    assert all(is_child(s, agent_span) for s in fetches)


async def test_cancelled_step_task_ends_its_span_and_run_goes_on(traced) -> None:
    started = asyncio.Event()

    @step(retry=2)
    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    @run
    async def main() -> str:
        task = asyncio.create_task(forever())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "went on"

    assert await main() == "went on"

    step_span = traced.span("step forever")
    assert attrs(step_span)["multirun.step.status"] == "failed"
    assert attrs(step_span)["multirun.step.attempt"] == 1
    assert is_child(step_span, traced.span("invoke_workflow main"))
    assert attrs(traced.span("invoke_workflow main"))["multirun.run.status"] == "completed"
    assert traced.clock.sleeps == []


async def test_concurrent_runs_under_gather_do_not_share_spans(traced) -> None:
    @step
    async def work() -> str:
        await asyncio.sleep(0)
        return get_current_run_context().run.name

    @run(name="first")
    async def first() -> str:
        return await work()

    @run(name="second")
    async def second() -> str:
        return await work()

    assert await asyncio.gather(first(), second()) == ["first", "second"]

    works = traced.named("step work")
    assert len(works) == 2
    parents = sorted(span.name for w in works for span in traced.spans() if is_child(w, span))
    assert parents == ["invoke_workflow first", "invoke_workflow second"]


# ---------------------------------------------------------------------------
# threads


def test_steps_called_in_thread_pool_inside_step_are_children_of_that_step(traced) -> None:
    @step
    def square(i: int) -> int:
        return i * i

    @step
    def parallel() -> list[int]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(square, range(6)))

    @run
    def main() -> list[int]:
        return parallel()

    assert main() == [0, 1, 4, 9, 16, 25]

    parent = traced.span("step parallel")
    squares = traced.named("step square")
    assert len(squares) == 6
    assert all(is_child(s, parent) for s in squares)


def test_steps_submitted_to_thread_pool_see_the_run(traced) -> None:
    names: list[str] = []
    lock = threading.Lock()

    @step
    def record() -> None:
        with lock:
            names.append(get_current_run_context().run.name)

    @run(name="pooled")
    def main() -> None:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(record) for _ in range(3)]
            for f in futures:
                f.result()

    main()

    assert names == ["pooled", "pooled", "pooled"]
    run_span = traced.span("invoke_workflow pooled")
    assert all(is_child(s, run_span) for s in traced.named("step record"))


def test_steps_in_plain_thread_started_in_step_are_children_of_that_step(traced) -> None:
    @step
    def child() -> None:
        return None

    @step
    def spawner() -> None:
        t = threading.Thread(target=child)
        t.start()
        t.join()

    @run
    def main() -> None:
        spawner()

    main()

    assert is_child(traced.span("step child"), traced.span("step spawner"))


async def test_steps_run_with_asyncio_to_thread_are_children_of_calling_step(traced) -> None:
    @step
    def blocking(i: int) -> int:
        return i + 100

    @step
    async def offload() -> list[int]:
        return list(await asyncio.gather(*(asyncio.to_thread(blocking, i) for i in range(3))))

    @run
    async def main() -> list[int]:
        return await offload()

    assert await main() == [100, 101, 102]
    parent = traced.span("step offload")
    assert [is_child(s, parent) for s in traced.named("step blocking")] == [True, True, True]


async def test_steps_run_in_executor_are_children_of_calling_step(traced) -> None:
    @step
    def blocking() -> int:
        return 1

    @step
    async def offload() -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, blocking)

    @run
    async def main() -> int:
        return await offload()

    assert await main() == 1
    assert is_child(traced.span("step blocking"), traced.span("step offload"))


# ---------------------------------------------------------------------------
# generators


def test_step_called_by_consumer_between_yields_is_not_child_of_generator(traced) -> None:
    @step
    def produce():  # type: ignore[no-untyped-def]
        yield 1
        yield 2

    @step
    def handle(x: int) -> int:
        return x * 100

    @step
    def consume() -> list[int]:
        return [handle(item) for item in produce()]

    @run
    def main() -> list[int]:
        return consume()

    assert main() == [100, 200]

    consumer = traced.span("step consume")
    producer = traced.span("step produce")
    handles = traced.named("step handle")
    assert len(handles) == 2
    assert all(is_child(h, consumer) for h in handles)
    assert not any(is_child(h, producer) for h in handles)
    assert is_child(producer, consumer)


async def test_step_called_by_consumer_between_async_yields_is_not_child_of_generator(
    traced,
) -> None:
    @step
    async def produce():  # type: ignore[no-untyped-def]
        yield 1
        await asyncio.sleep(0)
        yield 2

    @step
    async def handle(x: int) -> int:
        return x * 100

    @step
    async def consume() -> list[int]:
        return [await handle(item) async for item in produce()]

    @run
    async def main() -> list[int]:
        return await consume()

    assert await main() == [100, 200]

    consumer = traced.span("step consume")
    producer = traced.span("step produce")
    handles = traced.named("step handle")
    assert len(handles) == 2
    assert all(is_child(h, consumer) for h in handles)
    assert not any(is_child(h, producer) for h in handles)


def test_step_called_inside_generator_body_is_child_of_generator(traced) -> None:
    @step
    def fetch(i: int) -> int:
        return i

    @step
    def produce():  # type: ignore[no-untyped-def]
        for i in range(2):
            yield fetch(i)

    @run
    def main() -> list[int]:
        return list(produce())

    assert main() == [0, 1]
    producer = traced.span("step produce")
    assert [is_child(s, producer) for s in traced.named("step fetch")] == [True, True]


async def test_step_called_inside_async_generator_body_is_child_of_generator(traced) -> None:
    @step
    async def fetch(i: int) -> int:
        return i

    @step
    async def produce():  # type: ignore[no-untyped-def]
        for i in range(2):
            yield await fetch(i)

    @run
    async def main() -> list[int]:
        return [i async for i in produce()]

    assert await main() == [0, 1]
    producer = traced.span("step produce")
    assert [is_child(s, producer) for s in traced.named("step fetch")] == [True, True]


def test_steps_after_generator_is_exhausted_are_children_of_run(traced) -> None:
    @step
    def produce():  # type: ignore[no-untyped-def]
        yield 1

    @step
    def after() -> None:
        return None

    @run
    def main() -> None:
        list(produce())
        after()

    main()

    assert is_child(traced.span("step after"), traced.span("invoke_workflow main"))


# ---------------------------------------------------------------------------
# sub-runs


def test_sub_run_has_parent_id_of_enclosing_run(traced) -> None:
    models: dict[str, Run] = {}

    @run(name="child")
    def child() -> None:
        models["child"] = get_current_run_context().run

    @run(name="parent")
    def parent() -> None:
        models["parent"] = get_current_run_context().run
        child()

    parent()

    assert models["child"].parent_id == models["parent"].id
    assert models["parent"].parent_id is None
    child_span = traced.span("invoke_workflow child")
    assert attrs(child_span)["multirun.run.parent_id"] == models["parent"].id
    assert is_child(child_span, traced.span("invoke_workflow parent"))


def test_sub_run_called_in_step_is_child_of_that_step(traced) -> None:
    @run(name="child")
    def child() -> int:
        return 1

    @step
    def delegate() -> int:
        return child()

    @run(name="parent")
    def parent() -> int:
        return delegate()

    assert parent() == 1
    assert is_child(traced.span("invoke_workflow child"), traced.span("step delegate"))


def test_sub_run_spend_rolls_up_into_parent_run(traced) -> None:
    models: dict[str, Run] = {}

    @step(kind=StepKind.LLM_CALL)
    def ask(n: int) -> None:
        multirun.report_usage("unknown-model-for-tests", input_tokens=n, output_tokens=0, cost_usd=n / 1000)

    @run(name="child")
    def child() -> None:
        models["child"] = get_current_run_context().run
        ask(300)

    @run(name="parent")
    def parent() -> None:
        models["parent"] = get_current_run_context().run
        ask(100)
        child()

    parent()

    assert models["child"].tokens_used == 300
    assert models["child"].cost_usd == pytest.approx(0.3)
    assert models["parent"].tokens_used == 400
    assert models["parent"].cost_usd == pytest.approx(0.4)
    assert attrs(traced.span("invoke_workflow child"))["multirun.tokens_used"] == 300
    assert attrs(traced.span("invoke_workflow parent"))["multirun.tokens_used"] == 400
    assert attrs(traced.span("invoke_workflow parent"))["multirun.cost_usd"] == pytest.approx(0.4)


def test_sub_run_spend_rolls_up_into_step_that_called_it(traced) -> None:
    @step(kind=StepKind.LLM_CALL)
    def ask() -> None:
        multirun.report_usage("unknown-model-for-tests", input_tokens=70, cost_usd=0.07)

    @run(name="child")
    def child() -> None:
        ask()

    @step
    def delegate() -> None:
        child()

    @run(name="parent")
    def parent() -> None:
        delegate()

    parent()

    assert attrs(traced.span("step delegate")).get("multirun.tokens_used") == 70
    assert attrs(traced.span("invoke_workflow parent"))["multirun.tokens_used"] == 70


def test_sub_run_of_a_run_context_made_with_its_own_client_uses_that_client(traced, tmp_path) -> None:
    """Reference 000: @run gets its client "from the current context". A run made by hand with a
    client of its own (RunContext(client=...)) gives that client to the @run called inside it, so
    the sub-run's span joins the parent's trace in the parent's provider, and its checkpoints go
    to the parent's store, not to those of the process's default client."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from multirun.context import RunContext, get_current_client

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    own = multirun.MultiRunClient(
        tracer_provider=provider, checkpoint_store=str(tmp_path / "own"), metrics=False
    )
    seen: dict[str, Any] = {}

    @run(name="child")
    def child() -> None:
        seen["client"] = get_current_client()
        seen["checkpoint"] = get_current_run_context().checkpoint(name="in_child").id

    with RunContext(client=own, run=Run(name="outer")):
        child()
    provider.shutdown()

    assert seen["client"] is own
    names = [span.name for span in exporter.get_finished_spans()]
    assert names == ["invoke_workflow child", "invoke_workflow outer"]
    assert traced.spans() == []
    own.checkpoints.load(seen["checkpoint"])  # in the parent's store
