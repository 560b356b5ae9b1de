"""An OpenAI SDK call in a multirun LLM step, in a program that set up Traceloop (OpenLLMetry)
with its OpenAI instrumentation: the SDK talks to a local server answering canned completions."""

from __future__ import annotations

import json
from typing import Any

from _report import report
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from traceloop.sdk import Traceloop
from traceloop.sdk.decorators import task, workflow

from local_http import LocalHTTPServer, QuietHandler

MODEL = "gpt-4o-mini-2024-07-18"
USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024},
}
STREAM_USAGE = {"prompt_tokens": 500, "completion_tokens": 20, "total_tokens": 520}
requests: list[dict[str, Any]] = []


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1_730_000_000}
    body["model"] = MODEL
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Completions(QuietHandler):
    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        requests.append(request)
        if request.get("stream"):
            kind = "text/event-stream"
            body = b"".join(
                [
                    chunk({"role": "assistant", "content": "o"}),
                    chunk({"content": "k"}, finish="stop"),
                    chunk({}, usage=STREAM_USAGE),
                    b"data: [DONE]\n\n",
                ]
            )
        else:
            kind = "application/json"
            message = {"role": "assistant", "content": "ok"}
            answer: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL}
            answer["created"] = 1_730_000_000
            answer["choices"] = [{"index": 0, "finish_reason": "stop", "message": message}]
            answer["usage"] = USAGE
            body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = LocalHTTPServer(Completions, "/v1")
server.start()
exported = InMemorySpanExporter()
Traceloop.init(app_name="coexist", exporter=exported, disable_batch=True, telemetry_enabled=False)

import openai  # noqa: E402

from multirun import run, step  # noqa: E402
from multirun.context import get_current_run_context  # noqa: E402
from multirun.errors import BudgetExceededError  # noqa: E402
from multirun.models import Budget, StepKind  # noqa: E402

client = openai.OpenAI(base_url=server.url, api_key="test-key", max_retries=0)
ask_for = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
stream_usage = {"stream": True, "stream_options": {"include_usage": True}}


@task(name="traceloop task inside a step")
def traceloop_task() -> None:
    pass


@step(kind=StepKind.LLM_CALL)
def ask() -> Any:
    traceloop_task()
    return client.chat.completions.create(**ask_for)


@step(kind=StepKind.LLM_CALL)
def ask_streaming() -> Any:
    yield from client.chat.completions.create(**ask_for, **stream_usage)


@step(kind=StepKind.LLM_CALL)
def return_stream() -> Any:
    return client.chat.completions.create(**ask_for, **stream_usage)


@run
def main() -> Any:
    ask()
    list(ask_streaming())
    list(return_stream())
    return get_current_run_context().run


@workflow(name="traceloop workflow around a run")
def around() -> Any:
    return main()


@run(budget=Budget(max_tokens=2000))
def capped() -> None:
    for _ in range(3):
        ask()


done = around()
calls = len(requests)
refusal = None
try:
    capped()
except BudgetExceededError as error:
    refusal = str(error)
report(
    exported.get_finished_spans(),
    steps=[s.model_dump(mode="json") for s in done.steps],
    run={"tokens": done.tokens_used, "cost": done.cost_usd},
    capped_calls=len(requests) - calls,
    refusal=refusal,
)
