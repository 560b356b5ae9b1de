"""The real servers of the stack tests: Alertmanager, Prometheus, Jaeger and the Collector.

Each one runs as a child process on free 127.0.0.1 ports with a configuration
written into its own folder, is waited for until it answers, and is stopped
(SIGTERM, then SIGKILL) by ``stop``; Linux also stops it if the test process
dies. Prometheus and Alertmanager come from Debian packages; the Collector and
Jaeger are built by ``scripts/stack.sh`` into a cache outside the checkout.
A missing binary fails the test with how to get it, never skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from stack_queries import Prometheus

from child_processes import die_with_parent, free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "scripts" / "stack.sh"
COLLECTOR_CONFIG = ROOT / "collector-config" / "otelcol-config.yaml"
BUILDER_MANIFEST = ROOT / "collector-config" / "builder-config.yaml"

T = TypeVar("T")

BUILD_HINT = (
    "run `bash scripts/stack.sh` (scripts/test does it): it installs Prometheus and Alertmanager "
    "with apt and builds the Collector and Jaeger with Go into $MULTIRUN_CACHE_DIR/bin "
    "(default ~/.cache/multirun-otel/bin) "
    "- 10 to 15 minutes the first time on 2 cores, cached afterwards"
)


def built_binary(name: str, env_var: str) -> str:
    """The path of a binary scripts/stack.sh builds (``otelcol`` or ``jaeger``); ``env_var`` overrides."""
    path = os.environ.get(env_var)
    if not path:
        result = subprocess.run(
            ["bash", str(STACK_SH), "stack_binary_paths"], capture_output=True, text=True, check=False
        )
        paths = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        if name not in paths:
            pytest.fail(f"scripts/stack.sh stack_binary_paths failed: {result.stderr.strip()}", pytrace=False)
        path = paths[name]
    if not os.access(path, os.X_OK):
        pytest.fail(f"no {name} binary at {path}: {BUILD_HINT}, or set {env_var}", pytrace=False)
    return path


def package_binary(name: str, package: str) -> str:
    """A binary from a Debian package, found on PATH."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: install the Debian package {package} "
            f"(`apt-get install {package}`), or {BUILD_HINT}",
            pytrace=False,
        )
    return path


class Server:
    """One server process, its ports, its folder and its log."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], ports: dict[str, int], workdir: Path):
        self.name = name
        self.process = process
        self.ports = ports
        self.workdir = workdir

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def address(self, port: str) -> str:
        return f"127.0.0.1:{self.ports[port]}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    @classmethod
    def start(
        cls,
        name: str,
        workdir: Path,
        port_names: Sequence[str],
        command: Callable[[dict[str, int]], list[str]],
        ready: Callable[[Server], bool],
        *,
        files: Callable[[dict[str, int]], Mapping[str, str]] = lambda _: {},
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Server:
        """Start ``command(ports)`` after writing ``files(ports)`` into ``workdir``; wait for ``ready``.

        A free port can be taken between choosing it and binding it: a server
        that exits before it is ready is started again on new ports (3 tries).
        """
        last_log = ""
        for attempt in range(3):
            ports = {port: free_port() for port in port_names}
            folder = workdir / f"{name}-{attempt}"
            folder.mkdir(parents=True)
            for file_name, text in files(ports).items():
                (folder / file_name).write_text(text)
            with (folder / "server.log").open("wb") as out:
                process = subprocess.Popen(
                    command(ports),
                    cwd=folder,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **_expand(env or {}, ports)},
                    preexec_fn=die_with_parent,
                )
            server = cls(name, process, ports, folder)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if ready(server):
                    return server
                time.sleep(0.1)
            exited = process.poll() is not None
            server.stop()
            last_log = server.log_tail()
            if not exited:
                break  # it ran but never became ready: another try would not help
        pytest.fail(
            f"{name} did not start and become ready within {timeout:g}s; its log ({workdir}):\n{last_log}",
            pytrace=False,
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 seconds; the folder stays for the log."""
        stop_process(self.process)

    def check_running(self) -> None:
        """Fail with the server's log if it has exited."""
        if self.process.poll() is not None:
            pytest.fail(
                f"{self.name} exited with status {self.process.returncode}; its log:\n{self.log_tail()}",
                pytrace=False,
            )


def _expand(env: Mapping[str, str], ports: dict[str, int]) -> dict[str, str]:
    """Environment values with ``{port_name}`` replaced by that port."""
    return {key: value.format(**ports) for key, value in env.items()}


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def tcp_open(address: str, timeout: float = 0.5) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def as_yaml(document: Any) -> str:
    """A configuration file's text: JSON is YAML, so no YAML library is needed."""
    return json.dumps(document, indent=2) + "\n"


# ---------------------------------------------------------------------------
# the four servers


def start_alertmanager(workdir: Path, config: str) -> Server:
    """Alertmanager without clustering, with the configuration ``config``."""
    binary = package_binary("prometheus-alertmanager", "prometheus-alertmanager")
    return Server.start(
        "alertmanager",
        workdir,
        ["web"],
        lambda ports: [
            binary,
            "--config.file=alertmanager.yml",
            "--storage.path=data",
            f"--web.listen-address=127.0.0.1:{ports['web']}",
            "--cluster.listen-address=",
            "--log.level=info",
        ],
        lambda server: http_ok(server.url("web") + "/-/ready"),
        files=lambda _: {"alertmanager.yml": config},
    )


def start_prometheus(workdir: Path, config: Callable[[str], str], rules: str) -> Server:
    """Prometheus with the configuration ``config(own address)`` and ``rules`` as alert-rules.yml.

    Alerts are resent every second; exemplar storage keeps the exporter's trace ids.
    """
    binary = package_binary("prometheus", "prometheus")
    return Server.start(
        "prometheus",
        workdir,
        ["web"],
        lambda ports: [
            binary,
            "--config.file=prometheus.yml",
            "--storage.tsdb.path=data",
            f"--web.listen-address=127.0.0.1:{ports['web']}",
            "--rules.alert.resend-delay=1s",
            "--enable-feature=exemplar-storage",
            "--log.level=info",
        ],
        lambda server: http_ok(server.url("web") + "/-/ready"),
        files=lambda ports: {
            "prometheus.yml": config(f"127.0.0.1:{ports['web']}"),
            "alert-rules.yml": rules,
        },
    )


def start_jaeger(workdir: Path, name: str = "jaeger") -> Server:
    """Jaeger v2 with in-memory storage: OTLP gRPC in (port ``otlp``), query API out (``query``)."""
    binary = built_binary("jaeger", "MULTIRUN_JAEGER")

    def config(ports: dict[str, int]) -> dict[str, str]:
        document = {
            "service": {
                "extensions": ["jaeger_storage", "jaeger_query"],
                "pipelines": {
                    "traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]},
                },
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
            },
            "extensions": {
                "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 10000}}}},
                "jaeger_query": {
                    "storage": {"traces": "memstore"},
                    # on by default: Jaeger would trace itself to localhost:4317, whatever listens there
                    "enable_tracing": False,
                    "http": {"endpoint": f"127.0.0.1:{ports['query']}"},
                    "grpc": {"endpoint": f"127.0.0.1:{ports['query_grpc']}"},
                },
            },
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{ports['otlp']}"}}}},
            "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
        }
        return {"jaeger.yaml": as_yaml(document)}

    return Server.start(
        name,
        workdir,
        ["otlp", "query", "query_grpc"],
        lambda _: [binary, "--config", "jaeger.yaml"],
        lambda server: tcp_open(server.address("otlp")) and http_ok(server.url("query") + "/api/services"),
        files=config,
    )


COLLECTOR_ENV = {
    "OTELCOL_OTLP_GRPC_ENDPOINT": "127.0.0.1:{otlp_grpc}",
    "OTELCOL_OTLP_HTTP_ENDPOINT": "127.0.0.1:{otlp_http}",
    "OTELCOL_PROMETHEUS_ENDPOINT": "127.0.0.1:{prometheus}",
    "OTELCOL_TELEMETRY_HOST": "127.0.0.1",
    "OTELCOL_TELEMETRY_PORT": "{telemetry}",
}


def start_collector(workdir: Path, jaeger_otlp: str, tempo_otlp: str) -> Server:
    """The Collector built from the manifest, running the shipped otelcol-config.yaml unchanged.

    Only environment variables differ from the compose stack: every address on 127.0.0.1.
    """
    binary = built_binary("otelcol", "MULTIRUN_OTELCOL")
    return Server.start(
        "otelcol",
        workdir,
        ["otlp_grpc", "otlp_http", "prometheus", "telemetry"],
        lambda _: [binary, "--config", str(COLLECTOR_CONFIG)],
        lambda server: (
            tcp_open(server.address("otlp_http")) and http_ok(server.url("prometheus") + "/metrics")
        ),
        env={**COLLECTOR_ENV, "JAEGER_ENDPOINT": jaeger_otlp, "TEMPO_ENDPOINT": tempo_otlp},
    )


# ---------------------------------------------------------------------------
# what the fixtures hand to the tests


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    interval: float = 0.5,
    found: Callable[[], object] | None = None,
) -> T:
    """Poll ``check`` until it returns something other than None (or False); fail after ``timeout``,
    saying what ``found()`` returns then."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            seen = f"; found: {found()}" if found is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{seen}", pytrace=False)
        time.sleep(interval)


class Webhook:
    """An HTTP server on 127.0.0.1 that keeps what Alertmanager posts to it: (path, JSON body)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append((self.path, json.loads(self.rfile.read(length) or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    """The running servers and the clients of their APIs."""

    workdir: Path
    jaeger: Server
    tempo: Server  # a second Jaeger standing in for Tempo
    collector: Server
    alertmanager: Server
    prometheus: Server
    webhook: Webhook
    prom: Prometheus = field(init=False)

    def __post_init__(self) -> None:
        self.prom = Prometheus(self.prometheus.url("web"))

    @property
    def otlp_http(self) -> str:
        return self.collector.url("otlp_http")

    @property
    def otlp_grpc(self) -> str:
        return self.collector.url("otlp_grpc")

    def check_running(self) -> None:
        for server in (self.jaeger, self.tempo, self.collector, self.alertmanager, self.prometheus):
            server.check_running()


@dataclass
class Workload:
    """What stack_workload.py sent, and when."""

    service: str
    started: float  # Unix time
    finished: float
    run_names: tuple[str, ...] = (
        "research_crew",
        "runaway_crew",
        "capped_crew",
        "flaky_crew",
        "frugal_crew",
    )
    rounds: int = 3
