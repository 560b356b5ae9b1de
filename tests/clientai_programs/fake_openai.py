"""An offline model for ClientAI: its own OpenAI provider, talking to a scripted fake of the OpenAI API.

``offline_client(model)`` is a real ``clientai.ClientAI("openai", ...)`` whose
provider is ClientAI's OpenAI provider with one change: its SDK client is
:class:`FakeOpenAI` instead of ``openai.OpenAI``. So every line of ClientAI
runs (the provider's request building, text extraction, streaming and error
mapping included) and the fake only plays the model: ``chat.completions.create``
answers with real ``openai`` ``ChatCompletion`` objects, or a stream of
``ChatCompletionChunk`` objects ending with a usage chunk when
``stream_options={"include_usage": True}`` was asked for, as the OpenAI API does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from clientai import ClientAI
from clientai.openai.provider import Provider
from openai.types.chat import ChatCompletion, ChatCompletionChunk


@dataclass
class Reply:
    """One answer of the model, with the tokens the API reports for it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class APIFailure(Exception):
    """What the HTTP client would raise; ClientAI maps it by the ``Error code: NNN`` in its message."""


@dataclass
class ScriptedModel:
    """Answers a prompt by the first marker it contains; each marker has a queue of outcomes.

    An outcome is a Reply, or an exception to raise; the last outcome of a
    queue repeats. ``calls`` keeps every request (the create() keyword arguments).
    """

    script: dict[str, list[Reply | Exception]]
    calls: list[dict[str, Any]] = field(default_factory=list)
    _served: dict[str, int] = field(default_factory=dict)

    def answer(self, request: dict[str, Any]) -> Reply:
        self.calls.append(request)
        prompt = " ".join(str(m.get("content", "")) for m in request["messages"])
        for marker, outcomes in self.script.items():
            if marker in prompt:
                index = self._served.get(marker, 0)
                self._served[marker] = index + 1
                outcome = outcomes[min(index, len(outcomes) - 1)]
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
        raise APIFailure(f"Error code: 400 - no scripted answer for {prompt[:60]!r}")

    def prompts(self) -> list[str]:
        """The last message of every request, in order."""
        return [str(call["messages"][-1]["content"]) for call in self.calls]


_ids = itertools.count(1)


class FakeCompletions:
    """``client.chat.completions`` of the OpenAI SDK."""

    def __init__(self, model: ScriptedModel) -> None:
        self.model = model

    def create(self, **request: Any) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        reply = self.model.answer(request)
        usage: dict[str, Any] = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }
        if reply.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
        name = request["model"]
        ident = f"chatcmpl-{next(_ids)}"
        if request.get("stream"):
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return _chunks(ident, name, reply.text, usage if include_usage else None)
        return ChatCompletion.model_validate(
            {
                "id": ident,
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )


def _chunks(ident: str, model: str, text: str, usage: dict[str, Any] | None) -> Iterator[ChatCompletionChunk]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> ChatCompletionChunk:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        return ChatCompletionChunk.model_validate(
            {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": choices,
                **extra,
            }
        )

    yield chunk({"role": "assistant", "content": ""})
    words = text.split(" ")
    for i, word in enumerate(words):
        yield chunk({"content": word if i == 0 else " " + word})
    yield chunk({}, "stop")
    if usage is not None:
        yield chunk(None, usage=usage)  # type: ignore[arg-type]


class FakeOpenAI:
    """The part of ``openai.OpenAI`` that ClientAI's provider uses: ``chat.completions.create``."""

    def __init__(self, model: ScriptedModel) -> None:
        self.chat = SimpleNamespace(completions=FakeCompletions(model))


class OfflineProvider(Provider):
    """ClientAI's OpenAI provider, with the fake API instead of the HTTP client."""

    def __init__(self, model: ScriptedModel) -> None:
        self.client = FakeOpenAI(model)


def offline_client(model: ScriptedModel) -> ClientAI:
    """A real ClientAI for the ``openai`` provider that never leaves the process."""
    client: ClientAI = ClientAI("openai", api_key="sk-offline")
    client.provider = OfflineProvider(model)
    return client
