"""The program's own odd objects pass through multirun as they would without it: an exception
whose ``__str__`` fails, arguments that fail when read, async generators driven by hand, a
recursion that runs out of stack."""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode

from child_processes import environment_without_settings
from multirun import agent, run, step
from multirun._stack import HEADROOM, headroom
from multirun.context import RunContext, get_current_run_context, has_active_run
from multirun.errors import StepError
from multirun.models import Run
from multirun.telemetry import attributes as attr
from multirun.telemetry.exceptions import STACKTRACE_FRAMES
from multirun.telemetry.local_files import read_spans


@dataclass
class Session:
    """A dataclass with a field set later: reading it before raises AttributeError."""

    user: str
    token: str = field(init=False)


class Remote(Mapping[str, str]):
    """A mapping read from a server that is down: reading its items raises."""

    def __getitem__(self, key: str) -> str:
        raise ConnectionError("server down")

    def __iter__(self) -> Iterator[str]:
        raise ConnectionError("server down")

    def __len__(self) -> int:
        return 1


FAIL_WHEN_READ: dict[str, Any] = {"dataclass": Session("ada"), "mapping": Remote()}


@pytest.mark.parametrize("argument", FAIL_WHEN_READ.values(), ids=FAIL_WHEN_READ)
def test_a_step_runs_with_an_argument_that_fails_when_read(traced, argument: Any) -> None:
    @step
    def use(value: Any) -> str:
        return type(value).__name__  # the step never reads what is not there yet

    @run
    def main() -> str:
        return use(argument)

    assert main() == type(argument).__name__
    span = traced.span("step use")
    assert span.attributes[attr.STEP_STATUS] == "completed"  # type: ignore[index]
    assert attr.STEP_INPUT_HASH not in span.attributes  # type: ignore[operator]  # never served from a checkpoint


@pytest.mark.parametrize("argument", FAIL_WHEN_READ.values(), ids=FAIL_WHEN_READ)
def test_a_sub_run_runs_with_an_argument_that_fails_when_read(traced, argument: Any) -> None:
    @run
    def inner(value: Any) -> str:
        return type(value).__name__

    @run
    def main() -> str:
        return inner(argument)

    assert main() == type(argument).__name__


class Unprintable(Exception):
    """An exception whose ``__str__`` fails: its message attribute is set only sometimes."""

    def __str__(self) -> str:
        return str(self.message)  # type: ignore[attr-defined]


def test_a_step_raising_an_exception_that_cannot_be_printed_raises_it_unchanged(traced) -> None:
    raised = Unprintable()

    @step
    def fails() -> None:
        raise raised

    @run
    def main() -> str:
        try:
            fails()
        except Unprintable as caught:
            assert caught is raised
            return "handled"
        return "not raised"

    assert main() == "handled"
    failed = traced.span("step fails")
    assert failed.attributes[attr.STEP_STATUS] == "failed"  # type: ignore[index]
    assert failed.attributes[attr.ERROR_TYPE].endswith("Unprintable")  # type: ignore[index]
    assert traced.span("invoke_workflow main").attributes[attr.RUN_STATUS] == "completed"  # type: ignore[index]


def test_a_retried_step_raising_an_exception_that_cannot_be_printed_fails_with_step_error(traced) -> None:
    @step(retry=2, retry_delay=0)
    def fails() -> None:
        raise Unprintable()

    @run
    def main() -> None:
        fails()

    with pytest.raises(StepError) as info:
        main()
    assert isinstance(info.value.__cause__, Unprintable)
    assert info.value.attempts == 3
    assert traced.span("step fails").attributes[attr.STEP_ATTEMPT] == 3  # type: ignore[index]


def test_a_run_and_an_agent_failing_with_an_exception_that_cannot_be_printed_raise_it(traced) -> None:
    runs: list[Any] = []

    @agent
    def worker() -> None:
        raise Unprintable()

    @run
    def main() -> None:
        runs.append(get_current_run_context().run)
        worker()

    with pytest.raises(Unprintable):
        main()
    assert runs[0].status.value == "failed"
    assert runs[0].error  # some text, not an error of its own
    assert traced.span("invoke_agent worker").attributes[attr.AGENT_STATUS] == "failed"  # type: ignore[index]
    assert traced.span("invoke_workflow main").attributes[attr.RUN_STATUS] == "failed"  # type: ignore[index]


def echo_stream(log: list[Any]) -> Any:
    """An async generator driven by hand: it logs what is sent and thrown into it, and its end."""

    async def echo() -> Any:
        try:
            sent = yield "ready"
            while True:
                try:
                    sent = yield f"got {sent}"
                except ValueError as thrown:
                    log.append(f"caught {thrown}")
                    sent = yield "recovered"
        finally:
            log.append("closed")

    return echo


@pytest.mark.parametrize("in_run", [False, True], ids=["outside a run", "in a run"])
async def test_an_async_generator_step_gets_what_is_sent_thrown_and_closed(traced, in_run: bool) -> None:
    log: list[Any] = []
    stream = step(name="echo")(echo_stream(log))

    async def drive() -> list[Any]:
        agen = stream()
        seen = [await agen.asend(None), await agen.asend("a"), await agen.athrow(ValueError("oops"))]
        seen.append(await agen.asend("b"))
        await agen.aclose()
        seen.append(list(log))  # closed at aclose(), not later when the generator is collected
        return seen

    expected = ["ready", "got a", "recovered", "got b", ["caught oops", "closed"]]
    assert await (run(drive)() if in_run else drive()) == expected


def test_a_generator_step_whose_cleanup_fails_when_closed_early_fails(traced) -> None:
    @step
    def rows() -> Iterator[int]:
        try:
            yield from [1, 2]
        finally:
            raise ConnectionError("cleanup failed")

    @run
    def main() -> str:
        stream = rows()
        next(stream)
        with pytest.raises(ConnectionError, match="cleanup failed"):
            stream.close()
        return "done"

    assert main() == "done"
    span = traced.span("step rows")
    assert span.attributes[attr.STEP_STATUS] == "failed"  # type: ignore[index]
    assert span.attributes[attr.ERROR_TYPE] == "ConnectionError"  # type: ignore[index]


async def test_an_async_generator_step_whose_cleanup_fails_when_closed_early_fails(traced) -> None:
    @step
    async def rows() -> Any:
        try:
            yield 1
            yield 2
        finally:
            raise ConnectionError("cleanup failed")

    @run
    async def main() -> str:
        stream = rows()
        await anext(stream)
        with pytest.raises(ConnectionError, match="cleanup failed"):
            await stream.aclose()
        return "done"

    assert await main() == "done"
    span = traced.span("step rows")
    assert span.attributes[attr.STEP_STATUS] == "failed"  # type: ignore[index]
    assert span.attributes[attr.ERROR_TYPE] == "ConnectionError"  # type: ignore[index]


def test_a_step_given_an_int_too_long_to_print_runs_unhashed(traced) -> None:
    @step
    def digits(n: int, *, base: int = 10) -> int:
        return n.bit_length()

    @run
    def main() -> tuple[int, int]:
        return digits(10**5000), digits(10**5000, base=10)

    assert main() == ((10**5000).bit_length(),) * 2
    assert all(attr.STEP_INPUT_HASH not in s.attributes for s in traced.named("step digits"))


# ---------------------------------------------------------------------------
# a recursion that runs out of stack


class OpenSpans(SpanProcessor):
    """The names of the spans started and not ended yet, by span id."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        self.open.pop(span.context.span_id, None)


@pytest.fixture
def open_spans(traced) -> OpenSpans:  # type: ignore[no-untyped-def]
    spans = OpenSpans()
    traced.provider.add_span_processor(spans)
    return spans


@contextmanager
def stack_limit(frames: int) -> Iterator[None]:
    """The recursion limit ``frames`` above the caller's depth for the block: a runaway recursion
    reaches it in a few dozen levels, not the hundreds of the default limit."""
    limit = sys.getrecursionlimit()
    lowered = len(inspect.stack(0)) + frames
    sys.setrecursionlimit(lowered)
    try:
        yield
    finally:
        after = sys.getrecursionlimit()
        sys.setrecursionlimit(limit)
    assert after == lowered  # multirun put back the limit it lifted to end the calls


def recursive_steps(calls: list[int]) -> dict[str, Callable[..., Any]]:
    """A step that calls itself without end, in each of the four shapes; ``calls`` gets the
    depth of each call whose body ran."""

    @step(name="descend")
    def function(depth: int) -> int:
        calls.append(depth)
        return function(depth + 1)  # type: ignore[no-any-return]

    @step(name="descend")
    def generator(depth: int) -> Iterator[int]:
        calls.append(depth)
        yield from generator(depth + 1)

    @step(name="descend")
    async def coroutine(depth: int) -> int:
        calls.append(depth)
        return await coroutine(depth + 1)  # type: ignore[no-any-return]

    @step(name="descend")
    async def async_generator(depth: int) -> AsyncIterator[int]:
        calls.append(depth)
        async for item in async_generator(depth + 1):
            yield item

    return {
        "function": function,
        "generator": generator,
        "coroutine": coroutine,
        "async generator": async_generator,
    }


def assert_ended_as_without_multirun(
    traced: Any, open_spans: OpenSpans, raised: BaseException, runs: list[RunContext], calls: list[int]
) -> None:
    """The program got the RecursionError of its recursion, every span was ended, the run
    failed, and nothing of it is left running."""
    assert type(raised) is RecursionError
    assert raised.__context__ is None  # not one raised while multirun handled the program's
    assert open_spans.open == {}
    assert len(traced.named("step descend")) == len(calls) > 10  # each step that ran, ended
    main = traced.span("invoke_workflow main")
    assert main.attributes[attr.RUN_STATUS] == "failed"  # type: ignore[index]
    assert main.attributes[attr.ERROR_TYPE] == "RecursionError"  # type: ignore[index]
    # no step is left running in the replay log, for a later checkpoint to record as such
    assert all(record["end"] is not None for record in runs[0].replay_log.to_records())
    assert not has_active_run()


@step
def double(n: int) -> int:
    return 2 * n


@pytest.mark.parametrize("shape", ["function", "generator"])
def test_a_recursive_step_that_runs_out_of_stack_raises_recursion_error_and_ends_every_span(
    traced, open_spans: OpenSpans, shape: str
) -> None:
    calls: list[int] = []
    descend = recursive_steps(calls)[shape]
    runs: list[RunContext] = []

    @run
    def main() -> Any:
        runs.append(get_current_run_context())
        result = descend(0)
        return list(result) if shape == "generator" else result

    with stack_limit(200), pytest.raises(RecursionError) as raised:
        main()
    assert_ended_as_without_multirun(traced, open_spans, raised.value, runs, calls)

    @run
    def after() -> int:
        return double(21)

    assert after() == 42  # the next run works as usual
    assert traced.parent_of(traced.span("step double")) is traced.span("invoke_workflow after")
    assert open_spans.open == {}


@pytest.mark.parametrize("shape", ["coroutine", "async generator"])
async def test_a_recursive_async_step_that_runs_out_of_stack_raises_recursion_error_and_ends_every_span(
    traced, open_spans: OpenSpans, shape: str
) -> None:
    calls: list[int] = []
    descend = recursive_steps(calls)[shape]
    runs: list[RunContext] = []

    @run
    async def main() -> Any:
        runs.append(get_current_run_context())
        if shape == "async generator":
            return [item async for item in descend(0)]
        return await descend(0)

    with stack_limit(200), pytest.raises(RecursionError) as raised:
        await main()
    assert_ended_as_without_multirun(traced, open_spans, raised.value, runs, calls)

    @run
    async def after() -> int:
        return double(21)

    assert await after() == 42
    assert traced.parent_of(traced.span("step double")) is traced.span("invoke_workflow after")
    assert open_spans.open == {}


LEFT_OUT = re.compile(r"^  \[(\d+) frames? left out: the (\d+) nearest the raise follow\]$", re.MULTILINE)


def exception_event(span: ReadableSpan) -> Mapping[str, Any]:
    (event,) = [e for e in span.events if e.name == "exception"]
    return event.attributes or {}


def frames_of(stacktrace: str) -> tuple[int, int]:
    """The frames a stacktrace shows (no line repeats in these: each level has frames of its
    own and of multirun's), and the number it says it left out."""
    left_out = LEFT_OUT.search(stacktrace)
    return stacktrace.count('\n  File "'), int(left_out.group(1)) if left_out else 0


@pytest.mark.parametrize("shape", ["function", "generator", "coroutine", "async generator"])
async def test_a_recursion_that_runs_out_of_stack_records_at_most_a_bounded_stacktrace_on_each_span(
    traced, shape: str
) -> None:
    """Each span the RecursionError unwinds through records it, with its traceback one level
    longer each time: in full that costs the square of the depth. Each event keeps the frames
    nearest the raise and says how many it left out."""
    calls: list[int] = []
    descend = recursive_steps(calls)[shape]

    @run
    async def main() -> Any:
        if shape == "async generator":
            return [item async for item in descend(0)]
        if shape == "coroutine":
            return await descend(0)
        result = descend(0)
        return list(result) if shape == "generator" else result

    with stack_limit(3 * STACKTRACE_FRAMES), pytest.raises(RecursionError):
        await main()
    steps = traced.named("step descend")  # in the order they ended: the innermost first
    assert len(steps) == len(calls)
    events = [exception_event(span) for span in [*steps, traced.span("invoke_workflow main")]]
    assert all(event["exception.type"] == "RecursionError" for event in events)
    assert all(event["exception.message"].startswith("maximum recursion depth exceeded") for event in events)
    assert all(event["exception.escaped"] == "True" for event in events)
    frames = [frames_of(event["exception.stacktrace"]) for event in events]
    assert all(shown <= STACKTRACE_FRAMES for shown, _ in frames)
    assert frames[0][1] == 0  # the innermost step's is whole
    assert frames[-1] == (STACKTRACE_FRAMES, frames[-1][1]) and frames[-1][1] > STACKTRACE_FRAMES
    # and every one says how many it left out: each level's traceback is the one of the level
    # inside it, and the frames of this level
    totals = [shown + left_out for shown, left_out in frames]
    assert all(inner < outer for inner, outer in itertools.pairwise(totals))
    per_level = totals[2] - totals[1]
    assert all(outer - inner == per_level for inner, outer in itertools.pairwise(totals[1:-1]))
    for event in events:  # the cut ones too end with the raise
        assert event["exception.stacktrace"].endswith(f"RecursionError: {event['exception.message']}\n")


def test_a_recursion_through_agents_started_by_hand_raises_recursion_error_and_ends_every_span(
    traced, open_spans: OpenSpans
) -> None:
    depths: list[int] = []

    def descend(ctx: RunContext, depth: int) -> None:
        with ctx.start_agent("descend"):
            depths.append(depth)
            descend(ctx, depth + 1)

    with (
        stack_limit(200),
        pytest.raises(RecursionError) as raised,
        RunContext(client=traced.client, run=Run(name="main")) as ctx,
    ):
        descend(ctx, 0)
    assert type(raised.value) is RecursionError
    assert raised.value.__context__ is None
    assert open_spans.open == {}
    assert len(traced.named("invoke_agent descend")) == len(depths) > 10
    assert traced.span("invoke_workflow main").attributes[attr.RUN_STATUS] == "failed"  # type: ignore[index]
    assert not has_active_run()


def test_the_stack_headroom_is_given_back_by_its_last_holder_unless_the_program_changed_the_limit() -> None:
    limit = sys.getrecursionlimit()
    try:
        with headroom:
            with headroom:  # another thread, say
                assert sys.getrecursionlimit() == limit + HEADROOM
            assert sys.getrecursionlimit() == limit + HEADROOM
        assert sys.getrecursionlimit() == limit
        with headroom:
            sys.setrecursionlimit(limit + 1)
        assert sys.getrecursionlimit() == limit + 1
    finally:
        sys.setrecursionlimit(limit)


def test_the_stack_headroom_keeps_a_limit_the_program_set_to_what_the_lifted_one_was() -> None:
    """A program that raises the limit by exactly ``HEADROOM`` after a call was ended keeps it:
    the next call ended lifts it from there, and puts that back."""
    limit = sys.getrecursionlimit()
    try:
        with headroom:
            pass
        sys.setrecursionlimit(limit + HEADROOM)
        with headroom:
            assert sys.getrecursionlimit() == limit + 2 * HEADROOM
        assert sys.getrecursionlimit() == limit + HEADROOM
    finally:
        sys.setrecursionlimit(limit)


def test_the_stack_headroom_let_go_deeper_than_the_old_limit_is_given_back_by_the_next_holder() -> None:
    limit = sys.getrecursionlimit()
    lowered = len(inspect.stack(0)) + 50
    sys.setrecursionlimit(lowered)

    def let_go_at(depth: int) -> None:  # deeper than ``lowered``, where no limit below it can be set
        if depth:
            let_go_at(depth - 1)
        else:
            headroom.__exit__(None, None, None)

    try:
        headroom.__enter__()
        let_go_at(100)
        assert sys.getrecursionlimit() == lowered + HEADROOM  # it could not be put back there
        with headroom:
            assert sys.getrecursionlimit() == lowered + HEADROOM  # lifted from the program's limit
        assert sys.getrecursionlimit() == lowered
    finally:
        sys.setrecursionlimit(limit)


FORK_WHILE_HELD = """
import os, sys, threading
from multirun._stack import HEADROOM, headroom

limit = sys.getrecursionlimit()
held, done = threading.Event(), threading.Event()

def end_a_failed_call():
    with headroom:
        held.set()
        done.wait()

threading.Thread(target=end_a_failed_call).start()
held.wait()
pid = os.fork()
if pid == 0:  # the thread that held the headroom is not in the child
    back = sys.getrecursionlimit() == limit
    with headroom:
        lifted = sys.getrecursionlimit() == limit + HEADROOM
    os._exit(0 if back and lifted and sys.getrecursionlimit() == limit else 1)
_, status = os.waitpid(pid, 0)
done.set()
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_holds_the_stack_headroom_gets_the_limit_back(tmp_path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(FORK_WHILE_HELD)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


class BreaksOnFailedSpans(SpanProcessor):
    """The program's own span processor, which raises when a failed span ends."""

    def on_end(self, span: ReadableSpan) -> None:
        if span.status.status_code is StatusCode.ERROR:
            raise RuntimeError("processor broke")


def test_a_failed_step_whose_span_cannot_be_ended_raises_its_own_error(traced, caplog) -> None:
    traced.provider.add_span_processor(BreaksOnFailedSpans())
    raised = ValueError("the program's own")

    @step
    def fails() -> None:
        raise raised

    @run
    def main() -> BaseException | None:
        try:
            fails()
        except ValueError as caught:
            return caught
        return None

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert main() is raised
    # one warning naming the processor (it was the decorator's), and the span exported all the same
    assert "span processor <test_odd_user_code.BreaksOnFailedSpans" in caplog.text
    assert "raised in on_end" in caplog.text
    assert traced.span("step fails").attributes["multirun.step.status"] == "failed"


RUN_IN_AN_EXIT_HANDLER = """
import atexit
import multirun

@multirun.step
def tidy(n):
    return n + 1

@multirun.run
def flush_work():
    return tidy(1)

@multirun.run
def main():
    return tidy(0)

atexit.register(flush_work)  # after the import, before the first run: as a program does
main()
"""


def test_a_run_in_an_exit_handler_registered_after_import_is_traced(tmp_path) -> None:
    # multirun shut its pipeline down at exit before the program's own exit handler ran (its
    # handler was registered by the first run, after the program's): that run's spans were lost
    script = tmp_path / "exit_handler.py"
    script.write_text(RUN_IN_AN_EXIT_HANDLER)
    env = environment_without_settings()
    env["MULTIRUN_DIR"] = str(tmp_path / "mr")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    names = sorted(s.name for s in read_spans(tmp_path / "mr" / "traces"))
    assert names == ["invoke_workflow flush_work", "invoke_workflow main", "step tidy", "step tidy"]
