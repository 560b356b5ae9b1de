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
side (siblings that overlapped, or ran in different asyncio or trio tasks, or threads:
each call notes its "lane").

A call that raised is kept too, without a result. After a restore it runs
again, unless the program called the step again with the same inputs right
after it failed, in the same task (asyncio or trio) or thread (a retry loop), and that
call returned: then the failed call is
answered with that result, and the retry is not made. A failed call that runs
again and now returns takes the program down another path than the recorded
one, so nothing after it is served: the rest of the run runs afresh. So does
a call of the step that failed, made where it failed but with other inputs
(the cause of the failure was fixed before the resume): the failed call has
no result that could be served in its place.

A run started inside another run (a sub-run) records its steps in its parent's
log, under a call of its own (``begin_run``): that call is never served, so the
sub-run always runs again after a restore, with the state and spend it had at
the checkpoint, and its completed steps are served as it calls them.

A generator step (streamed output) is recorded once its stream was consumed to
the end, its result being what it yielded, and what it returned (``stream_record``);
after a restore the items are yielded again without running it. A stream its
consumer stopped early, or drove with ``send``/``throw``, has nothing the log
could serve (``abandon``): like a step that was running, it runs again.

A call that runs again after a restore (it was running at the checkpoint, it
failed, or it ended without a result to serve) keeps its recorded sequence
number, and its new record replaces the old one in the next checkpoint, so a
resumed run that dies can be resumed again.

After a restore (``load``), calls are served from the log in the order they
were recorded. A first call the log does not know means the program goes on
from its restored state (it read where it was, and carried on) rather than
calling its recorded steps again: nothing is served, with a warning. A call
the log does not know once the replay has begun, while recorded calls remain
unserved, means the code or its inputs changed since the checkpoint: that
raises DeterminismError instead of serving a value that belongs to another
call. Steps that ran side by side (threads, ``asyncio.gather``) may come back
in another order; steps that ran one after another may not. A step served
from the log also serves the steps it ran inside. Once every recorded call is
served, the run goes on normally, and keeps recording.

Recording is on the hot path of every step, so it is two small operations: a
tuple and a sequence number when a step starts, one tuple appended when it
ends; occurrences are counted when a checkpoint is written. The log keeps at
most ``limit`` calls in memory (plus those in flight when it filled); steps
past the limit are not recorded and run again after a restore (at-least-once,
as for a step that had not finished when the checkpoint was taken), so a run
of millions of steps keeps flat memory.
"""

from __future__ import annotations

import copy
import itertools
import logging
import sys
import threading
from _thread import get_ident
from asyncio import _get_running_loop, current_task
from bisect import bisect_right
from collections.abc import Callable
from typing import Any, Final

from multirun._runtimes import trio_task
from multirun.checkpoints.hashing import v1_input_hash
from multirun.checkpoints.serializers import is_one_shot
from multirun.errors import DeterminismError
from multirun.sdk_usage import is_raw_response

_logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 10_000


# A call as the log saw it start: (name, digest, occurrence, parent seq, seq, lane). A plain
# tuple: one is made for every step, and a tuple costs a tenth of a NamedTuple or a slotted
# object. While recording, the occurrence is 0: it is counted when a checkpoint is written, as
# the number of calls before it (by sequence number) with the same name and digest, plus one.
# The lane is the asyncio or trio task, or else the thread, that made the call: calls in one lane
# ran one after another, calls in different lanes side by side.
Call = tuple[str, str, int, "int | None", int, int]
SEQ: Final = 4  # the position of a call's sequence number
RUN_PREFIX: Final = "@run "  # a sub-run's call is named after the run, with this prefix


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
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._full_warned = False
        self._replay: _Replay | None = None
        self._reruns: set[int] = set()  # sequence numbers of restored failed calls running again
        # sub-runs recorded here, by sequence number: a function giving a running sub-run's
        # state and spend, or what it had when it ended
        self._runs: dict[int, Callable[[], dict[str, Any]] | dict[str, Any]] = {}
        # names of steps called with arguments that have no input hash: never recorded, so a
        # restore cannot serve them (checkpoints say so)
        self.unhashed: set[str] = set()
        # thread pool tasks: the sequence numbers at which one started, by thread (see task_started)
        self._tasks: dict[int, list[int]] = {}
        self._task_marks = 0

    @property
    def replaying(self) -> bool:
        """True from ``load`` until every recorded call has been served."""
        return self._replay is not None and not self._replay.done

    def begin(
        self,
        name: str,
        digest: str,
        parent: int | None,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> Call | Served | None:
        """Before a step runs: its call, ``Served(value)`` to serve instead of running it, or
        None when the log records no more calls (it is full). ``args`` and ``kwargs``, the
        arguments ``digest`` was taken of, let a version 1 checkpoint's cache serve the call.

        Raises DeterminismError when a replay does not match the recording.
        """
        replay = self._replay
        if replay is None or replay.done:
            # recording only: no lock, each operation below is atomic (next() on a count);
            # no tuple but the call itself is made, as every allocation here is paid per step
            if len(self._recorded) >= self.limit:
                self._warn_full()
                return None
            call = (name, digest, 0, parent, next(self._seq), _lane())
            self._running[call[SEQ]] = call
            return call
        with self._lock:
            if replay.v1_keys and args is not None:
                digest = replay.recorded_digest(name, digest, args, kwargs or {})
            return self._begin_replayed(replay, name, digest, parent)

    def _begin_replayed(self, replay: _Replay, name: str, digest: str, parent: int | None) -> Call | Served:
        """``begin`` while a restore replays (the lock held, ``digest`` the recorded one)."""
        occurrence = replay.next_occurrence(name, digest)
        found = None if replay.done else replay.serve(name, digest, occurrence)
        if found is None:
            call = (name, digest, occurrence, parent, next(self._seq), _lane())
        elif found.has_result:
            return Served(kept_copy(found.result))
        else:
            # it runs again, under its recorded sequence number: the steps it had finished
            # keep it as their parent, and its new record replaces the recorded one
            call = (name, digest, found.occurrence, parent, found.seq, _lane())
            if found.failed:
                self._reruns.add(found.seq)
        self._running[call[SEQ]] = call
        return call

    def begin_run(
        self, name: str, digest: str, parent: int | None, snapshot: Callable[[], dict[str, Any]]
    ) -> tuple[Call | None, dict[str, Any] | None]:
        """Before a sub-run of this log's run starts: its call, and, when a restore replays it,
        what the recording kept of it (``snapshot()`` as it was at the checkpoint).

        A sub-run is a call that is never served: its steps are recorded here, under it, so
        after a restore it runs again and its completed steps are served as it calls them.
        """
        began = self.begin(RUN_PREFIX + name, digest, parent)
        if not isinstance(began, tuple):
            return None, None  # the log is full (or a step recorded under this name was served)
        self._runs[began[SEQ]] = snapshot
        replay = self._replay
        recorded = replay.by_seq.get(began[SEQ]) if replay is not None else None
        if recorded is None or recorded.name != began[0]:
            return began, None
        kept = recorded.record.get("run")
        return began, kept if isinstance(kept, dict) else None

    def end_run(self, call: Call, snapshot: dict[str, Any], *, failed: bool) -> None:
        """The sub-run of ``call`` ended, with ``snapshot`` as its final state and spend."""
        self._runs[call[SEQ]] = snapshot
        if failed:
            self.fail(call)
        else:
            self.abandon(call)  # recorded with no result: a sub-run is never served, it runs again

    def task_started(self) -> int | None:
        """A thread pool task of this log's run starts in this thread: its mark, for
        ``task_ended``. A pool worker runs task after task, which ran side by side all the
        same: the calls of each are a lane of their own (told apart when a checkpoint is
        written), so a restore whose pool schedules them otherwise still serves them."""
        if self._task_marks >= self.limit or len(self._recorded) >= self.limit:
            return None  # the log records no more calls, or holds as many marks as calls
        mark = next(self._seq)
        with self._lock:  # a checkpoint copies the marks meanwhile
            self._tasks.setdefault(get_ident(), []).append(mark)
            self._task_marks += 1
        return mark

    def task_ended(self, mark: int | None) -> None:
        """The pool task ``task_started`` marked ended: its mark goes if no call was made
        meanwhile, so tasks that make no steps keep no memory."""
        if mark is not None and next(self._seq) == mark + 1:
            with self._lock:
                marks = self._tasks.get(get_ident())
                if marks and marks[-1] == mark:
                    marks.pop()
                    self._task_marks -= 1

    def _warn_full(self) -> None:
        if not self._full_warned:
            self._full_warned = True
            _logger.warning(
                "multirun: the replay log is full (%d steps): later steps of this run "
                "will run again after a restore",
                self.limit,
            )

    def record(self, call: Call, result: Any, *, copied: bool = False) -> None:
        """The step of ``call`` returned ``result`` (``copied``: a copy the program cannot change).

        An iterator is the program's to read once (an LLM SDK stream, a file): it is not kept, as
        ``abandon`` does. Trying to copy an SDK stream half-copied its HTTP client, whose copy
        then complained on stderr when it was collected.
        """
        if not copied and type(result) not in KEPT_AS_IS:
            if is_one_shot(result):
                self.abandon(call)
                return
            result = kept_copy(result)
        seq = call[SEQ]
        if self._reruns and seq in self._reruns:
            self._rerun_returned(seq)
        # begin() let it in while the log had room: past the limit by the calls in flight at most
        self._recorded.append((call, next(self._seq), result))  # one atomic append
        # only then is it no longer running: a checkpoint taken meanwhile finds it in one of the
        # two, or both (to_records keeps the ended one), never in neither
        self._running.pop(seq, None)

    def abandon(self, call: Call) -> None:
        """The step of ``call`` ended without a result the log can serve (a stream its consumer
        stopped early): after a restore it runs again, as a step running at the checkpoint does."""
        seq = call[SEQ]
        if self._reruns and seq in self._reruns:
            self._rerun_returned(seq)  # it did not raise this time: the program goes on
        self._recorded.append((call, next(self._seq), _NO_RESULT))
        self._running.pop(seq, None)  # after the append, as in record()

    def fail(self, call: Call) -> None:
        """The step of ``call`` raised (or was refused before it ran)."""
        seq = call[SEQ]
        if self._reruns and seq in self._reruns:
            self._reruns.discard(seq)
            self._running.pop(seq, None)
            return  # it failed again: its recorded failure stands
        self._recorded.append((call, next(self._seq), FAILED))
        self._running.pop(seq, None)  # after the append, as in record()

    def _rerun_returned(self, seq: int) -> None:
        """A call that failed when recorded returned this time: stop serving the recording."""
        with self._lock:
            self._reruns.discard(seq)
            replay = self._replay
            if replay is not None and not replay.done:
                replay.leave("a step that failed in the restored run returned this time")

    def take(
        self,
        name: str,
        digest: str,
        parent: int | None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> tuple[bool, Any]:
        """``(True, result)``, the call served as ``begin`` serves it, if the next call of
        ``name`` with these inputs would be served; ``(False, None)`` and nothing done if not.

        For a program that serves a step itself (``get_step_result``, then the step only if
        it was not found): what it takes counts as called, so the replay goes on past it, in
        order, as after a decorated step that was served. Not found, the call is still due:
        the step the program then starts (``begin``) runs it again, or records a new one.

        Raises DeterminismError, as ``begin`` does, when the recorded run called it elsewhere.
        """
        with self._lock:
            replay = self._replay
            if replay is None or replay.done:
                return False, None
            if replay.v1_keys:
                digest = replay.recorded_digest(name, digest, args, kwargs or {})
            if self._servable(replay, name, digest) is None:
                return False, None
            began = self._begin_replayed(replay, name, digest, parent)
            if not isinstance(began, Served):
                # served meanwhile, inside a recorded sub-run the program did not start again:
                # not a call the program made, the step it starts now is
                self._running.pop(began[SEQ], None)
                return False, None
        return True, began.value

    @staticmethod
    def _servable(replay: _Replay, name: str, digest: str) -> _Entry | None:
        """The recorded call whose result the next call of ``name`` with ``digest`` would be
        served (itself, or the retry that answers it), if there is one."""
        entry = replay.find(name, digest, replay.counts.get((name, digest), 0) + 1)
        if entry is None or entry.served:
            return None
        if entry.answer is not None:
            return entry.answer if entry.answer.has_result else None
        return entry if entry.has_result else None

    # -- checkpoints -------------------------------------------------------------

    def to_records(self, extra_state: tuple[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every recorded call (restored ones first) as plain records for a checkpoint.

        ``extra_state``: (sequence number of a sub-run, state to add to what it keeps), for a
        checkpoint a sub-run takes with extra state.
        """
        with self._lock:
            # a step still running (the one that took the checkpoint, say) is recorded without a
            # result: after a restore it runs again, and the steps it had finished are served
            # list(): a snapshot in one step, as other threads add and remove calls without the lock
            running = list(self._running.values())
            ended = list(self._recorded)  # read after the running calls: see record()
            done = {call[SEQ] for call, _, _ in ended}
            calls = [*ended, *((call, None, _NO_RESULT) for call in running if call[SEQ] not in done)]
            replay = self._replay
            counted = dict(replay.counts) if replay is not None else {}
            restored = replay.kept_records({c[SEQ] for c, _, _ in calls}) if replay is not None else []
            reruns = set(self._reruns)
            tasks = {ident: list(marks) for ident, marks in self._tasks.items() if marks}
        calls.sort(key=lambda c: c[0][SEQ])
        records = []
        for call, end, result in calls:
            name, digest, occurrence, parent, seq, lane = call
            marks = tasks.get(lane) if tasks else None
            if marks:
                # the n-th pool task of that thread: a lane of its own (a thread id or a task's
                # id is below 2**64, so no other lane is numbered so)
                lane += bisect_right(marks, seq) << 64
            if not occurrence:
                occurrence = counted[name, digest] = counted.get((name, digest), 0) + 1
            record = {
                "name": name,
                "digest": digest,
                "occurrence": occurrence,
                "parent": parent,
                "seq": seq,
                "end": end,
                "lane": lane,
            }
            if result is FAILED or (result is _NO_RESULT and seq in reruns):
                record["failed"] = True  # a failed call running again is still one that failed
            elif result is not _NO_RESULT:
                record["result"] = result
            sub_run = self._runs.get(seq)
            if sub_run is not None:
                kept = sub_run() if callable(sub_run) else sub_run
                if extra_state is not None and extra_state[0] == seq:
                    kept = {**kept, "state": {**kept.get("state", {}), **extra_state[1]}}
                record["run"] = kept
            records.append(record)
        return [*restored, *records]

    def load(self, records: list[dict[str, Any]]) -> None:
        """Replace the log with a checkpoint's records and start replaying them."""
        replay = _Replay([dict(record) for record in records])
        with self._lock:
            self._recorded = []
            self._replay = replay
            self._reruns = set()
            self._runs = {}
            self._tasks, self._task_marks = {}, 0
            self._seq = itertools.count(replay.next_seq)


def sub_run_part(records: list[dict[str, Any]], seq: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The part of a checkpoint's records that belongs to the sub-run recorded as call ``seq``:
    what its record kept (state and spend), and the calls made inside it, those it made itself
    moved to the top level, as a run of their own. ValueError if no sub-run was recorded there."""
    kept: Any = None
    inside: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        if int(record["seq"]) == seq:
            kept = record.get("run")
        parent = record.get("parent")
        if parent is not None:
            inside.setdefault(int(parent), []).append(record)
    if not isinstance(kept, dict):
        raise ValueError(f"no sub-run is recorded as call {seq}")
    part = [{**record, "parent": None} for record in inside.get(seq, [])]
    below = [int(record["seq"]) for record in part]
    while below:
        children = inside.get(below.pop(), [])
        part.extend(children)
        below.extend(int(record["seq"]) for record in children)
    return kept, part


def _lane() -> int:
    """The asyncio or trio task, or else the thread, making a call (ids: distinct while both live)."""
    loop = _get_running_loop()
    task: object | None
    if loop is not None:
        task = current_task(loop)
    elif "trio" in sys.modules:
        task = trio_task()
    else:
        return get_ident()
    return get_ident() if task is None else id(task)


# immutable: a result or stream item of these types is kept as it is, never copied
KEPT_AS_IS = frozenset({str, int, float, bool, type(None), bytes})

STREAM_KEY: Final = "__multirun_stream__"


def stream_record(items: list[Any], returned: Any) -> dict[str, Any]:
    """The recorded result of a generator step: the items it yielded, and what it returned."""
    return {STREAM_KEY: items, "returned": returned}


def stream_of(name: str, result: Any) -> tuple[list[Any], Any]:
    """The items and return value of a generator step's recorded result (``stream_record``).

    DeterminismError if the recorded step was not a generator (the code changed since)."""
    if isinstance(result, dict) and isinstance(result.get(STREAM_KEY), list):
        return result[STREAM_KEY], result.get("returned")
    raise DeterminismError(
        f"replay: step {name!r} is a generator, but the recorded run's call of it returned a value "
        "instead of streaming: the code changed since the checkpoint. Restore from an earlier "
        "checkpoint, start a new run, or mark the step idempotent=False."
    )


def kept_copy(value: Any) -> Any:
    """A copy of a step's result that the program cannot change afterwards (it appends to the
    list the step returned, say), so the log serves what the step returned."""
    if type(value) in KEPT_AS_IS:  # immutable: the object itself
        return value
    if is_raw_response(value):
        # it holds the SDK's client (its HTTP pool, locks): a deep copy fails half-way and
        # leaves half-made clients that complain when collected. Its body is read: kept as is
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # no copy can be made: the log keeps the object itself
        return value


_NO_RESULT: Any = object()  # the "result" of a call still running
FAILED: Any = object()  # the "result" of a call that raised


class _Entry:
    __slots__ = (
        "answer",
        "concurrent",
        "digest",
        "end",
        "failed",
        "has_result",
        "index",
        "lane",
        "name",
        "occurrence",
        "parent",
        "record",
        "result",
        "returned",
        "seq",
        "served",
    )

    def __init__(self, index: int, record: dict[str, Any]) -> None:
        self.index = index
        self.record = record
        self.name = str(record["name"])
        self.digest = str(record["digest"])
        self.occurrence = int(record["occurrence"])
        self.seq = int(record["seq"])
        unfinished = record.get("end") is None
        self.end = _STILL_RUNNING if unfinished else int(record["end"])
        self.parent = None if record.get("parent") is None else int(record["parent"])
        self.lane = int(record.get("lane", 0))  # older checkpoints: one lane
        # no result: it was running at the checkpoint, or its result had no form in the serializer
        self.failed = record.get("failed") is True
        self.has_result = "result" in record and not self.failed
        # it ended without raising: with a result, or as a sub-run (they have none)
        self.returned = self.has_result or (
            not self.failed and not unfinished and self.name.startswith(RUN_PREFIX)
        )
        self.result = record.get("result")
        self.answer: _Entry | None = None  # a failed call's retry that returned
        self.concurrent = False
        self.served = False


_STILL_RUNNING = 2**62


def check_records(records: list[Any]) -> None:
    """Refuse replay records a replay could not follow, with a ValueError naming the record.

    Each is a dict with a str ``name`` and ``digest``, an int ``occurrence`` (1 or more) and
    ``seq``; ``parent`` is None or the ``seq`` of a call that started before it (so no call
    runs inside itself), ``end`` None or an int not before ``seq``, ``lane`` an int, ``failed``
    a bool, ``run`` a dict. The envelope's digest says the bytes are those written, not that
    whoever wrote them wrote these.
    """
    for number, record in enumerate(records, 1):
        problem = _problem(record)
        if problem is not None:
            shown = repr(record)
            shown = shown if len(shown) <= 120 else shown[:120] + "..."
            raise ValueError(f"replay record #{number} {problem}: {shown}")


def _problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not a JSON object"
    for key in ("name", "digest"):
        if not isinstance(record.get(key), str):
            return f"has no text {key!r}" if key not in record else f"has a {key!r} that is not text"
    for key, least in (("occurrence", 1), ("seq", 0)):
        value = record.get(key)
        if type(value) is not int or value < least:
            return f"has no {key!r}" if key not in record else f"has {key!r} {value!r}, not an int >= {least}"
    seq = record["seq"]
    parent, end, lane = record.get("parent"), record.get("end"), record.get("lane", 0)
    if parent is not None and (type(parent) is not int or not 0 <= parent < seq):
        return f"has 'parent' {parent!r}, not the number of a call started before it ({seq})"
    if end is not None and (type(end) is not int or end < seq):
        return f"has 'end' {end!r}, not an int >= its 'seq' {seq}"
    if type(lane) is not int:
        return f"has 'lane' {lane!r}, not an int"
    if not isinstance(record.get("failed", False), bool):
        return f"has 'failed' {record['failed']!r}, not true or false"
    if not isinstance(record.get("run", {}), dict):
        return "has a 'run' that is not a JSON object"
    return None


def records_from_v1(records: list[Any]) -> list[dict[str, Any]]:
    """The replay records of a version 1 checkpoint (multirun-otel 0.1.0), as records of today.

    Version 1 kept a cache, not a log: ``[name, input hash, result]`` for each step name and
    inputs, the last result, with no order, occurrence or nesting, served to every call with
    those inputs. Each becomes the first call of its step with those inputs, made side by
    side with the others (a lane of its own), marked ``v1``: a replay of them serves the calls
    it knows in any order, by their input hash then (``v1_input_hash``) where it differs from
    today's, and runs the ones it does not instead of raising DeterminismError. ValueError if
    one is not such a triple.
    """
    converted = []
    for seq, record in enumerate(records):
        if not isinstance(record, (list, tuple)) or len(record) != 3:
            raise ValueError(f"version 1 replay record #{seq + 1} is not [name, input hash, result]")
        name, digest, result = record
        if not isinstance(name, str) or not isinstance(digest, str):
            raise ValueError(f"version 1 replay record #{seq + 1} has no step name and input hash")
        converted.append(
            {
                "name": name,
                "digest": digest,
                "occurrence": 1,
                "parent": None,
                "seq": seq,
                "end": seq,
                "lane": seq,
                "result": result,
                "v1": True,
            }
        )
    return converted


class _Replay:
    """A checkpoint's calls, served in their recorded order."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        ordered = sorted(records, key=lambda r: int(r["seq"]))
        self.entries = [_Entry(i, r) for i, r in enumerate(ordered)]
        self.by_key = {(e.name, e.digest, e.occurrence): e for e in self.entries}
        self.by_seq = {e.seq: e for e in self.entries}
        self.counts: dict[tuple[str, str], int] = {}  # (name, digest) -> calls numbered so far
        # the calls made inside each call, by its sequence number (None: at the run's top level),
        # in the order they started
        self.children: dict[int | None, list[_Entry]] = {}
        for entry in self.entries:
            self.children.setdefault(entry.parent, []).append(entry)
        self._mark_side_by_side()
        self._link_retries()
        self.next_seq = 1 + max(
            (max(e.seq, e.end if e.end != _STILL_RUNNING else e.seq) for e in self.entries), default=-1
        )
        self.position = 0  # the first entry, in recorded order, not served yet
        self.done = not self.entries
        self.stopped = False
        self.answered = False  # a call of the program was served, or ran again, from the recording
        # the (name, input hash) of records of a version 1 checkpoint (records_from_v1): a
        # replay holding any serves them in any order, and runs a call they do not know
        self.v1_keys = {(e.name, e.digest) for e in self.entries if e.record.get("v1") is True}

    def next_occurrence(self, name: str, digest: str) -> int:
        """Number a call of ``name`` with these inputs (the first is 1)."""
        occurrence = self.counts[name, digest] = self.counts.get((name, digest), 0) + 1
        return occurrence

    def recorded_digest(self, name: str, digest: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """``digest``, or the version 1 input hash of these arguments when a version 1 record
        waits for the call under that one: 0.1.0 hashed some arguments (all scalars, an Enum)
        otherwise than today."""
        if (name, digest) in self.v1_keys:
            return digest
        legacy = v1_input_hash(args, kwargs)
        if legacy is None or (name, legacy) not in self.v1_keys:
            return digest
        waiting = self.find(name, legacy, self.counts.get((name, legacy), 0) + 1)
        return legacy if waiting is not None and not waiting.served else digest

    def find(self, name: str, digest: str, occurrence: int) -> _Entry | None:
        return self.by_key.get((name, digest, occurrence))

    def serve(self, name: str, digest: str, occurrence: int) -> _Entry | None:
        """The entry that answers this call: one with a result to serve, one without to run
        again, or None for a new call (the recorded one was served already)."""
        entry = self.by_key.get((name, digest, occurrence))
        if entry is not None and entry.served:
            return None  # served already, inside a replayed parent: this is a new execution
        first_call = not self.answered
        expected = self.entries[self.position]
        while (
            expected is not entry
            and expected.name.startswith(RUN_PREFIX)
            and (entry is None or not self._side_by_side(entry, expected))
        ):
            # the program did not start this recorded sub-run again (a guard on restored state,
            # say): nothing of it is served, and the replay goes on without it
            self._serve(expected)
            if self.done:
                return None
            expected = self.entries[self.position]
        if entry is None and self.v1_keys:
            return None  # version 1 kept no order: a call it does not know is a new one
        if entry is None and expected.failed and expected.name == name:
            # the step failed here in the recorded run, and is called with other inputs now: no
            # result is served in its place, the program leaves the recorded path (as when a
            # failed call now returns), and the rest of the run runs afresh
            self.leave(
                f"step {name!r}, which failed in the restored run, is called with other inputs this time"
            )
            return None
        if entry is None and first_call:
            self._went_on_from_state(name, expected)
            return None
        if entry is None:
            raise DeterminismError(
                f"replay: {self._mismatch(name, digest, occurrence, expected)}. The code or the inputs "
                "of a step changed since the checkpoint, or the program skipped recorded steps (a "
                "resumed run serves recorded steps only when it calls them again, in order). Restore "
                "from an earlier checkpoint, start a new run, or mark steps whose inputs "
                "legitimately change idempotent=False."
            )
        if entry is not expected and not self._side_by_side(entry, expected):
            raise DeterminismError(
                f"replay: step {name!r} came before {expected.name!r}, but the recorded run called "
                f"them the other way round (recorded calls #{expected.index + 1} and #{entry.index + 1}). "
                "Steps that ran one after another must be replayed in the same order."
            )
        self.answered = True
        if entry.answer is not None:
            # it failed, and was called again right away with the same inputs: the retry's result
            # answers it, and the retries (the failed ones and the one that returned) are not made
            answer = entry.answer
            key = (entry.name, entry.digest)
            chain = [
                e
                for e in self.entries[entry.index : answer.index + 1]
                if e.parent == entry.parent and (e.name, e.digest) == key
            ]
            if answer.has_result:
                self._serve(*chain)
                return answer
            # a sub-run the program retried until an attempt ended: this call runs as that
            # attempt (under its sequence number), so the attempt's completed steps are served
            self._serve(*chain[:-1])
            entry = answer
        if not entry.has_result:
            # still running at the checkpoint, failed, or a sub-run: it runs again (taking its
            # recorded number), and the steps it had finished are served as it calls them
            entry.served = True
            key = (entry.name, entry.digest)
            self.counts[key] = max(self.counts.get(key, 0), entry.occurrence)
            self._advance()
            return entry
        self._serve(entry)
        return entry

    def _side_by_side(self, a: _Entry, b: _Entry) -> bool:
        """Whether ``a`` and ``b`` ran side by side: they, or the steps they ran inside that
        share a parent, ran in different tasks or threads, or overlapped."""
        lineage_a = self._lineage(a)
        parents_a = {entry.parent: entry for entry in lineage_a}
        for entry in self._lineage(b):
            other = parents_a.get(entry.parent)
            if other is not None:
                return other is not entry and (
                    other.lane != entry.lane or other.concurrent or entry.concurrent
                )
        return False

    def _lineage(self, entry: _Entry) -> list[_Entry]:
        """``entry`` and the recorded steps it ran inside, innermost first."""
        lineage = [entry]
        while entry.parent is not None and entry.parent in self.by_seq:
            entry = self.by_seq[entry.parent]
            lineage.append(entry)
        return lineage

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
        counts = self.counts
        while stack:
            current = stack.pop()
            current.served = True
            # a call served without being made (inside a served step, or a retry answered for
            # it) still takes its number: the next call with these inputs is the one after it
            key = (current.name, current.digest)
            if counts.get(key, 0) < current.occurrence:
                counts[key] = current.occurrence
            stack.extend(self.children.get(current.seq, ()))
        self._advance()

    def _advance(self) -> None:
        entries = self.entries
        while self.position < len(entries) and entries[self.position].served:
            self.position += 1
        if self.position >= len(entries):
            self.done = True

    def _went_on_from_state(self, name: str, expected: _Entry) -> None:
        """The program's first call after the restore is none the recording has: it goes on
        from its restored state (it restored, read where it was, and carried on, as in the
        reference's ``restore_from_checkpoint`` example) instead of calling its recorded steps
        again. Nothing is served, which is also what a change of the first step's inputs since
        the checkpoint needs; a warning says which, as it costs those calls again if unmeant."""
        unserved = sum(not e.served for e in self.entries)
        self.done = self.stopped = True
        _logger.warning(
            "multirun: the first step after the restore, %r, is not the recorded run's next call "
            "(#%d, %r): the run goes on from its restored state, and its %d recorded calls are not "
            "served (steps the program calls again run again)",
            name,
            expected.index + 1,
            expected.name,
            unserved,
        )

    def leave(self, what: str) -> None:
        """The program left the recorded path (``what`` it did, for the log): serve nothing more,
        the rest of the run runs afresh."""
        self.done = self.stopped = True
        _logger.info(
            "multirun: %s; the steps after it run again instead of being served from the checkpoint", what
        )

    def kept_records(self, rerun: set[int]) -> list[dict[str, Any]]:
        """The records a later checkpoint keeps: all but those of calls that ran again (their
        new records replace them) and, once stopped, those never served."""
        return [
            entry.record
            for entry in self.entries
            if entry.seq not in rerun and (entry.served or not self.stopped)
        ]

    def _link_retries(self) -> None:
        """Answer each failed call that the program called again, with the same name and
        inputs, until a call returned (a retry loop around the step or sub-run): the failed
        call gets that call's result. Another call in the failed call's own lane (task or
        thread) in between means it was not retried; calls in other lanes may come between
        (other tasks go on while one retries, and a retry may run in a task of its own)."""
        for group in self.children.values():
            pending: dict[tuple[str, str], list[_Entry]] = {}  # failed calls waiting, by step and inputs
            waiting_in: dict[int, tuple[str, str]] = {}  # lane -> the key its failed calls wait for
            for entry in group:
                key = (entry.name, entry.digest)
                waited = waiting_in.get(entry.lane)
                if waited is not None and waited != key:
                    # another call in that lane: its failed calls were not retried
                    pending[waited] = [e for e in pending.get(waited, ()) if e.lane != entry.lane]
                    del waiting_in[entry.lane]
                if entry.failed:
                    pending.setdefault(key, []).append(entry)
                    waiting_in[entry.lane] = key
                    continue
                failed = pending.pop(key, None)
                if not failed:
                    continue
                for lane in {e.lane for e in failed}:
                    if waiting_in.get(lane) == key:
                        del waiting_in[lane]
                if entry.returned:
                    for call in failed:
                        call.answer = entry

    def _mark_side_by_side(self) -> None:
        """Siblings whose [start, end] overlap ran side by side (threads, gather)."""
        for group in self.children.values():
            latest_end = -1
            previous: _Entry | None = None
            for entry in group:  # ordered by start
                if previous is not None and entry.seq < latest_end:
                    entry.concurrent = True
                    previous.concurrent = True
                if entry.end > latest_end:
                    latest_end, previous = entry.end, entry
