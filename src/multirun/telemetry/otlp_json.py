"""Spans in the OTLP JSON encoding, built straight from the SDK's ``ReadableSpan``.

    from multirun.telemetry.otlp_json import encode_spans_json

    request = encode_spans_json(spans)  # one ExportTraceServiceRequest, as a dict for json.dumps

The library route, opentelemetry-exporter-otlp-proto-common's encoder to protobuf messages then
protobuf's ``MessageToDict``, costs about 90 microseconds a span (half each). The local files'
exporter then wrote some 3,000 spans a second while it competed with the application for the
GIL, and an agent loop that made 9,000 lost two thirds of them to the full export queue. This
module builds the same dicts in a few microseconds a span; the tests hold its output to the
library route's, field for field.

The mapping is protobuf's JSON mapping of the OTLP messages, with OTLP JSON's exceptions:
lowerCamelCase names, trace and span ids as hex (not base64), enums as integers, 64-bit
integers as strings, and fields that hold their default value (0, "", an empty list) left
out, while a message field that is set (a span's ``status``, a resource) is written even
when it is empty, as ``{}``.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

_logger = logging.getLogger(__name__)

# OTLP's Span.SpanKind numbers the API's kinds from 1 (0 is SPAN_KIND_UNSPECIFIED)
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
# SpanFlags: the parent's is_remote is known (always), and whether it is remote
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
# bounds, not range objects: `in range` walks the whole range for an int subclass (IntEnum)
_INT64_MIN, _INT64_END, _UINT64_END = -(2**63), 2**63, 2**64

JsonObject = dict[str, Any]


def encode_spans_json(spans: Sequence[ReadableSpan]) -> JsonObject:
    """One ExportTraceServiceRequest holding ``spans``, grouped by resource then by scope."""
    by_resource: dict[Resource, dict[InstrumentationScope | None, list[JsonObject]]] = {}
    for span in spans:
        scopes = by_resource.get(span.resource)
        if scopes is None:
            scopes = by_resource[span.resource] = {}
        scope = span.instrumentation_scope or None
        encoded = scopes.get(scope)
        if encoded is None:
            encoded = scopes[scope] = []
        encoded.append(_span(span))
    if not by_resource:
        return {}
    return {
        "resourceSpans": [
            _with_schema_url(
                {
                    "resource": _optional(attributes=_attributes(resource.attributes)),
                    "scopeSpans": [
                        _with_schema_url(
                            {"scope": _scope(scope), "spans": encoded},
                            scope.schema_url if scope is not None else None,
                        )
                        for scope, encoded in scopes.items()
                    ],
                },
                resource.schema_url,
            )
            for resource, scopes in by_resource.items()
        ]
    }


def _span(span: ReadableSpan) -> JsonObject:
    context = span.get_span_context()
    assert context is not None  # an SDK span always has one
    out: JsonObject = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    if context.trace_state:
        out["traceState"] = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
    parent = span.parent
    if parent is not None:
        out["parentSpanId"] = f"{parent.span_id:016x}"
    if span.name:
        out["name"] = span.name
    out["kind"] = _KIND[span.kind]
    if span.start_time:
        out["startTimeUnixNano"] = _uint64(span.start_time)
    if span.end_time:
        out["endTimeUnixNano"] = _uint64(span.end_time)
    attributes = _attributes(span.attributes)
    if attributes:
        out["attributes"] = attributes
    if span.dropped_attributes:
        out["droppedAttributesCount"] = span.dropped_attributes
    if span.events:
        out["events"] = [
            _optional(
                timeUnixNano=_uint64(event.timestamp) if event.timestamp else None,
                name=event.name,
                attributes=_attributes(event.attributes),
                droppedAttributesCount=event.dropped_attributes,
            )
            for event in span.events
        ]
    if span.dropped_events:
        out["droppedEventsCount"] = span.dropped_events
    if span.links:
        out["links"] = [
            _optional(
                traceId=f"{link.context.trace_id:032x}",
                spanId=f"{link.context.span_id:016x}",
                attributes=_attributes(link.attributes),
                droppedAttributesCount=link.dropped_attributes,
                flags=_flags(link.context.is_remote),
            )
            for link in span.links
        ]
    if span.dropped_links:
        out["droppedLinksCount"] = span.dropped_links
    status = span.status
    if status is not None:  # a span made by hand may have none
        out["status"] = _optional(code=status.status_code.value, message=status.description)
    out["flags"] = _flags(parent is not None and parent.is_remote)
    return out


def _flags(remote: bool) -> int:
    return _HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE


def _scope(scope: InstrumentationScope | None) -> JsonObject:
    if scope is None:
        return {}
    return _optional(name=scope.name, version=scope.version, attributes=_attributes(scope.attributes))


def _with_schema_url(out: JsonObject, schema_url: str | None) -> JsonObject:
    if schema_url:
        out["schemaUrl"] = schema_url
    return out


def _optional(**fields: Any) -> JsonObject:
    """The fields that do not hold their default value (None, 0, "", an empty list)."""
    return {name: value for name, value in fields.items() if value}


def _attributes(attributes: Mapping[str, Any] | None) -> list[JsonObject]:
    """KeyValue list; an attribute whose value OTLP cannot hold is left out with a warning,
    as the library's encoder does (it logs the error)."""
    if not attributes:
        return []
    out = []
    for key, value in attributes.items():
        try:
            if not isinstance(key, str):  # a span made by hand: the SDK drops such keys
                raise TypeError(f"key {key!r} is not text")
            out.append({"key": key, "value": _any_value(value)})
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: a list holding itself
            _logger.warning("multirun: attribute %r left out of the exported span: %s", key, exc)
    return out


def _any_value(value: Any) -> JsonObject:
    """AnyValue of an attribute value. Exact types first: they are nearly all of them."""
    kind = type(value)
    if kind is str:
        return {"stringValue": value}
    if kind is int:
        return {"intValue": _int64(value)}
    if kind is bool:
        return {"boolValue": value}
    if kind is float:
        return {"doubleValue": _double(value)}
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"boolValue": bool(value)}
    if isinstance(value, str):  # its text: str() of a (str, Enum) member is "Role.PLANNER"
        return {"stringValue": str.__str__(value)}
    if isinstance(value, int):
        return {"intValue": _int64(value)}
    if isinstance(value, float):
        return {"doubleValue": _double(float(value))}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Sequence):
        values = [_any_value(item) for item in value]
        return {"arrayValue": {"values": values} if values else {}}
    if isinstance(value, Mapping):
        pairs = [{"key": str(key), "value": _any_value(item)} for key, item in value.items()]
        return {"kvlistValue": {"values": pairs} if pairs else {}}
    raise TypeError(f"{kind.__name__} is not an attribute value type")


def _int64(value: int) -> str:
    if not _INT64_MIN <= value < _INT64_END:
        raise ValueError(f"Value out of range: {value}")
    return str(int(value))


def _uint64(value: int) -> str:
    if not isinstance(value, int):  # a time of a span made by hand: protobuf refuses a float too
        raise TypeError(f"{type(value).__name__} is not an integer")
    if not 0 <= value < _UINT64_END:
        raise ValueError(f"Value out of range: {value}")
    return str(int(value))


def _double(value: float) -> float | str:
    """A double as protobuf's JSON mapping writes it: NaN and the infinities as strings."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
