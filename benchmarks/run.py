"""Run every benchmark and regenerate ``benchmarks/results/*.md``.

Usage (from the project root)::

    .venv/bin/python benchmarks/run.py            # the full set, about 15 minutes (peer venvs: +10 once)
    .venv/bin/python benchmarks/run.py --quick    # shorter, for a smoke test
    .venv/bin/python benchmarks/run.py --only memory --only starvation

Each benchmark runs in its own fresh interpreter, one after the other (never
in parallel: they would disturb each other's timings on a small machine):

- ``bench_overhead.py`` -> ``results/overhead.md``: per-call cost of ``@step``
  against a plain call and a bare OpenTelemetry span, interleaved rounds;
- ``bench_memory.py``   -> ``results/memory.md``: RSS over 1,000,000 steps in
  one run, over 10,000 runs of 10 steps, and with 1,000 runs alive at once;
- ``profile_step.py``   -> ``results/profile.md``: where the time of a sync
  ``@step`` goes (cProfile, own time, multirun and OpenTelemetry functions);
- ``repro_export_starvation.py`` -> ``results/export_starvation.md``: why the
  BatchSpanProcessor drops spans when many runs are created;
- ``bench_local_files.py`` -> ``results/local_files.md``: the embedded default's
  exporter: OTLP JSON encoding per span against the library route, and spans lost by
  a fast agent loop;
- ``bench_ledger.py``   -> ``results/ledger.md``: the budget check and ledger
  update per step, in process and against a real redis-server;
- ``bench_input_hash.py`` -> ``results/input_hash.md``: the replay key every
  idempotent step computes, by argument shape, against one ``json.dumps`` + SHA-256;
- ``bench_metrics.py``  -> printed: the per-step metrics path against a raw SDK
  instrument;
- ``bench_checkpoint.py`` -> ``results/checkpoint.md``: save and load of a 10 MB
  state against the raw serializer plus a plain file write;
- ``bench_scaling.py``  -> ``results/scaling.md`` (+ ``scaling.json``): per-step
  cost against run length, concurrent runs (asyncio tasks, threads), checkpoint
  size, and processes sharing a Redis ledger;
- ``bench_motus.py``    -> ``results/motus.md``: per-task cost of the Motus
  instrumentation against a bare span per task (Python 3.12+);
- ``bench_clientai.py`` -> ``results/clientai.md``: per-step cost of the ClientAI
  instrumentation against bare spans;
- ``peers/bench_peers.py`` -> ``results/peers.md`` (+ ``peers.json``): ``@step``
  side by side with Traceloop, Langfuse, Logfire, OpenLIT and AgentOps, each in
  its own virtual environment (built on the first run, a few minutes; reused after).

Then ``readme_table.py`` writes ``results/README-table.md``, the README's
performance table, from whatever results there are (``--update-readme``: also
between the markers of README.md, when it has them).

``psutil`` is used for RSS when installed (``.venv/bin/pip install psutil``),
else ``/proc/self/statm``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL: list[list[str]] = [
    ["bench_overhead.py"],
    ["bench_memory.py"],
    ["profile_step.py"],
    ["repro_export_starvation.py"],
    ["bench_local_files.py"],
    ["bench_ledger.py"],
    ["bench_input_hash.py"],
    ["bench_metrics.py"],
    ["bench_checkpoint.py"],
    ["bench_scaling.py"],
    ["bench_motus.py"],
    ["bench_clientai.py"],
    ["peers/bench_peers.py"],
]
SCRIPTS = {
    "overhead": "bench_overhead.py",
    "memory": "bench_memory.py",
    "profile": "profile_step.py",
    "starvation": "repro_export_starvation.py",
    "local_files": "bench_local_files.py",
    "ledger": "bench_ledger.py",
    "input_hash": "bench_input_hash.py",
    "metrics": "bench_metrics.py",
    "checkpoint": "bench_checkpoint.py",
    "scaling": "bench_scaling.py",
    "motus": "bench_motus.py",
    "clientai": "bench_clientai.py",
    "peers": "peers/bench_peers.py",
}
QUICK: list[list[str]] = [
    ["bench_overhead.py", "--rounds", "8", "--batch", "500"],
    ["bench_memory.py", "--steps", "100000", "--runs", "1000", "--concurrent", "100"],
    ["profile_step.py", "--calls", "20000", "--rounds", "6"],
    ["repro_export_starvation.py", "--repeats", "1"],
    ["bench_local_files.py", "--rounds", "5", "--runs", "500", "--repeats", "1"],
    ["bench_ledger.py", "--rounds", "6", "--batch", "2000"],
    ["bench_input_hash.py", "--rounds", "6", "--batch", "1000"],
    ["bench_metrics.py", "--rounds", "6"],
    ["bench_checkpoint.py", "--mb", "2", "--rounds", "3"],
    ["bench_scaling.py", "--quick"],
    ["bench_motus.py", "--rounds", "5", "--batch", "200", "--warmup", "1"],
    ["bench_clientai.py", "--rounds", "6", "--batch", "300"],
    ["peers/bench_peers.py", "--rounds", "4", "--warmup", "1", "--batch", "200"],
]


def run_one(script_and_args: list[str]) -> int:
    """Run one benchmark in a new interpreter from the project root; its exit code."""
    script, *args = script_and_args
    command = [sys.executable, str(HERE / script), *args]
    print(f"\n=== {script} {' '.join(args)}".rstrip(), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=HERE.parent)
    print(f"=== {script}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument(
        "--only",
        choices=sorted(SCRIPTS),
        action="append",
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also write the table into README.md between its benchmarks markers",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.only:
        plan = [p for p in plan if any(SCRIPTS[o] == p[0] for o in args.only)]
    failures = [p[0] for p in plan if run_one(p) != 0]
    table = ["readme_table.py", *(["--update-readme"] if args.update_readme else [])]
    if run_one(table) != 0:
        failures.append("readme_table.py")
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"\nresults in {HERE / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
