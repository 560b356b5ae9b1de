"""The async library running a call: asyncio (uvloop, anyio's asyncio backend), or trio.

multirun waits in async code (a rate-limit slot, a retry's backoff), tells concurrent tasks
apart (replay lanes) and tells a cancellation from a failure with the library that runs the
call, so steps behave the same under anyio's trio backend as under asyncio. Trio is found
without importing it (nor sniffio): a program running trio has imported it. Asyncio is asked
first, so its path costs what it did.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio import _get_running_loop


def trio_task() -> object | None:
    """The trio task running this code; None outside one (trio not imported, or no trio run
    in this thread)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_task()  # type: ignore[no-any-return]
    except (RuntimeError, AttributeError):  # no trio run here; a trio still being imported
        return None


def in_async_code() -> bool:
    """Whether an event loop (asyncio's or trio's) runs in this thread: a sleep would block it."""
    return _get_running_loop() is not None or trio_task() is not None


async def sleep(seconds: float) -> None:
    """``asyncio.sleep``, or ``trio.sleep`` in a trio task; RuntimeError saying so under any other."""
    if _get_running_loop() is None:
        if trio_task() is not None:
            await sys.modules["trio"].sleep(seconds)
            return
        raise RuntimeError(
            f"multirun: cannot wait {seconds:g} s (a rate limit, or a retry's backoff) in this async "
            "code: it runs under neither asyncio nor trio (anyio runs on either)"
        )
    await asyncio.sleep(seconds)


def is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` cancels the task it ends (asyncio's or trio's), rather than failing it."""
    if isinstance(error, asyncio.CancelledError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(error, getattr(trio, "Cancelled", ()))
