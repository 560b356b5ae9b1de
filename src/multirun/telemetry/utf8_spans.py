"""Spans whose text UTF-8 can hold, so that one odd string never costs an OTLP batch.

    from multirun.telemetry.utf8_spans import utf8_safe_span

Python strings may hold lone surrogates (``os.fsdecode`` makes one of each byte of a
file name that is not UTF-8); protobuf refuses them. The OTLP encoder then fails the
whole batch for one in a span name or status message, and drops an attribute holding
one with a logged traceback. ``utf8_safe_span`` escapes them instead: ``\\xff`` for such
a byte, ``\\udXXX`` for another surrogate. The check costs one ``isascii`` per string
in the usual case, and happens in the export worker, off the application's path.
"""

from __future__ import annotations

import re
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, Status

_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_text(text: str) -> str:
    """``text`` itself if UTF-8 can encode it, else with each lone surrogate escaped:
    ``\\xff`` for a byte ``os.fsdecode`` could not decode, ``\\ud800`` for any other."""
    return text if _is_utf8(text) else _SURROGATE.sub(_escape_surrogate, text)


def utf8_json(text: str) -> str:
    """JSON ``text`` whose strings are escaped as ``utf8_text`` escapes them (the escape's
    backslash escaped in turn). A lone surrogate can only be inside a string of it."""
    return _SURROGATE.sub(_escape_surrogate_in_json, text)


def _is_utf8(text: str | None) -> bool:
    if text is None or text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def _utf8_or_none(text: str | None) -> str | None:
    return text and utf8_text(text)


def _escape_surrogate_in_json(match: re.Match[str]) -> str:
    return "\\" + _escape_surrogate(match)


def _value_is_utf8(value: Any) -> bool:
    if isinstance(value, str):
        return _is_utf8(value)
    if isinstance(value, (tuple, list)):
        return all(_value_is_utf8(v) for v in value)
    return True


def _attributes_are_utf8(attributes: Any) -> bool:
    return not attributes or all(_is_utf8(k) and _value_is_utf8(v) for k, v in attributes.items())


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, (tuple, list)):
        return tuple(_clean_value(v) for v in value)
    return value


def _clean_attributes(attributes: Any) -> Any:
    if _attributes_are_utf8(attributes):
        return attributes
    return {utf8_text(k): _clean_value(v) for k, v in attributes.items()}


class _CleanedSpan(ReadableSpan):
    """A copy of a span with its text made UTF-8; it keeps the original's dropped counts."""

    def __init__(self, original: ReadableSpan, **fields: Any) -> None:
        super().__init__(**fields)
        self._dropped = (original.dropped_attributes, original.dropped_events, original.dropped_links)

    @property
    def dropped_attributes(self) -> int:
        return self._dropped[0]

    @property
    def dropped_events(self) -> int:
        return self._dropped[1]

    @property
    def dropped_links(self) -> int:
        return self._dropped[2]


def _span_is_utf8(span: ReadableSpan) -> bool:
    scope = span.instrumentation_scope
    return (
        _is_utf8(span.name)
        and _is_utf8(span.status.description)
        and _attributes_are_utf8(span.attributes)
        and all(_is_utf8(e.name) and _attributes_are_utf8(e.attributes) for e in span.events)
        and all(_attributes_are_utf8(link.attributes) for link in span.links)
        and _attributes_are_utf8(span.resource.attributes)
        and _is_utf8(span.resource.schema_url)
        and (scope is None or _scope_is_utf8(scope))
    )


def _scope_is_utf8(scope: InstrumentationScope) -> bool:
    return (
        _is_utf8(scope.name)
        and _is_utf8(scope.version)
        and _is_utf8(scope.schema_url)
        and _attributes_are_utf8(scope.attributes)
    )


def utf8_safe_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` itself if all its text is UTF-8 (the usual case), else a copy whose text is.

    The OTLP encoder fails on the whole batch for one such string in a name or status
    message, and drops an attribute holding one with a logged traceback.
    """
    if _span_is_utf8(span):
        return span
    status = span.status
    if not _is_utf8(status.description):
        status = Status(status.status_code, utf8_text(status.description or ""))
    resource = span.resource
    if not (_attributes_are_utf8(resource.attributes) and _is_utf8(resource.schema_url)):
        resource = Resource(_clean_attributes(resource.attributes), _utf8_or_none(resource.schema_url))
    scope = span.instrumentation_scope
    if scope is not None and not _scope_is_utf8(scope):
        scope = InstrumentationScope(
            utf8_text(scope.name),
            _utf8_or_none(scope.version),
            _utf8_or_none(scope.schema_url),
            _clean_attributes(scope.attributes),
        )
    return _CleanedSpan(
        span,
        name=utf8_text(span.name),
        context=span.context,
        parent=span.parent,
        resource=resource,
        attributes=_clean_attributes(span.attributes),
        events=[Event(utf8_text(e.name), _clean_attributes(e.attributes), e.timestamp) for e in span.events],
        links=[Link(link.context, _clean_attributes(link.attributes)) for link in span.links],
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=scope,
    )
