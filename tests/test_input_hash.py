"""A step's input hash is the same in every process: dict order, sets and PYTHONHASHSEED do not matter."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import hashlib
import json
import math
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multirun
from multirun import run, step
from multirun.checkpoints.hashing import input_hash
from multirun.checkpoints.serializers import BYTES_TAG, JsonSerializer, json_form
from multirun.context import get_current_run_context

PROGRAM = r"""
import json, sys
from multirun.checkpoints.hashing import input_hash
cases = [
    ((), {}),
    (("hello", 3, 2.5, None, True), {}),
    (("\ud800 lone surrogate",), {"k": "v"}),
    (({"b": 1, "a": [1, 2, {"z": 0, "y": 1}]},), {}),
    (({"a": 1, "b": 2},), {"opt": {3, 1, 2}}),
]
print(json.dumps([input_hash(a, k) for a, k in cases]))
"""


def digests_in_a_new_process(seed: str) -> list[str]:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_the_hash_is_the_same_across_processes_and_hash_seeds() -> None:
    first = digests_in_a_new_process("1")
    assert digests_in_a_new_process("12345") == first
    assert digests_in_a_new_process("random") == first
    assert len(set(first)) == len(first)


def test_dict_key_order_and_set_order_do_not_change_the_hash() -> None:
    assert input_hash(({"a": 1, "b": 2},), {}) == input_hash(({"b": 2, "a": 1},), {})
    assert input_hash(({3, 1, 2},), {}) == input_hash(({1, 2, 3},), {})
    assert input_hash((), {"x": 1, "y": 2}) == input_hash((), {"y": 2, "x": 1})


def test_different_values_and_types_hash_differently() -> None:
    assert input_hash((1,), {}) != input_hash(("1",), {})
    assert input_hash((1,), {}) != input_hash((1.0,), {})
    assert input_hash((True,), {}) != input_hash((1,), {})
    assert input_hash(("a",), {}) != input_hash((), {"a": "a"})


def test_inputs_without_a_stable_form_are_not_hashed() -> None:
    assert input_hash((object(),), {}) is None


def test_a_step_with_unhashable_inputs_simply_runs_again_on_replay(traced) -> None:
    calls: list[str] = []

    class Handle:  # no stable form: repr holds an address
        pass

    @step
    def use(handle: Handle) -> str:
        calls.append("use")
        return "used"

    @run
    def job() -> None:
        use(Handle())
        get_current_run_context().checkpoint(name="after")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        job()
    run_id = traced.named("invoke_workflow job")[0].attributes["multirun.run.id"]

    @run(name="job")  # the same program
    def job_again() -> str:
        return use(Handle())

    with multirun.resume(run_id=run_id):
        assert job_again() == "used"
    assert calls == ["use", "use"]


def test_run_ids_that_would_escape_the_store_are_refused(traced) -> None:
    from multirun.context import RunContext
    from multirun.errors import CheckpointError
    from multirun.models import Run

    for bad in ("../../etc", "/abs", "a\x00b", "x" * 300):
        with RunContext(traced.client, Run(id=bad, name="job")) as ctx, pytest.raises(CheckpointError):
            ctx.checkpoint(name="c")


class Tier(enum.Enum):
    GOLD = "gold"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Tagged:
    tags: frozenset[str]


# values that a checkpoint serves back in another form (their JSON form) after a restore
SERVED_IN_ANOTHER_FORM = [
    Tier.GOLD,
    Level.HIGH,
    datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc),
    datetime.date(2024, 5, 1),
    decimal.Decimal("2.50"),
    uuid.UUID(int=5),
    frozenset({"a", "\u200b"}),  # sorted by repr, "\u200b" comes first; by JSON text, "a" does
    {"b", "a", "c"},
    Tagged(frozenset({"a", "\u200b"})),
    (1, "a"),
    b"\xff\x00",
]


@pytest.mark.parametrize("value", SERVED_IN_ANOTHER_FORM, ids=lambda v: type(v).__name__)
def test_a_value_hashes_as_the_form_a_checkpoint_serves_it_in(value: object) -> None:
    serializer = JsonSerializer()
    served = serializer.loads(serializer.dumps(value))
    assert input_hash((value,), {}) is not None
    assert input_hash((value,), {}) == input_hash((served,), {})
    assert input_hash(("x", value), {"k": value}) == input_hash(("x", served), {"k": served})


def test_step_results_passed_on_as_inputs_are_served_on_resume_whatever_their_type(traced) -> None:
    calls: list[str] = []
    fail = True

    @step
    def classify(customer: str) -> Tier:
        calls.append("classify")
        return Tier.GOLD

    @step
    def facts(customer: str) -> tuple[datetime.datetime, decimal.Decimal, uuid.UUID, frozenset[str]]:
        calls.append("facts")
        when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
        return when, decimal.Decimal("2.50"), uuid.UUID(int=5), frozenset({"a", "\u200b"})

    @step
    def draft(tier: object, when: object, amount: object, ref: object, tags: object) -> str:
        calls.append("draft")
        return f"offer for {tier}"

    @step(idempotent=False)
    def send(text: str) -> str:
        calls.append("send")
        if fail:
            raise ConnectionError("mail server down")
        return text

    @run
    def offer(customer: str) -> str:
        return send(draft(classify(customer), *facts(customer)))

    with pytest.raises(ConnectionError):
        offer("acme")
    run_id = traced.named("invoke_workflow offer")[0].attributes["multirun.run.id"]
    calls.clear()
    fail = False
    with multirun.resume(run_id=run_id):
        assert offer("acme") == "offer for Tier.GOLD"
    assert calls == ["send"]  # draft's inputs, served in their JSON form, hash as recorded


# --- digests never change: a checkpoint written before an upgrade is served after it -----------


class Grade(str, enum.Enum):
    GOLD = "gold"


class Name(str):
    pass


class Count(int):
    pass


class Ratio(float):
    pass


PINNED_DIGESTS = [
    ((["a", "b", "c"],), {}, "dbfd8703b1fbb60f0aeb7d5a3b4a4090fbd0e72f88b276e21d9de5436f1d1efd"),
    (
        ({"model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 256},),
        {},
        "147ac242be790fd70020a1ed41eb3731f11cec6162da9bd3541c7c64c0f13aed",
    ),
    (
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],),
        {"model": "m"},
        "8901959ed3fc124ab6e9944470889f0c800dfe19f8079e9035b342ee5934fb42",
    ),
    (
        ((1, [2.5, None], {"k": (True, False)}),),
        {},
        "13e931dc6ebe0cbe3436a57edb6c200f8781507a46b3136c79c7f73d7698db45",
    ),
    (
        ([math.nan, math.inf, -math.inf, -0.0, 2**70],),
        {},
        "37a8ff6ded4a622aa5296e2ae6184c89966bac48643cd0f76f04fb7b6a9f6f2b",
    ),
    (
        (["\ud800 lone", "é😀", "\x00"],),
        {},
        "7934be3a2983638362886979aafa3ead8db38129def7801e738aee422b5e747d",
    ),
    (
        ({"a": {"b": {"c": [[[]]]}}, "": {}},),
        {},
        "5370b7145e8fee4f91e5e6fbec722d4a81b66eb7598303e2906d9b59b47a55a6",
    ),
    (
        ([Grade.GOLD, Level.HIGH, Name("x")],),
        {},
        "d5665dab54c1660a847fb6df0f2f7b2d8a2b0bb46ebbd698120c25ba66518ce3",
    ),
    (({1: "a", 2: "b", 10: "c"},), {}, "cd95bb3f227df668a80250ab981093fd5478a16d3d453196b78b05e922d73315"),
    (({None: 1, True: 2, 1.5: 3},), {}, "e1b0cb69e9fba47ff89b69a517d1a5318da31247f127b9031923a6e1dd3d0f92"),
    (({Grade.GOLD: 1},), {}, "796747e5cc38f0ea1af29d01d34a80d12109d92f1912d534a40c0db0d7f2277c"),
    (("x", ["y"]), {"z": {"w": 1}}, "3481812aafe87ce24429ed0f0ecb7c347f037d56ca99576f9d7aee20d052d8c0"),
    # plain scalars (hashed from their repr, marked "r"), and long arguments
    ((12345,), {}, "r24961de9d75d8560f7db2f8a68890c6b2daf39758fe0bbf7ab5d6cf73893fd4"),
    ((1, "a"), {"k": 2.5}, "r323c7d3a818fee6d8293dee12e2bfe156dd51b34d10c422f9b1b9dbc35d1dc6"),
    (("x" * 600,), {}, "r068ced94a288b2c775e47fa0ae914ce4d63f09a8fd7f18524bae027c125c7a7"),
    (
        ([{"role": "user", "content": "y" * 700}],),
        {},
        "44e9db10e301f37c59ba9f2b2b180ee2c68a6c31dc15f6f53b754c89abe32df9",
    ),
]


@pytest.mark.parametrize(("args", "kwargs", "digest"), PINNED_DIGESTS, ids=lambda v: repr(v)[:30])
def test_digests_of_recorded_arguments_stay_as_they_were(args: tuple, kwargs: dict, digest: str) -> None:
    assert input_hash(args, kwargs) == digest


def json_form_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The digest as defined before JSON data had a shortcut: plain scalar arguments by repr,
    anything else through its JSON form (by repr too when every argument is a scalar in JSON)."""
    scalars = (str, int, float, bool, type(None))
    if all(type(v) in scalars for v in [*args, *kwargs.values()]):
        plain_args, plain_kwargs = list(args), kwargs
    else:
        try:
            plain_args, plain_kwargs = json_form([list(args), kwargs])
        except (TypeError, ValueError, RecursionError):
            return None
    if all(type(v) in scalars for v in [*plain_args, *plain_kwargs.values()]):
        if not plain_args and not plain_kwargs:
            return hashlib.sha256(b"[[],{}]").hexdigest()
        text = (
            repr(tuple(plain_args))
            if not plain_kwargs
            else repr((tuple(plain_args), sorted(plain_kwargs.items())))
        )
        return "r" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[1:]
    try:
        text = json.dumps(
            [plain_args, plain_kwargs],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=True,
        )
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


texts = (
    st.text(st.characters(exclude_categories=()))  # every code point, lone surrogates included
    | st.sampled_from(["\ud800", "\udfff", "\x00", "😀", "é", "\u2028", "", BYTES_TAG])
)
# values json.dumps would write otherwise than their JSON form: they must hash as that form
lookalikes = st.sampled_from([Grade.GOLD, Level.HIGH, Tier.GOLD]) | st.builds(Name, texts)
lookalikes |= st.builds(Count, st.integers()) | st.builds(Ratio, st.floats())
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**64, -(2**64), 2**64 - 1, 10**40])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([-0.0, math.nan, math.inf, -math.inf])
    | texts
)
keys = (
    texts | st.integers() | st.floats() | st.booleans() | st.none() | st.sampled_from([Grade.GOLD, Name("k")])
)
json_like = st.recursive(
    scalars | lookalikes,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(texts, children, max_size=5)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=25,
)
arguments = st.tuples(
    st.lists(json_like, max_size=3).map(tuple), st.dictionaries(texts, json_like, max_size=3)
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(arguments)
def test_json_like_arguments_hash_as_their_json_form(call: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
    args, kwargs = call
    assert input_hash(args, kwargs) == json_form_digest(args, kwargs)


def nested(depth: int, kind: type) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value] if kind is list else {"k": value}
    return value


def cyclic_list() -> list[object]:
    loop: list[object] = ["a"]
    loop.append(loop)
    return loop


def cyclic_dict() -> dict[str, object]:
    loop: dict[str, object] = {"a": 1}
    loop["self"] = loop
    return loop


shared = ["shared", 1]
TRICKY_ARGUMENTS = {
    "nested 50 lists": ((nested(50, list),), {}),
    "nested 400 dicts": ((nested(400, dict),), {}),
    "nested 5000 lists": ((nested(5000, list),), {}),
    "a list inside itself": ((cyclic_list(),), {}),
    "a dict inside itself": ((cyclic_dict(),), {}),
    "one list twice": (([shared, shared],), {"again": shared}),
    "the bytes tag as a key": (({BYTES_TAG: "aGk="},), {}),
    "the bytes tag as a keyword": (([1],), {BYTES_TAG: "aGk="}),
    "an int too long for str()": (([10**5000],), {}),
    "int keys that sort otherwise as text": (({1: "a", 2: "b", 10: "c"},), {}),
}


@pytest.mark.parametrize("call", TRICKY_ARGUMENTS.values(), ids=TRICKY_ARGUMENTS)
def test_deep_cyclic_and_refused_arguments_hash_as_their_json_form(call: tuple[tuple, dict]) -> None:
    assert input_hash(*call) == json_form_digest(*call)


def test_without_the_json_c_accelerator_digests_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from multirun.checkpoints import hashing

    monkeypatch.setattr(hashing, "_C_ENCODER", None)  # as on a Python without json's C encoder
    for args, kwargs, digest in PINNED_DIGESTS:
        assert input_hash(args, kwargs) == digest
