"""Run: one execution of an agent program, and RunPatch, a partial update of it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import Field, PrivateAttr, SerializerFunctionWrapHandler, model_serializer

from multirun.models._base import Model, new_id, utcnow
from multirun.models.budget import Budget
from multirun.models.checkpoint import CheckpointMeta
from multirun.models.policy import Policy
from multirun.models.step import Step


class RunStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # checkpointed, waiting for replay


class Run(Model):
    id: str = Field(default_factory=new_id)
    name: str = ""
    status: RunStatus = RunStatus.PENDING
    parent_id: str | None = None
    steps: list[Step] = Field(default_factory=list)
    current_step_id: str | None = None
    checkpoints: list[CheckpointMeta] = Field(default_factory=list)
    latest_checkpoint_id: str | None = None
    budget: Budget | None = None
    tokens_used: int = 0
    cost_usd: float = 0.0
    policy: Policy | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: bytes | None = None
    error: str | None = None

    # Building a Step model costs about 3 us, and a run that ends would build one per kept step,
    # mostly never read: ``steps`` is filled when first read (or serialized, compared, copied).
    _steps_source: Callable[[], list[Step]] | None = PrivateAttr(default=None)

    def _fill_steps_later(self, build: Callable[[], list[Step]]) -> None:
        """Let ``steps`` be ``build()``, built the first time anything reads it."""
        with _FILLING:
            self._steps_source = build
            self.__dict__.pop("steps", None)
            self.__pydantic_fields_set__.add("steps")

    def _fill_steps(self) -> None:
        if "steps" in self.__dict__:
            return
        with _FILLING:  # one build, seen by every thread that reads meanwhile
            if "steps" in self.__dict__:
                return
            build = self._steps_source
            steps = build() if build is not None else []
            values = self.__dict__
            # the declared field order (model_dump's), swapped in whole: a reader in another
            # thread sees the old dict or the new one, never one with fields missing
            ordered = {name: values[name] for name in _FIELDS_BEFORE_STEPS if name in values}
            ordered["steps"] = steps
            ordered.update((name, value) for name, value in values.items() if name not in ordered)
            object.__setattr__(self, "__dict__", ordered)
            self._steps_source = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "steps":
            self._fill_steps()  # in its place, and the builder (and what it holds) let go
        super().__setattr__(name, value)

    if not TYPE_CHECKING:  # for mypy, Run's attributes stay its fields

        def __getattr__(self, name: str) -> Any:
            if name == "steps":
                self._fill_steps()
                return self.__dict__["steps"]
            return super().__getattr__(name)

    # no return annotation: pydantic then keeps Run's own JSON schema for serialization
    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        self._fill_steps()
        return handler(self)

    def __eq__(self, other: object) -> bool:
        self._fill_steps()
        if isinstance(other, Run):
            other._fill_steps()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # as a pydantic model's: mutable, not hashable

    def __repr_args__(self) -> Any:
        self._fill_steps()
        return super().__repr_args__()

    def __iter__(self) -> Any:
        self._fill_steps()
        return super().__iter__()

    def __copy__(self) -> Run:
        self._fill_steps()
        return super().__copy__()

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Run:
        self._fill_steps()
        return super().__deepcopy__(memo)

    def __getstate__(self) -> dict[Any, Any]:
        self._fill_steps()
        return super().__getstate__()


_FILLING = threading.Lock()
_FIELDS_BEFORE_STEPS = tuple(list(Run.model_fields)[: list(Run.model_fields).index("steps")])


class RunPatch(Model):
    """A partial update: only the fields that are not None are applied."""

    name: str | None = None
    status: RunStatus | None = None
    current_step_id: str | None = None
    latest_checkpoint_id: str | None = None
    budget: Budget | None = None
    tokens_used: int | None = None
    cost_usd: float | None = None
    policy: Policy | None = None
    metadata: dict[str, Any] | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: bytes | None = None
    error: str | None = None

    def apply(self, run: Run) -> Run:
        """Return a copy of ``run`` with the fields of this patch that are set."""
        changes = {k: v for k, v in self if v is not None}
        return run.model_copy(update=changes)
