"""multirun-otel's ``@step`` side by side with the peers' decorators, each in its own environment.

Usage (from the project root)::

    .venv/bin/python benchmarks/peers/bench_peers.py [--rounds 40] [--batch 500]
    .venv/bin/python benchmarks/peers/bench_peers.py --peers otel multirun langfuse --rounds 6

Every peer runs in a virtual environment of its own (``envs.py``: built on
first use under ``${MULTIRUN_CACHE_DIR:-~/.cache/multirun-otel}/bench-venvs``,
from the lock files in ``requirements/``), in a worker process that stays
alive for the whole benchmark (``worker.py``). The driver interleaves them:
each round runs one batch of every variant of every worker, one at a time
(A B C ... A B C ...), in a new random order each round (fixed seed) so no
variant always follows the same neighbour, each batch preceded by a tenth of
a batch of untimed calls (the worker was idle while the others ran). A slow moment of the shared
machine then hits every variant of the round alike, and every ratio is
taken per round (paired) before its median is reported.

Variants, for sync functions, ``async def`` and generators where the peer
supports them: the reference bare span (``start_as_current_span``, SDK
TracerProvider + BatchSpanProcessor, in the ``otel`` environment), a plain
call, and each peer's decorator configured to export to a counting exporter
and to touch no network. Each worker also times a bare span on its own SDK
(same call, its environment's SDK version), to show the environments agree.

Writes ``results/peers.md`` and ``results/peers.json`` (every sample, for
``readme_table.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import envs  # noqa: E402

from _common import RESULTS_DIR, environment_header, markdown_table, write_result  # noqa: E402

MODES = ("sync", "async", "gen")
MODE_LABELS = {"sync": "sync function", "async": "async function", "gen": "generator"}
REFERENCE = "otel"
OURS = "multirun"
PEER_ORDER = ("otel", "multirun", "traceloop", "langfuse", "logfire", "openlit", "agentops")
TARGET_RATIO = 1.3  # @step at most 1.3x a bare span
TARGET_LEAD = 1.5  # at least 1.5x cheaper than the cheapest peer
ENV_PREFIXES = ("OTEL_", "LANGFUSE_", "TRACELOOP_", "LOGFIRE_", "AGENTOPS_", "OPENLIT_", "MULTIRUN_")


class WorkerFailed(RuntimeError):
    pass


class Worker:
    """The driver's handle on one worker process."""

    def __init__(self, peer: str, env: envs.Env, log_dir: Path, timeout: float) -> None:
        self.peer = peer
        self.timeout = timeout
        self.log_path = log_dir / f"{peer}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            clean.pop(key, None)
        clean["PYTHONUNBUFFERED"] = "1"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"multirun-peer-{peer}-"))
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(env.python), str(HERE / "worker.py"), peer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=self.workdir,  # whatever a peer writes to its working directory lands there
            env=clean,
            text=True,
            bufsize=1,
        )
        self.info: dict[str, Any] = {}

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if self.process.poll() is None and message.get("cmd") != "__none__":
            try:
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass
        ready, _, _ = select.select([self.process.stdout], [], [], timeout or self.timeout)
        if not ready:
            raise WorkerFailed(f"no answer to {message.get('cmd')} within {timeout or self.timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise WorkerFailed(f"exited with {self.process.wait()} (log: {self.log_path})")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerFailed(f"{reply['error']} (log: {self.log_path})")
        return reply

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(WorkerFailed, OSError, ValueError):
                self.request({"cmd": "quit"}, timeout=30)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class Unit:
    """One variant of one worker: a column of the interleaving."""

    peer: str
    variant: str  # worker variant key: peer_sync, bare_async, plain_gen, ...
    samples: list[float] = field(default_factory=list)  # µs per call, loop only, one per timed round
    with_flush: list[float] = field(default_factory=list)  # µs per call, loop + flush
    spans_per_call: list[float] = field(default_factory=list)
    span_names: dict[str, int] = field(default_factory=dict)  # name -> attributes of its first span
    elsewhere: int = 0  # spans that reached the other exporter of the worker (must stay 0)

    @property
    def mode(self) -> str:
        return self.variant.split("_", 1)[1]

    @property
    def kind(self) -> str:
        return self.variant.split("_", 1)[0]

    @property
    def key(self) -> str:
        return f"{self.peer}:{self.variant}"


def quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(quantile(values, 0.25))} - {fmt.format(quantile(values, 0.75))}"


def paired(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y > 0]


def start_workers(
    peers: list[str], log_dir: Path, timeout: float, relock: bool
) -> tuple[dict[str, Worker], dict[str, str]]:
    workers: dict[str, Worker] = {}
    skipped: dict[str, str] = {}
    for peer in peers:
        try:
            env = envs.ensure(peer, relock=relock)
        except envs.EnvError as error:
            skipped[peer] = f"did not install: {str(error).splitlines()[0]}"
            print(f"  {peer}: {skipped[peer]}", file=sys.stderr)
            continue
        worker = Worker(peer, env, log_dir, timeout)
        try:
            worker.info = worker.request({"cmd": "hello"}, timeout=max(timeout, 180))
        except (WorkerFailed, json.JSONDecodeError) as error:
            skipped[peer] = f"did not start: {error}"
            print(f"  {peer}: {skipped[peer]}", file=sys.stderr)
            worker.stop()
            continue
        print(
            f"  {peer}: ready in {worker.info['setup_seconds']:.1f} s, "
            f"modes {', '.join(worker.info['modes'])}",
            file=sys.stderr,
        )
        workers[peer] = worker
    return workers, skipped


def plan(workers: dict[str, Worker], modes: list[str], local_bare: str) -> list[Unit]:
    units: list[Unit] = []
    for peer, worker in workers.items():
        offered = set(worker.info["variants"])
        for mode in modes:
            if f"peer_{mode}" not in offered:
                continue
            units.append(Unit(peer, f"peer_{mode}"))
            if peer == REFERENCE:
                units.append(Unit(peer, f"plain_{mode}"))
                units.append(Unit(peer, f"child_{mode}"))
            elif local_bare == "all" or (local_bare == "sync" and mode == "sync"):
                units.append(Unit(peer, f"bare_{mode}"))
    return units


def measure(
    workers: dict[str, Worker], units: list[Unit], rounds: int, warmup: int, batch: int
) -> dict[str, str]:
    """Run the rounds; a worker that fails is dropped (and named in the result)."""
    failed: dict[str, str] = {}
    started = time.perf_counter()
    shuffler = random.Random(20261122)
    warm = max(10, batch // 10)
    for round_no in range(warmup + rounds):
        live = [u for u in units if u.peer not in failed]
        shuffler.shuffle(live)  # a new order every round: no variant keeps the same neighbours
        for unit in live:
            if unit.peer in failed:
                continue
            try:
                reply = workers[unit.peer].request(
                    {"cmd": "run", "variant": unit.variant, "n": batch, "warm": warm}
                )
            except (WorkerFailed, json.JSONDecodeError) as error:
                failed[unit.peer] = f"failed in round {round_no + 1}: {error}"
                print(f"  {unit.peer}: {failed[unit.peer]}", file=sys.stderr)
                continue
            spans = sum(reply["spans"].values())
            unit.elsewhere += reply["elsewhere"]
            for name, count in reply["attributes"].items():
                unit.span_names.setdefault(name, count)
            if round_no >= warmup:
                unit.samples.append(reply["ns"] / batch / 1000)
                unit.with_flush.append(reply["ns_flush"] / batch / 1000)
                unit.spans_per_call.append(spans / batch)
        if round_no >= warmup:
            done = round_no - warmup + 1
            if done % 5 == 0 or done == rounds:
                print(f"  round {done}/{rounds} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return failed


# ---------------------------------------------------------------------------
# the report


def analyse(units: list[Unit], failed: dict[str, str]) -> dict[str, Any]:
    """Medians, spreads and paired ratios, per mode; the JSON that peers.json holds."""
    by_key = {u.key: u for u in units if u.peer not in failed and u.samples}
    out: dict[str, Any] = {}
    for mode in MODES:
        ref = by_key.get(f"{REFERENCE}:peer_{mode}")
        plain = by_key.get(f"{REFERENCE}:plain_{mode}")
        ours = by_key.get(f"{OURS}:peer_{mode}")
        child = by_key.get(f"{REFERENCE}:child_{mode}")
        if ref is None:
            continue
        rows = []
        for unit in by_key.values():
            if unit.mode != mode:
                continue
            n = min(len(unit.samples), len(ref.samples))
            ratios = paired(unit.samples[:n], ref.samples[:n])
            row = {
                "peer": unit.peer,
                "variant": unit.variant,
                "kind": "reference" if unit.peer == REFERENCE and unit.kind == "peer" else unit.kind,
                "median_us": statistics.median(unit.samples),
                "p25_us": quantile(unit.samples, 0.25),
                "p75_us": quantile(unit.samples, 0.75),
                "min_us": min(unit.samples),
                "median_with_flush_us": statistics.median(unit.with_flush),
                "ratio_to_bare": statistics.median(ratios),
                "ratio_to_bare_p25": quantile(ratios, 0.25),
                "ratio_to_bare_p75": quantile(ratios, 0.75),
                "spans_per_call": statistics.median(unit.spans_per_call),
                "min_spans_per_call": min(unit.spans_per_call),
                "span_names": unit.span_names,
                "elsewhere": unit.elsewhere,
                "rounds": len(unit.samples),
            }
            if plain is not None:
                m = min(len(unit.samples), len(plain.samples))
                row["over_plain_us"] = statistics.median(
                    [a - b for a, b in zip(unit.samples[:m], plain.samples[:m], strict=True)]
                )
                row["ratio_to_plain"] = statistics.median(paired(unit.samples[:m], plain.samples[:m]))
            if unit is ours and child is not None:
                m = min(len(unit.samples), len(child.samples))
                row["ratio_to_child"] = statistics.median(paired(unit.samples[:m], child.samples[:m]))
            if ours is not None and unit is not ours and unit.kind == "peer" and unit.peer != REFERENCE:
                m = min(len(unit.samples), len(ours.samples))
                row["times_multirun"] = statistics.median(paired(unit.samples[:m], ours.samples[:m]))
            rows.append(row)
        rows.sort(
            key=lambda r: (
                r["kind"] != "plain",
                r["kind"] != "reference",
                r["kind"] != "child",
                r["kind"] == "bare",
                r["median_us"],
            )
        )
        out[mode] = rows
    return out


def targets(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for mode, rows in analysis.items():
        ours = next((r for r in rows if r["peer"] == OURS and r["kind"] == "peer"), None)
        if ours is None:
            continue
        ratio = ours["ratio_to_bare"]
        found.append(
            {
                "mode": mode,
                "what": f"`@step` at most {TARGET_RATIO}x a bare span ({MODE_LABELS[mode]}, Budget + Policy)",
                "measured": f"{ratio:.2f}x",
                "met": ratio <= TARGET_RATIO,
                "by": f"{(ratio / TARGET_RATIO - 1) * 100:.0f}% over ({ratio:.2f}x vs {TARGET_RATIO}x)"
                if ratio > TARGET_RATIO
                else "",
            }
        )
        if "ratio_to_child" in ours:
            child = ours["ratio_to_child"]
            found.append(
                {
                    "mode": mode,
                    "what": f"`@step` at most {TARGET_RATIO}x a bare span inside a parent span, as a "
                    f"step is inside its run (like for like; {MODE_LABELS[mode]}, Budget + Policy)",
                    "measured": f"{child:.2f}x",
                    "met": child <= TARGET_RATIO,
                    "by": f"{(child / TARGET_RATIO - 1) * 100:.0f}% over ({child:.2f}x vs {TARGET_RATIO}x)"
                    if child > TARGET_RATIO
                    else "",
                }
            )
        peers = [r for r in rows if r["kind"] == "peer" and r["peer"] not in (OURS, REFERENCE)]
        if peers:
            cheapest = min(peers, key=lambda r: r["median_us"])
            lead = cheapest["times_multirun"]
            found.append(
                {
                    "mode": mode,
                    "what": f"at least {TARGET_LEAD}x cheaper than the cheapest peer ({MODE_LABELS[mode]})",
                    "measured": f"{lead:.2f}x (cheapest: {label(cheapest['peer'])})",
                    "met": lead >= TARGET_LEAD,
                    "by": f"{(1 - lead / TARGET_LEAD) * 100:.0f}% short ({lead:.2f}x vs {TARGET_LEAD}x)"
                    if lead < TARGET_LEAD
                    else "",
                }
            )
    return found


_LABELS: dict[str, str] = {}
_DECORATORS: dict[str, str] = {}


def label(peer: str) -> str:
    return _LABELS.get(peer, peer)


def row_label(row: dict[str, Any]) -> str:
    if row["kind"] == "plain":
        return "plain call (no tracing)"
    if row["kind"] == "reference":
        return "**bare span** (reference)"
    if row["kind"] == "bare":
        return f"bare span in the {label(row['peer'])} environment"
    if row["kind"] == "child":
        return "bare span inside a parent span"
    name = label(row["peer"])
    return f"**{name}**" if row["peer"] == OURS else name


def report(
    analysis: dict[str, Any],
    workers: dict[str, Worker],
    skipped: dict[str, str],
    failed: dict[str, str],
    stats: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    lines: list[str] = [
        f"{args.batch:,} calls per batch; {args.rounds} timed rounds after {args.warmup} warm-up "
        "round(s); each round runs one batch of every variant below, one worker at a time, in a "
        "new random order each round, each batch after a tenth of a batch of untimed calls. "
        "Each call passes one small int and returns it.",
        "",
    ]
    for mode, rows in analysis.items():
        table_rows = []
        for row in rows:
            table_rows.append(
                [
                    row_label(row),
                    f"{row['median_us']:.2f}",
                    f"{row['p25_us']:.1f} - {row['p75_us']:.1f}",
                    f"{row['median_with_flush_us']:.1f}",
                    "—" if row["kind"] == "reference" else f"{row['ratio_to_bare']:.2f}x",
                    "—"
                    if row["kind"] == "reference"
                    else f"{row['ratio_to_bare_p25']:.2f} - {row['ratio_to_bare_p75']:.2f}",
                    f"{row['over_plain_us']:+.1f}"
                    if "over_plain_us" in row and row["kind"] != "plain"
                    else "—",
                    f"{row['times_multirun']:.2f}x" if "times_multirun" in row else "—",
                    f"{row['spans_per_call']:.3f}" if row["kind"] != "plain" else "0",
                    ", ".join(f"`{n}` ({a})" for n, a in sorted(row["span_names"].items())) or "—",
                ]
            )
        lines += [
            f"## {MODE_LABELS[mode]}",
            "",
            markdown_table(
                [
                    "variant",
                    "median µs/call",
                    "IQR µs",
                    "µs incl. flush",
                    "x bare span",
                    "IQR of x",
                    "µs over plain",
                    "x multirun",
                    "spans/call",
                    "span names (attributes)",
                ],
                table_rows,
                "lrrrrrrrrl",
            ),
            "",
        ]
    lines += [
        "- *median µs/call*: median over rounds of (time of the batch loop / calls). *µs incl. flush*: "
        "the same with the `force_flush` that exports the batch's spans included (a peer that exports "
        "synchronously pays it inside the loop already).",
        "- *x bare span*: per round, this variant's time divided by the reference bare span's in the same "
        "round; the median and the interquartile range of those ratios. *µs over plain*: the same as a "
        "difference to the plain call. *x multirun*: per round, the peer's time divided by multirun-otel's "
        "(above 1: multirun-otel is cheaper).",
        "- *spans/call*: spans exported during the batch (flushed after it) divided by calls: 1 means every "
        "call was traced; multirun-otel's 1 + 1/batch is its run span (one `@run` per batch). "
        "*bare span in the X environment*: the reference call on that environment's own SDK and provider, "
        "interleaved like the rest: it should match the reference, and shows the environments agree.",
        "- *bare span inside a parent span*: the reference call with a span of its provider current (opened "
        "before the timed loop, as multirun's run span is). A child span costs the SDK more than a root "
        "span: `start_span` and the sampler look the parent up (three `isinstance` checks against the "
        "`Span` ABC) and read its trace state. multirun's steps are children of their run's span; the "
        "peers' decorated calls here are root spans, like the reference. The like-for-like target "
        "below divides multirun-otel's time by this row's, per round.",
        "",
        "## Targets",
        "",
    ]
    found = targets(analysis)
    lines.append(
        markdown_table(
            ["mode", "target", "measured", "status"],
            [
                [t["mode"], t["what"], t["measured"], "met" if t["met"] else f"**missed**: {t['by']}"]
                for t in found
            ],
            "llll",
        )
    )
    lines += ["", "## Environments and configuration", ""]
    env_rows = []
    for peer in PEER_ORDER:
        if peer in workers:
            info = workers[peer].info
            packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
            net = stats.get(peer, {}).get("net", info["net"])
            env_rows.append(
                [
                    label(peer),
                    info["decorator"],
                    packages,
                    ", ".join(info["modes"]),
                    str(net["count"]),
                    "; ".join(info["notes"]) or "defaults",
                ]
            )
        elif peer in skipped:
            env_rows.append([peer, "—", "—", "—", "—", f"**not measured**: {skipped[peer]}"])
    lines.append(
        markdown_table(
            ["peer", "decorator", "versions (its own venv)", "modes", "network attempts", "configuration"],
            env_rows,
            "lllrrl",
        )
    )
    lines += [""]
    for peer, why in failed.items():
        lines.append(f"- **{label(peer)} dropped**: {why}")
    attempts = {p: s["net"]["attempts"] for p, s in stats.items() if s.get("net", {}).get("attempts")}
    strays = sum(row["elsewhere"] for rows in analysis.values() for row in rows)
    lines.append(
        f"- Spans that reached the other provider of their worker (the peer's for a bare span, the bare "
        f"one for the peer's): {strays} (expected 0: each variant's count is its own)."
    )
    lines += [
        "- Every worker runs with a network guard (`netguard.py`, an audit hook installed before any "
        "peer is imported) that refuses and counts every name lookup and connection (loopback "
        "included): *network attempts* is that count over the whole benchmark, setup included.",
        "- Every peer's exporter is replaced by a counting exporter in its own SDK (no serialization, "
        "no I/O); telemetry and phone-home settings are off where the peer has them (`peer_*.py`).",
        f"- Environments: `{envs.cache_dir()}`, built from `benchmarks/peers/requirements/*.txt` "
        "(lock files; the `.in` files hold the direct pins). Worker logs: "
        f"`{args.log_dir}`.",
        "",
    ]
    for peer, items in attempts.items():
        lines.append(f"Network attempts of {label(peer)}:")
        lines += [f"- `{a['event']}` {a['target']} from `{a['where']}`" for a in items[:10]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--batch", type=int, default=500, help="calls per batch (default 500)")
    parser.add_argument("--peers", nargs="+", default=list(PEER_ORDER), choices=PEER_ORDER)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--local-bare",
        choices=("none", "sync", "all"),
        default="sync",
        help="time a bare span in every environment too: none, sync only (default), every mode",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds a batch may take")
    parser.add_argument("--relock", action="store_true", help="rebuild environments from the .in files")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be >= 3")
    peers = [p for p in PEER_ORDER if p in args.peers]
    for required in (REFERENCE, OURS):
        if required not in peers:
            peers.insert(0 if required == REFERENCE else 1, required)

    args.log_dir = envs.cache_dir().parent / "bench-logs"
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(f"bench_peers: preparing {len(peers)} environments", file=sys.stderr)
    workers, skipped = start_workers(peers, args.log_dir, args.timeout, args.relock)
    try:
        for missing in (REFERENCE, OURS):
            if missing not in workers:
                print(
                    f"bench_peers: the {missing} environment is required: {skipped.get(missing)}",
                    file=sys.stderr,
                )
                return 1
        for peer, worker in workers.items():
            _LABELS[peer] = worker.info["label"]
        units = plan(workers, list(args.modes), args.local_bare)
        print(
            f"bench_peers: {len(units)} variants x {args.rounds} rounds x {args.batch} calls",
            file=sys.stderr,
        )
        failed = measure(workers, units, args.rounds, args.warmup, args.batch)
        stats = {}
        for peer, worker in workers.items():
            if peer not in failed:
                with contextlib.suppress(WorkerFailed):
                    stats[peer] = worker.request({"cmd": "stats"})
    finally:
        for worker in workers.values():
            worker.stop()

    analysis = analyse(units, failed)
    body = report(analysis, workers, skipped, failed, stats, args)
    shown = [str(Path(__file__)), *(sys.argv[1:] if argv is None else argv)]
    title = "multirun-otel and its peers: per-call overhead, side by side"
    text = "\n".join(environment_header(title, shown)) + "\n" + body
    print(text)
    if not args.no_write:
        write_result("peers.md", text)
        data = {
            "header": environment_header(title, shown)[2:-1],
            "batch": args.batch,
            "rounds": args.rounds,
            "modes": analysis,
            "targets": targets(analysis),
            "labels": dict(_LABELS),
            "versions": {p: w.info["packages"] for p, w in workers.items()},
            "network_attempts": {p: s["net"]["count"] for p, s in stats.items()},
            "skipped": skipped,
            "failed": failed,
        }
        write_result("peers.json", json.dumps(data, indent=1) + "\n")
        print(f"written to {RESULTS_DIR / 'peers.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
