"""``@think``, ``@act``, ``@observe``, ``@synthesize``: steps with their kind preset."""

from __future__ import annotations

from typing import Any

import pytest

from multirun import act, observe, run, step, synthesize, think
from multirun.errors import ConfigurationError


def step_attrs(traced: Any, name: str) -> dict[str, Any]:
    (span,) = [s for s in traced.spans() if (s.attributes or {}).get("multirun.step.name") == name]
    return dict(span.attributes or {})


def test_each_word_gives_its_step_kind(traced) -> None:
    @think
    def analyze() -> str:
        return "plan"

    @act("search", retry=1)
    def use_tool(query: str) -> str:
        return f"found {query}"

    @observe(name="gather")
    async def gather() -> list[str]:
        return ["a"]

    @synthesize("answer", model="gpt-4o-mini")
    def write() -> str:
        return "done"

    @run(name="main")
    async def main() -> str:
        analyze()
        use_tool("x")
        await gather()
        return write()

    import asyncio

    assert asyncio.run(main()) == "done"
    assert step_attrs(traced, "analyze")["multirun.step.kind"] == "llm_call"
    assert step_attrs(traced, "search")["multirun.step.kind"] == "tool_call"
    assert step_attrs(traced, "gather")["multirun.step.kind"] == "function"
    answer = step_attrs(traced, "answer")
    assert answer["multirun.step.kind"] == "llm_call"
    assert answer["gen_ai.request.model"] == "gpt-4o-mini"


def test_kind_cannot_be_overridden() -> None:
    with pytest.raises(ConfigurationError, match="@think is a llm_call step"):
        think(kind="tool_call")


def test_name_given_twice_or_of_a_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="give the name once"):
        act("a", name="b")
    with pytest.raises(ConfigurationError, match="takes a function or the step's name"):
        observe(42)  # type: ignore[call-overload]


def test_parameters_are_checked_like_steps() -> None:
    with pytest.raises(ConfigurationError, match="retry"):

        @synthesize(retry=-1)
        def write() -> None: ...


@pytest.mark.parametrize("word", [think, act, observe, synthesize], ids=lambda w: w.__name__)
def test_errors_name_the_decorator_that_was_used(word: Any) -> None:
    at = f"@{word.__name__}"
    with pytest.raises(ConfigurationError, match=rf"^{at}\(name=\.\.\.\) must be a non-empty string"):
        word("")(lambda: None)
    with pytest.raises(ConfigurationError, match=rf"^{at}\(retry=\.\.\.\) must be an int >= 0"):

        @word(retry=-1)
        def bad_retry() -> None: ...

    with pytest.raises(ConfigurationError, match=rf"^{at}\(model=\.\.\.\)"):
        word("x", model="")(lambda: None)
    with pytest.raises(ConfigurationError, match=rf"^{at}: pass name=\.\.\. for a callable without a name"):
        word(lambda: None)
    with pytest.raises(ConfigurationError, match=rf"^{at} decorates a function or method"):
        word("x")(42)
    with pytest.raises(TypeError, match=rf"^{at} got an unexpected keyword argument 'retyr'"):
        word(retyr=1)


def test_step_itself_still_names_step() -> None:
    with pytest.raises(ConfigurationError, match=r"^@step\(name=\.\.\.\) must be a non-empty string"):
        step(name="")(lambda: None)
