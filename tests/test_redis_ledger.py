"""RedisLedger against a real redis-server: limits, exact totals across processes, failures."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis
from redis.connection import Connection

from multirun.enforcement.ledger import RunLedger
from multirun.enforcement.redis_ledger import (
    RETRY_SECONDS,
    LedgerUnavailableError,
    RedisLedger,
    RedisLedgerFactory,
    redact,
)
from multirun.errors import BudgetExceededError, ConfigurationError, MultiRunError
from multirun.models.budget import Budget
from multirun.pricing import COST_UNITS_PER_USD

if TYPE_CHECKING:
    from redis_server import RedisServer

pytest_plugins = ["redis_server"]  # the session fixture redis_server: a real redis-server

LOGGER = "multirun.enforcement.redis_ledger"


def new_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def factory(redis_server: RedisServer) -> Iterator[RedisLedgerFactory]:
    made = RedisLedgerFactory.from_uri(redis_server.url)
    yield made
    made.close()


@pytest.fixture
def two_processes(redis_server: RedisServer) -> Iterator[tuple[RedisLedgerFactory, RedisLedgerFactory]]:
    """The ledger factories of two processes sharing one Redis; closed at the end."""
    made = (RedisLedgerFactory.from_uri(redis_server.url), RedisLedgerFactory.from_uri(redis_server.url))
    yield made
    for factory in made:
        factory.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at and change the hashes behind the ledgers' backs."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def refusal(error: BudgetExceededError) -> tuple[str, float, float, str, str]:
    return error.limit, error.used, error.maximum, error.run_id, str(error)


# -- limits: the same errors as RunLedger ----------------------------------------


def scenario_tokens(ledger: Any) -> None:
    ledger.begin_step()
    ledger.charge(60, 0)
    ledger.begin_step()
    ledger.charge(40, 0)
    ledger.begin_step()


def scenario_cost(ledger: Any) -> None:
    for _ in range(3):
        ledger.begin_step()
        ledger.charge(1, COST_UNITS_PER_USD // 10)  # $0.10
    ledger.begin_step()


def scenario_steps(ledger: Any) -> None:
    for _ in range(4):
        ledger.begin_step()


def scenario_sub_agents(ledger: Any) -> None:
    ledger.begin_step()
    ledger.count_sub_agent()
    ledger.begin_step()
    ledger.count_sub_agent()
    ledger.begin_step()


@pytest.mark.parametrize(
    ("budget", "scenario", "limit"),
    [
        (Budget(max_tokens=100), scenario_tokens, "max_tokens"),
        (Budget(max_cost_usd=0.3), scenario_cost, "max_cost_usd"),
        (Budget(max_steps=3), scenario_steps, "max_steps"),
        (Budget(max_sub_agents=1), scenario_sub_agents, "max_sub_agents"),
        (Budget(max_sub_agents=0), scenario_sub_agents, "max_sub_agents"),
    ],
    ids=["tokens", "cost", "steps", "sub_agents", "no_sub_agents"],
)
def test_each_limit_stops_the_run_like_run_ledger(
    factory: RedisLedgerFactory, budget: Budget, scenario: Callable[[Any], None], limit: str
) -> None:
    run_id = new_id()
    local = RunLedger(budget=budget, run_id=run_id)
    with pytest.raises(BudgetExceededError) as expected:
        scenario(local)
    shared = factory.ledger(run_id, budget)
    with pytest.raises(BudgetExceededError) as got:
        scenario(shared)
    assert got.value.limit == limit
    assert refusal(got.value) == refusal(expected.value)
    assert (shared.tokens, shared.cost_units, shared.steps, shared.sub_agents) == (
        local.tokens,
        local.cost_units,
        local.steps,
        local.sub_agents,
    )
    assert shared.exceeded(budget) == local.exceeded(budget)
    assert shared.shares(budget) == local.shares(budget)


@pytest.mark.parametrize("limit", [0.067, 0.534, 1.1, 3.4575920550000916])
def test_spending_exactly_the_cost_limit_stops_the_next_step(
    factory: RedisLedgerFactory, limit: float
) -> None:
    # limit * 10**9 is not an integer in floating point for 0.067 and 0.534 (67000000.00000001);
    # the last is a sum of prices with float noise, a hair above the integer its cost rounds to
    budget = Budget(max_cost_usd=limit)
    for ledger in (RunLedger(budget=budget, run_id=new_id()), factory.ledger(new_id(), budget)):
        ledger.begin_step()
        ledger.charge(1, round(limit * COST_UNITS_PER_USD))
        assert ledger.exceeded(budget) is not None
        status = ledger.status(budget)
        assert (status.is_exceeded, status.percentage_used, status.cost_remaining_usd) == (True, 100, 0)
        assert ledger.used_up()
        with pytest.raises(BudgetExceededError) as got:
            ledger.begin_step()
        assert got.value.limit == "max_cost_usd"


def test_a_cost_limit_below_one_unit_lets_a_run_start_and_stops_it_once_it_spends(
    factory: RedisLedgerFactory,
) -> None:
    budget = Budget(max_cost_usd=1e-13)  # less than a unit: the first unit spent is over it
    for ledger in (RunLedger(budget=budget, run_id=new_id()), factory.ledger(new_id(), budget)):
        ledger.begin_step()
        assert not ledger.status(budget).is_exceeded
        ledger.charge(1, 1)
        assert ledger.status(budget).is_exceeded
        with pytest.raises(BudgetExceededError) as got:
            ledger.begin_step()
        assert got.value.limit == "max_cost_usd"


def test_check_false_counts_the_step_without_checking(factory: RedisLedgerFactory) -> None:
    ledger = factory.ledger(new_id(), Budget(max_steps=1))
    ledger.begin_step()
    ledger.begin_step(check=False)
    assert ledger.steps == 2
    with pytest.raises(BudgetExceededError):
        ledger.begin_step()


def test_duration_runs_out_on_the_server_clock(factory: RedisLedgerFactory) -> None:
    ledger = factory.ledger(new_id(), Budget(max_duration_seconds=0.3))
    ledger.begin_step()
    time.sleep(0.35)
    with pytest.raises(BudgetExceededError) as got:
        ledger.begin_step()
    assert got.value.limit == "max_duration_seconds"
    assert got.value.maximum == 0.3
    assert 0.3 <= got.value.used < 5
    assert ledger.steps == 1
    assert 0.3 <= ledger.elapsed() < 5


def test_duration_uses_the_stored_deadline(factory: RedisLedgerFactory, raw: redis.Redis) -> None:
    ledger = factory.ledger(new_id(), Budget(max_duration_seconds=3600))
    ledger.begin_step()
    started = int(raw.hget(ledger.key, "started_us") or 0)
    assert int(raw.hget(ledger.key, "deadline_us") or 0) == started + 3600 * 1_000_000
    raw.hset(ledger.key, "deadline_us", started + 1)  # as if the hour had passed
    with pytest.raises(BudgetExceededError) as got:
        ledger.begin_step()
    assert got.value.limit == "max_duration_seconds"
    assert got.value.maximum == 3600.0
    assert got.value.run_id == ledger.run_id


def test_status_and_elapsed(factory: RedisLedgerFactory, redis_server: RedisServer) -> None:
    budget = Budget(max_tokens=1000, max_cost_usd=2.0, max_steps=10)
    ledger = factory.ledger(new_id(), budget)
    elsewhere = RedisLedgerFactory.from_uri(redis_server.url)  # another process's client
    other = elsewhere.ledger(ledger.run_id)  # and its view of the same run
    other.begin_step()
    other.charge(250, COST_UNITS_PER_USD // 2)
    assert ledger.status(budget).tokens_used == 0  # the charge travels with other's next round trip
    other.flush()
    status = ledger.status(budget)  # fetches the totals from Redis
    assert status.tokens_used == 250
    assert status.tokens_remaining == 750
    assert status.cost_used_usd == 0.5
    assert status.cost_remaining_usd == 1.5
    assert status.steps_used == 1
    assert status.percentage_used == 25.0
    assert not status.is_exceeded
    assert ledger.shares(budget) == {"max_tokens": 0.25, "max_cost_usd": 0.25, "max_steps": 0.1}
    assert 0 <= ledger.elapsed() < 5
    assert ledger.deadline == float("inf")
    elsewhere.close()


# -- exact totals ------------------------------------------------------------------


def test_cost_is_an_exact_integer_sum(factory: RedisLedgerFactory, raw: redis.Redis) -> None:
    ledger = factory.ledger(new_id())
    for _ in range(10):
        ledger.charge(7, 100_000_000, unpriced=True)  # 10 x $0.1, which floats would not sum to 1.0
    assert ledger.cost_units == COST_UNITS_PER_USD
    assert ledger.cost_usd == 1.0
    assert ledger.tokens == 70
    assert ledger.unpriced_reports == 10
    assert raw.hget(ledger.key, "cost_units") is None  # counted here, not sent yet
    ledger.flush()
    assert raw.hget(ledger.key, "cost_units") == str(COST_UNITS_PER_USD)
    assert raw.hget(ledger.key, "unpriced") == "10"


def test_threads_in_one_process_lose_no_update(factory: RedisLedgerFactory) -> None:
    ledger = factory.ledger(new_id())

    def work() -> None:
        for _ in range(250):
            ledger.begin_step()
            ledger.charge(2, 3)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (ledger.steps, ledger.tokens, ledger.cost_units) == (1000, 2000, 3000)


PROCESSES = 8
STEPS_EACH = 500


@pytest.fixture(scope="module")
def processes() -> Iterator[Any]:
    """8 worker processes (spawned: each has its own interpreter, client and ledger)."""
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        yield pool


def steps_worker(url: str, run_id: str, steps: int) -> tuple[int, int, int]:
    """One process: begin_step + charge ``steps`` times, once all the workers are ready.

    Returns (pid, steps done, steps refused).
    """
    factory = RedisLedgerFactory.from_uri(url)
    ledger = factory.ledger(run_id)  # the budget, if any, comes from Redis
    ready = f"test:ready:{run_id}"
    factory.client.incr(ready)  # a barrier in Redis: start together
    deadline = time.monotonic() + 60
    while int(factory.client.get(ready) or 0) < PROCESSES and time.monotonic() < deadline:
        time.sleep(0.001)
    done = refused = 0
    for _ in range(steps):
        try:
            ledger.begin_step()
        except BudgetExceededError:
            refused += 1
            continue
        ledger.charge(3, 7)
        done += 1
    factory.close()  # sends the last step's charge
    return os.getpid(), done, refused


def race(pool: Any, url: str, run_id: str, steps: int) -> list[tuple[int, int]]:
    """Run one steps_worker in each of the 8 processes; their (done, refused) counts."""
    found = pool.starmap(steps_worker, [(url, run_id, steps)] * PROCESSES, chunksize=1)
    assert len({pid for pid, _, _ in found}) == PROCESSES  # all 8 ran at once
    return [(done, refused) for _, done, refused in found]


def test_eight_processes_count_exact_totals(
    factory: RedisLedgerFactory,
    raw: redis.Redis,
    processes: Any,
    redis_server: RedisServer,
) -> None:
    ledger = factory.ledger(new_id())
    found = race(processes, redis_server.url, ledger.run_id, STEPS_EACH)
    assert found == [(STEPS_EACH, 0)] * PROCESSES
    total = PROCESSES * STEPS_EACH
    assert raw.hmget(ledger.key, "steps", "tokens", "cost_units") == [
        str(total),
        str(3 * total),
        str(7 * total),
    ]
    ledger.refresh()
    assert (ledger.steps, ledger.tokens, ledger.cost_units) == (4000, 12000, 28000)


def test_racing_processes_never_overshoot_max_steps(
    factory: RedisLedgerFactory,
    raw: redis.Redis,
    processes: Any,
    redis_server: RedisServer,
) -> None:
    ledger = factory.ledger(new_id(), Budget(max_steps=1000))
    found = race(processes, redis_server.url, ledger.run_id, STEPS_EACH)  # 4000 tries for 1000 steps
    assert sum(done for done, _ in found) == 1000
    assert sum(refused for _, refused in found) == PROCESSES * STEPS_EACH - 1000
    assert raw.hget(ledger.key, "steps") == "1000"
    assert raw.hget(ledger.key, "tokens") == "3000"
    with pytest.raises(BudgetExceededError) as got:
        ledger.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_steps", 1000, 1000)


@pytest.mark.parametrize(
    "budget",
    [Budget(max_tokens=3 * 1000), Budget(max_cost_usd=7 * 1000 / COST_UNITS_PER_USD)],
    ids=["max_tokens", "max_cost_usd"],
)
def test_processes_spending_against_one_limit_leave_exact_totals_and_bounded_overshoot(
    factory: RedisLedgerFactory,
    raw: redis.Redis,
    processes: Any,
    redis_server: RedisServer,
    budget: Budget,
) -> None:
    ledger = factory.ledger(new_id(), budget)
    found = race(processes, redis_server.url, ledger.run_id, STEPS_EACH)  # 3 tokens, 7 units a step
    done = sum(done for done, _ in found)
    # the 1000th step's charge reaches the limit; past it only the steps in flight then ran, at
    # most one in each other process (its charge goes with its next step)
    assert 1000 <= done <= 1000 + PROCESSES - 1
    assert sum(refused for _, refused in found) == PROCESSES * STEPS_EACH - done
    assert raw.hmget(ledger.key, "steps", "tokens", "cost_units") == [str(done), str(3 * done), str(7 * done)]
    with pytest.raises(BudgetExceededError) as got:
        ledger.begin_step()
    assert got.value.limit == next(iter(budget.limits()))


# -- one budget for every process, ancestors ------------------------------------------


def test_the_first_creation_sets_the_limits_for_every_process(
    factory: RedisLedgerFactory, raw: redis.Redis
) -> None:
    run_id = new_id()
    first = factory.ledger(run_id, Budget(max_steps=2, max_cost_usd=0.25))
    second = factory.ledger(run_id, Budget(max_steps=100))  # too late: adopts the stored budget
    joiner = factory.ledger(run_id)  # no budget of its own
    assert second.budget == joiner.budget == Budget(max_steps=2, max_cost_usd=0.25)
    assert raw.hget(first.key, "max_cost_units") == str(COST_UNITS_PER_USD // 4)
    first.begin_step()
    second.begin_step()
    with pytest.raises(BudgetExceededError):
        joiner.begin_step()
    joiner.set_budget(Budget(max_steps=3))  # an explicit change applies everywhere
    first.begin_step()
    with pytest.raises(BudgetExceededError) as got:
        second.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_steps", 3, 3)
    assert raw.hget(first.key, "max_cost_units") is None


def test_sub_run_rolls_up_and_the_parents_limit_stops_it(
    factory: RedisLedgerFactory, raw: redis.Redis
) -> None:
    root = factory.ledger(new_id(), Budget(max_tokens=100))
    parent = factory.ledger(new_id(), Budget(max_steps=50), ancestor_ids=[root.run_id])
    child = factory.ledger(new_id(), ancestor_ids=[parent.run_id, root.run_id])
    child.begin_step()
    child.charge(60, 5)
    child.count_sub_agent()
    for key in (child.key, parent.key, root.key):
        assert raw.hmget(key, "steps", "tokens", "cost_units", "sub_agents") == ["1", "60", "5", "1"]
    # the reply carried every key's totals: the ancestors' ledgers in this process are up to date
    assert (parent.steps, parent.tokens, root.tokens, root.sub_agents) == (1, 60, 60, 1)
    parent.begin_step()
    parent.charge(40, 0)
    with pytest.raises(BudgetExceededError) as got:
        child.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_tokens", 100, 100)
    assert got.value.run_id == root.run_id
    assert raw.hget(child.key, "steps") == "1"  # a refused step counts nowhere
    assert raw.hget(root.key, "steps") == "2"


def test_factory_new_ledger_takes_the_ancestors_from_the_parent(factory: RedisLedgerFactory) -> None:
    placeholder = factory.new_ledger(None)
    assert isinstance(placeholder, RunLedger)
    root = factory.new_ledger(None, Budget(max_steps=1), run_id=new_id())
    child = factory.new_ledger(root, run_id=new_id())
    grandchild = factory.new_ledger(child, run_id=new_id())
    assert isinstance(grandchild, RedisLedger)
    assert grandchild.ancestor_ids == (child.run_id, root.run_id)
    assert grandchild.parent is None
    grandchild.begin_step()
    with pytest.raises(BudgetExceededError) as got:
        child.begin_step()
    assert got.value.run_id == root.run_id


def test_keys_expire_and_writes_refresh_the_expiry(redis_server: RedisServer, raw: redis.Redis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    parent = RedisLedger(client, new_id(), key_prefix="test:ttl:", ttl_seconds=60)
    child = RedisLedger(
        client, new_id(), ancestor_ids=[parent.run_id], key_prefix="test:ttl:", ttl_seconds=60
    )
    raw.pexpire(parent.key, 1000)
    child.begin_step()
    for key in (child.key, parent.key):
        assert 59_000 < raw.pttl(key) <= 60_000
    client.close()


def test_hashes_written_by_a_refused_step_expire(redis_server: RedisServer, raw: redis.Redis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    parent = RedisLedger(client, new_id(), Budget(max_steps=10), key_prefix="test:ttl:", ttl_seconds=60)
    child = RedisLedger(
        client,
        new_id(),
        Budget(max_tokens=5),
        ancestor_ids=[parent.run_id],
        key_prefix="test:ttl:",
        ttl_seconds=60,
    )
    child.begin_step()
    raw.delete(parent.key)  # the server lost it: the next step writes it again
    child.charge(5, 0)
    with pytest.raises(BudgetExceededError):
        child.begin_step()  # refused by the child's limit, after re-creating the parent's hash
    assert raw.hget(parent.key, "tokens") == "5"
    for key in (child.key, parent.key):
        assert 59_000 < raw.pttl(key) <= 60_000, key
    client.close()


def test_a_lost_hash_is_created_again_with_its_limits_and_totals(
    factory: RedisLedgerFactory, raw: redis.Redis
) -> None:
    parent = factory.ledger(new_id(), Budget(max_tokens=1000, max_duration_seconds=3600))
    child = factory.ledger(new_id(), Budget(max_steps=4), ancestor_ids=[parent.run_id])
    child.begin_step()
    child.charge(900, 0)
    child.begin_step()  # the run is at 900 of its 1000 tokens
    started = raw.hget(parent.key, "started_us")
    raw.delete(parent.key, child.key)  # a restart without persistence, FLUSHALL, eviction, expiry
    child.charge(50, 0)
    child.begin_step()  # re-creates both hashes from what this process knew of them
    kept = raw.hmget(parent.key, "tokens", "steps", "max_tokens", "started_us")
    assert kept == ["950", "3", "1000", started]
    assert raw.hmget(child.key, "tokens", "steps", "max_steps") == ["950", "3", "4"]
    child.charge(50, 0)
    with pytest.raises(BudgetExceededError) as got:  # not another 1000 tokens
        child.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_tokens", 1000, 1000)
    assert got.value.run_id == parent.run_id


def test_processes_that_lost_a_runs_hash_start_it_again_from_what_they_saw_counting_nothing_twice(
    two_processes: tuple[RedisLedgerFactory, RedisLedgerFactory], raw: redis.Redis
) -> None:
    here, there = two_processes
    mine = here.ledger(new_id(), Budget(max_tokens=10_000))
    theirs = there.ledger(mine.run_id)
    mine.begin_step()
    mine.charge(300, 0)
    mine.begin_step()
    theirs.begin_step()
    theirs.charge(200, 0)
    theirs.begin_step()
    mine.refresh()  # both have seen 500 tokens and 4 steps; 300 of them are mine, 200 theirs
    raw.delete(mine.key)
    theirs.charge(20, 0)
    theirs.begin_step()  # re-creates the hash from the 500 it saw, then adds its 20
    mine.charge(10, 0)
    mine.begin_step()  # not its 300 again: only the 10 it charged since
    assert raw.hmget(mine.key, "tokens", "steps", "max_tokens") == ["530", "6", "10000"]


def test_what_processes_count_after_a_runs_hash_is_lost_is_kept_when_another_re_creates_it(
    two_processes: tuple[RedisLedgerFactory, RedisLedgerFactory], raw: redis.Redis
) -> None:
    owner, worker = two_processes
    root = owner.ledger(new_id(), Budget(max_tokens=10_000))
    root.begin_step()
    root.charge(900, 0)
    root.begin_step()  # the owner has seen 900 tokens and 2 steps, then waits for its workers
    raw.delete(root.key)  # a restart without persistence
    task = worker.ledger(root.run_id, adopt=True)  # a worker takes a task of the run after the loss
    for _ in range(3):
        task.begin_step()
        task.charge(200, 0)
    task.refresh()
    root.refresh()  # the owner reads the new totals (600 tokens, 3 steps) before it counts again
    root.charge(10, 0)
    root.begin_step()  # re-creates what the owner saw before the loss, under the worker's counts
    assert raw.hmget(root.key, "tokens", "steps") == ["1510", "6"]
    task.charge(1, 0)
    task.begin_step()  # the worker had counted only into the new hash: it adds its token, no more
    assert raw.hmget(root.key, "tokens", "steps") == ["1511", "7"]


def test_restore_counts_an_earlier_attempt_once(factory: RedisLedgerFactory, raw: redis.Redis) -> None:
    run_id = new_id()
    first, second = factory.ledger(run_id), factory.ledger(run_id)
    first.restore(100, 2_000, 3, 1)
    second.restore(100, 2_000, 3, 1)  # another process resuming the same run
    assert (second.tokens, second.cost_units, second.steps, second.unpriced_reports) == (100, 2_000, 3, 1)
    second.begin_step()
    first.restore(100, 2_000, 3, 1)  # the hash already holds more: nothing changes
    assert raw.hmget(first.key, "tokens", "cost_units", "steps", "unpriced") == ["100", "2000", "4", "1"]


def test_ledgers_that_come_and_go_in_a_process_count_all_it_spends_in_the_run_above(
    two_processes: tuple[RedisLedgerFactory, RedisLedgerFactory], raw: redis.Redis
) -> None:
    owner, worker = two_processes
    root = owner.ledger(new_id())
    for n in range(3):  # the worker runs the root's sub-runs one after another
        sub = worker.ledger(new_id(), ancestor_ids=[root.run_id])
        sub.begin_step()
        sub.charge(100, 0)
        if n < 2:
            sub.flush()
        del sub  # the last one's charge was never sent (its flush failed, say)
        gc.collect()
    worker.ledger(new_id(), ancestor_ids=[root.run_id]).begin_step()  # and goes with this step
    assert raw.hmget(root.key, "tokens", "steps") == ["300", "4"]


def test_close_sends_what_the_ledger_of_a_run_that_ended_had_not_sent(
    two_processes: tuple[RedisLedgerFactory, RedisLedgerFactory], raw: redis.Redis
) -> None:
    owner, worker = two_processes
    root = owner.ledger(new_id())
    sub = worker.ledger(new_id(), ancestor_ids=[root.run_id])
    sub.begin_step()
    sub.charge(100, 0)  # its run ends without sending it (its last refresh failed, say)
    sub_key = sub.key
    del sub
    gc.collect()
    worker.close()  # the worker shuts down
    assert raw.hmget(root.key, "tokens", "steps") == ["100", "1"]
    assert raw.hget(sub_key, "tokens") == "100"


def test_a_client_that_decodes_responses_works(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    ledger = RedisLedger(client, new_id(), Budget(max_cost_usd=0.5))
    ledger.begin_step()
    ledger.charge(1, COST_UNITS_PER_USD // 2)
    with pytest.raises(BudgetExceededError) as got:
        ledger.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_cost_usd", 0.5, 0.5)
    client.close()


# -- one round trip per step, scripts ---------------------------------------------------


class CountingConnection(Connection):
    """Counts what goes over the socket: writes (packed commands) and the command names."""

    writes = 0
    commands: list[str] = []

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        CountingConnection.commands.append(str(args[0]))
        super().send_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def test_a_step_that_spends_is_one_round_trip(redis_server: RedisServer, raw: redis.Redis) -> None:
    pool = redis.ConnectionPool(connection_class=CountingConnection, host="127.0.0.1", port=redis_server.port)
    client = redis.Redis(connection_pool=pool)
    root = RedisLedger(client, new_id(), Budget(max_steps=100))
    ledger = RedisLedger(client, new_id(), Budget(max_tokens=10_000), ancestor_ids=[root.run_id])
    ledger.begin_step()  # the connection is set up and the scripts loaded by now
    CountingConnection.writes, CountingConnection.commands = 0, []
    raw.config_resetstat()
    for _ in range(20):
        ledger.begin_step()  # also sends the previous step's charge
        ledger.charge(10, 10)
    assert CountingConnection.writes == 20
    assert CountingConnection.commands == ["EVALSHA"] * 20
    stats = raw.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 20
    assert "cmdstat_script|load" not in stats
    assert ledger.steps == 21
    assert root.steps == 21  # refreshed from the same replies
    assert (ledger.tokens, root.tokens) == (200, 200)  # counted here at once
    assert raw.hget(root.key, "tokens") == "190"  # the last charge is still pending
    ledger.refresh()  # as the run's end does
    assert raw.hget(root.key, "tokens") == raw.hget(ledger.key, "tokens") == "200"
    client.close()


def test_scripts_are_loaded_again_after_script_flush(factory: RedisLedgerFactory, raw: redis.Redis) -> None:
    ledger = factory.ledger(new_id(), Budget(max_steps=3))
    ledger.begin_step()
    raw.script_flush()
    ledger.begin_step()  # NOSCRIPT: loads the scripts and runs this one again
    ledger.charge(5, 5)
    assert (ledger.steps, ledger.tokens) == (2, 5)
    assert raw.hget(ledger.key, "steps") == "2"
    ledger.begin_step()
    with pytest.raises(BudgetExceededError):
        ledger.begin_step()


# -- Redis unavailable ------------------------------------------------------------------


def test_fails_closed_when_the_server_stops_mid_run(fresh_redis_server: RedisServer) -> None:
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url)
    ledger = factory.ledger(new_id(), Budget(max_steps=100))
    ledger.begin_step()
    fresh_redis_server.down()
    started = time.monotonic()
    with pytest.raises(LedgerUnavailableError) as got:
        ledger.begin_step()
    assert time.monotonic() - started < 1.0
    assert isinstance(got.value, MultiRunError)
    assert fresh_redis_server.url in str(got.value)
    assert "fail_open" in str(got.value)
    assert isinstance(got.value.__cause__, redis.ConnectionError)
    ledger.charge(1, 1)  # counted here; it would have gone with the next step
    with pytest.raises(LedgerUnavailableError):  # and the next attempt, on a fresh connection
        ledger.begin_step()
    assert ledger.steps == 1
    with pytest.raises(LedgerUnavailableError):
        ledger.refresh()
    fresh_redis_server.up()  # a server that lost every key
    ledger.begin_step()
    ledger.refresh()
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    assert raw.hmget(ledger.key, "steps", "tokens", "cost_units", "max_steps") == ["2", "1", "1", "100"]
    raw.close()
    factory.close()


def test_a_budget_that_could_not_be_set_failing_closed_is_left_as_it_was(
    fresh_redis_server: RedisServer,
) -> None:
    # the error said the budget was not set, yet the ledger held the run to the new one where it
    # checked alone (status, retries' deadline) and re-created the run's hash with it
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url)
    ledger = factory.ledger(new_id(), Budget(max_steps=2))
    ledger.begin_step()
    fresh_redis_server.down()
    with pytest.raises(LedgerUnavailableError) as got:
        ledger.set_budget(Budget(max_steps=100))
    assert f"run {ledger.run_id!r} could not set its budget" in str(got.value)
    assert ledger.budget == Budget(max_steps=2)
    fresh_redis_server.up()  # a server that lost every key: the run is made again as it was
    ledger.begin_step()
    with pytest.raises(BudgetExceededError):
        ledger.begin_step()
    factory.close()


def test_a_budget_whose_command_timed_out_and_ran_later_is_taken_back(
    fresh_redis_server: RedisServer,
) -> None:
    # the caller was told the budget was not set, yet Redis set it once it answered again:
    # every process went on enforcing a budget nobody had set
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?timeout=0.3")
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    ledger = factory.ledger(new_id(), Budget(max_steps=2))
    ledger.begin_step()
    fresh_redis_server.freeze()
    try:
        with pytest.raises(LedgerUnavailableError):
            ledger.set_budget(Budget(max_steps=100))  # sent, then timed out
    finally:
        fresh_redis_server.thaw()
    deadline = time.monotonic() + 10
    while raw.hget(ledger.key, "max_steps") != "100" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.hget(ledger.key, "max_steps") == "100"  # the late command ran
    ledger.begin_step()
    with pytest.raises(BudgetExceededError):
        ledger.begin_step()
    assert raw.hget(ledger.key, "max_steps") == "2"
    assert ledger.budget == Budget(max_steps=2)
    raw.close()
    factory.close()


def test_usage_sent_by_a_command_that_timed_out_and_ran_later_is_counted_once(
    fresh_redis_server: RedisServer,
) -> None:
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?timeout=0.3")
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    ledger = factory.ledger(new_id())
    ledger.begin_step()
    ledger.charge(100, 1_000)
    fresh_redis_server.freeze()
    try:
        with pytest.raises(LedgerUnavailableError):
            ledger.begin_step()  # sent, then timed out: the server runs it once it wakes
    finally:
        fresh_redis_server.thaw()
    deadline = time.monotonic() + 10
    while raw.hget(ledger.key, "tokens") != "100" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.hget(ledger.key, "tokens") == "100"  # the late command carried the charge
    ledger.begin_step()  # carries it again: the hash already holds it
    ledger.refresh()
    assert raw.hmget(ledger.key, "tokens", "cost_units") == ["100", "1000"]
    # its step was counted too, though it never ran (a step counted, never one lost)
    assert raw.hget(ledger.key, "steps") == "3"
    raw.close()
    factory.close()


EXACT = 2**53 - 1  # the largest total the ledger's scripts (Lua numbers: doubles) count exactly


@pytest.mark.parametrize("fail_open", [False, True])
@pytest.mark.parametrize(("tokens", "cost_units"), [(EXACT - 5, 0), (0, EXACT - 5), (2**64, 0)])
def test_totals_past_what_the_ledger_counts_exactly_refuse_the_next_step_and_no_total_is_rounded(
    redis_server: RedisServer,
    raw: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    fail_open: bool,
    tokens: int,
    cost_units: int,
) -> None:
    factory = RedisLedgerFactory.from_uri(f"{redis_server.url}?fail_open={fail_open}")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    ledger = factory.ledger(new_id())  # no budget at all
    ledger.begin_step()
    ledger.charge(tokens, cost_units)  # 2**64: Redis refused the script (overflow), "unavailable"
    ledger.charge(11, 11)  # past 2**53: a sum the scripts rounded
    with pytest.raises(BudgetExceededError) as refused:
        ledger.begin_step()
    assert refused.value.limit == ("max_cost_usd" if cost_units else "max_tokens")
    stored = raw.hmget(ledger.key, "tokens", "cost_units")
    assert [int(v) for v in stored] == [min(tokens + 11, EXACT), min(cost_units + 11, EXACT)]
    assert not caplog.records  # Redis was never taken for unavailable
    factory.close()


FORK_PROGRAM = """
import os, sys
from multirun.enforcement.redis_ledger import RedisLedgerFactory

ledger = RedisLedgerFactory.from_uri(sys.argv[1]).ledger(sys.argv[2])
ledger.begin_step()
ledger.charge(10, 0)  # not sent yet when the process forks
pid = os.fork()
if pid == 0:
    ledger.charge(5, 0)
    ledger.begin_step()
    os._exit(0)
os.waitpid(pid, 0)
ledger.flush()
"""


def test_a_forked_child_sends_only_what_it_charged(redis_server: RedisServer, raw: redis.Redis) -> None:
    run_id = new_id()
    subprocess.run([sys.executable, "-c", FORK_PROGRAM, redis_server.url, run_id], check=True, timeout=60)
    key = RedisLedgerFactory.from_uri(redis_server.url).key_prefix + run_id
    assert raw.hmget(key, "tokens", "steps") == ["15", "2"]


FORK_WHILE_CHARGING = """
import os, signal, sys, threading
from multirun.enforcement.redis_ledger import RedisLedgerFactory

factory = RedisLedgerFactory.from_uri(sys.argv[1])
parent = factory.ledger(sys.argv[2], ancestor_ids=[sys.argv[3]])  # sys.argv[3]: another process's run
ledger = factory.ledger(sys.argv[4], ancestor_ids=[sys.argv[2], sys.argv[3]])
ledger.begin_step()
# another thread is charging the run at the moment of the fork: it holds the ledgers' locks
locks = [ledger._lock, parent._lock, *(enclosing._lock for enclosing in ledger._enclosing)]
held, release = threading.Event(), threading.Event()

def charging():
    for lock in locks:
        lock.acquire()
    held.set()
    release.wait()
    for lock in locks:
        lock.release()

threading.Thread(target=charging, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a child that hangs must not outlive the test
    ledger.charge(5, 0)
    ledger.begin_step()
    os._exit(0)
release.set()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def test_a_child_forked_while_a_thread_charges_the_run_goes_on_counting(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    ids = [new_id() for _ in range(3)]
    program = [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_WHILE_CHARGING]
    done = subprocess.run(
        [*program, redis_server.url, *ids],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{done.returncode} (242: the child hung, SIGALRM) {done.stderr}"
    prefix = RedisLedgerFactory.from_uri(redis_server.url).key_prefix
    for run_id in ids:
        assert raw.hmget(prefix + run_id, "tokens", "steps") == ["5", "2"], run_id


def test_fails_closed_within_the_timeout_when_the_server_hangs(fresh_redis_server: RedisServer) -> None:
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?timeout=1")
    ledger = factory.ledger(new_id())
    ledger.begin_step()
    fresh_redis_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(LedgerUnavailableError) as got:
            ledger.begin_step()
        waited = time.monotonic() - started
    finally:
        fresh_redis_server.thaw()
    # the given timeout (not the default 0.5 s), and not a hang; the upper bound leaves a loaded
    # machine room: it is no speed check
    assert 0.9 < waited < 5
    assert isinstance(got.value.__cause__, redis.TimeoutError)
    ledger.begin_step()  # the server answers again: so does the ledger, on a new connection
    # the step that timed out may still have run once the server woke (never lost, at worst counted)
    assert ledger.steps in (2, 3)
    factory.close()


def test_creating_a_ledger_without_a_server_fails_closed(fresh_redis_server: RedisServer) -> None:
    fresh_redis_server.stop()  # nothing listens on its port now
    with pytest.raises(LedgerUnavailableError, match=fresh_redis_server.url):
        RedisLedgerFactory.from_uri(fresh_redis_server.url).ledger(new_id())


def test_fail_open_warns_once_and_counts_locally(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true")
    parent = factory.ledger(new_id(), Budget(max_tokens=1_000))
    ledger = factory.ledger(new_id(), Budget(max_steps=10), ancestor_ids=[parent.run_id])
    for _ in range(3):
        ledger.begin_step()
        ledger.charge(10, 10)
    fresh_redis_server.stop()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    started = time.monotonic()
    for _ in range(7):
        ledger.begin_step()
        ledger.charge(10, 10)
    assert time.monotonic() - started < 1.0
    with pytest.raises(BudgetExceededError) as got:  # the local count still enforces the budget
        ledger.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_steps", 10, 10)
    assert (ledger.steps, ledger.tokens, ledger.cost_units) == (10, 100, 100)
    assert (parent.steps, parent.tokens) == (10, 100)  # ancestors in this process count too
    late = factory.ledger(new_id())  # created while Redis is down
    late.begin_step()
    late.status(None)
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert fresh_redis_server.url in warnings[0].getMessage()
    assert "failing open" in warnings[0].getMessage()


@pytest.mark.parametrize("credentials", [":wrong@", ""], ids=["wrong-password", "no-password"])
def test_a_server_that_refuses_the_credentials_is_named_so_not_an_outage(
    fresh_redis_server: RedisServer, credentials: str
) -> None:
    raw = redis.Redis.from_url(fresh_redis_server.url)
    raw.config_set("requirepass", "right")
    url = fresh_redis_server.url.replace("redis://", f"redis://{credentials}")
    factory = RedisLedgerFactory.from_uri(url)
    with pytest.raises(LedgerUnavailableError) as got:
        factory.ledger(new_id(), Budget(max_steps=3))
    message = str(got.value)
    assert "refused the credentials" in message
    assert "Check the user name and password in the ledger URL" in message
    assert "fail_open" not in message  # failing open would hide a wrong password, not mend it
    assert "wrong" not in message
    assert isinstance(got.value.__cause__, redis.AuthenticationError)
    factory.close()
    raw.close()


def test_a_user_without_the_ledger_s_commands_is_named_so(fresh_redis_server: RedisServer) -> None:
    raw = redis.Redis.from_url(fresh_redis_server.url)
    raw.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read")
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url.replace("redis://", "redis://reader:pw@"))
    with pytest.raises(LedgerUnavailableError) as got:
        factory.ledger(new_id(), Budget(max_steps=3))
    assert "refused the credentials or lacks a permission" in str(got.value)
    assert "EVALSHA" in str(got.value)
    factory.close()
    raw.close()


def test_fail_open_with_a_refused_password_warns_that_it_was_refused(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    raw = redis.Redis.from_url(fresh_redis_server.url)
    raw.config_set("requirepass", "right")
    url = fresh_redis_server.url.replace("redis://", "redis://:wrong@") + "?fail_open=true"
    factory = RedisLedgerFactory.from_uri(url)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    ledger = factory.ledger(new_id(), Budget(max_steps=3))
    ledger.begin_step()
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert "refused the credentials" in warnings[0]
    assert "Check the user name and password in the ledger URL" in warnings[0]
    assert "failing open" in warnings[0]
    factory.close()
    raw.close()


class Clock:
    """A clock that moves only when told to: the fail-open back-off runs on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fail_open_shares_again_once_redis_answers(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true&timeout=1", clock=clock)
    elsewhere = RedisLedgerFactory.from_uri(fresh_redis_server.url)  # another process
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    ledger = factory.ledger(new_id(), Budget(max_steps=100))
    for _ in range(2):
        ledger.begin_step()
        ledger.charge(10, 10)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    fresh_redis_server.freeze()
    try:
        ledger.refresh()  # times out: fails open (the server runs the command once it wakes)
        started = time.monotonic()
        for _ in range(3):
            ledger.begin_step()  # counted here, without waiting for Redis
            ledger.charge(10, 10)
        waited = time.monotonic() - started
    finally:
        fresh_redis_server.thaw()
    assert waited < 1  # waiting for the frozen server even once would take the whole 1 s timeout
    deadline = time.monotonic() + 10
    while raw.hget(ledger.key, "tokens") != "20" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.hmget(ledger.key, "steps", "tokens") == ["2", "20"]  # the late refresh ran
    clock.now += RETRY_SECONDS - 0.1
    ledger.begin_step()  # Redis is back, but the ledger does not try it before its back-off is over
    assert raw.hget(ledger.key, "steps") == "2"
    clock.now += 0.1
    ledger.begin_step()  # tries Redis: it answers, and gets what was counted here meanwhile
    assert raw.hmget(ledger.key, "steps", "tokens", "cost_units") == ["7", "50", "50"]
    other = elsewhere.ledger(ledger.run_id, adopt=True)
    other.begin_step()  # the processes share the run again
    ledger.begin_step()
    assert (ledger.steps, other.steps) == (9, 8)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2
    assert "failing open" in messages[0]
    assert "answers again" in messages[1]
    raw.close()
    elsewhere.close()
    factory.close()


def test_fail_open_creates_the_runs_made_during_an_outage_once_redis_answers(
    fresh_redis_server: RedisServer,
) -> None:
    clock = Clock()
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true", clock=clock)
    parent = factory.ledger(new_id(), Budget(max_tokens=1000))
    parent.begin_step()
    parent.charge(100, 0)
    fresh_redis_server.down()
    child = factory.ledger(new_id(), Budget(max_steps=5), ancestor_ids=[parent.run_id])
    worker = factory.ledger(new_id(), adopt=True)  # continues a run started in another process
    for _ in range(2):
        child.begin_step()
        child.charge(50, 0)
    worker.begin_step()
    fresh_redis_server.up()  # a server that lost every key
    owner = RedisLedgerFactory.from_uri(fresh_redis_server.url)  # the process that started it
    owner.ledger(worker.run_id, Budget(max_steps=3)).begin_step()
    clock.now += RETRY_SECONDS
    child.begin_step()  # Redis answers: every ledger of this client sends what it counted
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    assert raw.hmget(child.key, "steps", "tokens", "max_steps") == ["3", "100", "5"]
    assert raw.hmget(parent.key, "steps", "tokens", "max_tokens") == ["4", "200", "1000"]
    assert raw.hget(worker.key, "steps") == "2"
    assert worker.budget == Budget(max_steps=3)  # read once it could join the run
    child.begin_step()
    child.begin_step()
    with pytest.raises(BudgetExceededError) as got:
        child.begin_step()
    assert (got.value.limit, got.value.used, got.value.maximum) == ("max_steps", 5, 5)
    raw.close()
    owner.close()
    factory.close()


def test_a_run_made_during_an_outage_is_held_to_its_duration_from_when_it_was_made(
    fresh_redis_server: RedisServer,
) -> None:
    clock = Clock()
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true", clock=clock)
    parent_budget, child_budget = Budget(max_duration_seconds=60), Budget(max_duration_seconds=30)
    factory.ledger(new_id()).begin_step()
    fresh_redis_server.down()
    parent = factory.ledger(new_id(), parent_budget)  # both made while Redis cannot be reached
    child = factory.ledger(new_id(), child_budget, ancestor_ids=[parent.run_id])
    child.begin_step()
    clock.now += 40  # 40 s of the outage later, Redis answers again
    fresh_redis_server.up()
    with pytest.raises(BudgetExceededError) as got:  # not 30 s more from when Redis answered
        child.begin_step()
    assert (got.value.limit, got.value.maximum) == ("max_duration_seconds", 30)
    assert (got.value.run_id, 40 <= got.value.used < 45) == (child.run_id, True)
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    started = {ledger.run_id: int(raw.hget(ledger.key, "started_us") or 0) for ledger in (parent, child)}
    seconds, micros = raw.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    for ledger in (parent, child):  # the parent made during the outage too
        assert 40 <= (now_us - started[ledger.run_id]) / 1_000_000 < 45, ledger.run_id
        assert 40 <= ledger.elapsed() < 45
    raw.close()
    factory.close()


def test_fail_open_sends_what_a_run_ended_during_the_outage_counted_once_redis_answers(
    fresh_redis_server: RedisServer,
) -> None:
    clock = Clock()
    owner = RedisLedgerFactory.from_uri(fresh_redis_server.url)  # the process of the top run
    worker = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true&timeout=0.3", clock=clock)
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    root = owner.ledger(new_id(), Budget(max_tokens=1000))
    other = worker.ledger(new_id())  # another run of the worker, still going
    fresh_redis_server.freeze()
    try:
        other.refresh()  # times out: the worker fails open
        sub = worker.ledger(new_id(), Budget(max_steps=5), ancestor_ids=[root.run_id])
        for _ in range(2):  # a sub-run of the top run, made and ended during the outage
            sub.begin_step()
            sub.charge(100, 0)
        sub.refresh()
        sub_key = sub.key
        del sub
        gc.collect()
    finally:
        fresh_redis_server.thaw()
    clock.now += RETRY_SECONDS
    other.begin_step()  # Redis answers again
    assert raw.hmget(root.key, "tokens", "steps") == ["200", "2"]
    assert raw.hmget(sub_key, "tokens", "steps", "max_steps") == ["200", "2", "5"]
    raw.close()
    owner.close()
    worker.close()


@pytest.mark.parametrize("during_the_outage", ["made", "budget changed"])
def test_a_runs_limits_set_during_an_outage_reach_redis_though_its_ledger_was_dropped(
    fresh_redis_server: RedisServer, during_the_outage: str
) -> None:
    # neither is usage to send: a ledger was kept for its usage only, and these were lost with it
    clock = Clock()
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true&timeout=0.3", clock=clock)
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    other = factory.ledger(new_id())
    ledger = factory.ledger(new_id(), Budget(max_tokens=1000))
    fresh_redis_server.freeze()
    try:
        other.refresh()  # times out: the process fails open (Redis is tried again in RETRY_SECONDS)
    finally:
        fresh_redis_server.thaw()
    if during_the_outage == "made":
        ledger = factory.ledger(new_id(), Budget(max_tokens=50))  # counted in process, made in Redis later
    else:
        ledger.set_budget(Budget(max_tokens=50))
    key = ledger.key
    del ledger
    gc.collect()
    assert factory.close() is True
    assert raw.hget(key, "max_tokens") == "50"
    assert raw.hget(key, "started_us") is not None
    raw.close()


def test_close_of_a_fail_open_client_tries_redis_once_whatever_its_back_off(
    fresh_redis_server: RedisServer,
) -> None:
    clock = Clock()
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true", clock=clock)
    ledger = factory.ledger(new_id())
    ledger.begin_step()
    fresh_redis_server.down()
    ledger.begin_step()  # fails open: Redis is tried again in RETRY_SECONDS
    ledger.charge(100, 0)
    ledger.refresh()
    fresh_redis_server.up()  # back before the next try
    key = ledger.key
    del ledger
    factory.close()  # the process shuts down: what it counted is sent now or never
    raw = redis.Redis.from_url(fresh_redis_server.url, decode_responses=True)
    assert raw.hmget(key, "tokens", "steps") == ["100", "2"]
    raw.close()


def test_close_of_a_fail_open_client_waits_one_timeout_at_most_while_redis_hangs(
    fresh_redis_server: RedisServer,
) -> None:
    clock = Clock()
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?fail_open=true&timeout=1", clock=clock)
    ledgers = [factory.ledger(new_id()) for _ in range(5)]
    fresh_redis_server.freeze()
    try:
        for ledger in ledgers:
            ledger.begin_step()  # the first times out, the others count in process at once
            ledger.charge(1, 0)
        started = time.monotonic()
        factory.close()
        waited = time.monotonic() - started
    finally:
        fresh_redis_server.thaw()
    assert waited < 3  # one 1 s timeout; a wait for each ledger in turn would take 5 s


def test_close_of_a_fail_closed_client_waits_one_timeout_at_most_while_redis_hangs_and_warns_once(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # each ledger waited out the timeout in turn, and logged a warning of its own
    factory = RedisLedgerFactory.from_uri(fresh_redis_server.url + "?timeout=1")
    ledgers = [factory.ledger(new_id()) for _ in range(5)]
    for ledger in ledgers:
        ledger.charge(1, 0)  # sent with the next command: there is none before close
    fresh_redis_server.freeze()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            started = time.monotonic()
            factory.close()
            waited = time.monotonic() - started
    finally:
        fresh_redis_server.thaw()
    assert waited < 3  # one 1 s timeout; a wait for each ledger in turn would take 5 s
    [warning] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "5 run(s)" in warning
    assert all(ledger.run_id in warning for ledger in ledgers)


# -- configuration ------------------------------------------------------------------------


def test_from_uri_reads_its_parameters(redis_server: RedisServer) -> None:
    uri = f"{redis_server.url}?timeout=0.25&fail_open=true&key_prefix=app:&ttl_seconds=90&client_name=ledger"
    factory = RedisLedgerFactory.from_uri(uri)
    kwargs = factory.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
    assert kwargs["client_name"] == "ledger"
    assert (factory.fail_open, factory.key_prefix, factory.ttl_seconds) == (True, "app:", 90.0)
    assert factory.ledger(new_id()).key.startswith("app:")
    default = RedisLedgerFactory.from_uri(redis_server.url)
    assert default.client.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    assert default.fail_open is False
    factory.close()
    default.close()


def test_from_uri_connects_through_a_unix_socket_to_the_database_it_names(redis_server: RedisServer) -> None:
    factory = RedisLedgerFactory.from_uri(f"unix://{redis_server.socket_path}?db=3&timeout=0.25")
    kwargs = factory.client.connection_pool.connection_kwargs
    assert (kwargs["path"], kwargs["db"], kwargs["socket_timeout"]) == (
        str(redis_server.socket_path),
        3,
        0.25,
    )
    run_id = new_id()
    factory.ledger(run_id, Budget(max_steps=5)).begin_step()
    by_port = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/3")
    assert by_port.exists(factory.ledger(run_id).key)
    by_port.close()
    factory.close()


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/0?timeout=0",
        "redis://127.0.0.1:6379/0?timeout=soon",
        "redis://127.0.0.1:6379/0?fail_open=maybe",
    ],
)
def test_from_uri_refuses_bad_parameters(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisLedgerFactory.from_uri(uri)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("timeout=1e12", "timeout must be a number > 0 and at most 1e+09, got '1e12'"),
        ("ttl_seconds=1e300", "ttl_seconds must be a number > 0 and at most 1e+15, got '1e300'"),
    ],
)
def test_from_uri_refuses_a_timeout_or_ttl_too_large_to_use(
    redis_server: RedisServer, query: str, error: str
) -> None:
    # accepted, then every step failed, failing open too: an OverflowError out of the socket for
    # the timeout, and for the ttl "the ledger is unavailable" (Redis refused the expiry), which a
    # fail-open process took for an outage, sharing nothing for the rest of its life
    with pytest.raises(ConfigurationError, match=re.escape(error)):
        RedisLedgerFactory.from_uri(f"{redis_server.url}?fail_open=true&{query}")
    client = redis.Redis.from_url(redis_server.url)
    with pytest.raises(ConfigurationError, match="ttl_seconds must be > 0 and at most 1e"):
        RedisLedger(client, new_id(), ttl_seconds=1e300)
    client.close()


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("timout=2", "timout"),
        ("fail_opne=true&timeout=1", "fail_opne"),
        ("ssl_cert_reqs=none", "ssl_cert_reqs"),
    ],
)
def test_from_uri_refuses_a_parameter_it_does_not_know_naming_it(query: str, name: str) -> None:
    # redis-py takes any name and fails at the first step with a TypeError (failing open too)
    with pytest.raises(ConfigurationError, match=f"unknown parameter {name!r}") as info:
        RedisLedgerFactory.from_uri(f"redis://:s3cret@127.0.0.1:6379/0?{query}")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("database", "error"),
    [
        ("/abc", "the path must be the database number, an int >= 0 .*got '/abc'"),  # redis-py: db 0
        ("/0/extra", "the path must be the database number.*got '/0/extra'"),  # redis-py: db 0
        ("/1/2", "the path must be the database number.*got '/1/2'"),  # redis-py: db 12
        ("/-1", "the path must be the database number.*got '/-1'"),
        ("/ 1", "the path must be the database number"),  # redis-py: db 1
        ("/%D9%A1", "the path must be the database number"),  # an Arabic-Indic 1: redis-py reads 1
        ("?db=", "db must be an int >= 0, got ''"),  # redis-py: the path's, else 0
        ("?db=+1", "db must be an int >= 0, got ' 1'"),  # + is a space in a query: redis-py reads 1
        ("/x?db=1", "the path must be the database number.*got '/x'"),
        ("/1?db=2", "the database is given twice, as 1 and 2"),  # redis-py: db 2
        ("?db=1&db=2", "the database is given twice, as 1 and 2"),  # redis-py: db 1
    ],
)
def test_from_uri_refuses_a_database_that_is_no_number_hiding_the_password(database: str, error: str) -> None:
    with pytest.raises(ConfigurationError, match=error) as info:
        RedisLedgerFactory.from_uri(f"redis://user:s3cret@127.0.0.1:6379{database}")
    assert "s3cret" not in str(info.value) and "user:***@127.0.0.1:6379" in str(info.value)


@pytest.mark.parametrize(
    ("database", "number"),
    [("", 0), ("/", 0), ("/3", 3), ("/%33", 3), ("/03", 3), ("?db=3", 3), ("/3?db=3", 3)],
)
def test_from_uri_keeps_the_runs_in_the_database_it_names(
    redis_server: RedisServer, database: str, number: int
) -> None:
    factory = RedisLedgerFactory.from_uri(f"redis://127.0.0.1:{redis_server.port}{database}")
    ledger = factory.ledger(new_id(), Budget(max_steps=5))
    ledger.begin_step()
    try:
        for db in (0, 3):
            with redis.Redis(host="127.0.0.1", port=redis_server.port, db=db) as client:
                assert client.exists(ledger.key) == (db == number), db
    finally:
        factory.close()


def test_a_password_is_hidden_whatever_else_is_wrong_in_the_url() -> None:
    # a port that is no number is refused later: the message that quotes the URL comes first
    with pytest.raises(ConfigurationError, match="timeout must be") as info:
        RedisLedgerFactory.from_uri("redis://:s3cret@127.0.0.1:port/0?timeout=soon")
    assert "s3cret" not in str(info.value)
    assert redact("redis://:s3cret@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert redact("redis://us%40er:p@ss@host/0") == "redis://us%40er:***@host/0"


def test_bad_arguments_are_refused(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    with pytest.raises(ConfigurationError):
        RedisLedger(client, "")
    with pytest.raises(ConfigurationError):
        RedisLedger(client, "a", ancestor_ids=["a"])
    with pytest.raises(ConfigurationError):
        RedisLedger(client, "a", ancestor_ids=["b", "b"])
    with pytest.raises(ConfigurationError):
        RedisLedger(client, "a", ttl_seconds=0)
    client.close()


def test_redact_hides_the_password() -> None:
    assert redact("redis://user:s3cret@host:6380/1?timeout=1") == "redis://user:***@host:6380/1?timeout=1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_a_huge_cost_limit_is_a_limit_never_reached(factory: RedisLedgerFactory) -> None:
    budget = Budget(max_cost_usd=1e300)
    shared = factory.ledger(new_id(), budget)
    for _ in range(3):
        shared.begin_step()
        shared.charge(1, 1000 * COST_UNITS_PER_USD)
    assert shared.exceeded(budget) is None


@pytest.mark.parametrize("limit", [1e303, sys.float_info.max])
def test_a_huge_duration_limit_is_a_limit_never_reached(factory: RedisLedgerFactory, limit: float) -> None:
    # in microseconds the limit overflows a float: it is a whole number of seconds already
    budget = Budget(max_duration_seconds=limit)
    shared = factory.ledger(new_id(), budget)
    shared.begin_step()
    shared.begin_step()
    assert shared.exceeded(budget) is None
    assert shared.status(budget).percentage_used == 0.0
