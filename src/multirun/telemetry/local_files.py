"""The embedded default: spans written as OTLP JSON lines under a local folder, and read back.

Each line of ``traces/<date>-<pid>.jsonl`` is one ExportTraceServiceRequest in
the OTLP JSON encoding (the same files the Collector's ``file`` exporter and
``otlpjsonfile`` receiver use), so they can be replayed into any OTLP backend.

The encoder is the protobuf one of opentelemetry-exporter-otlp-proto-common
plus protobuf's JSON mapping; only trace and span ids need converting, from
base64 to the hex that OTLP JSON specifies. (The separate
opentelemetry-exporter-otlp-json-file package is still a beta whose pins
conflict with the released OTLP exporters.)
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from multirun._process import reinit_after_fork

_logger = logging.getLogger(__name__)


class LocalFileSpanExporter(SpanExporter):
    """Appends spans to ``<directory>/<date>-<pid>.jsonl`` as OTLP JSON; never raises."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._warned = False
        self._shutdown = False
        # a forked child writes its own file; the lock may have been held by a thread it lost
        reinit_after_fork(self._at_fork_reinit)

    def _at_fork_reinit(self) -> None:
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        day = time.strftime("%Y-%m-%d")
        return self.directory / f"{day}-{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            line = json.dumps(encode_spans_json(spans), separators=(",", ":")) + "\n"
            with self._lock:
                self.directory.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as out:
                    out.write(line)
        except Exception as exc:
            if not self._warned:  # one warning, not one per batch
                self._warned = True
                _logger.warning("multirun: cannot write traces to %s: %s", self.directory, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._shutdown = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def encode_spans_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The OTLP JSON form of ``spans`` (one ExportTraceServiceRequest)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _ids_to_hex(span)
                for link in span.get("links", ()):
                    _ids_to_hex(link)
    return message


def _ids_to_hex(obj: dict[str, Any]) -> None:
    for key in ("traceId", "spanId", "parentSpanId"):
        value = obj.get(key)
        if value:
            obj[key] = base64.b64decode(value).hex()


# -- reading back ------------------------------------------------------------------


@dataclass
class SpanRecord:
    """One span read back from the local files."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int = 0
    status_message: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    service_name: str = ""

    @property
    def duration_s(self) -> float:
        return max(self.end_ns - self.start_ns, 0) / 1e9


def read_spans(directory: str | os.PathLike[str]) -> Iterator[SpanRecord]:
    """Every span in the ``.jsonl`` files of ``directory`` (none if there is no such folder).

    An unreadable file is skipped with a warning; a file with damaged lines gets one warning
    that sums them up, and its other lines are read.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        yield from _read_span_file(path)


class DamagedLine(ValueError):
    """A line of a span file that is not an OTLP JSON request; the message says why."""


def _read_span_file(path: Path) -> list[SpanRecord]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        _logger.warning("skipping unreadable file %s: %s", path, exc.strerror or exc)
        return []
    found: list[SpanRecord] = []
    damaged: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is not a line end
        if line.strip():
            try:
                found.extend(parse_span_line(line))
            except DamagedLine as exc:
                damaged.append((number, str(exc)))
    if damaged:
        _warn_damaged(path, damaged)
    return found


def parse_span_line(line: str) -> list[SpanRecord]:
    """The spans of one line of a span file; DamagedLine, saying why in words, if it has none to give."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise DamagedLine("JSON nested too deeply") from None
    except ValueError:
        raise DamagedLine("not JSON") from None
    if not isinstance(request, dict):
        raise DamagedLine("not a JSON object")
    try:
        return list(_records(request))
    except KeyError as exc:
        raise DamagedLine(f"missing field {exc.args[0]}") from None
    except RecursionError:
        raise DamagedLine("attribute values nested too deeply") from None
    except (AttributeError, TypeError, ValueError):
        raise DamagedLine("not the OTLP JSON layout of spans") from None


def _warn_damaged(path: Path, damaged: Sequence[tuple[int, str]]) -> None:
    """One warning for all the damaged lines of a file, with the first one's reason."""
    number, reason = damaged[0]
    if len(damaged) == 1:
        _logger.warning("skipped 1 damaged line in %s (line %d: %s)", path, number, reason)
    else:
        _logger.warning(
            "skipped %d damaged lines in %s (first at line %d: %s)", len(damaged), path, number, reason
        )


def _records(request: dict[str, Any]) -> Iterator[SpanRecord]:
    for resource_spans in request.get("resourceSpans", ()):
        resource = _attributes(resource_spans.get("resource", {}).get("attributes", ()))
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                status = span.get("status", {})
                yield SpanRecord(
                    name=span.get("name", ""),
                    trace_id=span["traceId"],
                    span_id=span["spanId"],
                    parent_span_id=span.get("parentSpanId", ""),
                    start_ns=int(span.get("startTimeUnixNano", 0)),
                    end_ns=int(span.get("endTimeUnixNano", 0)),
                    attributes=_attributes(span.get("attributes", ())),
                    status_code=int(status.get("code", 0)),
                    status_message=status.get("message", ""),
                    events=[
                        {"name": e.get("name", ""), "attributes": _attributes(e.get("attributes", ()))}
                        for e in span.get("events", ())
                    ],
                    links=span.get("links", []),
                    service_name=service,
                )


def _attributes(items: Any) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def _value(value: dict[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values", ())]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values", ()))
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    return None
