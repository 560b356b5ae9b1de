"""Steps under the async runtimes production agents run on: asyncio with eager tasks, uvloop,
anyio on its asyncio and trio backends, plain trio; and async generator steps closed by the
event loop rather than by the program.

Waits here are real, and short: what is checked is that the library running the step does
the waiting (trio has no asyncio loop to sleep on). Rate-limit slots are reserved on a clock
that stands still: a loaded machine running the tasks far apart would free their slots.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import anyio
import pytest
import trio

import multirun
from multirun import agent, run, step
from multirun.clock import Clock
from multirun.context import get_current_agent_context, get_current_run_context
from multirun.errors import BudgetExceededError, StepError
from multirun.models import StepKind
from multirun.telemetry import attributes as attr
from needed import required
from test_checkpoints import Calls, Flaky

BACKENDS = ["asyncio", "trio"]


@pytest.fixture
def real_clock(traced: Any) -> Any:
    """``traced``, waiting in real time (its fake clock never sleeps, so never asks the runtime)."""
    traced.client.clock = Clock()
    return traced


class StoppedClock(Clock):
    """Real sleeps on a clock that stands still: tasks reserve their rate-limit slots at one
    instant, however far apart a loaded machine runs them, and each waits out its slot for real."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def stopped_clock(traced: Any) -> Any:
    """``traced``, waiting in real time for slots reserved at one instant (see StoppedClock)."""
    traced.client.clock = StoppedClock()
    return traced


def attrs_of(traced: Any, name: str) -> list[dict[str, Any]]:
    spans = sorted(traced.named(name), key=lambda s: s.start_time or 0)
    return [dict(s.attributes or {}) for s in spans]


def is_child(child: Any, parent: Any) -> bool:
    return child.parent is not None and child.parent.span_id == parent.context.span_id


# ---------------------------------------------------------------------------
# asyncio with eager tasks, and uvloop


def with_eager_tasks(main: Any) -> Any:
    async def eager() -> Any:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        return await main()

    return asyncio.run(eager())


def on_uvloop(main: Any) -> Any:
    uvloop = required("uvloop")
    return uvloop.run(main())


LOOPS = [
    pytest.param(
        with_eager_tasks,
        id="eager_tasks",
        marks=pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: 3.12+"),
    ),
    pytest.param(on_uvloop, id="uvloop"),
]


@pytest.mark.parametrize("run_loop", LOOPS)
def test_steps_as_eager_or_uvloop_tasks_nest_time_and_obey_budget_and_rate_limit(
    stopped_clock: Any, run_loop: Any
) -> None:
    @step
    async def at_once(i: int) -> int:  # an eager task runs it to its end inside create_task
        return i

    @step
    async def slow(i: int) -> int:
        await asyncio.sleep(0.02)
        return i

    @step(kind="llm_call", model="gpt-4o")
    async def ask(i: int) -> int:
        return i

    @step
    async def fan_out() -> list[int]:
        tasks = [asyncio.create_task(at_once(1)), asyncio.create_task(slow(2))]
        return [*await asyncio.gather(at_once(3), slow(4)), *[await task for task in tasks]]

    @run(budget={"max_steps": 8}, policy={"rate_limit": {"requests_per_minute": 3000}})
    async def main() -> list[int]:
        found = await fan_out()
        found += await asyncio.gather(ask(5), ask(6), ask(7))  # a slot every 0.02 s
        await at_once(99)  # the ninth step
        return found

    began = time.monotonic()
    with pytest.raises(BudgetExceededError):
        run_loop(main)
    assert time.monotonic() - began >= 0.039
    outer = stopped_clock.span("step fan_out")
    inner = stopped_clock.named("step at_once")[:2] + stopped_clock.named("step slow")
    assert all(is_child(s, outer) for s in inner)
    assert all(outer.start_time <= s.start_time and s.end_time <= outer.end_time for s in inner)
    assert all(s.end_time - s.start_time >= 19_000_000 for s in stopped_clock.named("step slow"))
    asks = attrs_of(stopped_clock, "chat gpt-4o")
    assert sorted(a[attr.POLICY_DECISION] for a in asks) == ["proceed", "wait", "wait"]
    refused = attrs_of(stopped_clock, "step at_once")[-1]
    assert refused[attr.STEP_STATUS] == "failed" and refused[attr.POLICY_RULE] == "budget"


# ---------------------------------------------------------------------------
# anyio on asyncio and trio: waits, budgets, cancellation


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_retried_async_step_waits_out_its_backoff_under_anyio(real_clock: Any, backend: str) -> None:
    attempts: list[float] = []

    @step(retry=2, retry_delay=0.02, retry_strategy="constant")
    async def fetch() -> str:
        attempts.append(time.monotonic())
        await anyio.sleep(0)
        if len(attempts) < 3:
            raise ConnectionError("flaky")
        return "ok"

    @run
    async def main() -> str:
        return await fetch()

    assert anyio.run(main, backend=backend) == "ok"
    assert len(attempts) == 3
    assert attempts[1] - attempts[0] >= 0.019 and attempts[2] - attempts[1] >= 0.019
    (fetched,) = attrs_of(real_clock, "step fetch")
    assert fetched[attr.STEP_STATUS] == "completed"
    assert fetched[attr.STEP_ATTEMPT] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_llm_steps_wait_for_their_rate_limit_slots_under_anyio(stopped_clock: Any, backend: str) -> None:
    @step(kind="llm_call", model="gpt-4o")
    async def ask(i: int) -> int:
        return i

    @run(policy={"rate_limit": {"requests_per_minute": 3000}})  # a slot every 0.02 s
    async def main() -> list[int]:
        answers: list[int] = []

        async def one(i: int) -> None:
            answers.append(await ask(i))

        async with anyio.create_task_group() as tasks:
            for i in range(3):
                tasks.start_soon(one, i)
        return sorted(answers)

    began = time.monotonic()
    assert anyio.run(main, backend=backend) == [0, 1, 2]
    assert time.monotonic() - began >= 0.039
    asks = attrs_of(stopped_clock, "chat gpt-4o")
    assert [a[attr.STEP_STATUS] for a in asks] == ["completed"] * 3
    assert sorted(a[attr.POLICY_DECISION] for a in asks) == ["proceed", "wait", "wait"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_manual_step_waits_for_its_slot_when_awaited_without_blocking_the_loop(
    stopped_clock: Any, backend: str
) -> None:
    # a slot every second: a start that blocked would take it all, well apart from one that does not
    @run(policy={"rate_limit": {"requests_per_minute": 60}})
    async def main() -> tuple[float, float]:
        agent_ctx = get_current_agent_context()
        (await agent_ctx.start_step("first", kind=StepKind.LLM_CALL)).complete()
        began = time.monotonic()
        second = agent_ctx.start_step("second", kind=StepKind.LLM_CALL)
        started = time.monotonic() - began  # a sleep here would stop every other task
        await second
        second.complete()
        return started, time.monotonic() - began

    started, waited = anyio.run(main, backend=backend)
    assert started < 0.5
    assert waited >= 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_steps_under_anyio_task_groups_nest_and_stop_at_the_budget(traced: Any, backend: str) -> None:
    @step
    async def leaf(i: int) -> int:
        await anyio.sleep(0.01)
        return i

    @step
    async def fan_out() -> list[int]:
        found: list[int] = []

        async def one(i: int) -> None:
            found.append(await leaf(i))

        async with anyio.create_task_group() as tasks:
            for i in range(3):
                tasks.start_soon(one, i)
        found.append(await anyio.to_thread.run_sync(lambda: 10))
        return sorted(found)

    @run(budget={"max_steps": 4})
    async def main() -> None:
        assert await fan_out() == [0, 1, 2, 10]
        await leaf(99)  # the fifth step

    with pytest.raises(BudgetExceededError):
        anyio.run(main, backend=backend)
    outer = traced.span("step fan_out")
    leaves = traced.named("step leaf")
    assert sum(is_child(s, outer) for s in leaves) == 3
    assert attrs_of(traced, "invoke_workflow main")[0][attr.RUN_STATUS] == "failed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_and_an_agent_cancelled_under_anyio_end_cancelled(traced: Any, backend: str) -> None:
    @step
    async def slow() -> None:
        await anyio.sleep(10)

    @agent
    async def worker() -> None:
        await slow()

    @run
    async def job() -> None:
        await worker()

    async def main() -> None:
        with anyio.move_on_after(0.02):
            await job()

    anyio.run(main, backend=backend)
    assert attrs_of(traced, "invoke_workflow job")[0][attr.RUN_STATUS] == "cancelled"
    assert attrs_of(traced, "invoke_agent worker")[0][attr.AGENT_STATUS] == "cancelled"
    assert attrs_of(traced, "step slow")[0][attr.STEP_STATUS] == "failed"  # a step has no such status


def test_a_wait_in_async_code_run_by_neither_asyncio_nor_trio_fails_the_step_saying_so(
    real_clock: Any,
) -> None:
    @step(retry=1, retry_delay=0.01)
    async def fetch() -> None:
        raise ConnectionError("down")

    @run
    async def main() -> None:
        await fetch()

    coroutine = main()
    with pytest.raises(StepError, match="neither asyncio nor trio"):
        coroutine.send(None)  # a runner of its own: no event loop that multirun knows


def test_retry_loops_in_trio_tasks_side_by_side_are_served_on_resume(traced: Any) -> None:
    calls = Calls()

    def program(flaky: Flaky, crash: bool) -> Any:
        asked, noted = trio.Event(), trio.Event()

        @step
        async def ask(query: str) -> str:
            calls(f"ask {query}")
            await trio.sleep(0)
            return flaky(query)

        @step
        async def note(text: str) -> str:
            calls(f"note {text}")
            return text

        async def with_retries(query: str, out: dict[str, Any]) -> None:
            for _ in range(3):  # the program's own retry loop around the step
                try:
                    out["answer"] = await ask(query)
                    return
                except ConnectionError:
                    pass
                finally:
                    asked.set()
                # the other task's steps run meanwhile: waited for, not slept on, as trio runs
                # the tasks whose times are up in random order (a loaded machine wakes both at once)
                await noted.wait()
            raise RuntimeError("gave up")

        async def notes(out: dict[str, Any]) -> None:
            await asked.wait()  # once the first call is over (failed, or served on resume)
            out["notes"] = [await note("a"), await note("b"), await note("c")]
            noted.set()

        @run(checkpoint_on_error=False)
        async def job() -> str:
            out: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(with_retries, "q", out)
                nursery.start_soon(notes, out)
            get_current_run_context().checkpoint(name="both done")
            if crash:
                raise RuntimeError("crash")
            return f"{out['answer']} {out['notes']}"

        return job

    recorded = Flaky(failures=1)
    with pytest.raises(RuntimeError):
        trio.run(program(recorded, crash=True))
    assert recorded.calls == 2
    assert calls.log.index("note a") < calls.log.index("ask q", 1)  # the retry came after a note
    run_id = traced.named("invoke_workflow job")[-1].attributes[attr.RUN_ID]

    # trio's tasks are told apart as asyncio's are: the notes of the other task, between the
    # failed call and its retry, do not hide the retry (the failed call is not made again)
    calls.log.clear()
    resumed = Flaky(failures=0)
    with multirun.resume(run_id=run_id):
        assert trio.run(program(resumed, crash=False)) == "answer to q ['a', 'b', 'c']"
    assert calls.log == []
    assert resumed.calls == 0


# ---------------------------------------------------------------------------
# async generator steps closed by the event loop


@pytest.mark.parametrize("in_run", [True, False])
def test_an_async_generator_step_left_open_is_closed_once_when_asyncio_run_ends(
    traced: Any, caplog: pytest.LogCaptureFixture, in_run: bool
) -> None:
    cleaned: list[str] = []
    left_open: list[Any] = []

    @step
    async def stream() -> Any:
        try:
            for i in range(10):
                yield i
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits: closing its connection
            cleaned.append("closed")

    async def read_one() -> int:
        chunks = stream()
        left_open.append(chunks)  # neither read to its end nor closed: asyncio.run closes it
        return int(await chunks.__anext__())

    @run
    async def job() -> int:
        return await read_one()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert asyncio.run(job() if in_run else read_one()) == 0
    # the loop closed the user's generator as the step's wrapper closed it: "aclose(): asynchronous
    # generator is already running", logged at exit, or raised by the step
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert cleaned == ["closed"]
    if in_run:
        (streamed,) = attrs_of(traced, "step stream")
        assert streamed[attr.STEP_STATUS] == "completed"
        assert streamed[attr.STEP_STREAM_ITEMS] == 1


# ---------------------------------------------------------------------------
# process pools (README: "Process pools")


@step
def in_worker(i: int) -> tuple[int, bool]:
    from multirun.context import has_active_run

    return i, has_active_run()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_process_pool_worker_runs_steps_in_a_copy_of_the_run_when_forked_and_outside_it_when_spawned(
    traced: Any, method: str
) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} here")

    @step
    def fan_out() -> list[tuple[int, bool]]:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
            return list(pool.map(in_worker, range(2)))

    @run
    def main() -> list[tuple[int, bool]]:
        return fan_out()

    assert main() == [(0, method == "fork"), (1, method == "fork")]
    assert traced.named("step in_worker") == []  # the worker's spans are its own process's
