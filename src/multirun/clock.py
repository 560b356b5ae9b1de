"""Clock: the monotonic time and sleeps that retries, budgets and policies use.

Tests replace it with a fake clock so that timing behaviour is checked
without waiting.
"""

from __future__ import annotations

import time

from multirun import _runtimes


class Clock:
    """Real time: ``time.monotonic``, ``time.sleep``, and ``asyncio.sleep`` (``trio.sleep`` in a
    trio task: anyio's trio backend)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def async_sleep(self, seconds: float) -> None:
        await _runtimes.sleep(seconds)
