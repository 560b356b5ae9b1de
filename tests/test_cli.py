"""The ``multirun`` command: the demo, ``runs`` and ``runs show``, read back from span files."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import tracemalloc
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from child_processes import environment_without_settings
from multirun import client as client_module
from multirun.cli import main, render, runs
from multirun.cli.main import NO_RUNS_HINT
from multirun.telemetry import attributes as attr
from multirun.telemetry.local_files import (
    DamagedLine,
    LocalFileSpanExporter,
    SpanRecord,
    parse_span_line,
    read_spans,
)
from otlp_collectors import Collector

MULTIRUN = shutil.which("multirun", path=str(Path(sys.executable).parent))


# ---------------------------------------------------------------------------
# fixtures and helpers


@dataclass
class DemoRun:
    """One ``multirun demo --dir DIR`` run in this process, and what it printed."""

    directory: Path
    output: str
    exit_code: int

    def spans(self) -> list[SpanRecord]:
        return list(read_spans(self.directory / "traces"))

    @property
    def run_span(self) -> SpanRecord:
        found = [s for s in self.spans() if s.attributes.get(attr.RUN_ID) and s.trace_id]
        found = [s for s in found if s.attributes[attr.RUN_ID][:12] in self.output]
        assert len(found) == 1
        return found[0]

    @property
    def run_id(self) -> str:
        return str(self.run_span.attributes[attr.RUN_ID])

    def run_spans(self) -> list[SpanRecord]:
        """The spans of the demo's trace (the folder may hold spans of other runs)."""
        trace_id = self.run_span.trace_id
        return [s for s in self.spans() if s.trace_id == trace_id]


@pytest.fixture(autouse=True)
def _reset_client() -> Iterator[None]:
    """``multirun.init`` configures the process; start and leave every test unconfigured."""
    client_module._configured = None
    yield
    client_module._configured = None


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """The demo, run once for the module (it takes about half a second)."""
    directory = tmp_path_factory.mktemp("demo") / ".multirun"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["demo", "--dir", str(directory)])
    finally:
        client_module._configured = None
    yield DemoRun(directory, out.getvalue(), code)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree_lines(output: str) -> list[str]:
    """The lines of the tree table: from its header to the first blank line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SPAN"))
    end = lines.index("", start)
    return lines[start:end]


def write_spans(directory: Path, build: Any) -> None:
    """Write spans made by ``build(tracer)`` to ``directory/traces``, as the exporter does."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LocalFileSpanExporter(directory / "traces")))
    build(provider.get_tracer("test"))
    provider.shutdown()


def run_attrs(run_id: str, **extra: Any) -> dict[str, Any]:
    return {attr.RUN_ID: run_id, attr.GEN_AI_WORKFLOW_NAME: "synthetic", **extra}


# ---------------------------------------------------------------------------
# multirun demo


def test_demo_prints_the_run_as_a_tree(demo: DemoRun) -> None:
    assert demo.exit_code == 0
    for name in (
        "invoke_workflow research_crew",
        "├─ invoke_agent planner",
        "├─ invoke_agent researcher",
        "└─ invoke_agent writer",
        "chat gpt-4o-mini (plan_questions)",
        "chat claude-3-5-haiku (summarize)",
        "execute_tool web_search",
        "execute_tool fetch_page",
        "chat gpt-4o-mini (stream_report)",
        "step add_sources",
    ):
        assert name in demo.output, name
    assert "streamed" in demo.output
    assert "Traceback" not in demo.output
    assert "\x1b[" not in demo.output  # not a terminal: no colours


def test_demo_totals_are_the_sums_of_its_spans(demo: DemoRun) -> None:
    spans = demo.run_spans()
    run = demo.run_span
    llm_steps = [s for s in spans if s.attributes.get(attr.STEP_KIND) == "llm_call"]
    agents = [s for s in spans if s.attributes.get(attr.AGENT_STATUS)]
    steps = [s for s in spans if attr.STEP_KIND in s.attributes]
    tokens = run.attributes[attr.TOKENS_USED]
    cost = run.attributes[attr.COST_USD]

    assert len(llm_steps) == 5
    assert tokens > 0 and cost > 0 and not run.attributes.get(attr.UNPRICED)
    assert sum(s.attributes[attr.TOKENS_USED] for s in llm_steps) == tokens
    assert sum(s.attributes[attr.TOKENS_USED] for s in agents) == tokens
    assert sum(s.attributes[attr.COST_USD] for s in llm_steps) == pytest.approx(cost)
    assert run.attributes[attr.STEPS_USED] == len(steps) == 12
    total = next(line for line in demo.output.splitlines() if line.startswith("total"))
    assert f"{tokens:,} tokens" in total
    assert render.format_cost(cost) in total
    assert "12 steps" in total


def test_demo_runs_parallel_steps_under_the_researcher(demo: DemoRun) -> None:
    spans = demo.run_spans()
    researcher = next(s for s in spans if s.name == "invoke_agent researcher")
    searches = [s for s in spans if s.name == "execute_tool web_search"]
    assert len(searches) == 3
    assert {s.parent_span_id for s in searches} == {researcher.span_id}
    first_end = min(s.end_ns for s in searches)
    assert all(s.start_ns < first_end for s in searches)  # they overlap: asyncio.gather


def test_demo_shows_the_retry(demo: DemoRun) -> None:
    fetches = [s for s in demo.run_spans() if s.name == "execute_tool fetch_page"]
    retried = [s for s in fetches if s.attributes[attr.STEP_ATTEMPT] == 2]
    assert len(retried) == 1
    assert retried[0].attributes[attr.STEP_STATUS] == "completed"
    assert any(e["attributes"].get(attr.ERROR_TYPE) == "ConnectionError" for e in retried[0].events)
    line = next(line for line in demo.output.splitlines() if "attempt 2" in line)
    assert "execute_tool fetch_page" in line and "ConnectionError" in line


def test_demo_writes_a_checkpoint_and_records_its_budget(demo: DemoRun) -> None:
    checkpoints = list((demo.directory / "blobs" / "checkpoints" / demo.run_id).glob("*.ckpt"))
    assert len(checkpoints) == 1
    assert str(checkpoints[0]) in demo.output
    assert demo.run_span.attributes[attr.BUDGET_PREFIX + "max_cost_usd"] == 0.5
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 multirun demo" in demo.output


def test_demo_names_its_checkpoint_in_the_store_multirun_checkpoint_uri_names(
    global_otel: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint went to the store of ``MULTIRUN_CHECKPOINT_URI``: the demo says where (it
    looked only in DIR/blobs, and printed no Checkpoint line at all)."""
    store = tmp_path / "checkpoint store"
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_URI", store.as_uri())
    code, out, _ = run_cli(capsys, "demo", "--dir", str(tmp_path / "runs"))
    assert code == 0
    [written] = store.glob("checkpoints/*/*.ckpt")
    assert f"Checkpoint:  {written}\n" in out
    assert not (tmp_path / "runs" / "blobs").exists()


def test_the_again_hint_works_when_pasted_into_a_shell(
    global_otel: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "my runs; $(rm -rf ~)"
    code, out, _ = run_cli(capsys, "demo", "--dir", str(directory))
    assert code == 0
    [hint] = [line.removeprefix("Again:").strip() for line in out.splitlines() if line.startswith("Again:")]
    words = shlex.split(hint)
    assert words[:3] == ["multirun", "runs", "show"] and words[4:] == ["--dir", str(directory)]
    code, out, _ = run_cli(capsys, *words[1:])
    assert code == 0 and out.startswith(f"Run {words[3]}")


def test_the_again_hint_names_the_default_folder_when_multirun_dir_names_another(
    global_otel: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "elsewhere"))
    code, out, _ = run_cli(capsys, "demo", "--dir", ".multirun")
    assert code == 0
    [hint] = [line.removeprefix("Again:").strip() for line in out.splitlines() if line.startswith("Again:")]
    code, out, err = run_cli(capsys, *shlex.split(hint)[1:])
    assert code == 0 and out.startswith("Run "), err


def test_demo_refuses_a_file_as_its_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a-file"
    path.write_text("")
    code, _, err = run_cli(capsys, "demo", "--dir", str(path))
    assert code == 1
    assert "not a directory" in err


@pytest.mark.parametrize("given_as", ["--dir", "MULTIRUN_DIR"])
def test_demo_that_cannot_create_its_directory_names_the_folder_not_an_init_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, given_as: str
) -> None:
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" / "demo"
    if given_as == "--dir":
        code, out, err = run_cli(capsys, "demo", "--dir", str(folder))
    else:
        monkeypatch.setenv("MULTIRUN_DIR", str(folder))
        code, out, err = run_cli(capsys, "demo")
    assert code == 1 and out == ""
    assert err.splitlines() == [f"multirun: error: cannot create the folder {folder}: Not a directory"]


def test_demo_in_a_folder_it_cannot_write_names_the_folder_not_an_init_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only: Callable[[Path], None]
) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    read_only(folder)
    code, out, err = run_cli(capsys, "demo", "--dir", str(folder))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"multirun: error: cannot write to the folder {folder}: give another with --dir DIR"
    ]


@pytest.mark.parametrize("sub", ["traces", "blobs"])
@pytest.mark.parametrize("how", ["read-only", "a file"])
def test_demo_that_cannot_write_a_subfolder_says_so_before_running_naming_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], read_only: Callable[[Path], None], sub: str, how: str
) -> None:
    # it ran the crew, then warned that MULTIRUN_DIR names another folder (the user gave --dir)
    # and that the run "was not found", or lost the checkpoint with a warning and exit status 0
    folder = tmp_path / "demo"
    folder.mkdir()
    if how == "a file":
        (folder / sub).write_text("")
    else:
        (folder / sub).mkdir()
        read_only(folder / sub)
    code, out, err = run_cli(capsys, "demo", "--dir", str(folder))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"multirun: error: cannot write to the folder {folder / sub}: give another with --dir DIR"
    ]


def test_demo_whose_span_file_cannot_be_written_names_dir_not_the_library_settings(
    global_otel: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a folder that passes the checks, and a write that fails all the same (a full disk, say)
    folder = tmp_path / "demo"
    span_file = LocalFileSpanExporter(folder / "traces").path
    span_file.mkdir(parents=True)  # a folder where this process's span file goes
    code, _, err = run_cli(capsys, "demo", "--dir", str(folder))
    assert code == 1
    warning = err.splitlines()[0]
    assert warning.startswith(f"multirun: warning: cannot write traces to {folder / 'traces'}: ")
    assert warning.endswith("(spans are lost until it can be written; --dir DIR names another folder)")
    assert "MULTIRUN_DIR" not in err and "init(" not in err
    error = err.splitlines()[-1]
    assert error.startswith("multirun: error: run ")
    assert error.endswith(f" was not found in {folder / 'traces'}: its spans could not be written there")


@pytest.mark.parametrize(
    "sampler",
    [
        {"OTEL_TRACES_SAMPLER": "always_off"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    ],
)
@pytest.mark.parametrize("to_a_collector", [False, True], ids=["files", "collector"])
def test_demo_whose_spans_the_sampler_drops_names_the_sampler(
    tmp_path: Path, collector: Collector, sampler: dict[str, str], to_a_collector: bool
) -> None:
    # it said the run's spans "could not be written" to the folder, or that it sent the run
    src = Path(client_module.__file__).parents[1]
    endpoint = ["--endpoint", collector.url] if to_a_collector else []
    done = subprocess.run(  # a process of its own: the sampler is the provider's, made once
        [sys.executable, "-m", "multirun", "demo", "--dir", str(tmp_path / "demo"), *endpoint],
        env=_clean_env(PYTHONPATH=str(src), **sampler),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (1, "")
    setting = " with ".join(f"{name}={value}" for name, value in sampler.items())
    assert done.stderr.splitlines() == [
        f"multirun: error: the sampler {setting} recorded none of the demo's spans: "
        "run it without OTEL_TRACES_SAMPLER"
    ]


@pytest.mark.parametrize("to_a_collector", [False, True], ids=["files", "collector"])
def test_demo_with_the_sdk_disabled_says_so_instead_of_losing_its_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, to_a_collector: bool
) -> None:
    # it ran the crew, then said that its run "was not found" in the files, or that it was sent
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    folder = tmp_path / "demo"
    with _RefusingCollector() as url:  # something listens: the demo would run its crew
        endpoint = ["--endpoint", url] if to_a_collector else []
        code, out, err = run_cli(capsys, "demo", "--dir", str(folder), *endpoint)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "multirun: error: OTEL_SDK_DISABLED=true turns OpenTelemetry off, so the demo would record "
        "no spans to show: run it without that variable"
    ]
    assert not folder.exists()


# the demo as `multirun` runs it, with Ctrl-C pressed during its first model call
CTRL_C_IN_THE_DEMO = """
import signal, sys
from multirun import demo
from multirun.cli.main import main

answer = demo.MODEL.complete

async def pressed(*args, **kwargs):
    signal.raise_signal(signal.SIGINT)
    return await answer(*args, **kwargs)

demo.MODEL.complete = pressed
sys.exit(main())
"""


def test_ctrl_c_during_the_demo_says_where_the_partial_run_is_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    src = Path(client_module.__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_THE_DEMO, "demo", "--dir", str(folder)],
        env=_clean_env(PYTHONPATH=str(src)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 130  # as a shell reports a command Ctrl-C ended
    assert done.stderr.splitlines() == [
        f"multirun: interrupted; the partial run is in {folder}: multirun runs --dir {folder}"
    ]
    listed = subprocess.run(
        [sys.executable, "-m", "multirun", "runs", "--dir", str(folder)],
        env=_clean_env(PYTHONPATH=str(src)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # asyncio.run turns Ctrl-C into a cancellation of the demo's task from Python 3.11; on 3.10
    # KeyboardInterrupt is raised in it, and a run interrupted so ends failed (as sync code does)
    status = "cancelled" if sys.version_info >= (3, 11) else "failed"
    assert f"research_crew  {status}" in listed.stdout, listed.stdout


def test_ctrl_c_during_the_demo_does_not_say_the_run_was_sent_when_the_collector_refused_it(
    tmp_path: Path,
) -> None:
    # it said "the partial run is sent to URL" whatever the collector answered
    src = Path(client_module.__file__).parents[1]
    with _RefusingCollector() as url:
        done = subprocess.run(
            [sys.executable, "-c", CTRL_C_IN_THE_DEMO, "demo", "--dir", str(tmp_path), "--endpoint", url],
            env=_clean_env(PYTHONPATH=str(src)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 130
    assert done.stderr.splitlines() == [f"multirun: interrupted; the partial run could not be sent to {url}"]


@pytest.mark.parametrize("given_as", ["--endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"])
def test_demo_refuses_an_endpoint_that_is_no_url_by_its_option_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, given_as: str
) -> None:
    folder = tmp_path / "demo"
    if given_as == "--endpoint":
        code, out, err = run_cli(capsys, "demo", "--dir", str(folder), "--endpoint", "localhost:4318")
    else:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")
        code, out, err = run_cli(capsys, "demo", "--dir", str(folder))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"multirun: error: {given_as} must be an http(s) URL with a host, such as "
        "http://localhost:4318, got 'localhost:4318'"
    ]
    assert not folder.exists()


# ---------------------------------------------------------------------------
# multirun runs


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["runs", "--bogus"], "multirun runs"),
        (["runs", "show", "abc", "--bogus"], "multirun runs show"),
        (["demo", "extra"], "multirun demo"),
        (["checkpoints", "verify", "--bogus"], "multirun checkpoints verify"),
        (["prune", "--older-than", "1", "--bogus"], "multirun prune"),
    ],
)
def test_an_unknown_option_is_refused_with_the_usage_of_its_command(
    capsys: pytest.CaptureFixture[str], argv: list[str], command: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    usage, message = err.splitlines()[0], err.splitlines()[-1]
    assert usage.startswith(f"usage: {command} ")
    assert message == f"{command}: error: unrecognized arguments: {argv[-1]}"


@pytest.mark.parametrize(
    ("argv", "command", "message"),
    [
        (["runs", "--limt", "3"], "multirun runs", "--limt (did you mean --limit?)"),
        (["checkpoints", "--rnu", "abc"], "multirun checkpoints", "--rnu (did you mean --run?)"),
        (["runs", "--bogus", "show", "abc"], "multirun runs", "--bogus"),
        (["demo", "--dri", "x"], "multirun demo", "--dri (did you mean --dir?)"),
    ],
)
def test_a_misspelt_option_before_its_value_is_named_not_its_value_taken_for_a_command(
    capsys: pytest.CaptureFixture[str], argv: list[str], command: str, message: str
) -> None:
    # argparse took the value for the name of a sub-command: "invalid choice: '3' (choose from 'show')"
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    usage, last = err.splitlines()[0], err.splitlines()[-1]
    assert usage.startswith(f"usage: {command} ")
    assert last == f"{command}: error: unrecognized arguments: {message}"


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "--lim", "3", "--js"],  # unique prefixes, as argparse takes them
        ["runs", "--limit=3"],
        ["checkpoints", "--run", "-"],
        ["prune", "--older-than", "1e-3", "--dry-run"],
    ],
)
def test_options_argparse_accepts_are_not_taken_for_misspelt_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run_cli(capsys, *argv, "--dir", str(tmp_path))
    assert "unrecognized" not in err
    assert code == (1 if argv[0] == "checkpoints" else 0), err  # no run '-' has checkpoints


def test_runs_show_where_no_run_was_ever_made_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.multirun: `multirun runs` says how to make a run, and so does show
    code, out, err = run_cli(capsys, "runs", "show", "abc")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"multirun: error: no run with id 'abc': no runs in {Path('.multirun') / 'traces'}",
        "Run `multirun demo` to make one, or a program with a @multirun.run function: without "
        "multirun.init() its runs go to ./.multirun (or $MULTIRUN_DIR).",
    ]


def test_runs_in_a_folder_without_runs_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the README's quick start: nothing but the decorators is needed, no init or init_local
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"No runs in {tmp_path / 'traces'}.",
        "Run `multirun demo` to make one, or a program with a @multirun.run function: without "
        "multirun.init() its runs go to ./.multirun (or $MULTIRUN_DIR).",
    ]


def test_runs_given_the_traces_folder_itself_names_the_folder_above_it(
    demo: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    # the README names the files ./.multirun/traces/*.jsonl: "No runs ... Run `multirun demo`"
    # told the user there were none
    code, out, err = run_cli(capsys, "runs", "--dir", str(demo.directory / "traces"))
    assert code == 0 and err == ""
    no_runs, hint = out.splitlines()
    assert no_runs == f"No runs in {demo.directory / 'traces' / 'traces'}."
    command = shlex.split(hint.split("`")[1])
    assert command == ["multirun", "runs", "--dir", str(demo.directory)]
    code, out, _ = run_cli(capsys, *command[1:])
    assert code == 0 and demo.run_id[:12] in out


def test_runs_lists_the_demo_run(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "runs", "--dir", str(demo.directory))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["RUN", "ID", "NAME", "STATUS", "STARTED", "DURATION", "TOKENS", "COST"]
    row = next(r for r in rows if r.startswith(demo.run_id[:12]))
    assert "research_crew" in row and "completed" in row
    assert f"{demo.run_span.attributes[attr.TOKENS_USED]:,}" in row


def test_runs_json(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "runs", "--dir", str(demo.directory), "--json")
    assert code == 0
    found = {r["run_id"]: r for r in json.loads(out)}
    assert found[demo.run_id]["tokens"] == demo.run_span.attributes[attr.TOKENS_USED]
    assert found[demo.run_id]["status"] == "completed"


def test_runs_newest_first_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def build(tracer: Any) -> None:
        for number in range(3):
            with tracer.start_as_current_span(f"run {number}", attributes=run_attrs(f"{number}" * 32)):
                pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path), "--limit", "2")
    assert code == 0
    rows = out.splitlines()[1:]
    assert [r[:1] for r in rows[:2]] == ["2", "1"]
    assert "1 older" in rows[2]


def test_runs_in_an_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    assert "No runs" in out and "multirun demo" in out
    assert err == ""


def test_runs_with_no_folder_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTIRUN_DIR", raising=False)
    code, out, _ = run_cli(capsys, "runs")
    assert code == 0
    assert "multirun demo" in out


def test_runs_in_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path / "missing"))
    assert code == 1
    assert out == ""
    assert err.strip() == f"multirun: error: no such directory: {tmp_path / 'missing'}"


def test_damaged_lines_are_skipped(demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo.directory / "traces", copy / "traces")
    damaged = copy / "traces" / "damaged.jsonl"
    damaged.write_bytes(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{}]}]}]}\n{not json\n\xff\n')
    code, out, err = run_cli(capsys, "runs", "--dir", str(copy))
    assert code == 0
    assert demo.run_id[:12] in out
    assert err.splitlines() == [
        f"multirun: warning: skipped 3 damaged lines in {damaged} (first at line 1: missing field traceId)"
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "ab"}]}]}]}', "missing field spanId"),
        ('{"resourceSpans": ["x"]}', "not the OTLP JSON layout of spans"),
        (
            '{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "a", "spanId": "b", '
            '"startTimeUnixNano": "soon"}]}]}]}',
            "startTimeUnixNano 'soon' is not a whole number",
        ),
        ("[1, 2]", "not a JSON object"),
        ("{not json", "not JSON"),
        ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "ab"', "cut short"),
    ],
)
def test_a_damaged_line_is_explained_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, reason: str
) -> None:
    (tmp_path / "traces").mkdir()
    damaged = tmp_path / "traces" / "damaged.jsonl"
    damaged.write_text("\n" + line + "\n")
    code, _, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    assert err.splitlines() == [f"multirun: warning: skipped 1 damaged line in {damaged} (line 2: {reason})"]


def test_a_last_line_being_written_is_said_to_be_cut_short_not_no_json(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a writer killed mid-line, or one still writing it, left "not JSON": a file that looked corrupt
    shutil.copytree(demo.directory / "traces", tmp_path / "traces")
    [written] = (tmp_path / "traces").glob("*.jsonl")
    data = written.read_bytes()
    written.write_bytes(data + data[:300])  # the next line, a third of it written so far
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and demo.run_id[:12] in out
    last = data.count(b"\n") + 1
    assert err.splitlines() == [
        f"multirun: warning: skipped 1 damaged line in {written} "
        f"(line {last}: cut short: still being written, or its writer was killed)"
    ]


def otlp_span(span_id: str, run_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A span as a line of a span file holds it."""
    span: dict[str, Any] = {
        "traceId": "ab" * 16,
        "spanId": span_id,
        "name": "invoke_workflow synthetic",
        "startTimeUnixNano": "1763888000000000000",
        "endTimeUnixNano": "1763888001000000000",
        "attributes": [{"key": attr.RUN_ID, "value": {"stringValue": run_id}}] if run_id else [],
    }
    return span | fields


def otlp_line(*spans: dict[str, Any]) -> str:
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": 5}, "name is a number, not text"),
        ({"name": ["a"]}, "name is a list, not text"),
        (
            {"startTimeUnixNano": "99999999999999999999999"},
            "startTimeUnixNano 99999999999999999999999 is out of range",
        ),
        ({"endTimeUnixNano": -1}, "endTimeUnixNano -1 is out of range"),
        ({"status": {"code": 2, "message": 7}}, "message is a number, not text"),
        ({"status": {"code": 9}}, "status code 9 is none of 0, 1, 2"),
        ({"spanId": None}, "missing field spanId"),
        (
            {"events": [{"name": "exception", "attributes": [{"key": "x", "value": {"intValue": "many"}}]}]},
            "attribute x 'many' is not a whole number",
        ),
        (
            {"attributes": [{"key": "b", "value": {"boolValue": "false"}}]},
            "attribute b is text, not true or false",
        ),
    ],
)
def test_a_span_of_the_wrong_types_is_skipped_and_the_others_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], reason: str
) -> None:
    (tmp_path / "traces").mkdir()
    spans = tmp_path / "traces" / "spans.jsonl"
    bad = otlp_span("2" * 16, "b" * 32, **fields)
    spans.write_text(
        otlp_line(otlp_span("1" * 16, "a" * 32), bad) + "\n" + otlp_line(otlp_span("3" * 16, "c" * 32))
    )
    for argv in (["runs"], ["runs", "--json"], ["runs", "show", "aaaa"], ["runs", "show", "aaaa", "--json"]):
        code, out, err = run_cli(capsys, *argv, "--dir", str(tmp_path))
        assert code == 0, err
        assert err.splitlines() == [
            f"multirun: warning: skipped 1 damaged span in {spans} (line 1: {reason})"
        ]
        if argv == ["runs"]:
            assert [line.split()[0] for line in out.splitlines()[1:]] == ["aaaaaaaaaaaa", "cccccccccccc"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", 1e300])
def test_numbers_no_count_can_be_are_left_blank_and_the_json_stays_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any
) -> None:
    # OTLP JSON has NaN and the infinities for a double attribute: valid spans, no counts
    odd = [
        {"key": key, "value": {"doubleValue": value}}
        for key in (attr.TOKENS_USED, attr.COST_USD, attr.STEP_ATTEMPT, attr.STEPS_USED)
    ]
    run = otlp_span("1" * 16, "a" * 32)
    run["attributes"] += odd
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "spans.jsonl").write_text(
        otlp_line(run, otlp_span("2" * 16, parentSpanId="1" * 16, attributes=odd))
    )

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and err == "" and "aaaaaaaaaaaa" in out
    code, out, err = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert code == 0 and err == ""
    assert ("total  0 tokens" in out) is isinstance(value, str)
    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    [listed] = strict(out)
    if value == 1e300:
        assert listed["tokens"] == int(1e300) and listed["cost_usd"] == 1e300
    else:
        assert listed["tokens"] is None and listed["cost_usd"] is None
    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--json", "--dir", str(tmp_path))
    tree = strict(out)
    assert tree["attributes"][attr.COST_USD] == (value if isinstance(value, str) else 1e300)


def test_a_line_separator_inside_a_string_does_not_split_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("run", attributes=run_attrs("d" * 32)):
            pass

    write_spans(tmp_path, build)
    [path] = (tmp_path / "traces").glob("*.jsonl")
    raw = path.read_text().replace('"synthetic"', '"syn\u2028thetic"')  # as another writer may leave it
    path.write_text(raw)
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and err == ""
    assert "syn\u2028thetic" in out


def test_read_spans_reads_like_the_command(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the library call, not only the CLI: one warning per damaged file, U+2028 kept inside a string
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("run", attributes=run_attrs("d" * 32)):
            pass

    write_spans(tmp_path, build)
    [path] = (tmp_path / "traces").glob("*.jsonl")
    path.write_text(path.read_text().replace('"synthetic"', '"syn\u2028thetic"') + "{not json\n[1]\n")
    with caplog.at_level(logging.WARNING, logger="multirun"):
        spans = list(read_spans(tmp_path / "traces"))
    assert [s.name for s in spans] == ["run"]
    assert "syn\u2028thetic" in spans[0].attributes.values()
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 2 damaged lines in {path} (first at line 2: not JSON)"
    ]


def test_a_run_the_collector_wrote_with_an_empty_attribute_key_is_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the Collector's file exporter leaves out a key that is "" (a default); the line is the run
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("invoke_workflow synthetic", attributes=run_attrs("e" * 32)):
            pass

    write_spans(tmp_path, build)
    [path] = (tmp_path / "traces").glob("*.jsonl")
    request = json.loads(path.read_text())
    request["resourceSpans"][0]["resource"]["attributes"].append({"value": {"stringValue": "x"}})
    request["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append({"value": {}})
    path.write_text(json.dumps(request) + "\n")
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert (code, err) == (0, "")
    assert "e" * 12 in out and "synthetic" in out


def test_attribute_values_nested_deeper_than_python_recurses_are_a_damaged_line() -> None:
    nested = '{"arrayValue":{"values":[' * 300 + '{"stringValue":"x"}' + "]}}" * 300
    line = (
        '{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"a","spanId":"b",'
        f'"attributes":[{{"key":"k","value":{nested}}}]}}]}}]}}]}}'
    )
    json.loads(line)  # within the JSON parser's own limit
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 150)  # below the nesting, as a deeper caller would be
    try:
        with pytest.raises(DamagedLine, match="nested too deeply"):
            parse_span_line(line)
    finally:
        sys.setrecursionlimit(limit)


def test_a_binary_file_is_one_warning(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(demo.directory / "traces", tmp_path / "traces")
    binary = tmp_path / "traces" / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)  # 2 KB, with eight newlines among the bytes
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and demo.run_id[:12] in out
    assert err.splitlines() == [
        f"multirun: warning: skipped 9 damaged lines in {binary} (first at line 1: not JSON)"
    ]


def test_a_line_that_is_not_an_object_is_skipped(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(demo.directory / "traces", tmp_path / "traces")
    (tmp_path / "traces" / "damaged.jsonl").write_text("[1, 2]\n")
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert "Traceback" not in err
    assert code == 0 and demo.run_id[:12] in out


def test_an_unreadable_file_is_skipped_with_a_warning(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(demo.directory / "traces", tmp_path / "traces")
    (tmp_path / "traces" / "spans.jsonl").mkdir()  # open() fails: a folder
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and demo.run_id[:12] in out
    assert err.splitlines() == [
        f"multirun: warning: skipping unreadable file {tmp_path / 'traces' / 'spans.jsonl'}: Is a directory"
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_among_the_span_files_is_skipped_not_waited_on(demo: DemoRun, tmp_path: Path) -> None:
    # opening it waited for a writer that never came: the command hung
    shutil.copytree(demo.directory / "traces", tmp_path / "traces")
    pipe = tmp_path / "traces" / "collector.jsonl"
    os.mkfifo(pipe)
    env = _clean_env(PYTHONPATH=str(Path(client_module.__file__).parents[1]))
    for argv in (["runs"], ["runs", "show", demo.run_id[:8]]):
        done = subprocess.run(
            [sys.executable, "-m", "multirun", *argv, "--dir", str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0 and demo.run_id[:12] in done.stdout
        assert done.stderr == f"multirun: warning: skipping {pipe}: not a regular file\n"


def test_an_unreadable_traces_folder_is_an_error_not_no_runs(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], unreadable: Callable[[Path], None]
) -> None:
    shutil.copytree(demo.directory / "traces", tmp_path / "traces")
    unreadable(tmp_path / "traces")
    for argv in (["runs"], ["runs", "--json"], ["runs", "show", demo.run_id]):
        code, out, err = run_cli(capsys, *argv, "--dir", str(tmp_path))
        assert code == 1 and out == ""
        assert err == f"multirun: error: cannot read {tmp_path / 'traces'}: Permission denied\n"
    with pytest.raises(PermissionError):  # the library call too: its spans are not "none"
        list(read_spans(tmp_path / "traces"))


def test_checkpoints_are_listed_though_the_traces_cannot_be_read(
    demo: DemoRun, capsys: pytest.CaptureFixture[str], unreadable: Callable[[Path], None]
) -> None:
    run_id = demo.run_id
    unreadable(demo.directory / "traces")
    code, out, err = run_cli(capsys, "checkpoints", "--dir", str(demo.directory))
    assert code == 0 and run_id[:12] in out
    assert err == (
        f"multirun: warning: cannot read {demo.directory / 'traces'}: Permission denied; "
        "checkpoints are listed without their names\n"
    )


def test_runs_into_a_pipe_closed_early_is_no_error(
    demo: DemoRun, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class ReaderLeaves(io.StringIO):  # `multirun runs show ID | head -1`
        def write(self, text: str) -> int:
            if "\n" in self.getvalue():
                raise BrokenPipeError(32, "Broken pipe")
            return super().write(text)

    pipe = ReaderLeaves()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert main(["runs", "show", demo.run_id, "--dir", str(demo.directory)]) == 0
    assert pipe.getvalue().startswith(f"Run {demo.run_id}")
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full, a device always full")
@pytest.mark.parametrize("json_out", [False, True], ids=["a few lines", "more than a buffer"])
def test_output_to_a_full_disk_is_one_error_line_not_a_traceback(demo: DemoRun, json_out: bool) -> None:
    # `multirun runs show ID --json > run.json` on a full disk ended in an OSError traceback
    src = Path(client_module.__file__).parents[1]
    command = ["runs", "show", demo.run_id, "--json"] if json_out else ["runs"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "multirun", *command, "--dir", str(demo.directory)],
            env=_clean_env(PYTHONPATH=str(src)),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert (done.returncode, done.stderr) == (
        1,
        "multirun: error: cannot write the output: No space left on device\n",
    )


def test_a_warning_its_reader_left_before_does_not_change_the_commands_result(
    demo: DemoRun, tmp_path: Path
) -> None:
    # `multirun runs 2>&1 | head -1`, its first line a warning: the next warning failed the
    # command, which said it could not read the traces folder ("Broken pipe")
    shutil.copytree(demo.directory, tmp_path, dirs_exist_ok=True)
    for number in (1, 2):
        (tmp_path / "traces" / f"damaged-{number}.jsonl").write_text("{cut short\n")
    src = Path(client_module.__file__).parents[1]
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first warning
    try:
        done = subprocess.run(
            [sys.executable, "-m", "multirun", "runs", "--dir", str(tmp_path)],
            env=_clean_env(PYTHONPATH=str(src)),
            stdout=subprocess.PIPE,
            stderr=writer,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert done.returncode == 0
    assert demo.run_id[:12] in done.stdout


@pytest.mark.parametrize("command", [["runs"], ["runs", "show", "7" * 32]])
def test_a_name_the_output_encoding_cannot_hold_is_escaped_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # Windows writes a redirected stdout in its code page (cp1252): `multirun runs > runs.txt`
    # of a run named in Japanese ended in a UnicodeEncodeError traceback
    def build(tracer: Any) -> None:
        named = run_attrs("7" * 32, **{attr.GEN_AI_WORKFLOW_NAME: "日本語"})
        with tracer.start_as_current_span("invoke_workflow 日本語", attributes=named):
            pass

    write_spans(tmp_path, build)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="cp1252", newline="")
    monkeypatch.setattr(sys, "stdout", out)
    assert main([*command, "--dir", str(tmp_path)]) == 0
    out.flush()
    assert "\\u65e5\\u672c\\u8a9e" in raw.getvalue().decode("cp1252")


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "runs", "--limit", "0")
    assert code == 2
    assert "--limit" in err


# ---------------------------------------------------------------------------
# multirun runs show


def test_show_by_prefix_prints_the_tree(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "runs", "show", demo.run_id[:6], "--dir", str(demo.directory))
    assert code == 0
    assert demo.run_id in out.splitlines()[0]
    lines = tree_lines(out)
    assert lines[1].startswith("invoke_workflow research_crew")
    assert len(lines) == 1 + len(demo.run_spans())
    assert out.splitlines()[-1].startswith("total")
    # the same tree as the demo printed
    assert lines == tree_lines(demo.output)


def test_show_accepts_dir_before_the_subcommand(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "runs", "--dir", str(demo.directory), "show", demo.run_id)
    assert code == 0
    assert "invoke_agent writer" in out


def test_show_json(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "runs", "show", demo.run_id, "--dir", str(demo.directory), "--json")
    assert code == 0
    tree = json.loads(out)
    assert tree["attributes"][attr.RUN_ID] == demo.run_id
    assert [c["name"] for c in tree["children"]] == [
        "invoke_agent planner",
        "invoke_agent researcher",
        "invoke_agent writer",
    ]


def test_show_unknown_id(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "runs", "show", "nope", "--dir", str(demo.directory))
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"multirun: error: no run with id 'nope' (see `multirun runs --dir {demo.directory}`)"
    ]


def test_the_listing_an_unknown_run_id_error_suggests_is_of_the_same_folder(
    demo: DemoRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # it said "see `multirun runs`", which, pasted, listed the runs of ./.multirun instead
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTIRUN_DIR", raising=False)
    _, _, err = run_cli(capsys, "runs", "show", "nope", "--dir", str(demo.directory))
    [suggested] = re.findall(r"`(multirun [^`]*)`", err)
    code, out, _ = run_cli(capsys, *shlex.split(suggested)[1:])
    assert code == 0 and demo.run_id[:12] in out


def test_show_takes_the_trace_id_of_the_heading(demo: DemoRun, capsys: pytest.CaptureFixture[str]) -> None:
    # a trace id copied from Jaeger or Tempo (or from the heading) said "no run with id"
    trace_id = demo.run_span.trace_id
    assert f"trace {trace_id}" in demo.output
    code, out, _ = run_cli(capsys, "runs", "show", trace_id.upper(), "--dir", str(demo.directory))
    assert code == 0
    assert tree_lines(out) == tree_lines(demo.output)


def test_a_trace_of_two_runs_names_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("request"):
            for run_id in ("abc1" + "0" * 28, "def2" + "0" * 28):
                with tracer.start_as_current_span("run", attributes=run_attrs(run_id)):
                    pass

    write_spans(tmp_path, build)
    [trace_id] = {s.trace_id for s in read_spans(tmp_path / "traces")}
    code, _, err = run_cli(capsys, "runs", "show", trace_id, "--dir", str(tmp_path))
    assert code == 1
    assert f"trace {trace_id} holds 2 runs" in err
    assert "abc10000" in err and "def20000" in err


def test_show_ambiguous_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def build(tracer: Any) -> None:
        for run_id in ("abc1" + "0" * 28, "abc2" + "0" * 28):
            with tracer.start_as_current_span("run", attributes=run_attrs(run_id)):
                pass

    write_spans(tmp_path, build)
    code, _, err = run_cli(capsys, "runs", "show", "abc", "--dir", str(tmp_path))
    assert code == 1
    assert "ambiguous" in err and "'abc'" in err
    code, out, _ = run_cli(capsys, "runs", "show", "abc2", "--dir", str(tmp_path))
    assert code == 0 and "abc2" in out


def test_show_failures_skips_unpriced_and_foreign_spans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("invoke_workflow synthetic", attributes=run_attrs("f" * 32)):
            with tracer.start_as_current_span(
                "step parse",
                attributes={
                    attr.STEP_KIND: "function",
                    attr.STEP_STATUS: "failed",
                    attr.STEP_ATTEMPT: 3,
                    attr.ERROR_TYPE: "ValueError",
                },
            ):
                pass
            with tracer.start_as_current_span(
                "chat my-model",
                attributes={
                    attr.STEP_KIND: "llm_call",
                    attr.STEP_STATUS: "skipped",
                    attr.TOKENS_USED: 1200,
                    attr.UNPRICED: True,
                },
            ):
                pass
            with tracer.start_as_current_span("POST /v1/chat", record_exception=False) as span:
                span.set_status(Status(StatusCode.ERROR, "boom"))
                span.record_exception(TimeoutError("slow"))

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "show", "ff", "--dir", str(tmp_path))
    assert code == 0
    header, _root, failed, skipped, foreign = tree_lines(out)
    assert "failed" in failed and "attempt 3" in failed and "error: ValueError" in failed
    assert "skipped" in skipped and "1,200" in skipped and "unpriced" in skipped
    assert foreign.startswith("└─ POST /v1/chat")
    assert "error: TimeoutError: slow" in foreign
    # aligned: every column starts where its header does
    for column, lines, values in (
        ("STATUS", [failed, skipped, foreign], ["failed", "skipped", "error"]),
        ("NOTES", [failed], ["attempt 3"]),
    ):
        at = header.index(column)
        for line, value in zip(lines, values, strict=True):
            assert line[at:].startswith(value), (column, line)


def test_children_are_ordered_by_start_time() -> None:
    def record(name: str, span_id: str, parent: str, start: int, trace: str = "t") -> SpanRecord:
        return SpanRecord(name, trace, span_id, parent, start, start + 10, {})

    root = record("root", "r", "", 0)
    spans = [
        record("late", "b", "r", 50),
        record("early", "a", "r", 10),
        record("deep", "c", "a", 20),
        record("other trace", "x", "r", 5, trace="u"),
        record("not below the run", "y", "", 1),
    ]
    tree = runs.build_tree([root, *spans], root)
    assert [n.span.name for n in tree.walk()] == ["root", "early", "deep", "late"]


def test_a_step_whose_name_is_part_of_its_model_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "chat gpt-4o" holds "chat" and "gpt": those steps went by their model alone
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("invoke_workflow synthetic", attributes=run_attrs("a" * 32)):
            for span_name, step_name in [
                ("chat gpt-4o", "chat"),
                ("chat gpt-4o", "gpt"),
                ("chat gpt-4o", "gpt-4o"),
                ("execute_tool search", "search"),
                ("step add_sources", "add_sources"),
            ]:
                with tracer.start_as_current_span(span_name, attributes={attr.STEP_NAME: step_name}):
                    pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert code == 0
    assert [line.split("  ")[0] for line in tree_lines(out)[2:]] == [
        "├─ chat gpt-4o (chat)",
        "├─ chat gpt-4o (gpt)",
        "├─ chat gpt-4o",
        "├─ execute_tool search",
        "└─ step add_sources",
    ]


def write_a_run_handed_on(directory: Path, hops: int) -> None:
    """A run (id ``a...``) that hands itself on ``hops`` times, each hop a child of the last
    (a thread, or a queue's next worker, continuing it)."""

    def build(tracer: Any) -> None:
        attributes = run_attrs("a" * 32, **{attr.RUN_STATUS: "completed"})
        spans = [tracer.start_span("invoke_workflow synthetic", attributes=attributes)]
        for hop in range(1, hops + 1):
            spans.append(tracer.start_span(f"step hop{hop}", context=trace.set_span_in_context(spans[-1])))
        for span in reversed(spans):
            span.end()

    write_spans(directory, build)


def test_a_run_nested_deeper_than_python_recurses_is_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it ended in a RecursionError traceback
    hops = sys.getrecursionlimit() + 200
    write_a_run_handed_on(tmp_path, hops)
    code, out, err = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert (code, err) == (0, "")
    rows = tree_lines(out)[1:]
    assert len(rows) == hops + 1
    assert rows[1].startswith("└─ step hop1 ") and rows[2].startswith("   └─ step hop2 ")


def test_every_span_of_a_deep_tree_is_named_and_its_lines_stay_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # from 16 levels down the 48-column cell held glyphs only: every deeper row was "   …"
    hops = 40
    write_a_run_handed_on(tmp_path, hops)
    code, out, err = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert (code, err) == (0, "")
    _header, _root, *rows = tree_lines(out)
    assert len(rows) == hops
    for hop, row in enumerate(rows, 1):
        if hop <= render.MAX_TREE_LEVELS:  # drawn as a tree
            assert row.startswith("   " * (hop - 1) + f"└─ step hop{hop} "), row
        else:  # deeper: the level said instead of drawn
            assert row.startswith(f"…({hop}) └─ step hop{hop} "), row
    assert max(map(render.display_width, tree_lines(out))) < 150


def test_a_run_nested_deeper_than_json_dumps_recurses_is_printed_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # json.dumps takes two calls a hop: it ended in a RecursionError traceback from 500 hops
    limit = sys.getrecursionlimit()
    hops = limit * 3 // 5
    write_a_run_handed_on(tmp_path, hops)
    code, out, err = run_cli(capsys, "runs", "show", "aaaa", "--json", "--dir", str(tmp_path))
    assert (code, err) == (0, "")
    sys.setrecursionlimit(4 * hops)  # for json.loads, which recurses too
    try:
        node = json.loads(out)
    finally:
        sys.setrecursionlimit(limit)
    names = []
    while node["children"]:
        [node] = node["children"]
        names.append(node["name"])
    assert names == [f"step hop{hop}" for hop in range(1, hops + 1)]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0123, "12ms"), (1.5, "1.50s"), (125, "2m05s"), (7300, "2h01m")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert render.format_duration(seconds) == text


def test_format_cost() -> None:
    assert render.format_cost(0.000123) == "$0.000123"
    assert render.format_cost(0.5, unpriced=True) == "$0.500000 + unpriced"
    assert render.format_cost(0.0, unpriced=True) == "unpriced"
    assert render.format_cost(None, unpriced=True) == "unpriced"
    assert render.format_cost(None) == ""


def test_a_run_with_priced_and_unpriced_usage_shows_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        spend = {attr.COST_USD: 3.0, attr.UNPRICED: True, attr.TOKENS_USED: 1, attr.STEPS_USED: 1}
        with tracer.start_as_current_span(
            "invoke_workflow synthetic", attributes=run_attrs("c" * 32, **spend)
        ):
            pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and out.splitlines()[1].endswith("$3.000000 + unpriced")
    code, out, _ = run_cli(capsys, "runs", "show", "cc", "--dir", str(tmp_path))
    total = out.splitlines()[-1]
    assert code == 0
    assert total.startswith("total  1 token  ·  $3.000000 + unpriced  ·  1 step  ·  "), total


def test_plural() -> None:
    assert [render.plural(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert render.plural(1200, "token", "1,200") == "1,200 tokens"


def test_the_totals_line_groups_the_digits_of_every_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it said "12,500 tokens" but "10000 steps"
    def build(tracer: Any) -> None:
        spend = {attr.TOKENS_USED: 12_500, attr.STEPS_USED: 10_000, attr.RUN_STATUS: "completed"}
        tracer.start_span("invoke_workflow synthetic", attributes=run_attrs("a" * 32, **spend)).end()

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert code == 0
    assert out.splitlines()[-1].startswith("total  12,500 tokens  ·  $0.000000  ·  10,000 steps  ·  ")


def test_show_of_a_failed_run_has_its_error_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        attributes = run_attrs("e" * 32, **{attr.RUN_STATUS: "failed", attr.ERROR_TYPE: "RuntimeError"})
        with tracer.start_as_current_span("invoke_workflow synthetic", attributes=attributes) as span:
            span.record_exception(RuntimeError("boom\nsecond line"))
            span.set_status(Status(StatusCode.ERROR, "RuntimeError: boom"))

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "show", "ee", "--dir", str(tmp_path))
    assert code == 0
    assert tree_lines(out)[1].endswith("error: RuntimeError: boom")
    code, out, _ = run_cli(capsys, "runs", "show", "ee", "--dir", str(tmp_path), "--json")
    tree = json.loads(out)
    assert tree["error_type"] == "RuntimeError" and tree["error_message"] == "boom\nsecond line"
    [event] = tree["events"]
    assert event["name"] == "exception"
    assert event["attributes"]["exception.message"] == "boom\nsecond line"


def test_show_of_a_resumed_run_says_from_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original, checkpoint_id = "a" * 32, "18ea" + "0" * 28
    resumed = {attr.RUN_RESUMED_FROM: original, attr.CHECKPOINT_ID: checkpoint_id, attr.STEPS_USED: 3}

    def build(tracer: Any) -> None:
        with tracer.start_as_current_span(
            "invoke_workflow synthetic", attributes=run_attrs("b" * 32, **resumed)
        ):
            pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "show", "bb", "--dir", str(tmp_path))
    assert code == 0
    assert out.splitlines()[1] == f"Resumed from checkpoint {checkpoint_id} of run {original}"
    total = out.splitlines()[-1]
    assert "3 steps" in total and total.endswith(
        f"(includes the spend carried over from run {original[:12]})"
    )


# ---------------------------------------------------------------------------
# names and messages as the table shows them


def test_control_characters_are_escaped_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        with tracer.start_as_current_span(
            "invoke_workflow nightly\nreport",
            attributes=run_attrs("a" * 32, **{attr.GEN_AI_WORKFLOW_NAME: "nightly\nreport"}),
        ):
            step = {attr.STEP_STATUS: "failed", attr.ERROR_TYPE: "RuntimeError"}
            with tracer.start_as_current_span("step fetch\tpage\u202e", attributes=step) as span:
                span.set_status(Status(StatusCode.ERROR, "RuntimeError: bad \x1b[31mred\x1b[0m\x07 thing"))

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    _, row = out.splitlines()  # one line for the run
    assert row.split()[:2] == ["aaaaaaaaaaaa", "nightly\\nreport"]

    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\t" not in out and "\u202e" not in out
    assert out.splitlines()[0].startswith("Run " + "a" * 32 + " (nightly\\nreport)")
    header, root, step = tree_lines(out)
    assert root.startswith("invoke_workflow nightly\\nreport ")
    assert step.startswith("└─ step fetch\\tpage\\u202e ")
    assert step.endswith("error: RuntimeError: bad \\x1b[31mred\\x1b[0m\\x07 thing")
    assert step.index("failed") == header.index("STATUS")

    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--json", "--dir", str(tmp_path))
    assert json.loads(out)["name"] == "invoke_workflow nightly\nreport"  # JSON keeps them as they are


def column_at(line: str, text: str) -> int:
    """The terminal column where ``text`` starts on ``line`` (a CJK character takes two)."""
    before = line[: line.index(text)]
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in before
    )


def test_wide_characters_keep_the_columns_aligned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = {"a": "日本語の実行 🚀", "b": "ascii_run", "c": "cafe\u0301"}  # wide, narrow, a combining mark

    def build(tracer: Any) -> None:
        for letter, name in names.items():
            attributes = run_attrs(
                letter * 32, **{attr.GEN_AI_WORKFLOW_NAME: name, attr.RUN_STATUS: "completed"}
            )
            with (
                tracer.start_as_current_span(f"invoke_workflow {name}", attributes=attributes),
                tracer.start_as_current_span("step 要約する", attributes={attr.STEP_STATUS: "completed"}),
            ):
                pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    header, *rows = out.splitlines()
    assert len(rows) == 3
    for row in rows:
        assert column_at(row, "completed") == column_at(header, "STATUS"), row
    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    header, root, step = tree_lines(out)
    for line in (root, step):
        assert column_at(line, "completed") == column_at(header, "STATUS"), line


def test_display_width() -> None:
    assert [render.display_width(t) for t in ("abc", "日本", "🚀", "e\u0301", "a\u200db")] == [3, 4, 2, 1, 2]


def test_a_very_long_name_is_cut_short_in_the_table_and_kept_whole_in_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_name = "n" * 255 + "Z"  # the longest name @run takes

    def build(tracer: Any) -> None:
        for letter, name in (("a", long_name), ("b", "short")):
            attributes = run_attrs(letter * 32, **{attr.GEN_AI_WORKFLOW_NAME: name})
            with tracer.start_as_current_span(f"invoke_workflow {name}", attributes=attributes):
                pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines) < 130  # not 330: the other rows stay as they were
    [cut] = [line.split()[1] for line in lines if line.startswith("aaaa")]
    assert cut == "n" * (render.MAX_CELL_WIDTH - 1) + "…"

    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert f"({long_name})" in out.splitlines()[0]  # the heading names it whole
    assert tree_lines(out)[1].startswith("invoke_workflow " + "n" * (render.MAX_CELL_WIDTH - 17) + "… ")

    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    assert {run["name"] for run in json.loads(out)} == {long_name, "short"}


def test_shorten_counts_columns() -> None:
    assert render.shorten("abcdef", 6) == "abcdef"
    assert render.shorten("abcdef", 4) == "abc…"
    assert render.shorten("日本語の実行", 6) == "日本…"  # 2 + 2 + 1 columns; a third would make 7


# ---------------------------------------------------------------------------
# policy decisions

GOVERNED_PROGRAM = """
import multirun
from multirun import run, step
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import GracefulDegradationRule, RateLimitRule
multirun.init_local()

@step(kind=StepKind.LLM_CALL, model="gpt-4o")
def ask():
    multirun.report_usage(input_tokens=1000, output_tokens=1000)

@run(name="paced", policy=Policy(rate_limit=RateLimitRule(requests_per_minute=120)))
def paced():
    ask()
    ask()

degrade = GracefulDegradationRule(fallback_model="gpt-4o-mini", threshold=40)

@run(name="degraded", budget=Budget(max_cost_usd=0.05), policy=Policy(graceful_degradation=degrade))
def degraded():
    for _ in range(3):
        ask()

both_rules = Policy(rate_limit=RateLimitRule(requests_per_minute=120), graceful_degradation=degrade)

@run(name="both", budget=Budget(max_cost_usd=0.05), policy=both_rules)
def both():
    for _ in range(3):
        ask()

paced()
degraded()
both()
"""


def test_runs_show_notes_the_policy_decisions_of_each_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step the policy made wait for its rate-limit slot, or gave the fallback model, says so
    in the tree: the governing is visible without --json."""
    src = Path(client_module.__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-c", GOVERNED_PROGRAM],
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=str(src)),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    folder = tmp_path / ".multirun"
    shown = {}
    for listed in runs.list_runs(folder):
        code, out, err = run_cli(capsys, "runs", "show", "--dir", str(folder), listed.run_id)
        assert code == 0 and err == ""
        shown[listed.name] = [line for line in tree_lines(out) if "(ask)" in line]
    first, second = shown["paced"]
    assert first.endswith("$0.012500")  # the first call had its slot at once
    assert re.search(r"\$0\.012500  waited 0\.\d\ds \(rate_limit\)$", second), second
    *spent, fell_back = shown["degraded"]
    assert all(line.endswith("$0.012500") for line in spent)
    assert re.search(r"chat gpt-4o-mini \(ask\) .* fallback model \(graceful_degradation\)$", fell_back)
    assert "waited" not in fell_back
    *_, waited_and_fell_back = shown["both"]  # it waited for its slot, and got the fallback model
    assert re.search(
        r"chat gpt-4o-mini \(ask\) .* waited 0\.\d\ds \(rate_limit\); "
        r"fallback model \(graceful_degradation\)$",
        waited_and_fell_back,
    ), waited_and_fell_back


# ---------------------------------------------------------------------------
# unfinished runs: the run span was never written

CRASHING_PROGRAM = """
import os, multirun
from multirun import agent, run, step
multirun.init_local()

@step
def ask():
    multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=20)

@step(checkpoint=True)
def save():
    pass

@agent(name="worker")
def worker():
    ask()
    save()
    multirun.get_client().force_flush()
    os._exit(1)  # killed before the agent and the run end

@run(name="crashy")
def crashy():
    worker()

crashy()
"""


def test_a_run_whose_process_died_is_listed_as_unfinished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = Path(client_module.__file__).parents[1]  # the package under test, not another install
    env = _clean_env(PYTHONPATH=str(src))
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_PROGRAM], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    [run_dir] = (tmp_path / ".multirun" / "blobs" / "checkpoints").iterdir()
    run_id = run_dir.name  # the run id its checkpoint was saved under
    folder = str(tmp_path / ".multirun")

    code, out, err = run_cli(capsys, "runs", "--dir", folder)
    assert code == 0 and err == ""
    _, row = out.splitlines()
    assert row.split()[:3] == [run_id[:12], "(unknown)", "unfinished"]
    assert row.split()[-2:] == ["30", "$0.000013"]  # what the steps that ended used

    code, out, err = run_cli(capsys, "runs", "show", run_id[:8], "--dir", folder)
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith(f"Run {run_id} (name unknown)")
    assert out.splitlines()[1].startswith("Unfinished: its own span was never written")
    lines = tree_lines(out)
    assert lines[1].split()[:3] == ["(unfinished", "run)", "unfinished"]
    assert [line.split()[1:3] for line in lines[2:]] == [["step", "ask"], ["step", "save"]]

    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", folder)
    [listed] = json.loads(out)
    assert listed["run_id"] == run_id and listed["status"] == "unfinished" and listed["name"] is None


KILLED_PROGRAM = """
import os, signal, multirun
from multirun import run, step
multirun.init_local()

@step(checkpoint=True)
def save():
    pass

@run(name="killed")
def killed():
    save()
    os.kill(os.getpid(), signal.SIGKILL)  # before the batch of its spans is written

killed()
"""


def test_runs_of_a_folder_whose_run_was_killed_points_to_its_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the run's spans never reached the traces, but its checkpoint is there to resume from:
    # "No runs" alone would tell the user there is nothing left of it
    src = Path(client_module.__file__).parents[1]
    env = _clean_env(PYTHONPATH=str(src))
    done = subprocess.run(
        [sys.executable, "-c", KILLED_PROGRAM], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    folder = str(tmp_path / ".multirun")
    code, out, err = run_cli(capsys, "runs", "--dir", folder)
    assert code == 0 and err == ""
    no_runs, hint = out.splitlines()
    assert no_runs == f"No runs in {tmp_path / '.multirun' / 'traces'}."
    assert f"`multirun checkpoints --dir {folder}`" in hint and "multirun resume" in hint

    code, out, err = run_cli(capsys, "checkpoints", "--dir", folder)
    assert code == 0 and "killed" not in err and len(out.splitlines()) == 2  # a header and the checkpoint


def test_runs_of_an_empty_folder_says_how_to_make_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "blobs" / "checkpoints").mkdir(parents=True)  # a store, with no checkpoint in it
    code, out, err = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0 and err == ""
    assert out.splitlines() == [f"No runs in {tmp_path / 'traces'}.", NO_RUNS_HINT]


def test_an_unfinished_run_that_saved_no_checkpoint_goes_by_its_trace_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        never_ends = tracer.start_span("invoke_workflow synthetic", attributes=run_attrs("c" * 32))
        step = {attr.STEP_STATUS: "completed"}
        with (
            trace.use_span(never_ends, end_on_exit=False),
            tracer.start_as_current_span("step one", attributes=step),
        ):
            pass

    write_spans(tmp_path, build)
    [step] = read_spans(tmp_path / "traces")
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    assert out.splitlines()[1].split()[:3] == [step.trace_id[:12], "(unknown)", "unfinished"]
    code, out, _ = run_cli(capsys, "runs", "show", step.trace_id[:8], "--dir", str(tmp_path))
    assert code == 0 and tree_lines(out)[2].startswith("└─ step one")
    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    assert json.loads(out)[0]["run_id"] is None and json.loads(out)[0]["trace_id"] == step.trace_id


def test_spans_whose_parent_is_elsewhere_are_no_unfinished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def parent(is_remote: bool) -> Any:
        context = SpanContext(0xAB, 0xCD, is_remote=is_remote, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        return trace.set_span_in_context(NonRecordingSpan(context))

    def build(tracer: Any) -> None:
        # a run continued from a message: its parent is in the sender's process
        continued = run_attrs("d" * 32, **{attr.RUN_STATUS: "completed"})
        with (
            tracer.start_as_current_span("invoke_workflow continued", parent(True), attributes=continued),
            tracer.start_as_current_span("step one", attributes={attr.STEP_STATUS: "completed"}),
        ):
            pass
        # another instrumentation's span, under a span that is not in these files
        with tracer.start_as_current_span("GET /health", parent(False)):
            pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    assert code == 0
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["completed"]


# ---------------------------------------------------------------------------
# colours


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colours_on_a_terminal_unless_no_color(demo: DemoRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    for no_color, coloured in ((None, True), ("1", False)):
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stdout", terminal)
        assert main(["runs", "show", demo.run_id, "--dir", str(demo.directory)]) == 0
        assert ("\x1b[32mcompleted\x1b[0m" in terminal.getvalue()) is coloured


def test_no_colours_on_a_dumb_terminal(demo: DemoRun, monkeypatch: pytest.MonkeyPatch) -> None:
    # TERM=dumb (Emacs' shell, some CI logs) shows escape codes as text: they were written
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["runs", "show", demo.run_id, "--dir", str(demo.directory)]) == 0
    assert "completed" in terminal.getvalue() and "\x1b" not in terminal.getvalue()


# ---------------------------------------------------------------------------
# the installed console script, in a fresh process


def _clean_env(**extra: str) -> dict[str, str]:
    env = environment_without_settings()
    env.update(extra)
    return env


@pytest.mark.skipif(MULTIRUN is None, reason="the multirun console script is not installed")
def test_console_script_demo_uses_the_default_folder(tmp_path: Path) -> None:
    assert MULTIRUN is not None
    done = subprocess.run(
        [MULTIRUN, "demo"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "invoke_workflow research_crew" in done.stdout
    assert list((tmp_path / ".multirun" / "traces").glob("*.jsonl"))
    assert list((tmp_path / ".multirun" / "blobs" / "checkpoints").glob("*/*.ckpt"))
    assert "Again:       multirun runs show " in done.stdout  # no --dir: the default folder

    listed = subprocess.run(
        [MULTIRUN, "runs"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and "research_crew" in listed.stdout


ROOT = Path(__file__).resolve().parents[1]


def _installed_venv(folder: Path) -> Path:
    """A folder that ``scripts/demo`` takes for its virtual environment with the package already
    installed (its stamp says so): this interpreter, and a ``multirun`` of the package under test."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").symlink_to(sys.executable)
    multirun_command = folder / "bin" / "multirun"
    multirun_command.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m multirun "$@"\n')
    multirun_command.chmod(0o755)
    project = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    spec = hashlib.sha1(b".").hexdigest()[:12]  # scripts/demo installs "."
    (folder / f".installed-{project}-{spec}").touch()
    return folder


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha1sum") is None, reason="bash, coreutils")
def test_scripts_demo_run_from_another_folder_writes_there_so_that_its_hints_work(tmp_path: Path) -> None:
    # it ran the demo in the checkout, so that `multirun runs show ID`, as printed, found no run
    venv = _installed_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(MULTIRUN_VENV=str(venv), PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [str(ROOT / "scripts" / "demo")], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert list((work / ".multirun" / "traces").glob("*.jsonl"))
    again = next(line for line in done.stdout.splitlines() if line.startswith("Again:"))
    command = shlex.split(again.split(":", 1)[1])
    assert command[:3] == ["multirun", "runs", "show"]
    shown = subprocess.run(
        [str(venv / "bin" / "multirun"), *command[1:]], cwd=work, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "invoke_workflow research_crew" in shown.stdout


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that accepts everything and remembers the paths."""

    paths: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Refusing(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that refuses every export as malformed (not retried)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _RefusingCollector() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(MULTIRUN is None, reason="the multirun console script is not installed")
def test_console_script_demo_sends_to_a_collector(tmp_path: Path) -> None:
    assert MULTIRUN is not None
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        done = subprocess.run(
            [MULTIRUN, "demo", "--dir", str(tmp_path)],
            env=_clean_env(OTEL_EXPORTER_OTLP_ENDPOINT=url),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert "/v1/traces" in _Collector.paths
    assert "invoke_workflow research_crew" in done.stdout
    assert f"to {url}" in done.stdout
    assert not (tmp_path / "traces").exists()  # the collector got them, not files


def test_demo_with_nothing_listening_at_the_endpoint_says_so_before_running_the_crew(tmp_path: Path) -> None:
    """A refused connection is known at once: no crew run, no exporter retries, two lines."""
    src = Path(client_module.__file__).parents[1]  # the package under test, in a fresh process
    command = "import sys; from multirun.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", command, "demo", "--dir", str(tmp_path), "--endpoint", "http://127.0.0.1:9"],
        env=_clean_env(PYTHONPATH=str(src)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "multirun: error: cannot send the spans to http://127.0.0.1:9: "
        "nothing accepts connections on 127.0.0.1:9 (Connection refused)",
        "Is a collector listening there? Without an endpoint the demo writes files.",
    ]
    assert not (tmp_path / "traces").exists()


def test_demo_names_the_endpoint_of_the_environment_when_nothing_listens_there(tmp_path: Path) -> None:
    src = Path(client_module.__file__).parents[1]
    command = "import sys; from multirun.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", command, "demo", "--dir", str(tmp_path)],
        env=_clean_env(
            PYTHONPATH=str(src), OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        "cannot send the spans to http://127.0.0.1:9/v1/traces: nothing accepts connections on 127.0.0.1:9"
        in (done.stderr)
    )


def test_demo_whose_collector_refuses_the_spans_says_so_in_one_line_and_no_more(tmp_path: Path) -> None:
    """It listens, but the export fails: the exporter's reason, once, and no retry warnings after it."""
    src = Path(client_module.__file__).parents[1]
    command = "import sys; from multirun.cli import main; sys.exit(main())"
    with _RefusingCollector() as url:
        done = subprocess.run(
            [sys.executable, "-c", command, "demo", "--dir", str(tmp_path), "--endpoint", url],
            env=_clean_env(PYTHONPATH=str(src), OTEL_EXPORTER_OTLP_TIMEOUT="2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "invoke_workflow research_crew" in done.stdout  # the crew ran and is shown
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"multirun: error: could not send the spans to {url}: ")
    assert lines[1] == "Is a collector listening there? Without an endpoint the demo writes files."


class _TracesOnly(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that takes traces only, as Jaeger does: 404 for /v1/metrics."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_demo_sent_to_a_backend_that_takes_no_metrics_says_the_run_was_sent(tmp_path: Path) -> None:
    """Sent straight to Jaeger, the spans arrive and only the metrics are refused: the demo says
    the run was sent, exits 0, and warns about the metrics in one line (it said the spans failed)."""
    src = Path(client_module.__file__).parents[1]
    command = "import sys; from multirun.cli import main; sys.exit(main())"
    server = HTTPServer(("127.0.0.1", 0), _TracesOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", command, "demo", "--dir", str(tmp_path), "--endpoint", url],
            env=_clean_env(PYTHONPATH=str(src), OTEL_EXPORTER_OTLP_TIMEOUT="2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert "\nSent:        run " in done.stdout
    [written] = tmp_path.glob("blobs/checkpoints/*/*.ckpt")
    assert f"\nCheckpoint:  {written}\n" in done.stdout  # sent or not, the checkpoint is in a file
    [line] = done.stderr.splitlines()
    assert line.startswith(f"multirun: warning: the run's spans were sent to {url}, but not its metrics: ")
    assert "404" in line and "Jaeger" in line


@pytest.mark.skipif(MULTIRUN is None, reason="the multirun console script is not installed")
def test_console_script_demo_says_when_the_collector_is_unreachable(tmp_path: Path) -> None:
    assert MULTIRUN is not None
    done = subprocess.run(
        [MULTIRUN, "demo", "--dir", str(tmp_path), "--endpoint", "http://127.0.0.1:9"],
        env=_clean_env(OTEL_EXPORTER_OTLP_TIMEOUT="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "send the spans to http://127.0.0.1:9: nothing accepts connections" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# big span files: read a line at a time, a summary kept per run


def big_span_file(directory: Path, megabytes: int) -> tuple[Path, list[str]]:
    """``directory/traces`` with one file of about ``megabytes`` MB: runs of 200 steps (a line
    each, as the exporter writes them) and, every 50th, one whose run span was never written.
    Returns the file and the run ids (an unfinished run's is its trace id, ``<n>aaa...``)."""

    def build(tracer: Any, finished: bool) -> None:
        run = tracer.start_span("invoke_workflow big", attributes=run_attrs("f" * 32))
        with trace.use_span(run, end_on_exit=finished), tracer.start_as_current_span("invoke_agent worker"):
            for n in range(200):
                step = {attr.STEP_STATUS: "completed", "multirun.step.name": f"work {n}", attr.TOKENS_USED: 7}
                with tracer.start_as_current_span("step work", attributes=step):
                    pass

    templates = []
    for finished in (True, False):
        write_spans(directory / str(finished), lambda tracer, finished=finished: build(tracer, finished))
        [path] = (directory / str(finished) / "traces").iterdir()
        text = path.read_text()
        templates.append((text, read_spans(path.parent).__next__().trace_id))
        shutil.rmtree(directory / str(finished))
    (directory / "traces").mkdir(parents=True)
    path = directory / "traces" / "big.jsonl"
    run_ids = []
    with path.open("w") as out:
        n = 0
        while out.tell() < megabytes << 20:
            text, trace_id = templates[n % 50 == 49]
            run_id, trace_id_n = f"{n:08x}" + "b" * 24, f"{n:08x}" + "a" * 24
            out.write(text.replace(trace_id, trace_id_n).replace("f" * 32, run_id))
            run_ids.append(run_id if n % 50 != 49 else trace_id_n)
            n += 1
    return path, run_ids


def peak_memory(call: Callable[[], Any]) -> int:
    """The most memory Python allocated while ``call`` ran, in bytes."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_runs_runs_show_and_checkpoints_of_a_big_file_keep_far_less_than_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading a file whole (and every span in it) took about four times its size; read a line
    at a time, what the commands keep is a summary per run and the spans of the run shown."""
    path, run_ids = big_span_file(tmp_path, 20)
    size = path.stat().st_size

    listing = peak_memory(lambda: main(["runs", "--dir", str(tmp_path), "--limit", "3"]))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 3 + 1 and out[-1] == f"... and {len(run_ids) - 3} older (use --limit)"
    assert listing < size // 6, f"{listing / size:.2f} times the file"

    shown = peak_memory(lambda: main(["runs", "show", run_ids[49][:8], "--dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "Unfinished" in out and len(tree_lines(out)) == 2 + 1 + 200  # header, run, agent, steps
    assert shown < size // 6, f"{shown / size:.2f} times the file"

    # the checkpoints' listing reads the traces for the checkpoints' names and the runs' ids
    listed = peak_memory(lambda: main(["checkpoints", "--dir", str(tmp_path), "--run", run_ids[7][:8]]))
    assert capsys.readouterr().out == f"No checkpoints of run {run_ids[7]}.\n"
    assert listed < size // 6, f"{listed / size:.2f} times the file"


def test_runs_of_a_file_of_many_small_traces_keeps_far_less_than_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A web server's requests, each its own trace of one span (another instrumentation's, in
    the same files): a trace that ended is forgotten, not kept for each of them."""
    (tmp_path / "traces").mkdir()
    requests = [
        otlp_span(f"{n:016x}", traceId=f"{n:032x}", name="GET /health", flags=256) for n in range(1, 30_001)
    ]
    lines = [otlp_line(*requests[at : at + 512]) for at in range(0, len(requests), 512)]
    path = tmp_path / "traces" / "web.jsonl"
    path.write_text("\n".join([*lines, otlp_line(otlp_span("f" * 16, "a" * 32, flags=256))]) + "\n")

    listing = peak_memory(lambda: main(["runs", "--json", "--dir", str(tmp_path)]))
    assert [run["run_id"] for run in json.loads(capsys.readouterr().out)] == ["a" * 32]
    size = path.stat().st_size
    # 2.5 times the file when every trace was kept; now a reading's fixed cost (one line of 512
    # spans parsed, the table of closed traces): 0.13x-0.18x of this file on Python 3.10-3.13
    assert listing < size // 2, f"{listing / size:.2f} times the file"


def test_spans_written_twice_are_counted_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two exporters writing one folder, or a file copied: each run once, its spend once."""

    def build(tracer: Any) -> None:
        with tracer.start_as_current_span("invoke_workflow synthetic", attributes=run_attrs("a" * 32)):
            tracer.start_span("step one", attributes={attr.STEP_STATUS: "completed"}).end()
        never_ends = tracer.start_span("invoke_workflow synthetic", attributes=run_attrs("b" * 32))
        with trace.use_span(never_ends, end_on_exit=False):
            tracer.start_span(
                "step two", attributes={attr.STEP_STATUS: "completed", attr.TOKENS_USED: 7}
            ).end()

    write_spans(tmp_path, build)
    [path] = (tmp_path / "traces").iterdir()
    shutil.copy(path, path.with_name("copy.jsonl"))
    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    assert code == 0
    assert sorted((run["run_id"] or "", run["status"], run["tokens"]) for run in json.loads(out)) == [
        ("", "unfinished", 7),  # no checkpoint says its run id
        ("a" * 32, "", None),
    ]


def test_a_span_that_ends_after_its_run_is_no_unfinished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A thread the run started and did not wait for writes its span after the run's: its
    parent was written, in an earlier line (the lister forgets a finished run's spans, and
    reads the files again to find that parent)."""

    def build(tracer: Any) -> None:
        with (
            tracer.start_as_current_span("invoke_workflow synthetic", attributes=run_attrs("a" * 32)),
            tracer.start_as_current_span("step start_worker", attributes={attr.STEP_STATUS: "completed"}),
        ):
            late = tracer.start_span("step background", attributes={attr.STEP_STATUS: "completed"})
        late.end()

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    assert code == 0
    assert [(run["run_id"], run["status"]) for run in json.loads(out)] == [("a" * 32, "")]
    code, out, _ = run_cli(capsys, "runs", "show", "aaaa", "--dir", str(tmp_path))
    assert code == 0
    worker, background = tree_lines(out)[2:]
    assert worker.startswith("└─ step start_worker") and background.startswith("   └─ step background")


def test_runs_inside_a_span_of_the_program_still_open_are_no_unfinished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server's request span, still open, around runs that ended: its children are those runs,
    not the spans of a run that never ended (which would count their tokens a second time)."""

    def build(tracer: Any) -> None:
        request = tracer.start_span("GET /jobs")  # still serving: never ended, never written
        with trace.use_span(request, end_on_exit=False):
            for run_id in ("a" * 32, "b" * 32):
                done = run_attrs(run_id, **{attr.RUN_STATUS: "completed", attr.TOKENS_USED: 15})
                with (
                    tracer.start_as_current_span("invoke_workflow synthetic", attributes=done),
                    tracer.start_as_current_span("step ask", attributes={attr.STEP_STATUS: "completed"}),
                ):
                    pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    assert code == 0
    listed = [(run["run_id"], run["status"], run["tokens"]) for run in json.loads(out)]
    assert sorted(listed, key=str) == [("a" * 32, "completed", 15), ("b" * 32, "completed", 15)]


def test_a_sub_run_that_ended_inside_a_run_still_going_is_listed_with_that_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def build(tracer: Any) -> None:
        outer = tracer.start_span("invoke_workflow outer", attributes=run_attrs("a" * 32))  # still going
        with trace.use_span(outer, end_on_exit=False):
            inner = run_attrs("b" * 32, **{attr.RUN_STATUS: "completed", attr.RUN_PARENT_ID: "a" * 32})
            with tracer.start_as_current_span("invoke_workflow inner", attributes=inner):
                pass

    write_spans(tmp_path, build)
    code, out, _ = run_cli(capsys, "runs", "--json", "--dir", str(tmp_path))
    assert code == 0
    listed = {run["status"]: run["run_id"] for run in json.loads(out)}
    assert listed == {"completed": "b" * 32, "unfinished": None}  # the outer run, by its trace id


def test_python_m_multirun_is_the_multirun_command(tmp_path: Path) -> None:
    """``python -m multirun`` works where the ``multirun`` script is not on PATH (a venv not
    activated), with the same help, the same name in it, and the same exit status."""
    src = Path(client_module.__file__).parents[1]
    env = _clean_env(PYTHONPATH=str(src))
    helped = subprocess.run(
        [sys.executable, "-m", "multirun", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: multirun [-h]")
    listed = subprocess.run(
        [sys.executable, "-m", "multirun", "runs", "show", "nosuch", "--dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (listed.returncode, listed.stdout) == (1, "")
    assert listed.stderr == (
        f"multirun: error: no run with id 'nosuch' (see `multirun runs --dir {tmp_path}`)\n"
    )
