"""The embedded default's exporter: OTLP JSON lines in local files, and whether it keeps up.

Usage::

    .venv/bin/python benchmarks/bench_local_files.py [--rounds 15] [--runs 3000] [--repeats 2]

Two parts, each comparing the package's encoder (``multirun.telemetry.otlp_json``) with
the library route it replaced (opentelemetry-exporter-otlp-proto-common's encoder, then
protobuf's ``MessageToDict``, ids turned to hex):

1. Encoding: µs per span to turn a batch of 512 spans of a typical run (a run, an
   agent, LLM steps reporting usage, tool steps) into the JSON line the exporter appends,
   the two encoders in alternating rounds.
2. A fast agent loop with the embedded default (``multirun.init_local()``, nothing else
   configured): ``--runs`` runs of 20 LLM and 20 tool steps each in a tight loop, in a
   fresh interpreter per repeat. It reports the spans written to the file against the spans
   made: the export queue (2,048 spans) drops what the exporter thread cannot write in
   time, and the exporter competes with the loop for the GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import environment_header, markdown_table, write_result

LOOP = """
import json, os, sys, time
import multirun
from multirun.models import StepKind
client = multirun.init_local(sys.argv[2])

@multirun.step(kind=StepKind.LLM_CALL)
def ask(i):
    multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=20)
    return i

@multirun.step(kind=StepKind.TOOL_CALL)
def tool(i):
    return i

@multirun.run(name="loop")
def job():
    for k in range(20):
        ask(k)
        tool(k)

start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    job()
elapsed = time.perf_counter() - start
client.force_flush()
written = 0
for name in os.listdir(os.path.join(sys.argv[2], "traces")):
    for line in open(os.path.join(sys.argv[2], "traces", name)):
        for resource in json.loads(line)["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                written += len(scope["spans"])
print(json.dumps({"written": written, "made": int(sys.argv[1]) * 41, "seconds": elapsed}))
"""


def typical_spans() -> list[Any]:
    """512 finished spans of runs like the loop's, from an in-memory exporter."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import multirun
    from multirun.models import StepKind

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    multirun.init(tracer_provider=provider)

    @multirun.step(kind=StepKind.LLM_CALL)
    def ask(i: int) -> int:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=20)
        return i

    @multirun.step(kind=StepKind.TOOL_CALL)
    def tool(i: int) -> int:
        return i

    @multirun.run(name="loop")
    def job() -> None:
        for k in range(20):
            ask(k)
            tool(k)

    for _ in range(13):
        job()
    return list(exporter.get_finished_spans())[:512]


def encoding(rounds: int) -> list[list[str]]:
    import base64

    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from multirun.telemetry.otlp_json import encode_spans_json

    def library_route(spans: list[Any]) -> dict[str, Any]:
        message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
        for resource_spans in message.get("resourceSpans", ()):
            for scope_spans in resource_spans.get("scopeSpans", ()):
                for span in scope_spans.get("spans", ()):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in span:
                            span[key] = base64.b64decode(span[key]).hex()
        return message

    spans = typical_spans()
    assert encode_spans_json(spans) == library_route(spans)
    arms = {"library route": library_route, "otlp_json": encode_spans_json}
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, encode in arms.items():
            start = time.perf_counter()
            json.dumps(encode(spans), separators=(",", ":"), ensure_ascii=False).encode()
            samples[name].append((time.perf_counter() - start) / len(spans) * 1e6)
    library = statistics.median(samples["library route"])
    return [
        [name, f"{statistics.median(values):.1f}", f"{statistics.median(values) / library:.2f}x"]
        for name, values in samples.items()
    ]


def loop(runs: int, repeats: int) -> list[list[str]]:
    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            out = subprocess.run(
                [sys.executable, "-c", LOOP, str(runs), folder],
                capture_output=True,
                text=True,
                check=True,
                cwd=folder,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return [
        [
            str(number),
            f"{result['made']:,}",
            f"{result['written']:,}",
            f"{(result['made'] - result['written']) / result['made']:.1%}",
            f"{result['seconds']:.1f}",
        ]
        for number, result in enumerate(results, 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    lines = environment_header("The local files' exporter: encoding cost and a fast loop")
    lines += [
        "## 1. Encoding a batch of 512 spans into one OTLP JSON line",
        "",
        markdown_table(["encoder", "median µs/span", "ratio to the library route"], encoding(args.rounds)),
        "",
        f"{args.rounds} alternating rounds; the outputs are checked equal first.",
        "",
        f"## 2. {args.runs:,} runs of 20 LLM and 20 tool steps in a tight loop, embedded default",
        "",
        markdown_table(
            ["repeat", "spans made", "spans written", "lost", "loop s"],
            loop(args.runs, args.repeats),
        ),
        "",
        "Each repeat runs in a fresh interpreter with `multirun.init_local()` (BatchSpanProcessor, queue "
        "of 2,048 spans); a run makes 41 spans (the run and its 40 steps), counted in the written "
        "file after `client.force_flush()`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_result("local_files.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
