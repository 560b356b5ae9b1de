"""A process killed with SIGKILL mid-run, resumed in a new process: no second side effect
for the steps completed before the checkpoint; the step that was running runs again."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from child_processes import environment_without_settings

PROGRAM = """
import os, signal, sys
import multirun
from multirun import run, step, checkpoint
from multirun.context import get_current_run_context

multirun.init_local(sys.argv[1])
effects = open(sys.argv[2], "a")

def side_effect(name):
    effects.write(name + "\\n")
    effects.flush()
    os.fsync(effects.fileno())

@step
def fetch(n: int) -> int:
    side_effect(f"fetch {n}")
    multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=10)
    return n * 10

@checkpoint(name="fetched")
def fetched(values):
    return values

@step
def write_report(values) -> str:
    side_effect("write_report")
    if os.environ.get("CRASH") == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # after the side effect, before any checkpoint
    return f"report of {sum(values)}"

@run(name=os.environ.get("RUN_NAME", "nightly"))
def nightly() -> str:
    print("RUN", get_current_run_context().run.id, flush=True)
    values = fetched([fetch(1), fetch(2)])
    return write_report(values)

if os.environ.get("CARRY_ON") == "1":  # a program that goes on when its run fails
    try:
        print("RESULT", nightly(), flush=True)
    except Exception as exc:
        print("FAILED", type(exc).__name__, flush=True)
else:
    print("RESULT", nightly(), flush=True)
multirun.get_client().force_flush()
"""


MULTIRUN = Path(sys.executable).parent / "multirun"


def run_program(
    tmp_path: Path,
    *,
    crash: bool,
    resume: str | None = None,
    through_cli: bool = False,
    run_name: str = "nightly",
    options: tuple[str, ...] = (),
    carry_on: bool = False,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The program, its run named ``run_name``; resuming ``resume`` through MULTIRUN_RESUME, or
    with ``multirun resume`` (and its ``options``). ``carry_on``: the program catches its run's
    failure and ends well; ``command``: another program than this one, resumed the same way."""
    script = tmp_path / "nightly.py"
    script.write_text(PROGRAM)
    env = environment_without_settings()
    env["CRASH"] = "1" if crash else "0"
    env["RUN_NAME"] = run_name
    env["CARRY_ON"] = "1" if carry_on else "0"
    if command is None:
        command = [sys.executable, str(script), str(tmp_path / "mr"), str(tmp_path / "effects.txt")]
    if resume is not None and through_cli:
        command = [str(MULTIRUN), "resume", resume, "--dir", str(tmp_path / "mr"), *options, "--", *command]
    elif resume is not None:
        env["MULTIRUN_RESUME"] = resume
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("through_cli", [False, True], ids=["MULTIRUN_RESUME", "multirun resume PREFIX"])
def test_resume_after_sigkill_does_not_repeat_completed_steps(tmp_path: Path, through_cli: bool) -> None:
    crashed = run_program(tmp_path, crash=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]

    resumed = run_program(
        tmp_path, crash=False, resume=run_id[:6] if through_cli else run_id, through_cli=through_cli
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "RESULT report of 30" in resumed.stdout
    assert "not resumed" not in resumed.stderr

    effects = (tmp_path / "effects.txt").read_text().splitlines()
    # fetch 1 and 2 completed before the checkpoint: once each. write_report was running when
    # the process died: it runs again (at-least-once), as documented.
    assert effects == ["fetch 1", "fetch 2", "write_report", "write_report"]


def test_resume_in_a_program_whose_run_has_another_name_is_refused_unless_told(tmp_path: Path) -> None:
    crashed = run_program(tmp_path, crash=True)
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]
    effects = tmp_path / "effects.txt"
    recorded = effects.read_text()

    refused = run_program(tmp_path, crash=False, resume=run_id, through_cli=True, run_name="weekly")
    assert refused.returncode != 0
    assert "CheckpointError: run 'weekly' cannot continue checkpoint" in refused.stderr
    assert f"of run {run_id}: run 'nightly' took it" in refused.stderr
    assert "multirun resume --run-name weekly" in refused.stderr
    assert effects.read_text() == recorded  # refused before any step ran

    renamed = run_program(
        tmp_path,
        crash=False,
        resume=run_id,
        through_cli=True,
        run_name="weekly",
        options=("--run-name", "weekly"),
    )
    assert renamed.returncode == 0, renamed.stderr
    assert "RESULT report of 30" in renamed.stdout
    # fetch 1 and 2 were served from nightly's checkpoint
    assert effects.read_text().splitlines() == ["fetch 1", "fetch 2", "write_report", "write_report"]


def test_the_command_a_refused_resume_suggests_reads_the_store_it_was_given(tmp_path: Path) -> None:
    # it left out --dir: pasted, it looked in ./.multirun and found no such run
    store = tmp_path / "my runs"
    program = [sys.executable, str(tmp_path / "nightly.py"), str(store), str(tmp_path / "effects.txt")]
    crashed = run_program(tmp_path, crash=True, command=program)
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]
    env = environment_without_settings()
    env.update(CRASH="0", RUN_NAME="weekly report", CARRY_ON="0")

    def multirun_resume(*words: str) -> subprocess.CompletedProcess[str]:
        command = [str(MULTIRUN), "resume", *words, "--", *program]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    refused = multirun_resume(run_id, "--dir", str(store))
    assert refused.returncode != 0
    suggested = refused.stderr.split("say so with `", 1)[1].split("`", 1)[0]
    words = shlex.split(suggested)
    assert words[:2] == ["multirun", "resume"] and words[-2:] == ["--", "..."], suggested
    assert "MULTIRUN_RESUME_RUN_NAME='weekly report'" in refused.stderr

    resumed = multirun_resume(*words[2:-2])  # pasted, with the program in place of "..."
    assert resumed.returncode == 0, resumed.stderr
    assert "RESULT report of 30" in resumed.stdout
    # fetch 1 and 2 were served from nightly's checkpoint
    assert (tmp_path / "effects.txt").read_text().splitlines() == [
        "fetch 1",
        "fetch 2",
        "write_report",
        "write_report",
    ]


def not_resumed(run_id: str, checkpoint_id: str, ended: str = "ended") -> str:
    return (
        f"run {run_id} was not resumed: the program {ended} before a @run named 'nightly' "
        f"continued it from checkpoint {checkpoint_id}. Check that the command runs the program "
        "of that run, and that it starts that run; if the run was renamed since, give its new "
        "name with --run-name"
    )


def test_resume_of_a_program_that_starts_no_run_says_the_run_was_not_resumed(tmp_path: Path) -> None:
    # it exited 0 and said nothing more than "resuming run ...": the user took the run as resumed
    crashed = run_program(tmp_path, crash=True)
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]
    other = [sys.executable, "-c", "print('another program')"]
    result = run_program(tmp_path, crash=False, resume=run_id, through_cli=True, command=other)
    assert (result.returncode, result.stdout) == (1, "another program\n")
    resuming, error = result.stderr.splitlines()
    checkpoint_id = resuming.split(" from checkpoint ")[1].split()[0]
    assert error == f"multirun: error: {not_resumed(run_id, checkpoint_id)}"

    # a program that ended badly keeps its exit status, and is told the same
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    result = run_program(tmp_path, crash=False, resume=run_id, through_cli=True, command=failing)
    assert result.returncode == 3
    warning = not_resumed(run_id, checkpoint_id, "ended with exit status 3")
    assert result.stderr.splitlines()[1:] == [f"multirun: warning: {warning}"]


def test_resume_in_a_program_that_goes_on_when_its_run_is_refused_says_the_run_was_not_resumed(
    tmp_path: Path,
) -> None:
    # its run, of another name, was refused; the program carried on and exited 0, silently
    crashed = run_program(tmp_path, crash=True)
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]
    recorded = (tmp_path / "effects.txt").read_text()
    result = run_program(
        tmp_path, crash=False, resume=run_id, through_cli=True, run_name="weekly", carry_on=True
    )
    assert result.returncode == 1
    assert result.stdout == "FAILED CheckpointError\n"
    resuming, error = result.stderr.splitlines()
    checkpoint_id = resuming.split(" from checkpoint ")[1].split()[0]
    assert error == f"multirun: error: {not_resumed(run_id, checkpoint_id)}"
    assert (tmp_path / "effects.txt").read_text() == recorded


def test_resume_of_an_unknown_run_fails_clearly(tmp_path: Path) -> None:
    result = run_program(tmp_path, crash=False, resume="no-such-run")
    assert result.returncode != 0
    assert "no run or checkpoint with id 'no-such-run' in the store" in result.stderr
    assert not (tmp_path / "effects.txt").exists() or (tmp_path / "effects.txt").read_text() == ""


@pytest.mark.parametrize("crash", [False])
def test_the_program_runs_normally_without_resume(tmp_path: Path, crash: bool) -> None:
    result = run_program(tmp_path, crash=crash)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "effects.txt").read_text().splitlines() == ["fetch 1", "fetch 2", "write_report"]


PER_ITEM_PROGRAM = """
import os, signal, sys
import multirun
from multirun import run, step
from multirun.context import get_current_run_context

multirun.init_local(sys.argv[1])
effects = open(sys.argv[2], "a")

@step
def fetch(item: str) -> str:
    effects.write(f"fetch {item}\\n")
    effects.flush()
    return item.upper()

@run(name="per_item")
def per_item(item: str) -> str:
    print("RUN", item, get_current_run_context().run.id, get_current_run_context().is_replaying, flush=True)
    text = fetch(item)
    get_current_run_context().checkpoint(name="fetched")
    if item == os.environ.get("CRASH_AT"):
        os.kill(os.getpid(), signal.SIGKILL)
    return text

for item in sys.argv[3:]:
    print("RESULT", per_item(item), flush=True)
multirun.get_client().force_flush()
"""


def run_per_item(
    tmp_path: Path, items: list[str], *, crash_at: str = "", resume: str = ""
) -> subprocess.CompletedProcess[str]:
    """The program that calls its run once per item, resumed with ``multirun resume`` if asked."""
    script = tmp_path / "per_item.py"
    script.write_text(PER_ITEM_PROGRAM)
    env = environment_without_settings()
    env["CRASH_AT"] = crash_at
    command = [sys.executable, str(script), str(tmp_path / "mr"), str(tmp_path / "effects.txt"), *items]
    if resume:
        command = [str(MULTIRUN), "resume", resume, "--dir", str(tmp_path / "mr"), "--", *command]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_resume_of_a_program_calling_its_run_per_item_continues_the_item_s_call(tmp_path: Path) -> None:
    """The run of item "b" was killed: ``multirun resume`` continues it in the call for "b" (the
    first call, for "a", took it: "a"'s steps ran against "b"'s recording)."""
    crashed = run_per_item(tmp_path, ["a", "b", "c"], crash_at="b")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_id = next(line.split()[2] for line in crashed.stdout.splitlines() if line.startswith("RUN b "))
    (tmp_path / "effects.txt").write_text("")

    resumed = run_per_item(tmp_path, ["a", "b", "c"], resume=run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert [line for line in resumed.stdout.splitlines() if line.startswith("RESULT")] == [
        "RESULT A",
        "RESULT B",
        "RESULT C",
    ]
    assert (tmp_path / "effects.txt").read_text().splitlines() == ["fetch a", "fetch c"]  # b's was served
    runs = [line.split() for line in resumed.stdout.splitlines() if line.startswith("RUN ")]
    assert [(run[1], run[3]) for run in runs] == [("a", "False"), ("b", "True"), ("c", "False")]


def test_resume_of_a_program_whose_run_s_arguments_changed_continues_its_run_of_that_place(
    tmp_path: Path,
) -> None:
    """Arguments that changed since (a date, say) do not stop a run from resuming: the run
    started as many runs of its name in continues it."""
    crashed = run_per_item(tmp_path, ["a", "b"], crash_at="b")
    run_id = crashed.stdout.splitlines()[-1].split()[2]
    (tmp_path / "effects.txt").write_text("")
    resumed = run_per_item(tmp_path, ["a2", "b2"], resume=run_id)
    assert resumed.returncode == 0, resumed.stderr
    runs = [line.split() for line in resumed.stdout.splitlines() if line.startswith("RUN ")]
    assert [(run[1], run[3]) for run in runs] == [("a2", "False"), ("b2", "True")]
    assert "not resumed" not in resumed.stderr


def test_resume_that_no_call_of_the_run_took_says_so(tmp_path: Path) -> None:
    crashed = run_per_item(tmp_path, ["a", "b"], crash_at="b")
    run_id = crashed.stdout.splitlines()[-1].split()[2]
    resumed = run_per_item(tmp_path, ["x"], resume=run_id)
    assert resumed.returncode == 1
    assert resumed.stderr.splitlines()[-1].endswith(
        "Check that the command runs the program of that run, and that it starts that run; 1 run "
        "named 'per_item' started with other arguments than the run that took it, and not as the "
        "program's run of that name that took it (the first, second...): it continues only in a "
        "call with the same arguments, or in that run"
    )
