"""ReplayLog: what a run's idempotent steps returned, and serving it again after a restore.

    log = ReplayLog()
    call = log.begin("search", digest, parent=None)    # before the step runs
    if isinstance(call, Served): return call.value     # served from the log after a restore
    ...                                                # run the step
    log.record(call, result)                           # after it returned

A call is keyed by (step name, input hash, occurrence): the third call of
``search("x")`` in a run is a different entry from the first, so a step that
returns something new each time (``next_page()``) is replayed call by call.
Each call also gets a sequence number when it starts and when it ends, so a
restore knows which steps ran inside which (``parent``) and which ran side by
side (overlapping siblings).

A call that raised is kept too, without a result. After a restore it runs
again, unless the program called the step again with the same inputs right
after it failed (a retry loop) and that call returned: then the failed call is
answered with that result, and the retry is not made. A failed call that runs
again and now returns takes the program down another path than the recorded
one, so nothing after it is served: the rest of the run runs afresh.

A call that runs again after a restore (it was running at the checkpoint, or
it failed) keeps its recorded sequence number, and its new record replaces the
old one in the next checkpoint, so a resumed run that dies can be resumed again.

After a restore (``load``), calls are served from the log in the order they
were recorded. A call the log does not know, while recorded calls remain
unserved, means the code or its inputs changed since the checkpoint: that
raises DeterminismError instead of serving a value that belongs to another
call. Steps that ran side by side (threads, ``asyncio.gather``) may come back
in another order; steps that ran one after another may not. A step served
from the log also serves the steps it ran inside. Once every recorded call is
served, the run goes on normally, and keeps recording.

Recording is on the hot path of every step, so it is two small operations: a
counter and an occurrence number when a step starts, one tuple appended when
it returns. The log keeps at most ``limit`` results in memory; steps past
the limit are not recorded and run again after a restore (at-least-once, as
for a step that had not finished when the checkpoint was taken). What it
counts is bounded too: once the log is full, or ``limit`` different inputs
of the steps were seen, a call with new inputs is not recorded, so a long
run whose steps all get different arguments keeps flat memory.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Final

from multirun.errors import DeterminismError

_logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 10_000


# A call as the log saw it start: (name, digest, occurrence, parent seq, seq). A plain tuple:
# one is made for every step, and a tuple costs a tenth of a NamedTuple or a slotted object.
Call = tuple[str, str, int, "int | None", int]
SEQ: Final = 4  # the position of a call's sequence number


class Served:
    """``begin``'s answer when a restored run's step is served from the log instead of run."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class ReplayLog:
    """The recorded steps of one run (thread-safe)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._recorded: list[tuple[Call, int, Any]] = []  # (call, end seq, result or FAILED), as they ended
        self._running: dict[int, Call] = {}  # calls started and not returned, by sequence number
        self._occurrences: dict[str, dict[str, itertools.count[int]]] = {}  # name -> digest -> count
        self._distinct = 0  # digests in _occurrences
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._full_warned = False
        self._replay: _Replay | None = None
        self._reruns: set[int] = set()  # sequence numbers of restored failed calls running again

    @property
    def replaying(self) -> bool:
        """True from ``load`` until every recorded call has been served."""
        return self._replay is not None and not self._replay.done

    def begin(self, name: str, digest: str, parent: int | None) -> Call | Served | None:
        """Before a step runs: its call, ``Served(value)`` to serve instead of running it, or
        None when the log records no more calls (it is full).

        Raises DeterminismError when a replay does not match the recording.
        """
        replay = self._replay
        if replay is None or replay.done:
            # recording only: no lock, each operation below is atomic (next() on a count);
            # no tuple but the call itself is made, as every allocation here is paid per step
            if len(self._recorded) >= self.limit:
                self._warn_full()
                return None
            by_digest = self._occurrences.get(name)
            counter = None if by_digest is None else by_digest.get(digest)
            if counter is None:
                with self._lock:
                    counter = self._counter(name, digest, bounded=True)
                if counter is None:
                    return None
            call = (name, digest, next(counter), parent, next(self._seq))
            self._running[call[SEQ]] = call
            return call
        with self._lock:
            counter = self._counter(name, digest, bounded=False)  # a replay must see every call
            assert counter is not None
            occurrence = next(counter)
            found = None if replay.done else replay.serve(name, digest, occurrence)
            if found is None:
                call = (name, digest, occurrence, parent, next(self._seq))
            elif found.has_result:
                return Served(found.result)
            else:
                # it runs again, under its recorded sequence number: the steps it had finished
                # keep it as their parent, and its new record replaces the recorded one
                call = (name, digest, occurrence, parent, found.seq)
                if found.failed:
                    self._reruns.add(found.seq)
            self._running[call[SEQ]] = call
        return call

    def _counter(self, name: str, digest: str, *, bounded: bool) -> itertools.count[int] | None:
        """The occurrence counter of these inputs, made if new (under the lock); None when
        ``bounded`` and ``limit`` different inputs were seen already."""
        by_digest = self._occurrences.get(name)
        counter = None if by_digest is None else by_digest.get(digest)
        if counter is None:
            if bounded and self._distinct >= self.limit:
                self._warn_full()
                return None
            self._distinct += 1
            counter = itertools.count(1)
            self._occurrences.setdefault(name, {})[digest] = counter
        return counter

    def _warn_full(self) -> None:
        if not self._full_warned:
            self._full_warned = True
            _logger.warning(
                "multirun: the replay log is full (%d steps): later steps of this run "
                "will run again after a restore",
                self.limit,
            )

    def record(self, call: Call, result: Any) -> None:
        """The step of ``call`` returned ``result``."""
        seq = call[SEQ]
        self._running.pop(seq, None)
        if self._reruns and seq in self._reruns:
            self._rerun_returned(seq)
        recorded = self._recorded
        if len(recorded) >= self.limit:
            self._warn_full()
            return
        recorded.append((call, next(self._seq), result))  # one atomic append

    def fail(self, call: Call) -> None:
        """The step of ``call`` raised (or was refused before it ran)."""
        seq = call[SEQ]
        self._running.pop(seq, None)
        if self._reruns and seq in self._reruns:
            self._reruns.discard(seq)
            return  # it failed again: its recorded failure stands
        if len(self._recorded) < self.limit:
            self._recorded.append((call, next(self._seq), FAILED))

    def _rerun_returned(self, seq: int) -> None:
        """A call that failed when recorded returned this time: stop serving the recording."""
        with self._lock:
            self._reruns.discard(seq)
            replay = self._replay
            if replay is None or replay.done:
                return
            replay.stop()
        _logger.info(
            "multirun: a step that failed in the restored run returned this time; "
            "the steps after it run again instead of being served from the checkpoint"
        )

    def peek(self, name: str, digest: str) -> tuple[bool, Any]:
        """``(True, result)`` if the next call of ``name`` with these inputs would be served."""
        with self._lock:
            replay = self._replay
            if replay is None or replay.done:
                return False, None
            counter = self._occurrences.get(name, {}).get(digest)
            occurrence = 1 if counter is None else _peek_next(counter)
            entry = replay.find(name, digest, occurrence)
            if entry is None or entry.served:
                return False, None
            if entry.answer is not None:
                return True, entry.answer.result
            return (True, entry.result) if entry.has_result else (False, None)

    # -- checkpoints -------------------------------------------------------------

    def to_records(self) -> list[dict[str, Any]]:
        """Every recorded call (restored ones first) as plain records for a checkpoint."""
        with self._lock:
            finished = sorted(self._recorded, key=lambda r: r[0][SEQ])
            running = sorted(self._running.values(), key=lambda c: c[SEQ])
            rerun = {call[SEQ] for call, _, _ in finished}.union(self._running)
            restored = self._replay.kept_records(rerun) if self._replay is not None else []
        records = [
            _record(call, end) | _FAILED_RECORD if result is FAILED else _record(call, end, result)
            for call, end, result in finished
        ]
        # a step still running (the one that took the checkpoint, say) is recorded without a
        # result: after a restore it runs again, and the steps it had finished are served
        records += [_record(call, None) for call in running]
        return [*restored, *records]

    def load(self, records: list[dict[str, Any]]) -> None:
        """Replace the log with a checkpoint's records and start replaying them."""
        replay = _Replay([dict(record) for record in records])
        with self._lock:
            self._recorded = []
            self._occurrences = {}
            self._distinct = 0
            self._replay = replay
            self._reruns = set()
            self._seq = itertools.count(replay.next_seq)


def _peek_next(counter: itertools.count[int]) -> int:
    """The number ``next(counter)`` would give, without taking it."""
    state: tuple[Any, tuple[int]] = counter.__reduce__()  # type: ignore[assignment]
    return state[1][0]


_NO_RESULT: Any = object()
FAILED: Any = object()  # the "result" of a call that raised
_FAILED_RECORD = {"failed": True}


def _record(call: Call, end: int | None, result: Any = _NO_RESULT) -> dict[str, Any]:
    name, digest, occurrence, parent, seq = call
    record = {"name": name, "digest": digest, "occurrence": occurrence, "parent": parent, "seq": seq}
    record["end"] = end
    if result is not _NO_RESULT:
        record["result"] = result
    return record


class _Entry:
    __slots__ = (
        "answer",
        "concurrent",
        "digest",
        "end",
        "failed",
        "has_result",
        "index",
        "name",
        "parent",
        "record",
        "result",
        "seq",
        "served",
    )

    def __init__(self, index: int, record: dict[str, Any]) -> None:
        self.index = index
        self.record = record
        self.name = str(record["name"])
        self.digest = str(record["digest"])
        self.seq = int(record["seq"])
        unfinished = record.get("end") is None
        self.end = _STILL_RUNNING if unfinished else int(record["end"])
        self.parent = None if record.get("parent") is None else int(record["parent"])
        # no result: it was running at the checkpoint, or its result had no form in the serializer
        self.failed = record.get("failed") is True
        self.has_result = "result" in record and not self.failed
        self.result = record.get("result")
        self.answer: _Entry | None = None  # a failed call's retry that returned
        self.concurrent = False
        self.served = False


_STILL_RUNNING = 2**62


class _Replay:
    """A checkpoint's calls, served in their recorded order."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        ordered = sorted(records, key=lambda r: int(r["seq"]))
        self.entries = [_Entry(i, r) for i, r in enumerate(ordered)]
        self.by_key = {
            (str(r["name"]), str(r["digest"]), int(r["occurrence"])): e
            for r, e in zip(ordered, self.entries, strict=True)
        }
        self.children: dict[int, list[_Entry]] = {}
        for entry in self.entries:
            if entry.parent is not None:
                self.children.setdefault(entry.parent, []).append(entry)
        self._mark_side_by_side()
        self._link_retries()
        self.next_seq = 1 + max(
            (max(e.seq, e.end if e.end != _STILL_RUNNING else e.seq) for e in self.entries), default=-1
        )
        self.position = 0  # the first entry, in recorded order, not served yet
        self.done = not self.entries
        self.stopped = False

    def find(self, name: str, digest: str, occurrence: int) -> _Entry | None:
        return self.by_key.get((name, digest, occurrence))

    def serve(self, name: str, digest: str, occurrence: int) -> _Entry | None:
        """The entry that answers this call: one with a result to serve, one without to run
        again, or None for a new call (the recorded one was served already)."""
        entry = self.by_key.get((name, digest, occurrence))
        expected = self.entries[self.position]
        if entry is None:
            raise DeterminismError(
                f"replay: {self._mismatch(name, digest, occurrence, expected)}. The code or the inputs "
                "of a step changed since the checkpoint. Restore from an earlier checkpoint, start a "
                "new run, or mark steps whose inputs legitimately change idempotent=False."
            )
        if entry.served:
            return None  # served already, inside a replayed parent: this is a new execution
        if entry is not expected and not (
            entry.parent == expected.parent and (entry.concurrent or expected.concurrent)
        ):
            raise DeterminismError(
                f"replay: step {name!r} came before {expected.name!r}, but the recorded run called "
                f"them the other way round (recorded calls #{expected.index + 1} and #{entry.index + 1}). "
                "Steps that ran one after another must be replayed in the same order."
            )
        if entry.answer is not None:
            # it failed, and was called again right away with the same inputs: the retry's result
            # answers it, and the retries (the failed ones and the one that returned) are not made
            answer = entry.answer
            chain = [e for e in self.entries[entry.index : answer.index + 1] if e.parent == entry.parent]
            self._serve(*chain)
            return answer
        if not entry.has_result:
            # still running at the checkpoint, or failed: it runs again, and the steps it had
            # finished are served as it calls them
            entry.served = True
            self._advance()
            return entry
        self._serve(entry)
        return entry

    def _mismatch(self, name: str, digest: str, occurrence: int, expected: _Entry) -> str:
        """How a call the recording does not have differs from the recorded call due here."""
        recorded = f"recorded call #{expected.index + 1}"
        if occurrence > 1 and self.find(name, digest, 1) is not None:
            return (
                f"step {name!r} was called with the same inputs more often than recorded (call "
                f"{occurrence} with them); the recorded run called {expected.name!r} here ({recorded})"
            )
        if expected.name == name:
            return (
                f"step {name!r} was called with different inputs than the recorded run's call of "
                f"{name!r} at this point ({recorded})"
            )
        return f"step {name!r} was called where the recorded run called {expected.name!r} ({recorded})"

    def _serve(self, *entries: _Entry) -> None:
        """Mark ``entries`` and every step they ran inside as served, and move on."""
        stack = list(entries)
        while stack:
            current = stack.pop()
            current.served = True
            stack.extend(self.children.get(current.seq, ()))
        self._advance()

    def _advance(self) -> None:
        entries = self.entries
        while self.position < len(entries) and entries[self.position].served:
            self.position += 1
        if self.position >= len(entries):
            self.done = True

    def stop(self) -> None:
        """Serve nothing more: the program left the recorded path."""
        self.done = self.stopped = True

    def kept_records(self, rerun: set[int]) -> list[dict[str, Any]]:
        """The records a later checkpoint keeps: all but those of calls that ran again (their
        new records replace them) and, once stopped, those never served."""
        return [
            entry.record
            for entry in self.entries
            if entry.seq not in rerun and (entry.served or not self.stopped)
        ]

    def _link_retries(self) -> None:
        """Answer each failed call whose next sibling calls, with the same name and inputs,
        failed too until one returned: a retry loop around the step."""
        siblings: dict[int | None, list[_Entry]] = {}
        for entry in self.entries:
            siblings.setdefault(entry.parent, []).append(entry)
        for group in siblings.values():
            pending: list[_Entry] = []  # consecutive failed calls of one step with one input
            for entry in group:
                if pending and (entry.name, entry.digest) != (pending[0].name, pending[0].digest):
                    pending = []
                if entry.failed:
                    pending.append(entry)
                elif pending:
                    if entry.has_result:
                        for failed in pending:
                            failed.answer = entry
                    pending = []

    def _mark_side_by_side(self) -> None:
        """Siblings whose [start, end] overlap ran side by side (threads, gather)."""
        siblings: dict[int | None, list[_Entry]] = {}
        for entry in self.entries:
            siblings.setdefault(entry.parent, []).append(entry)
        for group in siblings.values():
            latest_end = -1
            previous: _Entry | None = None
            for entry in group:  # ordered by start
                if previous is not None and entry.seq < latest_end:
                    entry.concurrent = True
                    previous.concurrent = True
                if entry.end > latest_end:
                    latest_end, previous = entry.end, entry
