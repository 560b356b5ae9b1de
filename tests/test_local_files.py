"""The embedded default's span files: every span that ends is written, and read back."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, Status, StatusCode

import multirun
from child_processes import environment_without_settings
from multirun.telemetry import attributes as attr
from multirun.telemetry.export import ExportProcessor
from multirun.telemetry.local_files import LocalFileSpanExporter, read_spans

# a file name with a byte that is not UTF-8, as os.listdir and os.fsdecode give it back
UNDECODABLE = os.fsdecode(b"report-\xff.txt")


def write(directory: Path, build: Any, resource: Resource | None = None) -> None:
    """Spans made by ``build(tracer)``, written one batch at the end as the embedded default does."""
    finished: list[ReadableSpan] = []

    class Keep(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            finished.append(span)

    provider = TracerProvider(resource=resource) if resource else TracerProvider()
    provider.add_span_processor(Keep())
    build(provider.get_tracer("test"))
    assert LocalFileSpanExporter(directory).export(finished) is SpanExportResult.SUCCESS


# ---------------------------------------------------------------------------
# text UTF-8 cannot hold


def test_one_undecodable_file_name_loses_no_span(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("run", attributes={attr.RUN_ID: "r" * 32}):
            with tracer.start_as_current_span("step good"):
                pass
            with tracer.start_as_current_span(f"step open {UNDECODABLE}") as bad:
                bad.set_attribute("file.path", UNDECODABLE)
                bad.set_attribute("file.paths", ["ok", UNDECODABLE])
                bad.add_event("exception", {"exception.message": f"no such file: {UNDECODABLE}"})
                bad.set_status(Status(StatusCode.ERROR, f"FileNotFoundError: no such file: {UNDECODABLE}"))
            with tracer.start_as_current_span("step good again"):
                pass

    with caplog.at_level(logging.WARNING):
        write(tmp_path, build)
    assert caplog.records == []  # nor the encoder's "Failed to encode key" tracebacks
    spans = {s.name: s for s in read_spans(tmp_path)}
    assert set(spans) == {"run", "step good", "step open report-\\xff.txt", "step good again"}
    bad = spans["step open report-\\xff.txt"]
    assert bad.status_message == "FileNotFoundError: no such file: report-\\xff.txt"
    assert bad.attributes["file.path"] == "report-\\xff.txt"
    assert bad.attributes["file.paths"] == ["ok", "report-\\xff.txt"]
    assert bad.events[0]["attributes"]["exception.message"] == "no such file: report-\\xff.txt"


def test_an_undecodable_step_name_of_an_embedded_default_run_is_written_escaped(
    tmp_path: Path, global_otel: None
) -> None:
    # through init_local's export pipeline, which leaves the escaping to the local exporter
    client = multirun.init_local(tmp_path)

    @multirun.step(name=f"open {UNDECODABLE}")
    def open_file() -> None:
        pass

    @multirun.run(name="files")
    def files() -> None:
        open_file()

    files()
    assert client.force_flush()
    names = {s.name for s in read_spans(tmp_path / "traces")}
    assert names == {"invoke_workflow files", "step open report-\\xff.txt"}


def test_other_lone_surrogates_and_the_resource_are_escaped_too(tmp_path: Path) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("half an emoji \ud83d"):
            pass

    write(tmp_path, build, Resource.create({"service.name": f"svc-{UNDECODABLE}"}))
    [span] = read_spans(tmp_path)
    assert span.name == "half an emoji \\ud83d"
    assert span.service_name == "svc-report-\\xff.txt"


def test_lone_surrogates_in_a_scope_or_a_schema_url_cost_no_span(tmp_path: Path) -> None:
    # a plugin's tracer named after the file it was loaded from: its spans, and the others of
    # the batch, were all lost, batch after batch
    url = f"https://example.com/schemas/{UNDECODABLE}"
    provider = TracerProvider(resource=Resource({"service.name": "svc"}, schema_url=url))
    earlier = set(threading.enumerate())
    provider.add_span_processor(ExportProcessor(LocalFileSpanExporter(tmp_path)))
    provider.get_tracer("app").start_span("from the app").end()
    plugin = provider.get_tracer(f"plugin {UNDECODABLE}", attributes={"plugin.path": UNDECODABLE})
    plugin.start_span("from the plugin").end()
    provider.get_tracer("other", schema_url=url).start_span("from the other").end()
    provider.shutdown()
    # the pipeline's, ending: a later test forks. Only this one's: each pipeline an earlier test
    # left running has a thread of that name too, which cost 5 s each (40 s in a whole suite)
    for thread in set(threading.enumerate()) - earlier:
        if thread.name.startswith("multirun-span"):
            thread.join(30)
    names = sorted(s.name for s in read_spans(tmp_path))
    assert names == ["from the app", "from the other", "from the plugin"]
    [path] = tmp_path.glob("*.jsonl")
    [request] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    [resource_spans] = request["resourceSpans"]
    assert resource_spans["schemaUrl"] == "https://example.com/schemas/report-\\xff.txt"
    scope = resource_spans["scopeSpans"][1]["scope"]
    assert scope["name"] == "plugin report-\\xff.txt"
    assert scope["attributes"] == [{"key": "plugin.path", "value": {"stringValue": "report-\\xff.txt"}}]


def test_lone_surrogates_in_a_mapping_of_a_span_made_by_hand_cost_no_span(tmp_path: Path) -> None:
    # OTLP's AnyValue holds maps; the OpenTelemetry SDK does not make them, another writer may
    made = ReadableSpan(
        "by hand", SpanContext(1, 2, False), attributes={"args": {UNDECODABLE: [UNDECODABLE]}}
    )
    assert LocalFileSpanExporter(tmp_path).export([made]) is SpanExportResult.SUCCESS
    [span] = read_spans(tmp_path)
    assert span.attributes == {"args": {"report-\\xff.txt": ["report-\\xff.txt"]}}


def test_text_that_is_fine_is_written_as_it_is(tmp_path: Path) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("日本語 🚀 \\xff", attributes={"k": "é"}):
            pass

    write(tmp_path, build)
    [span] = read_spans(tmp_path)
    assert span.name == "日本語 🚀 \\xff" and span.attributes == {"k": "é"}


def test_a_span_that_cannot_be_encoded_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = ReadableSpan("good", SpanContext(1, 2, False), start_time=1, end_time=2)
    broken = ReadableSpan("broken", SpanContext(1, 3, False), start_time=-1, end_time=2)
    exporter = LocalFileSpanExporter(tmp_path)
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert exporter.export([good, broken]) is SpanExportResult.SUCCESS
    assert [s.name for s in read_spans(tmp_path)] == ["good"]
    assert [r.getMessage() for r in caplog.records] == [
        "multirun: could not write 1 of 2 spans (ValueError: Value out of range: -1)"
    ]


AN_INT_ENUM_ATTRIBUTE = """
import http
import multirun
from opentelemetry import trace

@multirun.run(name="fetch")
def fetch() -> int:
    trace.get_current_span().set_attribute("http.response.status_code", http.HTTPStatus.OK)
    return 1

fetch()
"""


def run_program(code: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in ``folder``, with this package and no OTEL_/MULTIRUN_ settings."""
    src = Path(multirun.__file__).parents[1]
    env = environment_without_settings()
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env=dict(env, PYTHONPATH=str(src)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_int_enum_attribute_is_written_as_its_number_and_the_program_ends(tmp_path: Path) -> None:
    # http.HTTPStatus and other IntEnums are ints to the SDK; checking one against the int64
    # range took 2**63 comparisons while holding the GIL, and froze the whole program
    ended = run_program(AN_INT_ENUM_ATTRIBUTE, tmp_path)
    assert ended.returncode == 0, ended.stderr
    [run] = [s for s in read_spans(tmp_path / ".multirun" / "traces") if s.name == "invoke_workflow fetch"]
    assert run.attributes["http.response.status_code"] == 200


IN_A_DELETED_WORKING_DIRECTORY = """
import os, sys, tempfile
import multirun

gone = tempfile.mkdtemp()
os.chdir(gone)
os.rmdir(gone)
client = multirun.init()  # the span files' folder, ./.multirun/traces, has no absolute name

@multirun.run(name="job")
def job() -> int:
    return 1

os.chdir(sys.argv[1])
assert job() == 1
assert client.force_flush(10_000)
"""


def test_init_in_a_deleted_working_directory_does_not_fail_the_program(tmp_path: Path) -> None:
    # the folder of the span files is made absolute when init makes the exporter: os.getcwd()
    # raised FileNotFoundError, out of init
    src = Path(multirun.__file__).parents[1]
    env = environment_without_settings()
    ended = subprocess.run(
        [sys.executable, "-c", IN_A_DELETED_WORKING_DIRECTORY, str(tmp_path)],
        env=dict(env, PYTHONPATH=str(src)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ended.returncode == 0, ended.stderr
    assert "the working directory was deleted" in ended.stderr
    assert "span files go to .multirun/traces under the working directory of each write" in ended.stderr
    # taken as given, the folder is where the program went since
    assert [s.name for s in read_spans(tmp_path / ".multirun" / "traces")] == ["invoke_workflow job"]


# ---------------------------------------------------------------------------
# a process that died mid-write


def one_span(tracer: Any, name: str) -> None:
    with tracer.start_as_current_span(name, attributes={attr.RUN_ID: name * 4}):
        pass


def test_a_line_cut_short_by_a_killed_process_does_not_take_the_next_one_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the same pid writes the same file (PID 1 in a container, run after run); the last one was
    # killed while writing its last line
    write(tmp_path, lambda tracer: one_span(tracer, "first"))
    [path] = tmp_path.glob("*.jsonl")
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:50])
    write(tmp_path, lambda tracer: one_span(tracer, "second"))
    assert list(tmp_path.glob("*.jsonl")) == [path]
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert [s.name for s in read_spans(tmp_path)] == ["first", "second"]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 damaged line in {path} (line 2: cut short)"
    ]


def test_a_request_glued_to_a_fragment_by_an_older_writer_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, lambda tracer: one_span(tracer, "first"))
    write(tmp_path, lambda tracer: one_span(tracer, "second"))
    [path] = tmp_path.glob("*.jsonl")
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first[:-30] + first[:40] + second)  # two fragments, then a whole request
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert [s.name for s in read_spans(tmp_path)] == ["second"]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 damaged line in {path} (line 1: cut short; the request written after it was read)"
    ]


# ---------------------------------------------------------------------------
# reading what other writers, or damage, left


def span_json(span_id: str, **fields: Any) -> dict[str, Any]:
    return {"traceId": "ab" * 16, "spanId": span_id, "name": f"span {span_id}"} | fields


def request_line(*spans: dict[str, Any]) -> str:
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]})


def test_null_is_a_fields_default_as_in_protobufs_json(tmp_path: Path) -> None:
    nulls = {"name": None, "parentSpanId": None, "status": None, "attributes": None, "events": None}
    (tmp_path / "spans.jsonl").write_text(request_line(span_json("1" * 16, **nulls)) + "\n")
    [span] = read_spans(tmp_path)
    assert (span.name, span.parent_span_id, span.status_code, span.attributes, span.events) == (
        "",
        "",
        0,
        {},
        [],
    )


def test_spans_in_the_otlp_layout_before_scopes_are_read(tmp_path: Path) -> None:
    # OTLP before 0.19 (Collectors of 2021) said instrumentationLibrarySpans: those spans were
    # read as none, without a word
    line = json.dumps(
        {"resourceSpans": [{"instrumentationLibrarySpans": [{"spans": [span_json("1" * 16)]}]}]}
    )
    (tmp_path / "spans.jsonl").write_text(line + "\n")
    assert [span.name for span in read_spans(tmp_path)] == ["span " + "1" * 16]


def read_line(directory: Path, line: str) -> list[Any]:
    (directory / "spans.jsonl").write_text(line + "\n")
    return list(read_spans(directory))


def test_a_span_as_the_collector_writes_it_is_read_with_its_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the Collector's file exporter leaves out every field that holds its default: the empty
    # key of an attribute, a status with no code, the kind, the times of an event; it writes
    # an unset value as {} and an int64 as text
    span = {
        "traceId": "ab" * 16,
        "spanId": "1" * 16,
        "parentSpanId": "2" * 16,
        "flags": 256,
        "name": "work",
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
        "attributes": [
            {"value": {"stringValue": "no key"}},
            {"key": "unset", "value": {}},
            {"key": "count", "value": {"intValue": "42"}},
            {"key": "map", "value": {"kvlistValue": {"values": [{"value": {"boolValue": True}}]}}},
        ],
        "events": [{"attributes": [{"value": {"doubleValue": 0.5}}]}],
        "status": {},
    }
    line = json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {}, "spans": [span]}]}]})
    with caplog.at_level(logging.WARNING, logger="multirun"):
        [read] = read_line(tmp_path, line)
    assert caplog.records == []
    assert (read.name, read.parent_span_id, read.start_ns, read.end_ns) == (
        "work",
        "2" * 16,
        1_700_000_000_000_000_000,
        1_700_000_001_000_000_000,
    )
    assert read.attributes == {"": "no key", "unset": None, "count": 42, "map": {"": True}}
    assert read.events == [{"name": "", "attributes": {"": 0.5}}]
    assert (read.status_code, read.status_message, read.parent_is_remote) == (0, "", False)


def test_a_resource_attribute_with_the_empty_key_costs_no_span(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": "crew"}}, {"value": {}}]}
    scope_spans = [{"spans": [span_json("1" * 16)]}]
    line = json.dumps({"resourceSpans": [{"resource": resource, "scopeSpans": scope_spans}]})
    with caplog.at_level(logging.WARNING, logger="multirun"):
        [read] = read_line(tmp_path, line)
    assert caplog.records == []
    assert (read.name, read.service_name) == ("span 1111111111111111", "crew")


def test_ids_in_upper_case_hex_are_the_same_ids(tmp_path: Path) -> None:
    # OTLP JSON: ids are "case-insensitive hex-encoded strings"; a span is joined to its parent,
    # and told from a copy another exporter wrote, by them
    child = span_json("C" * 16, traceId="AB" * 16, parentSpanId="B" * 16)
    [read] = read_line(tmp_path, request_line(child))
    assert (read.trace_id, read.span_id, read.parent_span_id) == ("ab" * 16, "c" * 16, "b" * 16)


def test_flags_given_as_text_say_where_the_parent_is(tmp_path: Path) -> None:
    # a fixed32 of protobuf's JSON: a number, or text of one
    spans = [span_json("1" * 16, flags="768"), span_json("2" * 16, flags="256")]
    assert [s.parent_is_remote for s in read_line(tmp_path, request_line(*spans))] == [True, False]


def test_a_value_whose_member_is_null_is_unset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # protobuf's JSON: null stands for a field's default; of a oneof, for no member set
    members = ("stringValue", "intValue", "doubleValue", "boolValue", "bytesValue", "arrayValue")
    attributes = [{"key": name, "value": {name: None}} for name in members]
    with caplog.at_level(logging.WARNING, logger="multirun"):
        [read] = read_line(tmp_path, request_line(span_json("1" * 16, attributes=attributes)))
    assert caplog.records == []
    assert read.attributes == dict.fromkeys(members)


def test_bytes_in_url_safe_or_unpadded_base64_are_read(tmp_path: Path) -> None:
    # protobuf's JSON: "either standard or URL-safe base64 encoding with/without paddings"
    encodings = {"standard": "+/8=", "unpadded": "+/8", "url-safe": "-_8="}
    attributes = [{"key": key, "value": {"bytesValue": text}} for key, text in encodings.items()]
    [read] = read_line(tmp_path, request_line(span_json("1" * 16, attributes=attributes)))
    assert read.attributes == dict.fromkeys(encodings, b"\xfb\xff")


def test_a_value_that_is_not_base64_is_a_damaged_span(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = span_json("2" * 16, attributes=[{"key": "b", "value": {"bytesValue": "a!b"}}])
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert [s.span_id for s in read_line(tmp_path, request_line(span_json("1" * 16), bad))] == ["1" * 16]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 damaged span in {tmp_path / 'spans.jsonl'} (line 1: attribute b is not base64)"
    ]


def test_damaged_lines_and_spans_of_a_file_are_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.jsonl"
    good, bad = span_json("1" * 16), span_json("2" * 16, startTimeUnixNano="yesterday")
    path.write_text("\n".join([request_line(good, bad, bad), "{not json", request_line(bad)]) + "\n")
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert [s.span_id for s in read_spans(tmp_path)] == ["1" * 16]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 2 damaged lines and 2 damaged spans in {path} "
        "(first at line 1: startTimeUnixNano 'yesterday' is not a whole number)"
    ]


def test_a_folder_that_cannot_be_written_is_one_warning_that_says_what_to_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    exporter = LocalFileSpanExporter(blocked / "traces")
    with caplog.at_level(logging.WARNING, logger="multirun"):
        for _ in range(2):
            assert exporter.export(_finished_spans()) is SpanExportResult.FAILURE
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("multirun")]
    assert len(warnings) == 1
    assert str(blocked / "traces") in warnings[0]
    # it named the folder and the OS error only: nothing of how to send the spans elsewhere
    assert "MULTIRUN_DIR" in warnings[0] and "local_dir" in warnings[0]


def _finished_spans(name: str = "work") -> list[ReadableSpan]:
    finished: list[ReadableSpan] = []

    class Keep(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            finished.append(span)

    provider = TracerProvider()
    provider.add_span_processor(Keep())
    provider.get_tracer("test").start_span(name).end()
    return finished


# ---------------------------------------------------------------------------
# the file stays open between batches


def test_a_trace_file_removed_while_the_program_runs_is_written_again(tmp_path: Path) -> None:
    # `multirun prune`, or a person clearing the folder: the next batches are not lost in a
    # file that no longer has a name
    exporter = LocalFileSpanExporter(tmp_path / "traces")
    assert exporter.export(_finished_spans("before")) is SpanExportResult.SUCCESS
    [path] = (tmp_path / "traces").glob("*.jsonl")
    path.unlink()
    assert exporter.export(_finished_spans("after the file")) is SpanExportResult.SUCCESS
    (tmp_path / "traces" / path.name).unlink()
    (tmp_path / "traces").rmdir()
    assert exporter.export(_finished_spans("after the folder")) is SpanExportResult.SUCCESS
    assert [s.name for s in read_spans(tmp_path / "traces")] == ["after the folder"]


def _descriptor_of(path: Path) -> int:
    """The descriptor this process holds ``path`` open with (Linux: /proc/self/fd)."""
    [fd] = [int(fd) for fd in os.listdir("/proc/self/fd") if _target(fd) == str(path)]
    return fd


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds descriptors with /proc")
def test_a_trace_file_whose_descriptor_was_closed_by_someone_else_is_opened_again(tmp_path: Path) -> None:
    # a library that closes the descriptors it does not know (os.closerange), or a file on NFS
    # that fstat can no longer see: every batch after it was lost, for the life of the program
    exporter = LocalFileSpanExporter(tmp_path)
    assert exporter.export(_finished_spans("before")) is SpanExportResult.SUCCESS
    [path] = tmp_path.glob("*.jsonl")
    os.close(_descriptor_of(path))
    assert exporter.export(_finished_spans("after")) is SpanExportResult.SUCCESS
    assert [s.name for s in read_spans(tmp_path)] == ["before", "after"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds descriptors with /proc")
def test_a_descriptor_now_of_another_file_gets_no_spans(tmp_path: Path) -> None:
    exporter = LocalFileSpanExporter(tmp_path / "traces")
    assert exporter.export(_finished_spans("before")) is SpanExportResult.SUCCESS
    [path] = (tmp_path / "traces").glob("*.jsonl")
    other = tmp_path / "the program's own file"
    fd = os.open(other, os.O_RDWR | os.O_CREAT)
    taken = os.dup2(fd, _descriptor_of(path))  # its number now names the program's file
    assert exporter.export(_finished_spans("after")) is SpanExportResult.SUCCESS
    assert other.read_bytes() == b""
    assert [s.name for s in read_spans(tmp_path / "traces")] == ["before", "after"]
    exporter.shutdown()
    assert os.readlink(f"/proc/self/fd/{taken}") == str(other)  # not the exporter's to close
    os.close(taken)
    os.close(fd)


def test_an_export_after_shutdown_is_one_warning_that_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # multirun.init(span_exporter=exporter) again with the same exporter shuts the earlier
    # pipeline, and so the exporter, down: every span after it was lost without a word
    exporter = LocalFileSpanExporter(tmp_path)
    exporter.shutdown()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        for _ in range(2):
            assert exporter.export(_finished_spans("late")) is SpanExportResult.FAILURE
    assert [r.getMessage() for r in caplog.records] == [
        f"multirun: the span exporter of {tmp_path} was shut down: spans that end after it are not written"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_batch_being_encoded_when_shutdown_returns_is_not_written(tmp_path: Path) -> None:
    # spans exported in the application's threads (SimpleSpanProcessor) while the program shuts
    # down: a batch still being encoded opened the file after shutdown had closed it, and kept it
    encoding, shut_down = threading.Event(), threading.Event()

    class SlowToRead(tuple[str, ...]):
        def __iter__(self) -> Any:
            encoding.set()
            shut_down.wait(10)
            return super().__iter__()

    span = ReadableSpan("late", SpanContext(1, 2, False), attributes={"items": SlowToRead(("a",))})
    exporter = LocalFileSpanExporter(tmp_path)
    results: list[SpanExportResult] = []
    exporting = threading.Thread(target=lambda: results.append(exporter.export([span])))
    exporting.start()
    assert encoding.wait(10)
    exporter.shutdown()
    shut_down.set()
    exporting.join(10)
    assert results == [SpanExportResult.FAILURE]
    assert list(tmp_path.iterdir()) == []


def test_a_fragment_another_writer_leaves_between_two_batches_does_not_take_the_next_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # two containers, both PID 1, write the same file on a shared volume; one was killed mid-line
    exporter = LocalFileSpanExporter(tmp_path)
    assert exporter.export(_finished_spans("first")) is SpanExportResult.SUCCESS
    [path] = tmp_path.glob("*.jsonl")
    with path.open("ab") as other:
        other.write(b'{"resourceSpans":[{"reso')
    assert exporter.export(_finished_spans("second")) is SpanExportResult.SUCCESS
    assert exporter.export(_finished_spans("third")) is SpanExportResult.SUCCESS
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert [s.name for s in read_spans(tmp_path)] == ["first", "second", "third"]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 1 damaged line in {path} (line 2: cut short)"
    ]


def _open_files_under(folder: Path) -> list[str]:
    """The files under ``folder`` this process holds open (Linux: /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files with /proc")
def test_an_exporter_dropped_without_shutdown_closes_its_file(tmp_path: Path) -> None:
    # a provider and exporter per job, never shut down, in a long-running program: each kept
    # its trace file open until the program ran out of file descriptors
    for n in range(20):
        LocalFileSpanExporter(tmp_path).export(_finished_spans(f"job {n}"))
    gc.collect()
    assert _open_files_under(tmp_path) == []
    assert len(list(read_spans(tmp_path))) == 20


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files with /proc")
def test_an_exporter_shut_down_closes_its_file(tmp_path: Path) -> None:
    exporter = LocalFileSpanExporter(tmp_path)
    exporter.export(_finished_spans("job"))
    assert len(_open_files_under(tmp_path)) == 1
    exporter.shutdown()
    assert _open_files_under(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# the export threads run as the program forks, as in a forking server: that is the case tested
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_writes_its_own_file(tmp_path: Path) -> None:
    exporter = LocalFileSpanExporter(tmp_path)
    assert exporter.export(_finished_spans("parent")) is SpanExportResult.SUCCESS
    pid = os.fork()
    if pid == 0:  # the child: exit without running the test process's clean-up
        code = 0 if exporter.export(_finished_spans("child")) is SpanExportResult.SUCCESS else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert exporter.export(_finished_spans("parent again")) is SpanExportResult.SUCCESS
    files = {path.name.rsplit("-", 1)[1]: path for path in tmp_path.glob("*.jsonl")}
    assert set(files) == {f"{os.getpid()}.jsonl", f"{pid}.jsonl"}
    assert [s.name for s in read_spans(files[f"{pid}.jsonl"].parent) if s.name == "child"] == ["child"]
    parent_file = json.loads(files[f"{os.getpid()}.jsonl"].read_text().splitlines()[-1])
    assert parent_file["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["name"] == "parent again"


# ---------------------------------------------------------------------------
# the end of the process

CTRL_C_AFTER_A_RUN = """
import multirun

@multirun.run(name="interrupted")
def crew() -> int:
    return 1

crew()
raise KeyboardInterrupt  # Ctrl-C after the run, before the spans were written
"""


@pytest.mark.skipif(os.name == "nt", reason="a POSIX exit by signal")
def test_ctrl_c_after_a_run_still_ends_the_program_by_sigint(tmp_path: Path) -> None:
    # Python ends a program Ctrl-C interrupted by SIGINT, so that the shell running it stops a
    # loop or a script too; the spans written at exit made that a plain exit status 1, which a
    # loop such as `while true; do python agent.py; done` took for a failure and went on
    ended = run_program(CTRL_C_AFTER_A_RUN, tmp_path)
    assert ended.returncode == -signal.SIGINT, ended.stderr
    assert ended.stderr.rstrip().endswith("KeyboardInterrupt")
    names = {span.name for span in read_spans(tmp_path / ".multirun" / "traces")}
    assert "invoke_workflow interrupted" in names  # and the spans are written all the same
