"""Steps made by hand (``start_step`` ... ``complete``) in a resumed run: the replay cache
pattern of the reference (``get_step_result``, then the step only if it was not found)."""

from __future__ import annotations

import pytest

import multirun
from multirun import run, step
from multirun.context import get_current_agent_context, get_current_run_context
from multirun.models import StepKind, StepStatus
from multirun.telemetry import attributes as attr


class Model:
    """A stand-in for an LLM that counts its calls (and fails when told to)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.down = False

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if self.down:
            raise ConnectionError("model down")
        return f"summary of {prompt}"


async def call_llm(model: Model, prompt: str) -> str:
    """The reference's manual-step pattern, verbatim but for the model call."""
    agent_ctx = get_current_agent_context()
    found, result = await agent_ctx.get_step_result("call_llm", (prompt,), {})
    if found:
        return result  # cached from previous execution
    step_ctx = await agent_ctx.start_step(
        name="call_llm",
        kind=StepKind.LLM_CALL,
        input_args=(prompt,),
        input_kwargs={},
    )
    try:
        answer = model(prompt)
    except Exception as error:
        await step_ctx.fail(error)
        raise
    await step_ctx.complete(answer, tokens_used=500, cost_usd=0.01)
    return answer


def writer_program(model: Model, calls: list[str], *, publish_fails: bool):  # type: ignore[no-untyped-def]
    @step
    def search(topic: str) -> list[str]:
        calls.append(f"search {topic}")
        return [f"{topic} 1", f"{topic} 2"]

    @step
    def review(text: str) -> str:
        calls.append("review")
        return f"reviewed {text}"

    @step(idempotent=False)
    def publish(text: str) -> str:
        calls.append("publish")
        if publish_fails:
            raise RuntimeError("publisher down")
        return f"published {text}"

    @run(name="writer")
    async def writer(topic: str) -> str:
        summary = await call_llm(model, " / ".join(search(topic)))
        reviewed = review(summary)  # a decorated step after the manual one
        again = await call_llm(model, reviewed)  # a second manual step, other inputs
        more = search(again)
        await get_current_run_context().checkpoint(name="before_publish")
        return publish(f"{again} + {len(more)}")

    return writer


async def test_a_resumed_run_serves_manual_steps_from_the_replay_cache(traced) -> None:
    model, calls = Model(), []
    with pytest.raises(RuntimeError, match="publisher down"):
        await writer_program(model, calls, publish_fails=True)("otel")
    first_run_id = traced.named("invoke_workflow writer")[-1].attributes[attr.RUN_ID]
    assert model.prompts == ["otel 1 / otel 2", "reviewed summary of otel 1 / otel 2"]
    expected = "summary of reviewed summary of otel 1 / otel 2"

    model.prompts.clear()
    calls.clear()
    traced.exporter.clear()
    with multirun.resume(run_id=first_run_id):
        result = await writer_program(model, calls, publish_fails=False)("otel")

    assert result == f"published {expected} + 2"
    assert model.prompts == []  # both manual steps were served, the model was not called again
    assert calls == ["publish"]  # the decorated steps around them were served too
    served = [s for s in traced.spans() if s.attributes.get(attr.STEP_STATUS) == "skipped"]
    # the manual steps it served are on the trace as the decorated ones are
    assert sorted(s.attributes[attr.STEP_NAME] for s in served) == [
        "call_llm",
        "call_llm",
        "review",
        "search",
        "search",
    ]


async def test_a_manual_step_that_failed_is_not_served(traced) -> None:
    model, calls = Model(), []
    model.down = True
    with pytest.raises(ConnectionError):
        await writer_program(model, calls, publish_fails=False)("otel")
    first_run_id = traced.named("invoke_workflow writer")[-1].attributes[attr.RUN_ID]
    # no checkpoint was taken by the program: the one of the failed run serves
    model.down = False
    model.prompts.clear()
    calls.clear()
    with multirun.resume(run_id=first_run_id):
        result = await writer_program(model, calls, publish_fails=False)("otel")
    assert model.prompts == ["otel 1 / otel 2", "reviewed summary of otel 1 / otel 2"]
    assert calls == ["review", "search summary of reviewed summary of otel 1 / otel 2", "publish"]
    assert result.startswith("published summary of reviewed")


async def test_a_manual_step_started_without_asking_the_cache_keeps_the_replay_in_order(traced) -> None:
    """A program that always runs its manual step still moves the replay past it: the
    decorated steps after it are served, with no DeterminismError."""
    calls: list[str] = []

    @step
    def fetch(n: int) -> int:
        calls.append(f"fetch {n}")
        return n * 10

    @run(name="counter")
    async def counter() -> int:
        agent_ctx = get_current_agent_context()
        first = fetch(1)
        step_ctx = await agent_ctx.start_step("tally", input_args=(first,), input_kwargs={})
        calls.append("tally")
        await step_ctx.complete(first + 1)
        fetch(2)  # served after the restore only if the replay went on past "tally"
        await get_current_run_context().checkpoint(name="done")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        await counter()
    first_run_id = traced.named("invoke_workflow counter")[-1].attributes[attr.RUN_ID]
    calls.clear()
    with multirun.resume(run_id=first_run_id), pytest.raises(RuntimeError, match="crash"):
        await counter()
    assert calls == ["tally"]


async def test_a_run_restored_in_place_serves_its_manual_steps(traced) -> None:
    """``restore_from_checkpoint`` called by the program itself, as in the reference."""
    model = Model()
    checkpoint_ids: list[str] = []

    @run(name="writer")
    async def writer(restore_from: str | None) -> str:
        ctx = get_current_run_context()
        if restore_from is not None:
            await ctx.restore_from_checkpoint(restore_from)
        summary = await call_llm(model, "prompt")
        checkpoint_ids.append((await ctx.checkpoint(name="after_llm")).id)
        return summary

    assert await writer(None) == "summary of prompt"
    assert await writer(checkpoint_ids[0]) == "summary of prompt"
    assert model.prompts == ["prompt"]


async def test_a_manual_step_served_on_resume_is_on_the_trace_as_skipped(traced) -> None:
    """The trace of a resumed run shows the manual step it served, as it shows a decorated
    one: a span with status skipped, under the run, with the step's kind and input hash;
    and the run's steps list it."""
    model = Model()
    runs = []

    @run(name="asker")
    async def asker(crash: bool) -> str:
        run_ctx = get_current_run_context()
        runs.append(run_ctx.run)
        agent_ctx = get_current_agent_context()
        found, answer = await agent_ctx.get_step_result("call_llm", ("q",), {}, kind=StepKind.LLM_CALL)
        if not found:
            step_ctx = await agent_ctx.start_step("call_llm", kind=StepKind.LLM_CALL, input_args=("q",))
            answer = model("q")
            await step_ctx.complete(answer)
        await run_ctx.checkpoint(name="after_llm")
        if crash:
            raise RuntimeError("crash")
        return answer

    with pytest.raises(RuntimeError, match="crash"):
        await asker(True)
    recorded = traced.span("chat")
    first_run_id = traced.span("invoke_workflow asker").attributes[attr.RUN_ID]
    traced.exporter.clear()
    with multirun.resume(run_id=first_run_id):
        assert await asker(False) == "summary of q"

    assert model.prompts == ["q"]
    served = traced.span("chat")
    assert served.attributes[attr.STEP_STATUS] == "skipped"
    assert served.attributes[attr.STEP_KIND] == "llm_call"
    assert served.attributes[attr.STEP_INPUT_HASH] == recorded.attributes[attr.STEP_INPUT_HASH]
    assert served.parent.span_id == traced.span("invoke_workflow asker").context.span_id
    assert [(s.name, s.status) for s in runs[-1].steps] == [("call_llm", StepStatus.SKIPPED)]


def test_sync_code_reads_the_checkpoint_and_the_cached_result_as_async_code_awaits_them(traced) -> None:
    """The same calls work in a sync program: ``get_step_result`` unpacks into found and result,
    and ``checkpoint`` gives the checkpoint's metadata (its id to restore from)."""
    model = Model()
    checkpoint_ids: list[str] = []

    @run(name="writer")
    def writer(restore_from: str | None) -> str:
        ctx = get_current_run_context()
        if restore_from is not None:
            ctx.restore_from_checkpoint(restore_from)
        agent_ctx = get_current_agent_context()
        found, result = agent_ctx.get_step_result("call_llm", ("prompt",), {})
        if found:
            return str(result)
        step_ctx = agent_ctx.start_step("call_llm", kind=StepKind.LLM_CALL, input_args=("prompt",))
        answer = model("prompt")
        step_ctx.complete(answer)
        meta = ctx.checkpoint(name="after_llm")
        checkpoint_ids.append(meta.id)
        assert (meta.name, meta.run_id) == ("after_llm", ctx.run.id)
        assert agent_ctx.checkpoint(name="agent's").name == "agent's"
        return answer

    assert writer(None) == "summary of prompt"
    assert writer(checkpoint_ids[0]) == "summary of prompt"
    assert model.prompts == ["prompt"]  # served after the restore
