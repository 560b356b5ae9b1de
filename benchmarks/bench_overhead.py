"""Per-call overhead of ``@multirun.step`` against a plain call and a bare OpenTelemetry span.

Every variant runs in ONE process, interleaved: round 1 runs a batch of each
variant in turn (A B C D ...), round 2 does the same, and so on. A slow
moment of a shared machine then hits every variant of the round alike, and
the ratios are taken per round (paired) before their median is reported.

Usage::

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 30] [--batch 2000]

What is shared: ONE SDK TracerProvider, with one BatchSpanProcessor exporting
to a counting no-op exporter, serves every variant; ``multirun.init`` is given
that provider and adds its UsageSpanProcessor to it, so the bare-span
variants go through exactly the same processor chain as the steps. Between
batches (outside the timed region) the provider is flushed and the garbage
collector run, so each batch starts with an empty export queue.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
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


def bare_llm_span(tracer: Tracer, name: str) -> Callable[[], None]:
    """A hand-written LLM span: the attributes a GenAI instrumentation sets on a chat call."""

    def llm_call() -> None:
        with tracer.start_as_current_span(name) as span:
            span.set_attribute(attr.GEN_AI_OPERATION_NAME, attr.OP_CHAT)
            span.set_attribute(attr.GEN_AI_REQUEST_MODEL, LLM_MODEL)
            span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, LLM_MODEL)
            span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, 10)
            span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 5)

    return llm_call


def noop() -> None:
    """The body of every sync variant."""


async def noop_async() -> None:
    """The body of every async variant."""


@multirun.step
def step_sync() -> None:
    """A sync ``@step`` no-op."""


@multirun.step
def step_governed() -> None:
    """The same no-op, called inside the run that has a Budget and a Policy."""


@multirun.step
def step_unrecorded() -> None:
    """The same no-op, in a run whose client keeps no replay log (record_replay=False)."""


@multirun.step
def step_outside() -> None:
    """The same no-op, called outside any run (the decorator's fast path)."""


@multirun.step
async def step_async() -> None:
    """An async ``@step`` no-op."""


@multirun.step(kind=StepKind.LLM_CALL)
def step_llm() -> None:
    """An LLM step that reports usage, priced from the price book."""
    multirun.report_usage(LLM_MODEL, input_tokens=10, output_tokens=5)


# ---------------------------------------------------------------------------
# batch runners


def sync_batch(fn: Callable[[], Any], ctx: Context) -> BatchRunner:
    """Runs ``fn`` n times with ``ctx`` attached; only the loop is timed."""

    def run(n: int) -> int:
        token = otel_context.attach(ctx)
        try:
            clock = time.perf_counter_ns
            start = clock()
            for _ in range(n):
                fn()
            return clock() - start
        finally:
            otel_context.detach(token)

    return run


def async_batch(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[Any]], ctx: Context
) -> BatchRunner:
    """Awaits ``fn()`` n times inside a task of a running event loop; only the loop is timed."""

    async def body(n: int) -> int:
        token = otel_context.attach(ctx)
        try:
            clock = time.perf_counter_ns
            start = clock()
            for _ in range(n):
                await fn()
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
    samples: list[float] = field(default_factory=list)  # microseconds per call, one per round


@dataclass
class Setup:
    variants: list[Variant]
    runs: list[RunContext]
    provider: Any
    exporter: Any
    loop: asyncio.AbstractEventLoop


def build(batch: int) -> Setup:
    """The provider, multirun, the two runs and every variant."""
    provider, exporter = make_provider(max_queue_size=max(2048, 2 * batch))
    client = init_multirun(provider)
    tracer = provider.get_tracer("bench.bare")

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
    bare_in_run = bare_span(tracer, "bare.sync.in_run")(noop)
    bare_async = bare_span_async(tracer, "bare.async")(noop_async)
    bare_llm = bare_llm_span(tracer, "bare.llm")

    variants = [
        Variant("plain", "plain call (no tracing)", "bare", sync_batch(noop, empty), None),
        Variant("bare", "bare span", "bare", sync_batch(bare, empty), "bare.sync"),
        Variant(
            "bare_in_run",
            "bare span, inside a run",
            "bare",
            sync_batch(bare_in_run, in_run),
            "bare.sync.in_run",
        ),
        Variant("step_outside", "@step, no active run", "bare", sync_batch(step_outside, empty), None),
        Variant("step", "@step sync", "bare", sync_batch(step_sync, in_run), "step step_sync"),
        Variant(
            "step_unrecorded",
            "@step sync, record_replay=False",
            "bare",
            sync_batch(step_unrecorded, unrecorded),
            "step step_unrecorded",
        ),
        Variant(
            "step_governed",
            "@step sync, Budget + Policy",
            "bare",
            sync_batch(step_governed, governed),
            "step step_governed",
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
            "step_async",
            "@step async",
            "bare_async",
            async_batch(loop, step_async, in_run),
            "step step_async",
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
    return Setup(variants, [run_plain, run_governed, run_unrecorded], provider, exporter, loop)


# ---------------------------------------------------------------------------
# measuring


def measure(setup: Setup, rounds: int, warmup: int, batch: int) -> None:
    """Run ``warmup`` untimed rounds, then ``rounds`` timed ones, A B C ... A B C ..."""
    gc.collect()
    gc.freeze()  # startup objects out of the collector's way: the per-batch collect stays cheap
    for round_no in range(warmup + rounds):
        for variant in setup.variants:
            setup.provider.force_flush()
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
        rows.append(
            [
                v.label,
                f"{statistics.median(v.samples):.2f}",
                f"{quantile(v.samples, 0.25):.2f} - {quantile(v.samples, 0.75):.2f}",
                f"{min(v.samples):.2f}",
                base.label if v.key != v.baseline else "—",
                f"{statistics.median(ratios):.3g}x",
                f"{statistics.median(extra):+.2f}",
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
        ],
        rows,
        "lrrrlrr",
    )

    setup.provider.force_flush()
    expected = batch * (rounds + warmup)
    span_rows = []
    for v in setup.variants:
        if v.span_name is None:
            span_rows.append([v.label, "—", "0 expected", str(0)])
            continue
        got = setup.exporter.by_name.get(v.span_name, 0)
        span_rows.append(
            [
                v.label,
                f"`{v.span_name}`",
                f"{got:,} of {expected:,}",
                str(setup.exporter.attribute_counts.get(v.span_name, 0)),
            ]
        )
    spans = markdown_table(["variant", "span name", "exported", "attributes / span"], span_rows, "llrr")
    others = {
        name: count
        for name, count in setup.exporter.by_name.items()
        if name not in {v.span_name for v in setup.variants}
    }
    total = setup.exporter.total

    lines = [
        f"{batch:,} calls per batch, {rounds} timed rounds after {warmup} warm-up round(s); "
        "every round runs one batch of each variant in the order of the table.",
        "",
        timing,
        "",
        "- *median µs/call*: the median over rounds of (batch time / calls); the batch loop "
        "itself is included, so the plain-call rows show the floor.",
        "- *ratio*: per round, this variant's time divided by the time of the variant in "
        "*compared with* in the same round; the median of those ratios. *Δ µs*: the same, "
        "as a difference.",
        "- *bare span*: `with tracer.start_as_current_span(name): return fn(*args, **kwargs)`, "
        "run outside any run. *inside a run*: the same decorator with a run's context "
        "current, so multirun's UsageSpanProcessor books it as a foreign span.",
        "- *Budget + Policy*: `Budget(max_tokens=10**15, max_cost_usd=1e12, max_steps=10**15)` and "
        "`Policy(retry=RetryRule(), rate_limit=RateLimitRule(requests_per_minute=1e9), "
        "circuit_breaker=CircuitBreakerRule())` on the run. The budget is checked before each "
        "step; whatever policy enforcement exists at the time of the run is what is measured.",
        "- *bare span + 5 GenAI attributes*: `gen_ai.operation.name`, `gen_ai.request.model`, "
        "`gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens` "
        "set one by one. The LLM step prices the usage (`gpt-4o-mini`) and writes its "
        "roll-ups, hence more attributes (see below).",
        "- async rows: each batch is one task on one event loop (`loop.run_until_complete`), "
        "awaiting the function n times.",
        "",
        "## Spans exported",
        "",
        "One SDK `TracerProvider` is shared by every variant: a `BatchSpanProcessor` "
        f"(max_queue_size={max(2048, 2 * batch)}, max_export_batch_size=512) to a counting "
        "no-op exporter, plus the `UsageSpanProcessor` that `multirun.init(tracer_provider=...)` "
        "adds. It is flushed before each batch (untimed), so the export work of a batch's "
        "spans lands in that batch (the exporter thread wakes every 512 spans) and no span "
        "is dropped. The counts below include the warm-up rounds.",
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
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    text = "\n".join(environment_header("Overhead of @step per call", shown)) + "\n" + body
    print(text)
    if not args.no_write:
        path = write_result("overhead.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
