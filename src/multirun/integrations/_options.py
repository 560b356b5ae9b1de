"""What every instrumentor of this package shares: check, validate and configure before it
patches, and report its own failures.

``opentelemetry-instrument`` skips each instrumentor's dependency check, so
``instrument()`` checks for its framework itself; ``budget`` and ``policy``
(for the runs an instrumentation starts) are validated the way ``@run``
validates them; a ``tracer_provider`` configures multirun unless the
application already did. Given again once instrumented, they apply from then on.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from operator import attrgetter
from typing import Any, TypeVar

import wrapt
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.instrumentation.utils import unwrap
from pydantic import BaseModel, ValidationError

from multirun.errors import ConfigurationError
from multirun.models.budget import Budget
from multirun.models.policy import Policy

_logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def framework_installed(instruments: Collection[str], framework: str) -> bool:
    """Whether the framework's package is installed in a version the instrumentor supports.

    Not installed is the common case under ``opentelemetry-instrument`` (a debug
    line); a version out of range is a warning.
    """
    conflict = get_dependency_conflicts(instruments)
    if conflict is None:
        return True
    log = _logger.debug if getattr(conflict, "found", None) is None else _logger.warning
    log("multirun: %s not instrumented: %s", framework, conflict)
    return False


def missing_framework(instruments: Collection[str], instrumentor: str, why: str, **kwargs: Any) -> bool:
    """Whether ``instrument(**kwargs)``, called by the program, finds its framework not installed.

    Then an error says ``why`` (what to install), in place of OpenTelemetry's, which names
    the framework's package but not this package's extra. A framework installed in a version
    out of range keeps OpenTelemetry's message (it names both versions);
    ``opentelemetry-instrument`` (``skip_dep_check`` or ``raise_exception_on_conflict``) is
    left to the loader, which skips an absent framework quietly.
    """
    if kwargs.get("skip_dep_check") or kwargs.get("raise_exception_on_conflict"):
        return False
    conflict = get_dependency_conflicts(instruments)
    if conflict is None or getattr(conflict, "found", None) is not None:
        return False
    _logger.error("multirun: %s instruments nothing: %s", instrumentor, why)
    return True


_OPTIONS = ("budget", "policy", "tracer_provider")
# what OpenTelemetry's BaseInstrumentor and its loaders pass any instrumentor: taken, unused here
_OTEL_OPTIONS = (
    "meter_provider",
    "logger_provider",
    "event_logger_provider",
    "skip_dep_check",
    "raise_exception_on_conflict",
)


def check_options(instrumentor: str, kwargs: Mapping[str, Any]) -> None:
    """TypeError naming an option of ``instrument(**kwargs)`` that no one reads (a misspelt
    ``budget`` left the runs without one, silently), and the valid ones.

    Not when a loader calls it (``opentelemetry-instrument`` passes ``skip_dep_check`` or
    ``raise_exception_on_conflict``): a distro's extra option must not fail the program.
    """
    if kwargs.get("skip_dep_check") or kwargs.get("raise_exception_on_conflict"):
        return
    unknown = [name for name in kwargs if name not in _OPTIONS and name not in _OTEL_OPTIONS]
    if unknown:
        raise TypeError(
            f"{instrumentor}().instrument() got an unknown option {unknown[0]!r}; "
            f"the options are {', '.join(_OPTIONS + _OTEL_OPTIONS)}"
        )


def patch_when_imported(
    settings: Any, module: str, on_import: Callable[[Any], None], patch: Callable[[], None]
) -> None:
    """Patch the framework now if ``module`` is imported, else when the program imports it
    (``on_import``, a post-import hook that patches while ``settings.active``). Not imported
    here: a program that never uses the framework (``opentelemetry-instrument`` instruments
    every program) does not pay for its import."""
    settings.active = True
    if module in sys.modules:
        patch()
    elif not settings.hook_registered:
        settings.hook_registered = True  # wrapt keeps hooks for good: register one, once
        wrapt.register_post_import_hook(on_import, module)


Patches = Sequence[tuple[str, str, str]]  # (module, attribute path, name of the wrapper)


def patch_all(
    logger: logging.Logger,
    framework: str,
    distribution: str,
    patches: Patches,
    wrappers: Mapping[str, Any],
    look_up: Callable[[], None] | None = None,
) -> list[tuple[str, str]]:
    """Wrap every ``(module, path)`` of ``patches`` with its wrapper, or none; the ones wrapped.

    A framework whose insides moved (a version that renamed a module, class or method the
    instrumentation patches or ``look_up`` reads) is left as it is, with one warning naming
    what is missing: the program runs untraced, never half patched, and is not failed for it.
    """
    done: list[tuple[str, str]] = []
    try:
        if look_up is not None:
            look_up()
        for module, path, _ in patches:  # all there before any is patched
            if not _has(importlib.import_module(module), path):
                raise AttributeError(f"{module} has no {path}")
        for module, path, wrapper in patches:
            wrapt.wrap_function_wrapper(module, path, wrappers[wrapper])
            done.append((module, path))
    except (ImportError, AttributeError) as exc:
        unpatch_all(done)
        named = _named(framework, distribution)
        _once(logger, framework, "%s not instrumented: %s; it runs untraced", named, exc)
    except Exception:
        unpatch_all(done)
        _once(logger, framework, "cannot instrument %s", _named(framework, distribution), exc_info=True)
    return done


def _once(logger: logging.Logger, framework: str, message: str, *args: Any, exc_info: bool = False) -> None:
    """A warning the first time the framework cannot be patched (instrumented again, a debug line)."""
    key = (framework, "patching")
    log = logger.debug if key in _warned else logger.warning
    _warned.add(key)
    log("multirun: " + message, *args, exc_info=exc_info)


def unpatch_all(patched: list[tuple[str, str]]) -> None:
    """Restore what :func:`patch_all` wrapped, and forget it."""
    for module_name, path in reversed(patched):
        module = sys.modules.get(module_name)
        if module is not None:
            owner, _, name = path.rpartition(".")
            unwrap(attrgetter(owner)(module) if owner else module, name)
    patched.clear()


def _has(owner: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(owner, name):
            return False
        owner = getattr(owner, name)
    return True


def _named(framework: str, distribution: str) -> str:
    """The framework with its installed version, as in "Motus (lithosai-motus 0.4.3)"."""
    try:
        return f"{framework} ({distribution} {version(distribution)})"
    except PackageNotFoundError:
        return framework


def reconfigures(instrumentor: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``instrument(**kwargs)`` gives options to an instrumentor instrumented already.

    ``opentelemetry-instrument`` instruments before the program runs, so the program's own
    ``instrument(budget=...)`` comes second: its options must apply (OpenTelemetry's
    ``instrument`` drops a second call with an "already instrumented" warning).
    """
    return bool(instrumentor.is_instrumented_by_opentelemetry) and any(
        kwargs.get(option) is not None for option in _OPTIONS
    )


def take_options(
    settings: Any, kwargs: Mapping[str, Any], instrumentor: str, framework: str, *, keep: bool = False
) -> None:
    """Validate the ``budget``, ``policy`` and ``tracer_provider`` given to ``instrument`` and keep
    the first two on ``settings``; with ``keep`` (a second call), an option not given keeps its value."""
    budget = model_option(instrumentor, "budget", kwargs.get("budget"), Budget)
    policy = model_option(instrumentor, "policy", kwargs.get("policy"), Policy)
    configure_tracer_provider(kwargs.get("tracer_provider"), framework)
    if budget is not None or not keep:
        settings.budget = budget
    if policy is not None or not keep:
        settings.policy = policy


def model_option(instrumentor: str, name: str, value: Any, model: type[M]) -> M | None:
    """``value`` of ``instrument(name=...)`` as a ``model`` (or a dict of its fields); None if unset."""
    if value is None or isinstance(value, model):
        return value
    where = f"{instrumentor}().instrument({name}=...)"
    if isinstance(value, dict):
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
    raise ConfigurationError(f"{where} must be a {model.__name__} or a dict, got {type(value).__name__}")


def configure_tracer_provider(tracer_provider: Any, framework: str) -> None:
    """``multirun.init(tracer_provider=...)`` unless multirun is configured already (then a warning)."""
    if tracer_provider is None:
        return
    from multirun.client import configured_client, init

    client = configured_client()
    if client is None:
        init(tracer_provider=tracer_provider)
    elif client.tracer_provider is not tracer_provider:
        _logger.warning(
            "multirun: %s spans go to the tracer provider multirun is configured with (by "
            "multirun.init() or a first traced call), not to the one given to "
            "instrument(tracer_provider=...); give that one to multirun.init(tracer_provider=...)",
            framework,
        )


_warned: set[tuple[str, str]] = set()


def instrumentation_failed(framework: str, where: str, what_goes_on: str) -> None:
    """Log that the instrumentation failed in ``where``: a warning once per place, then debug lines.

    Called from an ``except`` block (the traceback is logged); ``what_goes_on``
    says what the user's program does instead ("the task goes on untraced").
    """
    key = (framework, where)
    if key in _warned:
        _logger.debug("multirun: %s instrumentation failed in %s", framework, where, exc_info=True)
        return
    _warned.add(key)
    _logger.warning(
        "multirun: %s instrumentation failed in %s; %s", framework, where, what_goes_on, exc_info=True
    )
