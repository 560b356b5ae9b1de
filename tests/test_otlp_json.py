"""The OTLP JSON encoder of the local files gives what the library route gives.

The library route, opentelemetry-exporter-otlp-proto-common's encoder then protobuf's
MessageToDict (with ids turned to hex, as OTLP JSON has them), is the definition; the
package's encoder is a faster way to the same dicts, so every kind of span is checked
against it.
"""

from __future__ import annotations

import base64
import enum
import http
import json
import logging
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from multirun.telemetry.local_files import parse_span_line
from multirun.telemetry.otlp_json import encode_spans_json


def library_route(spans: list[ReadableSpan]) -> dict[str, Any]:
    message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                for holder in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in holder:
                            holder[key] = base64.b64decode(holder[key]).hex()
    return message


def traced(
    build: Any, resource: Resource | None = None, limits: SpanLimits | None = None
) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({}), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    build(provider)
    provider.shutdown()
    return list(exporter.get_finished_spans())


EVERY_VALUE_TYPE = {
    "s": "text",
    "empty": "",
    "unicode": "日本語 🚀",
    "i": 42,
    "zero": 0,
    "negative": -7,
    "big": 2**63 - 1,
    "f": 1.5,
    "fzero": 0.0,
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "t": True,
    "false": False,
    "strings": ("a", "", "c"),
    "ints": (1, 0, -2),
    "floats": (0.5, 0.0),
    "bools": (True, False),
    "none_of_them": (),
}


def test_spans_with_every_field_encode_as_the_library_encodes_them() -> None:
    remote_parent = SpanContext(
        0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "x1")])
    )

    def build(provider: TracerProvider) -> None:
        tracer = provider.get_tracer(
            "multirun", "1.2.3", schema_url="https://opentelemetry.io/schemas/1.30.0"
        )
        other = provider.get_tracer("other.lib", attributes={"scope.attr": "v"})
        bare = provider.get_tracer("")
        with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes=EVERY_VALUE_TYPE) as root:
            root.add_event("plain event")
            root.add_event("with attributes", {"n": 1, "list": ("x",)}, timestamp=123)
            with other.start_as_current_span(
                "child",
                kind=SpanKind.CLIENT,
                links=[Link(remote_parent, {"why": "upstream"}), Link(root.get_span_context())],
            ) as child:
                child.set_status(Status(StatusCode.ERROR, "it broke"))
            with bare.start_as_current_span("ok", kind=SpanKind.PRODUCER) as ok:
                ok.set_status(StatusCode.OK)
        remote = set_span_in_context(NonRecordingSpan(remote_parent))
        with tracer.start_as_current_span("continued", context=remote, kind=SpanKind.CONSUMER):
            pass
        tracer.start_span("", kind=SpanKind.INTERNAL).end()

    resource = Resource({"service.name": "svc", "n": 3}, schema_url="https://example.com/schema")
    spans = traced(build, resource)
    assert encode_spans_json(spans) == library_route(spans)


class Role(str, enum.Enum):  # as pydantic models and multirun.models declare theirs
    PLANNER = "planner"


class Level(enum.IntEnum):
    HIGH = 3


class Ratio(float):
    pass


def test_attribute_values_of_subclasses_encode_as_the_library_encodes_them() -> None:
    # the SDK keeps them as they are: a str enum is its value, not "Role.PLANNER"
    values = {
        "role": Role.PLANNER,
        "roles": (Role.PLANNER, "writer"),
        "status": http.HTTPStatus.NOT_FOUND,
        "level": Level.HIGH,
        "levels": (Level.HIGH, 1),
        "ratio": Ratio(0.25),
    }
    spans = traced(lambda p: p.get_tracer("t").start_span("enums", attributes=values).end())
    encoded = encode_spans_json(spans)
    assert encoded == library_route(spans)
    [span] = encoded["resourceSpans"][0]["scopeSpans"][0]["spans"]
    written = json.loads(json.dumps(span["attributes"]))
    assert written[0] == {"key": "role", "value": {"stringValue": "planner"}}


def test_dropped_attributes_events_and_links_are_counted_as_the_library_counts_them() -> None:
    def build(provider: TracerProvider) -> None:
        tracer = provider.get_tracer("t")
        links = [Link(SpanContext(1, n, False)) for n in range(1, 4)]
        with tracer.start_as_current_span(
            "full", attributes={f"a{n}": n for n in range(5)}, links=links
        ) as span:
            for n in range(4):
                span.add_event(f"e{n}", {f"k{m}": m for m in range(4)})

    limits = SpanLimits(max_span_attributes=2, max_events=2, max_links=1, max_event_attributes=1)
    spans = traced(build, limits=limits)
    encoded = encode_spans_json(spans)
    [span] = encoded["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert span["droppedAttributesCount"] == 3 and span["droppedEventsCount"] == 2
    assert encoded == library_route(spans)


def test_spans_of_several_resources_and_a_span_with_no_scope_are_grouped_as_the_library_groups_them() -> None:
    first = traced(
        lambda p: p.get_tracer("a").start_span("one").end(), Resource.create({"service.name": "a"})
    )
    second = traced(
        lambda p: p.get_tracer("b").start_span("two").end(), Resource.create({"service.name": "b"})
    )
    no_scope = ReadableSpan("made by hand", SpanContext(5, 6, False), start_time=1, end_time=2)
    spans = [first[0], second[0], no_scope, first[0]]
    assert encode_spans_json(spans) == library_route(spans)
    assert encode_spans_json([]) == library_route([]) == {}


def test_an_attribute_otlp_cannot_hold_is_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    def build(provider: TracerProvider) -> None:
        provider.get_tracer("t").start_span("big", attributes={"huge": 2**64, "kept": 1}).end()

    spans = traced(build)
    with caplog.at_level(logging.ERROR, logger="opentelemetry"):
        expected = library_route(spans)
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert encode_spans_json(spans) == expected
    [span] = expected["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert [a["key"] for a in span["attributes"]] == ["kept"]
    assert "attribute 'huge' left out of the exported span" in caplog.text


def test_spans_made_by_hand_encode_as_the_library_encodes_them(caplog: pytest.LogCaptureFixture) -> None:
    # spans converted from another system: the SDK's checks of keys and values never ran on them
    itself: list[Any] = []
    itself.append(itself)
    spans = [
        ReadableSpan("int key", SpanContext(1, 2, False), attributes={404: "not found", "kept": 1}),
        ReadableSpan("nothing OTLP can hold", SpanContext(1, 3, False), attributes={"huge": (2**64,)}),
        ReadableSpan("no status", SpanContext(1, 4, False), status=None),  # type: ignore[arg-type]
        ReadableSpan("holds itself", SpanContext(1, 5, False), attributes={"me": itself, "kept": 1}),
    ]
    with caplog.at_level(logging.CRITICAL, logger="opentelemetry"):
        expected = library_route(spans)
    assert encode_spans_json(spans) == expected
    # an attribute key that is no text made `multirun runs` leave the whole span out
    written = json.dumps(encode_spans_json(spans))
    assert [s.name for s in parse_span_line(written)] == [
        "int key",
        "nothing OTLP can hold",
        "no status",
        "holds itself",
    ]
