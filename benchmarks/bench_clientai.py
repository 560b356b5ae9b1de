"""Per-step overhead of ClientAIInstrumentor against a bare OpenTelemetry span per step.

A ClientAI step is run through ClientAI's own engine
(``StepExecutionEngine.execute_step``), exactly as ``Agent.run`` runs each
step, in these ways, interleaved in every round:

- *not instrumented*: ClientAI alone (the floor);
- *bare spans*: a hand-written wrapt wrapper opens one
  ``tracer.start_as_current_span`` around each step, and for an LLM step a
  second one, with the 5 GenAI attributes, around its ``generate_text`` call:
  the least a tracing instrumentation of ClientAI does;
- *ClientAIInstrumentor*: the instrumentation of this package, inside a run
  (policy and budget check, step span, LLM call span with usage read from the
  full response, priced, roll-ups, metrics);
- for the observe step also *``@multirun.step`` around it*: the package's own
  step decorator wrapped around ``execute_step``, the floor of any multirun
  step, so that what the instrumentation itself adds shows.

Two kinds of step: an ``@observe`` step that does not call the model (one
span), and a ``@think`` step that calls it once (two spans), with a model
that answers at once with one prebuilt OpenAI ``ChatCompletion``. The figure
is the overhead ratio: (instrumented - not instrumented) / (bare spans - not
instrumented), per round, then the median; the issue's target is 1.3x.

Usage::

    .venv/bin/python benchmarks/bench_clientai.py [--rounds 30] [--batch 1000]

Patching happens between batches, outside the timed region: each batch
installs its variant's wrappers (or the instrumentor), runs, and removes them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import wrapt
from clientai import ClientAI
from clientai.agent import Agent, observe, think
from clientai.openai.provider import Provider
from openai.types.chat import ChatCompletion
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import Tracer

import multirun
from _common import environment_header, init_multirun, make_provider, markdown_table, write_result
from multirun.context import RunContext
from multirun.integrations.clientai import ClientAIInstrumentor
from multirun.models.run import Run
from multirun.telemetry import attributes as attr

MODEL = "gpt-4o-mini"
RESPONSE = ChatCompletion.model_validate(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
)


# ---------------------------------------------------------------------------
# ClientAI, offline


class _Completions:
    def create(self, **request: Any) -> ChatCompletion:
        return RESPONSE


class InstantProvider(Provider):
    """ClientAI's OpenAI provider, with an SDK client that answers at once."""

    def __init__(self) -> None:
        self.client = SimpleNamespace(chat=SimpleNamespace(completions=_Completions()))


class BenchAgent(Agent):
    @observe("gather", send_to_llm=False)
    def gather(self, data: str) -> str:
        return data

    @think("analyze", use_tools=False)
    def analyze(self, data: str) -> str:
        return f"Analyze {data}"


def make_agent() -> BenchAgent:
    client: ClientAI = ClientAI("openai", api_key="sk-offline")
    client.provider = InstantProvider()
    agent = BenchAgent(client=client, default_model=MODEL)
    agent.execution_engine._current_agent = agent  # what WorkflowManager.execute sets for its steps
    return agent


# ---------------------------------------------------------------------------
# the bare-span variant: the least a tracing instrumentation of ClientAI does


def bare_step_wrapper(tracer: Tracer) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        with tracer.start_as_current_span("bare.step"):
            return wrapped(*args, **kwargs)

    return wrapper


def bare_llm_wrapper(tracer: Tracer) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        with tracer.start_as_current_span("bare.llm") as span:
            span.set_attribute(attr.GEN_AI_OPERATION_NAME, attr.OP_CHAT)
            span.set_attribute(attr.GEN_AI_REQUEST_MODEL, MODEL)
            span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, MODEL)
            span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, 10)
            span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 5)
            return wrapped(*args, **kwargs)

    return wrapper


STEP_PATH = ("clientai.agent.core.execution", "StepExecutionEngine", "execute_step")
LLM_PATH = ("clientai.client_ai", "ClientAI", "generate_text")


def install_bare(tracer: Tracer) -> Callable[[], None]:
    wrapt.wrap_function_wrapper(STEP_PATH[0], f"{STEP_PATH[1]}.{STEP_PATH[2]}", bare_step_wrapper(tracer))
    wrapt.wrap_function_wrapper(LLM_PATH[0], f"{LLM_PATH[1]}.{LLM_PATH[2]}", bare_llm_wrapper(tracer))

    def remove() -> None:
        for module, owner, name in (STEP_PATH, LLM_PATH):
            unwrap(getattr(sys.modules[module], owner), name)

    return remove


@multirun.step(name="gather", idempotent=False)
def _as_step(wrapped: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def install_step() -> Callable[[], None]:
    """multirun's own ``@step`` around each ClientAI step: the package's floor, for comparison."""
    wrapt.wrap_function_wrapper(
        STEP_PATH[0], f"{STEP_PATH[1]}.{STEP_PATH[2]}", lambda w, i, a, k: _as_step(w, a, k)
    )
    return lambda: unwrap(getattr(sys.modules[STEP_PATH[0]], STEP_PATH[1]), STEP_PATH[2])


def install_instrumentor() -> Callable[[], None]:
    instrumentor = ClientAIInstrumentor()
    instrumentor.instrument()
    return instrumentor.uninstrument


def install_nothing() -> Callable[[], None]:
    return lambda: None


# ---------------------------------------------------------------------------
# variants and measuring


@dataclass
class Variant:
    key: str  # "<step kind>/<way>"
    label: str
    install: Callable[[], Callable[[], None]]
    step: Any  # the ClientAI Step run by each call
    in_run: bool  # run inside the multirun run (else in an empty context)
    samples: list[float] = field(default_factory=list)  # µs per step, one per round


def run_batch(agent: BenchAgent, variant: Variant, run_ctx: Any, n: int) -> int:
    """Run the variant's step n times in its context; only the loop is timed."""
    remove = variant.install()
    token = otel_context.attach(run_ctx if variant.in_run else Context())
    try:
        execute = agent.execution_engine.execute_step
        step = variant.step
        clock = time.perf_counter_ns
        start = clock()
        for _ in range(n):
            execute(step, "data", stream=False)
        return clock() - start
    finally:
        otel_context.detach(token)
        remove()


def build(tracer: Tracer, agent: BenchAgent) -> list[Variant]:
    steps = agent.workflow_manager.get_steps()
    variants = []
    for kind, step in (("observe", steps["gather"]), ("think", steps["analyze"])):
        variants += [
            Variant(f"{kind}/plain", "not instrumented", install_nothing, step, in_run=False),
            # outside any run: multirun's UsageSpanProcessor would charge the bare LLM span's usage
            Variant(f"{kind}/bare", "bare spans", lambda: install_bare(tracer), step, in_run=False),
            Variant(f"{kind}/multirun", "ClientAIInstrumentor", install_instrumentor, step, in_run=True),
        ]
        if kind == "observe":
            variants.append(
                Variant(f"{kind}/step", "`@multirun.step` around it", install_step, step, in_run=True)
            )
    return variants


def measure(
    agent: BenchAgent, variants: list[Variant], ctx: Any, provider: Any, rounds: int, warmup: int, batch: int
) -> None:
    gc.collect()
    gc.freeze()
    for round_no in range(warmup + rounds):
        for variant in variants:
            provider.force_flush()
            gc.collect()
            elapsed = run_batch(agent, variant, ctx, batch)
            if round_no >= warmup:
                variant.samples.append(elapsed / batch / 1000)
        if round_no >= warmup and (round_no - warmup + 1) % 10 == 0:
            print(f"  round {round_no - warmup + 1}/{rounds}", file=sys.stderr)


def report(variants: list[Variant], exporter: Any, rounds: int, warmup: int, batch: int) -> str:
    by_key = {v.key: v for v in variants}
    rows = []
    summary = []
    for kind, spans_made in (("observe", "1 step span"), ("think", "1 step span + 1 LLM call span")):
        plain, bare, ours = (by_key[f"{kind}/{way}"] for way in ("plain", "bare", "multirun"))
        stepped = by_key.get(f"{kind}/step")
        for v in (plain, bare, ours, *([stepped] if stepped else [])):
            extra = [a - b for a, b in zip(v.samples, plain.samples, strict=True)]
            rows.append(
                [
                    f"`@{kind}` step",
                    v.label,
                    f"{statistics.median(v.samples):.2f}",
                    f"{_q(v.samples, 0.25):.2f} - {_q(v.samples, 0.75):.2f}",
                    "—" if v is plain else f"{statistics.median(extra):+.2f}",
                ]
            )
        for label, measured in ((f"`@{kind}` step ({spans_made})", ours), (_STEP_ROW, stepped)):
            if measured is not None:
                summary.append([label, *_ratios(measured, bare, plain)])
    timing = markdown_table(
        ["step", "variant", "median µs/step", "IQR µs", "Δ µs vs not instrumented"], rows, "llrrr"
    )
    ratio_table = markdown_table(
        [
            "step",
            "overhead ratio: instrumentation / bare spans (paired median)",
            "IQR",
            "whole step: instrumented / bare spans",
        ],
        summary,
        "lrrr",
    )
    counts = ", ".join(f"`{name}` x {count:,}" for name, count in sorted(exporter.by_name.items()))
    return "\n".join(
        [
            f"{batch:,} steps per batch, {rounds} timed rounds after {warmup} warm-up round(s); every round "
            "runs one batch of each variant in the order of the first table.",
            "",
            ratio_table,
            "",
            timing,
            "",
            "- *overhead ratio*: per round, (instrumented - not instrumented) / (bare spans - not "
            "instrumented), the median over rounds: what the instrumentation adds to a ClientAI step, "
            "in units of what bare spans add. The target of the issue is at most 1.3x.",
            "- *bare spans*: one `start_as_current_span` around `execute_step` and, for the think "
            "step, one more around `ClientAI.generate_text` that sets the 5 GenAI attributes "
            "(operation, request and response model, input and output tokens), as a hand-written "
            "instrumentation would. They run outside any run, as `bench_overhead.py`'s bare spans do "
            "(inside one, multirun's UsageSpanProcessor would price and charge the bare LLM span's "
            "usage, which is not the cost of a bare span).",
            "- *ClientAIInstrumentor*: every step runs inside one run (no budget, no policy), as "
            "inside `Agent.run`; the LLM call asks the provider for its full response, reads the "
            "usage, prices it (`gpt-4o-mini`, genai-prices) and returns the text.",
            "- *`@multirun.step` around it*: the package's own decorator (idempotent=False, as the "
            "instrumentation's steps) wrapped around `execute_step`: what any step of this package "
            "costs; the difference to the instrumented row is the instrumentation's own layer.",
            "- The model answers at once with one prebuilt OpenAI `ChatCompletion`; ClientAI's own "
            "engine (prompt building, model configuration, result validation, context update, its "
            "f-string log lines) is the floor of the *not instrumented* rows.",
            "",
            f"Spans exported (warm-up rounds included): {counts}.",
            "",
        ]
    )


_STEP_ROW = "for comparison: `@multirun.step` around the `@observe` step"


def _ratios(measured: Variant, bare: Variant, plain: Variant) -> list[str]:
    """Paired overhead ratio (median, IQR) and whole-step ratio of ``measured`` against ``bare``."""
    pairs = zip(measured.samples, bare.samples, plain.samples, strict=True)
    ratios = [(m - p) / (b - p) for m, b, p in pairs if b > p]
    totals = [m / b for m, b in zip(measured.samples, bare.samples, strict=True)]
    return [
        f"{statistics.median(ratios):.2f}x" if ratios else "n/a",
        f"{_q(ratios, 0.25):.2f} - {_q(ratios, 0.75):.2f}" if len(ratios) > 1 else "n/a",
        f"{statistics.median(totals):.3g}x",
    ]


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--batch", type=int, default=1000, help="steps per batch (default 1000)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.rounds < 4 or args.batch < 1:
        parser.error("--rounds must be >= 4 and --batch >= 1")

    provider, exporter = make_provider(max_queue_size=max(2048, 4 * args.batch))
    client = init_multirun(provider)
    tracer = provider.get_tracer("bench.bare")
    agent = make_agent()
    run = RunContext(client, Run(name="bench-clientai"))
    token = otel_context.attach(run.otel_context)  # the agent starts inside the run, as Agent.run does
    try:
        ctx = run.start_agent("BenchAgent").otel_context
    finally:
        otel_context.detach(token)
    variants = build(tracer, agent)
    try:
        print(
            f"bench_clientai: {len(variants)} variants x {args.rounds} rounds x {args.batch} steps",
            file=sys.stderr,
        )
        measure(agent, variants, ctx, provider, args.rounds, args.warmup, args.batch)
        run.complete()
        provider.force_flush()
        body = report(variants, exporter, args.rounds, args.warmup, args.batch)
    finally:
        provider.shutdown()
    shown = [__file__, *(sys.argv[1:] if argv is None else argv)]
    text = (
        "\n".join(environment_header("Overhead of ClientAIInstrumentor per ClientAI step", shown))
        + "\n"
        + body
    )
    print(text)
    if not args.no_write:
        path = write_result("clientai.md", text)
        print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
