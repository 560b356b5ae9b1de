"""What a ``peer_<name>.py`` module's ``setup`` returns to the worker."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _nothing() -> None:
    return None


@dataclass
class Peer:
    """A configured peer: its decorated functions by mode, and how to flush and stop it.

    ``calls`` maps ``sync``, ``async`` and ``gen`` (those the peer supports) to the
    worker's function of that mode, decorated by the peer. ``flush`` exports every
    finished span now (it is called outside the timed loop, and once inside the
    "with flush" timing). ``wrap(mode, batch)``, when given, returns the batch
    function run inside whatever the peer needs around the calls (multirun: a
    ``@run``); the batch's own timing still covers only its loop.
    """

    calls: dict[str, Callable[..., Any]]
    flush: Callable[[], Any]
    shutdown: Callable[[], Any] = _nothing
    wrap: Callable[[str, Any], Any] | None = None
    notes: list[str] = field(default_factory=list)


def bare_decorators(
    tracer: Any, work: Callable[..., Any], work_async: Callable[..., Any], work_gen: Callable[..., Any]
) -> dict[str, Callable[..., Any]]:
    """The minimal tracing decorator on each function: one ``start_as_current_span`` around the call."""

    def sync(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span("bare"):
                return fn(*args, **kwargs)

        return wrapper

    def asynchronous(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span("bare"):
                return await fn(*args, **kwargs)

        return wrapper

    def generator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span("bare"):
                yield from fn(*args, **kwargs)

        return wrapper

    return {"sync": sync(work), "async": asynchronous(work_async), "gen": generator(work_gen)}
