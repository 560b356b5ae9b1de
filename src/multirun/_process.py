"""Process-level helpers: settings from the environment, and re-arming after ``fork``."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path

from multirun.errors import ConfigurationError

_logger = logging.getLogger(__name__)


def refuse_or_warn(problem: str, *, refuse: bool, instead: str = "its default is used") -> None:
    """A setting that cannot work: a ConfigurationError saying ``problem``, or, with
    ``refuse=False``, a warning saying it and what happens ``instead``.

    ``init`` refuses; the defaults a first run sets up without ``init`` warn, and the caller
    goes on without the setting: telemetry must not fail the program.
    """
    if refuse:
        raise ConfigurationError(problem)
    _logger.warning("multirun: %s; %s", problem, instead)


def absolute_folder(directory: str | os.PathLike[str], what: str) -> Path:
    """``directory`` made absolute now, so that a later ``os.chdir`` does not move ``what`` (the
    span files, say). As given, with a warning, when the working directory was deleted: it has
    no name to join it to, and telemetry must not fail the program."""
    folder = Path(directory)
    try:
        return folder.absolute()
    except OSError as exc:  # os.getcwd(): FileNotFoundError
        _logger.warning(
            "multirun: the working directory was deleted (%s): %s go to %s under the working "
            "directory of each write",
            exc,
            what,
            folder,
        )
        return folder


def env_int(name: str, default: int, *, minimum: int, refuse: bool = True) -> int:
    """The int >= ``minimum`` in environment variable ``name``, ``default`` when it is unset or
    empty; any other value is refused, or warned about and ``default`` (``refuse_or_warn``)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        refuse_or_warn(f"{name} must be an int >= {minimum}, got {raw!r}", refuse=refuse)
        return default
    return value


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
