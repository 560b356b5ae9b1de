"""A step's input hash: the same for the same arguments in any process.

The hash is SHA-256 over a canonical JSON text of the arguments (keys sorted,
pydantic models and dataclasses as their fields), so it does not depend on
dict order, PYTHONHASHSEED or object addresses. Arguments with no faithful JSON
form give no hash, and such a step is simply never served from the cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic_core import to_jsonable_python

_NO_ARGUMENTS = hashlib.sha256(b"[[],{}]").hexdigest()
_PLAIN = frozenset({str, int, float, bool, type(None)})
_sha256 = hashlib.sha256


def input_hash(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The hex SHA-256 of the call's arguments, or None when they cannot be hashed stably."""
    # The common case, plain scalars only, is about 4x cheaper than JSON: repr of these types
    # is exact and the same in every process (str repr escapes lone surrogates; floats
    # round-trip). issuperset(map(type, ...)) checks them without a Python-level loop.
    if not kwargs:
        if not args:
            return _NO_ARGUMENTS
        if _PLAIN.issuperset(map(type, args)):
            return "r" + _sha256(repr(args).encode("utf-8", "surrogatepass")).hexdigest()[1:]
    elif _PLAIN.issuperset(map(type, args)) and _PLAIN.issuperset(map(type, kwargs.values())):
        text = repr((args, sorted(kwargs.items())))
        return "r" + _sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[1:]
    try:
        text = json.dumps(
            [args, kwargs],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,  # lone surrogates such as "\ud800" stay encodable
            default=_canonical,
            allow_nan=True,
        )
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return to_jsonable_python(value, fallback=_refuse)


def _refuse(value: Any) -> Any:
    raise TypeError(f"no stable form for {type(value).__name__}")
