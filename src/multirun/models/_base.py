from __future__ import annotations

import copy
import os
import random
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


def new_id() -> str:
    """A random 128-bit id in hex, in the UUID4 layout.

    Drawn from ``random`` like the SDK's span ids, not from ``os.urandom``
    (``uuid.uuid4``): that system call drops and retakes the GIL so quickly
    that the span export thread starves and its queue overflows when many
    runs start (benchmarks/results/export_starvation.md). Ids need to be
    unique, not secret. Drawn from a generator of multirun's own: a program that calls
    ``random.seed(42)`` for reproducibility would otherwise give every run the same ids each
    time it starts (joining an earlier run's shared ledger and checkpoints).
    """
    # the version (4) and variant (RFC 4122) bits set as uuid.UUID(version=4) sets them,
    # without building the UUID object (a sixth of the time)
    return f"{_random_bits(128) & _RANDOM_BITS | _UUID4_BITS:032x}"


_ids = random.Random()  # seeded from os.urandom
_random_bits = _ids.getrandbits
if hasattr(os, "register_at_fork"):  # a forked child draws ids of its own, as ``random`` does
    os.register_at_fork(after_in_child=_ids.seed)


_RANDOM_BITS = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_BITS = (0x4000 << 64) | (0x8000 << 48)


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic takes True for 1: a limit of one, unnoticed
        raise ValueError(f"must be a number, not a bool ({value!r})")
    return value


NOT_BOOL = BeforeValidator(_not_a_bool)
"""For a number a user configures (a limit, a delay): ``Annotated[int, NOT_BOOL]``."""

Count = Annotated[int, NOT_BOOL]

MAX_COUNT_LIMIT = 2**63 - 1
"""The largest count limit (tokens, steps, sub-agents): spans carry limits as OTLP 64-bit
integers (an exporter drops a larger one, logging an error at every export), and the shared
ledger counts in them. No limit is None."""
Amount = Annotated[float, NOT_BOOL]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(BaseModel):
    """Shared configuration: enums serialise as their values, extra fields are refused."""

    model_config = ConfigDict(use_enum_values=False, extra="forbid", validate_assignment=False)


class Settings(Model):
    """A model the user configures (a budget, a policy rule): a field set after construction is
    validated too, since runs read it when they start, not when they are decorated."""

    model_config = ConfigDict(validate_assignment=True)

    def __setattr__(self, name: str, value: Any) -> None:
        fields, fields_set = self.__dict__.copy(), self.__pydantic_fields_set__.copy()
        try:
            super().__setattr__(name, value)
        except ValidationError:
            # pydantic sets the field before a model validator refuses it (pydantic#7105):
            # the rule stays the valid one it was
            object.__setattr__(self, "__dict__", fields)
            object.__setattr__(self, "__pydantic_fields_set__", fields_set)
            raise

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with ``update``, validated as the constructor validates (pydantic's copy is
        not), from the fields that were given and the update: never a rule the constructor
        would refuse, nor one keeping a value a validator derived from a field it changes."""
        if not update:
            return super().model_copy(deep=deep)
        values = {name: self.__dict__[name] for name in self.model_fields_set if name in self.__dict__}
        values.update(update)
        copied = self.model_validate(copy.deepcopy(values) if deep else values)
        private = self.__pydantic_private__
        if private:  # a subclass's private attributes, copied as pydantic's copy does
            private = copy.deepcopy(private) if deep else dict(private)
            object.__setattr__(copied, "__pydantic_private__", private)
        return copied


ModelT = TypeVar("ModelT", bound=BaseModel)
_DEFAULTS: dict[type[BaseModel], dict[str, Any]] = {}


def construct_trusted(model: type[ModelT], fields: dict[str, Any]) -> ModelT:
    """``model`` from values that multirun made itself and knows valid, without validating them:
    what ``model.model_construct`` does, in a fifth of the time (a run builds one Step model
    per kept step when it ends). For models whose defaults are immutable values; a field with a
    default factory must be given."""
    defaults = _DEFAULTS.get(model)
    if defaults is None:
        defaults = _DEFAULTS[model] = {name: field.default for name, field in model.model_fields.items()}
    values = defaults.copy()  # the fields' declared order, as validation would give
    values.update(fields)
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", set(fields))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance
