"""A step that returns or streams an LLM SDK response is charged its usage without reporting it.

The responses are the SDKs' own types: built by the real ``openai`` client
from a local server's answer, or validated from the SDKs' documented JSON
(``model_validate``) where the local server does not speak that API. Prices
are genai-prices' own, computed here independently of the package.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import queue
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anthropic
import genai_prices
import httpx
import openai
import pytest
import wrapt
from anthropic.types import Message, RawMessageDeltaEvent, RawMessageStartEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

import multirun
import multirun.usage
from genai_metrics import operations, points
from local_http import LocalHTTPServer, QuietHandler
from multirun import agent, run, step
from multirun.context import get_current_step_context
from multirun.errors import BudgetExceededError
from multirun.models import Budget, StepKind
from test_openai_usage import (  # the local OpenAI-compatible server and its fixtures
    CANNED,
    RESPONSE_MODEL,
    client,
    instrumented,
    llm,
)

__all__ = ["client", "instrumented", "llm"]  # fixtures, imported for pytest


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def step_span(traced: Any, name: str) -> Any:
    (found,) = [s for s in traced.spans() if attrs(s).get("multirun.step.name") == name]
    return found


def price(model: str, provider: str, **tokens: int) -> float:
    usage = genai_prices.Usage(**{k: v or None for k, v in tokens.items()})  # type: ignore[arg-type]
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


def chat_completion(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_730_000_000,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning},
            },
        }
    )


def chunk(text: str, usage: dict[str, Any] | None = None, ident: str = "chatcmpl-s") -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(
        {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": 1_730_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [] if usage else [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            "usage": usage,
        }
    )


ANTHROPIC_MODEL = "claude-3-5-sonnet-20241022"


def anthropic_message(input_tokens: int, output_tokens: int, cache_read: int, cache_write: int) -> Message:
    return Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_read_input_tokens": cache_read,
                "cache_creation_input_tokens": cache_write,
            },
        }
    )


# ---------------------------------------------------------------------------
# whole responses


def test_chat_completion_from_the_real_client_is_charged_to_step_and_run(traced, llm, client) -> None:
    @step(name="ask")
    def ask(prompt: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
        )

    @run(name="main")
    def main() -> int:
        return ask("a").usage.total_tokens + ask("b").usage.total_tokens

    assert main() == CANNED[0].tokens + CANNED[1].tokens
    first, _ = [s for s in traced.spans() if attrs(s).get("multirun.step.name") == "ask"]
    assert attrs(first)["gen_ai.usage.input_tokens"] == CANNED[0].prompt
    assert attrs(first)["gen_ai.usage.output_tokens"] == CANNED[0].completion
    assert attrs(first)["gen_ai.usage.cache_read.input_tokens"] == CANNED[0].cached
    assert attrs(first)["gen_ai.response.model"] == RESPONSE_MODEL
    assert attrs(first)["gen_ai.provider.name"] == "openai"
    run_attrs = attrs(traced.span("invoke_workflow main"))
    assert run_attrs["multirun.tokens_used"] == CANNED[0].tokens + CANNED[1].tokens
    expected = sum(
        price(
            RESPONSE_MODEL,
            "openai",
            input_tokens=c.prompt,
            output_tokens=c.completion,
            cache_read_tokens=c.cached,
        )
        for c in CANNED[:2]
    )
    assert run_attrs["multirun.cost_usd"] == pytest.approx(expected, rel=1e-9)


def test_with_the_openai_instrumentation_on_the_call_is_counted_once(instrumented, llm, client) -> None:
    @step(name="ask")
    def ask() -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    @run(name="main")
    def main() -> None:
        ask()

    main()
    step_span = next(s for s in instrumented.spans() if attrs(s).get("multirun.step.name") == "ask")
    # the instrumentation's chat span is the source: the step carries no usage of its own
    assert "gen_ai.usage.input_tokens" not in attrs(step_span)
    assert attrs(step_span)["multirun.tokens_used"] == CANNED[0].tokens
    assert attrs(instrumented.span("invoke_workflow main"))["multirun.tokens_used"] == CANNED[0].tokens


def test_reasoning_tokens_of_a_chat_completion_are_recorded(traced) -> None:
    @step
    def think() -> ChatCompletion:
        return chat_completion(prompt=1000, completion=400, cached=200, reasoning=300)

    @run(name="main")
    def main() -> None:
        think()

    main()
    span = step_span(traced, "think")
    assert attrs(span)["gen_ai.usage.reasoning.output_tokens"] == 300
    assert attrs(span)["multirun.tokens_used"] == 1400


def test_the_response_a_step_s_returned_future_gives_is_charged_to_the_step(traced) -> None:
    """``executor.submit(client.chat.completions.create, ...)``: the step ends, charged, when
    the call has answered."""
    with ThreadPoolExecutor(1) as pool:

        @step
        def ask() -> Future[ChatCompletion]:
            return pool.submit(chat_completion, 1000, 40)

        @run(name="main")
        def main() -> ChatCompletion:
            return ask().result()

        main()
    assert attrs(step_span(traced, "ask"))["multirun.tokens_used"] == 1040
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1040


@contextlib.contextmanager
def switching_threads_often() -> Iterator[None]:
    """Threads switch every microsecond: a race between two of them shows in a few rounds."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_a_run_ending_as_its_step_s_returned_future_is_done_is_charged_for_it(traced, caplog) -> None:
    """A concurrent future wakes ``.result()`` before it calls the step's callback: the agent
    and the run, ending right after, wait for the step's end and its charge (their spans said
    0 tokens, and a warning said the tokens were in no run's total)."""
    with ThreadPoolExecutor(1) as pool, switching_threads_often():

        @step
        def ask() -> Future[ChatCompletion]:
            return pool.submit(chat_completion, 1000, 40)

        @agent
        def asker() -> ChatCompletion:
            return ask().result()

        @run(name="main")
        def main() -> ChatCompletion:
            return ask().result()

        @run(name="main")
        def main_with_agent() -> ChatCompletion:
            return asker()

        for _ in range(100):  # failed in the first few rounds before
            for body in (main, main_with_agent):
                traced.exporter.clear()
                body()
                assert attrs(step_span(traced, "ask"))["multirun.tokens_used"] == 1040
                assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1040
            assert attrs(traced.span("invoke_agent asker"))["multirun.tokens_used"] == 1040
    assert "after run" not in caplog.text


def test_a_step_returning_the_response_its_inner_step_s_future_gave_leaves_it_to_that_step(traced) -> None:
    """The step around returns the response before the inner step's callback has charged it:
    the inner step, whose call it is, is charged, not the step around alone."""
    with ThreadPoolExecutor(1) as pool, switching_threads_often():

        @step
        def ask() -> Future[ChatCompletion]:
            return pool.submit(chat_completion, 1000, 40)

        @step
        def outer() -> ChatCompletion:
            return ask().result()

        @run(name="main")
        def main() -> None:
            outer()

        for _ in range(200):  # failed about once in 10 rounds before
            traced.exporter.clear()
            main()
            tokens = [attrs(step_span(traced, name)).get("multirun.tokens_used") for name in ("ask", "outer")]
            assert tokens == [1040, 1040]
            assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1040


def test_steps_whose_returned_futures_are_done_at_once_all_end(traced) -> None:
    """Steps of one agent whose futures are done together, their callbacks on as many
    threads, end each with its charge: none waits for another's end (each holds its own lock
    while it ends, and two waiting for each other's would hang the program)."""

    def answered_on_a_thread(completion: int) -> Future[ChatCompletion]:
        """``executor.submit``'s future, on a daemon thread: one left waiting cannot stop pytest."""
        future: Future[ChatCompletion] = Future()
        answer = threading.Thread(target=lambda: future.set_result(chat_completion(1000, completion)))
        answer.daemon = True
        answer.start()
        return future

    @step
    def ask(completion: int) -> Future[ChatCompletion]:
        return answered_on_a_thread(completion)

    @run(name="main")
    def main() -> list[ChatCompletion]:
        futures = [ask(n) for n in range(4)]
        return [future.result() for future in futures]

    def rounds() -> None:
        for _ in range(100):  # a wait for a sibling's lock hung here within a few rounds
            traced.exporter.clear()
            main()
            assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 4006

    failed: list[BaseException] = []
    runner = threading.Thread(target=lambda: _collect(rounds, failed), daemon=True)
    with switching_threads_often():
        runner.start()
        runner.join(60)
    assert not runner.is_alive(), "deadlocked"
    assert failed == []


def _collect(func: Callable[[], None], failed: list[BaseException]) -> None:
    try:
        func()
    except BaseException as error:
        failed.append(error)


def test_responses_api_response_is_charged(traced) -> None:
    response = Response.model_validate(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1_730_000_000,
            "model": "gpt-4o-2024-08-06",
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 900,
                "output_tokens": 100,
                "total_tokens": 1000,
                "input_tokens_details": {"cached_tokens": 512, "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 64},
            },
        }
    )

    @step
    async def respond() -> Response:
        return response

    @run(name="main")
    async def main() -> None:
        await respond()

    import asyncio

    asyncio.run(main())
    span = step_span(traced, "respond")
    assert attrs(span)["gen_ai.usage.input_tokens"] == 900
    assert attrs(span)["gen_ai.usage.output_tokens"] == 100
    assert attrs(span)["gen_ai.usage.cache_read.input_tokens"] == 512
    assert attrs(span)["gen_ai.usage.reasoning.output_tokens"] == 64
    expected = price(
        "gpt-4o-2024-08-06", "openai", input_tokens=900, output_tokens=100, cache_read_tokens=512
    )
    assert attrs(traced.span("invoke_workflow main"))["multirun.cost_usd"] == pytest.approx(
        expected, rel=1e-9
    )


def test_anthropic_message_counts_cached_input_as_input(traced) -> None:
    @step
    def answer() -> Message:
        return anthropic_message(input_tokens=10, output_tokens=30, cache_read=700, cache_write=200)

    @run(name="main")
    def main() -> None:
        answer()

    main()
    span = step_span(traced, "answer")
    # Anthropic's input_tokens leaves cached input out; the GenAI convention counts it in
    assert attrs(span)["gen_ai.usage.input_tokens"] == 910
    assert attrs(span)["gen_ai.usage.output_tokens"] == 30
    assert attrs(span)["gen_ai.usage.cache_read.input_tokens"] == 700
    assert attrs(span)["gen_ai.usage.cache_creation.input_tokens"] == 200
    assert attrs(span)["gen_ai.provider.name"] == "anthropic"
    expected = price(
        ANTHROPIC_MODEL,
        "anthropic",
        input_tokens=910,
        output_tokens=30,
        cache_read_tokens=700,
        cache_write_tokens=200,
    )
    assert attrs(span)["multirun.cost_usd"] == pytest.approx(expected, rel=1e-9)


def test_usage_the_step_reported_itself_is_not_counted_again(traced) -> None:
    @step
    def ask() -> ChatCompletion:
        response = chat_completion(prompt=100, completion=10)
        multirun.report_usage("gpt-4o", input_tokens=100, output_tokens=10)
        return response

    @run(name="main")
    def main() -> None:
        ask()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 110


def test_a_step_returning_the_response_of_a_step_inside_it_is_not_charged_again(traced) -> None:
    @step
    def ask() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)

    @step
    def answer() -> ChatCompletion:  # a wrapper step: its result is its inner step's
        return ask()

    @run(name="main")
    def main() -> None:
        answer()
        answer()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 220
    assert [attrs(s)["multirun.tokens_used"] for s in traced.named("step answer")] == [110, 110]


def report_by_hand(how: str) -> None:
    """Report the call of ``chat_completion(prompt=100, completion=10)`` by hand."""
    if how == "report_usage":
        multirun.report_usage("gpt-4o-2024-08-06", input_tokens=100, output_tokens=10, provider="openai")
    else:  # the reference's StepContext.complete; the decorator still returns what the step returns
        get_current_step_context().complete(tokens_used=110)


@pytest.mark.parametrize("how", ["report_usage", "complete"])
def test_a_step_returning_a_response_a_step_inside_it_reported_by_hand_is_not_charged_again(
    traced, how
) -> None:
    # the inner step's report is that call's: a step passing the response on adds nothing
    @step
    def ask() -> ChatCompletion:
        response = chat_completion(prompt=100, completion=10)
        report_by_hand(how)
        return response

    @step
    def answer() -> ChatCompletion:
        return ask()

    @run(name="main")
    def main() -> None:
        answer()
        answer()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 220
    assert [attrs(s)["multirun.tokens_used"] for s in traced.named("step answer")] == [110, 110]


def test_a_step_returning_a_response_a_manual_step_completed_with_its_tokens_is_not_charged_again(
    traced,
) -> None:
    # complete(response, tokens_used=...) is that call's report: the step around it that
    # returns the response adds nothing
    @step
    def answer() -> ChatCompletion:
        agent = multirun.context.get_current_agent_context()
        by_hand = agent.start_step("ask", kind=StepKind.LLM_CALL, input_args=("q",))
        response = chat_completion(prompt=100, completion=10)
        by_hand.complete(response, tokens_used=110)
        return response

    @run(name="main")
    def main() -> None:
        answer()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 110
    assert attrs(step_span(traced, "answer"))["multirun.tokens_used"] == 110


def test_a_generator_step_passing_on_chunks_a_step_inside_it_reported_by_hand_is_not_charged_again(
    traced,
) -> None:
    @step
    def stream() -> Iterator[ChatCompletionChunk]:
        yield chunk("a")
        yield chunk("", usage={"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53})
        multirun.report_usage("gpt-4o", input_tokens=50, output_tokens=3)

    @step
    def relay() -> Iterator[ChatCompletionChunk]:
        yield from stream()

    @run(name="main")
    def main() -> int:
        return len(list(relay()))

    assert main() == 2
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 53


def test_a_step_returning_a_response_a_span_inside_a_step_inside_it_reported_is_not_charged_again(
    traced,
) -> None:
    # an OpenInference span gives no response id: the inner step vouches for the response
    @step
    def ask() -> ChatCompletion:
        attributes = {"llm.token_count.prompt": 100, "llm.token_count.completion": 10}
        with traced.provider.get_tracer("openinference").start_as_current_span("llm", attributes=attributes):
            return chat_completion(prompt=100, completion=10)

    @step
    def answer() -> ChatCompletion:
        return ask()

    @run(name="main")
    def main() -> None:
        answer()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 110


def test_a_step_returning_its_own_response_after_a_step_inside_it_charged_another_is_charged(
    traced,
) -> None:
    @step
    def plan() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)

    @step
    def act() -> ChatCompletion:
        plan()
        response = chat_completion(prompt=200, completion=20)
        return response.model_copy(update={"id": "chatcmpl-2"})  # another call: its own id

    @run(name="main")
    def main() -> None:
        act()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 330


def test_sibling_steps_returning_the_same_response_are_charged_for_it_once(traced) -> None:
    # one call, whose response a second step passes on (checks it, say): not two calls
    @step
    def ask() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)

    @step
    def check(response: ChatCompletion) -> ChatCompletion:
        return response

    @run(name="main")
    def main() -> None:
        check(ask())
        check(ask())

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 220
    assert [attrs(s).get("multirun.tokens_used") for s in traced.named("step check")] == [None, None]


def test_a_cached_response_returned_by_two_steps_is_charged_once(traced) -> None:
    # a response cache answers the second step without calling the model: one call, paid once
    cache: dict[str, ChatCompletion] = {}

    @step
    def ask(prompt: str) -> ChatCompletion:
        if prompt not in cache:
            cache[prompt] = chat_completion(prompt=100, completion=10)
        return cache[prompt]

    @run(name="main")
    def main() -> None:
        ask("same")
        ask("same")
        ask("other")

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 220


def test_a_response_a_step_of_a_sub_run_passes_on_is_charged_once(traced) -> None:
    @step
    def ask() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)

    @step
    def check(response: ChatCompletion) -> ChatCompletion:
        return response

    @run(name="review")
    def review(response: ChatCompletion) -> ChatCompletion:
        return check(response)

    @run(name="main")
    def main() -> None:
        review(ask())

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 110


def test_sibling_steps_with_an_instrumented_call_and_its_response_are_charged_once(
    instrumented, llm, client
) -> None:
    # openai-v2's span charged the call inside the first step; the second passes its response on
    @step
    def ask() -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    @step
    def check(response: Any) -> Any:
        return response

    @run(name="main")
    def main() -> None:
        check(ask())

    main()
    assert attrs(instrumented.span("invoke_workflow main"))["multirun.tokens_used"] == CANNED[0].tokens


@pytest.mark.parametrize("where", ["run", "agent"])
def test_a_step_returning_the_response_of_an_instrumented_call_made_outside_any_step_is_not_charged_again(
    instrumented, llm, client, where: str
) -> None:
    # openai-v2's span charged the call in the run's (or an agent's) body, outside any step;
    # a step then returns its response (to record it, say): it was charged a second time
    @step
    def keep(response: Any) -> Any:
        return response

    def ask_and_keep() -> Any:
        response = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        return keep(response)

    @multirun.agent(name="asker")
    def asker() -> Any:
        return ask_and_keep()

    @run(name="main")
    def main() -> None:
        ask_and_keep() if where == "run" else asker()

    main()
    assert attrs(instrumented.span("invoke_workflow main"))["multirun.tokens_used"] == CANNED[0].tokens
    assert attrs(step_span(instrumented, "keep")).get("multirun.tokens_used") is None
    if where == "agent":
        assert attrs(instrumented.span("invoke_agent asker"))["multirun.tokens_used"] == CANNED[0].tokens


@contextlib.contextmanager
def worker_outside_the_run(client: openai.OpenAI) -> Iterator[Callable[[], Any]]:
    """A thread started before the run that makes the real calls it is asked for: it has the
    context it started in, so no span of the run charges them."""
    asked: queue.Queue[Future[Any] | None] = queue.Queue()

    def serve() -> None:
        while (answer := asked.get()) is not None:
            prompt = [{"role": "user", "content": "y"}]
            answer.set_result(client.chat.completions.create(model="gpt-4o-mini", messages=prompt))

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()

    def ask() -> Any:
        answer: Future[Any] = Future()
        asked.put(answer)
        return answer.result(timeout=30)

    try:
        yield ask
    finally:
        asked.put(None)
        worker.join(timeout=30)


@pytest.mark.parametrize("kept_first", [True, False], ids=["kept-first", "unseen-first"])
def test_with_one_id_for_every_response_a_step_returning_another_call_is_still_charged(
    instrumented, llm, client, kept_first: bool
) -> None:
    # the server gives every response the same id: a call charged by openai-v2's span in the
    # run's body must spare only the step that returns its response, not a step that returns
    # another call's (one no span charged), which was left unpaid
    llm.same_id = "chatcmpl-same"

    @step
    def keep(response: Any) -> Any:
        return response

    @step
    def ask_unseen() -> Any:
        return ask_elsewhere()

    @run(name="main")
    def main() -> None:
        response = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        if kept_first:
            keep(response)
            ask_unseen()
        else:
            ask_unseen()
            keep(response)

    with worker_outside_the_run(client) as ask_elsewhere:
        main()
    assert [served.usage for served in llm.served] == CANNED[:2]
    assert (
        attrs(instrumented.span("invoke_workflow main"))["multirun.tokens_used"]
        == CANNED[0].tokens + CANNED[1].tokens
    )
    assert attrs(step_span(instrumented, "keep")).get("multirun.tokens_used") is None
    assert attrs(step_span(instrumented, "ask_unseen"))["multirun.tokens_used"] == CANNED[1].tokens


def test_with_one_id_for_every_response_a_call_charged_in_a_step_spares_no_other_step(
    instrumented, llm, client
) -> None:
    # the same prompt twice, answered alike with the same id: the first call is charged by
    # openai-v2's span inside the step that returns it; the second, which no span charged, is
    # another call all the same
    llm.same_id = "chatcmpl-same"
    llm.answers = [CANNED[0], CANNED[0]]

    @step
    def ask() -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "y"}]
        )

    @step
    def ask_unseen() -> Any:
        return ask_elsewhere()

    @run(name="main")
    def main() -> None:
        ask()
        ask_unseen()

    with worker_outside_the_run(client) as ask_elsewhere:
        main()
    assert attrs(instrumented.span("invoke_workflow main"))["multirun.tokens_used"] == 2 * CANNED[0].tokens
    assert attrs(step_span(instrumented, "ask_unseen"))["multirun.tokens_used"] == CANNED[0].tokens


@pytest.mark.parametrize(
    "response",
    [
        lambda: chat_completion(prompt=100, completion=10),
        lambda: anthropic_message(input_tokens=100, output_tokens=10, cache_read=0, cache_write=0),
    ],
    ids=["openai", "anthropic"],
)
def test_a_step_passing_on_a_copy_of_a_siblings_response_is_not_charged_again(traced, response) -> None:
    # model_copy() (to edit the text, say) is still that one call's response
    @step
    def ask() -> Any:
        return response()

    @step
    def check(answer: Any) -> Any:
        return answer.model_copy()

    @run(name="main")
    def main() -> None:
        check(ask())

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 110
    assert attrs(step_span(traced, "check")).get("multirun.tokens_used") is None


def test_a_copy_of_a_response_an_instrumented_sibling_step_got_is_not_charged_again(
    instrumented, llm, client
) -> None:
    # openai-v2's span charged the call inside the first step
    @step
    def ask() -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )

    @step
    def check(response: Any) -> Any:
        return response.model_copy(update={"choices": []})

    @run(name="main")
    def main() -> None:
        check(ask())

    main()
    assert attrs(instrumented.span("invoke_workflow main"))["multirun.tokens_used"] == CANNED[0].tokens


def test_a_copy_of_a_response_with_another_id_is_another_call(traced) -> None:
    @step
    def ask() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)

    @step
    def ask_again(response: ChatCompletion) -> ChatCompletion:
        return response.model_copy(update={"id": "chatcmpl-2"})  # a test double's second answer

    @run(name="main")
    def main() -> None:
        ask_again(ask())

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 220


def test_steps_returning_different_responses_with_one_id_are_each_charged(traced) -> None:
    # some OpenAI-compatible servers (and test doubles) give every response the same id: another
    # response object is another call, so a repeated id must not leave a call unpaid
    @step
    def ask() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)  # always "chatcmpl-1"

    @run(name="main")
    def main() -> None:
        ask()
        ask()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 220


@pytest.mark.parametrize("inner_call", ["returned", "reported"])
def test_a_step_returning_another_call_with_the_id_of_one_charged_inside_it_is_charged(
    traced, inner_call: str
) -> None:
    # the server gives every response the same id: the call the step inside charged (returned,
    # or reported by hand with its id) spares only that call, not the step's own later one
    @step
    def summarise() -> Any:
        if inner_call == "reported":
            multirun.report_usage("gpt-4o", input_tokens=10, output_tokens=5, response_id="chatcmpl-1")
            return "summary"
        return chat_completion(prompt=10, completion=5)

    @step
    def answer() -> ChatCompletion:
        summarise()
        return chat_completion(prompt=1000, completion=500)  # also "chatcmpl-1"

    @step
    def then() -> None:
        pass

    @run(name="main", budget=Budget(max_tokens=1000))
    def main() -> None:
        answer()
        then()  # refused: answer spent the budget

    with pytest.raises(BudgetExceededError, match="max_tokens"):
        main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1515
    span = attrs(step_span(traced, "answer"))
    assert (span["gen_ai.usage.input_tokens"], span["gen_ai.usage.output_tokens"]) == (1000, 500)


def test_remembering_the_responses_steps_returned_keeps_none_alive(traced) -> None:
    @step
    def ask() -> ChatCompletion:
        return chat_completion(prompt=100, completion=10)

    @run(name="main")
    def main() -> weakref.ref[ChatCompletion]:
        return weakref.ref(ask())

    response = main()
    gc.collect()
    assert response() is None


def test_budget_stops_the_run_after_a_response_spent_it(traced) -> None:
    calls: list[int] = []

    @step
    def ask(i: int) -> ChatCompletion:
        calls.append(i)
        return chat_completion(prompt=600, completion=100)

    @run(name="main", budget=Budget(max_tokens=1000))
    def main() -> None:
        for i in range(5):
            ask(i)

    with pytest.raises(BudgetExceededError, match="max_tokens"):
        main()
    assert calls == [0, 1]  # the second response crossed the limit; the third never started


@pytest.mark.parametrize("streamed", [False, True], ids=["response", "stream"])
def test_a_response_of_a_model_with_no_price_under_unpriced_fail_fails_its_step(traced, streamed) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")
    private = {"model": "my-private-model"}
    final_usage = {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53}

    @step(name="ask", retry=2, retry_delay=0)
    def ask() -> ChatCompletion:
        return chat_completion(prompt=600, completion=100).model_copy(update=private)

    @step(name="ask", retry=2, retry_delay=0)
    def stream() -> Iterator[ChatCompletionChunk]:
        yield chunk("a").model_copy(update=private)
        yield chunk("", usage=final_usage).model_copy(update=private)

    @run(name="main")
    def main() -> str:
        try:
            list(stream()) if streamed else ask()
        except multirun.PolicyViolation as refused:
            return refused.rule
        return "not refused"

    assert main() == "unpriced"
    span = step_span(traced, "ask")  # ended, as failed, with the usage it was charged
    assert attrs(span)["multirun.step.status"] == "failed"
    assert attrs(span)["multirun.cost.unpriced"] is True
    assert attrs(span)["multirun.step.attempt"] == 1  # a refusal is not retried
    assert attrs(traced.span("invoke_workflow main"))["multirun.run.status"] == "completed"


# ---------------------------------------------------------------------------
# streams


def test_generator_step_yielding_openai_chunks_is_charged_when_the_stream_ends(traced) -> None:
    final_usage = {
        "prompt_tokens": 50,
        "completion_tokens": 3,
        "total_tokens": 53,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    @step
    def stream() -> Iterator[ChatCompletionChunk]:
        yield chunk("a")
        yield chunk("b")
        yield chunk("c")
        yield chunk("", usage=final_usage)

    @run(name="main")
    def main() -> str:
        return "".join(c.choices[0].delta.content or "" for c in stream() if c.choices)

    assert main() == "abc"
    span = step_span(traced, "stream")
    assert attrs(span)["gen_ai.usage.input_tokens"] == 50
    assert attrs(span)["gen_ai.usage.output_tokens"] == 3
    assert attrs(span)["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 53


async def test_async_generator_of_anthropic_events_is_charged_from_its_running_totals(traced) -> None:
    start = RawMessageStartEvent.model_validate(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": ANTHROPIC_MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 100},
            },
        }
    )

    def delta(output_tokens: int) -> RawMessageDeltaEvent:
        return RawMessageDeltaEvent.model_validate(
            {
                "type": "message_delta",
                "delta": {"stop_reason": None, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            }
        )

    @step
    async def stream() -> AsyncIterator[Any]:
        yield start
        yield delta(7)
        yield delta(15)  # running total, not an increment

    @run(name="main")
    async def main() -> int:
        return len([event async for event in stream()])

    assert await main() == 3
    span = step_span(traced, "stream")
    assert attrs(span)["gen_ai.usage.input_tokens"] == 125
    assert attrs(span)["gen_ai.usage.output_tokens"] == 15
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 140


def anthropic_start(ident: str, input_tokens: int) -> RawMessageStartEvent:
    return RawMessageStartEvent.model_validate(
        {
            "type": "message_start",
            "message": {
                "id": ident,
                "type": "message",
                "role": "assistant",
                "model": ANTHROPIC_MODEL,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        }
    )


def anthropic_delta(output_tokens: int) -> RawMessageDeltaEvent:
    return RawMessageDeltaEvent.model_validate(
        {
            "type": "message_delta",
            "delta": {"stop_reason": None, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
    )


def test_a_generator_step_that_streams_two_model_calls_is_charged_for_both(traced) -> None:
    """A tool loop that streams one answer, calls a tool, then streams the next: two calls, two
    streams of running totals, in one step; neither replaces the other."""

    def usage(prompt: int, completion: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @step
    def openai_loop() -> Iterator[Any]:
        yield chunk("a", ident="chatcmpl-1")
        yield chunk("", usage=usage(10, 2), ident="chatcmpl-1")
        yield chunk("b", ident="chatcmpl-2")
        yield chunk("", usage=usage(20, 3), ident="chatcmpl-2")

    @step
    def anthropic_loop() -> Iterator[Any]:
        yield anthropic_start("msg_1", 30)
        yield anthropic_delta(4)
        yield anthropic_start("msg_2", 40)
        yield anthropic_delta(5)

    @run(name="main")
    def main() -> None:
        list(openai_loop())
        list(anthropic_loop())

    main()
    assert attrs(step_span(traced, "openai_loop"))["multirun.tokens_used"] == 12 + 23
    assert attrs(step_span(traced, "anthropic_loop"))["multirun.tokens_used"] == 34 + 45
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 35 + 79


def test_a_generator_step_passing_on_the_chunks_of_a_step_inside_it_is_not_charged_again(traced) -> None:
    @step
    def stream() -> Iterator[ChatCompletionChunk]:
        yield chunk("a")
        yield chunk("", usage={"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53})

    @step
    def relay() -> Iterator[ChatCompletionChunk]:
        yield from stream()

    @run(name="main")
    def main() -> int:
        return len(list(relay()))

    assert main() == 2
    assert attrs(step_span(traced, "relay"))["multirun.tokens_used"] == 53
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 53


def test_a_responses_stream_that_ends_incomplete_is_charged(traced) -> None:
    """A Responses stream cut by max_output_tokens ends with ``response.incomplete``, not
    ``response.completed``: its tokens were billed all the same."""
    from openai.types.responses import ResponseIncompleteEvent

    event = ResponseIncompleteEvent.model_validate(
        {
            "type": "response.incomplete",
            "sequence_number": 7,
            "response": {
                "id": "resp_2",
                "object": "response",
                "created_at": 1_730_000_000,
                "model": "gpt-4o-2024-08-06",
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "output": [],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": {
                    "input_tokens": 300,
                    "output_tokens": 64,
                    "total_tokens": 364,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0},
                },
            },
        }
    )

    @step
    def stream() -> Iterator[Any]:
        yield event

    @run(name="main")
    def main() -> None:
        list(stream())

    main()
    assert attrs(step_span(traced, "stream"))["gen_ai.usage.output_tokens"] == 64
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 364


def test_a_stream_that_fails_midway_is_charged_for_what_arrived(traced) -> None:
    @step
    def stream() -> Iterator[Any]:
        yield chunk("a", usage={"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42})
        raise ConnectionError("stream cut")

    @run(name="main")
    def main() -> None:
        list(stream())

    with pytest.raises(ConnectionError):
        main()
    assert attrs(step_span(traced, "stream"))["gen_ai.usage.input_tokens"] == 40


PRIVATE_MODEL = "my-private-model"  # no known price


def private_start(input_tokens: int, ident: str = "msg_private") -> RawMessageStartEvent:
    """The first event of an Anthropic stream of a model with no known price: it bills the input."""
    event = anthropic_start(ident, input_tokens)
    return event.model_copy(update={"message": event.message.model_copy(update={"model": PRIVATE_MODEL})})


def assert_refused_and_charged(
    traced: Any,
    caplog: pytest.LogCaptureFixture,
    error_type: str = "multirun.errors.PolicyViolation",
    tokens: int = 41,
) -> None:
    """The stream's step failed with ``error_type``, the refusal of its usage on its span, the run
    counted that usage, and a warning said so."""
    span = step_span(traced, "stream")
    assert attrs(span)["multirun.step.status"] == "failed"
    assert attrs(span)["error.type"] == error_type
    assert attrs(span)["multirun.cost.unpriced"] is True
    refusals = [e for e in span.events if e.attributes["exception.type"] == "multirun.errors.PolicyViolation"]
    assert len(refusals) == 1 and PRIVATE_MODEL in refusals[0].attributes["exception.message"]
    main = attrs(traced.span("invoke_workflow main"))
    assert main["multirun.run.status"] == "completed"
    assert main["multirun.tokens_used"] == tokens
    assert main["multirun.cost.unpriced"] is True
    assert f"model {PRIVATE_MODEL!r} has no known price" in caplog.text


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_stream_of_a_model_with_no_price_closed_early_under_unpriced_fail_closes_without_raising(
    traced, caplog, how: str
) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")

    @step
    def stream() -> Iterator[Any]:
        yield private_start(40)
        yield anthropic_delta(5)

    @run(name="main")
    def main() -> str:
        events = stream()
        next(events)  # the consumer has read what it needs
        if how == "close":
            events.close()
        else:
            del events  # closed as it is collected: an error there would be "ignored" on stderr
        return "closed"

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert main() == "closed"
    assert_refused_and_charged(traced, caplog)


async def test_an_async_stream_of_a_model_with_no_price_closed_early_under_unpriced_fail_raises_nothing(
    traced, caplog
) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")

    @step
    async def stream() -> AsyncIterator[Any]:
        yield private_start(40)
        yield anthropic_delta(5)

    @run(name="main")
    async def main() -> str:
        events = stream()
        await anext(events)
        await events.aclose()
        return "closed"

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert await main() == "closed"
    assert_refused_and_charged(traced, caplog)


@pytest.mark.parametrize("read", ["to the end", "closed early"])
def test_a_stream_of_a_model_with_no_price_failing_under_unpriced_fail_raises_its_own_error(
    traced, caplog, read: str
) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")

    @step
    def stream() -> Iterator[Any]:
        try:
            yield private_start(40)
            yield anthropic_delta(5)
        finally:
            raise ConnectionError("connection lost")  # at its end, or as it is closed

    @run(name="main")
    def main() -> str:
        events = stream()
        try:
            if read == "to the end":
                list(events)
            else:
                next(events)
                events.close()
        except ConnectionError as lost:
            return str(lost)
        return "no error"

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert main() == "connection lost"
    assert_refused_and_charged(traced, caplog, "ConnectionError", tokens=45 if read == "to the end" else 41)


@pytest.mark.parametrize("read", ["to the end", "closed early"])
def test_a_stream_of_two_calls_of_a_model_with_no_price_under_unpriced_fail_charges_both(
    traced, read: str
) -> None:
    multirun.init(tracer_provider=traced.provider, unpriced="fail")

    @step
    def stream() -> Iterator[Any]:  # a tool loop: one streamed answer, a tool call, the next answer
        yield private_start(40, "msg_1")
        yield private_start(100, "msg_2")

    @run(name="main")
    def main() -> str:
        events = stream()
        try:
            if read == "to the end":
                list(events)
            else:
                next(events), next(events)
                events.close()
        except multirun.PolicyViolation as refused:
            return refused.rule
        return "closed"

    assert main() == ("unpriced" if read == "to the end" else "closed")
    assert attrs(step_span(traced, "stream"))["multirun.tokens_used"] == 142  # (40 + 1) + (100 + 1)
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 142


# ---------------------------------------------------------------------------
# everything else is left alone


def test_results_that_are_not_sdk_responses_are_not_read(traced) -> None:
    class ChatCompletion:  # the user's own class, with the same name and fields
        model = "gpt-4o"
        usage = {"prompt_tokens": 5, "completion_tokens": 5}

    @step
    def mine() -> Any:
        return ChatCompletion()

    @step
    def plain() -> dict[str, Any]:
        return {"usage": {"prompt_tokens": 5}}

    @run(name="main")
    def main() -> None:
        mine()
        plain()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 0


def test_a_proxy_of_anything_but_an_sdk_stream_is_handed_back_as_it_is(traced) -> None:
    """A wrapt proxy is what it wraps (an instrumentation's proxy of a stream is a stream):
    of a stream only is it watched, as the stream is."""
    proxy = wrapt.ObjectProxy({"not": "a stream"})

    @step
    def give() -> Any:
        return proxy

    @run(name="main")
    def main() -> None:
        assert give() is proxy

    main()
    assert "multirun.step.stream_items" not in attrs(step_span(traced, "give"))


def test_a_response_without_usage_is_no_error(traced) -> None:
    response = chat_completion(prompt=1, completion=1).model_copy(update={"usage": None})

    @step
    def ask() -> ChatCompletion:
        return response

    @run(name="main")
    def main() -> ChatCompletion:
        return ask()

    assert main() is response
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 0


def test_a_response_with_a_null_token_count_is_charged_the_counts_it_has(traced) -> None:
    """OpenAI-compatible servers send ``"completion_tokens": null`` at times (the SDK does not
    validate responses): the prompt tokens were billed, and are charged."""
    response = ChatCompletion.construct(**chat_completion(prompt=120, completion=0).__dict__)
    response.usage = response.usage.model_copy(update={"completion_tokens": None})  # type: ignore[union-attr]

    @step
    def ask() -> ChatCompletion:
        return response

    @run(name="main")
    def main() -> None:
        ask()

    main()
    assert attrs(step_span(traced, "ask"))["gen_ai.usage.input_tokens"] == 120
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 120


def test_classes_made_at_run_time_that_steps_return_are_not_kept_alive(traced) -> None:
    import gc
    import weakref

    import pydantic

    classes: list[weakref.ref] = []

    @step
    def structured_answer(i: int) -> object:
        model = pydantic.create_model(f"Answer{i}", text=(str, ...))  # a schema per request
        classes.append(weakref.ref(model))
        return model(text="ok")

    @run
    def main() -> None:
        for i in range(3_000):
            structured_answer(i)

    main()
    gc.collect()
    alive = sum(ref() is not None for ref in classes)
    assert alive <= 1_100, f"{alive} of 3,000 classes still alive"


class Answering(LocalHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every POST with ``self.body``, bytes as they are
    (JSON a misbehaving server sends, ``NaN`` say, which Python's JSON reader takes)."""

    def __init__(self) -> None:
        self.body = b"{}"
        answering = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answering.body)))
                self.end_headers()
                self.wfile.write(answering.body)

        super().__init__(Handler, "/v1")
        self.start()


@pytest.fixture
def answering() -> Iterator[Answering]:
    server = Answering()
    yield server
    server.stop()


@pytest.fixture
def raw_client(answering: Answering) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=answering.url, api_key="test", max_retries=0) as sync_client:
        yield sync_client


def chat_body(usage: str, model: str = "gpt-4o-2024-08-06") -> bytes:
    """A chat completion's JSON with ``usage``, JSON text as given (NaN, say)."""
    whole = {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 1_730_000_000,
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": "USAGE",
    }
    return json.dumps(whole).replace('"USAGE"', usage).encode()


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bad", ["-5", "NaN", "Infinity", "1e30", str(2**64)])
def test_a_response_with_a_count_that_is_no_token_count_is_charged_its_other_counts(
    traced, answering, raw_client, caplog, bad
) -> None:
    """A misbehaving OpenAI-compatible server's bad count is 0, with a warning naming it: its
    call is still charged the tokens it did count, not nothing. Multirun's reading of the
    response warns no Python warning into the program (pydantic's serializer would: a NaN is
    no int)."""
    answering.body = chat_body(
        '{"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040, '
        f'"prompt_tokens_details": {{"cached_tokens": {bad}}}}}'
    )

    @step
    def ask() -> Any:
        return raw_client.chat.completions.create(model="gpt-4o", messages=[])

    @run(name="main")
    def main() -> None:
        ask()

    multirun.usage._warned_counts.clear()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        main()
    assert attrs(step_span(traced, "ask"))["gen_ai.usage.input_tokens"] == 1000
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1040
    assert attrs(traced.span("invoke_workflow main"))["multirun.cost_usd"] == pytest.approx(
        price("gpt-4o-2024-08-06", "openai", input_tokens=1000, output_tokens=40)
    )
    assert "usage.prompt_tokens_details.cached_tokens" in caplog.text


def test_a_bad_token_count_is_logged_once_per_field(traced, caplog) -> None:
    """A misbehaving server's every response would repeat it: one warning per field."""

    @step
    def ask(cached: int, reasoning: int) -> Any:
        return chat_completion(1000, 40, cached=cached, reasoning=reasoning)

    @run(name="main")
    def main() -> None:
        ask(-5, 0)
        ask(-6, 0)
        ask(0, -7)

    multirun.usage._warned_counts.clear()
    with caplog.at_level(logging.WARNING, logger="multirun"):
        main()
    warned = [r.getMessage() for r in caplog.records if "no token count" in r.getMessage()]
    assert len(warned) == 2
    assert "usage.prompt_tokens_details.cached_tokens=-5" in warned[0]
    assert "usage.completion_tokens_details.reasoning_tokens=-7" in warned[1]
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 3 * 1040


@pytest.mark.parametrize("api", ["completions", "embeddings"])
def test_a_legacy_completion_or_an_embedding_response_is_charged(traced, answering, raw_client, api) -> None:
    model = "gpt-3.5-turbo-instruct" if api == "completions" else "text-embedding-3-small"
    body: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "created": 1_730_000_000}
    if api == "completions":
        body["choices"] = [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}]
        body["usage"] = {"prompt_tokens": 3000, "completion_tokens": 200, "total_tokens": 3200}
    else:
        body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]}
        body["usage"] = {"prompt_tokens": 3000, "total_tokens": 3000}
    answering.body = json.dumps({**body, "model": model}).encode()

    @step
    def ask() -> Any:
        if api == "completions":
            return raw_client.completions.create(model=model, prompt="x")
        return raw_client.embeddings.create(model=model, input="x")

    @run(name="main")
    def main() -> None:
        ask()

    main()
    output = 200 if api == "completions" else 0
    assert attrs(step_span(traced, "ask"))["gen_ai.usage.input_tokens"] == 3000
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 3000 + output
    assert attrs(traced.span("invoke_workflow main"))["multirun.cost_usd"] == pytest.approx(
        price(model, "openai", input_tokens=3000, output_tokens=output)
    )


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_raw_response_a_step_returns_is_charged_once_and_still_parses(traced, answering, sdk) -> None:
    """``with_raw_response``: the SDK read the body, and caches what ``parse()`` gives, so
    reading it costs the program nothing; a step around that returns ``parse()``'s response is
    the same call."""
    if sdk == "openai":
        answering.body = chat_body('{"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040}')
        model, expected = (
            "gpt-4o-2024-08-06",
            price("gpt-4o-2024-08-06", "openai", input_tokens=1000, output_tokens=40),
        )
        sync_client: Any = openai.OpenAI(base_url=answering.url, api_key="test", max_retries=0)
        async_client: Any = openai.AsyncOpenAI(base_url=answering.url, api_key="test", max_retries=0)
        create = lambda c: c.chat.completions.with_raw_response.create(  # noqa: E731
            model=model, messages=[{"role": "user", "content": "x"}]
        )
    else:
        answering.body = anthropic_message(1000, 40, 0, 0).model_dump_json().encode()
        model = ANTHROPIC_MODEL
        expected = price(model, "anthropic", input_tokens=1000, output_tokens=40)
        base = answering.url.removesuffix("/v1")
        sync_client = anthropic.Anthropic(base_url=base, api_key="test", max_retries=0)
        async_client = anthropic.AsyncAnthropic(base_url=base, api_key="test", max_retries=0)
        create = lambda c: c.messages.with_raw_response.create(  # noqa: E731
            model=model, max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )

    @step
    def ask() -> Any:
        return create(sync_client)

    @step
    async def ask_async() -> Any:
        return await create(async_client)

    @step
    def answer() -> Any:
        return ask().parse()  # the same response: charged once

    @run(name="main")
    async def main() -> list[Any]:
        return [answer(), await ask_async()]

    try:
        parsed, raw = await main()
    finally:
        sync_client.close()
        await async_client.close()
    assert parsed.model == model and parsed.usage is not None
    again = raw.parse()
    if inspect.isawaitable(again):
        again = await again
    assert again.model == model  # the program still reads what it got
    run_span = attrs(traced.span("invoke_workflow main"))
    assert run_span["multirun.tokens_used"] == 2 * 1040
    assert run_span["multirun.cost_usd"] == pytest.approx(2 * expected)
    # charged in "ask" (by multirun, or by an SDK instrumentation's span inside it), and once:
    # "answer", which holds it, rolls up the same call
    assert attrs(step_span(traced, "ask"))["multirun.tokens_used"] == 1040
    assert attrs(step_span(traced, "answer"))["multirun.tokens_used"] == 1040


class ToLocal(httpx.BaseTransport):
    """Sends every request to the local server, as a hosts-file entry would: the SDK and httpx
    see the provider's own URL (the response's ``url``), only the connection is local."""

    def __init__(self, local_url: str) -> None:
        self._local = httpx.URL(local_url)
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url.copy_with(scheme="http", host=self._local.host, port=self._local.port)
        return self._inner.handle_request(
            httpx.Request(request.method, url, headers=request.headers, content=request.read())
        )

    def close(self) -> None:
        self._inner.close()


def test_a_raw_response_is_priced_at_the_provider_its_url_names(traced, answering) -> None:
    """A Groq model called through the OpenAI SDK: its raw response's URL
    (``https://api.groq.com/openai/v1/...``) says who bills it, so it is priced at Groq's price,
    where its model name alone is no model genai-prices knows (unpriced)."""
    model = "llama-3.3-70b-versatile"
    usage = '{"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040}'
    answering.body = chat_body(usage, model)
    http_client = httpx.Client(transport=ToLocal(answering.url))
    groq = openai.OpenAI(
        base_url="https://api.groq.com/openai/v1", api_key="test", max_retries=0, http_client=http_client
    )

    @step
    def ask() -> Any:
        return groq.chat.completions.with_raw_response.create(model=model, messages=[])

    @run(name="main")
    def main() -> Any:
        return ask()

    with groq:
        raw = main()
    assert str(raw.http_response.url) == "https://api.groq.com/openai/v1/chat/completions"
    run_span = attrs(traced.span("invoke_workflow main"))
    assert "multirun.cost.unpriced" not in run_span
    assert run_span["multirun.cost_usd"] == pytest.approx(
        price(model, "groq", input_tokens=1000, output_tokens=40)
    )
    assert attrs(step_span(traced, "ask"))["gen_ai.provider.name"] == "groq"


def tier_price(model: str, tier: str) -> float:
    usage = genai_prices.Usage(input_tokens=1000, output_tokens=40)
    context = {"service_tier": tier}
    return float(
        genai_prices.calc_price(usage, model, provider_id="openai", price_context=context).total_price
    )


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("tier", ["flex", "priority"])
def test_a_response_served_at_a_service_tier_is_charged_that_tiers_price(
    traced, answering, raw_client, api, tier
) -> None:
    """OpenAI bills a flex call half, a priority one more: the tier the response says it was
    served at (``service_tier``) prices it."""
    model = "gpt-5-2025-08-07"
    assert tier_price(model, tier) != price(model, "openai", input_tokens=1000, output_tokens=40)
    if api == "chat":
        usage = '{"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040}'
        body = json.loads(chat_body(usage, model))
    else:
        body = {
            "id": "resp_1",
            "object": "response",
            "created_at": 1_730_000_000,
            "model": model,
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {"input_tokens": 1000, "output_tokens": 40, "total_tokens": 1040},
        }
    answering.body = json.dumps({**body, "service_tier": tier}).encode()

    @step
    def ask() -> Any:
        if api == "chat":
            return raw_client.chat.completions.create(model=model, messages=[], service_tier=tier)
        return raw_client.responses.create(model=model, input="x", service_tier=tier)

    @run(name="main")
    def main() -> None:
        ask()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.cost_usd"] == pytest.approx(
        tier_price(model, tier)
    )


def test_a_stream_served_at_a_service_tier_is_charged_that_tiers_price(traced) -> None:
    model = "gpt-5-2025-08-07"
    usage = {"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040}
    chunks = [chunk("o"), chunk("k"), chunk("", usage)]
    chunks = [c.model_copy(update={"model": model, "service_tier": "flex"}) for c in chunks]

    @step
    def ask() -> Iterator[ChatCompletionChunk]:
        yield from chunks

    @run(name="main")
    def main() -> None:
        list(ask())

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.cost_usd"] == pytest.approx(
        tier_price(model, "flex")
    )


@pytest.mark.parametrize(
    ("api", "operation"), [("completions", "text_completion"), ("embeddings", "embeddings"), ("chat", "chat")]
)
def test_the_operation_name_of_an_llm_step_is_that_of_the_response_it_returns(
    traced, metric_reader, answering, raw_client, api, operation
) -> None:
    model = {"completions": "gpt-3.5-turbo-instruct", "embeddings": "text-embedding-3-small"}.get(
        api, "gpt-4o-2024-08-06"
    )
    body: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "created": 1_730_000_000}
    body["choices"] = [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}]
    body["usage"] = {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}
    if api == "embeddings":
        body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]}
        body["usage"] = {"prompt_tokens": 30, "total_tokens": 30}
    whole = json.dumps({**body, "model": model}).encode()
    answering.body = whole if api != "chat" else chat_body(json.dumps(body["usage"]))

    @step(kind=StepKind.LLM_CALL)
    def ask() -> Any:
        if api == "completions":
            return raw_client.completions.create(model=model, prompt="x")
        if api == "embeddings":
            return raw_client.embeddings.create(model=model, input="x")
        return raw_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])

    @run(name="main")
    def main() -> None:
        ask()

    main()
    span = step_span(traced, "ask")
    assert span.name == f"{operation} {model}"
    assert attrs(span)["gen_ai.operation.name"] == operation
    assert operations(metric_reader, "gen_ai.client.token.usage") == {operation}
    assert operations(metric_reader, "gen_ai.client.operation.duration") == {operation}


def _operation_durations(reader: Any) -> list[tuple[dict[str, Any], int]]:
    """The attributes and count of each point of ``gen_ai.client.operation.duration``."""
    return [(dict(p.attributes), p.count) for p in points(reader, "gen_ai.client.operation.duration")]


@pytest.mark.parametrize("streamed", [False, True], ids=["response", "stream"])
def test_a_plain_step_returning_a_model_call_s_response_times_the_call(
    traced, metric_reader, answering, raw_client, streamed
) -> None:
    """A ``@step`` of no kind that returns the SDK's response (or yields its stream) is the model
    call: its tokens are in ``gen_ai.client.token.usage``, so its duration is in
    ``gen_ai.client.operation.duration`` too (a dashboard dividing one by the other saw calls
    with tokens and no time)."""
    model = "gpt-4o-2024-08-06"
    answering.body = chat_body(json.dumps({"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}))
    usage = {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}
    chunks = [c.model_copy(update={"model": model}) for c in (chunk("o"), chunk("k", usage))]

    @step
    def ask() -> Any:
        return raw_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])

    @step
    def ask_streaming() -> Iterator[ChatCompletionChunk]:
        yield from chunks

    @run(name="main")
    def main() -> None:
        if streamed:
            list(ask_streaming())
        else:
            ask()

    main()
    assert operations(metric_reader, "gen_ai.client.token.usage") == {"chat"}
    [(point, count)] = _operation_durations(metric_reader)
    assert count == 1
    assert point["gen_ai.operation.name"] == "chat"
    assert point["gen_ai.response.model"] == model
    assert point["gen_ai.provider.name"] == "openai"


def test_a_plain_step_that_reports_no_model_call_is_not_timed_as_one(traced, metric_reader) -> None:
    """A function step that returns no SDK response adds nothing to the operation durations."""

    @step
    def tally() -> int:
        return 3

    @run(name="main")
    def main() -> None:
        tally()

    main()
    assert _operation_durations(metric_reader) == []


def test_an_embeddings_call_has_input_tokens_only(traced, metric_reader, answering, raw_client) -> None:
    """An embeddings call produces no output tokens: its span carries ``gen_ai.usage.input_tokens``
    alone and ``gen_ai.client.token.usage`` gets no ``output`` measurement (a 0 there would sit in
    the output distribution of every dashboard that groups by model), as the conventions'
    embeddings span and the reference instrumentations have it."""
    model = "text-embedding-3-small"
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]}
    answering.body = json.dumps(
        {**body, "model": model, "usage": {"prompt_tokens": 30, "total_tokens": 30}}
    ).encode()

    @step(kind=StepKind.LLM_CALL)
    def embed() -> Any:
        return raw_client.embeddings.create(model=model, input="x")

    @run(name="main")
    def main() -> None:
        embed()

    main()
    span = attrs(step_span(traced, "embed"))
    assert span["gen_ai.usage.input_tokens"] == 30
    assert "gen_ai.usage.output_tokens" not in span
    token_types = [
        (point.attributes["gen_ai.token.type"], point.sum)
        for point in points(metric_reader, "gen_ai.client.token.usage")
    ]
    assert token_types == [("input", 30)]


async def test_the_responses_in_a_list_or_tuple_a_step_returns_are_each_charged_once(
    traced, llm, client
) -> None:
    """``asyncio.gather`` of model calls in one step, or ``(answer, response)``: every response
    is charged; a step passing one of them on charges it no second time."""
    import asyncio

    async_client = openai.AsyncOpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @step
    async def fan_out() -> list[Any]:
        return await asyncio.gather(
            *(async_client.chat.completions.create(model="gpt-4o-mini", messages=[]) for _ in range(3))
        )

    @step
    def answer() -> tuple[str, Any]:
        response = client.chat.completions.create(model="gpt-4o-mini", messages=[])
        return "the answer", response

    @step
    def check(responses: list[Any]) -> tuple[Any, ...]:
        return tuple(responses)

    @run(name="main")
    async def main() -> None:
        check(await fan_out())
        answer()

    await main()
    await async_client.close()
    assert attrs(step_span(traced, "fan_out"))["multirun.tokens_used"] == tokens_of(CANNED[:3])
    assert attrs(step_span(traced, "answer"))["multirun.tokens_used"] == CANNED[3].tokens
    assert "multirun.tokens_used" not in attrs(step_span(traced, "check"))
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == tokens_of(CANNED[:4])


@pytest.mark.parametrize("at", [0, 40, -1])
def test_a_response_in_a_long_list_a_step_returns_is_charged(traced, at) -> None:
    """Wherever it stands among many plain values (the rows a step read, say)."""

    @step
    def ask() -> list[Any]:
        rows: list[Any] = [f"row {i}" for i in range(80)]
        rows.insert(at if at >= 0 else len(rows), chat_completion(1000, 40))
        return rows

    @run(name="main")
    def main() -> None:
        ask()

    main()
    assert attrs(traced.span("invoke_workflow main"))["multirun.tokens_used"] == 1040


def tokens_of(canned: list[Any]) -> int:
    return sum(usage.tokens for usage in canned)
