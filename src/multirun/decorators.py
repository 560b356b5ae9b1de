"""The decorators ``@run``, ``@agent``, ``@step`` and ``@checkpoint``.

Each decorator knows how to *open a call* (find the run, check the budget,
start the span) and gives back an object with four methods: ``_retry_delay``
(should a failed attempt be retried, after how long), ``_next_attempt`` (the
retry starts), ``_succeed`` and ``_failed``. One wrapper builder, ``_wrap``,
turns that into a wrapper for a plain function, a coroutine function, a
generator function or an async generator function, so retries, context
handling and streaming are written once for all four decorators.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from types import CoroutineType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar, overload

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from multirun._keys import AGENT_KEY, RUN_KEY, STEP_KEY, agent_in, run_in
from multirun._stack import headroom
from multirun.checkpoints.hashing import input_hash, method_input_hash
from multirun.checkpoints.replay import KEPT_AS_IS, SEQ, Served, kept_copy, stream_of, stream_record
from multirun.checkpoints.resume import take_pending_resume
from multirun.checkpoints.serializers import is_one_shot
from multirun.clock import Clock
from multirun.context import (
    AgentContext,
    RunContext,
    StepContext,
    check_string_keys,
    note_paid_for,
    record_step_not_run,
    top_runs_started,
)
from multirun.errors import (
    REFUSALS,
    BudgetExceededError,
    ConfigurationError,
    PolicyViolation,
    StepError,
    leaf_errors,
)
from multirun.models.budget import Budget
from multirun.models.policy import MAX_WAIT_SECONDS, BackoffStrategy, Policy
from multirun.models.run import Run
from multirun.models.step import StepKind, StepStatus
from multirun.sdk_streams import watched
from multirun.sdk_usage import (
    NOT_A_RESPONSE,
    StreamKind,
    StreamUsage,
    calls_in,
    is_sdk_object,
    response_call,
    returned_stream,
    stream_server,
)
from multirun.telemetry import attributes as attr
from multirun.telemetry import spans
from multirun.telemetry.exceptions import record_exception

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError
    from pydantic_core import ErrorDetails

_logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class _Call(Protocol):
    """One decorated call in flight: what ``_wrap`` needs from each decorator."""

    otel_context: Context | None
    wait_before: float

    def _clock(self) -> Clock: ...
    def _retry_delay(self, error: BaseException) -> float | None: ...
    def _wait_over(self) -> None: ...
    def _next_attempt(self) -> None: ...
    def _give_back(self) -> None: ...
    def _succeed(self, result: Any, extra: dict[str, Any] | None = None) -> Any: ...
    def _failed(self, error: BaseException) -> BaseException: ...


class _Replayed:
    """A step served from the replay cache: its value is returned without running it."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


Opener = Callable[[tuple[Any, ...], dict[str, Any]], Any]
# what a step may return for its caller to wait on, and the step follows (``_follow_future``)
Future = asyncio.Future[Any] | concurrent.futures.Future[Any]
_FUTURES = (asyncio.Future, concurrent.futures.Future)


# ---------------------------------------------------------------------------
# @step


class _DefaultDelay(float):
    """``retry_delay``'s default, told from a delay the user gave (``repr`` 1.0, as a float's):
    a ``retry_max_delay`` below it lowers it, where one the user gave above it is refused."""

    __slots__ = ()


RETRY_DELAY = _DefaultDelay(1.0)


class StepSpec:
    """What ``@step(...)`` was given, validated once at decoration time."""

    __slots__ = (
        "check_budget",
        "checkpoint",
        "follows_stream",
        "idempotent",
        "kind",
        "method",
        "model",
        "name",
        "policy_kind",
        "replayable",
        "retry",
        "retry_delay",
        "retry_max_delay",
        "retry_on",
        "retry_strategy",
        "span_name",
        "start_attrs",
        "streams",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str | None,
        kind: StepKind | str,
        retry: int,
        retry_delay: float,
        retry_max_delay: float,
        retry_strategy: BackoffStrategy | str,
        retry_on: tuple[type[Exception], ...] | type[Exception] | None,
        checkpoint: bool,
        idempotent: bool,
        check_budget: bool,
        model: str | None,
        decorator: str = "step",
    ) -> None:
        """Validate the options; errors name ``@{decorator}`` (``@think`` for ``@think``)."""
        self.kind = _enum(decorator, "kind", StepKind, kind)
        # the kind the policy governs it as; an instrumentation may set another (see framework_step_spec)
        self.policy_kind = self.kind
        self.retry = _non_negative_int(decorator, "retry", retry)
        self.retry_delay = _delay(decorator, "retry_delay", retry_delay)
        self.retry_max_delay = _delay(decorator, "retry_max_delay", retry_max_delay)
        # the cap would win, silently; not over the default delay a cap below it lowers
        given = type(retry_delay) is not _DefaultDelay
        if given and self.retry and self.retry_delay > self.retry_max_delay:
            raise ConfigurationError(
                f"@{decorator}(retry_delay=...) must be at most retry_max_delay, which caps every "
                f"delay: got {retry_delay!r} with retry_max_delay={retry_max_delay!r}"
            )
        self.retry_strategy = _enum(decorator, "retry_strategy", BackoffStrategy, retry_strategy)
        self.retry_on = _exception_types(decorator, "retry_on", retry_on)
        self.checkpoint = _bool(decorator, "checkpoint", checkpoint)
        self.idempotent = _bool(decorator, "idempotent", idempotent)
        self.check_budget = _bool(decorator, "check_budget", check_budget)
        if model is not None and (not isinstance(model, str) or not model):
            raise ConfigurationError(f"@{decorator}(model=...) must be a non-empty string, got {model!r}")
        self.model = model
        self.name = _validate_name(decorator, name, func)  # last: a bad option is named first
        # served from the replay cache on restore: idempotent steps (a generator's stream is
        # served as the items it yielded, when it was consumed to the end)
        self.replayable = self.idempotent
        self.method = _is_method(func)
        shape = _shape(func)
        self.streams = inspect.isgeneratorfunction(shape) or inspect.isasyncgenfunction(shape)
        # an SDK stream it returns keeps it open until its caller has read it (see _hand_over);
        # a framework's step is not: the framework, not the caller, takes what it returns
        self.follows_stream = not self.streams
        self.start_attrs = spans.step_start_attributes(self.kind, self.name, model)
        self.span_name = spans.step_span_name(self.kind, self.name, model)


class _StepCall(StepContext):
    """A StepContext driven by ``@step``: the decorator owns its span."""

    spec: StepSpec
    _retry_refused: PolicyViolation | None = None  # the policy's reason not to make another attempt
    _retrying: BaseException | None = None  # the error of the attempt a retry waits to follow
    _stream: StreamUsage | None = None  # usage of the LLM SDK chunks a generator step yielded, or
    # its caller read of the SDK stream it returned
    _items_read = 0  # of the SDK stream it returned
    _stream_items: list[Any] | None = None  # what a generator step yielded, for its replay record
    _awaited = False  # its function, no coroutine function, returned a coroutine: awaited in the step
    _following: Future | None = None  # the future it returned, until it is done or the step ended
    _cut_unfinished = False  # it ended with its agent before that future was done
    # held while that future's outcome ends the step: its agent's end waits for it (_cut_future)
    _follow_lock: threading.RLock | None = None

    def _clock(self) -> Clock:
        return self.run_context.client.clock

    def _retries(self) -> tuple[int, BackoffStrategy, float, float]:
        """(retries, strategy, base delay, delay cap): the step's own, or when it sets no retry,
        those of the RetryRule of the policy that governs the run (its own, or a parent's)."""
        spec = self.spec
        engine = self.run_context.policy_engine
        policy = engine.policy if engine is not None else None
        if spec.retry == 0 and policy is not None and policy.retry is not None:
            rule = policy.retry  # the run's default for steps that set no retry of their own
            return rule.max_attempts - 1, rule.backoff, rule.base_delay_seconds, rule.max_delay_seconds
        return spec.retry, spec.retry_strategy, spec.retry_delay, spec.retry_max_delay

    def _retry_delay(self, error: BaseException) -> float | None:
        spec = self.spec
        retries, strategy, base, cap = self._retries()
        run = self.run_context
        if self.attempt > retries or not isinstance(error, Exception) or _is_permanent(error):
            return None
        if spec.retry_on is not None and not isinstance(error, spec.retry_on):
            return None
        delay = backoff_delay(strategy, base, cap, self.attempt)
        ledger = run.ledger
        if spec.check_budget:  # else the step runs whatever the budget says, its retries too
            if ledger.used_up():
                return None  # another attempt would spend past this run's budget or an enclosing run's
            if self._clock().monotonic() + delay >= ledger.deadline:
                return None  # the attempt would start when the run (or an enclosing run) is out of time
        # checked before the policy sees the failure: past here every way out retries or is a
        # refusal (_retry_refused), so _failed never counts the failure a second time
        try:
            delay = self._retry_decision(error, delay)
        except PolicyViolation as refused:
            self._retry_refused = refused
            return None
        self._record_attempt_failure(error, delay)
        if delay:
            self._retrying = error  # for the refusal after the backoff (dropped then: it holds frames)
        return delay

    def _retry_decision(self, error: BaseException, delay: float, ran: bool = True) -> float:
        """The policy's word on another attempt, ``delay`` seconds from now (its backoff), after
        one that failed with ``error``: the seconds to wait before it, longer when its rate-limit
        slot starts later; PolicyViolation (its decision on the step) when it must not be made.

        Another attempt is another call to the dependency: the failed one counts towards the
        circuit, and the next one asks the policy (open circuit, rate limit, fallback model) as
        any call does. One that never ran (``ran=False``: a framework's timeout ended its wait for
        its slot) counts for nothing, and gives back what it held.
        """
        run = self.run_context
        engine = run.policy_engine
        if engine is None:
            return delay
        spec = self.spec
        if ran:
            engine.after_step(spec.name, spec.policy_kind, error, self._decision)
        else:
            self._give_back()
        try:
            decision = engine.before_step(
                spec.name,
                spec.policy_kind,
                self.model,
                run.ledger,
                not_before=delay,
                within_budget=spec.check_budget,
            )
        except PolicyViolation as refused:
            self._note_refusal(refused)
            raise
        self._follow(decision)
        if decision.wait_seconds:  # its wait for its slot past the backoff is on the span too
            self.wait_before += decision.wait_seconds - delay
        # a rate-limit wait is for a slot that starts before the deadline (or refused)
        return max(delay, decision.wait_seconds)

    def _wait_over(self) -> None:
        """The wait before an attempt (for its rate-limit slot, a retry's backoff) is over: the
        circuit, if it changed meanwhile, is asked again; PolicyViolation if it is open.
        After a backoff the budget is asked again too: other steps may have spent it meanwhile,
        and another attempt would spend past it (BudgetExceededError)."""
        after, self._retrying = self._retrying, None
        if after is not None and self.spec.check_budget:
            refused = self.run_context.ledger.over_budget()
            if refused is not None:
                self._note_budget_refusal(refused)
                self._call_error = after
                raise refused from after
        self._resume(after)

    def _succeed(self, result: Any, extra: dict[str, Any] | None = None) -> Any:
        """End the step as completed; returns what its caller gets: ``result``, or an SDK stream
        it returned watched, the step ending when its caller has read it (``_hand_over``)."""
        spec = self.spec
        run = self.run_context
        if self._stream is not None or type(result) not in NOT_A_RESPONSE:
            if self._stream is None and spec.follows_stream:
                kind = returned_stream(result)
                if kind is not None:
                    return self._hand_over(result, kind)
                if isinstance(result, _FUTURES):
                    return self._follow_future(result)
            try:
                self._charge_sdk_usage(result)
            except PolicyViolation as refused:  # init(unpriced="fail"): the step fails, as if it raised
                self._failed(refused)
                raise
        elif (type(result) is list or type(result) is tuple) and result:
            try:  # asyncio.gather's responses, or (answer, response), say
                self._charge_sdk_usage_in(result)
            except PolicyViolation as refused:
                self._failed(refused)
                raise
        if self.replay_call is not None:
            if spec.streams:
                self._record_stream(result)
            elif self._awaited:  # a served value is no coroutine: the step runs again after a restore
                run.replay_log.abandon(self.replay_call)
            else:
                run.replay_log.record(self.replay_call, result)
        if run.policy_engine is not None:
            run.policy_engine.after_success(spec.name, spec.policy_kind, self._decision)
        if spec.checkpoint:
            run._try_checkpoint(f"after_{spec.name}", step_id=self.id, agent_id=self.agent_context.agent.id)
        self._close(StepStatus.COMPLETED, result, extra=extra)
        return result

    def _hand_over(self, stream: Any, kind: StreamKind) -> Any:
        """The step returned an SDK stream: it stays open, and ends when its caller has read the
        stream (``_stream_ended``), or when its agent ends first (``_cut_stream``)."""
        if self.replay_call is not None:  # the caller's to read once: run again after a restore
            self.run_context.replay_log.abandon(self.replay_call)
            self.replay_call = None
        self._stream = StreamUsage()
        self.agent_context._keep_unread(self, self._cut_stream)
        return watched(stream, kind, self, self.otel_context or otel_context.get_current())

    def _follow_future(self, future: Future) -> Future:
        """The step returned a future (a task, ``asyncio.gather(...)``, ``executor.submit(...)``):
        returned as it is, the step stays open and ends when it is done (``_future_done``), or
        when its agent ends first (``_cut_future``). The work is under way: it cannot be retried,
        and is not served after a restore (the step runs again)."""
        if self.replay_call is not None:
            self.run_context.replay_log.abandon(self.replay_call)
            self.replay_call = None
        self._following = future
        # reentrant: a done future calls _future_done in add_done_callback, and _cut_future does
        self._follow_lock = threading.RLock()
        self.agent_context._keep_unread(self, self._cut_future)
        try:
            future.add_done_callback(self._future_done)
        except Exception:  # a done asyncio future whose loop is closed: nothing would call it
            self._future_done(future)
        return future

    def _settle(self, future: Future, cut: bool = False) -> bool:
        """Whether this caller ends the step that follows ``future`` (the future's callback, or
        its agent ending, maybe on another thread): the first to ask. ``cut``: it ends the
        step before the future is done."""
        with self.run_context._lock:
            if self._following is not future:
                return False
            self._following = None
            self._cut_unfinished = cut
            return True

    def _future_done(self, future: Future) -> None:
        """The future the step returned is done: the step ends completed with its result,
        failed with its exception, or failed with its cancellation (no failure of the
        dependency: it counts towards no circuit). After the step ended with its agent, the
        usage of an SDK response it gives is charged, as late usage.

        A concurrent future wakes its waiters before it calls this: its caller may end the
        agent meanwhile, which waits for the lock (``_cut_future``) and so for the step's end
        and its charge; the step is forgotten by the agent only once it has ended."""
        assert self._follow_lock is not None
        try:
            with self._follow_lock:
                self._end_from(future)
        finally:
            self.agent_context._unread_done(self)

    def _end_from(self, future: Future) -> None:
        """The body of ``_future_done``, with its lock held."""
        try:
            ours = self._settle(future)
            if future.cancelled():
                if ours:
                    self._give_back(slot=False)
                    async_ = isinstance(future, asyncio.Future)
                    self._failed(asyncio.CancelledError() if async_ else concurrent.futures.CancelledError())
                return
            # asyncio's own field: exception() would mark it retrieved, and asyncio would no
            # longer log an error the program never reads
            if isinstance(future, asyncio.Future):
                error = getattr(future, "_exception", None)
            else:
                error = future.exception()
            if error is not None:
                if ours:
                    self._failed(error)
            elif ours:
                self._end_with(future.result())
            elif self._cut_unfinished:
                self._charge_sdk_usage(future.result())
        except Exception as broken:  # a callback's error would only be logged by the loop or executor
            _logger.warning("multirun: step %r, the future it returned is done: %s", self.name, broken)

    def _end_with(self, result: Any) -> None:
        """End the step with ``result``, what the future it returned gives. An SDK stream is its
        caller's already, read from the future: not handed over to a watching proxy (which no
        one would hold, and whose collection would close the stream), so its usage is unknown."""
        if returned_stream(result) is None:
            self._succeed(result)
        elif self._own_usage or self.child_usage_reported:
            self._succeed(None)
        else:
            self._succeed(None, {attr.USAGE_UNKNOWN: True})  # its tokens were spent: not a silent 0

    def _end_followed(self) -> None:
        """The step returns a response: first the steps of its agent whose future is done end,
        if their callback has not ended them yet. A concurrent future wakes its waiters first:
        the response read from it is the step's below, charged to it, not to this step.
        Never from a step that follows a future itself: it holds its own lock, and two such
        steps ending at once would each wait for the other's."""
        for step in list(self.agent_context._unread or ()):
            if isinstance(step, _StepCall) and step is not self:
                step._end_if_done()

    def _end_if_done(self) -> None:
        """End the step now if the future it returned is done (see ``_end_followed``)."""
        lock = self._follow_lock
        if lock is None:  # its stream is unread
            return
        with lock:  # after its callback, if that is ending it now
            future = self._following
            if future is not None:
                if not future.done():
                    return
                self._end_from(future)
        self.agent_context._unread_done(self)

    def _cut_future(self) -> None:
        """Its agent ends before the future it returned is done: the step ends now, completed
        and marked ``multirun.step.unfinished``; its outcome is unknown, and counts towards no
        circuit."""
        assert self._follow_lock is not None
        with self._follow_lock:  # after the future's callback, if it is ending the step now
            future = self._following
            if future is None:
                return
            if future.done():  # its callbacks have yet to run: a concurrent future wakes its waiters first
                self._end_from(future)
            elif self._settle(future, cut=True):
                self._give_back(slot=False)
                self._close(StepStatus.COMPLETED, extra={attr.STEP_UNFINISHED: True})

    def _stream_opened(self, stream: Any) -> None:
        """Its caller reads SDK stream ``stream``: the server its URL names is the call's."""
        if self._stream is not None:  # made by _hand_over
            self._stream.server = stream_server(stream)

    def _stream_item(self, item: Any) -> None:
        """Its caller read ``item`` of the stream the step returned."""
        self._items_read += 1
        if self._stream is not None:  # made by _hand_over
            self._stream.observe(item)

    def _stream_ended(self, error: BaseException | None, closed: bool) -> None:
        """The stream the step returned ended: read to its end (the refusal of
        ``init(unpriced="fail")`` is raised then, as a generator step's is), failed with
        ``error`` (the step fails with it, raised), or closed or dropped before its end."""
        self.agent_context._unread_done(self)
        if self.finished:  # ended with its agent: what was read since is charged now, as late usage
            try:
                self._charge_sdk_usage(None)
            except PolicyViolation as refused:
                _logger.warning("multirun: step %r, read after its agent ended: %s", self.name, refused)
            return
        if error is not None:
            _raise_failed(self, error)
        extra: dict[str, Any] = {attr.STEP_STREAM_ITEMS: self._items_read}
        read = self._stream is not None and self._stream.has_usage()
        if not (read or self._own_usage or self.child_usage_reported):
            extra[attr.USAGE_UNKNOWN] = True  # its tokens were spent all the same: not a silent 0
        if closed:
            _end_closed_stream(self, extra)
        else:
            self._succeed(None, extra)

    def _cut_stream(self) -> None:
        """Its agent ends before its caller has read the stream it returned: it ends now,
        completed with what was read; the rest can still be read, and is charged then."""
        _end_closed_stream(
            self, {attr.STEP_STREAM_ITEMS: self._items_read, attr.STEP_STREAM_UNFINISHED: True}
        )

    def _observe(self, item: Any) -> None:
        """Look at one item a generator step yielded: kept for the replay log, and read for
        the usage of LLM SDK stream chunks."""
        items = self._stream_items
        if items is not None:
            if len(items) < STREAM_RECORD_LIMIT:
                # as yielded, whatever the consumer does with it (text and numbers are kept as is)
                items.append(item if type(item) in KEPT_AS_IS else kept_copy(item))
            else:
                self._stream_items = None
                _warn_stream_not_recorded(self.spec.name)
        if type(item) not in NOT_A_RESPONSE and is_sdk_object(item):
            if self._stream is None:
                self._stream = StreamUsage()
            self._stream.observe(item)

    def _stream_cut(self) -> None:
        """The consumer stopped the stream early, or sent or threw something into it: what
        it yielded is not all the step yields, or depends on more than its inputs, so it is
        not served after a restore (it runs again)."""
        self._stream_items = None

    def _record_stream(self, returned: Any) -> None:
        """Record a generator step that ended: its items, if its whole stream was read."""
        assert self.replay_call is not None
        items = self._stream_items
        log = self.run_context.replay_log
        if items is None:
            log.abandon(self.replay_call)
        else:
            log.record(self.replay_call, stream_record(items, kept_copy(returned)), copied=True)

    def _charge_sdk_usage(self, result: Any) -> None:
        """Charge the usage of an LLM SDK response the step returned or streamed, unless
        the call is charged already (by the step, below it, or when a step returned that
        very response, or a copy of it, before)."""
        stream = self._stream
        if stream is not None:
            self._charge_response_usage(*stream.calls())
            return
        found = response_call(result)
        if found is not None:
            if self.agent_context._unread and self._follow_lock is None:
                self._end_followed()
            response, call = found
            if not self.run_context._returned_before(response, call[0]):
                self._charge_response_usage(call)

    def _charge_sdk_usage_in(self, items: list[Any] | tuple[Any, ...]) -> None:
        """Charge the LLM SDK responses in a list or tuple the step returned (one level deep),
        each unless its call is charged already, as ``_charge_sdk_usage`` does."""
        found = calls_in(items)
        if found and self.agent_context._unread and self._follow_lock is None:
            self._end_followed()
        returned_before = self.run_context._returned_before
        calls = [call for response, call in found if not returned_before(response, call[0])]
        if calls:
            self._charge_response_usage(*calls)

    def _failed(self, error: BaseException) -> BaseException:
        run = self.run_context
        self._retrying = None  # interrupted in its backoff: the step keeps only its own error
        if self.replay_call is not None:
            run.replay_log.fail(self.replay_call)
        if self._stream is not None:
            try:
                self._charge_sdk_usage(None)  # the chunks that arrived before the failure were paid for
            except PolicyViolation as unpriced:
                # init(unpriced="fail"): noted, not raised in place of the step's own error (nor out
                # of a generator's close(), which raises only what the generator raised)
                record_exception(self.span, unpriced)
                failed_with = type(error).__name__
                _logger.warning("multirun: step %r failed with %s, and %s", self.name, failed_with, unpriced)
        refused = self._retry_refused
        if refused is not None:  # the policy refused another attempt; the last one was counted then
            self._record_attempt_failure(error, None)
            refused.__cause__ = error
            self._call_error, error = error, refused
        elif run.policy_engine is not None:
            run.policy_engine.after_step(self.spec.name, self.spec.policy_kind, error, self._decision)
        self._close(StepStatus.FAILED, error=error)
        if isinstance(error, Exception) and not _is_permanent(error) and self._retries()[0] > 0:
            return StepError(self.spec.name, self.attempt, error)
        return error


STREAM_RECORD_LIMIT = 100_000  # items of one stream the replay log keeps at most
_stream_warned: set[str] = set()


def _warn_stream_not_recorded(name: str) -> None:
    if name not in _stream_warned:
        _stream_warned.add(name)
        _logger.warning(
            "multirun: generator step %r yielded more than %d items: its stream is not kept in "
            "the replay log, and it runs again after a restore (logged once per step name)",
            name,
            STREAM_RECORD_LIMIT,
        )


def backoff_delay(strategy: BackoffStrategy, base: float, cap: float, attempt: int) -> float:
    """Delay after failed attempt ``attempt``: constant, linear or exponential, at most ``cap``."""
    if strategy is BackoffStrategy.LINEAR:
        delay = base * attempt
    elif strategy is BackoffStrategy.EXPONENTIAL:
        delay = base * 2.0 ** min(attempt - 1, 1000)  # capped exponent: a float, never an OverflowError
    else:
        delay = base
    return min(delay, cap)


_AUTH_ERROR_NAMES = ("AuthenticationError", "PermissionDeniedError")


def _is_permanent(error: BaseException) -> bool:
    """Errors another attempt cannot fix: budget and policy aborts, authentication failures,
    also inside an exception group (an ``asyncio.TaskGroup`` raises them in one)."""
    return any(_cannot_be_fixed_by_retrying(leaf) for leaf in leaf_errors(error))


def _cannot_be_fixed_by_retrying(error: BaseException) -> bool:
    if isinstance(error, REFUSALS):
        return True
    if type(error).__name__ in _AUTH_ERROR_NAMES:
        return True
    status = getattr(error, "status_code", None) or getattr(error, "status", None)
    return status in (401, 403)


def _open_step(
    spec: StepSpec, args: tuple[Any, ...], kwargs: dict[str, Any], step_class: type[_StepCall] | None = None
) -> Any:
    # Runs before every decorated call: plain dict look-ups rather than the typed helpers.
    # ``step_class``: an instrumentation's own kind of _StepCall (Motus's)
    current = otel_context.get_current()
    run: RunContext | None = current.get(RUN_KEY)  # type: ignore[assignment]
    if run is None:
        return None
    agent: AgentContext = current.get(AGENT_KEY) or run.default_agent  # type: ignore[assignment]
    parent: StepContext | None = current.get(STEP_KEY)  # type: ignore[assignment]
    digest = replay_call = None
    if spec.replayable and run.records_replay:
        digest = input_hash(args, kwargs)
        if digest is not None or (spec.method and (digest := method_input_hash(args, kwargs)) is not None):
            parent_call = parent.replay_call if parent is not None else None
            began = run.replay_log.begin(
                spec.name,
                digest,
                parent_call[SEQ] if parent_call is not None else run.replay_parent,
                args,
                kwargs,
            )
            if isinstance(began, Served):
                # a generator step's value: its items and return value (DeterminismError if none)
                if spec.streams:
                    value = stream_of(spec.name, began.value)
                else:
                    value = began.value
                    note_paid_for(run, parent, value)  # its SDK responses were paid for already
                _record_step_not_run(spec, agent, current, digest=digest, args=args, kwargs=kwargs)
                return _Replayed(value)
            replay_call = began
        else:
            run.replay_log.unhashed.add(spec.name)  # a checkpoint warns that it cannot serve it
    engine = run.policy_engine
    decision = None
    try:
        if engine is not None:
            decision = engine.before_step(
                spec.name, spec.policy_kind, spec.model, run.ledger, within_budget=spec.check_budget
            )
        run.ledger.begin_step(spec.check_budget)
        step = (step_class or _StepCall)(agent, spec.name, spec.kind, parent, True)  # managed
        step.spec = spec
        if spec.model is not None:
            step.model = spec.model
        if digest is not None:
            step.input_hash = digest
            step.replay_call = replay_call
            if replay_call is not None and spec.streams:
                step._stream_items = []
        if decision is not None:
            step._follow(decision)  # "proceed" is not counted: every step not waited, switched or refused
            if decision.wait_seconds:
                step.wait_before = decision.wait_seconds
        step._open(current, spec.start_attrs, args, kwargs, spec.span_name)
    except BaseException as error:
        # refused, the ledger could not decide (fail closed), or the step could not start (its
        # span, with the stack full of a recursion, say): it never ran, nor is it a call in flight
        if replay_call is not None:
            run.replay_log.fail(replay_call)
        if decision is not None:  # its probe and its rate-limit slot are free again
            engine.give_back(spec.name, decision)  # type: ignore[union-attr]
        if isinstance(error, (BudgetExceededError, PolicyViolation)):
            _record_step_not_run(spec, agent, current, digest=digest, refused=error, args=args, kwargs=kwargs)
        raise
    return step


def _record_step_not_run(
    spec: StepSpec,
    agent: AgentContext,
    current: Context,
    *,
    digest: str | None = None,
    refused: BudgetExceededError | PolicyViolation | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> None:
    """A span for a decorated step that did not run: served from the replay cache, or refused."""
    record_step_not_run(
        agent,
        current,
        spec.name,
        spec.kind,
        spec.model,
        args,
        kwargs or {},
        digest=digest,
        refused=refused,
        start_attrs=spec.start_attrs,
    )


@overload
def step(func: F) -> F: ...
@overload
def step(
    func: None = None,
    *,
    name: str | None = None,
    kind: StepKind | str = StepKind.FUNCTION,
    retry: int = 0,
    retry_delay: float = RETRY_DELAY,
    retry_max_delay: float = 60.0,
    retry_strategy: BackoffStrategy | str = BackoffStrategy.EXPONENTIAL,
    retry_on: tuple[type[Exception], ...] | type[Exception] | None = None,
    checkpoint: bool = False,
    idempotent: bool = True,
    check_budget: bool = True,
    model: str | None = None,
) -> Callable[[F], F]: ...
def step(
    func: F | None = None,
    *,
    name: str | None = None,
    kind: StepKind | str = StepKind.FUNCTION,
    retry: int = 0,
    retry_delay: float = RETRY_DELAY,
    retry_max_delay: float = 60.0,
    retry_strategy: BackoffStrategy | str = BackoffStrategy.EXPONENTIAL,
    retry_on: tuple[type[Exception], ...] | type[Exception] | None = None,
    checkpoint: bool = False,
    idempotent: bool = True,
    check_budget: bool = True,
    model: str | None = None,
) -> F | Callable[[F], F]:
    """Trace a function as a step of the current run, with retries and a budget check.

    Outside a run the function just runs. ``model`` names the model an LLM
    step asks for (``gen_ai.request.model``); the step reports what it used
    with ``multirun.report_usage``.
    """
    return step_as(
        "step",
        func,
        name=name,
        kind=kind,
        retry=retry,
        retry_delay=retry_delay,
        retry_max_delay=retry_max_delay,
        retry_strategy=retry_strategy,
        retry_on=retry_on,
        checkpoint=checkpoint,
        idempotent=idempotent,
        check_budget=check_budget,
        model=model,
    )


# the parameters of @step and their defaults, for decorators that are @step under another name
_STEP_DEFAULTS: dict[str, Any] = {
    name: param.default for name, param in inspect.signature(step).parameters.items() if name != "func"
}


def step_as(decorator: str, func: F | None = None, **options: Any) -> F | Callable[[F], F]:
    """``@step(**options)`` under another name (``@think``, ...): its errors name ``@{decorator}``."""
    unknown = sorted(options.keys() - _STEP_DEFAULTS.keys())
    if unknown:
        raise TypeError(f"@{decorator} got an unexpected keyword argument {unknown[0]!r}")
    settings = {**_STEP_DEFAULTS, **options}

    def decorate(fn: F) -> F:
        spec = StepSpec(_callable(decorator, fn), decorator=decorator, **settings)
        return _wrap(fn, functools.partial(_open_step, spec))

    return decorate(func) if func is not None else decorate


# ---------------------------------------------------------------------------
# @run, @agent and @checkpoint: calls made once


class _NotRetried:
    """A call that is never retried and never waits before it runs."""

    __slots__ = ()
    wait_before = 0.0

    def _retry_delay(self, error: BaseException) -> float | None:
        return None

    def _wait_over(self) -> None:
        pass

    def _next_attempt(self) -> None:
        pass

    def _give_back(self) -> None:
        pass


# ---------------------------------------------------------------------------
# @run


class _RunCall(_NotRetried):
    __slots__ = ("ctx", "otel_context")

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.otel_context = ctx.otel_context

    def _clock(self) -> Clock:
        return self.ctx.client.clock

    def _succeed(self, result: Any, extra: dict[str, Any] | None = None) -> Any:
        self.ctx.complete(result)
        return result

    def _failed(self, error: BaseException) -> BaseException:
        self.ctx._fail_with_checkpoint(error)
        return error


@overload
def run(func: F) -> F: ...
@overload
def run(
    func: None = None,
    *,
    name: str | None = None,
    budget: Budget | dict[str, Any] | None = None,
    policy: Policy | dict[str, Any] | None = None,
    checkpoint_on_error: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Callable[[F], F]: ...
def run(
    func: F | None = None,
    *,
    name: str | None = None,
    budget: Budget | dict[str, Any] | None = None,
    policy: Policy | dict[str, Any] | None = None,
    checkpoint_on_error: bool = True,
    metadata: dict[str, Any] | None = None,
) -> F | Callable[[F], F]:
    """Trace a function as a run, with its budget and policy enforced before each step.

    Called inside another run, it is a sub-run: its spend counts in the parent.
    """
    budget_model = _model("run", "budget", Budget, budget)
    policy_model = _model("run", "policy", Policy, policy)
    _bool("run", "checkpoint_on_error", checkpoint_on_error)
    check_string_keys("@run", "metadata", metadata)

    def decorate(fn: F) -> F:
        run_name = _validate_name("run", name, _callable("run", fn))

        def open_run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _RunCall:
            model = Run(
                name=run_name,
                budget=budget_model,
                policy=policy_model,
                metadata=dict(metadata or {}),
            )
            # the client of the run around it (one made by hand may have its own), else the default
            ctx = RunContext(None, model, checkpoint_on_error=checkpoint_on_error)
            ctx.inputs = (args, kwargs)  # a sub-run's, told apart by them in its parent's replay log
            _resume_pending(ctx)
            return _RunCall(ctx)

        return _wrap(fn, open_run)

    return decorate(func) if func is not None else decorate


def _resume_pending(ctx: RunContext) -> None:
    """Continue the checkpoint that ``multirun.resume`` (or ``multirun resume``) named, if
    one is pending; call before anything else starts the run's span."""
    name = ctx.run.name
    restored = take_pending_resume(
        ctx.client, name, lambda: _run_input_digest(ctx), lambda: top_runs_started.get(name, 0) + 1
    )
    if restored is not None:
        ctx.resumed_from = restored  # the span starts linked to the run it continues
        ctx._start()  # the span, and with it the ledger the restored spend goes to
        ctx._restore(restored.state, restored.replay, restored.ledger, restored.agents)


def _run_input_digest(ctx: RunContext) -> str | None:
    """The input hash of a run's arguments (kept for its start, which then hashes them no more)."""
    if ctx.input_digest is None and ctx.inputs is not None:
        ctx.input_digest = input_hash(*ctx.inputs)
    return ctx.input_digest


# ---------------------------------------------------------------------------
# @agent


class _AgentCall(_NotRetried):
    __slots__ = ("agent", "otel_context", "owned_run")

    def __init__(self, agent: AgentContext, owned_run: RunContext | None) -> None:
        self.agent = agent
        self.owned_run = owned_run
        self.otel_context = agent.otel_context

    def _clock(self) -> Clock:
        return self.agent.run_context.client.clock

    def _succeed(self, result: Any, extra: dict[str, Any] | None = None) -> Any:
        self.agent.complete(result)
        if self.owned_run is not None:
            self.owned_run.complete(result)
        return result

    def _failed(self, error: BaseException) -> BaseException:
        self.agent._end_with(error)
        if self.owned_run is not None:
            self.owned_run._fail_with_checkpoint(error)
        return error


@overload
def agent(func: F) -> F: ...
@overload
def agent(
    func: None = None,
    *,
    name: str | None = None,
    agent_config_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Callable[[F], F]: ...
def agent(
    func: F | None = None,
    *,
    name: str | None = None,
    agent_config_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> F | Callable[[F], F]:
    """Trace a function as a named agent; the steps it calls are scoped to it.

    Called outside any run, it starts a run of the same name around itself.
    """
    if agent_config_id is not None and not isinstance(agent_config_id, str):
        raise ConfigurationError(f"@agent(agent_config_id=...) must be a string, got {agent_config_id!r}")
    check_string_keys("@agent", "metadata", metadata)

    def decorate(fn: F) -> F:
        agent_name = _validate_name("agent", name, _callable("agent", fn))

        def open_agent(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _AgentCall:
            current = otel_context.get_current()
            run_ctx: RunContext | None = run_in(current)
            owned = None
            if run_ctx is None:
                from multirun.client import get_client

                owned = RunContext(get_client(), Run(name=agent_name), checkpoint_on_error=False)
                _resume_pending(owned)  # an agent outside a run is its own run, resumable as one
                run_ctx = owned
                current = owned.otel_context
            token = otel_context.attach(current)
            try:
                ctx = run_ctx.start_agent(agent_name, agent_config_id, metadata)
            finally:
                otel_context.detach(token)
            return _AgentCall(ctx, owned)

        return _wrap(fn, open_agent)

    return decorate(func) if func is not None else decorate


# ---------------------------------------------------------------------------
# @checkpoint


class _CheckpointCall(_NotRetried):
    __slots__ = ("agent_id", "capture_result", "extra_state", "name", "otel_context", "result_key", "run")

    def __init__(
        self,
        run: RunContext,
        agent_id: str,
        name: str,
        capture_result: bool,
        result_key: str,
        extra_state: dict[str, Any] | None,
    ) -> None:
        self.run = run
        self.agent_id = agent_id  # the agent the function runs in: the checkpoint's parent agent
        self.name = name
        self.capture_result = capture_result
        self.result_key = result_key
        self.extra_state = extra_state
        self.otel_context = None  # runs in the caller's context

    def _clock(self) -> Clock:
        return self.run.client.clock

    def _succeed(self, result: Any, extra: dict[str, Any] | None = None) -> Any:
        state = dict(self.extra_state or {})
        if self.capture_result:
            if is_one_shot(result):
                _logger.warning(
                    "multirun: checkpoint %r leaves out the function's result: %s is an iterator, which "
                    "the program reads once (return a list to keep it)",
                    self.name,
                    type(result).__name__,
                )
            else:
                state[self.result_key] = result
        self.run._try_checkpoint(self.name, state, agent_id=self.agent_id)
        return result

    def _failed(self, error: BaseException) -> BaseException:
        return error


@overload
def checkpoint(func: F) -> F: ...
@overload
def checkpoint(
    func: None = None,
    *,
    name: str | None = None,
    capture_result: bool = True,
    result_key: str = "result",
    extra_state: dict[str, Any] | None = None,
) -> Callable[[F], F]: ...
def checkpoint(
    func: F | None = None,
    *,
    name: str | None = None,
    capture_result: bool = True,
    result_key: str = "result",
    extra_state: dict[str, Any] | None = None,
) -> F | Callable[[F], F]:
    """Run the function, then checkpoint the run's state (and its result).

    Outside a run nothing is checkpointed; a failed checkpoint is a warning,
    never an error of the function.
    """
    _bool("checkpoint", "capture_result", capture_result)
    if not isinstance(result_key, str) or not result_key:
        raise ConfigurationError(
            f"@checkpoint(result_key=...) must be a non-empty string, got {result_key!r}"
        )
    check_string_keys("@checkpoint", "extra_state", extra_state)

    def decorate(fn: F) -> F:
        func_name = getattr(_callable("checkpoint", fn), "__name__", None)
        if name is None and not (isinstance(func_name, str) and func_name):
            raise ConfigurationError("@checkpoint: pass name=... for a callable without a name")
        checkpoint_name = _validate_name("checkpoint", name, fn) if name is not None else f"after_{func_name}"

        def open_checkpoint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _CheckpointCall | None:
            current = otel_context.get_current()
            run_ctx: RunContext | None = run_in(current)
            if run_ctx is None:
                return None
            agent_ctx = agent_in(current) or run_ctx.default_agent
            return _CheckpointCall(
                run_ctx, agent_ctx.agent.id, checkpoint_name, capture_result, result_key, extra_state
            )

        return _wrap(fn, open_checkpoint)

    return decorate(func) if func is not None else decorate


# ---------------------------------------------------------------------------
# the one wrapper builder


def _wrap(func: F, open_call: Opener) -> F:
    """A wrapper of ``func`` (plain, async, generator or async generator) around ``open_call``."""
    if isinstance(func, (staticmethod, classmethod)):  # decorated above @staticmethod/@classmethod
        return type(func)(_wrap(func.__func__, open_call))
    shape = _shape(func)
    if inspect.isasyncgenfunction(shape):
        wrapper: Callable[..., Any] = _async_gen_wrapper(func, open_call)
    elif inspect.iscoroutinefunction(shape):
        wrapper = _async_wrapper(func, open_call)
    elif inspect.isgeneratorfunction(shape):
        wrapper = _gen_wrapper(func, open_call)
    else:
        wrapper = _sync_wrapper(func, open_call)
    return functools.wraps(func)(wrapper)  # type: ignore[return-value]


def _shape(func: Any) -> Any:
    """What tells whether ``func`` is async or a generator: the function itself, the one a
    staticmethod or classmethod holds, or the ``__call__`` of a callable object."""
    if isinstance(func, (staticmethod, classmethod)):
        func = func.__func__
    if inspect.isroutine(func) or isinstance(func, functools.partial) or not callable(func):
        return func
    return type(func).__call__


def _attach(call: _Call) -> object | None:
    ctx = call.otel_context
    return None if ctx is None else otel_context.attach(ctx)


def _detach(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


def _raise_failed(call: _Call, error: BaseException, waiting: bool = False) -> NoReturn:
    """End ``call`` as failed and raise ``error``, or what ``_failed`` made of it (from it).
    ``waiting``: ``error`` cut short the wait before an attempt, which never ran (what the
    policy held for it is given back).

    Ending it never raises instead: with stack room, as ``error`` may be a RecursionError that
    left none, and a failure of multirun's own costs a warning, not the program's error.
    """
    with headroom:
        try:
            if waiting:
                call._give_back()
            final = call._failed(error)
        except Exception as broken:
            _logger.warning(
                "multirun: could not end a call that raised %s (%s: %s); its error is raised as it was",
                type(error).__name__,
                type(broken).__name__,
                broken,
            )
            final = error
    if final is error:
        raise error
    raise final from error


def _delay_before_retry(call: _Call, error: BaseException) -> float | None:
    """``call._retry_delay(error)``, with stack room: ``error`` may be a RecursionError.
    Interrupted meanwhile (Ctrl-C while the failed attempt is recorded), the call ends as
    failed with the interrupt, which is raised."""
    with headroom:
        try:
            return call._retry_delay(error)
        except BaseException as interrupted:
            _raise_failed(call, interrupted)


def _end_closed_stream(call: _Call, extra: dict[str, Any]) -> None:
    """End the call of a stream closed before its end (a generator's, or an SDK stream a step
    returned), with ``extra`` on its span.

    ``close()`` raises only what the stream itself raised: the usage it streamed, refused
    by ``init(unpriced="fail")``, fails the step with the refusal on its span, and is a warning.
    """
    try:
        call._succeed(None, extra)
    except PolicyViolation as refused:
        name = getattr(call, "name", "")  # only a step refuses usage
        _logger.warning("multirun: step %r, a stream closed before its end, failed: %s", name, refused)


def _pause(call: _Call, seconds: float) -> None:
    """Wait before an attempt (rate limit, backoff), then ask the circuit again. Cancelled or
    interrupted there, or refused, the call ends as failed: its span is ended, and the circuit
    probe and the rate-limit slot it holds for the attempt are given back."""
    try:
        call._clock().sleep(seconds)
        call._wait_over()
    except BaseException as error:
        _raise_failed(call, error, waiting=True)


async def _async_pause(call: _Call, seconds: float) -> None:
    """The async twin of ``_pause``."""
    try:
        await call._clock().async_sleep(seconds)
        call._wait_over()
    except BaseException as error:
        _raise_failed(call, error, waiting=True)


def _retry_after(call: _Call, delay: float) -> None:
    """Wait ``delay`` before the next attempt, then count it: an attempt cancelled or
    interrupted in the wait was never made, and the span says so."""
    if delay:
        _pause(call, delay)
    call._next_attempt()


async def _async_retry_after(call: _Call, delay: float) -> None:
    """The async twin of ``_retry_after``."""
    if delay:
        await _async_pause(call, delay)
    call._next_attempt()


def _sync_wrapper(func: Callable[..., Any], open_call: Opener) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = open_call(args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        if type(call) is _Replayed:
            return call.value
        ctx = call.otel_context  # _attach and _detach inlined: this runs for every call
        token = None if ctx is None else otel_context.attach(ctx)
        try:
            if call.wait_before:
                _pause(call, call.wait_before)
            while True:
                try:
                    result = func(*args, **kwargs)
                except BaseException as error:
                    delay = _delay_before_retry(call, error)
                    if delay is None:
                        _raise_failed(call, error)
                    _retry_after(call, delay)
                    continue
                if isinstance(result, CoroutineType):  # a lambda around an async call, say
                    if isinstance(call, _StepCall):  # only steps care (replay)
                        call._awaited = True
                    return _await_returned(call, result, func, args, kwargs)
                return call._succeed(result)
        finally:
            if token is not None:
                otel_context.detach(token)

    return wrapper


async def _await_returned(
    call: _Call, returned: Any, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The rest of a call whose function, no coroutine function, returned the coroutine
    ``returned``: awaited in the call, as its first attempt; a retry calls the function again
    and awaits what it returns."""
    token = _attach(call)
    try:
        while True:
            try:
                if returned is None:
                    returned = func(*args, **kwargs)
                result = await returned if isinstance(returned, CoroutineType) else returned
            except BaseException as error:
                returned = None
                delay = _delay_before_retry(call, error)
                if delay is None:
                    _raise_failed(call, error)
                await _async_retry_after(call, delay)
                continue
            return call._succeed(result)
    finally:
        _detach(token)


def _async_wrapper(func: Callable[..., Any], open_call: Opener) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = open_call(args, kwargs)
        if call is None:
            return await func(*args, **kwargs)
        if type(call) is _Replayed:
            return call.value
        ctx = call.otel_context  # _attach and _detach inlined: this runs for every call
        token = None if ctx is None else otel_context.attach(ctx)
        try:
            if call.wait_before:
                await _async_pause(call, call.wait_before)
            while True:
                try:
                    result = await func(*args, **kwargs)
                except BaseException as error:
                    delay = _delay_before_retry(call, error)
                    if delay is None:
                        _raise_failed(call, error)
                    await _async_retry_after(call, delay)
                    continue
                return call._succeed(result)
        finally:
            if token is not None:
                otel_context.detach(token)

    return wrapper


def _gen_wrapper(func: Callable[..., Any], open_call: Opener) -> Callable[..., Any]:
    """Streams the generator; the call's context is current only while its body runs.

    A generator that fails before its first item is retried like a function;
    once items were handed out, a failure ends the step.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = open_call(args, kwargs)
        if call is None:
            return (yield from func(*args, **kwargs))
        if type(call) is _Replayed:  # served from the replay log: (items, return value)
            yield from call.value[0]
            return call.value[1]
        if call.wait_before:
            _pause(call, call.wait_before)
        step = call if isinstance(call, _StepCall) else None  # only steps look at what they stream
        try:
            gen = func(*args, **kwargs)
        except BaseException as error:  # wrong arguments, say: fails as its body would
            gen = _raising(error)
        how, value = gen.send, None
        count = 0
        while True:
            try:
                # _attach and _detach inlined: this runs for every item
                ctx = call.otel_context
                token = None if ctx is None else otel_context.attach(ctx)
                try:
                    item = how(value)
                finally:
                    if token is not None:
                        otel_context.detach(token)
            except StopIteration as stop:
                returned = stop.value
                break
            except BaseException as error:
                if count:
                    _raise_failed(call, error)
                delay = _delay_before_retry(call, error)  # nothing handed out yet: retried
                if delay is None:
                    _raise_failed(call, error)
                _retry_after(call, delay)
                try:
                    gen = func(*args, **kwargs)
                except BaseException as error:
                    gen = _raising(error)
                how, value = gen.send, None
                continue
            count += 1
            if step is not None:
                step._observe(item)
            try:
                sent = yield item
            except GeneratorExit:
                if step is not None:
                    step._stream_cut()
                closing = _attach(call)
                try:
                    gen.close()
                except BaseException as error:  # its cleanup failed (or it yielded again): the step did
                    _raise_failed(call, error)
                finally:
                    _detach(closing)
                _end_closed_stream(call, {attr.STEP_STREAM_ITEMS: count})
                raise
            except BaseException as thrown:
                if step is not None:
                    step._stream_cut()
                how, value = gen.throw, thrown
            else:
                if sent is not None and step is not None:
                    step._stream_cut()
                how, value = gen.send, sent
        call._succeed(returned, {attr.STEP_STREAM_ITEMS: count})
        return returned

    return wrapper


def _async_gen_wrapper(func: Callable[..., Any], open_call: Opener) -> Callable[..., Any]:
    """The async twin of ``_gen_wrapper``."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = open_call(args, kwargs)
        if call is None:  # as ``yield from`` would (async generators have none): sent, thrown, closed
            agen = func(*args, **kwargs)
            how, value = _first_send, agen
            while True:
                try:
                    item = await how(value)
                except StopAsyncIteration:
                    return
                try:
                    value = yield item
                except GeneratorExit:
                    await agen.aclose()
                    raise
                except BaseException as thrown:
                    how, value = agen.athrow, thrown
                else:
                    how = agen.asend
        if type(call) is _Replayed:  # served from the replay log: (items, return value)
            for item in call.value[0]:
                yield item
            return
        if call.wait_before:
            await _async_pause(call, call.wait_before)
        step = call if isinstance(call, _StepCall) else None  # only steps look at what they stream
        try:
            agen = func(*args, **kwargs)
        except BaseException as error:  # wrong arguments, say: fails as its body would
            agen = _async_raising(error)
        how, value = _first_send, agen
        count = 0
        while True:
            try:
                # _attach and _detach inlined: this runs for every item
                ctx = call.otel_context
                token = None if ctx is None else otel_context.attach(ctx)
                try:
                    item = await how(value)
                finally:
                    if token is not None:
                        otel_context.detach(token)
            except StopAsyncIteration:
                break
            except BaseException as error:
                if count:
                    _raise_failed(call, error)
                delay = _delay_before_retry(call, error)  # nothing handed out yet: retried
                if delay is None:
                    _raise_failed(call, error)
                await _async_retry_after(call, delay)
                try:
                    agen = func(*args, **kwargs)
                except BaseException as error:
                    agen = _async_raising(error)
                how, value = _first_send, agen
                continue
            count += 1
            if step is not None:
                step._observe(item)
            try:
                sent = yield item
            except GeneratorExit:
                if step is not None:
                    step._stream_cut()
                closing = _attach(call)
                try:
                    await agen.aclose()
                except BaseException as error:  # its cleanup failed (or it yielded again): the step did
                    _raise_failed(call, error)
                finally:
                    _detach(closing)
                _end_closed_stream(call, {attr.STEP_STREAM_ITEMS: count})
                raise
            except BaseException as thrown:
                if step is not None:
                    step._stream_cut()
                how, value = agen.athrow, thrown
            else:
                if sent is not None and step is not None:
                    step._stream_cut()
                how, value = agen.asend, sent
        call._succeed(None, {attr.STEP_STREAM_ITEMS: count})

    return wrapper


def _raising(error: BaseException) -> Generator[Any, Any, Any]:
    """A generator that raises ``error`` when started: a generator step whose call raised
    (its arguments did not fit) is retried or fails as one whose body raised at once."""
    raise error
    yield  # a generator, never reached


async def _async_raising(error: BaseException) -> AsyncGenerator[Any, Any]:
    """The async twin of ``_raising``."""
    raise error
    yield  # an async generator, never reached


def _first_send(agen: Any) -> Any:
    """``agen.asend(None)``, the first of the program's async generator that a wrapper drives,
    made with the event loop's first-iteration hook off: the loop does not track it, so it does
    not close it at shutdown. ``asyncio.run`` closes every generator it tracks at once, the
    program's while its wrapper (tracked) was closing it: "aclose(): asynchronous generator is
    already running", logged at exit, or failing the step. The wrapper closes it; its
    finalizer stays, so one dropped unclosed is still closed on the loop."""
    firstiter, finalizer = sys.get_asyncgen_hooks()
    if firstiter is None:
        return agen.asend(None)
    sys.set_asyncgen_hooks(firstiter=None, finalizer=finalizer)
    try:
        return agen.asend(None)  # the hooks run here, before any of the generator's code
    finally:
        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=finalizer)


# ---------------------------------------------------------------------------
# validation: clear errors at decoration time, naming the parameter


def _callable(decorator: str, fn: Any) -> Callable[..., Any]:
    if not callable(fn) and not isinstance(fn, (staticmethod, classmethod)):
        hint = f" (to name it, use @{decorator}(name={fn!r}))" if isinstance(fn, str) else ""
        raise ConfigurationError(
            f"@{decorator} decorates a function or method, got {type(fn).__name__} {fn!r}{hint}"
        )
    return fn  # type: ignore[no-any-return]


def _is_method(func: Any) -> bool:
    """Whether ``func`` is called with an instance or a class first: a classmethod, or a function
    defined in a class body whose first parameter is ``self`` or ``cls``."""
    if isinstance(func, classmethod):
        return True
    if not inspect.isfunction(func):
        return False  # a staticmethod, a callable object, a partial...
    owner = func.__qualname__.rsplit(".", 2)
    if len(owner) < 2 or owner[-2] == "<locals>":
        return False
    first = next(iter(inspect.signature(func).parameters.values()), None)
    return first is not None and first.name in ("self", "cls") and first.kind in _POSITIONAL


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _validate_name(decorator: str, name: str | None, fn: Any) -> str:
    if name is None:
        fn_name = getattr(fn, "__name__", None)
        if not fn_name or fn_name == "<lambda>":
            raise ConfigurationError(f"@{decorator}: pass name=... for a callable without a name")
        return str(fn_name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"@{decorator}(name=...) must be a non-empty string, got {name!r}")
    if len(name) > 256 or "\x00" in name:
        raise ConfigurationError(f"@{decorator}(name=...) must be at most 256 characters, no NUL")
    return name


def _enum(decorator: str, param: str, enum: Any, value: Any) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ConfigurationError(
            f"@{decorator}({param}=...) must be one of {allowed}, got {value!r}"
        ) from None


def _bool(decorator: str, param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"@{decorator}({param}=...) must be True or False, got {value!r}")
    return value


def _non_negative_int(decorator: str, param: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"@{decorator}({param}=...) must be an int >= 0, got {value!r}")
    return value


def _delay(decorator: str, param: str, value: Any) -> float:
    """Seconds to wait: a finite number >= 0 (an infinite wait is no retry at all), and no longer
    than a clock can sleep."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_WAIT_SECONDS:
        raise ConfigurationError(
            f"@{decorator}({param}=...) must be a number of seconds >= 0 and at most "
            f"{MAX_WAIT_SECONDS:g} (about 31 years), got {value!r}"
        )
    return float(value)


def _exception_types(decorator: str, param: str, value: Any) -> tuple[type[Exception], ...] | None:
    if value is None:
        return None
    if isinstance(value, type):
        value = (value,)
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(t, type) and issubclass(t, BaseException) for t in value)
    ):
        raise ConfigurationError(
            f"@{decorator}({param}=...) must be a tuple of exception classes, got {value!r}"
        )
    for t in value:
        if not issubclass(t, Exception):
            raise ConfigurationError(
                f"@{decorator}({param}=...) must list Exception classes: {t.__name__} is not one, "
                "and is never retried"
            )
    return value


def _model(decorator: str, param: str, cls: Any, value: Any) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        from pydantic import ValidationError

        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise ConfigurationError(f"@{decorator}({param}=...): {_one_line(exc, cls)}") from None
    raise ConfigurationError(
        f"@{decorator}({param}=...) must be a {cls.__name__} or a dict, got {type(value).__name__}"
    )


def _one_line(error: ValidationError, model: type[BaseModel]) -> str:
    """A pydantic ValidationError as one line: ``max_tokens: Input should be ..., got -1``."""
    return "; ".join(_problem(problem, model) for problem in error.errors())


def _problem(problem: ErrorDetails, model: type[BaseModel]) -> str:
    """One problem pydantic found; a misspelt field of ``model`` lists the fields it has."""
    where = ".".join(map(str, problem["loc"])) or "value"
    if problem["type"] == "extra_forbidden" and len(problem["loc"]) == 1:
        return f"{where} is not a field of {model.__name__} (use {', '.join(model.model_fields)})"
    return f"{where}: {problem['msg']}, got {problem['input']!r:.80}"
