"""Runs read back from span files: find them, pick one by id prefix, build its tree.

A run is a span with a ``multirun.run.id`` attribute. Its tree is every span
of its trace that descends from it: agents, steps, and the spans of other
instrumentations inside them.

A run's span is written when the run ends. Until then (or for ever, if its
process died) only the spans that ended inside it are there, children of a
span that was never written. Those of one trace, if multirun wrote any of
them, make one *unfinished* run: its id is the run id its checkpoints were
saved under, if they say so, else the trace id.

Span files can be big (a long run writes hundreds of MB): ``list_runs`` reads
them a line at a time and keeps a summary per run (see ``RunFinder``), and
``trace_spans`` only the spans of the one run shown.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
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
        """This node and every node below it, depth first (without recursion, as everything
        that goes down a tree here: a run handed on hop after hop, each hop a child of the
        last, nests deeper than Python recurses)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


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
    """Every span under ``directory/traces``, each once (all in memory: see ``list_runs``).

    Raises RunsError if ``directory`` is missing, or its span folder cannot be read; an
    unreadable file is skipped with a warning, and a file with damaged lines gets one warning
    that sums them up.
    """
    return dedupe(stream_spans(directory))


def stream_spans(directory: str | os.PathLike[str], *, again: bool = False) -> Iterator[SpanRecord]:
    """Every span under ``directory/traces`` as it is read, a copy written twice included;
    errors as ``load_spans``, warnings too unless the files are read ``again``."""
    root = Path(directory)
    check_directory(root)
    try:
        yield from read_spans(traces_dir(root), warn=not again)
    except OSError as exc:
        raise RunsError(f"cannot read {traces_dir(root)}: {exc.strerror or exc}") from None


def list_runs(directory: str | os.PathLike[str]) -> list[RunSummary]:
    """The runs under ``directory/traces``, unfinished ones included, newest first, read
    without keeping the spans (see ``RunFinder``)."""
    finder = RunFinder()
    for span in stream_spans(directory):
        finder.add(span)
    return finder.runs(lambda: stream_spans(directory, again=True))


def trace_spans(directory: str | os.PathLike[str], run: RunSummary) -> list[SpanRecord]:
    """The spans of ``run``'s trace under ``directory/traces`` (which ``list_runs`` read), each
    once: only those are kept."""
    trace_id = run.span.trace_id
    return dedupe(span for span in stream_spans(directory, again=True) if span.trace_id == trace_id)


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
    finder = RunFinder()
    for span in spans:
        finder.add(span)
    return finder.runs(lambda: spans)


_CLOSED_BITS = 1 << 20


class RunFinder:
    """Finds the runs among spans given one at a time, keeping a summary per run, not the spans.

    A finished run is its run span, kept. An unfinished run is, per trace, the spans whose
    parent, a span of the same process, was never written (its *tops*), when multirun wrote at
    least one of them or of the spans below them. To find those without keeping every span,
    the spans of a trace are joined into trees through their parent links as they come
    (``_Tree``: a top, and what the run needs of the spans below it). A tree whose top has no
    parent is a whole trace, or its finished part, and is forgotten: the spans kept are the
    tops of the trees still open, those of runs whose process died or had not ended yet.

    A span whose parent is in a forgotten tree (one written by a thread that outlived its run,
    say) cannot be told from an orphan then: ``runs`` reads the spans again to tell, only when
    there are such spans, and keeps only their parents' ids from that reading.
    """

    def __init__(self) -> None:
        self._finished: list[RunSummary] = []
        self._run_spans: set[tuple[str, str]] = set()  # (trace id, span id): each run once
        self._traces: dict[str, _Trace] = {}  # the traces with open trees
        # A bit per hash of the id of a trace with none left (a web server's requests, a trace
        # each, made a _Trace kept each): one bit tells that a later span's parent may be
        # there, as forgot_some; another id of the same bit costs at most a reading again.
        self._closed = bytearray(_CLOSED_BITS // 8)
        self._read = 0

    def add(self, span: SpanRecord) -> None:
        """Take the next span (a copy of one already taken, as two exporters write, is ignored)."""
        if span.attributes.get(attr.RUN_ID) and (span.trace_id, span.span_id) not in self._run_spans:
            self._run_spans.add((span.trace_id, span.span_id))
            self._finished.append(RunSummary(span))
        trace = self._traces.get(span.trace_id)
        if trace is None:
            trace = self._traces[span.trace_id] = _Trace()
            bit = hash(span.trace_id) % _CLOSED_BITS
            trace.forgot_some = bool(self._closed[bit >> 3] & (1 << (bit & 7)))
        trace.add(span, self._read)
        self._read += 1
        if not trace.trees and not trace.waiting:
            del self._traces[span.trace_id]
            bit = hash(span.trace_id) % _CLOSED_BITS
            self._closed[bit >> 3] |= 1 << (bit & 7)

    def runs(self, read_again: Callable[[], Iterable[SpanRecord]]) -> list[RunSummary]:
        """The runs found, unfinished ones included, newest first; ``read_again`` gives the same
        spans again, should some parents need looking for."""
        looked_for = {
            trace_id: trace.orphan_parents() for trace_id, trace in self._traces.items() if trace.forgot_some
        }
        looked_for = {trace_id: parents for trace_id, parents in looked_for.items() if parents}
        written = _written(looked_for, read_again()) if looked_for else {}
        known_ids = {run.run_id for run in self._finished}
        found = list(self._finished)
        for trace_id, trace in self._traces.items():
            tops = trace.orphans(written.get(trace_id, set()))
            if any(tree.by_multirun for tree in tops):  # else another instrumentation's spans
                found.append(RunSummary(_stand_in(trace_id, tops, known_ids), [tree.top for tree in tops]))
        found.sort(key=lambda run: run.span.start_ns, reverse=True)
        return found


@dataclass(eq=False)
class _Tree:
    """Spans of one trace joined through their parent links: ``top``, whose parent was not read
    (yet), and the ids of the spans in it, with what an unfinished run's stand-in needs of them."""

    top: SpanRecord
    read: int  # when its top was read: an unfinished run's tops are in that order
    span_ids: list[str]
    by_multirun: bool  # whether multirun wrote one of its spans
    checkpoint_runs: set[str]  # the run ids its spans' checkpoints were saved under
    start_ns: int
    end_ns: int

    @classmethod
    def of(cls, span: SpanRecord, read: int) -> _Tree:
        by_multirun = any(key.startswith("multirun.") for key in span.attributes)
        return cls(
            span, read, [span.span_id], by_multirun, _checkpoint_runs(span), span.start_ns, span.end_ns
        )

    def take(self, other: _Tree) -> None:
        """Add the spans of ``other``, a tree whose top is a child of one of these spans."""
        self.span_ids += other.span_ids
        self.by_multirun = self.by_multirun or other.by_multirun
        self.checkpoint_runs |= other.checkpoint_runs
        self.start_ns = min(self.start_ns, other.start_ns)
        self.end_ns = max(self.end_ns, other.end_ns)


class _Trace:
    """The open trees of one trace, as ``RunFinder`` reads its spans."""

    def __init__(self) -> None:
        self.trees: dict[str, _Tree] = {}  # span id -> the tree it is in
        self.waiting: dict[str, list[_Tree]] = {}  # a parent not read (yet) -> the trees below it
        self.forgot_some = False

    def add(self, span: SpanRecord, read: int) -> None:
        if span.span_id in self.trees:
            return  # a second copy
        tree = _Tree.of(span, read)
        self.trees[span.span_id] = tree
        for child in self.waiting.pop(span.span_id, ()):
            self._join(tree, child)
        parent = self.trees.get(span.parent_span_id) if span.parent_span_id else None
        if parent is not None:
            self._join(parent, tree)
        elif span.parent_span_id:
            self.waiting.setdefault(span.parent_span_id, []).append(tree)
        else:
            self._forget(tree)  # nothing above it: no unfinished run in it

    def orphan_parents(self) -> set[str]:
        """The parents that trees whose top may be an orphan's wait for."""
        return {
            parent_id for parent_id, trees in self.waiting.items() if any(_may_be_orphan(t) for t in trees)
        }

    def orphans(self, written: Collection[str]) -> list[_Tree]:
        """The trees whose top is an orphan, in the order their tops were read; ``written``: the
        parents they wait for that were found written after all."""
        found = [
            tree
            for parent_id, trees in self.waiting.items()
            if parent_id not in written
            for tree in trees
            if _may_be_orphan(tree)
        ]
        return sorted(found, key=lambda tree: tree.read)

    def _join(self, parent: _Tree, child: _Tree) -> None:
        if child is parent:  # a cycle, in a damaged file
            return
        parent.take(child)
        for span_id in child.span_ids:
            self.trees[span_id] = parent

    def _forget(self, tree: _Tree) -> None:
        for span_id in tree.span_ids:
            del self.trees[span_id]
        if not self.trees:  # a dict keeps its size when emptied, and a long trace's was big
            self.trees = {}
        if not self.waiting:
            self.waiting = {}
        self.forgot_some = True


def _may_be_orphan(tree: _Tree) -> bool:
    """Whether the top of ``tree``, if its parent was never written, makes an unfinished run:
    a span whose parent is in another process (a run continued from a message) does not;
    neither does a run span whose file does not say where its parent was, nor a run span
    that is no sub-run: its parent is the program's own span (a server's request, still open)."""
    top = tree.top
    if top.attributes.get(attr.RUN_ID):  # only a sub-run's parent is a run's span
        return top.parent_is_remote is False and bool(top.attributes.get(attr.RUN_PARENT_ID))
    return not top.parent_is_remote


def _written(parents: dict[str, set[str]], spans: Iterable[SpanRecord]) -> dict[str, set[str]]:
    """Of ``parents`` (span ids by trace id), those that are among ``spans``."""
    found: dict[str, set[str]] = defaultdict(set)
    for span in spans:
        if span.span_id in parents.get(span.trace_id, ()):
            found[span.trace_id].add(span.span_id)
    return found


_CHECKPOINT_KEY = re.compile(r"checkpoints/([^/]+)/([^/]+)\.ckpt\Z")


def _checkpoint_runs(span: SpanRecord) -> set[str]:
    """The run ids the checkpoints of ``span`` were saved under (from their key)."""
    run_ids = set()
    for event in span.events:
        said = event.get("attributes", {})
        key = _CHECKPOINT_KEY.search(str(said.get(attr.CHECKPOINT_URI, "")))
        if (
            event.get("name") == attr.EVENT_CHECKPOINT
            and key
            and key.group(2) == said.get(attr.CHECKPOINT_ID)
        ):
            run_ids.add(key.group(1))  # saved under checkpoints/<run id>/<checkpoint id>.ckpt
    return run_ids


def _stand_in(trace_id: str, trees: list[_Tree], known_ids: Collection[str]) -> SpanRecord:
    """A span in place of the run span that was never written, above the trees of ``trees``."""
    tops = [tree.top for tree in trees]
    run_ids = set().union(*(tree.checkpoint_runs for tree in trees))
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
        start_ns=min(tree.start_ns for tree in trees),
        end_ns=max(tree.end_ns for tree in trees),
        attributes=attributes,
        service_name=tops[0].service_name,
    )


def resolve(runs: Sequence[RunSummary], prefix: str, listing: str = "multirun runs") -> RunSummary:
    """The one run whose id (or, for an unfinished run of unknown id, trace id) is ``prefix``,
    or starts with it, or whose whole trace id it is (as Jaeger shows it); RunsError if none
    or several, which suggests the command ``listing``."""
    trace_id = prefix.strip().lower()
    in_trace = [r for r in runs if r.span.trace_id == trace_id]
    if len(in_trace) == 1:
        return in_trace[0]
    if in_trace:
        raise RunsError(
            f"trace {trace_id} holds {len(in_trace)} runs: "
            + ", ".join(f"{r.ref[:12]} ({r.name or 'unfinished'})" for r in in_trace)
            + "; give one's id"
        )
    try:
        ref = match_id(prefix, (r.ref for r in runs), "run", f"no run with id {prefix!r} (see `{listing}`)")
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
    """``span`` and the spans below it (see ``Node.walk``: without recursion)."""
    top = Node(span)
    seen.add(span.span_id)  # guards against a cycle in damaged files
    stack = [top]
    while stack:
        node = stack.pop()
        for kid in sorted(children.get(node.span.span_id, ()), key=lambda s: (s.start_ns, s.end_ns)):
            if kid.span_id not in seen:
                seen.add(kid.span_id)
                node.children.append(Node(kid))
        stack.extend(node.children)
    return top


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
