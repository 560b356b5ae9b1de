"""Shared fixtures: a client whose spans land in an in-memory exporter."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import multirun
from multirun import client as client_module
from multirun.clock import Clock
from otlp_collectors import Collector, HungCollector, never_answering_collector, serving_collector

# A test run started in the background (nohup, a CI runner without a terminal) inherits SIGINT
# ignored, and so would every program it starts: the tests of Ctrl-C need Python's usual
# handler, here and (a handled signal is reset to the default across exec) in the children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _in_a_scratch_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests run in a scratch folder: a test that leaves the package its defaults (traces
    and checkpoints under ``./.multirun``) writes there, not into the checkout."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def _global_provider_left_as_found() -> Iterator[None]:
    """A test that lets ``init`` install the global TracerProvider puts the old one back (the
    ``global_otel`` fixture): left behind, it records the spans of the SDKs that trace through
    the global provider (anthropic's own) in every later test, and its processors act on them."""
    from opentelemetry import trace

    before = trace._TRACER_PROVIDER, client_module._owned_provider
    yield
    after = trace._TRACER_PROVIDER, client_module._owned_provider
    assert after == before, "the test left a global TracerProvider behind: use the global_otel fixture"


class FakeClock(Clock):
    """A clock that only moves when told to; sleeps advance it instantly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        # concurrent sleepers would move time for each other; tests of concurrency turn this off
        self.advance_on_sleep = True

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.advance_on_sleep:
            self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.advance_on_sleep:
            self.now += seconds


@dataclass
class Traced:
    """A configured client and the spans it exported."""

    client: multirun.MultiRunClient
    exporter: InMemorySpanExporter
    provider: TracerProvider
    clock: FakeClock = field(default_factory=FakeClock)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan | None:
        if span.parent is None:
            return None
        for candidate in self.spans():
            if candidate.context.span_id == span.parent.span_id:
                return candidate
        return None


@pytest.fixture
def traced(tmp_path) -> Iterator[Traced]:  # type: ignore[no-untyped-def]
    """multirun configured with an in-memory span exporter, a fake clock and a file blob store."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = FakeClock()
    client = multirun.init(
        tracer_provider=provider,
        checkpoint_uri=str(tmp_path / "blobs"),
    )
    client.clock = clock
    yield Traced(client=client, exporter=exporter, provider=provider, clock=clock)
    client_module._configured = None
    provider.shutdown()


@pytest.fixture
def global_otel(monkeypatch) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Let init() install the global provider, and put the old globals back afterwards."""
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(client_module, "_owned_provider", None)
    monkeypatch.setattr(client_module, "_configured", None)
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_PYTHON_TRACER_PROVIDER",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_SDK_DISABLED",
        "MULTIRUN_DIR",
        "MULTIRUN_CHECKPOINT_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    yield
    owned = client_module._owned_provider
    if owned is not None:
        owned.shutdown()


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """``unreadable(folder)``: mode 000, its listing refused as it is to a user who is not its
    owner (root reads it anyway, so ``os.scandir`` refuses it here too); restored afterwards."""
    folders: list[Path] = []
    scandir = os.scandir

    def refusing(path: Any = ".") -> Any:
        if not isinstance(path, int) and os.path.realpath(path) in map(os.path.realpath, folders):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    def make(folder: Path) -> None:
        folders.append(folder)
        folder.chmod(0)

    monkeypatch.setattr(os, "scandir", refusing)
    yield make
    for folder in folders:
        folder.chmod(0o755)


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """``read_only(folder)``: nothing in ``folder`` can be created or removed, by the kernel's word. Root
    ignores a folder's mode, so there the folder is made immutable (``chattr +i``) instead."""
    folders: list[Path] = []

    def make(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only here (no chattr, or a file system without it)")
        folders.append(folder)

    yield make
    for folder in folders:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A local OTLP/HTTP endpoint that keeps the names of the spans it receives."""
    with serving_collector() as server:
        yield server


@pytest.fixture
def hung_collector() -> Iterator[HungCollector]:
    """An OTLP endpoint that accepts connections and never answers, and says when one came."""
    with never_answering_collector() as collector:
        yield collector


@pytest.fixture
def silent_collector(hung_collector: HungCollector) -> str:
    """The URL of an OTLP endpoint that accepts connections and never answers (a hung collector)."""
    return hung_collector.url


@pytest.fixture
def metric_reader(traced: Traced) -> Iterator[InMemoryMetricReader]:
    """multirun initialized on the test's tracer provider and clock, its metrics read in memory."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    multirun.init(tracer_provider=traced.provider, meter_provider=provider).clock = traced.clock
    yield reader
    provider.shutdown()
