"""Iterators and generators pass through multirun unread: it never consumes what the program
still has to read (a step's generator argument, a run's or a checkpoint's iterator result)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from multirun import checkpoint, run, step
from multirun.checkpoints.hashing import input_hash
from multirun.context import get_current_run_context
from multirun.errors import CheckpointError
from multirun.telemetry import attributes as attr

ONE_SHOT: dict[str, Callable[[], Iterator[Any]]] = {
    "generator": lambda: (n for n in [1, 2, 3]),
    "list iterator": lambda: iter([1, 2, 3]),
    "map": lambda: map(int, "123"),
    "file": lambda: io.StringIO("1\n2\n3\n"),
}


@pytest.mark.parametrize("make", ONE_SHOT.values(), ids=ONE_SHOT.keys())
def test_a_step_given_an_iterator_reads_all_of_it(traced, make: Callable[[], Iterator[Any]]) -> None:
    @step
    def total(numbers: Iterator[Any]) -> int:
        return sum(int(n) for n in numbers)

    @run
    def main() -> int:
        return total(make())

    assert main() == 6
    # no input hash without reading it: the step is traced, and never served from a checkpoint
    assert attr.STEP_INPUT_HASH not in traced.span("step total").attributes


def test_the_warning_of_a_step_given_an_iterator_says_to_pass_a_list(traced, caplog) -> None:
    """The step is not served after a restore: the checkpoint's warning says why, in terms of
    what the program passed (an iterator, not an object such as a client)."""

    @step
    def total(numbers: Iterator[int]) -> int:
        return sum(numbers)

    @run
    def main() -> int:
        found = total(iter([1, 2, 3]))
        get_current_run_context().checkpoint(name="after")
        return found

    with caplog.at_level(logging.WARNING):
        assert main() == 6
    [warning] = [r.getMessage() for r in caplog.records if "'total'" in r.getMessage()]
    assert "iterator" in warning and "list" in warning


@pytest.mark.parametrize("make", ONE_SHOT.values(), ids=ONE_SHOT.keys())
def test_an_iterator_argument_has_no_input_hash_and_is_left_unread(make: Callable[[], Iterator[Any]]) -> None:
    numbers = make()
    assert input_hash((numbers,), {}) is None
    assert input_hash((), {"numbers": [numbers]}) is None
    assert [int(n) for n in numbers] == [1, 2, 3]


def test_a_run_returning_an_iterator_hands_all_of_it_to_its_caller(traced) -> None:
    @step
    def numbers() -> Iterator[int]:
        yield from [1, 2, 3]

    @run
    def from_a_list() -> Iterator[int]:
        return iter([1, 2, 3])

    @run
    def from_a_step() -> Iterator[int]:
        return numbers()

    assert list(from_a_list()) == [1, 2, 3]
    assert list(from_a_step()) == [1, 2, 3]


def test_a_checkpoint_of_a_function_returning_an_iterator_leaves_it_unread_and_out(traced, caplog) -> None:
    @checkpoint(name="listed")
    def listed() -> Iterator[int]:
        get_current_run_context().set_state("page", 2)
        return iter([1, 2, 3])

    @run
    def main() -> tuple[list[int], list[str]]:
        return list(listed()), [c.id for c in get_current_run_context().run.checkpoints]

    with caplog.at_level(logging.WARNING):
        numbers, (written,) = main()
    assert numbers == [1, 2, 3]
    assert traced.client.checkpoints.load(written).state == {"page": 2}  # the rest is kept
    assert any("'listed'" in r.getMessage() and "iterator" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("make", ONE_SHOT.values(), ids=ONE_SHOT.keys())
def test_a_step_returning_an_iterator_keeps_it_unread_through_a_checkpoint(
    traced, make: Callable[[], Iterator[Any]]
) -> None:
    @step
    def numbers() -> Iterator[Any]:
        return make()

    @run
    def main() -> list[int]:
        found = numbers()
        get_current_run_context().checkpoint(name="meanwhile")
        return [int(n) for n in found]

    assert main() == [1, 2, 3]


def test_an_iterator_in_the_state_is_named_and_left_unread_by_a_checkpoint(traced) -> None:
    pages = (n for n in [1, 2, 3])

    @run
    def main() -> None:
        get_current_run_context().set_state("pages", pages)
        get_current_run_context().checkpoint(name="paged")

    with pytest.raises(CheckpointError, match=r"\['pages'\]: generator is an iterator.*keep a list instead"):
        main()
    assert list(pages) == [1, 2, 3]
