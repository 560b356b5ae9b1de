"""``multirun prune``: remove old trace files and the checkpoints of old runs.

    multirun prune --older-than DAYS [--dir DIR] [--store URI] [--dry-run]

Nothing under the multirun folder is ever removed on its own; a process that
runs for months with the embedded default fills it. This command removes:

- trace files (``DIR/traces/*.jsonl``) last written more than DAYS ago;
- every checkpoint of each run whose newest checkpoint is older than DAYS. A
  run keeps all its checkpoints or loses all of them, so a run that could
  still be resumed is never left with only some. A checkpoint whose id does not
  say when it was taken (an id multirun did not make) is kept;
- in a folder store, the temp files of checkpoint writes that a killed process
  left unfinished, last written more than DAYS ago (no checkpoint lists them),
  and never in the last hour: a write may still be going on (``--older-than 0``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from multirun.checkpoints.exporters import FileBlobExporter
from multirun.checkpoints.store import CheckpointStore, created_ns
from multirun.cli import render, runs
from multirun.cli.checkpoints import (
    CommandError,
    Interrupted,
    add_store_options,
    open_store,
    stored_checkpoints,
)
from multirun.errors import CheckpointError
from multirun.telemetry.local_files import span_files

SECONDS_PER_DAY = 86_400


def add_command(commands: Any, add_dir: Any) -> None:
    """Register ``prune`` on the top-level sub-parsers."""
    prune = commands.add_parser(
        "prune",
        help="remove trace files and checkpoints older than some days",
        description="Remove trace files last written more than DAYS ago, and every checkpoint of "
        "the runs whose newest checkpoint is older than DAYS.",
    )
    add_store_options(prune, add_dir)
    prune.add_argument(
        "--older-than",
        dest="days",
        type=_days,
        required=True,
        metavar="DAYS",
        help="age in days (a fraction will do: 0.5 is twelve hours)",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    prune.set_defaults(handler=cmd_prune)


MAX_DAYS = 1_000_000  # some 2,700 years: older than any file


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(f"must be a number of days >= 0, got {text!r}")
    if days > MAX_DAYS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DAYS:,} days, got {text!r}")
    return days


@dataclass
class Pruned:
    """What one prune removed (or would remove)."""

    trace_files: list[Path] = field(default_factory=list)
    trace_bytes: int = 0
    runs: dict[str, list[str]] = field(default_factory=dict)  # run id -> checkpoint keys
    undated: int = 0  # checkpoints kept because their id does not say when they were taken
    unfinished: list[Path] = field(default_factory=list)  # temp files of writes a killed process left
    unfinished_bytes: int = 0


def cmd_prune(args: argparse.Namespace) -> int:
    directory, named = runs.chosen_directory(args)
    if named:
        runs.check_directory(directory)
    cutoff = time.time() - args.days * SECONDS_PER_DAY
    store = open_store(args)
    pruned = Pruned()
    _old_trace_files(runs.traces_dir(directory), cutoff, pruned)
    _old_runs(store, int(cutoff * 1e9), pruned)
    if isinstance(store.exporter, FileBlobExporter):
        _unfinished_writes(store.exporter.directory, min(cutoff, time.time() - WRITE_GRACE_SECONDS), pruned)
    verb = "Would remove" if args.dry_run else "Removed"
    if args.dry_run:
        for path in pruned.trace_files:
            print(f"{verb} {path}")
        for run_id, keys in pruned.runs.items():
            print(f"{verb} run {run_id}: {render.plural(len(keys), 'checkpoint')}")
        for path in pruned.unfinished:
            print(f"{verb} {path} (a checkpoint write left unfinished)")
    else:
        try:
            _remove(store, pruned)
        except KeyboardInterrupt:
            raise Interrupted(
                "some old files were removed, not all: run it again to remove the rest"
            ) from None
    checkpoints = sum(len(keys) for keys in pruned.runs.values())
    age = f"{args.days:g} day{'' if args.days == 1 else 's'}"
    print(
        f"{verb} {render.plural(len(pruned.trace_files), 'trace file')} "
        f"({_size(pruned.trace_bytes)}) and {render.plural(checkpoints, 'checkpoint')} "
        f"of {render.plural(len(pruned.runs), 'run')}, older than {age}."
    )
    if pruned.unfinished:
        writes = render.plural(len(pruned.unfinished), "checkpoint write")
        print(f"{verb} {writes} left unfinished ({_size(pruned.unfinished_bytes)}).")
    if pruned.undated:
        print(f"Kept {render.plural(pruned.undated, 'checkpoint')} whose id does not say when it was taken.")
    return 0


def _old_trace_files(folder: Path, cutoff: float, pruned: Pruned) -> None:
    try:
        paths = span_files(folder)
    except OSError as exc:  # not "nothing to prune"
        raise CommandError(f"prune: cannot read {folder}: {exc.strerror or exc}") from None
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue  # gone meanwhile
        if not S_ISREG(stat.st_mode):
            continue  # a folder named *.jsonl is no trace file
        if stat.st_mtime < cutoff:
            pruned.trace_files.append(path)
            pruned.trace_bytes += stat.st_size


# A temp file written this recently may belong to a write still going on (a large checkpoint,
# one past its timeout that goes on in the background): removing it fails the program's checkpoint.
WRITE_GRACE_SECONDS = 3600


def _unfinished_writes(directory: Path, cutoff: float, pruned: Pruned) -> None:
    """The temp files (``.tmp-*.part``) of the folder store's writes that a killed process left,
    last written before ``cutoff``: one still being written is newer."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if name.startswith(".tmp-") and name.endswith(".part"):
                path = Path(root, name)
                try:
                    stat = path.stat()
                except OSError:
                    continue  # gone meanwhile: its write ended
                if S_ISREG(stat.st_mode) and stat.st_mtime < cutoff:
                    pruned.unfinished.append(path)
                    pruned.unfinished_bytes += stat.st_size
    pruned.unfinished.sort()


def _old_runs(store: CheckpointStore, cutoff_ns: int, pruned: Pruned) -> None:
    newest: dict[str, int] = {}
    keys: defaultdict[str, list[str]] = defaultdict(list)
    for found in stored_checkpoints(store):
        keys[found.run_id].append(CheckpointStore.key(found.run_id, found.checkpoint_id))
        created = created_ns(found.checkpoint_id)
        if created is None:
            pruned.undated += 1
            newest[found.run_id] = 2**63  # never older than anything: the run is kept
        else:
            newest[found.run_id] = max(newest.get(found.run_id, 0), created)
    pruned.runs = {run_id: keys[run_id] for run_id in sorted(keys) if newest[run_id] < cutoff_ns}


def _remove(store: CheckpointStore, pruned: Pruned) -> None:
    for path in [*pruned.trace_files, *pruned.unfinished]:  # before the checkpoints: their folder goes last
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # gone meanwhile
        except OSError as exc:  # a read-only folder: said as the checkpoints' failure is
            raise CommandError(f"prune: cannot remove {path}: {exc.strerror or exc}") from None
    for path in pruned.unfinished:
        if path.parent.parent.name == "checkpoints":
            with contextlib.suppress(OSError):  # a run's folder that held nothing else
                path.parent.rmdir()
    for run_id, keys in pruned.runs.items():
        try:
            for key in keys:
                store.exporter.delete(key)
        except CheckpointError as exc:
            raise CommandError(f"prune: cannot remove the checkpoints of run {run_id}: {exc}") from None
        if isinstance(store.exporter, FileBlobExporter):
            with contextlib.suppress(OSError):  # the run's folder, now empty, unless a file came
                (store.exporter.directory / "checkpoints" / run_id).rmdir()


def _size(count: int) -> str:
    """``512 bytes``, ``18.3 KB``, ``1.2 MB``, ``3.4 GB``."""
    if count < 1024:
        return f"{count} bytes"
    size, unit = count / 1024, "KB"
    for bigger in ("MB", "GB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"
