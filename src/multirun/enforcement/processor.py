"""UsageSpanProcessor: charges the run for usage that other instrumentations report.

A step that calls an LLM SDK instrumented by opentelemetry-instrumentation-openai-v2,
OpenLLMetry or OpenInference gets a GenAI client span inside it, carrying
``gen_ai.usage.*`` (or ``llm.usage.*``, ``llm.token_count.*``) attributes. This processor notes,
when such a span starts, which run, agent and step it started in, and charges
that usage when it ends. A span with usage charged below it (on a foreign span,
or reported in a step, however deep) is not charged again, so wrappers that
copy their children's totals are not counted twice. The package's own spans are
skipped: their usage is charged when it is reported.

OpenInference, hand-made spans of the ``llm.usage.*`` names and OpenLLMetry's watsonx
instrumentation (which records metrics of its own names) record no GenAI metrics: for
their calls this processor records ``gen_ai.client.operation.duration`` (and the
token usage), once per call, a failed OpenInference call included. Whoever times a model
call, the LLM steps around it are told so, once, and do not time it again; a call its
instrumentation times is told when its span starts, since OpenLLMetry's Anthropic and
Groq instrumentations time a failed call but never end its span, and a stream's span
ends when the stream is read, perhaps after its step (one whose span names it a model
call only when it ends, by its usage, is told then). A stream abandoned half-read is
timed by its instrumentation when it cleans the stream up (OpenLLMetry's, when the
stream is collected), if ever; never by ``forget_run`` at its run's end: the call has
not ended then (it may still be read, after the run or by the caller of a sub-run), and
a duration up to the run's end would time the program, not the call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, StatusCode, set_span_in_context

from multirun._keys import agent_in, run_in, step_in
from multirun.pricing import provider_at
from multirun.telemetry import attributes as a
from multirun.usage import TokenUsage, is_cost, usable_count

_logger = logging.getLogger(__name__)

TRACER_NAME = "multirun"

# Foreign spans in flight at once, at most; past it the oldest are forgotten. Only spans that
# never end (a stream abandoned half-read, say) pile up, and a run drops its own when it ends:
# this bounds those of runs that never end.
MAX_OPEN_SPANS = 100_000


class UsageSpanProcessor(SpanProcessor):
    """Charges usage from spans of other instrumentations to the enclosing run."""

    # it does nothing with multirun's own spans: the guard on multirun's tracer skips it
    # (telemetry/guard.py), which saves three calls per step
    ignores_multirun_spans = True

    def __init__(self, max_open_spans: int = MAX_OPEN_SPANS) -> None:
        # span id -> [owner (step or agent), usage below is charged, its call (or one below) is
        # timed and the steps around it told so]; only spans in flight.
        # Each access is one dict or list operation, atomic without a lock: a span's entry is
        # written at its start, and read at its end, by the thread that ends it.
        self._open: dict[int, list[Any]] = {}
        self._max_open = max_open_spans
        self._evicting = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        scope = span.instrumentation_scope
        if scope is not None and scope.name == TRACER_NAME:
            return
        ctx = parent_context if parent_context is not None else otel_context.get_current()
        run = run_in(ctx)
        if run is None or run.client.usage_processor is not self:
            # a provider an earlier init() set up (the global one, still used by the SDKs that
            # trace through it) is not where this run's spans go: the run's own provider, or its
            # step reading the SDK's response, charges the call
            return
        owner = step_in(ctx) or agent_in(ctx) or run.default_agent
        if len(self._open) >= self._max_open:
            self._forget_oldest()
        entry = [owner, False, False]
        self._open[span.get_span_context().span_id] = entry
        try:
            if _is_call_timed_by_its_instrumentation(span.attributes or {}, scope):
                _note_call_timed(owner)
                entry[2] = True  # its end need not say it again
                self._parent_not_timed_again(span)
        except Exception:  # never let accounting break the user's span
            _logger.warning("multirun: could not note the call of span %r", span.name, exc_info=True)

    def forget_run(self, run: Any) -> None:
        """``run`` ended: its foreign spans still in flight, whose entries would keep it alive,
        go to the step (or agent) of the parent run that started it, or are dropped for a top run.

        Such a span never ends (an instrumented stream abandoned half-read), or ends later
        (a stream the sub-run returned, read by its caller): a parent still running pays for
        it, and the step it started in charges none of it from what the stream shows the step.
        Usually there is none, and this is one test of an empty dict.
        """
        open_spans = self._open
        if not open_spans:
            return
        parent = run.parent
        heir = parent is not None and not parent._finished and (run.parent_step or run.parent_agent)
        for span_id, entry in open_spans.copy().items():  # copy(): other threads add spans
            if entry[0].run_context is run:
                _usage_is_the_span_s(entry[0])
                if not heir:
                    open_spans.pop(span_id, None)
                else:
                    entry[0] = heir

    def charged_inside(self, owner: Any) -> None:
        """Usage was charged in ``owner`` (a step or an agent): the foreign spans around it that
        are still open are told so, through the package's own spans, and charge no copy of it."""
        open_spans = self._open
        if not open_spans:  # the common case: no foreign span in flight
            return
        from multirun.context import enclosing_spans  # context imports this package

        for span in enclosing_spans(owner):
            parent = getattr(span, "parent", None)  # a run continued from elsewhere has a remote one
            entry = open_spans.get(parent.span_id) if parent is not None else None
            if entry is not None:
                entry[1] = True

    def _forget_oldest(self) -> None:
        """Drop the oldest tenth of the entries: spans that never ended, as far as we can tell."""
        with self._evicting:
            try:
                oldest = list(itertools.islice(self._open, max(self._max_open // 10, 1)))
            except RuntimeError:  # another thread changed the dict meanwhile: try at the next span
                return
            for span_id in oldest:
                self._open.pop(span_id, None)

    def on_end(self, span: ReadableSpan) -> None:
        if not self._open:
            return  # no span of another instrumentation in flight: the common case, and ours
        scope = span.instrumentation_scope
        if scope is not None and scope.name == TRACER_NAME:
            return  # our own spans were never recorded in on_start
        context = span.get_span_context()
        if context is None:
            return
        entry = self._open.pop(context.span_id, None)
        if entry is None:
            return
        owner, reported_below, timed = entry
        attributes = span.attributes or {}
        usage = usage_from_attributes(attributes)
        try:
            if usage is None and not reported_below:
                if timed:
                    pass  # told when it started, or by the call below it
                elif _is_call_without_metrics(attributes):
                    # a call that reported no usage (it failed, say) still took its time
                    _time_call(span, owner, None, _operation(attributes))
                    timed = True
                elif _is_call_timed_by_its_instrumentation(attributes, scope):
                    _note_call_timed(owner)  # failed or not; named a model call only after it started
                    timed = True
                if timed:
                    self._parent_not_timed_again(span)
                return
            # tell the foreign ancestors that usage below them is charged, even through
            # spans that carry none of their own, so a wrapper copying totals is not charged again
            parent_entry = self._parent_entry(span)
            if parent_entry is not None:
                parent_entry[1] = True  # it passes the word on when it ends
            else:  # the parent is one of the package's spans: the foreign spans are further up
                self.charged_inside(owner)
            if usage is not None and not reported_below:
                metered = _is_metered(attributes, scope)
                operation = _operation(attributes)
                owner.charge_child_usage(
                    usage, metered=metered, call_id=_response_id(attributes), operation=operation
                )
                if not metered:
                    _time_call(span, owner, usage, operation)
                elif not timed:  # by the GenAI instrumentation that metered it: unless told at its start
                    _note_call_timed(owner)
        except Exception:  # never let accounting break the span pipeline
            _logger.warning("multirun: could not charge usage of span %r", span.name, exc_info=True)

    def _parent_entry(self, span: ReadableSpan) -> list[Any] | None:
        """The entry of the foreign span that is the parent of ``span``, if it is one in flight."""
        parent = span.parent
        return self._open.get(parent.span_id) if parent is not None else None

    def _parent_not_timed_again(self, span: ReadableSpan) -> None:
        """The call of ``span`` is timed: a foreign wrapper of the same call (its parent) is not."""
        parent_entry = self._parent_entry(span)
        if parent_entry is not None:
            parent_entry[2] = True

    def shutdown(self) -> None:
        self._open.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# The input and the output tokens, by the names of the GenAI conventions (then their older
# names), OpenLLMetry's first names and OpenInference: the first one set is read.
_INPUT_KEYS = (
    a.GEN_AI_USAGE_INPUT_TOKENS,
    a.GEN_AI_USAGE_PROMPT_TOKENS,
    a.LLM_USAGE_PROMPT_TOKENS,
    a.LLM_TOKEN_COUNT_PROMPT,
)
_OUTPUT_KEYS = (
    a.GEN_AI_USAGE_OUTPUT_TOKENS,
    a.GEN_AI_USAGE_COMPLETION_TOKENS,
    a.LLM_USAGE_COMPLETION_TOKENS,
    a.LLM_TOKEN_COUNT_COMPLETION,
)
_USAGE_KEYS = frozenset((*_INPUT_KEYS, *_OUTPUT_KEYS))
_GENAI_USAGE_KEYS = frozenset(key for key in _USAGE_KEYS if key.startswith("gen_ai."))
# OpenLLMetry's instrumentations that record metrics of their own names (llm.watsonx.completions.*),
# not the GenAI ones, although their spans name the call by llm.request.type
_SCOPES_WITHOUT_GENAI_METRICS = frozenset({"opentelemetry.instrumentation.watsonx"})

# The details, by the names of the GenAI conventions, OpenLLMetry and OpenInference (in that order).
# All of them count cached input inside the prompt tokens, as the conventions do; missed, cached
# input would be priced at the full input price.
_CACHE_READ_KEYS = (
    a.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    a.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS_OLD,
    a.LLM_TOKEN_COUNT_CACHE_READ,
)
_CACHE_WRITE_KEYS = (
    a.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    a.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS_OLD,
    a.LLM_TOKEN_COUNT_CACHE_WRITE,
)
_REASONING_KEYS = (
    a.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    a.GEN_AI_USAGE_REASONING_TOKENS_OLD,
    a.LLM_TOKEN_COUNT_REASONING,
)


def _is_call_without_metrics(attributes: Any) -> bool:
    """Whether a span with no usage is a model call that no instrumentation records metrics for:
    an OpenInference LLM or embeddings span, unless it also follows the GenAI conventions."""
    return (
        attributes.get(a.OPENINFERENCE_SPAN_KIND) in _OPENINFERENCE_CALLS
        and a.GEN_AI_OPERATION_NAME not in attributes
    )


_OPENINFERENCE_CALLS = frozenset({a.OPENINFERENCE_KIND_LLM, a.OPENINFERENCE_KIND_EMBEDDING})


def _operation(attributes: Any) -> str:
    """The ``gen_ai.operation.name`` of a call whose instrumentation records no GenAI metrics:
    ``embeddings`` for an OpenInference embeddings span, else ``chat``."""
    if attributes.get(a.OPENINFERENCE_SPAN_KIND) == a.OPENINFERENCE_KIND_EMBEDDING:
        return a.OP_EMBEDDINGS
    return a.OP_CHAT


def _records_genai_metrics(scope: InstrumentationScope | None) -> bool:
    """Whether the instrumentation of ``scope`` may record the GenAI metrics of its calls."""
    return scope is None or scope.name not in _SCOPES_WITHOUT_GENAI_METRICS


def _is_call_timed_by_its_instrumentation(attributes: Any, scope: InstrumentationScope | None) -> bool:
    """Whether a span is a model call that its instrumentation times in
    ``gen_ai.client.operation.duration``, failed or not: one of the GenAI conventions
    (openai-v2, OpenLLMetry), or one of OpenLLMetry's that names only its
    ``llm.request.type`` (a failed call's span may have no ``gen_ai.operation.name``)."""
    if not _records_genai_metrics(scope):
        return False
    operation = attributes.get(a.GEN_AI_OPERATION_NAME)
    if operation is not None:
        return operation in a.MODEL_CALL_OPERATIONS
    return attributes.get(a.LLM_REQUEST_TYPE) in a.MODEL_CALL_REQUEST_TYPES


def _is_metered(attributes: Any, scope: InstrumentationScope | None) -> bool:
    """Whether the instrumentation of a span with usage recorded ``gen_ai.client.token.usage``
    and ``gen_ai.client.operation.duration`` for its call: one that writes the ``gen_ai.usage.*``
    names (openai-v2, OpenLLMetry), or OpenLLMetry's by its ``llm.request.type``, whose older
    versions write the ``llm.usage.*`` names. OpenInference, and hand-made spans of the
    ``llm.usage.*`` names, record none."""
    if not _records_genai_metrics(scope):
        return False
    return (
        not _GENAI_USAGE_KEYS.isdisjoint(attributes)
        or attributes.get(a.LLM_REQUEST_TYPE) in a.MODEL_CALL_REQUEST_TYPES
    )


def _usage_is_the_span_s(owner: Any) -> None:
    """A foreign span in ``owner`` (a step or an agent) outlives its run: its usage is charged
    (or not) by the span when it ends, so a step that read it from the SDK's response or stream
    (one it returned, read by its caller later) charges none of it."""
    from multirun.context import StepContext  # context imports this package

    if isinstance(owner, StepContext):
        owner.child_usage_reported = True


def _note_call_timed(owner: Any) -> None:
    """A model call in ``owner`` (a step or an agent) is timed: the steps around it do not time it."""
    from multirun.context import note_call_timed  # context imports this package

    note_call_timed(owner)


def _time_call(span: ReadableSpan, owner: Any, usage: TokenUsage | None, operation: str) -> None:
    """Record ``gen_ai.client.operation.duration`` for the call of ``span`` (an ``operation``),
    with the attributes its token usage is recorded with; the LLM steps around it do not time
    it again."""
    from multirun.context import StepContext  # context imports this package

    step = owner if isinstance(owner, StepContext) else None
    _note_call_timed(owner)
    if usage is None:
        model, provider = _model_and_provider((span.attributes or {}).get)
    else:
        model, provider = usage.model, usage.provider
    start, end = span.start_time, span.end_time
    span_context = span.get_span_context()
    owner.run_context.client.metrics.llm_call_finished(
        operation,
        provider,
        (step.model if step is not None else None) or model,
        model,
        (end - start) / 1e9 if start is not None and end is not None else 0.0,
        _span_error_type(span),
        # the call's span, for the exemplar
        context=set_span_in_context(NonRecordingSpan(span_context)) if span_context is not None else None,
    )


def _span_error_type(span: ReadableSpan) -> str | None:
    """The ``error.type`` of a failed span: its own, else its last exception's, else ``_OTHER``."""
    if span.status.status_code is not StatusCode.ERROR:
        return None
    error_type = (span.attributes or {}).get(a.ERROR_TYPE)
    if error_type:
        return str(error_type)
    for event in reversed(span.events):
        if event.name == "exception" and event.attributes and event.attributes.get(a.EXCEPTION_TYPE):
            return str(event.attributes[a.EXCEPTION_TYPE])
    return a.ERROR_TYPE_OTHER


# OpenInference's llm.provider and llm.system values that the GenAI conventions' gen_ai.provider.name
# spells differently; the others (openai, anthropic, cohere, deepseek, groq...) are the same
_OPENINFERENCE_PROVIDERS = {
    "azure": "azure.ai.openai",
    "google": "gcp.gen_ai",
    "vertexai": "gcp.vertex_ai",
    "aws": "aws.bedrock",
    "mistralai": "mistral_ai",
    "xai": "x_ai",
}


def _model_and_provider(get: Any) -> tuple[str | None, str | None]:
    """The model and the provider named by GenAI (or OpenInference) span attributes."""
    model = (
        get(a.GEN_AI_RESPONSE_MODEL)
        or get(a.GEN_AI_REQUEST_MODEL)
        or get(a.LLM_MODEL_NAME)
        or get(a.EMBEDDING_MODEL_NAME)
    )
    provider = get(a.GEN_AI_PROVIDER_NAME) or get(a.GEN_AI_SYSTEM)
    if not provider:
        # the host first: an OpenAI model on Azure is priced, and named, as Azure's
        named = get(a.LLM_PROVIDER) or get(a.LLM_SYSTEM)
        provider = _OPENINFERENCE_PROVIDERS.get(str(named), named) if named else None
    if provider is None or provider == "openai":  # the OpenAI SDK's name, for any server it calls
        address, api_base = get(a.SERVER_ADDRESS), get(a.GEN_AI_OPENAI_API_BASE)
        if address and isinstance(address, str):
            provider = provider_at(f"https://{address}") or provider
        elif api_base and isinstance(api_base, str):
            provider = provider_at(api_base) or provider
    return (str(model) if model else None), (str(provider) if provider else None)


def _first_key(get: Any, keys: tuple[str, ...]) -> tuple[str, Any]:
    """The first of ``keys`` that is set and its value, or the first key and None."""
    for key in keys:
        value = get(key)
        if value is not None:
            return key, value
    return keys[0], None


def _count(get: Any, keys: tuple[str, ...]) -> int:
    """The first of ``keys`` that is set, as a token count (0 if none is)."""
    return _token_count(*_first_key(get, keys))


def _token_count(key: str, value: Any) -> int:
    """A token count from the value of attribute ``key``: 0 for one missing, or unusable
    (``usable_count``: logged), so one bad count does not lose the call's other counts."""
    if value is None:
        return 0
    if isinstance(value, (str, bytes)):  # "120": an instrumentation that sets its counts as text
        with contextlib.suppress(ValueError):  # else no count: usable_count says so
            value = int(value)
    return int(usable_count(value, "a span", key))


def _response_id(attributes: Any) -> str | None:
    value = attributes.get(a.GEN_AI_RESPONSE_ID)
    return value if isinstance(value, str) and value else None


def usage_from_attributes(attributes: Any) -> TokenUsage | None:
    """A TokenUsage from GenAI (or OpenInference) span attributes, or None if it has none."""
    if _USAGE_KEYS.isdisjoint(attributes):  # most spans: one cheap test, no lookups
        return None
    get = attributes.get
    input_key, input_tokens = _first_key(get, _INPUT_KEYS)
    output_key, output_tokens = _first_key(get, _OUTPUT_KEYS)
    if input_tokens is None and output_tokens is None:
        return None
    model, provider = _model_and_provider(get)
    cost = get(a.GEN_AI_USAGE_COST_AMOUNT)
    if not is_cost(cost):  # NaN, a string, ...: the tokens are still charged, priced here
        cost = None
    try:
        return TokenUsage(
            model=model,
            provider=provider,
            input_tokens=_token_count(input_key, input_tokens),
            output_tokens=_token_count(output_key, output_tokens),
            cache_read_tokens=_count(get, _CACHE_READ_KEYS),
            cache_write_tokens=_count(get, _CACHE_WRITE_KEYS),
            reasoning_tokens=_count(get, _REASONING_KEYS),
            cost_usd=float(cost) if cost is not None else None,
        )
    except (TypeError, ValueError):
        return None
