"""Per-step overhead at scale: run length, concurrent runs, checkpoint size, processes on one Redis ledger.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_scaling.py                 # everything, about 6 minutes
    .venv/bin/python benchmarks/bench_scaling.py --quick         # smaller sizes, for a smoke test
    .venv/bin/python benchmarks/bench_scaling.py --only length --only redis

Five sections, each in this process (Redis: in worker processes):

1. **length**: whole runs of 10, 100 and 1,000 steps (``--short``), one after
   the other, against a root span with as many bare child spans: whatever a run
   pays at its end per step shows here. Then one run grows to ``--max-steps``
   (1,000,000) steps; when it holds 1,000, 10,000, ... steps, windows of
   ``--window`` steps are timed in it, interleaved with the same window in a
   fresh run and with bare spans, so a cost that grows with the run's length
   shows as a ratio above 1 to the fresh run.
2. **asyncio**: 1 to 1,000 runs as concurrent asyncio tasks (each step awaits
   ``asyncio.sleep(0)``, so the tasks really interleave), against the same
   number of tasks making bare spans and making no span.
3. **threads**: 1 to 16 threads, one run each, the same way.
4. **checkpoint**: save + load of a state of 1 KB to 100 MB against raw
   serialize + write + fsync + read + deserialize (functions of
   ``bench_checkpoint.py``), JSON and signed pickle.
5. **redis**: 1 to 16 processes continuing one run whose ledger is in a real
   redis-server (started here on a free loopback port with the tests' helper),
   counting the commands the server received per step.

In the short runs and in sections 2 and 3, the per-step figure is (time of N
runs of S steps - time of N runs of 0 steps) / (N x S): starting runs, tasks
and threads is paid once per run and is taken out. Every configuration is repeated ``--rounds`` times,
the variants interleaved within each round, and medians are reported.

Writes ``results/scaling.md`` and ``results/scaling.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context

import multirun
from _common import (
    RESULTS_DIR,
    environment_header,
    init_multirun,
    make_provider,
    markdown_table,
    write_result,
)
from multirun import client as client_module
from multirun.checkpoints.replay import DEFAULT_LIMIT as REPLAY_LOG_LIMIT
from multirun.context import RunContext
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import CircuitBreakerRule, RateLimitRule, RetryRule
from multirun.models.run import Run

MIB = 1024 * 1024
BIG = 10**15
LLM_MODEL = "gpt-4o-mini"


def budget() -> Budget:
    return Budget(max_tokens=BIG, max_cost_usd=1e12, max_steps=BIG, max_duration_seconds=1e9)


def policy() -> Policy:
    return Policy(
        retry=RetryRule(),
        rate_limit=RateLimitRule(requests_per_minute=1e9),
        circuit_breaker=CircuitBreakerRule(),
    )


def governed_run(client: multirun.MultiRunClient, name: str) -> RunContext:
    return RunContext(client, Run(name=name, budget=budget(), policy=policy()))


def rss_mib() -> float:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / MIB
    except ImportError:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def iqr(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) < 2:
        return "—"
    q = statistics.quantiles(values, n=4, method="inclusive")
    return f"{fmt.format(q[0])} - {fmt.format(q[2])}"


@multirun.step
def scale_step() -> None:
    """The sync no-op step of every section."""


@multirun.step
async def scale_step_async() -> None:
    """The async step of the asyncio section: yields to the loop once."""
    await asyncio.sleep(0)


# ---------------------------------------------------------------------------
# 1. run length


def section_length(max_steps: int, window: int, reps: int) -> dict[str, Any]:
    provider, exporter = make_provider(max_queue_size=max(4096, 2 * window + 16))
    client = init_multirun(provider)
    tracer = provider.get_tracer("bench.scaling")

    def bare() -> None:
        with tracer.start_as_current_span("bare"):
            pass

    def timed(fn: Callable[[], None], n: int, ctx: Any) -> float:
        provider.force_flush()
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            return (time.perf_counter_ns() - start) / n / 1000
        finally:
            if token is not None:
                otel_context.detach(token)

    def fill(run: RunContext, n: int) -> float:
        """Advance the long run by n steps, flushing every 1,000 (no span dropped); µs per step."""
        token = otel_context.attach(run.otel_context)
        try:
            start = time.perf_counter_ns()
            left = n
            while left > 0:
                chunk = min(1000, left)
                for _ in range(chunk):
                    scale_step()
                provider.force_flush()
                left -= chunk
            return (time.perf_counter_ns() - start) / max(n, 1) / 1000
        finally:
            otel_context.detach(token)

    # A fresh run (0 to `window` steps) stands for the short lengths (10, 100, 1,000); the long run is
    # measured where it holds 1,000 to max_steps steps. Its windows add reps x window steps each time.
    checkpoints = [c for c in (1_000, 10_000, 100_000, 1_000_000, 10_000_000) if c <= max_steps]
    long_run = governed_run(client, "long-run")
    done = 0  # steps in the long run so far
    fresh_steps = 0
    rows = []
    warm_run = governed_run(client, "warm-up")  # untimed: the first timed window is not the first call
    timed(scale_step, window, warm_run.otel_context)
    timed(bare, window, None)
    warm_run.complete()
    gc.collect()
    gc.freeze()
    for point in checkpoints:
        segment = fill(long_run, point - done) if point > done else float("nan")
        filled = point - done
        done = max(done, point)
        at = done
        samples: dict[str, list[float]] = {"long": [], "fresh": [], "bare": []}
        for rep in range(reps):
            fresh = governed_run(client, "fresh-run")
            order = [("long", long_run), ("fresh", fresh), ("bare", None)]
            order = order[rep % 3 :] + order[: rep % 3]
            for key, run in order:
                if key == "bare":
                    samples[key].append(timed(bare, window, None))
                else:
                    samples[key].append(timed(scale_step, window, run.otel_context))  # type: ignore[union-attr]
            fresh_steps += window
            fresh.complete()
            done += window
        ratios_fresh = [a / b for a, b in zip(samples["long"], samples["fresh"], strict=True)]
        ratios_bare = [a / b for a, b in zip(samples["long"], samples["bare"], strict=True)]
        rows.append(
            {
                "length": point,
                "measured_from": at,
                "steps_in_run": done,
                "long_us": median(samples["long"]),
                "long_iqr": iqr(samples["long"]),
                "fresh_us": median(samples["fresh"]),
                "bare_us": median(samples["bare"]),
                "vs_fresh": median(ratios_fresh),
                "vs_fresh_iqr": iqr(ratios_fresh, "{:.2f}"),
                "vs_bare": median(ratios_bare),
                "segment_us": segment,
                "segment_steps": filled,
                "rss_mib": rss_mib(),
            }
        )
        print(
            f"  length {point:>9,}: {rows[-1]['long_us']:.1f} µs/step in the long run, "
            f"x{rows[-1]['vs_fresh']:.2f} of a fresh run",
            file=sys.stderr,
        )
    long_run.complete()
    provider.force_flush()
    # steps (long, fresh, warm-up) + bare spans (timed, warm-up)
    expected = done + fresh_steps + reps * len(checkpoints) * window + 2 * window
    exported = sum(c for n, c in exporter.by_name.items() if not n.startswith("invoke_workflow"))
    gc.unfreeze()
    provider.shutdown()
    return {"rows": rows, "window": window, "reps": reps, "exported": exported, "expected": expected}


def report_length(data: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{r['measured_from']:,} - {r['steps_in_run']:,}",
            f"{r['long_us']:.1f}",
            r["long_iqr"],
            f"{r['fresh_us']:.1f}",
            f"{r['bare_us']:.1f}",
            f"**{r['vs_fresh']:.2f}x**",
            r["vs_fresh_iqr"],
            f"{r['vs_bare']:.2f}x",
            "—" if r["segment_us"] != r["segment_us"] else f"{r['segment_us']:.1f}",
            f"{r['rss_mib']:.0f}",
        ]
        for r in data["rows"]
    ]
    ratios = [r["vs_fresh"] for r in data["rows"]]
    verdict = (
        f"per-step cost in the longest run is {ratios[-1]:.2f}x that of a fresh run "
        f"(range over lengths {min(ratios):.2f}x - {max(ratios):.2f}x)"
    )
    return [
        "## 1. Per-step cost as a function of run length",
        "",
        "### Inside one long run",
        "",
        f"When the long run holds 1,000, 10,000, ... steps, {data['reps']} repetitions of: "
        f"{data['window']:,} steps in the long run, {data['window']:,} steps in a fresh run (a run "
        f"of 0 to {data['window']:,} steps, which stands for the short lengths, 10 and 100 "
        f"included), {data['window']:,} bare spans, the order rotated. Both runs have a Budget "
        "(4 limits) and a Policy (retry, rate limit, circuit breaker). Between the lengths the "
        "long run is filled with steps, flushed every 1,000.",
        "",
        markdown_table(
            [
                "steps in the long run while measured",
                "µs/step in the long run",
                "IQR",
                "µs/step in a fresh run",
                "µs/bare span",
                "long / fresh (paired)",
                "IQR",
                "long / bare",
                "µs/step filling up to here (incl. export)",
                "RSS MiB",
            ],
            rows,
        ),
        "",
        f"Target (independent of run length, within noise): {verdict}. Spans exported: "
        f"{data['exported']:,} of {data['expected']:,} (steps and bare spans; no drop).",
        "",
    ]


def section_short_runs(lengths: list[int], total: int, rounds: int) -> dict[str, Any]:
    """Runs of L steps one after the other: per step, what a run of L steps costs beyond one of 0.

    Whatever a run pays at its end in proportion to its steps (its step history, for one)
    is counted here, which the windows inside one long run cannot see.
    """
    provider, exporter = make_provider(max_queue_size=2 * total + 4096)
    client = init_multirun(provider)
    tracer = provider.get_tracer("bench.scaling")

    def bare_run(steps: int) -> None:
        with tracer.start_as_current_span("bare run"):
            for _ in range(steps):
                with tracer.start_as_current_span("bare step"):
                    pass

    @multirun.run(name="short-run", budget=budget(), policy=policy())
    def step_run(steps: int) -> None:
        for _ in range(steps):
            scale_step()

    kinds = {"bare": bare_run, "step": step_run}

    def timed(kind: str, runs: int, steps: int) -> float:
        provider.force_flush()
        gc.collect()
        fn = kinds[kind]
        start = time.perf_counter_ns()
        for _ in range(runs):
            fn(steps)
        return (time.perf_counter_ns() - start) / 1000

    for length in lengths:  # warm-up
        for kind in kinds:
            timed(kind, 2, length)
    per_step: dict[tuple[int, str], list[float]] = {(n, k): [] for n in lengths for k in kinds}
    for round_no in range(rounds):
        for i, length in enumerate(lengths):
            runs = max(total // length, 5)
            order = list(kinds)[(round_no + i) % 2 :] + list(kinds)[: (round_no + i) % 2]
            for kind in order:
                with_steps = timed(kind, runs, length)
                empty = timed(kind, runs, 0)
                per_step[(length, kind)].append((with_steps - empty) / (runs * length))
    rows = []
    for length in lengths:
        step, bare = per_step[(length, "step")], per_step[(length, "bare")]
        ratios = [a / b for a, b in zip(step, bare, strict=True) if b > 0]
        rows.append(
            {
                "length": length,
                "runs": max(total // length, 5),
                "step_us": median(step),
                "step_iqr": iqr(step),
                "bare_us": median(bare),
                "vs_bare": median(ratios),
                "vs_bare_iqr": iqr(ratios, "{:.2f}"),
            }
        )
        print(f"  short runs of {length:,}: x{rows[-1]['vs_bare']:.2f} of bare spans", file=sys.stderr)
    provider.force_flush()
    expected = sum((2 + rounds * max(total // n, 5)) * n for n in lengths)
    exported = {
        "step": exporter.by_name.get("step scale_step", 0),
        "bare": exporter.by_name.get("bare step", 0),
    }
    provider.shutdown()
    del client
    return {"rows": rows, "total": total, "rounds": rounds, "expected": expected, "exported": exported}


def report_short_runs(data: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{r['length']:,}",
            f"{r['runs']:,}",
            f"{r['step_us']:.1f}",
            r["step_iqr"],
            f"{r['bare_us']:.1f}",
            f"**{r['vs_bare']:.2f}x**",
            r["vs_bare_iqr"],
        ]
        for r in data["rows"]
    ]
    return [
        "### Short runs, whole (run end included)",
        "",
        f"Runs of L steps one after the other ({data['total']:,} / L runs), each a `@run` with "
        "Budget + Policy; per step: (time of the runs - time of as many runs of 0 steps) / steps, so "
        "what a run pays at its start is out and what it pays at its end in proportion to its steps "
        "is in. *bare*: a root span with L child spans. Interleaved, "
        f"{data['rounds']} rounds.",
        "",
        markdown_table(
            [
                "steps per run",
                "runs",
                "µs/step, `@step`",
                "IQR",
                "µs/step, bare spans",
                "`@step` / bare (paired)",
                "IQR",
            ],
            rows,
        ),
        "",
        f"Step spans exported: {data['exported']['step']:,} of {data['expected']:,}; bare step spans: "
        f"{data['exported']['bare']:,} of {data['expected']:,}.",
        "",
    ]


# ---------------------------------------------------------------------------
# 2. concurrent asyncio runs, 3. threads


def section_asyncio(counts: list[int], total: int, rounds: int) -> dict[str, Any]:
    provider, exporter = make_provider(max_queue_size=2 * total + 4096, max_export_batch_size=512)
    client = init_multirun(provider)
    tracer = provider.get_tracer("bench.scaling")
    loop = asyncio.new_event_loop()

    async def plain_step() -> None:
        await asyncio.sleep(0)

    async def bare_step() -> None:
        with tracer.start_as_current_span("bare step"):
            await asyncio.sleep(0)

    async def plain_task(steps: int) -> None:
        for _ in range(steps):
            await plain_step()

    async def bare_task(steps: int) -> None:
        with tracer.start_as_current_span("bare run"):
            for _ in range(steps):
                await bare_step()

    @multirun.run(name="async-run", budget=budget(), policy=policy())
    async def step_task(steps: int) -> None:
        for _ in range(steps):
            await scale_step_async()

    tasks = {"plain": plain_task, "bare": bare_task, "step": step_task}

    def timed(kind: str, n: int, steps: int) -> float:
        async def body() -> float:
            start = time.perf_counter_ns()
            await asyncio.gather(*(tasks[kind](steps) for _ in range(n)))
            return (time.perf_counter_ns() - start) / 1000

        provider.force_flush()
        gc.collect()
        return loop.run_until_complete(body())

    try:
        return _concurrency(counts, total, rounds, timed, exporter, provider, "tasks")
    finally:
        loop.close()
        provider.shutdown()
        del client


def section_threads(counts: list[int], total: int, rounds: int) -> dict[str, Any]:
    provider, exporter = make_provider(max_queue_size=2 * total + 4096, max_export_batch_size=512)
    client = init_multirun(provider)
    tracer = provider.get_tracer("bench.scaling")

    def plain_step() -> None:
        pass

    def bare_step() -> None:
        with tracer.start_as_current_span("bare step"):
            pass

    def plain_task(steps: int) -> None:
        for _ in range(steps):
            plain_step()

    def bare_task(steps: int) -> None:
        with tracer.start_as_current_span("bare run"):
            for _ in range(steps):
                bare_step()

    @multirun.run(name="thread-run", budget=budget(), policy=policy())
    def step_task(steps: int) -> None:
        for _ in range(steps):
            scale_step()

    tasks = {"plain": plain_task, "bare": bare_task, "step": step_task}

    def timed(kind: str, n: int, steps: int) -> float:
        provider.force_flush()
        gc.collect()
        gate = threading.Barrier(n + 1)

        def body() -> None:
            gate.wait()
            tasks[kind](steps)

        threads = [threading.Thread(target=body) for _ in range(n)]
        for t in threads:
            t.start()
        start = time.perf_counter_ns()
        gate.wait()
        for t in threads:
            t.join()
        return (time.perf_counter_ns() - start) / 1000

    try:
        return _concurrency(counts, total, rounds, timed, exporter, provider, "threads")
    finally:
        provider.shutdown()
        del client


def steps_per_run(total: int, n: int) -> int:
    """Steps each of ``n`` concurrent runs makes: ``total`` shared out, at least 10, and no more
    than a replay log records: past it a step records nothing and costs less, which would flatter
    the runs of few tasks against the others."""
    return min(max(total // n, 10), REPLAY_LOG_LIMIT)


def _concurrency(
    counts: list[int],
    total: int,
    rounds: int,
    timed: Callable[[str, int, int], float],
    exporter: Any,
    provider: Any,
    unit: str,
) -> dict[str, Any]:
    kinds = ("plain", "bare", "step")
    per_step: dict[tuple[int, str], list[float]] = {(n, k): [] for n in counts for k in kinds}
    per_run: dict[tuple[int, str], list[float]] = {(n, k): [] for n in counts for k in kinds}
    for n in counts:  # warm-up: one small pass of every configuration
        for kind in kinds:
            timed(kind, n, 2)
    provider.force_flush()
    before = dict(exporter.by_name)
    for round_no in range(rounds):
        for i, n in enumerate(counts):
            steps = steps_per_run(total, n)
            order = list(kinds[(round_no + i) % 3 :] + kinds[: (round_no + i) % 3])
            for kind in order:
                with_steps = timed(kind, n, steps)
                empty = timed(kind, n, 0)
                per_step[(n, kind)].append((with_steps - empty) / (n * steps))
                per_run[(n, kind)].append(empty / n)
        print(f"  {unit}: round {round_no + 1}/{rounds}", file=sys.stderr)
    provider.force_flush()
    after = dict(exporter.by_name)
    rows = []
    for n in counts:
        steps = steps_per_run(total, n)
        step = per_step[(n, "step")]
        bare = per_step[(n, "bare")]
        plain = per_step[(n, "plain")]
        rows.append(
            {
                "n": n,
                "steps_per_run": steps,
                "plain_us": median(plain),
                "bare_us": median(bare),
                "step_us": median(step),
                "step_iqr": iqr(step),
                "vs_bare": median([a / b for a, b in zip(step, bare, strict=True) if b > 0]),
                "vs_bare_iqr": iqr([a / b for a, b in zip(step, bare, strict=True) if b > 0], "{:.2f}"),
                "step_over_plain": median([a - b for a, b in zip(step, plain, strict=True)]),
                "bare_over_plain": median([a - b for a, b in zip(bare, plain, strict=True)]),
                "run_start_us": median(per_run[(n, "step")]),
            }
        )
    exported = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    expected_steps = rounds * sum(steps_per_run(total, n) * n for n in counts)
    return {
        "rows": rows,
        "total": total,
        "rounds": rounds,
        "unit": unit,
        "exported_steps": sum(v for k, v in exported.items() if k.startswith("step ")),
        "exported_bare": exported.get("bare step", 0),
        "expected": expected_steps,
    }


def report_concurrency(data: dict[str, Any], title: str, body: str) -> list[str]:
    unit = data["unit"]
    rows = [
        [
            f"{r['n']:,}",
            f"{r['steps_per_run']:,}",
            f"{r['plain_us']:.1f}",
            f"{r['bare_us']:.1f}",
            f"{r['step_us']:.1f}",
            r["step_iqr"],
            f"**{r['vs_bare']:.2f}x**",
            r["vs_bare_iqr"],
            f"{r['step_over_plain']:.1f}",
            f"{r['bare_over_plain']:.1f}",
            f"{r['run_start_us']:.0f}",
        ]
        for r in data["rows"]
    ]
    ratios = [r["vs_bare"] for r in data["rows"]]
    overs = [r["step_over_plain"] for r in data["rows"]]
    return [
        title,
        "",
        body,
        "",
        markdown_table(
            [
                f"concurrent runs ({unit})",
                "steps per run",
                "µs/step, no span",
                "µs/step, bare spans",
                "µs/step, `@step`",
                "IQR",
                "`@step` / bare (paired)",
                "IQR",
                "`@step` µs over no span",
                "bare µs over no span",
                "µs per run started (`@run`, 0 steps)",
            ],
            rows,
        ),
        "",
        f"Target (independent of the number of concurrent runs, within noise): `@step` / bare "
        f"ranges {min(ratios):.2f}x - {max(ratios):.2f}x, and the cost over no span "
        f"{min(overs):.1f} - {max(overs):.1f} µs per step, from {data['rows'][0]['n']:,} to "
        f"{data['rows'][-1]['n']:,} {unit}. Step spans exported in the timed rounds: "
        f"{data['exported_steps']:,} of {data['expected']:,}; bare step spans: "
        f"{data['exported_bare']:,} of {data['expected']:,}.",
        "",
    ]


# ---------------------------------------------------------------------------
# 4. checkpoint size


def section_checkpoint(sizes_mb: list[float], serializers: list[str]) -> dict[str, Any]:
    import json as json_module
    import pickle
    import shutil
    import tempfile

    from opentelemetry.sdk.trace import TracerProvider

    from bench_checkpoint import multirun_round, raw_round
    from multirun.checkpoints.exporters import FileBlobExporter
    from multirun.checkpoints.store import CheckpointStore

    rows = []
    for serializer in serializers:
        for mb in sizes_mb:
            rounds = 30 if mb <= 0.1 else 15 if mb <= 1 else 7 if mb <= 10 else 3
            folder = Path(tempfile.mkdtemp(prefix="multirun-bench-scale-ckpt-"))
            try:
                store = CheckpointStore(
                    FileBlobExporter(folder / "blobs"),
                    serializer=serializer,
                    hmac_key="benchmark key, not a secret" if serializer != "json" else None,
                )
                client = multirun.MultiRunClient(
                    tracer_provider=TracerProvider(),
                    checkpoint_store=store,
                    metrics=False,
                    record_replay=False,
                )
                state = make_state(mb)
                if serializer == "json":

                    def dumps(obj: Any) -> bytes:
                        return json_module.dumps(obj, separators=(",", ":")).encode()

                    loads: Callable[[bytes], Any] = json_module.loads
                else:

                    def dumps(obj: Any) -> bytes:
                        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

                    loads = pickle.loads
                size = len(dumps(state))
                raw: list[tuple[float, float]] = []
                ours: list[tuple[float, float]] = []
                with RunContext(client, Run(name="bench")) as ctx:
                    ctx.set_state("data", state)
                    for i in range(rounds + 1):  # the first pair is a warm-up
                        if i % 2:
                            pair = (raw_round(state, folder, dumps, loads), multirun_round(ctx, store))
                        else:
                            ours_first = multirun_round(ctx, store)
                            pair = (raw_round(state, folder, dumps, loads), ours_first)
                        if i:
                            raw.append(pair[0])
                            ours.append(pair[1])
                        # both sides' files go after each pair (untimed): when only the raw file
                        # went, multirun's 10 MB writes took ~2 ms or ~16 ms (median save 22 to 42
                        # ms from one run to the next) while the raw ones stayed steady
                        for leftover in folder.glob("raw-*"):
                            leftover.unlink()
                        for key in store.list():
                            store.exporter.delete(key)
                raw_total = [r[0] + r[1] for r in raw]
                our_total = [o[0] + o[1] for o in ours]
                ratios = [o / r for o, r in zip(our_total, raw_total, strict=True)]
                rows.append(
                    {
                        "serializer": serializer,
                        "mb": mb,
                        "bytes": size,
                        "rounds": rounds,
                        "raw_save_ms": median([r[0] for r in raw]) * 1000,
                        "raw_load_ms": median([r[1] for r in raw]) * 1000,
                        "our_save_ms": median([o[0] for o in ours]) * 1000,
                        "our_load_ms": median([o[1] for o in ours]) * 1000,
                        "raw_total_ms": median(raw_total) * 1000,
                        "our_total_ms": median(our_total) * 1000,
                        "ratio": median(ratios),
                        "ratio_iqr": iqr(ratios, "{:.2f}"),
                    }
                )
                print(
                    f"  checkpoint {serializer} {mb:g} MB: x{rows[-1]['ratio']:.2f} of raw", file=sys.stderr
                )
                del state
                gc.collect()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows}


def make_state(megabytes: float) -> dict[str, object]:
    """About ``megabytes`` MB of JSON in records whose strings are all distinct.

    (``bench_checkpoint.make_state`` shares one string object between records, which
    pickle writes once: its pickle is a few percent of its JSON.)
    """
    body = "lorem ipsum dolor sit amet " * 30
    sample = {"id": 0, "title": "x" * 40, "body": f"{0:09d} {body}", "score": 0.5}
    count = max(1, int(megabytes * 1_000_000 / len(json.dumps(sample))))
    return {
        "records": [
            {"id": i, "title": f"title {i:09d} " + "x" * 25, "body": f"{i:09d} {body}", "score": i / 7}
            for i in range(count)
        ]
    }


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def report_checkpoint(data: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["serializer"],
            _size(r["bytes"]),
            str(r["rounds"]),
            f"{r['raw_save_ms']:.2f}",
            f"{r['our_save_ms']:.2f}",
            f"{r['raw_load_ms']:.2f}",
            f"{r['our_load_ms']:.2f}",
            f"{r['raw_total_ms']:.2f}",
            f"{r['our_total_ms']:.2f}",
            f"**{r['ratio']:.2f}x**",
            r["ratio_iqr"],
        ]
        for r in data["rows"]
    ]
    at10 = [r for r in data["rows"] if abs(r["mb"] - 10) < 1e-9]
    verdicts = [
        f"{r['serializer']}: {r['ratio']:.2f}x ("
        + ("met" if r["ratio"] <= 1.5 else f"missed by {(r['ratio'] / 1.5 - 1) * 100:.0f}%")
        + ")"
        for r in at10
    ]
    return [
        "## 4. Checkpoint save + load as a function of state size",
        "",
        "The state is a list of records (id, title, a 800-character body, score) whose strings are all "
        "distinct, sized by its JSON; the table gives each serializer's own size.",
        "",
        "*raw*: serialize (`json.dumps` compact, or `pickle.dumps` highest protocol) + write + fsync a "
        "file, then read + deserialize. *multirun*: `RunContext.checkpoint` to a `FileBlobExporter` "
        "(envelope, SHA-256, temp file + fsync + atomic link; pickle also HMAC-signed), then "
        "`CheckpointStore.load` (read, verify, deserialize). Pairs alternate which goes first, and "
        "both files are deleted after each pair (untimed); the ratio is the median of the per-pair "
        "ratios.",
        "",
        markdown_table(
            [
                "serializer",
                "state (serialized)",
                "pairs",
                "raw save ms",
                "multirun save ms",
                "raw load ms",
                "multirun load ms",
                "raw total ms",
                "multirun total ms",
                "multirun / raw",
                "IQR",
            ],
            rows,
        ),
        "",
        "Target (10 MB save + load at most 1.5x raw): " + ("; ".join(verdicts) or "10 MB not measured") + ".",
        "",
    ]


# ---------------------------------------------------------------------------
# 5. processes sharing a Redis ledger


def _redis_worker(
    carrier: dict[str, str],
    url: str | None,
    steps: int,
    kinds: list[str],
    ready: Any,
    go: Any,
    done: Any,
    results: Any,
) -> None:
    """One process: continue the run, then for each kind: warm up, wait, time ``steps`` steps.

    Round trips are counted on the client side: every ``send_packed_command`` of redis-py
    is one request written to the server (a pipeline is one), answered before the next.
    """
    import redis.connection

    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    provider, exporter = make_provider(max_queue_size=max(4096, 2 * steps + 64))
    client_module._configured = None
    if url:
        multirun.init(tracer_provider=provider, ledger_uri=url, checkpoint_uri="memory://bench")
    else:
        multirun.init(tracer_provider=provider, checkpoint_uri="memory://bench")

    @multirun.step
    def plain() -> None:
        """A step that reports nothing."""

    @multirun.step(kind=StepKind.LLM_CALL, model=LLM_MODEL)
    def llm() -> None:
        """An LLM step that reports usage."""
        multirun.report_usage(LLM_MODEL, input_tokens=10, output_tokens=5)

    fns = {"plain": plain, "llm": llm}
    with multirun.continue_run(carrier):
        for kind in kinds:
            fn = fns[kind]
            for _ in range(20):
                fn()
            provider.force_flush()
            ready.wait()
            go.wait()
            sent_before = sent[0]
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            end = time.perf_counter()
            round_trips = sent[0] - sent_before
            provider.force_flush()
            results.put(
                {
                    "kind": kind,
                    "start": start,
                    "end": end,
                    "steps": steps,
                    "spans": exporter.total,
                    "round_trips": round_trips,
                }
            )
            done.wait()  # the next kind's warm-up must not land in this kind's server counts


def _command_calls(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): int(value.get("calls", 0))
        for key, value in stats.items()
        if isinstance(value, dict)
    }


def section_redis(counts: list[int], steps: int, kinds: list[str]) -> dict[str, Any]:
    import shutil

    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed (scripts/services.sh: ensure_redis_server)"}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import redis

    from redis_server import RedisServer  # the tests' own helper: free port, no persistence

    server = RedisServer.start()
    rows = []
    try:
        provider, _ = make_provider()
        client_module._configured = None
        multirun.init(tracer_provider=provider, ledger_uri=server.url, checkpoint_uri="memory://bench")
        admin = redis.Redis.from_url(server.url)
        spawn = multiprocessing.get_context("spawn")

        @multirun.run(name="shared-ledger", budget=budget(), policy=policy())
        def coordinator(processes: int, url: str | None) -> list[dict[str, Any]]:
            carrier = dict(multirun.inject())
            ready = spawn.Barrier(processes + 1)
            go = spawn.Barrier(processes + 1)
            done = spawn.Barrier(processes + 1)
            results = spawn.Queue()
            workers = [
                spawn.Process(
                    target=_redis_worker, args=(carrier, url, steps, kinds, ready, go, done, results)
                )
                for _ in range(processes)
            ]
            for w in workers:
                w.start()
            out = []
            for kind in kinds:
                ready.wait(timeout=300)
                calls_before = _command_calls(admin)
                go.wait(timeout=60)
                got = [results.get(timeout=600) for _ in range(processes)]
                calls_after = _command_calls(admin)
                done.wait(timeout=60)
                delta = {k: calls_after.get(k, 0) - calls_before.get(k, 0) for k in calls_after}
                delta.pop("info", None)  # this function's own reads
                total_steps = sum(g["steps"] for g in got)
                span = max(g["end"] for g in got) - min(g["start"] for g in got)
                per_step = [(g["end"] - g["start"]) / g["steps"] * 1e6 for g in got]
                out.append(
                    {
                        "kind": kind,
                        "processes": processes,
                        "ledger": "redis" if url else "in process",
                        "steps_per_process": steps,
                        "per_step_us": median(per_step),
                        "per_step_max_us": max(per_step),
                        "throughput": total_steps / span,
                        "round_trips_per_step": sum(g["round_trips"] for g in got) / total_steps,
                        "scripts_per_step": sum(
                            v for k, v in delta.items() if k in ("evalsha", "eval", "evalsha_ro", "eval_ro")
                        )
                        / total_steps,
                        "commands": {k: v for k, v in delta.items() if v},
                        "spans_ok": all(g["spans"] >= g["steps"] for g in got),
                    }
                )
                print(
                    f"  redis: {processes:>2} processes, {kind}: {out[-1]['per_step_us']:.0f} µs/step, "
                    f"{out[-1]['round_trips_per_step']:.2f} round trips/step",
                    file=sys.stderr,
                )
            for w in workers:
                w.join(timeout=120)
            return out

        rows += coordinator(1, None)
        for processes in counts:
            rows += coordinator(processes, server.url)
        admin.close()
        provider.shutdown()
    finally:
        server.stop()
    return {"rows": rows, "steps": steps}


def report_redis(data: dict[str, Any]) -> list[str]:
    if "skipped" in data:
        return ["## 5. Processes sharing a Redis ledger", "", f"Not measured: {data['skipped']}.", ""]
    rows = [
        [
            f"{r['processes']}",
            r["ledger"],
            "`@step`" if r["kind"] == "plain" else "`@step(kind=LLM_CALL)` + `report_usage`",
            f"{r['per_step_us']:.0f}",
            f"{r['per_step_max_us']:.0f}",
            f"{r['throughput']:,.0f}",
            f"**{r['round_trips_per_step']:.2f}**" if r["ledger"] == "redis" else "—",
            f"{r['scripts_per_step']:.2f}" if r["ledger"] == "redis" else "—",
            ", ".join(f"{k} {v:,}" for k, v in sorted(r["commands"].items())) or "—",
            "yes" if r["spans_ok"] else "**no**",
        ]
        for r in data["rows"]
    ]
    redis_rows = [r for r in data["rows"] if r["ledger"] == "redis"]
    verdict = []
    for kind in ("plain", "llm"):
        per = [r["round_trips_per_step"] for r in redis_rows if r["kind"] == kind]
        if per:
            worst = max(per)
            what = "`@step`" if kind == "plain" else "LLM step with usage"
            verdict.append(
                f"{what}: {worst:.2f} round trips per step at most"
                + (
                    " (met)"
                    if worst <= 1.01
                    else f" (**missed**: {worst:.2f} round trips, {worst - 1:.2f} more than 1)"
                )
            )
    return [
        "## 5. Processes sharing one run's ledger in Redis",
        "",
        f"Each process continues the same run (`multirun.inject()` / `multirun.continue_run`) with "
        f"`init(ledger_uri=redis://...)` and makes {data['steps']:,} steps after a warm-up; all start "
        "together (a barrier). *round trips per step*: requests redis-py wrote to the server during "
        "the timed steps (counted in each process at `send_packed_command`; a pipeline counts "
        "once), divided by the steps. *scripts per step*: EVAL/EVALSHA the server ran (INFO "
        "commandstats), the cross-check; *commands*: everything the server counted in that time, "
        "the commands the Lua scripts call included. The first row is the same process with the "
        "in-process ledger. "
        "2 cores: above 2 processes they share the CPU, so latency grows with the count while "
        "throughput should hold.",
        "",
        markdown_table(
            [
                "processes",
                "ledger",
                "step",
                "µs/step (median process)",
                "slowest process",
                "steps/s, all processes",
                "round trips per step",
                "scripts per step",
                "server commands (incl. inside scripts)",
                "every span exported",
            ],
            rows,
            "rllrrrrrlr",
        ),
        "",
        "Target (one Redis round trip per step): " + "; ".join(verdict) + ".",
        "",
    ]


# ---------------------------------------------------------------------------


SECTIONS = ("length", "asyncio", "threads", "checkpoint", "redis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (smoke test)")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="length of the long run")
    parser.add_argument("--window", type=int, default=1000, help="steps per timed window (length)")
    parser.add_argument("--reps", type=int, default=5, help="windows per length (length)")
    parser.add_argument("--short", type=int, nargs="+", default=[10, 100, 1000], help="steps per short run")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--total", type=int, default=20_000, help="steps per configuration (asyncio, threads)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds (asyncio, threads)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1, 10, 100], help="MB")
    parser.add_argument("--serializers", nargs="+", default=["json", "pickle"], choices=["json", "pickle"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--redis-steps", type=int, default=1000, help="steps per process (redis)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps = min(args.max_steps, 100_000)
        args.window, args.reps = min(args.window, 500), min(args.reps, 3)
        args.total, args.rounds = min(args.total, 4000), min(args.rounds, 3)
        args.sizes = [s for s in args.sizes if s <= 10]
        args.processes = [p for p in args.processes if p <= 4]
        args.redis_steps = min(args.redis_steps, 200)
    sections = args.only or list(SECTIONS)

    results: dict[str, Any] = {}
    lines: list[str] = []
    started = time.perf_counter()
    if "length" in sections:
        print(f"bench_scaling: runs of {args.short} steps", file=sys.stderr)
        results["short_runs"] = section_short_runs(args.short, args.total, args.rounds)
        print(f"bench_scaling: run length up to {args.max_steps:,} steps", file=sys.stderr)
        results["length"] = section_length(args.max_steps, args.window, args.reps)
        lines += report_length(results["length"])
        lines += report_short_runs(results["short_runs"])
    if "asyncio" in sections:
        print(f"bench_scaling: {args.tasks} concurrent asyncio runs", file=sys.stderr)
        results["asyncio"] = section_asyncio(args.tasks, args.total, args.rounds)
        lines += report_concurrency(
            results["asyncio"],
            "## 2. Per-step cost as a function of concurrent runs (asyncio tasks)",
            f"N tasks on one event loop, each one `@run` (Budget + Policy) of {args.total:,} / N "
            f"async steps (at most {REPLAY_LOG_LIMIT:,}, what a replay log records), all awaited "
            "with `asyncio.gather`; each step's body is `await asyncio.sleep(0)`, so the N runs "
            "interleave step by step. *bare*: the same tasks with a bare root span per task and a "
            f"bare span per step; *no span*: the same loop without any. {args.rounds} rounds.",
        )
    if "threads" in sections:
        print(f"bench_scaling: {args.threads} threads", file=sys.stderr)
        results["threads"] = section_threads(args.threads, args.total, args.rounds)
        lines += report_concurrency(
            results["threads"],
            "## 3. Per-step cost as a function of concurrent runs (threads)",
            f"N threads started together (a barrier), each one `@run` (Budget + Policy) of "
            f"{args.total:,} / N sync no-op steps (at most {REPLAY_LOG_LIMIT:,}); the time is the "
            "wall time until every thread is done, so per step it is the machine's throughput "
            "(2 cores, one GIL): contention in the wrapper would show as a ratio growing with N. "
            f"{args.rounds} rounds.",
        )
    if "checkpoint" in sections:
        print(f"bench_scaling: checkpoints of {args.sizes} MB", file=sys.stderr)
        results["checkpoint"] = section_checkpoint(args.sizes, args.serializers)
        lines += report_checkpoint(results["checkpoint"])
    if "redis" in sections:
        print(f"bench_scaling: {args.processes} processes on one Redis ledger", file=sys.stderr)
        results["redis"] = section_redis(args.processes, args.redis_steps, ["plain", "llm"])
        lines += report_redis(results["redis"])

    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    header = environment_header(
        "Scaling: per-step overhead at length, concurrency, state size and processes", shown
    )
    text = (
        "\n".join(header)
        + "\n"
        + f"Total time: {time.perf_counter() - started:.0f} s.\n\n"
        + "\n".join(lines)
    )
    print(text)
    if not args.no_write:
        name = "scaling.md" if not args.only else "scaling-" + "-".join(sections) + ".md"
        write_result(name, text)
        previous: dict[str, Any] = {}
        json_path = RESULTS_DIR / "scaling.json"
        if json_path.exists():
            try:
                previous = json.loads(json_path.read_text())
            except ValueError:
                previous = {}
        previous.setdefault("sections", {}).update(results)
        previous["header"] = header[2:-1]
        write_result("scaling.json", json.dumps(previous, indent=1, default=str) + "\n")
        print(f"written to {RESULTS_DIR / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
