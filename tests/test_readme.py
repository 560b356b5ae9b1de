"""The README's examples work as written: its quick start runs, its command lines parse."""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import multirun
from multirun.cli.main import build_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"


def _quick_start() -> str:
    heading = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", heading, re.DOTALL)
    assert match is not None, "the README's Quick start has no python block"
    return match.group(1)


def _fake_llm(model: str, prompt: str) -> tuple[str, Any]:
    """The quick start's ``my_llm``: an answer, and usage as a client library returns it."""
    return f"{model} on {prompt[:20]}", SimpleNamespace(input=len(prompt), output=7)


def test_the_quick_start_runs_as_written_and_its_run_is_listed(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_quick_start(), str(README), "exec"), {"my_llm": _fake_llm})
    multirun.get_client().force_flush()

    assert main(["runs", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in runs] == ["crew"]
    assert runs[0]["status"] == "completed"
    assert runs[0]["tokens"] > 0  # report_usage as the quick start calls it was charged
    assert runs[0]["cost_usd"] > 0  # gpt-4o has a known price


def _documented_command_lines() -> list[str]:
    """Every ``multirun COMMAND ...`` synopsis in the README, options in brackets taken as given
    (a bare ``multirun COMMAND`` in the prose is a mention, not a synopsis)."""
    lines = re.findall(
        r"`(multirun\s+(?:demo|runs|prune|resume|checkpoints)\s[^`]+)`", README.read_text("utf-8")
    )
    assert lines, "the README documents no multirun command"
    return sorted(set(lines))


_PLACEHOLDERS = {"DIR": "/tmp/x", "URL": "http://localhost:4318", "N": "5", "DAYS": "7", "URI": "/tmp/b"}


def _as_argv(line: str) -> list[str]:
    words = shlex.split(line.replace("<id>", "ID").replace("[", " ").replace("]", " ").replace("...", ""))[1:]
    if "--" in words:  # `resume ID -- python crew.py`: the program is not the parser's
        words = words[: words.index("--")]
    return [_PLACEHOLDERS.get(word, word) for word in words]


@pytest.mark.parametrize("line", _documented_command_lines())
def test_each_command_line_the_readme_shows_is_one_the_command_accepts(line: str) -> None:
    argv = _as_argv(line)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README shows `{line}`, which the command refuses (exit {exc.code}): {argv}")
    assert getattr(args, "handler", None) is not None, f"`{line}` names no command"


PYPROJECT = README.parent / "pyproject.toml"


def _dependencies() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml (read without tomllib, which 3.10 lacks)."""
    text = PYPROJECT.read_text("utf-8")
    block = re.search(r"^dependencies = \[\n(.*?)^\]", text, re.DOTALL | re.MULTILINE)
    assert block is not None, "pyproject.toml has no [project] dependencies"
    return re.findall(r'^\s*"([^"]+)"', block.group(1), re.MULTILINE)


def test_the_package_pins_opentelemetry_instrumentation_only_through_the_threading_instrumentation() -> None:
    # `pip install .` with the pip of Python 3.10-3.12 (before pip 25.2) failed with
    # ResolutionImpossible when the OpenTelemetry SDK had a patch release that the threading
    # instrumentation had not followed yet (SDK 1.45.2 and semantic conventions 0.66b2, threading
    # still 0.66b1): with opentelemetry-instrumentation required directly as well, those pips took
    # its newest version and never backtracked it. The threading instrumentation requires the
    # opentelemetry-instrumentation of its own version, so it alone brings the right one.
    names = [re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0] for requirement in _dependencies()]
    assert "opentelemetry-instrumentation-threading" in names
    assert "opentelemetry-instrumentation" not in names


def _section(heading: str) -> str:
    text = README.read_text("utf-8")
    assert f"\n## {heading}\n" in text, f"the README has no section {heading!r}"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_configuration_table_lists_every_argument_of_init_and_no_other() -> None:
    rows = re.findall(r"^\| (`[^|]+`) \|", _section("Configuration"), re.MULTILINE)
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert documented == set(inspect.signature(multirun.init).parameters)


def test_report_usage_is_documented_with_all_its_keywords() -> None:
    text = README.read_text("utf-8")
    match = re.search(r"`multirun\.report_usage\(model, ([^)]*)\)`", text)
    assert match is not None, "the README does not show report_usage's arguments"
    documented = re.findall(r"(\w+)=", match.group(1))
    assert documented == [name for name in inspect.signature(multirun.report_usage).parameters][1:]


class _NamingMeter:
    """A meter that keeps the name of each instrument made on it, and makes them on a real one."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider

        self._meter = MeterProvider().get_meter("readme")
        self.names: set[str] = set()

    def __getattr__(self, method: str) -> Any:
        make = getattr(self._meter, method)

        def named(name: str, *args: Any, **kwargs: Any) -> Any:
            self.names.add(name)
            return make(name, *args, **kwargs)

        return named


def test_the_metrics_table_lists_every_instrument_and_no_other() -> None:
    from multirun.telemetry.metrics import Metrics

    meter = _NamingMeter()
    Metrics(meter)  # type: ignore[arg-type]
    first_cells = re.findall(r"^\| ([^|]+) \|", _section("Metrics"), re.MULTILINE)[1:]  # past the header
    # a cell names the metric and, in brackets, its Prometheus name (no dots)
    documented = {name for cell in first_cells for name in re.findall(r"`([a-z_.]+)`", cell) if "." in name}
    assert len(documented) > 10 and documented == meter.names


def test_each_attribute_named_in_full_on_the_trace_table_is_one_multirun_writes() -> None:
    from multirun.telemetry import attributes as attr

    known = {value for value in vars(attr).values() if isinstance(value, str)}
    table = _section("What lands on the trace").split("\n\n", 1)[0]
    named = set(re.findall(r"`((?:gen_ai|multirun|error)\.[a-z_.]*[a-z_])`", table))
    assert len(named) > 10
    assert named - known == set()


FAULTS = README.parent / "tests" / "FAULTS.md"


def _guarantees(text: str) -> list[str]:
    """The bullets of a ``## Guarantees`` section, each on one line."""
    section = text.split("\n## Guarantees\n", 1)[1].split("\n## ", 1)[0]
    bullets = re.findall(r"^- (.*?)(?=\n- |\n\n|\Z)", section, re.MULTILINE | re.DOTALL)
    return [" ".join(bullet.split()) for bullet in bullets]


def test_faults_md_states_the_readmes_guarantees_word_for_word() -> None:
    readme = _guarantees(README.read_text("utf-8"))
    assert len(readme) >= 10
    assert _guarantees(FAULTS.read_text("utf-8")) == readme


def _named_tests() -> list[tuple[str, str]]:
    """Each ``file.py::test`` the table of tests/FAULTS.md names (``::test`` alone is in the
    file named last), as the file and a pattern of the test's name: one ending in ``...`` or
    ``*`` stands for the tests it begins."""
    named: list[tuple[str, str]] = []
    for row in re.findall(r"^\| \d+ \|.*$", FAULTS.read_text("utf-8"), re.MULTILINE):
        tests = row.split(" | ")[3]
        file = ""
        for match in re.finditer(r"(test_\w+\.py)|::(\w+)(\.\.\.|\*)?", tests):
            if match.group(1):
                file = match.group(1)
                named.append((file, ""))
            else:
                named.append((file, match.group(2) + (r"\w*" if match.group(3) else "")))
    return named


def test_each_test_faults_md_names_is_one_that_exists() -> None:
    named = _named_tests()
    assert len(named) > 100
    missing = []
    for file, test in named:
        path = FAULTS.parent / file
        if not path.is_file():
            missing.append(file)
        elif test and not re.search(rf"^(?:async )?def {test}\(", path.read_text("utf-8"), re.MULTILINE):
            missing.append(f"{file}::{test}")
    assert missing == []
