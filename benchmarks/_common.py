"""Shared pieces of the benchmarks: a counting exporter, the tracer provider, the report header.

The scripts in this folder are run as files (``python benchmarks/bench_overhead.py``),
so this module is imported by its bare name.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import multirun
from multirun import client as client_module

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class CountingExporter(SpanExporter):
    """A no-op exporter that only counts what it is given, by span name.

    It also remembers how many attributes the first span of each name carried,
    so a report can show that every variant really produced the spans it claims,
    and the longest pause between two exports (a starved export thread shows there).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_name: Counter[str] = Counter()
        self.attribute_counts: dict[str, int] = {}
        self.attribute_keys: dict[str, tuple[str, ...]] = {}
        self.batches = 0
        self._last_export: float | None = None
        self.longest_pause = 0.0  # seconds between two consecutive export calls

    def reset_pause(self) -> None:
        """Forget the pauses seen so far (call it where a new scenario starts)."""
        with self._lock:
            self._last_export = None
            self.longest_pause = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        now = time.perf_counter()
        with self._lock:
            if self._last_export is not None:
                self.longest_pause = max(self.longest_pause, now - self._last_export)
            self._last_export = now
            self.batches += 1
            for span in spans:
                self.by_name[span.name] += 1
                if span.name not in self.attribute_counts:
                    self.attribute_counts[span.name] = len(span.attributes or {})
                    self.attribute_keys[span.name] = tuple(span.attributes or ())
        return SpanExportResult.SUCCESS

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_name.values())

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def make_provider(
    max_queue_size: int = 2048, max_export_batch_size: int = 512
) -> tuple[TracerProvider, CountingExporter]:
    """An SDK TracerProvider with one BatchSpanProcessor that exports to a CountingExporter."""
    exporter = CountingExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=max_export_batch_size,
        )
    )
    return provider, exporter


def init_multirun(provider: TracerProvider) -> multirun.MultiRunClient:
    """Configure multirun on ``provider``, as tests/conftest.py does (memory checkpoint store).

    ``multirun.init`` adds its UsageSpanProcessor to ``provider``, so every span of
    that provider, multirun's or not, goes through it too.
    """
    client_module._configured = None
    return multirun.init(tracer_provider=provider, checkpoint_uri="memory://bench")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> str:
    """Logical CPUs usable by this process, e.g. ``2``."""
    try:
        return str(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return str(os.cpu_count())


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``0.52 / 0.61 / 0.40``."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment_header(title: str, argv: Sequence[str] | None = None) -> list[str]:
    """Markdown lines naming the date, interpreter, CPU, library versions and command."""
    args = list(sys.argv if argv is None else argv)
    command = ".venv/bin/python " + shlex.join(_relative_script(args))
    return [
        f"# {title}",
        "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- Python: {platform.python_implementation()} {platform.python_version()} "
        f"({platform.system()} {platform.machine()})",
        f"- CPU: {cpu_model()} ({cpu_count()} logical CPUs, shared machine; load average "
        f"{_LOAD_AT_START} at the start, {load_average()} at the end)",
        f"- opentelemetry-sdk {package_version('opentelemetry-sdk')}, "
        f"multirun-otel {package_version('multirun-otel')}",
        f"- Source: {_SOURCE_AT_START} (read when the benchmark started)",
        f"- Command: `{command}`",
        "",
    ]


def source_state() -> str:
    """The commit of the project and whether src/ has uncommitted changes (with their digest)."""
    import hashlib
    import subprocess

    root = RESULTS_DIR.parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        diff = git("diff", "HEAD", "--", "src")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    if not diff:
        return f"commit {commit}, src/ clean"
    digest = hashlib.sha1(diff.encode()).hexdigest()[:10]
    return f"commit {commit} + uncommitted changes in src/ (diff sha1 {digest})"


def _relative_script(args: list[str]) -> list[str]:
    """argv with the script path written relative to the project root when possible."""
    if not args:
        return args
    root = RESULTS_DIR.parent.parent
    try:
        script = str(Path(args[0]).resolve().relative_to(root))
    except ValueError:
        script = args[0]
    return [script, *args[1:]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` is one letter per column, ``l`` or ``r``."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> Path:
    """Write ``results/<name>`` atomically and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# Read once, when a benchmark imports this module (right after it imported multirun):
# the code that runs is the code of that moment, even if src/ changes meanwhile.
_SOURCE_AT_START = source_state()
_LOAD_AT_START = load_average()
