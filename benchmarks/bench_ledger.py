"""Budget check + ledger update per step: in process, and against a shared Redis ledger.

Usage::

    .venv/bin/python benchmarks/bench_ledger.py [--rounds 30] [--batch 20000]

Per step, a governed run does one ``begin_step`` (check every limit, count the
step) and, for an LLM step, one ``charge`` (tokens and cost). This measures
both on a RunLedger with four limits set, interleaved with an empty loop, and
the same on a RedisLedger against a real redis-server started here on a free
127.0.0.1 port (skipped with a note when ``redis-server`` is not installed):
there, each call is one round trip, so the table also counts the commands the
server saw.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _common import environment_header, markdown_table, write_result
from multirun.enforcement.ledger import RunLedger
from multirun.models import Budget

BUDGET = Budget(max_tokens=10**15, max_cost_usd=1e9, max_steps=10**15, max_duration_seconds=1e9)


def per_call_us(fn: Callable[[], None], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1000


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, batch: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(per_call_us(fn, batch))
    return {name: statistics.median(values) for name, values in times.items()}


def in_process(rounds: int, batch: int) -> list[list[str]]:
    ledger = RunLedger(budget=BUDGET, run_id="bench")
    medians = interleaved(
        {
            "empty loop": lambda: None,
            "begin_step (check 4 limits + count)": ledger.begin_step,
            "charge (tokens + cost)": lambda: ledger.charge(15, 2_250),
        },
        rounds,
        batch,
    )
    floor = medians["empty loop"]
    return [[name, f"{value:.3f}", f"{value - floor:.3f}"] for name, value in medians.items()]


def against_redis(rounds: int, batch: int) -> list[list[str]] | str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not installed (scripts/services.sh ensure_redis_server installs it)"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from multirun.enforcement.redis_ledger import RedisLedgerFactory
    from redis_server import RedisServer  # the tests' own server helper

    server = RedisServer.start()
    try:
        factory = RedisLedgerFactory.from_uri(server.url)
        ledger = factory.ledger("bench", BUDGET)
        calls_before = _round_trips(factory)
        rounds_here, batch_here = max(rounds // 3, 3), max(batch // 20, 200)
        medians = interleaved(
            {
                "begin_step (one EVALSHA)": ledger.begin_step,
                "charge (one EVALSHA)": lambda: ledger.charge(15, 2_250),
            },
            rounds_here,
            batch_here,
        )
        commands = _round_trips(factory) - calls_before
        calls = 2 * rounds_here * batch_here
        factory.close()
    finally:
        server.stop()
    rows = [[name, f"{value:.1f}", "1 round trip"] for name, value in medians.items()]
    rows.append(
        ["commands sent to the server per call (EVALSHA, EVAL, SCRIPT)", f"{commands / calls:.2f}", ""]
    )
    return rows


def _round_trips(factory: object) -> int:
    """Commands clients sent (script calls inside Lua are not counted here)."""
    stats = factory.client.info("commandstats")  # type: ignore[attr-defined]
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval", "script")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    lines = environment_header("Budget check and ledger update per step")
    lines += [
        "## In process (RunLedger, four limits set)",
        "",
        markdown_table(
            ["operation", "median µs / call", "above the empty loop"], in_process(args.rounds, args.batch)
        ),
        "",
        "## Shared ledger (RedisLedger against a local redis-server)",
        "",
    ]
    redis_rows = against_redis(args.rounds, args.batch)
    if isinstance(redis_rows, str):
        lines.append(f"Not measured: {redis_rows}.")
    else:
        lines.append(markdown_table(["operation", "median µs / call", ""], redis_rows))
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print(f"written to {write_result('ledger.md', text)}")


if __name__ == "__main__":
    main()
