"""``multirun checkpoints`` and ``multirun resume``: the checkpoint store from the command line.

    multirun checkpoints [--run RUN_ID]      list checkpoints, newest last
    multirun checkpoints show ID             one checkpoint: run, name, size, state keys, replay log
    multirun checkpoints verify [ID ...]     read and verify digests (all when no ID is given)
    multirun resume [--dir DIR] RUN_OR_CHECKPOINT_ID -- python my_agent.py ...

Options of ``resume`` come before the id: everything after the id is the command.

The store is ``--store URI``, else ``$MULTIRUN_CHECKPOINT_URI``, else DIR/blobs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from multirun.checkpoints.exporters import exporter_from_uri
from multirun.checkpoints.resume import RESUME_ENV, load_for_resume
from multirun.checkpoints.store import CheckpointStore
from multirun.client import DEFAULT_DIR
from multirun.errors import CheckpointError, MultiRunError, ReplayError


def add_commands(commands: Any, add_dir: Any) -> None:
    """Register ``checkpoints`` and ``resume`` on the top-level sub-parsers."""
    listing = commands.add_parser("checkpoints", help="list, show or verify checkpoints")
    _add_store(listing, add_dir)
    listing.add_argument("--run", dest="run_id", metavar="RUN_ID", help="only this run's checkpoints")
    listing.set_defaults(handler=cmd_list)
    sub = listing.add_subparsers(title="commands", metavar="COMMAND")
    show = sub.add_parser("show", help="one checkpoint: run, name, size, state keys, replay log")
    show.add_argument("checkpoint_id", metavar="ID")
    _add_store(show, add_dir, argparse.SUPPRESS)
    show.set_defaults(handler=cmd_show)
    verify = sub.add_parser("verify", help="read every checkpoint (or the ones named) and check it")
    verify.add_argument("checkpoint_ids", nargs="*", metavar="ID")
    _add_store(verify, add_dir, argparse.SUPPRESS)
    verify.set_defaults(handler=cmd_verify)

    resume = commands.add_parser(
        "resume",
        help="run a command whose first @run continues a run from its last checkpoint",
        description="Run COMMAND with MULTIRUN_RESUME set: its first @run continues the run "
        "(or checkpoint) ID, serving the steps it had completed from the checkpoint.",
    )
    _add_store(resume, add_dir)
    resume.add_argument(
        "identifier", metavar="ID", help="a run id (its newest checkpoint) or a checkpoint id"
    )
    resume.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the program to run")
    resume.set_defaults(handler=cmd_resume)


def _add_store(parser: argparse.ArgumentParser, add_dir: Any, default: Any = None) -> None:
    add_dir(parser, default)
    parser.add_argument(
        "--store",
        default=default,
        metavar="URI",
        help="the checkpoint store (default: $MULTIRUN_CHECKPOINT_URI, else DIR/blobs)",
    )


def _store(args: argparse.Namespace) -> CheckpointStore:
    uri = getattr(args, "store", None) or os.environ.get("MULTIRUN_CHECKPOINT_URI")
    if not uri:
        directory = getattr(args, "dir", None) or os.environ.get("MULTIRUN_DIR") or DEFAULT_DIR
        uri = str(Path(directory) / "blobs")
    try:
        return CheckpointStore(exporter_from_uri(uri))
    except MultiRunError as exc:
        raise CommandError(str(exc)) from None


class CommandError(Exception):
    """A message for the user; the command exits 1."""


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    keys = _call(store.list, args.run_id)
    if not keys:
        print("No checkpoints" + (f" of run {args.run_id}" if args.run_id else "") + ".")
        return 0
    rows = []
    for key in keys:
        _, run_id, name = key.split("/", 2)
        rows.append((run_id, name.removesuffix(".ckpt")))
    width = max(len(run) for run, _ in rows)
    print(f"{'RUN':<{width}}  CHECKPOINT")
    for run_id, checkpoint_id in rows:
        print(f"{run_id:<{width}}  {checkpoint_id}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    restored = _call(_store(args).load, args.checkpoint_id)
    meta = restored.checkpoint
    cached = sum(1 for record in restored.replay if "result" in record)
    lines = [
        ("checkpoint", meta.id),
        ("run", f"{meta.run_id} ({meta.context.get('run_name', '')})"),
        ("name", meta.name),
        ("created", meta.created_at.isoformat()),
        ("size", f"{meta.size_bytes} bytes"),
        ("key", restored.uri),
        ("state keys", ", ".join(sorted(restored.state)) or "(none)"),
        ("replay log", f"{len(restored.replay)} steps, {cached} with a result to serve"),
        ("spend", f"{restored.ledger.get('tokens', 0)} tokens, {restored.ledger.get('steps', 0)} steps"),
        ("trace", restored.trace.get("trace_id", "(unknown)")),
    ]
    for label, value in lines:
        print(f"{label:<11} {value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    ids = args.checkpoint_ids or [key.rsplit("/", 1)[-1].removesuffix(".ckpt") for key in _call(store.list)]
    failed = 0
    for checkpoint_id in ids:
        try:
            store.load(checkpoint_id)
        except (CheckpointError, ReplayError) as exc:
            failed += 1
            print(f"FAILED  {checkpoint_id}: {exc}")
        else:
            print(f"ok      {checkpoint_id}")
    print(f"{len(ids) - failed} ok, {failed} failed")
    return 1 if failed else 0


def cmd_resume(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CommandError(
            "resume: give the program to run after --, e.g. multirun resume ID -- python agent.py"
        )
    store = _store(args)
    restored = _call(load_for_resume, store, args.identifier)
    env = dict(os.environ, **{RESUME_ENV: restored.checkpoint.id})
    if getattr(args, "store", None):
        env["MULTIRUN_CHECKPOINT_URI"] = args.store
    print(
        f"resuming run {restored.checkpoint.run_id} from checkpoint {restored.checkpoint.id} "
        f"({restored.checkpoint.name})",
        file=sys.stderr,
    )
    try:
        return subprocess.call(command, env=env)
    except OSError as exc:
        raise CommandError(f"resume: cannot run {command[0]!r}: {exc}") from None


def _call(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except (CheckpointError, ReplayError) as exc:
        raise CommandError(str(exc)) from None
