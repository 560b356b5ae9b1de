"""What the peer programs share: the model call another instrumentation traces in their steps,
and what they print (their exported spans and facts, one JSON document on stdout)."""

from __future__ import annotations

import json
import sys
from typing import Any

# the span another instrumentation makes of a model call: its name, and its usage as attributes
FOREIGN_CALL = "chat gpt-4o-mini"
FOREIGN_CALL_ATTRIBUTES = {
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": "gpt-4o-mini",
    "gen_ai.usage.input_tokens": 1000,
    "gen_ai.usage.output_tokens": 100,
}


def span_json(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "id": f"{span.context.span_id:016x}",
        "parent": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "trace": f"{span.context.trace_id:032x}",
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
        "attributes": dict(span.attributes or {}),
    }


def report(spans: Any = (), **facts: Any) -> None:
    """Print ``facts`` and ``spans`` (ReadableSpans) as one JSON document."""
    facts["spans"] = [span_json(s) for s in spans]
    json.dump(facts, sys.stdout, default=repr)
    sys.stdout.write("\n")
    sys.stdout.flush()
