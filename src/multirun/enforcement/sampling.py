"""Model calls in a run whose trace is sampled out are still recorded, for budgets.

The usage processor charges the usage other instrumentations (openai-v2, OpenLLMetry,
OpenInference) put on their spans, and sees only recorded spans. In a run whose trace the
sampler leaves out (a ratio sampler, ``always_off``, a caller's unsampled ``traceparent``) those
spans were not recorded, and their tokens reached no budget. ``record_model_calls_in_runs`` has
the provider's sampler turn its DROP into RECORD_ONLY for a GenAI span that starts inside a run:
the span reaches the span processors, and the SDK's export processors (which export only
sampled spans) still leave it out. multirun's own spans keep the decisions of the sampler as it
was made (``keep_own_spans_as_sampled``): the run shows as sampled out, as before.

Tracers hold the sampler object their provider had when they were made (openai-v2 makes its
own as it instruments, often before ``init``), so the sampler object itself is changed, in
place; the SDK's shared samplers (``ALWAYS_OFF`` and the parent-based defaults), which other
samplers use as their delegates, are not: the provider, and the tracers it has handed out
(when the SDK keeps them, as 1.45 does), get a wrapper of their own instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from multirun._keys import SPAN_KEY, run_in
from multirun.telemetry.proxies import sdk_tracer

_logger = logging.getLogger(__name__)

# On a sampler multirun changed: its own should_sample, which multirun's spans keep using.
_ORIGINAL = "_multirun_should_sample"
# The SDK's module-level samplers: other samplers use them as delegates (ParentBased's
# not-sampled parents go to ALWAYS_OFF), so they are never changed in place.
_SHARED = (ALWAYS_OFF, DEFAULT_ON, DEFAULT_OFF)
# A span starting with one of these is a GenAI operation: the GenAI conventions' names,
# OpenLLMetry's request type, OpenInference's span kind.
_GENAI_KEYS = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.system",
    "llm.request.type",
    "openinference.span.kind",
)
_DROP = Decision.DROP

ShouldSample = Callable[..., SamplingResult]


class _Delegating(Sampler):
    """A sampler of multirun's standing for one of the program's: its decisions come from
    ``should_sample`` (the program's sampler's), and it describes itself as that one does."""

    def __init__(self, should_sample: ShouldSample, description: str) -> None:
        self._should_sample = should_sample
        self._description = description

    def get_description(self) -> str:
        return self._description


class RecordingInRuns(_Delegating):
    """The decisions of ``should_sample``, except that a GenAI span it drops inside a run is
    recorded (not sampled: it is not exported)."""

    def __init__(self, should_sample: ShouldSample, description: str) -> None:
        super().__init__(should_sample, description)
        setattr(self, _ORIGINAL, should_sample)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if trace_state is None:  # as the SDK calls it: a sampler of its own may take no trace_state
            result = self._should_sample(parent_context, trace_id, name, kind, attributes, links)
        else:
            result = self._should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if result.decision is not _DROP or not attributes:
            return result  # the common case: one test
        return _recorded_if_a_model_call_in_a_run(result, parent_context, attributes)


def _recorded_if_a_model_call_in_a_run(
    result: SamplingResult, parent_context: Context | None, attributes: Any
) -> SamplingResult:
    try:
        if any(key in attributes for key in _GENAI_KEYS):
            ctx = parent_context if parent_context is not None else otel_context.get_current()
            if run_in(ctx) is not None:
                # the span starts with the attributes the sampler is given back (the SDK's
                # samplers give a dropped span none)
                return SamplingResult(Decision.RECORD_ONLY, attributes, result.trace_state)
    except Exception:  # the sampler's decision stands
        _logger.debug("multirun: could not tell whether span attributes name a model call", exc_info=True)
    return result


def record_model_calls_in_runs(provider: Any) -> None:
    """Have ``provider``'s sampler record the GenAI spans it drops inside a run; once per sampler."""
    try:
        _record_model_calls_in_runs(provider)
    except Exception:  # an odd sampler: it samples as it did, and budgets miss what it drops
        _logger.warning("multirun: could not have the sampler record model calls in runs", exc_info=True)


def _record_model_calls_in_runs(provider: Any) -> None:
    sampler = getattr(provider, "sampler", None)
    if not isinstance(sampler, Sampler) or sampler is ALWAYS_ON or hasattr(sampler, _ORIGINAL):
        return  # not an SDK provider's, never drops, or done already
    original = sampler.should_sample
    recording = RecordingInRuns(original, sampler.get_description())
    if all(sampler is not shared for shared in _SHARED):
        try:  # the tracers handed out already use this object
            sampler.should_sample = recording.should_sample  # type: ignore[method-assign]
            setattr(sampler, _ORIGINAL, original)
            return
        except (AttributeError, TypeError):  # a sampler with __slots__, or frozen
            pass
    provider.sampler = recording
    tracers = getattr(provider, "_tracers", None)  # the SDK's cache of the tracers handed out
    if isinstance(tracers, dict):
        for tracer in list(tracers.values()):
            if getattr(tracer, "sampler", None) is sampler:
                tracer.sampler = recording


class _AsMade(_Delegating):
    """A sampler's own decisions, as it made them before multirun changed it."""

    def __init__(self, should_sample: ShouldSample, description: str) -> None:
        super().__init__(should_sample, description)
        self.should_sample = should_sample  # type: ignore[method-assign]  # called directly: no extra call

    def should_sample(  # never called: each instance has the sampler's own
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        raise NotImplementedError


class _ChildrenOfSampledParentsSampled(_Delegating):
    """A ParentBased sampler that samples every child of a sampled local parent (the SDK's
    default), deciding for such a child without calling it.

    Every step span is such a child (of its run, agent or step), and the SDK's ParentBased
    looks the parent span up twice and builds its answer through two calls, about 1.5
    microseconds of a step's 21: here the parent is looked up once, and the answer is the
    one ParentBased would give (record and sample, the parent's trace state). Any other
    span goes to the sampler itself.
    """

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent: Any = parent_context.get(SPAN_KEY) if parent_context is not None else None
        if parent is not None:
            span_context = parent.get_span_context()
            if span_context.trace_flags & _SAMPLED and not span_context.is_remote and span_context.is_valid:
                return SamplingResult(_RECORD_AND_SAMPLE, attributes, span_context.trace_state)
        return self._should_sample(parent_context, trace_id, name, kind, attributes, links)


_SAMPLED = TraceFlags.SAMPLED
_RECORD_AND_SAMPLE = Decision.RECORD_AND_SAMPLE


def _samples_children_of_sampled_parents(should_sample: ShouldSample) -> bool:
    """Whether ``should_sample`` is the SDK's ParentBased decision (its subclasses' included) of a
    sampler that samples every child of a sampled local parent, as ALWAYS_ON does."""
    sampler = getattr(should_sample, "__self__", None)
    return (
        getattr(should_sample, "__func__", None) is ParentBased.should_sample
        and isinstance(sampler, ParentBased)
        and getattr(sampler, "_local_parent_sampled", None) is ALWAYS_ON
    )


def keep_own_spans_as_sampled(tracer: Any) -> None:
    """multirun's ``tracer`` samples as the application's sampler did before multirun changed it:
    a run the sampler leaves out shows so, its steps included (whatever GenAI names they carry).
    A ParentBased sampler's children of sampled spans are decided without calling it
    (``_ChildrenOfSampledParentsSampled``)."""
    tracer = sdk_tracer(tracer)
    if tracer is None:
        return
    sampler = tracer.sampler
    if isinstance(sampler, _ChildrenOfSampledParentsSampled):
        return  # installed already (ensure_installed calls again)
    original = getattr(sampler, _ORIGINAL, None)
    should_sample = original if original is not None else getattr(sampler, "should_sample", None)
    fast = should_sample is not None and _samples_children_of_sampled_parents(should_sample)
    if original is None and not fast:
        return
    try:
        description = sampler.get_description()
    except Exception:
        description = type(sampler).__name__
    assert should_sample is not None
    if fast:
        tracer.sampler = _ChildrenOfSampledParentsSampled(should_sample, description)
    else:
        tracer.sampler = _AsMade(should_sample, description)
