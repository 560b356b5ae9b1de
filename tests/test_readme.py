"""The README's examples work as written: its quick start runs, its command lines parse."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text("utf-8"), re.DOTALL)


def _python_block(marker: str) -> str:
    """The one python block of the README that holds ``marker``."""
    found = [block for block in _python_blocks() if marker in block]
    assert len(found) == 1, f"the README has {len(found)} python blocks with {marker!r}"
    return found[0]


# what tells apart each python block of the README that a test below runs
_QUICK_START = 'crew("OpenTelemetry for agents")'
_RESUME = "multirun.resume("
_MANUAL_STEP = "get_step_result("


def test_every_python_block_of_the_readme_is_one_a_test_here_runs() -> None:
    unrun = [b for b in _python_blocks() if not any(m in b for m in (_QUICK_START, _RESUME, _MANUAL_STEP))]
    assert unrun == [], "a python block of the README that no test runs: run it in tests/test_readme.py"


class AuthenticationError(Exception):
    """What an LLM client raises for a revoked key: never retried, so the run fails at once."""


def test_the_readme_resume_block_continues_a_failed_quick_start_serving_the_steps_it_completed(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []

    def my_llm(model: str, prompt: str) -> tuple[str, Any]:
        calls.append(model)
        if len(calls) == 1:
            raise AuthenticationError("invalid API key")
        return _fake_llm(model, prompt)

    namespace: dict[str, Any] = {"my_llm": my_llm}
    with pytest.raises(AuthenticationError):  # the run fails, and checkpoints on its error
        exec(compile(_quick_start(), str(README), "exec"), namespace)
    [run_id] = [p.name for p in (tmp_path / ".multirun" / "blobs" / "checkpoints").iterdir()]
    block = _python_block(_RESUME).replace("4f0c...", run_id[:4])  # a prefix will do, as the README says
    block = block.replace("the same arguments", "OpenTelemetry for agents")
    exec(compile(block, str(README), "exec"), namespace)
    multirun.get_client().force_flush()

    assert calls == ["gpt-4o", "gpt-4o"]  # the step that failed runs again
    assert main(["runs", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)[0]
    assert (resumed["name"], resumed["status"]) == ("crew", "completed")
    assert main(["runs", "show", resumed["run_id"], "--json"]) == 0
    spans = [json.loads(capsys.readouterr().out)]
    statuses = {}
    while spans:
        span = spans.pop()
        statuses[span["name"]] = span["status"]
        spans += span["children"]
    assert statuses["execute_tool search"] == "skipped"  # served, not run again
    assert statuses["chat gpt-4o"] == "completed"


async def test_the_readme_manual_step_block_serves_the_step_in_a_resumed_run(
    global_otel: None, tmp_path: Path
) -> None:
    from multirun.context import get_current_agent_context, get_current_run_context
    from multirun.models import StepKind

    body = "\n".join("    " + line for line in _python_block(_MANUAL_STEP).splitlines())
    source = (
        "async def call_llm(prompt):\n"
        "    agent_ctx = get_current_agent_context()\n"
        f"{body}\n"
        "    answer = model(prompt)\n"
        "    await step_ctx.complete(answer)\n"
        "    return answer\n"
    )
    prompts: list[str] = []

    def model(prompt: str) -> str:
        prompts.append(prompt)
        return f"summary of {prompt}"

    namespace: dict[str, Any] = {
        "get_current_agent_context": get_current_agent_context,
        "StepKind": StepKind,
        "model": model,
    }
    exec(compile(source, str(README), "exec"), namespace)
    call_llm = namespace["call_llm"]
    multirun.init(checkpoint_uri=str(tmp_path / "blobs"), span_exporter=InMemorySpanExporter())

    @multirun.run
    async def crew() -> str:
        answer = await call_llm("the news")
        await get_current_run_context().checkpoint(name="after_the_call")
        return str(answer)

    assert await crew() == "summary of the news"
    [run_id] = [p.name for p in (tmp_path / "blobs" / "checkpoints").iterdir()]
    with multirun.resume(run_id=run_id):
        assert await crew() == "summary of the news"
    assert prompts == ["the news"]  # served the second time: the model is not called again


def test_the_example_of_the_packages_docstring_runs_as_written(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert multirun.__doc__ is not None
    namespace: dict[str, Any] = {}
    exec(compile(multirun.__doc__.split("\n\n", 1)[1], multirun.__file__, "exec"), namespace)
    assert namespace["main"]() == "..."
    assert multirun.get_client().force_flush()
    assert main(["runs", "--json"]) == 0


def _demo_transcript() -> list[str]:
    """What the README shows ``multirun demo --dir /tmp/x`` print."""
    block = _section("The `multirun` command").split("```\n", 2)[1]
    command, *lines = block.splitlines()
    assert command == "$ .venv/bin/multirun demo --dir /tmp/x"
    return lines


def _masked(line: str) -> str:
    """``line`` with what changes from one demo to the next (ids, times, durations, where the
    package is, and costs, which follow genai-prices) masked, in as many characters: the
    columns still have to line up."""
    line = re.sub(r"\S*/multirun/demo\.py", "DEMO.PY", line)  # src/ or site-packages/
    line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", line)
    line = re.sub(r"\b[0-9a-f]{12,32}\b", lambda m: "#" * len(m.group()), line)
    line = re.sub(r" *\$\d+\.\d+", lambda m: "~" * len(m.group()), line)  # prices change, not columns
    return re.sub(r" +\d+(?:\.\d+)?m?s\b", lambda m: "~" * len(m.group()), line)


def test_the_demo_prints_what_the_readme_shows(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MULTIRUN_", "NO_COLOR"))}
    done = subprocess.run(
        [sys.executable, "-m", "multirun", "demo", "--dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.replace(str(tmp_path / "x"), "/tmp/x").splitlines()
    assert [_masked(line) for line in printed] == [_masked(line) for line in _demo_transcript()]


def _multirun_variables(text: str) -> set[str]:
    return set(re.findall(r"\bMULTIRUN_[A-Z_]*[A-Z]\b", text))


def test_every_multirun_variable_the_package_reads_is_in_the_readme_and_no_other() -> None:
    package = README.parent / "src" / "multirun"
    read = set().union(*(_multirun_variables(path.read_text("utf-8")) for path in package.rglob("*.py")))
    scripts = set().union(
        *(_multirun_variables(path.read_text("utf-8")) for path in (README.parent / "scripts").iterdir())
    )
    documented = _multirun_variables(README.read_text("utf-8"))
    assert len(read) > 5
    assert read - documented == set(), "read by the package, not in the README"
    assert documented - read - scripts == set(), "in the README, read by nothing"


BENCHMARKS = README.parent / "benchmarks"


def test_the_benchmarks_readme_names_every_benchmark_run_py_runs() -> None:
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    assert spec is not None and spec.loader is not None
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    text = (BENCHMARKS / "README.md").read_text("utf-8")
    table = {row.split(" | ")[0].strip("| `") for row in re.findall(r"^\| `.*", text, re.MULTILINE)}
    usage = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert sorted(set(run_py.SCRIPTS.values()) - table) == [], "benchmarks missing from the table"
    assert sorted(name for name in run_py.SCRIPTS if not re.search(rf"\b{name}\b", usage)) == [], (
        "--only names missing from the usage"
    )


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
    named = set(re.findall(r"`((?:gen_ai|multirun|error|server)\.[a-z_.]*[a-z_])`", table))
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


def _readme_code(pattern: str) -> str:
    """The one inline code span of the README that matches ``pattern`` (a regex of its text)."""
    found = re.findall(rf"`({pattern})`", README.read_text("utf-8"))
    assert len(found) == 1, f"the README has {len(found)} code spans matching {pattern!r}"
    return str(found[0])


def test_the_quick_starts_stand_in_for_my_llm_runs_as_the_readme_writes_it(
    global_otel: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    stand_in = _readme_code(r"my_llm = lambda [^`]*")
    namespace: dict[str, Any] = {}
    exec("import types\n" + stand_in + "\n" + _quick_start(), namespace)  # "after `import types`"
    multirun.get_client().force_flush()

    assert main(["runs", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["status"], listed["tokens"]) == ("crew", "completed", 12 + 40)
    assert list((tmp_path / ".multirun" / "traces").glob("*.jsonl"))  # where the text says they go


def test_the_budget_refusal_reads_as_the_readme_quotes_it(traced: Any) -> None:
    from multirun.models import Budget

    quoted = _readme_code(r"budget exceeded: max_steps [^`]*")

    @multirun.step
    def work() -> None:
        pass

    @multirun.run(budget=Budget(max_steps=2))
    def crew() -> None:
        for _ in range(3):
            work()

    with pytest.raises(multirun.BudgetExceededError) as refused:
        crew()
    assert str(refused.value) == " ".join(quoted.split())


def test_the_decorations_the_readme_says_are_refused_are_refused_and_the_ones_it_shows_work(
    traced: Any,
) -> None:
    import pydantic

    from multirun import ConfigurationError, run, step, think  # noqa: F401  (the snippets' names)
    from multirun.context import get_current_step_context
    from multirun.models import Budget  # noqa: F401

    def body() -> str:
        return get_current_step_context().step.name

    scope = dict(locals(), **globals())
    for refused in ("@step(retry_on=KeyboardInterrupt)", '@run(budget={"max_tokens": -1})'):
        _readme_code(re.escape(refused))
        with pytest.raises(ConfigurationError):
            eval(refused[1:], scope)(body)
    with pytest.raises(pydantic.ValidationError) as invalid:
        eval(_readme_code(re.escape("Budget(max_tokens=-1)")), scope)
    assert isinstance(invalid.value, ValueError) and "max_tokens" in str(invalid.value)
    named = eval(_readme_code(re.escape('@think("analyze")'))[1:], scope)(body)
    assert multirun.run(named)() == "analyze"  # the name given positionally


def test_the_price_overrides_apply_to_the_names_the_readme_says_they_do(
    global_otel: None, tmp_path: Path
) -> None:
    from multirun.models import StepKind

    example = _readme_code(r'\{"my-model": multirun\.Price\([^`]*\)\}')
    prices = eval(example, {"multirun": multirun})
    prices["gpt-4o"] = multirun.Price(input_per_mtok=1000, output_per_mtok=0)
    text = " ".join(README.read_text("utf-8").split())
    assert '`prices={"gpt-4o": ...}` prices `gpt-4o-2024-08-06` too' in text
    assert "`gpt-4o` does not price `gpt-4o-mini` (nor `gpt-4o-mini-2024-07-18`" in text
    multirun.init(span_exporter=InMemorySpanExporter(), prices=prices, local_dir=str(tmp_path))

    @multirun.step(kind=StepKind.LLM_CALL)
    def call(model: str) -> float:
        multirun.report_usage(model, input_tokens=1_000_000)
        return multirun.context.get_current_step_context().step.cost_usd or 0.0

    @multirun.run
    def crew() -> list[float]:
        return [call(m) for m in ("my-model", "gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18")]

    mine, plain, dated, mini = crew()
    assert (mine, plain, dated) == (1.0, 1000.0, 1000.0)
    assert mini < 1000.0  # genai-prices' own price of gpt-4o-mini


def test_the_readme_counts_the_cases_of_the_fault_suite_as_faults_md_lists_them() -> None:
    counted = re.search(
        r"the (\d+) cases and their tests are listed", " ".join(README.read_text("utf-8").split())
    )
    assert counted is not None
    rows = re.findall(r"^\| \d+ \|", FAULTS.read_text("utf-8"), re.MULTILINE)
    assert int(counted.group(1)) == len(rows)
