"""An LLM step's span carries its response's id, finish reasons and server, as the GenAI
conventions recommend (``gen_ai.response.id``, ``gen_ai.response.finish_reasons``,
``server.address``, ``server.port``).

The responses are the real SDKs' (openai, anthropic, google-genai), read from local servers
that answer as the providers' APIs do; a few are validated from the APIs' documented JSON
where a finish reason the servers do not give is checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message
from google.genai import types
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

import multirun
from local_http import LocalHTTPServer, QuietHandler
from multirun import run, step
from multirun.errors import ConfigurationError
from multirun.models import StepKind
from multirun.telemetry import attributes as attr
from test_gemini_usage import gemini, gemini_server
from test_openai_usage import RESPONSE_MODEL, client, llm

__all__ = ["client", "gemini", "gemini_server", "llm"]  # fixtures, imported for pytest

ID, REASONS = attr.GEN_AI_RESPONSE_ID, attr.GEN_AI_RESPONSE_FINISH_REASONS
ADDRESS, PORT = attr.SERVER_ADDRESS, attr.SERVER_PORT


def step_attrs(traced: Any, name: str = "ask") -> dict[str, Any]:
    (span,) = [s for s in traced.spans() if (s.attributes or {}).get(attr.STEP_NAME) == name]
    return dict(span.attributes or {})


def in_run(body: Any) -> Any:
    @run(name="main")
    def main() -> Any:
        return body()

    return main()


# ---------------------------------------------------------------------------
# OpenAI


def chat_completion(ident: str, model: str, *finish_reasons: str) -> ChatCompletion:
    """A chat completion of 5 + 7 tokens, one choice per finish reason (contents "a", "b", ...)."""
    choices = [
        {"index": i, "finish_reason": reason, "message": {"role": "assistant", "content": "ab"[i]}}
        for i, reason in enumerate(finish_reasons)
    ]
    return ChatCompletion.model_validate(
        {
            "id": ident,
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
    )


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **kwargs
    )


def test_a_chat_completion_s_id_and_finish_reasons_are_on_the_step_span(traced, client) -> None:
    ask = step(name="ask", kind=StepKind.LLM_CALL)(lambda: chat(client))
    in_run(ask)
    span = step_attrs(traced)
    assert span[ID] == "chatcmpl-0"
    assert span[REASONS] == ("stop",)
    assert span[attr.GEN_AI_RESPONSE_MODEL] == RESPONSE_MODEL
    assert ADDRESS not in span  # a parsed response does not say where it came from


def test_a_raw_chat_response_gives_the_server_too(traced, llm, client) -> None:
    ask = step(name="ask")(
        lambda: client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    )
    in_run(ask)
    span = step_attrs(traced)
    assert span[ID] == "chatcmpl-0"
    assert span[REASONS] == ("stop",)
    assert span[ADDRESS] == "127.0.0.1"
    assert span[PORT] == llm.port


class _At(httpx.BaseTransport):
    """Sends each request to the local server while the client, and so the response, keep the
    URL asked for: as DNS would answer for the provider's host."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        there = request.url.copy_with(scheme="http", host="127.0.0.1", port=self._port)
        return self._inner.handle_request(
            httpx.Request(request.method, there, headers=request.headers, content=request.content)
        )

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize(
    ("base_url", "port"),
    [("https://api.example.test/v1", None), ("https://api.example.test:8443/v1", 8443)],
    ids=["default-port", "other-port"],
)
def test_the_server_port_is_left_out_when_it_is_the_scheme_s_default_as_openai_v2_does(
    traced, llm, base_url: str, port: int | None
) -> None:
    """A departure from the conventions, which require server.port with server.address: the
    official instrumentations (openai-v2, anthropic) leave out 443, and the spans agree."""
    with (
        httpx.Client(transport=_At(llm.port)) as http,
        openai.OpenAI(base_url=base_url, api_key="test", max_retries=0, http_client=http) as provider,
    ):
        in_run(
            step(name="ask")(
                lambda: provider.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            )
        )
    span = step_attrs(traced)
    assert (span[ADDRESS], span.get(PORT)) == ("api.example.test", port)


def test_a_returned_chat_stream_gives_id_finish_reason_and_server_once_read(traced, llm, client) -> None:
    ask = step(name="ask")(lambda: chat(client, stream=True, stream_options={"include_usage": True}))
    in_run(lambda: "".join(c.choices[0].delta.content or "" for c in ask() if c.choices))
    span = step_attrs(traced)
    assert span[ID] == "chatcmpl-0"
    assert span[REASONS] == ("stop",)  # from the chunk before the usage chunk, which has no choices
    assert (span[ADDRESS], span[PORT]) == ("127.0.0.1", llm.port)


def test_a_returned_chat_stream_manager_gives_the_server_of_the_stream_it_opens(traced, llm, client) -> None:
    @step(name="ask")
    def ask() -> Any:
        return client.chat.completions.stream(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream_options={"include_usage": True},
        )

    def read() -> None:
        with ask() as stream:
            stream.until_done()

    in_run(read)
    span = step_attrs(traced)
    assert (span[ID], span[REASONS]) == ("chatcmpl-0", ("stop",))
    assert (span[ADDRESS], span[PORT]) == ("127.0.0.1", llm.port)


def test_a_generator_step_yielding_chat_chunks_gives_id_and_finish_reason(traced, client) -> None:
    @step(name="ask")
    def ask() -> Iterator[Any]:
        yield from chat(client, stream=True, stream_options={"include_usage": True})

    in_run(lambda: list(ask()))
    span = step_attrs(traced)
    assert (span[ID], span[REASONS]) == ("chatcmpl-0", ("stop",))
    assert ADDRESS not in span  # the chunks do not say where they came from


def test_a_generator_step_yielding_a_stream_and_a_whole_response_gives_the_later_one_s(
    traced, client
) -> None:
    """The last call is the one yielded last, streamed or whole, as in a step of several calls."""
    whole = chat_completion("chatcmpl-whole", "gpt-4o", "length")

    def streamed() -> Iterator[Any]:
        return chat(client, stream=True, stream_options={"include_usage": True})

    @step(name="ask")
    def stream_then_whole() -> Iterator[Any]:
        yield from streamed()
        yield whole

    @step(name="ask_again")
    def whole_then_stream() -> Iterator[Any]:
        yield whole
        yield from streamed()

    in_run(lambda: (list(stream_then_whole()), list(whole_then_stream())))
    span = step_attrs(traced)
    assert (span[ID], span[REASONS], span[attr.GEN_AI_RESPONSE_MODEL]) == (
        "chatcmpl-whole",
        ("length",),
        "gpt-4o",
    )
    span = step_attrs(traced, "ask_again")
    assert (span[ID], span[REASONS], span[attr.GEN_AI_RESPONSE_MODEL]) == (
        "chatcmpl-1",
        ("stop",),
        RESPONSE_MODEL,
    )


def test_a_responses_api_response_plain_and_streamed(traced, llm, client) -> None:
    ask = step(name="ask")(lambda: client.responses.create(model="gpt-4o-mini", input="hi"))
    streamed = step(name="streamed")(
        lambda: client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    )
    in_run(lambda: (ask(), list(streamed())))
    plain = step_attrs(traced)
    assert (plain[ID], plain[REASONS]) == ("resp-0", ("stop",))  # its message "completed", as openai-v2 says
    span = step_attrs(traced, "streamed")
    assert (span[ID], span[REASONS]) == ("resp-1", ("stop",))
    assert (span[ADDRESS], span[PORT]) == ("127.0.0.1", llm.port)


def test_openai_finish_reasons_are_one_a_choice_as_openai_v2_writes_them(traced) -> None:
    completion = chat_completion("chatcmpl-n", "gpt-4o-mini", "length", "tool_calls")
    cut = Response.model_validate(
        {
            "id": "resp-cut",
            "object": "response",
            "created_at": 1,
            "model": "gpt-4o-mini",
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "output": [
                {"id": "m", "type": "message", "role": "assistant", "status": "incomplete", "content": []}
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 5,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 12,
            },
        }
    )
    in_run(lambda: (step(name="ask")(lambda: completion)(), step(name="cut")(lambda: cut)()))
    assert step_attrs(traced)[REASONS] == ("length", "tool_calls")
    assert step_attrs(traced, "cut")[REASONS] == ("incomplete",)


def test_a_step_of_several_calls_carries_the_last_one_s_response(traced, client) -> None:
    """As ``gen_ai.response.model``: the last call's (a tuple's last response)."""
    ask = step(name="ask")(lambda: (chat(client), chat(client)))
    in_run(ask)
    span = step_attrs(traced)
    assert span[ID] == "chatcmpl-1"
    assert span[attr.GEN_AI_USAGE_INPUT_TOKENS] > 0


def test_a_step_with_no_model_call_has_no_response_attributes(traced) -> None:
    in_run(step(name="ask")(lambda: "plain"))
    span = step_attrs(traced)
    assert not {ID, REASONS, ADDRESS, PORT} & span.keys()


# ---------------------------------------------------------------------------
# Anthropic

ANTHROPIC_MODEL = "claude-3-5-sonnet-20241022"
USAGE = {"input_tokens": 25, "output_tokens": 15}


class Messages(LocalHTTPServer):
    """``POST /v1/messages`` on 127.0.0.1, answered as the Messages API does: a whole message,
    or its events (``stream``); the message stopped at ``max_tokens``."""

    def __init__(self) -> None:
        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                message = {
                    "id": "msg_7",
                    "type": "message",
                    "role": "assistant",
                    "model": ANTHROPIC_MODEL,
                    "content": [{"type": "text", "text": "ok"}],
                    "stop_reason": "max_tokens",
                    "stop_sequence": None,
                    "usage": USAGE,
                }
                if body.get("stream"):
                    data = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events(message))
                    kind = "text/event-stream"
                else:
                    data, kind = json.dumps(message), "application/json"
                encoded = data.encode()
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(encoded)))
                self.end_headers()
                self.wfile.write(encoded)

        super().__init__(Handler)


def events(message: dict[str, Any]) -> list[dict[str, Any]]:
    start = {**message, "content": [], "stop_reason": None, "usage": {**USAGE, "output_tokens": 1}}
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": delta, "usage": {"output_tokens": USAGE["output_tokens"]}},
        {"type": "message_stop"},
    ]


@pytest.fixture
def claude() -> Iterator[tuple[anthropic.Anthropic, Messages]]:
    server = Messages()
    server.start()
    client = anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0)
    yield client, server
    client.close()
    server.stop()


def message_args() -> dict[str, Any]:
    return {"model": ANTHROPIC_MODEL, "max_tokens": 15, "messages": [{"role": "user", "content": "hi"}]}


def test_an_anthropic_message_plain_raw_streamed_and_managed(traced, claude) -> None:
    """Its stop reason in the words of opentelemetry-instrumentation-anthropic: ``max_tokens``
    is ``length``."""
    client, server = claude
    plain = step(name="plain")(lambda: client.messages.create(**message_args()))
    raw = step(name="raw")(lambda: client.messages.with_raw_response.create(**message_args()))
    streamed = step(name="streamed")(lambda: client.messages.create(**message_args(), stream=True))
    managed = step(name="managed")(lambda: client.messages.stream(**message_args()))

    def body() -> None:
        plain()
        raw()
        list(streamed())
        with managed() as stream:
            stream.get_final_message()

    in_run(body)
    for name in ("plain", "raw", "streamed", "managed"):
        span = step_attrs(traced, name)
        assert (name, span[ID], span[REASONS]) == (name, "msg_7", ("length",))
        assert span[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == 15
        if name == "plain":
            assert ADDRESS not in span
        else:
            assert (name, span[ADDRESS], span[PORT]) == (name, "127.0.0.1", server.port)


def test_a_generator_step_yielding_anthropic_events_gives_id_and_stop_reason(traced, claude) -> None:
    client, _ = claude

    @step(name="ask")
    def ask() -> Iterator[Any]:
        with client.messages.stream(**message_args()) as stream:
            yield from stream

    in_run(lambda: list(ask()))
    span = step_attrs(traced)
    assert (span[ID], span[REASONS]) == ("msg_7", ("length",))


def test_anthropic_stop_reasons_are_mapped_as_its_instrumentation_maps_them(traced) -> None:
    def message(reason: str) -> Message:
        return Message.model_validate(
            {
                "id": f"msg_{reason}",
                "type": "message",
                "role": "assistant",
                "model": ANTHROPIC_MODEL,
                "content": [],
                "stop_reason": reason,
                "usage": USAGE,
            }
        )

    reasons = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "refusal": "refusal"}
    in_run(lambda: [step(name=given)(lambda given=given: message(given))() for given in reasons])
    for given, written in reasons.items():
        assert step_attrs(traced, given)[REASONS] == (written,)


# ---------------------------------------------------------------------------
# google-genai


def test_a_gemini_response_plain_and_streamed_gives_id_and_finish_reason(traced, gemini) -> None:
    """Its finish reason as Google's instrumentation writes it: ``STOP`` is ``stop``."""
    plain = step(name="ask")(lambda: gemini.models.generate_content(model="gemini-2.5-flash", contents="hi"))

    @step(name="streamed")
    def streamed() -> Iterator[Any]:
        yield from gemini.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")

    in_run(lambda: (plain(), list(streamed())))
    for name in ("ask", "streamed"):
        span = step_attrs(traced, name)
        assert (name, span[ID], span[REASONS]) == (name, "resp-1", ("stop",))


def test_gemini_finish_reasons_are_one_a_candidate(traced) -> None:
    response = types.GenerateContentResponse.model_validate(
        {
            "candidates": [
                {"finishReason": "MAX_TOKENS", "index": 0},
                {"finishReason": "SAFETY", "index": 1},
            ],
            "modelVersion": "gemini-2.5-flash",
            "responseId": "resp-2",
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
        }
    )
    in_run(step(name="ask")(lambda: response))
    assert step_attrs(traced)[REASONS] == ("max_tokens", "safety")


# ---------------------------------------------------------------------------
# report_usage


def test_report_usage_writes_the_response_id_and_finish_reasons_it_is_given(traced) -> None:
    @step(name="ask", kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage(input_tokens=3, output_tokens=4, response_id="r-9", finish_reasons=["length"])

    in_run(ask)
    span = step_attrs(traced)
    assert (span[ID], span[REASONS]) == ("r-9", ("length",))


def test_a_response_reported_by_hand_with_its_id_is_not_charged_again_around(traced) -> None:
    """The step inside reports the call with the response's id; the step around returns that
    response: one call, charged once."""
    completion = chat_completion("chatcmpl-hand", "gpt-4o-mini", "stop")

    @step(name="inner")
    def inner() -> ChatCompletion:
        multirun.report_usage("gpt-4o-mini", input_tokens=5, output_tokens=7, response_id="chatcmpl-hand")
        return completion.model_copy(deep=True)  # another object: only the id tells they are one call

    outer = step(name="outer")(inner)
    in_run(outer)
    assert step_attrs(traced, "outer")[attr.TOKENS_USED] == 12
    assert ID not in step_attrs(traced, "outer")  # it charged no call of its own
    assert dict(traced.span("invoke_workflow main").attributes)[attr.TOKENS_USED] == 12


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"response_id": ""}, "response_id"),
        ({"response_id": 7}, "response_id"),
        ({"finish_reasons": "stop"}, "finish_reasons"),
        ({"finish_reasons": ["stop", None]}, "finish_reasons"),
    ],
)
def test_report_usage_refuses_a_bad_response_id_or_finish_reasons_naming_it(traced, given, named) -> None:
    @step(name="ask")
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=1, **given)

    with pytest.raises(ConfigurationError, match=f"^{named} must be"):
        in_run(ask)
