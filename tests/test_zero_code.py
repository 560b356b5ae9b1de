"""Unchanged programs under the real ``opentelemetry-instrument``, set up by environment variables only.

The tests of each framework run their program under ``opentelemetry-instrument`` and compare
the trees (tests/test_motus.py, tests/test_clientai.py); here, what the standard variables do
to that path: ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` naming ours, and an OTLP collector that
never answers. tests/test_install.py runs it where neither framework is installed, and
tests/test_traces_exporter.py with ``OTEL_TRACES_EXPORTER``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from child_processes import environment_without_settings

TESTS = Path(__file__).resolve().parent
INSTRUMENT = Path(sys.executable).parent / "opentelemetry-instrument"
ANSWER = "OpenTelemetry adoption doubled this year, driven by tooling."

# the ClientAI research agent, then which of multirun, clientai and motus the process imported
PROGRAM = """
import sys
from clientai_programs import research_agent
research_agent.main()
print(sorted({name.split(".")[0] for name in sys.modules} & {"multirun", "clientai", "motus"}))
"""


def _instrumented(tmp_path: Path, code: str = PROGRAM, **variables: str) -> subprocess.CompletedProcess[str]:
    env = environment_without_settings()
    env.update(MULTIRUN_DIR=str(tmp_path / "mr"), **variables)
    return subprocess.run(
        [str(INSTRUMENT), sys.executable, "-c", code],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _traced(tmp_path: Path) -> bool:
    return any((tmp_path / "mr" / "traces").glob("*.jsonl"))


def test_the_program_is_traced_and_motus_is_not_imported_for_it(tmp_path: Path) -> None:
    """The control of the tests below: both instrumentors loaded; Motus, which the program does
    not use, is patched only if it is imported, and is not."""
    done = _instrumented(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [ANSWER, "['clientai', 'multirun']"]
    assert _traced(tmp_path)


def test_disabling_both_instrumentations_loads_nothing_of_multirun_and_traces_nothing(tmp_path: Path) -> None:
    done = _instrumented(tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="motus, clientai")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [ANSWER, "['clientai']"]
    assert done.stderr == ""
    assert not _traced(tmp_path)


def test_disabling_the_clientai_instrumentation_leaves_the_agent_untraced(tmp_path: Path) -> None:
    done = _instrumented(tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="clientai")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [ANSWER, "['clientai', 'multirun']"]  # the motus one loaded
    assert done.stderr == ""
    assert not _traced(tmp_path)


@pytest.mark.needs_py312
@pytest.mark.skipif(sys.version_info < (3, 12), reason="Motus needs Python 3.12 or newer")
def test_disabling_the_motus_instrumentation_leaves_a_motus_program_untraced(tmp_path: Path) -> None:
    code = """
import sys
from motus.runtime import agent_task, resolve

@agent_task
def shout(text: str) -> str:
    return text.upper()

print(resolve(shout("hello")))
"""
    done = _instrumented(tmp_path, code, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="motus")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["HELLO"]
    assert not _traced(tmp_path)
    traced = _instrumented(tmp_path, code)  # the control: the same program, traced
    assert traced.stdout.splitlines() == ["HELLO"]
    assert _traced(tmp_path)


def test_a_collector_that_never_answers_changes_nothing_but_a_bounded_exit(
    silent_collector: str, tmp_path: Path
) -> None:
    env = environment_without_settings()
    env.update(MULTIRUN_DIR=str(tmp_path / "mr"), OTEL_EXPORTER_OTLP_ENDPOINT=silent_collector)
    program = subprocess.Popen(
        [str(INSTRUMENT), sys.executable, "-c", PROGRAM],
        cwd=TESTS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, program.kill)  # a child hung before its lines ends the read
    watchdog.start()
    try:
        assert program.stdout is not None
        printed = [program.stdout.readline(), program.stdout.readline()]  # its last line: it exits
        started = time.monotonic()  # the exit only: on a loaded machine the start took 8 s of 10
        out, err = program.communicate(timeout=120)
        took = time.monotonic() - started
    finally:
        watchdog.cancel()
        program.kill()
    done = subprocess.CompletedProcess(program.args, program.returncode, "".join(printed) + out, err)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [ANSWER, "['clientai', 'multirun']"]
    assert took < 10, f"took {took:.1f} s: {done.stderr}"  # the 3 s shutdown timeout, not 10 s per export
    [lost] = [line for line in done.stderr.splitlines() if "not delivered" in line]
    assert "12 span(s)" in lost and "shutdown timeout" in lost
    assert not _traced(tmp_path)
