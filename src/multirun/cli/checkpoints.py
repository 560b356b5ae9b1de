"""``multirun checkpoints`` and ``multirun resume``: the checkpoint store from the command line.

    multirun checkpoints [--run RUN_ID]      list checkpoints, newest last
    multirun checkpoints show ID             one checkpoint: run, name, size, state keys, agents, replay log
    multirun checkpoints verify [ID ...]     read and verify digests (all when no ID is given)
    multirun resume [--dir DIR] [--run-name NAME] RUN_OR_CHECKPOINT_ID -- python my_agent.py ...

Any unique prefix of an id will do. Options of ``resume`` go anywhere before
``--``: everything after it is the command, which is told (through the
environment) the checkpoint to resume and the store to read it from. Only a
run of the name that took the checkpoint continues it; ``--run-name NAME``
lets a run renamed since continue it under its new name. A command that ends
without such a run having continued it is told of: ``run ... was not resumed``,
exit status 1 (or the command's own, if it failed).

The store is ``--store URI``, else ``$MULTIRUN_CHECKPOINT_URI``, else DIR/blobs.
A checkpoint over ``$MULTIRUN_CHECKPOINT_MAX_BYTES`` (1 GiB by default) is refused
unread, as the program refuses it.
A key of the store that is not a checkpoint (a stray file) is skipped with a warning.

A pickle (or cloudpickle) checkpoint is shown, verified (size, HMAC, digests)
and checked before a resume from the summary its blob carries, without being
unpickled: its classes may be defined in the program's ``__main__``, which only
the program itself can unpickle (when it resumes). Those written before that
summary existed (format version 3 and before) are unpickled, as before; one
whose classes this command does not have is still shown and verified as far
as its key and envelope go (format version, run id, size, HMAC and digests),
with a word that its contents need the program's classes, and can be resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from multirun.checkpoints.envelope import HMAC_KEY_ENV, HMAC_KEY_SETTINGS, MAX_BYTES_ENV, MAX_BYTES_SETTINGS
from multirun.checkpoints.exporters import (
    BlobExporter,
    FileBlobExporter,
    MemoryBlobExporter,
    exporter_from_uri,
    file_exporter,
)
from multirun.checkpoints.resume import (
    RESUME_ENV,
    RESUME_RUN_NAME_ENV,
    RESUME_TAKEN_ENV,
    IdKind,
    earlier_checkpoint,
    match_id,
    passed_by_said,
    resolve_checkpoint,
)
from multirun.checkpoints.serializers import serializer_names
from multirun.checkpoints.store import (
    CheckpointStore,
    CheckpointSummary,
    StoredCheckpoint,
    created_ns,
    parse_checkpoint_key,
    validate_id,
)
from multirun.cli import render, runs
from multirun.client import checkpoint_max_bytes_setting
from multirun.errors import CheckpointError, MultiRunError, ReplayError
from multirun.models.checkpoint import Checkpoint

_logger = logging.getLogger(__name__)


def add_commands(commands: Any, add_dir: Any) -> None:
    """Register ``checkpoints`` and ``resume`` on the top-level sub-parsers."""
    listing = commands.add_parser("checkpoints", help="list, show or verify checkpoints")
    add_store_options(listing, add_dir)
    listing.add_argument(
        "--run",
        dest="run_id",
        type=naming("run id"),
        metavar="RUN_ID",
        help="only this run's checkpoints (a unique prefix will do)",
    )
    listing.set_defaults(handler=cmd_list)
    sub = listing.add_subparsers(title="commands", metavar="COMMAND")
    show = sub.add_parser("show", help="one checkpoint: run, name, size, state keys, agents, replay log")
    show.add_argument("checkpoint_id", metavar="ID", help="a checkpoint id, or a unique prefix of one")
    add_store_options(show, add_dir, argparse.SUPPRESS)
    show.set_defaults(handler=cmd_show)
    verify = sub.add_parser("verify", help="read every checkpoint (or the ones named) and check it")
    verify.add_argument("checkpoint_ids", nargs="*", metavar="ID", help="checkpoint ids, or unique prefixes")
    add_store_options(verify, add_dir, argparse.SUPPRESS)
    verify.set_defaults(handler=cmd_verify)

    resume = commands.add_parser(
        "resume",
        usage="multirun resume [--dir DIR] [--store URI] [--run-name NAME] ID -- COMMAND ...",
        help="run a command whose @run continues a run from its last checkpoint",
        description="Run COMMAND with MULTIRUN_RESUME set: its @run continues the run "
        "(or checkpoint) ID, serving the steps it had completed from the checkpoint. That @run "
        "must have the name of the run that took the checkpoint (or the one --run-name gives): "
        "one of another name is refused; a run of that name called with other arguments runs as "
        "a new run, and the call with the arguments of the run that took it continues it. If "
        "COMMAND ends without that run having continued it, resume says so and exits 1 (or as "
        "COMMAND did, if it failed). COMMAND comes after --; "
        "the options may go before or after ID.",
    )
    add_store_options(resume, add_dir)
    resume.add_argument(
        "--run-name",
        metavar="NAME",
        help="the name of the @run that continues it, when the run was renamed since it took the "
        "checkpoint (default: the name of that run; a run of another name is refused)",
    )
    resume.add_argument(
        "identifier",
        metavar="ID",
        help="a run id (its newest checkpoint) or a checkpoint id, or a unique prefix of one",
    )
    # a command given without --; with a default, argparse does not name it as a missing argument
    resume.add_argument("stray", nargs="*", default=[], help=argparse.SUPPRESS)
    resume.set_defaults(handler=cmd_resume, command=None)


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """``multirun resume ... -- COMMAND``: the words before ``--``, and COMMAND.

    Only ``resume`` takes a command; any other command line comes back as it is, with None.
    """
    words = list(argv)
    if words[:1] != ["resume"] or "--" not in words:
        return words, None
    at = words.index("--")
    return words[:at], words[at + 1 :]


def add_store_options(parser: argparse.ArgumentParser, add_dir: Any, default: Any = None) -> None:
    add_dir(parser, default)
    parser.add_argument(
        "--store",
        default=default,
        type=naming("store"),
        metavar="URI",
        help="the checkpoint store (default: $MULTIRUN_CHECKPOINT_URI, else DIR/blobs)",
    )


def naming(what: str) -> Callable[[str], str]:
    """An argparse type that refuses an empty value, which the commands would otherwise take for
    no option at all: ``--dir "$UNSET"`` would prune the default folder."""

    def check(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"must name a {what}, got ''")
        return text

    return check


def same_place(args: argparse.Namespace, command: str) -> str:
    """``command``, a command line a message suggests, with the --dir and --store options this
    command was given: pasted, it reads the same folder and store."""
    given = [(option, getattr(args, option[2:], None)) for option in ("--dir", "--store")]
    return command + "".join(f" {option} {shlex.quote(value)}" for option, value in given if value)


class CommandError(Exception):
    """A message for the user; the command exits 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a word of what the command leaves behind (the command exits 130)."""


# ---------------------------------------------------------------------------
# the store, and the traces that name its checkpoints


def open_store(args: argparse.Namespace) -> CheckpointStore:
    """The store the options name; RunsError/CommandError for a folder named that does not exist."""
    directory, named = runs.chosen_directory(args)
    given = getattr(args, "store", None)
    source = "--store" if given else "MULTIRUN_CHECKPOINT_URI"
    uri = given or os.environ.get(source)
    if named or (not uri and runs.exists(directory)):  # none yet is no checkpoints; a file is an error
        runs.check_directory(directory)
    exporter: BlobExporter = FileBlobExporter(directory / "blobs")  # a folder: "a:b/blobs" has no scheme
    if uri:
        try:
            exporter = exporter_from_uri(uri)
        except MultiRunError as exc:  # named by where it was given: the option or the variable
            raise CommandError(f"{source}: {exc}") from None
    if isinstance(exporter, MemoryBlobExporter):  # this process's own, empty: "No checkpoints." would mislead
        raise CommandError(
            f"{source}: {uri!r} is a store in the memory of the process that uses it: no other process "
            "can read it (a program's checkpoints are read from a folder or s3:// store)"
        )
    if given and isinstance(exporter, FileBlobExporter):
        runs.check_directory(exporter.directory)
    try:
        max_bytes = checkpoint_max_bytes_setting(None)  # the limit the program reads with
    except MultiRunError as exc:
        raise CommandError(str(exc)) from None
    # whatever serializer the program chose: a pickle is still read only once its HMAC, with the
    # key from MULTIRUN_CHECKPOINT_HMAC_KEY, verifies (without the key, the error says to set it)
    return CheckpointStore(exporter, read_serializers=serializer_names(), max_blob_bytes=max_bytes)


def store_location(args: argparse.Namespace) -> str:
    """The store the options name, as the user would give it: ``--store``, else
    ``$MULTIRUN_CHECKPOINT_URI``, else the folder DIR/blobs."""
    directory, _ = runs.chosen_directory(args)
    return (
        getattr(args, "store", None) or os.environ.get("MULTIRUN_CHECKPOINT_URI") or str(directory / "blobs")
    )


def has_checkpoints_in_folder(args: argparse.Namespace) -> bool:
    """Whether the store ``multirun checkpoints`` reads holds a checkpoint, when that store is a
    folder (DIR/blobs, or a path $MULTIRUN_CHECKPOINT_URI names): it looks for the first one and
    reads none. A remote store is not asked (a hint must not wait on the network)."""
    directory, _ = runs.chosen_directory(args)
    folder = directory / "blobs"
    uri = os.environ.get("MULTIRUN_CHECKPOINT_URI")
    if uri:
        scheme = urlparse(uri).scheme.lower()
        if scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt"):
            return False
        try:
            folder = file_exporter(uri).directory
        except MultiRunError:
            return False
    return _folder_holds_checkpoints(folder)


def _folder_holds_checkpoints(folder: Path) -> bool:
    """Whether the folder store ``folder`` holds a checkpoint (the first one found; none is read)."""
    try:
        with os.scandir(folder / "checkpoints") as run_folders:
            for run_folder in run_folders:
                if run_folder.is_dir() and any(
                    name.endswith(".ckpt") and not name.startswith(".")
                    for name in os.listdir(run_folder.path)
                ):
                    return True
    except OSError:  # no store yet, or one that cannot be read: `multirun checkpoints` says which
        return False
    return False


def store_elsewhere(args: argparse.Namespace, store: CheckpointStore) -> str | None:
    """For a folder store that holds no checkpoint: where they are, when the folder given is
    around the store (the multirun folder, whose store is its ``blobs``) or inside it (its
    ``checkpoints`` folder, or a run's), as a command line that lists them; else None."""
    if not isinstance(store.exporter, FileBlobExporter):
        return None
    folder = store.exporter.directory
    candidates = [folder / "blobs"]
    if folder.name == "checkpoints":
        candidates.append(folder.parent)
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent)
    for candidate in candidates:
        if _folder_holds_checkpoints(candidate):
            place = argparse.Namespace(dir=getattr(args, "dir", None), store=str(candidate))
            listing = same_place(place, "multirun checkpoints")
            return f"it holds none, but {candidate} does: `{listing}`"
    return None


def stored_checkpoints(store: CheckpointStore) -> list[StoredCheckpoint]:
    """The checkpoints in ``store``; any other key is skipped with a warning naming it."""
    found = []
    for key in _call(store.list):
        parsed = parse_checkpoint_key(key)
        if parsed is None:
            _logger.warning("skipping %s: not a checkpoint", _where(store, key))
        else:
            found.append(parsed)
    return sorted(found)


def run_checkpoint_locations(store: CheckpointStore, run_id: str, store_name: str) -> list[str]:
    """Where the checkpoints of ``run_id`` are, as the user finds them: their files' paths in
    a folder, else their keys in ``store_name``; none, and a warning, if the store cannot be listed."""
    try:
        keys = sorted(key for key in store.list(run_id) if parse_checkpoint_key(key) is not None)
    except (MultiRunError, OSError) as exc:
        _logger.warning("cannot list the checkpoints of run %s in %s: %s", run_id, store_name, exc)
        return []
    if isinstance(store.exporter, FileBlobExporter):
        return [_where(store, key) for key in keys]
    return [f"{key} in {store_name}" for key in keys]


def _where(store: CheckpointStore, key: str) -> str:
    """A key as the user finds it: a file's path in a file store, else the key."""
    if isinstance(store.exporter, FileBlobExporter):
        return str(store.exporter.directory.joinpath(*key.split("/")))
    return f"{key} in the store"


def _traced(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ids of the runs under DIR/traces (an unfinished run's trace id if its id is unknown,
    as ``multirun runs`` lists it), and the names their spans give checkpoints, if there are
    span files (read a line at a time, without keeping the spans: they can be big)."""
    directory, _ = runs.chosen_directory(args)
    if not directory.is_dir():
        return [], {}
    finder = runs.RunFinder()
    names: dict[str, str] = {}
    try:
        for span in runs.stream_spans(directory):
            finder.add(span)
            names.update(runs.checkpoint_names([span]))
        found = finder.runs(lambda: runs.stream_spans(directory, again=True))
    except runs.RunsError as exc:  # the checkpoints are still there to list
        _logger.warning("%s; checkpoints are listed without their names", exc)
        return [], {}
    return [run.ref for run in found], names


def _call(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except (CheckpointError, ReplayError) as exc:
        raise CommandError(_said_here(exc)) from None


def _said_here(error: Exception) -> str:
    """``error``'s message naming only the settings this command reads: the variables, not
    ``multirun.init`` or a CheckpointStore's arguments, which a command-line user cannot pass."""
    return str(error).replace(HMAC_KEY_SETTINGS, HMAC_KEY_ENV).replace(MAX_BYTES_SETTINGS, MAX_BYTES_ENV)


# ---------------------------------------------------------------------------
# checkpoints, show, verify


LIST_HEADER = ("RUN ID", "CHECKPOINT", "CREATED", "NAME")


def cmd_list(args: argparse.Namespace) -> int:
    """One line per checkpoint, newest last: run, checkpoint id, when, and its name."""
    store = open_store(args)
    stored = stored_checkpoints(store)
    traced_run_ids, names = _traced(args)
    run_id = _match_run(args, stored, traced_run_ids) if args.run_id else None
    if run_id is not None:
        stored = [found for found in stored if found.run_id == run_id]
    if not stored:
        elsewhere = None if run_id else store_elsewhere(args, store)
        if elsewhere:
            print(f"No checkpoints in the store {store_location(args)}: {elsewhere}")
        else:
            print("No checkpoints" + (f" of run {run_id}" if run_id else "") + ".")
        return 0
    rows = [
        (
            found.run_id[:12],
            found.checkpoint_id,
            _created(found.checkpoint_id),
            names[found.checkpoint_id] if found.checkpoint_id in names else _name_in_store(store, found),
        )
        for found in sorted(stored, key=lambda found: found.checkpoint_id)
    ]
    for line in render.table(LIST_HEADER, rows, set(), render.terminal_style()):
        print(line)
    return 0


def _name_in_store(store: CheckpointStore, found: StoredCheckpoint) -> str:
    """The name of a checkpoint no span names (its run was killed before its spans were
    written, or they went elsewhere), from the start of its blob: blank for a blob of format
    version 3 and before, which names it only in its payload, or one that cannot be read
    (``verify`` says why)."""
    try:
        return store.name_of(store.key(found.run_id, found.checkpoint_id)) or ""
    except Exception:  # one odd blob (or a plugin's error) leaves one name blank
        return ""


def _match_run(args: argparse.Namespace, stored: list[StoredCheckpoint], traced_run_ids: list[str]) -> str:
    """The run id ``--run`` names, among the runs of the store and those of the traces."""
    ids = [found.run_id for found in stored] + traced_run_ids
    listing = same_place(args, "multirun checkpoints")
    missing = f"no run with id {args.run_id!r} (`{listing}` lists the runs with checkpoints)"
    return str(_call(match_id, args.run_id, ids, "run", missing))


def _resolve(
    args: argparse.Namespace,
    store: CheckpointStore,
    stored: list[StoredCheckpoint],
    identifier: str,
    kind: IdKind,
) -> str:
    """The checkpoint id ``identifier`` names among ``stored`` (see ``resolve_checkpoint``); when it
    names none, the error says which store was read, and what to try instead."""
    try:
        return resolve_checkpoint(stored, identifier, kind)
    except CheckpointError as exc:
        advice = _not_found_advice(args, store, stored, identifier, kind)
        if advice is None:  # ambiguous, or no id at all: the error says so
            raise CommandError(_said_here(exc)) from None
    what = _NOT_FOUND[kind].format(identifier=identifier)
    raise CommandError(f"{what} in the store {store_location(args)}: {advice}")


_NOT_FOUND = {
    "run": "no checkpoint of run {identifier!r}",
    "checkpoint": "no checkpoint {identifier!r}",
    "either": "no run or checkpoint with id {identifier!r}",
}


def _not_found_advice(
    args: argparse.Namespace,
    store: CheckpointStore,
    stored: list[StoredCheckpoint],
    identifier: str,
    kind: IdKind,
) -> str | None:
    """What to do about ``identifier``, which names no checkpoint of ``stored``; None if it
    names one or several after all, or is no id."""
    wanted = identifier.strip().lower()
    try:
        validate_id(identifier, "id")
    except CheckpointError:
        return None
    ids = [found.checkpoint_id for found in stored if kind != "run"]
    ids += [found.run_id for found in stored if kind != "checkpoint"]
    if not wanted or any(found.lower().startswith(wanted) for found in ids):
        return None
    elsewhere = None if stored else store_elsewhere(args, store)
    if elsewhere:  # the store given is a folder around or inside the one meant
        return elsewhere
    runs_named = {found.run_id for found in stored} | set(_traced(args)[0])
    runs_named = {run_id for run_id in runs_named if run_id.lower().startswith(wanted)}
    if kind == "checkpoint" and runs_named:
        listing = same_place(args, f"multirun checkpoints --run {shlex.quote(identifier)}")
        return f"it is a run id, whose checkpoints `{listing}` lists"
    if len(runs_named) == 1:
        return f"run {runs_named.pop()} took no checkpoint there, so there is nothing to resume it from"
    return f"`{same_place(args, 'multirun checkpoints')}` lists the checkpoints it holds"


def _created(checkpoint_id: str) -> str:
    ns = created_ns(checkpoint_id)
    return "" if ns is None else render.format_time(ns)


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    checkpoint_id = _resolve(args, store, stored_checkpoints(store), args.checkpoint_id, "checkpoint")
    summary = _call(store.describe, checkpoint_id)
    for label, value in _unread_lines(summary) if summary.unread else _lines(summary):
        print(f"{label:<11} {render.printable(value)}")
    return 0


def _lines(summary: CheckpointSummary) -> list[tuple[str, str]]:
    """``show``'s lines of a checkpoint: label, value."""
    meta = summary.checkpoint
    tokens, steps = summary.ledger.get("tokens", 0), summary.ledger.get("steps", 0)
    replay_log = (
        f"{render.plural(summary.replay_steps, 'step')}, {summary.replay_results} with a result to serve"
    )
    return [
        ("checkpoint", meta.id),
        ("run", f"{meta.run_id} ({meta.context.get('run_name', '')})"),
        ("name", meta.name),
        ("created", meta.created_at.isoformat()),
        ("size", render.plural(meta.size_bytes, "byte")),
        ("key", summary.uri),
        ("format", _format(summary)),
        ("state keys", ", ".join(summary.state_keys) or "(none)"),
        ("agents", _agents(summary.agents)),
        ("replay log", replay_log),
        ("spend", f"{render.plural(tokens, 'token')}, {render.plural(steps, 'step')}"),
        ("trace", summary.trace.get("trace_id", "(unknown)")),
    ]


def _format(summary: CheckpointSummary) -> str:
    """The blob's format version, serializer, compression and signature."""
    zlib = ", zlib" if summary.compression != "none" else ""
    return f"version {summary.version}, {summary.checkpoint.state_format}{zlib}, {summary.signature}"


def _unread_lines(summary: CheckpointSummary) -> list[tuple[str, str]]:
    """``show``'s lines of a checkpoint whose contents this command could not read: what its
    key and envelope tell, and why the rest is not shown."""
    meta = summary.checkpoint
    return [
        ("checkpoint", meta.id),
        ("run", meta.run_id),
        ("created", _created(meta.id) or "(unknown)"),
        ("size", render.plural(meta.size_bytes, "byte")),
        ("key", summary.uri),
        ("format", _format(summary)),
        (
            "contents",
            f"not read here: {summary.unread}; the program loads them when it resumes: "
            f"multirun resume {meta.id} -- python your_program.py",
        ),
    ]


def _agents(agents: list[tuple[str, int, list[str]]]) -> str:
    """The agents whose state a checkpoint keeps: ``name (its state keys)``, ``#n`` for the
    n-th agent of that name in the run."""
    shown = []
    for name, occurrence, state_keys in agents:
        nth = f" #{occurrence}" if occurrence > 1 else ""
        shown.append(f"{name}{nth} ({', '.join(state_keys) or 'empty'})")
    return ", ".join(shown) or "(none)"


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    stored = stored_checkpoints(store)
    elsewhere = None if stored or args.checkpoint_ids else store_elsewhere(args, store)
    if elsewhere:  # else "0 ok" would pass for a store verified
        print(f"No checkpoints in the store {store_location(args)}: {elsewhere}")
    ids = args.checkpoint_ids or [found.checkpoint_id for found in stored]
    failed = 0
    for given in ids:
        try:
            checkpoint_id = _resolve(args, store, stored, given, "checkpoint")
            summary = store.describe(checkpoint_id)
        except (CommandError, CheckpointError, ReplayError) as exc:
            failed += 1
            print(f"FAILED  {given}: {_said_here(exc)}")
            continue
        if summary.unread:
            print(
                f"ok      {checkpoint_id}  (HMAC and digests verified; its contents need the classes "
                "of the program that wrote them)"
            )
        else:
            print(f"ok      {checkpoint_id}")
    print(f"{len(ids) - failed} ok, {failed} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# resume


RESUME_EXAMPLE = "e.g. multirun resume ID -- python agent.py"


def cmd_resume(args: argparse.Namespace) -> int:
    """Run the command with the checkpoint to continue, and the store it is in, in its environment."""
    if args.stray:
        raise CommandError(f"resume: put the program to run after --, {RESUME_EXAMPLE}")
    command: list[str] = args.command or []
    if not command:
        raise CommandError(f"resume: give the program to run after --, {RESUME_EXAMPLE}")
    if args.run_name is not None and not args.run_name.strip():
        raise CommandError("resume: --run-name must name a run")
    store = open_store(args)
    stored = stored_checkpoints(store)
    checkpoint_id = _resolve(args, store, stored, args.identifier, "either")
    try:
        meta = store.describe(checkpoint_id).checkpoint  # the program unpickles it, not this one
    except (CheckpointError, ReplayError) as exc:
        raise CommandError(_said_here(exc) + _resume_instead(args, stored, checkpoint_id)) from None
    named = f" ({meta.name})" if meta.name else ""
    print(f"resuming run {meta.run_id} from checkpoint {meta.id}{named}", file=sys.stderr)
    env = child_environment(args, meta.id, store.exporter)
    with tempfile.TemporaryDirectory(prefix="multirun-resume-") as folder:
        taken_file = Path(folder, "taken")
        env[RESUME_TAKEN_ENV] = str(taken_file)
        try:
            child = subprocess.Popen(command, env=env)
        except OSError as exc:
            raise CommandError(f"resume: cannot run {command[0]!r}: {exc}") from None
        with _ctrl_c_left_to_the_child():
            code = child.wait()
        taken, passed_by = _read_taken(taken_file)
    code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
    if taken or code == _CTRL_C:  # stopped with Ctrl-C, the user knows why it was not resumed
        return code
    # the program never started the run that continues it: the checkpoint is still to resume
    not_resumed = _not_resumed(meta, env.get(RESUME_RUN_NAME_ENV, "").strip(), code, passed_by)
    if code:
        _logger.warning("%s", not_resumed)  # the program's own failure is the error
        return code
    raise CommandError(not_resumed)


_CTRL_C = 128 + signal.SIGINT  # as a shell reports a program that SIGINT ended, or exit(130)


def _read_taken(path: Path) -> tuple[bool, int]:
    """What the program wrote in MULTIRUN_RESUME_TAKEN_FILE: whether a run took the checkpoint,
    and how many runs of its name passed it by (not the call that took it)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:  # not written: no run took it
        return False, 0
    passed_by = [line.split()[-1] for line in lines if line.startswith("passed-by ")]
    taken = any(line and not line.startswith("passed-by ") for line in lines)
    return taken, int(passed_by[-1]) if passed_by and passed_by[-1].isdigit() else 0


def _not_resumed(checkpoint: Checkpoint, run_name: str, code: int, passed_by: int = 0) -> str:
    """Why ``multirun resume`` did nothing: the program ended (with status ``code``) before a
    @run named ``run_name`` (default: the run that took ``checkpoint``), the call that took
    it, continued it (``passed_by`` runs of that name were other calls)."""
    taken_by = str(checkpoint.context.get("run_name") or "")
    name = run_name or taken_by
    run = f"a @run named {name!r}" if name else "a @run"
    ended = f"ended with exit status {code}" if code else "ended"
    message = (
        f"run {checkpoint.run_id} was not resumed: the program {ended} before {run} continued it "
        f"from checkpoint {checkpoint.id}. Check that the command runs the program of that run, "
        "and that it starts that run"
    )
    if passed_by:
        message += f"; {passed_by_said(passed_by, name)}"
    elif name and not run_name:
        message += "; if the run was renamed since, give its new name with --run-name"
    return message


def _resume_instead(args: argparse.Namespace, stored: list[StoredCheckpoint], checkpoint_id: str) -> str:
    """For a checkpoint that cannot be read: how to resume the one its run took before, if any
    (as ``multirun.resume`` says)."""
    earlier = earlier_checkpoint(stored, checkpoint_id)
    if earlier is None:
        return ""
    command = same_place(args, f"multirun resume {earlier.checkpoint_id}")
    return f". The checkpoint of run {earlier.run_id} before it can be resumed instead: `{command} -- ...`"


@contextlib.contextmanager
def _ctrl_c_left_to_the_child() -> Iterator[None]:
    """Ctrl-C ignored here while the child runs, as a shell ignores it while it waits: the
    terminal sends it to the child too, which ends as it chooses, and this command then exits
    as the child did (subprocess.call killed the child a quarter second after Ctrl-C, in the
    midst of sending its spans or saving its state)."""
    try:
        earlier = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not this call's to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if earlier is None else earlier)


def child_environment(args: argparse.Namespace, checkpoint_id: str, exporter: BlobExporter) -> dict[str, str]:
    """This environment, plus what makes the child's default client resume ``checkpoint_id``
    from the store the options named (``exporter``): MULTIRUN_RESUME, MULTIRUN_DIR,
    MULTIRUN_CHECKPOINT_URI, and MULTIRUN_RESUME_RUN_NAME for ``--run-name``. Folders are
    passed on absolute: the child may change folder."""
    env = dict(os.environ, **{RESUME_ENV: checkpoint_id})
    if getattr(args, "run_name", None):
        env[RESUME_RUN_NAME_ENV] = args.run_name
    if getattr(args, "dir", None):
        env["MULTIRUN_DIR"] = str(Path(args.dir).absolute())
    if getattr(args, "store", None):
        folder = exporter.directory if isinstance(exporter, FileBlobExporter) else None  # absolute
        env["MULTIRUN_CHECKPOINT_URI"] = str(folder) if folder else args.store
    return env
