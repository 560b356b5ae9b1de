"""multirun checkpoints / show / verify, and multirun resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from multirun import run
from multirun.cli.main import main
from multirun.context import get_current_run_context


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


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_checkpoints_lists_show_and_verify(store_dir, capsys) -> None:
    code, out, _ = run_cli(capsys, "checkpoints", "--dir", str(store_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "CHECKPOINT"] and len(lines) == 3
    newest = lines[-1].split()[1]

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


def test_show_of_an_unknown_checkpoint_is_one_line_and_exit_1(store_dir, capsys) -> None:
    code, _, err = run_cli(capsys, "checkpoints", "show", "nope", "--dir", str(store_dir))
    assert code == 1
    assert err.strip() == "multirun: error: no checkpoint 'nope' in the store"


def test_resume_runs_the_command_with_the_checkpoint_to_continue(store_dir, capfd) -> None:
    run_id = sorted((store_dir / "blobs" / "checkpoints").iterdir())[0].name
    printer = [sys.executable, "-c", "import os; print('RESUME=' + os.environ['MULTIRUN_RESUME'])"]
    code = main(["resume", "--dir", str(store_dir), run_id, "--", *printer])
    out, err = capfd.readouterr()
    assert code == 0
    newest = sorted((store_dir / "blobs" / "checkpoints" / run_id).iterdir())[-1].stem
    assert f"RESUME={newest}" in out
    assert f"resuming run {run_id}" in err


def test_resume_without_a_command_says_how(store_dir, capsys) -> None:
    run_id = sorted((store_dir / "blobs" / "checkpoints").iterdir())[0].name
    code, _, err = run_cli(capsys, "resume", "--dir", str(store_dir), run_id)
    assert code == 1 and "after --" in err


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
    assert "no checkpoint 'nope'" in result.stderr and "Traceback" not in result.stderr
