"""A step that returns or streams a google-genai (Gemini) response is charged its usage.

The responses are built by the real ``google-genai`` client from a local server that
answers the Gemini REST API (``generateContent``, and ``streamGenerateContent`` as
server-sent events). Prices are genai-prices' own, computed here.
"""

from __future__ import annotations

import gc
import inspect
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import genai_prices
import pytest
from google import genai
from google.genai import types

from genai_metrics import operations
from local_http import LocalHTTPServer, QuietHandler
from multirun import run, step
from multirun.models import StepKind
from multirun.telemetry import attributes as attr

MODEL = "gemini-2.5-flash"
# Gemini counts thinking apart from the answer (candidatesTokenCount) and bills both as output;
# the cached input is a part of the prompt
USAGE = {
    "promptTokenCount": 1000,
    "cachedContentTokenCount": 200,
    "candidatesTokenCount": 40,
    "thoughtsTokenCount": 60,
    "totalTokenCount": 1100,
}


def answer(usage: dict[str, Any] | None, text: str = "ok", ident: str = "resp-1") -> dict[str, Any]:
    found: dict[str, Any] = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
        "modelVersion": MODEL,
        "responseId": ident,
    }
    if usage is not None:
        found["usageMetadata"] = usage
    return found


# a stream's chunks: the prompt counted from the first, the answer and thinking by the last
STREAM = [
    answer({"promptTokenCount": 1000, "cachedContentTokenCount": 200, "totalTokenCount": 1000}, "o"),
    answer({"promptTokenCount": 1000, "candidatesTokenCount": 10, "totalTokenCount": 1010}, "k"),
    answer(USAGE, ""),
]


class Gemini(LocalHTTPServer):
    """An HTTP server on 127.0.0.1 answering ``generateContent`` with one response and
    ``streamGenerateContent`` with ``STREAM`` as server-sent events; ``failing``: with an error."""

    def __init__(self) -> None:
        server = self
        self.failing = False

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                status, kind = 200, "application/json"
                if server.failing:
                    status, body = 400, json.dumps({"error": {"code": 400, "message": "refused"}}).encode()
                elif ":streamGenerateContent" in self.path:
                    body = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in STREAM)
                    kind = "text/event-stream"
                else:
                    body = json.dumps(answer(USAGE)).encode()
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.start()


@pytest.fixture
def gemini_server() -> Iterator[Gemini]:
    server = Gemini()
    yield server
    server.stop()


@pytest.fixture
def gemini(gemini_server: Gemini) -> Iterator[genai.Client]:
    client = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=gemini_server.url))
    yield client
    client.close()


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def step_span(traced: Any, name: str) -> Any:
    (found,) = [s for s in traced.spans() if attrs(s).get("multirun.step.name") == name]
    return found


EXPECTED_COST = float(
    genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1000, output_tokens=100, cache_read_tokens=200),
        MODEL,
        provider_id="google",
    ).total_price
)


def check_charged(traced: Any, name: str, calls: int = 1) -> None:
    span = attrs(step_span(traced, name))
    assert span["gen_ai.usage.input_tokens"] == 1000
    assert span["gen_ai.usage.output_tokens"] == 100  # the answer's 40 and the thinking's 60
    assert span["gen_ai.provider.name"] == "gcp.gen_ai"
    run_span = attrs(traced.span("invoke_workflow main"))
    assert run_span["multirun.tokens_used"] == calls * 1100
    assert run_span["multirun.cost_usd"] == pytest.approx(calls * EXPECTED_COST)
    assert "multirun.cost.unpriced" not in run_span


def test_a_gemini_response_a_step_returns_is_charged(traced, gemini) -> None:
    @step
    def ask() -> types.GenerateContentResponse:
        return gemini.models.generate_content(model=MODEL, contents="hi")

    @run(name="main")
    def main() -> str | None:
        return ask().text

    assert main() == "ok"
    check_charged(traced, "ask")


async def test_an_async_gemini_response_a_step_returns_is_charged_once(traced, gemini) -> None:
    @step
    async def ask() -> types.GenerateContentResponse:
        return await gemini.aio.models.generate_content(model=MODEL, contents="hi")

    @step
    async def answer_of() -> types.GenerateContentResponse:
        return await ask()  # the same call: charged in "ask", once

    @run(name="main")
    async def main() -> None:
        await answer_of()

    await main()
    check_charged(traced, "ask")


def test_a_gemini_stream_a_generator_step_yields_is_charged_once_when_it_ends(traced, gemini) -> None:
    """Each chunk carries the running totals of one response (one responseId): charged once,
    the totals of the last."""

    @step
    def ask() -> Iterator[types.GenerateContentResponse]:
        yield from gemini.models.generate_content_stream(model=MODEL, contents="hi")

    @run(name="main")
    def main() -> str:
        return "".join(chunk.text or "" for chunk in ask())

    assert main() == "ok"
    check_charged(traced, "ask")


async def test_an_async_gemini_stream_is_charged(traced, gemini) -> None:
    @step
    async def ask() -> AsyncIterator[types.GenerateContentResponse]:
        async for chunk in await gemini.aio.models.generate_content_stream(model=MODEL, contents="hi"):
            yield chunk

    @run(name="main")
    async def main() -> None:
        async for _ in ask():
            pass

    await main()
    check_charged(traced, "ask")


def test_a_copy_of_a_gemini_response_another_step_returned_is_not_charged_again(traced, gemini) -> None:
    """A copy shares the response's usage metadata: the same call, as an OpenAI response's copy is."""

    @step
    def ask() -> types.GenerateContentResponse:
        return gemini.models.generate_content(model=MODEL, contents="hi")

    @step
    def edited(response: types.GenerateContentResponse) -> types.GenerateContentResponse:
        return response.model_copy(update={"candidates": []})

    @run(name="main")
    def main() -> None:
        edited(ask())

    main()
    check_charged(traced, "ask")
    assert "multirun.tokens_used" not in attrs(step_span(traced, "edited"))


@pytest.mark.parametrize("streamed", [False, True])
def test_a_gemini_call_is_a_generate_content_operation(traced, metric_reader, gemini, streamed) -> None:
    """The GenAI conventions name Gemini's call ``generate_content`` (as the reference
    google-genai instrumentation does), not ``chat``: on the LLM step's span and its name, and
    in the GenAI metrics."""

    @step(kind=StepKind.LLM_CALL, model=MODEL)
    def ask() -> Any:
        return gemini.models.generate_content(model=MODEL, contents="hi")

    @step(kind=StepKind.LLM_CALL, model=MODEL, name="ask")
    def ask_streamed() -> Iterator[Any]:
        yield from gemini.models.generate_content_stream(model=MODEL, contents="hi")

    @run(name="main")
    def main() -> None:
        if streamed:
            for _ in ask_streamed():
                pass
        else:
            ask()

    main()
    span = step_span(traced, "ask")
    assert span.name == f"generate_content {MODEL}"
    assert attrs(span)["gen_ai.operation.name"] == "generate_content"
    assert operations(metric_reader, "gen_ai.client.token.usage") == {"generate_content"}
    assert operations(metric_reader, "gen_ai.client.operation.duration") == {"generate_content"}


# ---------------------------------------------------------------------------
# a step that returns Gemini's stream unread: a generator (an async generator, of client.aio)

OPENERS: dict[str, Callable[[genai.Client], Any]] = {
    "models": lambda client: client.models.generate_content_stream(model=MODEL, contents="hi"),
    "chat": lambda client: client.chats.create(model=MODEL).send_message_stream("hi"),
}
AIO_OPENERS: dict[str, Callable[[genai.Client], Any]] = {
    "models": lambda client: client.aio.models.generate_content_stream(model=MODEL, contents="hi"),
    "chat": lambda client: client.aio.chats.create(model=MODEL).send_message_stream("hi"),
}


def step_ended(traced: Any, name: str) -> bool:
    return any(attrs(s).get("multirun.step.name") == name for s in traced.spans())


def as_read(chunks: list[Any]) -> list[dict[str, Any]]:
    """The chunks, but for the HTTP headers (their date)."""
    assert all(type(chunk) is types.GenerateContentResponse for chunk in chunks)
    return [chunk.model_dump(exclude={"sdk_http_response"}) for chunk in chunks]


def check_streamed(traced: Any, name: str, items: int = 3) -> None:
    """Charged once, the totals of the stream's last chunk, when its caller had read it."""
    check_charged(traced, name)
    span = attrs(step_span(traced, name))
    assert span[attr.STEP_STATUS] == "completed"
    assert span[attr.STEP_STREAM_ITEMS] == items
    assert span["gen_ai.response.model"] == MODEL
    assert span["gen_ai.response.id"] == "resp-1"
    assert span["gen_ai.response.finish_reasons"] == ("stop",)
    assert attr.USAGE_UNKNOWN not in span


@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
def test_a_gemini_stream_a_step_returns_unread_is_charged_once_when_its_caller_has_read_it(
    traced, gemini, opener
) -> None:
    direct = as_read(list(opener(gemini)))

    @step
    def ask() -> Iterator[types.GenerateContentResponse]:
        return opener(gemini)  # type: ignore[no-any-return]

    @run(name="main")
    def main() -> list[Any]:
        stream = ask()
        assert inspect.isgenerator(stream)
        assert not step_ended(traced, "ask")
        chunks = list(stream)
        assert step_ended(traced, "ask")  # at the stream's end
        return chunks

    assert as_read(main()) == direct
    check_streamed(traced, "ask")


@pytest.mark.parametrize("opener", AIO_OPENERS.values(), ids=AIO_OPENERS.keys())
async def test_an_async_gemini_stream_a_step_returns_unread_is_charged_once_when_its_caller_has_read_it(
    traced, gemini, opener
) -> None:
    direct = as_read([chunk async for chunk in await opener(gemini)])

    @step
    async def ask() -> AsyncIterator[types.GenerateContentResponse]:
        return await opener(gemini)  # type: ignore[no-any-return]

    @run(name="main")
    async def main() -> list[Any]:
        stream = await ask()
        assert inspect.isasyncgen(stream)
        assert not step_ended(traced, "ask")
        chunks = [chunk async for chunk in stream]
        assert step_ended(traced, "ask")
        return chunks

    assert as_read(await main()) == direct
    check_streamed(traced, "ask")


def check_half_read(traced: Any) -> None:
    """Ended completed with what the one chunk read said: the prompt, counted from the first."""
    span = attrs(step_span(traced, "ask"))
    assert span[attr.STEP_STATUS] == "completed"
    assert span[attr.STEP_STREAM_ITEMS] == 1
    assert span["gen_ai.usage.input_tokens"] == 1000
    assert span["gen_ai.usage.output_tokens"] == 0
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1000


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_gemini_stream_a_step_returned_left_half_read_ends_its_step_and_is_closed(
    traced, gemini, monkeypatch, how: str
) -> None:
    ignored: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    returned: list[Any] = []

    @step
    def ask() -> Iterator[types.GenerateContentResponse]:
        returned.append(gemini.models.generate_content_stream(model=MODEL, contents="hi"))
        return returned[-1]  # type: ignore[no-any-return]

    @run(name="main")
    def main() -> None:
        stream = ask()
        next(stream)
        if how == "close":
            stream.close()
            assert step_ended(traced, "ask")
        del stream
        gc.collect()

    main()
    check_half_read(traced)
    assert inspect.getgeneratorstate(returned[0]) == inspect.GEN_CLOSED
    assert [f"{u.exc_type.__name__} in {u.object!r}" for u in ignored] == []


@pytest.mark.parametrize("how", ["aclose", "drop"])
async def test_an_async_gemini_stream_a_step_returned_left_half_read_ends_its_step(
    traced, gemini, monkeypatch, how: str
) -> None:
    ignored: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    returned: list[Any] = []

    @step
    async def ask() -> AsyncIterator[types.GenerateContentResponse]:
        returned.append(await gemini.aio.models.generate_content_stream(model=MODEL, contents="hi"))
        return returned[-1]  # type: ignore[no-any-return]

    @run(name="main")
    async def main() -> None:
        stream = await ask()
        await stream.__anext__()
        if how == "aclose":
            await stream.aclose()
            assert step_ended(traced, "ask")
            assert returned[0].ag_frame is None  # the generator is closed
        del stream
        gc.collect()

    await main()
    check_half_read(traced)
    assert [f"{u.exc_type.__name__} in {u.object!r}" for u in ignored] == []


def test_a_step_whose_returned_gemini_stream_fails_fails_with_the_sdk_error(
    traced, gemini_server, gemini
) -> None:
    """google-genai sends the request as the stream is first read: by the caller, in the step."""
    gemini_server.failing = True

    @step
    def ask() -> Iterator[types.GenerateContentResponse]:
        return gemini.models.generate_content_stream(model=MODEL, contents="hi")

    @run(name="main")
    def main() -> None:
        stream = ask()
        with pytest.raises(genai.errors.ClientError):
            next(stream)

    main()
    span = attrs(step_span(traced, "ask"))
    assert span[attr.STEP_STATUS] == "failed"
    assert span["error.type"].startswith("google.genai.errors.")
    assert attrs(traced.span("invoke_workflow main"))[attr.RUN_STATUS] == "completed"


def test_what_is_sent_into_a_gemini_stream_a_step_returned_goes_to_the_generator(traced, gemini) -> None:
    """``send()`` is the generator's own, unwatched: the last chunk read still has the totals."""

    @step
    def ask() -> Iterator[types.GenerateContentResponse]:
        return gemini.models.generate_content_stream(model=MODEL, contents="hi")

    @run(name="main")
    def main() -> list[str | None]:
        stream = ask()
        first = next(stream)
        second = stream.send(None)  # type: ignore[attr-defined]
        return [first.text, second.text] + [chunk.text for chunk in stream]

    assert main() == ["o", "k", ""]
    check_streamed(traced, "ask", items=2)


def test_a_step_passing_on_the_gemini_stream_a_step_inside_it_returned_is_charged_once(
    traced, gemini
) -> None:
    @step
    def ask() -> Iterator[types.GenerateContentResponse]:
        return gemini.models.generate_content_stream(model=MODEL, contents="hi")

    @step
    def respond() -> Iterator[types.GenerateContentResponse]:
        return ask()

    @run(name="main")
    def main() -> str:
        return "".join(chunk.text or "" for chunk in respond())

    assert main() == "ok"
    check_streamed(traced, "ask")
    outer, inner = step_span(traced, "respond"), step_span(traced, "ask")
    assert attrs(outer)["multirun.tokens_used"] == 1100
    assert inner.end_time <= outer.end_time


def generate_content_stream() -> Iterator[int]:
    """A generator of the program's own, named as google-genai's stream."""
    yield from range(3)


@pytest.mark.parametrize(
    "make", [lambda: (n for n in range(3)), generate_content_stream], ids=["plain", "named like gemini's"]
)
def test_a_generator_a_step_returns_that_is_no_gemini_stream_is_handed_back_as_it_is(
    traced, make: Callable[[], Iterator[int]]
) -> None:
    @step
    def give() -> Iterator[int]:
        return make()

    @run(name="main")
    def main() -> list[int]:
        numbers = give()
        assert step_ended(traced, "give")  # when it returned, the generator unread
        return list(numbers)

    assert main() == [0, 1, 2]
    assert attr.STEP_STREAM_ITEMS not in attrs(step_span(traced, "give"))
