"""A long-lived benchmark worker: one peer, in that peer's own virtual environment.

Started by ``bench_peers.py`` as ``<env>/bin/python worker.py <peer>``. It
installs the network guard, sets the peer's environment variables, imports
``peer_<peer>.py`` and lets it configure its tracer with a counting exporter,
then answers commands, one JSON object per line on stdin, each with one JSON
line on the protocol pipe (the original stdout; anything the peer prints goes
to stderr, which the driver keeps in a log file):

- ``{"cmd": "hello"}``: the variants it offers, package versions, the guard's count;
- ``{"cmd": "run", "variant": V, "n": N, "warm": W}``: W untimed calls of V (the
  process was idle while the others ran), flush, collect garbage, then time N
  calls of V (the loop alone, and the loop plus the flush that exports the
  batch's spans), and report the spans exported meanwhile, by name;
- ``{"cmd": "stats"}``: network attempts, live threads, spans exported in all;
- ``{"cmd": "quit"}``.

Variants, for each mode the peer supports (``sync``, ``async``, ``gen``):
``peer_<mode>`` (the peer's decorator), ``bare_<mode>`` (a bare
``start_as_current_span`` on a TracerProvider of this environment's SDK with
a BatchSpanProcessor to a counting exporter, not the peer's provider),
``child_<mode>`` (the same bare span with a parent span current, as a run's
span is for multirun's steps), and ``plain_<mode>`` (the undecorated function).
"""

from __future__ import annotations

import netguard

netguard.install()  # before anything else is imported: a peer may connect at import time

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from _peer import bare_decorators  # noqa: E402

# The protocol gets its own copy of stdout; fd 1 is pointed at stderr, so that a banner a peer
# prints cannot corrupt the protocol.
_PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr


def make_counting_exporter() -> Any:
    """A SpanExporter (of this environment's SDK) that only counts spans by name."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class CountingExporter(SpanExporter):
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.by_name: Counter[str] = Counter()
            self.attributes: dict[str, int] = {}

        def export(self, spans: Sequence[Any]) -> Any:
            with self.lock:
                for span in spans:
                    self.by_name[span.name] += 1
                    if span.name not in self.attributes:
                        self.attributes[span.name] = len(span.attributes or {})
            return SpanExportResult.SUCCESS

        def snapshot(self) -> Counter[str]:
            with self.lock:
                return Counter(self.by_name)

        def shutdown(self) -> None:
            """Nothing to release."""

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return True

    return CountingExporter()


# ---------------------------------------------------------------------------
# the functions under test: every variant calls one of these with one small argument


def work(x: int) -> int:
    return x


async def work_async(x: int) -> int:
    return x


def work_gen(x: int) -> Any:
    yield x


# ---------------------------------------------------------------------------
# batches


def sync_batch(fn: Callable[[int], Any]) -> Callable[[int], int]:
    def batch(n: int) -> int:
        clock = time.perf_counter_ns
        start = clock()
        for i in range(n):
            fn(i)
        return clock() - start

    return batch


def gen_batch(fn: Callable[[int], Any]) -> Callable[[int], int]:
    def batch(n: int) -> int:
        clock = time.perf_counter_ns
        start = clock()
        for i in range(n):
            for _ in fn(i):
                pass
        return clock() - start

    return batch


def async_batch(fn: Callable[[int], Any]) -> Callable[[int], Any]:
    async def batch(n: int) -> int:
        clock = time.perf_counter_ns
        start = clock()
        for i in range(n):
            await fn(i)
        return clock() - start

    return batch


class Variant:
    def __init__(
        self,
        key: str,
        mode: str,
        fn: Callable[[int], Any],
        flush: Callable[[], Any],
        exporter: Any,
        wrap: Callable[[str, Any], Any] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.key = key
        self.flush = flush
        self.exporter = exporter
        builder = {"sync": sync_batch, "gen": gen_batch, "async": async_batch}[mode]
        batch = builder(fn)
        if wrap is not None:
            batch = wrap(mode, batch)
        if mode == "async":
            self.run = lambda n: loop.run_until_complete(batch(n))
        else:
            self.run = batch


def in_parent_span(tracer: Any) -> Callable[[str, Any], Any]:
    """A ``wrap`` that runs a batch with a span of ``tracer`` current (opened and ended untimed)."""

    def wrap(mode: str, batch: Any) -> Any:
        if mode == "async":

            async def batch_async(n: int) -> Any:
                with tracer.start_as_current_span("bare.parent"):
                    return await batch(n)

            return batch_async

        def batch_sync(n: int) -> Any:
            with tracer.start_as_current_span("bare.parent"):
                return batch(n)

        return batch_sync

    return wrap


class Worker:
    def __init__(self, peer_name: str) -> None:
        self.peer_name = peer_name
        self.module = importlib.import_module(f"peer_{peer_name}")
        for key, value in getattr(self.module, "ENV", {}).items():
            os.environ[key] = value
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.bare_exporter = make_counting_exporter()
        self.bare_provider = TracerProvider()
        self.bare_provider.add_span_processor(BatchSpanProcessor(self.bare_exporter))
        bare_tracer = self.bare_provider.get_tracer("bench.bare")
        bare = bare_decorators(bare_tracer, work, work_async, work_gen)
        bare_in_parent = in_parent_span(bare_tracer)

        self.peer_exporter = make_counting_exporter()
        started = time.perf_counter()
        self.peer = self.module.setup(self.peer_exporter, work, work_async, work_gen)
        self.setup_seconds = time.perf_counter() - started
        plain = {"sync": work, "async": work_async, "gen": work_gen}

        def nothing() -> None:
            return None

        self.variants: dict[str, Variant] = {}
        for mode, fn in self.peer.calls.items():
            self.variants[f"peer_{mode}"] = Variant(
                f"peer_{mode}", mode, fn, self.peer.flush, self.peer_exporter, self.peer.wrap, self.loop
            )
            self.variants[f"bare_{mode}"] = Variant(
                f"bare_{mode}",
                mode,
                bare[mode],
                self.bare_provider.force_flush,
                self.bare_exporter,
                None,
                self.loop,
            )
            self.variants[f"child_{mode}"] = Variant(
                f"child_{mode}",
                mode,
                bare[mode],
                self.bare_provider.force_flush,
                self.bare_exporter,
                bare_in_parent,
                self.loop,
            )
            self.variants[f"plain_{mode}"] = Variant(
                f"plain_{mode}", mode, plain[mode], nothing, None, None, self.loop
            )
        self.flush_all()
        gc.collect()
        gc.freeze()

    def flush_all(self) -> None:
        self.peer.flush()
        self.bare_provider.force_flush()

    def hello(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        packages = {}
        for name in ["opentelemetry-sdk", *getattr(self.module, "PACKAGES", [])]:
            try:
                packages[name] = version(name)
            except PackageNotFoundError:
                packages[name] = "-"
        return {
            "peer": self.peer_name,
            "label": getattr(self.module, "LABEL", self.peer_name),
            "decorator": getattr(self.module, "DECORATOR", ""),
            "notes": list(getattr(self.peer, "notes", [])),
            "variants": sorted(self.variants),
            "modes": sorted(self.peer.calls),
            "python": sys.version.split()[0],
            "packages": packages,
            "setup_seconds": self.setup_seconds,
            "net": netguard.summary(),
        }

    def run(self, key: str, n: int, warm: int = 0) -> dict[str, Any]:
        variant = self.variants[key]
        if warm:  # untimed: this process was idle while the others ran; bring its caches back
            variant.run(warm)
        self.flush_all()
        gc.collect()
        before = variant.exporter.snapshot() if variant.exporter is not None else Counter()
        other = self.peer_exporter if variant.exporter is self.bare_exporter else self.bare_exporter
        other_before = other.snapshot()
        start = time.perf_counter_ns()
        ns = variant.run(n)
        variant.flush()
        ns_flush = time.perf_counter_ns() - start
        after = variant.exporter.snapshot() if variant.exporter is not None else Counter()
        spans = {name: count for name, count in (after - before).items()}
        leaked = sum((other.snapshot() - other_before).values())
        attributes = {}
        if variant.exporter is not None:
            attributes = {name: variant.exporter.attributes.get(name, 0) for name in spans}
        return {"ns": ns, "ns_flush": ns_flush, "spans": spans, "attributes": attributes, "elsewhere": leaked}

    def stats(self) -> dict[str, Any]:
        return {
            "net": netguard.summary(),
            "threads": sorted(t.name for t in threading.enumerate()),
            "peer_spans": dict(self.peer_exporter.snapshot()),
        }


def reply(message: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


def main() -> int:
    peer_name = sys.argv[1]
    try:
        worker = Worker(peer_name)
    except BaseException as error:  # the driver reports it and goes on without this peer
        import traceback

        traceback.print_exc()
        reply({"error": f"{type(error).__name__}: {error}", "net": netguard.summary()})
        return 1
    for line in sys.stdin:
        command = json.loads(line)
        cmd = command["cmd"]
        try:
            if cmd == "hello":
                reply(worker.hello())
            elif cmd == "run":
                reply(worker.run(command["variant"], int(command["n"]), int(command.get("warm", 0))))
            elif cmd == "stats":
                reply(worker.stats())
            elif cmd == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown command {cmd!r}"})
        except BaseException as error:
            import traceback

            traceback.print_exc()
            reply({"error": f"{type(error).__name__}: {error}"})
    with contextlib.suppress(Exception):  # shutting down: nothing to report a failure to
        worker.peer.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
