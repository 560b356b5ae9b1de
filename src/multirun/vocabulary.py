"""``@think``, ``@act``, ``@observe``, ``@synthesize``: ``@step`` with the kind preset.

For users who write agents in the think / act / observe / synthesize style
(as ClientAI does): each is ``@step`` with every parameter of ``@step`` but
``kind``, and also takes the step's name as its only positional argument,
``@think("analyze")``, the way ClientAI's decorators do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from multirun.decorators import step_as
from multirun.errors import ConfigurationError
from multirun.models.step import StepKind

F = TypeVar("F", bound=Callable[..., Any])


class _PresetStep:
    """A step decorator whose kind is fixed."""

    def __init__(self, word: str, kind: StepKind) -> None:
        self._word = word
        self._kind = kind
        self.__name__ = word
        self.__doc__ = f'``@step(kind={kind.value!r})``; ``@{word}("name")`` names the step.'

    @overload
    def __call__(self, func: F, /) -> F: ...
    @overload
    def __call__(self, name: str | None = None, /, **options: Any) -> Callable[[F], F]: ...
    def __call__(self, func_or_name: Any = None, /, **options: Any) -> Any:
        if "kind" in options:
            raise ConfigurationError(
                f"@{self._word} is a {self._kind.value} step: it takes no kind (use @step(kind=...))"
            )
        if callable(func_or_name):
            return step_as(self._word, func_or_name, kind=self._kind, **options)
        if func_or_name is not None:
            if not isinstance(func_or_name, str):
                raise ConfigurationError(
                    f"@{self._word} takes a function or the step's name, got {type(func_or_name).__name__}"
                )
            if "name" in options:
                raise ConfigurationError(f"@{self._word}: give the name once, positionally or as name=")
            options["name"] = func_or_name
        return step_as(self._word, kind=self._kind, **options)

    def __repr__(self) -> str:
        return f"<multirun.{self._word}: @step(kind={self._kind.value!r})>"


think = _PresetStep("think", StepKind.LLM_CALL)
"""A reasoning step: an LLM call."""
act = _PresetStep("act", StepKind.TOOL_CALL)
"""An action step: a tool call."""
observe = _PresetStep("observe", StepKind.FUNCTION)
"""An observation step: plain code that gathers input."""
synthesize = _PresetStep("synthesize", StepKind.LLM_CALL)
"""A synthesis step: an LLM call that writes the answer."""
