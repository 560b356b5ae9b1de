"""The tracing stack, for real: Alertmanager, Prometheus, Jaeger and the Collector, once per session.

Every server runs the configuration this repository ships, with only what a
test must change:

- the Collector: ``collector-config/otelcol-config.yaml`` unchanged, on the binary
  built from ``builder-config.yaml``; environment variables put every address on
  a free 127.0.0.1 port. Its traces go to Jaeger and, in place of Grafana Tempo
  (no Tempo binary here), to a second Jaeger: both take OTLP over gRPC, so the
  ``otlp/tempo`` pipeline is exercised the same way.
- Prometheus: ``collector-config/prometheus/prometheus.yml`` with the compose
  host names replaced by those 127.0.0.1 addresses and the scrape and evaluation
  intervals set to 1s; ``alert-rules.yml`` with every ``for:`` set to 1s.
- Alertmanager (started before Prometheus): ``collector-config/alertmanager/alertmanager.yml``
  with its webhook URLs pointed at a webhook server of the test.

Every server is stopped at the end of the session, also when tests fail; their
logs stay in pytest's temporary folder (the path is in every failure message).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import stack_servers as servers
from stack_servers import Stack, Webhook, Workload, wait_for

CONTENT = servers.ROOT / "collector-config"
ALERT_RULES = CONTENT / "prometheus" / "alert-rules.yml"
PROMETHEUS_CONFIG = CONTENT / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = CONTENT / "alertmanager" / "alertmanager.yml"
WORKLOAD = Path(__file__).with_name("stack_workload.py")
SHORT_FOR = "1s"


def shipped(path: Path) -> str:
    if not path.exists():
        pytest.fail(f"{path.relative_to(servers.ROOT)} is missing: the stack tests run it", pytrace=False)
    return path.read_text()


def rules_with_short_for(text: str) -> str:
    """The alert rules with every ``for:`` set to 1s, and nothing else changed."""
    return re.sub(r"(?m)^(\s*for:\s*)\S+", lambda m: m.group(1) + SHORT_FOR, text)


def prometheus_config(text: str, addresses: Mapping[str, str]) -> str:
    """The shipped prometheus.yml with its compose addresses replaced and 1-second intervals."""
    text = re.sub(r"(?m)^(\s*(?:scrape|evaluation)_interval:\s*)\S+", lambda m: m.group(1) + "1s", text)
    for compose, local in addresses.items():
        text = re.sub(rf"(?<![\w.-]){re.escape(compose)}(?![\w.-])", local, text)
    return text


def alertmanager_config(text: str, webhook: str) -> str:
    """The shipped alertmanager.yml with every webhook URL sent to ``webhook`` (path kept)."""

    def replace(match: re.Match[str]) -> str:
        return match.group(1) + webhook + (urlsplit(match.group(2)).path or "/")

    return re.sub(r"(?m)^(\s*(?:-\s*)?url:\s*)(\S+)", replace, text)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """All the servers, started once for the session and stopped at its end, whatever happened."""
    workdir = tmp_path_factory.mktemp("stack")
    rules = rules_with_short_for(shipped(ALERT_RULES))
    prometheus_yml = shipped(PROMETHEUS_CONFIG)
    alertmanager_yml = shipped(ALERTMANAGER_CONFIG)
    started = time.monotonic()
    with ExitStack() as cleanup:
        webhook = Webhook()
        cleanup.callback(webhook.stop)

        def start(server: servers.Server) -> servers.Server:
            cleanup.callback(server.stop)
            return server

        jaeger = start(servers.start_jaeger(workdir, "jaeger"))
        tempo = start(servers.start_jaeger(workdir, "tempo-standin"))
        collector = start(servers.start_collector(workdir, jaeger.address("otlp"), tempo.address("otlp")))
        alertmanager = start(
            servers.start_alertmanager(workdir, alertmanager_config(alertmanager_yml, webhook.url))
        )

        def config(own: str) -> str:
            addresses = {
                "otel-collector:8889": collector.address("prometheus"),
                "otel-collector:8888": collector.address("telemetry"),
                "alertmanager:9093": alertmanager.address("web"),
                "localhost:9090": own,
            }
            return prometheus_config(prometheus_yml, addresses)

        prometheus = start(servers.start_prometheus(workdir, config, rules))
        stack = Stack(workdir, jaeger, tempo, collector, alertmanager, prometheus, webhook)
        cleanup.callback(stack.prom.close)
        # Prometheus applies its targets a few seconds after it starts: the workload must not run before
        wait_for(
            "Prometheus to scrape every target of prometheus.yml",
            stack.prom.targets_up,
            timeout=30,
            found=stack.prom.targets,
        )
        wait_for("Prometheus to find Alertmanager", stack.prom.alertmanagers, timeout=30)
        print(f"\nstack servers up in {time.monotonic() - started:.1f}s, logs in {workdir}", file=sys.stderr)
        yield stack


def run_workload(stack: Stack, *arguments: str) -> dict[str, int | str]:
    """Run stack_workload.py through the Collector with ``arguments``: the JSON line it printed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env["OTEL_METRIC_EXPORT_INTERVAL"] = "500"  # several exports per round: Prometheus sees counters grow
    result = subprocess.run(
        [sys.executable, str(WORKLOAD), "--endpoint", stack.otlp_http, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        pytest.fail(
            f"the workload failed ({result.returncode}):\n{result.stdout}\n{result.stderr}", pytrace=False
        )
    sent: dict[str, int | str] = json.loads(result.stdout.strip().splitlines()[-1])
    return sent


@pytest.fixture(scope="session")
def workload(stack: Stack) -> Workload:
    """stack_workload.py run once through the Collector, and its last metrics scraped by Prometheus."""
    started = time.time()
    sent = run_workload(stack, "--rounds", "3")
    done = Workload(
        service=str(sent["service"]), started=started, finished=time.time(), rounds=int(sent["rounds"])
    )
    expected_runs = len(done.run_names) * done.rounds

    def all_runs_scraped() -> bool:
        found = stack.prom.query(f'sum(multirun_runs_total{{job="{done.service}"}})')
        return bool(found) and float(found[0]["value"][1]) >= expected_runs

    wait_for(f"Prometheus to scrape the {expected_runs} runs of the workload", all_runs_scraped, timeout=60)
    stack.check_running()
    return done


@pytest.fixture(scope="session")
def lossy_workload(stack: Stack) -> str:
    """stack_workload.py --lose-spans: a service whose spans are all dropped and whose metrics
    reach Prometheus; its service name."""
    service = str(run_workload(stack, "--lose-spans")["service"])

    def dropped_scraped() -> bool:
        found = stack.prom.query(f'sum(multirun_spans_dropped_total{{job="{service}"}})')
        return bool(found) and float(found[0]["value"][1]) > 0

    wait_for(f"Prometheus to scrape the spans {service} dropped", dropped_scraped, timeout=60)
    stack.check_running()
    return service
