"""Why the BatchSpanProcessor drops spans when many runs are created: a starved export thread.

Usage::

    .venv/bin/python benchmarks/repro_export_starvation.py [--repeats 3]

Each arm runs in a fresh interpreter (the arms alternate, ``--repeats`` times)
and makes about 55,000 spans through a BatchSpanProcessor with the SDK
defaults (queue of 2,048) to a counting no-op exporter. Arms:

- ``steps``: 55,000 ``@step`` no-op calls in one run;
- ``steps+urandom``: the same, plus ``os.urandom(16)`` every 10 steps;
- ``steps+sleep0``: the same, plus ``time.sleep(0)`` every 10 steps;
- ``runs``: 5,000 ``@multirun.run`` calls of 10 steps each (ids from ``uuid.uuid4()``);
- ``runs+random-ids``: the same with ``uuid.uuid4`` replaced by
  ``uuid.UUID(int=random.getrandbits(128), version=4)``.

For each it reports spans dropped and the longest pause between two exports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

from opentelemetry import context as otel_context

import multirun
from _common import environment_header, init_multirun, make_provider, markdown_table, write_result
from multirun.context import RunContext
from multirun.models.run import Run

ARMS = ["steps", "steps+urandom", "steps+sleep0", "runs", "runs+random-ids"]
SPANS = 55_000


@multirun.step
def probe_step() -> None:
    """A no-op step."""


@multirun.run(name="probe-run")
def probe_run() -> None:
    """A run of 10 no-op steps."""
    for _ in range(10):
        probe_step()


def run_arm(arm: str) -> dict[str, float]:
    """Run one arm in this process; spans ended, exported, and the longest export pause."""
    provider, exporter = make_provider()
    client = init_multirun(provider)
    exporter.reset_pause()
    start = time.perf_counter()
    if arm.startswith("steps"):
        extra: Callable[[], object] = {
            "steps": lambda: None,
            "steps+urandom": lambda: os.urandom(16),
            "steps+sleep0": lambda: time.sleep(0),
        }[arm]
        run = RunContext(client, Run(name="probe"))
        token = otel_context.attach(run.otel_context)
        try:
            for i in range(SPANS):
                probe_step()
                if i % 10 == 0:
                    extra()
        finally:
            otel_context.detach(token)
        ended = SPANS
    else:
        if arm == "runs+random-ids":
            rng = random.Random()
            uuid.uuid4 = lambda: uuid.UUID(int=rng.getrandbits(128), version=4)
        runs = SPANS // 11
        for _ in range(runs):
            probe_run()
        ended = runs * 11
    seconds = time.perf_counter() - start
    pause = exporter.longest_pause
    provider.force_flush()
    exported = exporter.by_name.get("step probe_step", 0) + exporter.by_name.get(
        "invoke_workflow probe-run", 0
    )
    provider.shutdown()
    return {"ended": ended, "exported": exported, "pause_ms": pause * 1000, "seconds": seconds}


def run_in_child(arm: str) -> dict[str, float]:
    """Run one arm in a fresh interpreter and read its JSON result."""
    out = subprocess.run([sys.executable, __file__, "--arm", arm], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"arm {arm!r} failed (exit {out.returncode}):\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="times each arm runs (default 3)")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one child
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm)))
        return 0

    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm in ARMS:
            results[arm].append(run_in_child(arm))
            last = results[arm][-1]
            print(
                f"  {repeat + 1}/{args.repeats} {arm}: dropped "
                f"{int(last['ended'] - last['exported']):,}, pause {last['pause_ms']:.0f} ms",
                file=sys.stderr,
            )
    rows = []
    for arm, runs in results.items():
        drops = [r["ended"] - r["exported"] for r in runs]
        rows.append(
            [
                f"`{arm}`",
                f"{int(runs[0]['ended']):,}",
                ", ".join(f"{int(d):,} ({d / r['ended']:.0%})" for d, r in zip(drops, runs, strict=True)),
                ", ".join(f"{r['pause_ms']:.0f}" for r in runs),
                f"{statistics.median(r['seconds'] for r in runs):.1f}",
            ]
        )
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    lines = [
        *environment_header("Dropped spans: a starved export thread", shown),
        "Each arm runs in a fresh interpreter; arms alternate, "
        f"{args.repeats} time(s) each. Exporter: `BatchSpanProcessor` with the SDK defaults "
        "(max_queue_size=2048, max_export_batch_size=512) to a counting no-op exporter.",
        "",
        markdown_table(
            ["arm", "spans ended", "dropped, per repeat", "longest export pause ms", "median s"],
            rows,
            "lrrrr",
        ),
        "",
        "- `steps`: @step no-op calls in one run. `steps+urandom` / `steps+sleep0`: the same "
        "with `os.urandom(16)` / `time.sleep(0)` every 10 steps. `runs`: `@multirun.run` "
        "calls of 10 steps (each run draws `uuid.uuid4()` ids: `Run.id`, the default agent's "
        "`Agent.id`). `runs+random-ids`: the same with `uuid.uuid4` replaced by "
        "`uuid.UUID(int=random.getrandbits(128), version=4)`.",
        "- A no-op export takes microseconds, so drops mean the export thread did not run for "
        "the time the loop needs to fill the queue (1,536 spans past the wake-up threshold), "
        "as the longest pause shows. `os.urandom` releases the GIL around its system call and "
        "the calling thread takes it straight back; the likely mechanism is CPython's GIL "
        "hand-off: the waiting export thread sees the GIL change hands, so it never forces a "
        "switch, while the main thread wins every re-take. `time.sleep(0)` also releases the "
        "GIL but yields the CPU, and does not starve it.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = write_result("export_starvation.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
