"""Write the README's performance table from ``benchmarks/results/``.

Usage (``run.py`` calls it after the benchmarks)::

    .venv/bin/python benchmarks/readme_table.py [--update-readme]

Reads ``results/peers.json`` and ``results/scaling.json`` (written by
``peers/bench_peers.py`` and ``bench_scaling.py``) and the markdown tables of
``overhead.md``, ``ledger.md``, ``memory.md`` and ``checkpoint.md``, and writes
``results/README-table.md``: the machine and date, every variant's median and
ratio, and each target of the performance issue with what was measured and,
where it is missed, by how much. A result file that is missing shows as *not
measured*. With ``--update-readme``, the same text also replaces what stands
between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` in the
project's README.md, when both markers are there (nothing else is touched).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
FLAT_TOLERANCE = 0.10  # "independent of ... within noise": the ratio moves by at most 10%
MODES = (("sync", "sync"), ("async", "async"), ("gen", "generator"))


def tables(path: Path) -> list[list[dict[str, str]]]:
    """Every markdown table of a file, as rows of {header: cell}."""
    if not path.exists():
        return []
    found: list[list[dict[str, str]]] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*:?-{3}", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=False)))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def header_lines(path: Path) -> list[str]:
    """The ``- Date:`` ... ``- Command:`` lines at the top of a result file."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines()[:12] if line.startswith("- ")]


def number(text: str) -> float | None:
    match = re.search(r"[-+]?\d[\d,]*\.?\d*", text.replace("**", ""))
    return float(match.group().replace(",", "")) if match else None


def load_json(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def status(met: bool | None, missed: str = "") -> str:
    if met is None:
        return "not measured"
    return "met" if met else f"**missed**: {missed}"


# ---------------------------------------------------------------------------


def peers_section(peers: dict[str, Any] | None, targets: list[list[str]]) -> list[str]:
    if peers is None:
        targets.append(["`@step` at most 1.3x a bare span (Budget + Policy on)", "—", "not measured"])
        targets.append(["at least 1.5x cheaper than the cheapest peer", "—", "not measured"])
        return ["Side by side with the peers: not measured (`benchmarks/peers/bench_peers.py`).", ""]
    labels = peers.get("labels", {})
    modes = peers["modes"]
    # rows: plain, reference, multirun, then peers by their sync median
    keys: list[tuple[str, str]] = []
    for mode, _ in MODES:
        for row in modes.get(mode, []):
            key = (row["peer"], row["kind"])
            if row["kind"] == "bare" or key in keys:
                continue
            keys.append(key)

    def order(key: tuple[str, str]) -> tuple[int, float]:
        peer, kind = key
        rank = {"plain": 0, "reference": 1, "child": 2}.get(kind, 3 if peer == "multirun" else 4)
        sync = next((r for r in modes.get("sync", []) if (r["peer"], r["kind"]) == key), None)
        return rank, sync["median_us"] if sync else 1e9

    keys.sort(key=order)
    rows = []
    for peer, kind in keys:
        if kind == "plain":
            name = "plain call, no tracing"
        elif kind == "reference":
            name = "bare span (`start_as_current_span`, SDK + BatchSpanProcessor)"
        elif kind == "child":
            name = "bare span inside a parent span (as a step is inside its run)"
        elif peer == "multirun":
            name = "**multirun-otel** `@step` in a `@run` with Budget + Policy"
        else:
            name = labels.get(peer, peer)
        cells = [name]
        for mode, _ in MODES:
            row = next((r for r in modes.get(mode, []) if (r["peer"], r["kind"]) == (peer, kind)), None)
            if row is None:
                cells.append("—")
            elif kind in ("plain", "reference"):
                cells.append(f"{row['median_us']:.1f}" + (" (1x)" if kind == "reference" else ""))
            else:
                text = f"{row['median_us']:.1f} ({row['ratio_to_bare']:.2f}x)"
                cells.append(f"**{text}**" if peer == "multirun" else text)
        rows.append(cells)
    versions = peers.get("versions", {})
    decorators = {
        "traceloop": "`@task()`",
        "langfuse": "`@observe`",
        "logfire": "`@logfire.instrument()`",
        "openlit": "`@openlit.trace`",
        "agentops": "`@agentops.task`",
    }
    for i, (peer, kind) in enumerate(keys):
        if peer in decorators and kind == "peer":
            package = next((v for k, v in versions.get(peer, {}).items() if k != "opentelemetry-sdk"), "")
            rows[i][0] = f"{labels.get(peer, peer)} {package} {decorators[peer]}"
    lines = [
        f"µs per call, median of {peers['rounds']} interleaved rounds of {peers['batch']:,} calls; in "
        "brackets the ratio to a bare span measured in the same rounds (median of per-round ratios). "
        "Each peer in its own virtual environment, exporting to a counting exporter, no network "
        "(`benchmarks/results/peers.md`):",
        "",
        "| decorator | sync | async | generator |",
        "|---|---:|---:|---:|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
    ]
    for skipped, why in {**peers.get("skipped", {}), **peers.get("failed", {})}.items():
        lines.append(f"- {labels.get(skipped, skipped)}: not measured ({why}).")
    for target in peers.get("targets", []):  # their text already names the mode
        targets.append([target["what"], target["measured"], status(target["met"], target["by"])])
    return lines


def overhead_section(targets: list[list[str]]) -> list[str]:
    found = tables(RESULTS / "overhead.md")
    if not found:
        return ["In-process detail: not measured (`benchmarks/bench_overhead.py`).", ""]
    rows = []
    for row in found[0]:
        rows.append(
            f"| {row.get('variant', '?')} | {row.get('median µs/call', '?')} | "
            f"{row.get('ratio (paired median)', '?')} | {row.get('compared with', '')} |"
        )
    return [
        "In one process, every variant on one provider (`benchmarks/results/overhead.md`):",
        "",
        "| variant | median µs/call | ratio (paired) | compared with |",
        "|---|---:|---:|---|",
        *rows,
        "",
    ]


def local_files_section() -> list[str]:
    """The embedded default's exporter: encoding cost, and spans a fast loop lost."""
    found = tables(RESULTS / "local_files.md")
    if len(found) < 2:
        return []
    encoders = {row.get("encoder"): row for row in found[0]}
    ours, library = encoders.get("otlp_json"), encoders.get("library route")
    if ours is None or library is None:
        return []
    outcomes = [f"{row.get('lost', '?')} of {row.get('spans made', '?')} spans" for row in found[1]]
    if len(set(outcomes)) == 1 and len(outcomes) > 1:
        lost = f"{outcomes[0]}, in each of {len(outcomes)} repeats,"
    else:
        lost = ", ".join(outcomes)
    return [
        "Embedded default (`benchmarks/results/local_files.md`): encoding a batch as OTLP JSON costs "
        f"{ours.get('median µs/span', '?')} µs per span ({ours.get('ratio to the library route', '?')} "
        f"the OTLP exporter's protobuf encoder plus `MessageToDict`, {library.get('median µs/span', '?')} "
        f"µs); a tight loop of runs with `init_local()` lost {lost} to the export queue.",
        "",
    ]


def scaling_targets(scaling: dict[str, Any] | None, targets: list[list[str]]) -> None:
    sections = (scaling or {}).get("sections", {})
    length = sections.get("length")
    short = sections.get("short_runs")
    if short and short.get("rows"):
        ratios = [r["vs_bare"] for r in short["rows"]]
        drift = max(ratios) / min(ratios) - 1
        first, last = short["rows"][0], short["rows"][-1]
        targets.append(
            [
                "per-step overhead independent of run length (whole short runs, run end included)",
                f"`@step` / bare {first['vs_bare']:.2f}x in runs of {first['length']:,} steps, "
                f"{last['vs_bare']:.2f}x in runs of {last['length']:,}",
                status(
                    drift <= FLAT_TOLERANCE, f"moves by {drift * 100:.0f}% (tolerance {FLAT_TOLERANCE:.0%})"
                ),
            ]
        )
    if length and length.get("rows"):
        ratios = [r["vs_fresh"] for r in length["rows"]]
        longest = length["rows"][-1]
        worst = max(abs(r - 1) for r in ratios)
        targets.append(
            [
                "per-step overhead independent of run length (inside one run of up to 1,000,000 steps)",
                f"long run / fresh run {min(ratios):.2f}x - {max(ratios):.2f}x from "
                f"{length['rows'][0]['measured_from']:,} to {longest['steps_in_run']:,} steps",
                status(
                    worst <= FLAT_TOLERANCE,
                    f"{worst * 100:.0f}% off a fresh run (tolerance {FLAT_TOLERANCE:.0%})",
                ),
            ]
        )
    if not (length and length.get("rows")) and not (short and short.get("rows")):
        targets.append(["per-step overhead independent of run length", "—", "not measured"])
    for key, what in (("asyncio", "asyncio tasks"), ("threads", "threads")):
        data = sections.get(key)
        if not data or not data.get("rows"):
            targets.append([f"independent of concurrent runs ({what})", "—", "not measured"])
            continue
        ratios = [r["vs_bare"] for r in data["rows"]]
        base = ratios[0]
        drift = max(abs(r / base - 1) for r in ratios)
        targets.append(
            [
                f"per-step overhead independent of concurrent runs ({what})",
                f"`@step` / bare {min(ratios):.2f}x - {max(ratios):.2f}x over "
                f"{data['rows'][0]['n']:,} - {data['rows'][-1]['n']:,} {what}",
                status(
                    drift <= FLAT_TOLERANCE, f"moves by {drift * 100:.0f}% (tolerance {FLAT_TOLERANCE:.0%})"
                ),
            ]
        )
    redis = sections.get("redis")
    if redis and redis.get("rows"):
        most = max(r["processes"] for r in redis["rows"])
        for kind, what in (("plain", "`@step`"), ("llm", "LLM step + `report_usage`")):
            per = [
                r["round_trips_per_step"]
                for r in redis["rows"]
                if r["ledger"] == "redis" and r["kind"] == kind
            ]
            if per:
                worst = max(per)
                targets.append(
                    [
                        f"one Redis round trip per step, {what}, 1-{most} processes",
                        f"{worst:.2f} round trips per step",
                        status(worst <= 1.01, f"{worst:.2f} round trips ({worst - 1:.2f} extra)"),
                    ]
                )
    else:
        targets.append(["one Redis round trip per step", "—", "not measured"])


def ledger_targets(targets: list[list[str]]) -> None:
    found = tables(RESULTS / "ledger.md")
    if not found:
        targets.append(["budget check under 1 µs in process", "—", "not measured"])
        return
    row = next((r for r in found[0] if r.get("operation", "").startswith("begin_step")), None)
    value = number(row.get("above the empty loop", "")) if row else None
    if value is None:
        targets.append(["budget check under 1 µs in process", "—", "not measured"])
        return
    targets.append(
        [
            "budget check + step count under 1 µs in process",
            f"{value:.2f} µs (`RunLedger.begin_step`, 4 limits)",
            status(value < 1.0, f"{value - 1:.2f} µs over"),
        ]
    )


def memory_targets(targets: list[list[str]]) -> None:
    found = tables(RESULTS / "memory.md")
    if len(found) < 2:
        targets.append(["RSS growth under 2 MB over 1,000,000 steps", "—", "not measured"])
        return
    long_run, many = found[0], found[1]
    last = long_run[-1]
    steps = last.get("steps", "?")
    grown = number(last.get("Δ RSS since warm-up MiB", ""))
    if grown is not None:
        targets.append(
            [
                f"RSS growth under 2 MB over one run of {steps} steps",
                f"{grown:+.2f} MiB",
                status(grown < 2.0 * 1e6 / 2**20, f"{grown:.2f} MiB"),
            ]
        )
    last = many[-1]
    grown = number(last.get("Δ RSS since warm-up MiB", ""))
    if grown is not None:
        targets.append(
            [
                f"RSS flat across {last.get('runs', '?')} runs",
                f"{grown:+.2f} MiB",
                status(grown < 1.0, f"{grown:.2f} MiB of growth"),
            ]
        )


def checkpoint_targets(scaling: dict[str, Any] | None, targets: list[list[str]]) -> None:
    found = tables(RESULTS / "checkpoint.md")
    title = (
        (RESULTS / "checkpoint.md").read_text().splitlines()[0]
        if (RESULTS / "checkpoint.md").exists()
        else ""
    )
    done = False
    for row in found[0] if found else []:
        operation = row.get("operation", "")
        if operation.endswith("save + load"):
            ratio = number(row.get("ratio", ""))
            if ratio is not None:
                size = re.search(r"of a (\S+ MB)", title)
                targets.append(
                    [
                        f"checkpoint save + load of {size.group(1) if size else '10 MB'} "
                        f"at most 1.5x raw ({operation.split()[0]})",
                        f"{ratio:.2f}x",
                        status(ratio <= 1.5, f"{(ratio / 1.5 - 1) * 100:.0f}% over ({ratio:.2f}x)"),
                    ]
                )
                done = True
    rows = ((scaling or {}).get("sections", {}).get("checkpoint") or {}).get("rows", [])
    if rows:
        for r in rows:
            if abs(r["mb"] - 10) < 1e-9:
                targets.append(
                    [
                        f"checkpoint save + load of 10 MB at most 1.5x raw ({r['serializer']}, "
                        "state of distinct strings, `bench_scaling.py`)",
                        f"{r['ratio']:.2f}x",
                        status(r["ratio"] <= 1.5, f"{(r['ratio'] / 1.5 - 1) * 100:.0f}% over"),
                    ]
                )
                done = True
    if not done:
        targets.append(["checkpoint save + load of 10 MB at most 1.5x raw", "—", "not measured"])


def scaling_section(scaling: dict[str, Any] | None) -> list[str]:
    sections = (scaling or {}).get("sections", {})
    lines: list[str] = []
    length = sections.get("length")
    if length and length.get("rows"):
        cells = " · ".join(
            f"{r['measured_from']:,}: {r['long_us']:.1f} µs ({r['vs_fresh']:.2f}x)" for r in length["rows"]
        )
        lines.append(f"- Run length (µs per step in the long run, and its ratio to a fresh run): {cells}.")
    short = sections.get("short_runs")
    if short and short.get("rows"):
        cells = " · ".join(
            f"{r['length']:,}: {r['step_us']:.1f} µs ({r['vs_bare']:.2f}x)" for r in short["rows"]
        )
        lines.append(f"- Short runs, run end included (µs per step, and `@step` / bare span): {cells}.")
    for key, what in (("asyncio", "asyncio tasks"), ("threads", "threads")):
        data = sections.get(key)
        if data and data.get("rows"):
            cells = " · ".join(
                f"{r['n']:,}: {r['step_us']:.1f} µs ({r['vs_bare']:.2f}x)" for r in data["rows"]
            )
            lines.append(f"- Concurrent runs, {what} (µs per step, and `@step` / bare span): {cells}.")
    ckpt = sections.get("checkpoint")
    if ckpt and ckpt.get("rows"):
        for serializer in sorted({r["serializer"] for r in ckpt["rows"]}):
            cells = " · ".join(
                f"{_size(r['bytes'])}: {r['our_total_ms']:.1f} ms ({r['ratio']:.2f}x)"
                for r in ckpt["rows"]
                if r["serializer"] == serializer
            )
            lines.append(f"- Checkpoint save + load, {serializer} (and its ratio to raw): {cells}.")
    redis = sections.get("redis")
    if redis and redis.get("rows"):
        cells = " · ".join(
            f"{r['processes']}: {r['per_step_us']:.0f} µs, {r['round_trips_per_step']:.2f} RTT"
            for r in redis["rows"]
            if r["ledger"] == "redis" and r["kind"] == "plain"
        )
        lines.append(
            f"- Processes on one Redis ledger (`@step`: µs per step, round trips per step): {cells}."
        )
    if not lines:
        return ["Scaling: not measured (`benchmarks/bench_scaling.py`).", ""]
    return ["Scaling (`benchmarks/results/scaling.md`):", "", *lines, ""]


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def build() -> str:
    peers = load_json("peers.json")
    scaling = load_json("scaling.json")
    header = (
        (peers or {}).get("header") or (scaling or {}).get("header") or header_lines(RESULTS / "overhead.md")
    )
    machine = [
        line
        for line in header
        if line.startswith(("- Date", "- Python", "- CPU", "- opentelemetry", "- Source"))
    ]
    targets: list[list[str]] = []
    lines = [
        "Measured by `benchmarks/` (`benchmarks/README.md`). One command regenerates every figure "
        "and this table: `.venv/bin/python benchmarks/run.py --update-readme` (`--quick` for a "
        "smoke run).",
        "",
        *machine,
        "",
    ]
    lines += peers_section(peers, targets)
    lines += overhead_section(targets)
    scaling_targets(scaling, targets)
    ledger_targets(targets)
    memory_targets(targets)
    checkpoint_targets(scaling, targets)
    lines += scaling_section(scaling)
    lines += local_files_section()
    lines += [
        "Targets of the performance issue:",
        "",
        "| target | measured | status |",
        "|---|---|---|",
        *(f"| {t[0]} | {t[1]} | {t[2]} |" for t in targets),
        "",
        f'"Independent" is judged within {FLAT_TOLERANCE:.0%}. The figures come from a small shared '
        "machine; each result file names its load average, commit and command.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help=f"also replace the text between {START} and {END} in README.md",
    )
    args = parser.parse_args(argv)
    text = build()
    out = RESULTS / "README-table.md"
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    if args.update_readme:
        readme = README.read_text()
        if START in readme and END in readme and readme.index(START) < readme.index(END):
            head, rest = readme.split(START, 1)
            _, tail = rest.split(END, 1)
            README.write_text(f"{head}{START}\n{text}{END}{tail}")
            print(f"updated {README} between the markers", file=sys.stderr)
        else:
            print(f"{README} has no {START} / {END} markers: left as it is", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
