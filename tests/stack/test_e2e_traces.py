"""The demo's trace, package -> Collector -> Jaeger (and the Tempo pipeline), read back from Jaeger's API."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack_servers import Stack, wait_for

pytestmark = pytest.mark.stack

DEMO_SPANS = Counter(
    {
        "invoke_workflow research_crew": 1,
        "invoke_agent planner": 1,
        "invoke_agent researcher": 1,
        "invoke_agent writer": 1,
        "chat gpt-4o-mini": 2,  # plan_questions (planner), stream_report (writer)
        "execute_tool web_search": 3,
        "execute_tool fetch_page": 3,
        "chat claude-3-5-haiku": 3,  # summarize
        "step add_sources": 1,
    }
)
STEPS_OF_AGENT = {
    "planner": Counter({"chat gpt-4o-mini": 1}),
    "researcher": Counter(
        {"execute_tool web_search": 3, "execute_tool fetch_page": 3, "chat claude-3-5-haiku": 3}
    ),
    "writer": Counter({"chat gpt-4o-mini": 1, "step add_sources": 1}),
}


@dataclass
class Span:
    name: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    service: str


def _value(value: dict[str, Any]) -> Any:
    """An OTLP JSON AnyValue as a Python value (64-bit integers come as strings)."""
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    for key in ("stringValue", "boolValue"):
        if key in value:
            return value[key]
    return value


def trace_spans(query_url: str, trace_id: str) -> list[Span]:
    """The spans of one trace, from Jaeger's api/v3 (OTLP JSON); none while it is not there."""
    response = httpx.get(f"{query_url}/api/v3/traces/{trace_id}", timeout=5)
    if response.status_code == 404:
        return []
    response.raise_for_status()
    spans = []
    for resource_spans in response.json()["result"]["resourceSpans"]:
        resource = {a["key"]: _value(a["value"]) for a in resource_spans["resource"].get("attributes", [])}
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                spans.append(
                    Span(
                        name=span["name"],
                        span_id=span["spanId"],
                        parent_id=span.get("parentSpanId", ""),
                        attributes={a["key"]: _value(a["value"]) for a in span.get("attributes", [])},
                        service=str(resource.get("service.name")),
                    )
                )
    return spans


@dataclass
class DemoRun:
    run_id: str
    trace_id: str
    tokens: int
    cost: float
    output: str


def run_demo(endpoint: str, folder: Path, **variables: str) -> DemoRun:
    """`multirun demo --endpoint <endpoint>`, as a user runs it, with the OTEL_* ``variables``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env |= {"NO_COLOR": "1", **variables}
    multirun_cli = Path(sys.executable).with_name("multirun")
    result = subprocess.run(
        [str(multirun_cli), "demo", "--dir", str(folder), "--endpoint", endpoint],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"multirun demo failed:\n{result.stdout}\n{result.stderr}"
    heading = re.search(
        r"^Run ([0-9a-f]{32}) \(research_crew\).*, trace ([0-9a-f]{32})$", result.stdout, re.M
    )
    total = re.search(r"^total\s+(\d+) tokens\s+\S+\s+\$([\d.]+)", result.stdout, re.M)
    assert heading and total, f"unexpected output of multirun demo:\n{result.stdout}"
    assert f"Sent:        run {heading.group(1)} to {endpoint}" in result.stdout, result.stdout
    return DemoRun(
        heading.group(1), heading.group(2), int(total.group(1)), float(total.group(2)), result.stdout
    )


@pytest.fixture(scope="module")
def demo_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo sent to the Collector over OTLP/HTTP (the default)."""
    return run_demo(stack.otlp_http, tmp_path_factory.mktemp("demo"))


def _whole_trace(query_url: str, trace_id: str) -> list[Span]:
    expected = sum(DEMO_SPANS.values())

    def check() -> list[Span] | None:
        spans = trace_spans(query_url, trace_id)
        return spans if len(spans) >= expected else None

    return wait_for(f"the {expected} spans of trace {trace_id} in {query_url}", check, timeout=30)


def test_demo_trace_reaches_jaeger_with_its_structure(stack: Stack, demo_run: DemoRun) -> None:
    """Run, agent and step spans arrive in Jaeger, each under its parent."""
    spans = _whole_trace(stack.jaeger.url("query"), demo_run.trace_id)
    assert Counter(span.name for span in spans) == DEMO_SPANS
    assert {span.service for span in spans} == {"multirun-demo"}
    by_id = {span.span_id: span for span in spans}
    (root,) = [span for span in spans if span.name == "invoke_workflow research_crew"]
    assert root.parent_id == ""
    assert root.attributes["multirun.run.id"] == demo_run.run_id
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    for agent_name, steps in STEPS_OF_AGENT.items():
        (agent,) = [span for span in spans if span.name == f"invoke_agent {agent_name}"]
        assert agent.parent_id == root.span_id, f"{agent.name} is not a child of the run span"
        assert agent.attributes["gen_ai.agent.name"] == agent_name
        children = Counter(span.name for span in spans if span.parent_id == agent.span_id)
        assert children == steps, f"steps under {agent.name}: {children}"
    for span in spans:
        if span is not root:
            assert span.parent_id in by_id, f"{span.name}: parent {span.parent_id} is not in the trace"
    retried = [
        s
        for s in spans
        if s.name == "execute_tool fetch_page" and s.attributes.get("multirun.step.attempt") == 2
    ]
    assert len(retried) == 1, "the fetch_page step that was retried once should say attempt 2"


def test_demo_trace_carries_tokens_and_cost(stack: Stack, demo_run: DemoRun) -> None:
    """Token and cost attributes on every model call, rolled up on agents and run, as the CLI printed them."""
    spans = _whole_trace(stack.jaeger.url("query"), demo_run.trace_id)
    calls = [span for span in spans if span.name.startswith("chat ")]
    for call in calls:
        attributes = call.attributes
        assert attributes["gen_ai.request.model"] == call.name.removeprefix("chat ")
        assert (
            isinstance(attributes["gen_ai.usage.input_tokens"], int)
            and attributes["gen_ai.usage.input_tokens"] > 0
        )
        assert isinstance(attributes["gen_ai.usage.output_tokens"], int)
        assert attributes["gen_ai.usage.output_tokens"] > 0
        assert attributes["gen_ai.usage.cost.amount"] > 0
        assert attributes["gen_ai.usage.cost.currency"] == "USD"
        assert attributes["multirun.tokens_used"] == (
            attributes["gen_ai.usage.input_tokens"] + attributes["gen_ai.usage.output_tokens"]
        )
    (root,) = [span for span in spans if span.parent_id == ""]
    call_tokens = sum(call.attributes["multirun.tokens_used"] for call in calls)
    call_cost = sum(call.attributes["gen_ai.usage.cost.amount"] for call in calls)
    assert root.attributes["multirun.tokens_used"] == call_tokens == demo_run.tokens
    assert math.isclose(root.attributes["multirun.cost_usd"], call_cost, rel_tol=1e-9)
    assert round(root.attributes["multirun.cost_usd"], 6) == demo_run.cost
    for agent in (span for span in spans if span.name.startswith("invoke_agent ")):
        steps = [s for s in calls if s.parent_id == agent.span_id]
        assert agent.attributes["multirun.tokens_used"] == sum(
            s.attributes["multirun.tokens_used"] for s in steps
        )


def test_demo_trace_also_goes_down_the_tempo_pipeline(stack: Stack, demo_run: DemoRun) -> None:
    """The otlp/tempo exporter sends the same spans (to a second Jaeger standing in for Tempo)."""
    in_jaeger = _whole_trace(stack.jaeger.url("query"), demo_run.trace_id)
    in_tempo = _whole_trace(stack.tempo.url("query"), demo_run.trace_id)
    assert sorted(s.span_id for s in in_tempo) == sorted(s.span_id for s in in_jaeger)


def shape(spans: list[Span]) -> list[Any]:
    """The tree of ``spans`` without ids or times: each span's name, attempt and children, sorted
    (parallel steps end in any order)."""
    children: dict[str, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)

    def node(span: Span) -> list[Any]:
        below = sorted((node(child) for child in children.get(span.span_id, [])), key=repr)
        return [span.name, span.attributes.get("multirun.step.attempt"), below]

    return sorted((node(root) for root in children.get("", [])), key=repr)


def test_demo_sent_over_grpc_reaches_jaeger_with_the_same_tree_as_over_http(
    stack: Stack, demo_run: DemoRun, tmp_path: Path
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc, as for every OpenTelemetry SDK: the Collector's gRPC
    receiver (4317 in compose) gets the same run, and its metrics."""
    over_grpc = run_demo(stack.otlp_grpc, tmp_path, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert f"to {stack.otlp_grpc} (OTLP/gRPC, service.name multirun-demo)" in over_grpc.output
    grpc_spans = _whole_trace(stack.jaeger.url("query"), over_grpc.trace_id)
    http_spans = _whole_trace(stack.jaeger.url("query"), demo_run.trace_id)
    assert shape(grpc_spans) == shape(http_spans)
    assert Counter(span.name for span in grpc_spans) == DEMO_SPANS
    assert (over_grpc.tokens, over_grpc.cost) == (demo_run.tokens, demo_run.cost)
    (root,) = [span for span in grpc_spans if span.parent_id == ""]
    assert root.attributes["multirun.run.id"] == over_grpc.run_id
    assert root.attributes["multirun.tokens_used"] == over_grpc.tokens

    def received_over_grpc() -> dict[str, float] | None:
        # the Collector's own metrics count what each receiver transport accepted
        text = httpx.get(stack.collector.url("telemetry") + "/metrics", timeout=5).text
        counts = {
            kind: sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(f"otelcol_receiver_accepted_{kind}") and 'transport="grpc"' in line
            )
            for kind in ("spans", "metric_points")
        }
        return counts if all(counts.values()) else None

    wait_for("the Collector to count spans and metric points received over gRPC", received_over_grpc, 30)


def test_demo_sent_straight_to_jaeger_says_the_run_was_sent(stack: Stack, tmp_path: Path) -> None:
    """Jaeger takes OTLP traces but no metrics: the demo sent to it without a Collector exits 0
    with the run in Jaeger, and only warns that the metrics were refused."""
    jaeger = stack.jaeger.url("otlp")  # OTLP over gRPC only in this Jaeger
    straight = run_demo(jaeger, tmp_path, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert (
        Counter(span.name for span in _whole_trace(stack.jaeger.url("query"), straight.trace_id))
        == DEMO_SPANS
    )
