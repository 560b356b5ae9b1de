"""A step that returns the real ``anthropic`` SDK's stream, read by its caller, is charged its usage.

No mock of anthropic: a real ``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic``
reads Server-Sent Events from a server of this test on 127.0.0.1 that answers
``POST /v1/messages`` with ``"stream": true`` as the Messages API does: a
``message_start`` with the input tokens (cached input apart), the text, then
``message_delta`` events with the running total of the output tokens.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import genai_prices
import pytest

import multirun
from local_http import LocalHTTPServer, QuietHandler
from multirun import run, step
from multirun.models import StepKind
from multirun.telemetry import attributes as attr

MODEL = "claude-3-5-sonnet-20241022"
INPUT, CACHE_READ, OUTPUT = 25, 100, 15


def sse_events(model: str, prompt: str) -> Iterator[str]:
    """The events of a streamed message, as the Messages API sends them."""

    def event(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    usage = {"input_tokens": INPUT, "output_tokens": 1, "cache_read_input_tokens": CACHE_READ}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": []}
    yield event("message_start", {"message": {**message, "stop_reason": None, "usage": usage}})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    for word in f"re: {prompt}".split(" "):
        yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word}})
    yield event("content_block_stop", {"index": 0})
    for output in (7, OUTPUT):  # running totals, not increments
        delta = {"delta": {"stop_reason": None, "stop_sequence": None}, "usage": {"output_tokens": output}}
        yield event("message_delta", delta)
    yield event("message_stop", {})


class MessagesServer(LocalHTTPServer):
    """``POST /v1/messages`` on 127.0.0.1, streamed."""

    def __init__(self) -> None:
        self.requests = 0
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                server.requests += 1
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for text in sse_events(body["model"], body["messages"][-1]["content"]):
                    self.wfile.write(text.encode())
                    self.wfile.flush()
                self.close_connection = True

        super().__init__(Handler)


@pytest.fixture
def messages() -> Iterator[MessagesServer]:
    server = MessagesServer()
    server.start()
    yield server
    server.stop()


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def open_stream(client: Any, model: str = MODEL) -> Any:
    """``messages.create(stream=True)``: the SDK's stream (from an AsyncAnthropic, to be awaited)."""
    return client.messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "hello"}], stream=True
    )


def open_manager(client: Any, model: str = MODEL) -> Any:
    """``messages.stream()``: a MessageStreamManager, entered to a MessageStream."""
    return client.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "hello"}])


def joined(events: Any) -> str:
    return "".join(e.delta.text for e in events if e.type == "content_block_delta")


def _until_done(stream: Any) -> str:
    stream.until_done()
    return str(stream.current_message_snapshot.content[0].text)


async def _joined_async(stream: Any) -> str:
    return joined([event async for event in stream])


async def _text_async(stream: Any) -> str:
    return "".join([text async for text in stream.text_stream])


async def _until_done_async(stream: Any) -> str:
    await stream.until_done()
    return str(stream.current_message_snapshot.content[0].text)


@dataclass(frozen=True)
class Opener:
    """How a step's caller gets the message's stream: ``create(stream=True)``'s stream, read as it
    is, or ``stream()``'s manager, whose ``with`` sends the request and gives the SDK's
    MessageStream, a helper reading the stream."""

    open: Callable[[Any, str], Any]  # (client, model): what the step returns
    enter: Callable[[Any], Any]  # what the step returned: a (sync or async) `with` giving what to read
    reads: dict[str, Callable[[Any], str]]  # each way of reading it, to its text
    areads: dict[str, Callable[[Any], Awaitable[str]]]  # the same, from an AsyncAnthropic


STREAM = Opener(
    open=open_stream,
    enter=contextlib.nullcontext,
    reads={"events": joined},
    areads={"events": _joined_async},
)
MANAGER = Opener(
    open=open_manager,
    enter=lambda manager: manager,
    reads={
        "events": joined,
        "text_stream": lambda stream: "".join(stream.text_stream),
        "get_final_text": lambda stream: stream.get_final_text(),
        "until_done": _until_done,
    },
    areads={
        "events": _joined_async,
        "text_stream": _text_async,
        "get_final_text": lambda stream: stream.get_final_text(),
        "until_done": _until_done_async,
    },
)
OPENERS = {"stream": STREAM, "manager": MANAGER}


async def aopen(opener: Opener, client: anthropic.AsyncAnthropic) -> Any:
    """``opener.open`` from an AsyncAnthropic: ``create()`` is awaited, ``stream()`` is not."""
    opened = opener.open(client, MODEL)
    return await opened if inspect.isawaitable(opened) else opened


def step_ended(traced: Any) -> bool:
    return any(attrs(s).get(attr.STEP_NAME) == "answer" for s in traced.spans())


def answer_span(traced: Any) -> Any:
    (span,) = [s for s in traced.spans() if attrs(s).get(attr.STEP_NAME) == "answer"]
    return span


def assert_charged(traced: Any) -> None:
    a = attrs(traced.span(f"chat {MODEL}"))  # an LLM step is named after the model it used
    assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == INPUT + CACHE_READ  # cached input counts as input
    assert a[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == OUTPUT
    assert a[attr.GEN_AI_PROVIDER_NAME] == "anthropic"
    assert a[attr.STEP_STREAM_ITEMS] == 8
    usage = genai_prices.Usage(
        input_tokens=INPUT + CACHE_READ, output_tokens=OUTPUT, cache_read_tokens=CACHE_READ
    )
    price = float(genai_prices.calc_price(usage, MODEL, provider_id="anthropic").total_price)
    main = attrs(traced.span("invoke_workflow main"))
    assert main[attr.TOKENS_USED] == INPUT + CACHE_READ + OUTPUT
    assert main[attr.COST_USD] == pytest.approx(price, rel=1e-9)


@pytest.mark.parametrize(
    ("opener", "read"),
    [pytest.param(OPENERS[o], read, id=f"{o}-{read}") for o in OPENERS for read in OPENERS[o].reads],
)
def test_a_step_returning_an_anthropic_stream_is_charged_when_its_caller_reads_it(
    traced, messages, opener: Opener, read: str
) -> None:
    """The step stays open from the stream's (or manager's) return until the stream has been read,
    whichever way the caller reads it, and is charged the message's usage once."""
    client = anthropic.Anthropic(base_url=messages.url, api_key="test", max_retries=0)
    returned: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    def answer() -> Any:
        returned.append(opener.open(client, MODEL))
        return returned[-1]

    @run
    def main() -> str:
        got = answer()
        assert isinstance(got, type(returned[0]))  # the SDK's Stream, or MessageStreamManager
        with opener.enter(got) as stream:
            if opener is MANAGER:
                assert isinstance(stream, anthropic.lib.streaming.MessageStream)
            assert not step_ended(traced)
            text = opener.reads[read](stream)
            assert step_ended(traced)  # at the stream's end, not at the manager's block's
        return text

    assert main() == "re:hello"
    assert messages.requests == 1
    assert_charged(traced)
    assert attrs(traced.span(f"chat {MODEL}"))[attr.STEP_STATUS] == "completed"


@pytest.mark.parametrize(
    ("opener", "read"),
    [pytest.param(OPENERS[o], read, id=f"{o}-{read}") for o in OPENERS for read in OPENERS[o].areads],
)
async def test_an_async_step_returning_an_anthropic_stream_is_charged_when_its_caller_reads_it(
    traced, messages, opener: Opener, read: str
) -> None:
    client = anthropic.AsyncAnthropic(base_url=messages.url, api_key="test", max_retries=0)
    returned: list[Any] = []

    @step(kind=StepKind.LLM_CALL)
    async def answer() -> Any:
        returned.append(await aopen(opener, client))
        return returned[-1]

    @run
    async def main() -> str:
        got = await answer()
        assert isinstance(got, type(returned[0]))  # the SDK's AsyncStream, or AsyncMessageStreamManager
        async with opener.enter(got) as stream:
            assert not step_ended(traced)
            text = await opener.areads[read](stream)
            assert step_ended(traced)
        return str(text)

    assert await main() == "re:hello"
    assert_charged(traced)


def test_a_returned_stream_of_a_model_with_no_price_under_unpriced_fail_fails_at_its_end(
    traced, messages
) -> None:
    """As a generator step's stream: the refusal is raised when the stream has been read to its end."""
    multirun.init(tracer_provider=traced.provider, unpriced="fail")
    client = anthropic.Anthropic(base_url=messages.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    def answer() -> Any:
        return open_stream(client, "my-private-model")

    @run
    def main() -> list[Any]:
        read: list[Any] = []
        with pytest.raises(multirun.PolicyViolation) as refused:
            read.extend(answer())
        assert refused.value.rule == "unpriced"
        return read

    assert len(main()) == 8  # every event, then the refusal
    a = attrs(traced.span("chat my-private-model"))
    assert a[attr.STEP_STATUS] == "failed"
    assert a[attr.UNPRICED] is True
    assert a[attr.TOKENS_USED] == INPUT + CACHE_READ + OUTPUT


# ---------------------------------------------------------------------------
# a stream manager only: left half-read, never entered, or entered by the step itself


@pytest.mark.parametrize("how", ["with", "never entered"])
def test_a_returned_anthropic_stream_manager_left_half_read_ends_its_step(traced, messages, how: str) -> None:
    """Left after one event (the message's start, with its input tokens), or never entered (no
    request sent): the step ends then, completed, with what was read."""
    client = anthropic.Anthropic(base_url=messages.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    def answer() -> Any:
        return open_manager(client)

    @run
    def main() -> None:
        manager = answer()
        if how == "with":
            with manager as stream:
                next(iter(stream))
            assert step_ended(traced)  # when the block was left
        del manager
        gc.collect()

    main()
    a = attrs(answer_span(traced))
    assert a[attr.STEP_STATUS] == "completed"
    if how == "with":
        assert a[attr.STEP_STREAM_ITEMS] == 1
        assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == INPUT + CACHE_READ
    else:
        assert messages.requests == 0
        assert a[attr.STEP_STREAM_ITEMS] == 0
        assert a[attr.USAGE_UNKNOWN] is True


def test_a_generator_step_yielding_an_anthropic_message_stream_is_charged(traced, messages) -> None:
    """The common shape: the step enters the manager itself and yields the MessageStream's events."""
    client = anthropic.Anthropic(base_url=messages.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    def answer() -> Iterator[Any]:
        with open_manager(client) as stream:
            yield from stream

    @run
    def main() -> str:
        return joined(answer())

    assert main() == "re:hello"
    a = attrs(traced.span(f"chat {MODEL}"))
    assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == INPUT + CACHE_READ
    assert a[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == OUTPUT
    assert attrs(traced.span("invoke_workflow main"))[attr.TOKENS_USED] == INPUT + CACHE_READ + OUTPUT


def test_a_stream_is_charged_to_its_step_after_init_moved_to_a_provider_of_its_own(
    global_otel, messages, tmp_path
) -> None:
    """``init()`` (or a first run) makes the global provider; a later ``init(tracer_provider=...)``
    replaces that configuration. The SDK's own span of the call (anthropic traces through the
    global provider) is no span of the new provider, so it does not charge the step: the step
    is charged from the stream it returned, named after the model, with its ``gen_ai.usage.*``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    multirun.init(span_exporter=InMemorySpanExporter(), local_dir=str(tmp_path))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    multirun.init(tracer_provider=provider, local_dir=str(tmp_path))
    client = anthropic.Anthropic(base_url=messages.url, api_key="test", max_retries=0)

    @step(kind=StepKind.LLM_CALL)
    def answer() -> Any:
        return open_stream(client)

    @run
    def main() -> str:
        return joined(answer())

    try:
        assert main() == "re:hello"
        spans = {s.name: attrs(s) for s in exporter.get_finished_spans()}
        assert f"chat {MODEL}" in spans, list(spans)
        a = spans[f"chat {MODEL}"]
        assert a[attr.GEN_AI_USAGE_INPUT_TOKENS] == INPUT + CACHE_READ
        assert a[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == OUTPUT
        assert spans["invoke_workflow main"][attr.TOKENS_USED] == INPUT + CACHE_READ + OUTPUT  # once
    finally:
        provider.shutdown()
