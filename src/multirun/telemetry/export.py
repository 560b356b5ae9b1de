"""ExportProcessor: multirun's span export pipeline, which never blocks, throws or grows.

    from multirun.telemetry.export import ExportProcessor

    provider.add_span_processor(ExportProcessor(OTLPSpanExporter(endpoint=...)))

It is the SDK's BatchSpanProcessor (one worker thread, batches, exports with
instrumentation suppressed, a fresh worker in the child after ``os.fork``),
with connections of its own in that child (an OTLP/HTTP exporter's keep-alive
connections are the parent's: two processes wrote to one stream), plus what
the OpenTelemetry specification asks of a processor and the SDK leaves out:

- The queue is bounded (``max_queue_size``, ``OTEL_BSP_MAX_QUEUE_SIZE``,
  2048) and every span it cannot take is counted, never dropped silently:
  ``multirun.spans.dropped`` with ``error.type`` ``queue_full`` (the exporter
  is stalled or slow), ``export_failed`` (it raised or reported a failure) or
  ``shutdown`` (the span ended after shutdown). ``dropped`` holds the same
  counts per processor.
- An exporter that raises or fails costs one warning per outage (logged again
  only after an export succeeded), and a full queue one warning for the life
  of the processor, never a log line per batch or per span; the exception
  never reaches the application. The SDK's OTLP exporters log each failed
  batch and each retry: during an outage only their first line of each kind
  of failure is let through (``OutageLog``), the same for ``GuardedMetricExporter``.
- Text the OTLP encoder would refuse (a lone surrogate from an undecodable file
  name) is escaped before export, instead of costing the whole batch.
- An ``OTEL_BSP_*`` variable that is not an int >= 1 (the export timeout: >= 0) is a
  ConfigurationError naming it (the SDK raised a ValueError naming none), and a batch
  size above the queue size (which the SDK refuses) is cut to it.
- ``force_flush`` and ``shutdown`` return within their ``timeout_millis``
  even when the exporter hangs (the SDK's ignore the timeout while an export
  is stuck), at interpreter exit too. The hung export goes on in a daemon
  thread; a shutdown that times out logs how many spans were not delivered.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final, NamedTuple

from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_EXPORT_TIMEOUT,
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_BSP_SCHEDULE_DELAY,
)
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from multirun._process import env_int, reinit_after_fork
from multirun.errors import ConfigurationError
from multirun.telemetry.local_files import LocalFileSpanExporter
from multirun.telemetry.utf8_spans import utf8_safe_span

_logger = logging.getLogger(__name__)

DROPPED_SPANS: Final = "multirun.spans.dropped"
QUEUE_FULL: Final = "queue_full"
EXPORT_FAILED: Final = "export_failed"
AFTER_SHUTDOWN: Final = "shutdown"
_ERROR_TYPE: Final = "error.type"
DEFAULT_MAX_QUEUE_SIZE: Final = 2048
DEFAULT_SCHEDULE_DELAY_MILLIS: Final = 5000
DEFAULT_MAX_EXPORT_BATCH_SIZE: Final = 512
DEFAULT_TIMEOUT_MILLIS: Final = 30_000


class BatchSettings(NamedTuple):
    """The settings of the batch processor, as the ``OTEL_BSP_*`` variables give them."""

    max_queue_size: int
    schedule_delay_millis: int
    max_export_batch_size: int
    export_timeout_millis: int


def batch_settings(*, refuse: bool = True) -> BatchSettings:
    """The ``OTEL_BSP_*`` variables: one that is not an int >= 1 (the export timeout: >= 0) is a
    ConfigurationError naming it (the SDK's batch processor would raise a ValueError that names
    none), or with ``refuse=False`` a warning, and its default."""
    return BatchSettings(
        env_int(OTEL_BSP_MAX_QUEUE_SIZE, DEFAULT_MAX_QUEUE_SIZE, minimum=1, refuse=refuse),
        env_int(OTEL_BSP_SCHEDULE_DELAY, DEFAULT_SCHEDULE_DELAY_MILLIS, minimum=1, refuse=refuse),
        env_int(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, DEFAULT_MAX_EXPORT_BATCH_SIZE, minimum=1, refuse=refuse),
        env_int(OTEL_BSP_EXPORT_TIMEOUT, DEFAULT_TIMEOUT_MILLIS, minimum=0, refuse=refuse),
    )


# The loggers the SDK's OTLP exporters log each failed export and each retry to.
_OTLP_EXPORT_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)
_exporting = threading.local()  # .outage: the OutageLog of the export this thread runs, if any
EXPORT_FAILURE: Final = {"multirun_export_failure": True}
"""The ``extra`` of multirun's warning that an exporter failed (a command that sums the failure
up in a line of its own filters on it)."""


class OutageLog:
    """The log of one pipeline's exporter outages: one line from the exporter per kind of
    failure per outage.

    While ``exporting()``, the first warning the SDK's OTLP exporters log of each kind of failure
    (``_failure_kind``) is let through and the next of that kind are dropped until
    ``succeeded()``: a collector that is down cost a line for each batch and each retry,
    thousands an hour, and one that then refuses the credentials or the batch size says so.
    """

    def __init__(self) -> None:
        self.logged: set[object] = set()  # the kinds of failure of this outage the exporter logged

    def exporting(self) -> _Exporting:
        return _Exporting(self)

    def succeeded(self) -> None:
        self.logged = set()


class _Exporting:
    """``with outage.exporting():`` the exporter's log lines in this thread go through ``outage``."""

    def __init__(self, outage: OutageLog) -> None:
        self._outage = outage

    def __enter__(self) -> None:
        self._previous = getattr(_exporting, "outage", None)
        _exporting.outage = self._outage

    def __exit__(self, *_exc: object) -> None:
        _exporting.outage = self._previous


_RETRIED: Final = "retried"  # the HTTP exporters retried (unreachable or busy), then gave up
_FOLLOW_UP: Final = "Shutdown in progress"  # the end of a retried failure, logged already


def _failure_kind(record: logging.LogRecord) -> object:
    """What failed, as an OTLP exporter's log line says it: the HTTP status or gRPC code it was
    refused with (a retried gRPC code and its giving up are one kind), or the error that kept an
    HTTP export from getting an answer; the HTTP exporters' retries and their giving up, one kind
    whatever the reason; else the message's template."""
    template = record.msg if isinstance(record.msg, str) else repr(record.msg)
    args = record.args if isinstance(record.args, tuple) else ()
    grpc = record.name.endswith(".grpc.exporter")
    if template.startswith("Transient error"):
        return ("code", args[0]) if grpc and args else _RETRIED
    if template.startswith("Failed to export %s batch code: %s") and len(args) > 2:
        if args[1] is not None:
            return ("code", args[1])
        if isinstance(args[2], ValueError) and "timeout" in str(args[2]):
            # woken after its deadline (a loaded machine), the exporter sent with a timeout of 0
            return _RETRIED
        return ("error", type(args[2]).__name__)  # no answer: what kept it from sending
    if template.startswith("Failed to export %s to %s, error code: %s") and len(args) > 2:
        return ("code", args[2])
    if template.startswith("Failed to export %s batch due to timeout"):
        return _RETRIED
    return template


class _OncePerOutage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        outage: OutageLog | None = getattr(_exporting, "outage", None)
        if outage is None or record.levelno < logging.WARNING:
            return True  # not in one of multirun's exports
        if isinstance(record.msg, str) and record.msg.startswith(_FOLLOW_UP) and outage.logged:
            return False
        kind = _failure_kind(record)
        if kind in outage.logged:
            return False
        outage.logged.add(kind)
        return True


_ONCE_PER_OUTAGE: Final = _OncePerOutage()
for _name in _OTLP_EXPORT_LOGGERS:
    logging.getLogger(_name).addFilter(_ONCE_PER_OUTAGE)


class DropCounts:
    """Spans dropped, by reason; thread-safe. ``DROPPED`` holds the process's totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + count

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        """The callback of the ``multirun.spans.dropped`` observable counter (zeros included,
        so that a rate is defined before the first drop)."""
        counts = dict.fromkeys((QUEUE_FULL, EXPORT_FAILED, AFTER_SHUTDOWN), 0) | self.snapshot()
        return [Observation(n, {_ERROR_TYPE: reason}) for reason, n in counts.items()]

    def clear(self) -> None:
        with self._lock:
            self._counts = {}

    def _at_fork_reinit(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it when the process forked


DROPPED: Final = DropCounts()
"""What every ExportProcessor of this process dropped, for the ``multirun.spans.dropped`` metric."""


class ExportProcessor(SpanProcessor):
    """Batches ended spans to ``exporter``; counts what it drops; bounded flush and shutdown."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        settings: BatchSettings | None = None,
    ) -> None:
        """``settings``: the batch settings to use instead of the ``OTEL_BSP_*`` variables (as
        ``init`` read them); an argument given here wins over both."""
        env = settings or batch_settings()
        if max_queue_size is None:
            max_queue_size = env.max_queue_size
        if isinstance(max_queue_size, bool) or not isinstance(max_queue_size, int) or max_queue_size < 1:
            raise ConfigurationError(f"max_queue_size must be an int >= 1, got {max_queue_size!r}")
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.dropped = DropCounts()
        self._lock = threading.Lock()
        self._queued = 0  # spans handed to the batch processor that its worker has not taken yet
        self._exporting = 0  # spans the worker took and is exporting
        self._shutdown = False
        self._warned: set[str] = set()
        self._waiter: tuple[threading.Thread, threading.Event] | None = None
        if schedule_delay_millis is None:
            schedule_delay_millis = env.schedule_delay_millis
        if max_export_batch_size is None:
            max_export_batch_size = env.max_export_batch_size
        # a batch larger than the queue, which the SDK refuses, is a batch of the whole queue
        max_export_batch_size = min(max_export_batch_size, max_queue_size)
        self.outage = OutageLog()
        self._guard = _GuardedExporter(exporter, self)
        self._batch = BatchSpanProcessor(
            self._guard,
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_millis,
            max_export_batch_size=max_export_batch_size,
            export_timeout_millis=env.export_timeout_millis,  # so the SDK does not read it again
        )
        self._start_shutdown_thread()
        reinit_after_fork(self._at_fork_reinit)

    def _start_shutdown_thread(self) -> None:
        """Start the thread that will shut the batch processor down when ``shutdown`` asks.

        Started now, not by ``shutdown``: at interpreter exit Python 3.12.0 and 3.12.1 refuse
        to start a thread, and ``shutdown`` must still return within its timeout.
        """
        self._shutdown_asked = threading.Event()
        self._shutdown_done = threading.Event()
        threading.Thread(target=self._shutdown_when_asked, name="multirun-span-shutdown", daemon=True).start()

    def _shutdown_when_asked(self) -> None:
        self._shutdown_asked.wait()
        try:
            self._batch.shutdown()  # type: ignore[no-untyped-call]  # unannotated in the SDK
        except Exception:
            _logger.warning("multirun: shutting down the span export failed", exc_info=True)
        finally:
            self._shutdown_done.set()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return  # the batch processor would not export it either
        if self._shutdown:
            self._drop(AFTER_SHUTDOWN, 1)
            return
        with self._lock:
            full = self._queued >= self.max_queue_size
            if not full:
                self._queued += 1
        if full:
            self._drop(QUEUE_FULL, 1)
            self._warn_once(
                QUEUE_FULL,
                "multirun: the span export queue is full (%d spans): %s is not keeping up, so spans "
                "are dropped and counted in %s",
                self.max_queue_size,
                type(self.exporter).__name__,
                DROPPED_SPANS,
            )
            return
        self._batch.on_end(span)

    def force_flush(self, timeout_millis: int = DEFAULT_TIMEOUT_MILLIS) -> bool:
        """Export what is queued; False if that did not finish within ``timeout_millis``."""
        if self._shutdown:
            return False
        return self._bounded(self._batch.force_flush, timeout_millis)

    def shutdown(self, timeout_millis: int = DEFAULT_TIMEOUT_MILLIS) -> None:
        """Export what is queued and shut the exporter down, waiting ``timeout_millis`` at most;
        past it, log how many spans were not delivered."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        self._shutdown_asked.set()
        if self._shutdown_done.wait(max(timeout_millis, 0) / 1000):
            return
        with self._lock:
            lost = self._queued + self._exporting
        _logger.warning(
            "multirun: %d span(s) were not delivered: %s did not finish exporting them within the "
            "%.1f s shutdown timeout",
            lost,
            type(self.exporter).__name__,
            timeout_millis / 1000,
        )

    def take_over_from(self, old: ExportProcessor) -> None:
        """Go on with the exporter of ``old``, a pipeline being replaced by this one: the two
        take turns to export (an exporter is never called concurrently), and shutting ``old``
        down leaves the exporter open. Call before this pipeline is given a span."""
        if old.exporter is not self.exporter:
            raise ValueError("take_over_from: the two pipelines have different exporters")
        old._guard.keep_open = True
        self._guard.export_lock = old._guard.export_lock

    # -- for the guarded exporter ------------------------------------------------

    def _taken(self, count: int) -> None:
        """The worker took ``count`` spans off the queue to export them."""
        with self._lock:
            self._queued = max(self._queued - count, 0)
            self._exporting += count

    def _exported(self, count: int) -> None:
        """The export of ``count`` spans the worker took is over, delivered or not."""
        with self._lock:
            self._exporting = max(self._exporting - count, 0)

    def _export_failed(self, count: int, error: BaseException | None) -> None:
        self._drop(EXPORT_FAILED, count)
        self._warn_once(
            EXPORT_FAILED,
            "multirun: the span exporter %s failed (%s); its spans are dropped and counted in %s. "
            "Not logged again until an export succeeds.",
            type(self.exporter).__name__,
            "see its log line" if error is None else f"{type(error).__name__}: {error}",
            DROPPED_SPANS,
        )

    def _export_succeeded(self) -> None:
        self.outage.succeeded()
        if EXPORT_FAILED in self._warned:  # the outage is over: warn about the next one
            self._warned.discard(EXPORT_FAILED)

    # -- helpers -----------------------------------------------------------------

    def _drop(self, reason: str, count: int) -> None:
        self.dropped.add(reason, count)
        DROPPED.add(reason, count)

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        _logger.warning(message, *args, extra=EXPORT_FAILURE if kind == EXPORT_FAILED else None)

    def _bounded(self, action: Callable[[], object], timeout_millis: float) -> bool:
        """Run ``action`` in a daemon thread and wait for it at most ``timeout_millis``.

        While an earlier flush is still stuck (a hung exporter) wait for that one
        instead of starting another: at most one flush thread is ever blocked.
        True if the action finished in time.
        """
        run_here = None
        with self._lock:
            waiter = self._waiter
            if waiter is None or waiter[1].is_set():
                done = threading.Event()

                def target() -> None:
                    try:
                        action()
                    except Exception:
                        _logger.warning("multirun: flushing the span exporter failed", exc_info=True)
                    finally:
                        done.set()

                thread = threading.Thread(target=target, name="multirun-span-export", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # at interpreter exit no thread can start: run it here
                    run_here = target
                else:
                    waiter = self._waiter = (thread, done)
        if run_here is not None:
            # outside the lock: the export it runs calls back into _taken, which takes the lock
            run_here()
            return True
        assert waiter is not None
        return waiter[1].wait(max(timeout_millis, 0) / 1000)

    def _at_fork_reinit(self) -> None:
        # the child's batch processor starts with an empty queue and a worker of its own
        self._lock = threading.Lock()
        if not self._guard.export_lock.locked():  # else an export was running: leave its session
            drop_inherited_connections(self.exporter)
        self._guard.export_lock = threading.Lock()
        self._queued = 0
        self._exporting = 0
        self._waiter = None
        if not self._shutdown:
            self._start_shutdown_thread()


class _GuardedExporter(SpanExporter):
    """The exporter as the batch worker sees it: never raises, reports what it takes and drops."""

    def __init__(self, exporter: SpanExporter, processor: ExportProcessor) -> None:
        self._exporter = exporter
        self._processor = processor
        self.export_lock = threading.Lock()  # shared with the pipeline that takes this one's exporter over
        self.keep_open = False  # True: another pipeline goes on with the exporter, shutdown leaves it open
        # the local files' exporter escapes what UTF-8 cannot hold itself, only in the rare
        # batch that has some: checking every span first cost it a fifth of its time
        self._utf8_first = not isinstance(exporter, LocalFileSpanExporter)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        processor = self._processor
        processor._taken(len(spans))
        try:
            if self._utf8_first:
                spans = [utf8_safe_span(span) for span in spans]
            # the exporter's own HTTP calls are not traced, its log lines are one per outage
            with self.export_lock, suppress_instrumentation(), processor.outage.exporting():
                result = self._exporter.export(spans)
        except Exception as exc:
            processor._export_failed(len(spans), exc)
            return SpanExportResult.FAILURE
        finally:
            processor._exported(len(spans))
        if result is SpanExportResult.SUCCESS:
            processor._export_succeeded()
        else:
            processor._export_failed(len(spans), None)  # the exporter logged its reason
        return result

    def shutdown(self) -> None:
        if self.keep_open:
            return
        try:
            self._exporter.shutdown()
        except Exception:
            _logger.warning("multirun: shutting down %s failed", type(self._exporter).__name__, exc_info=True)

    def force_flush(self, timeout_millis: int = DEFAULT_TIMEOUT_MILLIS) -> bool:
        try:
            return self._exporter.force_flush(timeout_millis)
        except Exception:
            return False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=DROPPED._at_fork_reinit)


def drop_inherited_connections(exporter: object) -> None:
    """In a forked child: close the child's copies of the keep-alive connections of the OTLP/HTTP
    ``exporter``'s requests session, so that the child connects anew instead of writing to the
    parent's TCP stream. Closing a copy closes the child's file descriptor only: the parent's
    connection stays open. Never raises.

    Call it only if no export was running at the fork: that one's connection was out of the pool
    (the child cannot reuse it), and the thread the child lost may hold the pool's locks.
    """
    requests = sys.modules.get("requests")
    if requests is None:
        return  # no session was made
    try:
        for each in getattr(exporter, "exporters", (exporter,)):  # SpanExporters: each of them
            # the session: on the exporter up to 1.44, on its client's transport from 1.45
            transport = getattr(getattr(each, "_client", None), "_transport", None)
            for session in (getattr(each, "_session", None), getattr(transport, "_session", None)):
                if isinstance(session, requests.Session):
                    session.close()
    except Exception:
        _logger.warning("multirun: closing the connections a forked process inherited failed", exc_info=True)


class GuardedMetricExporter(MetricExporter):
    """A metric exporter as multirun's periodic reader sees it: an export that raises or fails
    costs one warning per outage, and the SDK's OTLP exporters one line of their own (the
    reader logged a traceback, the OTLP exporters a line per export and per retry)."""

    def __init__(self, exporter: MetricExporter) -> None:
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self.exporter = exporter
        self.outage = OutageLog()
        self._warned = False
        self._export_lock = threading.Lock()  # held while exporting: tells a forked child
        reinit_after_fork(self._at_fork_reinit)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
    ) -> MetricExportResult:
        reason = "see its log line"
        try:
            with self._export_lock, self.outage.exporting():
                result = self.exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            result, reason = MetricExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        if result is MetricExportResult.SUCCESS:
            self.outage.succeeded()
            self._warned = False
        elif not self._warned:
            self._warned = True
            _logger.warning(
                "multirun: the metric exporter %s failed (%s); metrics are not delivered until it "
                "recovers. Not logged again until an export succeeds.",
                type(self.exporter).__name__,
                reason,
                extra=EXPORT_FAILURE,
            )
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        try:
            return self.exporter.force_flush(timeout_millis=timeout_millis)
        except Exception:
            return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        try:
            with self.outage.exporting():
                self.exporter.shutdown(timeout_millis=timeout_millis, **kwargs)
        except Exception:
            _logger.warning("multirun: shutting down %s failed", type(self.exporter).__name__, exc_info=True)

    def _at_fork_reinit(self) -> None:
        if not self._export_lock.locked():  # else an export was running: leave its session
            drop_inherited_connections(self.exporter)
        self._export_lock = threading.Lock()


class SpanExporters(SpanExporter):
    """Several exporters as one (``OTEL_TRACES_EXPORTER=otlp,console``): each gets every batch.

    One that raises costs the others nothing; its error is raised after they ran, for the
    export pipeline to report.
    """

    def __init__(self, exporters: Sequence[SpanExporter]) -> None:
        self.exporters = tuple(exporters)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._each(lambda exporter: exporter.export(spans) is SpanExportResult.SUCCESS)

    def shutdown(self) -> None:
        self._each(_shut_down)

    def force_flush(self, timeout_millis: int = DEFAULT_TIMEOUT_MILLIS) -> bool:
        return self._each(lambda exporter: exporter.force_flush(timeout_millis)) is SpanExportResult.SUCCESS

    def _each(self, call: Callable[[SpanExporter], bool]) -> SpanExportResult:
        done, error = True, None
        for exporter in self.exporters:
            try:
                done = bool(call(exporter)) and done
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return SpanExportResult.SUCCESS if done else SpanExportResult.FAILURE


def _shut_down(exporter: SpanExporter) -> bool:
    exporter.shutdown()
    return True
