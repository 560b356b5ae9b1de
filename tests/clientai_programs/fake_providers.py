"""Offline models for ClientAI's other providers, as fake_openai.py is for its OpenAI one.

Each is ClientAI's own provider class with one change: its SDK client is a
scripted fake (none of the ``ollama``, ``groq`` or ``replicate`` packages is
needed), so the provider's request building, text extraction and streaming
all run. The fakes answer in the shapes of those APIs:

- Ollama: dicts (``clientai.ollama._typing``): ``response`` (``generate``) or
  ``message.content`` (``chat``), with ``prompt_eval_count`` and
  ``eval_count`` on the full response and on the last (``done``) chunk of a
  stream, which Ollama always sends.
- Groq: chat completions with ``usage``; a stream's last chunk carries its
  usage in ``x_groq.usage``, unasked, as Groq sends it.
- Replicate: predictions, whose ``metrics`` hold ``input_token_count`` and
  ``output_token_count`` once they succeeded; a streamed prediction's events
  are text only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from clientai import ClientAI
from clientai.groq.provider import Provider as GroqProvider
from clientai.ollama.provider import Provider as OllamaProvider
from clientai.replicate.provider import Provider as ReplicateProvider
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from clientai_programs.fake_openai import ScriptedModel

_ids = itertools.count(1)


class FakeOllama:
    """The part of ``ollama.Client`` that ClientAI's provider uses: ``generate`` and ``chat``."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model

    def generate(self, model: str, prompt: str, stream: bool = False, options: Any = None) -> Any:
        messages = [{"role": "user", "content": prompt}]
        return self._answer(model, messages, stream, options, lambda text: {"response": text})

    def chat(self, model: str, messages: list[Any], stream: bool = False, options: Any = None) -> Any:
        return self._answer(
            model, messages, stream, options, lambda text: {"message": {"role": "assistant", "content": text}}
        )

    def _answer(self, model: str, messages: Any, stream: bool, options: Any, body: Any) -> Any:
        reply = self.model.answer(
            {"model": model, "messages": messages, "stream": stream, "options": options}
        )
        usage = {"prompt_eval_count": reply.prompt_tokens, "eval_count": reply.completion_tokens}
        head = {"model": model, "created_at": "2025-01-01T00:00:00Z"}
        if not stream:
            return {**head, **body(reply.text), "done": True, "done_reason": "stop", **usage}

        def chunks() -> Iterator[dict[str, Any]]:
            for i, word in enumerate(reply.text.split(" ")):
                yield {**head, **body(word if i == 0 else " " + word), "done": False}
            yield {**head, **body(""), "done": True, "done_reason": "stop", **usage}

        return chunks()


class OfflineOllama(OllamaProvider):
    """ClientAI's Ollama provider, with the fake server instead of the ``ollama`` client."""

    def __init__(self, model: ScriptedModel) -> None:
        self.client = FakeOllama(model)


class FakeGroqCompletions:
    """``client.chat.completions`` of the Groq SDK."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model

    def create(self, **request: Any) -> Any:
        reply = self.model.answer(request)
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "queue_time": 0.01,
        }
        ident, name = f"chatcmpl-groq-{next(_ids)}", request["model"]
        head = {"id": ident, "created": 1_700_000_000, "model": name}
        if not request.get("stream"):
            return ChatCompletion.model_validate(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply.text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                    "x_groq": {"id": "req_1"},
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> ChatCompletionChunk:
            return ChatCompletionChunk.model_validate(
                {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                    **extra,
                }
            )

        def chunks() -> Iterator[ChatCompletionChunk]:
            words = reply.text.split(" ")
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word}, x_groq={"id": "req_1"})
            yield chunk({}, "stop", x_groq={"id": "req_1", "usage": usage})

        return chunks()


class OfflineGroq(GroqProvider):
    """ClientAI's Groq provider, with the fake API instead of ``groq.Groq``."""

    def __init__(self, model: ScriptedModel) -> None:
        self.client = SimpleNamespace(chat=SimpleNamespace(completions=FakeGroqCompletions(model)))


class FakePrediction:
    """A Replicate prediction: its fields are what ClientAI copies as the full response."""

    def __init__(self, ident: str, model: str, request: Any, text: str, metrics: Any) -> None:
        self.id = ident
        self.model = model
        self.version = "v1"
        self.status = "starting" if metrics is None else "succeeded"
        self.input = request
        self.output = [word if i == 0 else " " + word for i, word in enumerate(text.split(" "))]
        self.logs = ""
        self.error = None
        self.metrics = metrics

    def stream(self) -> Iterator[str]:
        yield from self.output


class FakePredictions:
    """``client.predictions`` of the Replicate client; a prediction has succeeded when it is got."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model
        self.succeeded: dict[str, FakePrediction] = {}

    def create(
        self, model: str, input: dict[str, Any], stream: bool = False, **options: Any
    ) -> FakePrediction:
        messages = [{"role": "user", "content": input["prompt"]}]
        reply = self.model.answer({"model": model, "messages": messages, "stream": stream, **options})
        ident = f"pred-{next(_ids)}"
        metrics = {
            "input_token_count": reply.prompt_tokens,
            "output_token_count": reply.completion_tokens,
            "predict_time": 0.5,
        }
        self.succeeded[ident] = FakePrediction(ident, model, input, reply.text, metrics)
        return FakePrediction(ident, model, input, reply.text, None)

    def get(self, ident: str) -> FakePrediction:
        return self.succeeded[ident]


class OfflineReplicate(ReplicateProvider):
    """ClientAI's Replicate provider, with the fake API instead of ``replicate.Client``."""

    def __init__(self, model: ScriptedModel) -> None:
        self.client = SimpleNamespace(predictions=FakePredictions(model))


def offline_ollama_client(model: ScriptedModel) -> ClientAI:
    """A real ClientAI whose provider is ClientAI's Ollama provider, offline."""
    client: ClientAI = ClientAI("openai", api_key="sk-offline")  # "ollama" would need the ollama package
    client.provider = OfflineOllama(model)
    return client


def offline_groq_client(model: ScriptedModel) -> ClientAI:
    """A real ClientAI whose provider is ClientAI's Groq provider, offline."""
    client: ClientAI = ClientAI("openai", api_key="sk-offline")  # "groq" would need the groq package
    client.provider = OfflineGroq(model)
    return client


def offline_replicate_client(model: ScriptedModel) -> ClientAI:
    """A real ClientAI whose provider is ClientAI's Replicate provider, offline."""
    client: ClientAI = ClientAI("openai", api_key="sk-offline")  # "replicate" would need its package
    client.provider = OfflineReplicate(model)
    return client
