"""The workload's metrics in a real Prometheus, and every dashboard query and alert rule run against them.

Package -> OTLP/HTTP -> the Collector -> its prometheus exporter <- Prometheus scrapes.
A query that names a metric or label Prometheus does not have is an empty panel
or an alert that never fires: each one fails here with the panel and the query.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack_queries import (
    BUILTINS,
    PanelQuery,
    Prometheus,
    QueryError,
    dashboard_queries,
    has_data,
    promql_names,
    regex_all,
    substitute,
)
from stack_servers import ROOT, Stack, Workload
from stack_workload import LOSSY_SERVICE_NAME

pytestmark = pytest.mark.stack

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))

# The Prometheus name of every instrument the package creates (multirun/telemetry/metrics.py),
# a histogram by its _bucket, _sum and _count series.
PACKAGE_METRICS = {
    "gen_ai.client.token.usage": "gen_ai_client_token_usage_bucket",
    "gen_ai.client.operation.duration": "gen_ai_client_operation_duration_seconds_bucket",
    "multirun.cost": "multirun_cost_usd_total",
    "multirun.tokens": "multirun_tokens_total",
    "multirun.runs": "multirun_runs_total",
    "multirun.runs.active": "multirun_runs_active",
    "multirun.steps": "multirun_steps_total",
    "multirun.step.duration": "multirun_step_duration_seconds_bucket",
    "multirun.budget.exceeded": "multirun_budget_exceeded_total",
    "multirun.budget.utilization": "multirun_budget_utilization_bucket",
    "multirun.policy.decisions": "multirun_policy_decisions_total",
    "multirun.checkpoint.size": "multirun_checkpoint_size_bytes_bucket",
    "multirun.checkpoint.duration": "multirun_checkpoint_duration_seconds_bucket",
    "multirun.spans.dropped": "multirun_spans_dropped_total",
}


def value_of(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


def test_workload_metrics_arrive_under_their_prometheus_names(stack: Stack, workload: Workload) -> None:
    """Every instrument of the package reaches Prometheus, under the name the docs and rules use."""
    present = stack.prom.metric_names()
    missing = {otel: prom for otel, prom in PACKAGE_METRICS.items() if prom not in present}
    ours = sorted(n for n in present if n.startswith(("multirun_", "gen_ai_")))
    assert not missing, f"not in Prometheus: {missing}; it has {ours}"
    for name in PACKAGE_METRICS.values():
        series = stack.prom.series(name)
        jobs = {s["job"] for s in series}  # the lossy workload's too, when its test ran first
        assert workload.service in jobs, f"{name}: job should be service.name"
        assert jobs <= {workload.service, LOSSY_SERVICE_NAME}, f"{name}: job should be service.name"


def test_workload_counts_arrive_exactly(stack: Stack, workload: Workload) -> None:
    """Counts survive the trip: runs per run name, steps of the demo, tokens of the runaway crew."""
    job = f'job="{workload.service}"'
    runs = stack.prom.query(f"sum by (gen_ai_workflow_name) (multirun_runs_total{{{job}}})")
    assert {s["metric"]["gen_ai_workflow_name"]: float(s["value"][1]) for s in runs} == {
        name: workload.rounds for name in workload.run_names
    }
    demo_steps = f'sum(multirun_steps_total{{{job}, gen_ai_workflow_name="research_crew"}})'
    assert value_of(stack.prom, demo_steps) == 12 * workload.rounds
    for token_type, per_call in (("input", 2_000_000), ("output", 200_000)):
        selector = f'{job}, gen_ai_workflow_name="runaway_crew", gen_ai_token_type="{token_type}"'
        tokens = f"sum(multirun_tokens_total{{{selector}}})"
        assert value_of(stack.prom, tokens) == per_call * 5 * workload.rounds
    assert value_of(stack.prom, f"sum(multirun_runs_active{{{job}}})") == 0


def test_exemplars_lead_from_metrics_to_traces(stack: Stack, workload: Workload) -> None:
    """The exporter's exemplars reach Prometheus with trace ids that Jaeger has."""
    exemplars = stack.prom.exemplars(
        f'multirun_cost_usd_total{{job="{workload.service}"}}', workload.started - 60, time.time()
    )
    trace_ids = {e["labels"]["trace_id"] for series in exemplars for e in series["exemplars"]}
    assert trace_ids, "no exemplars: is enable_open_metrics on, and exemplar storage?"
    some = sorted(trace_ids)[0]
    response = httpx.get(f"{stack.jaeger.url('query')}/api/v3/traces/{some}", timeout=5)
    assert response.status_code == 200, f"the exemplar's trace {some} is not in Jaeger: {response.text}"


# ---------------------------------------------------------------------------
# the alert rules


def test_alert_rules_name_metrics_and_labels_prometheus_has(stack: Stack, workload: Workload) -> None:
    """Every metric an alert rule names exists, and every label it groups or matches on exists on it."""
    rules = [rule for rule in stack.prom.rules() if rule["type"] == "alerting"]
    shipped = re.findall(
        r"(?m)^\s*-\s*alert:\s*(\S+)", (ROOT / "collector-config/prometheus/alert-rules.yml").read_text()
    )
    assert sorted(rule["name"] for rule in rules) == sorted(shipped), (
        "Prometheus did not load every alert rule"
    )
    assert all(rule["duration"] <= 1 for rule in rules), "the tests load the rules with every for: at 1s"
    problems = [
        f"alert {rule['name']}: {problem}"
        for rule in rules
        for problem in names_problems(stack.prom, rule["query"])
    ]
    assert not problems, "\n".join(problems)


def names_problems(prom: Prometheus, expr: str) -> Iterator[str]:
    """What in ``expr`` Prometheus does not have: metric names, and label names on those metrics."""
    names = promql_names(expr)
    present = prom.metric_names()
    unknown = sorted(names.metrics - present)
    if unknown:
        yield f"no metric {', '.join(unknown)} in Prometheus: {expr}"
        return
    labels = set(names.created)
    for metric in names.metrics:
        labels |= prom.label_names(metric)
    absent = sorted(names.labels - labels)
    if absent:
        yield f"label {', '.join(absent)} is on no series of {', '.join(sorted(names.metrics))}: {expr}"


# ---------------------------------------------------------------------------
# the dashboards


@pytest.mark.parametrize("path", DASHBOARDS or [None], ids=[p.name for p in DASHBOARDS] or ["none"])
def test_every_dashboard_query_returns_data(stack: Stack, workload: Workload, path: Path | None) -> None:
    """Every Prometheus query of every panel, template variables and Grafana macros filled in,
    returns data over the time of the workload (a range query; an instant one where the panel asks).

    Variables with "All" take their All value; others are tried value by value, and the query must
    show data for one of them. Queries of other data sources (Tempo's TraceQL) are not run here."""
    assert path is not None, "no dashboards in grafana/dashboards/"
    dashboard = json.loads(path.read_text())
    queries, _others = dashboard_queries(dashboard)
    assert queries, f"{path.name}: no Prometheus queries"
    choices, problems = variable_choices(stack.prom, dashboard)
    for query in queries:
        problems += query_problems(stack.prom, workload, query, choices)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def variable_choices(prom: Prometheus, dashboard: dict[str, Any]) -> tuple[dict[str, list[str]], list[str]]:
    """Each template variable's values to try, as Grafana resolves them, in order ("All" when offered)."""
    choices: dict[str, list[str]] = {}
    problems: list[str] = []
    current = dict(BUILTINS)
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        name = variable.get("name")
        if variable.get("type") in ("datasource", "adhoc"):
            continue
        try:
            options = prom.variable_values(variable, current)
        except QueryError as error:
            problems.append(f"variable ${name}: {error}")
            continue
        if not options:
            problems.append(f"variable ${name}: no values (query {variable.get('query')!r})")
            continue
        if variable.get("includeAll"):
            choices[name] = [variable.get("allValue") or regex_all(options)]
        else:
            choices[name] = options[:10]
        current[name] = choices[name][0]
    return choices, problems


def query_problems(
    prom: Prometheus, workload: Workload, query: PanelQuery, choices: dict[str, list[str]]
) -> list[str]:
    """Why the query shows nothing for every choice of the variables (empty when it shows data)."""
    names = sorted(choices)
    last = ""
    for combination in itertools.islice(itertools.product(*(choices[n] for n in names)), 20):
        expr = substitute(query.expr, {**BUILTINS, **dict(zip(names, combination, strict=True))})
        left = re.findall(r"\$\{?[A-Za-z_]\w*|\[\[\w+", expr)  # not $1, a regex group
        if left:
            return [f"{query.describe()}\n  -> unknown variable(s) {', '.join(left)}"]
        try:
            if query.instant:
                result = prom.query(expr)
            else:
                result = prom.query_range(expr, workload.started - 30, time.time(), 2)
        except QueryError as error:
            return [f"{query.describe()}\n  -> Prometheus refused it: {error}"]
        if has_data(result):
            problems = list(names_problems(prom, expr))
            return [f"{query.describe()}\n  -> {p}" for p in problems]
        last = expr
    problems = list(names_problems(prom, last)) or ["no data"]
    return [f"{query.describe()}\n  -> {p}" for p in problems]


@pytest.mark.parametrize("path", DASHBOARDS or [None], ids=[p.name for p in DASHBOARDS] or ["none"])
def test_every_query_that_shows_exemplars_gets_some(
    stack: Stack, workload: Workload, path: Path | None
) -> None:
    """A query with the Exemplars toggle on shows dots that lead to traces: Prometheus has exemplars
    for it (the collector's exporter puts them on synchronous counters and on histogram buckets,
    not on a histogram's _count or _sum, nor on what the package counts locally)."""
    assert path is not None, "no dashboards in grafana/dashboards/"
    dashboard = json.loads(path.read_text())
    asking = {
        (str(panel.get("title")), str(target.get("refId"))): target["expr"]
        for panel in _all_panels(dashboard.get("panels") or [])
        for target in panel.get("targets") or []
        if target.get("exemplar")
    }
    assert asking, f"{path.name}: no query asks for exemplars"
    all_values = {name: ".*" for name in ("service", "run_name")}
    problems = []
    for (title, ref), expr in asking.items():
        query = substitute(expr, {**BUILTINS, **all_values})
        found = stack.prom.exemplars(query, workload.started - 60, time.time())
        if not any(series.get("exemplars") for series in found):
            problems.append(f"panel {title!r}, query {ref}: no exemplars for {query}")
    assert not problems, f"{path.name}: the Exemplars toggle shows nothing:\n" + "\n".join(problems)


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels") or [])
