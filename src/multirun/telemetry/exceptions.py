"""The ``exception`` event of a failed span, with a stacktrace of bounded size.

The SDK's ``Span.record_exception`` formats the whole traceback. An error that unwinds
through many traced calls (a runaway recursion of a step, say) is recorded by each of
them, and its traceback is one level longer at each: formatting it in full every time
costs the square of the depth (12 s for a RecursionError through 500 steps). Here each
traceback in the error (its own, and those of the errors chained to it or grouped in it)
keeps its ``STACKTRACE_FRAMES`` frames nearest the raise, after a line that says how many
were left out: a span formats at most that many frames of each, and only follows the links
of the others. An error whose tracebacks are all shorter is recorded by the SDK as before.

``sys.tracebacklimit``, when the program sets it, is honoured as Python honours it when it
prints an error: each traceback keeps at most that many frames nearest the raise (none for 0
or less), and a value that is no int is ignored. (The traceback module, which the SDK's
``record_exception`` uses, keeps the frames farthest from the raise instead, and raises on a
value that is no int.)
"""

from __future__ import annotations

import itertools
import sys
import traceback
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from opentelemetry.trace import Span

from multirun.errors import _EXCEPTION_GROUPS, error_text

STACKTRACE_FRAMES = 100  # of each traceback in an exception event: those nearest the raise


def record_exception(
    span: Span,
    error: BaseException,
    attributes: dict[str, Any] | None = None,
    *,
    escaped: bool = False,
    event: dict[str, Any] | None = None,
) -> None:
    """``span.record_exception(error)``, unless one of the error's tracebacks is longer than
    ``STACKTRACE_FRAMES``; then the same event with those tracebacks cut. Also when the
    program's ``__str__`` fails, which the SDK's would raise: with a stand-in message.

    ``event``: the error's ``exception_event``, made before (where the program's code may run).
    """
    if event is None:
        if _tracebacklimit() is None and not _has_long_traceback(error):
            try:
                span.record_exception(error, attributes=attributes, escaped=escaped)
                return
            except Exception:
                pass  # str(error) failed
        event = exception_event(error, escaped=escaped)
    span.add_event("exception", {**event, **attributes} if attributes else event)


def exception_event(error: BaseException, *, escaped: bool = False) -> dict[str, Any]:
    """The attributes of the ``exception`` event ``record_exception`` records for ``error``.

    Made ahead by a caller that is to record it while holding a lock: the error's ``__str__``
    and its traceback's formatting are the program's code, which must not run under it.
    """
    limit = _tracebacklimit()
    cut = limit is not None or _has_long_traceback(error)
    return {  # the SDK's attributes (opentelemetry.sdk.trace.Span.record_exception)
        "exception.type": _exception_type(error),
        "exception.message": error_text(error),
        "exception.stacktrace": _cut_stacktrace(error, STACKTRACE_FRAMES if limit is None else limit)
        if cut
        else _full_stacktrace(error),
        "exception.escaped": str(escaped),
    }


def _tracebacklimit() -> int | None:
    """How many frames of each traceback ``sys.tracebacklimit`` keeps, at most
    ``STACKTRACE_FRAMES``; None if it is not set. One that is no int keeps the usual number
    (Python ignores it; the traceback module would raise on it)."""
    limit = getattr(sys, "tracebacklimit", None)
    if limit is None:
        return None
    if not isinstance(limit, int):
        return STACKTRACE_FRAMES
    return max(0, min(limit, STACKTRACE_FRAMES))


def _full_stacktrace(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def _cut_stacktrace(error: BaseException, keep: int) -> str:
    """``format_exception(error)`` with each traceback longer than ``keep`` frames cut."""
    # the exceptions of the chain and group with no frames (cheap), then each one's frames
    summary = traceback.TracebackException(type(error), error, error.__traceback__, limit=0, compact=True)
    for exception_summary, exception in _summaries(summary, error):
        exception_summary.stack = _stack(exception.__traceback__, keep)
    return "".join(summary.format())


class _LastFrames(traceback.StackSummary):
    """The frames of a traceback nearest the raise, formatted after a line that says how
    many frames before them were left out."""

    def __init__(self, frames: Iterable[traceback.FrameSummary], left_out: int) -> None:
        super().__init__(frames)
        self.left_out = left_out

    def format(self, *args: Any, **kwargs: Any) -> list[str]:
        plural = "s" if self.left_out > 1 else ""
        left_out = f"  [{self.left_out} frame{plural} left out: the {len(self)} nearest the raise follow]\n"
        return [left_out, *super().format(*args, **kwargs)]


def _stack(tb: TracebackType | None, keep: int) -> traceback.StackSummary:
    """The frames ``format_exception`` shows of ``tb``; if there are more than ``keep``, the
    last ones, without the column markers that Python 3.11 and later draws under their lines
    (finding the columns costs five times the rest)."""
    frames = _frames(tb)
    if frames <= keep:
        return traceback.extract_tb(tb, limit=frames)  # with the columns; limit: not sys.tracebacklimit
    left_out = frames - keep
    last = itertools.islice(traceback.walk_tb(tb), left_out, None)
    return _LastFrames(traceback.StackSummary.extract(last, limit=keep), left_out)


def _frames(tb: TracebackType | None, at_most: int | None = None) -> int:
    """The number of frames in ``tb``, or ``at_most`` if there are more. Follows the links
    only: no frame is read."""
    frames = 0
    while tb is not None and frames != at_most:
        frames += 1
        tb = tb.tb_next
    return frames


def _has_long_traceback(error: BaseException) -> bool:
    """Whether a traceback that ``format_exception(error)`` shows is longer than
    ``STACKTRACE_FRAMES`` (those of the chained and grouped exceptions included)."""
    seen: set[int] = set()
    queue = [error]
    while queue:
        exception = queue.pop()
        if id(exception) in seen:
            continue
        seen.add(id(exception))
        if _frames(exception.__traceback__, STACKTRACE_FRAMES + 1) > STACKTRACE_FRAMES:
            return True
        if exception.__cause__ is not None:
            queue.append(exception.__cause__)
        elif exception.__context__ is not None and not exception.__suppress_context__:
            queue.append(exception.__context__)
        if isinstance(exception, _EXCEPTION_GROUPS):
            queue.extend(exception.exceptions)  # type: ignore[attr-defined]
    return False


def _summaries(
    summary: traceback.TracebackException, error: BaseException
) -> Iterator[tuple[traceback.TracebackException, BaseException]]:
    """Each exception that ``summary`` holds (``error``, the ones chained to it and the ones
    in a group), with the summary of it."""
    queue = [(summary, error)]
    while queue:
        summary, error = queue.pop()
        yield summary, error
        if summary.__cause__ is not None and error.__cause__ is not None:
            queue.append((summary.__cause__, error.__cause__))
        if summary.__context__ is not None and error.__context__ is not None:
            queue.append((summary.__context__, error.__context__))
        if summary_of_group := getattr(summary, "exceptions", None):  # Python 3.11 and later
            queue.extend(zip(summary_of_group, error.exceptions, strict=True))  # type: ignore[attr-defined]


def _exception_type(error: BaseException) -> str:
    """``exception.type`` as the SDK writes it."""
    module = type(error).__module__
    qualname = type(error).__qualname__
    return f"{module}.{qualname}" if module and module != "builtins" else qualname
