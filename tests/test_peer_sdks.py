"""multirun next to the real Logfire, Traceloop (OpenLLMetry) and Langfuse SDKs, each set up first.

Each program (tests/peer_programs/) runs in the peer's environment (``with-<peer>``, built by
benchmarks/peers/envs.py, which scripts/test runs), with this checkout's ``src/`` on its path,
and prints the spans the peer's exporter got as JSON. Skipped where the environment is not built.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import genai_prices
import pytest

from child_processes import environment_without_settings, free_port

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PROGRAMS = TESTS / "peer_programs"

pytestmark = pytest.mark.peer_sdks


@functools.cache
def _envs() -> Any:
    """benchmarks/peers/envs.py, which knows where the environments are."""
    spec = importlib.util.spec_from_file_location("peer_envs", ROOT / "benchmarks" / "peers" / "envs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


def run_program(peer: str, program: str, *args: str, tmp_path: Path) -> dict[str, Any]:
    """What ``program`` printed, run with the ``with-<peer>`` environment's Python."""
    python = _envs().cache_dir() / f"with-{peer}" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {peer} environment: benchmarks/peers/envs.py with-{peer} builds it")
    env = environment_without_settings()
    env["PYTHONPATH"] = f"{ROOT / 'src'}:{PROGRAMS}:{TESTS}"
    done = subprocess.run(
        [str(python), str(PROGRAMS / program), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # the last line: Traceloop prints lines of its own to stdout
    return json.loads(done.stdout.splitlines()[-1])


class Spans:
    def __init__(self, spans: list[dict[str, Any]]) -> None:
        self.all = spans
        self.by_id = {s["id"]: s for s in spans}

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.all if s["name"] == name]

    def one(self, name: str) -> dict[str, Any]:
        (found,) = self.named(name)
        return found

    def parent(self, span: dict[str, Any]) -> dict[str, Any] | None:
        return self.by_id.get(span["parent"])

    def children(self, span: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in self.all if s["parent"] == span["id"]]

    def in_run(self, run: str) -> list[dict[str, Any]]:
        """The spans below the run's span."""
        found, todo = [], [self.one(f"invoke_workflow {run}")]
        while todo:
            below = self.children(todo.pop())
            found += below
            todo += below
        return found


def names(spans: list[dict[str, Any]]) -> list[str]:
    return sorted(s["name"] for s in spans)


# ---------------------------------------------------------------------------------------------
# Logfire


@pytest.fixture(scope="module")
def logfire_traced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_program("logfire", "logfire_program.py", "traced", tmp_path=tmp_path_factory.mktemp("logfire"))


def test_under_logfire_runs_use_its_provider_and_nest_both_ways(logfire_traced: dict[str, Any]) -> None:
    out = logfire_traced
    # Logfire's provider stays the global one, multirun uses it and made none of its own
    assert out["same_global"] and out["client_uses_it"] and not out["owned_provider"]
    spans = Spans(out["spans"])
    run = spans.one("invoke_workflow main")
    assert spans.parent(run) == spans.one("logfire span around a run")
    plain = spans.one("step plain")
    assert spans.parent(plain) == run
    inside = spans.one("logfire span inside a step")
    assert spans.parent(inside) == plain
    assert spans.parent(spans.one("instrumented inside a step")) == inside
    # multirun's end attributes, set past the SDK's checks, are on Logfire's spans with its own
    assert plain["attributes"]["multirun.step.status"] == "completed"
    assert plain["attributes"]["logfire.msg"] == "step plain"
    assert run["attributes"]["multirun.run.status"] == "completed"


def test_under_logfire_usage_is_charged_and_budgets_hold(logfire_traced: dict[str, Any]) -> None:
    out = logfire_traced
    spans = Spans(out["spans"])
    (ask,) = [s for s in spans.in_run("main") if s["attributes"].get("multirun.step.name") == "ask"]
    # the usage another instrumentation put on its span, through Logfire's provider
    assert ask["attributes"]["multirun.tokens_used"] == 1100
    assert spans.one("invoke_workflow main")["attributes"]["multirun.tokens_used"] == 1100
    assert "gen_ai.usage.input_tokens" not in ask["attributes"]  # only on the call's span
    # 1100 tokens a call, 1500 at most: the third step is refused
    assert out["refusal"] == "budget exceeded: max_tokens (2200 of 1500 tokens used)"
    capped = spans.in_run("capped")
    statuses = [s["attributes"]["multirun.step.status"] for s in capped if s["scope"] == "multirun"]
    assert sorted(statuses) == ["completed", "completed", "failed"]


def test_under_logfire_a_raising_span_processor_does_not_break_steps(tmp_path: Path) -> None:
    """The guard of the span processors reaches the SDK tracer behind Logfire's proxy tracer."""
    out = run_program("logfire", "logfire_program.py", "raising", tmp_path=tmp_path)
    assert [s["status"] for s in out["steps"]] == ["completed", "completed"]
    (warning,) = out["warnings"]
    assert "raised in on_start; multirun's spans go on without it" in warning


def test_init_with_a_span_exporter_under_logfire_exports_to_it(tmp_path: Path) -> None:
    """multirun.init(span_exporter=...) adds its pipeline to the SDK provider behind Logfire's
    proxy, and says nothing of a provider that is not the SDK's."""
    out = run_program("logfire", "logfire_program.py", "exporter", tmp_path=tmp_path)
    assert out["warnings"] == []
    assert sorted(out["own"]) == names(out["spans"])
    assert "invoke_workflow main" in out["own"] and out["same_global"] and out["client_uses_it"]


def test_logfire_configured_again_keeps_budgets_export_and_guard(tmp_path: Path) -> None:
    """A second logfire.configure puts a new SDK provider behind Logfire's proxies: multirun's
    usage processor, init's exporter and the guard of the span processors move to it."""
    out = run_program("logfire", "logfire_program.py", "reconfigure", tmp_path=tmp_path)
    refused = "budget exceeded: max_tokens (2200 of 1500 tokens used)"
    assert out["first_refusal"] == refused
    assert out["refusal"] == refused  # the usage of the second run is charged too
    # the processor that raises, added by the second configure, no longer breaks the steps
    assert [(s["name"], s["status"]) for s in out["steps"]] == [("plain", "completed"), ("ask", "completed")]
    assert out["steps"][1]["tokens_used"] == 1100
    (warning,) = out["warnings"]
    assert "raised in on_start; multirun's spans go on without it" in warning
    # init(span_exporter=...) gets the spans of the runs after the second configure
    assert "invoke_workflow capped" in out["own_after"] and "invoke_workflow main" in out["own_after"]
    assert sorted(out["own_after"]) == names(out["spans"]) and out["same_global"]


def test_under_logfire_sampling_out_keeps_step_times_and_charges_usage(tmp_path: Path) -> None:
    """Logfire's head sampling at 0: nothing is exported, yet the steps keep their times (their
    spans are Logfire's wrappers of unrecorded spans) and the model call is charged (its span
    recorded, not sampled, by multirun's wrapper of the sampler behind Logfire's proxy)."""
    out = run_program("logfire", "logfire_program.py", "sampled", tmp_path=tmp_path)
    assert out["spans"] == []
    plain, ask = out["steps"]
    assert all(s["started_at"] and s["completed_at"] for s in (plain, ask))
    assert ask["latency_ms"] >= 20  # it sleeps 20 ms
    assert ask["tokens_used"] == 1100
    assert out["refusal"] == "budget exceeded: max_tokens (2200 of 1500 tokens used)"


# ---------------------------------------------------------------------------------------------
# Traceloop (OpenLLMetry)


def price(model: str, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0) -> float:
    usage = genai_prices.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read_tokens or None
    )
    return float(genai_prices.calc_price(usage, model, provider_id="openai").total_price)


@pytest.fixture(scope="module")
def traceloop_openai(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_program("traceloop", "traceloop_program.py", tmp_path=tmp_path_factory.mktemp("traceloop"))


def test_under_traceloop_an_openai_call_in_a_step_is_charged_once(traceloop_openai: dict[str, Any]) -> None:
    out = traceloop_openai
    spans = Spans(out["spans"])
    model = "gpt-4o-mini-2024-07-18"
    call = price(model, 1200, 300, cache_read_tokens=1024)
    streamed = price(model, 500, 20)
    steps = {s["name"]: (s["tokens_used"], s["cost_usd"]) for s in out["steps"]}
    assert steps == {
        "ask": (1500, pytest.approx(call, rel=1e-9)),
        "ask_streaming": (520, pytest.approx(streamed, rel=1e-9)),
        "return_stream": (520, pytest.approx(streamed, rel=1e-9)),
    }
    assert out["run"] == {"tokens": 2540, "cost": pytest.approx(call + 2 * streamed, rel=1e-9)}
    run = spans.one("invoke_workflow main")
    assert run["attributes"]["multirun.tokens_used"] == 2540
    # gen_ai.usage.* on Traceloop's span of each call only, the roll-up on the step's
    in_run = spans.in_run("main")
    with_usage = [s for s in in_run if "gen_ai.usage.input_tokens" in s["attributes"]]
    assert [s["name"] for s in with_usage] == ["openai.chat"] * 3
    for call_span in with_usage:
        step_span = spans.parent(call_span)
        assert step_span is not None and step_span["scope"] == "multirun"
        used = call_span["attributes"]["gen_ai.usage.input_tokens"]
        assert step_span["attributes"]["multirun.tokens_used"] == used + (300 if used == 1200 else 20)


def test_under_traceloop_spans_nest_both_ways_and_budgets_hold(traceloop_openai: dict[str, Any]) -> None:
    out = traceloop_openai
    spans = Spans(out["spans"])
    run = spans.one("invoke_workflow main")
    assert spans.parent(run) == spans.one("traceloop workflow around a run.workflow")
    (ask,) = [s for s in spans.in_run("main") if s["attributes"].get("multirun.step.name") == "ask"]
    assert spans.parent(ask) == run
    assert names(spans.children(ask)) == ["openai.chat", "traceloop task inside a step.task"]
    # 1500 tokens a call, 2000 at most: the third step is refused before its call
    assert out["refusal"] == "budget exceeded: max_tokens (3000 of 2000 tokens used)"
    assert out["capped_calls"] == 2


# ---------------------------------------------------------------------------------------------
# Langfuse (v3 on: OpenTelemetry)


def test_under_langfuse_runs_use_its_provider_and_nest_both_ways(tmp_path: Path) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: no Langfuse server
    out = run_program("langfuse", "langfuse_program.py", base_url, "multirun", tmp_path=tmp_path)
    assert out["same_global"] and out["client_uses_it"] and not out["owned_provider"]
    spans = Spans(out["spans"])
    run = spans.one("invoke_workflow main")
    assert spans.parent(run) == spans.one("observed around a run")
    plain = spans.one("step plain")
    assert spans.parent(plain) == run
    assert names(spans.children(plain)) == ["observed inside a step"]
    (ask,) = [s for s in spans.in_run("main") if s["attributes"].get("multirun.step.name") == "ask"]
    assert names(spans.children(ask)) == ["chat gpt-4o-mini", "observed inside a step"]
    assert ask["attributes"]["multirun.tokens_used"] == 1100
    assert run["attributes"]["multirun.tokens_used"] == 1100


def test_langfuse_s_default_filter_leaves_out_steps_without_genai_attributes(tmp_path: Path) -> None:
    """As the README says: by default Langfuse exports the spans with gen_ai.* attributes (runs,
    agents, LLM and tool steps), not a plain @step's."""
    base_url = f"http://127.0.0.1:{free_port()}"
    out = run_program("langfuse", "langfuse_program.py", base_url, tmp_path=tmp_path)
    exported = {s["name"] for s in out["spans"]}
    assert {"invoke_workflow main", "chat", "observed inside a step"} <= exported
    assert "step plain" not in exported
