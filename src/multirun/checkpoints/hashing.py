"""A step's input hash: the same for the same arguments in any process.

The hash is SHA-256 over a canonical JSON text of the arguments' JSON form (keys
sorted, pydantic models and dataclasses as their fields, sets sorted), so it does
not depend on dict order, set order, PYTHONHASHSEED or object addresses. The JSON
form is the one the JSON checkpoint serializer writes (``serializers.json_form``),
so a value hashes the same as what a restored checkpoint serves for it: an Enum, a
datetime, a Decimal or a UUID that one step returns and the next step takes gives
that step the same hash in the first run and after a restore, where the next step
gets the value's JSON form (its value, an ISO string, a str). Arguments with no
faithful JSON form give no hash, and such a step is simply never served from the
cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from multirun.checkpoints.serializers import json_form

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
            return _repr_digest(args, kwargs)
    elif _PLAIN.issuperset(map(type, args)) and _PLAIN.issuperset(map(type, kwargs.values())):
        return _repr_digest(args, kwargs)
    try:
        plain_args, plain_kwargs = json_form([list(args), kwargs])
    except (TypeError, ValueError, RecursionError):
        return None
    if _PLAIN.issuperset(map(type, plain_args)) and _PLAIN.issuperset(map(type, plain_kwargs.values())):
        # every argument is a scalar in JSON (an Enum, a datetime, ...): hashed as that scalar
        # is, whether it comes as itself or, served from a checkpoint, as its JSON form
        return _repr_digest(tuple(plain_args), plain_kwargs)
    try:
        text = json.dumps(
            [plain_args, plain_kwargs],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,  # lone surrogates such as "\ud800" stay encodable
            allow_nan=True,
        )
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _repr_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The digest of plain scalar arguments, from their repr (marked by a leading "r")."""
    text = repr(args) if not kwargs else repr((args, sorted(kwargs.items())))
    return "r" + _sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[1:]
