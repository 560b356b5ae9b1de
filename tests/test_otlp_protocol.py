"""OTLP over gRPC or HTTP, as ``init(protocol=...)`` or the standard variables say.

``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` win over
``OTEL_EXPORTER_OTLP_PROTOCOL``; the argument wins over all three; ``http/protobuf`` is the
default. The exporters are the SDK's real ones; the collectors are local servers that keep
what they receive: a gRPC server with the OTLP services of opentelemetry-proto, and the
OTLP/HTTP one of test_faults_telemetry (tests/stack sends to the real Collector over gRPC).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import multirun
from child_processes import environment_without_settings
from multirun import client as client_module
from multirun import run
from multirun.errors import ConfigurationError
from multirun.telemetry.export import DROPPED, EXPORT_FAILED
from multirun.telemetry.local_files import read_spans
from needed import required
from otlp_collectors import Collector  # the OTLP/HTTP collector (fixture: collector)
from test_bad_input import agent_program  # the same four-span agent run
from test_client import warning_of_a_run_without_init

needs_grpc = pytest.mark.usefixtures("grpc_installed")
SPANS = ["chat gpt-4o-mini", "invoke_agent worker", "invoke_workflow main", "step tool"]
PROTOCOL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
)
GRPC_EXPORTERS = (
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
)


class GrpcCollector:
    """A local OTLP/gRPC endpoint (the trace and metrics services) that keeps what it receives."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.span_names: list[str] = []
        self.metric_names: set[str] = set()
        self.metadata: list[dict[str, str]] = []
        self.received = threading.Event()
        collector = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                collector.metadata.append(dict(context.invocation_metadata()))
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        collector.span_names.extend(span.name for span in scope_spans.spans)
                collector.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        collector.metric_names.update(m.name for m in scope_metrics.metrics)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def grpc_installed() -> None:
    required("opentelemetry.exporter.otlp.proto.grpc")


@pytest.fixture
def grpc_collector() -> Iterator[GrpcCollector]:
    required("opentelemetry.exporter.otlp.proto.grpc")
    server = GrpcCollector()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_protocol_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the exports of a failed one give up within a second."""
    for name in PROTOCOL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")


def traces_to(
    monkeypatch: pytest.MonkeyPatch, protocol: str, collector: Collector, grpc_collector: GrpcCollector
) -> None:
    """Point the traces, over ``protocol``, at the collector that speaks it."""
    url = grpc_collector.url if protocol == "grpc" else f"{collector.url}/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)


def sent(client: multirun.MultiRunClient) -> None:
    """Run the four-span agent program and export its spans."""
    assert agent_program()("q") == "Qq"
    assert client.force_flush(10_000)


# ---------------------------------------------------------------------------
# the protocol is honoured


@needs_grpc
def test_the_protocol_variable_grpc_sends_the_spans_over_grpc(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc_collector: GrpcCollector
) -> None:
    # as for every other OpenTelemetry SDK: a collector that listens on gRPC only (4317)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", grpc_collector.url)
    sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert sorted(grpc_collector.span_names) == SPANS


@needs_grpc
def test_init_protocol_grpc_sends_to_the_endpoint_with_the_headers(
    global_otel: None, tmp_path: Path, grpc_collector: GrpcCollector
) -> None:
    client = multirun.init(
        endpoint=grpc_collector.url,
        protocol="grpc",
        headers={"Authorization": "Bearer abc"},  # gRPC metadata keys are lower case
        local_dir=tmp_path / "mr",
        metrics=False,
    )
    sent(client)
    assert sorted(grpc_collector.span_names) == SPANS
    assert {m.get("authorization") for m in grpc_collector.metadata} == {"Bearer abc"}


@needs_grpc
def test_the_traces_protocol_variable_wins_over_the_general_one(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc_collector: GrpcCollector
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", grpc_collector.url)
    sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert sorted(grpc_collector.span_names) == SPANS


def test_http_protobuf_of_the_traces_variable_wins_over_grpc(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    # no gRPC here: the extra need not be installed for the signal that does not use it
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert sorted(collector.span_names) == SPANS


@needs_grpc
def test_the_protocol_argument_wins_over_the_variables(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    grpc_collector: GrpcCollector,
    collector: Collector,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    sent(
        multirun.init(endpoint=grpc_collector.url, protocol="grpc", local_dir=tmp_path / "mr", metrics=False)
    )
    assert sorted(grpc_collector.span_names) == SPANS
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    sent(
        multirun.init(
            endpoint=collector.url, protocol="http/protobuf", local_dir=tmp_path / "mr", metrics=False
        )
    )
    assert sorted(collector.span_names) == SPANS


METRICS_PROGRAM = """
import multirun


@multirun.run
def job() -> int:
    return 1


job()
"""


@needs_grpc
def test_the_metrics_protocol_variable_sends_the_metrics_over_grpc(
    tmp_path: Path, grpc_collector: GrpcCollector, collector: Collector
) -> None:
    # in a process of its own: the MeterProvider init makes is global; exit exports the metrics
    env = environment_without_settings()
    env |= {
        "MULTIRUN_DIR": str(tmp_path / "mr"),
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url + "/v1/traces",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": grpc_collector.url,
    }
    done = subprocess.run(
        [sys.executable, "-c", METRICS_PROGRAM], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert collector.span_names == ["invoke_workflow job"]
    assert {"multirun.runs", "multirun.spans.dropped"} <= grpc_collector.metric_names, done.stderr
    assert grpc_collector.span_names == []


@needs_grpc
def test_spans_a_grpc_export_fails_to_deliver_are_counted_as_dropped(
    global_otel: None, tmp_path: Path
) -> None:
    # nothing listens there: the exporter reports a failure, which the export pipeline counts
    before = DROPPED.snapshot().get(EXPORT_FAILED, 0)
    client = multirun.init(
        endpoint="http://127.0.0.1:9", protocol="grpc", local_dir=tmp_path / "mr", metrics=False
    )
    assert agent_program()("q") == "Qq"
    client.force_flush(10_000)
    assert DROPPED.snapshot().get(EXPORT_FAILED, 0) - before == len(SPANS)


# ---------------------------------------------------------------------------
# a protocol that cannot work: refused by init, logged by a run without init


BAD_PROTOCOLS = [
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", r"^OTEL_EXPORTER_OTLP_PROTOCOL is 'http/json', which"),
    (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "http/json",
        r"^OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is 'http/json'",
    ),
    (
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "grpcs",
        r"^OTEL_EXPORTER_OTLP_PROTOCOL must be one of http/protobuf, grpc, got 'grpcs'$",
    ),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "HTTP", r"^OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be one of"),
    ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "thrift", r"^OTEL_EXPORTER_OTLP_METRICS_PROTOCOL must be one of"),
]


@pytest.mark.parametrize(("variable", "value", "error"), BAD_PROTOCOLS)
def test_init_refuses_a_protocol_variable_it_would_export_with_naming_it(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, error: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=error):
        multirun.init(local_dir=tmp_path / "mr")
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not (tmp_path / "mr").exists()


def test_http_json_is_refused_with_what_to_use_instead(global_otel: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        multirun.init(endpoint="http://127.0.0.1:9", protocol="http/json", local_dir=tmp_path / "mr")
    assert str(info.value).startswith("protocol is 'http/json', which OpenTelemetry Python")
    assert "'http/protobuf'" in str(info.value) and "'grpc'" in str(info.value)


@pytest.mark.parametrize("protocol", ["grpcs", "", 5, "GRPC"])
def test_init_refuses_a_protocol_argument_that_is_none_of_the_accepted_values(
    global_otel: None, tmp_path: Path, protocol: Any
) -> None:
    # refused even with no endpoint: the argument is a request, not an ambient setting
    with pytest.raises(
        ConfigurationError, match=f"^protocol must be one of http/protobuf, grpc, got {protocol!r}$"
    ):
        multirun.init(protocol=protocol, local_dir=tmp_path / "mr")
    assert client_module._configured is None


def test_a_protocol_variable_is_not_read_when_nothing_is_exported_over_otlp(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # set for another program's SDK: no endpoint, so init writes files and has no use for it
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    client = multirun.init(local_dir=tmp_path / "mr", metrics=False)
    sent(client)
    assert len(list(read_spans(tmp_path / "mr" / "traces"))) == len(SPANS)


def test_a_metrics_protocol_variable_is_not_read_without_metrics(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "thrift")
    sent(multirun.init(endpoint=collector.url, local_dir=tmp_path / "mr", metrics=False))
    assert sorted(collector.span_names) == SPANS


@pytest.mark.parametrize(("variable", "value", "error"), BAD_PROTOCOLS[:4])
def test_without_init_a_bad_protocol_variable_is_logged_and_the_spans_go_to_the_files(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    value: str,
    error: str,
) -> None:
    # the first run sets up the defaults: telemetry must not fail the program
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "mr"))
    monkeypatch.setenv(variable, value)

    @run
    def job() -> int:
        return 1

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert job() == 1
    [warning] = [r.getMessage() for r in caplog.records if variable in r.getMessage()]
    assert warning.startswith(f"multirun: {variable}") and repr(value) in warning
    assert warning.endswith("; spans go to the local files instead")
    assert multirun.get_client().force_flush()
    assert [s.name for s in read_spans(tmp_path / "mr" / "traces")] == ["invoke_workflow job"]


# ---------------------------------------------------------------------------
# grpc without the grpc extra


@pytest.fixture
def without_grpc_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``import`` meets when opentelemetry-exporter-otlp-proto-grpc is not installed."""
    for module in GRPC_EXPORTERS:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"])
def test_init_refuses_grpc_without_the_extra_saying_how_to_install_it(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    without_grpc_extra: None,
    variable: str,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv(variable, "grpc")
    with pytest.raises(ConfigurationError, match=f"^{variable} is 'grpc'") as info:
        multirun.init(local_dir=tmp_path / "mr")
    assert "pip install 'multirun-otel[grpc]'" in str(info.value)
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    with pytest.raises(ConfigurationError, match=r"^protocol is 'grpc'.*pip install 'multirun-otel\[grpc\]'"):
        multirun.init(protocol="grpc", local_dir=tmp_path / "mr")


def test_without_init_grpc_without_the_extra_is_one_warning_and_the_spans_go_to_the_files(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    without_grpc_extra: None,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "mr"))

    @run
    def job() -> int:
        return 1

    with caplog.at_level(logging.WARNING):
        assert job() == 1
    # one variable, both signals: one warning
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("multirun: OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc'")
    assert "pip install 'multirun-otel[grpc]'" in warning
    assert warning.endswith("; spans go to the local files instead, metrics are not exported")
    assert multirun.get_client().force_flush()
    assert [s.name for s in read_spans(tmp_path / "mr" / "traces")] == ["invoke_workflow job"]


# ---------------------------------------------------------------------------
# an export timeout the exporters take but that fails every export


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-5"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
    ],
)
def test_an_otlp_timeout_that_is_no_positive_number_is_refused_by_init_and_logged_without_it(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    collector: Collector,
    grpc_collector: GrpcCollector,
    protocol: str,
    variable: str,
    value: str,
) -> None:
    # the SDK's exporters took it, and every export then failed at once ("cannot set connect
    # timeout to 0.0", "Deadline Exceeded"), with a line per batch that named no variable
    traces_to(monkeypatch, protocol, collector, grpc_collector)
    monkeypatch.setenv(variable, value)
    with pytest.raises(
        ConfigurationError, match=rf"^{variable} must be a number of seconds > 0, got '{value}'$"
    ):
        multirun.init(local_dir=tmp_path / "mr")
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)

    warning = warning_of_a_run_without_init(tmp_path, monkeypatch, caplog, variable, value)
    if variable == "OTEL_EXPORTER_OTLP_TIMEOUT":
        assert warning.endswith("; the exporter's default of 10 s is used")
    else:  # treated as not set: the general variable applies (the autouse fixture's 1 s)
        assert warning.endswith("; OTEL_EXPORTER_OTLP_TIMEOUT's 1 s is used")
    assert multirun.get_client().force_flush(10_000)
    names = grpc_collector.span_names if protocol == "grpc" else collector.span_names
    assert list(names) == ["invoke_workflow job"]


@pytest.mark.parametrize(
    ("protocol", "value"),
    [("http/protobuf", "abc"), ("http/protobuf", "0"), ("grpc", "0")],
)
def test_a_bad_per_signal_otlp_timeout_is_logged_and_the_general_one_is_used(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    silent_collector: str,
    protocol: str,
    value: str,
) -> None:
    # the spec treats a value that cannot be used as not set, so OTEL_EXPORTER_OTLP_TIMEOUT
    # applies: it was ignored too, and each export to a hung collector waited the 10 s default
    url = silent_collector if protocol == "grpc" else f"{silent_collector}/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    assert os.environ["OTEL_EXPORTER_OTLP_TIMEOUT"] == "1"
    variable = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    warning = warning_of_a_run_without_init(tmp_path, monkeypatch, caplog, variable, value)
    assert warning == (
        f"multirun: {variable} must be a number of seconds > 0, got {value!r}; "
        "OTEL_EXPORTER_OTLP_TIMEOUT's 1 s is used"
    )
    started = time.monotonic()
    multirun.get_client().force_flush(30_000)
    assert time.monotonic() - started < 6  # the export gave up after 1 s, not 10


# ---------------------------------------------------------------------------
# the gRPC exporters refuse some variables the HTTP ones only log


@needs_grpc
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip"),
    ],
)
def test_a_variable_the_grpc_exporter_refuses_is_refused_by_init_and_logged_without_it(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    value: str,
) -> None:
    # the SDK's gRPC exporters raise a ValueError as they are made (the HTTP ones log and go on),
    # for a per-signal timeout whatever timeout they are given
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv(variable, value)
    with pytest.raises(
        ConfigurationError, match=r"^OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc', and the gRPC"
    ) as info:
        multirun.init(local_dir=tmp_path / "mr")
    assert repr(value) in str(info.value) or f'"{value}"' in str(info.value)
    assert client_module._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not (tmp_path / "mr").exists()

    warning = warning_of_a_run_without_init(
        tmp_path, monkeypatch, caplog, "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    assert warning.endswith("; spans go to the local files instead")
    assert multirun.get_client().force_flush()
    assert [s.name for s in read_spans(tmp_path / "mr" / "traces")] == ["invoke_workflow job"]


@needs_grpc
def test_the_demo_sends_over_grpc_when_the_variable_says_so_and_says_it_did(
    tmp_path: Path, grpc_collector: GrpcCollector
) -> None:
    src = Path(client_module.__file__).parents[1]  # the package under test, in a fresh process
    env = environment_without_settings()
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    env |= {"PYTHONPATH": path, "NO_COLOR": "1", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    command = "import sys; from multirun.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", command, "demo", "--dir", str(tmp_path), "--endpoint", grpc_collector.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"to {grpc_collector.url} (OTLP/gRPC, service.name multirun-demo)" in done.stdout
    assert "invoke_workflow research_crew" in grpc_collector.span_names
    assert "multirun.runs" in grpc_collector.metric_names


# ---------------------------------------------------------------------------
# a headers variable with a part the SDK's parser drops

BAD_HEADERS = "x-tenant=acme,Authorization: Bearer sk-secret,api-key=s\u00e9cret"


def test_a_malformed_headers_variable_is_one_warning_naming_it_and_the_other_headers_are_sent(
    tmp_path: Path, collector: Collector
) -> None:
    # the SDK logged "Header format invalid! ..." once per part and exporter, naming neither the
    # variable nor what is wrong, with the part's value (a token) in it; the export went on
    # without the part, and a collector that wants it refuses every export
    env = environment_without_settings()
    env |= {
        "MULTIRUN_DIR": str(tmp_path / "mr"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,  # spans and metrics: two exporters read it
        "OTEL_EXPORTER_OTLP_HEADERS": BAD_HEADERS,
    }
    done = subprocess.run(
        [sys.executable, "-c", METRICS_PROGRAM], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "multirun: OTEL_EXPORTER_OTLP_HEADERS must be comma-separated name=value headers with "
        "URL-encoded values (no space in a name, no '\"', ';', '\\' or non-ASCII character); "
        "part 2 of 3 ('Authorization:...'), part 3 of 3 ('api-key=...') are not; "
        "it is not sent, the other headers are"
    ]
    assert collector.span_names == ["invoke_workflow job"]
    paths = {path for path, _ in collector.headers}
    assert paths == {"/v1/traces", "/v1/metrics"}
    assert all(headers.get("x-tenant") == "acme" for _, headers in collector.headers)


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_init_goes_on_with_a_malformed_per_signal_headers_variable_and_says_which(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    collector: Collector,
    grpc_collector: GrpcCollector,
    protocol: str,
) -> None:
    traces_to(monkeypatch, protocol, collector, grpc_collector)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-ignored=1")  # the per-signal one wins
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=acme, sk-secret-token")
    with caplog.at_level(logging.WARNING):
        client = multirun.init(local_dir=tmp_path / "mr", metrics=False)
    assert [r.getMessage() for r in caplog.records] == [
        "multirun: OTEL_EXPORTER_OTLP_TRACES_HEADERS must be comma-separated name=value headers "
        "with URL-encoded values (no space in a name, no '\"', ';', '\\' or non-ASCII character); "
        "part 2 of 2 ('sk-s...') is not one; it is not sent, the other headers are"
    ]
    sent(client)
    if protocol == "grpc":
        assert sorted(grpc_collector.span_names) == SPANS
        assert {m.get("x-tenant") for m in grpc_collector.metadata} == {"acme"}
    else:
        assert sorted(collector.span_names) == SPANS
        assert {h.get("x-tenant") for _, h in collector.headers} == {"acme"}


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_well_formed_headers_variables_are_sent_without_a_word(
    global_otel: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    collector: Collector,
    grpc_collector: GrpcCollector,
    protocol: str,
) -> None:
    traces_to(monkeypatch, protocol, collector, grpc_collector)
    # a liberal value (a space, not URL-encoded) is taken as the other SDKs take it
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", " authorization=Bearer abc , x-tenant=a%2Cb,")
    with caplog.at_level(logging.WARNING):
        sent(multirun.init(local_dir=tmp_path / "mr", metrics=False))
    assert caplog.records == []
    if protocol == "grpc":
        received = grpc_collector.metadata
    else:
        received = [headers for _, headers in collector.headers]
    assert {(h.get("authorization"), h.get("x-tenant")) for h in received} == {("Bearer abc", "a,b")}
