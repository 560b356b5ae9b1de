"""Turning step inputs and outputs into bounded span attribute strings.

Content is only recorded when the user opts in. A value is rendered at most
``limit`` characters long, and a huge string is cut *before* it is copied, so
that a 10 MB prompt never costs 10 MB of telemetry.
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
from typing import Any

from pydantic import BaseModel

_SUFFIX = "...[truncated]"


def render(value: Any, limit: int) -> str:
    """A JSON-ish text of ``value``, truncated to ``limit`` characters; never raises."""
    try:
        return _render(value, limit)
    except Exception:  # the program's own __str__ or __eq__ failing must not fail its step
        return _cut(_unrenderable(value), limit)


def _render(value: Any, limit: int) -> str:
    if isinstance(value, str):
        text = value if len(value) <= limit else value[:limit]
        cut = len(value) > limit
    elif isinstance(value, (bytes, bytearray)):
        text, cut = f"<{len(value)} bytes>", False
    else:
        text, cut = _json_or_repr(value, limit)
    return text[: max(limit - len(_SUFFIX), 0)] + _SUFFIX if cut else _cut(text, limit)


def _cut(text: str, limit: int) -> str:
    if len(text) > limit:
        return text[: max(limit - len(_SUFFIX), 0)] + _SUFFIX
    return text


def _unrenderable(value: Any) -> str:
    return f"<{type(value).__name__} object>"


def render_call(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> str:
    """The arguments of a call as one bounded text."""
    if not kwargs:
        return render(list(args) if len(args) != 1 else args[0], limit)
    return render({"args": list(args), "kwargs": kwargs}, limit)


def _json_or_repr(value: Any, limit: int) -> tuple[str, bool]:
    if _small(value):
        try:
            return json.dumps(value, default=_default, ensure_ascii=False), False
        except Exception:  # not JSON (or its __str__ raised): the bounded repr below
            pass
    limited = _BoundedRepr()
    limited.maxstring = limit
    limited.maxother = limit
    limited.maxlong = limit
    return limited.repr(value), False


def _fields(value: Any) -> dict[str, Any] | None:
    """The fields of a pydantic model or a dataclass, as a shallow dict (nothing is copied)."""
    if isinstance(value, BaseModel):
        return dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def _default(value: Any) -> Any:
    fields = _fields(value)
    if fields is not None:
        return fields
    try:
        return str(value)
    except Exception:
        return _unrenderable(value)


def _small(value: Any, budget: int = 64) -> bool:
    """True when ``value`` is a flat enough structure to dump whole without blowing up."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value) < 65_536
    if isinstance(value, (list, tuple, set, frozenset)):
        return len(value) <= budget and all(_small(v, budget // 4) for v in value)
    if isinstance(value, dict):
        return len(value) <= budget and all(_small(v, budget // 4) for v in value.values())
    fields = _fields(value)
    if fields is not None:
        return _small(fields, budget)
    return True


class _BoundedRepr(reprlib.Repr):
    """reprlib's bounded repr, which also bounds bytes, pydantic models and dataclasses
    (its fallback would call ``repr`` on them whole: 40 MB of text for 10 MB of bytes)."""

    def repr_bytes(self, value: bytes, level: int) -> str:
        return f"<{len(value)} bytes>"

    repr_bytearray = repr_bytes

    def repr_instance(self, value: Any, level: int) -> str:
        fields = _fields(value)
        if fields is not None:
            return f"{type(value).__name__}({self.repr1(fields, level - 1)})"
        return super().repr_instance(value, level)
