"""Usage read from the response objects of LLM SDKs that a step returns or streams.

A ``@step`` that returns an OpenAI chat completion, Responses API response,
legacy completion or embeddings response, an Anthropic message, or a
google-genai ``GenerateContentResponse``, has its
model and tokens charged without the user reporting anything; a generator
step that yields the SDK's stream chunks or events has them charged when the
stream ends, and so has a step that returns the SDK's stream, or its stream
manager (``messages.stream()``, say), for its caller to read
(``returned_stream`` knows one, ``multirun.sdk_streams`` watches it). The SDKs
are never imported: objects are recognised by the module and name of their
class (or of a base class, so ``ParsedChatCompletion`` counts), and the verdict
is cached per class, so a step that returns anything else pays two dict lookups
(a response? a stream?); google-genai's streams, plain generators, by the name
and file of the function they run.

A raw HTTP response (``with_raw_response``) is charged the response its
``parse()`` gives, at the provider its URL names (Groq's API reached through
the OpenAI SDK is Groq's).

Each call also gives its step's span the response's id and finish reasons
(``gen_ai.response.id``, ``gen_ai.response.finish_reasons``), and the server
(``server.address``, ``server.port``) that a raw response's or a returned
stream's URL names: a parsed response does not say where it came from.

Mapping the usage fields to token kinds is genai-prices' job (its
per-provider extractors know, for instance, that Anthropic's
``input_tokens`` leaves out cached input); this module only finds the usage
and the model on the object.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import replace
from types import AsyncGeneratorType, GeneratorType
from typing import Any, Literal, TypeVar

from genai_prices import data_snapshot
from pydantic import BaseModel
from wrapt import ObjectProxy

from multirun.pricing import provider_at
from multirun.telemetry import attributes as attr
from multirun.usage import TokenUsage, usable_count

_logger = logging.getLogger(__name__)

T = TypeVar("T")

# how each known class carries its usage
_FULL = "full"  # .model and .usage: one whole response
_CHAT_CHUNK = "chat_chunk"  # OpenAI stream chunk: .usage only on the last one (with include_usage)
_CHUNK_EVENT = "chunk_event"  # OpenAI chat.completions.stream() event: the chunk in .chunk
_RESPONSE_EVENT = "response_event"  # OpenAI Responses stream event: .response on "completed"
_HAS_MESSAGE = "has_message"  # Anthropic stream: .message carries the model and the usage so far
_MESSAGE_DELTA = "message_delta"  # Anthropic stream: .usage carries the running output tokens
_RAW = "raw"  # the SDK's raw HTTP response (with_raw_response): its parse() is the response
# google-genai's GenerateContentResponse: a whole response, or a stream's chunk, carrying the
# running totals of its response (its response_id)
_GEMINI = "gemini"

# the GenAI conventions' gen_ai.operation.name of a model call
CHAT, TEXT_COMPLETION, EMBEDDINGS = attr.OP_CHAT, attr.OP_TEXT_COMPLETION, attr.OP_EMBEDDINGS
GENERATE_CONTENT = attr.OP_GENERATE_CONTENT  # Gemini's, as Google's own instrumentation names it too

# (kind, provider id, genai-prices api flavor, operation)
_How = tuple[str, str, str, str]

# (class module prefix, class name) -> how
_KNOWN: dict[tuple[str, str], _How] = {
    ("openai.types", "ChatCompletion"): (_FULL, "openai", "chat", CHAT),
    # completions.create() (the legacy API, which vLLM and others still serve) and embeddings.create()
    ("openai.types", "Completion"): (_FULL, "openai", "chat", TEXT_COMPLETION),
    ("openai.types", "CreateEmbeddingResponse"): (_FULL, "openai", "chat", EMBEDDINGS),
    ("openai.types", "ChatCompletionChunk"): (_CHAT_CHUNK, "openai", "chat", CHAT),
    ("openai.lib.streaming", "ChunkEvent"): (_CHUNK_EVENT, "openai", "chat", CHAT),
    ("openai.types", "Response"): (_FULL, "openai", "responses", CHAT),
    ("openai.types", "ResponseCompletedEvent"): (_RESPONSE_EVENT, "openai", "responses", CHAT),
    # a stream cut by max_output_tokens, or failed, ends with these instead: billed all the same
    ("openai.types", "ResponseIncompleteEvent"): (_RESPONSE_EVENT, "openai", "responses", CHAT),
    ("openai.types", "ResponseFailedEvent"): (_RESPONSE_EVENT, "openai", "responses", CHAT),
    ("anthropic.types", "Message"): (_FULL, "anthropic", "default", CHAT),
    ("anthropic.types", "BetaMessage"): (_FULL, "anthropic", "default", CHAT),
    ("anthropic.types", "RawMessageStartEvent"): (_HAS_MESSAGE, "anthropic", "default", CHAT),
    ("anthropic.types", "BetaRawMessageStartEvent"): (_HAS_MESSAGE, "anthropic", "default", CHAT),
    # the SDK's MessageStream helper ends with this event, holding the whole message
    ("anthropic.lib.streaming", "MessageStopEvent"): (_HAS_MESSAGE, "anthropic", "default", CHAT),
    ("anthropic.lib.streaming", "BetaMessageStopEvent"): (_HAS_MESSAGE, "anthropic", "default", CHAT),
    ("anthropic.types", "RawMessageDeltaEvent"): (_MESSAGE_DELTA, "anthropic", "default", CHAT),
    ("anthropic.types", "BetaRawMessageDeltaEvent"): (_MESSAGE_DELTA, "anthropic", "default", CHAT),
    # with_raw_response (and with_streaming_response) results: OpenAI's LegacyAPIResponse,
    # both SDKs' APIResponse and AsyncAPIResponse
    ("openai._legacy_response", "LegacyAPIResponse"): (_RAW, "openai", "", CHAT),
    ("openai._response", "APIResponse"): (_RAW, "openai", "", CHAT),
    ("openai._response", "AsyncAPIResponse"): (_RAW, "openai", "", CHAT),
    ("anthropic._response", "APIResponse"): (_RAW, "anthropic", "", CHAT),
    ("anthropic._response", "AsyncAPIResponse"): (_RAW, "anthropic", "", CHAT),
    # generate_content(), and each chunk of generate_content_stream()
    ("google.genai.types", "GenerateContentResponse"): (_GEMINI, "google", "default", GENERATE_CONTENT),
}

# the attributes (id, model, usage) of a provider's response that are not id, model and usage
_FIELDS = {"google": ("response_id", "model_version", "usage_metadata")}
_DEFAULT_FIELDS = ("id", "model", "usage")
# genai-prices' provider ids that the GenAI conventions (gen_ai.provider.name) name otherwise
_GENAI_NAMES = {"google": "gcp.gen_ai"}

# how a step may hand its caller an SDK stream unread: the stream, read with ``for`` ("sync") or
# ``async for`` ("async"); the manager of one, entered with ``with`` ("sync manager") or ``async
# with`` ("async manager") to a helper that reads the SDK's stream; a generator ("generator") or
# an async generator ("async generator") of the SDK's (google-genai's streams); or a wrapper of a
# stream, which holds it in ``.stream``
StreamKind = Literal["sync", "async", "sync manager", "async manager", "generator", "async generator"]
_StreamKind = Literal[StreamKind, "wrapper"]
_STREAMS: dict[tuple[str, str], _StreamKind] = {
    ("openai", "Stream"): "sync",  # of chat completion chunks, or of Responses API events
    ("openai", "AsyncStream"): "async",
    ("anthropic", "Stream"): "sync",  # of raw message events (messages.create(stream=True))
    ("anthropic", "AsyncStream"): "async",
    # chat.completions.stream() and responses.stream()
    ("openai.lib.streaming", "ChatCompletionStreamManager"): "sync manager",
    ("openai.lib.streaming", "AsyncChatCompletionStreamManager"): "async manager",
    ("openai.lib.streaming", "ResponseStreamManager"): "sync manager",
    ("openai.lib.streaming", "AsyncResponseStreamManager"): "async manager",
    # messages.stream(), and beta.messages.stream()
    ("anthropic.lib.streaming", "MessageStreamManager"): "sync manager",
    ("anthropic.lib.streaming", "AsyncMessageStreamManager"): "async manager",
    ("anthropic.lib.streaming", "BetaMessageStreamManager"): "sync manager",
    ("anthropic.lib.streaming", "BetaAsyncMessageStreamManager"): "async manager",
    # openai-v2's wrappers of a chat stream, sync or async as the stream they wrap
    ("opentelemetry.instrumentation.openai_v2", "ChatStreamWrapper"): "wrapper",
    ("opentelemetry.instrumentation.openai_v2", "LegacyChatStreamWrapper"): "wrapper",
}

# google-genai's streams are plain generators (generate_content_stream(), and a chat's
# send_message_stream()), and async generators defined inside the async methods (their
# stream_generator or async_generator): known by the name and the file of the function whose
# code they run (co_name: Python 3.10 has no co_qualname)
_GEMINI_STREAMS = {
    GeneratorType: frozenset({"generate_content_stream", "send_message_stream"}),
    AsyncGeneratorType: frozenset({"stream_generator", "async_generator"}),
}
_GEMINI_FILES = tuple(f"google{sep}genai{sep}{file}.py" for sep in "/\\" for file in ("models", "chats"))

# what most steps return: never an SDK object, known without a function call
NOT_A_RESPONSE = frozenset({type(None), str, int, float, bool, bytes, list, dict, tuple})

_recognised: dict[type, _How | None] = {}
_streams: dict[type, _StreamKind | Literal["proxy", "code"] | None] = {}
# classes made at run time (a pydantic model per request, say) would pile up, each held alive
_MAX_RECOGNISED = 1024
_warned: set[tuple[str, str]] = set()


def _recognise(cls: type, known: Mapping[tuple[str, str], T]) -> T | None:
    for klass in cls.__mro__:
        module = klass.__module__
        for (prefix, name), how in known.items():
            if klass.__name__ == name and module.startswith(prefix):
                return how
    return None


def _how(value: Any) -> _How | None:
    cls = type(value)
    try:
        return _recognised[cls]
    except KeyError:
        if len(_recognised) >= _MAX_RECOGNISED:
            _recognised.clear()
        how = _recognised[cls] = _recognise(cls, _KNOWN)
        return how


def returned_stream(value: Any) -> StreamKind | None:
    """Whether ``value`` is an SDK stream, read with ``for`` ("sync") or ``async for`` ("async"),
    or the manager of one (``messages.stream()``, say), entered with ``with`` ("sync manager") or
    ``async with`` ("async manager"); None for anything else.

    A generator or an async generator is one if it runs google-genai's stream ("generator",
    "async generator"). A wrapt proxy (an instrumentation's, or this package's, of a stream a
    step inside returned) is what it wraps. Never ``value.__class__``, which a lazy object
    computes itself for.
    """
    try:
        kind = _streams[type(value)]
    except KeyError:
        kind = _stream_kind(type(value))
    if kind == "proxy" or kind == "wrapper":
        try:
            inner = value.__wrapped__ if kind == "proxy" else value.stream
        except Exception:  # a proxy not initialised (wrapt raises ValueError), say: no stream
            return None
        return returned_stream(inner)
    if kind == "code":
        return _gemini_stream(value)
    return kind


def _stream_kind(cls: type) -> _StreamKind | Literal["proxy", "code"] | None:
    """What ``returned_stream`` makes of a value of class ``cls``, cached."""
    if cls in _streams:
        return _streams[cls]
    if len(_streams) >= _MAX_RECOGNISED:
        _streams.clear()
    kind: _StreamKind | Literal["proxy", "code"] | None
    if cls in _GEMINI_STREAMS:  # a generator: its code says whose it is
        kind = "code"
    elif issubclass(cls, ObjectProxy):
        kind = "proxy"
    else:
        kind = _recognise(cls, _STREAMS)
    _streams[cls] = kind
    return kind


def _gemini_stream(generator: Any) -> StreamKind | None:
    """Whether ``generator`` (a generator or an async generator) is google-genai's stream."""
    kind: StreamKind
    if type(generator) is GeneratorType:
        code, kind = generator.gi_code, "generator"
    else:
        code, kind = generator.ag_code, "async generator"
    if code.co_name in _GEMINI_STREAMS[type(generator)] and code.co_filename.endswith(_GEMINI_FILES):
        return kind
    return None


def instrumentation_wrapper(value: Any) -> Any:
    """The SDK stream that ``value``, an instrumentation's wrapper of one (openai-v2's), holds;
    None if ``value`` is no such wrapper."""
    return value.stream if _stream_kind(type(value)) == "wrapper" else None


# what a response says of its call besides its id and usage, as span attributes: why it stopped
# (gen_ai.response.finish_reasons) and the server that answered (server.address, server.port,
# from a raw response's or a stream's URL); None if it says neither
Reply = dict[str, Any] | None

# one model call: the id of its response (None if it has none), its usage, its operation and reply
ModelCall = tuple[str | None, TokenUsage, str, Reply]


def response_call(value: Any) -> tuple[Any, ModelCall] | None:
    """The whole SDK response returned by a step (``value``, or the one its raw HTTP response
    holds, ``with_raw_response``: parsed here once) with its model call, or None for anything
    else."""
    how = _how(value)
    if how is None:
        return None
    raw = None
    if how[0] == _RAW:
        raw, value = value, _parsed(value)
        how = _how(value)
        if how is None:
            return None
    if how[0] != _FULL and how[0] != _GEMINI:
        return None
    call = _call(how, value)
    if call is None:
        return None
    return value, (call if raw is None else _billed_at(call, raw))


def _billed_at(call: ModelCall, raw: Any) -> ModelCall:
    """``call``, read from raw HTTP response ``raw``, with the server at the URL it came from
    and the provider there (``api.groq.com``: Groq, called through the OpenAI SDK); the SDK's
    provider for a URL that genai-prices does not know (a vLLM server's)."""
    call_id, usage, operation, reply = call
    try:
        url = raw.http_response.url
        server = _server(url)
        provider = provider_at(str(url.copy_with(query=None)))  # not the query: one cache entry per endpoint
    except Exception:  # an SDK version without the URL there: the SDK's provider
        _warn_once(f"raw {type(raw).__name__}", "the URL")
        return call
    reply = _with_server(reply, server)
    if provider is not None and provider != usage.provider:
        usage = replace(usage, provider=provider)
    return call_id, usage, operation, reply


def _server(url: Any) -> dict[str, Any]:
    """The ``server.address`` and ``server.port`` of an httpx URL, as openai-v2 writes them: no
    port when it is the scheme's default (httpx gives none then)."""
    found: dict[str, Any] = {}
    host, port = url.host, url.port
    if isinstance(host, str) and host:
        found[attr.SERVER_ADDRESS] = host
        if isinstance(port, int) and port > 0:
            found[attr.SERVER_PORT] = port
    return found


def _with_server(reply: Reply, server: dict[str, Any] | None) -> Reply:
    if not server:
        return reply
    return server if reply is None else {**reply, **server}


def stream_server(stream: Any) -> dict[str, Any] | None:
    """The server that SDK stream ``stream`` (or an instrumentation's wrapper, or a proxy, of
    one) reads from, as ``server.*`` attributes; None if it does not say."""
    try:
        return _server(stream.response.url) or None
    except Exception:  # another SDK version: the call has no server.address
        return None


def calls_in(value: Any) -> list[tuple[Any, ModelCall]]:
    """The SDK responses in ``value`` (itself, or one level deep in a list or tuple, as a
    step's result is charged), each with its model call."""
    if type(value) is list or type(value) is tuple:
        # a long list of plain values (most are): told in C, a fifth faster than the loop below
        if len(value) > 16 and NOT_A_RESPONSE.issuperset(map(type, value)):
            return []
        items = value
    else:
        items = (value,)
    found = []
    for item in items:
        if type(item) not in NOT_A_RESPONSE:
            response = response_call(item)
            if response is not None:
                found.append(response)
    return found


def is_raw_response(value: Any) -> bool:
    """Whether ``value`` is an SDK's raw HTTP response (``with_raw_response``)."""
    how = _how(value)
    return how is not None and how[0] == _RAW


def _parsed(raw: Any) -> Any:
    """The response an SDK's raw HTTP response holds, as its ``parse()`` gives it; None while its
    body is not read (``with_streaming_response`` before it is read, a stream), which is left
    for the program to read. The SDKs cache what ``parse()`` gives, so the program's own call
    gets this very object; and with the body read, ``parse()`` makes no I/O: the async SDKs'
    coroutine is run here to its end, which it reaches without suspending."""
    try:
        if not raw.http_response.is_closed:  # not read to its end yet
            return None
        parsed = raw.parse()
        if inspect.iscoroutine(parsed):
            try:
                parsed.send(None)
            except StopIteration as done:
                return done.value
            parsed.close()  # it would have waited: never here, with the body read
            return None
        return parsed
    except Exception:  # an SDK version that parses otherwise: no usage, never a failed step
        _warn_once(f"raw {type(raw).__name__}")
        return None


def _call(how: _How, response: Any) -> ModelCall | None:
    ident, model, usage = (getattr(response, name, None) for name in _FIELDS.get(how[1], _DEFAULT_FIELDS))
    found = _extract(how, model, usage, _tier(response))
    if found is None:
        return None
    return _response_id(ident), found, how[3], _reply(_finish_reasons(how, response))


def _reply(reasons: list[str] | None) -> Reply:
    # a tuple: span attributes are written as they are (spans.set_end_attributes), not copied
    return {attr.GEN_AI_RESPONSE_FINISH_REASONS: tuple(reasons)} if reasons else None


# Finish reasons, as each provider's OpenTelemetry instrumentation writes them, so that a
# backend sees one vocabulary whichever wrote the span: OpenAI's verbatim, "error" for a choice
# that has none (openai-v2); Anthropic's mapped to OpenAI's where they mean the same
# (opentelemetry-instrumentation-anthropic); Gemini's lowercased (Google's instrumentation).
_ANTHROPIC_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def _finish_reasons(how: _How, response: Any) -> list[str] | None:
    """Why the call of whole response ``response`` stopped, one reason a choice (candidate,
    output message); None if it does not say."""
    try:
        provider = how[1]
        if provider == "openai":
            if how[2] == "responses":
                return _responses_reasons(response)
            choices = getattr(response, "choices", None)  # an embeddings response has none
            return [_openai_reason(choice.finish_reason) for choice in choices] if choices else None
        if provider == "anthropic":
            reason = _anthropic_reason(response.stop_reason)
            return None if reason is None else [reason]
        if provider == "google":
            reasons = [_gemini_reason(c.finish_reason) for c in response.candidates or ()]
            return [reason for reason in reasons if reason is not None]
    except Exception:  # an SDK shape not known: no finish reasons, never a failed step
        _warn_once(type(response).__name__, "the finish reasons")
    return None


def _responses_reasons(response: Any) -> list[str]:
    """A Responses API response's finish reasons, as openai-v2 reads them: of each output
    message, its status ("completed" is "stop"; "failed", "cancelled" and "incomplete" as they
    are; one still in progress has none)."""
    reasons = []
    for item in response.output or ():
        if item.type == "message":
            status = item.status
            if status == "completed":
                reasons.append("stop")
            elif status in ("failed", "cancelled", "incomplete"):
                reasons.append(status)
    return reasons


def _openai_reason(reason: Any) -> str:
    return reason if isinstance(reason, str) and reason else "error"


def _anthropic_reason(reason: Any) -> str | None:
    return _ANTHROPIC_REASONS.get(reason, reason) if isinstance(reason, str) and reason else None


def _gemini_reason(reason: Any) -> str | None:
    """``STOP`` (a FinishReason, or the string of one the SDK does not know) as ``stop``."""
    name = getattr(reason, "name", reason)
    return name.lower().removeprefix("finish_reason_") if isinstance(name, str) and name else None


def _tier(response: Any) -> str | None:
    """The service tier an OpenAI response (or chunk) says it was served at, which prices it
    (``flex``, ``priority``...); None if it says none."""
    tier = getattr(response, "service_tier", None)
    return tier if isinstance(tier, str) and tier else None


def _response_id(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class _Stream:
    """The running totals of one streamed call (one id), as its latest chunk or event gave them."""

    __slots__ = ("how", "ident", "model", "reasons", "tier", "usage")

    def __init__(self, how: _How, ident: Any) -> None:
        self.how = how
        self.ident = ident
        self.model: str | None = None
        self.tier: str | None = None
        self.usage: dict[str, Any] = {}
        # its finish reasons by choice (candidate) index, as the chunks gave them (None: a choice
        # seen with none yet); or all of them, as the last event of a whole response gave them
        self.reasons: dict[int, str | None] | list[str] | None = None

    def reason(self, index: Any, reason: Any) -> None:
        """The choice at ``index`` has finish reason ``reason`` (None: it has none yet)."""
        reasons = self.reasons
        if not isinstance(reasons, dict):
            reasons = self.reasons = {}
        if type(index) is not int:  # a server that numbers no choices: it has one
            index = 0
        if not isinstance(reason, str) or not reason:
            reason = None
        if reason is not None or index not in reasons:
            reasons[index] = reason

    def finish_reasons(self) -> list[str] | None:
        reasons = self.reasons
        if not isinstance(reasons, dict):
            return reasons
        # a choice the stream never gave a reason (cut short) is "error", as openai-v2 says;
        # only OpenAI's chunks note a choice without one
        return [reasons[index] or "error" for index in sorted(reasons)]


class StreamUsage:
    """The usage of what a generator step yields: SDK stream chunks or events, or whole responses.

    Chunks and events of one stream (one call: one chunk, response or message
    id) carry running totals, so a later one replaces what an earlier one said;
    another id is another call, counted too. Whole responses are one call each.
    The finish reasons come with the last chunks or events, and ``server`` (a
    stream that a step returned, whose URL says it: see ``stream_server``) is
    every streamed call's.
    """

    def __init__(self) -> None:
        self._streams: dict[tuple[str, Any], _Stream] = {}  # by kind and id
        self._message: _Stream | None = None  # the Anthropic message that deltas belong to
        self._whole = False  # a whole response was seen
        # the streams and whole responses, as first seen: the span shows the last call's reply
        self._seen: list[_Stream | ModelCall] = []
        self.server: dict[str, Any] | None = None

    def observe(self, item: Any) -> None:
        how = _how(item)
        if how is None:
            return
        kind = how[0]
        try:
            if kind == _CHAT_CHUNK:
                stream = self._stream(how, item.id)
                stream.model = item.model or stream.model
                stream.tier = _tier(item) or stream.tier
                if item.usage is not None:
                    stream.usage = _as_dict(item.usage)
                reasons = stream.reasons
                for choice in item.choices or ():  # the usage chunk has none
                    reason = choice.finish_reason
                    if reason is not None or reasons is None or choice.index not in reasons:
                        stream.reason(choice.index, reason)
            elif kind == _CHUNK_EVENT:
                self.observe(item.chunk)
            elif kind == _RESPONSE_EVENT:
                stream = self._stream(how, item.response.id)
                stream.model = item.response.model
                stream.tier = _tier(item.response)
                stream.usage = _as_dict(item.response.usage)
                stream.reasons = _finish_reasons(how, item.response)
            elif kind == _HAS_MESSAGE:
                stream = self._message = self._stream(how, item.message.id)
                stream.model = item.message.model
                stream.usage = _as_dict(item.message.usage)
                reason = _anthropic_reason(item.message.stop_reason)  # the helper's last event has it
                if reason is not None:
                    stream.reasons = [reason]
            elif kind == _MESSAGE_DELTA:
                message = self._message
                if message is not None:
                    # running totals: later deltas replace earlier ones, field by field
                    delta = _as_dict(item.usage)
                    message.usage.update({k: v for k, v in delta.items() if v is not None})
                    reason = _anthropic_reason(item.delta.stop_reason)
                    if reason is not None:
                        message.reasons = [reason]
            elif kind == _GEMINI:
                stream = self._stream(how, item.response_id)
                if item.usage_metadata is not None:
                    stream.model = item.model_version or stream.model
                    # running totals: a later chunk's count replaces an earlier one's
                    stream.usage.update(_as_dict(item.usage_metadata, how))
                for position, candidate in enumerate(item.candidates or ()):
                    reason = _gemini_reason(candidate.finish_reason)
                    if reason is not None:  # only the last chunk of a candidate has one
                        stream.reason(position if candidate.index is None else candidate.index, reason)
            elif kind == _FULL:  # a generator that yields whole responses
                call = _call(how, item)
                if call is not None:
                    self._whole = True
                    self._seen.append(call)
        except Exception:
            _warn_once(type(item).__name__)

    def _stream(self, how: _How, ident: Any) -> _Stream:
        key = (how[0], ident)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(how, ident)
            self._seen.append(stream)
        return stream

    def has_usage(self) -> bool:
        """Whether any chunk, event or response seen carried usage."""
        return self._whole or any(stream.usage for stream in self._streams.values())

    def calls(self) -> list[ModelCall]:
        """Each model call seen, in the order first seen: each stream whose chunks carried
        usage, and each whole response."""
        found = []
        for seen in self._seen:
            if not isinstance(seen, _Stream):
                found.append(seen)
            elif seen.usage:
                streamed = _extract(seen.how, seen.model, seen.usage, seen.tier)
                if streamed is not None:
                    reply = _with_server(_reply(seen.finish_reasons()), self.server)
                    found.append((_response_id(seen.ident), streamed, seen.how[3], reply))
        return found


def _as_dict(usage: Any, how: _How | None = None) -> dict[str, Any]:
    if usage is None:
        return {}
    if isinstance(usage, dict):
        return usage
    if isinstance(usage, BaseModel):
        if how is not None and how[0] == _GEMINI:  # genai-prices reads the REST API's JSON names
            return dict(usage.model_dump(by_alias=True, exclude_none=True, mode="json", warnings=False))
        # a count the server sent as NaN, say, is no int: pydantic's serializer would warn the
        # program about a value multirun only reads
        return dict(usage.model_dump(warnings=False))
    dump = getattr(usage, "model_dump", None)
    return dict(dump()) if dump is not None else dict(vars(usage))


# the counts genai-prices requires of each provider's api flavor's usage (it refuses the whole usage
# without one); Google's usage, which needs none, has at least one of these
_REQUIRED = {
    ("openai", "chat"): ("prompt_tokens", "completion_tokens"),
    ("openai", "responses"): ("input_tokens", "output_tokens"),
    ("anthropic", "default"): ("input_tokens", "output_tokens"),
    ("google", "default"): ("promptTokenCount", "candidatesTokenCount"),
}
# where genai-prices' extractor looks for a provider's usage
_ROOTS = {"google": "usageMetadata"}


def _without_nulls(usage: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in usage.items() if v is not None}


def _usable(usage: dict[str, Any], provider_id: str, path: str = "usage") -> dict[str, Any]:
    """``usage`` with each count that is no token count as 0 (``usable_count``): genai-prices
    refuses the whole usage for one such count, and a misbehaving server's call would be charged
    nothing."""
    usable: dict[str, Any] = {}
    for key, value in usage.items():
        if isinstance(value, dict):
            value = _usable(value, provider_id, f"{path}.{key}")
        elif isinstance(value, (int, float)):  # not the strings (service_tier...) beside the counts
            value = usable_count(value, f"a response of {provider_id}", f"{path}.{key}")
        usable[key] = value
    return usable


def _extract(how: _How, model: Any, usage: Any, tier: str | None = None) -> TokenUsage | None:
    if usage is None:
        return None
    provider_id, flavor = how[1], how[2]
    try:
        # the SDKs do not validate responses: a count an OpenAI-compatible server sent as null (or
        # left out) is 0, and the counts it did send are still charged
        counts = _usable(_without_nulls(_as_dict(usage, how)), provider_id)
        required = _REQUIRED.get((provider_id, flavor), ())
        if not any(name in counts for name in required):
            return None
        counts = {name: 0 for name in required} | counts
        provider = data_snapshot.get_snapshot().find_provider(None, provider_id, None)
        _, found = provider.extract_usage({_ROOTS.get(provider_id, "usage"): counts}, api_flavor=flavor)
        return TokenUsage(
            model=model if isinstance(model, str) and model else None,
            provider=_GENAI_NAMES.get(provider_id, provider_id),
            input_tokens=int(found.input_tokens or 0),
            output_tokens=int(found.output_tokens or 0),
            cache_read_tokens=int(found.cache_read_tokens or 0),
            cache_write_tokens=int(found.cache_write_tokens or 0),
            reasoning_tokens=int(found.output_reasoning_tokens or 0),
            service_tier=tier if provider_id == "openai" else None,  # the tiers genai-prices prices
        )
    except Exception:  # an SDK shape genai-prices does not know: say so once, never fail the step
        _warn_once(f"{provider_id}/{flavor}")
        return None


def _warn_once(what: str, part: str = "the token usage") -> None:
    if (what, part) not in _warned:
        _warned.add((what, part))
        _logger.warning("multirun: could not read %s of a %s response", part, what, exc_info=True)


def is_sdk_object(value: Any) -> bool:
    """Whether ``value`` is an LLM SDK response, chunk or event whose usage this module reads."""
    return _how(value) is not None
