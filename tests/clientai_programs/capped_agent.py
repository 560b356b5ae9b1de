"""The research agent with a token budget set in code, as a program that knows multirun does it.

Run as ``python -m clientai_programs.capped_agent`` from ``tests/``, or under
``opentelemetry-instrument``, which instruments ClientAI before this code runs: the budget this
program gives ``instrument()`` must stop the agent either way.
"""

from __future__ import annotations

from clientai_programs import research_agent
from multirun.errors import BudgetExceededError
from multirun.integrations.clientai import ClientAIInstrumentor
from multirun.models import Budget

MAX_TOKENS = 100  # the tool selection alone uses 180


def main() -> str:
    ClientAIInstrumentor().instrument(budget=Budget(max_tokens=MAX_TOKENS))
    agent, model = research_agent.build()
    try:
        said = f"not stopped: {agent.run(research_agent.TOPIC)}"
    except BudgetExceededError as exc:
        said = f"stopped: {exc.limit}"
    print(said, f"after {len(model.calls)} requests")
    return said


if __name__ == "__main__":
    main()
