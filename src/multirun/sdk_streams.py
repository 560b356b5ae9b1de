"""An LLM SDK stream that a step returns, watched as its caller reads it.

As opentelemetry-instrumentation-openai-v2 ends the span of a streamed chat
call when the stream ends, a step that returns an SDK stream unread ends when
its caller has read the stream to its end, when reading it fails, or when the
caller closes it or drops it half-read; meanwhile the step is shown each chunk
or event read, and reads the usage from them. The caller gets the stream in a
proxy (wrapt's) that still is the SDK's stream: ``isinstance``, ``with`` and
``async with``, iteration, ``close()`` and every attribute are the stream's own.
google-genai's stream is a generator (an async generator, of ``client.aio``):
its proxy is one too, ``close()`` (``aclose()``) watched as the stream's is;
``send()`` and ``throw()`` (``asend()``, ``athrow()``) go to the generator
unwatched, its step ending when the proxy is closed or dropped.

A stream manager (``messages.stream()``, ``chat.completions.stream()``...) is
entered in the step's context, where the request is sent, and the SDK's stream
that its helper reads is watched the same way (see ``_Managing``).

The stream is read in the step's context, as a generator step's body runs in
it, and the caller's context is current again after each read: openai-v2's chat
span, made current when the stream was opened in the step, is detached when the
stream ends, which would otherwise make the step's context the caller's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import wrapt
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from multirun.sdk_usage import StreamKind, instrumentation_wrapper, returned_stream

_logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Proxy = wrapt.ObjectProxy[Any]
else:  # wrapt before 2.0 has no ObjectProxy[...]
    _Proxy = wrapt.ObjectProxy


class Reader(Protocol):
    """The step that returned a stream, told how its caller reads it."""

    def _stream_opened(self, stream: Any) -> None:
        """The SDK's stream ``stream`` is what the caller reads (its URL is the call's server)."""

    def _stream_item(self, item: Any) -> None:
        """The caller read ``item``."""

    def _stream_ended(self, error: BaseException | None, closed: bool) -> None:
        """The stream ended: read to its end, failed with ``error`` (raised again, or what
        the step makes of it), or closed or dropped before its end (``closed``)."""


def watched(stream: Any, kind: StreamKind, reader: Reader, ctx: Context) -> Any:
    """``stream`` (of ``kind``, as ``returned_stream`` says) as its caller reads it, in ``ctx``;
    ``reader`` told each item and the end."""
    # a manager's stream is told once it is entered; a generator has no URL to tell
    if kind == "sync" or kind == "async":
        reader._stream_opened(stream)
    return _WATCHERS[kind](stream, reader, ctx)


# The proxy's own attributes are named _self_*: wrapt keeps them on the proxy, and a method of
# another name would hide the stream's attribute of that name.
class _Watching(_Proxy):
    """What the sync and the async proxies share: the reader, told the end once, and the calls
    made in the step's context. A read (``__next__``, ``__anext__``) runs once a chunk: it is
    written out in each proxy, not put in a context manager, to cost no more than the read."""

    def __init__(self, stream: Any, reader: Reader, ctx: Context) -> None:
        super().__init__(stream)
        self._self_reader: Reader | None = reader  # None once told the end
        self._self_ctx = ctx

    def _self_item(self, item: Any) -> Any:
        reader = self._self_reader
        if reader is not None:
            reader._stream_item(item)
        return item

    def _self_end(self, error: BaseException | None = None, closed: bool = False) -> None:
        reader, self._self_reader = self._self_reader, None
        if reader is not None:
            reader._stream_ended(error, closed)

    def _self_stopped(self, error: BaseException) -> None:
        """A read raised ``error``: the stream's end (StopIteration), or its failure."""
        self._self_end(None if isinstance(error, (StopIteration, StopAsyncIteration)) else error)

    @contextmanager
    def _self_in_step(self) -> Iterator[None]:
        """The block runs in the step's context."""
        token = otel_context.attach(self._self_ctx)
        try:
            yield
        finally:
            otel_context.detach(token)

    @contextmanager
    def _self_calling(self) -> Iterator[None]:
        """The block runs in the step's context; the step fails with what it raises."""
        token = otel_context.attach(self._self_ctx)
        try:
            yield
        except BaseException as error:
            self._self_end(error)
            raise
        finally:
            otel_context.detach(token)

    def _self_dropped(self) -> None:
        """Collected half-read (or never entered): its step ends, as if the caller had closed it."""
        try:
            self._self_end(closed=True)
        except Exception:  # never out of __del__, where it would be printed as 'Exception ignored'
            _logger.warning("multirun: could not end the step of a stream dropped half-read", exc_info=True)

    def __del__(self) -> None:
        if getattr(self, "_self_reader", None) is not None:
            self._self_dropped()


class _WatchedIterator(_Watching):
    """A sync SDK stream that is an iterator only: google-genai's, a generator."""

    def __iter__(self) -> _WatchedIterator:
        return self

    def __next__(self) -> Any:
        token = otel_context.attach(self._self_ctx)
        try:
            item = next(self.__wrapped__)
        except BaseException as error:
            self._self_stopped(error)
            raise
        finally:
            otel_context.detach(token)
        return self._self_item(item)

    def close(self) -> None:
        with self._self_calling():
            self.__wrapped__.close()
        self._self_end(closed=True)

    def _self_dropped(self) -> None:
        try:
            with self._self_in_step():
                self.__wrapped__.close()  # its connection, as a generator step's ``yield from`` would
        except Exception:
            _logger.debug("multirun: closing a stream dropped half-read failed", exc_info=True)
        super()._self_dropped()


class _Watched(_WatchedIterator):
    """A sync SDK stream."""

    def __enter__(self) -> _Watched:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            with self._self_in_step():
                return self.__wrapped__.__exit__(*exc_info)
        finally:
            self._self_end(closed=True)


class _AsyncWatchedIterator(_Watching):
    """An async SDK stream, as an async iterator. Collected half-read, its async close cannot be
    awaited, nor need it be: once read from, the SDK's stream is (or reads) an async generator
    that closes its response when collected (asyncio's finaliser schedules it on the loop), as
    it does without multirun."""

    def __aiter__(self) -> _AsyncWatchedIterator:
        return self

    async def __anext__(self) -> Any:
        token = otel_context.attach(self._self_ctx)
        try:
            item = await self.__wrapped__.__anext__()
        except BaseException as error:
            self._self_stopped(error)
            raise
        finally:
            otel_context.detach(token)
        return self._self_item(item)


class _AsyncWatchedGenerator(_AsyncWatchedIterator):
    """google-genai's async stream: an async generator."""

    async def aclose(self) -> None:
        with self._self_calling():
            await self.__wrapped__.aclose()
        self._self_end(closed=True)


class _AsyncWatched(_AsyncWatchedIterator):
    """An async SDK stream."""

    async def close(self) -> None:
        with self._self_calling():
            stream = self.__wrapped__
            inner = instrumentation_wrapper(stream)
            if inner is not None:
                # openai-v2's wrapper calls its stream's async close() without awaiting it (the
                # connection stays open, and Python warns): closed here, then the wrapper is left,
                # which ends its span as its close() does
                await inner.close()
                await stream.__aexit__(None, None, None)
            else:
                await stream.close()
        self._self_end(closed=True)

    async def __aenter__(self) -> _AsyncWatched:
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            with self._self_in_step():
                return await self.__wrapped__.__aexit__(*exc_info)
        finally:
            self._self_end(closed=True)


class _Managing(_Watching):
    """What the sync and the async proxies of a stream manager share.

    Entering the manager sends the request and gives a helper (Anthropic's ``MessageStream``,
    OpenAI's ``ChatCompletionStream``...) that reads the SDK's own stream, in its
    ``_raw_stream``: that stream is watched in its place, so the step sees every event read,
    however the helper is read (iterated, ``text_stream``, ``until_done()``,
    ``get_final_message()``...). The caller gets the SDK's helper itself. Leaving the manager
    ends the step, if the stream did not end it first. Should the helper keep its stream
    elsewhere (another SDK version), the step ends when the manager is left, its usage unknown.
    """

    def __init__(self, manager: Any, reader: Reader, ctx: Context) -> None:
        super().__init__(manager, reader, ctx)
        self._self_stream: _Watching | None = None  # the helper's stream, watched once entered

    def _self_entered(self, helper: Any, kind: StreamKind) -> Any:
        """Watch the stream ``helper`` reads: the step's reader goes with it."""
        reader = self._self_reader
        if reader is None:
            return helper
        try:
            stream = helper._raw_stream
            if returned_stream(stream) != kind:
                return helper
            watching = helper._raw_stream = watched(stream, kind, reader, self._self_ctx)
        except Exception:  # an SDK of another shape: the step ends with the manager instead
            _logger.debug("multirun: could not watch the stream of %r", type(helper), exc_info=True)
            return helper
        self._self_stream, self._self_reader = watching, None
        return helper

    def _self_left(self) -> Any:
        """The stream to close as the manager is left, if the step still waits for its end
        (its connection, and openai-v2's span of it, ending too); else the step ends now."""
        stream = self._self_stream
        if stream is not None and stream._self_reader is not None:
            return stream
        self._self_end(closed=True)
        return None


class _WatchedManager(_Managing):
    """A sync stream manager (``messages.stream()``, ``chat.completions.stream()``...)."""

    def __enter__(self) -> Any:
        with self._self_calling():
            helper = self.__wrapped__.__enter__()  # the request, made in the step
        return self._self_entered(helper, "sync")

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            with self._self_in_step():
                return self.__wrapped__.__exit__(*exc_info)
        finally:
            stream = self._self_left()
            if stream is not None:
                stream.close()


class _AsyncWatchedManager(_Managing):
    """An async stream manager (``AsyncAnthropic().messages.stream()``...)."""

    async def __aenter__(self) -> Any:
        with self._self_calling():
            helper = await self.__wrapped__.__aenter__()
        return self._self_entered(helper, "async")

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            with self._self_in_step():
                return await self.__wrapped__.__aexit__(*exc_info)
        finally:
            stream = self._self_left()
            if stream is not None:
                await stream.close()


_WATCHERS: dict[StreamKind, type[_Watching]] = {
    "sync": _Watched,
    "async": _AsyncWatched,
    "sync manager": _WatchedManager,
    "async manager": _AsyncWatchedManager,
    "generator": _WatchedIterator,
    "async generator": _AsyncWatchedGenerator,
}
