"""Generator steps (streamed output) on resume: a stream read to the end is served, not paid twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import multirun
from multirun import run, step
from multirun.context import get_current_run_context
from multirun.errors import DeterminismError
from multirun.models import StepKind
from multirun.telemetry import attributes as attr


def run_id_of(traced, name: str) -> str:  # type: ignore[no-untyped-def]
    return str(traced.named(f"invoke_workflow {name}")[-1].attributes[attr.RUN_ID])


def streaming_program(calls: list[str], *, fail: bool, is_async: bool) -> Any:
    """stream (LLM, paid) -> publish, which fails the first time."""

    if is_async:

        @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
        async def answer(prompt: str) -> AsyncIterator[Any]:
            calls.append("answer")
            multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=100)
            for chunk in (f"{prompt}:", {"delta": "a"}, ["b"]):
                yield chunk

        async def collect(prompt: str) -> list[Any]:
            return [chunk async for chunk in answer(prompt)]

        def read(prompt: str) -> list[Any]:
            return asyncio.run(collect(prompt))

    else:

        @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
        def answer(prompt: str) -> Iterator[Any]:
            calls.append("answer")
            multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=100)
            yield f"{prompt}:"
            yield {"delta": "a"}
            yield ["b"]

        def read(prompt: str) -> list[Any]:
            return list(answer(prompt))

    @step(idempotent=False)
    def publish(chunks: list[Any]) -> list[Any]:
        calls.append("publish")
        if fail:
            raise ConnectionError("publisher down")
        return chunks

    @run(name="streaming")
    def streaming() -> list[Any]:
        chunks = read("q")
        chunks[1]["delta"] = "changed by the program"  # the recording keeps what was yielded
        return publish(chunks)

    return streaming


@pytest.mark.parametrize("is_async", [False, True], ids=["generator", "async_generator"])
def test_a_stream_read_to_the_end_is_served_on_resume_and_not_paid_again(traced, is_async) -> None:
    calls: list[str] = []
    with pytest.raises(ConnectionError):
        streaming_program(calls, fail=True, is_async=is_async)()
    run_id = run_id_of(traced, "streaming")
    assert calls == ["answer", "publish"]
    assert traced.named("invoke_workflow streaming")[-1].attributes[attr.TOKENS_USED] == 1100

    calls.clear()
    with multirun.resume(run_id=run_id):
        result = streaming_program(calls, fail=False, is_async=is_async)()
    assert result == ["q:", {"delta": "changed by the program"}, ["b"]]
    assert calls == ["publish"]  # the stream was served from the checkpoint
    resumed = traced.named("invoke_workflow streaming")[-1]
    assert resumed.attributes[attr.TOKENS_USED] == 1100  # nothing paid twice
    served = traced.named("chat gpt-4o-mini")[-1]
    assert served.attributes[attr.STEP_STATUS] == "skipped"


def test_a_served_generator_gives_back_its_return_value_too(traced) -> None:
    calls: list[str] = []
    crash = True

    @step
    def pages() -> Iterator[int]:
        calls.append("pages")
        yield 1
        yield 2
        return 3

    def with_total() -> Iterator[int]:
        total = yield from pages()
        yield total

    @run(checkpoint_on_error=False)
    def job() -> list[int]:
        got = list(with_total())
        get_current_run_context().checkpoint(name="after pages")
        if crash:
            raise RuntimeError("crash")
        return got

    with pytest.raises(RuntimeError):
        job()
    crash = False
    with multirun.resume(run_id=run_id_of(traced, "job")):
        assert job() == [1, 2, 3]
    assert calls == ["pages"]


@pytest.mark.parametrize("how", ["closed early", "sent into", "thrown into"])
def test_a_stream_not_read_plainly_to_the_end_runs_again_on_resume(traced, how) -> None:
    calls: list[str] = []

    @step
    def numbers() -> Iterator[int]:
        calls.append("numbers")
        for n in range(3):
            with contextlib.suppress(ValueError):  # the stream goes on after what was thrown in
                yield n

    def read() -> list[int]:
        stream = numbers()
        got = [next(stream)]
        if how == "closed early":
            stream.close()
            return got
        if how == "sent into":
            got.append(stream.send("a value that may change what comes next"))
        else:
            got.append(stream.throw(ValueError("skip")))
        return got + list(stream)

    @run(checkpoint_on_error=False)
    def job() -> list[int]:
        got = read()
        get_current_run_context().checkpoint(name="after numbers")
        if calls == ["numbers"]:
            raise RuntimeError("crash")
        return got

    with pytest.raises(RuntimeError):
        job()
    store = traced.client.checkpoints
    records = store.load(store.latest(run_id_of(traced, "job"))).replay
    assert [("result" in r, r.get("failed", False), r["end"] is not None) for r in records] == [
        (False, False, True)  # ended, with nothing the log could serve
    ]
    with multirun.resume(run_id=run_id_of(traced, "job")):
        job()
    assert calls == ["numbers", "numbers"]  # what it yields may not be all, or depend on more


def test_a_step_recorded_as_a_function_and_now_a_generator_is_a_determinism_error(traced) -> None:
    @step(name="answer")
    def answer_once() -> str:
        return "whole"

    @run(name="job", checkpoint_on_error=False)
    def first() -> None:
        answer_once()
        get_current_run_context().checkpoint(name="c")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        first()

    @step(name="answer")
    def answer_streamed() -> Iterator[str]:
        yield "part"

    @run(name="job")
    def second() -> list[str]:
        return list(answer_streamed())

    with multirun.resume(run_id=run_id_of(traced, "job")), pytest.raises(DeterminismError, match="generator"):
        second()
