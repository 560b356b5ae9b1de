"""A step that returns or streams a google-genai (Gemini) response is charged its usage.

The responses are built by the real ``google-genai`` client from a local server that
answers the Gemini REST API (``generateContent``, and ``streamGenerateContent`` as
server-sent events). Prices are genai-prices' own, computed here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import genai_prices
import pytest
from google import genai
from google.genai import types

from genai_metrics import operations
from local_http import LocalHTTPServer, QuietHandler
from multirun import run, step
from multirun.models import StepKind

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
    ``streamGenerateContent`` with ``STREAM`` as server-sent events."""

    def __init__(self) -> None:
        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if ":streamGenerateContent" in self.path:
                    body = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in STREAM)
                    kind = "text/event-stream"
                else:
                    body, kind = json.dumps(answer(USAGE)).encode(), "application/json"
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.start()


@pytest.fixture
def gemini() -> Iterator[genai.Client]:
    server = Gemini()
    client = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=server.url))
    yield client
    client.close()
    server.stop()


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
