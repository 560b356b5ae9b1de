"""Span processors of the application that raise cannot break a run.

The SDK calls a provider's span processors one after the other, unguarded, as a span of
multirun's starts and ends: a processor of the application (``provider.add_span_processor``)
that raised in ``on_start`` or ``on_end`` raised into the decorated function's call, and the
processors after it (the exporter, say) never saw the span. ``guard_span_processors`` has the
multirun tracer call each processor on its own: one that raises costs one warning, the span
goes on to the others and the step goes on. Only multirun's spans: the application's own
spans and those of other instrumentations are its business.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, SynchronousMultiSpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

from multirun.telemetry.proxies import sdk_tracer

_logger = logging.getLogger(__name__)

# hooks that do nothing (the SDK's export processors start and end-ing spans with ``pass``): not
# called, as a call is about a tenth of a microsecond and every step of multirun's makes two
_DOING_NOTHING = {
    hook: {getattr(cls, hook) for cls in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)}
    for hook in ("on_start", "_on_ending")
}


def _does_something(processor: SpanProcessor, hook: str) -> bool:
    method = getattr(processor, hook, None)
    return getattr(method, "__func__", None) not in _DOING_NOTHING[hook]


_Calls = tuple[tuple[SpanProcessor, ...], tuple[SpanProcessor, ...], tuple[SpanProcessor, ...]]


class GuardedSpanProcessor(SpanProcessor):
    """The provider's span processors, each called on its own: an exception is caught and
    warned about once per processor, the others are called all the same."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner
        self._warned: set[int] = set()  # id() of the processors warned about
        self._lock = threading.Lock()
        # the provider's processors are read at each span (the tuple is replaced as processors
        # are added); one running them concurrently (ConcurrentMultiSpanProcessor) is kept whole
        self._multi = type(inner) is SynchronousMultiSpanProcessor
        self._whole = (inner,)
        # (the processors last read, those of them called at start, as the span ends, at its end):
        # a processor that ignores multirun's spans (``ignores_multirun_spans``, the
        # UsageSpanProcessor) is not called for them, nor a hook that does nothing
        self._called: tuple[tuple[SpanProcessor, ...], _Calls] = ((), ((), (), ()))

    def _calls(self, processors: tuple[SpanProcessor, ...]) -> _Calls:
        """The processors of ``processors`` to call at each hook, remembered until they change."""
        called = [p for p in processors if not getattr(p, "ignores_multirun_spans", False)]
        calls = (
            tuple(p for p in called if _does_something(p, "on_start")),
            tuple(p for p in called if _does_something(p, "_on_ending")),
            tuple(called),
        )
        self._called = (processors, calls)  # one assignment: read whole without a lock
        return calls

    # each hook reads the processors inline, not through a method: they run three times per span

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        processors = self.inner._span_processors if self._multi else self._whole  # type: ignore[attr-defined]
        read, calls = self._called
        if processors is not read:
            calls = self._calls(processors)
        for processor in calls[0]:
            try:
                processor.on_start(span, parent_context=parent_context)
            except Exception as error:
                self._failed(processor, "on_start", error)

    def _on_ending(self, span: Span) -> None:
        processors = self.inner._span_processors if self._multi else self._whole  # type: ignore[attr-defined]
        read, calls = self._called
        if processors is not read:
            calls = self._calls(processors)
        for processor in calls[1]:
            try:
                processor._on_ending(span)
            except Exception as error:
                self._failed(processor, "_on_ending", error)

    def on_end(self, span: ReadableSpan) -> None:
        processors = self.inner._span_processors if self._multi else self._whole  # type: ignore[attr-defined]
        read, calls = self._called
        if processors is not read:
            calls = self._calls(processors)
        for processor in calls[2]:
            try:
                processor.on_end(span)
            except Exception as error:
                self._failed(processor, "on_end", error)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def _failed(self, processor: SpanProcessor, hook: str, error: Exception) -> None:
        with self._lock:
            if id(processor) in self._warned:
                return
            self._warned.add(id(processor))
        _logger.warning(
            "multirun: span processor %r raised in %s; multirun's spans go on without it "
            "(warned once per processor)",
            processor,
            hook,
            exc_info=error,
        )


def guard_span_processors(tracer: Any) -> None:
    """Have ``tracer`` (multirun's) call its provider's span processors each on its own.

    Only an SDK tracer has them (behind Logfire's proxy tracer: the SDK tracer it wraps); its
    span processor is replaced once (a provider hands out one tracer per name, which several
    clients may share).
    """
    tracer = sdk_tracer(tracer)
    if tracer is None:
        return
    current = getattr(tracer, "span_processor", None)
    if isinstance(current, SpanProcessor) and not isinstance(current, GuardedSpanProcessor):
        tracer.span_processor = GuardedSpanProcessor(current)
