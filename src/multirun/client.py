"""MultiRunClient and ``init``: the tracer, price book, checkpoint store and settings of runs.

``multirun.init()`` configures once for the process. It never replaces a
TracerProvider the application already set (its own, Logfire's, Traceloop's):
it adds its span processor to it. With no provider set, it creates one that
exports over OTLP when an endpoint is configured (argument or the standard
``OTEL_EXPORTER_OTLP_*`` variables; over HTTP, or gRPC when ``protocol`` or
``OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)PROTOCOL`` says so) and otherwise writes OTLP JSON files under
``./.multirun/`` (the embedded default), unless ``OTEL_TRACES_EXPORTER`` names its span
exporters. It creates a MeterProvider, with none set, for an endpoint or the metric exporters
``OTEL_METRICS_EXPORTER`` names. ``@run`` calls ``init()`` itself if nobody did.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import wrapt
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.util.re import parse_env_headers

from multirun._keys import RUN_KEY
from multirun._process import env_int, is_count, refuse_or_warn
from multirun.checkpoints.envelope import MAX_BYTES_ENV
from multirun.checkpoints.exporters import BlobExporter, FileBlobExporter, exporter_from_uri
from multirun.checkpoints.replay import DEFAULT_LIMIT as DEFAULT_REPLAY_LIMIT
from multirun.checkpoints.serializers import get_serializer, resolve_hmac_key
from multirun.checkpoints.store import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_PUT_TIMEOUT,
    MAX_PUT_TIMEOUT,
    CheckpointStore,
)
from multirun.clock import Clock
from multirun.enforcement.ledger import Ledger, RunLedger
from multirun.enforcement.policy import PolicyState
from multirun.enforcement.processor import TRACER_NAME, UsageSpanProcessor
from multirun.enforcement.sampling import keep_own_spans_as_sampled, record_model_calls_in_runs
from multirun.errors import ConfigurationError
from multirun.models.budget import Budget
from multirun.pricing import Price, PriceBook, cost_units_of
from multirun.telemetry.export import (
    DEFAULT_TIMEOUT_MILLIS,
    DROPPED,
    BatchSettings,
    ExportProcessor,
    GuardedMetricExporter,
    SpanExporters,
    batch_settings,
)
from multirun.telemetry.guard import guard_span_processors
from multirun.telemetry.local_files import LocalFileSpanExporter
from multirun.telemetry.metrics import NO_METRICS, Metrics, forget_counts
from multirun.telemetry.proxies import sdk_provider
from multirun.usage import TokenUsage

if TYPE_CHECKING:
    from multirun.enforcement.redis_ledger import RedisLedgerFactory

_logger = logging.getLogger(__name__)

DEFAULT_DIR = ".multirun"
DEFAULT_CONTENT_LIMIT = 4096
DEFAULT_STEP_HISTORY = 100
_CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
# the content modes of opentelemetry-util-genai, which the GenAI instrumentations read from the
# same variable: multirun records content on spans
_CAPTURE_MODES = {"no_content": False, "span_only": True, "event_only": False, "span_and_event": True}
_capture_values_warned: set[str] = set()
_VERSION = "0.1.0"


class MultiRunClient:
    """Owns what every run needs: tracer, prices, checkpoint store, clock and settings."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        capture_content: bool | None = None,
        content_limit: int | None = None,
        checkpoint_store: CheckpointStore | BlobExporter | str | None = None,
        prices: PriceBook | Mapping[str, Price | Mapping[str, float]] | None = None,
        step_history: int = DEFAULT_STEP_HISTORY,
        record_replay: bool = True,
        replay_limit: int = DEFAULT_REPLAY_LIMIT,
        clock: Clock | None = None,
        propagate_threads: bool = True,
        meter_provider: otel_metrics.MeterProvider | None = None,
        metrics: bool = True,
        ledger_uri: str | None = None,
        unpriced: str | None = None,
    ) -> None:
        capture_content, content_limit = _validate_options(
            capture_content=capture_content,
            content_limit=content_limit,
            step_history=step_history,
            record_replay=record_replay,
            ledger_uri=ledger_uri or None,  # refused by name: the argument, else the variable
        )
        self.unpriced = _unpriced_mode(unpriced)
        self.fail_unpriced = self.unpriced == "fail"
        self.tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = self.tracer_provider.get_tracer(TRACER_NAME, _VERSION)
        # the SDK provider multirun's processors, sampler wrapper and guard are on (behind a proxy,
        # Logfire's, the one it holds now): see ensure_installed
        self._installed_on = sdk_provider(self.tracer_provider)
        guard_span_processors(self.tracer)
        self.capture_content = capture_content
        self.content_limit = content_limit
        self.step_history = step_history
        self.record_replay = record_replay
        if isinstance(replay_limit, bool) or not isinstance(replay_limit, int) or replay_limit < 0:
            raise ConfigurationError(f"replay_limit must be an int >= 0, got {replay_limit!r}")
        self.replay_limit = replay_limit
        self.clock = clock or Clock()
        self.prices = prices if isinstance(prices, PriceBook) else PriceBook(prices)
        self.policy_state = PolicyState()
        self.ledger_uri = ledger_uri or os.environ.get("MULTIRUN_LEDGER_URI") or None
        self._ledgers: RedisLedgerFactory | None = None
        if self.ledger_uri is not None:
            from multirun.enforcement.redis_ledger import RedisLedgerFactory

            # The ledgers' clock is this bound method: a ledger with unsent usage (which the
            # factory's client state keeps) keeps this client, and so the factory, alive until
            # the usage is sent, at exit at the latest (_open_ledgers holds factories weakly).
            self._ledgers = RedisLedgerFactory.from_uri(self.ledger_uri, clock=self._monotonic)
            _close_at_exit(self._ledgers)
        if not isinstance(metrics, bool):
            raise ConfigurationError(f"metrics must be True or False, got {metrics!r}")
        self.metrics: Metrics = NO_METRICS
        if metrics:
            provider = meter_provider or otel_metrics.get_meter_provider()
            self.metrics = Metrics(provider.get_meter(TRACER_NAME, _VERSION))
        self.checkpoints = _checkpoint_store(checkpoint_store)
        self.usage_processor = _install_usage_processor(self.tracer_provider)
        keep_own_spans_as_sampled(self.tracer)
        _warn_small_span_limits(self.tracer_provider)
        if propagate_threads:
            _propagate_context_to_threads()

    def _monotonic(self) -> float:
        return self.clock.monotonic()

    def ensure_installed(self) -> None:
        """Install again on the SDK provider behind the proxy (Logfire's) if it was swapped for a
        new one (``logfire.configure`` called again) since: else budgets stopped seeing other
        instrumentations' usage, ``init``'s exporter its spans, and the guard its processors.
        Called as each run starts: one look at the proxy."""
        current = sdk_provider(self.tracer_provider)
        if current is self._installed_on:
            return
        old, self._installed_on = self._installed_on, current
        if current is None:
            return
        _logger.info(
            "multirun: the SDK TracerProvider behind %s was replaced (configured again); "
            "multirun's span processors move to the new one",
            type(self.tracer_provider).__name__,
        )
        pipeline = getattr(old, "_multirun_export_pipeline", None)
        moved = hasattr(current, "_multirun_export_pipeline")  # by another client on the same proxy
        if isinstance(pipeline, _SwappableExportProcessor) and not moved:
            current.add_span_processor(pipeline)
            current._multirun_export_pipeline = pipeline  # type: ignore[attr-defined]
        guard_span_processors(self.tracer)
        self.usage_processor = _install_usage_processor(current, self.usage_processor)
        keep_own_spans_as_sampled(self.tracer)

    def new_ledger(
        self,
        parent: Ledger | None,
        budget: Budget | None = None,
        run_id: str = "",
        ancestor_ids: Sequence[str] = (),
        *,
        adopt: bool = False,
    ) -> Ledger:
        """The ledger of a run: in this process, or in Redis when a ``ledger_uri`` is configured.

        ``ancestor_ids`` name the enclosing runs (nearest first) of a run with no ``parent``
        here, and ``adopt`` is true, for a run continued from another process: a shared ledger
        charges the ancestors too, and leaves creating the run's record to its own process
        (it is re-created from here only if the server loses it after this process joined).
        """
        if self._ledgers is not None:
            return self._ledgers.new_ledger(
                parent,  # type: ignore[arg-type]  # a RunLedger or RedisLedger: both are made here
                budget,
                run_id,
                ancestor_ids,
                adopt=adopt,
            )
        local_parent = parent if isinstance(parent, RunLedger) else None  # always so without Redis
        return RunLedger(local_parent, self.clock.monotonic, budget=budget, run_id=run_id)

    def price(self, usage: TokenUsage) -> tuple[int, int, bool]:
        """(tokens, cost in integer units, unpriced) of one usage report."""
        cost = usage.cost_usd
        if cost is None:
            cost = self.prices.cost_usd(
                usage.model,
                provider=usage.provider,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                service_tier=usage.service_tier,
            )
        if cost is None:
            return usage.total_tokens, 0, usage.total_tokens > 0
        return usage.total_tokens, cost_units_of(cost), False

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export the spans ended so far, waiting ``timeout_millis`` at most; False if they
        were not all exported in time."""
        flush = getattr(self.tracer_provider, "force_flush", None)
        return bool(flush(timeout_millis)) if flush is not None else True

    def close(self, timeout_millis: int | None = None) -> bool:
        """Send the shared ledger (``ledger_uri``) what this process counted and has not sent
        yet, then close its connections, waiting ``timeout_millis`` at most (default: the
        shutdown timeout, 3 s). False, with a warning, if Redis did not take it all in time
        (it could not be reached, or did not answer within the timeout): what is left goes
        with the next command for its run, a later ``close``, or at exit.

        Exit sends it for every client, one dropped without ``close`` too, and a later
        ``init`` sends it in the background for the client it replaces: call it before a
        process ends without exit handlers (``os._exit``, a killed multiprocessing worker). The
        client goes on working after it (the ledger connects again).
        """
        if timeout_millis is None:
            timeout_millis = _shutdown_timeout_millis()
        if isinstance(timeout_millis, bool) or not isinstance(timeout_millis, int) or timeout_millis < 0:
            raise ConfigurationError(f"timeout_millis must be an int >= 0, got {timeout_millis!r}")
        ledgers = self._ledgers
        if ledgers is None:
            return True
        closed: list[bool] = []  # what the factory's close returned; nothing if it raised
        if _in_background(lambda: closed.append(ledgers.close())).wait(timeout_millis / 1000):
            return closed == [True]  # else send_pending or _in_background logged why
        _warn_ledger_late([ledgers], timeout_millis)
        return False


# ---------------------------------------------------------------------------
# process-wide configuration

_configured: MultiRunClient | None = None
_configured_with: dict[str, Any] | None = None  # the arguments of the init() that made it (None: a run did)
_configure_lock = threading.Lock()
_owned_provider: TracerProvider | None = None


class _SwappableExportProcessor(SpanProcessor):
    """The export pipeline ``init`` adds to a provider: a later ``init`` swaps its exporter
    (flushing the old one) instead of adding a second pipeline that keeps the old destination."""

    def __init__(self) -> None:
        self._current: ExportProcessor | None = None
        self._settings: BatchSettings | None = None
        self._retiring: list[threading.Thread] = []  # the shutdowns of replaced pipelines
        self._lock = threading.Lock()
        # on the SDK provider behind a proxy (Logfire's), which a reconfigure shuts down and
        # replaces: its shutdown only flushes, the pipeline moves to the new provider
        # (MultiRunClient.ensure_installed) and is shut down at exit
        self.behind_proxy = False

    def replace(self, exporter: SpanExporter | None, settings: BatchSettings | None) -> None:
        """Export to ``exporter`` from now on (None: nowhere). The pipeline replaced exports what
        it holds and shuts its exporter down, unless ``exporter`` is that one (``init`` run again
        with it)."""
        with self._lock:
            old = self._current
            if old is not None and old.exporter is exporter and settings == self._settings:
                return  # nothing changes: the pipeline goes on
            new = None if exporter is None else ExportProcessor(exporter, settings=settings)
            if old is not None and new is not None and old.exporter is exporter:
                new.take_over_from(old)  # new batch settings: the exporter goes on in the new pipeline
            self._current, self._settings = new, settings
            if old is None:
                return
            # in a thread of its own: behind a hung exporter it takes its whole timeout (30 s),
            # and init must not wait for that; flush and shutdown wait for it instead
            retiring = threading.Thread(target=old.shutdown, name="multirun-span-export", daemon=True)
            try:
                retiring.start()
            except RuntimeError:  # at interpreter exit no thread can start
                old.shutdown()
                return
            self._retiring = [t for t in self._retiring if t.is_alive()] + [retiring]

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        current = self._current
        if current is not None:
            current.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        current = self._current
        if current is not None:
            current.on_end(span)

    def shutdown(self) -> None:
        """Deliver the last spans, waiting the shutdown timeout at most (at exit too)."""
        if self.behind_proxy:
            self.force_flush(_millis_until(_shutdown_deadline()))
            return
        self.close()

    def close(self) -> None:
        """Deliver the last spans and shut the exporter down, waiting the shutdown timeout at most."""
        deadline = _shutdown_deadline()
        current = self._current
        if current is not None:
            current.shutdown(_millis_until(deadline))
        self._join_retiring(deadline)

    def force_flush(self, timeout_millis: int = DEFAULT_TIMEOUT_MILLIS) -> bool:
        deadline = time.monotonic() + max(timeout_millis, 0) / 1000
        current = self._current
        flushed = current.force_flush(timeout_millis) if current is not None else True
        return self._join_retiring(deadline) and flushed

    def _join_retiring(self, deadline: float) -> bool:
        """Wait until ``deadline`` for the replaced pipelines to finish; True if they did."""
        with self._lock:
            retiring = list(self._retiring)
        for thread in retiring:
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(thread.is_alive() for thread in retiring)


SHUTDOWN_TIMEOUT_SECONDS = 3.0


def _shutdown_timeout_millis() -> int:
    """How long shutting down waits for the last spans and metrics, at process exit too:
    ``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT``, else ``OTEL_EXPORTER_OTLP_TIMEOUT`` (seconds, as the
    SDK's OTLP exporters read them: one export may take that long), else 3 s."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        try:
            seconds = float(os.environ.get(name) or "nan")
        except ValueError:
            continue  # the exporter warns about it and uses its default
        if 0 < seconds < float("inf"):
            return round(seconds * 1000)
    return round(SHUTDOWN_TIMEOUT_SECONDS * 1000)


_exit_deadline: float | None = None


def _shutdown_deadline() -> float:
    """When a shutdown must be over: one shutdown timeout from now, or, at interpreter exit, from
    the first shutdown of the exit. An application's provider shuts multirun's span pipeline down
    in its own exit handler, which runs before multirun's: exit still waits one timeout in all,
    and the shared ledgers send their usage meanwhile."""
    global _exit_deadline
    deadline = time.monotonic() + _shutdown_timeout_millis() / 1000
    if not getattr(threading, "_SHUTTING_DOWN", False):  # set while the exit handlers run
        return deadline
    if _exit_deadline is None:
        _exit_deadline = deadline
        closer = _ledger_closer
        if closer is not None:
            closer.start(list(_open_ledgers))
    return _exit_deadline


def _millis_until(deadline: float) -> int:
    return max(round((deadline - time.monotonic()) * 1000), 0)


_shut_down_at_exit = False


def _shutdown_at_exit() -> None:
    """Close the shared ledgers and shut down the providers ``init`` made, within one shutdown
    timeout; the ledgers' usage is sent while the spans are. Once: a multiprocessing worker
    started by ``spawn`` calls it from its exit handlers and from multiprocessing's."""
    global _shut_down_at_exit
    if _shut_down_at_exit:
        return
    _shut_down_at_exit = True
    timeout_millis = _shutdown_timeout_millis()
    deadline = _shutdown_deadline()
    closer = _ledger_closer
    try:
        if closer is not None:
            closer.start(list(_open_ledgers))  # begun already if the exit began elsewhere
        if _owned_provider is not None:
            _owned_provider.shutdown()  # its export pipeline waits the shutdown timeout at most
        for pipeline in list(_proxied_pipelines):
            pipeline.close()
        meters, left = _owned_meter_provider, deadline - time.monotonic()
        # with no time left the collector is not answering: the last metrics are lost with the spans.
        # One the program shut down itself is left alone: the SDK would warn about a second shutdown.
        if meters is not None and left > 0 and not getattr(meters, "_shutdown", False):
            meters.shutdown(timeout_millis=left * 1000)
        if closer is not None:
            late = closer.wait(deadline - time.monotonic())
            if late:
                _warn_ledger_late(late, timeout_millis, at_exit=True)
    except KeyboardInterrupt:  # Ctrl-C to stop waiting for a collector: no traceback for that
        lost = "spans and metrics" if closer is None else "spans, metrics and shared-ledger usage"
        _logger.warning("multirun: interrupted at exit: the %s not sent yet are lost", lost)
    except Exception:  # telemetry must not fail the program, even at exit
        _logger.warning("multirun: shutting down telemetry at exit failed", exc_info=True)


# The export pipelines init added behind a proxy's provider, shut down at exit.
_proxied_pipelines: weakref.WeakSet[_SwappableExportProcessor] = weakref.WeakSet()

# The shared ledgers of every client, closed at exit (each sends what its ledgers have pending).
_open_ledgers: weakref.WeakSet[RedisLedgerFactory] = weakref.WeakSet()


class _LedgerCloser:
    """Closes shared ledgers at exit from a thread started beforehand: at interpreter exit Python
    3.12.0 and 3.12.1 refuse to start one, and exit must not wait past the shutdown timeout for a
    Redis that hangs."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._unclosed: list[RedisLedgerFactory] = []
        threading.Thread(target=self._close_when_asked, name="multirun-ledger-close", daemon=True).start()

    def start(self, factories: list[RedisLedgerFactory]) -> None:
        """Begin closing ``factories``, one after the other; once."""
        if self._asked.is_set():
            return
        with self._lock:
            self._unclosed = factories
        self._asked.set()

    def wait(self, seconds: float) -> list[RedisLedgerFactory]:
        """Wait ``seconds`` at most for the closing to end; the factories not closed by then."""
        self._done.wait(max(seconds, 0))
        with self._lock:
            return list(self._unclosed)

    def _close_when_asked(self) -> None:
        self._asked.wait()
        with self._lock:
            factories = list(self._unclosed)
        for factory in factories:
            try:
                factory.close()
            except Exception:  # telemetry must not fail the program, even at exit
                _logger.warning("multirun: closing the shared budget ledger at exit failed", exc_info=True)
            with self._lock:
                self._unclosed.remove(factory)
        self._done.set()


_ledger_closer: _LedgerCloser | None = None
_ledger_closer_lock = threading.Lock()


def _close_at_exit(factory: RedisLedgerFactory) -> None:
    """Have ``factory`` closed by ``_shutdown_at_exit``, sending what its ledgers have pending."""
    global _ledger_closer
    _open_ledgers.add(factory)
    with _ledger_closer_lock:
        if _ledger_closer is None:
            _ledger_closer = _LedgerCloser()
    _register_worker_exit_hook()


def _new_ledger_closer_after_fork() -> None:
    """In a forked child: the parent's closing thread is gone; the child has its own ledgers to close."""
    global _ledger_closer, _ledger_closer_lock
    _ledger_closer_lock = threading.Lock()
    if _ledger_closer is not None:
        _ledger_closer = _LedgerCloser()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_ledger_closer_after_fork)


def _in_background(action: Callable[[], object]) -> threading.Event:
    """Run ``action`` in a daemon thread (here when none can start, at interpreter exit); the
    event is set once it is over."""
    done = threading.Event()

    def target() -> None:
        try:
            action()
        except Exception:  # telemetry must not fail the program
            _logger.warning("multirun: sending to the shared budget ledger failed", exc_info=True)
        finally:
            done.set()

    try:
        threading.Thread(target=target, name="multirun-ledger-send", daemon=True).start()
    except RuntimeError:
        target()
    return done


def _warn_ledger_late(
    factories: Sequence[RedisLedgerFactory], timeout_millis: int, *, at_exit: bool = False
) -> None:
    """One warning that the shared ledgers ``factories`` did not take this process's last usage in time."""
    _logger.warning(
        "multirun: the shared budget ledger at %s did not answer within %.1f s: what this process "
        "counted and had not sent to it %s",
        ", ".join(sorted({factory.url for factory in factories})),
        timeout_millis / 1000,
        "is lost" if at_exit else "is still being sent, in the background",
    )


# Registered at import, not by the first run: exit handlers run last registered first, and the
# program's own, registered after its imports, may still run a step (traced only if this runs after)
atexit.register(_shutdown_at_exit)
_worker_exit_hook_registered = False


def _register_worker_exit_hook() -> None:
    """Have ``_shutdown_at_exit`` shut down the providers ``init`` makes at the exit of the
    multiprocessing workers this process starts too (registered once)."""
    global _worker_exit_hook_registered
    if not _worker_exit_hook_registered:
        _shutdown_at_worker_exit()
        _worker_exit_hook_registered = True


def _shutdown_at_worker_exit() -> None:
    """Have multiprocessing run ``_shutdown_at_exit`` as this process ends, if it is one of its
    workers, and as the workers it forks end.

    Workers started by ``fork`` and ``forkserver`` (the default on Linux from Python 3.14) end
    with ``os._exit``, which runs no ``atexit`` handler: the spans of their runs were lost.
    """
    import multiprocessing
    import multiprocessing.util

    if multiprocessing.parent_process() is not None:
        _finalize_at_worker_exit(_shutdown_at_exit)
    # a forked worker starts with no finalizers: it registers its own once forked
    multiprocessing.util.register_after_fork(_shutdown_at_exit, _finalize_at_worker_exit)


def _finalize_at_worker_exit(shutdown: Callable[[], None]) -> None:
    import multiprocessing.util

    # a negative priority: after the worker's own finalizers and children
    multiprocessing.util.Finalize(None, shutdown, exitpriority=-1)


def _export_to(provider: Any, exporter: SpanExporter | None, settings: BatchSettings | None) -> None:
    """Send ``provider``'s spans to ``exporter`` (None: nowhere) through the one pipeline ``init``
    adds to it, batched with ``settings`` (None: as the ``OTEL_BSP_*`` variables say)."""
    sdk = sdk_provider(provider) or provider
    pipeline: _SwappableExportProcessor | None = getattr(sdk, "_multirun_export_pipeline", None)
    if pipeline is None:
        if exporter is None:
            return
        add = getattr(sdk, "add_span_processor", None)
        if add is None:
            return  # not an SDK provider: it exports as it was set up to
        pipeline = _SwappableExportProcessor()
        if sdk is not provider:
            pipeline.behind_proxy = True
            _proxied_pipelines.add(pipeline)
        add(pipeline)
        sdk._multirun_export_pipeline = pipeline  # type: ignore[union-attr]
    pipeline.replace(exporter, settings)


def configured_client() -> MultiRunClient | None:
    """The client ``init`` set up, or None."""
    return _configured


def get_client() -> MultiRunClient:
    """The configured client, creating the default one (``init()``) on first use."""
    global _configured_with
    client = _configured
    if client is None:
        with _configure_lock:
            if _configured is None:
                _init_locked(implicit=True)
                _configured_with = None
            client = _configured
    assert client is not None
    return client


def init(
    *,
    service_name: str | None = None,
    endpoint: str | None = None,
    protocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    span_exporter: SpanExporter | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    capture_content: bool | None = None,
    content_limit: int | None = None,
    checkpoint_uri: str | None = None,
    blob_exporter: BlobExporter | None = None,
    checkpoint_serializer: str | None = None,
    checkpoint_hmac_key: bytes | str | None = None,
    checkpoint_timeout: float | None = None,
    checkpoint_max_bytes: int | None = None,
    prices: Mapping[str, Price | Mapping[str, float]] | None = None,
    step_history: int = DEFAULT_STEP_HISTORY,
    record_replay: bool = True,
    replay_limit: int = DEFAULT_REPLAY_LIMIT,
    propagate_threads: bool = True,
    meter_provider: otel_metrics.MeterProvider | None = None,
    metrics: bool = True,
    ledger_uri: str | None = None,
    unpriced: str | None = None,
) -> MultiRunClient:
    """Configure multirun for this process and return the client.

    Args:
        service_name: ``service.name`` of a provider created here (default
            ``OTEL_SERVICE_NAME``, else ``service.name`` of ``OTEL_RESOURCE_ATTRIBUTES``,
            else ``multirun``).
        endpoint: OTLP endpoint, e.g. ``http://localhost:4318`` (``http://localhost:4317``
            for gRPC). Without it, ``OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)ENDPOINT`` is
            honoured; with neither, traces go to files under ``local_dir``. For the provider
            ``init`` makes, ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``, any
            installed ``opentelemetry_traces_exporter``, or several, comma-separated) says
            where its spans go instead, and ``OTEL_METRICS_EXPORTER`` (the same, with
            ``opentelemetry_metrics_exporter``, e.g. ``prometheus``) where the metrics of the
            MeterProvider it makes go (``otlp`` without an endpoint: none is made).
        protocol: ``http/protobuf`` or ``grpc`` (which needs ``pip install 'multirun-otel[grpc]'``),
            for traces and metrics (default ``OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)PROTOCOL``,
            else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``http/protobuf``).
        headers: HTTP headers (gRPC metadata) sent with every OTLP export (e.g. ``Authorization``).
        tracer_provider: use this provider instead of the global one (the API's proxy, what
            ``trace.get_tracer_provider()`` returns before one is set, stands for the global one).
        span_exporter: export to this exporter (batched) instead.
        local_dir: folder of the embedded default (``MULTIRUN_DIR``, else ``./.multirun``);
            one given here or in ``MULTIRUN_DIR`` is created now, and refused if it cannot be.
        capture_content: record step inputs and outputs (default from
            ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``: ``true``, ``SPAN_ONLY`` or
            ``SPAN_AND_EVENT``).
        content_limit: longest recorded content, in characters (default
            ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``, at least 16, else 4096).
        checkpoint_uri: blob store of checkpoints (``file://``, ``memory://``, ``s3://``, a path;
            default ``MULTIRUN_CHECKPOINT_URI``, else ``local_dir/blobs``).
        blob_exporter: a BlobExporter object to keep checkpoints in, instead of a URI.
        checkpoint_serializer: ``json`` (default, ``MULTIRUN_CHECKPOINT_SERIALIZER``), or
            ``pickle``/``cloudpickle`` to keep objects as they are; those need an HMAC key.
        checkpoint_hmac_key: the key that signs and verifies checkpoints (default
            ``MULTIRUN_CHECKPOINT_HMAC_KEY``): bytes, or text (hex digits are read as hex),
            at least 16 bytes.
        checkpoint_timeout: the longest a checkpoint waits for the blob store to write it, in
            seconds (default ``MULTIRUN_CHECKPOINT_TIMEOUT``, else 15): a store that hangs or is
            slow costs that wait and a warning, and the write goes on in the background.
        checkpoint_max_bytes: the largest checkpoint read or written, in bytes, stored and
            decompressed (default ``MULTIRUN_CHECKPOINT_MAX_BYTES``, else 1 GiB): a larger one is
            refused when read, and so not written (a CheckpointError, a warning for the
            checkpoints multirun takes itself).
        prices: per-model price overrides, ``{"model": Price(...)}``.
        step_history: how many finished steps a run keeps for ``Run.steps``.
        record_replay: hash the inputs of idempotent steps and keep their results, so
            that a run restored from a checkpoint does not run them again (default True).
        replay_limit: the most steps a run keeps for replay (their results stay in memory).
        propagate_threads: carry the current run into threads and thread pools (default True).
        meter_provider: record metrics with this provider (default: the global one;
            with an OTLP endpoint or ``OTEL_METRICS_EXPORTER`` and no global provider, one
            exporting there is created).
        metrics: False to record no metrics at all.
        ledger_uri: ``redis://host:port/db`` to keep every run's spend in Redis, shared by
            all processes that run its steps (default ``MULTIRUN_LEDGER_URI``; none: in process).
        unpriced: what a usage report of a model with no known price does: ``flag`` (default,
            ``MULTIRUN_UNPRICED``) counts its tokens and marks the run ``multirun.cost.unpriced``;
            ``fail`` also counts and marks it, then raises PolicyViolation (rule ``unpriced``) from
            ``report_usage``, so that no run spends money its budget cannot see.

    Calling it again replaces the earlier configuration, with a warning; the same
    ``span_exporter`` given again goes on receiving the spans.
    """
    arguments: dict[str, Any] = {
        "service_name": service_name,
        "endpoint": endpoint,
        "protocol": protocol,
        "headers": headers,
        "tracer_provider": tracer_provider,
        "span_exporter": span_exporter,
        "local_dir": local_dir,
        "capture_content": capture_content,
        "content_limit": content_limit,
        "checkpoint_uri": checkpoint_uri,
        "blob_exporter": blob_exporter,
        "checkpoint_serializer": checkpoint_serializer,
        "checkpoint_hmac_key": checkpoint_hmac_key,
        "checkpoint_timeout": checkpoint_timeout,
        "checkpoint_max_bytes": checkpoint_max_bytes,
        "prices": prices,
        "step_history": step_history,
        "record_replay": record_replay,
        "replay_limit": replay_limit,
        "propagate_threads": propagate_threads,
        "meter_provider": meter_provider,
        "metrics": metrics,
        "ledger_uri": ledger_uri,
        "unpriced": unpriced,
    }
    return _configure(arguments)


def _configure(arguments: dict[str, Any], local_dir_setting: str = "local_dir") -> MultiRunClient:
    """``init`` with ``arguments``; ``local_dir_setting`` names the folder in a refusal (the
    argument the caller passed it as)."""
    global _configured_with
    with _configure_lock:
        earlier, earlier_arguments = _configured, _configured_with
        client = _init_locked(**arguments, local_dir_setting=local_dir_setting)
        _configured_with = arguments
    if earlier is not None:
        _warn_replaced(earlier_arguments, arguments)
    return client


def _warn_replaced(earlier: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """One warning that ``init`` replaced the configuration, naming the arguments that changed.

    ``earlier`` is None when the configuration replaced is the default one a run set up.
    """
    before = _INIT_DEFAULTS if earlier is None else earlier
    changed = [name for name, value in now.items() if not _same(before[name], value)]
    _logger.warning(
        "multirun: init() %s (%s)",
        "replaces the default configuration that an earlier run set up"
        if earlier is None
        else "was called again and replaces the earlier configuration",
        "changed: " + ", ".join(changed) if changed else "same arguments",
    )


def _same(a: Any, b: Any) -> bool:
    """Whether two values of an ``init`` argument are the same (objects: the same object)."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an object whose == cannot be asked
        return False


_INIT_DEFAULTS: dict[str, Any] = {name: p.default for name, p in inspect.signature(init).parameters.items()}


def init_local(path: str | os.PathLike[str] | None = None, **options: Any) -> MultiRunClient:
    """Configure the embedded default: traces and checkpoints as files under ``path``
    (default: ``MULTIRUN_DIR``, else ``./.multirun``, as ``multirun resume --dir`` expects).

    Checkpoints go to ``checkpoint_uri`` if given, else to ``MULTIRUN_CHECKPOINT_URI`` (what
    ``multirun resume --store`` sets), else ``path/blobs``, as with ``init``. ``options`` are
    the other arguments of ``init``; ``local_dir`` and ``span_exporter``, which ``path`` sets,
    are refused with a TypeError."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigurationError(f"init_local: path must be a str or os.PathLike, got {path!r}")
    from_env = path is None and bool(os.environ.get("MULTIRUN_DIR"))
    root = Path(os.environ["MULTIRUN_DIR"] if from_env else path or DEFAULT_DIR)
    # MULTIRUN_DIR is left to init, which reads the same folder and names the variable if it
    # cannot be created. No checkpoint_uri: init takes MULTIRUN_CHECKPOINT_URI, else local_dir/blobs
    local_dir = None if from_env else root
    try:
        given = inspect.signature(init).bind(**options).arguments
    except TypeError as exc:
        raise TypeError(f"init_local() {exc}") from None
    for own in ("local_dir", "span_exporter"):
        if own in given:
            raise TypeError(f"init_local() got {own}, which it sets itself from path; use init() to set it")
    arguments = {**_INIT_DEFAULTS, **given, "local_dir": local_dir}
    arguments["span_exporter"] = LocalFileSpanExporter(root / "traces")
    return _configure(arguments, local_dir_setting="init_local: path")


def _init_locked(
    *,
    service_name: str | None = None,
    endpoint: str | None = None,
    protocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    span_exporter: SpanExporter | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    checkpoint_uri: str | None = None,
    blob_exporter: BlobExporter | None = None,
    checkpoint_serializer: str | None = None,
    checkpoint_hmac_key: bytes | str | None = None,
    checkpoint_timeout: float | None = None,
    checkpoint_max_bytes: int | None = None,
    implicit: bool = False,
    local_dir_setting: str = "local_dir",
    **client_options: Any,
) -> MultiRunClient:
    """``init``; ``implicit``: the defaults a first run sets up, which log the telemetry
    variables ``init`` refuses and use their defaults (telemetry must not fail the program).
    The settings that govern money (``MULTIRUN_UNPRICED``, ``MULTIRUN_LEDGER_URI``) and where
    checkpoints go are refused all the same."""
    global _configured, _owned_provider
    for name, value in (
        ("service_name", service_name),
        ("endpoint", endpoint),
        ("checkpoint_uri", checkpoint_uri),
    ):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")
    # everything that can be refused is checked before anything global changes
    _validate_objects(
        headers=headers,
        tracer_provider=tracer_provider,
        span_exporter=span_exporter,
        local_dir=local_dir,
        blob_exporter=blob_exporter,
    )
    if tracer_provider is not None and _is_unset(tracer_provider):
        # the API's proxy (``trace.get_tracer_provider()`` before one was set) records nothing
        # of its own and takes no processor: it stands for the global provider, as if none was given
        tracer_provider = None
    if tracer_provider is None and _is_unset(trace.get_tracer_provider()):
        read_limits = _SPAN_LIMITS  # the provider init makes reads them all
    elif client_options.get("content_limit") is None:
        read_limits = _CONTENT_LIMIT  # the default content limit reads one
    else:
        read_limits = {}
    refuse = not implicit
    bad_limits = _bad_span_limits(read_limits, refuse=refuse)
    if _VALUE_LENGTH_LIMIT in bad_limits and client_options.get("content_limit") is None:
        client_options["content_limit"] = DEFAULT_CONTENT_LIMIT
    _validate_options(**client_options)
    named = None  # the span exporters OTEL_TRACES_EXPORTER names, for the provider init makes only
    told = span_exporter is not None or endpoint is not None or tracer_provider is not None
    if not told and _provider_is_ours(trace.get_tracer_provider()):
        named = _named_exporters("traces", refuse=refuse)
    # the metric exporters OTEL_METRICS_EXPORTER names, for the MeterProvider init makes only
    metric_names = None
    if endpoint is None and _makes_meters(client_options):
        metric_names = _named_exporters("metrics", refuse=refuse)
    ignored = _validate_endpoints(
        endpoint,
        span_exporter,
        tracer_provider,
        client_options,
        protocol,
        refuse=refuse,
        traces=named is None or "otlp" in named,
        metrics=metric_names is None or "otlp" in metric_names,
    )
    otlp_signals = [
        signal
        for signal, exported in (
            ("traces", _traces_exported(endpoint, span_exporter, tracer_provider, ignored, named)),
            ("metrics", _metrics_exported(endpoint, client_options, ignored, metric_names)),
        )
        if exported
    ]
    protocols = _validate_protocols(protocol, otlp_signals, refuse=refuse)
    meter_settings = None  # set when init makes a MeterProvider: it exports somewhere
    if "metrics" in protocols or any(name != "otlp" for name in metric_names or ()):
        meter_settings = _metric_settings(refuse=refuse)
    exports = span_exporter is not None or endpoint is not None
    batch = None
    if exports or (tracer_provider is None and _provider_is_ours(trace.get_tracer_provider())):
        batch = batch_settings(refuse=refuse)  # those of the export pipeline init will make
    price_book = PriceBook(client_options.pop("prices", None))
    root = Path(local_dir or os.environ.get("MULTIRUN_DIR") or DEFAULT_DIR)
    store: BlobExporter | str | None = blob_exporter
    store_setting = "blob_exporter"
    if store is None:
        store, store_setting = _setting(checkpoint_uri, "checkpoint_uri", "MULTIRUN_CHECKPOINT_URI")
    checkpoint_store = _checkpoint_store(
        store or FileBlobExporter(root / "blobs"),  # a folder, not a URI: "a:b/blobs" has no scheme
        checkpoint_serializer,
        checkpoint_hmac_key,
        _checkpoint_timeout(checkpoint_timeout, refuse=refuse),
        checkpoint_max_bytes_setting(checkpoint_max_bytes, refuse=refuse),
        store_setting=store_setting,
    )
    otlp_spans = metric_exporter = None  # made here: the gRPC exporters raise for some variables
    with _header_variables_checked(protocols, headers):
        if "traces" in protocols:
            otlp_spans = _otlp_exporter(
                "traces", protocols["traces"], protocol, endpoint, headers, refuse=refuse
            )
        if "metrics" in protocols:
            metric_exporter = _otlp_exporter(
                "metrics", protocols["metrics"], protocol, endpoint, headers, refuse=refuse
            )
    made = _made_exporters("traces", named or (), refuse=refuse)
    made_metrics = _made_exporters("metrics", metric_names or (), refuse=refuse)
    _ensure_local_dir(local_dir, local_dir_setting)  # last: a refused init creates no folder
    exporter: SpanExporter | None
    if span_exporter is not None or named is None:
        exporter = span_exporter or otlp_spans or LocalFileSpanExporter(root / "traces")
    else:
        exporters = _exporters_of(named, made, otlp_spans, lambda: LocalFileSpanExporter(root / "traces"))
        exporter = SpanExporters(exporters) if len(exporters) > 1 else next(iter(exporters), None)
    provider = tracer_provider
    if provider is None:
        current = trace.get_tracer_provider()
        if _owned_provider is not None and current is _owned_provider:
            # our own provider from an earlier init(): send from now on where this call says
            provider = current
            _export_to(current, exporter, batch)
        elif sdk_provider(current) is not None:
            # the application's own provider (or Logfire's proxy of one): add to it, never replace it
            provider = current
            # none asked for: the one an earlier init added is let go
            _export_to(current, exporter if exports else None, batch)
        elif _is_unset(current):
            resource = _resource(service_name)
            # shut down at exit by _shutdown_at_exit, within the shutdown timeout
            owned = TracerProvider(
                resource=resource, span_limits=_span_limits_without(bad_limits), shutdown_on_exit=False
            )
            _register_worker_exit_hook()
            _export_to(owned, exporter, batch)
            trace.set_tracer_provider(owned)
            _owned_provider = owned
            provider = owned
        elif isinstance(current, trace.NoOpTracerProvider):
            # set by the application (unset is a proxy): tracing is off, as it chose
            asked = span_exporter is not None or endpoint is not None
            _logger.log(
                logging.WARNING if asked else logging.INFO,
                "multirun: the global TracerProvider is a NoOpTracerProvider: no spans are recorded%s; "
                "budgets and policy still apply",
                " (none reach the exporter init was given)" if asked else "",
            )
            provider = current
        elif _sdk_disabled():
            _logger.info(
                "multirun: OTEL_SDK_DISABLED is true: no spans are recorded; budgets and policy still apply"
            )
            provider = current
        else:
            _logger.warning(
                "multirun: the global TracerProvider is a %s, not the OpenTelemetry SDK's; "
                "spans go to it, but usage of other instrumentations is not charged",
                type(current).__name__,
            )
            provider = current
    elif exports or provider is not _owned_provider:
        _export_to(provider, exporter if exports else None, batch)
    if meter_settings is not None:
        # unset is otlp, as for the SDK's set-up: to the endpoint (without one, metric_exporter is None)
        metric_exporters = _exporters_of(
            ["otlp"] if metric_names is None else metric_names, made_metrics, metric_exporter
        )
        if metric_exporters:
            _ensure_meter_provider(metric_exporters, service_name, meter_settings)
    client = MultiRunClient(
        tracer_provider=provider, checkpoint_store=checkpoint_store, prices=price_book, **client_options
    )
    earlier, _configured = _configured, client
    if earlier is not None and earlier._ledgers is not None:
        # what it counted and has not sent goes now, not at exit; its connections stay open for
        # the runs still going on with it
        _in_background(earlier._ledgers.send_pending)
    return client


def _validate_options(
    *,
    capture_content: bool | None = None,
    content_limit: int | None = None,
    step_history: int = DEFAULT_STEP_HISTORY,
    record_replay: bool = True,
    **_others: Any,
) -> tuple[bool, int]:
    """Check the client's settings, naming the one that is wrong.

    Returns the resolved ``capture_content`` and ``content_limit``.
    """
    if capture_content is None:
        capture_content = _capture_from_env()
    if not isinstance(capture_content, bool):
        raise ConfigurationError(f"capture_content must be True or False, got {capture_content!r}")
    if content_limit is None:
        env_limit = env_int(_VALUE_LENGTH_LIMIT, DEFAULT_CONTENT_LIMIT, minimum=0)
        # the SDK's limit for every attribute: below 16 it, not multirun, cuts content shorter
        content_limit = max(env_limit, 16)
    if isinstance(content_limit, bool) or not isinstance(content_limit, int) or content_limit < 16:
        raise ConfigurationError(f"content_limit must be an int >= 16, got {content_limit!r}")
    if isinstance(step_history, bool) or not isinstance(step_history, int) or step_history < 0:
        raise ConfigurationError(f"step_history must be an int >= 0, got {step_history!r}")
    if not isinstance(record_replay, bool):
        raise ConfigurationError(f"record_replay must be True or False, got {record_replay!r}")
    _unpriced_mode(_others.get("unpriced"))
    replay_limit = _others.get("replay_limit", DEFAULT_REPLAY_LIMIT)
    if isinstance(replay_limit, bool) or not isinstance(replay_limit, int) or replay_limit < 0:
        raise ConfigurationError(f"replay_limit must be an int >= 0, got {replay_limit!r}")
    for flag in ("metrics", "propagate_threads"):
        if not isinstance(_others.get(flag, True), bool):
            raise ConfigurationError(f"{flag} must be True or False, got {_others[flag]!r}")
    meter_provider = _others.get("meter_provider")
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise ConfigurationError(
            f"meter_provider must be an OpenTelemetry MeterProvider (with get_meter), got {meter_provider!r}"
        )
    _validate_ledger_uri(_others.get("ledger_uri"))
    return capture_content, content_limit


def _capture_from_env() -> bool:
    """Whether ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` asks for content on spans:
    a boolean, or a content mode of opentelemetry-util-genai. Any other value is False and one
    warning naming it (the GenAI instrumentations log it and capture nothing either)."""
    raw = os.environ.get(_CAPTURE_ENV, "").strip()
    value = raw.lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    if value in _CAPTURE_MODES:
        return _CAPTURE_MODES[value]
    if raw not in _capture_values_warned:  # init validates its options twice
        _capture_values_warned.add(raw)
        _logger.warning(
            "multirun: %s must be true or false, or one of %s, got %r; step content is not recorded",
            _CAPTURE_ENV,
            ", ".join(mode.upper() for mode in _CAPTURE_MODES),
            raw,
        )
    return False


def _validate_objects(
    *,
    headers: Any,
    tracer_provider: Any,
    span_exporter: Any,
    local_dir: Any,
    blob_exporter: Any,
) -> None:
    """Refuse arguments of ``init`` that are not what they claim to be, naming them."""
    if headers is not None:
        _check_headers(headers)
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise ConfigurationError(
            "tracer_provider must be an OpenTelemetry TracerProvider (with get_tracer), "
            f"got {tracer_provider!r}"
        )
    if span_exporter is not None and not all(
        callable(getattr(span_exporter, method, None)) for method in ("export", "shutdown")
    ):
        raise ConfigurationError(
            f"span_exporter must be an OpenTelemetry SpanExporter (export, shutdown), got {span_exporter!r}"
        )
    if local_dir is not None and not isinstance(local_dir, (str, os.PathLike)):
        raise ConfigurationError(f"local_dir must be a path (str or os.PathLike), got {local_dir!r}")
    if blob_exporter is not None and not isinstance(blob_exporter, BlobExporter):
        raise ConfigurationError(
            "blob_exporter must be a BlobExporter (put, get, list, delete); for a URI use checkpoint_uri, "
            f"got {blob_exporter!r}"
        )


# both an HTTP header name (an RFC 9110 token) and, lowercased, a gRPC metadata key
_HEADER_NAME = re.compile(r"[0-9A-Za-z_.-]+")


def _sendable_header_value(value: str) -> bool:
    """Whether both requests (HTTP) and gRPC send ``value``: printable ASCII (http.client takes
    latin-1 and tabs, gRPC metadata neither), no leading whitespace."""
    return not value[:1].isspace() and all(" " <= char <= "~" for char in value)


def _check_headers(headers: Any) -> None:
    """Refuse ``headers`` an OTLP export could not send (each export would fail, its spans
    lost), naming the header but never showing a value: it is often a token."""
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a mapping of str to str, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigurationError(
                f"headers must be a mapping of str to str, got {name!r}: {type(value).__name__}"
            )
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigurationError(
                f"headers: a header name must be letters, digits, '-', '_' or '.', got {name!r}"
            )
        if not _sendable_header_value(value):
            raise ConfigurationError(
                f"headers[{name!r}] must be printable ASCII (URL-encode other characters), without "
                "tabs, line breaks or leading whitespace"
            )


def _ensure_local_dir(local_dir: str | os.PathLike[str] | None, name: str) -> None:
    """Create the folder ``local_dir`` (given as ``name``, or else ``MULTIRUN_DIR``) names; refuse
    one that cannot be written.

    The implicit ``./.multirun`` is not checked: nobody chose it, and a run started without
    ``init`` must not fail because the working directory is read-only (writing warns instead).
    """
    if local_dir is None:
        local_dir, name = os.environ.get("MULTIRUN_DIR") or None, "MULTIRUN_DIR"
        if local_dir is None:
            return
    path = Path(local_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "a file of that name exists" if isinstance(exc, FileExistsError) else exc.strerror or exc
        raise ConfigurationError(
            f"{name} must be a folder that exists or can be created, got {str(path)!r} ({reason})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{name} must be a folder multirun can write to, got {str(path)!r}")


# the environment variables of the OTLP endpoint of each signal, the specific one first
_ENDPOINT_ENV = {
    "traces": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    "metrics": ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
}


def _env_endpoint(signal: str, ignored: Collection[str] = ()) -> tuple[str, str] | None:
    """``(variable, URL)`` of the OTLP endpoint the environment sets for ``signal``, or None
    (also for a signal whose variable is ``ignored``: it cannot be used)."""
    if signal in ignored:
        return None
    for variable in _ENDPOINT_ENV[signal]:
        url = os.environ.get(variable)
        if url:
            return variable, url
    return None


def _endpoint_problem(name: str, url: str, protocol: Any = None) -> str | None:
    """What is wrong with an OTLP endpoint that is not an http(s) URL with a host, or None.

    For gRPC too: its exporter would take ``host:port`` as well, but over TLS unless
    ``OTEL_EXPORTER_OTLP_INSECURE`` says otherwise; ``http://`` says it plainly.
    """
    example = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"{name} must be an http(s) URL such as {example}, got {url!r} ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{name} must be an http(s) URL with a host, such as {example}, got {url!r}"
    return None


_NOT_EXPORTED = {"traces": "spans go to the local files instead", "metrics": "metrics are not exported"}


def _validate_endpoints(
    endpoint: str | None,
    span_exporter: SpanExporter | None,
    tracer_provider: trace.TracerProvider | None,
    options: Mapping[str, Any],
    protocol: Any = None,
    *,
    refuse: bool = True,
    traces: bool = True,
    metrics: bool = True,
) -> set[str]:
    """Check ``endpoint``, or the ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables ``init`` will export to
    (``protocol``, the argument, picks the example a refusal gives; ``traces``, ``metrics``: False
    when they go elsewhere than OTLP, as ``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER`` say).

    A variable only the application's own pipeline reads (it has a provider) is its business.
    Returns the signals whose variable, with ``refuse=False``, is logged and ignored instead.
    """
    if endpoint is not None:
        problem = _endpoint_problem("endpoint", endpoint, _protocol_setting(protocol, "traces")[0])
        if problem is not None:
            raise ConfigurationError(problem)
        return set()
    signals = []
    ours = (
        span_exporter is None and tracer_provider is None and _provider_is_ours(trace.get_tracer_provider())
    )
    if traces and ours:
        signals.append("traces")
    if metrics and _makes_meters(options):
        signals.append("metrics")
    bad: dict[str, tuple[str, list[str]]] = {}  # variable -> what is wrong, the signals it is for
    for signal in signals:
        found = _env_endpoint(signal)
        if found is None:
            continue
        problem = _endpoint_problem(*found, _protocol_setting(protocol, signal)[0])
        if problem is not None:
            bad.setdefault(found[0], (problem, []))[1].append(signal)
    return _not_exported(bad, refuse=refuse)


def _not_exported(bad: Mapping[str, tuple[str, list[str]]], *, refuse: bool) -> set[str]:
    """Refuse the first of the ``bad`` variables (name -> what is wrong, the signals it is for),
    or with ``refuse=False`` log each once (OTEL_EXPORTER_OTLP_ENDPOINT: for both signals) and
    return the signals that are not exported over OTLP because of them."""
    for problem, ignored in bad.values():
        refuse_or_warn(problem, refuse=refuse, instead=", ".join(_NOT_EXPORTED[signal] for signal in ignored))
    return {signal for _, ignored in bad.values() for signal in ignored}


def _traces_exported(
    endpoint: str | None,
    span_exporter: SpanExporter | None,
    tracer_provider: trace.TracerProvider | None,
    ignored: Collection[str],
    named: Collection[str] | None = None,
) -> bool:
    """Whether ``init`` sends spans to an OTLP endpoint (the argument, or a variable its own
    provider exports to, or ``otlp`` among the ``named`` exporters of ``OTEL_TRACES_EXPORTER``)."""
    if span_exporter is not None:
        return False
    if endpoint is not None:
        return True
    if not (tracer_provider is None and _provider_is_ours(trace.get_tracer_provider())):
        return False
    if named is not None:
        return "otlp" in named and "traces" not in ignored
    return _env_endpoint("traces", ignored) is not None


# the variable naming the exporters of each signal, and the entry points the SDK's set-up loads them from
_EXPORTER_ENV = {
    "traces": ("OTEL_TRACES_EXPORTER", "opentelemetry_traces_exporter"),
    "metrics": ("OTEL_METRICS_EXPORTER", "opentelemetry_metrics_exporter"),
}
_ITEMS = {"traces": "spans", "metrics": "metrics"}


def _named_exporters(signal: str, *, refuse: bool) -> list[str] | None:
    """The exporters the variable of ``signal`` (``OTEL_TRACES_EXPORTER``, ...) names, once each
    and in order (``none``: no exporter); None when it is unset, or names one that is not
    installed: refused, or with ``refuse=False`` logged, and the default applies."""
    variable, group = _EXPORTER_ENV[signal]
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    names = list(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    installed = {"otlp", "none", *(point.name for point in entry_points(group=group))}
    unknown = [name for name in names if name not in installed]
    if unknown:
        where = _env_endpoint(signal)
        refuse_or_warn(
            f"{variable} names {', '.join(map(repr, unknown))}, which is no installed "
            f"{_ITEMS[signal][:-1]} exporter (installed: {', '.join(sorted(installed))}), got {raw!r}",
            refuse=refuse,
            instead=f"{_ITEMS[signal]} go to {where[0]} instead" if where else _NOT_EXPORTED[signal],
        )
        return None
    return [name for name in names if name != "none"]


def _made_exporters(signal: str, names: Collection[str], *, refuse: bool) -> dict[str, Any]:
    """The exporters (for metrics, or readers) installed as ``names`` (``otlp`` aside), made as
    the SDK's set-up makes them, with no arguments. One that cannot be made is refused, or
    logged and left out."""
    variable, group = _EXPORTER_ENV[signal]
    made: dict[str, Any] = {}
    for name in names:
        if name == "otlp":
            continue
        try:
            point = next(iter(entry_points(group=group, name=name)))
            made[name] = point.load()()
        except Exception as exc:
            refuse_or_warn(
                f"{variable} names {name!r}, which cannot be set up: {exc}",
                refuse=refuse,
                instead=_NOT_EXPORTED[signal],
            )
    return made


def _exporters_of(
    names: Sequence[str], made: Mapping[str, Any], otlp: Any, instead: Callable[[], Any] | None = None
) -> list[Any]:
    """The exporters of the ``names`` of a signal's variable, in order; one that could not be
    set up (logged) is replaced by one ``instead()``, as its warning said, or left out."""
    exporters: list[Any] = []
    replaced = False
    for name in names:
        exporter = otlp if name == "otlp" else made.get(name)
        if exporter is None:
            if instead is None or replaced:
                continue
            exporter, replaced = instead(), True
        exporters.append(exporter)
    return exporters


def _metrics_exported(
    endpoint: str | None,
    options: Mapping[str, Any],
    ignored: Collection[str],
    named: Collection[str] | None = None,
) -> bool:
    """Whether ``init`` makes a MeterProvider that exports to an OTLP endpoint (the argument, or
    a variable, when ``otlp`` is among the ``named`` exporters of ``OTEL_METRICS_EXPORTER``)."""
    if not _makes_meters(options):
        return False
    if endpoint is not None:
        return True
    if named is not None and "otlp" not in named:
        return False
    return _env_endpoint("metrics", ignored) is not None


# the environment variables of the OTLP protocol of each signal, the specific one first
_PROTOCOL_ENV = {
    "traces": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "metrics": ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
}
OTLP_PROTOCOLS = ("http/protobuf", "grpc")  # http/json: no exporter of OpenTelemetry Python sends it
DEFAULT_PROTOCOL = "http/protobuf"  # the specification's, as for the SDK's own OTLP exporters
GRPC_INSTALL_HINT = "pip install 'multirun-otel[grpc]'"
# (signal, protocol) -> the module and class of the SDK's exporter
_OTLP_EXPORTERS = {
    (signal, protocol): (f"opentelemetry.exporter.otlp.proto.{package}.{module}", name)
    for signal, module, name in (
        ("traces", "trace_exporter", "OTLPSpanExporter"),
        ("metrics", "metric_exporter", "OTLPMetricExporter"),
    )
    for protocol, package in (("http/protobuf", "http"), ("grpc", "grpc"))
}
_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics"}


def _protocol_setting(protocol: Any, signal: str) -> tuple[Any, str]:
    """``(protocol, where it came from)`` for ``signal``: the argument, else the signal's
    variable, else ``OTEL_EXPORTER_OTLP_PROTOCOL`` (unset or empty: the next), else the default."""
    if protocol is not None:
        return protocol, "protocol"
    for variable in _PROTOCOL_ENV[signal]:
        value = os.environ.get(variable, "").strip()
        if value:
            return value, variable
    return DEFAULT_PROTOCOL, "the default protocol"


def _protocol_problem(protocol: Any, name: str) -> str | None:
    """What stops exporting with ``protocol`` (given as ``name``), or None."""
    if protocol == "http/json":
        return (
            f"{name} is 'http/json', which OpenTelemetry Python's exporters do not send: use "
            "'http/protobuf' (the same endpoint) or 'grpc'"
        )
    if protocol not in OTLP_PROTOCOLS:
        return f"{name} must be one of {', '.join(OTLP_PROTOCOLS)}, got {protocol!r}"
    if protocol == "grpc":
        for signal in _PATHS:
            try:
                importlib.import_module(_OTLP_EXPORTERS[signal, "grpc"][0])
            except ImportError as exc:
                return f"{name} is 'grpc', which needs the grpc extra ({exc}): {GRPC_INSTALL_HINT}"
    return None


def _validate_protocols(protocol: Any, signals: Collection[str], *, refuse: bool = True) -> dict[str, str]:
    """The protocol of each of ``signals`` (those ``init`` exports over OTLP): the argument,
    always checked, or the variables, checked for the signals that use them.

    A bad variable is refused by name, or with ``refuse=False`` logged (once) and its signals
    left out of the result: they are not exported over OTLP.
    """
    if protocol is not None:
        problem = _protocol_problem(protocol, "protocol")
        if problem is not None:
            raise ConfigurationError(problem)
        return dict.fromkeys(signals, protocol)
    protocols: dict[str, str] = {}
    bad: dict[str, tuple[str, list[str]]] = {}  # variable -> what is wrong, the signals it is for
    for signal in signals:
        value, name = _protocol_setting(None, signal)
        problem = _protocol_problem(value, name)
        if problem is None:
            protocols[signal] = value
        else:
            bad.setdefault(name, (problem, []))[1].append(signal)
    _not_exported(bad, refuse=refuse)
    return protocols


def _provider_is_ours(current: trace.TracerProvider) -> bool:
    """Whether ``init`` exports through its own provider: it made ``current``, or will make one."""
    if _owned_provider is not None and current is _owned_provider:
        return True
    return not isinstance(current, TracerProvider) and _is_unset(current)


def _makes_meters(options: Mapping[str, Any]) -> bool:
    """Whether ``init`` with these ``options`` may create the MeterProvider."""
    return bool(options.get("metrics", True)) and options.get("meter_provider") is None and _meters_are_ours()


def _meters_are_ours() -> bool:
    """Whether ``init`` may create the MeterProvider: the application set none (the global one is
    the API's proxy), neither the SDK's nor another (Logfire's proxy, a NoOpMeterProvider)."""
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    unset = isinstance(otel_metrics.get_meter_provider(), _ProxyMeterProvider)
    return _owned_meter_provider is None and unset


_VALUE_LENGTH_LIMIT = "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"
# The SDK's span limit variables: the SpanLimits argument each sets, and its value when the
# variable is unset (the SDK's defaults; UNSET is no limit).
_SPAN_LIMITS: dict[str, tuple[str, int]] = {
    "OTEL_ATTRIBUTE_COUNT_LIMIT": ("max_attributes", 128),
    _VALUE_LENGTH_LIMIT: ("max_attribute_length", SpanLimits.UNSET),
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": ("max_span_attributes", 128),
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": ("max_span_attribute_length", SpanLimits.UNSET),
    "OTEL_SPAN_EVENT_COUNT_LIMIT": ("max_events", 128),
    "OTEL_SPAN_LINK_COUNT_LIMIT": ("max_links", 128),
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": ("max_event_attributes", 128),
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": ("max_link_attributes", 128),
}
_CONTENT_LIMIT = {_VALUE_LENGTH_LIMIT: _SPAN_LIMITS[_VALUE_LENGTH_LIMIT]}


def _bad_span_limits(variables: Mapping[str, tuple[str, int]], *, refuse: bool) -> set[str]:
    """Those of the span limit ``variables`` set to neither an int >= 0 nor empty (no limit).

    The first is a ConfigurationError naming it (the SDK's TracerProvider raises a
    ValueError, after ``init`` began); with ``refuse=False`` each is logged instead, to
    be left at its default.
    """
    bad = set()
    for name in variables:
        raw = os.environ.get(name, "").strip()
        if not raw or is_count(raw):
            continue
        refuse_or_warn(f"{name} must be an int >= 0 (or empty for no limit), got {raw!r}", refuse=refuse)
        bad.add(name)
    return bad


def _span_limits_without(bad: set[str]) -> SpanLimits:
    """The SDK's limits from the environment, with the ``bad`` variables at their defaults."""
    return SpanLimits(**dict(_SPAN_LIMITS[name] for name in bad))


_EXEMPLAR_FILTERS = ("trace_based", "always_on", "always_off")
_DEFAULT_EXEMPLAR_FILTER = "trace_based"


def _metric_settings(*, refuse: bool = True) -> tuple[int, str]:
    """``(export interval in ms, exemplar filter)`` of the MeterProvider ``init`` makes for an
    OTLP endpoint, from their variables.

    A bad variable is refused by name (the SDK's ValueErrors name none, and come after the
    traces are set up), or with ``refuse=False`` logged and left at its default.
    """
    interval = env_int("OTEL_METRIC_EXPORT_INTERVAL", _METRIC_EXPORT_INTERVAL, minimum=1, refuse=refuse)
    exemplar_filter = os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER", _DEFAULT_EXEMPLAR_FILTER)
    if exemplar_filter not in _EXEMPLAR_FILTERS:
        refuse_or_warn(
            f"OTEL_METRICS_EXEMPLAR_FILTER must be one of {', '.join(_EXEMPLAR_FILTERS)}, "
            f"got {exemplar_filter!r}",
            refuse=refuse,
        )
        exemplar_filter = _DEFAULT_EXEMPLAR_FILTER
    return interval, exemplar_filter


def _setting(value: Any, argument: str, variable: str) -> tuple[Any, str]:
    """``(value, argument)`` when the argument is given (not None), else the environment
    variable's value (None if unset or empty) and its name: what an error about it must say."""
    if value is not None:
        return value, argument
    return os.environ.get(variable) or None, variable


def _validate_ledger_uri(ledger_uri: Any) -> None:
    """Parse the ledger URI (argument or ``MULTIRUN_LEDGER_URI``) without connecting to it."""
    ledger_uri, name = _setting(ledger_uri, "ledger_uri", "MULTIRUN_LEDGER_URI")
    if ledger_uri is None:
        return
    if not isinstance(ledger_uri, str) or not ledger_uri:
        raise ConfigurationError(f"{name} must be a redis:// URL, got {ledger_uri!r}")
    from multirun.enforcement.redis_ledger import RedisLedgerFactory

    try:
        RedisLedgerFactory.from_uri(ledger_uri).close()
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None


UNPRICED_MODES = ("flag", "fail")


def _unpriced_mode(value: str | None) -> str:
    """``flag`` or ``fail``: from the argument, else ``MULTIRUN_UNPRICED``, else ``flag``."""
    name = "unpriced"
    if value is None:
        value, name = os.environ.get("MULTIRUN_UNPRICED") or "flag", "MULTIRUN_UNPRICED"
    if value not in UNPRICED_MODES:
        raise ConfigurationError(f"{name} must be one of {', '.join(UNPRICED_MODES)}, got {value!r}")
    return value


def _otlp_exporter(
    signal: str,
    protocol: str,
    protocol_argument: str | None,
    endpoint: str | None,
    headers: Mapping[str, str] | None,
    *,
    refuse: bool = True,
) -> Any:
    """The SDK's OTLP exporter of ``signal`` over ``protocol``, to ``endpoint`` (None: the one
    its variables name).

    The gRPC exporters raise for a timeout or compression variable the HTTP ones log and
    ignore: that is refused, or with ``refuse=False`` logged, and None returned.
    """
    module, name = _OTLP_EXPORTERS[signal, protocol]
    timeout = _otlp_timeout_instead(signal, protocol, refuse=refuse)
    try:
        exporter_class = getattr(importlib.import_module(module), name)
        if protocol == "grpc":  # it takes the host and port of the URL; metadata keys are lower case
            metadata = {key.lower(): value for key, value in headers.items()} if headers else None
            return exporter_class(endpoint=endpoint, headers=metadata, timeout=timeout)
        if endpoint is None:
            return exporter_class(headers=dict(headers) if headers else None, timeout=timeout)
        url = endpoint.rstrip("/")
        if not url.endswith(_PATHS[signal]):
            url += _PATHS[signal]
        return exporter_class(endpoint=url, headers=dict(headers or {}), timeout=timeout)
    except Exception as exc:
        setting = _protocol_setting(protocol_argument, signal)[1]
        transport = "gRPC" if protocol == "grpc" else "HTTP"
        kind = "span" if signal == "traces" else "metric"
        refuse_or_warn(
            f"{setting} is {protocol!r}, and the {transport} {kind} exporter cannot be set up from the "
            f"OTEL_EXPORTER_OTLP_* variables: {exc}",
            refuse=refuse,
            instead=_NOT_EXPORTED[signal],
        )
        return None


_SDK_HEADERS_LOGGER = logging.getLogger("opentelemetry.util.re")  # where parse_env_headers logs
_HEADER_SEPARATOR = re.compile(r"[ \t]*,[ \t]*")  # the one parse_env_headers splits at


@contextmanager
def _header_variables_checked(
    protocols: Mapping[str, str], headers: Mapping[str, str] | None
) -> Iterator[None]:
    """Around making the OTLP exporters of ``protocols`` (signal: protocol): one warning for each
    headers variable they read that has a part the SDK's parser drops, naming the variable and
    the part (but its value: it may be a token), in place of the SDK's own line per part and
    exporter that names neither the variable nor what is wrong. The exporters go on without it.
    """
    variables = {_header_variable(signal, proto, headers) for signal, proto in protocols.items()}
    warned = False
    for variable in sorted(v for v in variables if v is not None):
        parts = [part for part in _HEADER_SEPARATOR.split(os.environ[variable].strip()) if part]
        with _sdk_header_lines_dropped():
            bad = [i for i, part in enumerate(parts, 1) if not parse_env_headers(part, liberal=True)]
        if bad:
            warned = True
            which = ", ".join(f"part {i} of {len(parts)} ({_without_value(parts[i - 1])!r})" for i in bad)
            refuse_or_warn(
                f"{variable} must be comma-separated name=value headers with URL-encoded values "
                f"(no space in a name, no '\"', ';', '\\' or non-ASCII character); "
                f"{which} {'is not one' if len(bad) == 1 else 'are not'}",
                refuse=False,
                instead="it is not sent, the other headers are",
            )
    with _sdk_header_lines_dropped() if warned else nullcontext():
        yield


def _header_variable(signal: str, protocol: str, headers: Mapping[str, str] | None) -> str | None:
    """The headers variable the SDK's OTLP exporter of ``signal`` reads, None if it reads none."""
    if protocol == "grpc" and headers:
        return None  # the metadata given replaces the variables' (the HTTP exporters merge them)
    for variable in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        if os.environ.get(variable):  # as the SDK reads them: a blank per-signal one hides the other
            return variable
    return None


def _without_value(part: str) -> str:
    """``part`` up to the first ``=``, ``:`` or space: a header's name, not its value."""
    cut = re.search(r"[=:\s]", part)
    if cut is not None:
        return part[: cut.start() + 1] + "..."
    return part if len(part) <= 4 else part[:4] + "..."  # a bare value: a token, maybe


@contextmanager
def _sdk_header_lines_dropped() -> Iterator[None]:
    """No line from the SDK's header parser while in the block (warned about already)."""

    def drop(record: logging.LogRecord) -> bool:
        return False

    _SDK_HEADERS_LOGGER.addFilter(drop)
    try:
        yield
    finally:
        _SDK_HEADERS_LOGGER.removeFilter(drop)


_OTLP_DEFAULT_TIMEOUT = 10.0  # seconds, the SDK's OTLP exporters' default


def _otlp_timeout_instead(signal: str, protocol: str, *, refuse: bool) -> float | None:
    """The timeout to give the OTLP exporter of ``signal`` instead of its variable's, None to let
    it read ``OTEL_EXPORTER_OTLP_<SIGNAL>_TIMEOUT``, else ``OTEL_EXPORTER_OTLP_TIMEOUT``.

    A value that is no number > 0 and finite is refused, or logged and treated as not set, as
    the spec says: the next variable applies, else the default. The exporters took it, and
    either failed every export with a line per batch that named no variable, or used their
    default over a valid ``OTEL_EXPORTER_OTLP_TIMEOUT``. The gRPC ones raise for a per-signal
    value that is no number whatever they are given: left to them (``_otlp_exporter`` says so).
    """
    per_signal = f"OTEL_EXPORTER_OTLP_{signal.upper()}_TIMEOUT"
    bad: list[tuple[str, str]] = []
    instead = None
    for variable in (per_signal, "OTEL_EXPORTER_OTLP_TIMEOUT"):
        raw = os.environ.get(variable, "").strip()
        if not raw:
            continue
        seconds = _seconds(raw)
        if seconds is not None and 0 < seconds < math.inf:
            instead = (variable, seconds)
            break
        if protocol == "grpc" and variable == per_signal and seconds is None:
            return None
        bad.append((variable, raw))
    if not bad:
        return None
    default = f"the exporter's default of {_OTLP_DEFAULT_TIMEOUT:g} s"
    used = f"{instead[0]}'s {instead[1]:g} s" if instead else default
    for variable, raw in bad:
        problem = f"{variable} must be a number of seconds > 0, got {raw!r}"
        refuse_or_warn(problem, refuse=refuse, instead=f"{used} is used")
    return instead[1] if instead else _OTLP_DEFAULT_TIMEOUT


def _seconds(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


_owned_meter_provider: Any = None
_owned_meter: Any = None  # multirun's meter of _owned_meter_provider
_METRIC_EXPORT_INTERVAL = 10_000  # milliseconds, the SDK's default


def _resource(service_name: str | None) -> Resource:
    """The resource of providers created here: ``service.name`` from the argument, else
    ``OTEL_SERVICE_NAME``, else ``OTEL_RESOURCE_ATTRIBUTES``, else ``multirun``; and always a
    ``service.instance.id`` (``OTEL_RESOURCE_ATTRIBUTES``'s, else this process's)."""
    if service_name:
        resource = Resource.create({SERVICE_NAME: service_name})
    else:
        resource = Resource.create({})  # OTEL_SERVICE_NAME, else service.name of OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "multirun"}))
    if resource.attributes.get(SERVICE_INSTANCE_ID):
        return resource  # the user's, or the SDK's (1.45 sets one)
    # older SDKs set none: the processes of a service were one Prometheus series, each one's
    # counts taken for a reset of the others'
    return resource.merge(Resource({SERVICE_INSTANCE_ID: _instance_id()}))


_own_instance: tuple[int, str] | None = None  # (pid, id) of this process, for SDKs with no detector


def _instance_id() -> str:
    """This process's ``service.instance.id``: that of the SDK's ServiceInstanceIdResourceDetector
    (opentelemetry-python PR #5259: a UUID per process, a new one in a forked child), else a
    random UUID made here the same way (SDKs before it)."""
    global _own_instance
    try:
        from opentelemetry.sdk.resources import (  # type: ignore[attr-defined,unused-ignore]
            ServiceInstanceIdResourceDetector,
        )
    except ImportError:
        if _own_instance is None or _own_instance[0] != os.getpid():
            _own_instance = (os.getpid(), str(uuid.uuid4()))
        return _own_instance[1]
    return str(ServiceInstanceIdResourceDetector().detect().attributes[SERVICE_INSTANCE_ID])


def _new_instance_after_fork() -> None:
    """In a forked child: the providers ``init`` made send the child's telemetry as that of a
    new instance (``service.instance.id``), and its metrics count from zero.

    The child has a copy of the parent's MeterProvider: with the parent's instance id, the two
    processes wrote the same series in turn (each switch a counter reset to ``rate()``); with a
    new one (SDK 1.45 gives one) the child's counters still started from the parent's counts,
    which a sum over instances then counted twice. The application's own providers are left
    as they are. This runs before the SDK's own hooks for these providers (registered later):
    it takes none of their locks.
    """
    meters, tracers = _owned_meter_provider, _owned_provider
    if meters is None and tracers is None:
        return  # every fork runs this, a subprocess's with a preexec_fn too
    try:
        instance = Resource({SERVICE_INSTANCE_ID: _instance_id()})
        if meters is not None and not getattr(meters, "_shutdown", False):
            _start_metrics_afresh(meters, instance)
            if _owned_meter is not None:
                forget_counts(_owned_meter)
            DROPPED.clear()
        if tracers is not None and not hasattr(tracers, "_handle_fork"):
            # older SDKs (1.45 does it itself): the spans a worker starts carry its instance id,
            # as its metrics do
            tracers._resource = tracers._resource.merge(instance)
            client = _configured
            if client is not None and client.tracer_provider is tracers:
                client.tracer.resource = tracers._resource  # type: ignore[attr-defined]
    except Exception:  # telemetry must not fail the program
        _logger.warning(
            "multirun: the metrics of this forked process could not be made those of a new "
            "instance: they may count the parent's again",
            exc_info=True,
        )


def _start_metrics_afresh(provider: Any, instance: Resource) -> None:
    """Give ``provider`` (an SDK MeterProvider, in a forked child) the resource ``instance``
    updates and empty storage: what it had aggregated was the parent's."""
    from opentelemetry.sdk.metrics._internal.metric_reader_storage import MetricReaderStorage

    config = provider._sdk_config  # the storages read its resource at every collection
    config.resource = config.resource.merge(instance)
    consumer = provider._measurement_consumer
    consumer._lock = threading.Lock()  # a thread the child lost may have held it (a collection)
    consumer._reader_storages = {
        reader: MetricReaderStorage(
            config, reader._instrument_class_temporality, reader._instrument_class_aggregation
        )
        for reader in consumer._reader_storages
    }


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_instance_after_fork)


def _ensure_meter_provider(
    exporters: Sequence[Any], service_name: str | None, settings: tuple[int, str]
) -> None:
    """Create the MeterProvider that exports to the ``exporters`` (metric exporters, read every
    export interval, or MetricReaders such as prometheus's, taken as they are, as the SDK's
    set-up does), with the ``settings`` of ``_metric_settings``.

    Without an endpoint or ``OTEL_METRICS_EXPORTER``, metrics go wherever the application's
    MeterProvider sends them (nowhere if it has none): the embedded default keeps traces only.
    """
    global _owned_meter_provider, _owned_meter
    from opentelemetry.sdk.metrics import (
        AlwaysOffExemplarFilter,
        AlwaysOnExemplarFilter,
        MeterProvider,
        TraceBasedExemplarFilter,
    )
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    interval, exemplar_filter = settings
    readers = [
        exporter
        if isinstance(exporter, MetricReader)
        else PeriodicExportingMetricReader(GuardedMetricExporter(exporter), export_interval_millis=interval)
        for exporter in exporters
    ]
    filters = {
        "trace_based": TraceBasedExemplarFilter(),
        "always_on": AlwaysOnExemplarFilter(),
        "always_off": AlwaysOffExemplarFilter(),
    }
    _owned_meter_provider = MeterProvider(
        metric_readers=readers,
        resource=_resource(service_name),
        exemplar_filter=filters[exemplar_filter],  # so the SDK does not read the variable again
        shutdown_on_exit=False,
    )
    _owned_meter = _owned_meter_provider.get_meter(TRACER_NAME, _VERSION)  # the one the client gets
    _register_worker_exit_hook()
    otel_metrics.set_meter_provider(_owned_meter_provider)


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _is_unset(provider: trace.TracerProvider) -> bool:
    """Whether no TracerProvider was set (the API's proxy): a NoOpTracerProvider is one the
    application set, to turn tracing off."""
    if _sdk_disabled():
        return False
    return isinstance(provider, trace.ProxyTracerProvider)


def _checkpoint_timeout(timeout: float | None, *, refuse: bool = True) -> float:
    """``init``'s checkpoint_timeout, else ``MULTIRUN_CHECKPOINT_TIMEOUT``, else the default.

    A bad variable is refused by name, or with ``refuse=False`` logged and left at its default.
    """
    if timeout is not None:
        return timeout  # checked by the CheckpointStore, which names it
    raw = os.environ.get("MULTIRUN_CHECKPOINT_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_PUT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < MAX_PUT_TIMEOUT:
        refuse_or_warn(
            f"MULTIRUN_CHECKPOINT_TIMEOUT must be a number of seconds > 0, got {raw!r}", refuse=refuse
        )
        return DEFAULT_PUT_TIMEOUT
    return seconds


def checkpoint_max_bytes_setting(max_bytes: int | None, *, refuse: bool = True) -> int:
    """``init``'s checkpoint_max_bytes, else ``MULTIRUN_CHECKPOINT_MAX_BYTES``, else 1 GiB.

    A bad argument is refused; a bad variable is refused by name, or with ``refuse=False``
    logged and left at its default.
    """
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigurationError(f"checkpoint_max_bytes must be an int >= 1 (bytes), got {max_bytes!r}")
        return max_bytes
    return env_int(MAX_BYTES_ENV, DEFAULT_MAX_BLOB_BYTES, minimum=1, refuse=refuse)


def _checkpoint_store(
    store: CheckpointStore | BlobExporter | str | None,
    serializer: str | None = None,
    hmac_key: bytes | str | None = None,
    timeout: float = DEFAULT_PUT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    *,
    store_setting: str = "checkpoint_store",
) -> CheckpointStore:
    """The checkpoint store of ``store``; ``store_setting`` names where a URI came from
    (``checkpoint_uri``, ``MULTIRUN_CHECKPOINT_URI``), for the error that refuses it."""
    if store is None:
        store = "memory://default"
    if isinstance(store, CheckpointStore):
        return store
    if not isinstance(store, (str, BlobExporter)):
        raise ConfigurationError(
            f"checkpoint_store must be a CheckpointStore, a BlobExporter or a URI, got {store!r}"
        )
    serializer, serializer_setting = _setting(
        serializer or None, "checkpoint_serializer", "MULTIRUN_CHECKPOINT_SERIALIZER"
    )
    serializer = serializer or "json"
    # resolved once, here: the serializer and the store are given the key itself
    hmac_key = resolve_hmac_key(hmac_key, name="checkpoint_hmac_key")
    try:
        get_serializer(serializer, hmac_key=hmac_key)  # refused here, where its source is known
    except ConfigurationError as exc:
        raise ConfigurationError(f"{serializer_setting}: {exc}") from None
    if isinstance(store, str):
        try:
            store = exporter_from_uri(store)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{store_setting}: {exc}") from None
    return CheckpointStore(
        store, serializer=serializer, hmac_key=hmac_key, put_timeout=timeout, max_blob_bytes=max_bytes
    )


def _install_usage_processor(
    provider: trace.TracerProvider, processor: UsageSpanProcessor | None = None
) -> UsageSpanProcessor | None:
    """The usage processor of ``provider`` (``processor``, else a new one), added once, whoever
    created the provider; its sampler then records the model calls it leaves out inside runs, for
    the processor to charge.

    None if the provider takes no span processors (not an SDK provider).
    """
    provider = sdk_provider(provider) or provider
    installed: UsageSpanProcessor | None = getattr(provider, "_multirun_usage_processor", None)
    add = getattr(provider, "add_span_processor", None)
    if installed is not None or add is None:
        return installed
    processor = processor or UsageSpanProcessor()
    add(processor)
    provider._multirun_usage_processor = processor  # type: ignore[attr-defined]
    record_model_calls_in_runs(provider)
    return processor


# The most attributes multirun sets on one span (a step with every usage field and an error),
# and the length of a run id: past the limits, the SDK drops the oldest attributes (the run's id
# and name first) and cuts longer values (the run id too).
FEWEST_SPAN_ATTRIBUTES = 32
SHORTEST_SPAN_VALUES = 32


def _warn_small_span_limits(provider: trace.TracerProvider) -> None:
    """One warning, per provider, for span limits too small for multirun's spans."""
    provider = sdk_provider(provider) or provider
    limits = getattr(provider, "_span_limits", None)
    if limits is None or getattr(provider, "_multirun_limits_checked", False):
        return
    provider._multirun_limits_checked = True  # type: ignore[attr-defined]
    count, length = limits.max_span_attributes, limits.max_span_attribute_length
    if isinstance(count, int) and count < FEWEST_SPAN_ATTRIBUTES:
        _logger.warning(
            "multirun: the span attribute count limit is %d%s: multirun's spans carry up to %d attributes, "
            "and past the limit the SDK drops the oldest, the run's id and name first (runs go missing "
            "from `multirun runs` and from backends); raise it to %d at least",
            count,
            _limit_variable(count, "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT"),
            FEWEST_SPAN_ATTRIBUTES,
            FEWEST_SPAN_ATTRIBUTES,
        )
    if isinstance(length, int) and length < SHORTEST_SPAN_VALUES:
        _logger.warning(
            "multirun: the span attribute value length limit is %d%s: the SDK cuts longer values, run ids "
            "(%d characters) and statuses among them; raise it to %d at least, or leave it unset",
            length,
            _limit_variable(length, "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", _VALUE_LENGTH_LIMIT),
            SHORTEST_SPAN_VALUES,
            SHORTEST_SPAN_VALUES,
        )


def _limit_variable(limit: int, *variables: str) -> str:
    """`` (NAME is N)`` for the first of ``variables`` that is set to ``limit``, or nothing (the
    application's provider was given its limits in code)."""
    for name in variables:
        raw = os.environ.get(name, "").strip()
        if raw:
            return f" ({name} is {raw})" if raw == str(limit) else ""
    return ""


_threads_instrumented = False


def _propagate_context_to_threads() -> None:
    """Carry the OpenTelemetry context (and so the run) into threads and thread pools."""
    global _threads_instrumented
    if _threads_instrumented:
        return
    _threads_instrumented = True
    try:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        instrumentor = ThreadingInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
        wrapt.wrap_function_wrapper(ThreadPoolExecutor, "submit", _submit_as_a_lane)
    except Exception:  # pragma: no cover - a broken optional dependency must not break runs
        _logger.warning("multirun: cannot propagate context into threads", exc_info=True)


def _submit_as_a_lane(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``ThreadPoolExecutor.submit`` in a run: the task's steps are a replay lane of their own
    (``ReplayLog.task_started``), not one with the tasks its worker ran before it."""
    run = otel_context.get_current().get(RUN_KEY)
    if run is None or not run.records_replay or not args or not callable(args[0]):  # type: ignore[attr-defined]
        return wrapped(*args, **kwargs)
    fn = args[0]

    def task(*task_args: Any, **task_kwargs: Any) -> Any:
        log = run.replay_log  # type: ignore[attr-defined]
        mark = log.task_started()
        try:
            return fn(*task_args, **task_kwargs)
        finally:
            log.task_ended(mark)

    return wrapped(task, *args[1:], **kwargs)
