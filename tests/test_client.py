"""How multirun.init fits into the process's OpenTelemetry setup, and the embedded default."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import multirun
from child_processes import environment_without_settings
from multirun import checkpoint, run, step
from multirun.errors import ConfigurationError
from multirun.telemetry import attributes as attr
from multirun.telemetry.local_files import read_spans
from needed import required


def run_ids(folder: Path) -> set[str]:
    return {s.attributes[attr.RUN_ID] for s in read_spans(folder) if attr.RUN_ID in s.attributes}


def test_init_local_twice_sends_later_runs_to_the_new_folder_only(global_otel, tmp_path) -> None:
    @run
    def job() -> str:
        return multirun.context.get_current_run_context().run.id

    client = multirun.init_local(tmp_path / "a")
    first = job()
    client.force_flush()
    client = multirun.init_local(tmp_path / "b")
    second = job()
    client.force_flush()

    assert run_ids(tmp_path / "a" / "traces") == {first}
    assert run_ids(tmp_path / "b" / "traces") == {second}


def _applications_provider(provider: TracerProvider, provider_is: str) -> dict[str, TracerProvider]:
    """The application's own provider, multirun exporting beside it: set as the global one
    ("global"), or the init keywords that pass it ("given")."""
    if provider_is == "global":
        trace.set_tracer_provider(provider)
        return {}
    return {"tracer_provider": provider}


@pytest.mark.parametrize("provider_is", ["global", "given"])
def test_init_again_on_the_applications_provider_sends_each_span_once_to_the_new_exporter(
    global_otel, caplog, provider_is: str
) -> None:
    given = _applications_provider(TracerProvider(), provider_is)

    @run
    def job() -> None:
        pass

    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    multirun.init(span_exporter=first, **given)
    job()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        client = multirun.init(span_exporter=second, **given)
    job()
    client.force_flush()
    # the first exporter kept getting every span, and the second got the first's too: each
    # init added an export pipeline to the application's provider
    assert len(first.get_finished_spans()) == 1
    assert len(second.get_finished_spans()) == 1
    assert "replaces the earlier configuration" in caplog.text


@pytest.mark.parametrize("provider_is", ["global", "given"])
def test_init_again_without_an_exporter_on_the_applications_provider_stops_exporting_to_the_earlier(
    global_otel, provider_is: str
) -> None:
    # the export pipeline the first init added stayed: the second configuration still sent its
    # spans to the first's exporter (as the provider init makes did not)
    app_exporter = InMemorySpanExporter()
    app_provider = TracerProvider()
    app_provider.add_span_processor(SimpleSpanProcessor(app_exporter))
    given = _applications_provider(app_provider, provider_is)

    @run
    def job() -> None:
        pass

    first = InMemorySpanExporter()
    multirun.init(span_exporter=first, **given)
    job()
    client = multirun.init(**given)
    job()
    assert client.force_flush()
    assert len(first.get_finished_spans()) == 1
    assert len(app_exporter.get_finished_spans()) == 2  # the application's own export goes on


@pytest.mark.parametrize("provider_is", ["made by init", "given"])
def test_init_run_again_with_the_same_exporter_goes_on_exporting_to_it(global_otel, provider_is: str) -> None:
    # a notebook's setup cell run twice: the second init shut the exporter down, as the one of
    # the pipeline it replaced, and every later span was dropped
    given = {"tracer_provider": TracerProvider()} if provider_is == "given" else {}
    exporter = InMemorySpanExporter()

    @step
    def hello() -> None:
        pass

    @run
    def job() -> None:
        hello()

    multirun.init(span_exporter=exporter, **given)
    job()
    client = multirun.init(span_exporter=exporter, **given)
    job()
    assert client.force_flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["step hello", "invoke_workflow job"] * 2


def test_init_again_with_the_same_exporter_and_new_batch_settings_uses_them_and_loses_no_span(
    global_otel, monkeypatch
) -> None:
    exporter = InMemorySpanExporter()

    @run
    def job() -> None:
        pass

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # ten minutes between exports
    multirun.init(span_exporter=exporter)
    job()  # queued in the first pipeline
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    multirun.init(span_exporter=exporter)
    job()
    # no flush: the first pipeline gives what it holds to the exporter, which it leaves open, and
    # the second exports within its 10 ms
    deadline = time.monotonic() + 30
    while len(exporter.get_finished_spans()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [s.name for s in exporter.get_finished_spans()] == ["invoke_workflow job"] * 2


class OneAtATimeExporter(InMemorySpanExporter):
    """Holds each export until ``release`` is set; counts the exports that overlapped."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.exporting = self.overlapped = 0
        self.started = threading.Event()
        self._count = threading.Lock()

    def export(self, spans):  # type: ignore[no-untyped-def]
        with self._count:
            self.exporting += 1
            self.overlapped += self.exporting > 1
        self.started.set()
        self.release.wait(30)
        try:
            return super().export(spans)
        finally:
            with self._count:
                self.exporting -= 1


def test_the_pipeline_init_replaces_and_the_new_one_never_call_their_shared_exporter_at_once(
    global_otel, monkeypatch
) -> None:
    # an exporter is never called concurrently (the SDK's contract, which exporters rely on)
    exporter = OneAtATimeExporter()

    @run
    def job() -> None:
        pass

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    multirun.init(span_exporter=exporter)
    job()
    assert exporter.started.wait(30)  # the first pipeline is exporting, held
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    client = multirun.init(span_exporter=exporter)
    job()
    time.sleep(0.3)  # the second pipeline's turn to export came long ago
    exporter.release.set()
    assert client.force_flush()
    assert exporter.overlapped == 0
    assert len(exporter.get_finished_spans()) == 2


def test_init_local_without_a_path_uses_multirun_dir(global_otel, tmp_path, monkeypatch) -> None:
    # what `multirun resume --dir DIR -- program` tells the program it starts
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "given"))

    @run
    def job() -> str:
        return multirun.context.get_current_run_context().run.id

    client = multirun.init_local()
    ran = job()
    client.force_flush()
    assert run_ids(tmp_path / "given" / "traces") == {ran}


@pytest.mark.parametrize("path", [None, "folder"], ids=["no path", "a path"])
def test_init_local_keeps_checkpoints_in_multirun_checkpoint_uri(
    global_otel, tmp_path, monkeypatch, path: str | None
) -> None:
    # what `multirun resume --store URI -- program` tells the program it starts: the README says
    # init_local() (as the default client) finds the store through MULTIRUN_CHECKPOINT_URI
    store = tmp_path / "store"
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "given"))
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_URI", str(store))

    @run
    def job() -> str:
        multirun.context.get_current_run_context().checkpoint(name="saved")
        return multirun.context.get_current_run_context().run.id

    multirun.init_local(None if path is None else tmp_path / path)
    ran = job()
    assert [p.parent.name for p in store.glob("checkpoints/*/*.ckpt")] == [ran]
    assert not list(tmp_path.glob("*/blobs"))


def test_init_local_with_a_checkpoint_uri_uses_that_one(global_otel, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_URI", str(tmp_path / "from-env"))

    @run
    def job() -> None:
        multirun.context.get_current_run_context().checkpoint(name="saved")

    multirun.init_local(tmp_path / "mr", checkpoint_uri=str(tmp_path / "given"))
    job()
    assert len(list((tmp_path / "given").glob("checkpoints/*/*.ckpt"))) == 1
    assert not (tmp_path / "from-env").exists()


def test_run_without_init_writes_otlp_json_files_under_multirun_dir(
    global_otel, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "mr"))

    @step
    def hello() -> str:
        return "hi"

    @run
    def job() -> str:
        return hello()

    assert job() == "hi"
    multirun.get_client().force_flush()
    names = sorted(s.name for s in read_spans(tmp_path / "mr" / "traces"))
    assert names == ["invoke_workflow job", "step hello"]


def test_an_application_provider_is_kept_and_receives_the_spans(global_otel) -> None:
    exporter = InMemorySpanExporter()
    app_provider = TracerProvider()
    app_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(app_provider)

    multirun.init()

    @run
    def job() -> int:
        return 1

    job()
    assert trace.get_tracer_provider() is app_provider
    assert [s.name for s in exporter.get_finished_spans()] == ["invoke_workflow job"]


@pytest.mark.parametrize("set_later", [False, True], ids=["none-set", "set-since"])
def test_init_given_the_apis_global_provider_uses_the_global_one(global_otel, tmp_path, set_later) -> None:
    # init(tracer_provider=trace.get_tracer_provider()) before any provider was set gave it the
    # API's proxy, on which multirun added nothing: every span was lost, and nothing said so
    proxy = trace.get_tracer_provider()
    app_exporter = InMemorySpanExporter()
    if set_later:  # the proxy was taken before the application set its provider
        app_provider = TracerProvider()
        app_provider.add_span_processor(SimpleSpanProcessor(app_exporter))
        trace.set_tracer_provider(app_provider)

    @run
    def job() -> str:
        return multirun.context.get_current_run_context().run.id

    client = multirun.init(tracer_provider=proxy, local_dir=tmp_path)
    run_id = job()
    assert client.force_flush()
    if set_later:
        assert [s.name for s in app_exporter.get_finished_spans()] == ["invoke_workflow job"]
    else:
        assert run_ids(tmp_path / "traces") == {run_id}


def test_an_application_that_set_the_no_op_provider_keeps_tracing_off(global_otel, tmp_path, caplog) -> None:
    # init took the NoOpTracerProvider for none set: it made a provider of its own (the API
    # refused it as the global one, with a warning) and wrote multirun's spans to files; each
    # init made another, and the earlier one was never shut down (what it held at exit was lost)
    from multirun.errors import BudgetExceededError
    from multirun.models import Budget

    no_op = trace.NoOpTracerProvider()
    trace.set_tracer_provider(no_op)

    @step
    def work() -> None:
        pass

    @run(budget=Budget(max_steps=1))
    def job() -> None:
        work()
        work()

    with caplog.at_level(logging.INFO):
        for folder in ("a", "b"):
            client = multirun.init(local_dir=tmp_path / folder)
            with pytest.raises(BudgetExceededError):
                job()
            assert client.force_flush()
    assert trace.get_tracer_provider() is no_op
    assert not (tmp_path / "a" / "traces").exists() and not (tmp_path / "b" / "traces").exists()
    logged = [r.getMessage() for r in caplog.records if r.name.startswith(("opentelemetry", "multirun"))]
    assert logged == [
        "multirun: the global TracerProvider is a NoOpTracerProvider: no spans are recorded; "
        "budgets and policy still apply",
        "multirun: the global TracerProvider is a NoOpTracerProvider: no spans are recorded; "
        "budgets and policy still apply",
        "multirun: init() was called again and replaces the earlier configuration (changed: local_dir)",
    ]


def test_checkpoint_is_visible_on_the_trace_with_uri_size_and_digest(traced) -> None:
    @checkpoint(name="after_search")
    def search() -> list[str]:
        return ["a", "b"]

    @run
    def job() -> None:
        search()

    job()
    events = [e for e in traced.span("invoke_workflow job").events if e.name == attr.EVENT_CHECKPOINT]
    assert len(events) == 1
    found = dict(events[0].attributes or {})
    assert found[attr.CHECKPOINT_NAME] == "after_search"
    assert str(found[attr.CHECKPOINT_URI]).startswith("file://")
    assert int(found[attr.CHECKPOINT_SIZE]) > 0
    assert str(found[attr.CHECKPOINT_DIGEST]).startswith("sha256:")
    assert found[attr.CHECKPOINT_SERIALIZER] == "json"


# ---------------------------------------------------------------------------
# a second init replaces the first, and says so


def init_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("multirun") and r.levelno == logging.WARNING and "init()" in r.getMessage()
    ]


def test_a_second_init_warns_once_naming_what_changed(global_otel, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.init(local_dir=tmp_path / "a")
        assert init_warnings(caplog) == []
        multirun.init(local_dir=tmp_path / "b", capture_content=True)

    assert init_warnings(caplog) == [
        "multirun: init() was called again and replaces the earlier configuration "
        "(changed: local_dir, capture_content)"
    ]
    assert multirun.get_client().capture_content is True  # replaced, not refused


def test_a_second_init_with_the_same_arguments_still_warns(global_otel, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.init(local_dir=tmp_path / "a")
        multirun.init(local_dir=tmp_path / "a")
    assert init_warnings(caplog) == [
        "multirun: init() was called again and replaces the earlier configuration (same arguments)"
    ]


def test_init_after_a_run_set_up_the_defaults_warns(global_otel, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)

    @run
    def job() -> None:
        return None

    job()  # configures the defaults itself
    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.init(service_name="svc")
    assert init_warnings(caplog) == [
        "multirun: init() replaces the default configuration that an earlier run set up "
        "(changed: service_name)"
    ]


def test_a_refused_second_init_keeps_the_first_and_does_not_warn(global_otel, tmp_path, caplog) -> None:
    first = multirun.init(local_dir=tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="multirun"), pytest.raises(ConfigurationError):
        multirun.init(local_dir=tmp_path / "b", content_limit=-1)
    assert init_warnings(caplog) == []
    assert multirun.get_client() is first


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, "multirun"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing,team=ai"}, "billing"),
        ({"OTEL_SERVICE_NAME": "checkout", "OTEL_RESOURCE_ATTRIBUTES": "service.name=billing"}, "checkout"),
    ],
)
def test_service_name_of_the_provider_init_creates_follows_the_otel_variables(
    global_otel, tmp_path, monkeypatch, variables: dict[str, str], expected: str
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    multirun.init_local(tmp_path)

    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == expected


def test_a_short_otel_attribute_value_length_limit_does_not_stop_runs(
    global_otel, tmp_path, monkeypatch
) -> None:
    # a limit the SDK accepts for every attribute; captured content is cut by the SDK to it
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "8")

    @run
    def job() -> int:
        return 1

    multirun.init_local(tmp_path)
    assert job() == 1


def test_an_otel_attribute_value_length_limit_that_is_no_number_is_refused_naming_it(
    global_otel, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "-3")
    with pytest.raises(ConfigurationError, match="OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"):
        multirun.init_local(tmp_path)


def test_with_the_sdk_disabled_init_says_so_and_budgets_still_hold(
    global_otel, tmp_path, monkeypatch, caplog
) -> None:
    from multirun.errors import BudgetExceededError
    from multirun.models import Budget

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with caplog.at_level(logging.INFO, logger="multirun"):
        multirun.init(local_dir=tmp_path)

    @step
    def work() -> None:
        pass

    @run(budget=Budget(max_steps=2))
    def job() -> None:
        for _ in range(3):
            work()

    with pytest.raises(BudgetExceededError):
        job()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("multirun")]
    assert messages == [
        (
            logging.INFO,
            "multirun: OTEL_SDK_DISABLED is true: no spans are recorded; budgets and policy still apply",
        )
    ]
    assert not (tmp_path / "traces").exists()


SPAN_LIMIT_VARIABLES = [
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT",
]


@pytest.mark.parametrize("value", ["abc", "-1"])
@pytest.mark.parametrize("variable", SPAN_LIMIT_VARIABLES)
def test_init_refuses_a_span_limit_variable_of_the_provider_it_would_make_naming_it(
    global_otel, tmp_path, monkeypatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"^{variable} must be an int >= 0") as info:
        multirun.init(local_dir=tmp_path / "mr")
    assert value in str(info.value)
    assert multirun.client._configured is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert not (tmp_path / "mr").exists()


def test_empty_span_limit_variables_are_no_limit_as_for_the_sdk(global_otel, tmp_path, monkeypatch) -> None:
    for variable in SPAN_LIMIT_VARIABLES:
        monkeypatch.setenv(variable, "")

    @run
    def job() -> int:
        return 1

    multirun.init_local(tmp_path)
    assert job() == 1


def warning_of_a_run_without_init(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    value: str,
) -> str:
    """Run a @run, with no init, under ``MULTIRUN_DIR=tmp_path/mr`` and ``variable=value``:
    the one warning that names ``variable``."""
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "mr"))

    @run
    def job() -> int:
        return 1

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert job() == 1
    [warning] = [r.getMessage() for r in caplog.records if variable in r.getMessage()]
    return warning


@pytest.mark.parametrize("variable", SPAN_LIMIT_VARIABLES)
def test_without_init_a_bad_span_limit_variable_is_logged_and_the_run_goes_on_traced(
    global_otel, tmp_path, monkeypatch, caplog, variable: str
) -> None:
    # the first @run sets up the defaults: telemetry must not break the program
    warning = warning_of_a_run_without_init(tmp_path, monkeypatch, caplog, variable, "abc")
    assert "'abc'" in warning
    assert multirun.get_client().force_flush()
    assert [s.name for s in read_spans(tmp_path / "mr" / "traces")] == ["invoke_workflow job"]


LIMIT_AT_IMPORT = """
import sys
import multirun
from multirun.errors import ConfigurationError

try:
    multirun.init(local_dir=sys.argv[1])
except ConfigurationError as error:
    print("refused:", error)


@multirun.run
def job() -> str:
    return "ran"


print(job())
"""


def test_a_bad_otel_span_attribute_count_limit_does_not_fail_the_import(tmp_path: Path) -> None:
    # the SDK reads this variable as its trace module is imported, in `import multirun`: init
    # must still refuse it by name, and a run without init go on
    env = environment_without_settings()
    env["OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"] = "abc"
    env["MULTIRUN_DIR"] = str(tmp_path / "mr")
    done = subprocess.run(
        [sys.executable, "-c", LIMIT_AT_IMPORT, str(tmp_path / "mr")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    refused, ran = done.stdout.splitlines()
    assert refused == (
        "refused: OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT must be an int >= 0 (or empty for no limit), got 'abc'"
    )
    assert ran == "ran"
    assert "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT" in done.stderr  # the run's warning


PROPAGATED = """
import multirun

carrier = {}

@multirun.run
def job() -> None:
    multirun.inject(carrier)

job()
print(sorted(carrier))
"""


@pytest.mark.parametrize(
    ("configured", "headers", "dropped"),
    [
        ("bogus", ["baggage", "traceparent"], "'bogus'"),  # none loads: the SDK's default
        ("tracecontext, bogus", ["traceparent"], "'bogus'"),  # the ones that load are kept
    ],
)
def test_an_unknown_propagator_in_otel_propagators_is_a_warning_not_a_failed_import(
    tmp_path: Path, configured: str, headers: list[str], dropped: str
) -> None:
    # OpenTelemetry loads the propagators as opentelemetry.propagate is imported, in
    # `import multirun`, and failed that import with a ValueError on a name it cannot load
    env = environment_without_settings()
    env["OTEL_PROPAGATORS"] = configured
    env["MULTIRUN_DIR"] = str(tmp_path / "mr")
    done = subprocess.run(
        [sys.executable, "-c", PROPAGATED], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [repr(headers)]
    assert "OTEL_PROPAGATORS" in done.stderr and dropped in done.stderr
    assert "Traceback" not in done.stderr


# Telemetry variables a run set up without init falls back on (one warning, the default), and
# the values that make each one wrong.
TELEMETRY_VARIABLES = [
    ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
    ("OTEL_BSP_SCHEDULE_DELAY", "0"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "soon"),
    ("MULTIRUN_CHECKPOINT_TIMEOUT", "soon"),
    ("MULTIRUN_CHECKPOINT_TIMEOUT", "-1"),
    ("MULTIRUN_CHECKPOINT_MAX_BYTES", "1GiB"),
    ("MULTIRUN_CHECKPOINT_MAX_BYTES", "0"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:port"),
]


@pytest.mark.parametrize(("variable", "value"), TELEMETRY_VARIABLES)
def test_without_init_a_bad_telemetry_variable_is_logged_and_the_run_goes_on_traced(
    global_otel, tmp_path, monkeypatch, caplog, variable: str, value: str
) -> None:
    # a program that never calls init must not fail at its first @run over a telemetry setting
    warning = warning_of_a_run_without_init(tmp_path, monkeypatch, caplog, variable, value)
    assert repr(value) in warning
    client = multirun.get_client()
    assert client.checkpoints.put_timeout == 15
    assert client.checkpoints.max_blob_bytes == 1 << 30
    # the spans are exported with the default batch settings, to the files of the embedded default
    assert client.force_flush()
    assert [s.name for s in read_spans(tmp_path / "mr" / "traces")] == ["invoke_workflow job"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_EXPORT_TIMEOUT", "soon"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "-5"),
        ("MULTIRUN_CHECKPOINT_TIMEOUT", "soon"),
        ("MULTIRUN_CHECKPOINT_TIMEOUT", "-1"),
        ("MULTIRUN_CHECKPOINT_TIMEOUT", "nan"),
        ("MULTIRUN_CHECKPOINT_MAX_BYTES", "1GiB"),
        ("MULTIRUN_CHECKPOINT_MAX_BYTES", "-5"),
    ],
)
def test_init_refuses_a_bad_telemetry_variable_naming_it(
    global_otel, tmp_path, monkeypatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"^{variable} must be") as info:
        multirun.init(local_dir=tmp_path / "mr")
    assert repr(value) in str(info.value)
    assert multirun.client._configured is None
    assert not (tmp_path / "mr").exists()


METRICS_WITHOUT_INIT = """
import logging, sys
import multirun
from opentelemetry import metrics

logging.basicConfig(format="%(message)s")


@multirun.run
def job() -> str:
    return "ran"


print(job())
provider = metrics.get_meter_provider()
config = getattr(provider, "_sdk_config", None)  # the SDK's MeterProvider, if the run made one
if config is None:
    print("no meter provider")
else:
    [reader] = provider._all_metric_readers  # the one MeterProvider of this process: its reader
    print(reader._export_interval_millis, type(config.exemplar_filter).__name__)
"""


def run_without_init(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """METRICS_WITHOUT_INIT in a fresh process: its first @run sets up the defaults."""
    env = environment_without_settings()
    env |= {"MULTIRUN_DIR": str(tmp_path / "mr"), "OTEL_EXPORTER_OTLP_TIMEOUT": "1", **variables}
    return subprocess.run(
        [sys.executable, "-c", METRICS_WITHOUT_INIT], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("variable", "value", "settings"),
    [
        ("OTEL_METRIC_EXPORT_INTERVAL", "soon", "10000 TraceBasedExemplarFilter"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0", "10000 TraceBasedExemplarFilter"),
        ("OTEL_METRICS_EXEMPLAR_FILTER", "sometimes", "10000 TraceBasedExemplarFilter"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector:4318", "no meter provider"),
    ],
)
def test_without_init_a_bad_metrics_variable_is_logged_and_metrics_keep_their_defaults(
    tmp_path: Path, variable: str, value: str, settings: str
) -> None:
    # with an OTLP endpoint for metrics, the first run makes a MeterProvider that reads these
    done = run_without_init(
        tmp_path, **{"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:9", variable: value}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ran", settings]
    [warning] = [line for line in done.stderr.splitlines() if variable in line]
    assert warning.startswith(f"multirun: {variable} must be") and repr(value) in warning


def test_without_init_good_metrics_variables_are_used(tmp_path: Path) -> None:
    done = run_without_init(
        tmp_path,
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT="http://127.0.0.1:9",
        OTEL_METRIC_EXPORT_INTERVAL="2500",
        OTEL_METRICS_EXEMPLAR_FILTER="always_off",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ran", "2500 AlwaysOffExemplarFilter"]
    # nothing said about the variables (the export to the closed port fails, and says so)
    assert "OTEL_METRIC" not in done.stderr


# Settings that govern money: a bad value left aside would spend without the limit the user set
# (a shared budget in Redis, refusing unpriced models), so the first run refuses it, by name,
# before the program's function runs.
MONEY_VARIABLES = [
    ("MULTIRUN_UNPRICED", "failed", "^MULTIRUN_UNPRICED must be one of flag, fail, got 'failed'$"),
    ("MULTIRUN_LEDGER_URI", "http://ledger:6379", "^MULTIRUN_LEDGER_URI: ledger URL must be redis://"),
    ("MULTIRUN_LEDGER_URI", "redis://ledger:port/0", "^MULTIRUN_LEDGER_URI: .*Port could not be cast"),
    ("MULTIRUN_LEDGER_URI", "redis://ledger:99999/0", "^MULTIRUN_LEDGER_URI: .*Port out of range"),
    ("MULTIRUN_LEDGER_URI", "redis://[::1/0", "^MULTIRUN_LEDGER_URI: .*Invalid IPv6 URL"),
    ("MULTIRUN_LEDGER_URI", "redis://ledger/0?socket_timeout=soon", "^MULTIRUN_LEDGER_URI: .*socket_timeout"),
    # redis-py would quietly use database 0: another program's budgets
    ("MULTIRUN_LEDGER_URI", "redis://ledger:6379/abc", "^MULTIRUN_LEDGER_URI: .*database number.*'/abc'"),
    ("MULTIRUN_LEDGER_URI", "redis://ledger/0/extra", "^MULTIRUN_LEDGER_URI: .*database number.*'/0/extra'"),
]


@pytest.mark.parametrize(("variable", "value", "error"), MONEY_VARIABLES)
def test_without_init_a_bad_money_setting_is_refused_by_name_before_the_run_starts(
    global_otel, tmp_path, monkeypatch, variable: str, value: str, error: str
) -> None:
    required("redis")
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "mr"))
    ran: list[int] = []

    @run
    def job() -> None:
        ran.append(1)

    with pytest.raises(ConfigurationError, match=error):
        job()
    assert ran == []
    with pytest.raises(ConfigurationError, match=error):
        multirun.init(local_dir=tmp_path / "mr")


# Every setting init takes as an argument, else from its environment variable, with a value that
# cannot work. However it is given, the error names where it came from: a variable the user never
# passed to init must not be reported as an argument of init, nor the other way round.
# (variable, argument, value; {file} is a path under a file, so no folder can be made there)
SETTINGS_FROM_THE_ENVIRONMENT = [
    ("MULTIRUN_UNPRICED", "unpriced", "failed"),
    ("MULTIRUN_DIR", "local_dir", "{file}/mr"),
    ("MULTIRUN_CHECKPOINT_URI", "checkpoint_uri", "ftp://host/blobs"),
    ("MULTIRUN_CHECKPOINT_URI", "checkpoint_uri", "file://host/blobs"),
    ("MULTIRUN_CHECKPOINT_URI", "checkpoint_uri", "s3://bucket/blobs?colour=red"),
    ("MULTIRUN_CHECKPOINT_URI", "checkpoint_uri", "s3://"),
    ("MULTIRUN_CHECKPOINT_SERIALIZER", "checkpoint_serializer", "yaml"),
    ("MULTIRUN_CHECKPOINT_SERIALIZER", "checkpoint_serializer", "pickle"),  # and no HMAC key
    ("MULTIRUN_CHECKPOINT_HMAC_KEY", "checkpoint_hmac_key", "short"),
    ("MULTIRUN_CHECKPOINT_HMAC_KEY", "checkpoint_hmac_key", "hex:zz"),
    ("MULTIRUN_LEDGER_URI", "ledger_uri", "http://ledger:6379"),
    ("MULTIRUN_LEDGER_URI", "ledger_uri", "redis://ledger:6379/abc"),
    ("MULTIRUN_CHECKPOINT_TIMEOUT", "checkpoint_timeout", "soon"),
    ("MULTIRUN_CHECKPOINT_MAX_BYTES", "checkpoint_max_bytes", "lots"),
]
# the ways a setting reaches the configuration; a first run without init only logs a bad
# telemetry variable (MULTIRUN_CHECKPOINT_TIMEOUT, _MAX_BYTES, tested above), and MultiRunClient
# reads a few
_LOGGED_BY_A_FIRST_RUN = {"MULTIRUN_CHECKPOINT_TIMEOUT", "MULTIRUN_CHECKPOINT_MAX_BYTES"}
_READ_BY_THE_CLIENT = {
    "MULTIRUN_UNPRICED",
    "MULTIRUN_CHECKPOINT_SERIALIZER",
    "MULTIRUN_CHECKPOINT_HMAC_KEY",
    "MULTIRUN_LEDGER_URI",
}
_WAYS = [
    (variable, argument, value, way)
    for variable, argument, value in SETTINGS_FROM_THE_ENVIRONMENT
    for way in ["init argument", "init", "init_local", "first run", "MultiRunClient"]
    if not (way == "first run" and variable in _LOGGED_BY_A_FIRST_RUN)
    and not (way == "MultiRunClient" and variable not in _READ_BY_THE_CLIENT)
]


@pytest.mark.parametrize(("variable", "argument", "value", "way"), _WAYS)
def test_a_bad_setting_is_refused_naming_the_variable_or_the_argument_it_came_from(
    global_otel, tmp_path, monkeypatch, variable: str, argument: str, value: str, way: str
) -> None:
    required("redis")
    for name, _, _ in SETTINGS_FROM_THE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "file").write_text("")
    value = value.format(file=tmp_path / "file")
    if variable != "MULTIRUN_DIR":
        monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "mr"))
    ran: list[int] = []

    @run
    def job() -> None:
        ran.append(1)

    given, other = (argument, variable) if way == "init argument" else (variable, argument)
    if way != "init argument":
        monkeypatch.setenv(variable, value)
    actions = {
        "init argument": lambda: multirun.init(**{argument: value}),
        "init": multirun.init,
        "init_local": multirun.init_local,
        "first run": job,
        "MultiRunClient": lambda: multirun.MultiRunClient(tracer_provider=TracerProvider()),
    }
    with pytest.raises(ConfigurationError) as info:
        actions[way]()
    message = str(info.value)
    assert message.startswith(given), message
    assert other not in message, message
    assert ran == []
    assert multirun.client._configured is None


@pytest.mark.parametrize("value", ["http://ledger:6379", "redis://ledger:6379/abc"])
def test_a_client_refuses_its_ledger_uri_argument_by_name_whatever_the_variable_says(
    monkeypatch, value: str
) -> None:
    required("redis")
    monkeypatch.setenv("MULTIRUN_LEDGER_URI", "redis://ledger:6379/0")  # not used: no word of it
    with pytest.raises(ConfigurationError, match=r"^ledger_uri: ledger URL ") as info:
        multirun.MultiRunClient(tracer_provider=TracerProvider(), ledger_uri=value)
    assert "MULTIRUN_LEDGER_URI" not in str(info.value)
    monkeypatch.setenv("MULTIRUN_LEDGER_URI", value)  # nor is a bad variable the argument overrides
    client = multirun.MultiRunClient(tracer_provider=TracerProvider(), ledger_uri="redis://ledger:6379/0")
    assert client.ledger_uri == "redis://ledger:6379/0"


@pytest.mark.parametrize("given_as", ["MULTIRUN_DIR", "local_dir"])
def test_a_relative_folder_with_a_colon_keeps_the_checkpoints(
    global_otel, tmp_path, monkeypatch, given_as: str
) -> None:
    # its blobs folder is a path, not a URI whose scheme is "runs" (refused, naming a URI nobody gave)
    monkeypatch.chdir(tmp_path)
    if given_as == "MULTIRUN_DIR":
        monkeypatch.setenv("MULTIRUN_DIR", "runs:today")
        multirun.init()
    else:
        multirun.init(local_dir="runs:today")

    @run
    def job() -> None:
        multirun.context.get_current_run_context().checkpoint(name="saved")

    job()
    assert len(list((tmp_path / "runs:today" / "blobs").glob("checkpoints/*/*.ckpt"))) == 1


@pytest.mark.parametrize("given_as", ["MULTIRUN_DIR", "init_local", "default"])
def test_a_relative_folder_keeps_the_spans_where_it_was_when_the_program_changes_directory(
    global_otel, tmp_path, monkeypatch, given_as: str
) -> None:
    # spans are written by a batch after they end: after an os.chdir they went to a folder
    # of the same name under the new working directory, where `multirun runs` never looks
    started, moved = tmp_path / "started", tmp_path / "moved"
    started.mkdir()
    moved.mkdir()
    monkeypatch.chdir(started)
    folder = {"MULTIRUN_DIR": "runs", "init_local": "runs", "default": ".multirun"}[given_as]
    if given_as == "MULTIRUN_DIR":
        monkeypatch.setenv("MULTIRUN_DIR", "runs")
        multirun.init()
    elif given_as == "init_local":
        multirun.init_local("runs")

    @run
    def job() -> str:
        return multirun.context.get_current_run_context().run.id

    first = job()
    os.chdir(moved)
    second = job()
    assert multirun.get_client().force_flush()

    assert run_ids(started / folder / "traces") == {first, second}
    assert not (moved / folder).exists()


@pytest.mark.parametrize(
    ("variable", "value", "kept"),
    [
        ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "8", "attributes"),
        ("OTEL_ATTRIBUTE_COUNT_LIMIT", "5", "attributes"),
        ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "20", "characters"),
    ],
)
def test_a_span_limit_too_small_for_multiruns_spans_is_one_warning_naming_it(
    global_otel, tmp_path, monkeypatch, caplog, variable: str, value: str, kept: str
) -> None:
    # the SDK drops the oldest attributes past the count limit, the run id among the first,
    # and cuts values past the length limit, the run id too: runs vanished from
    # `multirun runs`, or were listed under a cut id, without a word from multirun
    monkeypatch.setenv(variable, value)

    @run
    def job() -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.init_local(tmp_path / "a")
        job()
        multirun.init_local(tmp_path / "b")  # the same provider: not said again
        job()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("multirun")]
    said = [message for message in messages if variable in message]
    assert len(said) == 1, said
    assert f"{variable} is {value}" in said[0] and kept in said[0]


def test_an_applications_provider_with_small_span_limits_is_one_warning(global_otel, caplog) -> None:
    from opentelemetry.sdk.trace import SpanLimits

    trace.set_tracer_provider(TracerProvider(span_limits=SpanLimits(max_span_attributes=6)))
    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.init(metrics=False)
    said = [r.getMessage() for r in caplog.records if "span attribute count limit" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "is 6" in said[0]


def test_the_default_span_limits_are_not_warned_about(global_otel, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="multirun"):
        multirun.init_local(tmp_path)
    assert not [r for r in caplog.records if "limit" in r.getMessage()]
