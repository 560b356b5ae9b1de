"""ReplayLog: what a run's idempotent steps returned, and serving it again after a restore.

    log = ReplayLog()
    index, hit, value = log.call("search", digest, parent=None)   # before the step runs
    ...                                                           # run it unless hit
    log.complete(index, result)                                   # after it returned

An entry is keyed by (step name, input hash, occurrence): the third call of
``search("x")`` in a run is a different entry from the first, so a step that
returns something new each time (``next_page()``) is replayed call by call.

After a restore (``load``), calls are served from the log in the order they
were recorded. A call the log does not know, while recorded calls remain
unserved, means the code or its inputs changed since the checkpoint: that
raises DeterminismError instead of serving a value that belongs to another
call. Steps that ran side by side (threads, ``asyncio.gather``) may come back
in another order; steps that ran one after another may not. Once every
recorded call is served, the run goes on normally, and keeps recording.

Entries hold the step's result in memory until the run ends, so the log is
bounded (``limit`` entries); steps past the limit are not recorded and will
run again after a restore (at-least-once, as for a step that had not
finished when the checkpoint was taken).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from multirun.errors import DeterminismError

_logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 10_000
_NO_RESULT = object()


class ReplayEntry:
    """One recorded call. A plain slotted object: one is made for every step."""

    __slots__ = (
        "concurrent",
        "digest",
        "name",
        "occurrence",
        "parent",
        "result",
        "running_children",
        "served",
    )

    def __init__(
        self,
        name: str,
        digest: str,
        occurrence: int,
        parent: int | None,  # index of the recorded step it ran inside, if any
        result: Any = _NO_RESULT,  # set once the step returned
        concurrent: bool = False,  # ran while a sibling was running
        served: bool = True,  # replayed (or re-run) since the restore; True for new calls
    ) -> None:
        self.name = name
        self.digest = digest
        self.occurrence = occurrence
        self.parent = parent
        self.result = result
        self.concurrent = concurrent
        self.served = served
        self.running_children = 0

    @property
    def has_result(self) -> bool:
        return self.result is not _NO_RESULT


class ReplayLog:
    """The recorded steps of one run (thread-safe)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.entries: list[ReplayEntry] = []
        self._by_key: dict[tuple[str, str, int], int] = {}
        self._occurrences: dict[tuple[str, str], int] = {}
        self._top_running = 0
        self._next_unserved = 0  # the first recorded entry not yet served (replay only)
        self._replaying = False
        self._full_warned = False
        self._lock = threading.Lock()

    @property
    def replaying(self) -> bool:
        """True from ``load`` until every recorded call has been served."""
        return self._replaying

    # -- recording and replaying ------------------------------------------------

    def call(self, name: str, digest: str, parent: int | None) -> tuple[int | None, bool, Any]:
        """Before a step runs: ``(index, True, value)`` to serve it from the log, else
        ``(index, False, None)`` (index None when it is not recorded: the log is full).

        Raises DeterminismError when replaying and the call does not match the recording.
        """
        with self._lock:
            key = (name, digest)
            occurrence = self._occurrences.get(key, 0) + 1
            self._occurrences[key] = occurrence
            if self._replaying:
                served = self._serve(name, digest, occurrence)
                if served is not None:
                    return served
            entries = self.entries
            if len(entries) >= self.limit:
                if not self._full_warned:
                    self._full_warned = True
                    _logger.warning(
                        "multirun: the replay log is full (%d steps): later steps of this run "
                        "will run again after a restore",
                        self.limit,
                    )
                return None, False, None
            entry = ReplayEntry(name, digest, occurrence, parent)
            entries.append(entry)
            self._start(entry)
            return len(entries) - 1, False, None

    def _serve(self, name: str, digest: str, occurrence: int) -> tuple[int | None, bool, Any] | None:
        """During a replay: serve the recorded call, re-run an unfinished one, or None for a new call."""
        index = self._by_key.get((name, digest, occurrence))
        self._check_order(name, index)
        if index is None:
            return None
        entry = self.entries[index]
        if entry.served:
            return None  # served already (inside a replayed parent): this is a new execution
        entry.served = True
        self._advance()
        if entry.has_result:
            self._serve_descendants(index)
            return index, True, entry.result
        self._start(entry)  # recorded but never finished: run it again
        return index, False, None

    def complete(self, index: int | None, result: Any) -> None:
        """The step returned ``result``."""
        if index is None:
            return
        with self._lock:
            entry = self.entries[index]
            entry.result = result
            self._finish(entry)

    def fail(self, index: int | None) -> None:
        """The step failed: it has no result to replay."""
        if index is None:
            return
        with self._lock:
            entry = self.entries[index]
            entry.result = _NO_RESULT
            self._finish(entry)

    def peek(self, name: str, digest: str) -> tuple[bool, Any]:
        """``(True, result)`` if the next call of ``name`` with these inputs would be served."""
        with self._lock:
            occurrence = self._occurrences.get((name, digest), 0) + 1
            index = self._by_key.get((name, digest, occurrence))
            if index is None or not self.entries[index].has_result or self.entries[index].served:
                return False, None
            return True, self.entries[index].result

    # -- checkpoints -------------------------------------------------------------

    def to_records(self) -> list[dict[str, Any]]:
        """The entries as plain records for a checkpoint (results as they are)."""
        with self._lock:
            records = []
            for entry in self.entries:
                record: dict[str, Any] = {
                    "name": entry.name,
                    "digest": entry.digest,
                    "occurrence": entry.occurrence,
                    "parent": entry.parent,
                    "concurrent": entry.concurrent,
                }
                if entry.has_result:
                    record["result"] = entry.result
                records.append(record)
            return records

    def load(self, records: list[dict[str, Any]]) -> None:
        """Replace the log with a checkpoint's records and start replaying them."""
        with self._lock:
            self.entries = []
            self._by_key = {}
            self._occurrences = {}
            for record in records:
                entry = ReplayEntry(
                    name=str(record["name"]),
                    digest=str(record["digest"]),
                    occurrence=int(record["occurrence"]),
                    parent=None if record.get("parent") is None else int(record["parent"]),
                    result=record.get("result", _NO_RESULT),
                    concurrent=bool(record.get("concurrent", False)),
                    served=False,
                )
                self._by_key[(entry.name, entry.digest, entry.occurrence)] = len(self.entries)
                self.entries.append(entry)
            self._next_unserved = 0
            self._replaying = bool(self.entries)

    # -- internals (called with the lock held) -------------------------------------

    def _check_order(self, name: str, index: int | None) -> None:
        expected_index = self._next_unserved
        if expected_index >= len(self.entries):
            self._replaying = False
            return
        expected = self.entries[expected_index]
        if index is None:
            raise DeterminismError(
                f"replay: step {name!r} was not recorded at this point; the recorded run called "
                f"{expected.name!r} here (recorded call #{expected_index + 1}). The code or the inputs "
                "of a step changed since the checkpoint. Restore from an earlier checkpoint, start a "
                "new run, or mark steps whose inputs legitimately change idempotent=False."
            )
        entry = self.entries[index]
        if index == expected_index or entry.served:
            return
        side_by_side = entry.concurrent or expected.concurrent
        if not (side_by_side and entry.parent == expected.parent):
            raise DeterminismError(
                f"replay: step {name!r} came before {expected.name!r}, but the recorded run called "
                f"them the other way round (recorded calls #{expected_index + 1} and #{index + 1}). "
                "Steps that ran one after another must be replayed in the same order."
            )

    def _advance(self) -> None:
        entries = self.entries
        position = self._next_unserved
        while position < len(entries) and entries[position].served:
            position += 1
        self._next_unserved = position
        if position >= len(entries):
            self._replaying = False

    def _serve_descendants(self, index: int) -> None:
        """A step served from the log did not run: the steps it ran inside are served too."""
        parents = {index}
        for position in range(index + 1, len(self.entries)):
            entry = self.entries[position]
            if entry.parent in parents:
                entry.served = True
                parents.add(position)
        self._advance()

    def _start(self, entry: ReplayEntry) -> None:
        if entry.parent is None:
            running = self._top_running
            self._top_running += 1
        else:
            parent = self.entries[entry.parent]
            running = parent.running_children
            parent.running_children += 1
        if running:
            entry.concurrent = True
            self._mark_running_siblings(entry)

    def _mark_running_siblings(self, entry: ReplayEntry) -> None:
        for other in reversed(self.entries[-256:]):  # siblings still running started recently
            if other is not entry and other.parent == entry.parent and not other.has_result:
                other.concurrent = True

    def _finish(self, entry: ReplayEntry) -> None:
        if entry.parent is None:
            self._top_running = max(self._top_running - 1, 0)
        else:
            parent = self.entries[entry.parent]
            parent.running_children = max(parent.running_children - 1, 0)
