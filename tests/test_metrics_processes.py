"""The metrics of each process of a service are series of their own (``service.instance.id``,
which the Collector's Prometheus exporter makes the ``instance`` label), and a forked worker's
counters count only what the worker did: were they the parent's series, or did they start from
the parent's counts, a sum or a ``rate()`` over the instances would count some steps twice.

Each program runs in a fresh process (the global MeterProvider can be set once only) and exports
over OTLP/HTTP to a local collector.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from child_processes import environment_without_settings
from otlp_collectors import Collector  # the OTLP/HTTP collector (fixture: collector)

INSTANCE = "service.instance.id"

WORKERS = """
import multiprocessing, os, sys
import multirun
from multirun import run, step
from multirun.models import StepKind

# at import: a forkserver's workers are forked from a server that imported this module too
multirun.init(endpoint=os.environ["COLLECTOR"], checkpoint_uri="memory://processes")


@step(kind=StepKind.LLM_CALL)
def ask(i):
    multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=100, provider="openai")
    return i


@run(name="job")
def job(n):
    for i in range(n):
        ask(i)


if __name__ == "__main__":
    job(1)
    workers = multiprocessing.get_context(sys.argv[1])
    started = [workers.Process(target=job, args=(n,)) for n in (3, 4)]
    for worker in started:
        worker.start()
    for worker in started:
        worker.join()
        assert worker.exitcode == 0, worker.exitcode
    job(1)
"""


def _program_env(collector: Collector) -> dict[str, str]:
    env = environment_without_settings()
    return {**env, "COLLECTOR": collector.url, "PYTHONPATH": os.pathsep.join(sys.path)}


def _totals_by_instance(collector: Collector, name: str) -> dict[str, dict[str, Any]]:
    """The last exported total of metric ``name`` (a counter's points summed, or a histogram's
    count) of each ``service.instance.id``, with its ``service.name``."""
    found: dict[str, dict[str, Any]] = defaultdict(dict)
    for request in collector.metrics:
        for resource_metrics in request.resource_metrics:
            attributes = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    kind = metric.WhichOneof("data")
                    points = getattr(metric, kind).data_points
                    if kind == "histogram":
                        total: float = sum(p.count for p in points)
                    else:
                        total = sum(p.as_int or p.as_double for p in points)
                    found[attributes.get(INSTANCE, "")] = {
                        "service": attributes.get("service.name"),
                        "total": total,
                    }
    return dict(found)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_forked_workers_export_their_own_counts_as_instances_of_their_own(
    tmp_path: Path, collector: Collector, method: str
) -> None:
    script = tmp_path / "workers.py"
    script.write_text(WORKERS)
    done = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        env=_program_env(collector),
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    steps = _totals_by_instance(collector, "multirun.steps")
    # the parent ran 2 steps, the workers 3 and 4: each its own instance, counting its own steps
    assert "" not in steps, "a process exported metrics with no service.instance.id"
    assert sorted(found["total"] for found in steps.values()) == [2, 3, 4], steps
    assert {found["service"] for found in steps.values()} == {"multirun"}
    runs = {instance: 2 if found["total"] == 2 else 1 for instance, found in steps.items()}
    assert _totals(collector, "multirun.runs") == runs  # counted locally, as steps are
    # the spans of each process carry its instance id too, that of its metrics
    run_spans = [instance for name, instance in collector.span_instances if name == "invoke_workflow job"]
    assert {instance: run_spans.count(instance) for instance in set(run_spans)} == runs
    per_step = {
        "multirun.tokens": 1100,
        "gen_ai.client.token.usage": 2,  # the SDK's own instruments: an input and an output count
        "multirun.cost": 0.00021,  # 1000 input and 100 output tokens of gpt-4o-mini
    }
    for name, each in per_step.items():
        expected = {instance: each * found["total"] for instance, found in steps.items()}
        assert _totals(collector, name) == pytest.approx(expected), name


def _totals(collector: Collector, name: str) -> dict[str, float]:
    return {instance: found["total"] for instance, found in _totals_by_instance(collector, name).items()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_instance_id_the_user_sets_is_the_parents_and_forked_workers_get_their_own(
    tmp_path: Path, collector: Collector
) -> None:
    script = tmp_path / "workers.py"
    script.write_text(WORKERS)
    env = {**_program_env(collector), "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=pod-7,team=agents"}
    done = subprocess.run(
        [sys.executable, str(script), "fork"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    steps = _totals(collector, "multirun.steps")
    assert steps.pop("pod-7") == 2  # the parent's
    assert sorted(steps.values()) == [3, 4]  # each worker, as an instance of its own
    assert {instance for _, instance in collector.span_instances} == {"pod-7", *steps}
