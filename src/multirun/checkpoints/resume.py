"""Resuming a run that failed or was killed, from its last checkpoint.

    with multirun.resume(run_id="4f0c..."):        # or checkpoint_id=...
        research_crew("the same arguments")        # the next @run continues it

or, with no change to the program, from the command line::

    multirun resume 4f0c... -- python my_agent.py

The resumed run is a new run (new id, new trace) that links to the one it
continues (a span link, ``multirun.run.resumed_from``). It starts with the
checkpoint's state, counts the spend the original run had made (a resumed
run never gets its budget back), and serves the idempotent steps that had
completed from the checkpoint's replay log instead of running them again. A
step that was running when the process died runs again: steps are
at-least-once, their charges exactly-once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context

from multirun.errors import ConfigurationError

if TYPE_CHECKING:
    from multirun.checkpoints.store import CheckpointStore, RestoredCheckpoint
    from multirun.client import MultiRunClient

RESUME_ENV = "MULTIRUN_RESUME"
_PENDING_KEY = otel_context.create_key("multirun-resume")


class _Pending:
    """A resume waiting for the next @run; used once."""

    def __init__(self, restored: RestoredCheckpoint) -> None:
        self.restored: RestoredCheckpoint | None = restored
        self._lock = threading.Lock()

    def take(self) -> RestoredCheckpoint | None:
        with self._lock:
            restored, self.restored = self.restored, None
            return restored


_from_environment: _Pending | None = None
_environment_read = False
_environment_lock = threading.Lock()


def load_for_resume(store: CheckpointStore, identifier: str) -> RestoredCheckpoint:
    """The checkpoint ``identifier`` names: a checkpoint id, or a run id (its newest checkpoint)."""
    from multirun.errors import CheckpointError

    try:
        return store.load(identifier)
    except CheckpointError as by_checkpoint:
        try:
            latest = store.latest(identifier)
        except CheckpointError:
            raise by_checkpoint from None
        return store.load(latest)


@contextmanager
def resume(
    run_id: str | None = None, *, checkpoint_id: str | None = None, client: MultiRunClient | None = None
) -> Iterator[RestoredCheckpoint]:
    """Make the next ``@run`` started inside continue from a checkpoint (see the module doc)."""
    from multirun.client import get_client

    if (run_id is None) == (checkpoint_id is None):
        raise ConfigurationError("resume: pass exactly one of run_id=... or checkpoint_id=...")
    for name, value in (("run_id", run_id), ("checkpoint_id", checkpoint_id)):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"resume: {name} must be a string, got {value!r}")
    store = (client or get_client()).checkpoints
    restored = load_for_resume(store, checkpoint_id or run_id or "")
    token = otel_context.attach(otel_context.set_value(_PENDING_KEY, _Pending(restored)))
    try:
        yield restored
    finally:
        otel_context.detach(token)


def take_pending_resume(client: MultiRunClient) -> RestoredCheckpoint | None:
    """For ``@run``: the checkpoint to continue from, if a resume is pending (used once)."""
    pending = otel_context.get_current().get(_PENDING_KEY)
    if isinstance(pending, _Pending):
        return pending.take()
    if not os.environ.get(RESUME_ENV):
        return None
    return _take_from_environment(client)


def _take_from_environment(client: MultiRunClient) -> RestoredCheckpoint | None:
    """``MULTIRUN_RESUME=<run or checkpoint id>``: the first @run of the process resumes it."""
    global _from_environment, _environment_read
    with _environment_lock:
        if not _environment_read:
            _environment_read = True
            identifier = os.environ.get(RESUME_ENV, "")
            if identifier:
                _from_environment = _Pending(load_for_resume(client.checkpoints, identifier))
    return _from_environment.take() if _from_environment is not None else None
