"""multirun.telemetry.metrics read back through the SDK's InMemoryMetricReader."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal.exemplar import TraceBasedExemplarFilter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from multirun.models.step import StepKind, StepStatus
from multirun.telemetry import attributes as attr
from multirun.telemetry import metrics as m
from multirun.telemetry.metrics import NO_METRICS, Metrics, NoMetrics

TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]

RUN_ID = "0f4c7f0e9c1b4d8e8a2b3c4d5e6f7a8b"  # what must never appear


@dataclass
class Read:
    """One collection: metrics by name."""

    metrics: dict[str, Metric]

    def __getitem__(self, name: str) -> Metric:
        return self.metrics[name]

    def points(self, name: str) -> list[Any]:
        return list(self.metrics[name].data.data_points)

    def point(self, name: str, **attributes: Any) -> Any:
        """The one data point of ``name`` whose attributes are exactly ``attributes`` (dots as __)."""
        wanted = {key.replace("__", "."): value for key, value in attributes.items()}
        found = [p for p in self.points(name) if dict(p.attributes) == wanted]
        assert len(found) == 1, (
            f"{name}: no point {wanted} in {[dict(p.attributes) for p in self.points(name)]}"
        )
        return found[0]

    def attribute_sets(self, name: str) -> list[dict[str, Any]]:
        return [dict(p.attributes) for p in self.points(name)]


@dataclass
class Env:
    metrics: Metrics
    reader: InMemoryMetricReader
    provider: MeterProvider
    tracer: trace.Tracer
    spans: InMemorySpanExporter

    def read(self) -> Read:
        data = self.reader.get_metrics_data()
        assert data is not None
        found: dict[str, Metric] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    assert metric.name not in found, f"{metric.name} exported twice"
                    found[metric.name] = metric
        return Read(found)


@pytest.fixture
def env() -> Iterator[Env]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], exemplar_filter=TraceBasedExemplarFilter())
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    yield Env(
        Metrics(provider.get_meter("multirun")),
        reader,
        provider,
        tracer_provider.get_tracer("test"),
        spans,
    )
    provider.shutdown()


def usage(metrics: Metrics, **overrides: Any) -> None:
    args: dict[str, Any] = dict(
        run_name="research",
        agent_name="planner",
        operation="chat",
        provider="openai",
        request_model="gpt-4o",
        response_model="gpt-4o-2024-08-06",
        input_tokens=1200,
        output_tokens=300,
        cost_usd=0.006,
    )
    args.update(overrides)
    metrics.usage_reported(**args)


def every_event(metrics: Metrics) -> None:
    """One call of every method, the way a small run would make them."""
    metrics.run_started("research")
    metrics.policy_decision("research", "proceed")
    metrics.step_finished("research", "planner", "function", "completed", 0.001)
    metrics.step_finished("research", "planner", "llm_call", "completed", 1.5)
    metrics.llm_call_finished("chat", "openai", "gpt-4o", "gpt-4o-2024-08-06", 1.5)
    usage(metrics)
    metrics.checkpoint_saved("research", 4096, 0.003)
    metrics.policy_decision("research", "abort", "budget")
    metrics.budget_exceeded("research", "max_cost_usd")
    metrics.step_finished("research", "planner", "tool_call", "failed", 0.2, error_type="TimeoutError")
    metrics.run_finished("research", "failed", {"max_cost_usd": 1.02, "max_tokens": 0.3})


# ---------------------------------------------------------------------------
# the instruments


EXPECTED = {
    # name: (data type, monotonic (None for histograms), unit)
    m.GEN_AI_CLIENT_TOKEN_USAGE: (Histogram, None, "{token}"),
    m.GEN_AI_CLIENT_OPERATION_DURATION: (Histogram, None, "s"),
    m.COST: (Sum, True, "usd"),
    m.TOKENS: (Sum, True, "{token}"),
    m.RUNS: (Sum, True, "{run}"),
    m.RUNS_ACTIVE: (Sum, False, "{run}"),
    m.STEPS: (Sum, True, "{step}"),
    m.STEP_DURATION: (Histogram, None, "s"),
    m.BUDGET_EXCEEDED: (Sum, True, "{event}"),
    m.BUDGET_UTILIZATION: (Histogram, None, "1"),
    m.POLICY_DECISIONS: (Sum, True, "{decision}"),
    m.CHECKPOINT_SIZE: (Histogram, None, "By"),
    m.CHECKPOINT_DURATION: (Histogram, None, "s"),
    m.DROPPED_SPANS: (Sum, True, "{span}"),
}


def test_every_instrument_has_its_name_kind_and_unit(env: Env) -> None:
    every_event(env.metrics)
    read = env.read()
    assert set(read.metrics) == set(EXPECTED)
    for name, (kind, monotonic, unit) in EXPECTED.items():
        metric = read[name]
        assert isinstance(metric.data, kind), name
        assert metric.unit == unit, name
        assert metric.description, name
        assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE, name
        if monotonic is not None:
            assert isinstance(metric.data, Sum)
            assert metric.data.is_monotonic is monotonic, name


def test_genai_descriptions_are_those_of_the_conventions(env: Env) -> None:
    every_event(env.metrics)
    read = env.read()
    assert read[m.GEN_AI_CLIENT_TOKEN_USAGE].description == "Number of input and output tokens used."
    assert read[m.GEN_AI_CLIENT_OPERATION_DURATION].description == "GenAI operation duration."


def test_genai_histograms_use_the_advised_bucket_boundaries(env: Env) -> None:
    every_event(env.metrics)
    read = env.read()
    for point in read.points(m.GEN_AI_CLIENT_TOKEN_USAGE):
        assert list(point.explicit_bounds) == TOKEN_BUCKETS
    for point in read.points(m.GEN_AI_CLIENT_OPERATION_DURATION):
        assert list(point.explicit_bounds) == DURATION_BUCKETS


def test_the_other_histograms_have_boundaries_in_their_units(env: Env) -> None:
    every_event(env.metrics)
    read = env.read()
    bounds = {
        name: list(read.points(name)[0].explicit_bounds)
        for name in EXPECTED
        if EXPECTED[name][0] is Histogram
    }
    assert bounds[m.STEP_DURATION][0] == 0.001 and bounds[m.STEP_DURATION][-1] > 600
    assert bounds[m.CHECKPOINT_DURATION][0] == 0.001
    assert bounds[m.CHECKPOINT_SIZE][0] == 256 and bounds[m.CHECKPOINT_SIZE][-1] == 256 * 1024 * 1024
    assert 1.0 in bounds[m.BUDGET_UTILIZATION]


# ---------------------------------------------------------------------------
# GenAI metrics


def test_token_usage_records_input_and_output_with_the_genai_attributes(env: Env) -> None:
    usage(env.metrics)
    usage(env.metrics, input_tokens=800, output_tokens=100)
    read = env.read()
    common = {
        "gen_ai__operation__name": "chat",
        "gen_ai__provider__name": "openai",
        "gen_ai__request__model": "gpt-4o",
        "gen_ai__response__model": "gpt-4o-2024-08-06",
    }
    inputs: HistogramDataPoint = read.point(
        m.GEN_AI_CLIENT_TOKEN_USAGE, **common, gen_ai__token__type="input"
    )
    outputs: HistogramDataPoint = read.point(
        m.GEN_AI_CLIENT_TOKEN_USAGE, **common, gen_ai__token__type="output"
    )
    assert (inputs.count, inputs.sum, inputs.min, inputs.max) == (2, 2000, 800, 1200)
    assert (outputs.count, outputs.sum) == (2, 400)
    # 800 and 1200 fall in (256, 1024] and (1024, 4096]
    assert inputs.bucket_counts[TOKEN_BUCKETS.index(1024)] == 1
    assert inputs.bucket_counts[TOKEN_BUCKETS.index(4096)] == 1
    assert len(read.points(m.GEN_AI_CLIENT_TOKEN_USAGE)) == 2


def test_usage_feeds_the_multirun_token_and_cost_counters(env: Env) -> None:
    usage(env.metrics)
    usage(env.metrics, input_tokens=800, output_tokens=100, cost_usd=0.004)
    usage(env.metrics, agent_name="writer", cost_usd=None, input_tokens=10, output_tokens=0)  # unpriced
    read = env.read()
    ours = {
        "gen_ai__workflow__name": "research",
        "gen_ai__agent__name": "planner",
        "gen_ai__provider__name": "openai",
        "gen_ai__request__model": "gpt-4o",
        "gen_ai__response__model": "gpt-4o-2024-08-06",
    }
    assert read.point(m.TOKENS, **ours, gen_ai__token__type="input").value == 2000
    assert read.point(m.TOKENS, **ours, gen_ai__token__type="output").value == 400
    writer = {**ours, "gen_ai__agent__name": "writer"}
    assert read.point(m.TOKENS, **writer, gen_ai__token__type="input").value == 10
    assert len(read.points(m.TOKENS)) == 3  # no zero series for the writer's output
    cost: NumberDataPoint = read.point(m.COST, **ours)
    assert cost.value == pytest.approx(0.010)
    assert len(read.points(m.COST)) == 1  # the unpriced call added no $0


def test_usage_from_another_instrumentation_skips_the_genai_histogram(env: Env) -> None:
    usage(env.metrics, genai=False)
    usage(env.metrics, input_tokens=None, output_tokens=7)
    read = env.read()
    types = [p.attributes[attr.GEN_AI_TOKEN_TYPE] for p in read.points(m.GEN_AI_CLIENT_TOKEN_USAGE)]
    assert types == ["output"]  # nothing from genai=False, no input when it was not reported
    assert read.points(m.GEN_AI_CLIENT_TOKEN_USAGE)[0].sum == 7
    assert sum(p.value for p in read.points(m.TOKENS)) == 1200 + 300 + 7


def test_operation_duration_has_error_type_only_on_failure(env: Env) -> None:
    env.metrics.llm_call_finished("chat", "openai", "gpt-4o", "gpt-4o-2024-08-06", 0.5)
    env.metrics.llm_call_finished("chat", "openai", "gpt-4o", "gpt-4o-2024-08-06", 1.5)
    env.metrics.llm_call_finished("chat", "openai", "gpt-4o", None, 30.0, error_type="TimeoutError")
    read = env.read()
    ok: HistogramDataPoint = read.point(
        m.GEN_AI_CLIENT_OPERATION_DURATION,
        gen_ai__operation__name="chat",
        gen_ai__provider__name="openai",
        gen_ai__request__model="gpt-4o",
        gen_ai__response__model="gpt-4o-2024-08-06",
    )
    assert (ok.count, ok.sum) == (2, 2.0)
    failed: HistogramDataPoint = read.point(
        m.GEN_AI_CLIENT_OPERATION_DURATION,
        gen_ai__operation__name="chat",
        gen_ai__provider__name="openai",
        gen_ai__request__model="gpt-4o",
        error__type="TimeoutError",
    )
    assert (failed.count, failed.sum) == (1, 30.0)


# ---------------------------------------------------------------------------
# steps and policy decisions: counted locally, exported by observable counters


def test_steps_are_counted_by_run_agent_kind_and_status(env: Env) -> None:
    for _ in range(3):
        env.metrics.step_finished("research", "planner", "function", "completed", 0.001)
    env.metrics.step_finished("research", "planner", "function", "failed", 0.001, error_type="ValueError")
    env.metrics.step_finished("research", None, "tool_call", "completed", 0.2)
    env.metrics.step_finished("triage", "planner", "function", "completed", 0.001)
    read = env.read()
    assert sorted(read.attribute_sets(m.STEPS), key=str) == sorted(
        [
            {
                attr.GEN_AI_WORKFLOW_NAME: "research",
                attr.GEN_AI_AGENT_NAME: "planner",
                attr.STEP_KIND: "function",
                attr.STEP_STATUS: "completed",
            },
            {
                attr.GEN_AI_WORKFLOW_NAME: "research",
                attr.GEN_AI_AGENT_NAME: "planner",
                attr.STEP_KIND: "function",
                attr.STEP_STATUS: "failed",
            },
            {
                attr.GEN_AI_WORKFLOW_NAME: "research",
                attr.STEP_KIND: "tool_call",
                attr.STEP_STATUS: "completed",
            },
            {
                attr.GEN_AI_WORKFLOW_NAME: "triage",
                attr.GEN_AI_AGENT_NAME: "planner",
                attr.STEP_KIND: "function",
                attr.STEP_STATUS: "completed",
            },
        ],
        key=str,
    )
    point = read.point(
        m.STEPS,
        gen_ai__workflow__name="research",
        gen_ai__agent__name="planner",
        multirun__step__kind="function",
        multirun__step__status="completed",
    )
    assert point.value == 3


def test_observable_counters_report_cumulative_totals_across_collections(env: Env) -> None:
    key = dict(
        gen_ai__workflow__name="research",
        gen_ai__agent__name="planner",
        multirun__step__kind="function",
        multirun__step__status="completed",
    )
    for _ in range(3):
        env.metrics.step_finished("research", "planner", "function", "completed", 0.001)
        env.metrics.policy_decision("research", "proceed")
    first = env.read()
    assert first.point(m.STEPS, **key).value == 3
    assert (
        first.point(
            m.POLICY_DECISIONS, gen_ai__workflow__name="research", multirun__policy__decision="proceed"
        ).value
        == 3
    )

    again = env.read()  # nothing new: the same totals, not zero
    assert again.point(m.STEPS, **key).value == 3

    for _ in range(2):
        env.metrics.step_finished("research", "planner", "function", "completed", 0.001)
    env.metrics.policy_decision("research", "proceed")
    third = env.read()
    assert third.point(m.STEPS, **key).value == 5
    assert (
        third.point(
            m.POLICY_DECISIONS, gen_ai__workflow__name="research", multirun__policy__decision="proceed"
        ).value
        == 4
    )
    assert env.metrics.local_totals() == {m.STEPS: 5, m.POLICY_DECISIONS: 4}


def test_only_llm_tool_sub_agent_steps_and_failed_steps_are_timed(env: Env) -> None:
    metrics = env.metrics
    metrics.step_finished("research", "planner", "function", "completed", 0.001)
    metrics.step_finished("research", "planner", "decision", "completed", 0.001)
    metrics.step_finished("research", "planner", "function", "skipped", 0.0)
    metrics.step_finished("research", "planner", "llm_call", "completed", 1.5)
    metrics.step_finished("research", "planner", "tool_call", "completed", 0.25)
    metrics.step_finished("research", "planner", "sub_agent", "completed", 12.0)
    metrics.step_finished("research", "planner", "function", "failed", 0.004, error_type="KeyError")
    metrics.step_finished("research", "planner", "llm_call", "skipped", 0.0)  # replayed: no call made
    read = env.read()
    timed = {
        (p.attributes[attr.STEP_KIND], p.attributes[attr.STEP_STATUS]): p
        for p in read.points(m.STEP_DURATION)
    }
    assert set(timed) == {
        ("llm_call", "completed"),
        ("tool_call", "completed"),
        ("sub_agent", "completed"),
        ("function", "failed"),
    }
    assert timed[("llm_call", "completed")].sum == 1.5
    assert timed[("sub_agent", "completed")].sum == 12.0
    assert timed[("function", "failed")].attributes[attr.ERROR_TYPE] == "KeyError"
    assert attr.ERROR_TYPE not in timed[("tool_call", "completed")].attributes
    assert sum(p.value for p in read.points(m.STEPS)) == 8  # every step is counted


def test_enum_kinds_and_statuses_become_their_values(env: Env) -> None:
    env.metrics.step_finished("research", "planner", StepKind.LLM_CALL, StepStatus.COMPLETED, 1.0)
    env.metrics.step_finished("research", "planner", "llm_call", "completed", 1.0)  # the same series
    read = env.read()
    (point,) = read.points(m.STEPS)
    assert point.value == 2
    assert point.attributes[attr.STEP_KIND] == "llm_call"
    assert type(point.attributes[attr.STEP_KIND]) is str
    (timed,) = read.points(m.STEP_DURATION)
    assert timed.attributes[attr.STEP_STATUS] == "completed"


def test_policy_decisions_by_decision_and_rule(env: Env) -> None:
    for _ in range(5):
        env.metrics.policy_decision("research", "proceed")
    env.metrics.policy_decision("research", "wait", "rate_limit")
    env.metrics.policy_decision("research", "abort", "budget")
    env.metrics.policy_decision("research", "abort", "budget")
    read = env.read()
    run = {"gen_ai__workflow__name": "research"}
    assert read.point(m.POLICY_DECISIONS, **run, multirun__policy__decision="proceed").value == 5
    wait = read.point(
        m.POLICY_DECISIONS, **run, multirun__policy__decision="wait", multirun__policy__rule="rate_limit"
    )
    assert wait.value == 1
    abort = read.point(
        m.POLICY_DECISIONS, **run, multirun__policy__decision="abort", multirun__policy__rule="budget"
    )
    assert abort.value == 2


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Switch threads as often as the interpreter allows, to interleave as much as possible."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("frequent_switches")
def test_concurrent_step_counts_are_exact(env: Env) -> None:
    threads, calls = 8, 10_000
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        agent = f"agent-{index % 2}"
        for i in range(calls):
            env.metrics.step_finished(
                "research", agent, "function", "completed" if i % 10 else "skipped", 0.0
            )
            env.metrics.policy_decision("research", "proceed")

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    read = env.read()
    assert sum(p.value for p in read.points(m.STEPS)) == threads * calls
    assert len(read.points(m.STEPS)) == 4  # 2 agents x 2 statuses
    skipped = [p.value for p in read.points(m.STEPS) if p.attributes[attr.STEP_STATUS] == "skipped"]
    assert sum(skipped) == threads * calls // 10
    assert sum(p.value for p in read.points(m.POLICY_DECISIONS)) == threads * calls


@pytest.mark.usefixtures("frequent_switches")
def test_collecting_while_threads_count_loses_nothing(env: Env) -> None:
    stop = threading.Event()
    seen: list[int] = []

    def collect() -> None:
        while not stop.is_set():
            data = env.reader.get_metrics_data()
            if data is not None:
                for resource_metrics in data.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        for metric in scope_metrics.metrics:
                            if metric.name == m.STEPS:
                                seen.append(sum(p.value for p in metric.data.data_points))

    def work(index: int) -> None:
        for i in range(5_000):
            env.metrics.step_finished(f"run-{i % 3}", f"agent-{index}", "function", "completed", 0.0)

    collector = threading.Thread(target=collect)
    collector.start()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    collector.join()
    assert seen == sorted(seen)  # cumulative: never goes back
    assert sum(p.value for p in env.read().points(m.STEPS)) == 4 * 5_000


def test_a_second_metrics_on_the_same_meter_counts_into_the_same_series(env: Env) -> None:
    other = Metrics(env.provider.get_meter("multirun"))
    env.metrics.step_finished("research", "planner", "function", "completed", 0.0)
    other.step_finished("research", "planner", "function", "completed", 0.0)
    (point,) = env.read().points(m.STEPS)
    assert point.value == 2


def test_too_many_series_fold_into_the_overflow_series(env: Env) -> None:
    metrics = Metrics(
        MeterProvider(metric_readers=[reader := InMemoryMetricReader()]).get_meter("x"), series_limit=3
    )
    for name in ("a", "b", "c", "d", "e", "d"):
        metrics.step_finished(name, None, "function", "completed", 0.0)
    metrics.step_finished("a", None, "function", "completed", 0.0)
    data = reader.get_metrics_data()
    assert data is not None
    (steps,) = [
        metric for metric in data.resource_metrics[0].scope_metrics[0].metrics if metric.name == m.STEPS
    ]
    values = {tuple(sorted(p.attributes.items())): p.value for p in steps.data.data_points}
    assert values == {
        ((attr.GEN_AI_WORKFLOW_NAME, "a"), (attr.STEP_KIND, "function"), (attr.STEP_STATUS, "completed")): 2,
        ((attr.GEN_AI_WORKFLOW_NAME, "b"), (attr.STEP_KIND, "function"), (attr.STEP_STATUS, "completed")): 1,
        ((attr.GEN_AI_WORKFLOW_NAME, "c"), (attr.STEP_KIND, "function"), (attr.STEP_STATUS, "completed")): 1,
        ((m.OTEL_METRIC_OVERFLOW, True),): 3,
    }


def test_too_many_series_of_a_histogram_fold_into_the_overflow_series(env: Env) -> None:
    # an agent named per request: the SDK itself would keep one series per name forever
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("x")
    metrics = Metrics(meter, series_limit=3)
    for agent in ("a", "b", "c", "d", "e", "a"):
        metrics.step_finished("job", agent, "tool_call", "completed", 0.5)
    again = Metrics(meter, series_limit=3)  # a second init on the same meter: the same limit
    again.step_finished("job", "f", "tool_call", "completed", 0.5)
    data = reader.get_metrics_data()
    assert data is not None
    (durations,) = [
        metric
        for metric in data.resource_metrics[0].scope_metrics[0].metrics
        if metric.name == m.STEP_DURATION
    ]
    points = durations.data.data_points
    counts = {p.attributes.get(attr.GEN_AI_AGENT_NAME, "overflow"): p.count for p in points}
    assert counts == {"a": 2, "b": 1, "c": 1, "overflow": 3}
    (overflow,) = [p for p in points if attr.GEN_AI_AGENT_NAME not in p.attributes]
    assert dict(overflow.attributes) == {m.OTEL_METRIC_OVERFLOW: True}


def test_runs_in_progress_past_the_limit_go_back_to_zero_when_they_end(env: Env) -> None:
    # an observable up-down counter's series left out of a collection is not exported at 0: a
    # backend keeps its last value (1 run in progress) until it goes stale
    reader = InMemoryMetricReader()
    metrics = Metrics(MeterProvider(metric_readers=[reader]).get_meter("x"), series_limit=1)
    metrics.run_started("a")
    metrics.run_started("b")  # past the limit
    reader.get_metrics_data()
    metrics.run_finished("b", "completed")
    metrics.run_finished("a", "completed")
    data = reader.get_metrics_data()
    assert data is not None
    (active,) = [
        metric for metric in data.resource_metrics[0].scope_metrics[0].metrics if metric.name == m.RUNS_ACTIVE
    ]
    values = {tuple(sorted(p.attributes.items())): p.value for p in active.data.data_points}
    assert values == {((attr.GEN_AI_WORKFLOW_NAME, "a"),): 0, ((m.OTEL_METRIC_OVERFLOW, True),): 0}


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "10"])
def test_series_limit_must_be_a_positive_int(env: Env, limit: Any) -> None:
    with pytest.raises(ValueError, match="series_limit"):
        Metrics(env.provider.get_meter("other"), series_limit=limit)


# ---------------------------------------------------------------------------
# runs, budgets, checkpoints


def test_runs_in_progress_finished_by_status_and_budget_utilization(env: Env) -> None:
    metrics = env.metrics
    for _ in range(3):
        metrics.run_started("research")
    metrics.run_started("triage")
    metrics.run_finished("research", "completed", {"max_cost_usd": 0.5, "max_tokens": 0.25})
    metrics.run_finished("research", "completed", {"max_cost_usd": 0.75})
    metrics.run_finished("triage", "failed")
    read = env.read()
    assert read.point(m.RUNS_ACTIVE, gen_ai__workflow__name="research").value == 1
    assert read.point(m.RUNS_ACTIVE, gen_ai__workflow__name="triage").value == 0
    assert read.point(m.RUNS, gen_ai__workflow__name="research", multirun__run__status="completed").value == 2
    assert read.point(m.RUNS, gen_ai__workflow__name="triage", multirun__run__status="failed").value == 1
    cost = read.point(
        m.BUDGET_UTILIZATION, gen_ai__workflow__name="research", multirun__budget__limit="max_cost_usd"
    )
    assert (cost.count, cost.sum, cost.max) == (2, 1.25, 0.75)
    tokens = read.point(
        m.BUDGET_UTILIZATION, gen_ai__workflow__name="research", multirun__budget__limit="max_tokens"
    )
    assert (tokens.count, tokens.sum) == (1, 0.25)
    assert len(read.points(m.BUDGET_UTILIZATION)) == 2


def test_budget_exceeded_by_limit(env: Env) -> None:
    env.metrics.budget_exceeded("research", "max_cost_usd")
    env.metrics.budget_exceeded("research", "max_cost_usd")
    env.metrics.budget_exceeded("research", "max_steps")
    read = env.read()
    run = {"gen_ai__workflow__name": "research"}
    assert read.point(m.BUDGET_EXCEEDED, **run, multirun__budget__limit="max_cost_usd").value == 2
    assert read.point(m.BUDGET_EXCEEDED, **run, multirun__budget__limit="max_steps").value == 1


def test_checkpoint_size_and_duration(env: Env) -> None:
    env.metrics.checkpoint_saved("research", 1000, 0.002)
    env.metrics.checkpoint_saved("research", 3000, 0.004)
    read = env.read()
    size: HistogramDataPoint = read.point(m.CHECKPOINT_SIZE, gen_ai__workflow__name="research")
    assert (size.count, size.sum, size.min, size.max) == (2, 4000, 1000, 3000)
    duration: HistogramDataPoint = read.point(m.CHECKPOINT_DURATION, gen_ai__workflow__name="research")
    assert (duration.count, duration.sum) == (2, pytest.approx(0.006))


# ---------------------------------------------------------------------------
# exemplars and cardinality


# counted locally, exported by observable counters: no exemplars
SYNCHRONOUS = set(EXPECTED) - {m.STEPS, m.POLICY_DECISIONS, m.DROPPED_SPANS, m.TOKENS, m.RUNS, m.RUNS_ACTIVE}


def test_exemplars_carry_the_trace_of_the_current_span(env: Env) -> None:
    with env.tracer.start_as_current_span("invoke_workflow research") as span:
        every_event(env.metrics)
    trace_id = span.get_span_context().trace_id
    span_id = span.get_span_context().span_id
    read = env.read()
    for name in SYNCHRONOUS:
        for point in read.points(name):
            assert point.exemplars, f"{name} {dict(point.attributes)} has no exemplar"
            for exemplar in point.exemplars:
                assert (exemplar.trace_id, exemplar.span_id) == (trace_id, span_id), name
    assert [s.name for s in env.spans.get_finished_spans()] == ["invoke_workflow research"]


def test_exemplars_follow_an_explicit_context(env: Env) -> None:
    with env.tracer.start_as_current_span("chat gpt-4o") as llm_span:
        pass
    context = trace.set_span_in_context(llm_span)
    env.metrics.llm_call_finished("chat", "openai", "gpt-4o", None, 2.0, context=context)
    usage(env.metrics, context=context)
    env.metrics.step_finished("research", "planner", "llm_call", "completed", 2.0, context=context)
    env.metrics.step_finished("research", "planner", "llm_call", "completed", 2.0)  # no span: no exemplar
    read = env.read()
    trace_id = llm_span.get_span_context().trace_id
    for name in (m.GEN_AI_CLIENT_OPERATION_DURATION, m.GEN_AI_CLIENT_TOKEN_USAGE, m.COST):
        for point in read.points(name):
            assert [e.trace_id for e in point.exemplars] == [trace_id], name
    (step,) = read.points(m.STEP_DURATION)
    assert step.count == 2
    assert [e.trace_id for e in step.exemplars] == [trace_id]


def test_no_attribute_is_an_id_and_every_one_is_low_cardinality(env: Env) -> None:
    with env.tracer.start_as_current_span("run"):
        every_event(env.metrics)
        env.metrics.step_finished("research", None, "function", "skipped", 0.0)
    read = env.read()
    allowed = {
        attr.GEN_AI_WORKFLOW_NAME,
        attr.GEN_AI_AGENT_NAME,
        attr.GEN_AI_OPERATION_NAME,
        attr.GEN_AI_PROVIDER_NAME,
        attr.GEN_AI_REQUEST_MODEL,
        attr.GEN_AI_RESPONSE_MODEL,
        attr.GEN_AI_TOKEN_TYPE,
        attr.ERROR_TYPE,
        attr.RUN_STATUS,
        attr.STEP_KIND,
        attr.STEP_STATUS,
        attr.POLICY_DECISION,
        attr.POLICY_RULE,
        m.BUDGET_LIMIT,
    }
    ids = {attr.RUN_ID, attr.STEP_ID, attr.GEN_AI_AGENT_ID, attr.CHECKPOINT_ID, attr.RUN_PARENT_ID}
    for name in read.metrics:
        for attributes in read.attribute_sets(name):
            assert set(attributes) <= allowed, (name, attributes)
            assert not set(attributes) & ids
            assert RUN_ID not in attributes.values()


# ---------------------------------------------------------------------------
# the no-op variant


def test_no_metrics_accepts_every_call_and_records_nothing() -> None:
    assert isinstance(NO_METRICS, Metrics)
    every_event(NO_METRICS)
    every_event(NoMetrics())
    assert NO_METRICS.local_totals() == {m.STEPS: 0, m.POLICY_DECISIONS: 0}


def test_metrics_on_the_api_no_op_meter_costs_nothing_visible() -> None:
    from opentelemetry.metrics import NoOpMeter

    metrics = Metrics(NoOpMeter("multirun"))
    every_event(metrics)
    assert metrics.local_totals()[m.STEPS] == 3


def test_no_metrics_replaces_every_recording_method_of_metrics() -> None:
    recording = {
        name
        for name, member in vars(Metrics).items()
        if callable(member) and not name.startswith("_") and name != "local_totals"
    }
    assert recording  # the check below means something
    for name in recording:
        assert getattr(NoMetrics, name) is not getattr(Metrics, name), f"NoMetrics.{name} records"
