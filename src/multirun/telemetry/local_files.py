"""The embedded default: spans written as OTLP JSON lines under a local folder, and read back.

Each line of ``traces/<date>-<pid>.jsonl`` is one ExportTraceServiceRequest in
the OTLP JSON encoding (the same files the Collector's ``file`` exporter and
``otlpjsonfile`` receiver use), so they can be replayed into any OTLP backend.

The encoder is ``otlp_json``'s, which writes the dicts of protobuf's JSON
mapping directly, thirty times faster than opentelemetry-exporter-otlp-proto-common's
encoder plus ``MessageToDict``. (The separate opentelemetry-exporter-otlp-json-file
package is still a beta whose pins conflict with the released OTLP exporters.)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import re
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from multirun._process import absolute_folder, reinit_after_fork
from multirun.telemetry.otlp_json import encode_spans_json
from multirun.telemetry.utf8_spans import utf8_json

_logger = logging.getLogger(__name__)

#: How a program names another folder for its span files, for messages (the ``multirun``
#: command says its own option instead).
FOLDER_SETTINGS = "MULTIRUN_DIR or multirun.init(local_dir=...)"


class LocalFileSpanExporter(SpanExporter):
    """Appends spans to ``<directory>/<date>-<pid>.jsonl`` as OTLP JSON; never raises."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # absolute now: spans are written later, by a batch, maybe after the program's os.chdir
        self.directory = absolute_folder(directory, "span files")
        self._lock = threading.Lock()
        self._warned = False
        self._shutdown = False
        self._warned_shutdown = False
        self._file: _AppendFile | None = None
        # a forked child writes its own file; the lock may have been held by a thread it lost
        reinit_after_fork(self._at_fork_reinit)

    def _at_fork_reinit(self) -> None:
        self._lock = threading.Lock()
        if self._file is not None:
            self._file.close()  # the child's copy of the parent's descriptor
            self._file = None

    @property
    def path(self) -> Path:
        day = time.strftime("%Y-%m-%d")
        return self.directory / f"{day}-{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return self._refused_after_shutdown()
        try:
            line = _encode_line(spans)
            with self._lock:
                if self._shutdown:  # while the batch was encoded: the file is closed for good
                    return self._refused_after_shutdown()
                self._append(line)
        except Exception as exc:
            if not self._warned:  # one warning, not one per batch
                self._warned = True
                _logger.warning(
                    "multirun: cannot write traces to %s: %s (spans are lost until it can be written; "
                    "%s names another folder)",
                    self.directory,
                    exc,
                    FOLDER_SETTINGS,
                )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _refused_after_shutdown(self) -> SpanExportResult:
        if not self._warned_shutdown:  # the processor counts the spans; this says why
            self._warned_shutdown = True
            _logger.warning(
                "multirun: the span exporter of %s was shut down: spans that end after it are not written",
                self.directory,
            )
        return SpanExportResult.FAILURE

    def _append(self, line: bytes) -> None:
        path = self.path
        file = self._file
        if file is not None and (file.path != path or file.stale()):
            file.close()  # a new day, or the file was removed (pruned): a new file
            file = self._file = None
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = _AppendFile(path)
            self._file = file
        try:
            file.append(line)
        except OSError:
            file.close()  # opened afresh for the next batch
            self._file = None
            raise

    def shutdown(self) -> None:
        self._shutdown = True
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _AppendFile:
    """A trace file kept open between batches.

    Opening the file, checking its end and closing it again for every batch cost eight
    system calls, each of which lets the application's thread take the GIL for a switch
    interval (5 ms) before the export thread gets it back: a fast agent loop filled the
    export queue meanwhile and spans were dropped. Kept open, a batch costs an ``fstat``
    (was the file removed? is the descriptor still its? did another writer add to it?) and
    the ``write``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._readable = True
        try:
            self._fd = os.open(path, flags | os.O_RDWR, 0o666)
        except PermissionError:  # a file this process may write but not read: append as it is
            self._fd = os.open(path, flags | os.O_WRONLY, 0o666)
            self._readable = False
        # closed when the exporter is dropped without shutdown too, but not at exit, before
        # the last batch is written
        self._closer = weakref.finalize(self, _close_quietly, self._fd)
        self._closer.atexit = False
        status = os.fstat(self._fd)
        self._identity = (status.st_dev, status.st_ino)
        self._size = status.st_size
        self._end = -1  # where this writer's last line ended; -1: not written yet

    def stale(self) -> bool:
        """Whether a new file must be opened: this one was removed (pruned), or its descriptor
        was closed by someone else (``os.closerange``), or cannot be read (NFS), or names
        another file now, which is left open: it is not this writer's to close."""
        try:
            status = os.fstat(self._fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                self._closer.detach()
            return True
        if (status.st_dev, status.st_ino) != self._identity:
            self._closer.detach()
            return True
        self._size = status.st_size
        return status.st_nlink == 0

    def append(self, line: bytes) -> None:
        """Append ``line``, starting it on a line of its own.

        Another process of the same pid (PID 1 in a container, run after run) writes the
        same file, and one that died mid-write left a last line without its end: without a
        newline first, this line would be glued to that fragment and lost with it.
        """
        size = self._size
        if size and size != self._end and self._readable and self._byte_at(size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        self._end = size + len(line)

    def _byte_at(self, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd, 1, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)  # Windows; appends go to the end all the same
        return os.read(self._fd, 1)

    def close(self) -> None:
        self._closer()  # once: a second os.close could close a descriptor opened since


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _encode_line(spans: Sequence[ReadableSpan]) -> bytes:
    """The batch as one line of OTLP JSON in UTF-8. Text UTF-8 cannot hold (a lone surrogate,
    as ``os.fsdecode`` makes of a byte that is not UTF-8), wherever it is, is escaped: ``\\xff``
    for such a byte, ``\\udXXX`` for another surrogate."""
    text = json.dumps(_encode_what_can_be(spans), separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return utf8_json(text).encode("utf-8") + b"\n"


def _encode_what_can_be(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The OTLP JSON of the batch; if it cannot be encoded whole, of every span that can be
    on its own (one warning names how many were left out and why)."""
    try:
        return encode_spans_json(spans)
    except Exception:
        if len(spans) <= 1:
            raise
    good: list[ReadableSpan] = []
    first_error: Exception | None = None
    for span in spans:
        try:
            encode_spans_json([span])
        except Exception as exc:
            first_error = first_error or exc
        else:
            good.append(span)
    _logger.warning(
        "multirun: could not write %d of %d spans (%s: %s)",
        len(spans) - len(good),
        len(spans),
        type(first_error).__name__,
        first_error,
    )
    return encode_spans_json(good)


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
    parent_is_remote: bool | None = None  # None: the file does not say
    events: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    service_name: str = ""

    @property
    def duration_s(self) -> float:
        return max(self.end_ns - self.start_ns, 0) / 1e9


def read_spans(directory: str | os.PathLike[str], *, warn: bool = True) -> Iterator[SpanRecord]:
    """Every span in the ``.jsonl`` files of ``directory`` (none if there is no such folder).

    OSError if the folder cannot be read (its spans are not "none"). An unreadable file is
    skipped with a warning; a file with damaged lines, or spans (a field of the wrong type, a
    time out of range), gets one warning that sums them up, and the rest is read. A whole
    request glued to the fragment a killed writer left (as writers before this one did) is
    read too. ``warn=False``: no warnings (the files are read again, and were warned of).

    Lines are read by OTLP JSON's rules, as other writers (the Collector's file exporter) write
    them: a field left out or null holds its default (an attribute's key ``""``, a value unset),
    64-bit integers may be text, ids are hex in either case.
    """
    for path in span_files(directory):
        yield from _read_span_file(path, warn)


def span_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``.jsonl`` files of ``directory``, sorted; none if there is no such folder,
    OSError if it cannot be read (NotADirectoryError if it is a file)."""
    folder = Path(directory)
    try:
        with os.scandir(folder) as entries:
            return sorted(folder / entry.name for entry in entries if entry.name.endswith(".jsonl"))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        if folder.exists():  # a file where the folder should be: its runs cannot be read
            raise
        return []  # a folder above it is a file: no such folder


class DamagedLine(ValueError):
    """A line of a span file that is not an OTLP JSON request; the message says why."""


CUT_SHORT = "cut short"


def _read_span_file(path: Path, warn: bool) -> Iterator[SpanRecord]:
    """The spans of one file, read a line (one request) at a time, so that a big file costs the
    memory of its longest line, not its size."""
    damaged: list[tuple[int, str]] = []
    bad_spans: list[tuple[int, str]] = []
    number = 0
    try:
        mode = path.stat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a folder: open() says so itself
            # a named pipe would be waited on until something writes it: for ever
            if warn:
                _logger.warning("skipping %s: not a regular file", path)
            return
        # universal newlines: "\r\n" and "\r" end a line too; U+2028 does not
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield from _spans_of_line(line.removesuffix("\n"), number, damaged, bad_spans)
                    if damaged and damaged[-1] == (number, CUT_SHORT) and not line.endswith("\n"):
                        damaged[-1] = (number, f"{CUT_SHORT}: still being written, or its writer was killed")
    except OSError as exc:
        if warn and number:
            _logger.warning("stopped reading %s after line %d: %s", path, number, exc.strerror or exc)
        elif warn:
            _logger.warning("skipping unreadable file %s: %s", path, exc.strerror or exc)
    if warn and (damaged or bad_spans):
        _warn_damaged(path, damaged, bad_spans)


def _spans_of_line(
    line: str, number: int, damaged: list[tuple[int, str]], bad_spans: list[tuple[int, str]]
) -> list[SpanRecord]:
    """The spans of line ``number``; why it, or a span of it, could not be read goes to
    ``damaged`` or ``bad_spans``."""
    try:
        spans, reasons = _parse_line(line)
    except DamagedLine as exc:
        after = _request_after_a_fragment(line)
        if after is None:
            damaged.append((number, str(exc)))
            return []
        # an older writer glued its request to what a killed one left
        damaged.append((number, "cut short; the request written after it was read"))
        return after
    bad_spans.extend((number, reason) for reason in reasons)
    return spans


_REQUEST_START = re.compile(r'\{\s*"resourceSpans"\s*:')


def _request_after_a_fragment(line: str) -> list[SpanRecord] | None:
    """The spans of a whole request that follows the start of a cut-short one on ``line``, if any.

    (The marker cannot occur inside a JSON string, where its quotes would be escaped.)
    """
    for match in _REQUEST_START.finditer(line, 1):
        try:
            return parse_span_line(line[match.start() :])
        except DamagedLine:
            continue
    return None


def parse_span_line(line: str) -> list[SpanRecord]:
    """The spans of one line of a span file; DamagedLine, saying why in words, if it has none to give.

    A span that cannot be read (a field of the wrong type, a time out of range) is left out;
    the file reader counts those.
    """
    return _parse_line(line)[0]


def _parse_line(line: str) -> tuple[list[SpanRecord], list[str]]:
    """The spans of one line, and why each span of it that cannot be read cannot; DamagedLine
    if the line is no request, or none of its spans can be read."""
    try:
        request = json.loads(line)
    except RecursionError:
        raise DamagedLine("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        # the text ended before the JSON did (in a string: the error is where the string began)
        ended = exc.pos >= len(line.rstrip()) or exc.msg.startswith("Unterminated string")
        raise DamagedLine(CUT_SHORT if ended else "not JSON") from None
    except ValueError:
        raise DamagedLine("not JSON") from None
    if not isinstance(request, dict):
        raise DamagedLine("not a JSON object")
    try:
        found, damaged = _records(request)
    except DamagedSpan:  # around the spans, not in one of them
        raise DamagedLine(_LAYOUT) from None
    except RecursionError:
        raise DamagedLine("attribute values nested too deeply") from None
    if damaged and not found:
        raise DamagedLine(damaged[0])
    return found, damaged


def _warn_damaged(path: Path, lines: Sequence[tuple[int, str]], spans: Sequence[tuple[int, str]]) -> None:
    """One warning for all the damaged lines and spans of a file, with the first one's reason."""
    number, reason = min([*lines, *spans], key=lambda found: found[0])
    what = " and ".join(
        f"{len(found)} damaged {noun}{'' if len(found) == 1 else 's'}"
        for found, noun in ((lines, "line"), (spans, "span"))
        if found
    )
    where = f"line {number}" if len(lines) + len(spans) == 1 else f"first at line {number}"
    _logger.warning("skipped %s in %s (%s: %s)", what, path, where, reason)


class DamagedSpan(ValueError):
    """A span that is not one in the OTLP JSON layout; the message says why."""


_LAYOUT = "not the OTLP JSON layout of spans"


def _records(request: dict[str, Any]) -> tuple[list[SpanRecord], list[str]]:
    """The spans of one request, and the reasons the others could not be read."""
    found: list[SpanRecord] = []
    damaged: list[str] = []
    for resource_spans in _objects(request, "resourceSpans"):
        resource = _attributes(_field(_field(resource_spans, "resource", dict), "attributes", list))
        service = resource.get("service.name", "")
        # OTLP before 0.19 (Collectors of 2021) named the scopes' lists instrumentationLibrarySpans
        old = "scopeSpans" not in resource_spans and "instrumentationLibrarySpans" in resource_spans
        scopes = "instrumentationLibrarySpans" if old else "scopeSpans"
        for scope_spans in _objects(resource_spans, scopes):
            for span in _objects(scope_spans, "spans", damaged):
                try:
                    found.append(_record(span, str(service)))
                except DamagedSpan as exc:
                    damaged.append(str(exc))
                except RecursionError:
                    damaged.append("attribute values nested too deeply")
    return found, damaged


def _record(span: dict[str, Any], service: str) -> SpanRecord:
    status = _field(span, "status", dict)
    return SpanRecord(
        name=_field(span, "name", str),
        trace_id=_id(span, "traceId"),
        span_id=_id(span, "spanId"),
        parent_span_id=_field(span, "parentSpanId", str).lower(),
        start_ns=_nanoseconds(span, "startTimeUnixNano"),
        end_ns=_nanoseconds(span, "endTimeUnixNano"),
        attributes=_attributes(_field(span, "attributes", list)),
        status_code=_status_code(status.get("code")),
        status_message=_field(status, "message", str),
        parent_is_remote=_parent_is_remote(span.get("flags")),
        events=[
            {"name": _field(e, "name", str), "attributes": _attributes(_field(e, "attributes", list))}
            for e in _objects(span, "events")
        ],
        links=list(_objects(span, "links")),
        service_name=service,
    )


def _field(obj: dict[str, Any], key: str, kind: type) -> Any:
    """``obj[key]`` if it is a ``kind``; its default if absent or null (as in protobuf's JSON)."""
    value = obj.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise DamagedSpan(f"{key} is {_json_type(value)}, not {_json_type(kind())}")
    return value


def _objects(obj: dict[str, Any], key: str, damaged: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The objects of the list ``obj[key]``; a member that is no object is damage (of the span,
    or, given ``damaged``, one more damaged span)."""
    for item in _field(obj, key, list):
        if isinstance(item, dict):
            yield item
        elif damaged is not None:
            damaged.append(f"a member of {key} is {_json_type(item)}, not an object")
        else:
            raise DamagedSpan(f"a member of {key} is {_json_type(item)}, not an object")


def _json_type(value: Any) -> str:
    names = {str: "text", dict: "an object", list: "a list", bool: "true or false", type(None): "null"}
    return names.get(type(value), "a number")


def _id(span: dict[str, Any], key: str) -> str:
    """A trace or span id: hex, in either case (OTLP JSON's rule), given in lower case."""
    value = _field(span, key, str)
    if not value:
        raise DamagedSpan(f"missing field {key}")
    return str(value).lower()


_UINT64 = 2**64


def _nanoseconds(span: dict[str, Any], key: str) -> int:
    """A fixed64 time: a whole number, or text of one, from 0 to 2**64 - 1 (the year 2554)."""
    value = span.get(key)
    if value is None:
        return 0
    number = _whole_number(value, key)
    if not 0 <= number < _UINT64:
        raise DamagedSpan(f"{key} {value} is out of range")
    return number


def _whole_number(value: Any, what: str) -> int:
    """An int64 or fixed64 of protobuf's JSON: a number, or text of one, with no fraction."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DamagedSpan(f"{what} {value!r} is not a whole number")
    try:
        return int(value)
    except ValueError:
        raise DamagedSpan(f"{what} {value!r} is not a whole number") from None


_STATUS_CODES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _status_code(value: Any) -> int:
    """0, 1 or 2 (unset, ok, error); given as a number or by name."""
    if value is None:
        return 0
    code = _STATUS_CODES.get(value) if isinstance(value, str) and not value.isdigit() else None
    if code is None:
        code = _whole_number(value, "status code")
    if code not in (0, 1, 2):
        raise DamagedSpan(f"status code {value!r} is none of 0, 1, 2")
    return code


_HAS_IS_REMOTE = 0x100  # SpanFlags: the next bit says whether the parent was remote
_IS_REMOTE = 0x200


def _parent_is_remote(flags: Any) -> bool | None:
    """What the span's flags (a number, or text of one) say of its parent (None: nothing;
    they are only a hint)."""
    if isinstance(flags, str) and flags.isdigit():
        flags = int(flags)
    if isinstance(flags, bool) or not isinstance(flags, int) or not flags & _HAS_IS_REMOTE:
        return None
    return bool(flags & _IS_REMOTE)


def _attributes(items: list[Any]) -> dict[str, Any]:
    attributes = {}
    for item in items:
        if not isinstance(item, dict):
            raise DamagedSpan(f"an attribute is {_json_type(item)}, not an object")
        key = item.get("key")
        if key is None:  # the empty key: protobuf's JSON leaves out a field that holds its default
            key = ""
        elif not isinstance(key, str):
            raise DamagedSpan(f"an attribute key is {_json_type(key)}, not text")
        attributes[key] = _value(_field(item, "value", dict), key)
    return attributes


def _value(value: dict[str, Any], key: str) -> Any:
    """An AnyValue: text, a whole number, a number (NaN and infinities included, as OTLP has
    them), true or false, bytes, or a list or map of those; None if it holds none (``{}``, or
    its one member null, as protobuf's JSON has an unset value)."""
    for name, member in value.items():
        if member is not None:
            read = _VALUE_READERS.get(name)
            if read is not None:  # an unknown field is ignored, as OTLP JSON says
                return read(member, key)
    return None


def _string(member: Any, key: str) -> str:
    if not isinstance(member, str):
        raise DamagedSpan(f"stringValue is {_json_type(member)}, not text")
    return member


def _int(member: Any, key: str) -> int:
    return _whole_number(member, f"attribute {key}")


def _bool(member: Any, key: str) -> bool:
    if not isinstance(member, bool):
        raise DamagedSpan(f"attribute {key} is {_json_type(member)}, not true or false")
    return member


def _bytes(member: Any, key: str) -> bytes:
    """Base64, standard or URL-safe, padded or not: protobuf's JSON takes all four."""
    if not isinstance(member, str):
        raise DamagedSpan(f"bytesValue is {_json_type(member)}, not text")
    standard = member.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except ValueError:
        raise DamagedSpan(f"attribute {key} is not base64") from None


def _array(member: Any, key: str) -> list[Any]:
    return [_value(v, key) for v in _objects(_object(member, "arrayValue"), "values")]


def _kvlist(member: Any, key: str) -> dict[str, Any]:
    return _attributes(_field(_object(member, "kvlistValue"), "values", list))


def _object(member: Any, name: str) -> dict[str, Any]:
    if not isinstance(member, dict):
        raise DamagedSpan(f"{name} is {_json_type(member)}, not an object")
    return member


def _double(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DamagedSpan(f"attribute {key} is {_json_type(value)}, not a number")
    try:
        return float(value)  # "NaN", "Infinity", "-Infinity" too
    except ValueError:
        raise DamagedSpan(f"attribute {key} {value!r} is not a number") from None


_VALUE_READERS: dict[str, Callable[[Any, str], Any]] = {
    "stringValue": _string,
    "intValue": _int,
    "doubleValue": _double,
    "boolValue": _bool,
    "arrayValue": _array,
    "kvlistValue": _kvlist,
    "bytesValue": _bytes,
}
