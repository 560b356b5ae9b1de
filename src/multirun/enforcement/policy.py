"""PolicyEngine: the decision before each step (proceed, wait, fall back, abort).

    engine = PolicyEngine(policy, shared_state, clock)
    decision = engine.before_step("ask", StepKind.LLM_CALL, "gpt-4o", ledger)
    ...  # run the step, honouring decision.wait_seconds and decision.model
    engine.after_step("ask", StepKind.LLM_CALL, None, decision)  # or the error it raised

The rules are written here rather than taken from a resilience library
(tenacity, pybreaker, aiolimiter) because each of those covers one rule, for
sync *or* async code, and none knows about the run: the rate limiter must not
wait past the run's deadline, the breaker must ignore budget aborts, the
degradation rule reads the run's budget, and every decision has to land on
the step's span. Each rule is a few lines of arithmetic under one lock.

State that protects a dependency (rate limits, circuits) is shared by every
run of the process through ``PolicyState``; state about one run (whether it
has degraded to its fallback model) lives in that run's engine.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from multirun.errors import (
    REFUSALS,
    PolicyViolation,
    leaf_errors,
)
from multirun.models.policy import (
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    Policy,
    PolicyDecision,
    RateLimitRule,
)
from multirun.models.step import StepKind

if TYPE_CHECKING:
    from multirun.enforcement.ledger import Ledger


class Decision(NamedTuple):
    """What the engine decided for one step (a tuple: one is made for most steps)."""

    decision: PolicyDecision
    rule: str | None = None
    wait_seconds: float = 0.0
    model: str | None = None  # the model an LLM step should use (set on fallback)
    ticket: int | None = None  # the circuit's epoch the step was let through in (CircuitBreaker)
    slot: Slot | None = None  # the rate-limit slot reserved for the step


PROCEED = Decision(PolicyDecision.PROCEED)
# what a step holds once it gave its decision back (``give_back``): it never ran, or ended with no
# answer from its dependency, so its outcome counts for nothing. Told apart by identity: it equals PROCEED
GIVEN_BACK = Decision(PolicyDecision.PROCEED)


def _says_nothing_of_the_dependency(error: BaseException) -> bool:
    """multirun's own refusals, and a caller that stopped waiting (a cancelled task, Ctrl-C, a
    generator closed early: not an ``Exception``), also when all of a group's errors are such."""
    return all(
        not isinstance(leaf, Exception) or isinstance(leaf, REFUSALS)  # multirun's own: not the dependency's
        for leaf in leaf_errors(error)
    )


class RateLimiter:
    """Paces requests evenly: one slot every ``60 / requests_per_minute`` seconds.

    A caller reserves the next free slot under the lock and is told how long
    to wait for it; the wait itself happens outside the lock (``time.sleep``
    or ``asyncio.sleep``, by the caller), so threads and tasks share one pace.
    A slot reserved for later (a retry's, after its backoff) leaves the slots
    before it free for the callers that come meanwhile. A slot given back
    before the last one reserved (calls cancelled together, the first first)
    is free again: the next caller that may start then has it.
    """

    def __init__(self, requests_per_minute: float) -> None:
        self.interval = 60.0 / requests_per_minute
        self._next_free = float("-inf")  # the end of the slots reserved one after the other
        self._ahead: list[float] = []  # the starts of slots reserved later than those, in order
        self._holes: list[float] = []  # the starts of slots given back before _next_free, in order
        self._lock = threading.Lock()

    def reserve(self, now: float, earliest: float, latest_start: float) -> tuple[float, Slot] | None:
        """Seconds from ``earliest`` until the first free slot that starts then or later, and
        the slot; None if it starts after ``latest_start``."""
        interval = self.interval
        with self._lock:
            if self._holes:
                hole = self._hole(now, earliest, latest_start)
                if hole is not None:
                    return hole - earliest, Slot(self, hole + interval, hole, hole)
            ahead = self._ahead
            if ahead:
                self._next_in_line(now)
            before = self._next_free
            start = max(earliest, before)
            for taken in ahead:
                if start + interval <= taken:
                    break
                start = max(start, taken + interval)
            if start >= latest_start:
                return None
            if start - max(now, before) >= interval:  # free slots are left before it: they stay free
                bisect.insort(ahead, start)
                return start - earliest, Slot(self, start + interval, start, start, True)
            end = self._next_free = start + interval
            if ahead:
                self._next_in_line(now)
        return start - earliest, Slot(self, end, before, start)

    def _hole(self, now: float, earliest: float, latest_start: float) -> float | None:
        """The start of the first slot given back that starts at ``earliest`` or later, and
        before ``latest_start``, taken (under the lock); those started already are dropped."""
        holes = self._holes
        del holes[: bisect.bisect_left(holes, now)]
        found = bisect.bisect_left(holes, earliest)
        if found < len(holes) and holes[found] < latest_start:
            return holes.pop(found)
        return None

    def _next_in_line(self, now: float) -> None:
        """The slots reserved later that no slot fits before any more join those reserved one
        after the other (under the lock)."""
        ahead, interval = self._ahead, self.interval
        while ahead and ahead[0] < max(now, self._next_free) + interval:
            self._next_free = max(self._next_free, ahead.pop(0) + interval)

    def give_back(self, slot: Slot) -> None:
        """``slot`` was not used (its step was refused, or cancelled while it waited): the next
        caller that may start then has it."""
        with self._lock:
            if slot.ahead and slot.start in self._ahead:  # else it joined those reserved in a row
                self._ahead.remove(slot.start)
                return
            holes = self._holes
            if self._next_free != slot.end:  # slots reserved after it are in use: a hole
                bisect.insort(holes, slot.start)
                return
            self._next_free = slot.before
            # the holes it ends the reserved slots with are free up to their start
            while holes and holes[-1] + self.interval == self._next_free:
                self._next_free = holes.pop()


class Slot(NamedTuple):
    """A slot reserved from ``limiter``: its end, and what its next free slot was before
    (a slot reserved ``ahead``, past the free ones, or taken from a hole: its own start)."""

    limiter: RateLimiter
    end: float
    before: float
    start: float
    ahead: bool = False


LATER = -1  # the ticket of a call that asks the circuit again when it starts (never current)


class CircuitBreaker:
    """Closed until ``failure_threshold`` failures in a row; then open (fail fast) for
    ``recovery_time_seconds``; then half-open, when exactly one probe goes through.
    The probe's success closes the circuit, its failure opens it again.

    A call let through gets a ticket: the circuit's epoch, which moves on each time the
    circuit opens, lets a probe through or closes. Only the outcome of a call whose ticket is
    current counts: a call from before the circuit opened, ending late, neither closes it nor
    opens it again, nor restarts its recovery time, nor gives back a probe it does not hold.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, rule: CircuitBreakerRule) -> None:
        self.rule = rule
        self.status = (self.CLOSED, 0)  # (state, epoch): one attribute, read whole without the lock
        # the decision of a step let through in the current epoch: shared, as most steps get it
        self.proceed = Decision(PolicyDecision.PROCEED, ticket=0)
        self.failures = 0
        self.opened_at = 0.0
        self.probe_in_flight = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return self.status[0]

    def allow(self, now: float, not_before: float = 0.0) -> int | None:
        """The ticket of a call that may start now (claiming the probe when half-open), or None.

        A call that starts ``not_before`` seconds from now (after a retry's backoff) is refused
        only if the circuit will still be open then; else it gets ``LATER``, and asks again
        when its wait is over.
        """
        state, epoch = self.status
        if state == self.CLOSED:  # the common case, without the lock
            return epoch
        if not_before > 0:
            recovered = now + not_before - self.opened_at >= self.rule.recovery_time_seconds
            return LATER if state != self.OPEN or recovered else None
        with self._lock:
            state, epoch = self.status
            if state == self.CLOSED:
                return epoch
            if state == self.OPEN and now - self.opened_at < self.rule.recovery_time_seconds:
                return None
            if self.probe_in_flight:
                return None
            self.probe_in_flight = True
            return self._move(self.HALF_OPEN)

    def record(self, ticket: int | None, ok: bool, now: float) -> None:
        """The outcome of the call let through with ``ticket``, if its ticket is current."""
        state, epoch = self.status
        if ticket != epoch or (ok and state == self.CLOSED and not self.failures):
            return  # a call from before the circuit last changed, or nothing to change
        with self._lock:
            state, epoch = self.status
            if ticket != epoch:
                return
            if state == self.HALF_OPEN:  # the probe's outcome
                self.probe_in_flight = False
                self.failures = 0 if ok else self.failures + 1
                if not ok:
                    self.opened_at = now
                self._move(self.CLOSED if ok else self.OPEN)
            elif ok:
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= self.rule.failure_threshold:
                    self.opened_at = now
                    self._move(self.OPEN)

    def release(self, ticket: int | None) -> None:
        """The call let through with ``ticket`` did not run, or its outcome says nothing of the
        dependency: if it holds the probe, another caller may probe."""
        if self.status != (self.HALF_OPEN, ticket):
            return
        with self._lock:
            if self.status == (self.HALF_OPEN, ticket):
                self.probe_in_flight = False

    def _move(self, state: str) -> int:
        """Go to ``state`` in a new epoch (under the lock): the tickets given out before are stale."""
        epoch = self.status[1] + 1
        self.proceed = Decision(PolicyDecision.PROCEED, ticket=epoch)
        self.status = (state, epoch)
        return epoch


def _circuit_open(name: str, breaker: CircuitBreaker) -> PolicyViolation:
    return PolicyViolation(
        "circuit_breaker",
        f"circuit of step {name!r} is open after {breaker.failures} failures; "
        + _when_tried_again(breaker.rule.recovery_time_seconds),
    )


def _when_tried_again(recovery: float) -> str:
    if math.isinf(recovery):
        return "it stays open: recovery_time_seconds is inf"
    return f"it is tried again {recovery:g}s after it opened"


MAX_BREAKERS = 4096  # circuits kept (per client, and per run) before the healthy ones are dropped

_Key = TypeVar("_Key")


def _pruned(breakers: dict[_Key, CircuitBreaker]) -> dict[_Key, CircuitBreaker]:
    """``breakers``, or past MAX_BREAKERS only those open or with counted failures.

    A closed circuit with no failure equals a new one; steps named per call
    (``step(name=f"tool:{x}")``) would otherwise keep one breaker each for good. (A call in
    flight when its breaker is dropped holds a ticket of the old one: its outcome is not counted.)
    """
    if len(breakers) < MAX_BREAKERS:
        return breakers
    return {key: b for key, b in breakers.items() if b.failures or b.state != CircuitBreaker.CLOSED}


class PolicyState:
    """Rate limiters and circuit breakers shared by all runs of one client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limiters: dict[tuple[float, str | None], RateLimiter] = {}
        self._breakers: dict[tuple[str, int, float], CircuitBreaker] = {}
        # counts the prunings: a run that kept a breaker the table has since dropped must look
        # it up again, or a circuit it opens would be seen by no other run
        self.generation = 0

    def limiter(self, rule: RateLimitRule) -> RateLimiter:
        key = (rule.requests_per_minute, rule.model)
        limiter = self._limiters.get(key)
        if limiter is None:
            with self._lock:
                limiter = self._limiters.setdefault(key, RateLimiter(rule.requests_per_minute))
        return limiter

    def breaker(self, step_name: str, rule: CircuitBreakerRule) -> CircuitBreaker:
        key = (step_name, rule.failure_threshold, rule.recovery_time_seconds)
        breaker = self._breakers.get(key)
        if breaker is None:
            with self._lock:
                kept = _pruned(self._breakers)
                if kept is not self._breakers:
                    self._breakers, self.generation = kept, self.generation + 1
                breaker = self._breakers.setdefault(key, CircuitBreaker(rule))
        return breaker


class PolicyEngine:
    """Applies one run's Policy before and after each of its steps."""

    def __init__(self, policy: Policy, state: PolicyState, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.state = state
        self.clock = clock
        self.degraded = False
        self._llm_failures_in_a_row = 0
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}  # this run's view of the shared breakers
        self._generation = state.generation  # of the shared table when the view was taken

    def before_step(
        self,
        name: str,
        kind: StepKind,
        model: str | None,
        ledger: Ledger,
        not_before: float = 0.0,
        within_budget: bool = True,
    ) -> Decision:
        """The decision for a step about to start, at the earliest ``not_before`` seconds from
        now (a retry's backoff); PolicyViolation when it must not run. A step not held to the
        budget (``within_budget=False``: ``check_budget=False``) may wait past the deadline."""
        policy = self.policy
        breaker_rule = policy.circuit_breaker
        breaker, ticket = None, None
        if breaker_rule is not None:
            breaker = self._breaker(name, breaker_rule)
            state, ticket = breaker.status
            if state != CircuitBreaker.CLOSED:  # the clock is read only then
                ticket = breaker.allow(self.clock(), not_before)
            if ticket is None:
                raise _circuit_open(name, breaker)
        if kind is not StepKind.LLM_CALL:
            if breaker is None:
                return PROCEED
            proceed = breaker.proceed
            return proceed if proceed.ticket == ticket else Decision(PolicyDecision.PROCEED, ticket=ticket)
        verdict, rule, wait, slot, fallback = PolicyDecision.PROCEED, None, 0.0, None, None
        try:
            if policy.graceful_degradation is not None:
                fallback = self._fallback(policy.graceful_degradation, ledger)
                if fallback is not None:
                    model = fallback
                    verdict, rule = PolicyDecision.FALLBACK, "graceful_degradation"
            limit = policy.rate_limit
            if limit is not None and (limit.model is None or limit.model == model):
                latest_start = ledger.deadline if within_budget else float("inf")
                wait, slot = self._rate_limit_slot(limit, latest_start, not_before)
                if wait > not_before:
                    verdict, rule = PolicyDecision.WAIT, "rate_limit"
                else:
                    wait = 0.0
        except BaseException:
            if breaker is not None:
                breaker.release(ticket)
            raise
        if verdict is PolicyDecision.PROCEED and ticket is None and slot is None:
            return PROCEED
        return Decision(verdict, rule, wait, fallback, ticket, slot)

    def resume(self, name: str, decision: Decision) -> Decision:
        """``decision`` once the step has waited (for its rate-limit slot, a retry's backoff) and
        is about to start: the circuit is asked again if it changed meanwhile (it opened, or
        became half-open). PolicyViolation when it must not start: the caller gives its slot
        back (``give_back``), as for a wait cancelled or interrupted."""
        rule = self.policy.circuit_breaker
        if rule is None:
            return decision
        breaker = self._breaker(name, rule)
        if breaker.status[1] == decision.ticket:
            return decision
        ticket = breaker.allow(self.clock())
        if ticket is None:
            raise _circuit_open(name, breaker)
        return decision._replace(ticket=ticket)

    def give_back(self, name: str, decision: Decision) -> None:
        """The step was refused (by the budget, say), could not start, or its wait was cut short
        (cancelled, interrupted, refused when it was over), after ``decision``: the circuit's
        probe and the rate-limit slot it holds are free again. Call it once per decision: a slot
        given back twice could free a later caller's."""
        slot = decision.slot
        if slot is not None:
            slot.limiter.give_back(slot)
        rule = self.policy.circuit_breaker
        if rule is not None:
            self._breaker(name, rule).release(decision.ticket)

    def abandoned(self, name: str, decision: Decision) -> None:
        """A step let through with ``decision`` was left unfinished (a step made by hand that its
        agent outlived): its outcome will not be told, so a probe it holds is free again. Its
        rate-limit slot was used: it is kept."""
        rule = self.policy.circuit_breaker
        if rule is not None:
            self._breaker(name, rule).release(decision.ticket)

    def after_success(self, name: str, kind: StepKind, decision: Decision) -> None:
        """A step let through with ``decision`` succeeded: the common case, with nothing to
        change when the circuit is healthy."""
        if self._generation != self.state.generation:
            self._forget_pruned()
        breaker = self._breakers.get(name)
        if breaker is None and decision.ticket is not None:
            # this run's view was dropped while the step ran (a pruning): its probe must still close
            rule = self.policy.circuit_breaker
            if rule is not None:
                breaker = self._breaker(name, rule)
        if breaker is not None and (breaker.failures or breaker.state != CircuitBreaker.CLOSED):
            breaker.record(decision.ticket, True, 0.0)
        if kind is StepKind.LLM_CALL and self._llm_failures_in_a_row:
            with self._lock:
                self._llm_failures_in_a_row = 0

    def after_step(self, name: str, kind: StepKind, error: BaseException | None, decision: Decision) -> None:
        """Feed the outcome of a step let through with ``decision`` to the circuit breaker and
        the degradation trigger."""
        if error is None:
            self.after_success(name, kind, decision)
            return
        if decision is GIVEN_BACK:  # a timeout that cut its wait for its slot short, say
            return
        rule = self.policy.circuit_breaker
        if _says_nothing_of_the_dependency(error):
            if rule is not None:  # not a failure of the dependency; a probe it claimed is free again
                self._breaker(name, rule).release(decision.ticket)
            return
        if rule is not None:
            breaker = self._breaker(name, rule)
            excluded = rule.excluded_errors
            # a group (asyncio.TaskGroup's) counts unless each of its errors is excluded, or is
            # multirun's own refusal or a cancellation
            if not all(
                isinstance(leaf, excluded) or _says_nothing_of_the_dependency(leaf)
                for leaf in leaf_errors(error)
            ):
                breaker.record(decision.ticket, False, self.clock())
            else:
                breaker.release(decision.ticket)
        if kind is StepKind.LLM_CALL and self.policy.graceful_degradation is not None:
            with self._lock:
                self._llm_failures_in_a_row += 1

    # -- rules ---------------------------------------------------------------

    def _breaker(self, name: str, rule: CircuitBreakerRule) -> CircuitBreaker:
        if self._generation != self.state.generation:
            self._forget_pruned()
        breaker = self._breakers.get(name)
        if breaker is None:
            self._breakers = _pruned(self._breakers)
            breaker = self._breakers[name] = self.state.breaker(name, rule)
        return breaker

    def _forget_pruned(self) -> None:
        """Drop this run's view of the shared breakers: some of them are no longer shared."""
        self._generation = self.state.generation
        self._breakers = {}

    def _rate_limit_slot(
        self, rule: RateLimitRule, latest_start: float, not_before: float
    ) -> tuple[float, Slot]:
        """The step's slot, which starts ``not_before`` seconds from now at the earliest, and
        before ``latest_start``; and the seconds from now until it starts."""
        now = self.clock()
        reserved = self.state.limiter(rule).reserve(now, now + not_before, latest_start)
        if reserved is None:
            raise PolicyViolation(
                "rate_limit",
                f"the next free slot at {rule.requests_per_minute:g} requests per minute "
                "starts after the run's max_duration_seconds",
            )
        wait, slot = reserved
        return not_before + wait, slot

    def _fallback(self, rule: GracefulDegradationRule, ledger: Ledger) -> str | None:
        """The fallback model once the trigger has fired; it stays fired for the run."""
        if not self.degraded and self._triggered(rule, ledger):
            with self._lock:
                self.degraded = True
        return rule.fallback_model if self.degraded else None

    def _triggered(self, rule: GracefulDegradationRule, ledger: Ledger) -> bool:
        """Whether the trigger has passed the threshold. A budget share is that of this run or
        of a run enclosing it, whichever is the most used: a sub-run spends its parents' budgets
        too, and must not call the primary model while they already use the fallback."""
        trigger = rule.trigger
        if trigger is DegradationTrigger.CONSECUTIVE_FAILURES:
            return self._llm_failures_in_a_row >= rule.threshold
        for readings in ledger.chain():
            budget = readings.budget
            if budget is None:
                continue
            shares = readings.shares(budget)
            if trigger is DegradationTrigger.COST_PERCENTAGE:
                share = shares.get("max_cost_usd")
            elif trigger is DegradationTrigger.TOKEN_PERCENTAGE:
                share = shares.get("max_tokens")
            else:
                share = max(shares.values(), default=None)
            if share is not None and 100.0 * share >= rule.threshold:
                return True
        return False
