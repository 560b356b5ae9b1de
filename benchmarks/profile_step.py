"""Where the time of a sync ``@step`` goes: cProfile over N calls inside one run.

Usage::

    .venv/bin/python benchmarks/profile_step.py [--calls 200000] [--top 30]

The setup is the one of ``bench_overhead.py``: one SDK TracerProvider with a
BatchSpanProcessor to a counting no-op exporter, plus multirun's
UsageSpanProcessor. The report has four parts:

1. own time (``tottime``) by package;
2. the functions with the most own time. cProfile adds a fixed cost to every
   Python call, so it inflates code made of many small calls; each row also
   gives an estimate in real microseconds per step (its share of the profiled
   time times the per-step time measured without the profiler);
3. the prices of single operations a step performs, timed without the profiler;
4. "what if": hand-written step spans with other attribute layouts, timed in
   interleaved rounds against the real ``@step``, to price the largest lever.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
import timeit
import types
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation import _SPAN_KEY

import multirun
from _common import environment_header, init_multirun, make_provider, markdown_table, write_result
from multirun._keys import RUN_KEY, STEP_KEY
from multirun.context import RunContext
from multirun.models.run import Run
from multirun.models.step import StepStatus
from multirun.telemetry import attributes as attr

Key = tuple[str, int, str]  # pstats: (file, line, function)
START_ATTRS = {attr.STEP_NAME: "profiled_step", attr.STEP_KIND: "function"}


@multirun.step
def profiled_step() -> None:
    """The sync no-op step under the profiler."""


def loop(calls: int) -> None:
    for _ in range(calls):
        profiled_step()


def per_call_us(calls: int) -> float:
    """The time of one step without the profiler (best of 3 batches), in µs."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        loop(calls)
        best = min(best, (time.perf_counter_ns() - start) / calls / 1000)
    return best


# ---------------------------------------------------------------------------
# 1 and 2: the profile


def where(key: Key) -> str:
    """A short name of the package a pstats entry belongs to."""
    file = key[0]
    if file == "~":
        return "builtin"
    for marker, name in (("/multirun/", "multirun"), ("/opentelemetry/", "opentelemetry")):
        if marker in file:
            return name
    return "stdlib/other"


def label(key: Key) -> str:
    file, line, func = key
    if file == "~":
        return f"`{func}`"
    for marker in ("/multirun/", "/opentelemetry/"):
        if marker in file:
            short = marker.strip("/") + "/" + file.split(marker, 1)[1]
            break
    else:
        short = file.rsplit("/", 1)[-1]
    return f"`{func}` ({short}:{line})"


def profile(calls: int) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.enable()
    loop(calls)
    profiler.disable()
    return pstats.Stats(profiler)


def hot_spots(stats: pstats.Stats, calls: int, real_us: float, top: int) -> tuple[str, str]:
    """The own-time table and the per-package summary, as markdown.

    Functions called less than once per 100 steps (the exporter thread waking,
    the loop itself) are left out of both.
    """
    entries: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    kept = {k: v for k, v in entries.items() if v[1] >= calls / 100 and k[2] not in ("loop", "profiled_step")}
    total = sum(v[2] for v in kept.values())
    rows = []
    for key, (_cc, ncalls, tottime, cumtime, _callers) in sorted(
        kept.items(), key=lambda kv: kv[1][2], reverse=True
    )[:top]:
        share = tottime / total
        rows.append(
            [
                label(key),
                where(key),
                f"{ncalls / calls:g}",
                f"{share * 100:.1f}%",
                f"{share * real_us:.2f}",
                f"{cumtime / calls * 1e6:.2f}",
            ]
        )
    table = markdown_table(
        [
            "function",
            "package",
            "calls / step",
            "own time",
            "~ real µs / step",
            "cum µs / step (profiled)",
        ],
        rows,
        "llrrrr",
    )
    by_package: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for key, value in kept.items():
        by_package[where(key)] += value[2]
        counts[where(key)] += value[1]
    summary = markdown_table(
        ["package", "own time", "~ real µs / step", "function calls / step"],
        [
            [
                name,
                f"{t / total * 100:.1f}%",
                f"{t / total * real_us:.2f}",
                f"{counts[name] / calls:.1f}",
            ]
            for name, t in sorted(by_package.items(), key=lambda kv: -kv[1])
        ],
        "lrrr",
    )
    return table, summary


# ---------------------------------------------------------------------------
# 3: prices of single operations


def _with(lock: Any) -> None:
    with lock:
        pass


def primitive_costs(run: RunContext) -> str:
    """Costs of operations one step performs, each timed alone (no profiler)."""
    tracer = run.client.tracer
    ctx = run.otel_context
    ended = tracer.start_span("probe", context=ctx)
    ended.end()
    live = tracer.start_span("live", context=ctx)  # attributes can only be set before end()
    proxy = types.MappingProxyType({})
    plain: dict[str, Any] = {}
    end3 = {attr.STEP_ID: "0123456789abcdef", attr.STEP_STATUS: "completed", attr.STEP_ATTEMPT: 1}
    foreign = run.client.tracer_provider.get_tracer("other").start_span(
        "GET", context=ctx, attributes={"http.request.method": "GET", "url.full": "http://x/"}
    )
    foreign.end()
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("`ctx.get(RUN_KEY)`", lambda: ctx.get(RUN_KEY)),
        (
            "`otel_context.attach(ctx)` + `detach(token)`",
            lambda: otel_context.detach(otel_context.attach(ctx)),
        ),
        (
            "`tracer.start_span(name, context=ctx).end()`, no attributes",
            lambda: tracer.start_span("p", context=ctx).end(),
        ),
        (
            "`tracer.start_span(name, context=ctx, attributes=<2>).end()`",
            lambda: tracer.start_span("p", context=ctx, attributes=START_ATTRS).end(),
        ),
        ("`span.set_attributes(<3>)` (dict)", lambda: live.set_attributes(end3)),
        ("`span.set_attribute(key, str)` (one)", lambda: live.set_attribute(attr.STEP_STATUS, "completed")),
        ("`isinstance(mappingproxy, Mapping)` (never cached on 3.12)", lambda: isinstance(proxy, Mapping)),
        ("`isinstance(dict, Mapping)`", lambda: isinstance(plain, Mapping)),
        ('`f"{span_id:016x}"` + `get_span_context()`', lambda: f"{live.get_span_context().span_id:016x}"),
        ("`StepStatus.COMPLETED.value` (enum property)", lambda: StepStatus.COMPLETED.value),
        ("`with threading.RLock(): pass`", lambda: _with(run._lock)),
    ]
    for name, fn in _optional_cases(ctx, ended, foreign):
        cases.append((name, fn))
    rows = []
    for name, fn in cases:
        number = 20_000
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        rows.append([name, f"{best * 1e6:.3f}"])
    live.end()
    return markdown_table(["operation", "µs (best of 5 x 20,000)"], rows, "lr")


def _optional_cases(ctx: Context, own: Any, foreign: Any) -> list[tuple[str, Callable[[], Any]]]:
    """Cases that use multirun internals; skipped if those moved."""
    cases: list[tuple[str, Callable[[], Any]]] = []
    try:
        from multirun._keys import run_in
    except ImportError:
        pass
    else:
        cases.append(("`multirun._keys.run_in(ctx)` (helper + `typing.cast`)", lambda: run_in(ctx)))
    try:
        from multirun.enforcement.processor import UsageSpanProcessor, usage_from_attributes
    except ImportError:
        return cases
    keys = frozenset(
        {
            attr.GEN_AI_USAGE_INPUT_TOKENS,
            attr.GEN_AI_USAGE_OUTPUT_TOKENS,
            attr.GEN_AI_USAGE_PROMPT_TOKENS,
            attr.GEN_AI_USAGE_COMPLETION_TOKENS,
            attr.LLM_TOKEN_COUNT_PROMPT,
            attr.LLM_TOKEN_COUNT_COMPLETION,
        }
    )
    processor = UsageSpanProcessor()
    cases += [
        (
            "`usage_from_attributes(span.attributes)`, span without usage",
            lambda: usage_from_attributes(foreign.attributes or {}),
        ),
        (
            "`USAGE_KEYS.isdisjoint(span.attributes)` (a pre-check)",
            lambda: keys.isdisjoint(foreign.attributes),
        ),
        ("`UsageSpanProcessor.on_end(own step span)` (lock + pop)", lambda: processor.on_end(own)),
    ]
    return cases


# ---------------------------------------------------------------------------
# 4: what if the step span carried its attributes differently


def hand_step(
    tracer: Tracer, start: Callable[[Context], Span], finish: Callable[[Span], None]
) -> Callable[[], None]:
    """A hand-written step span: what ``@step`` does with the span and context, nothing else."""

    def call() -> None:
        current = otel_context.get_current()
        span = start(current)
        ctx = Context(current)
        dict.__setitem__(ctx, _SPAN_KEY, span)
        dict.__setitem__(ctx, STEP_KEY, None)
        token = otel_context.attach(ctx)
        try:
            pass  # the step body
        finally:
            otel_context.detach(token)
        finish(span)
        span.end()

    return call


def what_if(run: RunContext, provider: Any, rounds: int = 20, batch: int = 2000) -> str:
    """Interleaved rounds of hand-written spans with other attribute layouts, and the real @step."""
    tracer = run.client.tracer
    name = "step profiled_step"

    def with_start(cur: Context) -> Span:
        return tracer.start_span(name, context=cur, attributes=START_ATTRS)

    def bare(cur: Context) -> Span:
        return tracer.start_span(name, context=cur)

    def end3(span: Span) -> None:
        span.set_attributes(
            {
                attr.STEP_ID: f"{span.get_span_context().span_id:016x}",
                attr.STEP_STATUS: "completed",
                attr.STEP_ATTEMPT: 1,
            }
        )

    def end_status(span: Span) -> None:
        span.set_attribute(attr.STEP_STATUS, "completed")

    def end_all5(span: Span) -> None:
        span.set_attributes(
            {
                **START_ATTRS,
                attr.STEP_ID: f"{span.get_span_context().span_id:016x}",
                attr.STEP_STATUS: "completed",
                attr.STEP_ATTEMPT: 1,
            }
        )

    def nothing(span: Span) -> None:
        return None

    variants: dict[str, Callable[[], None]] = {
        "hand-written, 2 attributes at start (name, kind) + 3 at end (id, status, attempt)": hand_step(
            tracer, with_start, end3
        ),
        "hand-written, no attributes at all": hand_step(tracer, bare, nothing),
        "hand-written, 2 at start + `set_attribute(status)` (no id, attempt only when > 1)": hand_step(
            tracer, with_start, end_status
        ),
        "hand-written, the same 5 attributes in one dict at end": hand_step(tracer, bare, end_all5),
        "`@step` as it is": profiled_step,
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    ctx = run.otel_context
    for round_no in range(rounds + 2):
        for key, fn in variants.items():
            provider.force_flush()
            gc.collect()
            token = otel_context.attach(ctx)
            try:
                start = time.perf_counter_ns()
                for _ in range(batch):
                    fn()
                elapsed = time.perf_counter_ns() - start
            finally:
                otel_context.detach(token)
            if round_no >= 2:
                samples[key].append(elapsed / batch / 1000)
    base_key = next(iter(variants))
    base = samples[base_key]
    rows = [
        [
            key,
            f"{statistics.median(values):.2f}",
            "-"
            if key == base_key
            else f"{statistics.median([a - b for a, b in zip(values, base, strict=True)]):+.2f}",
        ]
        for key, values in samples.items()
    ]
    return markdown_table(
        ["variant", "median µs / call", "Δ µs vs the first row (paired median)"], rows, "lrr"
    )


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="profiled calls (default 200000)")
    parser.add_argument("--top", type=int, default=30, help="rows of the hot-spot table")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the what-if comparison")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)

    provider, exporter = make_provider(max_queue_size=65_536)
    client = init_multirun(provider)
    run = RunContext(client, Run(name="profile"))
    token = otel_context.attach(run.otel_context)
    try:
        loop(2000)  # warm-up
        real_us = per_call_us(min(args.calls, 20_000))
        stats = profile(args.calls)
        provider.force_flush()
        exported = exporter.total
        step_keys = exporter.attribute_keys.get("step profiled_step", ())
        table, summary = hot_spots(stats, args.calls, real_us, args.top)
        primitives = primitive_costs(run)
        gc.collect()
        gc.freeze()
        comparison = what_if(run, provider, rounds=args.rounds)
    finally:
        otel_context.detach(token)
        run.complete()
        provider.force_flush()
        provider.shutdown()

    entries: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    profiled_total = sum(v[2] for v in entries.values())
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    lines = [
        *environment_header("Profile of the sync @step path", shown),
        f"{args.calls:,} calls of a sync `@step` no-op inside one run, under cProfile "
        f"({profiled_total / args.calls * 1e6:.1f} µs per step profiled, "
        f"{real_us:.1f} µs per step without the profiler). Spans exported by then: {exported:,}.",
        "",
        "## 1. Own time by package",
        "",
        summary,
        "",
        f"## 2. Top {args.top} functions by own time",
        "",
        "*~ real µs / step* = share of the profiled own time x the unprofiled time per step. "
        "The profiler's per-call cost is spread over all entries, so the estimate is high for "
        "tiny Python functions and low for C built-ins; read it as a ranking, and the "
        "prices in part 3 as prices. `stdlib/other` is mostly `abc.__instancecheck__`, "
        "`typing.cast` and `enum` properties, called on behalf of the two packages.",
        "",
        table,
        "",
        "## 3. Prices of single operations (no profiler)",
        "",
        primitives,
        "",
        "## 4. What if the step span carried its attributes differently",
        "",
        f"Interleaved rounds ({args.rounds} x 2,000 calls each, inside the run): a hand-written "
        "span that does what `@step` does with the span and the context (start, one context "
        "copy, attach, detach, end), with different attribute layouts, then the real `@step`. "
        "The difference between the first and the last row is the cost of multirun's own "
        "bookkeeping (step object, run/agent look-ups, ledger, budget and policy checks, "
        "history, wrapper), plus any attribute the real step writes beyond these five. "
        f"The real `@step` span carries {len(step_keys)} attributes: "
        + ", ".join(f"`{k}`" for k in step_keys)
        + ".",
        "",
        comparison,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = write_result("profile.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
