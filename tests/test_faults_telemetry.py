"""Telemetry faults (issue 8, cases 1-8): an exporter, a blob store or the ledger failing never
breaks, stalls or bloats the agent.

The faults are real: exporters of this module that raise or hang (the fault
itself), a real OTLP exporter against a local HTTP collector with the real
requests and urllib3 instrumentations active, a real fork, a real
redis-server stopped or frozen mid-run, a real S3 server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

import multirun
from child_processes import environment_without_settings
from multirun import client as client_module
from multirun import run, step
from multirun.checkpoints.exporters import BlobExporter, MemoryBlobExporter
from multirun.checkpoints.store import CheckpointStore
from multirun.context import get_current_run_context
from multirun.enforcement.redis_ledger import RETRY_SECONDS, LedgerUnavailableError
from multirun.models import Budget, StepKind
from multirun.telemetry.export import DROPPED_SPANS, ExportProcessor
from multirun.telemetry.local_files import read_spans
from needed import required
from otlp_collectors import Collector, HungCollector  # OTLP endpoints (fixtures of conftest)
from test_bad_input import agent_program  # the same four-span agent run

if TYPE_CHECKING:
    from redis_server import RedisServer
    from s3_server import S3Server

pytest_plugins = ["redis_server", "s3_server"]

T = TypeVar("T")
GENEROUS = 30.0  # seconds: a bound far above any normal duration, far below the faults' hangs


def finishes(action: Callable[[], T], within: float = GENEROUS) -> T:
    """``action()`` run in a thread; fails the test if it has not returned ``within`` seconds."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", action()))
        except BaseException as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still blocked after {within:g}s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# exporters that are the fault


class RaisingExporter(SpanExporter):
    """Raises on every export while ``failing``; counts the spans it received otherwise."""

    def __init__(self) -> None:
        self.failing = True
        self.calls = 0
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        if self.failing:
            raise ConnectionError("collector is down")
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class HangingExporter(SpanExporter):
    """Each export blocks until ``release`` is set (a minute at most), then succeeds."""

    def __init__(self, hang_seconds: float = 60.0) -> None:
        self.hang_seconds = hang_seconds
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(self.hang_seconds)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


@dataclass
class Pipeline:
    client: multirun.MultiRunClient
    provider: TracerProvider
    reader: InMemoryMetricReader

    def dropped(self) -> dict[str, int]:
        """The ``multirun.spans.dropped`` counter as exported, by error.type."""
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == DROPPED_SPANS:
                        return {
                            str(p.attributes["error.type"]): int(p.value)  # type: ignore[index]
                            for p in metric.data.data_points
                        }
        raise AssertionError(f"{DROPPED_SPANS} was not exported")


@pytest.fixture
def pipeline() -> Iterator[Callable[..., Pipeline]]:
    """multirun configured on a fresh provider, exporting to the test's exporter through init()."""
    made: list[Pipeline] = []

    def make(exporter: SpanExporter | None = None, **options: Any) -> Pipeline:
        reader = InMemoryMetricReader()
        provider = TracerProvider()
        client = multirun.init(
            tracer_provider=provider,
            span_exporter=exporter,
            meter_provider=MeterProvider(metric_readers=[reader]),
            **options,
        )
        made.append(Pipeline(client, provider, reader))
        return made[-1]

    yield make
    client_module._configured = None


SPANS_PER_RUN = 4  # agent_program (of test_bad_input): run, agent, an LLM step, a tool step


# ---------------------------------------------------------------------------
# 1. an exporter that raises on every call


def test_1_an_exporter_that_always_raises_costs_one_warning_and_never_the_result(
    pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = RaisingExporter()
    p = pipeline(exporter)
    main = agent_program()
    before = p.dropped().get("export_failed", 0)

    with caplog.at_level(logging.DEBUG):
        for _ in range(5):
            assert main("abc") == "ABCcba"
            p.client.force_flush(10_000)  # one export per run

    assert exporter.calls >= 5
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) == 1, [r.getMessage() for r in noisy]
    message = noisy[0].getMessage()
    assert noisy[0].levelno == logging.WARNING
    assert "RaisingExporter" in message and "ConnectionError" in message and DROPPED_SPANS in message
    assert p.dropped()["export_failed"] - before == 5 * SPANS_PER_RUN


def test_1_a_new_outage_after_a_recovery_is_warned_about_again(
    pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = RaisingExporter()
    p = pipeline(exporter)
    main = agent_program()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        for failing in (True, True, False, False, True, True):
            exporter.failing = failing
            main("x")
            p.client.force_flush(10_000)
    assert exporter.exported == 2 * SPANS_PER_RUN
    assert [r.levelno for r in caplog.records if r.name.startswith("multirun")] == [logging.WARNING] * 2


def test_1_a_different_failure_during_an_outage_gets_a_line_of_its_own_once(
    pipeline: Callable[..., Pipeline], collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    # the exporter's first line of an outage hid every other: a collector busy (503), then
    # refusing the credentials (401) or the batch size (413), showed only the 503
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    p = pipeline(OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", timeout=1))
    main = agent_program()
    logger = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    with caplog.at_level(logging.WARNING):
        for status in (503, 503, 401, 401, 413, 503, 401):
            collector.status = status
            assert main("x") == "Xx"
            p.client.force_flush(10_000)
    lines = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(lines) == 3, lines
    assert "code: 401" in lines[1] and "code: 413" in lines[2], lines
    collector.status = 200  # the outage is over: the next one is logged again
    main("x")
    p.client.force_flush(10_000)
    collector.status = 401
    main("x")
    p.client.force_flush(10_000)
    assert sum(r.name == logger for r in caplog.records) == 4


def test_1_an_export_whose_deadline_passed_while_waiting_to_retry_costs_no_line_of_its_own() -> None:
    # a loaded machine wakes the exporter after its deadline: the SDK then sends with a timeout
    # of 0, requests refuses it with a ValueError, and that gave the outage a fifth line (CI, 3
    # suites on 2 cores). These are the SDK's own lines, in its words (common/http.py).
    from multirun.telemetry.export import OutageLog

    exporter_log = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    outage = OutageLog()
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(logging.WARNING)
    exporter_log.addHandler(handler)
    try:
        with outage.exporting():
            retried = "Transient error %s encountered while exporting %s batch, retrying in %.2fs."
            exporter_log.warning(retried, "Service Unavailable", "span", 1.0)
            timeout_zero = ValueError(
                "Attempted to set connect timeout to 0.0, but the timeout cannot be set to a value less "
                "than or equal to 0."
            )
            exporter_log.error("Failed to export %s batch code: %s, reason: %s", "span", None, timeout_zero)
            refused = ValueError("Invalid header value b'secret\\n'")  # a failure of its own: logged
            exporter_log.error("Failed to export %s batch code: %s, reason: %s", "span", None, refused)
    finally:
        exporter_log.removeHandler(handler)
    assert len(seen) == 2, seen
    assert seen[0].startswith("Transient error") and "Invalid header" in seen[1], seen


OUTAGE_PROGRAM = """
import logging, sys, time
import multirun

logging.basicConfig(format="%(name)s: %(message)s")
multirun.init(endpoint=sys.argv[1], local_dir=sys.argv[2])


@multirun.run
def job() -> int:
    return 1


for line in sys.stdin:  # run jobs for that many seconds, then say so on both streams
    end = time.monotonic() + float(line)
    while time.monotonic() < end:
        job()
        time.sleep(0.02)
    multirun.get_client().force_flush(5000)
    print("-- phase --", file=sys.stderr, flush=True)
    print("phase", flush=True)
"""


def test_1_a_collector_refusing_every_export_costs_a_few_lines_per_outage_not_one_per_batch(
    collector: Collector, tmp_path: Path
) -> None:
    # the SDK's OTLP exporters log each failed batch and each retry: a collector down for an
    # hour filled the service's log with thousands of lines
    env = environment_without_settings()
    env |= {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "100"}
    env["OTEL_EXPORTER_OTLP_TIMEOUT"] = "1"  # each export gives up within a second
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a flood of lines must not block the program
    with log.open("w") as stderr:
        program = subprocess.Popen(
            [sys.executable, "-c", OUTAGE_PROGRAM, collector.url, str(tmp_path / "mr")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        assert program.stdin is not None and program.stdout is not None
        for status, seconds in ((503, 3), (200, 1), (500, 2)):  # an outage, a recovery, another outage
            collector.status = status
            program.stdin.write(f"{seconds}\n")
            program.stdin.flush()
            assert program.stdout.readline() == "phase\n"
        program.communicate(timeout=60)
    err = log.read_text()
    assert program.returncode == 0, err
    first, recovery, second = (phase.strip().splitlines() for phase in err.split("-- phase --")[:3])
    # per signal (spans, metrics): the exporter's first reason, and multirun's line saying so
    assert 2 <= len(first) <= 4, first
    assert any("span exporter OTLPSpanExporter" in line for line in first), first
    assert any("metric exporter OTLPMetricExporter" in line for line in first), first
    assert len(recovery) <= 4, recovery  # exports that ran into the end of the outage
    assert 2 <= len(second) <= 4, second  # a new outage is logged again
    assert any("span exporter OTLPSpanExporter" in line for line in second), second


# ---------------------------------------------------------------------------
# 2. an exporter that hangs for a minute


def test_2_a_hung_exporter_blocks_no_span_end_and_flush_and_shutdown_keep_their_timeouts(
    pipeline: Callable[..., Pipeline],
) -> None:
    exporter = HangingExporter()
    p = pipeline()
    processor = ExportProcessor(exporter, max_queue_size=64, schedule_delay_millis=10)
    p.provider.add_span_processor(processor)
    main = agent_program()
    try:
        # 50 runs of 4 spans while the first export hangs: no span end waits for it
        results = finishes(lambda: [main("abc") for _ in range(50)])
        assert results == ["ABCcba"] * 50
        assert exporter.entered.wait(GENEROUS)  # the worker is stuck inside export
        assert finishes(lambda: processor.force_flush(timeout_millis=100)) is False
        assert finishes(lambda: p.client.force_flush(timeout_millis=100)) is False
        finishes(lambda: processor.shutdown(timeout_millis=100))
        assert finishes(lambda: main("after")) == "AFTERretfa"  # spans ending after shutdown
        assert processor.dropped.snapshot()["queue_full"] > 0
        assert processor.dropped.snapshot()["shutdown"] == SPANS_PER_RUN
    finally:
        exporter.release.set()


def test_2_flush_returns_true_once_a_slow_exporter_catches_up(pipeline: Callable[..., Pipeline]) -> None:
    exporter = HangingExporter()
    p = pipeline()
    processor = ExportProcessor(exporter)
    p.provider.add_span_processor(processor)
    main = agent_program()
    main("abc")
    try:
        assert finishes(lambda: processor.force_flush(timeout_millis=50)) is False
        exporter.release.set()
        assert finishes(lambda: processor.force_flush(timeout_millis=int(GENEROUS * 1000))) is True
        assert exporter.exported == SPANS_PER_RUN
    finally:
        exporter.release.set()


EXIT_PROGRAM = """
import logging, sys
import multirun

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
multirun.init(endpoint=sys.argv[1], local_dir=sys.argv[2])


@multirun.run
def job() -> int:
    return 1


job()
print("ended", flush=True)
"""


# the application set its own provider after importing multirun: the provider's exit handler,
# registered after multirun's, runs first and shuts multirun's span pipeline down
EXIT_PROGRAM_ON_APPLICATIONS_PROVIDER = EXIT_PROGRAM.replace(
    "multirun.init(",
    "from opentelemetry import trace\n"
    "from opentelemetry.sdk.trace import TracerProvider\n"
    "trace.set_tracer_provider(TracerProvider())\n"
    "multirun.init(",
)


def exit_of(
    endpoint: str, tmp_path: Path, program: str = EXIT_PROGRAM, **variables: str
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``program`` against ``endpoint``: (seconds its exit took, the finished process).
    The exit only: on a loaded machine starting the interpreter and importing took seconds."""
    env = environment_without_settings() | variables
    exiting = subprocess.Popen(
        [sys.executable, "-c", program, endpoint, str(tmp_path / "mr")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, exiting.kill)  # a child hung before its line ends the read
    watchdog.start()
    try:
        assert exiting.stdout is not None
        ended = exiting.stdout.readline()
        started = time.monotonic()
        out, err = exiting.communicate(timeout=120)
        took = time.monotonic() - started
    finally:
        watchdog.cancel()
        exiting.kill()
    assert ended == "ended\n", err
    return took, subprocess.CompletedProcess(exiting.args, exiting.returncode, ended + out, err)


def test_2_exit_behind_a_collector_that_never_answers_is_bounded_and_says_spans_were_lost(
    silent_collector: str, tmp_path: Path
) -> None:
    # the SDK's exit handlers waited for the exporters' 10 s timeouts, one after the other
    took, done = exit_of(silent_collector, tmp_path)
    assert done.returncode == 0, done.stderr
    assert took < 8, f"exit took {took:.1f} s: {done.stderr}"
    [lost] = [line for line in done.stderr.splitlines() if "not delivered" in line]
    assert "1 span" in lost, done.stderr


def test_2_exit_behind_a_grpc_collector_that_never_answers_is_bounded_too(
    silent_collector: str, tmp_path: Path
) -> None:
    # the gRPC exporters wait out their deadline (10 s) and retry: exit keeps the same bound
    required("opentelemetry.exporter.otlp.proto.grpc")
    took, done = exit_of(silent_collector, tmp_path, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert done.returncode == 0, done.stderr
    assert took < 8, f"exit took {took:.1f} s: {done.stderr}"
    [lost] = [line for line in done.stderr.splitlines() if "not delivered" in line]
    assert "1 span" in lost and "OTLPSpanExporter" in lost, done.stderr


def test_2_exit_on_the_applications_provider_waits_one_timeout_for_spans_and_metrics(
    silent_collector: str, tmp_path: Path
) -> None:
    # the provider's exit handler waited 4 s for the spans, then multirun's 4 s more for the metrics
    took, done = exit_of(
        silent_collector, tmp_path, EXIT_PROGRAM_ON_APPLICATIONS_PROVIDER, OTEL_EXPORTER_OTLP_TIMEOUT="4"
    )
    assert done.returncode == 0, done.stderr
    [lost] = [line for line in done.stderr.splitlines() if "not delivered" in line]
    assert "1 span" in lost, done.stderr
    assert took < 6.5, f"exit took {took:.1f} s: {done.stderr}"


def test_2_exit_waits_as_long_as_the_otlp_timeout_the_user_set(silent_collector: str, tmp_path: Path) -> None:
    # one export may take that long: the user said so
    _, done = exit_of(silent_collector, tmp_path, OTEL_EXPORTER_OTLP_TIMEOUT="1")
    assert done.returncode == 0, done.stderr
    [lost] = [line for line in done.stderr.splitlines() if "not delivered" in line]
    assert "within the 1.0 s shutdown timeout" in lost


@pytest.mark.skipif(os.name == "nt", reason="Ctrl-C as SIGINT")
def test_2_ctrl_c_while_exit_waits_for_a_collector_that_never_answers_is_one_line(
    hung_collector: HungCollector, tmp_path: Path
) -> None:
    # the user stops the wait: multirun's exit handler printed a KeyboardInterrupt traceback
    env = environment_without_settings()
    exiting = subprocess.Popen(
        [sys.executable, "-c", EXIT_PROGRAM, hung_collector.url, str(tmp_path / "mr")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, exiting.kill)  # a child hung before its line ends the read
    watchdog.start()
    try:
        assert exiting.stdout is not None
        assert exiting.stdout.readline() == "ended\n"
        # its exit is waiting for the collector once it connected (a fixed 0.5 s could pass on a
        # loaded machine before the exit began)
        assert hung_collector.connected.wait(GENEROUS)
        exiting.send_signal(signal.SIGINT)
        _, err = exiting.communicate(timeout=60)
    finally:
        watchdog.cancel()
        exiting.kill()
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        "multirun.client: multirun: interrupted at exit: the spans and metrics not sent yet are lost"
    ]


def test_2_exit_still_delivers_the_last_spans_to_a_collector_that_answers(
    collector: Collector, tmp_path: Path
) -> None:
    _, done = exit_of(collector.url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert collector.span_names == ["invoke_workflow job"]
    assert "not delivered" not in done.stderr


def test_2_init_again_does_not_wait_for_the_hung_exporter_it_replaces(
    pipeline: Callable[..., Pipeline],
) -> None:
    hung = HangingExporter()
    p = pipeline(hung)
    main = agent_program()
    main("q")
    p.client.force_flush(10)  # the export starts, and hangs
    assert hung.entered.wait(GENEROUS)
    fresh = InMemorySpanExporter()
    try:
        # it waited out the old pipeline's 30 s shutdown timeout
        client = finishes(lambda: multirun.init(tracer_provider=p.provider, span_exporter=fresh), within=10)
        main("q")
        # exported within the schedule delay, or a flush: not within a flush of 100 ms on a
        # loaded machine (and a longer flush waits out the hung pipeline too)
        deadline = time.monotonic() + GENEROUS
        while len(fresh.get_finished_spans()) < SPANS_PER_RUN and time.monotonic() < deadline:
            client.force_flush(100)
        assert len(fresh.get_finished_spans()) == SPANS_PER_RUN
    finally:
        hung.release.set()
    assert client.force_flush(int(GENEROUS * 1000))  # and waits for the old pipeline's last spans
    assert hung.exported == SPANS_PER_RUN
    p.provider.shutdown()


# ---------------------------------------------------------------------------
# 3. a stalled exporter while a million spans end


class CountedSpan(ReadableSpan):
    """A finished span that counts how many of its kind are alive."""

    _lock = threading.RLock()  # reentrant: the collector may free one while another is counted
    live = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with CountedSpan._lock:
            CountedSpan.live += 1

    def __del__(self) -> None:
        with CountedSpan._lock:
            CountedSpan.live -= 1


def test_3_a_million_spans_against_a_stalled_exporter_keep_memory_bounded_and_count_every_drop(
    pipeline: Callable[..., Pipeline],
) -> None:
    produced = 1_000_000
    queue = 2048
    exporter = HangingExporter()
    p = pipeline()  # for the metric reader: the counter is the process's
    processor = ExportProcessor(exporter, max_queue_size=queue, max_export_batch_size=512)
    before = p.dropped()
    baseline = CountedSpan.live
    flags = TraceFlags(TraceFlags.SAMPLED)
    resource = Resource({})
    try:
        for n in range(1, produced + 1):
            span = CountedSpan(name="s", context=SpanContext(1, n, False, flags), resource=resource)
            processor.on_end(span)
        del span
        held = CountedSpan.live - baseline
        # the queue, plus the batch stuck in the exporter: nothing else is kept
        assert held <= queue + 512
        dropped = p.dropped()["queue_full"] - before["queue_full"]
        assert dropped == processor.dropped.snapshot()["queue_full"]
        assert dropped >= produced - queue - 512
        exporter.release.set()
        assert finishes(lambda: processor.force_flush(timeout_millis=int(GENEROUS * 1000)))
        assert exporter.exported + dropped == produced  # every span exported or counted
    finally:
        exporter.release.set()
        processor.shutdown()


def test_3_runs_against_a_stalled_exporter_complete_and_their_drops_are_in_the_metric(
    pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "32")
    exporter = HangingExporter()
    p = pipeline(exporter)
    main = agent_program()
    before = p.dropped()["queue_full"]
    try:
        assert finishes(lambda: [main("q") for _ in range(500)]) == ["Qq"] * 500
        assert p.dropped()["queue_full"] - before >= 500 * SPANS_PER_RUN - 32 - 32
    finally:
        exporter.release.set()
        p.provider.shutdown()


# ---------------------------------------------------------------------------
# 4. shutdown twice, spans after shutdown


def test_4_shutdown_twice_then_more_runs_raise_nothing(
    pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    p = pipeline(exporter)
    main = agent_program()
    assert main("a") == "Aa"
    p.provider.shutdown()
    p.provider.shutdown()
    with caplog.at_level(logging.WARNING):
        assert main("b") == "Bb"
        assert main("c") == "Cc"
        p.client.force_flush(1_000)
        p.provider.shutdown()
    assert len(exporter.get_finished_spans()) == SPANS_PER_RUN  # the first run only
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_4_the_embedded_default_survives_shutdown_twice(global_otel: None, tmp_path: Path) -> None:
    client = multirun.init_local(tmp_path / "mr")
    main = agent_program()
    assert main("a") == "Aa"
    provider = client.tracer_provider
    provider.shutdown()  # type: ignore[attr-defined]
    provider.shutdown()  # type: ignore[attr-defined]
    assert main("b") == "Bb"
    client.force_flush(1_000)
    names = [s.name for s in read_spans(tmp_path / "mr" / "traces")]
    assert names.count("invoke_workflow main") == 1


# ---------------------------------------------------------------------------
# 5. os.fork() after init

FORK_PROGRAM = r"""
import json, os, signal, sys, threading
import multirun
from multirun import run, step
from multirun.telemetry.local_files import LocalFileSpanExporter

folder = sys.argv[1]
files = LocalFileSpanExporter(folder)
parent_pid = os.getpid()
stalled = threading.Event()

class StalledInParent(LocalFileSpanExporter):
    # the parent's collector is stuck: its queue is full when the process forks
    def export(self, spans):
        if os.getpid() == parent_pid:
            stalled.set()
            threading.Event().wait(60)
        return files.export(spans)

client = multirun.init(span_exporter=StalledInParent(folder), checkpoint_uri="memory://fork")

@step
def double(x):
    return 2 * x

@run(name="job")
def job(x):
    return double(x)

for n in range(20):  # 40 spans: the queue of 8 is full, and the worker is stuck in export
    job(n)
assert stalled.wait(30)

# and some thread holds the file exporter's lock at the moment of the fork
held, release = threading.Event(), threading.Event()
def hold():
    with files._lock:
        held.set()
        release.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()

pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a child that hangs must not outlive the test
    ok = job(21) == 42 and client.force_flush(20_000)
    os._exit(0 if ok else 3)
release.set()
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": pid, "code": os.waitstatus_to_exitcode(status)}))
sys.stdout.flush()
os._exit(0)  # the parent's exporter is still stuck: do not wait for it at exit
"""


def test_5_a_forked_child_traces_and_exports_through_its_own_worker(tmp_path: Path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(FORK_PROGRAM)
    env = environment_without_settings()
    env["OTEL_BSP_MAX_QUEUE_SIZE"] = "8"
    env["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = "8"
    env["OTEL_BSP_SCHEDULE_DELAY"] = "10"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "traces")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["code"] == 0, done.stderr
    (child_file,) = (tmp_path / "traces").glob(f"*-{found['child']}.jsonl")
    only_child = tmp_path / "child"
    only_child.mkdir()
    (only_child / child_file.name).write_bytes(child_file.read_bytes())
    names = sorted(s.name for s in read_spans(only_child))
    assert names == ["invoke_workflow job", "step double"]  # the child's own run, exported by the child


FORK_WHILE_COUNTING = r"""
import json, os, signal, sys, threading
import multirun
from multirun import report_usage, run, step

client = multirun.init_local(sys.argv[1])

@step(kind="llm_call")
def ask(prompt):
    report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)
    return prompt.upper()

@run(name="job")
def job(prompt):
    return ask(prompt)

job("warm up")
# another thread is counting a step (run, decision, tokens) at the moment of the fork
metrics = client.metrics
tallies = [metrics._steps, metrics._decisions, metrics._tokens, metrics._runs, metrics._runs_active]
held, release = threading.Event(), threading.Event()
def counting():
    for tally in tallies:
        tally.lock.acquire()
    held.set()
    release.wait()
    for tally in tallies:
        tally.lock.release()
threading.Thread(target=counting, daemon=True).start()
held.wait()

pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a child that hangs must not outlive the test
    os._exit(0 if job("hi") == "HI" and client.metrics._steps.total() == 2 else 3)
release.set()
_, status = os.waitpid(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status)}))
"""


def test_5_a_child_forked_while_a_thread_counts_a_step_runs_its_own_steps(tmp_path: Path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(FORK_WHILE_COUNTING)
    env = environment_without_settings()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "mr")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # -14: SIGALRM, the child hung on a lock the counting thread held when the process forked
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0}, done.stderr


WORKERS_PROGRAM = r"""
import multiprocessing, os, sys
import multirun
from multirun import run, step

@step
def double(x):
    return 2 * x

@run(name="job")
def job(x):
    return double(x)

if __name__ == "__main__":
    folder, method = sys.argv[1], sys.argv[2]
    multirun.init_local(folder)
    os.environ["MULTIRUN_DIR"] = folder  # a forkserver worker sets up its own defaults
    workers = multiprocessing.get_context(method)
    worker = workers.Process(target=job, args=(1,))
    worker.start()
    worker.join()
    with workers.Pool(2) as pool:
        assert pool.map(job, range(4)) == [0, 2, 4, 6]
        pool.close()
        pool.join()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_5_the_runs_of_multiprocessing_workers_are_exported_when_they_exit(
    tmp_path: Path, method: str
) -> None:
    # fork and forkserver workers end with os._exit, which runs no atexit handler; the
    # spans of their runs, still in the batch queue (5 s), were all lost
    script = tmp_path / "workers.py"
    script.write_text(WORKERS_PROGRAM)
    env = environment_without_settings()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "mr"), method],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    names = [s.name for s in read_spans(tmp_path / "mr" / "traces")]
    assert names.count("invoke_workflow job") == 5  # one run by the Process, four by the Pool
    assert names.count("step double") == 5


CONNECTION_PROGRAM = r"""
import multiprocessing, sys
from opentelemetry import metrics
import multirun
from multirun import run, step

@step
def double(x):
    return 2 * x

@run(name="job")
def job(x):
    return double(x)

if __name__ == "__main__":
    client = multirun.init(endpoint=sys.argv[1], checkpoint_uri="memory://fork")
    job(1)  # the parent's exporters now hold a keep-alive connection each
    assert client.force_flush(10_000) and metrics.get_meter_provider().force_flush(10_000)
    worker = multiprocessing.get_context("fork").Process(target=job, args=(2,))
    worker.start()
    worker.join()
    assert worker.exitcode == 0, worker.exitcode
    job(3)
    assert client.force_flush(10_000) and metrics.get_meter_provider().force_flush(10_000)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_5_a_forked_worker_exports_over_connections_of_its_own(collector: Collector, tmp_path: Path) -> None:
    # the worker inherited the parent's pooled keep-alive connections and exported over them:
    # two processes writing to one TCP stream can interleave requests and read each other's answers
    script = tmp_path / "connections.py"
    script.write_text(CONNECTION_PROGRAM)
    env = environment_without_settings()
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, str(script), collector.url], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    parent = collector.clients[0][2]
    for path in ("/v1/traces", "/v1/metrics"):
        ports = [(port, instance == parent) for p, port, instance in collector.clients if p == path]
        parents = [port for port, of_parent in ports if of_parent]
        workers = {port for port, of_parent in ports if not of_parent}
        assert workers, (path, ports)  # the worker exported at its exit
        assert parents[0] == parents[1], (path, ports)  # after the fork, over the parent's connection
        assert not set(parents) & workers, (path, ports)


# ---------------------------------------------------------------------------
# 6. the exporter's own HTTP calls are not traced


@pytest.fixture
def http_instrumented() -> Iterator[Callable[[TracerProvider | None], None]]:
    """Turns on the real requests and urllib3 instrumentations, for the whole process."""
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor

    def instrument(provider: TracerProvider | None = None) -> None:
        RequestsInstrumentor().instrument(tracer_provider=provider)
        URLLib3Instrumentor().instrument(tracer_provider=provider)

    yield instrument
    RequestsInstrumentor().uninstrument()
    URLLib3Instrumentor().uninstrument()


def test_6_the_otlp_exporters_own_http_calls_are_not_traced(
    collector: Collector, http_instrumented: Callable[[TracerProvider | None], None], global_otel: None
) -> None:
    import requests

    seen = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(seen))  # every span that ends, whatever its fate
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    http_instrumented(provider)
    client = multirun.init(endpoint=collector.url, checkpoint_uri="memory://otlp", metrics=False)

    @step(kind=StepKind.TOOL_CALL)
    def fetch() -> int:
        return requests.get(collector.url + "/app", timeout=10).status_code  # the app's own call

    @run
    def job() -> int:
        return fetch()

    for _ in range(3):
        assert job() == 501  # GET is not handled: the app's call went out
        assert client.force_flush(10_000)
    http_spans = [s.name for s in seen.get_finished_spans() if s.name.startswith(("GET", "POST"))]
    assert http_spans == ["GET"] * 3  # the app's calls are traced; the exports are not
    assert collector.span_names.count("invoke_workflow job") == 3
    assert "POST" not in collector.span_names
    provider.shutdown()


def test_6_a_lone_surrogate_in_a_span_costs_its_batch_nothing_on_the_way_to_a_collector(
    collector: Collector, global_otel: None
) -> None:
    """An undecodable file name (``\\udcff``) in an error message: the batch still reaches the collector."""
    client = multirun.init(endpoint=collector.url, checkpoint_uri="memory://otlp", metrics=False)

    @step(kind=StepKind.TOOL_CALL)
    def read_report(name: str) -> str:
        raise FileNotFoundError(f"no such file: {name}")

    @step(kind=StepKind.TOOL_CALL)
    def fallback() -> str:
        return "summary"

    @run
    def job() -> str:
        try:
            read_report("report-\udcff.txt")
        except Exception:
            return fallback()
        return "never"

    assert job() == "summary"
    assert client.force_flush(10_000)
    assert sorted(collector.span_names) == [
        "execute_tool fallback",
        "execute_tool read_report",
        "invoke_workflow job",
    ]


def test_6_checkpoints_to_s3_are_not_traced_either(
    s3_server: S3Server,
    http_instrumented: Callable[[TracerProvider | None], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    seen = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(seen))
    http_instrumented(provider)
    multirun.init(tracer_provider=provider, checkpoint_uri=s3_server.uri(f"faults-{uuid.uuid4().hex[:8]}"))
    try:

        @step(checkpoint=True)
        def work() -> int:
            s3_server.client().list_buckets()  # the app's own S3 call
            return 7

        @run
        def job() -> str | None:
            work()
            return get_current_run_context().run.latest_checkpoint_id

        assert job() is not None  # the checkpoint went to S3 over urllib3
        names = sorted(s.name for s in seen.get_finished_spans())
        assert names == ["GET", "invoke_workflow job", "step work"]  # the app's call only
    finally:
        client_module._configured = None
        provider.shutdown()


# ---------------------------------------------------------------------------
# 7. blob store down or full during a checkpoint


class FullStore:
    """A blob store that is full for its first ``failures`` puts (ENOSPC), then has room again."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.inner = MemoryBlobExporter("full")

    def put(self, key: str, data: bytes) -> str:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return self.inner.put(key, data)

    def get(self, uri: str) -> bytes:
        return self.inner.get(uri)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_7_a_full_store_is_a_warning_the_run_goes_on_and_the_next_checkpoint_is_written(
    traced: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = FullStore(failures=1)
    assert isinstance(store, BlobExporter)
    traced.client.checkpoints = CheckpointStore(store)
    calls: list[str] = []

    @step(checkpoint=True)
    def stage(n: int) -> int:
        calls.append(f"stage {n}")
        return n

    @run
    def job() -> list[str]:
        stage(1)  # its checkpoint hits the full store
        stage(2)
        stage(3)
        return [c.name for c in get_current_run_context().run.checkpoints]

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert job() == ["after_stage", "after_stage"]
    assert calls == ["stage 1", "stage 2", "stage 3"]
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("multirun")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert len(store.inner.list("checkpoints/")) == 2


def test_7_an_unreachable_s3_store_is_a_warning_within_its_timeouts(
    traced: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    multirun.init(
        tracer_provider=traced.provider, checkpoint_uri=f"s3://bkt/p?endpoint_url={closed}&region=x"
    )

    @step(checkpoint=True)
    def stage() -> str:
        return "done"

    @run
    def job() -> str:
        return stage()

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert finishes(job) == "done"
    assert any("checkpoint 'after_stage'" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------
# 8. the Redis ledger becomes unreachable mid-run


@pytest.fixture
def ledger_client(traced: Any) -> Callable[[str], multirun.MultiRunClient]:
    def make(uri: str) -> multirun.MultiRunClient:
        return multirun.init(tracer_provider=traced.provider, ledger_uri=uri)

    return make


def test_8_redis_stopped_mid_run_fails_closed_before_the_next_step_runs(
    fresh_redis_server: RedisServer, ledger_client: Callable[[str], Any]
) -> None:
    ledger_client(fresh_redis_server.url)
    ran: list[int] = []

    @step
    def work(n: int) -> int:
        ran.append(n)
        return n

    @run(budget=Budget(max_steps=100))
    def job() -> None:
        work(1)
        fresh_redis_server.stop()
        work(2)  # no budget decision can be made: it must not run

    with pytest.raises(LedgerUnavailableError, match="fail_open") as info:
        finishes(job)
    assert ran == [1]
    assert fresh_redis_server.url in str(info.value)


def test_8_a_frozen_redis_fails_closed_within_the_timeout(
    fresh_redis_server: RedisServer, ledger_client: Callable[[str], Any]
) -> None:
    ledger_client(fresh_redis_server.url + "?timeout=0.3")
    ran: list[int] = []

    @step
    def work(n: int) -> int:
        ran.append(n)
        return n

    @run
    def job() -> None:
        work(1)
        fresh_redis_server.freeze()
        work(2)

    try:
        with pytest.raises(LedgerUnavailableError):
            finishes(job, within=10)
    finally:
        fresh_redis_server.thaw()
    assert ran == [1]


def test_8_usage_charged_while_the_ledger_is_down_never_lets_another_step_run(
    fresh_redis_server: RedisServer, ledger_client: Callable[[str], Any]
) -> None:
    """The paid call's answer is kept; the next step fails closed before calling the model."""
    ledger_client(fresh_redis_server.url)
    calls: list[str] = []

    @step(kind=StepKind.LLM_CALL, retry=3, retry_delay=0.0)
    def ask() -> str:
        calls.append("model called")  # a paid call: retrying it while the ledger is down spends blind
        fresh_redis_server.stop()
        multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)  # goes with the next check
        return "answer"

    @run
    def job() -> str:
        answer = ask()
        ask()  # no budget decision can be made: refused, never retried
        return answer

    with pytest.raises(LedgerUnavailableError):
        finishes(job)
    assert calls == ["model called"]


def test_8_a_sub_run_started_while_redis_is_down_fails_closed_naming_it_and_is_not_made_later(
    fresh_redis_server: RedisServer, ledger_client: Callable[[str], Any]
) -> None:
    # the ledger that could not be made stayed among the client's (the error held it): close()
    # made the run in Redis once it answered, a run the program was told could not be made
    client = ledger_client(fresh_redis_server.url)
    ran: list[str] = []

    @run(budget=Budget(max_steps=5))
    def inner() -> None:
        ran.append("inner")

    @run(budget=Budget(max_tokens=1_000))
    def outer() -> None:
        _spending_run()()
        fresh_redis_server.down()
        inner()

    with pytest.raises(LedgerUnavailableError) as info:
        finishes(outer)
    assert ran == []
    assert f"run {info.value.run_id!r} could not be created" in str(info.value)
    assert info.value.__traceback__ is not None  # the program keeps the error
    fresh_redis_server.up()
    assert client.close() is True
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    try:
        assert raw.exists(f"multirun:ledger:{info.value.run_id}") == 0
    finally:
        raw.close()


def test_8_fail_open_goes_on_counting_in_process(
    fresh_redis_server: RedisServer, ledger_client: Callable[[str], Any]
) -> None:
    ledger_client(fresh_redis_server.url + "?fail_open=true")
    ran: list[int] = []

    @step
    def work(n: int) -> int:
        ran.append(n)
        return n

    @run(budget=Budget(max_steps=3))
    def job() -> int:
        work(1)
        fresh_redis_server.stop()
        work(2)
        work(3)
        return get_current_run_context().ledger.steps

    assert finishes(job) == 3
    assert ran == [1, 2, 3]


LEDGER_EXIT_PROGRAM = """
import logging, sys
from opentelemetry.sdk.trace import TracerProvider
import multirun

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
multirun.init(tracer_provider=TracerProvider(), ledger_uri=sys.argv[1], metrics=False)


@multirun.step
def ask() -> None:
    multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=20)


@multirun.run
def job() -> str:
    ask()
    return multirun.context.get_current_run_context().run.id


print(job(), flush=True)
sys.stdin.readline()  # Redis is started again, or frozen, meanwhile
"""

# Two clients dropped without close() while Redis is still down, and collected: one init replaced
# (a notebook's setup cell run again; its send in the background fails), one the program built
# itself for a run of its own. What each counted is sent at exit all the same.
LEDGER_DROPPED_PROGRAM = LEDGER_EXIT_PROGRAM.replace(
    "print(job(), flush=True)",
    """

def spend_with_a_client_of_its_own() -> str:
    own = multirun.MultiRunClient(tracer_provider=TracerProvider(), ledger_uri=sys.argv[1], metrics=False)
    ledger = own.new_ledger(None, None, uuid.uuid4().hex)
    ledger.begin_step()
    ledger.charge(120, 0)
    return ledger.run_id


replaced = job()
multirun.init(tracer_provider=TracerProvider(), metrics=False)
for thread in threading.enumerate():
    if thread.name == "multirun-ledger-send":
        thread.join()
own = spend_with_a_client_of_its_own()
gc.collect()
print(replaced, own, flush=True)""",
).replace("import logging, sys", "import gc, logging, sys, threading, uuid")


def exit_after_an_outage(
    server: RedisServer,
    ledger_uri: str,
    between: Callable[[], None],
    program: str = LEDGER_EXIT_PROGRAM,
    **variables: str,
) -> tuple[str, float, subprocess.CompletedProcess[str]]:
    """Run ``program`` while ``server`` is down, call ``between`` once its run is over, then let
    it exit: (its run's id, seconds its exit took, the finished process)."""
    env = environment_without_settings() | variables
    server.down()
    child = subprocess.Popen(
        [sys.executable, "-c", program, ledger_uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        between()
        started = time.monotonic()
        out, err = child.communicate("\n", timeout=60)
        took = time.monotonic() - started
    finally:
        child.kill()
    assert run_id, err
    return run_id, took, subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_8_usage_counted_during_an_outage_reaches_redis_when_the_process_exits(
    fresh_redis_server: RedisServer,
) -> None:
    # Redis came back less than RETRY_SECONDS before exit: nothing tried it again, and the next
    # process sharing the ledger saw the run spend nothing
    url = fresh_redis_server.url
    run_id, took, done = exit_after_an_outage(
        fresh_redis_server, url + "?fail_open=true", fresh_redis_server.up
    )
    assert done.returncode == 0, done.stderr
    assert took < RETRY_SECONDS, f"exit took {took:.1f} s: {done.stderr}"
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        assert raw.hmget(f"multirun:ledger:{run_id}", "tokens", "steps") == ["120", "1"], done.stderr
    finally:
        raw.close()


def test_8_usage_of_clients_dropped_during_an_outage_reaches_redis_when_the_process_exits(
    fresh_redis_server: RedisServer,
) -> None:
    # the exit handler holds the clients' ledgers weakly: a ledger with unsent usage keeps its
    # client, and so the client's ledgers, alive until exit (see MultiRunClient.__init__)
    url = fresh_redis_server.url
    run_ids, _, done = exit_after_an_outage(
        fresh_redis_server, url + "?fail_open=true", fresh_redis_server.up, LEDGER_DROPPED_PROGRAM
    )
    assert done.returncode == 0, done.stderr
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        for run_id in run_ids.split():
            assert raw.hmget(f"multirun:ledger:{run_id}", "tokens", "steps") == ["120", "1"], done.stderr
    finally:
        raw.close()


# A run with a sub-run, both with budgets, made and ended during an outage; the sub-run is the last
# to count into the top run (its step, charged by hand)
LEDGER_RUNS_MADE_IN_OUTAGE_PROGRAM = """
import gc, logging, sys
from opentelemetry.sdk.trace import TracerProvider
import multirun
from multirun.context import get_current_run_context
from multirun.models import Budget, StepKind

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
multirun.init(tracer_provider=TracerProvider(), ledger_uri=sys.argv[1], metrics=False)


@multirun.step
def ask() -> None:
    multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=20)


@multirun.run(budget=Budget(max_tokens=5_000, max_steps=50))
def inner() -> str:
    with get_current_run_context().start_agent("researcher") as agent:
        agent.start_step("call_llm", kind=StepKind.LLM_CALL).complete("ok", tokens_used=30, cost_usd=0.5)
    return get_current_run_context().run.id


@multirun.run(budget=Budget(max_tokens=9_000, max_cost_usd=3.0))
def outer() -> str:
    ask()
    return get_current_run_context().run.id + " " + inner()


print(outer(), flush=True)
gc.collect()  # as a program that goes on working does: the runs' contexts and ledgers are gone
sys.stdin.readline()  # Redis is started again meanwhile
"""


def test_8_runs_made_and_ended_during_an_outage_reach_redis_with_their_limits_when_the_process_exits(
    fresh_redis_server: RedisServer,
) -> None:
    # the top run's ledger was dropped when it ended, and the sub-run's, the last to count into
    # it, sent its usage without its limits: the run's record in Redis had no budget nor start
    url = fresh_redis_server.url
    run_ids, _, done = exit_after_an_outage(
        fresh_redis_server, url + "?fail_open=true", fresh_redis_server.up, LEDGER_RUNS_MADE_IN_OUTAGE_PROGRAM
    )
    assert done.returncode == 0, done.stderr
    outer_id, inner_id = run_ids.split()
    raw = redis.Redis.from_url(url, decode_responses=True)
    fields = ("tokens", "cost_units", "steps", "sub_agents", "max_tokens", "max_cost_usd", "max_steps")
    try:
        outer, inner = (raw.hgetall(f"multirun:ledger:{run_id}") for run_id in (outer_id, inner_id))
    finally:
        raw.close()
    assert [outer.get(name) for name in fields] == ["150", "500027000", "2", "1", "9000", "3.0", None]
    assert [inner.get(name) for name in fields] == ["30", "500000000", "1", "1", "5000", None, "50"]
    assert "started_us" in outer and "started_us" in inner, done.stderr


def test_8_exit_behind_a_frozen_ledger_waits_the_shutdown_timeout_at_most_and_says_so(
    fresh_redis_server: RedisServer,
) -> None:
    # its socket timeout (10 s) is longer than the shutdown timeout (1 s here): exit does not wait it out
    uri = fresh_redis_server.url + "?fail_open=true&timeout=10"

    def freeze() -> None:
        fresh_redis_server.up()
        fresh_redis_server.freeze()

    try:
        _, took, done = exit_after_an_outage(fresh_redis_server, uri, freeze, OTEL_EXPORTER_OTLP_TIMEOUT="1")
    finally:
        fresh_redis_server.thaw()
    assert done.returncode == 0, done.stderr
    assert took < 6, f"exit took {took:.1f} s: {done.stderr}"  # 1 s and the interpreter's exit, not 10 s
    [lost] = [line for line in done.stderr.splitlines() if "did not answer" in line]
    assert fresh_redis_server.url in lost, done.stderr


def _spending_run() -> Callable[[], str]:
    """A @run of one step that reports 120 tokens; it returns its run id."""

    @step
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=20)

    @run
    def job() -> str:
        ask()
        return get_current_run_context().run.id

    return job


def test_8_usage_counted_during_an_outage_reaches_redis_when_init_replaces_the_client(
    fresh_redis_server: RedisServer, traced: Any
) -> None:
    # a notebook's setup cell run again: the first client's unsent usage was dropped with it
    multirun.init(tracer_provider=traced.provider, ledger_uri=fresh_redis_server.url + "?fail_open=true")

    job = _spending_run()
    fresh_redis_server.down()
    run_id = finishes(job)
    fresh_redis_server.up()
    multirun.init(tracer_provider=traced.provider)
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    key = f"multirun:ledger:{run_id}"
    deadline = time.monotonic() + GENEROUS  # sent in the background: init does not wait for Redis
    try:
        while raw.hget(key, "tokens") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert raw.hmget(key, "tokens", "steps") == ["120", "1"]
    finally:
        raw.close()


def test_8_close_sends_what_the_ledger_counted_during_an_outage_and_is_bounded_while_redis_hangs(
    fresh_redis_server: RedisServer, traced: Any, caplog: pytest.LogCaptureFixture
) -> None:
    uri = fresh_redis_server.url + "?fail_open=true&timeout=2"
    client = multirun.init(tracer_provider=traced.provider, ledger_uri=uri)

    job = _spending_run()
    fresh_redis_server.down()
    run_id = finishes(job)
    fresh_redis_server.up()
    assert client.close() is True  # a worker about to leave with os._exit: no exit handler runs
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    try:
        assert raw.hmget(f"multirun:ledger:{run_id}", "tokens", "steps") == ["120", "1"]
    finally:
        raw.close()

    fresh_redis_server.freeze()
    try:
        later = finishes(job)  # the client goes on after close: it fails open after one timeout
        with caplog.at_level(logging.WARNING, logger="multirun"):
            started = time.monotonic()
            closed = client.close(timeout_millis=300)
            took = time.monotonic() - started
    finally:
        fresh_redis_server.thaw()
    assert later != run_id
    assert closed is False
    assert took < 1.5
    assert "did not answer within 0.3 s" in caplog.text


@pytest.mark.parametrize("mode", ["", "?fail_open=true"])
def test_8_close_says_false_while_redis_is_down_and_true_once_it_took_the_usage(
    fresh_redis_server: RedisServer, mode: str
) -> None:
    # a worker about to leave with os._exit checks close(): it said True while Redis refused
    # connections, though the usage was not in it (only a Redis that hung made it False)
    client = multirun.MultiRunClient(
        tracer_provider=TracerProvider(), ledger_uri=fresh_redis_server.url + mode, metrics=False
    )
    ledger = client.new_ledger(None, None, uuid.uuid4().hex)
    ledger.begin_step()
    ledger.charge(120, 0)  # sent with the next command for the run: there is none before close
    fresh_redis_server.down()
    assert client.close() is False
    fresh_redis_server.up()
    assert client.close() is True
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    try:
        assert raw.hget(ledger.key, "tokens") == "120"
    finally:
        raw.close()


# ---------------------------------------------------------------------------
# 28. a span processor of the application that raises


class RaisingProcessor(SpanProcessor):
    """The application's own span processor, broken in one of its hooks."""

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.calls = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.calls += 1
        if self.hook == "on_start":
            raise ValueError("the application's processor failed")

    def on_end(self, span: ReadableSpan) -> None:
        if self.hook == "on_end":
            raise ValueError("the application's processor failed")


class WatchingProcessor(SimpleSpanProcessor):
    """The application's export processor that also watches spans start and end."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        super().__init__(exporter)
        self.seen: list[tuple[str, str]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.seen.append(("on_start", span.name))

    def _on_ending(self, span: Any) -> None:
        self.seen.append(("_on_ending", span.name))


def test_a_span_processor_with_hooks_of_its_own_gets_every_one_of_them() -> None:
    # multirun does not call the hooks the SDK's export processors leave empty: a subclass
    # that fills them in is called all the same
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    watching = WatchingProcessor(exporter)
    provider.add_span_processor(watching)
    client_module._configured = None
    multirun.init(tracer_provider=provider, metrics=False)

    @step
    def double(x: int) -> int:
        return 2 * x

    try:
        assert run(name="job")(double)(3) == 6
    finally:
        client_module._configured = None
        provider.shutdown()
    assert watching.seen == [
        ("on_start", "invoke_workflow job"),
        ("on_start", "step double"),
        ("_on_ending", "step double"),
        ("_on_ending", "invoke_workflow job"),
    ]
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["invoke_workflow job", "step double"]


@pytest.mark.parametrize("hook", ["on_start", "on_end"])
@pytest.mark.parametrize("where", ["before the exporter", "added after init"])
def test_28_a_span_processor_that_raises_costs_one_warning_never_the_step_nor_its_spans(
    hook: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    broken = RaisingProcessor(hook)
    if where == "before the exporter":
        provider.add_span_processor(broken)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client_module._configured = None  # no warning of init replacing another test's
    multirun.init(tracer_provider=provider, metrics=False)
    if where == "added after init":
        provider.add_span_processor(broken)

    @step
    def double(x: int) -> int:
        return 2 * x

    @multirun.agent(name="helper")
    def helper(x: int) -> int:
        return double(x) + 1

    @run(name="job", budget=Budget(max_steps=3))
    def job(x: int) -> int:
        agent_ctx = get_current_run_context().default_agent  # type: ignore[union-attr]
        manual = agent_ctx.start_step("by_hand")
        manual.complete(x)
        return helper(x) + double(x)

    try:
        with caplog.at_level(logging.WARNING):
            assert job(3) == 13
            assert job(4) == 17
            # the budget still holds: the fourth step of a run is refused
            with pytest.raises(multirun.BudgetExceededError):
                run(name="over", budget=Budget(max_steps=1))(lambda: double(1) + double(2))()
    finally:
        client_module._configured = None
        provider.shutdown()

    assert broken.calls > 0  # it was called, and raised
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) == 1, [r.getMessage() for r in noisy]
    assert "RaisingProcessor" in noisy[0].getMessage() and hook in noisy[0].getMessage()
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans.values():
        by_name.setdefault(span.name, []).append(span)
    assert len(by_name["invoke_workflow job"]) == 2
    assert len(by_name["invoke_agent helper"]) == 2
    for agent_span in by_name["invoke_agent helper"]:  # nested as the calls were
        assert spans[agent_span.parent.span_id].name == "invoke_workflow job"  # type: ignore[union-attr]
    doubles = by_name["step double"]
    assert len(doubles) == 2 * 2 + 2  # the refused one has a short span too
    parents = sorted(spans[s.parent.span_id].name for s in doubles)  # type: ignore[union-attr]
    assert parents == ["invoke_agent helper"] * 2 + ["invoke_workflow job"] * 2 + ["invoke_workflow over"] * 2
    assert len(by_name["step by_hand"]) == 2
