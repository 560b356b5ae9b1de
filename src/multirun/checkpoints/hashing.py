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
cache; but a method's instance (or class) with no JSON form, an agent object that
holds an SDK client say, counts as its class (``method_input_hash``), so steps
that are methods are served.

Arguments that are JSON data already (dicts with str keys, lists, tuples, and
str, int, float, bool and None, none of them a subclass) are their own JSON
form, so they are written as they are, without converting them first.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
from typing import Any

from pydantic_core import to_jsonable_python

from multirun.checkpoints.serializers import BYTES_TAG, is_one_shot, json_form

_NO_ARGUMENTS = hashlib.sha256(b"[[],{}]").hexdigest()
_PLAIN = frozenset({str, int, float, bool, type(None)})
_CONTAINERS = frozenset({dict, list, tuple})
_sha256 = hashlib.sha256


def input_hash(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The hex SHA-256 of the call's arguments, or None when they cannot be hashed stably."""
    # The common case, plain scalars only, is about 4x cheaper than JSON: repr of these types
    # is exact and the same in every process (str repr escapes lone surrogates; floats
    # round-trip). issuperset(map(type, ...)) checks them without a Python-level loop.
    if not kwargs:
        if not args:
            return _NO_ARGUMENTS
        if len(args) != 1:
            if _PLAIN.issuperset(map(type, args)):
                return _repr_digest(args, kwargs)
        elif type(args[0]) in _PLAIN:
            # one argument, the most common call: the digest taken here, as _repr_digest does,
            # of its tuple's repr written by an f-string (the same text without the tuple repr's
            # recursion guard: 90 ns less, and this runs for every step)
            try:
                text = f"({args[0]!r},)"
            except ValueError:  # an int too long for repr
                return None
            return "r" + _sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[1:]
    elif _PLAIN.issuperset(map(type, args)) and _PLAIN.issuperset(map(type, kwargs.values())):
        return _repr_digest(args, kwargs)
    try:
        native = _is_json_data(args) and _is_json_data(kwargs)
    except Exception:  # nested very deeply, a cycle, a dict another thread changes: the JSON form decides
        native = False
    if native:
        try:
            text = _encode_json_data([args, kwargs])
        except (TypeError, ValueError, RecursionError):
            pass  # an int too long for str(), say: the JSON form decides, as for anything else
        else:
            return _sha256(text.encode("ascii")).hexdigest()
    return _json_form_digest(args, kwargs)


def method_input_hash(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The input hash of a method's call whose instance or class (``args[0]``) has no JSON
    form: the class's name stands for it. Steps that ran side by side are told apart by the
    other arguments only."""
    if not args:
        return None
    owner = args[0] if isinstance(args[0], type) else type(args[0])
    return input_hash(({_INSTANCE_TAG: owner.__qualname__}, *args[1:]), kwargs)


_INSTANCE_TAG = "__multirun_instance_of__"


def _json_form_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The digest of the arguments' JSON form (the definition; ``input_hash`` has shortcuts)."""
    try:
        plain_args, plain_kwargs = json_form([list(args), kwargs])
    except Exception:  # also the program's own objects failing when read: no hash, the step runs
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


def _repr_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The digest of plain scalar arguments, from their repr (marked by a leading "r"); None
    for an int too long for repr (``sys.get_int_max_str_digits()``), which JSON cannot write
    either."""
    try:
        text = repr(args) if not kwargs else repr((args, sorted(kwargs.items())))
    except ValueError:
        return None
    return "r" + _sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[1:]


def v1_input_hash(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The input hash multirun-otel 0.1.0 took (checkpoint format 1), by which a version 1
    checkpoint's cache knows its steps: JSON of the arguments as pydantic converts them, sets
    sorted by repr, for scalars too. A frozen copy of 0.1.0's: never change it."""
    try:
        text = json.dumps(
            [args, kwargs],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            default=_v1_canonical,
            allow_nan=True,
        )
    except Exception:  # no hash (an argument failed when read): the same digests as 0.1.0 otherwise
        return None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _v1_canonical(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if is_one_shot(value):
        raise TypeError(f"{type(value).__name__} is an iterator: reading it would consume it")
    return to_jsonable_python(value, fallback=_refuse)


def _is_json_data(container: dict[str, Any] | list[Any] | tuple[Any, ...]) -> bool:
    """Whether ``container`` holds only dicts with str keys, lists, tuples and plain scalars, all
    of exactly these types, and no key ``BYTES_TAG``: data that is its own JSON form, which
    json.dumps writes as ``json_form`` would (a tuple as a list). Subclasses (a str Enum, an
    IntEnum) and other keys (``1`` sorts before ``10``, ``"1"`` after ``"10"``) are not.

    RecursionError for a cycle. Dicts are checked inline, as messages come as lists of them.
    """
    if type(container) is dict:
        if BYTES_TAG in container:
            return False
        for key in container:
            if type(key) is not str:
                return False
        members: Any = container.values()
    elif len(container) > 8 and _PLAIN.issuperset(map(type, container)):
        return True  # a long list of scalars: checked without a Python-level loop
    else:
        members = container
    for member in members:
        kind = type(member)
        if kind in _PLAIN:
            continue
        if kind is dict:
            if BYTES_TAG in member:
                return False
            for key, item in member.items():
                if type(key) is not str:
                    return False
                kind = type(item)
                if kind not in _PLAIN and (kind not in _CONTAINERS or not _is_json_data(item)):
                    return False
        elif (kind is not list and kind is not tuple) or not _is_json_data(member):
            return False
    return True


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON data")


# json.dumps makes an encoder for every call and tracks the containers it is in to refuse
# cycles: made once, without that tracking (_is_json_data refused cycles), the same C encoder
# writes the same text in two thirds of the time. Arguments: markers (None: no tracking), default,
# str encoder (ensure_ascii), indent, key and item separators, sort_keys, skipkeys, allow_nan.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # None without the C accelerator
_C_ENCODER = (
    None
    if _make_encoder is None
    else _make_encoder(None, _refuse, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)
)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def _encode_json_data(value: list[Any]) -> str:
    """``value`` as json.dumps writes it with ``sort_keys`` and compact separators."""
    if _C_ENCODER is None:
        return _ENCODER.encode(value)
    return "".join(_C_ENCODER(value, 0))
