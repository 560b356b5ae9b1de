"""Motus (``lithosai-motus``) programs as multirun runs, agents and steps, without touching their code.

Usage::

    from multirun.integrations.motus import MotusInstrumentor

    MotusInstrumentor().instrument()
    print(resolve(research_crew("OpenTelemetry for agents")))   # unchanged Motus code

or, with no code change at all, ``opentelemetry-instrument python app.py`` (the
``motus`` entry point of the ``opentelemetry_instrumentor`` group). Motus needs
Python 3.12 or newer; instrumenting does not import it: the patches are applied
when the program imports Motus (at once if it already did).

What becomes what: every ``@agent_task`` call is a step of the run current
where the task was *registered* (a new run named after the task when none is),
however late and on whichever thread Motus's scheduler runs it:

- ``model_call`` tasks are LLM steps ``chat {model}``, with the model, tokens
  and cost of the ``ChatCompletion`` they return (charged once, to the step;
  marked ``multirun.usage.unknown`` when it carries none, never a silent 0);
  ``tool_call`` tasks are tool steps ``execute_tool {tool name}`` (a tool's
  error, which Motus hands the model as its result, is on the completed
  step's span: ``error.type``, an exception event, an error status);
  ``agent_call`` tasks (``ReActAgent`` runs) are agents ``invoke_agent {name}``
  whose tasks are their steps; other tasks are steps ``step {name}``.
- the span starts when Motus dispatches the task (its inputs are ready) and
  ends when its result is settled, an agent's too when its run ended before
  (the run's end does not end it), so parallel tasks are overlapping siblings
  (a sync task's thread that Motus stopped waiting for, cancelled or timed
  out, runs on: its step, and the run started for it, end when it returns);
  the tasks whose results a task was given are span links (and
  ``multirun.motus.task.depends_on`` names them).
- each failed attempt that Motus retries, a timeout included, is an
  ``exception`` event with its attempt number and retry delay; a cancelled
  task (or one cancelled because an input was) is marked ``cancelled``; a task
  that never ran because an input failed has a short failed span, as have, at
  once, those not started when Motus shuts down (running ones end failed then).
- the run's budget and policy decide before each task starts: a task over
  budget does not run, and its future (and those of the tasks waiting for it)
  raises ``BudgetExceededError``. A retry over budget is not attempted, nor,
  as a decorated step's backoff, one that would start past the run's deadline
  on its clock (Motus sleeps its ``retry_delay`` on real time). Each
  retry is another call, as a decorated step's: the failed attempt counts
  towards the circuit, and the retry asks the policy (an open circuit refuses
  it with ``PolicyViolation``, the task's error then, with no further retry;
  a rate limit makes it wait for its slot; a degraded run gives it the
  fallback model). A task that waited for its rate-limit slot asks the circuit
  again (refused, it is not retried); one cancelled gives back its circuit
  probe, and its slot if it was still waiting for it. Motus's timeout covers
  that wait, and a sync task's wait for a worker thread: an attempt whose
  timeout ends either never ran, gives its slot back and counts for nothing
  towards the circuit, and Motus retries its ``TimeoutError`` as any other
  (the retry asks for a slot of its own).

How: the caller's OpenTelemetry context is captured in
``AgentRuntime.submit_task_registration`` (which ``register_agent_task`` calls,
however the program got hold of that function), on the caller's thread, and
travels with the task on the creation stack Motus keeps for its error messages.
``GraphScheduler._execute_task`` opens the step in that context and makes it
current for the task (asyncio copies it into the task, and into the worker
thread of a sync task); ``GraphScheduler._resolve_task``, the one place where
results and errors are settled, settles and ends it before the futures are
resolved (see ``_TaskTrace.finish`` for a sync task's thread that runs on).
Telemetry never breaks the program: an instrumentation error costs a log line
and the task runs untraced.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection
from functools import lru_cache
from typing import Any

import wrapt
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.trace import Span, SpanContext, Status, StatusCode

from multirun._keys import agent_in, run_in, step_in
from multirun.clock import Clock
from multirun.context import AgentContext, RunContext, StepContext
from multirun.decorators import StepSpec, _open_step, _record_step_not_run, _StepCall
from multirun.errors import REFUSALS, PolicyViolation, error_text
from multirun.integrations._options import (
    check_options,
    framework_installed,
    instrumentation_failed,
    missing_framework,
    patch_all,
    patch_when_imported,
    reconfigures,
    take_options,
    unpatch_all,
)
from multirun.integrations._specs import framework_step_spec
from multirun.models.agent import AgentStatus
from multirun.models.budget import Budget
from multirun.models.policy import Policy
from multirun.models.run import Run, RunStatus
from multirun.models.step import StepKind, StepStatus
from multirun.sdk_usage import calls_in
from multirun.telemetry import attributes as attr
from multirun.telemetry import spans
from multirun.telemetry.exceptions import exception_event, record_exception
from multirun.usage import TokenUsage, is_cost

__all__ = ["MotusInstrumentor"]

_logger = logging.getLogger(__name__)

_INSTRUMENTS = ("lithosai-motus >= 0.4",)


def _install_hint() -> str:
    """How to get Motus here: the ``motus`` extra installs nothing before Python 3.12."""
    if sys.version_info < (3, 12):
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"Motus (lithosai-motus) needs Python 3.12 or newer, and this is Python {python}"
    return "Motus is not installed: pip install 'multirun-otel[motus]'"


# StepStatus keeps the reference's values, which have no "cancelled": a cancelled task closes as
# failed (so step metrics count it there) with this value in its span's status attribute
_CANCELLED = "cancelled"
_CANCELLED_STATUS = StepStatus.FAILED

_AGENT = "agent"  # the kind of agent_call tasks: an agent, not a step
_KINDS: dict[str, StepKind | str] = {
    "model_call": StepKind.LLM_CALL,
    "tool_call": StepKind.TOOL_CALL,
    "agent_call": _AGENT,
    "normal_task": StepKind.FUNCTION,
}
_MAGIC = "magic_task"  # Motus's own nodes for ``future + 1``, ``future.attr``: no span of their own

# Motus's chat clients, by class name, as GenAI provider names (the subclasses come first)
_PROVIDERS = {
    "OpenRouterChatClient": "openrouter",
    "OpenAIChatClient": "openai",
    "AnthropicChatClient": "anthropic",
    "GeminiChatClient": "gcp.gemini",
    "VolcEngineChatClient": "volcengine",
}

_REAL_TIME = Clock()

_REGISTRATION = "_multirun_task"  # attribute of the creation stack that carries a _Registration
_PRODUCERS = "_multirun_producers"  # attribute of an AgentFuture: the spans that produce its value

# (module, attribute path, wrapper); patched by module path string: ``motus.runtime`` re-exports
# ``agent_task`` and friends under the names of its submodules, so only sys.modules finds these.
# Methods, not module functions: a program that bound ``register_agent_task`` before instrumenting
# still calls these
_PATCHES: tuple[tuple[str, str, str], ...] = (
    ("motus.runtime.agent_runtime", "AgentRuntime.submit_task_registration", "_submit_task_registration"),
    ("motus.runtime.agent_runtime", "GraphScheduler._execute_task", "_execute_task"),
    ("motus.runtime.agent_runtime", "GraphScheduler._resolve_task", "_resolve_task"),
    ("motus.runtime.agent_runtime", "GraphScheduler.shutdown", "_shutdown"),
)
_HOOK_MODULE = "motus.runtime.agent_task"  # imported after agent_runtime: both are there when it is


class MotusInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces Motus tasks as multirun steps and agents, with budgets and policy enforced.

    ``instrument()`` takes, besides the usual ``tracer_provider`` (used when
    multirun is not configured yet), ``budget`` and ``policy``: the limits and
    rules of the runs the instrumentation starts for tasks registered outside
    any run.

    Called again once instrumented (as by a program run under
    ``opentelemetry-instrument``), the options it is given apply from then on.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def instrument(self, **kwargs: Any) -> Any:
        """Instrument Motus; without it, an error says how to install it, and nothing is patched."""
        check_options("MotusInstrumentor", kwargs)
        if missing_framework(_INSTRUMENTS, "MotusInstrumentor", _install_hint(), **kwargs):
            return None
        if reconfigures(self, kwargs):  # instrumented already (opentelemetry-instrument): options apply
            take_options(_settings, kwargs, "MotusInstrumentor", "Motus", keep=True)
            return None
        return super().instrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        if not framework_installed(_INSTRUMENTS, "Motus"):  # always so before Python 3.12
            return
        take_options(_settings, kwargs, "MotusInstrumentor", "Motus")
        patch_when_imported(_settings, _HOOK_MODULE, _on_motus_import, _patch)

    def _uninstrument(self, **kwargs: Any) -> None:
        _settings.active = False
        _settings.budget = _settings.policy = None
        _unpatch()


class _Settings:
    """What ``instrument`` was given; one set per process, as the instrumentor is a singleton."""

    def __init__(self) -> None:
        self.active = False
        self.patched: list[tuple[str, str]] = []  # (module, attribute path) wrapped, in order
        self.hook_registered = False
        self.budget: Budget | None = None
        self.policy: Policy | None = None
        # the scheduled tasks being traced, by id() of their list of result futures (shared with
        # the RESOLVE task that takes over a result holding futures); only the loop thread writes
        self.live: dict[int, _TaskTrace] = {}


_settings = _Settings()


class _Motus:
    """The few Motus names the wrappers need, looked up when Motus is patched (never imported here)."""

    agent_future: Any = None
    scanned: tuple[type, ...] = ()  # AgentFuture and the containers Motus looks for futures in
    agent_task_definition: Any = None
    base_chat_client: Any = None
    task_cancelled_error: type[BaseException] = Exception
    compute: Any = None  # TaskKind.COMPUTE
    not_started: tuple[Any, ...] = ()  # TaskStatus.PENDING, READY
    submit_signature: inspect.Signature | None = None  # of AgentRuntime.submit_task_registration


def _on_motus_import(module: Any) -> None:
    """Post-import hook: Motus's runtime was just imported."""
    if _settings.active:
        _patch()


def _patch() -> None:
    if not _settings.patched:
        _settings.patched = patch_all(_logger, "Motus", "lithosai-motus", _PATCHES, globals(), _look_up)


def _look_up() -> None:
    """Find the Motus names the wrappers read (an error if this Motus has not got them)."""
    instance = importlib.import_module("motus.runtime.task_instance")
    _Motus.agent_future = importlib.import_module("motus.runtime.agent_future").AgentFuture
    _Motus.scanned = (_Motus.agent_future, list, tuple, dict)
    _Motus.agent_task_definition = importlib.import_module("motus.runtime.agent_task").AgentTaskDefinition
    _Motus.base_chat_client = importlib.import_module("motus.models.base").BaseChatClient
    _Motus.task_cancelled_error = instance.TaskCancelledError
    _Motus.compute = instance.TaskKind.COMPUTE
    _Motus.not_started = (instance.TaskStatus.PENDING, instance.TaskStatus.READY)
    runtime = importlib.import_module("motus.runtime.agent_runtime")
    _Motus.submit_signature = inspect.signature(runtime.AgentRuntime.submit_task_registration)


def _unpatch() -> None:
    if not _settings.patched:
        return
    unpatch_all(_settings.patched)
    for key in list(_settings.live):  # spans still open: end them rather than lose them
        trace = _settings.live.pop(key, None)
        if trace is not None:
            trace.finish(None, RuntimeError("Motus instrumentation removed while the task ran"))


# ---------------------------------------------------------------------------
# failures of the instrumentation itself: a log line, never the program


def _broken(where: str) -> None:
    """Log (once per place at warning level) that the instrumentation failed; the task goes on."""
    instrumentation_failed("Motus", where, "the task goes on untraced")


# ---------------------------------------------------------------------------
# registration: on the caller's thread


_CLAIMS = threading.Lock()  # the loop thread and a thread shutting Motus down both claim tasks


class _Registration:
    """What the caller's thread knew when it registered a task: its context and the task's inputs."""

    __slots__ = ("context", "recorded", "upstream")

    def __init__(self, context: Context, upstream: list[Any]) -> None:
        self.context = context
        self.upstream = upstream  # the AgentFutures among the inputs, resolved or not
        self.recorded = False  # the task has a span already (or must not get one)

    def claim(self) -> bool:
        """Whether the caller gives the task its span: the first to ask does, on any thread."""
        with _CLAIMS:
            if self.recorded:
                return False
            self.recorded = True
            return True


def _submit_task_registration(wrapped: Callable[..., Any], runtime: Any, args: Any, kwargs: Any) -> Any:
    if _settings.active:
        try:
            assert _Motus.submit_signature is not None
            call = _Motus.submit_signature.bind(runtime, *args, **kwargs)
            stack = call.arguments.get("creation_stack")
            if stack is None:
                # an empty stack adds nothing to Motus's error messages, as None does
                stack = call.arguments["creation_stack"] = traceback.StackSummary()
                args, kwargs = call.args[1:], call.kwargs
            upstream: list[Any] = []
            scanned = _Motus.scanned
            for value in (*call.arguments.get("args", ()), *call.arguments.get("kwargs", {}).values()):
                if isinstance(value, scanned):
                    _futures_in(value, scanned[0], upstream)
            setattr(stack, _REGISTRATION, _Registration(otel_context.get_current(), upstream))
        except Exception:
            _broken("registering a task")
    return wrapped(*args, **kwargs)


def _futures_in(value: Any, future: type, out: list[Any]) -> None:
    """The AgentFutures in ``value``, looked for where Motus looks (lists, tuples, dict values)."""
    if isinstance(value, future):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _futures_in(item, future, out)
    elif isinstance(value, dict):
        for item in value.values():
            _futures_in(item, future, out)


def _registration(task: Any) -> _Registration | None:
    found = getattr(task.creation_stack, _REGISTRATION, None)
    return found if isinstance(found, _Registration) else None


# ---------------------------------------------------------------------------
# dispatch: on Motus's event-loop thread


def _execute_task(wrapped: Callable[..., Any], scheduler: Any, args: Any, kwargs: Any) -> Any:
    if not _settings.active:
        return wrapped(*args, **kwargs)
    task = args[0] if args else kwargs.get("task")
    try:
        reg = _registration(task) if task.kind is _Motus.compute else None
        if reg is None:
            return wrapped(*args, **kwargs)
        if task.task_type == _MAGIC:
            _set_producers(task, _producers(reg.upstream))
            return wrapped(*args, **kwargs)
        if not reg.claim():
            return wrapped(*args, **kwargs)
        trace = _TaskTrace.open(scheduler, task, reg)
    except REFUSALS as refused:
        # not run: its future (and those of the tasks waiting for it) raise the refusal
        scheduler._resolve_task(task, error=refused)
        return None
    except Exception:
        _broken("starting a task")
        return wrapped(*args, **kwargs)
    original = task.func
    token = None
    try:
        func = _watch_tool(trace, original)
        attempts = trace.attempts(func)
        if attempts is not None:
            task.func = attempts
        elif func is not original:
            task.func = func
        token = otel_context.attach(trace.otel_context)  # asyncio copies it into the task
    except Exception:
        _broken("starting a task")
    try:
        return wrapped(*args, **kwargs)
    except BaseException as error:
        # Motus failed to start it (an input that had failed already raises here, to the caller)
        if _settings.live.pop(id(trace.futures), None) is not None:
            trace.finish(None, error)
        raise
    finally:
        task.func = original
        if token is not None:
            otel_context.detach(token)


def _resolve_task(wrapped: Callable[..., Any], scheduler: Any, args: Any, kwargs: Any) -> Any:
    # the span ends first: whoever waits on the future sees the task's span finished
    if _settings.active:
        refused = None
        try:
            refused = _on_resolve(*args, **kwargs)
        except Exception:
            _broken("ending a task")
        if refused is not None:
            return wrapped(args[0] if args else kwargs["task"], error=refused)
    return wrapped(*args, **kwargs)


def _on_resolve(
    task: Any, results: list[Any] | None = None, error: Exception | None = None
) -> BaseException | None:
    """End the task's span; a refusal of its result by the policy, to settle the task with."""
    trace = _settings.live.pop(id(task.result_futures), None)
    if trace is not None:
        return trace.finish(results, error)
    if error is None or task.kind is not _Motus.compute or task.status not in _Motus.not_started:
        return None
    _record_unless_recorded(task, error)
    return None


def _record_unless_recorded(task: Any, error: BaseException) -> None:
    """The short span of a task that never ran, unless it has a span (or must not get one)."""
    reg = _registration(task)
    if reg is not None and task.task_type != _MAGIC and reg.claim():
        _record_not_started(task, reg, error)


def _shutdown(wrapped: Callable[..., Any], scheduler: Any, args: Any, kwargs: Any) -> Any:
    """End the spans of the scheduler's tasks with the error Motus poisons their futures with:
    those running, and, at once, those not started (which Motus settles, if ever, with a
    cancellation of its own after the shutdown: no span of theirs says that)."""
    try:
        error = RuntimeError("Motus runtime is shutting down")
        for key, trace in list(_settings.live.items()):
            # Motus's loop thread may have settled it since: then it is ended, with its outcome
            if trace.scheduler is scheduler and _settings.live.pop(key, None) is trace:
                trace.finish(None, error)
        for task in list(scheduler.tasks.values()):
            if task.kind is _Motus.compute and task.status in _Motus.not_started:
                _record_unless_recorded(task, error)
    except Exception:
        _broken("shutting Motus down")
    return wrapped(*args, **kwargs)


# ---------------------------------------------------------------------------
# one task


class _TaskTrace:
    """The step (or agent) of one scheduled task, from dispatch to settlement, and its attempts."""

    __slots__ = (
        "agent",
        "asked",
        "began",
        "clock",
        "ends",
        "extra",
        "failures",
        "futures",
        "kind",
        "lock",
        "name",
        "owned_run",
        "provider",
        "resume_at",
        "scheduler",
        "started",
        "step",
        "task",
        "threads",
        "tool_error",
        "waiting",
    )

    def __init__(self, scheduler: Any, task: Any, name: str, kind: StepKind | str) -> None:
        self.scheduler = scheduler
        self.task = task
        self.futures = task.result_futures  # keeps the key of _settings.live alive
        self.name = name
        self.kind = kind
        self.step: _MotusStep | None = None
        self.agent: AgentContext | None = None
        self.owned_run: RunContext | None = None
        self.provider: str | None = None
        self.extra: dict[str, Any] = {attr.MOTUS_TASK_ID: task.id.id, attr.MOTUS_TASK_TYPE: task.task_type}
        self.lock: threading.Lock | None = None  # only when attempts are followed (see attempts)
        self.asked: str | None = None  # the model Motus's arguments ask for (a model call's)
        self.started = 0  # attempts started
        self.began = 0.0  # when the last one started (time.monotonic: Motus's timeouts are on it)
        self.failures = 0  # failed attempts recorded as retried
        # the next attempt, or the one that waits, holds a decision of the policy it has not used
        # yet (its rate-limit slot, a circuit ticket), and waits until resume_at (the run's clock)
        self.waiting = False
        self.resume_at: float | None = None
        self.clock = _REAL_TIME  # the run's, once attempts are followed
        # a sync task's attempts running in Motus's worker threads; settled while one still runs
        # (Motus stopped waiting for it: cancelled, timed out), the task's ends wait for it (finish)
        self.threads = 0
        self.ends: list[Callable[[], Any]] | None = None
        self.tool_error: Exception | None = None  # a Motus tool's, handed to the model as a message

    @classmethod
    def open(cls, scheduler: Any, task: Any, reg: _Registration) -> _TaskTrace:
        """Open the task's step (or agent) in the context it was registered in.

        Raises the budget's or the policy's refusal after recording it.
        """
        name = _task_name(task)
        kind = _KINDS.get(task.task_type, StepKind.FUNCTION)
        trace = cls(scheduler, task, name, kind)
        ctx, trace.owned_run = _run_context(reg.context, name)
        try:
            token = otel_context.attach(ctx)
            try:
                if kind is _AGENT:
                    trace.agent = _start_agent(name, ctx)
                else:
                    assert isinstance(kind, StepKind)
                    model = None
                    if kind is StepKind.LLM_CALL:
                        model, trace.provider = _model_call_inputs(task)
                    client = run_in(ctx).client  # type: ignore[union-attr]
                    args, kwargs = task.unwrap_args() if client.capture_content else ((), {})
                    step = _open_step(_spec(name, kind, model), args, kwargs, _MotusStep)
                    assert isinstance(step, _MotusStep)
                    trace.step = step
                    if model is not None and step.model and step.model != model:
                        _switch_model(task, step.model)  # the policy fell back to a cheaper model
                    trace.asked = step.model
            finally:
                otel_context.detach(token)
        except BaseException as error:
            if trace.owned_run is not None:
                trace.owned_run.fail(error)
            raise
        _settings.live[id(trace.futures)] = trace  # from here on, settling the task ends the span
        try:
            trace._link(reg)
        except Exception:
            _broken("linking a task to its inputs")
        return trace

    def _link(self, reg: _Registration) -> None:
        """Links to the spans of the tasks whose results this one was given; its own for its results."""
        span = self.span
        producers = _producers(reg.upstream)
        if producers:
            names: list[str] = []
            for context, upstream_name in producers:
                span.add_link(context, {attr.STEP_NAME: upstream_name})
                if upstream_name not in names:
                    names.append(upstream_name)
            self.extra[attr.MOTUS_DEPENDS_ON] = tuple(names)
        _set_producers(self.task, ((span.get_span_context(), self.name),))

    @property
    def span(self) -> Span:
        if self.step is not None:
            return self.step.span
        assert self.agent is not None and self.agent._span is not None
        return self.agent._span

    @property
    def otel_context(self) -> Context:
        if self.step is not None:
            assert self.step.otel_context is not None
            return self.step.otel_context
        assert self.agent is not None
        return self.agent.otel_context

    # -- attempts: the task's function, called by Motus once per attempt --------

    def attempts(self, func: Callable[..., Any]) -> Callable[..., Any] | None:
        """``func`` wrapped to report each attempt, and each thread that runs one of a sync task;
        a coroutine function if ``func`` is one.

        None when there is nothing to follow (an async task with no retries and
        no wait): the task's one attempt ends with the task, and its error is the
        task's error.
        """
        wait = self.step.wait_before if self.step is not None else 0.0
        follow = bool(wait or self.task.policy.retries)
        if not follow and inspect.iscoroutinefunction(func):
            return None
        trace = self
        self.lock = threading.Lock()
        if follow:
            self.clock = self._run().client.clock
            if wait:
                self._hold(wait)  # the first attempt waits for its rate-limit slot
        clock = self.clock
        if inspect.iscoroutinefunction(func):

            async def attempt_async(*args: Any, **kwargs: Any) -> Any:
                number, wait = trace.begin_attempt()
                if wait is not None:
                    if wait:
                        # cut short by a cancellation or Motus's timeout: see begin_attempt, finish
                        await clock.async_sleep(wait)
                    trace.wait_over(number)
                args, kwargs = trace.arguments(func, args, kwargs)
                try:
                    return await func(*args, **kwargs)
                except BaseException as error:
                    trace.attempt_failed(number, error)  # raises the policy's refusal of a retry
                    raise

            wrapper: Callable[..., Any] = attempt_async
        else:

            def attempt(*args: Any, **kwargs: Any) -> Any:
                trace.thread_began()
                try:
                    if not follow:
                        return func(*args, **kwargs)
                    number, wait = trace.begin_attempt()
                    if wait is not None:
                        if wait:
                            clock.sleep(wait)
                        trace.wait_over(number)
                    args, kwargs = trace.arguments(func, args, kwargs)
                    try:
                        return func(*args, **kwargs)
                    except BaseException as error:
                        trace.attempt_failed(number, error)  # raises the policy's refusal of a retry
                        raise
                finally:
                    trace.thread_returned()

            wrapper = attempt
        # Motus names hooks and log lines after the function
        wrapper.__name__ = getattr(func, "__name__", wrapper.__name__)
        wrapper.__qualname__ = getattr(func, "__qualname__", wrapper.__qualname__)
        wrapper.__wrapped__ = func  # type: ignore[attr-defined]
        return wrapper

    def thread_began(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # set with the wrapper that calls this
            self.threads += 1

    def thread_returned(self) -> None:
        """A thread of the task returned: the last one makes the ends that waited for it."""
        try:
            ends = None
            with self.lock:  # type: ignore[union-attr]
                self.threads -= 1
                if not self.threads:
                    ends, self.ends = self.ends, None
            if ends is not None:
                self._make(ends)
        except Exception:
            _broken(f"ending task {self.name!r}")

    def begin_attempt(self) -> tuple[int, float | None]:
        """Number the attempt that starts, and the seconds it waits for its rate-limit slot
        (None: it holds no decision of the policy to wait for, or ask the circuit again about).

        A retry is not attempted once the run is over budget, nor when the policy refuses it
        (``_timed_out``): Motus's retries are used up and the refusal is the task's error.
        """
        try:
            with self.lock:  # type: ignore[union-attr]  # set with the wrapper that calls this
                if self.started < 0:
                    return 0, None  # the task was settled already (cancelled)
                # Motus counts a retry before it makes it: the attempts it made that never began
                # here waited for a worker thread (a sync task) until its timeout ended them
                while self.started < self.task.retry_count:
                    self._count_attempt()
                    self._timed_out(began=False)
                self._count_attempt()
                self.began = time.monotonic()  # Motus times an attempt on its loop's clock
                if not self.waiting:
                    return self.started, None
                left = 0.0 if self.resume_at is None else self.resume_at - self.clock.monotonic()
                return self.started, max(left, 0.0)
        except REFUSALS:
            raise
        except Exception:
            _broken("starting an attempt")
            return 0, None

    def _count_attempt(self) -> None:
        """One more attempt; the last one's failure first, if it ended with none seen here."""
        if self.started:
            if self.started > self.failures:
                self._timed_out()  # the last attempt ended without an outcome seen here
            self._check_retry_budget()
            if self.step is not None:
                self.step._next_attempt()  # counted as it starts: not if cancelled in its delay
        self.started += 1

    def wait_over(self, number: int) -> None:
        """Attempt ``number`` waited (for its rate-limit slot, Motus's retry delay): the circuit
        is asked again, as for a decorated step. Refused (it opened meanwhile), the task fails
        with PolicyViolation, which Motus does not retry.

        The attempt does not run if the task was settled meanwhile (a sync task cancelled), or
        if Motus's timeout ended it while it waited (the wait of a sync task, in its thread, is
        not cut short): the next attempt, or settling the task, gives its slot back.
        """
        assert self.step is not None and self.lock is not None
        with self.lock:  # finish() sees the wait over, or gives back what the step holds
            if self.started < 0:
                raise _Motus.task_cancelled_error(self.task.name, self.task.id.id)
            if number != self.started or self._out_of_time():
                raise self._unseen_failure(number)  # Motus gave up on it: a timeout, as Motus sees it
            try:
                self.step._wait_over()
            except REFUSALS:
                self.task.retry_count = self.task.policy.retries  # no retry of a refusal
                raise
            self.waiting, self.resume_at = False, None

    def arguments(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The attempt's arguments, asking for the step's model: the policy may have given a
        retry the fallback model (its run degraded after the failures before it)."""
        model = self.step.model if self.step is not None else None
        if model is None or model == self.asked:
            return args, kwargs
        return _with_model(func, args, kwargs, model)

    def attempt_failed(self, number: int, error: BaseException) -> None:
        """An attempt raised: recorded now if Motus will retry it, else when the task settles.
        The policy's refusal of the retry is raised in place of ``error`` (Motus does not retry it).
        No retry that would start past the run's deadline, on the run's clock (Motus sleeps its
        ``retry_delay`` on real time)."""
        refused = None
        try:
            if not isinstance(error, Exception) or isinstance(error, _Motus.task_cancelled_error):
                return  # cancelled: by a timeout (seen at the next attempt) or by the user
            task = self.task
            if task.retry_count >= task.policy.retries:
                return  # no retry: nothing to record now (asked again below, under the lock)
            # its text and traceback are made before the lock is taken: the error's __str__ is the
            # program's code, and Motus's loop thread waits for this lock to settle the task
            said = exception_event(error)
            with self.lock:  # type: ignore[union-attr]
                if number != self.started or self.failures >= number or self._out_of_time():
                    return  # Motus's timeout ended it (seen at the next attempt); it ends late
                if task.retry_count >= task.policy.retries:
                    return  # what Motus decides next: no retry; the task's error, when it settles
                delay = task.policy.retry_delay
                if self.clock.monotonic() + delay >= self._run().ledger.deadline:
                    # as a decorated step's backoff: the retry would start when the run (or one
                    # enclosing it) is out of time. None, so Motus does not sleep its delay for it
                    task.retry_count = task.policy.retries
                    return
                self.failures = number
                refused = self._retry(error, delay, delay, said=said)
        except Exception:
            _broken("recording a failed attempt")
        if refused is not None:
            raise refused from error

    def _timed_out(self, began: bool = True) -> None:
        """Motus's timeout ended the last attempt, and Motus retries it now.

        Ended before it began (waiting for a worker thread) or while it waited for its
        rate-limit slot, the attempt never ran: it gives back its slot and its circuit probe and
        counts for nothing, but is the attempt's failure on the span; ended while it ran, it is
        a failed call. The refusal of the retry is raised.
        """
        number = self.started
        error = self._unseen_failure(number)
        self.failures = number
        ran, self.waiting, self.resume_at = began and not self.waiting, False, None
        refused = self._retry(error, self.task.policy.retry_delay, 0.0, ran=ran)
        if refused is not None:
            raise refused from error

    def _retry(
        self,
        error: BaseException,
        delay: float,
        not_before: float,
        ran: bool = True,
        said: dict[str, Any] | None = None,
    ) -> BaseException | None:
        """Record a failed attempt, that Motus retries ``delay`` seconds after it failed, and
        ``not_before`` seconds from now; and ask the policy for that retry, as a decorated
        step's retry does (``_StepCall._retry_decision``). Returns its refusal: then Motus's
        retries are used up, and the refusal is the task's error. ``said``: the error's
        ``exception_event``, made before."""
        step = self.step
        if step is None:  # an agent: the policy governs its steps, not it
            record_exception(
                self.span,
                error,
                attributes={
                    attr.STEP_ATTEMPT: self.failures,
                    attr.STEP_RETRY_DELAY: delay,
                    attr.ERROR_TYPE: _error_type(error),
                },
                event=said,
            )
            return None
        try:
            wait = step._retry_decision(error, not_before, ran)
        except PolicyViolation as refused:
            step._record_attempt_failure(error, None, said)
            step._call_error = error  # what its model call is timed with, not the refusal
            self.task.retry_count = self.task.policy.retries
            return refused
        # the retry holds its slot (and circuit ticket) from now: given back if it never runs
        self._hold(wait if wait > not_before else 0.0)
        step._retrying = error  # what a refusal when its wait is over follows
        step._record_attempt_failure(error, delay - not_before + wait, said)
        return None

    def _hold(self, wait: float) -> None:
        """The next attempt (or the first, before it starts) holds a decision of the policy it
        has not used yet, and starts no sooner than ``wait`` seconds from now on the run's
        clock, when its rate-limit slot starts (Motus's retry delay is part of that wait)."""
        self.waiting = True
        self.resume_at = self.clock.monotonic() + wait if wait else None

    def _out_of_time(self) -> bool:
        """Whether Motus's timeout has ended the attempt in flight (it times it on real time)."""
        timeout = self.task.policy.timeout
        return timeout is not None and time.monotonic() - self.began >= timeout

    def _unseen_failure(self, number: int) -> Exception:
        timeout = self.task.policy.timeout
        if timeout is not None:
            return TimeoutError(
                f"attempt {number} of task {self.name!r} exceeded its timeout of {timeout:g}s"
            )
        return RuntimeError(f"attempt {number} of task {self.name!r} ended without a result")

    def _check_retry_budget(self) -> None:
        """Refuse the retry if the task's run or a run enclosing it has spent its budget (other
        tasks may have spent it during Motus's retry delay): on the step's span and in the
        metrics as a budget refusal, as a decorated step's retry after its backoff is."""
        refused = self._run().ledger.over_budget()
        if refused is not None:
            self.task.retry_count = self.task.policy.retries  # no further retry either
            step = self.step
            if step is not None:
                step._note_budget_refusal(refused)
                step._call_error = step._retrying  # its model call is timed with the call's error
            raise refused

    def _run(self) -> RunContext:
        holder: StepContext | AgentContext | None = self.step if self.step is not None else self.agent
        assert holder is not None
        return holder.run_context

    # -- settlement ----------------------------------------------------------------

    def finish(self, results: list[Any] | None, error: BaseException | None) -> BaseException | None:
        """Settle the step (and the run started for the task) with the task's outcome, and end them.

        Called once: by whoever took the trace out of ``_settings.live``.
        Returns the policy's refusal of a result (its usage has no price and
        ``init(unpriced="fail")`` is set): the task's error instead.

        A thread of a sync task that Motus stopped waiting for (it was cancelled,
        or timed out) runs on, and what it still does, its usage, the tasks it
        calls, is the step's: the outcome counts now (towards the circuit too),
        and the step's span, its agent's and its run's end when that thread returns.
        """
        lock = self.lock
        waiting = hold = False
        if lock is None:
            self.started = -1
        else:
            with lock:
                self.started = -1  # late attempts of a sync task that timed out are ignored from now
                waiting, self.waiting = self.waiting, False
                hold = self.threads > 0
        ends: list[Callable[[], Any]] = []
        refused = None
        try:
            if hold and self.step is not None:
                self.step.hold_end()
                ends.append(self.step.end_held)
            if error is None:
                result = None
                if results:
                    result = results[0] if len(results) == 1 else tuple(results)
                refused = self._complete(result, ends)
            else:
                cancelled = isinstance(error, _Motus.task_cancelled_error)
                if self.step is not None and (waiting or cancelled):
                    # it never ran (ended while it waited for its slot), or was cancelled: its circuit
                    # probe, and the slot it did not use, are free again
                    self.step._give_back(slot=waiting)
                if cancelled:
                    self._cancel(ends)
                else:
                    self._fail(error, ends)
        except Exception:
            _broken(f"ending task {self.name!r}")
        if hold:
            with lock:  # type: ignore[union-attr]
                if self.threads:  # else it returned meanwhile: the ends are made now
                    self.ends, ends = ends, []
        self._make(ends)
        return refused

    def _make(self, ends: list[Callable[[], Any]]) -> None:
        try:
            for end in ends:
                end()
        except Exception:
            _broken(f"ending task {self.name!r}")

    def _complete(self, result: Any, ends: list[Callable[[], Any]]) -> BaseException | None:
        step, agent, run = self.step, self.agent, self.owned_run
        if step is not None:
            extra = self.extra
            if self.kind is StepKind.LLM_CALL:
                try:
                    usage = _usage_of(result, self.provider)
                    if usage is not None:
                        # charged (and counted) even when refused
                        step._charge_response_usage((_response_id(result), usage, attr.OP_CHAT, None))
                    elif step._own_usage is None and not step.child_usage_reported and not _has_usage(result):
                        # its tokens were spent all the same: not a silent 0
                        extra = {**extra, attr.USAGE_UNKNOWN: True}
                except REFUSALS as refused:
                    self._fail(refused, ends)
                    return refused
                except Exception:  # the step still ends, with the task's result
                    _broken(f"charging task {self.name!r}")
            error = self.tool_error
            if error is not None:
                # Motus made the tool's error the task's result: the step completes with it, and
                # its span shows the error (not escaped: the agent goes on)
                extra = {**extra, attr.ERROR_TYPE: _error_type(error)}
                span = step.span
                record_exception(span, error)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error_text(error)}"))
            step._succeed(result, extra)
        elif agent is not None:
            self.span.set_attributes(self.extra)
            ends.append(functools.partial(agent.complete, result))
        if run is not None:
            ends.append(functools.partial(run.complete, result))
        return None

    def _fail(self, error: BaseException, ends: list[Callable[[], Any]]) -> None:
        self.span.set_attributes(self.extra)
        if self.step is not None:
            self.step._failed(error)
        elif self.agent is not None:
            ends.append(functools.partial(self.agent.fail, error))
        if self.owned_run is not None:
            ends.append(functools.partial(self.owned_run.fail, error))

    def _cancel(self, ends: list[Callable[[], Any]]) -> None:
        if self.step is not None:
            self.step._close(_CANCELLED_STATUS, extra={**self.extra, attr.STEP_STATUS: _CANCELLED})
        elif self.agent is not None:
            self.span.set_attributes(self.extra)
            ends.append(functools.partial(self.agent._finish, AgentStatus.CANCELLED, None))
        if self.owned_run is not None:
            ends.append(functools.partial(self.owned_run._finish, RunStatus.CANCELLED))


def _watch_tool(trace: _TaskTrace, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func``, or, when it is ``Tool._execute`` of a Motus tool, a coroutine function that
    tells ``trace`` the error of the tool's call, which ``Tool._execute`` turns into the message
    ``{"error": ...}`` for the model (no hook of Motus's sees it)."""
    if trace.kind is not StepKind.TOOL_CALL or not trace.task.args:
        return func
    module = sys.modules.get("motus.tools.core.tool")  # no tool task before Motus's tools are imported
    tool_class: Any = getattr(module, "Tool", None)
    execute = getattr(tool_class, "__dict__", {}).get("_execute")
    watched = (
        isinstance(execute, _Motus.agent_task_definition)
        and execute.unwrap_task() is func
        and isinstance(trace.task.args[0], tool_class)
    )
    if not watched:
        return func

    async def tool_call(tool: Any, *args: Any, **kwargs: Any) -> Any:
        return await func(_WatchedTool(tool, trace), *args, **kwargs)

    tool_call.__name__ = func.__name__  # Motus names hooks and log lines after the function
    tool_call.__qualname__ = func.__qualname__
    tool_call.__wrapped__ = func  # type: ignore[attr-defined]
    return tool_call


class _WatchedTool(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """A Motus tool for one call of ``Tool._execute``, whose ``_invoke`` tells the task's trace
    its error before ``Tool._execute`` catches it."""

    def __init__(self, tool: Any, trace: _TaskTrace) -> None:
        super().__init__(tool)
        self._self_trace = trace

    async def _invoke(self, **kwargs: Any) -> Any:
        try:
            return await self.__wrapped__._invoke(**kwargs)
        except Exception as error:  # what Tool._execute catches
            self._self_trace.tool_error = error
            raise


class _MotusStep(_StepCall):
    """The step of a Motus task, whose span can end after its outcome is settled (``hold_end``)."""

    _held: list[tuple[Any, ...]] | None = None  # while held: the _close it makes at end_held

    def hold_end(self) -> None:
        """Settling the step records its outcome; its span ends at ``end_held``, and what is
        charged to it meanwhile is on it."""
        self._held = []

    def end_held(self) -> None:
        held, self._held = self._held, None
        if held:
            super()._close(*held[0])

    def _close(
        self,
        status: StepStatus,
        result: Any = None,
        error: BaseException | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        held = self._held
        if held is None:
            super()._close(status, result, error, extra)
        elif not held and not self.finished:
            held.append((status, result, error, extra))
            if not self._done:  # the outcome, as _close would record it
                self.status, self.result, self.error = status, result, error
                self._done = True


# ---------------------------------------------------------------------------
# runs, agents and steps


def _run_context(ctx: Context, name: str) -> tuple[Context, RunContext | None]:
    """``ctx`` if it is inside a run; else the context of a new run named ``name``, and that run."""
    if run_in(ctx) is not None:
        return ctx, None
    from multirun.client import get_client

    run = RunContext(
        get_client(),
        Run(name=name, budget=_settings.budget, policy=_settings.policy),
        checkpoint_on_error=False,
    )
    run._start(ctx)
    return run.otel_context, run


def _start_agent(name: str, ctx: Context) -> AgentContext:
    """An agent of the run current in ``ctx`` (the current context); refused over the budget of
    that run or of a run enclosing it."""
    run = run_in(ctx)
    assert run is not None
    refused = run.ledger.over_budget(next_step=True)
    if refused is not None:
        _record_step_not_run(
            _spec(name, StepKind.SUB_AGENT, None), agent_in(ctx) or run.default_agent, ctx, refused=refused
        )
        raise refused
    # its task, which can outlive the run, ends it (_TaskTrace.finish); so said before the agent
    # is among the run's, where a run ending meanwhile would end it first
    return run._start_agent(name, ends_with_run=False)


def _record_not_started(task: Any, reg: _Registration, error: BaseException) -> None:
    """A short span for a task that never ran: cancelled, or an input failed."""
    name = _task_name(task)
    kind = _KINDS.get(task.task_type, StepKind.FUNCTION)
    step_kind = StepKind.SUB_AGENT if kind is _AGENT else kind
    assert isinstance(step_kind, StepKind)
    ctx, owned = _run_context(reg.context, name)
    run = run_in(ctx)
    assert run is not None
    step = StepContext(agent_in(ctx) or run.default_agent, name, step_kind, step_in(ctx), managed=True)
    model = _model_call_inputs(task)[0] if step_kind is StepKind.LLM_CALL else None
    step.model = model
    step._open(
        ctx,
        spans.step_start_attributes(step_kind, name, model),
        (),
        {},
        spans.step_span_name(step_kind, name, model),
    )
    extra: dict[str, Any] = {attr.MOTUS_TASK_ID: task.id.id, attr.MOTUS_TASK_TYPE: task.task_type}
    if isinstance(error, _Motus.task_cancelled_error):
        extra[attr.STEP_STATUS] = _CANCELLED
        step._close(_CANCELLED_STATUS, extra=extra)
        if owned is not None:
            owned._finish(RunStatus.CANCELLED)
        return
    step._close(StepStatus.FAILED, error=error, extra=extra)
    if owned is not None:
        owned.fail(error)


def _spec(name: str, kind: StepKind, model: str | None) -> StepSpec:
    return framework_step_spec(_step_name(name), kind, model)


def _step_name(name: str) -> str:
    name = name.replace("\x00", "")[:256]
    return name if name.strip() else "task"


def _task_name(task: Any) -> str:
    """The task's function name; for a method of a named object (a tool, an agent), that name."""
    func = task.func
    args = task.args
    if args:
        owner = args[0]
        definition = getattr(type(owner), getattr(func, "__name__", ""), None)
        if isinstance(definition, _Motus.agent_task_definition) and definition.unwrap_task() is func:
            label = getattr(owner, "name", None)
            return label if isinstance(label, str) and label else f"{type(owner).__name__}.{task.name}"
    return str(task.name)


# ---------------------------------------------------------------------------
# dependencies: which spans produce the value of a future


def _producers(upstream: list[Any]) -> list[tuple[SpanContext, str]]:
    found: list[tuple[SpanContext, str]] = []
    seen: set[int] = set()
    for future in upstream:
        for context, name in vars(future).get(_PRODUCERS, ()):  # never getattr: Motus defers it
            if context.span_id not in seen:
                seen.add(context.span_id)
                found.append((context, name))
    return found


def _set_producers(task: Any, producers: Collection[tuple[SpanContext, str]]) -> None:
    value = tuple(producers)
    for future in task.result_futures:
        vars(future)[_PRODUCERS] = value


# ---------------------------------------------------------------------------
# model calls


def _model_call_inputs(task: Any) -> tuple[str | None, str | None]:
    """The model a model_call task asks for, and the provider of its chat client."""
    kwargs = task.kwargs
    model = kwargs.get("model")
    if model is None:
        position = _model_position(task.func)
        if position is not None and position < len(task.args):
            model = task.args[position]
    if isinstance(model, _Motus.agent_future):
        model = model.af_result() if model.af_done() else None
    provider = None
    for value in (*task.args, *kwargs.values()):
        if isinstance(value, _Motus.base_chat_client):
            provider = _provider(type(value))
            break
    return (model if isinstance(model, str) and model else None), provider


def _switch_model(task: Any, model: str) -> None:
    """Make a model_call task ask for ``model`` (its arguments are read after this, at dispatch)."""
    task.args, task.kwargs = _with_model(task.func, task.args, task.kwargs, model)


def _with_model(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], model: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a call of the model_call function ``func`` that asks for ``model``."""
    if "model" in kwargs:
        return args, {**kwargs, "model": model}
    position = _model_position(func)
    if position is not None and position < len(args):
        return (*args[:position], model, *args[position + 1 :]), kwargs
    return args, kwargs


@lru_cache(maxsize=256)
def _model_position(func: Callable[..., Any]) -> int | None:
    try:
        parameters = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return parameters.index("model") if "model" in parameters else None


_provider_of: dict[type, str | None] = {}


def _provider(cls: type) -> str | None:
    """The GenAI provider name of a Motus chat client class (None for one of its own)."""
    if cls in _provider_of:
        return _provider_of[cls]
    provider = None
    for klass in cls.__mro__:
        provider = _PROVIDERS.get(klass.__name__)
        if provider is not None:
            break
    if len(_provider_of) < 256:
        _provider_of[cls] = provider
    return provider


def _usage_of(result: Any, provider: str | None) -> TokenUsage | None:
    """The usage of a Motus ``ChatCompletion`` (its ``prompt_tokens`` exclude cached input)."""
    usage = getattr(result, "usage", None)
    if not isinstance(usage, dict) or not usage:
        return None
    prompt = _count(usage.get("prompt_tokens"))
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_write = _count(usage.get("cache_creation_input_tokens"))
    details = usage.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    output = _count(usage.get("completion_tokens"))
    if provider == "gcp.gemini" and not reasoning:
        # Motus's Gemini client drops the thinking count, which Gemini bills as output (and
        # leaves out of the answer's count); the total it keeps has it
        reasoning = max(_count(usage.get("total_tokens")) - prompt - cache_read - cache_write - output, 0)
        output += reasoning
    cost = usage.get("cost")  # a gateway's own price (OpenRouter); else genai-prices prices it
    if not is_cost(cost):
        cost = None
    model = getattr(result, "model", None)
    return TokenUsage(
        model=model if isinstance(model, str) and model else None,
        provider=provider,
        input_tokens=prompt + cache_read + cache_write,
        output_tokens=output,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        cost_usd=None if cost is None else float(cost),
    )


def _has_usage(result: Any) -> bool:
    """Whether ``result`` is (or holds) an LLM SDK response with usage: one the program's own
    model call returned, which the step charges as it charges any step's returned response."""
    return bool(calls_in(result))


def _response_id(result: Any) -> str | None:
    ident = getattr(result, "id", None)
    return ident if isinstance(ident, str) and ident else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _error_type(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
