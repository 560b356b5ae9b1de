"""Resident memory (RSS) of long runs and of many runs in one process.

Two scenarios, each in this one process:

1. one run of N ``@step`` no-op calls, each with a different argument
   (default N = 1,000,000): RSS after a
   warm-up of 10,000 steps, then at N/10, N/2 and N;
2. R runs of 10 steps each (default R = 10,000), each run a ``@multirun.run``
   call: RSS after a warm-up, then at R/10, R/2 and R;
3. C runs alive at once (default C = 1,000 asyncio tasks), each of 100 steps,
   the number of finished steps a run keeps for ``Run.steps``
   (``step_history``): memory while all of them are alive, per run.

Usage::

    .venv/bin/python benchmarks/bench_memory.py [--steps 1000000] [--runs 10000] [--concurrent 1000]

Spans go through an SDK BatchSpanProcessor with its default sizes
(max_queue_size=2048) to a counting no-op exporter. That queue drops spans when
the producer outruns the exporter thread; it is a bounded deque, so drops cost
no memory, and the report counts them (exported vs. ended).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context

import multirun
from _common import (
    CountingExporter,
    environment_header,
    init_multirun,
    make_provider,
    markdown_table,
    write_result,
)
from multirun.context import RunContext
from multirun.models.run import Run

STEPS_PER_RUN = 10
HELD_STEPS = 100  # the steps a run keeps for Run.steps (step_history's default)
MIB = 1024 * 1024


def rss_bytes() -> int:
    """Resident set size of this process (psutil, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        import os

        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


@dataclass
class Sample:
    """Memory and progress at one checkpoint."""

    label: str
    done: int  # steps (scenario 1) or runs (scenario 2) so far
    rss: int
    blocks: int  # sys.getallocatedblocks(): live Python allocations
    exported: int
    seconds: float  # time spent on the segment that ended here
    pause_ms: float  # longest pause between two exports during that segment


def sample(label: str, done: int, exporter: CountingExporter, provider: Any, seconds: float) -> Sample:
    """Read memory and export progress at a checkpoint; the next segment's pauses start afresh.

    The provider is flushed first, so no finished span waits in the export queue
    and the figures of two checkpoints compare like with like.
    """
    pause_ms = exporter.longest_pause * 1000
    provider.force_flush()
    gc.collect()
    taken = Sample(label, done, rss_bytes(), sys.getallocatedblocks(), exporter.total, seconds, pause_ms)
    exporter.reset_pause()  # the flush and gc.collect() above must not count as a pause
    return taken


@multirun.step
def mem_step(n: int) -> None:
    """The no-op step both scenarios call, each time with another argument.

    Different inputs each call, as real steps get: a step's input hash and its
    replay bookkeeping must not pile up either.
    """


@multirun.run(name="mem-run")
def mem_run() -> None:
    """A run of STEPS_PER_RUN no-op steps."""
    for n in range(STEPS_PER_RUN):
        mem_step(n)


@multirun.step
async def mem_step_async(n: int) -> None:
    """The no-op async step of scenario 3."""


@multirun.run(name="mem-held-run")
async def held_run(arrived: Callable[[], None], release: asyncio.Event) -> None:
    """HELD_STEPS steps, then wait, alive, until every run of scenario 3 got that far."""
    for n in range(HELD_STEPS):
        await mem_step_async(n)
    arrived()
    await release.wait()


@dataclass
class Held:
    """Memory before scenario 3, with every run alive, and after they ended."""

    runs: int
    rss: tuple[int, int, int]
    blocks: tuple[int, int, int]


def concurrent_runs(count: int, provider: Any) -> Held:
    """Scenario 3: ``count`` runs of HELD_STEPS steps alive at once, on one event loop."""

    def read() -> tuple[int, int]:
        provider.force_flush()
        gc.collect()
        return rss_bytes(), sys.getallocatedblocks()

    async def all_alive() -> tuple[int, int]:
        release = asyncio.Event()
        waiting = 0

        def arrived() -> None:
            nonlocal waiting
            waiting += 1

        tasks = [asyncio.create_task(held_run(arrived, release)) for _ in range(count)]
        while waiting < count:
            await asyncio.sleep(0.01)
        alive = read()
        release.set()
        await asyncio.gather(*tasks)
        return alive

    before = read()
    alive = asyncio.run(all_alive())
    after = read()
    return Held(count, (before[0], alive[0], after[0]), (before[1], alive[1], after[1]))


def held_table(held: Held) -> str:
    """Scenario 3's memory: before, with every run alive, after; and per live run."""
    rows = []
    for label, i in (("before", 0), (f"{held.runs:,} runs alive", 1), ("after they ended", 2)):
        rss = held.rss[i] - held.rss[0]
        blocks = held.blocks[i] - held.blocks[0]
        rows.append(
            [
                label,
                f"{held.rss[i] / MIB:.1f}",
                f"{rss / MIB:+.1f}",
                f"{rss / held.runs / 1024:+.1f}" if i else "—",
                f"{blocks:+,}",
                f"{blocks / held.runs:+.0f}" if i else "—",
            ]
        )
    return markdown_table(
        ["when", "RSS MiB", "Δ RSS MiB", "Δ KiB per run", "Δ Python blocks", "Δ blocks per run"],
        rows,
        "lrrrrr",
    )


def run_until(target: int, done: int, unit: Callable[[int], None]) -> tuple[int, float]:
    """Call ``unit(n)`` for the calls ``done`` to ``target``; the count and the seconds taken."""
    start = time.perf_counter()
    for n in range(done, target):
        unit(n)
    return target, time.perf_counter() - start


def checkpoints(total: int, warmup: int) -> list[tuple[str, int]]:
    """(label, count) pairs: the warm-up, then 10%, 50% and 100% of ``total``."""
    points = [("after warm-up", warmup)]
    for share, label in ((10, "10%"), (2, "50%"), (1, "100%")):
        count = total // share
        if count > points[-1][1]:
            points.append((label, count))
    return points


def one_long_run(steps: int, exporter: CountingExporter, client: multirun.MultiRunClient) -> list[Sample]:
    """Scenario 1: ``steps`` no-op steps inside a single run."""
    run = RunContext(client, Run(name="mem-long-run"))
    token = otel_context.attach(run.otel_context)
    samples = []
    done = 0
    try:
        for label, target in checkpoints(steps, min(10_000, max(steps // 10, 1))):
            done, seconds = run_until(target, done, mem_step)
            samples.append(sample(label, done, exporter, client.tracer_provider, seconds))
            print(f"  long run: {done:,} steps, RSS {samples[-1].rss / MIB:.1f} MiB", file=sys.stderr)
    finally:
        otel_context.detach(token)
        run.complete()
    return samples


def many_runs(runs: int, exporter: CountingExporter, provider: Any) -> list[Sample]:
    """Scenario 2: ``runs`` runs of STEPS_PER_RUN steps each."""
    samples = []
    done = 0
    for label, target in checkpoints(runs, min(100, max(runs // 10, 1))):
        done, seconds = run_until(target, done, lambda _n: mem_run())
        samples.append(sample(label, done, exporter, provider, seconds))
        print(f"  many runs: {done:,} runs, RSS {samples[-1].rss / MIB:.1f} MiB", file=sys.stderr)
    return samples


def table(samples: list[Sample], unit: str, spans_per_unit: int, base_exported: int) -> str:
    """RSS per checkpoint, growth since warm-up, and spans ended vs exported."""
    base = samples[0]
    rows = []
    previous = 0
    for s in samples:
        grown = s.rss - base.rss
        per = grown / (s.done - base.done) if s.done > base.done else 0.0
        ended = s.done * spans_per_unit
        exported = s.exported - base_exported
        segment = s.done - previous
        rows.append(
            [
                s.label,
                f"{s.done:,}",
                f"{s.rss / MIB:.1f}",
                f"{grown / MIB:+.2f}",
                f"{per:+.1f}" if s is not base else "—",
                f"{s.blocks - base.blocks:+,}",
                f"{s.seconds / segment * 1e6:.1f}" if segment else "—",
                f"{exported:,} / {ended:,}",
                f"{s.pause_ms:.0f}",
            ]
        )
        previous = s.done
    return markdown_table(
        [
            "checkpoint",
            unit,
            "RSS MiB",
            "Δ RSS since warm-up MiB",
            f"Δ bytes per {unit[:-1]}",
            "Δ Python blocks",
            f"µs per {unit[:-1]} (segment)",
            "spans exported / ended",
            "longest export pause ms",
        ],
        rows,
        "lrrrrrrrr",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps of the long run")
    parser.add_argument("--runs", type=int, default=10_000, help="runs of 10 steps")
    parser.add_argument("--concurrent", type=int, default=1_000, help="runs alive at once")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.runs < 10 or args.concurrent < 1:
        parser.error("--steps and --runs must be >= 10, --concurrent >= 1")

    provider, exporter = make_provider()  # SDK defaults: max_queue_size=2048, batch 512
    client = init_multirun(provider)
    start_rss = rss_bytes()
    exporter.reset_pause()
    try:
        print(f"bench_memory: one run of {args.steps:,} steps", file=sys.stderr)
        long_run = one_long_run(args.steps, exporter, client)
        provider.force_flush()
        after_long = exporter.total
        exporter.reset_pause()
        print(f"bench_memory: {args.runs:,} runs of {STEPS_PER_RUN} steps", file=sys.stderr)
        runs = many_runs(args.runs, exporter, provider)
        provider.force_flush()
        final_total = exporter.total
        print(f"bench_memory: {args.concurrent:,} runs of {HELD_STEPS} steps alive at once", file=sys.stderr)
        held = concurrent_runs(args.concurrent, provider)
        by_name = dict(exporter.by_name)
    finally:
        provider.shutdown()

    long_dropped = args.steps + 1 - after_long
    runs_ended = args.runs * (STEPS_PER_RUN + 1)
    runs_dropped = runs_ended - (final_total - after_long)
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    lines = [
        *environment_header("Memory (RSS) of long runs and many runs", shown),
        f"RSS of the process before the first step: {start_rss / MIB:.1f} MiB. Every figure is "
        "read after `gc.collect()`; *Python blocks* is `sys.getallocatedblocks()` (live "
        "objects, unlike RSS not blurred by the allocator keeping freed pages).",
        "",
        f"## 1. One run of {args.steps:,} `@step` no-op calls",
        "",
        table(long_run, "steps", 1, 0),
        "",
        f"Spans ended: {args.steps + 1:,} (steps + the run); exported after the final flush: "
        f"{after_long:,}; dropped by the BatchSpanProcessor's full queue: {long_dropped:,}.",
        "",
        f"## 2. {args.runs:,} runs of {STEPS_PER_RUN} steps (`@multirun.run` calling a `@step` "
        f"{STEPS_PER_RUN} times)",
        "",
        table(runs, "runs", STEPS_PER_RUN + 1, after_long),
        "",
        f"Spans ended: {runs_ended:,} ({STEPS_PER_RUN} steps + 1 run span per run); exported "
        f"after the final flush: {final_total - after_long:,}; dropped: {runs_dropped:,}.",
        "",
        f"## 3. {args.concurrent:,} runs alive at once, {HELD_STEPS} steps each",
        "",
        f"{args.concurrent:,} asyncio tasks on one event loop, each a `@multirun.run` of "
        f"{HELD_STEPS} async no-op steps that then waits until every run got that far: a run "
        f"keeps its last {HELD_STEPS} finished steps for `Run.steps` (`step_history`), so this "
        "is the most a live run holds. Read with every run alive, and after they all ended.",
        "",
        held_table(held),
        "",
        "## Notes",
        "",
        "- The exporter is a `BatchSpanProcessor` with the SDK defaults (max_queue_size=2048, "
        "max_export_batch_size=512, schedule_delay=5 s) in front of a no-op exporter that only "
        "counts. Its queue is a bounded deque: when the export thread falls behind, the SDK "
        "drops spans (logging *Queue full, dropping span* once per 20 s) and memory stays "
        "bounded. Drops are therefore fine for this measurement, but they are counted, "
        "because a drop means lost telemetry. A full queue holds 2,048 finished spans, which "
        "is itself a few MiB of RSS.",
        "- At each checkpoint the provider is flushed before memory is read, so no span waits "
        "in the queue there: *spans exported / ended* then shows the drops so far, and RSS "
        "and Python blocks of two checkpoints compare like with like. *longest export "
        "pause* is the longest time "
        "between two export calls within the segment that ends at that checkpoint; with a "
        "healthy export thread it stays near the time the loop needs to make 512 spans.",
        *(
            [
                "- Spans were dropped. `benchmarks/repro_export_starvation.py` "
                "(`results/export_starvation.md`) isolates the cause: the export thread is "
                "starved of the GIL while `os.urandom` (behind `uuid.uuid4()`, drawn for the "
                "ids of every run and its default agent) is called often, not outpaced."
            ]
            if runs_dropped > 0 or long_dropped > 0
            else []
        ),
        f"- Spans by name: {', '.join(f'`{n}` {c:,}' for n, c in sorted(by_name.items()))}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = write_result("memory.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
