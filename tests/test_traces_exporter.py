"""``OTEL_TRACES_EXPORTER`` picks where the spans of the provider multirun makes go.

As the SDK's own set-up reads it: ``otlp``, ``console``, ``none``, the name of any exporter
installed under the ``opentelemetry_traces_exporter`` entry points, or several of them
separated by commas. Unset, it is as before: OTLP when an endpoint variable is set, else the
local files. The application's own provider, ``init(span_exporter=...)`` and
``init(endpoint=...)`` are left as the application set them. A program run under
``opentelemetry-instrument`` (no distro) is configured by these variables only: with
``OTEL_TRACES_EXPORTER=console`` its spans went to ``./.multirun/`` without a word.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import multirun
from child_processes import environment_without_settings
from multirun.errors import ConfigurationError
from multirun.telemetry.export import SpanExporters
from multirun.telemetry.local_files import read_spans
from otlp_collectors import Collector  # the OTLP/HTTP collector (fixture: collector)
from test_bad_input import agent_program  # the same four-span agent run
from test_client import warning_of_a_run_without_init

SPANS = ["chat gpt-4o-mini", "invoke_agent worker", "invoke_workflow main", "step tool"]
TESTS = Path(__file__).resolve().parent


def _sent(client: multirun.MultiRunClient) -> None:
    assert agent_program()("q") == "Qq"
    assert client.force_flush(10_000)


def _files(folder: Path) -> list[str]:
    return sorted(s.name for s in read_spans(folder / "traces")) if (folder / "traces").exists() else []


def test_none_exports_no_span_and_writes_no_file(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    _sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert _files(tmp_path / "mr") == []


def test_init_again_with_none_stops_the_export_it_replaces(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    _sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert _files(tmp_path / "mr") == SPANS  # the first run's only


def test_an_exporter_of_the_list_that_raises_costs_the_others_nothing() -> None:
    class Raising(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            raise RuntimeError("collector gone")

    kept = InMemorySpanExporter()
    span = ReadableSpan(name="step tool")
    with pytest.raises(RuntimeError, match="collector gone"):
        SpanExporters([Raising(), kept]).export([span])
    assert list(kept.get_finished_spans()) == [span]


def test_otlp_without_an_endpoint_variable_exports_to_the_default_endpoint(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    multirun.init(local_dir=tmp_path / "mr", metrics=False)
    pipeline = trace.get_tracer_provider()._multirun_export_pipeline  # type: ignore[attr-defined]
    exporter = pipeline._current.exporter
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "http://localhost:4318/v1/traces"


def test_each_exporter_listed_gets_every_span(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    # otlp, and the HTTP exporter by its entry point name: the collector gets each span twice
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp, otlp_proto_http")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/v1/traces")
    _sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert sorted(collector.span_names) == sorted(SPANS * 2)
    assert _files(tmp_path / "mr") == []


def test_init_refuses_an_exporter_that_is_not_installed_naming_the_variable(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,zipkin_json")
    with pytest.raises(ConfigurationError, match=r"OTEL_TRACES_EXPORTER .*'zipkin_json'.*console"):
        multirun.init(local_dir=tmp_path / "mr", metrics=False)


def test_without_init_an_exporter_that_is_not_installed_is_a_warning_and_the_spans_go_to_the_files(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    warning = warning_of_a_run_without_init(tmp_path, monkeypatch, caplog, "OTEL_TRACES_EXPORTER", "jaeger")
    assert "'jaeger'" in warning and warning.endswith("spans go to the local files instead")
    assert multirun.get_client().force_flush()
    assert _files(tmp_path / "mr") == ["invoke_workflow job"]


def test_the_variable_is_not_read_when_the_application_says_where_spans_go(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    exporter = InMemorySpanExporter()
    _sent(multirun.init(span_exporter=exporter, local_dir=tmp_path / "mr", metrics=False))
    assert sorted(s.name for s in exporter.get_finished_spans()) == SPANS
    _sent(multirun.init(endpoint=collector.url, local_dir=tmp_path / "mr", metrics=False))
    assert sorted(collector.span_names) == SPANS


def test_a_program_under_opentelemetry_instrument_prints_its_spans_with_console(tmp_path: Path) -> None:
    """The zero-code path, configured by the variables alone."""
    env = environment_without_settings()
    env.update(MULTIRUN_DIR=str(tmp_path / "mr"), OTEL_TRACES_EXPORTER="console")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "opentelemetry-instrument"),
            sys.executable,
            "-m",
            "clientai_programs.research_agent",
        ],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "OpenTelemetry adoption doubled this year, driven by tooling." in done.stdout.splitlines()
    assert done.stdout.count('"name": "invoke_workflow ResearchAgent"') == 1
    assert done.stdout.count('"name": "chat gpt-4o-mini"') == 7
    assert _files(tmp_path / "mr") == []
