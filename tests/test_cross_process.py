"""A run whose sub-agents work in other processes: one trace, one shared ledger in Redis."""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import multirun
from multirun import agent, run, step
from multirun.errors import BudgetExceededError
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import CircuitBreakerRule, GracefulDegradationRule, RateLimitRule, RetryRule

pytest_plugins = ["redis_server"]

CALLS_PER_WORKER = 20
TOKENS_PER_CALL = 150  # 100 in, 50 out


def worker(carrier: dict[str, str], ledger_uri: str) -> dict[str, Any]:
    """A worker process: continues the run, spends, and reports what its spans looked like."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    multirun.init(tracer_provider=provider, ledger_uri=ledger_uri, metrics=False)

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def summarize(i: int) -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    @agent(name="summarizer")
    def summarizer() -> int:
        done = 0
        for i in range(CALLS_PER_WORKER):
            try:
                summarize(i)
            except BudgetExceededError:
                break
            done += 1
        return done

    with multirun.continue_run(carrier):
        done = summarizer()
    spans = exporter.get_finished_spans()
    agent_span = next(s for s in spans if s.name == "invoke_agent summarizer")
    return {
        "done": done,
        "trace_id": agent_span.context.trace_id,
        "agent_parent": agent_span.parent.span_id if agent_span.parent else None,
    }


def run_workers(carriers: list[dict[str, str]], ledger_uri: str) -> list[dict[str, Any]]:
    with multiprocessing.get_context("spawn").Pool(len(carriers)) as pool:
        return pool.starmap(worker, [(c, ledger_uri) for c in carriers])


@pytest.mark.parametrize("max_tokens", [None, 4000])
def test_workers_in_other_processes_spend_one_shared_ledger(traced, redis_server, max_tokens) -> None:
    client = multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    results: list[dict[str, Any]] = []

    @step
    def dispatch() -> None:
        carriers = [multirun.inject() for _ in range(3)]
        results.extend(run_workers(carriers, redis_server.url))

    @run(budget=Budget(max_tokens=max_tokens) if max_tokens else None)
    def crew() -> str:
        dispatch()
        return multirun.context.get_current_run_context().run.id

    crew()
    run_span = traced.span("invoke_workflow crew")
    dispatch_span = traced.span("step dispatch")
    done = sum(r["done"] for r in results)
    if max_tokens is None:
        assert done == 3 * CALLS_PER_WORKER
    else:
        # the limit is reached at the step that takes the total to 4000 or more (the 27th): a worker
        # is refused only then, and at most the steps in flight then (one per other worker) go past it
        crossed_at = -(-4000 // TOKENS_PER_CALL)
        assert crossed_at <= done <= crossed_at + 2
    assert run_span.attributes["multirun.tokens_used"] == done * TOKENS_PER_CALL
    assert {r["trace_id"] for r in results} == {run_span.context.trace_id}
    assert {r["agent_parent"] for r in results} == {dispatch_span.context.span_id}
    client.force_flush()


def test_continue_run_without_a_run_in_the_carrier_says_what_to_do(traced) -> None:
    with pytest.raises(multirun.ConfigurationError, match=r"multirun.inject\(\)"), multirun.continue_run({}):
        pass


def spend_in_worker(carrier: dict[str, str], ledger_uri: str) -> None:
    """A worker process: continues the run of ``carrier`` and spends in it."""
    multirun.init(tracer_provider=TracerProvider(), ledger_uri=ledger_uri, metrics=False)

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def summarize(i: int) -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    with multirun.continue_run(carrier):
        for i in range(CALLS_PER_WORKER):
            summarize(i)


def test_workers_of_a_sub_run_spend_its_parents_budget_too_and_a_resume_keeps_it(
    traced, redis_server, tmp_path
) -> None:
    # The workers continue the sub-run, in other processes: their spend is the sub-run's and
    # its parent's. Neither run's ledger object here saw it (it went straight to Redis), so
    # the parent's checkpoint must read the totals afresh.
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url, checkpoint_uri=str(tmp_path))
    crashing = [True]
    dispatched: list[int] = []

    @step
    def dispatch() -> None:
        dispatched.append(1)
        carrier = multirun.inject()
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.starmap(spend_in_worker, [(carrier, redis_server.url)] * 2)

    @run(checkpoint_on_error=False)
    def research() -> str:
        dispatch()
        return "researched"

    @run(checkpoint_on_error=False)
    def crew() -> str:
        research()
        multirun.context.get_current_run_context().checkpoint(name="researched")
        if crashing[0]:
            raise RuntimeError("crash after the sub-run")
        return "done"

    with pytest.raises(RuntimeError):
        crew()
    first = traced.named("invoke_workflow crew")[-1].attributes["multirun.run.id"]
    spent = 2 * CALLS_PER_WORKER * TOKENS_PER_CALL
    assert traced.named("invoke_workflow research")[-1].attributes["multirun.tokens_used"] == spent
    assert traced.named("invoke_workflow crew")[-1].attributes["multirun.tokens_used"] == spent

    crashing[0] = False
    with multirun.resume(run_id=first):
        assert crew() == "done"
    assert dispatched == [1]  # the sub-run was not run again
    resumed_research = traced.named("invoke_workflow research")[-1]
    assert resumed_research.attributes["multirun.tokens_used"] == spent
    assert traced.named("invoke_workflow crew")[-1].attributes["multirun.tokens_used"] == spent


def test_the_top_runs_budget_stops_workers_that_continue_its_sub_run(traced, redis_server) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    done: list[int] = []

    @step
    def dispatch() -> None:
        carriers = [multirun.inject() for _ in range(3)]
        done.extend(r["done"] for r in run_workers(carriers, redis_server.url))

    @run  # no budget of its own
    def research() -> None:
        dispatch()

    @run(budget=Budget(max_tokens=4000))
    def crew() -> None:
        research()

    crew()
    # stopped at the step that took the top run's total to 4000 or more, give or take the
    # steps in flight then (one per worker)
    assert 4000 // TOKENS_PER_CALL <= sum(done) <= 4000 // TOKENS_PER_CALL + 3
    crew_span = traced.named("invoke_workflow crew")[-1]
    assert crew_span.attributes["multirun.tokens_used"] == sum(done) * TOKENS_PER_CALL


def test_a_checkpoint_keeps_what_workers_spent_since_the_runs_last_step(
    traced, redis_server, tmp_path
) -> None:
    # The workers' charges went straight to Redis, after the run's last step of its own: the
    # totals the run's ledger object holds are stale, the checkpoint must read them afresh.
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url, checkpoint_uri=str(tmp_path))
    first_attempt = [True]

    @run(checkpoint_on_error=False)
    def crew() -> str:
        if first_attempt[0]:
            carrier = multirun.inject()
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                pool.starmap(spend_in_worker, [(carrier, redis_server.url)] * 2)
            multirun.context.get_current_run_context().checkpoint(name="dispatched")
            raise RuntimeError("crash after the workers")
        return "done"

    with pytest.raises(RuntimeError):
        crew()
    first = traced.named("invoke_workflow crew")[-1].attributes["multirun.run.id"]
    first_attempt[0] = False
    with multirun.resume(run_id=first):
        assert crew() == "done"
    resumed = traced.named("invoke_workflow crew")[-1]
    # the spend was not given back
    assert resumed.attributes["multirun.tokens_used"] == 2 * CALLS_PER_WORKER * TOKENS_PER_CALL


def test_a_checkpoint_taken_inside_a_sub_run_keeps_what_its_workers_spent(
    traced, redis_server, tmp_path
) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url, checkpoint_uri=str(tmp_path))
    first_attempt = [True]

    @step
    def dispatch() -> None:
        carrier = multirun.inject()
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            pool.starmap(spend_in_worker, [(carrier, redis_server.url)] * 2)

    @run(checkpoint_on_error=False)
    def research() -> None:
        dispatch()
        multirun.context.get_current_run_context().checkpoint(name="dispatched")  # the top run's
        if first_attempt[0]:
            raise RuntimeError("crash in the sub-run")

    @run(checkpoint_on_error=False)
    def crew() -> str:
        research()
        return "done"

    with pytest.raises(RuntimeError):
        crew()
    first = traced.named("invoke_workflow crew")[-1].attributes["multirun.run.id"]
    first_attempt[0] = False
    with multirun.resume(run_id=first):
        assert crew() == "done"  # dispatch is served: no worker runs again
    spent = 2 * CALLS_PER_WORKER * TOKENS_PER_CALL
    assert traced.named("invoke_workflow research")[-1].attributes["multirun.tokens_used"] == spent
    assert traced.named("invoke_workflow crew")[-1].attributes["multirun.tokens_used"] == spent


def test_a_top_run_sends_no_ancestors_it_got_with_the_incoming_baggage(traced, redis_server) -> None:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate

    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    headers: dict[str, str] = {}

    @step
    def call_service() -> None:
        # a worker of the sub-run calls a service; its HTTP instrumentation sends the baggage on
        with multirun.continue_run(multirun.inject()):
            propagate.inject(headers)

    @run
    def research() -> None:
        call_service()

    @run(budget=Budget(max_steps=3))
    def crew() -> None:
        research()

    crew()
    assert "multirun.run.ancestors" in headers["baggage"]
    # the service starts a run of its own and hands it to a worker: not crew's sub-run
    token = otel_context.attach(propagate.extract(headers))
    try:

        @run
        def other() -> dict[str, str]:
            return dict(multirun.inject())

        carrier = other()
    finally:
        otel_context.detach(token)
    assert "multirun.run.ancestors" not in carrier["baggage"]
    with multirun.continue_run(carrier) as worker:
        assert worker.ancestor_ids == ()


def test_continue_run_takes_a_carrier_of_bytes_and_refuses_other_values_clearly(traced) -> None:
    @run
    def crew() -> tuple[str, dict[str, str]]:
        return multirun.context.get_current_run_context().run.id, dict(multirun.inject())

    run_id, carrier = crew()
    as_bytes = {key: value.encode() for key, value in carrier.items()}  # e.g. Kafka message headers
    with multirun.continue_run(as_bytes) as worker:
        assert worker.run.id == run_id
    with multirun.continue_run({**as_bytes, "message-id": 7, "payload": b"\xff\xfe"}) as worker:  # type: ignore[dict-item]
        assert worker.run.id == run_id  # the queue's own headers are not ours to refuse
    not_text = {**carrier, "traceparent": 7}
    with (
        pytest.raises(multirun.ConfigurationError, match=r"carrier\['traceparent'\] must be UTF-8 text"),
        multirun.continue_run(not_text),  # type: ignore[arg-type]
    ):
        pass


def test_continue_run_takes_the_carrier_shapes_http_and_queue_libraries_hand_back(traced) -> None:
    """Title-Case or upper-case header names, multi-valued headers, bytes names, an absent optional header."""

    @run
    def crew() -> tuple[str, dict[str, str]]:
        return multirun.context.get_current_run_context().run.id, dict(multirun.inject())

    run_id, carrier = crew()
    shapes = {
        "title case": {key.title(): value for key, value in carrier.items()},
        "upper case": {key.upper(): value for key, value in carrier.items()},
        "multi-valued": {key: [value] for key, value in carrier.items()},
        "multi-valued bytes": {key: (value.encode(),) for key, value in carrier.items()},
        "bytes names": {key.encode(): value.encode() for key, value in carrier.items()},
        "tracestate absent": {**carrier, "tracestate": None},
    }
    for shape, headers in shapes.items():
        with multirun.continue_run(headers) as worker:
            assert worker.run.id == run_id, shape
            trace_id = trace.get_current_span().get_span_context().trace_id
            assert f"{trace_id:032x}" == carrier["traceparent"].split("-")[1], shape


@pytest.mark.parametrize(
    "incoming",
    [
        {f"k{i}": "v" for i in range(180)},  # W3C's most entries
        {f"big{i}": "x" * 2720 for i in range(3)},  # near W3C's 8192 bytes
    ],
    ids=["180 entries", "8160 bytes"],
)
def test_a_run_under_a_callers_full_baggage_still_reaches_its_worker(traced, incoming) -> None:
    # the propagator drops the entries past the W3C limits: the run's came last, so the worker
    # was told the carrier holds no run
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    @run
    def research() -> tuple[str, dict[str, str]]:
        return multirun.context.get_current_run_context().run.id, dict(multirun.inject())

    @run
    def crew() -> tuple[str, str, dict[str, str]]:
        return multirun.context.get_current_run_context().run.id, *research()

    ctx = otel_context.get_current()
    for name, value in incoming.items():  # what an upstream service sent this one
        ctx = baggage.set_baggage(name, value, ctx)
    token = otel_context.attach(ctx)
    try:
        crew_id, research_id, carrier = crew()
    finally:
        otel_context.detach(token)
    with multirun.continue_run(carrier) as worker:
        assert (worker.run.id, worker.run.name, worker.ancestor_ids) == (research_id, "research", (crew_id,))


def test_continue_run_reads_a_run_sent_in_any_of_several_baggage_headers(traced) -> None:
    # HTTP allows the baggage header more than once (a proxy adds its own): only the first was read
    @run
    def crew() -> tuple[str, dict[str, str]]:
        return multirun.context.get_current_run_context().run.id, dict(multirun.inject())

    run_id, carrier = crew()
    headers = {"traceparent": carrier["traceparent"], "baggage": ["tenant=acme", carrier["baggage"]]}
    with multirun.continue_run(headers) as worker:
        assert worker.run.id == run_id
        assert baggage_of("tenant") == "acme"


def baggage_of(name: str) -> object:
    from opentelemetry import baggage

    return baggage.get_baggage(name)


def test_a_garbled_traceparent_continues_the_run_in_a_trace_of_its_own_with_a_warning(traced, caplog) -> None:
    @run
    def crew() -> tuple[str, dict[str, str]]:
        return multirun.context.get_current_run_context().run.id, dict(multirun.inject())

    @step
    def summarize() -> None:
        pass

    run_id, carrier = crew()
    with (
        caplog.at_level("WARNING", logger="multirun"),
        multirun.continue_run({**carrier, "traceparent": "00-not-a-trace-01"}) as worker,
    ):
        summarize()
    assert worker.run.id == run_id
    step_span = traced.span("step summarize")
    assert step_span.parent is None  # its parent is lost: said so, not silently
    assert step_span.context.trace_id != traced.span("invoke_workflow crew").context.trace_id
    (warning,) = [r.getMessage() for r in caplog.records if "traceparent" in r.getMessage()]
    assert "'00-not-a-trace-01'" in warning and run_id in warning


def test_budget_status_in_a_worker_knows_the_runs_budget(traced, redis_server) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    seen = []

    @step
    def spend() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    @run(budget=Budget(max_tokens=1000))
    def crew() -> None:
        with multirun.continue_run(multirun.inject()) as worker:  # stands for a worker process
            spend()
            seen.append(worker.budget_status())

    crew()
    assert seen[0].tokens_remaining == 850


def test_runs_of_a_program_that_seeds_random_never_share_a_ledger(traced, redis_server) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)

    @step
    def work() -> None:
        pass

    @run(budget=Budget(max_steps=2))
    def job() -> str:
        work()
        work()
        return multirun.context.get_current_run_context().run.id

    ids = []
    for _ in range(2):  # two runs of a program, or two programs, that seed for reproducibility
        random.seed(1234)
        ids.append(job())  # the second was refused: it counted into the first one's record
    assert ids[0] != ids[1]


def lose_every_hash(redis_url: str) -> None:
    """The Redis server restarts without persistence: every run's hash is gone."""
    import redis

    with redis.Redis.from_url(redis_url) as server:
        server.flushall()


def test_a_worker_that_starts_after_redis_lost_the_runs_hash_leaves_its_limits_to_the_run(
    traced, redis_server
) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    done: list[int] = []

    @step
    def work(i: int) -> None:
        pass

    @run(budget=Budget(max_steps=5))
    def crew() -> None:
        work(0)
        carrier = multirun.inject()
        lose_every_hash(redis_server.url)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.starmap(spend_in_worker, [(carrier, redis_server.url)])
        for i in range(1, 30):
            try:
                work(i)
            except BudgetExceededError:
                break
            done.append(i)

    crew()
    # the worker's 20 steps count towards max_steps=5 once the run has re-created its hash: the
    # run's own next step is refused (it used to run 29 more, the hash having lost its limits)
    assert done == []


def test_a_sub_runs_steps_re_create_the_top_runs_lost_hash_with_its_limits(traced, redis_server) -> None:
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    done: list[int] = []

    @step
    def spend(i: int) -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    @run
    def research() -> None:
        for i in range(30):
            if i == 2:
                lose_every_hash(redis_server.url)
            try:
                spend(i)
            except BudgetExceededError:
                break
            done.append(i)

    @run(budget=Budget(max_tokens=1000))
    def crew() -> None:
        research()

    crew()
    # after the loss the top run's limit holds again: 2 steps before it, then what 1000 allows
    assert len(done) <= 2 + 1000 // TOKENS_PER_CALL + 1


def spend_until_refused(carrier: dict[str, str], ledger_uri: str) -> int:
    """A worker process: continues the run of ``carrier`` and spends until its budget says no."""
    multirun.init(tracer_provider=TracerProvider(), ledger_uri=ledger_uri, metrics=False)

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def summarize(i: int) -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    done = 0
    with multirun.continue_run(carrier):
        for i in range(CALLS_PER_WORKER):
            try:
                summarize(i)
            except BudgetExceededError:
                break
            done += 1
    return done


@pytest.mark.parametrize("where", ["in the run", "in the step that spent", "in a sub-run"])
def test_a_worker_sees_what_the_run_spent_before_it_handed_work_over(traced, redis_server, where) -> None:
    # The run spends 900 of its 1000 tokens, then hands the rest of the work to a worker
    # without another step of its own: the worker must not start from zero.
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    done: list[int] = []

    def dispatch() -> None:
        carrier = dict(multirun.inject())
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            done.extend(pool.starmap(spend_until_refused, [(carrier, redis_server.url)]))

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def plan() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=600, output_tokens=300)
        if where == "in the step that spent":
            dispatch()

    @run
    def research() -> None:
        plan()
        dispatch()

    @run(budget=Budget(max_tokens=1000))
    def crew() -> None:
        if where == "in a sub-run":
            research()
            return
        plan()
        if where == "in the run":
            dispatch()

    crew()
    # 900 spent: the worker's first step (to 1050) runs, its second is refused
    assert done == [1]


RETRY_DELAY = 60.0  # twice the deadline below: a retry after it starts past the deadline


def retry_in_worker(carrier: dict[str, str], ledger_uri: str) -> tuple[int, float]:
    """A worker process: continues the run of ``carrier`` with a step that spends, then fails
    once and would retry after RETRY_DELAY seconds; (attempts, seconds it took)."""
    import time

    multirun.init(tracer_provider=TracerProvider(), ledger_uri=ledger_uri, metrics=False)
    attempts = []

    @step(retry=1, retry_delay=RETRY_DELAY)
    def flaky() -> None:
        attempts.append(1)
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)
        raise ConnectionError("blip")

    started = time.monotonic()
    with multirun.continue_run(carrier), pytest.raises(multirun.StepError):
        flaky()
    return len(attempts), time.monotonic() - started


# the deadline leaves the spawned worker time to start on a loaded machine (2 s did not: it was
# past before the worker's first attempt, which was refused)
@pytest.mark.parametrize(
    "budget", [Budget(max_duration_seconds=30), Budget(max_tokens=100)], ids=["deadline", "tokens"]
)
def test_a_worker_of_a_sub_run_does_not_wait_to_retry_past_the_top_runs_budget(
    traced, redis_server, budget
) -> None:
    # The retry would start after the top run's deadline, or the failed attempt used up its
    # tokens: the worker gives up at once, as a retry in the top run's own process does,
    # instead of sleeping out the backoff to be refused then.
    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url)
    results = []

    @run  # no budget of its own
    def research() -> None:
        carrier = dict(multirun.inject())
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results.extend(pool.starmap(retry_in_worker, [(carrier, redis_server.url)]))

    @run(budget=budget)
    def crew() -> None:
        research()

    crew()
    attempts, seconds = results[0]
    assert attempts == 1
    assert seconds < RETRY_DELAY / 2


def test_a_step_under_every_limit_and_rule_is_one_round_trip_to_redis(
    traced, redis_server, monkeypatch
) -> None:
    from redis.connection import Connection

    multirun.init(tracer_provider=traced.provider, ledger_uri=redis_server.url, metrics=False)
    sent: list[str] = []
    send_command, send_packed_command = Connection.send_command, Connection.send_packed_command

    def counting_send_command(self: Connection, *args: Any, **kwargs: Any) -> None:
        sent.append(str(args[0]))
        send_command(self, *args, **kwargs)

    def counting_send_packed_command(self: Connection, command: Any, check_health: bool = True) -> None:
        sent.append("write")
        send_packed_command(self, command, check_health)

    monkeypatch.setattr(Connection, "send_command", counting_send_command)
    monkeypatch.setattr(Connection, "send_packed_command", counting_send_packed_command)

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def ask() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=100, output_tokens=50)

    @step
    def tidy() -> None:
        pass

    budget = Budget(
        max_tokens=10**6, max_cost_usd=100, max_steps=1000, max_duration_seconds=3600, max_sub_agents=5
    )
    policy = Policy(
        retry=RetryRule(),
        rate_limit=RateLimitRule(requests_per_minute=10**6),
        circuit_breaker=CircuitBreakerRule(),
        graceful_degradation=GracefulDegradationRule(fallback_model="gpt-4o-mini"),
    )

    @run(budget=budget, policy=policy)
    def crew() -> list[str]:
        ask()  # the run's hash is made and the scripts are loaded by now
        tidy()
        sent.clear()
        for _ in range(10):
            ask()  # its usage goes with the next step's check
            tidy()
        return list(sent)

    during = crew()
    assert during == ["EVALSHA", "write"] * 20  # one command, one write, per step
