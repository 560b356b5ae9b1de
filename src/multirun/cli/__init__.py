"""The ``multirun`` command: run the demo, list runs, show one run as a tree."""

from __future__ import annotations

from multirun.cli.main import main

__all__ = ["main"]
