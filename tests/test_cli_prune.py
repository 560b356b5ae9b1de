"""``multirun prune``: old trace files and old runs' checkpoints go, recent ones stay whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from multirun.checkpoints.envelope import PendingBlob
from multirun.checkpoints.exporters import FileBlobExporter
from multirun.cli.main import main
from multirun.errors import CheckpointError

DAY_NS = 86_400 * 10**9


def checkpoint_id(days_ago: float) -> str:
    """An id as multirun makes them: 16 hex digits of time, then 16 random."""
    return f"{time.time_ns() - int(days_ago * DAY_NS):016x}{os.urandom(8).hex()}"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Runs: 'old' (checkpoints 30 and 20 days old), 'mixed' (30 days and 1 hour), 'recent'
    (1 hour); trace files last written 30 days ago and today."""
    blobs = FileBlobExporter(tmp_path / "blobs")
    for run_id, ages in {"old": [30, 20], "mixed": [30, 1 / 24], "recent": [1 / 24]}.items():
        for age in ages:
            blobs.put(f"checkpoints/{run_id}/{checkpoint_id(age)}.ckpt", b"checkpoint bytes")
    traces = tmp_path / "traces"
    traces.mkdir()
    for name, age in {"2026-10-23-100.jsonl": 30, "2026-11-22-200.jsonl": 0}.items():
        (traces / name).write_text('{"resourceSpans":[]}\n')
        written = time.time() - age * 86_400
        os.utime(traces / name, (written, written))
    return tmp_path


def left(folder: Path) -> tuple[list[str], dict[str, int]]:
    """The trace files, and the number of checkpoints of each run, still there.

    Listed with os.listdir, which the ``unreadable`` fixture leaves alone: it refuses
    os.scandir, which Path.iterdir uses from Python 3.13 on."""
    traces = sorted(os.listdir(folder / "traces"))
    checkpoints = folder / "blobs" / "checkpoints"
    runs = {name: len(os.listdir(checkpoints / name)) for name in os.listdir(checkpoints)}
    return traces, runs


def test_prune_removes_old_trace_files_and_whole_old_runs(folder: Path, capsys) -> None:
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 0
    assert capsys.readouterr().out == (
        "Removed 1 trace file (21 bytes) and 2 checkpoints of 1 run, older than 7 days.\n"
    )
    # 'mixed' keeps its 30-day-old checkpoint: a run that can still be resumed stays whole
    assert left(folder) == (["2026-11-22-200.jsonl"], {"mixed": 2, "recent": 1})


def test_a_dry_run_lists_what_would_go_and_removes_nothing(folder: Path, capsys) -> None:
    before = left(folder)
    assert main(["prune", "--older-than", "7", "--dir", str(folder), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"Would remove {folder / 'traces' / '2026-10-23-100.jsonl'}",
        "Would remove run old: 2 checkpoints",
        "Would remove 1 trace file (21 bytes) and 2 checkpoints of 1 run, older than 7 days.",
    ]
    assert left(folder) == before


def test_a_checkpoint_whose_id_does_not_say_its_age_keeps_its_run(folder: Path, capsys) -> None:
    FileBlobExporter(folder / "blobs").put("checkpoints/old/before-the-migration.ckpt", b"bytes")
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "0 checkpoints of 0 runs" in out
    assert "Kept 1 checkpoint whose id does not say when it was taken." in out
    assert left(folder)[1]["old"] == 3


@pytest.mark.parametrize("days", ["-1", "soon", "nan"])
def test_an_age_that_is_no_number_of_days_is_a_usage_error(folder: Path, capsys, days: str) -> None:
    assert main(["prune", "--older-than", days, "--dir", str(folder)]) == 2
    assert "--older-than" in capsys.readouterr().err
    assert left(folder)[1] == {"old": 2, "mixed": 2, "recent": 1}


def test_an_unreadable_traces_folder_is_an_error_not_nothing_to_prune(
    folder: Path, capsys, unreadable: Callable[[Path], None]
) -> None:
    unreadable(folder / "traces")
    for dry_run in (["--dry-run"], []):
        assert main(["prune", "--older-than", "7", "--dir", str(folder), *dry_run]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == f"multirun: error: prune: cannot read {folder / 'traces'}: Permission denied\n"
    assert left(folder)[1] == {"old": 2, "mixed": 2, "recent": 1}  # nothing went


@pytest.mark.parametrize("days", ["1e308", "1000001"])
def test_an_age_beyond_any_file_is_a_usage_error_not_a_traceback(folder: Path, capsys, days: str) -> None:
    assert main(["prune", "--older-than", days, "--dir", str(folder), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"--older-than: must be at most 1,000,000 days, got '{days}'" in err
    assert "Traceback" not in err


def test_a_folder_named_like_a_trace_file_is_left_alone(folder: Path, capsys) -> None:
    archive = folder / "traces" / "archive.jsonl"
    archive.mkdir()
    (archive / "kept.txt").write_text("not a trace file")
    long_ago = time.time() - 30 * 86_400
    os.utime(archive, (long_ago, long_ago))
    assert main(["prune", "--older-than", "7", "--dir", str(folder), "--dry-run"]) == 0
    assert str(archive) not in capsys.readouterr().out
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 0
    assert capsys.readouterr().out.startswith("Removed 1 trace file (21 bytes)")
    assert left(folder)[0] == ["2026-11-22-200.jsonl", "archive.jsonl"]


def test_a_trace_file_that_cannot_be_removed_is_an_error_not_a_traceback(
    folder: Path, capsys, read_only: Callable[[Path], None]
) -> None:
    read_only(folder / "traces")
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 1
    out, err = capsys.readouterr()
    old = folder / "traces" / "2026-10-23-100.jsonl"
    assert out == ""  # no summary claims a removal
    assert err.startswith(f"multirun: error: prune: cannot remove {old}: ")
    assert "Traceback" not in err
    assert left(folder)[0] == ["2026-10-23-100.jsonl", "2026-11-22-200.jsonl"]


def test_a_checkpoint_that_cannot_be_removed_is_an_error_not_a_traceback(
    folder: Path, capsys, read_only: Callable[[Path], None]
) -> None:
    read_only(folder / "blobs" / "checkpoints" / "old")  # a store on a read-only mount, say
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("multirun: error: prune: cannot remove the checkpoints of run old: ")
    assert str(folder / "blobs" / "checkpoints" / "old") in line
    assert left(folder)[1] == {"old": 2, "mixed": 2, "recent": 1}


def test_ctrl_c_during_prune_says_to_run_it_again_in_one_line(
    folder: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    delete = FileBlobExporter.delete

    def pressed(self: FileBlobExporter, key: str) -> None:  # Ctrl-C between two removals
        delete(self, key)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(FileBlobExporter, "delete", pressed)
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "multirun: interrupted; some old files were removed, not all: run it again to remove the rest"
    ]
    assert left(folder) == (["2026-11-22-200.jsonl"], {"old": 1, "mixed": 2, "recent": 1})


@pytest.mark.parametrize("option", ["--dir", "--store"])
def test_an_empty_dir_or_store_is_refused_not_taken_for_the_default_folder(
    folder: Path, monkeypatch, capsys, option: str
) -> None:
    # `--dir "$UNSET"` in a cron line pruned ./.multirun (or $MULTIRUN_DIR): '' was no option
    monkeypatch.delenv("MULTIRUN_CHECKPOINT_URI", raising=False)
    monkeypatch.setenv("MULTIRUN_DIR", str(folder))
    before = left(folder)
    assert main(["prune", "--older-than", "0", option, ""]) == 2
    assert left(folder) == before
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"multirun prune: error: argument {option}: must name a "
        f"{'folder' if option == '--dir' else 'store'}, got ''"
    )


def killed_while_writing(blobs: Path, key: str, days_ago: float) -> Path:
    """The temp file a process killed (SIGKILL) while writing checkpoint ``key`` left, as old
    as ``days_ago``."""
    writer = (
        "import os, signal, sys\n"
        "from multirun.checkpoints.exporters import FileBlobExporter\n"
        "def fill(fd):\n"
        "    os.write(fd, b'half a checkpoint ' * 100)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "FileBlobExporter(sys.argv[1])._write_once(sys.argv[2], fill)\n"
    )
    killed = subprocess.run([sys.executable, "-c", writer, str(blobs), key], check=False)
    assert killed.returncode == -signal.SIGKILL
    (part,) = (blobs / key).parent.glob(".tmp-*")
    written = time.time() - days_ago * 86_400
    os.utime(part, (written, written))
    return part


def test_checkpoint_writes_killed_processes_left_unfinished_go_once_old(folder: Path, capsys) -> None:
    blobs = folder / "blobs"
    # killed while writing a run's next checkpoint, and while writing a run's first one
    in_old_run = killed_while_writing(blobs, f"checkpoints/old/{checkpoint_id(20)}.ckpt", 20)
    alone = killed_while_writing(blobs, f"checkpoints/killed/{checkpoint_id(30)}.ckpt", 30)
    recent = killed_while_writing(blobs, f"checkpoints/recent/{checkpoint_id(0)}.ckpt", 0)
    assert main(["prune", "--older-than", "7", "--dir", str(folder), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"Would remove {alone} (a checkpoint write left unfinished)" in out
    assert f"Would remove {in_old_run} (a checkpoint write left unfinished)" in out
    assert out[-1] == "Would remove 2 checkpoint writes left unfinished (3.5 KB)."
    assert in_old_run.exists() and alone.exists()
    assert main(["prune", "--older-than", "7", "--dir", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Removed 1 trace file (21 bytes) and 2 checkpoints of 1 run, older than 7 days.",
        "Removed 2 checkpoint writes left unfinished (3.5 KB).",
    ]
    assert recent.exists()  # a write that may still be going on stays
    # the old runs' folders go with them, as for a run whose checkpoints all went
    assert left(folder)[1] == {"mixed": 2, "recent": 2}


def writing(
    exporter: FileBlobExporter, pool: ThreadPoolExecutor, key: str
) -> tuple[PendingBlob, Future[str]]:
    """A checkpoint write of ``key`` under way: its body is written, its header waits for
    ``finish()`` on the blob returned (with the write's future)."""
    blob = PendingBlob(b"state" * 1000, "json")
    put = pool.submit(exporter.put_pending, key, blob)
    # the body is written once the temp file has its whole size: its mtime changes no more
    size = blob.head_size + sum(len(part) for part in blob.body)
    deadline = time.monotonic() + 30
    while not any(
        part.stat().st_size == size for part in (exporter.directory / key).parent.glob(".tmp-*.part")
    ):
        assert time.monotonic() < deadline and not put.done()
        time.sleep(0.01)
    return blob, put


def test_prune_leaves_a_checkpoint_write_still_going_on(folder: Path, capsys) -> None:
    # `--older-than 0` took a write still going on for one a killed process left: the
    # program's checkpoint failed
    exporter = FileBlobExporter(folder / "blobs")
    key = f"checkpoints/recent/{checkpoint_id(0)}.ckpt"
    with ThreadPoolExecutor(1) as pool:
        blob, put = writing(exporter, pool, key)
        try:
            assert main(["prune", "--older-than", "0", "--dir", str(folder)]) == 0
            assert "left unfinished" not in capsys.readouterr().out
        finally:
            blob.finish()
        put.result(timeout=30)
    assert (folder / "blobs" / key).exists()


def test_a_checkpoint_write_whose_temp_file_a_prune_removed_fails_with_a_checkpoint_error(
    folder: Path, capsys
) -> None:
    # a write stalled for hours looks like one a killed process left: the writer raised a bare
    # FileNotFoundError (not the CheckpointError ctx.checkpoint() promises)
    exporter = FileBlobExporter(folder / "blobs")
    key = f"checkpoints/recent/{checkpoint_id(0)}.ckpt"
    with ThreadPoolExecutor(1) as pool:
        blob, put = writing(exporter, pool, key)
        (part,) = (folder / "blobs" / key).parent.glob(".tmp-*.part")
        stalled = time.time() - 2 * 3600
        os.utime(part, (stalled, stalled))
        try:
            assert main(["prune", "--older-than", "0", "--dir", str(folder)]) == 0
            assert "1 checkpoint write left unfinished" in capsys.readouterr().out
        finally:
            blob.finish()
        with pytest.raises(CheckpointError, match="cannot write blob"):
            put.result(timeout=30)
    assert not (folder / "blobs" / key).exists()
