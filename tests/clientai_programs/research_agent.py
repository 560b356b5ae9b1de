"""A ClientAI research agent: think -> act (picks and calls a tool) -> observe -> synthesize.

Plain ClientAI code: nothing here knows about multirun or OpenTelemetry. Run
it as ``python -m clientai_programs.research_agent [--stream]`` from ``tests/``,
or under ``opentelemetry-instrument`` to have it traced without a change.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from clientai import ClientAI
from clientai.agent import Agent, ToolConfig, act, observe, synthesize, think

from clientai_programs.fake_openai import Reply, ScriptedModel, offline_client

MODEL = "gpt-4o-mini"
TOPIC = "OpenTelemetry adoption"

TOOL_CHOICE = json.dumps(
    {
        "tool_calls": [
            {
                "tool_name": "search",
                "arguments": {"query": "OpenTelemetry adoption 2025"},
                "confidence": 0.9,
                "reasoning": "The plan needs recent facts",
            }
        ]
    }
)

# tokens per call: analyze 20+8, tool selection 150+30, gather 40+6, report 30+12
ANALYZE = Reply("Three angles: history, adoption, tooling.", 20, 8)
SELECT = Reply(TOOL_CHOICE, 150, 30)
GATHER = Reply("Facts: adoption doubled in a year.", 40, 6, cached_tokens=10)
REPORT = Reply("OpenTelemetry adoption doubled this year, driven by tooling.", 30, 12)
TOTAL_TOKENS = 20 + 8 + 150 + 30 + 40 + 6 + 30 + 12


def script() -> dict[str, list[Reply | Exception]]:
    return {
        "uses tools to solve problems": [SELECT],  # ClientAI's tool-selection prompt
        "ANALYZE": [ANALYZE],
        "GATHER": [GATHER],
        "REPORT": [REPORT],
    }


def search(query: str) -> str:
    """Search the offline index and return what it found."""
    return f"3 results for {query}: adoption doubled"


def agent_class(stream: bool = False) -> type[Agent]:
    """The agent; with ``stream``, its last step streams the model's answer."""

    class ResearchAgent(Agent):
        @think("analyze")
        def analyze(self, topic: str) -> str:
            return f"ANALYZE the research question: {topic}"

        @act("gather")
        def gather(self, plan: str) -> str:
            return f"GATHER facts for this plan: {plan}"

        @observe("note", send_to_llm=False)
        def note(self, facts: str) -> str:
            return f"notes: {facts}"

        @synthesize("report", stream=stream)
        def report(self, notes: str) -> str:
            return f"REPORT from these notes: {notes}"

    return ResearchAgent


def build(
    model: ScriptedModel | None = None,
    *,
    stream: bool = False,
    default_model: str = MODEL,
    tool: Callable[..., Any] = search,
    client: Callable[[ScriptedModel], ClientAI] = offline_client,
) -> tuple[Agent, ScriptedModel]:
    """The agent and its scripted model; ``client`` makes the ClientAI (its provider) for the model."""
    model = model or ScriptedModel(script())
    agent = agent_class(stream)(
        client=client(model),
        default_model=default_model,
        tools=[ToolConfig(tool=tool, scopes=["act"], name="search")],
    )
    return agent, model


def main(argv: list[str] | None = None) -> str:
    stream = "--stream" in (sys.argv[1:] if argv is None else argv)
    agent, _ = build(stream=stream)
    answer = "".join(agent.run(TOPIC, stream=True)) if stream else agent.run(TOPIC)
    print(answer)
    return str(answer)


if __name__ == "__main__":
    main()
