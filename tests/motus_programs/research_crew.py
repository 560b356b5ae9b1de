"""A Motus research crew that knows nothing of multirun: parallel fetches, a retry, a timeout,
a cancellation, a tool-using ReAct agent and a writer agent, offline against a fake model.

Run as ``python research_crew.py`` (or under ``opentelemetry-instrument``); the tests also
import it and call :func:`main`.
"""

from __future__ import annotations

import asyncio
import threading
import time

from motus.agent import ReActAgent
from motus.models import BaseChatClient, ChatCompletion, FunctionCall, ToolCall
from motus.runtime import agent_task, cancel, resolve
from motus.tools import tool

MODEL = "gpt-4o-mini"

# What the fake model reports for each call (prompt_tokens exclude cached input, as Motus's clients do)
TOOL_TURN_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 18,
    "total_tokens": 138,
    "cache_read_input_tokens": 20,
    "cache_creation_input_tokens": 0,
}
ANSWER_USAGE = {"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240}


class FakeChatClient(BaseChatClient):
    """An offline model: asks for ``web_search`` once when it has tools, then answers."""

    def __init__(self, latency: float = 0.01) -> None:
        self.latency = latency
        self.calls = 0

    async def create(self, model, messages, tools=None, reasoning=None, **kwargs) -> ChatCompletion:  # type: ignore[no-untyped-def]
        self.calls += 1
        await asyncio.sleep(self.latency)
        searched = any(m.role == "tool" for m in messages)
        if tools and not searched:
            question = next(m.content for m in messages if m.role == "user")
            call = ToolCall(
                id=f"call_{self.calls}",
                function=FunctionCall(name="web_search", arguments=f'{{"query": "{question[:40]}"}}'),
            )
            return ChatCompletion(
                id=f"chatcmpl-{self.calls}",
                model=model,
                tool_calls=[call],
                finish_reason="tool_calls",
                usage=dict(TOOL_TURN_USAGE),
            )
        last = messages[-1].content or ""
        return ChatCompletion(
            id=f"chatcmpl-{self.calls}",
            model=model,
            content=f"[{model}] {last[:60]}",
            usage=dict(ANSWER_USAGE),
        )

    async def parse(self, model, messages, response_format, tools=None, reasoning=None, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError("structured output is not used by this crew")


@tool
async def web_search(query: str) -> str:
    """Search the web for ``query``."""
    await asyncio.sleep(0.01)
    return f"3 results for {query!r}"


BOTH_FETCHING = threading.Barrier(2)


@agent_task
def fetch_source(source: str, topic: str) -> str:
    """A slow blocking fetch (runs in Motus's thread pool, in parallel with its sibling: each
    waits for the other, as a loaded machine could start one after the other had ended)."""
    BOTH_FETCHING.wait(30)
    time.sleep(0.15)
    return f"{source}: 12 documents about {topic}"


FLAKY_CALLS: list[str] = []


@agent_task(retries=2, retry_delay=0.01)
def flaky_fetch(topic: str) -> str:
    """Fails with ConnectionError on its first attempt."""
    FLAKY_CALLS.append(topic)
    if len(FLAKY_CALLS) == 1:
        raise ConnectionError("connection reset by peer")
    return f"background on {topic}"


LOOKUPS: list[str] = []


@agent_task(timeout=1.0, retries=1)
async def slow_lookup(topic: str) -> str:
    """Hangs on its first attempt (Motus's timeout stops it), answers on the second (1 s, as
    0.3 s could pass on a loaded machine before the answering attempt was scheduled)."""
    LOOKUPS.append(topic)
    if len(LOOKUPS) == 1:
        await asyncio.sleep(30)
    return f"facts about {topic}"


@agent_task
async def slow_extra(topic: str) -> str:
    """Never needed: the crew cancels it."""
    await asyncio.sleep(30)
    return f"extra on {topic}"


@agent_task
def build_prompt(topic: str, *sources: str) -> str:
    return f"Research {topic} from: " + "; ".join(sources)


@agent_task(task_type="agent_call")
async def research_crew(topic: str):  # type: ignore[no-untyped-def]
    """The whole crew: returns the writer's report (a future Motus settles later)."""
    arxiv = fetch_source("arxiv", topic)
    news = fetch_source("news", topic)
    extra = slow_extra(topic)
    background = flaky_fetch(topic)
    facts = slow_lookup(topic)
    prompt = build_prompt(topic, arxiv, news, background, facts)
    researcher = ReActAgent(
        client=FakeChatClient(),
        model_name=MODEL,
        name="researcher",
        system_prompt="You research topics with web_search.",
        tools=[web_search],
    )
    writer = ReActAgent(
        client=FakeChatClient(),
        model_name=MODEL,
        name="writer",
        system_prompt="You write a short report from notes.",
    )
    notes = researcher(prompt)
    report = writer(notes)
    cancel(extra)
    return report


def main() -> str:
    FLAKY_CALLS.clear()
    LOOKUPS.clear()
    BOTH_FETCHING.reset()
    report = resolve(research_crew("OpenTelemetry for agents"))
    print(report)
    return str(report)


if __name__ == "__main__":
    main()
