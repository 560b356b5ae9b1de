"""``OTEL_METRICS_EXPORTER`` picks where the metrics of the MeterProvider multirun makes go.

As the SDK's own set-up reads it: ``otlp``, ``console``, ``none``, the name of any exporter or
reader (``prometheus``) installed under the ``opentelemetry_metrics_exporter`` entry points, or
several of them separated by commas. Unset, or ``otlp``, it is as before: OTLP when an endpoint
is set, else no MeterProvider. Each program runs in a fresh process: the global MeterProvider
can be set once only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from child_processes import environment_without_settings
from otlp_collectors import Collector  # the OTLP/HTTP collector (fixture: collector)

PROGRAM = """
import sys
import multirun
from multirun import run, step
from multirun.models import StepKind
from opentelemetry import metrics

if sys.argv[1] == "init":
    multirun.init()


@step(kind=StepKind.LLM_CALL)
def ask(q: str) -> str:
    multirun.report_usage("gpt-4o-mini", input_tokens=10, output_tokens=5)
    return q.upper()


@run
def main(q: str) -> str:
    return ask(q)


print(main("q"))
readers = getattr(metrics.get_meter_provider(), "_all_metric_readers", ())  # none: no SDK provider
print("readers:", sorted(type(reader).__name__ for reader in readers))
"""


def program(tmp_path: Path, *, init: bool = True, **variables: str) -> subprocess.CompletedProcess[str]:
    """PROGRAM in a fresh process with only these OTEL_ variables; ``init``: it calls init(),
    else its first run sets up the defaults."""
    env = environment_without_settings()
    env |= {"MULTIRUN_DIR": str(tmp_path / "mr"), "OTEL_EXPORTER_OTLP_TIMEOUT": "2", **variables}
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, "init" if init else "run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_console_prints_the_metrics_of_a_run_at_exit(tmp_path: Path) -> None:
    done = program(tmp_path, OTEL_METRICS_EXPORTER="console")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Q\nreaders: ['PeriodicExportingMetricReader']\n")
    # printed at exit only: the export interval (10 s) had not passed
    assert done.stdout.count('"name": "gen_ai.client.token.usage"') == 1
    assert '"gen_ai.request.model": "gpt-4o-mini"' in done.stdout


def test_none_exports_no_metric_to_the_endpoint_and_the_program_runs(
    tmp_path: Path, collector: Collector
) -> None:
    done = program(
        tmp_path,
        OTEL_METRICS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"{collector.url}/v1/metrics",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Q\nreaders: []\n"
    assert collector.requests == 0


def test_otlp_exports_to_the_endpoint_variable_as_without_it(tmp_path: Path, collector: Collector) -> None:
    done = program(
        tmp_path,
        OTEL_METRICS_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"{collector.url}/v1/metrics",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Q\nreaders: ['PeriodicExportingMetricReader']\n"
    assert collector.requests == 1  # the metrics, at exit (the spans went to the files)


def test_otlp_without_an_endpoint_makes_no_meter_provider_as_without_it(tmp_path: Path) -> None:
    for variables in ({}, {"OTEL_METRICS_EXPORTER": "otlp"}):
        done = program(tmp_path, **variables)
        assert (done.returncode, done.stdout, done.stderr) == (0, "Q\nreaders: []\n", "")


def test_a_list_exports_to_each_and_otlp_without_an_endpoint_is_left_out(tmp_path: Path) -> None:
    done = program(tmp_path, OTEL_METRICS_EXPORTER="otlp, console,console")
    assert done.returncode == 0, done.stderr
    assert "readers: ['PeriodicExportingMetricReader']\n" in done.stdout
    assert done.stdout.count('"name": "gen_ai.client.token.usage"') == 1


def test_an_installed_metric_reader_is_given_to_the_provider_as_a_reader(tmp_path: Path) -> None:
    """A pull exporter (prometheus) is a MetricReader: the provider takes it as it is."""
    installed = tmp_path / "site" / "memory_reader-1.0.dist-info"
    installed.mkdir(parents=True)
    (installed / "METADATA").write_text("Metadata-Version: 2.1\nName: memory-reader\nVersion: 1.0\n")
    (installed / "entry_points.txt").write_text(
        "[opentelemetry_metrics_exporter]\n"
        "in_memory = opentelemetry.sdk.metrics.export:InMemoryMetricReader\n"
    )
    done = program(
        tmp_path,
        OTEL_METRICS_EXPORTER="in_memory,console",
        PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
    )
    assert done.returncode == 0, done.stderr
    assert "readers: ['InMemoryMetricReader', 'PeriodicExportingMetricReader']\n" in done.stdout


def test_init_refuses_a_metric_exporter_that_is_not_installed_naming_the_variable(tmp_path: Path) -> None:
    done = program(tmp_path, OTEL_METRICS_EXPORTER="console,prometheus")
    assert done.returncode == 1
    assert "ConfigurationError: OTEL_METRICS_EXPORTER names 'prometheus', which is no installed metric" in (
        done.stderr
    )
    assert "Q\n" not in done.stdout


def test_without_init_an_unknown_name_is_one_warning_and_the_default_applies(
    tmp_path: Path, collector: Collector
) -> None:
    done = program(
        tmp_path,
        init=False,
        OTEL_METRICS_EXPORTER="statsd",
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"{collector.url}/v1/metrics",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Q\nreaders: ['PeriodicExportingMetricReader']\n"
    [warning] = [line for line in done.stderr.splitlines() if "OTEL_METRICS_EXPORTER" in line]
    assert "'statsd'" in warning
    assert warning.endswith("metrics go to OTEL_EXPORTER_OTLP_METRICS_ENDPOINT instead")
    assert collector.requests == 1


def test_the_variable_is_not_read_when_the_application_says_where_metrics_go(tmp_path: Path) -> None:
    for options in ("metrics=False", "meter_provider=MeterProvider()"):
        script = (
            "import multirun\nfrom opentelemetry.sdk.metrics import MeterProvider\n"
            f"multirun.init({options})\nprint('configured')\n"
        )
        env = environment_without_settings()
        env |= {"MULTIRUN_DIR": str(tmp_path / "mr"), "OTEL_METRICS_EXPORTER": "no-such-exporter"}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "configured\n", "")


def test_a_meter_provider_the_application_set_that_is_no_sdk_one_is_kept(tmp_path: Path) -> None:
    # Logfire's global MeterProvider is a proxy of the SDK's: init took it for none set, made a
    # second one (console metrics printed at exit) that the API refused as the global one, with a
    # warning
    script = """
import multirun
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader


class Proxy(metrics.MeterProvider):
    def __init__(self, provider):
        self.provider = provider

    def get_meter(self, *args, **kwargs):
        return self.provider.get_meter(*args, **kwargs)


reader = InMemoryMetricReader()
metrics.set_meter_provider(Proxy(MeterProvider(metric_readers=[reader])))
multirun.init()


@multirun.run
def job() -> None:
    pass


job()
data = reader.get_metrics_data()
names = [m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics]
print("multirun.runs" in names)
"""
    env = environment_without_settings()
    env |= {"MULTIRUN_DIR": str(tmp_path / "mr"), "OTEL_METRICS_EXPORTER": "console"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")
