"""The ``multirun`` console script.

A module of its own, outside the ``multirun`` package: importing anything in that package
imports all of it first, a third of a second in which Ctrl-C ended the command with a
traceback of the import. Here Ctrl-C then ends it as at any other time: one line, status 130.
(``python -m multirun`` imports the package before it can do anything.)
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # as a shell reports a command that Ctrl-C (SIGINT) ended


def main() -> int:
    """Run the ``multirun`` command line (``sys.argv``); returns the exit status."""
    try:
        from multirun.cli.main import main as command

        return command()
    except KeyboardInterrupt:  # before the command handles Ctrl-C itself
        print("multirun: interrupted", file=sys.stderr)
        return INTERRUPTED
