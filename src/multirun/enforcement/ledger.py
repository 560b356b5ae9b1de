"""RunLedger: what one run has spent, kept exact under threads and asyncio tasks.

Totals are integers (tokens, cost in nano-dollars, steps, sub-agents) updated
under one lock, so concurrent steps never lose an update and sums never drift
the way float additions do. A sub-run's ledger passes every charge on to its
parent, so the parent's limits hold across all of its sub-runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from multirun.errors import BudgetExceededError
from multirun.models.budget import Budget, BudgetStatus, first_exceeded
from multirun.pricing import COST_UNITS_PER_USD, cost_limit_units

_INFINITY = float("inf")
_NO_LIMITS = Budget()  # read only: a run without a budget (building one per run costs ~5 us)


SPEND_TOTALS = ("tokens", "cost_units", "steps", "unpriced_reports")  # what restore() takes


class LedgerReadings:
    """What a ledger says about its totals against a budget; shared by RunLedger and RedisLedger.

    Subclasses provide ``tokens``, ``cost_units``, ``steps``, ``sub_agents``,
    ``_now_and_start()`` and ``_lock``.
    """

    __slots__ = ()
    run_id: str
    budget: Budget | None
    tokens: int
    cost_units: int
    steps: int
    sub_agents: int
    unpriced_reports: int
    _lock: threading.Lock

    def _now_and_start(self) -> tuple[float, float]:
        """The time now and when the run started, on this process's clock."""
        raise NotImplementedError

    def elapsed(self) -> float:
        """Seconds since the run started."""
        now, started = self._now_and_start()
        return now - started

    def _duration(self, budget: Budget) -> float:
        """``elapsed()``, and at least max_duration_seconds once the deadline is reached:
        begin_step and the policy compare the clock with start + limit, which can round
        above start + elapsed (1000.0 + 0.3 is 1000.3, 1000.3 - 1000.0 is 0.29999...)."""
        now, started = self._now_and_start()
        limit = budget.max_duration_seconds
        if limit is not None and now >= started + limit:
            return max(now - started, limit)
        return now - started

    def chain(self) -> Sequence[LedgerReadings]:
        """This ledger, then the ledgers of the runs that enclose it (those known here)."""
        raise NotImplementedError

    def used_up(self) -> bool:
        """True if this run or a run that encloses it has reached a limit of its budget."""
        return self.over_budget() is not None

    def over_budget(self, *, next_step: bool = False) -> BudgetExceededError | None:
        """The refusal naming the first of this run and the runs enclosing it that has reached
        a limit of its budget (counting the step about to start with ``next_step``), or None."""
        for ledger in self.chain():
            budget = ledger.budget
            hit = None if budget is None else ledger.exceeded(budget, next_step=next_step)
            if hit is not None:
                return BudgetExceededError(*hit, run_id=ledger.run_id)
        return None

    def totals(self) -> dict[str, int]:
        """The spend a checkpoint keeps (``SPEND_TOTALS``, in ``restore``'s argument order)."""
        return {name: getattr(self, name) for name in SPEND_TOTALS}

    def shares(self, budget: Budget) -> dict[str, float]:
        """How much of each limit that is set is used, as a ratio (1.0 = all of it)."""
        found: dict[str, float] = {}
        if budget.max_tokens is not None:
            found["max_tokens"] = self.tokens / budget.max_tokens
        if budget.max_cost_usd is not None:
            found["max_cost_usd"] = self.cost_units / cost_limit_units(budget.max_cost_usd)
        if budget.max_steps is not None:
            found["max_steps"] = self.steps / budget.max_steps
        if budget.max_duration_seconds is not None:
            found["max_duration_seconds"] = self._duration(budget) / budget.max_duration_seconds
        if budget.max_sub_agents is not None:
            # max_sub_agents=0 allows none: n started is a share of n, not infinite (metrics and
            # JSON take it), so the first one makes it 100%, exceeded
            found["max_sub_agents"] = self.sub_agents / max(budget.max_sub_agents, 1)
        return found

    def exceeded(self, budget: Budget, *, next_step: bool = False) -> tuple[str, float, float] | None:
        """The first limit of ``budget`` reached, as (limit, used, maximum), or None.

        With ``next_step`` the step about to start is counted, so ``max_steps=3``
        lets exactly three steps run.
        """
        hit = first_exceeded(
            budget,
            tokens=self.tokens,
            cost_units=self.cost_units,
            steps=self.steps + (1 if next_step else 0),
            duration_seconds=self._duration(budget),
            sub_agents=self.sub_agents,
        )
        if hit is not None and hit[0] == "max_steps":
            return "max_steps", self.steps, hit[2]  # report the steps that ran, not the one refused
        return hit

    def status(self, budget: Budget | None) -> BudgetStatus:
        """A snapshot of spend against ``budget`` (percentages of the tightest limit).

        Every figure is of one moment: a charge landing meanwhile (another thread's step)
        is in all of them or in none.
        """
        now = self._snapshot()
        tokens, cost_units, steps = now.tokens, now.cost_units, now.steps
        cost = cost_units / COST_UNITS_PER_USD
        elapsed = now.elapsed()
        if budget is None:
            return BudgetStatus(
                tokens_used=tokens,
                cost_used_usd=cost,
                steps_used=steps,
                duration_seconds=elapsed,
                sub_agents_used=now.sub_agents,
            )
        shares = now.shares(budget)
        return BudgetStatus(
            tokens_used=tokens,
            tokens_remaining=None if budget.max_tokens is None else max(budget.max_tokens - tokens, 0),
            cost_used_usd=cost,
            cost_remaining_usd=(
                None
                if budget.max_cost_usd is None
                else max(cost_limit_units(budget.max_cost_usd) - cost_units, 0) / COST_UNITS_PER_USD
            ),
            steps_used=steps,
            steps_remaining=None if budget.max_steps is None else max(budget.max_steps - steps, 0),
            duration_seconds=elapsed,
            sub_agents_used=now.sub_agents,
            percentage_used=round(100.0 * max(shares.values(), default=0.0), 4),
            is_exceeded=now.exceeded(budget) is not None,
        )

    def _snapshot(self) -> _Snapshot:
        """The totals and the clock as they are now, read together."""
        with self._lock:
            totals = (self.tokens, self.cost_units, self.steps, self.sub_agents, self.unpriced_reports)
        return _Snapshot(self.run_id, self.budget, totals, self._now_and_start())


class _Snapshot(LedgerReadings):
    """A ledger's readings frozen at one moment, for ``status``."""

    __slots__ = (
        "_times",
        "budget",
        "cost_units",
        "run_id",
        "steps",
        "sub_agents",
        "tokens",
        "unpriced_reports",
    )

    def __init__(
        self,
        run_id: str,
        budget: Budget | None,
        totals: tuple[int, int, int, int, int],
        times: tuple[float, float],
    ) -> None:
        self.run_id, self.budget = run_id, budget
        self.tokens, self.cost_units, self.steps, self.sub_agents, self.unpriced_reports = totals
        self._times = times

    def _now_and_start(self) -> tuple[float, float]:
        return self._times

    def chain(self) -> Sequence[LedgerReadings]:
        return (self,)


class RunLedger(LedgerReadings):
    __slots__ = (
        "_clock",
        "_deadline",
        "_lock",
        "_max_cost_units",
        "_max_steps",
        "_max_sub_agents",
        "_max_tokens",
        "budget",
        "cost_units",
        "parent",
        "run_id",
        "started",
        "steps",
        "sub_agents",
        "tokens",
        "unpriced_reports",
    )

    def __init__(
        self,
        parent: RunLedger | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        budget: Budget | None = None,
        run_id: str = "",
    ) -> None:
        self._lock = threading.Lock()
        self.run_id = run_id
        self._clock = clock
        self.parent = parent
        self.started = clock()
        self.tokens = 0
        self.cost_units = 0
        self.steps = 0
        self.sub_agents = 0
        self.unpriced_reports = 0
        self.set_budget(budget)

    def set_budget(self, budget: Budget | None) -> None:
        """Enforce ``budget``; its limits are kept as plain numbers for the per-step check."""
        inf = _INFINITY
        self.budget = budget
        b = budget if budget is not None else _NO_LIMITS
        self._max_tokens = inf if b.max_tokens is None else b.max_tokens
        self._max_cost_units = inf if b.max_cost_usd is None else cost_limit_units(b.max_cost_usd)
        self._max_steps = inf if b.max_steps is None else b.max_steps
        self._max_sub_agents = inf if b.max_sub_agents is None else b.max_sub_agents
        duration = b.max_duration_seconds
        self._deadline = inf if duration is None else self.started + duration

    def begin_step(self, check: bool = True) -> None:
        """Count one more step in this run and its ancestors.

        With ``check``, first raise BudgetExceededError if any of them has
        reached a limit (the step about to start counts towards max_steps).
        """
        if self.parent is None:  # the common case: one lock, one pass, the limits inline
            lock = self._lock
            lock.acquire()  # acquire/release: cheaper than ``with`` on CPython 3.12
            try:
                if (
                    check
                    and self.budget is not None
                    and (
                        self.tokens >= self._max_tokens
                        or self.cost_units >= self._max_cost_units
                        or self.steps >= self._max_steps
                        or self.sub_agents > self._max_sub_agents
                        or (self._deadline != _INFINITY and self._clock() >= self._deadline)
                    )
                ):
                    self._raise_exceeded()
                self.steps += 1
            finally:
                lock.release()
            return
        # a sub-run: every ledger up to the root is checked and counted under its lock at once,
        # so that max_steps is exact there too. Every caller takes the locks child first, root
        # last, so sibling sub-runs cannot deadlock.
        chain = self.chain()
        for ledger in chain:
            ledger._lock.acquire()
        try:
            if check:
                for ledger in chain:
                    ledger._raise_if_exceeded()
            for ledger in chain:
                ledger.steps += 1
        finally:
            for ledger in reversed(chain):
                ledger._lock.release()

    def chain(self) -> list[RunLedger]:
        """This ledger, then its parent's, up to the root run's."""
        found = [self]
        parent = self.parent
        while parent is not None:
            found.append(parent)
            parent = parent.parent
        return found

    def _raise_if_exceeded(self) -> None:
        if self.budget is None:
            return
        if (
            self.tokens >= self._max_tokens
            or self.cost_units >= self._max_cost_units
            or self.steps >= self._max_steps
            or self.sub_agents > self._max_sub_agents
            or (self._deadline != _INFINITY and self._clock() >= self._deadline)
        ):
            self._raise_exceeded()

    def _raise_exceeded(self) -> None:
        assert self.budget is not None
        hit = self.exceeded(self.budget, next_step=True)
        if hit is not None:
            raise BudgetExceededError(*hit, run_id=self.run_id)

    @property
    def cost_usd(self) -> float:
        return self.cost_units / COST_UNITS_PER_USD

    def _now_and_start(self) -> tuple[float, float]:
        return self._clock(), self.started

    def charge(self, tokens: int, cost_units: int, unpriced: bool = False) -> None:
        """Add one usage report, here and in every ancestor run."""
        ledger: RunLedger | None = self
        while ledger is not None:
            with ledger._lock:
                ledger.tokens += tokens
                ledger.cost_units += cost_units
                if unpriced:
                    ledger.unpriced_reports += 1
            ledger = ledger.parent

    def count_sub_agent(self) -> None:
        ledger: RunLedger | None = self
        while ledger is not None:
            with ledger._lock:
                ledger.sub_agents += 1
            ledger = ledger.parent

    def restore(self, tokens: int, cost_units: int, steps: int, unpriced_reports: int = 0) -> None:
        """Count at least what the run had spent at a checkpoint (never less: no budget back,
        and restoring twice, or into the run that took the checkpoint, counts nothing twice)."""
        with self._lock:
            self.tokens = max(self.tokens, tokens)
            self.cost_units = max(self.cost_units, cost_units)
            self.steps = max(self.steps, steps)
            self.unpriced_reports = max(self.unpriced_reports, unpriced_reports)

    @property
    def deadline(self) -> float:
        """The monotonic time at which the max_duration_seconds of this run or of a run that
        encloses it runs out, whichever comes first (infinity without one)."""
        return min(ledger._deadline for ledger in self.chain())


class Ledger(Protocol):
    """What the rest of multirun uses of a ledger; RunLedger and RedisLedger both provide it."""

    @property
    def run_id(self) -> str: ...
    @property
    def parent(self) -> Ledger | None: ...
    @property
    def budget(self) -> Budget | None: ...
    @property
    def tokens(self) -> int: ...
    @property
    def cost_units(self) -> int: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def steps(self) -> int: ...
    @property
    def sub_agents(self) -> int: ...
    @property
    def unpriced_reports(self) -> int: ...
    def begin_step(self, check: bool = True) -> None: ...
    def charge(self, tokens: int, cost_units: int, unpriced: bool = False) -> None: ...
    def count_sub_agent(self) -> None: ...
    def restore(self, tokens: int, cost_units: int, steps: int, unpriced_reports: int = 0) -> None: ...
    def totals(self) -> dict[str, int]: ...
    def set_budget(self, budget: Budget | None) -> None: ...
    def elapsed(self) -> float: ...
    def used_up(self) -> bool: ...
    def chain(self) -> Sequence[LedgerReadings]: ...
    def over_budget(self, *, next_step: bool = False) -> BudgetExceededError | None: ...
    def exceeded(self, budget: Budget, *, next_step: bool = False) -> tuple[str, float, float] | None: ...
    def status(self, budget: Budget | None) -> BudgetStatus: ...
    def shares(self, budget: Budget) -> dict[str, float]: ...
    @property
    def deadline(self) -> float: ...
