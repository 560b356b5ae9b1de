"""A step's input hash is the same in every process: dict order, sets and PYTHONHASHSEED do not matter."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import os
import subprocess
import sys
import uuid

import pytest

import multirun
from multirun import run, step
from multirun.checkpoints.hashing import input_hash
from multirun.checkpoints.serializers import JsonSerializer
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

    @run
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
