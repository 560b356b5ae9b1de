"""Runs read back from span files: find them, pick one by id prefix, build its tree.

A run is a span with a ``multirun.run.id`` attribute. Its tree is every span
of its trace that descends from it: agents, steps, and the spans of other
instrumentations inside them.

A run's span is written when the run ends. Until then (or for ever, if its
process died) only the spans that ended inside it are there, children of a
span that was never written. Those of one trace, if multirun wrote any of
them, make one *unfinished* run: its id is the run id its checkpoints were
saved under, if they say so, else the trace id.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
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


UNFINISHED = "unfinished"


@dataclass
class RunSummary:
    """One run, as the ``runs`` table shows it.

    For an unfinished run, ``span`` stands in for the run span that was never written
    (no span id; its times, tokens and cost are those of the spans below it that were)
    and ``tops`` holds those spans whose parent was never written.
    """

    span: SpanRecord
    tops: list[SpanRecord] | None = None

    @property
    def unfinished(self) -> bool:
        return self.tops is not None

    @property
    def run_id(self) -> str:
        """The run id ("" for an unfinished run whose checkpoints do not say it)."""
        return str(self.span.attributes.get(attr.RUN_ID, ""))

    @property
    def ref(self) -> str:
        """What ``runs show`` takes: the run id, else (an unfinished run) the trace id."""
        return self.run_id or self.span.trace_id

    @property
    def name(self) -> str:
        """The run's name ("" for an unfinished run: only its span says it)."""
        if self.unfinished:
            return ""
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
    try:
        is_dir = stat.S_ISDIR(directory.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise RunsError(f"no such directory: {directory}") from None
    except OSError as exc:
        raise RunsError(f"cannot read {directory}: {exc.strerror or exc}") from None
    if not is_dir:
        raise RunsError(f"not a directory: {directory}")


def exists(path: Path) -> bool:
    """Whether ``path`` exists; True if that cannot be told (the error is for the reading to say)."""
    try:
        return path.exists()
    except OSError:
        return True


def traces_dir(directory: str | os.PathLike[str]) -> Path:
    """The folder of span files under a multirun folder (``DIR/traces``)."""
    return Path(directory) / "traces"


def load_spans(directory: str | os.PathLike[str]) -> list[SpanRecord]:
    """Every span under ``directory/traces``, each once.

    Raises RunsError if ``directory`` is missing, or its span folder cannot be read; an
    unreadable file is skipped with a warning, and a file with damaged lines gets one warning
    that sums them up.
    """
    root = Path(directory)
    check_directory(root)
    try:
        return dedupe(read_spans(traces_dir(root)))
    except OSError as exc:
        raise RunsError(f"cannot read {traces_dir(root)}: {exc.strerror or exc}") from None


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
        parent_is_remote=span.parent.is_remote if span.parent else None,
        events=[{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    )


# ---------------------------------------------------------------------------
# runs


def find_runs(spans: Iterable[SpanRecord]) -> list[RunSummary]:
    """The runs among ``spans``, unfinished ones included, newest first."""
    spans = list(spans)
    runs = [RunSummary(s) for s in spans if s.attributes.get(attr.RUN_ID)]
    runs += unfinished_runs(spans, {r.run_id for r in runs})
    runs.sort(key=lambda r: r.span.start_ns, reverse=True)
    return runs


def unfinished_runs(spans: Sequence[SpanRecord], known_ids: Collection[str] = ()) -> list[RunSummary]:
    """The unfinished runs among ``spans``: per trace, the spans whose parent, a span of the same
    process, was never written, when multirun wrote at least one of them or of the spans below.

    A span whose parent is in another process (a run continued from a message) is no orphan;
    neither is a run span whose file does not say where its parent was.
    """
    by_trace: dict[str, dict[str, SpanRecord]] = defaultdict(dict)
    for span in spans:
        by_trace[span.trace_id].setdefault(span.span_id, span)
    found = []
    for trace_id, members in by_trace.items():
        tops = [s for s in members.values() if _parent_never_written(s, members)]
        if not tops:
            continue
        children: dict[str, list[SpanRecord]] = defaultdict(list)
        for span in members.values():
            children[span.parent_span_id].append(span)
        below = [node.span for top in tops for node in _subtree(top, children, set()).walk()]
        if not any(key.startswith("multirun.") for span in below for key in span.attributes):
            continue  # another instrumentation's spans
        found.append(RunSummary(_stand_in(trace_id, tops, below, known_ids), tops))
    return found


def _parent_never_written(span: SpanRecord, members: dict[str, SpanRecord]) -> bool:
    if not span.parent_span_id or span.parent_span_id in members:
        return False
    if span.parent_is_remote is None:  # the file does not say where the parent was
        return not span.attributes.get(attr.RUN_ID)  # a run's may well be in another process
    return not span.parent_is_remote


_CHECKPOINT_KEY = re.compile(r"checkpoints/([^/]+)/([^/]+)\.ckpt\Z")


def _stand_in(
    trace_id: str, tops: list[SpanRecord], below: list[SpanRecord], known_ids: Collection[str]
) -> SpanRecord:
    """A span in place of the run span that was never written."""
    run_ids = set()
    for span in below:
        for event in span.events:
            said = event.get("attributes", {})
            key = _CHECKPOINT_KEY.search(str(said.get(attr.CHECKPOINT_URI, "")))
            if (
                event.get("name") == attr.EVENT_CHECKPOINT
                and key
                and key.group(2) == said.get(attr.CHECKPOINT_ID)
            ):
                run_ids.add(key.group(1))  # saved under checkpoints/<run id>/<checkpoint id>.ckpt
    attributes: dict[str, Any] = {attr.RUN_STATUS: UNFINISHED}
    if len(run_ids) == 1 and run_ids.isdisjoint(known_ids):
        attributes[attr.RUN_ID] = run_ids.pop()
    counted = [n for n in (tokens(top) for top in tops) if n is not None]
    if counted:
        attributes[attr.TOKENS_USED] = sum(counted)
    costs = [c for c in (cost_usd(top) for top in tops) if c is not None]
    if costs:
        attributes[attr.COST_USD] = sum(costs)
    if any(unpriced(top) for top in tops):
        attributes[attr.UNPRICED] = True
    return SpanRecord(
        name="(unfinished run)",
        trace_id=trace_id,
        span_id="",
        parent_span_id="",
        start_ns=min(s.start_ns for s in below),
        end_ns=max(s.end_ns for s in below),
        attributes=attributes,
        service_name=tops[0].service_name,
    )


RUNS_HINT = " (see `multirun runs`)"


def resolve(runs: Sequence[RunSummary], prefix: str) -> RunSummary:
    """The one run whose id (or, for an unfinished run of unknown id, trace id) is ``prefix``,
    or starts with it; RunsError if none or several."""
    try:
        ref = match_id(prefix, (r.ref for r in runs), "run", f"no run with id {prefix!r}{RUNS_HINT}")
    except CheckpointError as exc:
        raise RunsError(str(exc)) from None
    return next(r for r in runs if r.ref == ref)


def run_tree(spans: Iterable[SpanRecord], run: RunSummary) -> Node:
    """The tree of ``run``: its span and every span below it; for an unfinished run, the
    stand-in of its span with the spans whose parent was never written below it."""
    if run.tops is None:
        return build_tree(spans, run.span)
    children = _children(spans, run.span.trace_id, "")
    seen: set[str] = set()
    tops = sorted(run.tops, key=lambda s: (s.start_ns, s.end_ns))
    return Node(run.span, [_subtree(top, children, seen) for top in tops])


def build_tree(spans: Iterable[SpanRecord], root: SpanRecord) -> Node:
    """``root`` and every span of its trace below it, children ordered by start time."""
    return _subtree(root, _children(spans, root.trace_id, root.span_id), set())


def _children(spans: Iterable[SpanRecord], trace_id: str, root_id: str) -> dict[str, list[SpanRecord]]:
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        if span.trace_id == trace_id and span.span_id != root_id:
            children[span.parent_span_id].append(span)
    return children


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
    number = _number(value)
    return None if number is None else int(number)


def _float(value: object) -> float | None:
    number = _number(value)
    return None if number is None else float(number)


def _number(value: object) -> int | float | None:
    """``value`` if it is a number (NaN and the infinities are none), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
