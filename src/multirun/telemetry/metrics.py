"""Metrics of runs, steps, tokens, cost, budgets, policy and checkpoints, through the OTel metrics API.

Usage::

    from opentelemetry import metrics as otel_metrics
    from multirun.telemetry.metrics import Metrics

    metrics = Metrics(otel_metrics.get_meter("multirun"))  # the application's MeterProvider

    metrics.run_started("research")
    metrics.step_finished("research", "planner", "function", "completed", 0.002)
    metrics.llm_call_finished("chat", "openai", "gpt-4o", "gpt-4o-2024-08-06", 1.7)
    metrics.usage_reported(
        run_name="research", agent_name="planner", operation="chat", provider="openai",
        request_model="gpt-4o", response_model="gpt-4o-2024-08-06",
        input_tokens=1200, output_tokens=300, cost_usd=0.006,
    )
    metrics.run_finished("research", "completed", {"max_cost_usd": 0.42})

Every event is one method call. ``NoMetrics()`` has the same methods and does nothing.

Instruments: name, kind, unit, and the Prometheus name (translation below):

- ``gen_ai.client.token.usage``: Histogram, ``{token}``: ``gen_ai_client_token_usage``
- ``gen_ai.client.operation.duration``: Histogram, ``s``: ``gen_ai_client_operation_duration_seconds``
- ``multirun.cost``: Counter, ``usd``: ``multirun_cost_usd_total``
- ``multirun.tokens``: Counter, ``{token}``: ``multirun_tokens_total``
- ``multirun.runs``: Counter, ``{run}``: ``multirun_runs_total``
- ``multirun.runs.active``: UpDownCounter, ``{run}``: ``multirun_runs_active``
- ``multirun.steps``: ObservableCounter, ``{step}``: ``multirun_steps_total``
- ``multirun.step.duration``: Histogram, ``s``: ``multirun_step_duration_seconds``
- ``multirun.budget.exceeded``: Counter, ``{event}``: ``multirun_budget_exceeded_total``
- ``multirun.budget.utilization``: Histogram, ``1``: ``multirun_budget_utilization``
- ``multirun.policy.decisions``: ObservableCounter, ``{decision}``: ``multirun_policy_decisions_total``
- ``multirun.checkpoint.size``: Histogram, ``By``: ``multirun_checkpoint_size_bytes``
- ``multirun.checkpoint.duration``: Histogram, ``s``: ``multirun_checkpoint_duration_seconds``
- ``multirun.spans.dropped``: ObservableCounter, ``{span}``: ``multirun_spans_dropped_total``, by
  ``error.type`` (``queue_full``, ``export_failed``, ``shutdown``; see ``multirun.telemetry.export``)

(a histogram is the ``_bucket``, ``_sum`` and ``_count`` series of that name).

The Prometheus translation (OpenTelemetry's Prometheus compatibility spec, as
implemented by the Collector's exporters, Prometheus' OTLP receiver with the
default ``UnderscoreEscapingWithSuffixes``, and the Python Prometheus exporter):
dots become underscores; the unit is appended unless it is an annotation in
braces (``{token}`` is dropped) or ``1`` (dropped, ``_ratio`` only for
gauges); known UCUM units are spelled out (``s`` -> ``seconds``, ``By`` ->
``bytes``) and unknown ones are kept as written, so ``usd`` stays ``usd``;
monotonic sums (counters) get ``_total``. Hence ``multirun.cost`` with unit
``usd`` is ``multirun_cost_usd_total`` (``multirun.cost_usd_total`` where
Prometheus is set to keep UTF-8 names, ``NoUTF8EscapingWithSuffixes``).

Attributes are low-cardinality only: run name (``gen_ai.workflow.name``),
agent name, provider, models, step kind, status, budget limit, policy decision
and rule, error type. Never a run id or step id. A ``None`` value leaves the
attribute out.

Cost of a call. A synchronous SDK ``add``/``record`` costs 5-14 microseconds
(attribute hashing, locks, exemplar sampling), more than the whole per-step
budget of the package. So the events of EVERY step are counted locally, in
dicts keyed by the attribute values and updated under a lock (a fraction of a
microsecond), and exported by ``ObservableCounter`` callbacks as cumulative
totals: ``step_finished`` (``multirun.steps``) and ``policy_decision``
(``multirun.policy.decisions``). Rare events use synchronous instruments, so
that the SDK's trace-based exemplar filter links each measurement to the span
current when it was recorded (or to ``context=`` when given): usage reports,
LLM call durations, run start and end, budget exceeded, checkpoints.

``multirun.step.duration`` is recorded synchronously only for LLM-call,
tool-call and sub-agent steps (not when served from the replay cache,
``skipped``), and for failed steps of any kind. These are the steps whose
latency matters and varies (a remote call, another agent, a timeout), they are
slow or rare (milliseconds to minutes, so 10 microseconds is noise), and their
exemplars lead from a slow bucket, or a failure, straight to its trace. Plain
function steps that succeed are counted, not timed: they can run hundreds of
thousands of times a second, their latency is the caller's own code, and
timing them would cost more than the rest of the step. Their latency is on
their spans.

``multirun.tokens``, ``multirun.runs`` and ``multirun.runs.active`` are
counted locally too: each synchronous measurement costs ~30 us in the SDK (an
LLM step made seven, a run three); the token counts' exemplars would repeat
those of ``multirun.cost``, which stays synchronous and carries them.

Policy decisions (``wait``, ``fallback``, ``abort``; a step that proceeds is
not counted, ``multirun.steps`` counts it) are all counted locally, aborts
included: one metric holds every decision, and the SDK cannot export a
synchronous and an observable instrument under one name.
The trace of an abort is reachable through the exemplar of
``multirun.budget.exceeded`` and the span attribute ``multirun.policy.decision``.

Budget utilization is used/limit per limit at run end; it can exceed 1 by the
bounded overshoot of steps already in flight, and is recorded as it is.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.util.types import AttributeValue

from multirun.telemetry import attributes as attr
from multirun.telemetry.export import DROPPED, DROPPED_SPANS

BUDGET_LIMIT = attr.BUDGET_LIMIT
OTEL_METRIC_OVERFLOW = attr.OTEL_METRIC_OVERFLOW
TOKEN_TYPE_INPUT = attr.TOKEN_TYPE_INPUT
TOKEN_TYPE_OUTPUT = attr.TOKEN_TYPE_OUTPUT

# Metric names
GEN_AI_CLIENT_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
GEN_AI_CLIENT_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
COST: Final = "multirun.cost"
TOKENS: Final = "multirun.tokens"
RUNS: Final = "multirun.runs"
RUNS_ACTIVE: Final = "multirun.runs.active"
STEPS: Final = "multirun.steps"
STEP_DURATION: Final = "multirun.step.duration"
BUDGET_EXCEEDED: Final = "multirun.budget.exceeded"
BUDGET_UTILIZATION: Final = "multirun.budget.utilization"
POLICY_DECISIONS: Final = "multirun.policy.decisions"
CHECKPOINT_SIZE: Final = "multirun.checkpoint.size"
CHECKPOINT_DURATION: Final = "multirun.checkpoint.duration"

# Bucket boundaries. The two GenAI ones are those the semantic conventions prescribe.
TOKEN_USAGE_BUCKETS: Final[Sequence[float]] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
OPERATION_DURATION_BUCKETS: Final[Sequence[float]] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
STEP_DURATION_BUCKETS: Final[Sequence[float]] = (
    0.001, 0.005, *OPERATION_DURATION_BUCKETS, 163.84, 327.68, 655.36,
)  # fmt: skip
CHECKPOINT_DURATION_BUCKETS: Final[Sequence[float]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip
CHECKPOINT_SIZE_BUCKETS: Final[Sequence[float]] = tuple(float(4**n) for n in range(4, 15))  # 256 B .. 256 MiB
UTILIZATION_BUCKETS: Final[Sequence[float]] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0,
)  # fmt: skip

# Steps of these kinds are timed (multirun.step.duration) unless skipped; so is every failed step.
TIMED_STEP_KINDS: Final = frozenset({"llm_call", "tool_call", "sub_agent"})
_FAILED: Final = "failed"
_SKIPPED: Final = "skipped"

DEFAULT_SERIES_LIMIT: Final = 2000
"""Distinct attribute sets a metric keeps; more fold into one overflow series."""

_Attributes = dict[str, AttributeValue]
_OVERFLOW: Final[_Attributes] = {OTEL_METRIC_OVERFLOW: True}


class _Tally:
    """Cumulative counts by attribute values, updated under a lock, read by an observable counter.

    The counts are nested dicts, one level per attribute
    (``root[run][agent][kind][status]``): the hot path then hashes strings,
    whose hashes are cached, instead of building and hashing a tuple, which
    halves the cost of the lookup. ``Metrics.step_finished`` and ``policy_decision``
    increment a leaf inline; a combination not seen before raises KeyError
    and goes through ``first``, which applies the series limit and builds the
    attribute dict once.
    """

    __slots__ = ("__weakref__", "limit", "lock", "names", "overflow", "overflowed", "root", "series")

    def __init__(self, names: tuple[str, ...], limit: int) -> None:
        self.names = names
        self.limit = limit
        self.lock = threading.Lock()
        _live_tallies.add(self)
        self.root: dict[Any, Any] = {}
        # per series: its attributes, the innermost dict holding its count, and the key there
        self.series: list[tuple[_Attributes, dict[Any, int], object]] = []
        self.overflow = 0  # counts of combinations beyond the limit
        # once used, the overflow series is exported at 0 too (runs in progress that ended):
        # a series left out of a collection keeps its last value in the backend
        self.overflowed = False

    def first(self, values: tuple[object, ...], amount: int = 1) -> None:
        """Count a combination not seen before. Call with ``lock`` held."""
        if len(self.series) >= self.limit:
            self.overflow += amount
            self.overflowed = True
            return
        node = self.root
        for value in values[:-1]:
            node = node.setdefault(value, {})
        last = values[-1]
        new = last not in node
        node[last] = node.get(last, 0) + amount
        if new:
            self.series.append((_attributes(self.names, values), node, last))

    def add(self, values: tuple[object, ...], amount: int) -> None:
        """Add ``amount`` to the series of ``values`` (for the hot paths that do not inline it)."""
        with self.lock:
            node = self.root
            try:
                for value in values[:-1]:
                    node = node[value]
                node[values[-1]] += amount
            except KeyError:
                self.first(values, amount)

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        """The cumulative count of every series (the callback of the observable counter)."""
        with self.lock:
            snapshot = [(attributes, node[last]) for attributes, node, last in self.series]
            if self.overflowed:
                snapshot.append(({OTEL_METRIC_OVERFLOW: True}, self.overflow))
        return [Observation(value, attributes) for attributes, value in snapshot]

    def total(self) -> int:
        with self.lock:
            return sum(node[last] for _, node, last in self.series) + self.overflow

    def clear(self) -> None:
        """Count every series from zero again."""
        with self.lock:
            self.root, self.series, self.overflow, self.overflowed = {}, [], 0, False


class _Capped:
    """A synchronous instrument whose attribute sets are capped at ``limit``.

    The Python SDK keeps every attribute set it is given for the life of the
    process (it has no cardinality limit), and agent, run and model names can be
    made per request. Past the limit, new sets are recorded under
    ``otel.metric.overflow=true``, as the metrics specification asks of SDKs
    that have one. ``seen`` is shared by the ``Metrics`` of one meter.

    Measurements come as attribute values, in the order of ``names`` (``None``
    leaves an attribute out): the set of each combination is built and capped
    once and kept, since building it again cost more than the SDK's no-op
    record (about 1.5 microseconds a set, several sets per model call).
    """

    __slots__ = ("_instrument", "_limit", "_names", "_seen", "_sets")

    def __init__(
        self,
        instrument: Histogram | Counter,
        names: tuple[str, ...],
        seen: set[tuple[Any, ...]],
        limit: int,
    ) -> None:
        self._instrument = instrument
        self._names = names
        self._seen = seen
        self._limit = limit
        self._sets: dict[tuple[object, ...], _Attributes] = {}

    def _attributes(self, values: tuple[object, ...]) -> _Attributes:
        found = self._sets.get(values)
        if found is None:
            found = self._capped(_attributes(self._names, values))
            if len(self._sets) < self._limit:  # past it, the set is the overflow one anyway
                self._sets[values] = found
        return found

    def _capped(self, attributes: _Attributes) -> _Attributes:
        key = tuple(attributes.items())
        seen = self._seen
        if key in seen:
            return attributes
        if len(seen) >= self._limit:
            return _OVERFLOW
        seen.add(key)  # two threads may both add the last free set: the limit is that, or one over
        return attributes

    def record(self, amount: float, values: tuple[object, ...], context: Context | None = None) -> None:
        self._instrument.record(amount, self._attributes(values), context)  # type: ignore[union-attr]

    def add(self, amount: float, values: tuple[object, ...], context: Context | None = None) -> None:
        self._instrument.add(amount, self._attributes(values), context)  # type: ignore[union-attr]


class _Tallies:
    """The locally counted metrics of one meter, shared by every ``Metrics`` built on it.

    The SDK returns the existing instrument when an observable counter is
    created twice on a meter, and drops the second one's callbacks; sharing
    the tallies keeps the counts of a second ``Metrics`` (a second ``init``)
    in the series that are exported.
    """

    def __init__(self, limit: int) -> None:
        self.steps = _Tally(
            (attr.GEN_AI_WORKFLOW_NAME, attr.GEN_AI_AGENT_NAME, attr.STEP_KIND, attr.STEP_STATUS), limit
        )
        self.decisions = _Tally((attr.GEN_AI_WORKFLOW_NAME, attr.POLICY_DECISION, attr.POLICY_RULE), limit)
        self.runs = _Tally((attr.GEN_AI_WORKFLOW_NAME, attr.RUN_STATUS), limit)
        self.runs_active = _Tally((attr.GEN_AI_WORKFLOW_NAME,), limit)
        self.tokens = _Tally(
            (
                attr.GEN_AI_WORKFLOW_NAME,
                attr.GEN_AI_AGENT_NAME,
                attr.GEN_AI_PROVIDER_NAME,
                attr.GEN_AI_REQUEST_MODEL,
                attr.GEN_AI_RESPONSE_MODEL,
                attr.GEN_AI_TOKEN_TYPE,
            ),
            limit,
        )
        self.limit = limit
        # the attribute sets of each synchronous instrument (the SDK gives a second Metrics on
        # this meter the same instrument objects)
        self.seen: dict[Histogram | Counter, set[tuple[Any, ...]]] = {}

    def capped(self, instrument: Histogram | Counter, names: tuple[str, ...]) -> _Capped:
        return _Capped(instrument, names, self.seen.setdefault(instrument, set()), self.limit)


_tallies_by_meter: weakref.WeakKeyDictionary[Meter, _Tallies] = weakref.WeakKeyDictionary()
_tallies_lock = threading.Lock()
_live_tallies: weakref.WeakSet[_Tally] = weakref.WeakSet()  # added to under _tallies_lock


def _fresh_locks_after_fork() -> None:
    """In a forked child: new locks, since a thread the child lost may have held one
    (its first step would wait for it for ever)."""
    global _tallies_lock
    _tallies_lock = threading.Lock()
    for tally in list(_live_tallies):
        tally.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_after_fork)


def forget_counts(meter: Meter) -> None:
    """Count what the ``Metrics`` on ``meter`` count locally from zero again: in a forked child
    whose metrics are those of a new instance, the counts copied from the parent are not its own."""
    with _tallies_lock:
        tallies = _tallies_by_meter.get(meter)
    if tallies is not None:
        for tally in (tallies.steps, tallies.decisions, tallies.runs, tallies.runs_active, tallies.tokens):
            tally.clear()


def _tallies_of(meter: Meter, limit: int) -> tuple[_Tallies, bool]:
    """The tallies of ``meter`` and whether they were created by this call."""
    with _tallies_lock:
        try:
            found = _tallies_by_meter.get(meter)
            if found is not None:
                return found, False
            tallies = _tallies_by_meter[meter] = _Tallies(limit)
        except TypeError:  # a meter that cannot be weakly referenced: its counts are not shared
            tallies = _Tallies(limit)
        return tallies, True


class Metrics:
    """The instruments of multirun on one ``Meter``; one method per event.

    Args:
        meter: from the application's MeterProvider, e.g.
            ``provider.get_meter("multirun", version)``.
        series_limit: distinct attribute sets kept per metric; beyond it, new
            sets are recorded under ``otel.metric.overflow=true``.

    Every ``Metrics`` on the same meter counts steps and decisions into the
    same tallies (the first one's ``series_limit`` applies), since the SDK
    keeps only the first callback of an observable instrument.
    """

    def __init__(self, meter: Meter, *, series_limit: int = DEFAULT_SERIES_LIMIT) -> None:
        if isinstance(series_limit, bool) or not isinstance(series_limit, int) or series_limit < 1:
            raise ValueError(f"series_limit must be an int >= 1, got {series_limit!r}")
        tallies, created = _tallies_of(meter, series_limit)
        self._steps = tallies.steps
        self._decisions = tallies.decisions
        self._tokens = tallies.tokens
        self._runs = tallies.runs
        self._runs_active = tallies.runs_active
        if created:
            meter.create_observable_counter(
                STEPS,
                [tallies.steps.observe],
                unit="{step}",
                description="Steps finished, by kind and status.",
            )
            meter.create_observable_counter(
                POLICY_DECISIONS,
                [tallies.decisions.observe],
                unit="{decision}",
                description="Policy decisions taken before steps, by decision and rule.",
            )
            meter.create_observable_counter(
                RUNS, [tallies.runs.observe], unit="{run}", description="Runs finished, by status."
            )
            meter.create_observable_up_down_counter(
                RUNS_ACTIVE, [tallies.runs_active.observe], unit="{run}", description="Runs in progress."
            )
            meter.create_observable_counter(
                TOKENS,
                [tallies.tokens.observe],
                unit="{token}",
                description="Tokens of model calls, by token type.",
            )
            meter.create_observable_counter(
                DROPPED_SPANS,
                [DROPPED.observe],
                unit="{span}",
                description="Spans the export pipeline dropped, by error.type.",
            )

        def histogram(
            name: str, unit: str, description: str, buckets: Sequence[float], names: tuple[str, ...]
        ) -> _Capped:
            made = meter.create_histogram(
                name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
            )
            return tallies.capped(made, names)

        models = (attr.GEN_AI_PROVIDER_NAME, attr.GEN_AI_REQUEST_MODEL, attr.GEN_AI_RESPONSE_MODEL)
        run_and_limit = (attr.GEN_AI_WORKFLOW_NAME, BUDGET_LIMIT)
        self._token_usage = histogram(
            GEN_AI_CLIENT_TOKEN_USAGE,
            "{token}",
            "Number of input and output tokens used.",
            TOKEN_USAGE_BUCKETS,
            (*models, attr.GEN_AI_OPERATION_NAME, attr.GEN_AI_TOKEN_TYPE),
        )
        self._operation_duration = histogram(
            GEN_AI_CLIENT_OPERATION_DURATION,
            "s",
            "GenAI operation duration.",
            OPERATION_DURATION_BUCKETS,
            (attr.GEN_AI_OPERATION_NAME, *models, attr.ERROR_TYPE),
        )
        self._cost = tallies.capped(
            meter.create_counter(COST, unit="usd", description="Cost of model calls, in US dollars."),
            (*models, attr.GEN_AI_WORKFLOW_NAME, attr.GEN_AI_AGENT_NAME),
        )
        self._step_duration = histogram(
            STEP_DURATION,
            "s",
            "Duration of LLM-call, tool-call and sub-agent steps, and of failed steps.",
            STEP_DURATION_BUCKETS,
            (*tallies.steps.names, attr.ERROR_TYPE),
        )
        self._budget_exceeded = tallies.capped(
            meter.create_counter(
                BUDGET_EXCEEDED, unit="{event}", description="Budget limits exceeded, by limit."
            ),
            run_and_limit,
        )
        self._budget_utilization = histogram(
            BUDGET_UTILIZATION,
            "1",
            "Share of each budget limit a run used (used / limit), at run end.",
            UTILIZATION_BUCKETS,
            run_and_limit,
        )
        self._checkpoint_size = histogram(
            CHECKPOINT_SIZE,
            "By",
            "Size of checkpoints written.",
            CHECKPOINT_SIZE_BUCKETS,
            (attr.GEN_AI_WORKFLOW_NAME,),
        )
        self._checkpoint_duration = histogram(
            CHECKPOINT_DURATION,
            "s",
            "Time to serialize and store a checkpoint.",
            CHECKPOINT_DURATION_BUCKETS,
            (attr.GEN_AI_WORKFLOW_NAME,),
        )

    # -- every step: counted locally ------------------------------------------------

    def step_finished(
        self,
        run_name: str | None,
        agent_name: str | None,
        kind: str,
        status: str,
        duration_s: float,
        error_type: str | None = None,
        context: Context | None = None,
    ) -> None:
        """A step ended. Counted locally; timed (synchronously) if LLM/tool/sub-agent or failed.

        ``kind`` and ``status`` may be the enums (``StepKind``, ``StepStatus``);
        their values become the attributes. ``context`` is that of the step's
        span, for the exemplar of a timed step (default: the current context).
        """
        steps = self._steps
        lock = steps.lock
        lock.acquire()  # acquire/release: cheaper than ``with`` on CPython 3.12
        try:
            try:
                steps.root[run_name][agent_name][kind][status] += 1
            except KeyError:
                steps.first((run_name, agent_name, kind, status))
        finally:
            lock.release()
        if (kind in TIMED_STEP_KINDS and status != _SKIPPED) or status == _FAILED:
            self._step_duration.record(duration_s, (run_name, agent_name, kind, status, error_type), context)

    def policy_decision(self, run_name: str | None, decision: str, rule: str | None = None) -> None:
        """The enforcer decided before a step (``proceed``, ``wait``, ``fallback``, ``abort``)."""
        decisions = self._decisions
        lock = decisions.lock
        lock.acquire()
        try:
            try:
                decisions.root[run_name][decision][rule] += 1
            except KeyError:
                decisions.first((run_name, decision, rule))
        finally:
            lock.release()

    # -- rare events: synchronous instruments, with exemplars -------------------------

    def usage_reported(
        self,
        *,
        run_name: str | None,
        agent_name: str | None,
        operation: str | None,
        provider: str | None,
        request_model: str | None,
        response_model: str | None,
        input_tokens: int | None,
        output_tokens: int | None,
        cost_usd: float | None,
        genai: bool = True,
        context: Context | None = None,
    ) -> None:
        """One model call's usage: ``gen_ai.client.token.usage``, ``multirun.tokens``, ``multirun.cost``.

        ``None`` tokens were not reported (nothing is recorded for them);
        ``cost_usd=None`` is unpriced (no cost is recorded, never $0). Pass
        ``genai=False`` when another instrumentation (openai-v2, OpenLLMetry)
        already recorded ``gen_ai.client.token.usage`` for this call.
        """
        for token_type, tokens in ((TOKEN_TYPE_INPUT, input_tokens), (TOKEN_TYPE_OUTPUT, output_tokens)):
            if tokens is None:
                continue
            if genai:
                self._token_usage.record(
                    tokens, (provider, request_model, response_model, operation, token_type), context
                )
            if tokens:
                self._tokens.add(
                    (run_name, agent_name, provider, request_model, response_model, token_type), tokens
                )
        if cost_usd:
            self._cost.add(cost_usd, (provider, request_model, response_model, run_name, agent_name), context)

    def llm_call_finished(
        self,
        operation: str,
        provider: str | None,
        request_model: str | None,
        response_model: str | None,
        duration_s: float,
        error_type: str | None = None,
        context: Context | None = None,
    ) -> None:
        """A model call ended: ``gen_ai.client.operation.duration`` (``error_type`` if it failed)."""
        self._operation_duration.record(
            duration_s, (operation, provider, request_model, response_model, error_type), context
        )

    def run_started(self, run_name: str | None, context: Context | None = None) -> None:
        """A run began: one more in ``multirun.runs.active``."""
        self._runs_active.add((run_name,), 1)

    def run_finished(
        self,
        run_name: str | None,
        status: str,
        utilization: Mapping[str, float] | None = None,
        context: Context | None = None,
    ) -> None:
        """A run ended (call once per ``run_started``).

        Args:
            status: the run's final status (``completed``, ``failed``, ...).
            utilization: used / limit of each budget limit of the run, by limit
                name (``{"max_cost_usd": 0.42}``).
        """
        self._runs_active.add((run_name,), -1)
        self._runs.add((run_name, status), 1)
        if utilization:
            for limit, ratio in utilization.items():
                self._budget_utilization.record(ratio, (run_name, limit), context)

    def budget_exceeded(self, run_name: str | None, limit: str, context: Context | None = None) -> None:
        """A budget limit was hit (``max_tokens``, ``max_cost_usd``, ``max_steps``, ...)."""
        self._budget_exceeded.add(1, (run_name, limit), context)

    def checkpoint_saved(
        self, run_name: str | None, size_bytes: int, duration_s: float, context: Context | None = None
    ) -> None:
        """A checkpoint was written: its size and how long serializing and storing took."""
        self._checkpoint_size.record(size_bytes, (run_name,), context)
        self._checkpoint_duration.record(duration_s, (run_name,), context)

    # -- for tests and diagnostics ----------------------------------------------------

    def local_totals(self) -> dict[str, int]:
        """Sums of the locally counted metrics, as the next collection will see them."""
        return {STEPS: self._steps.total(), POLICY_DECISIONS: self._decisions.total()}


class NoMetrics(Metrics):
    """Metrics that records nothing and costs one method call (no meter, no instruments).

    Every recording method is the same no-op (set below the class), so the
    signatures are those of Metrics and live in one place.
    """

    def __init__(self) -> None:  # no meter, no instruments
        pass

    def local_totals(self) -> dict[str, int]:
        return {STEPS: 0, POLICY_DECISIONS: 0}


def _record_nothing(self: Metrics, *args: Any, **kwargs: Any) -> None:
    return None


for _method in (
    "step_finished",
    "policy_decision",
    "usage_reported",
    "llm_call_finished",
    "run_started",
    "run_finished",
    "budget_exceeded",
    "checkpoint_saved",
):
    setattr(NoMetrics, _method, _record_nothing)


NO_METRICS: Final = NoMetrics()


# ---------------------------------------------------------------------------
# helpers


def _value(value: object) -> AttributeValue:
    """An attribute value: an Enum becomes its value (``StepKind.LLM_CALL`` -> ``llm_call``)."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (str, bool, int, float)):
        return value
    return str(value)


def _attributes(names: tuple[str, ...], values: tuple[object, ...]) -> _Attributes:
    return {name: _value(value) for name, value in zip(names, values, strict=True) if value is not None}
