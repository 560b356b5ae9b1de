"""Streamed OpenAI chat completions, from the real ``openai`` SDK, charged exactly once.

No mock of openai: a real ``openai.OpenAI`` reads Server-Sent Events from the
local server of tests/test_openai_usage.py (the chunks, the usage chunk that
``stream_options={"include_usage": True}`` asks for, then ``[DONE]``), with and
without opentelemetry-instrumentation-openai-v2, whose chat span of a stream
ends when the stream is read to its end. Whoever reads the usage (the step, from
the chunks it yields; ClientAI's instrumentation, from the chunks of its
request; or openai-v2's span), the call is charged once: in the spans, the run's
total and its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import genai_prices
import openai
import pytest
from clientai import ClientAI
from clientai.agent import Agent, synthesize, think
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import multirun
from multirun import agent, run, step
from multirun.context import get_current_run_context
from multirun.errors import BudgetExceededError
from multirun.integrations.clientai import ClientAIInstrumentor
from multirun.models import Budget, StepKind
from multirun.telemetry import attributes as attr
from test_openai_usage import CANNED, REQUEST_MODEL, RESPONSE_MODEL, CannedOpenAI, client, llm

__all__ = ["client", "llm"]  # fixtures, imported for pytest

MODES = ["plain", "openai-v2"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """With openai-v2 ("openai-v2") or without ("plain")."""
    return str(request.param)


@pytest.fixture
def tracing(mode: str, traced: Any) -> Iterator[Any]:
    """The traced fixture, with openai-v2 writing its chat spans to the same provider, or without."""
    if mode == "plain":
        yield traced
        return
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=traced.provider)
    try:
        yield traced
    finally:
        instrumentor.uninstrument()


@pytest.fixture(scope="module")
def clientai_instrumented() -> Iterator[None]:
    instrumentor = ClientAIInstrumentor()
    instrumentor.instrument()
    yield
    instrumentor.uninstrument()


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def is_multirun(span: Any) -> bool:
    return span.instrumentation_scope is not None and span.instrumentation_scope.name == "multirun"


def step_spans(traced: Any, name: str) -> list[Any]:
    return [s for s in traced.spans() if is_multirun(s) and attrs(s).get(attr.STEP_NAME) == name]


def step_span(traced: Any, name: str) -> Any:
    (found,) = step_spans(traced, name)
    return found


def chat_spans(traced: Any) -> list[Any]:
    """openai-v2's chat spans."""
    return [
        s for s in traced.spans() if not is_multirun(s) and attrs(s).get("gen_ai.operation.name") == "chat"
    ]


def run_attrs(traced: Any, name: str = "main") -> dict[str, Any]:
    return attrs(traced.span(f"invoke_workflow {name}"))


def usage_sum_over_all_spans(traced: Any) -> int:
    """What a backend gets by summing gen_ai.usage.{input,output}_tokens over every span."""
    return sum(
        int(attrs(s).get(attr.GEN_AI_USAGE_INPUT_TOKENS, 0))
        + int(attrs(s).get(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 0))
        for s in traced.spans()
    )


def cost(mode: str, *calls: int) -> float:
    """genai-prices' price of the canned calls: with the cached-input discount when the package read
    the chunks; openai-v2's span carries no cached tokens (see test_openai_usage.py)."""
    total = 0.0
    for i in calls:
        c = CANNED[i]
        cached = c.cached if mode == "plain" else 0
        usage = genai_prices.Usage(
            input_tokens=c.prompt, output_tokens=c.completion, cache_read_tokens=cached or None
        )
        total += float(genai_prices.calc_price(usage, RESPONSE_MODEL, provider_id="openai").total_price)
    return total


def open_stream(client: Any, prompt: str) -> Any:
    """A real streamed chat completion that asks for its usage, not read yet (with an AsyncOpenAI,
    to be awaited)."""
    return client.chat.completions.create(
        model=REQUEST_MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )


def open_manager(client: Any, prompt: str) -> Any:
    """The SDK's stream helper of a chat completion that asks for its usage, not entered yet."""
    return client.chat.completions.stream(
        model=REQUEST_MODEL,
        messages=[{"role": "user", "content": prompt}],
        stream_options={"include_usage": True},
    )


def text_of(chunks: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def event_text(events: Any) -> str:
    return "".join(e.delta for e in events if e.type == "content.delta")


async def final_completion_text(stream: Any) -> str:
    return str((await stream.get_final_completion()).choices[0].message.content)


async def chunks_text(stream: Any) -> str:
    return text_of([chunk async for chunk in stream])


@dataclass(frozen=True)
class Opener:
    """How a step's caller gets a chat completion's stream: ``create(stream=True)``'s stream, read
    as it is, or ``chat.completions.stream()``'s manager, whose ``with`` sends the request and gives
    the SDK's ChatCompletionStream, a helper reading the stream."""

    open: Callable[[Any, str], Any]  # (client, prompt): what the step returns
    enter: Callable[[Any], Any]  # what the step returned: a context manager giving what to read
    text: Callable[[Any], str]  # the text of what it gives, iterated: chunks, or the helper's events
    chunk: Callable[[Any], Any]  # the chunk an item iterated is or carries, else None
    reads: dict[str, Callable[[Any], str]]  # each way of reading it whole, to its text (first: the usual)
    aread: Callable[[Any], Awaitable[str]]  # the usual way, from an AsyncOpenAI

    def read(self, stream: Any) -> str:
        """Read it the usual way, the first of ``reads``."""
        return next(iter(self.reads.values()))(stream)


STREAM = Opener(
    open=open_stream,
    enter=contextlib.nullcontext,
    text=text_of,
    chunk=lambda chunk: chunk,
    reads={"chunks": text_of},
    aread=chunks_text,
)
MANAGER = Opener(
    open=open_manager,
    enter=lambda manager: manager,
    text=event_text,
    chunk=lambda event: event.chunk if event.type == "chunk" else None,
    reads={
        "get_final_completion": lambda stream: stream.get_final_completion().choices[0].message.content,
        "events": event_text,
        "until_done": lambda stream: (
            stream.until_done().current_completion_snapshot.choices[0].message.content
        ),
    },
    aread=final_completion_text,
)
OPENERS = {"stream": STREAM, "manager": MANAGER}


@pytest.fixture(params=list(OPENERS))
def opener(request: pytest.FixtureRequest) -> Opener:
    """A stream ("stream"), or a stream manager ("manager")."""
    return OPENERS[request.param]


async def aopen(opener: Opener, aclient: openai.AsyncOpenAI, prompt: str) -> Any:
    """``opener.open`` from an AsyncOpenAI: ``create()`` is awaited, ``stream()`` is not."""
    opened = opener.open(aclient, prompt)
    return await opened if inspect.isawaitable(opened) else opened


def answer_ended(traced: Any) -> bool:
    return bool(step_spans(traced, "answer"))


def assert_charged_once(traced: Any, mode: str, step_name: str, *calls: int) -> None:
    """The step and the run are charged the canned calls ``calls``, each once, at genai-prices'
    price; the usage is on the step's span (read from the chunks), or on openai-v2's chat span."""
    tokens = sum(CANNED[i].tokens for i in calls)
    (span,) = step_spans(traced, step_name)
    a = attrs(span)
    assert a[attr.TOKENS_USED] == tokens
    if mode == "plain":
        assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == sum(CANNED[i].prompt for i in calls)
        assert a[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == sum(CANNED[i].completion for i in calls)
        assert a[attr.GEN_AI_RESPONSE_MODEL] == RESPONSE_MODEL
    else:
        assert attr.GEN_AI_USAGE_INPUT_TOKENS not in a  # the chat span's, counted in the roll-up only
        assert len(chat_spans(traced)) == len(calls)
        assert all(c.parent.span_id == span.context.span_id for c in chat_spans(traced))
    main = run_attrs(traced)
    assert main[attr.TOKENS_USED] == tokens
    assert main[attr.COST_USD] == pytest.approx(cost(mode, *calls), rel=1e-9)
    assert usage_sum_over_all_spans(traced) == tokens


# ---------------------------------------------------------------------------
# a generator step that yields the SDK's chunks


def test_a_generator_step_yielding_a_real_sdk_stream_is_charged_once_when_read(
    tracing, mode, llm, client, opener
) -> None:
    """The step yields the stream's chunks, or enters the manager itself and yields the helper's
    events, whose chunk events carry the chunks (the usage one too)."""

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Iterator[Any]:
        with opener.enter(opener.open(client, prompt)) as stream:
            yield from stream

    @run
    def main() -> list[Any]:
        return list(answer("hello there"))

    items = main()
    assert opener.text(items) == "re: hello there"
    assert llm.served[0].body["stream_options"] == {"include_usage": True}
    assert_charged_once(tracing, mode, "answer", 0)
    assert attrs(step_span(tracing, "answer"))[attr.STEP_STREAM_ITEMS] == len(items)
    assert len([i for i in items if opener.chunk(i) is not None]) == 6  # role, 3 words, stop, usage


def test_a_budget_counts_a_streamed_call_once(tracing, llm, client) -> None:
    # once counted, the first call leaves room for a second; counted twice it would not
    limit = CANNED[0].tokens + 1
    entered: list[int] = []

    @step(kind=StepKind.LLM_CALL)
    def answer(i: int) -> Iterator[Any]:
        entered.append(i)
        yield from open_stream(client, f"call {i}")

    @run(budget=Budget(max_tokens=limit))
    def main() -> None:
        for i in range(3):
            text_of(answer(i))

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert entered == [0, 1]
    assert info.value.used == CANNED[0].tokens + CANNED[1].tokens
    assert run_attrs(tracing)[attr.TOKENS_USED] == CANNED[0].tokens + CANNED[1].tokens


async def test_an_async_step_yielding_a_real_sdk_stream_is_charged_once_when_read(tracing, mode, llm) -> None:
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    async def answer(prompt: str) -> Any:
        stream = await aclient.chat.completions.create(
            model=REQUEST_MODEL,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            yield chunk

    @run
    async def main() -> str:
        return text_of([chunk async for chunk in answer("hello there")])

    try:
        assert await main() == "re: hello there"
    finally:
        await aclient.close()
    assert_charged_once(tracing, mode, "answer", 0)


def test_a_stream_closed_right_after_its_usage_chunk_is_charged_once(tracing, mode, llm, client) -> None:
    """Its consumer stops at the usage chunk, before the stream's end: the step read the usage
    (and openai-v2's span, closed by ``yield from``, reported it too), charged once all the same."""

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Iterator[Any]:
        yield from open_stream(client, prompt)

    @run
    def main() -> None:
        stream = answer("hello there")
        for chunk in stream:
            if chunk.usage is not None:
                stream.close()

    main()
    assert_charged_once(tracing, mode, "answer", 0)


# ---------------------------------------------------------------------------
# a step that returns the SDK's stream, read by its caller


@pytest.mark.parametrize(
    ("opener", "read"),
    [pytest.param(OPENERS[o], read, id=f"{o}-{read}") for o in OPENERS for read in OPENERS[o].reads],
)
def test_a_step_returning_a_real_sdk_stream_is_charged_once_when_its_caller_reads_it(
    tracing, mode, llm, client, opener, read: str
) -> None:
    """The step ends when its caller has read the stream to its end, however it reads it, as
    openai-v2's chat span does: its span covers the stream, and carries its tokens. A manager's
    request is made in the step too (openai-v2's chat span is inside it)."""
    returned: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        returned.append(opener.open(client, prompt))
        return returned[-1]

    @step
    def after() -> None:
        pass

    @run
    def main() -> str:
        got = answer("hello there")
        assert isinstance(got, type(returned[0]))  # the SDK's stream or manager (or openai-v2's wrapper)
        with opener.enter(got) as stream:
            if opener is STREAM:
                assert stream.response.status_code == 200  # the stream's own attributes
            else:
                assert isinstance(stream, openai.lib.streaming.chat.ChatCompletionStream)
            assert not answer_ended(tracing)
            text = opener.reads[read](stream)
            assert answer_ended(tracing)  # at the stream's end, not at the manager's block's
        after()  # in the run, not in the step that returned the stream
        return str(text)

    assert main() == "re: hello there"
    assert llm.served[0].body["stream_options"] == {"include_usage": True}
    assert step_span(tracing, "after").parent.span_id == tracing.span("invoke_workflow main").context.span_id
    assert_charged_once(tracing, mode, "answer", 0)
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_ITEMS] == 6  # the chunks read (by the helper): role, 3 words, stop, usage
    assert attr.USAGE_UNKNOWN not in a
    if mode == "openai-v2":
        (chat,) = chat_spans(tracing)
        assert chat.end_time <= step_span(tracing, "answer").end_time


async def test_an_async_step_returning_a_real_sdk_stream_is_charged_once_when_its_caller_reads_it(
    tracing, mode, llm, opener
) -> None:
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    async def answer(prompt: str) -> Any:
        return await aopen(opener, aclient, prompt)

    @run
    async def main() -> str:
        async with await answer("hello there") as stream:
            assert not answer_ended(tracing)
            text = await opener.aread(stream)
            assert answer_ended(tracing)
        return text

    try:
        assert await main() == "re: hello there"
    finally:
        await aclient.close()
    assert_charged_once(tracing, mode, "answer", 0)
    assert attrs(step_span(tracing, "answer"))[attr.STEP_STREAM_ITEMS] == 6


def test_a_returned_stream_left_right_after_its_usage_chunk_is_charged_once(
    tracing, mode, llm, client, opener
) -> None:
    """Left before the stream's end: the step read the usage, and (with openai-v2) the chat span,
    whose stream is closed as the block is left, reported it too: charged once all the same."""

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return opener.open(client, prompt)

    @run
    def main() -> None:
        with answer("hello there") as stream:
            for item in stream:
                chunk = opener.chunk(item)
                if chunk is not None and chunk.usage is not None:
                    break
            assert not answer_ended(tracing)
        assert answer_ended(tracing)

    main()
    assert_charged_once(tracing, mode, "answer", 0)
    assert attrs(step_span(tracing, "answer"))[attr.STEP_STREAM_ITEMS] == 6
    if mode == "openai-v2":
        (chat,) = chat_spans(tracing)
        assert chat.end_time <= step_span(tracing, "answer").end_time


async def test_an_async_returned_stream_left_right_after_its_usage_chunk_is_charged_once(
    tracing, mode, llm, opener
) -> None:
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    async def answer(prompt: str) -> Any:
        return await aopen(opener, aclient, prompt)

    @run
    async def main() -> None:
        async with await answer("hello there") as stream:
            async for item in stream:
                chunk = opener.chunk(item)
                if chunk is not None and chunk.usage is not None:
                    break
            assert not answer_ended(tracing)
        assert answer_ended(tracing)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            await main()
        finally:
            await aclient.close()
    assert_charged_once(tracing, mode, "answer", 0)
    # openai-v2's wrapper closes its stream without awaiting the close: not called so
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def test_a_budget_counts_a_returned_stream_once_when_read(tracing, llm, client) -> None:
    # once counted, the first call leaves room for a second; counted twice it would not
    limit = CANNED[0].tokens + 1
    entered: list[int] = []

    @step(kind=StepKind.LLM_CALL)
    def answer(i: int) -> Any:
        entered.append(i)
        return open_stream(client, f"call {i}")

    @run(budget=Budget(max_tokens=limit))
    def main() -> None:
        for i in range(3):
            text_of(answer(i))

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert entered == [0, 1]
    assert info.value.used == CANNED[0].tokens + CANNED[1].tokens
    assert run_attrs(tracing)[attr.TOKENS_USED] == CANNED[0].tokens + CANNED[1].tokens


def test_a_step_passing_on_the_stream_a_step_inside_it_returned_is_charged_once(
    tracing, mode, llm, client, opener
) -> None:
    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return opener.open(client, prompt)

    @step
    def respond(prompt: str) -> Any:
        return answer(prompt)

    @run
    def main() -> str:
        with opener.enter(respond("hello there")) as stream:
            return opener.text(stream)

    assert main() == "re: hello there"
    assert_charged_once(tracing, mode, "answer", 0)
    outer, inner = step_span(tracing, "respond"), step_span(tracing, "answer")
    assert attrs(outer)[attr.TOKENS_USED] == CANNED[0].tokens
    assert attrs(outer)[attr.STEP_STREAM_ITEMS] == 6
    assert inner.end_time <= outer.end_time


@pytest.mark.parametrize("failure", ["error", "disconnect", "refused"])
def test_a_step_whose_returned_stream_fails_fails_with_the_sdk_error(
    tracing, llm, client, opener, failure: str
) -> None:
    """Mid-way through the stream, or at the request itself (made in the step, or as the manager is
    entered)."""
    if failure == "refused":
        llm.failing = True
    else:
        llm.stream_failure = (3, failure)

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return opener.open(client, prompt)

    @run
    def main() -> None:
        with pytest.raises(openai.APIError), opener.enter(answer("hello there")) as stream:
            opener.read(stream)

    main()
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "failed"
    assert a["error.type"].startswith("openai.")
    assert a.get(attr.TOKENS_USED, 0) == 0
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.RUN_STATUS] == "completed"
    assert main_attrs[attr.TOKENS_USED] == 0


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_returned_stream_abandoned_half_read_ends_its_step_with_its_tokens_unknown(
    tracing, llm, client, monkeypatch, how: str
) -> None:
    ignored: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return open_stream(client, prompt)

    @run
    def main() -> None:
        stream = answer("hello there")
        next(stream)
        if how == "close":
            stream.close()
        del stream
        gc.collect()

    main()
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_ITEMS] == 1
    assert a[attr.USAGE_UNKNOWN] is True  # the usage chunk never came: not a silent 0
    assert attr.TOKENS_USED not in a
    assert run_attrs(tracing)[attr.RUN_STATUS] == "completed"
    assert [f"{u.exc_type.__name__} in {u.object!r}" for u in ignored] == []


def test_a_returned_stream_read_after_its_agent_ended_is_charged_once(
    tracing, mode, llm, client, opener
) -> None:
    """As a ClientAI stream read after its agent ended: the step ends with its agent, unfinished,
    and the stream's usage, read later in the run, is charged to the run then, once."""

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return opener.open(client, prompt)

    @agent
    def drafter() -> Any:
        return answer("draft")

    @run
    def main() -> str:
        with opener.enter(drafter()) as stream:
            return opener.read(stream)

    assert main() == "re: draft"
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_UNFINISHED] is True
    assert a[attr.STEP_STREAM_ITEMS] == 0
    assert step_span(tracing, "answer").end_time <= tracing.span("invoke_agent drafter").end_time
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens
    assert main_attrs[attr.COST_USD] == pytest.approx(cost(mode, 0), rel=1e-9)
    assert usage_sum_over_all_spans(tracing) == (CANNED[0].tokens if mode == "openai-v2" else 0)


def test_a_returned_stream_read_after_its_run_ended_is_in_no_run_s_total(
    tracing, mode, llm, client, caplog, opener
) -> None:
    """A manager sends its request when it is entered, here after the run: its step ended with the
    run, unfinished, and the call is in no run's total either."""

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return opener.open(client, prompt)

    @run
    def main() -> Any:
        return answer("hello there")

    returned = main()
    assert llm.requests == (1 if opener is STREAM else 0)
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STREAM_UNFINISHED] is True
    assert step_span(tracing, "answer").end_time <= tracing.span("invoke_workflow main").end_time
    with caplog.at_level(logging.WARNING), opener.enter(returned) as stream:
        assert opener.read(stream) == "re: hello there"
    assert llm.requests == 1
    assert run_attrs(tracing)[attr.TOKENS_USED] == 0
    # charged late by the step, which says so; but for openai-v2's span of a request made in the
    # run (a stream's, not a manager's), the source, its run's no more
    late = [r for r in caplog.records if "after run 'main'" in r.getMessage()]
    assert len(late) == (0 if mode == "openai-v2" and opener is STREAM else 1)


def test_a_returned_stream_a_sub_run_hands_its_caller_is_charged_once_to_the_run_around_it(
    tracing, mode, llm, client
) -> None:
    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return open_stream(client, prompt)

    @run
    def draft() -> Any:
        return answer("draft")

    @run
    def main() -> str:
        return text_of(draft())

    assert main() == "re: draft"
    assert attrs(step_span(tracing, "answer"))[attr.STEP_STREAM_UNFINISHED] is True
    assert run_attrs(tracing, "draft")[attr.TOKENS_USED] == 0  # ended before the stream was read
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens
    assert main_attrs[attr.COST_USD] == pytest.approx(cost(mode, 0), rel=1e-9)


def test_a_step_returning_a_stream_runs_again_after_a_restore(tracing, llm, client) -> None:
    """The stream is the caller's to read once: the replay log keeps no copy of it to serve."""
    failed = []

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return open_stream(client, prompt)

    @run(name="job")
    def job() -> str:
        text = text_of(answer("hello there"))
        get_current_run_context().checkpoint(name="after answer")
        if not failed:
            failed.append(True)
            raise RuntimeError("crash")
        return text

    with pytest.raises(RuntimeError):
        job()
    run_id = str(run_attrs(tracing, "job")[attr.RUN_ID])
    with multirun.resume(run_id=run_id):
        assert job() == "re: hello there"
    assert llm.requests == 2


def test_a_step_returning_a_real_sdk_stream_leaves_the_sdk_s_client_alone(
    tracing, llm, client, monkeypatch
) -> None:
    """The replay log keeps what a step returns, a copy where one can be made: trying to copy a
    stream copied part of the SDK's HTTP client, and the half-made copy, collected, printed
    "Exception ignored in: SyncHttpxClientWrapper.__del__" into the program's output."""
    ignored: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return open_stream(client, prompt)

    @run
    def main() -> str:
        stream = answer("hello there")
        gc.collect()
        return text_of(stream)

    assert main() == "re: hello there"
    gc.collect()
    assert [f"{u.exc_type.__name__} in {u.object!r}" for u in ignored] == []


# ---------------------------------------------------------------------------
# ClientAI, its OpenAI provider talking to the server


class TwoStepAgent(Agent):
    """A plain step, then one that streams its answer to the caller."""

    @think("analyze")
    def analyze(self, topic: str) -> str:
        return f"analyze {topic}"

    @synthesize("report", stream=True)
    def report(self, analysis: str) -> str:
        return f"report on {analysis}"


def real_clientai(llm: CannedOpenAI) -> ClientAI:
    """ClientAI's OpenAI provider, with the real SDK client pointed at the local server."""
    client = ClientAI("openai", api_key="sk-test")
    client.provider.client = openai.OpenAI(base_url=llm.url, api_key="sk-test", max_retries=0)
    return client


def test_a_clientai_agent_streaming_from_the_real_sdk_is_charged_once(
    clientai_instrumented, tracing, mode, llm
) -> None:
    agent = TwoStepAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)

    @run
    def main() -> str:
        return "".join(agent.run("otel", stream=True))

    assert main() == "re: report on re: analyze otel"
    assert llm.served[1].body["stream"] is True
    assert llm.served[1].body["stream_options"] == {"include_usage": True}
    calls = step_spans(tracing, "generate_text")
    assert [attrs(s)[attr.TOKENS_USED] for s in calls] == [CANNED[0].tokens, CANNED[1].tokens]
    for i, call in enumerate(calls):
        a = attrs(call)
        assert attr.USAGE_UNKNOWN not in a
        if mode == "plain":
            assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == CANNED[i].prompt
            assert a[attr.GEN_AI_RESPONSE_MODEL] == RESPONSE_MODEL
        else:
            assert attr.GEN_AI_USAGE_INPUT_TOKENS not in a  # the chat span's, counted in the roll-up only
    if mode == "openai-v2":  # openai-v2's chat span of each request is inside the request's span
        by_id = {c.context.span_id for c in calls}
        assert sorted(c.parent.span_id for c in chat_spans(tracing)) == sorted(by_id)
    assert attrs(step_span(tracing, "report"))[attr.TOKENS_USED] == CANNED[1].tokens
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens + CANNED[1].tokens
    assert main_attrs[attr.COST_USD] == pytest.approx(cost(mode, 0, 1), rel=1e-9)
    assert usage_sum_over_all_spans(tracing) == CANNED[0].tokens + CANNED[1].tokens


def test_a_clientai_stream_of_full_chunks_is_charged_once_without_handing_out_the_usage_chunk(
    clientai_instrumented, tracing, mode, llm
) -> None:
    """The caller asked for the SDK's chunks, not for their usage: the usage chunk asked for on its
    behalf is read, not handed out."""
    client = real_clientai(llm)
    messages = [{"role": "user", "content": "hello there"}]

    @run
    def main() -> list[Any]:
        return list(client.chat(messages, model=REQUEST_MODEL, stream=True, return_full_response=True))

    chunks = main()
    assert llm.served[0].body["stream_options"] == {"include_usage": True}
    assert len(chunks) == 5  # role, 3 words, stop
    assert all(c.choices and c.usage is None for c in chunks)
    assert text_of(chunks) == "re: hello there"
    (call,) = step_spans(tracing, "chat")
    assert attrs(call)[attr.TOKENS_USED] == CANNED[0].tokens
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens
    assert main_attrs[attr.COST_USD] == pytest.approx(cost(mode, 0), rel=1e-9)


class UnreadStreamAgent(Agent):
    """A streamed step whose stream no step reads (the next step takes no input): ClientAI keeps it."""

    @think("draft", stream=True)
    def draft(self, topic: str) -> str:
        return f"draft {topic}"

    @synthesize("wrap_up")
    def wrap_up(self) -> str:
        return "wrap up"


def test_a_clientai_stream_read_after_its_agent_ended_is_charged_once(
    clientai_instrumented, tracing, mode, llm
) -> None:
    """Its call was ended with its agent, unfinished; its usage, read later in the run (by the
    package from the chunks, or by openai-v2's span), is charged to the run then, once."""
    agent = UnreadStreamAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)

    @run
    def main() -> str:
        agent.run("otel")
        return "".join(agent.context.last_results["draft"])

    assert main() == "re: draft otel"
    (draft_call,) = [s for s in step_spans(tracing, "generate_text") if attr.STEP_STREAM_ITEMS in attrs(s)]
    assert attrs(draft_call)[attr.STEP_STREAM_UNFINISHED] is True
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens + CANNED[1].tokens
    assert main_attrs[attr.COST_USD] == pytest.approx(cost(mode, 0, 1), rel=1e-9)


def test_a_budget_counts_a_clientai_streamed_call_once(clientai_instrumented, tracing, llm) -> None:
    # once counted, the first agent's calls leave room for the second agent; counted twice they would not
    agent = TwoStepAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)
    first = CANNED[0].tokens + CANNED[1].tokens

    @run(budget=Budget(max_tokens=first + 1))
    def main() -> None:
        for _ in range(2):
            "".join(agent.run("otel", stream=True))

    with pytest.raises(BudgetExceededError) as info:
        main()
    assert llm.requests == 3  # the second agent's report was refused before its request
    assert info.value.used == first + CANNED[2].tokens
    assert run_attrs(tracing)[attr.TOKENS_USED] == first + CANNED[2].tokens


# ---------------------------------------------------------------------------
# the GenAI metrics: each streamed call once


@pytest.fixture
def metered(mode: str, traced: Any) -> Iterator[InMemoryMetricReader]:
    """multirun, and openai-v2 or not, recording metrics to one in-memory reader."""
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    multirun.init(tracer_provider=traced.provider, meter_provider=meters).clock = traced.clock
    instrumentor = OpenAIInstrumentor()
    if mode == "openai-v2":
        instrumentor.instrument(tracer_provider=traced.provider, meter_provider=meters)
    try:
        yield reader
    finally:
        if mode == "openai-v2":
            instrumentor.uninstrument()
        meters.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [
        p
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for p in metric.data.data_points
    ]


def streaming_step(client: openai.OpenAI, caller: str) -> Any:
    """An LLM step that streams its call: a generator step yielding the chunks, or (for "returned
    stream") a step returning the SDK's stream to its caller."""
    if caller == "returned stream":

        @step(kind=StepKind.LLM_CALL)
        def answer(prompt: str) -> Any:
            return open_stream(client, prompt)

        return answer

    @step(kind=StepKind.LLM_CALL)
    def answer_chunks(prompt: str) -> Iterator[Any]:
        yield from open_stream(client, prompt)

    return answer_chunks


@pytest.mark.parametrize("caller", ["generator step", "returned stream", "clientai"])
def test_each_streamed_call_is_in_the_genai_metrics_once(
    clientai_instrumented, metered, llm, client, caller: str
) -> None:
    answer = streaming_step(client, caller)

    agent = TwoStepAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)

    @run
    def main() -> str:
        if caller == "clientai":
            return "".join(agent.run("otel", stream=True))
        return text_of(answer("one")) + text_of(answer("two"))

    main()
    assert llm.requests == 2
    inputs = [
        p
        for p in points(metered, "gen_ai.client.token.usage")
        if p.attributes["gen_ai.token.type"] == "input"
    ]
    assert sum(p.count for p in inputs) == 2
    assert sum(p.sum for p in inputs) == CANNED[0].prompt + CANNED[1].prompt
    assert sum(p.count for p in points(metered, "gen_ai.client.operation.duration")) == 2


@pytest.mark.parametrize("caller", ["generator step", "returned stream", "clientai"])
def test_a_streamed_call_failing_midway_is_timed_once_as_failed(
    clientai_instrumented, metered, llm, client, caller: str
) -> None:
    answer = streaming_step(client, caller)

    agent = TwoStepAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)

    @run
    def main() -> None:
        llm.stream_failure = (3, "error")  # the streamed request only: ClientAI's first is not
        with pytest.raises(openai.APIError):
            if caller == "clientai":
                "".join(agent.run("otel", stream=True))
            else:
                text_of(answer("one"))

    main()
    durations = points(metered, "gen_ai.client.operation.duration")
    failed = [p for p in durations if "error.type" in p.attributes]
    assert [p.count for p in failed] == [1]
    assert "APIError" in str(failed[0].attributes["error.type"])
    assert sum(p.count for p in durations) == llm.requests


# ---------------------------------------------------------------------------
# streams abandoned half-read, and streams that fail mid-way


def test_a_generator_step_abandoned_half_read_is_completed_with_nothing_charged(tracing, llm, client) -> None:
    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Iterator[Any]:
        yield from open_stream(client, prompt)

    @step(kind=StepKind.LLM_CALL)
    def again(prompt: str) -> Iterator[Any]:
        yield from open_stream(client, prompt)

    @run
    def main() -> str:
        for _ in answer("hello there"):
            break  # abandoned: the usage chunk never read
        gc.collect()
        return text_of(again("and again"))

    assert main() == "re: and again"
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_ITEMS] == 1
    assert a.get(attr.TOKENS_USED, 0) == 0
    assert run_attrs(tracing)[attr.TOKENS_USED] == CANNED[1].tokens


@pytest.mark.parametrize("failure", ["error", "disconnect"])
def test_a_generator_step_whose_stream_fails_midway_fails_with_the_sdk_error(
    tracing, llm, client, failure: str
) -> None:
    llm.stream_failure = (3, failure)

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Iterator[Any]:
        yield from open_stream(client, prompt)

    @run
    def main() -> None:
        with pytest.raises(openai.APIError):
            text_of(answer("hello there"))

    main()
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "failed"
    assert a["error.type"].startswith("openai.")
    assert a.get(attr.TOKENS_USED, 0) == 0
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.RUN_STATUS] == "completed"
    assert main_attrs[attr.TOKENS_USED] == 0


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_clientai_stream_abandoned_half_read_says_its_tokens_are_unknown(
    clientai_instrumented, tracing, llm, how: str
) -> None:
    agent = TwoStepAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)

    @run
    def main() -> str:
        stream = agent.run("otel", stream=True)
        first = next(stream)
        if how == "close":
            stream.close()
        del stream
        gc.collect()
        return str(first)

    assert main() == "re:"
    report_call = step_spans(tracing, "generate_text")[1]
    a = attrs(report_call)
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_ITEMS] == 1
    assert a[attr.USAGE_UNKNOWN] is True  # the usage chunk never came: not a silent 0
    assert attr.TOKENS_USED not in a
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.RUN_STATUS] == "completed"
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens


@pytest.mark.parametrize("failure", ["error", "disconnect"])
def test_a_clientai_stream_that_fails_midway_fails_its_call_step_and_agent(
    clientai_instrumented, tracing, llm, failure: str
) -> None:
    agent = TwoStepAgent(client=real_clientai(llm), default_model=REQUEST_MODEL)

    @run
    def main() -> None:
        llm.stream_failure = (3, failure)  # the analyze step is not streamed: only the report fails
        with pytest.raises(openai.APIError):
            "".join(agent.run("otel", stream=True))

    main()
    report_call = step_spans(tracing, "generate_text")[1]
    for span in (report_call, step_span(tracing, "report"), tracing.span("invoke_agent TwoStepAgent")):
        assert attrs(span)["error.type"].startswith("openai."), span.name
    assert attrs(report_call)[attr.STEP_STATUS] == "failed"
    assert attrs(report_call).get(attr.TOKENS_USED, 0) == 0
    main_attrs = run_attrs(tracing)
    assert main_attrs[attr.RUN_STATUS] == "completed"
    assert main_attrs[attr.TOKENS_USED] == CANNED[0].tokens


# ---------------------------------------------------------------------------
# responses.stream(): a ResponseStreamManager, entered to a ResponseStream (openai-v2 follows no
# Responses API call: the step reads the usage from the events)


def open_response_manager(client: Any, prompt: str) -> Any:
    return client.responses.stream(model=REQUEST_MODEL, input=prompt)


def response_text(events: Any) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


RESPONSE_READS = {
    "events": response_text,
    "get_final_response": lambda stream: stream.get_final_response().output_text,
}


def assert_response_charged(traced: Any, step_name: str = "answer") -> None:
    a = attrs(step_span(traced, step_name))
    assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == CANNED[0].prompt
    assert a[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == CANNED[0].completion
    assert a[attr.GEN_AI_RESPONSE_MODEL] == RESPONSE_MODEL
    main = run_attrs(traced)
    assert main[attr.TOKENS_USED] == CANNED[0].tokens
    assert main[attr.COST_USD] == pytest.approx(cost("plain", 0), rel=1e-9)


@pytest.mark.parametrize("read", list(RESPONSE_READS))
def test_a_step_returning_a_response_stream_manager_is_charged_when_its_caller_reads_it(
    traced, llm, client, read: str
) -> None:
    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Any:
        return open_response_manager(client, prompt)

    @run
    def main() -> str:
        manager = answer("hello there")
        assert isinstance(manager, openai.lib.streaming.responses.ResponseStreamManager)
        with manager as stream:
            assert not answer_ended(traced)
            text = RESPONSE_READS[read](stream)
            assert answer_ended(traced)
        return str(text)

    assert main() == "re: hello there"
    assert_response_charged(traced)
    assert attrs(step_span(traced, "answer"))[attr.STEP_STREAM_ITEMS] == 10  # the events the helper read


async def test_an_async_step_returning_a_response_stream_manager_is_charged_when_its_caller_reads_it(
    traced, llm
) -> None:
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    async def answer(prompt: str) -> Any:
        return open_response_manager(aclient, prompt)

    @run
    async def main() -> str:
        async with await answer("hello there") as stream:
            return response_text([event async for event in stream])

    try:
        assert await main() == "re: hello there"
    finally:
        await aclient.close()
    assert_response_charged(traced)


def test_a_generator_step_yielding_a_response_stream_s_events_is_charged(traced, llm, client) -> None:
    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> Iterator[Any]:
        with open_response_manager(client, prompt) as stream:
            yield from stream

    @run
    def main() -> str:
        return response_text(answer("hello there"))

    assert main() == "re: hello there"
    assert_response_charged(traced)


async def test_an_async_stream_a_step_returned_closed_half_read_has_its_connection_closed(
    tracing, mode, llm
) -> None:
    """``await stream.close()`` on the proxy, openai-v2's wrapper of the stream inside it or not."""
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)
    responses: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    async def answer(prompt: str) -> Any:
        stream = await aclient.chat.completions.create(
            model=REQUEST_MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        )
        responses.append(getattr(stream, "stream", stream).response)  # openai-v2's wrapper's, or its own
        return stream

    @run
    async def main() -> None:
        stream = await answer("hello there")
        await stream.__anext__()
        await stream.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            await main()
        finally:
            await aclient.close()
    assert responses[0].is_closed
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    a = attrs(step_span(tracing, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_ITEMS] == 1
    if mode == "openai-v2":
        (chat,) = chat_spans(tracing)  # ended by the close
        assert chat.end_time <= step_span(tracing, "answer").end_time


async def test_an_async_stream_a_step_returned_dropped_half_read_has_its_connection_closed(
    traced, llm, monkeypatch
) -> None:
    """No await is possible when the proxy is collected, nor needed: the SDK's stream, once read
    from, closes its response when collected, as it does without multirun."""
    ignored: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)
    responses: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    async def answer(prompt: str) -> Any:
        stream = await aclient.chat.completions.create(
            model=REQUEST_MODEL, messages=[{"role": "user", "content": prompt}], stream=True
        )
        responses.append(stream.response)
        return stream

    @run
    async def main() -> None:
        stream = await answer("hello there")
        await stream.__anext__()
        del stream
        gc.collect()
        for _ in range(10):  # the loop runs the SDK's close
            if responses[0].is_closed:
                break
            await asyncio.sleep(0.01)

    try:
        await main()
    finally:
        await aclient.close()
    assert responses[0].is_closed
    a = attrs(step_span(traced, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.STEP_STREAM_ITEMS] == 1
    assert [f"{u.exc_type.__name__} in {u.object!r}" for u in ignored] == []


# ---------------------------------------------------------------------------
# a step returning a future that gives an SDK stream


def wait_for_step(traced: Any, name: str) -> None:
    """Until the step ``name`` has ended (its future's callback, on another thread, ends it)."""
    for _ in range(500):
        if step_spans(traced, name):
            return
        time.sleep(0.01)
    raise AssertionError(f"step {name!r} never ended")


def test_a_stream_a_step_s_returned_future_gives_can_be_read_by_its_caller(traced, llm, client) -> None:
    """``executor.submit(create, stream=True)``: the caller reads the stream from the future,
    not the step: the step ends when the future is done, its tokens unknown, and leaves the
    stream alone (it was closed under the caller, who got httpx's StreamClosed)."""
    with ThreadPoolExecutor(1) as pool:

        @step(kind=StepKind.LLM_CALL)
        def answer(prompt: str) -> Future[Any]:
            return pool.submit(open_stream, client, prompt)

        @run
        def main() -> str:
            stream = answer("hello there").result()
            wait_for_step(traced, "answer")
            gc.collect()
            return text_of(stream)

        assert main() == "re: hello there"
    a = attrs(step_span(traced, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.USAGE_UNKNOWN] is True  # spent all the same: not a silent 0
    assert attr.STEP_STREAM_ITEMS not in a  # the step never saw what was read
    assert attr.TOKENS_USED not in a


async def test_an_async_stream_a_step_s_returned_task_gives_can_be_read_by_its_caller(traced, llm) -> None:
    aclient = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    def answer(prompt: str) -> asyncio.Task[Any]:
        return asyncio.ensure_future(open_stream(aclient, prompt))

    @run
    async def main() -> str:
        stream = await answer("hello there")
        gc.collect()
        await asyncio.sleep(0.01)  # the loop would run a close scheduled on it
        return await chunks_text(stream)

    try:
        assert await main() == "re: hello there"
    finally:
        await aclient.close()
    a = attrs(step_span(traced, "answer"))
    assert a[attr.STEP_STATUS] == "completed"
    assert a[attr.USAGE_UNKNOWN] is True
    assert attr.STEP_STREAM_ITEMS not in a
