"""ClientAI agents traced and governed by ClientAIInstrumentor, without a change to their code.

No mock of ClientAI: the real package runs, with its real OpenAI provider,
whose SDK client is a scripted fake of the OpenAI API
(tests/clientai_programs/fake_openai.py) answering with real ``openai``
ChatCompletion objects and stream chunks with usage
(tests/clientai_programs/fake_providers.py does the same for its Groq, Ollama
and Replicate providers). The research agent of
tests/clientai_programs/research_agent.py is plain ClientAI code (think -> act
with a tool selection and a tool call -> observe -> synthesize); every token
count is fixed by the script, so every total below is known.

What is proved: the exact span trees (names, kinds, parents, statuses, token
roll-ups) for a multi-step agent, a streamed answer, a retry that succeeds on
the second attempt and a failing step; tokens read from the provider's full
response of every provider and charged exactly once; a budget stops the agent before its next
step with BudgetExceededError; the policy's fallback model reaches the API;
a failure of the instrumentation costs a log line, not the agent; the same
unchanged program run under ``opentelemetry-instrument`` gives the same tree.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import wrapt
from clientai import ClientAI
from clientai.agent import Agent, StepConfig, ToolConfig, act, create_agent, synthesize, think
from clientai.agent import run as custom_run
from clientai.agent.core.agent import Agent as CoreAgent
from clientai.agent.exceptions import WorkflowError
from clientai.exceptions import APIError, InvalidRequestError
from openai.types.chat import ChatCompletionChunk
from opentelemetry.trace import StatusCode

import multirun
from child_processes import environment_without_settings
from clientai_programs import research_agent
from clientai_programs.fake_openai import APIFailure, FakeCompletions, Reply, ScriptedModel, offline_client
from clientai_programs.fake_providers import (
    offline_groq_client,
    offline_ollama_client,
    offline_replicate_client,
)
from clientai_programs.research_agent import MODEL, TOPIC
from multirun.cli import render
from multirun.cli.runs import SpanRecord, build_tree, find_runs, load_spans, record_from_span
from multirun.errors import BudgetExceededError, ConfigurationError, PolicyViolation
from multirun.integrations import _options as integration_options
from multirun.integrations import clientai as integration
from multirun.integrations.clientai import ClientAIInstrumentor
from multirun.models import Budget, Policy, StepKind
from multirun.models.policy import (
    CircuitBreakerRule,
    DegradationTrigger,
    GracefulDegradationRule,
    RateLimitRule,
)
from multirun.telemetry import attributes as attr
from test_openai_usage import CANNED, llm
from test_openai_usage import instrumented as openai_traced

__all__ = ["llm", "openai_traced"]  # fixtures, imported for pytest

TESTS = Path(__file__).resolve().parent
CLIENTAI_PACKAGE = Path(sys.modules["clientai"].__file__ or "").parent

# The tree of one research agent run outside any run: the instrumentation starts a run for it.
RESEARCH_TREE = [
    "invoke_workflow ResearchAgent completed tokens=296",
    "  invoke_agent ResearchAgent completed tokens=296",
    "    chat gpt-4o-mini [analyze llm_call] completed tokens=28",
    "      chat gpt-4o-mini [generate_text llm_call] completed tokens=28 in=20 out=8",
    "    chat gpt-4o-mini [gather llm_call] completed tokens=226",
    "      execute_tool select_tools [select_tools tool_call] completed tokens=180",
    "        chat gpt-4o-mini [generate_text llm_call] completed tokens=180 in=150 out=30",
    "      execute_tool search [search tool_call] completed",
    "      chat gpt-4o-mini [generate_text llm_call] completed tokens=46 in=40 out=6",
    "    step note [note function] completed",
    "    chat gpt-4o-mini [report llm_call] completed tokens=42",
    "      chat gpt-4o-mini [generate_text llm_call] completed tokens=42 in=30 out=12",
]

# ClientAI's providers, each offline: their full responses carry the tokens in different shapes
PROVIDERS = {
    "openai": offline_client,
    "groq": offline_groq_client,
    "ollama": offline_ollama_client,
    "replicate": offline_replicate_client,
}
# (provider, stream): a Replicate stream sends text only, no tokens
PROVIDER_CASES = [
    pytest.param(name, stream, id=f"{name}-{'streamed' if stream else 'plain'}")
    for stream in (False, True)
    for name in PROVIDERS
    if not (stream and name == "replicate")
]


@pytest.fixture(scope="module", autouse=True)
def instrumented() -> Iterator[ClientAIInstrumentor]:
    instrumentor = ClientAIInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


# ---------------------------------------------------------------------------
# helpers


def records(traced: Any) -> list[SpanRecord]:
    return [record_from_span(s) for s in traced.spans()]


def run_roots(spans: list[SpanRecord]) -> list[SpanRecord]:
    """The run spans, oldest first."""
    return [r.span for r in reversed(find_runs(spans))]


def tree(spans: list[SpanRecord], root: SpanRecord | None = None) -> list[str]:
    """One line per span, indented by depth: name, [step name and kind], status, tokens."""
    if root is None:
        (root,) = run_roots(spans)
    lines: list[str] = []

    def walk(node: Any, depth: int) -> None:
        a = node.span.attributes
        parts = [node.span.name]
        if attr.STEP_NAME in a:
            parts.append(f"[{a[attr.STEP_NAME]} {a[attr.STEP_KIND]}]")
        parts.append(str(a.get(attr.STEP_STATUS) or a.get(attr.AGENT_STATUS) or a.get(attr.RUN_STATUS)))
        if attr.TOKENS_USED in a:
            parts.append(f"tokens={a[attr.TOKENS_USED]}")
        if attr.GEN_AI_USAGE_INPUT_TOKENS in a:
            parts.append(f"in={a[attr.GEN_AI_USAGE_INPUT_TOKENS]} out={a[attr.GEN_AI_USAGE_OUTPUT_TOKENS]}")
        lines.append("  " * depth + " ".join(parts))
        for child in node.children:
            walk(child, depth + 1)

    walk(build_tree(spans, root), 0)
    return lines


def named(spans: list[SpanRecord], step_name: str) -> list[SpanRecord]:
    return [s for s in spans if s.attributes.get(attr.STEP_NAME) == step_name]


def one(spans: list[SpanRecord], step_name: str) -> SpanRecord:
    (found,) = named(spans, step_name)
    return found


# ---------------------------------------------------------------------------
# the multi-step agent


def test_multi_step_agent_becomes_a_run_with_one_span_per_step_call_and_tool(traced: Any) -> None:
    agent, model = research_agent.build()

    answer = agent.run(TOPIC)

    assert answer == research_agent.REPORT.text  # the caller gets text, as without instrumentation
    spans = records(traced)
    assert tree(spans) == RESEARCH_TREE
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.STEPS_USED] == 10  # every step, LLM call and tool span is a step
    # the tool was called with the arguments the model chose
    assert one(spans, "search").attributes[attr.GEN_AI_TOOL_NAME] == "search"
    assert model.prompts()[2].startswith("GATHER facts")
    assert "3 results for OpenTelemetry adoption 2025" in model.prompts()[2]


def test_llm_calls_carry_model_provider_and_usage_and_the_run_their_cost(traced: Any) -> None:
    agent, _ = research_agent.build()
    agent.run(TOPIC)

    spans = records(traced)
    calls = named(spans, "generate_text")
    assert len(calls) == 4
    for call in calls:
        a = call.attributes
        assert a[attr.GEN_AI_OPERATION_NAME] == "chat"
        assert a[attr.GEN_AI_REQUEST_MODEL] == MODEL
        assert a[attr.GEN_AI_RESPONSE_MODEL] == MODEL
        assert a[attr.GEN_AI_PROVIDER_NAME] == "openai"
        assert a[attr.GEN_AI_USAGE_COST_CURRENCY] == "USD"
        assert attr.UNPRICED not in a
    # each call's own response id, as the provider gave it
    ids = [call.attributes[attr.GEN_AI_RESPONSE_ID] for call in calls]
    assert len(set(ids)) == 4 and all(ident.startswith("chatcmpl-") for ident in ids)
    gather_call = [c for c in calls if c.attributes[attr.GEN_AI_USAGE_INPUT_TOKENS] == 40]
    assert gather_call[0].attributes[attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 10
    # gen_ai.usage.* only on the calls themselves: a backend summing them counts each call once
    for span in spans:
        if span.attributes.get(attr.STEP_NAME) != "generate_text":
            assert attr.GEN_AI_USAGE_INPUT_TOKENS not in span.attributes, span.name
    (run_span,) = run_roots(spans)
    cost = sum(c.attributes[attr.GEN_AI_USAGE_COST_AMOUNT] for c in calls)
    assert cost > 0
    assert run_span.attributes[attr.COST_USD] == pytest.approx(cost)
    assert one(spans, "gather").attributes[attr.COST_USD] == pytest.approx(
        sum(c.attributes[attr.GEN_AI_USAGE_COST_AMOUNT] for c in calls[1:3])
    )


def test_agents_inside_an_active_run_are_its_agents(traced: Any) -> None:
    first, _ = research_agent.build()
    second, _ = research_agent.build()

    @multirun.run(name="crew")
    def crew() -> list[str]:
        return [first.run(TOPIC), second.run(TOPIC)]

    crew()

    spans = records(traced)
    lines = tree(spans)
    assert lines[0] == "invoke_workflow crew completed tokens=592"
    assert lines[1:] == RESEARCH_TREE[1:] * 2  # two agents of the run, each with its steps


def test_streamed_answer_keeps_its_spans_open_until_consumed(traced: Any) -> None:
    agent, model = research_agent.build(stream=True)

    stream = agent.run(TOPIC, stream=True)

    assert isinstance(stream, Iterator)
    assert not [s for s in traced.spans() if s.name.startswith("invoke_agent")]  # not consumed yet
    chunks = list(stream)
    assert "".join(chunks) == research_agent.REPORT.text
    assert len(chunks) == 8
    spans = records(traced)
    assert tree(spans) == RESEARCH_TREE  # the same tree and tokens as without streaming
    report_call = named(spans, "generate_text")[-1]
    assert report_call.attributes[attr.STEP_STREAM_ITEMS] == 8
    assert one(spans, "report").attributes[attr.STEP_STREAM_ITEMS] == 8
    # the usage came from the stream's last chunk, which the instrumentation asked for
    assert model.calls[-1]["stream"] is True
    assert model.calls[-1]["stream_options"] == {"include_usage": True}


def test_stream_closed_early_ends_its_spans_with_what_was_handed_out(traced: Any) -> None:
    agent, _ = research_agent.build(stream=True)

    stream = agent.run(TOPIC, stream=True)
    assert [next(stream), next(stream)] == ["OpenTelemetry", " adoption"]
    stream.close()  # type: ignore[attr-defined]

    spans = records(traced)
    report_call = named(spans, "generate_text")[-1]
    assert report_call.attributes[attr.STEP_STATUS] == "completed"
    assert report_call.attributes[attr.STEP_STREAM_ITEMS] == 2
    assert attr.GEN_AI_USAGE_INPUT_TOKENS not in report_call.attributes  # the usage chunk never came
    assert report_call.attributes[attr.USAGE_UNKNOWN] is True
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.RUN_STATUS] == "completed"
    assert run_span.attributes[attr.TOKENS_USED] == 296 - 42


def test_stream_dropped_unread_still_ends_its_agent_and_run(traced: Any) -> None:
    agent, model = research_agent.build(stream=True)

    stream = agent.run(TOPIC, stream=True)
    del stream
    gc.collect()

    spans = records(traced)
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.RUN_STATUS] == "completed"
    assert named(spans, "generate_text")[-1].attributes[attr.STEP_STREAM_ITEMS] == 0
    assert len(model.calls) == 4  # the request was sent: the run shows the call, with no tokens


class UnreadStreamAgent(Agent):
    """A streamed step whose stream no step reads: the next step takes no input."""

    @think("draft", stream=True)
    def draft(self, topic: str) -> str:
        return f"REPORT on {topic}"

    @synthesize("wrap_up")
    def wrap_up(self) -> str:
        return "ANALYZE nothing in particular"


class UnpassedStreamAgent(Agent):
    """A streamed step that passes on no result: the next step reads the original input."""

    @think("draft", stream=True, step_config=StepConfig(pass_result=False))
    def draft(self, topic: str) -> str:
        return f"REPORT on {topic}"

    @synthesize("wrap_up")
    def wrap_up(self, topic: str) -> str:
        return f"ANALYZE {topic}"


@pytest.mark.parametrize("agent_class", [UnreadStreamAgent, UnpassedStreamAgent])
def test_a_streamed_step_no_one_reads_is_in_the_trace_when_its_agent_ends(
    traced: Any, agent_class: type[Agent], caplog: pytest.LogCaptureFixture
) -> None:
    model = ScriptedModel(research_agent.script())
    agent = agent_class(client=offline_client(model), default_model=MODEL)

    assert agent.run(TOPIC) == research_agent.ANALYZE.text
    assert len(model.calls) == 2  # the draft's request was sent, its stream kept unread by ClientAI

    spans = records(traced)
    assert tree(spans) == [
        f"invoke_workflow {agent_class.__name__} completed tokens=28",
        f"  invoke_agent {agent_class.__name__} completed tokens=28",
        "    chat gpt-4o-mini [draft llm_call] completed",
        "      chat gpt-4o-mini [generate_text llm_call] completed",
        "    chat gpt-4o-mini [wrap_up llm_call] completed tokens=28",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=28 in=20 out=8",
    ]
    draft = one(spans, "draft")
    (draft_call,) = [s for s in named(spans, "generate_text") if s.parent_span_id == draft.span_id]
    for ended in (draft, draft_call):  # ended as a stream closed before its end, and marked
        assert ended.attributes[attr.STEP_STREAM_ITEMS] == 0
        assert ended.attributes[attr.STEP_STREAM_UNFINISHED] is True
    assert render.notes(draft) == "streamed 0 chunks, not read to its end"  # as `multirun runs show` says
    # the stream ClientAI kept reads as it would have, after the run: its late usage is only warned of
    with caplog.at_level(logging.WARNING):
        assert "".join(agent.context.last_results["draft"]) == research_agent.REPORT.text
    assert len(traced.spans()) == len(spans)
    (late,) = caplog.records  # nothing tried to write to the ended spans (the SDK would warn)
    assert "42 tokens were reported by step 'generate_text' after run" in late.getMessage()


def test_a_stream_left_unread_by_its_agent_and_read_later_in_the_run_is_charged_to_the_run(
    traced: Any,
) -> None:
    model = ScriptedModel(research_agent.script())
    agent = UnreadStreamAgent(client=offline_client(model), default_model=MODEL)

    @multirun.run(name="crew")
    def crew() -> str:
        agent.run(TOPIC)
        return "".join(agent.context.last_results["draft"])

    assert crew() == research_agent.REPORT.text
    spans = records(traced)
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.TOKENS_USED] == 28 + 42  # the draft's tokens came after its agent ended
    assert one(spans, "draft").attributes[attr.STEP_STREAM_UNFINISHED] is True


@pytest.mark.parametrize(("provider", "stream"), PROVIDER_CASES)
def test_every_provider_s_tokens_are_read_from_its_full_response(
    traced: Any, provider: str, stream: bool
) -> None:
    agent, _ = research_agent.build(stream=stream, client=PROVIDERS[provider])

    answer = agent.run(TOPIC, stream=stream)

    assert "".join(answer) == research_agent.REPORT.text  # text, as the provider gives it
    spans = records(traced)
    assert tree(spans) == RESEARCH_TREE  # the same tokens, whatever shape the provider reports them in
    assert {c.attributes[attr.GEN_AI_PROVIDER_NAME] for c in named(spans, "generate_text")} == {provider}


def test_a_replicate_stream_says_on_its_span_that_its_tokens_are_unknown(traced: Any) -> None:
    # ClientAI streams a copy of the prediction as created, before Replicate counted any token
    agent, _ = research_agent.build(stream=True, client=offline_replicate_client)

    answer = agent.run(TOPIC, stream=True)

    assert "".join(answer) == research_agent.REPORT.text
    spans = records(traced)
    *plain_calls, streamed_call = named(spans, "generate_text")
    assert attr.GEN_AI_USAGE_INPUT_TOKENS not in streamed_call.attributes
    assert streamed_call.attributes[attr.USAGE_UNKNOWN] is True
    assert render.notes(streamed_call) == "streamed 8 chunks; tokens unknown"  # in `multirun runs show`
    assert [attr.USAGE_UNKNOWN in call.attributes for call in plain_calls] == [False, False, False]
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.TOKENS_USED] == research_agent.TOTAL_TOKENS - 42


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_s_chat_is_charged_and_gives_the_caller_its_text(
    traced: Any, provider: str, stream: bool
) -> None:
    model = ScriptedModel(research_agent.script())
    client = PROVIDERS[provider](model)

    @multirun.run(name="direct")
    def direct() -> Any:
        return client.chat([{"role": "user", "content": "REPORT now"}], model=MODEL, stream=stream)

    answer = direct()

    assert "".join(answer) == research_agent.REPORT.text
    (call,) = named(records(traced), "chat")
    if provider == "replicate" and stream:  # its events are text only
        assert attr.GEN_AI_USAGE_INPUT_TOKENS not in call.attributes
        assert call.attributes[attr.USAGE_UNKNOWN] is True
        return
    assert attr.USAGE_UNKNOWN not in call.attributes
    assert call.attributes[attr.GEN_AI_USAGE_INPUT_TOKENS] == research_agent.REPORT.prompt_tokens
    assert call.attributes[attr.GEN_AI_USAGE_OUTPUT_TOKENS] == research_agent.REPORT.completion_tokens


class ChunkAgent(Agent):
    @synthesize("report", stream=True, return_full_response=True)
    def report(self, topic: str) -> str:
        return f"REPORT on {topic}"


def test_a_step_streaming_full_chunks_is_charged_and_hands_out_only_the_chunks_asked_for(traced: Any) -> None:
    model = ScriptedModel(research_agent.script())
    agent = ChunkAgent(client=offline_client(model), default_model=MODEL)

    chunks = list(agent.run(TOPIC))

    # the API's own chunks (role, 8 words, finish), without the usage chunk asked for on their behalf
    assert len(chunks) == 10
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == research_agent.REPORT.text
    assert model.calls[-1]["stream_options"] == {"include_usage": True}
    assert tree(records(traced)) == [
        "invoke_workflow ChunkAgent completed tokens=42",
        "  invoke_agent ChunkAgent completed tokens=42",
        "    chat gpt-4o-mini [report llm_call] completed tokens=42",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=42 in=30 out=12",
    ]


def test_a_tool_s_result_reaches_the_caller_as_it_is_an_open_file_too(traced: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("adoption doubled\n")

    def search(query: str) -> Any:
        """Open the notes kept on the query."""
        return notes.open()

    agent, _ = research_agent.build(tool=search)

    @multirun.run(name="direct")
    def direct() -> str:
        with agent.use_tool("search", query=TOPIC) as found:  # the file, not a wrapper of it
            return str(found.read())

    assert direct() == "adoption doubled\n"
    tool = one(records(traced), "search")  # its span covers the call, ended when the tool returned
    assert tool.attributes[attr.STEP_STATUS] == "completed"
    assert attr.STEP_STREAM_ITEMS not in tool.attributes


class FilteringCompletions(FakeCompletions):
    """Azure OpenAI's API: a stream opens with a chunk of content-filter results, with no choices."""

    def create(self, **request: Any) -> Any:
        answer = super().create(**request)
        if not request.get("stream"):
            return answer
        opening = {"id": "", "object": "chat.completion.chunk", "created": 0, "model": "", "choices": []}
        filtered = [{"prompt_index": 0, "content_filter_results": {}}]

        def chunks() -> Iterator[ChatCompletionChunk]:
            yield ChatCompletionChunk.model_validate({**opening, "prompt_filter_results": filtered})
            yield from answer

        return chunks()


def test_full_chunks_without_choices_reach_the_caller_only_the_usage_chunk_asked_for_does_not(
    traced: Any,
) -> None:
    model = ScriptedModel(research_agent.script())
    client = offline_client(model)
    client.provider.client.chat.completions = FilteringCompletions(model)  # type: ignore[attr-defined]
    messages = [{"role": "user", "content": "REPORT now"}]

    def chunks() -> list[Any]:
        return list(client.chat(messages, model=MODEL, stream=True, return_full_response=True))

    untraced = chunks()  # outside any run: ClientAI as it is
    traced_chunks = multirun.run(name="direct")(chunks)()

    # the same chunks as without instrumentation (but for their ids): the filter results too
    def dumped(chunks: list[Any]) -> list[dict[str, Any]]:
        return [c.model_dump(exclude={"id"}) for c in chunks]

    assert dumped(traced_chunks) == dumped(untraced)
    assert traced_chunks[0].prompt_filter_results  # type: ignore[attr-defined]
    assert model.calls[-1]["stream_options"] == {"include_usage": True}
    assert named(records(traced), "chat")[0].attributes[attr.TOKENS_USED] == 42


# ---------------------------------------------------------------------------
# retries and errors


class FlakyAgent(Agent):
    @think("draft", step_config=StepConfig(retry_count=2))
    def draft(self, topic: str) -> str:
        return f"DRAFT a summary of {topic}"


class BrokenAgent(Agent):
    @think("draft")
    def draft(self, topic: str) -> str:
        return f"DRAFT a summary of {topic}"

    @think("polish")
    def polish(self, draft: str) -> str:
        return f"POLISH {draft}"


def test_a_retry_that_succeeds_is_a_second_attempt_of_the_step(traced: Any) -> None:
    model = ScriptedModel(
        {"DRAFT": [APIFailure("Error code: 503 - upstream overloaded"), Reply("A short summary.", 12, 4)]}
    )
    agent = FlakyAgent(client=offline_client(model), default_model=MODEL)

    assert agent.run(TOPIC) == "A short summary."

    spans = records(traced)
    assert tree(spans) == [
        "invoke_workflow FlakyAgent completed tokens=16",
        "  invoke_agent FlakyAgent completed tokens=16",
        "    chat gpt-4o-mini [draft llm_call] completed tokens=16",
        "      chat gpt-4o-mini [generate_text llm_call] failed",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=16 in=12 out=4",
    ]
    draft = one(spans, "draft")
    assert draft.attributes[attr.STEP_ATTEMPT] == 2
    (event,) = draft.events
    assert event["name"] == "exception"
    assert event["attributes"][attr.STEP_ATTEMPT] == 1
    assert event["attributes"][attr.ERROR_TYPE] == "clientai.exceptions.APIError"
    failed_call = named(spans, "generate_text")[0]
    assert failed_call.attributes[attr.ERROR_TYPE] == "clientai.exceptions.APIError"
    assert failed_call.status_code == StatusCode.ERROR.value
    assert len(model.calls) == 2


def test_retries_that_run_out_leave_every_attempt_on_the_failed_step(traced: Any) -> None:
    model = ScriptedModel({"DRAFT": [APIFailure("Error code: 503 - upstream overloaded")]})
    agent = FlakyAgent(client=offline_client(model), default_model=MODEL)

    with pytest.raises(WorkflowError):  # ClientAI's own error reaches the caller unchanged
        agent.run(TOPIC)

    spans = records(traced)
    draft = one(spans, "draft")
    assert draft.attributes[attr.STEP_STATUS] == "failed"
    assert draft.attributes[attr.STEP_ATTEMPT] == 3
    retried = [
        e["attributes"][attr.STEP_ATTEMPT] for e in draft.events if attr.STEP_ATTEMPT in e["attributes"]
    ]
    assert retried == [1, 2]
    assert draft.attributes[attr.ERROR_TYPE] == "clientai.exceptions.APIError"
    assert len(named(spans, "generate_text")) == 3 == len(model.calls)


def test_a_failing_step_fails_its_agent_and_run_and_nothing_after_it_runs(traced: Any) -> None:
    model = ScriptedModel(
        {
            "DRAFT": [APIFailure("Error code: 400 - invalid request: context too long")],
            "POLISH": [Reply("never asked", 1, 1)],
        }
    )
    agent = BrokenAgent(client=offline_client(model), default_model=MODEL)

    with pytest.raises(WorkflowError) as raised:
        agent.run(TOPIC)

    spans = records(traced)
    assert tree(spans) == [
        "invoke_workflow BrokenAgent failed tokens=0",
        "  invoke_agent BrokenAgent failed tokens=0",
        "    chat gpt-4o-mini [draft llm_call] failed",
        "      chat gpt-4o-mini [generate_text llm_call] failed",
    ]
    draft = one(spans, "draft")
    assert draft.attributes[attr.ERROR_TYPE] == "clientai.exceptions.InvalidRequestError"
    assert draft.status_code == StatusCode.ERROR.value
    assert draft.attributes[attr.STEP_ATTEMPT] == 1
    (agent_span,) = [s for s in spans if s.name == "invoke_agent BrokenAgent"]
    assert agent_span.attributes[attr.ERROR_TYPE] == "clientai.agent.exceptions.WorkflowError"
    assert isinstance(raised.value.__cause__, ValueError)
    assert isinstance(raised.value.__cause__.__context__.__cause__, InvalidRequestError)  # type: ignore[union-attr]
    assert len(model.calls) == 1


def test_a_failing_tool_is_a_failed_tool_span_and_the_agent_goes_on(traced: Any) -> None:
    def search(query: str) -> str:
        """Search the offline index and return what it found."""
        raise ConnectionError(f"index offline while looking for {query}")

    agent, model = research_agent.build(tool=search)

    assert agent.run(TOPIC) == research_agent.REPORT.text  # ClientAI keeps the error for the prompt

    spans = records(traced)
    tool = one(spans, "search")
    assert tool.attributes[attr.STEP_STATUS] == "failed"
    assert tool.attributes[attr.ERROR_TYPE] == "ConnectionError"
    assert tool.status_code == StatusCode.ERROR.value
    assert one(spans, "gather").attributes[attr.STEP_STATUS] == "completed"
    assert "index offline" in model.prompts()[2]


# ---------------------------------------------------------------------------
# ClientAI's step and agent options


class OptionsAgent(Agent):
    @think("skipped", step_config=StepConfig(enabled=False))
    def skipped(self, topic: str) -> str:
        return f"ANALYZE {topic}"

    @think("optional", step_config=StepConfig(required=False))
    def optional(self, topic: str) -> str:
        return f"DRAFT {topic}"

    @think("plan", send_to_llm=False)
    def plan(self, topic: str) -> str:
        return f"plan for {topic}"

    @act("fetch", send_to_llm=False)
    def fetch(self, plan: str) -> str:
        return f"fetched {plan}"

    @act("gather", tool_confidence=0.95, step_config=StepConfig(retry_count=2, use_internal_retry=False))
    def gather(self, fetched: str) -> str:
        return f"GATHER facts for {fetched}"


def test_step_options_disabled_optional_local_no_retry_and_tool_confidence(traced: Any) -> None:
    script = {**research_agent.script(), "DRAFT": [APIFailure("Error code: 400 - invalid draft")]}
    model = ScriptedModel(script)
    agent = OptionsAgent(
        client=offline_client(model),
        default_model=MODEL,
        tools=[ToolConfig(tool=research_agent.search, scopes=["act"], name="search")],
    )

    assert agent.run(TOPIC) == research_agent.GATHER.text

    spans = records(traced)
    assert tree(spans) == [
        "invoke_workflow OptionsAgent completed tokens=226",
        "  invoke_agent OptionsAgent completed tokens=226",
        # the disabled step is not run: no span; the optional one fails and the agent goes on
        "    chat gpt-4o-mini [optional llm_call] failed",
        "      chat gpt-4o-mini [generate_text llm_call] failed",
        # steps that do not send to the LLM: a think is a function, an act a tool call
        "    step plan [plan function] completed",
        "    execute_tool fetch [fetch tool_call] completed",
        # the model chose search with confidence 0.9, under the step's 0.95: no tool call
        "    chat gpt-4o-mini [gather llm_call] completed tokens=226",
        "      execute_tool select_tools [select_tools tool_call] completed tokens=180",
        "        chat gpt-4o-mini [generate_text llm_call] completed tokens=180 in=150 out=30",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=46 in=40 out=6",
    ]
    assert one(spans, "optional").attributes[attr.STEP_ATTEMPT] == 1  # use_internal_retry=False: no retry
    assert len(model.calls) == 3


class CustomRunAgent(Agent):
    @think("analyze")
    def analyze(self, topic: str) -> str:
        return f"ANALYZE the research question: {topic}"

    @synthesize("report")
    def report(self, notes: str) -> str:
        return f"REPORT from these notes: {notes}"

    @custom_run(description="analyze, then report")
    def analyze_and_report(self, topic: str) -> str:
        return str(self.report(self.analyze(topic)))


def test_a_custom_run_method_is_the_agent_and_the_steps_it_calls_its_steps(traced: Any) -> None:
    agent = CustomRunAgent(client=offline_client(ScriptedModel(research_agent.script())), default_model=MODEL)

    assert agent.run(TOPIC) == research_agent.REPORT.text

    assert tree(records(traced)) == [
        "invoke_workflow CustomRunAgent completed tokens=70",
        "  invoke_agent CustomRunAgent completed tokens=70",
        "    chat gpt-4o-mini [analyze llm_call] completed tokens=28",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=28 in=20 out=8",
        "    chat gpt-4o-mini [report llm_call] completed tokens=42",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=42 in=30 out=12",
    ]


class FallbackRunAgent(Agent):
    """A custom run that settles for its analysis when the budget stops the research."""

    @think("analyze")
    def analyze(self, topic: str) -> str:
        return f"ANALYZE the research question: {topic}"

    @act("gather")
    def gather(self, plan: str) -> str:
        return f"GATHER facts for this plan: {plan}"

    @custom_run(description="analyze, then gather if the budget allows")
    def analyze_then_gather(self, topic: str) -> str:
        plan = str(self.analyze(topic))
        try:
            return str(self.gather(plan))
        except BudgetExceededError as stopped:
            return f"plan only ({stopped.limit}): {plan}"


def test_a_step_whose_request_the_budget_refuses_raises_the_refusal_to_the_custom_run(traced: Any) -> None:
    """The tool selection inside gather crosses the budget: gather's own request is refused. The
    custom run sees BudgetExceededError, as when a step is refused before it starts, not the
    StepError ClientAI wraps the refusal in."""
    model = ScriptedModel(research_agent.script())
    agent = FallbackRunAgent(
        client=offline_client(model),
        default_model=MODEL,
        tools=[ToolConfig(tool=research_agent.search, scopes=["act"], name="search")],
    )

    @multirun.run(name="capped", budget=Budget(max_tokens=100))
    def capped() -> str:
        return str(agent.run(TOPIC))

    assert capped() == f"plan only (max_tokens): {research_agent.ANALYZE.text}"
    assert len(model.calls) == 2  # analyze and the tool selection: gather's request was never sent
    spans = records(traced)
    gather = one(spans, "gather")
    assert gather.attributes[attr.ERROR_TYPE] == "multirun.errors.BudgetExceededError"
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.RUN_STATUS] == "completed"  # the program handled it


def test_a_tool_the_budget_refuses_raises_the_refusal_from_use_tool(traced: Any) -> None:
    """``Agent.use_tool`` wraps whatever the tool raised in ToolError: a refusal comes out as itself."""
    model = ScriptedModel(research_agent.script())
    agent = CustomRunAgent(
        client=offline_client(model),
        default_model=MODEL,
        tools=[ToolConfig(tool=research_agent.search, scopes=["act"], name="search")],
    )

    @multirun.run(name="capped", budget=Budget(max_tokens=60))
    def capped() -> str:
        plan = str(agent.run(TOPIC))  # 70 tokens: the budget is spent
        try:
            return str(agent.use_tool("search", plan))
        except BudgetExceededError as stopped:
            return f"no search ({stopped.limit})"

    assert capped() == "no search (max_tokens)"
    assert one(records(traced), "search").attributes[attr.ERROR_TYPE] == "multirun.errors.BudgetExceededError"


def test_create_agent_is_an_agent_with_its_one_step(traced: Any) -> None:
    model = ScriptedModel(research_agent.script())
    agent = create_agent(
        offline_client(model), role="analyst", system_prompt="You analyze.", model=MODEL, step="think"
    )

    assert agent.run("ANALYZE the adoption of OpenTelemetry") == research_agent.ANALYZE.text

    assert tree(records(traced)) == [
        "invoke_workflow analyst completed tokens=28",
        "  invoke_agent analyst completed tokens=28",
        "    chat gpt-4o-mini [analyst_step llm_call] completed tokens=28",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=28 in=20 out=8",
    ]
    assert model.calls[0]["messages"][0] == {"role": "system", "content": "You analyze."}


def test_agents_made_by_create_agent_are_told_apart_by_the_role_they_were_given(traced: Any) -> None:
    model = ScriptedModel(research_agent.script())
    client = offline_client(model)
    analyst = create_agent(
        client, role="market analyst", system_prompt="You analyze.", model=MODEL, step="think"
    )
    writer = create_agent(client, role="writer", system_prompt="You write.", model=MODEL, step="synthesize")

    @multirun.run(name="crew")
    def crew() -> str:
        analyst.run("ANALYZE the adoption of OpenTelemetry")
        return str(writer.run("REPORT on it"))

    assert crew() == research_agent.REPORT.text

    agents = [s for s in traced.spans() if attr.AGENT_STATUS in (s.attributes or {})]
    assert [(s.name, s.attributes[attr.GEN_AI_AGENT_NAME]) for s in agents] == [
        ("invoke_agent market analyst", "market analyst"),
        ("invoke_agent writer", "writer"),
    ]


def test_agents_run_in_threads_are_agents_of_the_run_that_started_them(traced: Any) -> None:
    agents = [research_agent.build()[0] for _ in range(3)]

    @multirun.run(name="crew")
    def crew() -> list[str]:
        with ThreadPoolExecutor(max_workers=3) as pool:
            return list(pool.map(lambda agent: str(agent.run(TOPIC)), agents))

    assert crew() == [research_agent.REPORT.text] * 3

    spans = records(traced)
    lines = tree(spans)
    assert lines[0] == f"invoke_workflow crew completed tokens={3 * research_agent.TOTAL_TOKENS}"
    assert sorted(lines[1:]) == sorted(RESEARCH_TREE[1:] * 3)  # each agent with its own steps
    assert len(run_roots(spans)) == 1


# ---------------------------------------------------------------------------
# budgets and policy


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_budget_stops_the_agent_before_its_next_step(traced: Any, provider: str) -> None:
    agent, model = research_agent.build(client=PROVIDERS[provider])

    @multirun.run(name="capped", budget=Budget(max_tokens=250))
    def capped() -> str:
        return str(agent.run(TOPIC))

    with pytest.raises(BudgetExceededError) as raised:
        capped()

    assert raised.value.limit == "max_tokens"
    spans = records(traced)
    assert tree(spans) == [
        "invoke_workflow capped failed tokens=254",
        "  invoke_agent ResearchAgent failed tokens=254",
        "    chat gpt-4o-mini [analyze llm_call] completed tokens=28",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=28 in=20 out=8",
        "    chat gpt-4o-mini [gather llm_call] completed tokens=226",
        "      execute_tool select_tools [select_tools tool_call] completed tokens=180",
        "        chat gpt-4o-mini [generate_text llm_call] completed tokens=180 in=150 out=30",
        "      execute_tool search [search tool_call] completed",
        "      chat gpt-4o-mini [generate_text llm_call] completed tokens=46 in=40 out=6",
        "    step note [note function] failed",
    ]
    refused = one(spans, "note")
    assert refused.attributes[attr.POLICY_DECISION] == "abort"
    assert refused.attributes[attr.BUDGET_EXCEEDED_LIMIT] == "max_tokens"
    (agent_span,) = [s for s in spans if s.name == "invoke_agent ResearchAgent"]
    assert agent_span.attributes[attr.ERROR_TYPE] == "multirun.errors.BudgetExceededError"
    assert not [p for p in model.prompts() if p.startswith("REPORT")]  # the model was never asked


def test_runs_started_for_agents_take_the_budget_given_to_instrument(
    traced: Any, instrumented: ClientAIInstrumentor
) -> None:
    instrumented.uninstrument()
    instrumented.instrument(budget=Budget(max_tokens=100))
    try:
        agent, model = research_agent.build()
        with pytest.raises(BudgetExceededError):
            agent.run(TOPIC)
    finally:
        instrumented.uninstrument()
        instrumented.instrument()

    spans = records(traced)
    (run_span,) = run_roots(spans)
    assert run_span.attributes["multirun.budget.max_tokens"] == 100
    assert run_span.attributes[attr.RUN_STATUS] == "failed"
    # the tool selection crossed the limit: its tool was refused (ClientAI swallows tool errors),
    # then the step's own LLM call was refused, so the model saw two requests only
    assert len(model.calls) == 2
    assert "uses tools to solve problems" in model.prompts()[1]
    assert one(spans, "search").attributes[attr.POLICY_DECISION] == "abort"
    assert named(spans, "generate_text")[-1].attributes[attr.POLICY_DECISION] == "abort"


def test_the_policy_fallback_model_is_the_model_the_api_is_asked_for(traced: Any) -> None:
    agent, model = research_agent.build(default_model="gpt-4o")
    degrade = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.TOKEN_PERCENTAGE, threshold=10
    )

    @multirun.run(name="frugal", budget=Budget(max_tokens=2000), policy=Policy(graceful_degradation=degrade))
    def frugal() -> str:
        return str(agent.run(TOPIC))

    assert frugal() == research_agent.REPORT.text
    # 28 tokens (1.4%) after analyze, 208 (10.4%) after the tool selection: gather and report fall back
    assert [call["model"] for call in model.calls] == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    calls = named(records(traced), "generate_text")
    assert [c.name for c in calls] == ["chat gpt-4o", "chat gpt-4o", "chat gpt-4o-mini", "chat gpt-4o-mini"]
    assert [c.attributes[attr.POLICY_DECISION] for c in calls] == [
        "proceed",
        "proceed",
        "fallback",
        "fallback",
    ]


class TimedModel(ScriptedModel):
    """A scripted model that notes the (fake) time of every request."""

    def __init__(self, script: dict[str, list[Reply | Exception]], clock: Any) -> None:
        super().__init__(script)
        self.clock = clock
        self.times: list[float] = []

    def answer(self, request: dict[str, Any]) -> Reply:
        self.times.append(self.clock.now)
        return super().answer(request)


def test_one_request_of_an_agent_step_takes_one_rate_limit_slot(traced: Any) -> None:
    model = TimedModel(research_agent.script(), traced.clock)
    agent, _ = research_agent.build(model)
    start = traced.clock.now

    @multirun.run(name="paced", policy=Policy(rate_limit=RateLimitRule(requests_per_minute=120)))
    def paced() -> str:
        return str(agent.run(TOPIC))

    assert paced() == research_agent.REPORT.text
    # analyze, the tool selection, gather, report: four requests, one slot of 0.5 s each
    assert [t - start for t in model.times] == [0.0, 0.5, 1.0, 1.5]
    assert traced.clock.sleeps == [0.5, 0.5, 0.5]
    spans = records(traced)
    waits = [c.attributes.get(attr.POLICY_WAIT_SECONDS) for c in named(spans, "generate_text")]
    assert waits == [None, 0.5, 0.5, 0.5]
    for step_name in ("analyze", "gather", "report"):  # the steps around the requests: LLM calls, not paced
        span = one(spans, step_name)
        assert span.name == f"chat {MODEL}"
        assert span.attributes[attr.STEP_KIND] == "llm_call"
        assert span.attributes[attr.GEN_AI_REQUEST_MODEL] == MODEL
        assert span.attributes[attr.POLICY_DECISION] == "proceed"


def test_one_failed_request_of_an_agent_step_is_one_failure_towards_degradation(traced: Any) -> None:
    overloaded = APIFailure("Error code: 503 - upstream overloaded")
    polished = Reply("A polished draft.", 12, 5)
    model = ScriptedModel({"DRAFT": [overloaded, overloaded, Reply("A draft.", 10, 4)], "POLISH": [polished]})
    agent = BrokenAgent(client=offline_client(model), default_model="gpt-4o")
    degrade = GracefulDegradationRule(
        fallback_model="gpt-4o-mini", trigger=DegradationTrigger.CONSECUTIVE_FAILURES, threshold=2
    )

    @multirun.run(name="degrading", policy=Policy(graceful_degradation=degrade))
    def degrading() -> str:
        for _ in range(2):  # a failed request each
            with pytest.raises(WorkflowError):
                agent.run(TOPIC)
        return str(agent.run(TOPIC))

    assert degrading() == polished.text
    # one failure does not switch the run; the second does, and the fallback model reaches the API
    assert [call["model"] for call in model.calls] == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    spans = records(traced)
    calls = named(spans, "generate_text")
    decisions = [c.attributes[attr.POLICY_DECISION] for c in calls]
    assert decisions == ["proceed", "proceed", "fallback", "fallback"]
    assert [c.name for c in calls] == ["chat gpt-4o", "chat gpt-4o", "chat gpt-4o-mini", "chat gpt-4o-mini"]
    drafts = named(spans, "draft")
    assert [d.attributes[attr.STEP_STATUS] for d in drafts] == ["failed", "failed", "completed"]
    assert {d.attributes[attr.STEP_KIND] for d in drafts} == {"llm_call"}


OVERLOADED = APIFailure("Error code: 503 - upstream overloaded")
PACED = Policy(
    rate_limit=RateLimitRule(requests_per_minute=60),  # one LLM call a second
    circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30),
)


def test_a_call_waiting_for_its_slot_is_refused_by_a_circuit_that_opened_meanwhile(traced: Any) -> None:
    model = ScriptedModel({"FAIL": [OVERLOADED], **research_agent.script()})
    client = offline_client(model)
    failing: list[str] = []

    def meanwhile(seconds: float) -> None:
        traced.clock.now += seconds
        if not failing:  # while the second call waits, another one fails (after its own wait): it opens
            failing.append("FAIL now")
            with pytest.raises(APIError):
                client.generate_text("FAIL now", model=MODEL)

    @multirun.run(name="paced", policy=PACED)
    def paced() -> None:
        client.generate_text("ANALYZE this", model=MODEL)  # the slot at 0 s
        traced.clock.sleep = meanwhile  # type: ignore[method-assign]
        client.generate_text("REPORT now", model=MODEL)  # waits for the slot at 1 s

    with pytest.raises(PolicyViolation, match="circuit"):
        paced()
    assert model.prompts() == ["ANALYZE this", "FAIL now"]  # the refused call never reached the model
    calls = sorted(named(records(traced), "generate_text"), key=lambda s: s.start_ns)
    refused = calls[1].attributes
    assert (refused[attr.POLICY_DECISION], refused[attr.POLICY_RULE]) == ("abort", "circuit_breaker")
    assert refused[attr.STEP_STATUS] == "failed"


def test_an_agent_step_whose_request_waits_for_its_slot_is_refused_by_a_circuit_that_opened_meanwhile(
    traced: Any,
) -> None:
    model = ScriptedModel({"FAIL": [OVERLOADED], **research_agent.script()})
    client = offline_client(model)
    agent = BrokenAgent(client=client, default_model=MODEL)
    failing: list[str] = []

    def meanwhile(seconds: float) -> None:
        traced.clock.now += seconds
        if not failing:  # while draft's request waits, another call fails: the circuit of generate_text opens
            failing.append("FAIL now")
            with pytest.raises(APIError):
                client.generate_text("FAIL now", model=MODEL)

    @multirun.run(name="paced", policy=PACED)
    def paced() -> str:
        client.generate_text("ANALYZE this", model=MODEL)  # the slot at 0 s
        traced.clock.sleep = meanwhile  # type: ignore[method-assign]
        return str(agent.run(TOPIC))  # the request of its step draft waits for the slot at 1 s

    with pytest.raises(PolicyViolation, match="circuit"):
        paced()
    assert model.prompts() == ["ANALYZE this", "FAIL now"]  # draft never asked the model
    spans = records(traced)
    (draft,) = named(spans, "draft")
    # draft's request, then the call made while it waited (in its context, so inside draft too)
    inside = [s for s in named(spans, "generate_text") if s.parent_span_id == draft.span_id]
    request, failed = sorted(inside, key=lambda s: s.start_ns)
    assert (request.attributes[attr.POLICY_RULE], request.attributes[attr.STEP_STATUS]) == (
        "circuit_breaker",
        "failed",
    )
    assert request.attributes[attr.POLICY_WAIT_SECONDS] == 1.0  # refused once its wait was over
    assert failed.attributes[attr.ERROR_TYPE] == "clientai.exceptions.APIError"
    assert draft.attributes[attr.STEP_STATUS] == "failed"


def test_an_agent_step_whose_request_is_refused_fails_with_the_refusal_not_against_its_circuit(
    traced: Any,
) -> None:
    polished = Reply("A polished draft.", 12, 5)
    model = ScriptedModel({"FAIL": [OVERLOADED], "DRAFT": [Reply("A draft.", 10, 4)], "POLISH": [polished]})
    client = offline_client(model)
    agent = BrokenAgent(client=client, default_model=MODEL)
    breaker = Policy(circuit_breaker=CircuitBreakerRule(failure_threshold=1, recovery_time_seconds=30))

    @multirun.run(name="guarded", policy=breaker)
    def guarded() -> str:
        with pytest.raises(APIError):
            client.generate_text("FAIL now", model=MODEL)  # the circuit of generate_text opens at 0 s
        traced.clock.now += 20
        with pytest.raises(PolicyViolation, match="generate_text"):
            agent.run(TOPIC)  # draft's request is refused: no failure of draft's own dependency
        traced.clock.now += 11  # generate_text is half-open; draft's circuit never opened
        return str(agent.run(TOPIC))

    assert guarded() == polished.text
    refused, done = named(records(traced), "draft")
    assert refused.attributes[attr.STEP_STATUS] == "failed"
    assert refused.attributes[attr.ERROR_TYPE] == "multirun.errors.PolicyViolation"
    assert done.attributes[attr.STEP_STATUS] == "completed"


def test_a_call_interrupted_while_it_waits_ends_its_span_and_gives_back_its_probe_and_slot(
    traced: Any,
) -> None:
    model = ScriptedModel({"FAIL": [OVERLOADED], **research_agent.script()})
    client = offline_client(model)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    @multirun.run(name="paced", policy=PACED)
    def paced() -> str:
        with pytest.raises(APIError):
            client.generate_text("FAIL now", model=MODEL)  # the circuit of generate_text opens
        traced.clock.now += 31  # half-open: the next generate_text is its probe
        client.chat([{"role": "user", "content": "REPORT now"}], model=MODEL)  # takes the slot at 31 s
        sleep, traced.clock.sleep = traced.clock.sleep, interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            client.generate_text("ANALYZE this", model=MODEL)  # the probe, waiting for the slot at 32 s
        traced.clock.sleep = sleep  # type: ignore[method-assign]
        return str(client.generate_text("ANALYZE again", model=MODEL))  # the probe and the slot are free

    assert paced() == research_agent.ANALYZE.text
    assert model.prompts() == ["FAIL now", "REPORT now", "ANALYZE again"]
    calls = sorted(named(records(traced), "generate_text"), key=lambda s: s.start_ns)
    interrupted_call, last = calls[1].attributes, calls[2].attributes
    assert interrupted_call[attr.STEP_STATUS] == "failed"
    assert interrupted_call[attr.ERROR_TYPE] == "KeyboardInterrupt"
    assert last[attr.POLICY_WAIT_SECONDS] == 1.0  # the slot at 32 s, which the interrupted call never used


# ---------------------------------------------------------------------------
# ClientAI used directly, and exactly-once charging


def test_llm_calls_outside_any_run_are_left_alone(traced: Any) -> None:
    model = ScriptedModel(research_agent.script())
    client = offline_client(model)

    assert client.generate_text("ANALYZE this", model=MODEL) == research_agent.ANALYZE.text
    assert client.chat([{"role": "user", "content": "REPORT now"}], model=MODEL) == research_agent.REPORT.text
    assert "".join(client.generate_text("REPORT now", model=MODEL, stream=True)) == research_agent.REPORT.text

    assert traced.spans() == []
    assert "stream_options" not in model.calls[-1]  # the request is exactly the caller's


@pytest.mark.parametrize("method", ["generate_text", "chat"])
def test_a_stream_asked_for_by_position_is_followed_and_charged_like_one_asked_by_keyword(
    traced: Any, method: str
) -> None:
    model = ScriptedModel(research_agent.script())
    client = offline_client(model)
    prompt: Any = "REPORT now" if method == "generate_text" else [{"role": "user", "content": "REPORT now"}]
    # prompt, model, system_prompt, temperature, top_p, return_full_response, stream
    call = getattr(client, method)

    @multirun.run(name="direct")
    def direct() -> str:
        return "".join(call(prompt, MODEL, None, None, None, False, True))

    assert direct() == research_agent.REPORT.text  # text, as ClientAI streams it
    assert model.calls[-1]["stream_options"] == {"include_usage": True}
    (call_span,) = named(records(traced), method)
    assert call_span.attributes[attr.STEP_STREAM_ITEMS] == 8
    assert call_span.attributes[attr.TOKENS_USED] == research_agent.REPORT.prompt_tokens + 12


def test_a_full_response_returned_by_a_step_is_charged_once(traced: Any) -> None:
    client = offline_client(ScriptedModel(research_agent.script()))

    @multirun.step(kind=StepKind.LLM_CALL)
    def ask() -> Any:
        return client.chat(
            [{"role": "user", "content": "ANALYZE it"}], model=MODEL, return_full_response=True
        )

    @multirun.run(name="direct")
    def direct() -> Any:
        return ask()

    response = direct()

    assert response.choices[0].message.content == research_agent.ANALYZE.text  # untouched
    spans = records(traced)
    assert tree(spans) == [
        "invoke_workflow direct completed tokens=28",
        "  chat [ask llm_call] completed tokens=28",
        "    chat gpt-4o-mini [chat llm_call] completed tokens=28 in=20 out=8",
    ]


class HouseModelAgent(Agent):
    @think("draft")
    def draft(self, topic: str) -> str:
        return f"REPORT on {topic}"


@pytest.mark.parametrize("how", ["plain", "streamed", "agent"])
def test_a_call_of_a_model_with_no_price_under_unpriced_fail_is_refused(
    traced: Any, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``init(unpriced="fail")`` refuses a request of a model with no known price, once counted."""
    traced.client.fail_unpriced = True
    model = ScriptedModel(research_agent.script())
    client = offline_client(model)
    agent = HouseModelAgent(client=client, default_model="house-model")

    @multirun.run(name="direct")
    def direct() -> str:
        if how == "agent":
            return str(agent.run(TOPIC))
        return "".join(client.generate_text("REPORT now", model="house-model", stream=how == "streamed"))

    with caplog.at_level(logging.WARNING), pytest.raises(PolicyViolation, match="no known price"):
        direct()

    assert len(model.calls) == 1
    spans = records(traced)
    (call,) = named(spans, "generate_text")
    assert call.attributes[attr.STEP_STATUS] == "failed"
    assert call.attributes[attr.ERROR_TYPE] == "multirun.errors.PolicyViolation"
    assert call.attributes[attr.UNPRICED] is True
    assert call.attributes[attr.TOKENS_USED] == 42  # counted all the same
    assert "instrumentation failed" not in caplog.text  # a refusal, not a telemetry bug
    if how == "agent":
        assert one(spans, "draft").attributes[attr.ERROR_TYPE] == "multirun.errors.PolicyViolation"


def test_a_stream_of_a_model_with_no_price_closed_early_is_charged_and_its_refusal_only_noted(
    traced: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As a decorated generator step's: close() does not raise the refusal of unpriced="fail"."""
    traced.client.fail_unpriced = True
    client = offline_ollama_client(ScriptedModel(research_agent.script()))

    @multirun.run(name="direct")
    def direct() -> str:
        stream = client.generate_text("REPORT now", model="house-model", stream=True)
        text = "".join(next(stream) for _ in range(9))  # 8 words, then Ollama's last chunk, with the usage
        stream.close()  # type: ignore[attr-defined]
        return text

    with caplog.at_level(logging.WARNING):
        assert direct() == research_agent.REPORT.text

    (call,) = named(records(traced), "generate_text")
    assert call.attributes[attr.STEP_STATUS] == "completed"
    assert call.attributes[attr.TOKENS_USED] == 42
    assert [e["attributes"]["exception.type"] for e in call.events] == ["multirun.errors.PolicyViolation"]
    assert "no known price" in caplog.text


def test_a_call_the_openai_instrumentation_traced_too_is_charged_once(openai_traced: Any, llm: Any) -> None:
    """With opentelemetry-instrumentation-openai-v2 on as well, its chat span charges the call: the
    ClientAI step above it counts the call in its roll-up, not a second time as its own usage."""
    import openai

    client = ClientAI("openai", api_key="sk-offline")
    client.provider.client = openai.OpenAI(base_url=llm.url, api_key="test", max_retries=0)

    @multirun.run(name="direct")
    def direct() -> str:
        return client.generate_text("hello", model=MODEL)

    assert direct() == "re: hello"
    canned = CANNED[0].prompt + CANNED[0].completion
    spans = records(openai_traced)
    call = one(spans, "generate_text")
    assert call.attributes[attr.TOKENS_USED] == canned
    assert attr.GEN_AI_USAGE_INPUT_TOKENS not in call.attributes  # the child's usage, not its own
    (run_span,) = run_roots(spans)
    assert run_span.attributes[attr.TOKENS_USED] == canned


def test_content_is_recorded_only_when_asked_for(traced: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = research_agent.build()
    agent.run(TOPIC)
    assert not [s for s in records(traced) if attr.STEP_INPUT in s.attributes]

    traced.exporter.clear()
    monkeypatch.setattr(traced.client, "capture_content", True)
    agent.run(TOPIC)

    spans = records(traced)
    analyze_call = named(spans, "generate_text")[0]
    assert "ANALYZE the research question: OpenTelemetry adoption" in analyze_call.attributes[attr.STEP_INPUT]
    assert analyze_call.attributes[attr.STEP_OUTPUT] == research_agent.ANALYZE.text
    assert TOPIC in one(spans, "analyze").attributes[attr.STEP_INPUT]
    assert "3 results" in one(spans, "search").attributes[attr.STEP_OUTPUT]


def test_instrument_with_a_tracer_provider_configures_multirun_when_nothing_else_did(
    global_otel: None, instrumented: ClientAIInstrumentor
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumented.uninstrument()
    instrumented.instrument(tracer_provider=provider)
    try:
        agent, _ = research_agent.build()
        agent.run(TOPIC)
    finally:
        instrumented.uninstrument()
        instrumented.instrument()
        provider.shutdown()

    spans = [record_from_span(s) for s in exporter.get_finished_spans()]
    assert tree(spans) == RESEARCH_TREE


def test_a_tracer_provider_given_to_instrument_once_multirun_is_configured_is_not_ignored_silently(
    traced: Any, instrumented: ClientAIInstrumentor, caplog: pytest.LogCaptureFixture
) -> None:
    """multirun configured already (by ``init``, or by a first traced call): the spans keep going
    to its provider, and a warning says the one given to ``instrument`` is not used (a debug line)."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    with caplog.at_level(logging.WARNING, logger="multirun.integrations._options"):
        instrumented.instrument(tracer_provider=provider)
    assert "not to the one given to instrument(tracer_provider=...)" in caplog.text
    agent, _ = research_agent.build()
    agent.run(TOPIC)
    assert tree(records(traced)) == RESEARCH_TREE
    provider.shutdown()


# ---------------------------------------------------------------------------
# telemetry never breaks the agent


def test_a_failing_instrumentation_costs_a_log_line_not_the_agent(
    traced: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("telemetry bug")

    monkeypatch.setattr(integration, "_open_step", broken)
    monkeypatch.setattr(integration_options, "_warned", set())
    agent, _ = research_agent.build()

    with caplog.at_level(logging.WARNING, logger="multirun.integrations.clientai"):
        assert agent.run(TOPIC) == research_agent.REPORT.text

    assert "ClientAI instrumentation failed in starting step 'analyze'" in caplog.text
    assert [s.name for s in traced.spans()] == ["invoke_agent ResearchAgent", "invoke_workflow ResearchAgent"]


def test_usage_is_read_from_the_shapes_of_every_clientai_provider() -> None:
    ollama = {"model": "llama3", "response": "hi", "prompt_eval_count": 7, "eval_count": 3, "done": True}
    groq_last_chunk = {
        "model": "llama-3.1-8b",
        "choices": [],
        "x_groq": {"usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    }
    openai_dict = {
        "model": "gpt-4o",
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 3},
        },
    }

    replicate = {
        "model": "meta/llama-3",
        "output": "hi",
        "metrics": {"input_token_count": 6, "output_token_count": 2},
    }

    got = [
        integration._usage_of(r, p, None)
        for r, p in (
            (ollama, "ollama"),
            (groq_last_chunk, "groq"),
            (openai_dict, "openai"),
            (replicate, "replicate"),
        )
    ]

    assert [(u.model, u.provider, u.input_tokens, u.output_tokens) for u in got if u] == [
        ("llama3", "ollama", 7, 3),
        ("llama-3.1-8b", "groq", 5, 2),
        ("gpt-4o", "openai", 9, 4),
        ("meta/llama-3", "replicate", 6, 2),
    ]
    assert (got[2].cache_read_tokens, got[2].reasoning_tokens) == (8, 3)  # type: ignore[union-attr]
    assert integration._usage_of({"model": "x", "response": "no usage"}, "ollama", None) is None


# ---------------------------------------------------------------------------
# instrumenting and uninstrumenting


def test_uninstrument_restores_clientai_and_instrument_patches_it_again(
    traced: Any, instrumented: ClientAIInstrumentor
) -> None:
    assert isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)
    instrumented.uninstrument()
    try:
        assert not isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)
        agent, _ = research_agent.build()
        assert agent.run(TOPIC) == research_agent.REPORT.text
        assert traced.spans() == []
    finally:
        instrumented.instrument()
    assert isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)


def test_a_method_bound_while_instrumented_traces_nothing_once_uninstrumented(
    traced: Any, instrumented: ClientAIInstrumentor
) -> None:
    """``agent.run`` (or ``client.generate_text``) kept by the program, a route handler say, holds
    the wrapper it was bound through: after ``uninstrument()`` it still made an agent span and a
    run of 0 tokens, its steps and calls untraced."""
    model = ScriptedModel({"HELLO": [Reply("hi", 5, 3)]})
    client = offline_client(model)
    agent, _ = research_agent.build()
    run_agent, generate = agent.run, client.generate_text
    instrumented.uninstrument()
    try:
        assert run_agent(TOPIC) == research_agent.REPORT.text

        @multirun.run
        def job() -> str:
            return str(generate("HELLO", model=MODEL))

        assert job() == "hi"
        assert [s.name for s in traced.spans()] == ["invoke_workflow job"]
    finally:
        instrumented.instrument()


def test_a_budget_given_to_instrument_once_instrumented_applies_and_a_bad_one_is_refused(
    traced: Any, instrumented: ClientAIInstrumentor
) -> None:
    """Under ``opentelemetry-instrument`` ClientAI is instrumented before the program starts: the
    budget the program then gives ``instrument()`` must still cap the runs it starts."""
    assert instrumented.is_instrumented_by_opentelemetry
    try:
        with pytest.raises(ConfigurationError, match=r"instrument\(budget=\.\.\.\)"):
            instrumented.instrument(budget={"max_tokens": -1})
        instrumented.instrument(budget=Budget(max_tokens=100))
        instrumented.instrument()  # a call without options changes nothing
        agent, model = research_agent.build()
        with pytest.raises(BudgetExceededError):
            agent.run(TOPIC)
    finally:
        instrumented.uninstrument()
        instrumented.instrument()
    (run_span,) = run_roots(records(traced))
    assert run_span.attributes["multirun.budget.max_tokens"] == 100
    assert len(model.calls) == 2


def test_an_agent_made_before_instrument_is_traced_when_it_runs_after(
    traced: Any, instrumented: ClientAIInstrumentor
) -> None:
    instrumented.uninstrument()
    try:
        agent, _ = research_agent.build()  # its client, engine and tools made while uninstrumented
    finally:
        instrumented.instrument()
    assert agent.run(TOPIC) == research_agent.REPORT.text
    assert tree(records(traced)) == RESEARCH_TREE


def test_a_bad_budget_is_refused_before_anything_is_patched(instrumented: ClientAIInstrumentor) -> None:
    instrumented.uninstrument()
    try:
        with pytest.raises(ConfigurationError, match=r"instrument\(budget=\.\.\.\)"):
            instrumented.instrument(budget={"max_tokens": -1})
        assert not isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)
    finally:
        instrumented.uninstrument()
        instrumented.instrument()


@pytest.mark.parametrize("instrumented_first", [False, True])
def test_a_misspelt_option_to_instrument_is_a_type_error_naming_it(
    instrumented: ClientAIInstrumentor, instrumented_first: bool
) -> None:
    # instrument(budgt=...) was accepted without a word: the runs had no budget at all
    if not instrumented_first:
        instrumented.uninstrument()
    try:
        with pytest.raises(TypeError) as raised:
            instrumented.instrument(budgt=Budget(max_tokens=100))
        message = str(raised.value)
        assert message.startswith("ClientAIInstrumentor().instrument() got an unknown option 'budgt'")
        assert "budget" in message and "policy" in message and "tracer_provider" in message
        assert not instrumented_first or isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)
        assert instrumented_first or not isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)
        instrumented.instrument(budget=Budget(max_tokens=100), meter_provider=None)  # OTel's own: taken
    finally:
        instrumented.uninstrument()
        instrumented.instrument()


def test_a_clientai_whose_insides_moved_is_left_alone_with_a_warning(
    instrumented: ClientAIInstrumentor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    moved = (*integration._PATCHES, ("clientai.client_ai", "ClientAI.generate_stream", "_chat"))
    instrumented.uninstrument()
    monkeypatch.setattr(integration, "_PATCHES", moved)
    monkeypatch.setattr(integration_options, "_warned", set())
    try:
        with caplog.at_level(logging.WARNING, logger="multirun.integrations.clientai"):
            instrumented.instrument()  # never raises into the application's start
        assert "not instrumented: clientai.client_ai has no ClientAI.generate_stream" in caplog.text
        assert not isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)  # rolled back
    finally:
        instrumented.uninstrument()
        monkeypatch.undo()
        instrumented.instrument()
    assert isinstance(CoreAgent.__dict__["run"], wrapt.FunctionWrapper)


def test_the_instrumentor_is_an_opentelemetry_instrumentor_entry_point() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "clientai"]
    assert entry.load() is ClientAIInstrumentor
    assert list(ClientAIInstrumentor().instrumentation_dependencies()) == ["clientai >= 0.5"]


def test_importing_multirun_imports_no_clientai() -> None:
    code = (
        "import sys, multirun, multirun.integrations.clientai; "
        "sys.exit(1 if any(m == 'clientai' or m.startswith('clientai.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_instrument_imports_no_clientai_and_patches_it_when_the_program_imports_it(tmp_path: Path) -> None:
    """As ``opentelemetry-instrument`` does at the start of every program, ClientAI or not: a
    program that never imports ClientAI must not pay for its import."""
    code = (
        "import sys\n"
        "from multirun.integrations.clientai import ClientAIInstrumentor\n"
        "ClientAIInstrumentor().instrument()\n"
        "if any(m == 'clientai' or m.startswith('clientai.') for m in sys.modules):\n"
        "    sys.exit('instrument() imported ClientAI')\n"
        "from clientai_programs import research_agent\n"
        "research_agent.main([])\n"
    )
    env = environment_without_settings()
    env["MULTIRUN_DIR"] = str(tmp_path / "multirun")
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == research_agent.REPORT.text
    assert tree(load_spans(tmp_path / "multirun")) == RESEARCH_TREE


FUTURE_CLIENTAI = """
import logging, sys
import wrapt
logging.basicConfig(format="%(levelname)s %(message)s")
if sys.argv[1] == "imported":
    import clientai
    from multirun.integrations.clientai import ClientAIInstrumentor
    ClientAIInstrumentor().instrument()
from clientai.agent.core.agent import Agent
from clientai_programs import research_agent
research_agent.main([])
print(isinstance(Agent.__dict__["run"], wrapt.BaseObjectProxy))
"""


@pytest.mark.parametrize("how", ["imported", "opentelemetry-instrument"])
def test_a_clientai_whose_patched_method_was_renamed_runs_untraced_with_one_warning_naming_it(
    tmp_path: Path, how: str
) -> None:
    """A future ClientAI renames ``StepExecutionEngine._execute_single_call``: instrumenting it
    (in the program, or under ``opentelemetry-instrument`` before ClientAI is imported) patches
    nothing, and one line says what is missing (it was a warning with a traceback)."""
    future = tmp_path / "clientai"
    shutil.copytree(CLIENTAI_PACKAGE, future, ignore=shutil.ignore_patterns("__pycache__"))
    execution = future / "agent" / "core" / "execution.py"
    execution.write_text(execution.read_text().replace("_execute_single_call", "_single_call"))
    env = environment_without_settings()
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS.parent / "src")]))
    env.update(MULTIRUN_DIR=str(tmp_path / "mr"))
    command = [sys.executable, "-c", FUTURE_CLIENTAI, how]
    if how == "opentelemetry-instrument":
        command[:0] = [str(Path(sys.executable).parent / "opentelemetry-instrument")]
    done = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [research_agent.REPORT.text, "False"]
    [warning] = done.stderr.splitlines()
    assert warning.startswith("WARNING multirun: ClientAI (clientai ")
    assert "StepExecutionEngine._execute_single_call" in warning
    assert not (tmp_path / "mr" / "traces").exists()


# ---------------------------------------------------------------------------
# zero code: the same program under opentelemetry-instrument


@pytest.mark.parametrize("args", [[], ["--stream"]], ids=["plain", "streamed"])
def test_opentelemetry_instrument_gives_the_same_tree_without_a_code_change(
    traced: Any, instrumented: ClientAIInstrumentor, tmp_path: Path, args: list[str]
) -> None:
    research_agent.main(args)  # in this process, instrumented by the fixture
    here = tree(records(traced))

    env = environment_without_settings()
    env["MULTIRUN_DIR"] = str(tmp_path / "multirun")
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    done = subprocess.run(
        [str(instrument), sys.executable, "-m", "clientai_programs.research_agent", *args],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == research_agent.REPORT.text

    there = tree(load_spans(tmp_path / "multirun"))
    assert there == here == RESEARCH_TREE


def _run_module(
    module: str, tmp_path: Path, *, instrumented: bool, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m module`` from tests/, under ``opentelemetry-instrument`` if ``instrumented``."""
    environment = environment_without_settings()
    environment.update(MULTIRUN_DIR=str(tmp_path / "multirun"), **env)
    command = [sys.executable, "-m", module]
    if instrumented:
        command.insert(0, str(Path(sys.executable).parent / "opentelemetry-instrument"))
    return subprocess.run(
        command, cwd=TESTS, env=environment, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("instrumented", [False, True], ids=["python", "opentelemetry-instrument"])
def test_the_budget_a_program_gives_instrument_stops_it_under_opentelemetry_instrument_too(
    tmp_path: Path, instrumented: bool
) -> None:
    """opentelemetry-instrument instruments ClientAI first; the program's own ``instrument(budget=)``
    came second and was dropped (OpenTelemetry's 'already instrumented' warning), so the agent ran
    past its budget."""
    done = _run_module("clientai_programs.capped_agent", tmp_path, instrumented=instrumented)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped: max_tokens after 2 requests"
    assert "already instrumented" not in done.stderr
