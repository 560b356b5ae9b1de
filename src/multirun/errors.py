"""Exceptions raised by multirun.

Every error a user can see derives from :class:`MultiRunError`. Errors about
bad configuration are also :class:`ValueError` or :class:`TypeError`, so code
that already catches those keeps working.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any

# the exceptions; the rest (message helpers, shared texts) is for the package's own modules
__all__ = [
    "BudgetExceededError",
    "CheckpointDecodeError",
    "CheckpointError",
    "ConfigurationError",
    "DeterminismError",
    "LedgerUnavailableError",
    "MultiRunError",
    "PolicyViolation",
    "ReplayError",
    "StepError",
    "StepNotEndedError",
]


class MultiRunError(Exception):
    """Base class of every multirun error."""

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from its message and attributes, not by calling __init__ again with the
        # message alone: pickle (process pools, task queues) and copy.copy need this
        return _rebuild, (type(self), self.args, self.__dict__)


def error_text(error: BaseException | str) -> str:
    """``str(error)``, or a stand-in when the program's ``__str__`` fails: recording an error
    must never raise one of its own in place of the program's."""
    if isinstance(error, str):
        return error
    try:
        return str(error)
    except Exception:
        return f"<str() of {type(error).__name__} failed>"


def _rebuild(cls: type[MultiRunError], args: tuple[Any, ...], state: dict[str, Any]) -> MultiRunError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigurationError(MultiRunError, ValueError):
    """A decorator or ``init`` argument is invalid; the message names it."""


class BudgetExceededError(MultiRunError):
    """A run went over one of its budget limits; raised before the next step runs."""

    def __init__(self, limit: str, used: float, maximum: float, run_id: str = "") -> None:
        self.limit = limit
        self.used = used
        self.maximum = maximum
        self.run_id = run_id
        spent = spent_text(limit, used, maximum)
        if limit == "max_steps" and float(used).is_integer():
            spent += f"; step {int(used) + 1} refused"
        super().__init__(f"budget exceeded: {limit} ({spent})")


class PolicyViolation(MultiRunError):
    """A policy rule decided to abort the step (open circuit, rate limit that cannot wait)."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {message}")


class StepError(MultiRunError):
    """A step with retries failed on its last attempt; ``__cause__`` is the last error."""

    def __init__(self, step_name: str, attempts: int, last_error: BaseException) -> None:
        self.step_name = step_name
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"step {step_name!r} failed after {attempts} attempt{'' if attempts == 1 else 's'}: "
            f"{type(last_error).__name__}: {error_text(last_error)}"
        )


class StepNotEndedError(MultiRunError):
    """A step made by hand (``start_step``) was neither completed nor failed when its agent
    ended: the agent's end fails it with this error, so that its span is exported."""

    def __init__(self, step_name: str, agent_status: str) -> None:
        self.step_name = step_name
        self.agent_status = agent_status
        super().__init__(f"step {step_name!r} was never completed or failed (its agent ended {agent_status})")


class LedgerUnavailableError(MultiRunError):
    """The shared ledger in Redis could not be reached or did not answer in time.

    Raised instead of starting (or recording) a step, so that no budget is
    overspent while the ledger cannot be read; ``__cause__`` is redis-py's error.
    """

    def __init__(
        self, url: str, run_id: str, action: str, error: BaseException, access_refused: bool = False
    ) -> None:
        self.url = url
        self.run_id = run_id
        if access_refused:  # no outage: failing open would hide it, not mend it
            super().__init__(
                f"the shared budget ledger at {url} {ACCESS_REFUSED} ({type(error).__name__}: {error}); "
                f"run {run_id!r} could not {action}. {ACCESS_HINT}"
            )
            return
        super().__init__(
            f"the shared budget ledger at {url} is unavailable ({type(error).__name__}: {error}); "
            f"run {run_id!r} could not {action}. The ledger fails closed so that no budget is "
            "overspent; to go on counting in this process while Redis is down, pass fail_open=True "
            "to RedisLedger, or add fail_open=true to the ledger URL."
        )


ACCESS_REFUSED = "refused the credentials or lacks a permission"
ACCESS_HINT = (
    "Check the user name and password in the ledger URL (redis://USER:PASSWORD@host:port/db); "
    "with Redis ACLs the user needs EVALSHA, SCRIPT LOAD and read and write access to the "
    "ledger's keys."
)


class CheckpointError(MultiRunError):
    """A checkpoint could not be written, found, or verified."""


class ReplayError(MultiRunError):
    """A checkpoint was read but its contents cannot be replayed."""


class CheckpointDecodeError(CheckpointError, ReplayError):
    """A checkpoint was read and verified, but its contents cannot be deserialized (JSON that
    does not decode, a class or module unpickling needs that the program lacks). Both a
    CheckpointError and the ReplayError the API names for a deserialization failure."""


class DeterminismError(ReplayError):
    """A replayed run asked for steps in another order or under other names than it recorded."""


REFUSALS = (BudgetExceededError, PolicyViolation, LedgerUnavailableError)
"""multirun's own decisions to stop a step: never retried (a ledger that cannot be reached
neither: another attempt would spend without a decision), and never swallowed by an
instrumentation (they reach the caller, or a framework's future, as they are)."""


# BaseExceptionGroup is new in Python 3.11; on 3.10 there are no groups to look into
_EXCEPTION_GROUPS: tuple[type[BaseException], ...] = tuple(
    group for group in (getattr(builtins, "BaseExceptionGroup", None),) if group is not None
)


def leaf_errors(error: BaseException) -> Iterator[BaseException]:
    """``error`` itself, or the errors inside it when it is an exception group (TaskGroup, gather).

    A refusal raised in a task of an ``asyncio.TaskGroup`` reaches the step inside one.
    """
    if isinstance(error, _EXCEPTION_GROUPS):
        for inner in error.exceptions:  # type: ignore[attr-defined]
            yield from leaf_errors(inner)
    else:
        yield error


def budget_refusal(error: BaseException | str | None) -> BudgetExceededError | None:
    """The BudgetExceededError that ``error`` is, or that is inside it when it is an exception
    group (the refusals of the tasks of an ``asyncio.TaskGroup`` reach the run in one)."""
    if error is None or isinstance(error, str):
        return None
    return next((leaf for leaf in leaf_errors(error) if isinstance(leaf, BudgetExceededError)), None)


# what the amount of each limit counts (cost is written in dollars)
_COUNTED = {
    "max_tokens": "tokens used",
    "max_steps": "steps used",
    "max_duration_seconds": "seconds elapsed",
    "max_sub_agents": "sub-agents started",
}


def spent_text(limit: str, used: float, maximum: float) -> str:
    """What was used of budget limit ``limit``, e.g. ``2 of 2 steps used`` or ``$0.5 of $1 spent``."""
    if limit == "max_cost_usd":
        return f"${_fmt(used)} of ${_fmt(maximum)} spent"
    return f"{_fmt(used)} of {_fmt(maximum)} {_COUNTED.get(limit, 'used')}"


def _fmt(value: float) -> str:
    # a float past 2**53 is a whole number too, but its hundreds of digits say nothing more
    if isinstance(value, float) and (not value.is_integer() or abs(value) >= 2**53):
        return f"{value:.6g}"
    return str(int(value))
