"""Local OTLP endpoints for the tests: one that answers over HTTP and keeps the span names
it receives, and one that accepts connections and never answers. conftest makes them the fixtures
``collector`` and ``silent_collector``."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_INSTANCE = "service.instance.id"


class Collector(http.server.ThreadingHTTPServer):
    """A local OTLP/HTTP endpoint that keeps the names of the spans it receives (and each with
    its ``service.instance.id``), the metrics export requests (``metrics``, in order), the
    headers of each request (path: headers) and where each resource an export carried came from
    (``clients``: path, client port, ``service.instance.id``; one port, one connection);
    set ``status`` to another HTTP status to make it refuse every export (as a collector in
    trouble does)."""

    def __init__(self) -> None:
        self.span_names: list[str] = []
        self.span_instances: list[tuple[str, str]] = []  # (name, service.instance.id)
        self.metrics: list[Any] = []  # ExportMetricsServiceRequest
        self.headers: list[tuple[str, dict[str, str]]] = []
        self.clients: list[tuple[str, int, str]] = []
        self.requests = 0
        self.status = 200
        super().__init__(("127.0.0.1", 0), _CollectorHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    server: Collector
    protocol_version = "HTTP/1.1"  # keep-alive, as a real collector: exporters reuse connections

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        self.server.headers.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.server.status != 200:
            self.send_response(self.server.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        port = self.client_address[1]
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                instance = _instance(resource_spans.resource)
                self.server.clients.append((self.path, port, instance))
                for scope_spans in resource_spans.scope_spans:
                    self.server.span_names.extend(s.name for s in scope_spans.spans)
                    self.server.span_instances.extend((s.name, instance) for s in scope_spans.spans)
        elif self.path == "/v1/metrics":
            from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
                ExportMetricsServiceRequest,
            )

            metrics = ExportMetricsServiceRequest.FromString(body)
            self.server.metrics.append(metrics)
            for resource_metrics in metrics.resource_metrics:
                self.server.clients.append((self.path, port, _instance(resource_metrics.resource)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


def _instance(resource: Any) -> str:
    return next((a.value.string_value for a in resource.attributes if a.key == _INSTANCE), "")


@contextmanager
def serving_collector() -> Iterator[Collector]:
    """A Collector serving on a thread until the block ends."""
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class HungCollector:
    """An OTLP endpoint that accepts connections and never answers: its ``url``, and
    ``connected``, set when a client first connected (an exporter is then waiting for it)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connected = threading.Event()


@contextmanager
def never_answering_collector() -> Iterator[HungCollector]:
    """An OTLP endpoint that accepts connections and never answers (a hung collector)."""
    server = socket.create_server(("127.0.0.1", 0))
    collector = HungCollector(f"http://127.0.0.1:{server.getsockname()[1]}")
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            collector.connected.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        stop.set()
        thread.join()
        for connection in [*held, server]:
            connection.close()
