"""Imports the OpenTelemetry modules that read an environment variable as they are imported,
and would fail the import (so ``import multirun``) on a bad value. The package imports this
module before any other.

- ``opentelemetry.sdk.trace`` reads ``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``, into a module
  constant it no longer uses. A value that is not a limit is hidden for the import: ``init``
  refuses it by name later, and a run without ``init`` logs it.
- ``opentelemetry.propagate`` loads the propagators ``OTEL_PROPAGATORS`` names, and raises
  on one it cannot load (misspelled, not installed). The import is made again with the
  names that load (none: the SDK's default, ``tracecontext,baggage``), and a warning names
  the variable and what was dropped.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from multirun._process import is_count

_logger = logging.getLogger("multirun")

_COUNT_LIMIT = "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"
_PROPAGATORS = "OTEL_PROPAGATORS"


@contextmanager
def _variable_as(name: str, value: str | None) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` (None: unset) for a while."""
    raw = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if raw is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = raw


def _import_sdk_trace() -> None:
    raw = os.environ.get(_COUNT_LIMIT)
    if "opentelemetry.sdk.trace" in sys.modules or raw is None or not raw.strip() or is_count(raw.strip()):
        importlib.import_module("opentelemetry.sdk.trace")
        return
    with _variable_as(_COUNT_LIMIT, None):
        importlib.import_module("opentelemetry.sdk.trace")


def _import_propagate() -> None:
    try:
        importlib.import_module("opentelemetry.propagate")
        return
    except Exception:  # an OTEL_PROPAGATORS name that does not load: anything else fails again below
        configured = os.environ.get(_PROPAGATORS)
        if not configured:
            raise
    names = [name.strip() for name in configured.split(",")]
    kept = [name for name in names if _loads(name)]
    dropped = [name for name in names if name not in kept]
    with _variable_as(_PROPAGATORS, ",".join(kept) or None):
        importlib.import_module("opentelemetry.propagate")
    _logger.warning(
        "multirun: %s=%s: cannot load the propagator(s) %s (misspelled, or not installed); "
        "propagating with %s",
        _PROPAGATORS,
        configured,
        ", ".join(map(repr, dropped)),
        ",".join(kept) or "tracecontext,baggage (the default)",
    )


def _loads(name: str) -> bool:
    """Whether OpenTelemetry can load the propagator ``name`` (``none`` is one)."""
    from opentelemetry.util._importlib_metadata import entry_points

    if name.lower() == "none":
        return True
    try:
        found = next(iter(entry_points(group="opentelemetry_propagator", name=name)))
        found.load()()
    except Exception:
        return False
    return True


_import_sdk_trace()
_import_propagate()
