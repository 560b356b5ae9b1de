"""multirun checkpoints / show / verify, and multirun resume."""

from __future__ import annotations

import errno
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import multirun
from child_processes import environment_without_settings
from multirun import run
from multirun.checkpoints.envelope import open_meta
from multirun.checkpoints.serializers import dump_blob, get_serializer, load_blob, resolve_hmac_key
from multirun.cli.main import main
from multirun.context import get_current_run_context
from multirun.errors import CheckpointError
from multirun.telemetry import attributes as attr
from multirun.telemetry.local_files import LocalFileSpanExporter


@pytest.fixture
def store_dir(traced, tmp_path) -> Path:
    @run
    def job() -> None:
        ctx = get_current_run_context()
        ctx.set_state("answer", 42)
        ctx.checkpoint(name="first")
        ctx.checkpoint(name="second")

    job()
    return tmp_path  # the traced fixture's checkpoint store is tmp_path / "blobs"


# the exit status of ``multirun resume`` when the program it runs starts no @run (as the
# programs here that only print what they were told): nothing was resumed
NOT_RESUMED = 1


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_ids(store_dir: Path) -> list[str]:
    return sorted(path.name for path in (store_dir / "blobs" / "checkpoints").iterdir() if path.is_dir())


def checkpoint_ids(store_dir: Path, run_id: str) -> list[str]:
    """Oldest first."""
    return sorted(path.stem for path in (store_dir / "blobs" / "checkpoints" / run_id).glob("*.ckpt"))


def write_run_span(directory: Path, run_id: str) -> None:
    """A run's span in DIR/traces, as the embedded default writes it (a run known to the traces)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LocalFileSpanExporter(directory / "traces")))
    with provider.get_tracer("test").start_as_current_span(
        "invoke_workflow other", attributes={attr.RUN_ID: run_id}
    ):
        pass
    provider.shutdown()


def test_checkpoints_lists_show_and_verify(store_dir, capsys) -> None:
    code, out, _ = run_cli(capsys, "checkpoints", "--dir", str(store_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "ID", "CHECKPOINT", "CREATED", "NAME"] and len(lines) == 3
    newest = lines[-1].split()[1]
    assert newest == checkpoint_ids(store_dir, run_ids(store_dir)[0])[-1]

    code, out, _ = run_cli(capsys, "checkpoints", "show", newest, "--dir", str(store_dir))
    assert code == 0
    assert "second" in out and "answer" in out

    code, out, _ = run_cli(capsys, "checkpoints", "verify", "--dir", str(store_dir))
    assert code == 0 and out.splitlines()[-1] == "2 ok, 0 failed"


def test_verify_reports_a_damaged_checkpoint(store_dir, capsys) -> None:
    blob = sorted((store_dir / "blobs").rglob("*.ckpt"))[-1]
    blob.write_bytes(blob.read_bytes()[:-5])
    code, out, _ = run_cli(capsys, "checkpoints", "verify", "--dir", str(store_dir))
    assert code == 1
    assert "FAILED" in out and out.splitlines()[-1] == "1 ok, 1 failed"


def test_resume_of_a_run_whose_newest_checkpoint_is_damaged_says_how_to_resume_the_one_before(
    store_dir, capfd
) -> None:
    # it said the checkpoint was refused and no more, where multirun.resume names the one before
    run_id = run_ids(store_dir)[0]
    first, second = checkpoint_ids(store_dir, run_id)
    blob = store_dir / "blobs" / "checkpoints" / run_id / f"{second}.ckpt"
    blob.write_bytes(blob.read_bytes()[:-5])
    assert main(["resume", run_id, "--dir", str(store_dir), "--", "true"]) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"multirun: error: checkpoint '{second}' ")
    assert err.endswith(
        f"The checkpoint of run {run_id} before it can be resumed instead: "
        f"`multirun resume {first} --dir {store_dir} -- ...`\n"
    )
    [suggested] = re.findall(r"`(multirun [^`]*)`", err)
    assert main(shlex.split(suggested.replace("...", "true"))[1:]) == NOT_RESUMED
    assert f"from checkpoint {first}" in capfd.readouterr().err


class ReaderLeaves(io.StringIO):
    """stdout piped to a reader that leaves after the first line (``| head -1``)."""

    def write(self, text: str) -> int:
        if "\n" in self.getvalue():
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        return super().write(text)


@pytest.mark.parametrize("damaged", [True, False])
def test_verify_into_a_pipe_closed_early_still_fails_for_a_damaged_checkpoint(
    store_dir, capsys, monkeypatch, damaged: bool
) -> None:
    if damaged:
        blob = sorted((store_dir / "blobs").rglob("*.ckpt"))[-1]  # verified after the first line
        blob.write_bytes(blob.read_bytes()[:-5])
    pipe = ReaderLeaves()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert main(["checkpoints", "verify", "--dir", str(store_dir)]) == (1 if damaged else 0)
    assert pipe.getvalue().startswith("ok ") and pipe.getvalue().count("\n") == 1
    assert capsys.readouterr().err == ""


def test_a_checkpoint_over_the_size_limit_names_the_variable_only(store_dir, capsys, monkeypatch) -> None:
    # the command line reads the limit from MULTIRUN_CHECKPOINT_MAX_BYTES alone
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", "100")
    newest = checkpoint_ids(store_dir, run_ids(store_dir)[0])[-1]
    code, _, err = run_cli(capsys, "checkpoints", "show", newest, "--dir", str(store_dir))
    advice = "raise the limit (MULTIRUN_CHECKPOINT_MAX_BYTES) if the checkpoint is trusted"
    assert code == 1 and "over the 100-byte limit" in err and err.rstrip().endswith(advice)
    code, out, _ = run_cli(capsys, "checkpoints", "verify", "--dir", str(store_dir))
    assert code == 1 and out.count(advice) == 2


def test_show_of_an_unknown_checkpoint_is_one_line_and_exit_1(store_dir, capsys) -> None:
    # it said "in the store" and no more: not which store was read, nor what lists it
    code, _, err = run_cli(capsys, "checkpoints", "show", "nope", "--dir", str(store_dir))
    assert code == 1
    assert err.splitlines() == [
        f"multirun: error: no checkpoint 'nope' in the store {store_dir / 'blobs'}: "
        f"`multirun checkpoints --dir {store_dir}` lists the checkpoints it holds"
    ]


def test_show_of_a_run_id_says_what_lists_the_runs_checkpoints(store_dir, capsys) -> None:
    run_id = run_ids(store_dir)[0]
    code, _, err = run_cli(capsys, "checkpoints", "show", run_id[:8], "--dir", str(store_dir))
    assert code == 1
    assert err.splitlines() == [
        f"multirun: error: no checkpoint '{run_id[:8]}' in the store {store_dir / 'blobs'}: "
        f"it is a run id, whose checkpoints `multirun checkpoints --run {run_id[:8]} --dir {store_dir}` lists"
    ]


@pytest.mark.parametrize(
    "command",
    [
        ["checkpoints", "show", "nope"],
        ["checkpoints", "--run", "nope"],
        ["resume", "nope", "--", "true"],
        ["checkpoints", "show", "RUN"],
    ],
    ids=["show", "--run", "resume", "show of a run id"],
)
@pytest.mark.parametrize("option", ["--dir", "--store"])
def test_the_command_an_unknown_id_error_suggests_reads_the_same_store(
    store_dir, tmp_path, monkeypatch, capsys, command: list[str], option: str
) -> None:
    # it suggested `multirun checkpoints` without the --dir or --store it was given: pasted, that
    # listed the checkpoints of ./.multirun, or said there were none
    monkeypatch.chdir(tmp_path.parent)  # a folder with no .multirun
    given = str(store_dir) if option == "--dir" else str(store_dir / "blobs")
    command = [run_ids(store_dir)[0][:8] if word == "RUN" else word for word in command]
    at = command.index("--") if "--" in command else len(command)
    code, _, err = run_cli(capsys, *command[:at], option, given, *command[at:])
    assert code == 1
    [suggested] = re.findall(r"`(multirun [^`]*)`", err)
    code, out, _ = run_cli(capsys, *shlex.split(suggested)[1:])
    assert code == 0 and checkpoint_ids(store_dir, run_ids(store_dir)[0])[-1] in out


def test_verify_of_an_unknown_checkpoint_names_the_store(store_dir, capsys) -> None:
    code, out, _ = run_cli(capsys, "checkpoints", "verify", "nope", "--dir", str(store_dir))
    assert code == 1
    assert out.splitlines() == [
        f"FAILED  nope: no checkpoint 'nope' in the store {store_dir / 'blobs'}: "
        f"`multirun checkpoints --dir {store_dir}` lists the checkpoints it holds",
        "0 ok, 1 failed",
    ]


def test_resume_of_an_unknown_id_names_the_store(store_dir, capsys) -> None:
    code, _, err = run_cli(capsys, "resume", "--dir", str(store_dir), "nope", "--", "true")
    assert code == 1
    assert err.splitlines() == [
        f"multirun: error: no run or checkpoint with id 'nope' in the store {store_dir / 'blobs'}: "
        f"`multirun checkpoints --dir {store_dir}` lists the checkpoints it holds"
    ]


@pytest.mark.parametrize("given", ["the multirun folder", "its checkpoints folder", "a run's folder"])
def test_a_store_given_as_a_folder_around_or_inside_one_says_where_its_checkpoints_are(
    store_dir, capsys, monkeypatch, given: str
) -> None:
    # `--store .multirun` read an empty store: "No checkpoints.", and resume found none
    monkeypatch.chdir(store_dir)
    (run_id,) = run_ids(store_dir)
    store = store_dir / "blobs"
    folder = {
        "the multirun folder": store_dir,
        "its checkpoints folder": store / "checkpoints",
        "a run's folder": store / "checkpoints" / run_id,
    }[given]
    hint = f"it holds none, but {store} does: `multirun checkpoints --store {store}`"
    code, out, _ = run_cli(capsys, "checkpoints", "--store", str(folder))
    assert (code, out) == (0, f"No checkpoints in the store {folder}: {hint}\n")
    code, out, _ = run_cli(capsys, "checkpoints", "verify", "--store", str(folder))
    assert (code, out) == (0, f"No checkpoints in the store {folder}: {hint}\n0 ok, 0 failed\n")
    code, _, err = run_cli(capsys, "resume", "--store", str(folder), run_id[:8], "--", "true")
    assert (code, err) == (
        1,
        f"multirun: error: no run or checkpoint with id {run_id[:8]!r} in the store {folder}: {hint}\n",
    )


def test_an_unfinished_run_listed_by_its_trace_id_is_a_run_to_the_checkpoint_commands(
    tmp_path: Path, capsys
) -> None:
    # `multirun runs` lists it with its trace id for its RUN ID; `multirun checkpoints --run` with
    # that id said there was no such run, and `resume` that there was no such run or checkpoint
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LocalFileSpanExporter(tmp_path / "traces")))
    tracer = provider.get_tracer("test")
    never_ends = tracer.start_span("invoke_workflow job", attributes={attr.RUN_ID: "c" * 32})
    with (
        trace.use_span(never_ends, end_on_exit=False),
        tracer.start_as_current_span("step one", attributes={attr.STEP_STATUS: "completed"}),
    ):
        pass
    provider.shutdown()
    trace_id = f"{never_ends.get_span_context().trace_id:032x}"
    _, listed, _ = run_cli(capsys, "runs", "--dir", str(tmp_path))
    ref = listed.splitlines()[1].split()[0]
    assert trace_id.startswith(ref)
    assert run_cli(capsys, "checkpoints", "--run", ref, "--dir", str(tmp_path)) == (
        0,
        f"No checkpoints of run {trace_id}.\n",
        "",
    )
    code, _, err = run_cli(capsys, "resume", ref, "--dir", str(tmp_path), "--", "true")
    assert code == 1 and err == (
        f"multirun: error: no run or checkpoint with id '{ref}' in the store {tmp_path / 'blobs'}: "
        f"run {trace_id} took no checkpoint there, so there is nothing to resume it from\n"
    )


def test_resume_of_a_run_that_took_no_checkpoint_says_so(store_dir, capsys) -> None:
    other = "0123456789abcdef" * 2
    write_run_span(store_dir, other)  # known to the traces, never checkpointed
    code, _, err = run_cli(capsys, "resume", "--dir", str(store_dir), other[:6], "--", "true")
    assert code == 1
    assert err.splitlines() == [
        f"multirun: error: no run or checkpoint with id '{other[:6]}' in the store {store_dir / 'blobs'}: "
        f"run {other} took no checkpoint there, so there is nothing to resume it from"
    ]


# ---------------------------------------------------------------------------
# stray files in the store


@pytest.fixture
def strays(store_dir: Path) -> list[Path]:
    checkpoints = store_dir / "blobs" / "checkpoints"
    found = [checkpoints / "junk.txt", checkpoints / run_ids(store_dir)[0] / "notes.txt"]
    for path in found:
        path.write_text("hi\n")
    return found


def warnings_naming(strays: list[Path]) -> list[str]:
    return sorted(f"multirun: warning: skipping {path}: not a checkpoint" for path in strays)


def test_a_stray_file_in_the_store_is_skipped_by_the_listing(store_dir, strays, capsys) -> None:
    code, out, err = run_cli(capsys, "checkpoints", "--dir", str(store_dir))
    assert code == 0
    assert len(out.splitlines()) == 3  # the header, the two checkpoints
    assert sorted(err.splitlines()) == warnings_naming(strays)


def test_a_stray_file_in_the_store_is_not_verified(store_dir, strays, capsys) -> None:
    code, out, err = run_cli(capsys, "checkpoints", "verify", "--dir", str(store_dir))
    assert code == 0 and out.splitlines()[-1] == "2 ok, 0 failed"
    assert sorted(err.splitlines()) == warnings_naming(strays)


def test_a_stray_file_in_a_run_folder_is_not_its_newest_checkpoint(store_dir, strays, capfd) -> None:
    run_id = run_ids(store_dir)[0]
    printer = [sys.executable, "-c", "import os; print('RESUME=' + os.environ['MULTIRUN_RESUME'])"]
    assert main(["resume", "--dir", str(store_dir), run_id, "--", *printer]) == NOT_RESUMED
    assert f"RESUME={checkpoint_ids(store_dir, run_id)[-1]}" in capfd.readouterr().out


# ---------------------------------------------------------------------------
# a folder that does not exist


@pytest.mark.parametrize(
    "argv",
    [
        ["checkpoints"],
        ["checkpoints", "show", "abc"],
        ["checkpoints", "verify"],
        ["resume", "abc", "--", "true"],
        ["prune", "--older-than", "1"],
    ],
)
def test_a_missing_folder_is_an_error(tmp_path: Path, capsys, argv: list[str]) -> None:
    missing = tmp_path / "missing"
    code, out, err = run_cli(capsys, argv[0], "--dir", str(missing), *argv[1:])
    assert code == 1 and out == ""
    assert err.splitlines() == [f"multirun: error: no such directory: {missing}"]


def test_a_missing_store_folder_is_an_error(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "checkpoints", "--store", str(tmp_path / "missing"))
    assert code == 1
    assert err.splitlines() == [f"multirun: error: no such directory: {tmp_path / 'missing'}"]


@pytest.mark.parametrize("given_as", ["--store", "MULTIRUN_CHECKPOINT_URI"])
@pytest.mark.parametrize(
    ("store", "error"),
    [
        ("ftp://host/blobs", "no blob exporter for the URI scheme 'ftp'"),
        ("file://host/blobs", "file URI 'file://host/blobs': its path must be absolute"),
        ("s3://", "an s3:// URI needs a bucket"),
        ("file://", "file URI 'file://' has no path: file:///path"),
        ("file:", "file URI 'file:' has no path: file:///path"),
        ("file:///tmp/a%00b", "blob store 'file:///tmp/a%00b': its path has a NUL character"),
    ],
)
def test_a_bad_store_is_an_error_naming_where_it_was_given(
    tmp_path: Path, monkeypatch, capsys, given_as: str, store: str, error: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if given_as == "--store":
        code, _, err = run_cli(capsys, "checkpoints", "--store", store)
    else:
        monkeypatch.setenv("MULTIRUN_CHECKPOINT_URI", store)
        code, _, err = run_cli(capsys, "checkpoints")
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"multirun: error: {given_as}: {error}"), line
    # arguments of Python calls (init, an exporter's factory), which nobody made
    assert "checkpoint_uri" not in line and "directory=" not in line


@pytest.mark.parametrize("given_as", ["--store", "MULTIRUN_CHECKPOINT_URI"])
@pytest.mark.parametrize("command", [["checkpoints"], ["resume", "abc"]], ids=["checkpoints", "resume"])
def test_a_memory_store_is_refused_as_one_no_command_can_read(
    monkeypatch, capsys, given_as: str, command: list[str]
) -> None:
    # `multirun checkpoints --store memory://x` said "No checkpoints.": a store of its own, made
    # empty in the command's process, not the program's
    if given_as == "--store":
        command = [*command, "--store", "memory://x"]
    else:
        monkeypatch.setenv("MULTIRUN_CHECKPOINT_URI", "memory://x")
    code, out, err = run_cli(capsys, *command, *(["--", "true"] if command[0] == "resume" else []))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"multirun: error: {given_as}: 'memory://x' is a store in the memory of the process that uses it: "
        "no other process can read it (a program's checkpoints are read from a folder or s3:// store)"
    ]


@pytest.mark.parametrize(
    "command",
    [
        ["checkpoints", "--store", "file://"],
        ["checkpoints", "show", "abc", "--store", "file://"],
        ["checkpoints", "verify", "--store", "file://"],
        ["prune", "--older-than", "1", "--store", "file://"],
        ["resume", "abc", "--store", "file://", "--", "true"],
    ],
    ids=["checkpoints", "show", "verify", "prune", "resume"],
)
def test_every_command_refuses_a_store_uri_without_a_path_in_its_own_terms(
    tmp_path: Path, monkeypatch, capsys, command: list[str]
) -> None:
    # the error ended with "file:///path or directory=", an argument of the Python factory
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *command)
    assert (code, out) == (1, "")
    assert err.splitlines() == ["multirun: error: --store: file URI 'file://' has no path: file:///path"]


@pytest.mark.parametrize(
    "command", [["checkpoints"], ["prune", "--older-than", "1"]], ids=["checkpoints", "prune"]
)
def test_a_multirun_dir_that_is_a_file_is_an_error_as_for_runs(
    tmp_path: Path, monkeypatch, capsys, command: list[str]
) -> None:
    # `multirun runs` said "not a directory"; `checkpoints` said "No checkpoints." and `prune`
    # "Removed 0 trace files", as if the folder were there and empty
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_URI", raising=False)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path / "a-file"))
    for argv in (["runs"], command):
        code, out, err = run_cli(capsys, *argv)
        assert (code, out) == (1, "")
        assert err.splitlines() == [f"multirun: error: not a directory: {tmp_path / 'a-file'}"]


@pytest.mark.parametrize(("command", "inside"), [(["runs"], "traces"), (["checkpoints"], "blobs")])
def test_a_traces_or_blobs_folder_that_is_a_file_is_an_error_not_nothing_found(
    tmp_path: Path, monkeypatch, capsys, command: list[str], inside: str
) -> None:
    # `runs` said "No runs." and `checkpoints` "No checkpoints.": the runs were there, unreadable
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_URI", raising=False)
    (tmp_path / inside).write_text("")
    monkeypatch.setenv("MULTIRUN_DIR", str(tmp_path))
    code, out, err = run_cli(capsys, *command)
    assert (code, out) == (1, "")
    assert f"{tmp_path / inside}" in err and "not a directory" in err.lower()
    assert len(err.splitlines()) == 1


def test_no_folder_yet_is_no_checkpoints(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MULTIRUN_DIR", "MULTIRUN_CHECKPOINT_URI"):
        monkeypatch.delenv(name, raising=False)
    code, out, _ = run_cli(capsys, "checkpoints")
    assert code == 0 and out == "No checkpoints.\n"


@pytest.mark.parametrize("given_as", ["--dir", "MULTIRUN_DIR"])
def test_a_folder_with_a_colon_is_a_folder(tmp_path: Path, monkeypatch, capsys, given_as: str) -> None:
    # DIR/blobs is a path, not a URI of the scheme "runs"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_URI", raising=False)
    (tmp_path / "runs:today").mkdir()
    if given_as == "--dir":
        code, out, err = run_cli(capsys, "checkpoints", "--dir", "runs:today")
    else:
        monkeypatch.setenv("MULTIRUN_DIR", "runs:today")
        code, out, err = run_cli(capsys, "checkpoints")
    assert (code, out, err) == (0, "No checkpoints.\n", "")


# ---------------------------------------------------------------------------
# id prefixes


def test_checkpoints_of_a_run_by_prefix(store_dir, capsys) -> None:
    run_id = run_ids(store_dir)[0]
    code, out, _ = run_cli(capsys, "checkpoints", "--run", run_id[:5], "--dir", str(store_dir))
    assert code == 0
    assert [line.split()[1] for line in out.splitlines()[1:]] == checkpoint_ids(store_dir, run_id)


def test_checkpoints_of_an_unknown_run_is_an_error(store_dir, capsys) -> None:
    code, out, err = run_cli(capsys, "checkpoints", "--run", "nope", "--dir", str(store_dir))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"multirun: error: no run with id 'nope' "
        f"(`multirun checkpoints --dir {store_dir}` lists the runs with checkpoints)"
    ]


def test_checkpoints_of_an_empty_run_id_is_an_error_not_every_run(store_dir, capsys) -> None:
    """``--run "$RUN_ID"`` with the variable unset lists nothing rather than every checkpoint."""
    code, out, err = run_cli(capsys, "checkpoints", "--run", "", "--dir", str(store_dir))
    assert code == 2 and out == ""
    assert "argument --run: must name a run id, got ''" in err


def test_checkpoints_of_a_run_with_none(store_dir, capsys) -> None:
    other = "0123456789abcdef" * 2
    write_run_span(store_dir, other)  # known to the traces, never checkpointed
    code, out, err = run_cli(capsys, "checkpoints", "--run", other[:6], "--dir", str(store_dir))
    assert code == 0 and err == ""
    assert out == f"No checkpoints of run {other}.\n"


def test_show_and_verify_by_prefix(store_dir, capsys) -> None:
    first, second = checkpoint_ids(store_dir, run_ids(store_dir)[0])
    unique = next(n for n in range(1, 33) if first[:n] != second[:n])
    code, out, _ = run_cli(capsys, "checkpoints", "show", second[:unique], "--dir", str(store_dir))
    assert code == 0 and out.splitlines()[0].split() == ["checkpoint", second]
    code, out, _ = run_cli(capsys, "checkpoints", "verify", first[:unique], "--dir", str(store_dir))
    assert code == 0 and out.splitlines() == [f"ok      {first}", "1 ok, 0 failed"]


def test_an_ambiguous_checkpoint_prefix_is_an_error(store_dir, capsys) -> None:
    first, second = checkpoint_ids(store_dir, run_ids(store_dir)[0])
    code, _, err = run_cli(capsys, "checkpoints", "show", first[:4], "--dir", str(store_dir))
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"multirun: error: checkpoint id '{first[:4]}' is ambiguous: it matches ")
    assert line.endswith("; give more characters")
    shown = line.split("it matches ", 1)[1].split(";")[0].split(", ")
    assert len(shown) == 2 and first.startswith(shown[0]) and second.startswith(shown[1])
    assert shown[0] != shown[1]  # long enough to tell them apart


def test_the_python_api_takes_prefixes(store_dir, traced) -> None:
    run_id = run_ids(store_dir)[0]
    first, second = checkpoint_ids(store_dir, run_id)
    with multirun.resume(run_id=run_id[:4]) as restored:
        assert restored.checkpoint.id == second  # the newest of the run
    unique = next(n for n in range(1, 33) if first[:n] != second[:n])
    with multirun.resume(checkpoint_id=first[:unique]) as restored:
        assert restored.checkpoint.id == first
    with pytest.raises(CheckpointError, match="is ambiguous"), multirun.resume(checkpoint_id=first[:4]):
        pass
    unknown = pytest.raises(CheckpointError, match="no checkpoint of run 'nope' in the store")
    with unknown, multirun.resume(run_id="nope"):
        pass
    # a checkpoint id is not a run id
    with pytest.raises(CheckpointError, match="no checkpoint of run"), multirun.resume(run_id=first):
        pass


def test_the_python_api_refuses_an_ambiguous_run_prefix(store_dir, traced) -> None:
    store = traced.client.checkpoints
    key = store.list()[0]
    for run_id in ("abc1" + "0" * 28, "abc2" + "0" * 28):
        store.exporter.put(store.key(run_id, "c1"), store.exporter.get(key))
    ambiguous = pytest.raises(CheckpointError, match="run id 'abc' is ambiguous: it matches abc1")
    with ambiguous, multirun.resume(run_id="abc"):
        pass


def test_resume_runs_the_command_with_the_checkpoint_to_continue(store_dir, capfd) -> None:
    run_id = sorted((store_dir / "blobs" / "checkpoints").iterdir())[0].name
    printer = [sys.executable, "-c", "import os; print('RESUME=' + os.environ['MULTIRUN_RESUME'])"]
    code = main(["resume", "--dir", str(store_dir), run_id, "--", *printer])
    out, err = capfd.readouterr()
    assert code == NOT_RESUMED
    newest = sorted((store_dir / "blobs" / "checkpoints" / run_id).iterdir())[-1].stem
    assert f"RESUME={newest}" in out
    assert f"resuming run {run_id}" in err


@pytest.mark.parametrize(("program", "expected"), [("exit 3", 3), ("kill -9 $$", 128 + 9)])
def test_resume_exits_as_the_program_did_as_a_shell_reports_it(store_dir, program, expected) -> None:
    run_id = sorted((store_dir / "blobs" / "checkpoints").iterdir())[0].name
    assert main(["resume", "--dir", str(store_dir), run_id, "--", "sh", "-c", program]) == expected


# a program that, on Ctrl-C, takes a while to finish up (send its spans, save its state)
FINISHES_UP_ON_CTRL_C = """
import sys, time
from pathlib import Path
Path(sys.argv[1], "started").touch()
try:
    time.sleep(60)
except KeyboardInterrupt:
    time.sleep(1)
    Path(sys.argv[1], "finished up").touch()
    sys.exit(130)
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="a terminal's Ctrl-C: SIGINT to the process group")
def test_ctrl_c_during_resume_lets_the_program_finish_up(store_dir, tmp_path) -> None:
    # the terminal sends Ctrl-C to multirun and the program alike; multirun must not kill the
    # program while it finishes up, and says nothing more than the program does
    run_id = run_ids(store_dir)[0]
    src = Path(multirun.__file__).parents[1]
    program = [sys.executable, "-c", FINISHES_UP_ON_CTRL_C, str(tmp_path)]
    resuming = subprocess.Popen(
        [sys.executable, "-m", "multirun", "resume", "--dir", str(store_dir), run_id, "--", *program],
        env=dict(os.environ, PYTHONPATH=str(src)),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(resuming.pid, signal.SIGINT)
    _, err = resuming.communicate(timeout=60)
    assert (tmp_path / "finished up").exists()
    assert resuming.returncode == 130
    assert err.splitlines() == [
        f"resuming run {run_id} from checkpoint {checkpoint_ids(store_dir, run_id)[-1]} (second)"
    ]


def test_resume_without_a_command_says_how(store_dir, capsys) -> None:
    run_id = sorted((store_dir / "blobs" / "checkpoints").iterdir())[0].name
    code, _, err = run_cli(capsys, "resume", "--dir", str(store_dir), run_id)
    assert code == 1 and "after --" in err


@pytest.mark.parametrize("argv", [["resume"], ["resume", "--", "python", "agent.py"]], ids=["bare", "no id"])
def test_resume_without_an_id_names_only_the_id(capsys, argv: list[str]) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.splitlines()[-1] == "multirun resume: error: the following arguments are required: ID"


def test_resume_of_a_command_without_the_dashes_says_how(store_dir, capsys) -> None:
    code, _, err = run_cli(capsys, "resume", "--dir", str(store_dir), "abc", "python", "agent.py")
    assert code == 1
    assert err.splitlines() == [
        "multirun: error: resume: put the program to run after --, e.g. multirun resume ID -- python agent.py"
    ]


def test_resume_of_a_command_with_options_without_the_dashes_says_how(store_dir, capsys) -> None:
    # the program's own --topic was refused as an option of resume, with no word of the dashes
    code, _, err = run_cli(
        capsys, "resume", "--dir", str(store_dir), "abc", "python", "crew.py", "--topic", "x"
    )
    assert code == 2
    assert err.splitlines()[-1] == (
        "multirun resume: error: put the program to run after --, e.g. multirun resume ID -- python agent.py"
    )


ENV_PRINTER = [
    sys.executable,
    "-c",
    "import os\nfor name in ('MULTIRUN_RESUME', 'MULTIRUN_DIR', 'MULTIRUN_CHECKPOINT_URI'):\n"
    "    print(name + '=' + os.environ.get(name, '-'))",
]


def child_env(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if line.startswith("MULTIRUN_"))


@pytest.mark.parametrize("order", ["options first", "options after the id"])
def test_resume_tells_the_child_the_folder(store_dir, capfd, monkeypatch, order: str) -> None:
    monkeypatch.chdir(store_dir.parent)
    for name in ("MULTIRUN_DIR", "MULTIRUN_CHECKPOINT_URI"):
        monkeypatch.delenv(name, raising=False)
    run_id = run_ids(store_dir)[0]
    options = ["--dir", store_dir.name]  # relative to the working folder
    words = [*options, run_id] if order == "options first" else [run_id, *options]
    assert main(["resume", *words, "--", *ENV_PRINTER]) == NOT_RESUMED
    assert child_env(capfd.readouterr().out) == {
        "MULTIRUN_RESUME": checkpoint_ids(store_dir, run_id)[-1],
        "MULTIRUN_DIR": str(store_dir),  # absolute: the child may change folder
        "MULTIRUN_CHECKPOINT_URI": "-",
    }


def test_resume_tells_the_child_the_store(store_dir, capfd, monkeypatch) -> None:
    for name in ("MULTIRUN_DIR", "MULTIRUN_CHECKPOINT_URI"):
        monkeypatch.delenv(name, raising=False)
    run_id = run_ids(store_dir)[0]
    store = str(store_dir / "blobs")
    assert main(["resume", run_id, "--store", store, "--", *ENV_PRINTER]) == NOT_RESUMED
    assert child_env(capfd.readouterr().out) == {
        "MULTIRUN_RESUME": checkpoint_ids(store_dir, run_id)[-1],
        "MULTIRUN_DIR": "-",
        "MULTIRUN_CHECKPOINT_URI": store,
    }


@pytest.mark.parametrize("relative", ["blobs", "file:blobs"])
def test_resume_tells_the_child_a_store_folder_given_relative_as_an_absolute_one(
    store_dir, capfd, monkeypatch, relative: str
) -> None:
    # it was passed on as given, as a folder of wherever the program runs (--dir is made absolute)
    monkeypatch.chdir(store_dir)
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_URI", raising=False)
    run_id = run_ids(store_dir)[0]
    assert main(["resume", run_id, "--store", relative, "--", *ENV_PRINTER]) == NOT_RESUMED
    assert child_env(capfd.readouterr().out)["MULTIRUN_CHECKPOINT_URI"] == str(store_dir / "blobs")


def test_resume_run_name_tells_the_child_the_name_of_the_run_that_continues_it(store_dir, capfd) -> None:
    printer = [
        sys.executable,
        "-c",
        "import os; print('NAME=' + os.environ.get('MULTIRUN_RESUME_RUN_NAME', '-'))",
    ]
    run_id = run_ids(store_dir)[0]
    assert (
        main(["resume", "--dir", str(store_dir), run_id, "--run-name", "job-v2", "--", *printer])
        == NOT_RESUMED
    )
    assert "NAME=job-v2" in capfd.readouterr().out
    assert main(["resume", "--dir", str(store_dir), run_id, "--run-name", " ", "--", *printer]) == 1
    assert "--run-name must name a run" in capfd.readouterr().err


KILLED_AFTER_A_CHECKPOINT = """
import os, sys
import multirun
from multirun import run, checkpoint

multirun.init_local(sys.argv[1])

@checkpoint(name="fetched")
def fetched(values):
    return values

@run(name="nightly")
def nightly():
    fetched([1, 2])
    os._exit(1)  # before the spans are exported: the NAME column had nothing to show

nightly()
"""


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_the_checkpoints_of_a_run_killed_before_its_spans_were_written_are_listed_by_name(
    tmp_path: Path, capsys, monkeypatch, serializer: str
) -> None:
    env = environment_without_settings()
    if serializer == "pickle":
        env.update(MULTIRUN_CHECKPOINT_SERIALIZER="pickle", MULTIRUN_CHECKPOINT_HMAC_KEY=PICKLE_KEY)
        monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", PICKLE_KEY)
    script = tmp_path / "nightly.py"
    script.write_text(KILLED_AFTER_A_CHECKPOINT)
    killed = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert killed.returncode == 1, killed.stderr
    assert not (tmp_path / "traces").exists()  # no span was written
    [run_id] = run_ids(tmp_path)
    [checkpoint_id] = checkpoint_ids(tmp_path, run_id)
    code, out, _ = run_cli(capsys, "checkpoints", "--dir", str(tmp_path))
    assert code == 0
    header, row = out.splitlines()
    assert row.split()[1] == checkpoint_id and row[header.index("NAME") :] == "fetched"


def test_a_json_checkpoint_written_before_its_blob_named_it_is_listed_without_a_name(
    store_dir: Path, capsys
) -> None:
    """A version 3 blob keeps its name only in its payload, which the listing does not read:
    listed, unnamed, when no span names it, and shown as before. A blob that cannot be read is
    listed too (verify says why)."""
    [run_id] = run_ids(store_dir)
    first, second = checkpoint_ids(store_dir, run_id)
    path = store_dir / "blobs" / "checkpoints" / run_id / f"{first}.ckpt"
    _, document = load_blob(path.read_bytes(), max_bytes=1 << 20)
    path.chmod(0o644)
    path.write_bytes(dump_blob(document, get_serializer("json", hmac_key=None))[0])  # as version 3 wrote it
    code, out, _ = run_cli(capsys, "checkpoints", "--dir", str(store_dir))
    assert code == 0
    assert [line.split()[1:2] + line.split()[4:] for line in out.splitlines()[1:]] == [
        [first],
        [second, "second"],
    ]
    code, out, _ = run_cli(capsys, "checkpoints", "show", first, "--dir", str(store_dir))
    assert code == 0 and "version 3, json" in out and "first" in out

    path.write_bytes(b"MRCK1\n{damaged")
    code, out, _ = run_cli(capsys, "checkpoints", "--dir", str(store_dir))
    assert code == 0 and [line.split()[1] for line in out.splitlines()[1:]] == [first, second]


def test_resume_command_line_end_to_end(tmp_path) -> None:
    """The console script, as a user types it."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "multirun"),
            "resume",
            "nope",
            "--dir",
            str(tmp_path),
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"multirun: error: no run or checkpoint with id 'nope' in the store {tmp_path / 'blobs'}: "
        f"`multirun checkpoints --dir {tmp_path}` lists the checkpoints it holds"
    ]


# ---------------------------------------------------------------------------
# a store folder this user cannot read


@pytest.mark.parametrize("which", ["blobs", "a run's folder"])
@pytest.mark.parametrize(
    "argv", [["checkpoints"], ["checkpoints", "verify"], ["resume", "abc", "--", "true"]]
)
def test_an_unreadable_store_folder_is_an_error_not_no_checkpoints(
    store_dir, capsys, unreadable, which, argv
) -> None:
    folder = store_dir / "blobs"
    if which != "blobs":
        folder = folder / "checkpoints" / run_ids(store_dir)[0]
    unreadable(folder)
    code, out, err = run_cli(capsys, argv[0], "--dir", str(store_dir), *argv[1:])
    assert code == 1 and "No checkpoints" not in out
    assert err.startswith(f"multirun: error: cannot list the blob store's folder {folder}: Permission denied")
    assert "Traceback" not in err


def test_resume_from_an_unreadable_store_says_so(traced, unreadable) -> None:
    @run
    def job() -> str:
        return get_current_run_context().checkpoint(name="c").value.run_id

    run_id = job()
    unreadable(traced.client.checkpoints.exporter.directory)
    with (
        pytest.raises(CheckpointError, match="cannot list the blob store's folder"),
        multirun.resume(run_id=run_id),
    ):
        pass


def test_show_lists_the_agents_whose_state_the_checkpoint_keeps(traced, tmp_path, capsys) -> None:
    from multirun import agent
    from multirun.context import get_current_agent_context

    @agent
    def planner() -> None:
        get_current_agent_context().set_state("plan", ["a", "b"])

    @agent
    def idle() -> None:
        pass

    @run
    def job() -> None:
        planner()
        planner()
        idle()
        get_current_run_context().checkpoint(name="after_agents")

    job()
    [run_id] = run_ids(tmp_path)
    [checkpoint_id] = checkpoint_ids(tmp_path, run_id)
    code, out, _ = run_cli(capsys, "checkpoints", "show", checkpoint_id, "--dir", str(tmp_path))
    assert code == 0
    [line] = [line for line in out.splitlines() if line.startswith("agents")]
    assert line.split(None, 1)[1] == "planner (plan), planner #2 (plan)"  # idle has no state to keep


def test_show_says_when_a_checkpoint_keeps_no_agent(store_dir, capsys) -> None:
    newest = checkpoint_ids(store_dir, run_ids(store_dir)[0])[-1]
    code, out, _ = run_cli(capsys, "checkpoints", "show", newest, "--dir", str(store_dir))
    assert code == 0
    [line] = [line for line in out.splitlines() if line.startswith("agents")]
    assert line.split(None, 1)[1] == "(none)"


# ---------------------------------------------------------------------------
# a store of signed pickle checkpoints

PICKLE_KEY = "a test key of at least sixteen bytes"


@pytest.fixture
def pickle_dir(traced, tmp_path, monkeypatch) -> Path:
    """A run's pickle checkpoint in tmp_path/blobs, written with PICKLE_KEY."""
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_HMAC_KEY", raising=False)
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_SERIALIZER", raising=False)
    multirun.init(
        tracer_provider=traced.provider,
        checkpoint_uri=str(tmp_path / "blobs"),
        checkpoint_serializer="pickle",
        checkpoint_hmac_key=PICKLE_KEY,
    )

    @run
    def job() -> None:
        ctx = get_current_run_context()
        ctx.set_state("seen", {"a", "b"})  # a set: kept as it is by pickle
        ctx.checkpoint(name="pickled")

    job()
    return tmp_path


def test_show_verify_and_resume_read_signed_pickle_checkpoints_with_the_key(
    pickle_dir, capfd, monkeypatch
) -> None:
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", PICKLE_KEY)
    run_id = run_ids(pickle_dir)[0]
    checkpoint_id = checkpoint_ids(pickle_dir, run_id)[-1]

    assert main(["checkpoints", "verify", "--dir", str(pickle_dir)]) == 0
    assert f"ok      {checkpoint_id}" in capfd.readouterr().out
    assert main(["checkpoints", "show", checkpoint_id, "--dir", str(pickle_dir)]) == 0
    assert "seen" in capfd.readouterr().out
    assert main(["resume", "--dir", str(pickle_dir), run_id, "--", *ENV_PRINTER]) == NOT_RESUMED
    assert child_env(capfd.readouterr().out)["MULTIRUN_RESUME"] == checkpoint_id


def test_verify_without_the_key_says_a_pickle_checkpoint_needs_it(pickle_dir, capsys) -> None:
    code, out, _ = run_cli(capsys, "checkpoints", "verify", "--dir", str(pickle_dir))
    assert code == 1
    assert "FAILED" in out and "no HMAC key" in out and "MULTIRUN_CHECKPOINT_HMAC_KEY" in out
    assert "allowed_serializers" not in out  # no setting the command line has


def test_a_pickle_checkpoint_written_before_summaries_is_unpickled_and_shown_alike(
    traced, tmp_path, monkeypatch, capsys
) -> None:
    """A pickle checkpoint of format version 3 (before the meta section) has no summary: the
    commands unpickle it, as they did, and show what a version 4 one's summary shows."""
    from multirun import agent, step
    from multirun.context import get_current_agent_context

    monkeypatch.setenv("MULTIRUN_CHECKPOINT_HMAC_KEY", PICKLE_KEY)
    multirun.init(
        tracer_provider=traced.provider,
        checkpoint_uri=str(tmp_path / "blobs"),
        checkpoint_serializer="pickle",
    )

    @step
    def fetch(n: int) -> set[int]:
        return {n}  # a set: kept as it is by pickle

    @agent
    def planner() -> None:
        get_current_agent_context().set_state("plan", ("fetch", "write"))

    @run
    def job() -> None:
        fetch(1)
        planner()
        get_current_run_context().set_state("seen", {"a", "b"})
        get_current_run_context().checkpoint(name="both")

    job()
    [run_id] = run_ids(tmp_path)
    [checkpoint_id] = checkpoint_ids(tmp_path, run_id)
    path = tmp_path / "blobs" / "checkpoints" / run_id / f"{checkpoint_id}.ckpt"
    show = ("checkpoints", "show", checkpoint_id, "--dir", str(tmp_path))
    code, from_summary, _ = run_cli(capsys, *show)
    assert code == 0

    reader = {
        "max_bytes": 1 << 20,
        "hmac_key": resolve_hmac_key(PICKLE_KEY),
        "allowed_serializers": ["pickle"],
    }
    _, document = load_blob(path.read_bytes(), **reader)
    path.chmod(0o644)
    path.write_bytes(dump_blob(document, get_serializer("pickle", hmac_key=PICKLE_KEY))[0])  # as 3 wrote it
    header, meta = open_meta(path.read_bytes(), **reader)
    assert header["version"] == 3 and meta is None

    code, unpickled, _ = run_cli(capsys, *show)
    assert code == 0

    def details(out: str) -> dict[str, str]:
        return {line[:11].rstrip(): line[12:] for line in out.splitlines()}

    assert details(from_summary).pop("format") == "version 4, pickle, signed: HMAC verified"
    assert details(unpickled).pop("format") == "version 3, pickle, signed: HMAC verified"
    different = ("size", "format")
    assert {k: v for k, v in details(unpickled).items() if k not in different} == {
        k: v for k, v in details(from_summary).items() if k not in different
    }
    assert details(unpickled)["agents"] == "planner (plan)"
    assert details(unpickled)["replay log"] == "1 step, 1 with a result to serve"
    assert main(["checkpoints", "verify", "--dir", str(tmp_path)]) == 0
    assert main(["resume", "--dir", str(tmp_path), run_id, "--", *ENV_PRINTER]) == NOT_RESUMED


# ---------------------------------------------------------------------------
# a pickle checkpoint of objects of a class the program defines in __main__

MAIN_PROGRAM = """
import os, sys
from dataclasses import dataclass

import multirun
from multirun import agent, run, step
from multirun.context import get_current_agent_context, get_current_run_context

multirun.init_local(sys.argv[1], checkpoint_serializer="pickle")  # the key: from the environment


@dataclass
class Notes:  # a class of __main__: only this program can unpickle it
    topic: str


@step
def research(topic: str) -> Notes:
    with open(sys.argv[2], "a") as effects:
        effects.write("research " + topic + "\\n")
    return Notes(topic)


@agent
def planner(notes: Notes) -> None:
    get_current_agent_context().set_state("plan", Notes("plan of " + notes.topic))


@run(name="pickled-main")
def job() -> None:
    ctx = get_current_run_context()
    print("RUN", ctx.run.id, flush=True)
    notes = research("otel")
    planner(notes)
    ctx.set_state("notes", notes)
    ctx.checkpoint(name="researched")
    if os.environ.get("CRASH") == "1":
        multirun.get_client().force_flush()
        os._exit(3)
    print("STATE", type(ctx.get_state("notes")).__module__, ctx.get_state("notes"), flush=True)


job()
multirun.get_client().force_flush()
"""


def test_show_verify_and_resume_of_a_pickle_checkpoint_of_classes_of_the_programs_main(tmp_path) -> None:
    """The command line is another __main__ than the program that pickled the state: it shows
    and verifies the checkpoint without unpickling it, and the resumed program unpickles it."""
    script = tmp_path / "agent.py"
    script.write_text(MAIN_PROGRAM)
    env = environment_without_settings()
    env["MULTIRUN_CHECKPOINT_HMAC_KEY"] = PICKLE_KEY
    folder, effects = tmp_path / "mr", tmp_path / "effects.txt"
    program = [sys.executable, str(script), str(folder), str(effects)]

    def multirun_cli(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "multirun"), *argv]
        return subprocess.run(command, capture_output=True, text=True, env={**env, **extra}, timeout=120)

    crashed = subprocess.run(program, capture_output=True, text=True, env={**env, "CRASH": "1"}, timeout=120)
    assert crashed.returncode == 3, crashed.stderr
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]
    [checkpoint_id] = checkpoint_ids(folder, run_id)

    shown = multirun_cli("checkpoints", "show", checkpoint_id, "--dir", str(folder))
    assert shown.returncode == 0, shown.stderr
    details = {line[:11].rstrip(): line[12:] for line in shown.stdout.splitlines()}  # "label  value"
    assert details["name"] == "researched"
    assert details["run"] == f"{run_id} (pickled-main)"
    assert details["state keys"] == "notes"
    assert details["agents"] == "planner (plan)"
    assert details["replay log"] == "1 step, 1 with a result to serve"

    verified = multirun_cli("checkpoints", "verify", "--dir", str(folder))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.splitlines() == [f"ok      {checkpoint_id}", "1 ok, 0 failed"]

    resumed = multirun_cli("resume", "--dir", str(folder), run_id[:8], "--", *program)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming run {run_id} from checkpoint {checkpoint_id} (researched)" in resumed.stderr
    assert "STATE __main__ Notes(topic='otel')" in resumed.stdout  # unpickled in the program
    assert effects.read_text().splitlines() == ["research otel"]  # served from the checkpoint
