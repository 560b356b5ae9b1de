"""Carrying a run into another process: W3C trace context plus baggage.

    # in the process that runs the agent, inside a step:
    carrier = multirun.inject()            # {"traceparent": ..., "baggage": "multirun.run.id=..."}
    queue.put((task, carrier))

    # in the worker process:
    with multirun.continue_run(carrier):
        summarize(task)                    # @agent / @step functions join the same trace

The worker's spans become children of the step that sent the task. With a
shared ledger (``init(ledger_uri="redis://...")`` in both processes) the
worker's spend is charged to the same run, and to the runs that run is a
sub-run of, and their budgets stop the worker too; without one, the worker's
spend is counted in the worker only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from multirun._keys import run_in
from multirun.context import RunContext
from multirun.errors import ConfigurationError
from multirun.models.run import Run

_logger = logging.getLogger(__name__)

RUN_ID_BAGGAGE = "multirun.run.id"
RUN_NAME_BAGGAGE = "multirun.run.name"
# the enclosing runs of a sub-run, nearest first, comma-separated: a shared ledger charges them too
RUN_ANCESTORS_BAGGAGE = "multirun.run.ancestors"
_BAGGAGE_HEADER = "baggage"  # W3C's; OpenTelemetry's propagator reads only the first of several
_TRACEPARENT_HEADER = "traceparent"
_RUN_BAGGAGE = frozenset((RUN_ID_BAGGAGE, RUN_NAME_BAGGAGE, RUN_ANCESTORS_BAGGAGE))


def inject(carrier: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Write the current trace context and run into ``carrier`` (a new dict by default)."""
    if carrier is None:
        carrier = {}
    elif isinstance(carrier, Sequence) or not callable(getattr(type(carrier), "__setitem__", None)):
        # OpenTelemetry's setter writes carrier[name] = value: a list or text takes no such key
        raise ConfigurationError(
            f"inject: carrier must be a mutable mapping (a dict of headers), got {type(carrier).__name__}"
        )
    ctx = otel_context.get_current()
    run = run_in(ctx)
    if run is not None:
        _send_pending(run)
        ours = {RUN_ID_BAGGAGE: run.run.id}
        ancestors = run.ancestor_ids
        if ancestors:  # else not those of a run whose baggage came in with the current context
            ours[RUN_ANCESTORS_BAGGAGE] = ",".join(ancestors)
        ours[RUN_NAME_BAGGAGE] = run.run.name
        ctx = _baggage_first(ours, ctx)
    propagate.inject(carrier, context=ctx)
    return carrier


def _baggage_first(ours: dict[str, str], ctx: Context) -> Context:
    """``ctx`` with the run's entries at the head of its baggage: the propagator keeps entries in
    order up to the W3C limits (180 entries, 8192 bytes), so an application's baggage that fills
    them loses its last entries, not the run."""
    theirs = {name: value for name, value in baggage.get_all(ctx).items() if name not in _RUN_BAGGAGE}
    ctx = baggage.clear(ctx)
    for name, value in {**ours, **theirs}.items():
        ctx = baggage.set_baggage(name, value, ctx)
    return ctx


def _send_pending(run: RunContext) -> None:
    """Send what the run and the runs enclosing it charged here but a shared ledger has not yet
    seen (it rides on the next step): the worker the carrier goes to starts from the run's real
    totals, not from before the spend that came just ahead of the hand-over."""
    for ledger in run.ledger.chain():
        flush = getattr(ledger, "flush", None)  # a RedisLedger's: nothing to send in process
        if flush is None:
            continue
        try:
            flush()
        except Exception as exc:  # the worker's first step fails closed on its own
            _logger.warning(
                "multirun: the usage run %s charged could not be sent to the shared ledger before "
                "inject(); it is sent with the run's next step: %s",
                ledger.run_id,
                exc,
            )


@contextmanager
def continue_run(carrier: Mapping[Any, Any]) -> Iterator[RunContext]:
    """Continue, in this process, the run that ``inject`` wrote into ``carrier``.

    ``carrier`` is what ``inject`` returned, or the headers it came back as: names in any case,
    values as str, bytes or a list of either.
    """
    from multirun.client import get_client

    if not isinstance(carrier, Mapping):
        raise ConfigurationError(
            f"continue_run: carrier must be the mapping multirun.inject() returned, got {carrier!r}"
        )
    values = _text_values(carrier)
    ctx = propagate.extract(values)
    run_id = baggage.get_baggage(RUN_ID_BAGGAGE, ctx)
    if not run_id:
        raise ConfigurationError(
            "continue_run: the carrier holds no multirun run id; call multirun.inject() inside the run "
            "and pass what it returns (check that OTEL_PROPAGATORS includes baggage)"
        )
    sent = values.get(_TRACEPARENT_HEADER)
    traceparent = sent[0] if isinstance(sent, list) and sent else sent
    if traceparent and not trace.get_current_span(ctx).get_span_context().is_valid and _reads_traceparent():
        _logger.warning(
            "multirun: the carrier's traceparent %.80r is not W3C trace context: the spans of run %s "
            "here start a trace of their own, not under the step that sent it",
            traceparent,
            run_id,
        )
    client = get_client()
    if client.ledger_uri is None:
        _logger.warning(
            "multirun: continuing run %s without a shared ledger: its spend here is not charged to "
            "the run's budget; configure init(ledger_uri='redis://...') in both processes",
            run_id,
        )
    name = baggage.get_baggage(RUN_NAME_BAGGAGE, ctx)
    run_ctx = RunContext(client, Run(id=str(run_id), name=str(name or "")), remote=True)
    ancestors = baggage.get_baggage(RUN_ANCESTORS_BAGGAGE, ctx)
    run_ctx.remote_ancestor_ids = tuple(i for i in str(ancestors or "").split(",") if i)
    token = otel_context.attach(ctx)
    try:
        with run_ctx:
            yield run_ctx
    finally:
        otel_context.detach(token)


def _reads_traceparent() -> bool:
    """Whether the configured propagators read a ``traceparent`` (OTEL_PROPAGATORS may leave it out)."""
    return _TRACEPARENT_HEADER in {field.lower() for field in propagate.get_global_textmap().fields}


def _text_values(carrier: Mapping[object, object]) -> dict[str, str | list[str]]:
    """The carrier's propagation fields as text, under lower-case names, for the default getter.

    Message and HTTP libraries hand headers back in many shapes: bytes (Kafka), Title-Case names
    (case-insensitive header maps), a list of values per name (multi-valued headers), None for an
    absent header. All of those are accepted. Entries that are not propagation fields and not text
    are left out: a queue's own headers (a message id as an int, a binary payload) are not ours
    to refuse.
    """
    fields = {field.lower() for field in propagate.get_global_textmap().fields}
    values: dict[str, str | list[str]] = {}
    for raw_key, value in carrier.items():
        key = _as_text(raw_key)
        if key is None:
            continue
        ours = key.lower() in fields
        if value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        texts = [_as_text(item) for item in items]
        if any(text is None for text in texts):
            if not ours:
                continue
            raise ConfigurationError(
                f"continue_run: carrier[{key!r}] must be UTF-8 text (the value multirun.inject() wrote), "
                f"got {value!r:.80}"
            )
        text_items = [text for text in texts if text is not None]
        if ours and key.lower() == _BAGGAGE_HEADER:  # several headers are one list (RFC 9110), read whole
            values[_BAGGAGE_HEADER] = ",".join(text_items)
        elif ours:
            values[key.lower()] = text_items if isinstance(value, (list, tuple)) else text_items[0]
        elif not isinstance(value, (list, tuple)):
            values[key] = text_items[0]
    return values


def _as_text(value: object) -> str | None:
    """``value`` as a str when it is text (bytes are decoded as UTF-8), else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None
