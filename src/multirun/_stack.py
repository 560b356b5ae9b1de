"""Stack room for ending a call that ran out of it."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from multirun._process import reinit_after_fork

HEADROOM = 250  # frames: ending a span, exporting it, logging and a checkpoint, with room to spare


class Headroom:
    """While held (``with headroom:``), the recursion limit is ``HEADROOM`` frames higher.

    A RecursionError is raised where the stack is full, so the code that ends the call it
    unwinds through (the span's end, its export, the error's traceback) has no room of its
    own: it would raise a RecursionError of its own, leave the span open and replace the
    program's error. CPython lifts the limit a little while it raises a RecursionError for
    the same reason. The limit is the interpreter's: it is lifted while any thread holds the
    headroom, and put back when the last one lets go, unless the program changed it meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a signal handler may end a call of its own
        self._holders = 0
        self._limit = 0  # the limit before it was lifted
        self._lifted = 0  # the limit while lifted
        self._stuck = False  # the last holder could not put the limit back
        reinit_after_fork(self._at_fork_reinit)

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                limit = sys.getrecursionlimit()
                if not (self._stuck and limit == self._lifted):  # else it is still lifted: see __exit__
                    self._limit = limit
                self._stuck = False
                self._lifted = self._limit + HEADROOM
                sys.setrecursionlimit(self._lifted)
            self._holders += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and sys.getrecursionlimit() == self._lifted:
                try:
                    sys.setrecursionlimit(self._limit)
                except RecursionError:  # this thread is deeper than the old limit
                    self._stuck = True  # the next holder puts it back

    def _at_fork_reinit(self) -> None:
        """In a forked child only the thread that forked lives on: the other holders are gone."""
        self._lock = threading.RLock()
        if self._holders:
            self._holders = 0
            if sys.getrecursionlimit() == self._lifted:
                sys.setrecursionlimit(self._limit)


headroom = Headroom()
