"""The content users deploy beside the package: ``collector-config/`` and ``grafana/``.

Checked offline, with the real tools where there are some:

- ``promtool check rules`` and ``promtool test rules`` (every alert tested firing and
  not firing), ``promtool check config``, ``amtool check-config``,
  ``docker-compose config -q``; a missing tool fails with the package to install.
- Every dashboard against Grafana's dashboard JSON schema and every panel against
  its panel plugin's schema (``grafana/schema``, generated from ``@grafana/schema``).
- Every metric and label name in the alert rules, the dashboards and the data
  sources against the names the package's own instruments get in Prometheus. The
  instruments are those ``Metrics`` creates (recorded on the meter, not listed
  here), their labels those its methods record, and the names go through the
  translation of the Collector's prometheus exporter, ported below from
  ``github.com/prometheus/otlptranslator`` v1.0.0: a wrong name is an empty panel
  or an alert that never fires, so it must fail here.

tests/stack/ runs the same files against real servers fed by the demo.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from multirun.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR = ROOT / "collector-config"
PROMETHEUS = COLLECTOR / "prometheus"
RULES = PROMETHEUS / "alert-rules.yml"
RULE_TESTS = PROMETHEUS / "alert-rules.test.yml"
COMPOSE = COLLECTOR / "docker-compose.yml"
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SCHEMA = GRAFANA / "schema"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "datasources.yml"

# the tool -> the Debian package that has it
TOOLS = {"promtool": "prometheus", "amtool": "prometheus-alertmanager", "docker-compose": "docker-compose"}


def tool(name: str) -> str:
    """The path of ``name``; a failure that says what to install when it is missing."""
    path = shutil.which(name)
    if path is None:
        package = TOOLS[name]
        pytest.fail(
            f"{name} is not installed. It comes with the Debian package {package}: "
            f"`apt-get install {package}` (scripts/test installs it through scripts/stack.sh).",
            pytrace=False,
        )
    return path


def run(args: list[str], cwd: Path) -> str:
    """Run a checker; fail with its output unless it exits 0."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"`{' '.join(args)}` (in {cwd}) exited {done.returncode}:\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------
# promtool, amtool, docker-compose


def test_promtool_check_rules() -> None:
    output = run([tool("promtool"), "check", "rules", RULES.name], PROMETHEUS)
    assert "SUCCESS" in output


def test_promtool_test_rules() -> None:
    output = run([tool("promtool"), "test", "rules", RULE_TESTS.name], PROMETHEUS)
    assert "SUCCESS" in output


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    rules = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts, f"no alerts in {RULES}"
    assert not alerts - firing, f"alerts never tested firing: {sorted(alerts - firing)}"
    assert not alerts - silent, f"alerts never tested not firing: {sorted(alerts - silent)}"
    assert {"MultiRunCostOverrun", "MultiRunBudgetExceeded", "MultiRunCircuitBreakerOpen"} <= alerts


def test_alerts_have_severity_and_what_to_do() -> None:
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
            assert "for" in rule, f"{rule['alert']}: say how long it must hold (`for:`), even 0m"


def test_promtool_check_config() -> None:
    output = run([tool("promtool"), "check", "config", "prometheus.yml"], PROMETHEUS)
    assert "SUCCESS" in output


def test_amtool_check_config() -> None:
    output = run([tool("amtool"), "check-config", "alertmanager.yml"], COLLECTOR / "alertmanager")
    assert "SUCCESS" in output


def test_docker_compose_config() -> None:
    run([tool("docker-compose"), "--file", COMPOSE.name, "config", "--quiet"], COLLECTOR)


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE)["services"]
    return services


def test_compose_mounts_files_that_exist() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COLLECTOR / source).exists(), f"service {name} mounts {source}, which does not exist"


def test_compose_runs_the_stack_and_the_demo() -> None:
    services = compose_services()
    stack = {"otel-collector", "jaeger", "tempo", "prometheus", "alertmanager", "grafana", "demo"}
    assert stack <= set(services)
    assert "multirun demo" in " ".join(services["demo"]["command"])
    assert services["demo"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"


# stands in for `pip` and `multirun` in the demo service's loop: pip installs nothing; multirun
# fails the first time, as `multirun demo` does when the collector does not answer, and stops
# the loop the third time
_DEMO_STUBS = {
    "pip": "#!/bin/sh\nexit 0\n",
    "multirun": (
        "#!/bin/sh\n"
        'echo "$*" >> "$CALLS"\n'
        'calls=$(wc -l < "$CALLS")\n'
        '[ "$calls" -ge 3 ] && kill -TERM "$PPID"\n'
        '[ "$calls" -ge 2 ]\n'
    ),
}


def test_the_compose_demo_goes_on_after_a_run_that_failed(tmp_path: Path) -> None:
    # `set -e` ended the loop at the first failed demo (a collector restarting, say): the
    # container restarted and installed the package again, and the dashboards stayed empty
    demo = compose_services()["demo"]
    script = demo["command"][0].replace("$$", "$")  # compose's escape of a $ for the shell
    for name, text in _DEMO_STUBS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {
        **{key: str(value) for key, value in demo["environment"].items()},
        "DEMO_INTERVAL_SECONDS": "0",
        "CALLS": str(tmp_path / "calls"),
        "PATH": f"{tmp_path}:/usr/bin:/bin",
    }
    subprocess.run(["sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 3, calls
    assert calls[0] == "demo --endpoint http://otel-collector:4318 --dir /tmp/multirun"


def otelcol_env_defaults() -> dict[str, str]:
    """``${env:NAME:-default}`` of otelcol-config.yaml: the variables it reads, with their defaults."""
    text = (COLLECTOR / "otelcol-config.yaml").read_text()
    return dict(re.findall(r"\$\{env:(\w+):-([^}]*)\}", text))


def test_compose_sets_only_variables_the_collector_config_reads() -> None:
    reads = otelcol_env_defaults()
    assert reads, "otelcol-config.yaml reads no ${env:...} variables"
    collector = compose_services()["otel-collector"]
    unread = set(collector["environment"]) - set(reads)
    assert not unread, f"otelcol-config.yaml does not read {sorted(unread)}"
    mounted = [volume for volume in collector["volumes"] if volume.startswith("./otelcol-config.yaml:")]
    assert mounted, "the collector must run collector-config/otelcol-config.yaml"


def test_prometheus_scrapes_the_collector_exporter_keeping_its_labels() -> None:
    port = otelcol_env_defaults()["OTELCOL_PROMETHEUS_ENDPOINT"].rsplit(":", 1)[1]
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    targets = [t for c in jobs["otel-collector"]["static_configs"] for t in c["targets"]]
    assert targets == [f"otel-collector:{port}"]
    # without it the exporter's `job` (the service.name) becomes `exported_job`, and $service finds nothing
    assert jobs["otel-collector"]["honor_labels"] is True


# ---------------------------------------------------------------------------
# dashboards against Grafana's schema


@cache
def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA / name).read_text())
    return loaded


def validate(document: Any, against: dict[str, Any], what: str) -> None:
    errors = list(jsonschema.Draft7Validator(against).iter_errors(document))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        where = "/".join(str(part) for part in best.absolute_path)
        message = f"{what}: {len(errors)} schema error(s); at /{where}: {best.message[:500]}"
        pytest.fail(message, pytrace=False)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included (not the rows)."""
    for panel in dashboard.get("panels", []):
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def test_there_are_dashboards() -> None:
    assert {path.name for path in DASHBOARDS} >= {"multirun-cost.json", "multirun-runs.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_matches_grafana_schema(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    validate(dashboard, schema("dashboard.schema.json"), path.name)
    for panel in panels(dashboard):
        panel_schema = SCHEMA / "panels" / f"{panel['type']}.schema.json"
        assert panel_schema.exists(), (
            f"{path.name}: no schema for panel type {panel['type']!r}; add it to PANELS in "
            "grafana/schema/generate.mjs and regenerate"
        )
        validate(panel, schema(f"panels/{panel_schema.name}"), f"{path.name}, panel {panel['title']!r}")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_layout_and_ids(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        inner["id"] for row in dashboard["panels"] if row["type"] == "row" for inner in row["panels"]
    ]
    assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{path.name}: {panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]
    for panel in panels(dashboard):
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert refs and len(refs) == len(set(refs)), f"{panel['title']!r}: refIds missing or repeated"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    return {source["uid"]: source for source in load_yaml(DATASOURCES)["datasources"]}


def datasource_refs(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            else:
                yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_datasources_are_provisioned(path: Path) -> None:
    sources = provisioned_datasources()
    for ref in datasource_refs(json.loads(path.read_text())):
        if ref.get("uid") == "-- Grafana --":
            continue
        assert ref.get("uid") in sources, f"{path.name}: data source {ref} is not in {DATASOURCES.name}"
        assert sources[ref["uid"]]["type"] == ref["type"], f"{path.name}: {ref} has the wrong type"


BUILTIN_VARIABLES = re.compile(r"__\w*")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_variables_are_defined(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"service", "run_name"} <= defined
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", path.read_text()))
    unknown = {name for name in used if not BUILTIN_VARIABLES.fullmatch(name)} - defined
    assert not unknown, f"{path.name} uses undefined variables {sorted(unknown)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_links_to_traces(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    exemplars = [t for p in panels(dashboard) for t in p.get("targets", []) if t.get("exemplar")]
    links = [p for p in panels(dashboard) if p["fieldConfig"]["defaults"].get("links")]
    assert exemplars, f"{path.name}: no query asks for exemplars (the links from points to traces)"
    assert links or any(p["datasource"]["type"] == "tempo" for p in panels(dashboard))
    destinations = provisioned_datasources()["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    # the collector's prometheus exporter names the exemplar label trace_id
    assert {d["datasourceUid"] for d in destinations if d["name"] == "trace_id"} == {"tempo", "jaeger"}


def test_grafana_provisioning_matches_compose() -> None:
    grafana = compose_services()["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"][0]
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    services = compose_services()
    for source in provisioned_datasources().values():
        host = re.match(r"https?://([^:/]+)", source["url"])
        assert host and host.group(1) in services, f"data source {source['name']}: no service {source['url']}"


def test_schema_is_generated_from_the_pinned_package() -> None:
    version = json.loads((SCHEMA / "package.json").read_text())["devDependencies"]["@grafana/schema"]
    generated = [SCHEMA / "dashboard.schema.json", *sorted((SCHEMA / "panels").glob("*.schema.json"))]
    assert len(generated) > 1
    for path in generated:
        assert f"@grafana/schema {version}." in json.loads(path.read_text())["$comment"], path.name


# ---------------------------------------------------------------------------
# OTel -> Prometheus names, as the Collector's prometheus exporter makes them
# (otlptranslator v1.0.0: MetricNamer{WithMetricSuffixes: true, UTF8Allowed: false},
# LabelNamer{PreserveMultipleUnderscores: true}; strategy UnderscoreEscapingWithSuffixes)

UNITS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes",
    "GiBy": "gibibytes", "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "TBy": "terabytes", "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts",
    "g": "grams", "Cel": "celsius", "Hz": "hertz", "1": "", "%": "percent",
}  # fmt: skip
PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
COUNTER, UPDOWNCOUNTER, GAUGE, HISTOGRAM = "counter", "updowncounter", "gauge", "histogram"
# the kind of instrument (Meter.create_<kind>) -> the kind of Prometheus metric it becomes
KINDS = {
    "counter": COUNTER,
    "observable_counter": COUNTER,
    "up_down_counter": UPDOWNCOUNTER,
    "observable_up_down_counter": UPDOWNCOUNTER,
    "histogram": HISTOGRAM,
    "gauge": GAUGE,
    "observable_gauge": GAUGE,
}
# labels the exporter adds to every series: job and instance from service.name and
# service.instance.id, and the instrumentation scope
EXPORTER_LABELS = frozenset(
    {"job", "instance", "otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}
)


def _clean_unit(unit: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9:]", "_", unit)).removeprefix("_")


def prometheus_name(name: str, unit: str, kind: str) -> str:
    """The metric name (before any _bucket/_sum/_count) of an OTel metric."""
    tokens = [token for token in re.split(r"[^a-zA-Z0-9:]+", name) if token]
    main, _, per = (part.strip() for part in unit.partition("/"))
    main_suffix = "" if not main or "{" in main or "}" in main else UNITS.get(main, main)
    per_suffix = "" if not per or "{" in per or "}" in per else "per_" + PER_UNITS.get(per, per)
    main_suffix, per_suffix = _clean_unit(main_suffix), _clean_unit(per_suffix)
    if main_suffix in tokens:
        main_suffix = ""
    per_suffix = "" if per_suffix == "per_" else per_suffix.removesuffix("_")
    if per_suffix in tokens:
        per_suffix = ""
    if per_suffix:
        main_suffix = main_suffix.removesuffix("_")
    tokens += [suffix for suffix in (main_suffix, per_suffix) if suffix]
    if kind == COUNTER:
        tokens = [token for token in tokens if token != "total"] + ["total"]
    if unit == "1" and kind == GAUGE:
        tokens = [token for token in tokens if token != "ratio"] + ["ratio"]
    result = "_".join(tokens)
    return "_" + result if result[:1].isdigit() else result


def prometheus_label(key: str) -> str:
    label = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return "key_" + label if label[:1].isdigit() else label


# computed with github.com/prometheus/otlptranslator v1.0.0, MetricNamer{WithMetricSuffixes: true}
@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("multirun.cost", "usd", COUNTER, "multirun_cost_usd_total"),
        ("multirun.runs.active", "{run}", UPDOWNCOUNTER, "multirun_runs_active"),
        ("multirun.budget.utilization", "1", HISTOGRAM, "multirun_budget_utilization"),
        ("system.cpu.utilization", "1", GAUGE, "system_cpu_utilization_ratio"),
        ("queue.ratio", "1", GAUGE, "queue_ratio"),
        ("http.server.request.duration", "s", HISTOGRAM, "http_server_request_duration_seconds"),
        ("requests.total", "", COUNTER, "requests_total"),
        ("network.io", "By/s", GAUGE, "network_io_bytes_per_second"),
        ("packets.rate", "{packets}/s", GAUGE, "packets_rate_per_second"),
        ("disk.seconds.used", "s", COUNTER, "disk_seconds_used_total"),
        ("distance", "km", GAUGE, "distance_km"),
        ("temp", "Cel", GAUGE, "temp_celsius"),
        ("load", "%", GAUGE, "load_percent"),
        ("x.total.count", "m/min", COUNTER, "x_count_meters_per_min_total"),
        ("2xx.responses", "", COUNTER, "_2xx_responses_total"),
        ("weird__name..here", "ms", HISTOGRAM, "weird_name_here_milliseconds"),
    ],
)
def test_name_translation_matches_otlptranslator(name: str, unit: str, kind: str, expected: str) -> None:
    assert prometheus_name(name, unit, kind) == expected


class RecordingMeter:
    """A Meter that notes every instrument created on it (name, unit, kind) and hands on to a real one."""

    def __init__(self, meter: Any) -> None:
        self._meter = meter
        self.instruments: list[tuple[str, str, str]] = []

    def __getattr__(self, attribute: str) -> Any:
        create = getattr(self._meter, attribute)
        if not attribute.startswith("create_"):
            return create

        def recording(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(create).bind(*args, **kwargs)
            kind = attribute.removeprefix("create_")
            self.instruments.append((bound.arguments["name"], bound.arguments.get("unit") or "", kind))
            return create(*args, **kwargs)

        return recording


def exercise(metrics: Metrics) -> None:
    """Every recording method, with every optional attribute given."""
    run = "research_crew"
    metrics.run_started(run)
    metrics.step_finished(run, "researcher", "llm_call", "failed", 0.5, error_type="TimeoutError")
    metrics.step_finished(run, "researcher", "function", "completed", 0.001)
    metrics.policy_decision(run, "fallback", "graceful_degradation")
    metrics.usage_reported(
        run_name=run, agent_name="researcher", operation="chat", provider="openai",
        request_model="gpt-4o", response_model="gpt-4o-2024-08-06",
        input_tokens=100, output_tokens=20, cost_usd=0.01,
    )  # fmt: skip
    metrics.llm_call_finished("chat", "openai", "gpt-4o", "gpt-4o-2024-08-06", 0.4, error_type="TimeoutError")
    metrics.budget_exceeded(run, "max_cost_usd")
    metrics.checkpoint_saved(run, 2048, 0.01)
    metrics.run_finished(run, "completed", {"max_cost_usd": 0.8})


@cache
def emitted_series() -> dict[str, frozenset[str] | None]:
    """Prometheus series name -> its label names (None: the exercise recorded none of it)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meter = RecordingMeter(provider.get_meter("test_stack_content"))
        exercise(Metrics(meter))  # type: ignore[arg-type]  # a Meter in all but name
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    attributes: dict[str, set[str]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                keys = attributes.setdefault(metric.name, set())
                for point in metric.data.data_points:
                    keys.update(point.attributes or {})
    assert meter.instruments, "Metrics created no instruments"
    series: dict[str, frozenset[str] | None] = {}
    for name, unit, kind in meter.instruments:
        prometheus_kind = KINDS[kind]
        base = prometheus_name(name, unit, prometheus_kind)
        keys = attributes.get(name)
        labels = None if keys is None else frozenset(map(prometheus_label, keys)) | EXPORTER_LABELS
        if prometheus_kind == HISTOGRAM:
            series[base + "_bucket"] = None if labels is None else labels | {"le"}
            series[base + "_sum"] = series[base + "_count"] = labels
        else:
            series[base] = labels
    return series


def test_emitted_series_include_the_documented_names() -> None:
    series = emitted_series()
    for name in (
        "multirun_cost_usd_total",
        "multirun_tokens_total",
        "multirun_steps_total",
        "multirun_step_duration_seconds_bucket",
        "multirun_budget_exceeded_total",
        "multirun_policy_decisions_total",
        "gen_ai_client_operation_duration_seconds_bucket",
    ):
        assert name in series
    assert "gen_ai_workflow_name" in (series["multirun_cost_usd_total"] or ())


# ---------------------------------------------------------------------------
# PromQL: the metric and label names an expression uses

# the words of PromQL that are not metric names
FUNCTIONS = frozenset(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
    sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh
    time timestamp vector year""".split()  # noqa: SIM905
)
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()  # noqa: SIM905
)
KEYWORDS = frozenset("bool and or unless offset atan2 start end inf nan".split())  # noqa: SIM905
LABEL_LISTS = frozenset("by without on ignoring group_left group_right".split())  # noqa: SIM905
TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
      | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)
      | (?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>@:])
      | (?P<punct>[{}()\[\],])""",
    re.VERBOSE,
)
RANGE_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"})


def substitute_grafana_variables(expr: str) -> str:
    """A PromQL expression with Grafana's variables replaced by values of the right shape."""
    expr = re.sub(r"\{\s*\$__tags\s*,?", "{", expr)  # tracesToMetrics: the span's tags as matchers

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return "5m" if name in RANGE_VARIABLES else "x"

    return re.sub(r"\$\{(\w+)[^}]*\}|\$(\w+)", value, expr)


@dataclass
class Parsed:
    """What one expression refers to."""

    selectors: list[tuple[str | None, set[str]]] = field(default_factory=list)  # (metric, matcher labels)
    grouping: set[str] = field(default_factory=set)  # by/without/on/ignoring/group_x labels


def tokens(expr: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position : position + 30]!r} in {expr!r}")
        position = match.end()
        if match.lastgroup != "space":
            found.append((match.lastgroup or "", match.group()))
    return found


def parse(expr: str) -> Parsed:
    """The selectors (metric and matcher labels) and grouping labels of a PromQL expression."""
    found = tokens(substitute_grafana_variables(expr))
    parsed = Parsed()
    i = 0

    def matchers(start: int) -> tuple[int, str | None, set[str]]:
        """Read ``{...}`` from ``start`` (at ``{``): the index after it, a __name__ if any, the labels."""
        labels: set[str] = set()
        name = None
        j = start + 1
        while found[j][1] != "}":
            if found[j][0] == "ident" and found[j + 1][0] == "op":
                if found[j][1] == "__name__":
                    name = found[j + 2][1].strip("\"'`")
                else:
                    labels.add(found[j][1])
                j += 3
            elif found[j][1] == ",":
                j += 1
            else:
                raise ValueError(f"cannot read the matchers of {expr!r} at {found[j][1]!r}")
        return j + 1, name, labels

    while i < len(found):
        kind, text = found[i]
        following = found[i + 1][1] if i + 1 < len(found) else ""
        if text == "[":  # a range or subquery: durations only
            while found[i][1] != "]":
                i += 1
            i += 1
        elif kind == "ident" and text in LABEL_LISTS and following == "(":
            i += 2
            while found[i][1] != ")":
                if found[i][0] == "ident":
                    parsed.grouping.add(found[i][1])
                i += 1
            i += 1
        elif kind == "ident" and (text in FUNCTIONS or text in AGGREGATIONS or text in KEYWORDS):
            i += 1
        elif kind == "ident":
            labels: set[str] = set()
            i += 1
            if following == "{":
                i, _, labels = matchers(i)
            parsed.selectors.append((text, labels))
        elif text == "{":
            i, name, labels = matchers(i)
            parsed.selectors.append((name, labels))
        else:
            i += 1
    return parsed


def test_parse_promql() -> None:
    parsed = parse(
        'sum by (job, le) (rate(a_total{x="1", y=~"$run_name"}[$__rate_interval])) / on (job) group_left '
        '(extra) b offset 10m and {__name__="c", z!="2"} > bool 0.5 unless max without (w) (d[5m:1m])'
    )
    assert parsed.selectors == [("a_total", {"x", "y"}), ("b", set()), ("c", {"z"}), ("d", set())]
    assert parsed.grouping == {"job", "le", "extra", "w"}
    assert parse('rate(m{$__tags, k="v"}[5m])').selectors == [("m", {"k"})]
    with pytest.raises(ValueError):
        parse("sum(m) ; drop")


# ---------------------------------------------------------------------------
# every query in rules, dashboards and data sources


@dataclass
class Query:
    where: str
    expr: str
    # labels of the result it relies on: legend, data links, annotations
    uses: set[str] = field(default_factory=set)


def rule_queries() -> Iterator[Query]:
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            texts = " ".join(rule.get("annotations", {}).values())
            yield Query(
                f"{RULES.name}: {rule.get('alert') or rule.get('record')}",
                rule["expr"],
                set(re.findall(r"\$labels\.(\w+)", texts)),
            )


def dashboard_queries() -> Iterator[Query]:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query" or variable["datasource"]["type"] != "prometheus":
                continue
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            where = f"{path.name}: variable {variable['name']}"
            assert match, f"{where}: expected label_values(...), got {query!r}"
            yield Query(where, match.group(1), {match.group(2)})
        for panel in panels(dashboard):
            links = " ".join(link["url"] for link in panel["fieldConfig"]["defaults"].get("links", []))
            link_labels = set(re.findall(r"__field\.labels\.(\w+)|__data\.fields\.(\w+)", links))
            for target in panel.get("targets", []):
                source = target.get("datasource") or panel["datasource"]
                if source["type"] != "prometheus":
                    continue
                uses = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                uses |= {label for pair in link_labels for label in pair if label}
                yield Query(f"{path.name}: {panel['title']!r} {target['refId']}", target["expr"], uses)


def datasource_queries() -> Iterator[Query]:
    for source in load_yaml(DATASOURCES)["datasources"]:
        traces_to_metrics = source.get("jsonData", {}).get("tracesToMetrics", {})
        # $__tags becomes a matcher per tag of the span: label (the tag's `value`) = the span's value
        tags = ", ".join(f'{tag["value"]}="x"' for tag in traces_to_metrics.get("tags", []))
        for query in traces_to_metrics.get("queries", []):
            # `$$` is a literal `$` in Grafana's provisioning files
            expr = query["query"].replace("$$", "$")
            where = f"{DATASOURCES.name}: {source['name']}: {query['name']}"
            assert "$__tags" in expr, f"{where}: does not filter by the span ($__tags)"
            yield Query(where, expr.replace("$__tags", tags))


def all_queries() -> list[Query]:
    return [*rule_queries(), *dashboard_queries(), *datasource_queries()]


def test_there_are_queries_everywhere() -> None:
    places = [query.where.split(":")[0] for query in all_queries()]
    assert places.count(RULES.name) >= 4
    for path in DASHBOARDS:
        assert places.count(path.name) >= 10, f"{path.name}: fewer queries than expected"
    assert DATASOURCES.name in places


def check_query(query: Query, series: dict[str, frozenset[str] | None]) -> list[str]:
    """What is wrong with the names of ``query``; nothing when every name is one Prometheus will have."""
    problems: list[str] = []
    try:
        parsed = parse(query.expr)
    except ValueError as error:
        return [f"{query.where}: {error}"]
    if not parsed.selectors:
        problems.append(f"{query.where}: selects no metric")
    available: set[str] = set()
    for metric, matcher_labels in parsed.selectors:
        if metric is None:
            problems.append(f"{query.where}: name the metric of every selector")
            continue
        if metric not in series:
            near = difflib.get_close_matches(metric, list(series), n=3)
            problems.append(f"{query.where}: no series {metric!r} is emitted (closest: {near})")
            continue
        labels = series[metric]
        if labels is None:
            problems.append(f"{query.where}: {metric}'s labels are unknown: record it in exercise()")
            continue
        available |= labels
        for label in sorted(matcher_labels - labels):
            near = difflib.get_close_matches(label, list(labels), n=3)
            problems.append(f"{query.where}: {metric} has no label {label!r} (closest: {near})")
    if problems:
        return problems
    for label in sorted(parsed.grouping - available):
        problems.append(f"{query.where}: groups by {label!r}, which none of its metrics has")
    result = parsed.grouping - {"le"} if parsed.grouping else available
    for label in sorted(query.uses - result):
        problems.append(f"{query.where}: uses label {label!r} of the result, which has only {sorted(result)}")
    return problems


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses them all: each query (variables filled in) as a recording rule."""
    rules = [
        {"record": f"query:{number}", "expr": substitute_grafana_variables(query.expr)}
        for number, query in enumerate(all_queries())
    ]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    output = run([tool("promtool"), "check", "rules", "queries.yml"], tmp_path)
    assert f"{len(rules)} rules found" in output


def test_every_metric_and_label_name_is_one_prometheus_has() -> None:
    series = emitted_series()
    problems = [problem for query in all_queries() for problem in check_query(query, series)]
    assert not problems, "names that Prometheus will not have:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("rate(multirun_cost_total[5m])", "no series 'multirun_cost_total'"),
        ("rate(multirun_cost_usd[5m])", "no series 'multirun_cost_usd'"),
        ("histogram_quantile(0.9, rate(multirun_step_duration_seconds[5m]))", "no series"),
        ('sum(multirun_cost_usd_total{run_name="x"})', "has no label 'run_name'"),
        ("sum by (model) (multirun_cost_usd_total)", "groups by 'model'"),
        ('{job="x"}', "name the metric"),
    ],
)
def test_wrong_names_are_caught(expr: str, complaint: str) -> None:
    problems = check_query(Query("example", expr), emitted_series())
    assert any(complaint in problem for problem in problems), problems


def test_a_wrong_legend_label_is_caught() -> None:
    query = Query("example", "sum by (gen_ai_workflow_name) (multirun_cost_usd_total)", {"gen_ai_agent_name"})
    assert check_query(query, emitted_series())


def alert_grouping() -> dict[str, set[str]]:
    """Each alert's labels: those its expression groups by (the outermost ``by``)."""
    found: dict[str, set[str]] = {}
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                by = re.search(r"\bby\s*\(([^)]*)\)", rule["expr"])
                found[rule["alert"]] = set(re.findall(r"\w+", by.group(1))) if by else set()
    return found


def test_a_panel_that_names_an_alert_shows_what_it_alerts_on() -> None:
    # the failure-ratio panel summed the services of a run name together: with the same run
    # name in two services it showed a share the alert (per service) never saw
    alerts = alert_grouping()
    problems = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            for name in set(re.findall(r"\bMultiRun\w+", panel.get("description", ""))) & set(alerts):
                for target in panel.get("targets", []):
                    missing = sorted(alerts[name] - parse(target["expr"]).grouping)
                    if missing:
                        problems.append(f"{path.name}: {panel['title']!r} {target['refId']}: by {missing}")
    assert not problems, "panels that name an alert but not split as it is:\n" + "\n".join(problems)


def test_every_metric_the_package_emits_is_on_a_dashboard() -> None:
    # multirun.spans.dropped ("never silent") was emitted and shown nowhere
    shown = {
        metric
        for query in dashboard_queries()
        for metric, _ in parse(query.expr).selectors
        if metric is not None
    }
    shown |= {re.sub(r"_(bucket|sum|count)$", "", metric) for metric in shown}
    emitted = {re.sub(r"_(bucket|sum|count)$", "", metric) for metric in emitted_series()}
    assert not emitted - shown, f"on no dashboard: {sorted(emitted - shown)}"
