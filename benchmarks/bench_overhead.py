"""Per-call overhead of ``@multirun.step`` against a plain call and a bare OpenTelemetry span.

Every variant runs in ONE process, interleaved: round 1 runs a batch of each
variant in turn (A B C D ...), round 2 does the same, and so on. A slow
moment of a shared machine then hits every variant of the round alike, and
the ratios are taken per round (paired) before their median is reported.

Usage::

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 30] [--batch 2000]

Two SDK TracerProviders of the same configuration, each with one
BatchSpanProcessor exporting to a counting no-op exporter: the steps' provider,
which ``multirun.init`` is given (it adds its UsageSpanProcessor), and the
bare spans' provider, which has nothing else on it: a bare span costs here
what it costs in an application without multirun. Every function takes one
small int and returns it, as in the side-by-side benchmark, so a step hashes
an argument for its replay record. Between batches (outside the timed region)
the providers are flushed, each run gets an empty replay log (a full one, 10,000
calls, records nothing, which is cheaper) and the garbage collector runs, so each
batch starts with an empty export queue.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

import multirun
from _common import (
    environment_header,
    init_multirun,
    make_provider,
    markdown_table,
    write_result,
)
from multirun.checkpoints.replay import ReplayLog
from multirun.context import RunContext
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import CircuitBreakerRule, RateLimitRule, RetryRule
from multirun.models.run import Run
from multirun.telemetry import attributes as attr

LLM_MODEL = "gpt-4o-mini"
BatchRunner = Callable[[int], int]  # runs n calls, returns the elapsed nanoseconds


# ---------------------------------------------------------------------------
# the functions under test


def bare_span(tracer: Tracer, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The minimal tracing decorator: one ``start_as_current_span`` around the call."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(name):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def bare_span_async(
    tracer: Tracer, name: str
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """The async twin of :func:`bare_span`."""

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate


def bare_span_gen(tracer: Tracer, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The generator twin of :func:`bare_span`: the span current across ``yield from``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(name):
                return (yield from fn(*args, **kwargs))

        return wrapper

    return decorate


def bare_llm_span(tracer: Tracer, name: str) -> Callable[[int], int]:
    """A hand-written LLM span: the attributes a GenAI instrumentation sets on a chat call."""

    def llm_call(x: int) -> int:
        with tracer.start_as_current_span(name) as span:
            span.set_attribute(attr.GEN_AI_OPERATION_NAME, attr.OP_CHAT)
            span.set_attribute(attr.GEN_AI_REQUEST_MODEL, LLM_MODEL)
            span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, LLM_MODEL)
            span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, 10)
            span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 5)
        return x

    return llm_call


# what a step's span carries (DESIGN.md: every step), the input hash a constant of its length
STEP_START_ATTRIBUTES = {
    attr.STEP_NAME: "noop",
    attr.STEP_KIND: "function",
    attr.STEP_ATTEMPT: 1,
    attr.POLICY_DECISION: "proceed",
}
INPUT_HASH = "r" + "0" * 63


def bare_step_attributes_span(tracer: Tracer, name: str) -> Callable[[int], int]:
    """A hand-written span with the 7 attributes of a step span, given as a step gives them:
    4 at its start, its id, input hash and status at its end. Nothing is computed."""

    def call(x: int) -> int:
        with tracer.start_as_current_span(name, attributes=STEP_START_ATTRIBUTES) as span:
            result = noop(x)
            span.set_attributes(
                {
                    attr.STEP_ID: f"{span.get_span_context().span_id:016x}",
                    attr.STEP_STATUS: "completed",
                    attr.STEP_INPUT_HASH: INPUT_HASH,
                }
            )
        return result

    return call


def noop(x: int) -> int:
    """The body of every sync variant."""
    return x


async def noop_async(x: int) -> int:
    """The body of every async variant."""
    return x


def noop_gen(x: int) -> Iterator[int]:
    """The body of every generator variant: one item."""
    yield x


@multirun.step
def step_sync(x: int) -> int:
    """A sync ``@step`` no-op."""
    return x


@multirun.step
def step_governed(x: int) -> int:
    """The same no-op, called inside the run that has a Budget and a Policy."""
    return x


@multirun.step
def step_unrecorded(x: int) -> int:
    """The same no-op, in a run whose client keeps no replay log (record_replay=False)."""
    return x


@multirun.step
def step_outside(x: int) -> int:
    """The same no-op, called outside any run (the decorator's fast path)."""
    return x


@multirun.step
async def step_async(x: int) -> int:
    """An async ``@step`` no-op."""
    return x


@multirun.step
def step_gen_governed(x: int) -> Iterator[int]:
    """A generator ``@step`` of one item (streamed output), in the run with a Budget and a Policy."""
    yield x


@multirun.step(kind=StepKind.LLM_CALL)
def step_llm(x: int) -> int:
    """An LLM step that reports usage, priced from the price book."""
    multirun.report_usage(LLM_MODEL, input_tokens=10, output_tokens=5)
    return x


# ---------------------------------------------------------------------------
# batch runners


def sync_batch(fn: Callable[[int], Any], ctx: Context) -> BatchRunner:
    """Runs ``fn`` n times with ``ctx`` attached; only the loop is timed."""

    def run(n: int) -> int:
        token = otel_context.attach(ctx)
        try:
            clock = time.perf_counter_ns
            start = clock()
            for i in range(n):
                fn(i)
            return clock() - start
        finally:
            otel_context.detach(token)

    return run


def gen_batch(fn: Callable[[int], Iterator[Any]], ctx: Context) -> BatchRunner:
    """Reads ``fn(i)`` to its end n times with ``ctx`` attached; only the loop is timed."""

    def run(n: int) -> int:
        token = otel_context.attach(ctx)
        try:
            clock = time.perf_counter_ns
            start = clock()
            for i in range(n):
                for _ in fn(i):
                    pass
            return clock() - start
        finally:
            otel_context.detach(token)

    return run


def async_batch(
    loop: asyncio.AbstractEventLoop, fn: Callable[[int], Awaitable[Any]], ctx: Context
) -> BatchRunner:
    """Awaits ``fn(i)`` n times inside a task of a running event loop; only the loop is timed."""

    async def body(n: int) -> int:
        token = otel_context.attach(ctx)
        try:
            clock = time.perf_counter_ns
            start = clock()
            for i in range(n):
                await fn(i)
            return clock() - start
        finally:
            otel_context.detach(token)

    def run(n: int) -> int:
        return loop.run_until_complete(body(n))

    return run


# ---------------------------------------------------------------------------
# the variants


@dataclass
class Variant:
    """One row of the table."""

    key: str
    label: str
    baseline: str  # key of the bare-span variant it is compared with
    runner: BatchRunner
    span_name: str | None  # the name its spans are exported under (None: makes no span)
    # a step is a child of its run's span: key of the bare span that is a child too, if any
    child_baseline: str | None = None
    samples: list[float] = field(default_factory=list)  # microseconds per call, one per round


@dataclass
class Setup:
    variants: list[Variant]
    runs: list[RunContext]
    provider: Any  # the steps' (multirun is configured on it)
    exporter: Any
    bare_provider: Any  # the bare spans' (nothing but the BatchSpanProcessor)
    bare_exporter: Any
    loop: asyncio.AbstractEventLoop

    def flush(self) -> None:
        self.provider.force_flush()
        self.bare_provider.force_flush()

    def empty_replay_logs(self) -> None:
        """Give each run an empty replay log, so every batch measures steps that are recorded:
        a log holds 10,000 calls, and steps past that are not recorded (cheaper)."""
        for run in self.runs:
            run.replay_log = ReplayLog(run.replay_log.limit)


def build(batch: int) -> Setup:
    """The two providers, multirun, the runs and every variant."""
    provider, exporter = make_provider(max_queue_size=max(2048, 2 * batch))
    client = init_multirun(provider)
    bare_provider, bare_exporter = make_provider(max_queue_size=max(2048, 2 * batch))
    tracer = bare_provider.get_tracer("bench.bare")
    # a parent for the bare child spans, as a run's span is for its steps (it is never ended)
    in_parent = trace.set_span_in_context(tracer.start_span("bare.parent"), Context())

    run_plain = RunContext(client, Run(name="bench"))
    run_governed = RunContext(
        client,
        Run(
            name="bench-governed",
            budget=Budget(max_tokens=10**15, max_cost_usd=1e12, max_steps=10**15),
            policy=Policy(
                retry=RetryRule(),
                rate_limit=RateLimitRule(requests_per_minute=1e9),
                circuit_breaker=CircuitBreakerRule(),
            ),
        ),
    )
    unrecorded_client = multirun.MultiRunClient(tracer_provider=provider, record_replay=False)
    run_unrecorded = RunContext(unrecorded_client, Run(name="bench-unrecorded"))
    empty = Context()
    in_run = run_plain.otel_context
    unrecorded = run_unrecorded.otel_context
    governed = run_governed.otel_context

    loop = asyncio.new_event_loop()
    bare = bare_span(tracer, "bare.sync")(noop)
    bare_child = bare_span(tracer, "bare.sync.child")(noop)
    bare_in_run = bare_span(provider.get_tracer("bench.bare"), "bare.sync.in_run")(noop)
    bare_async = bare_span_async(tracer, "bare.async")(noop_async)
    bare_child_async = bare_span_async(tracer, "bare.async.child")(noop_async)
    bare_gen = bare_span_gen(tracer, "bare.gen")(noop_gen)
    bare_child_gen = bare_span_gen(tracer, "bare.gen.child")(noop_gen)
    bare_llm = bare_llm_span(tracer, "bare.llm")
    bare_step_attributes = bare_step_attributes_span(tracer, "bare.sync.step_attributes")

    variants = [
        Variant("plain", "plain call (no tracing)", "bare", sync_batch(noop, empty), None),
        Variant("bare", "bare span", "bare", sync_batch(bare, empty), "bare.sync"),
        Variant(
            "bare_child",
            "bare span, inside a parent span",
            "bare",
            sync_batch(bare_child, in_parent),
            "bare.sync.child",
        ),
        Variant(
            "bare_in_run",
            "bare span, inside a run (multirun's provider)",
            "bare",
            sync_batch(bare_in_run, in_run),
            "bare.sync.in_run",
        ),
        Variant(
            "bare_step_attributes",
            "bare span + a step's 7 attributes, inside a parent span",
            "bare",
            sync_batch(bare_step_attributes, in_parent),
            "bare.sync.step_attributes",
            "bare_child",
        ),
        Variant("step_outside", "@step, no active run", "bare", sync_batch(step_outside, empty), None),
        Variant("step", "@step sync", "bare", sync_batch(step_sync, in_run), "step step_sync", "bare_child"),
        Variant(
            "step_unrecorded",
            "@step sync, record_replay=False",
            "bare",
            sync_batch(step_unrecorded, unrecorded),
            "step step_unrecorded",
            "bare_child",
        ),
        Variant(
            "step_governed",
            "@step sync, Budget + Policy",
            "bare",
            sync_batch(step_governed, governed),
            "step step_governed",
            "bare_child",
        ),
        Variant(
            "plain_async",
            "plain await (no tracing)",
            "bare_async",
            async_batch(loop, noop_async, empty),
            None,
        ),
        Variant(
            "bare_async",
            "bare span, async",
            "bare_async",
            async_batch(loop, bare_async, empty),
            "bare.async",
        ),
        Variant(
            "bare_child_async",
            "bare span, async, inside a parent span",
            "bare_async",
            async_batch(loop, bare_child_async, in_parent),
            "bare.async.child",
        ),
        Variant(
            "step_async",
            "@step async",
            "bare_async",
            async_batch(loop, step_async, in_run),
            "step step_async",
            "bare_child_async",
        ),
        Variant("plain_gen", "plain generator (no tracing)", "bare_gen", gen_batch(noop_gen, empty), None),
        Variant("bare_gen", "bare span, generator", "bare_gen", gen_batch(bare_gen, empty), "bare.gen"),
        Variant(
            "bare_child_gen",
            "bare span, generator, inside a parent span",
            "bare_gen",
            gen_batch(bare_child_gen, in_parent),
            "bare.gen.child",
        ),
        Variant(
            "step_gen_governed",
            "@step generator, Budget + Policy",
            "bare_gen",
            gen_batch(step_gen_governed, governed),
            "step step_gen_governed",
            "bare_child_gen",
        ),
        Variant(
            "bare_llm",
            "bare span + 5 GenAI attributes",
            "bare_llm",
            sync_batch(bare_llm, empty),
            "bare.llm",
        ),
        Variant(
            "step_llm",
            "@step(kind=LLM_CALL) + report_usage",
            "bare_llm",
            sync_batch(step_llm, in_run),
            f"{attr.OP_CHAT} {LLM_MODEL}",
        ),
    ]
    return Setup(
        variants,
        [run_plain, run_governed, run_unrecorded],
        provider,
        exporter,
        bare_provider,
        bare_exporter,
        loop,
    )


# ---------------------------------------------------------------------------
# measuring


def measure(setup: Setup, rounds: int, warmup: int, batch: int) -> None:
    """Run ``warmup`` untimed rounds, then ``rounds`` timed ones, A B C ... A B C ..."""
    gc.collect()
    gc.freeze()  # startup objects out of the collector's way: the per-batch collect stays cheap
    for round_no in range(warmup + rounds):
        for variant in setup.variants:
            setup.flush()
            setup.empty_replay_logs()
            gc.collect()
            elapsed_ns = variant.runner(batch)
            if round_no >= warmup:
                variant.samples.append(elapsed_ns / batch / 1000)
        if round_no >= warmup and (round_no - warmup + 1) % 10 == 0:
            print(f"  round {round_no - warmup + 1}/{rounds}", file=sys.stderr)


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def report(setup: Setup, rounds: int, warmup: int, batch: int) -> str:
    """The markdown report: timing table, span counts, and how it was measured."""
    by_key = {v.key: v for v in setup.variants}
    rows = []
    for v in setup.variants:
        base = by_key[v.baseline]
        ratios = [a / b for a, b in zip(v.samples, base.samples, strict=True)]
        extra = [a - b for a, b in zip(v.samples, base.samples, strict=True)]
        child = "—"
        if v.child_baseline is not None:
            parent = by_key[v.child_baseline]
            child_ratios = [a / b for a, b in zip(v.samples, parent.samples, strict=True)]
            child = f"{statistics.median(child_ratios):.3g}x"
        rows.append(
            [
                v.label,
                f"{statistics.median(v.samples):.2f}",
                f"{quantile(v.samples, 0.25):.2f} - {quantile(v.samples, 0.75):.2f}",
                f"{min(v.samples):.2f}",
                base.label if v.key != v.baseline else "—",
                f"{statistics.median(ratios):.3g}x",
                f"{statistics.median(extra):+.2f}",
                child,
            ]
        )
    timing = markdown_table(
        [
            "variant",
            "median µs/call",
            "IQR µs",
            "min µs",
            "compared with",
            "ratio (paired median)",
            "Δ µs vs that",
            "ratio to the bare span inside a parent span",
        ],
        rows,
        "lrrrlrrr",
    )

    setup.flush()
    expected = batch * (rounds + warmup)
    exported = {**setup.exporter.by_name, **setup.bare_exporter.by_name}
    attributes = {**setup.exporter.attribute_counts, **setup.bare_exporter.attribute_counts}
    span_rows = []
    for v in setup.variants:
        if v.span_name is None:
            span_rows.append([v.label, "—", "0 expected", str(0)])
            continue
        span_rows.append(
            [
                v.label,
                f"`{v.span_name}`",
                f"{exported.get(v.span_name, 0):,} of {expected:,}",
                str(attributes.get(v.span_name, 0)),
            ]
        )
    spans = markdown_table(["variant", "span name", "exported", "attributes / span"], span_rows, "llrr")
    others = {
        name: count for name, count in exported.items() if name not in {v.span_name for v in setup.variants}
    }
    total = setup.exporter.total + setup.bare_exporter.total

    lines = [
        f"{batch:,} calls per batch, {rounds} timed rounds after {warmup} warm-up round(s); "
        "every round runs one batch of each variant in the order of the table. Every function "
        "takes one small int and returns it.",
        "",
        timing,
        "",
        "- *median µs/call*: the median over rounds of (batch time / calls); the batch loop "
        "itself is included, so the plain-call rows show the floor.",
        "- *ratio*: per round, this variant's time divided by the time of the variant in "
        "*compared with* in the same round; the median of those ratios. *Δ µs*: the same, "
        "as a difference.",
        "- *bare span*: `with tracer.start_as_current_span(name): return fn(*args, **kwargs)` on "
        "a provider of its own (one BatchSpanProcessor, nothing of multirun), run outside any "
        "span: what a span costs in an application without multirun.",
        "- *inside a parent span*: the same, with a span of that provider current, as a run's span "
        "is for its steps. A child span costs the SDK more than a root span (its sampler and "
        "`start_span` look the parent up, three `isinstance` checks against the `Span` ABC, and "
        "read its trace state), so the last column compares each step with the bare span in the "
        "same position; the target is stated against the root bare span.",
        "- *inside a run (multirun's provider)*: a bare span of the provider multirun is configured "
        "on, with a run's context current: what multirun's UsageSpanProcessor adds to spans of "
        "other instrumentations.",
        "- *a step's 7 attributes*: the attributes of a step's span (DESIGN.md: "
        "`multirun.step.{name,kind,attempt}` and `multirun.policy.decision` at its start, "
        "`multirun.step.{id,status,input_hash}` at its end, as a step sets them), on a bare child "
        "span that computes nothing: what the SDK charges for the attributes alone (it validates "
        "each one under a lock), which the step pays on top of the span.",
        "- *Budget + Policy*: `Budget(max_tokens=10**15, max_cost_usd=1e12, max_steps=10**15)` and "
        "`Policy(retry=RetryRule(), rate_limit=RateLimitRule(requests_per_minute=1e9), "
        "circuit_breaker=CircuitBreakerRule())` on the run. The budget is checked before each "
        "step; whatever policy enforcement exists at the time of the run is what is measured.",
        "- *bare span + 5 GenAI attributes*: `gen_ai.operation.name`, `gen_ai.request.model`, "
        "`gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens` "
        "set one by one. The LLM step prices the usage (`gpt-4o-mini`), writes its "
        "roll-ups (hence more attributes, see below) and records the GenAI metrics on the "
        "process's MeterProvider (the API's no-op one here).",
        "- generator rows: the function yields its argument once; each batch reads n of "
        "its generators to their end (`for _ in fn(i): pass`). The bare span is current across "
        "`yield from`; a step's context is current only while its body runs.",
        "- async rows: each batch is one task on one event loop (`loop.run_until_complete`), "
        "awaiting the function n times.",
        "",
        "## Spans exported",
        "",
        "Two SDK `TracerProvider`s of the same configuration, each with a `BatchSpanProcessor` "
        f"(max_queue_size={max(2048, 2 * batch)}, max_export_batch_size=512) to a counting "
        "no-op exporter: the steps' provider, with the `UsageSpanProcessor` that "
        "`multirun.init(tracer_provider=...)` adds, and the bare spans' provider, with nothing else. "
        "Both are flushed before each batch (untimed), so the export work of a batch's spans "
        "lands in that batch (the exporter thread wakes every 512 spans) and no span is dropped. "
        "The counts below include the warm-up rounds.",
        "",
        spans,
        "",
        f"Exported in all: {total:,} spans"
        + (f" (also: {', '.join(f'`{n}` x {c}' for n, c in sorted(others.items()))})" if others else "")
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--batch", type=int, default=2000, help="calls per batch (default 2000)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.rounds < 4 or args.batch < 1:
        parser.error("--rounds must be >= 4 and --batch >= 1")

    setup = build(args.batch)
    try:
        print(
            f"bench_overhead: {len(setup.variants)} variants x {args.rounds} rounds x {args.batch} calls",
            file=sys.stderr,
        )
        measure(setup, args.rounds, args.warmup, args.batch)
        for run in setup.runs:
            run.complete()
        body = report(setup, args.rounds, args.warmup, args.batch)
    finally:
        setup.loop.close()
        setup.provider.shutdown()
        setup.bare_provider.shutdown()
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    text = "\n".join(environment_header("Overhead of @step per call", shown)) + "\n" + body
    print(text)
    if not args.no_write:
        path = write_result("overhead.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
