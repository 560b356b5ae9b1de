"""Checkpoint save and load of a large state, against the raw serializer plus a plain file write.

Usage::

    .venv/bin/python benchmarks/bench_checkpoint.py [--mb 10] [--rounds 7]

The state is ``--mb`` megabytes of JSON-able data (a list of records with
text). *raw* is ``json.dumps`` + write + fsync of a file, then read +
``json.loads``: what any checkpointing must at least do. *multirun* is
``RunContext.checkpoint`` into a file blob store (envelope, SHA-256 digest,
temp file + fsync + atomic link), then ``CheckpointStore.load`` (read, verify
size and digest, deserialize). Rounds alternate raw and multirun; the table
gives medians and the ratio. Also with the signed pickle serializer, against
raw ``pickle``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

import multirun
from _common import environment_header, markdown_table, write_result
from multirun.checkpoints.exporters import FileBlobExporter
from multirun.checkpoints.store import CheckpointStore
from multirun.context import RunContext
from multirun.models import Run


def make_state(megabytes: float) -> dict[str, object]:
    record = {"id": 0, "title": "x" * 40, "body": "lorem ipsum dolor sit amet " * 30, "score": 0.5}
    size = len(json.dumps(record))
    count = int(megabytes * 1_000_000 / size)
    return {"records": [dict(record, id=i) for i in range(count)]}


def raw_round(state: dict[str, object], folder: Path, dumps, loads) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    path = folder / f"raw-{time.perf_counter_ns()}.bin"
    start = time.perf_counter()
    data = dumps(state)
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    saved = time.perf_counter()
    loads(path.read_bytes())
    loaded = time.perf_counter()
    return saved - start, loaded - saved


def multirun_round(ctx: RunContext, store: CheckpointStore) -> tuple[float, float]:
    start = time.perf_counter()
    meta = ctx.checkpoint(name="big").value
    saved = time.perf_counter()
    store.load(meta.id)
    loaded = time.perf_counter()
    return saved - start, loaded - saved


def measure(serializer: str, megabytes: float, rounds: int) -> list[list[str]]:
    folder = Path(tempfile.mkdtemp(prefix="multirun-bench-ckpt-"))
    try:
        key = "benchmark key, not a secret"
        store = CheckpointStore(
            FileBlobExporter(folder / "blobs"),
            serializer=serializer,
            hmac_key=key if serializer != "json" else None,
        )
        client = multirun.MultiRunClient(
            tracer_provider=TracerProvider(), checkpoint_store=store, metrics=False, record_replay=False
        )
        state = make_state(megabytes)
        if serializer == "json":

            def dumps(obj):  # type: ignore[no-untyped-def]
                return json.dumps(obj, separators=(",", ":")).encode()

            loads = json.loads
        else:

            def dumps(obj):  # type: ignore[no-untyped-def]
                return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

            loads = pickle.loads
        raw: list[tuple[float, float]] = []
        ours: list[tuple[float, float]] = []
        with RunContext(client, Run(name="bench")) as ctx:
            ctx.set_state("data", state)
            for _ in range(rounds):
                raw.append(raw_round(state, folder, dumps, loads))
                ours.append(multirun_round(ctx, store))
        rows = []
        for label, index in (("save", 0), ("load", 1)):
            raw_ms = statistics.median(r[index] for r in raw) * 1000
            our_ms = statistics.median(o[index] for o in ours) * 1000
            rows.append(
                [f"{serializer} {label}", f"{raw_ms:.1f}", f"{our_ms:.1f}", f"{our_ms / raw_ms:.2f}x"]
            )
        raw_total = statistics.median(r[0] + r[1] for r in raw) * 1000
        our_total = statistics.median(o[0] + o[1] for o in ours) * 1000
        rows.append(
            [
                f"{serializer} save + load",
                f"{raw_total:.1f}",
                f"{our_total:.1f}",
                f"{our_total / raw_total:.2f}x",
            ]
        )
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rows = measure("json", args.mb, args.rounds) + measure("pickle", args.mb, args.rounds)
    lines = environment_header(f"Checkpoint save and load of a {args.mb:g} MB state")
    lines += [markdown_table(["operation", "raw ms", "multirun ms", "ratio"], rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print(f"written to {write_result('checkpoint.md', text)}")


if __name__ == "__main__":
    main()
