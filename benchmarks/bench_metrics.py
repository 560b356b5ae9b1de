"""Per-call cost of the metrics hot path against a raw synchronous OpenTelemetry SDK instrument.

Usage::

    .venv/bin/python benchmarks/bench_metrics.py [--rounds 30] [--batch 20000]

Every variant runs in ONE process, interleaved: each round runs one batch of
every variant in turn, so a slow moment of a shared machine hits all of them
alike; the table reports the median over rounds of (batch time / calls), and
the ratio to the raw ``Counter.add`` taken per round (paired). The batch loop
is included, so the "empty loop" row is the floor.

The meter comes from an SDK MeterProvider with an InMemoryMetricReader (no
background collection; the default trace-based exemplar filter, with no span
current, so no exemplar is sampled). The attributes are those of a step:
run name, agent name, step kind, status.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from _common import environment_header, markdown_table
from multirun.telemetry.metrics import NO_METRICS, Metrics

RUN, AGENT = "research", "planner"


def variants(metrics: Metrics, provider: MeterProvider) -> dict[str, Callable[[int], None]]:
    """Each variant: a function that makes ``n`` calls."""
    meter = provider.get_meter("bench.raw")
    counter = meter.create_counter("bench.raw.counter")
    histogram = meter.create_histogram("bench.raw.histogram", unit="s")
    attributes = {
        "gen_ai.workflow.name": RUN,
        "gen_ai.agent.name": AGENT,
        "multirun.step.kind": "function",
        "multirun.step.status": "completed",
    }

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    def step_function(n: int) -> None:
        step_finished = metrics.step_finished
        for _ in range(n):
            step_finished(RUN, AGENT, "function", "completed", 0.001)

    def step_tool(n: int) -> None:
        step_finished = metrics.step_finished
        for _ in range(n):
            step_finished(RUN, AGENT, "tool_call", "completed", 0.001)

    def proceed(n: int) -> None:
        policy_decision = metrics.policy_decision
        for _ in range(n):
            policy_decision(RUN, "proceed", None)

    def no_metrics(n: int) -> None:
        step_finished = NO_METRICS.step_finished
        for _ in range(n):
            step_finished(RUN, AGENT, "function", "completed", 0.001)

    def raw_add(n: int) -> None:
        add = counter.add
        for _ in range(n):
            add(1, attributes)

    def raw_record(n: int) -> None:
        record = histogram.record
        for _ in range(n):
            record(0.001, attributes)

    return {
        "empty loop": empty,
        "NoMetrics.step_finished": no_metrics,
        "step_finished, function step (counted locally)": step_function,
        "policy_decision proceed (counted locally)": proceed,
        "step_finished, tool step (counted + Histogram.record)": step_tool,
        "raw SDK Counter.add, 4 attributes": raw_add,
        "raw SDK Histogram.record, 4 attributes": raw_record,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = Metrics(provider.get_meter("multirun"))
    cases = variants(metrics, provider)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.warmup + args.rounds):
        for name, run in cases.items():
            gc.collect()
            start = time.perf_counter()
            run(args.batch)
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                times[name].append(elapsed / args.batch * 1e6)
    reader.get_metrics_data()  # the instruments really recorded: collect once

    baseline = times["raw SDK Counter.add, 4 attributes"]
    rows = []
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, baseline, strict=True))
        q = statistics.quantiles(values, n=4)
        rows.append(
            [
                name,
                f"{statistics.median(values):.3f}",
                f"{q[0]:.3f} - {q[2]:.3f}",
                f"{min(values):.3f}",
                f"{ratio:.3f}x",
            ]
        )
    lines = environment_header("Cost of a metrics call")
    lines.append(
        f"{args.batch:,} calls per batch, {args.rounds} timed rounds after {args.warmup} warm-up round(s)."
    )
    lines.append("")
    lines.append(
        markdown_table(["variant", "median µs/call", "IQR µs", "min µs", "vs raw Counter.add"], rows)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
