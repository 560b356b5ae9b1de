"""ClientAI agents as multirun runs, agents and steps, without touching their code.

Usage::

    from multirun.integrations.clientai import ClientAIInstrumentor

    ClientAIInstrumentor().instrument()
    agent.run("What changed in OpenTelemetry this year?")

or, with no code change at all, ``opentelemetry-instrument python app.py`` (the
``clientai`` entry point of the ``opentelemetry_instrumentor`` group).

What becomes what:

- ``Agent.run``: an agent span ``invoke_agent {name}`` (the ``role`` given to
  ``create_agent``, else the agent's class name), inside the current
  multirun run, or inside a new run of the same name when none is active (with
  the ``budget`` and ``policy`` given to ``instrument``, if any).
- each ``@think``/``@act``/``@observe``/``@synthesize`` step
  (``StepExecutionEngine.execute_step``): a step; think and synthesize are LLM
  calls, act an LLM call (a tool call when it does not send to the LLM),
  observe a function. ClientAI's own retries (``_execute_single_call`` again)
  are the step's attempts.
- ``ClientAI.generate_text`` / ``ClientAI.chat``: an LLM call ``chat {model}``
  with the tokens of the provider's full response. Every ClientAI provider
  (``openai``, ``groq``, ``ollama``, ``replicate``) is asked for the full
  response and the text the caller expects is taken from it, as the provider
  itself does: the usage of a chat completion (Groq's stream sends it in
  ``x_groq.usage``), Ollama's ``prompt_eval_count`` and ``eval_count`` (on a
  stream's last chunk), Replicate's ``metrics``. An OpenAI stream, of text or
  of full chunks, is asked for its final usage chunk, which the caller does
  not get. A call that ends with no token counts (a Replicate stream, whose
  events are a copy of the prediction before it ran; a stream closed before
  its usage came) is marked ``multirun.usage.unknown``. With
  ``init(unpriced="fail")`` a call of a model with no known price is charged,
  then fails with ``PolicyViolation`` (a stream when read to its end).
- ``ToolSelector.select_tools``: a tool step ``select_tools`` (its LLM call
  inside); ``Tool.__call__``: a tool step ``execute_tool {tool name}``, over
  the call only: what the tool returns, an iterator too, is handed back as it is.
  ``Agent.use_tool`` raises a refusal of its tool call as itself, not in a ``ToolError``.

Only ``Agent.run`` starts a run when none is active: an LLM call, tool
selection or tool call made outside any run (a client used without an
``Agent``) is left alone, untraced.

Every one of these is a step of the run: the budget and the policy decide
before it starts, and a ClientAI agent over budget stops with
``BudgetExceededError`` (unwrapped from the errors ClientAI wraps it in), as
does a step, to the custom run method that called it.
The rate limit and the degradation rule govern the requests
(``generate_text`` / ``chat``), once each: an LLM step around a request is
asked only its circuit, as its requests are paced and counted themselves.
Streams keep their spans open until they are consumed, or until their
``Agent.run`` ends for a stream ClientAI keeps unread (see ``_ended_with_agent``).
Telemetry never breaks the agent: an instrumentation error costs a log line, and the call goes on
untraced.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import weakref
from collections.abc import Callable, Collection, Iterator
from functools import lru_cache
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from multirun._keys import RUN_KEY, run_in, step_in
from multirun.context import AgentContext, RunContext, StepContext
from multirun.decorators import StepSpec, _open_step, _pause, _StepCall
from multirun.errors import REFUSALS
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
from multirun.models.budget import Budget
from multirun.models.policy import Policy
from multirun.models.run import Run
from multirun.models.step import StepKind
from multirun.telemetry import attributes as attr
from multirun.telemetry.exceptions import record_exception
from multirun.usage import TokenUsage

__all__ = ["ClientAIInstrumentor"]

_logger = logging.getLogger(__name__)

_INSTRUMENTS = ("clientai >= 0.5",)
_INSTALL = "ClientAI is not installed: pip install 'multirun-otel[clientai]'"


# (module, attribute path, wrapper factory name); patched by module path string
_PATCHES: tuple[tuple[str, str, str], ...] = (
    ("clientai.agent.core.agent", "Agent.run", "_agent_run"),
    ("clientai.agent.core.agent", "Agent.use_tool", "_use_tool"),
    ("clientai.agent.core.execution", "StepExecutionEngine.execute_step", "_execute_step"),
    ("clientai.agent.core.execution", "StepExecutionEngine._execute_single_call", "_single_call"),
    ("clientai.client_ai", "ClientAI.generate_text", "_generate_text"),
    ("clientai.client_ai", "ClientAI.chat", "_chat"),
    ("clientai.agent.tools.selection.selector", "ToolSelector.select_tools", "_select_tools"),
    ("clientai.agent.tools.base", "Tool.__call__", "_tool_call"),
)

Wrapped = Callable[..., Any]


class ClientAIInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces ClientAI agents, steps, LLM calls and tools as multirun agents and steps.

    ``instrument()`` takes, besides the usual ``tracer_provider`` (used when
    multirun is not configured yet), ``budget`` and ``policy``: the limits and
    rules of the runs the instrumentation starts for agents run outside any run.

    Called again once instrumented (as by a program run under
    ``opentelemetry-instrument``), the options it is given apply from then on.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def instrument(self, **kwargs: Any) -> Any:
        """Instrument ClientAI; without it, an error says how to install it, and nothing is patched."""
        check_options("ClientAIInstrumentor", kwargs)
        if missing_framework(_INSTRUMENTS, "ClientAIInstrumentor", _INSTALL, **kwargs):
            return None
        if reconfigures(self, kwargs):  # instrumented already (opentelemetry-instrument): options apply
            take_options(_settings, kwargs, "ClientAIInstrumentor", "ClientAI", keep=True)
            return None
        return super().instrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        if not framework_installed(_INSTRUMENTS, "ClientAI"):
            return
        take_options(_settings, kwargs, "ClientAIInstrumentor", "ClientAI")
        patch_when_imported(_settings, _HOOK_MODULE, _on_clientai_import, _patch)

    def _uninstrument(self, **kwargs: Any) -> None:
        _settings.active = False
        _unpatch()
        _settings.budget = _settings.policy = None


class _Settings:
    """What ``instrument`` was given; one set per process, as the instrumentor is a singleton."""

    def __init__(self) -> None:
        self.active = False  # instrumented: ClientAI is patched, or will be when it is imported
        self.hook_registered = False
        self.patched: list[tuple[str, str]] = []  # (module, attribute path) wrapped, in order
        self.budget: Budget | None = None
        self.policy: Policy | None = None
        self.client_ai_error: type[BaseException] = Exception


_settings = _Settings()

# its __init__ imports the client, the agents and the tools: all that is patched
_HOOK_MODULE = "clientai"


def _on_clientai_import(module: Any) -> None:
    """Post-import hook: ClientAI was just imported."""
    if _settings.active:
        _patch()


def _patch() -> None:
    if not _settings.patched:
        _settings.patched = patch_all(_logger, "ClientAI", "clientai", _PATCHES, globals(), _look_up)


def _look_up() -> None:
    _settings.client_ai_error = importlib.import_module("clientai.exceptions").ClientAIError


def _unpatch() -> None:
    unpatch_all(_settings.patched)


# ---------------------------------------------------------------------------
# failures of the instrumentation itself: a log line, never the agent


def _broken(where: str) -> None:
    """Log (once per place at warning level) that the instrumentation failed; the call goes on."""
    instrumentation_failed("ClientAI", where, "the call goes on untraced")


# ---------------------------------------------------------------------------
# steps: multirun's own step machinery (policy, budget, spans, metrics)


_spec = framework_step_spec


def _open(spec: StepSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _StepCall | None:
    """Start a step in the current run: None if the instrumentation failed (logged).

    The budget's and the policy's refusals are raised, after their short failed span.
    """
    try:
        call = _open_step(spec, args, kwargs)
    except REFUSALS:
        raise
    except Exception:
        _broken(f"starting step {spec.name!r}")
        return None
    return call if isinstance(call, _StepCall) else None


def _succeeded(call: _StepCall, result: Any, extra: dict[str, Any] | None = None) -> None:
    try:
        call._succeed(result, extra)
    except Exception:
        _broken(f"ending step {call.name!r}")


def _failed(call: _StepCall, error: BaseException) -> None:
    try:
        call._failed(error)
    except Exception:
        _broken(f"ending step {call.name!r}")


def _run_step(
    call: _StepCall,
    wrapped: Wrapped,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    follow: bool = True,
    unwrap: bool = False,
) -> Any:
    """Call ``wrapped`` as the body of ``call``; with ``follow``, a returned iterator (a step's
    stream) keeps the step open until consumed, else the result is returned as it is.

    No step run so waits for a rate-limit slot: the requests inside it (``_llm_call``) do. A step
    that fails because the budget or the policy refused a request inside it fails with that
    refusal (ClientAI wraps it): no failure of its dependency, so not one of its circuit. With
    ``unwrap`` the refusal is also what it raises, as a step refused before it starts does.
    """
    ctx = call.otel_context or otel_context.get_current()
    token = otel_context.attach(ctx)
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as error:
        refused = _refusal_in(error)
        _failed(call, refused or error)
        if unwrap and refused is not None and refused is not error:
            raise refused from None  # ClientAI wrapped it in StepError
        raise
    finally:
        otel_context.detach(token)
    if follow and type(result) is not str and isinstance(result, Iterator):  # str first: ABC checks are slow
        return _ended_with_agent(
            _Follow(result, ctx, lambda error, items, cut, _: _end_stream(call, error, items, cut))
        )
    _succeeded(call, result)
    return result


def _ctx(call: StepContext) -> Context:
    """The context in which the step's body runs (set when its span started)."""
    ctx = call.otel_context
    return ctx if ctx is not None else otel_context.get_current()


def _end_stream(
    call: _StepCall, error: BaseException | None, items: int, cut: bool, extra: dict[str, Any] | None = None
) -> None:
    """End a streaming step; ``cut``: its agent ended before its stream (see ``_Follow.cut``).

    ``extra``: more attributes for the span of a completed step.
    """
    if call.finished:  # cut before: the rest of its stream was read after its span ended
        return
    if error is not None:
        _failed(call, error)
    elif cut:
        _succeeded(call, None, {attr.STEP_STREAM_ITEMS: items, attr.STEP_STREAM_UNFINISHED: True})
    else:
        _succeeded(call, None, {attr.STEP_STREAM_ITEMS: items, **(extra or {})})


# how a stream ended: (its error, the items handed out, cut by its agent's end, closed early)
_Finish = Callable[[BaseException | None, int, bool, bool], None]


class _Follow(Iterator[Any]):
    """Hands out ``inner``'s items, with ``ctx`` current while it makes each; ``finish`` once at the end.

    The end is the inner iterator's end or error, or the consumer stopping
    early: ``close()``, or dropping the iterator, even before its first item.
    Stopping early ends it as completed with the items handed out so far, as
    ``@step`` generators do. (A class, not a generator: a generator dropped
    before it started would never run its ``finally``, and its spans never end.)
    ``finish(error, items, cut, closed)``: ``closed`` when the consumer
    stopped early; it is called once more, with ``cut`` True, if ``cut()``
    came first.
    """

    __slots__ = ("__weakref__", "_ctx", "_cut", "_done", "_finish", "_inner", "_items")

    def __init__(self, inner: Iterator[Any], ctx: Context, finish: _Finish) -> None:
        self._inner = inner
        self._ctx = ctx
        self._finish = finish
        self._items = 0
        self._done = False
        self._cut = False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        token = otel_context.attach(self._ctx)
        try:
            item = next(self._inner)
        except StopIteration:
            self._end(None)
            raise
        except BaseException as error:
            self._end(error)
            raise
        finally:
            otel_context.detach(token)
        self._items += 1
        return item

    def close(self) -> None:
        """Stop early: close the inner iterator and end as completed."""
        if self._done:
            return
        close = getattr(self._inner, "close", None)
        token = otel_context.attach(self._ctx)
        try:
            if close is not None:
                close()
        except Exception as error:
            self._end(error)
            raise
        finally:
            otel_context.detach(token)
        self._end(None, closed=True)

    def cut(self) -> None:
        """End it now, before its stream's end, with the items handed out so far.

        Its stream can still be read: ``finish`` is called again at its end.
        """
        if not self._done and not self._cut:
            self._cut = True
            self._finish(None, self._items, True, False)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            try:
                self.close()
            except Exception:
                _broken("closing a dropped stream")

    def _end(self, error: BaseException | None, closed: bool = False) -> None:
        if not self._done:
            self._done = True
            self._finish(error, self._items, False, closed)


_SCOPE_KEY = otel_context.create_key("multirun.clientai.agent_scope")


def _ended_with_agent(stream: _Follow) -> _Follow:
    """Have ``stream`` cut when the ``Agent.run`` it was made in ends, if it is still open then.

    ClientAI keeps a step's stream that no step reads (the next step takes no
    input, or the step passes on no result) in the agent's context: cut, its
    step is in the trace when its run is, and the stream can still be read.
    """
    scope = otel_context.get_current().get(_SCOPE_KEY)
    if isinstance(scope, _AgentScope):
        scope.streams.append(weakref.ref(stream))
    return stream


def _mark_usage_below(call: StepContext) -> None:
    """Tell the steps above an LLM call that reported usage that it is charged.

    Each of them then counts it only in its roll-up: none charges a returned
    SDK response again, and none times the call as an LLM call of its own.
    """
    parent = call.parent
    while parent is not None:
        parent.child_usage_reported = True
        parent = parent.parent


# ---------------------------------------------------------------------------
# Agent.run


class _AgentScope:
    """One ``Agent.run``: its agent, and the run started for it when none was active."""

    __slots__ = ("agent", "owned", "streams")

    def __init__(self, name: str) -> None:
        current = otel_context.get_current()
        run: RunContext | None = run_in(current)
        owned = None
        if run is None:
            from multirun.client import get_client

            owned = RunContext(
                get_client(),
                Run(name=name, budget=_settings.budget, policy=_settings.policy),
                checkpoint_on_error=False,
            )
            run, current = owned, owned.otel_context
        token = otel_context.attach(current)
        try:
            self.agent: AgentContext = run.start_agent(name)
        except BaseException as error:
            if owned is not None:
                owned.fail(error)
            raise
        finally:
            otel_context.detach(token)
        self.owned = owned
        self.streams: list[weakref.ref[_Follow]] = []  # of its steps and LLM calls, oldest first

    def finish(self, error: BaseException | None, result: Any = None) -> None:
        for ref in self.streams:  # oldest first: an LLM call ends before the step around it
            stream = ref()
            if stream is not None:
                try:
                    stream.cut()
                except Exception:
                    _broken("ending a stream left unread")
        self.streams.clear()
        try:
            if error is None:
                self.agent.complete(result)
                if self.owned is not None:
                    self.owned.complete(result)
            else:
                self.agent.fail(error)
                if self.owned is not None:
                    self.owned.fail(error)
        except Exception:
            _broken(f"ending agent {self.agent.agent.name!r}")


def _agent_run(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _settings.active:  # uninstrumented: called through a method bound before
        return wrapped(*args, **kwargs)
    try:
        scope = _AgentScope(_agent_name(instance))
    except REFUSALS:
        raise
    except Exception:
        _broken("starting an agent")
        return wrapped(*args, **kwargs)
    token = otel_context.attach(otel_context.set_value(_SCOPE_KEY, scope, scope.agent.otel_context))
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as error:
        refused = _refusal_in(error)
        scope.finish(refused or error)
        if refused is not None:
            raise refused from None  # ClientAI wrapped it in StepError and WorkflowError
        raise
    finally:
        otel_context.detach(token)
    if type(result) is not str and isinstance(result, Iterator):
        return _Follow(result, scope.agent.otel_context, lambda error, *_: scope.finish(error))
    scope.finish(None, result)
    return result


# create_agent(role=...) builds its agent from a class of this name, with one step described so
_SINGLE_STEP_AGENT = "create_agent.<locals>.SingleStepAgent"
_ROLE_PREFIX, _ROLE_SUFFIX = "Execute ", " functionality"


def _agent_name(agent: Any) -> str:
    """The ``role`` an agent was given by ``create_agent``, else its class name.

    ``create_agent`` keeps the role only in the description of the agent's one
    step (``Execute {role} functionality``); its class is ``SingleStepAgent``
    whatever the role.
    """
    cls = type(agent)
    if cls.__qualname__ == _SINGLE_STEP_AGENT:
        step = getattr(cls.__dict__.get("process"), "_step_info", None)
        description = getattr(step, "description", None)
        if (
            isinstance(description, str)
            and description.startswith(_ROLE_PREFIX)
            and description.endswith(_ROLE_SUFFIX)
            and len(description) > len(_ROLE_PREFIX) + len(_ROLE_SUFFIX)
        ):
            return description[len(_ROLE_PREFIX) : -len(_ROLE_SUFFIX)]
    return cls.__name__


def _refusal_in(error: BaseException) -> BaseException | None:
    """A budget or policy refusal that ``error`` was raised because of, if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, REFUSALS):
            return current
        todo += [current.__context__, current.__cause__]
    return None


# ---------------------------------------------------------------------------
# the steps of an agent


_STEP_KINDS = {"THINK": StepKind.LLM_CALL, "SYNTHESIZE": StepKind.LLM_CALL, "ACT": StepKind.LLM_CALL}


def _step_kind(step: Any) -> StepKind:
    """think/synthesize: LLM call; act: LLM call, or tool call when it does not send to the LLM;
    observe: function. A think or synthesize step that does not send to the LLM is a function."""
    step_type = step.step_type.name
    if step.send_to_llm:
        return _STEP_KINDS.get(step_type, StepKind.FUNCTION)
    return StepKind.TOOL_CALL if step_type == "ACT" else StepKind.FUNCTION


def _model_name(config: Any) -> str | None:
    if isinstance(config, str):
        return config or None
    name = getattr(config, "name", None)
    return name if isinstance(name, str) and name else None


# id(ClientAI step) -> (the step, the engine's default model, its StepSpec): steps are frozen
# class-level objects, so what they become is worked out once per step and default model
_step_specs: dict[int, tuple[Any, Any, StepSpec]] = {}


def _step_spec(step: Any, default_model: Any) -> StepSpec:
    entry = _step_specs.get(id(step))
    if entry is not None and entry[0] is step and entry[1] is default_model:
        return entry[2]
    kind = _step_kind(step)
    if kind is StepKind.LLM_CALL:
        # its requests are generate_text calls, each paced and counted by the policy: the step
        # is asked its circuit only, or one request would take two slots and fail twice
        spec = _spec(step.name, kind, _model_name(step.llm_config or default_model), StepKind.FUNCTION)
    else:
        spec = _spec(step.name, kind, None)
    if len(_step_specs) >= 4096:
        _step_specs.clear()
    _step_specs[id(step)] = (step, default_model, spec)
    return spec


def _execute_step(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # outside any run _open gives None: the step runs untouched
    if not _settings.active:
        return wrapped(*args, **kwargs)
    try:
        step = args[0] if args else kwargs["step"]
        if not step.config.enabled:
            return wrapped(*args, **kwargs)  # ClientAI skips it: no step
        spec = _step_spec(step, getattr(instance, "_default_model", None))
    except Exception:
        _broken("reading a ClientAI step")
        return wrapped(*args, **kwargs)
    call = _open(spec, args[1:], {})
    if call is None:
        return wrapped(*args, **kwargs)
    # a custom run catching BudgetExceededError from a step gets it, wherever the step was refused
    return _run_step(call, wrapped, args, kwargs, unwrap=True)


def _single_call(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One attempt of a step's LLM call: a failure ClientAI retries is an attempt of the step."""
    try:
        return wrapped(*args, **kwargs)
    except Exception as error:
        try:
            _note_attempt(args[0] if args else kwargs["step"], error)
        except Exception:
            _broken("recording an attempt")
        raise


def _note_attempt(step: Any, error: Exception) -> None:
    call = step_in(otel_context.get_current())
    if not isinstance(call, _StepCall) or call.name != step.name:
        return
    config = step.config
    # ClientAI's _execute_with_retry: ClientAIError, retried while attempts <= retry_count
    if (
        config.use_internal_retry
        and isinstance(error, _settings.client_ai_error)
        and call.attempt <= config.retry_count
    ):
        call._record_attempt_failure(error, 0.0)
        call._next_attempt()  # ClientAI retries at once


def _select_tools(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _settings.active or otel_context.get_current().get(RUN_KEY) is None:  # outside any run: untouched
        return wrapped(*args, **kwargs)
    call = _open(_spec("select_tools", StepKind.TOOL_CALL, None), args[:1], {})
    if call is None:
        return wrapped(*args, **kwargs)
    return _run_step(call, wrapped, args, kwargs)


def _tool_call(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not _settings.active or otel_context.get_current().get(RUN_KEY) is None:  # outside any run: untouched
        return wrapped(*args, **kwargs)
    try:
        spec = _spec(str(instance.name), StepKind.TOOL_CALL, None)
    except Exception:
        _broken("reading a tool")
        return wrapped(*args, **kwargs)
    call = _open(spec, args, kwargs)
    if call is None:
        return wrapped(*args, **kwargs)
    # what a tool returns is the caller's, an iterator too (an open file, say): handed back as it is
    return _run_step(call, wrapped, args, kwargs, follow=False)


def _use_tool(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Agent.use_tool``: a refusal of the tool call is raised as itself, not in ClientAI's ToolError."""
    try:
        return wrapped(*args, **kwargs)
    except Exception as error:
        refused = _refusal_in(error)
        if refused is not None and refused is not error:
            raise refused from None
        raise


# ---------------------------------------------------------------------------
# LLM calls: ClientAI.generate_text and ClientAI.chat


_SKIP = object()  # a chunk the provider hands out no text for


def _completion_text(response: Any, method: str) -> Any:
    """The text of a chat completion (OpenAI, Groq)."""
    return response.choices[0].message.content


def _completion_chunk_text(chunk: Any, method: str) -> Any:
    choices = chunk.choices
    if not choices:  # the usage chunk of include_usage
        return _SKIP
    content = choices[0].delta.content
    return content if content else _SKIP  # the providers hand out no empty text


def _ollama_text(response: Any, method: str) -> Any:
    """The text of an Ollama response; of every chunk too, empty or not, as ClientAI streams it."""
    return response["response"] if method == "generate_text" else response["message"]["content"]


def _replicate_text(response: Any, method: str) -> Any:
    """The text of a Replicate prediction, and of each streamed event (ClientAI puts it in output)."""
    return response["output"]


_TextOf = Callable[[Any, str], Any]  # (full response or chunk, method) -> the text the caller expects

# provider name -> how it takes the text the caller expects from a full response, and from a chunk
_TEXT_OF: dict[str, tuple[_TextOf, _TextOf]] = {
    "openai": (_completion_text, _completion_chunk_text),
    "groq": (_completion_text, _completion_chunk_text),
    "ollama": (_ollama_text, _ollama_text),
    "replicate": (_replicate_text, _replicate_text),
}


class _Provider:
    """What the instrumentation knows of a ClientAI provider class."""

    __slots__ = ("include_usage", "name", "text_of")

    def __init__(self, cls: type) -> None:
        name = None
        for klass in cls.__mro__:  # ClientAI's providers live in clientai.<name>.provider
            parts = klass.__module__.split(".")
            if len(parts) == 3 and parts[0] == "clientai" and parts[2] == "provider":
                name = parts[1]
                break
        self.name = name  # gen_ai.provider.name
        # None for a provider whose full response the instrumentation cannot reduce
        self.text_of = _TEXT_OF.get(name or "")
        # the OpenAI API sends a stream's usage in a last chunk, when asked to
        self.include_usage = name == "openai"


_providers: dict[type, _Provider] = {}


def _provider_of(client: Any) -> _Provider:
    cls = type(getattr(client, "provider", None))
    info = _providers.get(cls)
    if info is None:
        info = _providers[cls] = _Provider(cls)
    return info


def _generate_text(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _llm_call("generate_text", wrapped, instance, args, kwargs)


def _chat(wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _llm_call("chat", wrapped, instance, args, kwargs)


def _llm_call(
    method: str, wrapped: Wrapped, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if not _settings.active or otel_context.get_current().get(RUN_KEY) is None:  # outside any run: untouched
        return wrapped(*args, **kwargs)
    try:
        by_name = _by_name(wrapped, args, kwargs) if len(args) > 2 else None
        if by_name is not None:  # options given by position (stream=True among them, say)
            args, kwargs = (), by_name
        if len(args) > 2:  # a call that does not fit the signature: traced, passed on as it is
            first, model, call_args, call_kwargs = args[0], args[1], args, dict(kwargs)
            adjustable = False
        else:
            first = args[0] if args else kwargs.get("prompt" if method == "generate_text" else "messages")
            model = args[1] if len(args) > 1 else kwargs.get("model")
            call_args, call_kwargs = args[:1], dict(kwargs)
            if len(args) > 1:
                call_kwargs["model"] = model
            adjustable = "model" in call_kwargs
        provider = _provider_of(instance)
        requested = model if isinstance(model, str) else None
        spec = _spec(method, StepKind.LLM_CALL, requested)
    except Exception:
        _broken(f"reading a {method} call")
        return wrapped(*args, **kwargs)
    call = _open(spec, (first,), {})
    if call is None:
        return wrapped(*args, **kwargs)
    stream = bool(call_kwargs.get("stream", False))
    reduce: tuple[_TextOf, _TextOf] | None = None  # set when the full response was asked for here
    usage_chunk = False  # set when a stream's usage chunk was asked for here
    try:
        if adjustable:
            if call.model and call.model != requested:  # the policy fell back to a cheaper model
                call_kwargs["model"] = call.model
            # ask the provider for the full response, and give back what was asked for
            if not call_kwargs.get("return_full_response", False):
                reduce = provider.text_of
            if reduce is not None:
                call_kwargs["return_full_response"] = True
            usage_chunk = stream and provider.include_usage and "stream_options" not in call_kwargs
            if usage_chunk:
                call_kwargs["stream_options"] = {"include_usage": True}
    except Exception:
        _broken(f"preparing a {method} call")
    if call.wait_before:
        _pause(call, call.wait_before)
    ctx = _ctx(call)
    token = otel_context.attach(ctx)
    try:
        response = wrapped(*call_args, **call_kwargs)
        if stream and isinstance(response, Iterator):
            seen = _StreamUsage(provider.name, call.model or requested)
            chunks = (
                _text_chunks(response, seen, reduce[1], method)
                if reduce is not None
                else _watch_chunks(response, seen, usage_chunk)
            )
            follow = _Follow(
                chunks,
                ctx,
                lambda error, items, cut, closed: _end_llm_stream(call, seen, error, items, cut, closed),
            )
            return _ended_with_agent(follow)
        result = _text_of(instance, response, reduce[0], method) if reduce is not None else response
    except BaseException as error:
        _failed(call, error)
        raise
    finally:
        otel_context.detach(token)
    usage = _usage_of(response, provider.name, call.model or requested)
    refused = _report(call, usage, _get(response, "id"))
    if refused is not None:  # init(unpriced="fail"): the call fails, as a decorated step's does
        _failed(call, refused)
        raise refused
    _succeeded(call, result, _unknown_usage(call, usage))
    return result


@lru_cache(maxsize=16)
def _parameters(func: Callable[..., Any]) -> inspect.Signature:
    """The signature of the method ``func`` without its ``self``."""
    signature = inspect.signature(func)
    return signature.replace(parameters=tuple(signature.parameters.values())[1:])


def _by_name(wrapped: Wrapped, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of a call to the method ``wrapped``, all by name; None if they do not bind."""
    try:
        bound = _parameters(getattr(wrapped, "__func__", wrapped)).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL or kind is inspect.Parameter.POSITIONAL_ONLY:
            return None
        else:
            arguments[name] = value
    return arguments


def _unknown_usage(call: _StepCall, usage: TokenUsage | None) -> dict[str, Any] | None:
    """The mark of a call that ended with no token counts from its provider, nor from a span inside.

    Its tokens were spent all the same (a Replicate stream, which carries none;
    a stream closed before its usage chunk): its span says so, rather than a silent 0.
    """
    if usage is not None or call.child_usage_reported:
        return None
    return {attr.USAGE_UNKNOWN: True}


def _report(call: _StepCall, usage: TokenUsage | None, response_id: Any) -> BaseException | None:
    """Charge ``call`` its usage; the refusal of ``init(unpriced="fail")``, if any (charged all the same)."""
    if usage is None:
        return None
    call_id = response_id if isinstance(response_id, str) and response_id else None
    try:
        if call._charge_response_usage((call_id, usage, attr.OP_CHAT, None)):
            _mark_usage_below(call)
    except REFUSALS as refused:
        _mark_usage_below(call)
        return refused
    except Exception:
        _broken("charging an LLM call")
    return None


def _text_of(client: Any, response: Any, text: _TextOf, method: str) -> Any:
    """The text of a full response, as the provider takes it (and maps its failure)."""
    try:
        return text(response, method)
    except Exception as error:
        mapper = getattr(client.provider, "_map_exception_to_clientai_error", None)
        if mapper is None:
            raise
        raise mapper(error) from error


def _text_chunks(
    chunks: Iterator[Any], seen: _StreamUsage, chunk_text: _TextOf, method: str
) -> Iterator[Any]:
    """The text of each chunk, as the provider streams it; usage is read on the way."""
    try:
        for chunk in chunks:
            seen.observe(chunk)
            text = chunk_text(chunk, method)
            if text is not _SKIP:
                yield text
    finally:
        _close(chunks)


def _watch_chunks(chunks: Iterator[Any], seen: _StreamUsage, usage_chunk: bool) -> Iterator[Any]:
    """The chunks as they are; usage is read on the way.

    With ``usage_chunk``, the chunk that carries only the usage (no choices),
    which the caller did not ask for, is not handed out; other chunks without
    choices (Azure's content-filter results) are.
    """
    try:
        for chunk in chunks:
            seen.observe(chunk)
            if usage_chunk and not _get(chunk, "choices") and _get(chunk, "usage") is not None:
                continue
            yield chunk
    finally:
        _close(chunks)


def _close(chunks: Iterator[Any]) -> None:
    """Close the provider's stream now, as closing it directly would, rather than when it is collected."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def _end_llm_stream(
    call: _StepCall, seen: _StreamUsage, error: BaseException | None, items: int, cut: bool, closed: bool
) -> None:
    """End a streamed LLM call, charged what its chunks reported.

    The refusal of ``init(unpriced="fail")`` is raised at the end of a stream read
    to its end, as a decorated generator step's is; not out of ``close()``, nor
    in place of the stream's own error, nor at its agent's end: it is then on
    its span and in a warning.
    """
    # what arrived before a failure was paid for too; what arrived after a cut, charged late
    refused = _report(call, seen.usage, seen.response_id)
    if refused is not None:
        if error is None and not cut and not closed:
            if not call.finished:
                _failed(call, refused)
            raise refused
        _note_refusal(call, refused)
    # a cut stream's usage may still come: only one read to its end (or closed) is known to have none
    _end_stream(call, error, items, cut, None if cut else _unknown_usage(call, seen.usage))


def _note_refusal(call: _StepCall, refused: BaseException) -> None:
    """Put a refusal that is not raised on the span of ``call``, if still open, and in a warning."""
    try:
        if not call.finished:
            record_exception(call.span, refused)
    except Exception:
        _broken(f"ending step {call.name!r}")
    _logger.warning("multirun: LLM call %r of a stream that did not end on its own: %s", call.name, refused)


class _StreamUsage:
    """The usage a stream's chunks carry; a later chunk's totals replace an earlier one's."""

    __slots__ = ("model", "provider", "response_id", "usage")

    def __init__(self, provider: str | None, model: str | None) -> None:
        self.provider = provider
        self.model = model
        self.usage: TokenUsage | None = None
        self.response_id: Any = None

    def observe(self, chunk: Any) -> None:
        found = _usage_of(chunk, self.provider, self.model)
        if found is not None:
            self.usage = found
            self.response_id = _get(chunk, "id")


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` of a dict, ``obj.key`` of anything else (SDK objects); None if absent."""
    if isinstance(obj, dict):  # not the Mapping ABC: its check costs a microsecond per call
        return obj.get(key)
    return getattr(obj, key, None)


def _usage_of(response: Any, provider: str | None, requested: str | None) -> TokenUsage | None:
    """Model and tokens of a full response or chunk of any ClientAI provider, None if it has none.

    OpenAI and Groq (``usage``, or ``x_groq.usage`` on Groq's last chunk),
    Ollama (``prompt_eval_count``, ``eval_count``) and Replicate
    (``input_token_count``, ``output_token_count`` in ``metrics``), as objects or dicts.
    """
    try:
        usage = _get(response, "usage")
        if usage is None:
            usage = _get(_get(response, "x_groq"), "usage")
        if usage is not None:
            input_tokens = _get(usage, "prompt_tokens")
            output_tokens = _get(usage, "completion_tokens")
            cached = _get(_get(usage, "prompt_tokens_details"), "cached_tokens")
            reasoning = _get(_get(usage, "completion_tokens_details"), "reasoning_tokens")
        elif (metrics := _get(response, "metrics")) is not None:
            input_tokens = _get(metrics, "input_token_count")
            output_tokens = _get(metrics, "output_token_count")
            cached = reasoning = None
        else:
            input_tokens = _get(response, "prompt_eval_count")
            output_tokens = _get(response, "eval_count")
            cached = reasoning = None
        if input_tokens is None and output_tokens is None:
            return None
        model = _get(response, "model")
        return TokenUsage(
            model=model if isinstance(model, str) and model else requested,
            provider=provider,
            input_tokens=int(input_tokens or 0),
            output_tokens=int(output_tokens or 0),
            cache_read_tokens=int(cached or 0),
            reasoning_tokens=int(reasoning or 0),
        )
    except Exception:
        _broken("reading the usage of a response")
        return None
