"""The program's own odd objects pass through multirun as they would without it: an exception
whose ``__str__`` fails, arguments that fail when read, async generators driven by hand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from multirun import agent, run, step
from multirun.context import get_current_run_context
from multirun.errors import StepError
from multirun.telemetry import attributes as attr


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
