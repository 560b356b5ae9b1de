"""Per-task overhead of the Motus instrumentation against a bare OpenTelemetry span per task.

Every variant runs Motus's real runtime: a driver ``@agent_task`` awaits one
task after another on Motus's event loop, and only that loop is timed (the
per-task cost, with Motus's own registration, dispatch, hooks and settlement
included). Three task shapes, each in three variants:

- *Motus alone*: the task, nothing traced;
- *bare span*: the same task whose body is one ``tracer.start_as_current_span``
  (for the model call, with the five GenAI attributes an instrumentation sets);
- *instrumented*: the plain task under ``MotusInstrumentor``, inside a run, so
  each task is a multirun step (the model call an LLM step whose usage is
  priced and charged).

The variants are interleaved (round 1 runs a batch of each, round 2 again,
...) and ratios are taken per round, then their median reported, as in
``bench_overhead.py``. Two ratios per shape: the per-task time against the
bare-span variant (what the issue's 1.3x target is about), and the cost the
instrumentation adds over Motus alone against the cost a bare span adds.

Usage (writes ``results/motus.md``)::

    .venv/bin/python benchmarks/bench_motus.py [--rounds 15] [--batch 500]

Needs Python 3.12+ and ``lithosai-motus``. Motus logs every task at DEBUG by
default; ``MOTUS_LOG_LEVEL=WARNING`` is set here so that logging is not what
is measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("MOTUS_LOG_LEVEL", "WARNING")  # before Motus is imported
if sys.version_info < (3, 12):
    sys.exit("bench_motus.py: Motus (lithosai-motus) needs Python 3.12 or newer")

from motus.models import ChatCompletion
from motus.runtime import agent_task, resolve
from opentelemetry import context as otel_context
from opentelemetry.trace import Tracer

import multirun
from _common import (
    environment_header,
    init_multirun,
    make_provider,
    markdown_table,
    write_result,
)
from multirun.context import RunContext
from multirun.integrations.motus import MotusInstrumentor
from multirun.models import StepKind
from multirun.models.run import Run
from multirun.telemetry import attributes as attr

MODEL = "gpt-4o-mini"
COMPLETION = ChatCompletion(
    id="chatcmpl-bench",
    model=MODEL,
    content="ok",
    usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
)

_tracer: Tracer | None = None  # the bare variants' tracer, set by build()


# ---------------------------------------------------------------------------
# the tasks


@agent_task
async def noop_async() -> None:
    """An async task: runs on Motus's event loop."""


@agent_task
def noop_sync() -> None:
    """A sync task: runs in Motus's thread pool."""


@agent_task(task_type="model_call")
async def model_call() -> ChatCompletion:
    """A model call that returns a ChatCompletion with usage (no model behind it)."""
    return COMPLETION


@agent_task
async def bare_async() -> None:
    assert _tracer is not None
    with _tracer.start_as_current_span("bare.task"):
        pass


@agent_task
def bare_sync() -> None:
    assert _tracer is not None
    with _tracer.start_as_current_span("bare.task.sync"):
        pass


@agent_task(task_type="model_call")
async def bare_model_call() -> ChatCompletion:
    assert _tracer is not None
    with _tracer.start_as_current_span("bare.llm") as span:
        span.set_attribute(attr.GEN_AI_OPERATION_NAME, attr.OP_CHAT)
        span.set_attribute(attr.GEN_AI_REQUEST_MODEL, MODEL)
        span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, MODEL)
        span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, 10)
        span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 5)
        return COMPLETION


@multirun.step
async def step_body_async() -> None:
    """A multirun step: what the instrumentation makes of each task, here written by hand."""


@multirun.step
def step_body_sync() -> None:
    """The sync twin of ``step_body_async``."""


@multirun.step(kind=StepKind.LLM_CALL, model=MODEL)
async def step_body_llm() -> ChatCompletion:
    multirun.report_usage(MODEL, input_tokens=10, output_tokens=5)
    return COMPLETION


@agent_task
async def stepped_async() -> None:
    await step_body_async()


@agent_task
def stepped_sync() -> None:
    step_body_sync()


@agent_task(task_type="model_call")
async def stepped_model_call() -> ChatCompletion:
    return await step_body_llm()


@agent_task
async def drive(task: Any, n: int) -> int:
    """Await ``n`` calls of ``task`` one after the other; the nanoseconds that took."""
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(n):
        await task()
    return clock() - start


# ---------------------------------------------------------------------------
# the variants


@dataclass
class Variant:
    """One row of the table."""

    key: str
    label: str
    shape: str  # the task shape: rows of one shape are compared with each other
    task: Any
    instrumented: bool
    span_name: str | None  # the name its task spans are exported under
    samples: list[float] = field(default_factory=list)  # microseconds per task, one per round


SHAPES = {
    "async": ("async no-op task", "step noop_async"),
    "sync": ("sync no-op task (thread pool)", "step noop_sync"),
    "llm": ("model_call task returning usage", f"{attr.OP_CHAT} {MODEL}"),
}


def variants() -> list[Variant]:
    return [
        Variant("async_plain", "Motus alone", "async", noop_async, False, None),
        Variant("async_bare", "bare span", "async", bare_async, False, "bare.task"),
        Variant("async_step", "@step in the body", "async", stepped_async, False, "step step_body_async"),
        Variant("async_inst", "instrumented", "async", noop_async, True, "step noop_async"),
        Variant("sync_plain", "Motus alone", "sync", noop_sync, False, None),
        Variant("sync_bare", "bare span", "sync", bare_sync, False, "bare.task.sync"),
        Variant("sync_step", "@step in the body", "sync", stepped_sync, False, "step step_body_sync"),
        Variant("sync_inst", "instrumented", "sync", noop_sync, True, "step noop_sync"),
        Variant("llm_plain", "Motus alone", "llm", model_call, False, None),
        Variant("llm_bare", "bare span + 5 GenAI attributes", "llm", bare_model_call, False, "bare.llm"),
        Variant(
            "llm_step",
            "@step(LLM_CALL) + report_usage in the body",
            "llm",
            stepped_model_call,
            False,
            f"{attr.OP_CHAT} {MODEL}",
        ),
        Variant("llm_inst", "instrumented", "llm", model_call, True, f"{attr.OP_CHAT} {MODEL}"),
    ]


@dataclass
class Setup:
    variants: list[Variant]
    run: RunContext
    provider: Any
    exporter: Any
    instrumentor: MotusInstrumentor


def build() -> Setup:
    global _tracer
    provider, exporter = make_provider(max_queue_size=1 << 16)
    client = init_multirun(provider)
    _tracer = provider.get_tracer("bench.bare")
    run = RunContext(client, Run(name="bench-motus"))
    return Setup(variants(), run, provider, exporter, MotusInstrumentor())


def set_instrumented(setup: Setup, on: bool) -> None:
    if on and not setup.instrumentor.is_instrumented_by_opentelemetry:
        setup.instrumentor.instrument()
    elif not on and setup.instrumentor.is_instrumented_by_opentelemetry:
        setup.instrumentor.uninstrument()


def run_batch(setup: Setup, variant: Variant, n: int) -> int:
    """One batch of ``n`` tasks, registered by a driver task started inside the run."""
    set_instrumented(setup, variant.instrumented)
    token = otel_context.attach(setup.run.otel_context)
    try:
        return int(resolve(drive(variant.task, n)))
    finally:
        otel_context.detach(token)


# ---------------------------------------------------------------------------
# measuring


def measure(setup: Setup, rounds: int, warmup: int, batch: int) -> None:
    gc.collect()
    gc.freeze()
    for round_no in range(warmup + rounds):
        for variant in setup.variants:
            setup.provider.force_flush()
            gc.collect()
            elapsed_ns = run_batch(setup, variant, batch)
            if round_no >= warmup:
                variant.samples.append(elapsed_ns / batch / 1000)
        if round_no >= warmup and (round_no - warmup + 1) % 5 == 0:
            print(f"  round {round_no - warmup + 1}/{rounds}", file=sys.stderr)
    set_instrumented(setup, False)


def paired(a: list[float], b: list[float], how: Callable[[float, float], float]) -> float:
    return statistics.median(how(x, y) for x, y in zip(a, b, strict=True))


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def report(setup: Setup, rounds: int, warmup: int, batch: int) -> str:
    by_key = {v.key: v for v in setup.variants}
    rows = []
    summary = []
    for shape, (title, _) in SHAPES.items():
        plain, bare, inst = by_key[f"{shape}_plain"], by_key[f"{shape}_bare"], by_key[f"{shape}_inst"]
        stepped = by_key[f"{shape}_step"]
        for v in (plain, bare, stepped, inst):
            rows.append(
                [
                    title if v is plain else "",
                    v.label,
                    f"{statistics.median(v.samples):.1f}",
                    f"{quantile(v.samples, 0.25):.1f} - {quantile(v.samples, 0.75):.1f}",
                    f"{paired(v.samples, bare.samples, lambda x, y: x / y):.3g}x",
                    f"{paired(v.samples, plain.samples, lambda x, y: x - y):+.1f}",
                ]
            )
        deltas = [
            (i - p) / (b - p) if b > p else float("nan")
            for i, b, p in zip(inst.samples, bare.samples, plain.samples, strict=True)
        ]
        added_ratio = statistics.median(deltas)
        summary.append(
            [
                title,
                f"{paired(inst.samples, bare.samples, lambda x, y: x / y):.3g}x",
                f"{paired(bare.samples, plain.samples, lambda x, y: x - y):+.1f}",
                f"{paired(inst.samples, plain.samples, lambda x, y: x - y):+.1f}",
                f"{added_ratio:.3g}x",
                f"{paired(inst.samples, stepped.samples, lambda x, y: x - y):+.1f}",
            ]
        )
    timing = markdown_table(
        [
            "task",
            "variant",
            "median µs/task",
            "IQR µs",
            "vs bare span (paired median)",
            "Δ µs vs Motus alone",
        ],
        rows,
        "llrrrr",
    )
    ratios = markdown_table(
        [
            "task",
            "instrumented / bare span, per task",
            "a bare span adds, µs",
            "the instrumentation adds, µs",
            "added / added",
            "instrumented - @step in the body, µs",
        ],
        summary,
        "lrrrrr",
    )
    setup.provider.force_flush()
    per_variant = batch * (rounds + warmup)
    sharing = Counter(v.span_name for v in setup.variants if v.span_name is not None)
    span_rows = []
    for v in setup.variants:
        if v.span_name is None:
            continue
        expected = per_variant * sharing[v.span_name]  # variants whose spans have one name count together
        span_rows.append(
            [
                f"{SHAPES[v.shape][0]}, {v.label}",
                f"`{v.span_name}`",
                f"{setup.exporter.by_name.get(v.span_name, 0):,} of {expected:,}",
                str(setup.exporter.attribute_counts.get(v.span_name, 0)),
            ]
        )
    spans = markdown_table(["variant", "span name", "exported", "attributes / span"], span_rows, "llrr")
    return "\n".join(
        [
            f"{batch:,} tasks per batch, {rounds} timed rounds after {warmup} warm-up round(s); every "
            "round runs one batch of each variant in the order of the table.",
            "",
            timing,
            "",
            "## Ratios",
            "",
            ratios,
            "",
            "- *instrumented / bare span, per task*: per round, the time per task of the instrumented "
            "variant divided by that of the bare-span variant; the median over rounds. Both include "
            "what Motus itself costs per task (registration through its loop, an asyncio task, its "
            "hooks and tracer, settlement).",
            "- *added / added*: per round, (instrumented - Motus alone) / (bare span - Motus alone): "
            "what the instrumentation adds to a task against what a bare span adds.",
            "- *instrumented*: each task is a multirun step of a run (`RunContext`), with its span, "
            "roll-ups, budget check, step metrics; the caller's context captured at registration, the "
            "step opened at dispatch and closed at settlement, each attempt reported. The model call "
            "also prices and charges its `ChatCompletion` usage.",
            "- *@step in the body*: the task's body calls a `@multirun.step` function (the model call "
            "an LLM step that reports the same usage), uninstrumented: the same step by hand. The last "
            "column, instrumented minus that, is what the Motus integration itself adds: capturing the "
            "caller's context, naming the task, links, the per-attempt wrapper, settlement.",
            "- *bare span*: `with tracer.start_as_current_span(name)` inside the task's body (the model "
            "call also sets `gen_ai.operation.name`, request and response model, input and output tokens).",
            "- One driver task awaits the n tasks one after the other on Motus's event loop, and times "
            "that loop. Between batches (untimed) the provider is flushed, the garbage collector run, "
            "and the instrumentation put on or off.",
            "",
            "## Spans exported",
            "",
            "One SDK `TracerProvider`: a `BatchSpanProcessor` to a counting no-op exporter, plus the "
            "processors `multirun.init(tracer_provider=...)` adds. Counts include the warm-up rounds.",
            "",
            spans,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--batch", type=int, default=500, help="tasks per batch (default 500)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.rounds < 4 or args.batch < 1:
        parser.error("--rounds must be >= 4 and --batch >= 1")
    setup = build()
    try:
        print(
            f"bench_motus: {len(setup.variants)} variants x {args.rounds} rounds x {args.batch} tasks",
            file=sys.stderr,
        )
        measure(setup, args.rounds, args.warmup, args.batch)
        setup.run.complete()
        body = report(setup, args.rounds, args.warmup, args.batch)
    finally:
        setup.provider.shutdown()
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    text = (
        "\n".join(environment_header("Overhead of the Motus instrumentation per task", shown)) + "\n" + body
    )
    print(text)
    if not args.no_write:
        path = write_result("motus.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
