"""Checkpoints, restore and replay: a failed run resumes without paying twice."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import sys
import threading
import types

import pydantic
import pytest

import multirun
from multirun import agent, checkpoint, run, step
from multirun.checkpoints.envelope import PendingBlob
from multirun.checkpoints.exporters import FileBlobExporter, MemoryBlobExporter
from multirun.checkpoints.resume import stored_checkpoints
from multirun.checkpoints.store import CheckpointStore
from multirun.context import RunContext, get_current_agent_context, get_current_run_context
from multirun.errors import CheckpointError, DeterminismError, ReplayError
from multirun.models import Budget, Run, StepKind
from multirun.telemetry import attributes as attr


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []

    def __call__(self, name: str) -> None:
        self.log.append(name)


def run_id_after_crash(traced, job) -> str:  # type: ignore[no-untyped-def]
    """Call ``job``, a run that raises RuntimeError after a checkpoint; its run id."""
    with pytest.raises(RuntimeError):
        job()
    return traced.named(f"invoke_workflow {job.__name__}")[-1].attributes[attr.RUN_ID]


def crew_program(calls: Calls, *, fail_at_end: bool):
    """search -> summarize (LLM) -> checkpoint -> publish; publish fails the first time."""

    @step(kind=StepKind.TOOL_CALL)
    def search(topic: str) -> list[str]:
        calls("search")
        return [f"{topic} 1", f"{topic} 2"]

    @step(kind=StepKind.LLM_CALL, model="gpt-4o-mini")
    def summarize(sources: list[str]) -> str:
        calls("summarize")
        multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=100)
        return " / ".join(sources)

    @checkpoint(name="summarized")
    def note(summary: str) -> str:
        get_current_run_context().set_state("summary", summary)
        return summary

    @step(idempotent=False)
    def publish(summary: str) -> str:
        calls("publish")
        if fail_at_end:
            raise ConnectionError("publisher down")
        return f"published: {summary}"

    @run(name="crew", budget=Budget(max_tokens=5_000))
    def crew(topic: str) -> str:
        summary = note(summarize(search(topic)))
        return publish(summary)

    return crew


def test_a_resumed_run_serves_completed_steps_from_the_checkpoint(traced) -> None:
    calls = Calls()
    with pytest.raises(ConnectionError):
        crew_program(calls, fail_at_end=True)("otel")
    first = traced.span("invoke_workflow crew")
    first_run_id = first.attributes[attr.RUN_ID]
    assert calls.log == ["search", "summarize", "publish"]

    calls.log.clear()
    traced.exporter.clear()
    with multirun.resume(run_id=first_run_id):
        result = crew_program(calls, fail_at_end=False)("otel")

    assert result == "published: otel 1 / otel 2"
    assert calls.log == ["publish"]  # search and summarize were served, publish is not idempotent
    resumed = traced.span("invoke_workflow crew")
    assert resumed.attributes[attr.RUN_ID] != first_run_id
    assert resumed.attributes[attr.RUN_RESUMED_FROM] == first_run_id
    assert resumed.attributes[attr.RUN_REPLAYING] is True
    assert [link.context.trace_id for link in resumed.links] == [first.context.trace_id]
    assert resumed.attributes[attr.TOKENS_USED] == 1100  # the spend carried over, nothing spent twice
    skipped = {s.name: s.attributes[attr.STEP_STATUS] for s in traced.spans() if s.name != resumed.name}
    assert skipped["execute_tool search"] == "skipped"
    assert skipped["chat gpt-4o-mini"] == "skipped"


def test_resume_by_checkpoint_id_restores_state(traced) -> None:
    calls = Calls()
    with pytest.raises(ConnectionError):
        crew_program(calls, fail_at_end=True)("otel")
    run_id = traced.span("invoke_workflow crew").attributes[attr.RUN_ID]
    checkpoint_id = traced.client.checkpoints.latest(run_id)

    @run(name="crew")  # the program that took the checkpoint
    def inspect_state() -> object:
        return get_current_run_context().get_state("summary")

    with multirun.resume(checkpoint_id=checkpoint_id) as restored:
        assert restored.checkpoint.run_id == run_id
        assert inspect_state() == "otel 1 / otel 2"


def test_a_resumed_run_never_gets_its_budget_back(traced) -> None:
    calls = Calls()
    with pytest.raises(ConnectionError):
        crew_program(calls, fail_at_end=True)("otel")
    run_id = traced.span("invoke_workflow crew").attributes[attr.RUN_ID]

    @step(kind=StepKind.LLM_CALL, idempotent=False)  # not in the recorded run: never replayed
    def expensive() -> None:
        multirun.report_usage("gpt-4o-mini", input_tokens=3_000, output_tokens=900)

    @run(name="crew", budget=Budget(max_tokens=5_000))  # the program that took the checkpoint
    def more() -> None:
        expensive()  # 1,100 restored + 3,900 = 5,000: the limit is reached
        expensive()

    with multirun.resume(run_id=run_id), pytest.raises(multirun.BudgetExceededError):
        more()


def test_a_renamed_step_raises_a_determinism_error_instead_of_a_wrong_value(traced) -> None:
    @step
    def fetch(n: int) -> int:
        return n * 10

    @step
    def fail() -> None:
        raise RuntimeError("crash")

    @run
    def job() -> None:
        fetch(1)
        fetch(2)
        get_current_run_context().checkpoint(name="mid")
        fail()

    run_id = run_id_after_crash(traced, job)

    @step
    def fetch_renamed(n: int) -> int:
        return n * 10

    @run(name="job")  # the same program, changed
    def job_changed() -> None:
        fetch(1)
        fetch_renamed(2)

    with multirun.resume(run_id=run_id), pytest.raises(DeterminismError, match="fetch_renamed"):
        job_changed()


def test_a_restored_run_that_goes_on_from_its_state_runs_its_steps_and_is_served_none(traced, caplog) -> None:
    """The reference's pattern: restore, read where the run was from its state, carry on. Its
    first step is none the recording has: nothing is served (no recorded value can be another
    call's), the steps run, and a warning says so (it raised DeterminismError)."""
    executed: list[int] = []
    saved: list[str] = []

    @step
    def work(i: int) -> int:
        executed.append(i)
        return i * i

    @run(name="loop")
    def loop(restore_from: str | None = None) -> list[int]:
        ctx = get_current_run_context()
        if restore_from is not None:
            ctx.restore_from_checkpoint(restore_from)
        results: list[int] = ctx.get_state("results", default=[])
        for i in range(ctx.get_state("iteration", default=0), 6):
            results.append(work(i))
            ctx.set_state("results", results)
            ctx.set_state("iteration", i + 1)
            if i == 2 and restore_from is None:
                saved.append(ctx.checkpoint(name="mid").value.id)
            if i == 3 and restore_from is None:
                raise RuntimeError("crash")
        return results

    with pytest.raises(RuntimeError):
        loop()
    executed.clear()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert loop(saved[0]) == [0, 1, 4, 9, 16, 25]
    assert executed == [3, 4, 5]
    [warning] = [r.getMessage() for r in caplog.records if "first step after the restore" in r.getMessage()]
    assert "'work'" in warning and "3 recorded calls are not served" in warning
    # the steps it ran are recorded: a checkpoint taken now and restored serves them
    assert [s.attributes[attr.STEP_STATUS] for s in traced.named("step work")][-3:] == ["completed"] * 3


def test_a_resumed_run_whose_first_step_was_renamed_is_served_nothing_and_says_so(traced, caplog) -> None:
    """The first call is none the recording has: no recorded value is served in its place, and
    a warning names the step the recording expected, as it costs the recorded calls again."""
    run_id = crashed_run_of_fetches(traced)
    executed: list[int] = []

    @step
    def fetch_renamed(n: int) -> int:
        executed.append(n)
        return n * 10

    @run(name="job")  # the same program, changed
    def job_changed() -> int:
        return fetch_renamed(1) + fetch_renamed(2)

    with caplog.at_level(logging.WARNING, logger="multirun"), multirun.resume(run_id=run_id):
        assert job_changed() == 30
    assert executed == [1, 2]
    assert any(
        "'fetch_renamed', is not the recorded run's next call (#1, 'fetch')" in r.getMessage()
        for r in caplog.records
    )


def crashed_run_of_fetches(traced) -> str:
    """A run that called fetch(1), fetch(2), checkpointed and crashed: its run id."""

    @step
    def fetch(n: int) -> int:
        return n * 10

    @run
    def job() -> None:
        fetch(1)
        fetch(2)
        get_current_run_context().checkpoint(name="mid")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        job()
    return str(traced.named("invoke_workflow job")[0].attributes[attr.RUN_ID])


def test_a_step_resumed_with_other_inputs_says_so_naming_the_step(traced) -> None:
    run_id = crashed_run_of_fetches(traced)

    @step
    def fetch(n: int) -> int:
        return n * 10

    @run(name="job")  # the same program, changed
    def job_other_inputs() -> None:
        fetch(1)
        fetch(3)

    with multirun.resume(run_id=run_id), pytest.raises(DeterminismError) as info:
        job_other_inputs()
    message = str(info.value)
    assert message.startswith(
        "replay: step 'fetch' was called with different inputs than the recorded run's call of 'fetch' "
        "at this point (recorded call #2)."
    ), message
    assert "was not recorded" not in message


def test_another_step_where_the_recording_has_one_names_both(traced) -> None:
    run_id = crashed_run_of_fetches(traced)

    @step
    def fetch(n: int) -> int:
        return n * 10

    @step
    def gather(n: int) -> int:
        return n

    @run(name="job")  # the same program, changed
    def job_other_step() -> None:
        fetch(1)
        gather(2)

    with multirun.resume(run_id=run_id), pytest.raises(DeterminismError) as info:
        job_other_step()
    assert str(info.value).startswith(
        "replay: step 'gather' was called where the recorded run called 'fetch' (recorded call #2)."
    ), str(info.value)


def test_a_step_called_more_often_with_the_same_inputs_says_so(traced) -> None:
    run_id = crashed_run_of_fetches(traced)

    @step
    def fetch(n: int) -> int:
        return n * 10

    @run(name="job")  # the same program, changed
    def job_repeats() -> None:
        fetch(1)
        fetch(1)

    with multirun.resume(run_id=run_id), pytest.raises(DeterminismError) as info:
        job_repeats()
    assert str(info.value).startswith(
        "replay: step 'fetch' was called with the same inputs more often than recorded (call 2 with "
        "them); the recorded run called 'fetch' here (recorded call #2)."
    ), str(info.value)


def test_steps_replayed_out_of_order_raise_a_determinism_error(traced) -> None:
    run_id = crashed_run_of_fetches(traced)

    @step
    def fetch(n: int) -> int:
        return n * 10

    @run(name="job")  # the same program, changed
    def job_reordered() -> None:
        fetch(2)
        fetch(1)

    with multirun.resume(run_id=run_id), pytest.raises(DeterminismError, match="other way round"):
        job_reordered()


def test_repeated_calls_with_the_same_inputs_are_replayed_call_by_call(traced) -> None:
    pages = iter(["page 1", "page 2", "page 3"])

    @step
    def next_page() -> str:
        return next(pages)

    @run
    def job() -> list[str]:
        next_page()
        next_page()
        get_current_run_context().checkpoint(name="two pages")
        raise RuntimeError("crash")

    run_id = run_id_after_crash(traced, job)

    @run(name="job")  # the same program, changed
    def job_again() -> list[str]:
        return [next_page(), next_page(), next_page()]

    with multirun.resume(run_id=run_id):
        assert job_again() == ["page 1", "page 2", "page 3"]


def test_steps_past_the_replay_limit_run_again_after_a_restore(traced, tmp_path, caplog) -> None:
    multirun.init(tracer_provider=traced.provider, checkpoint_uri=str(tmp_path / "blobs"), replay_limit=3)
    executed: list[int] = []

    @step
    def fetch(n: int) -> int:
        executed.append(n)
        return n * 10

    @run
    def job() -> None:
        for n in range(1, 6):
            fetch(n)
        get_current_run_context().checkpoint(name="five fetched")
        raise RuntimeError("crash")

    with caplog.at_level(logging.WARNING, logger="multirun"), pytest.raises(RuntimeError):
        job()
    full = [r for r in caplog.records if "replay log is full" in r.getMessage()]
    assert len(full) == 1  # once per run, not once per step past the limit
    run_id = traced.named("invoke_workflow job")[0].attributes[attr.RUN_ID]

    @run(name="job")  # the same program, changed
    def job_again() -> list[int]:
        return [fetch(n) for n in range(1, 6)]

    executed.clear()
    with multirun.resume(run_id=run_id):
        assert job_again() == [10, 20, 30, 40, 50]
    assert executed == [4, 5]  # the first three were served from the log


def test_a_step_the_policy_refused_is_not_replayed_as_a_call_in_flight(traced) -> None:
    from multirun.errors import PolicyViolation
    from multirun.models import Policy
    from multirun.models.policy import CircuitBreakerRule

    @step
    def fetch(n: int) -> int:
        return n * 10

    @step(name="flaky_dependency")
    def flaky() -> None:
        raise ConnectionError("down")

    policy = Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=3600))

    def program() -> int:
        value = fetch(1)
        for _ in range(2):  # fails, then the open circuit refuses it
            with pytest.raises((ConnectionError, PolicyViolation)):
                flaky()
        return value

    @run(policy=policy)
    def job() -> None:
        program()
        get_current_run_context().checkpoint(name="after the refusal")
        raise RuntimeError("crash")

    run_id = run_id_after_crash(traced, job)

    @run(name="job", policy=policy)
    def job_again() -> int:
        return program()

    # the refused call used to stay in the log as a call in flight, so the restore expected a
    # second call of flaky_dependency where the program makes its first: a DeterminismError
    with multirun.resume(run_id=run_id):
        assert job_again() == 10


class Flaky:
    """A service that fails its first ``failures`` calls in each process, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, query: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("service unavailable")
        return f"answer to {query}"


def test_a_step_the_program_retried_after_a_failure_is_served_on_resume(traced) -> None:
    def program(service: Flaky, crash: bool):  # type: ignore[no-untyped-def]
        @step
        def ask(query: str) -> str:
            return service(query)

        @run
        def job() -> str:
            for _ in range(3):  # the program's own retry loop around the step
                try:
                    answer = ask("q")
                    break
                except ConnectionError:
                    continue
            get_current_run_context().checkpoint(name="answered")
            if crash:
                raise RuntimeError("crash")
            return f"{answer} / {ask('follow-up')}"

        return job

    recorded = Flaky(failures=2)
    run_id = run_id_after_crash(traced, program(recorded, crash=True))
    assert recorded.calls == 3

    # the failed calls used to take up the occurrence numbers of the step's inputs, so the restore
    # found no recorded first call of ask("q"): a DeterminismError
    resumed = Flaky(failures=0)
    with multirun.resume(run_id=run_id):
        assert program(resumed, crash=False)() == "answer to q / answer to follow-up"
    assert resumed.calls == 1  # only the follow-up: the retried question is answered from the log
    served = [s for s in traced.named("step ask") if s.attributes[attr.STEP_STATUS] == "skipped"]
    assert len(served) == 1


def test_retry_loops_in_tasks_side_by_side_are_served_on_resume(traced) -> None:
    import asyncio

    calls = Calls()

    def program(flaky: Flaky, crash: bool):  # type: ignore[no-untyped-def]
        @step
        async def ask(query: str) -> str:
            calls(f"ask {query}")
            await asyncio.sleep(0)
            return flaky(query)

        @step
        async def note(text: str) -> str:
            calls(f"note {text}")
            return text

        async def with_retries(query: str) -> str:
            for _ in range(3):  # the program's own retry loop around the step
                try:
                    return await ask(query)
                except ConnectionError:
                    await asyncio.sleep(0.01)  # the other task's steps run meanwhile
            raise RuntimeError("gave up")

        async def notes() -> list[str]:
            return [await note("a"), await note("b"), await note("c")]

        @run(checkpoint_on_error=False)
        async def job() -> str:
            answer, written = await asyncio.gather(with_retries("q"), notes())
            get_current_run_context().checkpoint(name="both done")
            if crash:
                raise RuntimeError("crash")
            return f"{answer} {written}"

        return job

    recorded = Flaky(failures=1)
    with pytest.raises(RuntimeError):
        asyncio.run(program(recorded, crash=True)())
    assert recorded.calls == 2
    assert calls.log.index("note a") < calls.log.index("ask q", 1)  # the retry came after a note
    run_id = traced.named("invoke_workflow job")[-1].attributes[attr.RUN_ID]

    # another task's steps came between the failed call and its retry: the retry used to go
    # unrecognised, so the failed call ran again (paid twice) instead of getting its answer
    calls.log.clear()
    resumed = Flaky(failures=0)
    with multirun.resume(run_id=run_id):
        assert asyncio.run(program(resumed, crash=False)()) == "answer to q ['a', 'b', 'c']"
    assert calls.log == []
    assert resumed.calls == 0


def fallback_program(primary: Flaky, calls: Calls, crash: bool):  # type: ignore[no-untyped-def]
    """primary fails -> backup; then summarize(topic); checkpoint; crash."""

    @step
    def ask_primary(query: str) -> str:
        calls("primary")
        return primary(query)

    @step
    def ask_backup(query: str) -> str:
        calls("backup")
        return f"backup answer to {query}"

    @step
    def summarize(topic: str) -> str:
        calls("summarize")
        return f"summary of {topic}"

    @run(checkpoint_on_error=False)
    def job() -> str:
        try:
            answer = ask_primary("q")
        except ConnectionError:
            answer = ask_backup("q")
        summary = summarize("topic")
        get_current_run_context().checkpoint(name="summarized")
        if crash:
            raise RuntimeError("crash")
        return f"{answer}; {summary}"

    return job


def test_a_step_whose_failure_the_program_handled_runs_again_on_resume(traced) -> None:
    calls = Calls()
    run_id = run_id_after_crash(traced, fallback_program(Flaky(failures=1), calls, crash=True))

    calls.log.clear()
    with multirun.resume(run_id=run_id):
        result = fallback_program(Flaky(failures=1), calls, crash=False)()
    # the failed call runs again (it has no result to serve) and fails again; what followed it
    # in the recorded run is served
    assert result == "backup answer to q; summary of topic"
    assert calls.log == ["primary"]


def test_a_failed_step_that_now_returns_ends_the_replay_instead_of_serving_the_other_path(
    traced, caplog
) -> None:
    calls = Calls()
    run_id = run_id_after_crash(traced, fallback_program(Flaky(failures=1), calls, crash=True))

    calls.log.clear()
    with multirun.resume(run_id=run_id), caplog.at_level(logging.INFO, logger="multirun"):
        result = fallback_program(Flaky(failures=0), calls, crash=False)()
    # the primary answers this time: the program does not call the backup, so the recording no
    # longer describes it, and nothing after is served from it
    assert result == "answer to q; summary of topic"
    assert calls.log == ["primary", "summarize"]
    assert "failed in the restored run returned this time" in caplog.text


def test_a_resumed_run_that_crashes_can_be_resumed_again(traced) -> None:
    calls = Calls()

    def program(crash_at: int):  # type: ignore[no-untyped-def]
        @step
        def fetch(n: int) -> int:
            calls("fetch")
            return n + 1

        @step
        def plan(n: int) -> int:
            calls("plan")
            get_current_run_context().checkpoint(name="inside plan")  # plan is running in it
            return n * 2

        @step
        def act(n: int) -> int:
            calls("act")
            return n * 10

        @run(checkpoint_on_error=False)  # as if the process were killed
        def job() -> int:
            planned = plan(fetch(1))
            if crash_at == 1:
                raise RuntimeError("crash 1")
            done = act(planned)
            get_current_run_context().checkpoint(name="acted")
            if crash_at == 2:
                raise RuntimeError("crash 2")
            return done + act(5)

        return job

    first = run_id_after_crash(traced, program(crash_at=1))
    assert calls.log == ["fetch", "plan"]
    calls.log.clear()
    with multirun.resume(run_id=first):
        second = run_id_after_crash(traced, program(crash_at=2))
    assert calls.log == ["plan", "act"]  # plan was running at the checkpoint: it runs again

    # the second checkpoint used to hold both plan calls, the one that was running and the one
    # that returned, so the next restore expected the old one first: a DeterminismError
    calls.log.clear()
    with multirun.resume(run_id=second):
        assert program(crash_at=0)() == 90
    assert calls.log == ["act"]  # act(5): the only call not made before


def test_a_long_run_whose_steps_get_different_inputs_keeps_flat_memory(traced) -> None:
    import tracemalloc

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    multirun.init(tracer_provider=provider, replay_limit=100, step_history=10)

    @step
    def work(n: int) -> None:
        return None

    grown: list[int] = []

    @run
    def long_run() -> None:
        for n in range(2_000):  # fill the replay log, the history and every cache first
            work(n)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(2_000, 22_000):
                work(n)
            grown.append(tracemalloc.get_traced_memory()[0] - before)
        finally:
            tracemalloc.stop()

    long_run()
    provider.shutdown()
    # each step's inputs used to stay counted (~200 bytes a step: 4 MB here, 200 MB a million)
    assert grown[0] < 256 * 1024, f"{grown[0]:,} bytes kept by 20,000 steps"


def test_step_checkpoint_true_writes_a_checkpoint_after_success(traced) -> None:
    @step(checkpoint=True)
    def stage() -> int:
        return 7

    @run
    def job() -> object:
        stage()
        return get_current_run_context().run.latest_checkpoint_id

    checkpoint_id = job()
    assert checkpoint_id is not None
    meta = get_meta(traced, checkpoint_id)
    assert meta.checkpoint.name == "after_stage"


def test_a_failed_run_checkpoints_on_its_error_but_not_when_its_budget_stopped_it(traced) -> None:
    """checkpoint_on_error as reference 000 has it: other exceptions checkpoint, a
    BudgetExceededError only fails the run."""

    runs: list[Run] = []

    @step
    def stage() -> int:
        return 7

    @run(budget=Budget(max_steps=1))
    def job(fail: bool) -> None:
        runs.append(get_current_run_context().run)
        stage()
        if fail:
            raise RuntimeError("crash")
        stage()

    with pytest.raises(RuntimeError):
        job(True)
    with pytest.raises(multirun.BudgetExceededError):
        job(False)
    crashed, stopped = runs
    assert [c.name for c in crashed.checkpoints] == ["on_error_RuntimeError"]
    assert len(traced.client.checkpoints.list(crashed.id)) == 1
    assert stopped.checkpoints == [] and traced.client.checkpoints.list(stopped.id) == []


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="asyncio.TaskGroup is Python 3.11+")
async def test_a_run_whose_task_group_the_budget_stopped_fails_as_the_budget_stopped_it(traced) -> None:
    """The refusals of tasks of an asyncio.TaskGroup reach the run in an ExceptionGroup: the run
    is still one the budget stopped (no checkpoint, the limit on its span)."""
    runs: list[Run] = []

    @step
    async def stage() -> None:
        await asyncio.sleep(0)

    async def worker() -> None:
        for _ in range(5):
            await stage()

    @run(budget=Budget(max_steps=3))
    async def crew() -> None:
        runs.append(get_current_run_context().run)
        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
            for _ in range(3):
                group.create_task(worker())

    with pytest.raises(BaseException) as raised:  # an ExceptionGroup (a builtin of 3.11+)
        await crew()
    assert {type(e) for e in raised.value.exceptions} == {multirun.BudgetExceededError}  # type: ignore[attr-defined]
    (stopped,) = runs
    assert stopped.checkpoints == [] and traced.client.checkpoints.list(stopped.id) == []
    span = traced.span("invoke_workflow crew")
    assert span.attributes[attr.RUN_STATUS] == "failed"
    assert span.attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_steps"


def test_a_checkpoint_after_a_step_or_a_function_names_the_agent_it_ran_in(traced) -> None:
    """Checkpoint.agent_id is the parent agent (reference 001): that of the step that took it,
    or of the @checkpoint function, the run's default agent outside any @agent."""

    @step(checkpoint=True)
    def stage() -> int:
        return 7

    @checkpoint(name="noted")
    def note() -> int:
        return 8

    @agent(name="researcher")
    def research() -> str:
        stage()
        note()
        return get_current_agent_context().agent.id

    @run
    def job() -> tuple[str, str, list[str]]:
        researcher = research()
        note()
        ids = [meta.id for meta in get_current_run_context().run.checkpoints]
        return researcher, get_current_agent_context().agent.id, ids

    researcher, default, ids = job()
    agents = [get_meta(traced, checkpoint_id).checkpoint.agent_id for checkpoint_id in ids]
    assert agents == [researcher, researcher, default]
    assert default and default != researcher


def get_meta(traced, checkpoint_id):
    return traced.client.checkpoints.load(checkpoint_id)


def test_a_failing_checkpoint_is_a_warning_and_the_function_still_returns(traced, caplog, tmp_path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the blob store's folder should be")
    traced.client.checkpoints = CheckpointStore(FileBlobExporter(blocked / "blobs"))

    @checkpoint(name="x")
    def stage() -> int:
        return 3

    @run
    def job() -> int:
        return stage()

    with caplog.at_level(logging.WARNING):
        assert job() == 3
    assert any("checkpoint 'x'" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_interrupted_while_its_digest_is_computed_leaves_no_blob(
    traced, monkeypatch, tmp_path
) -> None:
    # the file store writes the body meanwhile: it must give up, and name no half-made blob
    def interrupted(self: PendingBlob) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(PendingBlob, "finish", interrupted)
    with RunContext(traced.client, Run(name="job")) as ctx:
        ctx.set_state("big", "x" * 2_000_000)  # large enough to be written while hashed
        with pytest.raises(KeyboardInterrupt):
            ctx.checkpoint(name="interrupted")
    for thread in threading.enumerate():
        if thread.name == "multirun-checkpoint-put":
            thread.join(timeout=30)
    assert traced.client.checkpoints.list() == []
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_still_loads(traced) -> None:
    @run
    def job() -> tuple[str, str]:
        ctx = get_current_run_context()
        ctx.set_state("n", 1)
        first = ctx.checkpoint(name="one").value
        ctx.set_state("n", 2)
        second = ctx.checkpoint(name="two").value
        return first.id, second.id

    first_id, second_id = job()
    store = traced.client.checkpoints
    key = store.find(second_id)
    path = store.exporter.directory / key  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError):
        store.load(second_id)
    assert store.load(first_id).state == {"n": 1}


class Report(pydantic.BaseModel):
    title: str
    pages: int


def test_with_a_signed_pickle_store_replayed_results_keep_their_type(traced, tmp_path) -> None:
    client = multirun.init(
        tracer_provider=traced.provider,
        checkpoint_uri=str(tmp_path / "pickled"),
        checkpoint_serializer="pickle",
        checkpoint_hmac_key="a test key of at least sixteen bytes",
    )
    calls = Calls()

    @step
    def draft(title: str) -> Report:
        calls("draft")
        return Report(title=title, pages=3)

    @run
    def job() -> Report:
        draft("otel")
        get_current_run_context().checkpoint(name="drafted")
        raise RuntimeError("crash")

    run_id = run_id_after_crash(traced, job)

    @run(name="job")  # the same program, changed
    def job_again() -> Report:
        return draft("otel")

    with multirun.resume(run_id=run_id):
        assert job_again() == Report(title="otel", pages=3)
    assert calls.log == ["draft"]
    assert client.checkpoints.load(client.checkpoints.latest(run_id)).checkpoint.state_format == "pickle"


def test_a_pickle_checkpoint_is_refused_by_a_reader_without_the_key(traced, tmp_path) -> None:
    signed = CheckpointStore(
        FileBlobExporter(tmp_path / "shared"),
        serializer="pickle",
        hmac_key="a test key of at least sixteen bytes",
    )
    traced.client.checkpoints = signed

    @run
    def job() -> str:
        ctx = get_current_run_context()
        ctx.set_state("x", {1, 2})
        return ctx.checkpoint(name="c").value.id

    checkpoint_id = job()
    reader = CheckpointStore(FileBlobExporter(tmp_path / "shared"))  # json only, no key
    with pytest.raises(CheckpointError, match="pickle"):
        reader.load(checkpoint_id)
    other_key = CheckpointStore(
        FileBlobExporter(tmp_path / "shared"), serializer="pickle", hmac_key="another key, sixteen bytes long"
    )
    with pytest.raises(CheckpointError, match="HMAC"):
        other_key.load(checkpoint_id)
    assert signed.load(checkpoint_id).state == {"x": {1, 2}}


def test_restoring_a_checkpoint_whose_contents_cannot_be_deserialized_raises_replay_error(
    traced, tmp_path, monkeypatch
) -> None:
    # the reference: CheckpointError if loading fails, ReplayError if deserialization fails;
    # the error is both, so code that catches either (as this package's own did) still does
    traced.client.checkpoints = CheckpointStore(
        FileBlobExporter(tmp_path / "signed"),
        serializer="pickle",
        hmac_key="a test key of at least sixteen bytes",
    )
    module = types.ModuleType("agent_notes")
    exec("class Notes:\n    topic = 'otel'\n", module.__dict__)
    monkeypatch.setitem(sys.modules, "agent_notes", module)

    @run
    def job() -> str:
        ctx = get_current_run_context()
        ctx.set_state("notes", module.Notes())
        return ctx.checkpoint(name="c").value.id

    checkpoint_id = job()
    monkeypatch.delitem(sys.modules, "agent_notes")  # the program that restores has no such module

    @run
    def later() -> None:
        get_current_run_context().restore_from_checkpoint(checkpoint_id)

    with pytest.raises(ReplayError, match="ModuleNotFoundError: No module named 'agent_notes'") as caught:
        later()
    assert isinstance(caught.value, CheckpointError)


def test_latest_checkpoint_ignores_a_stray_file_in_the_run_folder(tmp_path) -> None:
    exporter = FileBlobExporter(tmp_path)
    store = CheckpointStore(exporter)
    client = multirun.MultiRunClient(checkpoint_store=store, metrics=False)
    with RunContext(client, Run(name="work")) as ctx:
        checkpoint_id = ctx.checkpoint("only").value.id
        run_id = ctx.run.id
    exporter.put(f"checkpoints/{run_id}/zz-notes.txt", b"not a checkpoint")  # sorts after the real one
    assert store.latest(run_id) == checkpoint_id


def test_a_resumed_run_stays_unpriced_when_its_earlier_spend_was(traced) -> None:
    @run
    def first() -> str:
        multirun.report_usage("a-model-nobody-prices", input_tokens=10, output_tokens=5)
        return get_current_run_context().checkpoint("spent").value.id

    checkpoint_id = first()

    @run
    def second() -> None:
        get_current_run_context().restore_from_checkpoint(checkpoint_id)

    second()
    resumed = traced.span("invoke_workflow second")
    assert resumed.attributes[attr.TOKENS_USED] == 15
    assert resumed.attributes[attr.UNPRICED] is True  # never a silent $0 for the carried-over spend


# ---------------------------------------------------------------------------
# found by an adversarial review of replay (each failed before its fix)


def test_a_step_served_inside_its_parent_still_counts_for_the_same_call_later(traced) -> None:
    executed: list[int] = []
    pages = iter(range(1, 10))

    @step
    def next_page() -> int:
        executed.append(page := next(pages))
        return page

    @step
    def first_page() -> int:
        return next_page()

    @run(checkpoint_on_error=False)
    def job() -> list[int]:
        first_page()
        next_page()
        get_current_run_context().checkpoint(name="two pages")
        raise RuntimeError("crash")

    run_id = run_id_after_crash(traced, job)
    executed.clear()

    @run(name="job")  # the same program, changed
    def job_again() -> list[int]:
        return [first_page(), next_page(), next_page()]

    # the second next_page() got number 1 (its first call was served inside first_page without
    # being made), so it ran again, and the recorded page 2 went to the third call
    with multirun.resume(run_id=run_id):
        assert job_again() == [1, 2, 3]
    assert executed == [3]


def test_steps_nested_in_parallel_branches_replay_in_either_order(traced) -> None:
    import asyncio

    executed: list[int] = []

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        async def fetch(n: int) -> int:
            executed.append(n)
            await asyncio.sleep(0)
            return n * 10

        @step
        async def branch(n: int) -> int:
            a = await fetch(n)
            b = await fetch(n + 100)
            await asyncio.sleep(0.02 if n == 1 else 0.01)
            if n == 2:
                get_current_run_context().checkpoint(name="branch 2 fetched")
                if crash:
                    raise RuntimeError("crash")
            return a + b

        @run(checkpoint_on_error=False)
        async def job() -> list[int]:
            return list(await asyncio.gather(branch(1), branch(2)))

        return job

    with pytest.raises(RuntimeError):
        asyncio.run(program(crash=True)())
    run_id = traced.named("invoke_workflow job")[-1].attributes[attr.RUN_ID]
    executed.clear()
    # served children return at once, so one branch overtakes the recorded interleaving: that
    # raised "fetch came before branch" although the two branches ran side by side
    with multirun.resume(run_id=run_id):
        assert asyncio.run(program(crash=False)()) == [1020, 1040]
    assert executed == []


def test_a_failed_step_running_again_at_a_later_checkpoint_is_still_one_that_failed(traced) -> None:
    def program(primary_up: bool, die_in_primary: bool, die_at_end: bool):  # type: ignore[no-untyped-def]
        @step
        def primary(query: str) -> str:
            get_current_run_context().checkpoint(name="calling primary")
            if die_in_primary:
                raise RuntimeError("process killed")
            if not primary_up:
                raise ConnectionError("primary down")
            return "primary answer"

        @step
        def backup(query: str) -> str:
            return "backup answer"

        @step
        def summarize(text: str) -> str:
            return text.upper()

        @run(checkpoint_on_error=False)
        def job() -> str:
            try:
                answer = primary("q")
            except ConnectionError:
                answer = backup("q")
            summary = summarize(answer)
            get_current_run_context().checkpoint(name="summarized")
            if die_at_end:
                raise RuntimeError("process killed")
            return summary

        return job

    first = run_id_after_crash(traced, program(False, False, True))
    with multirun.resume(run_id=first):
        second = run_id_after_crash(traced, program(True, True, False))
    with multirun.resume(run_id=second):
        assert program(True, False, False)() == "PRIMARY ANSWER"


def test_a_result_the_program_changes_after_the_step_returned_is_replayed_as_returned(traced) -> None:
    @step
    def search(topic: str) -> list[str]:
        return [f"{topic} 1", f"{topic} 2"]

    @run(checkpoint_on_error=False)
    def job() -> None:
        sources = search("otel")
        sources.append("my own note")  # the log used to hold this very list
        get_current_run_context().checkpoint(name="searched")
        raise RuntimeError("crash")

    run_id = run_id_after_crash(traced, job)

    @run(name="job")  # the same program, changed
    def job_again() -> list[str]:
        return search("otel")

    with multirun.resume(run_id=run_id):
        assert job_again() == ["otel 1", "otel 2"]


def test_an_agent_called_outside_any_run_resumes_like_a_run(traced) -> None:
    from multirun import agent

    executed: list[int] = []

    @step(checkpoint=True)
    def fetch(n: int) -> int:
        executed.append(n)
        return n

    @agent
    def researcher(crash: bool) -> int:
        first = fetch(1)
        if crash:
            raise RuntimeError("crash")
        return first + fetch(2)

    with pytest.raises(RuntimeError):
        researcher(True)
    run_id = traced.named("invoke_workflow researcher")[-1].attributes[attr.RUN_ID]
    executed.clear()
    with multirun.resume(run_id=run_id):  # it used to be ignored: fetch(1) ran again
        assert researcher(False) == 3
    assert executed == [2]


def test_a_step_result_left_out_of_the_checkpoint_is_a_warning_naming_the_step_once(traced, caplog) -> None:
    class Answer:  # no JSON form
        def __init__(self, text: str) -> None:
            self.text = text

    @step
    def ask(question: str) -> Answer:
        return Answer("42")

    @run
    def job() -> None:
        ctx = get_current_run_context()
        for question in ("a", "b", "c"):
            ask(question)
            ctx.checkpoint(name=f"after {question}")

    with caplog.at_level(logging.WARNING, logger="multirun"):
        job()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "'ask'" in warnings[0] and "runs (and is paid for) again" in warnings[0]
    assert "Answer has no JSON form" in warnings[0]


def test_a_failed_step_resumed_with_fixed_inputs_runs_and_the_rest_runs_afresh(traced, caplog) -> None:
    calls = Calls()

    @step
    def search(query: str) -> list[str]:
        calls("search")
        return ["d1", "d2"]

    @step(kind=StepKind.LLM_CALL)
    def summarize(docs: list[str], max_words: int) -> str:
        calls("summarize")
        if max_words < 10:
            raise ValueError("max_words too small for the model")
        return f"summary of {len(docs)} in {max_words} words"

    @run
    def job(max_words: int) -> str:
        return summarize(search("q"), max_words=max_words)

    with pytest.raises(ValueError):
        job(5)
    run_id = traced.named("invoke_workflow job")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    with multirun.resume(run_id=run_id), caplog.at_level(logging.INFO, logger="multirun"):
        # the failed call has no result to serve in place of the fixed one: no DeterminismError
        assert job(50) == "summary of 2 in 50 words"
    assert calls.log == ["summarize"]  # search was served
    assert "which failed in the restored run, is called with other inputs" in caplog.text


class _SdkClient:
    """Stands for an LLM SDK client an agent holds: an object with no JSON form."""


def test_steps_that_are_methods_of_an_agent_class_are_served_after_a_restore(traced) -> None:
    calls = Calls()

    class Researcher:
        def __init__(self, model: str) -> None:
            self.client = _SdkClient()  # the instance has no JSON form
            self.model = model

        @step(kind=StepKind.LLM_CALL)
        def ask(self, question: str) -> str:
            calls(f"{self.model}: {question}")
            multirun.report_usage("gpt-4o-mini", input_tokens=1000, output_tokens=100)
            return f"{self.model} answers {question}"

        @step
        @classmethod
        def plan(cls, topic: str) -> list[str]:
            calls(f"plan {topic}")
            return [f"{topic} a", f"{topic} b"]

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @run(name="research", checkpoint_on_error=True)
        def research(topic: str) -> list[str]:
            agent = Researcher("gpt-4o-mini")
            answers = [agent.ask(question) for question in Researcher.plan(topic)]
            if crash:
                raise RuntimeError("crash after the answers")
            return answers

        return research

    with pytest.raises(RuntimeError):
        program(crash=True)("otel")
    run_id = traced.span("invoke_workflow research").attributes[attr.RUN_ID]
    assert len(calls.log) == 3
    calls.log.clear()
    traced.exporter.clear()

    with multirun.resume(run_id=run_id):
        answers = program(crash=False)("otel")

    assert answers == ["gpt-4o-mini answers otel a", "gpt-4o-mini answers otel b"]
    assert calls.log == []  # served from the checkpoint: not run, not paid for again
    assert traced.span("invoke_workflow research").attributes[attr.TOKENS_USED] == 2200  # not 4,400


def test_a_checkpoint_warns_once_of_each_step_it_cannot_serve_after_a_restore(traced, caplog) -> None:
    class Client:  # an SDK client: no JSON form, so the call has no input hash
        pass

    @step
    def ask(client: Client, prompt: str) -> str:
        return prompt.upper()

    @step
    def plain(prompt: str) -> str:
        return prompt

    @run
    def main() -> None:
        client = Client()
        for prompt in ("a", "b"):
            ask(client, prompt)
            plain(prompt)
            get_current_run_context().checkpoint(name=f"after_{prompt}")

    with caplog.at_level(logging.WARNING):
        main()
    warnings = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert len(warnings) == 1 and "'ask'" in warnings[0] and "'plain'" not in warnings[0]


# ---------------------------------------------------------------------------
# a checkpoint is continued only by a run of the name that took it


def search_program(calls: Calls):  # type: ignore[no-untyped-def]
    """A step that records its calls, checkpointed after each one."""

    @step(checkpoint=True)
    def search(topic: str) -> list[str]:
        calls("search " + topic)
        return [f"{topic} 1", f"{topic} 2"]

    return search


def test_resume_refuses_a_run_of_another_name_and_names_both(traced) -> None:
    calls = Calls()
    search = search_program(calls)

    @run(name="crew")
    def crew(crash: bool) -> list[str]:
        found = search("otel")
        if crash:
            raise RuntimeError("crash")
        return found

    @run(name="billing")
    def billing() -> list[str]:
        calls("billing ran")
        return search("otel")

    with pytest.raises(RuntimeError):
        crew(True)
    run_id = traced.named("invoke_workflow crew")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    with multirun.resume(run_id=run_id):
        # it used to continue crew's checkpoint: billing got crew's state and its served steps
        with pytest.raises(CheckpointError) as refused:
            billing()
        assert calls.log == []  # refused before its function ran
        message = str(refused.value)
        assert "'billing'" in message and "'crew'" in message and run_id in message
        assert "run_name='billing'" in message  # how to continue it under this name anyway
        # the resume is still pending: the run that took the checkpoint continues it
        assert crew(False) == ["otel 1", "otel 2"]
    assert calls.log == []  # search was served from the checkpoint
    assert traced.named("invoke_workflow billing") == []  # no span of a run that never began
    resumed = traced.named("invoke_workflow crew")[-1]
    assert resumed.attributes[attr.RUN_RESUMED_FROM] == run_id


def test_resume_continues_a_renamed_run_when_run_name_says_so(traced) -> None:
    calls = Calls()
    search = search_program(calls)

    @run(name="crew")
    def crew() -> None:
        search("otel")
        raise RuntimeError("crash")

    @run(name="crew-v2")
    def crew_v2() -> list[str]:
        return search("otel")

    with pytest.raises(RuntimeError):
        crew()
    run_id = traced.named("invoke_workflow crew")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    with multirun.resume(run_id=run_id, run_name="crew-v2"):
        with pytest.raises(CheckpointError, match="'crew' cannot continue"):
            crew()  # once run_name is given, it is the name that continues it
        assert crew_v2() == ["otel 1", "otel 2"]
    assert calls.log == []
    resumed = traced.named("invoke_workflow crew-v2")[-1]
    assert resumed.attributes[attr.RUN_RESUMED_FROM] == run_id


def crashed_crew(traced, calls: Calls):  # type: ignore[no-untyped-def]
    """A run named crew, checkpointed after its step, that crashed once; it and its run id."""
    search = search_program(calls)

    @run(name="crew")
    def crew(crash: bool = False) -> list[str]:
        found = search("otel")
        if crash:
            raise RuntimeError("crash")
        return found

    with pytest.raises(RuntimeError):
        crew(True)
    calls.log.clear()
    return crew, traced.named("invoke_workflow crew")[-1].attributes[attr.RUN_ID]


def not_resumed_warnings(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if "was not resumed" in r.getMessage()]


def test_a_resume_block_that_no_run_took_says_the_run_was_not_resumed(traced, caplog) -> None:
    # the block ended quietly: the user took the run as resumed, and its checkpoint lay unused
    caplog.set_level(logging.WARNING, logger="multirun")
    calls = Calls()
    crew, run_id = crashed_crew(traced, calls)

    @run(name="crew-v2")
    def crew_v2() -> list[str]:
        return ["renamed"]

    with multirun.resume(run_id=run_id) as restored, pytest.raises(CheckpointError):
        crew_v2()  # the run renamed since, refused; the program carried on
    checkpoint = restored.checkpoint
    assert not_resumed_warnings(caplog) == [
        f"multirun: run {run_id} was not resumed: the multirun.resume block ended before a @run "
        f"named 'crew' continued it from checkpoint {checkpoint.id} ({checkpoint.name}). Check that "
        "the block calls the function of that run; run 'crew-v2' was refused: if it is that run "
        "renamed, say so with multirun.resume(..., run_name='crew-v2')"
    ]
    assert traced.named("invoke_workflow crew-v2") == []

    caplog.clear()
    with multirun.resume(run_id=run_id):
        pass  # no run at all
    [warning] = not_resumed_warnings(caplog)
    assert warning.endswith(
        "Check that the block calls the function of that run; if the run was renamed since, give "
        'its new name with multirun.resume(..., run_name="NEW NAME")'
    )

    caplog.clear()
    with multirun.resume(run_id=run_id, run_name="crew-v2"), pytest.raises(CheckpointError):
        crew()  # refused, as run_name names another run; the program carried on
    [warning] = not_resumed_warnings(caplog)
    assert "before a @run named 'crew-v2' continued it" in warning
    assert "run_name" not in warning.split("continued it", 1)[1]  # the user already named it


def test_a_resume_block_whose_run_took_it_or_that_raised_adds_no_warning(traced, caplog) -> None:
    calls = Calls()
    crew, run_id = crashed_crew(traced, calls)
    with caplog.at_level(logging.WARNING, logger="multirun"):
        with multirun.resume(run_id=run_id):
            assert crew() == ["otel 1", "otel 2"]
        assert calls.log == []  # served: it was resumed
        # the refusal, or whatever else ended the block, is the program's error already
        with pytest.raises(CheckpointError), multirun.resume(run_id=run_id):

            @run(name="billing")
            def billing() -> None:
                return None

            billing()
        with pytest.raises(KeyError), multirun.resume(run_id=run_id):
            raise KeyError("before the run")
    assert not_resumed_warnings(caplog) == []


async def test_a_resume_block_in_async_code_knows_a_task_started_in_it_took_it(traced, caplog) -> None:
    import asyncio

    calls = Calls()
    search = search_program(calls)

    @run(name="crew")
    async def crew(crash: bool = False) -> list[str]:
        found = search("otel")
        if crash:
            raise RuntimeError("crash")
        return found

    with pytest.raises(RuntimeError):
        await crew(True)
    run_id = traced.named("invoke_workflow crew")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        with multirun.resume(run_id=run_id):  # the task runs in a copy of this context
            assert await asyncio.gather(crew(), asyncio.sleep(0)) == [["otel 1", "otel 2"], None]
        assert calls.log == [] and not_resumed_warnings(caplog) == []

        async def elsewhere() -> None:  # a block of its own in each task: each says of its own
            with multirun.resume(run_id=run_id):
                await asyncio.sleep(0)

        await asyncio.gather(elsewhere(), crew())
    assert len(not_resumed_warnings(caplog)) == 1


@pytest.mark.parametrize("run_name", ["", 42])
def test_resume_refuses_a_run_name_that_is_not_a_name(traced, run_name: object) -> None:
    with (
        pytest.raises(multirun.ConfigurationError, match="run_name"),
        multirun.resume(run_id="anything", run_name=run_name),  # type: ignore[arg-type]
    ):
        pass


def resume_from_the_environment(monkeypatch, value: str) -> None:  # type: ignore[no-untyped-def]
    """``MULTIRUN_RESUME=value``, read afresh by the next run (as in a new process)."""
    from multirun.checkpoints import resume as resume_module

    monkeypatch.setattr(resume_module, "_environment_read", False)
    monkeypatch.setattr(resume_module, "_from_environment", None)
    monkeypatch.setenv("MULTIRUN_RESUME", value)


@pytest.mark.parametrize("value", ["../etc", "0000nosuchrun"], ids=["not an id", "no such run"])
def test_a_bad_multirun_resume_is_refused_naming_the_variable(traced, monkeypatch, value: str) -> None:
    # the program's code never named the id: the error must say where it came from

    @run(name="crew")
    def crew() -> None:
        return None

    resume_from_the_environment(monkeypatch, value)
    with pytest.raises(CheckpointError) as refused:
        crew()
    assert str(refused.value).startswith(f"MULTIRUN_RESUME={value!r}: "), refused.value


def assert_the_suggested_command_resumes(message: str, checkpoint_id: str, store, monkeypatch, capfd) -> None:  # type: ignore[no-untyped-def]
    """The `multirun resume ...` that ``message`` suggests, pasted in another folder with none
    of this process's MULTIRUN_ variables, resumes ``checkpoint_id`` of ``store`` (a store the
    program chose in code, not ./.multirun)."""
    from multirun.cli.main import main

    [suggested] = re.findall(r"`(multirun resume [^`]*)`", message)
    words = shlex.split(suggested)
    assert words[-2:] == ["--", "..."], suggested
    monkeypatch.chdir(store.exporter.directory.parent.parent)  # no ./.multirun here
    for variable in (
        "MULTIRUN_RESUME",
        "MULTIRUN_RESUME_RUN_NAME",
        "MULTIRUN_DIR",
        "MULTIRUN_CHECKPOINT_URI",
    ):
        monkeypatch.delenv(variable, raising=False)
    capfd.readouterr()
    assert main([*words[1:-1], sys.executable, "-c", "pass"]) == 1  # this program starts no run
    assert f"from checkpoint {checkpoint_id}" in capfd.readouterr().err.splitlines()[0]


def test_a_resume_whose_newest_checkpoint_is_damaged_suggests_a_command_that_reads_its_store(
    traced, monkeypatch, capfd
) -> None:
    # the suggested `multirun resume ID -- ...` left out the store: pasted, it read ./.multirun
    @run
    def job() -> None:
        ctx = get_current_run_context()
        ctx.checkpoint(name="one")
        ctx.checkpoint(name="two")

    job()
    run_id = traced.named("invoke_workflow job")[-1].attributes[attr.RUN_ID]
    store = traced.client.checkpoints
    first, second = (found.checkpoint_id for found in stored_checkpoints(store.list(run_id)))
    path = store.exporter.directory / store.find(second)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError) as refused, multirun.resume(run_id=run_id):
        pass
    assert f"multirun.resume(checkpoint_id={first!r})" in str(refused.value)
    assert_the_suggested_command_resumes(str(refused.value), first, store, monkeypatch, capfd)


def test_multirun_resume_in_the_environment_refuses_a_run_of_another_name(traced, monkeypatch, capfd) -> None:
    from multirun.checkpoints import resume as resume_module

    calls = Calls()
    search = search_program(calls)

    @run(name="crew")
    def crew() -> list[str]:
        return search("otel")

    @run(name="billing")
    def billing() -> list[str]:
        return search("otel")

    crew()
    run_id = traced.named("invoke_workflow crew")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    resume_from_the_environment(monkeypatch, run_id)
    with pytest.raises(CheckpointError) as refused:
        billing()
    message = str(refused.value)
    assert "'billing'" in message and "'crew'" in message
    assert "--run-name billing" in message and "MULTIRUN_RESUME_RUN_NAME" in message

    monkeypatch.setattr(resume_module, "_environment_read", False)
    monkeypatch.setenv("MULTIRUN_RESUME_RUN_NAME", "billing")
    assert billing() == ["otel 1", "otel 2"]
    assert calls.log == []  # served from crew's checkpoint, as asked
    # what the refusal suggested, pasted in a shell: it reads the store the program chose
    [checkpoint_id] = [found.checkpoint_id for found in stored_checkpoints(traced.client.checkpoints.list())]
    assert_the_suggested_command_resumes(
        message, checkpoint_id, traced.client.checkpoints, monkeypatch, capfd
    )


def test_a_resume_taken_file_that_cannot_be_written_costs_the_program_nothing(
    traced, monkeypatch, tmp_path
) -> None:
    # `multirun resume` names the file; a program run with a stale or odd one still resumes

    calls = Calls()
    search = search_program(calls)

    @run(name="crew")
    def crew() -> list[str]:
        return search("otel")

    crew()
    run_id = traced.named("invoke_workflow crew")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    resume_from_the_environment(monkeypatch, run_id)
    monkeypatch.setenv("MULTIRUN_RESUME_TAKEN_FILE", str(tmp_path))  # a folder: cannot be opened
    assert crew() == ["otel 1", "otel 2"]
    assert calls.log == []  # served from the checkpoint


@pytest.mark.parametrize("decorate", [checkpoint, step(checkpoint=True)], ids=["checkpoint", "step"])
@pytest.mark.parametrize("how", ["closed", "read to the end"])
def test_a_generator_that_ends_after_its_run_takes_no_checkpoint(traced, caplog, decorate, how) -> None:
    """The run is over: no checkpoint of it is written, and nothing is written to its ended span
    (the OpenTelemetry SDK would warn about an event added to an ended span)."""

    @decorate
    def numbers():  # type: ignore[no-untyped-def]
        yield 1
        yield 2

    runs: list[RunContext] = []

    @run
    def job():  # type: ignore[no-untyped-def]
        runs.append(get_current_run_context())
        stream = numbers()
        next(stream)
        return stream  # handed back to the caller, part-read

    stream = job()
    with caplog.at_level(logging.DEBUG):
        if how == "closed":
            stream.close()
        else:
            assert list(stream) == [2]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert runs[0].run.checkpoints == []
    assert not any(e.name == attr.EVENT_CHECKPOINT for s in traced.spans() for e in s.events)


def test_a_checkpoint_the_program_takes_after_its_run_ended_is_written_quietly(traced, caplog) -> None:
    """``ctx.checkpoint()`` called by the program itself, after its run ended: written as asked,
    with no event on the run's ended span (the OpenTelemetry SDK would warn about one)."""
    ctx = RunContext(traced.client, Run(name="late"))
    with ctx:
        ctx.set_state("answer", 42)
    with caplog.at_level(logging.WARNING):
        meta = ctx.checkpoint(name="after").value
    assert [r.getMessage() for r in caplog.records] == []
    assert traced.client.checkpoints.load(meta.id).state == {"answer": 42}


@pytest.mark.parametrize("how", ["ThreadPoolExecutor", "asyncio.to_thread"])
def test_tasks_a_thread_pool_ran_one_after_another_in_a_worker_replay_in_any_order(traced, how) -> None:
    """A pool worker runs task after task: they ran side by side all the same, so a resumed run
    whose pool schedules them otherwise is served, with no DeterminismError."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    executed: list[int] = []
    first_done = threading.Event()

    @step
    def fetch(n: int) -> str:
        executed.append(n)
        return f"page {n}"

    def task(n: int, overtaken: bool) -> str:
        if overtaken and n == 0:
            first_done.wait(5)  # the pool's other worker fetches page 1 first
        page = fetch(n)
        first_done.set()
        return page

    def program(workers: int, overtaken: bool):  # type: ignore[no-untyped-def]
        @run(name="pages")
        def pages() -> list[str]:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                if how == "ThreadPoolExecutor":
                    found = list(pool.map(task, [0, 1], [overtaken] * 2))
                else:

                    async def both() -> list[str]:
                        asyncio.get_running_loop().set_default_executor(pool)
                        return list(
                            await asyncio.gather(*(asyncio.to_thread(task, n, overtaken) for n in (0, 1)))
                        )

                    found = asyncio.run(both())
            get_current_run_context().checkpoint(name="fetched")
            if not overtaken:
                raise RuntimeError("crash")
            return found

        return pages

    run_id = run_id_after_crash(traced, program(workers=1, overtaken=False))  # one worker: 0 then 1
    assert executed == [0, 1]
    executed.clear()
    first_done.clear()
    with multirun.resume(run_id=run_id):
        assert program(workers=2, overtaken=True)() == ["page 0", "page 1"]
    assert executed == []


def test_a_resumed_runs_model_carries_the_restored_spend_from_its_start(traced) -> None:
    """``ctx.run.tokens_used`` and ``cost_usd`` say what ``ctx.tokens_used`` says, before any step."""
    calls = Calls()
    with pytest.raises(ConnectionError):
        crew_program(calls, fail_at_end=True)("otel")
    run_id = traced.span("invoke_workflow crew").attributes[attr.RUN_ID]
    seen: list[tuple[int, float, int, float]] = []

    @run(name="crew")
    def crew() -> None:
        ctx = get_current_run_context()
        seen.append((ctx.run.tokens_used, ctx.run.cost_usd, ctx.tokens_used, ctx.cost_usd))

    @run(name="other")
    def other() -> None:
        ctx = get_current_run_context()
        ctx.restore_from_checkpoint(traced.client.checkpoints.latest(run_id))
        seen.append((ctx.run.tokens_used, ctx.run.cost_usd, ctx.tokens_used, ctx.cost_usd))

    with multirun.resume(run_id=run_id):
        crew()
    other()
    for tokens, cost, ledger_tokens, ledger_cost in seen:
        assert (tokens, cost) == (ledger_tokens, ledger_cost)
        assert tokens == 1100 and cost > 0


def test_a_step_around_served_llm_calls_that_returns_their_responses_is_not_charged_again(
    traced, tmp_path
) -> None:
    """With the pickle serializer a served step gives back the SDK response itself: a step
    around it that runs again (idempotent=False, or running at the checkpoint) and returns it,
    alone or in a list, must not charge its usage a second time."""
    from openai.types.chat import ChatCompletion

    multirun.init(
        tracer_provider=traced.provider,
        checkpoint_uri=str(tmp_path / "pickled"),
        checkpoint_serializer="pickle",
        checkpoint_hmac_key="a test key of at least sixteen bytes",
    )
    calls = Calls()

    def response(n: int) -> ChatCompletion:
        return ChatCompletion.model_validate(
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": 1_730_000_000,
                "model": "gpt-4o-mini",
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }
        )

    @step(kind=StepKind.LLM_CALL)
    def chat(n: int) -> ChatCompletion:
        calls(f"chat {n}")
        return response(n)

    @step(idempotent=False)
    def turn(n: int) -> ChatCompletion:
        return chat(n)

    @step(idempotent=False)
    def turn_by_hand(n: int) -> ChatCompletion:  # its LLM call a step made by hand
        agent = get_current_agent_context()
        found, result = agent.get_step_result("chat", (n,), {})
        if not found:
            made = agent.start_step("chat", kind=StepKind.LLM_CALL, input_args=(n,), input_kwargs={})
            calls(f"chat {n}")
            result = response(n)
            made.complete(result)
        return result

    @step(idempotent=False)
    def both_turns() -> list[ChatCompletion]:
        return [chat(2), chat(3)]

    spent: list[int] = []

    @run(name="agent")
    def agent_loop(crash: bool) -> None:
        turn(1)
        both_turns()
        turn_by_hand(4)
        spent.append(get_current_run_context().tokens_used)
        if crash:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        agent_loop(True)
    run_id = traced.named("invoke_workflow agent")[-1].attributes[attr.RUN_ID]
    assert spent == [440] and calls.log == ["chat 1", "chat 2", "chat 3", "chat 4"]
    with multirun.resume(run_id=run_id):
        agent_loop(False)
    assert spent == [440, 440]  # nothing paid again
    assert calls.log == ["chat 1", "chat 2", "chat 3", "chat 4"]


class _GetOnlyExporter:
    """A third-party exporter with the four operations alone: no ``read_start``."""

    def __init__(self) -> None:
        self.inner = MemoryBlobExporter("get-only")
        self.gets = 0

    def put(self, key: str, data: bytes) -> str:
        return self.inner.put(key, data)

    def get(self, uri: str) -> bytes:
        self.gets += 1
        return self.inner.get(uri)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def _one_checkpoint_named_fetched(traced, exporter) -> tuple[CheckpointStore, str]:
    """A store on ``exporter`` holding the one checkpoint of a run, named "fetched"; its key."""
    store = CheckpointStore(exporter)
    traced.client.checkpoints = store

    @checkpoint(name="fetched")
    def fetched(values: list[int]) -> list[int]:
        return values

    @run
    def job() -> None:
        fetched([1, 2])

    job()
    [key] = store.list()
    return store, key


@pytest.mark.parametrize(
    "exporter", [MemoryBlobExporter("named"), _GetOnlyExporter()], ids=["read_start", "get"]
)
def test_a_checkpoint_is_named_by_the_start_of_its_blob(traced, exporter) -> None:
    store, key = _one_checkpoint_named_fetched(traced, exporter)
    if isinstance(exporter, _GetOnlyExporter):
        # it cannot read a blob's start: a listing leaves the name blank rather than fetch
        # every blob whole (a checkpoint may be up to max_blob_bytes)
        assert store.name_of(key) is None and exporter.gets == 0
    else:
        assert store.name_of(key) == "fetched"


class _ReadStartLog(MemoryBlobExporter):
    """The in-memory exporter, noting how many bytes each ``read_start`` asked for."""

    def __init__(self) -> None:
        super().__init__("read-start-log")
        self.asked: list[int] = []

    def read_start(self, uri: str, size: int) -> bytes:
        self.asked.append(size)
        return super().read_start(uri, size)


def test_a_listing_does_not_read_a_meta_section_a_header_says_is_huge(traced) -> None:
    # a blob's header may declare a meta section of up to max_blob_bytes (1 GiB): naming it
    # in a listing read that much, for every such blob
    exporter = _ReadStartLog()
    store, key = _one_checkpoint_named_fetched(traced, exporter)
    assert store.name_of(key) == "fetched"
    blob = exporter.get(key)
    declared = re.search(rb'"meta_size":(\d+)', blob)
    assert declared is not None
    exporter.delete(key)
    exporter.put(key, blob.replace(declared.group(0), b'"meta_size":%d' % (512 << 20), 1))
    exporter.asked.clear()
    assert store.name_of(key) is None  # not named, as a blob without a meta section is not
    assert max(exporter.asked) < 1 << 20, exporter.asked


def test_runs_named_per_request_do_not_grow_the_count_of_runs_by_name_for_good(traced) -> None:
    """Top runs are counted by name for ``multirun resume``; names made per request stop being
    counted past a limit, rather than holding memory for the life of the process."""
    import multirun.context as context_module

    context_module.top_runs_started.clear()
    limit = context_module._MAX_COUNTED_RUN_NAMES
    for index in range(limit + 50):
        with RunContext(traced.client, Run(name=f"request-{index}")):
            pass
    assert len(context_module.top_runs_started) == limit
    context_module.top_runs_started.clear()
