"""Process-level helpers: integer settings from the environment, and re-arming after ``fork``."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

from multirun.errors import ConfigurationError


def env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name``, ``default`` when unset; ConfigurationError if not one."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None


def is_count(text: str) -> bool:
    """Whether ``text`` is an int >= 0 as ``int()`` reads it (as the OpenTelemetry SDK does)."""
    try:
        return int(text) >= 0
    except ValueError:
        return False


def reinit_after_fork(method: Callable[[], None]) -> None:
    """Call the bound ``method`` in a forked child, for as long as its object lives.

    The object is held weakly, so registering does not keep it alive (fork
    hooks can never be unregistered).
    """
    if not hasattr(os, "register_at_fork"):
        return
    reinit = weakref.WeakMethod(method)

    def after_in_child() -> None:
        bound = reinit()
        if bound is not None:
            bound()

    os.register_at_fork(after_in_child=after_in_child)
