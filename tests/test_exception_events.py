"""The ``exception`` event multirun records on a failed span: the SDK's own for an error of
usual depth; for one with a traceback longer than ``STACKTRACE_FRAMES``, the same attributes
with that traceback cut to the frames nearest the raise."""

from __future__ import annotations

import builtins
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from multirun.telemetry.exceptions import STACKTRACE_FRAMES, record_exception


@pytest.fixture
def recorded() -> Iterator[Callable[..., dict[str, Any]]]:
    """``recorded(error, by_sdk=False, **kwargs)``: the attributes of the exception event that
    ``record_exception`` (or the SDK's ``Span.record_exception``) puts on a real span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    def record(error: BaseException, by_sdk: bool = False, **kwargs: Any) -> dict[str, Any]:
        span = tracer.start_span("failed")
        if by_sdk:
            span.record_exception(error, **kwargs)
        else:
            record_exception(span, error, **kwargs)
        span.end()
        finished: ReadableSpan = exporter.get_finished_spans()[-1]
        (event,) = finished.events
        assert event.name == "exception"
        return dict(event.attributes or {})

    yield record
    provider.shutdown()


def caught(raise_it: Callable[[], object]) -> BaseException:
    try:
        raise_it()
    except BaseException as error:
        return error
    raise AssertionError("nothing raised")


def descend(frames: int) -> None:
    """``frames`` frames, of ``descend`` and ``step_down`` in turn (no repeated line for the
    traceback to fold), the last of which raises a ValueError."""
    if frames <= 1:
        raise ValueError("at the bottom")
    step_down(frames - 1)


def step_down(frames: int) -> None:
    if frames <= 1:
        raise ValueError("at the bottom")
    descend(frames - 1)


def throw(error: BaseException) -> None:
    raise error


def deep_error(frames: int) -> BaseException:
    """A ValueError whose traceback has ``frames`` frames (``caught``'s among them)."""
    return caught(lambda: descend(frames - 2))


FILE_LINE = re.compile(r'^ *(?:\| )?  File ".*", line \d+, in .*$', re.MULTILINE)
LEFT_OUT = re.compile(r"\[(\d+) frames? left out: the (\d+) nearest the raise follow\]")


def chained() -> BaseException:
    try:
        raise KeyError("cause")
    except KeyError as cause:
        try:
            raise TypeError("context")
        except TypeError:
            raise RuntimeError("chained") from cause


class Failures(Exception):
    """An error of the program's that holds a list named ``exceptions``, as a group does."""

    def __init__(self, exceptions: list[str]) -> None:
        super().__init__(f"{len(exceptions)} failures")
        self.exceptions = exceptions


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


SHALLOW: dict[str, Callable[[], BaseException]] = {
    "plain": lambda: caught(lambda: descend(3)),
    "chained": lambda: caught(chained),
    "no traceback": lambda: ValueError("never raised"),
    "just long enough": lambda: deep_error(STACKTRACE_FRAMES),
    "holding a list named exceptions": lambda: caught(lambda: throw(Failures(["a", "b"]))),
}
GROUP: Any = getattr(builtins, "ExceptionGroup", None)  # Python 3.11 and later
if GROUP is not None:
    SHALLOW["group"] = lambda: caught(lambda: throw(GROUP("both", [deep_error(5), caught(chained)])))


@pytest.mark.parametrize("make", SHALLOW.values(), ids=SHALLOW)
@pytest.mark.parametrize("escaped", [False, True])
def test_an_error_of_usual_depth_is_recorded_as_the_sdk_records_it(recorded, make, escaped: bool) -> None:
    error = make()
    ours = recorded(error, escaped=escaped, attributes={"multirun.step.attempt": 2})
    assert ours == recorded(error, by_sdk=True, escaped=escaped, attributes={"multirun.step.attempt": 2})
    assert "left out" not in ours["exception.stacktrace"]


def test_a_deep_traceback_keeps_the_frames_nearest_the_raise_and_says_how_many_it_left_out(recorded) -> None:
    error = deep_error(STACKTRACE_FRAMES + 250)
    ours = recorded(error, escaped=True, attributes={"multirun.step.attempt": 2})
    sdk = recorded(error, by_sdk=True, escaped=True, attributes={"multirun.step.attempt": 2})
    assert {k: v for k, v in ours.items() if k != "exception.stacktrace"} == {
        k: v for k, v in sdk.items() if k != "exception.stacktrace"
    }
    stacktrace: str = ours["exception.stacktrace"]
    left_out = f"  [250 frames left out: the {STACKTRACE_FRAMES} nearest the raise follow]\n"
    assert stacktrace.startswith(f"Traceback (most recent call last):\n{left_out}")
    kept = FILE_LINE.findall(sdk["exception.stacktrace"])[-STACKTRACE_FRAMES:]
    assert FILE_LINE.findall(stacktrace) == kept
    assert stacktrace.endswith('    raise ValueError("at the bottom")\nValueError: at the bottom\n')


def test_a_deep_traceback_in_a_chain_is_cut_and_the_others_are_whole(recorded) -> None:
    def rethrow() -> None:
        try:
            descend(2 * STACKTRACE_FRAMES)
        except ValueError as cause:
            raise RuntimeError("could not descend") from cause

    error = caught(rethrow)
    ours: str = recorded(error)["exception.stacktrace"]
    sdk: str = recorded(error, by_sdk=True)["exception.stacktrace"]
    cause, cause_sdk = (text.split("\nThe above exception was the direct cause") for text in (ours, sdk))
    # rethrow's frame and descend's: one more than kept
    assert LEFT_OUT.findall(cause[0]) == [(str(STACKTRACE_FRAMES + 1), str(STACKTRACE_FRAMES))]
    assert FILE_LINE.findall(cause[0]) == FILE_LINE.findall(cause_sdk[0])[-STACKTRACE_FRAMES:]
    assert cause[1] == cause_sdk[1]  # the error raised from it: as the SDK writes it


@pytest.mark.skipif(GROUP is None, reason="exception groups are new in Python 3.11")
def test_a_deep_traceback_in_an_exception_group_is_cut(recorded) -> None:
    group = GROUP("both", [deep_error(STACKTRACE_FRAMES + 7), deep_error(3)])
    error = caught(lambda: throw(group))
    stacktrace: str = recorded(error)["exception.stacktrace"]
    assert LEFT_OUT.findall(stacktrace) == [("7", str(STACKTRACE_FRAMES))]
    # the group's own (caught's, its lambda's, throw's), then each one's
    assert len(FILE_LINE.findall(stacktrace)) == 3 + STACKTRACE_FRAMES + 3
    assert stacktrace.count("ValueError: at the bottom") == 2


def test_a_deep_error_whose_str_fails_is_recorded_with_a_stand_in_message(recorded) -> None:
    def unprintable(levels: int) -> None:
        if levels <= 1:
            raise Unprintable()
        unprintable(levels - 1)

    error = caught(lambda: unprintable(STACKTRACE_FRAMES + 10))
    event = recorded(error, escaped=True)
    assert event["exception.type"] == f"{__name__}.Unprintable"
    assert event["exception.message"] == "<str() of Unprintable failed>"
    assert event["exception.escaped"] == "True"
    assert len(FILE_LINE.findall(event["exception.stacktrace"])) <= STACKTRACE_FRAMES


# sys.tracebacklimit: honoured as Python honours it when it prints an error


@pytest.mark.parametrize("depth", [30, STACKTRACE_FRAMES + 250], ids=["shallow", "deep"])
def test_sys_tracebacklimit_keeps_that_many_frames_nearest_the_raise(
    recorded, monkeypatch, depth: int
) -> None:
    error = deep_error(depth)
    whole: str = recorded(error, by_sdk=True)["exception.stacktrace"]  # no limit set yet
    monkeypatch.setattr(sys, "tracebacklimit", 5, raising=False)
    stacktrace: str = recorded(error)["exception.stacktrace"]
    assert LEFT_OUT.findall(stacktrace) == [(str(depth - 5), "5")]
    assert FILE_LINE.findall(stacktrace) == FILE_LINE.findall(whole)[-5:]
    assert stacktrace.endswith("ValueError: at the bottom\n")


PRINTED_AND_RECORDED = """
import sys
from opentelemetry.sdk.trace import TracerProvider
from multirun.telemetry.exceptions import record_exception

def descend(frames):
    if frames <= 1:
        raise ValueError("at the bottom")
    step_down(frames - 1)

def step_down(frames):
    if frames <= 1:
        raise ValueError("at the bottom")
    descend(frames - 1)

try:
    descend(int(sys.argv[1]))
except ValueError as caught:
    error = caught
sys.tracebacklimit = 3
span = TracerProvider().get_tracer("test").start_span("failed")
record_exception(span, error)
print(span.events[0].attributes["exception.stacktrace"], end="", flush=True)
raise error
"""


@pytest.mark.parametrize("depth", [30, STACKTRACE_FRAMES + 250], ids=["shallow", "deep"])
def test_an_event_keeps_the_frames_python_prints_under_sys_tracebacklimit(depth: int) -> None:
    src = Path(__file__).parents[1] / "src"
    done = subprocess.run(
        [sys.executable, "-c", PRINTED_AND_RECORDED, str(depth)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    printed = FILE_LINE.findall(done.stderr)
    assert len(printed) == 3, done.stderr
    assert FILE_LINE.findall(done.stdout) == printed


@pytest.mark.parametrize("depth", [30, STACKTRACE_FRAMES + 250], ids=["shallow", "deep"])
def test_sys_tracebacklimit_0_records_no_frames(recorded, monkeypatch, depth: int) -> None:
    monkeypatch.setattr(sys, "tracebacklimit", 0, raising=False)
    assert recorded(deep_error(depth))["exception.stacktrace"] == "ValueError: at the bottom\n"


@pytest.mark.parametrize("limit", [5.0, "5"], ids=["float", "str"])
def test_a_sys_tracebacklimit_that_is_no_int_is_ignored_as_python_ignores_it(
    recorded, monkeypatch, limit
) -> None:
    # the traceback module raised on it, and the span lost its exception event
    error = deep_error(30)
    whole: str = recorded(error, by_sdk=True)["exception.stacktrace"]
    monkeypatch.setattr(sys, "tracebacklimit", limit, raising=False)
    try:
        stacktrace = recorded(error)["exception.stacktrace"]
    finally:
        monkeypatch.undo()  # before pytest formats a failure: its traceback module raises too
    assert stacktrace == whole
