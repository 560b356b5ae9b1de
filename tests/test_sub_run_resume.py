"""A run started inside another run (a sub-run) is checkpointed and resumed with it."""

from __future__ import annotations

import asyncio
import threading

import pytest

import multirun
from multirun import run, step
from multirun.context import get_current_run_context
from multirun.errors import BudgetExceededError
from multirun.models import Budget
from multirun.telemetry import attributes as attr


class Calls:
    def __init__(self) -> None:
        self.log: list[str] = []

    def __call__(self, name: str) -> None:
        self.log.append(name)


def research_program(calls: Calls, *, crash: str = ""):  # type: ignore[no-untyped-def]
    """A crew run whose research is a sub-run of two LLM-ish steps; it can crash at three places."""

    @step(checkpoint=True)
    def search(topic: str) -> list[str]:
        calls("search")
        return [f"{topic} 1", f"{topic} 2"]

    @step
    def summarize(found: list[str]) -> str:
        calls("summarize")
        ctx = get_current_run_context()
        ctx.set_state("summarized", len(found))
        if crash == "in sub-run":
            raise RuntimeError("crash in the sub-run")
        return " / ".join(found)

    @step
    def publish(text: str) -> str:
        calls("publish")
        return f"published {text}"

    @run(checkpoint_on_error=False)  # as if the process were killed
    def research(topic: str) -> str:
        get_current_run_context().set_state("topic", topic)
        return summarize(search(topic))

    @run(checkpoint_on_error=False)
    def crew(topic: str) -> str:
        summary = research(topic)
        get_current_run_context().checkpoint(name="researched")
        if crash == "after sub-run":
            raise RuntimeError("crash after the sub-run")
        return publish(summary)

    return crew


def crashed_run_id(traced, job, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError):
        job(*args)
    return traced.named(f"invoke_workflow {job.__name__}")[-1].attributes[attr.RUN_ID]


def test_a_completed_sub_run_is_not_run_again_when_its_parent_resumes(traced) -> None:
    calls = Calls()
    first = crashed_run_id(traced, research_program(calls, crash="after sub-run"), "otel")
    assert calls.log == ["search", "summarize"]

    calls.log.clear()
    with multirun.resume(run_id=first):
        assert research_program(calls)("otel") == "published otel 1 / otel 2"
    assert calls.log == ["publish"]  # the sub-run's steps were served, not paid for again
    research = traced.named("invoke_workflow research")[-1]
    assert research.attributes[attr.RUN_REPLAYING] is True
    spans = traced.exporter.get_finished_spans()
    skipped = [s for s in spans if s.attributes.get(attr.STEP_STATUS) == "skipped"]
    assert sorted(s.attributes[attr.STEP_NAME] for s in skipped) == ["search", "summarize"]


def test_a_sub_run_that_crashed_resumes_from_its_own_checkpoint_through_its_parent(traced) -> None:
    calls = Calls()
    first = crashed_run_id(traced, research_program(calls, crash="in sub-run"), "otel")
    # search's checkpoint (taken in the sub-run) belongs to the top run: it is the one resumed
    assert traced.client.checkpoints.latest(first)

    calls.log.clear()
    with multirun.resume(run_id=first):
        assert research_program(calls)("otel") == "published otel 1 / otel 2"
    assert calls.log == ["summarize", "publish"]  # search returned before the checkpoint


def test_a_resumed_sub_run_gets_its_state_back(traced) -> None:
    calls = Calls()
    seen: dict[str, object] = {}

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        def work() -> int:
            calls("work")
            return 1

        @run(checkpoint_on_error=False)
        def inner() -> int:
            ctx = get_current_run_context()
            seen["before"] = ctx.get_state("progress")
            ctx.set_state("progress", "half")
            return work()

        @run(checkpoint_on_error=False)
        def outer() -> int:
            result = inner()
            get_current_run_context().checkpoint(name="after inner")
            if crash:
                raise RuntimeError("crash")
            return result

        return outer

    first = crashed_run_id(traced, program(crash=True))
    assert seen["before"] is None
    with multirun.resume(run_id=first):
        assert program(crash=False)() == 1
    assert seen["before"] == "half"  # the sub-run starts again from its own state
    assert calls.log == ["work"]


def test_a_resumed_sub_run_never_gets_its_budget_back(traced) -> None:
    calls = Calls()

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        def work(n: int) -> int:
            calls(f"work {n}")
            return n

        @run(budget=Budget(max_steps=3), checkpoint_on_error=False)
        def inner() -> list[int]:
            done = [work(1), work(2)]
            get_current_run_context().checkpoint(name="two done")
            if crash:
                raise RuntimeError("crash")
            done.append(work(3))
            done.append(work(4))  # the fourth step is over the sub-run's limit of 3
            return done

        @run(checkpoint_on_error=False)
        def outer() -> list[int]:
            return inner()

        return outer

    first = crashed_run_id(traced, program(crash=True))
    calls.log.clear()
    with multirun.resume(run_id=first), pytest.raises(BudgetExceededError) as refused:
        program(crash=False)()
    assert calls.log == ["work 3"]  # served 1 and 2 count: a fourth step would be over
    assert refused.value.limit == "max_steps"


def test_a_sub_run_checkpoint_is_listed_on_both_runs_and_stored_under_the_top_run(traced) -> None:
    runs = {}

    @run
    def inner() -> None:
        runs["inner"] = get_current_run_context()
        get_current_run_context().checkpoint(name="from inner")

    @run
    def outer() -> None:
        runs["outer"] = get_current_run_context()
        inner()

    outer()
    inner_run, outer_run = runs["inner"].run, runs["outer"].run
    [meta] = inner_run.checkpoints
    assert outer_run.checkpoints == [meta]
    assert outer_run.latest_checkpoint_id == inner_run.latest_checkpoint_id == meta.id
    assert meta.run_id == outer_run.id


def test_extra_state_of_a_sub_run_checkpoint_comes_back_to_that_sub_run(traced) -> None:
    seen: list[object] = []

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @run(checkpoint_on_error=False)
        def inner() -> None:
            ctx = get_current_run_context()
            seen.append(ctx.get_state("cursor"))
            ctx.checkpoint(name="cursor", extra_state={"cursor": 41})
            if crash:
                raise RuntimeError("crash")

        @run(checkpoint_on_error=False)
        def outer() -> None:
            inner()
            seen.append(get_current_run_context().get_state("cursor"))

        return outer

    first = crashed_run_id(traced, program(crash=True))
    with multirun.resume(run_id=first):
        program(crash=False)()
    assert seen == [None, 41, None]  # the sub-run's, not the top run's


def test_sub_runs_side_by_side_are_each_restored(traced) -> None:
    calls = Calls()

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        async def fetch(source: str) -> str:
            calls(f"fetch {source}")
            await asyncio.sleep(0)
            return source.upper()

        @run(checkpoint_on_error=False)
        async def read(source: str) -> str:
            first = await fetch(source)
            return first + await fetch(source + "!")

        @run(checkpoint_on_error=False)
        async def outer() -> list[str]:
            results = await asyncio.gather(read("a"), read("b"))
            get_current_run_context().checkpoint(name="read both")
            if crash:
                raise RuntimeError("crash")
            return list(results)

        return outer

    with pytest.raises(RuntimeError):
        asyncio.run(program(crash=True)())
    first = traced.named("invoke_workflow outer")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    with multirun.resume(run_id=first):
        assert asyncio.run(program(crash=False)()) == ["AA!", "BB!"]
    assert calls.log == []


def test_a_resumed_run_with_a_sub_run_can_be_resumed_again(traced) -> None:
    calls = Calls()

    def program(crash_at: int):  # type: ignore[no-untyped-def]
        @step
        def work(n: int) -> int:
            calls(f"work {n}")
            return n

        @run(checkpoint_on_error=False)
        def inner(n: int) -> int:
            total = work(n)
            get_current_run_context().checkpoint(name=f"inner {n}")
            if crash_at == n:
                raise RuntimeError(f"crash {n}")
            return total + work(n + 10)

        @run(checkpoint_on_error=False)
        def outer() -> int:
            return inner(1) + inner(2)

        return outer

    first = crashed_run_id(traced, program(crash_at=1))
    assert calls.log == ["work 1"]
    calls.log.clear()
    with multirun.resume(run_id=first):
        second = crashed_run_id(traced, program(crash_at=2))
    assert calls.log == ["work 11", "work 2"]
    calls.log.clear()
    with multirun.resume(run_id=second):
        assert program(crash_at=0)() == 1 + 11 + 2 + 12
    assert calls.log == ["work 12"]


def test_a_sub_run_inside_a_step_that_was_running_runs_again_with_its_steps_served(traced) -> None:
    calls = Calls()

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step(checkpoint=True)
        def draft(n: int) -> int:
            calls(f"draft {n}")
            return n

        @run(checkpoint_on_error=False)
        def writer(n: int) -> int:
            return draft(n) + draft(n + 1)

        @step
        def plan() -> int:
            calls("plan")
            written = writer(1)
            if crash:
                raise RuntimeError("crash in plan, after the sub-run")
            return written

        @run(checkpoint_on_error=False)
        def outer() -> int:
            return plan()

        return outer

    first = crashed_run_id(traced, program(crash=True))
    assert calls.log == ["plan", "draft 1", "draft 2"]
    calls.log.clear()
    with multirun.resume(run_id=first):
        assert program(crash=False)() == 3
    assert calls.log == ["plan"]  # plan was running: it runs again, and its sub-run's drafts are served


def test_a_sub_run_can_restore_a_checkpoint_of_its_own_choosing(traced) -> None:
    calls = Calls()

    @step
    def work(n: int) -> int:
        calls(f"work {n}")
        return n

    @run
    def standalone() -> int:
        value = work(7)
        get_current_run_context().checkpoint(name="standalone")
        return value

    @run
    def inner(checkpoint_id: str) -> int:
        get_current_run_context().restore_from_checkpoint(checkpoint_id)
        return work(7)

    @run
    def outer(checkpoint_id: str) -> int:
        return inner(checkpoint_id) + work(8)

    standalone()
    saved = traced.named("invoke_workflow standalone")[-1].attributes[attr.RUN_ID]
    calls.log.clear()
    assert outer(traced.client.checkpoints.latest(saved)) == 15
    assert calls.log == ["work 8"]  # work(7) served in the sub-run; the top run's own step ran


def test_a_sub_run_the_program_retried_is_answered_by_the_attempt_that_ended(traced) -> None:
    calls = Calls()
    failures = {"left": 1}

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        def flaky() -> str:
            calls("flaky")
            if failures["left"] > 0:
                failures["left"] -= 1
                raise ConnectionError("transient")
            return "data"

        @step
        def expensive(text: str) -> str:
            calls("expensive")
            return text + "!"

        @run(checkpoint_on_error=False)
        def inner() -> str:
            return flaky()

        @run(checkpoint_on_error=False)
        def outer() -> str:
            for _ in range(3):  # the program's own retry loop around the sub-run
                try:
                    got = inner()
                    break
                except ConnectionError:
                    continue
            done = expensive(got)
            get_current_run_context().checkpoint(name="done")
            if crash:
                raise RuntimeError("crash")
            return done

        return outer

    first = crashed_run_id(traced, program(crash=True))
    calls.log.clear()
    with multirun.resume(run_id=first):
        assert program(crash=False)() == "data!"
    assert calls.log == []  # the failed attempt is answered by the one that ended: nothing paid again


@pytest.mark.parametrize("per_attempt", ["asyncio.run", "create_task"])
def test_a_retry_made_in_a_new_task_each_attempt_answers_the_failed_call(traced, per_attempt) -> None:
    calls = Calls()
    failures = {"left": 1}

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        async def fetch(n: int) -> int:
            calls("fetch")
            if failures["left"] > 0:
                failures["left"] -= 1
                raise ConnectionError("transient")
            return n * 10

        @step
        def expensive(n: int) -> int:
            calls("expensive")
            return n + 1

        async def in_a_task() -> int:
            return await asyncio.create_task(fetch(1))

        @run(checkpoint_on_error=False)
        def outer() -> int:
            errors = []  # kept: the failed task stays alive, so the next one gets another id
            for _ in range(3):
                try:
                    value = asyncio.run(fetch(1) if per_attempt == "asyncio.run" else in_a_task())
                    break
                except ConnectionError as exc:
                    errors.append(exc)
            done = expensive(value)
            get_current_run_context().checkpoint(name="done")
            if crash:
                raise RuntimeError("crash")
            return done

        return outer

    first = crashed_run_id(traced, program(crash=True))
    calls.log.clear()
    with multirun.resume(run_id=first):
        assert program(crash=False)() == 11
    assert calls.log == []


def test_a_sub_run_the_resumed_program_no_longer_starts_is_skipped(traced) -> None:
    calls = Calls()

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @step
        def publish(notes: str) -> str:
            calls("publish")
            return notes

        @run(checkpoint_on_error=False)
        def research() -> str:
            return "notes"

        @run(checkpoint_on_error=False)
        def crew() -> str:
            ctx = get_current_run_context()
            if not ctx.get_state("researched"):  # a phase the restored state says is done
                ctx.set_state("notes", research())
                ctx.set_state("researched", True)
                ctx.checkpoint(name="researched")
            if crash:
                raise RuntimeError("crash")
            return publish(ctx.get_state("notes"))

        return crew

    first = crashed_run_id(traced, program(crash=True))
    with multirun.resume(run_id=first):
        assert program(crash=False)() == "notes"  # used to be a DeterminismError
    assert calls.log == ["publish"]


def test_sub_runs_of_one_name_side_by_side_each_get_their_own_state_back(traced) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from contextvars import copy_context

    seen: dict[str, object] = {}

    def program(crash: bool):  # type: ignore[no-untyped-def]
        @run(checkpoint_on_error=False)
        def inner(name: str) -> None:
            ctx = get_current_run_context()
            seen[name] = ctx.get_state("mine")
            ctx.set_state("mine", name)

        @run(checkpoint_on_error=False)
        def outer() -> None:
            with ThreadPoolExecutor(2) as pool:
                for future in [pool.submit(copy_context().run, inner, n) for n in ("b", "a")]:
                    future.result()
            get_current_run_context().checkpoint(name="both")
            if crash:
                raise RuntimeError("crash")

        return outer

    first = crashed_run_id(traced, program(crash=True))
    with multirun.resume(run_id=first):
        program(crash=False)()
    assert seen == {"a": "a", "b": "b"}


def test_a_sub_run_whose_state_cannot_be_written_does_not_cost_the_top_run_its_checkpoint(
    traced, caplog
) -> None:
    @run
    def inner() -> None:
        get_current_run_context().set_state("lock", threading.Lock())  # no JSON form

    @run
    def outer() -> None:
        inner()
        get_current_run_context().set_state("progress", 1)
        get_current_run_context().checkpoint(name="after inner")

    outer()
    outer_id = traced.named("invoke_workflow outer")[-1].attributes[attr.RUN_ID]
    restored = traced.client.checkpoints.load(traced.client.checkpoints.latest(outer_id))
    assert restored.state == {"progress": 1}
    assert "state of sub-run 'inner' has no json form" in caplog.text


def test_a_run_continued_in_a_worker_keeps_its_sub_runs_checkpoints_apart(traced) -> None:
    @run(checkpoint_on_error=False)
    def orchestrator() -> dict[str, str]:
        get_current_run_context().checkpoint(name="planned")
        return multirun.inject()

    @run
    def worker_job() -> None:
        raise ValueError("worker failed")  # checkpoint_on_error: a checkpoint of its own

    carrier = orchestrator()
    orchestrator_id = traced.named("invoke_workflow orchestrator")[-1].attributes[attr.RUN_ID]
    planned = traced.client.checkpoints.latest(orchestrator_id)
    with multirun.continue_run(carrier), pytest.raises(ValueError):
        worker_job()
    assert traced.client.checkpoints.latest(orchestrator_id) == planned


def test_a_sub_run_restores_a_checkpoint_it_took_itself(traced) -> None:
    calls = Calls()
    attempts = iter([RuntimeError("rate limited"), None])

    @step
    def fetch(n: int) -> int:
        calls(f"fetch {n}")
        return n * 10

    @step
    def flaky() -> str:
        calls("flaky")
        multirun.report_usage("gpt-4o", input_tokens=100, cost_usd=0.5)
        error = next(attempts)
        if error is not None:
            raise error
        return "ok"

    @run
    def inner() -> tuple[int, str]:
        ctx = get_current_run_context()
        fetched = fetch(1)
        ctx.set_state("fetched", fetched)
        saved = ctx.checkpoint(name="fetched").value.id
        ctx.set_state("fetched", "overwritten")
        try:
            return fetched, flaky()
        except RuntimeError:
            ctx.restore_from_checkpoint(saved)
        assert ctx.is_replaying and ctx.get_state("fetched") == 10
        assert ctx.tokens_used == 100  # the failed call's spend is not given back
        result = fetch(1), flaky()  # fetch(1) is served from the checkpoint
        assert ctx.tokens_used == 200
        return result

    @run
    def outer() -> tuple[int, str]:
        get_current_run_context().set_state("mine", "outer")
        result = inner()
        assert get_current_run_context().state == {"mine": "outer"}  # the sub-run's state stays its own
        return result

    assert outer() == (10, "ok")
    assert calls.log == ["fetch 1", "flaky", "flaky"]


def test_a_checkpoint_a_sub_run_took_restores_into_that_sub_run_in_a_later_run(traced) -> None:
    calls = Calls()

    @step
    def draft(topic: str) -> str:
        calls(f"draft {topic}")
        return f"draft of {topic}"

    @run
    def writer(checkpoint_id: str | None = None) -> str:
        ctx = get_current_run_context()
        if checkpoint_id:
            ctx.restore_from_checkpoint(checkpoint_id)
            assert ctx.get_state("topic") == "otters"
        else:
            ctx.set_state("topic", "otters")
        text = draft("otters")
        if not checkpoint_id:
            ctx.checkpoint(name="drafted")
        return text

    @run
    def editor(checkpoint_id: str | None = None) -> str:
        get_current_run_context().set_state("role", "editor")
        return writer(checkpoint_id)

    editor()
    first = traced.named("invoke_workflow editor")[-1].attributes[attr.RUN_ID]
    taken = traced.client.checkpoints.latest(first)
    calls.log.clear()
    assert editor(taken) == "draft of otters"
    assert calls.log == []  # the draft is served in the new sub-run


def test_restoring_the_top_runs_whole_checkpoint_into_a_sub_run_is_refused_clearly(traced) -> None:
    from multirun.errors import CheckpointError

    @run
    def inner(checkpoint_id: str) -> None:
        get_current_run_context().restore_from_checkpoint(checkpoint_id)

    @run
    def outer() -> None:
        inner(get_current_run_context().checkpoint(name="outer").value.id)

    with pytest.raises(CheckpointError, match="resume that run"):
        outer()
