"""Text and JSON views of runs: the ``runs`` table and the tree of one run."""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from multirun.cli import runs
from multirun.cli.runs import Node, RunSummary
from multirun.telemetry import attributes as attr
from multirun.telemetry.local_files import SpanRecord

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
_STATUS_COLOR = {
    "completed": "green",
    "ok": "green",
    "failed": "red",
    "error": "red",
    "skipped": "yellow",
    "running": "yellow",
    "unfinished": "yellow",
}


@dataclass(frozen=True)
class Style:
    """ANSI colours, or none at all."""

    color: bool = False

    def paint(self, text: str, *styles: str) -> str:
        if not self.color or not text or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"

    def status(self, text: str) -> str:
        color = _STATUS_COLOR.get(text.strip())
        return self.paint(text, color) if color else text


def terminal_style() -> Style:
    """Colours only on a terminal, and never when NO_COLOR is set or the terminal is dumb
    (``TERM=dumb``: Emacs' shell, some CI logs, which show escape codes as text)."""
    isatty = getattr(sys.stdout, "isatty", None)
    tty = bool(isatty and isatty())
    return Style(color=tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")


# ---------------------------------------------------------------------------
# small formats


def format_duration(seconds: float) -> str:
    """``850ms``, ``1.25s``, ``2m05s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_cost(cost: float | None, unpriced: bool = False) -> str:
    """``$0.000123``; ``$0.000123 + unpriced`` when some usage had no known price
    (``unpriced`` if none had one); blank if there was no cost at all."""
    priced = f"${cost:.6f}" if cost else ""
    if unpriced:
        return f"{priced} + unpriced" if priced else "unpriced"
    return "" if cost is None else f"${cost:.6f}"


def plural(count: int, noun: str, shown: str | None = None) -> str:
    """``1 step``, ``10,000 steps``; ``shown`` is how to print the count, if not so."""
    return f"{f'{count:,}' if shown is None else shown} {noun}{'' if count == 1 else 's'}"


def format_tokens(count: int | None) -> str:
    return "" if count is None else f"{count:,}"


def format_time(ns: int) -> str:
    """A span start as local time, to the second."""
    return _datetime(ns).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc)


def _duration(span: SpanRecord) -> str:
    return format_duration(span.duration_s)


# ---------------------------------------------------------------------------
# text from the spans, made safe to print

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\t``, ``\\x1b``, ...).

    A name or an error message may hold any of them: raw, a newline or a tab breaks a
    table's rows, and an escape sequence reaches the terminal as a command. Direction
    overrides and lone surrogates are escaped too (terminals break no line at U+2028).
    """
    if text.isprintable():
        return text
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI_CONTROLS:
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def display_width(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide (CJK, emoji) character,
    none for a combining mark or a zero-width one, one for the others."""
    if text.isascii():
        return len(text)
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def shorten(text: str, width: int) -> str:
    """``text`` if it takes at most ``width`` columns, else its start and an ellipsis that do."""
    if display_width(text) <= width:
        return text
    kept, used = [], 1  # the ellipsis takes one
    for char in text:
        used += _char_width(char)
        if used > width:
            break
        kept.append(char)
    return "".join(kept) + "…"


def _pad(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` columns (as ljust and rjust do by characters)."""
    fill = " " * max(width - display_width(text), 0)
    return fill + text if right else text + fill


# ---------------------------------------------------------------------------
# tables


MAX_CELL_WIDTH = 48


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: set[int],
    style: Style,
    fitted: Collection[int] = (),
) -> list[str]:
    """Aligned columns (two spaces apart); ``right`` holds the indexes of right-aligned ones.

    Control characters in cells are escaped, and cells are padded by the columns they take
    on a terminal (a CJK character takes two). A cell of a padded column (all but the last)
    longer than ``MAX_CELL_WIDTH`` is cut short with an ellipsis: one long name would widen
    every line; the cells of the ``fitted`` columns are left as they are (their caller cut
    them). Colour is applied after padding, so escape codes never break the alignment.
    """
    last = len(header) - 1
    rows = [
        [
            printable(cell) if i == last or i in fitted else shorten(printable(cell), MAX_CELL_WIDTH)
            for i, cell in enumerate(row)
        ]
        for row in rows
    ]
    widths = [max(display_width(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [_join(header, widths, right, lambda i, text: style.paint(text, "bold"))]
    for row in rows:
        lines.append(_join(row, widths, right, lambda i, text: _cell_style(header[i], text, style)))
    return lines


def _join(row: Sequence[str], widths: list[int], right: set[int], paint: Callable[[int, str], str]) -> str:
    cells = []
    last = len(row) - 1
    for i, text in enumerate(row):
        if i in right:
            text = _pad(text, widths[i], right=True)
        elif i < last:  # the last column is not padded: no trailing blanks
            text = _pad(text, widths[i])
        cells.append(paint(i, text))
    return "  ".join(cells).rstrip()


def _cell_style(column: str, text: str, style: Style) -> str:
    if column == "STATUS":
        return style.status(text)
    if column == "NOTES" and "error" in text:
        return style.paint(text, "red")
    if column == "RUN ID":
        return style.paint(text, "cyan")
    return text


# ---------------------------------------------------------------------------
# the runs table


RUNS_HEADER = ("RUN ID", "NAME", "STATUS", "STARTED", "DURATION", "TOKENS", "COST")
UNKNOWN_NAME = "(unknown)"  # an unfinished run's: only its span, never written, says it


def render_runs(found: Sequence[RunSummary], style: Style, id_width: int = 12) -> list[str]:
    """One line per run, newest first, under a header."""
    rows = [
        (
            run.ref[:id_width],
            run.name or UNKNOWN_NAME,
            run.status,
            format_time(run.span.start_ns),
            _duration(run.span),
            format_tokens(run.tokens),
            format_cost(run.cost_usd, run.unpriced),
        )
        for run in found
    ]
    return table(RUNS_HEADER, rows, {4, 5, 6}, style)


def runs_json(found: Sequence[RunSummary]) -> list[dict[str, Any]]:
    return [
        {
            "run_id": run.run_id or None,
            "name": run.name or None,
            "status": run.status,
            "started_at": _datetime(run.span.start_ns).isoformat(),
            "duration_s": run.span.duration_s,
            "tokens": run.tokens,
            "cost_usd": run.cost_usd,
            "unpriced": run.unpriced,
            "steps": run.steps,
            "trace_id": run.span.trace_id,
        }
        for run in found
    ]


# ---------------------------------------------------------------------------
# the tree of one run


def run_heading(run: RunSummary, style: Style) -> list[str]:
    """A line naming the run, when it started, and its trace (to find it in a backend);
    a second one for a resumed run: where it was resumed from; for an unfinished one, why
    it looks the way it does."""
    lines = [
        f"Run {style.paint(printable(run.ref), 'cyan')} ({printable(run.name) or 'name unknown'}), "
        f"started {format_time(run.span.start_ns)}, trace {printable(run.span.trace_id)}"
    ]
    if run.unfinished:
        lines.append(
            f"{style.paint('Unfinished', 'yellow')}: its own span was never written (its process "
            "ended first, or it is still running); these are the spans that ended inside it."
        )
    resumed = runs.resumed_from(run.span)
    if resumed is not None:
        original, checkpoint_id = resumed
        lines.append(
            f"Resumed from checkpoint {printable(checkpoint_id) or '(unknown)'} of run {printable(original)}"
        )
    return lines


TREE_HEADER = ("SPAN", "STATUS", "DURATION", "TOKENS", "COST", "NOTES")


#: Spans deeper than this are not indented further: their level is written instead.
MAX_TREE_LEVELS = 24
#: The columns a span's name keeps, however deep it is (a longer one is cut short).
MIN_NAME_WIDTH = 20


def render_tree(root: Node, style: Style) -> list[str]:
    """The run's spans as a tree, one aligned line each, then a totals line."""
    rows = [_tree_row(node, prefix) for node, prefix in _with_prefixes(root)]
    lines = table(TREE_HEADER, rows, {2, 3, 4}, style, fitted={0})
    lines = [_dim_glyphs(line, style) for line in lines]
    return [*lines, "", totals_line(root, style)]


def _with_prefixes(root: Node) -> list[tuple[Node, str]]:
    """Each node with its glyphs: ``├─ `` and ``└─ `` before it, ``│  `` for open branches
    (depth first, without recursion: see ``Node.walk``)."""
    out: list[tuple[Node, str]] = []
    stack = [(root, "", "")]  # a node, its glyphs, and the indent of its children's
    while stack:
        node, prefix, indent = stack.pop()
        out.append((node, prefix))
        last = len(node.children) - 1
        for i in range(last, -1, -1):  # the first child on top
            glyphs, below = ("└─ ", "   ") if i == last else ("├─ ", "│  ")
            stack.append((node.children[i], indent + glyphs, indent + below))
    return out


def _dim_glyphs(line: str, style: Style) -> str:
    if not style.color:
        return line
    stripped = line.lstrip("│├└─ ")
    return style.paint(line[: len(line) - len(stripped)], "dim") + stripped


def _tree_row(node: Node, prefix: str) -> tuple[str, ...]:
    span = node.span
    return (
        _tree_label(prefix, span),
        runs.span_status(span),
        _duration(span),
        format_tokens(runs.tokens(span)),
        format_cost(runs.cost_usd(span), runs.unpriced(span)),
        notes(span),
    )


def _tree_label(prefix: str, span: SpanRecord) -> str:
    """The span's glyphs and its name, cut short to ``MAX_CELL_WIDTH`` as far as the name
    keeps ``MIN_NAME_WIDTH`` columns: the glyphs are never cut (cut, a deep span's cell held
    only them). Below ``MAX_TREE_LEVELS`` the level is written, ``…(30) └─ ``, not drawn."""
    levels = len(prefix) // 3  # each level's glyphs take three columns
    if levels > MAX_TREE_LEVELS:
        prefix = f"…({levels}) {prefix[-3:]}"
    room = max(MAX_CELL_WIDTH - display_width(prefix), MIN_NAME_WIDTH)
    return prefix + shorten(printable(label(span)), room)


def label(span: SpanRecord) -> str:
    """The span name, with the step's own name when the span name does not show it (as
    ``execute_tool NAME`` and ``step NAME`` do; ``chat MODEL`` does not)."""
    step_name = span.attributes.get(attr.STEP_NAME)
    if step_name and str(step_name) != span.name.partition(" ")[2]:
        return f"{span.name} ({step_name})"
    return span.name


def notes(span: SpanRecord) -> str:
    """Attempts, policy waits and fallbacks, the error of a failure, streamed chunks, unknown
    tokens, checkpoints."""
    parts = []
    count = runs.attempts(span)
    if count > 1:
        retried = ", ".join(dict.fromkeys(runs.retried_errors(span)))
        parts.append(f"attempt {count}" + (f" (retried after {retried})" if retried else ""))
    parts.extend(_policy_notes(span))
    failure = runs.error_type(span)
    if failure and runs.span_status(span) in ("failed", "error"):
        message = _one_line(runs.error_message(span))
        parts.append(f"error: {failure}: {message}" if message else f"error: {failure}")
    streamed = span.attributes.get(attr.STEP_STREAM_ITEMS)
    if isinstance(streamed, int):
        unread = span.attributes.get(attr.STEP_STREAM_UNFINISHED) is True
        parts.append(f"streamed {plural(streamed, 'chunk')}" + (", not read to its end" if unread else ""))
    if span.attributes.get(attr.USAGE_UNKNOWN) is True:
        parts.append("tokens unknown")
    for event in span.events:
        if event.get("name") == attr.EVENT_CHECKPOINT:
            name = event.get("attributes", {}).get(attr.CHECKPOINT_NAME)
            parts.append(f"checkpoint {name}" if name else "checkpoint")
    return "; ".join(parts)


def _policy_notes(span: SpanRecord) -> list[str]:
    """What the policy did to a step that ran: made it wait (for how long, by which rule),
    gave it the fallback model, or both. An abort is the step's error, noted as such."""
    decision = span.attributes.get(attr.POLICY_DECISION)
    rule = span.attributes.get(attr.POLICY_RULE)
    by = f" ({rule})" if rule else ""
    if decision == "wait":
        wait = span.attributes.get(attr.POLICY_WAIT_SECONDS)
        seconds = f" {wait:.2f}s" if isinstance(wait, (int, float)) else ""
        notes = [f"waited{seconds}{by}"]
        if attr.POLICY_FALLBACK_MODEL in span.attributes:  # its decision is the wait; the switch is noted too
            notes.append("fallback model (graceful_degradation)")
        return notes
    if decision == "fallback":
        return [f"fallback model{by}"]
    return []


def _one_line(text: str, limit: int = 80) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    first = text.strip().split("\n", 1)[0].strip()
    return first if len(first) <= limit else first[: limit - 3] + "..."


def totals_line(root: Node, style: Style) -> str:
    """Tokens, cost, steps and duration of the whole run (the roll-ups on its span)."""
    span = root.span
    tokens, steps = runs.tokens(span) or 0, runs.steps(span)
    parts = [
        plural(tokens, "token", format_tokens(tokens)),
        format_cost(runs.cost_usd(span) or 0.0, runs.unpriced(span)),
        "? steps" if steps is None else plural(steps, "step"),
        _duration(span),
    ]
    line = style.paint("total", "bold") + "  " + "  ·  ".join(parts)
    resumed = runs.resumed_from(span)
    if resumed is not None:
        line += f"  (includes the spend carried over from run {printable(resumed[0][:12])})"
    return line


def tree_json(root: Node) -> dict[str, Any]:
    """The tree as plain data: every span with its attributes and children (built without
    recursion: see ``Node.walk``)."""
    top = _span_json(root.span)
    stack = [(root, top)]
    while stack:
        node, data = stack.pop()
        for child in node.children:
            data["children"].append(child_data := _span_json(child.span))
            stack.append((child, child_data))
    return top


def _span_json(span: SpanRecord) -> dict[str, Any]:
    """One span of ``tree_json``, its children still to add."""
    return {
        "name": span.name,
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id,
        "status": runs.span_status(span),
        "started_at": _datetime(span.start_ns).isoformat(),
        "duration_s": span.duration_s,
        "tokens": runs.tokens(span),
        "cost_usd": runs.cost_usd(span),
        "unpriced": runs.unpriced(span),
        "attempts": runs.attempts(span),
        "error_type": runs.error_type(span) or None,
        "error_message": (runs.error_message(span) or None) if runs.error_type(span) else None,
        "attributes": span.attributes,
        "events": span.events,
        "children": [],
    }
