"""Checkpoint serializers and the blob envelope: round trips, refusals, golden files.

What the JSON serializer gives back for each type is the table in
``multirun.checkpoints.serializers``; these tests hold it to that, exactly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import math
import os
import pickle
import sys
import threading
import tracemalloc
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import multirun
from multirun.checkpoints import envelope
from multirun.checkpoints.envelope import FORMAT_VERSION, MAGIC, open_blob, open_meta, peek_meta, seal
from multirun.checkpoints.serializers import (
    BYTES_TAG,
    HMAC_KEY_ENV,
    CloudpickleSerializer,
    JsonSerializer,
    PickleSerializer,
    Serializer,
    dump_blob,
    get_serializer,
    load_blob,
    resolve_hmac_key,
    serializer_names,
)
from multirun.errors import CheckpointError, ConfigurationError, ReplayError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
GOLDEN = Path(__file__).parent / "golden"
GOLDEN_KEY = b"multirun golden files: test-only key, not a secret"  # public, see tests/golden/README.md
LIMIT = 1 << 20
UTC = timezone.utc


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)


def json_serializer() -> Serializer:
    return get_serializer("json", hmac_key=None)


def json_round_trip(value: Any) -> Any:
    serializer = json_serializer()
    return serializer.loads(serializer.dumps(value))


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down; nan equals nan, -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --- strategies ------------------------------------------------------------------------------------

SPECIAL_STRINGS = [
    "\ud800",
    "\udfff",
    "\ud83d\ude00",
    "\ude00\ud83d",
    "\x00",
    "a\x00b",
    "😀",
    "é",
    "\u2028",
    "",
]
SPECIAL_CHARS = ["\ud800", "\udfff", "\ud83d", "\ude00", "\x00", "😀", "é", "\u2028"]
texts = (
    st.text(st.characters(exclude_categories=()))  # every code point, surrogates included
    | st.text(st.characters(categories=["Cs"]) | st.sampled_from(SPECIAL_CHARS))
    | st.lists(st.sampled_from(SPECIAL_STRINGS), max_size=4).map("".join)
)
keys = texts.filter(lambda k: k != BYTES_TAG)
ints = st.integers() | st.integers(min_value=-(10**1000), max_value=10**1000)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0]
)
json_leaves = st.none() | st.booleans() | ints | floats | texts | st.binary(max_size=64)
json_data = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
offsets = st.integers(min_value=-23 * 60 + 1, max_value=23 * 60 - 1).map(
    lambda m: timezone(timedelta(minutes=m))
)
datetimes = st.datetimes(timezones=st.none() | st.just(UTC) | offsets)


class Color(Enum):
    RED = "red"
    BLUE = "blue"


class Level(IntEnum):
    LOW = 1


@dataclass
class Point:
    x: int
    y: float
    label: str = ""


class Reply(BaseModel):
    text: str
    at: datetime
    raw: bytes = b""
    tags: set[str] = Field(default_factory=set)
    point: Point | None = None


class Aliased(BaseModel):
    value: int = Field(alias="Value")


# --- the JSON serializer: what comes back -------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_data)
def test_json_round_trips_plain_data_exactly(value: Any) -> None:
    """str (surrogates, NUL, emoji), big ints, every float, bool, None, bytes, lists, dicts: all exact."""
    assert same(json_round_trip(value), value)


@given(json_data)
def test_json_round_trips_through_a_blob(value: Any) -> None:
    blob, digest = dump_blob(value, json_serializer())
    header, loaded = load_blob(blob, max_bytes=LIMIT)
    assert same(loaded, value)
    assert header["serializer"] == "json" and header["digest"] == digest


@given(st.text(st.characters(categories=["Cs"]), min_size=1))
def test_lone_surrogates_come_back_as_the_same_code_points(value: str) -> None:
    back = json_round_trip({value: [value]})
    assert list(back) == [value] and back[value] == [value]
    assert [ord(c) for c in back[value][0]] == [ord(c) for c in value]


def test_two_surrogates_that_would_make_a_pair_stay_two_code_points() -> None:
    assert len(json_round_trip("\ud83d\ude00")) == 2
    assert json_round_trip("\ud83d\ude00") == "\ud83d\ude00" != "😀"
    assert json_round_trip("😀") == "😀"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308])
def test_special_floats_come_back_exactly(value: float) -> None:
    assert same(json_round_trip([value]), [value])


def test_big_ints_come_back_exactly_and_giant_ones_are_refused() -> None:
    big = 7**4000  # 3381 digits
    assert json_round_trip(big) == big
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    if limit:
        with pytest.raises(CheckpointError, match="not JSON-serializable"):
            json_serializer().dumps(10 ** (limit + 10))


EXPECTED: list[tuple[Any, Any]] = [
    ("text", "text"),
    (True, True),
    (None, None),
    (12, 12),
    (b"\x00\xffraw", b"\x00\xffraw"),
    (bytearray(b"ba"), b"ba"),
    (memoryview(b"mv"), b"mv"),
    ((1, "a"), [1, "a"]),
    ([(1, 2)], [[1, 2]]),
    (deque([1, 2]), [1, 2]),
    ({"b", "a", "c"}, ["a", "b", "c"]),
    (frozenset({10, 9, 100}), [10, 100, 9]),  # sorted by JSON text
    ({1: "int", 2.5: "float", Color.RED: "enum"}, {"1": "int", "2.5": "float", "red": "enum"}),
    (Color.BLUE, "blue"),
    (Level.LOW, 1),
    (Decimal("12.50"), "12.50"),
    (Decimal("1E-10"), "1E-10"),
    (UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    (Path("/tmp/x"), "/tmp/x"),
    (datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "2025-01-02T03:04:05.678901Z"),
    (datetime(2025, 1, 2, 3, 4, 5), "2025-01-02T03:04:05"),
    (datetime(2025, 1, 2, tzinfo=timezone(timedelta(hours=5, minutes=30))), "2025-01-02T00:00:00+05:30"),
    (
        datetime(2025, 1, 2, tzinfo=timezone(timedelta(hours=5, minutes=30, seconds=15))),
        "2025-01-02T00:00:00+05:30:15",
    ),
    (date(2025, 1, 2), "2025-01-02"),
    (time(1, 2, 3, 500000), "01:02:03.500000"),
    (timedelta(seconds=1.5), "PT1.5S"),
    (timedelta(days=-1, seconds=5), "-PT23H59M55S"),
    (Point(1, 2.5), {"x": 1, "y": 2.5, "label": ""}),
    (
        Reply(
            text="hi", at=datetime(2025, 1, 2, tzinfo=UTC), raw=b"ok", tags={"b", "a"}, point=Point(0, 1.0)
        ),
        {
            "text": "hi",
            "at": "2025-01-02T00:00:00Z",
            "raw": b"ok",
            "tags": ["a", "b"],
            "point": {"x": 0, "y": 1.0, "label": ""},
        },
    ),
    (Aliased(Value=3), {"Value": 3}),
    ({"nested": [{"t": (b"x", Color.RED)}]}, {"nested": [{"t": [b"x", "red"]}]}),
]


@pytest.mark.parametrize(("value", "expected"), EXPECTED, ids=[repr(v)[:40] for v, _ in EXPECTED])
def test_json_gives_back_the_documented_plain_data(value: Any, expected: Any) -> None:
    assert same(json_round_trip(value), expected)


@given(datetimes)
def test_datetimes_come_back_as_iso_text_of_the_same_instant_and_offset(value: datetime) -> None:
    text = json_round_trip(value)
    assert isinstance(text, str)
    parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    assert parsed == value and parsed.utcoffset() == value.utcoffset()


@given(st.lists(ints | texts, max_size=8).map(set))
def test_sets_come_back_as_lists_sorted_by_json_text(value: set[Any]) -> None:
    back = json_round_trip(value)
    expected = sorted(value, key=lambda v: json.dumps(v, ensure_ascii=False))
    assert same(back, expected)


@given(st.builds(Point, ints, floats, texts), st.builds(Reply, text=texts, at=datetimes, raw=st.binary()))
def test_dataclasses_and_models_come_back_as_dicts_of_their_fields(point: Point, reply: Reply) -> None:
    back = json_round_trip({"point": point, "reply": reply})
    assert same(back["point"], {"x": point.x, "y": point.y, "label": point.label})
    assert list(back["reply"]) == ["text", "at", "raw", "tags", "point"]
    assert back["reply"]["text"] == reply.text and back["reply"]["raw"] == reply.raw
    assert back["reply"]["at"] == json_round_trip(reply.at)
    assert back["reply"]["tags"] == [] and back["reply"]["point"] is None


class Counts(BaseModel):
    cached_tokens: int


@pytest.mark.filterwarnings("error")
def test_a_model_holding_a_value_of_another_type_is_written_as_it_is_without_a_warning() -> None:
    """SDKs build their responses unvalidated: a count a server sent as NaN sits in an int field.
    Checkpointing the step that returned it writes the value, and warns no pydantic warning
    into the program."""
    back = json_round_trip(Counts.model_construct(cached_tokens=math.inf))
    assert back == {"cached_tokens": math.inf}


def test_the_payload_is_compact_utf8_json_with_tagged_bytes() -> None:
    payload = json_serializer().dumps({"a": b"hi", "é": [1.5, None, math.nan]})
    assert payload == b'{"a":{"__multirun_bytes__":"aGk="},"\xc3\xa9":[1.5,null,NaN]}'


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Opaque(), "Opaque has no JSON form"),
        ({"a": [1, {"b": Opaque()}]}, r"\['a'\]\[1\]\['b'\]: Opaque has no JSON form"),
        (lambda: 1, "function has no JSON form"),
        ({BYTES_TAG: "aGk="}, "reserved for bytes"),
        ({"x": {BYTES_TAG: 1, "other": 2}}, "reserved for bytes"),
        ({1: "int", "1": "str"}, "two keys both become '1'"),
        ({Opaque(): 1}, "dict key .* has no JSON form"),
    ],
)
def test_json_refuses_what_it_cannot_write_faithfully(value: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        json_serializer().dumps(value)


def test_json_writes_a_shared_container_once_per_place() -> None:
    leaf = [1, "a"]
    shared = {"leaf": {"x": 1}}
    for value in ([leaf, leaf], {"a": shared, "b": [shared, shared]}):
        assert json.loads(json_serializer().dumps(value)) == json.loads(json.dumps(value))


def test_json_refuses_cycles_and_absurd_nesting() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(CheckpointError, match="nested too deeply or contains a reference cycle"):
        json_serializer().dumps(cycle)
    through_a_dict: dict[str, Any] = {}
    through_a_dict["list"] = [1, {"back": through_a_dict}]
    with pytest.raises(CheckpointError, match="nested too deeply or contains a reference cycle"):
        json_serializer().dumps(through_a_dict)
    deep: Any = 0
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested too deeply"):
        json_serializer().dumps(deep)


def test_json_nested_deeper_than_the_fast_encoder_goes_still_round_trips() -> None:
    """pydantic-core's encoder stops at a depth of about 250; the json module takes over."""
    deep: Any = "leaf"
    for _ in range(600):
        deep = [deep]
    assert json_round_trip(deep) == deep


def test_json_never_falls_back_to_pickle() -> None:
    with pytest.raises(CheckpointError, match="has no JSON form"):
        dump_blob({"f": Opaque()}, json_serializer())


@pytest.mark.parametrize(
    "payload",
    [
        b"{",
        b"\xff",
        b'{"__multirun_bytes__": 1}',
        b'{"__multirun_bytes__": "aGk=", "x": 1}',
        b'{"__multirun_bytes__": "not base64!"}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_json_refuses_payloads_it_did_not_write(payload: bytes) -> None:
    with pytest.raises(CheckpointError, match="cannot be decoded") as caught:
        json_serializer().loads(payload)
    assert isinstance(caught.value, ReplayError)  # the reference's error for a deserialization failure


# --- registry and HMAC key configuration ---------------------------------------------------------


def test_registry_names_and_unknown_serializer() -> None:
    assert serializer_names() == ["json", "pickle", "cloudpickle"]
    with pytest.raises(
        ConfigurationError, match=r"unknown checkpoint serializer 'yaml'.*json, pickle, cloudpickle"
    ):
        get_serializer("yaml", hmac_key=None)
    for name in serializer_names():
        serializer = get_serializer(name, hmac_key=KEY)
        assert isinstance(serializer, Serializer) and serializer.name == name


@pytest.mark.parametrize("name", ["pickle", "cloudpickle"])
def test_pickle_serializers_refuse_to_exist_without_a_key(name: str) -> None:
    with pytest.raises(ConfigurationError, match=HMAC_KEY_ENV):
        get_serializer(name, hmac_key=None)
    with pytest.raises(ConfigurationError, match=HMAC_KEY_ENV):
        {"pickle": PickleSerializer, "cloudpickle": CloudpickleSerializer}[name]()


def test_json_needs_no_key_but_signs_with_one() -> None:
    assert json_serializer().hmac_key is None
    header, _ = open_blob(dump_blob([1], get_serializer("json", hmac_key=KEY))[0], max_bytes=LIMIT)
    assert "hmac" in header


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("00112233445566778899aabbccddeeff", bytes.fromhex("00112233445566778899aabbccddeeff")),
        ("hex:00112233445566778899AABBCCDDEEFF", bytes.fromhex("00112233445566778899aabbccddeeff")),
        ("raw:00112233445566778899aabbccddeeff", b"00112233445566778899aabbccddeeff"),
        ("  a passphrase of some length  ", b"a passphrase of some length"),
        ("0011223344556677889", b"0011223344556677889"),  # odd number of digits: not hex
    ],
)
def test_hmac_key_from_the_environment_is_hex_or_raw(
    monkeypatch: pytest.MonkeyPatch, text: str, key: bytes
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, text)
    assert resolve_hmac_key() == key
    assert resolve_hmac_key(text) == key
    assert get_serializer("pickle", hmac_key=None).hmac_key == key


def test_an_argument_key_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, OTHER_KEY.hex())
    assert resolve_hmac_key(KEY) == KEY
    assert resolve_hmac_key(environ={}) is None
    assert resolve_hmac_key(environ={HMAC_KEY_ENV: "   "}) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("short", "hmac_key is 5 bytes; an HMAC key needs at least 16"),
        (b"", "hmac_key is 0 bytes"),
        ("hex:zz", "starts with 'hex:' but is not hex digits"),
        (12345, "hmac_key must be bytes or str, not int"),
    ],
)
def test_bad_hmac_keys_are_refused_naming_the_setting(value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        resolve_hmac_key(value)


def test_a_bad_key_in_the_environment_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "abcd")
    with pytest.raises(ConfigurationError, match=f"{HMAC_KEY_ENV} is 2 bytes"):
        get_serializer("json", hmac_key=None)


def key_advice_of(call: Callable[[], Any]) -> str:
    """The message of the CheckpointError or ConfigurationError that ``call`` raises."""
    with pytest.raises((CheckpointError, ConfigurationError)) as info:
        call()
    return str(info.value)


def test_every_message_about_a_missing_or_wrong_key_names_every_way_to_give_one() -> None:
    pickle_blob, _ = small_blobs()["pickle"]
    reader: dict[str, Any] = {"max_bytes": LIMIT, "allowed_serializers": ["pickle"]}
    messages = [
        key_advice_of(lambda: get_serializer("pickle", hmac_key=None)),
        key_advice_of(lambda: seal(b"x", "pickle")),
        key_advice_of(lambda: load_blob(pickle_blob, max_bytes=LIMIT, hmac_key=KEY)),
        key_advice_of(lambda: load_blob(pickle_blob, **reader)),
        key_advice_of(lambda: load_blob(pickle_blob, **reader, hmac_key=OTHER_KEY)),
    ]
    for message in messages:
        assert HMAC_KEY_ENV in message, message
        assert "multirun.init(checkpoint_hmac_key=...)" in message, message
        assert "hmac_key=... for a CheckpointStore or serializer built directly" in message, message
        assert "or pass hmac_key" not in message, message
        assert "\n" not in message, message


def test_a_bad_key_given_to_init_is_refused_naming_checkpoint_hmac_key(global_otel: None) -> None:
    with pytest.raises(ConfigurationError, match=r"^checkpoint_hmac_key is 5 bytes"):
        multirun.init(checkpoint_hmac_key="short")
    with pytest.raises(ConfigurationError, match=r"^checkpoint_hmac_key must be bytes or str, not int"):
        multirun.init(checkpoint_hmac_key=5)  # type: ignore[arg-type]
    assert resolve_hmac_key("short" * 4, name="checkpoint_hmac_key") == b"short" * 4


# --- pickle and cloudpickle ------------------------------------------------------------------------

rich_values = st.recursive(
    json_leaves
    | datetimes
    | st.decimals(allow_nan=False)
    | st.builds(Point, ints, st.floats(allow_nan=False), texts),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.frozensets(st.integers() | st.text(), max_size=4)
        | st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("name", ["pickle", "cloudpickle"])
@given(value=rich_values)
def test_pickle_serializers_round_trip_python_objects_with_a_key(name: str, value: Any) -> None:
    serializer = get_serializer(name, hmac_key=KEY)
    blob, _ = dump_blob(value, serializer)
    header, loaded = load_blob(blob, max_bytes=LIMIT, hmac_key=KEY, allowed_serializers=[name])
    assert header["serializer"] == name and "hmac" in header
    assert same(loaded, value)


def test_cloudpickle_round_trips_lambdas_closures_and_local_classes() -> None:
    offset = 41

    class Local:
        def __init__(self, n: int) -> None:
            self.n = n

    serializer = get_serializer("cloudpickle", hmac_key=KEY)
    blob, _ = dump_blob({"add": lambda x: x + offset, "obj": Local(3)}, serializer)
    _, loaded = load_blob(blob, max_bytes=LIMIT, hmac_key=KEY, allowed_serializers=["cloudpickle"])
    assert loaded["add"](1) == 42 and loaded["obj"].n == 3


def test_unpicklable_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="cannot be serialized with pickle"):
        get_serializer("pickle", hmac_key=KEY).dumps(lambda: 1)


# --- the envelope -------------------------------------------------------------------------------


def raw_blob(header: dict[str, Any], payload: bytes) -> bytes:
    """A blob with exactly this header: for forging and tampering."""
    return MAGIC + json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n" + payload


def header_of(blob: bytes) -> dict[str, Any]:
    head: dict[str, Any] = json.loads(blob[len(MAGIC) : blob.index(b"\n", len(MAGIC))])
    return head


def payload_of(blob: bytes) -> bytes:
    return blob[blob.index(b"\n", len(MAGIC)) + 1 :]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def documented_mac(key: bytes, version: int, serializer: str, compression: str, stored: bytes) -> str:
    """The HMAC as the envelope's docstring defines it, for format ``version``."""
    if version >= 3:
        label = f"MRCK/v{version}/{serializer}/{compression}/{len(stored)}/{sha(stored)}\n".encode()
        return hmac.new(key, label, hashlib.sha256).hexdigest()
    label = f"MRCK/v{version}/{serializer}/{compression}\n".encode()
    return hmac.new(key, label + stored, hashlib.sha256).hexdigest()


def test_seal_writes_the_documented_header() -> None:
    payload = b'{"a":1}'
    blob, digest = seal(payload, "json")
    assert (
        blob
        == MAGIC
        + (
            b'{"compression":"none","digest":"'
            + digest.encode()
            + b'","serializer":"json","size":7,"version":3}\n'
        )
        + payload
    )
    assert digest == sha(payload)  # no meta section: version 3, which earlier releases read too
    signed, _ = seal(payload, "pickle", KEY, compression="zlib")
    header = header_of(signed)
    assert list(header) == ["compression", "digest", "hmac", "serializer", "size", "version"]
    stored = payload_of(signed)
    assert zlib.decompress(stored) == payload and header["digest"] == sha(stored)
    assert header["hmac"] == documented_mac(KEY, 3, "pickle", "zlib", stored)


# --- the meta section (version 4): what a blob holds, readable without deserializing it ---------------

META: dict[str, Any] = {"state_keys": ["notes", "\ud800 lone", "é"], "replay": {"steps": 3}}


def split_body(blob: bytes) -> tuple[bytes, bytes]:
    """The meta section and the stored payload of a version 4 blob."""
    body, size = payload_of(blob), header_of(blob)["meta_size"]
    return body[:size], body[size:]


def test_a_meta_section_is_sealed_as_documented() -> None:
    payload = pickle.dumps({"x": 1}, protocol=5)
    blob, digest = seal(payload, "pickle", KEY, meta=META)
    header = header_of(blob)
    assert list(header) == [
        "compression", "digest", "hmac", "meta_digest", "meta_size", "serializer", "size", "version"
    ]  # fmt: skip
    assert header["version"] == FORMAT_VERSION == 4
    meta, stored = split_body(blob)
    assert meta.isascii() and json.loads(meta) == META
    assert (
        stored == payload and header["digest"] == digest == sha(stored) and header["meta_digest"] == sha(meta)
    )
    label = f"MRCK/v4/pickle/none/{len(stored)}/{sha(stored)}/{len(meta)}/{sha(meta)}\n".encode()
    assert header["hmac"] == hmac.new(KEY, label, hashlib.sha256).hexdigest()
    assert open_meta(blob, max_bytes=LIMIT, **PICKLE_READER) == ({**header}, META)
    assert load_blob(blob, max_bytes=LIMIT, **PICKLE_READER)[1] == {"x": 1}


def test_the_meta_section_is_read_without_unpickling_the_payload(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob, _ = seal(pickle.dumps(Boom(marker), protocol=5), "pickle", KEY, meta=META)
    for readable in (blob, io.BytesIO(blob)):
        assert open_meta(readable, max_bytes=LIMIT, **PICKLE_READER)[1] == META
    assert not marker.exists()
    load_blob(blob, max_bytes=LIMIT, **PICKLE_READER)  # the control: loading it unpickles it
    assert marker.is_dir()


@pytest.mark.parametrize("kind", ["json", "json-zlib", "pickle", "v1-json"])
def test_a_blob_without_a_meta_section_is_version_3_or_older_and_has_none(kind: str) -> None:
    blob, reader = small_blobs()[kind]
    header, meta = open_meta(blob, max_bytes=LIMIT, **reader)
    assert meta is None and header["version"] <= 3 and "meta_size" not in header


def test_open_meta_checks_the_whole_blob_as_loading_does() -> None:
    blob, _ = seal(pickle.dumps({"x": 1}, protocol=5), "pickle", KEY, meta=META)
    meta, stored = split_body(blob)
    other_meta = json.dumps({"state_keys": ["forged"]}).encode()
    refusals = [
        (tampered(blob, meta + stored[:-1] + b"\x00"), PICKLE_READER, "checkpoint digest does not match"),
        (tampered(blob, meta[:-2] + b"0}" + stored), PICKLE_READER, "meta section digest does not match"),
        (
            tampered(blob, other_meta + stored, meta_size=len(other_meta), meta_digest=sha(other_meta)),
            PICKLE_READER,
            "HMAC does not match",
        ),
        (blob, {**PICKLE_READER, "hmac_key": OTHER_KEY}, "HMAC does not match"),
        (blob, {"allowed_serializers": ["pickle"]}, "no HMAC key"),
        (blob[:-1], PICKLE_READER, "truncated or padded: meta section and payload are"),
        (tampered(blob, meta_size=-1), PICKLE_READER, "invalid meta_size"),
        (tampered(blob, meta_digest="md5:0"), PICKLE_READER, "invalid meta_digest"),
        (tampered(blob, meta_size=None), PICKLE_READER, "missing \\['meta_size'\\]"),
    ]
    for damaged, reader, message in refusals:
        with pytest.raises(CheckpointError, match=message):
            open_meta(damaged, max_bytes=LIMIT, **reader)
        with pytest.raises(CheckpointError, match=message):
            load_blob(damaged, max_bytes=LIMIT, **reader)


def test_peek_meta_reads_the_meta_section_from_the_start_of_the_blob_alone() -> None:
    """For a listing: the header and the meta section are read and checked (the HMAC too, with a
    key), the payload is not read at all."""
    payload = pickle.dumps(b"x" * 100_000, protocol=5)
    blob, _ = seal(payload, "pickle", KEY, meta=META)
    meta, stored = split_body(blob)
    asked: list[int] = []

    def start_of(data: bytes) -> Callable[[int], bytes]:
        def read_start(size: int) -> bytes:
            asked.append(size)
            return data[:size]

        return read_start

    assert peek_meta(start_of(blob), max_bytes=LIMIT, hmac_key=KEY) == META
    assert asked == [len(MAGIC) + 4096 + 1]  # the longest header, and what follows: not 100 kB
    big = {"state_keys": [f"key {n}" for n in range(2000)]}  # past the first read: a second one
    blob_big, _ = seal(payload, "pickle", KEY, meta=big)
    asked.clear()
    assert peek_meta(start_of(blob_big), max_bytes=LIMIT) == big
    assert asked[1] == len(blob_big) - len(payload)
    assert peek_meta(start_of(seal(b"{}", "json")[0]), max_bytes=LIMIT) is None  # version 3: none
    other_meta = json.dumps({"state_keys": ["forged"]}).encode()
    refusals = [
        (tampered(blob, meta[:-2] + b"0}" + stored), KEY, "meta section digest does not match"),
        (tampered(blob, other_meta + stored, meta_size=len(other_meta), meta_digest=sha(other_meta)), KEY,
         "HMAC does not match"),
        (blob, OTHER_KEY, "HMAC does not match"),
        (blob[: len(blob) - len(stored) - 1], None, "ends inside its meta section"),
        (b"not a checkpoint", None, "bad magic bytes"),
    ]  # fmt: skip
    for damaged, key, message in refusals:
        with pytest.raises(CheckpointError, match=message):
            peek_meta(start_of(damaged), max_bytes=LIMIT, hmac_key=key)
    with pytest.raises(CheckpointError, match="over the 4096-byte limit"):
        peek_meta(start_of(blob), max_bytes=4096)


def test_an_unsigned_json_blob_with_a_meta_section_needs_no_key() -> None:
    blob, _ = dump_blob({"a": 1}, json_serializer(), compression="zlib", meta={"state_keys": ["a"]})
    assert open_meta(blob, max_bytes=LIMIT)[1] == {"state_keys": ["a"]}
    assert load_blob(blob, max_bytes=LIMIT)[1] == {"a": 1}
    meta, _ = split_body(blob)
    garbage = b"not a zlib stream"
    not_zlib = tampered(blob, meta + garbage, size=len(garbage), digest=sha(garbage))
    with pytest.raises(CheckpointError, match="does not decompress"):  # checked though never decoded
        open_meta(not_zlib, max_bytes=LIMIT)


def test_a_meta_section_must_be_plain_json_data() -> None:
    for meta in ({"when": datetime(2025, 1, 1)}, {"nan": math.nan}):
        with pytest.raises(CheckpointError, match="meta section is not plain JSON data"):
            seal(b"{}", "json", meta=meta)


def test_seal_refuses_an_unsigned_pickle_and_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match=HMAC_KEY_ENV):
        seal(b"x", "pickle")
    with pytest.raises(ConfigurationError, match="invalid serializer name"):
        seal(b"x", "JSON\n")
    with pytest.raises(ConfigurationError, match="invalid compression"):
        seal(b"x", "json", compression="lzma")  # type: ignore[arg-type]


def small_blobs() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Small blobs of each kind, with the reader arguments that accept them."""
    value = {"a": [1, 2.5, "é\ud800", b"\x00\x01", None, True]}
    return {
        "json": (dump_blob(value, json_serializer())[0], {}),
        "json-signed": (dump_blob(value, get_serializer("json", hmac_key=KEY))[0], {"hmac_key": KEY}),
        "json-zlib": (dump_blob(value, json_serializer(), compression="zlib")[0], {}),
        "pickle": (
            dump_blob(value, get_serializer("pickle", hmac_key=KEY))[0],
            {"hmac_key": KEY, "allowed_serializers": ["pickle"]},
        ),
        "pickle-meta": (
            dump_blob(value, get_serializer("pickle", hmac_key=KEY), meta=META)[0],
            {"hmac_key": KEY, "allowed_serializers": ["pickle"]},
        ),
        "v1-json": (
            raw_blob(
                {"version": 1, "serializer": "json", "size": 8, "digest": sha(b'{"a":[]}')}, b'{"a":[]}'
            ),
            {},
        ),
    }


@pytest.mark.parametrize("kind", list(small_blobs()))
def test_every_truncation_is_refused(kind: str) -> None:
    blob, reader = small_blobs()[kind]
    load_blob(blob, max_bytes=LIMIT, **reader)  # the whole blob loads
    for length in range(len(blob)):
        with pytest.raises(CheckpointError):
            load_blob(blob[:length], max_bytes=LIMIT, **reader)
        with pytest.raises(CheckpointError):
            load_blob(io.BytesIO(blob[:length]), max_bytes=LIMIT, **reader)


def test_an_empty_blob_is_refused() -> None:
    with pytest.raises(CheckpointError, match="empty"):
        open_blob(b"", max_bytes=LIMIT)
    with pytest.raises(CheckpointError, match="empty"):
        open_blob(io.BytesIO(b""), max_bytes=LIMIT)


@pytest.mark.parametrize("kind", list(small_blobs()))
def test_every_bit_flip_is_refused(kind: str) -> None:
    blob, reader = small_blobs()[kind]
    expected = load_blob(blob, max_bytes=LIMIT, **reader)[1]
    returned = []
    for position in range(len(blob)):
        for bit in range(8):
            damaged = bytearray(blob)
            damaged[position] ^= 1 << bit
            try:
                value = load_blob(bytes(damaged), max_bytes=LIMIT, **reader)[1]
            except CheckpointError:
                continue
            returned.append((bytes(damaged[position : position + 1]), same(value, expected)))
    # One flip is read, and harmlessly: an unsigned "version":3 that becomes 2, the same
    # header and payload in the previous format, decoded the same way.
    version_3_as_2 = [(b"2", True)] if kind in ("json", "json-zlib") else []
    assert returned == version_3_as_2


def large_json_blob() -> tuple[bytes, dict[str, Any]]:
    """An unsigned JSON blob big enough to be decoded while its digest is computed."""
    value = {"records": [{"id": i, "text": f"record {i} " + "x" * 100} for i in range(12_000)]}
    blob, _ = dump_blob(value, json_serializer())
    assert len(payload_of(blob)) >= envelope.PARALLEL_DIGEST_BYTES
    return blob, value


def damaged_large_json(how: str) -> bytes:
    blob, _ = large_json_blob()
    middle = len(blob) // 2
    if how == "still valid JSON":
        at = blob.index(b"x", middle)
        return blob[:at] + b"y" + blob[at + 1 :]
    at = blob.index(b'"', middle)
    return blob[:at] + b"\x00" + blob[at + 1 :]


def test_a_large_json_blob_round_trips_through_the_parallel_digest() -> None:
    blob, value = large_json_blob()
    assert load_blob(blob, max_bytes=4 * LIMIT)[1] == value
    assert load_blob(io.BytesIO(blob), max_bytes=4 * LIMIT)[1] == value
    signed, _ = dump_blob(value, get_serializer("json", hmac_key=KEY))
    assert load_blob(signed, max_bytes=4 * LIMIT, hmac_key=KEY)[1] == value


@pytest.mark.parametrize("how", ["still valid JSON", "invalid JSON"])
def test_a_damaged_large_json_blob_is_refused_as_damaged(how: str) -> None:
    # Decoding runs beside the digest: whether it succeeds or fails first, the answer is the digest's.
    with pytest.raises(CheckpointError, match="digest does not match"):
        load_blob(damaged_large_json(how), max_bytes=4 * LIMIT)


def test_a_large_json_payload_with_its_digest_intact_but_bad_json_is_a_decode_error() -> None:
    payload = b"[" + b"1," * 600_000  # valid UTF-8, not valid JSON
    blob = raw_blob(
        {
            "version": 3,
            "serializer": "json",
            "size": len(payload),
            "digest": sha(payload),
            "compression": "none",
        },
        payload,
    )
    with pytest.raises(CheckpointError, match="JSON checkpoint payload cannot be decoded"):
        load_blob(blob, max_bytes=4 * LIMIT)


def test_a_damaged_large_json_blob_raises_one_error_not_a_chain() -> None:
    with pytest.raises(CheckpointError, match="digest does not match") as caught:
        load_blob(damaged_large_json("invalid JSON"), max_bytes=4 * LIMIT)
    assert caught.value.__context__ is None and caught.value.__cause__ is None


@pytest.mark.parametrize("version", [2, 3])
def test_a_large_signed_json_blob_with_a_swapped_payload_needs_a_valid_hmac(version: int) -> None:
    # the parallel digest must not skip the HMAC: version 2 signs the payload, version 3 the digest
    blob, value = large_json_blob()
    other = json_serializer().dumps({"records": [{"forged": True}] * 80_000})
    assert len(other) >= envelope.PARALLEL_DIGEST_BYTES
    old = payload_of(blob)
    signed = resealed(blob, old, version=version, hmac=documented_mac(KEY, version, "json", "none", old))
    assert load_blob(signed, max_bytes=4 * LIMIT, hmac_key=KEY)[1] == value
    forged = resealed(signed, other)  # the genuine MAC of the old payload, a recomputed digest
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_blob(forged, max_bytes=4 * LIMIT, hmac_key=KEY)


def test_a_large_json_blob_is_checked_when_the_digest_thread_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = envelope._digest

    def fails_off_the_main_thread(data: Any) -> str:
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError
        return digest(data)

    monkeypatch.setattr(envelope, "_digest", fails_off_the_main_thread)
    blob, value = large_json_blob()
    assert load_blob(blob, max_bytes=4 * LIMIT)[1] == value
    for how in ("still valid JSON", "invalid JSON"):
        with pytest.raises(CheckpointError, match="digest does not match"):
            load_blob(damaged_large_json(how), max_bytes=4 * LIMIT)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("size", ["small", "large"])
def test_a_blob_loads_from_any_bytes_like_object(kind: Callable[[bytes], Any], size: str) -> None:
    if size == "large":
        blob, value = large_json_blob()
    else:
        value = {"a": [1, "é"]}
        blob = dump_blob(value, json_serializer())[0]
    assert load_blob(kind(blob), max_bytes=4 * LIMIT)[1] == value
    assert open_blob(kind(blob), max_bytes=4 * LIMIT)[1] == payload_of(blob)


def test_a_version_3_hmac_is_checked_before_the_payload_is_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    blob, _ = small_blobs()["pickle"]
    hashed: list[int] = []
    digest = envelope._digest

    def counting(data: Any) -> str:
        hashed.append(len(data))
        return digest(data)

    monkeypatch.setattr(envelope, "_digest", counting)
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_blob(tampered(blob, hmac="0" * 64), max_bytes=LIMIT, **PICKLE_READER)
    assert hashed == []
    load_blob(blob, max_bytes=LIMIT, **PICKLE_READER)
    assert hashed == [len(payload_of(blob))]  # one pass over the payload, for digest and MAC


def test_a_large_json_blob_loads_when_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    blob, value = large_json_blob()
    assert load_blob(blob, max_bytes=4 * LIMIT)[1] == value
    with pytest.raises(CheckpointError, match="digest does not match"):
        load_blob(damaged_large_json("still valid JSON"), max_bytes=4 * LIMIT)


def test_padding_is_refused() -> None:
    blob, _ = small_blobs()["json"]
    for extra in (b"\n", b"x" * 100):
        with pytest.raises(CheckpointError, match="truncated or padded"):
            open_blob(blob + extra, max_bytes=LIMIT)
        with pytest.raises(CheckpointError, match="truncated or padded"):
            open_blob(io.BytesIO(blob + extra), max_bytes=LIMIT)


def test_a_stream_is_read_like_bytes() -> None:
    for blob, reader in small_blobs().values():
        expected = load_blob(blob, max_bytes=LIMIT, **reader)
        assert same(load_blob(io.BytesIO(blob), max_bytes=LIMIT, **reader), expected)
        short_reads = CountingStream(blob)
        assert same(load_blob(short_reads, max_bytes=LIMIT, **reader), expected)  # type: ignore[arg-type]


def tampered(blob: bytes, payload: bytes | None = None, **changes: Any) -> bytes:
    """``blob`` with header fields changed (None removes one) and maybe another payload."""
    header = header_of(blob)
    header.update(changes)
    return raw_blob(
        {k: v for k, v in header.items() if v is not None}, payload_of(blob) if payload is None else payload
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": 1}, "truncated or padded"),
        ({"size": -1}, "invalid size"),
        ({"size": True}, "invalid size"),
        ({"size": "12"}, "invalid size"),
        ({"digest": sha(b"other")}, "digest does not match"),
        ({"digest": "md5:abc"}, "invalid digest"),
        ({"serializer": "yaml"}, "'yaml' serializer, which this reader does not allow"),
        ({"serializer": "pickle"}, "'pickle' serializer, which this reader does not allow"),
        ({"serializer": None}, "missing \\['serializer'\\]"),
        ({"compression": "zlib"}, "does not decompress"),
        ({"compression": "lzma"}, "invalid compression"),
        ({"hmac": "zz"}, "invalid hmac"),
        ({"extra": 1}, "unexpected \\['extra'\\]"),
        ({"version": 1}, "unexpected \\['compression'\\]"),
        ({"version": 0}, "unknown format version 0"),
        ({"version": "2"}, "version is '2'"),
        ({"version": True}, "version is True"),
        ({"version": FORMAT_VERSION + 1}, "newer than this multirun-otel reads.*upgrade multirun-otel"),
    ],
)
def test_a_tampered_header_is_refused(changes: dict[str, Any], message: str) -> None:
    blob, _ = small_blobs()["json"]
    with pytest.raises(CheckpointError, match=message):
        load_blob(tampered(blob, **changes), max_bytes=LIMIT)


def test_a_future_version_asks_for_an_upgrade_whatever_else_it_changed() -> None:
    future = raw_blob({"version": 5, "new_field": [1], "serializer": "zstd-json"}, b"anything")
    with pytest.raises(CheckpointError, match=r"format version 5 is newer .*upgrade multirun-otel"):
        load_blob(future, max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"MRCK", "ends inside the magic bytes"),
        (b"PK\x03\x04 a zip", "bad magic bytes"),
        (MAGIC + b"[1, 2]\n", "not a JSON object"),
        (MAGIC + b"{not json}\n", "header is damaged"),
        (MAGIC + b'{"version": 2}', "header is truncated, damaged or longer than 4096"),
        (MAGIC + b'{"pad": "' + b"x" * 5000 + b'"}\n', "longer than 4096"),
        (MAGIC + b'{"version": "\xff"}\n', "header is damaged"),
    ],
)
def test_a_blob_that_is_not_a_checkpoint_is_refused(blob: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        open_blob(blob, max_bytes=LIMIT)


def test_a_serializer_the_reader_does_not_allow_is_refused_with_advice() -> None:
    json_blob, _ = small_blobs()["json"]
    with pytest.raises(
        CheckpointError, match=r"'json' serializer, which this reader does not allow .*allow 'json'"
    ):
        load_blob(json_blob, max_bytes=LIMIT, allowed_serializers=["pickle"], hmac_key=KEY)
    pickle_blob, _ = small_blobs()["pickle"]
    with pytest.raises(
        CheckpointError, match="can run code when loaded.*allowed_serializers.*" + HMAC_KEY_ENV
    ):
        load_blob(pickle_blob, max_bytes=LIMIT, hmac_key=KEY)
    with pytest.raises(CheckpointError, match="no HMAC key is configured.*" + HMAC_KEY_ENV):
        load_blob(pickle_blob, max_bytes=LIMIT, allowed_serializers=["pickle"])


def test_the_reader_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pickle_blob, _ = small_blobs()["pickle"]
    monkeypatch.setenv(HMAC_KEY_ENV, KEY.hex())
    _, value = load_blob(pickle_blob, max_bytes=LIMIT, allowed_serializers=["pickle"])
    assert value["a"][2] == "é\ud800"


PICKLE_READER: dict[str, Any] = {"hmac_key": KEY, "allowed_serializers": ["json", "pickle", "cloudpickle"]}


def resealed(blob: bytes, payload: bytes, **changes: Any) -> bytes:
    """``blob`` with another payload and a correct size and digest: what anyone can make."""
    return tampered(blob, payload, size=len(payload), digest=sha(payload), **changes)


def test_a_payload_swapped_with_a_recomputed_digest_needs_a_valid_hmac() -> None:
    blob, _ = small_blobs()["pickle"]
    other = pickle.dumps({"a": "forged"}, protocol=5)
    for forged in (
        resealed(blob, other),  # stale HMAC of the old payload
        resealed(blob, other, hmac=None),  # no HMAC
        resealed(blob, other, hmac=documented_mac(OTHER_KEY, 3, "pickle", "none", other)),  # wrong key
        resealed(blob, other, hmac=documented_mac(KEY, 3, "cloudpickle", "none", other)),  # wrong label
        resealed(blob, other, hmac=documented_mac(KEY, 2, "pickle", "none", other)),  # other version
    ):
        with pytest.raises(CheckpointError, match=r"HMAC|carries no HMAC"):
            load_blob(forged, max_bytes=LIMIT, **PICKLE_READER)
    genuine = resealed(blob, other, hmac=documented_mac(KEY, 3, "pickle", "none", other))
    assert load_blob(genuine, max_bytes=LIMIT, **PICKLE_READER)[1] == {"a": "forged"}


def test_a_signed_blob_cannot_be_relabelled() -> None:
    blob, _ = small_blobs()["pickle"]
    for name in ("cloudpickle", "json"):
        with pytest.raises(CheckpointError, match="HMAC does not match"):
            load_blob(tampered(blob, serializer=name), max_bytes=LIMIT, **PICKLE_READER)
    signed_json, _ = small_blobs()["json-signed"]
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_blob(tampered(signed_json, serializer="pickle"), max_bytes=LIMIT, **PICKLE_READER)


def test_a_signed_json_blob_is_verified_when_the_reader_has_a_key() -> None:
    blob, _ = small_blobs()["json-signed"]
    other = b'{"a":"forged"}'
    forged = resealed(blob, other)
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_blob(forged, max_bytes=LIMIT, hmac_key=KEY)
    with pytest.raises(CheckpointError, match="signed with another key"):
        load_blob(blob, max_bytes=LIMIT, hmac_key=OTHER_KEY)
    # Without a key the reader checks the digest only: JSON cannot run code.
    assert load_blob(forged, max_bytes=LIMIT)[1] == {"a": "forged"}


class Boom:
    """A pickle that creates ``path`` (a directory) when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("version", [2, 3])
def test_a_malicious_pickle_is_never_executed_unless_its_hmac_verifies(tmp_path: Path, version: int) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Boom(marker), protocol=5)

    def forge(serializer: str, mac: str | None) -> bytes:
        header: dict[str, Any] = {
            "version": version,
            "serializer": serializer,
            "size": len(evil),
            "digest": sha(evil),
            "compression": "none",
        }
        if mac is not None:
            header["hmac"] = mac
        return raw_blob(header, evil)

    attempts: list[tuple[bytes, dict[str, Any]]] = [
        (forge("pickle", None), {}),  # the default reader allows json only
        (forge("pickle", None), {"hmac_key": KEY}),
        (forge("pickle", None), {"allowed_serializers": ["pickle"]}),  # no key
        (forge("pickle", None), PICKLE_READER),  # unsigned
        (forge("cloudpickle", None), PICKLE_READER),
        (forge("pickle", "0" * 64), PICKLE_READER),
        (forge("pickle", documented_mac(OTHER_KEY, version, "pickle", "none", evil)), PICKLE_READER),
        (forge("pickle", documented_mac(KEY, 1, "pickle", "none", evil)), PICKLE_READER),
        (
            forge("pickle", documented_mac(KEY, 5 - version, "pickle", "none", evil)),
            PICKLE_READER,
        ),  # v2 MAC on v3
        (forge("json", None), PICKLE_READER),  # relabelled: JSON does not unpickle
        (forge("json", documented_mac(KEY, version, "pickle", "none", evil)), PICKLE_READER),
    ]
    for blob, reader in attempts:
        with pytest.raises(CheckpointError):
            load_blob(blob, max_bytes=LIMIT, **reader)
        assert not marker.exists()
    # The control: signed with the reader's key, it is trusted, and so it runs.
    load_blob(
        forge("pickle", documented_mac(KEY, version, "pickle", "none", evil)),
        max_bytes=LIMIT,
        **PICKLE_READER,
    )
    assert marker.is_dir()


class CountingStream(io.RawIOBase):
    """A stream that counts what was read from it."""

    def __init__(self, data: bytes) -> None:
        self.inner = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(min(size, 7) if size > 0 else size)  # short reads, as raw streams may do
        self.bytes_read += len(data)
        return data


def test_an_oversized_blob_is_refused_before_its_payload_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    blob, _ = dump_blob({"big": "x" * 200_000}, json_serializer())
    stream = CountingStream(blob)
    with pytest.raises(CheckpointError, match=r"declares .* over the 100000-byte limit"):
        open_blob(stream, max_bytes=100_000)  # type: ignore[arg-type]
    assert stream.bytes_read <= len(MAGIC) + envelope.MAX_HEADER_BYTES + 1

    def no_hashing(*args: Any) -> Any:
        raise AssertionError("the payload was hashed")

    monkeypatch.setattr(envelope.hashlib, "sha256", no_hashing)
    with pytest.raises(CheckpointError, match="over the 100000-byte limit"):
        open_blob(blob, max_bytes=100_000)


def test_a_declared_size_beyond_the_limit_is_refused_before_reading() -> None:
    lie = raw_blob(
        {"version": 2, "serializer": "json", "size": 10**12, "digest": sha(b""), "compression": "none"}, b""
    )
    stream = CountingStream(lie + b"x" * 100_000)
    with pytest.raises(CheckpointError, match="declares"):
        open_blob(stream, max_bytes=LIMIT)  # type: ignore[arg-type]
    assert stream.bytes_read <= len(MAGIC) + envelope.MAX_HEADER_BYTES + 1


def test_zlib_round_trip_and_damage() -> None:
    value = {"text": "abc" * 10_000, "raw": bytes(1000)}
    blob, _ = dump_blob(value, json_serializer(), compression="zlib")
    assert len(blob) < 1000
    header, loaded = load_blob(blob, max_bytes=LIMIT)
    assert header["compression"] == "zlib" and loaded == value
    inner = json_serializer().dumps(value)
    stream = zlib.compress(inner)
    for payload, message in (
        (stream[:-5], "truncated zlib stream"),
        (stream + b"trailing", "bytes after its zlib stream"),
        (b"not zlib at all", "does not decompress"),
    ):
        forged = raw_blob(
            {
                "version": 2,
                "serializer": "json",
                "size": len(payload),
                "digest": sha(payload),
                "compression": "zlib",
            },
            payload,
        )
        with pytest.raises(CheckpointError, match=message):
            load_blob(forged, max_bytes=LIMIT)


def zlib_bomb(megabytes: int) -> bytes:
    """A small zlib stream of ``megabytes`` MiB of zeros, built without holding them."""
    compressor = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(megabytes)]
    return b"".join(parts) + compressor.flush()


def test_a_decompression_bomb_is_refused_in_bounded_memory() -> None:
    bomb = zlib_bomb(200)
    assert len(bomb) < 300_000
    blob = raw_blob(
        {"version": 2, "serializer": "json", "size": len(bomb), "digest": sha(bomb), "compression": "zlib"},
        bomb,
    )
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="decompresses to more than the 1048576-byte limit"):
            open_blob(blob, max_bytes=LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * LIMIT


def test_a_payload_that_decompresses_to_exactly_the_limit_is_read() -> None:
    data = bytes(1000)
    stored = zlib.compress(data)
    blob = raw_blob(
        {
            "version": 2,
            "serializer": "json",
            "size": len(stored),
            "digest": sha(stored),
            "compression": "zlib",
        },
        stored,
    )
    assert open_blob(blob, max_bytes=1000)[1] == data
    with pytest.raises(CheckpointError, match="decompresses to more than the 999-byte limit"):
        open_blob(blob, max_bytes=999)


# --- golden files: what earlier releases wrote must stay readable ------------------------------------


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def test_golden_v1_json_checkpoint_reads_exactly() -> None:
    header, document = load_blob(golden("checkpoint-v1-json.ckpt"), max_bytes=LIMIT)
    assert header == {
        "version": 1,
        "serializer": "json",
        "size": 907,
        "digest": "sha256:75405f9bbd9e03a9853495de806e3360cab72da73c6a9cd636195d5fad953ba4",
        "compression": "none",
    }
    state = document["state"]
    assert math.isnan(state.pop("nan"))
    assert document == {
        "checkpoint": {
            "id": "ckpt-golden-v1",
            "run_id": "run-golden",
            "run_name": "golden",
            "agent_id": "agent-1",
            "step_id": "step-3",
            "name": "after_fetch",
            "created_at": "2025-01-02T03:04:05.678901+00:00",
            "environment": {"python": "3.12.1", "platform": "Linux-x86_64", "pid": 4242},
        },
        "state": {
            "text": "héllo wörld 😀",
            "nul": "a\x00b",
            "lone_surrogate": "\ud800",
            "big": 2**100,
            "negative": -7,
            "pi": 3.14159,
            "inf": math.inf,
            "minus_inf": -math.inf,
            "flag": True,
            "nothing": None,
            "when": "2025-01-02T03:04:05.678901Z",
            "amount": "12.50",
            "tags": ["a", "b"],
            "raw": "plain bytes",  # version 1 wrote bytes as UTF-8 text
            "color": "red",
            "point": {"x": 1, "y": 2.5},
            "reply": {"text": "hi", "at": "2025-01-02T03:04:05.678901Z", "raw": "ok"},
            "looks_tagged": {BYTES_TAG: "aGk="},  # version 1 had no tags: a plain dict
        },
        "replay": [["fetch", "ab" * 32, {"status": 200, "body": "ok"}]],
        "ledger": {"tokens": 1234, "cost_units": 56789, "steps": 3},
    }


GOLDEN_V2_JSON: dict[str, Any] = {
    "text": "héllo wörld 😀",
    "nul": "a\x00b",
    "lone_surrogate": "\ud800",
    "surrogate_pair_as_two": "\ud83d\ude00",
    "big": 2**100,
    "pi": 3.14159,
    "minus_zero": -0.0,
    "nan": math.nan,
    "inf": math.inf,
    "flag": False,
    "nothing": None,
    "raw": b"\x00\xff binary",
    "when": "2025-01-02T03:04:05.678901Z",
    "naive": "2025-01-02T03:04:05",
    "day": "2025-01-02",
    "took": "PT1.5S",
    "amount": "12.50",
    "tags": ["b", "a"],
    "unique": ["a", "b", "c"],
    "color": "red",
    "point": {"x": 1, "y": 2.5},
    "reply": {"text": "hi", "at": "2025-01-02T03:04:05.678901Z", "raw": b"ok"},
}


@pytest.mark.parametrize(
    ("name", "version", "compression", "digest"),
    [
        (
            "checkpoint-v2-json.ckpt",
            2,
            "none",
            "sha256:54f377b1f61774f184747b1bac0fa2e3b79c33e1cb4ecee95a1326e15001bd66",
        ),
        (
            "checkpoint-v2-json-zlib.ckpt",
            2,
            "zlib",
            "sha256:b88bda1b688d93af11b86287b827061c73a546078d52f134fe3ce7a17e4baf77",
        ),
        (
            "checkpoint-v3-json.ckpt",
            3,
            "none",
            "sha256:54f377b1f61774f184747b1bac0fa2e3b79c33e1cb4ecee95a1326e15001bd66",
        ),
        (
            "checkpoint-v3-json-zlib.ckpt",
            3,
            "zlib",
            "sha256:b88bda1b688d93af11b86287b827061c73a546078d52f134fe3ce7a17e4baf77",
        ),
    ],
)
def test_golden_json_checkpoints_read_exactly(name: str, version: int, compression: str, digest: str) -> None:
    header, value = load_blob(golden(name), max_bytes=LIMIT)
    assert header["version"] == version and header["serializer"] == "json"
    assert header["compression"] == compression and header["digest"] == digest and "hmac" not in header
    assert same(value, GOLDEN_V2_JSON)


@pytest.mark.parametrize(
    ("name", "version"), [("checkpoint-v2-pickle.ckpt", 2), ("checkpoint-v3-pickle.ckpt", 3)]
)
def test_golden_pickle_checkpoints_read_exactly_with_the_test_key(name: str, version: int) -> None:
    blob = golden(name)
    header, value = load_blob(blob, max_bytes=LIMIT, hmac_key=GOLDEN_KEY, allowed_serializers=["pickle"])
    assert header["serializer"] == "pickle" and header["version"] == version
    assert header["hmac"] == documented_mac(GOLDEN_KEY, version, "pickle", "none", payload_of(blob))
    assert same(
        value,
        {
            "text": "héllo \ud800 😀",
            "big": 2**100,
            "raw": b"\x00\xff",
            "when": datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
            "amount": Decimal("12.50"),
            "tags": ("b", "a"),
            "unique": frozenset({1, 2, 3}),
            "nested": [{"k": (1, 2.5, None, True)}],
        },
    )
    with pytest.raises(CheckpointError, match="does not allow"):
        load_blob(blob, max_bytes=LIMIT, hmac_key=GOLDEN_KEY)
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_blob(blob, max_bytes=LIMIT, hmac_key=KEY, allowed_serializers=["pickle"])


def test_golden_v4_pickle_checkpoint_reads_exactly_with_the_test_key() -> None:
    blob = golden("checkpoint-v4-pickle.ckpt")
    reader: dict[str, Any] = {"hmac_key": GOLDEN_KEY, "allowed_serializers": ["pickle"]}
    header, meta = open_meta(blob, max_bytes=LIMIT, **reader)
    meta_section, stored = split_body(blob)
    label = f"MRCK/v4/pickle/none/{len(stored)}/{sha(stored)}/{len(meta_section)}/{sha(meta_section)}\n"
    assert header["version"] == 4 and header["serializer"] == "pickle"
    assert header["hmac"] == hmac.new(GOLDEN_KEY, label.encode(), hashlib.sha256).hexdigest()
    checkpoint = {
        "id": "ckpt-golden-v4",
        "run_id": "run-golden",
        "run_name": "golden",
        "sub_run_id": "",
        "sub_run_seq": None,
        "agent_id": "",
        "step_id": "",
        "name": "after_fetch",
        "created_at": "2025-01-02T03:04:05.678901+00:00",
        "environment": {"python": "3.12.1", "platform": "Linux-x86_64", "pid": 4242},
    }
    trace = {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"}
    ledger = {"tokens": 1234, "cost_units": 56789, "steps": 3}
    assert meta == {
        "checkpoint": checkpoint,
        "state_keys": ["amount", "big", "nested", "raw", "tags", "text", "unique", "when"],
        "agents": [{"name": "planner", "occurrence": 1, "state_keys": ["plan"]}],
        "replay": {"steps": 2, "results": 1},
        "ledger": ledger,
        "trace": trace,
    }
    _, document = load_blob(blob, max_bytes=LIMIT, **reader)
    record = {
        "name": "fetch",
        "digest": "ab" * 32,
        "occurrence": 1,
        "parent": None,
        "seq": 0,
        "end": 1,
        "lane": 0,
    }
    assert same(
        document,
        {
            "checkpoint": checkpoint,
            "state": {
                "text": "héllo \ud800 😀",
                "big": 2**100,
                "raw": b"\x00\xff",
                "when": datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
                "amount": Decimal("12.50"),
                "tags": ("b", "a"),
                "unique": frozenset({1, 2, 3}),
                "nested": [{"k": (1, 2.5, None, True)}],
            },
            "agents": [{"name": "planner", "occurrence": 1, "state": {"plan": ("fetch", "write")}}],
            "replay": [
                {**record, "result": {"status": 200, "raw": b"\x00ok"}},
                {**record, "name": "write", "digest": "cd" * 32, "seq": 2, "end": None},
            ],
            "trace": trace,
            "ledger": ledger,
        },
    )
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        open_meta(blob, max_bytes=LIMIT, hmac_key=KEY, allowed_serializers=["pickle"])


@pytest.mark.parametrize("where", ["header", "meta section"])
def test_a_blob_nested_too_deeply_is_refused_as_damaged(where: str) -> None:
    """A crafted blob whose header or meta section nests JSON arrays thousands deep is a
    CheckpointError, not a RecursionError out of the listing, ``show`` or ``verify``."""
    if where == "header":
        blob = MAGIC + b"[" * 2000 + b"]" * 2000 + b"\n{}"  # within the 4096 bytes a header may have
    else:
        # 2000 levels parse on Python 3.13, whose JSON decoder goes deeper: a meta section has
        # no size limit of its own, so it is crafted deeper still
        meta = b'{"checkpoint":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        blob, _ = seal(b"{}", "json", None, meta=META)
        header = header_of(blob)
        header.update(meta_size=len(meta), meta_digest="sha256:" + hashlib.sha256(meta).hexdigest())
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        blob = MAGIC + text + b"\n" + meta + b"{}"
    with pytest.raises(CheckpointError, match=f"checkpoint {where} is damaged"):
        peek_meta(lambda size: blob[:size], max_bytes=LIMIT)
    with pytest.raises(CheckpointError, match=f"checkpoint {where} is damaged"):
        open_meta(blob, max_bytes=LIMIT)


def test_golden_v4_json_checkpoint_reads_exactly_and_names_itself_from_its_start() -> None:
    blob = golden("checkpoint-v4-json.ckpt")
    header, meta = open_meta(blob, max_bytes=LIMIT)
    assert header["version"] == 4 and header["serializer"] == "json" and "hmac" not in header
    checkpoint = {
        "id": "ckpt-golden-v4-json",
        "run_id": "run-golden",
        "run_name": "golden",
        "name": "after_fetch",
        "created_at": "2025-01-02T03:04:05.678901+00:00",
    }
    assert meta == {"checkpoint": checkpoint}
    # a listing reads the name from the blob's first bytes: the payload is never read
    head = blob[: len(blob) - len(split_body(blob)[1])]
    assert peek_meta(lambda size: head[:size], max_bytes=LIMIT) == meta
    _, document = load_blob(blob, max_bytes=LIMIT)
    assert document["checkpoint"] == {
        **checkpoint,
        "sub_run_id": "",
        "sub_run_seq": None,
        "agent_id": "",
        "step_id": "",
        "environment": {"python": "3.12.1", "platform": "Linux-x86_64", "pid": 4242},
    }
    assert same(document["state"], GOLDEN_V2_JSON)
    assert document["agents"] == [{"name": "planner", "occurrence": 1, "state": {"plan": ["fetch", "write"]}}]
    assert [record["name"] for record in document["replay"]] == ["fetch", "write"]
    assert document["replay"][0]["result"] == {"status": 200}
    assert document["ledger"] == {"tokens": 1234, "cost_units": 56789, "steps": 3}


def test_golden_signed_v3_json_checkpoint_reads_exactly() -> None:
    blob = golden("checkpoint-v3-json-signed.ckpt")
    header, value = load_blob(blob, max_bytes=LIMIT, hmac_key=GOLDEN_KEY)
    assert header["version"] == 3 and header["serializer"] == "json"
    assert header["hmac"] == documented_mac(GOLDEN_KEY, 3, "json", "none", payload_of(blob))
    assert same(value, GOLDEN_V2_JSON)
    assert same(load_blob(blob, max_bytes=LIMIT)[1], GOLDEN_V2_JSON)  # JSON: no key, digest only
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        load_blob(blob, max_bytes=LIMIT, hmac_key=KEY)


@dataclass
class Notes:  # the class of __main__ that checkpoint-v3-pickle-main.ckpt holds objects of
    topic: str


Notes.__module__ = "__main__"


def test_golden_v3_pickle_checkpoint_of_classes_of_main_reads_exactly_in_its_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob = golden("checkpoint-v3-pickle-main.ckpt")
    reader: dict[str, Any] = {"max_bytes": LIMIT, "hmac_key": GOLDEN_KEY, "allowed_serializers": ["pickle"]}
    header, meta = open_meta(blob, **reader)
    assert header["version"] == 3 and header["serializer"] == "pickle" and meta is None  # no summary
    assert header["hmac"] == documented_mac(GOLDEN_KEY, 3, "pickle", "none", payload_of(blob))
    # in another program (here pytest's __main__), the class is not there to unpickle it
    with pytest.raises(CheckpointError, match="AttributeError: Can't get attribute 'Notes'") as info:
        load_blob(blob, **reader)
    assert isinstance(info.value.__cause__, AttributeError)

    monkeypatch.setattr(sys.modules["__main__"], "Notes", Notes, raising=False)  # the program's own
    _, document = load_blob(blob, **reader)
    assert document["state"] == {"notes": Notes("otel"), "count": 1}
    assert document["agents"] == [
        {"name": "planner", "occurrence": 1, "state": {"plan": Notes("plan of otel")}}
    ]
    assert document["replay"][0]["result"] == Notes("otel")
    assert document["checkpoint"]["run_name"] == "researcher"


def test_golden_files_are_all_tested() -> None:
    assert sorted(p.name for p in GOLDEN.glob("*.ckpt")) == [
        "checkpoint-v1-json.ckpt",
        "checkpoint-v2-json-zlib.ckpt",
        "checkpoint-v2-json.ckpt",
        "checkpoint-v2-pickle.ckpt",
        "checkpoint-v3-json-signed.ckpt",
        "checkpoint-v3-json-zlib.ckpt",
        "checkpoint-v3-json.ckpt",
        "checkpoint-v3-pickle-main.ckpt",
        "checkpoint-v3-pickle.ckpt",
        "checkpoint-v4-json.ckpt",
        "checkpoint-v4-pickle.ckpt",
    ]


def test_the_version_1_reader_leaves_tag_like_dicts_alone() -> None:
    payload = b'{"__multirun_bytes__":"aGk="}'
    assert JsonSerializer(decode_bytes_tags=False).loads(payload) == {BYTES_TAG: "aGk="}
    assert JsonSerializer().loads(payload) == b"hi"


def test_base64_tag_is_standard_base64() -> None:
    payload = json_serializer().dumps(b"\xfb\xff")
    assert json.loads(payload) == {BYTES_TAG: base64.b64encode(b"\xfb\xff").decode()}
