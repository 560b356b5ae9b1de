"""Serializers: how checkpoint contents become bytes, and back.

    serializer = get_serializer("json", hmac_key=None)
    blob, digest = dump_blob({"answer": 42, "raw": b"\\x00"}, serializer)
    header, value = load_blob(blob, max_bytes=1 << 20)   # {"answer": 42, "raw": b"\\x00"}

``json`` is the default and the only serializer a reader accepts unless told
otherwise. It writes plain data; what comes back is:

==============================  =============================================
written                          read back
==============================  =============================================
str (any code point, including   the same str, exactly: the payload is UTF-8
lone surrogates, NUL, emoji)     with lone surrogates kept (``surrogatepass``)
int (any size below Python's     the same int (a longer one is refused with
int/str digit limit)             CheckpointError)
float, including nan, inf,       the same float (written as ``NaN``,
-inf and -0.0                    ``Infinity``, ``-Infinity``, as Python's json
                                 module does)
bool, None                       the same
bytes, bytearray, memoryview     bytes (tagged ``{"__multirun_bytes__": b64}``)
dict, Mapping                    dict; str keys as they are, other keys as
                                 pydantic turns them into strings (1 -> "1");
                                 two keys that meet as one string are refused
list, tuple, deque               list
set, frozenset                   list, sorted by each item's JSON text
Enum                             its value, converted by these same rules
pydantic model                   dict of ``model_dump(by_alias=True)``, converted
dataclass instance               dict of its fields, converted
datetime, date, time             ISO 8601 str as pydantic writes it
                                 ("2025-01-02T03:04:05Z"); a UTC offset with
                                 seconds, which pydantic would cut, is written
                                 whole as ``isoformat()`` does
timedelta                        ISO 8601 duration str ("PT1.5S")
Decimal, UUID, Path, ...         str (whatever ``to_jsonable_python`` gives)
anything else                    refused with CheckpointError
==============================  =============================================

A dict with the key ``__multirun_bytes__`` is refused (the tag must stay
unambiguous). Nothing is ever silently dropped or replaced, and JSON never
falls back to pickle.

``pickle`` and ``cloudpickle`` keep Python objects as they are, but loading
them can run any code, so they are used only when asked for by name, and only
with an HMAC key: blobs are signed when written and verified before a byte is
unpickled (see ``envelope``). Without a key, ``get_serializer`` raises
ConfigurationError. ``cloudpickle`` needs ``pip install 'multirun-otel[pickle]'``.

The HMAC key comes from the ``hmac_key`` argument or else from the
environment variable ``MULTIRUN_CHECKPOINT_HMAC_KEY``. As text (either
source) it is read as hex if it is ``hex:<digits>`` or only an even number
of hex digits, as its UTF-8 bytes if it is ``raw:<text>`` or anything else;
``bytes`` are used as they are. It must be at least 16 bytes (32 random bytes
recommended: ``python -c "import secrets; print(secrets.token_hex(32))"``).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import pickle
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from datetime import datetime, time, timedelta
from enum import Enum
from types import ModuleType
from typing import Any, BinaryIO, Protocol, runtime_checkable

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, from_json, to_json, to_jsonable_python

from multirun.checkpoints.envelope import (
    DEFAULT_ALLOWED_SERIALIZERS,
    HMAC_KEY_ENV,
    HMAC_KEY_SETTINGS,
    Blob,
    Compression,
    Payload,
    decode_blob,
    seal,
)
from multirun.errors import CheckpointDecodeError, CheckpointError, ConfigurationError

__all__ = [
    "BYTES_TAG",
    "HMAC_KEY_ENV",
    "MIN_HMAC_KEY_BYTES",
    "CloudpickleSerializer",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "dump_blob",
    "get_serializer",
    "json_form",
    "load_blob",
    "resolve_hmac_key",
    "serializer_names",
]

BYTES_TAG = "__multirun_bytes__"
_BYTES_TAG_UTF8 = BYTES_TAG.encode()
MIN_HMAC_KEY_BYTES = 16
PICKLE_PROTOCOL = 5
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+\Z")


@runtime_checkable
class Serializer(Protocol):
    """Turns checkpoint contents into bytes and back; ``name`` goes in the blob header."""

    @property
    def name(self) -> str:
        """The registry name, written to the blob header."""
        ...

    @property
    def hmac_key(self) -> bytes | None:
        """The key blobs are signed with, or None (then only ``json`` may be used)."""
        ...

    def dumps(self, obj: Any) -> bytes:
        """The payload for ``obj``; CheckpointError if it cannot be serialized faithfully."""
        ...

    def loads(self, data: Payload) -> Any:
        """The value of a payload; CheckpointError if it cannot be decoded.

        ``decode_blob`` verified the payload first, or, for JSON, verifies it meanwhile.
        """
        ...


class JsonSerializer:
    """Plain JSON (the default): safe to load from anywhere, faithful for plain data."""

    name = "json"

    def __init__(self, *, hmac_key: bytes | str | None = None, decode_bytes_tags: bool = True) -> None:
        self.hmac_key = resolve_hmac_key(hmac_key)
        # Version 1 blobs were written before bytes were tagged: read them untouched.
        self._hook: Callable[[dict[str, Any]], Any] | None = _untag if decode_bytes_tags else None

    def dumps(self, obj: Any) -> bytes:
        """Compact JSON, UTF-8 with lone surrogates kept; CheckpointError names what has no JSON form."""
        already_plain = _already_plain(obj)
        if already_plain:
            # pydantic-core's encoder (Rust) writes the same JSON three to four times faster than
            # the json module; it refuses lone surrogates, which the json module below keeps
            try:
                return to_json(obj, inf_nan_mode="constants")
            except (PydanticSerializationError, ValueError, TypeError):
                pass
        try:
            plain = obj if already_plain else _plain(obj)
            text = json.dumps(plain, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
        except _NoJsonForm as exc:
            where = "".join(f"[{key}]" for key in reversed(exc.path)) or "the value"
            raise CheckpointError(
                f"checkpoint state is not JSON-serializable: {where}: {exc.reason}; {exc.hint}"
            ) from None
        except RecursionError:
            raise CheckpointError(
                "checkpoint state is nested too deeply or contains a reference cycle"
            ) from None
        except ValueError as exc:  # e.g. an int longer than sys.get_int_max_str_digits()
            raise CheckpointError(f"checkpoint state is not JSON-serializable: {exc}") from None
        return text.encode("utf-8", "surrogatepass")

    def loads(self, data: Payload) -> Any:
        """The plain data of a JSON payload (bytes tags turned back into bytes)."""
        raw = data if type(data) is bytes else bytes(data)
        if self._hook is None or _BYTES_TAG_UTF8 not in raw:
            # no bytes tag to turn back: pydantic-core's parser, about three times faster than the
            # json module, gives the same values; it refuses what is not UTF-8 (a lone surrogate,
            # written as it is) and nesting past ~250 levels, left to the json module below
            try:
                return from_json(raw, cache_strings="keys")
            except (ValueError, TypeError):  # TypeError: a pydantic-core without these options
                pass
        try:
            text = str(raw, "utf-8", "surrogatepass")
            # the hook runs for every object: skip it when no bytes tag can be in the payload
            hook = self._hook if self._hook is not None and BYTES_TAG in text else None
            return json.loads(text, object_hook=hook)
        except (ValueError, RecursionError) as exc:
            raise CheckpointDecodeError(f"JSON checkpoint payload cannot be decoded: {exc}") from None


class PickleSerializer:
    """Python's pickle (protocol 5). Loading runs code: only with an HMAC key, only when asked for."""

    name = "pickle"

    def __init__(self, *, hmac_key: bytes | str | None = None) -> None:
        key = resolve_hmac_key(hmac_key)
        if key is None:
            raise ConfigurationError(
                f"the {self.name!r} checkpoint serializer can run arbitrary code when a checkpoint is "
                f"loaded, so it needs an HMAC key ({HMAC_KEY_SETTINGS}), e.g. the output of "
                '`python -c "import secrets; print(secrets.token_hex(32))"`'
            )
        self.hmac_key: bytes = key

    def dumps(self, obj: Any) -> bytes:
        """The pickle of ``obj``; CheckpointError if it cannot be pickled."""
        try:
            return self._dumps(obj)
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint state cannot be serialized with {self.name}: {type(exc).__name__}: {exc}"
            ) from exc

    def loads(self, data: Payload) -> Any:
        """Unpickle ``data``. Give it only a payload whose HMAC ``decode_blob`` verified."""
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise CheckpointDecodeError(
                f"{self.name} checkpoint payload cannot be loaded: {type(exc).__name__}: {exc}"
            ) from exc

    def _dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


class CloudpickleSerializer(PickleSerializer):
    """cloudpickle: also lambdas, closures and classes defined in ``__main__``. Same rules as pickle."""

    name = "cloudpickle"

    def __init__(self, *, hmac_key: bytes | str | None = None) -> None:
        super().__init__(hmac_key=hmac_key)
        try:
            self._cloudpickle: ModuleType = importlib.import_module("cloudpickle")
        except ImportError:
            raise ConfigurationError(
                "the 'cloudpickle' checkpoint serializer needs cloudpickle: "
                "pip install 'multirun-otel[pickle]'"
            ) from None

    def _dumps(self, obj: Any) -> bytes:
        data: bytes = self._cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL)
        return data


_REGISTRY: dict[str, Callable[[bytes | str | None], Serializer]] = {
    "json": lambda key: JsonSerializer(hmac_key=key),
    "pickle": lambda key: PickleSerializer(hmac_key=key),
    "cloudpickle": lambda key: CloudpickleSerializer(hmac_key=key),
}


def serializer_names() -> list[str]:
    """The names ``get_serializer`` knows."""
    return list(_REGISTRY)


def get_serializer(name: str = "json", *, hmac_key: bytes | str | None) -> Serializer:
    """The serializer called ``name``; ConfigurationError if unknown, or pickle-based without a key.

    ``hmac_key`` (or, when None, ``MULTIRUN_CHECKPOINT_HMAC_KEY``) signs the
    blobs it writes; ``json`` works without one.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigurationError(
            f"unknown checkpoint serializer {name!r}: choose one of {', '.join(_REGISTRY)}"
        )
    return factory(hmac_key)


def resolve_hmac_key(
    hmac_key: bytes | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    name: str = "hmac_key",
) -> bytes | None:
    """The HMAC key from the argument, else from ``MULTIRUN_CHECKPOINT_HMAC_KEY``, else None.

    ``name`` is what errors call the argument (``multirun.init`` says ``checkpoint_hmac_key``).
    """
    setting = name
    if hmac_key is None:
        text = (os.environ if environ is None else environ).get(HMAC_KEY_ENV, "").strip()
        if not text:
            return None
        setting, hmac_key = HMAC_KEY_ENV, text
    if isinstance(hmac_key, str):
        key = _parse_key(hmac_key.strip(), setting)
    elif isinstance(hmac_key, (bytes, bytearray)):
        key = bytes(hmac_key)
    else:
        raise ConfigurationError(f"{setting} must be bytes or str, not {type(hmac_key).__name__}")
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise ConfigurationError(
            f"{setting} is {len(key)} bytes; an HMAC key needs at least {MIN_HMAC_KEY_BYTES} "
            "(32 random bytes recommended, e.g. 64 hex digits)"
        )
    return key


def _parse_key(text: str, setting: str) -> bytes:
    """A key written as text: ``hex:<digits>``, ``raw:<text>``, bare hex digits, or any other text."""
    if text.startswith("raw:"):
        return text[4:].encode("utf-8")
    if text.startswith("hex:") or _HEX.match(text):
        digits = text[4:] if text.startswith("hex:") else text
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise ConfigurationError(f"{setting} starts with 'hex:' but is not hex digits") from None
    return text.encode("utf-8")


def dump_blob(
    obj: Any,
    serializer: Serializer,
    *,
    compression: Compression = "none",
    meta: Mapping[str, Any] | None = None,
) -> tuple[bytes, str]:
    """Serialize ``obj`` and seal it, with ``meta`` as its meta section if given: the blob and its digest."""
    payload = serializer.dumps(obj)
    return seal(payload, serializer.name, serializer.hmac_key, compression=compression, meta=meta)


def load_blob(
    blob: Blob | BinaryIO,
    *,
    max_bytes: int,
    hmac_key: bytes | str | None = None,
    allowed_serializers: Collection[str] = DEFAULT_ALLOWED_SERIALIZERS,
) -> tuple[dict[str, Any], Any]:
    """Verify ``blob`` and deserialize it (see ``decode_blob``): the header and the value.

    ``hmac_key`` defaults to ``MULTIRUN_CHECKPOINT_HMAC_KEY``. Only serializers
    in ``allowed_serializers`` are read (``json`` unless told otherwise).
    """
    key = resolve_hmac_key(hmac_key)

    def decode(header: dict[str, Any], payload: Payload) -> Any:
        reader: Serializer
        if header["serializer"] == "json":
            reader = JsonSerializer(hmac_key=key, decode_bytes_tags=header["version"] >= 2)
        else:
            reader = get_serializer(header["serializer"], hmac_key=key)
        return reader.loads(payload)

    return decode_blob(
        blob, decode, max_bytes=max_bytes, hmac_key=key, allowed_serializers=allowed_serializers
    )


# --- JSON conversion ---------------------------------------------------------------------------


class _NoJsonForm(Exception):
    """Raised inside ``_plain``; ``path`` collects the keys on the way out."""

    def __init__(
        self,
        reason: str,
        hint: str = "convert it to plain data, or choose the pickle serializer (with an HMAC key)",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.path: list[str] = []


_SCALARS = frozenset({str, int, float, bool, type(None)})
_BIG_INT = 1 << 64


def _already_plain(value: Any) -> bool:
    """True if ``value`` is JSON data already (dicts with str keys, lists, exact scalars), so it
    can go to ``json.dumps`` as it is. A type check per item: cheaper than ``_plain``'s copy."""
    scalars = _SCALARS
    if type(value) in scalars:
        return type(value) is not int or -_BIG_INT < value < _BIG_INT
    stack = [value]
    # Containers that hold containers, met twice (shared, or a cycle): let _plain decide. A leaf
    # container cannot be part of a cycle, so it is not recorded (most containers are leaves).
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            if BYTES_TAG in item:
                return False
            for key in item:
                if type(key) is not str:
                    return False
            values: Any = item.values()
        elif kind is list:
            values = item
        else:
            return False
        pending = len(stack)
        for member in values:
            member_kind = type(member)
            if member_kind in scalars:
                if member_kind is int and not -_BIG_INT < member < _BIG_INT:
                    return False  # _plain's path refuses ints too long to be read back
                continue
            if member_kind is dict or member_kind is list:
                stack.append(member)
            else:
                return False
        if len(stack) != pending:
            if id(item) in seen:
                return False
            seen.add(id(item))
    return True


def json_form(value: Any) -> Any:
    """``value`` as the JSON serializer writes it, which is also what a restored checkpoint gives
    back for it (bytes excepted: they stay bytes, and are written as the same tag again).
    TypeError if it has no JSON form."""
    if _already_plain(value):
        return value
    try:
        return _plain(value)
    except _NoJsonForm as exc:
        raise TypeError(exc.reason) from None


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (dict, list, str, int, float, bool, None), per the module table."""
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is str or kind is int or kind is float:
        return value
    if kind is list or kind is tuple:  # the common containers first: isinstance(Mapping) is slow
        return _plain_items(value)
    if kind is dict:
        return _plain_dict(value.items())
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return _plain_dict(value.items())
    if isinstance(value, (list, tuple, deque)):
        return _plain_items(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain_items(value), key=_sort_key)
    if isinstance(value, BaseModel):
        try:
            # an SDK's unvalidated response may hold a NaN in an int field: written as it is,
            # without pydantic warning the program about it
            dumped = value.model_dump(mode="python", by_alias=True, warnings=False)
        except PydanticSerializationError as exc:
            raise _NoJsonForm(f"{type(value).__name__} cannot be dumped: {exc}") from None
        return _plain(dumped)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_dict((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (datetime, time)) and _offset_has_seconds(value):
        return value.isoformat()
    if is_one_shot(value):
        raise _NoJsonForm(
            f"{type(value).__name__} is an iterator: reading it would consume it", "keep a list instead"
        )
    try:
        return to_jsonable_python(value, fallback=_refuse)
    except (TypeError, ValueError, PydanticSerializationError):
        raise _NoJsonForm(f"{type(value).__name__} has no JSON form") from None


def _plain_items(items: Collection[Any]) -> list[Any]:
    out = []
    for index, item in enumerate(items):
        try:
            out.append(_plain(item))
        except _NoJsonForm as exc:
            exc.path.append(str(index))
            raise
    return out


def _plain_dict(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in items:
        name = key if type(key) is str else _key_text(key)
        if name == BYTES_TAG:
            raise _NoJsonForm(f"the key {BYTES_TAG!r} is reserved for bytes by the JSON serializer")
        if name in out:
            raise _NoJsonForm(f"two keys both become {name!r} in JSON")
        try:
            out[name] = _plain(item)
        except _NoJsonForm as exc:
            exc.path.append(repr(key))
            raise
    return out


def _key_text(key: Any) -> str:
    """A non-str dict key as pydantic writes it (1 -> "1", an Enum -> its value)."""
    try:
        converted = to_jsonable_python({key: None}, fallback=_refuse)
    except (TypeError, ValueError, PydanticSerializationError):
        converted = None
    if not isinstance(converted, dict) or len(converted) != 1 or not isinstance(next(iter(converted)), str):
        raise _NoJsonForm(f"the dict key {key!r} has no JSON form")
    name: str = next(iter(converted))
    return name


def _sort_key(item: Any) -> str:
    return json.dumps(item, ensure_ascii=False, allow_nan=True, sort_keys=True, separators=(",", ":"))


def _offset_has_seconds(value: datetime | time) -> bool:
    offset = value.utcoffset()
    return offset is not None and offset % timedelta(minutes=1) != timedelta(0)


def is_one_shot(value: Any) -> bool:
    """True for an iterator (a generator, ``iter(list)``, ``map``, an open file, ...): it can be
    read once, by the program. pydantic reads such values to the end to convert them."""
    return isinstance(value, (Iterator, AsyncIterator))


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _untag(obj: dict[str, Any]) -> Any:
    """``json.loads`` object hook: a bytes tag becomes bytes again."""
    if BYTES_TAG not in obj:
        return obj
    encoded = obj[BYTES_TAG]
    if len(obj) != 1 or not isinstance(encoded, str):
        raise ValueError(f"malformed {BYTES_TAG!r} tag")
    return base64.b64decode(encoded, validate=True)
