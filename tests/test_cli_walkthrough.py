"""A new user's path through the ``multirun`` command, on the files of real runs.

An agent program with no ``multirun.init`` (the default client: ``MULTIRUN_DIR``)
runs in its own process, fails, and is resumed with ``multirun resume --dir``
from a folder that has no ``./.multirun``; then every view of it is read back.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from child_processes import environment_without_settings
from multirun import client as client_module
from multirun.cli.main import main

MULTIRUN = Path(sys.executable).parent / "multirun"

AGENT = """
import os
import multirun
from multirun import checkpoint, run, step

@step
def fetch(n: int) -> int:
    multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=10)
    multirun.report_usage("house-model-v0", input_tokens=5, output_tokens=5)  # no known price
    return n * 10

@checkpoint(name="fetched")
def fetched(values):
    return values

@run(name="nightly")
def nightly() -> str:
    values = fetched([fetch(1), fetch(2)])
    if os.environ.get("FAIL") == "1":
        raise RuntimeError("boom")
    return f"sum {sum(values)}"

print("RESULT", nightly(), flush=True)
"""


@dataclass
class Walkthrough:
    home: Path  # the working folder: no ./.multirun in it
    directory: Path  # MULTIRUN_DIR of the first run, --dir of the resume
    failed_run: str
    resumed: subprocess.CompletedProcess[str]

    def run_ids(self) -> list[str]:
        return [run["run_id"] for run in json.loads(cli("runs", "--dir", str(self.directory), "--json"))]

    @property
    def resumed_run(self) -> str:
        return next(run_id for run_id in self.run_ids() if run_id != self.failed_run)

    def checkpoint_ids(self, run_id: str) -> list[str]:
        """Oldest first."""
        folder = self.directory / "blobs" / "checkpoints" / run_id
        return sorted(path.stem for path in folder.glob("*.ckpt"))


def clean_env(**extra: str) -> dict[str, str]:
    env = environment_without_settings()
    return {**env, **extra}


def run_agent(home: Path, *prefix: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The agent program, behind ``prefix`` (e.g. ``multirun resume ID --``), from ``home``."""
    command = [*prefix, sys.executable, str(home / "agent.py")]
    return subprocess.run(
        command, cwd=home, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def cli(*argv: str) -> str:
    """``multirun ARGV`` in this process: its output; it must succeed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(list(argv))
    finally:
        client_module._configured = None
    assert code == 0, (argv, out.getvalue())
    return out.getvalue()


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Walkthrough:
    home = tmp_path_factory.mktemp("home")
    (home / "agent.py").write_text(AGENT)
    directory = home / "agent-runs"
    failed = run_agent(home, FAIL="1", MULTIRUN_DIR=str(directory))
    assert failed.returncode == 1 and "RuntimeError: boom" in failed.stderr
    [run_id] = [run["run_id"] for run in json.loads(cli("runs", "--dir", str(directory), "--json"))]
    resumed = run_agent(home, str(MULTIRUN), "resume", "--dir", "agent-runs", run_id, "--")
    return Walkthrough(home, directory, run_id, resumed)


# ---------------------------------------------------------------------------
# the failed run


def test_the_failed_run_shows_its_error_message(walk: Walkthrough) -> None:
    out = cli("runs", "show", walk.failed_run[:6], "--dir", str(walk.directory))
    root = next(line for line in out.splitlines() if line.startswith("invoke_workflow nightly"))
    assert "failed" in root and "error: RuntimeError: boom;" in root


def test_the_failed_run_json_has_its_exception_event(walk: Walkthrough) -> None:
    tree = json.loads(cli("runs", "show", walk.failed_run, "--dir", str(walk.directory), "--json"))
    assert tree["error_type"] == "RuntimeError" and tree["error_message"] == "boom"
    [exception] = [event for event in tree["events"] if event["name"] == "exception"]
    assert exception["attributes"]["exception.message"] == "boom"
    assert [
        e["attributes"]["multirun.checkpoint.name"] for e in tree["events"] if e["name"] != "exception"
    ] == [
        "fetched",
        "on_error_RuntimeError",
    ]


def test_priced_and_unpriced_cost_are_both_shown(walk: Walkthrough) -> None:
    listing = cli("runs", "--dir", str(walk.directory))
    row = next(line for line in listing.splitlines() if line.startswith(walk.failed_run[:12]))
    cost = row.split("  ")[-1].strip()
    assert cost.startswith("$0.0000") and cost.endswith(" + unpriced"), row
    total = cli("runs", "show", walk.failed_run, "--dir", str(walk.directory)).splitlines()[-1]
    assert f"  ·  {cost}  ·  2 steps  ·  " in total, total


# ---------------------------------------------------------------------------
# its checkpoints


def test_the_checkpoints_have_names_and_times(walk: Walkthrough) -> None:
    out = cli("checkpoints", "--dir", str(walk.directory), "--run", walk.failed_run[:6])
    header, *rows = out.splitlines()
    assert header.split() == ["RUN", "ID", "CHECKPOINT", "CREATED", "NAME"]
    assert [row.split()[-1] for row in rows] == ["fetched", "on_error_RuntimeError"]
    assert [row.split()[1] for row in rows] == walk.checkpoint_ids(walk.failed_run)
    for row in rows:
        checkpoint_id, day, time = row.split()[1:4]
        shown = cli("checkpoints", "show", checkpoint_id, "--dir", str(walk.directory))
        created = datetime.fromisoformat(shown.split("created", 1)[1].split()[0])
        listed = datetime.strptime(f"{day} {time}", "%Y-%m-%d %H:%M:%S").astimezone()
        assert abs((created - listed).total_seconds()) < 2


def test_a_checkpoint_prefix_is_enough(walk: Walkthrough) -> None:
    first, second = walk.checkpoint_ids(walk.failed_run)
    unique = next(n for n in range(1, 33) if first[:n] != second[:n])
    out = cli("checkpoints", "show", first[:unique], "--dir", str(walk.directory))
    assert out.splitlines()[0].split() == ["checkpoint", first]
    assert out.splitlines()[2].split() == ["name", "fetched"]


# ---------------------------------------------------------------------------
# the resume


def test_resume_with_dir_continues_the_run_in_the_child(walk: Walkthrough) -> None:
    assert walk.resumed.returncode == 0, walk.resumed.stderr
    assert "RESULT sum 30" in walk.resumed.stdout
    newest = walk.checkpoint_ids(walk.failed_run)[-1]
    assert f"resuming run {walk.failed_run} from checkpoint {newest}" in walk.resumed.stderr
    assert not (walk.home / ".multirun").exists()  # the child used the folder it was given
    assert len(walk.run_ids()) == 2


def test_the_resumed_run_says_where_it_came_from(walk: Walkthrough) -> None:
    out = cli("runs", "show", walk.resumed_run[:8], "--dir", str(walk.directory)).splitlines()
    newest = walk.checkpoint_ids(walk.failed_run)[-1]
    assert out[1] == f"Resumed from checkpoint {newest} of run {walk.failed_run}"
    assert out[-1].endswith(f"(includes the spend carried over from run {walk.failed_run[:12]})")


def test_resume_takes_options_after_a_prefix(walk: Walkthrough) -> None:
    copy = walk.home / "copy"
    shutil.copytree(walk.directory, copy)
    try:
        done = run_agent(walk.home, str(MULTIRUN), "resume", walk.failed_run[:6], "--dir", "copy", "--")
        assert done.returncode == 0, done.stderr
        assert "RESULT sum 30" in done.stdout
        assert not (walk.home / ".multirun").exists()
    finally:
        shutil.rmtree(copy)
