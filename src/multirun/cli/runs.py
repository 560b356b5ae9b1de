"""Runs read back from span files: find them, pick one by id prefix, build its tree.

A run is a span with a ``multirun.run.id`` attribute. Its tree is every span
of its trace that descends from it: agents, steps, and the spans of other
instrumentations inside them.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

from multirun.checkpoints.resume import match_id
from multirun.client import DEFAULT_DIR
from multirun.errors import CheckpointError
from multirun.telemetry import attributes as attr
from multirun.telemetry.local_files import SpanRecord, read_spans


class RunsError(Exception):
    """A problem the command reports in one line (bad folder, unknown id, ...)."""


@dataclass
class RunSummary:
    """One run, as the ``runs`` table shows it."""

    span: SpanRecord

    @property
    def run_id(self) -> str:
        return str(self.span.attributes.get(attr.RUN_ID, ""))

    @property
    def name(self) -> str:
        name = self.span.attributes.get(attr.GEN_AI_WORKFLOW_NAME)
        return str(name) if name else self.span.name

    @property
    def status(self) -> str:
        return span_status(self.span)

    @property
    def tokens(self) -> int | None:
        return tokens(self.span)

    @property
    def cost_usd(self) -> float | None:
        return cost_usd(self.span)

    @property
    def unpriced(self) -> bool:
        return unpriced(self.span)

    @property
    def steps(self) -> int | None:
        return steps(self.span)


@dataclass
class Node:
    """A span and its children, ordered by start time."""

    span: SpanRecord
    children: list[Node] = field(default_factory=list)

    def walk(self) -> Iterable[Node]:
        """This node and every node below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


# ---------------------------------------------------------------------------
# reading


def chosen_directory(args: argparse.Namespace) -> tuple[Path, bool]:
    """The multirun folder a command uses (``--dir``, ``$MULTIRUN_DIR``, ``./.multirun``),
    and whether the user named it with ``--dir``."""
    given = getattr(args, "dir", None)
    if given:
        return Path(given), True
    return Path(os.environ.get("MULTIRUN_DIR") or DEFAULT_DIR), False


def check_directory(directory: Path) -> None:
    """RunsError unless ``directory`` exists and is a folder."""
    if not directory.exists():
        raise RunsError(f"no such directory: {directory}")
    if not directory.is_dir():
        raise RunsError(f"not a directory: {directory}")


def traces_dir(directory: str | os.PathLike[str]) -> Path:
    """The folder of span files under a multirun folder (``DIR/traces``)."""
    return Path(directory) / "traces"


def load_spans(directory: str | os.PathLike[str]) -> list[SpanRecord]:
    """Every span under ``directory/traces``, each once.

    Raises RunsError if ``directory`` is missing; an unreadable file is skipped
    with a warning, and a file with damaged lines gets one warning that sums them up.
    """
    root = Path(directory)
    check_directory(root)
    return dedupe(read_spans(traces_dir(root)))


def dedupe(spans: Iterable[SpanRecord]) -> list[SpanRecord]:
    """Keep the first copy of each (trace id, span id): two exporters may write one span twice."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for span in spans:
        key = (span.trace_id, span.span_id)
        if key not in seen:
            seen.add(key)
            unique.append(span)
    return unique


def record_from_span(span: ReadableSpan) -> SpanRecord:
    """A finished in-process span as the SpanRecord ``read_spans`` would give back."""
    context = span.get_span_context()
    assert context is not None
    return SpanRecord(
        name=span.name,
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        parent_span_id=format(span.parent.span_id, "016x") if span.parent else "",
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        attributes=dict(span.attributes or {}),
        status_code=span.status.status_code.value,
        status_message=span.status.description or "",
        events=[{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    )


# ---------------------------------------------------------------------------
# runs


def find_runs(spans: Iterable[SpanRecord]) -> list[RunSummary]:
    """The runs among ``spans``, newest first."""
    runs = [RunSummary(s) for s in spans if s.attributes.get(attr.RUN_ID)]
    runs.sort(key=lambda r: r.span.start_ns, reverse=True)
    return runs


RUNS_HINT = " (see `multirun runs`)"


def resolve(runs: Sequence[RunSummary], prefix: str) -> RunSummary:
    """The one run whose id is ``prefix``, or starts with it; RunsError if none or several."""
    try:
        run_id = match_id(prefix, (r.run_id for r in runs), "run", f"no run with id {prefix!r}{RUNS_HINT}")
    except CheckpointError as exc:
        raise RunsError(str(exc)) from None
    return next(r for r in runs if r.run_id == run_id)


def build_tree(spans: Iterable[SpanRecord], root: SpanRecord) -> Node:
    """``root`` and every span of its trace below it, children ordered by start time."""
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        if span.trace_id == root.trace_id and span.span_id != root.span_id:
            children[span.parent_span_id].append(span)
    return _subtree(root, children, set())


def _subtree(span: SpanRecord, children: dict[str, list[SpanRecord]], seen: set[str]) -> Node:
    seen.add(span.span_id)  # guards against a cycle in damaged files
    kids = sorted(children.get(span.span_id, ()), key=lambda s: (s.start_ns, s.end_ns))
    return Node(span, [_subtree(k, children, seen) for k in kids if k.span_id not in seen])


# ---------------------------------------------------------------------------
# what a span says about itself


_STATUS_KEYS = (attr.STEP_STATUS, attr.AGENT_STATUS, attr.RUN_STATUS)
_OTEL_STATUS = {0: "", 1: "ok", 2: "error"}


def span_status(span: SpanRecord) -> str:
    """completed/failed/skipped from multirun's attributes, else the OpenTelemetry status."""
    for key in _STATUS_KEYS:
        value = span.attributes.get(key)
        if value:
            return str(value)
    return _OTEL_STATUS.get(span.status_code, "")


def error_type(span: SpanRecord) -> str:
    """The error type of a failed span (``error.type``, else its exception event)."""
    value = span.attributes.get(attr.ERROR_TYPE)
    if value:
        return str(value)
    if span.status_code != 2:
        return ""
    for event in reversed(span.events):
        found = event.get("attributes", {}).get("exception.type")
        if found:
            return str(found)
    return "error"


def error_message(span: SpanRecord) -> str:
    """The message of a failed span's exception (its exception event), else its status description."""
    for event in reversed(span.events):
        attributes = event.get("attributes", {})
        if event.get("name") == "exception" and attributes.get("exception.message"):
            return str(attributes["exception.message"])
    description = span.status_message
    failure = error_type(span)
    if failure and description.startswith(f"{failure}: "):  # "RuntimeError: boom"
        return description[len(failure) + 2 :]
    return description


def resumed_from(span: SpanRecord) -> tuple[str, str] | None:
    """The run id and checkpoint id a resumed run continues, or None if it is not one."""
    run_id = span.attributes.get(attr.RUN_RESUMED_FROM)
    if not run_id:
        return None
    return str(run_id), str(span.attributes.get(attr.CHECKPOINT_ID, ""))


def checkpoint_names(spans: Iterable[SpanRecord]) -> dict[str, str]:
    """Checkpoint id to checkpoint name, from the ``multirun.checkpoint`` events of ``spans``."""
    names: dict[str, str] = {}
    for span in spans:
        for event in span.events:
            attributes: dict[str, Any] = event.get("attributes", {})
            if event.get("name") == attr.EVENT_CHECKPOINT and attributes.get(attr.CHECKPOINT_ID):
                names[str(attributes[attr.CHECKPOINT_ID])] = str(attributes.get(attr.CHECKPOINT_NAME, ""))
    return names


def retried_errors(span: SpanRecord) -> list[str]:
    """The error types of the attempts that failed and were retried."""
    found = []
    for event in span.events:
        attributes = event.get("attributes", {})
        if attr.STEP_ATTEMPT in attributes:
            found.append(str(attributes.get(attr.ERROR_TYPE) or attributes.get("exception.type")))
    return found


def attempts(span: SpanRecord) -> int:
    return _int(span.attributes.get(attr.STEP_ATTEMPT)) or 1


def tokens(span: SpanRecord) -> int | None:
    return _int(span.attributes.get(attr.TOKENS_USED))


def cost_usd(span: SpanRecord) -> float | None:
    return _float(span.attributes.get(attr.COST_USD))


def unpriced(span: SpanRecord) -> bool:
    return bool(span.attributes.get(attr.UNPRICED))


def steps(span: SpanRecord) -> int | None:
    return _int(span.attributes.get(attr.STEPS_USED))


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
