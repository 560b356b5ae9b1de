"""Per-call cost of ``input_hash``, the replay key every idempotent step computes, by argument shape.

Usage::

    .venv/bin/python benchmarks/bench_input_hash.py [--rounds 30] [--batch 5000]

Every shape runs in ONE process, interleaved with its floor: each round times
one batch of ``input_hash`` and one batch of the least any JSON digest of those
arguments costs (``json.dumps`` of ``[args, kwargs]`` with the hash's options,
then SHA-256), shape after shape, so a slow moment of a shared machine hits
both alike. The table reports the median over rounds of (batch time / calls),
and the ratio of the two taken per round (paired), then its median. The shapes
are what agents pass to their steps: plain scalars (hashed by repr, which
costs less than the floor), a list of strings, a small config dict, chat
messages, messages with tool calls nested in them, and a pydantic model (its
fields are converted first).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from _common import environment_header, markdown_table, write_result
from multirun.checkpoints.hashing import input_hash

Arguments = tuple[tuple[Any, ...], dict[str, Any]]


class SearchRequest(BaseModel):
    query: str
    top_k: int
    filters: dict[str, str]


SHAPES: dict[str, Arguments] = {
    "3 scalars": (("gpt-4o-mini", 3, 0.2), {}),
    "100 strings": (([f"document {i}" for i in range(100)],), {}),
    "small dict": (({"model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 256},), {}),
    "20 chat messages": (
        (
            [
                {"role": "user" if i % 2 else "assistant", "content": f"message {i}: some words of text"}
                for i in range(20)
            ],
        ),
        {"model": "gpt-4o-mini"},
    ),
    "5 messages with tool calls": (
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": "search", "arguments": '{"q": "x"}'},
                        }
                    ],
                }
                for i in range(5)
            ],
        ),
        {},
    ),
    "pydantic model": ((SearchRequest(query="otel", top_k=5, filters={"lang": "en"}),), {}),
}


def floor_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """One json.dumps of plain arguments and one SHA-256: what any JSON digest costs at least."""
    text = json.dumps(
        [args, kwargs],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        default=to_jsonable_python,  # the model's fields, as input_hash hashes them
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def batch_us(
    fn: Callable[[tuple[Any, ...], dict[str, Any]], object], arguments: Arguments, calls: int
) -> float:
    args, kwargs = arguments
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn(args, kwargs)
    return (time.perf_counter_ns() - start) / calls / 1000


def measure(rounds: int, batch: int) -> list[list[str]]:
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in SHAPES}
    for _ in range(rounds):
        for name, arguments in SHAPES.items():
            gc.collect()
            hashed = batch_us(input_hash, arguments, batch)
            floor = batch_us(floor_digest, arguments, batch)
            times[name][0].append(hashed)
            times[name][1].append(floor)
    rows = []
    for name, (hashed, floor) in times.items():
        ratio = statistics.median(h / f for h, f in zip(hashed, floor, strict=True))
        rows.append(
            [name, f"{statistics.median(hashed):.2f}", f"{statistics.median(floor):.2f}", f"{ratio:.2f}x"]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    for arguments in SHAPES.values():
        assert input_hash(*arguments) is not None  # every shape is one a step is served for
    lines = environment_header("input_hash per call, by argument shape")
    lines += [
        f"{args.rounds} rounds of {args.batch} calls per shape; medians over the rounds.",
        "",
        markdown_table(
            ["arguments", "input_hash µs / call", "json.dumps + sha256 µs / call", "ratio (paired)"],
            measure(args.rounds, args.batch),
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print(f"written to {write_result('input_hash.md', text)}")


if __name__ == "__main__":
    main()
