"""Resuming a run that failed or was killed, from its last checkpoint.

    with multirun.resume(run_id="4f0c..."):        # or checkpoint_id=...
        research_crew("the same arguments")        # the next @run continues it

or, with no change to the program, from the command line::

    multirun resume 4f0c... -- python my_agent.py

Any unique prefix of a run or checkpoint id will do, as everywhere an id is
accepted (``match_id``).

Only a run of the name that took the checkpoint continues it: any other
``@run`` started first is refused with a CheckpointError naming both names,
before its function runs, and the resume stays pending for the right one
(a checkpoint's state and served step results belong to the program that
wrote them). A run renamed since is named with ``run_name="new name"``
(``multirun resume --run-name NAME``, ``MULTIRUN_RESUME_RUN_NAME``). In a program run again
from the top (MULTIRUN_RESUME), of the runs of that name the call that took the checkpoint
continues it: the one with its arguments, or else the one started as many runs in (see
``_is_the_call``), so a program calling its run once per item resumes in the item's call and
the others run as new runs; in a ``multirun.resume`` block, the first. A ``resume`` block that
ends well without a run having taken its checkpoint logs a warning that the run was not
resumed. The process whose run takes a MULTIRUN_RESUME checkpoint creates the file
MULTIRUN_RESUME_TAKEN_FILE names, if set: ``multirun resume`` says so when its program ends
without any run having taken it.

The resumed run is a new run (new id, new trace) that links to the one it
continues (a span link, ``multirun.run.resumed_from``). It starts with the
checkpoint's state, counts the spend the original run had made (a resumed
run never gets its budget back), and serves the idempotent steps that had
completed from the checkpoint's replay log instead of running them again. A
step that was running when the process died runs again: steps are
at-least-once, their charges exactly-once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from opentelemetry import context as otel_context

from multirun.checkpoints.exporters import FileBlobExporter
from multirun.checkpoints.store import StoredCheckpoint, parse_checkpoint_key, validate_id
from multirun.errors import CheckpointError, ConfigurationError, ReplayError

if TYPE_CHECKING:
    from multirun.checkpoints.store import CheckpointStore, RestoredCheckpoint
    from multirun.client import MultiRunClient

RESUME_ENV = "MULTIRUN_RESUME"
#: The name of the run that continues the checkpoint MULTIRUN_RESUME names, when it is not the
#: name of the run that took it (``multirun resume --run-name``).
RESUME_RUN_NAME_ENV = "MULTIRUN_RESUME_RUN_NAME"
#: A file the process whose @run takes the MULTIRUN_RESUME checkpoint creates: ``multirun
#: resume`` tells a program that never took it from one that did.
RESUME_TAKEN_ENV = "MULTIRUN_RESUME_TAKEN_FILE"
_PENDING_KEY = otel_context.create_key("multirun-resume")
_logger = logging.getLogger(__name__)


class _Pending:
    """A resume waiting for the next @run of its name; used once.

    ``run_name``: the name of the run that continues it (default: the name of the run that
    took the checkpoint); ``how``: how the resume was asked for, for the error of a run of
    another name (``"call"``: ``multirun.resume``, ``"environment"``: MULTIRUN_RESUME);
    ``store``: the store it was read from.
    """

    def __init__(
        self, restored: RestoredCheckpoint, run_name: str | None, how: str, store: CheckpointStore
    ) -> None:
        self.restored: RestoredCheckpoint | None = restored
        self.run_name = run_name
        self.how = how
        self.store = store
        self.refused: str | None = None  # the name of the last run refused, for the warning
        self.passed_by = 0  # runs of its name that were not the call that took it
        self._lock = threading.Lock()

    def take(self, run_name: str, call: _RunCall) -> RestoredCheckpoint | None:
        """The checkpoint, for a run named ``run_name`` that is ``call`` of the run that took it
        (MULTIRUN_RESUME only: see ``_is_the_call``); None, and the resume left pending, for
        another call; CheckpointError, and the resume left pending, for a run of another name."""
        with self._lock:
            restored = self.restored
            if restored is not None:
                try:
                    _check_name(restored, self.run_name, run_name, self.how, self.store)
                except CheckpointError:
                    self.refused = run_name
                    raise
                if self.how == "environment" and not _is_the_call(restored, call):
                    self.passed_by += 1
                    return None
            self.restored = None
            return restored

    def warn_if_untaken(self) -> None:
        """Say so if no run took the checkpoint: the block of ``multirun.resume`` ended, and the
        user would otherwise take the run as resumed (as ``multirun resume`` says of a program)."""
        with self._lock:
            restored, refused = self.restored, self.refused
        if restored is None:
            return
        checkpoint = restored.checkpoint
        wanted = self.run_name or str(checkpoint.context.get("run_name") or "")
        run = f"a @run named {wanted!r}" if wanted else "a @run"
        named = f" ({checkpoint.name})" if checkpoint.name else ""
        message = (
            f"multirun: run {checkpoint.run_id} was not resumed: the multirun.resume block ended "
            f"before {run} continued it from checkpoint {checkpoint.id}{named}. Check that the block "
            "calls the function of that run"
        )
        if self.run_name is None and refused is not None:
            message += (
                f"; run {refused!r} was refused: if it is that run renamed, say so with "
                f"multirun.resume(..., run_name={refused!r})"
            )
        elif self.run_name is None and wanted:
            message += (
                "; if the run was renamed since, give its new name with "
                'multirun.resume(..., run_name="NEW NAME")'
            )
        _logger.warning("%s", message)


class _RunCall(NamedTuple):
    """Which call of its function a @run is, asked only when a checkpoint's run must be told
    from the other runs of its name: the input hash of its arguments (None if they have
    none), and its number among the runs of its name the process started."""

    inputs_digest: Callable[[], str | None]
    occurrence: Callable[[], int]


def _is_the_call(restored: RestoredCheckpoint, call: _RunCall) -> bool:
    """Whether a run of the checkpoint's name, in a program run again from the top, is the
    call that took it: one with its arguments, or else the one started as many runs of the
    name in (a program calling its run once per item, in the same order; a single run whose
    arguments changed since, a date, say, still continues it). A checkpoint that kept no
    input hash (its arguments had none, or it was written before it kept one) is continued by
    the first run of its name."""
    context = restored.checkpoint.context
    recorded = context.get("run_input_hash")
    if recorded is None:
        return True
    digest = call.inputs_digest()
    if digest is not None and digest == recorded:
        return True
    taken_at = context.get("run_occurrence")
    return taken_at is None or call.occurrence() == taken_at


def passed_by_said(count: int, run_name: str) -> str:
    """That ``count`` runs of the name were not the call that took the checkpoint."""
    runs = "1 run" if count == 1 else f"{count} runs"
    named = f" named {run_name!r}" if run_name else ""
    return (
        f"{runs}{named} started with other arguments than the run that took it, and not as the "
        "program's run of that name that took it (the first, second...): it continues only in "
        "a call with the same arguments, or in that run"
    )


def _check_name(
    restored: RestoredCheckpoint, expected: str | None, run_name: str, how: str, store: CheckpointStore
) -> None:
    """Refuse to continue ``restored`` in a run named ``run_name`` unless it is the expected one:
    ``expected`` if the resume named one, else the run that took the checkpoint (a checkpoint
    that does not say which run took it, written before checkpoints did, is not checked)."""
    taken_by = str(restored.checkpoint.context.get("run_name") or "")
    wanted = expected if expected is not None else taken_by
    if not wanted or run_name == wanted:
        return
    checkpoint = restored.checkpoint
    if how == "environment":
        rename = (
            f"`{_resume_command(store, '--run-name', run_name, checkpoint.id)}` "
            f"(or set {RESUME_RUN_NAME_ENV}={shlex.quote(run_name)})"
        )
    else:
        rename = f"multirun.resume(..., run_name={run_name!r})"
    what = f"checkpoint {checkpoint.id} ({checkpoint.name}) of run {checkpoint.run_id}"
    if expected is not None and expected != taken_by:
        why = f"this resume is for a run named {expected!r} (run_name)"
    else:
        why = f"run {taken_by!r} took it, and its state and served step results belong to that program"
    raise CheckpointError(
        f"run {run_name!r} cannot continue {what}: {why}. Resume it in {wanted!r}; if {run_name!r} "
        f"is that run renamed, say so with {rename}"
    )


_from_environment: _Pending | None = None
_environment_read = False
_environment_lock = threading.Lock()


IdKind = Literal["run", "checkpoint", "either"]
_KIND_WHAT = {"run": "run", "checkpoint": "checkpoint", "either": "run or checkpoint"}
_KIND_MISSING = {
    "run": "no checkpoint of run {prefix!r} in the store",
    "checkpoint": "no checkpoint {prefix!r} in the store",
    "either": "no run or checkpoint with id {prefix!r} in the store",
}


def stored_checkpoints(keys: Iterable[str]) -> list[StoredCheckpoint]:
    """The checkpoints among blob ``keys``, by run, oldest first (ids sort by creation)."""
    return sorted(found for found in map(parse_checkpoint_key, keys) if found is not None)


def match_id(prefix: str, ids: Iterable[str], what: str, missing: str = "") -> str:
    """The one id of ``ids`` equal to ``prefix``, else the one starting with it.

    CheckpointError if none does (``missing``, default ``no <what> with id '<prefix>'``)
    or several do. The one matcher behind every id the command line and ``resume`` accept.
    """
    wanted = prefix.strip()
    if not wanted:
        raise CheckpointError(f"empty {what} id")
    unique = list(dict.fromkeys(ids))
    if wanted in unique:
        return wanted
    matches = [found for found in unique if found.lower().startswith(wanted.lower())]
    if not matches:
        raise CheckpointError(missing or f"no {what} with id {prefix!r}")
    if len(matches) > 1:
        raise CheckpointError(
            f"{what} id {prefix!r} is ambiguous: it matches {_shown(matches)}; give more characters"
        )
    return matches[0]


def _shown(ids: Sequence[str], most: int = 5) -> str:
    """A few ids, long enough to tell apart (checkpoint ids share their leading time digits)."""
    shared = 0  # the length of the prefix they all share
    while all(len(found) > shared and found[shared] == ids[0][shared] for found in ids):
        shared += 1
    width = max(12, shared + 4)
    listed = ", ".join(found[:width] for found in ids[:most])
    return listed + (f" and {len(ids) - most} more" if len(ids) > most else "")


def resolve_checkpoint(stored: Iterable[StoredCheckpoint], identifier: str, kind: IdKind = "either") -> str:
    """The id of the checkpoint ``identifier`` names among ``stored``.

    ``kind`` says what the identifier may be: a run id (its newest checkpoint), a
    checkpoint id, or either; any unique prefix of one.
    """
    validate_id(identifier, f"{_KIND_WHAT[kind]} id")  # refuses "../x" and the like up front
    named: dict[str, str] = {}
    for found in sorted(stored):  # oldest first: a run id ends up naming its newest checkpoint
        if kind != "checkpoint":
            named[found.run_id] = found.checkpoint_id
        if kind != "run":
            named[found.checkpoint_id] = found.checkpoint_id
    missing = _KIND_MISSING[kind].format(prefix=identifier)
    return named[match_id(identifier, named, _KIND_WHAT[kind], missing)]


def load_for_resume(store: CheckpointStore, identifier: str, kind: IdKind = "either") -> RestoredCheckpoint:
    """The checkpoint ``identifier`` names (see ``resolve_checkpoint``), read and verified.

    When it is refused (damaged, truncated), the error names the run's checkpoint before it,
    if there is one, and how to resume from that one instead.
    """
    stored = stored_checkpoints(store.list())
    checkpoint_id = resolve_checkpoint(stored, identifier, kind)
    try:
        return store.load(checkpoint_id)
    except (CheckpointError, ReplayError) as exc:
        earlier = earlier_checkpoint(stored, checkpoint_id)
        if earlier is not None:
            exc.args = (
                f"{exc}. The checkpoint of run {earlier.run_id} before it can be resumed instead: "
                f"multirun.resume(checkpoint_id={earlier.checkpoint_id!r}), or "
                f"`{_resume_command(store, earlier.checkpoint_id)}`",
                *exc.args[1:],
            )
        raise


def _resume_command(store: CheckpointStore, *words: str) -> str:
    """``multirun resume WORDS -- ...`` for a message, with the --dir and --store that make it
    read ``store``, pasted in a shell that lacks this process's MULTIRUN_DIR and
    MULTIRUN_CHECKPOINT_URI (``multirun resume --dir/--store`` set them): those variables, and
    a folder the program chose in code. An S3 store chosen in code has no URI here to give."""
    from multirun.client import DEFAULT_DIR

    folder = os.environ.get("MULTIRUN_DIR")
    uri = os.environ.get("MULTIRUN_CHECKPOINT_URI")
    options = ["--dir", folder] if folder else []
    exporter = store.exporter
    if isinstance(exporter, FileBlobExporter):
        default = Path(folder or DEFAULT_DIR, "blobs")
        with contextlib.suppress(OSError):  # os.getcwd(): the working directory was deleted
            default = default.absolute()
        if exporter.directory != default:
            options += ["--store", str(exporter.directory)]
    elif uri:
        options += ["--store", uri]
    return shlex.join(["multirun", "resume", *words, *options]) + " -- ..."


def earlier_checkpoint(stored: Sequence[StoredCheckpoint], checkpoint_id: str) -> StoredCheckpoint | None:
    """The checkpoint taken before ``checkpoint_id`` in the same run, if any (``stored`` is sorted)."""
    previous = None
    for found in stored:
        if found.checkpoint_id == checkpoint_id:
            return previous if previous is not None and previous.run_id == found.run_id else None
        previous = found
    return None


@contextmanager
def resume(
    run_id: str | None = None,
    *,
    checkpoint_id: str | None = None,
    client: MultiRunClient | None = None,
    run_name: str | None = None,
) -> Iterator[RestoredCheckpoint]:
    """Make the next ``@run`` started inside continue from a checkpoint (see the module doc).

    ``run_name``: the name of the run that continues it, when that is not the name of the run
    that took the checkpoint (the run was renamed); a run of any other name is refused.
    """
    from multirun.client import get_client

    if (run_id is None) == (checkpoint_id is None):
        raise ConfigurationError("resume: pass exactly one of run_id=... or checkpoint_id=...")
    for name, value in (("run_id", run_id), ("checkpoint_id", checkpoint_id)):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"resume: {name} must be a string, got {value!r}")
    if run_name is not None and (not isinstance(run_name, str) or not run_name.strip()):
        raise ConfigurationError(f"resume: run_name must be a non-empty string, got {run_name!r}")
    store = (client or get_client()).checkpoints
    if run_id is not None:
        restored = load_for_resume(store, run_id, "run")
    else:
        restored = load_for_resume(store, checkpoint_id or "", "checkpoint")
    pending = _Pending(restored, run_name, "call", store)
    token = otel_context.attach(otel_context.set_value(_PENDING_KEY, pending))
    try:
        yield restored
    finally:
        otel_context.detach(token)
    # only a block that ended well: one that raised (a run refused, or any other error) says why
    pending.warn_if_untaken()


def take_pending_resume(
    client: MultiRunClient,
    run_name: str,
    inputs_digest: Callable[[], str | None],
    occurrence: Callable[[], int],
) -> RestoredCheckpoint | None:
    """For ``@run``: the checkpoint to continue from, if a resume is pending (used once) and
    the run, named ``run_name``, is the call that took it: for MULTIRUN_RESUME, the one called
    with arguments of the same input hash (``inputs_digest()``), or else the run of that name
    started as many runs in (``occurrence()``); in a ``multirun.resume`` block, the first.

    CheckpointError if the run is not of the name to continue it; the resume then stays pending."""
    pending = otel_context.get_current().get(_PENDING_KEY)
    if isinstance(pending, _Pending):
        return pending.take(run_name, _RunCall(inputs_digest, occurrence))
    if not os.environ.get(RESUME_ENV):
        return None
    return _take_from_environment(client, run_name, _RunCall(inputs_digest, occurrence))


def _take_from_environment(
    client: MultiRunClient, run_name: str, call: _RunCall
) -> RestoredCheckpoint | None:
    """``MULTIRUN_RESUME=<run or checkpoint id>``: the @run of the process that is the call
    that took it resumes it (of the name MULTIRUN_RESUME_RUN_NAME gives, if set)."""
    global _from_environment, _environment_read
    with _environment_lock:
        if not _environment_read:
            _environment_read = True
            identifier = os.environ.get(RESUME_ENV, "")
            if identifier:
                expected = os.environ.get(RESUME_RUN_NAME_ENV, "").strip() or None
                try:
                    restored = load_for_resume(client.checkpoints, identifier)
                except (CheckpointError, ReplayError) as exc:
                    # the program never named this id: say where it came from
                    exc.args = (f"{RESUME_ENV}={identifier!r}: {exc}", *exc.args[1:])
                    raise
                _from_environment = _Pending(restored, expected, "environment", client.checkpoints)
    if _from_environment is None:
        return None
    taken = _from_environment.take(run_name, call)
    if taken is not None:
        _say_taken(taken)
    elif _from_environment.passed_by:
        _say_passed_by(_from_environment)
    return taken


def _say_passed_by(pending: _Pending) -> None:
    """Note in MULTIRUN_RESUME_TAKEN_FILE, if set, how many runs passed the checkpoint by
    for their arguments, for ``multirun resume`` to say if none took it."""
    path = os.environ.get(RESUME_TAKEN_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as taken:
            taken.write(f"passed-by {pending.passed_by}\n")


def _say_taken(restored: RestoredCheckpoint) -> None:
    """Create the file MULTIRUN_RESUME_TAKEN_FILE names, if set, for ``multirun resume``; a file
    that cannot be written costs the program nothing (the command then says it was not taken)."""
    path = os.environ.get(RESUME_TAKEN_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as taken:
            taken.write(f"{restored.checkpoint.id} {os.getpid()}\n")
