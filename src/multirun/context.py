"""RunContext, AgentContext and StepContext: where a run is, and what it has spent.

The current run, agent and step live in the OpenTelemetry context, next to
the current span, so whatever carries OpenTelemetry context (asyncio tasks,
``contextvars.copy_context``, the threading instrumentation, W3C propagation
in-process) carries them too.

The lifecycle methods the reference documents as coroutines (``complete``,
``fail``, ``checkpoint``, ...) do their work at once and return an object that
may be awaited, so the same call works in sync and async code::

    step_ctx.complete(result, tokens_used=500)          # sync step
    await step_ctx.complete(result, tokens_used=500)    # async step

Sync code reads what they give as it is: ``ctx.checkpoint(name="x").id``,
``found, result = agent_ctx.get_step_result(...)``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import _Span as _SdkSpan
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from pydantic_core import to_json

from multirun._keys import AGENT_KEY, RUN_KEY, SPAN_KEY, STEP_KEY, agent_in, run_in, step_in
from multirun._runtimes import in_async_code, is_cancellation
from multirun._stack import headroom
from multirun.checkpoints.hashing import input_hash
from multirun.checkpoints.replay import SEQ, Call, ReplayLog, kept_copy, sub_run_part
from multirun.checkpoints.serializers import json_form
from multirun.checkpoints.store import agent_state
from multirun.enforcement.ledger import SPEND_TOTALS
from multirun.enforcement.policy import GIVEN_BACK, PROCEED, Decision, PolicyEngine
from multirun.errors import (
    BudgetExceededError,
    CheckpointError,
    ConfigurationError,
    PolicyViolation,
    StepNotEndedError,
    budget_refusal,
    error_text,
)
from multirun.models._base import construct_trusted
from multirun.models.agent import Agent, AgentStatus
from multirun.models.budget import Budget, BudgetStatus
from multirun.models.checkpoint import CheckpointMeta
from multirun.models.policy import PolicyDecision
from multirun.models.run import Run, RunStatus
from multirun.models.step import Step, StepKind, StepStatus
from multirun.pricing import COST_UNITS_PER_USD
from multirun.sdk_usage import NOT_A_RESPONSE, calls_in
from multirun.telemetry import attributes as attr
from multirun.telemetry import spans
from multirun.telemetry.content import render, render_call
from multirun.telemetry.exceptions import record_exception
from multirun.telemetry.metrics import TIMED_STEP_KINDS
from multirun.usage import MAX_TOKENS, TokenUsage

if TYPE_CHECKING:
    from multirun.checkpoints.store import RestoredCheckpoint
    from multirun.client import MultiRunClient
    from multirun.enforcement.ledger import Ledger
    from multirun.sdk_usage import ModelCall, Reply

_logger = logging.getLogger(__name__)
# the runs with checkpoints of their own (top runs) started in this process, by name, for
# at most _MAX_COUNTED_RUN_NAMES names (run names made per request must not grow it for good)
top_runs_started: dict[str, int] = {}
_MAX_COUNTED_RUN_NAMES = 10_000


def _count_top_run(name: str) -> int:
    """One more top run named ``name`` started: its number among them, 0 for a name past the limit."""
    started = top_runs_started.get(name)
    if started is None:
        if len(top_runs_started) >= _MAX_COUNTED_RUN_NAMES:
            return 0
        started = 0
    top_runs_started[name] = started + 1
    return started + 1


T = TypeVar("T")


class Done(Generic[T]):
    """The result of a lifecycle call that already happened; awaiting it returns ``value``.

    Sync code uses it as that value: its attributes are the value's (``ctx.checkpoint().id``)
    and it unpacks as the value does (``found, result = agent_ctx.get_step_result(...)``).
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, T]:
        return self.value
        yield  # pragma: no cover - makes this a generator

    def __getattr__(self, name: str) -> Any:
        if name == "value":  # not set yet (a copy being built): no recursion into it
            raise AttributeError(name)
        return getattr(self.value, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(cast(Any, self.value))

    def __repr__(self) -> str:
        return f"Done({self.value!r})"


# ---------------------------------------------------------------------------
# accessors


def get_current_run_context() -> RunContext:
    """The RunContext of the enclosing run; RuntimeError outside a run."""
    ctx = run_in(otel_context.get_current())
    if ctx is None:
        raise RuntimeError("no active run: call this inside a function decorated with @run")
    return ctx


def get_current_agent_context() -> AgentContext:
    """The AgentContext of the enclosing agent (the run's default agent if none was started);
    RuntimeError outside a run."""
    current = otel_context.get_current()
    agent = agent_in(current)
    if agent is not None:
        return agent
    run = run_in(current)
    if run is None:
        raise RuntimeError("no active agent: call this inside a run (@run) or an agent (@agent)")
    return run.default_agent


def get_current_step_context() -> StepContext:
    """The StepContext of the enclosing step; RuntimeError outside a step."""
    step = step_in(otel_context.get_current())
    if step is None:
        raise RuntimeError("no active step: call this inside a function decorated with @step")
    return step


def get_current_client() -> MultiRunClient:
    """The client of the current run, else the one ``multirun.init`` configured; RuntimeError
    if there is neither (``multirun.get_client`` creates the default one instead)."""
    run = run_in(otel_context.get_current())
    if run is not None:
        return run.client
    from multirun.client import configured_client

    client = configured_client()
    if client is None:
        raise RuntimeError("no active client: call multirun.init() or run inside @run")
    return client


def _client_here() -> MultiRunClient:
    """The current run's client (a run made by hand may have its own), else the process's,
    created on first use: the client a run started here gets."""
    run = run_in(otel_context.get_current())
    if run is not None:
        return run.client
    from multirun.client import get_client

    return get_client()


def has_active_run() -> bool:
    return run_in(otel_context.get_current()) is not None


def has_active_agent() -> bool:
    """True inside a run: every run has an agent, the default one if no @agent was started."""
    return has_active_run()


def has_active_step() -> bool:
    return step_in(otel_context.get_current()) is not None


def has_active_client() -> bool:
    if has_active_run():
        return True
    from multirun.client import configured_client

    return configured_client() is not None


def report_usage(
    model: str | None = None,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    provider: str | None = None,
    cost_usd: float | None = None,
    response_id: str | None = None,
    finish_reasons: list[str] | tuple[str, ...] | None = None,
) -> None:
    """Charge one model call to the current step (or agent, or run).

    ``input_tokens`` includes ``cached_input_tokens``, as in the GenAI
    conventions. ``model`` None is the step's model. Without ``cost_usd`` the
    cost comes from the price book; a model with no known price is flagged
    unpriced, and with ``init(unpriced="fail")`` also raises PolicyViolation.
    ``response_id`` (the provider's id of the response) and ``finish_reasons`` (why it
    stopped, one reason a choice) go on the step's span as ``gen_ai.response.id`` and
    ``gen_ai.response.finish_reasons``; a step around it that returns the response of that id
    and those token counts is not charged for it again.
    A count that is not an int >= 0, or ``model=""``, raises ConfigurationError. Outside a run
    it charges nothing, and the first such call of the process logs a warning.
    """
    if model == "":  # priced as no model, and prices cannot name it
        raise ConfigurationError("model must be a non-empty string, or None for the step's model, got ''")
    reply = None
    if finish_reasons is not None:
        reply = _finish_reasons_reply(finish_reasons)
    if response_id is not None and (not isinstance(response_id, str) or not response_id):
        raise ConfigurationError(f"response_id must be a non-empty string, got {response_id!r}")
    usage = TokenUsage(
        model=model,
        provider=provider,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cached_input_tokens,
        cache_write_tokens=cache_write_tokens,
        reasoning_tokens=reasoning_tokens,
        cost_usd=cost_usd,
    )
    current = otel_context.get_current()
    step: StepContext | None = step_in(current)
    if step is not None:
        step.report_usage(usage, response_id, reply)
        return
    run: RunContext | None = run_in(current)
    if run is not None:
        get_current_agent_context().report_usage(usage, response_id)
        return
    _warn_usage_outside_run(model)


def _finish_reasons_reply(finish_reasons: object) -> Reply:
    """``report_usage``'s ``finish_reasons`` as span attributes; ConfigurationError if they are
    not a list (or tuple) of strings."""
    if not isinstance(finish_reasons, (list, tuple)) or not all(
        isinstance(reason, str) and reason for reason in finish_reasons
    ):
        raise ConfigurationError(
            f"finish_reasons must be a list of non-empty strings, got {finish_reasons!r}"
        )
    return {attr.GEN_AI_RESPONSE_FINISH_REASONS: tuple(finish_reasons)} if finish_reasons else None


_outside_run_warned = False
_outside_run_lock = threading.Lock()


def _warn_usage_outside_run(model: str | None) -> None:
    """Say once per process that usage reported outside any run is charged nowhere."""
    global _outside_run_warned
    with _outside_run_lock:
        if _outside_run_warned:
            return
        _outside_run_warned = True
    _logger.warning(
        "multirun: report_usage(%r) was called outside any run, so its usage is not charged "
        "anywhere; call it inside a @run (or a step of one). This warning is logged once per process.",
        model,
    )


# ---------------------------------------------------------------------------
# run


class RunContext:
    """Top-level context of one run: its model, state, agents and ledger."""

    _late_usage_warned = False  # usage reported after the run ended was logged
    # its totals are read for its span: later usage is in none of its totals (its agents, and
    # the steps they end, end after _finished is set, and are counted)
    _totals_read = False
    # the usage objects of the SDK responses the steps of this run tree returned, by object id
    # and response id (see _returned_before)
    _responses: weakref.WeakValueDictionary[tuple[int, str | None], Any] | None = None
    # the model calls that spans of other instrumentations (openai-v2, say) charged in this run
    # tree, by response id and input and output tokens, with how many such calls are not yet
    # matched by a step returning their response; the latest last (see _note_span_call)
    _span_calls: dict[CallKey, int] | None = None

    def __init__(
        self,
        client: MultiRunClient | None = None,
        run: Run | None = None,
        *,
        is_replaying: bool = False,
        checkpoint_on_error: bool = False,
        remote: bool = False,
    ) -> None:
        from multirun.client import MultiRunClient

        if client is None:
            client = _client_here()
        elif not isinstance(client, MultiRunClient):
            raise ConfigurationError(
                f"RunContext(client=...) must be a MultiRunClient, got {type(client).__name__} "
                "(multirun.get_client() gives the configured one; pass run= by keyword)"
            )
        if run is not None and not isinstance(run, Run):
            raise ConfigurationError(
                f"RunContext(run=...) must be a Run, got {type(run).__name__} {run!r:.80}"
            )
        self.client = client
        self.run = run if run is not None else Run()
        self.is_replaying = is_replaying
        self.checkpoint_on_error = checkpoint_on_error
        # a run continued in this process from another one (multirun.continue_run): it has
        # no span of its own, and the process that started it reports its end
        self.remote = remote
        self.remote_ancestor_ids: tuple[str, ...] = ()  # a continued run's enclosing runs, nearest first
        self.agents: list[AgentContext] = []
        self._state: dict[str, Any] = {}
        # agents started so far, by name; and the states a restored checkpoint kept of agents
        # that have not started again yet, by (name, occurrence): 0 for the default agent, n for
        # the n-th agent of that name the run started
        self._agent_starts: dict[str, int] = {}
        self._restored_agents: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._default_agent: AgentContext | None = None
        self._history: deque[StepContext] = deque(maxlen=client.step_history)
        self.replay_log = ReplayLog(client.replay_limit)
        # whether step inputs are hashed and results kept, for a replay after a restore
        self.records_replay = client.record_replay or is_replaying
        self._span: Span | None = None
        self._otel_ctx: Context | None = None
        self._tokens: list[object] = []
        self._finished = False
        self._history_in_run_steps = False  # the run ended: its kept steps are in Run.steps
        self.parent: RunContext | None = None
        self.policy_engine: PolicyEngine | None = None
        self.resumed_from: RestoredCheckpoint | None = None  # set before the run starts
        self.parent_step: StepContext | None = None  # the step of the parent run that called this sub-run
        self.parent_agent: AgentContext | None = None
        self.ledger: Ledger = client.new_ledger(None)
        # the top run in this process whose replay log and checkpoints this run shares
        self.root: RunContext = self
        # a sub-run's call in its parent's log (the steps it runs are recorded under it)
        self._run_call: tuple[ReplayLog, Call] | None = None
        self.replay_parent: int | None = None  # its sequence number, the parent of its steps
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # @run's arguments, until it starts
        # the input hash of a top @run's arguments, and how many runs of its name the process
        # started with it, kept in its checkpoints: a program that calls the run once per item
        # resumes the checkpoint in the item's call (see multirun.checkpoints.resume)
        self.input_digest: str | None = None
        self.occurrence = 0

    def _returned_before(self, response: Any, call_id: str | None) -> bool:
        """Whether a step of this run tree (the top run in this process and its sub-runs)
        returned the SDK ``response`` (whose id is ``call_id``), or a copy of it, before, so that
        its call is charged; noted if not.

        Known by the response's usage object, which the response and its copies share
        (``model_copy()`` is shallow), with its id: not by the id alone, since some
        OpenAI-compatible servers give every response the same id, nor by the object alone, since
        a step may pass on an edited copy. A deep copy, or a response rebuilt from its JSON, is
        another call. Weak references: no response is kept alive for this.
        """
        usage = getattr(response, "usage", None)
        if usage is None:
            usage = getattr(response, "usage_metadata", None)  # google-genai's
        held = usage if usage is not None else response
        key = (id(held), call_id)
        top = self._top
        with top._lock:
            seen = top._responses
            if seen is None:
                seen = top._responses = weakref.WeakValueDictionary()
            if seen.get(key) is held:
                return True
            try:
                seen[key] = held
            except TypeError:  # no weak reference to it: each step returning it is charged
                return False
            if len(seen) > MAX_RESPONSES_RETURNED:
                del seen[next(iter(seen))]
        return False

    def _note_span_call(self, call_id: str, usage: TokenUsage) -> None:
        """A span of another instrumentation charged the call ``call_id``, in a step or outside
        any (in a run's or an agent's body): a step of this run tree that returns its response
        later, not being around that span, is not charged for it again (see _charged_by_span)."""
        key = _call_key(call_id, usage)
        top = self._top
        with top._lock:
            calls = top._span_calls
            if calls is None:
                calls = top._span_calls = {}
            calls[key] = calls.get(key, 0) + 1
            if len(calls) > MAX_RESPONSES_RETURNED:
                del calls[next(iter(calls))]

    def _charged_by_span(self, call_id: str, usage: TokenUsage) -> bool:
        """Whether a span of another instrumentation in this run tree charged the call that a
        step returns the response of, ``call_id`` with ``usage``; taken if so, so each such call
        spares one step. Not by the id alone, since some OpenAI-compatible servers give every
        response the same id: another response with that id, and other token counts, or one more
        than the spans charged, is another call."""
        key = _call_key(call_id, usage)
        top = self._top
        with top._lock:
            calls = top._span_calls
            if calls is None or key not in calls:
                return False
            left = calls[key]
            if left > 1:
                calls[key] = left - 1
            else:
                del calls[key]
        return True

    @property
    def _top(self) -> RunContext:
        """The top run of this run tree in this process."""
        top = self
        while top.parent is not None:
            top = top.parent
        return top

    # -- lifecycle -----------------------------------------------------------

    def _start(self, parent_ctx: Context | None = None) -> None:
        if self._otel_ctx is not None:
            return
        if parent_ctx is None:
            parent_ctx = otel_context.get_current()
        self.client.ensure_installed()
        if self.remote:
            self._start_remote(parent_ctx)
            return
        parent = run_in(parent_ctx)
        run = self.run
        parent_ledger = None
        if parent is not None and parent is not self:
            self.parent = parent
            self.parent_step = step_in(parent_ctx)
            self.parent_agent = agent_in(parent_ctx) or parent.default_agent
            if run.parent_id is None:
                run.parent_id = parent.run.id
            parent_ledger = parent.ledger
        self.ledger = self.client.new_ledger(parent_ledger, _effective_budget(run), run.id)
        inputs, self.inputs = self.inputs, None  # not kept past the start
        if self.parent is not None and self.parent.records_replay and not self.parent.remote:
            self._join_replay_log(self.parent, inputs)
        else:
            self.occurrence = _count_top_run(run.name)
            if inputs is not None and self.records_replay and self.input_digest is None:
                self.input_digest = input_hash(*inputs)
        if run.policy is not None:
            self.policy_engine = PolicyEngine(
                run.policy, self.client.policy_state, self.client.clock.monotonic
            )
        elif self.parent is not None:
            # a sub-run without a policy of its own is governed by its parent's: the same engine,
            # so one rate-limit window, circuit and degradation switch for the whole run tree
            self.policy_engine = self.parent.policy_engine
            if self.policy_engine is not None:
                run.policy = self.policy_engine.policy  # what governs it, for whoever reads the model
        run.status = RunStatus.RUNNING
        run.started_at = datetime.now(timezone.utc)
        attrs: dict[str, Any] = {
            attr.GEN_AI_OPERATION_NAME: attr.OP_INVOKE_WORKFLOW,
            attr.GEN_AI_WORKFLOW_NAME: run.name,
            attr.RUN_ID: run.id,
        }
        if run.parent_id:
            attrs[attr.RUN_PARENT_ID] = run.parent_id
        if self.is_replaying:
            attrs[attr.RUN_REPLAYING] = True
        budget = self.ledger.budget  # the run's, tightened by its policy's BudgetRule
        if budget is not None:
            for limit, value in budget.limits().items():
                attrs[attr.BUDGET_PREFIX + limit] = value
        links: list[trace.Link] = []
        resumed = self.resumed_from
        if resumed is not None:
            attrs[attr.RUN_RESUMED_FROM] = resumed.checkpoint.run_id
            attrs[attr.CHECKPOINT_ID] = resumed.checkpoint.id
            original = _span_context(resumed.trace)
            if original is not None:
                links.append(trace.Link(original, {attr.RUN_ID: resumed.checkpoint.run_id}))
        self._span = self.client.tracer.start_span(
            spans.run_span_name(run.name), context=parent_ctx, attributes=attrs, links=links
        )
        ctx = trace.set_span_in_context(self._span, parent_ctx)
        ctx = otel_context.set_value(RUN_KEY, self, ctx)
        ctx = otel_context.set_value(AGENT_KEY, None, ctx)
        self._otel_ctx = otel_context.set_value(STEP_KEY, None, ctx)
        self.client.metrics.run_started(run.name, self._otel_ctx)

    def _join_replay_log(
        self, parent: RunContext, inputs: tuple[tuple[Any, ...], dict[str, Any]] | None
    ) -> None:
        """A sub-run records its steps in its parent's replay log, under a call of its own, so
        the run's checkpoints hold them and resuming the run restores the sub-run with it
        (its state and spend, and its completed steps served instead of run again).

        Not when the parent records no replay (``record_replay=False``), when the parent's log
        is full, or when the parent is a run continued from another process: the sub-run
        keeps a log and checkpoints of its own, as a top run does.
        """
        log = parent.replay_log
        digest = input_hash(*inputs) if inputs is not None else None
        step = self.parent_step
        step_call = step.replay_call if step is not None else None
        parent_seq = step_call[SEQ] if step_call is not None else parent.replay_parent
        call, recorded = log.begin_run(self.run.name, digest or "", parent_seq, self._checkpoint_snapshot)
        if call is None:
            return
        self.root = parent.root
        self.replay_log = log
        self.records_replay = True
        self.is_replaying = self.is_replaying or parent.is_replaying
        self._run_call = (log, call)
        self.replay_parent = call[SEQ]
        if recorded is not None:
            state = recorded.get("state")
            if isinstance(state, dict):
                self._state.update(state)
            _restore_spend(self, recorded.get("ledger"))
            self._restore_agents(recorded.get("agents"))

    def _replay_snapshot(
        self, copy_state: Callable[[dict[str, Any]], dict[str, Any]] = dict
    ) -> dict[str, Any]:
        """What a checkpoint keeps of a sub-run: its state, its agents' and its spend (taken as
        a checkpoint is written; when the sub-run ends, with its state deep-copied, as it is kept)."""
        snapshot: dict[str, Any] = {"state": copy_state(self._state), "ledger": self.ledger.totals()}
        agents = self.agent_states(copy_state)
        if agents:
            snapshot["agents"] = agents
        return snapshot

    def _checkpoint_snapshot(self) -> dict[str, Any]:
        """A running sub-run's part of a checkpoint, its spend read afresh from a shared ledger."""
        _refresh(self.ledger)
        return self._replay_snapshot()

    def _start_remote(self, parent_ctx: Context) -> None:
        run = self.run
        run.status = RunStatus.RUNNING
        run.started_at = datetime.now(timezone.utc)
        # budget None: the process that started the run set the limits in the shared ledger
        self.ledger = self.client.new_ledger(None, None, run.id, self.remote_ancestor_ids, adopt=True)
        if run.budget is None:  # the budget the run was started with, as the shared ledger holds it
            run.budget = self.ledger.budget
        self._span = trace.get_current_span(parent_ctx)  # the remote parent: events go nowhere
        ctx = otel_context.set_value(RUN_KEY, self, parent_ctx)
        ctx = otel_context.set_value(AGENT_KEY, None, ctx)
        self._otel_ctx = otel_context.set_value(STEP_KEY, None, ctx)

    @property
    def ancestor_ids(self) -> tuple[str, ...]:
        """The ids of the runs this one rolls its spend up into, nearest first."""
        ledger = self.ledger
        shared = getattr(ledger, "ancestor_ids", None)  # a RedisLedger names them
        if shared is not None:
            return tuple(shared)
        ids = []
        outermost = self
        while outermost.parent is not None:
            outermost = outermost.parent
            ids.append(outermost.run.id)
        return (*ids, *outermost.remote_ancestor_ids)

    @property
    def otel_context(self) -> Context:
        """The OpenTelemetry context in which this run's work runs."""
        self._start()
        assert self._otel_ctx is not None
        return self._otel_ctx

    @property
    def span(self) -> Span:
        self._start()
        assert self._span is not None
        return self._span

    def __enter__(self) -> RunContext:
        self._tokens.append(otel_context.attach(self.otel_context))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with headroom:  # ``exc`` may be a RecursionError that left no stack to end the run with
            try:
                if exc is not None:
                    self._fail_with_checkpoint(exc)
                else:
                    self.complete(None)
            finally:
                otel_context.detach(self._tokens.pop())  # type: ignore[arg-type]

    async def __aenter__(self) -> RunContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _fail_with_checkpoint(self, exc: BaseException) -> None:
        """End the run left by ``exc``: cancelled by a cancellation, failed by anything else
        (checkpointed first with ``checkpoint_on_error``, unless the budget stopped it)."""
        if self.checkpoint_on_error and budget_refusal(exc) is None:
            self._try_checkpoint(f"on_error_{type(exc).__name__}")
        self._finish(RunStatus.CANCELLED if is_cancellation(exc) else RunStatus.FAILED, error=exc)

    def complete(self, result: Any = None) -> Done[None]:
        """Complete every agent still running and mark the run completed."""
        self._finish(RunStatus.COMPLETED, result=result)
        return Done(None)

    def fail(self, error: BaseException | str) -> Done[None]:
        """Fail every agent still running and mark the run failed."""
        self._finish(RunStatus.FAILED, error=error)
        return Done(None)

    def _finish(
        self,
        status: RunStatus,
        *,
        result: Any = None,
        error: BaseException | str | None = None,
    ) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            self._end(status, result, error)
        except BaseException as interrupt:  # a Ctrl-C meanwhile, say: the trace keeps its root
            if not self.remote:
                _end_interrupted(self._span, interrupt, attr.RUN_STATUS)
            raise

    def _end(self, status: RunStatus, result: Any, error: BaseException | str | None) -> None:
        """What ``_finish`` does, once: end the agents, write the Run model and end the span."""
        # a run ended without being entered starts now: before its end is written, which
        # starting (status running, started_at) would otherwise overwrite
        self._start()
        for agent in list(self.agents):
            if agent.agent.status is AgentStatus.RUNNING and agent._ends_with_run:
                if status is RunStatus.COMPLETED:
                    agent.complete(None)
                elif status is RunStatus.CANCELLED:
                    agent._finish(AgentStatus.CANCELLED, error)
                else:
                    agent.fail(error if error is not None else "run failed")
        if self._default_agent is not None and self._default_agent not in self.agents:
            self._default_agent._finish_default(status)
        run = self.run
        ledger = self.ledger
        _refresh(ledger)
        if self._run_call is not None:
            log, call = self._run_call
            log.end_run(call, self._replay_snapshot(kept_copy), failed=status is not RunStatus.COMPLETED)
        run.status = status
        run.completed_at = datetime.now(timezone.utc)
        run.current_step_id = None
        # read once: a step of another thread can still charge meanwhile, and the Run model and
        # the span must say the same (no later charge writes a finished run's totals)
        self._totals_read = True
        tokens, cost_usd, steps_used = ledger.tokens, ledger.cost_usd, ledger.steps
        run.tokens_used = tokens
        run.cost_usd = cost_usd
        # Each kept step points back at this run: left here, the run and its steps form cycles
        # that only the cyclic garbage collector frees (some 17 objects per step, spans
        # included), which made short runs pay ~3 us more per step. Run.steps has them now.
        # A step of this run can end on another thread meanwhile (a Motus task's) and append to
        # the history: it is swapped for an empty one and copied by list() in one C call (no
        # thread runs in between), never iterated in Python while it may grow (_facts() can
        # call the program's __str__). A step's end appends without a lock: it is per step.
        ended, self._history = self._history, deque(maxlen=self._history.maxlen)
        history = list(ended)
        kept = [step._facts() for step in history]  # plain values: nothing kept alive
        run._fill_steps_later(lambda: [_step_model(facts) for facts in kept])
        self._history_in_run_steps = True
        if status is RunStatus.COMPLETED and result is not None:
            run.result = _serialize_result(result)
        if error is not None:
            run.error = error_text(error) or type(error).__name__
        usage_processor = self.client.usage_processor
        if usage_processor is not None:
            usage_processor.forget_run(self)
        if self.remote:
            return
        span = self.span
        end_attrs: dict[str, Any] = {
            attr.RUN_STATUS: status.value,
            attr.TOKENS_USED: tokens,
            attr.COST_USD: cost_usd,
            attr.STEPS_USED: steps_used,
        }
        if ledger.unpriced_reports:
            end_attrs[attr.UNPRICED] = True
        refusal = budget_refusal(error)
        if refusal is not None:
            end_attrs[attr.BUDGET_EXCEEDED_LIMIT] = refusal.limit
        if error is not None:
            _record_error(span, error, end_attrs)
        spans.set_end_attributes(span, end_attrs)
        span.end()
        budget = ledger.budget
        self.client.metrics.run_finished(
            run.name, status.value, ledger.shares(budget) if budget is not None else None, self._otel_ctx
        )

    # -- agents --------------------------------------------------------------

    def start_agent(
        self,
        name: str,
        agent_config_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AgentContext:
        """Start a named agent; use it as ``with``/``async with`` to scope steps to it."""
        return self._start_agent(name, agent_config_id, metadata)

    def _start_agent(
        self,
        name: str,
        agent_config_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        ends_with_run: bool = True,
    ) -> AgentContext:
        """``start_agent``; ``ends_with_run`` False for an agent whose work can outlive the run
        (``AgentContext._ends_with_run``), so set before the run's end can see the agent."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"start_agent: name must be a non-empty string, got {name!r}")
        if agent_config_id is not None and not isinstance(agent_config_id, str):
            raise ConfigurationError(
                f"start_agent: agent_config_id must be a string or None, got {agent_config_id!r}"
            )
        check_string_keys("start_agent", "metadata", metadata)
        agent = Agent(
            run_id=self.run.id,
            name=name,
            agent_config_id=agent_config_id,
            metadata=metadata,
            status=AgentStatus.RUNNING,
            started_at=datetime.now(timezone.utc),
        )
        ctx = AgentContext(self, agent, is_default=False)
        ctx._ends_with_run = ends_with_run
        with self._lock:
            self.agents.append(ctx)
            ctx.occurrence = self._agent_starts[name] = self._agent_starts.get(name, 0) + 1
            restored = (
                self._restored_agents.pop((name, ctx.occurrence), None) if self._restored_agents else None
            )
        if restored is not None:  # the state this agent had at the checkpoint the run resumed
            ctx._state.update(restored)
        self.ledger.count_sub_agent()
        parent_ctx = otel_context.get_current()
        if run_in(parent_ctx) is not self:  # called on a run held as an object: start under it
            parent_ctx = self.otel_context
        ctx._start(parent_ctx)
        return ctx

    @property
    def default_agent(self) -> AgentContext:
        """The implicit agent of steps that run outside any @agent."""
        agent = self._default_agent
        if agent is None:
            with self._lock:
                if self._default_agent is None:
                    model = Agent(
                        run_id=self.run.id,
                        name=self.run.name or "default",
                        status=AgentStatus.RUNNING,
                        started_at=self.run.started_at,
                    )
                    default = AgentContext(self, model, is_default=True)
                    restored = self._restored_agents.pop((model.name, 0), None)
                    if restored is not None:
                        default._state.update(restored)
                    self._default_agent = default
                agent = self._default_agent
        return agent

    # -- state ---------------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Keep ``value`` under ``key``; state is included in every checkpoint."""
        _check_state_key(key)
        self._state[key] = value

    def get_state(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    @property
    def state(self) -> dict[str, Any]:
        return self._state

    def agent_states(
        self, copy_state: Callable[[dict[str, Any]], dict[str, Any]] = dict
    ) -> list[dict[str, Any]]:
        """The state of each agent of this run that has one, as a checkpoint keeps it:
        ``{"name", "occurrence", "state"}``, occurrence 0 for the default agent and n for the
        n-th agent of that name the run started. Restored states of agents that have not
        started again yet are kept too, so a resumed run that dies keeps them."""
        with self._lock:
            agents = list(self.agents)
            default = self._default_agent
            pending = list(self._restored_agents.items())
        if default is not None and default not in agents:
            agents.insert(0, default)
        states = [
            {"name": agent.agent.name, "occurrence": agent.occurrence, "state": copy_state(agent._state)}
            for agent in agents
            if agent._state
        ]
        states.extend(
            {"name": name, "occurrence": occurrence, "state": copy_state(state)}
            for (name, occurrence), state in pending
        )
        return states

    def _restore_agents(self, agents: Any) -> None:
        """Give the agents of a checkpoint's ``agent_states`` their state back: those started
        already now, the others when they start (by name and occurrence)."""
        # a sub-run's record was not checked when the checkpoint was loaded: malformed entries are
        # left out
        entries = [agent_state(entry) for entry in agents] if isinstance(agents, list) else []
        restored = {(name, occurrence): state for name, occurrence, state in filter(None, entries)}
        if not restored:
            return
        with self._lock:
            started = list(self.agents)
            if self._default_agent is not None:
                started.append(self._default_agent)
            for agent in started:
                state = restored.pop((agent.agent.name, agent.occurrence), None)
                if state is not None:
                    agent._state.update(state)
            self._restored_agents.update(restored)

    # -- usage ---------------------------------------------------------------

    @property
    def tokens_used(self) -> int:
        return self.ledger.tokens

    @property
    def cost_usd(self) -> float:
        return self.ledger.cost_usd

    def budget_status(self) -> BudgetStatus:
        """What the run has spent so far against the budget its steps are checked against
        (tightened by the policy's BudgetRule)."""
        started = self._otel_ctx is not None  # before, the ledger is a placeholder without limits
        return self.ledger.status(self.ledger.budget if started else _effective_budget(self.run))

    # -- checkpoints and replay ------------------------------------------------

    def checkpoint(
        self,
        name: str | None = None,
        extra_state: dict[str, Any] | None = None,
        *,
        agent_id: str = "",
        step_id: str = "",
    ) -> Done[CheckpointMeta]:
        """Write the run's state, its agents' states, its replay log and spend to the blob
        store; CheckpointError if it cannot be written."""
        check_string_keys("checkpoint", "extra_state", extra_state)
        return Done(self._checkpoint(name or "checkpoint", extra_state, agent_id, step_id))

    def _checkpoint(
        self, name: str, extra_state: dict[str, Any] | None, agent_id: str, step_id: str
    ) -> CheckpointMeta:
        started = time.perf_counter()
        # a shared ledger's cached totals miss what sub-runs and other processes charged to it
        _refresh(self.root.ledger)
        meta = self.client.checkpoints.save(
            self, name=name, extra_state=extra_state, agent_id=agent_id, step_id=step_id
        )
        self.client.metrics.checkpoint_saved(self.run.name, meta.size_bytes, time.perf_counter() - started)
        # a sub-run's checkpoint is its top run's too (the one to resume): both list it
        for owner in (self,) if self.root is self else (self, self.root):
            with owner._lock:
                owner.run.checkpoints.append(meta)
                owner.run.latest_checkpoint_id = meta.id
        span = trace.get_current_span()
        if not span.is_recording():
            span = self.span
        if span.is_recording():  # not once the run's span has ended (a checkpoint taken after it)
            span.add_event(
                attr.EVENT_CHECKPOINT,
                {
                    attr.CHECKPOINT_ID: meta.id,
                    attr.CHECKPOINT_NAME: meta.name,
                    attr.CHECKPOINT_URI: meta.uri,
                    attr.CHECKPOINT_SIZE: meta.size_bytes,
                    attr.CHECKPOINT_DIGEST: meta.digest,
                    attr.CHECKPOINT_SERIALIZER: meta.serializer,
                },
            )
        return meta

    def _try_checkpoint(
        self, name: str, extra_state: dict[str, Any] | None = None, step_id: str = "", agent_id: str = ""
    ) -> CheckpointMeta | None:
        """Checkpoint, turning any failure into a warning: a checkpoint never fails the run.

        None once the run has ended (a generator under ``@checkpoint`` that ends after it): the
        run is over, and its span takes no more events."""
        if self._finished:
            _logger.debug("multirun: checkpoint %r not taken: run %s has ended", name, self.run.id)
            return None
        try:
            return self._checkpoint(name, extra_state, agent_id, step_id)
        except Exception as exc:
            _logger.warning("multirun: checkpoint %r of run %s failed: %s", name, self.run.id, exc)
            return None

    def restore_from_checkpoint(self, checkpoint_id: str) -> Done[None]:
        """Load a checkpoint's state and replay log into this run; ``is_replaying`` becomes True.

        The run's spend becomes at least what it was at the checkpoint (a
        restored run never gets its budget back). Raises CheckpointError if the
        checkpoint cannot be read or verified, ReplayError if its contents
        cannot be deserialized.
        """
        restored = self.client.checkpoints.load(checkpoint_id)
        checkpoint = restored.checkpoint
        if restored.sub_run_id and checkpoint.run_id not in _run_ids(self):
            # a checkpoint a sub-run took, restored into another run: that sub-run's part of it
            self._restore(*_sub_run_part(restored))
        elif self.root is not self and checkpoint.run_id in _run_ids(self.root):
            raise CheckpointError(
                f"checkpoint {checkpoint.id!r} holds the whole run {checkpoint.run_id}, this "
                "sub-run's top run: resume that run (multirun.resume(run_id=...)), which restores "
                "its sub-runs with it, rather than restoring it into a sub-run"
            )
        else:
            self._restore(restored.state, restored.replay, restored.ledger, restored.agents)
        return Done(None)

    def _restore(
        self, state: dict[str, Any], replay: list[dict[str, Any]], ledger: Any, agents: Any = None
    ) -> None:
        """Go on from a checkpoint (or a sub-run's part of one): its state, replay log, spend,
        and its agents' states (``agent_states``)."""
        if self.root is not self:
            # a sub-run that restores a checkpoint continues it in a log of its own (its call in
            # the top run's log stays, and records how it ends)
            self.root, self.replay_parent = self, None
            self.replay_log = ReplayLog(self.client.replay_limit)
        self._state.update(state)
        self._restore_agents(agents)
        self.replay_log.load(replay)
        self.records_replay = True
        _restore_spend(self, ledger)
        self.is_replaying = True
        if self._span is not None:
            self._span.set_attribute(attr.RUN_REPLAYING, True)

    @property
    def history(self) -> list[StepContext]:
        """The most recent finished steps (``step_history`` of them at most), while the run
        runs; once it has ended, ``run.steps`` has them."""
        return list(self._history)  # one C call: a step ending meanwhile cannot break it


# ---------------------------------------------------------------------------
# agent


class AgentContext:
    """A running agent within a run, and the steps scoped to it."""

    # its steps that returned an LLM SDK stream their caller has not read yet, and how each
    # ends if the agent ends first (a dict made for the first one)
    _unread: dict[StepContext, Callable[[], None]] | None = None
    # its totals are read for its span: the steps it ends (_end_unread) are counted before
    _totals_read = False
    # its steps made by hand that are not ended yet, in the order they started (a dict made for
    # the first one): the agent's end fails those left open (see _end_open_steps)
    _manual_in_flight: dict[StepContext, None] | None = None

    def __init__(self, run_context: RunContext, agent: Agent, *, is_default: bool) -> None:
        self.run_context = run_context
        self.agent = agent
        self.is_default = is_default
        self._state: dict[str, Any] = {}
        self._span: Span | None = None
        self._otel_ctx: Context | None = None
        self._tokens: list[object] = []
        self._cost_units = 0
        self._unpriced = False
        self.parent_step: StepContext | None = None
        self.parent_agent: AgentContext | None = None  # the agent it was started in, if any
        self._finished = False
        self.occurrence = 0  # n for the n-th agent of its name the run started; 0 for the default
        # False for an agent whose work can outlive its run (a Motus agent_call task): the run's
        # end leaves it running, and whatever runs it ends it with its own outcome
        self._ends_with_run = True

    def _start(self, parent_ctx: Context) -> None:
        self.parent_step = step_in(parent_ctx)
        outer = agent_in(parent_ctx)
        self.parent_agent = outer if outer is not self else None
        agent = self.agent
        attrs: dict[str, Any] = {
            attr.GEN_AI_OPERATION_NAME: attr.OP_INVOKE_AGENT,
            attr.GEN_AI_AGENT_NAME: agent.name,
            attr.GEN_AI_AGENT_ID: agent.id,
        }
        if agent.agent_config_id:
            attrs[attr.AGENT_CONFIG_ID] = agent.agent_config_id
        tracer = self.run_context.client.tracer
        self._span = tracer.start_span(
            spans.agent_span_name(agent.name), context=parent_ctx, attributes=attrs
        )
        ctx = trace.set_span_in_context(self._span, parent_ctx)
        self._otel_ctx = otel_context.set_value(AGENT_KEY, self, ctx)

    @property
    def otel_context(self) -> Context:
        if self._otel_ctx is None:  # the default agent runs in the run's own context
            self._otel_ctx = otel_context.set_value(AGENT_KEY, self, self.run_context.otel_context)
        return self._otel_ctx

    @property
    def is_replaying(self) -> bool:
        return self.run_context.is_replaying

    @property
    def steps(self) -> list[Step]:
        """This agent's most recent steps (bounded by the client's ``step_history``)."""
        run = self.run_context
        if run._history_in_run_steps:
            return [step for step in run.run.steps if step.agent_id == self.agent.id]
        history = list(run._history)  # one C call: a step of the run may end on another thread
        return [s.step for s in history if s.agent_context is self]

    def __await__(self) -> Generator[Any, None, AgentContext]:
        return self
        yield  # pragma: no cover

    def __enter__(self) -> AgentContext:
        self._tokens.append(otel_context.attach(self.otel_context))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with headroom:  # as in RunContext.__exit__
            try:
                if not self.is_default:
                    if exc is not None:
                        self._end_with(exc)
                    else:
                        self.complete(None)
            finally:
                otel_context.detach(self._tokens.pop())  # type: ignore[arg-type]

    async def __aenter__(self) -> AgentContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # -- steps ---------------------------------------------------------------

    def start_step(
        self,
        name: str,
        kind: StepKind = StepKind.FUNCTION,
        input_args: tuple[Any, ...] = (),
        input_kwargs: dict[str, Any] | None = None,
        *,
        model: str | None = None,
    ) -> StepContext:
        """Start a step by hand; finish it with ``complete`` or ``fail``.

        The budget and the policy decide first, as for a decorated step: over the budget it
        raises BudgetExceededError, refused by the policy (an open circuit) PolicyViolation,
        and leaves a short failed span. An LLM step of a degraded run gets the fallback model
        (``step_ctx.model``). A rate-limit wait is made here in sync code, and when the step is
        awaited (``await agent_ctx.start_step(...)``) in async code.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"start_step: name must be a non-empty string, got {name!r}")
        kind = _step_kind("start_step", kind)
        input_args, kwargs = _step_inputs(
            "start_step", "input_args", "input_kwargs", input_args, input_kwargs
        )
        parent_ctx = self._step_parent_context()
        parent = step_in(parent_ctx)
        run = self.run_context
        digest = replay_call = None
        if run.records_replay:
            digest = input_hash(input_args, kwargs)
            if digest is None:
                run.replay_log.unhashed.add(name)  # a checkpoint warns that it cannot serve it
            else:
                # recorded like a decorated step, so that a restored run's get_step_result
                # serves it. A restored run that starts it instead of asking get_step_result
                # first runs it again: the recorded call counts as served (the replay goes on
                # past it, in order), and this one is not recorded
                began = run.replay_log.begin(name, digest, self._replay_parent(parent), input_args, kwargs)
                if isinstance(began, tuple):
                    replay_call = began
        engine = run.policy_engine
        decision = None
        try:
            if engine is not None:
                decision = engine.before_step(name, kind, model, run.ledger)
            run.ledger.begin_step()
            step = StepContext(self, name, kind, parent, managed=False)
            step.model = model
            step.input_hash = digest
            step.replay_call = replay_call
            if decision is not None:
                step._follow(decision)
                if decision.wait_seconds:
                    step.wait_before = decision.wait_seconds
            step._open(parent_ctx, spans.step_start_attributes(kind, name, model), input_args, kwargs)
            with run._lock:
                if self._manual_in_flight is None:
                    self._manual_in_flight = {}
                self._manual_in_flight[step] = None
        except BaseException as error:
            # refused, or the step could not start: it never ran, nor is it a call in flight
            if replay_call is not None:
                run.replay_log.fail(replay_call)
            if decision is not None:  # its probe and its rate-limit slot are free again
                engine.give_back(name, decision)  # type: ignore[union-attr]
            if isinstance(error, (BudgetExceededError, PolicyViolation)):
                record_step_not_run(
                    self, parent_ctx, name, kind, model, input_args, kwargs, digest=digest, refused=error
                )
            raise
        if step.wait_before:
            if not in_async_code():
                step._wait(step.wait_before)
            else:  # a sleep here would block the event loop: the step waits when awaited
                step._wait_due = step.wait_before
        return step

    def get_step_result(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        kind: StepKind = StepKind.FUNCTION,
        model: str | None = None,
    ) -> Done[tuple[bool, Any]]:
        """``(True, result)`` if the replay cache holds this step with these inputs.

        A result found is served: the step counts as called, as a decorated step served
        from the cache does, so the program returns it instead of starting the step (and
        the next call with the same inputs is the next recorded one), and the trace shows
        it as a step span with status ``skipped`` (of ``kind`` and ``model``, as the step
        would be started with). Not found, the program runs the step (``start_step``).
        Raises DeterminismError where a decorated step would (the recorded run called it
        elsewhere).
        """
        kind = _step_kind("get_step_result", kind)
        args, kwargs = _step_inputs("get_step_result", "args", "kwargs", args, kwargs)
        digest = input_hash(args, kwargs)
        if digest is None:
            return Done((False, None))
        parent_ctx = self._step_parent_context()
        parent = self._replay_parent(step_in(parent_ctx))
        found = self.run_context.replay_log.take(name, digest, parent, args, kwargs)
        if found[0]:
            note_paid_for(self.run_context, step_in(parent_ctx), found[1])
            record_step_not_run(self, parent_ctx, name, kind, model, args, kwargs, digest=digest)
        return Done(found)

    def _step_parent_context(self) -> Context:
        """The context a step made by hand starts in: the current one, or this agent's when
        called from outside this agent (the step then goes under the agent's span)."""
        parent_ctx = otel_context.get_current()
        current = agent_in(parent_ctx)
        if current is not self and not (
            self.is_default and current is None and run_in(parent_ctx) is self.run_context
        ):
            parent_ctx = self.otel_context
        return parent_ctx

    def _replay_parent(self, parent: StepContext | None) -> int | None:
        """The sequence number, in the replay log, of the call a step made inside ``parent`` runs in."""
        call = parent.replay_call if parent is not None else None
        return call[SEQ] if call is not None else self.run_context.replay_parent

    # -- state, checkpoints --------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        _check_state_key(key)
        self._state[key] = value

    def get_state(self, key: str, default: Any = None) -> Any:
        return self._state.get(key, default)

    def checkpoint(
        self, name: str | None = None, extra_state: dict[str, Any] | None = None
    ) -> Done[CheckpointMeta]:
        """Checkpoint the run, from this agent: every checkpoint of a run holds the state of
        each of its agents, restored to the agent when it starts again in the resumed run;
        ``extra_state`` goes to the run's state."""
        return self.run_context.checkpoint(name, extra_state, agent_id=self.agent.id)

    # -- usage, lifecycle ----------------------------------------------------

    def report_usage(self, usage: TokenUsage, call_id: str | None = None) -> None:
        """Charge a usage report made at agent level (outside any step); ``call_id``: the id of
        its response, if given."""
        _units, unpriced = _charge_usage(self.run_context, None, self, usage, own=True, call_id=call_id)
        if unpriced and self.run_context.client.fail_unpriced:
            raise _refuse_unpriced(usage)

    def charge_child_usage(
        self,
        usage: TokenUsage,
        *,
        metered: bool = True,
        call_id: str | None = None,
        operation: str = attr.OP_CHAT,
    ) -> None:
        """Charge usage that a span of another instrumentation reported under this agent.

        ``metered``: that instrumentation recorded ``gen_ai.client.token.usage`` for it;
        ``call_id``: the id of the response, if the span gave it; ``operation``: its
        ``gen_ai.operation.name``.
        """
        _charge_usage(
            self.run_context,
            None,
            self,
            usage,
            own=False,
            genai=not metered,
            call_id=call_id,
            operation=operation,
        )

    def _add(self, tokens: int, cost_units: int, unpriced: bool) -> None:
        if self._totals_read:  # an ended agent keeps the totals its span was given
            return
        self._cost_units += cost_units
        _write_totals(self.agent, self.agent.tokens_used + tokens, self._cost_units / COST_UNITS_PER_USD)
        self._unpriced = self._unpriced or unpriced

    def complete(self, result: Any = None) -> Done[None]:
        """Mark the agent completed; its span carries its token and cost totals."""
        self._finish(AgentStatus.COMPLETED, None)
        return Done(None)

    def fail(self, error: BaseException | str) -> Done[None]:
        self._finish(AgentStatus.FAILED, error)
        return Done(None)

    def _finish(self, status: AgentStatus, error: BaseException | str | None) -> None:
        with self.run_context._lock:
            if self._finished:
                return
            self._finished = True
        try:
            self._end(status, error)
        except BaseException as interrupt:  # a Ctrl-C meanwhile, say: the agent's span still ends
            _end_interrupted(self._span, interrupt, attr.AGENT_STATUS)
            raise

    def _end(self, status: AgentStatus, error: BaseException | str | None) -> None:
        """What ``_finish`` does, once: end the agent's steps, write its model, end its span."""
        if self._unread:
            self._end_unread()
        if self._manual_in_flight:
            self._end_open_steps(status, error)
        with self.run_context._lock:  # as _add is called
            self._totals_read = True
        agent = self.agent
        agent.status = status
        agent.completed_at = datetime.now(timezone.utc)
        if error is not None:
            agent.error = error_text(error) or type(error).__name__
        if self._span is None:
            return
        end_attrs: dict[str, Any] = {
            attr.AGENT_STATUS: status.value,
            attr.TOKENS_USED: agent.tokens_used,
            attr.COST_USD: agent.cost_usd,
        }
        if self._unpriced:
            end_attrs[attr.UNPRICED] = True
        if error is not None:
            _record_error(self._span, error, end_attrs)
        self._span.set_attributes(end_attrs)
        self._span.end()

    def _keep_unread(self, step: StepContext, cut: Callable[[], None]) -> None:
        """``step`` returned an SDK stream its caller has not read yet: ``cut`` ends the step if
        the agent ends first (the stream can still be read after). ``_unread_done`` forgets it."""
        with self.run_context._lock:
            ended = self._finished
            if not ended:
                if self._unread is None:
                    self._unread = {}
                self._unread[step] = cut
        if ended:
            cut()

    def _unread_done(self, step: StepContext) -> None:
        """The stream ``step`` returned ended: it no longer ends with the agent."""
        unread = self._unread
        if unread:
            unread.pop(step, None)

    def _end_unread(self) -> None:
        """End the steps whose stream is unread, first the one that returned it first (a step
        before the step around it that passes its stream on)."""
        unread, self._unread = self._unread, None
        for cut in list((unread or {}).values()):
            try:
                cut()
            except Exception:  # the agent ends all the same
                _logger.warning("multirun: could not end a step whose stream is unread", exc_info=True)

    def _end_open_steps(self, status: AgentStatus, error: BaseException | str | None) -> None:
        """The agent ends with steps made by hand neither completed nor failed (an error left
        the code between ``start_step`` and ``complete``): each fails with StepNotEndedError,
        the latest started first (a step before the one around it), so that its span is
        exported; its replay entry fails (a restore runs it again), and the probe of a half-open
        circuit it holds is free again, or the circuit, shared by every run, would stay
        half-open. Its outcome is unknown: it counts towards no circuit nor degradation."""
        run = self.run_context
        with run._lock:
            left, self._manual_in_flight = self._manual_in_flight or {}, None
        engine = run.policy_engine
        for step in reversed(list(left)):
            exc = StepNotEndedError(step.name, status.value)
            if isinstance(error, BaseException):
                exc.__cause__ = error
            with run._lock:  # claimed as complete() and fail() claim it: one of them ends it
                if step._done or step.finished:  # ended meanwhile, on another thread
                    continue
                step.status, step.error, step._done = StepStatus.FAILED, exc, True
            try:
                if step.replay_call is not None:
                    run.replay_log.fail(step.replay_call)
                if engine is not None:
                    engine.abandoned(step.name, step._decision)
                step._close(StepStatus.FAILED, error=exc)
            except Exception:  # the agent ends all the same
                _logger.warning("multirun: could not end step %r left open", step.name, exc_info=True)

    def _finish_default(self, status: RunStatus) -> None:
        self._finish(_AGENT_STATUS_OF_RUN.get(status, AgentStatus.FAILED), None)

    def _end_with(self, exc: BaseException) -> None:
        """End the agent left by ``exc``: cancelled by a cancellation, failed by anything else."""
        self._finish(AgentStatus.CANCELLED if is_cancellation(exc) else AgentStatus.FAILED, exc)


# ---------------------------------------------------------------------------
# step


class StepContext:
    """One execution of a step.

    A plain object, not a pydantic model, because one is made for every step:
    only the fields set on every step are assigned in ``__init__``, the rest
    fall back to the class-level defaults until they are needed.
    """

    # defaults of the fields that most steps never change
    attempt = 1
    tokens_used = 0
    _cost_units = 0
    unpriced = False
    child_usage_reported = False
    call_timed_below = False  # a model call inside was timed (by its instrumentation, or a step)
    refused = False  # refused by the budget or policy before it ran: no model call was made
    # (usage, cost units, unpriced, reply: its response id, finish reasons, server) of each call
    _own_usage: list[tuple[TokenUsage, int, bool, Reply]] | None = None
    # the gen_ai.operation.name of the model call it returned when that is no chat (embeddings,
    # text_completion): read from the SDK response; None for a chat and every other step
    _operation: str | None = None
    # it charged a model call read from an LLM SDK response it returned or streamed: whatever
    # its kind, the step is that call, and times it in gen_ai.client.operation.duration
    _returned_call = False
    # the model calls charged in this step or a step inside it, by response id and input and
    # output tokens (see _call_key), latest last
    _calls_below: dict[CallKey, None] | None = None
    policy_decision: str | None = None
    policy_rule: str | None = None
    wait_before = 0.0  # seconds a rate limit asked the step to wait before it runs
    fallback_model: str | None = None  # the model the policy's degradation rule switched it to
    _decision: Decision = PROCEED  # the policy's, for the attempt in flight (its circuit ticket)
    # the decisions counted for it (decision, rule): once each per step, however many attempts
    _counted: tuple[tuple[str, str | None], ...] = ()
    # the error of its last attempt, when a refusal of the next one is the step's error: the
    # error its model call is timed with (the call failed so; the refusal is multirun's)
    _call_error: BaseException | None = None
    # its input and output as the span records them: only with content capture (opt-in)
    _input_text: str | None = None
    _output_text: str | None = None
    _wait_due = 0.0  # that wait, for a step made by hand in async code: made when awaited
    _done = False

    def __init__(
        self,
        agent_context: AgentContext,
        name: str,
        kind: StepKind,
        parent: StepContext | None,
        managed: bool,  # not keyword-only: a class called with a keyword costs ~1,200 instructions more
    ) -> None:
        self.agent_context = agent_context
        self.run_context = agent_context.run_context
        self.name = name
        self.kind = kind
        self.parent = parent
        self.managed = managed
        self.status = StepStatus.RUNNING
        # Every field the common path writes later, assigned here first and always in this order:
        # instances then share one attribute layout; a field first written later, or in another
        # order, makes CPython give that instance a dict of its own (about 2 us per step).
        self._span: Span | None = None
        self._id = ""  # the hex span id, once the span is started
        # start and end (ns) kept by the step itself: from its start when its span keeps no
        # times (not recorded: sampled out, the SDK disabled), else from its span as it ends
        self._own_times: tuple[int | None, ...] | None = None
        self.otel_context: Context | None = None
        self.model: str | None = None
        self.input_hash: str | None = None
        self.replay_call: Call | None = None
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None

    # -- the parts the decorators call ---------------------------------------

    def _open(
        self,
        parent_ctx: Context,
        start_attrs: dict[str, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        span_name: str | None = None,
    ) -> None:
        client = self.run_context.client
        if client.capture_content:
            self._input_text = rendered = render_call(args, kwargs, client.content_limit)
            start_attrs = {**start_attrs, attr.STEP_INPUT: rendered}
        kind = self.kind
        if kind is StepKind.LLM_CALL:
            name = spans.step_span_name(kind, self.name, self.model)
            if self.model and start_attrs.get(attr.GEN_AI_REQUEST_MODEL) != self.model:
                start_attrs = {**start_attrs, attr.GEN_AI_REQUEST_MODEL: self.model}
            span_kind = _CLIENT  # the conventions' inference span: a request to a model's server
        else:
            name = span_name or spans.step_span_name(kind, self.name, None)
            span_kind = _INTERNAL
        span = client.tracer.start_span(
            name, context=parent_ctx, kind=span_kind, attributes=start_attrs or None
        )
        self._span = span
        span_id = span.get_span_context().span_id
        # a no-op tracer's spans (the SDK disabled) all have span id 0: the step gets one of its own.
        # "%016x" %: the same text as f"{span_id:016x}", about 1,000 instructions cheaper
        self._id = step_id = "%016x" % (span_id or random.getrandbits(64) or 1)
        # a span not recorded (sampled out, the SDK disabled; Logfire's wrapper of one) keeps no
        # times: the step keeps them. The SDK's spans, nearly all of them, are told by one test.
        if type(span) is not _SdkSpan and not span.is_recording():
            self._own_times = (time.time_ns(),)
        # Run.current_step_id, written past pydantic's __setattr__: this runs for every step
        self.run_context.run.__dict__["current_step_id"] = step_id
        # one copy of the context instead of two (set_span_in_context, then set_value)
        ctx = Context(parent_ctx)
        dict.__setitem__(ctx, SPAN_KEY, span)
        dict.__setitem__(ctx, STEP_KEY, self)
        self.otel_context = ctx

    @property
    def span(self) -> Span:
        """The step's span; once the step ended, a non-recording stand-in with its span context."""
        span = self._span
        if span is None:  # ended: its span's context is the run's, with the step's span id
            assert self.finished, "the step's span is not started yet"
            run = self.run_context.span.get_span_context()
            ended = SpanContext(run.trace_id, int(self._id, 16), False, run.trace_flags, run.trace_state)
            return NonRecordingSpan(ended)
        return span

    @property
    def id(self) -> str:
        """The step id: the hex span id of its span (so a step is found by its span)."""
        return self._id

    def _record_attempt_failure(
        self, exc: BaseException, delay: float | None, event: dict[str, Any] | None = None
    ) -> None:
        """A failed attempt: an event with its error, and the delay before the next attempt
        (``None``: there is none, the policy refused it). The next attempt is counted when it
        starts (``_next_attempt``): one cancelled in that delay was never made. ``event``: the
        error's ``exception_event``, made before."""
        attributes: dict[str, Any] = {attr.STEP_ATTEMPT: self.attempt, attr.ERROR_TYPE: _error_type(exc)}
        if delay is not None:
            attributes[attr.STEP_RETRY_DELAY] = delay
        record_exception(self.span, exc, attributes, event=event)

    def _next_attempt(self) -> None:
        """Another attempt starts: ``attempt`` is its number."""
        self.attempt += 1

    def _close(
        self,
        status: StepStatus,
        result: Any = None,
        error: BaseException | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        if not self._done:
            self.status = status
            self.result = result
            self.error = error
        run = self.run_context
        client = run.client
        span = self._span
        assert span is not None
        end_attrs: dict[str, Any] = {
            attr.STEP_NAME: self.name,
            attr.STEP_KIND: _KIND_VALUES[self.kind],
            attr.STEP_ID: self._id,
            attr.STEP_STATUS: _STATUS_VALUES[self.status],
            attr.STEP_ATTEMPT: self.attempt,
            attr.POLICY_DECISION: self.policy_decision or "proceed",
        }
        if self.input_hash is not None:
            end_attrs[attr.STEP_INPUT_HASH] = self.input_hash
        if self.tokens_used or self._cost_units or self.unpriced:
            end_attrs[attr.TOKENS_USED] = self.tokens_used
            end_attrs[attr.COST_USD] = self._cost_units / COST_UNITS_PER_USD
            if self.unpriced:
                end_attrs[attr.UNPRICED] = True
        if self._own_usage:
            operation = self._operation
            _usage_attributes(self._own_usage, end_attrs, operation)
            model = self._own_usage[-1][0].model
            if self.kind is StepKind.LLM_CALL and operation is not None:  # embeddings, say: no chat
                end_attrs[attr.GEN_AI_OPERATION_NAME] = operation
                span.update_name(f"{operation} {self.model or model}" if self.model or model else operation)
            elif model and self.kind is StepKind.LLM_CALL and not self.model:
                span.update_name(spans.step_span_name(self.kind, self.name, model))
        if self.policy_decision is not None:
            if self.policy_rule is not None:
                end_attrs[attr.POLICY_RULE] = self.policy_rule
            if self.wait_before:
                end_attrs[attr.POLICY_WAIT_SECONDS] = self.wait_before
            if self.fallback_model is not None:
                end_attrs[attr.POLICY_FALLBACK_MODEL] = self.fallback_model
        if extra:
            end_attrs.update(extra)
        if client.capture_content and self.status is StepStatus.COMPLETED:
            end_attrs[attr.STEP_OUTPUT] = self._output_text = render(self.result, client.content_limit)
        interrupted = None
        if self.error is not None:
            try:
                _record_error(span, self.error, end_attrs)
            except BaseException as interrupt:
                # Ctrl-C while the program's code told the error (its message): the step still
                # ends, failed with the interrupt, which goes on once the step has ended
                self.error = interrupted = interrupt
                _record_error(span, interrupt, end_attrs)
        spans.set_end_attributes(span, end_attrs)
        span.end()
        # The run keeps its last ``step_history`` steps: they keep their times (a tuple of ints,
        # which the cyclic GC stops tracking), not their span, about 2.8 KiB and a dozen objects
        # for the GC to walk (1,000 concurrent runs of 100 steps held 280 MiB of spans).
        times = self._own_times
        if times is not None:
            self._own_times = (times[0], time.time_ns())
        elif type(span) is _SdkSpan:
            self._own_times = (span.start_time, span.end_time)
        else:
            self._own_times = (getattr(span, "start_time", None), getattr(span, "end_time", None))
        self._span = None
        _step_metrics(self, end_attrs.get(attr.ERROR_TYPE))
        # The step's context holds the step: dropping it breaks that cycle, so a finished step
        # is freed by reference counting instead of waiting for (and feeding) the cyclic GC.
        self.otel_context = None
        if not client.capture_content:
            self.result = None  # the history must not keep large results alive
        fields = run.run.__dict__
        if fields.get("current_step_id") is self._id:  # no step started since: back to the one around
            fields["current_step_id"] = None if self.parent is None else _running_step_around(self)
        if not run._history_in_run_steps:  # else the run has ended, and Run.steps is made
            run._history.append(self)  # atomic: see RunContext._finish
        if interrupted is not None:
            raise interrupted

    # -- the documented API ----------------------------------------------------

    def __await__(self) -> Generator[Any, None, StepContext]:
        wait = self._wait_due
        if wait:
            self._wait_due = 0.0  # awaited twice, it waits once
            try:
                yield from self.run_context.client.clock.async_sleep(wait).__await__()
                self._resume()
            except BaseException as error:
                self._end_waiting(error)
                raise
        return self

    def _wait(self, seconds: float) -> None:
        """Wait for the rate limit's slot before a step made by hand runs (sync code)."""
        try:
            self.run_context.client.clock.sleep(seconds)
            self._resume()
        except BaseException as error:
            self._end_waiting(error)
            raise

    def _follow(self, decision: Decision) -> None:
        """Take the policy's ``decision`` on this step (or on its next attempt): kept for its
        outcome and its give-back; unless it is proceed, counted and applied (the fallback
        model). A rate-limit wait is the caller's to make."""
        self._decision = decision
        if decision.decision is PolicyDecision.PROCEED:
            return
        self._count_decision(decision.decision.value, decision.rule)
        self.policy_decision, self.policy_rule = decision.decision.value, decision.rule
        if decision.model is not None:
            span = self._span
            if span is not None and decision.model != self.model:  # a retry switched: its span says so
                span.set_attribute(attr.GEN_AI_REQUEST_MODEL, decision.model)
                span.update_name(spans.step_span_name(self.kind, self.name, decision.model))
            self.model = self.fallback_model = decision.model
            if decision.decision is not PolicyDecision.FALLBACK:  # it waited too: both are counted
                self._count_decision(PolicyDecision.FALLBACK.value, "graceful_degradation")

    def _count_decision(self, decision: str, rule: str | None) -> None:
        """Count ``decision`` in the metrics, unless this step (an earlier attempt) got it already."""
        counted = self._counted
        if (decision, rule) not in counted:
            self._counted = (*counted, (decision, rule))
            run = self.run_context
            run.client.metrics.policy_decision(run.run.name, decision, rule)

    def _note_refusal(self, refused: PolicyViolation) -> None:
        """The policy refused this step (or its next attempt): on its span, and counted."""
        self.policy_decision, self.policy_rule = PolicyDecision.ABORT.value, refused.rule
        run = self.run_context
        run.client.metrics.policy_decision(run.run.name, PolicyDecision.ABORT.value, refused.rule)

    def _note_budget_refusal(self, refused: BudgetExceededError) -> None:
        """The budget refused this step's next attempt: on its span, and counted, as a step
        refused before it ran is."""
        self.policy_decision, self.policy_rule = PolicyDecision.ABORT.value, "budget"
        self.span.set_attribute(attr.BUDGET_EXCEEDED_LIMIT, refused.limit)
        run = self.run_context
        metrics = run.client.metrics
        metrics.budget_exceeded(run.run.name, refused.limit, self.otel_context)
        metrics.policy_decision(run.run.name, PolicyDecision.ABORT.value, "budget")

    def _resume(self, after: BaseException | None = None) -> None:
        """The step's wait (for its rate-limit slot, a retry's backoff) is over: the circuit, if
        it changed meanwhile, is asked again. PolicyViolation if it is open, caused by ``after``:
        the error of the attempt that a retry was to follow."""
        run = self.run_context
        if run.policy_engine is None:
            return
        try:
            self._decision = run.policy_engine.resume(self.name, self._decision)
        except PolicyViolation as refused:
            self._note_refusal(refused)
            if after is None:
                self.refused = True  # the step never ran: no model call was made
            else:
                self._call_error = after
            raise refused from after

    def _end_waiting(self, error: BaseException) -> None:
        """Cancelled or interrupted while it waited for its slot, or refused by a circuit that
        opened meanwhile: the step ends failed, its span ended, its circuit probe and its unused
        slot given back."""
        if not (self._done or self.finished):
            self._give_back()
            self.fail(error)

    def _give_back(self, slot: bool = True) -> None:
        """The step (or its attempt) ends without an answer from its dependency (cancelled,
        interrupted, or refused or timed out while it waited): its circuit probe is free again,
        and with ``slot`` (its attempt never started) the rate-limit slot reserved for that
        attempt. Given back once: the step keeps no decision after, and its outcome counts for
        nothing (``GIVEN_BACK``) until it asks the policy again."""
        engine = self.run_context.policy_engine
        decision, self._decision = self._decision, GIVEN_BACK
        if engine is not None:
            engine.give_back(self.name, decision if slot else decision._replace(slot=None))

    def report_usage(self, usage: TokenUsage, call_id: str | None = None, reply: Reply = None) -> None:
        """Charge one model call to this step, its parents, its agent and its run. Usage that
        names no model is the step's model's (the fallback model once the run degraded), as in
        ``complete(tokens_used=...)``. ``call_id``: the id of its response; ``reply``: its
        finish reasons, as span attributes (``report_usage``'s)."""
        if usage.model is None and self.model is not None:
            usage = replace(usage, model=self.model)
        self._report_call(usage, call_id, attr.OP_CHAT, reply)

    def _report_call(
        self, usage: TokenUsage, call_id: str | None, operation: str = attr.OP_CHAT, reply: Reply = None
    ) -> None:
        units, unpriced = _charge_usage(
            self.run_context, self, self.agent_context, usage, own=True, call_id=call_id, operation=operation
        )
        if call_id is not None:
            reply = {attr.GEN_AI_RESPONSE_ID: call_id, **(reply or {})}
        report = (usage, units, unpriced, reply)
        if self._own_usage is None:
            self._own_usage = [report]
        else:
            self._own_usage.append(report)
        if unpriced and self.run_context.client.fail_unpriced:
            raise _refuse_unpriced(usage)

    def _charge_response_usage(self, *calls: ModelCall) -> bool:
        """Charge the model calls read from what the step returned, unless they are charged
        already: reported by the step itself, by a span of a GenAI instrumentation inside it
        (openai-v2, say), or, by their response id, by a step inside it whose response this
        one passes on (however that step's call was charged) or by such a span anywhere in the
        run tree (a call made in a run's or an agent's body), so no call is counted twice.
        False if the step's calls were charged."""
        if self._own_usage is not None or self.child_usage_reported:
            # the step's calls, which it returns, are charged: a step around it that passes
            # them on must not charge them again
            _note_calls_around(self, [_call_key(call[0], call[1]) for call in calls if call[0] is not None])
            run = self.run_context
            if run._top._span_calls is not None:  # matched here, a span's call spares no later step
                for call_id, usage, _, _ in calls:
                    if call_id is not None:
                        run._charged_by_span(call_id, usage)
            return False
        below = self._calls_below
        run = self.run_context
        by_spans = run._top._span_calls is not None  # charged where no step saw it
        refused: PolicyViolation | None = None
        for call_id, usage, operation, reply in calls:
            if (below is None or call_id is None or _call_key(call_id, usage) not in below) and not (
                by_spans and call_id is not None and run._charged_by_span(call_id, usage)
            ):
                if operation != attr.OP_CHAT:
                    self._operation = operation
                self._returned_call = True
                try:
                    self._report_call(usage, call_id, operation, reply)
                except PolicyViolation as unpriced:  # init(unpriced="fail"): the other calls count too
                    refused = refused or unpriced
        if refused is not None:
            raise refused
        return True

    def charge_child_usage(
        self,
        usage: TokenUsage,
        *,
        metered: bool = True,
        call_id: str | None = None,
        operation: str = attr.OP_CHAT,
    ) -> None:
        """Charge usage that a span of another instrumentation reported inside this step.

        It counts in the roll-ups (``multirun.tokens_used``) but not as this
        step's own ``gen_ai.usage.*``, so no backend adds it twice; nor in
        ``gen_ai.client.token.usage`` when that instrumentation recorded it (``metered``).
        ``call_id``: the id of the response, if the span gave it; ``operation``: its
        ``gen_ai.operation.name``.
        """
        self.child_usage_reported = True
        _charge_usage(
            self.run_context,
            self,
            self.agent_context,
            usage,
            own=False,
            genai=not metered,
            call_id=call_id,
            operation=operation,
        )

    def _add(self, tokens: int, cost_units: int, unpriced: bool) -> None:
        self.tokens_used += tokens
        self._cost_units += cost_units
        self.unpriced = self.unpriced or unpriced

    @property
    def cost_usd(self) -> float:
        return self._cost_units / COST_UNITS_PER_USD

    def complete(
        self,
        result: Any = None,
        tokens_used: int | None = None,
        cost_usd: float | None = None,
    ) -> Done[None]:
        """Record the step's result and usage: ``tokens_used`` counts as output tokens of the
        step's model, priced as such unless ``cost_usd`` is given (unpriced if the step names no
        model). A step made by hand whose usage report is refused (``init(unpriced="fail")``)
        ends failed with the refusal."""
        self._refuse_if_ended()
        usage = None
        if tokens_used is not None or cost_usd is not None:
            if tokens_used is not None and (
                isinstance(tokens_used, bool)
                or not isinstance(tokens_used, int)
                or not 0 <= tokens_used <= MAX_TOKENS
            ):
                raise ConfigurationError(f"tokens_used must be an int from 0 to 2**63-1, got {tokens_used!r}")
            usage = TokenUsage(
                model=self.model,
                output_tokens=tokens_used or 0,
                cost_usd=cost_usd,
            )
        if not self.managed:
            self._claim(StepStatus.COMPLETED)  # before its usage: charged only by the call that ends it
        if usage is not None:
            try:
                self.report_usage(usage)
            except BaseException as refused:
                if not self.managed:  # claimed: it must not stay open
                    self._end_failed(refused)
                raise
            if type(result) not in NOT_A_RESPONSE or type(result) is list or type(result) is tuple:
                note_paid_for(self.run_context, self, result)  # the report is its call's
        self.status = StepStatus.COMPLETED
        self.result = result
        self._done = True
        if not self.managed:  # a decorated step's decorator does the rest
            self._ended_by_hand()
            run = self.run_context
            if self.replay_call is not None:
                run.replay_log.record(self.replay_call, result)
            if run.policy_engine is not None:
                run.policy_engine.after_success(self.name, self.kind, self._decision)
            self._close(StepStatus.COMPLETED, result)
        return Done(None)

    def fail(self, error: BaseException | str) -> Done[None]:
        self._refuse_if_ended()
        exc = error if isinstance(error, BaseException) else RuntimeError(str(error))
        if not self.managed:
            self._claim(StepStatus.FAILED)
            self._end_failed(exc)
            return Done(None)
        self.status = StepStatus.FAILED  # a decorated step's decorator does the rest
        self.error = exc
        self._done = True
        return Done(None)

    def _claim(self, status: StepStatus) -> None:
        """``complete`` or ``fail`` of a step made by hand ends it, not its agent's end on
        another thread (``_end_open_steps``): whichever claims it first under the run's lock.
        RuntimeError if it is ended already."""
        with self.run_context._lock:
            self._refuse_if_ended()
            self.status, self._done = status, True

    def _end_failed(self, exc: BaseException) -> None:
        """End a step made by hand, claimed, failed with ``exc``."""
        self.status = StepStatus.FAILED
        self.error = exc
        self._ended_by_hand()
        run = self.run_context
        if self.replay_call is not None:  # recorded as failed: a restore runs it again
            run.replay_log.fail(self.replay_call)
        if run.policy_engine is not None:  # towards the circuit and the degradation trigger
            run.policy_engine.after_step(self.name, self.kind, exc, self._decision)
        self._close(StepStatus.FAILED, error=exc)

    def _ended_by_hand(self) -> None:
        """A step made by hand was completed or failed: its agent's end no longer ends it."""
        in_flight = self.agent_context._manual_in_flight
        if in_flight:
            in_flight.pop(self, None)

    def _refuse_if_ended(self) -> None:
        """A step is completed or failed once: a second call would charge its usage again."""
        if self._done or self.finished:
            raise RuntimeError(
                f"step {self.name!r} is already {self.status.value}: complete() and fail() end a step once"
            )

    def _times(self) -> tuple[int | None, int | None]:
        """Its start and end (ns since the epoch), None while not started or not ended."""
        times = self._own_times
        if times is not None:
            return times[0], times[1] if len(times) > 1 else None
        span = self._span
        return getattr(span, "start_time", None), getattr(span, "end_time", None)

    @property
    def latency_ms(self) -> int:
        start, end = self._times()
        if start is None or end is None:
            return 0
        return (end - start) // 1_000_000

    @property
    def step(self) -> Step:
        """This step as a ``Step`` model (built on demand)."""
        return _step_model(self._facts())

    def _facts(self) -> tuple[Any, ...]:
        """What the ``Step`` model of this step is made of: plain values only, so keeping them
        (a run's kept steps, until ``Run.steps`` is read) keeps no context, span or traceback."""
        had_span = self._id != ""
        parent = self.parent
        error = self.error
        return (
            self._id,  # "" for a step without a span
            self.run_context.run.id,
            self.agent_context.agent.id,
            self.name,
            self.kind,
            self.status,
            None if parent is None else parent._id,  # no parent; "" for a parent without a span
            self.input_hash,
            # as on its span: a step that started was let through, by a policy or for want of one
            self.policy_decision or ("proceed" if had_span else None),
            self.tokens_used,
            self._cost_units,
            *self._times(),
            None if error is None else (error_text(error) or type(error).__name__),
            self.attempt,
            self._input_text,
            self._output_text,
        )


def _check_state_key(key: Any) -> None:
    """Refuse a state key that is no string: a JSON checkpoint writes every key as one, and
    ``get_state(key)`` would find nothing after a restore."""
    if not isinstance(key, str):
        raise ConfigurationError(f"set_state(key=...) must be a string, got {type(key).__name__} {key!r}")


def _step_kind(where: str, kind: Any) -> StepKind:
    try:
        return StepKind(kind)
    except ValueError:
        allowed = ", ".join(repr(member.value) for member in StepKind)
        raise ConfigurationError(f"{where}(kind=...) must be one of {allowed}, got {kind!r}") from None


def _step_inputs(
    where: str, args_param: str, kwargs_param: str, args: Any, kwargs: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a step made by hand, as a tuple and a dict (a list of arguments is
    taken as a tuple); a str, the classic ``(prompt)`` for ``(prompt,)``, is refused."""
    if isinstance(args, list):
        args = tuple(args)
    elif not isinstance(args, tuple):
        raise ConfigurationError(
            f"{where}({args_param}=...) must be a tuple of the step's arguments, got "
            f"{type(args).__name__} {args!r:.80} (one argument is written (x,))"
        )
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, dict):
        raise ConfigurationError(
            f"{where}({kwargs_param}=...) must be a dict of the step's keyword arguments, got "
            f"{type(kwargs).__name__} {kwargs!r:.80}"
        )
    return args, kwargs


def check_string_keys(where: str, param: str, value: Any) -> None:
    """Refuse a ``value`` of ``where(param=...)`` that is neither None nor a dict with string
    keys: JSON (a checkpoint, a run record) keeps every key as a string, as ``set_state`` does."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigurationError(
            f"{where}({param}=...) must be a dict with string keys, got {type(value).__name__} {value!r}"
        )
    for key in value:
        if not isinstance(key, str):
            raise ConfigurationError(
                f"{where}({param}=...) must be a dict with string keys, "
                f"got key {key!r} ({type(key).__name__})"
            )


def _running_step_around(step: StepContext) -> str | None:
    """The id of the innermost step of ``step``'s run still running around it, if any."""
    around = step.parent
    while around is not None and around.finished:
        around = around.parent
    return around._id if around is not None and around.run_context is step.run_context else None


def record_step_not_run(
    agent: AgentContext,
    parent_ctx: Context,
    name: str,
    kind: StepKind,
    model: str | None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    digest: str | None = None,
    refused: BudgetExceededError | PolicyViolation | None = None,
    start_attrs: dict[str, Any] | None = None,
) -> None:
    """A short span for a step that did not run: served from the replay cache (status
    skipped), or refused by the budget or the policy before it started (failed, ``abort``)."""
    step = StepContext(agent, name, kind, step_in(parent_ctx), managed=True)
    step.input_hash = digest
    step.model = model
    if start_attrs is None:
        start_attrs = spans.step_start_attributes(kind, name, model)
    step._open(parent_ctx, start_attrs, args, kwargs or {})
    if refused is None:
        step._close(StepStatus.SKIPPED)
        return
    step.policy_decision = PolicyDecision.ABORT.value
    step.refused = True
    extra: dict[str, Any] = {}
    metrics = agent.run_context.client.metrics
    run_name = agent.run_context.run.name
    if isinstance(refused, BudgetExceededError):
        step.policy_rule = "budget"
        extra[attr.BUDGET_EXCEEDED_LIMIT] = refused.limit
        metrics.budget_exceeded(run_name, refused.limit, step.otel_context)
    else:
        step.policy_rule = refused.rule
    metrics.policy_decision(run_name, PolicyDecision.ABORT.value, step.policy_rule)
    step._close(StepStatus.FAILED, error=refused, extra=extra)


def _step_model(facts: tuple[Any, ...]) -> Step:
    """A ``Step`` model from ``StepContext._facts()``."""
    (
        step_id,
        run_id,
        agent_id,
        name,
        kind,
        status,
        parent_step_id,
        input_hash,
        policy_decision,
        tokens_used,
        cost_units,
        start,
        end,
        error,
        attempt,
        input_text,
        output_text,
    ) = facts
    # Only the fields that differ from the model's defaults: each field given is one more to set.
    fields: dict[str, Any] = {
        "id": step_id,
        "run_id": run_id,
        "agent_id": agent_id,
        "name": name,
        "kind": kind,
        "status": status,
    }
    if parent_step_id is not None:
        fields["parent_step_id"] = parent_step_id
    if input_hash:
        fields["input_hash"] = input_hash
    if policy_decision is not None:
        fields["policy_decision"] = policy_decision
    if tokens_used:
        fields["tokens_used"] = tokens_used
    if cost_units:
        fields["cost_usd"] = cost_units / COST_UNITS_PER_USD
    if start is not None:
        fields["started_at"] = datetime.fromtimestamp(start / 1e9, timezone.utc)
        if end is not None:
            fields["latency_ms"] = (end - start) // 1_000_000
            fields["completed_at"] = datetime.fromtimestamp(end / 1e9, timezone.utc)
    if error is not None:
        fields["error"] = error
    if input_text is not None:
        fields["input_data"] = input_text.encode("utf-8", "backslashreplace")  # a lone surrogate as \udxxx
    if output_text is not None:
        fields["output_data"] = output_text.encode("utf-8", "backslashreplace")
    if attempt != 1:
        fields["attempt"] = attempt
    return construct_trusted(Step, fields)  # every value made here: no validation needed


# ---------------------------------------------------------------------------
# helpers


_AGENT_STATUS_OF_RUN = {
    RunStatus.COMPLETED: AgentStatus.COMPLETED,
    RunStatus.CANCELLED: AgentStatus.CANCELLED,
}


_STATUS_VALUES = {status: status.value for status in StepStatus}  # Enum.value is a slow property
_KIND_VALUES = {kind: kind.value for kind in StepKind}
_CLIENT, _INTERNAL = SpanKind.CLIENT, SpanKind.INTERNAL  # a step span's kind: no enum lookup per step


def _span_context(ids: dict[str, str]) -> trace.SpanContext | None:
    """The span context of the run a checkpoint came from, for a link; None if unknown."""
    try:
        context = trace.SpanContext(
            int(ids["trace_id"], 16), int(ids["span_id"], 16), is_remote=True, trace_flags=trace.TraceFlags(1)
        )
    except (KeyError, ValueError):
        return None
    return context if context.is_valid else None


def _refresh(ledger: Ledger) -> None:
    """Fetch a shared ledger's totals (other processes spent too); a warning if it cannot."""
    refresh = getattr(ledger, "refresh", None)
    if refresh is None:
        return
    try:
        refresh()
    except Exception as exc:
        _logger.warning("multirun: could not read the shared totals of run %s: %s", ledger.run_id, exc)


def _step_metrics(step: StepContext, error_type: str | None) -> None:
    """Count the finished step; an LLM step that made the call itself, or a step that returned
    the call's SDK response, also times the call."""
    # the duration is read only for the steps it is recorded for (see Metrics.step_finished,
    # and llm_call_finished below): not for a plain function step that completed
    if step.kind in TIMED_STEP_KINDS or step.status is StepStatus.FAILED or step._returned_call:
        times = step._own_times  # kept as the step ended
        start, end = (times[0], times[-1]) if times else (None, None)
        duration = (end - start) / 1e9 if start is not None and end is not None else 0.0
    else:
        duration = 0.0
    run = step.run_context
    metrics = run.client.metrics
    # the step's own context for the exemplars: a step made by hand is not the current span
    context = step.otel_context
    metrics.step_finished(
        run.run.name, step.agent_context.agent.name, step.kind, step.status, duration, error_type, context
    )
    if (
        (step.kind is StepKind.LLM_CALL or step._returned_call)
        and not step.child_usage_reported
        and not step.call_timed_below
        and step.status is not StepStatus.SKIPPED
        and not step.refused
    ):
        usage = step._own_usage[-1][0] if step._own_usage else None
        call_error = step._call_error
        metrics.llm_call_finished(
            step._operation or attr.OP_CHAT,
            usage.provider if usage is not None else None,
            step.model or (usage.model if usage is not None else None),
            usage.model if usage is not None else None,
            duration,
            error_type if call_error is None else _error_type(call_error),
            context,
        )
        agent = step.agent_context
        if step.parent or agent.parent_step or agent.parent_agent or run.parent:  # else none is around
            note_call_timed(step)  # an LLM step around this one is a wrapper of the same call


def _charge_usage(
    run: RunContext,
    step: StepContext | None,
    agent: AgentContext,
    usage: TokenUsage,
    *,
    own: bool,
    genai: bool = True,
    call_id: str | None = None,
    operation: str = attr.OP_CHAT,
) -> tuple[int, bool]:
    """Price one usage report, charge it up the chain and count it in the metrics.

    ``own`` is False for usage another instrumentation reported on its own span;
    ``genai`` False when that instrumentation recorded ``gen_ai.client.token.usage``.
    ``call_id``, the response id of the call, is noted on every step it is charged to;
    ``operation``: its ``gen_ai.operation.name``.
    Returns the cost in integer units and whether it was unpriced.
    """
    client = run.client
    tokens, units, unpriced = client.price(usage)
    call = _call_key(call_id, usage) if call_id is not None else None
    _charge_chain(run, step, agent, tokens, units, unpriced, call)
    if call_id is not None and not own:
        run._note_span_call(call_id, usage)
    if run._totals_read:
        _warn_usage_after_end(run, step, tokens)
    output_tokens: int | None = usage.output_tokens
    if operation == attr.OP_EMBEDDINGS and not output_tokens:
        output_tokens = None  # it has no output: no 0 in the distribution of output tokens
    client.metrics.usage_reported(
        run_name=run.run.name,
        agent_name=agent.agent.name,
        operation=operation,
        provider=usage.provider,
        request_model=(step.model if step is not None else None) or usage.model,
        response_model=usage.model,
        input_tokens=usage.input_tokens,
        output_tokens=output_tokens,
        cost_usd=None if unpriced else units / COST_UNITS_PER_USD,
        genai=genai,
        context=step.otel_context if step is not None else None,  # a step made by hand is not current
    )
    processor = client.usage_processor
    if own and processor is not None:  # another instrumentation's span tells the processor itself
        processor.charged_inside(step if step is not None else agent)
    return units, unpriced


def note_call_timed(holder: StepContext | AgentContext) -> None:
    """A model call in ``holder`` was timed in ``gen_ai.client.operation.duration``: ``holder``
    and the steps around it, in this run and the runs around it, do not time it again."""
    for current in _enclosing(holder):
        if isinstance(current, StepContext):
            current.call_timed_below = True


def enclosing_spans(holder: StepContext | AgentContext) -> list[Span]:
    """The spans of ``holder`` and of every step, agent and run around it (in no order)."""
    return [current._span for current in _enclosing(holder) if current._span is not None]


def note_paid_for(run: RunContext, step: StepContext | None, value: Any) -> None:
    """The LLM SDK responses in ``value`` (one level deep in a list or tuple, as a step's are
    charged) were paid for already: served from a checkpoint (the recorded run paid), or
    reported by hand (``complete(response, tokens_used=...)``). A step around ``step``, or a
    later step, that returns them is not charged for them again."""
    keys = []
    for response, (call_id, usage, *_) in calls_in(value):
        run._returned_before(response, call_id)  # noted as returned: not charged when returned again
        if call_id is not None:
            keys.append(_call_key(call_id, usage))
    if step is not None:
        _note_calls_around(step, keys)  # a copy of it returned around it is not charged either


def _note_calls_around(step: StepContext, keys: list[CallKey]) -> None:
    """Note on ``step`` and every step around it that the calls ``keys`` are charged."""
    if not keys:
        return
    for current in _enclosing(step):
        if isinstance(current, StepContext):
            with current.run_context._lock:
                for key in keys:
                    _note_call(current, key)


def _enclosing(
    holder: StepContext | AgentContext,
) -> list[StepContext | AgentContext | RunContext]:
    """``holder`` and every step, agent and run around it, in this run and the runs around it."""
    found: list[StepContext | AgentContext | RunContext] = []
    seen: set[int] = set()
    todo: list[StepContext | AgentContext | RunContext | None] = [holder]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        if isinstance(current, StepContext):
            todo += (current.parent, current.agent_context)
        elif isinstance(current, AgentContext):
            todo += (current.parent_step, current.parent_agent, current.run_context)
        else:
            todo += (current.parent_step, current.parent_agent, current.parent)
    return found


def _warn_usage_after_end(run: RunContext, step: StepContext | None, tokens: int) -> None:
    """Say (once per run) that usage reported after ``run`` and every run around it ended
    is in no run's total; a parent still running counts it, and nothing is said."""
    outer = run.parent
    while outer is not None:
        if not outer._totals_read:
            return
        outer = outer.parent
    with run._lock:
        if run._late_usage_warned:
            return
        run._late_usage_warned = True
    _logger.warning(
        "multirun: %d tokens were reported%s after run %r (%s) ended: they are in no run's total, only "
        "in the usage metrics and the step's span. Wait for the work a run starts (a Motus future, a "
        "stream) before it returns. Logged once per run.",
        tokens,
        f" by step {step.name!r}" if step is not None else "",
        run.run.name,
        run.run.id,
    )


def _refuse_unpriced(usage: TokenUsage) -> PolicyViolation:
    """The error of ``init(unpriced="fail")`` for a report already counted and flagged."""
    return PolicyViolation(
        "unpriced",
        f"model {usage.model!r} has no known price and init(unpriced='fail') is set; give its price "
        f"with init(prices={{{usage.model!r}: multirun.Price(input_per_mtok=..., output_per_mtok=...)}})",
    )


def _charge_chain(
    run: RunContext,
    step: StepContext | None,
    agent: AgentContext | None,
    tokens: int,
    cost_units: int,
    unpriced: bool,
    call: CallKey | None = None,
) -> None:
    """Add one usage report to the step, every enclosing step and agent, and the run;
    ``call``, the key of its response, is noted on each of those steps.

    For a sub-run the walk goes on in the parent run, from the step (or
    agent) that called it, so every span above the spend rolls it up.
    """
    run.ledger.charge(tokens, cost_units, unpriced)  # this run and every ancestor run
    current: RunContext | None = run
    while current is not None:
        with current._lock:
            seen: AgentContext | None = None
            if step is None and agent is not None:
                agent._add(tokens, cost_units, unpriced)
                seen = agent
                step = agent.parent_step
            while True:
                while step is not None:
                    step._add(tokens, cost_units, unpriced)
                    if call is not None:
                        _note_call(step, call)
                    if step.agent_context is not seen:
                        seen = step.agent_context
                        seen._add(tokens, cost_units, unpriced)
                    step = step.parent
                # an agent started directly in another agent (no step between) rolls up into it
                outer = seen.parent_agent if seen is not None and seen.parent_step is None else None
                if outer is None:
                    break
                outer._add(tokens, cost_units, unpriced)
                seen, step = outer, outer.parent_step
            if not current._finished:  # an ended run keeps the totals its span was given
                _write_totals(current.run, current.ledger.tokens, current.ledger.cost_usd)
        step, agent = current.parent_step, current.parent_agent
        current = current.parent


_TOTALS = ("tokens_used", "cost_usd")


def _write_totals(model: Run | Agent, tokens: int, cost_usd: float) -> None:
    """Set a Run's or an Agent's totals as pydantic's ``__setattr__`` would (they are not
    validated on assignment), at a fifth of its cost: this runs for each usage report."""
    values = model.__dict__
    values["tokens_used"] = tokens
    values["cost_usd"] = cost_usd
    model.__pydantic_fields_set__.update(_TOTALS)


MAX_CALLS_BELOW = 1024  # calls a step keeps: a step passes on what a step inside it just returned
MAX_RESPONSES_RETURNED = 1024  # SDK responses a run tree remembers its steps returned, the latest


# A model call as the steps that charged it remember it: its response id with its input and
# output tokens. Not the id alone: some OpenAI-compatible servers give every response the same
# id (or draw it from a few hundred), and another call of that id must still be charged.
CallKey = tuple[str, int, int]


def _call_key(call_id: str, usage: TokenUsage) -> CallKey:
    return (call_id, usage.input_tokens, usage.output_tokens)


def _note_call(step: StepContext, key: CallKey) -> None:
    """Note on ``step`` that the call ``key`` is charged (under its run's lock)."""
    calls = step._calls_below
    if calls is None:
        calls = step._calls_below = {}
    calls[key] = None
    if len(calls) > MAX_CALLS_BELOW:
        del calls[next(iter(calls))]


def _run_ids(run: RunContext) -> set[str]:
    """The ids ``run`` goes by: its own, and that of the run it resumed."""
    ids = {run.run.id}
    if run.resumed_from is not None:
        ids.add(run.resumed_from.checkpoint.run_id)
    return ids


def _sub_run_part(restored: RestoredCheckpoint) -> tuple[dict[str, Any], list[dict[str, Any]], Any, Any]:
    """The state, replay records, spend and agent states of the sub-run that took ``restored``."""
    seq = restored.sub_run_seq
    try:
        if seq is None:
            raise ValueError("it does not say where the sub-run's calls are")
        kept, records = sub_run_part(restored.replay, seq)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {restored.checkpoint.id!r} was taken by sub-run {restored.sub_run_id}, whose "
            f"part of it cannot be found ({exc}): resume its top run {restored.checkpoint.run_id} instead"
        ) from None
    state = kept.get("state")
    return (state if isinstance(state, dict) else {}), records, kept.get("ledger"), kept.get("agents")


def _restore_spend(run: RunContext, spend: Any) -> None:
    """Count at least the spend a checkpoint kept (older checkpoints lack some totals), in the
    run's ledger and its Run model."""
    if isinstance(spend, dict):
        totals = [spend.get(name, 0) for name in SPEND_TOTALS]
        if all(type(total) is int for total in totals):
            ledger = run.ledger
            ledger.restore(*totals)
            _write_totals(run.run, ledger.tokens, ledger.cost_usd)


def _effective_budget(run: Run) -> Budget | None:
    """The run's budget, tightened by its policy's BudgetRule if it has one."""
    rule = run.policy.budget if run.policy is not None else None
    if rule is None:
        return run.budget
    limits = run.budget.model_dump() if run.budget is not None else {}
    for name in ("max_tokens", "max_cost_usd"):
        value = getattr(rule, name)
        if value is not None and (limits.get(name) is None or value < limits[name]):
            limits[name] = value
    return Budget(**limits)


def _usage_attributes(
    reports: list[tuple[TokenUsage, int, bool, Reply]], out: dict[str, Any], operation: str | None
) -> None:
    """GenAI usage attributes of the step's own model calls (summed when it made several);
    ``operation``: theirs, if not ``chat``. The response's model, id, finish reasons and server
    are the last call's (the last report: none if it gave none, a ``report_usage`` without
    them, say)."""
    last, _, _, reply = reports[-1]
    if reply is not None:
        out.update(reply)
    input_tokens = output_tokens = cache_read = cache_write = reasoning = cost_units = 0
    unpriced = False
    from_provider = False
    for usage, units, no_price, _ in reports:
        input_tokens += usage.input_tokens
        output_tokens += usage.output_tokens
        cache_read += usage.cache_read_tokens
        cache_write += usage.cache_write_tokens
        reasoning += usage.reasoning_tokens
        cost_units += units
        unpriced = unpriced or no_price
        from_provider = from_provider or usage.cost_usd is not None
    if last.model:
        out[attr.GEN_AI_RESPONSE_MODEL] = last.model
    if last.provider:
        out[attr.GEN_AI_PROVIDER_NAME] = last.provider
    if input_tokens or output_tokens:
        out[attr.GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
        if output_tokens or operation != attr.OP_EMBEDDINGS:  # an embeddings call has no output
            out[attr.GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
    if cache_read:
        out[attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = cache_read
    if cache_write:
        out[attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = cache_write
    if reasoning:
        out[attr.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = reasoning
    if unpriced:
        return  # no cost attribute at all rather than a wrong one; multirun.cost.unpriced says so
    out[attr.GEN_AI_USAGE_COST_AMOUNT] = cost_units / COST_UNITS_PER_USD
    out[attr.GEN_AI_USAGE_COST_CURRENCY] = "USD"
    out[attr.GEN_AI_USAGE_COST_SOURCE] = "provider" if from_provider else "local"


def _error_type(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _end_interrupted(span: Span | None, interrupt: BaseException, status_key: str) -> None:
    """End the span of a run or agent whose end ``interrupt`` cut short (a Ctrl-C while the
    program's ``__str__`` told its error, say), if still open: failed (or cancelled) with it."""
    if span is None or not span.is_recording():
        return
    status = "cancelled" if is_cancellation(interrupt) else "failed"
    end_attrs: dict[str, Any] = {status_key: status}
    try:
        _record_error(span, interrupt, end_attrs)
        span.set_attributes(end_attrs)
    finally:
        span.end()


def _record_error(span: Span, error: BaseException | str, out: dict[str, Any]) -> None:
    if isinstance(error, BaseException):
        out[attr.ERROR_TYPE] = _error_type(error)
        record_exception(span, error, escaped=True)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error_text(error)}"))
    else:
        out[attr.ERROR_TYPE] = attr.ERROR_TYPE_OTHER
        span.set_status(Status(StatusCode.ERROR, error))


def _serialize_result(result: Any) -> bytes | None:
    """``Run.result``: the return value as JSON, or None if it has none. Through ``json_form``,
    which leaves an iterator unread (pydantic alone would read it to the end)."""
    try:
        return to_json(json_form(result))
    except Exception:
        return None
